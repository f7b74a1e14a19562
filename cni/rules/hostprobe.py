"""Kubelet probe SNAT in the node netns (PROTOCOLS.md §2, host side).

TCP that a local process (the kubelet) opens to an enrolled pod IP leaves the node with source
169.254.7.127, which the pod's rule 7 lets past ztunnel. The pod IPs live in a set whose element comments
carry the pod UID, so that removing a pod never removes an IP that a newer pod has taken over.
Runs in the caller's current network namespace (the node's), blocking.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Sequence

from cni.rules import iptables, nftables
from cni.rules.commands import IPTABLES, XTABLES_WAIT, have, iptables_tool, resolve_backend, run
from cni.rules.errors import BAD_CONFIG, RuleError
from cni.rules.model import FAMILIES, HOST_CHAINS, PROBE_SETS, Family, host_rules

log = logging.getLogger("cni.rules")

_UID = re.compile(r"^[A-Za-z0-9._-]{1,253}$")  # Kubernetes UIDs are UUIDs; nothing here may need quoting
_IPSET_TYPE: dict[Family, str] = {"ipv4": "hash:ip family inet comment", "ipv6": "hash:ip family inet6 comment"}
_IPSET_MEMBER = re.compile(r'^add (\S+) (\S+)(?: comment "([^"]*)")?')


class HostProbe:
    """`kubelet_uid`: the uid whose sockets get SNATed under nftables (`meta skuid`); iptables matches any
    local socket (`-m owner --socket-exists`), as upstream does."""

    def __init__(self, backend: str = "auto", kubelet_uid: int = 0, ipv6: bool = False) -> None:
        self.backend = resolve_backend(backend)
        self.kubelet_uid = kubelet_uid
        self.families: tuple[Family, ...] = ("ipv4", "ipv6") if ipv6 else ("ipv4",)

    def ensure(self) -> None:
        """Install the sets and the SNAT rule; members already in the sets stay."""
        if self.backend == IPTABLES:
            for family in self.families:
                # the set must exist before a rule can name it
                run(["ipset", "create", PROBE_SETS[family], *_IPSET_TYPE[family].split(), "-exist"])
                saved = run([iptables_tool(family, "save"), "-t", "nat"]).stdout
                delta = iptables.restore_input(host_rules(family), HOST_CHAINS, saved)
                if delta:
                    run([iptables_tool(family, "restore"), XTABLES_WAIT, "--noflush"], stdin=delta)
        else:
            run(["nft", "-f", "-"], stdin=nftables.render_host_nftables(self.kubelet_uid, self.families))

    def verify(self) -> list[str]:
        if self.backend == IPTABLES:
            drift: list[str] = []
            existing = set(run(["ipset", "list", "-n"]).stdout.split())
            for family in self.families:
                if PROBE_SETS[family] not in existing:
                    drift.append(f"ipset {PROBE_SETS[family]} missing")
                drift += iptables.verify_host(family, run([iptables_tool(family, "save"), "-t", "nat"]).stdout)
            return drift
        return nftables.verify_host(self.kubelet_uid, self.families, run(["nft", "list", "ruleset"]).stdout)

    def add(self, uid: str, ips: Sequence[str]) -> None:
        """Put `ips` in the probe sets with comment `uid` (an IP held by another UID moves to this one)."""
        by_family = self._split(uid, ips)
        if self.backend == IPTABLES:
            script = "".join(f'add {PROBE_SETS[f]} {ip} comment "{uid}"\n' for f, group in by_family.items()
                             for ip in group)
            if script:
                run(["ipset", "restore", "-exist"], stdin=script)
            return
        # `add element` keeps an existing element's comment, so drop and re-add in the same transaction
        script = ""
        for family, group in by_family.items():
            script += nftables.render_elements("add", family, dict.fromkeys(group))
            script += nftables.render_elements("delete", family, dict.fromkeys(group))
            script += nftables.render_elements("add", family, dict.fromkeys(group, uid))
        if script:
            run(["nft", "-f", "-"], stdin=script)

    def remove(self, uid: str, ips: Sequence[str] | None = None) -> None:
        """Drop `ips` (all of this UID's IPs when None) — only the ones still commented with `uid`."""
        wanted = {ip for group in self._split(uid, ips or []).values() for ip in group}
        doomed = [ip for ip, owner in self.members().items() if owner == uid and (ips is None or ip in wanted)]
        if not doomed:
            return
        by_family = self._split(uid, doomed)
        if self.backend == IPTABLES:
            script = "".join(f"del {PROBE_SETS[f]} {ip}\n" for f, group in by_family.items() for ip in group)
            run(["ipset", "restore", "-exist"], stdin=script)
        else:
            run(["nft", "-f", "-"], stdin="".join(nftables.render_elements("delete", f, dict.fromkeys(group))
                                                 for f, group in by_family.items()))

    def members(self) -> dict[str, str]:
        """Pod IP → pod UID for every IP in the probe sets."""
        found: dict[str, str] = {}
        for family in self.families:
            if self.backend == IPTABLES:
                proc = run(["ipset", "save", PROBE_SETS[family]], check=False)
                if proc.returncode == 0:  # not there: no members (ensure() has not run)
                    found.update(parse_ipset_save(proc.stdout, PROBE_SETS[family]))
            else:
                proc = run(["nft", "-j", "list", "set", "inet", nftables.HOST_TABLE, PROBE_SETS[family]], check=False)
                if proc.returncode == 0:
                    found.update(parse_nft_set(proc.stdout))
        return found

    def teardown(self) -> None:
        """Remove the SNAT rules and the sets of both backends, whatever is present."""
        for family in FAMILIES:
            if have(iptables_tool(family, "save")) and have(iptables_tool(family, "restore")):
                saved = run([iptables_tool(family, "save"), "-t", "nat"]).stdout
                removal = iptables.removal_input(HOST_CHAINS, saved)
                if removal:
                    run([iptables_tool(family, "restore"), XTABLES_WAIT, "--noflush"], stdin=removal)
        if have("ipset"):
            existing = set(run(["ipset", "list", "-n"]).stdout.split())
            for name in PROBE_SETS.values():
                if name in existing:
                    run(["ipset", "destroy", name])
        if have("nft"):
            run(["nft", "-f", "-"], stdin=nftables.render_host_removal())

    def _split(self, uid: str, ips: Sequence[str]) -> dict[Family, list[str]]:
        if not _UID.match(uid):
            raise RuleError(BAD_CONFIG, f"pod UID {uid!r} is not usable as a set comment")
        groups: dict[Family, list[str]] = {}
        for ip in ips:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError as e:
                raise RuleError(BAD_CONFIG, f"{ip!r} is not an IP address (pod {uid})") from e
            family: Family = "ipv6" if addr.version == 6 else "ipv4"
            if family not in self.families:
                log.debug("IPv6 probes are off; not adding %s of pod %s", addr, uid)
                continue
            groups.setdefault(family, []).append(str(addr))
        return groups


def parse_ipset_save(text: str, set_name: str) -> dict[str, str]:
    """`ipset save` lines (`add <set> <ip> comment "<uid>"`) → ip → uid."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = _IPSET_MEMBER.match(line)
        if m and m.group(1) == set_name:
            found[m.group(2)] = m.group(3) or ""
    return found


def parse_nft_set(listing: str) -> dict[str, str]:
    """`nft -j list set ...` → ip → uid (the element comment)."""
    found: dict[str, str] = {}
    for item in json.loads(listing).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                found[str(elem["elem"]["val"])] = str(elem["elem"].get("comment", ""))
            else:
                found[str(elem)] = ""
    return found
