"""The endpoints of one service port as the waypoint dials them, built from the xDS workload snapshot.

A service's endpoints are the workloads that list it in `Workload.services` (PROTOCOLS.md §5.1). For each
one this module resolves the target port the way ztunnel does (the workload's own port entry, then the
service's, then the service port itself), its SPIFFE identity, whether it speaks HBONE, and its pod labels
so that DestinationRule subsets (selected by pod labels) can be applied. Pure: no I/O, no caching — the
caller decides how often to rebuild (per snapshot generation and label change is enough).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ambient.proto import workload_pb2
from ambient.telemetry.labels import workload_identity
from ambient.xds.store import Service, Workload, WorkloadSnapshot

# (namespace, pod name) → the pod's labels, or None when the pod is not known (yet).
PodLabels = Callable[[str, str], Mapping[str, str] | None]

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Endpoint:
    """One pod behind a service port. `uid` is the workload's xDS uid and the key every balancer,
    outlier detector and connection pool uses for it."""

    uid: str
    ip: str
    target_port: int
    identity: str                       # spiffe://<td>/ns/<ns>/sa/<sa>: the identity to verify on HBONE
    labels: Mapping[str, str] = field(hash=False)
    healthy: bool                       # HEALTHY, or the service's health policy is ALLOW_ALL
    node: str
    hbone: bool                         # tunnel_protocol HBONE: dial podIP:15008; else plain TCP to the port
    workload: Workload | None = field(default=None, compare=False, repr=False)   # for telemetry labels

    @property
    def authority(self) -> str:
        """`ip:targetPort` (`[ip]:port` for IPv6): the HBONE CONNECT authority for this endpoint."""
        return f"[{self.ip}]:{self.target_port}" if ":" in self.ip else f"{self.ip}:{self.target_port}"


def service_key(service: Service) -> str:
    """`<ns>/<hostname>`: the service's xDS name and its key in `Workload.services`."""
    return f"{service.namespace}/{service.hostname}"


def endpoints_for(
    snapshot: WorkloadSnapshot,
    service: Service,
    port: int,
    pod_labels: PodLabels,
    subset_labels: Mapping[str, str] | None = None,
) -> list[Endpoint]:
    """Every endpoint of `service` on service port `port`, in uid order, unhealthy ones included
    (flagged `healthy=False`; `outlier.usable_hosts` drops them).

    `subset_labels` (a DestinationRule subset's `labels`) keeps only pods whose labels contain all of
    them; a pod whose labels are unknown matches no subset. An unknown port yields no endpoints.
    """
    service_port = next((p for p in service.ports if p.service_port == port), None)
    if service_port is None:
        return []
    key = service_key(service)
    allow_all = service.HasField("load_balancing") and \
        service.load_balancing.health_policy == workload_pb2.LoadBalancing.ALLOW_ALL
    found: list[Endpoint] = []
    for workload in snapshot.endpoints_by_service.get(key, ()):
        if not workload.addresses:
            continue
        target_port = _target_port(workload.services[key], service_port, port)
        if target_port is None:
            continue
        labels = pod_labels(workload.namespace, workload.name) or _NO_LABELS
        if subset_labels is not None and not _selects(subset_labels, labels):
            continue
        found.append(Endpoint(
            uid=workload.uid,
            ip=str(ipaddress.ip_address(workload.addresses[0])),
            target_port=target_port,
            identity=workload_identity(workload),
            labels=labels,
            healthy=allow_all or workload.status == workload_pb2.HEALTHY,
            node=workload.node,
            hbone=workload.tunnel_protocol == workload_pb2.HBONE,
            workload=workload,
        ))
    return found


def _target_port(ports: workload_pb2.PortList, service_port: workload_pb2.Port, port: int) -> int | None:
    """The pod's own mapping wins (a named targetPort resolved per pod), then the service's numeric
    targetPort, then the service port itself; None when the service names a port this pod lacks."""
    own = next((p for p in ports.ports if p.service_port == port), None)
    if own is None and service_port.target_port == 0:
        return None
    return (own.target_port if own is not None else 0) or service_port.target_port or port


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(name) == value for name, value in selector.items())
