"""The manifests: deploy/ is exactly the installer's output for the default values, every object validates
against the Kubernetes OpenAPI schema of its kind (offline, `kubernetes-validate`), and the values given to
`ambientctl install` reach every place they belong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from ambient.cli.install import FILES, InstallValues, deploy_files, render
from ambient.cli.main import cli

ROOT = Path(__file__).resolve().parents[3]
Obj = dict[str, Any]
CRD_KINDS = {"GatewayClass"}  # not in the Kubernetes schema; checked by hand below
KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment",
         "Service", "DaemonSet", "GatewayClass"}


def dry_run(*args: str) -> list[Obj]:
    result = CliRunner().invoke(cli, ["install", "--dry-run", *args], prog_name="ambientctl")
    assert result.exit_code == 0, result.output
    return [d for d in yaml.safe_load_all(result.output) if d]


def test_deploy_dir_is_the_rendered_default() -> None:
    for name, text in deploy_files().items():
        path = ROOT / "deploy" / name
        assert path.is_file(), f"deploy/{name} missing: run `ambientctl install --write-deploy-dir deploy`"
        assert path.read_text() == text, f"deploy/{name} is stale: run `ambientctl install --write-deploy-dir deploy`"
    kustomization = yaml.safe_load((ROOT / "deploy" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == list(FILES)


def test_manifests_have_no_yaml_aliases() -> None:
    """Rules that share a verb list are written out each time: `&id001`/`*id001` read badly in review."""
    for name, text in deploy_files().items():
        assert "&id0" not in text and "*id0" not in text, name


def test_dry_run_parses_and_holds_every_kind() -> None:
    docs = dry_run()
    assert {d["kind"] for d in docs} == KINDS
    assert docs[0]["kind"] == "Namespace", "the namespace must come first for `kubectl apply -f -`"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for wanted in (("Deployment", "ambient-control"), ("Service", "istiod"), ("DaemonSet", "ambient-cni-node"),
                   ("DaemonSet", "ztunnel"), ("GatewayClass", "istio-waypoint")):
        assert wanted in names
    assert docs == render()


def test_values_reach_every_object() -> None:
    docs = dry_run("--namespace", "mesh", "--image", "reg.example/ambient:1", "--trust-domain", "corp.example",
                   "--cluster-id", "east")
    for d in docs:
        if d["kind"] in {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service", "DaemonSet"}:
            assert d["metadata"]["namespace"] == "mesh", d["metadata"]["name"]
        for subject in d.get("subjects", []):
            if subject["kind"] == "ServiceAccount":
                assert subject["namespace"] == "mesh"
        for c in (d.get("spec") or {}).get("template", {}).get("spec", {}).get("containers", []):
            assert c["image"] == "reg.example/ambient:1"
    env = {d["metadata"]["name"]: {e["name"]: e.get("value") for e in
                                   d["spec"]["template"]["spec"]["containers"][0].get("env", [])}
           for d in docs if d["kind"] in {"Deployment", "DaemonSet"}}
    assert env["ztunnel"]["XDS_ADDRESS"] == env["ztunnel"]["CA_ADDRESS"] == "istiod.mesh.svc:15012"
    assert env["ztunnel"]["CLUSTER_ID"] == env["ambient-control"]["CLUSTER_ID"] == "east"
    assert env["ztunnel"]["TRUST_DOMAIN"] == env["ambient-control"]["TRUST_DOMAIN"] == "corp.example"


def test_ztunnel_env_names_are_the_ones_its_config_reads() -> None:
    from ztunnel.config import parse_args

    ds = next(d for d in render() if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "ztunnel")
    pod = ds["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "<field>") for e in container["env"]}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, "10.0.0.1" if key == "INSTANCE_IP" else "node-a" if value == "<field>" else value)
        config, _ = parse_args([])
    assert (config.xds_address, config.ca_address, config.cluster_id, config.zds_socket) == (
        env["XDS_ADDRESS"], env["CA_ADDRESS"], env["CLUSTER_ID"], env["INPOD_UDS"])
    assert config.node_name == "node-a" and config.node_ip == "10.0.0.1"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert Path(config.token_path).parent.as_posix() in mounts and Path(config.root_cert).parent.as_posix() in mounts
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "istio-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"] == {
        "path": Path(config.token_path).name, "audience": "istio-ca", "expirationSeconds": 43200}
    caps = container["securityContext"]["capabilities"]
    assert set(caps["add"]) == {"NET_ADMIN", "SYS_ADMIN", "NET_RAW"} and caps["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "15020"


def test_cni_node_mounts_what_the_agent_and_plugin_use() -> None:
    from cni.agent_config import RUN_DIR, ZDS_SOCKET
    from ztunnel.config import ZDS_SOCKET as ZTUNNEL_ZDS

    ds = next(d for d in render() if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "ambient-cni-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] and spec["hostNetwork"]
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert {"/opt/cni/bin", "/etc/cni/net.d", RUN_DIR, str(Path(ZDS_SOCKET).parent)} <= host_paths
    assert Path(ZDS_SOCKET) == Path(ZTUNNEL_ZDS)
    caps = spec["containers"][0]["securityContext"]["capabilities"]
    assert {"NET_ADMIN", "SYS_ADMIN"} <= set(caps["add"]) and not spec["containers"][0]["securityContext"]["privileged"]


def test_control_rbac_covers_what_it_watches_and_writes() -> None:
    from ambient.control.main import INPUTS

    rules = next(d for d in render() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "ambient-control")[
        "rules"]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    for _, name in INPUTS:
        resource, _, group = name.partition(".")
        group = "discovery.k8s.io" if resource == "endpointslices" else group
        assert allowed(group, resource, "watch"), f"ambient-control cannot watch {name}"
    assert allowed("authentication.k8s.io", "tokenreviews", "create")
    assert allowed("gateway.networking.k8s.io", "gateways/status", "patch")
    for group, resource in (("", "serviceaccounts"), ("", "services"), ("apps", "deployments")):
        assert all(allowed(group, resource, v) for v in ("create", "patch", "delete"))


def test_gatewayclass_is_istios_waypoint_class() -> None:
    gc = next(d for d in render() if d["kind"] == "GatewayClass")
    assert gc["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gc["metadata"]["name"] == "istio-waypoint" and gc["spec"]["controllerName"] == "istio.io/mesh-controller"


@pytest.mark.parametrize("values", [InstallValues(), InstallValues(namespace="mesh", image="x:1")],
                         ids=["defaults", "custom"])
def test_every_object_validates_against_the_kubernetes_schema(values: InstallValues) -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="`pip install kubernetes-validate` (bundled OpenAPI schemas) to validate manifests")
    version = kv.latest_version()
    checked = 0
    for obj in render(values):
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked == len(render(values)) - 1


def test_the_validator_rejects_a_broken_manifest() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="`pip install kubernetes-validate`")
    ds = next(d for d in render() if d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, kv.latest_version(), strict=True)


@pytest.mark.parametrize(("args", "message"), [
    (("--image", ""), "error: --image must be a non-empty value"),
    (("--namespace", "Istio_System"), "error: --namespace 'Istio_System' is not a valid namespace name"),
    (("--trust-domain", " "), "error: --trust-domain must be a non-empty value"),
])
def test_bad_values_are_one_line_errors_before_anything_renders(args: tuple[str, ...], message: str) -> None:
    result = CliRunner().invoke(cli, ["install", "--dry-run", *args])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
