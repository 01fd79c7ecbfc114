"""The Upgrader in one process, both sides in one event loop (asyncio and
uvloop): quick checks of the control socket's rules with real Unix sockets and
real listeners on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import inspect
import logging
import os
import re
import resource
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import Runner, child_env, port_of, until

import hotswap
from hotswap import listeners
from hotswap.control import control_address, query_status, sockaddr
from hotswap.protocol import Hello, Sender, SocketInfo, Sockets, Welcome, encode
from hotswap.transport import Channel


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    if request.param == "uvloop":
        import uvloop
        return uvloop.run
    return asyncio.run


def state_now(upg: hotswap.Upgrader) -> hotswap.State:
    """``upg.state`` as it is now: mypy keeps what an earlier ``assert
    upg.state is ...`` narrowed it to across the awaits that change it."""
    return upg.state


def new_name() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


def opts(**kw: object) -> hotswap.Options:
    return hotswap.Options(**{"env": {}, "message_timeout": 2.0, **kw})  # type: ignore[arg-type]


async def serving_upgrader(name: str, version: str, **kw: object) -> hotswap.Upgrader:
    upg = hotswap.Upgrader(name, version=version, options=opts(**kw))
    await upg.start()
    upg.listen("http", ("127.0.0.1", 0))
    await upg.ready()
    return upg


async def taken_over(old: hotswap.Upgrader, name: str, adopter: Callable[
        [str, socket.socket], None] | None = None, version: str = "v2",
                     **options: object) -> hotswap.Upgrader:
    """A successor ``version`` (adopting connections with ``adopter``, if
    given; its ``options`` as :func:`opts`'s) takes over from ``old``,
    which releases: the successor serves, ``old`` drains."""
    new = hotswap.Upgrader(name, version=version, options=opts(**options))
    if adopter is not None:
        new.adopt_connections(adopter)
    assert await new.start() is hotswap.Role.TAKEOVER
    new.listen("http", ("127.0.0.1", 0))
    ready = asyncio.create_task(new.ready())
    assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
    await old.release()
    await ready
    return new


async def raw_successor(name: str, version: str,
                        capabilities: tuple[str, ...] = ()) -> Channel:
    """A successor by hand: hello (offering ``capabilities``), the welcome,
    the two sockets (the listener and the control socket; closed here).
    Returns its channel, before Accepting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, sockaddr(control_address(name)))
    channel = Channel(sock, Sender.CLIENT)
    hello = hotswap.protocol.Hello(pid=os.getpid(), version=version, rank=None,
                                   token="", capabilities=capabilities)
    assert isinstance(await channel.request(hello, timeout=5), hotswap.protocol.Welcome)
    chunk = await channel.receive(timeout=5)
    assert isinstance(chunk, hotswap.protocol.Sockets) and chunk.nfds == 2
    for fd in chunk.fds:
        os.close(fd)
    return channel


async def raw_exchange(name: str, data: bytes, fds: list[int] | None = None) -> bytes:
    """Send raw bytes (and descriptors) to the control socket; return whatever
    comes back before the server closes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, sockaddr(control_address(name)))
    if fds:
        import array
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               array.array("i", fds).tobytes())])
    elif data:
        await loop.sock_sendall(sock, data)
    chunks = []
    async with asyncio.timeout(10):
        while chunk := await loop.sock_recv(sock, 65536):
            chunks.append(chunk)
    sock.close()
    return b"".join(chunks)



def assert_accepts(sock: socket.socket, port: int) -> None:
    """A client connecting to ``port`` is accepted on ``sock`` (blocking,
    within 5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        sock.settimeout(5)
        conn, peer = sock.accept()
        assert peer == client.getsockname()
        conn.close()

@pytest.mark.parametrize("refused", [errno.EPERM, errno.ENOSYS])
def test_a_successor_whose_eventfd_is_refused_still_takes_over(
        run: Runner, monkeypatch: pytest.MonkeyPatch, refused: int) -> None:
    """The successor's check, as it confirms, that it has descriptors to
    spare opens two eventfds: one refused for another reason than their
    number (a seccomp profile's EPERM or ENOSYS: mocked, as this machine
    has no such profile) says nothing of them, and the handover goes on. A
    check that took any error for "no room" called every handover off."""
    name = new_name()

    def refuse(*args: object) -> int:
        raise OSError(refused, os.strerror(refused))

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        monkeypatch.setattr(os, "eventfd", refuse)
        new = hotswap.Upgrader(name, version="v2", options=opts())
        assert await new.start() is hotswap.Role.TAKEOVER
        new.listen("http", ("127.0.0.1", 0))
        ready = asyncio.create_task(new.ready())
        exited = asyncio.create_task(old.wait_exit())
        try:
            # A successor that backs out: ready() raises, and v1 serves on.
            await asyncio.wait([ready, exited], timeout=15,
                               return_when=asyncio.FIRST_COMPLETED)
            assert exited.done(), ready.exception() if ready.done() else "neither ended"
            assert exited.result() is hotswap.ExitReason.TAKEN_OVER
            await old.release()
            await ready
            assert new.state is hotswap.State.SERVING
        finally:
            exited.cancel()
            await old.close()
            await new.close()

    run(main())


def test_handover_in_process_and_control_socket_travels(run: Runner) -> None:
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        new = hotswap.Upgrader(name, version="v2", options=opts())
        assert await new.start() is hotswap.Role.TAKEOVER
        sock = new.listen("http", ("127.0.0.1", 0))
        old_address = old.status().listeners[0].address
        assert f"127.0.0.1:{sock.getsockname()[1]}" == old_address
        ready = asyncio.create_task(new.ready())
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        await old.release()
        await ready
        st = await query_status(control_address(name))
        assert (st.pid, st.version, st.state) == (os.getpid(), "v2", "serving")
        assert st.predecessor == "draining" and st.generation == 1
        await old.close(cut=0)
        await new.close()

    run(main())


def test_the_critical_section_logs_nothing_per_socket(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """With INFO logging on, a line per socket inside the critical section
    cost ~10 us each (60% more for 1,000 listeners): the successor says what
    it took over in one line once it is ready."""
    name = new_name()

    async def main() -> None:
        old = hotswap.Upgrader(name, version="v1", options=opts())
        await old.start()
        for i in range(12):
            old.listen(f"l{i}", ("127.0.0.1", 0))
        await old.ready()
        new = hotswap.Upgrader(name, version="v2", options=opts())
        with caplog.at_level(logging.INFO, logger="hotswap"):
            await new.start()
            for i in range(12):
                new.listen(f"l{i}", ("127.0.0.1", 0))
            in_critical_section = [r.getMessage() for r in caplog.records]
            ready = asyncio.create_task(new.ready())
            await old.wait_exit()
            await old.release()
            await ready
        successor = [r.getMessage() for r in caplog.records if "v2 ready" in r.getMessage()]
        assert not [m for m in in_critical_section
                    if "inherited" in m or "received" in m], in_critical_section
        assert len(successor) == 1, caplog.text
        assert (f"took over 13 socket(s) from pid {os.getpid()} (v1); listening on "
                "l0, l1, l2, l3, l4, l5, l6, l7, ... (12 in all)") in successor[0]
        await old.close(cut=0)
        await new.close()

    run(main())


def test_hostile_input_on_the_control_socket(run: Runner) -> None:
    """Garbage, oversized lengths, wrong orders, unexpected (non-socket)
    descriptors: each connection fails alone; no descriptor leaks; service
    continues."""
    name = new_name()

    async def main() -> None:
        upg = await serving_upgrader(name, "v1")
        await asyncio.sleep(0)
        baseline = len(os.listdir("/proc/self/fd"))
        for data, why in [
            (b"GET / HTTP/1.1\r\n\r\n", b"outside 1..16384"),  # a client's frames are small
            (struct.pack("!I", 16 * 1024 + 1), b"frame length 16385 outside"),
            (struct.pack("!I", 2**31), b"frame length 2147483648 outside"),
            (struct.pack("!I", 4) + b"{}}}", b"not UTF-8 JSON"),
            (encode(hotswap.protocol.Accepting()), b"may not send 'accepting'"),
        ]:
            reply = await raw_exchange(name, data)
            assert b'"code":"protocol"' in reply and why in reply, reply
        r, w = os.pipe()
        reply = await raw_exchange(name, encode(hotswap.protocol.StatusRequest()),
                                   fds=[r, w])
        assert b"descriptors from a client" in reply, reply
        os.close(r)
        os.close(w)
        # Still serving, still answering, and nothing left open.
        st = await query_status(control_address(name))
        assert st.state == "serving"
        await until(lambda: len(os.listdir("/proc/self/fd")) == baseline,
                    "descriptor count back to its baseline")
        await upg.close()

    run(main())


def test_garbage_in_the_middle_of_a_handover_changes_nothing(run: Runner) -> None:
    """Invariant 3 against a hostile successor: it takes the sockets, then
    sends a frame nested too deep for the JSON parser (which raised
    RecursionError, left the old side handing over for good: every later
    successor refused as busy, no stop possible). The old side serves on,
    and the next successor takes over."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        channel = await raw_successor(name, "evil")
        assert old.state is hotswap.State.HANDING_OVER
        payload = b"[" * 200_000
        await asyncio.get_running_loop().sock_sendall(
            channel.sock, struct.pack("!I", len(payload)) + payload)
        await until(lambda: old.state is hotswap.State.SERVING, "v1 serving again")
        channel.close()
        new = await taken_over(old, name)
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_token_that_is_no_text_is_refused(run: Runner) -> None:
    """A lone surrogate is valid JSON but no UTF-8: refused like any wrong
    token, not an exception in the handler."""
    name = new_name()

    async def main() -> None:
        upg = await serving_upgrader(name, "v1", token="s3cret")
        payload = (b'{"protocol":1,"pid":1,"version":"v","rank":null,"token":"\\ud800",'
                   b'"capabilities":[],"type":"hello"}')
        reply = await raw_exchange(name, struct.pack("!I", len(payload)) + payload)
        assert b'"code":"forbidden"' in reply, reply
        assert upg.state is hotswap.State.SERVING
        await upg.close()

    run(main())


def test_a_fresh_start_serves_only_once_ready(run: Runner) -> None:
    """Between start() and ready() nothing listens yet: the control socket
    says "starting" (the hook and the probe wait), a successor is refused as
    busy, and no serving marker is bound."""
    name = new_name()
    env = {"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "0"}

    async def main() -> None:
        first = hotswap.Upgrader(name, version="v1",
                                 options=hotswap.Options(env=env, message_timeout=2.0))
        assert await first.start() is hotswap.Role.FRESH
        st = await query_status(control_address(name))
        assert st.state == "starting" and st.listeners == ()
        assert ranks(name) == set()
        eager = hotswap.Upgrader(name, version="v2", options=opts(connect_timeout=0.3))
        with pytest.raises(hotswap.HandoverRefused) as refused:
            await eager.start()
        assert refused.value.code == "busy"
        await eager.close()
        first.listen("http", ("127.0.0.1", 0))
        await first.ready()
        st = await query_status(control_address(name))
        assert st.state == "serving" and len(st.listeners) == 1
        assert ranks(name) == {1}
        await first.close()

    run(main())


def test_wrong_token_and_second_successor_are_refused(run: Runner) -> None:
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1", token="s3cret")
        thief = hotswap.Upgrader(name, version="v2", options=opts(token="guess"))
        with pytest.raises(hotswap.HandoverRefused) as refused:
            await thief.start()
        assert refused.value.code == "forbidden"
        await thief.close()
        first = hotswap.Upgrader(name, version="v2", options=opts(token="s3cret"))
        await first.start()  # handover in progress now (not yet confirmed)
        second = hotswap.Upgrader(name, version="v3",
                                  options=opts(token="s3cret", connect_timeout=0.3))
        with pytest.raises(hotswap.HandoverRefused) as busy:
            await second.start()
        assert busy.value.code == "busy"
        await second.close()
        # The first successor gives up: the old one serves on, as if nothing happened.
        await first.close()
        await until(lambda: old.state is hotswap.State.SERVING, "v1 serving again")
        st = await query_status(control_address(name))
        assert st.version == "v1" and st.state == "serving"
        await old.close()

    run(main())


def test_a_successor_refused_while_a_stop_is_pending_is_told_so(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A serving process asked to stop refuses successors as busy (they
    retry until it has let go of the control socket). The reason said
    "state is serving", which reads as no reason at all, on both sides'
    logs and in the successor's HandoverRefused; it names the stop."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        old.request_stop()
        new = hotswap.Upgrader(name, version="v2", options=opts(connect_timeout=0))
        with pytest.raises(hotswap.HandoverRefused) as busy:
            await new.start()
        assert busy.value.code == "busy"
        assert "stop" in busy.value.reason and "state is serving" not in busy.value.reason
        assert "state is serving" not in caplog.text
        await new.close()
        await old.close()

    run(main())


@pytest.mark.parametrize("outcome", ["aborted", "confirmed", "confirmed-as-it-releases"])
def test_a_release_during_a_handover_keeps_its_word(run: Runner, outcome: str) -> None:
    """A stop comes while a successor holds the sockets and has not
    answered yet, and the app's shutdown path releases (its servers
    closed) without waiting for wait_exit(): release() did its work at
    once, with no successor to tell. The handover's outcome then undid it:
    aborted, the old side went back to ``serving`` and bound its serving
    marker again (the probe's fast path saw it serving, with its listeners
    and control socket closed); confirmed, the successor never heard
    Released (it took its predecessor for gone after message_timeout, and
    adopted none of its connections). The released side stays released,
    and tells a successor that confirms, once: also when the confirmation
    is read while release() runs (a second Released broke the channel)."""
    name = new_name()
    env = {"SIDECARSET_VERSION": "5", "SIDECARSET_VERSION_ALT": "0"}

    async def main() -> None:
        old = await serving_upgrader(name, "v1", env=env)
        assert ranks(name) == {5}
        channel = await raw_successor(name, "v2")
        assert old.state is hotswap.State.HANDING_OVER
        old.request_stop()
        if outcome == "confirmed-as-it-releases":
            await channel.send(hotswap.protocol.Accepting(), timeout=5)
        await old.release()
        assert state_now(old) is hotswap.State.DRAINING and ranks(name) == set()
        if outcome == "aborted":
            await channel.send(hotswap.protocol.Abort(reason="not today"), timeout=5)
            assert await old.wait_exit() is hotswap.ExitReason.STOP_REQUESTED
            await until(lambda: old._handlers == set(), "the handover's end")
        else:
            if outcome == "confirmed":
                await channel.send(hotswap.protocol.Accepting(), timeout=5)
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            assert isinstance(await channel.receive(timeout=5), hotswap.protocol.Released)
        assert state_now(old) is hotswap.State.DRAINING and ranks(name) == set()
        await old.close(cut=0)
        if outcome != "aborted":  # the channel held: the drain's end comes through
            assert isinstance(await channel.receive(timeout=5), hotswap.protocol.Drained)
        channel.close()

    run(main())


def test_filesystem_control_socket(run: Runner, tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1", control_path=path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        new = hotswap.Upgrader(name, version="v2", options=opts(control_path=path))
        await new.start()
        new.listen("http", ("127.0.0.1", 0))
        ready = asyncio.create_task(new.ready())
        await old.wait_exit()
        await old.release()
        await old.close()
        await ready
        # The old side must not have unlinked the live path.
        st = await query_status(path)
        assert st.version == "v2"
        await new.close()
        # Left over once nobody serves: a fresh start binds it again.
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        fresh = await serving_upgrader(name, "v3", control_path=path)
        assert (await query_status(path)).version == "v3"
        await fresh.close()

    run(main())
    # A control path that is no socket is never removed (it was: a connect
    # to a plain file is refused, which read as "stale").
    plain = tmp_path / "not-a-socket"
    plain.write_text("data")

    async def refused() -> None:
        upg = hotswap.Upgrader(new_name(), options=opts(control_path=str(plain)))
        with pytest.raises(hotswap.ListenerError):
            await upg.start()
        await upg.close()

    run(refused())
    assert plain.read_text() == "data"


def markers(name: str) -> set[tuple[int, int]]:
    """The serving markers of ``name`` that the kernel lists (what probe.sh
    reads), as (rank, stamp) pairs."""
    prefix = f"@hotswap/{name}/serving/"
    with open("/proc/net/unix") as fh:
        paths = [fields[-1] for fields in map(str.split, fh)
                 if len(fields) >= 8 and fields[-1].startswith(prefix)]
    return {(int(rank), int(stamp))
            for rank, stamp in (p[len(prefix):].split("/") for p in paths)}


def ranks(name: str) -> set[int]:
    return {rank for rank, _ in markers(name)}


def test_serving_marker_follows_the_state(run: Runner, tmp_path: Path) -> None:
    """probe.sh's marker: bound exactly while a process with a Kruise version
    accepts (serving, or handing over until the successor confirms; a
    successor from its confirmation on), closed
    as it stops accepting and on close(); never without a version, nor with
    a filesystem control socket."""
    name = new_name()

    def kruise(version: int, alt: int, **kw: object) -> hotswap.Options:
        env = {"SIDECARSET_VERSION": str(version), "SIDECARSET_VERSION_ALT": str(alt)}
        return hotswap.Options(env=env, message_timeout=2.0, **kw)  # type: ignore[arg-type]

    async def main() -> None:
        old = hotswap.Upgrader(name, version="v1", options=kruise(1, 0))
        await old.start()
        old.listen("http", ("127.0.0.1", 0))
        await old.ready()
        (first,) = markers(name)
        assert first[0] == 1 and abs(first[1] - time.time()) <= 2
        # The loop renews it under the current time, one name at a time.
        await until(lambda: len(markers(name)) == 1 and markers(name) != {first},
                    "the marker renewed")
        assert ranks(name) == {1}
        new = hotswap.Upgrader(name, version="v2", options=kruise(2, 1))
        assert await new.start() is hotswap.Role.TAKEOVER
        assert old.state is hotswap.State.HANDING_OVER
        assert ranks(name) == {1}, "v1 accepts until v2 confirms"
        new.listen("http", ("127.0.0.1", 0))
        ready = asyncio.create_task(new.ready())
        await old.wait_exit()
        assert ranks(name) == {2}, "the old side stopped; the new one marks itself " \
            "as it confirms, before the release (the PostStart hook reads it)"
        await old.release()
        await ready
        assert ranks(name) == {2}
        await old.close()
        await new.close()
        assert ranks(name) == set()

        for other in (hotswap.Upgrader(new_name(), version="v1", options=opts()),
                      hotswap.Upgrader(new_name(), version="v1", options=kruise(
                          1, 0, control_path=str(tmp_path / "control.sock")))):
            await other.start()
            other.listen("http", ("127.0.0.1", 0))
            await other.ready()
            assert other.state is hotswap.State.SERVING
            assert ranks(other.name) == set()
            await other.close()

    run(main())


@pytest.mark.parametrize("rank", ["2", "3"])  # older, and the same version again
def test_older_rank_is_refused_in_process(run: Runner, rank: str) -> None:
    name = new_name()

    async def main() -> None:
        env3 = {"SIDECARSET_VERSION": "3", "SIDECARSET_VERSION_ALT": "0"}
        old = hotswap.Upgrader(name, version="v3", options=hotswap.Options(env=env3))
        await old.start()
        old.listen("http", ("127.0.0.1", 0))
        await old.ready()
        env2 = {"SIDECARSET_VERSION": rank, "SIDECARSET_VERSION_ALT": "1"}
        young = hotswap.Upgrader(name, version="v2", options=hotswap.Options(env=env2))
        with pytest.raises(hotswap.HandoverRefused) as refused:
            await young.start()
        assert refused.value.code == "older"
        assert old.state is hotswap.State.SERVING
        await young.close()
        await old.close()

    run(main())


def test_a_passive_slot_stands_in_only_while_nobody_serves(run: Runner) -> None:
    """Invariant 4 and 1: an old slot restarted mid-upgrade (``VERSION <=
    ALT``) never takes sockets back from a newer version; it stays passive
    while one serves (or is starting: it holds the control socket). With
    nobody serving (the newer one crashed before confirming, or has not
    started), it binds as a fresh start would, rather than leave the pod
    with no acceptor, and the newer version takes over from it as usual.
    (It stayed passive, and nothing served until the newer one started.)"""
    name = new_name()
    passive_env = {"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "3"}

    async def main() -> None:
        alone = hotswap.Upgrader(name, version="v1", options=opts(env=passive_env))
        assert await alone.start() is hotswap.Role.FRESH
        sock = alone.listen("http", ("127.0.0.1", 0))
        await alone.ready()
        assert alone.state is hotswap.State.SERVING
        port = sock.getsockname()[1]
        # The newer version takes over from the stand-in.
        newer = hotswap.Upgrader(name, version="v3", options=opts(
            env={"SIDECARSET_VERSION": "3", "SIDECARSET_VERSION_ALT": "1"}))
        assert await newer.start() is hotswap.Role.TAKEOVER
        assert newer.listen("http", ("127.0.0.1", 0)).getsockname()[1] == port
        await newer.ready()
        assert await asyncio.wait_for(alone.wait_exit(), 5) is hotswap.ExitReason.TAKEN_OVER
        await alone.release()
        await alone.close()
        # The old slot restarted again, beside the newer one: passive.
        again = hotswap.Upgrader(name, version="v1", options=opts(env=passive_env))
        assert await again.start() is hotswap.Role.PASSIVE
        assert again.state is hotswap.State.PASSIVE
        st = await query_status(control_address(name))
        assert (st.version, st.state) == ("v3", "serving")
        await again.close()
        await newer.close()

    run(main())


def test_two_stand_ins_on_a_stale_control_path_bind_one(
        run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two passive slots that find nobody serving a filesystem control
    socket at once (``VERSION == ALT``, or both slots at a pod's restart)
    must not both stand in: the path's leftover file is removed before the
    bind, and one that removes it after the other has bound there removed
    the other's file, leaving two processes that each hold a control
    socket, the first unreachable (next to start, a newer version finds
    the second only, whose ports the first may hold). Here the second does
    all of its stand-in while the first is between finding the path stale
    and removing it. (Both stood in: about 3 in 100 real pairs did.)"""
    path = str(tmp_path / "control")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)  # a process that stopped left it
    leftover.close()
    env = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "2"}
    real = listeners._stale_unix_socket

    async def main() -> None:
        first, second = (hotswap.Upgrader(new_name(), version="v2",
                                          options=opts(env=env, control_path=path))
                         for _ in range(2))
        second_stood_in: list[bool] = []

        def found_stale(where: str, sock_type: int = socket.SOCK_STREAM) -> bool:
            stale = real(where, sock_type)
            if not second_stood_in:  # the first's look; then the second's turn
                second_stood_in.append(False)
                second_stood_in[0] = second._stand_in()
            return stale

        monkeypatch.setattr(listeners, "_stale_unix_socket", found_stale)
        role = await first.start()
        assert second_stood_in
        assert [role is hotswap.Role.FRESH, second_stood_in[0]].count(True) == 1
        serving = first if role is hotswap.Role.FRESH else second
        assert (await query_status(path)).name == serving.name  # reachable
        await first.close()
        await second.close()

    run(main())


