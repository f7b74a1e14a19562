"""The waypoint controller (PROTOCOLS.md §8) against a real API server on loopback, with the local cluster's
controllers turning its Deployment into a pod. There is no kubelet here: the test plays it and marks the
waypoint pod Ready itself. Every wait polls a condition with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from ambient.control.waypoints import GATEWAY, WaypointController, WaypointTemplate
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable
from ambient.local.controllers import Controllers
from tests.integration import kube_fixtures

Obj = dict[str, Any]
T = TypeVar("T")

TOKEN, NS = "test-token", "shop"
WAIT = 5.0  # seconds any one expectation may take
STAND_IN = ("python3", "-m", "http.server", "15021")  # only written into the pod spec: no kubelet runs it here
TYPES = ResourceTable()
SA, DEPLOYMENT, SERVICE, POD = (TYPES.require(n) for n in ("serviceaccounts", "deployments.apps", "services", "pods"))
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def waypoint_gateway(name: str, *, listeners: list[Obj] | None = None, waypoint_for: str = "service") -> Obj:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": NS, "labels": {"istio.io/waypoint-for": waypoint_for}},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": listeners if listeners is not None else [
                         {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT) -> T:
    return await kube_fixtures.eventually(probe, what, timeout)


@pytest.fixture
async def client() -> AsyncIterator[KubeClient]:
    tasks: list[asyncio.Task[None]] = []
    async with kube_fixtures.local_apiserver(TOKEN) as url, KubeClient(KubeConfig(url, token=TOKEN)) as kube:
        try:
            await kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
            controller = WaypointController(kube, WaypointTemplate(command=STAND_IN))
            tasks = [asyncio.create_task(Controllers(kube).run(), name="local-controllers"),
                     asyncio.create_task(controller.run(), name="waypoints")]
            yield kube
            for task in tasks:
                assert not task.done(), task.exception()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def get(kube: KubeClient, rt: Any, name: str) -> Obj | None:
    try:
        return await kube.get(rt, name, NS)
    except ApiError as exc:
        if exc.code == 404:
            return None
        raise


def condition(gw: Obj, kind: str) -> Obj:
    return next((c for c in (gw.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


async def waypoint_pods(kube: KubeClient, name: str) -> list[Obj]:
    return list((await kube.list(POD, NS, label_selector=f"{GATEWAY_NAME_LABEL}={name}"))["items"])


async def test_waypoint_lifecycle(client: KubeClient) -> None:
    gw = await client.create(waypoint_gateway("waypoint"))

    async def deployed() -> tuple[Obj, Obj, Obj] | None:
        sa, deploy, svc = [await get(client, rt, "waypoint") for rt in (SA, DEPLOYMENT, SERVICE)]
        return (sa, deploy, svc) if sa and deploy and svc else None

    sa, deploy, svc = await eventually(deployed, "the waypoint's ServiceAccount, Deployment and Service")
    owner = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "waypoint",
             "uid": gw["metadata"]["uid"]}
    for obj in (sa, deploy, svc):
        assert owner in obj["metadata"]["ownerReferences"]
        assert obj["metadata"]["labels"][GATEWAY_NAME_LABEL] == "waypoint"
    assert svc["metadata"]["labels"]["istio.io/waypoint-for"] == "service"
    assert svc["spec"]["selector"] == {GATEWAY_NAME_LABEL: "waypoint"}
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} >= {("mesh", 15008)}
    assert deploy["spec"]["template"]["spec"]["containers"][0]["command"] == list(STAND_IN)

    # The local controllers make the pod; until it is Ready the Gateway has no address.
    [pod] = await eventually(lambda: waypoint_pods(client, "waypoint"), "the waypoint pod")
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["spec"]["serviceAccountName"] == "waypoint"

    async def pending() -> Obj | None:
        current = await client.get(GATEWAY, "waypoint", NS)
        return current if condition(current, "Programmed").get("reason") == "AddressNotAssigned" else None

    gw = await eventually(pending, "Programmed=False/AddressNotAssigned while no pod is ready")
    assert "addresses" not in gw["status"]
    assert condition(gw, "Programmed")["status"] == "False"
    assert condition(gw, "Accepted")["status"] == "True"

    await client.patch(POD, pod["metadata"]["name"], {"status": {
        "phase": "Running", "podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]}}, NS,
        status=True)

    async def programmed() -> Obj | None:
        current = await client.get(GATEWAY, "waypoint", NS)
        return current if condition(current, "Programmed").get("status") == "True" else None

    gw = await eventually(programmed, "Programmed=True once the pod is ready")
    assert gw["status"]["addresses"][0] == {"type": "IPAddress", "value": svc["spec"]["clusterIP"]}
    assert {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"} in gw["status"]["addresses"]
    assert condition(gw, "Programmed")["reason"] == "Programmed"

    # A changed waypoint-for label reaches the Service.
    await client.patch(GATEWAY, "waypoint", {"metadata": {"labels": {"istio.io/waypoint-for": "all"}}}, NS)

    async def relabelled() -> bool:
        current = await get(client, SERVICE, "waypoint")
        return bool(current and current["metadata"]["labels"].get("istio.io/waypoint-for") == "all")

    await eventually(relabelled, "the Service to carry istio.io/waypoint-for=all")

    # Deleting the Gateway takes everything with it.
    await client.delete(GATEWAY, "waypoint", NS)

    async def gone() -> bool:
        left = [rt.kind for rt in (SA, DEPLOYMENT, SERVICE) if await get(client, rt, "waypoint")]
        return not left and not await waypoint_pods(client, "waypoint")

    await eventually(gone, "the ServiceAccount, Deployment, Service and pod to be deleted")


async def test_a_waypoint_without_the_hbone_listener_is_not_accepted(client: KubeClient) -> None:
    await client.create(waypoint_gateway("bad", listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]))

    async def rejected() -> Obj | None:
        current = await client.get(GATEWAY, "bad", NS)
        return current if condition(current, "Accepted").get("status") == "False" else None

    gw = await eventually(rejected, "Accepted=False")
    accepted = condition(gw, "Accepted")
    assert accepted["reason"] == "ListenersNotValid"
    assert 'Expected a single listener on port 15008 with protocol "HBONE"' in accepted["message"]
    assert "addresses" not in gw["status"]
    # The status is written in the same pass that decides to deploy nothing.
    assert [rt.kind for rt in (SA, DEPLOYMENT, SERVICE) if await get(client, rt, "bad")] == []

    # Fixing the listener deploys the waypoint.
    await client.patch(GATEWAY, "bad", {"spec": {"listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
                       NS)

    async def deployed() -> bool:
        return all([await get(client, rt, "bad") for rt in (SA, DEPLOYMENT, SERVICE)])

    await eventually(deployed, "the waypoint's objects once the listener is fixed")
