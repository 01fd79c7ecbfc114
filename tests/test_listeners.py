"""Binding, describing, validating and adopting sockets."""

from __future__ import annotations

import os
import socket
import stat

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
    abstract = bind("@hotswap-test-abstract")
    assert describe("c", abstract).address == "@hotswap-test-abstract"
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


def test_systemd_sockets_only_for_our_pid() -> None:
    assert systemd_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, os.getpid()) == {}
    assert systemd_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"},
                           os.getpid()) == {}
