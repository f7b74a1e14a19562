"""nftables form of the rule set (PROTOCOLS.md §2): `nft -f -` input, removal and drift.

Pure: takes rules and `nft list ruleset` output, returns nft input or drift items. Each pod table is
replaced atomically by `add table` + `delete table` + `add table` + its chains and rules in one transaction,
so re-applying converges from any state (a table this variant does not use is just deleted) and never
leaves a moment without rules. The host table keeps its sets (and their members) across `ensure()`: only its
`postrouting` chain is flushed and refilled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cni.rules.model import (
    NFT_CHAINS,
    NFT_TABLES,
    PROBE_SETS,
    PROBE_SNAT,
    Family,
    PodRuleConfig,
    Rule,
    compare_chain,
    nft_pod_rules,
)

TABLE_ORDER = ("nat", "mangle", "raw")  # upstream's order


@dataclass(frozen=True)
class BaseChain:
    name: str
    type: str
    hook: str
    priority: int

    def spec(self) -> str:
        return f"{{ type {self.type} hook {self.hook} priority {self.priority} ; }}"

    def describe(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}"


BASE_CHAINS: dict[str, tuple[BaseChain, BaseChain]] = {
    "nat": (BaseChain("prerouting", "nat", "prerouting", -100), BaseChain("output", "nat", "output", -100)),
    "mangle": (BaseChain("prerouting", "filter", "prerouting", -150), BaseChain("output", "route", "output", -150)),
    "raw": (BaseChain("prerouting", "filter", "prerouting", -300), BaseChain("output", "filter", "output", -300)),
}
REGULAR_CHAINS = ("istio-prerouting", "istio-output")
HOST_TABLE = NFT_TABLES["nat"]
HOST_CHAIN = BaseChain("postrouting", "nat", "postrouting", 100)
PROBE_SET_COMMENT = "UUID of the pods that are part of ambient mesh"  # upstream's wording
_SET_TYPE: dict[Family, str] = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}


def render_nftables(cfg: PodRuleConfig) -> str:
    """`nft -f -` input that leaves exactly this pod's three tables (the raw one only with DNS capture)."""
    rules = nft_pod_rules(cfg)
    lines: list[str] = []
    for kind in TABLE_ORDER:
        table = f"inet {NFT_TABLES[kind]}"
        mine = [r for r in rules if r.table == kind]
        lines += [f"add table {table}", f"delete table {table}"]
        if not mine:
            continue
        lines.append(f"add table {table}")
        lines += [f"add chain {table} {c.name} {c.spec()}" for c in BASE_CHAINS[kind]]
        lines += [f"add chain {table} {c}" for c in REGULAR_CHAINS]
        lines += [f"add rule {table} {NFT_CHAINS[r.chain]} {r.nft}" for r in mine]
    return "".join(f"{line}\n" for line in lines)


def render_removal() -> str:
    """Deletes the three pod tables whether or not they exist (add-then-delete never fails)."""
    return "".join(f"add table inet {t}\ndelete table inet {t}\n" for t in (NFT_TABLES[k] for k in TABLE_ORDER))


def host_rules(kubelet_uid: int, families: Sequence[Family]) -> list[Rule]:
    return [Rule(f"probe snat ({f})", "nat", "POSTROUTING", "",
                 f"meta l4proto tcp meta skuid {kubelet_uid} {'ip6' if f == 'ipv6' else 'ip'} daddr @{PROBE_SETS[f]} "
                 f"counter snat {'ip6' if f == 'ipv6' else 'ip'} to {PROBE_SNAT[f]}", family=f)
            for f in families]


def render_host_nftables(kubelet_uid: int, families: Sequence[Family]) -> str:
    """§2 host side: sets of enrolled pod IPs and the SNAT of the kubelet's probes to 169.254.7.127."""
    table = f"inet {HOST_TABLE}"
    lines = [f"add table {table}"]
    lines += [f'add set {table} {PROBE_SETS[f]} {{ type {_SET_TYPE[f]} ; comment "{PROBE_SET_COMMENT}" ; }}'
              for f in families]
    lines += [f"add chain {table} {HOST_CHAIN.name} {HOST_CHAIN.spec()}", f"flush chain {table} {HOST_CHAIN.name}"]
    lines += [f"add rule {table} {HOST_CHAIN.name} {r.nft}" for r in host_rules(kubelet_uid, families)]
    return "".join(f"{line}\n" for line in lines)


def render_host_removal() -> str:
    return f"add table inet {HOST_TABLE}\ndelete table inet {HOST_TABLE}\n"


def render_elements(verb: str, family: Family, members: dict[str, str | None]) -> str:
    """`add`/`delete element` lines; `None` as comment means none (deletes take no comments)."""
    if not members:
        return ""
    items = ", ".join(ip if uid is None else f'{ip} comment "{uid}"' for ip, uid in members.items())
    return f"{verb} element inet {HOST_TABLE} {PROBE_SETS[family]} {{ {items} }}\n"


# --- reading `nft list ruleset` ---------------------------------------------------------------------------

@dataclass
class ListedChain:
    hook: tuple[str, str, int] | None = None  # (type, hook, priority) of a base chain
    rules: list[str] = field(default_factory=list)


@dataclass
class ListedTable:
    chains: dict[str, ListedChain] = field(default_factory=dict)
    sets: set[str] = field(default_factory=set)


