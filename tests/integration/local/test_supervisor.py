"""The supervisor's ztunnel mirror pods (`ZtunnelMirrors`) against a real local API server on loopback, with
fake ztunnel processes: what a kubelet does for static pods, seen through the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable
from ambient.local.kubelet import MIRROR_ANNOTATION
from ambient.local.network import NodeNet
from ambient.local.supervisor import ZTUNNEL_NAMESPACE, ZtunnelMirrors
from tests.integration import kube_fixtures
from tests.integration.kube_fixtures import local_apiserver

Obj = dict[str, Any]
TOKEN = "mirror-test-token"
WAIT = 5.0
POD = ResourceTable().require("pods")


@dataclass
class FakeZtunnel:
    argv: list[str] = field(default_factory=lambda: ["ztunnel", "--node-name", "x"])
    started_at: str | None = "2024-05-01T10:00:00Z"
    restarts: int = 0
    running: bool = True


@dataclass
class Env:
    client: KubeClient
    mirrors: ZtunnelMirrors
    ztunnels: dict[NodeNet, FakeZtunnel]

    async def pod(self, name: str) -> Obj | None:
        try:
            return await self.client.get(POD, name, ZTUNNEL_NAMESPACE)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def until(self, name: str, check: Any, what: str) -> Obj:
        async def probe() -> Obj | None:
            pod = await self.pod(name)
            return pod if check(pod) else None
        return await kube_fixtures.eventually(probe, what, WAIT)

    async def gone(self, name: str, what: str) -> None:
        async def probe() -> bool:
            return await self.pod(name) is None
        await kube_fixtures.eventually(probe, what, WAIT)


def ready(pod: Obj | None) -> str | None:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return next((c["status"] for c in conditions if c["type"] == "Ready"), None)


def stray_mirror(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ZTUNNEL_NAMESPACE, "labels": {"app": "ztunnel"},
                         "annotations": {MIRROR_ANNOTATION: "old"}},
            "spec": {"nodeName": "node-3", "containers": [{"name": "istio-proxy"}]}}


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with local_apiserver(TOKEN) as url, KubeClient(KubeConfig(url, token=TOKEN)) as client:
        await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ZTUNNEL_NAMESPACE}})
        # Left by an earlier run with three nodes, and a ztunnel pod that is no mirror (not ours to touch).
        await client.create(stray_mirror("ztunnel-node-3"))
        await client.create({**stray_mirror("ztunnel-abcde"), "metadata": {
            "name": "ztunnel-abcde", "namespace": ZTUNNEL_NAMESPACE, "labels": {"app": "ztunnel"}}})
        ztunnels = {NodeNet(1): FakeZtunnel(), NodeNet(2): FakeZtunnel()}
        mirrors = ZtunnelMirrors(client, dict(ztunnels))
        task = asyncio.create_task(mirrors.run())
        try:
            yield Env(client, mirrors, ztunnels)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_each_nodes_ztunnel_gets_a_mirror_pod_shaped_like_the_daemonsets(env: Env) -> None:
    pod = await env.until("ztunnel-node-2", lambda p: ready(p) == "True", "a Ready mirror pod for node-2")
    meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
    assert meta["labels"]["app"] == "ztunnel" and meta["annotations"][MIRROR_ANNOTATION]
    assert (spec["nodeName"], spec["hostNetwork"]) == ("node-2", True)
    [container] = spec["containers"]
    assert container["name"] == "istio-proxy"
    assert [p["containerPort"] for p in container["ports"]] == [15000, 15020, 15021]
    assert (status["phase"], status["podIP"], status["hostIP"]) == ("Running", "172.30.0.12", "172.30.0.12")
    assert status["containerStatuses"][0]["state"] == {"running": {"startedAt": "2024-05-01T10:00:00Z"}}
    # Found the way tools find the ztunnel of a node.
    listing = await env.client.list(POD, ZTUNNEL_NAMESPACE, "app=ztunnel", "spec.nodeName=node-1")
    assert [p["metadata"]["name"] for p in listing["items"]] == ["ztunnel-node-1"]


async def test_stale_mirror_pods_go_and_other_ztunnel_pods_stay(env: Env) -> None:
    await env.until("ztunnel-node-1", lambda p: p is not None, "node-1's mirror pod")
    await env.gone("ztunnel-node-3", "the mirror pod of a node that left to go")
    assert await env.pod("ztunnel-abcde") is not None


async def test_status_follows_the_process(env: Env) -> None:
    await env.until("ztunnel-node-1", lambda p: ready(p) == "True", "a Ready mirror pod")
    ztunnel = env.ztunnels[NodeNet(1)]
    ztunnel.running, ztunnel.restarts = False, 1
    env.mirrors.dirty.set()  # what the supervised process's on_change does
    pod = await env.until("ztunnel-node-1", lambda p: ready(p) == "False", "the mirror pod to turn not Ready")
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 1
    assert pod["status"]["containerStatuses"][0]["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}


async def test_a_deleted_mirror_pod_comes_back_as_a_new_pod(env: Env) -> None:
    first = await env.until("ztunnel-node-1", lambda p: ready(p) == "True", "a Ready mirror pod")
    deleting = await env.client.delete(POD, "ztunnel-node-1", ZTUNNEL_NAMESPACE)
    assert deleting["metadata"]["deletionTimestamp"]  # bound to a node: graceful, and no kubelet will finish it
    await env.until("ztunnel-node-1", lambda p: p is not None and p["metadata"]["uid"] != first["metadata"]["uid"]
                    and not p["metadata"].get("deletionTimestamp") and ready(p) == "True", "a fresh mirror pod")


async def test_an_outdated_mirror_pod_is_replaced(env: Env) -> None:
    first = await env.until("ztunnel-node-1", lambda p: ready(p) == "True", "a Ready mirror pod")
    env.ztunnels[NodeNet(1)].argv = ["ztunnel", "--node-name", "node-1", "--new-flag"]
    env.mirrors.dirty.set()
    pod = await env.until("ztunnel-node-1", lambda p: p and p["metadata"]["uid"] != first["metadata"]["uid"],
                          "the mirror pod of the new command line")
    assert pod["spec"]["containers"][0]["command"][-1] == "--new-flag"
