"""hotswap.aiohttp.serve in one process, on real sockets and real aiohttp
servers, under the stock loop and uvloop: what the drain does with
connections that are not plain HTTP/1.1 on TCP, and with one accepted just
as the stop comes. Two versions here are two serve() calls on one loop
(each with its own Upgrader), which is what two processes run."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import uvloop
from aiohttp import web
from aiohttp.typedefs import Handler
from conftest import Procs, Runner, child_env, port_of, tracked_connection, until, wait_for
from conftest import keepalive_get as request
from conftest import serving as serving_process

import hotswap
import hotswap.aiohttp
import hotswap.migrate
from hotswap.listeners import Address
from hotswap.protocol import MAX_FDS_PER_FRAME

BIG = 16 << 20  # more than the kernel buffers of a loopback connection hold

LOOPS: dict[str, Runner] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """The loop to run a test under; no descriptor may be left after it."""
    runner = LOOPS[request.param]

    async def nothing() -> None:
        pass

    runner(nothing())  # uvloop's first run keeps a signal pipe for good
    before = set(os.listdir("/proc/self/fd"))
    yield runner
    # Names, not numbers (a listing's own descriptor comes and goes).
    left = {fd for fd in set(os.listdir("/proc/self/fd")) - before
            if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not left, [os.readlink(f"/proc/self/fd/{fd}") for fd in left]


def app_of(version: str, gate: asyncio.Event | None = None,
           entered: asyncio.Event | None = None) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"version({version})")

    async def held(request: web.Request) -> web.Response:
        # Read the body (if any), then answer once the test opens the gate.
        body = await request.read()
        assert gate is not None
        if entered is not None:
            entered.set()
        await gate.wait()
        return web.Response(text=f"version({version}) read {len(body)}")

    async def read(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"version({version}) read {len(body)}")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"{version} {message.data}")
        return ws

    async def big(request: web.Request) -> web.Response:
        # Buffer the whole body instead of waiting for the client to read it:
        # the handler is done while most of its response is still ours.
        assert request.transport is not None
        request.transport.set_write_buffer_limits(high=2 * BIG)
        return web.Response(body=version.encode().ljust(BIG, b"."))

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/ws", echo)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/held", held)
    app.router.add_route("*", "/read", read)
    return app


def start(name: str, version: str, sockets: dict[str, Address],
          drain_timeout: float = 10.0, gate: asyncio.Event | None = None,
          **kwargs: Any) -> tuple[hotswap.Upgrader, asyncio.Task[int]]:
    """One version serving (a task): no signal handlers, no nice 19 for this
    thread after the drain. ``gate`` holds the answers of ``/held``;
    ``kwargs`` go to serve()."""
    upgrader = hotswap.Upgrader(name, version=version, options=hotswap.Options(env={}))
    task = asyncio.create_task(hotswap.aiohttp.serve(
        app_of(version, gate), upgrader, sockets, drain_timeout=drain_timeout,
        handle_signals=False, yield_cpu_after_drain=False, **kwargs))
    return upgrader, task


def serving(upgrader: hotswap.Upgrader) -> Callable[[], bool]:
    return lambda: upgrader.state is hotswap.State.SERVING


async def serve_v1(app: web.Application, **kwargs: Any) -> tuple[hotswap.Upgrader,
                                                                 asyncio.Task[int]]:
    """``app`` served as v1 under a fresh name on 127.0.0.1 (a task, no
    signal handlers, no nice 19 after the drain), once it serves."""
    upgrader = hotswap.Upgrader(f"s-{uuid.uuid4().hex[:10]}", version="v1",
                                options=hotswap.Options(env={}))
    task = asyncio.create_task(hotswap.aiohttp.serve(
        app, upgrader, {"http": ("127.0.0.1", 0)}, handle_signals=False,
        yield_cpu_after_drain=False, **kwargs))
    await until(serving(upgrader), "v1 serving")
    return upgrader, task


async def stop_serving(upgrader: hotswap.Upgrader, task: asyncio.Task[int]) -> None:
    """Stop a version the test started; it drains and returns 0."""
    upgrader.request_stop()
    assert await asyncio.wait_for(task, 15) == 0


def test_a_connection_accepted_as_the_stop_comes_is_answered(run: Runner) -> None:
    """A connection arrives right after the stop is asked for: the loop
    accepts it in the iteration in which the stop reaches serve()'s task,
    and it is answered (the stock loop attaches a connection to its server
    an iteration after accepting it, and one whose server had been closed
    in between used to be dropped: the client saw a reset)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        upgrader, task = start(f"s-{uuid.uuid4().hex[:10]}", "v1",
                               {"http": ("127.0.0.1", 0)})
        await until(serving(upgrader), "v1 serving")
        port = port_of(upgrader.status())
        client = socket.socket()
        sent = asyncio.Event()

        def stop_then_connect() -> None:
            upgrader.request_stop()  # serve() resumes two iterations later
            client.connect(("127.0.0.1", port))  # the next iteration accepts it
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sent.set()

        loop.call_soon(stop_then_connect)
        await sent.wait()
        client.setblocking(False)
        try:
            async with asyncio.timeout(10):
                answer = await loop.sock_recv(client, 4096)
        finally:
            client.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"version(v1)"), answer
        assert await asyncio.wait_for(task, 15) == 0

    run(main())


@pytest.mark.parametrize("closing", ["close_server", "server.close"])
def test_close_server_answers_a_connection_accepted_just_before(run: Runner, closing: str) -> None:
    """The low-level lifecycle (README, tests/support/tiny_server.py) on a
    plain asyncio server: the stop comes after the loop has accepted a
    connection and before it has attached it to its server (the stock loop
    does that an iteration later). hotswap.close_server() answers it.
    server.close(), which the README said, drops it on the stock loop (the
    client sees EOF or a reset: a lost request at each handover under
    new-connection load); uvloop attaches a connection as it accepts it."""
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, sock=hotswap.listeners.bind(("127.0.0.1", 0)))
        port = server.sockets[0].getsockname()[1]
        client = socket.socket()
        accepted = loop.create_future()

        def connect() -> None:
            client.connect(("127.0.0.1", port))  # the next iteration accepts it, ...
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            # ... after running this: the test resumes an iteration later,
            # before the task that attaches the connection.
            loop.call_soon(accepted.set_result, None)

        loop.call_soon(connect)
        await accepted
        if closing == "close_server":
            await hotswap.close_server(server)
        else:
            server.close()
        dropped = closing == "server.close" and not isinstance(loop, uvloop.Loop)
        for _ in range(5):  # the attaching task has run (or failed) ...
            await asyncio.sleep(0)
        # ... and a connection it dropped is closed now, not left to the GC
        # (which tells: "unclosed transport").
        unraisable: list[Any] = []
        hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
        try:
            with pytest.warns(ResourceWarning, match="unclosed") if dropped \
                    else contextlib.nullcontext():
                gc.collect()
        finally:
            sys.unraisablehook = hook
        # Python 3.13 (CPython gh-109564): the dropped transport's __del__ also
        # detaches it from the closed server, which wakes its waiters a second
        # time: a TypeError, printed ("Exception ignored in"), never raised.
        assert all(dropped and sys.version_info >= (3, 13)
                   and isinstance(u.exc_value, TypeError) for u in unraisable), \
            [(u.exc_value, u.object) for u in unraisable]
        client.setblocking(False)
        try:
            async with asyncio.timeout(10):
                answer = await loop.sock_recv(client, 4096)
        except ConnectionResetError:
            answer = b"reset"
        finally:
            client.close()
        if dropped:  # shows that the test reaches the window close_server() is for
            assert answer in (b"", b"reset"), answer
        else:
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), answer

    run(main())


def test_close_server_leaves_a_unix_socket_path_to_the_successor(
        run: Runner, tmp_path: Path) -> None:
    """The low-level lifecycle on a Unix listener served with
    asyncio.start_unix_server(): from Python 3.13 on, closing such a
    server removes its socket's file (cleanup_socket, stock loop and
    uvloop), and the successor, which listens on the same socket, could no
    longer be reached by its path. hotswap.close_server() leaves the path
    (and no file of its own) behind."""
    path = str(tmp_path / "uds.sock")

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        sock = hotswap.listeners.bind(path)
        successor = socket.socket(fileno=os.dup(sock.fileno()))  # its copy
        try:
            server = await asyncio.start_unix_server(handle, sock=sock)
            await hotswap.close_server(server)
            assert sorted(os.listdir(tmp_path)) == ["uds.sock"]
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            try:
                async with asyncio.timeout(5):
                    await loop.sock_connect(client, path)
                    conn, _ = await loop.sock_accept(successor)
                conn.close()
            finally:
                client.close()
        finally:
            successor.close()

    run(main())


def test_close_server_leaves_a_unix_socket_path_uvloop_was_told_to_clean_up(
        tmp_path: Path) -> None:
    """uvloop takes ``cleanup_socket=True`` on every Python (its default
    only from 3.13 on). Before 3.13, close_server() let such a server remove
    its socket's file: it kept paths on 3.13 alone."""
    path = str(tmp_path / "uds.sock")

    async def main() -> None:
        sock = hotswap.listeners.bind(path)
        cleanup: dict[str, Any] = {"cleanup_socket": True}  # in no stub before 3.13's
        server = await asyncio.get_running_loop().create_unix_server(
            asyncio.Protocol, sock=sock, **cleanup)
        await hotswap.close_server(server)
        assert sorted(os.listdir(tmp_path)) == ["uds.sock"]

    uvloop.run(main())


@pytest.mark.parametrize(("given", "error"), [
    ({"drain_timeout": "5"}, TypeError), ({"drain_timeout": float("nan")}, ValueError),
    ({"drain_timeout": float("inf")}, ValueError), ({"drain_timeout": -1}, ValueError),
    ({"cleanup_timeout": "3"}, TypeError), ({"cleanup_timeout": True}, TypeError),
    ({"on_drain": "close websockets"}, TypeError),
    ({"sockets": {"http": ("127.0.0.1", 0), "admin": b"/tmp/admin.sock"}},
     hotswap.ListenerError),
    ({"sockets": {}}, ValueError),
], ids=repr)
def test_serve_refuses_what_it_cannot_use_before_anything_is_bound(
        run: Runner, given: dict[str, Any], error: type[Exception]) -> None:
    """drain_timeout="5" (read from the environment, say) used to serve as
    if all was well; the first upgrade then failed in the drain with a
    TypeError that cut the request in flight, exit status 1. serve() now
    says what is wrong as it starts: nothing bound, no signal handler left
    on the loop, the upgrader untouched (it serves afterwards). No sockets
    at all is refused too: it served nothing, and as a successor it took
    over and dropped every listener of the version it replaced."""
    match = ("serve\\(\\): admin: " if given.get("sockets") else
             "serve\\(\\): sockets is empty" if "sockets" in given else
             f"serve\\(\\): .*{next(iter(given))}")
    refused_before_anything_is_bound(run, given, error, match)


_SERVER_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: never served


@pytest.mark.parametrize(("ssl_context", "error", "match"), [
    ("/etc/tls/cert.pem", TypeError, "must be an ssl.SSLContext or a mapping"),
    ({"https": _SERVER_TLS}, ValueError, "names 'https', which is not one of the sockets"),
    ({"http": "/etc/tls/cert.pem"}, TypeError, "for 'http' must be an ssl.SSLContext"),
    ({"http": ssl.create_default_context()}, ValueError, "for 'http' is a client context"),
    (ssl.create_default_context(), ValueError, "for 'http' is a client context"),
], ids=["a-path", "a-name-not-served", "a-path-for-a-name", "a-client-context-for-a-name",
        "a-client-context"])
def test_serve_refuses_an_ssl_context_it_cannot_use_before_anything_is_bound(
        run: Runner, ssl_context: object,
        error: type[Exception], match: str) -> None:
    """ssl_context is checked with the other arguments: a certificate's
    path where a context belongs, a listener name that is not served (a
    typo would otherwise serve that listener in plain HTTP), a client
    context (every handshake would fail). Nothing bound, the upgrader
    untouched."""
    refused_before_anything_is_bound(run, {"ssl_context": ssl_context}, error,
                                     f"serve\\(\\): ssl_context .*{match}")


def refused_before_anything_is_bound(run: Runner,
                                     given: dict[str, Any], error: type[Exception],
                                     match: str) -> None:
    """serve(**given) raises ``error`` (``match``) on 127.0.0.1 port 0 as
    it starts, leaving no signal handler and the upgrader as it was: it
    serves afterwards."""
    import signal

    async def main() -> None:
        loop = asyncio.get_running_loop()
        upgrader = hotswap.Upgrader(f"s-{uuid.uuid4().hex[:10]}", version="v1",
                                    options=hotswap.Options(env={}))
        kwargs = dict(given)
        sockets = kwargs.pop("sockets", {"http": ("127.0.0.1", 0)})
        with pytest.raises(error, match=match):
            await asyncio.wait_for(hotswap.aiohttp.serve(
                app_of("v1"), upgrader, sockets, yield_cpu_after_drain=False, **kwargs), 5)
        assert not loop.remove_signal_handler(signal.SIGTERM)
        assert upgrader.state is hotswap.State.STARTING and upgrader.role is None
        task = asyncio.create_task(hotswap.aiohttp.serve(
            app_of("v1"), upgrader, {"http": ("127.0.0.1", 0)}, handle_signals=False,
            yield_cpu_after_drain=False))
        await until(serving(upgrader), "v1 serving")
        await stop_serving(upgrader, task)

    run(main())


def test_unix_socket_connections_drain_the_safe_way(run: Runner, tmp_path: Path) -> None:
    """Idle keep-alive connections of a Unix-socket listener cannot move
    (the successor adopts TCP connections only): they stay with v1, whose
    next response on each says Connection: close; none is closed under its
    client. TCP connections of the same server still move."""
    async def main() -> None:
        name, path = f"s-{uuid.uuid4().hex[:10]}", str(tmp_path / "http.sock")
        sockets: dict[str, Address] = {"unix": path, "tcp": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets)
        await until(serving(v1), "v1 serving")
        port = int(next(i.address for i in v1.status().listeners
                        if i.name == "tcp").rsplit(":", 1)[1])
        unix = [await asyncio.open_unix_connection(path) for _ in range(3)]
        tcp = await asyncio.open_connection("127.0.0.1", port)
        try:
            for reader, writer in (*unix, tcp):
                assert (await request(reader, writer)).endswith(b"version(v1)")
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            for reader, writer in unix:
                second = await request(reader, writer)
                assert b"connection: close" in second and second.endswith(b"version(v1)"), \
                    second
            assert (await request(*tcp)).endswith(b"version(v2)")  # moved, not told to close
        finally:
            for _, writer in (*unix, tcp):
                writer.close()
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())


