"""The sans-IO protocol core, with no sockets at all.

Descriptors here are plain integers from a fake allocator: the core never
touches them except to close them, and ``close_fd`` records those calls.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from dataclasses import dataclass, replace
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap.errors import LocalProtocolError, RemoteProtocolError
from hotswap.protocol import (
    _TRANSITIONS,
    MAX_FDS_PER_FRAME,
    MAX_FRAME,
    MESSAGE_TYPES,
    NEED_DATA,
    STATUS_MAX_LISTENERS,
    Abort,
    Accepting,
    Adopted,
    Connection,
    Connections,
    ConnInfo,
    Drained,
    Failed,
    Hello,
    Message,
    Refused,
    Released,
    Sender,
    SocketInfo,
    Sockets,
    State,
    Status,
    StatusRequest,
    Welcome,
    decode,
    encode,
    split_sockets,
)


class Pair:
    """Two in-memory ends joined by hand (h11's ConnectionPair)."""

    def __init__(self) -> None:
        self.closed: list[int] = []
        self.client = Connection(Sender.CLIENT, close_fd=self.closed.append)
        self.server = Connection(Sender.SERVER, close_fd=self.closed.append)

    def send(self, sender: Connection, message: Message) -> Message:
        receiver = self.server if sender is self.client else self.client
        data = sender.send(message)
        receiver.receive_data(data, getattr(message, "fds", ()))
        event = receiver.next_event()
        assert event == message
        assert receiver.next_event() is NEED_DATA
        assert sender.state is receiver.state
        assert isinstance(event, Message)
        return event


def state_now(conn: Connection) -> State:
    """``conn.state`` as it is now: mypy keeps what an earlier ``assert
    conn.state is ...`` narrowed it to across the sends that change it."""
    return conn.state


def info(i: int) -> SocketInfo:
    return SocketInfo(name=f"l{i}", family="inet", kind="stream", address=f"127.0.0.1:{i}")


def frame(obj: object) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack("!I", len(payload)) + payload


def test_full_handover_sequence() -> None:
    p = Pair()
    p.send(p.client, Hello(pid=2, version="v2", rank=2))
    assert p.client.state is State.HELLO_SENT
    p.send(p.server, Welcome(pid=1, version="v1", count=300, generation=4))
    entries = [info(i) for i in range(300)]
    chunks = split_sockets(entries, list(range(1000, 1300)))
    assert [c.nfds for c in chunks] == [253, 47]
    got: list[int] = []
    for chunk in chunks:
        event = p.send(p.server, chunk)
        assert isinstance(event, Sockets)
        got.extend(event.fds)
    assert got == list(range(1000, 1300))
    assert state_now(p.client) is State.ADOPTING
    p.send(p.client, Accepting())
    p.send(p.server, Released(pid=1))
    conns = tuple(ConnInfo(listener="http", peer=f"127.0.0.1:{i}") for i in range(2))
    event = p.send(p.server, Connections(entries=conns, fds=(50, 51)))
    assert isinstance(event, Connections) and event.fds == (50, 51)
    p.send(p.server, Drained(pid=1, cut=0))
    assert state_now(p.client) is State.DONE
    assert p.closed == []


def test_connections_only_while_the_old_side_drains() -> None:
    p = Pair()
    frame_ = Connections(entries=(ConnInfo(listener="http", peer="x"),), fds=(7,))
    with pytest.raises(LocalProtocolError):
        p.server.send(frame_)
    p.send(p.client, Hello(pid=2, version="v2"))
    p.send(p.server, Welcome(pid=1, version="v1", count=1))
    p.send(p.server, Sockets(entries=(info(1),), fds=(3,)))
    with pytest.raises(LocalProtocolError):  # not before the release
        p.server.send(frame_)
    assert p.server.state is State.ADOPTING


def test_status_conversation() -> None:
    p = Pair()
    p.send(p.client, StatusRequest())
    st = Status(name="s", pid=1, version="v1", rank=None, state="serving",
                predecessor="none", generation=0, listeners=(info(1),), num_fds=9, rss=1)
    assert p.send(p.server, st) == st
    assert p.server.state is State.DONE


@pytest.mark.parametrize("answer", [Refused(code="busy", reason="draining")])
def test_refusal_ends_the_conversation(answer: Message) -> None:
    p = Pair()
    p.send(p.client, Hello(pid=2, version="v2"))
    p.send(p.server, answer)
    assert p.client.state is State.DONE
    with pytest.raises(LocalProtocolError):
        p.client.send(Accepting())


def test_abort_and_crossing_messages() -> None:
    p = Pair()
    p.send(p.client, Hello(pid=2, version="v2"))
    p.send(p.server, Welcome(pid=1, version="v1", count=1))
    p.send(p.server, Sockets(entries=(info(1),), fds=(7,)))
    # The server gives up (deadline) while the client's confirmation is in flight.
    failed = p.server.send(Failed(reason="timeout"))
    accepting = p.client.send(Accepting())
    p.server.receive_data(accepting)
    assert p.server.next_event() == Accepting()  # ignored: stays FAILED
    assert p.server.state is State.FAILED
    p.client.receive_data(failed)
    assert p.client.next_event() == Failed(reason="timeout")
    assert p.client.state is State.FAILED


def test_illegal_send_raises_and_changes_nothing() -> None:
    p = Pair()
    for message in (Accepting(), Released(pid=1), Welcome(pid=1, version="", count=1),
                    Sockets(entries=(info(1),), fds=(3,))):
        with pytest.raises(LocalProtocolError):
            p.client.send(message)
        assert p.client.state is State.IDLE
    p.send(p.client, Hello(pid=2, version="v2"))
    p.send(p.server, Welcome(pid=1, version="v1", count=1))
    too_many = Sockets(entries=(info(1), info(2)), fds=(3, 4))
    with pytest.raises(LocalProtocolError):
        p.server.send(too_many)
    assert p.server.state is State.TRANSFERRING
    with pytest.raises(LocalProtocolError):
        p.server.send(Sockets(entries=(info(1),), fds=()))  # fd count mismatch
    assert p.server.state is State.TRANSFERRING


def test_message_validation() -> None:
    with pytest.raises(LocalProtocolError):
        Sockets(entries=tuple(info(i) for i in range(MAX_FDS_PER_FRAME + 1)))
    with pytest.raises(LocalProtocolError):
        Welcome(pid=1, version="", count=0)
    with pytest.raises(LocalProtocolError):
        SocketInfo(name="x", family="bluetooth", kind="stream", address="")


def remote_error(server: Connection, data: bytes, fds: tuple[int, ...] = ()) -> str:
    server.receive_data(data, fds)
    with pytest.raises(RemoteProtocolError) as caught:
        while server.next_event() is not NEED_DATA:
            pass
    assert server.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        server.next_event()  # sticky
    return str(caught.value)


@pytest.mark.parametrize(("data", "expect"), [
    (struct.pack("!I", MAX_FRAME + 1), "outside"),
    (struct.pack("!I", 0), "outside"),
    (struct.pack("!I", 3) + b"\xff\xfe\xfd", "not UTF-8 JSON"),
    (frame([1, 2]), "not a JSON object"),
    (frame({"type": "launch-missiles"}), "unknown message type"),
    (frame({"type": "hello", "pid": "1"}), "missing field"),
    (frame({"type": "hello", "protocol": 1, "pid": True, "version": "", "rank": None,
            "token": "", "capabilities": []}), "wrong type"),
    (frame({"type": "accepting"}), "may not send 'accepting' in state 'idle'"),
    (frame({"type": "welcome", "protocol": 1, "pid": 1, "version": "v", "count": 1,
            "generation": 0}), "client may not send 'welcome'"),
])
def test_garbage_is_a_remote_error(data: bytes, expect: str) -> None:
    closed: list[int] = []
    server = Connection(Sender.SERVER, close_fd=closed.append)
    assert expect in remote_error(server, data)


def test_unexpected_descriptors_are_closed() -> None:
    closed: list[int] = []
    server = Connection(Sender.SERVER, close_fd=closed.append)
    message = remote_error(server, encode(StatusRequest()), fds=(11, 12))
    assert "unexpected descriptor" in message
    assert sorted(closed) == [11, 12]


def test_a_descriptor_more_than_a_sockets_frame_carries_closes_them_all() -> None:
    """One descriptor too many with a frame that carries some: the frame's
    own are closed with the extra one (the caller never gets them), and a
    descriptor that arrives once the connection is in ERROR is closed too."""
    p = Pair()
    p.send(p.client, Hello(pid=2, version="v2"))
    p.send(p.server, Welcome(pid=1, version="v1", count=2))
    data = p.server.send(Sockets(entries=(info(1), info(2)), fds=(5, 6)))
    p.client.receive_data(data, (5, 6, 7))
    with pytest.raises(RemoteProtocolError, match="1 unexpected descriptor"):
        p.client.next_event()
    assert sorted(p.closed) == [5, 6, 7]
    p.client.receive_data(b"more", (8,))
    assert sorted(p.closed) == [5, 6, 7, 8]
    assert p.client.pending_fds == 0


def test_missing_descriptors_close_what_arrived() -> None:
    p = Pair()
    p.send(p.client, Hello(pid=2, version="v2"))
    p.send(p.server, Welcome(pid=1, version="v1", count=3))
    data = p.server.send(Sockets(entries=(info(1), info(2), info(3)), fds=(5, 6, 7)))
    p.client.receive_data(data, (5, 6))  # one short
    with pytest.raises(RemoteProtocolError, match="needs 3 descriptors, 2 arrived"):
        p.client.next_event()
    assert sorted(p.closed) == [5, 6]


def test_eof_mid_frame_and_eof_with_descriptors() -> None:
    closed: list[int] = []
    server = Connection(Sender.SERVER, close_fd=closed.append)
    server.receive_data(encode(StatusRequest())[:5], (9,))
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="EOF in the middle of a frame"):
        server.next_event()
    assert closed == [9]


