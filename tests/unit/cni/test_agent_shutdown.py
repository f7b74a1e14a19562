"""What a stopping node agent does with the CNI plugin, decided from the API's answer about its DaemonSet:
removed only when the install is positively going away, kept on everything else (an upgrade must never
open a window where new pods start unredirected); and the flags and environment that drive it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient.kube.errors import ApiError
from cni.agent import build_installer, decide_shutdown
from cni.agent_config import DAEMONSET_NAME, parse_args
from cni.installer import KUBECONFIG_NAME, CopiedKubeconfig, ServiceAccountKubeconfig

DS = "istio-system/ambient-cni-node"
PRESENT = {"metadata": {"name": "ambient-cni-node", "namespace": "istio-system", "uid": "u1"}}
DELETING = {"metadata": {**PRESENT["metadata"], "deletionTimestamp": "2024-05-01T10:00:00Z",
                         "finalizers": ["foregroundDeletion"]}}


@pytest.mark.parametrize(("answer", "uninstall", "says"), [
    (PRESENT, False, "still there"),
    (DELETING, True, "being deleted"),
    (ApiError(404, 'daemonsets.apps "ambient-cni-node" not found'), True, "gone (404)"),
    (ApiError(401, "Unauthorized"), True, "refuses this agent's credentials (401"),
    (ApiError(403, "daemonsets.apps is forbidden"), True, "refuses this agent's credentials (403"),
    (ApiError(503, "cannot reach the API server"), False, "cannot read DaemonSet"),
    (ApiError(500, "etcdserver: request timed out"), False, "500"),
    (ApiError(429, "too many requests"), False, "429"),
    (None, False, "no answer"),
])
def test_only_a_positive_sign_of_removal_uninstalls(answer: object, uninstall: bool, says: str) -> None:
    decision = decide_shutdown(answer, DS)  # type: ignore[arg-type]
    assert decision.uninstall is uninstall
    assert says in decision.reason
    assert DS in decision.reason or (isinstance(answer, ApiError) and answer.code in (401, 403))


def test_pod_identity_and_daemonset_come_from_the_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("POD_NAME", "POD_NAMESPACE", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    _, local, _ = parse_args(["--node-name", "node-1"])
    assert not local.in_pod and local.daemonset_name == DAEMONSET_NAME and local.api_host == ""

    monkeypatch.setenv("POD_NAME", "ambient-cni-node-x7k2p")
    monkeypatch.setenv("POD_NAMESPACE", "istio-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    _, pod, _ = parse_args(["--node-name", "node-1", "--daemonset-name", "cni"])
    assert pod.in_pod and (pod.pod_namespace, pod.daemonset_name) == ("istio-system", "cni")
    assert (pod.api_host, pod.api_port) == ("fd00:10:96::1", "443")


def test_plugin_kubeconfig_source_and_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    base = ["--node-name", "n", "--cni-conf-dir", str(tmp_path / "net.d"), "--cni-bin-dir", str(tmp_path / "bin"),
            "--run-dir", "/var/run/istio-cni"]
    _, config, _ = parse_args(base)
    installer = build_installer(config)
    assert installer is not None and installer.kubeconfig is None, "outside a pod, only an explicit one"

    _, config, _ = parse_args([*base, "--plugin-kubeconfig", "/etc/kube/admin.conf"])
    installer = build_installer(config)
    assert installer is not None and installer.kubeconfig is not None
    assert installer.kubeconfig.source == CopiedKubeconfig(Path("/etc/kube/admin.conf"))

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    _, config, _ = parse_args(base)
    installer = build_installer(config)
    assert installer is not None and installer.kubeconfig is not None
    assert installer.kubeconfig.source == ServiceAccountKubeconfig(
        "10.96.0.1", "443", Path("/var/run/secrets/kubernetes.io/serviceaccount"))
    # The run dir is mounted at the same path on the host, where the plugin opens what its entry names.
    assert installer.kubeconfig.path == Path("/var/run/istio-cni") / KUBECONFIG_NAME
