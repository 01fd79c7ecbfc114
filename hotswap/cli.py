"""The ``hotswap`` command (also ``python -m hotswap``).

- ``hotswap status --name N [--json]``: who serves N now.
- ``hotswap wait-ready --name N --timeout S``: wait until the process whose
  ``SIDECARSET_VERSION`` is ours (or ``--version``) serves N: it holds its
  serving marker (it has begun confirming: the handover is its own), or the
  control socket says it serves and its predecessor stopped accepting; the
  PostStart hook's check. In the empty
  slot (``SIDECARSET_VERSION=0``) or an old slot restarted mid-upgrade
  (passive: ``SIDECARSET_VERSION <= SIDECARSET_VERSION_ALT``) there is
  nothing to wait for: exit 0 at once.
- ``hotswap probe --name N``: readiness of this slot (a probe that tells the
  two slots apart although they share the port): ready if empty
  (``SIDECARSET_VERSION=0``), passive (``VERSION <= ALT``: an old slot
  restarted mid-upgrade), serving, or superseded by a newer version; not
  ready if nobody serves or an older version still does.

Each trusts only a server of its own uid (SO_PEERCRED; ``--allow-uid`` and
``HOTSWAP_ALLOW_UIDS=uid,uid`` add others, e.g. for the hook and the probe
when the server runs as another user): any process of the pod's network
namespace can bind the abstract name first. The server checks the client's
uid the same way: it answers only uids it allows (by default its own, plus
its own ``HOTSWAP_ALLOW_UIDS``), so set the variable on both sides.

Exit status: 0 success, 1 the condition failed or timed out, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from . import control, kruise
from .errors import HandoverRefused, HotswapError
from .protocol import Status

_POLL = 0.1
# Accepting connections: serving, or handing over (until the successor confirms).
_SERVING = ("serving", "handing-over")


def _say(text: str, *, err: bool = False) -> None:
    """Write a line to stdout (stderr if ``err``) and flush it. The exit
    status is the answer and the line only explains it: on a stream that
    is closed (None) or whose reader has gone (EPIPE) the line is lost and
    nothing else changes (a ready probe said exit 1, with a traceback)."""
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        stream.write(text + "\n")
        stream.flush()


def _address(args: argparse.Namespace) -> str:
    return control.control_address(args.name, args.control_path)


def _describe(status: Status) -> str:
    listeners = ", ".join(f"{i.name}={i.address}" for i in status.listeners) or "-"
    if status.listener_count > len(status.listeners):
        listeners += f", ... ({status.listener_count} in all)"
    rank = "-" if status.rank is None else str(status.rank)
    return (f"{status.name}: pid {status.pid} version {status.version or '-'} "
            f"(sidecarset {rank}) state {status.state}, predecessor "
            f"{status.predecessor}, generation {status.generation}, "
            f"listeners {listeners}, fds {status.num_fds}")


def _allowed(args: argparse.Namespace) -> frozenset[int]:
    return control.allowed_uids(os.environ, args.allow_uid)


def _status(args: argparse.Namespace) -> int:
    address = _address(args)
    try:
        status = control.status_blocking(address, timeout=args.timeout,
                                         allowed_uids=_allowed(args))
    except (OSError, HotswapError) as exc:
        _say(f"hotswap: no answer from {address}: {exc}", err=True)
        return 1
    if args.json:
        _say(json.dumps(status.to_json(), sort_keys=True))
    else:
        _say(_describe(status))
    return 0


def _target(args: argparse.Namespace) -> tuple[int | None, str | None]:
    if args.version:
        return None, args.version
    rank = kruise.detect(os.environ).rank
    if rank is None:
        raise ValueError("set SIDECARSET_VERSION or pass --version")  # usage: 2
    return rank, None


def _nothing_to_wait_for(args: argparse.Namespace) -> str | None:
    """Why this Kruise slot has nothing to wait for and that is fine, or
    None: the empty image (``VERSION=0``), or an old slot the kubelet
    restarted mid-upgrade (:attr:`Role.PASSIVE`: ``VERSION <= ALT``; it
    serves only while it stands in for a newer version that is down, see
    :meth:`hotswap.Upgrader.start`). Its hook succeeds (failing it would
    only get the container killed and restarted) and its probe says ready
    (the other slot's probe speaks for the pod, or it serves itself)."""
    if args.version:
        return None
    versions = kruise.detect(os.environ)
    if versions.role is kruise.Role.EMPTY:
        return "empty slot"
    if versions.role is kruise.Role.PASSIVE:
        return (f"passive slot (version {versions.rank}, other slot {versions.alt}: "
                "an old slot restarted mid-upgrade never takes the sockets back)")
    return None


def _verdict(status: Status, rank: int | None, version: str | None) -> tuple[bool, bool, str]:
    """(done, hopeless, why) for one status reply."""
    ours = status.rank == rank if rank is not None else status.version == version
    if ours:
        if status.state in _SERVING and status.predecessor in ("none", "draining", "gone"):
            return True, False, _describe(status)
        return False, False, f"ours but not yet done: {_describe(status)}"
    if rank is not None and status.rank is not None and status.rank > rank:
        return False, True, f"a newer version serves: {_describe(status)}"
    return False, False, f"not ours yet: {_describe(status)}"


def _marked(args: argparse.Namespace, rank: int | None) -> bool:
    """Whether Kruise version ``rank`` holds its serving marker: it accepts,
    and it holds it from the moment it begins confirming, before the
    predecessor has read the confirmation and released it. Once it has
    begun, the handover is its own: a hook that failed then would get the
    kubelet to stop the one process that will accept."""
    fresh = control.marker_fresh(os.environ)  # the hook's and the probe's too
    return (rank is not None and not args.control_path and fresh is not None
            and rank in control.marked_ranks(args.name, fresh=fresh))


def _wait_ready(args: argparse.Namespace) -> int:
    idle = _nothing_to_wait_for(args)
    if idle is not None:
        _say(f"hotswap: ready: {idle}")
        return 0
    rank, version = _target(args)
    want = f"sidecarset version {rank}" if rank is not None else f"version {version}"
    address = _address(args)
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    while True:
        if _marked(args, rank):
            _say(f"hotswap: ready: {want} holds its serving marker (it accepts, "
                 "and its predecessor stops as it reads the confirmation)")
            return 0
        remaining = max(0.1, deadline - time.monotonic())
        try:
            status = control.status_blocking(address, timeout=min(remaining, 2.0),
                                             allowed_uids=_allowed(args))
        except HandoverRefused as exc:
            if exc.code != "timeout":  # refused us (our uid, say): final
                _say(f"hotswap: no status from {address}: {exc}", err=True)
                return 1
            # It gave up waiting for this poll's request (this process was
            # stalled after connecting, on a busy node): ask again.
            last = f"no status from {address}: {exc}"
        except (OSError, HotswapError) as exc:
            last = f"no answer from {address}: {exc}"
        else:
            done, hopeless, last = _verdict(status, rank, version)
            if done:
                _say(f"hotswap: ready: {last}")
                return 0
            if hopeless:
                _say(f"hotswap: {want} will not serve: {last}", err=True)
                return 1
        if time.monotonic() >= deadline and not _marked(args, rank):
            _say(f"hotswap: {want} timed out after {args.timeout:g}s; last: {last}",
                 err=True)
            return 1
        time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))


