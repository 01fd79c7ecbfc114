"""Describe, validate, bind and adopt listening sockets.

Addresses are given as ``(host, port)`` for TCP/UDP (IPv6 when ``host``
contains ``:``), or a ``str`` path for a Unix socket, stream or datagram
(``"@name"`` or a leading NUL for an abstract one). Every socket made or adopted here is
close-on-exec and non-blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping

from .errors import ListenerError
from .protocol import MAX_SOCKET_NAME, SocketInfo

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
        return f"[{_scoped(str(raw[0]), raw[3] if len(raw) == 4 else 0)}]:{raw[1]}"
    if isinstance(raw, bytes):  # abstract names come back as bytes
        name = raw[1:] if raw.startswith(b"\0") else raw  # one NUL: the marker
        return "@" + name.decode("utf-8", "surrogateescape")
    assert isinstance(raw, str)
    return "@" + raw[1:] if raw.startswith("\0") else raw


def _scoped(host: str, scope_id: int) -> str:
    """An IPv6 address as text with its scope, ``fe80::1%eth0``, for an
    address that has one (link-local: the kernel keeps the scope of those
    only, and ``getsockname()`` gives it apart, as a number), else as it
    is. The interface by name where it has one, else its number."""
    ip = _ip(host)
    if not scope_id or not isinstance(ip, ipaddress.IPv6Address) or not (
            ip.is_link_local or (ip.is_multicast and (ip.packed[1] & 0x0F) <= 2)):
        return host
    try:
        return f"{host}%{socket.if_indextoname(scope_id)}"
    except OSError:
        return f"{host}%{scope_id}"


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


def _inet_family(host: str) -> int:
    """The family :func:`bind` uses for ``host``: IPv6 if it contains ``:``."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _address_problem(address: object, kind: str) -> str | None:
    """What makes ``address`` (and ``kind``) no :data:`Address` to listen
    on, or None."""
    if kind not in _KINDS:
        return f"the socket kind must be one of {sorted(_KINDS)}, not {kind!r}"
    if isinstance(address, str):
        try:
            os.fsencode(address)  # as bind() and the stale-path probe spell it
        except UnicodeError:
            return "a Unix socket path must be one os.fsencode() can encode"
        if "\0" in address and not address.startswith(("\0", "@")):
            return "a filesystem Unix socket path cannot contain a NUL"
        return None
    if isinstance(address, bytes):
        return "a Unix socket path must be a str, not bytes (os.fsdecode() it)"
    if not isinstance(address, tuple) or len(address) != 2:
        return "an address is a (host, port) tuple or a Unix socket path (str)"
    host, port = address
    if not isinstance(host, str):
        return ('the host must be a str ("" or "0.0.0.0" for every IPv4 address, '
                '"::" for every IPv6 one)')
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        return "the port must be an int from 0 to 65535 (0: any free port)"
    return None


def check_address(address: object, kind: str = "stream") -> None:
    """Raise ListenerError, saying what is wrong, unless ``address`` is an
    :data:`Address` and ``kind`` one hotswap binds: a ``(host, port)`` tuple
    with a ``str`` host and an ``int`` port from 0 to 65535, or a ``str``
    Unix socket path that ``os.fsencode()`` encodes (a NUL only in an
    abstract name). Nothing is resolved, created or bound."""
    why = _address_problem(address, kind)
    if why is not None:
        raise ListenerError(f"cannot listen on {address!r}: {why}")


