"""The fault matrix: every step of a handover, each side killed or frozen there.

For each step of the protocol (hello, listeners sent, accepting, released,
connections frames and their acknowledgements, drained), one side of a real
handover (the sample sidecar, v1 -> v2, under keep-alive, busybox and
new-connection load on 127.0.0.1 whose clients never retry) is SIGKILLed
there, or SIGSTOPped there and SIGCONTed only once the other side has shown
(in its log) that the step's deadline passed. The stop is deterministic:
tests/support/faulty.py stops or kills the process from inside its control
channel, just before or after that message. Timeouts are shortened for the
test (``HOTSWAP_TEST_OPTIONS``: message_timeout 1 s, handover_timeout 1.5 s;
predecessor_drain_timeout 1 s where the successor waits for a frozen
predecessor), so that a freeze past them lasts a second or two.

Each cell then checks: which process serves (or none: the successor was
the server when it died), the failed requests (none, unless the design says
a killed process loses its in-flight requests or a dead successor leaves
nobody accepting), the idle keep-alive connection the test holds (handed over
at the drain's first round: answered by whom), both processes' exit codes
within their deadlines and the message the failing side logs, and the
survivor's descriptors back to a clean start's once the load is gone.

Cells covered elsewhere (not repeated here): tests/test_faults.py (the
successor killed before its hello, after the welcome, after the listeners,
after confirming; the successor frozen past the deadline after the
listeners; the predecessor killed after the hello, the listeners, the
confirmation, the release) and tests/test_signals.py (SIGTERM during a
handover).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from conftest import (
    Load,
    Procs,
    free_port,
    http_get,
    port_of,
    serving,
    status,
    wait_for,
)

import hotswap.control
from hotswap.protocol import Hello, SocketInfo, Sockets, StatusRequest, Welcome, encode

OPTIONS = "message_timeout=1,handover_timeout=1.5"
SHORT_DRAIN_WAIT = OPTIONS + ",predecessor_drain_timeout=1"
DRAIN = ("--drain-timeout", "3")
CLIENT_TIMEOUT = 10.0  # a frozen server's requests wait, they do not fail
LOST = {"reset", "reset-reused", "eof", "eof-reused"}


@dataclass(frozen=True)
class Cell:
    """One cell: ``side`` ("old" or "new") gets ``fault`` (faulty.py's
    ``where:type:action``). A frozen one is resumed once ``resume`` is in the
    other's log (``"exit"``: once the other has exited). ``serves``: "old",
    "new" or "none"; ``old_rc`` / ``new_rc``: exit codes (None: serving);
    ``losses``: "none", "killed" (at most one request per client in flight
    on the killed one's connections, no refusal), "killed-listener" (the
    killed one was the listener's only holder: refusals and a reset more per
    client) or "outage" (nobody accepts: refusals, resets); ``idle``: who
    answers the next request of the test's idle keep-alive connection (None:
    it died with a killed process, by design); ``says``: what the failing
    side logs; ``new_opts``: the successor's options."""

    side: str
    fault: str
    serves: str
    old_rc: int | None
    new_rc: int | None
    losses: str = "none"
    idle: str | None = "any"
    resume: str = ""
    says: str = ""
    new_opts: str = OPTIONS


