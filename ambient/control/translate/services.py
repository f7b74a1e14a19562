"""Kubernetes Services → `istio.workload.Service` (PROTOCOLS.md §5.1), as istiod's `constructService`.

Also keeps, per Service, what workload translation needs to build a pod's `services` port map: the
selector and the named target ports (resolved per pod, since two pods may number a name differently).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ambient.proto import workload_pb2

from .model import (
    ANN_SUBJECT_ALT_NAMES,
    LABEL_INGRESS_USE_WAYPOINT,
    ClusterState,
    Key,
    Obj,
    annotations_of,
    as_list,
    ip_bytes,
    labels,
    mapping,
    port_number,
    service_hostname,
    spec,
    status,
)
from .waypoints import SERVICE_TRAFFIC, WaypointBinder, is_waypoint_instance

# Port-name prefixes and appProtocol values (Istio's protocol.Parse, case-insensitive). istiod itself
# sends only HTTP11/HTTP2/GRPC and UNKNOWN otherwise; our proto also has TCP and TLS, so we say so.
_APP_PROTOCOLS = {
    "http": workload_pb2.HTTP11,
    "http2": workload_pb2.HTTP2,
    "grpc": workload_pb2.GRPC,
    "tcp": workload_pb2.TCP,
    "tls": workload_pb2.TLS,
    "https": workload_pb2.TLS,
}
# Kubernetes' standard appProtocol names.
_K8S_APP_PROTOCOLS = {
    "kubernetes.io/h2c": workload_pb2.HTTP2,
    "kubernetes.io/ws": workload_pb2.HTTP11,
    "kubernetes.io/wss": workload_pb2.TLS,
}
# Locality-preferring load balancing, istiod's choice for waypoints and `trafficDistribution: PreferClose`.
_PREFER_CLOSE = workload_pb2.LoadBalancing(
    routing_preference=[workload_pb2.LoadBalancing.NETWORK, workload_pb2.LoadBalancing.REGION,
                        workload_pb2.LoadBalancing.ZONE, workload_pb2.LoadBalancing.SUBZONE],
    mode=workload_pb2.LoadBalancing.FAILOVER)
_NODE_LOCAL = workload_pb2.LoadBalancing(
    routing_preference=[workload_pb2.LoadBalancing.NODE], mode=workload_pb2.LoadBalancing.STRICT)


@dataclass(frozen=True)
class ServiceInfo:
    key: Key
    resource_name: str  # `<ns>/<hostname>`, the xDS name and the key in Workload.services
    service: workload_pb2.Service
    selector: Mapping[str, str]  # empty: the Service selects no pods (endpoints come from EndpointSlices)
    target_port_names: Mapping[int, str]  # service port → named targetPort
    port_names: Mapping[int, str]  # service port → its name ("" when unnamed), to read EndpointSlice ports


def app_protocol(port: Mapping[str, Any]) -> workload_pb2.AppProtocol:
    """istiod's ConvertProtocol: UDP/SCTP are never L7; `appProtocol` beats the port name; a name
    counts up to its first '-' (`http-web` is HTTP)."""
    if str(port.get("protocol") or "TCP").upper() != "TCP":
        return workload_pb2.UNKNOWN
    name = str(port.get("appProtocol") or port.get("name") or "")
    if name in _K8S_APP_PROTOCOLS:
        return _K8S_APP_PROTOCOLS[name]
    name = name.lower()
    if name.startswith("grpc-web"):
        return workload_pb2.UNKNOWN  # gRPC-Web is HTTP/1.1 to a proxy but not plain gRPC; istiod agrees
    return _APP_PROTOCOLS.get(name.partition("-")[0], workload_pb2.UNKNOWN)


def _vips(svc: Obj) -> list[bytes]:
    """ClusterIPs (not `None`), then LoadBalancer ingress IPs, as istiod's getVIPs."""
    body = spec(svc)
    cluster_ips = as_list(body.get("clusterIPs")) or [body.get("clusterIP")]
    texts = [ip for ip in cluster_ips if ip and ip != "None"]
    if body.get("type") == "LoadBalancer":
        ingress = as_list(mapping(status(svc).get("loadBalancer")).get("ingress"))
        texts += [i["ip"] for i in ingress if isinstance(i, Mapping) and i.get("ip")]
    result: list[bytes] = []
    for text in texts:
        raw = ip_bytes(text)
        if raw is not None and raw not in result:
            result.append(raw)
    return result


def _load_balancing(svc: Obj) -> workload_pb2.LoadBalancing | None:
    body = spec(svc)
    if body.get("internalTrafficPolicy") == "Local":
        return _NODE_LOCAL
    if is_waypoint_instance(svc) or body.get("trafficDistribution") == "PreferClose":
        return _PREFER_CLOSE
    return None


def build_services(state: ClusterState, binder: WaypointBinder, domain_suffix: str) -> dict[Key, ServiceInfo]:
    result: dict[Key, ServiceInfo] = {}
    for key in sorted(state.services):
        svc = state.services[key]
        namespace, name = key
        hostname = service_hostname(name, namespace, domain_suffix)
        ports: list[workload_pb2.Port] = []
        target_port_names: dict[int, str] = {}
        port_names: dict[int, str] = {}
        for port in as_list(spec(svc).get("ports")):
            if not isinstance(port, Mapping) or (number := port_number(port.get("port"))) is None:
                continue
            port_names[number] = str(port.get("name") or "")
            target = port.get("targetPort", number)  # the API server defaults targetPort to port
            target_number = port_number(target)
            if target_number is None and isinstance(target, str) and target:
                target_port_names[number] = target
            ports.append(workload_pb2.Port(service_port=number, target_port=target_number or 0,
                                           app_protocol=app_protocol(port)))
        service = workload_pb2.Service(
            name=name, namespace=namespace, hostname=hostname,
            addresses=[workload_pb2.NetworkAddress(network="", address=raw) for raw in _vips(svc)],
            ports=ports,
            subject_alt_names=_subject_alt_names(svc),
            canonical=True,
            ingress_use_waypoint=_ingress_use_waypoint(state, svc, namespace))
        waypoint = binder.for_object(svc, SERVICE_TRAFFIC)
        if waypoint is not None:
            service.waypoint.CopyFrom(waypoint.address)
        if (lb := _load_balancing(svc)) is not None:
            service.load_balancing.CopyFrom(lb)
        selector = spec(svc).get("selector")
        result[key] = ServiceInfo(
            key=key, resource_name=f"{namespace}/{hostname}", service=service,
            selector={str(k): str(v) for k, v in selector.items()} if isinstance(selector, Mapping) else {},
            target_port_names=target_port_names, port_names=port_names)
    return result


def _subject_alt_names(svc: Obj) -> list[str]:
    """Our own annotation (istiod gives Kubernetes Services none): extra identities a client accepts
    from this Service's endpoints, comma-separated, sorted."""
    text = str(annotations_of(svc).get(ANN_SUBJECT_ALT_NAMES, ""))
    return sorted({s.strip() for s in text.split(",") if s.strip()})


def _ingress_use_waypoint(state: ClusterState, svc: Obj, namespace: str) -> bool:
    """`istio.io/ingress-use-waypoint: "true"` on the Service, else on its namespace."""
    for source in (labels(svc), labels(state.namespaces.get(namespace) or {})):
        if LABEL_INGRESS_USE_WAYPOINT in source:
            return str(source[LABEL_INGRESS_USE_WAYPOINT]).lower() == "true"
    return False
