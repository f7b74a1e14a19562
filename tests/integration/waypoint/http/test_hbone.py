"""The HTTP layer over real HBONE tunnels (mTLS + HTTP/2 CONNECT on loopback), as the waypoint uses it:
pools dial tunnels, servers serve HTTP inside them. Keep-alive reuses one tunnel, HTTP/2 multiplexes inside
one tunnel, 50 MB stream through with bounded memory, circuit breaking and idle close behave as over TCP,
and a proxy chain (client → serve_http1 → pool → HBONE → server) streams both ways with backpressure."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from tests.integration.hbone.conftest import Mesh
from tests.integration.waypoint.http.conftest import (
    GenBody,
    MiB,
    drain,
    eventually,
    hbone_env,
    stalled,
)
from waypoint.http.errors import Overflow, UpstreamError
from waypoint.http.http1 import Http1ClientConnection, serve_http1
from waypoint.http.message import (
    EMPTY,
    Body,
    Headers,
    RequestHead,
    ResponseHead,
    TcpByteStream,
    bytes_body,
    read_all,
)
from waypoint.http.pool import ConnectionPoolLimits, UpstreamPool

pytestmark = pytest.mark.timeout(90)


def req(path: str, method: str = "GET", headers: Headers | None = None) -> RequestHead:
    return RequestHead(method, path, "reviews.default.svc.cluster.local:9080", headers or Headers())


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_requests_reuse_one_tunnel(mesh: Mesh, protocol: str) -> None:
    async with hbone_env(mesh) as env:
        pool = UpstreamPool(env.dialer(), name="reviews-v1")
        for i in range(10):
            _head, body = await pool.request(req(f"/r{i}"), EMPTY, protocol)
            assert await read_all(body, 1000) == f"GET reviews.default.svc.cluster.local:9080/r{i} 0".encode()
        assert len(env.tunnels) == 1
        assert env.tunnels[0].peer_identity == str(mesh.client_cert.identity)
        await pool.close()
        await eventually(lambda: env.open_tunnels == 0, "the tunnel to close with the pool")


async def test_http2_streams_multiplex_inside_one_tunnel_with_grpc_trailers(mesh: Mesh) -> None:
    arrived = 0
    everyone = asyncio.Event()

    async def grpc(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        nonlocal arrived
        message = await read_all(body, 1 << 20)
        arrived += 1
        if arrived == 10:
            everyone.set()
        await everyone.wait()
        return (ResponseHead(200, Headers([("content-type", "application/grpc")])),
                bytes_body(message, Headers([("grpc-status", "0")])))

    async with hbone_env(mesh, grpc) as env:
        pool = UpstreamPool(env.dialer())
        grpc_headers = Headers([("content-type", "application/grpc"), ("te", "trailers")])
        results = await asyncio.wait_for(asyncio.gather(*[
            pool.request(req("/pkg.Svc/Call", "POST", grpc_headers), bytes_body(b"m%d" % i), "HTTP/2")
            for i in range(10)]), 10)
        for i, (_head, body) in enumerate(results):
            assert await read_all(body, 100) == b"m%d" % i
            assert body.trailers == Headers([("grpc-status", "0")])
        assert len(env.tunnels) == 1
        await pool.close()


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_50_mib_streams_through_a_tunnel_with_bounded_memory(mesh: Mesh, protocol: str) -> None:
    async with hbone_env(mesh) as env:
        pool = UpstreamPool(env.dialer())
        tracemalloc.start()
        try:
            _head, body = await pool.request(req("/echo", "PUT"), GenBody(50 * MiB), protocol)
            assert await drain(body) == 50 * MiB
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # HBONE windows (4 MiB stream / 16 MiB connection) plus ours each way; never the 50 MiB
        assert peak < 40 * MiB, f"peak {peak / MiB:.1f} MiB"
        await pool.close()


async def test_circuit_breaking_over_hbone(mesh: Mesh) -> None:
    gate = asyncio.Event()

    async def held(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        await gate.wait()
        return ResponseHead(200, Headers()), bytes_body(head.path.encode())

    async with hbone_env(mesh, held) as env:
        pool = UpstreamPool(env.dialer(), ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=1))

        async def fetch(path: str) -> bytes:
            _head, body = await pool.request(req(path), EMPTY)
            return await read_all(body, 100)

        tasks = [asyncio.create_task(fetch(f"/c{i}")) for i in range(3)]
        await eventually(lambda: any(t.done() for t in tasks), "one request to overflow")
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, Overflow) for r in results) == 1
        assert sorted(r for r in results if isinstance(r, bytes)) == sorted(
            f"/c{i}".encode() for i, r in enumerate(results) if isinstance(r, bytes))
        assert len(env.tunnels) == 1
        await pool.close()


async def test_idle_tunnels_are_closed(mesh: Mesh) -> None:
    async with hbone_env(mesh) as env:
        pool = UpstreamPool(env.dialer(), ConnectionPoolLimits(idle_timeout=0.2))
        _head, body = await pool.request(req("/x"), EMPTY)
        await read_all(body, 100)
        assert env.open_tunnels == 1
        await eventually(lambda: env.open_tunnels == 0, "the idle tunnel to close")
        assert pool.connections == 0
        await pool.close()


async def test_a_proxy_chain_streams_both_ways_with_backpressure(mesh: Mesh) -> None:
    """client ─TCP/HTTP1─▶ serve_http1(proxy) ─pool─▶ HBONE ─▶ serve(HTTP/2 or 1) ─▶ handler."""
    endless = GenBody(None)

    async def upstream(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        if head.path_only == "/endless":
            return ResponseHead(200, Headers()), endless
        return ResponseHead(200, Headers([("x-upstream", head.protocol)])), body  # echo, trailers included

    async with hbone_env(mesh, upstream) as env:
        pool = UpstreamPool(env.dialer())

        async def proxy(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
            protocol = "HTTP/2" if head.headers.get("x-via") == "h2" else "HTTP/1.1"
            try:
                return await pool.request(head, body, protocol)
            except UpstreamError as exc:
                return ResponseHead(exc.status, Headers([("x-flag", exc.response_flag)])), EMPTY

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await serve_http1(TcpByteStream(reader, writer), proxy)
            except asyncio.CancelledError:
                pass

        listening = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        port = listening.sockets[0].getsockname()[1]
        try:
            downstream = Http1ClientConnection(await TcpByteStream.connect("127.0.0.1", port))
            for via in ("h1", "h2"):
                upload = GenBody(20 * MiB + 3, declare=False, trailers=Headers([("x-sum", via)]))
                head, body = await downstream.request(req("/echo", "POST", Headers([("x-via", via)])), upload)
                assert head.headers.get("x-upstream") == ("HTTP/2" if via == "h2" else "HTTP/1.1")
                assert await drain(body) == 20 * MiB + 3
                assert body.trailers == Headers([("x-sum", via)])
            # 100-continue through the proxy: answered when the upstream request starts taking the body
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT /echo HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 5\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            answer = await asyncio.wait_for(reader.readuntil(b"hello"), 5)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5\r\n" in answer
            writer.close()
            head, body = await downstream.request(req("/endless"), EMPTY)
            blocked = await stalled(lambda: endless.produced)
            assert blocked < 32 * MiB  # the HBONE and TCP windows and buffers on the way, not more
            await body.aclose()
            await eventually(lambda: endless.closed, "the upstream to stop producing")
            await downstream.close()
        finally:
            listening.close()
            await pool.close()


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


async def test_a_tunnel_closed_while_its_http1_request_is_handled_cancels_the_handler(mesh: Mesh) -> None:
    """close() on the calling side (END_STREAM, then RST_STREAM: the tunnel can no longer carry an answer)
    cancels the handler, as Envoy resets the upstream of a request whose caller left (flag DC)."""
    held = Held()
    async with hbone_env(mesh, held) as env:
        tunnel = await env.dial()
        await tunnel.write(b"GET /held HTTP/1.1\r\nHost: svc\r\n\r\n")
        await eventually(lambda: held.arrived == 1, "the request at the handler")
        tunnel.close()
        await eventually(lambda: held.cancelled == 1, "the handler to be cancelled")
        await eventually(lambda: env.open_tunnels == 0, "the server to end the tunnel")


async def test_a_tunnel_half_closed_after_its_http1_request_still_gets_the_answer(mesh: Mesh) -> None:
    held = Held()
    async with hbone_env(mesh, held) as env:
        tunnel = await env.dial()
        await tunnel.write(b"GET /held HTTP/1.1\r\nHost: svc\r\n\r\n")
        tunnel.write_eof()  # END_STREAM only: the request is complete, the caller still reads
        await eventually(lambda: held.arrived == 1, "the request at the handler")
        await eventually(lambda: tunnel.at_eof is False and env.open_tunnels == 1, "the tunnel open")
        held.release.set()
        answer = b""
        async with asyncio.timeout(5):
            while chunk := await tunnel.read():
                answer += chunk
        tunnel.close()
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"/held")
        assert held.cancelled == 0
