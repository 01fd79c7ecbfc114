"""Kruise role rules, the CLI and the PostStart hook (without a server, and
against a real one)."""

from __future__ import annotations

import contextlib
import decimal
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TypedDict

import psutil
import pytest
from conftest import (
    FAULTY,
    HOOK_DIR,
    PY,
    ROOT,
    SIDECAR,
    Procs,
    child_env,
    frozen,
    http_get,
    port_of,
    queued_connections,
    read_response,
    run_script,
    serving,
    status,
    unshare_refused,
    wait_for,
)

import hotswap.control
from hotswap.errors import HotswapError
from hotswap.kruise import Role, detect


@pytest.mark.parametrize(("version", "alt", "role"), [
    (None, None, Role.AUTO), ("0", "1", Role.EMPTY), ("1", None, Role.FRESH),
    ("1", "0", Role.FRESH), ("2", "1", Role.TAKEOVER), ("1", "2", Role.PASSIVE),
    ("2", "2", Role.PASSIVE),
    # Blank is unset (a manifest's empty value, quoted with a blank).
    (" ", None, Role.AUTO), ("2", " \t", Role.FRESH),
])
def test_roles(version: str | None, alt: str | None, role: Role) -> None:
    env = {}
    if version is not None:
        env["SIDECARSET_VERSION"] = version
    if alt is not None:
        env["SIDECARSET_VERSION_ALT"] = alt
    assert detect(env).role is role


def test_malformed_version_is_a_clear_error() -> None:
    with pytest.raises(HotswapError, match="SIDECARSET_VERSION='v2' is not an integer"):
        detect({"SIDECARSET_VERSION": "v2"})


class KruiseVersions(TypedDict):
    """Kruise's two version variables, as keyword arguments (``**``) to
    Procs.faulty and hook(): typed, so that they cannot be taken for
    ``port`` or ``args``."""
    SIDECARSET_VERSION: str
    SIDECARSET_VERSION_ALT: str


def cli(procs: Procs, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "hotswap", *args], capture_output=True, text=True,
                          timeout=60, env=procs.env(**env))


def hook(procs: Procs, **env: str) -> subprocess.CompletedProcess[str]:
    return run_script(["sh", str(ROOT / "scripts/migrate.sh")],
                      env=procs.env(**{"HOTSWAP_CLI": f"{PY} -m hotswap", **env}))


