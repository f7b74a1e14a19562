"""The controllers' pure pieces: EndpointSlice computation, pod-template hashing, expectations."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.local import controllers
from ambient.local.controllers import (
    EXPECTATION_TTL,
    SLICE_MANAGER,
    Controllers,
    Expectations,
    owned_by,
    owner_ref,
    pod_active,
    pod_ready,
    resolve_target_port,
    template_hash,
)

Obj = dict[str, Any]


def service(ports: list[Obj] | None = None, name: str = "web", namespace: str = "default") -> Obj:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-svc-{name}"},
            "spec": {"selector": {"app": "web"},
                     "ports": ports if ports is not None else [{"name": "http", "port": 80, "targetPort": 8080}]}}


def pod(name: str, *, namespace: str = "default", ip: str | None = "10.244.1.5", ready: bool = True,
        phase: str = "Running", labels: Obj | None = None, ports: list[Obj] | None = None,
        deleting: bool = False, node: str = "node-1") -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                 "labels": labels if labels is not None else {"app": "web"}}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: Obj = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "app", "ports": ports or []}]}, "status": status}


def only(slices: dict[str, Obj]) -> Obj:
    assert len(slices) == 1, slices
    return next(iter(slices.values()))


# -- desired_slices ------------------------------------------------------------------------------------

def test_numeric_target_port_gives_one_slice_with_all_ready_pods() -> None:
    svc = service()
    pods = [pod("b", ip="10.244.1.6"), pod("a", ip="10.244.1.5")]
    body = only(Controllers.desired_slices(svc, pods))
    assert body["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [e["addresses"] for e in body["endpoints"]] == [["10.244.1.5"], ["10.244.1.6"]]
    assert [e["targetRef"]["name"] for e in body["endpoints"]] == ["a", "b"]
    assert all(e["conditions"] == {"ready": True, "serving": True, "terminating": False} for e in body["endpoints"])
    assert body["endpoints"][0]["nodeName"] == "node-1"
    assert body["addressType"] == "IPv4"


def test_slice_metadata_names_service_manager_and_owner() -> None:
    svc = service()
    name, body = next(iter(Controllers.desired_slices(svc, [pod("a")]).items()))
    meta = body["metadata"]
    assert name == meta["name"]
    assert name.startswith("web-")
    assert meta["namespace"] == "default"
    assert meta["labels"] == {"kubernetes.io/service-name": "web",
                              "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER}
    assert meta["ownerReferences"] == [owner_ref(svc)]
    assert meta["ownerReferences"][0]["uid"] == "uid-svc-web"


def test_named_target_port_resolves_per_pod_into_separate_slices() -> None:
    svc = service([{"name": "http", "port": 80, "targetPort": "web"}])
    pods = [pod("a", ip="10.244.1.5", ports=[{"name": "web", "containerPort": 8080}]),
            pod("b", ip="10.244.1.6", ports=[{"name": "web", "containerPort": 9090}])]
    slices = Controllers.desired_slices(svc, pods)
    assert len(slices) == 2
    by_port = {s["ports"][0]["port"]: [e["targetRef"]["name"] for e in s["endpoints"]] for s in slices.values()}
    assert by_port == {8080: ["a"], 9090: ["b"]}


def test_pods_with_the_same_resolution_share_a_slice() -> None:
    svc = service([{"name": "http", "port": 80, "targetPort": "web"}])
    ports = [{"name": "web", "containerPort": 8080}]
    pods = [pod("a", ip="10.244.1.5", ports=ports), pod("b", ip="10.244.1.6", ports=ports)]
    assert len(only(Controllers.desired_slices(svc, pods))["endpoints"]) == 2


@pytest.mark.parametrize("excluded", [
    pod("other-ns", namespace="prod"),
    pod("no-ip", ip=None),
    pod("done", phase="Succeeded"),
    pod("failed", phase="Failed"),
    pod("other-app", labels={"app": "db"}),
], ids=lambda p: p["metadata"]["name"])
def test_pods_that_cannot_serve_are_excluded(excluded: Obj) -> None:
    body = only(Controllers.desired_slices(service(), [pod("a"), excluded]))
    assert [e["targetRef"]["name"] for e in body["endpoints"]] == ["a"]


@pytest.mark.parametrize(("kwargs", "conditions"), [
    ({}, {"ready": True, "serving": True, "terminating": False}),
    ({"ready": False}, {"ready": False, "serving": False, "terminating": False}),
    ({"deleting": True}, {"ready": False, "serving": True, "terminating": True}),
    ({"deleting": True, "ready": False}, {"ready": False, "serving": False, "terminating": True}),
])
def test_endpoint_conditions(kwargs: Obj, conditions: Obj) -> None:
    body = only(Controllers.desired_slices(service(), [pod("a", **kwargs)]))
    assert body["endpoints"][0]["conditions"] == conditions


def test_no_matching_pods_gives_one_empty_slice_with_numeric_ports() -> None:
    svc = service([{"name": "http", "port": 80, "targetPort": 8080}, {"name": "named", "port": 81,
                                                                       "targetPort": "web"}])
    body = only(Controllers.desired_slices(svc, [pod("x", labels={"app": "db"})]))
    assert body["endpoints"] == []
    assert body["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert body["metadata"]["labels"]["kubernetes.io/service-name"] == "web"


def test_slice_names_are_stable() -> None:
    svc = service()
    assert Controllers.desired_slices(svc, [pod("a")]).keys() == Controllers.desired_slices(svc, [pod("b")]).keys()


# -- template_hash -------------------------------------------------------------------------------------

TEMPLATE: Obj = {"metadata": {"labels": {"app": "web", "tier": "front"}},
                 "spec": {"containers": [{"name": "app", "image": "x"}]}}


def test_template_hash_ignores_key_order() -> None:
    reordered = {"spec": {"containers": [{"image": "x", "name": "app"}]},
                 "metadata": {"labels": {"tier": "front", "app": "web"}}}
    assert template_hash(TEMPLATE) == template_hash(reordered)


def test_template_hash_shape_and_sensitivity() -> None:
    value = template_hash(TEMPLATE)
    assert len(value) == 10
    assert value.isalnum()
    assert value == value.lower()
    changed = {**TEMPLATE, "spec": {"containers": [{"name": "app", "image": "y"}]}}
    assert template_hash(changed) != value


# -- small helpers -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("service_port", "container_ports", "expected"), [
    ({"port": 80, "targetPort": 8080}, [], 8080),
    ({"port": 80, "targetPort": "8080"}, [], 8080),
    ({"port": 80}, [], 80),
    ({"port": 80, "targetPort": "web"}, [{"name": "web", "containerPort": 9090}], 9090),
    ({"port": 80, "targetPort": "web"}, [{"name": "other", "containerPort": 9090}], None),
    ({"port": 53, "targetPort": "dns", "protocol": "UDP"}, [{"name": "dns", "containerPort": 53}], None),
    ({"port": 53, "targetPort": "dns", "protocol": "UDP"},
     [{"name": "dns", "containerPort": 5353, "protocol": "UDP"}], 5353),
])
def test_resolve_target_port(service_port: Obj, container_ports: list[Obj], expected: int | None) -> None:
    assert resolve_target_port(service_port, pod("a", ports=container_ports)) == expected


def test_resolve_target_port_searches_every_container() -> None:
    target = pod("a")
    target["spec"]["containers"].append({"name": "side", "ports": [{"name": "web", "containerPort": 7070}]})
    assert resolve_target_port({"port": 80, "targetPort": "web"}, target) == 7070


@pytest.mark.parametrize(("status", "expected"), [
    ({"conditions": [{"type": "Ready", "status": "True"}]}, True),
    ({"conditions": [{"type": "Ready", "status": "False"}]}, False),
    ({"conditions": [{"type": "ContainersReady", "status": "True"}]}, False),
    ({"conditions": None}, False),
    ({}, False),
])
def test_pod_ready(status: Obj, expected: bool) -> None:
    assert pod_ready({"metadata": {}, "status": status}) is expected


@pytest.mark.parametrize(("meta", "phase", "expected"), [
    ({}, "Running", True),
    ({}, "Pending", True),
    ({}, "Succeeded", False),
    ({}, "Failed", False),
    ({"deletionTimestamp": "2024-01-01T00:00:00Z"}, "Running", False),
])
def test_pod_active(meta: Obj, phase: str, expected: bool) -> None:
    assert pod_active({"metadata": meta, "status": {"phase": phase}}) is expected


def test_owner_ref_and_owned_by() -> None:
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web-abc", "uid": "u1"}}
    ref = owner_ref(owner)
    assert ref == {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc", "uid": "u1",
                   "controller": True, "blockOwnerDeletion": True}
    assert owned_by({"metadata": {"ownerReferences": [ref]}}, owner)
    assert not owned_by({"metadata": {"ownerReferences": [{**ref, "uid": "u2"}]}}, owner)
    assert not owned_by({"metadata": {"ownerReferences": None}}, owner)
    assert not owned_by({"metadata": {}}, owner)


# -- Expectations --------------------------------------------------------------------------------------

class Clock:
    """Stands in for the `time` module inside `controllers` only, so pytest's own clock is untouched."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(controllers, "time", fake)
    return fake


def test_expectation_pending_until_seen(clock: Clock) -> None:
    exp = Expectations()
    exp.expect("rs1", "pod-a")
    exp.expect("rs1", "pod-b")
    assert exp.pending("rs1", lambda n: False) == {"pod-a", "pod-b"}
    assert exp.pending("rs1", lambda n: n == "pod-a") == {"pod-b"}
    # Once seen, an expectation is gone even if the pod later disappears from the cache.
    assert exp.pending("rs1", lambda n: False) == {"pod-b"}
    assert exp.pending("other", lambda n: False) == set()


def test_expectation_expires_after_ttl(clock: Clock) -> None:
    exp = Expectations()
    exp.expect("rs1", "pod-a")
    clock.now += EXPECTATION_TTL
    assert exp.pending("rs1", lambda n: False) == {"pod-a"}
    clock.now += 0.1
    assert exp.pending("rs1", lambda n: False) == set()


def test_expect_again_restarts_the_ttl(clock: Clock) -> None:
    exp = Expectations()
    exp.expect("rs1", "pod-a")
    clock.now += EXPECTATION_TTL - 1
    exp.expect("rs1", "pod-a")
    clock.now += 2
    assert exp.pending("rs1", lambda n: False) == {"pod-a"}
