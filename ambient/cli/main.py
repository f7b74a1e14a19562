"""`ambientctl`: the local cluster's lifecycle (up/down/status) and kubectl-like verbs.

The Kubernetes verbs work against any API server (the local one by default, or `--kubeconfig`); `up`,
`down`, `exec` and `logs` of pods are local-only. Output and exit codes follow kubectl: errors from the
server print as `Error from server (Reason): message` and exit 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from ambient.cli import install, manifests, waypoint, ztunnel_config
from ambient.cli.errors import CliError
from ambient.cli.printers import table
from ambient.kube.client import KubeClient, KubeConfig, KubeConfigError
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable, ResourceType
from ambient.local.layout import DEFAULT_STATE_DIR, StateDir, pod_netns_name

Obj = dict[str, Any]
T = TypeVar("T")
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
TYPES = ResourceTable()
POD = TYPES.require("pods")


class Context:
    def __init__(self, kubeconfig: str | None, state_dir: str | None, namespace: str | None) -> None:
        self.kubeconfig_flag = kubeconfig
        self.state_dir_flag = state_dir
        self.namespace_flag = namespace

    @property
    def state(self) -> StateDir:
        if self.state_dir_flag:
            return StateDir(Path(self.state_dir_flag).resolve())
        from ambient.local.cluster import current_state_dir

        return StateDir(current_state_dir() or DEFAULT_STATE_DIR)

    def kubeconfig(self) -> KubeConfig:
        if self.kubeconfig_flag:
            return KubeConfig.load(self.kubeconfig_flag)
        if not self.state_dir_flag and os.environ.get("KUBECONFIG"):
            return KubeConfig.load()
        local = self.state.kubeconfig
        if local.exists():
            return KubeConfig.load(local)
        return KubeConfig.load()

    def namespace(self, config: KubeConfig | None = None) -> str:
        return self.namespace_flag or (config.namespace if config else "default")

    def run(self, fn: Callable[[KubeClient], Awaitable[T]]) -> T:
        try:
            config = self.kubeconfig()
        except KubeConfigError as exc:
            raise CliError(str(exc)) from None

        async def go() -> T:
            async with KubeClient(config) as client:
                return await fn(client)

        try:
            return asyncio.run(go())
        except ApiError as exc:
            if exc.code == 401:  # kubectl's words, plus where to look
                raise CliError(f"You must be logged in to the server (Unauthorized): {config.server} refused the "
                               "credentials of the kubeconfig's current context") from None
            click.echo(f"Error from server ({exc.reason}): {exc.message}", err=True)
            sys.exit(1)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--kubeconfig", envvar=None, help="kubeconfig file (default: the local cluster's, then $KUBECONFIG)")
@click.option("--state-dir", envvar="AMBIENT_STATE_DIR", help=f"local cluster state dir (default {DEFAULT_STATE_DIR})")
@click.pass_context
def cli(ctx: click.Context, kubeconfig: str | None, state_dir: str | None) -> None:
    """Istio ambient in Python: a local cluster and kubectl-like verbs."""
    ctx.obj = Context(kubeconfig, state_dir, None)


def namespace_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-n", "--namespace", help="namespace (default: the context's, usually default)")(fn)


# -- local cluster lifecycle ---------------------------------------------------------------------------
@cli.command()
@click.option("--nodes", default=1, show_default=True, help="number of simulated nodes")
@pass_ctx
def up(ctx: Context, nodes: int) -> None:
    """Bring up the local cluster (idempotent)."""
    from ambient.local.cluster import ClusterError
    from ambient.local.cluster import up as cluster_up

    started = time.monotonic()
    state_dir = Path(ctx.state_dir_flag) if ctx.state_dir_flag else DEFAULT_STATE_DIR
    try:
        info = cluster_up(state_dir, nodes)
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"local cluster up in {time.monotonic() - started:.1f}s")
    click.echo(f"  API server:  {info.api}")
    click.echo(f"  kubeconfig:  {info.kubeconfig}")
    click.echo(f"  state dir:   {info.state_dir}  (logs in {info.state_dir / 'logs'})")
    for node in info.nodes:
        click.echo(f"  node {node.name}: IP {node.ip}, pod CIDR {node.pod_cidr}, netns {node.netns}")


@cli.command()
@pass_ctx
def down(ctx: Context) -> None:
    """Stop the local cluster and remove everything it created."""
    from ambient.local import network
    from ambient.local.cluster import ClusterError
    from ambient.local.cluster import down as cluster_down

    try:
        removed = cluster_down(ctx.state.root)
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    for item in removed:
        click.echo(f"removed {item}")
    left = network.leftovers()
    if left:
        raise CliError(f"still present after down: {', '.join(left)}")
    click.echo("local cluster is down")


@cli.command()
@pass_ctx
def status(ctx: Context) -> None:
    """Show whether the local cluster is up and where its parts are."""
    from ambient.local import procs
    from ambient.local.cluster import running

    state = ctx.state
    if not running(state):
        click.echo(f"local cluster is not running (state dir {state.root})")
        sys.exit(1)
    config = json.loads(state.config.read_text())
    proc = procs.recorded_process(state.supervisor_pid)
    click.echo(f"local cluster is running (supervisor pid {proc.pid if proc else '?'})")
    click.echo(f"  state dir:   {state.root}")
    click.echo(f"  kubeconfig:  {state.kubeconfig}")

    async def show(client: KubeClient) -> None:
        node_rt = TYPES.require("nodes")
        nodes = (await client.list(node_rt))["items"]
        pods = (await client.list(POD))["items"]
        click.echo(table(nodes, "Node", wide=True, with_namespace=False))
        click.echo(f"{len(pods)} pod(s) in {len({p['metadata']['namespace'] for p in pods})} namespace(s); "
                   f"{len(config['nodes'])} node(s) configured")

    ctx.run(show)


# -- resolution helpers --------------------------------------------------------------------------------
async def resolve_kind(client: KubeClient, name: str) -> ResourceType:
    rt = client.types.resolve(name)
    if rt is None:
        # A custom kind the table does not know: ask discovery once.
        for gv in await _group_versions(client):
            await client.resource(gv, "_")
        rt = client.types.resolve(name)
    if rt is None:
        raise CliError(f'the server doesn\'t have a resource type "{name}"')
    return rt


async def _group_versions(client: KubeClient) -> list[str]:
    groups = await client.request("GET", "/apis")
    return [v["groupVersion"] for g in groups.get("groups", []) for v in g.get("versions", [])]


def split_targets(args: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """`pods a b` → [(pods, a), (pods, b)]; `pod/a svc/b` → [(pod, a), (svc, b)]; `pods` → [(pods, None)]."""
    if not args:
        raise CliError("you must specify the type of resource")
    if "/" in args[0]:
        out: list[tuple[str, str | None]] = []
        for arg in args:
            kind, _, name = arg.partition("/")
            if not name:
                raise CliError(f"there is no need to specify a resource type as a separate argument when passing "
                               f"arguments in resource/name form: {arg}")
            out.append((kind, name))
        return out
    kinds = args[0].split(",")
    names = args[1:]
    return [(k, n) for k in kinds for n in names] if names else [(k, None) for k in kinds]


async def find_pod(client: KubeClient, target: str, namespace: str) -> Obj:
    """A pod by name, or the first running pod of `deploy/NAME` / `deployment/NAME` / `svc/NAME`."""
    kind, _, name = target.rpartition("/")
    if kind in ("", "pod", "pods", "po"):
        return await client.get(POD, name, namespace)
    rt = await resolve_kind(client, kind)
    owner = await client.get(rt, name, namespace)
    spec = owner.get("spec", {})
    selector = spec.get("selector") or {}
    labels = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    if not labels:
        raise CliError(f"{kind}/{name} has no selector to find its pods by")
    label_selector = ",".join(f"{k}={v}" for k, v in labels.items())
    pods = (await client.list(POD, namespace, label_selector))["items"]
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"
               and not p["metadata"].get("deletionTimestamp")]
    if not running:
        raise CliError(f"no running pod found for {target} in namespace {namespace}")
    first: Obj = sorted(running, key=lambda p: p["metadata"]["name"])[0]
    return first


# -- apply / delete ------------------------------------------------------------------------------------
def _resource_label(rt: ResourceType, name: str) -> str:
    return f"{rt.kind.lower()}{'.' + rt.group if rt.group else ''}/{name}"


def _removal_patch(last: Any, new: Any) -> Any:
    """A merge patch turning `last` into `new` for keys the user removed (null) — the part of kubectl's
    three-way merge that a plain merge patch of `new` would miss."""
    if not isinstance(last, dict) or not isinstance(new, dict):
        return new
    patch = {k: (_removal_patch(last.get(k), v) if isinstance(v, dict) else v) for k, v in new.items()}
    patch.update({k: None for k in last if k not in new})
    return patch


@cli.command()
@click.option("-f", "--filename", "files", multiple=True, required=True, help="file, directory or - for stdin")
@namespace_option
@pass_ctx
def apply(ctx: Context, files: tuple[str, ...], namespace: str | None) -> None:
    """Create or update objects from manifests (all validated first; nothing applied on error)."""
    try:
        docs = manifests.load(files)
    except manifests.ManifestError as exc:
        raise CliError(str(exc)) from None

    async def go(client: KubeClient) -> None:
        ns_default = namespace or client.config.namespace
        declared_namespaces = {d.obj["metadata"]["name"] for d in docs if d.obj["kind"] == "Namespace"}
        plans = []
        for doc in docs:
            rt = await client.resource(doc.obj["apiVersion"], doc.obj["kind"])
            obj = json.loads(json.dumps(doc.obj))
            meta = obj["metadata"]
            if rt.namespaced:
                if namespace and meta.get("namespace") not in (None, namespace):
                    raise CliError(f"{doc.where}: the namespace from the provided object {meta['namespace']!r} does "
                                   f"not match the namespace {namespace!r}. You must pass '--namespace="
                                   f"{meta['namespace']}' to perform this operation.")
                meta["namespace"] = meta.get("namespace") or ns_default
            # Dry-run every document first, so that one bad document applies nothing.
            try:
                try:
                    live = await client.get(rt, meta["name"], meta.get("namespace"))
                except ApiError as exc:
                    if exc.code != 404:
                        raise
                    live = None
                if live is None:
                    await client.create(obj, dry_run=True)
                else:
                    await client.patch(rt, meta["name"], _apply_patch(live, obj), meta.get("namespace"), dry_run=True)
            except ApiError as exc:
                pending_ns = exc.code == 404 and meta.get("namespace") in declared_namespaces
                if not pending_ns:
                    raise CliError(f"{doc.where}: {exc.message}") from None
                live = None
            plans.append((rt, obj, live))
        for rt, obj, live in plans:
            meta = obj["metadata"]
            label = _resource_label(rt, meta["name"])
            if live is None:
                body = json.loads(json.dumps(obj))
                body["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(obj, sort_keys=True)
                await client.create(body)
                click.echo(f"{label} created")
                continue
            patch = _apply_patch(live, obj)
            if (live["metadata"].get("annotations") or {}).get(LAST_APPLIED) == json.dumps(obj, sort_keys=True):
                click.echo(f"{label} unchanged")
                continue
            await client.patch(rt, meta["name"], patch, meta.get("namespace"))
            click.echo(f"{label} configured")

    ctx.run(go)


def _apply_patch(live: Obj, obj: Obj) -> Obj:
    last_text = (live["metadata"].get("annotations") or {}).get(LAST_APPLIED)
    last = json.loads(last_text) if last_text else {}
    patch: Obj = _removal_patch({k: v for k, v in last.items() if k != "status"}, obj)
    # Fresh dicts: the patch may share them with `obj`, and `annotations` is None when all were removed.
    meta = patch["metadata"] = dict(patch.get("metadata") or {})
    removed = dict.fromkeys((last.get("metadata") or {}).get("annotations") or {})
    meta["annotations"] = {**removed, **(meta.get("annotations") or {}), LAST_APPLIED: json.dumps(obj, sort_keys=True)}
    return patch


async def _wait_gone(client: KubeClient, rt: ResourceType, name: str, namespace: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await client.get(rt, name, namespace)
        except ApiError as exc:
            if exc.code == 404:
                return
            raise
        await asyncio.sleep(0.1)
    raise CliError(f"timed out waiting for {rt.plural}/{name} to be deleted")


@cli.command()
@click.argument("targets", nargs=-1)
@click.option("-f", "--filename", "files", multiple=True, help="file, directory or -")
@click.option("-l", "--selector", help="label selector")
@click.option("--all", "all_", is_flag=True, help="all objects of the kind in the namespace")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until the objects are gone")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for deletion")
@click.option("--ignore-not-found", is_flag=True)
@namespace_option
@pass_ctx
def delete(ctx: Context, targets: tuple[str, ...], files: tuple[str, ...], selector: str | None, all_: bool,
           wait: bool, timeout: float, ignore_not_found: bool, namespace: str | None) -> None:
    """Delete objects by manifest, by kind and name, or by selector."""
    try:
        docs = manifests.load(files) if files else []
    except manifests.ManifestError as exc:
        raise CliError(str(exc)) from None

    async def go(client: KubeClient) -> None:
        ns = namespace or client.config.namespace
        victims: list[tuple[ResourceType, str, str | None]] = []
        for doc in docs:
            rt = await client.resource(doc.obj["apiVersion"], doc.obj["kind"])
            victims.append((rt, doc.obj["metadata"]["name"], doc.obj["metadata"].get("namespace", ns)))
        if targets:
            for kind, name in split_targets(targets):
                rt = await resolve_kind(client, kind)
                if name:
                    victims.append((rt, name, ns))
                elif selector or all_:
                    for item in (await client.list(rt, ns if rt.namespaced else None, selector))["items"]:
                        victims.append((rt, item["metadata"]["name"], ns))
                else:
                    raise CliError("resource(s) were provided, but no name was specified; use --all or -l")
        if not victims and not files:
            raise CliError("you must specify the type of resource and a name, -l, --all or -f")
        failed = False
        deleted = []
        for rt, name, obj_ns in victims:
            try:
                await client.delete(rt, name, obj_ns if rt.namespaced else None)
            except ApiError as exc:
                if exc.code == 404 and ignore_not_found:
                    continue
                click.echo(f"Error from server ({exc.reason}): {exc.message}", err=True)
                failed = True
                continue
            label = f"{rt.kind.lower()}{'.' + rt.group if rt.group else ''}"
            click.echo(f'{label} "{name}" deleted')
            deleted.append((rt, name, obj_ns if rt.namespaced else None))
        if wait:
            for rt, name, obj_ns in deleted:
                await _wait_gone(client, rt, name, obj_ns, timeout)
        if failed:
            sys.exit(1)

    ctx.run(go)


# -- get -----------------------------------------------------------------------------------------------
@cli.command()
@click.argument("targets", nargs=-1)
@click.option("-o", "--output", type=click.Choice(["wide", "yaml", "json", "name"]), help="output format")
@click.option("-A", "--all-namespaces", is_flag=True)
@click.option("-l", "--selector", help="label selector, e.g. app=web,version!=v1")
@click.option("--field-selector", help="field selector, e.g. spec.nodeName=node-1")
@namespace_option
@pass_ctx
def get(ctx: Context, targets: tuple[str, ...], output: str | None, all_namespaces: bool, selector: str | None,
        field_selector: str | None, namespace: str | None) -> None:
    """List or show objects."""
    expanded = []
    for kind, name in split_targets(targets):
        if kind == "all":
            expanded += [(k, name) for k in ("pods", "services", "deployments", "replicasets")]
        else:
            expanded.append((kind, name))

    async def go(client: KubeClient) -> None:
        ns = None if all_namespaces else (namespace or client.config.namespace)
        groups: list[tuple[ResourceType, list[Obj]]] = []
        missing = False
        for kind, name in expanded:
            rt = await resolve_kind(client, kind)
            if name:
                try:
                    items = [await client.get(rt, name, ns if rt.namespaced else None)]
                except ApiError as exc:
                    click.echo(f"Error from server ({exc.reason}): {exc.message}", err=True)
                    missing = True
                    continue
            else:
                items = (await client.list(rt, ns if rt.namespaced else None, selector, field_selector))["items"]
                for item in items:
                    item.setdefault("apiVersion", rt.api_version)
                    item.setdefault("kind", rt.kind)
            groups.append((rt, items))
        everything = [item for _, items in groups for item in items]
        if output in ("yaml", "json"):
            doc: Obj = everything[0] if len(everything) == 1 and any(n for _, n in expanded) else {
                "apiVersion": "v1", "kind": "List", "items": everything, "metadata": {"resourceVersion": ""}}
            text = json.dumps(doc, indent=4) + "\n" if output == "json" else yaml.safe_dump(doc, sort_keys=False)
            click.echo(text, nl=False)
        elif output == "name":
            for rt, items in groups:
                for item in items:
                    click.echo(_resource_label(rt, item["metadata"]["name"]))
        elif not everything:
            if not missing:
                where = "" if all_namespaces or not any(rt.namespaced for rt, _ in groups) else f" in {ns} namespace"
                click.echo(f"No resources found{where}.", err=True)
        else:
            several = len([g for g in groups if g[1]]) > 1
            blocks = []
            for rt, items in groups:
                if items:
                    blocks.append(table(items, rt.kind, wide=output == "wide",
                                        with_namespace=all_namespaces and rt.namespaced,
                                        show_kind=_resource_label(rt, "").rstrip("/") if several else ""))
            click.echo("\n\n".join(blocks))
        if missing:
            sys.exit(1)

    ctx.run(go)


# -- label / annotate ----------------------------------------------------------------------------------
def _metadata_verb(field: str, past: str) -> Callable[..., None]:
    @click.argument("args", nargs=-1, required=True)
    @click.option("--overwrite", is_flag=True, help="allow changing an existing value")
    @namespace_option
    @pass_ctx
    def command(ctx: Context, args: tuple[str, ...], overwrite: bool, namespace: str | None) -> None:
        changes = [a for a in args if "=" in a or a.endswith("-")]
        objects = [a for a in args if a not in changes]
        if not changes:
            raise CliError(f"at least one {field[:-1]} update is required")
        updates: dict[str, str | None] = {}
        for change in changes:
            if change.endswith("-") and "=" not in change:
                updates[change[:-1]] = None
            else:
                key, _, value = change.partition("=")
                updates[key] = value

        async def go(client: KubeClient) -> None:
            ns = namespace or client.config.namespace
            for kind, name in split_targets(tuple(objects)):
                if not name:
                    raise CliError("a resource name is required")
                rt = await resolve_kind(client, kind)
                obj_ns = ns if rt.namespaced else None
                live = await client.get(rt, name, obj_ns)
                current = live["metadata"].get(field) or {}
                for key, value in updates.items():
                    if value is not None and key in current and current[key] != value and not overwrite:
                        raise CliError(f"'{key}' already has a value ({current[key]}), and --overwrite is false")
                if all(current.get(k) == v for k, v in updates.items()):
                    click.echo(f"{_resource_label(rt, name)} not {past}")
                    continue
                await client.patch(rt, name, {"metadata": {field: updates}}, obj_ns)
                click.echo(f"{_resource_label(rt, name)} {past}")

        ctx.run(go)

    return command


cli.command(name="label", help="Add (key=value) or remove (key-) labels.")(_metadata_verb("labels", "labeled"))
cli.command(name="annotate", help="Add (key=value) or remove (key-) annotations.")(
    _metadata_verb("annotations", "annotated"))


# -- exec / logs / wait --------------------------------------------------------------------------------
@cli.command(name="exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-c", "--container", help="ignored: all containers of a pod share its network namespace")
@click.option("-i", "--stdin", is_flag=True, help="accepted for kubectl compatibility (stdin is always passed)")
@click.option("-t", "--tty", is_flag=True, help="accepted for kubectl compatibility")
@namespace_option
@pass_ctx
def exec_(ctx: Context, pod: str, command: tuple[str, ...], container: str | None, stdin: bool, tty: bool,
          namespace: str | None) -> None:
    """Run a command in a pod's network namespace, with its resolv.conf: `exec POD -- CMD ARGS`."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("you must specify at least one command for the container")
    target = ctx.run(lambda client: find_pod(client, pod, namespace or client.config.namespace))
    if target.get("spec", {}).get("hostNetwork"):
        raise CliError("exec into hostNetwork pods is not supported by the local cluster")
    netns = pod_netns_name(target["metadata"]["uid"])
    if not Path(f"/run/netns/{netns}").exists():
        phase = target.get("status", {}).get("phase")
        raise CliError(f"pod {target['metadata']['name']} has no network namespace on this machine (phase {phase}); "
                       "exec works for running pods of the local cluster")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    os.execvpe("ip", ["ip", "netns", "exec", netns, *command], env)


