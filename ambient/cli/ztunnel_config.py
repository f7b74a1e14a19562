"""`ambientctl ztunnel-config workloads|services|policies|certificates|connections|all`: what a node's
ztunnel knows, read from its admin port (`GET http://<node IP>:15000/config_dump`, PROTOCOLS.md §10) and
printed with the columns of `istioctl ztunnel-config`, or as JSON with `-o json`.

Local cluster only: node-N's ztunnel serves its admin port on the node's IP (172.30.0.(10+N)), which the
host can reach. `--node all` asks every node of the running cluster. Wire it into the CLI with
`register(cli)`.
"""

from __future__ import annotations

import datetime
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from ambient.local.network import MAX_NODES, NodeNet

ADMIN_PORT = 15000  # PROTOCOLS.md §1
FETCH_TIMEOUT = 5.0  # seconds; the admin port answers from memory, so a slow answer means something is wrong
KINDS = ("workloads", "services", "policies", "certificates", "connections", "all")

Json = dict[str, Any]


class ZtunnelConfigError(click.ClickException):
    """Printed as `error: ...`, exit 1 (as ambientctl's other errors)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


# -- where the dumps come from --------------------------------------------------------------------------
def admin_address(node: str) -> tuple[str, int]:
    """node-N → (its node IP, 15000)."""
    match = re.fullmatch(r"node-(\d+)", node)
    if match is None or not 1 <= int(match[1]) <= MAX_NODES:
        raise ZtunnelConfigError(f"unknown node {node!r}: name a local cluster node (node-1, node-2, ...) or 'all'")
    return NodeNet(int(match[1])).ip, ADMIN_PORT


def cluster_nodes() -> list[str]:
    """The nodes of the running local cluster, from its state dir (honouring ambientctl's --state-dir)."""
    from ambient.local.layout import DEFAULT_STATE_DIR, StateDir

    context = click.get_current_context(silent=True)
    state = getattr(context.find_root().obj, "state", None) if context else None
    if not isinstance(state, StateDir):
        from ambient.local.cluster import current_state_dir

        state = StateDir(current_state_dir() or DEFAULT_STATE_DIR)
    try:
        config = json.loads(Path(state.config).read_text())
        return [NodeNet(int(i)).name for i in config["nodes"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise ZtunnelConfigError(f"no local cluster found in {state.root}: start one with `ambientctl up`, "
                                 "or name a node with --node node-N") from None


def fetch_dump(node: str) -> Json:
    host, port = admin_address(node)
    url = f"http://{host}:{port}/config_dump"
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        raise ZtunnelConfigError(f"ztunnel on {node} answered {exc.code} for {url}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ZtunnelConfigError(f"cannot reach ztunnel on {node} at {url}: {reason}; is the local cluster up "
                                 f"(`ambientctl status`) and ztunnel running on {node}?") from None
    try:
        dump = json.loads(body)
    except ValueError as exc:
        raise ZtunnelConfigError(f"ztunnel on {node} sent a config dump that is not JSON: {exc}") from None
    if not isinstance(dump, dict):
        raise ZtunnelConfigError(f"ztunnel on {node} sent a config dump that is not a JSON object")
    return dump


# -- tables ---------------------------------------------------------------------------------------------
def render_table(header: Sequence[str], rows: Iterable[Sequence[str]], padding: int = 1) -> str:
    """Left-aligned columns with at least `padding` spaces between them (Go's tabwriter, as istioctl)."""
    all_rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    gap = " " * padding
    return "\n".join(gap.join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in all_rows)


def _in_namespace(namespace: str | None, item: Json, key: str = "namespace") -> bool:
    return namespace is None or item.get(key) == namespace


def _waypoint_name(waypoint: Json | None, services: list[Json]) -> str:
    """The waypoint service's name, found by `<ns>/<hostname>` or by `<network>/<vip>` (as istioctl)."""
    if not waypoint:
        return "None"
    destination = waypoint.get("destination")
    for svc in services:
        if destination == f"{svc.get('namespace')}/{svc.get('hostname')}" or destination in svc.get("vips", []):
            return str(svc.get("name", "NA"))
    return "NA"


def _strip_network(address: str) -> str:
    return address.split("/", 1)[1] if "/" in address else address


def workloads_table(dump: Json, namespace: str | None = None) -> str:
    services = dump.get("services") or []
    workloads = sorted((w for w in dump.get("workloads") or [] if _in_namespace(namespace, w)),
                       key=lambda w: (f"{w.get('namespace')}.{w.get('name')}", w.get("node", "")))
    rows = [[w.get("namespace", ""), w.get("name", ""), ",".join(w.get("workloadIps") or []) or w.get("hostname", ""),
             w.get("node", ""), _waypoint_name(w.get("waypoint"), services), w.get("protocol", "")]
            for w in workloads]
    return render_table(["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"], rows)


def services_table(dump: Json, namespace: str | None = None) -> str:
    services = dump.get("services") or []
    healthy_uids = {w.get("uid") for w in dump.get("workloads") or [] if w.get("status") == "Healthy"}
    rows = []
    for svc in sorted((s for s in services if _in_namespace(namespace, s)),
                      key=lambda s: (s.get("namespace", ""), s.get("name", ""), s.get("hostname", ""))):
        endpoints = svc.get("endpoints") or {}
        healthy = sum(1 for ep in endpoints.values() if ep.get("workloadUid") in healthy_uids)
        rows.append([svc.get("namespace", ""), svc.get("name", ""),
                     ",".join(_strip_network(v) for v in svc.get("vips") or []),
                     _waypoint_name(svc.get("waypoint"), services), f"{healthy}/{len(endpoints)}"])
    return render_table(["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"], rows)


def policies_table(dump: Json, namespace: str | None = None) -> str:
    policies = sorted((p for p in dump.get("policies") or [] if _in_namespace(namespace, p)),
                      key=lambda p: (p.get("namespace", ""), p.get("name", "")))
    rows = [[p.get("namespace", ""), p.get("name", ""), p.get("action", ""), p.get("scope", "")] for p in policies]
    return render_table(["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"], rows)


def _parse_time(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except (TypeError, ValueError):
        return None


def _cert_row(identity: str, kind: str, state: str, cert: Json, now: datetime.datetime) -> list[str]:
    not_before, not_after = _parse_time(cert.get("validFrom", "")), _parse_time(cert.get("expirationTime", ""))
    valid = not_before is not None and not_after is not None and not_before < now < not_after
    try:
        serial = format(int(cert.get("serialNumber", "")), "x")
    except ValueError:
        serial = "NA"
    return [identity, kind, state, str(valid).lower(), serial, cert.get("expirationTime") or "NA",
            cert.get("validFrom") or "NA"]


def certificates_table(dump: Json, now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    rows = []
    for entry in dump.get("certificates") or []:
        identity = entry.get("identity", "")
        state = entry.get("state", "")
        state = "Unavailable" if state.startswith("Unavailable") else state
        chain, roots = entry.get("certChain") or [], entry.get("rootCerts") or []
        if not chain:
            rows.append([identity, "NA", state, "false", "NA", "NA", "NA"])
            continue
        for i, cert in enumerate(chain):
            rows.append(_cert_row(identity, "Leaf" if i == 0 else "Intermediate", state, cert, now))
        rows.extend(_cert_row(identity, "Root", state, cert, now) for cert in roots)
    return render_table(["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER",
                         "NOT BEFORE"], rows, padding=5)


def _workload_states(dump: Json, namespace: str | None) -> list[Json]:
    states = [s for s in (dump.get("workloadState") or {}).values() if _in_namespace(namespace, s.get("info") or {})]
    return sorted(states, key=lambda s: (_info(s).get("namespace", ""), _info(s).get("name", "")))


def _info(state: Json) -> Json:
    return state.get("info") or {}


def _pod(state: Json) -> str:
    return f"{_info(state).get('name')}.{_info(state).get('namespace')}"


def _address_names(dump: Json) -> Callable[[str | None], str]:
    """ip:port → `<service hostname>:port` or `<pod>.<ns>:port` where the dump knows the IP (as istioctl)."""
    names: dict[str, str] = {}
    for svc in dump.get("services") or []:
        for vip in svc.get("vips") or []:
            names[_strip_network(vip)] = svc.get("hostname", "")
    for w in dump.get("workloads") or []:
        for ip in w.get("workloadIps") or []:
            names.setdefault(ip, f"{w.get('name')}.{w.get('namespace')}")

    def lookup(address: str | None) -> str:
        if not address:
            return ""
        host, sep, port = address.rpartition(":")
        name = names.get(host.strip("[]")) if sep else None
        return f"{name}:{port}" if name else address

    return lookup


def connections_table(dump: Json, namespace: str | None = None, details: bool = False) -> str:
    states = _workload_states(dump, namespace)
    if not details:
        rows = [[_pod(s), s.get("state", ""),
                 str(len((s.get("connections") or {}).get("inbound") or [])),
                 str(len((s.get("connections") or {}).get("outbound") or []))] for s in states]
        return render_table(["WORKLOAD", "STATE", "INBOUND", "OUTBOUND"], rows)
    name = _address_names(dump)
    rows = []
    for s in states:
        workload = _pod(s)
        connections = s.get("connections") or {}
        rows += [[workload, "Inbound", name(c.get("actualDst")), name(c.get("src")), name(c.get("originalDst")),
                  c.get("protocol", ""), c.get("srcIdentity") or ""] for c in connections.get("inbound") or []]
        rows += [[workload, "Outbound", name(c.get("src")), name(c.get("actualDst")), name(c.get("originalDst")),
                  c.get("protocol", ""), ""] for c in connections.get("outbound") or []]
    return render_table(["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL", "IDENTITY"], rows)


def summary(dump: Json, kind: str, namespace: str | None, details: bool) -> str:
    if kind == "workloads":
        return workloads_table(dump, namespace)
    if kind == "services":
        return services_table(dump, namespace)
    if kind == "policies":
        return policies_table(dump, namespace)
    if kind == "certificates":
        return certificates_table(dump)
    if kind == "connections":
        return connections_table(dump, namespace, details)
    return "\n\n".join(summary(dump, k, namespace, details) for k in ("workloads", "services", "policies",
                                                                      "certificates"))


def section(dump: Json, kind: str, namespace: str | None) -> Any:
    """What `-o json` prints: the kind's part of the dump (filtered by namespace), or all of it."""
    if kind in ("workloads", "services", "policies"):
        return [item for item in dump.get(kind) or [] if _in_namespace(namespace, item)]
    if kind == "certificates":
        return dump.get("certificates") or []
    if kind == "connections":
        return {uid: s for uid, s in (dump.get("workloadState") or {}).items()
                if _in_namespace(namespace, s.get("info") or {})}
    return dump


@click.command("ztunnel-config")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--node", default="node-1", show_default=True, help="node whose ztunnel to ask (node-N), or 'all'")
@click.option("-n", "--namespace", help="only this namespace (workloads, services, policies, connections)")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--details", is_flag=True, help="connections: one row per connection instead of counts per pod")
def ztunnel_config(kind: str, node: str, namespace: str | None, output: str, details: bool) -> None:
    """Show what a node's ztunnel knows: workloads, services, policies, certificates, connections."""
    nodes = cluster_nodes() if node == "all" else [node]
    failures: list[str] = []
    results: dict[str, Any] = {}
    for i, name in enumerate(nodes):
        try:
            dump = fetch_dump(name)
        except ZtunnelConfigError as exc:
            if len(nodes) == 1:
                raise
            failures.append(exc.message)
            continue
        if output == "json":
            results[name] = section(dump, kind, namespace)
            continue
        if len(nodes) > 1:
            if i:
                click.echo()
            click.echo(f"{name} ({admin_address(name)[0]}):")
        click.echo(summary(dump, kind, namespace, details))
    if output == "json" and results:
        click.echo(json.dumps(results if len(nodes) > 1 else results[nodes[0]], indent=4))
    if failures:
        raise ZtunnelConfigError("; ".join(failures))


def register(cli_group: click.Group) -> None:
    """Add `ztunnel-config` to ambientctl."""
    cli_group.add_command(ztunnel_config)
