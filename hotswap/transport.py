"""The thin I/O edge: frames plus descriptors over a Unix stream socket.

:func:`send_frame` and :func:`recv_some` are the only places that call
``sendmsg``/``recvmsg``; :class:`Channel` drives a sans-IO
:class:`~hotswap.protocol.Connection` over them with asyncio (any loop that
implements ``add_reader``/``add_writer``, uvloop included), with a deadline on
every wait.

Linux facts handled here:

- at most 253 descriptors per ``sendmsg`` (``SCM_MAX_FD``): the protocol layer
  chunks, this layer refuses more;
- ``recvmsg`` with ``MSG_CMSG_CLOEXEC`` so received descriptors are never
  inherited by a child we spawn;
- ``MSG_CTRUNC`` (the kernel dropped descriptors that did not fit) is a
  :class:`~hotswap.errors.BrokenResourceError`, raised after closing every
  descriptor that did arrive.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

from .errors import BrokenResourceError, ClosedResourceError, HandoverTimeout, HotswapError
from .protocol import MAX_FDS_PER_FRAME, NEED_DATA, Connection, Message, Sender, encode

_T = TypeVar("_T")
RECV_BUFSIZE = 64 * 1024
_INT_SIZE = array.array("i").itemsize
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * _INT_SIZE)


def close_fds(fds: Sequence[int]) -> None:
    """Close each descriptor, ignoring ones that are already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _parse_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - (len(data) % _INT_SIZE)
            fds.extend(array.array("i", data[:usable]))
    return fds


def recv_some(sock: socket.socket,
              max_fds: int = MAX_FDS_PER_FRAME) -> tuple[bytes, list[int]]:
    """One non-blocking ``recvmsg``: the bytes and the descriptors that came.

    Returns ``(b"", [])`` at EOF. Raises BlockingIOError if nothing is ready.
    On ``MSG_CTRUNC`` closes what arrived and raises BrokenResourceError.
    The caller owns the returned descriptors. ``max_fds`` sizes the ancillary
    buffer (one frame's worth by default).
    """
    space = _CMSG_SPACE if max_fds == MAX_FDS_PER_FRAME else socket.CMSG_SPACE(
        max_fds * _INT_SIZE)
    data, ancdata, flags, _ = sock.recvmsg(RECV_BUFSIZE, space, socket.MSG_CMSG_CLOEXEC)
    fds = _parse_fds(ancdata)
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise BrokenResourceError(
            f"control message truncated (MSG_CTRUNC): {len(fds)} descriptor(s) "
            "arrived and were closed")
    return data, fds


def send_frame(sock: socket.socket, frame: bytes, fds: Sequence[int] = ()) -> int:
    """One non-blocking ``sendmsg`` of ``frame`` with ``fds`` attached.

    Returns how many bytes went out; the descriptors went with the first byte.
    The caller keeps ownership of ``fds`` (the kernel duplicates them).
    """
    if len(fds) > MAX_FDS_PER_FRAME:
        raise ValueError(f"at most {MAX_FDS_PER_FRAME} descriptors per sendmsg")
    if not fds:
        return sock.send(frame)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    return sock.sendmsg([frame], anc)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer from SO_PEERCRED (pid 0 across PID
    namespaces)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


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
