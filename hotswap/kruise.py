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
                                                         sockets back (with
                                                         nobody serving, bind:
                                                         see ``Upgrader.start``)
===============================  ======================  =======================
"""

from __future__ import annotations

import enum
import math
import os
import stat
from collections.abc import Mapping

from . import _versions
from ._versions import ALT_ENV, VERSION_ENV
from .errors import HotswapError

__all__ = ["ALT_ENV", "HOOK_DIR_ENV", "VERSION_ENV", "Role", "Versions", "detect",
           "hook_deadline_path", "hook_gave_up"]

HOOK_DIR_ENV = "HOTSWAP_HOOK_DIR"
"""Where ``scripts/migrate.sh`` leaves its deadline for the sidecar of its
container (default ``/dev/shm``: a tmpfs, writable under a read-only root
filesystem); the hook and the sidecar must see the same value."""
HOOK_MARGIN = 0.5
"""Seconds before the hook's deadline from which a successor no longer
confirms (the hook's last look for the marker comes at its deadline)."""
_UPTIME = "/proc/uptime"
"""The hook's clock, read here too: ``scripts/migrate.sh`` writes its
deadline in the time since boot that this file shows. Not
``CLOCK_BOOTTIME``: LXCFS (common on Kruise clusters) mounts a
container's own uptime over this file, and the deadline of a hook that
had just started would read as hours past."""


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


_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
"""What a hostname may hold to name a hook's file (a pod's is a DNS label);
``scripts/migrate.sh`` checks the same."""


def hook_deadline_path(env: Mapping[str, str], name: str, rank: int) -> str | None:
    """The file in which the PostStart hook of sidecar ``name`` at Kruise
    version ``rank`` in this pod leaves its deadline (:data:`HOOK_DIR_ENV`):
    ``hotswap-hook-NAME-RANK@HOST``, or None if there is none.

    HOST is the hostname (``uname -n``, which ``scripts/migrate.sh`` reads
    from ``/proc/sys/kernel/hostname``): the pod's name, the same for both
    slots of a pod and another in every other pod, whose hooks have the
    same version (the SidecarSet's) and, with hostIPC, the same
    ``/dev/shm``. (With hostNetwork it is the node's, and pods on one node
    share it; they share the abstract control socket too: see the README.)
    A hostname that is empty or holds anything but ASCII letters, digits,
    ``.``, ``_`` and ``-`` names no file (None): the hook leaves none
    either, and no deadline is checked."""
    host = os.uname().nodename
    if not host or not _HOST_CHARS.issuperset(host):
        return None
    return os.path.join(env.get(HOOK_DIR_ENV) or "/dev/shm",
                        f"hotswap-hook-{name}-{rank}@{host}")


def hook_gave_up(env: Mapping[str, str], name: str, rank: int, *,
                 since: float) -> str | None:
    """Why this slot's PostStart hook has given up (or will have, within
    :data:`HOOK_MARGIN`), or None if it has not or left no deadline.

    ``scripts/migrate.sh`` writes its deadline as it starts, in hundredths
    of a second since boot as ``/proc/uptime`` shows it (no clock step
    moves it; read here from the same file, see :data:`_UPTIME`), to
    :func:`hook_deadline_path`. A hook that gives up
    exits 1, and the kubelet then stops the container: a successor that
    confirmed meanwhile would be stopped as the one process accepting, so
    it must not confirm any more. A file last written before ``since``
    (this process's start, Unix time) is a previous run's and counts for
    nothing; one that cannot be read or parsed, too (no deadline: the hook
    could not write it, or another hook runs), and so does any deadline
    when ``/proc/uptime`` cannot be read or no file can be named (an odd
    hostname).

    That one test is on the wall clock (a file's mtime against ``since``):
    a step of it between the hook's write and this process's start could
    make this run's file look stale (forward, over 1 s: a hook that then
    gives up goes unseen, as when it leaves no file) or a previous run's
    look fresh (backward: read only until this run's hook, which starts
    with the container, replaces it; an old deadline there aborts this
    takeover, the predecessor serving on, and the restart tries again).
    Both need the step within the seconds of a container's start, which
    clocks make at boot, not during an upgrade; the deadline itself is on
    ``/proc/uptime`` and no step moves it."""
    path = hook_deadline_path(env, name, rank)
    if path is None:
        return None
    try:
        # Without waiting (O_NONBLOCK): the hook's is a regular file, and
        # anything else there (a FIFO any process sharing the folder can
        # make) is no deadline. Opened blocking, a FIFO held ready() in
        # open() until a writer came, deaf to SIGTERM.
        # Closed here on every way out: open() of the descriptor refused a
        # directory (IsADirectoryError) and left it open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime < since - 1.0:
                return None
            text = os.read(fd, 32).decode("ascii").strip()
        finally:
            os.close(fd)
    except (OSError, ValueError):  # UnicodeDecodeError too
        return None
    if not text.isdigit() or not text.isascii():
        return None
    now = _uptime()
    if now is None:
        return None
    left = int(text) / 100 - now
    if left > HOOK_MARGIN:
        return None
    return (f"the PostStart hook's deadline ({path}) is {-left:.2f}s past"
            if left <= 0 else f"the PostStart hook gives up in {left:.2f}s ({path})")


def _uptime() -> float | None:
    """Seconds since boot as :data:`_UPTIME` shows them (None if it cannot
    be read)."""
    try:
        with open(_UPTIME, encoding="ascii") as fh:
            value = float(fh.read(64).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return value if math.isfinite(value) else None
