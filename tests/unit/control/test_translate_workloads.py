"""Pods → Workload (ambient/control/translate/workloads.py)."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.control.translate.workloads import canonical_service, workload_name_and_type
from ambient.proto import workload_pb2

from .translate_cases import check_case, load_case

UID = "cluster-1//Pod/shop/{}"


@pytest.fixture(scope="module")
def workloads() -> dict[str, workload_pb2.Workload]:
    translation = load_case("workloads").translate()
    return {name: a.workload for name, a in translation.addresses.items() if a.HasField("workload")}


def test_case_matches_expected() -> None:
    check_case("workloads")


def test_identity_fields_come_from_the_pod_and_the_options(workloads: dict[str, workload_pb2.Workload]) -> None:
    w = workloads[UID.format("cart-7f9c6d5b8d-x2x7q")]
    assert w.uid == "cluster-1//Pod/shop/cart-7f9c6d5b8d-x2x7q"
    assert (w.name, w.namespace, w.node, w.service_account) == ("cart-7f9c6d5b8d-x2x7q", "shop", "node-a", "cart")
    assert (w.trust_domain, w.cluster_id, w.network) == ("example.org", "cluster-1", "")
    # status.podIPs in order, as 4- and 16-byte addresses
    assert list(w.addresses) == [bytes([10, 244, 1, 5]), bytes.fromhex("fd000010024400010000000000000005")]


def test_service_account_defaults_to_default(workloads: dict[str, workload_pb2.Workload]) -> None:
    assert workloads[UID.format("debug")].service_account == "default"


@pytest.mark.parametrize(("pod", "expected"), [
    ({"metadata": {"name": "p", "labels": {"pod-template-hash": "abc12"},
                   "ownerReferences": [{"kind": "ReplicaSet", "name": "web-abc12", "controller": True}]}},
     ("web", workload_pb2.DEPLOYMENT)),
    ({"metadata": {"name": "p", "labels": {"pod-template-hash": "zzz"},
                   "ownerReferences": [{"kind": "ReplicaSet", "name": "web-abc12", "controller": True}]}},
     ("p", workload_pb2.POD)),
    ({"metadata": {"name": "p", "ownerReferences": [{"kind": "Job", "name": "backup", "controller": True}]}},
     ("backup", workload_pb2.JOB)),
    ({"metadata": {"name": "p", "ownerReferences": [{"kind": "Job", "name": "report-28934400", "controller": True}]}},
     ("report", workload_pb2.CRONJOB)),
    ({"metadata": {"name": "p", "ownerReferences": [{"kind": "Job", "name": "report-1234", "controller": True}]}},
     ("report-1234", workload_pb2.JOB)),
    ({"metadata": {"name": "p", "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]}},
     ("p", workload_pb2.POD)),
    ({"metadata": {"name": "p", "ownerReferences": [{"kind": "Job", "name": "backup"}]}},  # not the controller
     ("p", workload_pb2.POD)),
    ({"metadata": {"name": "p"}}, ("p", workload_pb2.POD)),
])
def test_workload_name_and_type_from_the_controlling_owner(pod: dict[str, Any], expected: tuple[str, int]) -> None:
    assert workload_name_and_type(pod) == expected


@pytest.mark.parametrize(("labels", "expected"), [
    ({"service.istio.io/canonical-name": "a", "app.kubernetes.io/name": "b", "app": "c",
      "service.istio.io/canonical-revision": "r1", "app.kubernetes.io/version": "r2", "version": "r3"}, ("a", "r1")),
    ({"app.kubernetes.io/name": "b", "app": "c", "app.kubernetes.io/version": "r2", "version": "r3"}, ("b", "r2")),
    ({"app": "c", "version": "r3"}, ("c", "r3")),
    ({}, ("workload", "latest")),
])
def test_canonical_name_and_revision_fall_back_in_istio_order(labels: dict[str, str],
                                                              expected: tuple[str, str]) -> None:
    assert canonical_service(labels, "workload") == expected


def test_hbone_only_when_redirection_is_enabled(workloads: dict[str, workload_pb2.Workload]) -> None:
    assert workloads[UID.format("cart-7f9c6d5b8d-x2x7q")].tunnel_protocol == workload_pb2.HBONE
    assert workloads[UID.format("debug")].tunnel_protocol == workload_pb2.NONE  # "pending" is not enabled
    assert workloads[UID.format("db-0")].tunnel_protocol == workload_pb2.NONE
    native = workloads[UID.format("native")]
    assert (native.tunnel_protocol, native.native_tunnel) == (workload_pb2.HBONE, True)


def test_status_follows_readiness_and_deletion(workloads: dict[str, workload_pb2.Workload]) -> None:
    assert workloads[UID.format("cart-7f9c6d5b8d-x2x7q")].status == workload_pb2.HEALTHY
    assert workloads[UID.format("debug")].status == workload_pb2.UNHEALTHY  # Ready=False
    assert workloads[UID.format("nightly-28934400-kq2v4")].status == workload_pb2.UNHEALTHY  # no condition yet
    assert workloads[UID.format("leaving")].status == workload_pb2.UNHEALTHY  # deleting, still Ready


def test_terminal_and_addressless_pods_are_not_workloads(workloads: dict[str, workload_pb2.Workload]) -> None:
    for name in ("done", "crashed", "unscheduled", "garbage-ip"):
        assert UID.format(name) not in workloads
    assert len(workloads) == 9


def test_host_network_pods_are_marked(workloads: dict[str, workload_pb2.Workload]) -> None:
    assert workloads[UID.format("node-exporter")].network_mode == workload_pb2.HOST_NETWORK
    assert workloads[UID.format("debug")].network_mode == workload_pb2.STANDARD
