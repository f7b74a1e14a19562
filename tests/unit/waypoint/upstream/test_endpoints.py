"""A service port's endpoints from the xDS snapshot: target ports, identity, health, subsets by pod labels."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from ambient.proto import workload_pb2
from ambient.xds.store import StoreChanges, WorkloadSnapshot, WorkloadStore
from waypoint.upstream.endpoints import Endpoint, endpoints_for

KEY = "default/reviews.default.svc.cluster.local"


def workload(name: str, ip: str, *, ports: Iterable[tuple[int, int]] = (), healthy: bool = True,
             hbone: bool = True, node: str = "node-1", member: bool = True) -> workload_pb2.Workload:
    w = workload_pb2.Workload(
        uid=f"Kubernetes//Pod/default/{name}", name=name, namespace="default",
        addresses=[ipaddress.ip_address(ip).packed] if ip else [], service_account="bookinfo-reviews",
        trust_domain="cluster.local", node=node,
        tunnel_protocol=workload_pb2.HBONE if hbone else workload_pb2.NONE,
        status=workload_pb2.HEALTHY if healthy else workload_pb2.UNHEALTHY)
    if member:
        w.services[KEY].ports.extend(workload_pb2.Port(service_port=s, target_port=t) for s, t in ports)
    return w


def service(target_port: int = 9080, *, allow_all: bool = False) -> workload_pb2.Service:
    s = workload_pb2.Service(name="reviews", namespace="default", hostname="reviews.default.svc.cluster.local",
                             ports=[workload_pb2.Port(service_port=9080, target_port=target_port)])
    if allow_all:
        s.load_balancing.health_policy = workload_pb2.LoadBalancing.ALLOW_ALL
    return s


def snapshot_of(*workloads: workload_pb2.Workload) -> WorkloadSnapshot:
    store = WorkloadStore()
    return store.apply(StoreChanges(workloads={w.uid: w for w in workloads}))


LABELS: dict[str, Mapping[str, str]] = {
    "reviews-v1": {"app": "reviews", "version": "v1"},
    "reviews-v2": {"app": "reviews", "version": "v2"},
    "reviews-v3": {"app": "reviews", "version": "v3"},
}


def pod_labels(namespace: str, name: str) -> Mapping[str, str] | None:
    assert namespace == "default"
    return LABELS.get(name)


def bookinfo() -> WorkloadSnapshot:
    return snapshot_of(workload("reviews-v1", "10.0.0.1", ports=[(9080, 9080)]),
                       workload("reviews-v2", "10.0.0.2", ports=[(9080, 9080)], node="node-2"),
                       workload("reviews-v3", "10.0.0.3", ports=[(9080, 9080)]))


def test_every_member_workload_becomes_an_endpoint_with_its_dial_facts() -> None:
    found = endpoints_for(bookinfo(), service(), 9080, pod_labels)
    assert [e.uid for e in found] == [f"Kubernetes//Pod/default/reviews-v{i}" for i in (1, 2, 3)]
    v2 = found[1]
    assert (v2.ip, v2.target_port, v2.authority) == ("10.0.0.2", 9080, "10.0.0.2:9080")
    assert v2.identity == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    assert (v2.healthy, v2.hbone, v2.node) == (True, True, "node-2")
    assert v2.labels == {"app": "reviews", "version": "v2"}
    assert v2.workload is not None and v2.workload.name == "reviews-v2"


def test_subset_keeps_only_pods_whose_labels_match() -> None:
    found = endpoints_for(bookinfo(), service(), 9080, pod_labels, {"version": "v2"})
    assert [e.uid for e in found] == ["Kubernetes//Pod/default/reviews-v2"]
    assert endpoints_for(bookinfo(), service(), 9080, pod_labels, {"version": "v9"}) == []
    assert len(endpoints_for(bookinfo(), service(), 9080, pod_labels, {})) == 3


def test_a_pod_with_unknown_labels_is_an_endpoint_but_in_no_subset() -> None:
    snapshot = snapshot_of(workload("reviews-new", "10.0.0.9", ports=[(9080, 9080)]))
    assert [e.labels for e in endpoints_for(snapshot, service(), 9080, pod_labels)] == [{}]
    assert endpoints_for(snapshot, service(), 9080, pod_labels, {"version": "v1"}) == []


def test_target_port_resolution_pod_entry_then_service_then_port() -> None:
    snapshot = snapshot_of(workload("reviews-v1", "10.0.0.1", ports=[(9080, 8080)]),
                           workload("reviews-v2", "10.0.0.2"),
                           workload("reviews-v3", "10.0.0.3", ports=[(9080, 0)]))
    assert [e.target_port for e in endpoints_for(snapshot, service(7000), 9080, pod_labels)] == [8080, 7000, 7000]
    # A named targetPort (0 on the service) only reaches pods that declare it.
    assert [e.target_port for e in endpoints_for(snapshot, service(0), 9080, pod_labels)] == [8080, 9080]


def test_unknown_service_port_has_no_endpoints() -> None:
    assert endpoints_for(bookinfo(), service(), 80, pod_labels) == []


def test_health_tunnel_and_address_facts() -> None:
    snapshot = snapshot_of(workload("reviews-v1", "10.0.0.1", ports=[(9080, 9080)], healthy=False),
                           workload("reviews-v2", "fd00::2", ports=[(9080, 9080)], hbone=False),
                           workload("reviews-v3", "", ports=[(9080, 9080)]),
                           workload("ratings-v1", "10.0.0.4", member=False))
    found = endpoints_for(snapshot, service(), 9080, pod_labels)
    assert [(e.uid.rsplit("/", 1)[1], e.healthy, e.hbone) for e in found] == [
        ("reviews-v1", False, True), ("reviews-v2", True, False)]
    assert found[1].authority == "[fd00::2]:9080"
    allow_all = endpoints_for(snapshot, service(allow_all=True), 9080, pod_labels)
    assert all(e.healthy for e in allow_all)


def test_endpoints_are_hashable_values() -> None:
    first = endpoints_for(bookinfo(), service(), 9080, pod_labels)
    again = endpoints_for(bookinfo(), service(), 9080, pod_labels)
    assert first == again
    assert len({*first, *again}) == 3
    assert isinstance(first[0], Endpoint)
