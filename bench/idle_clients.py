"""N idle keep-alive connections for the connection-handover benchmark.

    python bench/idle_clients.py --port P --count N --out result.json

Opens N connections to 127.0.0.1:P, makes one request on each, prints
``ready`` and waits (idle) until SIGUSR1; then makes one more request on each
of the same connections and writes which versions answered and how many
failed (EOF, reset, a new connection would be a failure too: none is opened),
then exits. Bounded by --timeout at every step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import signal
from collections import Counter

import uvloop

VERSION_RE = re.compile(rb"version\(([^)]*)\)")
REQUEST = b"GET /serve HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    writer.write(REQUEST)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    match = VERSION_RE.search(body)
    return match.group(1).decode() if match else "!bad-body"


async def main(args: argparse.Namespace) -> dict[str, object]:
    go = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
    conns = []
    async with asyncio.timeout(args.timeout):
        for start in range(0, args.count, 500):
            batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", args.port)
                                           for _ in range(start, min(args.count, start + 500))))
            conns.extend(batch)
        first = await asyncio.gather(*(ask(r, w) for r, w in conns))
    print("ready", flush=True)
    async with asyncio.timeout(args.timeout):
        await go.wait()
    outcomes: Counter[str] = Counter()

    async def again(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outcomes[await ask(reader, writer)] += 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            outcomes["!" + type(exc).__name__] += 1

    async with asyncio.timeout(args.timeout):
        await asyncio.gather(*(again(r, w) for r, w in conns))
    for _, writer in conns:
        writer.close()
    return {"first": dict(Counter(first)), "second": dict(outcomes)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = uvloop.run(main(arguments))
    with open(arguments.out, "w") as fh:
        json.dump(result, fh)
