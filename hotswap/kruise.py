"""OpenKruise SidecarSet HotUpgrade role rules.

Kruise gives each of the two sidecar slots ``SIDECARSET_VERSION`` (this slot's
version) and ``SIDECARSET_VERSION_ALT`` (the other slot's), resolved from pod
annotations when the container starts:

===============================  ======================  =======================
variables                        role                    what the process does
===============================  ======================  =======================
``VERSION`` unset                :attr:`Role.AUTO`       take over if someone
                                                         serves, else bind
``VERSION == 0``                 :attr:`Role.EMPTY`      the empty image: nothing
``ALT`` empty or ``0``           :attr:`Role.FRESH`      bind the ports
``VERSION > ALT``                :attr:`Role.TAKEOVER`   take the sockets over
``VERSION <= ALT``               :attr:`Role.PASSIVE`    an old slot restarted
                                                         mid-upgrade: never take
                                                         sockets back
===============================  ======================  =======================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from . import _versions
from ._versions import ALT_ENV, VERSION_ENV
from .errors import HotswapError

__all__ = ["ALT_ENV", "VERSION_ENV", "Role", "Versions", "detect"]


class Role(enum.Enum):
    """What a starting process should do with the sockets."""

    AUTO = "auto"
    FRESH = "fresh"
    TAKEOVER = "takeover"
    PASSIVE = "passive"
    EMPTY = "empty"


class Versions:
    """The Kruise versions of this slot (``rank``) and the other (``alt``),
    and the :class:`Role` they give. (A plain class: a successor reads it
    first thing, before its heavy imports, at normal CPU priority; a
    dataclass or NamedTuple would import ``dataclasses`` or ``typing``,
    7-15 ms of CPU.)"""

    __slots__ = ("alt", "rank", "role")

    def __init__(self, rank: int | None, alt: int | None, role: Role) -> None:
        self.rank = rank
        self.alt = alt
        self.role = role

    def __repr__(self) -> str:
        return f"Versions(rank={self.rank!r}, alt={self.alt!r}, role={self.role})"


def detect(env: Mapping[str, str]) -> Versions:
    """Apply the role rules to an environment. Raises HotswapError on a
    malformed version."""
    try:
        rank = _versions.parse(env, VERSION_ENV)
        alt = _versions.parse(env, ALT_ENV)
    except ValueError as exc:
        raise HotswapError(str(exc)) from None
    return Versions(rank, alt, Role(_versions.role(rank, alt)))
