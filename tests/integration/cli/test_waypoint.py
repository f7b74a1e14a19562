"""`ambientctl waypoint` against a real API server on loopback, through `--kubeconfig`.

The CLI runs its own event loop, so each invocation runs in a worker thread while the server (and a fake
waypoint controller that writes the Gateways' status, standing in for `ambient/control/waypoints.py`) runs on
the test's loop. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import Result

from ambient.cli import waypoint as waypoint_cli
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable
from tests.integration import kube_fixtures
from tests.integration.kube_fixtures import HOST, free_port, write_kubeconfig

Obj = dict[str, Any]
T = TypeVar("T")

TOKEN = "test-token"
WAIT = 10.0  # seconds any one expectation may take (a CLI run included)
TYPES = ResourceTable()
GATEWAY = TYPES.require("gateways.gateway.networking.k8s.io")
NAMESPACE = TYPES.require("namespaces")
MESH_LISTENER = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
NOT_READY = "no waypoint pod is ready yet"


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT) -> T:
    return await kube_fixtures.eventually(probe, what, timeout)


@dataclass
class Cluster:
    client: KubeClient
    kubeconfig: Path

    async def ambientctl(self, *args: str) -> Result:
        """The default namespace (the kubeconfig context's) is `shop`."""
        return await ambientctl(self.kubeconfig, *args)

    async def gateway(self, name: str, ns: str = "shop") -> Obj | None:
        try:
            return await self.client.get(GATEWAY, name, ns)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def namespace_labels(self, ns: str = "shop") -> dict[str, str]:
        return dict((await self.client.get(NAMESPACE, ns))["metadata"].get("labels") or {})

    async def set_programmed(self, name: str, status: str, ns: str = "shop", reason: str = "AddressNotAssigned",
                             message: str = NOT_READY) -> None:
        conditions = [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted"},
                      {"type": "Programmed", "status": status, "reason": reason, "message": message}]
        await self.client.patch(GATEWAY, name, {"status": {"conditions": conditions}}, ns, status=True)


async def ambientctl(kubeconfig: Path, *args: str) -> Result:
    """One CLI run in a worker thread; fails on an uncaught exception (a traceback for the user)."""
    return await kube_fixtures.ambientctl(kubeconfig, *args, timeout=WAIT)


def condition(gw: Obj, kind: str) -> Obj:
    return next((c for c in (gw.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waypoint_cli, "POLL_INTERVAL", 0.05)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Obj]:
    """Every Gateway the CLI reads while waiting (in its thread), so a test can see it polled."""
    seen: list[Obj] = []
    real = waypoint_cli.get_gateway

    async def counting(client: KubeClient, name: str, namespace: str) -> Obj | None:
        gw = await real(client, name, namespace)
        if gw is not None:
            seen.append(gw)
        return gw

    monkeypatch.setattr(waypoint_cli, "get_gateway", counting)
    return seen


async def polled_while_not_programmed(reads: list[Obj], times: int = 3) -> None:
    """Wait until the CLI has read the Gateway with Programmed=False `times` times."""
    async def enough() -> bool:
        return sum(1 for gw in reads if condition(gw, "Programmed").get("status") == "False") >= times

    await eventually(enough, f"{times} reads of a not-programmed Gateway")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with kube_fixtures.local_apiserver(TOKEN) as url, KubeClient(KubeConfig(url, token=TOKEN)) as client:
        for ns in ("default", "shop", "bank", "empty"):
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        yield Cluster(client, kube_fixtures.write_kubeconfig(tmp_path / "kubeconfig", url, TOKEN, "shop"))


class FakeController:
    """Plays the waypoint controller for Gateways of class istio-waypoint: `Programmed` False (with a message)
    as soon as it sees one, True once `release` is set."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.release = asyncio.Event()

    async def run(self) -> None:
        while True:
            for gw in (await self.cluster.client.list(GATEWAY))["items"]:
                want = "True" if self.release.is_set() else "False"
                if gw["spec"].get("gatewayClassName") == "istio-waypoint" and \
                        condition(gw, "Programmed").get("status") != want:
                    meta = gw["metadata"]
                    await self.cluster.set_programmed(meta["name"], want, meta["namespace"],
                                                      *(("Programmed", "Resource programmed") if want == "True"
                                                        else ()))
            await asyncio.sleep(0.02)


@pytest.fixture
async def controller(cluster: Cluster) -> AsyncIterator[FakeController]:
    fake = FakeController(cluster)
    task = asyncio.create_task(fake.run(), name="fake-waypoint-controller")
    try:
        yield fake
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- apply -----------------------------------------------------------------------------------------
async def test_apply_writes_the_waypoint_gateway_and_wait_returns_once_programmed(
        cluster: Cluster, controller: FakeController, reads: list[Obj]) -> None:
    run = asyncio.create_task(cluster.ambientctl("waypoint", "apply", "-n", "shop", "--wait"))

    async def held_back() -> Obj | None:
        gw = await cluster.gateway("waypoint")
        return gw if gw and condition(gw, "Programmed").get("status") == "False" else None

    gw = await eventually(held_back, "the Gateway with Programmed=False")
    assert gw["spec"] == {"gatewayClassName": "istio-waypoint", "listeners": [MESH_LISTENER]}
    assert "istio.io/waypoint-for" not in (gw["metadata"].get("labels") or {})  # the control plane's default
    # --wait must not return while the waypoint is not programmed.
    await polled_while_not_programmed(reads)
    assert not run.done()

    controller.release.set()
    result = await asyncio.wait_for(run, WAIT)
    assert result.exit_code == 0, result.output
    assert result.stdout == "✅ waypoint shop/waypoint applied\n✅ waypoint shop/waypoint is ready!\n"


async def test_wait_timeout_fails_with_the_gateways_condition_and_does_not_enroll(
        cluster: Cluster, controller: FakeController) -> None:
    result = await cluster.ambientctl("waypoint", "apply", "--enroll-namespace", "--wait", "--waypoint-timeout", "1s")
    assert result.exit_code == 1
    assert "✅ waypoint shop/waypoint applied\n" in result.stdout
    assert "is ready" not in result.stdout
    assert result.stderr == ("error: timed out while waiting for waypoint shop/waypoint: Programmed=False "
                             f"(AddressNotAssigned): {NOT_READY}\n")
    assert "istio.io/use-waypoint" not in await cluster.namespace_labels()


async def test_wait_without_a_controller_says_none_wrote_status(cluster: Cluster) -> None:
    result = await cluster.ambientctl("waypoint", "apply", "--wait", "--waypoint-timeout", "300ms")
    assert result.exit_code == 1
    assert "Programmed=Unknown (Pending): Waiting for controller" in result.stderr
    assert "is the waypoint controller (the ambient control plane) running?" in result.stderr


async def test_for_sets_the_traffic_label_and_reapply_updates_it(cluster: Cluster) -> None:
    result = await cluster.ambientctl("waypoint", "apply", "--name", "wp", "--for", "workload")
    assert (result.exit_code, result.stdout) == (0, "✅ waypoint shop/wp applied\n")
    gw = await cluster.gateway("wp")
    assert gw is not None
    assert gw["metadata"]["labels"] == {"istio.io/waypoint-for": "workload"}

    assert (await cluster.ambientctl("waypoint", "apply", "--name", "wp", "--for", "all")).exit_code == 0
    assert (await cluster.ambientctl("waypoint", "apply", "--name", "wp")).exit_code == 0
    again = await cluster.gateway("wp")
    assert again is not None
    assert again["metadata"]["uid"] == gw["metadata"]["uid"]
    assert again["metadata"]["labels"] == {"istio.io/waypoint-for": "all"}  # no --for: the label is kept
    assert again["spec"]["listeners"] == [MESH_LISTENER]


async def test_apply_repairs_a_waypoint_gateways_listeners(cluster: Cluster) -> None:
    await cluster.client.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                                 "metadata": {"name": "waypoint", "namespace": "shop"},
                                 "spec": {"gatewayClassName": "istio-waypoint",
                                          "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}})
    assert (await cluster.ambientctl("waypoint", "apply")).exit_code == 0
    gw = await cluster.gateway("waypoint")
    assert gw is not None
    assert gw["spec"]["listeners"] == [MESH_LISTENER]


@pytest.mark.parametrize(("args", "message"), [
    (("--for", "pods"), "error: invalid traffic type: pods. Valid options are: [all none service workload]\n"),
    (("--name", "none"), "error: invalid name provided for waypoint, 'none' is a reserved value\n"),
    (("--wait", "--waypoint-timeout", "soon"), "error: invalid duration 'soon': use e.g. 90s, 2m or 1m30s\n"),
    (("-n", "nowhere"), "error: namespace: nowhere not found\n"),
])
async def test_apply_refuses_bad_input_without_writing(cluster: Cluster, args: tuple[str, ...], message: str) -> None:
    result = await cluster.ambientctl("waypoint", "apply", *args)
    assert (result.exit_code, result.stderr, result.stdout) == (1, message, "")
    assert (await cluster.client.list(GATEWAY))["items"] == []


async def test_apply_will_not_take_over_a_gateway_of_another_class(cluster: Cluster) -> None:
    await cluster.client.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                                 "metadata": {"name": "waypoint", "namespace": "shop"},
                                 "spec": {"gatewayClassName": "istio", "listeners": [
                                     {"name": "http", "port": 80, "protocol": "HTTP"}]}})
    result = await cluster.ambientctl("waypoint", "apply")
    assert result.exit_code == 1
    assert "gateway shop/waypoint exists and is not a waypoint (gatewayClassName 'istio')" in result.stderr
    gw = await cluster.gateway("waypoint")
    assert gw is not None
    assert gw["spec"]["gatewayClassName"] == "istio"


# -- enrollment ------------------------------------------------------------------------------------
async def test_enroll_namespace_labels_it_and_warns_when_it_is_not_ambient(cluster: Cluster) -> None:
    result = await cluster.ambientctl("waypoint", "apply", "--enroll-namespace")
    assert result.exit_code == 0
    assert result.stdout == (
        "⚠️ Warning: namespace is not enrolled in ambient. Consider running "
        "`ambientctl label namespace shop istio.io/dataplane-mode=ambient`\n"
        "✅ waypoint shop/waypoint applied\n"
        '✅ namespace shop labeled with "istio.io/use-waypoint: waypoint"\n')
    assert (await cluster.namespace_labels())["istio.io/use-waypoint"] == "waypoint"

    await cluster.client.patch(NAMESPACE, "bank", {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    result = await cluster.ambientctl("waypoint", "apply", "-n", "bank", "--enroll-namespace")
    assert result.exit_code == 0
    assert "Warning" not in result.stdout
    assert (await cluster.namespace_labels("bank"))["istio.io/use-waypoint"] == "waypoint"


async def test_enroll_refuses_to_replace_another_waypoint_without_overwrite(cluster: Cluster) -> None:
    await cluster.client.patch(NAMESPACE, "shop", {"metadata": {"labels": {"istio.io/use-waypoint": "other"}}})
    result = await cluster.ambientctl("waypoint", "apply", "--name", "wp", "--enroll-namespace")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: namespace (shop) already has an enrolled Waypoint "
                                    "(istio.io/use-waypoint=other). Consider adding the `--overwrite` flag")
    assert (await cluster.namespace_labels())["istio.io/use-waypoint"] == "other"
    assert await cluster.gateway("wp") is None  # nothing applied, as istioctl

    # The same waypoint again is not a conflict.
    assert (await cluster.ambientctl("waypoint", "apply", "--name", "other", "--enroll-namespace")).exit_code == 0

    result = await cluster.ambientctl("waypoint", "apply", "--name", "wp", "--enroll-namespace", "--overwrite")
    assert result.exit_code == 0
    assert (await cluster.namespace_labels())["istio.io/use-waypoint"] == "wp"


# -- list ------------------------------------------------------------------------------------------
async def test_list(cluster: Cluster) -> None:
    for args in (("--name", "waypoint"), ("--name", "wp", "--for", "all", "-r", "canary"), ("-n", "bank")):
        assert (await cluster.ambientctl("waypoint", "apply", *args)).exit_code == 0
    await cluster.set_programmed("wp", "True")
    await cluster.client.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                                 "metadata": {"name": "ingress", "namespace": "shop"},
                                 "spec": {"gatewayClassName": "istio", "listeners": [
                                     {"name": "http", "port": 80, "protocol": "HTTP"}]}})

    result = await cluster.ambientctl("waypoint", "list")  # the kubeconfig context's namespace
    assert (result.exit_code, result.stdout.splitlines()) == (0, [
        "NAME         REVISION     TRAFFIC TYPE     PROGRAMMED",
        "waypoint     default      service          False",
        "wp           canary       all              True",
    ])
    result = await cluster.ambientctl("waypoint", "list", "-A")
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["NAMESPACE", "NAME", "REVISION", "TRAFFIC", "TYPE", "PROGRAMMED"],
        ["bank", "waypoint", "default", "service", "False"],
        ["shop", "waypoint", "default", "service", "False"],
        ["shop", "wp", "canary", "all", "True"],
    ]
    result = await cluster.ambientctl("waypoint", "list", "-n", "empty")
    assert (result.exit_code, result.stdout) == (0, "No waypoints found.\n")
    result = await cluster.ambientctl("waypoint", "list", "-n", "nowhere")
    assert (result.exit_code, result.stderr) == (1, "error: namespace: nowhere not found\n")


# -- status ----------------------------------------------------------------------------------------
async def test_status_shows_the_explaining_condition(cluster: Cluster) -> None:
    for name in ("waypoint", "wp"):
        assert (await cluster.ambientctl("waypoint", "apply", "--name", name)).exit_code == 0
    await cluster.set_programmed("waypoint", "True", reason="Programmed", message="Resource programmed")
    await cluster.set_programmed("wp", "False")

    result = await cluster.ambientctl("waypoint", "status")
    assert (result.exit_code, result.stdout.splitlines()) == (0, [
        "NAME         STATUS     TYPE           REASON                 MESSAGE",
        "waypoint     True       Programmed     Programmed             Resource programmed",
        f"wp           False      Programmed     AddressNotAssigned     {NOT_READY}",
    ])
    result = await cluster.ambientctl("waypoint", "status", "--name", "waypoint")
    assert result.stdout.splitlines()[1:] == [
        "waypoint     True       Programmed     Programmed     Resource programmed"]

    result = await cluster.ambientctl("waypoint", "status", "--name", "wp", "--wait", "--waypoint-timeout", "500ms")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[1].split()[:2] == ["wp", "False"]
    assert result.stderr == ("error: timed out while retrieving status for waypoint shop/wp: Programmed=False "
                             f"(AddressNotAssigned): {NOT_READY}\n")

    result = await cluster.ambientctl("waypoint", "status", "--name", "missing")
    assert (result.exit_code, result.stderr) == (1, "error: waypoint shop/missing not found\n")
    result = await cluster.ambientctl("waypoint", "status", "-n", "empty")
    assert (result.exit_code, result.stdout) == (0, "No waypoints found.\n")


async def test_status_wait_returns_once_programmed(cluster: Cluster, controller: FakeController,
                                                   reads: list[Obj]) -> None:
    assert (await cluster.ambientctl("waypoint", "apply")).exit_code == 0
    run = asyncio.create_task(cluster.ambientctl("waypoint", "status", "--wait"))
    await polled_while_not_programmed(reads)
    assert not run.done()
    controller.release.set()
    result = await asyncio.wait_for(run, WAIT)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1].split()[:3] == ["waypoint", "True", "Programmed"]


# -- delete ----------------------------------------------------------------------------------------
async def test_delete(cluster: Cluster) -> None:
    for args in (("--enroll-namespace",), ("--name", "wp2"), ("--name", "wp3", "-r", "canary")):
        assert (await cluster.ambientctl("waypoint", "apply", *args)).exit_code == 0
    await cluster.client.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                                 "metadata": {"name": "ingress", "namespace": "shop"},
                                 "spec": {"gatewayClassName": "istio", "listeners": [
                                     {"name": "http", "port": 80, "protocol": "HTTP"}]}})

    result = await cluster.ambientctl("waypoint", "delete")  # --name's default: waypoint
    assert (result.exit_code, result.stdout) == (0, "waypoint shop/waypoint deleted\n")
    assert "namespace shop still has istio.io/use-waypoint=waypoint" in result.stderr
    assert await cluster.gateway("waypoint") is None
    assert (await cluster.namespace_labels())["istio.io/use-waypoint"] == "waypoint"  # kept, as istioctl

    result = await cluster.ambientctl("waypoint", "delete", "ingress", "waypoint")
    assert (result.exit_code, result.stdout) == (
        0, "waypoint shop/ingress not found\nwaypoint shop/waypoint not found\n")
    assert await cluster.gateway("ingress") is not None

    result = await cluster.ambientctl("waypoint", "delete", "-r", "canary")
    assert (result.exit_code, result.stdout) == (0, "waypoint shop/wp3 deleted\n")
    result = await cluster.ambientctl("waypoint", "delete", "--all")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "waypoint shop/wp2 deleted\n", "")
    assert await cluster.gateway("ingress") is not None  # not a waypoint
    result = await cluster.ambientctl("waypoint", "delete", "--all")
    assert (result.exit_code, result.stdout) == (0, "No waypoints found.\n")

    result = await cluster.ambientctl("waypoint", "delete", "wp", "--all")
    assert (result.exit_code, result.stderr) == (
        1, "error: cannot specify waypoint names when deleting all waypoints\n")
    result = await cluster.ambientctl("waypoint", "delete", "-n", "nowhere", "wp")
    assert (result.exit_code, result.stderr) == (1, "error: namespace: nowhere not found\n")


# -- no cluster ------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", [("apply",), ("list",), ("status",), ("delete", "--all")])
async def test_an_unreachable_api_server_is_a_clear_error(tmp_path: Path, verb: tuple[str, ...]) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://{HOST}:{free_port()}", TOKEN, "shop")
    result = await ambientctl(kubeconfig, "waypoint", *verb)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error from server (ServiceUnavailable): cannot reach the API server at "
                                    f"http://{HOST}:")
    assert "Traceback" not in result.output
