"""One HBONE connection: HTTP/2 (h2, sans-IO) over a TLS `asyncio.Protocol` transport, shared by the client
and the server side (PROTOCOLS.md §6).

The data path is kept short: every `data_received` feeds h2 once, hands DATA to the streams' buffers and
ends with a single `transport.write` of whatever h2 produced. Received DATA is acknowledged to h2 only as
a stream's reader consumes it, so the 4 MiB stream / 16 MiB connection windows are real backpressure:
a peer can never make us buffer more than the windows, and a slow reader slows the remote writer.

DATA frames, nearly all the frames of a tunnel, take a short path around h2's per-frame machinery (frame
objects, two state machines, events): `data_received` splits the input into frames itself and hands a
DATA frame on an open stream straight to its `HboneStream`, doing the flow-control accounting h2 would
do; `HboneStream.write` appends DATA frames to h2's output buffer the same way. Every other frame, and a
DATA frame h2 would have to judge (END_STREAM, padding, a closed or unknown stream, a window exceeded,
an oversized or mid-header-block frame), goes through h2 unchanged and in order, so errors and state
transitions are h2's. Credit for consumed DATA is handed to h2 in steps of a quarter window per stream
and per connection (h2 itself sends WINDOW_UPDATE once half a window is consumed).

Keepalive: a PING every `ping_interval`; the connection is dropped when one stays unanswered for
`ping_timeout`. Drain: `goaway()` sends GOAWAY(NO_ERROR, last processed stream), lets the open streams
finish and closes the connection once the last one is done.

h2 moves its connection state machine to CLOSED on any GOAWAY and then refuses all further frames
(python-hyper/h2#1181), which would cut the streams a graceful drain must let finish. So GOAWAY is kept
out of h2's state machine here: we write our own GOAWAY frame and `_H2` reports a received one without
closing; refusing new streams after a GOAWAY is this module's job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from h2.stream import StreamState
from hyperframe.frame import DataFrame, GoAwayFrame

from ambient.hbone.errors import HboneError, StreamError
from ambient.hbone.headers import parse_response
from ambient.hbone.tls import peer_uri_sans

if TYPE_CHECKING:
    from ambient.hbone.stream import HboneStream

log = logging.getLogger("ambient.hbone")

MiB = 1 << 20
H2_DEFAULT_WINDOW = 65_535  # RFC 9113's initial window; the connection window starts here
ACK_STEP_DIVISOR = 4  # consumed DATA is acknowledged to h2 once a quarter of a window has been read

# The 9-byte frame header (RFC 9113 §4.1) as hyperframe packs it: 24-bit length as 16 + 8 bits, type, flags,
# stream id. Used by the DATA short path (see the module docstring).
FRAME_HEADER = struct.Struct(">HBBBL")
FRAME_HEADER_SIZE = 9
DATA_FRAME = 0x0
END_STREAM_OR_PADDED = 0x1 | 0x8  # DATA flags only h2 handles
RECEIVING_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})  # RECV_DATA keeps the state
SENDING_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})  # SEND_DATA keeps the state


@dataclass(frozen=True)
class HboneConfig:
    """Every HBONE tunable, with Istio's ztunnel values as defaults (PROTOCOLS.md §6)."""

    stream_window: int = 4 * MiB  # ztunnel's initial stream window: one stream can fill a fast link
    connection_window: int = 16 * MiB  # ztunnel's connection window: four streams at full window
    max_frame_size: int = 1 * MiB  # ztunnel's max frame: fewer frames means less per-frame Python work
    max_streams_per_connection: int = 100  # client cap per pooled connection (Go uses 100, hyper 200)
    server_max_streams: int = 200  # what the server advertises (ztunnel's value)
    max_header_list_size: int = 64 * 1024  # a CONNECT head is < 1 KiB; more is abuse, not a request
    ping_interval: float = 10.0  # seconds between keepalive PINGs (ztunnel)
    ping_timeout: float = 20.0  # seconds an unanswered PING is tolerated before dropping (ztunnel)
    pool_idle_timeout: float = 300.0  # seconds an unused pooled connection is kept (ztunnel: 5 min)
    connect_timeout: float = 10.0  # seconds for TCP + TLS when opening a pooled connection
    handshake_timeout: float = 10.0  # server: a client that has not finished TLS by then is dropped
    read_size: int = 1 * MiB  # default `HboneStream.read` size: one full DATA frame
    write_piece: int = 256 * 1024  # bytes per transport.write: uvloop's TLS transport is 2x slower with MiBs
    receive_buffer: int = 256 * 1024  # TLS decrypts into this buffer (uvloop reads at most 256 KiB at once)
    write_buffer_high: int = 4 * MiB  # transport buffer above which writers wait (one stream window)


