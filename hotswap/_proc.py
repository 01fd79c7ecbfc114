"""Process facts (psutil) and the process title.

Both are best effort: a title that cannot be set or a usage that cannot be read
never stops a handover.
"""

from __future__ import annotations

import functools
import logging

import psutil

log = logging.getLogger("hotswap")

try:
    import prctl as _prctl
except ImportError:  # pragma: no cover - python-prctl is a hard dependency
    _prctl = None


def set_title(title: str) -> None:
    """Name the process: ``ps`` shows the title (as much of it as the
    command line's bytes hold), and ``comm`` its first 15 bytes.

    The title is written over the command line's own bytes, where the kernel
    says they are (``/proc/self/stat``), through ``/proc/self/mem``. Not with
    python-prctl's ``set_proctitle()``: it finds them by walking back from
    the C ``environ``, and where that fails (the first environment variable
    changed by the program, an empty environment, a command line over
    8 KiB) it dereferences a null pointer and the process dies of SIGSEGV.
    Errors (no ``/proc``, a kernel that refuses the write) are logged at
    debug level and ignored."""
    encoded = title.encode(errors="replace")
    try:
        area = _command_line_area()
        if area is not None:
            start, end = area
            # Room for the title and at least one NUL ending it; the rest
            # NULs too, so that nothing of the old command line shows.
            text = encoded[:end - start - 1]
            with open("/proc/self/mem", "r+b", buffering=0) as mem:
                mem.seek(start)
                mem.write(text + bytes(end - start - len(text)))
        if _prctl is not None:
            _prctl.set_name(title[:15])
    except (OSError, ValueError) as exc:
        log.debug("cannot set the process title: %s", exc)


@functools.cache
def _command_line_area() -> tuple[int, int] | None:
    """Where this process's command line is in its memory, ``(start, end)``
    (``arg_start`` and ``arg_end`` of ``/proc/self/stat``, fields 48 and 49),
    or None when the kernel does not say (before Linux 3.5; 0 when hidden).
    Read once: it does not move (a forked child has it at the same place)."""
    with open("/proc/self/stat", "rb") as fh:
        stat = fh.read()
    # After the command name, which may hold blanks and parentheses: field 3 on.
    fields = stat[stat.rindex(b")") + 2:].split()
    if len(fields) < 47:
        return None
    start, end = int(fields[45]), int(fields[46])
    return (start, end) if 0 < start < end else None


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
