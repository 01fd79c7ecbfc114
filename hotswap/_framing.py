"""Where a connection's requests end, exactly, in bytes (sans-IO).

The connection handover (:mod:`hotswap.migrate`) may move a connection only
when everything its client sent is whole requests: a byte of a next request
read by the old process would be lost, and the rest of a body read by the
successor would be taken for a request. aiohttp's parser (llhttp, in C) does
not say where a request ended, so :class:`RequestFramer` follows the stream
beside it, read by read: a header block (up to the first ``\\r\\n\\r\\n``),
then a body of exactly its ``Content-Length`` bytes (none without one), or
a body sent ``Transfer-Encoding: chunked`` (chunk-size lines, each chunk's
data of exactly that size and its CRLF, the last chunk ``0``, trailer
fields, an empty line), then the next header block.

Whatever it cannot frame exactly it gives up on for good
(:attr:`RequestFramer.lost`), and the connection drains the safe way: a
header block whose first line is not an HTTP/1.1 request line (HTTP/1.0, a
blank line before it), a ``CONNECT``, a header named ``Upgrade``, a
``Transfer-Encoding`` other than exactly ``chunked`` (another coding, a
list, a tab after it: aiohttp's C parser rejects that one), more than one
body header (``Content-Length`` and ``Transfer-Encoding`` together, either
twice) or a ``Content-Length`` that is not 1 to 18 digits, a body header
written loosely (blanks around its name, after a bare CR or LF, its value
folded onto the next line), a header block over :data:`MAX_HEAD` bytes;
in a chunked body, a chunk size that is not 1 to 15 hex digits, a blank
anywhere on a chunk-size line, a chunk extension that is not
``;name``, ``;name=token`` or ``;name="quoted"`` (without escapes), a
trailer line that is not a name, a colon and a value (folded, a blank
before the colon), a line not ended by CRLF (a bare CR or LF in it), a
chunk's data not followed by CRLF, and a chunk-size line or a trailer
section over :data:`MAX_HEAD` bytes.

It need not agree with aiohttp on a request that aiohttp rejects: aiohttp
answers that one 400 and closes the connection. On one that aiohttp takes,
it agrees or gives up: aiohttp parses requests strictly (a header's name
ends at its colon, a line at CRLF, ``Content-Length`` is digits, a chunk
size hex digits that only a chunk extension may follow, a trailer section
ends at its first empty line), and a request without ``Content-Length`` or
``Transfer-Encoding`` has no body. Both of aiohttp's parsers (llhttp's,
and the pure-Python one) are checked against it over sockets
(``tests/test_framing.py``).

It sees every read its caller does not skip, so the common reads are cheap
(:meth:`RequestFramer.feed`): one whole header block with no body (a search
for the body headers, a look at its first line), and a read inside a body
or a chunk's data (a subtraction). A read with a chunk's syntax in it costs
more (a regular expression per chunk-size line); a line or trailer section
trickling in is appended to in place and searched once. Its answer never
depends on how the stream was cut into reads.

A caller whose own HTTP parser already read a request may skip feeding
that read, and the framer stays at a boundary, when both were at one
before it and the parser took the read for exactly one whole request
without a body and consumed all of it. ``hotswap.migrate.Tracked`` does,
for the common GET read (see its ``data_received``): that is less
cautious than the framer only about what the parser itself took for a
request without a body (an ``Upgrade`` it did not act on, an empty
``Transfer-Encoding``, blank lines around the request).
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
                    rb"(?:(?<=\r\ncontent-length:)[ \t]*([0-9]{1,18})[ \t]*\r\n(?![ \t])"
                    rb"|(?<=\r\ntransfer-encoding:)[ \t]*(chunked) *\r\n(?![ \t]))?", re.I)
_named = _NAMED.search

CHUNKED = -1
"""What :func:`body_length` answers for a body sent ``Transfer-Encoding:
chunked``."""

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# The CRLF that ends the previous chunk's data (or, for the first chunk,
# one put in its place), then a chunk-size line: hex digits (at most 15:
# aiohttp's C parser rejects sizes over 64 bits), chunk extensions written
# strictly (";name", ";name=token", ";name=\"quoted\"" without escapes, no
# blanks), CRLF. Group 1: the size.
_SIZE = re.compile(rb"\r\n([0-9A-Fa-f]{1,15})(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN
                   + rb'|"[\t !#-\[\]-~]*"))?)*\r\n')
_size = _SIZE.match
# The trailer section, after the last chunk's size line: header lines
# written strictly (a name, a colon, a value with neither CR nor LF), then
# an empty line.
_TRAILERS = re.compile(rb"(?:" + _TOKEN + rb":[^\r\n]*\r\n)*\r\n")
_trailers = _TRAILERS.match


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
    if named.lastindex == 1 or _named(data, named.end() - 1, end):  # one, exact
        return None
    return CHUNKED if named[2] is None else int(named[2])


_MARK = b"-"
"""The first byte of :attr:`RequestFramer.head` in a chunked body, which is
never empty there (so that it is never taken for a boundary), before a
chunk's data or its chunk-size line ..."""
_TRAILING = b"="
"""... or in the trailer section."""


