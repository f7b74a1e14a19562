"""A small asyncio HTTP/1.1 server for admin-style ports (ztunnel's and the waypoint's 15000, 15020 and
15021, PROTOCOLS.md §1, §10), and a one-shot client for reading such pages.

Why not aiohttp: importing it costs a process about 10 MB of RSS (bench/README.md), and these ports need
little: routes by method and path, the query string, small request bodies, whole JSON or text responses,
keep-alive. So this module speaks exactly that:

- requests: origin-form (or absolute-form) targets, `Content-Length` or chunked bodies up to
  `HttpLimits.max_body_bytes`, `Expect: 100-continue`, pipelining (answered in order), HTTP/1.0 and 1.1
  keep-alive rules; `HEAD` is answered by the `GET` route without the body;
- responses: always whole, with `Content-Length`; unknown path → 404, known path with another method →
  405 with `Allow`; a malformed request → 400 (431 for a head over the limit, 413 for a body over it,
  408 for a head that does not arrive in time) with a one-line reason and no traceback, then the
  connection closes; a handler that raises → 500 naming the exception, the traceback goes to the log.

Handlers may be plain functions or coroutines; they run on the loop that owns the server, one request at
a time per connection, so they must be short (render a page, flip a flag). What this module must not do:
stream, upgrade, serve TLS, or sit on a data path.
"""

from __future__ import annotations

import asyncio
import http
import inspect
import json
import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambient.telemetry import logs

log = logging.getLogger("ambient.admin_http")

TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"

