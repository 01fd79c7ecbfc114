#!/bin/sh
# PostStart hook of an OpenKruise SidecarSet HotUpgrade sidecar slot.
#
# Kruise runs this in the container it has just started, with
#   SIDECARSET_VERSION      this slot's version: the SidecarSet's resourceVersion
#                           (say 1098297016) when the slot was switched to it;
#                           0 for the empty image (injected, or reset)
#   SIDECARSET_VERSION_ALT  the other slot's version
# An old slot the kubelet restarts mid-upgrade has the new version as its ALT:
# the passive case below.
# and holds the container (and the rollout) until it exits:
#   exit 0      the new version serves and has confirmed: the old one stops
#               accepting as it reads that (the handover is the new one's)
#   exit != 0   the migration failed; the kubelet restarts this container while
#               the old one keeps serving
#
# Settings (environment):
#   HOTSWAP_NAME              sidecar name, control socket @hotswap/NAME (default: sidecar)
#   HOTSWAP_CONTROL_PATH      filesystem control socket instead (optional)
#   HOTSWAP_MIGRATE_TIMEOUT   seconds to wait (default: 60): never fewer; on a
#                             busy node up to a second or two more. Digits, a
#                             fraction allowed, at most 999999 (blanks around
#                             them and a leading + are dropped); any other
#                             spelling fails the hook at once (exit 2)
#   HOTSWAP_MIGRATE_FAST      seconds of the wait spent watching the serving
#                             marker without Python (default: 10; 0: never)
#   HOTSWAP_MARKER_FRESH      seconds a marker stays valid (default: 3)
#   HOTSWAP_HOOK_DIR          where the hook leaves its deadline for the sidecar
#                             (default: /dev/shm; the sidecar must see the same),
#                             in hotswap-hook-NAME-VERSION@HOSTNAME
#   HOTSWAP_CLI               the hotswap command (default: hotswap, else python3 -m hotswap)
#   HOTSWAP_ALLOW_UIDS        more uids the CLI trusts as the server's (default:
#                             only its own; for a server that runs as another
#                             user, which must allow ours by the same variable)
set -eu

version=${SIDECARSET_VERSION:-}
alt=${SIDECARSET_VERSION_ALT:-}
name=${HOTSWAP_NAME:-sidecar}
timeout=${HOTSWAP_MIGRATE_TIMEOUT:-60}

log() { echo "migrate.sh[$name]: $*"; }

# A version the shell compares as such: digits, no leading zero (octal), at
# most 18 of them (64-bit arithmetic); a resourceVersion has about ten.
number() { case $1 in ""|*[!0-9]*|0?*|???????????????????*) return 1 ;; esac; }
# A number of seconds small enough for the arithmetic below.
whole() { case $1 in ""|*[!0-9]*|0?*|???????*) return 1 ;; esac; }
# HOTSWAP_MIGRATE_TIMEOUT in hundredths of a second, into $timeout_cs, and
# as plain digits into $timeout_plain: digits with an optional fraction (60,
# 2.5, 060, .5), at most six before the point; blanks around them and a
# leading + are dropped, as the CLI drops them (a ConfigMap value made
# --from-file ends with a newline). Hundredths and no finer: what is cut
# makes the deadline the sidecar reads come a little before the CLI gives
# up, never after. Returns 1 for any other spelling (1e2, -5, 6 0), which
# the hook refuses.
centiseconds() {
    _cs=$1
    while :; do case $_cs in [[:space:]]*) _cs=${_cs#?} ;; *) break ;; esac; done
    while :; do case $_cs in *[[:space:]]) _cs=${_cs%?} ;; *) break ;; esac; done
    case $_cs in +*) _cs=${_cs#+} ;; esac
    _cs_whole=${_cs%%.*}
    case $_cs in *.*) _cs_frac=${_cs#*.} ;; *) _cs_frac= ;; esac
    case $_cs_whole$_cs_frac in ""|*[!0-9]*) return 1 ;; esac
    while :; do case $_cs_whole in 0?*) _cs_whole=${_cs_whole#0} ;; *) break ;; esac; done
    case $_cs_whole in ???????*) return 1 ;; esac
    _cs_frac=${_cs_frac}00
    _cs_frac=${_cs_frac%"${_cs_frac#??}"}
    # 1NN - 100: a fraction like 08 is no octal number to the shell.
    timeout_cs=$((${_cs_whole:-0} * 100 + 1$_cs_frac - 100))
    timeout_plain=$_cs
}
timeout_cs=
if centiseconds "$timeout"; then
    timeout=$timeout_plain  # for the fast path's arithmetic and the CLI too
