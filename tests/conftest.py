"""Shared fixtures: real processes started here and ended by their own pid,
conditions waited on with deadlines, unique sidecar names per test."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psutil
import pytest

import hotswap.control
from hotswap.protocol import Status

if TYPE_CHECKING:
    from aiohttp import web

    from hotswap.migrate import Tracked

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SIDECAR = ROOT / "examples/sidecar_server/main.py"
TINY = ROOT / "tests/support/tiny_server.py"
LOADGEN = ROOT / "bench/loadgen.py"
FAULTY = ROOT / "tests/support/faulty.py"

# Where the PostStart hooks the tests run leave their deadline, and the
# sidecars look for it (hotswap.kruise.hook_gave_up): not the machine's
# /dev/shm. Removed when the session ends.
HOOK_DIR = tempfile.mkdtemp(prefix="hotswap-test-hooks-")
atexit.register(shutil.rmtree, HOOK_DIR, True)

_T = TypeVar("_T")


class Runner(Protocol):
    """What runs a test's coroutine to its end and returns its result:
    asyncio.run or uvloop.run."""

    def __call__(self, main: Coroutine[Any, Any, _T], /) -> _T: ...

KRUISE_VARS = ("SIDECARSET_VERSION", "SIDECARSET_VERSION_ALT", "IS_INJECTED",
               "LISTEN_PID", "LISTEN_FDS")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: ours without what steers
    hotswap (Kruise's variables, systemd's, every ``HOTSWAP_*``: the shell
    that runs the tests must not change what they check), with unbuffered
    output and the idle start off, then ``extra``.

    Idle start off: a SCHED_IDLE thread gets only CPU that nothing else in
    its CPU scheduling group wants; with that group's cores busy (a CPU hog
    in the same session), a Kruise successor's imports would wait minutes.
    The tests of the idle start ask for it (``HOTSWAP_IDLE_START=""``: the
    Kruise role decides). Hooks' deadlines go to :data:`HOOK_DIR`."""
    env = {k: v for k, v in os.environ.items()
           if k not in KRUISE_VARS and not k.startswith("HOTSWAP_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["HOTSWAP_IDLE_START"] = "0"
    env["HOTSWAP_HOOK_DIR"] = HOOK_DIR
    env.update(extra)
    return env


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll a condition that has no event to wait on, with a deadline."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - state owned by another task
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def tracked_connection(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                             ) -> AsyncIterator[tuple[Tracked, asyncio.Transport,
                                                      asyncio.StreamReader, asyncio.StreamWriter]]:
    """One connection of a ``web.Server(handler)`` handled by a
    :class:`~hotswap.migrate.Tracked` (its ``migrator`` a fresh one, the
    server its ``_manager``), on a socket pair (real transports): the
    connection, its transport, and the client's end as streams. Closed at
    the end, once the connection is gone and the server shut down."""
    from aiohttp import web  # imported here: most tests need no aiohttp

    from hotswap.migrate import Migrator, Tracked

    server = web.Server(handler)
    ours, theirs = socket.socketpair()
    migrator = Migrator()
    tracked = Tracked(server, "http", migrator)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: tracked, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    try:
        yield tracked, transport, reader, writer
    finally:
        writer.close()
        transport.close()
        await until(lambda: tracked not in migrator.tracked, "the connection's end")
        await server.shutdown(1)


async def keepalive_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET on a kept connection: the response's head (lower case) and
    body, within 10 s."""
    async with asyncio.timeout(10):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after
    ``timeout`` seconds saying ``what`` we were waiting for."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def status(name: str, timeout: float = 2.0) -> Status | None:
    """The status of whoever serves ``name``, or None if nobody answers."""
    address = hotswap.control.control_address(name)
    try:
        return asyncio.run(hotswap.control.query_status(address, timeout=timeout))
    except (OSError, hotswap.HotswapError):
        return None


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and its Content-Length body); fails on
    EOF. The socket's own timeout bounds each read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def _tcp_endpoint(field: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6} ("0100007F:1F90"; each 32-bit word
    of the address in host order, little-endian here) as (host, port); an
    IPv4-mapped IPv6 address as its IPv4 one."""
    address, port = field.split(":")
    raw = bytes.fromhex(address)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def read_by_peer(sock: socket.socket) -> bool:
    """Whether the other end of the TCP connection ``sock`` (ours; its
    peer any process on this machine) has read all ``sock`` sent: its
    kernel acknowledged every byte (``TIOCOUTQ``), and none waits in its
    receive queue (its line in /proc/net/tcp{,6}: rx_queue). False while
    that end is not found (not accepted yet counts as found: the kernel
    completed it)."""
    unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    if unacked:
        return False
    ours, theirs = sock.getsockname()[:2], sock.getpeername()[:2]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if (_tcp_endpoint(fields[1]) == theirs and _tcp_endpoint(fields[2]) == ours):
                    return int(fields[4].split(":")[1], 16) == 0
    return False


def send_apart(sock: socket.socket, pieces: list[bytes], timeout: float = 10.0) -> None:
    """Each piece on its own: the peer (a process of ours) has read one
    before the next is sent (:func:`read_by_peer`), so it reads each in a
    read of its own. Fails after ``timeout`` seconds for a piece."""
    for piece in pieces:
        sock.sendall(piece)
        wait_for(lambda: read_by_peer(sock), timeout, "the peer reading what was sent",
                 interval=0.001)


def http_get(sock: socket.socket) -> bytes:
    """GET /serve on an open connection; the whole response."""
    sock.sendall(b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n")
    return read_response(sock)


def queued_connections(port: int, *, requests: int, idle: int) -> list[socket.socket]:
    """Connections to 127.0.0.1:``port`` that the kernel completes and
    queues on the listener whether or not anyone accepts (its holders may
    all be frozen): ``requests`` of them with a GET /serve sent, waiting to
    be read, then ``idle`` that send nothing (keep-alive clients that
    opened a connection ahead of their first request)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10)
             for _ in range(requests + idle)]
    for sock in socks[:requests]:
        sock.sendall(b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n")
    return socks


def frozen(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP) by now."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def stop_when(argv: list[str], env: dict[str, str], out: Path, signum: int, shown: str,
              ready: Callable[[list[psutil.Process]], bool], kept: str
              ) -> tuple[int, list[psutil.Process]]:
    """Run a script that starts processes (the demo, the bench), its output
    in ``out``; once it has written ``shown``, send it ``signum`` as soon as
    ``ready(descendants)``. Both looked at every 1 ms (a stop that comes
    while a process starts is a case to meet, not a sleep); the
    descendants (all of /proc read) only once ``shown`` is there.
    Returns its exit status and which of the descendants seen then are
    still alive 10 s after it exited. In the end, what it left is killed by
    pid and the directory it kept (``kept``: a pattern whose group is its
    path) removed."""
    with open(out, "wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seen: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while shown not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.001)
        while not ready(seen := psutil.Process(proc.pid).children(recursive=True)):
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.001)
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
        return code, psutil.wait_procs(seen, timeout=10)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for left in seen:  # what a failing script left behind: by its pid
            with contextlib.suppress(psutil.NoSuchProcess):
                left.kill()  # psutil checks that the pid is still this process
        for path in re.findall(kept, out.read_text()):
            shutil.rmtree(path, ignore_errors=True)


def run_script(argv: list[str], env: dict[str, str], timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(argv, capture_output=True, text=True)``, but in a
    session of its own, killed as a group when it times out (or the test
    is interrupted): ``subprocess.run`` kills the shell alone, and the CLI a
    hook's shell had started polled on, orphaned, until its own timeout."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as script:
        try:
            out, err = script.communicate(timeout=timeout)
        except BaseException:
            # Not reaped yet (communicate() did not return): the group's id
            # is still this shell's pid.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(script.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(argv, script.returncode, out, err)


def unshare_refused(flag: str, what: str) -> str | None:
    """Why ``unshare <flag>`` cannot make a namespace (``what``) here, or None:
    no unshare(1), not root, or the kernel refuses (a container without
    CAP_SYS_ADMIN). A test skips with that reason: the machine cannot."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return f"needs unshare(1) and root for a {what}"
    tried = subprocess.run(["unshare", flag, "-f", "true"], capture_output=True, text=True,
                           timeout=30)
    if tried.returncode != 0:
        return f"cannot make a {what} here: {tried.stderr.strip()}"
    return None


def free_port() -> int:
    """A port that is free now (for tests where a fresh bind must find the
    same port again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_of(st: Status) -> int:
    return int(st.listeners[0].address.rsplit(":", 1)[1])


class Procs:
    """Processes a test started; each is killed by pid at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(**extra)

    def spawn(self, label: str, argv: list[str], env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{label}-{len(self.procs)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, env=env or self.env(), stdout=fh,
                                    stderr=subprocess.STDOUT, **kwargs)
        self.procs.append((label, proc, log))
        return proc

    def sidecar(self, name: str, version: str, *, port: int = 0,
                args: tuple[str, ...] = (), **env: str) -> subprocess.Popen[bytes]:
        return self.spawn(version, [PY, str(SIDECAR), "--name", name, "--version", version,
                                    "--port", str(port), *args], self.env(**env))

    def faulty(self, name: str, version: str, fault: str, *, port: int = 0,
               args: tuple[str, ...] = (), **env: str) -> subprocess.Popen[bytes]:
        """The sample sidecar with one fault injected (tests/support/faulty.py)."""
        return self.spawn(f"{version}-{fault.replace(':', '-')}",
                          [PY, str(FAULTY), "--name", name, "--version", version,
                           "--port", str(port), *args],
                          self.env(HOTSWAP_TEST_FAULT=fault, **env))

    def tiny(self, name: str, version: str, port: int = 0, **env: str
             ) -> subprocess.Popen[bytes]:
        return self.spawn(version, [PY, str(TINY), "--name", name, "--version", version,
                                    "--port", str(port)], self.env(**env))

    def logs(self) -> str:
        return "\n".join(f"--- {label} pid {proc.pid} rc {proc.poll()}\n"
                         + log.read_text(errors="replace")[-4000:]
                         for label, proc, log in self.procs)

    def cleanup(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    manager = Procs(tmp_path)
    yield manager
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(manager.logs())
    manager.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def name() -> str:
    """A sidecar name no other test uses (its abstract control socket too)."""
    return f"t-{uuid.uuid4().hex[:12]}"


class Load:
    """The load generator process (bench/loadgen.py): keep-alive clients, the
    100 ms busybox client and new-connection clients; nothing retries."""

    def __init__(self, procs: Procs, port: int, *, keepalive: int, fresh: int,
                 interval: float, duration: float, busybox: int = 1,
                 timeout: float = 2.0) -> None:
        self.out = procs.tmp / f"load-{uuid.uuid4().hex[:6]}.json"
        self.proc = procs.spawn("load", [PY, str(LOADGEN), "--port", str(port),
                                         "--keepalive", str(keepalive),
                                         "--fresh", str(fresh), "--busybox", str(busybox),
                                         "--pace", str(interval),
                                         "--duration", str(duration), "--no-records",
                                         "--timeout", str(timeout),
                                         "--out", str(self.out)])
        self.duration = duration
        self.log = procs.procs[-1][2]
        wait_for(lambda: b"first response" in self.log.read_bytes(), 10,
                 "the load generator's first response")

    def last_round(self) -> dict[str, Any]:
        """Every client makes one more request, started from now on, then
        the load generator stops and reports."""
        self.proc.send_signal(signal.SIGUSR1)
        self.proc.wait(timeout=30)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        result: dict[str, Any] = json.loads(self.out.read_text())["summary"]
        # A client that died stopped sending: its missing requests would
        # read as nothing lost.
        assert not result.get("died"), result["died"]
        return result


@pytest.fixture
def load(procs: Procs) -> Callable[..., Load]:
    def start(port: int, *, keepalive: int = 4, fresh: int = 2, interval: float = 0.002,
              duration: float = 60.0, busybox: int = 1, timeout: float = 2.0) -> Load:
        """``timeout``: each request's, in seconds (a failure after it)."""
        return Load(procs, port, keepalive=keepalive, fresh=fresh, interval=interval,
                    duration=duration, busybox=busybox, timeout=timeout)
    return start


def serving(name: str, version: str, *, settled: bool = True) -> Callable[[], Status | None]:
    """Predicate: ``version`` serves ``name`` (and its predecessor is gone)."""
    def check() -> Status | None:
        st = status(name)
        if st is None or st.version != version or st.state != "serving":
            return None
        if settled and st.predecessor not in ("none", "gone"):
            return None
        return st
    return check
