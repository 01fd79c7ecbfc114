"""Idle keep-alive connections handed to the successor (issue 6): the client
keeps its TCP connection across upgrades and never notices them."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    FAULTY,
    PY,
    SIDECAR,
    TINY,
    Procs,
    frozen,
    http_get,
    port_of,
    read_response,
    send_apart,
    serving,
    status,
    wait_for,
)

from hotswap.protocol import MAX_FDS_PER_FRAME


def test_the_same_connection_is_answered_by_each_successor(procs: Procs, name: str) -> None:
    """A raw client keeps one connection: v1 answers, then after each upgrade
    the next request on the same connection (same local port, no reconnect)
    is answered by the new version, without Connection: close."""
    v1 = procs.sidecar(name, "v1")
    st = wait_for(serving(name, "v1"), 15, "v1 serving")
    port, baseline = port_of(st), st.num_fds
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    local = sock.getsockname()
    assert b"version(v1)" in http_get(sock)
    previous = v1
    for version in ("v2", "v3"):
        new = procs.sidecar(name, version)
        wait_for(serving(name, version), 15, f"{version} serving, predecessor drained")
        assert previous.wait(timeout=15) == 0
        reply = http_get(sock)
        assert f"version({version})".encode() in reply, reply
        assert b"Connection: close" not in reply
        assert sock.getsockname() == local
        previous = new
    assert procs.logs().count("handed 1 idle connection(s) to the successor") == 2
    sock.close()
    # The adopted connection's descriptor goes when the client closes it.
    wait_for(lambda: (s := status(name)) is not None and s.num_fds == baseline, 10,
             f"v3 back to {baseline} descriptors")
    previous.send_signal(signal.SIGTERM)
    assert previous.wait(timeout=15) == 0


def test_a_drain_with_no_time_still_hands_idle_connections_over(
        procs: Procs, name: str) -> None:
    """--drain-timeout 0 asks to step aside at once: idle keep-alive
    connections still get one handover (milliseconds) rather than a cut,
    which races whatever their clients send next."""
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "0"))
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    for sock in socks:
        assert b"version(v1)" in http_get(sock)
    procs.sidecar(name, "v2", args=("--drain-timeout", "0"))
    wait_for(serving(name, "v2"), 15, "v2 serving, v1 drained")
    assert v1.wait(timeout=15) == 0
    for sock in socks:
        reply = http_get(sock)
        assert b"version(v2)" in reply and b"Connection: close" not in reply, reply
        sock.close()
    assert "handed 3 idle connection(s) to the successor" in procs.logs()
    assert "cutting idle connection" not in procs.logs()


@pytest.mark.parametrize("migrate", [True, False], ids=["migration-on", "migration-off"])
def test_idle_keepalive_clients_across_upgrades(procs: Procs, name: str, load: Any,
                                                migrate: bool) -> None:
    """Keep-alive clients that idle longer than the drain deadline (0.5 s)
    between requests, never reconnect unless told, never retry. With
    migration: 0 failed, not one new connection, across 3 upgrades. Without
    (the safe-close fallback): the connections still idle at the deadline are
    cut, and the next request on each fails: the failures migration prevents."""
    args = ("--drain-timeout", "0.5", *(() if migrate else ("--no-migrate",)))
    current = procs.sidecar(name, "v1", args=args)
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    clients = 8
    traffic = load(port, keepalive=clients, fresh=0, busybox=0, interval=1.0)
    for n in (2, 3, 4):
        new = procs.sidecar(name, f"v{n}", args=args)
        wait_for(serving(name, f"v{n}"), 20, f"v{n} serving, predecessor drained")
        assert current.wait(timeout=15) == 0
        current = new
    # Each client's last request starts after v3 is gone.
    result = traffic.last_round()
    current.send_signal(signal.SIGTERM)
    assert current.wait(timeout=15) == 0
    if migrate:
        assert result["failed"] == 0, result
        assert sum(result["connections"].values()) == clients, result["connections"]
        assert all(order[-1] == "v4" for order in result["orders"].values()), result
    else:
        assert result["failed"] > 0, result
        assert set(result["failures"]) <= {"eof-reused", "reset-reused", "reset"}, result
    print(f"migration {'on' if migrate else 'off'}: {result['requests']} requests, "
          f"{result['failed']} failed, {sum(result['connections'].values())} connections")


def test_a_body_still_arriving_is_never_paused(procs: Procs, name: str) -> None:
    """A connection whose request body is still on its way while the old
    side migrates is watched closely but not paused: aiohttp must go on
    reading that body (here: discarding it after a 405), so the next request
    on the connection is answered at once, not at the drain deadline (60 s
    here; the socket gives up after 10). Once that request is answered the
    connection moves: the one after is answered by v2."""
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "60"))
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /serve HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
    assert b" 405 " in read_response(sock).split(b"\r\n", 1)[0]
    # v1 now waits for the body it has to discard; meanwhile v2 takes over.
    v2 = procs.sidecar(name, "v2")
    wait_for(serving(name, "v2", settled=False), 15, "v2 serving, v1 draining")
    wait_for(lambda: "taken-over; draining" in procs.logs(), 10, "v1 draining")
    sock.sendall(b"hello" + b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = read_response(sock)
    assert b" 200 " in reply.split(b"\r\n", 1)[0] and b"version(v1)" in reply, reply
    assert b"Connection: close" not in reply, reply
    assert v1.wait(timeout=15) == 0, "v1 drained: the connection moved"
    assert b"version(v2)" in http_get(sock)
    assert "drain deadline" not in procs.logs()
    sock.close()
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_a_client_that_sent_bodies_keeps_its_connection_across_upgrades(
        procs: Procs, name: str) -> None:
    """A raw keep-alive client (it never reconnects) sends requests with
    Content-Length bodies to the sample sidecar, which answers 405 and
    reads each body to discard it: one in a single write, one split
    across writes, then idles across two upgrades. Its connection moves
    each time, v1's and v2's drains end at once (their deadline is 20 s),
    and the next request on it, from the same local port, is answered by
    the new version without Connection: close. (What the old side read
    last was a body: the connection stayed, was told to close, idled, and
    was cut at the deadline; the next request on it failed.)"""
    args = ("--drain-timeout", "20")
    v1 = procs.sidecar(name, "v1", args=args)
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    local = sock.getsockname()
    previous = v1
    for version, writes in (
            ("v2", [b"POST /serve HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"]),
            ("v3", [b"PUT /serve HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhel",
                    b"lo \r\n\r\n", b"d"])):
        send_apart(sock, writes)  # the scenario: the server reads each piece on its own
        answer = read_response(sock)
        assert b" 405 " in answer.split(b"\r\n", 1)[0], answer
        assert b"Connection: close" not in answer, answer
        new = procs.sidecar(name, version, args=args)
        wait_for(serving(name, version), 15, f"{version} serving, its predecessor drained")
        assert previous.wait(timeout=5) == 0
        reply = http_get(sock)
        assert f"version({version})".encode() in reply, reply
        assert b"Connection: close" not in reply, reply
        assert sock.getsockname() == local
        previous = new
    assert procs.logs().count("handed 1 idle connection(s) to the successor") == 2
    sock.close()
    previous.send_signal(signal.SIGTERM)
    assert previous.wait(timeout=15) == 0


def fresh_start_fds(procs: Procs, name: str) -> int:
    """Descriptors of a sample sidecar serving alone (its status says)."""
    probe = procs.sidecar(name, "v0")
    base: int = wait_for(serving(name, "v0"), 15, "v0 serving").num_fds
    probe.send_signal(signal.SIGTERM)
    assert probe.wait(timeout=15) == 0
    return base


def sidecar_with_fd_limit(procs: Procs, name: str, version: str, limit: int,
                          *args: str) -> subprocess.Popen[bytes]:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return procs.spawn(version, [PY, str(SIDECAR), "--name", name, "--version", version,
                                 "--port", "0", *args], preexec_fn=low_limit)


IdleClients = Callable[[int, int], list[socket.socket]]


@pytest.fixture
def idle_clients() -> Iterator[IdleClients]:
    """``idle_clients(port, count)``: ``count`` keep-alive connections, each
    answered once by v1, now idle. Each is closed at teardown whatever the
    test's outcome: left to a failed test's traceback, they would be
    collected (ResourceWarning) in a later test."""
    made: list[socket.socket] = []

    def connect(port: int, count: int) -> list[socket.socket]:
        socks = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            made.append(sock)
            assert b"version(v1)" in http_get(sock)
            socks.append(sock)
        return socks

    yield connect
    for sock in made:
        sock.close()


def next_requests_answered_by_v1(socks: list[socket.socket]) -> None:
    for sock in socks:
        reply = http_get(sock)
        assert b"version(v1)" in reply and b"Connection: close" in reply, reply
        sock.close()


def test_few_descriptors_left_for_the_copies(procs: Procs, name: str,
        idle_clients: IdleClients) -> None:
    """Handing a connection over needs a copy of its descriptor for a moment;
    v1 near its descriptor limit (EMFILE) can copy only a few at a time.
    It hands over those, which frees theirs, and the rest in the next rounds:
    every connection moves, and each next request is answered by v2 without
    Connection: close. (A failed copy used to stop the handover for every
    connection: those still idle at the deadline were cut, and clients
    failed.)"""
    clients = 60
    # Room for the clients and a few more, not for a copy of each.
    limit = fresh_start_fds(procs, name) + clients + 10
    v1 = sidecar_with_fd_limit(procs, name, "v1", limit, "--drain-timeout", "20")
    socks = idle_clients(port_of(wait_for(serving(name, "v1"), 15, "v1 serving")), clients)
    v2 = procs.sidecar(name, "v2")
    assert v1.wait(timeout=15) == 0  # its drain ended: nothing left with it
    logs = procs.logs()
    assert "no descriptor left to copy connections for the handover" in logs, logs
    rounds = [int(n) for n in re.findall(r"handed (\d+) idle connection\(s\) to the", logs)]
    assert sum(rounds) == clients and len(rounds) > 1, rounds
    for sock in socks:
        reply = http_get(sock)
        assert b"version(v2)" in reply and b"Connection: close" not in reply, reply
        sock.close()
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_a_successor_with_no_descriptor_left_loses_nothing(procs: Procs, name: str,
        idle_clients: IdleClients) -> None:
    """The successor at its descriptor limit when the connections come: the
    kernel drops the descriptors that do not fit (MSG_CTRUNC), so it never
    acknowledges that frame, and v1, which kept its copies until then, serves
    those connections on: each client's next request is answered by v1 with
    Connection: close, none fails."""
    # Room for the handover itself, not for 40 connections.
    limit = fresh_start_fds(procs, name) + 10
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "20"))
    socks = idle_clients(port_of(wait_for(serving(name, "v1"), 15, "v1 serving")), 40)
    v2 = sidecar_with_fd_limit(procs, name, "v2", limit)
    wait_for(serving(name, "v2", settled=False), 15, "v2 serving")
    # Adopting, v2 tells v1 why; still confirming, it can only end the channel.
    wait_for(lambda: re.search(r"handing connections over failed after 0|the successor "
                               r"refused 40 connection\(s\): no room for them: .*MSG_CTRUNC",
                               procs.logs()), 10,
             "v1 to keep the connections v2 could not take")
    next_requests_answered_by_v1(socks)
    assert v1.wait(timeout=15) == 0
    # Where v2 sees the truncation (adopting, or still confirming: then its
    # "no release" warning) depends on timing; either says why.
    wait_for(lambda: "MSG_CTRUNC" in (logs := procs.logs()) and "RLIMIT_NOFILE" in logs,
             10, "v2 to say it had no room")
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_a_successor_that_runs_out_of_descriptors_part_way_loses_nothing(
        procs: Procs, name: str, idle_clients: IdleClients) -> None:
    """Two frames of connections; the successor has room for the first
    (acknowledged: its connections are v2's), not the second (MSG_CTRUNC:
    v1 keeps those and serves them on). Each client's next request is
    answered, by v2 for the first frame's and by v1 with Connection: close
    for the rest: none lost, none answered twice."""
    clients = MAX_FDS_PER_FRAME + 47
    limit = fresh_start_fds(procs, name) + MAX_FDS_PER_FRAME + 20
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "20"))
    socks = idle_clients(port_of(wait_for(serving(name, "v1"), 15, "v1 serving")), clients)
    v2 = sidecar_with_fd_limit(procs, name, "v2", limit)
    # v1's log says why (v2 tells it: "connections-refusal").
    wait_for(lambda: re.search(r"the successor refused 47 connection\(s\): no room for "
                               r"them: .*MSG_CTRUNC.*RLIMIT_NOFILE", procs.logs()), 15,
             "v1 to keep the frame v2 could not take")
    answered = {"v2": 0, "v1": 0}
    for sock in socks:
        reply = http_get(sock)
        version = "v2" if b"version(v2)" in reply else "v1"
        assert (b"Connection: close" in reply) == (version == "v1"), reply
        answered[version] += 1
        sock.close()
    assert answered == {"v2": MAX_FDS_PER_FRAME, "v1": 47}, answered
    assert v1.wait(timeout=25) == 0
    logs = procs.logs()
    assert "handed 253 idle connection(s) to the successor" in logs, logs
    assert "no room for the predecessor's connections" in logs and "MSG_CTRUNC" in logs, logs
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_a_successor_with_no_room_for_the_sockets_fails_at_once(procs: Procs,
                                                                name: str) -> None:
    """The successor cannot even receive the listeners (MSG_CTRUNC on the
    sockets frame): its own limit, which a retry cannot cure. It fails at
    once, saying so, and v1 serves on. It used to take this for a
    predecessor gone, retried for connect_timeout (30 s; v1 went through
    34 handovers) and ended with a BrokenResourceError."""
    v1 = procs.sidecar(name, "v1")
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    # One descriptor left when it says hello: no room for the two sent.
    v2 = procs.faulty(name, "v2", "send:hello:fill-fds")
    assert v2.wait(timeout=15) != 0
    logs = procs.logs()
    assert "no room for the predecessor's sockets" in logs and "RLIMIT_NOFILE" in logs, logs
    assert "retrying" not in logs and "Traceback" not in logs, logs
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert b"version(v1)" in http_get(sock)
    sock.close()
    assert wait_for(serving(name, "v1"), 15, "v1 serving on").pid == v1.pid
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def v1_serves_on(name: str, v1: subprocess.Popen[bytes], baseline: int,
                 listeners: int = 1) -> None:
    """After a handover that failed: v1 still serves ``name`` with its
    ``listeners``, answers on the first and the last, is back to
    ``baseline`` descriptors (nothing of the handover left; a status counts
    its own query), and drains and exits 0 on SIGTERM."""
    st = wait_for(serving(name, "v1"), 15, "v1 serving on")
    assert st.pid == v1.pid and st.listener_count == listeners
    for listener in (st.listeners[0], st.listeners[-1]):
        port = int(listener.address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert b"version(v1)" in http_get(sock)
    wait_for(lambda: (s := status(name)) is not None and s.num_fds == baseline, 10,
             f"v1 back to {baseline} descriptors")
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_a_successor_with_no_room_even_for_the_welcome_tells_why(procs: Procs,
                                                                  name: str) -> None:
    """The Welcome and the sockets are both waiting when the successor, at
    its descriptor limit, reads them: one read takes the two frames, and
    MSG_CTRUNC loses both. It still says why (an Abort, with the reason),
    so that v1's log states the cause; v1 serves on with every descriptor
    it had. It used to close without a word: v1 logged only "peer closed
    the control connection" (or a reset)."""
    v1 = procs.sidecar(name, "v1")
    st = wait_for(serving(name, "v1"), 15, "v1 serving")
    baseline = st.num_fds
    v2 = procs.faulty(name, "v2", "send:hello:stop-after")
    wait_for(lambda: frozen(v2.pid), 15, "v2 stopped after its hello")
    # Every frame is in v2's socket once v1 says the sockets went.
    wait_for(lambda: "socket(s) sent" in procs.logs(), 15, "v1 to send the sockets")
    # Its limit lowered to what it holds now: not one more descriptor.
    in_use = len(os.listdir(f"/proc/{v2.pid}/fd"))
    resource.prlimit(v2.pid, resource.RLIMIT_NOFILE,
                     (in_use, resource.prlimit(v2.pid, resource.RLIMIT_NOFILE)[1]))
    v2.send_signal(signal.SIGCONT)
    assert v2.wait(timeout=15) != 0
    logs = procs.logs()
    assert "no room for the predecessor's sockets" in logs and "RLIMIT_NOFILE" in logs, logs
    wait_for(lambda: "successor aborted: control message truncated (MSG_CTRUNC)"
             in procs.logs(), 10, "v1 to log v2's reason")
    assert "Traceback" not in procs.logs(), procs.logs()
    v1_serves_on(name, v1, baseline)