def test_a_response_still_being_sent_keeps_its_connection_with_v1(run: Runner) -> None:
    """A connection whose last response is still in v1's send buffer does
    not move: v2 writing on it meanwhile could cut into that response. The
    next request on it is answered by v1; once everything is sent, the
    connection moves, and the one after is answered by v2."""
    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets)
        await until(serving(v1), "v1 serving")
        port = port_of(v1.status())
        # A fixed receive buffer (no autotuning: up to 32 MiB here) and the
        # reader's default limit (it stops at 128 KiB unless asked): nearly
        # all of the big response stays in v1's buffer until we read it.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
            assert f"content-length: {BIG}".encode() in head
            v2, v2_task = start(name, "v2", sockets)  # we read no more meanwhile
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                body = await reader.readexactly(BIG)
            assert body == b"v1".ljust(BIG, b"."), "the big response arrived whole"
            # Sent just before it was all out: answered by v1, not by v2.
            async with asyncio.timeout(10):
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                assert await reader.readexactly(length) == b"version(v1)"
            # Then it moves (v1's drain ends with its last connection gone).
            assert await asyncio.wait_for(v1_task, 15) == 0
            assert (await request(reader, writer)).endswith(b"version(v2)")
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())


def test_a_response_still_being_sent_at_the_deadline_moves_once_sent(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """As above, but the big response is still in v1's send buffer at its
    drain deadline. It said keep-alive (the connection was to move), so it
    may not be cut when it has been sent: it gets the grace to finish, then
    moves, and the next request is answered by v2. (It was cut as idle at
    the deadline: the client read the whole body, then its next request on
    the connection found it closed.)"""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=0.3)
        await until(serving(v1), "v1 serving")
        sock = socket.socket()  # a small receive buffer, as above
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect(("127.0.0.1", port_of(v1.status())))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
            assert b"connection: close" not in head
            v2, v2_task = start(name, "v2", sockets)  # we read no more meanwhile
            await until(serving(v2), "v2 serving")
            await until(lambda: "is still sending a response" in caplog.text,
                        "v1's deadline with the response unsent")
            async with asyncio.timeout(10):
                body = await reader.readexactly(BIG)
            assert body == b"v1".ljust(BIG, b"."), "the big response arrived whole"
            assert await asyncio.wait_for(v1_task, 15) == 0
            assert "drained, 0 connection(s) cut" in caplog.text, caplog.text
            await answered_by_v2(reader, writer)
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())
    # Nothing was lost: nothing for an operator who alerts on WARNING.
    alarms = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not alarms, alarms


def test_responses_that_end_while_a_round_hands_over_move(
        run: Runner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """v1 drains with no time left (drain_timeout=0): its one round hands
    an idle connection over, and while it waits for the successor's
    acknowledgement a response streamed keep-alive since before the drain
    ends on a second connection; another such response ends on a third
    while the grace's first round hands the second one over. Each is idle
    at a request boundary just after the round that could have moved it,
    at the deadline and in the grace: it moves in the next round, and its
    client's next request on it is answered by v2. (Each was cut as idle,
    its answer having said keep-alive: the next request on it failed. A
    drain's last round before its deadline leaves the same window.)"""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        entered = {path: asyncio.Event() for path in ("/s1", "/s2")}
        finish = {path: asyncio.Event() for path in ("/s1", "/s2")}

        async def stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": "10"})
            await response.prepare(request)  # keep-alive: before the drain
            await response.write(b"01234")
            entered[request.path].set()
            await finish[request.path].wait()
            await response.write(b"56789")
            return response

        app = app_of("v1")
        app.router.add_get("/s1", stream)
        app.router.add_get("/s2", stream)
        v1, v1_task = await serve_v1(app, drain_timeout=0)
        port = port_of(v1.status())
        idle = await asyncio.open_connection("127.0.0.1", port)
        streams = {path: await asyncio.open_connection("127.0.0.1", port) for path in finish}
        hand_over = hotswap.Upgrader.hand_over_connections
        rounds = iter(finish)

        async def a_stream_ends(self: hotswap.Upgrader, *args: Any, **kwargs: Any) -> int:
            # The scenario: a stream ends, and its handler is done (aiohttp's
            # connection loop waits for a next request), while the round
            # hands a connection over (the first round's, then the grace's
            # first).
            path = next(rounds, None)
            if path is not None:
                finish[path].set()
                assert (await read_response(streams[path][0])).endswith(b"0123456789")
                adopt = self._adopter  # serve()'s Migrator's
                assert isinstance(adopt, types.MethodType)
                migrator = adopt.__self__
                assert isinstance(migrator, hotswap.migrate.Migrator)
                client = streams[path][1].get_extra_info("sockname")
                await until(lambda: any(
                    conn.transport is not None and conn._waiter is not None
                    and conn.transport.get_extra_info("peername") == client
                    for conn in migrator.tracked), "its handler done")
            return await hand_over(self, *args, **kwargs)

        monkeypatch.setattr(hotswap.Upgrader, "hand_over_connections", a_stream_ends)
        try:
            assert (await request(*idle)).endswith(b"version(v1)")
            for path, (_, writer) in streams.items():
                writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                await asyncio.wait_for(entered[path].wait(), 10)
            v2, v2_task = start(v1.name, "v2", {"http": ("127.0.0.1", 0)})
            await until(serving(v2), "v2 serving")
            assert await asyncio.wait_for(v1_task, 10) == 0
            assert all(event.is_set() for event in finish.values())
            assert "drained, 0 connection(s) cut" in caplog.text, caplog.text
            for connection in (idle, *streams.values()):
                await answered_by_v2(*connection)
        finally:
            for _, writer in (idle, *streams.values()):
                writer.close()
        await stop_serving(v2, v2_task)

    run(main())


def test_a_connection_idle_just_before_the_deadline_moves_in_the_grace(
        run: Runner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A response streamed keep-alive since before the takeover ends 20 ms
    before v1's drain deadline, and v2 takes 30 ms to answer a frame of
    connections (a busy machine); meanwhile a big response is still in
    v1's send buffer. Both connections move (the streamed one in the
    grace), and the next request on each is answered by v2. (The drain's
    last round handed the streamed one over with what was left of the
    drain for v2's acknowledgement, down to nothing: it came late, v1 let
    go of the frame and ended the channel, and the big response's
    connection, kept alive to move, was cut once sent, its next request
    failing.)"""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        entered, finish = asyncio.Event(), asyncio.Event()
        app = app_of("v1")
        app.router.add_get("/s", stream_in_two(entered, finish))
        v1, v1_task = await serve_v1(app, drain_timeout=0.5)
        port = port_of(v1.status())
        sock = socket.socket()  # a small receive buffer: see above
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect(("127.0.0.1", port))
        big = await asyncio.open_connection(sock=sock)
        streamed = await asyncio.open_connection("127.0.0.1", port)
        step = hotswap.migrate.Migrator.step
        rounds = 0

        async def timed(self: hotswap.migrate.Migrator, upgrader: hotswap.Upgrader,
                        told: Callable[[web.RequestHandler], None],
                        time_left: float | None = None, **kwargs: Any) -> bool:
            # Only watches: the second round's time left (the first gets at
            # least 1 s) says when the drain ends; the stream ends 20 ms before.
            nonlocal rounds
            rounds += 1
            if rounds == 2:
                assert time_left is not None
                loop.call_at(loop.time() + time_left - 0.02, finish.set)
            return await step(self, upgrader, told, time_left, **kwargs)

        monkeypatch.setattr(hotswap.migrate.Migrator, "step", timed)
        try:
            big[1].write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                assert b"close" not in (await big[0].readuntil(b"\r\n\r\n")).lower()
            streamed[1].write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            v2, v2_task = start(v1.name, "v2", {"http": ("127.0.0.1", 0)})
            await until(serving(v2), "v2 serving")
            take = v2._take_connections

            async def slow(channel: Any, message: Any) -> int:
                await asyncio.sleep(0.03)  # the scenario: v2 answers 30 ms late
                return await take(channel, message)

            monkeypatch.setattr(v2, "_take_connections", slow)
            async with asyncio.timeout(10):
                head = (await streamed[0].readuntil(b"\r\n\r\n")).lower()
                assert b"close" not in head, head
                assert await streamed[0].readexactly(10) == b"0123456789"
                assert await big[0].readexactly(BIG) == b"v1".ljust(BIG, b".")
            assert await asyncio.wait_for(v1_task, 15) == 0
            for connection in (streamed, big):
                await answered_by_v2(*connection)
        finally:
            for _, writer in (big, streamed):
                writer.close()
        assert rounds >= 2
        assert "drained, 0 connection(s) cut" in caplog.text, caplog.text
        assert "acknowledgement" not in caplog.text, caplog.text
        await stop_serving(v2, v2_task)

    run(main())


def test_each_frame_of_a_round_near_the_deadline_gets_time_for_its_acknowledgement(
        run: Runner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A round of v1's drain starts 0.13 s before its deadline with 254
    idle keep-alive connections (two frames: 253, then one), and v2 takes
    300 ms to acknowledge the second frame and 40 ms any other (a busy
    machine); meanwhile a big response is still in v1's send buffer, kept
    alive to move. The second frame waits for the grace's first round,
    where its acknowledgement gets time, and everything moves: the next
    request on each connection is answered by v2, nothing is cut, and v2
    hears that v1 drained. (The second frame was sent with what was left of
    the round, at most 90 ms: its acknowledgement came late, v1 let go of
    it and ended the channel, and the big response's connection was cut
    once sent.)

    The first frame's 40 ms leave it 60 ms of the 0.1 s its acknowledgement
    gets at least (adopting 253 connections on a loaded machine took more
    than the 20 ms that 80 ms left), and are enough that less than 0.1 s
    is left for the second, whatever the machine's speed; the second's
    300 ms are more than the round can have left for it, and well within
    the grace."""
    caplog.set_level(logging.INFO, logger="hotswap")
    # The drain's first round gets at least _FIRST_ROUND: nothing more
    # here, so that it is a round that starts 0.13 s before the deadline,
    # as a later one does when connections go idle then.
    monkeypatch.setattr(hotswap.aiohttp, "_FIRST_ROUND", 0.0)
    take = hotswap.Upgrader._take_connections

    frames = 0

    async def slow(self: hotswap.Upgrader, channel: Any, message: Any) -> int:
        # The scenario: v2 answers the second frame 300 ms late, any other 40 ms.
        nonlocal frames
        frames += 1
        await asyncio.sleep(0.3 if frames == 2 else 0.04)
        return await take(self, channel, message)

    monkeypatch.setattr(hotswap.Upgrader, "_take_connections", slow)

    async def main() -> None:
        v1, v1_task = await serve_v1(app_of("v1"), drain_timeout=0.13)
        port = port_of(v1.status())
        idle = [await asyncio.open_connection("127.0.0.1", port)
                for _ in range(MAX_FDS_PER_FRAME + 1)]
        sock = socket.socket()  # a small receive buffer: the response stays v1's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect(("127.0.0.1", port))
        big = await asyncio.open_connection(sock=sock)
        try:
            for connection in idle:
                assert (await request(*connection)).endswith(b"version(v1)")
            big[1].write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                assert b"close" not in (await big[0].readuntil(b"\r\n\r\n")).lower()
            v2, v2_task = start(v1.name, "v2", {"http": ("127.0.0.1", 0)})
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            async with asyncio.timeout(10):
                assert await big[0].readexactly(BIG) == b"v1".ljust(BIG, b".")
            assert await asyncio.wait_for(v1_task, 15) == 0
            for connection in [*idle, big]:
                await answered_by_v2(*connection)
        finally:
            for _, writer in [*idle, big]:
                writer.close()
        assert "drained, 0 connection(s) cut" in caplog.text, caplog.text
        assert "acknowledgement" not in caplog.text, caplog.text
        assert frames >= 2, "the second frame sent (in the grace)"
        await until(lambda: "predecessor pid" in caplog.text, "v2 to hear that v1 drained")
        await stop_serving(v2, v2_task)

    run(main())


def test_a_websocket_is_read_throughout_the_drain(run: Runner) -> None:
    """A websocket that said nothing since its upgrade request (which reads
    like a request boundary) is not paused when v2 takes over: its messages
    are answered by v1 during the whole drain, not after its deadline."""
    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=20)
        await until(serving(v1), "v1 serving")
        url = f"http://{v1.status().listeners[0].address}/ws"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            for i in range(3):
                await ws.send_str(f"m{i}")
                # Well inside v1's 20 s drain deadline.
                assert (await ws.receive(timeout=5)).data == f"v1 m{i}"
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())


