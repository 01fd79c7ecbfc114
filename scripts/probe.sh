#!/bin/sh
# Readiness probe of a hot-upgrade sidecar slot (OpenKruise runs the same probe
# in both slots, the empty image included):
#   SIDECARSET_VERSION=0 (empty image)   ready
#   this slot's version serves            ready
#   a newer version has superseded it     ready (until Kruise resets the slot)
#   nobody serves / an older one serves   not ready (migration pending or failed)
#
# It runs every few seconds in every pod, so the common answer costs no Python:
# the process serving NAME as version N keeps the abstract Unix name
# @hotswap/NAME/serving/N/T bound while it serves, its event loop renewing it
# every second with the current Unix time T (the kernel drops it with the
# process), and the pod's network namespace lists it in /proc/net/unix. A
# fresh marker (T within the last few seconds) of our version or a newer one
# means ready. Anything else (no marker, a stale one: a stuck event loop; a
# filesystem control socket; no /proc/net/unix) asks the control socket
# through `hotswap probe`, which has the final word. Markers are not
# authenticated: the fast path trusts the pod's own containers.
set -eu
version=${SIDECARSET_VERSION:-}
name=${HOTSWAP_NAME:-sidecar}
fresh=${HOTSWAP_MARKER_FRESH:-3}  # seconds
if [ "$version" = "0" ]; then
    exit 0
fi

case $version in
    ""|*[!0-9]*) ;;
    *)
        if [ -z "${HOTSWAP_CONTROL_PATH:-}" ] && [ -r /proc/net/unix ]; then
            now=$(date +%s)
            # The path is the last field of a line (a name with blanks never
            # matches here and goes to the CLI).
            set -f
            for field in $(grep -F "@hotswap/$name/serving/" /proc/net/unix || true); do
                case $field in
                    "@hotswap/$name/serving/"*/*)
                        rest=${field#"@hotswap/$name/serving/"}
                        rank=${rest%%/*}
                        stamp=${rest#*/}
                        case $rank in ""|*[!0-9]*) continue ;; esac
                        case $stamp in ""|*[!0-9]*|????????????*) continue ;; esac
                        if [ "$rank" -ge "$version" ] 2>/dev/null &&
                           [ $((now - stamp)) -le "$fresh" ] 2>/dev/null &&
                           [ $((stamp - now)) -le "$fresh" ] 2>/dev/null; then
                            exit 0
                        fi
                        ;;
                esac
            done
        fi
        ;;
esac

if [ -n "${HOTSWAP_CLI:-}" ]; then
    cli=$HOTSWAP_CLI
elif command -v hotswap >/dev/null 2>&1; then
    cli=hotswap
else
    cli="python3 -m hotswap"
fi
# shellcheck disable=SC2086  # $cli may be "python3 -m hotswap"
exec $cli probe --name "$name"
