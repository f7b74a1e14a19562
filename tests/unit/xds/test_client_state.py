"""Transcripts for the client side of delta xDS: responses in, store changes and ACK/NACK out."""

from __future__ import annotations

from google.protobuf import any_pb2

from ambient.proto import authorization_pb2, discovery_pb2, workload_pb2
from ambient.xds.client_state import DeltaClientState
from ambient.xds.errors import ResourceRejected
from ambient.xds.types import ADDRESS_TYPE_URL as ADDR
from ambient.xds.types import AUTHORIZATION_TYPE_URL as AUTHZ
from ambient.xds.types import XdsResource, address_resource, authorization_resource

NODE = "ztunnel~10.0.0.9~zt.istio-system~istio-system.svc.cluster.local"
POD_A = workload_pb2.Workload(uid="c//Pod/ns/a", name="a", namespace="ns", addresses=[bytes([10, 0, 0, 1])])
SVC = workload_pb2.Service(name="s", namespace="ns", hostname="s.ns.svc.cluster.local",
                           addresses=[workload_pb2.NetworkAddress(address=bytes([10, 96, 0, 1]))])
POLICY = authorization_pb2.Authorization(name="deny", namespace="ns", action=authorization_pb2.DENY)


def response(type_url: str, nonce: str, *items: XdsResource, removed: tuple[str, ...] = ()
             ) -> discovery_pb2.DeltaDiscoveryResponse:
    message = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce, removed_resources=removed)
    for item in items:
        message.resources.add(name=item.name, version=item.version, resource=item.body)
    return message


def raw(name: str, type_url: str, value: bytes, version: str = "1") -> XdsResource:
    return XdsResource(name, version, any_pb2.Any(type_url=type_url, value=value))


def test_stream_opens_with_wildcard_subscriptions_for_both_types() -> None:
    state = DeltaClientState(NODE, node_metadata={"CLUSTER_ID": "Kubernetes"})
    requests = state.start_stream()
    assert [r.type_url for r in requests] == [ADDR, AUTHZ]
    for r in requests:
        assert r.node.id == NODE and r.node.metadata["CLUSTER_ID"] == "Kubernetes"
        assert list(r.resource_names_subscribe) == [] and dict(r.initial_resource_versions) == {}
        assert not r.response_nonce and not r.HasField("error_detail")


def test_responses_become_changes_and_acks_and_ready_needs_both_types() -> None:
    state = DeltaClientState(NODE)
    pod, svc = address_resource(POD_A), address_resource(SVC)
    result = state.on_response(response(ADDR, "n1", pod, svc))
    assert dict(result.changes.workloads) == {"c//Pod/ns/a": POD_A}
    assert dict(result.changes.services) == {"ns/s.ns.svc.cluster.local": SVC}
    assert result.request == discovery_pb2.DeltaDiscoveryRequest(type_url=ADDR, response_nonce="n1")
    assert not result.is_nack and not result.became_ready and not state.ready
    assert state.waiting_for == (AUTHZ,)

    result = state.on_response(response(AUTHZ, "n2"))
    assert not result.changes and result.became_ready and state.ready
    policy = authorization_resource(POLICY)
    result = state.on_response(response(AUTHZ, "n3", policy))
    assert dict(result.changes.authorizations) == {"ns/deny": POLICY} and not result.became_ready
    assert state.versions(AUTHZ) == {"ns/deny": policy.version}


def test_bad_resources_are_nacked_by_name_and_the_rest_applied() -> None:
    state = DeltaClientState(NODE)
    five_bytes = workload_pb2.Workload(uid="c//Pod/ns/five", addresses=[b"\x01\x02\x03\x04\x05"])
    misnamed = workload_pb2.Workload(uid="c//Pod/ns/real")
    good = address_resource(POD_A)
    result = state.on_response(response(
        ADDR, "n1", good,
        raw("garbage", ADDR, b"\xff\xff\xff"),
        raw("wrong-type", AUTHZ, POLICY.SerializeToString()),
        address_resource(five_bytes),
        XdsResource("c//Pod/ns/alias", "1", address_resource(misnamed).body),
        raw("empty", ADDR, b""),
    ))
    assert result.is_nack
    assert result.request.response_nonce == "n1" and result.request.error_detail.code == 3
    assert set(result.rejected) == {"garbage", "wrong-type", "c//Pod/ns/five", "c//Pod/ns/alias", "empty"}
    message = result.request.error_detail.message
    assert message.startswith("rejected 5 of 6 resources: ")
    assert "c//Pod/ns/five: a workload address is 5 bytes" in message
    assert "wrong-type: carries type.googleapis.com/istio.security.Authorization" in message
    assert "empty: Address holds neither a workload nor a service" in message
    assert list(result.changes.workloads) == ["c//Pod/ns/a"]
    assert state.versions(ADDR) == {"c//Pod/ns/a": good.version}
    assert result.became_ready is False  # only one type answered so far


def test_rejected_update_keeps_the_old_version_for_reconnects() -> None:
    state = DeltaClientState(NODE)
    v1 = address_resource(POD_A)
    state.on_response(response(ADDR, "n1", v1))
    state.on_response(response(ADDR, "n2", raw(v1.name, ADDR, b"\xff", version="v2")))
    assert state.start_stream()[0].initial_resource_versions == {v1.name: v1.version}


def test_a_handler_can_refuse_a_resource() -> None:
    def picky(name: str, body: any_pb2.Any) -> authorization_pb2.Authorization:
        raise ResourceRejected("dry-run policies are not supported")

    state = DeltaClientState(NODE, decoders={AUTHZ: picky})
    result = state.on_response(response(AUTHZ, "n1", authorization_resource(POLICY)))
    assert result.rejected == {"ns/deny": "dry-run policies are not supported"}
    assert not result.changes and state.versions(AUTHZ) == {}


def test_removals_and_reconnect_versions() -> None:
    state = DeltaClientState(NODE)
    pod, svc = address_resource(POD_A), address_resource(SVC)
    state.on_response(response(ADDR, "n1", pod, svc))
    assert dict(state.start_stream()[0].initial_resource_versions) == {pod.name: pod.version, svc.name: svc.version}

    result = state.on_response(response(ADDR, "n2", removed=(pod.name, "never-had")))
    assert result.changes.removed_addresses == (pod.name,) and not result.is_nack
    assert dict(state.start_stream()[0].initial_resource_versions) == {svc.name: svc.version}


def test_resend_at_the_held_version_is_a_no_op() -> None:
    state = DeltaClientState(NODE)
    pod = address_resource(POD_A)
    state.on_response(response(ADDR, "n1", pod))
    result = state.on_response(response(ADDR, "n2", pod))
    assert not result.changes and not result.is_nack


def test_unrequested_type_is_nacked_and_does_not_count_for_ready() -> None:
    state = DeltaClientState(NODE)
    result = state.on_response(response("type.googleapis.com/envoy.config.cluster.v3.Cluster", "n1"))
    assert result.is_nack and "was not requested" in result.request.error_detail.message
    assert state.waiting_for == (ADDR, AUTHZ)


def test_policy_with_an_impossible_prefix_is_rejected() -> None:
    bad = authorization_pb2.Authorization(name="p", namespace="ns", rules=[authorization_pb2.Rule(clauses=[
        authorization_pb2.Clause(matches=[authorization_pb2.Match(
            source_ips=[authorization_pb2.Address(address=bytes([10, 0, 0, 0]), length=33)])])])])
    result = DeltaClientState(NODE).on_response(response(AUTHZ, "n1", authorization_resource(bad)))
    assert result.rejected == {"ns/p": "prefix length 33 is too long for 10.0.0.0"}
