"""Cluster DNS for the local cluster: the minimal part of CoreDNS's kubernetes plugin.

Answers ``<svc>.<ns>.svc.<domain>`` (cluster IP, or the ready endpoint IPs of a headless
service) and ``<a-b-c-d>.<ns>.pod.<domain>`` (pods the zone knows), and forwards every name
outside the domain to the upstream resolvers of the host's resolv.conf.

The decision logic is sans-IO: :class:`ClusterZone` is the in-memory index and :func:`answer`
turns query bytes into reply bytes or a :class:`Forward` decision. :class:`ClusterDNS` is the
thin asyncio shell that owns the UDP and TCP sockets and talks to upstreams.

What this module must not do: watch the API server (the caller feeds the zone through its
mutators), recurse itself (it relays upstream answers verbatim), or let one bad packet or one
bad client take the server down.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnslib import AAAA, OPCODE, QTYPE, RCODE, RR, A, DNSBuffer, DNSHeader, DNSQuestion, DNSRecord

from ambient.aio import OwnedTasks

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = "cluster.local"
DNS_PORT = 53
# 5 s: CoreDNS's kubernetes plugin default; short enough that a moved pod is found again soon.
ZONE_TTL = 5
# 2 s per upstream: glibc waits 5 s in total before giving up, so one retry still fits.
FORWARD_TIMEOUT = 2.0
# 10 s: CoreDNS's idle timeout for TCP clients; RFC 7766 asks for "a few seconds".
TCP_IDLE_TIMEOUT = 10.0
# 512 bytes: the RFC 1035 UDP limit for clients that do not announce EDNS0.
CLASSIC_UDP_PAYLOAD = 512
# 1232 bytes: the DNS Flag Day 2020 ceiling that avoids IP fragmentation, whatever EDNS0 asks for.
MAX_UDP_PAYLOAD = 1232
# 1024 concurrent forwards: bounds memory when an upstream is slow and a client keeps asking.
MAX_INFLIGHT_FORWARDS = 1024
# A few attempts at finding a port free for both UDP and TCP when the caller asks for port 0.
_EPHEMERAL_BIND_ATTEMPTS = 8

_HEADER_LEN = 12
_MAX_NAME_LEN = 255
_QR_BIT = 0x80  # in the third byte of the header
_ADDRESS_CLASSES = (1, 255)  # IN and ANY ("*" in dnslib's table)


class ClusterDNSError(Exception):
    """Base of this module's errors; ``reason`` is a stable label for logs and metrics."""

    reason = "cluster_dns_error"


class MalformedQuery(ClusterDNSError):
    """The bytes are not a DNS query we can answer; the server drops them without a reply."""

    reason = "malformed_query"


class InvalidRecord(ClusterDNSError):
    """A zone mutator got an address that is not an IP address."""

    reason = "invalid_record"


class InvalidUpstream(ClusterDNSError):
    """An upstream resolver is not written as ``ip``, ``ip:port`` or ``[ipv6]:port``."""

    reason = "invalid_upstream"


class Outcome(enum.Enum):
    """What the zone knows about a name."""

    ADDRESSES = "addresses"  # the name has address records
    NODATA = "nodata"  # the name exists but has no address records
    NXDOMAIN = "nxdomain"  # the name is in our domain and does not exist
    FORWARD = "forward"  # the name is outside our domain


@dataclass(frozen=True)
class Answer:
    """Result of :meth:`ClusterZone.lookup`; ``addresses`` is set only for ``ADDRESSES``."""

    outcome: Outcome
    addresses: tuple[str, ...] = ()


_NODATA = Answer(Outcome.NODATA)
_NXDOMAIN = Answer(Outcome.NXDOMAIN)
_FORWARD = Answer(Outcome.FORWARD)


def _normalise_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise InvalidRecord(f"{ip!r} is not an IP address") from None


