"""`ambientctl --kubeconfig FILE ztunnel-config` against a real local API server on loopback: the ztunnel pods
are the local cluster's mirror pods (`ztunnel_mirror_pod`), and node-1's points at a real ztunnel admin
server (with the fake state of tests/integration/ztunnel/test_admin.py) listening on port 15000 of a
loopback address of its own; node-2's address has nothing listening. Every dump goes through a port-forward
(`pods/<pod>/portforward`, WebSocket) to the pod's port 15000, as istioctl's, never through pods/proxy.

The CLI runs its own event loop in a worker thread; the API server and the admin server run on the test's.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from aiohttp import web
from click.testing import Result
from cryptography import x509

from ambient.cli import ztunnel_config
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.resources import ResourceTable
from ambient.local.apiserver import ApiServer
from ambient.local.network import NodeNet
from ambient.local.supervisor import ZTUNNEL_NAMESPACE, ztunnel_mirror_pod
from tests.integration import kube_fixtures
from tests.integration.kube_fixtures import free_port, local_apiserver, write_kubeconfig
from tests.integration.ztunnel.test_admin import BROKEN_ID, SLEEP_CERT, SLEEP_ID, FakeState
from ztunnel.admin import AdminServer

TOKEN = "ztunnel-config-token"
WAIT = 15.0  # seconds for one CLI run
TYPES = ResourceTable()
POD, NAMESPACE = TYPES.require("pods"), TYPES.require("namespaces")


@dataclass
class FakeZtunnelProcess:
    argv: list[str]
    started_at: str | None = "2024-05-01T10:00:00Z"
    restarts: int = 0
    running: bool = True


@dataclass
class Cluster:
    client: KubeClient
    kubeconfig: Path
    ips: dict[str, str]  # node → the loopback address its ztunnel pod has

    async def run(self, *args: str) -> tuple[int, str]:
        result: Result = await kube_fixtures.ambientctl(self.kubeconfig, "ztunnel-config", *args, timeout=WAIT)
        assert "Traceback" not in result.output
        return result.exit_code, result.output


def loopback_ip() -> str:
    """An address of its own in 127/8, so the fake ztunnel can listen on the real admin port 15000."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


async def add_ztunnel_pod(client: KubeClient, node: str, ip: str, namespace: str = ZTUNNEL_NAMESPACE) -> None:
    index = int(node.removeprefix("node-"))
    pod = ztunnel_mirror_pod(NodeNet(index), FakeZtunnelProcess(["ztunnel", "--node-name", node]))
    pod["metadata"]["namespace"] = namespace
    await client.create(pod)
    await client.patch(POD, pod["metadata"]["name"], {"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip,
        "conditions": [{"type": "Ready", "status": "True"}]}}, namespace, status=True)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    ips = {"node-1": loopback_ip(), "node-2": loopback_ip()}
    admin = AdminServer(FakeState(), lambda: None, (ips["node-1"], ztunnel_config.ADMIN_PORT))
    await admin.start()
    try:
        async with local_apiserver(TOKEN) as url, KubeClient(KubeConfig(url, token=TOKEN)) as client:
            for ns in (ZTUNNEL_NAMESPACE, "web"):
                await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            for node, ip in ips.items():
                await add_ztunnel_pod(client, node, ip)
            await client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "web"},
                                 "spec": {"containers": [{"name": "app"}]}})
            yield Cluster(client, write_kubeconfig(tmp_path / "kubeconfig", url, TOKEN), ips)
    finally:
        await admin.close()


def table(output: str) -> list[list[str]]:
    """The words of each line (headers with spaces split too)."""
    return [line.split() for line in output.strip().splitlines()]


# -- the tables (istioctl's columns) -------------------------------------------------------------------------
async def test_workloads_table_from_any_ztunnel(cluster: Cluster) -> None:
    code, output = await cluster.run("workloads")  # two ztunnels, Ready alike: the first by name
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    assert [line.split() for line in lines[1:]] == [
        ["default", "sleep-7d4f9", "10.244.1.5", "node-1", "None", "HBONE"],
        ["web", "httpbin-5c6f", "10.244.2.4", "node-2", "waypoint", "HBONE"],
        ["web", "httpbin-9a1b", "10.244.2.9", "node-2", "None", "TCP"]]
    assert lines[1].index("10.244.1.5") == lines[0].index("ADDRESS")  # aligned columns
    code, output = await cluster.run("workloads", "-n", "default", "--node", "node-1")
    assert [line.split()[1] for line in output.splitlines()[1:]] == ["sleep-7d4f9"]