KILLED = -signal.SIGKILL
CELLS = {
    # ------------------------------------------------ the old side frozen
    "old-frozen-after-hello": Cell(
        "old", "receive:hello:stop-after", "old", None, 1, idle="v1", resume="exit",
        says="did not answer our hello"),
    "old-frozen-after-welcome": Cell(
        "old", "send:welcome:stop-after", "old", None, 1, idle="v1", resume="exit",
        says="sent 0 of its 2 socket(s), then nothing"),
    "old-frozen-after-listeners": Cell(
        "old", "send:sockets:stop-after", "new", 0, None,
        resume="no release from the predecessor"),
    "old-frozen-after-accepting": Cell(
        "old", "receive:accepting:stop-after", "new", 0, None,
        resume="no release from the predecessor"),
    "old-frozen-after-released": Cell(
        "old", "send:released:stop-after", "new", 0, None, resume="predecessor gone",
        new_opts=SHORT_DRAIN_WAIT),
    "old-frozen-after-connections": Cell(
        "old", "send:connections:stop-after", "new", 0, None, idle="v2",
        resume="predecessor gone", new_opts=SHORT_DRAIN_WAIT),
    "old-frozen-after-adopted": Cell(
        "old", "receive:adopted:stop-after", "new", 0, None, idle="v2",
        resume="predecessor gone", new_opts=SHORT_DRAIN_WAIT),
    "old-frozen-before-drained": Cell(
        "old", "send:drained:stop-before", "new", 0, None, idle="v2",
        resume="predecessor gone", new_opts=SHORT_DRAIN_WAIT),
    # ------------------------------------------------ the old side killed
    "old-killed-after-welcome": Cell(
        "old", "send:welcome:kill-after", "new", KILLED, None, losses="killed-listener",
        idle=None),
    "old-killed-after-connections": Cell(
        "old", "send:connections:kill-after", "new", KILLED, None, losses="killed",
        idle="v2"),
    "old-killed-after-adopted": Cell(
        "old", "receive:adopted:kill-after", "new", KILLED, None, losses="killed",
        idle="v2"),
    "old-killed-before-drained": Cell(
        "old", "send:drained:kill-before", "new", KILLED, None, idle="v2"),
    # ------------------------------------------------ the new side frozen
    "new-frozen-before-hello": Cell(
        "new", "send:hello:stop-before", "new", 0, None, idle="v2",
        resume="nothing received within 1.0s of connecting",
        says="gave up waiting for our hello"),
    "new-frozen-after-welcome": Cell(
        "new", "receive:welcome:stop-after", "old", None, 1, idle="v1",
        resume="still serving", says="predecessor abandoned the handover"),
    "new-frozen-before-accepting": Cell(
        "new", "send:accepting:stop-before", "old", None, 1, idle="v1",
        resume="still serving", says="predecessor abandoned the handover"),
    "new-frozen-after-accepting": Cell(
        "new", "send:accepting:stop-after", "new", 0, None, idle="v2",
        resume="no acknowledgement"),
    "new-frozen-after-released": Cell(
        "new", "receive:released:stop-after", "new", 0, None, idle="v2",
        resume="no acknowledgement"),
    "new-frozen-after-connections": Cell(
        "new", "receive:connections:stop-after", "new", 0, None, idle="v2",
        resume="no acknowledgement"),
    "new-frozen-after-adopted": Cell(
        "new", "send:adopted:stop-after", "new", 0, None, idle="v2", resume="exit"),
    "new-frozen-after-drained": Cell(
        "new", "receive:drained:stop-after", "new", 0, None, idle="v2", resume="exit"),
    # ------------------------------------------------ the new side killed
    # The successor starts accepting only as it sends Accepting: killed
    # before, it had accepted nothing, and nothing is lost.
    "new-killed-before-accepting": Cell(
        "new", "send:accepting:kill-before", "old", None, KILLED, idle="v1"),
    "new-killed-after-released": Cell(
        "new", "receive:released:kill-after", "none", 0, KILLED, losses="outage",
        idle="v1"),
    "new-killed-after-connections": Cell(
        "new", "receive:connections:kill-after", "none", 0, KILLED, losses="outage",
        idle="v1"),
    "new-killed-after-adopted": Cell(
        "new", "send:adopted:kill-after", "none", 0, KILLED, losses="outage", idle=None),
    "new-killed-after-drained": Cell(
        "new", "receive:drained:kill-after", "none", 0, KILLED, losses="outage",
        idle=None),
}


def log_of(procs: Procs, proc: subprocess.Popen[bytes]) -> str:
    return next(log.read_text(errors="replace") for _, p, log in procs.procs if p is proc)


def frozen(proc: subprocess.Popen[bytes]) -> bool:
    return psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED


