"""The node agent's configuration: one frozen object built once from flags and environment, every
default a named constant with its reason."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

RUN_DIR = "/var/run/istio-cni"  # where the plugin finds pluginevent.sock (istio-cni's default)
ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"  # ztunnel connects here (PROTOCOLS §4)
HEALTH_PORT = 8000  # /healthz, /readyz (PROTOCOLS §1)
METRICS_PORT = 15014  # Prometheus (PROTOCOLS §1)
DRIFT_INTERVAL = 10.0  # seconds between rule verifications of every enrolled pod
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds: backoff for enrollments that failed (ztunnel down, ...)
EXCLUDED_NAMESPACES = ("kube-system",)  # never enrolled, as istio-cni's default
# The self-contained plugin bundle in the image (Dockerfile, `cni.plugin_bundle`): hosts have no Python.
PLUGIN_BUNDLE = "/opt/ambient/cni-plugin"
# Seconds between checks that the plugin, its kubeconfig and its entry are in place (also how soon a primary
# CNI config that appears late, or a rotated service account token, is picked up): a few stats and small reads.
INSTALL_CHECK_INTERVAL = 1.0
# The DaemonSet the agent runs in (deploy/cni-node.yaml), read in $POD_NAMESPACE when the agent stops.
DAEMONSET_NAME = "ambient-cni-node"
# Seconds the stop-time DaemonSet read may take: the pod's terminationGracePeriodSeconds is 5, and the
# uninstall and server shutdown that follow need the rest.
SHUTDOWN_CHECK_TIMEOUT = 2.0
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # the pod's token and ca.crt


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    kubeconfig: str | None = None
    run_dir: str = RUN_DIR
    zds_socket: str = ZDS_SOCKET
    rules_backend: str = "auto"  # iptables | nftables | auto
    dns_capture: bool = True
    exclude_namespaces: tuple[str, ...] = EXCLUDED_NAMESPACES
    health_address: tuple[str, int] = ("0.0.0.0", HEALTH_PORT)
    metrics_address: tuple[str, int] = ("0.0.0.0", METRICS_PORT)
    drift_interval: float = DRIFT_INTERVAL
    # Directories where a local kubelet records each pod's netns (`*_<uid>/sandbox.json`).
    kubelet_pod_dirs: tuple[str, ...] = ()
    # Installer mode: where the runtime reads CNI config and plugins; empty = do not install.
    cni_conf_dir: str = ""
    cni_bin_dir: str = ""
    plugin_source: str = ""  # what to install as `istio-cni` (bundle dir or executable); "" = default_plugin_source()
    # Kubeconfig the plugin should use (copied into the run dir); "" = in a pod, render one from the pod's
    # service account and $KUBERNETES_SERVICE_HOST/PORT (api_host/api_port), as Istio's install-cni does.
    plugin_kubeconfig: str = ""
    api_host: str = ""  # $KUBERNETES_SERVICE_HOST
    api_port: str = ""  # $KUBERNETES_SERVICE_PORT
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    # In a pod ($POD_NAME/$POD_NAMESPACE): on stop, the DaemonSet `daemonset_name` in `pod_namespace` decides
    # whether the plugin is removed (install deleted) or kept (upgrade, restart). Outside a pod: always kept.
    pod_name: str = ""
    pod_namespace: str = ""
    daemonset_name: str = DAEMONSET_NAME
    shutdown_check_timeout: float = SHUTDOWN_CHECK_TIMEOUT
    install_check_interval: float = INSTALL_CHECK_INTERVAL
    host_probe_uid: int = 0  # uid of the kubelet's probe sockets (nftables `skuid` match)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def plugin_socket(self) -> Path:
        return Path(self.run_dir) / "pluginevent.sock"

    @property
    def in_pod(self) -> bool:
        return bool(self.pod_name and self.pod_namespace)


def default_plugin_source() -> Path:
    """The image's bundle when it is there, else the `ambient-cni` console script beside this interpreter (a
    development venv or the local cluster, whose "hosts" share this Python)."""
    bundle = Path(PLUGIN_BUNDLE)
    return bundle if bundle.is_dir() else Path(sys.executable).parent / "ambient-cni"


def parse_args(argv: list[str] | None = None) -> tuple[str, AgentConfig, str]:
    """→ (command, config, log level). Flags fall back to the environment variables Istio uses."""
    env = os.environ
    p = argparse.ArgumentParser(prog="ambient-cni-agent", description="Istio ambient CNI node agent")
    p.add_argument("command", nargs="?", default="run", choices=["run", "uninstall"],
                   help="run the agent (default) or remove the installed plugin and its config")
    p.add_argument("--node-name", default=env.get("NODE_NAME", ""))
    p.add_argument("--kubeconfig", default=env.get("KUBECONFIG"))
    p.add_argument("--run-dir", default=env.get("CNI_AGENT_RUN_DIR", RUN_DIR))
    p.add_argument("--zds-socket", default=env.get("ZTUNNEL_SOCKET", ZDS_SOCKET))
    p.add_argument("--rules-backend", choices=["auto", "iptables", "nftables"],
                   default=env.get("RULES_BACKEND", "auto"))
    p.add_argument("--dns-capture", choices=["true", "false"], default=env.get("AMBIENT_DNS_CAPTURE", "true"))
    p.add_argument("--exclude-namespaces", default=env.get("EXCLUDE_NAMESPACES", ",".join(EXCLUDED_NAMESPACES)))
    p.add_argument("--health-port", type=int, default=HEALTH_PORT)
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    p.add_argument("--listen-address", default="0.0.0.0")
    p.add_argument("--drift-interval", type=float, default=DRIFT_INTERVAL)
    p.add_argument("--kubelet-pod-dir", action="append", default=[])
    p.add_argument("--cni-conf-dir", default=env.get("CNI_NET_DIR", ""))
    p.add_argument("--cni-bin-dir", default=env.get("CNI_BIN_DIR", ""))
    p.add_argument("--plugin-source", default="", help="the plugin bundle directory or executable to install "
                   f"(default: {PLUGIN_BUNDLE} if it exists, else ambient-cni beside this Python)")
    p.add_argument("--plugin-kubeconfig", default="", help="kubeconfig file for the plugin (copied into the run "
                   "dir); default in a pod: one rendered from the pod's service account, kept current")
    p.add_argument("--pod-name", default=env.get("POD_NAME", ""))
    p.add_argument("--pod-namespace", default=env.get("POD_NAMESPACE", ""))
    p.add_argument("--daemonset-name", default=DAEMONSET_NAME, help="the agent's DaemonSet in its pod's namespace: "
                   "when the agent stops, the CNI plugin is removed if it is gone or being deleted, else kept "
                   f"(default {DAEMONSET_NAME})")
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", "info"))
    a = p.parse_args(argv)
    if a.command == "run" and not a.node_name:
        p.error("--node-name (or $NODE_NAME) is required: the agent only enrolls pods of its own node")
    config = AgentConfig(
        node_name=a.node_name, kubeconfig=a.kubeconfig, run_dir=a.run_dir, zds_socket=a.zds_socket,
        rules_backend=a.rules_backend, dns_capture=a.dns_capture == "true",
        exclude_namespaces=tuple(n for n in a.exclude_namespaces.split(",") if n),
        health_address=(a.listen_address, a.health_port), metrics_address=(a.listen_address, a.metrics_port),
        drift_interval=a.drift_interval, kubelet_pod_dirs=tuple(a.kubelet_pod_dir),
        cni_conf_dir=a.cni_conf_dir, cni_bin_dir=a.cni_bin_dir, plugin_source=a.plugin_source,
        plugin_kubeconfig=a.plugin_kubeconfig, api_host=env.get("KUBERNETES_SERVICE_HOST", ""),
        api_port=env.get("KUBERNETES_SERVICE_PORT", "443"), pod_name=a.pod_name, pod_namespace=a.pod_namespace,
        daemonset_name=a.daemonset_name)
    return a.command, config, a.log_level