def wanted_info(name: str, address: Address, kind: str = "stream") -> SocketInfo:
    """A request as a SocketInfo: the family and kind :func:`bind` would use,
    the address as given (``"localhost:80"``, ``":80"``, ``"[::0001]:80"``,
    port 0 kept). Nothing is resolved here: :func:`matches` canonicalises
    the address, and only when it has to. Raises ListenerError for an
    address that is none (see :func:`check_address`)."""
    try:
        check_address(address, kind)
    except ListenerError as exc:
        raise ListenerError(f"{name}: {exc}") from None
    if isinstance(address, str):
        shown = "@" + address[1:] if address.startswith("\0") else address
        return SocketInfo(name=name, family="unix", kind=kind, address=shown)
    host, port = address
    if _inet_family(host) == socket.AF_INET6:
        return SocketInfo(name=name, family="inet6", kind=kind, address=f"[{host}]:{port}")
    return SocketInfo(name=name, family="inet", kind=kind, address=f"{host}:{port}")


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _split_inet(address: str) -> tuple[str, str]:
    """``"host:port"`` or ``"[host]:port"`` into host and port (as text)."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _ip(text: str) -> _IP | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _bind_addresses(host: str, family: int) -> frozenset[_IP]:
    """The addresses ``bind((host, port))`` may bind ``host`` to, resolved
    the way CPython's ``socket.bind`` does it: ``""`` is the wildcard
    (0.0.0.0, or ``::`` on an IPv6 socket), ``"<broadcast>"`` is
    255.255.255.255, a numeric address is taken as it is (no lookup; so are
    ``"127.1"`` and a scope like ``%eth0``, by getaddrinfo, which does not
    look them up either), anything else is a host name resolved with
    ``getaddrinfo(host, None, family)``. ``bind`` binds the first result;
    every result is returned, so a name whose answers rotate (round-robin
    DNS) still matches what the predecessor bound it to.

    A host name is resolved by the system resolver, bounded by its own
    timeouts only (``/etc/hosts`` is instant; DNS may take
    ``timeout`` x ``attempts`` of resolv.conf), exactly as :func:`bind`
    would resolve it. Empty if ``host`` does not resolve in ``family`` (then
    ``bind`` fails too).
    """
    if host == "":
        return frozenset({ipaddress.ip_address("::" if family == socket.AF_INET6
                                               else "0.0.0.0")})
    if host == "<broadcast>" and family == socket.AF_INET:
        return frozenset({ipaddress.IPv4Address("255.255.255.255")})
    literal = _ip(host) if "%" not in host else None
    if literal is not None:
        wanted_version = 6 if family == socket.AF_INET6 else 4
        return frozenset({literal}) if literal.version == wanted_version else frozenset()
    # As socket.bind passes it: ASCII as it is, anything else IDNA-encoded
    # (socket.getaddrinfo would IDNA-encode ASCII too, and refuse names such
    # as "x..y" that bind hands to the resolver).
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    try:
        results = socket.getaddrinfo(name, None, family)
    except (OSError, UnicodeError):  # gaierror, or a name IDNA cannot encode
        return frozenset()
    found = {_ip(_scoped(str(sockaddr[0]), sockaddr[3] if len(sockaddr) == 4 else 0))
             for _, _, _, _, sockaddr in results}
    return frozenset(ip for ip in found if ip is not None)


def _unix_key(address: str) -> str | None:
    """What identifies a Unix socket address: an abstract name exactly, a
    filesystem path made absolute (relative to our working directory, as
    ``bind`` took it relative to the binding process's); None for ``""``
    (``bind("")`` autobinds a random abstract name, which nothing can ask
    for again)."""
    if address == "":
        return None
    if address.startswith("@"):
        return address
    return os.path.abspath(address)


def matches(have: SocketInfo, want: SocketInfo) -> bool:
    """Does an inherited socket ``have`` satisfy the request ``want`` (from
    :func:`wanted_info`)? True if ``have`` is what binding the request
    could have produced: same family and kind; port 0 matches any port;
    hosts compared as addresses, not text (``"localhost"`` is 127.0.0.1,
    ``""`` is 0.0.0.0, ``"::0001"`` is ``::1``), with host names resolved
    as :func:`bind` resolves them and matching any of their addresses (see
    :func:`_bind_addresses`); Unix paths compared made absolute, abstract
    names exactly; a link-local IPv6 address with its scope, the
    interface (by name or number: ``describe`` gives its name).

    Resolution happens only when the cheap checks (family, kind, port,
    identical text, numeric address) cannot decide, i.e. for a host name:
    then it may wait on the system resolver like :func:`bind` would (a
    listener that does not match is bound anew, which resolves the name
    anyway). Pass numeric addresses to never resolve anything.
    """
    if (have.family, have.kind) != (want.family, want.kind):
        return False
    if have.address == want.address:
        return True
    if want.family == "unix":
        key = _unix_key(want.address)
        return key is not None and key == _unix_key(have.address)
    have_host, have_port = _split_inet(have.address)
    want_host, want_port = _split_inet(want.address)
    if want_port not in ("0", have_port):
        return False
    if want_host == have_host:
        return True
    have_ip = _ip(have_host)
    if have_ip is None:  # not how describe() renders an address: no guessing
        return False
    family = socket.AF_INET6 if want.family == "inet6" else socket.AF_INET
    return have_ip in _bind_addresses(want_host, family)


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


def same_socket(a: socket.socket, b: socket.socket) -> bool:
    """Whether ``a`` and ``b`` are descriptors of one kernel socket (one
    passed or received copy of the other: the same inode). Never closes
    either; False if either is closed."""
    try:
        one, other = os.fstat(a.fileno()), os.fstat(b.fileno())
    except OSError:
        return False
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


def is_tcp(sock: socket.socket) -> bool:
    """Whether ``sock`` is a TCP stream socket (in any state)."""
    return sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                               socket.AF_INET6)


def is_tcp_stream(fd: int) -> bool:
    """Whether ``fd`` is a TCP stream socket (in any state). Never closes
    or keeps ``fd``."""
    try:
        probe = socket.socket(fileno=fd)  # ENOTSOCK if it is none
    except OSError:
        return False
    try:
        return is_tcp(probe)
    finally:
        probe.detach()


class ConnectionEnded(ListenerError):
    """A handed-over connection that its client reset before it was
    adopted: nothing to serve, and nothing lost."""


def adopt_connection_fd(fd: int) -> socket.socket:
    """Wrap a received descriptor that must be a connected TCP stream socket.

    Ownership: on success the returned (non-blocking, close-on-exec) socket
    owns ``fd``; on any error ``fd`` is closed before raising ListenerError
    (:class:`ConnectionEnded` if its client reset it meanwhile).
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
        if not is_tcp(sock):
            raise ListenerError(f"not a TCP stream socket: {sock!r}")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError("a listening socket, not a connection")
        sock.getpeername()
        sock.set_inheritable(False)
        sock.setblocking(False)
    except (OSError, ListenerError) as exc:
        reset = (isinstance(exc, OSError) and exc.errno == errno.ENOTCONN
                 and _pending_error(sock) == errno.ECONNRESET)
        sock.close()
        if isinstance(exc, ListenerError):
            raise
        if reset:
            raise ConnectionEnded("its client reset it before it was adopted") from exc
        raise ListenerError(f"not a connected socket: {exc}") from exc
    return sock


def _pending_error(sock: socket.socket) -> int:
    """The socket's pending error (``SO_ERROR``, which reading clears), 0
    if none or if it cannot be read."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return 0


DEFAULT_BACKLOG = 1024
"""The listen queue of a socket hotswap binds, and of the sites that serve
one (aiohttp's own default is 128)."""


def start_serving(server: asyncio.AbstractServer) -> None:
    """Make ``server``, made with ``start_serving=False``, accept from now
    on, before returning: its listening sockets are read from the event
    loop's next poll on, and nothing runs in between (no await). What
    :meth:`~hotswap.Upgrader.ready` does as it confirms a handover.

    ``await server.start_serving()`` would not do: on the stock loop it
    waits an iteration after adding its readers, time in which this process
    accepts while it may still back out of the handover. asyncio's
    ``Server`` starts with its own ``_start_serving()``; any other (uvloop's,
    whose ``start_serving()`` awaits nothing) by running its
    ``start_serving()`` coroutine to its end in one step. A server already
    serving is left as it is.

    Errors: ``sock.listen()``'s ``OSError`` (asyncio's; uvloop logs a
    failure to listen and closes that listener); a ``start_serving()``
    that would have to wait is a :class:`TypeError` (its coroutine is closed
    first); whatever else a server's ``start_serving()`` raises, as it is.
    The sockets stay the server's either way.
    """
    if server.is_serving():
        return
    start = getattr(server, "_start_serving", None)  # asyncio.base_events.Server
    if isinstance(server, asyncio.base_events.Server) and callable(start):
        start()
        return
    coro = server.start_serving()
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise TypeError(f"{server!r}: start_serving() waits for something; "
                    "hotswap needs a server it can start at once (asyncio's, uvloop's)")


async def close_server(server: asyncio.AbstractServer) -> None:
    """Stop an asyncio server accepting, without dropping a connection it
    has already accepted: use it instead of ``server.close()`` once
    :meth:`~hotswap.Upgrader.wait_exit` returns, before
    :meth:`~hotswap.Upgrader.release`.

    The stock (selector) event loop accepts a connection in one callback and
    attaches it to its server in a task that runs an iteration later; a
    server closed in between drops that connection unanswered (CPython
    3.11: an AssertionError in ``Server._attach``, logged only in debug
    mode; the client sees a reset or EOF). Under new-connection load that
    loses requests at every handover. So this stops reading the listening
    sockets first, lets those tasks run, then closes the server. uvloop
    attaches a connection as it accepts it: there it is ``server.close()``.

    Ownership: the server closes its listening sockets (this process's
    descriptors only; the successor's copies, and the kernel queue they
    share, live on). Connections already accepted stay open: draining them
    is the caller's. It does not wait for them (``wait_closed()`` does on
    Python 3.12 and later): call that, if at all, after your drain.
    Idempotent, and a server already closed is left as it is.

    A Unix socket's path stays too: from Python 3.13 on, a server made by
    ``asyncio.start_unix_server()``/``loop.create_unix_server()`` (stock
    loop and uvloop) removes its socket's file as it closes
    (``cleanup_socket=True``, the default; uvloop's on any Python when it
    is asked for), which would leave the successor listening on a socket no
    client can reach (ENOENT).
    """
    loop = asyncio.get_running_loop()
    listening = list(getattr(server, "sockets", None) or ())
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        for sock in listening:
            loop.remove_reader(sock.fileno())
        if listening:
            for _ in range(3):  # one iteration attaches them; the rest is margin
                await asyncio.sleep(0)
    close_at_once(server)


def close_at_once(server: asyncio.AbstractServer) -> None:
    """``server.close()``, keeping its Unix sockets' paths (see
    :func:`close_server`), in one step: for a server that has accepted
    nothing yet (started in this same step, before the loop polled), or
    once :func:`close_server` has let what it accepted attach."""
    loop = asyncio.get_running_loop()
    links = _keep_unix_paths(loop, list(getattr(server, "sockets", None) or ()))
    try:
        server.close()
    finally:
        for path, link in links:
            _put_back(path, link)


def _unix_path(sock: object) -> str | None:
    """The filesystem path of a Unix listening socket (None for an abstract
    name, an unnamed one, or another family)."""
    try:
        if getattr(sock, "family", None) != socket.AF_UNIX:
            return None
        name = sock.getsockname()  # type: ignore[attr-defined]
    except OSError:
        return None
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return name if isinstance(name, str) and name and not name.startswith("\0") else None


def _keep_unix_paths(loop: asyncio.AbstractEventLoop,
                     listening: list[object]) -> list[tuple[str, str]]:
    """Before ``server.close()``: stop it from removing its Unix sockets'
    files (Python 3.13's ``cleanup_socket``). The stock loop keeps the
    sockets to clean up in ``_unix_server_sockets``: theirs are taken out.
    Where that is out of reach (uvloop, which takes ``cleanup_socket=True``
    on every Python, its default from 3.13 on), each path gets a second
    name, a hard link to the same socket file, for :func:`_put_back`.
    Returns the (path, link) pairs."""
    paths = {}
    for sock in listening:
        path = _unix_path(sock)
        if path is not None:
            paths[sock.fileno()] = path  # type: ignore[attr-defined]
    if not paths:
        return []
    registry = getattr(loop, "_unix_server_sockets", None)
    if isinstance(registry, dict):
        for key in list(registry):
            with contextlib.suppress(OSError, AttributeError):
                if key.fileno() in paths:
                    del registry[key]
        return []
    if sys.version_info < (3, 13) and isinstance(loop, asyncio.BaseEventLoop):
        return []  # the stock loop removes nothing before 3.13; uvloop may, on any
    links = []
    for path in paths.values():
        link = f"{path}.hotswap-{os.getpid()}"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)  # a leftover of a process with our pid
            os.link(path, link)
        except OSError as exc:
            log.warning("cannot keep Unix socket path %s across the close (%s): "
                        "the event loop may remove it", path, exc)
            continue
        links.append((path, link))
    return links


def _put_back(path: str, link: str) -> None:
    """After ``server.close()``: the path again if the close removed it
    (the link is the same socket file), else the link removed."""
    try:
        if os.path.lexists(path):
            os.unlink(link)
        else:
            os.rename(link, path)
            log.info("Unix socket path %s removed by the event loop's close: put back", path)
    except OSError as exc:
        log.error("Unix socket path %s: could not put it back (%s)", path, exc)


def _stale_unix_socket(path: str, sock_type: int = socket.SOCK_STREAM) -> bool:
    """Whether ``path`` is a Unix socket file that nobody listens on (its
    process stopped or died: a path outlives its socket), probed with a
    socket of ``sock_type``, the type about to be bound there. A listener whose
    queue is full (EAGAIN: the probe never waits), a live socket of the
    other type (EPROTOTYPE), a symbolic link, or anything that is not a
    socket, does not count."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, sock_type)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def _scoped_sockaddr(host: str, port: int, sock_type: int) -> tuple[str, int, int, int]:
    """The IPv6 address ``bind((host, port))`` resolves ``host`` (one with
    a ``%scope``) to, the first getaddrinfo result as it does, with the
    scope id it drops. Raises OSError (gaierror) if it does not resolve."""
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    for _, _, _, _, sockaddr in socket.getaddrinfo(name, port, socket.AF_INET6, sock_type):
        assert len(sockaddr) == 4
        return str(sockaddr[0]), int(sockaddr[1]), int(sockaddr[2]), int(sockaddr[3])
    raise socket.gaierror(socket.EAI_NONAME, f"{host!r} does not resolve")


def bind(address: Address, *, kind: str = "stream", backlog: int = DEFAULT_BACKLOG,
         unix_mode: int | None = None) -> socket.socket:
    """Create, bind and (for stream) listen a new socket.

    TCP sockets get SO_REUSEADDR, so that a port whose last connections are
    still in TIME_WAIT binds again. UDP sockets do not: on Linux it lets
    UDP sockets share a port, and a second, unrelated bind would take the
    serving one's datagrams instead of failing with EADDRINUSE. Never
    SO_REUSEPORT: two unrelated binds on one port is exactly what hotswap
    exists to avoid. ``unix_mode`` is applied to a filesystem Unix socket
    before ``listen()``, so nobody can connect while it is wider than asked.
    A filesystem Unix socket (stream or datagram) whose path is left over
    from a process that stopped or died (nobody listens there) is removed
    first, as a fresh start must be able to bind it. That is not atomic: a
    socket another process has bound and not yet listens on looks dead too,
    and two processes that both found a path stale both remove it; so two
    processes binding one path at the same moment may both succeed, the
    first unreachable. Hotswap never binds a path its predecessor still
    listens on (the probe sees a listener); two fresh starts on one path are
    the caller's to avoid. The caller owns the returned socket.
    A host name is resolved by ``socket.bind`` (first getaddrinfo result in
    the socket's family, waiting on the system resolver as long as it takes;
    :func:`matches` resolves the same way); an IPv6 host with a scope
    (``"fe80::1%eth0"``) here, the same way, bound with its scope id (which
    ``socket.bind`` of a ``(host, port)`` pair sets to 0). Raises ListenerError (chained) if
    the address is taken or invalid, before creating a socket if it is no
    address at all (see :func:`check_address`).
    """
    why = _address_problem(address, kind)
    if why is not None:
        raise ListenerError(f"cannot bind {address!r}: {why}")
    sock_type = _KINDS[kind]
    if isinstance(address, str):
        path = _unix_bind_name(address)
        if not path.startswith("\0") and _stale_unix_socket(path, sock_type):
            log.info("removing stale Unix socket %s (nobody listens on it)", path)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            except OSError as exc:  # EPERM in a sticky directory, EROFS, ...
                raise ListenerError(f"cannot remove stale Unix socket {path}: {exc}") from exc
        sock = socket.socket(socket.AF_UNIX, sock_type)
        target: str | tuple[str, int] | tuple[str, int, int, int] = path
    else:
        family = _inet_family(address[0])
        sock = socket.socket(family, sock_type)
        if sock_type == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target = address
    try:
        if isinstance(target, tuple) and sock.family == socket.AF_INET6 and "%" in target[0]:
            # A scope (%eth0, %2): bind() of a (host, port) pair resolves it
            # and then sets the scope id to 0 (a link-local address: EINVAL).
            target = _scoped_sockaddr(target[0], target[1], sock_type)
        sock.bind(target)
        if isinstance(target, str) and not target.startswith("\0") and unix_mode is not None:
            os.chmod(target, unix_mode)
        if sock_type == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except (OSError, TypeError, ValueError, OverflowError) as exc:
        # TypeError: a host IDNA cannot encode; OverflowError: a port > 65535
        sock.close()
        raise ListenerError(f"cannot bind {address!r}: {exc}") from exc
    return sock


def systemd_sockets(env: Mapping[str, str], pid: int) -> dict[str, socket.socket]:
    """Sockets passed by systemd (``LISTEN_FDS``/``LISTEN_FDNAMES``), by name.

    Only honoured when ``LISTEN_PID`` is ``pid``. Unnamed ones are called
    ``fd3``, ``fd4``, ..., and so are one whose name is longer than a
    listener's may be (:data:`~hotswap.protocol.MAX_SOCKET_NAME`; systemd
    takes 255 characters), with a warning, and each after the first under one name
    (systemd gives every descriptor of a socket unit the unit's
    ``FileDescriptorName=``, so a unit with several Listen lines repeats
    it; :meth:`~hotswap.Upgrader.listen` finds those by address). A
    repeated name whose ``fdN`` is taken too is closed, with a warning.
    The returned sockets are owned by the caller (and made close-on-exec);
    descriptors that are not sockets are closed and skipped.

    Only descriptors that came across ``exec`` count: a launcher passes them
    without close-on-exec (systemd clears it), while everything this process
    opens itself is close-on-exec (Python's default), and so is each one
    taken here. A number past what the launcher passed (``LISTEN_FDS`` too
    high, a passed descriptor closed and its number reused, the environment
    read again by a second upgrader or after an ``exec`` of ourselves) is
    one of ours, the event loop's say: left alone, with a warning. Taking
    those closed the loop's epoll descriptor ("no socket") and its wake-up
    socket (an unclaimed listener). So are the launcher's own once a library
    in this process has taken them: libsystemd's ``sd_listen_fds()`` (and
    python-systemd's ``listen_fds()``, which calls it) marks every one it
    returns close-on-exec; its owner is then whoever called it, and a
    listener of that address binds anew (``EADDRINUSE`` while theirs is open).
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
    missing: list[int] = []  # said once each, not a line per descriptor
    ours: list[int] = []
    for i in range(count):
        fd = 3 + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        if len(name) > MAX_SOCKET_NAME:  # systemd takes up to 255 characters
            log.warning("LISTEN_FDNAMES entry %.40r... is longer than a listener name "
                        "(%d characters): fd %d is called fd%d", name, MAX_SOCKET_NAME,
                        fd, fd)
            name = f"fd{fd}"
        try:
            passed = os.get_inheritable(fd)
            if passed and not stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
                continue
        except OSError:  # closed
            missing.append(fd)
            continue
        if not passed:
            ours.append(fd)
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # a socket Python cannot wrap: passed to us, closed
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        sock.set_inheritable(False)
        sock.setblocking(False)
        if name in found:
            # One socket unit, several Listen lines: systemd names each of
            # its descriptors the same. Still a listener, found by address.
            if f"fd{fd}" in names or f"fd{fd}" in found:
                log.warning("duplicate LISTEN_FDNAMES entry %r; closing fd %d", name, fd)
                sock.close()
                continue
            name = f"fd{fd}"
        found[name] = sock
    if ours:
        log.warning("LISTEN_FDS=%d: %d descriptor(s) from fd %d on are close-on-exec, "
                    "so this process opened them (or took them already: "
                    "sd_listen_fds() marks the ones it returns so), not its launcher: "
                    "left alone", count, len(ours), ours[0])
    if missing:
        log.warning("LISTEN_FDS=%d: %d descriptor(s) from fd %d on are not open: "
                    "skipped", count, len(missing), missing[0])
    return found
