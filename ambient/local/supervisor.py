"""The local cluster's control process: API server, controllers and cluster DNS in one event loop, plus
one kubelet per simulated node as a supervised child process (restarted with backoff if it dies).

Started in the background by `ambientctl up`; `ambientctl down` sends it SIGTERM, on which it stops the
kubelets (which stop their pods) and then itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

from ambient.aio import cancel_on_signals
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.local import procs
from ambient.local.apiserver import ApiServer
from ambient.local.controllers import Controllers
from ambient.local.dns import ClusterDNS, ClusterZone, upstreams_from_resolv_conf
from ambient.local.layout import API_PORT, StateDir
from ambient.local.network import HOST_IP, KUBE_DNS_IP, KUBERNETES_SERVICE_IP, NodeNet

log = logging.getLogger("ambient.supervisor")
Obj = dict[str, Any]

DRIFT_INTERVAL = 5.0  # seconds: the local cluster's agents re-verify pod rules this often
RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a crashing child
CHILD_STOP_TIMEOUT = 40.0  # seconds a kubelet gets to stop its pods on shutdown
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease", "istio-system")


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

    async def supervise(self) -> None:
        backoff = 1.0
        while not self.stopping:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as out:
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True)
            procs.record(self.pid_path, self.process.pid)
            code = await self.process.wait()
            if self.stopping:
                break
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
    children = [control_child(state), *(child for i in config["nodes"] for child in node_children(state, NodeNet(i)))]
    log.info("control plane up: API https://%s:%d, DNS %s:53, %d node(s)", HOST_IP, API_PORT, HOST_IP,
             len(config["nodes"]))
    cancel_on_signals()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(controllers.run(), name="controllers")
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
