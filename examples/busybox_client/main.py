"""Busybox client: calls the sidecar every 100 ms and proves none failed.

    python examples/busybox_client/main.py --url http://127.0.0.1:9091/serve \
        --interval 0.1 [--duration S]

It keeps one keep-alive HTTP/1.1 connection (stdlib ``http.client``), never
retries, and reconnects only when the server said ``Connection: close``, as a
well-behaved client does. Each request is logged::

    request sidecar server success, and response(body=This is version(v1) sidecar)
    request sidecar server failed, and error(...)

A request fails on any of: an error connecting, sending or reading; taking
longer than ``--timeout`` in all (looking the host up, connecting, sending
and reading the whole response: a server trickling its answer a byte at a
time does not get to stretch it, and a stop is never held up longer than
that);
a status other than 200; a body other than ``This is version(<v>) sidecar``;
an answer from a version that was already superseded (one seen before, then
another: the version went backwards; checked for the first 1000 versions by
name, the most a run remembers). At the end (``--duration`` elapsed, or
SIGTERM/SIGINT) it prints a summary with totals, failures and the versions
seen, and exits 1 if any request failed or none was made (nothing proven).
"""

from __future__ import annotations

import signal
from types import FrameType

# PID 1 in its container: a SIGTERM before a handler is installed is dropped
# (the default action does not apply to PID 1), and `docker stop` then waits
# out its 10 s. So the handler comes first, before the imports below (~35 ms
# here, http.client's most); only the interpreter's own start is left.
stopping = False  # a SIGTERM or SIGINT came: make no more requests


def on_stop(signum: int, frame: FrameType | None) -> None:
    global stopping
    stopping = True


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

import argparse  # noqa: E402 -- after the handlers, above
import collections  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from typing import Any  # noqa: E402

# The sidecar's answer: whatever is between the fixed start and end is its
# version, which may hold anything the sidecar accepts (")" too).
BODY_RE = re.compile(r"This is version\((.*)\) sidecar", re.DOTALL)
# Changes of version listed in the summary: versions answering by turns (a
# failure) would grow the list, and the run's memory, without end.
MAX_ORDER = 1000
# Versions counted by name: a server naming a new one in every answer grew
# the count, the run's memory and the summary line without end. Answers
# from versions past these are counted together, and are not checked for
# going back (nothing bounded can remember them all).
MAX_VERSIONS = 1000


class WrongBody(Exception):
    """A 200 whose body is not the sidecar's answer."""


class VersionWentBack(Exception):
    """An answer from a version that a newer one had already replaced."""


class RequestTimeout(Exception):
    """The whole request (connect, send, read the response) took longer than
    the client's ``--timeout``. Not an OSError: ``socket.create_connection``
    takes one for that address's failure and tries the next, untimed."""


