"""A UDP echo server on hotswap's generic API: each datagram is answered with
``VERSION:`` and the datagram. Prints ``READY <port>`` once ready() returns,
and ``EXIT <reason> <answered>`` at the end.

    python tests/support/udp_server.py --name N --version v1 [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import cast

import hotswap


class Echo(asyncio.DatagramProtocol):
    def __init__(self, version: str) -> None:
        self.prefix = version.encode() + b":"
        self.answered = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The stock loop's datagram transport is no DatagramTransport subclass
        # before Python 3.12 (it has its methods).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        assert self.transport is not None
        self.answered += 1
        self.transport.sendto(self.prefix + data, addr)


async def main(args: argparse.Namespace) -> int:
    upgrader = hotswap.Upgrader(args.name, version=args.version)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, upgrader.request_stop)
    await upgrader.start()
    sock = upgrader.listen("dns", ("127.0.0.1", args.port), kind="dgram")
    echo = Echo(args.version)
    transport, _ = await loop.create_datagram_endpoint(lambda: echo, sock=sock)
    with contextlib.suppress(hotswap.HandoverFailed):
        await upgrader.ready()
    print("READY", sock.getsockname()[1], flush=True)
    reason = await upgrader.wait_exit()
    # Stop reading: what is still queued stays in the shared socket, for the
    # successor. The transport closes our descriptor (only ours) once the
    # answers it still buffers are out: release() closes it otherwise.
    transport.close()
    await asyncio.wait_for(echo.closed, 5)
    await upgrader.release()
    await upgrader.close()
    print("EXIT", reason.value, echo.answered, flush=True)
    return 1 if reason is hotswap.ExitReason.HANDOVER_FAILED else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--port", type=int, default=0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(asyncio.run(main(parser.parse_args())))
