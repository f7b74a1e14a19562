"""In-pod traffic redirection (PROTOCOLS.md §2): the rule model and renderers for iptables and nftables,
the ip rule / table-100 route over netlink, the node's kubelet-probe SNAT, and a helper that runs code inside
a network namespace. See cni/docs/rules.md for what ends up where and how to look at it."""

from __future__ import annotations

from ambient.netns import NetnsError, in_netns
from cni.rules.errors import RuleError
from cni.rules.hostprobe import HostProbe
from cni.rules.inpod import InpodRules
from cni.rules.iptables import render_host_iptables, render_iptables
from cni.rules.model import PodRuleConfig
from cni.rules.nftables import render_host_nftables, render_nftables

__all__ = [
    "HostProbe",
    "InpodRules",
    "NetnsError",
    "PodRuleConfig",
    "RuleError",
    "in_netns",
    "render_host_iptables",
    "render_host_nftables",
    "render_iptables",
    "render_nftables",
]
