"""Serve an aiohttp application with lossless hot upgrades.

:func:`serve` runs the whole lifecycle. Its sites' servers are made not
accepting yet; :meth:`~hotswap.Upgrader.ready` starts them as it confirms a
handover (at once on a fresh start), so that a successor that dies or
backs out before confirming has accepted nothing. The drain, in order:

1. The successor confirmed it is accepting on every socket
   (:attr:`~hotswap.ExitReason.TAKEN_OVER`), or a stop was requested (the
   app's own ``upgrader.close()`` while this runs counts as one).
2. Stop accepting: each ``SockSite`` is stopped, which closes *our* descriptor
   of the listener; the kernel socket and its queue live on in the successor.
   Never ``shutdown()``.
3. From now on every response carries ``Connection: close`` (see
   :class:`Drainer` for how, at no cost before the drain), so each keep-alive
   client is told to reconnect on its next response, and reconnects to the
   successor. Idle keep-alive connections are *not* closed: closing one races
   a client that is sending on it at that moment (aiohttp's own ``cleanup()``
   does that first, and loses one request per keep-alive connection).
4. Tell the successor (``Released``): it is now the only acceptor.
5. ``serve(on_drain=...)``, if given, is called: close websockets and other
   long-lived responses there (``WSCloseCode.GOING_AWAY``), so that their
   clients reconnect to the successor now, not at the deadline.
6. Wait until every connection has closed, or the drain deadline
   (``drain_timeout``, default 25 s to fit Kubernetes' 30 s grace period).
7. At the deadline, cut the idle connections that are left, and log each; a
   connection still busy with a request is told ``Connection: close`` on its
   response instead. Then, in aiohttp's own order (idle connections closed,
   ``on_shutdown``, the wait for busy handlers), the app's ``on_shutdown``
   callbacks start, and the busy connections get a grace (1 s in all) to
   send their response, still reading their request's body meanwhile. What
   is still busy after that (a stream, a websocket) is cut, logged and
   counted.
8. ``AppRunner.cleanup()`` (cuts those; then ``on_cleanup``), tell the
   successor (``Drained``), and return. In a Kruise slot (``SIDECARSET_VERSION`` set) the
   process then idles without sockets until SIGTERM, since exiting would make
   the kubelet restart the container.

Signals: the first SIGTERM/SIGINT requests a stop (a drain; while the app's
``on_startup`` callbacks run, it cancels them and serve() returns, a
successor aborting its takeover); the second cuts
the drain short (closes every connection now); the third exits at once.
SIGHUP is logged and ignored (its default action would kill the process with
no drain; there is nothing to reload in place: an upgrade is a new version).
On return, actions set with ``signal.signal()`` (SIG_IGN included) are put
back; a handler the app had added to the event loop for one of them is gone
(the default action then applies).

Limits: a response that the handler has already prepared (streamed) before the
drain started cannot carry ``Connection: close``; its connection is told on the
next response. HTTP/1.1 pipelined requests after a ``Connection: close``
response are not answered (clients must retry them, RFC 9112 9.3.2).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import logging
import numbers
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeGuard

from aiohttp import web

from ._framing import RequestFramer
from .errors import HandoverFailed, HotswapError, ListenerError
from .kruise import Role
from .listeners import DEFAULT_BACKLOG, Address, check_address, close_server, is_tcp
from .migrate import ACK_FLOOR, Migrator, Tracked, TrackedSite, init_like_server
from .migrate import supported as _migration_supported
from .upgrader import ExitReason, State, Upgrader, is_seconds

log = logging.getLogger("hotswap")

DEFAULT_DRAIN_TIMEOUT = 25.0
"""Seconds to let connections finish after a handover or stop request."""

DEFAULT_CLEANUP_TIMEOUT = 3.0
"""Seconds the app's ``on_shutdown`` callbacks get, all together, from the
drain's end (beside the busy connections' 1 s grace), and ``serve()``'s
``on_drain`` from the drain's start; ``on_cleanup`` must be over by the
drain's end + 1 s + this. With the defaults, drain (25 s), grace (1 s) and
these end a stop within 29 s (0.1 s more when the successor's
acknowledgement of a frame of connections timed out at the drain's end:
the old side's wait for its last word): inside Kubernetes' default 30 s
grace period, after which the kubelet kills."""

GRACE = 1.0
"""Seconds a request still being handled when the drain ends gets to send
its response (then its connection is cut)."""

# ACK_FLOOR (hotswap.migrate): what each frame of connections gets at least
# for its acknowledgement. A handover in the grace gets it however little of
# the grace is left (Drainer.grace gets GRACE - 2 * _CANCEL_WAIT); a round of
# the drain itself with less than it left (but its first) hands nothing over:
# the grace's first round hands over what is idle then.
_CANCEL_WAIT = 0.05
"""The runner's ``shutdown_timeout``, the end of :data:`GRACE`: aiohttp waits
it for a busy handler, cancels its request and waits it again. The rest of
the grace is :meth:`Drainer.grace`'s, which, unlike aiohttp's, still reads
the request bodies (aiohttp stops reading a connection once it shuts down,
so an upload still arriving could never be answered)."""

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _restorable(action: object) -> bool:
    """Whether ``serve()`` can put a signal action back: SIG_IGN, SIG_DFL or
    a handler set with ``signal.signal()``. Not None (set outside Python),
    nor an event loop's own (its ``add_signal_handler`` callback went with
    ours: restoring the loop's stub would swallow the signal), which leaves
    the default action."""
    package = (getattr(action, "__module__", None) or "").partition(".")[0]
    return action is not None and package not in ("asyncio", "uvloop")


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _closing(factory: Any) -> Any:
    """A request factory whose requests read as ``should_close``."""
    def make(message: Any, *args: Any) -> Any:
        return factory(message._replace(should_close=True), *args)
    make._hotswap_closing = True  # type: ignore[attr-defined]
    return make


def _held_requests(handler: web.RequestHandler) -> bool:
    """Whether ``handler``, which looks idle, has whole requests queued once
    aiohttp's parser is asked for what it holds (what aiohttp does itself
    when its queue drains). aiohttp 3.14's parser can hold pipelined
    requests unparsed on a connection that looks idle until its client
    sends more (see :meth:`hotswap.migrate.Tracked.idle_at_boundary`): cut
    as idle, they were lost."""
    web.RequestHandler.data_received(handler, b"")
    return bool(getattr(handler, "_messages", ()))


def _request_arriving(handler: web.RequestHandler) -> bool:
    """Whether ``handler``, which looks idle to aiohttp, has received part
    of a request and not the rest (its head, or a body aiohttp reads no
    more): its client is sending it. Known only where a
    :class:`~hotswap._framing.RequestFramer` follows the connection (a
    :class:`~hotswap.migrate.Tracked` or a TLS one) and has not given up.
    Cut as idle at the deadline, that request was lost (its client got
    EOF as it sent the rest)."""
    framer = getattr(handler, "framer", None)
    return isinstance(framer, RequestFramer) and not framer.boundary and not framer.lost


_PEERS_SHOWN = 5
"""How many connections' peers one line about the drain's cuts names (see
:func:`_log_connections`); the rest are counted, and named at DEBUG."""


def _log_connections(level: int, what: str, peers: list[object], outcome: str = "", *,
                     name: str = "") -> None:
    """One line for connections the drain dealt with alike at once: the
    sidecar's ``name`` (if any), ``what`` ("drain deadline: cutting idle"),
    "connection(s) from" the first :data:`_PEERS_SHOWN` ``peers`` and how
    many more, then ``outcome``. A line a connection flooded the log (at
    WARNING) at each stop of a process whose clients keep pools of idle
    keep-alive connections: one per connection, thousands at once. Nothing
    is logged for no ``peers``."""
    if not peers:
        return
    if name:
        what = f"{name}: {what}"
    shown = ", ".join(str(peer) for peer in peers[:_PEERS_SHOWN])
    more = len(peers) - _PEERS_SHOWN
    log.log(level, "%s connection%s from %s%s%s", what, "s" if len(peers) > 1 else "",
            shown, f" and {more} more ({len(peers)} in all)" if more > 0 else "", outcome)
    if more > 0:
        log.debug("%s: every connection: %s", what, ", ".join(str(peer) for peer in peers))


def _open(server: web.Server) -> bool:
    """Whether a connection of ``server`` still needs the drain: its socket
    is open, or the app's handler is still running for it. aiohttp keeps a
    connection in ``server.connections`` until its loop ends, and that loop
    outlives the socket while it "lingers" over the rest of a body its
    handler did not read (up to ``lingering_time``, 10 s): a client that
    stopped sending and closed after an early answer (curl ``-T`` to a 405,
    a 401, a 413) is waited for by nothing, and nothing can be sent to it.
    Owns nothing; reads aiohttp's handler state only."""
    return any(handler.transport is not None
               or getattr(handler, "_current_request", None) is not None
               for handler in server.connections)


