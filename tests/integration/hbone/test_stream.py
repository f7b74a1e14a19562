"""A tunnel as a byte stream over real mTLS on loopback: echo both ways, half close in either order, the
CONNECT headers on both ends, and flow control that bounds memory and makes a slow reader slow the writer."""

from __future__ import annotations

import asyncio

import pytest

from ambient.hbone import StreamError
from ambient.hbone.connection import MiB
from tests.integration.hbone.conftest import CLIENT_ID, ECHO_PORT, SERVER_ID, Env, eventually, read_all

pytestmark = pytest.mark.timeout(30)


async def test_echo_both_ways_with_half_close(env: Env) -> None:
    headers = {"baggage": "k8s.namespace.name=default,service.name=sleep",
               "forwarded": 'for="10.244.1.5:40000"',
               "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    stream = await env.connect(headers=headers)
    assert stream.status == 200
    assert stream.peer_identity == str(SERVER_ID)
    assert stream.response_headers["baggage"] == "k8s.namespace.name=echo"

    payload = bytes(range(256)) * 4096  # 1 MiB, crosses frame and window boundaries with the echo
    writer = asyncio.create_task(stream.write(payload))
    received = bytearray()
    while len(received) < len(payload):
        received += await stream.read(100_000)
    await writer
    assert received == payload

    stream.write_eof()  # half close: the server sees EOF, finishes its echo loop and half closes too
    assert await stream.read() == b""
    request = env.requests[0]
    assert request.peer_identity == str(CLIENT_ID)
    assert request.target == ("127.0.0.1", ECHO_PORT)
    assert {k: request.headers[k] for k in headers} == headers
    stream.close()


async def test_server_half_closes_first_and_the_client_keeps_sending(env: Env) -> None:
    done = asyncio.Event()
    received: list[bytes] = []

    async def handler(request):  # type: ignore[no-untyped-def]
        stream = request.respond(200)
        await stream.write(b"banner")
        stream.write_eof()
        received.append(await read_all(stream))
        done.set()

    env.server._handler = handler
    stream = await env.connect()
    assert await read_all(stream) == b"banner"
    await stream.write(b"still talking after your EOF")
    stream.write_eof()
    await asyncio.wait_for(done.wait(), 5)
    assert received == [b"still talking after your EOF"]


async def test_reset_with_cancel_reads_as_eof_and_fails_writes(env: Env) -> None:
    async def handler(request):  # type: ignore[no-untyped-def]
        stream = request.respond(200)
        await stream.write(b"partial")
        stream.abort()

    env.server._handler = handler
    stream = await env.connect()
    assert await read_all(stream) == b"partial"
    with pytest.raises(StreamError) as err:
        await stream.write(b"x")
    assert err.value.reason == "stream_reset"


async def test_a_paused_reader_blocks_the_writer_and_bounds_memory(env: Env) -> None:
    env.gate.clear()  # the echo handler answers 200 but does not read
    stream = await env.connect()
    total, chunk = 64 * MiB, b"\xab" * MiB
    written = 0

    async def write_all() -> None:
        nonlocal written
        for _ in range(total // MiB):
            await stream.write(chunk)
            written += len(chunk)
        stream.write_eof()

    writer = asyncio.create_task(write_all())
    server_stream = (await eventually(lambda: env.requests, "the CONNECT"))[0].stream
    window = env.server.config.stream_window
    await eventually(lambda: server_stream.buffered == window, "the receiver's window to fill")
    # The writer cannot get past one stream window (plus the write in progress): it is blocked, not buffering.
    for _ in range(20):
        await asyncio.sleep(0)
    assert not writer.done()
    assert written <= window + MiB
    assert server_stream.buffered == window

    env.gate.set()  # the reader resumes: everything flows, echoed back to us
    echoed = 0
    while chunk_back := await stream.read():
        echoed += len(chunk_back)
    await writer
    assert written == total
    assert echoed == total
