"""The Kruise role rule on plain values, for the first thing a successor runs.

:mod:`hotswap.kruise` is the public face (:class:`~hotswap.kruise.Role`, an
enum, and :class:`~hotswap.errors.HotswapError`); this module is what it and
:mod:`hotswap.startup` share, and imports nothing: a successor decides
whether to start at idle priority before its heavy imports, at normal
priority, where ``enum`` alone costs about a millisecond of CPU.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's (see hotswap.startup)
if TYPE_CHECKING:
    from collections.abc import Mapping

VERSION_ENV = "SIDECARSET_VERSION"
ALT_ENV = "SIDECARSET_VERSION_ALT"


def parse(env: Mapping[str, str], key: str) -> int | None:
    """The non-negative integer in ``env[key]``, None if unset or blank.
    Raises ValueError (saying which variable and what it held) otherwise."""
    raw = env.get(key, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{key}={raw!r} is negative")
    return value


def role(rank: int | None, alt: int | None) -> str:
    """The value of the :class:`~hotswap.kruise.Role` the versions give."""
    if rank is None:
        return "auto"
    if rank == 0:
        return "empty"
    if not alt:
        return "fresh"
    return "takeover" if rank > alt else "passive"
