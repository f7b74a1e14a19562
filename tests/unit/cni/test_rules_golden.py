"""Golden renders of the §2 rule set for the upstream test cases, both backends, IPv4 and IPv6.

Each case renders to `golden/<backend>_<case>_<family>.golden`. After an intended change to the rules,
regenerate the files and review the diff:

    AMBIENT_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/cni/test_rules_golden.py

IPv4 cases use an IPv4-only pod; IPv6 cases a dual-stack pod, whose iptables golden is the `ip6tables-restore`
input and whose nftables golden holds both families' twins (one `inet` table serves both).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cni.rules import PodRuleConfig, render_host_iptables, render_host_nftables, render_iptables, render_nftables
from cni.rules.model import ANNOTATION_BYPASS_INBOUND, ANNOTATION_DNS_CAPTURE

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("AMBIENT_UPDATE_GOLDEN") == "1"
KUBELET_UID = 1000
VIRTUAL = ("fake1s0f0", "fake1s0f1")  # upstream's test interface names

# case → (node-wide default, pod annotations)
POD_CASES: dict[str, tuple[PodRuleConfig, dict[str, str]]] = {
    "default": (PodRuleConfig(), {}),
    "ingress": (PodRuleConfig(), {ANNOTATION_BYPASS_INBOUND: "true"}),
    "dns_off": (PodRuleConfig(dns_capture=False), {}),
    "dns_pod_disabled_and_on_globally": (PodRuleConfig(dns_capture=True), {ANNOTATION_DNS_CAPTURE: "false"}),
    "dns_pod_enabled_and_off_globally": (PodRuleConfig(dns_capture=False), {ANNOTATION_DNS_CAPTURE: "true"}),
    "virtual_interfaces": (PodRuleConfig(virtual_interfaces=VIRTUAL), {}),
    "ingress_and_virtual_interfaces": (PodRuleConfig(virtual_interfaces=VIRTUAL), {ANNOTATION_BYPASS_INBOUND: "true"}),
}


def pod_config(case: str, family: str) -> PodRuleConfig:
    default, annotations = POD_CASES[case]
    dual = PodRuleConfig(ingress=default.ingress, dns_capture=default.dns_capture, ipv6=family == "ipv6",
                         virtual_interfaces=default.virtual_interfaces)
    return PodRuleConfig.for_pod(annotations, dual)


RENDERERS: dict[str, Callable[[str, str], str]] = {
    "iptables": lambda case, family: render_iptables(pod_config(case, family), "ipv6" if family == "ipv6" else "ipv4"),
    "nftables": lambda case, family: render_nftables(pod_config(case, family)),
}
HOST_RENDERERS: dict[str, Callable[[str], str]] = {
    "iptables": lambda family: render_host_iptables("ipv6" if family == "ipv6" else "ipv4"),
    "nftables": lambda family: render_host_nftables(KUBELET_UID, ("ipv4", "ipv6") if family == "ipv6" else ("ipv4",)),
}


def check_golden(name: str, rendered: str) -> None:
    path = GOLDEN / f"{name}.golden"
    if UPDATE:
        path.write_text(rendered)
    assert path.exists(), f"{path} missing; run with AMBIENT_UPDATE_GOLDEN=1 to create it"
    assert rendered == path.read_text(), f"{path.name} differs; if intended, regenerate with AMBIENT_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
@pytest.mark.parametrize("case", sorted(POD_CASES))
def test_pod_rules_match_golden(case: str, backend: str, family: str) -> None:
    check_golden(f"{backend}_{case}_{family}", RENDERERS[backend](case, family))


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_host_probe_matches_golden(backend: str, family: str) -> None:
    check_golden(f"{backend}_hostprobe_{family}", HOST_RENDERERS[backend](family))


def test_per_pod_dns_annotation_overrides_the_global_default() -> None:
    # the per-pod renders equal the renders of the global setting they override to
    assert RENDERERS["iptables"]("dns_pod_disabled_and_on_globally", "ipv4") == RENDERERS["iptables"]("dns_off", "ipv4")
    assert RENDERERS["nftables"]("dns_pod_enabled_and_off_globally", "ipv6") == RENDERERS["nftables"]("default", "ipv6")
