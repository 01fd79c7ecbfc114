"""The Upgrader: the public lifecycle of a process that can be hot-upgraded.

Usage (see :mod:`hotswap.aiohttp` for an integration that does all of this)::

    upg = Upgrader("sidecar", version="v2")
    role = await upg.start()              # inherit from the running process, or not
    if role in (Role.PASSIVE, Role.EMPTY):
        await upg.wait_exit(); return     # never serve, never take sockets back
    sock = upg.listen("http", ("127.0.0.1", 9091))   # inherited, else bound
    server = ... a server on sock, made with start_serving=False ...
    await upg.ready(start_serving=[server])   # it accepts; predecessor stops
    reason = await upg.wait_exit()        # a successor took over, or stop asked
    ... stop accepting ...
    await upg.release()                   # tell the successor
    ... drain in-flight connections ...
    await upg.close(cut=n)                # done

Invariants kept here (see the package docs for the full list): the old process
keeps accepting until the successor confirmed; failure before confirmation
changes nothing; one handover at a time, and none while a predecessor still
drains; a lower Kruise version never takes over; peers are checked with
SO_PEERCRED (and a token when configured); every received descriptor is
adopted or closed; the control socket travels with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import hmac
import json
import logging
import math
import numbers
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import _proc, control, kruise, listeners
from ._record import replace
from .errors import (
    BrokenResourceError,
    HandoverFailed,
    HandoverRefused,
    HandoverTimeout,
    HotswapError,
    ListenerError,
    ProtocolError,
    RemoteProtocolError,
)
from .fdio import descriptor_room
from .kruise import Role
from .protocol import (
    MAX_CLIENT_FRAME,
    MAX_FDS_PER_FRAME,
    PROTOCOL_VERSION,
    STATUS_LISTENERS_BYTES,
    STATUS_MAX_LISTENERS,
    Abort,
    Accepting,
    Adopted,
    Connections,
    ConnInfo,
    Drained,
    Failed,
    Hello,
    Message,
    Refused,
    Released,
    Sender,
    SocketInfo,
    Sockets,
    Status,
    StatusRequest,
    Welcome,
    split_sockets,
)
from .protocol import State as Conversation
from .transport import Channel, close_fds, wake

log = logging.getLogger("hotswap")

_ACK = "connections-ack"  # capability: Adopted after each Connections frame
# Capability: a frame the successor refuses gets Abort(reason) before the
# channel ends, so the old side's log says why. Only to a predecessor that
# offered it: an older one reads an unknown message there as "no answer"
# and lets go of the frame the successor has just closed.
_REFUSAL = "connections-refusal"
_LAST_WORD = 0.1
"""Seconds the old side waits, after a frame's acknowledgement did not come
in time and it has said so, for the successor's last word on the frame (a
refusal decided before the successor saw ours keeps the frame)."""
_CONTROL_BACKLOG = 64
_CONTROL_LOCK_WAIT = 0.25
"""Seconds a start waits for its filesystem control socket's folder lock,
held by another process binding a socket there (see
:meth:`Upgrader._lock_control_dir`)."""
_CONTROL_CONNECTIONS = 16
"""Control connections handled at once (a probe, a hook, a successor: a few)."""
_EVICTION_LOG_EVERY = 10.0
"""Seconds between two log lines about control connections let go of,
peers refused for their uid, or control connections that failed (a flood
must not flood the log)."""
_CONTROL_FAILURES_AT_ONCE = 5
"""Failed control connections logged each in full before the rest of a
flood is counted (see :class:`_Throttled`): a client that misbehaves now
and then is seen whole."""


class _Throttled:
    """A warning about something a flood repeats (control connections let
    go of, peers of a uid not allowed, control connections that failed):
    the first ``burst`` written at once, one line each, then at most one
    line per :data:`_EVICTION_LOG_EVERY` seconds, with the count since the
    last line and the last occurrence's details; after a quiet spell that
    long, ``burst`` at once again. ``write(count, last)`` writes the line;
    :meth:`flush` writes one still held back (when the control server
    stops). Runs on the event loop."""

    def __init__(self, write: Callable[[int, tuple[object, ...]], None], burst: int = 1) -> None:
        self._write = write
        self._burst = burst
        self._count = 0
        self._last: tuple[object, ...] = ()
        self._window_at = -_EVICTION_LOG_EVERY  # loop time the current window began
        self._written = 0  # lines written in the current window
        self._timer: asyncio.TimerHandle | None = None

    def add(self, *last: object) -> bool:
        """Count one occurrence; True if the line written now names it,
        False if it is held back (counted in a later line)."""
        self._count += 1
        self._last = last
        loop = asyncio.get_running_loop()
        if loop.time() - self._window_at >= _EVICTION_LOG_EVERY:
            # A new window (a count a stalled loop's timer has not written
            # yet goes into this line).
            self._window_at, self._written = loop.time(), 0
        if self._written < self._burst:
            self._written += 1
            self._emit()
            return True
        if self._timer is None:
            self._timer = loop.call_at(self._window_at + _EVICTION_LOG_EVERY, self.flush)
        return False

    def flush(self) -> None:
        """Write the line for the occurrences held back, if any; the next
        window begins now, and holds back from its first occurrence on."""
        if self._emit():
            with contextlib.suppress(RuntimeError):  # no loop: nothing more to hold back
                self._window_at = asyncio.get_running_loop().time()
                self._written = self._burst

    def _emit(self) -> bool:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count, self._count = self._count, 0
        if count:
            self._write(count, self._last)
        return bool(count)


def _has_spoken(conn: socket.socket) -> bool:
    """Whether the control connection ``conn`` has bytes waiting to be
    read (a non-blocking peek that consumes nothing, and takes no
    descriptor): its peer has spoken, whatever its handler has read so far.
    False when nothing is there, and on any error (reset, closed)."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _no_room_to_serve(needed: int) -> str:
    """Why this process could not serve now for want of descriptors, or
    ``""``: it must be able to open ``needed`` more (the control socket's
    reserve, one connection to accept, and the serving marker when it binds
    one). Opens and closes them at once; raises nothing. Only a want of
    descriptors (EMFILE, ENFILE) counts: any other error (a seccomp profile
    that refuses eventfd) says nothing of them, and must not call every
    handover off."""
    opened: list[int] = []
    error = ""
    try:
        for _ in range(needed):
            opened.append(os.eventfd(0, os.EFD_CLOEXEC))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            error = exc.strerror or str(exc)
    finally:
        close_fds(opened)
    return f"{error} ({descriptor_room()})" if error else ""


def _peer_closed(exc: BaseException) -> bool:
    """Did a channel operation fail because the other end closed (EOF, EPIPE,
    ECONNRESET), rather than for a reason of ours or of the kernel's? Both
    sides of an acknowledged connection handover decide by this alone."""
    return isinstance(exc, BrokenResourceError) and (
        exc.eof or isinstance(exc.__cause__, (BrokenPipeError, ConnectionResetError)))


DEFAULT_HANDOVER_TIMEOUT = 30.0
"""Seconds the old process waits for a successor to confirm."""
DEFAULT_CONNECT_TIMEOUT = 30.0
"""Seconds a successor keeps trying while the serving process is busy (see
:attr:`Options.connect_timeout`)."""
DEFAULT_MESSAGE_TIMEOUT = 5.0
"""Seconds either side waits for one expected message (hello, release, ...)."""
DEFAULT_PREDECESSOR_DRAIN_TIMEOUT = 60.0
"""Seconds a new process refuses further upgrades while its predecessor drains."""
MAX_VERSION_BYTES = 4096
"""The longest version string, in bytes as sent (JSON: a non-ASCII character
is 6, or 12 beyond the BMP): a successor's hello carries it, with the token,
in one frame of at most :data:`~hotswap.protocol.MAX_CLIENT_FRAME` bytes."""
MAX_TOKEN_BYTES = 4096
"""The longest token, counted alike (see :data:`MAX_VERSION_BYTES`)."""


async def _accept(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                  make_room: Callable[[], Awaitable[None]] | None = None) -> socket.socket:
    """Accept one connection on the non-blocking ``sock``; the caller owns
    it. The accept runs in the awaiting task's own step, so a cancellation
    comes either before it (the connection stays in the kernel's queue, for
    whoever holds the socket next: our successor has a copy) or after it has
    been returned. ``loop.sock_accept`` accepts in a loop callback instead,
    and loses the connection if the task is cancelled before it resumes.
    So does a caller that awaits anything between the accept and handing
    the connection on: what it must wait for first (``make_room``: a slot
    for the connection) is awaited here, once the socket is readable and
    before the accept.

    It accepts only once the socket is readable: at the descriptor limit,
    Linux fails an accept with EMFILE before it looks at the queue, so an
    accept tried on an empty queue would report a limit nobody needs yet."""
    fd = sock.fileno()
    while True:
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, wake, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        if make_room is not None:
            await make_room()
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another holder of the socket (our successor) took it
        conn.setblocking(False)
        return conn


def is_seconds(value: object, *, zero_ok: bool = True) -> bool:
    """Whether ``value`` is a timeout: a real number (not a bool), finite,
    above 0 (or 0 too, with ``zero_ok``). ``Options`` and
    :func:`hotswap.aiohttp.serve` check theirs with it up front."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    seconds = float(value)
    return math.isfinite(seconds) and (seconds > 0 or (zero_ok and seconds == 0))


def _check_text(what: str, value: object, limit: int) -> None:
    """Raise ValueError unless ``value`` is a str that fits in ``limit``
    bytes as the protocol sends it (a longer one got every upgrade refused:
    the hello that carries it was too long a frame)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    size = len(json.dumps(value)) - 2
    if size > limit:
        raise ValueError(f"{what} is too long: {len(value)} characters, {size} bytes as "
                         f"sent; at most {limit} (a successor's hello carries it in "
                         f"a frame of at most {MAX_CLIENT_FRAME} bytes)")


class ExitReason(enum.Enum):
    """Why :meth:`Upgrader.wait_exit` returned."""

    TAKEN_OVER = "taken-over"
    """A successor confirmed it is accepting: stop accepting and drain."""
    STOP_REQUESTED = "stop-requested"
    """:meth:`Upgrader.request_stop` was called (SIGTERM, usually), or
    :meth:`Upgrader.close`; also a successor's :meth:`Upgrader.ready` that
    called the handover off instead (its PostStart hook gave up, a server
    could not start, no descriptor left to accept with): the predecessor
    serves on."""
    HANDOVER_FAILED = "handover-failed"
    """We were the successor and the predecessor abandoned the handover as
    we confirmed (its ``Failed``, or a reply that broke the protocol): step
    down (stop accepting, drain what our servers took, exit non-zero).
    Servers given to ``ready(start_serving=...)`` accept only if that
    ``Failed`` crossed our confirmation; one that came before it starts
    none."""


class State(enum.Enum):
    STARTING = "starting"
    TAKING_OVER = "taking-over"
    SERVING = "serving"
    HANDING_OVER = "handing-over"
    DRAINING = "draining"
    PASSIVE = "passive"
    STOPPED = "stopped"


@dataclass
class _Listener:
    info: SocketInfo
    sock: socket.socket


class _ControlInUse(ListenerError):
    """Another process holds the control socket's address (it serves, or is
    starting to)."""