def _probe(args: argparse.Namespace) -> int:
    """Readiness of *this* slot: ready if it is the empty image, if its
    version serves, or if a newer version has superseded it (the old slot
    between migration and reset must not make the pod NotReady). Not ready if
    nobody answers or an older version still serves (our migration is pending
    or failed: Kruise then retries this slot)."""
    idle = _nothing_to_wait_for(args)
    if idle is not None:  # the other slot's probe speaks for the pod (or it stands in)
        _say(f"hotswap: ready: {idle}")
        return 0
    rank, version = _target(args)
    address = _address(args)
    try:
        status = control.status_blocking(address, timeout=args.timeout,
                                         allowed_uids=_allowed(args))
    except (OSError, HotswapError) as exc:
        _say(f"hotswap: not ready: no answer from {address}: {exc}", err=True)
        return 1
    ours = status.rank == rank if rank is not None else status.version == version
    if ours and status.state in _SERVING:
        _say(f"hotswap: ready: serving: {_describe(status)}")
        return 0
    if rank is not None and status.rank is not None and status.rank > rank:
        _say(f"hotswap: ready: superseded by a newer version: {_describe(status)}")
        return 0
    _say(f"hotswap: not ready: {_describe(status)}", err=True)
    return 1


_MAX_SECONDS = 1e9
"""The longest timeout (about 31 years): a socket timeout must fit the
platform's time_t in nanoseconds (1e10 s raised OverflowError, a traceback
instead of a usage error)."""

