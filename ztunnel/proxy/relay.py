"""Bidirectional copy between two byte streams (TCP or an HBONE tunnel), with half-close and bounded
buffering: each direction reads at most one chunk ahead of what the other side has accepted, so a slow
reader slows the writer instead of growing memory."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Protocol

CHUNK = 256 * 1024  # bytes per read: large enough for throughput, small enough to bound memory per direction


class ByteStream(Protocol):
    async def read(self, max_bytes: int) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


class TcpStream:
    """An asyncio TCP connection as a ByteStream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def from_socket(cls, sock: socket.socket, *, limit: int = CHUNK) -> TcpStream:
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        return cls(reader, writer)

    async def read(self, max_bytes: int) -> bytes:
        try:
            return await self.reader.read(max_bytes)
        except (ConnectionResetError, BrokenPipeError):
            return b""

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()


async def _pump(src: ByteStream, dst: ByteStream, count: Callable[[int], None]) -> None:
    while data := await src.read(CHUNK):
        await dst.write(data)
        count(len(data))
    dst.write_eof()


async def relay(a: ByteStream, b: ByteStream, a_to_b: Callable[[int], None], b_to_a: Callable[[int], None]) -> None:
    """Copy both ways until both directions ended (or one failed); then close both."""
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
        for task in (forward, backward):
            task.cancel()
        a.close()
        b.close()