@dataclass
class Options:
    """Upgrader settings; every one has a default that fits a Kruise pod."""

    control_path: str | None = None
    """Filesystem path of the control socket; default abstract ``hotswap/NAME``."""
    allowed_uids: frozenset[int] | None = None
    """Peer uids allowed on the control socket (to ask for status, to take
    the sockets, to be believed as the serving process); default: our own
    uid and those in ``env["HOTSWAP_ALLOW_UIDS"]`` (``uid,uid``)."""
    token: str = ""
    """Shared secret a successor must present (empty: not required)."""
    handover_timeout: float = DEFAULT_HANDOVER_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    """Seconds a successor retries while the serving process refuses it as
    busy, goes away mid-handshake, or gave up on its connection before the
    hello came (refused ``timeout``: the successor was stopped or starved
    after connecting; nothing was taken). A try begun within it runs to its
    end (each step within ``message_timeout``). A hello not answered within
    ``message_timeout`` is not retried (:class:`~hotswap.errors.HandoverTimeout`
    out of :meth:`Upgrader.start`, nothing taken): the control server runs
    beside the traffic, so that process's loop did not run for that long
    (stopped, hung) or it is no hotswap process; a restart tries again."""
    message_timeout: float = DEFAULT_MESSAGE_TIMEOUT
    predecessor_drain_timeout: float = DEFAULT_PREDECESSOR_DRAIN_TIMEOUT
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def __post_init__(self) -> None:
        """Every timeout is a finite number of seconds, above 0 (at 0 or
        below nothing could ever arrive in time; NaN compares as neither),
        except ``connect_timeout``, which may be 0 (one attempt, no retry
        while the serving process is busy). Raises ValueError naming the
        field: a bad value would otherwise fail only at the first upgrade.
        ``token``: at most :data:`MAX_TOKEN_BYTES`, a ValueError too."""
        _check_text("Options.token", self.token, MAX_TOKEN_BYTES)
        for name, zero_ok in (("handover_timeout", False), ("connect_timeout", True),
                              ("message_timeout", False),
                              ("predecessor_drain_timeout", False)):
            value = getattr(self, name)
            if not is_seconds(value, zero_ok=zero_ok):
                raise ValueError(f"Options.{name}={value!r} is not a finite number of "
                                 f"seconds {'>= 0' if zero_ok else '> 0'}")