def _seconds(text: str) -> float:
    """A timeout: a finite number of seconds from 0 to :data:`_MAX_SECONDS`
    (``nan`` would never time out, and ``inf`` is no deadline)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= _MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"not a finite number of seconds from 0 to "
                                         f"{_MAX_SECONDS:.0f}: {text!r}")
    return value


def _answer_seconds(text: str) -> float:
    """The timeout of ``status`` and ``probe``, which ask once: as
    :func:`_seconds`, but over 0 (with no time to wait for it they never
    heard an answer, and said so of a process that serves)."""
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"no time to wait for an answer: {text!r} "
                                         "(a number of seconds over 0)")
    return value


def _uid(text: str) -> int:
    """A uid: an integer from 0 to :data:`control.MAX_UID`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uid: {text!r}") from None
    if not 0 <= value <= control.MAX_UID:
        raise argparse.ArgumentTypeError(f"not a uid (0 to {control.MAX_UID}): {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotswap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default=os.environ.get("HOTSWAP_NAME"),
                       required="HOTSWAP_NAME" not in os.environ,
                       help="sidecar name (control socket @hotswap/NAME)")
        p.add_argument("--control-path", default=os.environ.get("HOTSWAP_CONTROL_PATH"),
                       help="filesystem control socket instead of the abstract name")
        p.add_argument("--allow-uid", type=_uid, action="append", default=[],
                       metavar="UID", help="also trust a server running as UID "
                       "(repeatable; also HOTSWAP_ALLOW_UIDS=uid,uid; our own uid always)")

    p = sub.add_parser("status", help="show the process serving NAME")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=_answer_seconds, default=control.DEFAULT_TIMEOUT,
                   help=f"seconds to wait for an answer (default {control.DEFAULT_TIMEOUT:g})")
    for cmd, help_ in (("wait-ready", "wait until our version serves NAME"),
                       ("probe", "readiness of this slot: exit 0 if it is empty, "
                                 "passive, serving, or superseded by a newer version")):
        p = sub.add_parser(cmd, help=help_)
        common(p)
        p.add_argument("--version", help="the version to look for, as given to the "
                       "Upgrader (without it: the Kruise rank in SIDECARSET_VERSION)")
        default, what, seconds = ((60.0, "seconds to wait in all", _seconds)
                                  if cmd == "wait-ready"
                                  else (2.0, "seconds to wait for an answer", _answer_seconds))
        p.add_argument("--timeout", type=seconds, default=default,
                       help=f"{what} (default {default:g})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            return _status(args)
        if args.command == "probe":
            return _probe(args)
        return _wait_ready(args)
    except (HotswapError, ValueError) as exc:
        _say(f"hotswap: {exc}", err=True)
        return 2


def run() -> NoReturn:
    """The ``hotswap`` command: :func:`main`, then exit at once. The PostStart
    hook's process ends at the moment the new version starts serving, when
    CPU is scarcest; flushing stdout/stderr and ``os._exit`` skip the
    interpreter's teardown, which has nothing to release here.

    A SIGTERM ends it (exit status 143) also as PID 1 (a container's
    command), which gets only the signals it has a handler for: it was
    dropped there, and ``wait-ready`` waited out its ``--timeout``."""
    if os.getpid() == 1:  # elsewhere SIGTERM's default action ends it already
        from . import startup  # (~2 ms of imports, on the hook's path: only here)
        startup.exit_on_sigterm()
    code = main()
    for stream in (sys.stdout, sys.stderr):  # each line was flushed: only in case
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(code)