def _can_swap_request_factory() -> bool:
    """Can a connection's request factory be swapped (aiohttp 3.x)?"""
    return "_request_factory" in getattr(web.RequestHandler, "__slots__", ())


_FIRST_ROUND = 1.0
"""Seconds the drain's first connection handover gets, however short the
drain: the time to acknowledge one frame."""


_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS client gets to complete its handshake (asyncio's default:
60): how long one that never does holds a descriptor."""
_HANDSHAKE_WAIT = 2.0
"""Seconds after its accept, or after the drain began if later, that a TLS
handshake still in progress keeps a drain waiting for it (a handshake takes
milliseconds; one older than this has most likely failed, which nothing
reports)."""


class _Handshakes:
    """TLS connections accepted whose handshake is not over. aiohttp's
    server knows a connection only once its handshake has ended: a drain
    that looked only there could end, and its process exit, under a client
    still shaking hands (its first request then fails). A handshake that
    fails is never reported, so each counts for :data:`_HANDSHAKE_WAIT`
    seconds at most."""

    def __init__(self) -> None:
        # Oldest first: begun() appends with the loop's (monotonic) time and
        # renew() gives them all the same, so pruning stops at the first one
        # still young (an OrderedDict: a dict's front, emptied one by one,
        # is scanned again at each look).
        self._begun: collections.OrderedDict[web.RequestHandler, float] = \
            collections.OrderedDict()

    def begun(self, handler: web.RequestHandler, now: float) -> None:
        self._prune(now)  # each accept drops the ones that failed long ago
        self._begun[handler] = now

    def ended(self, handler: web.RequestHandler) -> None:
        self._begun.pop(handler, None)

    def renew(self, now: float) -> None:
        """The drain begins: each handshake in progress gets
        :data:`_HANDSHAKE_WAIT` from now (a client may have connected just
        before, or long before: nothing tells which is still shaking
        hands)."""
        for handler in self._begun:
            self._begun[handler] = now

    def pending(self, now: float) -> int:
        self._prune(now)
        return len(self._begun)

    def _prune(self, now: float) -> None:
        # Only the expired ones, from the front: under a port scan (every
        # handshake fails, none is ever reported) thousands are in progress,
        # and a pass over all of them at each accept cost the loop more
        # than the accepts themselves.
        begun = self._begun
        while begun:
            handler = next(iter(begun))
            if now - begun[handler] <= _HANDSHAKE_WAIT:
                return
            del begun[handler]


class _TLSHandler(web.RequestHandler):
    """aiohttp's RequestHandler for a TLS listener, known to its
    :class:`_Handshakes` from its accept to its handshake's end (its
    ``connection_made``). Made as aiohttp's server makes handlers."""

    __slots__ = ("_handshakes", "framer")

    def __init__(self, server: web.Server, handshakes: _Handshakes) -> None:
        init_like_server(self, server)
        self._handshakes = handshakes
        handshakes.begun(self, asyncio.get_running_loop().time())
        # Where its requests end, so that the drain's deadline can tell a
        # request still arriving from an idle connection (never to move a
        # TLS connection): see _request_arriving().
        self.framer = RequestFramer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handshakes.ended(self)
        web.RequestHandler.connection_made(self, transport)

    def data_received(self, data: bytes) -> None:
        web.RequestHandler.data_received(self, data)
        if data:  # aiohttp calls it with b"" itself, to parse what it holds
            self.framer.feed(data)


class _Site(web.SockSite):
    """aiohttp's ``SockSite``, whose server does not accept once started:
    :meth:`~hotswap.Upgrader.ready` starts it (``start_serving``)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog,
            start_serving=False)


class _TLSSite(web.SockSite):
    """A ``SockSite`` serving TLS whose connections are :class:`_TLSHandler`
    (never handed over: their session state cannot move), with a handshake
    timeout of :data:`_HANDSHAKE_TIMEOUT`. Not accepting once started, like
    :class:`_Site`."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket,
                 ssl_context: ssl.SSLContext, handshakes: _Handshakes) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=DEFAULT_BACKLOG)
        self._handshakes = handshakes

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _TLSHandler(server, self._handshakes), sock=self._sock,
            ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=_HANDSHAKE_TIMEOUT, start_serving=False)


