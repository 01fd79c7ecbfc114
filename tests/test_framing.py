"""The request framer (hotswap._framing) on its own, no sockets: whether all
bytes a connection received are whole requests, counted exactly (a header
block, then a body of exactly its Content-Length bytes), and what it gives
up on for good. Every stream must give the same answer fed in one read,
byte by byte, or cut anywhere."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap._framing import MAX_HEAD, RequestFramer

GET = b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n"
# A body that holds a header block's end, and what reads as a whole request.
TRICKY = b"{\r\n\r\nGET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n}"
PARTIAL = b"GET /next HTTP/1.1\r\nHost: x\r\n"  # its header block not ended

WHOLE, LOST = "whole", "lost"


def request(*headers: bytes, body: bytes = b"", line: bytes = b"POST /up HTTP/1.1") -> bytes:
    return b"\r\n".join((line, b"Host: x", *headers)) + b"\r\n\r\n" + body


def length(body: bytes) -> bytes:
    return b"Content-Length: " + str(len(body)).encode()


def state(framer: RequestFramer) -> object:
    """WHOLE, LOST, or what is still open: ("body", bytes still to come),
    ("head", the header block begun)."""
    if framer.lost:
        assert not framer.head, "a lost framer keeps no buffer"
        return LOST
    if framer.boundary:
        return WHOLE
    return ("body", framer.need) if framer.need else ("head", bytes(framer.head))


def framed(stream: bytes, cuts: list[int]) -> object:
    framer = RequestFramer()
    last = 0
    for cut in [*cuts, len(stream)]:
        if cut > last:
            framer.feed(stream[last:cut])
            last = cut
    return state(framer)


HUGE_HEAD = request(b"X-Big: " + b"a" * (MAX_HEAD - 40), line=b"GET / HTTP/1.1")
HUGE_HEAD = HUGE_HEAD[:-4] + b"b" * (MAX_HEAD - len(HUGE_HEAD)) + b"\r\n\r\n"
assert len(HUGE_HEAD) == MAX_HEAD

STREAMS: dict[str, tuple[bytes, object]] = {
    # Framed: whole requests, or what is still to come of one.
    "nothing": (b"", WHOLE),
    "a GET": (GET, WHOLE),
    "pipelined GETs": (GET * 3, WHOLE),
    "a GET begun": (PARTIAL, ("head", PARTIAL)),
    "a body": (request(length(b"hello"), body=b"hello"), WHOLE),
    "a body begun": (request(b"Content-Length: 5", body=b"hel"), ("body", 2)),
    "headers, no body yet": (request(b"Content-Length: 5"), ("body", 5)),
    "a body with CRLFCRLF and a request in it": (request(length(TRICKY), body=TRICKY), WHOLE),
    "that body, then a request begun": (
        request(length(TRICKY), body=TRICKY) + PARTIAL, ("head", PARTIAL)),
    "that body, then whole requests": (request(length(TRICKY), body=TRICKY) + GET * 2, WHOLE),
    "that body cut short": (request(length(TRICKY), body=TRICKY[:9]), ("body", len(TRICKY) - 9)),
    "bodies back to back": (
        request(length(b"ab"), body=b"ab") + request(length(TRICKY), body=TRICKY) + GET, WHOLE),
    "a GET with a body": (request(b"Content-Length: 3", body=b"abc",
                                  line=b"GET / HTTP/1.1"), WHOLE),
    "content-length in lower case, blanks around its value": (
        request(b"content-length: \t5 \t", body=b"hello"), WHOLE),
    "Content-Length: 0": (request(b"Content-Length: 0") + GET, WHOLE),
    "leading zeros": (request(b"Content-Length: 0005", body=b"hello"), WHOLE),
    "the names elsewhere": (request(b"Access-Control-Request-Headers: content-length",
                                    b"X-Note: transfer-encoding, upgrade: no",
                                    b"Upgrade-Insecure-Requests: 1",
                                    line=b"GET /content-length/upgrade: HTTP/1.1"), WHOLE),
    # Given up on for good.
    "chunked": (request(b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"), LOST),
    "chunked, then a GET": (
        request(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n") + GET, LOST),
    "another transfer coding": (request(b"Transfer-Encoding: gzip", b"Content-Length: 3"), LOST),
    "Content-Length and Transfer-Encoding": (
        request(b"Content-Length: 3", b"transfer-encoding: chunked", body=b"abc"), LOST),
    "two Content-Lengths, the same": (
        request(b"Content-Length: 3", b"Content-Length: 3", body=b"abc"), LOST),
    "two Content-Lengths, different": (
        request(b"Content-Length: 3", b"content-length: 5", body=b"abc"), LOST),
    "a signed Content-Length": (request(b"Content-Length: +3", body=b"abc"), LOST),
    "a negative Content-Length": (request(b"Content-Length: -1"), LOST),
    "a list for Content-Length": (request(b"Content-Length: 3, 3", body=b"abc"), LOST),
    "hex for Content-Length": (request(b"Content-Length: 0x3", body=b"abc"), LOST),
    "an empty Content-Length": (request(b"Content-Length:"), LOST),
    "19 digits of Content-Length": (request(b"Content-Length: " + b"1" * 19), LOST),
    "a blank before the colon": (request(b"Content-Length : 3", body=b"abc"), LOST),
    "a Content-Length line folded on": (request(b"X: a", b" Content-Length: 3", body=b"abc"), LOST),
    "a Content-Length value folded": (request(b"Content-Length: 3", b" 4", body=b"abc"), LOST),
    "a Content-Length after a bare LF": (request(b"X: a\nContent-Length: 3", body=b"abc"), LOST),
    "an Upgrade": (request(b"Connection: Upgrade", b"Upgrade: websocket",
                           line=b"GET /ws HTTP/1.1"), LOST),
    "a CONNECT": (request(line=b"CONNECT example.com:443 HTTP/1.1"), LOST),
    "HTTP/1.0": (request(line=b"GET / HTTP/1.0"), LOST),
    "HTTP/1.0 after HTTP/1.1": (GET + request(line=b"GET / HTTP/1.0"), LOST),
    "a blank line first": (b"\r\n" + GET, LOST),
    "HTTP/2's preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", LOST),
    "a header block of MAX_HEAD bytes": (HUGE_HEAD, WHOLE),
    "one of MAX_HEAD + 1 bytes": (HUGE_HEAD[:-4] + b"c\r\n\r\n", LOST),
    "one begun, over MAX_HEAD already": (HUGE_HEAD[:-4] + b"c" * 5, LOST),
    "lost, then whole requests": (b"GET / HTTP/1.0\r\n\r\n" + GET * 2, LOST),
}


@pytest.mark.parametrize(("stream", "expected"), list(STREAMS.values()), ids=list(STREAMS))
def test_one_read_byte_by_byte_or_cut_anywhere(stream: bytes, expected: object) -> None:
    """The answer for each stream, and the same for every way to read it:
    one read, byte by byte, and every cut in two (three for short ones)."""
    assert framed(stream, []) == expected
    assert framed(stream, list(range(1, len(stream)))) == expected
    step = 1 if len(stream) < 2000 else 997  # the 64 KiB ones: a sample of cuts
    for cut in range(1, len(stream), step):
        assert framed(stream, [cut]) == expected, cut
        if len(stream) < 200:
            for second in range(cut + 1, len(stream)):
                assert framed(stream, [cut, second]) == expected, (cut, second)


def test_a_header_block_trickling_in_is_not_copied_read_after_read() -> None:
    """A header block byte by byte up to MAX_HEAD: each read appends to
    the block begun (one copy per read of all of it was ~2 GB of copying
    for 64 KiB)."""
    framer = RequestFramer()
    for i in range(len(HUGE_HEAD) - 1):
        framer.feed(HUGE_HEAD[i:i + 1])
    begun = framer.head
    framer.feed(b"")
    assert framer.head is begun and len(begun) == len(HUGE_HEAD) - 1
    framer.feed(HUGE_HEAD[-1:])
    assert state(framer) == WHOLE


def test_the_parsers_word_counts_for_one_whole_header_block_at_a_boundary() -> None:
    """feed(parsed=True): the caller's parser took the read for one request
    without a body. The framer takes that word for a read that is one
    whole header block at a boundary, up to MAX_HEAD (without it, it reads
    the headers itself: here it would give up on the Upgrade), and for no
    other read: body bytes that look like a request, a block and the start
    of the next, the end of a block begun before, or a framer that gave
    up."""
    framer = RequestFramer()
    framer.feed(request(b"Upgrade: h2c", line=b"GET / HTTP/1.1"), parsed=True)
    assert state(framer) == WHOLE
    framer.feed(request(b"Upgrade: h2c", line=b"GET / HTTP/1.1"))
    assert state(framer) == LOST
    framer.feed(GET, parsed=True)
    assert state(framer) == LOST
    framer = RequestFramer()  # over MAX_HEAD: given up on, whatever the parser says
    framer.feed(HUGE_HEAD[:-4] + b"c\r\n\r\n", parsed=True)
    assert state(framer) == LOST
    headers = request(length(TRICKY))  # the one read the parser's word is not given for
    for reads, expected in (
            ([headers, TRICKY[:-1], TRICKY[-1:] + GET], WHOLE),
            ([headers, GET], ("body", len(TRICKY) - len(GET))),
            ([GET + PARTIAL], ("head", PARTIAL)),
            ([PARTIAL, b"\r\n"], WHOLE),
            ([GET[:-1], request(b"Upgrade: h2c")[1:]], LOST)):
        framer = RequestFramer()
        for read in reads:
            framer.feed(read, parsed=read is not headers)
        assert state(framer) == expected, reads


PIECES = [GET, PARTIAL, b"\r\n", TRICKY, b"0\r\n\r\n", b"Content-Length: 7\r\n",
          request(length(TRICKY), body=TRICKY), request(b"Content-Length: 7"),
          request(b"Transfer-Encoding: chunked"), request(line=b"GET / HTTP/1.0"),
          request(b"content-length: 2", b"content-length: 2")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=6), st.data())
def test_any_stream_frames_the_same_however_it_is_cut(pieces: list[bytes],
                                                      data: st.DataObject) -> None:
    """Streams made of whole, partial and unframable requests and stray
    bytes, cut at random places: always the answer of one read."""
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=8)))
    assert framed(stream, cuts) == framed(stream, [])
