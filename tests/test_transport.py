"""The fd transport over real ``socket.socketpair()`` ends."""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import socket

import pytest

from hotswap.errors import BrokenResourceError, HandoverTimeout, RemoteProtocolError
from hotswap.protocol import Hello, Sender, SocketInfo, Sockets, Welcome, split_sockets
from hotswap.transport import Channel, recv_some, send_frame


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Run a coroutine under the stock loop and under uvloop."""
    runner = asyncio.run
    if request.param == "uvloop":
        import uvloop
        runner = uvloop.run

    async def nothing() -> None:
        pass

    # uvloop keeps two descriptors of its own from its first run on (libuv's
    # process-wide signal pipe): warm it up before a test takes its baseline.
    runner(nothing())
    return runner


def test_more_than_253_descriptors_in_chunks(run) -> None:  # type: ignore[no-untyped-def]
    """600 named descriptors cross in 3 frames, arrive in order, close-on-exec,
    and refer to the same open files; nothing leaks on either side."""
    before = open_fds()
    pipes = [os.pipe() for _ in range(300)]
    sent = [fd for pair in pipes for fd in pair]
    entries = [SocketInfo(name=f"fd{i}", family="unix", kind="stream", address=f"/x{i}")
               for i in range(len(sent))]

    async def main() -> list[int]:
        a, b = socket.socketpair()
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            await server.receive(timeout=5)
            await server.send(Welcome(pid=1, version="v", count=len(sent)), timeout=5)
            await client.receive(timeout=5)
            got: list[int] = []

            async def sender() -> None:
                for chunk in split_sockets(entries, sent):
                    await server.send(chunk, timeout=5)

            task = asyncio.create_task(sender())
            while len(got) < len(sent):
                event = await client.receive(timeout=5)
                assert isinstance(event, Sockets)
                assert [e.name for e in event.entries] == [
                    f"fd{i}" for i in range(len(got), len(got) + event.nfds)]
                got.extend(event.fds)
            await task
            return got
        finally:
            server.close()
            client.close()

    received = run(main())
    assert len(received) == 600
    for fd in received:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    # The received copies refer to the same pipes: write on a sent write end,
    # read on the received read end.
    os.write(sent[1], b"x")
    assert os.read(received[0], 1) == b"x"
    for fd in received + sent:
        os.close(fd)
    assert open_fds() == before


def test_truncated_control_message_leaks_nothing() -> None:
    """MSG_CTRUNC: the kernel dropped descriptors that did not fit; the ones
    that did arrive are closed and the error says so."""
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(4)]
    fds = [r for r, _ in pipes]
    send_frame(a, b"abcd", fds)
    before = open_fds()
    with pytest.raises(BrokenResourceError, match=r"MSG_CTRUNC.*2 descriptor"):
        recv_some(b, max_fds=2)
    assert open_fds() == before
    for r, w in pipes:
        os.close(r)
        os.close(w)
    a.close()
    b.close()


def test_garbage_closes_descriptors_that_came_with_it(run) -> None:  # type: ignore[no-untyped-def]
    r, w = os.pipe()
    before = open_fds()

    async def main() -> None:
        a, b = socket.socketpair()
        server = Channel(a, Sender.SERVER)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())]
        b.sendmsg([b"\x00\x00\x00\x02{}"], anc)
        try:
            with pytest.raises(RemoteProtocolError):
                await server.receive(timeout=5)
        finally:
            server.close()
            b.close()

    run(main())
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_receive_deadline_and_eof(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        a, b = socket.socketpair()
        server = Channel(a, Sender.SERVER)
        with pytest.raises(HandoverTimeout):
            await server.receive(timeout=0.05)
        b.close()
        with pytest.raises(BrokenResourceError, match="closed"):
            await server.receive(timeout=5)
        server.close()

    run(main())


def test_send_more_than_scm_max_fd_is_refused() -> None:
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="253"):
        send_frame(a, b"x", list(range(254)))
    a.close()
    b.close()