MAX_HEAD_BYTES = 16 * 1024  # request line + headers; an admin request is a path and a few headers (aiohttp: 8190/line)
MAX_HEADERS = 100  # header lines per request, as aiohttp and Go's net/http default to about
MAX_BODY_BYTES = 1024 * 1024  # admin requests carry no real bodies; 1 MiB leaves room for a posted config
HEAD_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its head: a slow client holds no slot longer
BODY_TIMEOUT = 30.0  # seconds to receive a request body once its head arrived
IDLE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open (aiohttp's keepalive_timeout)
READ_CHUNK = 64 * 1024  # bytes per socket read
LINGER_TIMEOUT = 1.0  # seconds to drain a client's unread input after an error answer, before closing
LINGER_READS = 64  # reads (of READ_CHUNK) drained at most while lingering
FETCH_TIMEOUT = 2.0  # seconds, whole exchange, for `fetch` (admin pages on loopback answer in milliseconds)
FETCH_MAX_BODY = 64 * 1024 * 1024  # bytes a fetched page may have (a config dump of a large cluster)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than tab


# -- errors -------------------------------------------------------------------------------------------------
class AdminHttpError(Exception):
    """Base of this module's errors; `reason` is stable (log field / metric label)."""

    reason = "admin_http"


class BadRequest(AdminHttpError):
    """The peer sent something this server will not take; answered with `status` and the message."""

    reason = "bad_request"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ListenError(AdminHttpError, OSError):
    """The listening socket could not be opened (address taken, not local, no permission). An OSError, so
    that a process's start-up handler for socket errors reports it as one."""

    reason = "listen_failed"


class FetchError(AdminHttpError):
    """`fetch` got no usable answer: refused, timed out, closed early or not HTTP."""

    reason = "fetch_failed"


# -- limits, requests, responses ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpLimits:
    max_head_bytes: int = MAX_HEAD_BYTES
    max_headers: int = MAX_HEADERS
    max_body_bytes: int = MAX_BODY_BYTES
    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and header block (header names lower-case, in order, repeats kept)."""

    method: str
    target: str
    version: str  # "HTTP/1.1" | "HTTP/1.0"
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """All values of `name` joined with ", " (RFC 9110 §5.3), or None."""
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class Request:
    """What a handler gets. `query` has the first value of each parameter (blank values kept: `?level=` is
    `""`), `query_all` every value; `headers` joins repeated names with ", "."""

    method: str
    path: str  # percent-decoded, without the query
    query: Mapping[str, str] = field(default_factory=dict)
    query_all: Mapping[str, Sequence[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    peer: str = ""  # "ip:port" of the client, "" when unknown
    version: str = "HTTP/1.1"


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = TEXT
    headers: tuple[tuple[str, str], ...] = ()  # extra headers (not Content-Length / Connection)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def text_response(text: str, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, text.encode(), TEXT, tuple(headers))


def json_response(document: Any, status: int = 200, *, indent: int | None = 2) -> Response:
    return Response(status, json.dumps(document, indent=indent).encode(), JSON)


Handler = Callable[[Request], Response | Awaitable[Response]]


# -- routing ------------------------------------------------------------------------------------------------
class Router:
    """Exact paths → {method → handler}. `get` routes also answer HEAD."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}

    def add(self, methods: str | Iterable[str], path: str, handler: Handler) -> None:
        if not path.startswith("/"):
            raise ValueError(f"route path {path!r} must start with /")
        names = [methods] if isinstance(methods, str) else list(methods)
        by_method = self._routes.setdefault(path, {})
        for method in (name.upper() for name in names):
            if method in by_method:
                raise ValueError(f"{method} {path} is already routed")
            by_method[method] = handler

    def get(self, path: str, handler: Handler) -> None:
        self.add("GET", path, handler)

    def post(self, path: str, handler: Handler) -> None:
        self.add("POST", path, handler)

    @property
    def paths(self) -> list[str]:
        return list(self._routes)

    def resolve(self, method: str, path: str) -> Handler | Response:
        """The handler, or the 404/405 answer."""
        by_method = self._routes.get(path)
        if by_method is None:
            return text_response(f"404 not found: {path}\n", 404)
        handler = by_method.get(method) or (by_method.get("GET") if method == "HEAD" else None)
        if handler is not None:
            return handler
        allowed = sorted({*by_method, *(["HEAD"] if "GET" in by_method else [])})
        return text_response(f"405 method not allowed: use {' or '.join(allowed)} {path}\n", 405,
                             [("Allow", ", ".join(allowed))])


# -- endpoints every admin port has ---------------------------------------------------------------------------
def log_level(request: Request) -> Response:
    """`GET|POST /logging[?level=<spec>]` (Envoy's and ztunnel's admin verb): set the level when asked,
    then say what it is; an invalid spec is a 400 naming the accepted levels and changes nothing."""
    level = request.query.get("level")
    if level:
        try:
            logs.set_level(level)
        except ValueError as exc:
            return text_response(f"{exc}\n", 400)
        log.info("log level set to %s", logs.current_level())
    return text_response(f"current log level is {logs.current_level()}\n")


# -- the wire format (pure) ---------------------------------------------------------------------------------
def find_head_end(buffer: bytes | bytearray) -> int:
    """Index just past the blank line ending a head (CRLF CRLF, or bare LF LF from hand-typed requests),
    or -1."""
    ends = [i + n for i, n in ((buffer.find(b"\r\n\r\n"), 4), (buffer.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


def parse_header_lines(lines: Sequence[bytes], max_headers: int = MAX_HEADERS) -> tuple[tuple[str, str], ...]:
    """`name: value` lines → ((lower-case name, value), ...); BadRequest for anything else."""
    if len(lines) > max_headers:
        raise BadRequest(f"too many header lines ({len(lines)}, at most {max_headers})", 431)
    headers: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            if line[:1] in (b" ", b"\t"):
                raise BadRequest("folded header lines (obs-fold) are not accepted")
            raise BadRequest(f"malformed header line {_show(line)}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise BadRequest(f"control character in the value of header {name.decode()!r}")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return tuple(headers)


def _split_lines(head: bytes | bytearray) -> list[bytes]:
    return [line.removesuffix(b"\r") for line in bytes(head).rstrip(b"\r\n").split(b"\n")]


def parse_request_head(head: bytes | bytearray, max_headers: int = MAX_HEADERS) -> RequestHead:
    """A request head (up to and including its blank line; leading blank lines are skipped, RFC 9112
    §2.2) → RequestHead; BadRequest (status 400, 431 or 505) for anything malformed."""
    lines = _split_lines(bytes(head).lstrip(b"\r\n"))
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise BadRequest(f"malformed request line {_show(lines[0])}: expected '<METHOD> <path> HTTP/1.1'")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(f"malformed method {_show(method)}")
    if not _VERSION.fullmatch(version):
        if version.startswith(b"HTTP/"):
            raise BadRequest(f"{_show(version)} is not supported: use HTTP/1.1", 505)
        raise BadRequest(f"malformed request line {_show(lines[0])}: expected '<METHOD> <path> HTTP/1.1'")
    if _BAD_VALUE.search(target) or b"\t" in target:
        raise BadRequest("control character in the request target")
    return RequestHead(method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"),
                       parse_header_lines(lines[1:], max_headers))


def _show(data: bytes) -> str:
    text = repr(data[:80])[2:-1]
    return f"'{text}...'" if len(data) > 80 else f"'{text}'"


@dataclass(frozen=True)
class BodyFraming:
    """How a message's body is delimited: a length, chunked, or (responses only) until EOF."""

    length: int | None = 0
    chunked: bool = False


def body_framing(head: RequestHead) -> BodyFraming:
    """RFC 9112 §6.3 for requests; both Transfer-Encoding and Content-Length (a smuggling attempt or a
    broken client) → 400; a coding other than chunked → 501."""
    return _framing(head.header("transfer-encoding"), head.header("content-length"), request=True)


def _framing(transfer_encoding: str | None, content_length: str | None, *, request: bool) -> BodyFraming:
    if transfer_encoding is not None:
        if content_length is not None:
            raise BadRequest("both Transfer-Encoding and Content-Length: send one of them")
        codings = [c.strip().lower() for c in transfer_encoding.split(",")]
        if codings != ["chunked"]:
            raise BadRequest(f"transfer coding {transfer_encoding!r} is not supported: use chunked or "
                             "Content-Length", 501)
        return BodyFraming(None, chunked=True)
    if content_length is None:
        return BodyFraming(0 if request else None)
    values = {v.strip() for v in content_length.split(",")}
    if len(values) != 1 or not (value := values.pop()).isdigit() or len(value) > 18:
        raise BadRequest(f"invalid Content-Length {content_length!r}")
    return BodyFraming(int(value))


def split_target(target: str) -> tuple[str, dict[str, str], dict[str, list[str]]]:
    """Request target → (decoded path, first value per query name, every value per name)."""
    if target == "*":
        return "*", {}, {}
    if not target.startswith("/"):  # absolute-form (RFC 9112 §3.2.2), e.g. through a proxy
        parts = urllib.parse.urlsplit(target)
        if not parts.scheme or not parts.netloc:
            raise BadRequest(f"malformed request target {target[:80]!r}: expected a path like /config_dump")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    raw_path, _, raw_query = target.partition("?")
    path = urllib.parse.unquote(raw_path)
    query_all: dict[str, list[str]] = {}
    for name, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True):
        query_all.setdefault(name, []).append(value)
    return path, {name: values[0] for name, values in query_all.items()}, query_all


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(epoch: float) -> str:
    """IMF-fixdate (RFC 9110 §5.6.7), locale-independent."""
    t = time.gmtime(epoch)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def encode_response(response: Response, *, keep_alive: bool, head_only: bool = False,
                    now: float | None = None) -> bytes:
    """The bytes of a whole response. 1xx/204/304 carry no body and no Content-Length."""
    status = response.status
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", f"Date: {http_date(time.time() if now is None else now)}"]
    bodyless = status < 200 or status in (204, 304)
    if response.content_type and not bodyless:
        lines.append(f"Content-Type: {response.content_type}")
    for name, value in response.headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}")
    if not bodyless:
        lines.append(f"Content-Length: {len(response.body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or bodyless else head + response.body


def wants_keep_alive(head: RequestHead) -> bool:
    """HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with `keep-alive`."""
    tokens = {t.strip().lower() for t in (head.header("connection") or "").split(",")}
    if head.version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


# -- buffered reading over an asyncio stream ----------------------------------------------------------------
class _Input:
    """A StreamReader with our own buffer: lets the server tell an idle connection from a slow head, and
    keeps pipelined bytes for the next request."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.buffer = bytearray()

    async def fill(self) -> bool:
        chunk = await self._reader.read(READ_CHUNK)
        self.buffer += chunk
        return bool(chunk)

    async def head(self, max_bytes: int) -> bytes | None:
        """The next head (None at EOF before any byte of it); BadRequest past `max_bytes`."""
        while True:
            stripped = len(self.buffer) - len(self.buffer.lstrip(b"\r\n"))
            if stripped:
                del self.buffer[:stripped]
            end = find_head_end(self.buffer)
            if end >= 0:
                if end > max_bytes:
                    raise BadRequest(f"request head over {max_bytes} bytes", 431)
                head = bytes(self.buffer[:end])
                del self.buffer[:end]
                return head
            if len(self.buffer) > max_bytes:
                raise BadRequest(f"request head over {max_bytes} bytes", 431)
            if not await self.fill():
                if self.buffer:
                    raise BadRequest("connection closed in the middle of a request head")
                return None

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self.fill():
                raise BadRequest("connection closed in the middle of a body")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def line(self, max_bytes: int = 4096) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > max_bytes:
                raise BadRequest(f"chunk line over {max_bytes} bytes")
            if not await self.fill():
                raise BadRequest("connection closed in the middle of a chunked body")
        line = bytes(self.buffer[:end]).removesuffix(b"\r")
        del self.buffer[: end + 1]
        return line

    async def rest(self, max_bytes: int) -> bytes:
        while await self.fill():
            if len(self.buffer) > max_bytes:
                raise BadRequest(f"body over {max_bytes} bytes", 413)
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def body(self, framing: BodyFraming, max_bytes: int) -> bytes:
        if framing.chunked:
            return await self.chunked(max_bytes)
        if framing.length is None:
            return await self.rest(max_bytes)
        if framing.length > max_bytes:
            raise BadRequest(f"body of {framing.length} bytes is over the limit of {max_bytes}", 413)
        return await self.exactly(framing.length)

    async def chunked(self, max_bytes: int) -> bytes:
        body = bytearray()
        while True:
            size_text = (await self.line()).split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise BadRequest(f"malformed chunk size {_show(size_text)}")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(MAX_HEADERS + 1):  # trailers: read and dropped
                    if not await self.line():
                        return bytes(body)
                raise BadRequest("too many trailer lines", 431)
            if len(body) + size > max_bytes:
                raise BadRequest(f"body over {max_bytes} bytes", 413)
            body += await self.exactly(size)
            if await self.line() != b"":
                raise BadRequest("chunk data longer than its size")


async def _linger(inp: _Input, writer: asyncio.StreamWriter) -> None:
    """After an error answer: half-close, then discard what the client still sends (briefly), so that the
    close does not reset the connection before the client has read the answer (RFC 9112 §9.6)."""
    if writer.can_write_eof():
        writer.write_eof()
    try:
        async with asyncio.timeout(LINGER_TIMEOUT):
            for _ in range(LINGER_READS):
                inp.buffer.clear()
                if not await inp.fill():
                    return
    except TimeoutError:
        pass


# -- the server ---------------------------------------------------------------------------------------------
def _why(exc: OSError) -> str:
    """"Connection refused" rather than asyncio's "Multiple exceptions: [Errno 111] Connect call failed ..."."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _host_port(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return ""


class HttpServer:
    """Serves a `Router` on `address` (host, port; port 0 picks one) or, given to `start`, on a socket
    already listening. `port` is the bound port once started."""

    def __init__(self, router: Router, address: tuple[str, int] = ("127.0.0.1", 0), *, what: str = "admin server",
                 limits: HttpLimits | None = None) -> None:
        self.router = router
        self.address = address
        self.what = what
        self.limits = limits or HttpLimits()
        self.port = address[1]
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen (ListenError when the address cannot be bound); with `sock`, accept on it instead (it is
        closed by `close`)."""
        try:
            if sock is not None:
                self._server = await asyncio.start_server(self._connection, sock=sock, limit=READ_CHUNK)
            else:
                host, port = self.address
                self._server = await asyncio.start_server(self._connection, host, port, reuse_address=True,
                                                          limit=READ_CHUNK)
        except OSError as exc:
            where = _host_port(sock.getsockname()) if sock is not None else _host_port(self.address)
            raise ListenError(f"cannot listen on {where} for the {self.what}: {_why(exc)}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("%s listening on %s", self.what, _host_port(self._server.sockets[0].getsockname()))

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def close(self) -> None:
        """Stop accepting and end every open connection (a request being handled is cancelled)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()

    # -- one connection ---------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = _host_port(writer.get_extra_info("peername"))
        try:
            await self._serve(_Input(reader), writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer
        except asyncio.CancelledError:
            pass  # close(): the connection ends with the server
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _serve(self, inp: _Input, writer: asyncio.StreamWriter, peer: str) -> None:
        limits = self.limits
        while True:
            if not inp.buffer:  # keep-alive: wait for the next request to start
                try:
                    async with asyncio.timeout(limits.idle_timeout):
                        if not await inp.fill():
                            return
                except TimeoutError:
                    return
            try:
                try:
                    async with asyncio.timeout(limits.head_timeout):
                        raw = await inp.head(limits.max_head_bytes)
                except TimeoutError:
                    raise BadRequest(f"request head not received within {limits.head_timeout:g}s", 408) from None
                if raw is None:
                    return
                head = parse_request_head(raw, limits.max_headers)
                request, keep_alive = await self._read_request(inp, writer, head, peer)
            except BadRequest as exc:
                log.debug("%s: bad request from %s: %s", self.what, peer or "?", exc)
                writer.write(encode_response(text_response(f"{exc}\n", exc.status), keep_alive=False))
                await writer.drain()
                await _linger(inp, writer)
                return
            response = await self._dispatch(request)
            writer.write(encode_response(response, keep_alive=keep_alive, head_only=request.method == "HEAD"))
            await writer.drain()
            if not keep_alive:
                return

    async def _read_request(self, inp: _Input, writer: asyncio.StreamWriter, head: RequestHead,
                            peer: str) -> tuple[Request, bool]:
        framing = body_framing(head)
        path, query, query_all = split_target(head.target)
        if framing.length is not None and framing.length > self.limits.max_body_bytes:
            raise BadRequest(f"body of {framing.length} bytes is over the limit of {self.limits.max_body_bytes}",
                             413)
        if (framing.chunked or framing.length) and (head.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                body = await inp.body(framing, self.limits.max_body_bytes)
        except TimeoutError:
            raise BadRequest(f"request body not received within {self.limits.body_timeout:g}s", 408) from None
        headers: dict[str, str] = {}
        for name, value in head.headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        request = Request(head.method, path, query, query_all, headers, body, peer, head.version)
        return request, wants_keep_alive(head)

    async def _dispatch(self, request: Request) -> Response:
        handler = self.router.resolve(request.method, request.path)
        if isinstance(handler, Response):
            return handler
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s %s failed", self.what, request.method, request.path)
            return text_response(f"500 internal error in {request.method} {request.path}: "
                                 f"{type(exc).__name__}: {exc}\n", 500)
        if not isinstance(result, Response):
            log.error("%s: the handler of %s %s returned %s, not a Response", self.what, request.method,
                      request.path, type(result).__name__)
            return text_response(f"500 internal error in {request.method} {request.path}\n", 500)
        return result


# -- a one-shot client --------------------------------------------------------------------------------------
def _fetch_url(host: str, port: int, path: str) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


async def fetch(host: str, port: int, path: str, *, method: str = "GET", body: bytes = b"",
                headers: Iterable[tuple[str, str]] = (), timeout: float = FETCH_TIMEOUT,
                max_body: int = FETCH_MAX_BODY) -> tuple[int, bytes]:
    """One request on a fresh connection (`Connection: close`) → (status, body). FetchError when there is
    no answer within `timeout` seconds, the connection fails, or the answer is not HTTP/1.x."""
    url = _fetch_url(host, port, path)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url.split('/')[2]}", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{n}: {v}" for n, v in headers)]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK)
            writer.write(request)
            await writer.drain()
            inp = _Input(reader)
            while True:
                raw = await inp.head(MAX_HEAD_BYTES)
                if raw is None:
                    raise FetchError(f"{method} {url}: the server closed the connection without an answer")
                status, response_headers = _parse_status_head(raw)
                if status >= 200:
                    break
            if method == "HEAD" or status in (204, 304):
                return status, b""
            framing = _framing(_joined(response_headers, "transfer-encoding"),
                               _joined(response_headers, "content-length"), request=False)
            return status, await inp.body(framing, max_body)
    except TimeoutError:
        raise FetchError(f"{method} {url}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise FetchError(f"{method} {url}: {_why(exc)}") from None
    except BadRequest as exc:
        raise FetchError(f"{method} {url}: malformed answer: {exc}") from None
    finally:
        if writer is not None:
            writer.close()


def _joined(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in headers if n == name]
    return ", ".join(values) if values else None


def _parse_status_head(raw: bytes) -> tuple[int, tuple[tuple[str, str], ...]]:
    lines = _split_lines(raw)
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if not _VERSION.fullmatch(version) or not code.isdigit() or len(code) != 3:
        raise BadRequest(f"not an HTTP/1.x status line: {_show(lines[0])}")
    return int(code), parse_header_lines(lines[1:])


# -- readiness ------------------------------------------------------------------------------------------
class Readiness:
    """Ready once every named component has called `mark_ready` (ztunnel: xDS synced, ZDS snapshot; the
    waypoint: certificate, xDS, L7 config). `status()` is the 15021 answer; calling it gives `(ready, why
    not)`."""

    def __init__(self, pending: Iterable[str] = ()) -> None:
        self.pending: set[str] = set(pending)

    def mark_pending(self, name: str) -> None:
        self.pending.add(name)

    def mark_ready(self, name: str) -> None:
        self.pending.discard(name)

    @property
    def ready(self) -> bool:
        return not self.pending

    def __call__(self) -> tuple[bool, str]:
        return self.ready, f"pending: {', '.join(sorted(self.pending))}" if self.pending else ""

    def status(self) -> tuple[int, str]:
        if self.ready:
            return 200, "ready\n"
        return 500, f"not ready, pending: {', '.join(sorted(self.pending))}\n"
