"""ztunnel's DNS proxy (port 15053 in each captured pod; Istio's "DNS capture"), as Istio ztunnel's
`dns/server.rs`.

`answer(query, snapshot, client_namespace, search)` is the sans-IO core: A/AAAA questions for mesh service
hostnames are answered from the xDS store; everything else becomes a `Forward` to the node's resolvers.
A name is tried under each of its aliases, in this order:

- the name itself, then its Kubernetes expansions: `<svc>` → `<svc>.<client ns>.svc.<domain>`,
  `<svc>.<ns>` → `<svc>.<ns>.svc.<domain>`, `<svc>.<ns>.svc` → `<svc>.<ns>.svc.<domain>`;
- the name with one of the pod's search domains stripped (the stub resolver appended it), and that
  name's expansions; an answer found this way carries a CNAME from the asked name to the stripped one;

and each alias also as its wildcards (`a.b.c` → `*.b.c` → `*.c`), for wildcard service hostnames.
A service matches when it has VIPs (answered: the VIPs on the client's network), or when it is a headless
Kubernetes service (`*.svc.<domain>`, answered: its endpoints' pod IPs); services with `NAMESPACE`
visibility only for clients of their namespace; with several candidates, the one in the client's
namespace wins, then a canonical one, then the first by name. A known name asked for an address family
it has none of gets an empty NOERROR. Unknown names — inside the cluster domain too — are forwarded, so
the cluster DNS answers NXDOMAIN itself, as do other record types (SRV, TXT, ...).

Not answered here (forwarded instead), as in ztunnel: pod hostnames (`<pod>.<subdomain>.<ns>.svc...`,
`<a-b-c-d>.<ns>.pod...`). Answers keep the store's order (ztunnel shuffles them).

`DnsProxy` is the asyncio shell for one pod: it serves the UDP and TCP sockets ztunnel opened inside the
pod's network namespace and forwards through `ambient.dnsserver`. This module must not bind sockets or
read files itself.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dnslib import CNAME, OPCODE, QTYPE, RCODE, RR, DNSLabel

from ambient.dnsmsg import Forward, address_records, forward, pack_reply, parse_query, reply
from ambient.dnsserver import FORWARD_TIMEOUT, DnsServer, DnsStats, UpstreamSocketFactory
from ambient.proto import workload_pb2
from ambient.xds.store import Service, WorkloadSnapshot
from ztunnel.decision import service_endpoints, service_key

DEFAULT_DOMAIN = "cluster.local"
DNS_PROXY_PORT = 15053
# 30 s: ztunnel's TTL for the names it answers itself (DEFAULT_TTL_SECONDS).
TTL = 30

Labels = tuple[str, ...]
SnapshotProvider = Callable[[], WorkloadSnapshot]


def search_domains(namespace: str, domain: str = DEFAULT_DOMAIN) -> tuple[str, ...]:
    """A pod's Kubernetes search list (what the kubelet writes into its resolv.conf, and what ztunnel
    assumes for every pod): `<ns>.svc.<domain> svc.<domain> <domain>`."""
    return (f"{namespace}.svc.{domain}", f"svc.{domain}", domain)


def _labels(name: str) -> Labels:
    text = name.strip(".").lower()
    return tuple(text.split(".")) if text else ()


def _has_domain(name: Labels, domain: Labels) -> bool:
    """`name` is strictly inside `domain`."""
    return len(name) > len(domain) and name[len(name) - len(domain):] == domain


@dataclass(frozen=True)
class _Alias:
    name: Labels
    stripped: Labels | None  # the asked name minus a search domain, when this alias came from stripping


class _Names:
    """The cluster-domain names one client sees (its namespace, the domain, its search list)."""

    def __init__(self, client_namespace: str, search: Sequence[str], domain: str) -> None:
        self.domain = _labels(domain)
        self.svc_domain = ("svc", *self.domain)
        self.namespaced = (client_namespace.lower(), *self.svc_domain)
        self.search = [s for s in (_labels(d) for d in search) if s]

    def kube_fqdns(self, name: Labels) -> list[Labels]:
        """The Kubernetes FQDNs a short name can stand for (ztunnel's `to_kube_fqdns`)."""
        match len(name):
            case 1:
                return [name + self.namespaced]
            case 2:
                return [name + self.svc_domain, name + self.namespaced]
            case 3:
                expanded = [name + self.domain] if name[-1] == "svc" else []
                return [*expanded, name + self.svc_domain]
            case 4 if name[-1] == "svc":
                return [name + self.domain]
        return []

    def aliases(self, name: Labels) -> list[_Alias]:
        found: dict[Labels, _Alias] = {}

        def add(alias_name: Labels, stripped: Labels | None) -> None:
            found.setdefault(alias_name, _Alias(alias_name, stripped))

        add(name, None)
        for fqdn in self.kube_fqdns(name):
            add(fqdn, None)
        for domain in self.search:
            if _has_domain(name, domain):
                stripped = name[: len(name) - len(domain)]
                add(stripped, stripped)
                for fqdn in self.kube_fqdns(stripped):
                    add(fqdn, stripped)
        return list(found.values())


def _wildcards(name: Labels) -> list[Labels]:
    """`a.b.c` → [`a.b.c`, `*.b.c`, `*.c`]: the name, then wildcards of decreasing specificity."""
    result = [name]
    while len(name) > 1:
        result.append(("*", *name[1:]))
        name = name[1:]
    return result


def _best(candidates: Iterable[Service], client_namespace: str) -> Service | None:
    """ztunnel's `ServiceMatch::find_best_match`: client namespace, then canonical, then first."""
    canonical = first = None
    for service in candidates:
        if service.namespace == client_namespace:
            return service
        if service.canonical and canonical is None:
            canonical = service
        if first is None:
            first = service
    return canonical or first


@dataclass(frozen=True)
class _ServerMatch:
    service: Service
    alias: _Alias
    wildcard: bool


def _find_service(snapshot: WorkloadSnapshot, name: Labels, client_namespace: str, names: _Names,
                  ) -> _ServerMatch | None:
    by_host = snapshot.services_by_hostname
    headless_suffix = "." + ".".join(names.svc_domain)
    for alias in names.aliases(name):
        for candidate in _wildcards(alias.name):
            services = by_host.get(".".join(candidate), ())
            usable = (s for s in services
                      if (s.addresses or s.hostname.lower().endswith(headless_suffix))
                      and (s.visibility != workload_pb2.Service.NAMESPACE or s.namespace == client_namespace))
            service = _best(usable, client_namespace)
            if service is not None:
                return _ServerMatch(service, alias, wildcard=candidate[0] == "*")
    return None


def _family_allowed(service: Service, qtype: int) -> bool:
    if service.ip_families == workload_pb2.IPV4_ONLY:
        return bool(qtype != QTYPE.AAAA)
    if service.ip_families == workload_pb2.IPV6_ONLY:
        return bool(qtype != QTYPE.A)
    return True


def _addresses(snapshot: WorkloadSnapshot, service: Service, qtype: int, client_network: str) -> list[str]:
    version = 4 if qtype == QTYPE.A else 6
    if service.addresses:
        vips = (ipaddress.ip_address(a.address) for a in service.addresses if a.network == client_network)
        return [str(ip) for ip in vips if ip.version == version]
    # Headless: the pod IP (of the asked family) of every endpoint the service would balance to.
    allow_all = service.HasField("load_balancing") and \
        service.load_balancing.health_policy == workload_pb2.LoadBalancing.ALLOW_ALL
    result = []
    for workload in service_endpoints(snapshot, service_key(service)):
        if workload.status != workload_pb2.HEALTHY and not allow_all:
            continue
        ip = next((ip for ip in map(ipaddress.ip_address, workload.addresses) if ip.version == version), None)
        if ip is not None:
            result.append(str(ip))
    return result


def answer(
    query: bytes,
    snapshot: WorkloadSnapshot,
    client_namespace: str,
    search: Sequence[str],
    domain: str = DEFAULT_DOMAIN,
    *,
    udp: bool = False,
    client_network: str = "",
) -> bytes | Forward:
    """Answer one DNS query from a pod in `client_namespace` whose resolver searches `search`.

    Returns the reply bytes (over `udp`, truncated with TC past the client's limit), or `Forward` for a
    name or type the mesh does not answer. Raises `ambient.dnsmsg.MalformedQuery` for what must be dropped.
    """
    parsed = parse_query(query)
    if parsed.header.opcode != OPCODE.QUERY:
        return bytes(reply(parsed, RCODE.NOTIMP).pack())
    question = parsed.question
    if question.qtype not in (QTYPE.A, QTYPE.AAAA):
        return forward(query, parsed)
    found = _find_service(snapshot, parsed.labels, client_namespace, _Names(client_namespace, search, domain))
    if found is None:
        return forward(query, parsed)
    records: list[Any] = []
    if _family_allowed(found.service, question.qtype):
        addresses = _addresses(snapshot, found.service, question.qtype, client_network)
        owner = question.qname
        if addresses and found.alias.stripped is not None and not found.wildcard:
            # Found by stripping a search domain: point the asked name at the real one, as ztunnel does.
            owner = DNSLabel(".".join(found.alias.stripped))
            records.append(RR(question.qname, QTYPE.CNAME, rdata=CNAME(owner), ttl=TTL))
        records += address_records(question, addresses, TTL, name=owner)
    return pack_reply(parsed, reply(parsed, RCODE.NOERROR, records), udp=udp)


class DnsProxy:
    """The DNS proxy of one pod: answers from the latest snapshot, forwards the rest to `upstreams`.

    ztunnel opens the sockets inside the pod's network namespace (15053, UDP and TCP, on loopback) and
    hands them to `serve_udp` / `serve_tcp`, which return once serving; `upstream_socket(family)` makes the
    sockets for forwarded queries (in the pod's netns and marked, so they are not captured again).
    """

    def __init__(
        self,
        snapshot_provider: SnapshotProvider,
        upstreams: Sequence[str],
        *,
        namespace: str,
        search: Sequence[str] | None = None,
        domain: str = DEFAULT_DOMAIN,
        network: str = "",
        forward_timeout: float = FORWARD_TIMEOUT,
        upstream_socket: UpstreamSocketFactory | None = None,
    ) -> None:
        self.snapshot_provider = snapshot_provider
        self.namespace = namespace
        self.domain = domain
        self.search = tuple(search) if search is not None else search_domains(namespace, domain)
        self.network = network
        self._server = DnsServer(self._resolve, upstreams=upstreams, forward_timeout=forward_timeout,
                                 upstream_socket=upstream_socket, name=f"dns proxy ({namespace})")

    @property
    def stats(self) -> DnsStats:
        return self._server.stats

    def _resolve(self, data: bytes, udp: bool) -> bytes | Forward:
        return answer(data, self.snapshot_provider(), self.namespace, self.search, self.domain, udp=udp,
                      client_network=self.network)

    async def serve_udp(self, sock: socket.socket) -> None:
        """Start answering on a bound UDP socket (the proxy owns it from now on)."""
        await self._server.serve_udp(sock)

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Start accepting on a bound, listening TCP socket (the proxy owns it from now on)."""
        await self._server.serve_tcp(sock)

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> DnsProxy:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
