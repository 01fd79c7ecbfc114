"""Handing idle keep-alive connections to the successor (aiohttp).

Closing an idle keep-alive connection races a client that is sending on it at
that very moment; telling it ``Connection: close`` on its next response avoids
that, but the client still has to reconnect. Migration goes further: while the
old process drains, each HTTP/1.1 connection that sits at a request boundary
is paused, its descriptor sent to the successor over the control channel
(``Connections`` frames, at most 253 descriptors each) and adopted by the
successor's server, which reads the next request from the same TCP connection.
The client notices nothing.

*At a request boundary* means: no request in progress, none parsed and
queued, and nothing of a next request read into user space. aiohttp's parser
keeps partial requests where we cannot see them, and does not say where a
request ended, so every connection is watched from its first byte by
aiohttp's own protocol, subclassed (:class:`Tracked`), which feeds each read
to a request framer (:mod:`hotswap._framing`): header block, a body of
exactly its ``Content-Length`` bytes or sent chunked (chunk by chunk), next
header block. A connection is at
a boundary when the framer says that everything received is whole requests
(or nothing was received), and aiohttp has answered them all and sent the
answers. A connection busy with requests that have been received whole,
bodies included, is paused at once (its next request waits in the kernel,
not in our buffer), so it reaches the boundary when its response is sent
and is handed over then; one whose request or body is still arriving is
left to read it, and moves once it has been answered. Whatever the framer
cannot follow exactly (a ``Transfer-Encoding`` other than ``chunked``
alone, chunk syntax written loosely, an upgrade, ``CONNECT``, HTTP/1.0, a
``Content-Length`` repeated or not plain digits, a header block over 64
KiB: see that module) it gives up on for good, and
that connection drains the safe way: its next response says ``Connection:
close``. So does every connection not idle at a boundary in the drain's
last tenth.

Ownership: once a frame is acknowledged (``Adopted``; with a successor
that does not acknowledge, once it is sent; see
:meth:`~hotswap.Upgrader.hand_over_connections` for one whose
acknowledgement does not come in time) the old side closes its copy of each
descriptor (``close()``, never ``shutdown()``: the socket lives on in the
successor); a connection whose transfer fails is resumed and drains the safe
way. The successor owns what it receives and closes anything it cannot adopt.
TLS connections are never migrated (their session state cannot move), nor
those of a Unix-socket listener, nor upgraded ones (websockets): they drain
the safe way. A connection whose last response is still in our send buffer
waits until it is sent.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.hdrs import CONTENT_LENGTH
from aiohttp.streams import EMPTY_PAYLOAD

from ._framing import END, MAX_HEAD, RequestFramer
from .listeners import DEFAULT_BACKLOG
from .protocol import MAX_FDS_PER_FRAME
from .upgrader import Upgrader

log = logging.getLogger("hotswap")


def supported() -> bool:
    """Does this aiohttp expose what migration reads (aiohttp 3.x): the
    handler's state, and what its server makes handlers with?"""
    slots = set(getattr(web.RequestHandler, "__slots__", ()))
    made_with = set(web.Server.__init__.__code__.co_names)
    return ({"_waiter", "_messages", "_current_request", "_request_factory"} <= slots
            and {"_kwargs", "_loop"} <= made_with)


_COPY_RETRY = 0.1
"""Seconds before the connection handover tries again after a round in
which no descriptor could be copied at all (EMFILE)."""

ACK_FLOOR = 0.1
"""Seconds each frame of connections gets at least for the successor's
acknowledgement, however little is left of the round (of the drain, or of
its grace) that sends it: one that timed out ended the channel (what was
still to move was then cut or told to close, and the successor never heard
that we drained). A round sends a frame after its first only with this
much left; the rest wait for a later round (the grace's first, at the
drain's end)."""

_SOON = 0.05
"""Seconds a connection about to reach a boundary (see
:attr:`Migrator.pending`) keeps the drain looking every millisecond; one
still on its way after that (a long poll, a download) is looked at with the
others, at the drain's usual pace, so that long requests in flight do not
keep the draining process busy (1,000 long polls: half a core)."""


