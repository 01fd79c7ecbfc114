#!/bin/sh
# PostStart hook of an OpenKruise SidecarSet HotUpgrade sidecar slot.
#
# Kruise runs this in the container it has just started, with
#   SIDECARSET_VERSION      this slot's version (0 = the empty image)
#   SIDECARSET_VERSION_ALT  the other slot's version
# and holds the container (and the rollout) until it exits:
#   exit 0      the new version serves and the old one has stopped accepting
#   exit != 0   the migration failed; the kubelet restarts this container while
#               the old one keeps serving
#
# Settings (environment):
#   HOTSWAP_NAME              sidecar name, control socket @hotswap/NAME (default: sidecar)
#   HOTSWAP_CONTROL_PATH      filesystem control socket instead (optional)
#   HOTSWAP_MIGRATE_TIMEOUT   seconds to wait (default: 60)
#   HOTSWAP_CLI               the hotswap command (default: hotswap, else python3 -m hotswap)
set -eu

version=${SIDECARSET_VERSION:-}
alt=${SIDECARSET_VERSION_ALT:-}
name=${HOTSWAP_NAME:-sidecar}
timeout=${HOTSWAP_MIGRATE_TIMEOUT:-60}

log() { echo "migrate.sh[$name]: $*"; }

if [ "$version" = "0" ]; then
    log "SIDECARSET_VERSION=0: this is the empty image, nothing to migrate"
    exit 0
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

case "$alt" in
    ""|0) log "version ${version:-unset}: fresh start, waiting until it serves" ;;
    *)    log "version $version taking over from version $alt (timeout ${timeout}s)" ;;
esac

# shellcheck disable=SC2086  # $cli may be "python3 -m hotswap"
if $cli wait-ready --name "$name" --timeout "$timeout"; then
    log "migration to version ${version:-?} done"
    exit 0
else
    status=$?
    log "migration to version ${version:-?} FAILED (exit $status)"
    exit "$status"
fi
