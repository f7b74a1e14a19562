"""The local cluster's control process: API server, controllers and cluster DNS in one event loop, plus
one kubelet per simulated node as a supervised child process (restarted with backoff if it dies).

Each node's ztunnel is one of those processes, not a pod; the supervisor shows it to the API as a kubelet
shows a static pod, with a mirror pod `istio-system/ztunnel-<node>` (`ZtunnelMirrors`), so that whatever
finds ztunnels on a real cluster (the DaemonSet's labels, the pod on a node, its pods/proxy) finds them here.

Started in the background by `ambientctl up`; `ambientctl down` sends it SIGTERM, on which it stops the
kubelets (which stop their pods) and then itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from ambient.aio import cancel_on_signals
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.events import now_rfc3339
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable
from ambient.local import procs
from ambient.local.apiserver import ApiServer
from ambient.local.controllers import Controllers
from ambient.local.dns import ClusterDNS, ClusterZone, upstreams_from_resolv_conf
from ambient.local.kubelet import MIRROR_ANNOTATION
from ambient.local.layout import API_PORT, StateDir
from ambient.local.network import HOST_IP, KUBE_DNS_IP, KUBERNETES_SERVICE_IP, NodeNet

log = logging.getLogger("ambient.supervisor")
Obj = dict[str, Any]

DRIFT_INTERVAL = 5.0  # seconds: the local cluster's agents re-verify pod rules this often
RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a crashing child
CHILD_STOP_TIMEOUT = 40.0  # seconds a kubelet gets to stop its pods on shutdown
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease", "istio-system")
POD = ResourceTable().require("pods")
ZTUNNEL_NAMESPACE = "istio-system"
# The labels of the ztunnel DaemonSet's pods (deploy/ztunnel.yaml): `app=ztunnel` is how tools find them.
ZTUNNEL_POD_LABELS = {"app": "ztunnel", "istio.io/dataplane-mode": "none", "sidecar.istio.io/inject": "false"}
ZTUNNEL_PORTS = [{"name": "admin", "containerPort": 15000, "protocol": "TCP"},  # first: pods/proxy's default
                 {"name": "ztunnel-stats", "containerPort": 15020, "protocol": "TCP"},
                 {"name": "status-port", "containerPort": 15021, "protocol": "TCP"}]
MIRROR_RETRY = 1.0  # seconds before retrying a failed mirror pod write


def _static_service(name: str, namespace: str, ip: str, ports: list[Obj], endpoint_ports: list[Obj],
                    labels: Obj) -> list[Obj]:
    """A selector-less Service and its hand-made EndpointSlice pointing at the host (API server, DNS)."""
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace, "labels": labels},
         "spec": {"clusterIP": ip, "ports": ports}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": name, "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name,
                                 "endpointslice.kubernetes.io/managed-by": "ambient-local"}},
         "addressType": "IPv4", "ports": endpoint_ports,
         "endpoints": [{"addresses": [HOST_IP], "conditions": {"ready": True}}]},
    ]


BOOTSTRAP: list[Obj] = [
    *({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in SYSTEM_NAMESPACES),
    *_static_service("kubernetes", "default", KUBERNETES_SERVICE_IP,
                     [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": API_PORT}],
                     [{"name": "https", "port": API_PORT, "protocol": "TCP"}],
                     {"component": "apiserver", "provider": "kubernetes"}),
    *_static_service("kube-dns", "kube-system", KUBE_DNS_IP,
                     [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                      {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}],
                     [{"name": "dns", "port": 53, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
                     {"k8s-app": "kube-dns"}),
]


async def bootstrap(client: KubeClient) -> None:
    for obj in BOOTSTRAP:
        with contextlib.suppress(ApiError):  # already there from an earlier run
            await client.create(obj)


class Child:
    """A supervised child process with a PID record, log file and restart backoff."""

    def __init__(self, name: str, argv: list[str], state: StateDir) -> None:
        self.name, self.argv = name, argv
        self.log_path = state.logs / f"{name}.log"
        self.pid_path = state.root / "pids" / f"{name}.json"
        self.process: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.started_at: str | None = None  # when the current (or last) run began
        self.restarts = 0
        self.on_change: Callable[[], None] = lambda: None  # called when the process starts or exits

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def supervise(self) -> None:
        backoff = 1.0
        while not self.stopping:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as out:
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True)
            procs.record(self.pid_path, self.process.pid)
            self.restarts += self.started_at is not None
            self.started_at = now_rfc3339()
            self.on_change()
            code = await self.process.wait()
            if self.stopping:
                break
            self.on_change()
            log.error("%s exited with status %s; restarting in %.0fs (log: %s)", self.name, code, backoff,
                      self.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
        self.pid_path.unlink(missing_ok=True)

    async def stop(self) -> None:
        self.stopping = True
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), CHILD_STOP_TIMEOUT)
        except TimeoutError:
            log.error("%s did not stop in %.0fs; killing it", self.name, CHILD_STOP_TIMEOUT)
            proc.kill()
            await proc.wait()
        self.pid_path.unlink(missing_ok=True)


def control_child(state: StateDir) -> Child:
    """ambient-control on the host, reachable from every node at the host bridge address."""
    argv = [sys.executable, "-m", "ambient.control.main", "--kubeconfig", str(state.kubeconfig),
            "--listen", HOST_IP, "--serving-ip", HOST_IP, "--ca-dir", str(state.mesh_ca_dir),
            "--bootstrap-tokens", str(state.bootstrap_tokens), "--root-cert-out", str(state.mesh_root_cert),
            # Waypoint pods run our waypoint. Local-cluster-only wiring: it reads the L7 resources with the
            # cluster's kubeconfig, and asks for its certificate with the node's ztunnel token (a node proxy may
            # ask for identities of pods on its node, hence --impersonate). `$(NODE_NAME)` is the pod's env.
            "--waypoint-command", " ".join((
                sys.executable, "-m", "waypoint.main", "--name", "$(GATEWAY_NAME)", "--namespace", "$(POD_NAMESPACE)",
                "--kubeconfig", str(state.kubeconfig), "--xds-address", f"{HOST_IP}:15012",
                "--ca-address", f"{HOST_IP}:15012", "--root-cert", str(state.mesh_root_cert),
                "--token-path", str(state.node_token("$(NODE_NAME)")), "--impersonate"))]
    return Child("ambient-control", argv, state)


def node_children(state: StateDir, node: NodeNet) -> list[Child]:
    """What runs on each simulated node, inside the node's network namespace. `nsenter --net` switches
    only the network namespace: they share the host's mount namespace, so the pod namespaces the kubelet
    creates with `ip netns add` are visible to everyone."""

    def on_node(name: str, module: str, *args: str) -> Child:
        argv = ["nsenter", f"--net={node.netns_path}", "--", sys.executable, "-m", module, *args]
        return Child(f"{name}-{node.name}", argv, state)

    paths = state.node_paths(node.name)
    return [
        on_node("kubelet", "ambient.local.kubelet", "--state-dir", str(state.root), "--node-index", str(node.index)),
        on_node("cni-agent", "cni.agent", "--node-name", node.name, "--kubeconfig", str(state.kubeconfig),
                "--run-dir", str(paths.cni_run_dir), "--zds-socket", str(paths.zds_socket),
                "--listen-address", node.ip, "--kubelet-pod-dir", str(state.pods(node.name)),
                "--cni-conf-dir", str(state.cni_conf_dir(node.name)),
                "--cni-bin-dir", str(state.cni_bin_dir(node.name)),
                "--plugin-kubeconfig", str(state.kubeconfig), "--exclude-namespaces", "kube-system,istio-system",
                "--drift-interval", str(DRIFT_INTERVAL)),
        on_node("ztunnel", "ztunnel.main", "--node-name", node.name, "--node-ip", node.ip,
                "--xds-address", f"{HOST_IP}:15012", "--ca-address", f"{HOST_IP}:15012",
                "--root-cert", str(state.mesh_root_cert), "--token-path", str(state.node_token(node.name)),
                "--zds-socket", str(paths.zds_socket), "--admin-address", f"{node.ip}:15000",
                "--listen-ip", node.ip, "--dns-upstream", f"{HOST_IP}:53"),
    ]


class ZtunnelProcess(Protocol):
    """What a mirror pod shows of a node's ztunnel (a `Child`)."""

    argv: list[str]
    started_at: str | None
    restarts: int

    @property
    def running(self) -> bool: ...


