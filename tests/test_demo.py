"""The local demo (scripts/demo.py, `make demo`) ends what it started, also
when it is itself told to stop."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, child_env, free_port, stop_when

DEMO = ROOT / "scripts/demo.py"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["term", "hup", "int"])
def test_a_stopped_demo_leaves_no_process_and_no_listener(
        signum: signal.Signals, name: str, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "demo.out"
    # The sidecar v1 and the client under way (their pids): the stop often
    # comes as the client starts.
    code, alive = stop_when(
        [PY, str(DEMO), "--port", str(port), "--name", name, "--dwell", "60"], child_env(),
        out, signum, "busybox: calling", lambda started: len(started) >= 2,
        r"logs kept in (\S+)")
    assert code != 0, out.read_text()
    assert not alive, f"left running: {alive}\n{out.read_text()}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "logs kept in" in out.read_text()


def test_a_stop_while_a_process_is_started_is_acted_on_once_it_is_recorded() -> None:
    """The race behind a CI failure: a SIGHUP while the demo started its
    client came out of ``Popen`` after its fork, before the client was in the
    list ``stop_all()`` ends; the client ran on. The stop is held for that
    step, then acted on. (The test above meets the window only by chance.)"""
    probe = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
             "import demo\n"
             "signal.signal(signal.SIGHUP, demo.interrupted)\n"
             "with demo.held():\n"
             "    os.kill(os.getpid(), signal.SIGHUP)\n"
             "    print('recorded', flush=True)\n"
             "print('not reached')\n")
    run = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=30)
    assert run.stdout == "recorded\n", run.stdout + run.stderr
    assert run.returncode == 128 + signal.SIGHUP, run.stderr


@pytest.mark.parametrize("script", ["scripts/demo.py", "scripts/demo_docker.py",
                                    "bench/run.py"], ids=["demo", "demo-docker", "bench"])
def test_a_second_stop_does_not_cut_the_clean_up_short(script: str) -> None:
    """SIGTERM and SIGHUP sent together (systemd stopping a session does):
    the first came out of the demo's wait, and the second out of the
    clean-up's first line, before anything was ended: the sidecars and the
    client ran on (3 of 80 demos stopped so; the container demo and the
    bench have the same clean-up). Once one stop is under way, another is
    left to it. Both are delivered at once here (held, then let go); the
    clean-up's first steps are main()'s."""
    path = ROOT / script
    probe = (f"import os, signal, sys, time; sys.path.insert(0, {str(path.parent)!r})\n"
             f"import {path.stem} as demo\n"
             "both = {signal.SIGTERM, signal.SIGHUP}\n"
             "for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
             "    signal.signal(signum, demo.interrupted)\n"
             "signal.pthread_sigmask(signal.SIG_BLOCK, both)\n"
             "for signum in both:\n"
             "    os.kill(os.getpid(), signum)\n"
             "try:\n"
             "    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)\n"
             "    time.sleep(10)\n"
             "finally:\n"
             "    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
             "        signal.signal(signum, signal.SIG_IGN)\n"
             "    print('cleaned up', flush=True)\n")
    run = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=30)
    assert run.stdout == "cleaned up\n", run.stdout + run.stderr
    assert run.returncode in (128 + signal.SIGTERM, 128 + signal.SIGHUP), run.stderr


def test_a_sidecar_that_cannot_start_fails_the_demo_at_once_saying_why(
        name: str, tmp_path: Path) -> None:
    """The port is taken: v1 exits at once, and so must the demo (not after
    the hook's whole 30 s), showing the sidecar's own error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        result = subprocess.run([PY, str(DEMO), "--port", str(port), "--name", name],
                                env=child_env(), capture_output=True, text=True, timeout=90)
        took = time.monotonic() - began
    for kept in re.findall(r"logs kept in (\S+)", result.stdout):
        shutil.rmtree(kept, ignore_errors=True)
    assert result.returncode == 1, result.stdout
    assert "Address already in use" in result.stdout, result.stdout
    assert took < 15, result.stdout


def test_the_demo_passes(name: str) -> None:
    """`make demo`, the README's first command, end to end: v1 -> v2 -> v3
    under the busybox client, no request failed, and its one keep-alive
    connection handed from version to version."""
    demo = subprocess.Popen([PY, str(DEMO), "--port", str(free_port()), "--name", name],
                            env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = demo.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGTERM)  # it ends what it started
        out, _ = demo.communicate(timeout=60)
    for kept in re.findall(r"logs kept in (\S+)", out):
        shutil.rmtree(kept, ignore_errors=True)
    assert demo.returncode == 0, out[-4000:]
    assert re.search(r"RESULT: \d+ requests, 0 failed, versions in order: v1 -> v2 -> v3, "
                     r"1 connection\(s\) opened", out), out[-4000:]
    assert out.rstrip().endswith("PASS"), out[-4000:]