def test_a_websocket_upgraded_during_the_drain_is_read(run: Runner,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade request that arrived before the handover and is prepared
    after it (the handler awaits something first: an auth check) is not
    paused as a request whose body was read: aiohttp before 3.14 names its
    upgrade flag ``_upgrade``, not ``_upgraded``, and the websocket's
    messages waited until the drain's last second. (Since, the request
    framer gives up on a request with an ``Upgrade`` header as well: the
    test fails only with both broken.)"""
    rounds = drain_rounds(monkeypatch)

    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        gate, entered = asyncio.Event(), asyncio.Event()

        async def echo(request: web.Request) -> web.WebSocketResponse:
            entered.set()
            await gate.wait()
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str(f"v1 {message.data}")
            return ws

        app = web.Application()
        app.router.add_get("/ws", echo)
        v1 = hotswap.Upgrader(name, version="v1", options=hotswap.Options(env={}))
        v1_task = asyncio.create_task(hotswap.aiohttp.serve(
            app, v1, sockets, drain_timeout=20, handle_signals=False,
            yield_cpu_after_drain=False))
        await until(serving(v1), "v1 serving")
        url = f"http://{v1.status().listeners[0].address}/ws"
        async with aiohttp.ClientSession() as session:
            connecting = asyncio.ensure_future(session.ws_connect(url))
            await asyncio.wait_for(entered.wait(), 5)
            v2, v2_task = start(name, "v2", sockets)
            await v1_draining_for(v1, rounds)
            gate.set()
            ws = await asyncio.wait_for(connecting, 5)
            try:
                for i in range(3):
                    await ws.send_str(f"m{i}")
                    # Well inside v1's 20 s drain deadline.
                    assert (await ws.receive(timeout=5)).data == f"v1 m{i}"
            finally:
                await ws.close()
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())


@pytest.mark.parametrize("hook", ["on_drain", "on_shutdown"])
def test_websockets_are_closed_with_1001(run: Runner,
                                         hook: str) -> None:
    """A websocket never reaches a next response: the app closes it with
    1001 (going away). In serve()'s on_drain, as soon as v2 takes over: v1's
    drain ends then, not at its deadline (20 s). In on_shutdown (aiohttp's
    place for it), at the drain's deadline (1 s here), before the busy
    connections' grace, as aiohttp orders them: a close frame, not a cut
    (1006) at the grace's end."""
    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        open_ws: set[web.WebSocketResponse] = set()

        async def echo(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            open_ws.add(ws)
            try:
                async for message in ws:
                    await ws.send_str(f"v1 {message.data}")
            finally:
                open_ws.discard(ws)
            return ws

        async def close_websockets(app: web.Application) -> None:
            for ws in set(open_ws):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"upgrade")

        app = web.Application()
        app.router.add_get("/ws", echo)
        if hook == "on_shutdown":
            app.on_shutdown.append(close_websockets)
        v1 = hotswap.Upgrader(name, version="v1", options=hotswap.Options(env={}))
        v1_task = asyncio.create_task(hotswap.aiohttp.serve(
            app, v1, sockets, drain_timeout=20 if hook == "on_drain" else 1,
            handle_signals=False, yield_cpu_after_drain=False,
            on_drain=close_websockets if hook == "on_drain" else None))
        await until(serving(v1), "v1 serving")
        url = f"http://{v1.status().listeners[0].address}/ws"
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await ws.send_str("m0")
            assert (await ws.receive(timeout=5)).data == "v1 m0"
            v2, v2_task = start(name, "v2", sockets)
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            draining = loop.time()
            message = await ws.receive(timeout=5)
            closed_after = loop.time() - draining
            assert message.type is aiohttp.WSMsgType.CLOSE, message
            assert message.data == aiohttp.WSCloseCode.GOING_AWAY, message
        if hook == "on_drain":
            assert closed_after < 1.0, closed_after  # not waiting for any deadline
        else:
            assert 0.9 <= closed_after < 1.7, closed_after  # the 1 s deadline, no grace
        assert await asyncio.wait_for(v1_task, 5) == 0
        await stop_serving(v2, v2_task)

    run(main())


