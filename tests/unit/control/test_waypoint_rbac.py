"""Who may read the waypoints' L7 configuration: exactly the ServiceAccounts of the accepted waypoint
Gateways, bound to the waypoint ClusterRole by one ClusterRoleBinding the controller keeps."""

from __future__ import annotations

from typing import Any

from ambient.control.waypoints import (
    binding_subjects_patch,
    cluster_role_binding,
    same_role,
    waypoint_subjects,
)
from ambient.kube.merge import merge_patch

Obj = dict[str, Any]
MESH = {"name": "mesh", "port": 15008, "protocol": "HBONE"}


def gateway(namespace: str, name: str, *, cls: str = "istio-waypoint", listeners: list[Obj] | None = None,
            deleting: bool = False) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "uid": f"{namespace}-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta,
            "spec": {"gatewayClassName": cls, "listeners": [MESH] if listeners is None else listeners}}


def sa(namespace: str, name: str) -> Obj:
    return {"kind": "ServiceAccount", "name": name, "namespace": namespace}


def test_subjects_are_the_accepted_waypoints_accounts_sorted_by_namespace_then_name() -> None:
    gateways = [gateway("shop", "waypoint"), gateway("bookinfo", "reviews-wp"), gateway("bookinfo", "a-wp"),
                gateway("shop", "waypoint")]  # the same Gateway twice (e.g. two informers' views): listed once
    assert waypoint_subjects(gateways) == [sa("bookinfo", "a-wp"), sa("bookinfo", "reviews-wp"), sa("shop", "waypoint")]


def test_gateways_that_get_no_waypoint_get_no_access() -> None:
    gateways = [gateway("shop", "ingress", cls="istio"),
                gateway("shop", "broken", listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]),
                gateway("shop", "going", deleting=True)]
    assert waypoint_subjects(gateways) == []


def test_the_binding_names_the_cluster_role_of_the_same_name() -> None:
    binding = cluster_role_binding("ambient-waypoint", [sa("shop", "waypoint")])
    assert binding["apiVersion"] == "rbac.authorization.k8s.io/v1" and binding["kind"] == "ClusterRoleBinding"
    assert binding["metadata"]["name"] == "ambient-waypoint"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "ambient-waypoint"}
    assert binding["subjects"] == [sa("shop", "waypoint")]


def test_subjects_are_patched_only_when_the_set_changes() -> None:
    desired = cluster_role_binding("ambient-waypoint", [sa("shop", "waypoint")])
    # The server may add defaults (apiGroup "" for ServiceAccounts): the same subjects need no write.
    stored = {**desired, "subjects": [{**sa("shop", "waypoint"), "apiGroup": ""}]}
    assert binding_subjects_patch(stored, desired) is None

    wider = {**desired, "subjects": [{"kind": "Group", "name": "system:serviceaccounts",
                                      "apiGroup": "rbac.authorization.k8s.io"}]}
    patch = binding_subjects_patch(wider, desired)
    assert patch is not None
    assert merge_patch(wider, patch)["subjects"] == [sa("shop", "waypoint")]  # replaced whole, not merged

    emptied = cluster_role_binding("ambient-waypoint", [])
    patch = binding_subjects_patch(desired, emptied)
    assert patch == {"subjects": []}


def test_a_binding_to_another_role_cannot_be_patched() -> None:
    desired = cluster_role_binding("ambient-waypoint", [])
    assert same_role(desired, desired)
    other = {**desired, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}}
    assert not same_role(other, desired)
