"""Bidirectional copy between two byte streams (TCP or an HBONE tunnel), with half-close and bounded
buffering: each direction holds at most one receive buffer (`CHUNK`) ahead of what the other side has
accepted, so a slow reader slows the writer instead of growing memory.

The TCP side is an `asyncio.BufferedProtocol` (ARCHITECTURE.md, performance): the transport receives
straight into a preallocated buffer that starts at 1 KiB and grows 16x (→ 16 KiB → 256 KiB) each time a
read fills it, so a request/response connection stays small while a bulk transfer reads 256 KiB at a
time. When the buffer is full the transport stops reading until the consumer catches up. Writes go
straight to the transport; a writer waits only while the transport's buffer is above its high-water mark.

`relay` runs one pump task per direction. When both ends are DirectStreams (TcpStream, HboneStream), data
that arrives while a pump waits in `read()` is written to the other end right in the receive callback, with
no future, task switch or extra loop iteration; the pump takes over whenever a write would have to wait
(no flow-control window, a full send buffer) and carries EOF and errors, so order and backpressure are
those of the plain pump.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
from collections.abc import Callable
from typing import Protocol, cast

CHUNK = 256 * 1024  # bytes per read: large enough for throughput, small enough to bound memory per direction
INITIAL_BUFFER = 1024  # a new connection's receive buffer: request/response traffic rarely needs more
BUFFER_GROWTH = 16  # a read that fills the buffer grows it 16x (1 KiB → 16 KiB → 256 KiB)
_EOF_ERRORS = (ConnectionResetError, BrokenPipeError)  # a reset reads as EOF, as with asyncio streams


class ByteStream(Protocol):
    async def read(self, max_bytes: int) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


class DirectStream(ByteStream, Protocol):
    """A ByteStream that can also hand over data without a task switch (TcpStream and HboneStream are):
    `set_receiver(r)`: while a `read()` waits, arriving data is offered to `r` first and counts as read
    when `r` returns True; `try_write(data)`: send all of it now if that needs no waiting, else nothing
    (False)."""

    def set_receiver(self, receiver: Callable[[bytes], bool] | None) -> None: ...
    def try_write(self, data: bytes) -> bool: ...


class TcpStream(asyncio.BufferedProtocol):
    """A TCP connection as a ByteStream: the stream is its own transport's protocol.

    `read(n)` returns what is buffered (at most `n` bytes), waiting only when nothing is; b"" after the
    peer's FIN or a reset. `write()` raises ConnectionResetError once the connection is gone.
    One reader and one writer at a time."""

    __slots__ = ("_buffer", "_drain_waiter", "_end", "_eof", "_error", "_limit", "_loop", "_lost",
                 "_read_waiter", "_reading_paused", "_receiver", "_start", "_view", "_writing_paused", "transport")

    def __init__(self, limit: int = CHUNK) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = max(limit, 1)
        self._buffer = bytearray(min(INITIAL_BUFFER, self._limit))
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # unread bytes are _buffer[_start:_end]
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._receiver: Callable[[bytes], bool] | None = None
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def from_socket(cls, sock: socket.socket, *, limit: int = CHUNK) -> TcpStream:
        """Wrap a connected (or accepted) non-blocking socket; `limit` bounds the receive buffer."""
        stream = cls(limit)
        await stream._loop.create_connection(lambda: stream, sock=sock)
        return stream

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (at most `limit`, the receive buffer's final size)."""
        return self._end - self._start

    # -- ByteStream ------------------------------------------------------------------------------
    async def read(self, max_bytes: int) -> bytes:
        while self._start == self._end:
            if self._error is not None:
                if isinstance(self._error, _EOF_ERRORS):
                    return b""
                raise copy.copy(self._error)  # not the stored one: its traceback would hold this stream
            if self._eof:
                return b""
            waiter = self._read_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._read_waiter = None
        if self._error is not None and not isinstance(self._error, _EOF_ERRORS):
            raise copy.copy(self._error)
        start, end = self._start, self._end
        if max_bytes < 0 or end - start <= max_bytes:
            data = self._view[start:end].tobytes()
            self._start = self._end = 0
        else:
            data = self._view[start:start + max_bytes].tobytes()
            self._start = start + max_bytes
        if self._reading_paused:
            self._resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self._lost or self.transport is None:
            raise ConnectionResetError("Connection lost")
        self.transport.write(data)
        if self._writing_paused:
            waiter = self._drain_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._drain_waiter = None

    def try_write(self, data: bytes) -> bool:
        """Write now unless the transport's buffer is above its high-water mark (or the connection is gone)."""
        transport = self.transport
        if self._lost or self._writing_paused or transport is None or transport.is_closing():
            return False
        try:
            transport.write(data)
        except (OSError, RuntimeError):  # a transport that broke just now: `write()` will say so
            return False
        return True

    def set_receiver(self, receiver: Callable[[bytes], bool] | None) -> None:
        """While a `read()` waits, offer arriving bytes to `receiver` first (see DirectStream)."""
        self._receiver = receiver

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.transport is not None and self.transport.can_write_eof():
                self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.BufferedProtocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._end == len(self._buffer):  # only if the transport reads once more before pausing
            self._make_room()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        end = self._end
        size = len(self._buffer)
        self._end = end + nbytes
        if end + nbytes == size:  # the read filled the buffer: grow it, or stop reading until consumed
            if size < self._limit:
                self._resize(min(size * BUFFER_GROWTH, self._limit))
            elif not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            # A reader is waiting, so these are the only unread bytes: forward them without waking it.
            receiver = self._receiver
            if receiver is not None and receiver(self._view[self._start:self._end].tobytes()):
                self._start = self._end = 0
                if self._reading_paused:
                    self._resume_reading()
                return
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True  # keep the transport open: the other direction may still be writing (half close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._eof = True
        if exc is not None:
            self._error = exc
        self._wake_reader()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(copy.copy(exc))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- internals -------------------------------------------------------------------------------
    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume_reading(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start:
            self._make_room()
        if self._end < len(self._buffer) and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _make_room(self) -> None:
        """Move the unread bytes to the front, or, if they fill the buffer, double it (a transport that
        reads once more after `pause_reading` must still get a non-empty buffer)."""
        start, end = self._start, self._end
        if start:
            self._buffer[:end - start] = self._buffer[start:end]
            self._start, self._end = 0, end - start
        else:
            self._resize(len(self._buffer) * 2)

    def _resize(self, size: int) -> None:
        unread = self._view[self._start:self._end]
        buffer = bytearray(size)
        buffer[:len(unread)] = unread
        self._buffer, self._view = buffer, memoryview(buffer)
        self._start, self._end = 0, len(unread)


async def _pump(src: ByteStream, dst: ByteStream, count: Callable[[int], None]) -> None:
    while data := await src.read(CHUNK):
        await dst.write(data)
        count(len(data))
    dst.write_eof()


def _forward(src: ByteStream, dst: ByteStream, count: Callable[[int], None]) -> bool:
    """Let `src` hand data straight to `dst` while its pump waits in `read()` (both must be DirectStreams).
    The pump still carries everything that cannot go at once (no window, a full buffer), EOF and errors;
    data only takes the short way while nothing is queued in `src`, so the order is kept."""
    set_receiver = getattr(src, "set_receiver", None)
    try_write = getattr(dst, "try_write", None)
    if set_receiver is None or try_write is None:
        return False

    def receive(data: bytes) -> bool:
        if try_write(data):
            count(len(data))
            return True
        return False

    set_receiver(receive)
    return True


async def relay(a: ByteStream, b: ByteStream, a_to_b: Callable[[int], None], b_to_a: Callable[[int], None]) -> None:
    """Copy both ways until both directions ended (or one failed); then close both."""
    forwarding = [src for src, dst, count in ((a, b, a_to_b), (b, a, b_to_a)) if _forward(src, dst, count)]
    forward = asyncio.ensure_future(_pump(a, b, a_to_b))
    backward = asyncio.ensure_future(_pump(b, a, b_to_a))
    try:
        done, pending = await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_EXCEPTION)
        if pending and any(t.exception() is not None for t in done):
            for task in pending:
                task.cancel()
        await asyncio.gather(forward, backward, return_exceptions=True)
        for task in (forward, backward):
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for src in forwarding:
            cast(DirectStream, src).set_receiver(None)
        for task in (forward, backward):
            task.cancel()
        a.close()
        b.close()