def test_on_shutdown_waits_while_an_idle_connection_may_still_send(run: Runner) -> None:
    """A stop with an idle keep-alive connection open: its client may send
    one more request during the drain, and the app must still be whole for
    it (it is answered, told to close). So on_shutdown, which may release
    what requests need, starts only when the drain ends (here: once that
    connection closed). Started with the drain, it had already run: the
    request got a 500."""
    async def main() -> None:
        state = {"db": "open", "shut_while": ""}

        async def query(request: web.Request) -> web.Response:
            return web.Response(text=f"db {state['db']}",
                                status=200 if state["db"] == "open" else 500)

        async def close_db(app: web.Application) -> None:
            state["db"] = "closed"

        app = web.Application()
        app.router.add_get("/q", query)
        app.on_shutdown.append(close_db)
        upgrader, task = await serve_v1(app, drain_timeout=10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(upgrader.status()))
        try:
            writer.write(b"GET /q HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader)).endswith(b"db open")  # now idle
            upgrader.request_stop()
            await until(lambda: upgrader.state is hotswap.State.DRAINING, "v1 draining")
            for _ in range(5):  # what the loop had to run after that, it ran
                await asyncio.sleep(0)
            writer.write(b"GET /q HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await read_response(reader)
            assert answer.startswith(b"http/1.1 200") and b"connection: close" in answer, answer
            assert answer.endswith(b"db open"), answer
        finally:
            writer.close()
        assert await asyncio.wait_for(task, 15) == 0
        assert state["db"] == "closed"  # on_shutdown did run, after it

    run(main())


def stream_in_two(entered: asyncio.Event, finish: asyncio.Event
                  ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler that answers "0123456789" keep-alive in two halves: it
    prepares the response (keep-alive, decided then) and sends the first,
    sets ``entered``, and sends the second once ``finish`` is set."""
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "10"})
        await response.prepare(request)  # keep-alive: before the drain
        await response.write(b"01234")
        entered.set()
        await finish.wait()
        await response.write(b"56789")
        await response.write_eof()
        return response

    return stream


def test_a_response_begun_before_the_drain_ends_in_the_grace_then_is_cut_idle(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A response streamed (keep-alive) since before the stop ends in the
    grace: the connection is then idle, and cut at once as idle (not waited
    for until the grace is over and logged as a busy one cut)."""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        entered, finish = asyncio.Event(), asyncio.Event()

        stream = stream_in_two(entered, finish)
        app = web.Application()
        app.router.add_get("/s", stream)
        upgrader, task = await serve_v1(app, drain_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(upgrader.status()))
        try:
            writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            upgrader.request_stop()
            await until(lambda: "is busy; its response says Connection: close" in caplog.text,
                        "the drain deadline")
            finish.set()  # in the grace
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"close" not in head.lower(), head
            assert await asyncio.wait_for(reader.readexactly(10), 10) == b"0123456789"
            assert await asyncio.wait_for(reader.read(), 10) == b""  # then cut
        finally:
            writer.close()
        assert await asyncio.wait_for(task, 10) == 0
        # Named by the sidecar, as its other lines are (two in one log stream).
        assert f"{upgrader.name}: drain deadline: cutting idle connection" in caplog.text, \
            caplog.text
        assert "cutting busy connection" not in caplog.text, caplog.text
        assert "drained, 1 connection(s) cut" in caplog.text, caplog.text

    run(main())


def test_a_request_sent_while_a_refused_handover_held_it_is_answered_in_the_grace(
        run: Runner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A response streamed keep-alive since before the takeover ends in
    v1's grace, and the grace's round pauses its connection to hand it
    over. v2 is told to stop just then (a SIGTERM), so it refuses the
    frame, while the client, having read the response, sends its next
    request, which waits in v1's kernel (the drain holds the reading). v1
    resumes the connection: the request is answered, with Connection:
    close. (The grace cut it as idle in the same step, before the loop had
    read the request: the client got a reset for a request it had sent.)"""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        entered, finish = asyncio.Event(), asyncio.Event()
        app = app_of("v1")
        app.router.add_get("/s", stream_in_two(entered, finish))
        v1, v1_task = await serve_v1(app, drain_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(v1.status()))
        hand_over = hotswap.Upgrader.hand_over_connections
        calls = 0
        v2: hotswap.Upgrader | None = None

        async def refused(self: hotswap.Upgrader, *args: Any, **kwargs: Any) -> int:
            # The scenario: v2 stops, and the client's next request
            # arrives, while the connection is paused for the frame.
            nonlocal calls
            calls += 1
            assert v2 is not None
            v2.request_stop()
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            fd = server_side(writer)
            assert fd is not None
            await until(lambda: queued(fd, termios.FIONREAD) > 0, "the request in v1's kernel")
            return await hand_over(self, *args, **kwargs)

        monkeypatch.setattr(hotswap.Upgrader, "hand_over_connections", refused)
        try:
            writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            v2, v2_task = start(v1.name, "v2", {"http": ("127.0.0.1", 0)})
            await until(serving(v2), "v2 serving")
            await until(lambda: "is busy; its response says Connection: close" in caplog.text,
                        "v1's drain deadline")
            finish.set()  # in the grace
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"close" not in head.lower(), head
            assert await asyncio.wait_for(reader.readexactly(10), 10) == b"0123456789"
            reply = await read_response(reader)
            assert reply.endswith(b"version(v1)") and b"connection: close" in reply, reply
        finally:
            writer.close()
        assert calls == 1, "one handover, in the grace"
        assert await asyncio.wait_for(v1_task, 10) == 0
        assert await asyncio.wait_for(v2_task, 10) == 0
        assert "cutting idle" not in caplog.text, caplog.text

    run(main())


def test_a_connection_cut_idle_in_the_grace_is_said_when_serve_is_cancelled(
        run: Runner, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The grace cuts a connection as idle (its response, begun keep-alive
    before the stop, ended in the grace) while another is still busy, and
    then serve() is cancelled (the app's own shutdown): the cut is said all
    the same. The grace's cuts are logged together at its end, and a cancel
    there left them unsaid (a connection dropped with no WARNING). The
    grace is made 30 s, so that a stalled machine cannot let it end before
    the cancel (the cancel ends it: the test does not wait it out)."""
    caplog.set_level(logging.INFO, logger="hotswap")
    monkeypatch.setattr(hotswap.aiohttp, "GRACE", 30.0)

    async def main() -> None:
        entered, finish = asyncio.Event(), asyncio.Event()
        stuck = asyncio.Event()

        stream = stream_in_two(entered, finish)
        async def hang(request: web.Request) -> web.Response:
            stuck.set()
            await asyncio.Event().wait()  # busy until cancelled
            raise AssertionError("not reached")

        app = web.Application()
        app.router.add_get("/s", stream)
        app.router.add_get("/hang", hang)
        upgrader, task = await serve_v1(app, drain_timeout=0.2)
        port = port_of(upgrader.status())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
            busy_writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            await asyncio.wait_for(stuck.wait(), 10)
            upgrader.request_stop()
            await until(lambda: "are busy; each one's response says Connection: close"
                        in caplog.text, "the drain deadline")
            finish.set()  # in the grace
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert await asyncio.wait_for(reader.readexactly(10), 10) == b"0123456789"
            assert await asyncio.wait_for(reader.read(), 10) == b""  # cut idle
            assert "grace over" not in caplog.text, "too late to cancel in the grace"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        finally:
            writer.close()
            busy_writer.close()
        assert "drain deadline: cutting idle connection" in caplog.text, caplog.text

    run(main())


def test_a_request_that_read_keep_alive_before_the_stop_is_still_told_to_close(
        run: Runner) -> None:
    """aiohttp caches request.keep_alive once read: a handler that read it
    before the stop (logging it, say) answered keep-alive, and its client
    sent its next request to the draining version. The drain's mark now
    clears that cache."""
    async def main() -> None:
        entered, gate = asyncio.Event(), asyncio.Event()

        async def slow(request: web.Request) -> web.Response:
            assert request.keep_alive  # read, and cached, before the stop
            entered.set()
            await gate.wait()
            return web.Response(text="done")

        app = web.Application()
        app.router.add_get("/slow", slow)
        upgrader, task = await serve_v1(app, drain_timeout=10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(upgrader.status()))
        try:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            upgrader.request_stop()
            await until(lambda: upgrader.state is hotswap.State.DRAINING, "v1 draining")
            gate.set()
            answer = await read_response(reader)
            assert b"connection: close" in answer, answer
        finally:
            writer.close()
        assert await asyncio.wait_for(task, 15) == 0

    run(main())


def test_handler_args_a_handler_does_not_take_still_serve(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """An app whose handler_args hold a key aiohttp's RequestHandler does not
    take is served as aiohttp serves it: a basic handler and a warning. The
    tracked handler of connection handover used to raise TypeError on every
    connection (no answer at all)."""
    async def main() -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hello")

        app = web.Application(handler_args={"slow_request_timeout": 5})
        app.router.add_get("/", hello)
        upgrader, task = await serve_v1(app, drain_timeout=1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(upgrader.status()))
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader)).endswith(b"hello")
        finally:
            writer.close()
        await stop_serving(upgrader, task)
        assert "Failed to create request handler with custom kwargs" in caplog.text

    run(main())


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One response's head (lower case) and body, within 10 s."""
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)


async def answered_by_v2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A request on a connection that moved: v2 answers it, keep-alive."""
    reply = await request(reader, writer)
    assert reply.endswith(b"version(v2)") and b"connection: close" not in reply, reply


@pytest.mark.parametrize("when", ["coded-body", "near-the-deadline"])
def test_a_request_in_flight_that_cannot_move_is_told_to_close(run: Runner, when: str) -> None:
    """A request is in flight on v1 when v2 takes over, and its client then
    idles past v1's drain deadline before its next request. Its connection
    cannot move after this response if its request's body came with a
    transfer coding the framer does not follow (gzip, then chunked, which
    aiohttp reads chunked: "coded-body"), and a
    connection whose response ends in the drain's last tenth cannot count
    on moving before the cut ("near-the-deadline"). Either way that
    response must say Connection: close: sent keep-alive, the connection
    was cut idle at the deadline and the client's next request on it
    failed. A client that reconnects as told gets v2."""
    async def main() -> None:
        name, gate = f"s-{uuid.uuid4().hex[:10]}", asyncio.Event()
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        drain = 3.0
        v1, v1_task = start(name, "v1", sockets, drain_timeout=drain, gate=gate)
        await until(serving(v1), "v1 serving")
        port = port_of(v1.status())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if when == "coded-body":
                writer.write(b"POST /held HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
                             b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            else:
                writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            if when == "near-the-deadline":
                # The handler's work ends in the drain's last tenth (the
                # scenario, not a wait for a condition).
                await asyncio.sleep(drain - 0.1)
            gate.set()
            first = await read_response(reader)
            read = b"5" if when == "coded-body" else b"0"
            assert first.startswith(b"http/1.1 200"), first
            assert first.endswith(b"version(v1) read " + read), first
            assert b"connection: close" in first, first
            # Its client idles past v1's deadline (v1's serve() has returned).
            assert await asyncio.wait_for(v1_task, 15) == 0
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # as told
        try:
            assert (await request(reader, writer)).endswith(b"version(v2)")
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())


def test_a_header_block_whose_end_came_in_reads_of_its_own_moves(run: Runner) -> None:
    """Clients whose request's header block ends in reads of its own (the
    final CRLF written alone, a CR and an LF apart, byte by byte; on a real
    network a segment may end there) are at a request boundary all the same
    once answered: idle across the upgrade, their connections move, v1's
    drain ends at once, and the next requests are answered by v2 without
    Connection: close. (The boundary was read from the last read alone: they
    stayed with v1, idle, and were cut at its deadline; the next request on
    each failed.)"""
    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=3.0)
        await until(serving(v1), "v1 serving")
        port = port_of(v1.status())
        head = b"GET / HTTP/1.1\r\nHost: x\r\n"
        writes = ([head, b"\r\n"], [head + b"\r", b"\n"],
                  [bytes([byte]) for byte in head + b"\r\n"])
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in writes]
        try:
            for (reader, writer), pieces in zip(conns, writes, strict=True):
                await write_apart(writer, pieces)  # v1 reads each piece on its own
                assert (await read_response(reader)).endswith(b"version(v1)")
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            # Nothing left with v1: its drain ends well before its deadline.
            assert await asyncio.wait_for(v1_task, 2) == 0
            for reader, writer in conns:
                reply = await request(reader, writer)
                assert reply.endswith(b"version(v2)"), reply
                assert b"connection: close" not in reply, reply
        finally:
            for _, writer in conns:
                writer.close()
        await stop_serving(v2, v2_task)

    run(main())


def drain_rounds(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the rounds of every draining version's connection handover
    (``Migrator.step``): the returned callable says how many so far."""
    rounds = 0
    step = hotswap.migrate.Migrator.step

    async def counting(self: hotswap.migrate.Migrator, *args: Any, **kwargs: Any) -> bool:
        nonlocal rounds
        rounds += 1
        return await step(self, *args, **kwargs)

    monkeypatch.setattr(hotswap.migrate.Migrator, "step", counting)
    return lambda: rounds


async def v1_draining_for(v1: hotswap.Upgrader, rounds: Callable[[], int],
                          count: int = 3) -> None:
    """Once v1 drains, wait for ``count`` more rounds of its handover."""
    await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
    seen = rounds()
    await until(lambda: rounds() >= seen + count, f"{count} rounds of v1's handover")


def server_side(writer: asyncio.StreamWriter) -> int | None:
    """The descriptor of this process's own server end of ``writer``'s
    connection (the server runs in this process), once it has accepted it."""
    local, peer = writer.get_extra_info("sockname")[:2], writer.get_extra_info("peername")[:2]
    for conn in psutil.Process().net_connections(kind="tcp"):
        if tuple(conn.laddr) == peer and tuple(conn.raddr) == local and conn.fd != -1:
            return conn.fd
    return None


def queued(fd: int, which: int) -> int:
    """Bytes in ``fd``'s receive queue not yet read (``termios.FIONREAD``),
    or in its send queue not yet acknowledged by the peer (``TIOCOUTQ``)."""
    count: int = struct.unpack("i", fcntl.ioctl(fd, which, b"\0" * 4))[0]
    return count


async def write_apart(writer: asyncio.StreamWriter, pieces: list[bytes]) -> None:
    """Each piece on its own: the server (in this process) has read one, and
    so handled it (asyncio and uvloop pass what they read on in the same
    callback), before the next is written. Read means: the server's kernel
    acknowledged every byte, and none waits in its receive queue."""
    await until(lambda: server_side(writer) is not None, "the server accepting")
    server, client = server_side(writer), writer.get_extra_info("socket").fileno()
    assert server is not None

    def read_by_the_server() -> bool:
        assert server is not None
        return queued(client, termios.TIOCOUTQ) == 0 and queued(server, termios.FIONREAD) == 0

    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await until(read_by_the_server, "the server reading the piece")


# A body that holds a header block's end, and what reads as a whole request.
TRICKY = b"{\r\n\r\nGET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n}"


def with_body(method: bytes, body: bytes) -> bytes:
    return (method + b" /read HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize("how", ["one-write", "split-writes", "crlfcrlf-in-body"])
def test_an_idle_connection_whose_last_request_had_a_body_moves(run: Runner, how: str) -> None:
    """A keep-alive client sends a request with a Content-Length body (in
    one write; across writes that v1 reads one by one, the header block's
    end among them; a body that holds \\r\\n\\r\\n and what reads as a
    whole request), is answered by v1, and idles across the upgrade. Its
    connection moves: v1's drain ends at once, and its next request, on the
    same connection (a raw stream: it cannot reconnect), is answered by v2
    without Connection: close. (What v1 had read last was a body, which
    ends no header block: the connection stayed with v1, was told to close,
    idled, and was cut at v1's deadline; the next request on it failed.)"""
    body = TRICKY if how == "crlfcrlf-in-body" else b"hello world"
    message = with_body(b"PUT" if how == "split-writes" else b"POST", body)
    cut = message.index(b"\r\n\r\n") + 2
    pieces = ([message[:cut], message[cut:cut + 5], message[cut + 5:-3], message[-3:]]
              if how == "split-writes" else [message])

    run(moves_after_it(pieces, len(body)))


async def moves_after_it(writes: list[bytes], size: int) -> None:
    """A keep-alive client writes ``writes`` (one request whose body has
    ``size`` bytes) to v1, apart, and is answered keep-alive; then v2 takes
    over. Its connection moves: v1's drain ends at once, and its next
    request, on the same connection, is answered by v2."""
    name = f"s-{uuid.uuid4().hex[:10]}"
    sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
    v1, v1_task = start(name, "v1", sockets, drain_timeout=3.0)
    await until(serving(v1), "v1 serving")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(v1.status()))
    try:
        await write_apart(writer, writes)
        first = await read_response(reader)
        assert first.endswith(b"version(v1) read %d" % size), first
        assert b"connection: close" not in first, first
        local = writer.get_extra_info("sockname")
        v2, v2_task = start(name, "v2", sockets)
        await until(serving(v2), "v2 serving")
        # Nothing left with v1: its drain ends well before its deadline.
        assert await asyncio.wait_for(v1_task, 2) == 0
        await answered_by_v2(reader, writer)
        assert writer.get_extra_info("sockname") == local
    finally:
        writer.close()
    await stop_serving(v2, v2_task)


def chunks(*pieces: bytes) -> bytes:
    """A chunked body of these chunks (each with an extension), its last
    chunk and a trailer field."""
    return (b"".join(b"%x;n=%d\r\n%s\r\n" % (len(piece), i, piece)
                     for i, piece in enumerate(pieces))
            + b"0\r\nChecksum: x\r\n\r\n")


@pytest.mark.parametrize("how", ["one-write", "split-writes", "crlfcrlf-in-chunks"])
def test_an_idle_connection_whose_last_request_was_chunked_moves(run: Runner, how: str) -> None:
    """A keep-alive client sends a request whose body comes chunked
    (Transfer-Encoding: chunked, chunk extensions, a trailer field), in
    one write; across writes that v1 reads one by one, cut inside a
    chunk-size line, a chunk's data, its CRLF and the trailer; chunks that
    hold \\r\\n\\r\\n and what reads as a whole request. v1 answers it and
    the client idles across the upgrade. Its connection moves: v1's drain
    ends at once, and its next request, on the same connection (a raw
    stream: it cannot reconnect), is answered by v2 without Connection:
    close. (The framer gave up on any Transfer-Encoding: the connection
    was told to close and cut idle at v1's deadline.)"""
    pieces = [TRICKY, b"\r\n\r\n"] if how == "crlfcrlf-in-chunks" else [b"hello", b" world"]
    body = chunks(*pieces)
    message = (b"POST /read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + body)
    size = len(b"".join(pieces))
    if how == "split-writes":
        at = [message.index(b";n=0") + 2, message.index(b"hello") + 2,
              message.index(b"hello") + 6, message.index(b" world") - 1,
              message.index(b"Checksum") + 3, len(message)]
        writes = [message[a:b] for a, b in zip([0, *at], at, strict=False)]
    else:
        writes = [message]

    run(moves_after_it(writes, size))


@pytest.mark.parametrize("when", ["body-arriving", "handler-busy", "chunks-arriving"])
def test_a_request_with_a_body_in_flight_at_the_handover_moves_after_it(
        run: Runner, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """A request with a Content-Length body is in flight as v1 starts to
    drain: its body still arriving (half of it sent, the rest only after
    a few rounds of v1's handover), or all read and its handler still busy;
    or one whose body comes chunked, half of its chunks sent.
    The connection is not moved before that request is whole and answered
    (the rest of a body read by v2 would be taken for a request): v1 reads
    the whole body and answers, keep-alive, then hands the connection over,
    and the client's next request on it is answered by v2. Nothing is lost.
    (It used to be told to close: what v1 had read last was a body.)"""
    rounds = drain_rounds(monkeypatch)
    body = b"x" * 3000 + TRICKY
    message = with_body(b"POST", body)
    if when == "chunks-arriving":
        message = (b"POST /read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + chunks(body[:3000], body[3000:]))
    if when == "handler-busy":
        message = message.replace(b"/read", b"/held", 1)
    half = len(message) - len(body) // 2

    async def main() -> None:
        name, gate = f"s-{uuid.uuid4().hex[:10]}", asyncio.Event()
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=3.0, gate=gate)
        await until(serving(v1), "v1 serving")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(v1.status()))
        try:
            writer.write(message if when == "handler-busy" else message[:half])
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await v1_draining_for(v1, rounds)
            assert not v1_task.done()  # the connection is still v1's
            if when != "handler-busy":
                writer.write(message[half:])
            gate.set()
            first = await read_response(reader)
            assert first.endswith(b"version(v1) read %d" % len(body)), first
            assert b"connection: close" not in first, first
            assert await asyncio.wait_for(v1_task, 2) == 0  # then it moved
            await answered_by_v2(reader, writer)
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())


@pytest.mark.parametrize(("kind", "when"), [("coded", "answered-before"),
                                           ("coded", "body-arriving"),
                                           ("http/1.0", "answered-before")])
def test_connections_the_framer_gives_up_on_drain_the_safe_way(
        run: Runner, monkeypatch: pytest.MonkeyPatch,
        kind: str, when: str) -> None:
    """A request whose body comes with a transfer coding the framer does
    not follow (gzip, then chunked: aiohttp reads it chunked, the framer
    gives up on any coding but chunked alone), and HTTP/1.0: such a
    connection never moves, whether that request was answered before the
    upgrade or its body is still arriving as v1 drains (a chunk ending in
    \\r\\n\\r\\n read last). Its next response (that request's own, if in
    flight) says Connection: close (HTTP/1.0: no keep-alive) and v1 closes
    the connection after it; nothing is lost: the body is read whole, and
    the client, reconnecting as told, gets v2. (A chunked body's end, a
    chunk's and an HTTP/1.0 request's end in \\r\\n\\r\\n: such a
    connection counted as at a request boundary, and was moved. Bodies
    sent chunked alone are framed and move:
    test_an_idle_connection_whose_last_request_was_chunked_moves.)"""
    rounds = drain_rounds(monkeypatch)
    if kind == "coded":
        first = [b"POST /read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 b"2\r\n\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"]  # 7 bytes in all
        read, then = b"7", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    else:
        first = [b"GET /read HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"]
        read, then = b"0", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"

    def closes(response: bytes) -> bool:
        """It says the connection ends with it (HTTP/1.0: by not keeping it)."""
        if kind == "http/1.0":
            return b"connection: keep-alive" not in response
        return b"connection: close" in response

    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=3.0)
        await until(serving(v1), "v1 serving")
        port = port_of(v1.status())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        again: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            if when == "answered-before":
                await write_apart(writer, first)
                answer = await read_response(reader)
                assert answer.endswith(b"version(v1) read " + read), answer
                assert not closes(answer), answer
            else:
                await write_apart(writer, first[:1])
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await v1_draining_for(v1, rounds)
            writer.write(then if when == "answered-before" else first[1])
            told = await read_response(reader)
            assert told.endswith(b"version(v1)" if when == "answered-before"
                                 else b"version(v1) read " + read), told
            assert closes(told), told
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # v1 closed it after that response
            assert await asyncio.wait_for(v1_task, 5) == 0
            again = await asyncio.open_connection("127.0.0.1", port)
            assert (await request(*again)).endswith(b"version(v2)")
        finally:
            await close_all(writer, *([again[1]] if again else []))
        await stop_serving(v2, v2_task)

    run(main())


def test_a_request_begun_after_a_body_is_not_moved_until_whole(
        run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """What kept connections with bodies from moving: a body that holds
    \\r\\n\\r\\n and what reads as a whole request, then, in the same
    write, the first part of the next request (its header block not yet
    ended). v1 answers the first; the connection is idle with part of a
    request in v1's buffer, and must not move: v1 keeps it through rounds
    of its handover, answers that request once its client ends it, and only
    then hands the connection over; the next request is answered by v2 on
    the same connection. Nothing is lost, nothing read twice. (It was told
    to close: what v1 had read last ended no header block.)"""
    rounds = drain_rounds(monkeypatch)

    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=3.0)
        await until(serving(v1), "v1 serving")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(v1.status()))
        try:
            writer.write(with_body(b"POST", TRICKY) + b"GET / HTTP/1.1\r\nHost: x\r\n")
            first = await read_response(reader)
            assert first.endswith(b"version(v1) read %d" % len(TRICKY)), first
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await v1_draining_for(v1, rounds)
            assert not v1_task.done()  # the connection is still v1's
            writer.write(b"\r\n")  # the GET's header block ends
            second = await read_response(reader)
            assert second.endswith(b"version(v1)") and b"connection: close" not in second, \
                second
            assert await asyncio.wait_for(v1_task, 2) == 0  # then it moved
            await answered_by_v2(reader, writer)
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())