def test_clean_eof() -> None:
    server = Connection(Sender.SERVER)
    server.receive_data(b"")
    assert server.next_event() is NEED_DATA
    assert server.at_eof


def test_byte_at_a_time_with_fds_on_the_first_byte() -> None:
    p = Pair()
    p.send(p.client, Hello(pid=2, version="v2"))
    p.send(p.server, Welcome(pid=1, version="v1", count=2))
    data = p.server.send(Sockets(entries=(info(1), info(2)), fds=(40, 41)))
    events = []
    for i in range(len(data)):
        p.client.receive_data(data[i:i + 1], (40, 41) if i == 0 else ())
        event = p.client.next_event()
        if event is not NEED_DATA:
            events.append(event)
    assert len(events) == 1
    assert isinstance(events[0], Sockets) and events[0].fds == (40, 41)
    assert p.closed == []


def test_too_many_pending_descriptors() -> None:
    closed: list[int] = []
    server = Connection(Sender.SERVER, close_fd=closed.append)
    with pytest.raises(RemoteProtocolError, match="more descriptors pending"):
        server.receive_data(b"\x00", range(MAX_FDS_PER_FRAME + 1))
    assert len(closed) == MAX_FDS_PER_FRAME + 1


def test_oversized_message_cannot_be_sent() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode(Abort(reason="x" * MAX_FRAME))


