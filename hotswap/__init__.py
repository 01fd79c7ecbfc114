"""hotswap: hand a sidecar's listening sockets to its successor, losslessly.

Invariants (each is tested; see the README's guarantees table):

1. Never a moment without an acceptor: the old process keeps accepting until
   the successor confirmed that it adopted every socket and accepts.
2. Never ``shutdown()`` a shared listener; only ``close()`` our descriptor.
3. Failure before confirmation changes nothing: a successor that crashes,
   hangs past the deadline or misbehaves leaves the old process serving.
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

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .upgrader import ExitReason, Options, State, Upgrader

__version__ = "0.1.0"

_LAZY = {"ExitReason", "Options", "State", "Upgrader"}


def __getattr__(name: str) -> Any:
    # The upgrader (asyncio, psutil, prctl) is loaded on first use, so that
    # `python -m hotswap` -- the PostStart hook and the readiness probe, run on
    # every upgrade -- starts without it.
    if name in _LAZY:
        from . import upgrader

        return getattr(upgrader, name)
    raise AttributeError(f"module 'hotswap' has no attribute {name!r}")

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
]
