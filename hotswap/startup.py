"""Start a successor without taking CPU from the version that serves.

Most of a new version's start-up is importing its code (aiohttp alone is about
a quarter of a second of CPU). While it starts, the old version is still
serving every request; on a node whose cores are busy, the newcomer's imports
compete with it and its latency doubles until the switch. :func:`preload` runs
those imports in a helper thread at Linux's ``SCHED_IDLE`` priority: the thread
only gets CPU that nobody else wants, so the serving process does not notice,
and the start takes longer instead. Scheduling policy is per thread on Linux,
so the calling thread keeps its normal priority (an unprivileged thread can
lower its priority but never raise it back, which is why the work is done in a
thread that then ends).

Scope: ``SCHED_IDLE`` (like a nice value) ranks a thread only against the
threads of its own CPU scheduling group. Processes of one container, one
systemd unit or one login session share a group, and there the serving
version does not notice the start-up. Each container of a Kubernetes pod is a
CPU cgroup of its own: CPU is shared between the two sidecar slots by their
cgroups' weights first, and a successor in the other slot starts like any
container does, competing at its slot's weight (the benchmark's
``--separate-groups`` shows it: start-up p50 1.7x steady state instead of
1.05x). Making the slot's cgroup idle (cgroup v2 ``cpu.idle``) is the node's
business, not the process's; preloading neither helps nor hurts there.

Call it first thing, before importing the heavy modules (and, in a program
that runs as a container's PID 1, :func:`exit_on_sigterm` before it)::

    import hotswap.startup
    hotswap.startup.exit_on_sigterm()
    hotswap.startup.preload("aiohttp.web", "uvloop", "hotswap.aiohttp")

    from aiohttp import web  # already imported: instant
"""

from __future__ import annotations

import os
import threading
import time  # built in, and threading's own import

from . import _versions

# Everything this module imports runs at normal priority, before it can lower
# anything: only what it needs (threading), not enum (hotswap.kruise), not
# importlib, not typing (~15 ms of CPU).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar

    T = TypeVar("T")

IDLE_ENV = "HOTSWAP_IDLE_START"
DEFAULT_TIMEOUT = 60.0
_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")
# How late a signal taken by the helper thread may run its handler (seconds).
_SIGNAL_SLICE = 0.1


def should_idle(env: Mapping[str, str] | None = None) -> bool:
    """Whether a start-up should yield the CPU: ``HOTSWAP_IDLE_START`` decides
    when set (``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``;
    anything else raises ValueError, rather than be taken for "not set");
    otherwise yes exactly when Kruise says this slot takes over from a
    serving predecessor (``SIDECARSET_VERSION > SIDECARSET_VERSION_ALT >
    0``). A fresh start has nobody to yield to and starts at full speed."""
    env = os.environ if env is None else env
    forced = env.get(IDLE_ENV, "").strip().lower()
    if forced in _YES or forced in _NO:
        return forced in _YES
    if forced:
        raise ValueError(f"{IDLE_ENV}={env[IDLE_ENV]!r}: use 1 or 0")
    try:
        rank = _versions.parse(env, _versions.VERSION_ENV)
        alt = _versions.parse(env, _versions.ALT_ENV)
    except ValueError:  # a malformed version is the upgrader's to report
        return False
    return _versions.role(rank, alt) == "takeover"


def exit_on_sigterm() -> bool:
    """Let a SIGTERM end the process while nobody handles it, as PID 1 too.

    A container's PID 1 gets only the signals it has a handler for: with
    SIGTERM at its default action, one that comes before
    :func:`hotswap.aiohttp.serve` installs its handlers (the imports and the
    set-up, which :func:`preload` and :func:`idle_call` make slower on a busy
    node) is dropped, and the kubelet, whose SIGTERM that was (a PostStart
    hook that failed, a pod deleted), waits out the grace period (30 s) for
    its SIGKILL. Call this first thing, in the main thread: it installs a
    handler that writes one line on stderr and ends the process as the
    default action would, by the signal itself (PID 1, which the kernel
    does not let die of its own signal: exit status 143). Nothing is taken
    over or bound before ``serve()`` runs (its upgrader starts inside it,
    after its own handlers), so there is nothing to give back or drain.

    ``serve()`` replaces the handler while it runs and puts it back when it
    returns (a SIGTERM after that ends the process at once too). Where the
    action is not the default (ignored, or a handler of the program's own),
    nothing changes. Returns whether the handler was installed. Raises
    ValueError outside the main thread, as :func:`signal.signal` does.

    Python runs the handler in the main thread. While it waits for the
    helper thread of :func:`preload` or :func:`idle_call`, the kernel hands
    the signal to it (it prefers the thread a ``kill()`` names), except for
    one that was pending while the process was stopped (SIGSTOP), which the
    helper may take: the main thread looks for that one every 0.1 s, so it
    too ends the process without waiting for the helper's work.
    """
    # signal.py imports enum (~4 ms of CPU at normal priority): the C module
    # it wraps, where there is one.
    try:
        sig = __import__("_signal")
    except ImportError:
        sig = __import__("signal")
    if sig.getsignal(sig.SIGTERM) != sig.SIG_DFL:
        return False

    def end(signum: int, frame: object) -> None:
        try:  # noqa: SIM105 -- contextlib: more imports at normal priority
            os.write(2, b"hotswap: SIGTERM outside serve(): exiting\n")
        except OSError:
            pass
        sig.signal(signum, sig.SIG_DFL)
        os.kill(os.getpid(), signum)  # dies of it, unless PID 1
        os._exit(128 + signum)

    sig.signal(sig.SIGTERM, end)
    return True


