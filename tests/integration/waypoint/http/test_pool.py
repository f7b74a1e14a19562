"""Upstream pools over real loopback sockets: reuse, limits and Envoy's circuit breaking (UO), connect
failures (UF), resets (UC), idle close, cluster-wide limits shared by endpoint pools, HTTP/2 multiplexing,
connections retired after max requests, and a stale keep-alive connection replaced transparently."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.integration.waypoint.http.conftest import FailingBody, Server, eventually, http_server
from waypoint.http.errors import ConnectFailure, Overflow, UpstreamReset
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
from waypoint.http.pool import ClusterLimits, ConnectionPoolLimits, UpstreamPool

pytestmark = pytest.mark.timeout(60)


def req(path: str = "/", method: str = "GET") -> RequestHead:
    return RequestHead(method, path, "reviews:9080", Headers())


class Gate:
    """A handler that holds every request until released; `arrived` counts requests at the server."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.arrived = 0

    async def __call__(self, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        self.arrived += 1
        await self.open.wait()
        return ResponseHead(200, Headers()), bytes_body(head.path.encode())


async def fetch(pool: UpstreamPool, path: str = "/", protocol: str = "HTTP/1.1") -> bytes:
    _head, body = await pool.request(req(path), EMPTY, protocol)
    return await read_all(body, 1 << 20)


def pool_for(server: Server, limits: ConnectionPoolLimits | None = None) -> UpstreamPool:
    return UpstreamPool(server.dial, limits, name=f"127.0.0.1:{server.port}")


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_sequential_requests_reuse_one_connection(protocol: str) -> None:
    async with http_server() as server:
        pool = pool_for(server)
        for i in range(5):
            assert await fetch(pool, f"/r{i}", protocol) == f"GET reviews:9080/r{i} 0".encode()
        assert server.connections == 1 and pool.connections == 1
        assert {r.protocol for r in server.requests} == {"HTTP/2" if protocol == "HTTP/2" else "HTTP/1.1"}
        await pool.close()


async def test_http1_concurrency_opens_connections_and_http2_multiplexes() -> None:
    gate = Gate()
    async with http_server(gate) as server:
        pool = pool_for(server)
        h1 = [asyncio.create_task(fetch(pool, f"/a{i}")) for i in range(4)]
        h2 = [asyncio.create_task(fetch(pool, f"/b{i}", "HTTP/2")) for i in range(6)]
        await eventually(lambda: gate.arrived == 10, "all requests at the server")
        assert server.connections == 5  # one per HTTP/1.1 request in flight, one HTTP/2 connection for six
        gate.open.set()
        assert await asyncio.gather(*h1) == [f"/a{i}".encode() for i in range(4)]
        assert await asyncio.gather(*h2) == [f"/b{i}".encode() for i in range(6)]
        await pool.close()


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_one_connection_one_pending_then_overflow(protocol: str) -> None:
    """Istio's circuit-breaking task: maxConnections 1, http1MaxPendingRequests 1, concurrency 3. Over
    HTTP/2 a request is pending when the one connection has no stream left (the server allows one)."""
    gate = Gate()
    async with http_server(gate, HttpLimits(h2_max_concurrent_streams=1)) as server:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=1))
        pool = UpstreamPool(server.dial, cluster)
        gate.open.set()
        assert await fetch(pool, "/warm", protocol) == b"/warm"  # connected; the server's SETTINGS are in
        gate.open.clear()
        tasks = [asyncio.create_task(fetch(pool, f"/c{i}", protocol)) for i in range(3)]
        done, _ = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        overflowed = [task for task in done if isinstance(task.exception(), Overflow)]
        assert len(overflowed) == 1
        error = overflowed[0].exception()
        assert isinstance(error, Overflow) and error.response_flag == "UO" and error.status == 503
        await eventually(lambda: gate.arrived == 2, "the warm-up and one request at the server")
        assert cluster.pending == 1
        gate.open.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sorted(r for r in results if isinstance(r, bytes)) == sorted(
            f"/c{i}".encode() for i, task in enumerate(tasks) if task not in overflowed)
        assert server.connections == 1  # the pending request got the connection the first one gave back
        await pool.close()


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_cancelled_requests_give_their_slots_back(protocol: str) -> None:
    gate = Gate()
    async with http_server(gate) as server:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=1))
        pool = UpstreamPool(server.dial, cluster)
        held = asyncio.create_task(fetch(pool, "/held", protocol))
        await eventually(lambda: gate.arrived == 1, "the request at the server")
        if protocol == "HTTP/1.1":
            waiting = asyncio.create_task(fetch(pool, "/waiting", protocol))
            await eventually(lambda: cluster.pending == 1, "a pending request")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert cluster.pending == 0
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert cluster.requests == 0 and cluster.pending == 0
        gate.open.set()
        assert await fetch(pool, "/next", protocol) == b"/next"
        await pool.close()
        assert cluster.connections == 0