_PRIORITY_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
_HOOK_LINE = re.compile(r"type (\S+) hook (\S+)(?: device \S+)? priority ([^;]+);")


def _priority(text: str) -> int:
    parts = text.split()
    value = _PRIORITY_NAMES.get(parts[0])
    if value is None:
        return int(parts[0])
    if len(parts) == 3:
        value += int(parts[2]) * (1 if parts[1] == "+" else -1)
    return value


def parse_ruleset(text: str) -> dict[str, ListedTable]:
    """Parse `nft list ruleset` text into `{"inet istio-ambient-nat": ListedTable, ...}`."""
    tables: dict[str, ListedTable] = {}
    table: ListedTable | None = None
    chain: ListedChain | None = None
    in_block = False
    for raw in text.splitlines():
        line = raw.split(" # handle ")[0].strip()
        if not line or line.startswith("#"):
            continue
        if in_block:  # body of a set/map/...: only set names matter here
            in_block = line != "}"
            continue
        if line.startswith("table ") and line.endswith("{"):
            table = tables.setdefault(" ".join(line.split()[1:3]), ListedTable())
        elif table is not None and line.startswith("chain ") and line.endswith("{"):
            chain = table.chains.setdefault(line.split()[1], ListedChain())
        elif table is not None and chain is None and line.endswith("{"):  # set, map, flowtable, ...
            if line.startswith("set "):
                table.sets.add(line.split()[1])
            in_block = True
        elif line == "}":
            if chain is not None:
                chain = None
            else:
                table = None
        elif chain is not None:
            hook = _HOOK_LINE.match(line)
            if hook:
                chain.hook = (hook.group(1), hook.group(2), _priority(hook.group(3).strip()))
            elif not line.startswith("policy "):
                chain.rules.append(line)
    return tables


_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_CT_MARK_SET = re.compile(r"ct mark set ct mark & (0x[0-9a-f]+) \| (0x[0-9a-f]+)")
_HOST_CIDR = re.compile(r"(?<=[0-9a-f])/(32|128)\b")


def normalize(rule: str) -> str:
    """Forms that different nft versions print for the same rule compare equal."""
    text = _COUNTER.sub("counter", rule.replace('"', ""))
    text = re.sub(r"\band\b", "&", text)
    text = re.sub(r"\bor\b", "|", text)
    text = re.sub(r"0x0*([0-9a-f]+)", r"0x\1", text)
    text = _HOST_CIDR.sub("", text)
    tokens = text.split()
    out: list[str] = []
    for i, token in enumerate(tokens):
        if token == "mark" and (i == 0 or tokens[i - 1] not in ("meta", "ct")):
            out.append("meta")
        out.append(token)
    text = " ".join(out)
    # nft folds `x & m | v` into `x & (m|v) | v`; compare the folded form on both sides
    return _CT_MARK_SET.sub(lambda m: f"ct mark set ct mark & {int(m.group(1), 16) | int(m.group(2), 16):#x} | "
                                      f"{m.group(2)}", text)


def _verify_chain(where: str, chain: ListedChain | None, expected: Sequence[Rule], base: BaseChain | None
                  ) -> list[str]:
    if chain is None:
        return [f"{where} missing"]
    drift: list[str] = []
    if base is not None and chain.hook != (base.type, base.hook, base.priority):
        got = "no hook" if chain.hook is None else "type {} hook {} priority {}".format(*chain.hook)
        drift.append(f"{where} is {got}, expected {base.describe()}")
    return drift + compare_chain(where, expected, chain.rules, lambda r: r.nft, normalize)


def verify_pod(cfg: PodRuleConfig, ruleset: str) -> list[str]:
    """Drift between the rules `cfg` wants and `nft list ruleset` output; empty when in place."""
    listed = parse_ruleset(ruleset)
    rules = nft_pod_rules(cfg)
    drift: list[str] = []
    for kind in TABLE_ORDER:
        name = NFT_TABLES[kind]
        table = listed.get(f"inet {name}")
        mine = [r for r in rules if r.table == kind]
        if not mine:
            if table is not None:
                drift.append(f"{name} table present but not expected")
            continue
        if table is None:
            drift.append(f"{name} table missing")
            continue
        for base in BASE_CHAINS[kind]:
            drift += _verify_chain(f"{name} {base.name}", table.chains.get(base.name),
                                   [r for r in mine if NFT_CHAINS[r.chain] == base.name], base)
        for chain_name in REGULAR_CHAINS:
            drift += _verify_chain(f"{name} {chain_name}", table.chains.get(chain_name),
                                   [r for r in mine if NFT_CHAINS[r.chain] == chain_name], None)
        known = {c.name for c in BASE_CHAINS[kind]} | set(REGULAR_CHAINS)
        drift += [f"{name} unexpected chain {c}" for c in table.chains if c not in known]
    return drift


def verify_host(kubelet_uid: int, families: Sequence[Family], ruleset: str) -> list[str]:
    table = parse_ruleset(ruleset).get(f"inet {HOST_TABLE}")
    if table is None:
        return [f"{HOST_TABLE} table missing"]
    drift = [f"{HOST_TABLE} set {PROBE_SETS[f]} missing" for f in families if PROBE_SETS[f] not in table.sets]
    return drift + _verify_chain(f"{HOST_TABLE} {HOST_CHAIN.name}", table.chains.get(HOST_CHAIN.name),
                                 host_rules(kubelet_uid, families), HOST_CHAIN)