else
    timeout_cs=
fi

# The shortcuts below take only plain numbers; any other spelling goes to the
# CLI, which applies hotswap.kruise's rules (and rejects what is no version).
if [ "$version" = "0" ]; then
    log "SIDECARSET_VERSION=0: this is the empty image, nothing to migrate"
    exit 0
fi
if [ -z "$version" ]; then
    log "SIDECARSET_VERSION is unset: this hook belongs to a Kruise HotUpgrade slot"
    exit 2
fi
if number "$version" && number "$alt" && [ "$alt" != 0 ] && [ "$version" -le "$alt" ]; then
    # The role hotswap calls passive: the process never takes the sockets
    # back (it binds only if nobody serves, standing in for a newer version
    # that is down), and a failed hook would only get the container killed.
    log "version $version, other slot $alt: an old slot restarted mid-upgrade;" \
        "passive, nothing to migrate"
    exit 0
fi

case "$alt" in
    ""|0) log "version $version: fresh start, waiting until it serves" ;;
    *)    log "version $version taking over from version $alt (timeout ${timeout}s)" ;;
esac

# Fast path, no Python: our version serving NAME binds its serving marker
# (hotswap-marker.sh, installed beside this script) from the moment it sends
# its predecessor the confirmation (the handover is its own from then on),
# which `hotswap wait-ready` looks for too. Watch for it every 0.1 s for up to
# HOTSWAP_MIGRATE_FAST seconds, but leave the CLI at least one second of the
# timeout: if the marker does not show up (slow start, failed migration, a
# newer version serving, a filesystem control socket, a timeout that is not
# a whole number of seconds), the CLI waits for the rest and has the final
# word.
fast=${HOTSWAP_MIGRATE_FAST:-10}
# No marker can show up for a NAME with a blank (it would not be the last
# field of its /proc/net/unix line) or one too long for it: an abstract
# Unix name holds 108 bytes, and the marker's stamp has 10 digits (the
# sidecar logs that it has none). Ask the CLI at once then. Bytes, in the C
# locale: bash counts characters in a UTF-8 one (dash always bytes).
marker_name="@hotswap/$name/serving/$version/0000000000"
case $name in *[[:space:]]*) fast=0 ;; esac
[ "$(LC_ALL=C; printf %s "${#marker_name}")" -le 108 ] || fast=0
case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
# Hundredths of a second since boot, from /proc/uptime, into $boot_cs: the
# fast path's clock. Unlike the wall clock (date), it never steps: an NTP
# step forward during the wait must not count as time spent (it left the
# CLI one second of a 60 s timeout). Returns 1 if it cannot be read.
uptime_cs() {
    read -r boot_cs _ 2>/dev/null </proc/uptime || return 1
    case $boot_cs in
        *.[0-9][0-9]) ;;
        *) return 1 ;;
    esac
    _up_whole=${boot_cs%.*}
    _up_frac=${boot_cs#*.}
    case $_up_whole in ""|*[!0-9]*|0?*|????????????*) return 1 ;; esac
    # 1NN - 100: a fraction like 08 is no octal number to the shell.
    boot_cs=$((_up_whole * 100 + 1$_up_frac - 100))
}
# The hook's deadline, for the sidecar in this container: a successor that
# has not confirmed by then no longer does (hotswap.kruise.hook_gave_up).
# Once this hook has failed, the kubelet stops the container, and a
# successor that confirmed meanwhile would be stopped as the one process
# accepting. In hundredths of a second since boot; best effort (nothing
# written, no such check). When the hook fails, whenever that is (a CLI
# that failed at once as well as a timeout), it is set to that moment and
# left in place: the kubelet stops the container now.
#
# Named for this pod too, by its hostname (the pod's name; the sidecar reads
# the same, hotswap.kruise.hook_deadline_path): every pod of a rollout has
# the same version, and pods with hostIPC share /dev/shm. A hostname with
# anything but letters, digits, '.', '_' and '-' names no file (nor does
# the sidecar look for one).
deadline_file=
host=
IFS= read -r host 2>/dev/null </proc/sys/kernel/hostname || host=
case $host in
    ""|*[!ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-]*)
        log "no deadline left for the sidecar (hostname '$host'): a successor that" \
            "confirms after it is stopped as the serving one"
        host= ;;
