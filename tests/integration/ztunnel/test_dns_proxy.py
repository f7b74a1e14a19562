"""ztunnel's DNS proxy over real loopback sockets (the sockets handed over, as ztunnel does inside a pod's netns):
mesh answers over UDP and TCP, forwarding to the node's resolver, SERVFAIL, garbage, live snapshot updates."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from ambient.dnsserver import DnsServer
from ambient.xds.store import WorkloadStore
from tests.unit.ztunnel.test_decision import service, snapshot_of
from ztunnel.dns import DnsProxy

HOST = "127.0.0.1"
# Every network wait is bounded, so a broken server fails a test instead of hanging it.
WAIT = 5.0

Query = Callable[[tuple[str, int], bytes], Awaitable[bytes]]


async def udp_query(addr: tuple[str, int], data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_sendto(sock, data, addr)
        async with asyncio.timeout(WAIT):
            return await loop.sock_recv(sock, 65535)


async def tcp_query(addr: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        async with asyncio.timeout(WAIT):
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
    finally:
        writer.close()


TRANSPORTS = [pytest.param(udp_query, id="udp"), pytest.param(tcp_query, id="tcp")]


def sockets() -> tuple[socket.socket, socket.socket, tuple[str, int], tuple[str, int]]:
    """A bound UDP socket and a listening TCP socket, as ztunnel opens them on 15053 in a pod."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind((HOST, 0))
    tcp.listen()
    return udp, tcp, udp.getsockname(), tcp.getsockname()


def node_resolver(data: bytes, udp: bool) -> bytes:
    """The node's resolver: knows example.org, says NXDOMAIN to everything else (as the cluster DNS would)."""
    query = DNSRecord.parse(data)
    reply = query.reply()
    if str(query.q.qname) == "example.org.":
        reply.add_answer(RR("example.org.", QTYPE.A, rdata=A("192.0.2.80"), ttl=60))
    else:
        reply.header.rcode = RCODE.NXDOMAIN
    return bytes(reply.pack())


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[DnsServer, str]]:
    server = DnsServer(node_resolver, name="node resolver")
    udp, tcp, addr, _ = sockets()
    tcp.close()
    await server.serve_udp(udp)
    try:
        yield server, f"{addr[0]}:{addr[1]}"
    finally:
        await server.close()


class Proxy:
    def __init__(self, proxy: DnsProxy, udp: tuple[str, int], tcp: tuple[str, int], store: WorkloadStore) -> None:
        self.proxy, self.store = proxy, store
        self.addr: dict[Query, tuple[str, int]] = {udp_query: udp, tcp_query: tcp}


@pytest.fixture
async def proxy(upstream: tuple[DnsServer, str]) -> AsyncIterator[Proxy]:
    store = WorkloadStore()
    snapshot_of(service("web", vips=["10.96.0.10"], ports=[(80, 8080)]), store=store)
    udp, tcp, udp_addr, tcp_addr = sockets()
    dns = DnsProxy(lambda: store.snapshot, [upstream[1]], namespace="default")
    await dns.serve_udp(udp)
    await dns.serve_tcp(tcp)
    try:
        yield Proxy(dns, udp_addr, tcp_addr, store)
    finally:
        await dns.close()


async def ask(query: Query, addr: tuple[str, int], qname: str, qtype: str = "A") -> DNSRecord:
    request = DNSRecord.question(qname, qtype)
    reply = DNSRecord.parse(await query(addr, bytes(request.pack())))
    assert (reply.header.id, reply.q) == (request.header.id, request.q)
    return reply


@pytest.mark.parametrize("query", TRANSPORTS)
async def test_mesh_service_is_answered_locally(proxy: Proxy, query: Query) -> None:
    reply = await ask(query, proxy.addr[query], "web")
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [("web.", "10.96.0.10")]
    assert proxy.proxy.stats.forwarded == 0


@pytest.mark.parametrize("query", TRANSPORTS)
async def test_other_names_go_to_the_node_resolver(proxy: Proxy, upstream: tuple[DnsServer, str],
                                                   query: Query) -> None:
    reply = await ask(query, proxy.addr[query], "example.org")
    assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.80"]
    missing = await ask(query, proxy.addr[query], "nope.default.svc.cluster.local")
    assert missing.header.rcode == RCODE.NXDOMAIN  # the cluster DNS's word, not ours
    assert (proxy.proxy.stats.forwarded, upstream[0].stats.queries) == (2, 2)


async def test_snapshot_updates_are_visible_at_once(proxy: Proxy) -> None:
    snapshot_of(service("api", vips=["10.96.0.20"]), store=proxy.store)
    reply = await ask(udp_query, proxy.addr[udp_query], "api.default.svc.cluster.local")
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.20"]


async def test_upstream_sockets_come_from_the_factory(upstream: tuple[DnsServer, str]) -> None:
    made: list[socket.AddressFamily] = []

    def factory(family: socket.AddressFamily) -> socket.socket:
        made.append(family)  # ztunnel creates it in the pod's netns with SO_MARK 1337 here
        return socket.socket(family, socket.SOCK_DGRAM)

    udp, tcp, addr, _ = sockets()
    tcp.close()
    async with DnsProxy(snapshot_of, [upstream[1]], namespace="default", upstream_socket=factory) as dns:
        await dns.serve_udp(udp)
        reply = await ask(udp_query, addr, "example.org")
    assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.80"]
    assert made == [socket.AF_INET]


async def test_servfail_when_the_node_resolver_is_silent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))  # bound, so no ICMP refusal, and never read: the forward must time out
        udp, tcp, udp_addr, tcp_addr = sockets()
        resolver = f"{HOST}:{silent.getsockname()[1]}"
        async with DnsProxy(snapshot_of, [resolver], namespace="default", forward_timeout=0.2) as dns:
            await dns.serve_udp(udp)
            await dns.serve_tcp(tcp)
            for query, addr in ((udp_query, udp_addr), (tcp_query, tcp_addr)):
                assert (await ask(query, addr, "example.org")).header.rcode == RCODE.SERVFAIL
            assert dns.stats.servfail == 2


async def test_garbage_does_not_stop_the_proxy(proxy: Proxy) -> None:
    loop = asyncio.get_running_loop()
    addr = proxy.addr[udp_query]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for data in (b"", b"\xff" * 11, bytes(range(256))):
            await loop.sock_sendto(sock, data, addr)
        request = DNSRecord.question("web.default.svc.cluster.local")
        await loop.sock_sendto(sock, bytes(request.pack()), addr)
        async with asyncio.timeout(WAIT):
            reply = DNSRecord.parse(await loop.sock_recv(sock, 65535))  # the first reply is to the real query
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.10"]
    assert proxy.proxy.stats.dropped == 3
    # A bad TCP frame ends only that connection.
    reader, writer = await asyncio.open_connection(*proxy.addr[tcp_query])
    try:
        writer.write(struct.pack("!H", 3) + b"abc")
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert (await ask(tcp_query, proxy.addr[tcp_query], "web")).rr


async def test_close_stops_serving() -> None:
    udp, tcp, _, tcp_addr = sockets()
    dns = DnsProxy(snapshot_of, [], namespace="default")
    await dns.serve_udp(udp)
    await dns.serve_tcp(tcp)
    reader, writer = await asyncio.open_connection(*tcp_addr)
    try:
        async with asyncio.timeout(WAIT):
            await dns.close()
            assert await reader.read() == b""  # open clients are closed too
    finally:
        writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*tcp_addr)