class Drainer:
    """Tells keep-alive clients to go once draining, and tracks the drain.

    How the next response of each connection learns to say ``Connection:
    close``: by default the connections' request factory is wrapped when the
    drain starts, so every request parsed from then on (and each request in
    progress) reads as ``should_close``, and aiohttp itself answers with
    ``Connection: close`` and closes after the response. That costs nothing per request before the
    drain. Where aiohttp does not allow that (``zero_cost=False``, or a
    future aiohttp without the attribute), a middleware calls
    ``force_close()`` on each response before it is prepared instead (about
    10% of the sample sidecar's throughput, measured by ``make bench``).

    ``name``, the sidecar's (its :class:`~hotswap.Upgrader`'s), begins each
    line the drain logs, as it begins the Upgrader's own: with two sidecars
    in one log stream, a line about cut connections names its process.
    """

    def __init__(self, *, zero_cost: bool | None = None, name: str = "") -> None:
        self.name = name
        self.draining = False
        self.zero_cost = _can_swap_request_factory() if zero_cost is None else zero_cost
        self._forced = asyncio.Event()
        # TLS handshakes in progress (serve() sets it when it serves TLS):
        # a drain waits for them as for connections.
        self.handshakes: _Handshakes | None = None
        # Whether a connection that joins the server during the drain is told
        # to close (every one), or only one that cannot move (not Tracked).
        self._tell_all = False
        # Connections that joined the server in the drain (a TLS handshake
        # that ended then): see _first_request_due().
        self._joined: set[web.RequestHandler] = set()

    def install(self, app: web.Application) -> None:
        """Prepare ``app`` (before the runner is set up)."""
        if not self.zero_cost:
            app.middlewares.append(self.middleware)

    def start(self, server: web.Server, *, every_connection: bool = True) -> None:
        """From now on responses say ``Connection: close``: on every
        connection, or (``every_connection=False``, while migrating) only on
        those later passed to :meth:`close_after_next_response`."""
        if not self.draining and self.handshakes is not None:
            self.handshakes.renew(asyncio.get_running_loop().time())
        self.draining = True
        self._tell_all = self._tell_all or every_connection
        self._watch(server)
        if not self.zero_cost or not every_connection:
            return
        if not getattr(server.request_factory, "_hotswap_closing", False):
            server.request_factory = _closing(server.request_factory)
        for handler in server.connections:
            self.close_after_next_response(handler)

    def _watch(self, server: web.Server) -> None:
        """Tell connections that join ``server`` from now on, too. A TLS
        connection accepted before the drain joins once its handshake is
        over, which may be after the drain started: it took the request
        factory as it was when accepted, and no round of the drain has seen
        it. Idempotent."""
        if getattr(server, "_hotswap_watched", False):
            return
        made = server.connection_made

        def connection_made(handler: web.RequestHandler, *args: Any) -> None:
            made(handler, *args)
            self._joined.add(handler)
            # A Tracked one is the connection handover's (Migrator.step)
            # while it runs; when it stops, start() sets _tell_all.
            if self._tell_all or not isinstance(handler, Tracked):
                self.close_after_next_response(handler)

        server.connection_made = connection_made  # type: ignore[method-assign,assignment]
        server._hotswap_watched = True  # type: ignore[attr-defined]

    def close_after_next_response(self, handler: web.RequestHandler) -> None:
        """Make ``handler``'s next response (and the one in progress, if not
        yet prepared) say ``Connection: close``. Idempotent."""
        if not self.zero_cost:
            return  # the middleware does it for every response once draining
        conn: Any = handler
        factory = conn._request_factory
        if factory is not None and not getattr(factory, "_hotswap_closing", False):
            conn._request_factory = _closing(factory)
        request = conn._current_request
        if request is not None and not request._message.should_close:
            # A request in progress: its response is not prepared yet (or it
            # is too late anyway), so let it read as should_close too, also
            # if its keep_alive was read (and cached) before.
            request._message = request._message._replace(should_close=True)
            request._cache.pop("keep_alive", None)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: _Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if self.draining:
                exc.force_close()
            raise
        if self.draining:
            # Before prepare(): aiohttp then sends "Connection: close".
            response.force_close()
        return response

    def force(self) -> None:
        """Cut the drain short (a second signal)."""
        self._forced.set()

    async def drain(self, server: web.Server, timeout: float, *,
                    migrator: Migrator | None = None,
                    upgrader: Upgrader | None = None) -> int:
        """Wait for every connection of ``server`` to close, up to ``timeout``,
        handing idle keep-alive connections to the successor meanwhile when a
        ``migrator`` and ``upgrader`` are given and the successor adopts them.

        Returns how many were cut at the deadline (logged, one line for those alike; see
        :meth:`_deadline`).
        """
        migrating = (migrator is not None and upgrader is not None
                     and upgrader.can_hand_over_connections)
        if not migrating:
            self.start(server)  # idempotent
        else:
            assert migrator is not None
            movable: set[web.RequestHandler] = set(migrator.tracked)
            for handler in server.connections:
                if handler not in movable:  # a Unix socket's: the safe way
                    self.close_after_next_response(handler)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # From here on a busy connection is told to close with its response:
        # one sent keep-alive could not count on a move before the cut.
        last_call = deadline - min(1.0, timeout / 10)
        # Handing idle connections over loses nothing and takes milliseconds,
        # cutting them races their clients: the first round runs even with
        # no time left (drain_timeout=0), with up to _FIRST_ROUND to do it.
        first = migrating
        while (_open(server) or self._handshaking()) \
                and (loop.time() < deadline or first) and not self._forced.is_set():
            if migrating:
                assert migrator is not None and upgrader is not None
                time_left = deadline - loop.time()
                # A later round with less than ACK_FLOOR left hands nothing
                # over (its busy ones are told to close, or paused to move in
                # the grace, as in any other round): it gave the
                # successor's acknowledgement of a frame what was left, down
                # to nothing, and one a few milliseconds late ended the
                # channel, so that what was to move in the grace (a response
                # still being sent, kept alive to move) was cut instead.
                # What is idle at a boundary then moves in the grace's first
                # round.
                move = first or time_left >= ACK_FLOOR
                if first:
                    time_left, first = max(time_left, _FIRST_ROUND), False
                if not await migrator.step(upgrader, self.close_after_next_response,
                                           time_left, last_call=loop.time() >= last_call,
                                           move=move):
                    migrating = False
                    log.info("%sconnection handover stopped; the rest drain the safe way",
                             f"{self.name}: " if self.name else "")
                    self.start(server)
                    for conn in migrator.tracked:
                        conn.resume()
            # Poll: aiohttp has no "connection closed" hook for a server.
            try:
                # A paused connection's next request waits in the kernel until
                # it moves: look again soon while any is waiting.
                interval = (0.001 if migrator is not None and migrator.pending else 0.01) \
                    if migrating else 0.02
                async with asyncio.timeout(min(interval, max(0.0, deadline - loop.time()))):
                    await self._forced.wait()
            except TimeoutError:
                pass
        return self._deadline(server, migrator, moving=migrating)

    def _handshaking(self) -> bool:
        """A TLS handshake is still in progress (see :class:`_Handshakes`):
        once over, its connection joins the server and is told to close."""
        return self.handshakes is not None and bool(
            self.handshakes.pending(asyncio.get_running_loop().time()))

    def _first_request_due(self, handler: web.RequestHandler) -> bool:
        """``handler`` joined the server in the drain (its TLS handshake
        ended then) and has received nothing of a request yet: its client
        is about to send its first one. Cut as idle at the deadline, or in
        the grace, that request failed, on a connection just opened."""
        return (handler in self._joined and getattr(handler, "_request_count", 1) == 0
                and not self._forced.is_set())

    def _to_move(self, handler: web.RequestHandler, migrator: Migrator) -> TypeGuard[Tracked]:
        """Idle at a request boundary and the connection handover's: it can
        move (once its last response is sent, if it is still being sent).
        Not after a forced drain."""
        return (handler in migrator.tracked and not self._forced.is_set()
                and isinstance(handler, Tracked) and handler.idle_at_boundary())

    async def grace(self, server: web.Server, seconds: float, *,
                    migrator: Migrator | None = None,
                    upgrader: Upgrader | None = None) -> int:
        """After :meth:`drain`: let the connections still busy (each told
        ``Connection: close`` by then) finish their response for up to
        ``seconds``, reading what their client still sends; a second signal
        ends the wait. One that goes idle and stays open (its response, begun
        before the drain, said keep-alive) is cut at once; with a
        ``migrator`` and an ``upgrader`` whose successor still adopts, one
        whose response was begun keep-alive to move is handed over once it
        is sent, and waited for until then. Returns how many were cut or are
        still busy, logged (one line for those alike): the runner's clean-up cuts the busy ones (a
        stream, a websocket, a handler that does not end)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        cut: list[object] = []  # the idle ones' peers, logged together at the end
        moving = (migrator is not None and upgrader is not None
                  and upgrader.can_hand_over_connections)

        def left() -> list[web.RequestHandler]:
            busy = []
            for handler in list(server.connections):
                transport = handler.transport
                if transport is None or transport.is_closing():
                    continue
                waiter = getattr(handler, "_waiter", None)
                if waiter is None or waiter.done() or getattr(handler, "_messages", None):
                    busy.append(handler)  # busy, or closing after its response
                    continue
                if moving and migrator is not None and self._to_move(handler, migrator):
                    # Moves in the next round (once sent, if still being
                    # sent): it may have gone idle while this one waited for
                    # the successor's acknowledgement.
                    busy.append(handler)
                    continue
                if not self._forced.is_set() and (_held_requests(handler)
                                                  or _request_arriving(handler)
                                                  or (isinstance(handler, Tracked)
                                                      and handler.unread())
                                                  or self._first_request_due(handler)):
                    # Requests aiohttp's parser held, queued now (here, or
                    # by _to_move just above), one still arriving, one
                    # waiting in the kernel (sent while a handover that
                    # failed in this round held the reading: resumed, it is
                    # read at the loop's next poll), or the first of a
                    # connection that joined in the drain: busy, told to
                    # close.
                    self.close_after_next_response(handler)
                    busy.append(handler)
                    continue
                # Its last response said keep-alive (begun before it could be
                # told): idle past the deadline, cut as at the deadline.
                cut.append(transport.get_extra_info("peername"))
                handler.force_close()
            return busy

        try:
            while True:
                if moving and not self._forced.is_set():
                    assert migrator is not None and upgrader is not None
                    # Hands over what is sent and idle at a boundary; tells the
                    # rest to close, as the drain's last rounds do.
                    # At least ACK_FLOOR for a frame's acknowledgement (one
                    # timed out is let go of with the channel): the grace may run
                    # over by that much, within GRACE.
                    moving = await migrator.step(upgrader, self.close_after_next_response,
                                                 max(ACK_FLOOR, until - loop.time()),
                                                 last_call=True)
                busy = left()  # (not a bool first: it cuts what it finds idle)
                if not ((busy or self._handshaking()) and loop.time() < until
                        and not self._forced.is_set()):
                    break
                try:
                    async with asyncio.timeout(min(0.01, max(0.0, until - loop.time()))):
                        await self._forced.wait()
                except TimeoutError:
                    pass
            busy = left()
        finally:  # also when cancelled: what was cut is said
            _log_connections(logging.WARNING, "drain deadline: cutting idle", cut,
                             name=self.name)
        peers = []
        for handler in busy:
            assert handler.transport is not None
            peers.append(handler.transport.get_extra_info("peername"))
        _log_connections(logging.WARNING, "drain grace over: cutting busy", peers,
                         name=self.name)
        return len(cut) + len(busy)

    def _deadline(self, server: web.Server, migrator: Migrator | None, *,
                  moving: bool = False) -> int:
        """What is left at the deadline: idle connections are cut; one busy
        with a request is told ``Connection: close`` on its response and gets
        :meth:`grace` to send it (a forced drain cuts it too). While
        connections are still ``moving`` to the successor, an idle one at a
        request boundary is left to :meth:`grace`, whose first round hands
        it over (one whose last response, keep-alive: it was to move, is
        still being sent, once that is sent): it went idle after the last
        round (a response sent keep-alive before it was told, which ended
        while that round waited for the successor's acknowledgement, or
        since), and cut, the next request its client sent on it failed.
        Returns how many were cut; they are logged, one line for those alike
        (see :func:`_log_connections`)."""
        if migrator is not None:
            for conn in migrator.tracked:  # a paused one's next request is waiting
                conn.resume()
        cut = 0
        told: list[object] = []  # busy, told to close: their peers, logged together
        idle: list[object] = []  # cut: their peers, logged together
        forced: list[object] = []  # busy, cut (a forced drain)
        sending: list[object] = []  # still sending a response, then moving
        for handler in server.connections:
            transport = handler.transport
            if transport is None or transport.is_closing():
                continue  # closing already: handed over, or told to close
            if moving and migrator is not None and self._to_move(handler, migrator):
                if not handler.flushed():
                    sending.append(transport.get_extra_info("peername"))
                continue  # the grace's first round hands it over
            peer = transport.get_extra_info("peername")
            # Busy: a request in progress, one parsed and queued that its
            # handler has not taken yet (the loop has not run it since;
            # counted idle, it was cut with that request unanswered), or a
            # response just sent, aiohttp's loop not yet back to waiting for
            # the next request (aiohttp >= 3.10.6 no longer counts it in
            # progress): one sent keep-alive, begun before the connection
            # was told to close, goes idle in a moment. Cut now, the next
            # request its client sent on it failed; while moving, the
            # grace hands it over.
            waiter = getattr(handler, "_waiter", None)
            busy = (bool(getattr(handler, "_request_in_progress", False))
                    or waiter is None or waiter.done()
                    or bool(getattr(handler, "_messages", ())))
            if not busy and not self._forced.is_set():
                # Requests aiohttp's parser held (_to_move above asks for
                # them only while moving), one whose head or body is
                # still arriving, or the first of a connection that joined
                # in the drain: busy, not cut with them.
                busy = (_held_requests(handler) or _request_arriving(handler)
                        or self._first_request_due(handler))
            if busy and not self._forced.is_set():
                told.append(peer)
                self.close_after_next_response(handler)
                continue
            (forced if busy else idle).append(peer)
            handler.force_close()
            cut += 1
        # Nothing lost (they move once sent, within the grace): not a WARNING.
        _log_connections(logging.INFO, "drain deadline:", sending,
                         " is still sending a response; it moves once that is sent"
                         if len(sending) == 1
                         else " are still sending a response; each moves once it is sent",
                         name=self.name)
        _log_connections(logging.WARNING, "drain deadline:", told,
                         " is busy; its response says Connection: close" if len(told) == 1
                         else " are busy; each one's response says Connection: close",
                         name=self.name)
        _log_connections(logging.WARNING, "drain deadline: cutting idle", idle, name=self.name)
        _log_connections(logging.WARNING, "drain deadline: cutting busy", forced, name=self.name)
        return cut


def _subapp_signal(callback: object) -> tuple[web.Application,
                                               Sequence[Callable[[web.Application], object]]
                                               ] | None:
    """The sub-app and its callbacks if ``callback`` is the one aiohttp
    registers on a parent for a sub-app's ``on_shutdown`` or ``on_cleanup``
    (``Application._reg_subapp_signals``'s ``handler``, which sends the
    sub-app's signal, in aiohttp 3.10 to 3.14); None for any other
    callback (or another aiohttp: then it stays one callback)."""
    if not getattr(callback, "__qualname__", "").endswith(
            "_reg_subapp_signals.<locals>.reg_handler.<locals>.handler"):
        return None
    code, cells = getattr(callback, "__code__", None), getattr(callback, "__closure__", None)
    if code is None or cells is None:
        return None
    try:
        found = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells,
                                                                 strict=True)}
    except ValueError:  # a cell not filled in yet (or another shape)
        return None
    subapp, signal = found.get("subapp"), found.get("subsig")
    if not isinstance(subapp, web.Application) or not isinstance(signal, Sequence):
        return None
    return subapp, signal


class _BoundedHooks:
    """Wraps the app's ``on_shutdown`` and ``on_cleanup`` callbacks (before
    the app is frozen) so that each signal's callbacks, together, take at
    most ``timeout`` seconds from the first one's start, and one that raises
    or runs out of time is logged and counted instead of ending the clean-up:
    aiohttp would skip the rest of it (the busy connections' last wait, the
    ``on_cleanup`` callbacks), and a hook that never returns would keep the
    old process (and its successor's next upgrade) waiting for good.

    Those the app's ``on_startup`` callbacks add (``app.on_cleanup.append()``
    in an init function, a common pattern) are bounded too: a last
    ``on_startup`` callback of ours wraps them once the app's own have run,
    before aiohttp freezes the lists. (They were left as they were: one that
    hung kept ``serve()``, and the process, from ever returning.) A
    sub-app's (frozen as it was added, run by aiohttp as one callback of
    its parent) are each bounded alike, in their order."""

    def __init__(self, app: web.Application, timeout: float, *, name: str = "") -> None:
        self.timeout = timeout
        self.prefix = f"{name}: " if name else ""  # the sidecar's, as on its other lines
        self.failed = 0
        self._deadlines: dict[str, float] = {}
        self._wrappers: set[object] = set()  # what bounded() made: not wrapped again
        # Loop time by which on_cleanup must be over, once the drain is:
        # an on_shutdown that started late (at the deadline) and ran its
        # full time must not push the stop past drain, grace and timeout.
        self.finish_by: float | None = None
        if app.on_shutdown.frozen:  # set up elsewhere already: left as it is
            return
        self._wrap_all(app)
        if not app.on_startup.frozen:
            app.on_startup.append(self._wrap_late)

    def _wrap_all(self, app: web.Application) -> None:
        for phase, hooks in (("shutdown", app.on_shutdown), ("cleanup", app.on_cleanup)):
            if hooks.frozen:
                continue
            for i, callback in enumerate(hooks):
                if callback not in self._wrappers:
                    hooks[i] = self._each(callback, phase)

    def _each(self, callback: Callable[[web.Application], object], phase: str
              ) -> Callable[[web.Application], Awaitable[None]]:
        """``callback`` bounded; a sub-app's callbacks (which aiohttp runs as
        one callback of its parent, from the sub-app's frozen list: one that
        raised skipped the rest of them) each bounded alone, in their order,
        within the same time."""
        found = _subapp_signal(callback)
        if found is None:
            return self.bounded(callback, phase)
        subapp, callbacks = found

        async def each(app: web.Application) -> None:
            for one in callbacks:
                await self._each(one, phase)(subapp)

        self._wrappers.add(each)
        return each

    async def _wrap_late(self, app: web.Application) -> None:
        """The app's last ``on_startup`` callback: bound the ``on_shutdown``
        and ``on_cleanup`` callbacks the ones before it added."""
        self._wrap_all(app)

    def bounded(self, callback: Callable[[web.Application], object], phase: str
                 ) -> Callable[[web.Application], Awaitable[None]]:
        async def call(app: web.Application) -> None:
            # A plain function too (serve()'s on_drain may be one): what it
            # returns is awaited if it is awaitable, and what it raises is
            # this task's error like a coroutine's.
            result = callback(app)
            if inspect.isawaitable(result):
                await result

        async def bounded(app: web.Application) -> None:
            loop = asyncio.get_running_loop()
            deadline = self._deadlines.setdefault(phase, loop.time() + self.timeout)
            if phase == "cleanup" and self.finish_by is not None:
                deadline = min(deadline, self.finish_by)
            task = asyncio.ensure_future(call(app))
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                self.failed += 1
                log.error("%sapp clean-up %r still running after %.1fs: abandoned",
                          self.prefix, callback, self.timeout)
                task.cancel()
                # Not awaited (it may ignore the cancellation): only its end read.
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
                return
            if task.cancelled():
                self.failed += 1
                log.error("%sapp clean-up %r was cancelled", self.prefix, callback)
            elif (exc := task.exception()) is not None:
                self.failed += 1
                log.error("%sapp clean-up %r failed: %r", self.prefix, callback, exc,
                          exc_info=exc)
        self._wrappers.add(bounded)
        return bounded


class _Runner(web.AppRunner):
    """An ``AppRunner`` whose app's ``on_shutdown`` callbacks can start
    before its clean-up: as the drain ends, before the busy connections'
    grace, which is where aiohttp's own clean-up runs them (after closing
    the idle connections, before waiting for busy handlers). A websocket
    closed there gets its 1001 within the grace instead of being cut."""

    _early: asyncio.Future[None] | None = None

    def shutdown_early(self) -> None:
        """Start the app's ``on_shutdown`` callbacks now, in a task;
        :meth:`cleanup` waits for it instead of running them again."""
        if self._early is None:
            self._early = asyncio.ensure_future(super().shutdown())

    async def shutdown(self) -> None:
        if self._early is None:
            await super().shutdown()
        else:
            await self._early


def _seconds(name: str, value: object) -> float:
    """``serve()``'s ``name`` as a number of seconds: a real number (not a
    bool), finite, not negative. A wrong one fails here, as ``serve()``
    starts, rather than at the first upgrade, in the drain."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"serve(): {name} must be a number of seconds, not {value!r}")
    if not is_seconds(value):
        raise ValueError(f"serve(): {name} must be a finite number of seconds, 0 or more, "
                         f"not {value!r}")
    return float(value)


