"""`ambientctl up / down / status` for the local cluster.

`up` prepares the state directory (PKI, token, kubeconfig, per-node CNI config), builds the network and
starts the supervisor in the background, then waits until the API answers and every node is Ready.
`down` stops the supervisor (which stops kubelets and pods), sweeps anything left — recorded processes,
pod and node namespaces, links, rules — and removes the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable
from ambient.local import network, pki, procs
from ambient.local.kubelet import kill_recorded
from ambient.local.layout import API_PORT, CURRENT_POINTER, StateDir

AGENT_HEALTH_PORT = 8000  # the CNI node agent's /readyz (PROTOCOLS §1)
CONTROL_MONITORING_PORT = 15014  # ambient-control's /ready and /debug/xds
UP_TIMEOUT = 60.0  # seconds for the API server and all nodes to be ready
SUPERVISOR_STOP_TIMEOUT = 60.0


class ClusterError(Exception):
    """Bringing the cluster up or down failed; the message says what to do."""


@dataclass(frozen=True)
class ClusterInfo:
    state_dir: Path
    api: str
    kubeconfig: Path
    nodes: list[network.NodeNet]
    supervisor_pid: int | None


def conflist(state: StateDir, node: network.NodeNet) -> dict[str, object]:
    """The node's CNI chain: the reference bridge + host-local plugins (later issues append istio-cni)."""
    return {
        "cniVersion": "1.0.0",
        "name": "ambient-local",
        "plugins": [{
            "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": node.pod_cidr}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(state.node(node.name) / "ipam")},
        }],
    }


def _kubeconfig(state: StateDir, token: str) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "ambient-local",
        "clusters": [{"name": "ambient-local", "cluster": {
            "server": f"https://{network.HOST_IP}:{API_PORT}", "certificate-authority": str(state.pki / "ca.crt")}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "ambient-local", "context": {"cluster": "ambient-local", "user": "admin",
                                                             "namespace": "default"}}],
    }


