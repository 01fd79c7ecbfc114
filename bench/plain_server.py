"""The sample sidecar without hotswap, for the strategies people use today and
for the no-hotswap throughput baseline: the same aiohttp + uvloop app
(examples/sidecar_server/app.py, which imports no hotswap), on a plain
TCPSite.

    python bench/plain_server.py --version v1 --port P [--reuse-port]

Everything but hotswap is as in the sample (examples/sidecar_server/main.py):
the modules it loads besides hotswap, the uvloop loop and how it is run, the
logging set-up and access log settings, the listen backlog (hotswap's 1,024,
not aiohttp's 128), and the exit (flush, then ``os._exit``: no interpreter
teardown). So a comparison with the sample measures hotswap, not a
different start-up or exit.

Prints ``listening`` once it accepts (and handles SIGTERM). On SIGTERM it
shuts down the way aiohttp does (``AppRunner.cleanup()``: stop the site,
close idle keep-alive connections, wait for in-flight requests) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "sidecar_server"))
from app import exit_now, make_app

BACKLOG = 1024  # hotswap.listeners.DEFAULT_BACKLOG, which the sample listens with


async def serve(args: argparse.Namespace, app: web.Application) -> int:
    # The runner's default access log (the "aiohttp.access" logger, at
    # WARNING as in the sample), not access_log=None: the same per-connection
    # work as the sample's.
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_port=args.reuse_port or None,
                       reuse_address=True, backlog=BACKLOG)
    await site.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("listening", flush=True)  # after the handler: a SIGTERM from now on stops cleanly
    await stop.wait()
    await runner.cleanup()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default="v1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args()
    # As the sample's prepare(): its logging, its app, its loop.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.version} pid={os.getpid()} "
                               "%(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    app, loop = make_app(args.version, 0.0), uvloop.new_event_loop()
    code = asyncio.Runner(loop_factory=lambda: loop).run(serve(args, app))
    exit_now(code)  # as the sample exits


if __name__ == "__main__":
    main()
