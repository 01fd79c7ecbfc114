#!/bin/sh
# Set up .venv from scratch: system packages python-prctl needs to build (gcc,
# libcap-dev, python3-dev) and, if venv creation fails, python3-venv; installed
# with apt-get when we are root and they are missing;
# then the project and its dev tools. Idempotent; used by the Makefile.
# `bootstrap.sh bench` adds what make bench needs (wrk, matplotlib).
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

apt_install() {  # apt_install REASON PACKAGE...: only as root with apt-get
    reason=$1
    shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing $* ($reason)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "bootstrap: install $* first ($reason)" >&2
        return 1
    fi
}

# python-prctl builds from source: a C compiler, libcap's and Python's headers.
need=""
command -v gcc >/dev/null 2>&1 || need="$need gcc"
[ -e /usr/include/sys/capability.h ] || need="$need libcap-dev"
py_inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -e "$py_inc/Python.h" ] || need="$need python3-dev"
if [ -n "$need" ]; then
    # shellcheck disable=SC2086  # a list of package names
    apt_install "python-prctl builds from source" $need || true
fi

# The tests read listen queues with ss (iproute2).
if ! command -v ss >/dev/null 2>&1; then
    apt_install "the tests read listen queues with ss" iproute2 || true
fi

# A test stalls the CLI inside a system call with strace (it skips without).
if ! command -v strace >/dev/null 2>&1; then
    apt_install "a test stalls the CLI in a system call with strace" strace || true
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
        if [ "$(id -u)" = 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        # shellcheck disable=SC2086  # a list of package names
        apt_install "the benchmark; without them those parts are skipped" \
            --no-install-recommends $missing || true
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
    exit 0
fi

# A venv whose creation broke halfway has a python but no pip: make it again.
# Debian's Python makes venvs with pip only with python3-venv installed.
if ! [ -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    rm -rf .venv
    if ! "$PYTHON" -m venv .venv; then
        rm -rf .venv
        apt_install "$PYTHON -m venv failed" python3-venv
        "$PYTHON" -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
touch .venv/.stamp
