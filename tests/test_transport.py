"""The fd transport over real ``socket.socketpair()`` ends."""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
from conftest import Runner

from hotswap.errors import (
    BrokenResourceError,
    ClosedResourceError,
    HandoverTimeout,
    RemoteProtocolError,
)
from hotswap.protocol import (
    MAX_FDS_PER_FRAME,
    Accepting,
    Connections,
    ConnInfo,
    Drained,
    Failed,
    Hello,
    Message,
    Released,
    Sender,
    SocketInfo,
    Sockets,
    StatusRequest,
    Welcome,
    encode,
    split_sockets,
)
from hotswap.transport import Channel, close_fds, peer_credentials, recv_some, send_frame


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
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


def test_more_than_253_descriptors_in_chunks(run: Runner) -> None:
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


@pytest.mark.parametrize("role", [Sender.CLIENT, Sender.SERVER])
def test_garbage_closes_descriptors_that_came_with_it(run: Runner, role: Sender) -> None:
    """Garbage with descriptors: a client closes them with the garbage; a
    server takes no descriptors at all (no client message has any): the
    kernel closes them, and that is a protocol error."""
    r, w = os.pipe()
    before = open_fds()

    async def main() -> None:
        a, b = socket.socketpair()
        channel = Channel(a, role)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())]
        b.sendmsg([b"\x00\x00\x00\x02{}"], anc)
        try:
            with pytest.raises(RemoteProtocolError):
                await channel.receive(timeout=5)
        finally:
            channel.close()
            b.close()

    run(main())
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_garbage_closes_the_descriptors_read_after_it_at_once(run: Runner) -> None:
    """Garbage, then a frame with descriptors that one read takes with it:
    the receive that fails closes those descriptors as it raises, not only
    when the channel is closed (they belong to no frame it will deliver)."""
    r, w = os.pipe()

    async def main() -> None:
        a, b = socket.socketpair()
        channel = Channel(a, Sender.CLIENT)
        try:
            b.sendall(b"\x00\x00\x00\x02{}")
            send_frame(b, encode(Sockets(entries=tuple(socket_entries(2, 10)))), [r, w])
            held = open_fds()
            with pytest.raises(RemoteProtocolError):
                await channel.receive(timeout=5)
            assert open_fds() == held
        finally:
            channel.close()
            b.close()

    before = open_fds()
    run(main())
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_receive_deadline_and_eof(run: Runner) -> None:
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


