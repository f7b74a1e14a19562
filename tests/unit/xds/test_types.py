from __future__ import annotations

from ambient.proto import authorization_pb2, workload_pb2
from ambient.xds.types import (
    address_resource,
    authorization_resource,
    short_type,
    ztunnel_node_id,
)


def test_resource_names_follow_protocols() -> None:
    assert address_resource(workload_pb2.Workload(uid="Kubernetes//Pod/ns/p")).name == "Kubernetes//Pod/ns/p"
    assert address_resource(workload_pb2.Service(namespace="ns", hostname="s.ns.svc.cluster.local")).name == \
        "ns/s.ns.svc.cluster.local"
    assert authorization_resource(authorization_pb2.Authorization(namespace="ns", name="p")).name == "ns/p"


def test_versions_depend_only_on_content() -> None:
    ports = workload_pb2.PortList(ports=[workload_pb2.Port(service_port=80, target_port=8080)])
    one = workload_pb2.Workload(uid="u")
    one.services["ns/a"].CopyFrom(ports)
    one.services["ns/b"].CopyFrom(ports)
    other = workload_pb2.Workload(uid="u")
    other.services["ns/b"].CopyFrom(ports)  # same map, other insertion order
    other.services["ns/a"].CopyFrom(ports)
    assert address_resource(one).version == address_resource(other).version
    other.name = "changed"
    assert address_resource(one).version != address_resource(other).version
    assert address_resource(one).body.type_url == "type.googleapis.com/istio.workload.Address"


def test_node_id_and_short_type() -> None:
    assert ztunnel_node_id("10.0.0.9", "ztunnel-x", "istio-system") == \
        "ztunnel~10.0.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    assert short_type("type.googleapis.com/istio.security.Authorization") == "Authorization"
