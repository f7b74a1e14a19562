"""TCP echo server. Without PREFIX it echoes bytes as they arrive; with PREFIX (Istio's tcp-echo runs
with "hello") it answers each line with "<PREFIX> <line>", so `echo world | nc tcp-echo 9000` prints
"hello world" and shows which deployment answered.

One log line per connection: TCP has no requests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass

from samples.common import LISTEN_HOST, env_port, log, run, until_terminated

READ_CHUNK = 64 * 1024
# Longest line PREFIX mode buffers; loadclient's largest payloads fit with room to spare.
MAX_LINE = 4 * 1024 * 1024


@dataclass(frozen=True)
class EchoConfig:
    port: int
    prefix: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EchoConfig:
        return cls(port=env_port(env, "PORT", 9000), prefix=env.get("PREFIX", ""))


async def echo_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    echoed = 0
    while data := await reader.read(READ_CHUNK):
        writer.write(data)
        await writer.drain()
        echoed += len(data)
    return echoed


async def echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes) -> int:
    echoed = 0
    while line := await reader.readline():
        writer.write(prefix + line)
        await writer.drain()
        echoed += len(line)
    return echoed


class EchoServer:
    """Accepts connections and remembers them, so SIGTERM can close the ones still open."""

    def __init__(self, config: EchoConfig) -> None:
        self._prefix = f"{config.prefix} ".encode() if config.prefix else b""
        self._writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._writers.add(writer)
        echoed = 0
        outcome = "closed"
        try:
            if self._prefix:
                echoed = await echo_lines(reader, writer, self._prefix)
            else:
                echoed = await echo_bytes(reader, writer)
        except (ConnectionError, ValueError) as exc:
            # Resets and over-long lines are the client's business: note them, no traceback.
            outcome = f"aborted ({type(exc).__name__})"
        finally:
            self._writers.discard(writer)
            writer.close()
        log.info("connection from %s %s after %d bytes", client, outcome, echoed)

    def close_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()


async def serve() -> None:
    config = EchoConfig.from_env(os.environ)
    echo = EchoServer(config)
    server = await asyncio.start_server(echo.handle, LISTEN_HOST, config.port, limit=MAX_LINE)
    log.info("listening on %s:%d, prefix %r", LISTEN_HOST, config.port, config.prefix)
    try:
        await until_terminated()
        log.info("shutting down")
    finally:
        server.close()
        echo.close_connections()
        await server.wait_closed()


def main() -> None:
    run("tcp-echo", serve)


if __name__ == "__main__":
    main()
