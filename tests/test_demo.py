"""The local demo (scripts/demo.py, `make demo`) ends what it started, also
when it is itself told to stop."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import PY, ROOT, child_env, free_port

DEMO = ROOT / "scripts/demo.py"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["term", "hup", "int"])
def test_a_stopped_demo_leaves_no_process_and_no_listener(
        signum: signal.Signals, name: str, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "demo.out"
    with open(out, "wb") as fh:
        demo = subprocess.Popen([PY, str(DEMO), "--port", str(port), "--name", name,
                                 "--dwell", "60"],
                                env=child_env(), stdout=fh, stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while "busybox: calling" not in out.read_text():
            assert demo.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        # The sidecar v1 and the client under way (not a sleep: their pids).
        # Looked at often, so that the stop often comes as the client starts.
        while len(started := psutil.Process(demo.pid).children(recursive=True)) < 2:
            assert time.monotonic() < deadline, started
            time.sleep(0.001)
        demo.send_signal(signum)
        assert demo.wait(timeout=30) != 0
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, f"left running: {alive}"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "logs kept in" in out.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.wait(timeout=10)
        for proc in started:  # what a failing demo left behind: by its pid
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()  # psutil checks that the pid is still this process
        for kept in re.findall(r"logs kept in (\S+)", out.read_text()):
            shutil.rmtree(kept, ignore_errors=True)


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