def _write_bootstrap_tokens(state: StateDir, nodes: list[network.NodeNet]) -> None:
    """One token per node for its ztunnel: a node proxy of that node (PROTOCOLS §5: it may ask for the
    identities of pods scheduled there). ambient-control reads the file; each ztunnel reads its token."""
    tokens: dict[str, dict[str, object]] = {}
    for node in nodes:
        path = state.node_token(node.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        tokens[path.read_text().strip()] = {"namespace": "istio-system", "serviceAccount": "ztunnel",
                                            "node": node.name, "nodeProxy": True}
    state.bootstrap_tokens.write_text(json.dumps(tokens, indent=2))
    state.bootstrap_tokens.chmod(0o600)


def current_state_dir() -> Path | None:
    try:
        return Path(CURRENT_POINTER.read_text().strip())
    except OSError:
        return None


def running(state: StateDir) -> bool:
    return procs.recorded_process(state.supervisor_pid) is not None


def up(state_dir: Path, node_count: int) -> ClusterInfo:
    if os.geteuid() != 0:
        raise ClusterError("ambientctl up needs root: it creates network namespaces, links and iptables rules")
    for tool in ("ip", "iptables", "nsenter"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool!r} is not installed; run scripts/setup.sh")
    if not Path("/usr/lib/cni/bridge").exists() and not Path("/opt/cni/bin/bridge").exists():
        raise ClusterError("the reference CNI plugins are missing; install containernetworking-plugins "
                           "(scripts/setup.sh does)")
    state = StateDir(state_dir.resolve())
    with _host_lock():
        _start(state, node_count)
    return _wait_ready(state)


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """One `up` at a time on this host: between seeing no other cluster running and recording ours there is
    network setup, and a second `up` in that window would build a clashing cluster on the same addresses."""
    CURRENT_POINTER.parent.mkdir(parents=True, exist_ok=True)
    with (CURRENT_POINTER.parent / "up.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start(state: StateDir, node_count: int) -> None:
    """Start the cluster of `state` unless it runs already; the caller holds the host lock."""
    other = current_state_dir()
    if other and other != state.root and running(StateDir(other)):
        raise ClusterError(f"another local cluster is running with state dir {other}; "
                           f"run `ambientctl down --state-dir {other}` first")
    if running(state):
        config = json.loads(state.config.read_text())
        if len(config["nodes"]) != node_count:
            print(f"cluster already up with {len(config['nodes'])} node(s); `ambientctl down` to change --nodes",
                  file=sys.stderr)
        return
    nodes = network.nodes(node_count)
    state.root.mkdir(parents=True, exist_ok=True)
    state.config.write_text(json.dumps({"nodes": [n.index for n in nodes]}))
    pki.ensure_apiserver_certs(state.pki, ["127.0.0.1", network.HOST_IP, network.KUBERNETES_SERVICE_IP],
                               ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                "kubernetes.default.svc.cluster.local"])
    if not state.token_file.exists():
        state.token_file.write_text(secrets.token_urlsafe(32))
        state.token_file.chmod(0o600)
    # JSON is valid YAML for every client, and the CNI plugin reads it without loading a YAML parser.
    state.kubeconfig.write_text(json.dumps(_kubeconfig(state, state.token_file.read_text().strip()), indent=2))
    state.kubeconfig.chmod(0o600)
    for node in nodes:
        conf_dir = state.cni_conf_dir(node.name)
        conf_dir.mkdir(parents=True, exist_ok=True)
        state.cni_bin_dir(node.name).mkdir(parents=True, exist_ok=True)
        target = conf_dir / "10-ambient-local.conflist"
        if not target.exists():
            target.write_text(json.dumps(conflist(state, node), indent=2))
    _write_bootstrap_tokens(state, nodes)
    network.setup(nodes, state.root)
    state.logs.mkdir(parents=True, exist_ok=True)
    with (state.logs / "supervisor.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ambient.local.supervisor", "--state-dir", str(state.root)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    procs.record(state.supervisor_pid, proc.pid)
    CURRENT_POINTER.parent.mkdir(parents=True, exist_ok=True)
    CURRENT_POINTER.write_text(str(state.root))


def _wait_ready(state: StateDir) -> ClusterInfo:
    config = json.loads(state.config.read_text())
    nodes = [network.NodeNet(i) for i in config["nodes"]]
    deadline = time.monotonic() + UP_TIMEOUT

    async def ready() -> str:
        node_rt = ResourceTable().require("nodes")
        last = "API server not answering yet"
        async with KubeClient(KubeConfig.load(state.kubeconfig)) as client:
            while time.monotonic() < deadline:
                if not running(state):
                    return "the supervisor exited"
                try:
                    items = (await client.list(node_rt))["items"]
                    ready_nodes = {n["metadata"]["name"] for n in items if any(  # a new node has no status yet
                        c["type"] == "Ready" and c["status"] == "True"
                        for c in (n.get("status") or {}).get("conditions", []))}
                    missing = [n.name for n in nodes if n.name not in ready_nodes]
                    agents = [n.name for n in nodes if not await _http_ready(n.ip, AGENT_HEALTH_PORT, "/readyz")]
                    control = await _http_ready(network.HOST_IP, CONTROL_MONITORING_PORT, "/ready")
                    if not missing and not agents and control:
                        return ""
                    last = (f"nodes not ready: {', '.join(missing)}" if missing else
                            f"CNI agents not ready on: {', '.join(agents)}" if agents else
                            "ambient-control not ready")
                except ApiError as exc:
                    last = str(exc)
                await asyncio.sleep(0.1)
        return last

    problem = asyncio.run(ready())
    if problem:
        raise ClusterError(f"cluster did not come up in {UP_TIMEOUT:.0f}s: {problem}; see {state.logs}/")
    record = procs.recorded_process(state.supervisor_pid)
    return ClusterInfo(state.root, f"https://{network.HOST_IP}:{API_PORT}", state.kubeconfig, nodes,
                       record.pid if record else None)


async def _http_ready(host: str, port: int, path: str) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 1)).startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def down(state_dir: Path) -> list[str]:
    """Stop and remove everything; returns what was removed. Safe to run twice or after a crash."""
    if os.geteuid() != 0:
        raise ClusterError("ambientctl down needs root")
    state = StateDir(state_dir.resolve())
    removed: list[str] = []
    if procs.stop(state.supervisor_pid, SUPERVISOR_STOP_TIMEOUT):
        removed.append("supervisor")
    for pid_file in sorted((state.root / "pids").glob("*.json")):
        if procs.stop(pid_file, 10):
            removed.append(f"process {pid_file.stem}")
    # Whatever pods the kubelets could not stop: their processes and namespaces.
    for record_path in state.root.glob("nodes/*/pods/*/sandbox.json"):
        record = json.loads(record_path.read_text())
        kill_recorded(record)
        netns = record.get("netns")
        if netns and network.netns_exists(netns):
            network.run("ip", "netns", "del", netns, check=False)
            removed.append(f"netns {netns}")
        if netns:
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
    removed += network.teardown(state.root)
    if state.root.exists():
        shutil.rmtree(state.root)
        removed.append(f"state dir {state.root}")
    if current_state_dir() == state.root:
        CURRENT_POINTER.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            CURRENT_POINTER.parent.rmdir()
    return removed
