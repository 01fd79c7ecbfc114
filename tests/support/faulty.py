"""Run the sample sidecar with one fault injected into its control channel.

Test-only: it monkeypatches :class:`hotswap.transport.Channel` in this process
(the library has no fault hooks), then runs examples/sidecar_server/main.py
(or the script ``HOTSWAP_TEST_MAIN`` names: tests/support/tiny_server.py, say)
with the remaining arguments. ``HOTSWAP_TEST_FAULT`` is
``<send|receive>:<message type>:<action>``, actions:

- ``kill-before`` / ``kill-after``: SIGKILL this process just before sending,
  or just after sending / receiving, that message;
- ``half-frame``: send only the first half of that message's frame (with its
  descriptors, if any), close the connection, and fail the send as a broken
  channel would (the process lives on);
- ``stop-before``: SIGSTOP this process just before sending that message;
- ``stop-after``: SIGSTOP this process just after sending or receiving that
  message (the test SIGCONTs or kills it). The line ``faulty: SIGSTOP`` is
  written just before the stop: a test waits until the process is stopped
  (``conftest.frozen``), not for the line, or its SIGCONT can come first
  and be lost;
- ``fill-fds``: just before sending that message, take every descriptor
  number this process may still open but one (as a process near its
  RLIMIT_NOFILE would have none to spare).

``half-frame``, ``stop-before`` and ``stop-after`` fire once (a process
resumed serves on, and may be upgraded again without stopping there); the
others every time. ``HOTSWAP_TEST_FAULT`` may be unset (or ``none``): no
fault, only what follows.

``HOTSWAP_TEST_OPTIONS`` (``field=seconds,...``) sets :class:`hotswap.Options`
timeouts the sample sidecar has no flag for (``message_timeout``,
``predecessor_drain_timeout``, ``handover_timeout``), so that a test may
freeze a process past them in a second rather than in a minute; and
``token=TEXT``, the shared secret (a string, not seconds).

``HOTSWAP_TEST_TASKS=1``: on SIGUSR2, write ``faulty: tasks N objects M``
(the event loop's unfinished asyncio tasks, less those of requests in
flight, and the objects the garbage collector tracks) to stderr, so that
a test can see tasks or objects left behind.

``app:on_shutdown:ignore-cancel`` is no channel fault: it gives the app an
``on_shutdown`` callback that never returns and ignores its cancellation.
``app:on_startup:hang`` gives it an ``on_startup`` callback that never
returns (cancelled, it ends), ``app:on_startup:ignore-cancel`` one that
also ignores its cancellation; each writes ``faulty: on_startup hangs``
as it starts.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

import hotswap.upgrader
from hotswap import transport
from hotswap.errors import BrokenResourceError
from hotswap.protocol import encode

FAULT = os.environ.get("HOTSWAP_TEST_FAULT") or "none:none:none"
WHERE, TYPE, ACTION = FAULT.split(":")
_send, _receive = transport.Channel.send, transport.Channel.receive
_fired = False
_stopped = False

OPTIONS = {key: value if key == "token" else float(value) for key, _, value in (
    item.partition("=") for item in os.environ.get("HOTSWAP_TEST_OPTIONS", "").split(",")
    if item)}
_post_init = hotswap.upgrader.Options.__post_init__


def post_init(self: hotswap.upgrader.Options) -> None:
    for key, value in OPTIONS.items():
        setattr(self, key, value)
    _post_init(self)


hotswap.upgrader.Options.__post_init__ = post_init  # type: ignore[method-assign]


def stop(what: str) -> None:
    global _stopped
    if _stopped:
        return
    _stopped = True
    sys.stderr.write(f"faulty: SIGSTOP {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP)


def fill_fds() -> None:
    import resource

    # A lower soft limit first, so that filling takes a few hundred, not a
    # million (the hard limit stays: nothing to undo).
    in_use = len(os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 64, hard))
    held = []
    try:
        while True:
            held.append(os.eventfd(0, os.EFD_CLOEXEC))
    except OSError:
        pass
    os.close(held.pop())
    sys.stderr.write(f"faulty: took {len(held)} more descriptors, one left\n")
    sys.stderr.flush()


def die() -> None:
    sys.stderr.write(f"faulty: SIGKILL at {WHERE} {TYPE} ({ACTION})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


async def send(self: transport.Channel, message: Any, *, timeout: float) -> None:
    global _fired
    if WHERE == "send" and message.TYPE == TYPE:
        if ACTION == "kill-before":
            die()
        if ACTION == "stop-before":
            stop(f"before sending {TYPE}")
        if ACTION == "fill-fds":
            fill_fds()
        if ACTION == "half-frame" and not _fired:
            _fired = True
            frame = encode(message)
            self.conn.send(message)
            transport.send_frame(self.sock, frame[: len(frame) // 2],
                                 getattr(message, "fds", ()))
            sys.stderr.write(f"faulty: sent half of {TYPE!r} and closed\n")
            self.close()
            raise BrokenResourceError("test fault: connection closed mid-frame")
    await _send(self, message, timeout=timeout)
    if WHERE == "send" and message.TYPE == TYPE:
        if ACTION == "kill-after":
            die()
        if ACTION == "stop-after":
            stop(f"after sending {TYPE}")


async def receive(self: transport.Channel, *, timeout: float) -> Any:
    message = await _receive(self, timeout=timeout)
    if WHERE == "receive" and message.TYPE == TYPE:
        if ACTION == "kill-after":
            die()
        if ACTION == "stop-after":
            stop(f"after receiving {TYPE}")
    return message


if os.environ.get("HOTSWAP_TEST_TASKS") == "1":
    import asyncio
    import gc

    def count_tasks(signum: int, frame: Any) -> None:
        try:  # the handler runs between two of the loop's steps, in its thread
            # Not the task aiohttp makes for each request and ends with its
            # response: under a test's load, one or two are in flight at any
            # moment, and counted they made the count differ between two
            # rounds with nothing left behind (seen on aiohttp 3.10 to 3.12).
            count = str(sum(1 for task in asyncio.all_tasks()
                            if getattr(task.get_coro(), "__qualname__", None)
                            != "RequestHandler._handle_request"))
        except RuntimeError:  # not while the loop runs
            count = "none"
        sys.stderr.write(f"faulty: tasks {count} objects {len(gc.get_objects())}\n")
        sys.stderr.flush()

    signal.signal(signal.SIGUSR2, count_tasks)

transport.Channel.send = send  # type: ignore[method-assign]
transport.Channel.receive = receive  # type: ignore[method-assign]

if WHERE == "app":
    import asyncio

    import hotswap.aiohttp
    _serve = hotswap.aiohttp.serve

    async def stubborn(app: Any) -> None:
        sys.stderr.write("faulty: on_shutdown that ignores cancellation\n")
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                sys.stderr.write("faulty: on_shutdown cancelled, going on\n")

    async def hang(app: Any) -> None:
        sys.stderr.write("faulty: on_startup hangs\n")
        sys.stderr.flush()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                sys.stderr.write("faulty: on_startup cancelled\n")
                if ACTION != "ignore-cancel":
                    raise

    async def serve_with_fault(app: Any, *args: Any, **kwargs: Any) -> int:
        if TYPE == "on_startup":
            app.on_startup.append(hang)
        else:
            app.on_shutdown.append(stubborn)
        return await _serve(app, *args, **kwargs)

    hotswap.aiohttp.serve = serve_with_fault

main = Path(os.environ.get("HOTSWAP_TEST_MAIN") or Path(__file__).resolve().parents[2]
            / "examples" / "sidecar_server" / "main.py")
sys.argv = [str(main), *sys.argv[1:]]
# What `python main.py` does and run_path does not: its directory first on
# the path, where it imports its app from (app.py).
sys.path.insert(0, str(main.parent))
runpy.run_path(str(main), run_name="__main__")