def test_peer_credentials_of_a_uid_past_2_31() -> None:
    """SO_PEERCRED's uid and gid are unsigned: a peer running as uid
    2**31 + 5 (allowed_uids() takes uids up to 2**32 - 2) is that uid, not
    the negative number that neither an allowed uid nor our own (for a
    process running as it) ever equals, which refused every such peer. A
    real peer process, forked and dropped to that uid."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the peer as another uid")
    high = 2**31 + 5
    address = f"\0hotswap-test-{os.getpid()}-{id(high)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:  # child: connect as the high uid, wait for the parent's close
        code = 1
        try:
            listener.close()
            os.setgroups([])
            os.setgid(high - 1)
            os.setuid(high)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
                peer.connect(address)
                peer.recv(1)
            code = 0
        finally:
            os._exit(code)
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            assert peer_credentials(conn) == (pid, high, high - 1)
    finally:
        listener.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ------------------------------------------------- descriptors stay with their frame
#
# A frame bigger than one skb (about 36 KB here) is split by the kernel and only
# its first skb carries the descriptors. A recvmsg stops after an skb that
# carried descriptors but not before one, so a read that continues an fd-less
# part of frame 1 runs on into frame 2's first skb and takes frame 2's
# descriptors while frame 1's are still pending. These tests send real,
# distinct sockets and check by inode that each arrived named by its own entry.


def ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def fresh_sockets(n: int) -> list[socket.socket]:
    """``n`` unconnected sockets: each its own inode."""
    return [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]


def socket_entries(n: int, name_len: int) -> list[SocketInfo]:
    return [SocketInfo(name=f"{i:04d}-" + "n" * (name_len - 5), family="inet",
                       kind="stream", address=f"127.0.0.1:{10000 + i}")
            for i in range(n)]


async def queued_then_received(server: Channel, client: Channel,
                               messages: list[Message], count: int) -> list[Message]:
    """The server queues ``messages`` (all of them, if the socket buffer
    holds them) before the client reads; the client receives until messages
    naming ``count`` descriptors have arrived."""
    async def sender() -> None:
        for message in messages:
            await server.send(message, timeout=5)

    task = asyncio.create_task(sender())
    await asyncio.wait({task}, timeout=1)
    got: list[Message] = []
    named = 0
    try:
        while named < count:
            event = await client.receive(timeout=5)
            got.append(event)
            named += event.nfds
    finally:
        for event in got:
            if isinstance(event, Sockets | Connections):
                close_fds(event.fds)
    await task
    return got


def check_attribution(got: list[Message], names: list[str], sent: list[socket.socket],
                      received: list[list[tuple[int, int]]]) -> None:
    """Every received descriptor is the sent socket its entry names."""
    by_name = {name: ident(sock.fileno()) for name, sock in zip(names, sent, strict=True)}
    order: list[str] = []
    for event, idents in zip([e for e in got if e.nfds], received, strict=True):
        assert isinstance(event, Sockets | Connections)
        event_names = [e.name if isinstance(e, SocketInfo) else e.peer
                       for e in event.entries]
        order.extend(event_names)
        assert len(idents) == len(event_names)
        for name, got_ident in zip(event_names, idents, strict=True):
            assert got_ident == by_name[name], f"{name} arrived as another socket"
    assert order == names


def record_descriptors(client: Channel, kind: type[Sockets | Connections],
                       received: list[list[tuple[int, int]]]) -> None:
    """Wrap ``client.receive``: note the identity of each descriptor that
    arrives with a ``kind`` message (and that it is close-on-exec)."""
    original = client.receive

    async def receive(*, timeout: float) -> Message:
        event = await original(timeout=timeout)
        if isinstance(event, kind):
            for fd in event.fds:
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            received.append([ident(fd) for fd in event.fds])
        return event

    client.receive = receive  # type: ignore[method-assign]


def run_600_and_check(run: Runner,
                      conversation: Coroutine[Any, Any, list[Message]], first: type[Message],
                      names: list[str], sent: list[socket.socket],
                      received: list[list[tuple[int, int]]], *,
                      owned: list[socket.socket], before: set[int]) -> None:
    """Run a conversation that ends with 600 descriptors in frames of 253;
    check each arrived as its own entry's, then close ``owned`` and check
    that no descriptor is left over."""
    try:
        got = run(conversation)
        assert isinstance(got[0], first)
        assert [e.nfds for e in got[1:]] == [253, 253, 94]
        check_attribution(got, names, sent, received)
    finally:
        for sock in owned:
            sock.close()
    assert open_fds() == before


@pytest.mark.parametrize("name_len", [100, 200], ids=["frames>skb", "frames>64KiB"])
def test_big_sockets_frames_keep_their_own_descriptors(run: Runner, name_len: int) -> None:
    """600 sockets with long names: frames of 253 larger than an skb (and,
    with 200-character names, larger than one 64 KiB read), all queued before
    the successor reads. Each descriptor arrives named by its own entry."""
    entries = socket_entries(600, name_len)
    chunks = split_sockets(entries, [0] * len(entries))
    # Bigger than one skb (about 36 KB), and with 200 characters than a read.
    assert min(len(encode(c)) for c in chunks[:2]) > (40_000 if name_len < 200 else 65_536)
    before = open_fds()
    sent = fresh_sockets(len(entries))
    received: list[list[tuple[int, int]]] = []

    async def main() -> list[Message]:
        a, b = socket.socketpair()
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            await server.receive(timeout=5)
            messages: list[Message] = [Welcome(pid=1, version="v", count=len(entries))]
            messages += split_sockets(entries, [s.fileno() for s in sent])
            record_descriptors(client, Sockets, received)
            return await queued_then_received(server, client, messages, len(entries))
        finally:
            server.close()
            client.close()

    run_600_and_check(run, main(), Welcome, [e.name for e in entries], sent, received,
                      owned=sent, before=before)


def test_big_connections_frames_keep_their_own_descriptors(run: Runner) -> None:
    """The same for connections handed over during the drain: 600 in frames
    of 253 with long listener names, queued before the successor reads."""
    before = open_fds()
    control = fresh_sockets(1)
    conns = fresh_sockets(600)
    infos = [ConnInfo(listener="l" * 150, peer=f"{i:04d}-127.0.0.1:{20000 + i}")
             for i in range(len(conns))]
    received: list[list[tuple[int, int]]] = []

    async def main() -> list[Message]:
        a, b = socket.socketpair()
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v", capabilities=("connections",)),
                              timeout=5)
            await server.receive(timeout=5)
            await server.send(Welcome(pid=1, version="v", count=1), timeout=5)
            await server.send(Sockets(entries=tuple(socket_entries(1, 10)),
                                      fds=(control[0].fileno(),)), timeout=5)
            assert isinstance(await client.receive(timeout=5), Welcome)
            first = await client.receive(timeout=5)
            assert isinstance(first, Sockets)
            close_fds(first.fds)
            await client.send(Accepting(), timeout=5)
            assert isinstance(await server.receive(timeout=5), Accepting)
            messages: list[Message] = [Released(pid=1)]
            for i in range(0, len(conns), MAX_FDS_PER_FRAME):
                messages.append(Connections(
                    entries=tuple(infos[i:i + MAX_FDS_PER_FRAME]),
                    fds=tuple(c.fileno() for c in conns[i:i + MAX_FDS_PER_FRAME])))
            assert len(encode(messages[1])) > 40_000
            messages.append(Drained(pid=1))
            record_descriptors(client, Connections, received)
            got = await queued_then_received(server, client, messages, len(conns))
            assert isinstance(await client.receive(timeout=5), Drained)
            return got
        finally:
            server.close()
            client.close()

    run_600_and_check(run, main(), Released, [i.peer for i in infos], conns, received,
                      owned=control + conns, before=before)


def test_descriptors_never_go_to_an_earlier_frame(run: Runner) -> None:
    """A Sockets frame that came without its descriptors is an error even when
    the next frame's descriptors are already queued: they are not its own."""
    before = open_fds()
    sent = fresh_sockets(3)
    entries = socket_entries(6, 10)

    async def main() -> None:
        a, b = socket.socketpair()
        client = Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            a.sendall(encode(Welcome(pid=1, version="v", count=6)))
            a.sendall(encode(Sockets(entries=tuple(entries[:3]))))  # no descriptors
            send_frame(a, encode(Sockets(entries=tuple(entries[3:]))),
                       [s.fileno() for s in sent])
            assert isinstance(await client.receive(timeout=5), Welcome)
            with pytest.raises(RemoteProtocolError, match="needs 3 descriptors, 0"):
                event = await client.receive(timeout=5)
                close_fds(getattr(event, "fds", ()))
        finally:
            client.close()
            a.close()

    try:
        run(main())
    finally:
        for sock in sent:
            sock.close()
    assert open_fds() == before


