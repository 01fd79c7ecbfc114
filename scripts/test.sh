#!/bin/sh
# The test suite, as `make test` runs it. The container demo test needs a
# Docker engine: on a machine without Docker Hub, the workspace's
# ../shared/tools/docker-up.sh brings one up with a stand-in base image
# (BASE_IMAGE); elsewhere an engine already running is used, and with none the
# test is skipped with its reason (pytest -rfEs: the failures and skips) -- unless HOTSWAP_REQUIRE_DOCKER=1
# (CI), where that is a failure.
set -eu
cd "$(dirname "$0")/.."
up=../shared/tools/docker-up.sh
if [ -z "${BASE_IMAGE:-}" ] && [ -f "$up" ] && [ "$(id -u)" = 0 ]; then
    # Its status, not tail's: a failed bring-up must not pass off its last
    # line as the base image.
    if up_out=$(bash "$up"); then
        BASE_IMAGE=$(printf '%s\n' "$up_out" | tail -n 1)
        export BASE_IMAGE
        echo "test.sh: Docker is up; base image $BASE_IMAGE"
    else
        echo "test.sh: $up failed; the container test will say why" >&2
    fi
fi
exec .venv/bin/python -m pytest -q -rfEs "$@"