@cli.command()
@click.argument("target")
@click.option("-c", "--container", help="container name (default: the first)")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.option("--tail", default=-1, help="lines from the end to show (-1: all)")
@namespace_option
@pass_ctx
def logs(ctx: Context, target: str, container: str | None, follow: bool, tail: int, namespace: str | None) -> None:
    """Print a pod's container log, or a local cluster component's (supervisor, kubelet-node-1, ...)."""
    state = ctx.state
    component = state.logs / f"{target}.log"
    if component.exists() and "/" not in target:
        path = component
    else:
        pod = ctx.run(lambda client: find_pod(client, target, namespace or client.config.namespace))
        meta = pod["metadata"]
        names = [c["name"] for c in pod["spec"]["containers"]]
        name = container or names[0]
        if name not in names:
            raise CliError(f"container {name} is not valid for pod {meta['name']}; choose one of: {names}")
        node = pod["spec"].get("nodeName")
        if not node:
            raise CliError(f"pod {meta['name']} is not scheduled yet")
        path = state.pod_dir(node, meta["namespace"], meta["name"], meta["uid"]) / f"{name}.log"
        if not path.exists():
            raise CliError(f'container "{name}" in pod "{meta["name"]}" is waiting to start')
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    sys.stdout.write("".join(lines[-tail:] if tail >= 0 else lines))
    sys.stdout.flush()
    if follow:
        with path.open(errors="replace") as fh:
            fh.seek(0, os.SEEK_END)
            try:
                while True:
                    line = fh.readline()
                    if line:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    else:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                pass


