"""`ambientctl waypoint apply|list|delete|status`: istioctl's waypoint verbs against any API server.

`apply` writes the waypoint Gateway of PROTOCOLS.md §8 (class `istio-waypoint`, one listener
`{name: mesh, port: 15008, protocol: HBONE}`, label `istio.io/waypoint-for` when `--for` is given) and can
enroll the namespace (`istio.io/use-waypoint=<name>`) and wait for the Gateway's `Programmed` condition;
`list` and `status` read Gateways and their status; `delete` removes Gateways. Messages and columns are
istioctl's (`✅ waypoint <ns>/<name> applied`, NAME/REVISION/TRAFFIC TYPE/PROGRAMMED, ...), so the steps of
Istio's tutorials read the same. Where we differ from istioctl, docs/waypoint.md says so.

This module only talks to the API server: deploying the waypoint is the control plane's job
(`ambient/control/waypoints.py`). The decisions (the Gateway, enrollment, what a status means, the tables)
are pure functions; the commands are thin shells around them. Wire it into the CLI with `register(cli)`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import click

from ambient.cli.errors import CliError
from ambient.control.translate.model import LABEL_USE_WAYPOINT
from ambient.control.waypoints import (
    GATEWAY,
    GATEWAY_API_VERSION,
    HBONE_PORT,
    HBONE_PROTOCOL,
    LABEL_DATAPLANE_MODE,
    LABEL_WAYPOINT_FOR,
    WAYPOINT_CLASS,
    is_waypoint,
)
from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable

Obj = dict[str, Any]
T = TypeVar("T")

NAMESPACE = ResourceTable().require("namespaces")

DEFAULT_NAME = "waypoint"  # istioctl's default --name (Istio's DefaultNamespaceWaypoint)
RESERVED_NAME = "none"  # `istio.io/use-waypoint: none` opts out, so no waypoint may be called that
LISTENER_NAME = "mesh"  # istioctl names the HBONE listener so
TRAFFIC_TYPES = ("all", "none", "service", "workload")  # sorted, as istioctl lists them
DEFAULT_TRAFFIC = "service"  # what the control plane assumes without `istio.io/waypoint-for` (PROTOCOLS §8)
LABEL_REVISION = "istio.io/rev"
DEFAULT_REVISION = "default"  # istioctl's REVISION column for a Gateway without `istio.io/rev`
DATAPLANE_AMBIENT = "ambient"
WAIT_TIMEOUT = "90s"  # istioctl's default --waypoint-timeout
POLL_INTERVAL = 0.5  # seconds between reads while waiting; istioctl reads once a second
COLUMN_PADDING = 5  # istioctl's tabwriter padding between columns
# The Gateway API's own placeholder for a condition no controller has written yet.
PENDING_CONDITION: Obj = {"type": "Programmed", "status": "Unknown", "reason": "Pending",
                          "message": "Waiting for controller"}


class WaypointError(CliError):
    """A user mistake in a waypoint verb: `error: ...`, exit 1."""


class Cluster(Protocol):
    """What the verbs need from ambientctl's root context: run a coroutine with a client for the cluster
    chosen by `--kubeconfig`/`--state-dir`, turning API errors into `Error from server ...`, exit 1."""

    def run(self, fn: Callable[[KubeClient], Awaitable[T]]) -> T: ...


# -- the Gateway -----------------------------------------------------------------------------------
def waypoint_gateway(name: str, namespace: str, traffic: str | None = None, revision: str | None = None) -> Obj:
    """The Gateway `istioctl waypoint apply` writes. `traffic` None leaves `istio.io/waypoint-for` unset,
    so the control plane's default (service) applies."""
    name = name or DEFAULT_NAME
    if name == RESERVED_NAME:
        raise WaypointError(f"invalid name provided for waypoint, '{RESERVED_NAME}' is a reserved value")
    labels: dict[str, str] = {}
    if traffic is not None:
        if traffic not in TRAFFIC_TYPES:
            raise WaypointError(f"invalid traffic type: {traffic}. Valid options are: [{' '.join(TRAFFIC_TYPES)}]")
        labels[LABEL_WAYPOINT_FOR] = traffic
    if revision:
        labels[LABEL_REVISION] = revision
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": GATEWAY_API_VERSION, "kind": "Gateway", "metadata": meta,
            "spec": {"gatewayClassName": WAYPOINT_CLASS,
                     "listeners": [{"name": LISTENER_NAME, "port": HBONE_PORT, "protocol": HBONE_PROTOCOL}]}}