def test_roundtrip_every_message_type() -> None:
    samples: list[Message] = [
        Hello(pid=1, version="v", rank=3, token="t", capabilities=("a",)),
        StatusRequest(), Welcome(pid=1, version="v", count=2, generation=1),
        Refused(code="busy", reason="r"), Sockets(entries=(info(1),)), Accepting(),
        Abort(reason="r"), Failed(reason="r"), Released(pid=1), Drained(pid=1, cut=2),
        Connections(entries=(ConnInfo(listener="http", peer="127.0.0.1:5"),)),
        Status(name="n", pid=1, version="v", rank=None, state="serving",
               predecessor="none", generation=0, listeners=(info(2),)),
    ]
    for message in samples:
        assert decode(encode(message)[4:]) == message


# ---------------------------------------------------------------- property tests

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(100, 200), max_size=4))
def test_arbitrary_bytes_never_crash_or_leak(data: bytes, fds: list[int]) -> None:
    """Whatever arrives, the parser either yields messages or raises
    RemoteProtocolError; any descriptor not handed out is closed."""
    closed: list[int] = []
    handed: list[int] = []
    server = Connection(Sender.SERVER, close_fd=closed.append)
    try:
        server.receive_data(data, fds)
        server.receive_data(b"")
        while (event := server.next_event()) is not NEED_DATA:
            handed.extend(getattr(event, "fds", ()))
    except RemoteProtocolError:
        assert server.state is State.ERROR
    else:
        assert server.pending_fds == 0
    assert sorted(closed + handed) == sorted(fds)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["hello", "status-request", "welcome", "sockets",
                                 "accepting", "abort", "failed", "released",
                                 "connections", "drained", "refused"]), max_size=8))