def test_a_long_request_does_not_keep_the_drain_looking_every_millisecond(
        run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request still handled when v2 takes over (a long poll) is paused, to
    move once answered. The drain looks again after 1 ms while a connection
    is that close to a boundary, but this one stays busy: v1 looked at every
    connection each millisecond for as long as it lasted (with 1,000 long
    polls in flight, half a core for the whole drain). It is looked at that
    often only for its first moments, then at the drain's usual pace; once
    answered it still moves, and its next request is answered by v2."""
    rounds = drain_rounds(monkeypatch)

    async def main() -> None:
        name, gate = f"s-{uuid.uuid4().hex[:10]}", asyncio.Event()
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, gate=gate)
        await until(serving(v1), "v1 serving")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(v1.status()))
        try:
            writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            before = rounds()
            await asyncio.sleep(1.0)
            # 10 ms apart, less the loop's own time: about 100 (it was ~1,000).
            assert rounds() - before < 250, rounds() - before
            gate.set()
            reply = await read_response(reader)
            assert reply.endswith(b"version(v1) read 0") and b"close" not in reply, reply
            assert await asyncio.wait_for(v1_task, 5) == 0  # it moved
            assert (await request(reader, writer)).endswith(b"version(v2)")
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())


@pytest.mark.parametrize("kind", ["plain", "plain-raises", "returns-a-coroutine"])
def test_on_drain_may_be_a_plain_function(run: Runner,
                                          kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """serve(on_drain=fn) with fn a plain function: it is called as the
    drain starts, and what it returns is awaited if it is awaitable (a
    lambda around a coroutine function). One that raises is logged and
    gives exit status 1, as a coroutine that raises does. (A plain function
    made serve() raise TypeError after the drain, "An asyncio.Future, a
    coroutine or an awaitable is required", skipping upgrader.close(cut)
    and the Kruise slot's idle.)"""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        called, awaited = asyncio.Event(), asyncio.Event()

        async def later(app: web.Application) -> None:
            awaited.set()

        def on_drain(app: web.Application) -> object:
            called.set()
            if kind == "plain-raises":
                raise RuntimeError("on_drain failed")
            return later(app) if kind == "returns-a-coroutine" else None

        upgrader, task = await serve_v1(app_of("v1"), drain_timeout=0.2, on_drain=on_drain)
        upgrader.request_stop()
        assert await asyncio.wait_for(task, 10) == (1 if kind == "plain-raises" else 0)
        assert called.is_set() and upgrader.state is hotswap.State.STOPPED
        assert awaited.is_set() is (kind == "returns-a-coroutine")
        assert ("on_drain failed" in caplog.text) is (kind == "plain-raises"), caplog.text
        assert "drained, 0 connection(s) cut" in caplog.text, caplog.text

    run(main())


@pytest.mark.parametrize("hook", ["raises", "hangs", "cancelled"])
def test_a_failing_clean_up_hook_still_lets_the_last_response_out(run: Runner, hook: str) -> None:
    """The app's on_shutdown callback (which starts as the drain ends) lets
    a request in flight answer in its grace, then raises (or ends
    cancelled), or never returns. The response arrives (told to close); the hook is logged and
    abandoned within cleanup_timeout; the on_cleanup callbacks still run;
    serve() returns 1 rather than raising or hanging. (A raise used to skip
    the rest of aiohttp's clean-up, and serve() raised; a hang kept the old
    process, and its successor's next upgrade, waiting for good.)"""
    async def main() -> None:
        gate, entered, cleaned = asyncio.Event(), asyncio.Event(), asyncio.Event()
        app = app_of("v1", gate, entered)

        async def on_shutdown(app: web.Application) -> None:
            gate.set()  # the busy request may answer now, in its grace
            if hook == "raises":
                raise RuntimeError("on_shutdown failed")
            if hook == "cancelled":
                raise asyncio.CancelledError
            await asyncio.Event().wait()

        async def on_cleanup(app: web.Application) -> None:
            cleaned.set()

        app.on_shutdown.append(on_shutdown)
        app.on_cleanup.append(on_cleanup)
        upgrader = hotswap.Upgrader(f"s-{uuid.uuid4().hex[:10]}", version="v1",
                                    options=hotswap.Options(env={}))
        task = asyncio.create_task(hotswap.aiohttp.serve(
            app, upgrader, {"http": ("127.0.0.1", 0)}, drain_timeout=0.2,
            cleanup_timeout=0.5, handle_signals=False, yield_cpu_after_drain=False))
        await until(serving(upgrader), "v1 serving")
        port = port_of(upgrader.status())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)  # in flight
            upgrader.request_stop()
            answer = await read_response(reader)
            assert answer.startswith(b"http/1.1 200") and b"connection: close" in answer, answer
            assert answer.endswith(b"version(v1) read 0"), answer
        finally:
            writer.close()
        assert await asyncio.wait_for(task, 10) == 1
        assert cleaned.is_set()

    run(main())


_STARTED_AS: contextvars.ContextVar[str] = contextvars.ContextVar("started_as",
                                                                 default="unset")


def test_what_on_startup_sets_in_context_variables_reaches_the_handlers(
        run: Runner) -> None:
    """An ``on_startup`` callback that sets a context variable (a logging
    or tracing context bound once for the service) sees it in every request
    handler, as under aiohttp's own ``run_app()``: the handlers' tasks are
    made in the context the servers were started in, after ``on_startup``.
    Once serve() ran ``on_startup`` in a task of its own (so that a stop
    could cancel it), what it set stayed in that task's copy of the context:
    the handlers saw the variable's default."""
    async def main() -> None:
        async def init(app: web.Application) -> None:
            _STARTED_AS.set("set by on_startup")

        async def which(request: web.Request) -> web.Response:
            return web.Response(text=_STARTED_AS.get())

        app = app_of("v1")
        app.router.add_get("/context", which)
        app.on_startup.append(init)
        upgrader, task = await serve_v1(app)
        url = f"http://{upgrader.status().listeners[0].address}/context"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert await response.text() == "set by on_startup"
        assert _STARTED_AS.get() == "unset"  # the test's own context: untouched
        await stop_serving(upgrader, task)

    run(main())


async def stopped_within(upgrader: hotswap.Upgrader, task: asyncio.Task[int],
                         limit: float = 10.0) -> float:
    """Ask ``upgrader`` to stop and wait for ``serve()``'s ``task``, at most
    ``limit`` seconds (then it is cancelled and the test fails); returns
    how long the stop took (loop time)."""
    loop = asyncio.get_running_loop()
    stopped = loop.time()
    upgrader.request_stop()
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        raise AssertionError(f"serve() still running {limit:g} s after the stop")
    return loop.time() - stopped


def test_a_stop_while_on_startup_hangs_ends_serve(run: Runner,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A fresh start whose app's on_startup never returns: a stop (SIGTERM,
    here request_stop()) cancels it, lets the cleanup context it entered
    exit, and serve() returns 0 at once, its port closed (no descriptor
    left: the fixture). (It only asked for a stop that ready() would see:
    serve() waited in on_startup until the process was killed.)"""
    async def main() -> None:
        entered, exited = asyncio.Event(), asyncio.Event()

        async def context(app: web.Application) -> Any:
            yield
            exited.set()

        async def never(app: web.Application) -> None:
            entered.set()
            await asyncio.Event().wait()

        app = app_of("v1")
        app.cleanup_ctx.append(context)
        app.on_startup.append(never)
        upgrader = hotswap.Upgrader(f"s-{uuid.uuid4().hex[:10]}", version="v1",
                                    options=hotswap.Options(env={}))
        task = asyncio.create_task(hotswap.aiohttp.serve(
            app, upgrader, {"http": ("127.0.0.1", 0)}, cleanup_timeout=0.5,
            handle_signals=False, yield_cpu_after_drain=False))
        await asyncio.wait_for(entered.wait(), 10)
        assert await stopped_within(upgrader, task) < 2.0  # at once, slack for a busy CI
        assert task.result() == 0
        assert exited.is_set()
        assert "stop requested while the app's on_startup callbacks run" in caplog.text
        assert upgrader.state is hotswap.State.STOPPED

    run(main())


@pytest.mark.parametrize("phase", ["shutdown", "cleanup"])
def test_a_clean_up_hook_added_in_on_startup_is_bounded_too(run: Runner, phase: str,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    """An ``on_shutdown`` or ``on_cleanup`` callback that the app's own
    ``on_startup`` callback registers (``app.on_cleanup.append()`` in an
    init function) and that never returns is abandoned after
    ``cleanup_timeout`` like one registered before ``serve()``: serve()
    returns 1 within drain, grace and that. (serve() bounded only those it
    found as it started: this one kept it, and the process, for good.)"""
    async def main() -> None:
        async def never(app: web.Application) -> None:
            await asyncio.Event().wait()

        async def init(app: web.Application) -> None:
            getattr(app, f"on_{phase}").append(never)

        app = app_of("v1")
        app.on_startup.append(init)
        upgrader, task = await serve_v1(app, drain_timeout=0.2, cleanup_timeout=0.5)
        # drain 0.2 s + grace 1 s + cleanup_timeout 0.5 s, and slack for a busy CI.
        assert await stopped_within(upgrader, task) < 5.0
        assert task.result() == 1
        assert "still running after 0.5s: abandoned" in caplog.text, caplog.text
        # Named, as the sidecar's other lines are (two sidecars, one log).
        assert f"{upgrader.name}: app clean-up " in caplog.text, caplog.text
        assert upgrader.state is hotswap.State.STOPPED

    run(main())


@pytest.mark.parametrize("phase", ["shutdown", "cleanup"])
def test_a_sub_apps_failing_clean_up_hook_skips_none_of_the_rest(
        run: Runner, phase: str, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp runs a sub-app's ``on_shutdown`` / ``on_cleanup`` callbacks
    as one callback of its parent: one that raised skipped the sub-app's
    later ones (here, the release of what its nested sub-app holds too),
    though the README says a callback that raises is logged rather than
    skipping the rest. Each runs, in order; the failure is logged, and
    serve() returns 1."""
    ran: list[str] = []
    label = web.AppKey("label", str)

    async def main() -> None:
        async def fails(app: web.Application) -> None:
            ran.append("fails")
            raise RuntimeError("boom")

        async def releases(app: web.Application) -> None:
            ran.append(f"releases {app[label]}")

        app, sub, nested = app_of("v1"), web.Application(), web.Application()
        sub[label], nested[label] = "sub", "nested"
        getattr(nested, f"on_{phase}").extend([fails, releases])
        getattr(sub, f"on_{phase}").extend([fails, releases])
        sub.add_subapp("/nested", nested)
        app.add_subapp("/sub", sub)
        upgrader, task = await serve_v1(app, drain_timeout=0.1)
        upgrader.request_stop()
        assert await asyncio.wait_for(task, 10) == 1

    run(main())
    assert ran == ["fails", "releases sub", "fails", "releases nested"], ran
    assert caplog.text.count("failed: RuntimeError('boom')") == 2, caplog.text


def test_on_cleanup_after_an_on_shutdown_that_ran_its_time_ends_by_the_stops_bound(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """An ``on_shutdown`` callback and an ``on_cleanup`` callback that both
    never return: ``on_shutdown`` starts as the drain ends and is abandoned
    after ``cleanup_timeout``; ``on_cleanup`` starts only then, and must be
    over by the drain's end + the grace (1 s) + ``cleanup_timeout``
    (DEFAULT_CLEANUP_TIMEOUT: a stop within 29 s, inside Kubernetes' 30 s),
    not ``cleanup_timeout`` after its own start (the drain's end + twice
    that: past the kubelet's SIGKILL with the defaults)."""
    async def main() -> None:
        async def never(app: web.Application) -> None:
            await asyncio.Event().wait()

        app = app_of("v1")
        app.on_shutdown.append(never)
        app.on_cleanup.append(never)
        upgrader, task = await serve_v1(app, drain_timeout=0, cleanup_timeout=4)
        # Bound: drain 0 + grace 1 + cleanup_timeout 4 = 5 s, and slack for
        # a busy CI (below the 8 s of twice cleanup_timeout).
        took = await stopped_within(upgrader, task, limit=15)
        assert task.result() == 1
        assert caplog.text.count("still running after 4.0s: abandoned") == 2, caplog.text
        assert took < 6.5, took

    run(main())


def test_connections_handed_over_at_the_deadline_are_not_counted_cut(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """v1's drain deadline comes while it waits for the successor to
    acknowledge a frame of idle connections: it lets go of them (the
    successor adopts a complete frame anyway). Those connections are the
    successor's, not cut: the drain reports 0 cut. (Closed but not yet
    gone from aiohttp's list, they used to be counted, and logged, as cut:
    one frame's worth, 253 of them, in a helper's run of 3,000.)"""
    import logging
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        v1, v1_task = start(name, "v1", {"http": ("127.0.0.1", 0)}, drain_timeout=0.3)
        await until(serving(v1), "v1 serving")
        port = port_of(v1.status())
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        for reader, writer in clients:
            assert (await request(reader, writer)).endswith(b"version(v1)")
        adopted: list[socket.socket] = []
        v2 = hotswap.Upgrader(name, version="v2", options=hotswap.Options(env={}))
        v2.adopt_connections(lambda listener, sock: adopted.append(sock))
        await v2.start()
        sock = v2.listen("http", ("127.0.0.1", port))
        channel = v2._predecessor_channel
        assert channel is not None
        original = channel.receive
        calls = 0

        async def slow(*, timeout: float) -> hotswap.protocol.Message:
            nonlocal calls
            calls += 1
            if calls == 2:  # after Released: the first frame of connections
                # Unanswered until v1's drain is over: its wait for the
                # acknowledgement ran out and it let go. (A sleep of 1 s
                # raced that 1 s wait: answered in time, nothing was let
                # go of, and the test passed without its scenario.)
                await asyncio.wait({v1_task}, timeout=15)
                assert v1_task.done(), "v1's drain never ended"
            return await original(timeout=timeout)

        channel.receive = slow  # type: ignore[method-assign]
        try:
            await v2.ready()
            assert await asyncio.wait_for(v1_task, 15) == 0
            await until(lambda: len(adopted) == 20, "v2 to adopt the let-go frame")
        finally:
            for s in (*adopted, sock):
                s.close()
            for _, writer in clients:
                writer.close()
            await v2.close()
        assert "no acknowledgement for 20 connection(s)" in caplog.text, caplog.text  # the scenario
        assert "drained, 0 connection(s) cut" in caplog.text, caplog.text

    run(main())


def test_a_connection_closed_between_two_frames_does_not_stop_the_handover(
        run: Runner, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 hands its idle connections over a frame at a time; one of them is
    closed by v1 (aiohttp's keep-alive timeout) while the successor takes
    the first frame. That one is done with, not a failed move: the others
    still move, and so does a connection busy meanwhile once it has
    answered (keep-alive, not told to close); each next request on them is
    answered by v2 on the same connection; nothing is cut. (Counted as not
    moved, it stopped the handover: every connection left with v1 was told
    to close, in a reviewer's run of 300 connections.)"""
    import hotswap.migrate
    # A frame carries up to 253 connections: one here, so that three idle
    # connections take three frames (no other way short of 254 clients).
    monkeypatch.setattr(hotswap.migrate, "MAX_FDS_PER_FRAME", 1)
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        name, gate, entered = f"s-{uuid.uuid4().hex[:10]}", asyncio.Event(), asyncio.Event()
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1_conns: dict[Any, web.RequestHandler] = {}  # by the client's address

        @web.middleware
        async def remember(request: web.Request, handler: Handler) -> web.StreamResponse:
            assert request.transport is not None
            v1_conns[request.transport.get_extra_info("peername")] = request.protocol
            return await handler(request)

        app = app_of("v1", gate, entered)
        app.middlewares.append(remember)
        v1 = hotswap.Upgrader(name, version="v1", options=hotswap.Options(env={}))
        v1_task = asyncio.create_task(hotswap.aiohttp.serve(
            app, v1, sockets, drain_timeout=10, handle_signals=False,
            yield_cpu_after_drain=False))
        await until(serving(v1), "v1 serving")
        port = port_of(v1.status())
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        busy = await asyncio.open_connection("127.0.0.1", port)
        clients = [*idle, busy]
        addr = {w: w.get_extra_info("sockname") for _, w in clients}
        adopted: list[Any] = []
        closed: list[Any] = []

        def on_adopt(peer: Any) -> None:
            adopted.append(peer)
            if len(adopted) == 1:
                # The first frame is with v2, not yet acknowledged: v1 closes
                # one of the idle connections still to send, as aiohttp's
                # keep-alive timeout does (RequestHandler.force_close()),
                # here at the moment a timer would hit only by chance.
                later = next(addr[w] for _, w in idle if addr[w] != peer)
                v1_conns[later].force_close()
                closed.append(later)

        class Watched(hotswap.Upgrader):
            # serve() gives the upgrader its own adopter; this one also
            # tells the test which connection came, before serving it.
            def adopt_connections(self, adopter: Callable[[str, socket.socket], None]
                                  ) -> None:
                def watched(listener: str, sock: socket.socket) -> None:
                    on_adopt(sock.getpeername())
                    adopter(listener, sock)
                super().adopt_connections(watched)

        try:
            for reader, writer in idle:
                assert (await request(reader, writer)).endswith(b"version(v1)")
            busy[1].write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            v2 = Watched(name, version="v2", options=hotswap.Options(env={}))
            v2_task = asyncio.create_task(hotswap.aiohttp.serve(
                app_of("v2"), v2, sockets, handle_signals=False,
                yield_cpu_after_drain=False))
            # The round that met the closed connection is over.
            await until(lambda: f"{name}: handed 2 idle connection(s) to the successor"
                        in caplog.text,
                        "v1 to hand over the other two idle connections")
            assert len(closed) == 1 and sorted(adopted) == sorted(
                addr[w] for _, w in idle if addr[w] != closed[0])
            gate.set()
            answer = await read_response(busy[0])
            assert answer.endswith(b"version(v1) read 0"), answer
            assert b"connection: close" not in answer, answer  # the handover goes on
            for reader, writer in clients:
                if addr[writer] in closed:
                    assert await asyncio.wait_for(reader.read(), 10) == b""
                    continue
                # The same connection, answered by v2, not told to close.
                answer = await request(reader, writer)
                assert answer.endswith(b"version(v2)"), answer
                assert b"connection: close" not in answer, answer
        finally:
            for _, writer in clients:
                writer.close()
        assert await asyncio.wait_for(v1_task, 15) == 0
        assert "drained, 0 connection(s) cut" in caplog.text, caplog.text
        assert "connection handover stopped" not in caplog.text, caplog.text
        await stop_serving(v2, v2_task)

    run(main())


def test_a_version_taken_over_idles_until_the_app_asks_it_to_stop(run: Runner) -> None:
    """serve(handle_signals=False, idle_after_drain=True) (a Kruise slot
    whose app handles SIGTERM itself): taken over, v1 drains and idles, and
    returns 0 once the app's handler calls upgrader.request_stop(). (The
    idle waited for an event only serve()'s own signal handler set: v1
    never returned, and the kubelet killed it at the end of its grace.)"""
    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1 = hotswap.Upgrader(name, version="v1", options=hotswap.Options(env={}))
        v1_task = asyncio.create_task(hotswap.aiohttp.serve(
            app_of("v1"), v1, sockets, drain_timeout=1, idle_after_drain=True,
            handle_signals=False, yield_cpu_after_drain=False))
        await until(serving(v1), "v1 serving")
        v2, v2_task = start(name, "v2", sockets)
        await until(serving(v2), "v2 serving")
        await until(lambda: v1.state is hotswap.State.STOPPED, "v1 drained")
        assert not v1_task.done()  # idle, as a Kruise slot must be
        v1.request_stop()  # what the app's SIGTERM handler does
        assert await asyncio.wait_for(v1_task, 10) == 0
        await stop_serving(v2, v2_task)

    run(main())


def test_a_version_stopped_while_waiting_to_take_over_exits_cleanly(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """v3 starts while v2 still follows v1's drain (v1 answers a held
    request), so it is refused as busy and waits. Stopped meanwhile (the
    pod goes), serve() returns 0 at once, having taken nothing: a stop, not
    a failure; v2 serves on."""
    import logging
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        name, gate, entered = f"s-{uuid.uuid4().hex[:10]}", asyncio.Event(), asyncio.Event()
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        upgrader = hotswap.Upgrader(name, version="v1", options=hotswap.Options(env={}))
        v1_task = asyncio.create_task(hotswap.aiohttp.serve(
            app_of("v1", gate, entered), upgrader, sockets, drain_timeout=20,
            handle_signals=False, yield_cpu_after_drain=False))
        await until(serving(upgrader), "v1 serving")
        port = port_of(upgrader.status())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            v3, v3_task = start(name, "v3", sockets)
            await until(lambda: "serving process busy" in caplog.text, "v3 refused (busy)")
            await stop_serving(v3, v3_task)
            assert "stop requested before taking over" in caplog.text
            assert v2.status().state == "serving"
            gate.set()
            assert (await read_response(reader)).endswith(b"version(v1) read 0")
        finally:
            writer.close()
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())


def test_a_request_still_running_after_the_drain_gets_a_1s_grace(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """A handler that does not finish: after the drain (0.2 s) it gets the 1 s
    grace, then its connection is cut, about 1.2 s after the stop. aiohttp
    waits its shutdown_timeout twice (for the handler, then again after
    cancelling the request): a shutdown_timeout of 1 s was a 2 s grace, and
    the defaults overran Kubernetes' 30 s. The cut is logged and counted (it
    used to say "0 connection(s) cut")."""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        entered = asyncio.Event()

        async def never(request: web.Request) -> web.Response:
            entered.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        app = web.Application()
        app.router.add_get("/never", never)
        upgrader, task = await serve_v1(app, drain_timeout=0.2)
        port = port_of(upgrader.status())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            loop = asyncio.get_running_loop()
            stopped = loop.time()
            upgrader.request_stop()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # cut
            elapsed = loop.time() - stopped
        finally:
            writer.close()
        assert await asyncio.wait_for(task, 10) == 0
        assert 1.0 <= elapsed < 1.7, elapsed  # 0.2 s drain + 1 s grace
        assert "drain grace over: cutting busy connection" in caplog.text, caplog.text
        assert "drained, 1 connection(s) cut" in caplog.text, caplog.text

    run(main())


def test_close_while_serve_runs_is_a_stop(run: Runner,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """upgrader.close() from the app (another task) while serve() runs on it
    closed the listeners under serve()'s servers: serve() then raised in its
    drain (a ValueError from the event loop, for a socket closed under it)
    and the request in flight was lost. It now asks serve() to stop, as
    request_stop() does: the request is answered, serve() drains, closes
    the upgrader and returns 0."""
    async def main() -> None:
        gate, entered = asyncio.Event(), asyncio.Event()
        upgrader, task = await serve_v1(app_of("v1", gate, entered), drain_timeout=5)
        reader, writer = await asyncio.open_connection("127.0.0.1",
                                                       port_of(upgrader.status()))
        try:
            writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            await asyncio.wait_for(upgrader.close(), 5)  # returns at once
            assert "close() while serve() runs: stopping it instead" in caplog.text
            await until(lambda: upgrader.state is hotswap.State.DRAINING, "the drain")
            gate.set()
            answer = await asyncio.wait_for(reader.read(), 10)  # then closed
            assert answer.startswith(b"HTTP/1.1 200") and b"version(v1) read 0" in answer
            assert b"Connection: close" in answer
        finally:
            writer.close()
        assert await asyncio.wait_for(task, 10) == 0
        assert upgrader.state is hotswap.State.STOPPED

    run(main())


def test_a_body_still_arriving_at_the_deadline_is_read_in_the_grace(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    """An upload whose body is still arriving when the drain ends gets the
    grace like any busy request: the rest of its body is read and it is
    answered, told to close. (aiohttp stops reading a connection once its
    runner shuts down: the handler waited for the body until it was
    cancelled, and the client got EOF instead of its answer.)"""
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        entered = asyncio.Event()

        async def upload(request: web.Request) -> web.Response:
            entered.set()
            return web.Response(text=f"read {len(await request.read())}")

        app = web.Application()
        app.router.add_post("/upload", upload)
        upgrader, task = await serve_v1(app, drain_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(upgrader.status()))
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n"
                         + b"a" * 1000)
            await asyncio.wait_for(entered.wait(), 10)
            upgrader.request_stop()
            await until(lambda: "is busy; its response says Connection: close" in caplog.text,
                        "the drain deadline")
            writer.write(b"a" * 1000)  # the rest, in the grace
            answer = await read_response(reader)
            assert answer.startswith(b"http/1.1 200") and b"connection: close" in answer, answer
            assert answer.endswith(b"read 2000"), answer
        finally:
            writer.close()
        assert await asyncio.wait_for(task, 10) == 0
        assert "drained, 0 connection(s) cut" in caplog.text, caplog.text

    run(main())


def test_serve_puts_the_signal_actions_back(run: Runner) -> None:
    """serve() handles SIGTERM, SIGINT and SIGHUP while it runs, and leaves
    them as it found them: asyncio's remove_signal_handler() alone would
    leave SIG_DFL, so a process started with SIGHUP ignored (nohup) would
    die of one after serve() returned. A handler the app had added to the
    loop is gone with serve()'s own: the default action applies, not the
    loop's stub, which would swallow the signal."""
    import signal

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not expected to run")

    def helpers_own(signum: int, frame: object) -> None:
        pass

    helpers_own.__module__ = "asyncio_helpers"  # a package of the app's, not asyncio
    assert hotswap.aiohttp._restorable(helpers_own)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, mine)
    try:
        async def main() -> None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: None)
            upgrader = hotswap.Upgrader(f"s-{uuid.uuid4().hex[:10]}", version="v1",
                                        options=hotswap.Options(env={}))
            task = asyncio.create_task(hotswap.aiohttp.serve(
                app_of("v1"), upgrader, {"http": ("127.0.0.1", 0)}, drain_timeout=1,
                yield_cpu_after_drain=False))
            await until(serving(upgrader), "v1 serving")
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_IGN, signal.SIG_DFL)
            upgrader.request_stop()
            assert await asyncio.wait_for(task, 10) == 0
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        run(main())
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        for signum, action in saved.items():
            signal.signal(signum, action)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_sighup_as_serve_puts_the_actions_back_meets_the_old_one(loop: str) -> None:
    """Between asyncio's remove_signal_handler() (SIG_DFL) and serve()'s
    putting the old action back, a SIGHUP killed a process started with it
    ignored (nohup), after a clean drain: its exit said SIGHUP, and nothing
    after serve() ran (4 of 300 runs under a SIGHUP every 0.5 ms). Here the
    SIGHUP is sent in that very place, by the loop's remove_signal_handler()
    (a subclass: the window is a few bytecodes wide), in a process of its
    own (it would kill this one)."""
    probe = f"""
import asyncio, os, signal, sys, uuid
import uvloop
from aiohttp import web
import hotswap, hotswap.aiohttp

base = asyncio.SelectorEventLoop if {loop!r} == "asyncio" else uvloop.Loop

class Loop(base):
    def remove_signal_handler(self, sig):
        removed = super().remove_signal_handler(sig)
        if sig == signal.SIGHUP:
            os.kill(os.getpid(), signal.SIGHUP)  # the default action, if not held
        return removed

async def main():
    upgrader = hotswap.Upgrader(f"s-{{uuid.uuid4().hex[:10]}}", version="v1",
                                options=hotswap.Options(env={{}}))
    task = asyncio.ensure_future(hotswap.aiohttp.serve(
        web.Application(), upgrader, {{"http": ("127.0.0.1", 0)}}, drain_timeout=1,
        yield_cpu_after_drain=False))
    async with asyncio.timeout(30):  # until it serves
        while upgrader.state is not hotswap.State.SERVING:
            await asyncio.sleep(0.01)
    upgrader.request_stop()
    return await task

signal.signal(signal.SIGHUP, signal.SIG_IGN)
loop = Loop()
print("returned", loop.run_until_complete(main()), flush=True)
loop.close()
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert (done.returncode, done.stdout) == (0, "returned 0\n"), done.stderr


@pytest.mark.parametrize("migrate", [True, False], ids=["migrate", "no-migrate"])
@pytest.mark.parametrize("case", ["started", "served-already", "start-failed"])
def test_serve_refuses_an_upgrader_started_before_and_leaves_no_signal_handler(
        run: Runner, case: str, migrate: bool) -> None:
    """serve() starts its upgrader itself. Given one the app had started,
    or one a serve() before had used, or one whose start() had failed, it
    says so, before installing anything: it used to raise
    "adopt_connections() must come before start()", which the app never
    called, and left its SIGTERM, SIGINT and SIGHUP handlers on the loop
    (the next SIGTERMs were swallowed). The upgrader is left as it was.
    Without connection handover too (a failed start() once slipped through
    there: no adopt_connections() call to refuse it)."""
    import signal

    async def main() -> None:
        loop = asyncio.get_running_loop()
        name = f"s-{uuid.uuid4().hex[:10]}"
        upgrader = hotswap.Upgrader(name, version="v1", options=hotswap.Options(env={}))
        holder = None
        if case == "started":
            await upgrader.start()
        elif case == "served-already":
            task = asyncio.create_task(hotswap.aiohttp.serve(
                app_of("v1"), upgrader, {"http": ("127.0.0.1", 0)}, handle_signals=False,
                yield_cpu_after_drain=False))
            await until(serving(upgrader), "v1 serving")
            await stop_serving(upgrader, task)
        else:  # another process holds the control socket: start() fails
            holder = hotswap.Upgrader(name, version="v0", options=hotswap.Options(env={}))
            await holder.start()
            upgrader = hotswap.Upgrader(name, version="v1", options=hotswap.Options(
                env={"SIDECARSET_VERSION": "1"}))
            with pytest.raises(hotswap.ListenerError):
                await upgrader.start()
        state = upgrader.state
        before = signal.getsignal(signal.SIGTERM)
        try:
            with pytest.raises(hotswap.HotswapError, match=r"serve\(\) starts the upgrader "
                               r"itself, and this one was started already"):
                await asyncio.wait_for(hotswap.aiohttp.serve(
                    app_of("v1"), upgrader, {"http": ("127.0.0.1", 0)},
                    migrate_connections=migrate, yield_cpu_after_drain=False), 10)
            assert not loop.remove_signal_handler(signal.SIGTERM)
            assert signal.getsignal(signal.SIGTERM) is before
            assert upgrader.state is state
        finally:
            await upgrader.close()
            if holder is not None:
                await holder.close()

    run(main())


async def held_unread(transport: asyncio.Transport) -> None:
    """What the client just sent has reached the server's socket (a socket
    pair's: in one write) and stays there unread while the loop runs, the
    drain's pause holding it."""
    fd = transport.get_extra_info("socket").fileno()
    await until(lambda: queued(fd, termios.FIONREAD) > 0, "the request in the kernel")
    for _ in range(5):  # the loop's chances to read it, had anything resumed it
        await asyncio.sleep(0)
    assert queued(fd, termios.FIONREAD) > 0, "read while the drain held the connection"


def test_the_drain_resumes_only_the_reading_it_paused(
        run: Runner) -> None:
    """The drain pauses a busy connection's reading so that its next request
    stays in the kernel until it moves, and resumes it if it does not move.
    A pause of aiohttp's own (flow control: the handler has not read the
    body it was sent, more than aiohttp buffers) is aiohttp's to undo: the
    drain must leave it, or a client could push an unbounded body into
    memory. Real transports on a socket pair, both loops."""
    async def main() -> None:
        gate = asyncio.Event()

        async def handler(request: web.BaseRequest) -> web.Response:
            await gate.wait()
            return web.Response(text=f"read {len(await request.read())}")

        async with tracked_connection(handler) as (tracked, transport, reader, writer):
            assert transport.is_reading()
            tracked.pause()  # the drain's own pause ...
            assert not transport.is_reading()
            tracked.resume()  # ... is undone
            assert transport.is_reading()
            # Far more than aiohttp buffers of a body unread, and under the
            # default client_max_size of 1 MiB, which aiohttp up to 3.13
            # refuses a body of exactly that size with (413; 3.14 takes it).
            size = (1 << 20) - 1
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                         + b"x" * size)
            await until(lambda: not transport.is_reading(), "aiohttp's flow control")
            tracked.pause()
            tracked.resume()
            assert not transport.is_reading()  # still aiohttp's to undo
            gate.set()  # the handler reads the body: aiohttp resumes
            assert (await read_response(reader)).endswith(b"read %d" % size)

    run(main())


def test_the_drain_holds_the_reading_while_its_handler_reads_a_buffered_body(
        run: Runner) -> None:
    """A body received whole in the read that took aiohttp over its buffer's
    high-water mark: aiohttp 3.10 keeps its pause of the reading after the
    body's end (3.11 on end it there). The connection is busy, every byte
    received whole requests: the drain pauses it. Then the handler reads
    the body, and aiohttp ends its pause by resuming the transport: on
    3.10 that undid the drain's pause, and the client's next request was
    read in the drain. The drain's pause must hold until its own resume
    (on 3.14, see the full-queue test below). Real transports on a socket
    pair, both loops."""
    async def main() -> None:
        gate = asyncio.Event()

        async def handler(request: web.BaseRequest) -> web.Response:
            await gate.wait()
            return web.Response(text=f"{request.path} read {len(await request.read())}")

        async with tracked_connection(handler) as (tracked, transport, reader, writer):
            size = 200_000  # over aiohttp's high-water mark, in one read
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % size + b"x" * size)
            await until(lambda: tracked.busy_at_boundary() and tracked._current_request
                        is not None, "the body received whole")
            tracked.pause()  # the drain's round
            assert not transport.is_reading()
            gate.set()  # the handler reads the body
            assert (await read_response(reader)).endswith(b"/big read %d" % size)
            await until(tracked.idle_at_boundary, "idle at a boundary")
            assert not transport.is_reading()  # the drain's pause held
            writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")  # in the kernel
            await held_unread(transport)
            assert tracked.idle_at_boundary()  # not read while the drain holds it
            tracked.resume()
            assert (await read_response(reader)).endswith(b"/next read 0")

    run(main())


def test_the_drain_holds_the_reading_while_aiohttp_drains_its_full_queue(
        run: Runner) -> None:
    """aiohttp 3.14 pauses a connection's reading while 32 requests are
    queued, and resumes it once half of them are answered. The drain's
    pause of that connection (busy, every byte received whole requests:
    its next request is to wait in the kernel until the connection has
    moved) is no pause of aiohttp's: it must hold through that resume, and
    only the drain's resume ends it. (It used to be skipped, the reading
    being paused already, and aiohttp's resume read on: a client that kept
    more than 32 requests pipelined was read through the whole drain.)
    The drain's resume still leaves a pause of aiohttp's own in place.
    aiohttp 3.10 to 3.13 have no such pause: they queue every pipelined
    request they read and resume the reading only after a pause of their
    own (a body's buffer), so there the 40 requests are queued with the
    reading on, and the rest is the same: the drain's pause holds while
    they are answered, until the drain's resume. Real transports on a
    socket pair, both loops."""
    from aiohttp.base_protocol import BaseProtocol

    pauses_for_a_full_queue = hasattr(BaseProtocol, "_pause_reading_for_buffer")  # 3.14

    async def main() -> None:
        gate = asyncio.Event()

        async def handler(request: web.BaseRequest) -> web.Response:
            if request.path == "/held":
                await gate.wait()
            return web.Response(text=request.path)

        async with tracked_connection(handler) as (tracked, transport, reader, writer):
            writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n"
                         + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 40)  # one read
            if pauses_for_a_full_queue:
                await until(lambda: not transport.is_reading(), "aiohttp's queue full")
                assert tracked.busy_at_boundary()
                tracked.pause()
                tracked.resume()
                assert not transport.is_reading()  # aiohttp's pause stays
            else:
                await until(lambda: len(tracked._messages) == 40, "all 40 queued")
                assert transport.is_reading()  # no pause of aiohttp's
            assert tracked.busy_at_boundary()
            tracked.pause()  # the drain's round
            assert not transport.is_reading()
            gate.set()
            assert (await read_response(reader)).endswith(b"/held")
            for _ in range(40):
                assert (await read_response(reader)).endswith(b"/")
            await until(tracked.idle_at_boundary, "idle at a boundary")
            assert not transport.is_reading()  # the drain's pause held
            writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")  # in the kernel
            await held_unread(transport)
            assert tracked.idle_at_boundary()  # not read while the drain holds it
            tracked.resume()
            assert (await read_response(reader)).endswith(b"/next")

    run(main())


@pytest.mark.parametrize("length", [b"18446744073709551615", b"018446744073709551615"])
def test_a_content_length_the_parser_takes_for_none_is_not_framed_on_its_word(
        run: Runner, length: bytes) -> None:
    """aiohttp's C parser gives a request whose Content-Length is 2**64 - 1
    (llhttp's value for "none") its empty payload and answers it, while
    llhttp reads everything the client sends after it as that body (a next
    request is never answered). The framer must not take the parser's "no
    body" for it: such a connection moved, and the successor read the
    body's bytes as requests. It gives up on it (20 digits), as it does
    when it reads the headers itself. Real transports on a socket pair."""
    async def main() -> None:
        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response(text=f"read {len(await request.read())}")

        async with tracked_connection(handler) as (tracked, _, reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                         + b"\r\n\r\n")  # one read: what the parser's word is taken for
            async with asyncio.timeout(5):
                answer = await read_response(reader)
            assert answer.endswith(b"read 0"), answer
            await until(tracked.idle, "the request answered")
            assert not tracked.at_boundary() and not tracked.trackable()

    run(main())


def test_a_read_that_ends_inside_a_next_requests_head_is_not_at_a_boundary(
        run: Runner) -> None:
    """One read holds a whole GET and the first bytes of the next request's
    head: aiohttp's parser makes the GET and keeps the rest in its buffer,
    where the connection's idleness does not show it. The framer must read
    that read itself (the fast path takes the parser's word only for a read
    that ends with a header block's end): taken on the parser's word, the
    connection read as idle at a boundary once the GET was answered, moved,
    and those bytes were lost (the successor read the rest of the head as
    a request of its own). The rest sent, both are answered here. Real
    transports on a socket pair."""
    async def main() -> None:
        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response(text=f"path {request.path}")

        async with tracked_connection(handler) as (tracked, _, reader, writer):
            writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHo")
            async with asyncio.timeout(5):
                first = await read_response(reader)
            assert first.endswith(b"path /first"), first
            await until(tracked.idle, "the first request answered")
            assert not tracked.at_boundary() and not tracked.idle_at_boundary()
            writer.write(b"st: x\r\n\r\n")
            async with asyncio.timeout(5):
                second = await read_response(reader)
            assert second.endswith(b"path /second"), second
            await until(tracked.idle, "the second request answered")
            assert tracked.idle_at_boundary()

    run(main())


def test_pipelined_requests_aiohttp_holds_unparsed_keep_a_connection_from_moving(
        run: Runner) -> None:
    """aiohttp 3.14's parser stops between requests while it counts 32 in
    flight and keeps the rest. A request whose body came in a later read
    than its headers leaves that count one too high for good, so a later
    read of 40 pipelined requests is parsed only up to the 31st: the other
    9 sit in the parser, unanswered, on a connection that looks idle, with
    every byte received whole requests. Moved then, those 9 requests were
    lost with the old process. The drain asks aiohttp to parse what it
    holds before it takes a connection for idle (as aiohttp does itself
    when its queue drains): the connection is busy, and all 41 requests are
    answered. Real transports on a socket pair."""
    async def main() -> None:
        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response(text=f"read {len(await request.read())}")

        async with tracked_connection(handler) as (tracked, _, reader, writer):
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            # Its handler has taken it and waits for the body: a later read.
            await until(lambda: tracked._current_request is not None, "the request taken")
            writer.write(b"hello")
            assert (await read_response(reader)).endswith(b"read 5")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 40)  # one read
            for _ in range(31):  # what aiohttp answers of them by itself
                assert (await read_response(reader)).endswith(b"read 0")
            # The drain's check, until it holds: it asks aiohttp's parser for
            # what it holds, so the connection is idle at a boundary only
            # once all 40 are answered. (An aiohttp without the stall
            # answers them all anyway.)
            await until(tracked.idle_at_boundary, "idle at a boundary")
            for _ in range(9):
                assert (await read_response(reader)).endswith(b"read 0")

    run(main())


def test_requests_aiohttp_held_unparsed_at_the_handover_are_answered(
        run: Runner) -> None:
    """The test above through a real handover: v1 holds 9 pipelined
    requests unparsed (aiohttp's count of requests in flight one too high
    after a body read apart from its request) when v2 takes over. The
    drain brings them out instead of moving the connection with them: v1
    answers all 9, then the connection moves, and its next request is
    answered by v2. (Moved with them, the 9 were never answered.)"""
    async def main() -> None:
        entered = asyncio.Event()

        async def read(request: web.Request) -> web.Response:
            entered.set()  # the request taken from aiohttp's queue, its body to come
            return web.Response(text=f"version(v1) read {len(await request.read())}")

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="version(v1)")

        app = web.Application()
        app.router.add_post("/read", read)
        app.router.add_get("/", hello)
        v1, v1_task = await serve_v1(app, drain_timeout=5.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(v1.status()))
        try:
            writer.write(b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 10)
            writer.write(b"hello")
            assert (await read_response(reader)).endswith(b"version(v1) read 5")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 40)  # one read
            for _ in range(31):
                assert (await read_response(reader)).endswith(b"version(v1)")
            v2, v2_task = start(v1.name, "v2", {"http": ("127.0.0.1", 0)})
            for _ in range(9):
                assert (await read_response(reader)).endswith(b"version(v1)")
            assert await asyncio.wait_for(v1_task, 10) == 0
            await answered_by_v2(reader, writer)
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())


