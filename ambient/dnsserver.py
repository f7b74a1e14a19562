"""The asyncio shell of a DNS server: UDP and TCP on sockets it is given, forwarding to upstreams.

What to answer is not decided here: the owner passes a sans-IO `resolve(data, udp) -> bytes | Forward`
(the local cluster's zone, ztunnel's proxy over the xDS store). This shell owns the sockets, the TCP
framing (RFC 7766), the upstream exchanges and their timeouts, and keeps one bad packet or one bad client
from taking the server down. It never binds a port itself: the local cluster binds host sockets, ztunnel
binds inside a pod's network namespace, and both hand the sockets over.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ambient.aio import OwnedTasks
from ambient.dnsmsg import HEADER_LEN, QR_BIT, Forward, MalformedQuery, comparable_ip, parse_upstream

log = logging.getLogger(__name__)

# 2 s per upstream: glibc waits 5 s in total before giving up, so one retry still fits.
FORWARD_TIMEOUT = 2.0
# 10 s: CoreDNS's idle timeout for TCP clients; RFC 7766 asks for "a few seconds".
TCP_IDLE_TIMEOUT = 10.0
# 1024 concurrent forwards: bounds memory when an upstream is slow and a client keeps asking.
MAX_INFLIGHT_FORWARDS = 1024

# `resolve(query bytes, udp)` → reply bytes or a Forward; raises MalformedQuery for what must be dropped.
Resolve = Callable[[bytes, bool], bytes | Forward]
# `upstream_socket(family)` → a new UDP socket for one upstream exchange (ztunnel makes it in the pod netns,
# marked so that it is not captured again).
UpstreamSocketFactory = Callable[[socket.AddressFamily], socket.socket | Awaitable[socket.socket]]


@dataclass
class DnsStats:
    """Counters of one server; read by tests and admin pages."""

    queries: int = 0
    dropped: int = 0
    forwarded: int = 0
    servfail: int = 0


class _ClientProtocol(asyncio.DatagramProtocol):
    """Serves one UDP socket by handing each datagram to the server."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector transport does not subclass DatagramTransport; it has its methods.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is not None:
            self._server._on_datagram(self.transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors about clients that went away; nothing to do but note it.
        log.debug("%s: UDP socket error: %s", self._server.name, exc)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    """One exchange with one upstream: resolves `reply` with the first response matching the id."""

    def __init__(self, query_id: bytes) -> None:
        self._query_id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        matches = len(data) >= HEADER_LEN and data[:2] == self._query_id and data[2] & QR_BIT
        if matches and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionError("upstream socket closed"))


def _default_upstream_socket(family: socket.AddressFamily) -> socket.socket:
    return socket.socket(family, socket.SOCK_DGRAM)


