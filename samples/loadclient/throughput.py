"""Single-stream throughput: `throughput HOST:PORT` uploads on one TCP connection for a duration to a
`sink`, which counts what arrives and, when the sender half-closes, answers the count as one line. The
rate is measured up to the sink's receipt (the count can only come back after every byte arrived), not to
the sender's socket buffer.

The sender is a plain blocking socket: one `sendall` of a reused buffer per chunk, so the client costs as
little CPU as Python allows and the path under test is the bottleneck.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_SINK_PORT = 9100
DEFAULT_DURATION_S = 3.0
DEFAULT_CHUNK = 256 * 1024  # bytes per sendall: large enough that the per-call cost vanishes
DEFAULT_TIMEOUT_S = 10.0  # seconds any one socket operation may block (a stalled path is an error)
SINK_BUFFER = 1024 * 1024  # the sink reads into one shared buffer and throws the bytes away
MAX_COUNT_LINE = 32  # a decimal count and a newline


@dataclass(frozen=True)
class ThroughputResult:
    target: str
    sent: int  # bytes handed to the socket
    received: int  # bytes the sink counted (0 when it never answered)
    elapsed_s: float  # from the first byte sent to the sink's count arriving
    error: str | None = None

    @property
    def mb_per_s(self) -> float:
        return self.received / self.elapsed_s / 1e6 if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {"mode": "throughput", "target": self.target, "sent": self.sent, "received": self.received,
                "elapsed_s": round(self.elapsed_s, 3), "mb_per_s": round(self.mb_per_s, 1), "error": self.error}

    def render(self) -> str:
        line = (f"throughput {self.target}: {self.received / 1e6:.1f} MB in {self.elapsed_s:.2f} s = "
                f"{self.mb_per_s:.1f} MB/s")
        return f"{line}\n  error: {self.error}" if self.error else line


def parse_count(line: bytes) -> int:
    """The sink's answer: a decimal byte count ending in a newline."""
    text = line.strip()
    if not line.endswith(b"\n") or not text.isdigit():
        raise ValueError(f"the sink answered {line[:MAX_COUNT_LINE]!r}, not a byte count; is HOST:PORT a "
                         "`python3 -m samples.loadclient sink`?")
    return int(text)


def measure(host: str, port: int, duration_s: float = DEFAULT_DURATION_S, *, chunk: int = DEFAULT_CHUNK,
            timeout_s: float = DEFAULT_TIMEOUT_S, clock: Callable[[], float] = time.perf_counter) -> ThroughputResult:
    """Upload to the sink at host:port for `duration_s`, then half-close and wait for its count."""
    target = f"{host}:{port}"
    data = memoryview(bytes(chunk))
    sent = 0
    start = clock()
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            start = clock()
            while clock() - start < duration_s:
                sock.sendall(data)
                sent += chunk
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while not answer.endswith(b"\n") and len(answer) < MAX_COUNT_LINE:
                piece = sock.recv(MAX_COUNT_LINE)
                if not piece:
                    break
                answer += piece
            elapsed = clock() - start
    except TimeoutError:
        return ThroughputResult(target, sent, 0, clock() - start, "timeout")
    except OSError as exc:
        return ThroughputResult(target, sent, 0, clock() - start, type(exc).__name__)
    try:
        received = parse_count(answer)
    except ValueError as exc:
        return ThroughputResult(target, sent, 0, elapsed, str(exc))
    error = None if received == sent else f"the sink counted {received} bytes of {sent} sent"
    return ThroughputResult(target, sent, received, elapsed, error)


class _Sink(asyncio.BufferedProtocol):
    """Counts the bytes of one connection; answers the count when the sender half-closes."""

    _buffer = memoryview(bytearray(SINK_BUFFER))  # shared: the bytes are never looked at

    def __init__(self) -> None:
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.count += nbytes

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write(b"%d\n" % self.count)
        return False  # the transport closes once the answer is written


async def start_sink(host: str, port: int) -> asyncio.Server:
    """Listen for `measure` on host:port (0: any free port); the caller closes the server."""
    return await asyncio.get_running_loop().create_server(_Sink, host, port)