def idle_connection(port: int) -> socket.socket:
    """A keep-alive connection that made one request and idles: at a request
    boundary when the drain begins, so that its first round hands it over."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    assert b"200 OK" in http_get(sock)
    return sock


def check_losses(result: dict[str, Any], losses: str) -> None:
    failures = result["failures"]
    clients = 2 + 1 + 1  # keep-alive, new-connection, busybox
    if losses == "none":
        assert result["failed"] == 0, (result["errors"], result)
    elif losses in ("killed", "killed-listener"):
        lost = {k: v for k, v in failures.items() if k != "refused"}
        assert set(lost) <= LOST, result
        assert sum(lost.values()) <= (2 if losses == "killed-listener" else 1) * clients, \
            result
        if losses == "killed":
            assert "refused" not in failures, result
    else:
        assert set(failures) <= LOST | {"refused"}, result


@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS.keys())
def test_fault_at_each_step(procs: Procs, name: str, load: Callable[..., Load],
                            cell: Cell) -> None:
    port = free_port()
    old_fault = cell.fault if cell.side == "old" else ""
    new_fault = cell.fault if cell.side == "new" else ""
    v1 = procs.faulty(name, "v1", old_fault, port=port, args=DRAIN,
                      HOTSWAP_TEST_OPTIONS=OPTIONS)
    st = wait_for(serving(name, "v1"), 15, "v1 serving")
    baseline = st.num_fds
    traffic = load(port, keepalive=2, fresh=1, timeout=CLIENT_TIMEOUT)
    idle = idle_connection(port)
    v2 = procs.faulty(name, "v2", new_fault, port=port, args=DRAIN,
                      HOTSWAP_TEST_OPTIONS=cell.new_opts)
    victim, other = (v1, v2) if cell.side == "old" else (v2, v1)
    if ":kill-" in cell.fault:
        assert victim.wait(timeout=15) == KILLED
    else:
        wait_for(lambda: frozen(victim), 15, f"{cell.side} side frozen at {cell.fault}")
        if cell.resume == "exit":
            other.wait(timeout=15)
        else:
            wait_for(lambda: cell.resume in log_of(procs, other), 15,
                     f"{cell.resume!r} in the log of the other side")
        assert frozen(victim), "resumed before its time"
        victim.send_signal(signal.SIGCONT)
    # Who serves now.
    survivor = {"old": v1, "new": v2, "none": None}[cell.serves]
    if survivor is not None:
        version = "v1" if survivor is v1 else "v2"
        st = wait_for(serving(name, version), 15, f"{version} serving")
        assert st.pid == survivor.pid and port_of(st) == port
    # The test's idle keep-alive connection: its next request.
    if cell.idle is not None:
        reply = http_get(idle)
        assert b"200 OK" in reply, reply
        if cell.idle != "any":
            assert f"version({cell.idle})".encode() in reply, reply
    idle.close()
    # Exit codes, within the deadlines (drain 3 s, its grace, the clean-up).
    for proc, rc in ((v1, cell.old_rc), (v2, cell.new_rc)):
        if rc is None:
            assert proc.poll() is None
        else:
            assert proc.wait(timeout=15) == rc, procs.logs()
    if cell.says:
        logs = log_of(procs, v1) + log_of(procs, v2)
        assert cell.says in logs, logs
    result = traffic.finish()
    check_losses(result, cell.losses)
    if survivor is None:
        assert status(name) is None
        return
    wait_for(lambda: (s := status(name)) is not None and s.num_fds == baseline, 10,
             f"the survivor back to {baseline} descriptors")
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(timeout=15) == 0


def test_old_side_frozen_inside_its_wait_for_the_confirmation(
        procs: Procs, name: str, load: Callable[..., Load]) -> None:
    """The old side is stopped while it waits for the confirmation (its
    handover_timeout running), the successor confirms meanwhile and, with no
    Released within message_timeout, serves anyway. Resumed past its
    deadline, the old side finds the Accepting that arrived (its timer and
    its socket wake it in the same loop iteration) and drains: it must not
    fail the handover and serve on beside its successor."""
    port = free_port()
    v1 = procs.faulty(name, "v1", "", port=port, args=DRAIN, HOTSWAP_TEST_OPTIONS=OPTIONS)
    baseline = wait_for(serving(name, "v1"), 15, "v1 serving").num_fds
    traffic = load(port, keepalive=2, fresh=1, timeout=CLIENT_TIMEOUT)
    idle = idle_connection(port)
    v2 = procs.faulty(name, "v2", "send:accepting:stop-before", port=port, args=DRAIN,
                      HOTSWAP_TEST_OPTIONS=OPTIONS)
    wait_for(lambda: frozen(v2), 15, "v2 frozen before confirming")
    # v1 waits for the confirmation. Waited for, not asserted: v1 writes the
    # line after its last send returns, and v2 can take the sockets and
    # stop before a v1 kept off the CPU meanwhile has written it.
    wait_for(lambda: "socket(s) sent" in log_of(procs, v1), 15,
             "v1 waiting for the confirmation")
    v1.send_signal(signal.SIGSTOP)
    wait_for(lambda: frozen(v1), 5, "v1 frozen in its wait")
    stopped_at = time.monotonic()
    v2.send_signal(signal.SIGCONT)
    wait_for(lambda: "no release from the predecessor" in log_of(procs, v2), 15,
             "v2 serving without a release")
    # v1's deadline (handover_timeout 1.5 s, begun before it was stopped).
    wait_for(lambda: time.monotonic() > stopped_at + 1.6, 5, "v1's deadline passed")
    v1.send_signal(signal.SIGCONT)
    # Its Released finds the successor gone, so its drain tells every
    # connection to close; that line comes after the drain began telling
    # (nothing awaited in between). "confirmed; stopping accepting" comes
    # before: a request arriving there was answered keep-alive.
    wait_for(lambda: "successor did not take released" in log_of(procs, v1), 15,
             "v1 draining without its successor")
    reply = http_get(idle)  # v1 cannot hand it over: it says close
    assert b"200 OK" in reply and b"Connection: close" in reply, reply
    idle.close()
    assert v1.wait(timeout=15) == 0
    st = wait_for(serving(name, "v2"), 15, "v2 serving")
    assert st.pid == v2.pid
    check_losses(traffic.finish(), "none")
    wait_for(lambda: (s := status(name)) is not None and s.num_fds == baseline, 10,
             f"v2 back to {baseline} descriptors")
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def _exchange(address: str, data: bytes, fds: tuple[int, ...] = ()) -> bytes:
    """Connect to the control socket, send ``data`` (with ``fds``), read
    the answer until the server closes (5 s at most)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(hotswap.control.sockaddr(address))
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


