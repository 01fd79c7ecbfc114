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

from .errors import BrokenResourceError, ClosedResourceError, HandoverTimeout, HotswapError
from .fdio import close_fds, peer_credentials, recv_some, send_frame
from .protocol import NEED_DATA, Connection, Message, Sender, encode

__all__ = ["Channel", "close_fds", "peer_credentials", "recv_some", "send_frame"]

_T = TypeVar("_T")


class Channel:
    """A :class:`~hotswap.protocol.Connection` driven over a Unix socket.

    Resource handling: the channel owns ``sock`` and closes it in
    :meth:`close`. Descriptors it receives belong to the Connection until a
    :class:`~hotswap.protocol.Sockets` event hands them to the caller;
    :meth:`close` closes any still held.

    Error handling: every wait takes a ``timeout`` and raises
    :class:`~hotswap.errors.HandoverTimeout` when it passes; an ``OSError``
    from the socket becomes :class:`~hotswap.errors.BrokenResourceError`
    (chained); use after :meth:`close` is
    :class:`~hotswap.errors.ClosedResourceError`.
    """

    def __init__(self, sock: socket.socket, role: Sender) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.conn = Connection(role)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_credentials(self) -> tuple[int, int, int]:
        return peer_credentials(self.sock)

    async def send(self, message: Message, *, timeout: float) -> None:
        """Send one message (with its descriptors, for Sockets)."""
        self._check_open()
        frame = self.conn.send(message)
        fds = getattr(message, "fds", ())
        try:
            async with asyncio.timeout(timeout):
                sent = await self._io(lambda: send_frame(self.sock, frame, fds),
                                      writable=True)
                while sent < len(frame):
                    rest = frame[sent:]
                    sent += await self._io(functools.partial(self.sock.send, rest),
                                           writable=True)
        except TimeoutError:
            raise HandoverTimeout(
                f"sending {message.TYPE!r} took longer than {timeout:.1f}s") from None
        except OSError as exc:
            raise BrokenResourceError(f"sending {message.TYPE!r}: {exc}") from exc

    async def receive(self, *, timeout: float) -> Message:
        """Wait for the next message.

        Raises BrokenResourceError on EOF, RemoteProtocolError on garbage,
        HandoverTimeout after ``timeout`` seconds.
        """
        self._check_open()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self.conn.next_event()
                    if event is not NEED_DATA:
                        assert isinstance(event, Message)
                        return event
                    if self.conn.at_eof:
                        raise BrokenResourceError("peer closed the control connection")
                    data, fds = await self._io(lambda: recv_some(self.sock),
                                               writable=False)
                    self.conn.receive_data(data, fds)
        except TimeoutError:
            raise HandoverTimeout(
                f"no message from the peer within {timeout:.1f}s") from None
        except OSError as exc:
            raise BrokenResourceError(f"receiving: {exc}") from exc

    def send_nowait(self, message: Message) -> None:
        """Best effort: write one frame now, bypassing the state machine (to
        explain an error on a conversation that is already dead). Never
        raises; a peer that does not read it loses nothing of ours."""
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self.sock.send(encode(message))

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
            try:
                return op()
            except (BlockingIOError, InterruptedError):
                pass
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(w: asyncio.Future[None] = waiter) -> None:
                if not w.done():
                    w.set_result(None)

            if writable:
                loop.add_writer(fd, wake)
            else:
                loop.add_reader(fd, wake)
            try:
                await waiter
            finally:
                if writable:
                    loop.remove_writer(fd)
                else:
                    loop.remove_reader(fd)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("control channel is closed")

    def close(self) -> None:
        """Close the socket and any descriptors not yet handed out. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.conn.close_fds()
        self.sock.close()
