"""Frames plus descriptors over a Unix stream socket, with no event loop.

The only calls of ``sendmsg``/``recvmsg`` in hotswap. Used by the asyncio
driver (:mod:`hotswap.transport`) and, blocking, by the CLI (which starts
fast because it imports no event loop).

Linux facts handled here:

- at most 253 descriptors per ``sendmsg`` (``SCM_MAX_FD``): the protocol layer
  chunks, this layer refuses more;
- ``recvmsg`` with ``MSG_CMSG_CLOEXEC`` so received descriptors are never
  inherited by a child we spawn;
- ``MSG_CTRUNC`` (the kernel dropped descriptors that did not fit -- no room
  in the buffer, or no free descriptor number in this process) is a
  :class:`~hotswap.errors.BrokenResourceError`, raised after closing every
  descriptor that did arrive;
- one ``sendmsg`` bigger than what the kernel puts in one skb (about 36 KB)
  is split into several, and only the first carries the descriptors. A
  ``recvmsg`` stops *after* an skb that carried descriptors (unix(7): the
  ancillary data "forms a kind of barrier"), but not *before* one: a read that
  continues the fd-less rest of one frame runs on into the next frame's first
  skb and takes that frame's descriptors. So the descriptors one ``recvmsg``
  returns rode with the ``sendmsg`` that holds the *last* byte it returned;
  they can belong to a later frame than its first byte. A reader that wants
  one frame's descriptors reads no further than that frame's end
  (``size``), or attributes them by the last byte, as
  :meth:`hotswap.transport.Channel.receive` does.

A sender keeps its side of this by sending each frame that carries
descriptors with its own ``sendmsg`` starting at the frame's first byte
(:func:`send_frame`), the rest of the frame after it, and no other frame's
bytes in between.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import Sequence

from .errors import BrokenResourceError
from .protocol import MAX_FDS_PER_FRAME

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


def recv_some(sock: socket.socket, size: int = RECV_BUFSIZE,
              max_fds: int = MAX_FDS_PER_FRAME) -> tuple[bytes, list[int]]:
    """One non-blocking ``recvmsg`` of at most ``size`` bytes: the bytes and
    the descriptors that came with them (close-on-exec).

    Returns ``(b"", [])`` at EOF. Raises BlockingIOError if nothing is ready,
    OSError as the socket does. On ``MSG_CTRUNC`` closes what arrived and
    raises BrokenResourceError (the bytes of that read are lost with it).
    The caller owns the returned descriptors. ``max_fds`` sizes the ancillary
    buffer (one frame's worth by default). The descriptors belong to the
    sender's frame that holds the last byte returned (see the module notes),
    which is not the first byte's frame if the read crossed a frame's end.
    """
    space = _CMSG_SPACE if max_fds == MAX_FDS_PER_FRAME else socket.CMSG_SPACE(
        max_fds * _INT_SIZE)
    data, ancdata, flags, _ = sock.recvmsg(size, space, socket.MSG_CMSG_CLOEXEC)
    fds = _parse_fds(ancdata)
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise BrokenResourceError(
            f"control message truncated (MSG_CTRUNC): {len(fds)} descriptor(s) "
            f"arrived and were closed ({descriptor_room()})", truncated=True)
    return data, fds


def descriptor_room() -> str:
    """This process's descriptors in use against its limit, for errors."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        used = str(len(os.listdir("/proc/self/fd")) - 1)  # less the listing's own
    except OSError:  # no descriptor left to list them with
        used = "all"
    return f"{used} of RLIMIT_NOFILE {soft} descriptors in use"


def send_frame(sock: socket.socket, frame: bytes, fds: Sequence[int] = ()) -> int:
    """One non-blocking ``sendmsg`` of ``frame`` with ``fds`` attached.

    Returns how many bytes went out; the descriptors went with the first byte
    (if none went, neither did they: OSError or BlockingIOError). The rest of
    the frame must follow with plain sends before any other frame. The caller
    keeps ownership of ``fds`` (the kernel duplicates them), also on error.
    """
    if len(fds) > MAX_FDS_PER_FRAME:
        raise ValueError(f"at most {MAX_FDS_PER_FRAME} descriptors per sendmsg")
    if not fds:
        return sock.send(frame)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    return sock.sendmsg([frame], anc)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer from SO_PEERCRED (pid 0 across PID
    namespaces). ``sock`` stays the caller's; OSError as getsockopt()
    raises it.

    ``struct ucred``: the pid is signed (``pid_t``), the uid and gid are
    not (``uid_t``, ``gid_t``): read as signed, a uid from 2**31 on came out
    negative, never equal to an allowed uid or to ``os.getuid()``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    pid, uid, gid = struct.unpack("iII", raw)
    return pid, uid, gid