def gateway_patch(desired: Obj) -> Obj:
    """A merge patch making a live Gateway this waypoint: class and listeners replaced, our labels set;
    labels we do not set (an earlier `--for` included) and other spec fields are kept."""
    patch: Obj = {"spec": dict(desired["spec"])}
    if desired["metadata"].get("labels"):
        patch["metadata"] = {"labels": dict(desired["metadata"]["labels"])}
    return patch


def enrollment_conflict(namespace: Obj, name: str) -> str | None:
    """Why `--enroll-namespace` must not relabel this namespace without `--overwrite`, or None. Unlike
    istioctl, which refuses any existing value, re-enrolling the same waypoint is allowed (idempotent)."""
    ns = namespace["metadata"]["name"]
    current = (namespace["metadata"].get("labels") or {}).get(LABEL_USE_WAYPOINT)
    if not current or current == name:
        return None
    return (f"namespace ({ns}) already has an enrolled Waypoint ({LABEL_USE_WAYPOINT}={current}). Consider adding "
            f"the `--overwrite` flag to your apply command to enroll {name!r} instead")


def ambient_warning(namespace: Obj) -> str | None:
    ns = namespace["metadata"]["name"]
    if (namespace["metadata"].get("labels") or {}).get(LABEL_DATAPLANE_MODE) == DATAPLANE_AMBIENT:
        return None
    return (f"⚠️ Warning: namespace is not enrolled in ambient. Consider running "
            f"`ambientctl label namespace {ns} {LABEL_DATAPLANE_MODE}={DATAPLANE_AMBIENT}`")


# -- status ----------------------------------------------------------------------------------------
def _conditions(gateway: Obj) -> list[Obj]:
    return [c for c in (gateway.get("status") or {}).get("conditions") or [] if isinstance(c, dict)]


def programmed(gateway: Obj) -> str:
    """The `Programmed` condition's status (True/False/Unknown); "False" when there is none, as istioctl."""
    found = next((c for c in _conditions(gateway) if c.get("type") == "Programmed"), None)
    return str(found.get("status") or "False") if found else "False"


def is_programmed(gateway: Obj) -> bool:
    return programmed(gateway) == "True"


def reported_condition(gateway: Obj) -> Obj:
    """The condition that explains the waypoint's state: `Accepted` when it is False (nothing is deployed,
    and only its message says why), else `Programmed`, else the Gateway API's "Waiting for controller"."""
    conditions = _conditions(gateway)
    accepted = next((c for c in conditions if c.get("type") == "Accepted"), None)
    if accepted is not None and accepted.get("status") == "False":
        return accepted
    return next((c for c in conditions if c.get("type") == "Programmed"), PENDING_CONDITION)


def not_ready_message(what: str, gateway: Obj) -> str:
    """istioctl's timeout error, followed by the condition that says what is missing."""
    meta = gateway["metadata"]
    cond = reported_condition(gateway)
    detail = f"{cond.get('type')}={cond.get('status')}"
    if cond.get("reason"):
        detail += f" ({cond['reason']})"
    if cond.get("message"):
        detail += f": {cond['message']}"
    if cond is PENDING_CONDITION:
        detail += "; is the waypoint controller (the ambient control plane) running?"
    return f"{what} {meta['namespace']}/{meta['name']}: {detail}"


