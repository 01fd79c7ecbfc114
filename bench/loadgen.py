"""Benchmark load generator: one process, asyncio + uvloop, raw HTTP/1.1 over
127.0.0.1 so that nothing retries behind our back (aiohttp's client and
urllib3 may retry a request on a reused connection; this never does).

Clients, all started together and run until ``--duration`` or SIGTERM, or
after SIGUSR1 ("last round") until each has made one more request that
started after the signal:

- ``keepalive``: one persistent connection each, requests back to back;
  reconnects only after a response that said ``Connection: close``;
- ``busybox``: the same, one request every 100 ms (the seed's client);
- ``fresh``: a new connection per request (``Connection: close``), back to back.

Each request is recorded as ``[start (epoch s), latency (s), client, outcome]``
where outcome is the version that answered (``v1``, ...) or ``!kind`` for a
failure: ``!refused``, ``!reset``, ``!eof-reused`` and ``!reset-reused`` (EOF
or a reset, before any of the response, on a connection that had already
served a request: the keep-alive race), ``!eof``, ``!timeout``,
``!status-NNN``, ``!bad-body`` (a 200 whose body names no version),
``!other`` (anything else: an unexpected exception, such as a
malformed response; its type is logged on stderr). After any failure a client
carries on with a new connection. Written as JSON to ``--out``: ``summary``
(requests, failed, failures by kind, versions, each client's version order,
the first errors, connections opened by each client, ``clients`` started and
``died``: each client that stopped on an exception before the end, with it,
which should be empty: a run where it is not lost that client's load) and,
unless ``--no-records``, ``records``. A client that dies is also logged on
stderr at once. Prints ``loadgen: first response`` when the
first request completes, so a caller can
wait for the load to be running. The one load generator of the project: the
tests, the soak and the benchmark all use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import re
import signal
import sys
import time
import traceback
from collections import Counter

import uvloop

VERSION_RE = re.compile(rb"version\(([^)]*)\)")
REQUEST = b"GET /serve HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
REQUEST_CLOSE = b"GET /serve HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


class Failure(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes, reused: bool) -> tuple[str, bool]:
    """One request/response. Returns (version, server_will_close)."""
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise Failure("eof-reused" if reused and not exc.partial else "eof") from None
    except (ConnectionResetError, BrokenPipeError):
        raise Failure("reset-reused" if reused else "reset") from None
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise Failure("eof") from None
    except ConnectionResetError:
        raise Failure("reset") from None
    if status != 200:
        raise Failure(f"status-{status}")
    match = VERSION_RE.search(body)
    if match is None:  # a 200 that is not the server's answer: no success
        raise Failure("bad-body")
    return match.group(1).decode(), close


OPENED: Counter[str] = Counter()  # connections opened, by client


async def wait_stop(stop: asyncio.Event, seconds: float) -> None:
    """Until ``stop`` is set or ``seconds`` have passed, whichever is first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


LAST_ROUND: list[float] = []  # when SIGUSR1 came (time.time()), once


async def client(name: str, port: int, persistent: bool, interval: float, timeout: float,
                 stop: asyncio.Event, records: list[list[object]], offset: float = 0.0) -> None:
    """One client until ``stop``, or until its first request that started
    after the last round was called: never retries; a persistent one
    reconnects only after ``Connection: close`` or a failure. Paced clients
    start ``offset`` seconds late, so that they do not all ask at the same
    moment."""
    if offset:
        await wait_stop(stop, offset)
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    served = 0  # requests answered on the current connection
    while not stop.is_set():
        started = time.time()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                if conn is None:
                    try:
                        conn = await asyncio.open_connection("127.0.0.1", port)
                    except ConnectionRefusedError:
                        raise Failure("refused") from None
                    OPENED[name] += 1
                    served = 0
                reader, writer = conn
                version, close = await exchange(reader, writer,
                                                REQUEST if persistent else REQUEST_CLOSE,
                                                reused=served > 0)
            outcome = version
            served += 1
            if close or not persistent:
                writer.close()
                conn = None
        except Failure as exc:
            outcome = "!" + exc.kind
        except TimeoutError:
            outcome = "!timeout"
        except ConnectionRefusedError:
            outcome = "!refused"
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            # e.g. while connecting: a listener closed with the connection
            # still in its accept queue resets it.
            outcome = "!reset"
        except Exception as exc:  # noqa: BLE001 -- counted, and the client goes on
            # An OSError of another kind, or what no kind covers (a malformed
            # response: ValueError, IndexError, asyncio.LimitOverrunError...):
            # a failure like the others, not the end of this client's load.
            outcome = "!other"
            print(f"loadgen: {name}: other failure: {type(exc).__name__}: {exc!r}",
                  file=sys.stderr, flush=True)
        if outcome.startswith("!") and conn is not None:
            conn[1].close()
            conn = None
        if not records:
            print("loadgen: first response", flush=True)
        records.append([round(started, 6), round(time.perf_counter() - t0, 6), name, outcome])
        if LAST_ROUND and started >= LAST_ROUND[0]:
            break
        if interval:
            await wait_stop(stop, interval)
        elif outcome.startswith("!"):
            await asyncio.sleep(0.001)  # a refused connect returns at once
    if conn is not None:
        conn[1].close()


