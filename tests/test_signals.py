"""Signals on real processes (issue 5): SIGTERM drains within the deadline,
a second SIGTERM forces the exit, SIGTERM during a handover loses nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Any

import psutil
import pytest
from conftest import (
    PY,
    SIDECAR,
    Procs,
    frozen,
    http_get,
    port_of,
    read_response,
    serving,
    unshare_refused,
    wait_for,
)


def keepalive_request(port: int) -> tuple[socket.socket, bytes]:
    """Open a connection, make one request, keep the connection (idle)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, http_get(sock)


def test_sigterm_drains_within_the_deadline(procs: Procs, name: str) -> None:
    """Invariant 5: an in-flight request finishes (told Connection: close),
    an idle keep-alive connection is cut only at the deadline and logged, and
    the process exits 0 in about the deadline."""
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "2", "--delay", "0.5"))
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    idle, _ = keepalive_request(port)
    busy, _ = keepalive_request(port)  # accepted: it has been answered once
    busy.sendall(b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n")  # 0.5 s in flight
    started = time.monotonic()
    v1.send_signal(signal.SIGTERM)
    reply = read_response(busy)
    assert b"200 OK" in reply and b"Connection: close" in reply
    assert v1.wait(timeout=10) == 0
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 5, elapsed  # held by the idle connection until ~2 s
    assert idle.recv(4096) == b""  # cut at the deadline
    assert "drain deadline: cutting idle connection" in procs.logs()
    idle.close()
    busy.close()


def test_idle_connections_cut_at_a_stop_are_one_line_not_one_each(
        procs: Procs, name: str) -> None:
    """A plain stop of a process whose clients keep pools of idle keep-alive
    connections: each is cut at the deadline, and that is said in one
    WARNING, with their count, not in one a connection (the alerting on
    WARNING saw thousands of lines at each pod's stop)."""
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "0.5"))
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    idle = [keepalive_request(port)[0] for _ in range(20)]
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=10) == 0
    for sock in idle:
        assert sock.recv(4096) == b""  # cut at the deadline
        sock.close()
    log = procs.procs[0][2].read_text(errors="replace")  # v1's, whole
    alarms = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(alarms) == 1, alarms
    assert "drain deadline: cutting idle connections from" in alarms[0], alarms
    assert "and 15 more (20 in all)" in alarms[0], alarms
    assert "drained, 20 connection(s) cut" in log, log


def test_sighup_is_ignored_and_the_sidecar_serves_on(procs: Procs, name: str) -> None:
    """SIGHUP's default action kills at once, with no drain: a terminal's
    hangup or a stray reload signal must not drop a keep-alive client."""
    v1 = procs.sidecar(name, "v1")
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    sock, first = keepalive_request(port)
    assert b"200 OK" in first
    v1.send_signal(signal.SIGHUP)
    # Named, as the sidecar's other lines are (two sidecars, one log).
    wait_for(lambda: f"{name}: SIGHUP ignored" in procs.logs(), 10, "v1 to log the SIGHUP")
    again = http_get(sock)  # the same connection, after the signal
    assert b"200 OK" in again and b"Connection: close" not in again
    assert v1.poll() is None
    sock.close()
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=10) == 0


def test_second_sigterm_forces_the_exit(procs: Procs, name: str) -> None:
    """Invariant 5's escalation: a drain waiting on an idle connection (30 s
    deadline) ends at once on the second SIGTERM."""
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "30",))
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    idle, _ = keepalive_request(port)
    v1.send_signal(signal.SIGTERM)
    wait_for(lambda: "stop-requested; draining" in procs.logs(), 10, "the drain to start")
    assert v1.poll() is None
    started = time.monotonic()
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=10) == 0
    assert time.monotonic() - started < 3
    assert "cutting the drain short" in procs.logs()
    idle.close()


def log_of(procs: Procs, proc: subprocess.Popen[bytes]) -> str:
    return next(log.read_text(errors="replace") for _, p, log in procs.procs if p is proc)


def sigterm_while_the_successor_holds_the_sockets(procs: Procs, name: str
                                                   ) -> tuple[subprocess.Popen[bytes],
                                                              subprocess.Popen[bytes], int]:
    """v1 serving; v2 has received every socket and is stopped (SIGSTOP)
    just before confirming; v1 has taken a SIGTERM meanwhile."""
    v1 = procs.sidecar(name, "v1")
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    v2 = procs.faulty(name, "v2", "send:accepting:stop-before")
    wait_for(lambda: psutil.Process(v2.pid).status() == psutil.STATUS_STOPPED, 15,
             "v2 to hold the sockets, stopped before confirming")
    v1.send_signal(signal.SIGTERM)
    wait_for(lambda: f"{name}: signal 15: stopping" in log_of(procs, v1), 10,
             "v1 to take the SIGTERM")
    # Not confirmed yet: v1 still accepts, stop or no stop.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert b"version(v1)" in http_get(sock)
    return v1, v2, port


def test_sigterm_during_a_handover_loses_nothing(procs: Procs, name: str, load: Any) -> None:
    """Invariants 1, 3: SIGTERM reaches the serving process while a successor
    holds the descriptors but has not confirmed yet; the stop waits for the
    outcome, the successor takes over, not one request fails."""
    v1, v2, port = sigterm_while_the_successor_holds_the_sockets(procs, name)
    traffic = load(port, keepalive=3, fresh=2)
    v2.send_signal(signal.SIGCONT)
    st = wait_for(serving(name, "v2"), 15, "v2 serving")
    assert st.pid == v2.pid and port_of(st) == port
    assert v1.wait(timeout=15) == 0
    log = log_of(procs, v1)
    assert log.index("signal 15: stopping") < log.index(f"pid {v2.pid} confirmed")
    result = traffic.finish()
    assert result["failed"] == 0, result
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_sigterm_during_a_failed_handover_is_kept(procs: Procs, name: str) -> None:
    """Invariant 1 and the stop: the successor dies before confirming, so the
    handover fails and v1 serves on, but the SIGTERM it took meanwhile still
    stops it: it drains and exits 0."""
    v1, v2, _ = sigterm_while_the_successor_holds_the_sockets(procs, name)
    v2.kill()
    assert v2.wait(timeout=15) == -signal.SIGKILL
    assert v1.wait(timeout=15) == 0
    log = log_of(procs, v1)
    assert log.index("signal 15: stopping") < log.index(
        f"handover to pid {v2.pid} failed, still serving")


