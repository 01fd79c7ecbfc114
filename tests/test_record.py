"""hotswap._record: the protocol's messages behave as the frozen keyword-only
dataclasses they are typed as, without importing dataclasses at run time."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any, ClassVar

import pytest

from hotswap import _record
from hotswap.protocol import SocketInfo, Sockets, Status


def _pair() -> list[type]:
    """The same class, once as a dataclass and once as a record."""
    made: list[type] = []
    for make, field in ((dataclasses.dataclass, dataclasses.field),
                        (_record.dataclass, _record.field)):
        @make(frozen=True, kw_only=True)
        class Base:
            KIND: ClassVar[str] = "base"
            a: int
            b: str = "x"

        @make(frozen=True, kw_only=True)
        class Thing(Base):
            KIND: ClassVar[str] = "thing"
            c: tuple[int, ...] = ()
            d: int = field(default=0, compare=False)

            def __post_init__(self) -> None:
                if self.a < 0:
                    raise ValueError("a must not be negative")

        made.append(Thing)
    return made


def _behaviour(cls: type, replace: Any) -> list[object]:
    seen: list[object] = []
    one = cls(a=1, c=(2,), d=5)
    seen += [repr(one).split("Thing", 1)[1], one.b, one.KIND]
    seen += [one == cls(a=1, c=(2,), d=6), one == cls(a=2, c=(2,)),
             hash(one) == hash(cls(a=1, c=(2,), d=7)), one.__eq__(object())]
    changed = replace(one, b="y")
    seen += [changed.b, changed.d, changed == one]
    for attempt in (lambda: cls(), lambda: cls(1), lambda: cls(a=1, z=2),
                    lambda: cls(a=-1), lambda: replace(one, a=-1),
                    lambda: setattr(one, "a", 3), lambda: delattr(one, "a")):
        try:
            attempt()
            seen.append("no error")
        except Exception as exc:  # noqa: BLE001 -- the kind of error is the point
            seen.append((isinstance(exc, AttributeError), isinstance(exc, TypeError),
                         isinstance(exc, ValueError)))
    return seen


def test_records_behave_like_the_dataclasses_they_are_typed_as() -> None:
    real, light = _pair()
    assert _behaviour(light, _record.replace) == _behaviour(real, dataclasses.replace)


def test_protocol_messages_compare_without_their_descriptors() -> None:
    info = SocketInfo(name="http", family="inet", kind="stream", address="127.0.0.1:1")
    assert Sockets(entries=(info,), fds=(5,)) == Sockets(entries=(info,), fds=(6,))
    moved = _record.replace(Sockets(entries=(info,)), fds=(7,))
    assert moved.fds == (7,) and moved.entries == (info,)
    status = Status(name="n", pid=1, version="v", rank=None, state="serving",
                    predecessor="none", generation=0)
    assert (status.listeners, status.num_fds, status.rss) == ((), -1, -1)
    with pytest.raises(AttributeError):
        status.pid = 2  # type: ignore[misc]


def test_the_cli_does_not_import_dataclasses() -> None:
    """The readiness probe runs `hotswap probe` every few seconds in every
    pod: dataclasses (and the inspect module it imports) were ~17 ms of its
    ~50 ms of CPU."""
    probe = ("import sys, hotswap.cli; "
             "print(' '.join(m for m in ('dataclasses', 'inspect', 'asyncio') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    assert out == []