# -- tables ----------------------------------------------------------------------------------------
def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows aligned as istioctl's tabwriter aligns them (cell width + 5), trailing blanks dropped."""
    widths = [max(len(row[i]) for row in rows) + COLUMN_PADDING for i in range(len(rows[0]))]
    return "\n".join("".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _sorted(gateways: Sequence[Obj]) -> list[Obj]:
    return sorted(gateways, key=lambda g: (g["metadata"].get("namespace", ""), g["metadata"]["name"]))


def list_table(gateways: Sequence[Obj], *, all_namespaces: bool) -> str:
    """`istioctl waypoint list`'s table (NAMESPACE first with -A). TRAFFIC TYPE shows what the control plane
    applies: the label, else service (istioctl prints `none` for a Gateway without the label, which is not
    what that waypoint gets)."""
    rows = [["NAMESPACE", "NAME", "REVISION", "TRAFFIC TYPE", "PROGRAMMED"]]
    for gw in _sorted(gateways):
        meta = gw["metadata"]
        labels = meta.get("labels") or {}
        rows.append([meta.get("namespace", ""), meta["name"], labels.get(LABEL_REVISION) or DEFAULT_REVISION,
                     labels.get(LABEL_WAYPOINT_FOR) or DEFAULT_TRAFFIC, programmed(gw)])
    return columns(rows if all_namespaces else [row[1:] for row in rows])


def status_table(gateways: Sequence[Obj]) -> str:
    """`istioctl waypoint status`'s table: one row per waypoint with the condition that explains it."""
    rows = [["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"]]
    for gw in _sorted(gateways):
        cond = reported_condition(gw)
        rows.append([gw["metadata"]["name"], *(str(cond.get(k) or "") for k in ("status", "type", "reason",
                                                                                 "message"))])
    return columns(rows)


# -- durations -------------------------------------------------------------------------------------
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from a Go duration as istioctl takes them (`90s`, `1m30s`, `500ms`), or a plain number."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _GO_DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise WaypointError(f"invalid duration {text!r}: use e.g. 90s, 2m or 1m30s") from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise WaypointError(f"invalid duration {text!r}: it must be positive")
    return seconds


# -- API helpers -----------------------------------------------------------------------------------
async def get_namespace(client: KubeClient, namespace: str) -> Obj:
    try:
        return await client.get(NAMESPACE, namespace)
    except ApiError as exc:
        if exc.code == 404:
            raise WaypointError(f"namespace: {namespace} not found") from None
        raise


async def check_namespace(client: KubeClient, namespace: str) -> None:
    """Listing a namespace that does not exist finds nothing; say so instead. A client not allowed to read
    namespaces gets the empty answer."""
    try:
        await get_namespace(client, namespace)
    except ApiError as exc:
        if exc.code != 403:
            raise


async def list_waypoints(client: KubeClient, namespace: str | None, label_selector: str | None = None) -> list[Obj]:
    """The waypoint Gateways in `namespace` (all namespaces when None), sorted."""
    try:
        items = (await client.list(GATEWAY, namespace, label_selector))["items"]
    except ApiError as exc:
        if exc.code == 404:
            raise WaypointError(f"the server has no Kubernetes Gateway API ({GATEWAY_API_VERSION} gateways): install "
                                f"its CRDs before using waypoints ({exc.message})") from None
        raise
    return _sorted([gw for gw in items if is_waypoint(gw)])


async def get_gateway(client: KubeClient, name: str, namespace: str) -> Obj | None:
    try:
        return await client.get(GATEWAY, name, namespace)
    except ApiError as exc:
        if exc.code == 404:
            return None
        raise


async def apply_gateway(client: KubeClient, desired: Obj) -> Obj:
    meta = desired["metadata"]
    live = await get_gateway(client, meta["name"], meta["namespace"])
    if live is not None and not is_waypoint(live):
        cls = (live.get("spec") or {}).get("gatewayClassName")
        raise WaypointError(f"gateway {meta['namespace']}/{meta['name']} exists and is not a waypoint "
                            f"(gatewayClassName {cls!r}); choose another --name")
    if live is None:
        try:
            return await client.create(desired)
        except ApiError as exc:
            if exc.code == 404:
                raise WaypointError("missing Kubernetes Gateway CRDs need to be installed before applying a "
                                    f"waypoint: {exc.message}") from None
            if exc.code != 409:
                raise
    return await client.patch(GATEWAY, meta["name"], gateway_patch(desired), meta["namespace"])


async def wait_programmed(client: KubeClient, gateways: Sequence[Obj], timeout: float) -> tuple[list[Obj], Obj | None]:
    """Poll until every Gateway is Programmed or `timeout` passes. → (their latest versions, the first still
    not programmed, or None). A Gateway deleted meanwhile keeps its last seen version."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    latest = list(gateways)
    while True:
        for i, gw in enumerate(latest):
            if not is_programmed(gw):
                latest[i] = await get_gateway(client, gw["metadata"]["name"], gw["metadata"]["namespace"]) or gw
        pending = next((gw for gw in latest if not is_programmed(gw)), None)
        if pending is None or loop.time() >= deadline:
            return latest, pending
        await asyncio.sleep(min(POLL_INTERVAL, max(deadline - loop.time(), 0)))


async def namespace_labels(client: KubeClient, namespace: str) -> dict[str, str]:
    """The namespace's labels, or none when they cannot be read (the note they feed is only a hint)."""
    try:
        return dict((await client.get(NAMESPACE, namespace))["metadata"].get("labels") or {})
    except ApiError:
        return {}


# -- the verbs -------------------------------------------------------------------------------------
def _namespace_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-n", "--namespace", help="namespace (default: the context's, usually default)")(fn)


def _timeout_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--waypoint-timeout", default=WAIT_TIMEOUT, show_default=True,
                        help="how long --wait waits, e.g. 90s or 2m")(fn)


@click.group(name="waypoint")
def waypoint() -> None:
    """Manage waypoint proxies (Gateways of class istio-waypoint), as `istioctl waypoint` does."""


@waypoint.command()
@_namespace_option
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="name of the waypoint")
@click.option("--for", "traffic", metavar="[all|none|service|workload]",
              help="traffic the waypoint handles (label istio.io/waypoint-for; unset: service)")
