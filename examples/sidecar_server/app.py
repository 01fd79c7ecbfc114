"""The sample sidecar's application, without hotswap: ``GET /serve`` answers
``This is version(<version>) sidecar`` (after ``delay`` seconds),
``GET /healthz`` answers ``ok``.

Its own module so that the benchmark's baseline (bench/plain_server.py: the
same app on a plain aiohttp site) serves exactly this app without importing
hotswap; main.py serves it with hotswap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import NoReturn

from aiohttp import web


def make_app(version: str, delay: float) -> web.Application:
    body = f"This is version({version}) sidecar"

    async def serve(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=body)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/serve", serve)
    app.router.add_get("/healthz", health)
    return app


def exit_now(code: int) -> NoReturn:
    """End the process once its server has closed every socket: flush what
    is buffered, then no event loop close and no interpreter teardown.
    ``asyncio.Runner.close()`` waits with no deadline for any task left (an
    app clean-up callback that ``serve()`` abandoned and that ignores its
    cancellation), and the teardown (a full garbage collection and module
    clean-up, ~60 ms) would run right after the next version took over, when
    the CPU is needed most. The sample and the benchmark's baseline end alike.
    A stream that is closed (None: started with ``>&-``) or cannot be
    flushed (its reader gone) loses what it held; the exit status stays
    ``code`` (a flush's error was a traceback and exit 1).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(code)
