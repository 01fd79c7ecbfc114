#!/bin/sh
# Set up .venv from scratch: system packages python-prctl needs to build (gcc,
# libcap-dev; installed with apt-get when we are root and they are missing),
# then the project and its dev tools. Idempotent; used by the Makefile.
# `bootstrap.sh bench` adds what make bench needs (wrk, matplotlib).
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! [ -e /usr/include/sys/capability.h ] || ! command -v gcc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing gcc and libcap-dev (python-prctl builds from source)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libcap-dev >/dev/null
    else
        echo "bootstrap: python-prctl needs gcc and libcap-dev; install them first" >&2
    fi
fi

if [ "${1:-}" = bench ]; then
    # make bench: wrk (throughput) and the reference peers nginx and HAProxy
    # from Debian, matplotlib from PyPI. The peers' own services must not
    # start (the bench runs its own, on 127.0.0.1 only): policy-rc.d says so
    # for the install, if the machine has none.
    missing=""
    command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
    [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
    [ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            if [ ! -e /usr/sbin/policy-rc.d ]; then
                printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
                chmod 755 /usr/sbin/policy-rc.d
                trap 'rm -f /usr/sbin/policy-rc.d' EXIT
            fi
            apt-get update -qq
            # shellcheck disable=SC2086  # a list of package names
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                $missing >/dev/null
        else
            echo "bootstrap: install$missing for the benchmark (those parts are skipped)" >&2
        fi
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
    exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
touch .venv/.stamp