async def test_services_and_policies_tables(cluster: Cluster) -> None:
    code, output = await cluster.run("services", "--node", "node-1")
    assert code == 0, output
    assert table(output) == [["NAMESPACE", "SERVICE", "NAME", "SERVICE", "VIP", "WAYPOINT", "ENDPOINTS"],
                             ["web", "httpbin", "10.96.0.20", "waypoint", "1/2"],
                             ["web", "waypoint", "10.96.0.30", "None", "0/0"]]
    code, output = await cluster.run("policies", "--node", "node-1")
    assert code == 0, output
    assert table(output) == [["NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE"],
                             ["istio-system", "istio_converted_static_strict", "Deny", "Global"],
                             ["web", "allow-sleep", "Allow", "WorkloadSelector"]]


async def test_certificates_table(cluster: Cluster) -> None:
    code, output = await cluster.run("certificates", "--node", "node-1")
    assert code == 0, output
    rows = table(output)
    assert rows[0] == ["CERTIFICATE", "NAME", "TYPE", "STATUS", "VALID", "CERT", "SERIAL", "NUMBER", "NOT", "AFTER",
                       "NOT", "BEFORE"]
    assert rows[1] == [str(BROKEN_ID), "NA", "Unavailable", "false", "NA", "NA", "NA"]
    leaf = x509.load_pem_x509_certificate(SLEEP_CERT.leaf_pem.encode())
    assert rows[2][:5] == [str(SLEEP_ID), "Leaf", "Available", "true", format(leaf.serial_number, "x")]
    assert rows[2][5] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows[3][:4] == [str(SLEEP_ID), "Root", "Available", "true"]


async def test_connections_of_a_ztunnel_named_by_pod(cluster: Cluster) -> None:
    code, output = await cluster.run("connections", "ztunnel-node-1")
    assert code == 0, output
    assert table(output) == [["WORKLOAD", "STATE", "INBOUND", "OUTBOUND"],
                             ["sleep-7d4f9.default", "Up", "0", "1"],
                             ["httpbin-5c6f.web", "Up", "1", "0"]]
    code, output = await cluster.run("connections", "pod/ztunnel-node-1.istio-system", "--details")
    assert code == 0, output
    assert table(output)[1:] == [
        ["sleep-7d4f9.default", "Outbound", "sleep-7d4f9.default:40936", "httpbin-5c6f.web:15008",
         "httpbin.web.svc.cluster.local:8000", "HBONE"],
        ["httpbin-5c6f.web", "Inbound", "httpbin-5c6f.web:8080", "sleep-7d4f9.default:40936", "HBONE",
         "spiffe://cluster.local/ns/default/sa/sleep"]]


async def test_per_ztunnel_kinds_need_a_ztunnel_named_as_istioctl(cluster: Cluster) -> None:
    for kind in ("certificates", "connections"):
        code, output = await cluster.run(kind)
        assert code == 1
        assert output.startswith("error: ztunnel pod name or --node must be set"), output
        assert "ztunnel-node-1, ztunnel-node-2" in output


async def test_json_output_is_the_dump_section(cluster: Cluster) -> None:
    code, output = await cluster.run("workloads", "-o", "json", "-n", "web", "--node", "node-1")
    assert code == 0, output
    assert [w["name"] for w in json.loads(output)] == ["httpbin-5c6f", "httpbin-9a1b"]
    code, output = await cluster.run("all", "-o", "json", "--node", "node-1")
    assert code == 0 and set(json.loads(output)) >= {"workloads", "services", "policies", "certificates"}


async def test_all_summary_prints_every_table(cluster: Cluster) -> None:
    code, output = await cluster.run("all", "--node", "node-1")
    assert code == 0, output
    for header in ("POD NAME", "SERVICE VIP", "POLICY NAME", "CERTIFICATE NAME"):
        assert header in output


async def test_a_saved_dump_is_read_from_a_file(cluster: Cluster, tmp_path: Path) -> None:
    code, output = await cluster.run("all", "-o", "json", "--node", "node-1")
    saved = tmp_path / "dump.json"
    saved.write_text(output)
    code, output = await cluster.run("policies", "--file", str(saved))
    assert code == 0 and "allow-sleep" in output
    code, output = await cluster.run("policies", "--file", str(tmp_path / "missing.json"))
    assert (code, output.splitlines()) == (1, [f"error: cannot read the config dump file {tmp_path}/missing.json: "
                                               "No such file or directory"])


