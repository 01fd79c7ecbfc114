"""One serving process survives many failed handovers in a row.

The other process tests fail one handover and then upgrade; in a pod the
same process may meet many failing successors over its life (a crash-looping
new image, a hook that times out, a probe, a stray client of the control
socket), and whatever one failed attempt leaves behind adds up. Here one v1
(the sample sidecar, a Kruise slot with a token, under keep-alive and busybox
clients that never retry) meets every kind of failing peer in turn: a
successor SIGKILLed at each step before its confirmation, SIGSTOPped past the
handover timeout (then killed, or resumed: it steps down), SIGTERMed before
confirming (it aborts; once half-framing its Abort), refused (wrong token, an
older version, a wrong protocol, busy), and raw peers of the control socket
that send garbage, nothing, half a hello, a hello with descriptors, or a
hello and then garbage, or that flood it. After every attempt v1 must serve
on with exactly its first descriptors (counted by kind from /proc); after
every round, as many asyncio tasks and about as many objects as after the
first, and RSS not growing. Then a good successor takes over for real: no
request failed, no client reconnected, and v1 drains without holding a
socket of its own, and exits 0.

Two rounds by default (~20 s); ``HOTSWAP_FAILURE_SOAK_ROUNDS=N`` for more.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import (
    FAULTY,
    PY,
    Procs,
    free_port,
    frozen,
    serving,
    status,
    wait_for,
)

import hotswap.control
from hotswap.protocol import Hello, encode

ROUNDS = int(os.environ.get("HOTSWAP_FAILURE_SOAK_ROUNDS") or 2)
TOKEN = "soak-token"
# v1 gives up on a silent peer or a frozen successor within a second.
V1_OPTIONS = f"message_timeout=1,handover_timeout=1,token={TOKEN}"
GOOD = {"HOTSWAP_TEST_OPTIONS": f"token={TOKEN}",
        "SIDECARSET_VERSION": "6", "SIDECARSET_VERSION_ALT": "5"}
# Growth allowed from the end of the first round to the end of the last:
# far above what a round moves them (a few objects, a few hundred kB), far
# below what a task, channel or buffer kept per attempt would add.
OBJECT_GROWTH = 500
RSS_GROWTH_KB = 4096


def fd_kinds(pid: int) -> collections.Counter[str]:
    """The process's open descriptors by kind (socket, pipe, anon_inode,
    file)."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        kinds["file" if target.startswith("/") else target.split(":")[0]] += 1
    return kinds


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