def test_random_message_orders_from_a_client(order: list[str]) -> None:
    """The server side accepts only what the table allows; an illegal order is
    a RemoteProtocolError and leaves the state ERROR."""
    bodies = {
        "hello": encode(Hello(pid=1, version="v")),
        "status-request": encode(StatusRequest()),
        "welcome": encode(Welcome(pid=1, version="v", count=1)),
        "sockets": encode(Sockets(entries=(info(1),))),
        "accepting": encode(Accepting()), "abort": encode(Abort(reason="x")),
        "failed": encode(Failed(reason="x")), "released": encode(Released(pid=1)),
        "drained": encode(Drained(pid=1)),
        "connections": encode(Connections(entries=(ConnInfo(listener="h", peer="p"),))),
        "refused": encode(Refused(code="x", reason="y")),
    }
    server = Connection(Sender.SERVER, close_fd=lambda fd: None)
    allowed_first = {"hello", "status-request"}
    for i, name in enumerate(order):
        server.receive_data(bodies[name])
        if i == 0 and name in allowed_first:
            assert server.next_event() is not NEED_DATA
            continue
        # Anything else from a client before the server answered is illegal.
        with pytest.raises(RemoteProtocolError):
            server.next_event()
        assert server.state is State.ERROR
        return


# ------------------------------------------------- the conversation, specified
#
# An independent statement of the conversation -- the module docstring's "A
# handover, as a sequence" and the README's "How it works" -- written in terms
# of what has been said so far, not of the table's states. The transition table
# and both Connection ends are checked against it, in every state.

# Every message type, the handover's own order first (the random walk below
# favours the first legal one, so that it often gets to the late states).
HANDOVER_ORDER: tuple[type[Message], ...] = (
    Hello, Welcome, Sockets, Accepting, Released, Connections, Adopted, Drained,
    StatusRequest, Status, Refused, Abort, Failed,
)

_SAMPLES: dict[type[Message], Callable[[int, tuple[int, ...]], Message]] = {
    Hello: lambda n, fds: Hello(pid=2, version="v2", capabilities=("connections",)),
    StatusRequest: lambda n, fds: StatusRequest(),
    Status: lambda n, fds: Status(name="s", pid=1, version="v1", rank=None, state="serving",
                                  predecessor="none", generation=0),
    Welcome: lambda n, fds: Welcome(pid=1, version="v1", count=n),
    Refused: lambda n, fds: Refused(code="busy", reason="r"),
    Sockets: lambda n, fds: Sockets(entries=tuple(info(i) for i in range(n)), fds=fds),
    Accepting: lambda n, fds: Accepting(),
    Abort: lambda n, fds: Abort(reason="r"),
    Failed: lambda n, fds: Failed(reason="r"),
    Released: lambda n, fds: Released(pid=1),
    Adopted: lambda n, fds: Adopted(count=n),
    Connections: lambda n, fds: Connections(
        entries=tuple(ConnInfo(listener="http", peer=f"127.0.0.1:{i}") for i in range(n)),
        fds=fds),
    Drained: lambda n, fds: Drained(pid=1, cut=0),
}


_sampled: dict[tuple[str, int, int], Message] = {}