@click.option("--enroll-namespace", is_flag=True, help="label the namespace istio.io/use-waypoint=NAME")
@click.option("--overwrite", is_flag=True, help="replace the namespace's existing istio.io/use-waypoint")
@click.option("-w", "--wait", is_flag=True, help="wait until the waypoint is programmed (ready)")
@_timeout_option
@click.option("-r", "--revision", help="label istio.io/rev (the local control plane has no revisions)")
@click.pass_obj
def apply(cluster: Cluster, namespace: str | None, name: str, traffic: str | None, enroll_namespace: bool,
          overwrite: bool, wait: bool, waypoint_timeout: str, revision: str | None) -> None:
    """Create or update a waypoint Gateway; optionally enroll the namespace and wait for it."""
    timeout = parse_duration(waypoint_timeout)
    desired = waypoint_gateway(name, "", traffic, revision)  # flag errors before any request

    async def go(client: KubeClient) -> None:
        ns = desired["metadata"]["namespace"] = namespace or client.config.namespace
        gw_name = desired["metadata"]["name"]
        ns_obj = await get_namespace(client, ns)
        if enroll_namespace:
            conflict = None if overwrite else enrollment_conflict(ns_obj, gw_name)
            if conflict:
                raise WaypointError(conflict)
            warning = ambient_warning(ns_obj)
            if warning:
                click.echo(warning)
        gateway = await apply_gateway(client, desired)
        click.echo(f"✅ waypoint {ns}/{gw_name} applied")
        if wait:
            _, pending = await wait_programmed(client, [gateway], timeout)
            if pending is not None:
                raise WaypointError(not_ready_message("timed out while waiting for waypoint", pending))
            click.echo(f"✅ waypoint {ns}/{gw_name} is ready!")
        if enroll_namespace:
            await client.patch(NAMESPACE, ns, {"metadata": {"labels": {LABEL_USE_WAYPOINT: gw_name}}})
            click.echo(f'✅ namespace {ns} labeled with "{LABEL_USE_WAYPOINT}: {gw_name}"')

    cluster.run(go)


@waypoint.command(name="list")
@_namespace_option
@click.option("-A", "--all-namespaces", is_flag=True, help="list waypoints in all namespaces")
@click.pass_obj
def list_(cluster: Cluster, namespace: str | None, all_namespaces: bool) -> None:
    """List waypoints: NAME, REVISION, TRAFFIC TYPE, PROGRAMMED."""

    async def go(client: KubeClient) -> None:
        ns = None if all_namespaces else (namespace or client.config.namespace)
        gateways = await list_waypoints(client, ns)
        if not gateways:
            if ns is not None:
                await check_namespace(client, ns)
            click.echo("No waypoints found.")
            return
        click.echo(list_table(gateways, all_namespaces=all_namespaces))

    cluster.run(go)


