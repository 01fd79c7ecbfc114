"""Binding, describing, validating and adopting sockets."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hotswap.errors import ListenerError
from hotswap.listeners import adopt_fd, bind, describe, matches, systemd_sockets, wanted_info
from hotswap.protocol import SocketInfo


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_bind_and_describe_tcp_unix() -> None:
    tcp = bind(("127.0.0.1", 0))
    info = describe("http", tcp)
    assert info.family == "inet" and info.kind == "stream"
    assert info.address == f"127.0.0.1:{tcp.getsockname()[1]}"
    assert not tcp.get_inheritable()
    assert matches(info, wanted_info("http", ("127.0.0.1", 0)))
    assert not matches(info, wanted_info("http", ("127.0.0.2", 0)))
    tcp.close()
    name = f"@hotswap-test-abstract-{uuid.uuid4().hex}"
    abstract = bind(name)
    assert describe("c", abstract).address == name
    abstract.close()


def test_bind_ipv6_when_available() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        sock = bind(("::1", 0))
    except ListenerError as exc:
        pytest.skip(f"::1 not configured here: {exc}")
    assert describe("v6", sock).address.startswith("[::1]:")
    sock.close()


def test_filesystem_unix_socket_is_owner_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "ctl.sock")
    sock = bind(path, unix_mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sock.close()


def test_bind_conflict_is_a_clear_error() -> None:
    first = bind(("127.0.0.1", 0))
    with pytest.raises(ListenerError, match="cannot bind"):
        bind(first.getsockname())
    first.close()


def test_adopt_valid_listener() -> None:
    sock = bind(("127.0.0.1", 0))
    info = describe("http", sock)
    fd = os.dup(sock.fileno())
    adopted = adopt_fd(fd, info)
    assert adopted.fileno() == fd and not adopted.get_inheritable()
    adopted.close()
    sock.close()


@pytest.mark.parametrize("case", ["pipe", "not-listening", "wrong-address", "wrong-family"])
def test_adopt_rejects_and_closes(case: str) -> None:
    """Whatever is wrong, the received descriptor is closed, never leaked."""
    extra: list[int] = []
    if case == "pipe":
        fd, w = os.pipe()
        extra.append(w)
        declared = SocketInfo(name="x", family="inet", kind="stream", address="127.0.0.1:1")
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        if case != "not-listening":
            sock.listen()
        port = sock.getsockname()[1]
        address = f"127.0.0.1:{port + 1 if case == 'wrong-address' else port}"
        family = "inet6" if case == "wrong-family" else "inet"
        declared = SocketInfo(name="x", family=family, kind="stream", address=address)
        fd = sock.detach()
    with pytest.raises(ListenerError):
        adopt_fd(fd, declared)
    assert not is_open(fd)
    for other in extra:
        os.close(other)


SYSTEMD_CHILD = """
import asyncio, fcntl, json, os, socket, sys
import hotswap
# As systemd starts a service: the sockets at fds 3, 4, 5 (here a pipe at 4).
passed = [int(fd) for fd in sys.argv[1:4]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
for fd in passed:
    os.close(fd)
for target, fd in enumerate(high, 3):
    os.dup2(fd, target)
    os.close(fd)
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "3",
       "LISTEN_FDNAMES": "http:junk:admin"}

async def main():
    upg = hotswap.Upgrader(sys.argv[6], options=hotswap.Options(env=env))
    await upg.start()
    http = upg.listen("http", ("127.0.0.1", int(sys.argv[4])))
    admin = upg.listen("admin", sys.argv[5], kind="stream")
    await upg.ready()
    http.setblocking(True)
    http.settimeout(10)
    conn, _ = http.accept()
    conn.sendall(b"from the inherited listener")
    conn.close()
    print(json.dumps({"http": http.fileno(), "admin": admin.fileno()}))
    await upg.close()

asyncio.run(main())
"""


def test_systemd_sockets_are_adopted_by_name(tmp_path: Path) -> None:
    """Socket activation: a fresh start takes the listeners systemd passed
    (LISTEN_FDS at fds 3.., named by LISTEN_FDNAMES) instead of binding, in a
    real process started that way; a descriptor that is no socket is closed."""
    tcp = bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    path = str(tmp_path / "admin.sock")
    unix = bind(path)
    r, w = os.pipe()
    name = f"t-{uuid.uuid4().hex[:12]}"
    fds = (tcp.fileno(), r, unix.fileno())
    child = subprocess.Popen([sys.executable, "-c", SYSTEMD_CHILD, *map(str, fds), str(port),
                              path, name], pass_fds=fds, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for sock in (tcp, unix):
            sock.close()
        os.close(r)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(100) == b"from the inherited listener"
        # By now the child has started: it closed the pipe, the only reader.
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
        out, err = child.communicate(timeout=30)
    finally:
        os.close(w)
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert json.loads(out) == {"http": 3, "admin": 5}, err


def test_systemd_sockets_only_for_our_pid() -> None:
    assert systemd_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, os.getpid()) == {}
    assert systemd_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"},
                           os.getpid()) == {}
