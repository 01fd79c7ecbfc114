"""Where the control socket lives, and a client that asks it for status.

By default the control socket of a sidecar called ``NAME`` is the abstract Unix
name ``hotswap/NAME``: abstract names are scoped to the network namespace, so
every container of a pod sees it, and it vanishes with the last descriptor (no
stale files). A filesystem path (on a shared ``emptyDir``) can be configured
instead; it is created owner-only (0600).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Collection, Iterator, Mapping

from .errors import BrokenResourceError, HandoverRefused, HandoverTimeout, RemoteProtocolError
from .fdio import peer_credentials, recv_some
from .protocol import NEED_DATA, Connection, Message, Refused, Sender, Status, StatusRequest

# asyncio is imported inside the async functions: the CLI (a PostStart hook and
# a readiness probe, started on every upgrade) uses the blocking client below
# and starts twice as fast without it.

CONTROL_NAME = "hotswap.control"
"""The name under which the listening control socket travels."""

DEFAULT_TIMEOUT = 5.0

#: errno values of connect() that mean "nobody is serving there".
NOBODY_THERE = frozenset({errno.ECONNREFUSED, errno.ENOENT})


_SUN_PATH = 108
"""Bytes in a Unix socket address (``sun_path``), an abstract name's
leading NUL included."""


def control_address(name: str, path: str | None = None) -> str:
    """The control socket address: ``path`` if given, else ``@hotswap/<name>``.
    Raises ValueError if ``name`` has a ``/`` or a NUL, or if the address is
    too long for a Unix socket (it could never be bound or reached)."""
    if path:
        address = path
    elif not name or "/" in name or "\0" in name:
        raise ValueError(f"invalid sidecar name {name!r}")
    else:
        address = f"@hotswap/{name}"
    size = len(os.fsencode(sockaddr(address)))
    # A path needs its terminating NUL in sun_path too (Python refuses 108
    # bytes with "AF_UNIX path too long"); an abstract name does not.
    most = _SUN_PATH if address.startswith("@") else _SUN_PATH - 1
    if size > most:
        shown = address if len(address) <= 60 else address[:50] + "..."
        raise ValueError(f"control socket address {shown!r} is {size} bytes: too long "
                         f"for a Unix socket (at most {most})")
    return address


MARKER_REFRESH = 1.0
"""Seconds between two renewals of a serving marker."""


def serving_marker(name: str, rank: int, stamp: int) -> str:
    """``@hotswap/<name>/serving/<rank>/<stamp>``: an abstract name that the
    process serving ``name`` as Kruise version ``rank`` keeps bound (never
    listening) exactly while it accepts connections and means to go on
    (state ``serving``; ``handing-over`` until the successor confirms; as a
    successor, from the moment it begins confirming), renewed by its event
    loop every :data:`MARKER_REFRESH` seconds under the current Unix time
    ``stamp``. It shows in ``/proc/net/unix`` to every container of the pod
    and vanishes with the process, so the readiness probe
    (``scripts/probe.sh``) can read it without starting Python; a stale stamp
    means a loop that stopped running (or a forked child's inherited copy),
    and the probe asks the control socket instead. Not authenticated: any
    process in the pod's network namespace can bind such a name. Not used
    with a filesystem control socket."""
    control_address(name)  # the same validation
    return f"@hotswap/{name}/serving/{rank}/{stamp}"


MARKER_FRESH = 3.0
"""Seconds a serving marker's stamp counts as fresh, unless
:data:`MARKER_FRESH_ENV` says otherwise (``scripts/probe.sh`` and
``migrate.sh`` default to the same)."""

MARKER_FRESH_ENV = "HOTSWAP_MARKER_FRESH"


_SHELL_BLANKS = " \t\n\v\f\r"
"""What the shell's ``test`` skips around a number (C ``isspace``)."""

_SHELL_INT_MAX = 2**63 - 1
"""The largest number the shell's ``test`` takes (``intmax_t``)."""


def marker_fresh(env: Mapping[str, str]) -> float | None:
    """Seconds a serving marker counts as fresh, read from
    :data:`MARKER_FRESH_ENV` in ``env`` as the scripts' ``test -le`` reads
    it (``strtoimax``): unset or empty, :data:`MARKER_FRESH`; ASCII digits,
    blanks around them and a ``+`` allowed (`` 3``, ``+3``), that many
    seconds; anything else (``2.5``, ``-1``, ``abc``, past 64 bits) None:
    no marker counts, as the shell's test fails (or can hold for no
    stamp), and the control socket is asked instead. Raises nothing."""
    text = env.get(MARKER_FRESH_ENV, "")
    if not text:
        return MARKER_FRESH
    digits = text.strip(_SHELL_BLANKS)
    sign = digits[:1]
    if sign in ("+", "-"):
        digits = digits[1:]
    if not (digits.isascii() and digits.isdigit()):
        return None
    value = int(digits)
    if sign == "-":  # both ages -le a negative: no stamp is that fresh
        return 0.0 if value == 0 else None
    return float(value) if value <= _SHELL_INT_MAX else None


def marked_ranks(name: str, *, fresh: float = MARKER_FRESH,
                 now: float | None = None) -> frozenset[int]:
    """The Kruise versions whose serving marker (:func:`serving_marker`)
    for ``name`` is bound in this network namespace with a stamp within
    ``fresh`` seconds of ``now`` (default: the current Unix time in whole
    seconds, as ``date +%s`` reads it); what ``scripts/hotswap-marker.sh``
    reads, read the same way. Empty if ``/proc/net/unix`` cannot be read.
    Never raises for what it finds there: a name that does not parse is
    skipped."""
    prefix = serving_marker(name, 0, 0).rsplit("/", 2)[0] + "/"
    # Whole seconds, as the shell's look: to the microsecond, a marker
    # exactly ``fresh`` seconds old was stale here and fresh there.
    now = int(time.time()) if now is None else now
    try:
        # Bytes, decoded as the name was encoded (os.fsencode: bind() took
        # it so): read as ASCII, the marker of a NAME that is not (é...)
        # never matched, and the hook's last look at its deadline missed it.
        with open("/proc/net/unix", "rb") as table:
            lines = os.fsdecode(table.read()).split("\n")
    except OSError:
        return frozenset()
    ranks = set()
    for line in lines:
        # Its last field as the shell splits it (IFS: space, tab): not at
        # every character Python calls a blank (U+00A0, U+2028, \r), which
        # may be in a NAME the shell's look finds.
        path = line.replace("\t", " ").rsplit(" ", 1)[-1]
        if not path.startswith(prefix):
            continue
        rank, _, stamp = path[len(prefix):].partition("/")
        if not all(n.isascii() and n.isdigit() and (n == "0" or n[0] != "0")
                   for n in (rank, stamp)):
            continue  # as the shell: decimal, no leading zero
        if abs(now - int(stamp)) <= fresh:
            ranks.add(int(rank))
    return frozenset(ranks)


def sockaddr(address: str) -> str:
    """Turn ``@abstract`` into the leading-NUL form the kernel wants."""
    return "\0" + address[1:] if address.startswith("@") else address


async def connect(address: str, *, timeout: float) -> socket.socket:
    """Connect to a control socket. The caller owns the returned socket.

    Raises ConnectionRefusedError/FileNotFoundError (OSError) when nobody
    listens there, HandoverTimeout when its listen queue stayed full for
    ``timeout`` seconds (the process serving it does not accept: stopped or
    hung, or flooded).

    A Unix socket's connect() never goes "in progress": it succeeds, fails,
    or says EAGAIN when the listener's queue is full. The event loops take
    EAGAIN for "in progress", wait for writability and hand back a socket
    that is not connected, so this retries connect() itself
    (:func:`_connecting`).
    """
    import asyncio

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        for pause in _connecting(sock, address, timeout):
            await asyncio.sleep(pause)
    except BaseException:
        sock.close()
        raise
    return sock


def _connecting(sock: socket.socket, address: str, timeout: float) -> Iterator[float]:
    """Connect ``sock`` to ``address``, retrying while the listener's queue
    is full (connect() says EAGAIN): yields how long to wait before the next
    try (the caller sleeps its own way: :func:`connect` on the event loop,
    :func:`status_blocking` without one), and raises HandoverTimeout once
    ``timeout`` seconds have passed with the queue still full. Any other
    failure of connect() propagates; ``sock`` stays the caller's."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            sock.connect(sockaddr(address))
            return
        except BlockingIOError:  # EAGAIN: the queue is full for now
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandoverTimeout(
                    f"{address} accepted no connection within {timeout:.1f}s (its queue "
                    "is full: the process serving it is stopped or hung, or flooded)"
                ) from None
            yield min(delay, remaining)
            delay = min(delay * 2, 0.1)


MAX_UID = 2**32 - 2
"""The highest uid (``uid_t``; its -1 is no uid)."""

ALLOW_UIDS_ENV = "HOTSWAP_ALLOW_UIDS"
"""More uids the pod's hotswap processes trust (``uid,uid``): as a server,
whose requests it answers and to whom it hands over; as a client (the CLI),
whose answers it believes. Our own uid always."""


def allowed_uids(env: Mapping[str, str], extra: Collection[int] = ()) -> frozenset[int]:
    """Our uid, ``extra`` and the uids listed in ``env[ALLOW_UIDS_ENV]``
    (comma or blank separated). Raises ValueError naming the variable if it
    holds anything else, a uid out of range (0 to :data:`MAX_UID`) included."""
    raw = env.get(ALLOW_UIDS_ENV, "")
    try:
        listed = [int(uid) for uid in raw.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{ALLOW_UIDS_ENV}={raw!r} is not a list of uids") from None
    if any(not 0 <= uid <= MAX_UID for uid in listed):
        raise ValueError(f"{ALLOW_UIDS_ENV}={raw!r} is not a list of uids "
                         f"(0 to {MAX_UID})")
    return frozenset({os.getuid(), *extra, *listed})


def check_server(sock: socket.socket, address: str,
                 allowed_uids: Collection[int] | None = None) -> None:
    """Raise HandoverRefused (``forbidden``) unless the process at the other
    end of the connected ``sock`` runs as one of ``allowed_uids`` (default:
    our own uid), by SO_PEERCRED. An abstract name is first come, first
    served: any process of the network namespace could have bound it, and a
    status it gives is worth what its uid is. ``sock`` stays the caller's."""
    allowed = frozenset({os.getuid()}) if allowed_uids is None else allowed_uids
    pid, uid, _ = peer_credentials(sock)
    if uid not in allowed:
        raise HandoverRefused("forbidden", f"the process serving {address} "
                              f"(pid {pid}) runs as uid {uid}, not allowed")


async def query_status(address: str, *, timeout: float = DEFAULT_TIMEOUT,
                       allowed_uids: Collection[int] | None = None) -> Status:
    """Ask the process serving ``address`` who it is.

    Raises OSError if nobody listens, HandoverRefused if it refuses us (for
    example another uid) or if it runs as a uid not in ``allowed_uids``
    (default: ours; see :func:`check_server`), HotswapError subclasses on a
    broken or garbled reply or a timeout.
    """
    from .transport import Channel

    sock = await connect(address, timeout=timeout)
    channel = Channel(sock, Sender.CLIENT)
    try:
        check_server(sock, address, allowed_uids)
        reply = await channel.request(StatusRequest(), timeout=timeout)
    finally:
        channel.close()
    return _as_status(reply)


def status_blocking(address: str, *, timeout: float = DEFAULT_TIMEOUT,
                    allowed_uids: Collection[int] | None = None) -> Status:
    """:func:`query_status` without an event loop (for the CLI): the same
    sans-IO conversation over a blocking socket, all of it within ``timeout``.

    Raises OSError if nobody listens, HandoverRefused if refused or if the
    server's uid is not in ``allowed_uids`` (default: ours), HandoverTimeout
    after ``timeout`` (a listen queue that stays full included), other
    HotswapErrors on a broken or garbled reply.
    """
    deadline = time.monotonic() + timeout
    conn = Connection(Sender.CLIENT)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        for pause in _connecting(sock, address, timeout):
            time.sleep(pause)
        check_server(sock, address, allowed_uids)
        # A refused peer may find the answer waiting even if its send broke.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(conn.send(StatusRequest()))
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Message)
                reply = event
                break
            if conn.at_eof:
                raise BrokenResourceError("peer closed the control connection", eof=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandoverTimeout(f"no status from {address} within {timeout:.1f}s")
            sock.settimeout(remaining)
            try:
                data, fds = recv_some(sock)
            except TimeoutError:
                raise HandoverTimeout(
                    f"no status from {address} within {timeout:.1f}s") from None
            conn.receive_data(data, fds)
    finally:
        conn.close_fds()
        sock.close()
    return _as_status(reply)


def _as_status(reply: Message) -> Status:
    """The answer to a StatusRequest, or the error it stands for."""
    if isinstance(reply, Refused):
        raise HandoverRefused(reply.code, reply.reason)
    if not isinstance(reply, Status):
        raise RemoteProtocolError(f"expected a status, got {reply.TYPE!r}")
    return reply


def is_nobody_there(exc: BaseException) -> bool:
    """True for connect() errors that mean no process is serving."""
    return isinstance(exc, OSError) and exc.errno in NOBODY_THERE

