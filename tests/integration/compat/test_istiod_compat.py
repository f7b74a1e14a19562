"""Compatibility mode (issue 7): our ztunnel configured only through the environment variables Istio's
ztunnel Helm chart sets, against our control plane configured the way istiod is — xDS and CA on one TLS
port whose certificate names `istiod.istio-system.svc`, every call authenticated by a bearer token, and the
node proxy's token allowed to impersonate the pods of its own node (PROTOCOLS.md §5). The ZDS side is our
node agent's `ZdsServer` with no pods enrolled (PROTOCOLS.md §4), which is what readiness waits for.

The chart's env list is `manifests/charts/ztunnel/templates/daemonset.yaml` (Istio 1.2x); see
docs/compatibility.md. Two flags are passed because Istio has no env var for them and the defaults
(15000 on localhost, 15020/15021 on all addresses) would collide with other tests: `--admin-address` and
`--listen-ip`, both on a loopback address of this test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from ambient.control.main import ControlConfig
from ambient.control.main import run as run_control
from ambient.identity.ca_client import CaClient, CaClientConfig, token_from_file
from ambient.identity.errors import CaError
from ambient.identity.spiffe import SpiffeId
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.resources import ResourceTable
from cni.zds_server import ZdsServer
from tests.integration import kube_fixtures
from tests.integration.kube_fixtures import HOST, free_port, local_apiserver, write_kubeconfig

T = TypeVar("T")
Obj = dict[str, Any]

API_TOKEN = "api-admin"
NODE_TOKEN = "ztunnel-node-1-token"  # what the projected `istio-token` (audience istio-ca) holds on node-1
NODE, OTHER_NODE = "node-1", "node-2"
ISTIOD_NAME = "istiod.istio-system.svc"
WAIT = 20.0  # seconds: a Python ztunnel start (imports, TLS) plus the control plane's first translation
REPO = Path(__file__).resolve().parents[3]
PODS = ResourceTable().require("pods")


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT) -> T:
    return await kube_fixtures.eventually(probe, what, timeout, retry_on=(aiohttp.ClientError, OSError))


def pod(name: str, namespace: str, node: str, ip: str, service_account: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


@dataclass
class ControlPlane:
    tls_address: str
    monitoring: str
    root_cert: Path
    token_file: Path


@pytest.fixture
async def api() -> AsyncIterator[str]:
    async with local_apiserver(API_TOKEN) as url:
        yield url


@pytest.fixture
async def control_plane(tmp_path: Path, api: str) -> AsyncIterator[ControlPlane]:
    """A Kubernetes API on loopback holding two ambient pods on two nodes, and `ambient-control` run the
    way it stands in for istiod: TLS 15012-style port, bootstrap tokens for auth, node-1's ztunnel token a
    node proxy for node-1."""
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api, API_TOKEN)
    tokens = tmp_path / "bootstrap-tokens.yaml"
    tokens.write_text(yaml.safe_dump({NODE_TOKEN: {"namespace": "istio-system", "serviceAccount": "ztunnel",
                                                   "node": NODE, "nodeProxy": True}}))
    token_file = tmp_path / "istio-token"
    token_file.write_text(NODE_TOKEN + "\n")
    config = ControlConfig(
        kubeconfig=str(kubeconfig), ca_dir=str(tmp_path / "ca"), bootstrap_tokens=str(tokens), listen=HOST,
        serving_ips=(HOST,), xds_plaintext_port=free_port(), xds_tls_port=free_port(),
        monitoring_port=free_port(), root_cert_out=str(tmp_path / "root-cert.pem"),
        waypoint_command=("true",))
    task: asyncio.Task[None] | None = None
    loop = asyncio.get_running_loop()
    try:
        async with KubeClient(KubeConfig(api, token=API_TOKEN)) as kube:
            for ns in ("shop", "istio-system"):
                labels = {"istio.io/dataplane-mode": "ambient"} if ns == "shop" else {}
                await kube.create({"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": ns, "labels": labels}})
            for body in (pod("web", "shop", NODE, "10.244.1.5", "web"),
                         pod("db", "shop", OTHER_NODE, "10.244.2.7", "db")):
                await kube.create(body)  # status is a subresource: written the way the kubelet does
                await kube.patch(PODS, body["metadata"]["name"], {"status": body["status"]}, "shop", status=True)
            task = asyncio.create_task(run_control(config), name="ambient-control")
            monitoring = f"http://{HOST}:{config.monitoring_port}"

            async def control_ready() -> bool:
                assert not task.done(), task.exception()
                async with aiohttp.ClientSession() as http, http.get(f"{monitoring}/ready") as resp:
                    return resp.status == 200

            await eventually(control_ready, "ambient-control /ready")
            yield ControlPlane(f"{HOST}:{config.xds_tls_port}", monitoring, Path(config.root_cert_out), token_file)
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sig in (signal.SIGTERM, signal.SIGINT):  # run() turned these into cancelling its task
            loop.remove_signal_handler(sig)


def istio_chart_env(cp: ControlPlane, zds_socket: Path) -> dict[str, str]:
    """The env of Istio's ztunnel DaemonSet, with the downward-API values a node-1 pod would get, plus
    the two file locations Istio mounts at fixed paths (here under the test's tmp dir)."""
    return {
        # set by the chart
        "CA_ADDRESS": cp.tls_address,
        "XDS_ADDRESS": cp.tls_address,
        "RUST_LOG": "info",
        "RUST_BACKTRACE": "1",
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "INPOD_ENABLED": "true",
        "TERMINATION_GRACE_PERIOD_SECONDS": "30",
        "POD_NAME": "ztunnel-x7k2p",
        "POD_NAMESPACE": "istio-system",
        "NODE_NAME": NODE,
        "INSTANCE_IP": HOST,
        "SERVICE_ACCOUNT": "ztunnel",
        "ZTUNNEL_CPU_LIMIT": "1",
        # Istio reads these too; the chart leaves them at their defaults, which are mount points
        "XDS_ROOT_CA": str(cp.root_cert),
        "CA_ROOT_CA": str(cp.root_cert),
        "AUTH_TOKEN": str(cp.token_file),
        "INPOD_UDS": str(zds_socket),
        # the process itself
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture
async def zds(tmp_path: Path) -> AsyncIterator[ZdsServer]:
    async def no_pods() -> list[Any]:
        return []

    server = ZdsServer(str(tmp_path / "ztunnel.sock"), no_pods)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def ztunnel(control_plane: ControlPlane, zds: ZdsServer, tmp_path: Path) -> AsyncIterator[str]:
    """Our ztunnel as a subprocess on a loopback address of its own; yields that address."""
    ip = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    log = (tmp_path / "ztunnel.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "ztunnel.main", "--admin-address", f"{ip}:15000",
                             "--listen-ip", ip], env=istio_chart_env(control_plane, Path(zds.path)),
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        yield ip
        assert proc.poll() is None, f"ztunnel exited: {(tmp_path / 'ztunnel.log').read_text()[-2000:]}"
    except BaseException:
        print((tmp_path / "ztunnel.log").read_text()[-4000:])
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.json(content_type=None) if resp.status == 200 else None


async def test_ztunnel_configured_by_istio_env_connects_over_tls_with_its_token_and_becomes_ready(
        control_plane: ControlPlane, zds: ZdsServer, ztunnel: str) -> None:
    async def ready() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"http://{ztunnel}:15021/healthz/ready") as resp:
            return resp.status == 200

    await eventually(ready, "ztunnel ready on 15021 (xDS over TLS + the ZDS snapshot)")
    assert zds.ready.is_set() and zds.connected() == 1

    async def seen_by_control_plane() -> list[Any] | None:
        return await get_json(f"{control_plane.monitoring}/debug/connections") or None

    clients = await eventually(seen_by_control_plane, "the control plane to list ztunnel's xDS stream")
    assert [c["caller"] for c in clients] == ["spiffe://cluster.local/ns/istio-system/sa/ztunnel"]
    assert clients[0]["node"].startswith(f"ztunnel~{HOST}~"), clients[0]["node"]

    async def workloads() -> list[str] | None:
        dump = await get_json(f"http://{ztunnel}:15000/config_dump")
        return dump and sorted(w["uid"] for w in dump["workloads"])

    uids = await eventually(workloads, "both workloads in ztunnel's /config_dump")
    assert uids == ["Kubernetes//Pod/shop/db", "Kubernetes//Pod/shop/web"]


async def test_node_token_gets_certificates_for_its_own_nodes_pods_only(control_plane: ControlPlane) -> None:
    """The CA call ztunnel makes for a pod on its node (same token file, same TLS name, impersonation)."""
    client = CaClient(CaClientConfig(address=control_plane.tls_address, root_pem=control_plane.root_cert.read_text(),
                                     server_name=ISTIOD_NAME, cluster_id="Kubernetes", impersonate=True),
                      token_from_file(control_plane.token_file))
    try:
        web = SpiffeId("cluster.local", "shop", "web")
        cert = await client.fetch_certificate(web)
        assert cert.identity == web
        with pytest.raises(CaError) as refused:  # db runs on node-2: not node-1's to ask for
            await client.fetch_certificate(SpiffeId("cluster.local", "shop", "db"))
        assert refused.value.code == "PERMISSION_DENIED"
    finally:
        await client.close()


async def test_wrong_token_is_refused(control_plane: ControlPlane) -> None:
    client = CaClient(CaClientConfig(address=control_plane.tls_address, root_pem=control_plane.root_cert.read_text(),
                                     server_name=ISTIOD_NAME, impersonate=True), "not-a-token")
    try:
        with pytest.raises(CaError) as refused:
            await client.fetch_certificate(SpiffeId("cluster.local", "shop", "web"))
        assert refused.value.code == "UNAUTHENTICATED"
    finally:
        await client.close()
