"""The sans-IO core of the hotswap control protocol.

Theory of operation
===================

Two processes talk over one Unix stream connection. The *server* side is the
process that is serving now and owns the listening control socket; the *client*
side is either a successor that wants the sockets (it opens with
:class:`Hello`) or a tool that only asks (it opens with :class:`StatusRequest`).

Frames
------
Every message is one frame: a 4-byte big-endian length ``N`` (1 <= N <=
:data:`MAX_FRAME`) followed by ``N`` bytes of a UTF-8 JSON object whose
``"type"`` names the message. Descriptors ride with exactly one frame
(:class:`Sockets`), attached with SCM_RIGHTS to that frame's first byte, at most
:data:`MAX_FDS_PER_FRAME` of them, and are named by the frame's entries in
order -- never positional across frames (:class:`Sockets` for listeners,
:class:`Connections` for keep-alive connections handed over while the old
side drains). The receiver keeps a FIFO of arrived
descriptors; a frame that needs more than have arrived, or descriptors that
belong to no frame, are a :class:`~hotswap.errors.RemoteProtocolError`.

A handover, as a sequence
-------------------------
::

    successor (client)                       serving (server)
      Hello(protocol, pid, version, rank) -->
                                         <-- Welcome(pid, version, count)
                                         <-- Sockets(entries..., fds)  x ceil(count/253)
      (adopt, start accepting)
      Accepting()                         -->
                                              (stop accepting)
                                         <-- Released(pid)
                                              (drain)
                                         <-- Connections(entries, fds)  x n
                                              (idle keep-alive connections,
                                               if the hello offered "connections")
      Adopted(count)                      -->  after each, if both offered
                                              "connections-ack"
      or Abort(reason), then the end      -->  a frame refused (the server
                                              keeps it); the reason only if
                                              both offered "connections-refusal"
                                         <-- Drained(pid, cut)

Either outcome is in the vocabulary: the server may answer ``Refused`` instead
of ``Welcome``, and ``Failed`` at any point before it has seen ``Accepting``;
the client may ``Abort`` before it confirms. ``Failed`` and ``Accepting`` may
cross on the wire; a ``Accepting`` or ``Abort`` that arrives after ``Failed``
is ignored (the server has already gone back to serving).

State machine
-------------
One conversation state per connection, shared by both ends (each end runs its
own :class:`Connection` over the same message stream). Transitions are the
table :data:`_TRANSITIONS`, keyed by ``(state, sender, message type)``. A
message not in the table is an error: sent by us, it raises
:class:`~hotswap.errors.LocalProtocolError` and changes nothing; received, it
raises :class:`~hotswap.errors.RemoteProtocolError` and the state becomes
:data:`ERROR` for good.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, NoReturn, Self, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from dataclasses import dataclass, field, replace
else:  # the same, without dataclasses' import and code generation (see _record)
    from ._record import dataclass, field, replace

PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 256 * 1024
MAX_CLIENT_FRAME: Final = 16 * 1024
"""The largest frame a server takes from a client: a client's messages
(hello, status request, accepting, abort, adopted) are well under 1 KiB, and
a server holds a partial frame per connection: 256 KiB each, from a few
hundred peers, was memory the allocator kept."""
MAX_FDS_PER_FRAME: Final = 253  # SCM_MAX_FD in the Linux kernel
STATUS_MAX_LISTENERS: Final = 100
STATUS_LISTENERS_BYTES: Final = MAX_FRAME // 2
"""A serving process's :class:`Status` lists at most STATUS_MAX_LISTENERS
listeners, and no more than fit in STATUS_LISTENERS_BYTES of JSON (names and
addresses are bounded in characters, not in bytes): the reply is one frame.
A receiver takes any number (older versions list them all)."""
_HEADER = struct.Struct("!I")


class Sender(Enum):
    """Which end of the connection a message comes from."""

    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    """Conversation states (sentinels)."""

    IDLE = "idle"
    STATUS_REQUESTED = "status-requested"
    HELLO_SENT = "hello-sent"
    TRANSFERRING = "transferring"
    ADOPTING = "adopting"
    CONFIRMED = "confirmed"
    RELEASED = "released"
    DONE = "done"
    FAILED = "failed"
    ERROR = "error"


# --------------------------------------------------------------------- messages


def _check(data: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    if key not in data:
        raise RemoteProtocolError(f"missing field {key!r}")
    value = data[key]
    # bool is an int subclass; a JSON true must not pass as a number.
    if isinstance(value, bool) and bool not in kinds:
        raise RemoteProtocolError(f"field {key!r} has the wrong type")
    if not isinstance(value, kinds):
        raise RemoteProtocolError(f"field {key!r} has the wrong type")
    return value


def _str_tuple(data: dict[str, Any], key: str) -> tuple[str, ...]:
    items = _check(data, key, (list,))
    if not all(isinstance(item, str) for item in items):
        raise RemoteProtocolError(f"field {key!r} must be a list of strings")
    return tuple(items)


MAX_SOCKET_NAME = 200
"""The longest listener name (characters) a :class:`SocketInfo` carries."""


@dataclass(frozen=True, kw_only=True)
class SocketInfo:
    """What a descriptor is: its name and what it is bound to.

    ``family`` is ``"inet"``, ``"inet6"`` or ``"unix"``; ``kind`` is
    ``"stream"`` or ``"dgram"``; ``address`` is ``"host:port"`` for inet,
    ``"[host]:port"`` for inet6, a path, or ``"@name"`` for an abstract Unix
    socket.
    """

    name: str
    family: str
    kind: str
    address: str

    FAMILIES: ClassVar[frozenset[str]] = frozenset({"inet", "inet6", "unix"})
    KINDS: ClassVar[frozenset[str]] = frozenset({"stream", "dgram"})

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > MAX_SOCKET_NAME:
            raise LocalProtocolError(f"socket name must be 1-{MAX_SOCKET_NAME} characters")
        if self.family not in self.FAMILIES:
            raise LocalProtocolError(f"unknown socket family {self.family!r}")
        if self.kind not in self.KINDS:
            raise LocalProtocolError(f"unknown socket kind {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "kind": self.kind,
                "address": self.address}

    @classmethod
    def from_json(cls, data: Any) -> SocketInfo:
        if not isinstance(data, dict):
            raise RemoteProtocolError("socket entry must be an object")
        try:
            return cls(name=_check(data, "name", (str,)),
                       family=_check(data, "family", (str,)),
                       kind=_check(data, "kind", (str,)),
                       address=_check(data, "address", (str,)))
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from None


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of all messages. ``TYPE`` is the wire name."""

    TYPE: ClassVar[str] = ""

    @property
    def nfds(self) -> int:
        """How many descriptors travel with this message."""
        return 0

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """A successor asks for the sockets. ``rank`` is its ordered version
    (Kruise's ``SIDECARSET_VERSION``) when it has one."""

    TYPE: ClassVar[str] = "hello"
    protocol: int = PROTOCOL_VERSION
    pid: int
    version: str
    rank: int | None = None
    token: str = ""
    capabilities: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "pid": self.pid, "version": self.version,
                "rank": self.rank, "token": self.token,
                "capabilities": list(self.capabilities)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hello:
        return cls(protocol=_check(data, "protocol", (int,)),
                   pid=_check(data, "pid", (int,)),
                   version=_check(data, "version", (str,)),
                   rank=_check(data, "rank", (int, type(None))),
                   token=_check(data, "token", (str,)),
                   capabilities=_str_tuple(data, "capabilities"))