def _pod_label_ip(label: str) -> str | None:
    """``10-1-0-5`` -> ``10.1.0.5``; ``fd00--5`` -> ``fd00::5``; anything else -> None."""
    parts = label.split("-")
    text = ".".join(parts) if len(parts) == 4 and all(p.isdigit() for p in parts) else ":".join(parts)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class ClusterZone:
    """The names of one cluster domain, built from Services and Pods.

    A namespace exists in the zone (``<ns>.svc.<domain>`` answers NODATA rather than NXDOMAIN)
    while it holds at least one service or pod the zone was told about.
    """

    def __init__(self, domain: str = DEFAULT_DOMAIN) -> None:
        self.domain = domain.strip(".").lower()
        self._domain_labels = tuple(self.domain.split("."))
        # namespace -> service name -> addresses answered for the service name
        self._services: dict[str, dict[str, tuple[str, ...]]] = {}
        # namespace -> pod IPs
        self._pods: dict[str, set[str]] = {}

    def set_service(
        self,
        namespace: str,
        name: str,
        cluster_ips: Sequence[str],
        endpoint_ips: Sequence[str],
        headless: bool,
    ) -> None:
        """Add or replace a service; ``endpoint_ips`` are its ready endpoints."""
        chosen = endpoint_ips if headless else cluster_ips
        addresses = tuple(dict.fromkeys(_normalise_ip(ip) for ip in chosen))
        self._services.setdefault(namespace.lower(), {})[name.lower()] = addresses

    def delete_service(self, namespace: str, name: str) -> None:
        services = self._services.get(namespace.lower())
        if services is None:
            return
        services.pop(name.lower(), None)
        if not services:
            del self._services[namespace.lower()]

    def set_pod(self, namespace: str, ip: str) -> None:
        self._pods.setdefault(namespace.lower(), set()).add(_normalise_ip(ip))

    def delete_pod(self, namespace: str, ip: str) -> None:
        pods = self._pods.get(namespace.lower())
        if pods is None:
            return
        try:
            pods.discard(_normalise_ip(ip))
        except InvalidRecord:
            return
        if not pods:
            del self._pods[namespace.lower()]

    def lookup(self, qname: str) -> Answer:
        """Look a dotted name up, case-insensitively, with or without the trailing dot."""
        name = qname.lower()
        name = name.removesuffix(".")
        return self.lookup_labels(tuple(name.split(".")) if name else ())

    def lookup_labels(self, labels: Sequence[str]) -> Answer:
        """Look a name up given as labels (as they come off the wire); labels are lower-cased here."""
        labels = tuple(label.lower() for label in labels)
        depth = len(self._domain_labels)
        if len(labels) < depth or labels[len(labels) - depth :] != self._domain_labels:
            return _FORWARD
        rest = labels[: len(labels) - depth]
        match rest:
            case () | ("svc",) | ("pod",):
                return _NODATA
            case (namespace, "svc" | "pod"):
                return _NODATA if self._namespace_exists(namespace) else _NXDOMAIN
            case (name, namespace, "svc"):
                addresses = self._services.get(namespace, {}).get(name)
                if addresses is None:
                    return _NXDOMAIN
                return Answer(Outcome.ADDRESSES, addresses) if addresses else _NODATA
            case (ip_label, namespace, "pod"):
                ip = _pod_label_ip(ip_label)
                if ip is None or ip not in self._pods.get(namespace, ()):
                    return _NXDOMAIN
                return Answer(Outcome.ADDRESSES, (ip,))
            case _:
                return _NXDOMAIN

    def _namespace_exists(self, namespace: str) -> bool:
        return namespace in self._services or namespace in self._pods


@dataclass(frozen=True)
class Forward:
    """Decision to relay ``query`` verbatim to an upstream; ``servfail`` is the reply if none answers."""

    query: bytes
    qname: str
    servfail: bytes


@dataclass(frozen=True)
class _Query:
    header: Any  # dnslib.DNSHeader
    question: Any  # dnslib.DNSQuestion
    udp_limit: int


def _parse_query(data: bytes) -> _Query:
    if len(data) < _HEADER_LEN:
        raise MalformedQuery(f"{len(data)} bytes is shorter than a DNS header")
    if data[2] & _QR_BIT:
        # Never answer a response: that is how two servers end up in a reflection loop.
        raise MalformedQuery("message is a response, not a query")
    buffer = DNSBuffer(data)
    header = DNSHeader.parse(buffer)
    if header.q != 1:
        # Real stub resolvers always ask one question; anything else is noise we do not reflect.
        raise MalformedQuery(f"expected one question, got {header.q}")
    question = DNSQuestion.parse(buffer)
    if len(b".".join(question.qname.label)) > _MAX_NAME_LEN:
        raise MalformedQuery("question name longer than 255 bytes")
    return _Query(header, question, _udp_limit(header, data[buffer.offset :]))


