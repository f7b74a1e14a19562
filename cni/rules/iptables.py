"""iptables form of the rule set (PROTOCOLS.md §2): `iptables-restore --noflush` input, removal and drift.

Pure: takes rules and `iptables-save` output, returns restore input or drift items. Idempotence comes from
the restore input itself: declaring `:ISTIO_PRERT - [0:0]` flushes our chain (or creates it) in the same
transaction that refills it, and jumps from the built-in chains are only added when `iptables-save` does not
already show them (duplicates and stale jumps are deleted), so applying twice leaves one copy of each rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cni.rules.model import (
    HOST_CHAINS,
    POD_CHAINS,
    Family,
    PodRuleConfig,
    Rule,
    compare_chain,
    host_rules,
    pod_rules,
)

TABLE_ORDER = ("mangle", "nat", "raw", "filter", "security")


@dataclass
class SavedTable:
    chains: list[str] = field(default_factory=list)  # every chain declared, built-in ones included
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain → rule args after `-A <chain>`


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse `iptables-save` output into tables, chains and the rules of each chain."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable())
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.rules.setdefault(chain, []).append(rest[0] if rest else "")
    return tables


def _targets(args: str) -> str | None:
    tokens = args.split()
    for i, token in enumerate(tokens[:-1]):
        if token in ("-j", "-g", "--jump", "--goto"):
            return tokens[i + 1]
    return None


def _table_order(tables: set[str]) -> list[str]:
    return sorted(tables, key=lambda t: (TABLE_ORDER.index(t) if t in TABLE_ORDER else len(TABLE_ORDER), t))


def restore_input(rules: Sequence[Rule], own_chains: Sequence[str], saved: str = "") -> str:
    """`iptables-restore --noflush` input that turns the state in `saved` into exactly `rules`.

    `own_chains` are the chains this rule set owns: they are flushed and refilled when wanted, deleted
    (with every jump to them) in tables that no longer want them. Empty when nothing needs doing.
    """
    state = parse_save(saved)
    wanted_tables = {r.table for r in rules}
    blocks: list[str] = []
    for table in _table_order(wanted_tables | {t for t, s in state.items() if _owns_something(s, own_chains)}):
        mine = [r for r in rules if r.table == table]
        saved_table = state.get(table, SavedTable())
        lines = [f"*{table}"]
        if mine:
            used = [c for c in own_chains if any(r.chain == c or _targets(r.iptables) == c for r in mine)]
            lines += [f":{c} - [0:0]" for c in used]
            lines += _jump_changes(mine, saved_table, own_chains)
            lines += [f"-A {r.chain} {r.iptables}" for r in mine if r.chain in own_chains]
        else:
            lines += _jump_changes([], saved_table, own_chains)
            present = [c for c in own_chains if c in saved_table.chains]
            lines += [f"-F {c}" for c in present] + [f"-X {c}" for c in present]
        if len(lines) > 1:
            blocks.append("\n".join([*lines, "COMMIT"]))
    return "".join(f"{b}\n" for b in blocks)


def _owns_something(table: SavedTable, own_chains: Sequence[str]) -> bool:
    return any(c in table.chains for c in own_chains) or any(
        _targets(args) in own_chains for chain, rs in table.rules.items() if chain not in own_chains for args in rs)


def _jump_changes(mine: Sequence[Rule], table: SavedTable, own_chains: Sequence[str]) -> list[str]:
    """Deletes for jumps that are duplicated, misplaced or stale; adds for jumps that are missing."""
    deletes: list[str] = []
    adds: list[str] = []
    wanted = [r for r in mine if r.chain not in own_chains]
    for chain, existing in table.rules.items():
        if chain in own_chains:
            continue
        keep = {r.iptables for r in wanted if r.chain == chain and _in_place(r, existing)}
        for args in existing:
            if _targets(args) not in own_chains:
                continue
            if args in keep:
                keep.discard(args)  # the first copy stays; later ones are duplicates
            else:
                deletes.append(f"-D {chain} {args}")
    for r in wanted:
        if not _in_place(r, table.rules.get(r.chain, [])):
            adds.append(f"-I {r.chain} 1 {r.iptables}" if r.insert else f"-A {r.chain} {r.iptables}")
    return deletes + adds


def _in_place(rule: Rule, existing: Sequence[str]) -> bool:
    if rule.insert:
        return bool(existing) and existing[0] == rule.iptables
    return rule.iptables in existing


def removal_input(own_chains: Sequence[str], saved: str) -> str:
    """Input that deletes every jump to `own_chains` and the chains themselves; empty when none exist."""
    return restore_input([], own_chains, saved)


def render_iptables(cfg: PodRuleConfig, family: Family) -> str:
    """The full `iptables-restore --noflush` input for a pod netns with none of our rules yet."""
    return restore_input(pod_rules(cfg, family), POD_CHAINS)


def render_host_iptables(family: Family) -> str:
    """The host probe SNAT (§2 host side) for a node netns with none of our rules yet."""
    return restore_input(host_rules(family), HOST_CHAINS)


def normalize(args: str) -> str:
    """Forms that different iptables versions print for the same rule compare equal."""
    tokens = args.split()
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "-m" and i + 1 < len(tokens) and tokens[i + 1] in ("tcp", "udp"):
            i += 2  # implied by -p tcp/udp; some versions print it, some do not
            continue
        out.append(tokens[i])
        i += 1
    return " ".join(out)


def verify_rules(rules: Sequence[Rule], own_chains: Sequence[str], saved: str, prefix: str = "") -> list[str]:
    """Drift between `rules` and `iptables-save` output; empty when everything is in place."""
    state = parse_save(saved)
    drift: list[str] = []
    wanted_tables = {r.table for r in rules}
    for table in _table_order(wanted_tables | set(state)):
        mine = [r for r in rules if r.table == table]
        saved_table = state.get(table, SavedTable())
        where = f"{prefix}{table}"
        if not mine:
            drift += [f"{where} chain {c} present but not expected" for c in own_chains if c in saved_table.chains]
            drift += [f"{where} {chain} unexpected rule: -A {chain} {args}"
                      for chain, rs in saved_table.rules.items() if chain not in own_chains
                      for args in rs if _targets(args) in own_chains]
            continue
        drift += _verify_jumps(where, mine, saved_table, own_chains)
        for chain in own_chains:
            expected = [r for r in mine if r.chain == chain]
            referenced = any(_targets(r.iptables) == chain for r in mine)
            if chain not in saved_table.chains:
                if expected or referenced:
                    drift.append(f"{where} chain {chain} missing")
                continue
            drift += compare_chain(f"{where} {chain}", expected, saved_table.rules.get(chain, []),
                                   lambda r: r.iptables, normalize)
    return drift


def _verify_jumps(where: str, mine: Sequence[Rule], table: SavedTable, own_chains: Sequence[str]) -> list[str]:
    drift: list[str] = []
    wanted = [r for r in mine if r.chain not in own_chains]
    for r in wanted:
        existing = table.rules.get(r.chain, [])
        count = existing.count(r.iptables)
        if count == 0:
            drift.append(f"{where} {r.chain} {r.name} (-j {_targets(r.iptables)}) missing")
        elif count > 1:
            drift.append(f"{where} {r.chain} {r.name} present {count} times")
        elif r.insert and existing[0] != r.iptables:
            drift.append(f"{where} {r.chain} {r.name} is not the first rule")
    expected = {(r.chain, r.iptables) for r in wanted}
    for chain, existing in table.rules.items():
        if chain in own_chains:
            continue
        drift += [f"{where} {chain} unexpected rule: -A {chain} {args}" for args in existing
                  if _targets(args) in own_chains and (chain, args) not in expected]
    return drift


def verify_pod(cfg: PodRuleConfig, family: Family, saved: str) -> list[str]:
    return verify_rules(pod_rules(cfg, family), POD_CHAINS, saved, prefix="ipv6 " if family == "ipv6" else "")


def verify_host(family: Family, saved: str) -> list[str]:
    return verify_rules(host_rules(family), HOST_CHAINS, saved, prefix="ipv6 " if family == "ipv6" else "")
