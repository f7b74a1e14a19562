"""What the node agent should do with a pod: pure decisions over Kubernetes objects (PROTOCOLS §3, §9).

No IO here: the agent's shell (`cni.agent`) feeds pods and namespaces in and carries the decisions out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from cni.config import select_ambient
from cni.rules import PodRuleConfig

Obj = dict[str, Any]

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
BYPASS_INBOUND_ANNOTATION = "ambient.istio.io/bypass-inbound-capture"
DNS_CAPTURE_ANNOTATION = "ambient.istio.io/dns-capture"


def is_ambient(pod: Obj, namespace: Obj | None, excluded: tuple[str, ...]) -> bool:
    """The plugin's selection rule (`cni.config.select_ambient`), so plugin and agent always agree."""
    return select_ambient(pod, namespace or {}, frozenset(excluded)).ambient


def running(pod: Obj) -> bool:
    """A pod whose netns should carry rules: not terminal, not being deleted."""
    return not pod["metadata"].get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in (
        "Succeeded", "Failed")


def pod_ips(pod: Obj) -> list[str]:
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    return ips or ([status["podIP"]] if status.get("podIP") else [])


def rule_config(pod: Obj, dns_capture_default: bool, ips: list[str]) -> PodRuleConfig:
    annotations = pod["metadata"].get("annotations") or {}
    dns = annotations.get(DNS_CAPTURE_ANNOTATION)
    return PodRuleConfig(
        ingress=annotations.get(BYPASS_INBOUND_ANNOTATION) == "true",
        dns_capture=dns_capture_default if dns not in ("true", "false") else dns == "true",
        ipv4=any(":" not in ip for ip in ips) or not ips,
        ipv6=any(":" in ip for ip in ips),
    )


class Action(enum.Enum):
    NOTHING = "nothing"
    ENROLL = "enroll"
    REMOVE = "remove"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(pod: Obj | None, namespace: Obj | None, enrolled: bool, excluded: tuple[str, ...]) -> Decision:
    """Compare what the pod should be with what it is. `pod` None = deleted from the API."""
    if pod is None:
        return Decision(Action.REMOVE, "pod deleted") if enrolled else Decision(Action.NOTHING, "gone")
    want = running(pod) and is_ambient(pod, namespace, excluded)
    if want and not enrolled:
        return Decision(Action.ENROLL, "pod selected for ambient")
    if not want and enrolled:
        reason = "pod stopped or terminating" if not running(pod) else "pod no longer selected for ambient"
        return Decision(Action.REMOVE, reason)
    return Decision(Action.NOTHING, "in the wanted state")