def _udp_limit(header: Any, rest: bytes) -> int:
    """The client's EDNS0 payload size, read from an OPT record right after the question."""
    if header.a or header.auth or not header.ar:
        return CLASSIC_UDP_PAYLOAD
    # OPT: root name (one zero byte), TYPE 41, CLASS = payload size.
    if len(rest) >= 5 and rest[0] == 0 and rest[1:3] == b"\x00\x29":
        announced = int.from_bytes(rest[3:5], "big")
        return min(max(announced, CLASSIC_UDP_PAYLOAD), MAX_UDP_PAYLOAD)
    return CLASSIC_UDP_PAYLOAD


def _reply(query: _Query, rcode: int, records: Iterable[Any] = ()) -> Any:
    header = DNSHeader(
        id=query.header.id, qr=1, aa=1, ra=1, rd=query.header.rd, opcode=query.header.opcode, rcode=rcode
    )
    reply = DNSRecord(header, q=query.question)
    for record in records:
        reply.add_answer(record)
    return reply


def _address_records(question: Any, addresses: Sequence[str]) -> list[Any]:
    if question.qclass not in _ADDRESS_CLASSES:
        return []
    records = []
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if ip.version == 4 and question.qtype in (QTYPE.A, QTYPE.ANY):
            records.append(RR(question.qname, QTYPE.A, rdata=A(text), ttl=ZONE_TTL))
        elif ip.version == 6 and question.qtype in (QTYPE.AAAA, QTYPE.ANY):
            records.append(RR(question.qname, QTYPE.AAAA, rdata=AAAA(text), ttl=ZONE_TTL))
    return records


def answer(query: bytes, zone: ClusterZone, *, udp: bool = False) -> bytes | Forward:
    """Answer one DNS message from ``zone``.

    Returns the reply bytes, or :class:`Forward` for names outside the zone's domain. With
    ``udp`` the reply is truncated (TC set, answers dropped) past the client's payload limit.
    Raises :class:`MalformedQuery` for anything that must be dropped without a reply.
    """
    try:
        parsed = _parse_query(query)
    except MalformedQuery:
        raise
    except Exception as exc:  # the declared boundary: dnslib raises several unrelated types on garbage
        raise MalformedQuery(f"undecodable message: {exc}") from exc
    if parsed.header.opcode != OPCODE.QUERY:
        return bytes(_reply(parsed, RCODE.NOTIMP).pack())
    labels = [label.decode("utf-8", "replace") for label in parsed.question.qname.label]
    found = zone.lookup_labels(labels)
    if found.outcome is Outcome.FORWARD:
        return Forward(
            query=bytes(query),
            qname=str(parsed.question.qname),
            servfail=bytes(_reply(parsed, RCODE.SERVFAIL).pack()),
        )
    if found.outcome is Outcome.NXDOMAIN:
        return bytes(_reply(parsed, RCODE.NXDOMAIN).pack())
    reply = _reply(parsed, RCODE.NOERROR, _address_records(parsed.question, found.addresses))
    packed = bytes(reply.pack())
    if udp and len(packed) > parsed.udp_limit:
        reply = _reply(parsed, RCODE.NOERROR)
        reply.header.tc = 1
        packed = bytes(reply.pack())
    return packed


