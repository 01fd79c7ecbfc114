"""The sample sidecar without hotswap, for the strategies people use today and
for the no-hotswap throughput baseline: the same aiohttp + uvloop app and
handler as examples/sidecar_server, on a plain TCPSite.

    python bench/plain_server.py --version v1 --port P [--reuse-port]

Prints ``listening`` once it accepts. On SIGTERM it shuts down the way aiohttp
does (``AppRunner.cleanup()``: stop the site, close idle keep-alive
connections, wait for in-flight requests) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "sidecar_server"))
from main import make_app


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(args.version, 0.0), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_port=args.reuse_port or None,
                       reuse_address=True)
    await site.start()
    print("listening", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default="v1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true")
    uvloop.run(serve(parser.parse_args()))
