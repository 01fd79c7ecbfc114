"""A minimal server on hotswap's generic API (no aiohttp): each connection gets
one HTTP response naming the version, then is closed. Starts fast, so tests can
run a hundred handovers; also shows the API without the aiohttp integration.

    python tests/support/tiny_server.py --name N --version v1 [--port 0]
        [--extra-listeners N]

``--extra-listeners N``: N more listeners on 127.0.0.1 (any port), named
``extra0``... (so that a handover takes several frames of sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import hotswap


async def main(args: argparse.Namespace) -> int:
    upgrader = hotswap.Upgrader(args.name, version=args.version)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, upgrader.request_stop)
    body = f"This is version({args.version}) sidecar".encode()
    response = (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)
    active: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        active.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            active.discard(task)

    role = await upgrader.start()
    if role in (hotswap.Role.PASSIVE, hotswap.Role.EMPTY):
        await upgrader.wait_exit()
        await upgrader.close()
        return 0
    # asyncio listens again with its own queue (100) unless told hotswap's.
    # Not accepting yet: ready() starts it as it confirms the handover, so
    # that this process accepts nothing while it may still back out.
    wanted = [("http", args.port), *((f"extra{i}", 0) for i in range(args.extra_listeners))]
    servers = [await asyncio.start_server(handle, sock=upgrader.listen(name, ("127.0.0.1", port)),
                                          backlog=1024, start_serving=False)
               for name, port in wanted]
    with contextlib.suppress(hotswap.HandoverFailed):
        await upgrader.ready(start_serving=servers)
    reason = await upgrader.wait_exit()
    # Not server.close(): on the stock loop that drops a connection accepted
    # but not yet handed to the server (the client sees a reset).
    for server in servers:
        await hotswap.close_server(server)
    await upgrader.release()
    if active:
        await asyncio.wait(active, timeout=5)
    await upgrader.close()
    if reason is hotswap.ExitReason.TAKEN_OVER and "SIDECARSET_VERSION" in os.environ:
        await upgrader.wait_stop_requested()  # a Kruise slot: no exit before SIGTERM
    return 1 if reason is hotswap.ExitReason.HANDOVER_FAILED else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--extra-listeners", type=int, default=0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(asyncio.run(main(parser.parse_args())))
