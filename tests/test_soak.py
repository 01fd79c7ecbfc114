"""A short soak in make test (make soak runs the long one): consecutive
upgrades under load, 0 failed requests, a constant descriptor count."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import prctl
import psutil
from conftest import ROOT

MAX_SECONDS = 120  # soak.py's own time limit, every wait of it included
BACKSTOP = 150  # then it is told to stop (SIGTERM) ...
STOP_SECONDS = 10  # ... and its whole process group is SIGKILLed after this


def exited(pid: int, timeout: float) -> bool:
    """Has our child ``pid`` exited within ``timeout``? It is not reaped:
    until it is, its pid -- hence its process group id -- cannot be reused."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def sigterm_with_us() -> None:
    """preexec_fn: if this test process dies (even SIGKILLed), soak.py gets a
    SIGTERM and ends its children itself."""
    prctl.set_pdeathsig(signal.SIGTERM)


def test_short_soak(tmp_path: Path) -> None:
    """Invariants 1, 5, 7 over 15 consecutive upgrades under load."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as out_fh, open(err, "wb") as err_fh:
        # A session of its own: soak.py, its load generator and sidecars form
        # a process group whose id is soak.py's pid, which we can kill whole.
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench/soak.py"), "--upgrades", "15",
             "--out", str(tmp_path), "--max-seconds", str(MAX_SECONDS)],
            stdout=out_fh, stderr=err_fh, start_new_session=True,
            preexec_fn=sigterm_with_us)
    pgid = proc.pid
    stragglers: list[int] = []
    timed_out = False
    try:
        if not exited(proc.pid, BACKSTOP):
            timed_out = True
            proc.send_signal(signal.SIGTERM)  # soak.py ends its children and keeps its logs
            exited(proc.pid, STOP_SECONDS)
        else:
            stragglers = [pid for pid in group_members(pgid) if pid != proc.pid]
    finally:
        # The whole group, by its id, while soak.py is unreaped (so that id is
        # still ours): nothing it started outlives the test, whatever happened.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    output = out.read_text()[-3000:] + err.read_text()[-3000:]
    assert not timed_out, f"soak.py still running after {BACKSTOP}s, stopped:\n{output}"
    assert proc.returncode == 0, f"soak.py exited {proc.returncode}:\n{output}"
    assert not stragglers, f"soak.py left processes {stragglers} running:\n{output}"
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["upgrades"] == 15 and report["failed"] == 0, report
    assert report["fds"]["min"] == report["fds"]["max"], report["fds"]
    assert report["requests"] > 100
