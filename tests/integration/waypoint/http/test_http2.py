"""HTTP/2 (h2c prior knowledge) server and client over real loopback sockets: concurrent multiplexed
streams, gRPC-style trailers both ways, trailers-only answers, resets in both directions, flow control
bounding memory and slowing writers, the peer's stream limit, handler failures, GOAWAY on close."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest
from h2.errors import ErrorCodes

from tests.integration.waypoint.http.conftest import (
    FailingBody,
    GenBody,
    MiB,
    drain,
    eventually,
    http_server,
    stalled,
)
from waypoint.http.errors import StreamReset, UpstreamReset
from waypoint.http.http2 import Http2ClientConnection
from waypoint.http.message import (
    EMPTY,
    Body,
    Headers,
    HttpLimits,
    RequestHead,
    ResponseHead,
    TcpByteStream,
    bytes_body,
    read_all,
)

pytestmark = pytest.mark.timeout(60)

GRPC = Headers([("content-type", "application/grpc"), ("te", "trailers")])


def req(path: str, method: str = "GET", headers: Headers | None = None) -> RequestHead:
    return RequestHead(method, path, "grpc.svc:50051", headers or Headers(), protocol="HTTP/2")


async def client(port: int) -> Http2ClientConnection:
    return Http2ClientConnection(await TcpByteStream.connect("127.0.0.1", port))


async def test_streams_are_multiplexed_and_served_concurrently() -> None:
    arrived = 0
    everyone = asyncio.Event()

    async def rendezvous(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        nonlocal arrived
        arrived += 1
        if arrived == 20:
            everyone.set()
        await everyone.wait()  # only returns once all 20 requests are in flight at the same time
        return ResponseHead(200, Headers()), bytes_body(head.path.encode())

    async with http_server(rendezvous) as server:
        conn = await client(server.port)
        results = await asyncio.wait_for(asyncio.gather(*[conn.request(req(f"/s{i}"), EMPTY) for i in range(20)]), 10)
        assert [await read_all(body, 100) for _, body in results] == [f"/s{i}".encode() for i in range(20)]
        assert server.connections == 1
        assert {r.protocol for r in server.requests} == {"HTTP/2"}
        await conn.close()


async def test_grpc_trailers_pass_both_ways() -> None:
    seen: list[Headers | None] = []

    async def grpc(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        message = await read_all(body, 1 << 20)
        seen.append(body.trailers)
        assert head.headers.get("te") == "trailers"
        return (ResponseHead(200, Headers([("content-type", "application/grpc")])),
                bytes_body(message[::-1], Headers([("grpc-status", "0"), ("grpc-message", "ok")])))

    async with http_server(grpc) as server:
        conn = await client(server.port)
        head, body = await conn.request(req("/pkg.Svc/Call", "POST", GRPC),
                                        bytes_body(b"\x00\x00\x00\x00\x03abc", Headers([("x-req-trailer", "1")])))
        assert head.status == 200 and head.headers.get("content-type") == "application/grpc"
        assert await read_all(body, 100) == b"cba\x03\x00\x00\x00\x00"
        assert body.trailers == Headers([("grpc-status", "0"), ("grpc-message", "ok")])
        assert seen == [Headers([("x-req-trailer", "1")])]
        await conn.close()


async def test_trailers_only_answer() -> None:
    async def unavailable(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers([("content-type", "application/grpc"), ("grpc-status", "14")])), EMPTY

    async with http_server(unavailable) as server:
        conn = await client(server.port)
        head, body = await conn.request(req("/pkg.Svc/Call", "POST", GRPC), bytes_body(b"\x00\x00\x00\x00\x00"))
        assert head.headers.get("grpc-status") == "14"
        assert body.length == 0 and await read_all(body, 10) == b""
        await conn.close()


async def test_large_bodies_stream_both_ways_with_bounded_memory() -> None:
    async with http_server() as server:
        conn = await client(server.port)
        tracemalloc.start()
        try:
            _head, body = await conn.request(req("/echo", "POST"), GenBody(50 * MiB, declare=False))
            assert await drain(body) == 50 * MiB
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 24 * MiB, f"peak {peak / MiB:.1f} MiB"  # windows (1 + 4 MiB) each way, not 50 MiB
        await conn.close()


async def test_a_slow_reader_slows_the_writer_and_windows_bound_the_buffer() -> None:
    endless = GenBody(None, chunk=64 * 1024)

    async def stream(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers()), endless

    async with http_server(stream) as server:
        conn = await client(server.port)
        head, body = await conn.request(req("/stream"), EMPTY)
        blocked = await stalled(lambda: endless.produced)
        assert MiB <= blocked < 12 * MiB  # one stream window plus socket and write buffers
        taken = 0
        while taken < 4 * MiB:
            taken += len(await body.read())
        await eventually(lambda: endless.produced > blocked, "the producer to continue")
        await body.aclose()  # RST_STREAM(CANCEL): the server's handler stops producing
        await eventually(lambda: endless.closed, "the server to drop the response body")
        head, body = await conn.request(req("/after"), EMPTY)  # the connection is still fine
        assert head.status == 200
        await read_all(body, 100)
        await conn.close()


async def test_a_client_reset_fails_the_request_body_and_cancels_the_handler() -> None:
    body_error: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    handler_cancelled = asyncio.Event()

    async def reader(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        inner = asyncio.ensure_future(drain(body))  # outlives the handler's cancellation
        inner.add_done_callback(lambda task: body_error.set_result(task.exception()))
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        return ResponseHead(200, Headers()), EMPTY

    async with http_server(reader) as server:
        conn = await client(server.port)
        upload = GenBody(None)
        task = asyncio.create_task(conn.request(req("/up", "POST"), upload))
        await eventually(lambda: upload.produced > MiB, "the upload to flow")
        task.cancel()  # the caller gives up: RST_STREAM(CANCEL)
        error = await asyncio.wait_for(body_error, 5)
        assert isinstance(error, StreamReset) and error.error_code == ErrorCodes.CANCEL
        assert "reset HTTP/2 stream 1 with CANCEL" in str(error)
        await asyncio.wait_for(handler_cancelled.wait(), 5)
        assert conn.available and conn.active == 0
        await conn.close()


async def test_a_lost_client_connection_cancels_the_handlers_of_its_streams() -> None:
    arrived = 0
    cancelled = 0

    async def held(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        nonlocal arrived, cancelled
        arrived += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return ResponseHead(200, Headers()), EMPTY

    async with http_server(held) as server:
        stream = await TcpByteStream.connect("127.0.0.1", server.port)
        conn = Http2ClientConnection(stream)
        tasks = [asyncio.create_task(conn.request(req(f"/held{i}"), EMPTY)) for i in range(2)]
        await eventually(lambda: arrived == 2, "both requests at the handler")
        stream.abort()  # the client's connection is gone (no GOAWAY, no RST_STREAM)
        await eventually(lambda: cancelled == 2, "both handlers to be cancelled")
        await asyncio.gather(*tasks, return_exceptions=True)
        await conn.close()


async def test_a_server_reset_mid_body_is_an_upstream_reset_for_the_client() -> None:
    async def broken(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers()), FailingBody(b"partial", UpstreamReset("its upstream went away"))

    async with http_server(broken) as server:
        conn = await client(server.port)
        _head, body = await conn.request(req("/x"), EMPTY)
        assert await body.read() == b"partial"
        with pytest.raises(UpstreamReset) as err:
            await drain(body)
        assert err.value.error_code == ErrorCodes.INTERNAL_ERROR and err.value.response_flag == "UC"
        assert conn.available  # only that stream died
        await conn.close()


async def test_available_is_false_past_the_peers_max_concurrent_streams() -> None:
    gate = asyncio.Event()

    async def held(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        await gate.wait()
        return ResponseHead(200, Headers()), EMPTY

    async with http_server(held, HttpLimits(h2_max_concurrent_streams=2)) as server:
        conn = await client(server.port)
        await eventually(lambda: conn.max_streams == 2, "the server's SETTINGS")
        first = [asyncio.create_task(conn.request(req(f"/h{i}"), EMPTY)) for i in range(2)]
        await eventually(lambda: len(server.requests) == 2, "both streams at the server")
        assert not conn.available
        with pytest.raises(UpstreamReset) as err:
            await conn.request(req("/third"), EMPTY)
        assert err.value.retryable
        gate.set()
        for task in first:
            _, body = await task
            await read_all(body, 10)
        assert conn.available
        await conn.close()


async def test_a_handler_exception_is_a_500_on_that_stream_only() -> None:
    async with http_server() as server:
        conn = await client(server.port)
        failed, fine = await asyncio.gather(conn.request(req("/fail"), EMPTY), conn.request(req("/ok"), EMPTY))
        assert failed[0].status == 500 and fine[0].status == 200
        assert await read_all(fine[1], 100) == b"GET grpc.svc:50051/ok 0"
        await read_all(failed[1], 100)
        await conn.close()


async def test_the_server_says_goaway_when_it_closes_an_idle_connection() -> None:
    async with http_server(limits=HttpLimits(idle_timeout=0.2)) as server:
        conn = await client(server.port)
        _head, body = await conn.request(req("/x"), EMPTY)
        await read_all(body, 100)
        await eventually(lambda: conn.closed, "the idle connection to be closed")
        assert conn.goaway_received is not None
        assert not conn.available
        await eventually(lambda: server.open == 0, "the server side to finish")


async def test_head_and_204_have_no_body() -> None:
    async def answers(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        if head.method == "HEAD":
            return ResponseHead(200, Headers([("content-length", "99")])), EMPTY
        return ResponseHead(204, Headers()), EMPTY

    async with http_server(answers) as server:
        conn = await client(server.port)
        head, body = await conn.request(req("/h", "HEAD"), EMPTY)
        assert head.headers.get("content-length") == "99" and await read_all(body, 10) == b""
        head, body = await conn.request(req("/n", "DELETE"), EMPTY)
        assert head.status == 204 and await read_all(body, 10) == b""
        await conn.close()
