"""Transcripts for the server side of delta xDS: requests in, outcomes and responses out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest

from ambient.proto import discovery_pb2, workload_pb2
from ambient.xds.errors import XdsProtocolError
from ambient.xds.server_state import DeltaStream, RequestKind
from ambient.xds.types import ADDRESS_TYPE_URL as ADDR
from ambient.xds.types import AUTHORIZATION_TYPE_URL as AUTHZ
from ambient.xds.types import XdsResource, address_resource

NODE = "ztunnel~10.0.0.9~zt.istio-system~istio-system.svc.cluster.local"


def workload(name: str, revision: str = "v1") -> XdsResource:
    return address_resource(workload_pb2.Workload(uid=name, name=name, canonical_revision=revision,
                                                  addresses=[bytes([10, 0, 0, len(name)])]))


def resources(*items: XdsResource) -> Mapping[str, XdsResource]:
    return {r.name: r for r in items}


def request(type_url: str = ADDR, *, node: str = "", nonce: str = "", subscribe: Iterable[str] = (),
            unsubscribe: Iterable[str] = (), initial: Mapping[str, str] | None = None,
            error: str | None = None) -> discovery_pb2.DeltaDiscoveryRequest:
    message = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, response_nonce=nonce, resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe), initial_resource_versions=dict(initial or {}))
    if node:
        message.node.id = node
    if error is not None:
        message.error_detail.code = 3
        message.error_detail.message = error
    return message


def sent(response: discovery_pb2.DeltaDiscoveryResponse | None) -> tuple[list[tuple[str, str]], list[str]]:
    assert response is not None, "expected a response"
    return [(r.name, r.version) for r in response.resources], list(response.removed_resources)


def subscribed_stream(*types: str) -> DeltaStream:
    stream = DeltaStream(nonce_prefix="n")
    for i, type_url in enumerate(types or (ADDR,)):
        stream.receive(request(type_url, node=NODE if i == 0 else ""))
    return stream


def test_first_request_must_name_the_node() -> None:
    with pytest.raises(XdsProtocolError, match="no node id") as caught:
        DeltaStream().receive(request())
    assert caught.value.reason == "missing_node"


def test_unknown_type_is_refused_with_the_served_ones() -> None:
    with pytest.raises(XdsProtocolError, match=r"istio.workload.Address or .*istio.security.Authorization") as caught:
        DeltaStream().receive(request("type.googleapis.com/envoy.config.cluster.v3.Cluster", node=NODE))
    assert caught.value.reason == "unsupported_type"


def test_initial_wildcard_gets_everything_and_an_empty_type_still_gets_an_answer() -> None:
    stream = DeltaStream(nonce_prefix="n")
    first = stream.receive(request(ADDR, node=NODE))
    assert (first.kind, first.respond) == (RequestKind.SUBSCRIBE, True)
    assert stream.node_id == NODE
    assert stream.receive(request(AUTHZ)).kind is RequestKind.SUBSCRIBE
    a, b = workload("b"), workload("a")
    current = resources(a, b)

    response = stream.next_response(ADDR, current, "7")
    assert response is not None and response.nonce == "n1" and response.system_version_info == "7"
    assert sent(response) == ([("a", b.version), ("b", a.version)], [])
    empty = stream.next_response(AUTHZ, {})
    assert empty is not None and sent(empty) == ([], []) and empty.nonce == "n2"
    assert stream.next_response(ADDR, current) is None
    assert stream.next_response(AUTHZ, {}) is None


def test_not_subscribed_type_gets_nothing() -> None:
    stream = subscribed_stream(ADDR)
    assert stream.next_response(AUTHZ, {}) is None


def test_incremental_add_update_remove() -> None:
    stream = subscribed_stream()
    stream.next_response(ADDR, resources(workload("a"), workload("b")))
    a2, c = workload("a", "v2"), workload("c")
    assert sent(stream.next_response(ADDR, resources(a2, c))) == ([("a", a2.version), ("c", c.version)], ["b"])
    assert stream.next_response(ADDR, resources(a2, c)) is None  # an equal, new mapping: no diff


def test_ack_advances_acked_versions() -> None:
    stream = subscribed_stream()
    a1 = workload("a")
    first = stream.next_response(ADDR, resources(a1))
    assert first is not None and stream.acked(ADDR) == {}
    outcome = stream.receive(request(nonce=first.nonce))
    assert (outcome.kind, outcome.respond, dict(outcome.versions)) == (RequestKind.ACK, False, {"a": a1.version})
    assert stream.acked(ADDR) == {"a": a1.version} and stream.pending_nonces == ()

    a2 = workload("a", "v2")
    second = stream.next_response(ADDR, resources(a2))
    assert second is not None and stream.acked(ADDR) == {"a": a1.version}
    stream.receive(request(nonce=second.nonce))
    assert stream.acked(ADDR) == {"a": a2.version}

    third = stream.next_response(ADDR, {})
    assert third is not None
    assert stream.receive(request(nonce=third.nonce)).removed == ("a",)
    assert stream.acked(ADDR) == {}


def test_nacked_resource_is_not_resent_until_it_changes_while_others_flow() -> None:
    stream = subscribed_stream()
    stream.next_response(ADDR, resources(workload("a"), workload("b")))
    bad = workload("a", "bad")
    response = stream.next_response(ADDR, resources(bad, workload("b")))
    assert response is not None
    outcome = stream.receive(request(nonce=response.nonce, error="a: cannot decode"))
    assert (outcome.kind, outcome.error, dict(outcome.versions)) == (RequestKind.NACK, "a: cannot decode",
                                                                       {"a": bad.version})
    assert stream.nacked(ADDR) == {"a": bad.version}

    b2 = workload("b", "v2")
    assert sent(stream.next_response(ADDR, resources(bad, b2))) == ([("b", b2.version)], [])
    good = workload("a", "good")
    assert sent(stream.next_response(ADDR, resources(good, b2))) == ([("a", good.version)], [])


def test_nack_memory_is_not_resurrected_after_removal() -> None:
    stream = subscribed_stream()
    bad = workload("a", "bad")
    response = stream.next_response(ADDR, resources(bad))
    assert response is not None
    stream.receive(request(nonce=response.nonce, error="nope"))
    assert sent(stream.next_response(ADDR, {})) == ([], ["a"])
    # Deleted and created again: new to the client, so it is offered again.
    assert sent(stream.next_response(ADDR, resources(bad))) == ([("a", bad.version)], [])


def test_initial_resource_versions_skip_what_the_client_has_and_remove_what_is_gone() -> None:
    a, b_old, b_new, c = workload("a"), workload("b", "old"), workload("b", "new"), workload("c")
    stream = DeltaStream()
    stream.receive(request(node=NODE, initial={"a": a.version, "b": b_old.version, "gone": "x"}))
    assert stream.acked(ADDR) == {"a": a.version, "b": b_old.version, "gone": "x"}
    assert sent(stream.next_response(ADDR, resources(a, b_new, c))) == (
        [("b", b_new.version), ("c", c.version)], ["gone"])


def test_reconnect_with_everything_current_still_gets_an_empty_answer() -> None:
    a = workload("a")
    stream = DeltaStream()
    stream.receive(request(node=NODE, initial={"a": a.version}))
    assert sent(stream.next_response(ADDR, resources(a))) == ([], [])


def test_unknown_or_foreign_nonce_is_stale() -> None:
    stream = subscribed_stream(ADDR, AUTHZ)
    response = stream.next_response(ADDR, resources(workload("a")))
    assert response is not None
    assert stream.receive(request(nonce="from-another-stream")).kind is RequestKind.STALE
    assert stream.receive(request(AUTHZ, nonce=response.nonce)).kind is RequestKind.STALE
    assert stream.receive(request(ADDR, nonce=response.nonce)).kind is RequestKind.ACK


def test_old_nonces_are_forgotten_beyond_the_cap() -> None:
    stream = DeltaStream(max_pending=2)
    stream.receive(request(node=NODE))
    nonces = []
    for revision in ("1", "2", "3"):
        response = stream.next_response(ADDR, resources(workload("a", revision)))
        assert response is not None
        nonces.append(response.nonce)
    assert stream.pending_nonces == tuple(nonces[1:])
    assert stream.receive(request(nonce=nonces[0])).kind is RequestKind.STALE


def test_explicit_subscriptions() -> None:
    a, b = workload("a"), workload("b")
    current = resources(a, b)
    stream = DeltaStream()
    stream.receive(request(node=NODE, subscribe=["a", "missing"]))
    assert sent(stream.next_response(ADDR, current)) == ([("a", a.version)], ["missing"])
    assert stream.next_response(ADDR, resources(a, workload("b", "v2"))) is None

    outcome = stream.receive(request(unsubscribe=["a"]))
    assert (outcome.kind, outcome.respond) == (RequestKind.UPDATE, False)
    assert stream.sent(ADDR) == {}
    assert stream.next_response(ADDR, resources(workload("a", "v2"))) is None

    outcome = stream.receive(request(subscribe=["*"]))
    assert outcome.respond
    assert sent(stream.next_response(ADDR, current)) == ([("a", a.version), ("b", b.version)], [])


def test_subscription_change_piggybacked_on_an_ack() -> None:
    stream = DeltaStream()
    stream.receive(request(node=NODE, subscribe=["a"]))
    response = stream.next_response(ADDR, resources(workload("a"), workload("b")))
    assert response is not None
    outcome = stream.receive(request(nonce=response.nonce, subscribe=["b"]))
    assert (outcome.kind, outcome.respond) == (RequestKind.ACK, True)
    b = workload("b")
    assert sent(stream.next_response(ADDR, resources(workload("a"), b))) == ([("b", b.version)], [])
