"""Where a captured outbound connection goes (PROTOCOLS.md §7, identities and authorities per §6).

Sans-IO: `decide_outbound(snapshot, source, dst_ip, dst_port)` reads one immutable `WorkloadSnapshot` and
returns an `OutboundDecision`; the outbound proxy (15001) acts on it. Mirrors Istio ztunnel's
`build_request`:

1. refuse loopback calls to ztunnel's own ports (15001/15006/15008) — "attempted recursive call to ourselves";
2. a Service VIP whose service has a waypoint → HBONE to the waypoint, authority = the original `VIP:port`,
   unless the caller is that waypoint;
3. a Service VIP → one endpoint picked by `pick` among the service's healthy endpoints that serve the port
   (none → `NoHealthyUpstream`, fail fast); a pod IP → that workload; neither → plain TCP passthrough to the
   original destination (also for services with load-balancing mode PASSTHROUGH);
4. a pod-IP-addressed workload with its own waypoint (and a caller that is not that waypoint) → HBONE to the
   waypoint;
5. `tunnel_protocol` HBONE → HBONE to `podIP:15008`, authority `podIP:targetPort`, expected identities = the
   workload's SPIFFE id + the service's `subject_alt_names`; otherwise plain TCP to `podIP:targetPort`.

Not covered (ztunnel features this mesh does not produce): network gateways and cross-network endpoints
(endpoints on another network are skipped), hostname-only workloads (DNS resolution), weighted waypoints,
locality-ranked load balancing and capacity weights (`pick` chooses uniformly among the candidates).

This module must not do I/O, log per connection, or keep state beyond per-snapshot lookup indexes.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ambient.identity.spiffe import DEFAULT_TRUST_DOMAIN, SCHEME
from ambient.proto import workload_pb2
from ambient.xds.store import IpAddress, Service, Workload, WorkloadSnapshot
from ztunnel.errors import NoHealthyUpstream, OutboundError, SelfCall, UnknownWaypoint

T = TypeVar("T")


class Pick(Protocol):
    """Chooses one of a non-empty sequence (load balancing); `random.choice` by default."""

    def __call__(self, candidates: Sequence[T], /) -> T: ...


# 15008: the HBONE port every mesh pod (and waypoint) listens on; peers dial it directly (PROTOCOLS §1).
HBONE_PORT = 15008
# ztunnel's own in-pod ports: outbound 15001, inbound plaintext 15006, inbound HBONE 15008. A connection to
# one of them on loopback could only come back to ztunnel (PROTOCOLS §1 "illegal destinations").
ILLEGAL_PORTS = frozenset({15001, 15006, 15008})
# Istio's defaults for a workload that leaves these empty (ztunnel's Workload conversion does the same).
DEFAULT_SERVICE_ACCOUNT = "default"


class Kind(enum.Enum):
    HBONE = "hbone"  # mTLS HTTP/2 CONNECT to `target`, asking for `authority`
    TCP = "tcp"  # plain TCP to a known workload that does not speak HBONE
    PASSTHROUGH = "passthrough"  # plain TCP to the original destination, which the mesh does not know
    DENY = "deny"  # refuse the connection; `error` says why


@dataclass(frozen=True)
class OutboundDecision:
    """What to do with one outbound connection.

    `target` is the address to connect to (for DENY: the original destination, never dialled; `error` says why).
    `destination_workload` is the workload the connection reaches first (the waypoint when `via_waypoint`)
    and `destination_service` the service the caller addressed; both feed the metrics labels (§10).
    """

    kind: Kind
    target: tuple[str, int]
    authority: str | None = None
    expected_identities: tuple[str, ...] = ()
    destination_workload: Workload | None = None
    destination_service: Service | None = None
    via_waypoint: bool = False
    error: OutboundError | None = field(default=None, compare=False)

    @property
    def reason(self) -> str:
        """Why a DENY, in ztunnel's words (e.g. `no healthy upstream: 10.96.0.10:80 (...)`); empty otherwise.
        The stable label for metrics is `error.reason`."""
        return str(self.error) if self.error is not None else ""


def authority(ip: str, port: int) -> str:
    """`10.0.0.1:80`, `[fd00::1]:80` — the HBONE `:authority` form (PROTOCOLS §6)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def workload_identity(workload: Workload) -> str:
    """`spiffe://<td>/ns/<ns>/sa/<sa>` of a workload, with Istio's defaults for an empty trust domain or SA."""
    trust_domain = workload.trust_domain or DEFAULT_TRUST_DOMAIN
    service_account = workload.service_account or DEFAULT_SERVICE_ACCOUNT
    return f"{SCHEME}{trust_domain}/ns/{workload.namespace}/sa/{service_account}"


