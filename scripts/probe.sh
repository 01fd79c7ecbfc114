#!/bin/sh
# Readiness probe of a hot-upgrade sidecar slot (OpenKruise runs the same probe
# in both slots, the empty image included):
#   SIDECARSET_VERSION=0 (empty image)   ready
#   this slot's version serves            ready
#   a newer version has superseded it     ready (until Kruise resets the slot)
#   nobody serves / an older one serves   not ready (migration pending or failed)
set -eu
if [ "${SIDECARSET_VERSION:-}" = "0" ]; then
    exit 0
fi
if [ -n "${HOTSWAP_CLI:-}" ]; then
    cli=$HOTSWAP_CLI
elif command -v hotswap >/dev/null 2>&1; then
    cli=hotswap
else
    cli="python3 -m hotswap"
fi
# shellcheck disable=SC2086  # $cli may be "python3 -m hotswap"
exec $cli probe --name "${HOTSWAP_NAME:-sidecar}"
