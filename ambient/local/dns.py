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

import enum
import errno
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from dnslib import OPCODE, RCODE

from ambient.dnsmsg import (
    CLASSIC_UDP_PAYLOAD,
    DNS_PORT,
    DnsError,
    Forward,
    InvalidUpstream,
    MalformedQuery,
    address_records,
    forward,
    pack_reply,
    parse_query,
    parse_upstream,
    reply,
)
from ambient.dnsserver import FORWARD_TIMEOUT, DnsServer, DnsStats, upstreams_from_resolv_conf

log = logging.getLogger(__name__)

# Shared DNS pieces re-exported: the local cluster's callers and tests use them from here.
__all__ = [
    "CLASSIC_UDP_PAYLOAD",
    "DEFAULT_DOMAIN",
    "ZONE_TTL",
    "Answer",
    "ClusterDNS",
    "ClusterDNSError",
    "ClusterZone",
    "DnsStats",
    "Forward",
    "InvalidRecord",
    "InvalidUpstream",
    "MalformedQuery",
    "Outcome",
    "answer",
    "parse_upstream",
    "upstreams_from_resolv_conf",
]

DEFAULT_DOMAIN = "cluster.local"
# 5 s: CoreDNS's kubernetes plugin default; short enough that a moved pod is found again soon.
ZONE_TTL = 5
# A few attempts at finding a port free for both UDP and TCP when the caller asks for port 0.
_EPHEMERAL_BIND_ATTEMPTS = 8


class ClusterDNSError(DnsError):
    """Base of this module's own errors; ``reason`` is a stable label for logs and metrics."""

    reason = "cluster_dns_error"


class InvalidRecord(ClusterDNSError):
    """A zone mutator got an address that is not an IP address."""

    reason = "invalid_record"


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


def answer(query: bytes, zone: ClusterZone, *, udp: bool = False) -> bytes | Forward:
    """Answer one DNS message from ``zone``.

    Returns the reply bytes, or :class:`Forward` for names outside the zone's domain. With
    ``udp`` the reply is truncated (TC set, answers dropped) past the client's payload limit.
    Raises :class:`MalformedQuery` for anything that must be dropped without a reply.
    """
    parsed = parse_query(query)
    if parsed.header.opcode != OPCODE.QUERY:
        return bytes(reply(parsed, RCODE.NOTIMP).pack())
    found = zone.lookup_labels(parsed.labels)
    if found.outcome is Outcome.FORWARD:
        return forward(query, parsed)
    if found.outcome is Outcome.NXDOMAIN:
        return bytes(reply(parsed, RCODE.NXDOMAIN).pack())
    records = address_records(parsed.question, found.addresses, ZONE_TTL)
    return pack_reply(parsed, reply(parsed, RCODE.NOERROR, records), udp=udp)


class ClusterDNS:
    """The cluster DNS on one host:port, UDP and TCP, answering from a zone.

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
        self._server = DnsServer(lambda data, udp: answer(data, self.zone, udp=udp), upstreams=upstreams,
                                 forward_timeout=forward_timeout, name="cluster DNS")

    @property
    def stats(self) -> DnsStats:
        return self._server.stats

    async def __aenter__(self) -> ClusterDNS:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        attempts = _EPHEMERAL_BIND_ATTEMPTS if self.port == 0 else 1
        for attempt in range(attempts):
            try:
                udp, tcp = self._bind(self.port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self.port = int(udp.getsockname()[1])
            await self._server.serve_udp(udp)
            await self._server.serve_tcp(tcp)
            log.info("cluster DNS for %s listening on %s:%d (udp+tcp)", self.zone.domain, self.host, self.port)
            return

    def _bind(self, port: int) -> tuple[socket.socket, socket.socket]:
        """A UDP socket on ``port`` (0: any free one) and a listening TCP socket on the same port."""
        family = socket.AF_INET6 if _is_ipv6(self.host) else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((self.host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio.start_server does
            tcp.bind((self.host, udp.getsockname()[1]))
            tcp.listen()
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return udp, tcp

    async def close(self) -> None:
        await self._server.close()


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