class CountingSocket(socket.socket):
    """A socket that counts its recvmsg calls (EAGAIN included)."""

    recvmsg_calls = 0

    def recvmsg(self, *args: int) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        CountingSocket.recvmsg_calls += 1
        return super().recvmsg(*args)


def test_small_frames_cost_one_recvmsg(run: Runner) -> None:
    """Small frames that are already queued are read together: a Welcome and
    a Sockets chunk behind it take one recvmsg, not one per frame or two per
    frame (header, then body)."""
    sent = fresh_sockets(3)

    async def main() -> int:
        a, raw = socket.socketpair()
        b = CountingSocket(fileno=raw.detach())
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            await server.receive(timeout=5)
            await server.send(Welcome(pid=1, version="v", count=3), timeout=5)
            await server.send(Sockets(entries=tuple(socket_entries(3, 10)),
                                      fds=tuple(s.fileno() for s in sent)), timeout=5)
            CountingSocket.recvmsg_calls = 0
            assert isinstance(await client.receive(timeout=5), Welcome)
            event = await client.receive(timeout=5)
            assert isinstance(event, Sockets)
            assert [ident(fd) for fd in event.fds] == [ident(s.fileno()) for s in sent]
            close_fds(event.fds)
            return CountingSocket.recvmsg_calls
        finally:
            server.close()
            client.close()

    try:
        assert run(main()) == 1
    finally:
        for sock in sent:
            sock.close()


async def receive_descriptors(client: Channel, total: int, senders: list[asyncio.Task[None]],
                              received: list[list[tuple[int, int]]],
                              before_each: Callable[[], Awaitable[None]] | None = None
                              ) -> list[Message]:
    """Receive until ``total`` descriptors came, noting each Sockets frame's
    descriptors (``ident``) in ``received`` and closing them; then wait for
    the ``senders``. On an error the client is closed first, so that the
    senders fail at once and this error is the one raised."""
    got: list[Message] = []
    try:
        while sum(e.nfds for e in got) < total:
            if before_each is not None:
                await before_each()
            event = await client.receive(timeout=5)
            got.append(event)
            if isinstance(event, Sockets):
                received.append([ident(fd) for fd in event.fds])
    except BaseException:
        client.close()
        await asyncio.wait(senders)
        raise
    finally:
        for event in got:
            close_fds(getattr(event, "fds", ()))
    await asyncio.gather(*senders)
    return got


