"""The waypoints' ClusterRoleBinding against a real API server on loopback: its subjects follow the accepted
waypoint Gateways, and edits or a deletion by someone else are undone. Every wait polls a condition with a
deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from ambient.control.waypoints import GATEWAY, WaypointController
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable
from tests.integration import kube_fixtures

Obj = dict[str, Any]
T = TypeVar("T")

TOKEN = "test-token"
WAIT = 5.0  # seconds any one expectation may take
ROLE = "ambient-waypoint"
CRB = ResourceTable().require("clusterrolebindings.rbac.authorization.k8s.io")
MESH = {"name": "mesh", "port": 15008, "protocol": "HBONE"}


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    return await kube_fixtures.eventually(probe, what, WAIT)


def gateway(namespace: str, name: str, listeners: list[Obj] | None = None) -> Obj:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": [MESH] if listeners is None else listeners}}


def binding(subjects: list[Obj], role: str = ROLE) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": ROLE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": subjects}


def sa(namespace: str, name: str) -> tuple[str, str, str]:
    return ("ServiceAccount", namespace, name)


async def get_binding(kube: KubeClient) -> Obj | None:
    try:
        return await kube.get(CRB, ROLE)
    except ApiError as exc:
        if exc.code == 404:
            return None
        raise


def subjects_are(kube: KubeClient, *expected: tuple[str, str, str]) -> Callable[[], Awaitable[Obj | None]]:
    async def probe() -> Obj | None:
        current = await get_binding(kube)
        if current is None:
            return None
        found = [(s.get("kind"), s.get("namespace"), s.get("name")) for s in current.get("subjects") or []]
        return current if found == list(expected) else None
    return probe


def settled(kube: KubeClient) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        gw = await kube.get(GATEWAY, "waypoint", "shop")
        return any(c.get("reason") == "AddressNotAssigned" for c in (gw.get("status") or {}).get("conditions") or [])
    return probe


@contextlib.asynccontextmanager
async def controller(kube: KubeClient, cluster_role: str = ROLE) -> AsyncIterator[WaypointController]:
    waypoints = WaypointController(kube, cluster_role=cluster_role)
    task = asyncio.create_task(waypoints.run(), name="waypoints")
    try:
        yield waypoints
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    async with kube_fixtures.local_apiserver(TOKEN) as url, KubeClient(KubeConfig(url, token=TOKEN)) as client:
        for ns in ("shop", "bookinfo"):
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        yield client


async def test_subjects_are_exactly_the_accepted_waypoints_accounts(kube: KubeClient) -> None:
    async with controller(kube):
        await eventually(subjects_are(kube), "an empty binding while there is no waypoint")
        await kube.create(gateway("shop", "waypoint"))
        await kube.create(gateway("bookinfo", "reviews-wp"))
        await kube.create(gateway("bookinfo", "broken", listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]))
        current = await eventually(subjects_are(kube, sa("bookinfo", "reviews-wp"), sa("shop", "waypoint")),
                                   "both waypoints' accounts, sorted, and not the invalid Gateway's")
        assert current["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROLE}

        await kube.delete(GATEWAY, "reviews-wp", "bookinfo")
        await eventually(subjects_are(kube, sa("shop", "waypoint")), "the deleted waypoint's account gone")


async def test_edits_and_deletion_by_others_are_undone(kube: KubeClient) -> None:
    # What the installer used to render: every ServiceAccount in the cluster.
    await kube.create(binding([{"kind": "Group", "name": "system:serviceaccounts",
                                "apiGroup": "rbac.authorization.k8s.io"}]))
    await kube.create(gateway("shop", "waypoint"))
    async with controller(kube):
        await eventually(subjects_are(kube, sa("shop", "waypoint")), "the group replaced by the waypoint's account")
        # Let the Gateway settle (no pod runs here, so its status stops at AddressNotAssigned): from now on
        # only the binding's own watch events can bring the controller back to it.
        await eventually(settled(kube), "the Gateway's status to settle")

        await kube.patch(CRB, ROLE, {"subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "shop"}]})
        await eventually(subjects_are(kube, sa("shop", "waypoint")), "an added subject removed again")

        await kube.delete(CRB, ROLE)
        await eventually(subjects_are(kube, sa("shop", "waypoint")), "the deleted binding created again")


async def test_a_binding_to_another_role_is_recreated(kube: KubeClient) -> None:
    await kube.create(binding([], role="cluster-admin"))
    await kube.create(gateway("shop", "waypoint"))
    async with controller(kube):
        current = await eventually(subjects_are(kube, sa("shop", "waypoint")), "the binding re-created")
        assert current["roleRef"]["name"] == ROLE


async def test_without_a_cluster_role_no_binding_is_written(kube: KubeClient) -> None:
    await kube.create(gateway("shop", "waypoint"))
    async with controller(kube, cluster_role="") as waypoints:
        await waypoints.wait_synced()
        sa_type = ResourceTable().require("serviceaccounts")

        async def deployed() -> Obj | None:
            try:
                return await kube.get(sa_type, "waypoint", "shop")
            except ApiError:
                return None

        await eventually(deployed, "the waypoint deployed")  # the controller has run its passes
        assert await get_binding(kube) is None
