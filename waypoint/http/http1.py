"""HTTP/1.1 over a `ByteStream`: the downstream server (`serve_http1`) and the upstream client
(`Http1ClientConnection`), parsing with httptools (llhttp) and framing bodies ourselves.

Reading is pull-driven: the stream is read only when the server waits for the next request or someone
reads a body, so a body nobody reads stops the peer (TCP / HBONE flow control) and memory stays bounded by
one read. Bytes are parsed into a queue of events (a message head, body chunks, the message end with its
trailers); pipelined requests simply wait in that queue and are answered in order. Writing awaits every
`write`, so a slow reader slows the writer; a head and what of the body is already at hand leave in one
write.

Server behaviour: keep-alive (HTTP/1.1 by default, HTTP/1.0 with `Connection: keep-alive`),
`Connection: close`, HTTP/1.0 (answers without a length are delimited by closing), `Expect: 100-continue`
(the 100 goes out when the handler first reads the body; the `expect` header is not passed on), bad
requests → 400 and close, oversized heads or too many headers → 431 and close. `CONNECT` and upgrades other
than `h2c` (which is ignored, as RFC 9110 allows) → 501 and close. A handler exception → 500; the
connection survives. Request body left unread after the response: up to `drain_limit` bytes are discarded
to keep the connection, beyond that (or when a 100-continue was never sent) the connection closes.

A client that goes away while its request is handled has the handler cancelled, releasing its upstream
request and pool slot (Envoy resets the upstream, flag DC): once the request body is in, the stream is
read on, and a read error, or an EOF on a stream that can no longer be written (a reset: HBONE
RST_STREAM(NO_ERROR) reads as EOF, but writes fail), cancels the handler and closes the connection. A half
close (EOF on a stream still writable: HBONE END_STREAM, TCP shutdown(SHUT_WR), and a TCP FIN before any
RST) ends only the request: the response is still sent (Envoy's HTTP/1 codec would close on a downstream
FIN). Bytes arriving meanwhile (a pipelined request) stop that reading: they wait in the queue (one read).

Client behaviour: one request at a time; the request body is written by a task while the response is
read, so an early answer (e.g. 413) is seen; 1xx answers are skipped; a response that ends before the
request body is written, a `Connection: close` or a discarded response body closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Final

import httptools

from ambient.aio import OwnedTasks
from waypoint.http.errors import HttpError, ProtocolError, StreamReset, UpstreamReset
from waypoint.http.message import (
    DEFAULT_LIMITS,
    HOP_BY_HOP,
    STREAM_ERRORS,
    Body,
    BytesBody,
    ByteStream,
    Handler,
    Headers,
    HttpLimits,
    RequestHead,
    ResponseHead,
    bytes_body,
)

log = logging.getLogger("waypoint.http.http1")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}
_FRAMING = frozenset({"content-length", "host"})  # written by the serializer itself, never copied from a head
_NOT_NOMINATABLE = frozenset({"host", "content-length"})  # `Connection: host` must not strip the Host header
# Request methods whose empty body is sent without `content-length: 0` (Envoy does the same).
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

# Body framing on the wire.
NO_BODY: Final = 0  # HEAD responses, 1xx/204/304, bodiless requests
LENGTH: Final = 1  # content-length
CHUNKED: Final = 2  # transfer-encoding: chunked (trailers possible)
UNTIL_CLOSE: Final = 3  # HTTP/1.0 response of unknown length: the end is the connection closing


class _Message:
    """A parsed head (request or response) and, once its end was parsed, its trailers."""

    __slots__ = ("framed", "headers", "keep_alive", "method", "status", "upgrade", "url", "version")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.method = ""
        self.status = 0
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False  # an upgrade we do not serve (CONNECT, or not h2c): answer 501 and close
        self.framed = False  # content-length or chunked transfer-encoding present


class _End:
    __slots__ = ("trailers",)

    def __init__(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.trailers = trailers


Event = _Message | bytes | _End


class _TooLarge(Exception):
    """Raised inside a parser callback to stop parsing an oversized head."""


class _SkipBody(Exception):
    """Raised inside the response parser's head callback: the answer to HEAD has no body whatever it says."""