@pytest.mark.parametrize("env", [{"SIDECARSET_VERSION": "1"},
                                 {"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "2"}],
                         ids=["fresh", "passive-standing-in"])
def test_a_control_path_binds_while_another_in_its_folder_is_being_bound(
        run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        env: dict[str, str]) -> None:
    """The folder's flock guards a path's stale check and bind, but other
    sidecars' control sockets may share that folder: one binding its own
    holds the lock for those few system calls. A start that finds it taken
    waits for it (bounded) rather than take it for its own path being
    bound: a fresh start used to fail (exit 1), a passive slot that found
    nobody serving stayed passive, leaving its pod without an acceptor
    (2 and 4 in 100 real pairs started at once did). Here the lock is
    held as the start first tries it, and let go as it waits."""
    path = str(tmp_path / "mine.sock")
    other = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(other, fcntl.LOCK_EX)  # another sidecar binds its socket there
    real_sleep = time.sleep
    waited: list[float] = []

    def other_done(seconds: float) -> None:
        if not waited:
            fcntl.flock(other, fcntl.LOCK_UN)
        waited.append(seconds)
        real_sleep(seconds)

    async def main() -> None:
        monkeypatch.setattr(time, "sleep", other_done)
        upg = hotswap.Upgrader(new_name(), version="v1",
                               options=opts(env=env, control_path=path))
        try:
            assert await upg.start() is hotswap.Role.FRESH
            upg.listen("http", ("127.0.0.1", 0))
            await upg.ready()
            monkeypatch.undo()
            assert (await query_status(path)).pid == os.getpid()
            assert waited
        finally:
            await upg.close()

    try:
        run(main())
    finally:
        os.close(other)


def test_a_fresh_start_that_loses_the_control_socket_takes_over(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A successor that finds nobody serving binds the control socket; when
    another process binds it in between (a passive slot standing in, say),
    it takes over from that one instead of failing: bound but not yet
    listening, a control socket refuses connections (nobody there) and
    cannot be bound (in use). Held like that past ``connect_timeout``, the
    bind's error is raised. (The successor failed at once: "another
    process already serves".)"""
    caplog.set_level(logging.INFO, logger="hotswap")
    name = new_name()
    kruise = {"SIDECARSET_VERSION": "2", "SIDECARSET_VERSION_ALT": "1"}

    async def main() -> None:
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.bind(sockaddr(control_address(name)))  # bound, not listening
        try:
            new = hotswap.Upgrader(name, version="v2", options=opts(env=kruise))
            starting = asyncio.create_task(new.start())
            await until(lambda: caplog.text.count("another process bound") >= 2,
                        "the successor trying again")
            assert not starting.done()
            # The other process: the holder's place taken at once (no
            # await in between), as a fresh start binds in start()'s first step.
            holder.close()
            old = hotswap.Upgrader(name, version="v1", options=opts(
                env={"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "0"}))
            assert await old.start() is hotswap.Role.FRESH
        finally:
            holder.close()
        old.listen("http", ("127.0.0.1", 0))
        await old.ready()
        assert await asyncio.wait_for(starting, 10) is hotswap.Role.TAKEOVER
        new.listen("http", ("127.0.0.1", 0))
        await new.ready()
        assert await asyncio.wait_for(old.wait_exit(), 5) is hotswap.ExitReason.TAKEN_OVER
        await old.release()
        await old.close()
        await new.close()
        # Held throughout: bounded by connect_timeout, then the bind's error;
        # a stop meanwhile ends it as a stop (serve() tells them apart).
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.bind(sockaddr(control_address(name)))
        try:
            late = hotswap.Upgrader(name, version="v2", options=opts(
                env=kruise, connect_timeout=0.3))
            with pytest.raises(hotswap.ListenerError, match="already serves"):
                await asyncio.wait_for(late.start(), 10)
            await late.close()
            stopped = hotswap.Upgrader(name, version="v2", options=opts(env=kruise))
            caplog.clear()
            starting = asyncio.create_task(stopped.start())
            await until(lambda: "another process bound" in caplog.text, "it trying again")
            stopped.request_stop()
            with pytest.raises(hotswap.HandoverFailed, match="stop requested"):
                await asyncio.wait_for(starting, 10)
            assert stopped.stop_requested
            await stopped.close()
        finally:
            holder.close()

    run(main())


def test_hello_with_unknown_protocol_version(run: Runner) -> None:
    name = new_name()

    async def main() -> None:
        upg = await serving_upgrader(name, "v1")
        reply = await raw_exchange(name, encode(Hello(protocol=99, pid=1, version="x")))
        assert b'"code":"protocol"' in reply
        await upg.close()

    run(main())


@pytest.mark.parametrize("when", ["before-ready", "as-the-confirmation-begins"])
def test_stop_before_confirming_aborts_and_the_old_side_keeps_serving(
        run: Runner, when: str) -> None:
    """Invariant 3: SIGTERM on a successor that has the sockets but has not
    confirmed gives them back (Abort) instead of taking over and stopping;
    also one that lands after ready() was called, in the iteration before
    the confirmation's first step (emulated: the stop is asked for there).
    ready() alone used to check: that one confirmed, then stopped, and
    nobody accepted."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        new = hotswap.Upgrader(name, version="v2", options=opts())
        await new.start()
        new.listen("http", ("127.0.0.1", 0))
        if when == "before-ready":
            new.request_stop()
        else:
            confirm = new._confirm

            async def stopped_first() -> None:
                new.request_stop()
                await confirm()

            new._confirm = stopped_first  # type: ignore[method-assign]
        with pytest.raises(hotswap.HandoverFailed, match="aborted"):
            await new.ready()
        assert await new.wait_exit() is hotswap.ExitReason.STOP_REQUESTED
        await new.close()
        await until(lambda: old.state is hotswap.State.SERVING, "v1 serving again")
        st = await query_status(control_address(name))
        assert (st.version, st.state) == ("v1", "serving")
        await old.close()

    run(main())


def test_slow_loris_partial_frames(run: Runner) -> None:
    """Invariants 6, 7: peers that send part of a frame and stall are each
    dropped after message_timeout with a reason, or, beyond the 16 handled
    at once, let go of when a newcomer needs the slot (here: the four oldest
    and then one more for the status query); meanwhile the control socket
    answers others; no descriptor is left."""
    name = new_name()

    async def main() -> None:
        upg = hotswap.Upgrader(name, version="v1", options=hotswap.Options(
            env={}, message_timeout=0.5))
        await upg.start()
        upg.listen("http", ("127.0.0.1", 0))
        await upg.ready()
        baseline = len(os.listdir("/proc/self/fd"))
        loop = asyncio.get_running_loop()
        lorises = []
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr(control_address(name)))
            await loop.sock_sendall(sock, encode(hotswap.protocol.StatusRequest())[:3])
            lorises.append(sock)
        st = await query_status(control_address(name))  # answered meanwhile
        assert st.state == "serving"
        timed_out = let_go = 0
        for sock in lorises:
            reply = b""
            try:
                async with asyncio.timeout(5):
                    while chunk := await loop.sock_recv(sock, 4096):
                        reply += chunk
            except ConnectionResetError:  # closed with our bytes unread
                pass
            if b'"code":"timeout"' in reply:
                timed_out += 1
            else:
                assert reply == b"", reply
                let_go += 1
            sock.close()
        # 20 lorises and a query in 16 slots; fewer let go if one timed out
        # before the last was accepted (a slow machine).
        assert let_go <= 5 and timed_out + let_go == 20, (timed_out, let_go)
        await until(lambda: len(os.listdir("/proc/self/fd")) == baseline,
                    "descriptor count back to its baseline")
        await upg.close()

    run(main())


def test_status_with_more_listeners_than_one_reply_lists(run: Runner) -> None:
    """A status is one frame: with 300 listeners of 200-character names
    (over 256 KiB listed in full) it lists the first 100 and says how many
    there are, fewer if their JSON would not fit; the CLI's status and
    wait-ready still answer."""
    name = new_name()

    async def main() -> None:
        upg = hotswap.Upgrader(name, version="v1", options=opts())
        await upg.start()
        names = [f"{i:03d}" + "x" * 197 for i in range(300)]
        for listener in names:
            upg.listen(listener, ("127.0.0.1", 0))
        await upg.ready()
        st = await query_status(control_address(name))
        assert st.listener_count == 300
        assert [info.name for info in st.listeners] == names[:100]

        for args in (["status", "--name", name],
                     ["wait-ready", "--name", name, "--version", "v1", "--timeout", "10"]):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotswap", *args, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=child_env())
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, (args, out, err)
            assert b"... (300 in all)" in out, out
        await upg.close()
        # Characters JSON escapes to 12 bytes each: fewer fit in one reply.
        wide = hotswap.Upgrader(new_name(), version="v1", options=opts())
        await wide.start()
        for i in range(100):
            wide.listen(f"{i:03d}" + "\U0001f600" * 197, ("127.0.0.1", 0))
        await wide.ready()
        st = await query_status(control_address(wide.name))
        assert st.listener_count == 100 and 0 < len(st.listeners) < 100
        await wide.close()

    run(main())


@pytest.mark.parametrize("case", ["plain", "mixed", "stopping"])
def test_a_frame_acknowledged_too_late_is_still_adopted(run: Runner, case: str) -> None:
    """The successor is slow to read a frame of connections: the old side's
    wait for the acknowledgement ends, it lets go of them and closes the
    channel. The successor, finding the frame complete but nobody to tell,
    adopts them anyway: the connection is served by exactly one process,
    not by none. So also when it would have refused the frame, had it been
    in time: one with a connection it cannot serve ("mixed": it adopts the
    TCP one), or because it is stopping meanwhile."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1", message_timeout=0.3)
        listener = old.status().listeners[0].address
        client = socket.create_connection(("127.0.0.1", int(listener.rsplit(":", 1)[1])))
        server_side, _ = old._listeners["http"].sock.accept()
        conns = [("http", server_side.fileno(), "peer")]
        pair = socket.socketpair() if case == "mixed" else ()
        if pair:
            conns.append(("http", pair[0].fileno(), "unix"))
        adopted: list[socket.socket] = []
        new = hotswap.Upgrader(name, version="v2", options=opts(message_timeout=0.3))
        new.adopt_connections(lambda listener, sock: adopted.append(sock))
        assert await new.start() is hotswap.Role.TAKEOVER
        new.listen("http", ("127.0.0.1", 0))
        channel = new._predecessor_channel
        assert channel is not None
        original, slow = channel.receive, [False]

        async def late(*, timeout: float) -> hotswap.protocol.Message:
            if slow[0]:
                slow[0] = False
                # Past the old side's 0.3 s and its last word: it let go (not
                # a time: a test stalled before the handover began would
                # have the successor read the frame in time, and refuse it).
                await until(lambda: old._successor is None, "the old side to let go", 10)
            return await original(timeout=timeout)

        channel.receive = late  # type: ignore[method-assign]
        ready = asyncio.create_task(new.ready())
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        slow[0] = True  # the successor's first read after Released
        await old.release()
        await ready
        if case == "stopping":
            new.request_stop()
        assert await old.hand_over_connections(conns) == len(conns)  # let go: counted as sent
        for sock in (server_side, *pair[:1]):
            sock.close()
        await until(lambda: len(adopted) == 1, "the successor to adopt it anyway")
        adopted[0].sendall(b"still here")
        client.settimeout(5)
        assert client.recv(100) == b"still here"
        for sock in (*adopted, client, *pair[1:]):
            sock.close()
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_connection_whose_adopter_raises_is_closed_by_the_successor(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """The application's adopter raises for a handed-over connection: the
    predecessor has let go of it (it was acknowledged before the adopter
    ran), so the successor owns it again and closes it at once, logging
    why: its client sees the end, not a connection nobody will ever
    answer. (The collector is held off meanwhile: it would close a socket
    left to it, later, with a ResourceWarning.)"""
    name = new_name()

    def refuse(listener: str, sock: socket.socket) -> None:
        raise RuntimeError("the app cannot take it")

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        client = socket.create_connection(("127.0.0.1", port_of(old.status())))
        server_side, _ = old._listeners["http"].sock.accept()
        inode = _socket_inode(server_side)
        new = await taken_over(old, name, refuse)
        assert await old.hand_over_connections([("http", server_side.fileno(), "peer")]) == 1
        server_side.close()  # as the drain does once it is sent
        await until(lambda: "the app cannot take it" in caplog.text, "the adopter's failure")
        assert inode not in _open_links(), "the successor kept the connection"
        client.settimeout(5)
        assert await asyncio.to_thread(client.recv, 100) == b""
        client.close()
        await old.close(cut=0)
        await new.close()

    gc.disable()
    try:
        with caplog.at_level(logging.WARNING, logger="hotswap"):
            run(main())
    finally:
        gc.enable()
    assert "adopting connection from peer failed: the app cannot take it" in caplog.text


def test_no_connection_is_handed_over_before_release(run: Runner) -> None:
    """Taken over, the old side is ``draining`` from the commit on, and
    ``can_hand_over_connections`` said True before ``release()``; a frame
    of connections sent then broke the protocol (Connections before
    Released): the channel was closed, the successor never heard Released,
    took its predecessor for gone (a third version would have been
    admitted while this one still drained) and no connection could move
    any more. Before the release the answer is False and nothing is sent;
    after it, the connection moves."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        client = socket.create_connection(("127.0.0.1", port_of(old.status())))
        server_side, _ = old._listeners["http"].sock.accept()
        adopted: list[socket.socket] = []
        new = hotswap.Upgrader(name, version="v2", options=opts())
        new.adopt_connections(lambda listener, sock: adopted.append(sock))
        assert await new.start() is hotswap.Role.TAKEOVER
        new.listen("http", ("127.0.0.1", 0))
        ready = asyncio.create_task(new.ready())
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        assert not old.can_hand_over_connections
        assert await old.hand_over_connections([("http", server_side.fileno(), "peer")]) == 0
        await old.release()
        await ready
        assert new.status().predecessor == "draining"
        assert old.can_hand_over_connections
        assert await old.hand_over_connections([("http", server_side.fileno(), "peer")]) == 1
        server_side.close()
        await until(lambda: len(adopted) == 1, "the connection adopted")
        assert new.status().predecessor == "draining"
        for sock in (client, *adopted):
            sock.close()
        await old.close(cut=0)
        await new.close()

    run(main())


@pytest.mark.parametrize("how", ["stop-requested", "released"])
def test_a_stopping_successor_leaves_the_connections_with_the_old_side(
        run: Runner, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """The successor is told to stop (the pod goes, its container restarts)
    while the old side still drains: it does not acknowledge a frame of
    connections it would only close under their clients. The old side keeps
    them (0 sent) and serves them on, its log saying why the successor
    refused; the successor's adopter is never called, and it keeps no copy
    of them (closed by the old side, a connection ends for its client)."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        listener = old.status().listeners[0].address
        client = socket.create_connection(("127.0.0.1", int(listener.rsplit(":", 1)[1])))
        server_side, _ = old._listeners["http"].sock.accept()
        adopted: list[socket.socket] = []
        new = await taken_over(old, name, lambda listener, sock: adopted.append(sock))
        if how == "released":  # as a step-down does, with no stop asked for
            await new.release()
        else:
            new.request_stop()
        assert old.can_hand_over_connections
        with caplog.at_level("WARNING", logger="hotswap"):
            assert await old.hand_over_connections(
                [("http", server_side.fileno(), "peer")]) == 0
        assert (f"{name}: the successor refused 1 connection(s): stopping: not adopting "
                "its connections; they drain here") in caplog.text
        assert not old.can_hand_over_connections
        assert adopted == []
        server_side.sendall(b"the old side")
        client.settimeout(5)
        assert client.recv(100) == b"the old side"
        # The old side's close ends it: the successor kept no copy of it.
        server_side.close()
        assert client.recv(100) == b""
        client.close()
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_connection_its_client_reset_on_the_way_is_no_warning(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A client that resets its idle connection while it is handed over
    loses nothing: the successor, finding it ended, adopts nothing of it
    and says so at INFO, not as a WARNING (a pod's alert on a client's own
    doing); the frame is still acknowledged."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        client = socket.create_connection(("127.0.0.1", port_of(old.status())))
        server_side, _ = old._listeners["http"].sock.accept()
        adopted: list[socket.socket] = []
        new = await taken_over(old, name, lambda listener, sock: adopted.append(sock))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        with caplog.at_level("INFO", logger="hotswap"):
            assert await old.hand_over_connections(
                [("http", server_side.fileno(), "peer")]) == 1
            await until(lambda: "not adopting connection from peer" in caplog.text,
                        "the successor to find the connection ended")
        assert adopted == []
        ended = [r for r in caplog.records if "not adopting connection" in r.getMessage()]
        assert [r.levelname for r in ended] == ["INFO"], caplog.text
        assert "its client reset it before it was adopted" in ended[0].getMessage()
        server_side.close()
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_frame_with_a_connection_the_successor_cannot_serve_stays(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """The successor takes TCP connections only, and a frame only whole: one
    with a Unix-socket connection in it is refused before it is
    acknowledged, so every connection of it stays with the old side (none
    adopted, none closed under its client, and the successor keeps no copy:
    once the old side closes one, its client sees the end). The old side's
    log says why."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        port = port_of(old.status())
        client = socket.create_connection(("127.0.0.1", port))
        tcp, _ = old._listeners["http"].sock.accept()
        unix, unix_peer = socket.socketpair()
        adopted: list[socket.socket] = []
        new = await taken_over(old, name, lambda listener, sock: adopted.append(sock))
        with caplog.at_level("WARNING", logger="hotswap"):
            assert await old.hand_over_connections(
                [("http", tcp.fileno(), "tcp"), ("http", unix.fileno(), "unix")]) == 0
        assert ("the successor refused 2 connection(s): refusing a frame of connections "
                "that are not all TCP streams") in caplog.text
        assert adopted == []
        for ours, theirs in ((tcp, client), (unix, unix_peer)):
            ours.sendall(b"still the old side")
            theirs.settimeout(5)
            assert theirs.recv(100) == b"still the old side"
            # The old side's close ends it: the successor kept no copy of it.
            ours.close()
            assert theirs.recv(100) == b""
            theirs.close()
        await old.close(cut=0)
        await new.close()

    run(main())


@pytest.mark.parametrize("offered", [("connections", "connections-ack"),
                                     ("connections", "connections-ack",
                                      "connections-refusal", "something-else")])
def test_the_welcome_grants_only_what_the_hello_offered(
        run: Runner, offered: tuple[str, ...]) -> None:
    """The old side's welcome lists the capabilities it has of those the
    successor's hello offered, and no others: an older successor, which
    offers no "connections-refusal", is never sent what it cannot read, and
    an unknown capability is left out."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, sockaddr(control_address(name)))
        channel = Channel(sock, Sender.CLIENT)
        try:
            welcome = await channel.request(
                Hello(pid=os.getpid(), version="v2", capabilities=offered), timeout=5)
            assert isinstance(welcome, Welcome)
            assert welcome.capabilities == tuple(
                c for c in offered if c in ("connections-ack", "connections-refusal"))
            chunk = await channel.receive(timeout=5)
            assert isinstance(chunk, Sockets)
            hotswap.transport.close_fds(chunk.fds)
        finally:
            channel.close()
        await old.close(cut=0)

    run(main())


def test_an_older_predecessor_is_refused_a_frame_by_the_end_alone(run: Runner) -> None:
    """A predecessor that acknowledges frames but offered no
    "connections-refusal" (an older hotswap; here one by hand) would read a
    reason after its frame as no answer, and let go of connections the
    successor has closed. A stopping successor refuses it the old way: the
    channel ends, with no message before it."""
    name = new_name()

    async def main() -> None:
        with contextlib.ExitStack() as owned:
            control = owned.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            control.bind(sockaddr(control_address(name)))
            control.listen()
            control.setblocking(False)
            listener = owned.enter_context(socket.create_server(("127.0.0.1", 0)))
            client = owned.enter_context(
                socket.create_connection(listener.getsockname(), timeout=5))
            conn = owned.enter_context(listener.accept()[0])
            new = hotswap.Upgrader(name, version="v2", options=opts())
            adopted: list[socket.socket] = []
            new.adopt_connections(lambda name, sock: adopted.append(sock))
            starting = asyncio.create_task(new.start())
            try:
                await by_hand(new, starting, control, listener, conn, adopted)
            finally:
                await new.close()
                with contextlib.suppress(hotswap.HotswapError):
                    await starting
            conn.sendall(b"the old side")
            assert client.recv(100) == b"the old side"

    async def by_hand(new: hotswap.Upgrader, starting: asyncio.Task[hotswap.Role],
                      control: socket.socket, listener: socket.socket,
                      conn: socket.socket, adopted: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        theirs, _ = await asyncio.wait_for(loop.sock_accept(control), 10)
        channel = Channel(theirs, Sender.SERVER)
        try:
            hello = await channel.receive(timeout=5)
            assert isinstance(hello, Hello) and "connections-refusal" in hello.capabilities
            await channel.send(Welcome(pid=os.getpid(), version="v1", count=2,
                                       capabilities=("connections-ack",)), timeout=5)
            await channel.send(Sockets(
                entries=(listeners.describe("http", listener),
                         SocketInfo(name="hotswap.control", family="unix", kind="stream",
                                    address=control_address(name))),
                fds=(listener.fileno(), control.fileno())), timeout=5)
            assert await asyncio.wait_for(starting, 10) is hotswap.Role.TAKEOVER
            new.listen("http", listener.getsockname())
            ready = asyncio.create_task(new.ready())
            assert isinstance(await channel.receive(timeout=5), hotswap.protocol.Accepting)
            await channel.send(hotswap.protocol.Released(pid=os.getpid()), timeout=5)
            await asyncio.wait_for(ready, 10)
            new.request_stop()
            await channel.send(hotswap.protocol.Connections(
                entries=(hotswap.protocol.ConnInfo(listener="http", peer="peer"),),
                fds=(conn.fileno(),)), timeout=5)
            with pytest.raises(hotswap.BrokenResourceError) as ended:
                await channel.receive(timeout=5)
            assert ended.value.eof, ended.value
            assert adopted == []
        finally:
            channel.close()

    run(main())


async def a_frame_on_its_way(name: str, *, reasons: bool = False) -> tuple[
        hotswap.Upgrader, socket.socket, socket.socket, Channel, asyncio.Task[int],
        hotswap.protocol.Connections]:
    """A serving v1 (message_timeout 0.3 s) taken over by a successor by
    hand that acknowledges frames, one client connection to it, and that
    connection on its way: v1's hand_over_connections() task, waiting for
    the answer to the frame the successor has just read. Returns (v1, the
    client's socket, v1's side of it, the successor's channel, the task,
    the frame); the caller owns them all. With ``reasons``, the successor
    offers "connections-refusal" too (a refusal may say why)."""
    old = await serving_upgrader(name, "v1", message_timeout=0.3)
    client = socket.create_connection(("127.0.0.1", port_of(old.status())))
    server_side, _ = old._listeners["http"].sock.accept()
    channel = await raw_successor(name, "v2", ("connections", "connections-ack")
                                  + (("connections-refusal",) if reasons else ()))
    await channel.send(hotswap.protocol.Accepting(), timeout=5)
    assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
    await old.release()
    assert isinstance(await channel.receive(timeout=5), hotswap.protocol.Released)
    handing = asyncio.create_task(
        old.hand_over_connections([("http", server_side.fileno(), "peer")]))
    frame = await channel.receive(timeout=5)
    assert isinstance(frame, hotswap.protocol.Connections) and len(frame.fds) == 1
    return old, client, server_side, channel, handing, frame


@pytest.mark.parametrize("answer", ["refused", "refused-saying-why", "adopted"])
def test_an_answer_that_came_while_the_old_side_stalled_counts(
        run: Runner, answer: str, caplog: pytest.LogCaptureFixture) -> None:
    """The old side is stalled (here: its event loop blocked) past its wait
    for the acknowledgement of a frame of connections while the successor's
    answer arrives. It wakes to its timer before its socket; letting go
    then, after a refusal (the channel closed unacknowledged: a successor
    that is stopping, say), would leave the connection with nobody: the
    successor closed its copies, and the old side closes its own. What
    already arrived counts: a refusal keeps the connections (0 sent, served
    on), an acknowledgement lets go of them, and the channel stays open for
    the next frame (not ended as after an acknowledgement that came late)."""
    name = new_name()

    async def main() -> None:
        old, client, server_side, channel, handing, frame = await a_frame_on_its_way(
            name, reasons=answer == "refused-saying-why")
        if answer.startswith("refused"):
            os.close(frame.fds[0])
            if answer == "refused-saying-why":
                await channel.send(hotswap.protocol.Abort(reason="no room"), timeout=5)
            channel.close()
        else:
            await channel.send(hotswap.protocol.Adopted(count=1), timeout=5)
        time.sleep(0.6)  # noqa: ASYNC251 - the stall itself: the old side cannot run
        client.settimeout(5)
        if answer.startswith("refused"):
            assert await handing == 0  # kept
            assert ("the successor refused 1 connection(s): no room" in caplog.text) == (
                answer == "refused-saying-why")
            assert old.can_hand_over_connections is False
            server_side.sendall(b"the old side")
            assert client.recv(100) == b"the old side"
        else:
            assert await handing == 1  # the successor's
            # Acknowledged, not let go of: the channel stays open for the
            # next frame and for Drained (a late acknowledgement would end it).
            assert old.can_hand_over_connections
            assert "letting go of them" not in caplog.text
            with socket.socket(fileno=frame.fds[0]) as adopted:
                adopted.sendall(b"the successor")
                assert client.recv(100) == b"the successor"
            channel.close()
        for sock in (server_side, client):
            sock.close()
        await old.close(cut=0)

    run(main())


@pytest.mark.parametrize("answer", ["refused", "refused-saying-why", "adopted"])
def test_what_the_successor_decided_before_the_old_side_let_go_counts(
        run: Runner, answer: str, caplog: pytest.LogCaptureFixture) -> None:
    """The successor reads a frame of connections and decides while the old
    side still waits (it has not closed), but acts on that only after the
    old side's wait ran out (here: it waits for that; in life, a successor
    descheduled between the two). Letting go at once, the old side would
    close its copies as a refusing successor closes its own: nobody would
    serve them. The old side ends its side of the channel and gives the
    successor a last word: a refusal keeps the frame (served on), an
    acknowledgement lets go of it."""
    name = new_name()

    async def main() -> None:
        old, client, server_side, channel, handing, frame = await a_frame_on_its_way(
            name, reasons=answer == "refused-saying-why")
        assert not channel.peer_closed()  # decided now: the old side still waits
        await until(channel.peer_closed, "the old side to stop waiting")
        client.settimeout(5)
        if answer.startswith("refused"):
            os.close(frame.fds[0])
            if answer == "refused-saying-why":
                await channel.send(hotswap.protocol.Abort(reason="no room"), timeout=5)
            channel.close()
            assert await handing == 0  # kept
            assert ("the successor refused them: no room" in caplog.text) == (
                answer == "refused-saying-why")
            server_side.sendall(b"the old side")
            assert client.recv(100) == b"the old side"
        else:
            await channel.send(hotswap.protocol.Adopted(count=1), timeout=5)
            assert await handing == 1  # the successor's
            with socket.socket(fileno=frame.fds[0]) as adopted:
                adopted.sendall(b"the successor")
                assert client.recv(100) == b"the successor"
            channel.close()
        assert not old.can_hand_over_connections
        for sock in (server_side, client):
            sock.close()
        await old.close(cut=0)

    run(main())


def test_a_successor_says_its_refusal_before_it_logs_it(run: Runner) -> None:
    """A successor that refuses a frame of connections (here: one that is
    not all TCP) closed the channel, which is its refusal, only after it had
    logged why. A log line can take long (a stderr pipe nobody reads for a
    while; here the successor's log handler waits for the old side): the old
    side's wait for the acknowledgement and its last word ran out meanwhile,
    it let go of the frame, and the successor had closed its copies: nobody
    served those connections. The refusal is said first now. The successor
    runs in a thread of its own, with its own event loop: one process
    (hotswap's peer uid check) but two sides that run at the same time."""
    name = new_name()
    handed = threading.Event()  # the old side is done with the frame
    ready, finish = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    class SlowLog(logging.Handler):
        """The successor's log line is written late; the old side's are not
        held up (in life, another process's pipe): no handler lock."""

        def handle(self, record: logging.LogRecord) -> bool:
            if record.threadName == "successor" and "predecessor gone" in record.getMessage():
                handed.wait(10)
            return True

        def emit(self, record: logging.LogRecord) -> None:
            pass

    def successor() -> None:
        async def main() -> None:
            new = hotswap.Upgrader(name, version="v2", options=opts())
            new.adopt_connections(lambda listener, sock: sock.close())
            assert await new.start() is hotswap.Role.TAKEOVER
            new.listen("http", ("127.0.0.1", 0))
            await new.ready()
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, finish.wait, 20)
            await new.close()
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failures.append(exc)

    async def main() -> None:
        old = await serving_upgrader(name, "v1", message_timeout=0.3)
        client = socket.create_connection(("127.0.0.1", port_of(old.status())))
        tcp, _ = old._listeners["http"].sock.accept()
        unix, unix_peer = socket.socketpair()
        thread = threading.Thread(target=successor, name="successor")
        thread.start()
        try:
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            await old.release()
            await until(ready.is_set, "the successor ready")
            try:
                sent = await old.hand_over_connections(
                    [("http", tcp.fileno(), "tcp"), ("http", unix.fileno(), "unix")])
            finally:
                handed.set()
            assert sent == 0  # refused: kept, served on here
            for ours, theirs in ((tcp, client), (unix, unix_peer)):
                ours.sendall(b"still the old side")
                theirs.settimeout(5)
                assert theirs.recv(100) == b"still the old side"
        finally:
            handed.set()
            finish.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 30)
        assert not thread.is_alive() and not failures, failures
        for sock in (tcp, client, unix, unix_peer):
            sock.close()
        await old.close(cut=0)

    logger = logging.getLogger("hotswap")
    handler, level = SlowLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run(main())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_both_sides_of_an_acknowledgement_read_a_failure_alike() -> None:
    """The old side serves a frame on only if the successor closed the
    channel before acknowledging it, and the successor adopts a frame it
    could not acknowledge only if the old side closed: one rule for both
    (hotswap.upgrader._peer_closed), or a connection gets two servers or
    none. Any other failure (a full kernel buffer, garbage, a deadline) says
    nothing of the other side."""
    from hotswap.errors import BrokenResourceError, HandoverTimeout, RemoteProtocolError
    from hotswap.upgrader import _peer_closed

    def broken(cause: OSError) -> BrokenResourceError:
        try:
            raise BrokenResourceError(f"sending: {cause}") from cause
        except BrokenResourceError as exc:
            return exc

    assert _peer_closed(BrokenResourceError("peer closed the control connection", eof=True))
    assert _peer_closed(broken(BrokenPipeError(32, "Broken pipe")))
    assert _peer_closed(broken(ConnectionResetError(104, "reset")))
    assert not _peer_closed(broken(OSError(105, "No buffer space available")))
    assert not _peer_closed(BrokenResourceError("cannot send: an earlier frame was cut short"))
    assert not _peer_closed(RemoteProtocolError("garbage"))
    assert not _peer_closed(HandoverTimeout("late"))


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_listener_the_app_closed_is_left_out_of_the_handover(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """An app may stop one of its servers for good while it serves, which
    closes that listener. The upgrader forgets it, with one warning naming
    it: status() no longer lists it, the next handover sends the others,
    and listen() may use its name again.
    It used to send the closed one too (EBADF), so every handover failed and
    the successor, taking that for its predecessor gone, retried until its
    connect_timeout: an app that closed a listener could never be upgraded."""
    name = new_name()

    async def main() -> None:
        old = hotswap.Upgrader(name, version="v1", options=opts())
        await old.start()
        kept = old.listen("kept", ("127.0.0.1", 0))
        gone = old.listen("gone", ("127.0.0.1", 0))
        await old.ready()
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, sock=gone)
        server.close()  # stopped for good: its listener is closed
        await server.wait_closed()
        old.listen("gone", ("127.0.0.1", 0)).close()  # its name is free again
        st = old.status()
        assert [i.name for i in st.listeners] == ["kept"] and st.listener_count == 1
        new = hotswap.Upgrader(name, version="v2", options=opts(connect_timeout=1.0))
        try:
            assert await new.start() is hotswap.Role.TAKEOVER
            assert new.listen("kept", ("127.0.0.1", 0)).getsockname() == kept.getsockname()
            ready = asyncio.create_task(new.ready())
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            await old.release()
            await ready
            assert [i.name for i in new.status().listeners] == ["kept"]
        finally:
            await new.close()
            await old.close()

    with caplog.at_level(logging.INFO, logger="hotswap"):
        run(main())
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned
    assert all("listener gone 127.0.0.1:" in line for line in warned), warned


def test_the_address_of_a_listener_the_app_closed_is_free_for_another_name(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """An app that stops a server for good (its listener closed) and listens
    at that address again under another name gets a listener there: the
    closed one is forgotten then (warned, as in status() or a handover), not
    named as the address's holder. It was a ListenerError naming the closed
    listener, unless a status query (a probe) had come in between and
    forgotten it: whether the app's listen() worked depended on the probe's
    timing."""
    name = new_name()

    async def main() -> None:
        upg = hotswap.Upgrader(name, version="v1", options=opts())
        await upg.start()
        try:
            first = upg.listen("old-web", ("127.0.0.1", 0))
            address = first.getsockname()
            await upg.ready()
            server = await asyncio.get_running_loop().create_server(asyncio.Protocol,
                                                                    sock=first)
            server.close()  # stopped for good: its listener is closed
            await server.wait_closed()
            again = upg.listen("web", address)
            assert again.getsockname() == address
            st = upg.status()
            assert [i.name for i in st.listeners] == ["web"] and st.listener_count == 1
        finally:
            await upg.close()

    with caplog.at_level(logging.INFO, logger="hotswap"):
        run(main())
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "listener old-web 127.0.0.1:" in warned[0], warned


def test_a_status_answered_after_a_stop_warns_of_no_closed_listener(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A status query accepted while the process served (a probe, the
    hook's wait-ready) is answered by its own task, also once the process
    was told to stop and, as asked, closed its servers and released: the
    listeners are closed then by that stop, not by an app that stopped a
    server for good. No warning for them (it was one WARNING per listener,
    "closed by this process; leaving it out of handovers", after a clean
    stop or handover)."""
    name = new_name()

    async def main() -> None:
        upg = hotswap.Upgrader(name, version="v1", options=opts())
        await upg.start()
        socks = [upg.listen(f"web{i}", ("127.0.0.1", 0)) for i in range(3)]
        await upg.ready()
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(asyncio.Protocol, sock=s) for s in socks]
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(sockaddr(control_address(name)))
        channel = Channel(probe, Sender.CLIENT)
        try:
            await until(lambda: bool(upg._handlers), "the probe's connection accepted")
            upg.request_stop()
            assert await upg.wait_exit() is hotswap.ExitReason.STOP_REQUESTED
            for server in servers:  # serve()'s order: stop accepting, then release
                await hotswap.close_server(server)
            await upg.release()
            await channel.send(hotswap.protocol.StatusRequest(), timeout=5)
            answer = await channel.receive(timeout=5)
            assert isinstance(answer, hotswap.protocol.Status), answer
            assert answer.state == "draining"
        finally:
            channel.close()
            await upg.close()

    with caplog.at_level(logging.INFO, logger="hotswap"):
        run(main())
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [], warned


def test_a_handover_the_old_side_fails_itself_tells_the_successor_why(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """Sending the sockets may fail for the old side's own reason, not the
    successor's: here a listener's descriptor closed behind its socket
    object's back (EBADF). The old side tells the successor so (Failed, with
    that reason), and the successor fails at once, saying it; it used to
    read only an EOF, log that its predecessor went away and retry until its
    connect_timeout, failing the same way each time. The old side serves on."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        sock = old._listeners["http"].sock
        # A descriptor number nothing takes meanwhile (the lowest free one
        # is what the kernel gives out), closed under its socket object.
        high = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC,
                           resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 16)
        stale = socket.socket(fileno=high)
        old._listeners["stale"] = type(old._listeners["http"])(
            listeners.describe("stale", stale), stale)
        os.close(high)
        new = hotswap.Upgrader(name, version="v2", options=opts(connect_timeout=2.0))
        try:
            # At once, by its reason: retrying, it would fail after its
            # connect_timeout with "went away ... again until connect_timeout".
            with pytest.raises(hotswap.HandoverFailed,
                               match=r"predecessor gave up: .*Bad file descriptor"):
                await new.start()
            assert state_now(old) is hotswap.State.SERVING
        finally:
            stale.detach()  # its number is closed already
            await new.close()
            await old.close()

    with caplog.at_level(logging.INFO, logger="hotswap"):
        run(main())
    assert "went away" not in caplog.text


def test_a_successor_with_other_listeners_inherits_what_it_can(run: Runner) -> None:
    """A new version's configuration may rename, move, swap, drop or add
    listeners. It inherits every listener whose address it asks for, under
    whatever name (a renamed or swapped one would otherwise fail to bind:
    the old side still holds the address), so the clients queued there are
    not lost; a moved one is bound anew; one it does not ask for is closed
    at ready(), and with the old side's release nobody holds it any more.
    Connections handed over on a renamed listener arrive under the new
    name. No descriptor is left behind."""
    name = new_name()

    async def main() -> None:
        before = set(os.listdir("/proc/self/fd"))
        old = hotswap.Upgrader(name, version="v1", options=opts())
        await old.start()
        ports = {n: _port(old.listen(n, ("127.0.0.1", 0)))
                 for n in ("http", "admin", "api", "legacy", "dropped")}
        await old.ready()
        client = socket.create_connection(("127.0.0.1", ports["http"]))
        on_http, _ = old._listeners["http"].sock.accept()
        # Waiting in the accept queues of the listeners that change names.
        queued = {n: socket.create_connection(("127.0.0.1", ports[n]))
                  for n in ("http", "admin", "api")}
        adopted: list[tuple[str, socket.socket]] = []
        new = hotswap.Upgrader(name, version="v2", options=opts())
        new.adopt_connections(lambda listener, sock: adopted.append((listener, sock)))
        assert await new.start() is hotswap.Role.TAKEOVER
        with socket.socket() as probe:  # a free port for the moved listener
            probe.bind(("127.0.0.1", 0))
            moved_to = _port(probe)
        socks = {
            "web": new.listen("web", ("127.0.0.1", ports["http"])),      # renamed
            "admin": new.listen("admin", ("127.0.0.1", ports["api"])),   # swapped
            "api": new.listen("api", ("127.0.0.1", ports["admin"])),     # swapped
            "legacy": new.listen("legacy", ("127.0.0.1", moved_to)),     # moved
            "metrics": new.listen("metrics", ("127.0.0.1", 0)),          # added
        }  # and "dropped" not asked for
        ready = asyncio.create_task(new.ready())
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        await old.release()
        await ready
        st = new.status()
        assert {i.name: i.address for i in st.listeners} == {
            "web": f"127.0.0.1:{ports['http']}", "admin": f"127.0.0.1:{ports['api']}",
            "api": f"127.0.0.1:{ports['admin']}", "legacy": f"127.0.0.1:{moved_to}",
            "metrics": f"127.0.0.1:{_port(socks['metrics'])}"}
        # The queued clients are accepted by the successor: same kernel sockets.
        for new_name_, old_name in (("web", "http"), ("admin", "api"), ("api", "admin")):
            socks[new_name_].settimeout(5)
            conn, peer = socks[new_name_].accept()
            assert peer == queued[old_name].getsockname()
            conn.close()
        assert _refused(ports["legacy"]) and _refused(ports["dropped"])
        with socket.create_connection(("127.0.0.1", moved_to), timeout=5):
            pass
        # A connection of the old "http" listener arrives as one of "web".
        assert await old.hand_over_connections(
            [("http", on_http.fileno(), "peer")]) == 1
        on_http.close()
        await until(lambda: len(adopted) == 1, "the successor to adopt the connection")
        assert adopted[0][0] == "web"
        adopted[0][1].sendall(b"v2")
        client.settimeout(5)
        assert client.recv(10) == b"v2"
        for sock in (adopted[0][1], client, *queued.values(), *socks.values()):
            sock.close()
        await old.close(cut=0)
        await new.close()
        assert set(os.listdir("/proc/self/fd")) == before

    run(main())


def test_a_moved_listener_binds_over_our_own_copy_of_the_old_address(run: Runner) -> None:
    """A listener moved to an overlapping address (127.0.0.1:P -> 0.0.0.0:P)
    when nobody but the successor holds the old one any more (a launcher
    that keeps no copy; a predecessor that died after the descriptors
    crossed): the successor's own unclaimed copy must not make the bind
    fail. It closes that copy and binds."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        port = _port(old._listeners["http"].sock)
        new = hotswap.Upgrader(name, version="v2", options=opts())
        assert await new.start() is hotswap.Role.TAKEOVER
        old._listeners["http"].sock.close()  # the old side's copy is gone
        sock = new.listen("http", ("0.0.0.0", port))
        assert sock.getsockname() == ("0.0.0.0", port)
        ready = asyncio.create_task(new.ready())
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        await old.release()
        await ready
        assert_accepts(sock, port)
        sock.close()
        await old.close(cut=0)
        await new.close()

    run(main())


def test_connections_of_a_dropped_listener_whose_name_was_reused_stay(run: Runner) -> None:
    """The predecessor had "a" at P1 and "b" at P2; the successor asks for
    "b" at P1 (inheriting "a" by address) and drops P2. A connection of the
    old "a" arrives as "b"; one of the old "b" must not arrive as "b" (that
    is now the listener at P1): the successor refuses its frame, and the
    old side keeps it and serves it on."""
    name = new_name()

    async def main() -> None:
        old = hotswap.Upgrader(name, version="v1", options=opts())
        await old.start()
        p1 = _port(old.listen("a", ("127.0.0.1", 0)))
        p2 = _port(old.listen("b", ("127.0.0.1", 0)))
        await old.ready()
        client_a = socket.create_connection(("127.0.0.1", p1))
        on_a, _ = old._listeners["a"].sock.accept()
        client_b = socket.create_connection(("127.0.0.1", p2))
        on_b, _ = old._listeners["b"].sock.accept()
        adopted: list[tuple[str, socket.socket]] = []
        new = hotswap.Upgrader(name, version="v2", options=opts())
        new.adopt_connections(lambda listener, sock: adopted.append((listener, sock)))
        assert await new.start() is hotswap.Role.TAKEOVER
        sock = new.listen("b", ("127.0.0.1", p1))
        ready = asyncio.create_task(new.ready())
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        await old.release()
        await ready
        assert await old.hand_over_connections([("a", on_a.fileno(), "a")]) == 1
        await until(lambda: len(adopted) == 1, "the successor to adopt the connection")
        assert adopted[0][0] == "b"
        assert await old.hand_over_connections([("b", on_b.fileno(), "b")]) == 0
        assert len(adopted) == 1
        on_b.sendall(b"still v1")
        client_b.settimeout(5)
        assert client_b.recv(10) == b"still v1"
        on_b.close()  # ends it: the successor kept no copy of the frame it refused
        assert client_b.recv(10) == b""
        for s in (on_a, client_a, client_b, adopted[0][1], sock):
            s.close()
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_successor_told_to_stop_while_refused_busy_stops_waiting(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """v3 asks while v2 still follows v1's drain, and is refused busy: it
    retries (for up to connect_timeout, 30 s by default). Told to stop
    meanwhile, it gives up within a retry's delay instead of waiting out
    that time, or taking the sockets later only to give them back; nothing
    is taken, v2 serves on."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        v1 = await serving_upgrader(name, "v1")
        v2 = await taken_over(v1, name)  # v1 drains and does not finish
        v3 = hotswap.Upgrader(name, version="v3", options=opts())
        starting = asyncio.create_task(v3.start())
        await until(lambda: "serving process busy" in caplog.text, "v3 refused (busy)")
        assert not v3.stop_requested
        v3.request_stop()
        with pytest.raises(hotswap.HandoverFailed, match="stop requested"):
            await asyncio.wait_for(starting, 5)
        assert v3.stop_requested  # how serve() tells this stop from a failure
        st = await query_status(control_address(name))
        assert (st.pid, st.version, st.state) == (os.getpid(), "v2", "serving")
        await v3.close()
        await v1.close(cut=0)
        await v2.close()

    run(main())


@pytest.mark.parametrize("how", ["closed", "released"])
def test_a_successor_closed_before_confirming_says_so(
        run: Runner, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """A successor that is closed after taking the sockets and before
    confirming (its app's set-up raised, say) tells the old side, which
    logs why it serves on instead of a bare closed channel. So does one
    released first (``release()`` then ``close()``, from a ``finally``):
    the release left the old side waiting, handing over and refusing other
    successors as busy, until the close (or its handover_timeout), and then
    it logged only "peer closed the control connection"."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        new = hotswap.Upgrader(name, version="v2", options=opts())
        assert await new.start() is hotswap.Role.TAKEOVER
        new.listen("http", ("127.0.0.1", 0))
        if how == "released":
            await new.release()
            assert new.state is hotswap.State.DRAINING
        else:
            await new.close()
        await until(lambda: "still serving" in caplog.text, "the old side to give up")
        assert f"successor aborted: successor {how} before confirming" in caplog.text
        st = await query_status(control_address(name))
        assert (st.version, st.state) == ("v1", "serving")
        await new.close()
        assert caplog.text.count("successor aborted") == 1
        await old.close()

    run(main())


def test_a_squatter_that_never_answers_is_named(run: Runner) -> None:
    """Something of our uid holds the control name and never answers (a
    stopped predecessor, or not hotswap at all): the successor gives up
    after message_timeout, says where and who, and holds nothing."""
    name = new_name()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(sockaddr(control_address(name)))
    squatter.listen(1)

    async def main() -> None:
        fds_before = len(os.listdir("/proc/self/fd"))
        new = hotswap.Upgrader(name, version="v2", options=opts(message_timeout=0.3))
        with pytest.raises(hotswap.HandoverTimeout) as info:
            await new.start()
        message = str(info.value)
        assert control_address(name) in message and f"pid {os.getpid()}" in message
        assert "did not answer our hello" in message and "nothing was taken" in message
        assert new.state is hotswap.State.STARTING
        await new.close()
        assert len(os.listdir("/proc/self/fd")) == fds_before

    try:
        run(main())
    finally:
        squatter.close()


def _socket_inode(sock: socket.socket) -> str:
    return f"socket:[{os.fstat(sock.fileno()).st_ino}]"


def _open_links() -> set[str]:
    """What this process's descriptors point to (``socket:[inode]``, ...)."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, gone by now
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
    return links


@pytest.mark.parametrize("case", ["bad-first", "name-twice"])
def test_a_bad_sockets_frame_leaves_none_of_its_descriptors_open(
        run: Runner, case: str) -> None:
    """A predecessor (here one by hand) sends one frame of two descriptors
    whose first the successor cannot adopt (a pipe for a listener), or
    whose two entries have one name. The successor fails the takeover,
    and every descriptor of that frame is closed: the one it rejected,
    and the one after it, which it never looked at (a listener left open
    in a process that serves on: its port bound for good, its clients
    queued with nobody to accept them)."""
    name = new_name()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(sockaddr(control_address(name)))
    squatter.listen(1)
    listener = hotswap.listeners.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sent = _socket_inode(listener)
    first_r, first_w = os.pipe() if case == "bad-first" else (os.dup(listener.fileno()), -1)
    entry = SocketInfo(name="http", family="inet", kind="stream", address=f"127.0.0.1:{port}")
    frame = encode(Sockets(entries=(entry, entry), fds=(first_r, listener.fileno())))

    def predecessor() -> None:
        with squatter:
            squatter.settimeout(10)
            conn, _ = squatter.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(65536)  # the hello
                conn.sendall(encode(Welcome(pid=1, version="v1", count=2)))
                socket.send_fds(conn, [frame], [first_r, listener.fileno()])
                os.close(first_r)
                if first_w >= 0:
                    os.close(first_w)
                listener.close()  # the successor's copies are all that is left
                with contextlib.suppress(OSError):
                    conn.recv(65536)  # its Abort, or EOF

    thread = threading.Thread(target=predecessor, daemon=True)
    thread.start()

    async def main() -> None:
        new = hotswap.Upgrader(name, version="v2", options=opts())
        with pytest.raises(hotswap.HandoverFailed, match="not a socket" if case == "bad-first"
                           else "sent twice"):
            await new.start()
        await new.close()

    run(main())
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert sent not in _open_links(), "a descriptor of the frame was left open"
    with pytest.raises(ConnectionRefusedError):  # nobody holds the listener
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("client", ["blocking", "async"])
def test_a_status_client_given_half_a_frame_and_a_descriptor_keeps_neither(
        client: str) -> None:
    """Something of our uid on the control name sends half of an answer
    to a status query, with a descriptor, then nothing: the status client
    (the CLI's, and the library's) times out and closes that descriptor
    (a long-lived caller, a probe loop, would pile them up)."""
    name = new_name()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(sockaddr(control_address(name)))
    squatter.listen(1)
    gift = socket.socket()
    sent = _socket_inode(gift)
    done = threading.Event()

    def serve() -> None:
        with squatter:
            squatter.settimeout(10)
            conn, _ = squatter.accept()
            with conn:
                conn.recv(65536)  # the status request
                frame = encode(hotswap.protocol.Refused(code="busy", reason="x" * 100))
                socket.send_fds(conn, [frame[:20]], [gift.fileno()])
                gift.close()
                done.wait(10)  # the rest never comes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(hotswap.HandoverTimeout):
            if client == "blocking":
                hotswap.control.status_blocking(control_address(name), timeout=2)
            else:
                asyncio.run(query_status(control_address(name), timeout=2))
        assert sent not in _open_links(), "the status client kept the descriptor"
    finally:
        done.set()
        thread.join(timeout=10)


@pytest.mark.parametrize("client", ["blocking", "async"])
def test_a_status_client_given_an_answer_a_byte_at_a_time_keeps_its_deadline(
        client: str) -> None:
    """Something of our uid on the control name answers a status query a
    byte at a time, the last one shortly before the client's deadline (3 s
    here), then nothing: the client gives up at its deadline, not once a
    read has waited a whole deadline for the next byte (a probe would be
    held up to twice as long as it said: 5.9 s here). The bound, 4.5 s,
    leaves a loaded machine 1.5 s either way."""
    name = new_name()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(sockaddr(control_address(name)))
    squatter.listen(1)
    done = threading.Event()

    def serve() -> None:
        with squatter:
            squatter.settimeout(10)
            conn, _ = squatter.accept()
            with conn:
                conn.recv(65536)  # the status request
                frame = encode(hotswap.protocol.Refused(code="busy", reason="x" * 100))
                for i in range(2):  # at 1.45 s and 2.9 s, then nothing
                    if done.wait(1.45):
                        break
                    conn.sendall(frame[i:i + 1])
                done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(hotswap.HandoverTimeout):
            if client == "blocking":
                hotswap.control.status_blocking(control_address(name), timeout=3)
            else:
                asyncio.run(query_status(control_address(name), timeout=3))
        assert time.monotonic() - started < 4.5
    finally:
        done.set()
        thread.join(timeout=10)


@pytest.mark.parametrize("client", ["blocking", "async"])
def test_a_status_client_whose_server_closes_without_answering_says_so_at_once(
        client: str) -> None:
    """The process on the control name reads the status query and closes
    the connection: the status client says the peer closed it, at once,
    not a timeout at the end of its deadline (10 s here)."""
    name = new_name()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(sockaddr(control_address(name)))
    squatter.listen(1)

    def serve() -> None:
        with squatter:
            squatter.settimeout(10)
            conn, _ = squatter.accept()
            with conn:
                conn.recv(65536)  # the status request, then the end

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        # Not a HandoverTimeout at the deadline (what the client said when
        # it spun on recv() at EOF until then).
        with pytest.raises(hotswap.BrokenResourceError, match="peer closed"):
            if client == "blocking":
                hotswap.control.status_blocking(control_address(name), timeout=10)
            else:
                asyncio.run(query_status(control_address(name), timeout=10))
    finally:
        thread.join(timeout=10)


def test_a_serving_process_that_keeps_going_away_mid_handshake_is_a_failed_handover(
        ) -> None:
    """The process on the control name accepts each try and closes it
    before answering (a predecessor crashing and restarting, say) until
    ``connect_timeout`` has passed: ``start()`` raises what its docstring
    says, HandoverFailed (the BrokenResourceError as its cause), as for
    every other failed takeover. It used to raise the BrokenResourceError
    itself, which ``except HandoverFailed`` (``serve()`` after a stop, the
    README's lifecycle) did not catch."""
    name = new_name()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(sockaddr(control_address(name)))
    squatter.listen(8)
    squatter.settimeout(10)
    tries: list[int] = []
    over = threading.Event()

    def go_away() -> None:
        while True:
            conn, _ = squatter.accept()
            conn.close()
            if over.is_set():
                return
            tries.append(1)

    thread = threading.Thread(target=go_away, daemon=True)
    thread.start()

    async def main() -> None:
        upg = hotswap.Upgrader(name, version="v2", options=opts(connect_timeout=1.5))
        try:
            with pytest.raises(hotswap.HandoverFailed, match="went away") as caught:
                await upg.start()
            assert isinstance(caught.value.__cause__, hotswap.BrokenResourceError)
            # Nothing was taken: back to starting, as after any other failed
            # hello (it said taking-over for good).
            assert upg.state is hotswap.State.STARTING
        finally:
            await upg.close()

    try:
        asyncio.run(main())
    finally:
        over.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as last:
            last.connect(sockaddr(control_address(name)))  # wakes the accept()
        thread.join(timeout=10)
        squatter.close()
    assert not thread.is_alive()
    assert len(tries) >= 2  # it did retry before giving up


def test_a_control_socket_that_cannot_be_connected_to_is_a_failed_handover(
        tmp_path: Path) -> None:
    """A connect() error that does not mean "nobody serves" (here ENOTDIR:
    the control path's directory is a file; EACCES, a filesystem control
    socket of another uid, is the same path but root skips that check) is
    a failed takeover, as ``start()`` says: it raised a bare
    BrokenResourceError, which ``except HandoverFailed`` did not catch.
    Nothing is bound, and the error names the path and the cause."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    path = str(not_a_dir / "control.sock")

    async def main() -> None:
        upg = hotswap.Upgrader(new_name(), version="v2", options=opts(control_path=path))
        try:
            with pytest.raises(hotswap.HandoverFailed,
                               match=r"control socket .*file/control\.sock.*Not a directory"
                               ) as caught:
                await upg.start()
            assert isinstance(caught.value.__cause__, NotADirectoryError)
            assert upg.status().listeners == ()
        finally:
            await upg.close()

    asyncio.run(main())


@pytest.mark.parametrize("uids", ["0,root", "-1", "4294967295", "99999999999"])
def test_a_malformed_allow_uids_is_a_clear_error(uids: str) -> None:
    # 4294967295 is uid_t's -1 (no uid); a bigger number is no uid_t at all.
    with pytest.raises(hotswap.HotswapError, match=f"HOTSWAP_ALLOW_UIDS='{uids}' is not"):
        hotswap.Upgrader(new_name(), options=hotswap.Options(
            env={"HOTSWAP_ALLOW_UIDS": uids}))
    upg = hotswap.Upgrader(new_name(), options=hotswap.Options(
        env={"HOTSWAP_ALLOW_UIDS": "65534, 10001"}))
    assert upg._allowed_uids == {os.getuid(), 65534, 10001}


def test_an_accepting_that_came_while_the_old_side_stalled_counts(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """The old side is stalled (here: its event loop blocked) past its
    handover_timeout while the successor's Accepting arrives. It wakes to
    its timer before its socket; failing the handover then would leave both
    versions accepting for good, as a successor that waited in vain for
    Released serves on without it. The Accepting already there counts."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        old = await serving_upgrader(name, "v1", handover_timeout=0.3)
        channel = await raw_successor(name, "v2")
        await channel.send(hotswap.protocol.Accepting(), timeout=5)
        time.sleep(0.6)  # noqa: ASYNC251 - the stall itself: the old side cannot run
        await until(lambda: old.state is not hotswap.State.HANDING_OVER,
                    "the old side to decide")
        assert old.state is hotswap.State.DRAINING, caplog.text
        assert "failed, still serving" not in caplog.text
        await old.release()
        assert isinstance(await channel.receive(timeout=5), hotswap.protocol.Released)
        channel.close()
        await old.close(cut=0)

    run(main())


def test_status_clients_that_leave_before_the_answer_are_no_warning(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A status client (the probe, the hook, ``hotswap status``) that sends
    its request and goes before the answer (its timeout ran out, it was
    killed): the server's send breaks. Nothing is wrong with the server, and
    a WARNING each (at a probe's pace, or a client's loop) flooded the log
    that operators alert on: DEBUG, as for a peer that said nothing."""
    caplog.set_level(logging.DEBUG, logger="hotswap")
    name = new_name()
    clients = 10

    async def main() -> None:
        upg = await serving_upgrader(name, "v1")
        request = encode(hotswap.protocol.StatusRequest())
        for _ in range(clients):  # without yielding: each is gone before the answer
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(sockaddr(control_address(name)))
                sock.sendall(request)
        await until(lambda: sum("left before its answer" in r.getMessage()
                                or "sending 'status'" in r.getMessage()
                                for r in caplog.records) == clients,
                    "every client's answer to break")
        st = await query_status(control_address(name))  # serves on, answers
        assert st.state == "serving"
        await upg.close()

    run(main())
    alarms = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not alarms, alarms


def test_a_first_message_that_came_while_the_server_stalled_counts(run: Runner) -> None:
    """A control connection is accepted and its handler waits for the first
    message; the serving process then stalls (here: its event loop blocked)
    past message_timeout while the request arrives. It wakes to its timer
    before its socket: giving up then answered a status query (the probe,
    the hook, ``hotswap status``) or a successor's hello that was there
    with a refusal, "nothing received within ... of connecting". What
    already arrived counts."""
    name = new_name()

    async def main() -> None:
        upg = await serving_upgrader(name, "v1", message_timeout=0.3)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, sockaddr(control_address(name)))

        def waiting(task: asyncio.Task[None]) -> bool:
            coro = task.get_coro()
            return (inspect.iscoroutine(coro)
                    and inspect.getcoroutinestate(coro) == inspect.CORO_SUSPENDED)

        # Its handler has begun, and waits for the first message.
        await until(lambda: len(upg._handlers) == 1 and all(map(waiting, upg._handlers)),
                    "the handler waiting for the request")
        sock.send(encode(hotswap.protocol.StatusRequest()))
        time.sleep(0.6)  # noqa: ASYNC251 - the stall itself: the server cannot run
        chunks = []
        # A refusal came with a reset: the server closed with our request unread.
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(5):
                while chunk := await loop.sock_recv(sock, 65536):
                    chunks.append(chunk)
        sock.close()
        reply = b"".join(chunks)
        assert b'"type":"status"' in reply and b'"state":"serving"' in reply, reply
        await upg.close()

    run(main())


_ROOM_CHILD = """
import asyncio, itertools, os, resource, sys
import hotswap

def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True

def room() -> int:  # descriptors this process may still open
    opened = []
    try:
        while True:
            opened.append(os.eventfd(0, os.EFD_CLOEXEC))
    except OSError:
        pass
    for fd in opened:
        os.close(fd)
    return len(opened)

async def main() -> None:
    upg = hotswap.Upgrader(sys.argv[1], version="v2",
                           options=hotswap.Options(message_timeout=5.0))
    assert await upg.start() is hotswap.Role.TAKEOVER
    sock = upg.listen("http", ("127.0.0.1", int(sys.argv[2])))
    server = await asyncio.start_server(lambda r, w: w.close(), sock=sock,
                                        start_serving=False)
    # The limit that leaves exactly two descriptor numbers free below it
    # (what is open above it, inherited from the test's runner, stays so).
    free = list(itertools.islice((fd for fd in itertools.count() if not is_open(fd)), 2))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[1] + 1, hard))
    assert room() == 2
    try:
        await upg.ready(start_serving=[server])
        print("confirmed; room", room(), flush=True)
    except hotswap.HandoverFailed as exc:
        print("called off:", exc, flush=True)
    server.close()
    await upg.close()

if sys.argv[3] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def test_a_kruise_successor_counts_its_serving_marker_in_the_room_it_needs(
        run: Runner) -> None:
    """A successor confirms only with two descriptors to spare once it holds
    the sockets: the control socket's reserve and one connection to accept
    (else it aborts and the predecessor serves on). A Kruise successor
    (a rank: the serving marker) binds a third as it confirms, its marker:
    with exactly two to spare it confirmed, the marker and the reserve took
    both, and its servers could accept nothing (EMFILE) while the
    predecessor, which had stopped accepting, drained. It now counts the
    marker and calls the handover off. The successor runs in a child (on
    the same event loop as the test) whose limit it lowers: its own
    descriptors only (the predecessor, here, would free some of its own
    in between)."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1", handover_timeout=10.0)
        exited = asyncio.ensure_future(old.wait_exit())

        async def drain_if_taken_over() -> None:  # keeps the channel open meanwhile
            if await exited is hotswap.ExitReason.TAKEN_OVER:
                await old.release()

        releasing = asyncio.ensure_future(drain_if_taken_over())
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _ROOM_CHILD, name, str(port_of(old.status())),
            "asyncio" if run is asyncio.run else "uvloop",
            env=child_env(SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out = (await asyncio.wait_for(child.communicate(), 30))[0].decode()
            assert child.returncode == 0, out
            assert "called off: handover aborted: no descriptor left to accept" in out, out
            assert not exited.done() and old.state is hotswap.State.SERVING
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
            releasing.cancel()
            exited.cancel()
            await old.close()

    run(main())


def test_usage_at_the_descriptor_limit_is_unknown_not_an_error() -> None:
    """A status request that takes the last descriptor: psutil cannot open
    /proc, and the reply says -1 rather than failing ("internal error",
    which the readiness probe's fallback would take for not ready). Run in
    a child, whose descriptor limit it lowers to what it has open."""
    code = ("import os, resource\n"
            "from hotswap import _proc\n"
            "assert _proc.usage()[0] > 0\n"
            "open_now = len(os.listdir('/proc/self/fd')) - 1\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, hard))\n"
            "print(_proc.usage())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(-1, -1)"


def test_a_full_control_queue_is_a_timeout_not_a_forbidden_uid(run: Runner) -> None:
    """A control socket whose listen queue is full (its process stopped, or
    flooded): connect() says EAGAIN, which the event loops took for "in
    progress", handing back an unconnected socket whose SO_PEERCRED said
    uid -1: a false "forbidden". Now connect() retries while the queue is
    full: a timeout if it stays full, connected once there is room."""
    name = new_name()
    address = control_address(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sockaddr(address))
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        for _ in range(100):  # fill the queue
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(sockaddr(address))
            except BlockingIOError:
                client.close()
                break
            queued.append(client)
        else:
            raise AssertionError("the queue never filled")

        async def main() -> None:
            with pytest.raises(hotswap.HandoverTimeout, match="queue is full"):
                await hotswap.control.connect(address, timeout=0.3)
            new = hotswap.Upgrader(name, version="v2", options=opts(message_timeout=0.3))
            with pytest.raises(hotswap.HandoverTimeout, match="queue is full"):
                await new.start()
            await new.close()
            # Room in the queue a moment later: connected, to the listener.
            asyncio.get_running_loop().call_later(0.05, lambda: listener.accept()[0].close())
            sock = await hotswap.control.connect(address, timeout=5)
            assert sock.getpeername() == sockaddr(address).encode()
            sock.close()

        run(main())
        # The CLI's client, with no event loop, alike (it failed at once).
        with pytest.raises(hotswap.HandoverTimeout, match="queue is full"):
            hotswap.control.status_blocking(address, timeout=0.3)
    finally:
        for client in queued:
            client.close()
        listener.close()


def let_go(sock: socket.socket) -> bool:
    """Whether the control server let go of this idle peer's (non-blocking)
    connection: EOF or a reset; False while it is still held, nothing said."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_control_peers_take_at_most_their_share(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """Peers that connect and say nothing would each be held for
    message_timeout; unbounded, a few hundred took every descriptor and the
    service failed. At most 16 are handled at once; the rest wait in the
    kernel's queue, and each newcomer lets the oldest silent one go, so a
    status query is answered at once and a successor takes over, however
    many idle peers there are. The log says so with a count, not once per
    peer."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        upg = await serving_upgrader(name, "v1", message_timeout=5.0)
        loop = asyncio.get_running_loop()
        idle = []
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr(control_address(name)))
            idle.append(sock)
        peak = 0

        def handled() -> int:
            nonlocal peak
            peak = max(peak, len(upg._handlers))
            return len(upg._handlers)

        await until(lambda: handled() == 16, "16 control connections handled")
        # Well within the 5 s the idle peers would be held for.
        st = await query_status(control_address(name), timeout=2)
        assert st.state == "serving"
        new = await asyncio.wait_for(taken_over(upg, name), 4)
        assert handled() <= 16 and peak <= 16

        evicted = sum(let_go(sock) for sock in idle)
        assert evicted >= 24  # 40 in 16 slots, and then some for the newcomers
        # Logged at once, then as a count (here: when the old side stopped
        # serving its control socket), not once per connection.
        counts = re.findall(r"let go of (\d+) that had not said anything", caplog.text)
        assert 1 <= len(counts) <= 2 and sum(map(int, counts)) == evicted, caplog.text
        for sock in idle:
            sock.close()
        await upg.close(cut=0)
        await new.close()

    run(main())


def test_a_peer_whose_request_has_arrived_is_not_let_go_of(run: Runner) -> None:
    """All 16 slots taken, a newcomer lets go of the oldest connection that
    has not sent its first message. Whether it had was read from the
    handler's state, which lags the socket: a probe (or a hook, a successor)
    whose request arrived as a newcomer connected, its handler not yet run,
    was let go of, unanswered (its request lost with the connection). Only
    a connection with nothing to read is let go of."""
    name = new_name()

    async def main() -> None:
        upg = await serving_upgrader(name, "v1", message_timeout=5.0)
        loop = asyncio.get_running_loop()
        address = sockaddr(control_address(name))

        def waiting(task: asyncio.Task[None]) -> bool:
            coro = task.get_coro()
            return (inspect.iscoroutine(coro)
                    and inspect.getcoroutinestate(coro) == inspect.CORO_SUSPENDED)

        async def connected() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return sock

        probe = await connected()  # the oldest: its handler waits for its request
        await until(lambda: len(upg._handlers) == 1 and all(map(waiting, upg._handlers)),
                    "the probe's handler waiting")
        idle = [await connected() for _ in range(15)]
        await until(lambda: len(upg._handlers) == 16 and all(map(waiting, upg._handlers)),
                    "16 handlers waiting")
        # In one step of ours (the loop sees both at its next poll): a
        # newcomer connects, and the probe's request arrives.
        newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        newcomer.setblocking(False)
        newcomer.connect(address)
        probe.send(encode(hotswap.protocol.StatusRequest()))
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # let go of, unanswered
            async with asyncio.timeout(5):
                while chunk := await loop.sock_recv(probe, 65536):
                    chunks.append(chunk)
        reply = b"".join(chunks)
        assert b'"type":"status"' in reply, reply
        # The newcomer took the slot of the oldest that had said nothing.

        await until(lambda: let_go(idle[0]), "the oldest silent peer let go of")
        assert not any(map(let_go, idle[1:]))
        for sock in [probe, newcomer, *idle]:
            sock.close()
        await upg.close()

    run(main())


def test_peers_that_close_before_saying_anything_are_no_warning(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A peer that connects and closes without a word (a port scanner, a
    client that gave up) is no news: logged at debug level, so that a flood
    of them does not flood the log. Garbage still gets a warning."""
    name = new_name()
    caplog.set_level(logging.DEBUG, logger="hotswap")

    async def main() -> None:
        upg = await serving_upgrader(name, "v1")
        loop = asyncio.get_running_loop()
        for _ in range(10):  # fewer than the 16 slots: none is let go of
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr(control_address(name)))
            sock.close()
        await until(lambda: caplog.text.count("control connection: ") == 10,
                    "the 10 connections handled")
        assert await raw_exchange(name, b"\x00\x00\x00\x02{}")  # garbage: refused
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "control connection" in warnings[0], warnings
        await upg.close()

    run(main())


_GARBAGE_FLOOD = """
import socket, sys
address, count = "\\0" + sys.argv[1][1:], int(sys.argv[2])  # an abstract name
kinds = [(bytes.fromhex(data), why.encode()) for data, why in zip(*[iter(sys.argv[3:])] * 2)]
for i in range(count):
    data, why = kinds[i % len(kinds)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    if b'"code":"protocol"' not in reply or why not in reply:
        sys.exit(f"peer {i}: {reply!r}")
print("refused", count)
"""
"""A client process: ``count`` connections to the control socket ``argv[1]``,
one after the other, each sending the next of the (hex data, reason) pairs
that follow and checking that it is refused ``protocol`` with that reason."""


def test_a_flood_of_garbage_from_an_allowed_uid_does_not_flood_the_log(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A process of an allowed uid that connects in a loop and sends
    garbage, or a hello that is refused (a client process here, as fast as
    it can): each connection was a WARNING of its own (10,817 lines in 2 s
    from the sample sidecar; 10,588 for the hello), drowning the rest. The
    first five of each are logged at once, then at most one line per 10 s
    with the count (the rest at DEBUG); each peer is still refused with its
    reason, and a successor's failed handover in the meantime is still
    logged in full."""
    name = new_name()
    caplog.set_level(logging.DEBUG, logger="hotswap")
    peers = 160  # 40 of each kind
    kinds = [(b"GET / HTTP/1.1\r\n\r\n", "outside 1..16384"),
             (struct.pack("!I", 4) + b"{}}}", "not UTF-8 JSON"),
             (encode(hotswap.protocol.Accepting()), "may not send 'accepting'"),
             (encode(Hello(pid=1, version="v9", protocol=999)), "protocol 999 not supported")]

    async def main() -> None:
        upg = await serving_upgrader(name, "v1")
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _GARBAGE_FLOOD, control_address(name), str(peers),
            *(arg for data, why in kinds for arg in (data.hex(), why)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        async with asyncio.timeout(60):
            out, _ = await client.communicate()
        assert client.returncode == 0, out
        assert out.split() == [b"refused", str(peers).encode()], out
        channel = await raw_successor(name, "v2")  # the sockets, then it gives up
        await channel.send(hotswap.protocol.Abort(reason="the app failed"), timeout=5)
        await until(lambda: upg.state is hotswap.State.SERVING, "v1 serving again")
        channel.close()
        await upg.close()  # the counts not yet logged are logged as it stops

    run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for what, counter, shown, seen in [
            ("control connection:", "control connections failed", 120,
             [why for _, why in kinds[:3]] * 2),
            ("refused successor", "successors refused", 40, [kinds[3][1]] * 5)]:
        lines = [line for line in warnings if what in line]
        # Five in full (each its own reason and peer), then a count.
        assert 6 <= len(lines) <= 8, lines
        for line, why in zip(lines[:5], seen, strict=False):
            assert why in line and "pid " in line and "in all" not in line, lines
        counted = [int(m[1]) if (m := re.search(rf"(\d+) {counter} in all", line)) else 1
                   for line in lines]
        assert sum(counted) == shown, lines
    assert any("handover to pid" in line and "the app failed" in line
               for line in warnings), warnings


def recorded_sends(successor: hotswap.Upgrader) -> list[str]:
    """The types of the messages ``successor`` sends its predecessor from
    now on (its channel's send, wrapped)."""
    channel = successor._predecessor_channel
    assert channel is not None
    sent: list[str] = []
    original = channel.send

    async def recording(message: hotswap.protocol.Message, *, timeout: float) -> None:
        sent.append(message.TYPE)
        await original(message, timeout=timeout)

    channel.send = recording  # type: ignore[method-assign]
    return sent


async def a_cancelled_confirmation(name: str) -> tuple[
        hotswap.Upgrader, hotswap.Upgrader, socket.socket, list[str]]:
    """v1 serves ``name``; v2 takes over, and the task awaiting its ready()
    is cancelled once v1 has read its Accepting, before v1 releases.
    Returns v1, v2, v2's listener and what v2 sends v1 from its ready() on
    (:func:`recorded_sends`)."""
    old = await serving_upgrader(name, "v1")
    new = hotswap.Upgrader(name, version="v2", options=opts())
    assert await new.start() is hotswap.Role.TAKEOVER
    sock = new.listen("http", ("127.0.0.1", 0))
    sent = recorded_sends(new)
    ready = asyncio.create_task(new.ready())
    assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER  # Accepting is in
    ready.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ready
    return old, new, sock, sent


@pytest.mark.parametrize("then", ["serve-on", "close"])
def test_a_ready_cancelled_after_confirming_still_takes_over(
        run: Runner, then: str, caplog: pytest.LogCaptureFixture) -> None:
    """The task awaiting ready() is cancelled after Accepting went out and
    before Released came (``wait_for`` while the old side is slow, a
    cancelled ``serve()``). The old side has committed and stops accepting
    for good: the successor must not be left half-way, holding the only
    listener with its control socket unserved, nor have close() send an
    Abort the old side no longer heeds. The confirmation runs on: the
    successor serves (its listener accepts, its control socket answers),
    and a close() finishes the confirmation first, then stops as the
    serving process."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        old, new, sock, sent = await a_cancelled_confirmation(name)
        port = _port(sock)
        await old.release()  # the old side stops accepting for good
        await old.close(cut=0)
        if then == "close":
            await asyncio.wait_for(new.close(), 10)
            assert sent == ["accepting"]  # no Abort
            assert "no release from the predecessor" not in caplog.text, caplog.text
            assert new.state is hotswap.State.STOPPED
            return
        await until(lambda: new.state is hotswap.State.SERVING, "v2 serving")
        st = await query_status(control_address(name))
        assert (st.pid, st.version, st.state) == (os.getpid(), "v2", "serving")
        assert_accepts(sock, port)
        sock.close()
        await new.close()
        assert sent == ["accepting"]

    run(main())


def test_an_unexpected_error_of_a_cancelled_confirmation_is_logged_with_its_traceback(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """ready() cancelled after Accepting went out, then the confirmation
    fails with an error that is no HotswapError (here its control socket
    was closed under it, as a bug elsewhere would: its listen() fails):
    nobody awaits it, so the ERROR line is its only report. It said
    ``OSError(9, 'Bad file descriptor')`` and nothing more; it carries the
    traceback, which says where."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        old, new, sock, _ = await a_cancelled_confirmation(name)
        assert new._control_sock is not None and new._confirming is not None
        new._control_sock.close()
        await old.release()
        await old.close(cut=0)
        await asyncio.wait({new._confirming})
        await until(lambda: "confirming the handover failed" in caplog.text,
                    "the confirmation's failure logged")
        sock.close()
        await asyncio.wait_for(new.close(), 10)

    run(main())
    failed = [r for r in caplog.records if "confirming the handover failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR, failed
    assert failed[0].exc_info is not None, failed[0]
    where = logging.Formatter().formatException(failed[0].exc_info)
    assert "in _confirm" in where and ".listen(" in where, where


def test_ready_again_after_a_cancelled_one_waits_for_the_same_confirmation(
        run: Runner) -> None:
    """ready() cancelled while confirming (``wait_for`` ran out: the old
    side was slow to release), then called again, as a caller retrying
    would: it started a second confirmation, whose Accepting our own
    protocol state refused; the successor stepped down beside a
    predecessor that had committed, and nobody accepted. The second call
    waits for the first confirmation: one Accepting, and v2 serves."""
    name = new_name()

    async def main() -> None:
        old, new, sock, sent = await a_cancelled_confirmation(name)
        port = _port(sock)
        again = asyncio.create_task(new.ready())
        # Let it get past its two yields to where it confirms (or, as it
        # did, sends a second Accepting) before the old side releases.
        for _ in range(5):
            await asyncio.sleep(0)
        await old.release()
        await asyncio.wait_for(again, 10)
        assert new.state is hotswap.State.SERVING
        assert sent == ["accepting"]
        assert not new._exit.done()  # type: ignore[union-attr]  # not stepped down
        assert_accepts(sock, port)
        sock.close()
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_release_after_a_cancelled_ready_waits_for_its_confirmation(run: Runner) -> None:
    """ready() cancelled while confirming, then the caller stops as the
    serving process (request_stop(), wait_exit(), release()) before the
    confirmation has its Released: the confirmation, ending after that
    release, made the process serving again (its serving marker bound, its
    control socket answering) although nobody accepted. release() now
    waits for the confirmation; the process stays stopped."""
    name = new_name()

    async def main() -> None:
        old, new, _, _ = await a_cancelled_confirmation(name)
        new.request_stop()
        assert await new.wait_exit() is hotswap.ExitReason.STOP_REQUESTED
        releasing = asyncio.create_task(new.release())
        await old.release()  # the confirmation's Released
        await asyncio.wait_for(releasing, 10)
        confirming = new._confirming
        assert confirming is not None and confirming.done()
        assert new.state is hotswap.State.DRAINING
        assert new._control_sock is None
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_ready_cancelled_before_its_confirmation_began_is_aborted_by_close(
        run: Runner) -> None:
    """close() called while ready() has created its confirmation task, but
    before that took its first step: nothing was sent, so the handover is
    still the successor's to abort, and close() does (Abort; the old side
    serves on) instead of first letting the confirmation send the Accepting
    that commits the old side."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        new = hotswap.Upgrader(name, version="v2", options=opts())
        assert await new.start() is hotswap.Role.TAKEOVER
        new.listen("http", ("127.0.0.1", 0))
        sent = recorded_sends(new)
        ready = asyncio.create_task(new.ready())
        # ready() yields twice before it confirms (a pending signal handler
        # may run first); the close() scheduled now takes its first step
        # right after ready() has created its confirmation, before that runs.
        for _ in range(2):
            await asyncio.sleep(0)
        closing = asyncio.create_task(new.close())
        await asyncio.wait_for(closing, 10)
        with pytest.raises(asyncio.CancelledError):  # its confirmation was called off
            await ready
        confirming = new._confirming
        assert confirming is not None and confirming.cancelled()  # the window was hit
        assert sent == ["abort"]
        assert new.state is hotswap.State.STOPPED
        await until(lambda: old.state is hotswap.State.SERVING, "v1 serving on")
        await old.close()

    run(main())


def test_a_ready_cancelled_before_its_confirmation_began_stays_called_off(
        run: Runner) -> None:
    """ready() cancelled after it created its confirmation task, before that
    took its first step (a cancelled ``serve()``, a TaskGroup sibling
    failing), and the caller leaves the usual way: it closes its server
    (``close_server()``, which yields to the loop on the stock one), runs
    more clean-up that yields (``serve()``: its runner's), then close().
    The confirmation ran in one of those yields and sent Accepting: the old
    side committed and stopped accepting, the new one closed, and nobody
    accepted. The cancel calls the confirmation off at once: nothing but
    an Abort goes out, the old side serves on."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        old_sock = old._listeners["http"].sock
        new = hotswap.Upgrader(name, version="v2", options=opts())
        assert await new.start() is hotswap.Role.TAKEOVER
        sock = new.listen("http", ("127.0.0.1", 0))
        server = await asyncio.start_server(lambda r, w: w.close(), sock=sock,
                                            start_serving=False)
        sent = recorded_sends(new)
        ready = asyncio.create_task(new.ready(start_serving=[server]))
        # ready() yields twice before it confirms; in its third step, just
        # before ours, it makes its confirmation task, whose first step
        # comes in the next iteration.
        for _ in range(3):
            await asyncio.sleep(0)
        assert new._confirming is not None and not new._accepting_sent
        ready.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ready
        await hotswap.close_server(server)
        for _ in range(3):  # the app's other clean-up, yielding to the loop
            await asyncio.sleep(0)
        await asyncio.wait_for(new.close(), 10)
        assert sent == ["abort"]
        assert not server.is_serving()
        await until(lambda: old.state is hotswap.State.SERVING, "v1 serving on")
        assert_accepts(old_sock, _port(old_sock))
        await old.close()

    run(main())


def test_a_close_waiting_for_a_cancelled_close_finishes_the_job(run: Runner) -> None:
    """Two close() calls while start() waits for a welcome that does not
    come (a control socket that never answers); the first is cancelled.
    The second used to return as soon as the first gave up, with nothing
    closed and start() still at work: it now carries on itself."""
    name = new_name()

    async def main() -> None:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.bind(sockaddr(control_address(name)))
        silent.listen(8)
        silent.setblocking(False)
        new = hotswap.Upgrader(name, version="v2", options=opts(message_timeout=1.0))
        starting = asyncio.create_task(new.start())
        accepted: list[socket.socket] = []

        def hello_sent() -> bool:
            try:
                accepted.append(silent.accept()[0])
            except BlockingIOError:
                return False
            return True

        try:
            await until(hello_sent, "start() to connect")
            first = asyncio.create_task(new.close())
            await until(lambda: new._closing is not None, "the first close() to begin")
            second = asyncio.create_task(new.close())
            await asyncio.sleep(0)  # its first step: it waits for the first
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            await asyncio.wait_for(second, 10)
            assert new.state is hotswap.State.STOPPED
            assert starting.done()
            with pytest.raises(hotswap.HandoverFailed):
                await starting
        finally:
            silent.close()
            for conn in accepted:
                conn.close()

    run(main())


def test_a_start_cancelled_during_its_hello_leaves_the_upgrader_starting(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """start() cancelled while it waits for the answer to its hello (an
    ``asyncio.wait_for`` around it, a serving process that is slow to
    answer): nothing was taken, but the upgrader stayed TAKING_OVER, so its
    status said "taking-over" for good and a ready() then failed with an
    AssertionError from its confirmation (logged as a failed handover)
    instead of saying what is wrong. It is back to STARTING: ready() is a
    HotswapError, close() ends it, and no descriptor is left."""
    name = new_name()

    async def main() -> None:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.bind(sockaddr(control_address(name)))
        silent.listen(8)
        silent.setblocking(False)
        accepted: list[socket.socket] = []

        def hello_arrived() -> bool:
            with contextlib.suppress(BlockingIOError):
                accepted.append(silent.accept()[0])
            return any(_readable(conn) for conn in accepted)

        try:
            before = set(os.listdir("/proc/self/fd"))
            new = hotswap.Upgrader(name, version="v2", options=opts())
            starting = asyncio.create_task(new.start())
            await until(hello_arrived, "start() to send its hello")
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
            assert state_now(new) is hotswap.State.STARTING
            assert new.status().state == "starting"
            with pytest.raises(hotswap.HotswapError, match="state starting"):
                await asyncio.wait_for(new.ready(), 10)
            assert "confirming the handover failed" not in caplog.text
            await asyncio.wait_for(new.close(), 10)
            assert new.state is hotswap.State.STOPPED
            while accepted:  # the serving process's end, not ours
                accepted.pop().close()
            await until(lambda: set(os.listdir("/proc/self/fd")) == before,
                        "no descriptor left")
        finally:
            silent.close()
            for conn in accepted:
                conn.close()

    run(main())


def test_a_ready_while_start_is_taking_over_says_so_and_changes_nothing(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """ready() called while start() is still taking over (its hello sent,
    the sockets not there yet: start() in a task of its own): the upgrader
    said TAKING_OVER already, so ready() made its confirmation, which found
    no channel to the predecessor. An AssertionError, logged as "confirming
    the handover failed", and that failed confirmation was the one every
    later ready() waited for: once start() had returned, ready() raised the
    same AssertionError and the takeover could never be confirmed. It now
    says start() has not returned, as listen() does then, and changes
    nothing: the takeover confirms as usual."""
    name = new_name()

    async def main() -> None:
        address = control_address(name)
        control = listeners.bind(address, backlog=8)
        listener = listeners.bind(("127.0.0.1", 0))
        channel: Channel | None = None
        new = hotswap.Upgrader(name, version="v2", options=opts())
        starting = asyncio.create_task(new.start())
        try:
            conn, _ = await asyncio.get_running_loop().sock_accept(control)
            channel = Channel(conn, Sender.SERVER)  # a predecessor by hand
            assert isinstance(await channel.receive(timeout=5), Hello)
            assert state_now(new) is hotswap.State.TAKING_OVER
            with pytest.raises(hotswap.HotswapError, match=r"^ready\(\) before start\(\) returned"):
                await asyncio.wait_for(new.ready(), 5)
            assert "confirming the handover failed" not in caplog.text
            entries = (listeners.describe("http", listener),
                       SocketInfo(name=hotswap.control.CONTROL_NAME, family="unix",
                                  kind="stream", address=address))
            await channel.send(Welcome(pid=os.getpid(), version="v1", count=2), timeout=5)
            await channel.send(Sockets(entries=entries,
                                       fds=(listener.fileno(), control.fileno())), timeout=5)
            assert await asyncio.wait_for(starting, 5) is hotswap.Role.TAKEOVER
            assert new.listen("http", listener.getsockname()).getsockname() == \
                listener.getsockname()
            ready = asyncio.create_task(new.ready())
            assert isinstance(await channel.receive(timeout=5), hotswap.protocol.Accepting)
            await channel.send(hotswap.protocol.Released(pid=os.getpid()), timeout=5)
            await asyncio.wait_for(ready, 5)
            assert new.state is hotswap.State.SERVING
        finally:
            if channel is not None:
                channel.close()
            listener.close()
            control.close()
            await new.close()
            await asyncio.gather(starting, return_exceptions=True)

    run(main())


def _readable(conn: socket.socket) -> bool:
    """Whether ``conn`` has bytes to read (a peek: nothing consumed)."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def test_a_stop_requested_before_start_is_kept(run: Runner) -> None:
    """A SIGTERM handled before start() (the handler is installed first,
    the program still loads its configuration): on a fresh start too,
    wait_exit() returns STOP_REQUESTED once serving, instead of waiting for
    a stop that was already asked for."""
    env = {"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "0"}

    async def main() -> None:
        upg = hotswap.Upgrader(new_name(), version="v1",
                               options=hotswap.Options(env=env, message_timeout=2.0))
        upg.request_stop()
        assert await upg.start() is hotswap.Role.FRESH
        upg.listen("http", ("127.0.0.1", 0))
        await upg.ready()
        reason = await asyncio.wait_for(upg.wait_exit(), 5)
        assert reason is hotswap.ExitReason.STOP_REQUESTED
        await upg.close()

    run(main())


def test_listen_before_start_says_so_instead_of_address_in_use(run: Runner) -> None:
    """listen() called before start() bound anew: it worked on a fresh
    start and, at the first upgrade, failed with "Address already in use"
    (the predecessor holds the port), naming the wrong cause. It now says
    to call start() first, binds nothing, and the upgrader takes over as
    usual once started. A ready() that early says so too (it said "in state
    starting")."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        port = port_of(old.status())
        new = hotswap.Upgrader(name, version="v2", options=opts())
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(hotswap.HotswapError, match=r"before start\(\).*call start\(\) first"):
            new.listen("http", ("127.0.0.1", port))
        with pytest.raises(hotswap.HotswapError, match=r"^ready\(\) before start\(\)"):
            await new.ready()  # was "ready() in state starting"
        assert len(os.listdir("/proc/self/fd")) == before
        assert await new.start() is hotswap.Role.TAKEOVER
        assert new.listen("http", ("127.0.0.1", port)).getsockname()[1] == port
        ready = asyncio.create_task(new.ready())
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        await old.release()
        await ready
        await old.close()
        await new.close()

    run(main())


def test_a_fresh_start_on_a_port_in_use_says_nobody_served_the_name(run: Runner) -> None:
    """A successor started under another name than the serving version's
    (a typo, a renamed sidecar) finds nobody to take over from, starts
    fresh and fails to bind: the error was only "Address already in use".
    It now names the control socket where nobody served."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        port = port_of(old.status())
        other = hotswap.Upgrader(name + "-x", version="v2", options=opts())
        assert await other.start() is hotswap.Role.FRESH
        with pytest.raises(hotswap.ListenerError,
                           match=rf"Address already in use \(no process served "
                                 rf"@hotswap/{name}-x to take it over from"):
            other.listen("http", ("127.0.0.1", port))
        await other.close()
        await old.close()

    run(main())


def test_a_wait_for_the_exit_ends_with_close(run: Runner) -> None:
    """A task waiting in wait_exit() (a serve loop) when the upgrader is
    closed from elsewhere waited forever: close() never told it."""
    env = {"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "0"}

    async def main() -> None:
        upg = hotswap.Upgrader(new_name(), version="v1", options=hotswap.Options(env=env))
        assert await upg.start() is hotswap.Role.FRESH
        upg.listen("http", ("127.0.0.1", 0))
        await upg.ready()
        waiting = asyncio.ensure_future(upg.wait_exit())
        await asyncio.sleep(0)  # it waits now
        assert not waiting.done()
        await upg.close()
        assert await asyncio.wait_for(waiting, 5) is hotswap.ExitReason.STOP_REQUESTED

    run(main())


def test_a_second_release_changes_nothing(run: Runner) -> None:
    """release() called again (in a ``finally``, say) sent Released again:
    the protocol refused it and the channel to the successor was closed, so
    no connection could be handed over any more and the successor took its
    predecessor for gone while it still drained (a third version would have
    been admitted). Only the first call counts."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        new = await taken_over(old, name, lambda listener, sock: sock.close())
        assert old.can_hand_over_connections
        await old.release()
        assert old.can_hand_over_connections
        third = hotswap.Upgrader(name, version="v3", options=opts(connect_timeout=0.3))
        with pytest.raises(hotswap.HandoverRefused, match="still draining") as refused:
            await third.start()
        assert refused.value.code == "busy"
        await third.close()
        st = await query_status(control_address(name))
        assert (st.version, st.predecessor) == ("v2", "draining")
        await old.close(cut=0)
        await until(lambda: new.status().predecessor == "gone", "v1 drained")
        await new.close()

    run(main())


def test_close_stops_a_start_that_is_still_retrying(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """close() while start() waits for a busy serving process (the caller
    gave up on it): start() took over afterwards, from a closed upgrader
    that then held the predecessor's descriptors, and the predecessor stayed
    handing over until another close(). Now close() stops it first: start()
    raises HandoverFailed, nothing is taken, nothing is left open, and the
    old side serves on (the next successor takes over)."""
    name = new_name()
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        before = set(os.listdir("/proc/self/fd"))
        blocker = hotswap.Upgrader(name, version="vb", options=opts())
        assert await blocker.start() is hotswap.Role.TAKEOVER  # old: handing over
        new = hotswap.Upgrader(name, version="v2", options=opts())
        starting = asyncio.create_task(new.start())
        await until(lambda: "serving process busy" in caplog.text, "v2 refused (busy)")
        await asyncio.wait_for(new.close(), 10)
        assert starting.done()  # close() waited for it to give up
        with pytest.raises(hotswap.HandoverFailed, match="closed"):
            await starting
        assert new.state is hotswap.State.STOPPED
        with pytest.raises(hotswap.HotswapError, match="after close"):
            await new.start()
        await blocker.close()  # the blocker gives up: old serves again
        await until(lambda: old.state is hotswap.State.SERVING, "v1 serving again")
        await until(lambda: set(os.listdir("/proc/self/fd")) == before,
                    "no descriptor left but v1's")
        st = await query_status(control_address(name))
        assert (st.version, st.state) == ("v1", "serving")
        later = await taken_over(old, name)
        await old.close(cut=0)
        await later.close()

    run(main())


@pytest.mark.parametrize(("field", "value"), [
    ("handover_timeout", float("nan")), ("handover_timeout", -1.0), ("handover_timeout", 0),
    ("message_timeout", float("nan")), ("message_timeout", 0.0), ("message_timeout", "5"),
    ("message_timeout", None), ("message_timeout", True),
    ("connect_timeout", float("inf")), ("connect_timeout", -0.5),
    ("predecessor_drain_timeout", float("inf")), ("predecessor_drain_timeout", 0),
])
def test_options_that_are_no_timeout_are_refused_up_front(field: str, value: object) -> None:
    """A timeout that is NaN, infinite, negative, not a number (or 0 where
    nothing could arrive in time) failed only at the first upgrade, each
    its own way ("within nans", uvloop's ValueError out of start(), a
    TypeError, no deadline at all): a ValueError naming the field now."""
    with pytest.raises(ValueError, match=f"Options.{field}=.* is not a finite number"):
        hotswap.Options(env={}, **{field: value})  # type: ignore[arg-type]


def test_a_connect_timeout_of_zero_is_one_attempt(run: Runner) -> None:
    """connect_timeout may be 0: no retry while the serving process is busy."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        first = hotswap.Upgrader(name, version="v2", options=opts())
        await first.start()  # old: handing over
        second = hotswap.Upgrader(name, version="v3", options=opts(connect_timeout=0))
        with pytest.raises(hotswap.HandoverRefused) as busy:
            await second.start()
        assert busy.value.code == "busy"
        await second.close()
        await first.close()
        await old.close()

    run(main())


def test_a_token_from_a_non_utf8_environment_works(run: Runner) -> None:
    """A token read from an environment variable holding bytes that are no
    UTF-8 (os.environ escapes them as lone surrogates): the same on both
    sides, yet every upgrade was refused "internal error", as the two were
    encoded with different error handlers. It is a token like any."""
    name = new_name()
    token = os.fsdecode(b"s3cr\xffet")
    assert token == "s3cr\udcffet"

    async def main() -> None:
        old = await serving_upgrader(name, "v1", token=token)
        new = await taken_over(old, name, token=token)
        thief = hotswap.Upgrader(name, version="v3", options=opts(token="s3cr\udcfeet"))
        with pytest.raises(hotswap.HandoverRefused) as refused:
            await thief.start()
        assert refused.value.code == "forbidden"
        await thief.close()
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_version_or_token_too_long_for_the_hello_is_refused_up_front(run: Runner) -> None:
    """The hello carries the version and the token in one frame of at most
    16 KiB: longer ones got every takeover refused ("frame length ...
    outside 1..16384"), found only at the first upgrade. A ValueError
    naming the field now, at construction; the longest allowed take over."""
    with pytest.raises(ValueError, match=r"^version is too long: 20000 characters"):
        hotswap.Upgrader(new_name(), version="v" * 20000, options=opts())
    with pytest.raises(ValueError, match=r"^version is too long: 1000 characters, 6000 bytes"):
        hotswap.Upgrader(new_name(), version="\u00e9" * 1000, options=opts())
    with pytest.raises(ValueError, match=r"^Options\.token is too long"):
        opts(token="t" * 20000)
    with pytest.raises(ValueError, match=r"^version must be a str"):
        hotswap.Upgrader(new_name(), version=2, options=opts())  # type: ignore[arg-type]
    name = new_name()
    longest = "t" * hotswap.upgrader.MAX_TOKEN_BYTES

    async def main() -> None:
        old = await serving_upgrader(name, "1" * hotswap.upgrader.MAX_VERSION_BYTES,
                                     token=longest)
        new = await taken_over(old, name, version="2" * hotswap.upgrader.MAX_VERSION_BYTES,
                               token=longest)
        await old.close(cut=0)
        await new.close()

    run(main())


def test_a_control_socket_that_cannot_be_bound_says_why(run: Runner, tmp_path: Path) -> None:
    """Every failure to bind the control socket was reported as "another
    process already serves" it: a name too long for a Unix address (now a
    ValueError when the Upgrader is made), a control_path in a folder that
    does not exist, a path that is a plain file. That hint now comes only
    when the address is in use; otherwise the error says what failed.
    Nothing is left open."""
    fresh = {"SIDECARSET_VERSION": "1", "SIDECARSET_VERSION_ALT": "0"}
    plain = tmp_path / "not-a-socket"
    plain.write_text("data")
    taken = new_name()

    async def failure(name: str, **kw: object) -> str:
        upg = hotswap.Upgrader(name, version="v1", options=hotswap.Options(
            env=fresh, message_timeout=2.0, **kw))  # type: ignore[arg-type]
        with pytest.raises(hotswap.ListenerError) as info:
            await upg.start()
        await upg.close()
        return str(info.value)

    async def main() -> None:
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError, match="too long for a Unix socket"):  # at once
            hotswap.Upgrader("x" * 120, options=hotswap.Options(env=fresh))
        message = await failure("ok", control_path=str(tmp_path / "missing" / "ctl.sock"))
        assert "No such file or directory" in message, message
        assert "already serves" not in message, message
        message = await failure("ok", control_path=str(plain))
        assert "no socket" in message and "already serves" not in message, message
        serving = await serving_upgrader(taken, "v1")
        message = await failure(taken)
        assert f"another process already serves {taken!r}" in message, message
        await serving.close()
        assert len(os.listdir("/proc/self/fd")) == before

    run(main())
    assert plain.read_text() == "data"


def test_a_control_connection_queued_as_the_accept_loop_stops_stays_queued() -> None:
    """When the old side stops accepting control connections (at its
    commit, or close()), a peer that connected at that instant (a probe,
    the hook) must not be accepted and dropped: it stays in the kernel's
    queue, for the successor that holds the same socket, or is refused when
    the last copy closes.

    The interleaving is reached on the stock loop only, which runs a poll's
    I/O callbacks before the timers due: the accept loop's reader sees the
    probe, then the timer cancels the loop (what the commit's
    ``_stop_control`` does) before its task resumes. ``loop.sock_accept``
    accepts in that callback, so its connection was lost with the
    cancellation."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        task = old._control_task
        assert task is not None
        await asyncio.sleep(0)  # the accept loop finds its queue empty and polls
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(sockaddr(control_address(name)))  # queued: the loop polls next
        asyncio.get_running_loop().call_later(0, task.cancel)
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        control = old._control_sock
        assert control is not None
        control.setblocking(True)
        control.settimeout(1.0)
        conn, _ = control.accept()  # the probe, still queued
        conn.close()
        probe.close()
        await old.close()

    asyncio.run(main())


def test_a_control_connection_accepted_as_the_old_side_commits_stays_queued(
        run: Runner) -> None:
    """The same with every control slot taken (15 idle peers and the
    successor's handover): the accept loop accepted a newcomer, then
    awaited letting an idle peer go to make room for it; cancelled there by
    the commit's ``_stop_control``, it closed the connection it had just
    taken from the shared queue. The probe (or hook, or next successor)
    read EOF instead of staying queued for the successor."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1", message_timeout=30.0)
        address = sockaddr(control_address(name))
        idle = []
        for _ in range(15):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(address)
            idle.append(peer)
        await until(lambda: len(old._silent) == 15, "15 idle control peers handled")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        channel = Channel(sock, Sender.CLIENT)
        hello = Hello(pid=os.getpid(), version="v2", rank=None, token="", capabilities=())
        assert isinstance(await channel.request(hello, timeout=5), Welcome)
        chunk = await channel.receive(timeout=5)
        assert isinstance(chunk, Sockets)
        control = None  # the successor's copy of the control socket: kept
        for entry, fd in zip(chunk.entries, chunk.fds, strict=True):
            if entry.name == hotswap.control.CONTROL_NAME:
                control = socket.socket(fileno=fd)
            else:
                os.close(fd)
        assert control is not None and len(old._handlers) == 16
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(address)  # queued first: the accept loop runs first
        await channel.send(hotswap.protocol.Accepting(), timeout=5)
        assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
        control.settimeout(2.0)
        conn, _ = control.accept()  # the probe, still queued for the successor
        conn.close()
        probe.close()
        control.close()
        for peer in idle:
            peer.close()
        channel.close()
        await old.close(cut=0)

    run(main())


def test_no_marker_for_a_confirmation_the_predecessor_gave_up_on(run: Runner) -> None:
    """A successor slower than its predecessor's handover_timeout: the
    predecessor has answered Failed (and closed) before the confirmation is
    sent. The successor steps down on reading it, and must not bind its
    serving marker meanwhile: the PostStart hook (migrate.sh, wait-ready)
    reads the marker as "the handover is the new version's" and would
    succeed for a handover that failed."""
    name = new_name()
    seen: list[set[int]] = []

    def kruise(version: int, alt: int, **kw: object) -> hotswap.Options:
        env = {"SIDECARSET_VERSION": str(version), "SIDECARSET_VERSION_ALT": str(alt)}
        return hotswap.Options(env=env, message_timeout=2.0, **kw)  # type: ignore[arg-type]

    async def main() -> None:
        old = hotswap.Upgrader(name, version="v1", options=kruise(1, 0, handover_timeout=0.2))
        await old.start()
        old.listen("http", ("127.0.0.1", 0))
        await old.ready()
        new = hotswap.Upgrader(name, version="v2", options=kruise(2, 1))
        mark = new._mark_serving

        def spy(serving: bool) -> None:
            mark(serving)
            seen.append(ranks(name))

        new._mark_serving = spy  # type: ignore[method-assign]
        assert await new.start() is hotswap.Role.TAKEOVER
        new.listen("http", ("127.0.0.1", 0))
        await until(lambda: old.state is hotswap.State.SERVING, "v1 gave up on v2")
        with pytest.raises(hotswap.HandoverFailed, match="abandoned"):
            await new.ready()
        assert await new.wait_exit() is hotswap.ExitReason.HANDOVER_FAILED
        assert seen and all(2 not in ranks_then for ranks_then in seen), seen
        assert ranks(name) == {1}
        await new.close()
        await old.close()

    run(main())


async def a_server(sock: socket.socket, answered: list[str]) -> asyncio.AbstractServer:
    """A server on ``sock`` made not accepting yet (``start_serving=False``)
    that notes each connection it gets in ``answered`` and closes it."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered.append("v2")
        writer.close()

    return await asyncio.start_server(handle, sock=sock, backlog=1024, start_serving=False)


def test_ready_starts_the_servers_as_the_successor_confirms(run: Runner) -> None:
    """``ready(start_serving=[server])``: a server made with
    ``start_serving=False`` accepts nothing until the successor confirms,
    and accepts by the time the predecessor has read the confirmation; a
    connection queued meanwhile is not lost (the shared queue keeps it)."""
    name = new_name()

    async def main() -> None:
        async with a_successor_with_a_queued_connection(name) as (
                old, new, server, _, answered):
            for _ in range(3):
                await asyncio.sleep(0)  # a server accepting would have it by now
            assert not server.is_serving() and answered == []
            ready = asyncio.create_task(new.ready(start_serving=[server]))
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            assert server.is_serving()  # before the predecessor stops accepting
            await old.release()
            await ready
            await until(lambda: answered == ["v2"], "the queued connection accepted")

    run(main())


@contextlib.asynccontextmanager
async def a_successor_with_a_queued_connection(
        name: str, **old_options: object
) -> AsyncIterator[tuple[hotswap.Upgrader, hotswap.Upgrader, asyncio.AbstractServer,
                         socket.socket, list[str]]]:
    """A serving v1 and a v2 taking over from it, whose server on the
    inherited listener is made not accepting (:func:`a_server`), and a
    client connection queued on that listener: (v1, v2, the server, the
    client, what the server answered). All closed at the end."""
    old = await serving_upgrader(name, "v1", **old_options)
    new = hotswap.Upgrader(name, version="v2", options=opts())
    assert await new.start() is hotswap.Role.TAKEOVER
    sock = new.listen("http", ("127.0.0.1", 0))
    answered: list[str] = []
    server = await a_server(sock, answered)
    client = socket.create_connection(sock.getsockname(), timeout=5)
    try:
        yield old, new, server, client, answered
    finally:
        client.close()
        await hotswap.close_server(server)
        await new.close()
        await old.close()


async def the_queued_one_is_the_predecessors(
        old: hotswap.Upgrader, new: hotswap.Upgrader, server: asyncio.AbstractServer,
        client: socket.socket, answered: list[str]) -> None:
    """After ``new`` backed out: once it is closed, ``old`` serves again and
    accepts the connection ``client`` queued meanwhile, which ``new``'s
    server never answered."""
    old_sock = old._listeners["http"].sock
    await hotswap.close_server(server)
    await new.close()
    await until(lambda: old.state is hotswap.State.SERVING, "v1 serving again")
    old_sock.setblocking(False)
    async with asyncio.timeout(5):  # the queued one
        conn, peer = await asyncio.get_running_loop().sock_accept(old_sock)
    assert peer == client.getsockname()
    conn.close()
    assert answered == []


@pytest.mark.parametrize("when", ["before-ready", "as-the-confirmation-begins",
                                  "after-the-predecessor-gave-up"])
def test_a_successor_that_backs_out_never_starts_its_servers(run: Runner,
                                                             when: str) -> None:
    """The servers given to ready() stay not accepting when the successor
    aborts (a stop requested before it confirms, also in the iteration
    before the confirmation's first step), or steps down because the
    predecessor gave up on it first (its handover_timeout: Failed before
    our confirmation). A connection queued meanwhile stays in the shared
    queue, for the predecessor, which serves on: nothing accepted by a
    process that backs out (it would have to drain it, and be stopped)."""
    name = new_name()

    async def main() -> None:
        async with a_successor_with_a_queued_connection(name, handover_timeout=0.3) as (
                old, new, server, client, answered):
            if when == "before-ready":
                new.request_stop()
            elif when == "as-the-confirmation-begins":
                confirm = new._confirm

                async def stopped_first() -> None:
                    new.request_stop()
                    await confirm()

                new._confirm = stopped_first  # type: ignore[method-assign]
            else:
                await until(lambda: old.state is hotswap.State.SERVING, "v1 gave up on v2")
            with pytest.raises(hotswap.HandoverFailed,
                               match="abandoned" if when.startswith("after") else "aborted"):
                await new.ready(start_serving=[server])
            assert not server.is_serving()
            await the_queued_one_is_the_predecessors(old, new, server, client, answered)

    run(main())


class _WaitingServer(asyncio.AbstractServer):
    """A server (of some other library) whose ``start_serving()`` waits for
    something: hotswap cannot start it in one step (a TypeError)."""

    def is_serving(self) -> bool:
        return False

    async def start_serving(self) -> None:
        await asyncio.sleep(0)

    def close(self) -> None:
        pass

    # As asyncio.AbstractServer's own (typeshed declares them abstract).
    def get_loop(self) -> asyncio.AbstractEventLoop:
        raise NotImplementedError

    async def serve_forever(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        raise NotImplementedError


class _FailingServer(_WaitingServer):
    """A server (of some other library) whose ``start_serving()`` fails
    at once with an error of its own."""

    async def start_serving(self) -> None:
        raise RuntimeError("this server cannot start")


@pytest.mark.parametrize("failing", [_WaitingServer, _FailingServer])
def test_a_server_that_cannot_start_leaves_the_others_not_accepting(
        run: Runner, failing: type[asyncio.AbstractServer]) -> None:
    """Of the servers given to ready(), one that cannot start aborts the
    handover (the predecessor serves on), and those started before it in
    that same step stop again before the loop runs: a connection queued
    meanwhile is the predecessor's, not accepted by a process that backs
    out (ready()'s word: servers of a HandoverFailed were not started).
    Whatever the failing one raises: a RuntimeError of its own (no OSError,
    no TypeError) escaped the confirmation, the one started before it
    accepted the queued connection, and the upgrader stayed taking-over."""
    name = new_name()

    async def main() -> None:
        async with a_successor_with_a_queued_connection(name) as (
                old, new, server, client, answered):
            with pytest.raises(hotswap.HandoverFailed, match="starting our servers failed"):
                await new.ready(start_serving=[server, failing()])
            assert not server.is_serving()
            for _ in range(3):
                await asyncio.sleep(0)  # a server accepting would have it by now
            await the_queued_one_is_the_predecessors(old, new, server, client, answered)

    run(main())


def test_a_fresh_start_serves_at_once_and_ready_checks_its_servers(run: Runner) -> None:
    """With no predecessor, ready() starts the servers at once (nobody to
    lose a connection to). Anything that is no server is a TypeError, before
    ready() does anything: it may then be called as it should be."""
    name = new_name()

    async def main() -> None:
        upg = hotswap.Upgrader(name, version="v1", options=opts())
        assert await upg.start() is hotswap.Role.FRESH
        sock = upg.listen("http", ("127.0.0.1", 0))
        answered: list[str] = []
        server = await a_server(sock, answered)
        try:
            with pytest.raises(TypeError, match="takes servers"):
                await upg.ready(start_serving=[sock])  # type: ignore[list-item]
            assert upg.state is hotswap.State.STARTING and not server.is_serving()
            await upg.ready(start_serving=[server])
            assert server.is_serving() and state_now(upg) is hotswap.State.SERVING
            with socket.create_connection(sock.getsockname(), timeout=5):
                await until(lambda: answered == ["v2"], "the connection accepted")
        finally:
            await hotswap.close_server(server)
            await upg.close()

    run(main())


def test_a_server_started_before_ready_still_works(run: Runner) -> None:
    """Backward compatibility: a server that accepts from its start (no
    ``start_serving=False``), then ready() without servers, takes over as
    before (it accepts from its start, before confirming)."""
    name = new_name()

    async def main() -> None:
        old = await serving_upgrader(name, "v1")
        new = hotswap.Upgrader(name, version="v2", options=opts())
        assert await new.start() is hotswap.Role.TAKEOVER
        sock = new.listen("http", ("127.0.0.1", 0))
        answered: list[str] = []
        server = await a_server(sock, answered)
        await server.start_serving()
        try:
            ready = asyncio.create_task(new.ready())
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            await old.release()
            await ready
            assert new.state is hotswap.State.SERVING
            with socket.create_connection(sock.getsockname(), timeout=5):
                await until(lambda: answered == ["v2"], "the connection accepted")
        finally:
            await hotswap.close_server(server)
            await new.close()
            await old.close()

    run(main())


def test_a_title_longer_than_the_command_line_is_cut_and_shows_no_environment() -> None:
    """A title longer than the command line's bytes is cut to them less
    one, which stays NUL: a last byte that is not makes the kernel take the
    process for one using setproctitle(3), and ps then shows what follows
    the command line, the environment (its first variable, here), after
    the title. ``comm`` is the title's first 15 bytes. A real interpreter
    with a short command line (its program read from stdin), the title read
    back as ps reads it."""
    repo = str(Path(__file__).resolve().parent.parent)
    name = "n" * 80
    probe = (f"import sys; sys.path.insert(0, {repo!r})\n"
             "import psutil, hotswap\n"
             f"hotswap.Upgrader({name!r}, version='v1', options=hotswap.Options(env={{}}))\n"
             "print(repr(psutil.Process().cmdline()))\n"
             "print(repr(open('/proc/self/comm').read()))\n")
    env = {"A_FIRST_VARIABLE": "from-the-environment", **child_env()}
    out = subprocess.run([sys.executable, "-"], input=probe, capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out
    room = len(os.fsencode(sys.executable)) + len(b"\0-\0") - 1
    title = f"hotswap[{name}] v1 starting"
    assert len(title) > room
    assert out.stdout == repr([title[:room]]) + "\n" + repr(title[:15] + "\n") + "\n", out


@pytest.mark.parametrize("case", ["first-variable-changed", "empty-environment",
                                  "long-command-line"])
def test_the_process_title_is_set_whatever_the_environment(case: str) -> None:
    """An Upgrader names its process (ps shows ``hotswap[NAME] VERSION
    STATE``, and a Kruise pod's two slots tell apart by it). python-prctl's
    ``set_proctitle()``, which did it, finds the command line by walking
    back from the C ``environ`` and dereferences a null pointer where that
    fails: an Upgrader made after the program changed its first environment
    variable (PATH, often), in an empty environment or under a command line
    over 8 KiB killed its process with SIGSEGV (found when a test's
    ``monkeypatch.setenv`` had changed the pytest process's first one). A
    real interpreter each time, the title read back as ps reads it."""
    repo = str(Path(__file__).resolve().parent.parent)
    probe = (f"import os, sys; sys.path.insert(0, {repo!r})\n"
             "import psutil, hotswap\n"
             "if os.environ:\n"
             "    os.environ[next(iter(os.environ))] = 'changed by the program'\n"
             "hotswap.Upgrader('title', version='v1', options=hotswap.Options(env={}))\n"
             "print(' '.join(psutil.Process().cmdline()).strip())\n")
    env = {} if case == "empty-environment" else child_env()
    extra = ["a" * 9000] if case == "long-command-line" else []
    out = subprocess.run([sys.executable, "-c", probe, *extra], capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out
    assert out.stdout == "hotswap[title] v1 starting\n", out