def test_a_successor_with_room_for_the_sockets_only_does_not_take_over(
        procs: Procs, name: str) -> None:
    """The successor has room for the predecessor's sockets and not one
    descriptor more: it could accept no connection. It must not confirm
    (the predecessor would step aside, and every request would wait in the
    listen queue for good, not a word logged): it aborts, saying why, and
    v1 serves on."""
    v1 = procs.sidecar(name, "v1")
    st = wait_for(serving(name, "v1"), 15, "v1 serving")
    baseline = st.num_fds
    v2 = procs.faulty(name, "v2", "send:hello:stop-after")
    wait_for(lambda: frozen(v2.pid), 15, "v2 stopped after its hello")
    # Room for the two sockets to come (http, control), not one more.
    in_use = len(os.listdir(f"/proc/{v2.pid}/fd"))
    resource.prlimit(v2.pid, resource.RLIMIT_NOFILE,
                     (in_use + 2, resource.prlimit(v2.pid, resource.RLIMIT_NOFILE)[1]))
    v2.send_signal(signal.SIGCONT)
    assert v2.wait(timeout=15) == 0  # called off, as a stop before confirming is
    wait_for(lambda: "successor aborted: no descriptor left to accept connections"
             in procs.logs(), 10, "v1 to log v2's reason")
    assert "RLIMIT_NOFILE" in procs.logs(), procs.logs()
    assert "Traceback" not in procs.procs[0][2].read_text(), procs.logs()
    v1_serves_on(name, v1, baseline)


