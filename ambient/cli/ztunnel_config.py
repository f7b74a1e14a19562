"""`ambientctl ztunnel-config workloads|services|policies|certificates|connections|all [ZTUNNEL-POD]`: what
a ztunnel knows, read from its admin port (`GET /config_dump` on 15000, PROTOCOLS.md §10) and printed with
the columns of `istioctl ztunnel-config`, or as JSON with `-o json`.

The dump is read through the API server, as a Kubernetes tool must: the ztunnel pods are found by the
DaemonSet's label (`app=ztunnel`, in `--istio-namespace`), the one on `--node` by field selector, and the
dump is fetched over a port-forward to port 15000 of the pod (`pods/<pod>/portforward`, WebSocket:
ambient/kube/portforward.py), as istioctl does. Not the pods/proxy subresource: that dials the pod IP,
and ztunnel's admin port listens on localhost only (it has POST endpoints such as /quitquitquit), which a
port-forward reaches because the kubelet dials it inside the pod. So the same command works on the local
cluster (whose per-node ztunnel processes have mirror pods, ambient/local/supervisor.py) and on any cluster
given with `--kubeconfig` (RBAC: `pods/portforward`). As istioctl: at most one of a pod name, `--node` or
`--file`; with none, any ztunnel, except for certificates and connections, which differ per ztunnel and so
need one named. `--node all` asks every ztunnel. Wire it into the CLI with `register(cli)`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click

from ambient.cli.errors import CliError
from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.kube.portforward import ForwardingFailed, PortForwardError, http_get_via_port_forward
from ambient.kube.resources import ResourceTable

ADMIN_PORT = 15000  # PROTOCOLS.md §1
DUMP_PATH = "/config_dump"
DUMP_TIMEOUT = 30.0  # seconds for one dump through the port-forward: the client's bound on a short request
ISTIO_NAMESPACE = "istio-system"  # istioctl's --istio-namespace default
ZTUNNEL_LABEL = "app=ztunnel"  # the ztunnel DaemonSet's pods (deploy/ztunnel.yaml), and the local cluster's mirror pods
KINDS = ("workloads", "services", "policies", "certificates", "connections", "all")
PER_ZTUNNEL_KINDS = ("certificates", "connections")  # istioctl will not pick a ztunnel for these
POD = ResourceTable().require("pods")

Json = dict[str, Any]
T = TypeVar("T")


class ZtunnelConfigError(CliError):
    """Printed as `error: ...`, exit 1 (as ambientctl's other errors)."""


class Cluster(Protocol):
    """ambientctl's root context: runs a coroutine with a client for the cluster chosen by `--kubeconfig`."""

    def run(self, fn: Callable[[KubeClient], Awaitable[T]]) -> T: ...


# -- where the dumps come from --------------------------------------------------------------------------
@dataclass(frozen=True)
class Ztunnel:
    pod: str
    namespace: str
    node: str

    @property
    def name(self) -> str:
        """`<pod>.<namespace>`, as istioctl names a ztunnel."""
        return f"{self.pod}.{self.namespace}"

    @classmethod
    def of(cls, pod: Json) -> Ztunnel:
        meta = pod["metadata"]
        return cls(meta["name"], meta["namespace"], str((pod.get("spec") or {}).get("nodeName") or ""))


def _ready(pod: Json) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def find_ztunnels(client: KubeClient, kind: str, pod: str | None, node: str | None,
                        istio_namespace: str) -> list[Ztunnel]:
    """The ztunnel(s) to ask: the named pod (`[pod/]name[.namespace]`), the one on `node`, all of them
    (`node` "all"), or any (Ready ones first)."""
    if pod:
        name, _, namespace = pod.removeprefix("pods/").removeprefix("pod/").partition(".")
        namespace = namespace or istio_namespace
        try:
            found = await client.get(POD, name, namespace)
        except ApiError as exc:
            raise ZtunnelConfigError(f"cannot find ztunnel pod {name}.{namespace}: {exc.message}") from None
        if (found["metadata"].get("labels") or {}).get("app") != "ztunnel":
            raise ZtunnelConfigError(f"ztunnel-config is only supported by Ztunnel proxies: {name}.{namespace} has "
                                     f"no label {ZTUNNEL_LABEL}")
        return [Ztunnel.of(found)]
    on_node = f"spec.nodeName={node}" if node and node != "all" else None
    try:
        pods = (await client.list(POD, istio_namespace, ZTUNNEL_LABEL, on_node))["items"]
    except ApiError as exc:
        raise ZtunnelConfigError(f"cannot list ztunnel pods in namespace {istio_namespace}: {exc.message}") from None
    if not pods:
        where = f"on node {node}" if on_node else "at all"
        raise ZtunnelConfigError(f"no ztunnel pod {where} (pods labelled {ZTUNNEL_LABEL} in namespace "
                                 f"{istio_namespace}; another namespace is chosen with --istio-namespace)")
    ztunnels = [Ztunnel.of(p) for p in sorted(pods, key=lambda p: (not _ready(p), p["metadata"]["name"]))]
    if node == "all":
        return sorted(ztunnels, key=lambda z: (z.node, z.pod))
    if node is None and kind in PER_ZTUNNEL_KINDS and len(ztunnels) > 1:
        raise ZtunnelConfigError(f"ztunnel pod name or --node must be set: {kind} differ per ztunnel "
                                 f"({', '.join(z.pod for z in ztunnels)})")
    return ztunnels[:1]


async def fetch_dump(client: KubeClient, ztunnel: Ztunnel) -> Json:
    """The ztunnel's config dump, over a port-forward to its admin port; each failure one line."""
    where = f"ztunnel's admin port {ADMIN_PORT} on pod {ztunnel.name}"
    try:
        status, body = await http_get_via_port_forward(client, ztunnel.namespace, ztunnel.pod, ADMIN_PORT, DUMP_PATH,
                                                       DUMP_TIMEOUT)
    except ApiError as exc:
        raise ZtunnelConfigError(f"cannot port-forward to {ztunnel.name} through the API server: "
                                 f"{_one_line(exc.message)}") from None
    except ForwardingFailed as exc:
        if exc.received:
            raise ZtunnelConfigError(f"the port-forward to {where} broke off: {_one_line(exc.message)}") from None
        raise ZtunnelConfigError(f"{where} did not accept the connection: {_one_line(exc.message)}") from None
    except PortForwardError as exc:
        raise ZtunnelConfigError(f"cannot read the config dump of {ztunnel.name} through a port-forward: "
                                 f"{_one_line(exc.message)}") from None
    if status != 200:
        raise ZtunnelConfigError(f"ztunnel {ztunnel.name} answered GET {DUMP_PATH} with HTTP {status}: "
                                 f"{_one_line(body.decode(errors='replace'))[:200]}")
    return parse_dump(body, f"ztunnel {ztunnel.name}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_dump(body: bytes, source: str) -> Json:
    try:
        dump = json.loads(body)
    except ValueError as exc:
        raise ZtunnelConfigError(f"{source} sent a config dump that is not JSON: {exc}") from None
    if not isinstance(dump, dict):
        raise ZtunnelConfigError(f"{source} sent a config dump that is not a JSON object")
    return dump


def read_dump_file(path: str) -> Json:
    """`--file`: a dump saved earlier (`-` for stdin), as istioctl's."""
    try:
        body = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ZtunnelConfigError(f"cannot read the config dump file {path}: {exc.strerror}") from None
    return parse_dump(body, f"the file {path}")


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
@click.argument("ztunnel_pod", metavar="[ZTUNNEL-POD[.NAMESPACE]]", required=False)
@click.option("--node", help="ask the ztunnel on this node, or on every node with 'all'")
@click.option("-i", "--istio-namespace", default=ISTIO_NAMESPACE, show_default=True,
              help="namespace of the ztunnel pods")
@click.option("-f", "--file", "dump_file", help="read a saved config dump (- for stdin) instead of asking a ztunnel")
@click.option("-n", "--namespace", help="only this namespace (workloads, services, policies, connections)")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--details", is_flag=True, help="connections: one row per connection instead of counts per pod")
@click.pass_obj
def ztunnel_config(cluster: Cluster, kind: str, ztunnel_pod: str | None, node: str | None, istio_namespace: str,
                   dump_file: str | None, namespace: str | None, output: str, details: bool) -> None:
    """Show what a ztunnel knows: workloads, services, policies, certificates, connections."""
    if sum(x is not None for x in (ztunnel_pod, node, dump_file)) > 1:
        raise ZtunnelConfigError("at most one of --file, --node, or pod name must be passed")
    if dump_file is not None:
        show(kind, [(None, read_dump_file(dump_file))], [], namespace, output, details)
        return

    async def go(client: KubeClient) -> tuple[list[tuple[Ztunnel | None, Json]], list[str]]:
        ztunnels = await find_ztunnels(client, kind, ztunnel_pod, node, istio_namespace)

        async def attempt(ztunnel: Ztunnel) -> Json | ZtunnelConfigError:
            try:
                return await fetch_dump(client, ztunnel)
            except ZtunnelConfigError as exc:
                if len(ztunnels) == 1:
                    raise
                return exc

        results = await asyncio.gather(*(attempt(z) for z in ztunnels))
        dumps = [(z if node == "all" else None, r) for z, r in zip(ztunnels, results, strict=True)
                 if isinstance(r, dict)]
        return dumps, [r.message for r in results if isinstance(r, ZtunnelConfigError)]

    dumps, failures = cluster.run(go)
    show(kind, dumps, failures, namespace, output, details)


def show(kind: str, dumps: list[tuple[Ztunnel | None, Json]], failures: list[str], namespace: str | None,
         output: str, details: bool) -> None:
    """One dump as it is; those of several ztunnels (`--node all`) each under its node's name. What could
    not be read is reported last, as the error."""
    if output == "json" and dumps:
        sections = {z.node or z.name if z else "": section(dump, kind, namespace) for z, dump in dumps}
        click.echo(json.dumps(sections if dumps[0][0] else sections[""], indent=4))
    elif output != "json":
        for i, (ztunnel, dump) in enumerate(dumps):
            if ztunnel:
                if i:
                    click.echo()
                click.echo(f"{ztunnel.node or ztunnel.name} ({ztunnel.name}):")
            click.echo(summary(dump, kind, namespace, details))
    if failures:
        raise ZtunnelConfigError("; ".join(failures))


def register(cli_group: click.Group) -> None:
    """Add `ztunnel-config` to ambientctl."""
    cli_group.add_command(ztunnel_config)