def service_key(service: Service) -> str:
    """`<ns>/<hostname>`: the service's xDS name and its key in `Workload.services`."""
    return f"{service.namespace}/{service.hostname}"


def service_endpoints(snapshot: WorkloadSnapshot, key: str) -> tuple[Workload, ...]:
    """Every workload that lists the service `key` (`<ns>/<hostname>`) in its `services`, by uid."""
    return snapshot.endpoints_by_service.get(key, ())


def decide_outbound(
    snapshot: WorkloadSnapshot,
    source: Workload,
    dst_ip: str,
    dst_port: int,
    *,
    pick: Pick = random.choice,
) -> OutboundDecision:
    """Route one connection from `source` (this pod's workload) to the original destination `dst_ip:dst_port`.

    Deterministic given `pick`, which chooses one of a non-empty sequence of candidates (endpoints of a
    service or of a waypoint). Never raises for routing failures: they come back as DENY decisions.
    `dst_ip` is the text of an IP address (`ValueError` otherwise), as `SO_ORIGINAL_DST` gives it.
    """
    ip = ipaddress.ip_address(dst_ip)
    original = (str(ip), dst_port)
    try:
        return _decide(snapshot, source, ip, dst_port, pick)
    except OutboundError as exc:
        return OutboundDecision(Kind.DENY, original, error=exc)


def _decide(snapshot: WorkloadSnapshot, source: Workload, ip: IpAddress, port: int, pick: Pick) -> OutboundDecision:
    original = (str(ip), port)
    if ip.is_loopback and port in ILLEGAL_PORTS:
        raise SelfCall
    service = snapshot.service_by_vip(ip, source.network)
    if service is not None and not _visible(service, source.namespace):
        service = None

    if service is not None:
        if service.HasField("load_balancing") and \
                service.load_balancing.mode == workload_pb2.LoadBalancing.PASSTHROUGH:
            return OutboundDecision(Kind.PASSTHROUGH, original, destination_service=service)
        if service.HasField("waypoint"):
            waypoint = _resolve_waypoint(snapshot, service.waypoint, source, ip, pick)
            if source.uid not in waypoint.members:
                return waypoint.decision(original, service)
        workload, target_port = _pick_endpoint(snapshot, service, source, ip, port, pick)
        sans: Sequence[str] = service.subject_alt_names
    else:
        found = snapshot.workload_by_ip(ip, source.network)
        if found is None:
            return OutboundDecision(Kind.PASSTHROUGH, original)
        workload, target_port, sans = found, port, ()
        if workload.HasField("waypoint"):
            waypoint = _resolve_waypoint(snapshot, workload.waypoint, source, ip, pick)
            if source.uid not in waypoint.members:
                return waypoint.decision(original, None)

    pod_ip = _select_ip(workload, ip)
    assert pod_ip is not None, "found by one of its IPs, or an endpoint with an IP"
    if workload.tunnel_protocol == workload_pb2.HBONE:
        return OutboundDecision(
            Kind.HBONE, (pod_ip, HBONE_PORT), authority=authority(pod_ip, target_port),
            expected_identities=_identities(workload, sans), destination_workload=workload,
            destination_service=service)
    return OutboundDecision(Kind.TCP, (pod_ip, target_port), destination_workload=workload,
                            destination_service=service)


def _visible(service: Service, client_namespace: str) -> bool:
    return service.visibility != workload_pb2.Service.NAMESPACE or service.namespace == client_namespace


def _identities(workload: Workload, sans: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((workload_identity(workload), *sans)))


def _usable(workload: Workload, service: Service, source: Workload) -> bool:
    """An endpoint we can send to: healthy (unless the service allows all), on our network, with an IP."""
    healthy = workload.status == workload_pb2.HEALTHY or (
        service.HasField("load_balancing")
        and service.load_balancing.health_policy == workload_pb2.LoadBalancing.ALLOW_ALL)
    return healthy and workload.network == source.network and len(workload.addresses) > 0


