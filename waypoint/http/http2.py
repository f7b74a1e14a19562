"""HTTP/2 over a `ByteStream` with h2 (sans-IO): the downstream server (`serve_http2`, h2c with prior
knowledge: the preface arrives in `first`) and the upstream client (`Http2ClientConnection`).

Each connection has one reader (feeds h2, routes events to streams) and one writer task (writes whatever
h2 queued, so the frames of every stream produced in one loop iteration leave in one write). The server
runs each request's handler in its own task, so streams are served concurrently.

Flow control is real both ways. Inbound DATA is acknowledged to h2 only when a body reader takes it, so a
reader that stops makes the peer stop after one stream window (`HttpLimits.h2_stream_window`, 1 MiB) and
the connection after `h2_connection_window` (4 MiB); outbound DATA waits for the peer's window and for
our queued output to drain below `h2_write_buffer`, so a slow peer slows the body's producer.

Trailers pass both ways (gRPC's `grpc-status`): a body's `trailers` are sent as a trailing HEADERS frame
and received ones are set on the body when it ends. RST_STREAM from the peer makes body reads raise
`StreamReset` (`UpstreamReset` on the client, retryable for REFUSED_STREAM) and cancels the server's
handler task for that stream. GOAWAY is sent when a connection closes; a received GOAWAY(NO_ERROR) lets
the streams it covers finish and fails the others as retryable. Headers: `cookie` fields are joined with
"; " on the way in (RFC 9113 §8.2.3); CONNECT (plain or extended) is answered 501.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.events as ev
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes

from ambient.aio import OwnedTasks
from ambient.hbone.connection import _H2 as GoawayTolerantH2  # h2 with GOAWAY reported, not acted upon
from waypoint.http.errors import HttpError, ProtocolError, StreamReset, UpstreamReset
from waypoint.http.http1 import internal_error
from waypoint.http.message import (
    DEFAULT_LIMITS,
    H2_ASSUMED_PEER_STREAMS,
    HOP_BY_HOP,
    STREAM_ERRORS,
    Body,
    ByteStream,
    Handler,
    Headers,
    HttpLimits,
    RequestHead,
    ResponseHead,
    bytes_body,
)

log = logging.getLogger("waypoint.http.http2")

H2_DEFAULT_WINDOW = 65_535  # RFC 9113's initial windows; ours are raised from here
CLOSE_FLUSH_TIMEOUT = 5.0  # seconds the final frames (GOAWAY) may take to leave before the stream is cut
_STATUS = {status: str(status).encode() for status in range(100, 600)}
_NOT_FORWARDED = HOP_BY_HOP | {"host"}  # `host` is carried as :authority


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


def encode_fields(headers: Headers, out: list[tuple[bytes, bytes]], keep_length: bool) -> None:
    """Append `headers` as HPACK-ready byte pairs, without hop-by-hop fields (`te: trailers` stays) and, unless
    `keep_length`, without `content-length` (the writer sets it)."""
    for name, value in headers.items():
        if name in _NOT_FORWARDED or (name == "content-length" and not keep_length):
            if name == "te" and value == "trailers":
                out.append((b"te", b"trailers"))
            continue
        out.append((name.encode("latin-1"), _encode_value(value)))


def _encode_value(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def decode_fields(raw: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Pseudo-headers and regular fields of a received header block (names are lower-case: h2 checks)."""
    pseudo: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    cookies: list[str] = []
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if name[0] == ":":
            pseudo[name] = value
        elif name == "cookie":
            cookies.append(value)
        elif name in HOP_BY_HOP:
            if name == "te" and value == "trailers":
                fields.append((name, value))
        else:
            fields.append((name, value))
    if cookies:
        fields.append(("cookie", "; ".join(cookies)))
    return pseudo, fields


def _declared_length(fields: list[tuple[str, str]]) -> int | None:
    for name, value in fields:
        if name == "content-length":
            return int(value)  # h2 has validated it
    return None