def test_requests_sent_behind_a_full_queue_in_the_drain_wait_for_v2(
        run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client has 41 requests pipelined on v1 when v2 takes over, the
    first one's answer held: aiohttp 3.14 has paused the reading (32
    queued). v1's drain pauses the connection too, and the client sends 40
    more. v1 answers its 41, and the connection moves with the 40 still in
    the kernel: v2 answers them, all keep-alive. (aiohttp resumed the
    reading once half its queue was answered, and v1 read the 40 too: a
    client that kept more than 32 requests in flight was read through the
    whole drain, never moved, and was told to close at its end, the
    requests behind that response lost.)"""
    rounds = drain_rounds(monkeypatch)

    async def main() -> None:
        name, gate = f"s-{uuid.uuid4().hex[:10]}", asyncio.Event()
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=5.0, gate=gate)
        await until(serving(v1), "v1 serving")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(v1.status()))
        get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n" + get * 40)
            v2, v2_task = start(name, "v2", sockets)
            await until(serving(v2), "v2 serving")
            await v1_draining_for(v1, rounds)
            writer.write(get * 40)
            await writer.drain()
            gate.set()
            answers = [await read_response(reader) for _ in range(81)]
            assert all(b"connection: close" not in answer for answer in answers)
            assert answers[0].endswith(b"version(v1) read 0"), answers[0]
            assert [answer.rsplit(b"\r\n\r\n", 1)[1] for answer in answers[1:]] \
                == [b"version(v1)"] * 40 + [b"version(v2)"] * 40
            assert await asyncio.wait_for(v1_task, 5) == 0
            await answered_by_v2(reader, writer)
        finally:
            writer.close()
        await stop_serving(v2, v2_task)

    run(main())


def test_the_sites_listen_with_the_queue_hotswap_binds_with(
        run: Runner) -> None:
    """aiohttp's sites call listen(128) again on the socket they are given:
    the 1,024 that hotswap binds with became 128, in every version after
    it. serve() passes its own, to the tracked and the plain sites. (Read
    with ss: Send-Q is a listener's queue size.)"""
    async def main() -> None:
        upgrader = hotswap.Upgrader(f"s-{uuid.uuid4().hex[:10]}", version="v1",
                                    options=hotswap.Options(env={}))
        for migrate in (True, False):
            task = asyncio.create_task(hotswap.aiohttp.serve(
                app_of("v1"), upgrader, {"http": ("127.0.0.1", 0)}, drain_timeout=1,
                handle_signals=False, yield_cpu_after_drain=False,
                migrate_connections=migrate))
            await until(serving(upgrader), "v1 serving")
            port = port_of(upgrader.status())
            ss = await asyncio.create_subprocess_exec(
                "ss", "-ltnH", f"sport = :{port}", stdout=asyncio.subprocess.PIPE)
            out = (await asyncio.wait_for(ss.communicate(), 10))[0].decode().split()
            assert out[2] == str(hotswap.listeners.DEFAULT_BACKLOG), out  # Send-Q
            upgrader.request_stop()
            assert await asyncio.wait_for(task, 10) == 0
            upgrader = hotswap.Upgrader(f"s-{uuid.uuid4().hex[:10]}", version="v1",
                                        options=hotswap.Options(env={}))

    run(main())


# -- TLS listeners ---------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 made now (openssl; the
    project does not depend on ``cryptography``): its file and its key's."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate with")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def tls_contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The server's context and a client's that trusts only that certificate."""
    cert, key = certificate
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


