"""Gentle start-up and step-aside: the successor loads at idle CPU priority,
the old process yields the CPU once it has drained (hotswap.startup,
hotswap.aiohttp.serve)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import Procs, serving, wait_for

import hotswap.startup
from hotswap.startup import idle_call, preload, should_idle

IDLE = 5  # SCHED_IDLE; os.SCHED_IDLE exists only on Linux


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    """A directory on sys.path for throw-away modules with unique names."""
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))


def _module(where: Path, body: str) -> str:
    name = f"hotswap_probe_{uuid.uuid4().hex[:10]}"
    (where / f"{name}.py").write_text(body)
    return name


# What the first import must not pull in: the heavy modules, and those that
# only cost a successor CPU at normal priority (enum + importlib: ~2.6 ms).
HEAVY = ("typing", "dataclasses", "asyncio", "psutil", "prctl", "logging",
         "hotswap.upgrader", "hotswap.protocol", "hotswap.kruise", "enum", "importlib")


def test_the_first_import_stays_light() -> None:
    """What a successor runs at normal priority before its preload lowers it:
    ``import hotswap.startup`` pulls in none of the heavy modules (the package
    loads its public names on first use)."""
    probe = ("import sys; before = set(sys.modules); import hotswap.startup; "
             "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    assert "hotswap.startup" in out
    assert not [m for m in out if m in HEAVY or m.split(".")[0] in HEAVY], out


def test_public_names_load_on_first_use() -> None:
    probe = ("import sys, hotswap; assert 'hotswap.upgrader' not in sys.modules; "
             "from hotswap import *; assert Upgrader.__module__ == 'hotswap.upgrader'; "
             "assert issubclass(HandoverTimeout, HotswapError); assert Role.TAKEOVER; "
             "assert sorted(dir(hotswap)) == sorted(hotswap.__all__)\n"
             "try:\n    hotswap.nothing\nexcept AttributeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "module 'hotswap' has no attribute 'nothing'"


def test_should_idle_follows_kruise_roles_and_the_override() -> None:
    assert should_idle({"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"})
    assert not should_idle({"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "0"})
    assert not should_idle({"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "2"})
    assert not should_idle({"SIDECARSET_VERSION": "0", "SIDECARSET_VERSION_ALT": "1"})
    assert not should_idle({})
    assert should_idle({"HOTSWAP_IDLE_START": "1"})
    assert not should_idle({"HOTSWAP_IDLE_START": "0", "SIDECARSET_VERSION": "2",
                            "SIDECARSET_VERSION_ALT": "1"})
    # A malformed version is not start-up's error to raise (the upgrader reports it).
    assert not should_idle({"SIDECARSET_VERSION": "two", "SIDECARSET_VERSION_ALT": "1"})
    # The override's other spellings: "off" on a takeover used to mean "unset".
    takeover = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}
    for no in ("false", "off", "No"):
        assert not should_idle({**takeover, "HOTSWAP_IDLE_START": no})
    assert should_idle({"HOTSWAP_IDLE_START": "yes"})
    with pytest.raises(ValueError, match="HOTSWAP_IDLE_START='later'"):
        should_idle({**takeover, "HOTSWAP_IDLE_START": "later"})


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 1e12, "60", None])
def test_a_timeout_that_is_no_deadline_is_refused_before_anything_starts(
        timeout: object) -> None:
    """inf or 1e12 raised OverflowError after the helper had started (the
    imports carried on in the background); nan a ValueError, just as late.
    A string (read from ``os.environ``, say) or None: a ValueError too, as
    the README says, not a TypeError about ``<=``."""
    before = threading.active_count()
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        hotswap.startup.idle_call(len, (), idle=True,
                                  timeout=timeout)  # type: ignore[arg-type]
    assert threading.active_count() == before


def test_imports_run_at_idle_priority_off_the_calling_thread(modules: Path) -> None:
    name = _module(modules, "import os, threading\n"
                            "POLICY = os.sched_getscheduler(0)\n"
                            "THREAD = threading.current_thread().name\n")
    before = os.sched_getscheduler(0)
    assert preload(name, idle=True) is True
    probe = sys.modules[name]
    assert probe.POLICY == IDLE, "the import ran at SCHED_IDLE"
    assert probe.THREAD == "hotswap-preload"
    assert os.sched_getscheduler(0) == before == os.SCHED_OTHER, \
        "the calling thread keeps its priority"
    assert not any(t.name == "hotswap-preload" for t in threading.enumerate())


def test_not_idle_imports_in_the_calling_thread(modules: Path) -> None:
    name = _module(modules, "import threading\nTHREAD = threading.current_thread().name\n")
    assert preload(name, idle=False) is False
    assert threading.current_thread().name == sys.modules[name].THREAD


def test_an_import_error_is_raised_in_the_caller(modules: Path) -> None:
    broken = _module(modules, "raise ValueError('broken at import')\n")
    with pytest.raises(ValueError, match="broken at import"):
        preload(broken, idle=True)
    with pytest.raises(ModuleNotFoundError):
        preload(f"hotswap_no_such_{uuid.uuid4().hex}", idle=True)


def test_imports_that_do_not_finish_in_time_raise(modules: Path) -> None:
    gate = _module(modules, "import threading\nOPEN = threading.Event()\n")
    slow = _module(modules, f"import {gate}\n{gate}.OPEN.wait(30)\n")
    opener = __import__(gate)
    try:
        with pytest.raises(TimeoutError, match=f"preloading {slow} at idle priority"):
            preload(slow, idle=True, timeout=0.2)
    finally:
        opener.OPEN.set()
    helper = next(t for t in threading.enumerate() if t.name == "hotswap-preload")
    assert helper.daemon, "a stuck helper must not keep the process alive"
    helper.join(10)
    assert not helper.is_alive()


def test_a_refused_sched_idle_falls_back_to_a_plain_import(
        modules: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Mocked: this machine (root, no seccomp filter) always allows SCHED_IDLE;
    # a container runtime's seccomp profile may refuse it with EPERM.
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("hotswap.startup.os.sched_setscheduler", refuse)
    name = _module(modules, "import threading\nTHREAD = threading.current_thread().name\n")
    assert preload(name, idle=True) is False
    assert threading.current_thread().name == sys.modules[name].THREAD


def _where() -> tuple[int, str]:
    return os.sched_getscheduler(0), threading.current_thread().name


def test_idle_call_returns_what_was_computed_at_idle_priority() -> None:
    assert idle_call(_where, idle=True) == (IDLE, "hotswap-preload")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the caller keeps its priority"
    assert idle_call(_where, idle=False) == (os.SCHED_OTHER, threading.current_thread().name)
    assert idle_call(divmod, 17, 5, idle=True) == (3, 2)


def test_idle_call_raises_what_the_call_raised_even_system_exit() -> None:
    # argparse exits with SystemExit from the helper thread on a bad flag: the
    # caller must exit with it, not lose it in the thread.
    def bad_flag() -> None:
        raise SystemExit(2)

    with pytest.raises(SystemExit) as exited:
        idle_call(bad_flag, idle=True)
    assert exited.value.code == 2
    with pytest.raises(ZeroDivisionError):
        idle_call(divmod, 1, 0, idle=True)


def _policy(pid: int) -> int:
    """The scheduling policy of a process's main thread (/proc stat field 41)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[38])


