"""Load generator for the tests: keep-alive and new-connection HTTP clients in
one separate process, bounded in time, sending only to 127.0.0.1.

    python tests/support/loadgen.py --port P --keepalive 4 --fresh 2 \
        --duration 30 --out result.json

Runs until ``--duration`` passes or SIGTERM arrives, then writes a JSON summary:
requests, failures by kind, versions seen (in order, per client). Clients never
retry; a keep-alive client reconnects only after a response that said
``Connection: close``. A failure kind is one of refused, reset, eof (the server
closed a reused connection), timeout, status-NNN, other.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import re
import signal
import socket
import threading
import time
from types import FrameType

VERSION_RE = re.compile(rb"version\(([^)]*)\)")


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, http.client.RemoteDisconnected | http.client.IncompleteRead):
        return "eof"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    return f"other:{type(exc).__name__}"


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.versions: collections.Counter[str] = collections.Counter()
        self.orders: dict[str, list[str]] = {}
        self.errors: list[str] = []

    def record(self, client: str, version: str | None, failure: str | None,
               detail: str = "") -> None:
        with self.lock:
            if self.requests == 0:
                print("loadgen: first response", flush=True)
            self.requests += 1
            if failure:
                self.failures[failure] += 1
                if len(self.errors) < 50:
                    self.errors.append(f"{time.time():.3f} {client}: {failure} {detail}")
                return
            assert version is not None
            self.versions[version] += 1
            order = self.orders.setdefault(client, [])
            if not order or order[-1] != version:
                order.append(version)


def run_client(name: str, port: int, keepalive: bool, interval: float, timeout: float,
               stop: threading.Event, stats: Stats) -> None:
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/serve")
            response = conn.getresponse()
            body = response.read()
        except Exception as exc:  # noqa: BLE001 - every failure is classified
            stats.record(name, None, classify(exc), repr(exc))
            conn.close()
            conn = None
        else:
            if response.status != 200:
                stats.record(name, None, f"status-{response.status}")
            else:
                match = VERSION_RE.search(body)
                stats.record(name, match.group(1).decode() if match else "?", None)
            if response.will_close or not keepalive:
                conn.close()
                conn = None
        if interval:
            stop.wait(interval)
    if conn is not None:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keepalive", type=int, default=4)
    parser.add_argument("--fresh", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    stats = Stats()
    threads = [threading.Thread(target=run_client,
                                args=(f"ka{i}", args.port, True, args.interval,
                                      args.timeout, stop, stats))
               for i in range(args.keepalive)]
    threads += [threading.Thread(target=run_client,
                                 args=(f"new{i}", args.port, False, args.interval,
                                       args.timeout, stop, stats))
                for i in range(args.fresh)]
    for thread in threads:
        thread.start()
    stop.wait(args.duration)
    stop.set()
    for thread in threads:
        thread.join(args.timeout + 1)
    summary = {"requests": stats.requests, "failed": sum(stats.failures.values()),
               "failures": dict(stats.failures), "versions": dict(stats.versions),
               "orders": stats.orders, "errors": stats.errors}
    with open(args.out, "w") as fh:
        json.dump(summary, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