def sample(kind: type[Message], n: int = 1, first_fd: int = 500) -> Message:
    """A message of type ``kind``: ``n`` is a Welcome's count, or how many
    descriptors a Sockets/Connections frame carries (``first_fd`` onwards).
    Messages are frozen, so one of each is made and shared."""
    key = (kind.TYPE, n, first_fd)
    if key not in _sampled:
        _sampled[key] = _SAMPLES[kind](n, tuple(range(first_fd, first_fd + n)))
    return _sampled[key]


encoded = cache(encode)


@dataclass(frozen=True)
class Said:
    """What has been said so far in one conversation: a point of the spec."""

    opening: type[Message] | None = None  # the client's Hello or StatusRequest
    answer: type[Message] | None = None  # the server's Welcome, Refused or Status
    announced: int = 0  # Welcome.count
    delivered: int = 0  # sockets sent so far
    confirmed: bool = False  # the client sent Accepting
    given_up: bool = False  # Failed or Abort
    released: bool = False
    drained: bool = False
    refused: bool = False  # the client refused a frame of connections (Abort)

    def allows(self, sender: Sender, kind: type[Message], nfds: int = 1) -> bool:
        handover = self.answer is Welcome and not self.given_up
        draining = self.released and not self.drained and not self.refused
        if sender is Sender.CLIENT:
            if kind in (Hello, StatusRequest):  # the client opens, once
                return self.opening is None and self.answer is None
            if kind is Accepting:
                # Once, and only when every announced socket has arrived (the old
                # side accepts until the successor has them all). After Failed or
                # Abort, a late Accepting (or Abort) crosses and is ignored.
                return self.given_up or (handover and not self.confirmed
                                         and self.delivered == self.announced)
            if kind is Abort:  # the client may abort before it confirms, and
                # refuse a frame of connections (then the conversation ends)
                return self.given_up or (handover and not self.confirmed) or draining
            if kind is Adopted:  # acknowledging connections, while they come
                return draining
            return False
        if kind is Refused:  # instead of an answer, or before the opening
            return self.answer is None
        if kind is Status:
            return self.opening is StatusRequest and self.answer is None
        if kind is Welcome:
            return self.opening is Hello and self.answer is None
        if kind is Sockets:  # never more than announced
            return handover and self.delivered + nfds <= self.announced
        if kind is Failed:
            # Any time before Accepting; also just after, as the two may cross.
            return handover and not self.released
        if kind is Released:
            return handover and self.confirmed and not self.released
        if kind in (Connections, Drained):
            return draining
        return False

    def after(self, sender: Sender, message: Message) -> Said:
        assert self.allows(sender, type(message), message.nfds)
        if self.given_up:  # a crossing Accepting or Abort: ignored
            return self
        if isinstance(message, Hello | StatusRequest):
            return replace(self, opening=type(message))
        if isinstance(message, Welcome):
            return replace(self, answer=Welcome, announced=message.count)
        if isinstance(message, Refused | Status):
            return replace(self, answer=type(message))
        if isinstance(message, Sockets):
            return replace(self, delivered=self.delivered + message.nfds)
        if isinstance(message, Accepting):
            return replace(self, confirmed=True)
        if isinstance(message, Abort) and self.released:
            return replace(self, refused=True)
        if isinstance(message, Abort | Failed):
            return replace(self, given_up=True)
        if isinstance(message, Released):
            return replace(self, released=True)
        if isinstance(message, Drained):
            return replace(self, drained=True)
        return self  # Connections, Adopted: still draining

    @property
    def state(self) -> State:
        """The name the protocol gives this point of the conversation."""
        if self.given_up:
            return State.FAILED
        if self.drained or self.refused or self.answer in (Refused, Status):
            return State.DONE
        if self.released:
            return State.RELEASED
        if self.confirmed:
            return State.CONFIRMED
        if self.answer is Welcome:
            return State.TRANSFERRING if self.delivered < self.announced else State.ADOPTING
        if self.opening is Hello:
            return State.HELLO_SENT
        if self.opening is StatusRequest:
            return State.STATUS_REQUESTED
        return State.IDLE


