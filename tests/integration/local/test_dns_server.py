"""ClusterDNS over real loopback sockets: UDP and TCP answers, forwarding, SERVFAIL, garbage."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from ambient.local.dns import ClusterDNS, ClusterZone, answer

HOST = "127.0.0.1"
# Every network wait in these tests is bounded, so a broken server fails a test instead of hanging it.
WAIT = 5.0

Query = Callable[[int, bytes], Awaitable[bytes]]


async def udp_query(port: int, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_sendto(sock, data, (HOST, port))
        async with asyncio.timeout(WAIT):
            return await loop.sock_recv(sock, 65535)


async def tcp_query(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        async with asyncio.timeout(WAIT):
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
    finally:
        writer.close()


TRANSPORTS = [pytest.param(udp_query, id="udp"), pytest.param(tcp_query, id="tcp")]


def cluster_zone() -> ClusterZone:
    zone = ClusterZone()
    zone.set_service("default", "web", ["10.96.0.10"], ["10.1.0.5"], headless=False)
    return zone


@pytest.fixture
async def server() -> AsyncIterator[ClusterDNS]:
    async with ClusterDNS(cluster_zone(), host=HOST, port=0) as dns:
        yield dns


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def ask(query: Query, port: int, qname: str, qtype: str = "A") -> DNSRecord:
    request = DNSRecord.question(qname, qtype)
    reply = DNSRecord.parse(await query(port, bytes(request.pack())))
    assert reply.header.id == request.header.id
    assert reply.q == request.q
    return reply


@pytest.mark.parametrize("query", TRANSPORTS)
async def test_a_answer(server: ClusterDNS, query: Query) -> None:
    reply = await ask(query, server.port, "web.default.svc.cluster.local")
    assert reply.header.rcode == RCODE.NOERROR
    assert [(rr.rtype, str(rr.rdata), rr.ttl) for rr in reply.rr] == [(QTYPE.A, "10.96.0.10", 5)]


@pytest.mark.parametrize("query", TRANSPORTS)
async def test_nxdomain(server: ClusterDNS, query: Query) -> None:
    reply = await ask(query, server.port, "nope.default.svc.cluster.local")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert reply.header.aa == 1
    assert reply.rr == []


@pytest.mark.parametrize("query", TRANSPORTS)
async def test_aaaa_is_nodata(server: ClusterDNS, query: Query) -> None:
    reply = await ask(query, server.port, "web.default.svc.cluster.local", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.rr == []


async def test_zone_changes_are_visible_immediately(server: ClusterDNS) -> None:
    server.zone.set_service("default", "web", ["10.96.0.11"], [], headless=False)
    reply = await ask(udp_query, server.port, "web.default.svc.cluster.local")
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.11"]


async def test_tcp_connection_serves_several_queries(server: ClusterDNS) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        queries = [DNSRecord.question(name) for name in ("web.default.svc.cluster.local", "x.cluster.local")]
        writer.write(b"".join(struct.pack("!H", len(q.pack())) + bytes(q.pack()) for q in queries))
        async with asyncio.timeout(WAIT):
            for query in queries:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                assert DNSRecord.parse(await reader.readexactly(length)).header.id == query.header.id
    finally:
        writer.close()


@pytest.mark.parametrize("query", TRANSPORTS)
async def test_forwards_other_domains_to_upstream_verbatim(query: Query) -> None:
    upstream_zone = ClusterZone("corp.example")
    upstream_zone.set_service("ns", "api", ["192.0.2.7"], [], headless=False)
    async with ClusterDNS(upstream_zone, host=HOST, port=0) as upstream:
        dead = f"{HOST}:{closed_udp_port()}"  # tried first, refused at once, then skipped
        async with ClusterDNS(cluster_zone(), host=HOST, port=0, upstreams=[dead, f"{HOST}:{upstream.port}"]) as dns:
            request = bytes(DNSRecord.question("api.ns.svc.corp.example").pack())
            reply = await query(dns.port, request)
            # The upstream's own reply to this query, byte for byte (same id, same flags).
            assert reply == answer(request, upstream_zone, udp=True)
            assert [str(rr.rdata) for rr in DNSRecord.parse(reply).rr] == ["192.0.2.7"]

            missing = await ask(query, dns.port, "gone.ns.svc.corp.example")
            assert missing.header.rcode == RCODE.NXDOMAIN
            assert dns.stats.forwarded == 2
            assert upstream.stats.queries == 2


@pytest.mark.parametrize("query", TRANSPORTS)
async def test_servfail_when_upstream_refuses(query: Query) -> None:
    async with ClusterDNS(
        cluster_zone(), host=HOST, port=0, upstreams=[f"{HOST}:{closed_udp_port()}"], forward_timeout=0.5
    ) as dns:
        reply = await ask(query, dns.port, "example.com")
        assert reply.header.rcode == RCODE.SERVFAIL
        assert dns.stats.servfail == 1


async def test_servfail_when_upstream_is_silent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))  # bound, so no ICMP refusal, and never read: the forward must time out
        upstream = f"{HOST}:{silent.getsockname()[1]}"
        async with ClusterDNS(cluster_zone(), host=HOST, port=0, upstreams=[upstream], forward_timeout=0.2) as dns:
            reply = await ask(udp_query, dns.port, "example.com")
            assert reply.header.rcode == RCODE.SERVFAIL


async def test_servfail_without_upstreams(server: ClusterDNS) -> None:
    reply = await ask(udp_query, server.port, "example.com")
    assert reply.header.rcode == RCODE.SERVFAIL


async def test_survives_garbage_datagrams(server: ClusterDNS) -> None:
    garbage = [b"", b"\x00", b"\xff" * 11, b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\xc0\x0c", bytes(range(256))]
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for data in garbage:
            await loop.sock_sendto(sock, data, (HOST, server.port))
        request = DNSRecord.question("web.default.svc.cluster.local")
        await loop.sock_sendto(sock, bytes(request.pack()), (HOST, server.port))
        async with asyncio.timeout(WAIT):
            # Loopback keeps one socket's datagrams in order: the first reply is to the real query.
            reply = DNSRecord.parse(await loop.sock_recv(sock, 65535))
    assert reply.header.id == request.header.id
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.10"]
    assert server.stats.dropped == len(garbage)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(struct.pack("!H", 100) + b"\x00" * 10, id="short-frame"),
        pytest.param(b"\x00", id="short-length"),
        pytest.param(struct.pack("!H", 3) + b"abc", id="garbage-message"),
    ],
)
async def test_bad_tcp_frame_closes_only_that_connection(server: ClusterDNS, frame: bytes) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        writer.write(frame)
        writer.write_eof()
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""
    finally:
        writer.close()
    reply = await ask(tcp_query, server.port, "web.default.svc.cluster.local")
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.10"]


async def test_close_ends_idle_tcp_clients() -> None:
    dns = ClusterDNS(cluster_zone(), host=HOST, port=0)
    await dns.start()
    reader, writer = await asyncio.open_connection(HOST, dns.port)
    try:
        await ask(tcp_query, dns.port, "web.default.svc.cluster.local")  # the server is up and serving
        async with asyncio.timeout(WAIT):
            await dns.close()
            assert await reader.read() == b""
    finally:
        writer.close()