@dataclass(frozen=True, kw_only=True)
class StatusRequest(Message):
    """A tool asks who is serving."""

    TYPE: ClassVar[str] = "status-request"
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StatusRequest:
        return cls(protocol=_check(data, "protocol", (int,)))


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    """The serving process describes itself.

    ``state`` is the upgrader state (``"serving"``, ``"handing-over"``, ...);
    ``predecessor`` is ``"none"``, ``"accepting"`` (has not stopped accepting
    yet), ``"draining"`` or ``"gone"``. ``listeners`` lists the first of
    them, as many as fit (see :data:`STATUS_MAX_LISTENERS`; the reply is one
    frame); ``listener_count`` says how many there are (absent on the wire
    from older versions, which list them all: then the length of
    ``listeners``).
    """

    TYPE: ClassVar[str] = "status"
    name: str
    pid: int
    version: str
    rank: int | None
    state: str
    predecessor: str
    generation: int
    listeners: tuple[SocketInfo, ...] = ()
    num_fds: int = -1
    rss: int = -1
    listener_count: int = -1

    def __post_init__(self) -> None:
        if self.listener_count < len(self.listeners):
            object.__setattr__(self, "listener_count", len(self.listeners))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "version": self.version,
                "rank": self.rank, "state": self.state,
                "predecessor": self.predecessor, "generation": self.generation,
                "listeners": [info.to_json() for info in self.listeners],
                "num_fds": self.num_fds, "rss": self.rss,
                "listener_count": self.listener_count}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Status:
        count = _check(data, "listener_count", (int,)) if "listener_count" in data else -1
        return cls(name=_check(data, "name", (str,)), pid=_check(data, "pid", (int,)),
                   version=_check(data, "version", (str,)),
                   rank=_check(data, "rank", (int, type(None))),
                   state=_check(data, "state", (str,)),
                   predecessor=_check(data, "predecessor", (str,)),
                   generation=_check(data, "generation", (int,)),
                   listeners=tuple(SocketInfo.from_json(item)
                                   for item in _check(data, "listeners", (list,))),
                   num_fds=_check(data, "num_fds", (int,)),
                   rss=_check(data, "rss", (int,)), listener_count=count)


@dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    """The server agrees and announces how many sockets follow.

    ``capabilities`` are what the server supports of the hello's (absent on
    the wire from older versions: none), e.g. ``"connections-ack"``.
    """

    TYPE: ClassVar[str] = "welcome"
    protocol: int = PROTOCOL_VERSION
    pid: int
    version: str
    count: int
    generation: int = 0
    capabilities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.count < 1:
            raise LocalProtocolError("a handover carries at least one socket")

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "pid": self.pid, "version": self.version,
                "count": self.count, "generation": self.generation,
                "capabilities": list(self.capabilities)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Welcome:
        return cls(protocol=_check(data, "protocol", (int,)),
                   pid=_check(data, "pid", (int,)),
                   version=_check(data, "version", (str,)),
                   count=_check(data, "count", (int,)),
                   generation=_check(data, "generation", (int,)),
                   capabilities=(_str_tuple(data, "capabilities")
                                 if "capabilities" in data else ()))


@dataclass(frozen=True, kw_only=True)
class Refused(Message):
    """The server says no. ``code``: busy, older, forbidden, protocol, timeout."""

    TYPE: ClassVar[str] = "refused"
    code: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Refused:
        return cls(code=_check(data, "code", (str,)),
                   reason=_check(data, "reason", (str,)))


@dataclass(frozen=True, kw_only=True)
class ConnInfo:
    """An accepted connection handed over during the drain: which listener
    accepted it, and its peer (for logs)."""

    listener: str
    peer: str

    def to_json(self) -> dict[str, Any]:
        return {"listener": self.listener, "peer": self.peer}

    @classmethod
    def from_json(cls, data: Any) -> ConnInfo:
        if not isinstance(data, dict):
            raise RemoteProtocolError("connection entry must be an object")
        return cls(listener=_check(data, "listener", (str,)), peer=_check(data, "peer", (str,)))


_Entry = TypeVar("_Entry", SocketInfo, ConnInfo)