class _Stream:
    """One HTTP/2 stream's state, shared by its body reader, its body writer and the connection."""

    __slots__ = ("chunks", "discard", "error", "id", "local_ended", "method", "on_done", "read_waiter",
                 "remote_ended", "reset", "response", "task", "trailers", "window_waiter")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.chunks: deque[bytes] = deque()
        self.remote_ended = False  # END_STREAM received: the body ended cleanly
        self.local_ended = False  # END_STREAM sent
        self.reset = False  # RST_STREAM sent or received
        self.discard = False  # the body reader is gone: acknowledge and drop what arrives
        self.error: HttpError | None = None
        self.trailers: Headers | None = None
        self.read_waiter: asyncio.Future[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None
        self.response: asyncio.Future[tuple[int, list[tuple[str, str]]]] | None = None  # client side
        self.task: asyncio.Task[None] | None = None  # server side: the handler's task
        self.on_done: Callable[[], None] | None = None
        self.method = ""

    def wake(self) -> None:
        for waiter in (self.read_waiter, self.window_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class _H2Body(Body):
    """A received body: DATA of one stream, acknowledged to h2 as it is read."""

    __slots__ = ("_conn", "_stream")

    def __init__(self, conn: _Connection, stream: _Stream, length: int | None) -> None:
        super().__init__(length)
        self._conn = conn
        self._stream = stream

    async def read(self) -> bytes:
        stream = self._stream
        chunks = stream.chunks
        while not chunks:
            if stream.remote_ended:
                self.trailers = stream.trailers
                return b""
            if stream.error is not None:
                raise stream.error.fresh()
            if stream.discard:
                return b""
            waiter = stream.read_waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                stream.read_waiter = None
        chunk = chunks.popleft()
        self._conn.acknowledge(stream.id, len(chunk))
        return chunk

    def read_nowait(self) -> bytes | None:
        stream = self._stream
        if stream.chunks:
            chunk = stream.chunks.popleft()
            self._conn.acknowledge(stream.id, len(chunk))
            return chunk
        if stream.remote_ended:
            self.trailers = stream.trailers
            return b""
        return None

    async def aclose(self) -> None:
        self._conn.discard(self._stream)


class _Connection:
    """What the server and the client share: the h2 state machine, the reader, the writer, flow control."""

    def __init__(self, stream: ByteStream, limits: HttpLimits, client_side: bool) -> None:
        self.stream = stream
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.h2 = GoawayTolerantH2(H2Configuration(client_side=client_side, header_encoding=None,
                                                   validate_outbound_headers=False,
                                                   normalize_outbound_headers=False))
        self.streams: dict[int, _Stream] = {}
        self.tasks = OwnedTasks(log)
        self.closed = False
        self.error: HttpError | None = None
        self.goaway_received: int | None = None
        self._closing = False  # the writer exits once the output is written
        self._writer_wake: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    # -- setup -----------------------------------------------------------------------------------
    def _initiate(self, extra: dict[SettingCodes | int, int]) -> None:
        h2 = self.h2
        h2.initiate_connection()
        settings: dict[SettingCodes | int, int] = {
            SettingCodes.INITIAL_WINDOW_SIZE: self.limits.h2_stream_window,
            SettingCodes.MAX_FRAME_SIZE: self.limits.h2_max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes, **extra}
        h2.update_settings(settings)
        # h2 sizes its frame buffer before handling the frames of a read, so the peer's first large DATA frame
        # arriving in the same read as its SETTINGS ACK would be refused (FRAME_SIZE_ERROR): accept our
        # advertised size from the start (being lenient early is harmless).
        h2.max_inbound_frame_size = self.limits.h2_max_frame_size
        if self.limits.h2_connection_window > H2_DEFAULT_WINDOW:
            h2.increment_flow_control_window(self.limits.h2_connection_window - H2_DEFAULT_WINDOW)
        self._writer = self.tasks.spawn(self._write_loop(), "http2 writer")

    # -- reading ---------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        """Feed h2 until the peer closes or the connection fails; then everything is torn down."""
        error: HttpError | None = None
        try:
            while not self.closed:
                data = await self.stream.read(self.limits.read_size)
                if not data:
                    break
                self.receive(data)
        except STREAM_ERRORS as exc:
            error = StreamReset(f"HTTP/2 connection lost: {exc}", "connection_lost")
        finally:
            self._lost(error or self.error or StreamReset("the HTTP/2 peer closed the connection", "connection_lost"))

    def receive(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2ProtocolError as exc:
            self.error = ProtocolError(f"HTTP/2 protocol error: {exc}", "protocol_error")
            log.debug("closing an HTTP/2 connection: %s", self.error)
            self.closed = True  # h2 has queued a GOAWAY naming the error; the reader stops
            self.kick()
            return
        streams = self.streams
        for event in events:
            if isinstance(event, ev.DataReceived):
                self._on_data(streams.get(event.stream_id or 0), event)
            elif isinstance(event, ev.WindowUpdated):
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.wake()
                else:
                    self._wake_writers()
            elif isinstance(event, ev.StreamEnded):
                stream = streams.get(event.stream_id or 0)
                if stream is not None:
                    stream.remote_ended = True
                    stream.wake()
                    self.maybe_finish(stream)
            elif isinstance(event, ev.TrailersReceived):
                stream = streams.get(event.stream_id or 0)
                if stream is not None:
                    stream.trailers = Headers.from_lowered(decode_fields(event.headers or [])[1])
            elif isinstance(event, ev.StreamReset):
                stream = streams.get(event.stream_id or 0)
                if stream is not None:
                    self._on_reset(stream, int(event.error_code or 0))
            elif isinstance(event, ev.RemoteSettingsChanged):
                if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._wake_writers()
                self._on_settings()
            elif isinstance(event, ev.ConnectionTerminated):
                self._on_goaway(int(event.error_code or 0), event.last_stream_id or 0)
            else:
                self._on_event(event)
        if self.h2._data_to_send:
            self.kick()

    def _on_data(self, stream: _Stream | None, event: ev.DataReceived) -> None:
        size = event.flow_controlled_length or 0
        data = event.data or b""
        if stream is None or stream.discard:
            self.acknowledge(event.stream_id or 0, size)
            return
        if size > len(data):
            self.acknowledge(event.stream_id or 0, size - len(data))  # padding
        if data:
            stream.chunks.append(data)
            waiter = stream.read_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _on_reset(self, stream: _Stream, code: int) -> None:
        stream.error = self._reset_error(stream, code)
        stream.reset = True
        self._fail_response(stream)
        stream.wake()
        self._release(stream)

    def _reset_error(self, stream: _Stream, code: int) -> HttpError:
        return StreamReset(f"the client reset HTTP/2 stream {stream.id} with {_code_name(code)}",
                           error_code=code)

    def _on_settings(self) -> None:
        """The peer's SETTINGS changed (the client watches MAX_CONCURRENT_STREAMS)."""

    def _on_event(self, event: ev.Event) -> None:
        """Events the subclasses handle (requests, responses)."""

    def _on_goaway(self, code: int, last_stream_id: int) -> None:
        self.goaway_received = last_stream_id
        if code != ErrorCodes.NO_ERROR:
            self.error = StreamReset(f"the HTTP/2 peer closed the connection with GOAWAY {_code_name(code)}",
                                     "goaway", error_code=code)
            self.closed = True
            return
        self._close_if_idle()

    def _wake_writers(self) -> None:
        for stream in self.streams.values():
            waiter = stream.window_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            if self.h2._data_to_send:
                self.kick()

    def discard(self, stream: _Stream) -> None:
        """The body reader is gone: return the credit of what is buffered and of what still arrives."""
        stream.discard = True
        if stream.chunks:
            size = sum(map(len, stream.chunks))
            stream.chunks.clear()
            self.acknowledge(stream.id, size)

    # -- writing ---------------------------------------------------------------------------------
    def kick(self) -> None:
        waiter = self._writer_wake
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _write_loop(self) -> None:
        h2 = self.h2
        try:
            while True:
                data = h2._data_to_send
                if not data:
                    drained = self._drained
                    if drained is not None and not drained.done():
                        drained.set_result(None)
                    if self._closing:
                        self.stream.close()  # after the last frames (GOAWAY); the reader sees the end
                        return
                    self._writer_wake = waiter = self.loop.create_future()
                    await waiter
                    continue
                h2._data_to_send = bytearray()  # data_to_send() without its copy (as ambient.hbone does)
                await self.stream.write(data)
        except STREAM_ERRORS as exc:
            self.error = self.error or StreamReset(f"HTTP/2 connection lost: {exc}", "connection_lost")
            self.closed = True
            self.stream.abort()  # the reader sees it and tears the connection down
        finally:
            drained = self._drained
            if drained is not None and not drained.done():
                drained.set_result(None)

    async def _drain(self) -> None:
        """Wait until our queued output is written (a slow peer slows the producers)."""
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()
        self.kick()
        await self._drained

    async def send_body(self, stream: _Stream, body: Body, chunk: bytes | None) -> None:
        """Send `body` (its first chunk may already be in hand) and end the stream, with its trailers."""
        if chunk is None:
            chunk = await body.read()
        while chunk:
            following = body.read_nowait()
            end = following == b"" and body.trailers is None
            await self.send_data(stream, chunk, end)
            if end:
                return
            chunk = following if following is not None else await body.read()
        self._check_open(stream)
        try:
            if body.trailers:
                fields: list[tuple[bytes, bytes]] = []
                encode_fields(body.trailers, fields, keep_length=True)
                self.h2.send_headers(stream.id, fields, end_stream=True)
            else:
                self.h2.end_stream(stream.id)
        except H2Error as exc:
            raise self._closed_error(stream, exc) from exc
        self._local_end(stream)

    async def send_data(self, stream: _Stream, data: bytes, end_stream: bool) -> None:
        h2 = self.h2
        size = len(data)
        view = memoryview(data)
        offset = 0
        while True:
            self._check_open(stream)
            try:
                window = h2.local_flow_control_window(stream.id)
            except H2Error as exc:
                raise self._closed_error(stream, exc) from exc
            if window <= 0:
                waiter = stream.window_waiter = self.loop.create_future()
                self.kick()  # what is queued must leave before the peer grants more
                try:
                    await waiter
                finally:
                    stream.window_waiter = None
                continue
            n = min(window, h2.max_outbound_frame_size, size - offset)
            last = offset + n == size
            try:
                h2.send_data(stream.id, data if n == size else view[offset:offset + n], end_stream=end_stream and last)
            except H2Error as exc:
                raise self._closed_error(stream, exc) from exc
            offset += n
            if last:
                break
        if end_stream:
            self._local_end(stream)
        self.kick()
        if len(h2._data_to_send) > self.limits.h2_write_buffer:
            await self._drain()

    def _check_open(self, stream: _Stream) -> None:
        if stream.error is not None:
            raise stream.error.fresh()
        if self.closed:
            raise self._lost_error().fresh()

    def _closed_error(self, stream: _Stream, exc: Exception) -> HttpError:
        error = stream.error or self.error
        return error.fresh() if error is not None else StreamReset(f"HTTP/2 stream {stream.id} is closed: {exc}",
                                                                   "stream_closed")

    def _local_end(self, stream: _Stream) -> None:
        stream.local_ended = True
        self.kick()
        self.maybe_finish(stream)

    def reset(self, stream: _Stream, code: ErrorCodes) -> None:
        """RST_STREAM (unless the stream is already over) and forget it."""
        if stream.error is None:
            stream.error = StreamReset(f"HTTP/2 stream {stream.id} was reset locally ({code.name})", "stream_closed",
                                       error_code=int(code))
        if not (stream.local_ended and stream.remote_ended) and not stream.reset and not self.closed:
            try:
                self.h2.reset_stream(stream.id, code)
            except H2Error:
                pass
            self.kick()
        stream.reset = True
        self.discard(stream)
        self._fail_response(stream)
        stream.wake()
        self._release(stream)

    # -- lifecycle -------------------------------------------------------------------------------
    def maybe_finish(self, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._release(stream)

    def _release(self, stream: _Stream) -> None:
        """The stream is over on the wire (its body may still hold unread data)."""
        if self.streams.pop(stream.id, None) is None:
            return
        self._stream_released(stream)
        on_done, stream.on_done = stream.on_done, None
        if on_done is not None:
            on_done()
        self._close_if_idle()

    def _stream_released(self, stream: _Stream) -> None:
        """Bookkeeping of subclasses (the client's stream count)."""

    def _close_if_idle(self) -> None:
        if self.goaway_received is not None and not self.streams and not self.closed:
            self.closed = True
            self.stream.close()  # the reader returns; _lost tears down

    def _fail_response(self, stream: _Stream) -> None:
        response = stream.response
        if response is not None and not response.done():
            response.set_exception((stream.error or self._lost_error()).fresh())
            response.exception()  # retrieved: the waiter may be gone

    def _lost_error(self) -> HttpError:
        return self.error or StreamReset("the HTTP/2 connection closed", "connection_lost")

    def _lost(self, error: HttpError) -> None:
        """The connection is gone: fail every stream, say GOAWAY if we still can, close the stream."""
        self.closed = True
        self._closing = True
        self.kick()
        if self.error is None:
            self.error = error
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            if stream.error is None:
                stream.error = self._stream_lost_error(stream)
            self._fail_response(stream)
            stream.wake()
            self._stream_released(stream)
            on_done, stream.on_done = stream.on_done, None
            if on_done is not None:
                on_done()
            if stream.task is not None:
                stream.task.cancel()
        self._on_closed()

    def _stream_lost_error(self, stream: _Stream) -> HttpError:
        return StreamReset(f"HTTP/2 stream {stream.id}: {self._lost_error()}", "connection_lost")

    def _on_closed(self) -> None:
        """The connection is gone (the client tells its pool)."""

    def say_goaway(self) -> None:
        """GOAWAY(NO_ERROR); the writer closes the stream once it is written."""
        self.closed = True
        try:
            self.h2.close_connection(last_stream_id=self.h2.highest_inbound_stream_id)
        except H2Error:
            pass
        self._closing = True
        self.kick()

    async def shutdown(self) -> None:
        """GOAWAY, let the writer flush for a bounded time, close the stream, cancel stream tasks."""
        self.say_goaway()
        writer = self._writer
        if writer is not None and not writer.done() and writer is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_FLUSH_TIMEOUT)
            except Exception:  # a timeout, or the writer failed (it logged why)
                pass
        self.stream.close()
        await self.tasks.cancel_all()


# -- server ----------------------------------------------------------------------------------------------
class _ServerConnection(_Connection):
    def __init__(self, stream: ByteStream, handler: Handler, limits: HttpLimits) -> None:
        super().__init__(stream, limits, client_side=False)
        self.handler = handler
        self.idle_since: float | None = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    async def run(self, first: bytes) -> None:
        self._initiate({SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.h2_max_concurrent_streams})
        self._idle_timer = self.loop.call_later(self.limits.idle_timeout, self._check_idle)
        try:
            if first:
                self.receive(first)
            await self._read_loop()
        finally:
            self._idle_timer.cancel()
            await self.shutdown()

    def _check_idle(self) -> None:
        now = self.loop.time()
        since = self.idle_since
        if since is not None and now - since >= self.limits.idle_timeout - 1e-3:
            log.debug("closing an HTTP/2 connection idle for %.0fs", now - since)
            self.say_goaway()
            return
        due = (since if since is not None else now) + self.limits.idle_timeout
        self._idle_timer = self.loop.call_at(due, self._check_idle)

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.RequestReceived) and event.stream_id is not None:
            self._on_request(event.stream_id, event.headers or [], event.stream_ended is not None)

    def _on_request(self, stream_id: int, raw: list[Any], ended: bool) -> None:
        stream = _Stream(stream_id)
        stream.remote_ended = ended
        self.streams[stream_id] = stream
        self.idle_since = None
        pseudo, fields = decode_fields(raw)
        method = pseudo.get(":method", "")
        stream.method = method
        authority = pseudo.get(":authority")
        if authority is None:
            authority = next((value for name, value in fields if name == "host"), "")
        fields = [field for field in fields if field[0] != "host"]
        head = RequestHead(method, pseudo.get(":path", ""), authority, Headers.from_lowered(fields),
                           pseudo.get(":scheme", "http"), "HTTP/2")
        body = _H2Body(self, stream, 0 if ended else _declared_length(fields))
        stream.task = self.tasks.spawn(self._serve(stream, head, body), f"http2 stream {stream_id}")

    async def _serve(self, stream: _Stream, head: RequestHead, body: _H2Body) -> None:
        try:
            if head.method == "CONNECT":
                response: ResponseHead = ResponseHead(501, Headers([("content-type", "text/plain")]))
                response_body: Body = bytes_body(b"CONNECT over HTTP/2 is not supported by this proxy\n")
            else:
                try:
                    response, response_body = await self.handler(head, body)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if stream.error is not None:
                        return  # the client reset the stream or the connection is gone: nobody to answer
                    log.error("handler failed for %s %s%s: %r", head.method, head.authority, head.path_only, exc,
                              exc_info=exc)
                    response, response_body = internal_error()
            try:
                await self._respond(stream, response, response_body)
            finally:
                await response_body.aclose()
        except Exception as exc:
            if stream.error is None:  # the response body failed (e.g. the upstream reset): cut the stream
                log.log(logging.DEBUG if isinstance(exc, HttpError) else logging.ERROR, "response to %s %s%s cut "
                        "short: %r", head.method, head.authority, head.path_only, exc)
                self.reset(stream, ErrorCodes.INTERNAL_ERROR)
        finally:
            if stream.id in self.streams:
                # A complete response while the client still sends: RST_STREAM(NO_ERROR) tells it to stop
                # (RFC 9113 §8.1); an incomplete one is cut.
                self.reset(stream, ErrorCodes.NO_ERROR if stream.local_ended else ErrorCodes.INTERNAL_ERROR)
            if not self.streams:
                self.idle_since = self.loop.time()

    async def _respond(self, stream: _Stream, response: ResponseHead, body: Body) -> None:
        status = response.status
        fields: list[tuple[bytes, bytes]] = [(b":status", _STATUS.get(status) or str(status).encode())]
        bodiless = stream.method == "HEAD" or status in (204, 304)
        encode_fields(response.headers, fields, keep_length=bodiless and status != 204)
        first: bytes | None = None
        if bodiless:
            if stream.method == "HEAD" and body.length is not None and "content-length" not in response.headers:
                fields.append((b"content-length", str(body.length).encode()))
            end = True
        else:
            if body.length is not None:
                fields.append((b"content-length", str(body.length).encode()))
            first = body.read_nowait()
            end = first == b"" and body.trailers is None
        self._check_open(stream)
        try:
            self.h2.send_headers(stream.id, fields, end_stream=end)
        except H2Error as exc:
            raise self._closed_error(stream, exc) from exc
        if end:
            self._local_end(stream)
            return
        self.kick()
        await self.send_body(stream, body, first)

    def _on_reset(self, stream: _Stream, code: int) -> None:
        super()._on_reset(stream, code)
        if stream.task is not None and stream.task is not asyncio.current_task():
            stream.task.cancel()  # the client gave up: so does the handler (and its upstream request)


async def serve_http2(stream: ByteStream, handler: Handler, *, first: bytes = b"",
                      limits: HttpLimits = DEFAULT_LIMITS) -> None:
    """Serve HTTP/2 (prior knowledge: `first` holds the client preface already read) until the client
    closes, sends GOAWAY and its streams finish, breaks the protocol, or the connection is idle for
    `limits.idle_timeout`. Ends with GOAWAY; the stream is closed on return."""
    await _ServerConnection(stream, handler, limits).run(first)


# -- client ----------------------------------------------------------------------------------------------
class Http2ClientConnection(_Connection):
    """An upstream HTTP/2 connection (h2c prior knowledge) over `stream`, multiplexing requests. `available`
    is False once the peer's SETTINGS_MAX_CONCURRENT_STREAMS streams are open (100 is assumed until its
    SETTINGS arrive), after a GOAWAY, or once closed. `on_close` (settable) is called when it closes."""

    def __init__(self, stream: ByteStream, *, limits: HttpLimits = DEFAULT_LIMITS) -> None:
        super().__init__(stream, limits, client_side=True)
        self.active = 0
        self.requests = 0
        self.max_streams = H2_ASSUMED_PEER_STREAMS
        self.on_close: Callable[[], None] | None = None
        self._initiate({SettingCodes.ENABLE_PUSH: 0})
        self._reader = self.tasks.spawn(self._read_loop(), "http2 client reader")

    @property
    def available(self) -> bool:
        return not self.closed and self.goaway_received is None and self.active < self.max_streams

    async def request(self, head: RequestHead, body: Body, *,
                      on_done: Callable[[], None] | None = None) -> tuple[ResponseHead, Body]:
        """Open a stream for `head`, send `body` (by a task when it is not all at hand), return the response
        head and its streamed body. UpstreamReset when the stream is reset or the connection breaks before
        the response head (`retryable` when the peer did not process it)."""
        if not self.available:
            raise UpstreamReset("the HTTP/2 connection cannot take another stream", "no_capacity", retryable=True)
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        fields: list[tuple[bytes, bytes]] = [
            (b":method", head.method.encode("latin-1")), (b":scheme", head.scheme.encode("latin-1")),
            (b":authority", _encode_value(head.authority)), (b":path", _encode_value(head.path))]
        encode_fields(head.headers, fields, keep_length=False)
        length = body.length
        first = body.read_nowait()
        end = first == b"" and body.trailers is None
        if length is not None and not (length == 0 and end and head.method in ("GET", "HEAD", "DELETE", "OPTIONS")):
            fields.append((b"content-length", str(length).encode()))
        stream = _Stream(stream_id)
        stream.method = head.method
        stream.on_done = on_done
        stream.response = self.loop.create_future()
        try:
            h2.send_headers(stream_id, fields, end_stream=end)
        except H2Error as exc:
            raise UpstreamReset(f"cannot open an HTTP/2 stream: {exc}", retryable=True) from exc
        self.streams[stream_id] = stream
        self.active += 1
        self.requests += 1
        try:
            if end:
                self._local_end(stream)
            else:
                self.kick()
                following = body.read_nowait() if first else None
                if first and following == b"" and body.trailers is None and \
                        len(first) <= h2.local_flow_control_window(stream_id):
                    await self.send_data(stream, first, True)  # all at hand and within the window: no task
                else:
                    if first and following:
                        first += following
                    stream.task = self.tasks.spawn(self._send_request_body(stream, body, first),
                                                   f"http2 request body {stream_id}")
            status, raw = await stream.response
        except BaseException:
            if stream.id in self.streams:
                self.reset(stream, ErrorCodes.CANCEL)  # cancelled, or the request body failed
            raise
        pseudo_less = Headers.from_lowered(raw)
        if head.method == "HEAD" or status in (204, 304) or (stream.remote_ended and not stream.chunks):
            response_length: int | None = 0
        else:
            response_length = _declared_length(raw)
        return ResponseHead(status, pseudo_less), _ClientBody(self, stream, response_length)

    async def _send_request_body(self, stream: _Stream, body: Body, first: bytes | None) -> None:
        try:
            await self.send_body(stream, body, first if first else None)
        except asyncio.CancelledError:
            raise
        except UpstreamReset:
            pass  # the response side reports it
        except Exception as exc:
            # The request body failed (e.g. the downstream reset): the upstream must not see a complete request.
            log.debug("request body of HTTP/2 stream %d not sent completely: %r", stream.id, exc)
            if stream.error is None:
                stream.error = exc if isinstance(exc, HttpError) else StreamReset(f"request body failed: {exc!r}")
                self.reset(stream, ErrorCodes.CANCEL)
        finally:
            await body.aclose()

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and stream.response is not None and not stream.response.done():
                pseudo, fields = decode_fields(event.headers or [])
                try:
                    status = int(pseudo.get(":status", ""))
                except ValueError:
                    self.reset(stream, ErrorCodes.PROTOCOL_ERROR)
                    return
                stream.response.set_result((status, fields))

    def _reset_error(self, stream: _Stream, code: int) -> HttpError:
        return UpstreamReset(f"the upstream reset HTTP/2 stream {stream.id} with {_code_name(code)}",
                             error_code=code, retryable=code == ErrorCodes.REFUSED_STREAM)

    def _stream_lost_error(self, stream: _Stream) -> HttpError:
        return UpstreamReset(f"upstream HTTP/2 connection lost: {self._lost_error()}", "connection_lost")

    def _on_goaway(self, code: int, last_stream_id: int) -> None:
        for stream in [stream for stream in self.streams.values() if stream.id > last_stream_id]:
            stream.error = UpstreamReset(f"the upstream is draining (GOAWAY) and did not process stream {stream.id}",
                                         "goaway", retryable=True)
            self.reset(stream, ErrorCodes.REFUSED_STREAM)
        super()._on_goaway(code, last_stream_id)
        if self.closed:
            self.stream.abort()

    def _on_settings(self) -> None:
        self.max_streams = self.h2.remote_settings.max_concurrent_streams

    def _stream_released(self, stream: _Stream) -> None:
        self.active -= 1

    def _on_closed(self) -> None:
        self.stream.close()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    async def close(self) -> None:
        if not self.closed:
            self._lost(StreamReset("the HTTP/2 connection was closed locally", "connection_closed"))
        await self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "draining" if self.goaway_received is not None else "open"
        return f"<Http2ClientConnection {state} active={self.active}/{self.max_streams} requests={self.requests}>"


class _ClientBody(_H2Body):
    """A response body; closing it early resets the stream (CANCEL)."""

    __slots__ = ()

    async def read(self) -> bytes:
        try:
            return await super().read()
        except UpstreamReset:
            raise
        except StreamReset as exc:
            raise UpstreamReset(str(exc), exc.reason, exc.error_code) from exc

    async def aclose(self) -> None:
        stream = self._stream
        if not stream.remote_ended and not stream.reset:
            self._conn.reset(stream, ErrorCodes.CANCEL)
        else:
            self._conn.discard(stream)
