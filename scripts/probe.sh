#!/bin/sh
# Readiness probe of a hot-upgrade sidecar slot (OpenKruise runs the same probe
# in both slots, the empty image included):
#   SIDECARSET_VERSION=0 (empty image)   ready
#   VERSION <= ALT (passive: an old slot  ready: the other slot's probe speaks
#   restarted mid-upgrade)                for the pod (or it stands in for a
#                                         newer version that is down: serving)
#   this slot's version serves            ready
#   a newer version has superseded it     ready (until Kruise resets the slot)
#   nobody serves / an older one serves   not ready (migration pending or failed)
#
# It runs every few seconds in every pod, so the common answer costs no Python:
# a fresh serving marker (see hotswap-marker.sh, installed beside this script)
# of our version or a newer one means ready. Anything else (no marker, a stale
# one, a filesystem control socket, no /proc/net/unix, no hotswap-marker.sh)
# asks the control socket through `hotswap probe`, which has the final word.
# That trusts only a server of its own uid, plus HOTSWAP_ALLOW_UIDS=uid,uid.
#
# Settings (environment):
#   SIDECARSET_VERSION      this slot's version (Kruise); 0 for the empty image
#   SIDECARSET_VERSION_ALT  the other slot's version (Kruise)
#   HOTSWAP_NAME            sidecar name, control socket @hotswap/NAME (default: sidecar)
#   HOTSWAP_CONTROL_PATH    filesystem control socket instead (optional; no marker then)
#   HOTSWAP_MARKER_FRESH    seconds a marker stays valid (default: 3)
#   HOTSWAP_CLI             the hotswap command (default: hotswap, else python3 -m hotswap)
#   HOTSWAP_ALLOW_UIDS      more uids the CLI trusts as the server's (default: only its own)
set -eu
version=${SIDECARSET_VERSION:-}
alt=${SIDECARSET_VERSION_ALT:-}
name=${HOTSWAP_NAME:-sidecar}
fresh=${HOTSWAP_MARKER_FRESH:-3}  # seconds
if [ "$version" = "0" ]; then
    exit 0
fi
# Plain numbers only (digits, no leading zero, at most 18: 64-bit arithmetic);
# any other spelling goes to the CLI, which applies hotswap.kruise's rules.
number() { case $1 in ""|*[!0-9]*|0?*|???????????????????*) return 1 ;; esac; }
if number "$version" && number "$alt" && [ "$alt" != 0 ] && [ "$version" -le "$alt" ]; then
    exit 0
fi

case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
case $version in
    ""|*[!0-9]*) ;;
    *)
        if [ -z "${HOTSWAP_CONTROL_PATH:-}" ] && [ -r "$here/hotswap-marker.sh" ]; then
            # shellcheck source=scripts/hotswap-marker.sh
    . "$here/hotswap-marker.sh"
            hotswap_markers "$name" "$version" "$fresh"
            if [ "$marker_ours" = 1 ] || [ "$marker_newer" = 1 ]; then
                exit 0
            fi
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
exec $cli probe --name="$name"
