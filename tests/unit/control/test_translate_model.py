"""ClusterState and the canonical JSON form (ambient/control/translate/model.py, canonical.py)."""

from __future__ import annotations

import pytest

from ambient.control.translate import ClusterState
from ambient.control.translate.canonical import message_to_canonical
from ambient.proto import authorization_pb2, workload_pb2


def test_from_objects_sorts_by_kind_and_skips_what_translation_does_not_read() -> None:
    state = ClusterState.from_objects([
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "a"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"}},  # no namespace: default
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "w", "namespace": "a"}},
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "g", "namespace": "a"}},
        {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
         "metadata": {"name": "d", "namespace": "a"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "a"}},
    ])
    assert sorted(state.pods) == [("a", "p"), ("default", "q")]
    assert list(state.namespaces) == ["a"]
    assert list(state.gateways) == [("a", "w")]
    assert list(state.peer_authentications) == [("a", "d")]
    assert not state.services and not state.authorization_policies


def test_state_is_read_only() -> None:
    state = ClusterState(pods={("a", "p"): {}})
    with pytest.raises(TypeError):
        state.pods[("a", "q")] = {}  # type: ignore[index]


def test_canonical_form_renders_ips_as_strings() -> None:
    workload = workload_pb2.Address(workload=workload_pb2.Workload(addresses=[bytes([10, 0, 0, 1]), bytes(16)]))
    assert message_to_canonical(workload) == {"workload": {"addresses": ["10.0.0.1", "::"]}}
    match = authorization_pb2.Match(source_ips=[authorization_pb2.Address(address=bytes([10, 0, 0, 0]), length=8)])
    assert message_to_canonical(match) == {"source_ips": [{"address": "10.0.0.0", "length": 8}]}