def specified_moves(said: Said, sizes: Iterable[int]) -> Iterator[tuple[Sender, Message]]:
    """Every message the spec allows next, with each of ``sizes`` as count/fds."""
    for kind in HANDOVER_ORDER:
        for sender in Sender:
            for n in sizes:
                if said.allows(sender, kind, n):
                    yield sender, sample(kind, n)


def specified_conversations(
        sizes: tuple[int, ...] = (1, 2, 3)) -> Iterator[tuple[Said, list[tuple[Sender, Message]]]]:
    """Every point of the specified conversation (handovers of 1-3 sockets in
    chunks of 1-3), each once, with a shortest way to get there."""
    paths: dict[Said, list[tuple[Sender, Message]]] = {Said(): []}
    todo = deque([Said()])
    while todo:
        said = todo.popleft()
        yield said, paths[said]
        for sender, message in specified_moves(said, sizes):
            nxt = said.after(sender, message)
            if nxt not in paths:
                paths[nxt] = [*paths[said], (sender, message)]
                todo.append(nxt)


def end(p: Pair, sender: Sender) -> Connection:
    return p.client if sender is Sender.CLIENT else p.server


def check_every_message(p: Pair, said: Said) -> None:
    """In the conversation ``p`` (at ``said``), try every message type from each
    side, on the end that would send it and on the end that would receive it.

    Allowed by the spec: sent, it is framed and moves the sender to the next
    state; received, it comes out unchanged and moves the receiver there too.
    Not allowed: sent, LocalProtocolError and nothing changes (tried on the real
    end, which the conversation then goes on using); received,
    RemoteProtocolError, ERROR for good and the frame's descriptors closed.
    """
    state = said.state
    assert p.client.state is p.server.state is state
    remaining = said.announced - said.delivered
    for sender in Sender:
        sending = end(p, sender)
        receiving = end(p, Sender.SERVER if sender is Sender.CLIENT else Sender.CLIENT)
        for kind in HANDOVER_ORDER:
            sizes = {1, remaining, remaining + 1} if kind is Sockets else {1}
            for n in sorted(size for size in sizes if 1 <= size <= MAX_FDS_PER_FRAME):
                message = sample(kind, n, first_fd=900)
                what = f"{sender.value} {kind.TYPE} ({n}) in {state.value}"
                legal = said.allows(sender, kind, n)
                if legal:
                    expected = said.after(sender, message).state
                    copy_ = deepcopy(sending)
                    copy_.send(message)
                    assert copy_.state is expected, what
                else:
                    try:  # (not pytest.raises: this runs ~10^5 times)
                        sending.send(message)
                    except LocalProtocolError:
                        pass
                    else:
                        pytest.fail(f"sending {what} was allowed")
                    assert sending.state is state, what
                    assert sending.pending_fds == 0, what
                copy_ = deepcopy(receiving)
                closed = len(p.closed)
                copy_.receive_data(encoded(message), getattr(message, "fds", ()))
                if legal:
                    assert copy_.next_event() == message, what
                    assert copy_.next_event() is NEED_DATA, what
                    assert copy_.state is expected, what
                    assert len(p.closed) == closed, what
                else:
                    for _ in range(2):  # and sticky
                        try:
                            copy_.next_event()
                        except RemoteProtocolError:
                            pass
                        else:
                            pytest.fail(f"receiving {what} was allowed")
                        assert copy_.state is State.ERROR, what
                    assert sorted(p.closed[closed:]) == list(getattr(message, "fds", ())), what
                    del p.closed[closed:]
    assert p.client.state is p.server.state is state