esac
# A timeout the hook cannot read leaves a deadline already past: it fails
# below, at once.
if [ -n "$host" ] && number "$version" && uptime_cs; then
    case $name in
        */*) ;;  # no sidecar has such a NAME (the library refuses it)
        *)
            deadline_file=${HOTSWAP_HOOK_DIR:-/dev/shm}/hotswap-hook-$name-$version@$host
            if ! { printf '%s\n' $((boot_cs + ${timeout_cs:-0})) >"$deadline_file.$$" &&
                   mv -f "$deadline_file.$$" "$deadline_file"; } 2>/dev/null; then
                rm -f "$deadline_file.$$" 2>/dev/null || :
                log "cannot leave the deadline in ${HOTSWAP_HOOK_DIR:-/dev/shm}:" \
                    "a successor that confirms after it is stopped as the serving one"
                deadline_file=
            fi
            ;;
    esac
fi
succeeded() {
    log "$1"
    [ -z "$deadline_file" ] || rm -f "$deadline_file"
    exit 0
}
failed() {
    log "$2"
    if [ -n "$deadline_file" ] && uptime_cs; then
        if ! { printf '%s\n' "$boot_cs" >"$deadline_file.$$" &&
               mv -f "$deadline_file.$$" "$deadline_file"; } 2>/dev/null; then
            rm -f "$deadline_file.$$" 2>/dev/null || :
        fi
    fi
    exit "$1"
}
if [ -z "$timeout_cs" ]; then
    failed 2 "HOTSWAP_MIGRATE_TIMEOUT='$timeout' is not a number of seconds (digits, a fraction allowed, at most 999999)"
fi
if number "$version" && whole "$timeout" && whole "$fast" &&
   [ "$timeout" -gt 1 ] && [ "$fast" -gt 0 ] && [ -z "${HOTSWAP_CONTROL_PATH:-}" ] &&
   [ -r /proc/net/unix ] && [ -r "$here/hotswap-marker.sh" ] && uptime_cs; then
    # shellcheck source=scripts/hotswap-marker.sh
    . "$here/hotswap-marker.sh"
    if [ "$fast" -ge "$timeout" ]; then
        fast=$((timeout - 1))
    fi
    # Bounded by the time since boot and by the number of polls.
    start=$boot_cs
    polls=0
    hotswap_markers "$name" "$version" "${HOTSWAP_MARKER_FRESH:-3}"
    while [ "$marker_ours" = 0 ] && [ "$marker_newer" = 0 ] && [ "$marker_now" -gt 0 ] &&
          uptime_cs && [ $((boot_cs - start)) -lt $((fast * 100)) ] &&
          [ "$polls" -lt $((fast * 10)) ]; do
        if sleep 0.1 2>/dev/null; then  # POSIX sleep need not take fractions
            polls=$((polls + 1))
        else
            sleep 1
            polls=$((polls + 10))
        fi
        hotswap_markers "$name" "$version" "${HOTSWAP_MARKER_FRESH:-3}"
    done
    if [ "$marker_ours" = 1 ]; then
        succeeded "migration to version $version done (version $version serves)"
    fi
    # What the fast path took, in whole tenths of a second and never more
    # than it did (the readings are 0.01 s apart at most), so that the hook
    # never gives up before its timeout. The CLI gets the rest, at least a
    # second.
    uptime_cs || boot_cs=$start
    spent=$(((boot_cs - start - 1) / 10))
    [ "$spent" -ge 0 ] || spent=0
    left=$((timeout * 10 - spent))
    [ "$left" -ge 10 ] || left=10
    case $((left % 10)) in
        0) timeout=$((left / 10)) ;;
        *) timeout=$((left / 10)).$((left % 10)) ;;
    esac
fi

if [ -n "${HOTSWAP_CLI:-}" ]; then
    cli=$HOTSWAP_CLI
elif command -v hotswap >/dev/null 2>&1; then
    cli=hotswap
else
    cli="python3 -m hotswap"
fi

# The hook only waits: its own Python start-up should not take CPU from the
# version serving meanwhile (the readiness probe, by contrast, keeps normal
# priority: it must answer within its timeout).
if command -v nice >/dev/null 2>&1; then
    cli="nice -n 19 $cli"
fi

# shellcheck disable=SC2086  # $cli may be "python3 -m hotswap"
if $cli wait-ready --name="$name" --timeout "$timeout"; then
    succeeded "migration to version $version done"
else
    status=$?
    failed "$status" "migration to version $version FAILED (exit $status)"
fi