class Upgrader:
    """Hands this process's listening sockets to its successor, and takes them
    from its predecessor.

    Resource handling: sockets returned by :meth:`listen` are owned by the
    caller, who usually gives them to a server (which then closes them when it
    stops). The Upgrader keeps a reference to send them to a successor and
    closes any still open in :meth:`release`; one the caller closes (a server
    stopped for good) is forgotten, with a warning, and left out of later
    handovers. Inherited sockets nobody claimed are closed in :meth:`ready`.
    The control sockets are the Upgrader's own.

    Error handling: the constructor raises ValueError for a name or
    ``control_path`` that is no control socket address (a ``/`` in the name,
    too long for a Unix socket) and for a version too long for the hello, and
    :class:`~hotswap.errors.HotswapError` for a malformed
    ``SIDECARSET_VERSION``/``SIDECARSET_VERSION_ALT`` or
    ``HOTSWAP_ALLOW_UIDS`` in the environment it reads (``Options.env``).
    :meth:`start` raises :class:`~hotswap.errors.HandoverRefused`
    or :class:`~hotswap.errors.HandoverFailed` (a hello not answered in time:
    :class:`~hotswap.errors.HandoverTimeout`) when taking over fails; nothing
    is half-adopted (every received descriptor is closed first). Errors caused
    by a successor never reach the caller: they are logged and the process
    goes on serving.
    """

    def __init__(self, name: str, *, version: str = "",
                 options: Options | None = None) -> None:
        _check_text("version", version, MAX_VERSION_BYTES)
        self.name = name
        self.version = version
        self.options = options or Options()
        self.address = control.control_address(name, self.options.control_path)
        env = self.options.env
        self.versions = kruise.detect(env)
        # What counts as this run's PostStart hook (kruise.hook_gave_up):
        # read by start() for a Kruise takeover only, before its hello.
        self._started_at = 0.0
        self.role: Role | None = None
        self.state = State.STARTING
        self.generation = 0
        self.pid = os.getpid()
        if self.options.allowed_uids is not None:
            self._allowed_uids = self.options.allowed_uids
        else:
            try:
                self._allowed_uids = control.allowed_uids(env)
            except ValueError as exc:
                raise HotswapError(str(exc)) from None
        self._listeners: dict[str, _Listener] = {}
        self._inherited: dict[str, _Listener] = {}
        self._control_sock: socket.socket | None = None
        self._marker: socket.socket | None = None
        self._marker_name = ""
        self._marker_warned = False
        self._marker_timer: asyncio.TimerHandle | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # Control connections whose first message has not come in yet (their
        # handler's task, their socket), in the order they were accepted: the
        # ones to let go when all slots are taken (see _accept_control).
        self._silent: dict[asyncio.Task[None], socket.socket] = {}
        self._predecessor = "none"  # none | accepting | draining | gone
        self._taken_from = ""  # what the handshake received, for the log
        self._hello_sent_at = 0.0  # wall clock, for the benchmark's critical section
        self._reserve: int | None = None  # see _accept_control
        # Control peers refused for their uid: one line, then a count (a
        # process of any uid connecting in a loop cannot flood the log).
        self._refused = _Throttled(self._log_refused)
        # Control connections of allowed peers that failed (garbage, a wrong
        # order, a peer that stalled): the same, so that a process of an
        # allowed uid connecting in a loop cannot flood it either.
        self._garbled = _Throttled(self._log_garbled, burst=_CONTROL_FAILURES_AT_ONCE)
        # Successors refused for good (token, protocol, rank): the same; each
        # is told why, and says so itself.
        self._refused_hellos = _Throttled(self._log_refused_hello,
                                          burst=_CONTROL_FAILURES_AT_ONCE)
        # The successor last refused as busy (it retries until we are not):
        # said once at INFO, its retries at DEBUG (see _converse()).
        self._busy_refused: int | None = None
        self._predecessor_channel: Channel | None = None
        self._predecessor_task: asyncio.Task[None] | None = None
        # ready()'s confirmation, once it has begun: it runs to its end even
        # if ready() is cancelled, and close() waits for it (see ready()).
        self._confirming: asyncio.Task[None] | None = None
        self._accepting_sent = False  # the confirmation has sent Accepting
        # The task whose ready() made the confirmation, and its count of
        # cancellation requests then (see _confirm).
        self._confirm_caller: tuple[asyncio.Task[Any] | None, int] = (None, 0)
        # Servers ready() starts once this process commits (see ready()).
        self._to_serve: list[asyncio.AbstractServer] = []
        # Inherited stream listeners to listen again with the backlog
        # listen() was given, by name: in a takeover, as it commits (see
        # listen() and _listen_again()).
        self._backlogs: dict[str, tuple[socket.socket, int]] = {}
        self._successor: Channel | None = None
        self._exit: asyncio.Future[ExitReason] | None = None
        self._stop_requested = False
        self._released = False
        self._closed = False  # close() was called (it may still be running)
        self._closing: asyncio.Future[None] | None = None  # close() at work
        # The task of hotswap.aiohttp.serve() running on us (see close()).
        self._run_by: asyncio.Task[Any] | None = None
        self._starting: asyncio.Future[None] | None = None  # start() at work
        self._wake = asyncio.Event()  # set by close(): start() stops retrying
        self._stop_event = asyncio.Event()  # see wait_stop_requested()
        self._handover_times: tuple[float, float] | None = None
        self._adopter: Callable[[str, socket.socket], None] | None = None
        self._successor_caps: frozenset[str] = frozenset()
        self._predecessor_acks = False  # it waits for Adopted after Connections
        self._predecessor_hears_refusals = False  # it reads Abort(reason) there
        self._renamed: dict[str, str] = {}  # predecessor's listener name -> ours
        self._set_title()

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> Role:
        """Decide this process's role and, when taking over, adopt the sockets.

        Returns the role. For PASSIVE and EMPTY nothing is bound or taken;
        call :meth:`wait_exit`. A Kruise PASSIVE slot (``VERSION <= ALT``)
        that finds nobody serving (nobody holds the control socket) binds
        instead, and returns FRESH: an old slot restarted while the newer
        version is down serves until that one takes over. For FRESH the
        control socket is bound (a ListenerError if someone else holds it).
        For TAKEOVER/AUTO the predecessor's sockets are received and
        validated; :meth:`listen` then returns them by name; with nobody
        serving they bind fresh (taking over after all from one that binds
        the control socket in between, within ``connect_timeout``).

        A :meth:`close` meanwhile stops it at its next step: it raises
        HandoverFailed, and whatever it had taken is given back (the
        predecessor serves on).
        """
        if self._closed:
            raise HotswapError("start() after close()")
        if self._exit is not None:
            raise HotswapError("start() called twice")
        self._exit = asyncio.get_running_loop().create_future()
        if self._stop_requested:  # asked before there was a future to tell
            self._finish(ExitReason.STOP_REQUESTED)
        role = self.versions.role
        if role is Role.PASSIVE and not self._stop_requested and self._stand_in():
            role = Role.FRESH
        if role in (Role.PASSIVE, Role.EMPTY):
            log.info("%s: role %s (version %s, other slot %s): not serving",
                     self.name, role.value, self.versions.rank, self.versions.alt)
            self._set_state(State.PASSIVE)
            self.role = role
            return role
        if role is Role.FRESH:
            if self._control_sock is None:  # else bound by _stand_in()
                self._start_fresh()
            self.role = role
            return role
        self._starting = asyncio.get_running_loop().create_future()
        if self.versions.rank is not None:
            self._started_at = _proc.started_at()
        try:
            took_over = await self._take_over_or_bind(required=role is Role.TAKEOVER)
            if self._closed:
                # close() waits for this, then gives back what was taken
                # (Abort: the predecessor serves on) and closes the rest.
                raise HandoverFailed(
                    "closed while starting: " + ("what was taken goes back, the "
                                                 "predecessor serves on" if took_over
                                                 else "nothing was taken over"))
        finally:
            self._starting.set_result(None)
        if not took_over:
            role = Role.FRESH
        else:
            role = Role.TAKEOVER
            self._add_launcher_sockets()
        self.role = role
        return role

    def _stand_in(self) -> bool:
        """A passive slot (``VERSION <= ALT``) that finds nobody serving binds
        the control socket, as a fresh start: rather than leave the pod with
        no acceptor until the newer version (crashed before confirming, or
        not started yet: its image still being pulled, say) starts, and
        takes over from it as from any older version. True if it bound it.
        Whoever holds the control socket serves (or is starting to): then it
        stays passive, and never takes sockets back from a newer version. So
        it does on any other error binding it (logged)."""
        try:
            self._start_fresh()
        except _ControlInUse:
            return False
        except ListenerError as exc:
            log.warning("%s: passive, and cannot bind %s to stand in: %s", self.name,
                        self.address, exc)
            return False
        log.warning("%s: role passive (version %s, other slot %s), but nobody serves "
                    "%s: serving until a newer version takes over", self.name,
                    self.versions.rank, self.versions.alt, self.address)
        return True

    async def _take_over_or_bind(self, *, required: bool) -> bool:
        """Take over (True), else bind fresh (False). A process that binds
        the control socket between our finding nobody there and our binding
        it (a fresh start beside ours: a passive slot standing in, or a
        launcher starting two) is taken over from, within
        ``connect_timeout``; after that its ListenerError is raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.connect_timeout
        while True:
            if await self._take_over(required=required):
                return True
            try:
                self._start_fresh()
                return False
            except _ControlInUse:
                if self._stop_requested or self._closed:  # as _take_over() says it
                    raise HandoverFailed(("closed" if self._closed else "stop requested")
                                         + " before taking over; nothing was taken") from None
                if loop.time() > deadline:
                    raise
                log.info("%s: another process bound %s first: taking over from it",
                         self.name, self.address)
            with contextlib.suppress(TimeoutError):  # close() cuts the wait short
                async with asyncio.timeout(0.05):
                    await self._wake.wait()

    def listen(self, name: str, address: listeners.Address, *, kind: str = "stream",
               backlog: int | None = None) -> socket.socket:
        """Return the listener called ``name``: inherited if the predecessor
        had one with that name and a matching address (port 0 matches any
        port; hosts compare as addresses, so ``"localhost"`` matches
        ``127.0.0.1``, resolved like ``bind`` would: see
        :func:`hotswap.listeners.matches`), else inherited if one it had under
        another name is at that very address (a renamed or swapped listener:
        binding it anew would fail, the predecessor still holds it; not for
        port 0), else newly bound. A stream listener bound anew listens with
        ``backlog`` (by default :data:`~hotswap.listeners.DEFAULT_BACKLOG`,
        1,024); an inherited one keeps its queue unless ``backlog`` is
        given: then its queue is resized, what it holds kept, in a takeover
        only in the step that confirms it (the queue is the predecessor's
        too: a handover that fails leaves it as it was), before the servers
        :meth:`ready` starts listen again with theirs; a failure to is
        logged, and it keeps its queue. (Given, it also wins over the
        backlog of a server started on the socket before :meth:`ready`,
        which listened first; not given, such a server's wins, as it always
        did.) An
        inherited listener that no call claims is closed by :meth:`ready`.
        ``kind``: ``"stream"`` (TCP, a Unix stream socket) or ``"dgram"``
        (UDP, a Unix datagram socket; a UDP one is bound without
        ``SO_REUSEADDR``, see :func:`hotswap.listeners.bind`).

        Ownership passes to the caller (see the class docstring). An
        inherited listener shares its open file, and so its ``O_NONBLOCK``,
        with the predecessor's copy: keep it non-blocking (``settimeout()``
        does), or the predecessor's loop blocks in ``accept()``. Raises
        ListenerError if a stream listener's ``backlog`` is no listen
        queue's length (an int ``sock.listen()`` takes), if ``address`` is
        none, is to be bound and is that of a listener this process has
        already (under another name), or binding fails (on a fresh start,
        an address in use says that nobody served this name), HotswapError
        if ``name`` is taken or :meth:`start` has not returned yet (nothing
        is inherited before it: a bind then fails once a predecessor holds
        the address); nothing is bound then.
        """
        if self._closed:
            raise HotswapError("listen() after close()")
        closed = self._listeners.get(name)
        if closed is not None and closed.sock.fileno() == -1:
            self._forget_closed_listeners()  # the app closed it: the name is free
        if name == control.CONTROL_NAME or name in self._listeners:
            raise HotswapError(f"listener name {name!r} already in use")
        if self.state not in (State.STARTING, State.TAKING_OVER, State.SERVING):
            raise HotswapError(f"cannot listen in state {self.state.value}")
        want = listeners.wanted_info(name, address, kind)
        if kind == "stream" and backlog is not None and not (
                isinstance(backlog, int) and -2**31 <= backlog < 2**31):
            # What sock.listen() takes (a C int). Refused here, not only by a
            # bind anew: an inherited listener is given it as the successor
            # confirms, and a TypeError or OverflowError there failed the
            # confirmation (every later ready() raised it again).
            raise ListenerError(f"{name}: the backlog must be an int (a listen queue's "
                                f"length), not {backlog!r}")
        if self._exit is None or (self._starting is not None and not self._starting.done()):
            # Nothing inherited yet: binding now works on a fresh start and
            # fails with EADDRINUSE at the first upgrade (the predecessor
            # holds the address), an error that names the wrong cause.
            raise HotswapError(f"listen({name!r}) before start() returned: call "
                               "start() first, it receives the predecessor's listeners")
        got = self._inherited.get(name)
        if got is None or not listeners.matches(got.info, want):
            stale, got = got, self._inherited_at(want)
            if stale is not None and got is None:
                have, asked = stale.info.address, want.address
                if stale.info.kind != want.kind:  # one address, a TCP and a UDP port
                    have, asked = f"{stale.info.kind} {have}", f"{want.kind} {asked}"
                log.warning("%s: inherited %s is %s, asked for %s: binding anew",
                            self.name, name, have, asked)
        if got is not None:
            if kind == "stream" and backlog is not None:
                # The queue this version asks for, as a fresh bind would
                # give it (the kernel only resizes it: nothing queued is
                # lost). In a takeover, only in the step that confirms it:
                # the queue is the predecessor's too, and a handover that
                # fails must leave it as it was.
                self._backlogs[name] = (got.sock, backlog)
                if self.state is not State.TAKING_OVER:
                    self._listen_again()
            del self._inherited[got.info.name]
            if got.info.name != name:
                log.info("%s: inherited %s %s as %s", self.name, got.info.name,
                         got.info.address, name)
                self._renamed[got.info.name] = name
                got = _Listener(replace(got.info, name=name), got.sock)
            self._listeners[name] = got
            return got.sock
        if want.family == "unix" or not want.address.endswith(":0"):
            # Binding would fail (and probe a Unix path first, queueing an
            # empty connection there). Two listeners at one address, a
            # launcher's SO_REUSEPORT group, are inherited above.
            # The port compared first, as text: matches() for each listener
            # made 1,000 listens on a fresh start take 0.35 s, not 0.04.
            port = "" if want.family == "unix" else ":" + want.address.rsplit(":", 1)[1]
            holders = [e for e in self._listeners.values()
                       if e.info.address.endswith(port) and listeners.matches(e.info, want)]
            if any(e.sock.fileno() == -1 for e in holders):
                # One the app closed holds it no more: forgotten (warned)
                # here too, not only once a status query or a handover came.
                self._forget_closed_listeners()
            holder = next((e.info.name for e in holders if e.sock.fileno() != -1), None)
            if holder is not None:
                raise ListenerError(f"{name}: {want.address} is the address of "
                                    f"listener {holder!r} of this process already")
        queue = listeners.DEFAULT_BACKLOG if backlog is None else backlog
        try:
            sock = listeners.bind(address, kind=kind, backlog=queue)
        except ListenerError as exc:
            stale = self._inherited.pop(name, None)
            if stale is None:
                cause = exc.__cause__
                if (self.role is Role.FRESH and isinstance(cause, OSError)
                        and cause.errno == errno.EADDRINUSE):
                    # A name that differs from the serving version's (a typo,
                    # a renamed sidecar) ends here too: say where we looked.
                    raise ListenerError(
                        f"{exc} (no process served {self.address} to take it over "
                        "from: another program holds it, or a version that runs "
                        "under another name)") from cause
                raise
            # Our own unclaimed copy may be what holds an overlapping address
            # (0.0.0.0 and 127.0.0.1 of one port), when nobody else does.
            stale.sock.close()
            sock = listeners.bind(address, kind=kind, backlog=queue)
        info = listeners.describe(name, sock)
        log.info("%s: bound %s %s", self.name, name, info.address)
        self._listeners[name] = _Listener(info, sock)
        return sock

    def _inherited_at(self, want: SocketInfo) -> _Listener | None:
        """The unclaimed inherited listener at exactly the address of
        ``want``, whatever its name (not for port 0: any port is no
        address)."""
        if want.family != "unix" and want.address.endswith(":0"):
            return None
        return next((e for e in self._inherited.values()
                     if listeners.matches(e.info, want)), None)

    async def ready(self, *,
                    start_serving: Iterable[asyncio.AbstractServer] = ()) -> None:
        """Declare that every listener is accepting, or is about to: the
        servers in ``start_serving`` (made with ``start_serving=False``:
        ``asyncio.start_server(..., start_serving=False)``, asyncio's or
        uvloop's loop) start accepting here. As a successor, they start in
        the very step that sends the confirmation, after the last check
        that could call the handover off and before the predecessor can
        stop accepting: never a moment with nobody accepting, and nothing
        accepted by a process that may still back out (one killed, stopped
        or aborting before that leaves every queued connection to the
        predecessor). On a fresh start they start at once. A server started
        before (the way before this argument) works too, as it always did,
        but accepts from its start: what it accepted before an abort, it
        must drain. If ready() raises HandoverFailed before confirming,
        the servers were not started (or, when one of them could not start,
        which calls the handover off, were closed again in the step that
        started them, before accepting anything); close them as usual
        (:func:`~hotswap.close_server`). A ``TypeError`` for anything that
        is no server, before anything else.

        Closes inherited sockets nobody claimed. As a successor, confirms to
        the predecessor and waits (bounded) until it has stopped accepting;
        then starts answering the control socket. Raises HandoverFailed if the
        predecessor abandoned the handover: the caller must now stop
        accepting and drain (:meth:`wait_exit` returns HANDOVER_FAILED); the
        ``start_serving`` servers accept only if its ``Failed`` crossed our
        confirmation (one that came before it starts none), a server started
        before ready() has accepted from its start. A stop requested before
        confirming aborts the handover instead (the predecessor keeps
        serving) and raises HandoverFailed too; :meth:`wait_exit` then
        returns STOP_REQUESTED. So does this slot's PostStart hook having
        given up, in a Kruise takeover (:func:`hotswap.kruise.hook_gave_up`):
        the kubelet stops this container next, and it must not be the one
        accepting then; and one of the ``start_serving`` servers that cannot
        start (the others are closed again before accepting anything); and
        no descriptor to spare (this process at its RLIMIT_NOFILE: it could
        accept no connection, and nothing would be served).
        Called before :meth:`start` (or while it is at work), it raises
        HotswapError and starts none.

        Once it has begun confirming, the handover is this process's: the
        predecessor commits as it reads the confirmation and then stops
        accepting for good. Cancelling ready() (``asyncio.wait_for``, a
        cancelled ``serve()``) does not take that back: the confirmation
        runs on to its end (bounded by ``message_timeout``) and this process
        is the serving one, as if ready() had returned; stop it like one
        (:meth:`request_stop`, or :meth:`release` and :meth:`close`), or
        call ready() again, which waits for that same confirmation.
        :meth:`release` and :meth:`close` wait for it (no ``Abort``: it would
        come too late), then stop as the serving process. Cancelled before
        its confirmation sent anything, the handover is still this
        process's to abort: :meth:`close` does (the predecessor serves on).
        """
        servers = list(start_serving)
        for server in servers:
            if not callable(getattr(server, "start_serving", None)):
                raise TypeError(f"ready(start_serving=...) takes servers (asyncio's, "
                                f"uvloop's), not {server!r}")
        if self._starting is not None and not self._starting.done():
            # Its handshake says TAKING_OVER from the hello on: a
            # confirmation made now found no channel yet (an AssertionError),
            # and every later ready() waited for that failed one.
            raise HotswapError("ready() before start() returned: await start(), then "
                               "listen(), then ready()")
        for leftover in self._inherited.values():
            log.info("%s: closing unclaimed inherited %s", self.name, leftover.info.name)
            leftover.sock.close()
        self._inherited.clear()
        if self.state is State.TAKING_OVER:
            # A stop signal that came while this process could not run its
            # loop (a blocking on_startup, a stopped process) waits there as
            # a callback, one iteration for the wakeup and one for the
            # handler: let it run before we commit, or it would be seen
            # only after the old side stopped accepting.
            for _ in range(2):
                await asyncio.sleep(0)
        if self._closed:
            raise HotswapError("ready() after close()")
        self._to_serve.extend(servers)
        confirming = self._confirming
        if confirming is not None and not confirming.cancelled():
            # A ready() before this one was cancelled while confirming: that
            # confirmation is the one (a second Accepting would break the
            # protocol, and this process would step down beside a
            # predecessor that committed: nobody would accept).
            await asyncio.shield(confirming)
        elif self.state is State.TAKING_OVER:
            # Shielded: cancelled once Accepting may be on its way, we would
            # stay neither confirmed nor aborted, and close() would then send
            # an Abort the predecessor no longer heeds: nobody would accept.
            caller = asyncio.current_task()
            self._confirm_caller = (caller, caller.cancelling() if caller else 0)
            confirming = self._confirming = asyncio.ensure_future(self._confirm())
            confirming.add_done_callback(self._confirmation_done)
            await asyncio.shield(confirming)
        elif self.state is State.STARTING and self._control_sock is not None:
            self._serve_now()  # a fresh start: nobody to lose a connection to
            self._set_state(State.SERVING)  # serving from now on
        elif self.state is not State.SERVING:
            self._to_serve.clear()
            if self._exit is None:
                raise HotswapError("ready() before start(): call start(), then listen(), "
                                   "then ready()")
            raise HotswapError(f"ready() in state {self.state.value}")
        self._serve_now()  # any given to a ready() after the confirmation
        # Not all taken over: some may be bound anew (a moved listener).
        names = list(self._listeners)
        listed = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if names[8:] else "")
        log.info("%s: %s ready (pid %d, generation %d%s)", self.name, self.version,
                 self.pid, self.generation,
                 f"; took over {self._taken_from}; listening on {listed}; hello sent at "
                 f"{self._hello_sent_at:.6f}" if self._taken_from else "")

    async def wait_exit(self) -> ExitReason:
        """Wait until this process should stop accepting: a successor took
        over, a stop was requested (:meth:`close` counts as one: a wait
        still pending then returns STOP_REQUESTED), or (as a successor) the
        handover failed."""
        if self._exit is None:
            raise HotswapError("start() first")
        return await asyncio.shield(self._exit)

    def request_stop(self) -> None:
        """Ask for a stop (from a signal handler, say). During a handover the
        stop waits for its outcome, so the sockets are never lost. Asked
        before :meth:`start`, it is kept: no takeover is tried (start()
        raises HandoverFailed, see :attr:`stop_requested`), and
        a fresh start's :meth:`wait_exit` returns STOP_REQUESTED at once."""
        self._stop_requested = True
        self._stop_event.set()
        if self.state in (State.SERVING, State.PASSIVE, State.STARTING,
                          State.TAKING_OVER):
            # TAKING_OVER: ready() will abort rather than confirm.
            self._finish(ExitReason.STOP_REQUESTED)

    async def wait_stop_requested(self) -> None:
        """Wait until :meth:`request_stop` is called (at once if it was), in
        any state: what a process that was taken over and has drained waits
        for in a Kruise slot (it must not exit before SIGTERM)."""
        await self._stop_event.wait()

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called (whatever came of it): an
        upgrader starts once."""
        return self._exit is not None

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called (a :class:`HandoverFailed`
        out of :meth:`start` is then a stop, not a failure)."""
        return self._stop_requested

    @property
    def _stopping(self) -> bool:
        return self._stop_requested or self.state in (State.DRAINING, State.STOPPED)

    def adopt_connections(self, adopter: Callable[[str, socket.socket], None]) -> None:
        """Offer to take the predecessor's idle keep-alive connections.

        Call before :meth:`start`: the hello then announces the
        ``"connections"`` capability. While the predecessor drains,
        ``adopter(listener_name, sock)`` is called for each connection handed
        over: a connected, non-blocking TCP socket whose next request has not
        been read by anyone. ``listener_name`` is the name this process
        inherited that connection's listener under, else the predecessor's
        name for it: a listener this version binds anew under that name, or
        one it dropped (then it has no listener of that name, and the
        connection is still to be served: its client knows nothing of the
        upgrade; :func:`hotswap.aiohttp.serve` serves every connection with
        its one app). Ownership of ``sock`` passes to the adopter; if
        it raises, the socket is closed (under its client: the predecessor
        has let go of it). Once this process is stopping
        (:meth:`request_stop`, :meth:`release`), a predecessor that waits for
        acknowledgements is refused instead and keeps its connections.
        """
        if self._exit is not None:
            raise HotswapError("adopt_connections() must come before start()")
        self._adopter = adopter

    @property
    def can_hand_over_connections(self) -> bool:
        """True while draining after a handover to a successor that offered
        to adopt connections, once :meth:`release` has told it (the
        protocol has connections follow ``Released``: one sent before it
        broke the channel, and the successor took its predecessor for
        gone)."""
        successor = self._successor
        return (self.state is State.DRAINING and successor is not None
                and not successor.closed and successor.conn.state is Conversation.RELEASED
                and "connections" in self._successor_caps)

    async def hand_over_connections(self, conns: Sequence[tuple[str, int, str]], *,
                                    timeout: float | None = None) -> int:
        """Send ``(listener name, fd, peer)`` connections to the successor, in
        frames of at most 253. Returns how many were sent (a prefix of
        ``conns``); after a failure the rest were not, and the channel to the
        successor is closed. Sends nothing (0) unless
        :attr:`can_hand_over_connections` (after :meth:`release`, say). The
        caller keeps ownership of every fd it passed (the successor got its
        own copies) and closes them; the ones not sent
        it must go on serving. With a successor that acknowledges each frame
        (``"connections-ack"``), a frame counts as sent once acknowledged;
        one it could not take (e.g. no descriptor numbers left: MSG_CTRUNC)
        or refuses (stopping; with ``"connections-refusal"`` it says why,
        and that is logged) ends the channel unacknowledged and counts as
        not sent. A frame whose
        acknowledgement does not come in time counts as sent (the successor
        adopts a complete frame it could not acknowledge: never two servers
        for one connection, nor none); what arrived by then counts first (a
        loop stalled past the wait wakes to its timer before its socket),
        and so does what the successor decided before it saw that we let
        go (its last word: up to 0.1 s more, once); a refusal keeps the
        frame here. Each send and each wait for an
        acknowledgement takes at most ``message_timeout``, and all of them
        together at most ``timeout`` seconds when given (what is left of the
        drain).
        """
        sent = 0
        channel = self._successor
        if not self.can_hand_over_connections or channel is None:
            return 0
        acked = _ACK in self._successor_caps
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout

        def wait() -> float:
            limit = self.options.message_timeout
            return limit if until is None else max(0.0, min(limit, until - loop.time()))

        for i in range(0, len(conns), MAX_FDS_PER_FRAME):
            chunk = conns[i:i + MAX_FDS_PER_FRAME]
            message = Connections(entries=tuple(ConnInfo(listener=name, peer=peer)
                                                for name, _, peer in chunk),
                                  fds=tuple(fd for _, fd, _ in chunk))
            try:
                await channel.send(message, timeout=wait())
                if acked:
                    # The successor adopts only what it acknowledged; the
                    # channel ending first means it has none of this frame.
                    try:
                        reply = await self._acknowledgement(channel, wait())
                    except HandoverTimeout as exc:
                        # No answer in time: let go of them, which the
                        # successor, reading the frame after our end closed,
                        # takes for "adopt them" (they count as sent), unless
                        # its last word says it refused them.
                        late = await self._last_word(channel)
                        log.warning("%s: %s for %d connection(s) (%s); letting go of "
                                    "them", self.name, "late acknowledgement" if late
                                    else "no acknowledgement", len(chunk), exc)
                        channel.close()
                        self._successor = None
                        return sent + len(chunk)
                    except HotswapError as exc:
                        if _peer_closed(exc):  # it has none of them: serve them on
                            raise
                        # Anything else says nothing of the successor: let go
                        # and close, which tells it to adopt a complete frame.
                        log.warning("%s: no acknowledgement for %d connection(s) (%s); "
                                    "letting go of them", self.name, len(chunk), exc)
                        channel.close()
                        self._successor = None
                        return sent + len(chunk)
                    if isinstance(reply, Abort):  # refused, saying why: ours to serve
                        log.warning("%s: the successor refused %d connection(s): %s; "
                                    "they drain here", self.name, len(chunk), reply.reason)
                        channel.close()
                        self._successor = None
                        return sent
                    assert isinstance(reply, Adopted)  # the state machine allows no other
            except HotswapError as exc:
                log.warning("%s: handing connections over failed after %d: %s",
                            self.name, sent, exc)
                channel.close()
                self._successor = None
                return sent
            sent += len(chunk)
        return sent

    @staticmethod
    async def _acknowledgement(channel: Channel, timeout: float) -> Message:
        """The successor's answer to a frame of connections, within
        ``timeout``. A loop that was stalled (starved, stopped) past it wakes
        to its timer before its socket: what already arrived still counts.
        A refusal there (the channel closed unacknowledged) means the
        successor closed its copies: letting go then would leave the
        connections with nobody."""
        try:
            return await channel.receive(timeout=timeout)
        except HandoverTimeout as exc:
            try:
                return await channel.receive(timeout=0)  # no wait: only what is there
            except HandoverTimeout:
                raise exc from None

    @staticmethod
    async def _last_word(channel: Channel) -> bool:
        """After a frame's acknowledgement did not come in time: end our
        side of the channel (``shutdown(SHUT_WR)``: a successor that reads
        the frame after this finds us closed and adopts it), then give the
        successor :data:`_LAST_WORD` seconds for what it decided before it
        saw that. True if it acknowledged the frame, False if nothing came
        (the frame is the successor's). Raises the channel's error if the
        successor refused it (closed unacknowledged): it closed its copies,
        so the connections are ours to serve on; closing ours too would
        leave them with nobody."""
        with contextlib.suppress(HotswapError):  # (its close may be there already)
            channel.shutdown_sending()
        try:
            reply = await Upgrader._acknowledgement(channel, _LAST_WORD)
        except HotswapError as exc:
            if _peer_closed(exc):
                raise
            return False  # nothing more came, or nothing that says anything
        if isinstance(reply, Abort):  # a refusal that says why
            raise HotswapError(f"the successor refused them: {reply.reason}")
        return isinstance(reply, Adopted)

    async def release(self) -> None:
        """Say that this process has stopped accepting.

        Closes listener sockets still open (call this only after your servers
        stopped: a server owns the socket it accepts on) and the control
        socket, and tells the successor (if any) that it may now consider
        itself the only acceptor. Only the first call does anything (a
        second Released would break the protocol, and the successor would
        take its predecessor for gone while it still drains): safe to call
        again, from a ``finally`` say. As a successor that has not begun
        confirming, it calls the handover off (an ``Abort``: the predecessor
        serves on).
        """
        if not self._released and self.state is not State.STOPPED:
            # A confirmation still running would make us serve again after this.
            await self._settle_confirmation()
        if self._released or self.state is State.STOPPED:  # (a call meanwhile, too)
            return
        self._released = True
        # Released before confirming (its set-up failed, say): the handover
        # is off. Tell the old side why it serves on, as close() does (not
        # from close(): it has said so already); it waited for our word
        # until its handover_timeout, or our close(), refusing others.
        unconfirmed = self.state is State.TAKING_OVER and not self._closed
        self._set_state(State.DRAINING)
        if unconfirmed and (channel := self._predecessor_channel) is not None:
            self._to_serve.clear()  # never started: the caller closes them
            self._backlogs.clear()  # the predecessor's queues stay as they are
            with contextlib.suppress(HotswapError):
                await channel.send(Abort(reason="successor released before confirming"),
                                   timeout=1.0)
        await self._stop_control()
        for entry in self._listeners.values():
            entry.sock.close()
        if self._handover_times is not None:
            hello_at, confirmed_at = self._handover_times
            released_at = time.time()
            log.info("%s: handover critical section: hello at %.6f, confirmed +%.3f ms, "
                     "stopped accepting +%.3f ms", self.name, hello_at,
                     (confirmed_at - hello_at) * 1e3, (released_at - hello_at) * 1e3)
        await self._tell_released()

    async def close(self, *, cut: int = 0) -> None:
        """Finish: tell the successor the drain is over (``cut`` connections
        were closed at the deadline), close every remaining resource. Safe to
        call more than once and on any path: a call while another runs waits
        for it (and finishes the job if that one is cancelled); a
        :meth:`start` still at work (retrying while the serving process is
        busy, say) is stopped first and gives back whatever it took (the
        predecessor serves on). It releases the listeners if :meth:`release`
        was not called: call it only once your servers stopped accepting on
        them. While :func:`hotswap.aiohttp.serve` runs on this upgrader, its
        servers own the listeners: a call from elsewhere (the app's task, a
        handler) then only asks it to stop, as :meth:`request_stop` does
        (nothing more once it drains), and returns at once; ``serve()``
        drains and closes the upgrader itself."""
        owner = self._run_by
        if owner is not None and not owner.done() and owner is not asyncio.current_task():
            # Closing the listeners under serve()'s servers broke them (its
            # drain raised, the requests in flight were lost).
            if self.state not in (State.DRAINING, State.STOPPED):
                log.warning("%s: close() while serve() runs: stopping it instead",
                            self.name)
                self.request_stop()
            return
        while (running := self._closing) is not None:
            await asyncio.shield(running)
            if self._closing is running:  # it finished
                return
            # It was interrupted (cancelled) half-way: carry on in its place.
        if self.state is State.STOPPED:
            return
        self._closed = True
        self._wake.set()
        closing = self._closing = asyncio.get_running_loop().create_future()
        finished = False
        try:
            await self._close(cut)
            finished = True
        finally:
            if not finished:  # interrupted (cancelled): a later call goes on
                self._closing = None
            closing.set_result(None)

    async def _close(self, cut: int) -> None:
        starting = self._starting
        if starting is not None and not starting.done():
            # It gives up at its next step (within message_timeout).
            await asyncio.wait({starting})
        # ready() cancelled while confirming: once Accepting is out the
        # predecessor has committed, or will as it reads it: finish
        # confirming (bounded), then close as the serving process we are.
        await self._settle_confirmation()
        self._to_serve.clear()  # a confirmation called off never started them
        self._backlogs.clear()  # nor gave the shared listeners our queue
        channel = self._predecessor_channel
        if self.state is State.TAKING_OVER and channel is not None:
            # Closed before confirming (its set-up failed, say): tell the old
            # side why it serves on, rather than leave it a closed channel.
            with contextlib.suppress(HotswapError):
                await channel.send(Abort(reason="successor closed before confirming"),
                                   timeout=1.0)
        if not self._released and (self._listeners or self._successor is not None):
            await self.release()  # also after a takeover the caller did not release
        await self._tell_successor(Drained(pid=self.pid, cut=cut))
        if self._successor is not None:
            self._successor.close()
            self._successor = None
        await self._stop_control()
        for task in list(self._handlers) + [t for t in (self._predecessor_task,) if t]:
            task.cancel()
        if self._predecessor_channel is not None:
            self._predecessor_channel.close()
        for entry in list(self._inherited.values()) + list(self._listeners.values()):
            entry.sock.close()
        self._inherited.clear()
        self._set_state(State.STOPPED)
        # Whoever still waits to learn when to stop (a PASSIVE slot's
        # wait_exit(), say) learns it now, rather than never.
        self._finish(ExitReason.STOP_REQUESTED)

    # ---------------------------------------------------------------- status

    def status(self) -> Status:
        """This process as the control socket reports it: its first listeners,
        as many as one reply holds (:data:`~hotswap.protocol.STATUS_MAX_LISTENERS`,
        ``STATUS_LISTENERS_BYTES``), and how many there are."""
        num_fds, rss = _proc.usage()
        self._forget_closed_listeners()
        infos = [e.info for e in self._listeners.values()]
        listed, size = [], 0
        for info in infos[:STATUS_MAX_LISTENERS]:
            size += len(json.dumps(info.to_json())) + 1  # ASCII: the most bytes
            if size > STATUS_LISTENERS_BYTES:
                break
            listed.append(info)
        return Status(name=self.name, pid=self.pid, version=self.version,
                      rank=self.versions.rank, state=self.state.value,
                      predecessor=self._predecessor, generation=self.generation,
                      listeners=tuple(listed), listener_count=len(infos),
                      num_fds=num_fds, rss=rss)

    def _forget_closed_listeners(self) -> None:
        """Forget the listeners the app closed (a server it stopped for
        good closes its socket: ``fileno()`` is -1), with a warning naming
        each, once. They are no longer this process's to hand over or
        report: sending a closed one failed every handover (EBADF), so an
        app that closed one listener on purpose could never be upgraded.
        The name is free again for :meth:`listen`.

        Not once :meth:`wait_exit` has returned: the app then closes its
        servers as asked, and :meth:`release` the rest; nothing is handed
        over any more, and a status query still answered then (accepted
        before the control socket closed) lists them as before, with no
        warning (it was one per listener after every clean stop)."""
        if self._exit is not None and self._exit.done():
            return
        closed = [name for name, e in self._listeners.items() if e.sock.fileno() == -1]
        for name in closed:
            info = self._listeners.pop(name).info
            log.warning("%s: listener %s %s was closed by this process; leaving it out "
                        "of handovers and status", self.name, name, info.address)

    # ------------------------------------------------------- new side (client)

    def _add_launcher_sockets(self) -> None:
        """The sockets systemd (or a launcher like it) passed us
        (``LISTEN_FDS``), as inherited listeners: on a fresh start, all of
        them; after a takeover, all but the very sockets the predecessor
        handed over under their name (closed: the predecessor's copies are
        the ones in use). Another socket under a name the predecessor used
        (a version that moves that listener to the launcher's address) is
        kept as ``fdN``, found by its address; closed, it left the successor
        only a bind anew, which failed (``EADDRINUSE``: the launcher holds
        its copy). One that is no listener (a ``SOCK_SEQPACKET`` one, another family,
        a connection as systemd's ``Accept=yes`` passes) is closed at
        once, with a warning. Unclaimed ones are
        closed by :meth:`ready`, like any inherited."""
        for name, sock in listeners.systemd_sockets(self.options.env, self.pid).items():
            taken = self._inherited.get(name)
            if taken is not None:
                if listeners.same_socket(taken.sock, sock):
                    sock.close()
                    continue
                name = f"fd{sock.fileno()}"
                if name in self._inherited:
                    log.warning("%s: launcher socket fd %d is named as the predecessor's "
                                "%s, and %s is taken too: closed", self.name,
                                sock.fileno(), taken.info.name, name)
                    sock.close()
                    continue
            try:
                info = listeners.describe(name, sock)  # a SOCK_SEQPACKET one, say: raises
                if info.kind == "stream" and not sock.getsockopt(socket.SOL_SOCKET,
                                                                 socket.SO_ACCEPTCONN):
                    raise ListenerError(f"{name}: a stream socket that is not listening "
                                        "(a connection: systemd's Accept=yes?)")
            except (ListenerError, OSError) as exc:
                log.warning("%s: launcher socket fd %d is no listener (%s): closed",
                            self.name, sock.fileno(), exc)
                sock.close()
                continue
            self._inherited[name] = _Listener(info, sock)

    def _start_fresh(self) -> None:
        # The control socket first: if someone else holds it, nothing of
        # the launcher's was taken (a takeover may follow).
        self._control_sock = self._bind_control()
        self._add_launcher_sockets()
        # STARTING until ready() (also after a takeover that came to
        # nothing): nothing listens yet, so the control socket says
        # "starting" and refuses successors as busy (they retry).
        self._set_state(State.STARTING)
        self._serve_control()

    def _bind_control(self) -> socket.socket:
        # A filesystem path left over by a process that stopped or died is
        # removed by listeners.bind(), as for any Unix listener; under a
        # lock on its folder, see _lock_control_dir().
        lock = self._lock_control_dir()
        try:
            return listeners.bind(self.address, backlog=_CONTROL_BACKLOG, unix_mode=0o600)
        except ListenerError as exc:
            cause = exc.__cause__
            in_use = isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
            if in_use and not self.address.startswith("@"):
                with contextlib.suppress(OSError):
                    if not stat.S_ISSOCK(os.lstat(self.address).st_mode):
                        raise ListenerError(f"control socket of {self.name!r}: {exc}: "
                                            "that path is no socket (left as it is)"
                                            ) from cause
            if in_use:
                raise _ControlInUse(
                    f"{exc}: another process already serves {self.name!r}; start it "
                    "without a Kruise FRESH role (or with VERSION > ALT) to take over"
                ) from cause
            # Anything else (a name too long for a Unix address, a folder
            # that does not exist, no permission): say just that.
            raise ListenerError(f"control socket of {self.name!r}: {exc}") from cause
        finally:
            if lock is not None:
                os.close(lock)

    def _lock_control_dir(self) -> int | None:
        """A filesystem control socket's folder, locked (``flock``) while
        this process finds the path's file stale, removes it and binds:
        two processes doing that at once (two passive slots standing in, a
        pod's restart) could each remove the other's new file and bind,
        each then holding a control socket, one unreachable. One that finds
        the lock taken raises :class:`_ControlInUse`: another process is
        binding it, after waiting up to ``_CONTROL_LOCK_WAIT`` seconds (the
        lock is the folder's, and other sidecars' control sockets may be
        in it). The descriptor to close, or None: an abstract name
        (binding it is atomic), or a folder that cannot be opened or locked
        (bind as before)."""
        if self.address.startswith("@"):
            return None
        try:
            fd = os.open(os.path.dirname(self.address) or ".",
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        # Other control sockets may share the folder: a process binding one
        # holds the lock for a few system calls. Wait for it, briefly (the
        # loop serves nothing yet); a lock held longer is taken for ours
        # being bound (its holder stopped meanwhile, say).
        deadline = time.monotonic() + _CONTROL_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.001)
                    continue
                os.close(fd)
                raise _ControlInUse(f"control socket of {self.name!r}: another process "
                                    f"is binding {self.address} at this moment") from None
            except OSError:
                os.close(fd)
                return None
            return fd

    async def _take_over(self, *, required: bool) -> bool:
        """Connect and adopt. Returns False if nobody serves (then bind fresh)."""
        opts = self.options
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.connect_timeout
        delay = 0.05
        retried = ""  # the refusal's code last said at INFO
        while True:
            if self._stop_requested:  # while waiting for a busy one, say
                raise HandoverFailed("stop requested before taking over; nothing was taken")
            if self._closed:
                raise HandoverFailed("closed before taking over; nothing was taken")
            try:
                sock = await control.connect(self.address, timeout=opts.message_timeout)
            except OSError as exc:
                if control.is_nobody_there(exc):
                    if required:
                        log.warning("%s: version %s should take over but nobody "
                                    "serves %s: starting fresh", self.name,
                                    self.versions.rank, self.address)
                    return False
                # Not "nobody there" (EACCES: a filesystem control socket
                # of another uid; ENOTDIR): a failed takeover, as start()
                # says, that no retry mends.
                raise HandoverFailed(f"cannot connect to the control socket {self.address}: "
                                     f"{exc}; nothing was taken") from exc
            channel = Channel(sock, Sender.CLIENT)
            try:
                # The name is first come, first served: take sockets only from
                # a process of an allowed uid, as it only gives them to one.
                control.check_server(sock, self.address, self._allowed_uids)
                await self._handshake(channel)
                return True
            except HandoverRefused as exc:
                channel.close()
                # "timeout": it gave up on our connection before our hello
                # came (this process was stopped or starved in between):
                # nothing was taken, and a new try may well succeed.
                if exc.code not in ("busy", "timeout") or loop.time() + delay > deadline:
                    raise
                # Once at INFO, the retries (up to ~1/s until connect_timeout)
                # at DEBUG: a line a retry for as long as a drain lasts.
                log.log(logging.INFO if retried != exc.code else logging.DEBUG,
                        "%s: serving process %s (%s); retrying", self.name,
                        "busy" if exc.code == "busy" else "gave up waiting for our hello",
                        exc.reason)
                retried = exc.code
            except BrokenResourceError as exc:
                channel.close()
                if exc.truncated:
                    # Our fault, not the predecessor's: it would be the same
                    # every time. It held on to everything and serves on.
                    raise HandoverFailed(
                        f"no room for the predecessor's sockets: {exc}; nothing was "
                        "taken and it serves on (raise this process's RLIMIT_NOFILE)"
                    ) from exc
                # The predecessor went away mid-handshake (crashed, killed):
                # nothing was adopted. Look again: if nobody serves now, the
                # port is free and we start fresh.
                if loop.time() + delay > deadline:
                    # A failed takeover, as start() says: a caller's
                    # `except HandoverFailed` (serve() after a stop) sees it.
                    raise HandoverFailed(
                        f"the process serving {self.address} went away during the "
                        f"handover ({exc}), again until connect_timeout "
                        f"({opts.connect_timeout:g}s); nothing was taken") from exc
                log.warning("%s: predecessor went away during the handover (%s); "
                            "retrying", self.name, exc)
            except BaseException:
                channel.close()
                raise
            with contextlib.suppress(TimeoutError):  # close() cuts the wait short
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            delay = min(delay * 2, 1.0)

    async def _handshake(self, channel: Channel) -> None:
        opts = self.options
        self._set_state(State.TAKING_OVER)
        hello = Hello(pid=self.pid, version=self.version, rank=self.versions.rank,
                      token=opts.token,
                      capabilities=("connections", _ACK, _REFUSAL) if self._adopter else ())
        self._hello_sent_at = time.time()  # logged by ready(), off the critical path
        try:
            reply = await channel.request(hello, timeout=opts.message_timeout)
        except HandoverTimeout as exc:
            self._set_state(State.STARTING)
            pid = channel.peer_credentials()[0]
            raise HandoverTimeout(
                f"the process serving {self.address} (pid {pid}) did not answer our "
                f"hello ({exc}): it is stopped, hung or flooded, or it is not a "
                f"hotswap process; nothing was taken") from None
        except RemoteProtocolError as exc:
            self._set_state(State.STARTING)
            pid = channel.peer_credentials()[0]
            raise HandoverFailed(
                f"the process serving {self.address} (pid {pid}) answered our hello "
                f"with no hotswap reply ({exc}): it is not a hotswap process of "
                f"protocol {PROTOCOL_VERSION}; nothing was taken") from exc
        except BrokenResourceError as exc:
            self._set_state(State.STARTING)  # nothing taken (it said taking-over for good)
            if exc.truncated:
                # The read that overflowed held the Welcome and the first
                # sockets (descriptors come after a Welcome only), lost with
                # it: the predecessor waits for our word on them. Our state
                # machine never saw that Welcome, so the Abort goes outside
                # it, best effort: the predecessor logs our reason rather
                # than "peer closed", and serves on either way.
                channel.send_nowait(Abort(reason=str(exc)))
            raise
        except BaseException:
            # Cancelled (an asyncio.wait_for around start(), a TaskGroup):
            # nothing was taken. Left TAKING_OVER, status() said so for good
            # and a ready() failed on an assertion instead of naming the state.
            self._set_state(State.STARTING)
            raise
        if isinstance(reply, Refused):
            self._set_state(State.STARTING)
            raise HandoverRefused(reply.code, reply.reason)
        assert isinstance(reply, Welcome)  # the state machine allows nothing else
        adopted: dict[str, _Listener] = {}
        try:
            remaining = reply.count
            while remaining:
                try:
                    chunk = await channel.receive(timeout=opts.message_timeout)
                except HandoverTimeout as exc:
                    raise HandoverTimeout(
                        f"the process serving {self.address} (pid {reply.pid}, "
                        f"{reply.version or 'no version'}) sent "
                        f"{reply.count - remaining} of its {reply.count} socket(s), then "
                        f"nothing ({exc}): it is stopped, hung or starved; nothing was "
                        f"taken, it serves on") from None
                if isinstance(chunk, Failed):
                    raise HandoverFailed(f"predecessor gave up: {chunk.reason}")
                assert isinstance(chunk, Sockets)
                remaining -= chunk.nfds
                self._adopt_chunk(chunk, adopted)
            if control.CONTROL_NAME not in adopted:
                raise HandoverFailed("predecessor did not send its control socket")
        except BaseException as exc:
            for entry in adopted.values():
                entry.sock.close()
            self._set_state(State.STARTING)
            if isinstance(exc, HotswapError | OSError) and not channel.closed:
                with contextlib.suppress(HotswapError, ProtocolError):
                    await channel.send(Abort(reason=str(exc)), timeout=1.0)
            if isinstance(exc, ListenerError | ProtocolError):
                raise HandoverFailed(f"adopting the sockets failed: {exc}") from exc
            raise
        control_entry = adopted.pop(control.CONTROL_NAME)
        self._control_sock = control_entry.sock
        self._inherited = adopted
        self._predecessor_channel = channel
        self._predecessor = "accepting"
        self.generation = reply.generation + 1
        # Logged once ready (not here: this is the critical section, and a
        # line per socket costs ~10 us each, 60% more for 1,000 listeners).
        self._taken_from = f"{reply.count} socket(s) from pid {reply.pid} ({reply.version})"
        self._predecessor_acks = _ACK in reply.capabilities and self._adopter is not None
        self._predecessor_hears_refusals = (self._predecessor_acks
                                            and _REFUSAL in reply.capabilities)
        log.debug("%s: received %s", self.name, self._taken_from)

    def _adopt_chunk(self, chunk: Sockets, adopted: dict[str, _Listener]) -> None:
        fds = list(chunk.fds)
        try:
            for entry in chunk.entries:
                fd = fds.pop(0)
                if entry.name in adopted:
                    os.close(fd)
                    raise HandoverFailed(f"socket name {entry.name!r} sent twice")
                adopted[entry.name] = _Listener(entry, listeners.adopt_fd(fd, entry))
        finally:
            close_fds(fds)

    def _confirmation_done(self, task: asyncio.Task[None]) -> None:
        """Whatever the confirmation raised, read (its ready() may have been
        cancelled): a HotswapError has told :meth:`wait_exit` already;
        anything else is unexpected (a bug, a socket closed under us), and
        logged with its traceback: with ready() cancelled, this line is its
        only report, and its repr alone (``OSError(9, 'Bad file
        descriptor')``) does not say where it came from. At most once a
        process: one confirmation each."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, HotswapError):
            log.error("%s: confirming the handover failed: %r", self.name, exc, exc_info=exc)

    async def _settle_confirmation(self) -> None:
        """Before a release or close: a confirmation whose ready() was
        cancelled runs to its end (bounded by ``message_timeout``) once it
        has sent Accepting, since the predecessor commits as it reads that;
        one that has sent nothing yet is called off (the handover is still
        ours to abort)."""
        confirming = self._confirming
        if confirming is None or confirming.done():
            return
        if not self._accepting_sent:
            confirming.cancel()  # not begun: its body never runs
        await asyncio.wait({confirming})

    async def _confirm(self) -> None:
        # Its ready() was cancelled after making this task, whose first step
        # was due before that ready() could act on it: called off, as if it
        # had never begun (close() aborts, ready() again confirms anew). Run,
        # it sent Accepting while the caller left (close_server(), serve()'s
        # runner clean-up): the predecessor committed, the caller closed,
        # and nobody accepted.
        caller, cancels = self._confirm_caller
        if caller is not None and caller.cancelling() > cancels:
            raise asyncio.CancelledError
        channel = self._predecessor_channel
        assert channel is not None
        opts = self.options
        # Checked here, in the step that sends Accepting, not in ready(): a
        # task's first step comes an iteration later, and a stop signal, or
        # a stalled loop that let the hook's deadline pass, may come between.
        if self._stop_requested:
            await self._abort("stop requested before confirming")
        rank = self.versions.rank
        late = None if rank is None else kruise.hook_gave_up(
            self.options.env, self.name, rank, since=self._started_at)
        if late is not None:
            # The kubelet stops this container once the hook fails: as the
            # one process accepting, if we confirmed now.
            await self._abort(f"{late}; the predecessor serves on")
        # At the descriptor limit (room for the sockets received, none
        # more) our servers could accept nothing, for good: not ours then.
        # The serving marker, bound as we confirm, takes one more: with it
        # uncounted, a Kruise successor confirmed with none left to accept.
        marker = self.versions.rank is not None and not self.options.control_path
        if no_room := _no_room_to_serve(3 if marker else 2):
            await self._abort(f"no descriptor left to accept connections with: {no_room}; "
                              "raise this process's RLIMIT_NOFILE; the predecessor serves on")
        # Our servers accept from here on, with the send in this same step:
        # nothing was accepted by us while we could still back out, and the
        # predecessor stops only once it reads Accepting. Not if it has
        # spoken already: that can only be its Failed, and the reply decides
        # (below), so that a handover it abandoned takes nothing from it.
        if not channel.peer_spoke():
            # Ours from this step on (see listen()); before our servers
            # start, which listen again with their own backlog, as they do
            # after listen() on a fresh start.
            self._listen_again()
            try:
                self._serve_now(all_or_none=True)
            except Exception as exc:  # noqa: BLE001 - a server's own error (see _serve_now)
                await self._abort(f"starting our servers failed: {exc!r}; the "
                                  "predecessor serves on")
        self._accepting_sent = True  # nothing awaited before the send: no step between
        # From here on the handover is ours (we serve on unless the
        # predecessor says it gave up first): say so to the PostStart hook
        # now, not once the predecessor has released, which may take up to
        # message_timeout. A hook that timed out meanwhile would fail, and
        # the kubelet would stop the one process about to accept. Not if
        # the predecessor has spoken first: after the sockets it says
        # nothing until our confirmation but Failed (its handover_timeout
        # ran out), and a hook that saw the marker then would succeed
        # for a handover that failed; the reply (read at once) decides.
        if not channel.peer_spoke():
            self._mark_serving(True)
        try:
            # request(): if the predecessor already gave up (Failed, then
            # closed), our send breaks but its Failed is still queued for us.
            reply = await channel.request(Accepting(), timeout=opts.message_timeout)
        except (BrokenResourceError, HandoverTimeout) as exc:
            # Once Accepting is out, the predecessor either committed or is gone:
            # we are accepting either way, so carry on serving.
            log.warning("%s: no release from the predecessor (%s); serving anyway",
                        self.name, exc)
            self._predecessor = "gone"
            channel.close()
            self._predecessor_channel = None
        except ProtocolError as exc:
            self._step_down(channel, f"predecessor broke the protocol: {exc}")
        else:
            if isinstance(reply, Failed):
                self._step_down(channel, f"predecessor abandoned the handover: "
                                         f"{reply.reason}")
            assert isinstance(reply, Released)
            self._predecessor = "draining"
            self._predecessor_task = asyncio.create_task(self._watch_predecessor(channel))
        self._listen_again()  # if the predecessor had spoken first, and we serve anyway
        try:
            self._serve_now()  # if the predecessor had spoken first, and we serve anyway
        except Exception as exc:  # noqa: BLE001 - too late to call it off: the others serve
            log.error("%s: starting a server failed: %r", self.name, exc)
        self._set_state(State.SERVING)
        assert self._control_sock is not None
        # A client's SO_PEERCRED names whoever last called listen() on the
        # control socket, and it travels from version to version: make it
        # ours, or clients would check the uid (and see the pid) of the first.
        self._control_sock.listen(_CONTROL_BACKLOG)
        self._serve_control()
        if self._stop_requested:
            self._finish(ExitReason.STOP_REQUESTED)

    def _listen_again(self) -> None:
        """Give the inherited stream listeners the backlog listen() was
        asked for (see there), at once. The sockets stay the caller's; one
        the kernel refuses (closed by the caller meanwhile, say) keeps its
        queue, with a warning: nothing else changes."""
        backlogs, self._backlogs = self._backlogs, {}
        for name, (sock, backlog) in backlogs.items():
            try:
                sock.listen(backlog)
            except OSError as exc:
                log.warning("%s: inherited %s keeps its listen queue (%s)",
                            self.name, name, exc)

    def _serve_now(self, *, all_or_none: bool = False) -> None:
        """Start the servers ready() was given (see there), at once: each
        one, then the first error if any (an OSError, a TypeError, or
        whatever a server of another library raises as it starts: a
        RuntimeError let through left the servers started before it
        accepting for a process that then backed out).

        ``all_or_none`` (before the confirmation, which an error calls off):
        on an error, the servers this call started are closed again, in the
        same step (nothing accepted: the loop polls only after it), so that
        none accepts for a process that backs out; the caller closes them
        as usual all the same (closing twice is nothing). Without it (too
        late to call anything off), the others serve on."""
        servers, self._to_serve = self._to_serve, []
        error: BaseException | None = None
        started: list[asyncio.AbstractServer] = []
        for server in servers:
            try:
                if not server.is_serving():
                    listeners.start_serving(server)
                    started.append(server)
            except Exception as exc:  # noqa: BLE001 - a server of any library
                error = error or exc
        if error is not None:
            if all_or_none:
                for server in started:
                    listeners.close_at_once(server)  # not read from since: accepted nothing
            raise error

    async def _abort(self, reason: str) -> NoReturn:
        self._to_serve.clear()  # never started: the caller closes them
        self._backlogs.clear()  # the predecessor's queues stay as they are
        channel = self._predecessor_channel
        assert channel is not None
        with contextlib.suppress(HotswapError):
            await channel.send(Abort(reason=reason), timeout=1.0)
        channel.close()
        self._predecessor_channel = None
        self._predecessor = "none"
        self._control_sock_close()
        self._set_state(State.DRAINING)
        self._finish(ExitReason.STOP_REQUESTED)
        raise HandoverFailed(f"handover aborted: {reason}")

    def _step_down(self, channel: Channel, reason: str) -> NoReturn:
        # Not started if its Failed came before our check; else they accept
        # already, and what they took is the caller's to drain.
        self._to_serve.clear()
        self._backlogs.clear()  # the predecessor's, which serves on
        channel.close()
        self._predecessor_channel = None
        self._control_sock_close()
        self._set_state(State.DRAINING)
        self._finish(ExitReason.HANDOVER_FAILED)
        raise HandoverFailed(reason)

    async def _watch_predecessor(self, channel: Channel) -> None:
        """Follow the predecessor's drain: adopt the connections it hands
        over, until Drained, EOF or the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.predecessor_drain_timeout
        adopted = 0
        try:
            while True:
                message = await channel.receive(timeout=max(0.0, deadline - loop.time()))
                if isinstance(message, Connections):
                    adopted += await self._take_connections(channel, message)
                    continue
                if isinstance(message, Drained):
                    log.info("%s: predecessor pid %d drained (%d cut, %d connection(s) "
                             "adopted)", self.name, message.pid, message.cut, adopted)
                break
        except HotswapError as exc:
            # Closed first, before the log line (a write that may block): a
            # predecessor waiting for our word on a frame reads this as our
            # refusal only while it still waits (its wait, then its 0.1 s
            # for our last word); after that it has let go of the frame,
            # whose copies we have just closed. One that hears refusals is
            # told why first (the kernel dropped the frame's descriptors).
            truncated = isinstance(exc, BrokenResourceError) and exc.truncated
            if truncated and self._predecessor_hears_refusals:
                with contextlib.suppress(HotswapError):  # the end says no alike
                    await channel.send(Abort(reason=f"no room for them: {exc}"), timeout=1.0)
            channel.close()
            if truncated:
                log.warning("%s: no room for the predecessor's connections (%s): it "
                            "serves those on and tells them to close; raise this "
                            "process's RLIMIT_NOFILE", self.name, exc)
            else:
                log.info("%s: predecessor gone (%s)", self.name, exc)
        finally:
            channel.close()
            self._predecessor_channel = None
            self._predecessor = "gone"

    async def _take_connections(self, channel: Channel, message: Connections) -> int:
        """Adopt a frame of connections; returns how many the adopter took.
        With a predecessor that waits for our acknowledgement, we take a
        frame only whole and only if we can serve it: refusing (raising
        HotswapError, which ends the channel) leaves every connection of
        the frame with the predecessor, which drains them the safe way."""
        if self._predecessor_acks:
            refusal = ""
            if self._stopping:  # they would only be closed under their clients
                refusal = "stopping: not adopting its connections"
            elif not all(listeners.is_tcp_stream(fd) for fd in message.fds):
                refusal = "refusing a frame of connections that are not all TCP streams"
            elif any(self._label(e.listener) is None for e in message.entries):
                refusal = ("refusing a frame with connections of a listener this version "
                           "dropped and whose name it gave another")
            if refusal:
                if not channel.peer_closed():
                    close_fds(message.fds)
                    if self._predecessor_hears_refusals:  # why, for its log
                        with contextlib.suppress(HotswapError):  # the end says no alike
                            await channel.send(Abort(reason=refusal), timeout=1.0)
                    raise HotswapError(refusal)
                # Too late to refuse: it gave up waiting for our word and let
                # go of them. Ours or nobody's: take what we can.
                log.warning("%s: %s, but the predecessor has let go of them: "
                            "adopting what can be", self.name, refusal)
            # Adopt only what the predecessor knows we have: if it does not
            # hear from us, it serves them on itself. Told first, before the
            # wrapping: it sends the next frame while we wrap this one.
            try:
                await channel.send(Adopted(count=len(message.fds)),
                                   timeout=self.options.message_timeout)
            except BaseException as exc:
                if not _peer_closed(exc):  # it may still serve them
                    close_fds(message.fds)
                    raise
                # It closed the channel without our word: it let go of this
                # complete frame (or died): ours, or nobody's.
                self._adopt_connections(message)
                raise HotswapError(f"predecessor stopped listening: {exc}") from exc
        return self._adopt_connections(message)

    def _label(self, listener: str) -> str | None:
        """Our name for the predecessor's listener ``listener``: the name we
        inherited it under; its own if we did not inherit it (moved: bound
        anew under that name; or dropped); None if we dropped it and that
        name is now another inherited listener's (whose adopter would take
        its connections for that one's)."""
        if listener in self._renamed:
            return self._renamed[listener]
        return None if listener in self._renamed.values() else listener

    def _adopt_connections(self, message: Connections) -> int:
        adopted = 0
        for entry, fd in zip(message.entries, message.fds, strict=True):
            try:
                sock = listeners.adopt_connection_fd(fd)
            except ListenerError as exc:
                # A client's reset meanwhile loses nothing: not a WARNING.
                log.log(logging.INFO if isinstance(exc, listeners.ConnectionEnded)
                        else logging.WARNING, "%s: not adopting connection from %s: %s",
                        self.name, entry.peer, exc)
                continue
            if self._adopter is None:
                sock.close()
                continue
            try:
                self._adopter(self._label(entry.listener) or entry.listener, sock)
            except Exception as exc:  # noqa: BLE001 - the app's callback; we own sock again
                log.warning("%s: adopting connection from %s failed: %s", self.name,
                            entry.peer, exc)
                sock.close()
                continue
            adopted += 1
        return adopted

    # ----------------------------------------------------- old side (server)

    def _serve_control(self) -> None:
        assert self._control_sock is not None
        self._control_sock.setblocking(False)
        self._keep_reserve()
        self._control_task = asyncio.create_task(self._accept_control(self._control_sock))

    def _keep_reserve(self) -> None:
        """Hold the descriptor that :meth:`_accept_control` gives up at the
        process's descriptor limit (see there), if not held already."""
        if self._reserve is None and self._control_sock is not None:
            with contextlib.suppress(OSError):  # still at the limit: next time
                self._reserve = os.eventfd(0, os.EFD_CLOEXEC)

    def _drop_reserve(self) -> None:
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    async def _accept_control(self, sock: socket.socket) -> None:
        """Accept control connections, at most :data:`_CONTROL_CONNECTIONS`
        at a time, so that peers that connect and idle cannot take the
        descriptors the service needs. With every slot taken, a newcomer
        lets go of the oldest connection that has not sent its first message
        yet (every real client sends it at once: a probe, a hook, a
        successor), so such peers cannot keep those clients out either; if
        none is silent, the next connection waits in the kernel's queue.
        Silent means nothing to read on its socket: a handler that has not
        yet read a message that arrived does not make its sender silent.

        One descriptor is kept in reserve while this runs: at the process's
        descriptor limit (its clients can take every one), an accept that
        fails with EMFILE gives the reserve up and accepts into its number,
        so a successor, the hook and the probe still get an answer there;
        the reserve is taken back once a control connection ends."""
        loop = asyncio.get_running_loop()
        freed = asyncio.Event()
        failed_at = -_EVICTION_LOG_EVERY
        let_go = _Throttled(lambda count, _: log.warning(
            "%s: %d control connections at once: let go of %d that had not said "
            "anything", self.name, _CONTROL_CONNECTIONS, count))

        def done(conn: socket.socket, task: asyncio.Task[None]) -> None:
            self._handlers.discard(task)
            self._silent.pop(task, None)
            if task.cancelled():  # maybe before it ran: nobody closed it
                conn.close()
            self._keep_reserve()
            freed.set()

        async def make_room() -> None:
            while len(self._handlers) >= _CONTROL_CONNECTIONS:
                if self._silent:
                    oldest = next((task for task, conn in self._silent.items()
                                   if not _has_spoken(conn)), None)
                    if oldest is None:
                        # Each has bytes waiting that its handler has not read
                        # yet (its step comes after ours): let them read.
                        await asyncio.sleep(0)
                        continue
                    oldest.cancel()
                    await asyncio.wait({oldest})
                    let_go.add()
                else:
                    freed.clear()
                    await freed.wait()

        try:
            while True:
                while len(self._handlers) >= _CONTROL_CONNECTIONS and not self._silent:
                    freed.clear()  # nobody to let go: leave newcomers queued
                    await freed.wait()
                try:
                    # Room made before the accept, not after: cancelled
                    # while making it (the commit's _stop_control), we
                    # would close a connection taken from the shared queue.
                    conn = await _accept(loop, sock, make_room)
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE) and self._reserve is not None:
                        self._drop_reserve()  # accept again, into its number
                        continue
                    if loop.time() - failed_at >= _EVICTION_LOG_EVERY:
                        failed_at = loop.time()
                        log.warning("%s: control accept failed: %s (%s)", self.name, exc,
                                    descriptor_room())
                    await asyncio.sleep(0.1)
                    self._keep_reserve()
                    continue
                task = asyncio.create_task(self._handle_control(conn))
                self._handlers.add(task)
                self._silent[task] = conn
                task.add_done_callback(functools.partial(done, conn))
        finally:
            let_go.flush()

    async def _handle_control(self, conn: socket.socket) -> None:
        channel = Channel(conn, Sender.SERVER)
        keep = False
        try:
            keep = await self._converse(channel)
        except ProtocolError as exc:
            self._control_failed(channel, exc)
            # Tell the peer why, outside the (now dead) conversation.
            channel.send_nowait(Refused(code="protocol", reason=str(exc)))
        except HandoverTimeout as exc:
            self._control_failed(channel, exc)
            channel.send_nowait(Refused(code="timeout", reason=str(exc)))
        except HotswapError as exc:
            # A peer that closed before saying anything is no news (and a
            # flood of them must not flood the log).
            if _peer_closed(exc) and asyncio.current_task() in self._silent:
                log.debug("%s: control connection: %s", self.name, exc)
            else:
                self._control_failed(channel, exc)
        except Exception as exc:  # a bug or input nobody foresaw: this connection only
            log.exception("%s: control connection failed", self.name)
            channel.send_nowait(Refused(code="protocol",
                                        reason=f"internal error: {exc!r}"[:200]))
        finally:
            if not keep:
                channel.close()

    async def _converse(self, channel: Channel) -> bool:
        """Handle one control connection; True if it became our successor's."""
        timeout = self.options.message_timeout
        pid, uid, _ = channel.peer_credentials()
        if uid not in self._allowed_uids:
            self._refused.add(pid, uid)
            await channel.send(Refused(code="forbidden",
                                       reason=f"uid {uid} is not allowed"),
                               timeout=timeout)
            return False
        try:
            first = await channel.receive(timeout=timeout)
        except HandoverTimeout:
            # A loop that was stalled (stopped, starved) past the deadline
            # wakes to its timer before its socket: a message that already
            # arrived still counts (a status query, a hello).
            try:
                first = await channel.receive(timeout=0)  # no wait: only what is there
            except HandoverTimeout:
                # Said to the peer too (Refused "timeout"): a successor that
                # was stopped or starved before its hello learns why, and
                # tries again.
                raise HandoverTimeout(f"nothing received within {timeout:.1f}s of "
                                      f"connecting: gave up on this connection") from None
        if (me := asyncio.current_task()) is not None:
            self._silent.pop(me, None)
        if isinstance(first, StatusRequest):
            try:
                await channel.send(self.status(), timeout=timeout)
            except HotswapError as exc:
                if not _peer_closed(exc):
                    raise
                # A probe, the hook or `hotswap status` that gave up waiting
                # (its own timeout) or was killed: no news here (its own
                # failure is reported where it ran), and one WARNING each,
                # at a probe's pace or a loop's, flooded the log.
                log.debug("%s: status client pid %d left before its answer (%s)",
                          self.name, pid, exc)
            return False
        assert isinstance(first, Hello)
        refusal = self._refusal(first)
        if refusal is not None:
            if refusal.code == "busy":
                # Normal (an upgrade that comes while the last one's
                # predecessor still drains) and lossless: the successor
                # retries, up to ~1/s, until we take it. One WARNING a retry
                # paged whoever alerts on WARNING, dozens of times an upgrade.
                level = logging.DEBUG if self._busy_refused == first.pid else logging.INFO
                self._busy_refused = first.pid
                log.log(level, "%s: successor pid %d must wait (busy: %s); it tries again",
                        self.name, first.pid, refusal.reason)
            elif not self._refused_hellos.add(first.pid, refusal.code, refusal.reason):
                log.debug("%s: refused successor pid %d (%s): %s", self.name, first.pid,
                          refusal.code, refusal.reason)
            await channel.send(refusal, timeout=timeout)
            return False
        return await self._hand_over(channel, first)

    def _control_failed(self, channel: Channel, error: HotswapError) -> None:
        """Log that a control connection failed for what its peer did or did
        not send (a successor's failed handover is logged where it fails, in
        full): a WARNING each, :data:`_CONTROL_FAILURES_AT_ONCE` of them,
        then at most one per :data:`_EVICTION_LOG_EVERY` seconds with the
        count (see :class:`_Throttled`); the ones held back go to DEBUG
        each. What the peer is told does not change."""
        try:
            pid = channel.peer_credentials()[0]
        except OSError:  # the socket is gone: the peer is unknown
            pid = 0
        if not self._garbled.add(pid, error):
            log.debug("%s: control connection: %s (peer pid %d)", self.name, error, pid)

    def _log_garbled(self, count: int, last: tuple[object, ...]) -> None:
        """The line for control connections that failed (see
        :meth:`_control_failed`): the last one's reason and peer, and the count."""
        pid, error = last
        if count == 1:
            log.warning("%s: control connection: %s (peer pid %d)", self.name, error, pid)
        else:
            log.warning("%s: control connection: %s (peer pid %d; %d control connections "
                        "failed in all since the last such line)", self.name, error, pid,
                        count)

    def _log_refused_hello(self, count: int, last: tuple[object, ...]) -> None:
        """The line for successors refused other than as busy (see
        :class:`_Throttled`): the last one's pid, code and reason, and the
        count."""
        pid, code, reason = last
        if count == 1:
            log.warning("%s: refused successor pid %d (%s): %s", self.name, pid, code, reason)
        else:
            log.warning("%s: refused successor pid %d (%s): %s (%d successors refused in "
                        "all since the last such line)", self.name, pid, code, reason, count)

    def _log_refused(self, count: int, last: tuple[object, ...]) -> None:
        """The line for control peers refused for their uid (see
        :class:`_Throttled`): the last one's pid and uid, and the count."""
        pid, uid = last
        if count == 1:
            log.warning("%s: refused control peer pid %d uid %d", self.name, pid, uid)
        else:
            log.warning("%s: refused control peer pid %d uid %d (%d refused in all since "
                        "the last such line: uids not allowed)", self.name, pid, uid, count)

    def _refusal(self, hello: Hello) -> Refused | None:
        if hello.protocol != PROTOCOL_VERSION:
            return Refused(code="protocol", reason=f"protocol {hello.protocol} "
                           f"not supported (this is {PROTOCOL_VERSION})")
        if self.options.token and not hmac.compare_digest(
                hello.token.encode("utf-8", "surrogatepass"),
                self.options.token.encode("utf-8", "surrogatepass")):
            return Refused(code="forbidden", reason="bad or missing token")
        if self._stop_requested:  # serving still, until it lets go of the control socket
            return Refused(code="busy", reason="a stop was requested")
        if self.state is not State.SERVING:
            return Refused(code="busy", reason=f"state is {self.state.value}")
        if self._predecessor in ("accepting", "draining"):
            return Refused(code="busy", reason="previous generation still draining")
        mine = self.versions.rank
        if hello.rank is not None and mine is not None and hello.rank <= mine:
            return Refused(code="older", reason=f"version {hello.rank} may not take "
                           f"over from version {mine}")
        return None

    async def _hand_over(self, channel: Channel, hello: Hello) -> bool:
        opts = self.options
        hello_at = time.time()
        self._set_state(State.HANDING_OVER)
        try:
            assert self._control_sock is not None
            self._forget_closed_listeners()
            entries = [e.info for e in self._listeners.values()]
            socks = [e.sock for e in self._listeners.values()]
            entries.append(SocketInfo(name=control.CONTROL_NAME, family="unix",
                                      kind="stream", address=self.address))
            socks.append(self._control_sock)
            await channel.send(Welcome(pid=self.pid, version=self.version,
                                       count=len(entries), generation=self.generation,
                                       capabilities=tuple(c for c in hello.capabilities
                                                          if c in (_ACK, _REFUSAL))),
                               timeout=opts.message_timeout)
            try:
                for chunk in split_sockets(entries, [s.fileno() for s in socks]):
                    await channel.send(chunk, timeout=opts.message_timeout)
            except BrokenResourceError as exc:
                if not _peer_closed(exc):
                    # Our own failure (a descriptor closed behind its socket
                    # object's back: EBADF), not the successor's: the
                    # outer handler tells it why (Failed), rather than leave
                    # it an EOF it takes for us gone and retries until its
                    # connect_timeout, failing the same way each time.
                    raise
                await self._successor_aborted(channel, exc)
            # Not before: the successor waits for the sockets.
            log.info("%s: handing over to pid %d (%s): %d socket(s) sent", self.name,
                     hello.pid, hello.version, len(entries))
            while True:
                reply: Message = await self._successor_verdict(channel)
                if isinstance(reply, Accepting):
                    break
                assert isinstance(reply, Abort)
                raise HandoverFailed(f"successor aborted: {reply.reason}")
        except Exception as exc:
            # Whatever went wrong before the successor confirmed, the sockets
            # are still ours and we still accept: serve on.
            log.warning("%s: handover to pid %d failed, %s: %s", self.name, hello.pid,
                        "released meanwhile" if self._released else "still serving", exc,
                        exc_info=not isinstance(exc, (HotswapError, OSError)))
            if not channel.closed and not _peer_closed(exc):
                # Best effort: a channel left mid-frame refuses it at once.
                with contextlib.suppress(HotswapError):
                    await channel.send(Failed(reason=str(exc)), timeout=1.0)
            # Released meanwhile (a stop's release() that did not wait for
            # wait_exit()): its listeners and control socket are closed, and
            # serving again would only bind the serving marker again.
            self._set_state(State.DRAINING if self._released else State.SERVING)
            if self._stop_requested:
                self._finish(ExitReason.STOP_REQUESTED)
            return False
        # Committed: the successor is accepting on every socket.
        self._handover_times = (hello_at, time.time())
        self._successor_caps = frozenset(hello.capabilities)
        log.info("%s: pid %d confirmed; stopping accepting", self.name, hello.pid)
        self._successor = channel
        await self._stop_control()
        self._set_state(State.DRAINING)
        if self._released:
            # release() came during the handover, with nobody to tell yet:
            # without Released the successor takes us for gone.
            await self._tell_released()
        self._finish(ExitReason.TAKEN_OVER)
        return True

    @staticmethod
    async def _successor_aborted(channel: Channel, error: BrokenResourceError) -> NoReturn:
        """After sending the sockets failed (the successor closed while we
        were still sending): raise HandoverFailed with the successor's
        reason if its Abort is already here (one that could not take the
        first frames says why, then closes), else ``error``. Reads only
        what is there, no wait; the sockets stay ours either way."""
        try:
            said = await channel.receive(timeout=0)
        except HotswapError:
            raise error from error.__cause__
        if isinstance(said, Abort):
            raise HandoverFailed(f"successor aborted: {said.reason}") from error
        raise error from error.__cause__

    async def _successor_verdict(self, channel: Channel) -> Message:
        """The successor's next message, within ``handover_timeout``. A loop
        that was stalled (stopped, starved) past the deadline wakes to its
        timer before its socket: what already arrived still counts. An
        ``Accepting`` there means the successor accepts, and it may have
        stopped waiting for our answer (it serves on without one): failing
        the handover then would leave two versions accepting for good."""
        try:
            return await channel.receive(timeout=self.options.handover_timeout)
        except HandoverTimeout as exc:
            try:
                return await channel.receive(timeout=0)  # no wait: only what is there
            except HandoverTimeout:
                raise exc from None

    async def _tell_released(self) -> None:
        """Tell the successor we released, once: by :meth:`release`, or by
        the commit of a handover that a release came during (whichever comes
        second finds it said; a second Released breaks the protocol, and
        the channel with it). The check and the send's framing happen in
        one step (nothing else sends then, so the channel's lock is free)."""
        channel = self._successor
        if (channel is not None and not channel.closed
                and channel.conn.state is Conversation.CONFIRMED):
            await self._tell_successor(Released(pid=self.pid))

    async def _tell_successor(self, message: Message) -> None:
        channel = self._successor
        if channel is None or channel.closed:
            return
        try:
            await channel.send(message, timeout=self.options.message_timeout)
        except HotswapError as exc:
            log.info("%s: successor did not take %s: %s", self.name, message.TYPE, exc)
            channel.close()
            self._successor = None

    async def _stop_control(self) -> None:
        # Cancel the accept loop and let it unregister its reader before the
        # descriptor is closed (a closed fd number can be reused at once).
        task = self._control_task
        self._control_task = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._control_sock_close()
        self._refused.flush()
        self._garbled.flush()
        self._refused_hellos.flush()

    def _control_sock_close(self) -> None:
        self._drop_reserve()
        if self._control_sock is not None:
            # Only close(): never shutdown() a socket another process shares.
            self._control_sock.close()
            self._control_sock = None

    # ----------------------------------------------------------------- misc

    def _finish(self, reason: ExitReason) -> None:
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(reason)

    def _set_state(self, state: State) -> None:
        self.state = state
        self._mark_serving(state in (State.SERVING, State.HANDING_OVER))
        self._set_title()

    def _mark_serving(self, serving: bool) -> None:
        """Keep the serving marker (:func:`control.serving_marker`) bound
        exactly while serving (handing over included: we accept until the
        successor confirms; as a successor, from the moment we begin
        confirming), renewed by the event loop, for the readiness probe and
        the PostStart hook. Best effort: if the marker cannot be bound (no descriptor
        left, or the name is taken), that is logged and we serve on without
        one; the probe then asks the control socket. We own the marker
        socket: closed here on leaving ``serving`` or on renewal, and by the
        kernel if we die."""
        if not serving:
            if self._marker_timer is not None:
                self._marker_timer.cancel()
                self._marker_timer = None
            if self._marker is not None:
                self._marker.close()
                self._marker = None
            self._marker_name = ""
            return
        if (self._marker_timer is not None or self.versions.rank is None
                or self.options.control_path):
            return
        self._renew_marker()

    def _renew_marker(self) -> None:
        rank = self.versions.rank
        assert rank is not None
        name = control.serving_marker(self.name, rank, int(time.time()))
        if name != self._marker_name:  # else the same second: keep the bound one
            sock = None
            try:
                sock = socket.socket(socket.AF_UNIX,
                                     socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.bind(control.sockaddr(name))
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if not self._marker_warned:  # say it once
                    self._marker_warned = True
                    log.warning("%s: no serving marker for the readiness probe: %s",
                                self.name, exc)
            else:
                if self._marker is not None:
                    self._marker.close()
                self._marker, self._marker_name = sock, name
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving the class by hand): no renewal
            return
        self._marker_timer = loop.call_later(control.MARKER_REFRESH, self._renew_marker)

    def _set_title(self) -> None:
        _proc.set_title(f"hotswap[{self.name}] {self.version} {self.state.value}")