def init_like_server(handler: web.RequestHandler, server: web.Server) -> None:
    """Initialise ``handler`` (a RequestHandler subclass's instance) the way
    aiohttp's ``Server.__call__`` makes one: with the server's handler
    arguments, or, if the app's ``handler_args`` hold what a handler does
    not take, a basic handler and a warning."""
    made_by: Any = server
    try:
        web.RequestHandler.__init__(handler, server, loop=made_by._loop, **made_by._kwargs)
    except TypeError:
        basic = {k: v for k, v in made_by._kwargs.items()
                 if k in ("debug", "access_log_class")}
        web.RequestHandler.__init__(handler, server, loop=made_by._loop, **basic)
        handler.logger.warning(
            "Failed to create request handler with custom kwargs %r, falling back "
            "to filtered kwargs. This may indicate a misconfiguration.",
            made_by._kwargs)


class Tracked(web.RequestHandler):
    """aiohttp's RequestHandler that also follows where its client's
    requests end (a :class:`~hotswap._framing.RequestFramer` fed every
    read but the common one, see :meth:`data_received`: the only
    per-request cost) and is known to its
    :class:`Migrator` while connected. A subclass, not a protocol in front
    of aiohttp's: that forwarding cost 3% of the requests per second with a
    new connection per request (``make bench``). Made the way aiohttp's
    ``Server`` makes its handlers (see :func:`supported`)."""

    __slots__ = ("framer", "listener", "migrator", "paused", "soon_since")

    def __init__(self, server: web.Server, listener: str, migrator: Migrator) -> None:
        init_like_server(self, server)
        self.listener = listener
        self.migrator = migrator
        self.framer = RequestFramer()
        # Reading held by the drain (beside aiohttp's flow control, whose
        # pauses are aiohttp's to undo; see pause()).
        self.paused = False
        # Loop time since which the drain has found it about to reach a
        # boundary, round after round (None: not found so last round).
        self.soon_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        web.RequestHandler.connection_made(self, transport)
        self.migrator.tracked.add(self)

    def data_received(self, data: bytes) -> None:
        messages = self._messages
        queued = len(messages)
        web.RequestHandler.data_received(self, data)
        framer = self.framer
        # The common read, on aiohttp's word instead of the framer's: at a
        # boundary (the framer's; the parser's too, as they agree), aiohttp's
        # parser made of this read exactly one HTTP/1.1 request with no body
        # (its payload is aiohttp's empty one) and no upgrade, nothing was
        # queued before it, and the read ends with a header block's end.
        # Then the parser consumed all of it: it stops early only while it
        # counts 32 requests in flight (aiohttp 3.14), and with none queued
        # it counts at most one; a rest of a body it kept from a pause
        # before would have left the framer inside that body. So the framer
        # stays at a boundary without reading it. These checks cost ~0.15
        # us (timeit), the framer reading the headers itself ~0.6 us, and a
        # call to it with the parser's word ~0.2 us (its fast path until
        # 11-30: ~0.5% of keep-alive throughput). An error aiohttp answers
        # is a message without a version; the version is the C parser's
        # own constant (with the pure-Python parser the framer reads every
        # read). Not with a Content-Length: the C parser gives one of
        # 2**64 - 1 (llhttp's "none") the empty payload while llhttp reads
        # all that follows as its body (moved, the successor would read
        # that body as requests); the framer reads such a block itself (0
        # is framed, 20 digits given up on). Less cautious than the framer
        # only about what the parser took for a request without a body: an
        # Upgrade it did not act on, an empty Transfer-Encoding, blank
        # lines before or after the request in the same read (which it
        # skips). So unlike the framer's, this answer depends on how the
        # stream was cut (a GET and a blank line in one read: a boundary;
        # in two: given up on), only ever between movable and not.
        if not queued and len(messages) == 1 and not framer.need and not framer.head:
            message: Any  # a request, or the error aiohttp answers (no version)
            message, payload = messages[0]
            if (payload is EMPTY_PAYLOAD and getattr(message, "version", None) is HttpVersion11
                    and not message.upgrade and CONTENT_LENGTH not in message.headers
                    and data.endswith(END) and len(data) <= MAX_HEAD):
                return
        if data:  # aiohttp calls it with b"" itself, to parse what it holds
            framer.feed(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.migrator.tracked.discard(self)
        web.RequestHandler.connection_lost(self, exc)

    def soon(self, now: float) -> bool:
        """Found about to reach a boundary this round: whether the drain
        should look again in a millisecond (for its first :data:`_SOON`
        seconds in a row)."""
        if self.soon_since is None:
            self.soon_since = now
        return now - self.soon_since < _SOON

    def pause(self) -> None:
        """Leave what the client sends next in the kernel (the drain's),
        until :meth:`resume`: also when aiohttp's flow control holds the
        reading already (aiohttp 3.14 pauses it while 32 requests are
        queued, and resumes it once half are answered; see
        :meth:`_resume_transport_reading`). Skipped then, the drain's
        pause was undone by aiohttp's resume: a client that kept more
        than 32 requests pipelined was read through the whole drain, its
        connection never idle, and told to close at the drain's end, the
        requests behind that response lost."""
        assert self.transport is not None
        if self.transport.is_reading():
            self.transport.pause_reading()
        self.paused = True

    def _resume_transport_reading(self) -> None:
        # aiohttp's (3.14) resume, once its queue or a body's buffer has
        # room: not while the drain holds the reading. It still parses what
        # it holds (it calls data_received(b"") first), which is all a
        # request needs: the drain pauses only once every byte received is
        # whole requests.
        if not self.paused:
            web.RequestHandler._resume_transport_reading(self)

    if not hasattr(web.RequestHandler, "_resume_transport_reading"):  # aiohttp < 3.14
        def resume_reading(self, resume_parser: bool = True) -> None:
            # aiohttp 3.10 to 3.13 resume the transport here themselves, at
            # the end of a pause of theirs (a body's buffer): not while the
            # drain holds the reading, as above. Only 3.10 gets here with
            # the drain's pause on: it keeps its pause for a body received
            # whole (3.11 ends it then), and a handler reading that body
            # read on the client's next request in the drain.
            if self.paused:
                self._reading_paused = False  # aiohttp's pause is over
            else:
                web.RequestHandler.resume_reading(self)

    def resume(self) -> None:
        """Undo :meth:`pause`; a pause of aiohttp's own stays (resumed by
        aiohttp, as its queue drains or a body is read)."""
        if (self.paused and self.transport is not None and not self.transport.is_closing()
                and not getattr(self, "_buffer_paused", False)
                and not getattr(self, "_reading_paused", False)):
            self.transport.resume_reading()
        self.paused = False

    # -- state: the framer's, and aiohttp's own (see supported()) --------

    def at_boundary(self) -> bool:
        """Everything received is whole requests, bodies included (or
        nothing was received): nothing of a next request is in user space."""
        return self.framer.boundary

    def trackable(self) -> bool:
        """The framer still follows this connection's requests; once it
        has given up (see :mod:`hotswap._framing`), the connection can
        never move."""
        return not self.framer.lost

    def idle(self) -> bool:
        waiter = self._waiter
        return (waiter is not None and not waiter.done() and not self._messages
                and self._current_request is None)

    def idle_at_boundary(self) -> bool:
        """Idle, everything received is whole requests, and aiohttp holds
        none of them unparsed: the connection may move. aiohttp 3.14's
        parser stops between requests while it counts 32 in flight, and
        keeps the rest until its queue drains; it can count one too many
        for good (a request whose body came in a later read than its
        headers), and then holds whole pipelined requests on a connection
        that looks idle until the client sends more. Asked to parse what it
        holds (what aiohttp itself does when its queue drains), it brings
        them out: the connection is busy, and they are answered."""
        if not (self.idle() and self.framer.boundary):
            return False
        web.RequestHandler.data_received(self, b"")
        return self.idle()

    def flushed(self) -> bool:
        """Nothing of a response is left in our buffer: handed over now, the
        tail of one could be lost, or mixed with the successor's next."""
        assert self.transport is not None
        return self.transport.get_write_buffer_size() == 0

    def unread(self) -> bool:
        """Bytes wait in the kernel for this connection, not yet read: a
        request its client sent while :meth:`pause` held the reading (a
        handover that failed then resumed it), which the loop reads at its
        next poll. Cut as idle before that, the request was lost (and the
        close, with data unread, reset the connection). Owns nothing; False
        when the socket cannot be asked."""
        transport = self.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            count: int = struct.unpack(
                "i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        except (OSError, ValueError):  # closed meanwhile
            return False
        return count > 0

    def busy_at_boundary(self) -> bool:
        """Busy (a request being handled or queued, or the moments around
        one: taken from the queue, its response being finished, the loop
        back to waiting), and everything received is whole requests, bodies
        included. Pausing the reading then holds only what comes next, in
        the kernel, and stalls no request: its body has been read. Never
        an upgraded connection (a websocket: it is read for as long as it
        lives), which the framer gives up on anyway."""
        if (getattr(self, "_upgraded", False) or getattr(self, "_upgrade", False)
                or getattr(self, "_payload_parser", None)):
            # From its upgrade request on, before the handler prepares it:
            # aiohttp 3.14 names that flag _upgraded, 3.10 to 3.13 _upgrade.
            return False
        return self.framer.boundary and not self.idle()


class TrackedSite(web.SockSite):
    """A ``SockSite`` whose connections are :class:`Tracked`. With
    ``start_serving=False`` its server, once started, does not accept yet
    (:meth:`hotswap.Upgrader.ready` starts it: see ``start_serving`` there)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, listener: str,
                 migrator: Migrator, *, start_serving: bool = True) -> None:
        super().__init__(runner, sock, backlog=DEFAULT_BACKLOG)
        self._listener = listener
        self._migrator = migrator
        self._start_serving = start_serving

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            lambda: Tracked(server, self._listener, self._migrator),
            sock=self._sock, backlog=self._backlog, start_serving=self._start_serving)


class Migrator:
    """Tracks the connections of one aiohttp server; hands idle ones over
    (old side) and adopts handed-over ones (new side). ``name`` (the
    sidecar's, :attr:`hotswap.Upgrader.name`) begins its own log lines."""

    def __init__(self, *, name: str = "") -> None:
        self.name = name
        self.tracked: set[Tracked] = set()
        self.runner: web.BaseRunner | None = None
        self._adoptions: set[asyncio.Task[None]] = set()
        self.moved = 0
        self.seconds = 0.0
        # Connections about to reach a boundary (paused busy ones waiting for
        # their response, and ones between two requests): look again soon.
        # Each counts for its first _SOON seconds only (see Tracked.soon).
        self.pending = 0
        self._short_logged = False
        # No descriptor for even one copy: wait a little before trying again
        # (each try pauses and resumes every idle connection).
        self._copy_retry_at = 0.0

    # ------------------------------------------------------------ new side

    def adopt(self, listener: str, sock: socket.socket) -> None:
        """The upgrader's adopter: serve ``sock`` like a freshly accepted
        connection of ``listener``. Takes ownership of ``sock``."""
        runner = self.runner
        if runner is None or runner.server is None:
            raise RuntimeError("no server to adopt connections into yet")
        server = runner.server
        loop = asyncio.get_running_loop()

        async def attach() -> None:
            try:
                await loop.connect_accepted_socket(
                    lambda: Tracked(server, listener, self), sock)
            except Exception as exc:  # noqa: BLE001 -- a connection lost, not the loop
                log.warning("%sadopting a connection of %s failed: %r",
                            f"{self.name}: " if self.name else "", listener, exc)
                sock.close()

        task = asyncio.create_task(attach())
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    # ------------------------------------------------------------ old side

    async def step(self, upgrader: Upgrader,
                   close_after_next_response: Callable[[web.RequestHandler], None],
                   time_left: float | None = None, *, last_call: bool = False,
                   move: bool = True) -> bool:
        """One round: pause busy connections whose requests have been read
        whole, hand every idle connection at a request boundary to the
        successor, and send the rest the safe way, within ``time_left``
        seconds (the drain's) when given. A connection that can never move
        (its framer gave up: a gzip-coded body, an upgrade, HTTP/1.0, ...) is
        told to close with its next response: idle, it would be cut at the
        deadline. One whose request or body is still arriving is left to
        read it, neither paused nor told. ``last_call`` (the drain's end is
        near): every connection that is not idle at a boundary is told to
        close, and none is paused any more; a response sent keep-alive now
        could not count on a move before the cut. ``move=False`` (too
        little time left for the successor's acknowledgement of a frame):
        the same, but idle connections at a boundary are left as they are,
        for a later round. Each frame's acknowledgement gets at least
        :data:`ACK_FLOOR`, the first one's past ``time_left`` if need be
        (the round may run over by that much); a later frame with less
        than that left is not sent: its connections are left as they are
        (reading again), for a later round. Returns False once migration is
        not possible (no successor that adopts, or the channel broke)."""
        if not upgrader.can_hand_over_connections:
            return False
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if loop.time() < self._copy_retry_at:  # not one copy possible last time
            self.pending = 0
            return True
        ready: list[Tracked] = []
        pending = 0
        now = loop.time()
        for conn in list(self.tracked):
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            soon, conn.soon_since = conn.soon_since, None
            if conn.idle_at_boundary():
                if move and conn.flushed():
                    conn.pause()
                    ready.append(conn)
                # else: its last response is still being sent, or no time
                # to move it; a later round.
            elif last_call or not conn.trackable():
                close_after_next_response(conn)
                conn.resume()  # if paused in an earlier round
            elif conn.busy_at_boundary():
                # Keep its next request in the kernel: at the end of this
                # response it is idle at a boundary, and moves next round.
                conn.pause()
                conn.soon_since = soon
                pending += conn.soon(now)
            # else: a request, or its body, still arriving: read on (paused,
            # it would stall); once whole it is at a boundary.
        self.pending = pending
        if not ready:
            return True
        # A frame's worth at a time: dup, send, close, so the old process
        # never holds two descriptors for more than 253 connections.
        moved = 0
        until = None if time_left is None else loop.time() + time_left
        short = False  # no descriptor left for more copies; the channel works
        done = 0  # moved, or closed meanwhile
        later = 0  # left for a later round: too little time for their frame
        for i in range(0, len(ready), MAX_FDS_PER_FRAME):
            batch = ready[i:i + MAX_FDS_PER_FRAME]
            left = None if until is None else until - loop.time()
            if i and left is not None and left < ACK_FLOOR:
                # Sent with what was left (down to nothing), a frame's
                # acknowledgement came late even from a successor a few
                # milliseconds slow, and that ended the channel: the
                # connections still to move were cut. Not paused meanwhile:
                # a request their client sends is read (and answered).
                later = len(ready) - i
                for conn in ready[i:]:
                    conn.resume()
                log.debug("%s: %d idle connection(s) wait for a later round (%.3fs "
                          "left, under the %.1fs a frame's acknowledgement gets)",
                          upgrader.name, later, left, ACK_FLOOR)
                break
            if left is not None:
                left = max(ACK_FLOOR, left)
            sent, handled, short = await self._send(upgrader, batch,
                                                    close_after_next_response, left)
            moved += sent
            done += handled
            if handled < len(batch):
                for conn in ready[i + MAX_FDS_PER_FRAME:]:
                    conn.resume()
                    if not (short and sent):
                        close_after_next_response(conn)
                break
        self.moved += moved
        self.seconds += time.perf_counter() - started
        if moved:
            log.info("%s: handed %d idle connection(s) to the successor", upgrader.name, moved)
        # Short of descriptors, the next rounds go on with what this one freed
        # (after _COPY_RETRY if it freed none).
        if short and not moved:
            self._copy_retry_at = loop.time() + _COPY_RETRY
        return done + later == len(ready) or short

    async def _send(self, upgrader: Upgrader, batch: list[Tracked],
                    close_after_next_response: Callable[[web.RequestHandler], None],
                    time_left: float | None) -> tuple[int, int, bool]:
        """Hand ``batch`` over: copy each descriptor (ours closes only once
        the successor has it), send, close. Returns how many moved, how many
        of the batch are done with (those and the ones closed meanwhile: an
        earlier frame's send let the loop run), and whether the rest may
        try again next round: with no descriptor
        number left for more copies (EMFILE), the ones copied go and free
        theirs; the others stay, paused no more (told to close after their
        next response if none could be copied, which the next rounds may
        still move). A failed send tells the rest to close after their next
        response. The flag is False once the channel failed."""
        items: list[tuple[str, int, str]] = []
        sent = 0
        short = False
        live = [conn for conn in batch
                if conn.transport is not None and not conn.transport.is_closing()]
        gone = len(batch) - len(live)
        batch = live
        try:
            for conn in batch:
                transport = conn.transport
                assert transport is not None
                raw = transport.get_extra_info("socket")
                peer = transport.get_extra_info("peername")
                try:
                    fd = os.dup(raw.fileno())
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    short = True
                    if not self._short_logged:
                        self._short_logged = True
                        log.warning("%s: no descriptor left to copy connections for the "
                                    "handover (%s): moving %d now, the rest as copies "
                                    "free up", upgrader.name, exc, len(items))
                    break
                items.append((conn.listener, fd, str(peer)))
            if items:
                sent = await upgrader.hand_over_connections(items, timeout=time_left)
        except OSError as exc:
            log.warning("%s: cannot hand %d connection(s) over (%s); they drain here",
                        upgrader.name, len(batch), exc)
            short = False
        finally:
            for _, fd, _ in items:
                os.close(fd)
        short = short and sent == len(items) and upgrader.can_hand_over_connections
        for i, conn in enumerate(batch):
            if i < sent:
                self.tracked.discard(conn)
                if conn.transport is not None:
                    conn.transport.close()  # our descriptor only; the socket lives on
            else:
                conn.resume()
                if not (short and sent):
                    close_after_next_response(conn)
        return sent, sent + gone, short
