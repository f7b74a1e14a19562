"""The Kubernetes-facing verbs a user runs against a real cluster (`label`, `get`, `apply`, `delete`), through
`--kubeconfig` against a real API server on loopback: the same client code path as on Kubernetes, with the
kubeconfig context's namespace as the default."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.resources import ResourceTable
from tests.integration import kube_fixtures

TOKEN = "verbs-token"
WAIT = 30.0
NAMESPACES = ResourceTable().require("namespaces")
CONFIGMAPS = ResourceTable().require("configmaps")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[KubeClient, Path]]:
    async with kube_fixtures.local_apiserver(TOKEN) as url, KubeClient(KubeConfig(url, token=TOKEN)) as client:
        for ns in ("default", "shop"):
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        yield client, kube_fixtures.write_kubeconfig(tmp_path / "kubeconfig", url, TOKEN, "shop")


async def test_label_a_namespace_into_the_mesh_and_out(cluster: tuple[KubeClient, Path]) -> None:
    client, kubeconfig = cluster
    result = await kube_fixtures.ambientctl(kubeconfig, "label", "namespace", "shop",
                                            "istio.io/dataplane-mode=ambient", timeout=WAIT)
    assert result.exit_code == 0, result.output
    assert "namespace/shop labeled" in result.output
    live = await client.get(NAMESPACES, "shop")
    assert live["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"

    result = await kube_fixtures.ambientctl(kubeconfig, "label", "namespace", "shop", "istio.io/dataplane-mode-",
                                            timeout=WAIT)
    assert result.exit_code == 0, result.output
    assert "istio.io/dataplane-mode" not in ((await client.get(NAMESPACES, "shop"))["metadata"].get("labels") or {})


async def test_apply_get_delete_use_the_contexts_namespace(cluster: tuple[KubeClient, Path], tmp_path: Path) -> None:
    client, kubeconfig = cluster
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                                        "data": {"color": "blue"}}))
    result = await kube_fixtures.ambientctl(kubeconfig, "apply", "-f", str(manifest), timeout=WAIT)
    assert result.exit_code == 0, result.output
    assert (await client.get(CONFIGMAPS, "settings", "shop"))["data"] == {"color": "blue"}

    result = await kube_fixtures.ambientctl(kubeconfig, "get", "configmaps", "-o", "yaml", timeout=WAIT)
    assert result.exit_code == 0, result.output
    assert "color: blue" in result.output

    result = await kube_fixtures.ambientctl(kubeconfig, "delete", "configmap", "settings", timeout=WAIT)
    assert result.exit_code == 0, result.output
    assert not (await client.list(CONFIGMAPS, "shop"))["items"]


async def test_a_wrong_token_is_a_one_line_error(cluster: tuple[KubeClient, Path], tmp_path: Path) -> None:
    client, _ = cluster
    bad = kube_fixtures.write_kubeconfig(tmp_path / "bad", client.config.server, "not-the-token", "shop")
    result = await kube_fixtures.ambientctl(bad, "label", "namespace", "shop", "a=b", timeout=WAIT)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: You must be logged in to the server (Unauthorized): {client.config.server} refused the credentials "
        "of the kubeconfig's current context"]