@waypoint.command()
@_namespace_option
@click.option("--name", help="only this waypoint (default: every waypoint in the namespace)")
@click.option("-w", "--wait", is_flag=True, help="wait until the waypoints are programmed, then show them")
@_timeout_option
@click.pass_obj
def status(cluster: Cluster, namespace: str | None, name: str | None, wait: bool, waypoint_timeout: str) -> None:
    """Show each waypoint's condition (Programmed, or Accepted when it was not accepted)."""
    timeout = parse_duration(waypoint_timeout)

    async def go(client: KubeClient) -> None:
        ns = namespace or client.config.namespace
        gateways = await list_waypoints(client, ns)
        if name:
            gateways = [gw for gw in gateways if gw["metadata"]["name"] == name]
            if not gateways:
                await check_namespace(client, ns)
                raise WaypointError(f"waypoint {ns}/{name} not found")
        if not gateways:
            await check_namespace(client, ns)
            click.echo("No waypoints found.")
            return
        pending = None
        if wait:
            gateways, pending = await wait_programmed(client, gateways, timeout)
        click.echo(status_table(gateways))
        if pending is not None:
            raise WaypointError(not_ready_message("timed out while retrieving status for waypoint", pending))

    cluster.run(go)


@waypoint.command()
@click.argument("names", nargs=-1)
@_namespace_option
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="the waypoint to delete when no NAMES are given")
@click.option("--all", "all_", is_flag=True, help="delete every waypoint in the namespace")
@click.option("-r", "--revision", help="delete the waypoints labelled istio.io/rev=REVISION")
@click.pass_obj
def delete(cluster: Cluster, names: tuple[str, ...], namespace: str | None, name: str, all_: bool,
           revision: str | None) -> None:
    """Delete waypoints by name (default: --name), --all, or --revision. The namespace's
    istio.io/use-waypoint label stays, as with istioctl: re-applying the waypoint re-enables it."""
    if (all_ or revision) and names:
        raise WaypointError("cannot specify waypoint names when deleting all waypoints")

    async def go(client: KubeClient) -> None:
        ns = namespace or client.config.namespace
        selector = f"{LABEL_REVISION}={revision}" if revision else None
        existing = await list_waypoints(client, ns, selector)
        if not existing:
            await check_namespace(client, ns)
        if all_ or revision:
            victims = [gw["metadata"]["name"] for gw in existing]
            if not victims:
                click.echo("No waypoints found.")
        else:
            known = {gw["metadata"]["name"] for gw in existing}
            victims = []
            for wanted in dict.fromkeys(names or (name,)):
                if wanted in known:
                    victims.append(wanted)
                else:
                    click.echo(f"waypoint {ns}/{wanted} not found")
        failed = False
        deleted = []
        for victim in victims:
            try:
                await client.delete(GATEWAY, victim, ns)
            except ApiError as exc:
                if exc.code == 404:
                    click.echo(f"waypoint {ns}/{victim} not found")
                    continue
                click.echo(f"Error from server ({exc.reason}): {exc.message}", err=True)
                failed = True
                continue
            click.echo(f"waypoint {ns}/{victim} deleted")
            deleted.append(victim)
        if deleted:
            enrolled = (await namespace_labels(client, ns)).get(LABEL_USE_WAYPOINT)
            if enrolled in deleted:
                click.echo(f"note: namespace {ns} still has {LABEL_USE_WAYPOINT}={enrolled}, so its traffic goes "
                           f"direct until a waypoint {enrolled!r} exists again; to unenroll: "
                           f"`ambientctl label namespace {ns} {LABEL_USE_WAYPOINT}-`", err=True)
        if failed:
            raise WaypointError("some waypoints could not be deleted (see above)")

    cluster.run(go)


def register(cli_group: click.Group) -> None:
    """Add `waypoint` to ambientctl."""
    cli_group.add_command(waypoint)