def ztunnel_mirror_pod(node: NodeNet, ztunnel: ZtunnelProcess) -> Obj:
    """The mirror pod of `node`'s ztunnel, named `ztunnel-<node>` as a kubelet names a static pod's mirror,
    with the DaemonSet pod's labels, container name and ports. The mirror annotation holds a hash of the
    spec, as a kubelet's does: a mirror pod whose hash differs is outdated and gets replaced."""
    spec: Obj = {"nodeName": node.name, "hostNetwork": True, "restartPolicy": "Always",
                 "containers": [{"name": "istio-proxy", "image": "ambient-local", "command": ztunnel.argv,
                                 "ports": ZTUNNEL_PORTS}]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"ztunnel-{node.name}", "namespace": ZTUNNEL_NAMESPACE, "labels": ZTUNNEL_POD_LABELS,
                         "annotations": {MIRROR_ANNOTATION: digest, "kubernetes.io/config.hash": digest,
                                         "kubernetes.io/config.source": "file"}},
            "spec": spec}


def ztunnel_mirror_status(node: NodeNet, ztunnel: ZtunnelProcess) -> Obj:
    """The pod status a kubelet would report for the ztunnel process: Ready while it runs."""
    running = ztunnel.running
    state: Obj = {"running": {"startedAt": ztunnel.started_at}} if running and ztunnel.started_at else {
        "waiting": {"reason": "CrashLoopBackOff" if ztunnel.started_at else "ContainerCreating"}}
    ready = "True" if running else "False"
    return {
        "phase": "Running" if ztunnel.started_at else "Pending",
        "hostIP": node.ip, "hostIPs": [{"ip": node.ip}], "podIP": node.ip, "podIPs": [{"ip": node.ip}],
        "startTime": ztunnel.started_at or now_rfc3339(),
        "conditions": [{"type": kind, "status": status} for kind, status in (
            ("PodReadyToStartContainers", "True"), ("Initialized", "True"), ("ContainersReady", ready),
            ("Ready", ready), ("PodScheduled", "True"))],
        "containerStatuses": [{"name": "istio-proxy", "ready": running, "started": running,
                               "restartCount": ztunnel.restarts, "state": state, "image": "ambient-local",
                               "imageID": ""}],
        "qosClass": "BestEffort",
    }


