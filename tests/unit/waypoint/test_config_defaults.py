"""The waypoint's defaults are what the pod the control plane deploys provides: Istio's token and root paths,
the control plane's address from `CA_ADDRESS`/`XDS_ADDRESS`, the pod's ServiceAccount for the API server.
A missing file ends the waypoint with one line saying what to mount."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ambient.control.waypoints import WaypointTemplate, waypoint_objects
from ambient.kube import client as kube_client
from ambient.kube.client import KubeConfig
from waypoint.config import parse_args
from waypoint.main import _wait_for_files

Obj = dict[str, Any]
ISTIO_ENV = ("GATEWAY_NAME", "POD_NAMESPACE", "POD_NAME", "POD_IP", "SERVICE_ACCOUNT", "NODE_NAME", "KUBECONFIG",
             "XDS_ADDRESS", "CA_ADDRESS", "XDS_SERVER_NAME", "ALT_XDS_HOSTNAME", "XDS_ROOT_CA", "CA_ROOT_CA",
             "TOKEN_PATH", "CLUSTER_ID", "ISTIO_META_CLUSTER_ID", "TRUST_DOMAIN", "ROOT_NAMESPACE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ISTIO_ENV:
        monkeypatch.delenv(name, raising=False)


def waypoint_container(template: WaypointTemplate) -> tuple[Obj, Obj]:
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u1"},
               "spec": {"gatewayClassName": "istio-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}
    deployment = next(o for o in waypoint_objects(gateway, template) if o["kind"] == "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    return pod_spec, pod_spec["containers"][0]


def test_the_deployed_pods_env_and_mounts_are_all_the_waypoint_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    template = WaypointTemplate(control_address="istiod.mesh-system.svc:15012", cluster_id="east",
                                trust_domain="corp.example", root_namespace="mesh-system")
    pod_spec, container = waypoint_container(template)
    downward = {"metadata.name": "waypoint-7d4f9-x2k", "metadata.namespace": "shop", "status.podIP": "10.1.0.7",
                "spec.serviceAccountName": "waypoint", "spec.nodeName": "node-1"}
    for var in container["env"]:  # what the kubelet sets
        value = var["value"] if "value" in var else downward[var["valueFrom"]["fieldRef"]["fieldPath"]]
        monkeypatch.setenv(var["name"], value)

    config, _ = parse_args([])  # the default command's flags only repeat $GATEWAY_NAME / $POD_NAMESPACE

    assert (config.name, config.namespace, config.service_account) == ("waypoint", "shop", "waypoint")
    assert config.xds_address == config.ca_address == "istiod.mesh-system.svc:15012"
    assert config.server_name == "istiod.mesh-system.svc"  # the SAN ambient-control's certificate carries there
    assert (config.cluster_id, config.trust_domain, config.root_namespace) == ("east", "corp.example", "mesh-system")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert config.token_path == f"{mounts['istio-token']}/{token['path']}" == "/var/run/secrets/tokens/istio-token"
    assert volumes["istiod-ca-cert"]["configMap"]["name"] == "istio-ca-root-cert"
    assert config.root_cert == f"{mounts['istiod-ca-cert']}/root-cert.pem" == "/var/run/secrets/istio/root-cert.pem"
    assert config.kubeconfig is None  # the pod's ServiceAccount


def test_without_env_the_defaults_are_istios() -> None:
    config, _ = parse_args(["--name", "waypoint", "--namespace", "shop"])
    assert config.xds_address == config.ca_address == "istiod.istio-system.svc:15012"
    assert config.server_name == "istiod.istio-system.svc"
    assert config.token_path == "/var/run/secrets/tokens/istio-token"
    assert config.root_cert == "/var/run/secrets/istio/root-cert.pem"
    assert config.kubeconfig is None


def test_istios_address_forms_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDS_ADDRESS", "https://istiod-canary.istio-system.svc:15012")
    monkeypatch.setenv("CA_ADDRESS", "istiod-canary.istio-system.svc:15012")
    config, _ = parse_args(["--name", "w", "--namespace", "shop"])
    assert config.xds_address == config.ca_address == "istiod-canary.istio-system.svc:15012"
    assert config.server_name == "istiod-canary.istio-system.svc"
    # The local cluster dials the control plane by IP: the name verified is then istiod's default.
    config, _ = parse_args(["--name", "w", "--namespace", "shop", "--xds-address", "10.0.0.1:15012",
                            "--ca-address", "10.0.0.1:15012", "--root-cert", "/state/root.pem"])
    assert (config.xds_address, config.server_name, config.root_cert) == (
        "10.0.0.1:15012", "istiod.istio-system.svc", "/state/root.pem")
    monkeypatch.setenv("ALT_XDS_HOSTNAME", "istiod.mesh-system.svc")  # Istio's override of the verified name
    assert parse_args(["--name", "w", "--namespace", "shop"])[0].server_name == "istiod.mesh-system.svc"
    assert parse_args(["--name", "w", "--namespace", "shop", "--server-name", "cp.local"])[0].server_name == "cp.local"


def test_in_a_pod_without_a_kubeconfig_the_api_server_is_reached_as_the_pods_serviceaccount(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "token").write_text("pod-token\n")
    (secrets / "namespace").write_text("shop")
    monkeypatch.setattr(kube_client, "IN_CLUSTER_DIR", secrets)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config, _ = parse_args(["--name", "w", "--namespace", "shop"])
    kube = KubeConfig.load(config.kubeconfig)  # what waypoint.main does
    assert (kube.server, kube.token, kube.ca_file) == ("https://10.96.0.1:443", "pod-token", str(secrets / "ca.crt"))


@pytest.mark.parametrize(("missing", "says"), [
    ("root", "mount ConfigMap istio-ca-root-cert there"),
    ("token", "mount a projected ServiceAccount token with audience istio-ca there"),
])
async def test_a_missing_file_is_one_line_naming_what_to_mount(tmp_path: Path, missing: str, says: str) -> None:
    root, token = tmp_path / "root-cert.pem", tmp_path / "istio-token"
    for path, name in ((root, "root"), (token, "token")):
        if name != missing:
            path.write_text("x")
    config, _ = parse_args(["--name", "w", "--namespace", "shop", "--root-cert", str(root),
                            "--token-path", str(token)])
    with pytest.raises(SystemExit) as exit_:
        await _wait_for_files(config, timeout=0.2)
    message = str(exit_.value.code)
    assert message.startswith("waypoint: ") and "\n" not in message
    assert str(root if missing == "root" else token) in message and says in message