# -- several ztunnels, and what goes wrong ------------------------------------------------------------------
async def test_a_ztunnel_whose_admin_port_refuses_says_so_in_one_line(cluster: Cluster) -> None:
    code, output = await cluster.run("workloads", "--node", "node-2")
    assert code == 1
    [line] = output.splitlines()
    # The kubelet's words on the port-forward's error channel, after ztunnel-config's own.
    assert re.fullmatch(
        r"error: ztunnel's admin port 15000 on pod ztunnel-node-2\.istio-system did not accept the connection: "
        r"error forwarding port 15000 to pod ztunnel-node-2_istio-system, uid [0-9a-f-]{36}: "
        rf"dial tcp {re.escape(cluster.ips['node-2'])}:15000: connect: connection refused", line), line


async def test_dumps_come_through_port_forward_not_pods_proxy(cluster: Cluster,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real cluster ztunnel's admin port listens on localhost only, which pods/proxy (it dials the pod IP)
    cannot reach: ztunnel-config must not depend on it."""
    async def no_pod_proxy(self: ApiServer, request: web.Request, namespace: str, target: str) -> web.Response:
        raise AssertionError(f"ztunnel-config used pods/proxy ({request.path})")

    monkeypatch.setattr(ApiServer, "_pod_proxy", no_pod_proxy)
    code, output = await cluster.run("policies", "ztunnel-node-1")
    assert code == 0 and "allow-sleep" in output, output


async def test_a_refused_port_forward_is_the_api_servers_status(cluster: Cluster) -> None:
    unscheduled = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "ztunnel-pending", "namespace": ZTUNNEL_NAMESPACE, "labels": {"app": "ztunnel"}},
        "spec": {"containers": [{"name": "istio-proxy"}]}}
    await cluster.client.create(unscheduled)
    code, output = await cluster.run("workloads", "ztunnel-pending")
    assert (code, output.splitlines()) == (1, [
        "error: cannot port-forward to ztunnel-pending.istio-system through the API server: pod ztunnel-pending "
        "does not have a host assigned"])


async def test_all_nodes_shows_what_answers_and_fails_for_the_rest(cluster: Cluster) -> None:
    code, output = await cluster.run("policies", "--node", "all")
    assert code == 1
    assert output.startswith("node-1 (ztunnel-node-1.istio-system):\nNAMESPACE")
    assert "allow-sleep" in output
    assert output.splitlines()[-1].startswith(
        "error: ztunnel's admin port 15000 on pod ztunnel-node-2.istio-system did not accept the connection: ")
    code, output = await cluster.run("policies", "--node", "all", "-o", "json")
    assert code == 1 and list(json.loads(output.split("error:")[0])) == ["node-1"]


async def test_no_ztunnel_on_the_node(cluster: Cluster) -> None:
    code, output = await cluster.run("workloads", "--node", "node-9")
    assert (code, output.splitlines()) == (1, [
        "error: no ztunnel pod on node node-9 (pods labelled app=ztunnel in namespace istio-system; another "
        "namespace is chosen with --istio-namespace)"])


async def test_istio_namespace_says_where_ztunnels_are(cluster: Cluster) -> None:
    await cluster.client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}})
    await add_ztunnel_pod(cluster.client, "node-1", cluster.ips["node-1"], namespace="mesh")
    code, output = await cluster.run("policies", "-i", "mesh", "--node", "node-1")
    assert code == 0 and "allow-sleep" in output
    code, output = await cluster.run("policies", "-i", "kube-system")
    assert code == 1 and "no ztunnel pod at all (pods labelled app=ztunnel in namespace kube-system" in output


async def test_a_named_pod_must_exist_and_be_a_ztunnel(cluster: Cluster) -> None:
    code, output = await cluster.run("workloads", "ztunnel-gone")
    assert (code, output.splitlines()) == (1, [
        'error: cannot find ztunnel pod ztunnel-gone.istio-system: pods "ztunnel-gone" not found'])
    code, output = await cluster.run("workloads", "web-1.web")
    assert (code, output.splitlines()) == (1, [
        "error: ztunnel-config is only supported by Ztunnel proxies: web-1.web has no label app=ztunnel"])


async def test_at_most_one_way_to_choose_the_ztunnel(cluster: Cluster) -> None:
    code, output = await cluster.run("workloads", "ztunnel-node-1", "--node", "node-1")
    assert (code, output.splitlines()) == (1, ["error: at most one of --file, --node, or pod name must be passed"])


async def test_an_unreachable_api_server_is_one_line(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}", TOKEN)
    result = await kube_fixtures.ambientctl(kubeconfig, "ztunnel-config", "workloads", timeout=WAIT)
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("error: cannot list ztunnel pods in namespace istio-system: cannot reach the API server "
                           "at http://127.0.0.1:")


def test_register_adds_the_command() -> None:
    group = click.Group()
    ztunnel_config.register(group)
    assert group.get_command(click.Context(group), "ztunnel-config") is ztunnel_config.ztunnel_config