async def close_all(*writers: asyncio.StreamWriter) -> None:
    """Close each client connection and wait for it (a TLS one's close
    notify may meet a peer already gone: not this test's concern)."""
    for writer in writers:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def accepted(pid: int, client: socket.socket) -> bool:
    """Process ``pid`` holds the server side of ``client``'s connection: it
    has accepted it (one still in the listen queue is no process's)."""
    return any(c.raddr and tuple(c.raddr) == client.getsockname()
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def port_named(upgrader: hotswap.Upgrader, name: str) -> int:
    return int(next(i.address for i in upgrader.status().listeners
                    if i.name == name).rsplit(":", 1)[1])


def test_tls_connections_drain_the_safe_way_while_plain_ones_move(
        run: Runner, certificate: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """v1 serves HTTP and HTTPS (serve(ssl_context={"https": ...})); a
    plain and a TLS keep-alive client each send a request, v2 takes over.
    The plain connection moves: v2 answers its next request on the same
    connection. The TLS one cannot (its session state stays in v1): v1
    answers its next request with Connection: close and closes it after;
    the client reconnects, and v2 answers over TLS with its own context.
    Nothing is cut, no request fails, no descriptor is left."""
    server_ctx, client_ctx = tls_contexts(certificate)
    caplog.set_level(logging.INFO, logger="hotswap")
    name = f"s-{uuid.uuid4().hex[:10]}"

    async def main() -> None:
        sockets: dict[str, Address] = {"http": ("127.0.0.1", 0),
                                               "https": ("127.0.0.1", 0)}
        tls = {"https": server_ctx}
        v1, v1_task = start(name, "v1", sockets, ssl_context=tls)
        await until(serving(v1), "v1 serving")
        http, https = port_named(v1, "http"), port_named(v1, "https")
        plain = await asyncio.open_connection("127.0.0.1", http)
        secure = await asyncio.open_connection("127.0.0.1", https, ssl=client_ctx)
        again: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            assert plain[1].get_extra_info("ssl_object") is None
            assert secure[1].get_extra_info("ssl_object") is not None
            for reader, writer in (plain, secure):
                first = await request(reader, writer)
                assert b"connection: close" not in first and first.endswith(b"version(v1)"), \
                    first
            local = plain[1].get_extra_info("sockname")
            v2, v2_task = start(name, "v2", sockets, ssl_context=tls)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            moved = await request(*plain)  # same connection, now v2's
            assert b"connection: close" not in moved and moved.endswith(b"version(v2)"), moved
            assert plain[1].get_extra_info("sockname") == local
            told = await request(*secure)
            assert b"connection: close" in told and told.endswith(b"version(v1)"), told
            async with asyncio.timeout(5):
                assert await secure[0].read() == b""  # v1 closed it after that response
            again = await asyncio.open_connection("127.0.0.1", https, ssl=client_ctx)
            assert again[1].get_extra_info("ssl_object") is not None
            answer = await request(*again)
            assert b"connection: close" not in answer and answer.endswith(b"version(v2)"), \
                answer
            assert (await request(*plain)).endswith(b"version(v2)")
        finally:
            await close_all(*(w for _, w in (plain, secure, *([again] if again else []))))
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())
    drained = [m for m in caplog.messages if "drained," in m]
    assert drained == [f"{name}: drained, 0 connection(s) cut"] * 2, drained  # v1, v2


def test_a_tls_handshake_that_ends_in_the_drain_is_told_to_close(
        run: Runner, certificate: tuple[Path, Path]) -> None:
    """A TLS connection that v1 accepted before the takeover but whose
    handshake ends only in the drain joins v1's server then, with the
    request factory it had when accepted, and no round of the drain has
    seen it: its first response still says Connection: close (else it
    would be kept alive, idle, and cut at the deadline under its client).
    (Another TLS client, idle, keeps v1 draining meanwhile, beyond the 2 s
    the drain waits for a handshake in progress.)"""
    server_ctx, client_ctx = tls_contexts(certificate)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"https": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, ssl_context=server_ctx)
        await until(serving(v1), "v1 serving")
        port = port_named(v1, "https")
        idle = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        raw = socket.socket()
        raw.setblocking(False)
        try:
            assert (await request(*idle)).endswith(b"version(v1)")
            await loop.sock_connect(raw, ("127.0.0.1", port))
            await until(lambda: accepted(os.getpid(), raw), "v1 accepting it (no handshake yet)")
            v2, v2_task = start(name, "v2", sockets, ssl_context=server_ctx)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            reader, writer = await asyncio.open_connection(
                sock=raw, ssl=client_ctx, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            idle[1].close()
            raise
        try:
            answer = await request(reader, writer)
            assert b"connection: close" in answer and answer.endswith(b"version(v1)"), answer
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            last = await request(*idle)
            assert b"connection: close" in last and last.endswith(b"version(v1)"), last
        finally:
            await close_all(writer, idle[1])
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())