def preload(*modules: str, idle: bool | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Import ``modules`` (dotted names), at idle CPU priority if ``idle``.

    ``idle=None`` asks :func:`should_idle`. The imports run in a helper thread
    that sets ``SCHED_IDLE`` on itself and ends; the caller waits for it.
    Returns True if the imports ran at idle priority, False if they ran
    plainly in the calling thread (``idle`` false, or the platform refused
    ``SCHED_IDLE``: not Linux, or a seccomp profile that forbids it).

    The imports run in another thread: a module that must be imported in
    the main thread (one that installs signal handlers as it loads, say)
    does not belong in the list.

    Errors: the first import error is raised in the caller, as the import
    itself would raise it. A ``timeout`` that is not a finite number of
    seconds, 0 or more (a string included), is a ValueError, before
    anything starts. If the imports have not finished within ``timeout``
    seconds (a node whose CPUs never idle),
    raises :class:`TimeoutError`; the helper is a daemon thread and does not
    keep the process alive, so the caller can exit and the old version
    serves on. Exit is the only safe reaction: the helper still holds the
    import locks of what it was importing, so importing more in-process (a
    retry at normal priority, say) waits for it, at idle priority. On a
    saturated node the error itself can come seconds late (the waiting
    thread needs the GIL back from the idle one). Threads and processes
    started by the imports inherit ``SCHED_IDLE`` for good.
    """
    return _call(_import_all, (modules,), idle, timeout,
                 f"preloading {', '.join(modules)}")[0]


def idle_call(fn: Callable[..., T], /, *args: object, idle: bool | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> T:
    """Return ``fn(*args)``, computed at idle CPU priority if ``idle``.

    For the rest of a successor's set-up that needs no event loop (parsing
    its configuration, building its application): work done here is not
    taken from the version still serving. The same helper thread, fallback,
    errors and ``timeout`` as :func:`preload`; ``fn`` runs in another thread,
    so it must not need to run in the main one (signal handlers).
    """
    return _call(fn, args, idle, timeout, getattr(fn, "__qualname__", repr(fn)))[1]


def _call(fn: Callable[..., T], args: tuple[object, ...], idle: bool | None,
          timeout: float, what: str) -> tuple[bool, T]:
    try:
        usable = 0 <= timeout < 1e9  # nan, inf and time_t overflows too
    except TypeError:  # a str from os.environ, None: not a number at all
        usable = False
    if not usable:
        raise ValueError(f"timeout must be a number of seconds, not {timeout!r}")
    if idle is None:
        idle = should_idle()
    policy = getattr(os, "SCHED_IDLE", None)
    if not idle or policy is None:
        return False, fn(*args)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError as exc:
            outcome["refused"] = exc
            return
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller
            outcome["error"] = exc

    helper = threading.Thread(target=run, name="hotswap-preload", daemon=True)
    try:
        helper.start()
    except RuntimeError as exc:  # no thread allowed (RLIMIT_NPROC, a cgroup's pids.max)
        outcome["refused"] = exc
    else:
        _join(helper, timeout)
    if helper.is_alive():
        raise TimeoutError(f"hotswap: {what} at idle priority took over {timeout:g}s "
                           "(no idle CPU on this node?)")
    refused = outcome.get("refused")
    if isinstance(refused, OSError | RuntimeError):
        import logging  # not before: this module is imported first thing

        logging.getLogger(__name__).info(
            "%s refused (%s): running at normal priority",
            "SCHED_IDLE" if isinstance(refused, OSError) else "a helper thread", refused)
        return False, fn(*args)
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    return True, outcome["result"]


def _join(helper: threading.Thread, timeout: float) -> None:
    # In slices: Python runs a signal's handler in the main thread only, and
    # a signal the kernel hands the helper instead (one pending while the
    # process was stopped goes to whichever thread runs first) does not wake
    # a main thread asleep in join(): exit_on_sigterm()'s handler would wait
    # for the end of the imports. A slice's wake-up costs nothing to speak of.
    end = time.monotonic() + timeout
    while helper.is_alive() and (left := end - time.monotonic()) > 0:
        helper.join(min(left, _SIGNAL_SLICE))


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        __import__(name)  # importlib.import_module without importing importlib