class Client:
    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"busybox: only http:// URLs are supported, not {url!r}")
        try:
            port = parts.port
        except ValueError as exc:  # not a number, or past 65535
            raise SystemExit(f"busybox: no port in {url!r}: {exc}") from None
        self.host = parts.hostname
        self.port = port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self.timing = False  # a request's timer is armed
        signal.signal(signal.SIGALRM, self._on_alarm)  # the main thread's, as main() is
        self.conn: http.client.HTTPConnection | None = None
        self.connections = 0

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        # Python runs a handler at its next check, maybe once the request
        # is over: it then raises nowhere (a traceback, no summary).
        if self.timing:
            raise RequestTimeout("no complete answer within the request's timeout")

    def _connect(self) -> socket.socket:
        """A socket connected to the URL's host, for the caller to own; run
        under the request's timer, and on any error (RequestTimeout too)
        nothing is left open. The name is looked up in a thread: a SIGALRM
        cannot interrupt getaddrinfo(), and a name server that did not answer
        held a request 10 s with ``--timeout 0.5`` (a stop as long). This
        waits for the thread, the SIGALRM ends the wait, and a lookup that
        never ends is left to its daemon thread, which holds nothing. Then
        each address in turn, as ``socket.create_connection`` does."""
        found: queue.SimpleQueue[list[tuple[int, int, int, tuple[Any, ...]]] | OSError] = \
            queue.SimpleQueue()

        def look_up() -> None:
            try:
                found.put([(family, kind, proto, address) for family, kind, proto, _, address
                           in socket.getaddrinfo(self.host, self.port,
                                                 type=socket.SOCK_STREAM)])
            except OSError as exc:  # socket.gaierror too
                found.put(exc)

        # The thread starts with the signals blocked (a new thread inherits
        # the mask), so that they all go to this one, waiting below.
        handled = {signal.SIGALRM, signal.SIGTERM, signal.SIGINT}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            threading.Thread(target=look_up, name="look-up", daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        addresses = found.get()
        if isinstance(addresses, OSError):
            raise addresses
        error: OSError = OSError(f"no address for {self.host!r}")
        for family, kind, proto, address in addresses:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.timeout)
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error

    def request(self) -> str:
        """One GET; the version that answered. Raises on any failure, and
        :class:`RequestTimeout` once the whole request has taken ``timeout``
        seconds (a SIGALRM interrupts whatever step it is in; the socket's own
        timeout bounds only each step). The client owns its one connection: on
        any failure it is closed, and the next request opens a new one."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.connections += 1
        conn = self.conn
        try:
            self.timing = True
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            try:
                if conn.sock is None:  # http.client would look the host up untimed
                    conn.sock = self._connect()
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read().decode("utf-8", "replace")
            finally:
                self.timing = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:
            conn.close()
            self.conn = None
            raise
        if response.will_close:
            conn.close()
            self.conn = None
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]}")
        match = BODY_RE.fullmatch(body)
        if match is None:
            raise WrongBody(f"HTTP 200 with an unexpected body: {body[:200]!r}")
        return match.group(1)


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more. A usage
    error otherwise, rather than every request failing with an error that
    blames the server (``--timeout 0``: "Operation now in progress")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"not a finite number of seconds, 0 or more: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:9091/serve")
    parser.add_argument("--interval", type=seconds, default=0.1)
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds to run (0: until SIGTERM/SIGINT)")
    parser.add_argument("--timeout", type=seconds, default=5.0,
                        help="seconds a whole request may take (look up, connect, send, read)")
    parser.add_argument("--summary-json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    if not args.timeout:
        parser.error("argument --timeout: must be more than 0 seconds")

    signal.signal(signal.SIGTERM, on_stop)  # run as a script: installed already
    signal.signal(signal.SIGINT, on_stop)

    client = Client(args.url, args.timeout)
    total = failed = 0
    versions: collections.Counter[str] = collections.Counter()
    order: list[str] = []  # the versions in the order they answered, a run each
    last: str | None = None  # the version of the last answer
    unlisted = 0  # changes of version past MAX_ORDER: counted, not listed
    unnamed = 0  # answers from versions past MAX_VERSIONS: counted, not named
    errors: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    next_at = start
    answered_at = start  # the last success (or the start)
    longest_gap = 0.0
    while not stopping and (not args.duration or time.monotonic() - start < args.duration):
        total += 1
        try:
            version = client.request()
            went_back = version in versions and version != last
            previous, last = last, version
            if version in versions or len(versions) < MAX_VERSIONS:
                versions[version] += 1
            else:
                unnamed += 1
            if version != previous:
                if len(order) < MAX_ORDER:
                    order.append(version)
                else:
                    unlisted += 1
            if went_back:
                raise VersionWentBack(f"version {version} answered again after {previous}")
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            failed += 1
            errors[type(exc).__name__] += 1
            print(f"request sidecar server failed, and error({type(exc).__name__}: {exc})",
                  flush=True)
        else:
            now = time.monotonic()
            longest_gap, answered_at = max(longest_gap, now - answered_at), now
            print(f"request sidecar server success, and response(body="
                  f"This is version({version}) sidecar)", flush=True)
        # Every interval, never in a burst: ticks missed while a request
        # took longer are skipped, not made up for back to back.
        next_at = max(next_at + args.interval, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))
    # The run's end counts as the start does: a server that stopped
    # answering well near the end left a gap the loop never measured.
    longest_gap = max(longest_gap, time.monotonic() - answered_at)

    summary = {"requests": total, "failed": failed, "succeeded": total - failed,
               "versions": dict(versions), "version_order": order,
               "version_changes_unlisted": unlisted,
               "version_answers_unnamed": unnamed,
               "errors": dict(errors), "connections": client.connections,
               "longest_gap_s": round(longest_gap, 3),
               "seconds": round(time.monotonic() - start, 3)}
    more = f" (and {unnamed} answers from versions past the first {MAX_VERSIONS})"
    print(f"summary: {total} requests, {failed} failed, versions seen in order: "
          f"{' -> '.join(order) or '-'}"
          f"{f' (and {unlisted} more changes)' if unlisted else ''} {dict(versions)}"
          f"{more if unnamed else ''}, "
          f"{client.connections} connection(s) opened, longest gap between answers "
          f"{longest_gap:.3f}s", flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(summary, fh)
    return 1 if failed or not total else 0


if __name__ == "__main__":
    sys.exit(main())
