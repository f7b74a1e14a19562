"""`ambientctl install` (no --dry-run) against the local API server on loopback: every rendered object is
created, reads back as rendered, and a second install is idempotent."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from ambient.cli.install import InstallValues, render
from ambient.cli.main import cli
from ambient.kube.client import KubeClient, KubeConfig
from ambient.local.apiserver import ApiServer

Obj = dict[str, Any]
HOST, TOKEN = "127.0.0.1", "test-token"
WAIT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[KubeClient, Path]]:
    server = ApiServer(None, TOKEN)
    port = free_port()
    await server.start([HOST], port)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": f"http://{HOST}:{port}"}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
        "users": [{"name": "admin", "user": {"token": TOKEN}}],
    }))
    client = KubeClient(KubeConfig.load(kubeconfig))
    try:
        yield client, kubeconfig
    finally:
        await client.close()
        await server.close()


async def ambientctl(kubeconfig: Path, *args: str) -> Result:
    result = await asyncio.wait_for(asyncio.to_thread(
        CliRunner().invoke, cli, ["--kubeconfig", str(kubeconfig), *args], prog_name="ambientctl"), WAIT)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"ambientctl raised {result.exception!r}:\n{result.output}") from result.exception
    return result


def contains(live: Any, wanted: Any) -> bool:
    """Everything rendered is in the live object (the server may add defaults and metadata)."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and all(map(contains, live, wanted))
    return bool(live == wanted)


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