@dataclass(frozen=True, kw_only=True)
class _Descriptors(Message, Generic[_Entry]):
    """A chunk of named descriptors; ``fds[i]`` is ``entries[i]``.

    ``fds`` is not part of the wire JSON: it is the SCM_RIGHTS payload. On a
    received message the receiver owns the descriptors and must adopt or close
    each of them.
    """

    ENTRY: ClassVar[Any]
    entries: tuple[_Entry, ...]
    fds: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.entries) <= MAX_FDS_PER_FRAME:
            raise LocalProtocolError(
                f"a {self.TYPE} frame carries 1-{MAX_FDS_PER_FRAME} descriptors")

    @property
    def nfds(self) -> int:
        return len(self.entries)

    def to_json(self) -> dict[str, Any]:
        return {"entries": [entry.to_json() for entry in self.entries]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        entries = _check(data, "entries", (list,))
        if not 1 <= len(entries) <= MAX_FDS_PER_FRAME:
            raise RemoteProtocolError(
                f"a {cls.TYPE} frame carries 1-{MAX_FDS_PER_FRAME} descriptors")
        return cls(entries=tuple(cls.ENTRY.from_json(item) for item in entries))


@dataclass(frozen=True, kw_only=True)
class Sockets(_Descriptors[SocketInfo]):
    """Listening sockets (and the control socket) for the successor."""

    TYPE: ClassVar[str] = "sockets"
    ENTRY: ClassVar[Any] = SocketInfo


@dataclass(frozen=True, kw_only=True)
class Connections(_Descriptors[ConnInfo]):
    """Idle keep-alive connections handed to the successor while the old side
    drains (only to a successor whose hello announced ``"connections"``)."""

    TYPE: ClassVar[str] = "connections"
    ENTRY: ClassVar[Any] = ConnInfo


@dataclass(frozen=True, kw_only=True)
class Accepting(Message):
    """The successor adopted every socket and is accepting on all of them."""

    TYPE: ClassVar[str] = "accepting"

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Accepting:
        return cls()


@dataclass(frozen=True, kw_only=True)
class Abort(Message):
    """The successor gives up before confirming; the server keeps serving.
    After the release, a refusal of the last :class:`Connections` frame
    (the server keeps it), sent only when both ends offered
    ``"connections-refusal"``; the client then ends the channel."""

    TYPE: ClassVar[str] = "abort"
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Abort:
        return cls(reason=_check(data, "reason", (str,)))


@dataclass(frozen=True, kw_only=True)
class Failed(Message):
    """The server abandons the handover and keeps serving."""

    TYPE: ClassVar[str] = "failed"
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failed:
        return cls(reason=_check(data, "reason", (str,)))


@dataclass(frozen=True, kw_only=True)
class Released(Message):
    """The server has stopped accepting; it is draining."""

    TYPE: ClassVar[str] = "released"
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Released:
        return cls(pid=_check(data, "pid", (int,)))


@dataclass(frozen=True, kw_only=True)
class Drained(Message):
    """The server finished draining; ``cut`` connections were closed at the
    deadline."""

    TYPE: ClassVar[str] = "drained"
    pid: int
    cut: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "cut": self.cut}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Drained:
        return cls(pid=_check(data, "pid", (int,)), cut=_check(data, "cut", (int,)))


@dataclass(frozen=True, kw_only=True)
class Adopted(Message):
    """The client has the descriptors of the last :class:`Connections` frame
    (``count`` of them): the server may let go of its copies. Sent, after
    each such frame, only when both ends offered ``"connections-ack"``; a
    server that sees the channel end instead keeps that frame's connections
    (the successor adopts nothing it has not acknowledged)."""

    TYPE: ClassVar[str] = "adopted"
    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise LocalProtocolError("adopted count must not be negative")

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Adopted:
        return cls(count=_check(data, "count", (int,)))


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (Hello, StatusRequest, Status, Welcome, Refused, Sockets, Accepting,
                Abort, Failed, Released, Connections, Adopted, Drained)
}

_C, _S = Sender.CLIENT, Sender.SERVER
_TRANSITIONS: Final[dict[tuple[State, Sender, type[Message]], State]] = {
    (State.IDLE, _C, Hello): State.HELLO_SENT,
    (State.IDLE, _C, StatusRequest): State.STATUS_REQUESTED,
    (State.IDLE, _S, Refused): State.DONE,  # e.g. peer credentials rejected
    (State.STATUS_REQUESTED, _S, Status): State.DONE,
    (State.STATUS_REQUESTED, _S, Refused): State.DONE,
    (State.HELLO_SENT, _S, Welcome): State.TRANSFERRING,
    (State.HELLO_SENT, _S, Refused): State.DONE,
    # Sockets: TRANSFERRING -> TRANSFERRING, or ADOPTING on the last chunk.
    (State.TRANSFERRING, _S, Sockets): State.TRANSFERRING,
    (State.TRANSFERRING, _S, Failed): State.FAILED,
    (State.TRANSFERRING, _C, Abort): State.FAILED,
    (State.ADOPTING, _C, Accepting): State.CONFIRMED,
    (State.ADOPTING, _C, Abort): State.FAILED,
    (State.ADOPTING, _S, Failed): State.FAILED,
    (State.CONFIRMED, _S, Released): State.RELEASED,
    # The server's deadline may fire while Accepting is in flight: the client
    # (already CONFIRMED) then reads Failed and must step down.
    (State.CONFIRMED, _S, Failed): State.FAILED,
    (State.RELEASED, _S, Connections): State.RELEASED,
    (State.RELEASED, _C, Adopted): State.RELEASED,
    # A frame refused, saying why (both offered "connections-refusal"): the
    # client ends the channel after it.
    (State.RELEASED, _C, Abort): State.DONE,
    (State.RELEASED, _S, Drained): State.DONE,
    # Crossing messages after the server gave up are ignored.
    (State.FAILED, _C, Accepting): State.FAILED,
    (State.FAILED, _C, Abort): State.FAILED,
}