def _data_frame_repr(frame: DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# h2 evaluates repr() of every received frame for a trace log line, and hyperframe's DataFrame repr
# re-serializes and hex-encodes the whole body: 6 MiB of work per 1 MiB frame, a third of the data path's
# CPU. Process-wide, but it only changes how a DATA frame prints.
DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign,assignment]


class _H2(H2Connection):
    """h2 with GOAWAY reported but not acted upon (see the module docstring)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[ev.Event]]:
        event = ev.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


_per_thread = threading.local()


def _receive_buffer(size: int) -> memoryview:
    """One receive buffer per thread, shared by its connections: the transport fills it and calls
    `buffer_updated` in the same callback, and h2 copies the bytes out before returning, so connections
    never see each other's data and an idle connection costs no buffer."""
    view: memoryview | None = getattr(_per_thread, "receive", None)
    if view is None or len(view) != size:
        view = _per_thread.receive = memoryview(bytearray(size))
    return view


def _run(buf: memoryview, start: int, end: int, partial: bytearray) -> bytes | memoryview:
    """Frames for h2. h2's exception handling leaves reference cycles that keep what it was given alive
    until the garbage collector runs, so it gets a copy of `partial` (which must stay resizable) rather
    than a view; a view of the receive buffer is fine (that buffer never changes size)."""
    return buf[start:end].tobytes() if buf.obj is partial else buf[start:end]


def _addr(value: Any) -> tuple[str, int]:
    return (str(value[0]), int(value[1])) if isinstance(value, tuple) and len(value) >= 2 else ("", 0)


