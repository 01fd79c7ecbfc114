"""The request framer (hotswap._framing) on its own, no sockets: whether all
bytes a connection received are whole requests, counted exactly (a header
block, then a body of exactly its Content-Length bytes, or chunked: size
lines, chunks, trailers), and what it gives up on for good. Every stream
must give the same answer fed in one read, byte by byte, or cut anywhere;
and the framer agrees with aiohttp's own parsers on what they take."""

from __future__ import annotations

import asyncio
import re

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


def chunked(body: bytes, *headers: bytes, line: bytes = b"POST /up HTTP/1.1") -> bytes:
    return request(b"Transfer-Encoding: chunked", *headers, body=body, line=line)


def state(framer: RequestFramer) -> object:
    """WHOLE, LOST, or what is still open: ("body", bytes still to come),
    ("head", the header block begun), in a chunked body ("chunked", bytes
    of the chunk still to come, "-" then what came after its data, or "="
then the trailer section begun)."""
    if framer.lost:
        assert not framer.head and not framer.chunked, "a lost framer keeps no buffer"
        return LOST
    if framer.boundary:
        assert not framer.chunked
        return WHOLE
    if framer.chunked:
        return ("chunked", framer.need, bytes(framer.head))
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
TRAILERS = b"X: y\r\n" * (MAX_HEAD // 6 + 1)  # over MAX_HEAD

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
    # Chunked bodies.
    "chunked": (chunked(b"5\r\nhello\r\n0\r\n\r\n"), WHOLE),
    "chunked, then a GET": (chunked(b"0\r\n\r\n") + GET, WHOLE),
    "chunked, nothing yet": (chunked(b""), ("chunked", 0, b"-\r\n")),
    "a chunk-size line begun": (chunked(b"1f"), ("chunked", 0, b"-\r\n1f")),
    "a chunk begun": (chunked(b"a\r\nhel"), ("chunked", 7, b"-")),
    "a chunk's data whole": (chunked(b"5\r\nhello"), ("chunked", 0, b"-")),
    "its CRLF begun": (chunked(b"5\r\nhello\r"), ("chunked", 0, b"-\r")),
    "the last chunk, its trailers to come": (
        chunked(b"5\r\nhello\r\n0\r\nX: y\r\n"), ("chunked", 0, b"=X: y\r\n")),
    "chunks holding CRLFCRLF and requests, pipelined requests after": (
        chunked(b"%x\r\n%s\r\n" % (len(TRICKY), TRICKY) + b"3\r\n\r\n\r\r\n0\r\n\r\n")
        + chunked(b"0\r\n\r\n") + request(length(TRICKY), body=TRICKY) + GET, WHOLE),
    "then a request begun": (chunked(b"1\r\na\r\n0\r\n\r\n") + PARTIAL, ("head", PARTIAL)),
    "extensions, trailers, upper-case hex, leading zeros": (
        chunked(b"00A;a;b=c;d=\"e f;g\";h=i\r\n0123456789\r\n000;x=y\r\n"
                b"Checksum: abc\r\nX-Other:\r\n\r\n", b"X: y") + GET, WHOLE),
    "a chunk of 15 hex digits begun": (chunked(b"f" * 15 + b"\r\nab"),
                                       ("chunked", 16 ** 15 - 3, b"-")),
    "TRANSFER-ENCODING: CHUNKED, blanks around it": (
        request(b"TRANSFER-ENCODING: \t CHUNKED  ", body=b"1\r\na\r\n0\r\n\r\n") + GET, WHOLE),
    "a GET with a chunked body": (request(b"Transfer-Encoding: chunked", line=b"GET / HTTP/1.1",
                                          body=b"0\r\n\r\n"), WHOLE),
    # Given up on for good.
    "16 hex digits of chunk size": (chunked(b"0" * 15 + b"1\r\na\r\n0\r\n\r\n"), LOST),
    "no chunk size": (chunked(b"\r\n0\r\n\r\n"), LOST),
    "a signed chunk size": (chunked(b"+1\r\na\r\n0\r\n\r\n"), LOST),
    "0x in the chunk size": (chunked(b"0x1\r\na\r\n0\r\n\r\n"), LOST),
    "a blank after the chunk size": (chunked(b"1 \r\na\r\n0\r\n\r\n"), LOST),
    "a blank before an extension": (chunked(b"1 ;a=b\r\na\r\n0\r\n\r\n"), LOST),
    "a blank in an extension": (chunked(b"1;a = b\r\na\r\n0\r\n\r\n"), LOST),
    "an empty extension": (chunked(b"1;\r\na\r\n0\r\n\r\n"), LOST),
    "an extension with no value": (chunked(b"1;a=\r\na\r\n0\r\n\r\n"), LOST),
    "an escape in a quoted extension": (chunked(b'1;a="\\""\r\na\r\n0\r\n\r\n'), LOST),
    "a bare LF after the chunk size": (chunked(b"1\na\r\n0\r\n\r\n"), LOST),
    "a bare CR in the chunk-size line": (chunked(b"1\r;a\r\na\r\n0\r\n\r\n"), LOST),
    "a bare LF in an extension": (chunked(b"1;a\nb\r\na\r\n0\r\n\r\n"), LOST),
    "a chunk longer than its size": (chunked(b"1\r\nab\r\n0\r\n\r\n"), LOST),
    "a chunk longer than its size, no line end yet": (chunked(b"1\r\nab"), LOST),
    "a bare LF after a chunk's data": (chunked(b"1\r\na\n0\r\n\r\n"), LOST),
    "a bare LF ending the trailers": (chunked(b"0\r\nX: y\r\n\n") + GET, LOST),
    "a bare LF in a trailer": (chunked(b"0\r\nX: y\nZ: w\r\n\r\n"), LOST),
    "a bare CR in a trailer": (chunked(b"0\r\nX: y\rZ: w\r\n\r\n"), LOST),
    "a folded trailer": (chunked(b"0\r\nX: y\r\n w\r\n\r\n"), LOST),
    "a trailer with no colon": (chunked(b"0\r\nX\r\n\r\n"), LOST),
    "a blank before a trailer's colon": (chunked(b"0\r\nX : y\r\n\r\n"), LOST),
    "a chunk-size line over MAX_HEAD": (
        chunked(b"1" + b";a" * (MAX_HEAD // 2) + b"\r\na\r\n0\r\n\r\n"), LOST),
    "a chunk-size line begun, over MAX_HEAD already": (
        chunked(b"1" + b";a" * (MAX_HEAD // 2)), LOST),
    "trailers over MAX_HEAD, whole": (chunked(b"0\r\n" + TRAILERS + b"\r\n"), LOST),
    "trailers over MAX_HEAD, begun": (chunked(b"0\r\n" + TRAILERS), LOST),
    "chunked twice": (chunked(b"0\r\n\r\n", b"Transfer-Encoding: chunked"), LOST),
    "chunked, then chunked": (request(b"Transfer-Encoding: chunked, chunked",
                                      body=b"0\r\n\r\n"), LOST),
    "another coding, then chunked": (request(b"Transfer-Encoding: gzip, chunked",
                                             body=b"0\r\n\r\n"), LOST),
    "chunked, then another coding": (request(b"Transfer-Encoding: chunked, gzip"), LOST),
    "a Transfer-Encoding value folded": (request(b"Transfer-Encoding: chunked", b" gzip",
                                                 body=b"0\r\n\r\n"), LOST),
    "chunked and an Upgrade": (chunked(b"0\r\n\r\n", b"Upgrade: h2c"), LOST),
    "chunked and a Content-Length": (chunked(b"0\r\n\r\n", b"Content-Length: 5"), LOST),
    "a tab after chunked (llhttp rejects it)": (
        request(b"Transfer-Encoding: chunked\t", body=b"0\r\n\r\n"), LOST),
    "a blank before Transfer-Encoding's colon": (
        request(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), LOST),
    "chunked in HTTP/1.0": (request(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.0",
                                    body=b"0\r\n\r\n"), LOST),
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


def tracked(reads: list[bytes], parser: str, monkeypatch: pytest.MonkeyPatch) -> object:
    """The framer's state after ``reads``, each handed to a connection's
    :class:`~hotswap.migrate.Tracked` handler as one read, the way its
    transport does: aiohttp's handler (its C parser or its pure-Python one)
    on a real transport over a socket pair, whose peer sends nothing."""
    import socket

    import aiohttp.http_parser
    import aiohttp.web_protocol
    from aiohttp import web

    from hotswap.migrate import Migrator, Tracked

    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser",
                        aiohttp.http_parser.HttpRequestParserC if parser == "c"
                        else aiohttp.http_parser.HttpRequestParserPy)

    async def main() -> object:
        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response(text="ok")

        server = web.Server(handler)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            connection = Tracked(server, "http", Migrator())
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, ours)
            try:
                for read in reads:
                    connection.data_received(read)
                return state(connection.framer)
            finally:
                transport.close()
                await server.shutdown(1)

    return asyncio.run(main())


UPGRADE_H2C = request(b"Upgrade: h2c", line=b"GET / HTTP/1.1")  # no "Connection: upgrade"
# One header block over MAX_HEAD that aiohttp takes (no line over its 8190).
BIG_GET = request(*(b"X-%d: %s" % (i, b"a" * 8000) for i in range(9)), line=b"GET / HTTP/1.1")
TRICKY_HEAD = request(length(TRICKY))
# Reads handed to a Tracked connection one by one; the framer's state after
# them with aiohttp's C parser, whose word Tracked takes for the common read.
ON_ITS_WORD: dict[str, tuple[list[bytes], object]] = {
    # Taken: one whole request without a body, at a boundary.
    "a GET": ([GET], WHOLE),
    "one after another": ([GET, GET, GET], WHOLE),
    "an Upgrade the parser does not act on": ([UPGRADE_H2C], WHOLE),
    "blank lines around it, which the parser skips": ([b"\r\n" + GET + b"\r\n"], WHOLE),
    "an empty Transfer-Encoding": (
        [request(b"Transfer-Encoding: ", line=b"GET / HTTP/1.1")], WHOLE),
    # Not taken: the framer reads it.
    "a request and the next one begun": ([GET + PARTIAL], ("head", PARTIAL)),
    "the end of a header block begun": ([PARTIAL, b"\r\n"], WHOLE),
    "a header block's end alone": ([PARTIAL[:-2], b"\r\n\r\n"], WHOLE),
    "no request but one still queued": ([GET, b"\r\n\r\n"], LOST),
    "a request, then one with a body": ([GET + request(b"Content-Length: 5")], ("body", 5)),
    "a chunked body to come": ([chunked(b"")], ("chunked", 0, b"-\r\n")),
    "body bytes that read as a request": ([TRICKY_HEAD, GET], ("body", len(TRICKY) - len(GET))),
    "the rest of that body, a request": ([TRICKY_HEAD, TRICKY[:-1], TRICKY[-1:] + GET], WHOLE),
    "HTTP/1.0": ([request(line=b"GET / HTTP/1.0")], LOST),
    "an upgrade the parser acts on": (
        [request(b"Connection: Upgrade", b"Upgrade: websocket", line=b"GET / HTTP/1.1")], LOST),
    "a header block over MAX_HEAD": ([BIG_GET], LOST),
    "its end, after a request begun": ([GET[:-1], UPGRADE_H2C[1:]], LOST),
}


@pytest.mark.parametrize("name", list(ON_ITS_WORD))
def test_a_connection_takes_its_parsers_word_for_one_whole_request_without_a_body(
        name: str, parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracked skips the framer for a read that aiohttp's C parser took, at a
    boundary, for exactly one whole HTTP/1.1 request without a body and no
    upgrade (the common GET: the framer would read its headers itself). It
    is less cautious than the framer only about what that parser took for
    such a request (an Upgrade it did not act on, an empty
    Transfer-Encoding, blank lines around it); any other read the framer
    reads. With the pure-Python parser it reads every read: what the
    framer answers alone."""
    reads, expected = ON_ITS_WORD[name]
    assert len(BIG_GET) > MAX_HEAD
    if parser == "py":
        framer = RequestFramer()
        for read in reads:
            framer.feed(read)
        expected = state(framer)
    assert tracked(reads, parser, monkeypatch) == expected


PIECES = [GET, PARTIAL, b"\r\n", TRICKY, b"0\r\n\r\n", b"Content-Length: 7\r\n",
          request(length(TRICKY), body=TRICKY), request(b"Content-Length: 7"),
          request(b"Transfer-Encoding: chunked"), b"5\r\n", b"hello\r\n", b"0\r\n",
          b"1;a=\"b\"\r\n", b"X: y\r\n", b"\r\n0\r\n", b"\n",
          chunked(b"3\r\nabc\r\n0\r\n\r\n"), request(line=b"GET / HTTP/1.0"),
          request(b"content-length: 2", b"content-length: 2")]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=8), st.data())
def test_any_stream_frames_the_same_however_it_is_cut(pieces: list[bytes],
                                                      data: st.DataObject) -> None:
    """Streams made of whole, partial and unframable requests and stray
    bytes, cut at random places: always the answer of one read."""
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=8)))
    assert framed(stream, cuts) == framed(stream, [])


def test_a_chunk_size_line_trickling_in_is_not_copied_read_after_read() -> None:
    """A chunk-size line (its extensions) and a trailer section byte by byte:
    each read appends to what was kept, as for a header block."""
    framer = RequestFramer()
    framer.feed(chunked(b"1"))
    for _ in range(1000):
        begun = framer.head
        framer.feed(b";")
        framer.feed(b"a")
        assert framer.head is begun
    framer.feed(b"\r\nx\r\n0\r\nX: 1")
    begun = framer.head
    for _ in range(1000):
        framer.feed(b"2")
        assert framer.head is begun
    framer.feed(b"\r\n\r\n")
    assert state(framer) == WHOLE


# -- against aiohttp's own parsers, over sockets ----------------------------

PROBE = b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
TE = b"Transfer-Encoding: chunked"

# Streams that aiohttp's parsers (both) take whole, and what it answers: the
# path and body length of each request.
ACCEPTED: dict[str, tuple[bytes, list[bytes]]] = {
    "a chunk": (chunked(b"5\r\nhello\r\n0\r\n\r\n"), [b"/up 5"]),
    "no chunk": (chunked(b"0\r\n\r\n") + GET, [b"/up 0", b"/serve 0"]),
    "chunks with CRLFCRLF and a request in them, then requests": (
        chunked(b"%x\r\n%s\r\n3\r\n\r\n\r\r\n0\r\n\r\n" % (len(TRICKY), TRICKY))
        + request(length(TRICKY), body=TRICKY) + GET,
        [b"/up %d" % (len(TRICKY) + 3), b"/up %d" % len(TRICKY), b"/serve 0"]),
    "extensions, upper-case hex, leading zeros": (
        chunked(b"00A;a;b=c;d=\"e f;g\";h=i\r\n0123456789\r\n1;x\r\nz\r\n000;x=y\r\n\r\n"),
        [b"/up 11"]),
    "trailers": (chunked(b"3\r\nabc\r\n0\r\nChecksum: abc\r\nX-Other: 1\r\n\r\n") + GET,
                 [b"/up 3", b"/serve 0"]),
    "chunked bodies back to back": (
        chunked(b"1\r\na\r\n0\r\n\r\n") * 3
        + chunked(b"2\r\nab\r\n0\r\n\r\n", line=b"GET /g HTTP/1.1"),
        [b"/up 1"] * 3 + [b"/g 2"]),
    "TRANSFER-ENCODING: CHUNKED": (
        request(b"TRANSFER-ENCODING: \t CHUNKED  ", body=b"1\r\na\r\n0\r\n\r\n"), [b"/up 1"]),
}
# Streams the framer does not give up on, though aiohttp may reject them:
# it must then answer 400 and close; if it takes them, the framer agrees.
TOLERATED = {name: STREAMS[name][0] for name in STREAMS if STREAMS[name][1] == WHOLE}


async def exchange(stream: bytes, parser: str, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What aiohttp's server (its C parser or its pure-Python one) answers to
    ``stream`` then PROBE, over a socket on 127.0.0.1: each response's
    status code and body, up to the connection's close."""
    import aiohttp.http_parser
    import aiohttp.web_protocol
    from aiohttp import web

    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser",
                        aiohttp.http_parser.HttpRequestParserC if parser == "c"
                        else aiohttp.http_parser.HttpRequestParserPy)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.path} {len(await request.read())}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(stream + PROBE)
            async with asyncio.timeout(10):
                received = await reader.read()  # up to its close
        finally:
            writer.close()
    finally:
        await runner.cleanup()
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        size = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])  # type: ignore[index]
        answers.append(head.split(b" ", 2)[1] + b" " + rest[:size])
        received = rest[size:]
    return answers


@pytest.fixture(params=["c", "py"])
def parser(request: pytest.FixtureRequest) -> str:
    import aiohttp.http_parser
    if request.param == "c" and aiohttp.http_parser.HttpRequestParserC is \
            aiohttp.http_parser.HttpRequestParserPy:
        pytest.skip("aiohttp without its C parser")
    return str(request.param)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_aiohttp_takes_these_chunked_streams_and_the_framer_agrees(
        name: str, parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked streams that aiohttp's parsers take: it answers each
    request, then the probe that follows; the framer frames them whole,
    in one read and byte by byte."""
    stream, answers = ACCEPTED[name]
    assert framed(stream, []) == framed(stream, list(range(1, len(stream)))) == WHOLE
    expected = [b"200 " + answer for answer in answers] + [b"200 /probe 0"]
    assert asyncio.run(exchange(stream, parser, monkeypatch)) == expected


@pytest.mark.parametrize("name", list(TOLERATED))
def test_what_the_framer_frames_aiohttp_rejects_or_frames_alike(
        name: str, parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stream the framer calls whole requests: aiohttp either
    answers it 400 and closes the connection (the probe unanswered), or
    answers every request and then the probe (had it held a byte of the
    stream, or taken a body's bytes for a request, the probe would not be
    answered last, alone)."""
    answers = asyncio.run(exchange(TOLERATED[name], parser, monkeypatch))
    assert answers, name
    if answers[-1].startswith(b"400 "):
        assert not any(answer.startswith(b"400 ") for answer in answers[:-1])
    else:
        assert answers[-1] == b"200 /probe 0", answers
        assert all(answer.startswith(b"200 ") for answer in answers), answers
