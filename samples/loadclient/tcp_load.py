"""TCP round trips: each worker keeps one connection, writes a newline-terminated payload and waits
for it to come back. The echo may be prefixed (tcp-echo with PREFIX), so an answer counts when it ends
with the payload.
"""

from __future__ import annotations

import asyncio

from samples.loadclient.pacing import Pacing, drive
from samples.loadclient.result import LoadResult

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SIZE = 64


def payload_of(size: int) -> bytes:
    if size < 1:
        raise ValueError(f"size must be at least 1 byte, not {size}")
    return b"x" * (size - 1) + b"\n"


class TcpProbe:
    def __init__(self, host: str, port: int, payload: bytes, timeout_s: float) -> None:
        self._host = host
        self._port = port
        self._payload = payload
        self._timeout_s = timeout_s
        # The echo may carry a prefix: leave room for it in the line buffer.
        self._limit = 2 * len(payload) + 4096
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._stream is None:
            self._stream = await asyncio.open_connection(self._host, self._port, limit=self._limit)
        return self._stream

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None

    async def open(self) -> None:
        """Connect before the clock starts; a failure here is retried, and counted, by the first send."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._connect()
        except (OSError, TimeoutError):
            self._drop()

    async def send(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await self._connect()
                writer.write(self._payload)
                await writer.drain()
                echoed = await reader.readuntil(b"\n")
        except TimeoutError:
            error: str | None = "timeout"
        except asyncio.IncompleteReadError:
            error = "closed by peer"
        except asyncio.LimitOverrunError:
            error = "bad echo"
        except OSError as exc:
            error = type(exc).__name__
        else:
            error = None if echoed.endswith(self._payload) else "bad echo"
        if error is not None:
            self._drop()
        return error

    async def close(self) -> None:
        if self._stream is not None:
            writer = self._stream[1]
            self._stream = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def run_tcp(
    host: str, port: int, pacing: Pacing, *, size: int = DEFAULT_SIZE, timeout_s: float = DEFAULT_TIMEOUT_S
) -> LoadResult:
    """Round trips of `size` bytes to an echo server at host:port, one connection per worker."""
    payload = payload_of(size)
    return await drive(pacing, lambda: TcpProbe(host, port, payload, timeout_s), "tcp", f"{host}:{port}")