def test_garbage_from_a_wrong_peer_changes_nothing(procs: Procs, name: str,
                                                   load: Callable[..., Load]) -> None:
    """A wrong peer on the serving process's control socket, under load:
    garbage, an oversized length, descriptors from a client, a hello whose
    handover it breaks with a frame nested too deep for the parser, and
    more silent connections than there are slots. Each is refused or let
    go of with a reason; the serving process serves on with the descriptors
    it had (nothing received kept), and the next upgrade works."""
    port = free_port()
    v1 = procs.faulty(name, "v1", "", port=port, args=DRAIN, HOTSWAP_TEST_OPTIONS=OPTIONS)
    baseline = wait_for(serving(name, "v1"), 15, "v1 serving").num_fds
    traffic = load(port, keepalive=2, fresh=1, timeout=CLIENT_TIMEOUT)
    address = hotswap.control.control_address(name)
    for data, why in ((b"GET / HTTP/1.1\r\n\r\n", b"outside 1..16384"),
                      (b"\xff\xff\xff\xff", b"frame length 4294967295"),
                      (b"\x00\x00\x00\x04{}}}", b"not UTF-8 JSON")):
        reply = _exchange(address, data)
        assert b'"code":"protocol"' in reply and why in reply, reply
    r, w = os.pipe()
    reply = _exchange(address, encode(StatusRequest()), (r, w))
    os.close(r)
    os.close(w)
    assert b"descriptors from a client" in reply, reply
    # A hello, the sockets taken (and closed), then garbage instead of a verdict.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(hotswap.control.sockaddr(address))
        sock.sendall(encode(Hello(pid=os.getpid(), version="evil")))
        got = b""
        while got.count(b'"type":"sockets"') < 1:
            data, fds, _, _ = socket.recv_fds(sock, 65536, 16)
            for fd in fds:
                os.close(fd)
            assert data, got
            got += data
        sock.sendall(struct.pack("!I", 16_000) + b"[" * 16_000)
        assert sock.recv(65536) == b""  # dropped: no Failed in a broken conversation
    wait_for(lambda: (s := status(name)) is not None and s.state == "serving", 10,
             "v1 serving again")
    # More silent peers than control slots: the oldest are let go of.
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
    for sock in silent:
        sock.connect(hotswap.control.sockaddr(address))
    st = status(name)
    assert st is not None and st.pid == v1.pid and st.state == "serving"
    for sock in silent:
        sock.close()
    logs = log_of(procs, v1)
    for said in ("frame length 4294967295 outside", "descriptors from a client",
                 "frame nests too deep", "let go of"):
        assert said in logs, said
    check_losses(traffic.finish(), "none")  # its connections closed: v1's own fds left
    wait_for(lambda: (s := status(name)) is not None and s.num_fds == baseline, 10,
             f"v1 back to {baseline} descriptors")
    traffic = load(port, keepalive=2, fresh=1, timeout=CLIENT_TIMEOUT)
    v2 = procs.faulty(name, "v2", "", port=port, args=DRAIN, HOTSWAP_TEST_OPTIONS=OPTIONS)
    wait_for(serving(name, "v2"), 15, "v2 serving")
    assert v1.wait(timeout=15) == 0
    check_losses(traffic.finish(), "none")
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def _squat(address: str, answer: Callable[[socket.socket], None]) -> threading.Thread:
    """A wrong peer serving the control name (our own uid: it passes the
    successor's SO_PEERCRED check): it takes one connection, reads the hello,
    lets ``answer`` reply, then closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(hotswap.control.sockaddr(address))
    listener.listen(1)

    def serve() -> None:
        with listener:
            listener.settimeout(30)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(65536)  # the hello
                answer(conn)
                with contextlib.suppress(OSError):
                    conn.recv(65536)  # its Abort, or EOF

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _welcome(count: int) -> bytes:
    return encode(Welcome(pid=1, version="squatter", count=count))


def _garbage_reply(conn: socket.socket) -> None:
    conn.sendall(b"\x00\x00\x00\x05hello")


def _a_pipe_for_a_socket(conn: socket.socket) -> None:
    r, w = os.pipe()
    try:
        frame = encode(Sockets(entries=(SocketInfo(name="control", family="unix",
                                                    kind="stream", address="@x"),),
                               fds=(r,)))
        conn.sendall(_welcome(1))
        socket.send_fds(conn, [frame], [r])
    finally:
        os.close(r)
        os.close(w)


def _welcome_then_silence(conn: socket.socket) -> None:
    conn.sendall(_welcome(2))


@pytest.mark.parametrize(("answer", "says"), [
    (_garbage_reply, "answered our hello with no hotswap reply (frame is not UTF-8 JSON"),
    (_a_pipe_for_a_socket, "adopting the sockets failed"),
    (_welcome_then_silence, "(pid 1, squatter) sent 0 of its 2 socket(s), then nothing"),
], ids=["garbage", "a-pipe-for-a-socket", "welcome-then-silence"])
def test_a_successor_facing_a_wrong_peer_fails_clearly(
        procs: Procs, name: str, answer: Callable[[socket.socket], None], says: str) -> None:
    """The other direction: what holds the control name is no hotswap
    process. The successor (the sample sidecar) fails within its deadlines
    with exit status 1 and says why; it takes nothing (a descriptor it was
    sent is closed, not adopted)."""
    squatter = _squat(hotswap.control.control_address(name), answer)
    v2 = procs.faulty(name, "v2", "", port=free_port(), args=DRAIN,
                      HOTSWAP_TEST_OPTIONS=OPTIONS)
    assert v2.wait(timeout=15) == 1, procs.logs()
    squatter.join(timeout=10)
    assert not squatter.is_alive()
    assert says in log_of(procs, v2), log_of(procs, v2)
