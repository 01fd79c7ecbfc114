"""Process facts (psutil) and the process title (python-prctl).

Both are best effort: a title that cannot be set or a usage that cannot be read
never stops a handover.
"""

from __future__ import annotations

import logging

import psutil

log = logging.getLogger("hotswap")

try:
    import prctl as _prctl
except ImportError:  # pragma: no cover - python-prctl is a hard dependency
    _prctl = None


def set_title(title: str) -> None:
    """Name the process (``ps`` shows the title; ``comm`` gets the first 15
    bytes)."""
    if _prctl is None:
        return
    try:
        _prctl.set_proctitle(title)
        _prctl.set_name(title[:15])
    except (OSError, ValueError) as exc:
        log.debug("cannot set the process title: %s", exc)


def usage() -> tuple[int, int]:
    """``(open descriptors, RSS bytes)`` of this process, -1 when unknown
    (at the descriptor limit, psutil cannot open ``/proc`` and raises a
    plain OSError: a status reply then says -1, it does not fail)."""
    try:
        proc = psutil.Process()
        return proc.num_fds(), proc.memory_info().rss
    except (psutil.Error, OSError):
        return -1, -1


def started_at() -> float:
    """When this process started (Unix time; 0.0 if unknown)."""
    try:
        return float(psutil.Process().create_time())
    except (psutil.Error, OSError):
        return 0.0