async def test_the_pending_queue_serves_requests_in_order_as_connections_free() -> None:
    async with http_server() as server:
        pool = pool_for(server, ConnectionPoolLimits(max_connections=2, http1_max_pending_requests=100))
        results = await asyncio.gather(*[fetch(pool, f"/q{i}") for i in range(30)])
        assert results == [f"GET reviews:9080/q{i} 0".encode() for i in range(30)]
        assert server.connections == 2
        await pool.close()


async def test_http2_max_requests_caps_requests_in_flight() -> None:
    gate = Gate()
    async with http_server(gate) as server:
        pool = pool_for(server, ConnectionPoolLimits(http2_max_requests=2))
        held = [asyncio.create_task(fetch(pool, f"/m{i}", "HTTP/2")) for i in range(2)]
        await eventually(lambda: gate.arrived == 2, "two requests in flight")
        with pytest.raises(Overflow):
            await fetch(pool, "/third", "HTTP/2")
        gate.open.set()
        await asyncio.gather(*held)
        assert await fetch(pool, "/later", "HTTP/2") == b"/later"  # released once the bodies were read
        await pool.close()


async def test_limits_are_shared_by_the_endpoint_pools_of_a_cluster() -> None:
    gate = Gate()
    async with http_server(gate) as a, http_server(gate) as b:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=1))
        pool_a = UpstreamPool(a.dial, cluster, name="a")
        pool_b = UpstreamPool(b.dial, cluster, name="b")
        first = asyncio.create_task(fetch(pool_a, "/a"))
        await eventually(lambda: gate.arrived == 1, "the first request")
        second = asyncio.create_task(fetch(pool_a, "/a2"))  # waits: the cluster's one connection is used
        await eventually(lambda: cluster.pending == 1, "the second request to wait")
        with pytest.raises(Overflow):
            await fetch(pool_a, "/a3")
        assert cluster.overflows == 1
        gate.open.set()
        assert [await first, await second] == [b"/a", b"/a2"]
        assert (a.connections, b.connections) == (1, 0)
        await pool_a.close()
        await pool_b.close()
        assert cluster.connections == 0 and cluster.pending == 0 and cluster.requests == 0


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_a_pool_without_connections_dials_past_the_cluster_limit(protocol: str) -> None:
    """Envoy's ConnPoolImplBase::tryCreateNewConnection: maxConnections is cluster-wide, but an endpoint pool
    with no connection at all opens one anyway (counted as upstream_cx_overflow) rather than wait for a slot
    another endpoint's idle connection may hold forever. A pool that has one queues as before."""
    gate = Gate()
    gate.open.set()
    async with http_server(gate, HttpLimits(h2_max_concurrent_streams=1)) as a, \
            http_server(gate, HttpLimits(h2_max_concurrent_streams=1)) as b:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=1))
        pool_a = UpstreamPool(a.dial, cluster, name="a")
        pool_b = UpstreamPool(b.dial, cluster, name="b")
        assert await fetch(pool_a, "/a", protocol) == b"/a"  # pool a keeps the cluster's one slot, idle
        assert await asyncio.wait_for(fetch(pool_b, "/b", protocol), 5) == b"/b"
        assert (a.connections, b.connections) == (1, 1)
        assert (cluster.connections, cluster.cx_overflows, cluster.overflows) == (2, 1, 0)
        gate.open.clear()
        held = asyncio.create_task(fetch(pool_b, "/held", protocol))
        await eventually(lambda: gate.arrived == 3, "a request on pool b's connection")
        queued = asyncio.create_task(fetch(pool_b, "/queued", protocol))  # pool b has one: it waits
        await eventually(lambda: cluster.pending == 1, "a request waiting in pool b")
        with pytest.raises(Overflow):
            await fetch(pool_b, "/refused", protocol)
        assert cluster.overflows == 1 and b.connections == 1
        gate.open.set()
        assert [await held, await queued] == [b"/held", b"/queued"]
        assert b.connections == 1
        await pool_a.close()
        await pool_b.close()
        assert cluster.connections == 0 and cluster.pending == 0 and cluster.requests == 0


