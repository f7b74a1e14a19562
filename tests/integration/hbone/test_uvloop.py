"""The same tunnel on uvloop, which ztunnel runs on when available: its transports are not asyncio's
classes and its TLS layer batches differently, so echo, half close and backpressure are checked there too."""

from __future__ import annotations

import asyncio

import pytest

from ambient.hbone.connection import MiB
from tests.integration.hbone.conftest import ECHO_PORT, Mesh, eventually, running_env

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
pytestmark = pytest.mark.timeout(30)


def test_echo_half_close_and_backpressure_on_uvloop(mesh: Mesh) -> None:
    async def scenario() -> None:
        async with running_env(mesh) as env:
            env.gate.clear()
            stream = await env.connect(f"127.0.0.1:{ECHO_PORT}")
            writer = asyncio.create_task(stream.write(b"\x01" * (16 * MiB)))
            server_stream = (await eventually(lambda: env.requests, "the CONNECT"))[0].stream
            window = env.server.config.stream_window
            await eventually(lambda: server_stream.buffered == window, "the receiver's window to fill")
            assert not writer.done()
            env.gate.set()
            echoed = 0
            while echoed < 16 * MiB:
                echoed += len(await stream.read())
            await writer
            stream.write_eof()
            assert await stream.read() == b""
            stream.close()

    uvloop.run(scenario())