def test_a_tls_connection_that_joins_in_the_drain_gets_the_grace_for_its_first_request(
        run: Runner, certificate: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """A TLS connection that v1 accepted before the takeover ends its
    handshake in the drain, and its client sends its first request only
    after v1's (short) drain deadline. Nothing of a request had arrived, so
    it looked idle there and was cut: the first request on a connection
    just opened failed. One that joined in the drain and has had no
    request yet is busy now: it gets the grace, and its request is
    answered (told to close)."""
    server_ctx, client_ctx = tls_contexts(certificate)
    caplog.set_level(logging.INFO, logger="hotswap")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"https": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=1.0, ssl_context=server_ctx)
        await until(serving(v1), "v1 serving")
        raw = socket.socket()
        raw.setblocking(False)
        try:
            await loop.sock_connect(raw, ("127.0.0.1", port_named(v1, "https")))
            await until(lambda: accepted(os.getpid(), raw), "v1 accepting it (no handshake yet)")
            v2, v2_task = start(name, "v2", sockets, ssl_context=server_ctx)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            reader, writer = await asyncio.open_connection(
                sock=raw, ssl=client_ctx, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise
        try:
            await until(lambda: "drain deadline:" in caplog.text, "v1's drain deadline")
            answer = await request(reader, writer)
            assert b"connection: close" in answer and answer.endswith(b"version(v1)"), answer
        finally:
            await close_all(writer)
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())
    drained = [m for m in caplog.messages if "drained," in m]
    assert drained[0].endswith("drained, 0 connection(s) cut"), drained  # v1


@pytest.mark.parametrize("kind", ["tls", "plain"])
def test_a_request_still_arriving_at_the_deadline_is_answered_not_cut(
        run: Runner, certificate: tuple[Path, Path], kind: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A keep-alive client sends the start of its next request's head just
    before v2 takes over, and the rest only after v1's drain deadline. The
    connection cannot move (a TLS one never does; a plain one is not at a
    request boundary), and at the deadline aiohttp shows it idle (no request
    parsed): v1 cut it as idle, and the client got EOF for the request it
    was sending. It is busy now: told to close, it gets the grace, the rest
    of its head is read and the request is answered."""
    server_ctx, client_ctx = tls_contexts(certificate)
    caplog.set_level(logging.INFO, logger="hotswap")
    tls: dict[str, Any] = {"ssl_context": server_ctx} if kind == "tls" else {}

    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"web": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets, drain_timeout=0.5, **tls)
        await until(serving(v1), "v1 serving")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port_named(v1, "web"), ssl=client_ctx if tls else None)
        try:
            assert (await request(reader, writer)).endswith(b"version(v1)")
            writer.write(b"GET / HTTP/1.1\r\nHo")
            await writer.drain()
            v2, v2_task = start(name, "v2", sockets, **tls)
            await until(serving(v2), "v2 serving")
            await until(lambda: "drain deadline:" in caplog.text, "v1's drain deadline")
            writer.write(b"st: x\r\n\r\n")  # the rest, in the grace
            answer = await read_response(reader)
            assert b"connection: close" in answer and answer.endswith(b"version(v1)"), answer
        finally:
            await close_all(writer)
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())
    drained = [m for m in caplog.messages if "drained," in m]
    assert drained[0].endswith("drained, 0 connection(s) cut"), drained  # v1


def test_a_plain_connection_handed_to_a_tls_listener_stays_plain(
        run: Runner, certificate: tuple[Path, Path]) -> None:
    """v2 turns TLS on for the listener v1 served plain: the socket is
    handed over as always, and v1's idle plain keep-alive connection moves
    too. v2 serves it on in plain HTTP, as its client speaks it (the
    connection handover adopts into v2's server though none of its sites
    is tracked); new connections get TLS."""
    server_ctx, client_ctx = tls_contexts(certificate)

    async def main() -> None:
        name = f"s-{uuid.uuid4().hex[:10]}"
        sockets: dict[str, Address] = {"web": ("127.0.0.1", 0)}
        v1, v1_task = start(name, "v1", sockets)
        await until(serving(v1), "v1 serving")
        port = port_named(v1, "web")
        plain = await asyncio.open_connection("127.0.0.1", port)
        secure: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            assert (await request(*plain)).endswith(b"version(v1)")
            v2, v2_task = start(name, "v2", sockets, ssl_context=server_ctx)
            await until(serving(v2), "v2 serving")
            await until(lambda: v1.state is hotswap.State.DRAINING, "v1 draining")
            moved = await request(*plain)
            assert b"connection: close" not in moved and moved.endswith(b"version(v2)"), moved
            secure = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            assert (await request(*secure)).endswith(b"version(v2)")
        finally:
            await close_all(*(w for _, w in (plain, *([secure] if secure else []))))
        assert await asyncio.wait_for(v1_task, 15) == 0
        await stop_serving(v2, v2_task)

    run(main())


@pytest.mark.parametrize("aged", [False, True], ids=["just-accepted", "accepted-long-before"])
def test_a_tls_handshake_in_progress_keeps_the_old_process_draining(
        procs: Procs, name: str, certificate: tuple[Path, Path], aged: bool) -> None:
    """v1 (a process) has accepted a TLS connection whose client has not
    begun its handshake yet when v2 takes over, and nothing else is left
    with v1. aiohttp's server does not know that connection before its
    handshake ends: v1's drain used to end at once and v1 exited under the
    client, whose handshake then failed. v1 now waits for it (up to
    _HANDSHAKE_WAIT from the drain's start, 2 s), answers its request with
    Connection: close, then exits. Also when it was accepted more than
    _HANDSHAKE_WAIT before the drain began (``aged``): nothing tells a
    handshake that failed from one whose client is slow to start it, so
    the drain's start gives each its full wait again."""
    cert, key = certificate
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    v1 = procs.sidecar(name, "v1", args=(*tls, "--drain-timeout", "10"))
    port = port_of(wait_for(serving_process(name, "v1"), 15, "v1 serving"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        wait_for(lambda: accepted(v1.pid, raw), 10,
                 "v1 accepting the connection (its handshake not begun)")
        if aged:  # a wait for time itself: older than _HANDSHAKE_WAIT
            time.sleep(hotswap.aiohttp._HANDSHAKE_WAIT + 0.5)
        v2 = procs.sidecar(name, "v2", args=tls)
        wait_for(serving_process(name, "v2", settled=False), 15, "v2 serving")
        assert v1.poll() is None, "v1 waits for the handshake in progress"
        _, client_ctx = tls_contexts(certificate)
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
            tls_sock.sendall(b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := tls_sock.recv(4096):  # to the end: it says close
                answer += chunk
        assert b"version(v1)" in answer and b"connection: close" in answer.lower(), answer
    finally:
        raw.close()
    assert v1.wait(timeout=15) == 0
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_handshakes_that_never_end_cost_an_accept_little() -> None:
    """A port scan (connect, reset) on a TLS listener: every handshake fails
    and none is reported, so each counts as in progress for
    _HANDSHAKE_WAIT seconds; at 1,300 a second (2,600 in progress), each
    accept used to go over all of them (the server used 2.6 times the CPU:
    14.5 s for 20,000 scans instead of 5.5 s). Each accept now drops only
    the expired ones, from the oldest; what counts stays the same."""
    handshakes = hotswap.aiohttp._Handshakes()
    wait = hotswap.aiohttp._HANDSHAKE_WAIT
    stale: Any = [object() for _ in range(20_000)]
    for handler in stale:
        handshakes.begun(handler, 0.0)
    fresh: Any = [object() for _ in range(3_000)]
    began = time.perf_counter()
    for i, handler in enumerate(fresh):
        handshakes.begun(handler, wait * i / len(fresh))  # none expires yet
    assert time.perf_counter() - began < 0.5  # was 4 s
    assert handshakes.pending(wait) == len(stale) + len(fresh)
    handshakes.ended(fresh[-1])
    assert handshakes.pending(wait + 0.0001) == len(fresh) - 2  # the stale ones, fresh[0]
    handshakes.renew(100.0)  # the drain begins: each gets _HANDSHAKE_WAIT from now
    late: Any = object()
    handshakes.begun(late, 100.5)
    assert handshakes.pending(100.0 + wait) == len(fresh) - 1
    assert handshakes.pending(100.0 + wait + 0.001) == 1
    assert handshakes.pending(100.5 + wait + 0.001) == 0
