"""Frozen keyword-only records: what the protocol's messages need of
``dataclasses``, for a fraction of its import cost.

``hotswap probe`` (the readiness probe, every few seconds in every pod) and
the PostStart hook import the protocol. With ``dataclasses`` that cost ~17 ms
of their ~50 ms of CPU: 6 ms to import it (it imports ``inspect``) and ~11 ms
to generate the code of 16 frozen classes. These records share generic
methods instead. Type checkers see ``dataclasses`` itself (``protocol.py``
imports it under ``TYPE_CHECKING``), so the classes are checked as
dataclasses; this module only has to behave like one at run time, for the
subset used: ``frozen=True, kw_only=True``, defaults,
``field(default=..., compare=False)``, ``__post_init__``, ``replace()``,
fields inherited from record bases, ``ClassVar`` annotations skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING: Any = object()


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a frozen record."""


class _Field:
    __slots__ = ("compare", "default")

    def __init__(self, default: Any, compare: bool) -> None:
        self.default = default
        self.compare = compare


def field(*, default: Any = _MISSING, compare: bool = True) -> Any:
    return _Field(default, compare)


def dataclass(*, frozen: bool = True, kw_only: bool = True) -> Callable[[type], type]:
    if not (frozen and kw_only):
        raise TypeError("hotswap records are frozen and keyword-only")
    return _build


def replace(obj: Any, **changes: Any) -> Any:
    values = {name: getattr(obj, name) for name in obj.__record_fields__}
    values.update(changes)
    return type(obj)(**values)


def _build(cls: type) -> type:
    fields: dict[str, tuple[Any, bool]] = {}
    for base in reversed(cls.__mro__[1:]):
        fields.update(getattr(base, "__record_fields__", {}))
    # Not inspect.get_annotations(): importing inspect is what this avoids.
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
    for name, annotation in own.items():
        if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
            continue
        default = cls.__dict__.get(name, _MISSING)
        compare = True
        if isinstance(default, _Field):
            default, compare = default.default, default.compare
            if default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, default)
        fields[name] = (default, compare)
    cls.__record_fields__ = fields  # type: ignore[attr-defined]
    cls.__record_compared__ = tuple(  # type: ignore[attr-defined]
        name for name, (_, compare) in fields.items() if compare)
    for name, method in (("__init__", _init), ("__eq__", _eq), ("__hash__", _hash),
                         ("__repr__", _repr), ("__setattr__", _setattr),
                         ("__delattr__", _delattr)):
        setattr(cls, name, method)
    return cls


def _init(self: Any, **values: Any) -> None:
    fields = type(self).__record_fields__
    for name, (default, _) in fields.items():
        value = values.pop(name, default)
        if value is _MISSING:
            raise TypeError(f"{type(self).__name__}() missing keyword argument {name!r}")
        object.__setattr__(self, name, value)
    if values:
        raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) "
                        f"{', '.join(map(repr, values))}")
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _compared(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, name) for name in type(obj).__record_compared__)


def _eq(self: Any, other: object) -> object:  # bool or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _compared(self) == _compared(other)


def _hash(self: Any) -> int:
    return hash(_compared(self))


def _repr(self: Any) -> str:
    body = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self).__record_fields__)
    return f"{type(self).__qualname__}({body})"


def _setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")
