"""Where the local cluster keeps things in its state directory: one place that names every path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path(os.environ.get("AMBIENT_STATE_DIR", "/var/lib/ambient-local"))
# The running cluster's state dir is recorded here, so `ambientctl` finds it from any directory.
CURRENT_POINTER = Path("/run/ambient-local/current")
API_PORT = 6443


@dataclass(frozen=True)
class NodePaths:
    """Per-node sockets of the mesh components (where a real node has /var/run/...)."""

    root: Path

    @property
    def cni_run_dir(self) -> Path:  # the CNI plugin's pluginevent.sock lives here
        return self.root / "istio-cni"

    @property
    def zds_socket(self) -> Path:  # ztunnel connects to the agent here
        return self.root / "ztunnel" / "ztunnel.sock"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def token_file(self) -> Path:
        return self.root / "pki" / "admin.token"

    @property
    def mesh_ca_dir(self) -> Path:  # the mesh CA (ambient-control's), apart from the API server's PKI
        return self.root / "pki" / "mesh-ca"

    @property
    def mesh_root_cert(self) -> Path:  # what ztunnels and waypoints trust
        return self.root / "pki" / "mesh-root.pem"

    @property
    def bootstrap_tokens(self) -> Path:  # token → identity for ambient-control's callers
        return self.root / "pki" / "bootstrap-tokens.json"

    def node_token(self, node: str) -> Path:  # the token a node's ztunnel presents to ambient-control
        return self.node(node) / "ztunnel" / "token"

    @property
    def supervisor_pid(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def config(self) -> Path:
        return self.root / "cluster.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def node(self, name: str) -> Path:
        return self.root / "nodes" / name

    def cni_conf_dir(self, node: str) -> Path:
        return self.node(node) / "net.d"

    def cni_bin_dir(self, node: str) -> Path:
        return self.node(node) / "bin"

    def pods(self, node: str) -> Path:
        return self.node(node) / "pods"

    def node_paths(self, node: str) -> NodePaths:
        return NodePaths(self.node(node))

    def pod_dir(self, node: str, namespace: str, name: str, uid: str) -> Path:
        return self.pods(node) / f"{namespace}_{name}_{uid}"


def pod_netns_name(uid: str) -> str:
    """The network namespace the local kubelet makes for a pod (also what `ambientctl exec` enters)."""
    return f"amb-pod-{uid[:13]}"
