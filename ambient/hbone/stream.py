"""`HboneStream`: one HBONE tunnel (an HTTP/2 CONNECT stream) as a byte stream (PROTOCOLS.md §6).

Semantics follow TCP: END_STREAM is a half close (`write_eof()` sends it, `read()` returns b"" after the
peer's), RST_STREAM NO_ERROR/CANCEL reads as EOF, any other reset or a lost connection raises
`StreamError`. Flow control is real: `read()` acknowledges only what it returns, so an idle reader stops
the remote writer after one stream window; `write()` waits for window credit, so a slow remote reader
slows this writer. One reader and one writer at a time.

For relays (ztunnel's `relay`): `try_write(data)` sends all of `data` at once if that needs no waiting, and
`set_receiver(r)` offers DATA that arrives while a `read()` waits to `r` first, so bytes can be forwarded
inside the receive callback without waking a task. DATA is written and received without h2's per-frame
machinery where h2 would only account for it (see ambient.hbone.connection).
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from h2.exceptions import H2Error, StreamClosedError

from ambient.hbone.connection import DATA_FRAME, FRAME_HEADER, SENDING_STATES
from ambient.hbone.errors import HboneError, StreamError

if TYPE_CHECKING:
    from h2.stream import H2Stream

    from ambient.hbone.connection import HboneConnection

_EOF_RESETS = (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL)


class HboneStream:
    """A tunnel. `peer_identity` is the SPIFFE id of the other end ("spiffe://<td>/ns/<ns>/sa/<sa>");
    `request_headers` are the CONNECT request's headers, `response_headers` those of the answer."""

    __slots__ = ("_chunks", "_conn", "_discard", "_error", "_finished", "_local_ended", "_read_waiter",
                 "_receiver", "_remote_ended", "_response", "_unacked", "_write_waiter", "authority",
                 "local_addr", "peer_addr", "peer_identity", "request_headers", "response_headers", "status",
                 "stream_id")

    def __init__(self, conn: HboneConnection, stream_id: int, authority: str, request_headers: dict[str, str],
                 peer_identity: str | None) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.authority = authority
        self.request_headers = request_headers
        self.response_headers: dict[str, str] = {}
        self.status = 0
        self.peer_identity = peer_identity
        self.peer_addr = conn.peer_addr
        self.local_addr = conn.local_addr
        self._chunks: deque[bytes] = deque()
        self._remote_ended = False
        self._local_ended = False
        self._finished = False
        self._discard = False
        self._receiver: Callable[[bytes], bool] | None = None
        self._unacked = 0  # bytes read and not yet acknowledged to h2 (see HboneConnection._release_credit)
        self._error: HboneError | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[None] | None = None


    def _fresh_error(self) -> HboneError:
        """The stored error as a new exception object: re-raising the stored one would pin its traceback
        (and with it this stream and its connection) to the stored object until a full GC."""
        assert self._error is not None
        return copy.copy(self._error)
    def __repr__(self) -> str:
        return f"<HboneStream {self.stream_id} {self.authority} peer={self._conn.peer}>"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (at most one stream window)."""
        return sum(map(len, self._chunks))

    @property
    def at_eof(self) -> bool:
        return not self._chunks and (self._remote_ended or self._error is not None)

    # -- reading ---------------------------------------------------------------------------------
    async def read(self, max_bytes: int = -1) -> bytes:
        """Up to `max_bytes` (default: one DATA frame's worth); b"" once the peer has ended its side."""
        chunks = self._chunks
        while not chunks:
            if self._remote_ended:
                return b""
            if self._error is not None:
                raise self._fresh_error()
            waiter = self._read_waiter = self._conn._loop.create_future()
            try:
                await waiter
            finally:
                self._read_waiter = None
        chunk = chunks[0]
        if max_bytes < 0:
            max_bytes = self._conn.config.read_size
        if len(chunk) <= max_bytes:
            chunks.popleft()
        else:
            chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        self._consumed(len(chunk))
        return chunk

    def set_receiver(self, receiver: Callable[[bytes], bool] | None) -> None:
        """While a `read()` is waiting, offer arriving data to `receiver` first; if it returns True the data
        counts as read and the waiting `read()` keeps waiting (a relay forwarding without a task switch)."""
        self._receiver = receiver

    def _consumed(self, size: int) -> None:
        """Credit goes back in steps (h2 grants it in half windows anyway); a finished stream's at once, as
        the connection window is shared."""
        conn = self._conn
        self._unacked += size
        conn.unacked += size
        if self._unacked >= conn.stream_ack_step or conn.unacked >= conn.connection_ack_step or self._finished:
            conn._release_credit(self)

    # -- writing ---------------------------------------------------------------------------------
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data`, waiting for flow-control credit and for the connection's send buffer to drain."""
        if self._error is not None:
            raise self._fresh_error()
        if self._local_ended:
            raise StreamError(f"write on {self!r} after write_eof()/close()", "stream_closed")
        conn = self._conn
        h2 = conn._h2
        size = len(data)
        view = memoryview(data)
        offset = 0
        while offset < size:
            h2_stream = self._sending_h2_stream()
            if h2_stream is None:
                await self._write_through_h2(view[offset:])  # h2 says what is wrong
                break
            window = min(h2.outbound_flow_control_window, h2_stream.outbound_flow_control_window)
            if window <= 0:
                await self._wait_window()
                continue
            n = min(window, size - offset)
            self._append_data(h2_stream, view[offset:offset + n] if n < size else data)
            offset += n
        conn.schedule_flush()
        if conn._write_paused:
            await conn._writable()
            if self._error is not None:
                raise self._fresh_error()

    def try_write(self, data: bytes) -> bool:
        """Send all of `data` now if that needs no waiting (window credit, a drained connection); else send
        nothing and return False."""
        conn = self._conn
        if self._error is not None or self._local_ended or conn._write_paused or not data:
            return False
        h2_stream = self._sending_h2_stream()
        if h2_stream is None or len(data) > min(conn._h2.outbound_flow_control_window,
                                                h2_stream.outbound_flow_control_window):
            return False
        self._append_data(h2_stream, data)
        conn.schedule_flush()
        return True

    def _sending_h2_stream(self) -> H2Stream | None:
        """h2's stream if sending DATA on it changes no state (else h2 must judge the send)."""
        h2 = self._conn._h2
        h2_stream = h2.streams.get(self.stream_id)
        if h2_stream is None or h2_stream.state_machine.state not in SENDING_STATES or \
                h2.state_machine.state is not self._conn._open_state:
            return None
        return h2_stream

    def _append_data(self, h2_stream: H2Stream, data: bytes | bytearray | memoryview) -> None:
        """What h2.send_data does for an open stream, without its frame objects and state machines: DATA
        frames appended to h2's output buffer and both send windows shrunk (module docstring of
        ambient.hbone.connection). The caller has checked the window."""
        h2 = self._conn._h2
        out = h2._data_to_send
        size = len(data)
        frame = h2.max_outbound_frame_size
        if size <= frame:
            out += FRAME_HEADER.pack(size >> 8, size & 0xFF, DATA_FRAME, 0, self.stream_id)
            out += data
        else:
            view = memoryview(data)
            for start in range(0, size, frame):
                piece = view[start:start + frame]
                n = len(piece)
                out += FRAME_HEADER.pack(n >> 8, n & 0xFF, DATA_FRAME, 0, self.stream_id)
                out += piece
        h2_stream.outbound_flow_control_window -= size
        h2.outbound_flow_control_window -= size

    async def _write_through_h2(self, view: memoryview) -> None:
        h2 = self._conn._h2
        size = len(view)
        offset = 0
        while offset < size:
            try:
                window = h2.local_flow_control_window(self.stream_id)
            except StreamClosedError:
                if self._error is not None:
                    raise self._fresh_error() from None
                raise StreamError(f"{self!r} was closed", "stream_closed") from None
            if window <= 0:
                await self._wait_window()
                continue
            n = min(window, h2.max_outbound_frame_size, size - offset)
            h2.send_data(self.stream_id, view[offset:offset + n])
            offset += n

    async def _wait_window(self) -> None:
        self._conn.schedule_flush()  # what is queued must leave before the peer can grant more
        waiter = self._write_waiter = self._conn._loop.create_future()
        try:
            await waiter
        finally:
            self._write_waiter = None
        if self._error is not None:
            raise self._fresh_error()

    def write_eof(self) -> None:
        """Half close: send END_STREAM. Reading continues until the peer ends its side."""
        if self._local_ended or self._finished:
            return
        self._local_ended = True
        try:
            self._conn._h2.end_stream(self.stream_id)
        except StreamClosedError:
            return
        self._conn.schedule_flush()
        if self._remote_ended:
            self._finish()

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Done with both directions: END_STREAM if not sent, RST_STREAM(NO_ERROR) if the peer is still
        sending, and unread data is dropped (its flow-control credit returned)."""
        self._drop_buffer()
        if self._finished:
            return
        if not self._local_ended:
            self.write_eof()
        if not self._finished:
            self._reset(ErrorCodes.NO_ERROR)

    def abort(self) -> None:
        """Cut the tunnel: RST_STREAM(CANCEL); the peer reads EOF."""
        self._drop_buffer()
        if not self._finished:
            self._reset(ErrorCodes.CANCEL)

    def _reset(self, code: ErrorCodes) -> None:
        self._local_ended = True
        if self._error is None:
            self._error = StreamError(f"{self!r} was closed", "stream_closed")
        try:
            self._conn._h2.reset_stream(self.stream_id, code)
        except StreamClosedError:
            pass
        else:
            self._conn.schedule_flush()
        self._finish()

    def _drop_buffer(self) -> None:
        self._discard = True
        if self._chunks:
            size = sum(map(len, self._chunks))
            self._chunks.clear()
            self._conn._ack(self.stream_id, size)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._unacked:
            self._conn._release_credit(self)
        self._wake()
        self._conn._stream_finished(self)

    def _wake(self) -> None:
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- called by the connection ----------------------------------------------------------------
    def _on_data(self, data: bytes, flow_controlled_length: int) -> None:
        padding = flow_controlled_length - len(data)
        if self._discard:
            self._conn._ack(self.stream_id, flow_controlled_length)
            return
        if padding:
            self._conn._ack(self.stream_id, padding)
        if data:
            waiter = self._read_waiter
            if waiter is not None and not waiter.done():
                receiver = self._receiver
                if receiver is not None and receiver(data):
                    self._consumed(len(data))
                    return
                waiter.set_result(None)
            self._chunks.append(data)

    def _on_end(self) -> None:
        self._remote_ended = True
        self._wake()
        if self._local_ended:
            self._finish()

    def _on_window(self) -> None:
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_reset(self, code: int, remote: bool) -> None:
        who = "the peer" if remote else "h2"
        if code in _EOF_RESETS:
            self._remote_ended = True
            error = StreamError(f"{self!r} was reset by {who} ({ErrorCodes(code).name})", "stream_reset")
        else:
            try:
                name = ErrorCodes(code).name
            except ValueError:
                name = str(code)
            retryable = code == ErrorCodes.REFUSED_STREAM
            error = StreamError(f"{self!r} was reset by {who} with {name}", "refused" if retryable else
                                "stream_reset", retryable=retryable)
        self._local_ended = True
        if self._error is None:
            self._error = error
        self._fail_response(error)
        self._finish()

    def _on_lost(self, error: HboneError) -> None:
        """The connection is gone (or never processed this stream): fail without touching h2."""
        if self._error is None:
            self._error = error
        self._local_ended = True
        self._fail_response(error)
        if not self._finished:
            self._finished = True
            self._wake()

    # -- server side: answering the CONNECT ------------------------------------------------------
    def _send_response(self, status: int, headers: dict[str, str], block: list[tuple[bytes, bytes]]) -> None:
        """200 opens the tunnel; any other status is final: END_STREAM, then RST_STREAM(NO_ERROR) if the
        client is still sending (RFC 9113 §8.1)."""
        self.status, self.response_headers = status, headers
        if self._finished:
            return  # the client went away first; read()/write() will say so
        try:
            self._conn._h2.send_headers(self.stream_id, block, end_stream=status != 200)
        except H2Error:
            return
        self._conn.schedule_flush()
        if status != 200:
            self._local_ended = True
            if self._remote_ended:
                self._finish()
            else:
                self._reset(ErrorCodes.NO_ERROR)

    # -- client side: waiting for the CONNECT answer ---------------------------------------------
    def _expect_response(self) -> asyncio.Future[None]:
        self._response = self._conn._loop.create_future()
        return self._response

    def _on_response(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.response_headers = status, headers
        if self._response is not None and not self._response.done():
            self._response.set_result(None)

    def _fail_response(self, error: HboneError) -> None:
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
            self._response.exception()  # retrieved: the waiter may have been cancelled
