# shellcheck shell=sh disable=SC2034  # sets marker_* for the caller
# Sourced (not run) by probe.sh and migrate.sh: what the serving markers say,
# in POSIX sh, without starting Python.
#
# The process serving sidecar NAME as Kruise version N keeps the abstract Unix
# name @hotswap/NAME/serving/N/T bound exactly while it serves, its event loop
# renewing it every second with the current Unix time T; the kernel drops it
# with the process. The pod's network namespace lists it in /proc/net/unix.
# A marker counts only if T is within FRESH seconds of now (a stale one means
# a stuck event loop, or a forked child holding an inherited name).
# Markers are not authenticated: this trusts the pod's own containers.
#
# hotswap_markers NAME VERSION FRESH
#   Sets marker_ours=1 if a fresh marker of exactly VERSION is bound, and
#   marker_newer=1 if a fresh marker of a higher version is; each is 0
#   otherwise, also when /proc/net/unix or the clock cannot be read; sets
#   marker_now to the Unix time it used (0 if none). VERSION is a decimal
#   Kruise version. Always returns 0; runs date(1) and grep(1) once each.
hotswap_markers() {
    marker_ours=0
    marker_newer=0
    marker_now=$(date +%s 2>/dev/null) || marker_now=0
    case $marker_now in ""|*[!0-9]*) marker_now=0 ;; esac
    [ "$marker_now" != 0 ] && [ -r /proc/net/unix ] || return 0
    _hm_now=$marker_now
    _hm_prefix="@hotswap/$1/serving/"
    case $- in *f*) _hm_glob=off ;; *) _hm_glob=on; set -f ;; esac
    # The path is the last field of a line (a name with blanks never
    # matches here).
    for _hm_field in $(grep -F "$_hm_prefix" /proc/net/unix || true); do
        case $_hm_field in
            "$_hm_prefix"*/*) ;;
            *) continue ;;
        esac
        _hm_rest=${_hm_field#"$_hm_prefix"}
        _hm_rank=${_hm_rest%%/*}
        _hm_stamp=${_hm_rest#*/}
        # Decimal without leading zeros (the shell's arithmetic takes 0NN for
        # octal, and a bad number there is fatal, not a false test).
        case $_hm_rank in ""|*[!0-9]*|0?*|???????????????????*) continue ;; esac
        case $_hm_stamp in ""|*[!0-9]*|0?*|????????????*) continue ;; esac
        [ $((_hm_now - _hm_stamp)) -le "$3" ] 2>/dev/null || continue
        [ $((_hm_stamp - _hm_now)) -le "$3" ] 2>/dev/null || continue
        if [ "$_hm_rank" -eq "$2" ] 2>/dev/null; then
            marker_ours=1
        elif [ "$_hm_rank" -gt "$2" ] 2>/dev/null; then
            marker_newer=1
        fi
    done
    [ "$_hm_glob" = off ] || set +f
    return 0
}