class Soak:
    def __init__(self, procs: Procs, name: str, port: int,
                 v1: subprocess.Popen[bytes], v1_log: Path) -> None:
        self.procs, self.name, self.port = procs, name, port
        self.v1, self.v1_log = v1, v1_log
        self.address = hotswap.control.sockaddr(hotswap.control.control_address(name))

    # ------------------------------------------------------------- measuring

    def counts(self) -> tuple[int, int]:
        """v1's unfinished asyncio tasks and gc-tracked objects
        (tests/support/faulty.py answers SIGUSR2)."""
        def answers() -> int:
            return self.v1_log.read_text(errors="replace").count("faulty: tasks ")
        before = answers()
        self.v1.send_signal(signal.SIGUSR2)
        wait_for(lambda: answers() > before, 5, "v1's task count")
        words = self.v1_log.read_text(errors="replace").rsplit(
            "faulty: tasks ", 1)[1].split()
        return int(words[0]), int(words[2])

    def gave_up(self) -> int:
        return self.v1_log.read_text(errors="replace").count("still serving")

    # ------------------------------------------------------ failing successors

    def successor(self, fault: str, args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen[bytes], Path]:
        """A v2 with ``fault`` (faulty.py's), a good one's environment but
        for ``env``."""
        proc = self.procs.spawn(f"v2-{fault.replace(':', '-')}",
                                [PY, str(FAULTY), "--name", self.name, "--version", "v2",
                                 "--port", str(self.port), *args],
                                self.procs.env(**{**GOOD, "HOTSWAP_TEST_FAULT": fault,
                                                  **(env or {})}))
        return proc, self.procs.procs[-1][2]

    def killed(self, fault: str) -> Callable[[], None]:
        def attempt() -> None:
            proc, _ = self.successor(fault)
            assert proc.wait(timeout=20) == -signal.SIGKILL
        return attempt

    def stopped_past_timeout_then_killed(self) -> None:
        before = self.gave_up()
        proc, _ = self.successor("receive:sockets:stop-after")
        wait_for(lambda: self.gave_up() > before, 15, "v1 giving up on the frozen successor")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stopped_past_timeout_then_resumed(self) -> None:
        before = self.gave_up()
        proc, _ = self.successor("send:accepting:stop-before")
        wait_for(lambda: self.gave_up() > before, 15, "v1 giving up on the frozen successor")
        # Stopped by now, or the SIGCONT is lost (a starved successor can
        # reach its SIGSTOP after v1's deadline).
        wait_for(lambda: frozen(proc.pid), 15, "the successor frozen before confirming")
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=15) == 1  # the predecessor abandoned the handover

    def sigtermed_before_confirming(self) -> None:
        proc, _ = self.successor("receive:sockets:stop-after")
        wait_for(lambda: frozen(proc.pid), 15, "the successor frozen with the sockets")
        proc.send_signal(signal.SIGTERM)  # pending until it runs again
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=15) == 0  # it aborted: a normal stop

    def hanging_then_sigtermed(self, fault: str = "none:none:none") -> None:
        proc, log = self.successor(fault, args=("--fail-start", "hang"))
        wait_for(lambda: "not confirming until SIGTERM" in log.read_text(errors="replace"),
                 15, "the successor hanging before its confirmation")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0

    def refused(self, **env: str) -> Callable[[], None]:
        def attempt() -> None:
            proc, log = self.successor("none:none:none", env=env)
            assert proc.wait(timeout=20) == 1
            assert "HandoverRefused" in log.read_text(errors="replace")
        return attempt

    def refused_busy(self) -> None:
        before = self.gave_up()
        proc, _ = self.successor("receive:sockets:stop-after")
        wait_for(lambda: frozen(proc.pid), 15, "the successor frozen with the sockets")
        assert b"busy" in self.raw(self.hello())
        wait_for(lambda: self.gave_up() > before, 15, "v1 giving up on the frozen successor")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    # ------------------------------------------------------------- raw peers

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.address)
        return sock

    @staticmethod
    def hello(**fields: Any) -> bytes:
        return encode(Hello(**{"pid": os.getpid(), "version": "raw", "token": TOKEN,
                               **fields}))

    @staticmethod
    def until_eof(sock: socket.socket) -> bytes:
        """What v1 says until it closes (descriptors it sends closed here)."""
        data = b""
        while True:
            chunk, fds, _, _ = socket.recv_fds(sock, 65536, 16)
            for fd in fds:
                os.close(fd)
            if not chunk:
                return data
            data += chunk

    def raw(self, payload: bytes, *, wait: bool = True, fds: list[int] | None = None
            ) -> bytes:
        with self.connect() as sock:
            if fds:
                socket.send_fds(sock, [payload], fds)
            elif payload:
                sock.sendall(payload)
            return self.until_eof(sock) if wait else b""

    def peer(self, payload: bytes, *, wait: bool = True) -> Callable[[], None]:
        def attempt() -> None:
            self.raw(payload, wait=wait)
        return attempt

    def hello_with_descriptors(self) -> None:
        r, w = os.pipe()
        try:
            assert b"protocol" in self.raw(self.hello(), fds=[r, w])
        finally:
            os.close(r)
            os.close(w)

    def hello_then_garbage(self) -> None:
        with self.connect() as sock:
            sock.sendall(self.hello())
            _, fds, _, _ = socket.recv_fds(sock, 65536, 16)  # the welcome, maybe more
            for fd in fds:
                os.close(fd)
            sock.sendall(b"\x00\x00\x00\x03abc")
            self.until_eof(sock)

    def flood(self) -> None:
        """More silent peers than v1 takes at once, then a status query."""
        socks = [self.connect() for _ in range(20)]
        try:
            st = status(self.name)
            assert st is not None and st.pid == self.v1.pid
        finally:
            for sock in socks:
                sock.close()

    def status_query(self) -> None:
        st = status(self.name)
        assert st is not None and st.pid == self.v1.pid

    def attempts(self) -> list[tuple[str, Callable[[], None]]]:
        half = self.hello()
        return [
            ("killed before its hello", self.killed("send:hello:kill-before")),
            ("killed after the welcome", self.killed("receive:welcome:kill-after")),
            ("killed after the sockets", self.killed("receive:sockets:kill-after")),
            ("killed before accepting", self.killed("send:accepting:kill-before")),
            ("frozen past the deadline, killed", self.stopped_past_timeout_then_killed),
            ("frozen past the deadline, resumed", self.stopped_past_timeout_then_resumed),
            ("SIGTERM before confirming", self.sigtermed_before_confirming),
            ("hanging start, SIGTERM", self.hanging_then_sigtermed),
            ("hanging start, SIGTERM, half an abort",
             lambda: self.hanging_then_sigtermed("send:abort:half-frame")),
            ("wrong token", self.refused(HOTSWAP_TEST_OPTIONS="token=wrong")),
            ("older version", self.refused(SIDECARSET_VERSION="4",
                                           SIDECARSET_VERSION_ALT="3")),
            ("busy", self.refused_busy),
            ("garbage", self.peer(b"\x00\x00\x00\x05hello")),
            ("a huge length", self.peer(b"\xff\xff\xff\xff" + b"x" * 64)),
            ("silence", self.peer(b"")),
            ("connect and close", self.peer(b"", wait=False)),
            ("half a hello", self.peer(half[:len(half) // 2], wait=False)),
            ("another protocol", self.peer(self.hello(protocol=99))),
            ("a hello, then close", self.peer(half, wait=False)),
            ("a hello with descriptors", self.hello_with_descriptors),
            ("a hello, then garbage", self.hello_then_garbage),
            ("a flood of silent peers", self.flood),
            ("a status query", self.status_query),
        ]


def test_one_process_survives_many_failed_handovers(procs: Procs, name: str,
                                                   load: Any) -> None:
    port = free_port()
    v1 = procs.faulty(name, "v1", "none:none:none", port=port,
                      HOTSWAP_TEST_OPTIONS=V1_OPTIONS, HOTSWAP_TEST_TASKS="1",
                      SIDECARSET_VERSION="5")
    v1_log = procs.procs[-1][2]
    wait_for(serving(name, "v1"), 15, "v1 serving")
    # Light load whose connections stay open: v1's descriptors are then exact.
    traffic = load(port, keepalive=3, fresh=0, interval=0.01, duration=300, timeout=5.0)
    soak = Soak(procs, name, port, v1, v1_log)
    # Every client connected (three keep-alive, one busybox) before counting.
    wait_for(lambda: len(_tcp_inodes(_tables(v1.pid)) & socket_inodes(v1.pid)) >= 5, 5,
             "the four clients connected")
    baseline = fd_kinds(v1.pid)
    tasks0, _ = soak.counts()
    measured: list[tuple[int, int, int]] = []  # per round: tasks, objects, RSS
    for rnd in range(ROUNDS):
        for what, attempt in soak.attempts():
            attempt()
            st = wait_for(serving(name, "v1"), 10, f"v1 serving on after: {what}")
            assert st.pid == v1.pid, what
            try:
                wait_for(lambda: fd_kinds(v1.pid) == baseline, 5,
                         f"v1's descriptors back to {dict(baseline)}")
            except AssertionError:
                now = fd_kinds(v1.pid)
                raise AssertionError(
                    f"round {rnd + 1}, after '{what}': v1 holds {dict(now)}, began with "
                    f"{dict(baseline)} (more: {dict(now - baseline)}, "
                    f"fewer: {dict(baseline - now)})") from None
        tasks, objects = soak.counts()
        measured.append((tasks, objects, rss_kb(v1.pid)))
        assert tasks == tasks0, (f"round {rnd + 1}: v1 runs {tasks} asyncio tasks, "
                                 f"began with {tasks0}: {measured}")
    print(f"v1 descriptors {dict(baseline)}; per round (tasks, objects, RSS kB): "
          f"{measured}")
    assert measured[-1][1] - measured[0][1] < OBJECT_GROWTH, measured
    assert measured[-1][2] - measured[0][2] < RSS_GROWTH_KB, measured

    # Then upgraded for real: nothing failed, v1 keeps no socket of its own.
    held = socket_inodes(v1.pid)
    v3 = procs.spawn("v3", [PY, str(FAULTY), "--name", name, "--version", "v3",
                            "--port", str(port)], procs.env(**GOOD))
    wait_for(serving(name, "v3"), 20, "v3 serving")
    wait_for(lambda: "idle without sockets" in v1_log.read_text(errors="replace"), 30,
             "v1 drained")
    kept = socket_inodes(v1.pid) & held
    # What v1 held while serving and still holds is the event loop's own
    # (uvloop's signal socketpair): nothing in the network's tables.
    tables = _tables(v1.pid)
    assert not (kept & _tcp_inodes(tables)), "v1 kept a TCP socket after its drain"
    assert not _named_unix(tables, kept, name), "v1 kept a control or marker socket"
    result = traffic.last_round()
    assert result["failed"] == 0, result
    assert set(result["connections"].values()) == {1}, result  # none reconnected
    assert result["versions"].keys() >= {"v1", "v3"}, result
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0
    v3.send_signal(signal.SIGTERM)
    assert v3.wait(timeout=15) == 0


def _tables(pid: int) -> str:
    """The network namespace's TCP and Unix socket tables, as ``pid`` sees them."""
    tables = ""
    for table in ("tcp", "tcp6", "unix"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            tables += fh.read()
    return tables


def _tcp_inodes(tables: str) -> set[str]:
    """The inodes of the TCP sockets in /proc/net/tcp{,6} (column 10)."""
    inodes = set()
    for line in tables.splitlines():
        fields = line.split()
        if len(fields) > 9 and ":" in fields[1] and fields[0].endswith(":"):
            inodes.add(fields[9])
    return inodes


def _named_unix(tables: str, inodes: set[str], name: str) -> set[str]:
    """Those of ``inodes`` that are Unix sockets bound to a name of ours."""
    found = set()
    for line in tables.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and name in line:
            found.add(fields[6])
    return found
