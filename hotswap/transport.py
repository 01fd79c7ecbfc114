"""The asyncio driver of the control channel.

:class:`Channel` drives a sans-IO :class:`~hotswap.protocol.Connection` over a
Unix stream socket with asyncio (any loop that implements
``add_reader``/``add_writer``, uvloop included), with a deadline on every wait.
The socket calls themselves (``sendmsg``/``recvmsg`` with descriptors) live in
:mod:`hotswap.fdio` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Callable
from typing import TypeVar

from .errors import (
    BrokenResourceError,
    ClosedResourceError,
    HandoverTimeout,
    HotswapError,
    RemoteProtocolError,
)
from .fdio import RECV_BUFSIZE, close_fds, peer_credentials, recv_some, send_frame
from .protocol import NEED_DATA, Connection, Message, Sender, encode

__all__ = ["Channel", "close_fds", "peer_credentials", "recv_some", "send_frame"]

_T = TypeVar("_T")


def wake(waiter: asyncio.Future[None]) -> None:
    """A reader's or writer's callback: wake ``waiter`` (once)."""
    if not waiter.done():
        waiter.set_result(None)


class Channel:
    """A :class:`~hotswap.protocol.Connection` driven over a Unix socket.

    Resource handling: the channel owns ``sock`` and closes it in
    :meth:`close`. Descriptors given to :meth:`send` stay the caller's (the
    kernel sends copies). Descriptors it receives belong to the channel (read
    ahead, or held by the Connection for a frame not yet complete) until
    :meth:`receive` returns the :class:`~hotswap.protocol.Sockets` or
    :class:`~hotswap.protocol.Connections` message that names them: from
    then on the caller owns them and must adopt or close each. The channel
    closes every descriptor it still holds in :meth:`close`, and at once when
    a receive fails with RemoteProtocolError or MSG_CTRUNC.

    Error handling: every wait takes a ``timeout`` and raises
    :class:`~hotswap.errors.HandoverTimeout` when it passes; an ``OSError``
    from the socket becomes :class:`~hotswap.errors.BrokenResourceError`
    (chained); use after :meth:`close` is
    :class:`~hotswap.errors.ClosedResourceError`.

    Descriptors and frames: each received descriptor is delivered with the
    frame it was sent with, never an earlier or a later one -- see
    :meth:`receive` for how, and :mod:`hotswap.fdio` for the kernel behaviour
    that makes it necessary. Sends may come from several tasks (they take
    turns); receives from one task at a time.
    """

    def __init__(self, sock: socket.socket, role: Sender) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.conn = Connection(role)
        self._closed = False
        # Read but not yet given to the Connection (see _feed): bytes from
        # _ahead_at on, and the descriptors that came with the read.
        self._ahead = b""
        self._ahead_at = 0
        self._ahead_fds: list[int] = []
        self._receive_broken = ""  # why receiving cannot go on (MSG_CTRUNC)
        self._send_lock = asyncio.Lock()
        self._torn = False  # a frame went out in part only
        self._shut = False  # shutdown_sending(): nothing more goes out
        # The loop and waiter of a send (True) / receive (False) waiting for
        # the socket, so that close() can unregister them before the
        # descriptor goes.
        self._waiting: dict[bool, tuple[asyncio.AbstractEventLoop,
                                        asyncio.Future[None]]] = {}

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_closed(self) -> bool:
        """Whether the other end has closed (EOF or reset) and nothing is
        left for us to read: a non-blocking peek that consumes nothing.
        Bytes already read but not yet received (read ahead, or held by the
        Connection: a later frame that came in one read with an earlier
        one) are left to read."""
        if self._closed or len(self._ahead) > self._ahead_at or self.conn.buffered:
            return False
        return self._peek() == b""

    def peer_spoke(self) -> bool:
        """Whether the other end has sent something not yet received, or
        closed: a non-blocking peek that consumes nothing. What was read
        already but not yet received counts (see :meth:`peer_closed`)."""
        if self._closed:
            return False
        return (len(self._ahead) > self._ahead_at or self.conn.buffered > 0
                or self._peek() is not None)

    def _peek(self) -> bytes | None:
        """The next byte in the socket (not consumed), ``b""`` if the other
        end closed (EOF or reset), None if nothing is there yet (or the peek
        failed otherwise)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except OSError:  # nothing to read yet (EAGAIN), or anything else
            return None

    def peer_credentials(self) -> tuple[int, int, int]:
        return peer_credentials(self.sock)

    async def send(self, message: Message, *, timeout: float) -> None:
        """Send one message (with its descriptors, for Sockets and Connections).

        The caller keeps ownership of ``message.fds`` whatever happens. Frames
        never interleave: a send waits (within ``timeout``) while another is
        in progress. A send that fails after part of its frame went out
        (deadline, cancellation, socket error) leaves the peer in the middle
        of that frame: every later send raises BrokenResourceError.
        """
        self._check_open()
        fds = getattr(message, "fds", ())
        frame = b""
        sent = 0
        try:
            async with asyncio.timeout(timeout):
                async with self._send_lock:
                    self._check_open()
                    if self._torn or self._shut:
                        raise BrokenResourceError(
                            f"cannot send {message.TYPE!r}: " + (
                                "an earlier frame was cut short" if self._torn
                                else "our side of the channel is shut"))
                    frame = self.conn.send(message)
                    # The descriptors go with the frame's first byte, in a
                    # sendmsg of this frame only; the rest follows before
                    # any other frame (the lock), as fdio describes.
                    sent = await self._io(lambda: send_frame(self.sock, frame, fds),
                                          writable=True)
                    while sent < len(frame):
                        sent += await self._io(
                            functools.partial(self.sock.send, frame[sent:]), writable=True)
        except TimeoutError:
            raise HandoverTimeout(
                f"sending {message.TYPE!r} took longer than {timeout:.1f}s") from None
        except OSError as exc:
            raise BrokenResourceError(f"sending {message.TYPE!r}: {exc}") from exc
        finally:
            if 0 < sent < len(frame):
                self._torn = True

    async def receive(self, *, timeout: float) -> Message:
        """Wait for the next message.

        A returned Sockets or Connections message carries descriptors the
        caller now owns. Raises BrokenResourceError on EOF, a socket error or
        MSG_CTRUNC (after which receiving cannot go on), RemoteProtocolError
        on garbage, HandoverTimeout after ``timeout`` seconds. On
        RemoteProtocolError and MSG_CTRUNC every descriptor the channel held
        has been closed; on HandoverTimeout they stay held (for a later
        receive, or :meth:`close`).

        How descriptors stay with their frame: between frames the channel
        reads all that is there (one ``recvmsg`` for any number of queued
        small frames). Descriptors that such a read returns rode with the
        frame holding its last byte (the kernel's barrier, see
        :mod:`hotswap.fdio`), so the read is given to the Connection a frame
        at a time, the descriptors with that last frame's bytes. Once a
        frame has begun, the channel reads no further than its end (the
        Connection's ``bytes_needed``), so whatever arrives is that frame's.
        """
        self._check_open()
        if self._receive_broken:
            raise BrokenResourceError(self._receive_broken)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self.conn.next_event()
                    if event is not NEED_DATA:
                        assert isinstance(event, Message)
                        return event
                    if not self._ahead:
                        if self.conn.at_eof:
                            raise BrokenResourceError(
                                "peer closed the control connection", eof=True)
                        try:
                            data, fds = await self._io(self._recv, writable=False)
                        except BrokenResourceError as exc:  # MSG_CTRUNC, bytes lost
                            self._receive_broken = str(exc)
                            self.conn.close_fds()
                            raise
                        if not (fds and data):
                            self.conn.receive_data(data, fds)
                            continue
                        self._ahead, self._ahead_at, self._ahead_fds = data, 0, fds
                    self._feed()
        except TimeoutError:
            raise HandoverTimeout(
                f"no message from the peer within {timeout:.1f}s") from None
        except RemoteProtocolError:
            self._drop_ahead()
            raise
        except OSError as exc:
            raise BrokenResourceError(f"receiving: {exc}") from exc

    def _recv(self) -> tuple[bytes, list[int]]:
        size = RECV_BUFSIZE
        if self.conn.buffered:  # inside a frame: not past its end
            size = min(size, max(1, self.conn.bytes_needed))
        if self.conn.our_role is Sender.SERVER:
            # No client message carries descriptors: take none (the kernel
            # closes what it cannot deliver), rather than hold up to a
            # frame's worth that a peer parked with a partial frame.
            try:
                return recv_some(self.sock, size, max_fds=0)
            except BrokenResourceError:  # MSG_CTRUNC: the bytes went too
                self._receive_broken = "the client sent descriptors"
                raise RemoteProtocolError(
                    "descriptors from a client, whose messages carry none "
                    "(the kernel closed them)") from None
        return recv_some(self.sock, size)

    def _feed(self) -> None:
        """Give the Connection what was read ahead, up to the end of the frame
        it is receiving (header, then body); the descriptors go with the
        piece that holds the read's last byte: their frame's."""
        data, at = self._ahead, self._ahead_at
        while True:
            need = max(1, self.conn.bytes_needed)
            if len(data) - at <= need:
                fds = self._ahead_fds
                self._ahead, self._ahead_at, self._ahead_fds = b"", 0, []
                self.conn.receive_data(data[at:], fds)
                return
            self.conn.receive_data(data[at:at + need])
            at += need
            self._ahead_at = at
            if not self.conn.bytes_needed:  # a whole frame: next_event's turn
                return

    def _drop_ahead(self) -> None:
        fds = self._ahead_fds
        self._ahead, self._ahead_at, self._ahead_fds = b"", 0, []
        close_fds(fds)

    def send_nowait(self, message: Message) -> None:
        """Best effort: write one frame now, bypassing the state machine (to
        explain an error on a conversation that is already dead). Never
        raises; a peer that does not read it loses nothing of ours."""
        if self._closed or self._torn or self._shut or self._send_lock.locked():
            return  # the peer is mid-frame: our bytes would land inside it
        frame = encode(message)
        with contextlib.suppress(OSError):
            if self.sock.send(frame) < len(frame):
                self._torn = True

    async def request(self, message: Message, *, timeout: float) -> Message:
        """Send ``message`` and return the reply.

        A server that refuses a peer may answer and close before reading what
        the peer sent, so a broken send is followed by a read: the answer
        that is already queued wins over the send error.
        """
        try:
            await self.send(message, timeout=timeout)
        except BrokenResourceError as send_error:
            try:
                return await self.receive(timeout=timeout)
            except HotswapError:
                raise send_error from send_error.__cause__
        return await self.receive(timeout=timeout)

    async def _io(self, op: Callable[[], _T], *, writable: bool) -> _T:
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        while True:
            self._check_open()
            try:
                return op()
            except (BlockingIOError, InterruptedError):
                pass
            waiter: asyncio.Future[None] = loop.create_future()
            if writable:
                loop.add_writer(fd, wake, waiter)
            else:
                loop.add_reader(fd, wake, waiter)
            self._waiting[writable] = (loop, waiter)
            try:
                await waiter
            finally:
                # Unregister here only if close() has not (the descriptor
                # number may belong to another socket by now).
                if self._waiting.get(writable, (None, None))[1] is waiter:
                    del self._waiting[writable]
                    self._unwatch(loop, fd, writable)

    @staticmethod
    def _unwatch(loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("control channel is closed")

    def shutdown_sending(self) -> None:
        """Send no more (``shutdown(SHUT_WR)``): the peer reads EOF after
        what we sent, and we may still receive. The channel's socket is
        ours and the peer's alone (never a shared listener). Every later
        :meth:`send` raises BrokenResourceError."""
        self._check_open()
        self._shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise BrokenResourceError(f"ending our side: {exc}") from exc

    def close(self) -> None:
        """Close the socket and any descriptors not yet handed out. Idempotent.
        A send or receive waiting on the socket meanwhile raises
        ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        fd = self.sock.fileno()
        for writable, (loop, waiter) in list(self._waiting.items()):
            self._unwatch(loop, fd, writable)
            if not waiter.done():
                waiter.set_result(None)  # _io looks again and finds us closed
        self._waiting.clear()
        self.conn.close_fds()
        self._drop_ahead()
        self.sock.close()