def _condition_met(obj: Obj, condition: str) -> bool:
    wanted = condition.lower()
    value = "true"
    if "=" in wanted:
        wanted, _, value = wanted.partition("=")
    return any(c.get("type", "").lower() == wanted and c.get("status", "").lower() == value
               for c in obj.get("status", {}).get("conditions") or [])


@cli.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("--for", "for_", required=True, help="condition=NAME[=value] or delete")
@click.option("--all", "all_", is_flag=True, help="all objects of the kind in the namespace")
@click.option("-l", "--selector", help="label selector")
@click.option("--timeout", default="30s", show_default=True, help="e.g. 60s, 2m")
@namespace_option
@pass_ctx
def wait(ctx: Context, targets: tuple[str, ...], for_: str, all_: bool, selector: str | None, timeout: str,
         namespace: str | None) -> None:
    """Wait for a condition on objects: `wait --for=condition=ready pod --all -n NS --timeout=60s`."""
    seconds = _duration(timeout)
    if for_ != "delete" and not for_.startswith("condition="):
        raise CliError("--for must be condition=NAME[=value] or delete")
    condition = for_.removeprefix("condition=")

    async def go(client: KubeClient) -> None:
        ns = namespace or client.config.namespace
        deadline = time.monotonic() + seconds
        pending: list[tuple[ResourceType, str]] = []
        for kind, name in split_targets(targets):
            rt = await resolve_kind(client, kind)
            if name:
                pending.append((rt, name))
            elif all_ or selector:
                items = (await client.list(rt, ns if rt.namespaced else None, selector))["items"]
                if not items:
                    raise CliError("no matching resources found")
                pending += [(rt, i["metadata"]["name"]) for i in items]
            else:
                raise CliError("resource(s) were provided, but no name was specified; use --all or -l")
        while pending:
            still = []
            for rt, name in pending:
                try:
                    obj = await client.get(rt, name, ns if rt.namespaced else None)
                    done = for_ != "delete" and _condition_met(obj, condition)
                except ApiError as exc:
                    if exc.code != 404:
                        raise
                    if for_ != "delete":
                        raise
                    done = True
                if done:
                    click.echo(f"{_resource_label(rt, name)} condition met")
                else:
                    still.append((rt, name))
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    names = ", ".join(f"{rt.plural}/{n}" for rt, n in pending)
                    raise CliError(f"timed out waiting for the condition on {names}")
                await asyncio.sleep(0.2)

    ctx.run(go)


def _duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * units[suffix]
    if text.replace(".", "", 1).isdigit():
        return float(text)
    raise CliError(f"invalid --timeout {text!r}: use a duration such as 30s or 2m")


ztunnel_config.register(cli)
waypoint.register(cli)
install.register(cli)


def main() -> None:
    cli(prog_name="ambientctl")
