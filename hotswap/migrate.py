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
keeps partial requests where we cannot see them, so every connection is
watched from its first byte by aiohttp's own protocol, subclassed
(:class:`Tracked`), which remembers the last four bytes received: a
connection is at a boundary only if nothing was received yet, or the last
bytes received end a header block (``\\r\\n\\r\\n``) and the request they
belong to has been answered. A connection whose request has a body, or whose
client pipelines, may never look like that: it drains the safe way (its next
response says ``Connection: close``). A connection busy with a request whose
body has arrived is paused at once (its next request waits in the kernel, not
in our buffer), so it reaches the boundary when its response is sent and
is handed over then.

Ownership: after a frame is sent the old side closes its copy of each
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
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .listeners import DEFAULT_BACKLOG, is_tcp
from .protocol import MAX_FDS_PER_FRAME
from .upgrader import Upgrader

log = logging.getLogger("hotswap")

BOUNDARY = b"\r\n\r\n"
_BOUNDARY_TAIL = BOUNDARY[-3:]  # the last three bytes of a stream at a boundary


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
    """aiohttp's RequestHandler that also remembers whether the bytes
    received last end a header block (one ``endswith`` per read: the only
    per-request cost; a read that ends none also keeps its last three bytes,
    so that a block's end split across reads counts) and is known to its
    :class:`Migrator` while connected. A subclass,
    not a protocol in front of aiohttp's: that forwarding cost 3% of the
    requests per second with a new connection per request (``make bench``).
    Made the way aiohttp's ``Server`` makes its handlers (see
    :func:`supported`)."""

    __slots__ = ("boundary", "listener", "migrator", "paused", "soon_since", "tail")

    def __init__(self, server: web.Server, listener: str, migrator: Migrator) -> None:
        init_like_server(self, server)
        self.listener = listener
        self.migrator = migrator
        # Nothing received yet, or the bytes received last end a header
        # block; ``tail``: the last three bytes received (a block's end may
        # come split across reads: a client that writes its final CRLF on
        # its own, or byte by byte; a TCP segment's end).
        self.boundary = True
        self.tail = b""
        # Reading paused by the drain (not by aiohttp's flow control, which
        # is aiohttp's to undo).
        self.paused = False
        # Loop time since which the drain has found it about to reach a
        # boundary, round after round (None: not found so last round).
        self.soon_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        web.RequestHandler.connection_made(self, transport)
        self.migrator.tracked.add(self)

    def data_received(self, data: bytes) -> None:
        if data:  # aiohttp calls it with b"" itself, to parse what it holds
            if data.endswith(BOUNDARY):
                self.boundary = True
                self.tail = _BOUNDARY_TAIL
            elif len(data) >= len(BOUNDARY):
                self.boundary = False
                self.tail = data[-3:]
            else:  # a few bytes: with the ones before, they may end a block
                end = self.tail + data
                self.boundary = end.endswith(BOUNDARY)
                self.tail = end[-3:]
        web.RequestHandler.data_received(self, data)

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
        """Leave what the client sends next in the kernel (the drain's)."""
        assert self.transport is not None
        if self.transport.is_reading():
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`; a pause of aiohttp's own stays."""
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self.paused = False

    # -- state, read from aiohttp's own (see supported()) ----------------

    def at_boundary(self) -> bool:
        return self.boundary

    def idle(self) -> bool:
        waiter = self._waiter
        return (waiter is not None and not waiter.done() and not self._messages
                and self._current_request is None)

    def flushed(self) -> bool:
        """Nothing of a response is left in our buffer: handed over now, the
        tail of one could be lost, or mixed with the successor's next."""
        assert self.transport is not None
        return self.transport.get_write_buffer_size() == 0

    def between_requests(self) -> bool:
        """Everything received is consumed and no request handler runs: the
        moments around one (taken from the queue, its response being
        finished, the loop back to waiting)."""
        return (self.boundary and self._current_request is None
                and not self._messages)

    def busy_with_body_read(self) -> bool:
        """Busy, and every request received is complete: the one being
        handled and any parsed and queued behind it (under load a request
        often waits there for its handler to run). Pausing the reading then
        holds only what comes next, in the kernel; never true while a body is
        still arriving (pausing would stall that request)."""
        if (getattr(self, "_upgraded", False) or getattr(self, "_upgrade", False)
                or getattr(self, "_payload_parser", None)):
            # Upgraded (a websocket): it is read for as long as it lives.
            # From its upgrade request on, before the handler prepares it:
            # aiohttp 3.14 names that flag _upgraded, 3.10 to 3.13 _upgrade.
            return False
        request = self._current_request
        if request is not None and not request.content.is_eof():
            return False
        queued = self._messages
        if request is None and not queued:
            return False
        return all(payload.is_eof() for _, payload in queued)


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
    (old side) and adopts handed-over ones (new side)."""

    def __init__(self) -> None:
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

    def site(self, runner: web.BaseRunner, sock: socket.socket,
             listener: str) -> web.BaseSite:
        """The site to serve ``sock`` with: tracked if its connections can
        move (TCP); a plain one otherwise (a Unix socket's connections drain
        the safe way: the successor adopts TCP connections only)."""
        self.runner = runner
        if not is_tcp(sock):
            return web.SockSite(runner, sock, backlog=DEFAULT_BACKLOG)
        return TrackedSite(runner, sock, listener, self)

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
                log.warning("adopting a connection failed: %r", exc)
                sock.close()

        task = asyncio.create_task(attach())
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    # ------------------------------------------------------------ old side

    async def step(self, upgrader: Upgrader,
                   close_after_next_response: Callable[[web.RequestHandler], None],
                   time_left: float | None = None, *, last_call: bool = False) -> bool:
        """One round: pause busy connections whose request has been read,
        hand every connection at a request boundary to the successor, and
        send the rest the safe way, within ``time_left`` seconds (the
        drain's) when given. A busy connection that cannot move after its
        response (what it read last ended no header block: a body) is told
        to close with it: idle, it would be cut at the
        deadline. ``last_call`` (the drain's end is near): so is every busy
        one, and none is paused any more; a response sent keep-alive now
        could not count on a move before the cut. Returns False once
        migration is not possible (no successor that adopts, or the channel
        broke)."""
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
            if conn.idle():
                if not conn.at_boundary():
                    close_after_next_response(conn)
                elif conn.flushed():
                    conn.pause()
                    ready.append(conn)
                # else: its last response is still being sent; next round.
            elif last_call or not conn.at_boundary():
                close_after_next_response(conn)
                conn.resume()  # if paused in an earlier round
            elif conn.busy_with_body_read():
                # Keep its next request in the kernel: at the end of this
                # response it is at a boundary, and moves next round.
                conn.pause()
                conn.soon_since = soon
                pending += conn.soon(now)
            elif conn.between_requests():
                # Not provably safe to pause (the request just taken may
                # still have a body to read), but a boundary is a loop
                # iteration or two away: no 10 ms wait for it.
                conn.soon_since = soon
                pending += conn.soon(now)
        self.pending = pending
        if not ready:
            return True
        # A frame's worth at a time: dup, send, close, so the old process
        # never holds two descriptors for more than 253 connections.
        moved = 0
        until = None if time_left is None else loop.time() + time_left
        short = False  # no descriptor left for more copies; the channel works
        done = 0  # moved, or closed meanwhile
        for i in range(0, len(ready), MAX_FDS_PER_FRAME):
            batch = ready[i:i + MAX_FDS_PER_FRAME]
            left = None if until is None else max(0.0, until - loop.time())
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
            log.info("handed %d idle connection(s) to the successor", moved)
        # Short of descriptors, the next rounds go on with what this one freed
        # (after _COPY_RETRY if it freed none).
        if short and not moved:
            self._copy_retry_at = loop.time() + _COPY_RETRY
        return done == len(ready) or short

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
                        log.warning("no descriptor left to copy connections for the "
                                    "handover (%s): moving %d now, the rest as copies "
                                    "free up", exc, len(items))
                    break
                items.append((conn.listener, fd, str(peer)))
            if items:
                sent = await upgrader.hand_over_connections(items, timeout=time_left)
        except OSError as exc:
            log.warning("cannot hand %d connection(s) over (%s); they drain here",
                        len(batch), exc)
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