async def test_a_request_waiting_in_a_pool_that_loses_its_last_connection_dials() -> None:
    """Pools a and b each have a busy connection and a waiting request; b's connection breaks. Its waiting
    request must not wait for a's slot: b has no connection left, so it dials past the limit."""
    gate_a, gate_b = Gate(), Gate()
    async with http_server(gate_a) as a, http_server(gate_b) as b:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=2))
        pool_a = UpstreamPool(a.dial, cluster, name="a")
        pool_b = UpstreamPool(b.dial, cluster, name="b")
        held_a = asyncio.create_task(fetch(pool_a, "/held-a"))
        await eventually(lambda: gate_a.arrived == 1, "a request on pool a's connection")
        held_b = asyncio.create_task(fetch(pool_b, "/held-b"))  # pool b has none: past the limit
        await eventually(lambda: gate_b.arrived == 1, "a request on pool b's connection")
        waiting_a = asyncio.create_task(fetch(pool_a, "/waiting-a"))
        waiting_b = asyncio.create_task(fetch(pool_b, "/waiting-b"))
        await eventually(lambda: cluster.pending == 2, "a request waiting in each pool")
        held_b.cancel()  # breaks pool b's only connection
        with pytest.raises(asyncio.CancelledError):
            await held_b
        gate_b.open.set()
        assert await asyncio.wait_for(waiting_b, 5) == b"/waiting-b"
        assert not waiting_a.done()  # pool a still has its connection: it waits for it
        gate_a.open.set()
        assert [await held_a, await waiting_a] == [b"/held-a", b"/waiting-a"]
        await pool_a.close()
        await pool_b.close()
        assert cluster.connections == 0 and cluster.pending == 0


async def test_max_requests_per_connection_retires_connections() -> None:
    async with http_server() as server:
        pool = pool_for(server, ConnectionPoolLimits(max_requests_per_connection=2))
        for i in range(5):
            await fetch(pool, f"/{i}")
        assert server.connections == 3
        for i in range(4):
            await fetch(pool, f"/h2-{i}", "HTTP/2")
        assert server.connections == 5
        await pool.close()


async def test_a_failed_dial_is_a_connect_failure() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there

    async def dial() -> TcpByteStream:
        return await TcpByteStream.connect("127.0.0.1", port)

    cluster = ClusterLimits()
    pool = UpstreamPool(dial, cluster, name=f"127.0.0.1:{port}")
    for protocol in ("HTTP/1.1", "HTTP/2"):
        with pytest.raises(ConnectFailure) as err:
            await fetch(pool, "/", protocol)
        assert err.value.response_flag == "UF" and f"127.0.0.1:{port}" in str(err.value)
    assert cluster.connections == 0 and cluster.requests == 0
    await pool.close()


async def test_a_dial_that_hangs_times_out() -> None:
    async def never() -> TcpByteStream:
        await asyncio.Event().wait()
        raise AssertionError

    pool = UpstreamPool(never, ConnectionPoolLimits(connect_timeout=0.1))
    with pytest.raises(ConnectFailure) as err:
        await fetch(pool)
    assert err.value.reason == "connect_timeout"
    await pool.close()


async def test_a_reset_mid_response_is_upstream_reset_and_the_slot_is_released() -> None:
    async def broken(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        return ResponseHead(200, Headers()), FailingBody(b"x" * 10, UpstreamReset("boom"))

    async with http_server(broken) as server:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1))
        pool = UpstreamPool(server.dial, cluster)
        cases: list[tuple[str, int]] = [("HTTP/1.1", 0), ("HTTP/2", 1)]  # HTTP/2 survives a stream reset
        for protocol, kept in cases:
            _head, body = await pool.request(req(), EMPTY, protocol)
            with pytest.raises(UpstreamReset) as err:
                await read_all(body, 1000)
            assert err.value.response_flag == "UC"
            assert cluster.requests == 0
            assert cluster.connections == kept
        await pool.close()
        assert cluster.connections == 0


