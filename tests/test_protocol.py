"""The sans-IO protocol core, with no sockets at all.

Descriptors here are plain integers from a fake allocator: the core never
touches them except to close them, and ``close_fd`` records those calls.
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap.errors import LocalProtocolError, RemoteProtocolError
from hotswap.protocol import (
    MAX_FDS_PER_FRAME,
    MAX_FRAME,
    NEED_DATA,
    Abort,
    Accepting,
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
    assert p.client.state is State.ADOPTING
    p.send(p.client, Accepting())
    p.send(p.server, Released(pid=1))
    conns = tuple(ConnInfo(listener="http", peer=f"127.0.0.1:{i}") for i in range(2))
    event = p.send(p.server, Connections(entries=conns, fds=(50, 51)))
    assert isinstance(event, Connections) and event.fds == (50, 51)
    p.send(p.server, Drained(pid=1, cut=0))
    assert p.client.state is State.DONE
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
