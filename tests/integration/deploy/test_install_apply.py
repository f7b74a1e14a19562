"""`ambientctl install` (no --dry-run) against the local API server on loopback: every rendered object is
created, reads back as rendered, and a second install is idempotent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from ambient.cli.install import InstallValues, render
from ambient.kube.client import KubeClient, KubeConfig
from tests.integration import kube_fixtures
from tests.integration.kube_fixtures import contains, local_apiserver, write_kubeconfig

Obj = dict[str, Any]
TOKEN = "test-token"
WAIT = 20.0


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[KubeClient, Path]]:
    async with local_apiserver(TOKEN) as url:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, TOKEN)
        async with KubeClient(KubeConfig.load(kubeconfig)) as client:
            yield client, kubeconfig


async def ambientctl(kubeconfig: Path, *args: str) -> Result:
    return await kube_fixtures.ambientctl(kubeconfig, *args, timeout=WAIT)


async def test_install_creates_every_object_and_it_round_trips(cluster: tuple[KubeClient, Path]) -> None:
    client, kubeconfig = cluster
    args = ("--namespace", "mesh", "--image", "reg.example/ambient:2", "--cluster-id", "east")
    result = await ambientctl(kubeconfig, "install", *args)
    assert result.exit_code == 0, result.output
    objs = render(InstallValues(namespace="mesh", image="reg.example/ambient:2", cluster_id="east"))
    assert result.output.count(" created\n") == len(objs)
    for obj in objs:
        rt = await client.resource(obj["apiVersion"], obj["kind"])
        live = await client.get(rt, obj["metadata"]["name"], obj["metadata"].get("namespace"))
        assert contains(live, obj), f"{obj['kind']} {obj['metadata']['name']} did not round-trip:\n{live}"

    again = await ambientctl(kubeconfig, "install", *args)
    assert again.exit_code == 0, again.output
    assert again.output.count(" configured\n") == len(objs) and "created" not in again.output


async def test_dry_run_output_applies_with_ambientctl_apply(cluster: tuple[KubeClient, Path],
                                                            tmp_path: Path) -> None:
    client, kubeconfig = cluster
    rendered = await ambientctl(kubeconfig, "install", "--dry-run")
    assert rendered.exit_code == 0
    manifest = tmp_path / "ambient.yaml"
    manifest.write_text(rendered.output)
    applied = await ambientctl(kubeconfig, "apply", "-f", str(manifest))
    assert applied.exit_code == 0, applied.output
    ds = await client.get(await client.resource("apps/v1", "DaemonSet"), "ztunnel", "istio-system")
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == InstallValues().image


async def test_uninstall_deletes_everything_but_the_namespace_and_is_idempotent(
        cluster: tuple[KubeClient, Path]) -> None:
    client, kubeconfig = cluster
    assert (await ambientctl(kubeconfig, "install", "-n", "mesh")).exit_code == 0
    secrets = await client.resource("v1", "Secret")
    await client.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cacerts", "namespace": "mesh"},
                         "data": {}})
    await client.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",  # the controller's
                         "metadata": {"name": "ambient-waypoint"},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                     "name": "ambient-waypoint"}, "subjects": []})
    result = await ambientctl(kubeconfig, "uninstall", "-n", "mesh")
    assert result.exit_code == 0, result.output
    objs = render(InstallValues(namespace="mesh"))
    assert result.output.count(" deleted\n") == len(objs)  # all but the namespace, plus the waypoint binding
    assert "clusterrolebinding/ambient-waypoint deleted" in result.output
    lines = result.output.splitlines()
    assert lines.index("daemonset/ambient-cni-node deleted") < lines.index("serviceaccount/ambient-cni-node deleted")
    assert "namespace/mesh kept" in result.output
    for obj in objs[1:]:
        rt = await client.resource(obj["apiVersion"], obj["kind"])
        name, ns = obj["metadata"]["name"], obj["metadata"].get("namespace")
        if rt.namespaced:
            assert name not in {o["metadata"]["name"] for o in (await client.list(rt, ns))["items"]}, name
        else:
            assert name not in {o["metadata"]["name"] for o in (await client.list(rt))["items"]}, name
    assert (await client.get(secrets, "cacerts", "mesh"))["metadata"]["name"] == "cacerts"

    again = await ambientctl(kubeconfig, "uninstall", "-n", "mesh")
    assert again.exit_code == 0, again.output
    assert "deleted" not in again.output
