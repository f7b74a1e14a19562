"""ConfigMap `istio-ca-root-cert` against a real API server on loopback: every namespace gets the mesh root,
and a deleted or edited copy is put back, as istiod's namespace controller does. Every wait polls a
condition with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from ambient.control.rootcert import RootCertPublisher
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable
from tests.integration import kube_fixtures

Obj = dict[str, Any]
T = TypeVar("T")

TOKEN = "test-token"
WAIT = 5.0  # seconds any one expectation may take
ROOT = "-----BEGIN CERTIFICATE-----\nroot-1\n-----END CERTIFICATE-----\n"
NEW_ROOT = "-----BEGIN CERTIFICATE-----\nroot-2\n-----END CERTIFICATE-----\n"
CM = "istio-ca-root-cert"
TYPES = ResourceTable()
CONFIGMAPS, NAMESPACES = TYPES.require("configmaps"), TYPES.require("namespaces")


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    return await kube_fixtures.eventually(probe, what, WAIT)


def namespace(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


async def get_cm(kube: KubeClient, ns: str) -> Obj | None:
    try:
        return await kube.get(CONFIGMAPS, CM, ns)
    except ApiError as exc:
        if exc.code == 404:
            return None
        raise


def root_in(kube: KubeClient, ns: str, root: str = ROOT) -> Callable[[], Awaitable[Obj | None]]:
    async def probe() -> Obj | None:
        cm = await get_cm(kube, ns)
        return cm if cm and (cm.get("data") or {}).get("root-cert.pem") == root else None
    return probe


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeClient, RootCertPublisher]]:
    async with kube_fixtures.local_apiserver(TOKEN) as url, KubeClient(KubeConfig(url, token=TOKEN)) as kube:
        for name in ("shop", "kube-public"):
            await kube.create(namespace(name))
        publisher = RootCertPublisher(kube, ROOT)
        task = asyncio.create_task(publisher.run(), name="root-cert-publisher")
        try:
            yield kube, publisher
            assert not task.done(), task.exception()
            assert publisher.queue.failing() == {}, "no write may be failing at the end"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_existing_and_new_namespaces_get_the_root_but_skipped_ones_do_not(
        cluster: tuple[KubeClient, RootCertPublisher]) -> None:
    kube, publisher = cluster
    cm = await eventually(root_in(kube, "shop"), "the root in the namespace that existed at start")
    assert cm["metadata"]["labels"] == {"istio.io/config": "true"}

    await kube.create(namespace("bookinfo"))
    await eventually(root_in(kube, "bookinfo"), "the root in a namespace created later")

    await publisher.wait_synced()
    assert await get_cm(kube, "kube-public") is None  # istiod skips it too


async def test_a_deleted_configmap_comes_back_and_an_edited_one_is_repaired(
        cluster: tuple[KubeClient, RootCertPublisher]) -> None:
    kube, _ = cluster
    await eventually(root_in(kube, "shop"), "the root published")

    await kube.delete(CONFIGMAPS, CM, "shop")
    await eventually(root_in(kube, "shop"), "the deleted ConfigMap created again")

    await kube.patch(CONFIGMAPS, CM, {"data": {"root-cert.pem": "tampered", "notes.txt": "mine"}}, "shop")
    repaired = await eventually(root_in(kube, "shop"), "the edited root rewritten")
    assert repaired["data"]["notes.txt"] == "mine"  # as istiod: only its own key is rewritten


async def test_a_new_root_reaches_every_namespace(cluster: tuple[KubeClient, RootCertPublisher]) -> None:
    kube, publisher = cluster
    await kube.create(namespace("bookinfo"))
    for ns in ("shop", "bookinfo"):
        await eventually(root_in(kube, ns), f"the first root in {ns}")
    publisher.set_roots(NEW_ROOT)
    for ns in ("shop", "bookinfo"):
        await eventually(root_in(kube, ns, NEW_ROOT), f"the new root in {ns}")


async def test_a_terminating_namespace_is_left_alone(cluster: tuple[KubeClient, RootCertPublisher]) -> None:
    kube, publisher = cluster
    await eventually(root_in(kube, "shop"), "the root published")
    # No namespace controller runs here: the `kubernetes` finalizer keeps the namespace Terminating.
    await kube.delete(NAMESPACES, "shop")

    async def terminating() -> bool:
        ns = publisher.namespaces.get("shop")
        return bool(ns and (ns.get("status") or {}).get("phase") == "Terminating")

    await eventually(terminating, "the namespace Terminating in the publisher's cache")
    await kube.delete(CONFIGMAPS, CM, "shop")  # what a namespace controller does while it terminates

    async def seen_gone() -> bool:
        return publisher.configmaps.get(CM, "shop") is None

    await eventually(seen_gone, "the deletion seen by the publisher")
    await asyncio.sleep(0.3)  # several debounce periods: time for a wrong re-create to happen
    assert await get_cm(kube, "shop") is None