def _check_sockets(sockets: object) -> None:
    """``serve()``'s ``sockets``: a mapping of names to addresses, checked
    before anything is bound (ListenerError naming the socket)."""
    if not isinstance(sockets, Mapping):
        raise TypeError(f"serve(): sockets must be a mapping of names to addresses, "
                        f"not {sockets!r}")
    if not sockets:
        # A successor with none would take over and drop every listener of
        # the version it replaces: nothing would accept any more.
        raise ValueError("serve(): sockets is empty: name at least one address to serve")
    for name, address in sockets.items():
        if not isinstance(name, str):
            raise TypeError(f"serve(): socket names must be str, not {name!r}")
        try:
            check_address(address)
        except ListenerError as exc:
            raise ListenerError(f"serve(): {name}: {exc}") from None


def _tls_contexts(ssl_context: object, sockets: Mapping[str, Address]
                  ) -> dict[str, ssl.SSLContext]:
    """``serve()``'s ``ssl_context`` as a context per TLS listener's name,
    checked before anything is bound: one context (every listener), a
    mapping of some of the ``sockets``' names to contexts, or None."""
    if ssl_context is None:
        return {}
    if isinstance(ssl_context, ssl.SSLContext):
        contexts: Mapping[object, object] = dict.fromkeys(sockets, ssl_context)
    elif isinstance(ssl_context, Mapping):
        contexts = ssl_context
    else:
        raise TypeError(f"serve(): ssl_context must be an ssl.SSLContext or a mapping of "
                        f"socket names to them, not {ssl_context!r}")
    checked = {}
    for name, context in contexts.items():
        if name not in sockets:
            raise ValueError(f"serve(): ssl_context names {name!r}, which is not one of the "
                             f"sockets ({', '.join(map(repr, sockets))})")
        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"serve(): ssl_context for {name!r} must be an ssl.SSLContext, "
                            f"not {context!r}")
        if context.protocol is ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError(f"serve(): ssl_context for {name!r} is a client context "
                             f"(PROTOCOL_TLS_CLIENT); a server needs "
                             f"ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) or "
                             f"PROTOCOL_TLS_SERVER")
        checked[str(name)] = context
    return checked


