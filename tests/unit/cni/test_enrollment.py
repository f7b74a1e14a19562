"""Which pods the agent enrolls, removes or leaves alone (PROTOCOLS §3, §9)."""

from __future__ import annotations

from typing import Any

import pytest

from cni.enrollment import Action, decide, is_ambient, pod_ips, rule_config

EXCLUDED = ("kube-system",)


def ns(labels: dict[str, str] | None = None, name: str = "app") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}}


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, namespace: str = "app",
        host_network: bool = False, phase: str = "Running", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": namespace, "uid": "u1", "labels": labels or {},
                            "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"hostNetwork": host_network},
            "status": {"phase": phase, "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]}}


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.mark.parametrize(("the_pod", "the_ns", "expected"), [
    (pod(), ns(AMBIENT), True),
    (pod(), ns(), False),
    (pod(AMBIENT), ns(), True),
    (pod({"istio.io/dataplane-mode": "none"}), ns(AMBIENT), False),
    (pod(annotations={"sidecar.istio.io/status": "{}"}), ns(AMBIENT), False),
    (pod(host_network=True), ns(AMBIENT), False),
    (pod(AMBIENT, namespace="kube-system"), ns(AMBIENT, "kube-system"), False),
    (pod(), None, False),
])
def test_ambient_selection(the_pod: dict[str, Any], the_ns: dict[str, Any] | None, expected: bool) -> None:
    assert is_ambient(the_pod, the_ns, EXCLUDED) is expected


@pytest.mark.parametrize(("the_pod", "enrolled", "action"), [
    (pod(), False, Action.ENROLL),
    (pod(), True, Action.NOTHING),
    (pod(phase="Succeeded"), True, Action.REMOVE),
    (pod(deleting=True), True, Action.REMOVE),
    (pod(deleting=True), False, Action.NOTHING),
    (None, True, Action.REMOVE),
    (None, False, Action.NOTHING),
])
def test_decisions_in_an_ambient_namespace(the_pod: dict[str, Any] | None, enrolled: bool, action: Action) -> None:
    assert decide(the_pod, ns(AMBIENT), enrolled, EXCLUDED).action is action


def test_label_removed_from_namespace_removes_enrolled_pod() -> None:
    decision = decide(pod(), ns(), True, EXCLUDED)
    assert decision.action is Action.REMOVE and "no longer selected" in decision.reason


def test_rule_config_from_annotations() -> None:
    assert rule_config(pod(), True, ["10.0.0.5"]).dns_capture
    assert not rule_config(pod(annotations={"ambient.istio.io/dns-capture": "false"}), True, []).dns_capture
    assert rule_config(pod(annotations={"ambient.istio.io/dns-capture": "true"}), False, []).dns_capture
    assert rule_config(pod(annotations={"ambient.istio.io/bypass-inbound-capture": "true"}), True, []).ingress
    dual = rule_config(pod(), True, ["10.0.0.5", "fd00::5"])
    assert dual.ipv4 and dual.ipv6


def test_pod_ips_prefers_pod_ips_list() -> None:
    p = pod()
    p["status"]["podIPs"] = [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]
    assert pod_ips(p) == ["10.0.0.5", "fd00::5"]
    assert pod_ips({"status": {}}) == []
