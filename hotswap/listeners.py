"""Describe, validate, bind and adopt listening sockets.

Addresses are given as ``(host, port)`` for TCP/UDP (IPv6 when ``host``
contains ``:``), or a ``str`` path for a Unix stream socket (``"@name"`` or a
leading NUL for an abstract one). Every socket made or adopted here is
close-on-exec and non-blocking.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Mapping

from .errors import ListenerError
from .protocol import SocketInfo

log = logging.getLogger("hotswap")

Address = tuple[str, int] | str
"""``(host, port)`` or a Unix socket path (``"@name"`` for abstract)."""

_FAMILY_NAMES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6",
                 socket.AF_UNIX: "unix"}
_KIND_NAMES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram"}
_KINDS = {v: k for k, v in _KIND_NAMES.items()}


def format_address(family: int, raw: object) -> str:
    """Render a ``getsockname()`` result the way SocketInfo carries it."""
    if family == socket.AF_INET:
        assert isinstance(raw, tuple)
        return f"{raw[0]}:{raw[1]}"
    if family == socket.AF_INET6:
        assert isinstance(raw, tuple)
        return f"[{raw[0]}]:{raw[1]}"
    if isinstance(raw, bytes):  # abstract names come back as bytes
        return "@" + raw.lstrip(b"\0").decode("utf-8", "surrogateescape")
    assert isinstance(raw, str)
    return "@" + raw[1:] if raw.startswith("\0") else raw


def _unix_bind_name(path: str) -> str:
    return "\0" + path[1:] if path.startswith("@") else path


def describe(name: str, sock: socket.socket) -> SocketInfo:
    """What ``sock`` is, for the wire."""
    try:
        family = _FAMILY_NAMES[sock.family]
        kind = _KIND_NAMES[sock.type]
    except KeyError:
        raise ListenerError(f"{name}: unsupported socket {sock!r}") from None
    return SocketInfo(name=name, family=family, kind=kind,
                      address=format_address(sock.family, sock.getsockname()))


def wanted_info(name: str, address: Address, kind: str = "stream") -> SocketInfo:
    """The SocketInfo a listener bound to ``address`` would have (port 0 and
    ``::``/``0.0.0.0`` kept as given)."""
    if isinstance(address, str):
        shown = "@" + address[1:] if address.startswith("\0") else address
        return SocketInfo(name=name, family="unix", kind=kind, address=shown)
    host, port = address
    if ":" in host:
        return SocketInfo(name=name, family="inet6", kind=kind, address=f"[{host}]:{port}")
    return SocketInfo(name=name, family="inet", kind=kind, address=f"{host}:{port}")


def matches(have: SocketInfo, want: SocketInfo) -> bool:
    """Does an inherited socket satisfy a request? Port 0 matches any port."""
    if (have.family, have.kind) != (want.family, want.kind):
        return False
    if have.address == want.address:
        return True
    if want.family == "unix":
        return False
    want_host, _, want_port = want.address.rpartition(":")
    have_host, _, _ = have.address.rpartition(":")
    return want_port == "0" and want_host == have_host


def validate(sock: socket.socket, declared: SocketInfo) -> None:
    """Check an adopted descriptor against what the predecessor declared.

    Raises ListenerError if the family, type, listening state or bound address
    differ. Does not close ``sock``: the caller still owns it.
    """
    actual = describe(declared.name, sock)
    if (actual.family, actual.kind) != (declared.family, declared.kind):
        raise ListenerError(
            f"{declared.name}: declared {declared.family}/{declared.kind}, "
            f"descriptor is {actual.family}/{actual.kind}")
    if actual.address != declared.address:
        raise ListenerError(f"{declared.name}: declared {declared.address}, "
                            f"descriptor is bound to {actual.address}")
    if declared.kind == "stream" and not sock.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_ACCEPTCONN):
        raise ListenerError(f"{declared.name}: descriptor is not listening")


def adopt_fd(fd: int, declared: SocketInfo) -> socket.socket:
    """Wrap a received descriptor and validate it.

    Ownership: on success the returned socket owns ``fd``. On any error ``fd``
    is closed before raising, so the caller never has to.
    """
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISSOCK(mode):
            raise ListenerError(f"{declared.name}: descriptor is not a socket")
        sock = socket.socket(fileno=fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    try:
        validate(sock, declared)
        sock.set_inheritable(False)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def adopt_connection_fd(fd: int) -> socket.socket:
    """Wrap a received descriptor that must be a connected TCP stream socket.

    Ownership: on success the returned (non-blocking, close-on-exec) socket
    owns ``fd``; on any error ``fd`` is closed before raising ListenerError.
    """
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        sock = socket.socket(fileno=fd) if is_socket else None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise ListenerError(f"bad descriptor: {exc}") from exc
    if sock is None:
        os.close(fd)
        raise ListenerError("descriptor is not a socket")
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                  socket.AF_INET6):
            raise ListenerError(f"not a TCP stream socket: {sock!r}")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError("a listening socket, not a connection")
        sock.getpeername()
        sock.set_inheritable(False)
        sock.setblocking(False)
    except (OSError, ListenerError) as exc:
        sock.close()
        if isinstance(exc, ListenerError):
            raise
        raise ListenerError(f"not a connected socket: {exc}") from exc
    return sock


def bind(address: Address, *, kind: str = "stream", backlog: int = 1024,
         unix_mode: int | None = None) -> socket.socket:
    """Create, bind and (for stream) listen a new socket.

    TCP sockets get SO_REUSEADDR (never SO_REUSEPORT: two unrelated binds on
    one port is exactly what hotswap exists to avoid). ``unix_mode`` is applied
    to a filesystem Unix socket before ``listen()``, so nobody can connect
    while it is wider than asked. The caller owns the returned socket.
    Raises ListenerError (chained) if the address is taken or invalid.
    """
    sock_type = _KINDS[kind]
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, sock_type)
        target: str | tuple[str, int] = _unix_bind_name(address)
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, sock_type)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target = address
    try:
        sock.bind(target)
        if isinstance(target, str) and not target.startswith("\0") and unix_mode is not None:
            os.chmod(target, unix_mode)
        if sock_type == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind {address!r}: {exc}") from exc
    return sock


def systemd_sockets(env: Mapping[str, str], pid: int) -> dict[str, socket.socket]:
    """Sockets passed by systemd (``LISTEN_FDS``/``LISTEN_FDNAMES``), by name.

    Only honoured when ``LISTEN_PID`` is ``pid``. Unnamed ones are called
    ``fd3``, ``fd4``, ... The returned sockets are owned by the caller;
    descriptors that are not sockets are closed and skipped.
    """
    if env.get("LISTEN_PID") != str(pid):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        log.warning("ignoring malformed LISTEN_FDS=%r", env.get("LISTEN_FDS"))
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    found: dict[str, socket.socket] = {}
    for i in range(count):
        fd = 3 + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        sock.set_inheritable(False)
        sock.setblocking(False)
        if name in found:
            log.warning("duplicate LISTEN_FDNAMES entry %r; closing fd %d", name, fd)
            sock.close()
            continue
        found[name] = sock
    return found