def _yield_cpu() -> None:
    """Lowest CPU priority for the rest of this (calling) thread's life: on
    Linux nice values are per thread and an unprivileged one never gets a
    lower value back, which is fine for a process that is about to exit."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except OSError as exc:  # a sandbox that forbids it: exit at normal priority
        log.debug("could not lower the CPU priority: %s", exc)


_UNSET = object()  # no value in a context: see _set_up()


async def _set_up(runner: web.AppRunner, upgrader: Upgrader, timeout: float) -> int | None:
    """``runner.setup()`` (the app's ``on_startup`` callbacks), cut short by
    a stop. None once set up (its error is raised, as ``setup()``'s); if a
    stop was requested first (a SIGTERM, the app's ``upgrader.close()``),
    the exit status ``serve()`` returns: the set-up is cancelled and given
    ``timeout`` seconds to end, then the runner's clean-up (what aiohttp
    runs after a failed start: the cleanup contexts entered so far) as long
    again; 0 if both ended, 1 if one raised, ignored its cancellation or
    ran out of time (logged and abandoned: not awaited). ``runner`` and
    ``upgrader`` stay the caller's (nothing listens yet: closing the
    upgrader aborts a takeover, the predecessor serving on). (An
    ``on_startup`` that never returned kept ``serve()`` from seeing the
    stop: the process waited for its SIGKILL, a predecessor for its
    ``handover_timeout``.)

    The callbacks run in a task of their own, in a copy of the caller's
    context; what they set in context variables is set in the caller's
    once they are done, as if they had run there: the request handlers'
    tasks are made in the context the servers start in, as under aiohttp's
    ``run_app()``."""
    context = contextvars.copy_context()
    setting_up = asyncio.get_running_loop().create_task(runner.setup(), context=context)
    stopped = asyncio.ensure_future(upgrader.wait_stop_requested())
    try:
        await asyncio.wait({setting_up, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not setting_up.done():  # a stop, or serve() cancelled
            setting_up.cancel()
    if setting_up.done():
        setting_up.result()
        for var, value in context.items():
            if var.get(_UNSET) is not value:  # set by on_startup
                var.set(value)
        return None
    log.warning("%s: stop requested while the app's on_startup callbacks run: "
                "cancelling them", upgrader.name)
    status = 0
    for what in ("on_startup", "clean-up after on_startup"):
        step = setting_up if what == "on_startup" else asyncio.ensure_future(runner.cleanup())
        done, _ = await asyncio.wait({step}, timeout=timeout)
        if not done:
            log.error("%s: app %s still running %.1fs after the stop: abandoned", upgrader.name,
                      what, timeout)
            step.cancel()
            # Not awaited (it may ignore the cancellation): only its end read.
            step.add_done_callback(lambda t: t.cancelled() or t.exception())
            return 1
        if not step.cancelled() and (exc := step.exception()) is not None:
            log.error("%s: app %s failed: %r", upgrader.name, what, exc, exc_info=exc)
            status = 1
    return status


async def _stop_accepting(runner: web.BaseRunner) -> None:
    """Stop accepting on every site without dropping a connection already
    accepted (see :func:`hotswap.close_server`); the sites are stopped
    after, which then only unregisters them."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None:
            await close_server(server)


async def serve(app: web.Application, upgrader: Upgrader,
                sockets: Mapping[str, Address], *,
                drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                idle_after_drain: bool | None = None,
                handle_signals: bool = True,
                migrate_connections: bool = True,
                yield_cpu_after_drain: bool = True,
                cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
                on_drain: Callable[[web.Application], object] | None = None,
                ssl_context: ssl.SSLContext | Mapping[str, ssl.SSLContext] | None = None,
                ) -> int:
    """Run ``app`` on the named ``sockets`` until replaced or stopped.

    Returns the process exit status: 0 after a clean handover or stop, 1 when
    this process was a successor whose predecessor abandoned the handover (it
    still drained what it had accepted: nothing, unless that came as it
    confirmed, since its sites accept only from its confirmation on), or when one of the app's
    ``on_shutdown``/``on_cleanup`` callbacks raised or was still running
    after ``cleanup_timeout`` seconds (for all of one signal's together).
    Those are logged and abandoned, never an exception out of here: the rest
    of the clean-up still runs, and the successor is told the drain is over.
    A stop requested while the app's ``on_startup`` callbacks still run
    cancels them (a successor then aborts its takeover: the predecessor
    serves on) and returns within ``cleanup_timeout`` for them to end and as
    long for the clean-up after them (0, or 1 if one raised or was abandoned).
    ``on_drain(app)``, if given, is called as the drain starts (this process
    no longer accepts; requests may still come on its connections): close
    websockets and other long-lived responses there, with code 1001, and
    their clients reconnect to the successor at once instead of staying
    until the deadline; a coroutine function, or a plain function (what
    it returns is awaited if it is awaitable: a ``functools.partial`` of
    a coroutine function works too); it is bounded by ``cleanup_timeout``
    like the app's callbacks (a plain function that blocks cannot be),
    and if it raises that is logged and the exit status is 1, the drain
    and clean-up going on as usual. The app's ``on_shutdown`` callbacks start when the
    drain ends (all closed, or the deadline), before the busy connections'
    grace, as aiohttp runs them before it waits for busy handlers: a
    request still in flight may see what they release, as under aiohttp;
    ``on_cleanup`` callbacks run after the grace. ``idle_after_drain`` defaults to True
    in a Kruise slot (``SIDECARSET_VERSION`` set): taken over, serve()
    returns only once a stop is requested (SIGTERM; with
    ``handle_signals=False``, the app's own handler calling
    ``upgrader.request_stop()``). ``migrate_connections``
    (on by default) hands idle keep-alive connections to the successor and
    adopts the predecessor's (:mod:`hotswap.migrate`); off, or where aiohttp
    does not allow it, they drain the safe way. ``yield_cpu_after_drain``
    (on by default): once a process that was taken over has drained, it has
    nothing left to serve, so its clean-up, its wait for SIGTERM and its exit
    run at the lowest CPU priority (nice 19, this thread) instead of
    competing with the successor for the CPU (which ranks it only within its
    CPU scheduling group: see :mod:`hotswap.startup`).

    ``ssl_context`` serves HTTPS: one :class:`ssl.SSLContext` for every
    listener, or a mapping of some of the ``sockets``' names to contexts
    (the others serve plain HTTP). A TLS listener is served by a plain
    ``web.SockSite`` with that context, never a tracked one: its
    connections are not handed over (their session state cannot move), so
    in the drain each is told ``Connection: close`` on its next response,
    one whose handshake ends only after the drain began included, and is
    cut only if still idle at the deadline. The listening socket itself is
    handed over like any other; the context is not (it lives in this
    process): the successor passes its own, and may change certificate and
    settings, or turn TLS on or off for a listener. A plain connection the
    predecessor hands over under a name that is TLS here is served on as
    plain HTTP, as its client speaks it (only new connections get TLS).
    The contexts stay the caller's: ``serve()`` does not change them, and
    they may be shared with other servers. Load the certificate chain
    before calling (there is no way to check for it here); a handshake that
    fails ends that connection only, nothing else (asyncio and uvloop log it
    only in the loop's debug mode).

    Arguments are checked before anything is bound or installed:
    ``drain_timeout`` and ``cleanup_timeout`` must be finite numbers of
    seconds, 0 or more (``TypeError`` for a string read from the
    environment, ``ValueError`` for ``nan``, ``inf`` or a negative one),
    ``on_drain`` callable, ``sockets`` a mapping of names to addresses
    (``ListenerError`` for one that is none, ``ValueError`` for none at
    all), and ``ssl_context`` None, an
    ``SSLContext`` or a mapping of socket names to them (``TypeError`` for
    anything else, ``ValueError`` for a name that is not one of the
    ``sockets`` and for a client context, ``PROTOCOL_TLS_CLIENT``).

    Resource handling: every socket is owned by the sites (closed when they
    stop); the upgrader's control sockets are closed before returning, on
    every path. A clean-up callback that was abandoned may still be running
    (one that ignores its cancellation): end the process when this returns,
    as the sample sidecar does, rather than let ``asyncio.run()`` wait for
    it with no deadline.
    """
    drain_timeout = _seconds("drain_timeout", drain_timeout)
    cleanup_timeout = _seconds("cleanup_timeout", cleanup_timeout)
    if on_drain is not None and not callable(on_drain):
        raise TypeError(f"serve(): on_drain must be a callable taking the app, "
                        f"not {on_drain!r}")
    _check_sockets(sockets)
    tls = _tls_contexts(ssl_context, sockets)
    started = f"role {upgrader.role.value}, " if upgrader.role is not None else ""
    not_new = HotswapError(
        f"serve() starts the upgrader itself, and this one was started already "
        f"({started}state {upgrader.state.value}): give each serve() a new Upgrader")
    if upgrader.started or upgrader.state is not State.STARTING:
        raise not_new
    upgrader._run_by = asyncio.current_task()  # its close() from elsewhere: a stop
    migrator = (Migrator(name=upgrader.name) if migrate_connections and _migration_supported()
                else None)
    if migrator is not None:
        upgrader.adopt_connections(migrator.adopt)
    if idle_after_drain is None:
        idle_after_drain = upgrader.versions.rank is not None
    loop = asyncio.get_running_loop()
    drainer = Drainer(name=upgrader.name)
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: signal %d: stopping", upgrader.name, signum)
            upgrader.request_stop()
        elif signals == 2:
            log.warning("%s: signal %d again: cutting the drain short", upgrader.name, signum)
            drainer.force()
        else:
            os._exit(128 + signum)

    def on_hangup() -> None:
        log.warning("%s: SIGHUP ignored: send SIGTERM to stop; an upgrade starts a new "
                    "version", upgrader.name)

    # What the three signals did before: put back on the way out (asyncio's
    # remove_signal_handler() would leave SIG_DFL: a process started with
    # SIGHUP ignored, nohup, would die of one after serve() returns).
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS} \
        if handle_signals else {}
    installed: list[signal.Signals] = []  # removed on every way out, as far as they got
    try:
        for signum in previous:
            if signum == signal.SIGHUP:
                loop.add_signal_handler(signum, on_hangup)
            else:
                loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        try:
            role = await upgrader.start()
        except HandoverFailed as exc:
            if not upgrader.stop_requested:
                raise
            # Stopped (SIGTERM) before taking anything over: a normal stop.
            log.info("%s", exc)
            return 0
        if role in (Role.PASSIVE, Role.EMPTY):
            await upgrader.wait_exit()
            await upgrader.close()
            return 0
        drainer.install(app)
        hooks = _BoundedHooks(app, cleanup_timeout, name=upgrader.name)
        drain_hook: asyncio.Future[None] | None = None
        # aiohttp (>= 3.10) waits shutdown_timeout for a busy handler, then
        # cancels its request and waits as long again: the grace's end.
        runner = _Runner(app, handle_signals=False, shutdown_timeout=_CANCEL_WAIT)
        stopped_early = await _set_up(runner, upgrader, cleanup_timeout)
        if stopped_early is not None:
            # Stopped in on_startup: close() (below) aborts a takeover, the
            # predecessor serving on, or closes what a fresh start bound.
            return 1 if stopped_early or hooks.failed else 0
        if migrator is not None:
            migrator.runner = runner  # adopts into it, whatever our sites are
        try:
            for name, address in sockets.items():
                sock = upgrader.listen(name, address)
                site: web.BaseSite
                if name in tls:  # TLS connections never move: a plain site
                    if drainer.handshakes is None:
                        drainer.handshakes = _Handshakes()
                    site = _TLSSite(runner, sock, tls[name], drainer.handshakes)
                elif migrator is not None and is_tcp(sock):
                    site = TrackedSite(runner, sock, name, migrator, start_serving=False)
                else:  # a Unix socket's connections drain the safe way
                    site = _Site(runner, sock, backlog=DEFAULT_BACKLOG)
                await site.start()
            # Not accepting yet: ready() starts them as it confirms (at once
            # on a fresh start), so that nothing is accepted while this
            # process may still back out.
            servers = [site._server for site in runner.sites
                       if isinstance(site, web.SockSite) and site._server is not None]
            try:
                await upgrader.ready(start_serving=servers)
            except HandoverFailed as exc:
                # wait_exit() now says why: step down, or stop as asked.
                log.error("%s", exc)
            reason = await upgrader.wait_exit()
            log.info("%s: %s; draining (deadline %.1fs)", upgrader.name, reason.value,
                     drain_timeout)
            await _stop_accepting(runner)
            for site in list(runner.sites):
                await site.stop()
            assert runner.server is not None
            migrating = migrator is not None and reason is ExitReason.TAKEN_OVER
            drainer.start(runner.server, every_connection=not migrating)
            await upgrader.release()
            if on_drain is not None:
                drain_hook = asyncio.ensure_future(hooks.bounded(on_drain, "drain")(app))
            cut = await drainer.drain(runner.server, drain_timeout,
                                      migrator=migrator if migrating else None,
                                      upgrader=upgrader)
            hooks.finish_by = loop.time() + GRACE + cleanup_timeout
            runner.shutdown_early()  # on_shutdown, then the busy ones' grace
            cut += await drainer.grace(runner.server, GRACE - 2 * _CANCEL_WAIT,
                                       migrator=migrator if migrating else None,
                                       upgrader=upgrader)
            if drain_hook is not None:
                await drain_hook  # bounded; its failure is logged and counted
            if yield_cpu_after_drain and reason is ExitReason.TAKEN_OVER:
                _yield_cpu()
            if migrator is not None and migrator.moved:
                log.info("%s: handed %d connection(s) over in %.1f ms", upgrader.name,
                         migrator.moved, migrator.seconds * 1e3)
        finally:
            if drain_hook is not None and not drain_hook.done():  # an error, a cancel
                drain_hook.cancel()
            await runner.cleanup()
        await upgrader.close(cut=cut)
        log.info("%s: drained, %d connection(s) cut", upgrader.name, cut)
        if idle_after_drain and reason is ExitReason.TAKEN_OVER:
            log.info("%s: idle without sockets until SIGTERM", upgrader.name)
            # Ours (the first SIGTERM/SIGINT) or the app's own handler
            # (handle_signals=False): either asks the upgrader to stop.
            await upgrader.wait_stop_requested()
        return 1 if reason is ExitReason.HANDOVER_FAILED or hooks.failed else 0
    finally:
        try:
            await upgrader.close()
        finally:
            upgrader._run_by = None  # its close() is a close again
            for signum in installed:
                # Held meanwhile: between remove_signal_handler()'s SIG_DFL
                # and the restore, a SIGHUP killed a process started with
                # it ignored. Held, it meets what was there before. (Held in
                # this thread: one of the app's threads that does not block
                # it can still take it in between.)
                held = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
                try:
                    loop.remove_signal_handler(signum)
                    if _restorable(previous[signum]):
                        signal.signal(signum, previous[signum])
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)

