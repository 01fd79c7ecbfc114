"""The hotswap error hierarchy: one base, one meaning per class.

``HotswapError`` is the base of everything this package raises on purpose.

- :class:`LocalProtocolError` -- *you* misused the protocol (sent a message the
  state machine does not allow now). The state is left unchanged.
- :class:`RemoteProtocolError` -- the *peer* misbehaved (malformed frame, wrong
  order, unexpected descriptors). The connection is dead; every descriptor that
  arrived with it has been closed.
- :class:`ClosedResourceError` -- the channel was closed by this side.
- :class:`BrokenResourceError` -- the world broke the channel (EOF, reset);
  ``__cause__`` is the original :class:`OSError` when there is one.
- :class:`HandoverRefused` -- the serving process said no (busy, older version,
  not allowed, a protocol it does not speak, or it gave up waiting for the
  hello); ``code`` says which.
- :class:`HandoverFailed` -- a handover was started but did not complete.
- :class:`HandoverTimeout` -- a deadline passed while waiting for the peer.
"""

from __future__ import annotations


class HotswapError(Exception):
    """Base class of every error hotswap raises on purpose."""


class ProtocolError(HotswapError):
    """The control protocol was violated (base of Local/Remote)."""


class LocalProtocolError(ProtocolError):
    """This side tried something the protocol does not allow in this state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized or out of order."""


class ClosedResourceError(HotswapError):
    """The channel was closed by this side and cannot be used any more."""


class BrokenResourceError(HotswapError):
    """The channel was broken by the peer or the OS (EOF, reset, bad fd).

    ``eof`` is True when the peer closed its end cleanly; otherwise
    ``__cause__`` is the ``OSError``, if there was one. ``truncated`` is True
    when descriptors sent to us did not fit (``MSG_CTRUNC``: this process
    has no descriptor numbers left): the fault is ours, not the peer's.
    """

    def __init__(self, message: str, *, eof: bool = False, truncated: bool = False) -> None:
        super().__init__(message)
        self.eof = eof
        self.truncated = truncated


class HandoverRefused(HotswapError):
    """The serving process refused the handover.

    ``code`` is one of ``"busy"``, ``"older"``, ``"forbidden"``, ``"protocol"``,
    ``"timeout"``.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"handover refused ({code}): {reason}")
        self.code = code
        self.reason = reason


class HandoverFailed(HotswapError):
    """A handover started but did not complete; the old process keeps serving."""


class HandoverTimeout(HandoverFailed):
    """A deadline passed while waiting for the other side of a handover."""


class ListenerError(HotswapError):
    """A socket could not be bound, or an inherited one does not match."""