class HboneConnection(asyncio.BufferedProtocol):
    """The HTTP/2 connection shell. Subclasses decide what a new request or a finished stream means."""

    def __init__(self, config: HboneConfig, client_side: bool) -> None:
        self.config = config
        self._loop = asyncio.get_running_loop()
        self._h2 = _H2(H2Configuration(client_side=client_side, header_encoding=None))
        self.streams: dict[int, HboneStream] = {}
        self.transport: asyncio.Transport | None = None
        self.peer_addr: tuple[str, int] = ("", 0)
        self.local_addr: tuple[str, int] = ("", 0)
        self.peer_sans: list[str] = []
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.error: HboneError | None = None
        self.settings_received = False
        self.goaway_received: int | None = None  # the peer's last stream id, once it sent GOAWAY
        self.goaway_sent: int | None = None
        self._flush_scheduled = False
        self._write_paused = False
        self._resume: asyncio.Future[None] | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        self._ping_payload = b""
        self._receive_view = _receive_buffer(config.receive_buffer)
        # DATA short path: our own frame splitting starts once h2 has taken the preamble and holds no
        # partial frame; from then on h2 only ever gets whole frames.
        self._framing = False
        self._partial = bytearray()  # the start of a frame that has not fully arrived
        self._partial_needed = FRAME_HEADER_SIZE  # bytes `_partial` must hold before it is worth parsing
        self._open_state = ConnectionState.CLIENT_OPEN if client_side else ConnectionState.SERVER_OPEN
        self.unacked = 0  # bytes read by streams but not yet acknowledged to h2 (all streams)
        self.stream_ack_step = max(1, config.stream_window // ACK_STEP_DIVISOR)
        self.connection_ack_step = max(1, config.connection_window // ACK_STEP_DIVISOR)

    @property
    def peer(self) -> str:
        ip, port = self.peer_addr
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    # -- asyncio.BufferedProtocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.peer_addr = _addr(transport.get_extra_info("peername"))
        self.local_addr = _addr(transport.get_extra_info("sockname"))
        self.peer_sans = peer_uri_sans(transport.get_extra_info("peercert"))
        transport.set_write_buffer_limits(high=self.config.write_buffer_high)
        h2 = self._h2
        h2.initiate_connection()
        settings: dict[SettingCodes | int, int] = {
            SettingCodes.INITIAL_WINDOW_SIZE: self.config.stream_window,
            SettingCodes.MAX_FRAME_SIZE: self.config.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.config.max_header_list_size}
        if h2.config.client_side:
            settings[SettingCodes.ENABLE_PUSH] = 0
        else:
            settings[SettingCodes.MAX_CONCURRENT_STREAMS] = self.config.server_max_streams
        h2.update_settings(settings)
        if self.config.connection_window > H2_DEFAULT_WINDOW:
            h2.increment_flow_control_window(self.config.connection_window - H2_DEFAULT_WINDOW)
        self._flush()
        self._ping_handle = self._loop.call_later(self.config.ping_interval, self._ping_tick)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receive_view  # shared per thread; see _receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._receive_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        """`data` may be our reused receive buffer: nothing here keeps a reference to it."""
        if self._framing:
            self._receive_frames(data)
        elif self._receive_h2(data):
            buffer = self._h2.incoming_buffer
            self._framing = not buffer._preamble_len and not buffer._data
        if self._h2._data_to_send:
            self._flush()

    def _receive_h2(self, data: bytes | bytearray | memoryview) -> bool:
        """Feed h2 and dispatch its events; False if the peer broke the protocol (the connection is closing)."""
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as exc:
            self._flush()  # h2 has queued a GOAWAY naming the error: let it reach the peer
            self.error = StreamError(f"HTTP/2 protocol error from {self.peer}: {exc}", "protocol_error")
            log.debug("closing HBONE connection: %s", self.error)
            self._framing = False
            if self.transport is not None:
                self.transport.close()
                self._loop.call_later(self.config.handshake_timeout, self.transport.abort)
            return False
        streams = self.streams
        for event in events:
            if isinstance(event, ev.DataReceived):
                data_stream = streams.get(event.stream_id)
                if data_stream is not None:
                    data_stream._on_data(event.data, event.flow_controlled_length)
                else:
                    self._ack(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, ev.WindowUpdated):
                if event.stream_id:
                    window_stream = streams.get(event.stream_id)
                    if window_stream is not None:
                        window_stream._on_window()
                else:
                    self._wake_writers()
            else:
                self._on_event(event)
        return True

    def _receive_frames(self, data: bytes | memoryview) -> None:
        """Split the input into frames: DATA on an open stream goes to the stream, runs of other frames to h2
        (see the module docstring). An incomplete last frame waits in `_partial`."""
        partial = self._partial
        if partial:
            partial += data
            if len(partial) < self._partial_needed:
                return  # the rest of a large frame is still arriving
            buf = memoryview(partial)
        else:
            buf = data if isinstance(data, memoryview) else memoryview(data)
        h2 = self._h2
        size = len(buf)
        pos = 0
        needed = FRAME_HEADER_SIZE
        h2_from = -1  # start of a run of frames for h2
        while size - pos >= FRAME_HEADER_SIZE:
            length_high, length_low, frame_type, flags, stream_id = FRAME_HEADER.unpack_from(buf, pos)
            length = (length_high << 8) | length_low
            if length > h2.max_inbound_frame_size:
                # h2 refuses it (the server's frame buffer as soon as it sees the header): from here on h2
                # takes the byte stream, as it did before the short path started.
                self._framing = False
                if h2_from < 0:
                    h2_from = pos
                pos = size
                break
            end = pos + FRAME_HEADER_SIZE + length
            if end > size:
                needed = end - pos
                break
            if frame_type != DATA_FRAME or flags & END_STREAM_OR_PADDED or not length:
                if h2_from < 0:
                    h2_from = pos
            else:
                if h2_from >= 0:  # the frames before this one may change what it means: h2 goes first
                    if not self._receive_h2(_run(buf, h2_from, pos, partial)):
                        return
                    h2_from = -1
                if not self._short_data(stream_id & 0x7FFFFFFF, length, buf[pos + FRAME_HEADER_SIZE:end]):
                    h2_from = pos
            pos = end
        if h2_from >= 0 and not self._receive_h2(_run(buf, h2_from, pos, partial)):
            return
        self._partial_needed = needed
        if buf.obj is partial:
            buf.release()  # no slice of it is alive (see _run), so it can shrink
            del partial[:pos]
        elif pos < size:
            partial += buf[pos:]

    def _short_data(self, stream_id: int, length: int, payload: memoryview) -> bool:
        """Deliver a DATA frame without h2 if h2 would do nothing but account for it; else False."""
        stream = self.streams.get(stream_id)
        h2 = self._h2
        h2_stream = h2.streams.get(stream_id)
        if stream is None or h2_stream is None or h2.state_machine.state is not self._open_state:
            return False
        machine = h2_stream.state_machine
        if machine.state not in RECEIVING_STATES or not machine.headers_received or \
                h2_stream._expected_content_length is not None or h2.incoming_buffer._headers_buffer:
            return False
        connection_window = h2._inbound_flow_control_window_manager
        stream_window = h2_stream._inbound_window_manager
        if length > connection_window.current_window_size or length > stream_window.current_window_size:
            return False  # h2 raises FLOW_CONTROL_ERROR
        connection_window.current_window_size -= length
        stream_window.current_window_size -= length
        stream._on_data(payload.tobytes(), length)
        return True

    def eof_received(self) -> bool | None:
        return None  # close the transport: HTTP/2 has no half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        if self.error is None:
            why = f": {exc}" if exc else ""
            hint = ""
            if self._h2.config.client_side and not self.settings_received:
                hint = (" right after the TLS handshake; the server may not accept our certificate (it must be in "
                        "the server's trust domain)")
            self.error = StreamError(f"HBONE connection to {self.peer} closed{hint}{why}", "connection_closed")
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._on_lost(self.error)
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)
        # The transport holds undelivered data and points back at us: let both go without a full GC.
        self.transport = None
        self._on_closed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    # -- events ----------------------------------------------------------------------------------
    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_end()
        elif isinstance(event, ev.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_reset(int(event.error_code or 0), event.remote_reset)
        elif isinstance(event, ev.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_response(*parse_response(event.headers))
        elif isinstance(event, ev.RequestReceived):
            self._on_request(event)
        elif isinstance(event, ev.RemoteSettingsChanged):
            self.settings_received = True
            if SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings:
                self._on_peer_max_streams(self._h2.remote_settings.max_concurrent_streams)
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._wake_writers()
        elif isinstance(event, ev.PingAckReceived):
            if event.ping_data == self._ping_payload:
                self._ping_sent_at = None
        elif isinstance(event, ev.ConnectionTerminated):
            self._on_goaway(int(event.error_code or 0), event.last_stream_id or 0)

    def _on_request(self, event: ev.RequestReceived) -> None:
        """A peer-initiated stream; only servers accept them."""
        if event.stream_id is not None:
            self._h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)

    def _on_peer_max_streams(self, value: int) -> None:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS changed (the client's pool listens)."""

    def _on_goaway(self, error_code: int, last_stream_id: int) -> None:
        self.goaway_received = last_stream_id
        if error_code != ErrorCodes.NO_ERROR:
            self.abort(StreamError(f"{self.peer} closed the HBONE connection with GOAWAY "
                                   f"{_error_name(error_code)}", "goaway"))
            return
        # Streams we opened that the peer never processed can be retried elsewhere.
        mine = 1 if self._h2.config.client_side else 0
        for stream_id, stream in list(self.streams.items()):
            if stream_id % 2 == mine and stream_id > last_stream_id:
                stream._on_lost(StreamError(f"{self.peer} is draining (GOAWAY) and did not process this stream",
                                            "goaway", retryable=True))
                self.streams.pop(stream_id, None)
        self._close_if_drained()

    def _on_stream_finished(self, stream: HboneStream) -> None:
        """A stream is done in both directions (or reset); subclasses release what it held."""

    def _on_closed(self) -> None:
        """The transport is gone."""

    # -- used by HboneStream ---------------------------------------------------------------------
    def _stream_finished(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self._on_stream_finished(stream)
            self._close_if_drained()

    def _ack(self, stream_id: int, size: int) -> None:
        if size and not self.closed.done():
            self._h2.acknowledge_received_data(size, stream_id)
            if self._h2._data_to_send:  # h2 decided a WINDOW_UPDATE is due
                self.schedule_flush()

    def _release_credit(self, stream: HboneStream) -> None:
        """Acknowledge what `stream` has read; every stream's share once the connection's total is due."""
        if self.unacked >= self.connection_ack_step:
            self.unacked = 0
            for other in self.streams.values():
                if other._unacked and other is not stream:
                    self._ack(other.stream_id, other._unacked)
                    other._unacked = 0
        else:
            self.unacked -= stream._unacked
        size, stream._unacked = stream._unacked, 0
        self._ack(stream.stream_id, size)

    def _wake_writers(self) -> None:
        for stream in self.streams.values():
            stream._on_window()

    async def _writable(self) -> None:
        """Wait until the transport's buffer is below its low-water mark."""
        if self._resume is None:
            self._resume = self._loop.create_future()
        await self._resume

    # -- output ----------------------------------------------------------------------------------
    def schedule_flush(self) -> None:
        """Write h2's output once at the end of this loop iteration, coalescing every stream's frames."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        h2 = self._h2
        data = h2._data_to_send
        if not data:
            return
        h2._data_to_send = bytearray()  # data_to_send() without its copy: the old buffer is never touched again
        transport = self.transport
        if transport is not None and not transport.is_closing():
            piece = self.config.write_piece
            if len(data) <= piece:
                transport.write(data)
                return
            view = memoryview(data)
            for start in range(0, len(data), piece):
                transport.write(view[start:start + piece])

    def _ping_tick(self) -> None:
        now = self._loop.time()
        if self._ping_sent_at is not None and now - self._ping_sent_at >= self.config.ping_timeout - 1e-3:
            self.abort(StreamError(f"{self.peer} did not answer a keepalive PING within "
                                   f"{self.config.ping_timeout:g}s; dropping the HBONE connection",
                                   "ping_timeout"))
            return
        if self._ping_sent_at is None:
            self._ping_payload = os.urandom(8)
            self._h2.ping(self._ping_payload)
            self._ping_sent_at = now
            self._flush()
        self._ping_handle = self._loop.call_later(self.config.ping_interval, self._ping_tick)

    # -- lifecycle -------------------------------------------------------------------------------
    def goaway(self) -> None:
        """Graceful drain: GOAWAY(NO_ERROR) naming the last stream we processed; no new streams are accepted,
        open ones finish, and the connection closes when the last one is done."""
        if self.goaway_sent is not None or self.transport is None or self.closed.done():
            return
        self.goaway_sent = self._h2.highest_inbound_stream_id
        self._flush()  # frames h2 already queued go first
        self.transport.write(GoAwayFrame(stream_id=0, last_stream_id=self.goaway_sent, error_code=0).serialize())
        self._close_if_drained()

    @property
    def draining(self) -> bool:
        return self.goaway_sent is not None or self.goaway_received is not None

    def _close_if_drained(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self._flush()  # the last stream's final frames go out before close_notify
            self.transport.close()

    def close(self) -> None:
        """GOAWAY and close now (open streams are cut)."""
        if self.transport is None or self.closed.done():
            return
        self.goaway()
        self.transport.close()

    def abort(self, error: HboneError | None = None) -> None:
        """Drop the connection without a goodbye (a broken peer); streams fail with `error`."""
        if error is not None and self.error is None:
            self.error = error
        if error is not None and error.reason != "connection_closed":
            log.debug("dropping HBONE connection to %s: %s", self.peer, error)
        if self.transport is not None:
            self.transport.abort()


def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