class ZtunnelMirrors:
    """Keeps one mirror pod per node's ztunnel current, as a kubelet does for its static pods: created when
    missing, replaced when outdated or when someone deletes it, status following the process; mirror pods
    of nodes no longer in the cluster are removed. Writes go through the API (so they survive in its state
    dir, and `ambientctl down` removes them with it)."""

    def __init__(self, client: KubeClient, ztunnels: dict[NodeNet, ZtunnelProcess]) -> None:
        self.client, self.ztunnels = client, ztunnels
        self.dirty = asyncio.Event()
        self.pods = Informer(client, POD, namespace=ZTUNNEL_NAMESPACE,
                             label_selector=f"app={ZTUNNEL_POD_LABELS['app']}", handler=lambda *_: self.dirty.set())

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.pods.run(), name="ztunnel-mirror-informer")
            await self.pods.synced.wait()
            self.dirty.set()
            while True:
                await self.dirty.wait()
                self.dirty.clear()
                try:
                    await self.sync()
                except ApiError as exc:
                    log.warning("ztunnel mirror pods: %s; retrying in %.0fs", exc, MIRROR_RETRY)
                    await asyncio.sleep(MIRROR_RETRY)
                    self.dirty.set()

    async def sync(self) -> None:
        desired = {f"ztunnel-{node.name}": ztunnel_mirror_pod(node, proc) for node, proc in self.ztunnels.items()}
        replaced: set[str] = set()
        for pod in self.pods.items():
            meta = pod["metadata"]
            mirror_hash = (meta.get("annotations") or {}).get(MIRROR_ANNOTATION)
            if mirror_hash is None:
                continue  # not a mirror pod: someone else's
            want = desired.get(meta["name"])
            if want is None or meta.get("deletionTimestamp") or \
                    mirror_hash != want["metadata"]["annotations"][MIRROR_ANNOTATION]:
                await self._write(self.client.delete(POD, meta["name"], ZTUNNEL_NAMESPACE, grace_period=0), 404)
                replaced.add(meta["name"])
        for node, proc in self.ztunnels.items():
            name = f"ztunnel-{node.name}"
            status = ztunnel_mirror_status(node, proc)
            current = None if name in replaced else self.pods.get(name, ZTUNNEL_NAMESPACE)
            if current is None:
                # 409: created by an earlier pass whose event has not reached the cache yet.
                await self._write(self.client.create(desired[name]), 409)
            elif _without_start_time(current.get("status") or {}) == _without_start_time(status):
                continue
            await self.client.patch(POD, name, {"status": status}, ZTUNNEL_NAMESPACE, status=True)

    @staticmethod
    async def _write(call: Awaitable[Obj], harmless: int) -> None:
        try:
            await call
        except ApiError as exc:
            if exc.code != harmless:
                raise


