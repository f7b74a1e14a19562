"""Waypoints and waypoint binding (ambient/control/translate/waypoints.py)."""

from __future__ import annotations

import pytest

from ambient.control.translate import ClusterState, Translation
from ambient.control.translate.waypoints import build_waypoints
from ambient.proto import workload_pb2

from .translate_cases import check_case, load_case


@pytest.fixture(scope="module")
def translation() -> Translation:
    return load_case("waypoints").translate()


def _service_waypoint(translation: Translation, namespace: str, name: str) -> str | None:
    svc = translation.addresses[f"{namespace}/{name}.{namespace}.svc.cluster.local"].service
    return svc.waypoint.hostname.hostname if svc.HasField("waypoint") else None


def _pod_waypoint(translation: Translation, namespace: str, name: str) -> str | None:
    workload = translation.addresses[f"Kubernetes//Pod/{namespace}/{name}"].workload
    return workload.waypoint.hostname.hostname if workload.HasField("waypoint") else None


def test_case_matches_expected() -> None:
    check_case("waypoints")


def test_only_ready_istio_waypoint_gateways_are_waypoints() -> None:
    waypoints = build_waypoints(ClusterState.from_objects(load_case("waypoints").objects))
    assert sorted(waypoints) == [("app", "wp-all"), ("app", "wp-ip"), ("app", "wp-none"), ("app", "wp-svc"),
                                 ("app", "wp-wl"), ("infra", "private"), ("infra", "selected"), ("infra", "shared")]
    address = waypoints[("app", "wp-all")].address
    assert address == workload_pb2.GatewayAddress(
        hostname=workload_pb2.NamespacedHostname(namespace="app", hostname="wp-all.app.svc.cluster.local"),
        hbone_mtls_port=15008)  # the Hostname address is preferred over the IP listed first


def test_namespace_label_binds_services_and_workloads(translation: Translation) -> None:
    assert _service_waypoint(translation, "app", "from-namespace") == "wp-all.app.svc.cluster.local"
    assert _pod_waypoint(translation, "app", "a-from-namespace") == "wp-all.app.svc.cluster.local"
    assert _service_waypoint(translation, "tenant", "api") == "shared.infra.svc.cluster.local"
    assert _pod_waypoint(translation, "tenant", "api") == "shared.infra.svc.cluster.local"
    assert _service_waypoint(translation, "infra", "plain") is None


def test_own_label_beats_namespace_label(translation: Translation) -> None:
    assert _service_waypoint(translation, "app", "own-label") == "wp-svc.app.svc.cluster.local"
    assert _pod_waypoint(translation, "app", "c-workload-waypoint") == "wp-wl.app.svc.cluster.local"
    # ...even when it names a waypoint that cannot serve it or is not ready: no fallback to the namespace's
    assert _service_waypoint(translation, "app", "workload-only-waypoint") is None
    assert _pod_waypoint(translation, "app", "b-service-only-waypoint") is None
    assert _service_waypoint(translation, "app", "pending-waypoint") is None
    assert _service_waypoint(translation, "app", "none-for-anything") is None
    assert _service_waypoint(translation, "app", "not-a-waypoint") is None


def test_none_opts_out(translation: Translation) -> None:
    assert _service_waypoint(translation, "app", "opted-out") is None
    assert _pod_waypoint(translation, "app", "d-opted-out") is None


def test_cross_namespace_attachment_follows_allowed_routes(translation: Translation) -> None:
    assert _service_waypoint(translation, "app", "cross-ns-all") == "shared.infra.svc.cluster.local"
    assert _service_waypoint(translation, "app", "cross-ns-selector") == "selected.infra.svc.cluster.local"
    assert _service_waypoint(translation, "app", "cross-ns-denied") is None  # default: Same namespace only


def test_waypoints_never_use_waypoints(translation: Translation) -> None:
    assert _pod_waypoint(translation, "app", "wp-all-5d8f7c9b6-abcde") is None
    assert _service_waypoint(translation, "app", "wp-all") is None


def test_ip_only_status_gives_an_address_waypoint(translation: Translation) -> None:
    svc = translation.addresses["app/by-ip.app.svc.cluster.local"].service
    assert svc.waypoint == workload_pb2.GatewayAddress(
        address=workload_pb2.NetworkAddress(network="", address=bytes([10, 96, 0, 101])), hbone_mtls_port=15008)