def test_a_successor_that_gave_up_mid_transfer_is_heard(procs: Procs, name: str) -> None:
    """v1 has two frames of sockets to send; the successor, with no room
    for the first, aborts and closes while v1 is still sending (v1 frozen
    between the two here). v1's send fails (EPIPE), but the Abort is in its
    socket: v1 reads it and logs the successor's reason, then serves on
    every listener. It used to log only "sending 'sockets': Broken pipe"
    (4 runs in 10 with 300 to 1,000 listeners, unfrozen)."""
    extra = ("--extra-listeners", str(MAX_FDS_PER_FRAME))  # with http and control: 2 frames
    v1 = procs.spawn("v1", [PY, str(FAULTY), "--name", name, "--version", "v1", *extra],
                     procs.env(HOTSWAP_TEST_FAULT="send:sockets:stop-after",
                               HOTSWAP_TEST_MAIN=str(TINY)))
    st = wait_for(serving(name, "v1"), 30, "v1 serving")
    baseline = st.num_fds

    def low_limit() -> None:  # far from room for a frame of 253
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    v2 = procs.spawn("v2", [PY, str(TINY), "--name", name, "--version", "v2", *extra],
                     preexec_fn=low_limit)
    wait_for(lambda: frozen(v1.pid), 15, "v1 stopped after its first frame of sockets")
    assert v2.wait(timeout=15) != 0
    assert "no room for the predecessor's sockets" in procs.logs(), procs.logs()
    v1.send_signal(signal.SIGCONT)
    wait_for(lambda: "successor aborted: control message truncated (MSG_CTRUNC)"
             in procs.logs(), 10, "v1 to log v2's reason")
    assert "Traceback" not in procs.procs[0][2].read_text(), procs.logs()
    v1_serves_on(name, v1, baseline, listeners=1 + MAX_FDS_PER_FRAME)


