"""`ambientctl waypoint`'s pure parts: the Gateway it writes (PROTOCOLS.md §8), enrollment decisions, what a
Gateway's status means to the user, istioctl's tables, and durations."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.cli.waypoint import (
    WaypointError,
    ambient_warning,
    columns,
    enrollment_conflict,
    gateway_patch,
    list_table,
    not_ready_message,
    parse_duration,
    reported_condition,
    status_table,
    waypoint_gateway,
)

Obj = dict[str, Any]
MESH_LISTENER = {"name": "mesh", "port": 15008, "protocol": "HBONE"}


def gateway(name: str, ns: str = "default", *, labels: dict[str, str] | None = None,
            conditions: list[Obj] | None = None) -> Obj:
    gw = waypoint_gateway(name, ns)
    if labels:
        gw["metadata"]["labels"] = labels
    if conditions is not None:
        gw["status"] = {"conditions": conditions}
    return gw


def cond(kind: str, status: str, reason: str = "", message: str = "") -> Obj:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def namespace(name: str, **labels: str) -> Obj:
    return {"metadata": {"name": name, "labels": labels}}


# -- the Gateway -----------------------------------------------------------------------------------
def test_default_gateway_is_istioctls() -> None:
    assert waypoint_gateway("waypoint", "shop") == {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [MESH_LISTENER]},
    }


def test_for_and_revision_become_labels() -> None:
    gw = waypoint_gateway("wp", "shop", "workload", "canary")
    assert gw["metadata"]["labels"] == {"istio.io/waypoint-for": "workload", "istio.io/rev": "canary"}


def test_an_empty_name_means_the_default() -> None:
    assert waypoint_gateway("", "shop")["metadata"]["name"] == "waypoint"


@pytest.mark.parametrize(("name", "traffic", "message"), [
    ("none", None, "invalid name provided for waypoint, 'none' is a reserved value"),
    ("wp", "pods", r"invalid traffic type: pods. Valid options are: \[all none service workload\]"),
])
def test_bad_flags_are_refused(name: str, traffic: str | None, message: str) -> None:
    with pytest.raises(WaypointError, match=message):
        waypoint_gateway(name, "shop", traffic)


def test_patch_replaces_class_and_listeners_and_keeps_unmentioned_labels() -> None:
    assert gateway_patch(waypoint_gateway("wp", "shop")) == {
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [MESH_LISTENER]}}
    assert gateway_patch(waypoint_gateway("wp", "shop", "all"))["metadata"] == {
        "labels": {"istio.io/waypoint-for": "all"}}


# -- enrollment ------------------------------------------------------------------------------------
def test_enrolling_a_fresh_or_already_enrolled_namespace_is_fine() -> None:
    assert enrollment_conflict(namespace("shop"), "waypoint") is None
    assert enrollment_conflict(namespace("shop", **{"istio.io/use-waypoint": "waypoint"}), "waypoint") is None


def test_enrolling_over_another_waypoint_says_how_to_force_it() -> None:
    message = enrollment_conflict(namespace("shop", **{"istio.io/use-waypoint": "other"}), "waypoint")
    assert message is not None
    assert "namespace (shop) already has an enrolled Waypoint (istio.io/use-waypoint=other)" in message
    assert "--overwrite" in message


def test_a_namespace_outside_ambient_gets_the_label_command() -> None:
    assert ambient_warning(namespace("shop", **{"istio.io/dataplane-mode": "ambient"})) is None
    warning = ambient_warning(namespace("shop"))
    assert warning is not None
    assert "`ambientctl label namespace shop istio.io/dataplane-mode=ambient`" in warning


# -- status ----------------------------------------------------------------------------------------
def test_reported_condition_prefers_a_failed_accepted() -> None:
    refused = cond("Accepted", "False", "ListenersNotValid", "Expected a single listener")
    assert reported_condition(gateway("wp", conditions=[refused, cond("Programmed", "False", "Invalid")])) == refused
    programmed = cond("Programmed", "True", "Programmed")
    assert reported_condition(gateway("wp", conditions=[cond("Accepted", "True"), programmed])) == programmed
    assert reported_condition(gateway("wp"))["message"] == "Waiting for controller"


def test_timeout_message_carries_the_condition() -> None:
    gw = gateway("wp", "shop", conditions=[cond("Programmed", "False", "AddressNotAssigned", "no pod ready")])
    assert not_ready_message("timed out while waiting for waypoint", gw) == (
        "timed out while waiting for waypoint shop/wp: Programmed=False (AddressNotAssigned): no pod ready")
    assert "is the waypoint controller" in not_ready_message("timed out", gateway("wp"))


# -- tables ----------------------------------------------------------------------------------------
def test_columns_match_istioctls_tabwriter() -> None:
    # istioctl's testdata/waypoint/waypoint-status-ready, trailing blanks aside.
    assert columns([["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"],
                    ["waypoint", "True", "Programmed", "", ""]]) == (
        "NAME         STATUS     TYPE           REASON     MESSAGE\n"
        "waypoint     True       Programmed")


def test_list_table() -> None:
    gateways = [
        gateway("wp-b", "shop", labels={"istio.io/waypoint-for": "all", "istio.io/rev": "canary"},
                conditions=[cond("Programmed", "True")]),
        gateway("waypoint", "shop"),
        gateway("waypoint", "bank", conditions=[cond("Programmed", "False")]),
    ]
    assert list_table(gateways, all_namespaces=False).splitlines() == [
        "NAME         REVISION     TRAFFIC TYPE     PROGRAMMED",
        "waypoint     default      service          False",
        "waypoint     default      service          False",
        "wp-b         canary       all              True",
    ]
    assert [line.split() for line in list_table(gateways, all_namespaces=True).splitlines()] == [
        ["NAMESPACE", "NAME", "REVISION", "TRAFFIC", "TYPE", "PROGRAMMED"],
        ["bank", "waypoint", "default", "service", "False"],
        ["shop", "waypoint", "default", "service", "False"],
        ["shop", "wp-b", "canary", "all", "True"],
    ]


def test_status_table() -> None:
    gateways = [gateway("waypoint", conditions=[cond("Accepted", "True"),
                                                cond("Programmed", "False", "AddressNotAssigned", "no pod")])]
    assert status_table(gateways).splitlines() == [
        "NAME         STATUS     TYPE           REASON                 MESSAGE",
        "waypoint     False      Programmed     AddressNotAssigned     no pod",
    ]


# -- durations -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("2m", 120.0), ("1m30s", 90.0), ("500ms", 0.5), ("1.5h", 5400.0), ("3", 3.0), ("0.25", 0.25),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "10x", "s", "1m 30s", "0s", "-5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(WaypointError, match="invalid duration"):
        parse_duration(text)