def test_concurrent_sends_never_interleave_frames(run: Runner) -> None:
    """Frames sent from several tasks at once arrive whole and in order, each
    with its own descriptors, even when a sendmsg goes out in part (a small
    socket buffer): the rest of a frame goes before any other frame."""
    before = open_fds()
    sent = fresh_sockets(600)
    entries = socket_entries(len(sent), 100)
    received: list[list[tuple[int, int]]] = []

    async def main() -> list[Message]:
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            await server.receive(timeout=5)
            await server.send(Welcome(pid=1, version="v", count=len(sent)), timeout=5)
            assert isinstance(await client.receive(timeout=5), Welcome)
            chunks = split_sockets(entries, [s.fileno() for s in sent])
            sends = [asyncio.create_task(server.send(c, timeout=5)) for c in chunks]
            got = await receive_descriptors(client, len(sent), sends, received)
            assert all(isinstance(e, Sockets) for e in got), got
            return got
        finally:
            server.close()
            client.close()

    try:
        got = run(main())
        check_attribution(got, [e.name for e in entries], sent, received)
    finally:
        for sock in sent:
            sock.close()
    assert open_fds() == before


async def welcomed_server() -> tuple[Channel, socket.socket]:
    """A server's channel past its Welcome (one socket announced), with a
    small send buffer (16 KiB: a big frame goes out in part), and its
    peer's raw, blocking socket. The caller closes both."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    server = Channel(a, Sender.SERVER)
    try:
        b.sendall(encode(Hello(pid=1, version="v")))
        await server.receive(timeout=5)
        await server.send(Welcome(pid=1, version="v", count=1), timeout=5)
    except BaseException:
        server.close()
        b.close()
        raise
    return server, b


def test_nothing_is_sent_after_a_frame_cut_short(run: Runner) -> None:
    """A send that times out with part of its frame out leaves the peer in
    the middle of that frame: later sends refuse instead of writing bytes the
    peer would read as the rest of it."""
    before = open_fds()
    sent = fresh_sockets(1)

    async def main() -> bytes:
        server, b = await welcomed_server()
        try:
            big = Sockets(entries=(SocketInfo(name="x" * 200, family="unix", kind="stream",
                                              address="@" + "a" * 200_000),),
                          fds=(sent[0].fileno(),))
            with pytest.raises(HandoverTimeout):
                await server.send(big, timeout=0.2)
            with pytest.raises(BrokenResourceError, match="cut short"):
                await server.send(Failed(reason="x"), timeout=1)
            server.send_nowait(Failed(reason="y"))
        finally:
            server.close()
        data = b""
        while True:  # blocking, up to EOF
            chunk, fds = recv_some(b)
            close_fds(fds)
            if not chunk:
                break
            data += chunk
        b.close()
        return data

    try:
        data = run(main())
    finally:
        for sock in sent:
            sock.close()
    welcome = encode(Welcome(pid=1, version="v", count=1))
    frame = encode(Sockets(entries=(SocketInfo(name="x" * 200, family="unix", kind="stream",
                                               address="@" + "a" * 200_000),)))
    # The Welcome, then a part of the big frame, and nothing after it.
    assert data.startswith(welcome)
    assert len(welcome) < len(data) < len(welcome) + len(frame)
    assert frame.startswith(data[len(welcome):])
    assert open_fds() == before


def test_send_nowait_writes_nothing_while_a_frame_is_going_out(run: Runner) -> None:
    """send_nowait() while another task's frame is part way out writes
    nothing, even with room in the socket buffer (the peer read some
    before that task ran again): its bytes would land inside that frame.
    The frame then goes out whole, and nothing else."""
    before = open_fds()
    sent = fresh_sockets(1)
    big = Sockets(entries=(SocketInfo(name="x", family="unix", kind="stream",
                                      address="@" + "a" * 200_000),),
                  fds=(sent[0].fileno(),))

    async def main() -> bytes:
        server, b = await welcomed_server()
        try:
            sending = asyncio.create_task(server.send(big, timeout=5))
            await asyncio.sleep(0)  # one loop turn: the task runs up to its wait
            assert not sending.done()
            data = b.recv(65536)  # room in the buffer: the rest of the frame would fit
            server.send_nowait(Failed(reason="y"))
            b.setblocking(False)
            loop = asyncio.get_running_loop()
            while chunk := await loop.sock_recv(b, 65536):  # up to EOF
                data += chunk
                if sending.done():
                    await sending
                    server.close()
        finally:
            server.close()
            b.close()
        return data

    try:
        data = run(main())
    finally:
        for sock in sent:
            sock.close()
    assert data == encode(Welcome(pid=1, version="v", count=1)) + encode(big)
    assert open_fds() == before


@pytest.mark.parametrize("seed", range(6))
def test_random_frames_splits_and_timing_keep_descriptors_with_their_frame(
        run: Runner, seed: int) -> None:
    """Sockets frames of random sizes (1-253 entries, names of 1-200
    characters), a socket buffer that is sometimes small (sendmsg goes out in
    parts), a reader that is sometimes slower than the sender: every
    descriptor arrives with its own frame, nothing leaks."""
    import random

    rng = random.Random(seed)
    counts = [rng.randint(1, MAX_FDS_PER_FRAME) for _ in range(rng.randint(2, 5))]
    entries = [SocketInfo(name=f"{i:04d}-" + "n" * rng.randint(0, 195), family="inet",
                          kind="stream", address=f"127.0.0.1:{i + 1}")
               for i in range(sum(counts))]
    before = open_fds()
    sent = fresh_sockets(len(entries))
    received: list[list[tuple[int, int]]] = []

    async def main() -> list[Message]:
        a, b = socket.socketpair()
        if rng.random() < 0.5:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rng.choice([8, 32]) * 1024)
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            await server.receive(timeout=5)
            frames: list[Message] = [Welcome(pid=1, version="v", count=len(entries))]
            at = 0
            for n in counts:
                frames.append(Sockets(entries=tuple(entries[at:at + n]),
                                      fds=tuple(s.fileno() for s in sent[at:at + n])))
                at += n

            async def sender() -> None:
                for frame in frames:
                    await server.send(frame, timeout=5)
                    if rng.random() < 0.3:
                        await asyncio.sleep(0.001)

            async def now_and_then() -> None:
                if rng.random() < 0.3:
                    await asyncio.sleep(0.002)

            return await receive_descriptors(client, len(entries),
                                             [asyncio.create_task(sender())], received,
                                             now_and_then)
        finally:
            server.close()
            client.close()

    try:
        got = run(main())
        assert [e.nfds for e in got] == [0, *counts]
        check_attribution(got, [e.name for e in entries], sent, received)
    finally:
        for sock in sent:
            sock.close()
    assert open_fds() == before


def test_descriptors_that_do_not_fit_break_receiving_and_leak_nothing() -> None:
    """No free descriptor number for all of a frame's descriptors (EMFILE):
    the kernel delivers some and drops the rest (MSG_CTRUNC). The ones that
    came are closed, the error says so, and receiving cannot go on (the
    bytes of that read are gone with them)."""
    import resource

    before = open_fds()
    sent = fresh_sockets(10)

    async def main() -> None:
        a, b = socket.socketpair()
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            await server.receive(timeout=5)
            await server.send(Welcome(pid=1, version="v", count=10), timeout=5)
            assert isinstance(await client.receive(timeout=5), Welcome)
            await server.send(Sockets(entries=tuple(socket_entries(10, 10)),
                                      fds=tuple(s.fileno() for s in sent)), timeout=5)
            # Fill the free numbers below the highest listed (which may be
            # the listing's own descriptor, closed again), so the number the
            # loop stops at is the lowest free one and all above it are free:
            # a limit of that number + 3 leaves exactly 3.
            top = max(open_fds())
            fillers: list[int] = []
            while (fd := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) < top:
                fillers.append(fd)
            os.close(fd)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 3, hard))
            try:
                with pytest.raises(BrokenResourceError, match=r"MSG_CTRUNC.*3 desc"):
                    await client.receive(timeout=5)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                close_fds(fillers)
            with pytest.raises(BrokenResourceError, match="MSG_CTRUNC"):
                await client.receive(timeout=1)
        finally:
            server.close()
            client.close()

    try:
        asyncio.run(main())
    finally:
        for sock in sent:
            sock.close()
    assert open_fds() == before


def test_close_while_a_receive_waits(run: Runner) -> None:
    """close() from elsewhere while a receive waits on the socket: the receive
    raises ClosedResourceError, and the loop no longer watches that
    descriptor number (uvloop aborted the whole process when the waiter
    unregistered it after the close; and the number is free for the next
    socket, which must work)."""
    before = open_fds()

    async def main() -> None:
        a, b = socket.socketpair()
        waiting = Channel(a, Sender.CLIENT)
        task = asyncio.create_task(waiting.receive(timeout=10))
        await asyncio.sleep(0)  # one loop turn: the task runs up to its wait
        assert not task.done()
        waiting.close()
        with pytest.raises(ClosedResourceError):
            await task
        b.close()
        c, d = socket.socketpair()  # likely the numbers just freed
        server, client = Channel(c, Sender.SERVER), Channel(d, Sender.CLIENT)
        try:
            reply = asyncio.create_task(server.receive(timeout=5))
            await client.send(StatusRequest(), timeout=5)
            assert isinstance(await reply, StatusRequest)
        finally:
            server.close()
            client.close()

    run(main())
    assert open_fds() == before


@pytest.mark.parametrize("held", ["read ahead", "a frame begun"])
def test_close_closes_the_descriptors_not_yet_handed_out(run: Runner, held: str) -> None:
    """close() with descriptors received and not yet handed out: read
    ahead behind the frame that a receive returned, or with the first part
    of a frame whose rest never came (the receive timed out, which keeps
    them). They are closed with the channel: a listener's copy left open
    would keep its port accepting into a queue nobody serves."""
    sent = fresh_sockets(3)
    sockets = Sockets(entries=tuple(socket_entries(3, 10)), fds=tuple(s.fileno() for s in sent))

    async def main() -> None:
        a, b = socket.socketpair()
        client = Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            a.sendall(encode(Welcome(pid=1, version="v", count=3)))
            frame = encode(sockets)
            if held == "read ahead":
                send_frame(a, frame, sockets.fds)
                assert isinstance(await client.receive(timeout=5), Welcome)
            else:
                assert isinstance(await client.receive(timeout=5), Welcome)
                send_frame(a, frame[:-1], sockets.fds)
                with pytest.raises(HandoverTimeout):
                    await client.receive(timeout=0.1)
        finally:
            client.close()
            a.close()

    before = open_fds()
    try:
        run(main())
        assert open_fds() == before
    finally:
        for sock in sent:
            sock.close()


def test_peer_closed_peeks_without_consuming() -> None:
    """Channel.peer_closed(): True only once the other end closed and nothing
    is left to read; it consumes nothing (a frame still waiting is read
    whole afterwards)."""
    async def main() -> None:
        a, b = socket.socketpair()
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            assert not server.peer_closed()
            await client.send(Hello(pid=1, version="v"), timeout=5)
            client.close()
            assert not server.peer_closed()  # a frame is still there
            assert isinstance(await server.receive(timeout=5), Hello)
            assert server.peer_closed()
        finally:
            server.close()
        assert not server.peer_closed()  # our own end closed: not the peer
        # A peer that closes with our bytes unread resets the connection
        # (ECONNRESET, said once): closed too.
        c, d = socket.socketpair()
        c.sendall(encode(Welcome(pid=1, version="v", count=1)))
        reset = Channel(c, Sender.SERVER)
        try:
            d.close()
            assert reset.peer_closed()
        finally:
            reset.close()

    asyncio.run(main())


def test_peeks_count_a_frame_read_with_an_earlier_one(run: Runner) -> None:
    """Small frames without descriptors arrive in one read: the channel
    returns the first, and keeps the next one read but not yet received.
    peer_spoke() counts that one as said, and peer_closed() as left to read,
    also after the other end closed (they used to peek only at the socket,
    empty by then)."""
    async def main() -> None:
        a, b = socket.socketpair()
        server, client = Channel(a, Sender.SERVER), Channel(b, Sender.CLIENT)
        try:
            await client.send(Hello(pid=1, version="v"), timeout=5)
            await server.receive(timeout=5)
            await server.send(Welcome(pid=1, version="v", count=1), timeout=5)
            await server.send(Failed(reason="gave up"), timeout=5)
            assert isinstance(await client.receive(timeout=5), Welcome)
            assert client.conn.buffered  # the Failed came in the same read
            assert client.peer_spoke()
            server.close()
            assert not client.peer_closed()
            assert isinstance(await client.receive(timeout=5), Failed)
            assert client.peer_closed()
        finally:
            server.close()
            client.close()

    run(main())
