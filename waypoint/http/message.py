"""The waypoint's HTTP message model, shared by HTTP/1.1 and HTTP/2, servers and clients, and every part of
the proxy: `Headers`, `RequestHead`, `ResponseHead`, streamed `Body`s, the `ByteStream` seam the codecs run
over, and `HttpLimits`, the one config object of this package.

Conventions every codec keeps:
- Header names are lower-case; values are `str` decoded as latin-1, so any byte survives a round trip.
- Heads carry no pseudo-headers and no hop-by-hop headers (`HOP_BY_HOP`, plus whatever `Connection`
  names); `te` survives only as `te: trailers`. The authority lives in `RequestHead.authority`, not in a
  `host` header.
- Framing belongs to the writer: `content-length` may be present in a head (it is informative, e.g. for a
  HEAD response) but the writer sets it from `Body.length` when it writes a body, and chooses chunked
  encoding (HTTP/1.1) or plain DATA frames (HTTP/2) when the length is unknown.

Nothing here does I/O except `TcpByteStream`, the asyncio-streams adapter for tests and benches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs

from ambient.hbone.errors import HboneError
from waypoint.http.errors import BodyTooLarge

KiB = 1 << 10
MiB = 1 << 20

# Hop-by-hop headers (RFC 9110 §7.6.1), stripped on the way in and never written from a head; `te` is
# kept when it is exactly "trailers" (gRPC needs it end to end). `http2-settings` belongs to an h2c upgrade.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
                        "http2-settings"})

# What a broken ByteStream raises: sockets raise OSError, HBONE tunnels HboneError.
STREAM_ERRORS: tuple[type[BaseException], ...] = (OSError, HboneError)

# HttpLimits defaults, each with its reason.
MAX_HEADER_BYTES = 64 * KiB  # request/status line + headers; Envoy's max_request_headers_kb is 60 KiB
MAX_HEADERS = 100  # Envoy's max_headers_count default
IDLE_TIMEOUT = 3600.0  # seconds a connection with no request in flight is kept (Envoy/Istio idle_timeout: 1 h)
READ_SIZE = 256 * KiB  # bytes per ByteStream.read: large enough that a 1 MiB DATA frame takes 4 reads
DRAIN_LIMIT = 256 * KiB  # unread request body discarded after an early response before we close instead
COALESCE_LIMIT = 64 * KiB  # a head and a body chunk up to this size go out in one write (one copy)
H2_STREAM_WINDOW = 1 * MiB  # initial HTTP/2 stream window we grant (brief: 1 MiB; Envoy's default is 256 MiB)
H2_CONNECTION_WINDOW = 4 * MiB  # connection window: four streams at full speed, bounded memory per peer
H2_MAX_FRAME_SIZE = 1 * MiB  # largest DATA frame we accept: fewer frames, less per-frame Python work
H2_MAX_CONCURRENT_STREAMS = 1024  # what our server advertises (Envoy: unbounded); bounds tasks per connection
H2_ASSUMED_PEER_STREAMS = 100  # streams a client opens before the server's SETTINGS arrive (RFC 9113's floor)
H2_WRITE_BUFFER = 1 * MiB  # queued HTTP/2 output above which body writers wait for the stream to drain


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Every tunable of the HTTP layer; defaults are the named constants above."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS
    idle_timeout: float = IDLE_TIMEOUT
    read_size: int = READ_SIZE
    drain_limit: int = DRAIN_LIMIT
    coalesce_limit: int = COALESCE_LIMIT
    h2_stream_window: int = H2_STREAM_WINDOW
    h2_connection_window: int = H2_CONNECTION_WINDOW
    h2_max_frame_size: int = H2_MAX_FRAME_SIZE
    h2_max_concurrent_streams: int = H2_MAX_CONCURRENT_STREAMS
    h2_write_buffer: int = H2_WRITE_BUFFER


DEFAULT_LIMITS = HttpLimits()


class Headers:
    """An ordered multi-map of header fields; names are stored lower-case, values are str."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(name.lower(), value) for name, value in items]

    @classmethod
    def from_lowered(cls, items: list[tuple[str, str]]) -> Headers:
        """Adopt `items` (names already lower-case) without copying: for codecs."""
        headers = cls.__new__(cls)
        headers._items = items
        return headers

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def set(self, name: str, value: str) -> None:
        """Replace every value of `name` with one, kept where the first one was."""
        name = name.lower()
        items = self._items
        for index, (key, _) in enumerate(items):
            if key == name:
                items[index] = (name, value)
                items[index + 1:] = [item for item in items[index + 1:] if item[0] != name]
                return
        items.append((name, value))

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower(), value))

    def remove(self, name: str) -> None:
        name = name.lower()
        self._items = [item for item in self._items if item[0] != name]

    def items(self) -> list[tuple[str, str]]:
        """The fields in order (the list itself: do not modify)."""
        return self._items

    def copy(self) -> Headers:
        return Headers.from_lowered(list(self._items))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        return any(key == name for key, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(slots=True)
class RequestHead:
    method: str
    path: str  # origin-form including the query ("/productpage?u=1"); "*" for OPTIONS *
    authority: str  # Host (HTTP/1.1) or :authority (HTTP/2)
    headers: Headers
    scheme: str = "http"
    protocol: str = "HTTP/1.1"  # what the downstream spoke: "HTTP/1.1" (also for 1.0) or "HTTP/2"

    @property
    def path_only(self) -> str:
        """The path without query or fragment."""
        end = len(self.path)
        for mark in "?#":
            index = self.path.find(mark)
            if 0 <= index < end:
                end = index
        return self.path[:end]

    @property
    def query(self) -> dict[str, list[str]]:
        """Query parameters, decoded; blank values kept ("?a&b=" → {"a": [""], "b": [""]})."""
        _, mark, rest = self.path.partition("?")
        if not mark:
            return {}
        return parse_qs(rest.partition("#")[0], keep_blank_values=True)


class HeadersReader(Protocol):
    """Read access to a request's headers: all routing, security and load balancing need (`Headers` is one)."""

    def get(self, name: str, default: str | None = None) -> str | None: ...
    def get_all(self, name: str) -> list[str]: ...


class RequestHeadLike(Protocol):
    """What routing, security and load balancing read of a request (`RequestHead` is one)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def authority(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def headers(self) -> HeadersReader: ...


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers


class Body:
    """A request or response body, streamed. `read()` returns the next chunk, b"" at the end (then
    `trailers` holds the peer's trailers, if any). `length` is the declared length when known. `aclose()`
    discards the rest. Subclasses implement `read`; `read_nowait` lets writers coalesce data that is
    already here with the head (None = would have to wait)."""

    __slots__ = ("length", "trailers")

    def __init__(self, length: int | None = None, trailers: Headers | None = None) -> None:
        self.length = length
        self.trailers = trailers

    async def read(self) -> bytes:
        raise NotImplementedError

    def read_nowait(self) -> bytes | None:
        """The next chunk if it is available without waiting (b"" at the end), else None."""
        return None

    async def aclose(self) -> None:
        """Stop reading; the rest is discarded and the underlying stream or connection released."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


class BytesBody(Body):
    """A body held in memory: one chunk, then the end. Built by `bytes_body`."""

    __slots__ = ("_data", "_done")

    def __init__(self, data: bytes, trailers: Headers | None = None) -> None:
        super().__init__(len(data), trailers)
        self._data = data
        self._done = False

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def unread(self) -> bool:
        """Nothing was taken out yet, so the same bytes can be sent again (an empty body always can)."""
        return not self._done or not self._data

    async def read(self) -> bytes:
        return self._take()

    def read_nowait(self) -> bytes:
        return self._take()

    def _take(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return self._data

    async def aclose(self) -> None:
        self._done = True

    def replay(self) -> BytesBody:
        """A fresh copy to send again (retries, mirrors)."""
        return BytesBody(self._data, self.trailers.copy() if self.trailers is not None else None)


def bytes_body(data: bytes, trailers: Headers | None = None) -> Body:
    """An in-memory body. For retries and mirroring, buffer once (`read_all`) and build one per attempt."""
    return BytesBody(data, trailers)


EMPTY: Body = BytesBody(b"")


class _PrependedBody(Body):
    __slots__ = ("_first", "_rest")

    def __init__(self, first: bytes, rest: Body) -> None:
        super().__init__(rest.length, None)
        self._first = first
        self._rest = rest

    async def read(self) -> bytes:
        chunk = self.read_nowait()
        if chunk is None:
            chunk = await self._rest.read()
            self.trailers = self._rest.trailers
        return chunk

    def read_nowait(self) -> bytes | None:
        if self._first:
            first, self._first = self._first, b""
            return first
        chunk = self._rest.read_nowait()
        if chunk is not None:
            self.trailers = self._rest.trailers
        return chunk

    async def aclose(self) -> None:
        self._first = b""
        await self._rest.aclose()


def prepend(data: bytes, body: Body) -> Body:
    """`body` with `data` (bytes already read from it, e.g. `BodyTooLarge.data`) put back in front; the
    declared length stays `body.length`."""
    return _PrependedBody(data, body) if data else body


async def read_all(body: Body, limit: int) -> bytes:
    """The whole body (trailers stay on `body.trailers`). Past `limit` bytes: `BodyTooLarge`, whose `data`
    holds what was read; a declared length above `limit` fails before reading anything."""
    if body.length is not None and body.length > limit:
        raise BodyTooLarge(limit, b"")
    parts: list[bytes] = []
    size = 0
    while chunk := await body.read():
        size += len(chunk)
        parts.append(chunk)
        if size > limit:
            raise BodyTooLarge(limit, b"".join(parts))
    return parts[0] if len(parts) == 1 else b"".join(parts)


Handler = Callable[[RequestHead, Body], Awaitable[tuple[ResponseHead, Body]]]
"""What a server calls per request; it owns the request body and returns the response to write."""


class ByteStream(Protocol):
    """A bidirectional byte stream: a TCP connection or an HBONE tunnel (`ambient.hbone.HboneStream`).
    `read` returns b"" at EOF; a broken stream raises one of `STREAM_ERRORS`. One reader and one writer
    at a time."""

    async def read(self, max_bytes: int = -1) -> bytes: ...

    async def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class TcpByteStream:
    """`ByteStream` over asyncio streams (tests, benches, plaintext listeners)."""

    __slots__ = ("_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> TcpByteStream:
        reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
        return cls(reader, writer)

    @property
    def at_eof(self) -> bool:
        """The peer has closed and everything it sent was read (the pool skips such idle connections)."""
        return self._reader.at_eof() or self._writer.is_closing()

    async def read(self, max_bytes: int = -1) -> bytes:
        return await self._reader.read(max_bytes if max_bytes > 0 else READ_SIZE)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def write_eof(self) -> None:
        if not self._writer.is_closing() and self._writer.can_write_eof():
            self._writer.write_eof()

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()