def test_busy_at_the_deadline_gets_its_response(procs: Procs, name: str) -> None:
    """Issue 6 / invariant 5: a request still running at the drain deadline is
    not cut: its response says Connection: close and is sent within the
    runner's 1 s shutdown grace."""
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "1", "--delay", "1.6"))
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    busy, _ = keepalive_request(port)  # accepted: it has been answered once
    busy.sendall(b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n")  # 1.6 s in flight
    v1.send_signal(signal.SIGTERM)
    reply = read_response(busy)
    assert b"200 OK" in reply and b"Connection: close" in reply
    assert v1.wait(timeout=10) == 0
    assert "is busy; its response says Connection: close" in procs.logs()
    busy.close()


def test_a_clean_up_callback_that_ignores_cancellation_does_not_keep_the_process(
        procs: Procs, name: str) -> None:
    """The app's on_shutdown never returns and ignores its cancellation:
    serve() abandons it after cleanup_timeout (3 s) and returns 1, and the
    sample sidecar exits then, rather than in asyncio.Runner's close(),
    which waited for that task with no deadline."""
    v1 = procs.faulty(name, "v1", "app:on_shutdown:ignore-cancel",
                      args=("--drain-timeout", "0.5"))
    wait_for(serving(name, "v1"), 15, "v1 serving")
    started = time.monotonic()
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 1
    # drain 0.5 s + cleanup_timeout 3 s, and no more than a little slack.
    assert time.monotonic() - started < 6
    assert "on_shutdown cancelled, going on" in procs.logs()


def test_a_third_sigterm_exits_at_once(procs: Procs, name: str) -> None:
    """Invariant 5's last step: the app's on_shutdown never returns and
    ignores its cancellation (serve() would abandon it after
    cleanup_timeout, 3 s); a second SIGTERM only cuts the drain short, and
    a third ends the process at once, with 128 + SIGTERM (the escalation an
    operator relies on when a clean-up hangs; it only cut the drain again,
    and the process stayed until its clean-up's end)."""
    v1 = procs.faulty(name, "v1", "app:on_shutdown:ignore-cancel",
                      args=("--drain-timeout", "0.5"))
    wait_for(serving(name, "v1"), 15, "v1 serving")
    v1.send_signal(signal.SIGTERM)
    wait_for(lambda: "on_shutdown that ignores cancellation" in procs.logs(), 10,
             "v1's on_shutdown to hang")
    v1.send_signal(signal.SIGTERM)
    wait_for(lambda: "cutting the drain short" in procs.logs(), 10, "the second SIGTERM")
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 128 + signal.SIGTERM


def _caught(pid: int) -> set[int]:
    """The signals ``pid`` has a handler for (``SigCgt`` in its status)."""
    with open(f"/proc/{pid}/status") as fh:
        mask = int(next(line for line in fh if line.startswith("SigCgt:")).split()[1], 16)
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


def test_a_sigterm_while_pid_1_starts_up_ends_it(procs: Procs, name: str) -> None:
    """In its container the sample is PID 1, which gets only the signals it
    has a handler for: before serve() installed its handlers (the imports
    and the app's set-up, which a successor runs at idle CPU priority and
    which can take seconds on a busy node), a SIGTERM was dropped, and the
    kubelet waited out its grace period (30 s) before its SIGKILL. Nothing
    is taken or bound then: the SIGTERM must end the process.

    The sample runs as PID 1 of a new PID namespace. Each look stops it
    (SIGSTOP from this, the parent, namespace reaches a PID 1), waits until
    it is stopped and reads which signals it catches; the first time that
    includes SIGTERM, it gets one (while still stopped, so it cannot have
    gone on meanwhile), and resumes. Dropped, the process went on to serve
    and its first caught SIGTERM was serve()'s: a normal stop."""
    if (why := unshare_refused("-p", "PID namespace")) is not None:
        pytest.skip(why)
    unshare = procs.spawn("v1", ["unshare", "-p", "-f", "--kill-child", PY, str(SIDECAR),
                                 "--name", name, "--version", "v1", "--port", "0"])
    pid = wait_for(lambda: psutil.Process(unshare.pid).children(), 10,
                   "unshare's child, PID 1 of its namespace")[0].pid
    caught: set[int] = set()
    deadline = time.monotonic() + 30
    while signal.SIGTERM not in caught:
        assert unshare.poll() is None and time.monotonic() < deadline, \
            f"the sample never caught SIGTERM: {procs.logs()}"
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: frozen(pid), 5, "the sample stopped")
        if os.path.samefile(f"/proc/{pid}/exe", PY):  # past unshare's exec
            caught = _caught(pid)
        if signal.SIGTERM in caught:
            os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    rc = unshare.wait(timeout=15)
    logs = procs.logs()
    assert "signal 15: stopping" not in logs, "serve() got it: the earlier ones were dropped"
    assert rc in (128 + signal.SIGTERM, -signal.SIGTERM), logs
    assert "hotswap: SIGTERM outside serve(): exiting" in logs, logs
    assert "bound http" not in logs, "it went on to serve"