def test_transition_table_is_the_specified_conversation() -> None:
    """The table holds exactly the transitions of the spec: an added or a
    missing one fails here, whatever state it is in."""
    assert set(HANDOVER_ORDER) == set(MESSAGE_TYPES.values())
    derived: dict[tuple[State, Sender, type[Message]], State] = {}
    points = [said for said, _ in specified_conversations()]
    for said in points:
        for sender, message in specified_moves(said, (1, 2, 3)):
            kind, target = type(message), said.after(sender, message).state
            if kind is Sockets:
                # The table keeps TRANSFERRING; Connection counts its way on to
                # ADOPTING with the last chunk.
                assert target in (State.TRANSFERRING, State.ADOPTING)
                target = State.TRANSFERRING
            key = (said.state, sender, kind)
            assert derived.setdefault(key, target) is target, f"the spec is ambiguous at {key}"
    # A table can say it: every point in one state allows the same messages.
    for said in points:
        for sender in Sender:
            for kind in HANDOVER_ORDER:
                assert said.allows(sender, kind) == ((said.state, sender, kind) in derived)
    assert {said.state for said in points} == set(State) - {State.ERROR}

    def show(keys: Iterable[tuple[State, Sender, type[Message]]]) -> list[str]:
        return sorted(f"({s.value}, {snd.value}, {k.TYPE})" for s, snd, k in keys)

    added = show(_TRANSITIONS.keys() - derived.keys())
    missing = show(derived.keys() - _TRANSITIONS.keys())
    changed = [f"{key}: {_TRANSITIONS[key]} != {derived[key]}"
               for key in derived.keys() & _TRANSITIONS.keys()
               if _TRANSITIONS[key] is not derived[key]]
    assert (added, missing, changed) == ([], [], [])


def test_every_state_of_both_ends_allows_exactly_the_specified_messages() -> None:
    """Exhaustively: every point of the spec (small handovers), reached by a
    real conversation between two ends, then every message tried there."""
    reached = set()
    for said, path in specified_conversations():
        p = Pair()
        for sender, message in path:
            p.send(end(p, sender), message)
        check_every_message(p, said)
        reached.add(said.state)
        assert p.closed == []
    assert reached == set(State) - {State.ERROR}


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.data())
def test_random_legal_conversations_between_both_ends(data: st.DataObject) -> None:
    """Random legal conversations (any order the spec allows, handovers of up to
    two frames of sockets, several chunkings), every message type tried in every
    state reached, on both ends."""
    p = Pair()
    said = Said()
    next_fd = 1000
    unchanged = 0  # steps that left the conversation where it was (ignored, draining)
    for _ in range(12):
        check_every_message(p, said)
        if unchanged == 3:
            break
        moves = [(sender, kind) for kind in HANDOVER_ORDER for sender in Sender
                 if said.allows(sender, kind)]
        if not moves:
            break
        # Half the time the handover's next step, so that its late states come up.
        sender, kind = moves[data.draw(st.just(0) | st.integers(0, len(moves) - 1))]
        n = 1
        if kind is Welcome:
            n = data.draw(st.sampled_from([1, 2, 3, MAX_FDS_PER_FRAME, MAX_FDS_PER_FRAME + 1]))
        elif kind is Sockets:
            most = min(said.announced - said.delivered, MAX_FDS_PER_FRAME)
            n = data.draw(st.just(most) | st.integers(1, most))
        elif kind is Connections:
            n = data.draw(st.integers(1, 3))
        message = sample(kind, n, first_fd=next_fd)
        next_fd += n
        p.send(end(p, sender), message)
        said, before = said.after(sender, message), said
        unchanged = unchanged + 1 if said == before else 0
    assert p.client.state is p.server.state is said.state
    assert p.closed == []


def test_status_lists_a_bounded_number_of_listeners() -> None:
    """A status says how many listeners there are; one from a version
    without the count (which lists them all) counts its list, however long."""
    info = SocketInfo(name="http", family="inet", kind="stream", address="127.0.0.1:1")
    many = Status(name="s", pid=1, version="v1", rank=None, state="serving",
                  predecessor="none", generation=0,
                  listeners=(info,) * STATUS_MAX_LISTENERS, listener_count=1000)
    assert decode(encode(many)[4:]) == many
    # An older version lists every listener and no count: taken as it is.
    older = {**many.to_json(), "type": "status",
             "listeners": [info.to_json()] * (STATUS_MAX_LISTENERS + 50)}
    del older["listener_count"]
    decoded = decode(json.dumps(older).encode())
    assert isinstance(decoded, Status)
    assert decoded.listener_count == len(decoded.listeners) == STATUS_MAX_LISTENERS + 50
