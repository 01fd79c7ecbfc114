"""Where a connection's requests end, exactly, in bytes (sans-IO).

The connection handover (:mod:`hotswap.migrate`) may move a connection only
when everything its client sent is whole requests: a byte of a next request
read by the old process would be lost, and the rest of a body read by the
successor would be taken for a request. aiohttp's parser (llhttp, in C) does
not say where a request ended, so :class:`RequestFramer` follows the stream
beside it, read by read: a header block (up to the first ``\\r\\n\\r\\n``),
then a body of exactly its ``Content-Length`` bytes (none without one), then
the next header block.

Whatever it cannot frame exactly it gives up on for good
(:attr:`RequestFramer.lost`), and the connection drains the safe way: a
header block whose first line is not an HTTP/1.1 request line (HTTP/1.0, a
blank line before it), a ``CONNECT``, a header named ``Transfer-Encoding``
(chunked or any other coding) or ``Upgrade``, more than one
``Content-Length`` or one that is not 1 to 18 digits, a body header written
loosely (blanks around its name, after a bare CR or LF, its value folded
onto the next line), and a header block over :data:`MAX_HEAD` bytes.

It need not agree with aiohttp on a request that aiohttp rejects: aiohttp
answers that one 400 and closes the connection. On one that aiohttp takes,
it agrees or gives up: aiohttp parses requests strictly (a header's name
ends at its colon, a line at CRLF, ``Content-Length`` is digits), and a
request without ``Content-Length`` or ``Transfer-Encoding`` has no body.

It sees every read of every connection, so the common reads are cheap
(:meth:`RequestFramer.feed`): one whole header block that the caller's HTTP
parser took for a request without a body (one search: the parser's word is
taken for the rest), or that it finds so itself (a search for the body
headers, a look at its first line), and a read inside a body (a
subtraction). Its own answer never depends on how the stream was cut into
reads; the parser's word can only make it less cautious about a header
block that the parser itself took for a request without a body (an
``Upgrade`` that the parser did not act on).
"""

from __future__ import annotations

import re

END = b"\r\n\r\n"
"""A header block's end."""

MAX_HEAD = 64 << 10
"""Bytes a header block may have and still be framed: one still open past
this is given up on (and its buffer freed). Above aiohttp's line limits
(8190 bytes), not above what its per-line and header-count limits allow
together: a request that large drains the safe way."""

_VERSION = b" HTTP/1.1\r\n"

# A header that may give a request a body, or upgrade its connection, named
# at a line's start, however loosely: most header blocks have none. From a
# line feed (a bare CR ends no line for aiohttp; a search from a literal
# byte is the fast kind). Group 2: the value of a Content-Length written
# exactly (CRLF, its name, a colon, 1 to 18 digits, CRLF, not folded onto
# the next line), the only body header framed.
_NAMED = re.compile(rb"\n[ \t]*(content-length|transfer-encoding|upgrade)[ \t]*:"
                    rb"(?:(?<=\r\ncontent-length:)[ \t]*([0-9]{1,18})[ \t]*\r\n(?![ \t]))?", re.I)
_named = _NAMED.search


def body_length(data: bytes | bytearray, start: int = 0, end: int | None = None
                ) -> int | None:
    """The length of the body that follows the header block ``data[start:end]``
    (a whole one: request line, headers, blank line), or None if the framer
    gives up on it (see the module's docstring)."""
    end = len(data) if end is None else end
    line = data.find(b"\r\n", start)
    if (not data.startswith(_VERSION, max(start, line - 9))
            or data.startswith(b"CONNECT ", start)):
        return None
    named = _named(data, start, end)
    if named is None:
        return 0
    if named[2] is None or _named(data, named.end() - 1, end):  # one, exact
        return None
    return int(named[2])


class RequestFramer:
    """One connection's request stream: :meth:`feed` it every read, and
    :attr:`boundary` says whether all bytes fed are whole requests.
    Sans-IO: bytes in, a state out."""

    __slots__ = ("head", "need")

    def __init__(self) -> None:
        # Body bytes still to come of the request being received (0: none);
        # -1: lost (given up for good).
        self.need = 0
        # The header block begun and not yet ended (b"": none).
        self.head: bytes | bytearray = b""

    @property
    def boundary(self) -> bool:
        """Everything fed is whole requests (nothing fed counts too)."""
        return self.need == 0 and not self.head

    @property
    def lost(self) -> bool:
        """Given up on: the stream will never be framed again."""
        return self.need < 0

    def feed(self, data: bytes, parsed: bool = False) -> None:
        """The next bytes received, cut anywhere (a byte, many requests).

        ``parsed``: the caller's HTTP parser, which was fed the same bytes
        from the same boundary, took them for exactly one HTTP/1.1 request
        without a body and without an upgrade. If they are one whole header
        block, no larger than :data:`MAX_HEAD` (the framer checks), it takes
        the parser's word for the rest instead of reading the headers
        itself: the parser's own answer is what the framer has to agree
        with, and this is the common read. Ignored for any other read."""
        need = self.need
        if need > 0 and len(data) <= need:  # inside a body
            self.need = need - len(data)
            return
        if need < 0 or (
                # At a boundary, one whole header block with no body: most
                # reads. Without the parser's word, what body_length()
                # answers first, inline (a call less per request).
                not need and not self.head and len(data) - 4 == data.find(END) >= 0
                and len(data) <= MAX_HEAD and (parsed or (
                    _named(data) is None
                    and data.startswith(_VERSION, data.find(b"\r\n") - 9)
                    and (data[0] != 67 or not data.startswith(b"CONNECT "))))):  # 67: "C"
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """:meth:`feed`'s general case: the end of a body, a header block
        begun or ended (its end may straddle reads), several requests."""
        buf: bytes | bytearray = data
        pos = search = self.need  # the body's end (0: none)
        self.need = 0
        head = self.head
        if head:
            search = max(0, len(head) - 3)
            head += data  # in place: a block trickling in is not copied again
            buf, self.head = head, b""
        size = len(buf)
        while pos < size:
            end = buf.find(END, search) + 4
            if end < 4:  # a header block begun
                if size - pos > MAX_HEAD:
                    self.need = -1
                else:
                    self.head = buf if buf is head and not pos else bytearray(buf[pos:])
                return
            length = body_length(buf, pos, end) if end - pos <= MAX_HEAD else None
            if length is None:
                self.need = -1
                return
            pos = search = end + length
        self.need = pos - size