def _pick_endpoint(snapshot: WorkloadSnapshot, service: Service, source: Workload, vip: IpAddress, port: int,
                   pick: Pick) -> tuple[Workload, int]:
    key = service_key(service)
    target = authority(str(vip), port)
    service_port = next((p for p in service.ports if p.service_port == port), None)
    if service_port is None:
        raise NoHealthyUpstream(target, f"service {key} has no port {port}")
    candidates: list[tuple[Workload, int]] = []
    for workload in service_endpoints(snapshot, key):
        if not _usable(workload, service, source):
            continue
        endpoint_port = next((p for p in workload.services[key].ports if p.service_port == port), None)
        if endpoint_port is None and service_port.target_port == 0:
            continue  # the service's target port is named and this pod does not declare it
        target_port = (endpoint_port.target_port if endpoint_port is not None else 0) \
            or service_port.target_port or port
        candidates.append((workload, target_port))
    if not candidates:
        raise NoHealthyUpstream(target, f"service {key} has no healthy endpoints")
    return pick(candidates)


def _select_ip(workload: Workload, original: IpAddress) -> str | None:
    """The IP the caller asked for if it is this workload's, else one of the caller's family, else any."""
    ips = [ipaddress.ip_address(raw) for raw in workload.addresses]
    if original in ips:
        return str(original)
    same_family = [ip for ip in ips if ip.version == original.version]
    chosen = same_family or ips
    return str(chosen[0]) if chosen else None


@dataclass(frozen=True)
class _Waypoint:
    """A resolved waypoint: the pod picked to carry this connection, and every workload that is the waypoint."""

    workload: Workload
    target: tuple[str, int]
    identities: tuple[str, ...]
    members: frozenset[str]  # uids

    def decision(self, original: tuple[str, int], service: Service | None) -> OutboundDecision:
        return OutboundDecision(
            Kind.HBONE, self.target, authority=authority(*original),
            expected_identities=self.identities, destination_workload=self.workload,
            destination_service=service, via_waypoint=True)


def _resolve_waypoint(snapshot: WorkloadSnapshot, address: workload_pb2.GatewayAddress, source: Workload,
                      original: IpAddress, pick: Pick) -> _Waypoint:
    """A GatewayAddress → the waypoint pod to dial; like ztunnel, a hostname is looked up as a service
    (then a workload) and an address as a service VIP (then a pod IP)."""
    port = address.hbone_mtls_port or HBONE_PORT
    service: Service | None = None
    workload: Workload | None = None
    if address.HasField("hostname"):
        name = f"{address.hostname.namespace}/{address.hostname.hostname}"
        service = snapshot.services.get(name)
        if service is None:
            workload = next((w for w in snapshot.workloads.values() if w.hostname == address.hostname.hostname
                             and w.namespace == address.hostname.namespace), None)
        what = address.hostname.hostname
    elif address.HasField("address"):
        network = address.address.network or source.network
        try:
            service = snapshot.service_by_vip(address.address.address, network)
            workload = None if service is not None else snapshot.workload_by_ip(address.address.address, network)
            what = str(ipaddress.ip_address(address.address.address))
        except ValueError:
            raise UnknownWaypoint(f"waypoint address {address.address.address!r} is not an IP") from None
    else:
        raise UnknownWaypoint("waypoint has neither a hostname nor an address")

    if service is not None:
        members = tuple(w for w in service_endpoints(snapshot, service_key(service)) if _usable(w, service, source))
        if not members:
            raise UnknownWaypoint(f"waypoint {what} has no healthy endpoints")
        chosen = pick(members)
        sans: Sequence[str] = service.subject_alt_names
    elif workload is not None:
        members, chosen, sans = (workload,), workload, ()
    else:
        raise UnknownWaypoint(f"waypoint {what} not found")
    ip = _select_ip(chosen, original)
    if ip is None:
        raise UnknownWaypoint(f"waypoint {what}: workload {chosen.uid} has no IP address")
    return _Waypoint(chosen, (ip, port), _identities(chosen, sans), frozenset(w.uid for w in members))