async def test_idle_connections_close_after_the_idle_timeout() -> None:
    async with http_server() as server:
        pool = pool_for(server, ConnectionPoolLimits(idle_timeout=0.2))
        await fetch(pool, "/1")
        await fetch(pool, "/2", "HTTP/2")
        assert pool.idle_connections == 2
        await eventually(lambda: pool.connections == 0, "the idle connections to close")
        await eventually(lambda: server.open == 0, "the server to see them closed")
        await pool.close()


async def test_a_keep_alive_connection_the_server_closed_is_replaced_transparently() -> None:
    async with http_server(limits=HttpLimits(idle_timeout=0.1)) as server:
        pool = pool_for(server)
        assert await fetch(pool, "/before")
        await eventually(lambda: server.open == 0, "the server to close the idle connection")
        assert await fetch(pool, "/after") == b"GET reviews:9080/after 0"
        assert server.connections == 2
        await pool.close()


async def test_a_discarded_response_body_closes_an_http1_connection_and_frees_the_slot() -> None:
    async with http_server() as server:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=0))
        pool = UpstreamPool(server.dial, cluster)
        _head, body = await pool.request(req("/big?n=10000000"), EMPTY)
        assert await body.read()
        with pytest.raises(Overflow):
            await fetch(pool, "/busy")  # the connection is still in use
        await body.aclose()
        assert cluster.connections == 0 and cluster.requests == 0
        assert await fetch(pool, "/next") == b"GET reviews:9080/next 0"
        assert server.connections == 2
        await pool.close()


async def test_closing_the_pool_fails_waiters_and_cuts_connections() -> None:
    gate = Gate()
    async with http_server(gate) as server:
        pool = pool_for(server, ConnectionPoolLimits(max_connections=1))
        busy = asyncio.create_task(fetch(pool, "/busy"))
        waiting = asyncio.create_task(fetch(pool, "/waiting"))
        await eventually(lambda: gate.arrived == 1, "the first request")
        await pool.close()
        with pytest.raises(ConnectFailure):
            await waiting
        with pytest.raises(UpstreamReset):
            await busy
        with pytest.raises(ConnectFailure):
            await fetch(pool)


async def test_a_request_lost_on_a_reused_connection_is_resent_once() -> None:
    """The upstream closes a keep-alive connection just as the next request arrives (a race no idle check
    can see): the request, unprocessed and in memory, goes again on a new connection."""
    accepted = 0
    answered = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted, answered
        accepted += 1
        connection = accepted
        while await reader.readuntil(b"\r\n\r\n"):
            if connection == 1 and answered:
                writer.close()  # drop the second request without a byte of answer
                return
            answered += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(flaky, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = UpstreamPool(lambda: TcpByteStream.connect("127.0.0.1", port))
        assert await fetch(pool, "/one") == b"ok"
        assert await fetch(pool, "/two") == b"ok"  # lost on connection 1, re-sent on connection 2
        assert (accepted, answered) == (2, 2)
        await pool.close()
    finally:
        server.close()


async def test_updated_cluster_limits_apply_to_waiting_requests() -> None:
    gate = Gate()
    async with http_server(gate) as server:
        cluster = ClusterLimits(ConnectionPoolLimits(max_connections=1))
        pool = UpstreamPool(server.dial, cluster)
        first = asyncio.create_task(fetch(pool, "/1"))
        second = asyncio.create_task(fetch(pool, "/2"))
        await eventually(lambda: gate.arrived == 1 and cluster.pending == 1, "one in flight, one waiting")
        cluster.update(ConnectionPoolLimits(max_connections=2))  # a DestinationRule change raises the limit
        await eventually(lambda: gate.arrived == 2, "the waiting request to get its own connection")
        gate.open.set()
        assert [await first, await second] == [b"/1", b"/2"]
        with pytest.raises(ValueError, match=r"HTTP/1\.1 or HTTP/2"):
            await fetch(pool, "/x", "HTTP/3")
        await pool.close()
