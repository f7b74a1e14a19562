"""PeerAuthentication → converted DENY policies (ambient/control/translate/peerauthn.py)."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.control.translate import Translation
from ambient.control.translate.canonical import message_to_canonical
from ambient.proto import authorization_pb2

from .translate_cases import check_case, load_case

STATIC = "istio-system/istio_converted_static_strict"
NO_IDENTITY: dict[str, Any] = {"not_principals": [{"presence": {}}]}


@pytest.fixture(scope="module")
def mesh_strict() -> Translation:
    return load_case("peerauthn-mesh-strict").translate()


def _policies(translation: Translation, namespace: str, pod: str) -> list[str]:
    return list(translation.addresses[f"Kubernetes//Pod/{namespace}/{pod}"].workload.authorization_policies)


@pytest.mark.parametrize("name", ["peerauthn-mesh-strict", "peerauthn-no-mesh-policy"])
def test_case_matches_expected(name: str) -> None:
    check_case(name)


def test_static_strict_policy(mesh_strict: Translation) -> None:
    static = mesh_strict.authorizations[STATIC]
    assert (static.name, static.namespace, static.action) == (
        "istio_converted_static_strict", "istio-system", authorization_pb2.DENY)
    assert static.scope == authorization_pb2.WORKLOAD_SELECTOR  # bound by name, so namespaces can opt out
    assert message_to_canonical(static)["rules"] == [{"clauses": [{"matches": [NO_IDENTITY]}]}]


def test_no_peer_authentication_means_no_policy() -> None:
    translation = load_case("workloads").translate()
    assert translation.authorizations == {}


def test_mesh_strict_is_inherited_unless_a_namespace_relaxes_it(mesh_strict: Translation) -> None:
    assert _policies(mesh_strict, "inherit", "app") == [STATIC]
    assert _policies(mesh_strict, "unset", "app") == [STATIC]  # namespace policy without a mode
    assert _policies(mesh_strict, "relaxed", "app") == []  # namespace PERMISSIVE overrides
    assert _policies(mesh_strict, "disabled", "app") == []  # DISABLE counts as PERMISSIVE
    assert _policies(mesh_strict, "relaxed", "db") == [STATIC]  # selector STRICT in a PERMISSIVE namespace
    assert _policies(mesh_strict, "mixed", "legacy") == []  # selector DISABLE


def test_strict_workload_with_port_exceptions(mesh_strict: Translation) -> None:
    name = "mixed/converted_peer_authentication_web-exceptions"
    assert _policies(mesh_strict, "mixed", "web") == [name]  # instead of the static one
    assert message_to_canonical(mesh_strict.authorizations[name])["rules"] == [{"clauses": [
        {"matches": [NO_IDENTITY]},
        {"matches": [{"not_destination_ports": [8080]}]},
        {"matches": [{"not_destination_ports": [9090]}]},
    ]}]


def test_inherited_strict_with_a_permissive_port_is_merged(mesh_strict: Translation) -> None:
    name = "mixed/converted_peer_authentication_api-ports"
    assert _policies(mesh_strict, "mixed", "api") == [name]
    assert message_to_canonical(mesh_strict.authorizations[name])["rules"] == [{"clauses": [
        {"matches": [{"not_destination_ports": [9090]}]},
        {"matches": [NO_IDENTITY]},
    ]}]


def test_permissive_workload_with_strict_ports() -> None:
    translation = load_case("peerauthn-no-mesh-policy").translate()
    name = "open/converted_peer_authentication_admin-port"
    assert _policies(translation, "open", "web") == [name]
    assert [message_to_canonical(r) for r in translation.authorizations[name].rules] == [
        {"clauses": [{"matches": [{**NO_IDENTITY, "destination_ports": [9000]}]}]},
        {"clauses": [{"matches": [{**NO_IDENTITY, "destination_ports": [9443]}]}]},
    ]
    # custom root namespace; namespace STRICT and selector STRICT without a mesh policy
    assert _policies(translation, "bank", "teller") == ["mesh-root/istio_converted_static_strict"]
    assert _policies(translation, "open", "db") == ["mesh-root/istio_converted_static_strict"]
    assert _policies(translation, "open", "misc") == []


def test_oldest_policy_wins(mesh_strict: Translation) -> None:
    # the newer mesh-wide PERMISSIVE policy is ignored; the newer selector DISABLE loses to the older STRICT one
    assert _policies(mesh_strict, "inherit", "app") == [STATIC]
    assert _policies(mesh_strict, "mixed", "web") == ["mixed/converted_peer_authentication_web-exceptions"]
    assert _policies(mesh_strict, "mixed", "edge-only") == []


def test_strict_ports_under_strict_add_nothing(mesh_strict: Translation) -> None:
    assert "mixed/converted_peer_authentication_all-strict" not in mesh_strict.authorizations
    assert _policies(mesh_strict, "mixed", "vault") == [STATIC]


def test_permissive_workload_strict_port_in_relaxed_namespace(mesh_strict: Translation) -> None:
    name = "relaxed/converted_peer_authentication_pay-ports"
    assert _policies(mesh_strict, "relaxed", "pay") == [name]
    assert [message_to_canonical(r) for r in mesh_strict.authorizations[name].rules] == [
        {"clauses": [{"matches": [{**NO_IDENTITY, "destination_ports": [8443]}]}]}]


def test_every_listed_policy_exists(mesh_strict: Translation) -> None:
    for address in mesh_strict.addresses.values():
        for name in address.workload.authorization_policies:
            assert name in mesh_strict.authorizations
