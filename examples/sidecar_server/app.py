"""The sample sidecar's application, without hotswap: ``GET /serve`` answers
``This is version(<version>) sidecar`` (after ``delay`` seconds),
``GET /healthz`` answers ``ok``.

Its own module so that the benchmark's baseline (bench/plain_server.py: the
same app on a plain aiohttp site) serves exactly this app without importing
hotswap; main.py serves it with hotswap.
"""

from __future__ import annotations

import asyncio

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