def test_a_successor_killed_between_two_frames_of_sockets_changes_nothing(
        procs: Procs, name: str) -> None:
    """v1 has three frames of sockets; the successor is SIGKILLed once it
    has the first. v1 serves on every listener with the descriptors it
    had, and says the handover failed and why (the reset or broken pipe
    of the successor's end)."""
    extra = ("--extra-listeners", str(2 * MAX_FDS_PER_FRAME))
    v1 = procs.spawn("v1", [PY, str(TINY), "--name", name, "--version", "v1", *extra])
    st = wait_for(serving(name, "v1"), 30, "v1 serving")
    baseline = st.num_fds
    v2 = procs.spawn("v2", [PY, str(FAULTY), "--name", name, "--version", "v2", *extra],
                     procs.env(HOTSWAP_TEST_FAULT="receive:sockets:kill-after",
                               HOTSWAP_TEST_MAIN=str(TINY)))
    assert v2.wait(timeout=15) == -signal.SIGKILL
    wait_for(lambda: f"handover to pid {v2.pid} failed, still serving" in procs.logs(), 10,
             "v1 to give the handover up")
    v1_serves_on(name, v1, baseline, listeners=1 + 2 * MAX_FDS_PER_FRAME)


def test_an_old_side_at_its_descriptor_limit_still_hands_over(
        procs: Procs, name: str, idle_clients: IdleClients) -> None:
    """v1's clients take every descriptor it may have. The successor's
    control connection is still accepted, into the descriptor v1 keeps in
    reserve for that, and the upgrade goes through: v2 serves, and every
    client's next request is answered by v2 (the connections move as v1
    frees descriptors). It used to fail: v1 logged "control accept failed"
    ten times a second, and v2 gave up after 5 s ("did not answer our
    hello")."""
    v1 = procs.sidecar(name, "v1", args=("--drain-timeout", "20"))
    socks = idle_clients(port_of(wait_for(serving(name, "v1"), 15, "v1 serving")), 40)
    # Its limit lowered to what it holds now: not one more descriptor.
    in_use = len(os.listdir(f"/proc/{v1.pid}/fd"))
    hard = resource.prlimit(v1.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(v1.pid, resource.RLIMIT_NOFILE, (in_use, hard))
    v2 = procs.sidecar(name, "v2")
    assert v1.wait(timeout=20) == 0
    logs = procs.logs()
    assert "no descriptor left to copy connections" in logs, logs  # it was at its limit
    assert "control accept failed" not in logs, logs
    for sock in socks:
        reply = http_get(sock)
        assert b"version(v2)" in reply and b"Connection: close" not in reply, reply
        sock.close()
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0