DIED: dict[str, str] = {}  # client -> the exception that ended it early


def watch(task: asyncio.Task[None]) -> None:
    """Done callback of each client: record (and log at once) one that ended
    on an exception instead of finishing its load."""
    if task.cancelled() or (exc := task.exception()) is None:
        return
    DIED[task.get_name()] = f"{type(exc).__name__}: {exc!r}"
    print(f"loadgen: client {task.get_name()} died:", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()


async def main(args: argparse.Namespace) -> list[list[object]]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def last_round() -> None:
        if not LAST_ROUND:
            LAST_ROUND.append(time.time())

    loop.add_signal_handler(signal.SIGUSR1, last_round)
    records: list[list[object]] = []
    clients = [("ka", True, args.pace, args.keepalive), ("bb", True, 0.1, args.busybox),
               ("new", False, args.pace, args.fresh)]
    tasks = [asyncio.create_task(client(f"{kind}{i}", args.port, persistent, interval,
                                        args.timeout, stop, records,
                                        offset=interval * i / count), name=f"{kind}{i}")
             for kind, persistent, interval, count in clients for i in range(count)]
    for task in tasks:
        task.add_done_callback(watch)
    # Until SIGTERM, the duration, or every client done after a last round.
    stopped = asyncio.create_task(stop.wait())
    waiters = [stopped, *([asyncio.create_task(asyncio.wait(tasks))] if tasks else [])]
    await asyncio.wait(waiters, timeout=args.duration, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=args.timeout + 2)
    for task in pending:  # stuck past its own timeout: no better than dead
        DIED[task.get_name()] = "still running at the end (cancelled)"
        print(f"loadgen: client {task.get_name()} still running at the end",
              file=sys.stderr, flush=True)
    return records


def summarize(records: list[list[object]], clients: int) -> dict[str, object]:
    failures: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    orders: dict[str, list[str]] = {}
    errors: list[str] = []
    for started, _, name, outcome in records:
        assert isinstance(outcome, str) and isinstance(name, str)
        if outcome.startswith("!"):
            failures[outcome[1:]] += 1
            if len(errors) < 50:
                errors.append(f"{started} {name} {outcome[1:]}")
            continue
        versions[outcome] += 1
        order = orders.setdefault(name, [])
        if not order or order[-1] != outcome:
            order.append(outcome)
    return {"requests": len(records), "failed": sum(failures.values()),
            "failures": dict(failures), "versions": dict(versions), "orders": orders,
            "errors": errors, "connections": dict(OPENED), "clients": clients,
            "died": dict(DIED)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keepalive", type=int, default=16)
    parser.add_argument("--busybox", type=int, default=1)
    parser.add_argument("--fresh", type=int, default=4)
    parser.add_argument("--pace", type=float, default=0.0,
                        help="seconds between requests of the keep-alive and "
                             "new-connection clients (0: back to back)")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--no-records", action="store_true")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    # The records are hundreds of thousands of small lists without cycles: a
    # cyclic-GC pass over them stalls every client for tens of ms, which would
    # show up as a gap or a latency spike that belongs to no server.
    gc.disable()
    result = uvloop.run(main(arguments))
    output: dict[str, object] = {"summary": summarize(
        result, arguments.keepalive + arguments.busybox + arguments.fresh)}
    if not arguments.no_records:
        output["records"] = result
    with open(arguments.out, "w") as fh:
        json.dump(output, fh)