class RequestFramer:
    """One connection's request stream: :meth:`feed` it every read, and
    :attr:`boundary` says whether all bytes fed are whole requests.
    Sans-IO: bytes in, a state out."""

    __slots__ = ("chunked", "head", "need")

    def __init__(self) -> None:
        # Body bytes still to come of the request being received (0: none),
        # in a chunked body those of the chunk being received; -1: lost
        # (given up for good).
        self.need = 0
        # The header block begun and not yet ended (b"": none); in a chunked
        # body, _MARK then the bytes received after the last chunk's data
        # and not yet read: from the CRLF that ends that data (the header
        # block's last one before the first chunk).
        self.head: bytes | bytearray = b""
        # In a chunked body.
        self.chunked = False

    @property
    def boundary(self) -> bool:
        """Everything fed is whole requests (nothing fed counts too)."""
        return self.need == 0 and not self.head

    @property
    def lost(self) -> bool:
        """Given up on: the stream will never be framed again."""
        return self.need < 0

    def feed(self, data: bytes) -> None:
        """The next bytes received, cut anywhere (a byte, many requests)."""
        need = self.need
        if need > 0 and len(data) <= need:  # inside a body (or a chunk's data)
            self.need = need - len(data)
            return
        if need < 0 or (
                # At a boundary, one whole header block with no body: most
                # reads. What body_length() answers first, inline (a call
                # less per request).
                not need and not self.head and len(data) - 4 == data.find(END) >= 0
                and len(data) <= MAX_HEAD and _named(data) is None
                and data.startswith(_VERSION, data.find(b"\r\n") - 9)
                and (data[0] != 67 or not data.startswith(b"CONNECT "))):  # 67: "C"
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """:meth:`feed`'s general case: the end of a body, a header block
        begun or ended (its end may straddle reads), a chunked body's
        syntax, several requests."""
        buf: bytes | bytearray = data
        pos = search = self.need  # the body's end (0: none)
        self.need = 0
        head = self.head
        if head:
            self.head = b""
            if not self.chunked:
                search = max(0, len(head) - 3)
                head += data  # in place: a block trickling in is not copied again
                buf = head
            else:  # the end of a chunk's data (head: only _MARK), or its syntax begun
                if pos:
                    pos = self._chunks(buf, pos)
                else:
                    search = len(head) - 3
                    head += data  # in place, as a header block
                    buf = head
                    pos = self._chunks(buf, 1, search, head[0] == _TRAILING[0])
                if pos < 0:
                    return
                search = pos
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
            if length < 0:  # CHUNKED: the header block's last CRLF, then chunks
                self.chunked = True
                end = self._chunks(buf, end - 2)
                if end < 0:
                    return
                length = 0
            pos = search = end + length
        self.need = pos - size

    def _chunks(self, buf: bytes | bytearray, pos: int, search: int = 0,
                trailing: bool = False) -> int:
        """Read a chunked body on from ``buf[pos:]``: the CRLF that ends a
        chunk's data (or the header block) and its next chunk-size line, or
        (``trailing``) the trailer section. ``search``: bytes before it in
        ``buf`` were searched already (a line trickling in is searched
        once: from 3 bytes before what was appended).
        Answers where in ``buf`` the body ends, or -1 if not in it (what is
        still to come is then kept in :attr:`need` and :attr:`head`, or
        given up on)."""
        size = len(buf)
        while not trailing:
            if buf.find(b"\n", max(pos + 2, search)) < 0:  # the line is to come
                if not buf.startswith(b"\r\n"[:size - pos], pos):
                    return self._lose()
                return self._rest(buf, pos, _MARK)
            line = _size(buf, pos)
            if line is None or line.end() - pos > MAX_HEAD:
                return self._lose()
            pos = line.end()
            length = int(line[1], 16)
            if not length:  # the last chunk: trailer fields, an empty line
                break
            if pos + length > size:
                self.need = pos + length - size
                self.head = _MARK
                return -1
            pos += length
        if not (buf.startswith(b"\r\n", pos) or buf.find(END, max(pos, search)) >= 0):
            return self._rest(buf, pos, _TRAILING)
        trailers = _trailers(buf, pos)
        if trailers is None or trailers.end() - pos > MAX_HEAD:
            return self._lose()
        self.chunked = False
        return trailers.end()

    def _rest(self, buf: bytes | bytearray, pos: int, mark: bytes) -> int:
        """Keep ``buf[pos:]``, the start of a chunk-size line (with the CRLF
        that ends the chunk's data before it) or of the trailer section,
        after ``mark`` (or give up if it is over :data:`MAX_HEAD`): -1."""
        if len(buf) - pos > MAX_HEAD:
            return self._lose()
        if pos == 1 and isinstance(buf, bytearray):  # head: not copied again
            buf[0] = mark[0]
            self.head = buf
        else:
            self.head = bytearray(mark) + buf[pos:]
        return -1

    def _lose(self) -> int:
        """Give up for good: -1."""
        self.chunked, self.need = False, -1
        return -1