class Http1Input:
    """One direction of an HTTP/1 connection: bytes → httptools → a queue of `_Message` / bytes / `_End`.
    `response=True` parses responses (the client side). The parser callbacks are the `on_*` methods."""

    def __init__(self, stream: ByteStream, limits: HttpLimits, response: bool) -> None:
        self._stream = stream
        self._limits = limits
        self._response = response
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser = self._new_parser()
        self.queue: deque[Event] = deque()
        self.error: HttpError | None = None
        self.eof = False  # the peer closed between messages
        self.broken = False  # a read failed: the stream was reset or lost
        self.received = 0  # bytes read so far
        self.skip_body = False  # client: the pending response answers a HEAD
        self.unclean = False  # bytes followed a bodiless response: the connection must not be reused
        self._msg: _Message | None = None
        self._url: list[bytes] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._in_head = False
        self._head_size = 0
        self._head_fed = 0
        self._filling: asyncio.Future[None] | None = None

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self) if self._response else httptools.HttpRequestParser(self)

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._msg = _Message()
        self._url = []
        self._trailers = None
        self._in_head = True
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self._msg
        assert msg is not None
        if self._in_head:
            msg.headers.append((name, value))
            if len(msg.headers) > self._limits.max_headers:
                raise _TooLarge(f"more than {self._limits.max_headers} header fields")
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            if len(self._trailers) > self._limits.max_headers:
                raise _TooLarge(f"more than {self._limits.max_headers} trailer fields")
        self._count(len(name) + len(value) + 4)

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._limits.max_header_bytes:
            raise _TooLarge(f"head larger than {self._limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        msg = self._msg
        assert msg is not None
        parser = self._parser
        msg.url = b"".join(self._url)
        msg.version = parser.get_http_version()
        msg.keep_alive = parser.should_keep_alive()
        for name, value in msg.headers:
            size = len(name)
            if (size == 14 and name.lower() == b"content-length") or (
                    size == 17 and name.lower() == b"transfer-encoding"
                    and value.rstrip().lower().endswith(b"chunked")):
                msg.framed = True  # else a response body runs until the connection closes
                break
        if isinstance(parser, httptools.HttpRequestParser):
            msg.method = parser.get_method().decode("ascii")
        else:
            msg.status = parser.get_status_code()
        self._in_head = False
        self._head_fed = 0
        self.queue.append(msg)
        if self.skip_body and msg.status >= 200:
            self.queue.append(_End(None))
            self._msg = None
            raise _SkipBody

    def on_body(self, body: bytes) -> None:
        self.queue.append(body)

    def on_message_complete(self) -> None:
        self.queue.append(_End(self._trailers))
        self._msg = None

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse `data`; a malformed message becomes `error` (raised once the queue before it is consumed)."""
        if self._msg is None or self._in_head:
            self._head_fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _TooLarge):
                self._fail(ProtocolError(f"message head too large: {cause}", "headers_too_large"))
            elif isinstance(cause, _SkipBody):
                self._parser = self._new_parser()
                self.skip_body = False
                self.unclean = not data.endswith((b"\r\n\r\n", b"\n\n"))
            else:
                raise
        except httptools.HttpParserError as exc:
            what = "response" if self._response else "request"
            self._fail(ProtocolError(f"malformed HTTP/1.1 {what}: {exc}", "bad_request"))
        else:
            if (self._msg is None or self._in_head) and self._head_fed > self._limits.max_header_bytes:
                self._fail(ProtocolError(f"message head larger than {self._limits.max_header_bytes} bytes",
                                         "headers_too_large"))

    def _on_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after a CONNECT or `Connection: upgrade` head (the message is queued). An h2c
        upgrade without a body is ignored and parsing goes on; anything else is marked for a 501."""
        msg = next((event for event in reversed(self.queue) if isinstance(event, _Message)), None)
        if msg is None or self._response:
            self._fail(ProtocolError("unexpected protocol upgrade in an HTTP/1.1 response", "bad_request"))
            return
        upgrade = next((value for name, value in msg.headers if name.lower() == b"upgrade"), b"")
        if msg.method != "CONNECT" and upgrade.strip().lower() == b"h2c" and not msg.framed:
            self._parser = self._new_parser()
            if rest:
                self.feed(rest)
            return
        msg.upgrade = True
        self.eof = True  # what follows is another protocol: stop reading

    def _fail(self, error: HttpError) -> None:
        if self.error is None:
            self.error = error

    async def fill(self) -> None:
        """Read once and parse. Concurrent callers share one read (the stream allows one reader)."""
        filling = self._filling
        if filling is not None:
            await asyncio.shield(filling)
            return
        self._filling = done = asyncio.get_running_loop().create_future()
        try:
            try:
                data = await self._stream.read(self._limits.read_size)
            except STREAM_ERRORS as exc:
                self.broken = True
                self._fail(StreamReset(f"connection lost: {exc}", "connection_lost"))
                return
            if data:
                self.received += len(data)
                self.feed(data)
            else:
                self._on_eof()
        finally:
            self._filling = None
            done.set_result(None)

    def _on_eof(self) -> None:
        msg = self._msg
        if msg is None:
            self.eof = True
        elif self._response and not self._in_head and not msg.framed:
            self.queue.append(_End(None))  # a response delimited by the connection closing
            self._msg = None
            self.eof = True
        else:
            self._fail(StreamReset("the peer closed the connection in the middle of a message", "connection_lost"))

    # -- consuming -------------------------------------------------------------------------------
    async def next_head(self) -> _Message | None:
        """The next message head; None when the peer closed cleanly. Stray body events are skipped."""
        queue = self.queue
        while True:
            while queue:
                event = queue.popleft()
                if type(event) is _Message:
                    return event
            if self.error is not None:
                raise self.error.fresh()
            if self.eof:
                return None
            await self.fill()

    async def body_event(self) -> bytes | _End:
        """The current message's next chunk, or its end."""
        queue = self.queue
        while True:
            if queue:
                event = queue[0]
                if not isinstance(event, _Message):
                    queue.popleft()
                    return event
                raise AssertionError("a message head before the end of the previous body")
            if self.error is not None:
                raise self.error.fresh()
            if self.eof:
                raise StreamReset("the peer closed the connection in the middle of a message", "connection_lost")
            await self.fill()

    def body_event_nowait(self) -> bytes | _End | None:
        queue = self.queue
        if queue:
            event = queue[0]
            if not isinstance(event, _Message):
                queue.popleft()
                return event
        return None


# -- heads ---------------------------------------------------------------------------------------------
def _decode_fields(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Lower-cased latin-1 fields without hop-by-hop ones, and the tokens `Connection` named."""
    fields: list[tuple[str, str]] = []
    nominated: list[str] = []
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1").strip(" \t")
        if name in HOP_BY_HOP:
            if name == "connection":
                nominated.extend(token.strip().lower() for token in value.split(","))
            elif name == "te" and value.lower() == "trailers":
                fields.append((name, "trailers"))
            continue
        fields.append((name, value))
    if nominated:
        drop = {token for token in nominated if token and token not in _NOT_NOMINATABLE and token != "te"}
        if drop:
            fields = [field for field in fields if field[0] not in drop]
    return fields, nominated


def _content_length(msg: _Message) -> int | None:
    """The declared length; None for chunked; 0 for a request with neither."""
    value = None
    for name, raw in msg.headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return None
        if lowered == b"content-length":
            value = int(raw)  # llhttp has validated it
    return value


def request_head(msg: _Message) -> tuple[RequestHead, bool]:
    """The `RequestHead` of a parsed request and whether it asked for 100-continue. ProtocolError (400) for
    a missing or repeated Host on HTTP/1.1."""
    fields, _ = _decode_fields(msg.headers)
    authority: str | None = None
    expect = False
    headers: list[tuple[str, str]] = []
    for name, value in fields:
        if name == "host":
            if authority is not None:
                raise ProtocolError("more than one Host header", "bad_request")
            authority = value
        elif name == "expect" and value.lower() == "100-continue":
            expect = msg.version == "1.1"
        else:
            headers.append((name, value))
    url = msg.url.decode("latin-1")
    if url.startswith(("http://", "https://")):  # absolute-form: its authority wins (RFC 9112 §3.2.2)
        host, slash, path = url.partition("://")[2].partition("/")
        authority, url = host, slash + path if slash else "/"
    elif not url.startswith("/") and url != "*":
        raise ProtocolError(f"request target {url[:100]!r} is not a path", "bad_request")
    if authority is None:
        if msg.version == "1.1":
            raise ProtocolError("HTTP/1.1 request without a Host header", "bad_request")
        authority = ""
    return RequestHead(msg.method, url, authority, Headers.from_lowered(headers)), expect


def response_head(msg: _Message) -> ResponseHead:
    fields, _ = _decode_fields(msg.headers)
    return ResponseHead(msg.status, Headers.from_lowered(fields))


def _encode(lines: list[str], expected_lines: int) -> bytes:
    text = "".join(lines)
    if text.count("\n") != expected_lines or text.count("\r") != expected_lines:
        raise HttpError("a header name or value contains CR or LF; refusing to write it", "invalid_header")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _header_lines(lines: list[str], headers: Headers, keep_length: bool) -> None:
    for name, value in headers.items():
        if name in HOP_BY_HOP or (name in _FRAMING and not (keep_length and name == "content-length")):
            if name == "te" and value == "trailers":
                lines.append("te: trailers\r\n")
            continue
        lines.append(f"{name}: {value}\r\n")


def serialize_request(head: RequestHead, length: int | None) -> tuple[bytes, int]:
    """The request head for the wire and the body framing (`length` = the body's declared length)."""
    lines = [f"{head.method} {head.path} HTTP/1.1\r\n", f"host: {head.authority}\r\n"]
    _header_lines(lines, head.headers, keep_length=False)
    if length is None:
        framing = CHUNKED
        lines.append("transfer-encoding: chunked\r\n")
    elif length == 0 and head.method in _BODYLESS_METHODS:
        framing = NO_BODY
    else:
        framing = LENGTH
        lines.append(f"content-length: {length}\r\n")
    lines.append("\r\n")
    return _encode(lines, len(lines)), framing


def serialize_response(head: ResponseHead, length: int | None, request_method: str, request_version: str,
                       keep_alive: bool) -> tuple[bytes, int, bool]:
    """The response head, its body framing and whether the connection stays open after it."""
    status = head.status
    lines = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n"]
    bodiless = request_method == "HEAD" or status in (204, 304) or status < 200
    if bodiless:
        framing = NO_BODY
        has_length = "content-length" in head.headers
        _header_lines(lines, head.headers, keep_length=status != 204)
        if request_method == "HEAD" and not has_length and length is not None:
            lines.append(f"content-length: {length}\r\n")
    else:
        _header_lines(lines, head.headers, keep_length=False)
        if length is not None:
            framing = LENGTH
            lines.append(f"content-length: {length}\r\n")
        elif request_version == "1.1":
            framing = CHUNKED
            lines.append("transfer-encoding: chunked\r\n")
        else:
            framing = UNTIL_CLOSE
            keep_alive = False
    if not keep_alive:
        lines.append("connection: close\r\n")
    elif request_version == "1.0":
        lines.append("connection: keep-alive\r\n")
    lines.append("\r\n")
    return _encode(lines, len(lines)), framing, keep_alive


def encode_trailers(trailers: Headers | None) -> bytes:
    """The end of a chunked body: the last chunk, trailer fields and the final CRLF."""
    if not trailers:
        return b"0\r\n\r\n"
    lines = ["0\r\n"]
    _header_lines(lines, trailers, keep_length=False)
    lines.append("\r\n")
    return _encode(lines, len(lines))


class BodyEncoder:
    """Frames body chunks for the wire (sans-IO): checks a declared length, chunk-encodes, or passes raw."""

    __slots__ = ("_chunked", "_remaining")

    def __init__(self, framing: int, length: int | None) -> None:
        self._chunked = framing == CHUNKED
        self._remaining = length if framing == LENGTH else None

    def chunk(self, data: bytes, out: list[bytes]) -> None:
        if self._chunked:
            out.append(b"%x\r\n" % len(data))
            out.append(data)
            out.append(b"\r\n")
            return
        if self._remaining is not None:
            self._remaining -= len(data)
            if self._remaining < 0:
                raise HttpError("the body is longer than its declared content-length", "length_mismatch")
        out.append(data)

    def end(self, trailers: Headers | None, out: list[bytes]) -> None:
        if self._chunked:
            out.append(encode_trailers(trailers))
        elif self._remaining:
            raise HttpError(f"the body ended {self._remaining} bytes short of its declared content-length",
                            "length_mismatch")


async def write_all(stream: ByteStream, pieces: list[bytes], limit: int) -> None:
    """Write `pieces` with as few writes as possible: small neighbours are joined (one copy), pieces above
    `limit` go out on their own (no copy)."""
    if len(pieces) == 1:
        await stream.write(pieces[0])
    elif sum(map(len, pieces)) <= limit:
        await stream.write(b"".join(pieces))
    else:
        small: list[bytes] = []
        for piece in pieces:
            if len(piece) > limit:
                if small:
                    await stream.write(b"".join(small))
                    small = []
                await stream.write(piece)
            else:
                small.append(piece)
        if small:
            await stream.write(b"".join(small))
    pieces.clear()


def take_ready(encoder: BodyEncoder, body: Body, out: list[bytes]) -> bool:
    """Frame into `out` whatever `body` has at hand without waiting; True once its end was reached."""
    while (chunk := body.read_nowait()) is not None:
        if not chunk:
            encoder.end(body.trailers, out)
            return True
        encoder.chunk(chunk, out)
    return False


async def write_body(stream: ByteStream, encoder: BodyEncoder, body: Body, pending: list[bytes],
                     limits: HttpLimits) -> None:
    """Write `pending` (a head) and all of `body`, coalescing what is already at hand with it."""
    limit = limits.coalesce_limit
    while True:
        if take_ready(encoder, body, pending):
            await write_all(stream, pending, limit)
            return
        if pending:
            await write_all(stream, pending, limit)
        chunk = await body.read()
        if chunk:
            encoder.chunk(chunk, pending)
        else:
            encoder.end(body.trailers, pending)
            await write_all(stream, pending, limit)
            return


# -- server ----------------------------------------------------------------------------------------------
class _RequestBody(Body):
    __slots__ = ("_conn", "_ended", "closed", "done", "error", "expect_continue")

    def __init__(self, conn: _ServerConnection, length: int | None, expect_continue: bool) -> None:
        super().__init__(length)
        self._conn = conn
        self.expect_continue = expect_continue
        self.done = length == 0  # the message end was consumed
        self.closed = False
        self.error: HttpError | None = None
        self._ended: asyncio.Future[None] | None = None
        if self.done:
            conn.input.body_event_nowait()  # the _End of a bodiless request, already parsed

    async def ended(self) -> None:
        """Wait until the body was read to its end (or failed)."""
        if not self.done:
            self._ended = asyncio.get_running_loop().create_future()
            await self._ended

    def _set_done(self) -> None:
        self.done = True
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    async def read(self) -> bytes:
        if self.done or self.closed:
            return b""
        if self.expect_continue:
            self.expect_continue = False
            await self._conn.send_continue()
        return await self.read_raw()

    async def read_raw(self) -> bytes:
        try:
            event = await self._conn.input.body_event()
        except HttpError as exc:
            self.error = exc
            self._set_done()
            raise
        return self._take(event)

    def read_nowait(self) -> bytes | None:
        if self.done or self.closed:
            return b""
        if self.expect_continue:
            return None
        event = self._conn.input.body_event_nowait()
        return None if event is None else self._take(event)

    def _take(self, event: bytes | _End) -> bytes:
        if type(event) is bytes:
            return event
        assert isinstance(event, _End)
        self._set_done()
        if event.trailers:
            self.trailers = Headers.from_lowered(_decode_fields(event.trailers)[0])
        return b""

    async def aclose(self) -> None:
        self.closed = True  # the server discards the rest after the response (_ServerConnection._finish_request)


class _ServerConnection:
    def __init__(self, stream: ByteStream, handler: Handler, limits: HttpLimits) -> None:
        self.stream = stream
        self.handler = handler
        self.limits = limits
        self.input = Http1Input(stream, limits, response=False)
        self.responding = False  # the final response head is out (no more 100 Continue)
        self.idle_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._idle_timer: asyncio.TimerHandle | None = None

    async def run(self, first: bytes) -> None:
        self._idle_timer = self._loop.call_later(self.limits.idle_timeout, self._check_idle)
        try:
            if first:
                self.input.received += len(first)
                self.input.feed(first)
            while True:
                self.idle_since = self._loop.time()
                try:
                    msg = await self.input.next_head()
                except ProtocolError as exc:
                    await self._refuse(exc)
                    return
                except StreamReset:
                    return
                if msg is None:
                    return
                self.idle_since = None
                if not await self._exchange(msg):
                    return
        finally:
            self._idle_timer.cancel()
            self.stream.close()

    def _check_idle(self) -> None:
        now = self._loop.time()
        since = self.idle_since
        if since is not None and now - since >= self.limits.idle_timeout - 1e-3:
            log.debug("closing an HTTP/1.1 connection idle for %.0fs", now - since)
            self.stream.close()
            return
        due = (since if since is not None else now) + self.limits.idle_timeout
        self._idle_timer = self._loop.call_at(due, self._check_idle)

    async def send_continue(self) -> None:
        if not self.responding:
            await self.stream.write(CONTINUE)

    async def _refuse(self, error: HttpError, status: int | None = None) -> None:
        """Answer a request we cannot serve and close (the caller returns)."""
        if status is None:
            status = 431 if error.reason == "headers_too_large" else 400
        log.debug("refusing an HTTP/1.1 request with %d: %s", status, error)
        text = f"{HTTPStatus(status).phrase}: {error}\n".encode()
        head, _, _ = serialize_response(ResponseHead(status, Headers([("content-type", "text/plain")])), len(text),
                                        "GET", "1.1", keep_alive=False)
        try:
            await self.stream.write(head + text)
        except STREAM_ERRORS:
            pass

    async def _exchange(self, msg: _Message) -> bool:
        """Serve one request; True if the connection stays open for the next."""
        if msg.upgrade:
            what = "CONNECT" if msg.method == "CONNECT" else "protocol upgrades"
            await self._refuse(HttpError(f"{what} over HTTP/1.1: not supported by this proxy"), 501)
            return False
        try:
            head, expect = request_head(msg)
        except ProtocolError as exc:
            await self._refuse(exc)
            return False
        body = _RequestBody(self, _content_length(msg) if msg.framed else 0, expect)
        self.responding = False
        try:
            handled = await self._handle(head, body)
            if handled is None:
                log.debug("request %s %s%s abandoned: the client went away", head.method, head.authority,
                          head.path_only)
                return False
            response, response_body = handled
        except Exception as exc:
            if body.error is not None:  # the client broke its request (or went away) while it was read
                if isinstance(body.error, ProtocolError):
                    await self._refuse(body.error)
                else:
                    log.debug("request %s %s%s abandoned: %s", head.method, head.authority, head.path_only, exc)
                return False
            log.error("handler failed for %s %s%s: %r", head.method, head.authority, head.path_only, exc,
                      exc_info=exc)
            response, response_body = internal_error()
        keep_alive = msg.keep_alive
        try:
            if body.expect_continue and not body.done:
                if isinstance(response_body, BytesBody):
                    keep_alive = False  # answered without the body (a refusal): it will not come, close after
                else:
                    body.expect_continue = False  # the answer may stream from the request body (an echo)
                    await self.send_continue()
            try:
                data, framing, keep_alive = serialize_response(response, response_body.length, head.method,
                                                               msg.version, keep_alive)
            except HttpError as exc:
                log.error("cannot write the response to %s %s%s: %s", head.method, head.authority, head.path_only,
                          exc)
                await response_body.aclose()
                response, response_body = internal_error()
                data, framing, keep_alive = serialize_response(response, response_body.length, head.method,
                                                               msg.version, keep_alive)
            self.responding = True
            if framing == NO_BODY:
                await self.stream.write(data)
            else:
                await write_body(self.stream, BodyEncoder(framing, response_body.length), response_body, [data],
                                 self.limits)
        except STREAM_ERRORS:
            return False  # the client went away
        except Exception as exc:  # the response body failed (e.g. the upstream reset): cut the response short
            # An HttpError is the upstream's doing; anything else is a bug here, so it is logged loudly.
            log.log(logging.DEBUG if isinstance(exc, HttpError) else logging.ERROR, "response to %s %s%s cut "
                    "short: %r", head.method, head.authority, head.path_only, exc)
            self.stream.abort()
            return False
        finally:
            await response_body.aclose()
        return await self._finish_request(body) and keep_alive

    async def _handle(self, head: RequestHead, body: _RequestBody) -> tuple[ResponseHead, Body] | None:
        """Run the handler in a task of its own, cancelled if the client goes away meanwhile (then None)."""
        handling = asyncio.ensure_future(self.handler(head, body))
        gone = False

        async def watch() -> None:
            nonlocal gone
            if await self._client_gone(body):
                gone = True
                handling.cancel()

        watching = self._loop.create_task(watch())
        try:
            return await handling
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if gone and (current is None or not current.cancelling()):
                return None
            raise
        finally:
            watching.cancel()  # a read it had started is shared (Http1Input.fill): nothing is lost

    async def _client_gone(self, body: _RequestBody) -> bool:
        """Once the request body is in, read on while nothing is queued: True when the read fails, or the
        stream ended and cannot be written any more (the client reset it: an HBONE RST_STREAM(NO_ERROR) reads
        as EOF); False when it still can (a half close) or a pipelined request arrived."""
        await body.ended()
        inp = self.input
        while not inp.queue and inp.error is None and not inp.eof:
            await inp.fill()
        if inp.queue or isinstance(inp.error, ProtocolError):
            return False  # the next request (or garbage): served (or refused) after this one
        if inp.broken:
            return True
        try:
            await self.stream.write(b"")  # raises once the stream was reset or lost
        except STREAM_ERRORS:
            return True
        return False

    async def _finish_request(self, body: _RequestBody) -> bool:
        """After the response: discard what is left of the request body; False to close instead."""
        if body.done:
            return body.error is None
        if body.expect_continue:
            return False  # the client may be waiting for a 100 we never sent: it cannot be framed
        budget = self.limits.drain_limit
        try:
            while budget >= 0:
                chunk = await body.read_raw()
                if not chunk:
                    return True
                budget -= len(chunk)
        except HttpError:
            return False
        return False


def internal_error() -> tuple[ResponseHead, Body]:
    return ResponseHead(500, Headers([("content-type", "text/plain")])), bytes_body(b"internal server error\n")


async def serve_http1(stream: ByteStream, handler: Handler, *, first: bytes = b"",
                      limits: HttpLimits = DEFAULT_LIMITS) -> None:
    """Serve HTTP/1.1 requests on `stream` until the client closes, a request asks to close, the connection
    is idle for `limits.idle_timeout`, or the client breaks the protocol. `first` = bytes already read (by
    protocol detection). The stream is closed on return."""
    await _ServerConnection(stream, handler, limits).run(first)


# -- client ----------------------------------------------------------------------------------------------
class _ResponseBody(Body):
    __slots__ = ("_conn", "_done")

    def __init__(self, conn: Http1ClientConnection, length: int | None) -> None:
        super().__init__(length)
        self._conn = conn
        self._done = False

    async def read(self) -> bytes:
        if self._done:
            return b""
        try:
            event = await self._conn._input.body_event()
        except HttpError as exc:
            self._done = True
            self._conn._fail()
            raise UpstreamReset(f"upstream response body cut short: {exc}", error_code=None) from exc
        return self._take(event)

    def read_nowait(self) -> bytes | None:
        if self._done:
            return b""
        event = self._conn._input.body_event_nowait()
        return None if event is None else self._take(event)

    def _take(self, event: bytes | _End) -> bytes:
        if type(event) is bytes:
            return event
        assert isinstance(event, _End)
        self._done = True
        if event.trailers:
            self.trailers = Headers.from_lowered(_decode_fields(event.trailers)[0])
        self._conn._response_finished()
        return b""

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn._fail()  # the rest is still on the wire: the connection cannot carry another request


class Http1ClientConnection:
    """An upstream HTTP/1.1 connection over `stream`: one request at a time. `available` turns True again
    once the response body was read to its end (and the request body fully sent) on a keep-alive
    connection; `on_done` (given per request) is called exactly once when that exchange is over, either way.
    `requests` counts the requests started on it."""

    def __init__(self, stream: ByteStream, *, limits: HttpLimits = DEFAULT_LIMITS) -> None:
        self._stream = stream
        self._limits = limits
        self._input = Http1Input(stream, limits, response=True)
        self._tasks = OwnedTasks(log)
        self._writer: asyncio.Task[None] | None = None
        self._writer_error: BaseException | None = None
        self._on_done: Callable[[], None] | None = None
        self._keep_alive = False
        self._response_done = False
        self.available = True
        self.closed = False
        self.requests = 0

    @property
    def at_eof(self) -> bool:
        """The peer closed (or sent unsolicited bytes) while the connection was idle."""
        return bool(getattr(self._stream, "at_eof", False)) or self._input.eof or self._input.error is not None

    async def request(self, head: RequestHead, body: Body, *,
                      on_done: Callable[[], None] | None = None) -> tuple[ResponseHead, Body]:
        """Send `head` and `body`, return the response head and its streamed body. UpstreamReset when the
        connection breaks before the response head (`retryable` if the connection had been used before and
        not a byte of response arrived)."""
        if not self.available:
            raise RuntimeError("Http1ClientConnection.request() while a request is in flight or after close")
        self.available = False
        reused = self.requests > 0
        self.requests += 1
        self._on_done = on_done
        self._response_done = False
        self._writer_error = None
        inp = self._input
        inp.skip_body = head.method == "HEAD"
        received = inp.received
        try:
            data, framing = serialize_request(head, body.length)
            pending = [data]
            encoder = BodyEncoder(framing, body.length)
            complete = framing == NO_BODY or take_ready(encoder, body, pending)
            try:
                await write_all(self._stream, pending, self._limits.coalesce_limit)
            except STREAM_ERRORS as exc:
                complete = True
                self._writer_error = exc  # the response may still be readable (an early answer, then close)
            if not complete:
                self._writer = self._tasks.spawn(self._write_rest(encoder, body),
                                                 f"http1 request body {head.path_only}")
            elif framing == NO_BODY:
                await body.aclose()
            try:
                msg = await self._response_head()
            except HttpError as exc:
                if isinstance(self._writer_error, HttpError):
                    raise self._writer_error from exc  # the request body failed (e.g. the downstream reset)
                retryable = reused and inp.received == received
                raise UpstreamReset(f"upstream connection broke before the response: {exc}",
                                    retryable=retryable) from exc
        except BaseException:
            self._fail()  # also on cancellation: a half-sent request leaves the connection unusable
            raise
        self._keep_alive = msg.keep_alive and not inp.unclean
        response = response_head(msg)
        if head.method == "HEAD" or msg.status in (204, 304):
            length: int | None = 0
        else:
            length = _content_length(msg) if msg.framed else None
        response_body = _ResponseBody(self, length)
        if length == 0:
            response_body.read_nowait()  # consume the end now: the connection is free as soon as possible
        return response, response_body

    async def _response_head(self) -> _Message:
        while True:
            msg = await self._input.next_head()
            if msg is None:
                raise StreamReset("the upstream closed the connection without a response", "connection_lost")
            if msg.status >= 200:
                return msg
            if msg.status == 101:
                raise ProtocolError("the upstream switched protocols, which was not asked for", "protocol_error")

    async def _write_rest(self, encoder: BodyEncoder, body: Body) -> None:
        try:
            await write_body(self._stream, encoder, body, [], self._limits)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._writer_error = exc
            log.debug("request body not sent completely: %r", exc)
            await body.aclose()
            if not self._response_done:
                self._stream.abort()  # the upstream must not take a truncated body for a complete one
            return
        finally:
            self._writer = None
        if self._response_done:
            self._exchange_over()

    def _response_finished(self) -> None:
        self._response_done = True
        if self._writer is None:
            self._exchange_over()
        else:  # the upstream answered before taking the whole request body: it cannot be reused
            self._keep_alive = False
            self._fail()

    def _exchange_over(self) -> None:
        if self._keep_alive and self._writer_error is None and not self.closed:
            self.available = True
            self._notify()
        else:
            self._fail()

    def _fail(self) -> None:
        """The exchange ends and the connection closes."""
        if not self.closed:
            self.closed = True
            self.available = False
            writer = self._writer
            if writer is not None and not writer.done() and writer is not asyncio.current_task():
                writer.cancel()
            self._stream.close()
        self._notify()

    def _notify(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    async def close(self) -> None:
        self._fail()
        await self._tasks.cancel_all()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "idle" if self.available else "busy"
        return f"<Http1ClientConnection {state} requests={self.requests}>"
