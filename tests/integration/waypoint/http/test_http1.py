"""HTTP/1.1 server and client over real loopback sockets: keep-alive, pipelining, chunked bodies with
trailers, 100-continue, HTTP/1.0, Connection: close, bad and oversized requests, streaming 50 MB with
bounded memory, a slow reader slowing the writer, idle close, and the client's view of broken upstreams."""

from __future__ import annotations

import asyncio
import socket
import struct
import tracemalloc

import pytest

from tests.integration.waypoint.http.conftest import (
    FailingBody,
    GenBody,
    MiB,
    drain,
    eventually,
    http_server,
    raw_exchange,
    stalled,
)
from waypoint.http.errors import UpstreamReset
from waypoint.http.http1 import Http1ClientConnection
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


def get(path: str, method: str = "GET", headers: Headers | None = None) -> RequestHead:
    return RequestHead(method, path, "svc:8080", headers or Headers())


async def client(port: int) -> Http1ClientConnection:
    return Http1ClientConnection(await TcpByteStream.connect("127.0.0.1", port))


async def test_keep_alive_reuses_one_connection() -> None:
    async with http_server() as server:
        conn = await client(server.port)
        for i in range(5):
            head, body = await conn.request(get(f"/r{i}?x=1"), EMPTY)
            assert head.status == 200
            assert await read_all(body, 1000) == f"GET svc:8080/r{i}?x=1 0".encode()
            assert conn.available
        assert server.connections == 1
        assert [r.path for r in server.requests] == [f"/r{i}?x=1" for i in range(5)]
        await conn.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with http_server() as server:
        wire = b"".join(b"GET /p%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i for i in range(3))
        wire += b"GET /last HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
        answer = await raw_exchange(server.port, wire)
        bodies = [b"GET svc/p0 0", b"GET svc/p1 0", b"GET svc/p2 0", b"GET svc/last 0"]
        positions = [answer.index(body) for body in bodies]
        assert positions == sorted(positions)
        assert answer.count(b"HTTP/1.1 200 OK") == 4
        assert b"connection: close" in answer.split(b"GET svc/p2 0")[1]


async def test_chunked_request_and_response_with_trailers_both_ways() -> None:
    async with http_server() as server:
        conn = await client(server.port)
        upload = GenBody(3 * MiB + 7, chunk=100_000, declare=False, trailers=Headers([("x-checksum", "abc")]))
        head, body = await conn.request(get("/echo", "POST"), upload)
        assert head.status == 200 and head.headers.get("x-echo") == "1"
        assert body.length is None  # streamed back chunked
        assert await drain(body) == 3 * MiB + 7
        assert body.trailers == Headers([("x-checksum", "abc")])
        # the raw wire: the server's answer really is chunked with a trailer section
        wire = (b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n")
        answer = await raw_exchange(server.port, wire)
        assert b"transfer-encoding: chunked\r\n" in answer
        assert answer.endswith(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n")
        await conn.close()


async def test_expect_continue_is_answered_before_the_body_is_read() -> None:
    async with http_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /count HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"x-size: 5\r\n" in head
        assert "expect" not in server.requests[0].headers
        writer.close()


async def test_expect_continue_refused_without_reading_closes_the_connection() -> None:
    async def refuse(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(413, Headers()), bytes_body(b"too big")

    async with http_server(refuse) as server:
        answer = await raw_exchange(server.port, b"PUT /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 999999\r\n"
                                                 b"Expect: 100-continue\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
        assert b"100 Continue" not in answer and b"connection: close\r\n" in answer


async def test_unread_small_request_body_is_discarded_and_the_connection_kept() -> None:
    async def ignore(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers()), bytes_body(head.path.encode())

    async with http_server(ignore) as server:
        conn = await client(server.port)
        for path in ("/a", "/b"):
            _head, body = await conn.request(get(path, "POST"), bytes_body(b"x" * 10_000))
            assert await read_all(body, 100) == path.encode()
        assert server.connections == 1
        await conn.close()


async def test_http10_gets_a_close_delimited_answer() -> None:
    async with http_server() as server:
        answer = await raw_exchange(server.port, b"GET /echo HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-length: 0\r\n" in answer and b"connection: close\r\n" in answer
        streamed = await raw_exchange(server.port, b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
        assert b"transfer-encoding" not in streamed


async def test_connection_close_is_honoured() -> None:
    async with http_server() as server:
        answer = await raw_exchange(server.port, b"GET /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
                                                 b"GET /never HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200 OK") == 1 and b"connection: close\r\n" in answer
        assert [r.path for r in server.requests] == ["/x"]


@pytest.mark.parametrize(("wire", "status"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400 Bad Request"),
    (b"GET /pot HTCPCP/1.0\r\n\r\n", b"400 Bad Request"),
    (b"GET / HTTP/1.1\r\n\r\n", b"400 Bad Request"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
     b"431 Request Header Fields Too Large"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
     b"431 Request Header Fields Too Large"),
    (b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n", b"501 Not Implemented"),
    (b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", b"501 Not Implemented"),
])
async def test_bad_requests_are_refused_and_the_connection_closed(wire: bytes, status: bytes) -> None:
    async with http_server() as server:
        answer = await raw_exchange(server.port, wire + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n"), answer[:200]
        assert b"connection: close\r\n" in answer
        assert b"/after" not in answer  # closed: nothing after is served


async def test_h2c_upgrade_requests_are_served_as_http11() -> None:
    async with http_server() as server:
        answer = await raw_exchange(server.port, b"GET /x HTTP/1.1\r\nHost: a\r\n"
                                                 b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                                 b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
                                                 b"GET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200 OK") == 2


async def test_a_handler_exception_is_a_500_and_the_connection_survives() -> None:
    async with http_server() as server:
        conn = await client(server.port)
        head, body = await conn.request(get("/fail"), EMPTY)
        assert head.status == 500
        await read_all(body, 1000)
        head, body = await conn.request(get("/ok"), EMPTY)
        assert head.status == 200 and await read_all(body, 1000) == b"GET svc:8080/ok 0"
        assert server.connections == 1
        await conn.close()


async def test_50_mib_both_ways_with_bounded_memory() -> None:
    async with http_server() as server:
        conn = await client(server.port)
        tracemalloc.start()
        try:
            _, body = await conn.request(get("/echo", "PUT"), GenBody(50 * MiB))
            assert body.length == 50 * MiB
            assert await drain(body) == 50 * MiB
            _head, body = await conn.request(get(f"/big?n={50 * MiB}"), EMPTY)
            assert await drain(body) == 50 * MiB
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
        assert conn.available and server.connections == 1
        await conn.close()


async def test_a_slow_reader_slows_the_writer() -> None:
    endless = GenBody(None)

    async def stream(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers()), endless

    async with http_server(stream) as server:
        conn = await client(server.port)
        _head, body = await conn.request(get("/stream"), EMPTY)
        assert body.length is None
        blocked = await stalled(lambda: endless.produced)
        assert blocked < 16 * MiB  # socket buffers and one read, not the whole stream
        for _ in range(100):  # reading lets the writer continue
            await body.read()
        await eventually(lambda: endless.produced > blocked, "the producer to continue")
        await body.aclose()
        assert conn.closed  # an unfinished response cannot be reused
        await eventually(lambda: server.open == 0, "the server to notice")
        assert endless.closed


async def test_idle_connections_are_closed_by_the_server() -> None:
    async with http_server(limits=HttpLimits(idle_timeout=0.2)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await reader.readuntil(b"GET a/x 0")).startswith(b"HTTP/1.1 200 OK")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after 0.2 s without a request
        writer.close()


async def test_client_sees_an_upstream_reset_mid_body() -> None:
    async def broken(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers()), FailingBody(b"partial", UpstreamReset("gone"))

    async with http_server(broken) as server:
        conn = await client(server.port)
        head, body = await conn.request(get("/x"), EMPTY)
        assert head.status == 200 and await body.read() == b"partial"
        with pytest.raises(UpstreamReset) as err:
            await drain(body)
        assert err.value.response_flag == "UC"
        assert conn.closed and not conn.available


async def test_client_reads_an_early_answer_and_does_not_reuse_the_connection() -> None:
    async def early(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(413, Headers()), bytes_body(b"no thanks")

    async with http_server(early) as server:
        conn = await client(server.port)
        done = asyncio.Event()
        head, body = await conn.request(get("/upload", "POST"), GenBody(64 * MiB, declare=False))
        assert head.status == 413
        assert await read_all(body, 100) == b"no thanks"
        assert conn.closed
        done.set()


async def test_head_responses_keep_their_length_and_the_connection() -> None:
    async def head_ok(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers([("content-length", "1234")])), EMPTY

    async with http_server(head_ok) as server:
        conn = await client(server.port)
        for _ in range(2):
            head, body = await conn.request(get("/x", "HEAD"), EMPTY)
            assert head.headers.get("content-length") == "1234"
            assert await read_all(body, 10) == b""
            assert conn.available
        assert server.connections == 1
        await conn.close()


async def test_client_connection_closed_before_a_response_raises_upstream_reset() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await client(port)
        with pytest.raises(UpstreamReset) as err:
            await conn.request(get("/x"), EMPTY)
        assert not err.value.retryable  # a fresh connection: the request may have been processed
    finally:
        server.close()


async def test_client_reads_a_response_delimited_by_the_connection_closing() -> None:
    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(old_server, "127.0.0.1", 0)
    try:
        conn = await client(server.sockets[0].getsockname()[1])
        head, body = await conn.request(get("/x"), EMPTY)
        assert head.status == 200 and body.length is None
        assert await read_all(body, 100) == b"until the end"
        assert conn.closed and not conn.available
    finally:
        server.close()


class Held:
    """A handler that holds every request until released (or cancelled); `cancelled` counts cancellations."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self.cancelled = 0

    async def __call__(self, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        self.arrived += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return ResponseHead(200, Headers()), bytes_body(head.path.encode())


async def test_a_client_that_resets_while_its_request_is_handled_cancels_the_handler() -> None:
    """Envoy resets the upstream of a request whose client disconnected (flag DC): the handler is cancelled,
    which releases its upstream request and pool slot."""
    held = Held()
    async with http_server(held) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /held HTTP/1.1\r\nHost: svc\r\n\r\n")
        await writer.drain()
        await eventually(lambda: held.arrived == 1, "the request at the handler")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with SO_LINGER 0: RST
        await eventually(lambda: held.cancelled == 1, "the handler to be cancelled")
        await eventually(lambda: server.open == 0, "the server to close the connection")


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    held = Held()
    async with http_server(held) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"POST /held HTTP/1.1\r\nHost: svc\r\ncontent-length: 3\r\n\r\nabc")
            writer.write_eof()  # shutdown(SHUT_WR): the request is complete, the client still reads
            await eventually(lambda: held.arrived == 1, "the request at the handler")
            held.release.set()
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"/held")
        assert held.cancelled == 0


async def test_a_request_pipelined_while_the_first_is_handled_waits_its_turn() -> None:
    held = Held()
    async with http_server(held) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /first HTTP/1.1\r\nHost: svc\r\n\r\n")
            await eventually(lambda: held.arrived == 1, "the first request at the handler")
            writer.write(b"GET /second HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
            writer.write_eof()  # and a half close: neither cancels the first
            await writer.drain()
            held.release.set()
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert answer.count(b"HTTP/1.1 200 OK") == 2
        assert answer.index(b"/first") < answer.index(b"/second")
        assert held.cancelled == 0
