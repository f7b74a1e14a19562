"""Install, check and remove a pod's redirection state (PROTOCOLS.md §2) from any process on the node.

The IO shell around the pure renderers: iptables/nft run inside the pod netns through `nsenter --net=`, the
ip rule and table-100 route go over netlink from a thread inside the netns. Blocking; the node agent calls
it from a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import logging
import os

from ambient.netns import netns_path
from cni.rules import iptables, netlink, nftables
from cni.rules.commands import IPTABLES, XTABLES_WAIT, have, iptables_tool, resolve_backend, run
from cni.rules.errors import NETNS_MISSING, RuleError
from cni.rules.model import FAMILIES, POD_CHAINS, PodRuleConfig, pod_rules

log = logging.getLogger("cni.rules")


class InpodRules:
    """`backend`: `auto` (iptables when `iptables-save` works here, else nftables), `iptables` or `nftables`."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = resolve_backend(backend)

    def apply(self, netns: str, cfg: PodRuleConfig) -> None:
        """Make the netns hold exactly `cfg`'s rule set: missing pieces added, stale ones replaced."""
        _require(netns)
        netlink.ensure(netns, cfg.families)
        if self.backend == IPTABLES:
            for family in cfg.families:
                saved = run([iptables_tool(family, "save")], netns=netns).stdout
                delta = iptables.restore_input(pod_rules(cfg, family), POD_CHAINS, saved)
                if delta:
                    run([iptables_tool(family, "restore"), XTABLES_WAIT, "--noflush"], netns=netns, stdin=delta)
        else:
            run(["nft", "-f", "-"], netns=netns, stdin=nftables.render_nftables(cfg))
        log.info("redirection rules (%s) in place in %s", self.backend, netns)

    def remove(self, netns: str) -> None:
        """Remove our rules of both backends and both families, the ip rule and the route. A netns that no
        longer exists has nothing left to remove."""
        if not os.path.exists(netns_path(netns)):
            log.info("netns %s is gone; nothing to remove", netns)
            return
        for family in FAMILIES:
            if have(iptables_tool(family, "save")) and have(iptables_tool(family, "restore")):
                saved = run([iptables_tool(family, "save")], netns=netns).stdout
                removal = iptables.removal_input(POD_CHAINS, saved)
                if removal:
                    run([iptables_tool(family, "restore"), XTABLES_WAIT, "--noflush"], netns=netns, stdin=removal)
        if have("nft"):
            run(["nft", "-f", "-"], netns=netns, stdin=nftables.render_removal())
        netlink.remove(netns)
        log.info("redirection rules removed from %s", netns)

    def verify(self, netns: str, cfg: PodRuleConfig) -> list[str]:
        """Human-readable drift items; an empty list means everything `cfg` wants is in place."""
        _require(netns)
        drift = netlink.verify(netns, cfg.families)
        if self.backend == IPTABLES:
            for family in cfg.families:
                drift += iptables.verify_pod(cfg, family, run([iptables_tool(family, "save")], netns=netns).stdout)
        else:
            drift += nftables.verify_pod(cfg, run(["nft", "list", "ruleset"], netns=netns).stdout)
        return drift


def _require(netns: str) -> None:
    path = netns_path(netns)
    if not os.path.exists(path):
        raise RuleError(NETNS_MISSING, f"network namespace {path} does not exist (pod gone?)")
