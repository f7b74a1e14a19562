"""The in-pod redirection rule set of PROTOCOLS.md §2 (and the host probe SNAT) as data, free of IO.

`pod_rules(cfg, family)` lists the rules one family gets through iptables, `nft_pod_rules(cfg)` the rules of
the three `inet` tables; both come from one table of templates that reads like §2, so the backends cannot
drift apart. Renderers (`iptables.py`, `nftables.py`) turn the rules into tool input and compare them with
what a tool lists (`compare_chain`). This module must not run commands or open sockets.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cni.rules.errors import BAD_CONFIG, RuleError

Family = Literal["ipv4", "ipv6"]
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")

# §2 constants.
INPOD_MARK = "0x539/0xfff"  # SO_MARK 1337 that ztunnel sets on every socket it opens in a pod netns
CONN_MARK = "0x111/0xfff"  # connection mark that sends ztunnel's return traffic to route table 100
ROUTE_TABLE = 100
RULE_PRIORITY = 32764  # `ip rule ... pref 32764`: just before the main table (32766)
PROBE_SNAT_IPV4 = "169.254.7.127"
PROBE_SNAT_IPV6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"

# §1 ports.
PORT_OUTBOUND = 15001
PORT_INBOUND_PLAINTEXT = 15006
PORT_HBONE = 15008
PORT_DNS = 15053

# Our own chains (iptables) and tables (nftables).
CHAIN_PRERT = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
CHAIN_POSTRT = "ISTIO_POSTRT"
POD_CHAINS = (CHAIN_PRERT, CHAIN_OUTPUT)
HOST_CHAINS = (CHAIN_POSTRT,)
NFT_TABLES = {"nat": "istio-ambient-nat", "mangle": "istio-ambient-mangle", "raw": "istio-ambient-raw"}
NFT_CHAINS = {"PREROUTING": "prerouting", "OUTPUT": "output", "POSTROUTING": "postrouting",
              CHAIN_PRERT: "istio-prerouting", CHAIN_OUTPUT: "istio-output"}
PROBE_SETS: dict[Family, str] = {"ipv4": "istio-inpod-probes-v4", "ipv6": "istio-inpod-probes-v6"}

# §9 per-pod annotations (and Istio's virtual-interface annotation, which is not in §9).
ANNOTATION_BYPASS_INBOUND = "ambient.istio.io/bypass-inbound-capture"
ANNOTATION_DNS_CAPTURE = "ambient.istio.io/dns-capture"
ANNOTATION_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"

# Linux interface names: at most 15 bytes, no whitespace, '/' or quotes (they end up inside rule text).
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")


@dataclass(frozen=True)
class FamilyAddresses:
    loopback: str  # as iptables-save prints it
    probe: str  # as iptables-save prints it
    nft: str  # nft payload keyword
    any_local: str  # destination of the table-100 local route


ADDRESSES: dict[Family, FamilyAddresses] = {
    "ipv4": FamilyAddresses("127.0.0.1/32", f"{PROBE_SNAT_IPV4}/32", "ip", "0.0.0.0/0"),
    "ipv6": FamilyAddresses("::1/128", f"{PROBE_SNAT_IPV6}/128", "ip6", "::/0"),
}
PROBE_SNAT: dict[Family, str] = {"ipv4": PROBE_SNAT_IPV4, "ipv6": PROBE_SNAT_IPV6}


@dataclass(frozen=True)
class PodRuleConfig:
    """Which variant of the §2 rule set a pod gets."""

    ingress: bool = False  # bypass-inbound-capture: rules 7 and 9 omitted
    dns_capture: bool = True  # rules 10, 11, 15-17
    ipv4: bool = True
    ipv6: bool = False
    # Like Istio's ISTIO_IN_POD_VIRTUAL_INTERFACES: inbound TCP on these interfaces is treated as outbound.
    virtual_interfaces: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.ipv4 or self.ipv6):
            raise RuleError(BAD_CONFIG, "a pod rule config needs at least one of ipv4 and ipv6")
        for name in self.virtual_interfaces:
            if not _IFNAME.match(name):
                raise RuleError(BAD_CONFIG, f"virtual interface {name!r} is not a valid interface name "
                                            "(1-15 characters, letters, digits, _ . : @ + -)")

    @property
    def families(self) -> tuple[Family, ...]:
        on: dict[Family, bool] = {"ipv4": self.ipv4, "ipv6": self.ipv6}
        return tuple(f for f in FAMILIES if on[f])

    @classmethod
    def for_pod(cls, annotations: Mapping[str, str], default: PodRuleConfig) -> PodRuleConfig:
        """The node-wide `default` with a pod's annotations applied (§2 "Per-pod annotations").

        Values other than true/false leave the default in place, as Istio does.
        """
        ingress = _flag(annotations.get(ANNOTATION_BYPASS_INBOUND), default.ingress)
        dns = _flag(annotations.get(ANNOTATION_DNS_CAPTURE), default.dns_capture)
        interfaces = default.virtual_interfaces
        raw = annotations.get(ANNOTATION_VIRTUAL_INTERFACES)
        if raw is not None:
            interfaces = tuple(i.strip() for i in raw.split(",") if i.strip())
        return cls(ingress=ingress, dns_capture=dns, ipv4=default.ipv4, ipv6=default.ipv6,
                   virtual_interfaces=interfaces)


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.strip().lower()
    return {"true": True, "false": False}.get(lowered, default)


@dataclass(frozen=True)
class Rule:
    """One rule, rendered for both backends. `chain` is the iptables name (nft name via NFT_CHAINS)."""

    name: str  # how drift reports call it: "rule 14", "virtual interface eth1 redirect"
    table: str  # mangle / nat / raw
    chain: str
    iptables: str  # what follows `-A <chain>`, exactly as iptables-save prints it
    nft: str  # nft rule statement
    family: Family | None = None  # set when the rule names addresses of one family
    insert: bool = False  # must be the first rule of its chain (`-I <chain> 1`)


@dataclass(frozen=True)
class _Template:
    number: int
    table: str
    chain: str
    iptables: str  # may hold {loopback} {probe}
    nft: str  # may hold {ip} {loopback} {probe}
    per_family: bool = False
    skip_for_ingress: bool = False
    dns_only: bool = False


_M = INPOD_MARK
# PROTOCOLS.md §2, rules 1-17, in order. nft statements follow what `nft list` prints back.
_POD_TEMPLATES = (
    _Template(1, "mangle", "PREROUTING", f"-j {CHAIN_PRERT}", "jump istio-prerouting"),
    _Template(2, "mangle", "OUTPUT", f"-j {CHAIN_OUTPUT}", "jump istio-output"),
    _Template(3, "mangle", CHAIN_PRERT, f"-m mark --mark {_M} -j CONNMARK --set-xmark {CONN_MARK}",
              "meta mark & 0xfff == 0x539 counter ct mark set ct mark & 0xfffff000 | 0x111"),
    _Template(4, "mangle", CHAIN_OUTPUT,
              f"-m connmark --mark {CONN_MARK} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
              "ct mark & 0xfff == 0x111 counter meta mark set ct mark"),
    _Template(5, "nat", "OUTPUT", f"-j {CHAIN_OUTPUT}", "jump istio-output"),
    _Template(6, "nat", "PREROUTING", f"-j {CHAIN_PRERT}", "jump istio-prerouting"),
    _Template(7, "nat", CHAIN_PRERT, "-s {probe} -p tcp -m tcp -j ACCEPT",
              "meta l4proto tcp {ip} saddr {probe} counter accept", per_family=True, skip_for_ingress=True),
    _Template(8, "nat", CHAIN_OUTPUT, "-d {probe} -p tcp -m tcp -j ACCEPT",
              "meta l4proto tcp {ip} daddr {probe} counter accept", per_family=True),
    _Template(9, "nat", CHAIN_PRERT,
              f"! -d {{loopback}} -p tcp -m tcp ! --dport {PORT_HBONE} -m mark ! --mark {_M} "
              f"-j REDIRECT --to-ports {PORT_INBOUND_PLAINTEXT}",
              f"{{ip}} daddr != {{loopback}} tcp dport != {PORT_HBONE} meta mark & 0xfff != 0x539 counter "
              f"redirect to :{PORT_INBOUND_PLAINTEXT}", per_family=True, skip_for_ingress=True),
    _Template(10, "nat", CHAIN_OUTPUT,
              f"! -o lo -p udp -m mark ! --mark {_M} -m udp --dport 53 -j REDIRECT --to-ports {PORT_DNS}",
              f'oifname != "lo" meta mark & 0xfff != 0x539 udp dport 53 counter redirect to :{PORT_DNS}',
              dns_only=True),
    _Template(11, "nat", CHAIN_OUTPUT,
              f"! -d {{loopback}} -p tcp -m tcp --dport 53 -m mark ! --mark {_M} -j REDIRECT --to-ports {PORT_DNS}",
              f"{{ip}} daddr != {{loopback}} tcp dport 53 meta mark & 0xfff != 0x539 counter redirect to :{PORT_DNS}",
              per_family=True, dns_only=True),
    _Template(12, "nat", CHAIN_OUTPUT, f"-p tcp -m mark --mark {CONN_MARK} -j ACCEPT",
              "meta l4proto tcp meta mark & 0xfff == 0x111 counter accept"),
    _Template(13, "nat", CHAIN_OUTPUT, "! -d {loopback} -o lo -j ACCEPT",
              'oifname "lo" {ip} daddr != {loopback} counter accept', per_family=True),
    _Template(14, "nat", CHAIN_OUTPUT,
              f"! -d {{loopback}} -p tcp -m mark ! --mark {_M} -j REDIRECT --to-ports {PORT_OUTBOUND}",
              f"meta l4proto tcp {{ip}} daddr != {{loopback}} meta mark & 0xfff != 0x539 counter "
              f"redirect to :{PORT_OUTBOUND}", per_family=True),
    _Template(15, "raw", "PREROUTING", f"-j {CHAIN_PRERT}", "jump istio-prerouting", dns_only=True),
    _Template(15, "raw", "OUTPUT", f"-j {CHAIN_OUTPUT}", "jump istio-output", dns_only=True),
    _Template(16, "raw", CHAIN_OUTPUT, f"-p udp -m mark --mark {_M} -m udp --dport 53 -j CT --zone 1",
              "udp dport 53 meta mark & 0xfff == 0x539 counter ct zone set 1", dns_only=True),
    _Template(17, "raw", CHAIN_PRERT, f"-p udp -m mark ! --mark {_M} -m udp --sport 53 -j CT --zone 1",
              "udp sport 53 meta mark & 0xfff != 0x539 counter ct zone set 1", dns_only=True),
)
_VIRTUAL_INTERFACES_AFTER = 6  # upstream puts them first in nat ISTIO_PRERT, ahead of the probe exemption


def _virtual_interface_rules(interface: str) -> list[Rule]:
    # Inbound TCP from a VM/DinD interface is really outbound traffic of the pod: hand it to 15001 and
    # RETURN so that rules 7 and 9 never see it.
    return [
        Rule(f"virtual interface {interface} redirect", "nat", CHAIN_PRERT,
             f"-i {interface} -p tcp -j REDIRECT --to-ports {PORT_OUTBOUND}",
             f'iifname "{interface}" meta l4proto tcp counter redirect to :{PORT_OUTBOUND}'),
        Rule(f"virtual interface {interface} return", "nat", CHAIN_PRERT, f"-i {interface} -p tcp -j RETURN",
             f'iifname "{interface}" meta l4proto tcp counter return'),
    ]


def _instantiate(t: _Template, family: Family, name_family: bool) -> Rule:
    a = ADDRESSES[family]
    nft_loopback = a.loopback.split("/")[0]
    nft_probe = PROBE_SNAT[family]
    name = f"rule {t.number}" + (f" ({family})" if name_family else "")
    return Rule(name, t.table, t.chain, t.iptables.format(loopback=a.loopback, probe=a.probe),
                t.nft.format(ip=a.nft, loopback=nft_loopback, probe=nft_probe),
                family=family if t.per_family else None)


def _expand(cfg: PodRuleConfig, instantiate: Callable[[_Template], list[Rule]]) -> list[Rule]:
    rules: list[Rule] = []
    for t in _POD_TEMPLATES:
        if (t.skip_for_ingress and cfg.ingress) or (t.dns_only and not cfg.dns_capture):
            continue
        rules += instantiate(t)
        if t.number == _VIRTUAL_INTERFACES_AFTER:
            for interface in cfg.virtual_interfaces:
                rules += _virtual_interface_rules(interface)
    return rules


def pod_rules(cfg: PodRuleConfig, family: Family) -> list[Rule]:
    """The §2 rules that `iptables` (ipv4) or `ip6tables` (ipv6) holds for this pod, in order."""
    return _expand(cfg, lambda t: [_instantiate(t, family, name_family=False)])


def nft_pod_rules(cfg: PodRuleConfig) -> list[Rule]:
    """The §2 rules of the `inet` tables: family-specific rules once per enabled family, twins adjacent."""
    both = len(cfg.families) > 1

    def instantiate(t: _Template) -> list[Rule]:
        if not t.per_family:
            return [_instantiate(t, "ipv4", name_family=False)]
        return [_instantiate(t, f, name_family=both) for f in cfg.families]

    return _expand(cfg, instantiate)


def host_rules(family: Family) -> list[Rule]:
    """§2 host side, iptables: POSTROUTING position 1 jumps to ISTIO_POSTRT, which SNATs probes."""
    return [
        Rule("probe jump", "nat", "POSTROUTING", f"-j {CHAIN_POSTRT}", "", insert=True),
        Rule("probe snat", "nat", CHAIN_POSTRT,
             f"-p tcp -m owner --socket-exists -m set --match-set {PROBE_SETS[family]} dst "
             f"-j SNAT --to-source {PROBE_SNAT[family]}", "", family=family),
    ]


def compare_chain(where: str, expected: Sequence[Rule], actual: Sequence[str],
                  text: Callable[[Rule], str], normalize: Callable[[str], str]) -> list[str]:
    """Drift items for one chain: which expected rules are missing, which listed rules are not ours, order.

    `actual` are the rule texts a tool listed; both sides pass through `normalize` before comparing.
    """
    want = [(r.name, normalize(text(r))) for r in expected]
    have = [normalize(a) for a in actual]
    spare = Counter(have)
    drift: list[str] = []
    for name, rule in want:
        if spare[rule] > 0:
            spare[rule] -= 1
        else:
            drift.append(f"{where} {name} missing")
    claimed = Counter(rule for _, rule in want)
    for rule in have:
        if claimed[rule] > 0:
            claimed[rule] -= 1
        else:
            drift.append(f"{where} unexpected rule: {rule}")
    if not drift and have != [rule for _, rule in want]:
        drift.append(f"{where} rules out of order")
    return drift