def encode(message: Message) -> bytes:
    """Serialize one message to a frame (no state checks)."""
    body = dict(message.to_json())
    body["type"] = message.TYPE
    payload = json.dumps(body, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise LocalProtocolError(f"message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> Message:
    """Parse one frame body. Raises RemoteProtocolError on anything odd."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"frame is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # [[[[... nested deeper than the parser recurses
        raise RemoteProtocolError("frame nests too deep") from None
    if not isinstance(data, dict):
        raise RemoteProtocolError("frame is not a JSON object")
    type_name = data.get("type")
    cls = MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {type_name!r}")
    try:
        return cls.from_json(data)
    except LocalProtocolError as exc:  # a field out of range
        raise RemoteProtocolError(str(exc)) from None


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by :meth:`Connection.next_event` when more bytes are needed."""


class Connection:
    """One end of a control conversation, with no I/O.

    Feed what arrives with :meth:`receive_data` (bytes and the descriptors that
    came with them), take events with :meth:`next_event`, and turn messages
    into bytes with :meth:`send`.

    Resource handling: descriptors given to :meth:`receive_data` belong to the
    connection until a :class:`Sockets` event hands them to the caller. On a
    remote error, and on :meth:`close_fds`, the connection closes every
    descriptor it still holds (with ``close_fd``, ``os.close`` by default).
    """

    def __init__(self, our_role: Sender,
                 close_fd: Callable[[int], None] = os.close) -> None:
        self.our_role = our_role
        self.their_role = _S if our_role is _C else _C
        self.state = State.IDLE
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._close_fd = close_fd
        self._expected = 0  # sockets still to come in TRANSFERRING
        self._eof = False
        # What the peer may send in one frame (see MAX_CLIENT_FRAME).
        self.max_frame = MAX_CLIENT_FRAME if our_role is _S else MAX_FRAME

    # ----------------------------------------------------------------- state

    def _next_state(self, sender: Sender, message: Message) -> State:
        new = _TRANSITIONS.get((self.state, sender, type(message)))
        if new is None:
            raise LookupError(
                f"{sender.value} may not send {message.TYPE!r} in state "
                f"{self.state.value!r}")
        if isinstance(message, Sockets) and message.nfds > self._expected:
            raise LookupError(f"{message.nfds} sockets sent, "
                              f"only {self._expected} announced")
        return new

    def _apply(self, new: State, message: Message) -> None:
        if isinstance(message, Welcome):
            self._expected = message.count
        elif isinstance(message, Sockets):
            self._expected -= message.nfds
            if self._expected == 0:
                new = State.ADOPTING
        self.state = new

    # ------------------------------------------------------------------ send

    def send(self, message: Message) -> bytes:
        """Check that we may send ``message`` now and return its frame.

        Raises LocalProtocolError (state unchanged) if not. For
        :class:`Sockets`, ``len(message.fds)`` must match the entries.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the error state")
        if isinstance(message, _Descriptors) and len(message.fds) != message.nfds:
            raise LocalProtocolError(f"{message.TYPE} message needs one fd per entry")
        try:
            new = self._next_state(self.our_role, message)
        except LookupError as exc:
            raise LocalProtocolError(str(exc)) from None
        frame = encode(message)
        self._apply(new, message)
        return frame

    # --------------------------------------------------------------- receive

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Add bytes (and the descriptors that came with them).

        ``b""`` means EOF. Descriptors are owned by the connection from here on.
        """
        self._fds.extend(fds)
        if self.state is State.ERROR:
            self.close_fds()
            return
        if not data:
            self._eof = True
        self._buffer += data
        if len(self._fds) > MAX_FDS_PER_FRAME:
            self._fail("more descriptors pending than one frame may carry")

    def next_event(self) -> Message | _NeedData:
        """Return the next complete message, or :data:`NEED_DATA`.

        Raises RemoteProtocolError (and enters ERROR, closing every held
        descriptor) on a malformed frame, a message not allowed now, missing or
        unexpected descriptors, or EOF in the middle of a frame.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection is in the error state")
        if len(self._buffer) < _HEADER.size:
            return self._need_data()
        (length,) = _HEADER.unpack_from(self._buffer)
        if not 1 <= length <= self.max_frame:
            self._fail(f"frame length {length} outside 1..{self.max_frame}")
        if len(self._buffer) < _HEADER.size + length:
            return self._need_data()
        payload = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
        del self._buffer[:_HEADER.size + length]
        try:
            message = decode(payload)
            new = self._next_state(self.their_role, message)
        except RemoteProtocolError as exc:
            self._fail(str(exc))
        except LookupError as exc:
            self._fail(str(exc))
        if message.nfds > len(self._fds):
            self._fail(f"{message.TYPE!r} frame needs {message.nfds} descriptors, "
                       f"{len(self._fds)} arrived")
        fds = tuple(self._fds.popleft() for _ in range(message.nfds))
        if not self._buffer and self._fds:
            # Descriptors travel with the first byte of their frame: with no
            # bytes left, what remains belongs to no frame.
            for fd in fds:
                self._close_fd(fd)
            self._fail(f"{len(self._fds)} unexpected descriptor(s) "
                       f"with {message.TYPE!r}")
        self._apply(new, message)
        if isinstance(message, _Descriptors):
            return replace(message, fds=fds)
        return message

    def _need_data(self) -> _NeedData:
        if self._eof:
            if self._buffer:
                self._fail(f"EOF in the middle of a frame ({len(self._buffer)} bytes)")
            if self._fds:
                self._fail("EOF with unclaimed descriptors")
        return NEED_DATA

    @property
    def at_eof(self) -> bool:
        """True once EOF was received and every complete frame consumed."""
        return self._eof and not self._buffer

    @property
    def pending_fds(self) -> int:
        """Descriptors received but not yet handed out."""
        return len(self._fds)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (0 between frames)."""
        return len(self._buffer)

    @property
    def bytes_needed(self) -> int:
        """Bytes still missing from the frame being received: the rest of the
        4-byte length header while it is incomplete (4 between frames), then
        the rest of the body; 0 once a whole frame is buffered. Giving no
        more than this to :meth:`receive_data` never passes a frame's end."""
        have = len(self._buffer)
        if have < _HEADER.size:
            return _HEADER.size - have
        length: int = _HEADER.unpack_from(self._buffer)[0]
        return max(0, _HEADER.size + length - have)

    def _fail(self, reason: str) -> NoReturn:
        self.state = State.ERROR
        self.close_fds()
        self._buffer.clear()
        raise RemoteProtocolError(reason)

    def close_fds(self) -> None:
        """Close every descriptor the connection still holds."""
        while self._fds:
            fd = self._fds.popleft()
            with contextlib.suppress(OSError):
                self._close_fd(fd)


def split_sockets(entries: Sequence[SocketInfo], fds: Sequence[int]) -> list[Sockets]:
    """Chunk named descriptors into frames of at most MAX_FDS_PER_FRAME."""
    if len(entries) != len(fds):
        raise LocalProtocolError("one descriptor per entry")
    return [Sockets(entries=tuple(entries[i:i + MAX_FDS_PER_FRAME]),
                    fds=tuple(fds[i:i + MAX_FDS_PER_FRAME]))
            for i in range(0, len(entries), MAX_FDS_PER_FRAME)]