class DnsServer:
    """Serves DNS on the UDP and TCP sockets handed to `serve_udp` / `serve_tcp` (any number of each).

    Upstreams (`ip`, `ip:port`, `[ipv6]:port`) are tried in order, each for `forward_timeout` seconds;
    when none answers the client gets SERVFAIL. `close()` stops every listener and connection.
    """

    def __init__(
        self,
        resolve: Resolve,
        *,
        upstreams: Sequence[str] = (),
        forward_timeout: float = FORWARD_TIMEOUT,
        upstream_socket: UpstreamSocketFactory | None = None,
        name: str = "dns",
    ) -> None:
        self.resolve = resolve
        self.upstreams = [parse_upstream(u) for u in upstreams]
        self.forward_timeout = forward_timeout
        self.name = name
        self.stats = DnsStats()
        self._upstream_socket = upstream_socket or _default_upstream_socket
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._forwards = OwnedTasks(log)
        self._connections = OwnedTasks(log)
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    async def serve_udp(self, sock: socket.socket) -> None:
        """Start answering datagrams on a bound UDP socket; returns once serving. The server owns `sock`."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _ClientProtocol(self), sock=sock)
        self._udp.append(transport)

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Start accepting on a bound, listening TCP socket; returns once serving. The server owns `sock`."""
        sock.setblocking(False)
        self._tcp.append(await asyncio.start_server(self._serve_tcp, sock=sock))

    async def close(self) -> None:
        for transport in self._udp:
            transport.close()
        self._udp.clear()
        for server in self._tcp:
            server.close()
        await self._forwards.cancel_all()
        await self._connections.cancel_all()
        for writer in list(self._tcp_writers):
            writer.close()
        for server in self._tcp:
            await server.wait_closed()
        self._tcp.clear()

    def _drop(self, exc: MalformedQuery, peer: object) -> None:
        self.stats.dropped += 1
        log.debug("%s dropped a message from %s: %s", self.name, peer, exc)

    def _on_datagram(self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple[Any, ...]) -> None:
        self.stats.queries += 1
        try:
            result = self.resolve(data, True)
        except MalformedQuery as exc:
            self._drop(exc, addr)
            return
        if isinstance(result, bytes):
            _send_udp(transport, result, addr)
        elif len(self._forwards) >= MAX_INFLIGHT_FORWARDS:
            self.stats.dropped += 1
            log.debug("%s dropped %s from %s: too many forwards in flight", self.name, result.qname, addr)
        else:
            self._forwards.spawn(self._forward_udp(transport, result, addr), name=f"dns-forward-{result.qname}")

    async def _forward_udp(self, transport: asyncio.DatagramTransport, forward: Forward,
                           addr: tuple[Any, ...]) -> None:
        _send_udp(transport, await self.resolve_upstream(forward), addr)

    async def resolve_upstream(self, forward: Forward) -> bytes:
        """The first upstream answer to `forward.query`, or its SERVFAIL reply."""
        self.stats.forwarded += 1
        for upstream in self.upstreams:
            try:
                return await self._exchange(forward.query, upstream)
            except (TimeoutError, OSError) as exc:
                log.debug("%s: upstream %s:%d failed for %s: %r", self.name, *upstream, forward.qname, exc)
        self.stats.servfail += 1
        if not self.upstreams:
            log.debug("%s: no upstream resolver for %s: answering SERVFAIL", self.name, forward.qname)
        return forward.servfail

    async def _exchange(self, query: bytes, upstream: tuple[str, int]) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ipaddress.ip_address(upstream[0]).version == 6 else socket.AF_INET
        made = self._upstream_socket(family)
        sock = await made if inspect.isawaitable(made) else made
        try:
            sock.setblocking(False)
            sock.connect(upstream)  # UDP: no packet sent, only the peer fixed, so replies from others are dropped
        except BaseException:
            sock.close()
            raise
        transport, protocol = await loop.create_datagram_endpoint(lambda: _UpstreamProtocol(query[:2]), sock=sock)
        try:
            transport.sendto(query)
            async with asyncio.timeout(self.forward_timeout):
                return await protocol.reply
        finally:
            transport.close()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add_current()
        self._tcp_writers.add(writer)
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        query = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # the client is done, or sent a short frame; either way the stream is over
                self.stats.queries += 1
                try:
                    result = self.resolve(query, False)
                except MalformedQuery as exc:
                    self._drop(exc, peer)
                    return  # framing can no longer be trusted
                reply = result if isinstance(result, bytes) else await self.resolve_upstream(result)
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except ConnectionError as exc:
            log.debug("%s: TCP client %s went away: %s", self.name, peer, exc)
        finally:
            self._tcp_writers.discard(writer)
            writer.close()


def _send_udp(transport: asyncio.DatagramTransport, reply: bytes, addr: tuple[Any, ...]) -> None:
    if not transport.is_closing():
        transport.sendto(reply, addr)


def upstreams_from_resolv_conf(path: str | Path, skip: Iterable[str] = ()) -> list[str]:
    """The `nameserver` addresses of a resolv.conf, minus `skip` (the server's own addresses).

    Skipping our own addresses keeps a server whose host's resolv.conf points at itself from forwarding
    to itself in a loop. Errors reading the file propagate.
    """
    own = {comparable_ip(ip) for ip in skip}
    servers = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and comparable_ip(fields[1]) not in own:
            servers.append(fields[1])
    return servers