def _without_start_time(status: Obj) -> Obj:
    return {k: v for k, v in status.items() if k != "startTime"}


async def main_async(state: StateDir) -> None:
    config = json.loads(state.config.read_text())
    server = ApiServer(state.root, state.token_file.read_text().strip())
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(state.pki / "apiserver.crt", state.pki / "apiserver.key")
    await server.start(["127.0.0.1", HOST_IP], API_PORT, tls)
    client = KubeClient(KubeConfig.load(state.kubeconfig))
    await bootstrap(client)
    zone = ClusterZone()
    dns = ClusterDNS(zone, host=HOST_IP, port=53,
                     upstreams=upstreams_from_resolv_conf("/etc/resolv.conf", skip=[HOST_IP, KUBE_DNS_IP]))
    await dns.start()
    controllers = Controllers(client, zone)
    per_node = {NodeNet(i): node_children(state, NodeNet(i)) for i in config["nodes"]}
    children = [control_child(state), *(child for node_list in per_node.values() for child in node_list)]
    ztunnels = {node: next(c for c in node_list if c.name == f"ztunnel-{node.name}")
                for node, node_list in per_node.items()}
    mirrors = ZtunnelMirrors(client, dict(ztunnels))
    for ztunnel in ztunnels.values():
        ztunnel.on_change = mirrors.dirty.set
    log.info("control plane up: API https://%s:%d, DNS %s:53, %d node(s)", HOST_IP, API_PORT, HOST_IP,
             len(config["nodes"]))
    cancel_on_signals()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(controllers.run(), name="controllers")
            tg.create_task(mirrors.run(), name="ztunnel-mirrors")
            for child in children:
                tg.create_task(child.supervise(), name=child.name)
    except asyncio.CancelledError:
        log.info("stopping: kubelets first, so that they stop their pods")
        await asyncio.gather(*(child.stop() for child in children))
    finally:
        await dns.close()
        await client.close()
        await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="local cluster control process (started by `ambientctl up`)")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(StateDir(Path(args.state_dir))))


if __name__ == "__main__":
    main()
