#!/bin/sh
# The test suite, as `make test` runs it. The container demo test needs a
# Docker engine: on a machine without Docker Hub, the workspace's
# ../shared/tools/docker-up.sh brings one up with a stand-in base image
# (BASE_IMAGE); elsewhere an engine already running is used, and with none the
# test is skipped with its reason (pytest -rs) -- unless HOTSWAP_REQUIRE_DOCKER=1
# (CI), where that is a failure.
set -eu
cd "$(dirname "$0")/.."
up=../shared/tools/docker-up.sh
if [ -z "${BASE_IMAGE:-}" ] && [ -f "$up" ] && [ "$(id -u)" = 0 ]; then
    if BASE_IMAGE=$(bash "$up" | tail -n 1); then
        export BASE_IMAGE
        echo "test.sh: Docker is up; base image $BASE_IMAGE"
    else
        echo "test.sh: $up failed; the container test will say why" >&2
    fi
fi
exec .venv/bin/python -m pytest -q -rs "$@"
