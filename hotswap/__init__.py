"""hotswap: hand a sidecar's listening sockets to its successor, losslessly.

Invariants (each is tested; see the README's guarantees table):

1. Never a moment without an acceptor: the old process keeps accepting until
   the successor confirmed that it adopted every socket and accepts.
2. Never ``shutdown()`` a shared listener; only ``close()`` our descriptor.
3. Failure before confirmation changes nothing: a successor that crashes,
   hangs past the deadline or misbehaves leaves the old process serving. Its
   servers accept only from the step that confirms on (``ready()``'s
   ``start_serving``), so it has taken no connection from the old one.
4. At most two generations, one handover at a time; none while a predecessor
   still drains; a lower Kruise version never takes over from a higher one.
5. Bounded drain: stop accepting, finish in-flight requests, tell keep-alive
   clients ``Connection: close`` on their next response, and cut (logging each)
   only what is left at the deadline.
6. Only the pod's own may take the sockets: SO_PEERCRED uid (and an optional
   token) on the control socket.
7. No descriptor leaks or double closes: every received descriptor is adopted
   or closed on every path; unclaimed inherited ones are closed at ``ready()``;
   all are close-on-exec.
8. The listening control socket travels with the others.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs ~15 ms of CPU
if TYPE_CHECKING:
    from .errors import (
        BrokenResourceError,
        ClosedResourceError,
        HandoverFailed,
        HandoverRefused,
        HandoverTimeout,
        HotswapError,
        ListenerError,
        LocalProtocolError,
        ProtocolError,
        RemoteProtocolError,
    )
    from .kruise import Role
    from .listeners import close_server
    from .upgrader import ExitReason, Options, State, Upgrader

__version__ = "0.1.0"

_LAZY = {
    "errors": ("BrokenResourceError", "ClosedResourceError", "HandoverFailed",
               "HandoverRefused", "HandoverTimeout", "HotswapError", "ListenerError",
               "LocalProtocolError", "ProtocolError", "RemoteProtocolError"),
    "kruise": ("Role",),
    "listeners": ("close_server",),
    "upgrader": ("ExitReason", "Options", "State", "Upgrader"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> object:
    # Nothing is imported with the package itself: a successor imports
    # hotswap.startup first thing, at normal CPU priority, while the old
    # version serves; and `python -m hotswap` (the PostStart hook and the
    # readiness probe, run on every upgrade) does not need the upgrader
    # (asyncio, psutil, prctl). Each name is loaded on first use.
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'hotswap' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BrokenResourceError",
    "ClosedResourceError",
    "ExitReason",
    "HandoverFailed",
    "HandoverRefused",
    "HandoverTimeout",
    "HotswapError",
    "ListenerError",
    "LocalProtocolError",
    "Options",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "State",
    "Upgrader",
    "__version__",
    "close_server",
]
