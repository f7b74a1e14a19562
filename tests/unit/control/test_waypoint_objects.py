"""The waypoint controller's pure parts (PROTOCOLS.md §8, §9): what a waypoint Gateway deploys, the status
it gets, and the patches that keep deployed objects in line."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ambient.control.waypoints import (
    DEFAULT_COMMAND,
    LISTENER_MESSAGE,
    WaypointTemplate,
    gateway_keys,
    gateway_status,
    listener_problem,
    ours,
    status_patch,
    up_to_date,
    update_patch,
    waypoint_objects,
)
from ambient.kube.merge import merge_patch
from ambient.local import admission

Obj = dict[str, Any]
T0, T1 = "2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"
MESH = {"name": "mesh", "port": 15008, "protocol": "HBONE"}


def gateway(name: str = "waypoint", *, listeners: list[Obj] | None = None, labels: dict[str, str] | None = None,
            cls: str = "istio-waypoint", status: Obj | None = None, generation: int = 1) -> Obj:
    gw: Obj = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": name, "namespace": "shop", "uid": "uid-1", "generation": generation,
                            "labels": labels or {}},
               "spec": {"gatewayClassName": cls, "listeners": [MESH] if listeners is None else listeners}}
    if status is not None:
        gw["status"] = status
    return gw


def by_kind(objs: list[Obj]) -> dict[str, Obj]:
    return {o["kind"]: o for o in objs}


def service(cluster_ip: str = "10.96.0.20") -> Obj:
    return {"metadata": {"name": "waypoint", "namespace": "shop"}, "spec": {"clusterIP": cluster_ip}}


def pod(ready: bool, *, gw: str = "waypoint", deleting: bool = False) -> Obj:
    meta: Obj = {"name": f"{gw}-abc", "namespace": "shop", "labels": {"gateway.networking.k8s.io/gateway-name": gw}}
    if deleting:
        meta["deletionTimestamp"] = T0
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def condition(status: Obj, kind: str) -> Obj:
    return next(c for c in status["conditions"] if c["type"] == kind)


def as_stored(obj: Obj) -> Obj:
    """What the API server keeps: defaults filled in (the local server's admission, like Kubernetes')."""
    stored = copy.deepcopy(obj)
    admission.default_and_validate(stored["kind"], stored, None, admission.ServiceIPs())
    stored["metadata"]["uid"] = "obj-uid"
    return stored


# -- objects ---------------------------------------------------------------------------------------
def test_a_waypoint_gateway_deploys_account_deployment_and_service_named_after_it() -> None:
    objs = by_kind(waypoint_objects(gateway(labels={"istio.io/waypoint-for": "all"})))
    assert sorted(objs) == ["Deployment", "Service", "ServiceAccount"]
    for obj in objs.values():
        assert obj["metadata"]["name"] == "waypoint" and obj["metadata"]["namespace"] == "shop"
        assert obj["metadata"]["ownerReferences"] == [{"apiVersion": "gateway.networking.k8s.io/v1",
                                                       "kind": "Gateway", "name": "waypoint", "uid": "uid-1"}]
        assert obj["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"

    template = objs["Deployment"]["spec"]["template"]
    assert objs["Deployment"]["spec"]["selector"] == {"matchLabels": {
        "gateway.networking.k8s.io/gateway-name": "waypoint"}}
    assert template["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert template["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert template["spec"]["serviceAccountName"] == "waypoint"
    [container] = template["spec"]["containers"]
    assert container["name"] == "istio-proxy"
    assert container["command"] == list(DEFAULT_COMMAND)
    env = {e["name"]: e for e in container["env"]}
    assert env["GATEWAY_NAME"]["value"] == "waypoint"
    assert {name: env[name]["valueFrom"]["fieldRef"]["fieldPath"] for name in (
        "POD_NAME", "POD_NAMESPACE", "POD_IP", "SERVICE_ACCOUNT")} == {
        "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP",
        "SERVICE_ACCOUNT": "spec.serviceAccountName"}
    assert {"name": "mesh", "containerPort": 15008, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"}

    svc = objs["Service"]
    assert svc["spec"]["selector"] == {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    assert {"name": "mesh", "port": 15008, "protocol": "TCP", "appProtocol": "hbone"} in svc["spec"]["ports"]
    assert svc["metadata"]["labels"]["istio.io/waypoint-for"] == "all"
    # Every object passes the API server's validation as built.
    for obj in objs.values():
        as_stored(obj)


def test_the_command_is_configurable_for_stand_ins() -> None:
    stand_in = ["python3", "-m", "http.server", "15021"]
    deploy = by_kind(waypoint_objects(gateway(), WaypointTemplate(command=tuple(stand_in))))["Deployment"]
    assert deploy["spec"]["template"]["spec"]["containers"][0]["command"] == stand_in


def test_a_real_cluster_pod_gets_the_image_the_ca_token_the_mesh_root_and_the_control_plane_address() -> None:
    template = WaypointTemplate(image="registry.example/ambient-py:1.2", control_address="istiod.mesh.svc:15012",
                                cluster_id="east", trust_domain="corp.example", root_namespace="mesh")
    pod_spec = by_kind(waypoint_objects(gateway(), template))["Deployment"]["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    assert container["image"] == "registry.example/ambient-py:1.2"
    assert container["command"] == list(DEFAULT_COMMAND)  # the waypoint's flags, filled in by the kubelet
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CA_ADDRESS"] == env["XDS_ADDRESS"] == "istiod.mesh.svc:15012"
    assert (env["CLUSTER_ID"], env["TRUST_DOMAIN"], env["ROOT_NAMESPACE"]) == ("east", "corp.example", "mesh")
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["istio-token"] == {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}}
    assert volumes["istiod-ca-cert"] == {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"istio-token": "/var/run/secrets/tokens", "istiod-ca-cert": "/var/run/secrets/istio"}
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_default_template_names_istiod_in_istio_system_and_our_image() -> None:
    [container] = by_kind(waypoint_objects(gateway()))["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CA_ADDRESS"] == env["XDS_ADDRESS"] == "istiod.istio-system.svc:15012"
    assert container["image"] == "ambient-py:0.1.0"


def test_a_waypoint_deployed_before_the_volumes_existed_is_patched_to_have_them() -> None:
    old = by_kind(waypoint_objects(gateway()))["Deployment"]
    current = as_stored(old)
    pod_spec = current["spec"]["template"]["spec"]
    del pod_spec["volumes"]
    del pod_spec["containers"][0]["volumeMounts"]
    pod_spec["containers"][0]["image"] = "ambient-py"
    assert not up_to_date(current, old)
    patched = merge_patch(current, update_patch(current, old))
    assert up_to_date(patched, old)
    assert [v["name"] for v in patched["spec"]["template"]["spec"]["volumes"]] == ["istio-token", "istiod-ca-cert"]


def test_infrastructure_labels_replace_gateway_labels_but_never_the_waypoints_own() -> None:
    gw = gateway(labels={"istio.io/waypoint-for": "service", "team": "a"})
    gw["spec"]["infrastructure"] = {"labels": {"team": "b", "istio.io/dataplane-mode": "ambient",
                                               "gateway.networking.k8s.io/gateway-name": "other"}}
    objs = by_kind(waypoint_objects(gw))
    assert objs["Service"]["metadata"]["labels"] == {
        "team": "b", "istio.io/dataplane-mode": "ambient",
        "gateway.networking.k8s.io/gateway-name": "waypoint",
        "gateway.networking.k8s.io/gateway-class-name": "istio-waypoint"}
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["istio.io/dataplane-mode"] == "none"  # a captured waypoint would loop through ztunnel
    assert pod_labels["gateway.networking.k8s.io/gateway-name"] == "waypoint"


@pytest.mark.parametrize("listeners", [
    [],
    [{"name": "mesh", "port": 15008, "protocol": "TCP"}],
    [{"name": "mesh", "port": 15009, "protocol": "HBONE"}],
    [{"name": "http", "port": 80, "protocol": "HTTP"}],
])
def test_a_waypoint_without_an_hbone_listener_on_15008_deploys_nothing(listeners: list[Obj]) -> None:
    gw = gateway(listeners=listeners)
    assert waypoint_objects(gw) == []
    problem = listener_problem(gw)
    assert problem is not None and problem.startswith(LISTENER_MESSAGE)
    assert "{name: mesh, port: 15008, protocol: HBONE}" in problem


def test_the_hbone_listener_may_carry_another_name_and_sit_next_to_others() -> None:
    gw = gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"},
                            {"name": "Tunnel_1", "port": 15008, "protocol": "HBONE"}])
    assert listener_problem(gw) is None
    svc = by_kind(waypoint_objects(gw))["Service"]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["status-port", "tunnel-1"]


def test_other_gateway_classes_are_not_waypoints() -> None:
    assert waypoint_objects(gateway(cls="istio")) == []


# -- status ----------------------------------------------------------------------------------------
def test_no_service_yet_is_not_programmed_and_has_no_address() -> None:
    status = gateway_status(gateway(), None, [], now=T0)
    assert "addresses" not in status
    assert condition(status, "Accepted")["status"] == "True"
    programmed = condition(status, "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("False", "AddressNotUsable")
    assert 'hostname "waypoint.shop.svc.cluster.local" not found' in programmed["message"]


@pytest.mark.parametrize("pods", [[], [pod(False)], [pod(True, gw="other")], [pod(True, deleting=True)]])
def test_no_ready_waypoint_pod_means_no_address(pods: list[Obj]) -> None:
    status = gateway_status(gateway(), service(), pods, now=T0)
    assert "addresses" not in status
    programmed = condition(status, "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("False", "AddressNotAssigned")
    assert "no waypoint pod is ready" in programmed["message"]


def test_a_ready_pod_gives_the_service_address_and_programmed() -> None:
    status = gateway_status(gateway(generation=3), service(), [pod(False), pod(True)], now=T0)
    assert status["addresses"] == [{"type": "IPAddress", "value": "10.96.0.20"},
                                   {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"}]
    assert condition(status, "Accepted") == {
        "type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted",
        "lastTransitionTime": T0, "observedGeneration": 3}
    programmed = condition(status, "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("True", "Programmed")
    assert programmed["message"] == "Resource programmed, assigned to service(s) waypoint.shop.svc.cluster.local:15008"
    [listener] = status["listeners"]
    assert listener["name"] == "mesh" and condition(listener, "Accepted")["status"] == "True"


def test_an_invalid_listener_is_not_accepted_with_a_clear_message() -> None:
    gw = gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}])
    status = gateway_status(gw, None, [], now=T0)
    accepted = condition(status, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "ListenersNotValid")
    assert "http (port 80, protocol HTTP)" in accepted["message"]
    assert condition(status, "Programmed")["status"] == "False"
    [listener] = status["listeners"]
    assert (condition(listener, "Accepted")["reason"], condition(listener, "Accepted")["message"]) == (
        "UnsupportedProtocol", LISTENER_MESSAGE)
    assert "addresses" not in status


def test_transition_times_move_only_when_a_condition_changes() -> None:
    pending = gateway_status(gateway(), service(), [], now=T0)
    again = gateway_status(gateway(status=pending), service(), [], now=T1)
    assert again == pending  # nothing changed: no write
    ready = gateway_status(gateway(status=pending), service(), [pod(True)], now=T1)
    assert condition(ready, "Accepted")["lastTransitionTime"] == T0
    assert condition(ready, "Programmed")["lastTransitionTime"] == T1


def test_an_address_once_reported_survives_a_pod_restart() -> None:
    ready = gateway_status(gateway(), service(), [pod(True)], now=T0)
    restarting = gateway_status(gateway(status=ready), service(), [pod(False)], now=T1)
    assert restarting["addresses"] == ready["addresses"]
    assert condition(restarting, "Programmed")["status"] == "False"


def test_status_patch_removes_what_is_no_longer_there() -> None:
    ready = gateway_status(gateway(), service(), [pod(True)], now=T0)
    invalid = gateway_status(gateway(listeners=[], status=ready), service(), [pod(True)], now=T1)
    patched = merge_patch({"status": ready}, status_patch(ready, invalid))
    assert patched == {"status": invalid}
    assert "addresses" not in patched["status"]


# -- updates ---------------------------------------------------------------------------------------
def test_objects_as_the_server_stores_them_need_no_update() -> None:
    for obj in waypoint_objects(gateway(labels={"istio.io/waypoint-for": "service"})):
        assert up_to_date(as_stored(obj), obj), obj["kind"]


def test_a_changed_waypoint_for_label_is_patched_onto_the_service_and_pods() -> None:
    before = by_kind(waypoint_objects(gateway(labels={"istio.io/waypoint-for": "service", "tier": "x"})))
    after = by_kind(waypoint_objects(gateway(labels={"istio.io/waypoint-for": "all"})))
    for kind in ("Service", "Deployment", "ServiceAccount"):
        current = as_stored(before[kind])
        assert not up_to_date(current, after[kind])
        patched = merge_patch(current, update_patch(current, after[kind]))
        assert up_to_date(patched, after[kind])
        assert patched["metadata"]["labels"]["istio.io/waypoint-for"] == "all"
        assert "tier" not in patched["metadata"]["labels"]
    deploy = merge_patch(as_stored(before["Deployment"]),
                         update_patch(as_stored(before["Deployment"]), after["Deployment"]))
    assert "tier" not in deploy["spec"]["template"]["metadata"]["labels"]


def test_an_object_owned_by_a_recreated_gateway_is_adopted() -> None:
    desired = by_kind(waypoint_objects(gateway()))["Service"]
    current = as_stored(desired)
    other_owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "keep", "uid": "cm"}
    current["metadata"]["ownerReferences"] = [{**desired["metadata"]["ownerReferences"][0], "uid": "old"},
                                              other_owner]
    assert not up_to_date(current, desired)
    patched = merge_patch(current, update_patch(current, desired))
    assert patched["metadata"]["ownerReferences"] == [*desired["metadata"]["ownerReferences"], other_owner]
    assert patched["spec"]["clusterIP"] == current["spec"]["clusterIP"]


def test_events_map_to_their_gateway_and_only_waypoint_objects_are_ours() -> None:
    svc = by_kind(waypoint_objects(gateway()))["Service"]
    assert gateway_keys(svc) == {("shop", "waypoint")}
    assert gateway_keys(pod(True, gw="w2")) == {("shop", "w2")}
    assert ours(svc, "waypoint")
    assert not ours(svc, "other")
    foreign = copy.deepcopy(svc)
    foreign["metadata"]["labels"]["gateway.networking.k8s.io/gateway-class-name"] = "istio"
    assert not ours(foreign, "waypoint")