def _idle_cpu(cpu: float, within: float) -> bool:
    """Whether a thread at SCHED_IDLE in this process gets ``cpu`` seconds
    of CPU within ``within`` seconds (set up here with the OS call, not with
    the code under test). The thread stops either way."""
    stop, got = threading.Event(), threading.Event()

    def spin() -> None:
        os.sched_setscheduler(0, IDLE, os.sched_param(0))
        end = time.thread_time() + cpu
        while time.thread_time() < end:
            if stop.is_set():
                return
        got.set()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    got.wait(within)
    stop.set()
    thread.join(5)
    return got.is_set()


def test_successor_loads_gently_and_the_drained_old_one_yields_the_cpu(
        procs: Procs, name: str) -> None:
    """The Kruise way: v2 (VERSION 2, ALT 1) loads its modules at idle priority
    and then serves at normal priority; v1, drained and idle until Kruise
    resets its slot, runs at nice 19 while v2 keeps the nice value it was
    started with (this test's: 0 in CI, 10 under ``nice make test``)."""
    # SCHED_IDLE gets only the CPU nothing else in this scheduling group
    # wants: with this group's cores busy (a CPU hog in the same session),
    # v2's ~0.3 s of imports would take minutes. Say so rather than time out.
    if not _idle_cpu(0.3, within=10):
        pytest.skip("no idle CPU in this scheduling group: a SCHED_IDLE thread "
                    "got no 0.3 s of CPU in 10 s")
    started_at = psutil.Process().nice()  # what the sidecars inherit
    if started_at == 19:
        pytest.skip("this test runs at nice 19 already: v1's move to 19 would not show")
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    assert psutil.Process(v1.pid).nice() == started_at
    v2 = procs.sidecar(name, "v2", SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1",
                       HOTSWAP_IDLE_START="")  # the Kruise role decides
    wait_for(serving(name, "v2"), 30, "v2 serving, v1 drained")
    wait_for(lambda: "idle without sockets" in procs.logs(), 15, "v1 idle after its drain")
    wait_for(lambda: psutil.Process(v1.pid).nice() == 19, 5, "v1 at nice 19")
    assert v1.poll() is None, "v1 waits for its slot's reset"
    assert psutil.Process(v2.pid).nice() == started_at
    assert _policy(v2.pid) == os.SCHED_OTHER, "v2 serves at normal priority"
    logs = procs.logs()
    assert logs.count("start-up modules were loaded at idle CPU priority") == 1, logs
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_no_thread_allowed_falls_back_to_the_calling_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A successor whose uid may start no more threads (RLIMIT_NPROC, a
    cgroup's pids.max) computes at normal priority in the calling thread, as
    when SCHED_IDLE is refused: it used to exit with "can't start new
    thread" (found under RLIMIT_NPROC as uid 65534). Mocked: root ignores
    RLIMIT_NPROC, and this interpreter lives where another uid cannot run
    it."""
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert idle_call(_where, idle=True) == (os.SCHED_OTHER, threading.current_thread().name)


def test_exit_on_sigterm_dies_of_the_signal_and_leaves_other_actions_alone() -> None:
    """Outside PID 1 (test_signals.py has PID 1): the process dies of the
    SIGTERM as under the default action, saying so on stderr, and no time
    is spent importing enum for it. A SIGTERM already ignored (or handled)
    is left as it was."""
    probe = ("import os, signal as s0; import hotswap.startup\n"
             "ignored = s0.signal(s0.SIGTERM, s0.SIG_IGN)\n"
             "assert not hotswap.startup.exit_on_sigterm()\n"
             "assert s0.getsignal(s0.SIGTERM) == s0.SIG_IGN\n"
             "s0.signal(s0.SIGTERM, s0.SIG_DFL)\n"
             "assert hotswap.startup.exit_on_sigterm()\n"
             "os.kill(os.getpid(), s0.SIGTERM)\n"
             "print('still alive')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == -signal.SIGTERM, out
    assert out.stderr == "hotswap: SIGTERM outside serve(): exiting\n", out
    assert out.stdout == ""
    probe = ("import sys; import hotswap.startup; before = set(sys.modules); "
             "hotswap.startup.exit_on_sigterm(); "
             "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=30)
    assert not [m for m in out.stdout.split() if m in HEAVY], out.stdout


def test_exit_on_sigterm_while_the_helper_thread_holds_the_signal() -> None:
    """A SIGTERM the kernel hands the helper thread of idle_call() (one that
    was pending while the process was stopped, which whichever thread runs
    first takes; here sent to that thread, to be sure) ends the process
    while the helper is still busy: Python runs the handler in the main
    thread, which used to sleep in one join() for the whole of the work
    (found: 4.7 s of a sample sidecar's preload)."""
    probe = ("import os, signal, threading, time, hotswap.startup\n"
             "assert hotswap.startup.exit_on_sigterm()\n"
             "def busy() -> None:\n"
             "    os.write(1, threading.current_thread().name.encode())\n"
             "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
             "    time.sleep(600)\n"
             "hotswap.startup.idle_call(busy, idle=True, timeout=900)\n"
             "print('still alive')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout == "hotswap-preload", out
    assert out.returncode == -signal.SIGTERM, out
    assert out.stderr == "hotswap: SIGTERM outside serve(): exiting\n", out
