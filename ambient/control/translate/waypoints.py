"""Waypoints (PROTOCOLS.md §8): which Gateways are usable waypoints, and which waypoint a Service or a
workload is bound to through the `istio.io/use-waypoint[-namespace]` labels.

Mirrors istiod's `WaypointsCollection` and `fetchWaypointForTarget`. Pure: reads a ClusterState.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ambient.kube.selectors import SelectorError, labels_match, selector_from_match_labels
from ambient.proto import workload_pb2

from .model import (
    GATEWAY_MANAGED_MESH,
    HBONE_PORT,
    LABEL_GATEWAY_MANAGED,
    LABEL_GATEWAY_NAME,
    LABEL_USE_WAYPOINT,
    LABEL_USE_WAYPOINT_NAMESPACE,
    LABEL_WAYPOINT_FOR,
    WAYPOINT_CLASS,
    ClusterState,
    Key,
    Obj,
    as_list,
    ip_bytes,
    labels,
    mapping,
    meta,
    spec,
    status,
)

# `istio.io/waypoint-for` values.
SERVICE_TRAFFIC = "service"
WORKLOAD_TRAFFIC = "workload"
ALL_TRAFFIC = "all"
NO_TRAFFIC = "none"
DEFAULT_TRAFFIC = SERVICE_TRAFFIC  # Istio's default when the Gateway has no label
# A `use-waypoint` value that opts the object out; Istio reserves the word, so no waypoint is named "none".
OPT_OUT = "none"


@dataclass(frozen=True)
class Waypoint:
    namespace: str
    name: str
    address: workload_pb2.GatewayAddress
    traffic_type: str
    # allowedRoutes.namespaces of the HBONE listener: "Same" (the default), "All" or "Selector".
    allowed_from: str = "Same"
    allowed_selector: Mapping[str, Any] | None = None

    def serves(self, traffic: str) -> bool:
        return self.traffic_type in (traffic, ALL_TRAFFIC)

    def allows_namespace(self, namespace: str, namespace_labels: Mapping[str, str]) -> bool:
        if self.allowed_from == "All":
            return True
        if self.allowed_from == "Selector":
            try:
                requirements = selector_from_match_labels(self.allowed_selector)
            except SelectorError:
                return False
            return labels_match(requirements, namespace_labels)
        return namespace == self.namespace


def build_waypoints(state: ClusterState) -> dict[Key, Waypoint]:
    """Gateways of class `istio-waypoint` whose status already has an address; before the controller
    sets `status.addresses` (no ready waypoint pod yet) the waypoint does not exist and traffic goes direct."""
    result: dict[Key, Waypoint] = {}
    for key in sorted(state.gateways):
        gateway = state.gateways[key]
        if spec(gateway).get("gatewayClassName") != WAYPOINT_CLASS:
            continue
        address = _gateway_address(gateway, key[0])
        if address is None:
            continue
        allowed_from, allowed_selector = _allowed_routes(gateway)
        result[key] = Waypoint(
            namespace=key[0], name=key[1], address=address,
            traffic_type=str(labels(gateway).get(LABEL_WAYPOINT_FOR, DEFAULT_TRAFFIC)),
            allowed_from=allowed_from, allowed_selector=allowed_selector)
    return result


def _gateway_address(gateway: Obj, namespace: str) -> workload_pb2.GatewayAddress | None:
    """istiod prefers a Hostname address (a stable key, unlike a re-allocatable IP), then an IP."""
    addresses = [a for a in as_list(status(gateway).get("addresses")) if isinstance(a, Mapping)]
    for a in addresses:
        if a.get("type") == "Hostname" and a.get("value"):
            return workload_pb2.GatewayAddress(
                hostname=workload_pb2.NamespacedHostname(namespace=namespace, hostname=str(a["value"])),
                hbone_mtls_port=HBONE_PORT)
    for a in addresses:
        # Gateway API: `type` defaults to IPAddress.
        if a.get("type", "IPAddress") == "IPAddress" and (raw := ip_bytes(a.get("value"))) is not None:
            return workload_pb2.GatewayAddress(
                address=workload_pb2.NetworkAddress(network="", address=raw), hbone_mtls_port=HBONE_PORT)
    return None


def _allowed_routes(gateway: Obj) -> tuple[str, Mapping[str, Any] | None]:
    for listener in as_list(spec(gateway).get("listeners")):
        if isinstance(listener, Mapping) and listener.get("protocol") == "HBONE" and listener.get("port") == HBONE_PORT:
            namespaces = mapping(mapping(listener.get("allowedRoutes")).get("namespaces"))
            selector = mapping(namespaces.get("selector"))
            # Shape-check here so the shared selector parser only sees what the API would accept.
            clean = {"matchLabels": mapping(selector.get("matchLabels")),
                     "matchExpressions": [e for e in as_list(selector.get("matchExpressions"))
                                          if isinstance(e, Mapping) and isinstance(e.get("values", []), list)]}
            return str(namespaces.get("from") or "Same"), clean
    return "Same", None


def is_waypoint_instance(obj: Obj) -> bool:
    """A waypoint's own pod or Service: it never sends its traffic to a waypoint."""
    object_labels = labels(obj)
    return LABEL_GATEWAY_NAME in object_labels or object_labels.get(LABEL_GATEWAY_MANAGED) == GATEWAY_MANAGED_MESH


class WaypointBinder:
    """Answers "which waypoint serves this object" for Services and workloads."""

    def __init__(self, state: ClusterState, waypoints: Mapping[Key, Waypoint]) -> None:
        self._namespaces = state.namespaces
        self._waypoints = waypoints

    def for_object(self, obj: Obj, traffic: str) -> Waypoint | None:
        if is_waypoint_instance(obj):
            return None
        waypoint = self._bound(obj)
        return waypoint if waypoint is not None and waypoint.serves(traffic) else None

    def _bound(self, obj: Obj) -> Waypoint | None:
        namespace = str(meta(obj).get("namespace") or "default")
        namespace_labels = labels(self._namespaces.get(namespace) or {})
        # The object's own label beats its namespace's, even when the waypoint it names is not ready.
        for source in (labels(obj), namespace_labels):
            name = source.get(LABEL_USE_WAYPOINT)
            if name is None:
                continue
            if name == OPT_OUT:
                return None
            waypoint_namespace = source.get(LABEL_USE_WAYPOINT_NAMESPACE) or namespace
            waypoint = self._waypoints.get((waypoint_namespace, name))
            if waypoint is None or not waypoint.allows_namespace(namespace, namespace_labels):
                return None
            return waypoint
        return None