def parse_upstream(spec: str) -> tuple[str, int]:
    """``1.1.1.1`` / ``1.1.1.1:5353`` / ``::1`` / ``[::1]:5353`` -> (host, port)."""
    text = spec.strip()
    host, port = text, str(DNS_PORT)
    if not _is_ip(text):
        host, _, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
    if not _is_ip(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidUpstream(f"upstream resolver {spec!r} is not ip, ip:port or [ipv6]:port")
    return _comparable_ip(host), int(port)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def upstreams_from_resolv_conf(path: str | Path, skip: Iterable[str] = ()) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, minus ``skip`` (the cluster DNS's own).

    Skipping our own addresses keeps a node whose resolv.conf points at the cluster DNS from
    forwarding to itself in a loop. Errors reading the file propagate.
    """
    own = {_comparable_ip(ip) for ip in skip}
    servers = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and _comparable_ip(fields[1]) not in own:
            servers.append(fields[1])
    return servers


def _comparable_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


@dataclass
class DNSStats:
    """Counters of the server; read by tests and the admin page."""

    queries: int = 0
    dropped: int = 0
    forwarded: int = 0
    servfail: int = 0


class _ClientProtocol(asyncio.DatagramProtocol):
    """Serves the UDP socket by handing each datagram to the server."""

    def __init__(self, server: ClusterDNS) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._server._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors about clients that went away; nothing to do but note it.
        log.debug("cluster DNS UDP socket error: %s", exc)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    """One exchange with one upstream: resolves ``reply`` with the first response matching the id."""

    def __init__(self, query_id: bytes) -> None:
        self._query_id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        matches = len(data) >= _HEADER_LEN and data[:2] == self._query_id and data[2] & _QR_BIT
        if matches and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionError("upstream socket closed"))


class ClusterDNS:
    """The asyncio shell: UDP and TCP listeners on one host:port, answering from a zone.

    ``port=0`` picks a port free for both UDP and TCP; :attr:`port` says which after
    :meth:`start`. Upstreams are tried in order, each for ``forward_timeout`` seconds.
    """

    def __init__(
        self,
        zone: ClusterZone,
        *,
        host: str = "127.0.0.1",
        port: int = DNS_PORT,
        upstreams: Sequence[str] = (),
        forward_timeout: float = FORWARD_TIMEOUT,
    ) -> None:
        self.zone = zone
        self.host = host
        self.port = port
        self.upstreams = [parse_upstream(u) for u in upstreams]
        self.forward_timeout = forward_timeout
        self.stats = DNSStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._forwards = OwnedTasks(log)
        self._connections = OwnedTasks(log)
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> ClusterDNS:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        attempts = _EPHEMERAL_BIND_ATTEMPTS if self.port == 0 else 1
        for attempt in range(attempts):
            udp_port = await self._bind_udp(self.port)
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, udp_port)
            except OSError as exc:
                self._close_udp()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self.port = udp_port
            log.info("cluster DNS for %s listening on %s:%d (udp+tcp)", self.zone.domain, self.host, udp_port)
            return

    async def _bind_udp(self, port: int) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _ClientProtocol(self), local_addr=(self.host, port))
        self._udp = transport
        return int(transport.get_extra_info("sockname")[1])

    def _close_udp(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    async def close(self) -> None:
        self._close_udp()
        if self._tcp is not None:
            self._tcp.close()
        await self._forwards.cancel_all()
        await self._connections.cancel_all()
        for writer in list(self._tcp_writers):
            writer.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None

    def _drop(self, exc: MalformedQuery, peer: object) -> None:
        self.stats.dropped += 1
        log.debug("cluster DNS dropped a message from %s: %s", peer, exc)

    def _on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.stats.queries += 1
        try:
            result = answer(data, self.zone, udp=True)
        except MalformedQuery as exc:
            self._drop(exc, addr)
            return
        if isinstance(result, bytes):
            self._send_udp(result, addr)
        elif len(self._forwards) >= MAX_INFLIGHT_FORWARDS:
            self.stats.dropped += 1
            log.debug("cluster DNS dropped %s from %s: too many forwards in flight", result.qname, addr)
        else:
            self._forwards.spawn(self._forward_udp(result, addr), name=f"dns-forward-{result.qname}")

    def _send_udp(self, reply: bytes, addr: tuple[Any, ...]) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    async def _forward_udp(self, forward: Forward, addr: tuple[Any, ...]) -> None:
        self._send_udp(await self._resolve_upstream(forward), addr)

    async def _resolve_upstream(self, forward: Forward) -> bytes:
        self.stats.forwarded += 1
        for upstream in self.upstreams:
            try:
                return await self._exchange(forward.query, upstream)
            except (TimeoutError, OSError) as exc:
                log.debug("upstream %s:%d failed for %s: %r", *upstream, forward.qname, exc)
        self.stats.servfail += 1
        if not self.upstreams:
            log.debug("no upstream resolver for %s: answering SERVFAIL", forward.qname)
        return forward.servfail

    async def _exchange(self, query: bytes, upstream: tuple[str, int]) -> bytes:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(query[:2]), remote_addr=upstream
        )
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
                    result = answer(query, self.zone)
                except MalformedQuery as exc:
                    self._drop(exc, peer)
                    return  # framing can no longer be trusted
                reply = result if isinstance(result, bytes) else await self._resolve_upstream(result)
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except ConnectionError as exc:
            log.debug("cluster DNS TCP client %s went away: %s", peer, exc)
        finally:
            self._tcp_writers.discard(writer)
            writer.close()