def probe_sh(procs: Procs, cli_command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_script(["sh", str(ROOT / "scripts/probe.sh")],
                      env=procs.env(HOTSWAP_CLI=cli_command, **env))


def test_a_script_that_times_out_leaves_no_process(tmp_path: Path) -> None:
    """The tests' runner of the hook and the probe (``run_script``) kills
    what the shell started too when it times out: ``subprocess.run`` killed
    the shell alone, and a hook's CLI polled on, orphaned, until its own
    timeout (seen once in a failing run)."""
    pid_file = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(["sh", "-c", f'sleep 60 & echo $! >{pid_file}; wait'],
                   env=dict(os.environ), timeout=3)  # time for sh to start, even loaded
    try:
        started = psutil.Process(int(pid_file.read_text()))
    except psutil.NoSuchProcess:
        return  # killed and reaped already (sleep 60 ends no other way by now)

    def gone() -> bool:
        try:
            return started.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        wait_for(gone, 10, "the shell's child killed with it")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            started.kill()  # by its pid (psutil checks it is still that process)


def test_hook_in_the_empty_image(procs: Procs) -> None:
    result = hook(procs, SIDECARSET_VERSION="0", SIDECARSET_VERSION_ALT="1")
    assert result.returncode == 0
    assert "empty image" in result.stdout


@pytest.mark.parametrize(("version", "alt", "says"), [
    # The shell's shortcuts, which must need no Python (the empty image has none):
    ("1", "2", "passive, nothing to migrate"),
    ("2", "2", "passive, nothing to migrate"),
    # Kruise's versions are resourceVersions: an old slot restarted
    # mid-upgrade, and the empty image.
    ("1097936677", "1098297016", "passive, nothing to migrate"),
    ("0", "1098297016", "this is the empty image"),
    # Other spellings: the CLI's rule (hotswap.kruise).
    (" 1", "02", "ready: passive slot (version 1, other slot 2"),
    ("00", "1", "ready: empty slot"),
    (" 0", "1", "ready: empty slot"),
])
def test_hook_and_probe_in_a_slot_that_never_serves(procs: Procs, name: str, version: str,
                                                    alt: str, says: str) -> None:
    """The empty image and an old slot restarted mid-upgrade never serve:
    their hook succeeds at once (a failed PostStart hook gets the container
    killed), and their probe says ready
    (the other slot's probe speaks for the pod), whatever the spelling of
    the versions, by the same rule as hotswap.kruise. Nobody serves here:
    nothing is waited for. Plain numbers are answered in the shell alone
    (the CLI given is one that fails)."""
    shell_alone = not says.startswith("ready:")
    cli_command = "false" if shell_alone else f"{PY} -m hotswap"
    started = time.monotonic()
    result = hook(procs, SIDECARSET_VERSION=version, SIDECARSET_VERSION_ALT=alt,
                  HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT="30", HOTSWAP_CLI=cli_command)
    assert result.returncode == 0, result
    assert says in result.stdout, result
    assert time.monotonic() - started < 15
    probe = probe_sh(procs, cli_command, SIDECARSET_VERSION=version,
                     SIDECARSET_VERSION_ALT=alt, HOTSWAP_NAME=name)
    assert probe.returncode == 0, probe


def test_kruise_sized_versions_take_the_shell_paths(procs: Procs, name: str) -> None:
    """Kruise's versions are resourceVersions (ten digits or so): the hook's
    and the probe's answers from the serving marker work with them, with no
    Python (the CLI given is one that fails)."""
    version = "1097936677"
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION=version, SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    result = hook(procs, SIDECARSET_VERSION=version, SIDECARSET_VERSION_ALT="0",
                  HOTSWAP_NAME=name, HOTSWAP_CLI="false")
    assert result.returncode == 0, result
    assert f"migration to version {version} done (version {version} serves)" in result.stdout
    assert probe_sh(procs, "false", SIDECARSET_VERSION=version,
                    HOTSWAP_NAME=name).returncode == 0
    # An older slot's probe: superseded by the one serving, ready as well.
    assert probe_sh(procs, "false", SIDECARSET_VERSION="1097936000",
                    SIDECARSET_VERSION_ALT="0", HOTSWAP_NAME=name).returncode == 0
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_cli_usage_errors_exit_2(procs: Procs, name: str) -> None:
    """A timeout that is no deadline or too long for a socket (1e10 was
    accepted, then an OverflowError's traceback, exit 1), a uid that is
    none, a missing or malformed version: exit 2 with the reason, never a
    wait with no end."""
    for command in ("wait-ready", "probe", "status"):
        for value in ("nan", "inf", "-1", "soon", "1e10"):
            result = cli(procs, command, "--name", name, "--timeout", value,
                         SIDECARSET_VERSION="2")
            assert result.returncode == 2 and "argument --timeout" in result.stderr \
                and "Traceback" not in result.stderr, (command, value, result)
    for value in ("-5", str(2**32), "root"):
        result = cli(procs, "status", "--name", name, "--allow-uid", value)
        assert result.returncode == 2 and "argument --allow-uid" in result.stderr, (value, result)
    result = cli(procs, "wait-ready", "--name", name)
    assert result.returncode == 2 and "set SIDECARSET_VERSION" in result.stderr, result
    # An address no Unix socket can have (it used to be polled for the whole
    # timeout, then "AF_UNIX path too long", exit 1).
    for where in (("--name", "x" * 100), ("--name", name, "--control-path", "/" + "x" * 108)):
        result = cli(procs, "wait-ready", *where, "--timeout", "60", SIDECARSET_VERSION="2")
        assert result.returncode == 2 and "too long for a Unix socket" in result.stderr, result
    result = cli(procs, "probe", "--name", name, SIDECARSET_VERSION="v2")
    assert result.returncode == 2 and "is not an integer" in result.stderr, result
    result = hook(procs, HOTSWAP_NAME=name)
    assert result.returncode == 2 and "SIDECARSET_VERSION is unset" in result.stdout, result
    result = hook(procs, SIDECARSET_VERSION="x1", SIDECARSET_VERSION_ALT="1",
                  HOTSWAP_NAME=name)
    assert result.returncode == 2 and "is not an integer" in result.stderr, result


def test_a_timeout_of_zero_for_one_answer_is_a_usage_error(procs: Procs, name: str) -> None:
    """`status` and `probe` ask once and wait up to --timeout for the
    answer: with none (0) they never heard one and said "no answer" (a
    probe: not ready) of a process that serves (exit 1). A usage error
    now (exit 2); `wait-ready --timeout 0` still looks once."""
    for command in ("status", "probe"):
        for value in ("0", "0.0", "-0"):
            result = cli(procs, command, "--name", name, "--timeout", value,
                         SIDECARSET_VERSION="2")
            assert result.returncode == 2 and "argument --timeout" in result.stderr \
                and "Traceback" not in result.stderr, (command, value, result)
    result = cli(procs, "wait-ready", "--name", name, "--timeout", "0",
                 SIDECARSET_VERSION="2")
    assert result.returncode == 1 and "timed out after 0s" in result.stderr, result

def test_cli_without_a_server(procs: Procs, name: str) -> None:
    result = cli(procs, "status", "--name", name)
    assert result.returncode == 1
    assert f"no answer from @hotswap/{name}" in result.stderr
    result = cli(procs, "wait-ready", "--name", name, "--timeout", "0.3",
                 SIDECARSET_VERSION="2")
    assert result.returncode == 1
    assert "sidecarset version 2 timed out after 0.3s" in result.stderr
    result = hook(procs, SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1",
                  HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT="0.3")
    assert result.returncode != 0
    assert "FAILED" in result.stdout
    result = cli(procs, "wait-ready", "--name", name)
    assert result.returncode != 0 and "SIDECARSET_VERSION" in result.stderr


def test_a_slot_still_starting_is_neither_ready_nor_done(procs: Procs, name: str) -> None:
    """A fresh slot answers on its control socket from its start, saying
    "starting" while the app's on_startup callbacks run (here: forever),
    before anything accepts: its probe says not ready and its wait-ready
    does not succeed (the probe said "ready: serving" for any state of its
    own version, and the pod went Ready while nothing accepted)."""
    v1 = procs.faulty(name, "v1", "app:on_startup:hang",
                      SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(lambda: "faulty: on_startup hangs" in procs.logs(), 15, "v1 in on_startup")
    st = status(name)
    assert st is not None and (st.pid, st.state) == (v1.pid, "starting"), st
    result = cli(procs, "probe", "--name", name, SIDECARSET_VERSION="1")
    assert result.returncode == 1 and "not ready" in result.stderr, result
    result = cli(procs, "wait-ready", "--name", name, "--timeout", "0.5",
                 SIDECARSET_VERSION="1")
    assert result.returncode == 1 and "ours but not yet done" in result.stderr, result
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_the_cli_as_pid_1_ends_on_sigterm(name: str) -> None:
    """Run as a container's command (PID 1, which gets only the signals it
    has a handler for; here, of a new PID namespace), ``hotswap wait-ready``
    took a SIGTERM for nothing and waited out its --timeout (60 s here; the
    kubelet would have sent its SIGKILL at the grace period's end). It ends
    at once now, exit status 143."""
    if (why := unshare_refused("-p", "PID namespace")) is not None:
        pytest.skip(why)
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(hotswap.control.sockaddr(hotswap.control.control_address(name)))
    squatter.listen(8)
    squatter.settimeout(30)
    proc = subprocess.Popen(
        ["unshare", "-p", "-f", "--kill-child", PY, "-m", "hotswap", "wait-ready", "--name",
         name, "--version", "v9", "--timeout", "60"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # It polls: its handler is in (installed before it does anything).
        conn, _ = squatter.accept()
        conn.close()
        child = wait_for(lambda: psutil.Process(proc.pid).children(), 10,
                         "unshare's child, the CLI")[0]
        child.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, (proc.returncode, err)
        assert "SIGTERM" in err and "timed out" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        squatter.close()


def test_wait_ready_polls_a_server_that_does_not_answer_only_within_its_timeout(
        procs: Procs, name: str) -> None:
    """A server whose event loop does not run (SIGSTOP: it accepts in the
    kernel, answers nothing) is polled within what is left of wait-ready's
    --timeout, not the 2 s a poll may take at most: each poll's own limit
    says so in the last error (a 0.3 s wait-ready waited 2 s, and a hook's
    CLI given its last second ran past the hook's deadline)."""
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    v1.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: frozen(v1.pid), 10, "v1 stopped")
        result = cli(procs, "wait-ready", "--name", name, "--timeout", "0.3",
                     SIDECARSET_VERSION="2")
    finally:
        v1.send_signal(signal.SIGCONT)
    assert result.returncode == 1 and "timed out after 0.3s" in result.stderr, result
    polled = re.findall(r"within (\d+\.\d)s", result.stderr)
    assert polled and all(float(limit) <= 0.3 for limit in polled), result
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_status_wait_ready_and_probe_against_real_sidecars(procs: Procs, name: str) -> None:
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    assert hook(procs, SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0",
                HOTSWAP_NAME=name).returncode == 0
    result = cli(procs, "status", "--name", name, "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert (data["pid"], data["version"], data["state"]) == (v1.pid, "v1", "serving")
    assert data["listeners"][0]["name"] == "http"
    # probe.sh answers "ready" from the kernel's list of abstract sockets
    # (no Python) when it can, and asks the CLI otherwise: a stand-in CLI
    # that only reports being run tells the two paths apart.
    no_cli = procs.tmp / "no-cli"
    no_cli.write_text('#!/bin/sh\necho "cli ran: $*"\nexit 7\n')
    no_cli.chmod(0o755)

    def fast_path(version: str, **env: str) -> bool:
        result = probe_sh(procs, str(no_cli), SIDECARSET_VERSION=version,
                          HOTSWAP_NAME=name, **env)
        if result.returncode == 7:
            assert f"cli ran: probe --name={name}" in result.stdout, result
            return False
        assert result.returncode == 0 and result.stdout == "", result
        return True

    def hook_fast(version: str, **env: str) -> tuple[bool, str]:
        """(answered without the CLI, the CLI's arguments otherwise)."""
        result = hook(procs, SIDECARSET_VERSION=version, SIDECARSET_VERSION_ALT="0",
                      HOTSWAP_NAME=name, HOTSWAP_CLI=str(no_cli), **env)
        if result.returncode == 7:
            return False, result.stdout.split("cli ran: ", 1)[1].splitlines()[0]
        assert result.returncode == 0, result
        assert f"migration to version {version} done (version {version} serves)" \
            in result.stdout, result
        return True, ""

    assert fast_path("1")
    assert not fast_path("2")
    assert not fast_path("1", HOTSWAP_CONTROL_PATH=str(procs.tmp / "control.sock"))
    # The PostStart hook too: the marker of its own version, or the CLI
    # after HOTSWAP_MIGRATE_FAST seconds with the rest of the timeout.
    assert hook_fast("1") == (True, "")
    fast, cli_args = hook_fast("2", HOTSWAP_MIGRATE_TIMEOUT="30", HOTSWAP_MIGRATE_FAST="1")
    given = re.fullmatch(rf"wait-ready --name={name} --timeout (\d+(?:\.\d)?)", cli_args)
    # The rest of the 30 s: about 29 (the fast path's second, in tenths),
    # less on a loaded machine, where that second overruns.
    assert not fast and given is not None and 25 <= float(given[1]) <= 30, cli_args
    assert hook_fast("1", HOTSWAP_CONTROL_PATH=str(procs.tmp / "control.sock"))[0] is False
    assert hook_fast("1", HOTSWAP_MIGRATE_FAST="0")[0] is False
    v2 = procs.sidecar(name, "v2", SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1")
    result = hook(procs, SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1",
                  HOTSWAP_NAME=name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "migration to version 2 done (version 2 serves)" in result.stdout
    st = status(name)
    assert st is not None and (st.pid, st.state) == (v2.pid, "serving")
    assert st.predecessor in ("draining", "gone")
    # A newer version serves: the hook of an older one hands over to the
    # CLI at once (which says why it will never be done), with the whole
    # timeout left.
    assert hook_fast("1", HOTSWAP_MIGRATE_TIMEOUT="30") == \
        (False, f"wait-ready --name={name} --timeout 30")
    # Readiness: the new slot serves; the old slot is superseded (ready, so
    # the pod stays Ready until Kruise resets it); the empty slot is ready; a
    # slot whose version has not taken over (v3 pending) is not.
    for version, code, why in (("2", 0, "ready: serving"),
                               ("1", 0, "ready: superseded by a newer version"),
                               ("0", 0, "ready: empty slot"),
                               ("3", 1, "not ready")):
        result = cli(procs, "probe", "--name", name, SIDECARSET_VERSION=version)
        assert result.returncode == code and why in result.stdout + result.stderr, result
        result = probe_sh(procs, f"{PY} -m hotswap", SIDECARSET_VERSION=version,
                          HOTSWAP_NAME=name)
        assert result.returncode == code, result
        assert fast_path(version) is (code == 0)
    # A serving process whose event loop stops (here: SIGSTOP) stops renewing
    # its marker: the probe then asks the control socket, which does not
    # answer in time: not ready, as before the fast path. Resumed: ready.
    v2.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not fast_path("2"), 10, "v2's marker to go stale")
        result = probe_sh(procs, f"{PY} -m hotswap", SIDECARSET_VERSION="2",
                          HOTSWAP_NAME=name)
        assert result.returncode == 1 and "not ready" in result.stderr, result
    finally:
        v2.send_signal(signal.SIGCONT)
    wait_for(lambda: fast_path("2"), 10, "v2's marker renewed")
    # The old slot idles after the drain (a Kruise container must not exit),
    # and ps tells the two apart by role and state (the process title).
    assert v1.poll() is None
    wait_for(lambda: f"hotswap[{name}] v1 stopped" in " ".join(
        psutil.Process(v1.pid).cmdline()), 10, "v1's title to say stopped")
    assert f"hotswap[{name}] v2 serving" in " ".join(psutil.Process(v2.pid).cmdline())
    # A hook for an older version gives up at once: a newer one serves.
    result = cli(procs, "wait-ready", "--name", name, "--timeout", "30",
                 SIDECARSET_VERSION="1")
    assert result.returncode == 1 and "a newer version serves" in result.stderr
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0
    # A serving process that dies takes its marker along (the kernel closes
    # it): the probe falls back to the control socket, which finds nobody.
    v2.kill()
    assert v2.wait(timeout=15) == -signal.SIGKILL
    assert not fast_path("2")
    assert probe_sh(procs, f"{PY} -m hotswap", SIDECARSET_VERSION="2",
                    HOTSWAP_NAME=name).returncode == 1


def stand_in_cli(procs: Procs) -> Path:
    """A stand-in for the hook's CLI: it reports its arguments, when it ran
    (/proc/uptime, the hook's own clock) and the deadline the hook left for
    the sidecar of version 2 (hundredths of a second since boot); exits 7."""
    no_cli = procs.tmp / "no-cli"
    no_cli.write_text('#!/bin/sh\necho "cli ran: $*"\n'
                      'echo "at: $(cut -d" " -f1 /proc/uptime)"\n'
                      'echo "deadline: $(cat "$HOTSWAP_HOOK_DIR/'
                      'hotswap-hook-$HOTSWAP_NAME-2@$(uname -n)")"\n'
                      'exit 7\n')
    no_cli.chmod(0o755)
    return no_cli


def what_the_cli_was_given(result: subprocess.CompletedProcess[str]
                           ) -> tuple[float, float, float]:
    """From a hook that ran :func:`stand_in_cli`: the timeout it gave the
    CLI, when the CLI ran and the deadline, in seconds since boot."""
    assert result.returncode == 7, result
    found = re.search(r"cli ran: wait-ready --name=\S+ --timeout ([\d.]+)\n"
                      r"at: ([\d.]+)\ndeadline: (\d+)\n", result.stdout)
    assert found is not None, result
    return float(found[1]), float(found[2]), int(found[3]) / 100


@pytest.mark.parametrize(("phase", "sleep"), [(0.05, "real"), (0.95, "real"),
                                              (0.5, "truncating")])
def test_the_hook_never_gives_up_before_its_timeout(procs: Procs, name: str,
                                                    phase: float, sleep: str) -> None:
    """The fast path reads the clock in whole seconds: begun just before a
    second ends, it must not count that second as spent (it gave the CLI a
    second too few, and the hook failed after 2.1 s of a 3 s timeout). Nor
    may it count polls whose sleep returned at once (a sleep that reads 0.1
    as 0). Nobody serves NAME; a stand-in CLI reports the timeout it was
    given, the time since boot when it ran (/proc/uptime, the hook's own
    clock) and the deadline the hook left for the sidecar (its start plus
    its timeout, in hundredths of a second since boot): that time plus the
    timeout given must reach the deadline, and not go past it by more than
    the rounding to tenths and the stand-in's own start (a second: the CLI
    always gets at least one)."""
    no_cli = stand_in_cli(procs)
    env = {}
    if sleep == "truncating":
        bin_dir = procs.tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "sleep").write_text('#!/bin/sh\nexec /bin/sleep "${1%%.*}"\n')
        (bin_dir / "sleep").chmod(0o755)
        env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    time.sleep((phase - time.time() % 1) % 1)  # begin at this phase of a second
    result = hook(procs, SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1",
                  HOTSWAP_NAME=name, HOTSWAP_CLI=str(no_cli),
                  HOTSWAP_MIGRATE_TIMEOUT="3", HOTSWAP_MIGRATE_FAST="2", **env)
    given, at, deadline = what_the_cli_was_given(result)
    assert deadline <= at + given <= max(deadline, at + 1.0) + 0.5, (given, at, deadline)


def test_a_fast_path_longer_than_the_timeout_leaves_the_cli_its_last_second(
        procs: Procs, name: str) -> None:
    """HOTSWAP_MIGRATE_FAST at or over HOTSWAP_MIGRATE_TIMEOUT (the default
    fast path, 10 s, with a 2 s timeout): the fast path watches for the
    marker for the timeout less a second, and the CLI runs before the
    hook's deadline with what is left. (Unclamped, the fast path watched
    its whole 5 s here, and the CLI ran past the deadline the hook left for
    the sidecar: a hook that waited longer than it said.) Nobody serves
    NAME; a stand-in CLI reports when it ran (/proc/uptime, the hook's own
    clock) and the deadline the hook left."""
    no_cli = stand_in_cli(procs)
    result = hook(procs, SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1",
                  HOTSWAP_NAME=name, HOTSWAP_CLI=str(no_cli),
                  HOTSWAP_MIGRATE_TIMEOUT="2", HOTSWAP_MIGRATE_FAST="5")
    given, at, deadline = what_the_cli_was_given(result)
    assert at < deadline <= at + given, (given, at, deadline)


def test_a_clock_step_does_not_shorten_the_hook(procs: Procs, name: str) -> None:
    """The wall clock may step forward while the hook waits (NTP, on a node
    that has just booted): that is no time spent. The fast path counted it,
    and with the clock 1,000 s ahead it left the CLI one second of a 60 s
    timeout (the hook gave up after 1.5 s). Nobody serves NAME; a stand-in
    CLI reports the timeout it was given."""
    no_cli = procs.tmp / "no-cli"
    no_cli.write_text('#!/bin/sh\necho "cli ran: $*"\nexit 7\n')
    no_cli.chmod(0o755)
    bin_dir = procs.tmp / "bin"
    bin_dir.mkdir()
    real_date = shutil.which("date")
    assert real_date is not None
    calls = procs.tmp / "date-calls"
    # date(1) whose clock steps 1,000 s forward from its third call on.
    (bin_dir / "date").write_text(
        f'#!/bin/sh\necho . >> {calls}\n'
        f'if [ "$1" = +%s ] && [ "$(wc -l < {calls})" -gt 2 ]; then\n'
        f'    echo $(($({real_date} +%s) + 1000))\nelse\n    exec {real_date} "$@"\nfi\n')
    (bin_dir / "date").chmod(0o755)
    started = time.monotonic()
    result = hook(procs, SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1",
                  HOTSWAP_NAME=name, HOTSWAP_CLI=str(no_cli), HOTSWAP_MIGRATE_TIMEOUT="5",
                  HOTSWAP_MIGRATE_FAST="2", PATH=f"{bin_dir}:{os.environ['PATH']}")
    elapsed = time.monotonic() - started
    assert result.returncode == 7, result
    assert len(calls.read_text().split()) > 2, "the clock never stepped"
    given = re.search(r"cli ran: wait-ready --name=\S+ --timeout ([\d.]+)", result.stdout)
    assert given is not None, result
    assert 5.0 <= elapsed + float(given[1]) < 6.5, (elapsed, given[1])


def test_failed_migration_makes_the_hook_fail(procs: Procs, name: str) -> None:
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    bad = procs.sidecar(name, "v2", args=("--fail-start", "kill"), SIDECARSET_VERSION="2",
                        SIDECARSET_VERSION_ALT="1")
    result = hook(procs, SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1",
                  HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT="3")
    assert bad.wait(timeout=15) == -signal.SIGKILL
    assert result.returncode != 0
    assert "FAILED" in result.stdout
    st = wait_for(serving(name, "v1"), 15, "v1 still serving")
    assert st.pid == v1.pid
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_the_hook_asks_again_when_the_server_gave_up_on_a_stalled_poll(
        procs: Procs, name: str) -> None:
    """A serving process that waits less than the CLI's 2 s poll for a
    request (``message_timeout`` 0.5 s here) refuses a poll whose process
    stalled between its connect and its request (``timeout``: nothing
    received). The hook runs ``nice -n 19`` on a node short of CPU: one
    stalled poll made ``wait-ready`` fail at once, its 30 s not spent, and
    the kubelet would stop the successor. Only a refusal of us (``forbidden``)
    is final; a poll the server gave up on is asked again. The stall is real:
    strace holds the first connect() 1.5 s before it returns."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace to stall the CLI after its connect")
    # The sample sidecar, its message_timeout set (it has no flag for it).
    v1 = procs.faulty(name, "v1", "none:none:none",
                      HOTSWAP_TEST_OPTIONS="message_timeout=0.5")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    result = subprocess.run(
        [strace, "-qq", "-f", "-o", "/dev/null", "-e", "trace=connect",
         "-e", "inject=connect:delay_exit=1500000:when=1",
         PY, "-m", "hotswap", "wait-ready", "--name", name, "--version", "v1",
         "--timeout", "30"], capture_output=True, text=True, timeout=60, env=procs.env())
    if "ptrace" in result.stderr and "Operation not permitted" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    # The server did give up on the stalled poll ...
    wait_for(lambda: "nothing received within 0.5s" in procs.logs(), 5,
             "the server giving up on the stalled poll")
    # ... and the hook asked again, and found its version serving.
    assert result.returncode == 0, result
    assert "ready:" in result.stdout, result
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_exports_are_locked() -> None:
    import hotswap
    assert sorted(hotswap.__all__) == sorted([
        "BrokenResourceError", "ClosedResourceError", "ExitReason", "HandoverFailed",
        "HandoverRefused", "HandoverTimeout", "HotswapError", "ListenerError",
        "LocalProtocolError", "Options", "ProtocolError", "RemoteProtocolError", "Role",
        "State", "Upgrader", "__version__", "close_server"])
    for symbol in hotswap.__all__:
        assert hasattr(hotswap, symbol)


def test_the_old_slot_stays_ready_while_it_hands_over(procs: Procs, name: str) -> None:
    """Until the successor confirms, the old version accepts every connection:
    its slot stays ready (else a successor that hangs before confirming could
    take the pod out of its Service for up to the handover timeout), and the
    new slot is not ready yet."""
    v1 = procs.sidecar(name, "v1", args=("--handover-timeout", "60"),
                       SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    hung = procs.sidecar(name, "v2", args=("--fail-start", "hang"), SIDECARSET_VERSION="2",
                         SIDECARSET_VERSION_ALT="1")
    wait_for(lambda: (st := status(name)) is not None and st.state == "handing-over", 15,
             "v1 handing over to the hung v2")
    for cli_command in (f"{PY} -m hotswap", "false"):  # the CLI; the marker alone
        result = probe_sh(procs, cli_command, SIDECARSET_VERSION="1", HOTSWAP_NAME=name)
        assert result.returncode == 0, result
    result = cli(procs, "probe", "--name", name, SIDECARSET_VERSION="1")
    assert result.returncode == 0 and "ready: serving" in result.stdout, result
    result = cli(procs, "probe", "--name", name, SIDECARSET_VERSION="2")
    assert result.returncode == 1 and "not ready" in result.stderr, result
    hung.send_signal(signal.SIGTERM)
    assert hung.wait(timeout=15) == 0
    wait_for(serving(name, "v1"), 15, "v1 serving again")
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_the_shell_paths_survive_odd_markers_and_an_integer_sleep(procs: Procs,
                                                                  name: str) -> None:
    """Any process of the pod can bind a marker-like name: one with a leading
    zero (octal, and fatal, to the shell's arithmetic) is skipped, and the
    probe and the hook ask the CLI as for no marker. A sleep(1) that takes
    no fractions (POSIX only asks for whole seconds) slows the hook's fast
    path down but does not break it."""
    no_cli = procs.tmp / "no-cli"
    no_cli.write_text('#!/bin/sh\necho "cli ran: $*"\nexit 7\n')
    no_cli.chmod(0o755)
    odd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    odd.bind(f"\0hotswap/{name}/serving/5/0{int(time.time())}")
    try:
        for script in ("probe.sh", "migrate.sh"):
            result = subprocess.run(
                ["sh", str(ROOT / "scripts" / script)], capture_output=True, text=True,
                timeout=60, env=procs.env(HOTSWAP_CLI=str(no_cli), HOTSWAP_NAME=name,
                                          SIDECARSET_VERSION="5", HOTSWAP_MIGRATE_FAST="1",
                                          HOTSWAP_MIGRATE_TIMEOUT="5"))
            assert result.returncode == 7 and "cli ran:" in result.stdout, (script, result)
    finally:
        odd.close()
    bin_dir = procs.tmp / "bin"
    bin_dir.mkdir()
    asked = procs.tmp / "sleeps"
    (bin_dir / "sleep").write_text(f'#!/bin/sh\necho "$1" >> {asked}\ncase $1 in *.*) echo '
                                   '"sleep: invalid time interval" >&2; exit 1 ;; esac\n'
                                   'exec /bin/sleep "$1"\n')
    (bin_dir / "sleep").chmod(0o755)
    procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    result = hook(procs, SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0", HOTSWAP_NAME=name,
                  HOTSWAP_CLI=str(no_cli), PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 0, result
    assert "migration to version 1 done (version 1 serves)" in result.stdout, result
    assert asked.read_text().split()[:2] == ["0.1", "1"]  # it did have to wait


@pytest.mark.parametrize("prefix", ["", "\u00e9"])
def test_the_hook_succeeds_once_the_successor_has_confirmed(procs: Procs, name: str,
                                                            prefix: str) -> None:
    """Once the successor has sent its confirmation, the handover is its own:
    the old version stops accepting as it reads it. Its release may then be
    slow (a predecessor starved of CPU; here SIGSTOPped just before it sends
    Released), and the hook must not time out meanwhile: it would fail, the
    kubelet would stop the one process about to accept, and connections
    would be refused. The successor binds its serving marker as it
    confirms; the hook's shell fast path and `hotswap wait-ready` both read
    it, whatever the NAME's bytes (`wait-ready` read /proc/net/unix as
    ASCII, and never found the marker of a NAME that is not)."""
    name = prefix + name
    v1 = procs.faulty(name, "v1", "send:released:stop-before",
                      SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    v2 = procs.sidecar(name, "v2", SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1")
    wait_for(lambda: frozen(v1.pid), 15, "v1 stopped before its release")
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    result = cli(procs, "wait-ready", "--name", name, "--timeout", "1", **kruise)
    assert result.returncode == 0 and "serving marker" in result.stdout, result
    result = hook(procs, HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT="2",
                  HOTSWAP_MIGRATE_FAST="1", HOTSWAP_CLI="false", **kruise)
    assert result.returncode == 0, result
    assert not Path(HOOK_DIR, f"hotswap-hook-{name}-2@{os.uname().nodename}").exists(), \
        "a done hook leaves no deadline"
    # Both while v2 still waited for the release (it serves on without one
    # after message_timeout, 5 s, and would then answer the CLI itself).
    assert "no release from the predecessor" not in procs.logs(), procs.logs()
    os.kill(v1.pid, signal.SIGCONT)
    st = wait_for(serving(name, "v2"), 15, "v2 serving, v1 released")
    with socket.create_connection(("127.0.0.1", port_of(st)), timeout=10) as sock:
        assert b"version(v2)" in http_get(sock)
    for proc in (v1, v2):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("shape", ["long", "blank"])
def test_the_hook_does_not_watch_for_a_marker_that_cannot_exist(procs: Procs, name: str,
                                                                shape: str) -> None:
    """A serving marker is an abstract Unix name of at most 108 bytes that
    /proc/net/unix shows as the last field of its line: with a NAME that
    leaves no room for it (70 bytes beside a Kruise-sized version; the
    control socket takes up to 99) or one with a blank, no marker can be
    bound or read (the sidecar logs it once). The hook used to watch for it
    for its whole fast path (10 s, every upgrade) before asking the CLI; it
    now asks the CLI at once, with the whole timeout."""
    version = "1097936677"
    sidecar = name + "n" * (70 - len(name)) if shape == "long" else f"{name} x"
    v1 = procs.sidecar(sidecar, "v1", SIDECARSET_VERSION=version, SIDECARSET_VERSION_ALT="0")
    wait_for(serving(sidecar, "v1"), 15, "v1 serving")
    traced = procs.tmp / "traced-cli"
    traced.write_text(f'#!/bin/sh\necho "cli ran: $*"\nexec {PY} -m hotswap "$@"\n')
    traced.chmod(0o755)
    result = hook(procs, SIDECARSET_VERSION=version, SIDECARSET_VERSION_ALT="0",
                  HOTSWAP_NAME=sidecar, HOTSWAP_MIGRATE_TIMEOUT="30", HOTSWAP_CLI=str(traced))
    assert result.returncode == 0, result
    assert f"cli ran: wait-ready --name={sidecar} --timeout 30\n" in result.stdout, result
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_a_name_too_long_in_bytes_skips_the_marker_in_any_shell(procs: Procs,
                                                                  shell: str) -> None:
    """The 108 a marker must fit in are bytes: a NAME of 35 two-byte
    characters (70 bytes) leaves no room for one beside a Kruise-sized
    version, and the hook asks the CLI at once. Where /bin/sh is bash (a
    RHEL-based image, say) in a UTF-8 locale (a Python image's), its
    ``${#...}`` counts characters, 35: the hook watched its whole fast path
    for the marker first (here 2 s of it; 10 s by default)."""
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"no {shell}")
    utf8 = {"LC_ALL": "C.UTF-8"}
    counted = subprocess.run([path, "-c", 'x="\u00e9"; echo ${#x}'], capture_output=True,
                             text=True, timeout=10, env=procs.env(**utf8))
    if shell == "bash" and counted.stdout.strip() != "1":
        pytest.skip("bash counts bytes here (no UTF-8 locale)")
    sidecar = "\u00e9" * 35
    assert len(sidecar.encode()) == 70
    traced = procs.tmp / "traced-cli"
    traced.write_text('#!/bin/sh\necho "cli ran: $*"\n')
    traced.chmod(0o755)
    result = subprocess.run(
        [path, str(ROOT / "scripts/migrate.sh")], capture_output=True, text=True,
        timeout=60, env=procs.env(
            **utf8, SIDECARSET_VERSION="1097936677", SIDECARSET_VERSION_ALT="0",
            HOTSWAP_NAME=sidecar, HOTSWAP_MIGRATE_TIMEOUT="30", HOTSWAP_MIGRATE_FAST="2",
            HOTSWAP_CLI=str(traced)))
    assert result.returncode == 0, result
    assert f"cli ran: wait-ready --name={sidecar} --timeout 30\n" in result.stdout, result


def test_marked_ranks_reads_the_markers_as_the_shell_does(name: str) -> None:
    """What `wait-ready` reads: fresh markers of this name only, decimal
    without a leading zero (as scripts/hotswap-marker.sh: the shell would
    take one for octal)."""
    now = int(time.time())
    names = [f"{name}/serving/7/{now}", f"{name}/serving/8/{now - 1}",
             f"{name}/serving/9/{now - 10}",  # stale
             f"{name}/serving/010/{now}", f"{name}/serving/11/0{now}",  # leading zeros
             f"{name}/serving/12/x", f"{name}/serving/13", f"{name}x/serving/14/{now}",
             f"{name}/serving/\u0661\u0665/{now}"]  # digits, but not ASCII ones
    socks = []
    try:
        for marker in names:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(f"\0hotswap/{marker}")
        assert hotswap.control.marked_ranks(name, now=now) == {7, 8}
        assert hotswap.control.marked_ranks(name, now=now + 2.5) == {7}
        # Exactly as old as fresh allows: fresh, as the shell's -le says.
        assert hotswap.control.marked_ranks(name, now=now + 3) == {7}
        assert hotswap.control.marked_ranks(name, now=now - 3) == {7, 8}
        assert hotswap.control.marked_ranks(name, fresh=20, now=now) == {7, 8, 9}
    finally:
        for sock in socks:
            sock.close()
    assert hotswap.control.marked_ranks(name) == frozenset()


@pytest.mark.parametrize("blank", ["\u00a0", "\u2028", "\u3000", "\x1c", "\r", "\x0b"])
def test_marked_ranks_splits_a_line_where_the_shell_does(name: str, blank: str) -> None:
    """A NAME with a character that Python calls whitespace and the shell
    does not split on (its IFS is space, tab and newline): the shell's
    look (scripts/hotswap-marker.sh) finds the marker, and so must
    ``wait-ready``'s, or the hook's last look at its deadline misses a
    successor that has begun confirming, its fast path having seen it."""
    sidecar = f"{name}{blank}x"
    marker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        marker.bind(f"\0hotswap/{sidecar}/serving/8/{int(time.time())}")
        shell = subprocess.run(
            ["sh", "-c", '. "$1"; hotswap_markers "$2" 8 3; echo "$marker_ours"', "sh",
             str(ROOT / "scripts/hotswap-marker.sh"), sidecar],
            capture_output=True, text=True, timeout=30)
        ranks = hotswap.control.marked_ranks(sidecar)
    finally:
        marker.close()
    assert shell.returncode == 0 and shell.stdout == "1\n", shell
    assert ranks == {8}


@pytest.mark.parametrize(("fresh", "age", "ready"), [
    ("30", 10, True),  # stale by the default 3 s: the variable was read
    ("", 0, True),  # empty is the default, as ${HOTSWAP_MARKER_FRESH:-3}
    ("1", 2, False),
    ("2.5", 0, False),  # the shell's test fails on it: no marker counts
    ("x", 0, False),
    (" 30 ", 10, True),  # the shell's test takes blanks around the digits,
    ("+30", 10, True),  # and a sign
    ("9223372036854775808", 10, False),  # past its 64 bits: no marker counts
])
def test_wait_ready_reads_the_markers_freshness_as_the_scripts_do(
        procs: Procs, name: str, fresh: str, age: int, ready: bool) -> None:
    """``hotswap wait-ready`` (what the hook runs after its own look) takes
    a serving marker as fresh for ``HOTSWAP_MARKER_FRESH`` seconds, as the
    scripts do: it read 3 s whatever the variable said. Nobody serves the
    control socket here: only the marker can make it ready."""
    marker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        marker.bind(f"\0hotswap/{name}/serving/8/{int(time.time()) - age}")
        result = cli(procs, "wait-ready", "--name", name, "--timeout", "0.3",
                     SIDECARSET_VERSION="8", SIDECARSET_VERSION_ALT="7",
                     HOTSWAP_MARKER_FRESH=fresh)
    finally:
        marker.close()
    if ready:
        assert result.returncode == 0 and "serving marker" in result.stdout, result
    else:
        assert result.returncode == 1 and "timed out" in result.stderr, result


@pytest.mark.parametrize("fresh", [
    "", "3", "03", " 3", "3 ", "\t3\n", "+3", "-3", "- 3", "+ 3", "++3", "3x", "2.5",
    "1", "x", " ", "\u0663", "\x1c3", "\u00a03", "9223372036854775807",
    "9223372036854775808", "99999999999999999999"])
def test_marker_fresh_is_read_as_the_scripts_shell_reads_it(name: str, fresh: str) -> None:
    """control.marker_fresh (what ``wait-ready`` counts a marker by) and the
    shell's own look (scripts/hotswap-marker.sh, given the variable as
    migrate.sh and probe.sh give it) agree on a marker 2 s old, for every
    spelling of ``HOTSWAP_MARKER_FRESH``: the hook's two looks must not
    disagree on whether the successor has begun confirming."""
    marker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        marker.bind(f"\0hotswap/{name}/serving/8/{int(time.time()) - 2}")
        shell = subprocess.run(
            ["sh", "-c", '. "$1"; hotswap_markers "$2" 8 "${HOTSWAP_MARKER_FRESH:-3}"; '
             'echo "$marker_ours"', "sh", str(ROOT / "scripts/hotswap-marker.sh"), name],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "HOTSWAP_MARKER_FRESH": fresh})
        seconds = hotswap.control.marker_fresh({"HOTSWAP_MARKER_FRESH": fresh})
        ours = seconds is not None and 8 in hotswap.control.marked_ranks(name, fresh=seconds)
    finally:
        marker.close()
    assert shell.returncode == 0 and shell.stdout in ("0\n", "1\n"), shell
    assert ours == (shell.stdout == "1\n"), (fresh, seconds, shell)


def test_marked_ranks_reads_the_clock_in_whole_seconds_as_the_shell_does(name: str) -> None:
    """The shell's look reads the clock in whole seconds (``date +%s``): a
    marker exactly ``fresh`` seconds old is fresh to it for all of that
    second. marked_ranks() read the clock to the microsecond, and found
    that marker stale for all of it but its first instant: the hook's two
    looks disagreed on a loop that had stopped renewing its marker. Both
    looks in one second (again if the second changed meanwhile: at most
    20 tries, each well under a second)."""
    for _ in range(20):
        second = int(time.time())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as marker:
            marker.bind(f"\0hotswap/{name}/serving/8/{second - 2}")
            shell = subprocess.run(
                ["sh", "-c", '. "$1"; hotswap_markers "$2" 8 2; echo "$marker_ours $marker_now"',
                 "sh", str(ROOT / "scripts/hotswap-marker.sh"), name],
                capture_output=True, text=True, timeout=30, check=True).stdout.split()
            ours = 8 in hotswap.control.marked_ranks(name, fresh=2)
        if shell[1] == str(second) == str(int(time.time())):
            break
    else:
        pytest.fail("no two looks in one second in 20 tries")
    assert shell[0] == "1"
    assert ours


@pytest.mark.parametrize("timeout", ["2", "2.0"])
def test_a_successor_whose_hook_gave_up_does_not_confirm(procs: Procs, name: str,
                                                         timeout: str) -> None:
    """A successor that becomes ready after its PostStart hook gave up (a
    starved start-up; here SIGSTOPped with the sockets, until the hook has
    failed) must not confirm: the kubelet stops its container once the hook
    has failed, and had it confirmed, nobody would accept. The hook leaves
    its deadline for it (kruise.hook_gave_up); it aborts, and the old
    version serves on. Also with a timeout that is not a whole number of
    seconds: the hook left no deadline then, and v2 confirmed."""
    v1 = procs.sidecar(name, "v1", args=("--handover-timeout", "60"),
                       SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    v2 = procs.faulty(name, "v2", "receive:sockets:stop-after", **kruise)
    result = hook(procs, HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT=timeout,
                  HOTSWAP_MIGRATE_FAST="1", **kruise)
    assert result.returncode == 1 and "FAILED" in result.stdout, result
    # Stopped (if not yet while the hook ran: a starved start-up), not its
    # line "faulty: SIGSTOP": written just before it stops itself, a SIGCONT
    # in between would be lost.
    wait_for(lambda: frozen(v2.pid), 15, "v2 stopped with the sockets")
    deadline = Path(HOOK_DIR, f"hotswap-hook-{name}-2@{os.uname().nodename}")
    assert int(deadline.read_text()) <= time.clock_gettime(time.CLOCK_BOOTTIME) * 100
    os.kill(v2.pid, signal.SIGCONT)
    wait_for(lambda: "PostStart hook's deadline" in procs.logs(), 15, "v2 aborting")
    assert v2.wait(timeout=15) is not None
    st = wait_for(serving(name, "v1"), 15, "v1 serving on")
    assert st.pid == v1.pid
    with socket.create_connection(("127.0.0.1", port_of(st)), timeout=10) as sock:
        assert b"version(v1)" in http_get(sock)
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_a_successor_whose_hook_gave_up_has_accepted_nothing(procs: Procs,
                                                             name: str) -> None:
    """As above, with connections waiting in the shared accept queue (v1
    frozen meanwhile) as v2 resumes, starts its servers and aborts: it
    accepted none of them (its servers accept only as it confirms), so
    v1, resumed, answers each one's request and keeps it open. Before,
    v2 answered them (without ``Connection: close``) and cut them all
    at its drain's deadline, idle ones included."""
    v1 = procs.sidecar(name, "v1", args=("--handover-timeout", "60"),
                       SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    v2 = procs.faulty(name, "v2", "receive:sockets:stop-after", args=("--drain-timeout", "1"),
                      **kruise)
    result = hook(procs, HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT="2",
                  HOTSWAP_MIGRATE_FAST="1", **kruise)
    assert result.returncode == 1 and "FAILED" in result.stdout, result
    # Stopped (if not yet while the hook ran: a starved start-up), not its
    # line "faulty: SIGSTOP": written just before it stops itself, a SIGCONT
    # in between would be lost.
    wait_for(lambda: frozen(v2.pid), 15, "v2 stopped with the sockets")
    v1.send_signal(signal.SIGSTOP)
    wait_for(lambda: frozen(v1.pid), 5, "v1 frozen")
    queued = queued_connections(port, requests=2, idle=2)
    os.kill(v2.pid, signal.SIGCONT)
    assert v2.wait(timeout=15) == 0  # a stop, its drain (1 s) included
    assert "PostStart hook's deadline" in procs.logs()
    v1.send_signal(signal.SIGCONT)
    for i, sock in enumerate(queued):
        with sock:
            reply = read_response(sock) if i < 2 else http_get(sock)
            assert b"version(v1)" in reply and b"Connection: close" not in reply, \
                (i, reply)
            assert b"version(v1)" in http_get(sock)
    st = wait_for(serving(name, "v1"), 15, "v1 serving on")
    assert st.pid == v1.pid
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_a_fifo_where_the_hooks_deadline_goes_does_not_hang_the_successor(
        procs: Procs, name: str) -> None:
    """What sits where the hook leaves its deadline is read without
    waiting: a FIFO there (any process sharing the hook directory can make
    one: /dev/shm, a node's with hostIPC) is no deadline, and the successor
    confirms and serves. (It opened the file blocking: ready() waited in
    open() for a writer that never came, deaf to SIGTERM, until SIGKILL,
    while its predecessor gave up on the handover.)"""
    v1 = procs.sidecar(name, "v1", args=("--handover-timeout", "60"),
                       SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    fifo = Path(HOOK_DIR, f"hotswap-hook-{name}-2@{os.uname().nodename}")
    os.mkfifo(fifo)
    try:
        v2 = procs.sidecar(name, "v2", SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1")
        st = wait_for(serving(name, "v2"), 15, "v2 serving")
        with socket.create_connection(("127.0.0.1", port_of(st)), timeout=10) as sock:
            assert b"version(v2)" in http_get(sock)
    finally:
        fifo.unlink()
    for proc in (v2, v1):  # v1 idles in its Kruise slot until SIGTERM
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_a_hooks_deadline_counts_only_from_this_run(tmp_path: Path) -> None:
    """What a successor reads before it confirms: this run's hook deadline
    (hundredths of a second since boot), past or within the margin; not a
    file older than the process (a previous run's), nor one it cannot
    parse, nor none at all."""
    from hotswap.kruise import hook_deadline_path, hook_gave_up
    env = {"HOTSWAP_HOOK_DIR": str(tmp_path)}
    named = hook_deadline_path(env, "sc", 2)
    assert named is not None
    path = Path(named)
    assert path.parent == tmp_path
    since = time.time() - 10
    now = int(time.clock_gettime(time.CLOCK_BOOTTIME) * 100)
    assert hook_gave_up(env, "sc", 2, since=since) is None  # no hook, no deadline
    for deadline, verdict in ((now + 1000, None), (now + 20, "gives up in"),
                              (now - 100, "past"), ("soon", None), ("", None)):
        path.write_text(f"{deadline}\n")
        why = hook_gave_up(env, "sc", 2, since=since)
        assert (why is None) if verdict is None else (why is not None and verdict in why), \
            (deadline, why)
    path.write_text(f"{now - 100}\n")
    assert hook_gave_up(env, "sc", 3, since=since) is None, "another version's hook"
    # Written a moment before the process's start time: this run's (the
    # hook starts with the container; the two clocks' readings differ).
    os.utime(path, (since - 0.5, since - 0.5))
    assert hook_gave_up(env, "sc", 2, since=since) is not None, "this run's, just before"
    os.utime(path, (since - 5, since - 5))
    assert hook_gave_up(env, "sc", 2, since=since) is None, "a previous run's"
    path.unlink()
    other = tmp_path / "hotswap-hook-sc-2@another-pod"
    other.write_text(f"{now - 100}\n")
    assert hook_gave_up(env, "sc", 2, since=since) is None, "another pod's hook"


@pytest.mark.parametrize("what", ["directory", "fifo", "device"])
def test_what_is_no_deadline_file_leaves_no_descriptor_behind(tmp_path: Path,
                                                               what: str) -> None:
    """Something else where the hook leaves its deadline (any process that
    shares the folder can put it there) is no deadline, and reading it
    leaves the descriptor count where it was. Once the file was opened with
    os.open() (O_NONBLOCK: a FIFO held ready() in open()), a directory
    there cost a descriptor a look: open() of the descriptor refused it
    (IsADirectoryError) without closing it."""
    from hotswap.kruise import hook_deadline_path, hook_gave_up
    env = {"HOTSWAP_HOOK_DIR": str(tmp_path)}
    named = hook_deadline_path(env, "sc", 2)
    assert named is not None
    if what == "directory":
        os.mkdir(named)
    elif what == "fifo":
        os.mkfifo(named)
    else:
        os.symlink("/dev/zero", named)
    # A FIFO holding what reads as a deadline long past: still none.
    holder = os.open(named, os.O_RDWR | os.O_NONBLOCK) if what == "fifo" else -1
    if holder >= 0:
        os.write(holder, b"1\n")
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            assert hook_gave_up(env, "sc", 2, since=time.time() - 10) is None
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        if holder >= 0:
            os.close(holder)


@pytest.mark.parametrize("host", ["", "a/b", "pod y", "p\u00f6d", "pod@x"])
def test_a_hostname_that_names_no_file_leaves_no_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """The hook's file is named for the pod's hostname; one that could not
    name a file, or would make the name ambiguous, names none (the hook
    writes none either: below), and no deadline is checked."""
    from hotswap.kruise import hook_deadline_path, hook_gave_up
    env = {"HOTSWAP_HOOK_DIR": str(tmp_path)}
    (tmp_path / "hotswap-hook-sc-2").write_text("0\n")  # no file of this pod's
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(
        ("Linux", host, "6.1", "#1", "x86_64")))
    assert hook_deadline_path(env, "sc", 2) is None
    assert hook_gave_up(env, "sc", 2, since=time.time() - 10) is None


def test_the_hook_leaves_no_deadline_for_a_hostname_that_names_no_file(
        procs: Procs, name: str, tmp_path: Path) -> None:
    """The hook's side of the above (the same characters: letters, digits,
    '.', '_', '-'): a failed hook leaves no deadline under such a hostname,
    and does under a plain one."""
    if (why := unshare_refused("-u", "UTS namespace")) is not None:
        pytest.skip(why)
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    for i, (host, left) in enumerate((("pod y", False), ("a/b", False), ("p\u00f6d", False),
                                      ("pod-x.y_1", True))):
        hook_dir = tmp_path / f"hooks-{i}"
        hook_dir.mkdir()
        result = run_script([*in_pod(host), "sh", str(ROOT / "scripts/migrate.sh")],
                            env=procs.env(HOTSWAP_NAME=name, HOTSWAP_MIGRATE_FAST="0",
                                          HOTSWAP_CLI="false", HOTSWAP_HOOK_DIR=str(hook_dir),
                                          **kruise))
        assert result.returncode == 1 and "FAILED" in result.stdout, result
        files = [p.name for p in hook_dir.iterdir()]
        assert files == ([f"hotswap-hook-{name}-2@{host}"] if left else []), (host, files)
        assert ("no deadline left for the sidecar" in result.stdout) is not left, result


def test_a_hooks_deadline_is_read_on_the_hooks_own_clock(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook writes its deadline in the time since boot that
    /proc/uptime shows, and the successor must read it on that clock: under
    LXCFS (common on Kruise clusters) /proc/uptime is the container's own
    uptime, far behind CLOCK_BOOTTIME, and a hook that had just started
    with 60 s to go read as hours past (every takeover aborted). Here a
    stand-in /proc/uptime says the container has been up for 120 s."""
    import hotswap.kruise
    from hotswap.kruise import hook_deadline_path, hook_gave_up
    uptime = tmp_path / "uptime"
    uptime.write_text("120.00 230.00\n")
    monkeypatch.setattr(hotswap.kruise, "_UPTIME", str(uptime), raising=False)
    env = {"HOTSWAP_HOOK_DIR": str(tmp_path)}
    named = hook_deadline_path(env, "sc", 2)
    assert named is not None
    path = Path(named)
    since = time.time() - 10
    path.write_text(f"{12000 + 6000}\n")  # the hook began just now, 60 s to go
    assert hook_gave_up(env, "sc", 2, since=since) is None
    path.write_text(f"{12000 - 100}\n")  # gave up a second ago
    why = hook_gave_up(env, "sc", 2, since=since)
    assert why is not None and "past" in why, why
    uptime.write_text("no uptime here\n")  # unreadable: no check, as with no file
    assert hook_gave_up(env, "sc", 2, since=since) is None


@pytest.mark.parametrize("prefix", ["", "."])
def test_a_hook_that_fails_early_leaves_a_deadline_already_past(procs: Procs, name: str,
                                                                 prefix: str) -> None:
    """A hook that fails before its deadline (the CLI failed at once: a
    newer version serves, a refused uid, a CLI that cannot start) gets its
    container stopped by the kubelet all the same: from then on a successor
    must not confirm, or it would be stopped as the one process accepting.
    The deadline it leaves is the moment it failed, not its timeout's end.
    Also for a NAME that begins with a dot (the sidecar takes it, and looks
    for its hook's deadline): the hook left none for it."""
    from hotswap.kruise import hook_gave_up
    name = prefix + name
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    result = hook(procs, HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT="60",
                  HOTSWAP_MIGRATE_FAST="0", HOTSWAP_CLI="false", **kruise)
    assert result.returncode == 1 and "FAILED" in result.stdout, result
    why = hook_gave_up({"HOTSWAP_HOOK_DIR": HOOK_DIR}, name, 2, since=time.time() - 60)
    assert why is not None, "a successor would still confirm for the next minute"


@pytest.mark.parametrize("timeout", ["1e2", "-60", "6 0", "abc", "1.2.3", "1000000", "."])
def test_a_timeout_the_hook_cannot_read_fails_it_at_once(procs: Procs, name: str,
                                                          timeout: str) -> None:
    """The hook's deadline for the sidecar is its timeout: one it cannot
    read as digits with a fraction (a spelling the CLI took, like 1e2, or
    one it did not) left no deadline at all, and a successor was free to
    confirm after the hook had failed. The hook now fails at once, saying
    why, with a deadline already past."""
    from hotswap.kruise import hook_gave_up
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    started = time.monotonic()
    result = hook(procs, HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT=timeout, **kruise)
    assert result.returncode == 2, result
    assert f"HOTSWAP_MIGRATE_TIMEOUT='{timeout}' is not a number of seconds" \
        in result.stdout, result
    assert time.monotonic() - started < 10
    why = hook_gave_up({"HOTSWAP_HOOK_DIR": HOOK_DIR}, name, 2, since=time.time() - 60)
    assert why is not None, "a successor would still confirm"


@pytest.mark.parametrize("timeout", ["60\n", " 60 ", "\t+60", "60.009", "060", "59.08"])
def test_a_timeout_spelled_with_blanks_leaves_its_deadline(procs: Procs, name: str,
                                                          timeout: str) -> None:
    """Blanks around HOTSWAP_MIGRATE_TIMEOUT, and a leading +, are dropped
    as the CLI drops them: a ConfigMap value made ``--from-file`` ends with
    a newline, and such a value failed every hook. The deadline left for the
    sidecar is the timeout's to the hundredth (the fraction's thousandths
    cut; 060 is 60 s, not octal 48; a fraction .08 no octal error), counted
    from when the hook started, and the CLI gets the plain number."""
    from hotswap.kruise import hook_deadline_path
    deadline_file = hook_deadline_path({"HOTSWAP_HOOK_DIR": HOOK_DIR}, name, 2)
    assert deadline_file is not None
    traced = procs.tmp / "traced-cli"
    traced.write_text('#!/bin/sh\necho "cli ran: $*"\necho "deadline: $(cat "$1")"\n'
                      'read -r up _ </proc/uptime\necho "uptime: $up"\n')
    traced.chmod(0o755)
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    before = uptime_cs()
    result = hook(procs, HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT=timeout,
                  HOTSWAP_MIGRATE_FAST="0", HOTSWAP_CLI=f"{traced} {deadline_file}", **kruise)
    assert result.returncode == 0, result
    plain = timeout.strip().lstrip("+")
    assert f"cli ran: {deadline_file} wait-ready --name={name} --timeout {plain}\n" \
        in result.stdout, result
    deadline = int(result.stdout.split("deadline: ", 1)[1].split()[0])
    uptime = round(float(result.stdout.split("uptime: ", 1)[1].split()[0]) * 100)
    hundredths = int(decimal.Decimal(plain) * 100)
    assert before + hundredths <= deadline <= uptime + hundredths, (before, result.stdout)


def uptime_cs() -> int:
    """/proc/uptime's first field in hundredths of a second, as migrate.sh
    reads it (no float rounding)."""
    with open("/proc/uptime", encoding="ascii") as f:
        whole, _, frac = f.read().split()[0].partition(".")
    return int(whole) * 100 + int(frac)


def in_pod(host: str) -> list[str]:
    """What runs a command (appended) as in a pod with hostname ``host``
    (any bytes the kernel takes): a UTS namespace of its own, as each pod
    has unless hostNetwork."""
    return ["unshare", "-u", PY, "-c", "import os, socket, sys; socket.sethostname(sys.argv[1]); "
            "os.execvp(sys.argv[2], sys.argv[2:])", host]


def test_a_hook_that_failed_in_another_pod_does_not_stop_this_ones_successor(
        procs: Procs, name: str) -> None:
    """The pods of a rollout get the same Kruise version (the SidecarSet's
    resourceVersion), and pods with hostIPC share the host's /dev/shm,
    where the hooks leave their deadlines: the deadline pod X's failed hook
    left replaced pod Y's, Y's successor aborted ("deadline ... past")
    and Y's hook failed too. The file is named for the pod's hostname,
    which its hook and its sidecar both read and another pod's do not.
    Here pod Y's successor is stopped (SIGSTOP) with the sockets while its
    hook waits and pod X's hook fails, both in one hook directory."""
    if (why := unshare_refused("-u", "UTS namespace")) is not None:
        pytest.skip(why)
    kruise: KruiseVersions = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    v1 = procs.spawn("v1", [*in_pod("pod-y"), PY, str(SIDECAR), "--name", name,
                            "--version", "v1", "--port", "0"],
                     procs.env(SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0"))
    wait_for(serving(name, "v1"), 15, "v1 serving")
    v2 = procs.spawn("v2", [*in_pod("pod-y"), PY, str(FAULTY), "--name", name,
                            "--version", "v2", "--port", "0"],
                     procs.env(HOTSWAP_TEST_FAULT="receive:sockets:stop-after", **kruise))
    wait_for(lambda: frozen(v2.pid), 15, "v2 stopped with the sockets, before confirming")
    migrate = ["sh", str(ROOT / "scripts/migrate.sh")]
    with open(procs.tmp / "hook-y.log", "w+") as log:
        hook_y = subprocess.Popen([*in_pod("pod-y"), *migrate], stdout=log,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=procs.env(HOTSWAP_NAME=name, HOTSWAP_MIGRATE_TIMEOUT="10",
                                                HOTSWAP_CLI=f"{PY} -m hotswap", **kruise))
        try:
            wait_for(lambda: list(Path(HOOK_DIR).glob(f"hotswap-hook-{name}-2*")), 10,
                     "pod Y's hook to leave its deadline")
            x = subprocess.run([*in_pod("pod-x"), *migrate], capture_output=True, text=True,
                               timeout=60,
                               env=procs.env(HOTSWAP_NAME=name, HOTSWAP_MIGRATE_FAST="0",
                                             HOTSWAP_CLI="false", **kruise))
            assert x.returncode == 1 and "FAILED" in x.stdout, x
            os.kill(v2.pid, signal.SIGCONT)
            assert hook_y.wait(timeout=30) == 0, log.seek(0) or log.read()
        finally:
            if hook_y.poll() is None:
                hook_y.kill()
                hook_y.wait()
    st = wait_for(serving(name, "v2"), 15, "v2 serving")
    assert "PostStart hook's deadline" not in procs.logs(), procs.logs()
    with socket.create_connection(("127.0.0.1", port_of(st)), timeout=10) as sock:
        assert b"version(v2)" in http_get(sock)
    for proc in (v1, v2):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_the_longest_control_addresses_are_the_ones_that_bind(tmp_path: Path) -> None:
    """control_address() accepts exactly the addresses a Unix socket can
    take: an abstract name of up to 108 bytes (its leading NUL included),
    a path of up to 107 (sun_path holds its terminating NUL too). A path of
    108 bytes passed and then failed to bind ("AF_UNIX path too long")."""
    from hotswap.control import control_address, sockaddr
    base = str(tmp_path / "c")
    name = f"{os.getpid()}-" + "n" * (98 - len(str(os.getpid())))
    assert len(sockaddr(control_address(name)).encode()) == 108
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(sockaddr(control_address(name)))
    with pytest.raises(ValueError, match="too long for a Unix socket"):
        control_address(name + "n")
    path = base + "x" * (107 - len(base.encode()))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(sockaddr(control_address("n", path)))
    with pytest.raises(ValueError, match="too long for a Unix socket"):
        control_address("n", path + "x")


def test_a_name_that_begins_with_a_dash_is_no_option_to_the_cli(procs: Procs,
                                                                 name: str) -> None:
    """A sidecar may be called ``-NAME`` (the library takes it): its hook
    and its probe must pass it to the CLI as the value of ``--name``. As
    ``--name -NAME`` argparse took it for an option ("expected one
    argument", exit 2): the hook failed a healthy upgrade and the probe
    said not ready, wherever the CLI has the word (here: a filesystem
    control socket, which has no serving marker)."""
    sidecar = f"-{name}"
    path = str(procs.tmp / "control.sock")
    v1 = procs.sidecar(name, "v1", args=(f"--name={sidecar}",), HOTSWAP_CONTROL_PATH=path,
                       SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")

    def serves() -> bool:
        try:
            return hotswap.control.status_blocking(path, timeout=2).state == "serving"
        except (OSError, HotswapError):
            return False

    wait_for(serves, 15, "v1 serving")
    kruise = KruiseVersions(SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    result = hook(procs, **kruise, HOTSWAP_NAME=sidecar, HOTSWAP_CONTROL_PATH=path,
                  HOTSWAP_MIGRATE_TIMEOUT="30")
    assert result.returncode == 0 and "migration to version 1 done" in result.stdout, result
    probe = probe_sh(procs, f"{PY} -m hotswap", **kruise, HOTSWAP_NAME=sidecar,
                     HOTSWAP_CONTROL_PATH=path)
    assert probe.returncode == 0 and "ready: serving" in probe.stdout, probe
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_the_answer_is_the_exit_status_whatever_became_of_stdout(procs: Procs,
                                                                 name: str) -> None:
    """The exit status is the CLI's answer; what it prints only explains
    it. With its stdout a pipe nobody reads any more (``| head``, a
    supervisor gone) or closed, a ready probe and a done wait-ready said
    exit 1 with a traceback (a BrokenPipeError, or an AttributeError on
    ``sys.stdout`` None, from the last flush)."""
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    for command in (["probe"], ["wait-ready", "--timeout", "30"]):
        argv = [PY, "-m", "hotswap", *command, f"--name={name}"]
        env = procs.env(SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
        read_end, write_end = os.pipe()
        os.close(read_end)  # nobody will read what it prints
        try:
            broken = subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE,
                                    text=True, timeout=60, env=env)
        finally:
            os.close(write_end)
        assert broken.returncode == 0 and "Traceback" not in broken.stderr, (command, broken)
        closed = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *argv],
                                stderr=subprocess.PIPE, text=True, timeout=60, env=env)
        assert closed.returncode == 0 and "Traceback" not in closed.stderr, (command, closed)
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0
