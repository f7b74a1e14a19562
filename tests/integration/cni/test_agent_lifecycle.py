"""The node agent's install lifecycle on a node, against a real API server (TLS, on loopback) with tmp CNI
conf/bin/run dirs; the in-pod rules and host probe are stand-ins (they need a node's netns, see tests/netns).

- Start-up before the primary CNI: the agent waits (one log line), stays not ready, installs as soon as the
  primary config appears, then turns ready. A wrong `--plugin-source` is a one-line fatal error instead.
- In a pod, the plugin's kubeconfig is rendered from the pod's service account; the real plugin reads pods
  with it (IPv4 and IPv6 service host), and a rotated token is rewritten before the old one dies.
- Stopping (what SIGTERM does: the main task is cancelled): in a pod the plugin stays while the agent's
  DaemonSet is there or the API cannot say, and goes when the DaemonSet is gone or being deleted or the API
  refuses the agent's credentials; outside a pod it always stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.resources import ResourceTable
from ambient.local import pki
from ambient.local.apiserver import ApiServer
from cni.agent import NodeAgent, build_installer
from cni.agent_config import AgentConfig
from cni.installer import KUBECONFIG_NAME, PLUGIN_TYPE, Installer
from cni.rules import HostProbe, InpodRules, PodRuleConfig
from tests.integration.cni import test_plugin
from tests.integration.cni.test_plugin import AMBIENT, PREV_1_0, TOKEN, FakeAgent, run_plugin
from tests.integration.kube_fixtures import eventually, free_port

Obj = dict[str, Any]
short_dir = test_plugin.short_dir  # unix socket paths must stay short

HOST, HOST6 = "127.0.0.1", "::1"
SYSTEM_NS, DS_NAME = "istio-system", "ambient-cni-node"
POD_NAME = "ambient-cni-node-x7k2p"
TYPES = ResourceTable()
NAMESPACES, PODS, DAEMONSETS = TYPES.require("namespaces"), TYPES.require("pods"), TYPES.require("daemonsets")
PRIMARY = {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]}
INSTALL_POLL = 0.05  # the agent's install check interval here (1 s in production): keeps the tests fast
SETTLE = 10.0  # bound on anything the agent does within a few polls


class StandInRules(InpodRules):
    def __init__(self) -> None:  # no backend probe: nothing here touches the host's rules
        self.backend = "none"

    def apply(self, netns: str, cfg: PodRuleConfig) -> None:
        pass

    def remove(self, netns: str) -> None:
        pass

    def verify(self, netns: str, cfg: PodRuleConfig) -> list[str]:
        return []


class StandInProbe(HostProbe):
    def __init__(self) -> None:
        self.backend = "none"

    def ensure(self) -> None:
        pass

    def add(self, uid: str, ips: Any) -> None:
        pass

    def remove(self, uid: str, ips: Any = None) -> None:
        pass


@dataclass
class Node:
    """One node's directories, the cluster's API server and the agent's settings (a pod's, by default)."""

    root: Path
    server: ApiServer
    port: int
    ca: Path
    config: AgentConfig
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    agents: list[NodeAgent] = field(default_factory=list)

    @property
    def conf_dir(self) -> Path:
        return Path(self.config.cni_conf_dir)

    @property
    def kubeconfig(self) -> Path:
        return Path(self.config.run_dir) / KUBECONFIG_NAME

    @property
    def health(self) -> str:
        return f"http://{HOST}:{self.config.health_address[1]}"

    def write_primary(self, text: str | None = None) -> Path:
        path = self.conf_dir / "10-net.conflist"
        path.write_text(json.dumps(PRIMARY) if text is None else text)
        return path

    def entries(self) -> list[Obj]:
        return list(json.loads((self.conf_dir / "10-net.conflist").read_text())["plugins"])

    def plugin_in_place(self) -> bool:
        return ([p["type"] for p in self.entries()] == ["bridge", PLUGIN_TYPE] and
                (Path(self.config.cni_bin_dir) / PLUGIN_TYPE).is_file() and self.kubeconfig.is_file())

    def plugin_removed(self) -> bool:
        return (self.entries() == PRIMARY["plugins"] and not (Path(self.config.cni_bin_dir) / PLUGIN_TYPE).exists()
                and not self.kubeconfig.exists())

    def start(self, **overrides: Any) -> NodeAgent:
        config = replace(self.config, **overrides)
        ca = str(self.ca)
        client = KubeClient(KubeConfig(f"https://{HOST}:{self.port}", TOKEN, ca_file=ca))
        agent = NodeAgent(config, client, StandInRules(), StandInProbe(), build_installer(config))
        self.agents.append(agent)
        self.tasks.append(asyncio.create_task(agent.serve(), name="agent"))
        return agent

    async def readyz(self) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.health}/readyz") as resp:
            return resp.status, await resp.text()

    async def wait_ready(self) -> None:
        await eventually(lambda: self._is(200), "the agent's /readyz to turn 200", SETTLE,
                         retry_on=(aiohttp.ClientError,))

    async def _is(self, status: int) -> bool:
        return (await self.readyz())[0] == status

    async def stop(self) -> float:
        """What SIGTERM does (`cancel_on_signals` cancels the main task) → seconds the stop took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = self.tasks.pop()
        task.cancel()
        await asyncio.wait_for(task, SETTLE)
        await self.agents[-1].client.close()
        return loop.time() - started


def daemonset(finalizers: list[str] | None = None) -> Obj:
    labels = {"app": DS_NAME}
    return {"metadata": {"name": DS_NAME, "labels": labels, **({"finalizers": finalizers} if finalizers else {})},
            "spec": {"selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "install-cni", "image": "ambient-py:0.1.0"}]}}}}


def service_account(path: Path, ca: Path, token: str = TOKEN) -> Path:
    path.mkdir(exist_ok=True)
    (path / "token").write_text(token)
    (path / "ca.crt").write_bytes(ca.read_bytes())
    return path


@pytest.fixture
async def node(short_dir: Path) -> AsyncIterator[Node]:
    ca, cert, key = pki.ensure_apiserver_certs(short_dir / "pki", [HOST, HOST6], ["localhost"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = ApiServer(None, TOKEN)
    port = free_port()
    await server.start([HOST, HOST6], port, tls)
    server.create(NAMESPACES, "", {"metadata": {"name": SYSTEM_NS}})
    server.create(DAEMONSETS, SYSTEM_NS, daemonset())
    plugin = short_dir / "ambient-cni"
    plugin.write_text("#!/bin/sh\nexit 0\n")
    (short_dir / "net.d").mkdir()
    health = free_port()
    config = AgentConfig(
        node_name="node-1", run_dir=str(short_dir / "run"), zds_socket=str(short_dir / "ztunnel.sock"),
        health_address=(HOST, health), metrics_address=(HOST, health), drift_interval=3600,
        cni_conf_dir=str(short_dir / "net.d"), cni_bin_dir=str(short_dir / "bin"), plugin_source=str(plugin),
        api_host=HOST, api_port=str(port), service_account_dir=str(service_account(short_dir / "sa", ca)),
        pod_name=POD_NAME, pod_namespace=SYSTEM_NS, install_check_interval=INSTALL_POLL)
    node = Node(short_dir, server, port, ca, config)
    try:
        yield node
    finally:
        for task in node.tasks:
            task.cancel()
        await asyncio.gather(*node.tasks, return_exceptions=True)
        for agent in node.agents:
            await agent.client.close()
        await server.close()


# -- start-up: waiting for the primary CNI -------------------------------------------------------------
async def test_waits_for_the_primary_config_then_installs_and_turns_ready(
        node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="ambient.cni")
    checks: list[int] = []
    ensure = Installer.ensure

    def counted(self: Installer) -> bool:
        checks.append(1)
        return ensure(self)

    monkeypatch.setattr(Installer, "ensure", counted)
    node.start()
    waiting = f"waiting for the primary CNI network config in {node.conf_dir}"
    await eventually(lambda: node._is(503), "/readyz to answer 503", SETTLE, retry_on=(aiohttp.ClientError,))
    await eventually(lambda: _at_least(checks, 5), "five install checks", SETTLE)
    assert await node.readyz() == (503, f"not ready: {waiting}")
    assert [r.getMessage() for r in caplog.records].count(waiting) == 1, "logged once, not per check"
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert not Path(node.config.cni_bin_dir).exists(), "nothing is installed before the primary CNI is"

    node.write_primary("{half-written")  # not usable yet: reported, still not ready, no crash
    await eventually(lambda: _body_has(node, "CNI install failed: cannot parse"), "the parse error on /readyz",
                     SETTLE)
    node.write_primary()
    await node.wait_ready()
    assert node.plugin_in_place()
    assert not any(r.exc_info for r in caplog.records), "no traceback"


async def _at_least(items: list[int], n: int) -> bool:
    return len(items) >= n


async def _body_has(node: Node, text: str) -> bool:
    return text in (await node.readyz())[1]


def test_a_missing_plugin_source_is_one_fatal_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle"
    run = subprocess.run(
        [sys.executable, "-m", "cni.agent", "run", "--node-name", "node-1", "--cni-conf-dir", str(tmp_path),
         "--cni-bin-dir", str(tmp_path / "bin"), "--plugin-source", str(missing)],
        check=False, capture_output=True, text=True, timeout=30, cwd=test_plugin.REPO)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        f"ambient-cni-agent: plugin source {missing} does not exist: pass --plugin-source with the plugin bundle "
        "directory (/opt/ambient/cni-plugin in the image) or a plugin executable"]


# -- the plugin's kubeconfig in a pod ---------------------------------------------------------------------
async def run_installed_entry(node: Node, fake: FakeAgent) -> test_plugin.Run:
    """The plugin with the entry the agent wrote (only the agent socket pointed at a fake agent)."""
    entry = node.entries()[-1]
    conf = {"cniVersion": PRIMARY["cniVersion"], "name": PRIMARY["name"], **entry,
            "cni_agent_run_dir": str(fake.socket_path.parent), "prevResult": PREV_1_0}
    return await run_plugin(conf)


@pytest.fixture
async def fake_agent(short_dir: Path) -> AsyncIterator[FakeAgent]:
    (short_dir / "fake").mkdir()
    fake = FakeAgent(short_dir / "fake" / "pluginevent.sock")
    app = web.Application()
    app.router.add_post("/cmdadd", fake.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, str(fake.socket_path)).start()
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("service_host", [HOST, HOST6])
async def test_the_plugin_reads_pods_with_the_rendered_kubeconfig_and_survives_rotation(
        node: Node, fake_agent: FakeAgent, service_host: str) -> None:
    node.server.create(NAMESPACES, "", {"metadata": {"name": "apps", "labels": AMBIENT}})
    node.server.create(PODS, "apps", {"metadata": {"name": "web-1"},
                                      "spec": {"containers": [{"name": "app", "image": "app"}]}})
    node.write_primary()
    node.start(api_host=service_host)
    await node.wait_ready()
    entry = node.entries()[-1]
    assert entry["kubernetes"]["kubeconfig"] == str(node.kubeconfig)
    assert node.kubeconfig.stat().st_mode & 0o777 == 0o600
    server = json.loads(node.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    assert server == (f"https://[::1]:{node.port}" if service_host == HOST6 else f"https://{HOST}:{node.port}")

    run = await run_installed_entry(node, fake_agent)
    assert run.code == 0, run
    assert [(b["PodNamespace"], b["PodName"]) for b in fake_agent.bodies] == [("apps", "web-1")]

    # The kubelet refreshes the projected token; the API server stops honouring the old one.
    rotated = "token-2"
    node.server.token = rotated
    test_plugin.expect_error(await run_installed_entry(node, fake_agent), 100, "refused")
    (Path(node.config.service_account_dir) / "token").write_text(rotated)
    await eventually(lambda: _async(rotated in node.kubeconfig.read_text()), "the kubeconfig's token rewritten",
                     SETTLE)
    assert (await run_installed_entry(node, fake_agent)).code == 0
    assert len(fake_agent.bodies) == 2


async def _async(value: bool) -> bool:
    return value


# -- stopping: uninstall or keep ----------------------------------------------------------------------
def delete_daemonset(node: Node) -> None:
    node.server.delete(DAEMONSETS, SYSTEM_NS, DS_NAME)


def delete_daemonset_in_foreground(node: Node) -> None:
    """`kubectl delete --cascade=foreground`: the DaemonSet stays, with a deletionTimestamp, until its pods
    are gone — the agent sees it being deleted."""
    delete_daemonset(node)
    node.server.create(DAEMONSETS, SYSTEM_NS, daemonset(finalizers=["foregroundDeletion"]))
    assert node.server.delete(DAEMONSETS, SYSTEM_NS, DS_NAME)["metadata"]["deletionTimestamp"]


def revoke_credentials(node: Node) -> None:
    """The install's ServiceAccount was deleted: its tokens are refused (401)."""
    node.server.token = "someone-else"


def nothing(node: Node) -> None:
    pass


@pytest.mark.parametrize(("before_stop", "removed", "says"), [
    (nothing, False, "DaemonSet istio-system/ambient-cni-node is still there"),
    (delete_daemonset, True, "is gone (404)"),
    (delete_daemonset_in_foreground, True, "is being deleted"),
    (revoke_credentials, True, "refuses this agent's credentials (401"),
])
async def test_on_stop_in_a_pod_the_daemonset_decides(node: Node, caplog: pytest.LogCaptureFixture,
                                                      before_stop: Callable[[Node], None], removed: bool,
                                                      says: str) -> None:
    caplog.set_level(logging.INFO, logger="ambient.cni")
    node.write_primary()
    node.start()
    await node.wait_ready()
    assert node.plugin_in_place()
    before_stop(node)
    took = await node.stop()
    assert node.plugin_removed() if removed else node.plugin_in_place()
    verb = "removing the CNI plugin from this node" if removed else "leaving the CNI plugin installed"
    assert any(verb in r.getMessage() and says in r.getMessage() for r in caplog.records), caplog.text
    assert took < node.config.shutdown_check_timeout + 2


async def test_on_stop_with_the_api_down_the_plugin_stays_within_the_grace_period(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ambient.cni")
    node.write_primary()
    node.start()
    await node.wait_ready()
    delete_daemonset(node)
    await node.server.close()  # the API cannot say: assume an upgrade
    took = await node.stop()
    assert node.plugin_in_place()
    assert "leaving the CNI plugin installed" in caplog.text
    assert took < 5, "the pod's terminationGracePeriodSeconds"


async def test_outside_a_pod_the_plugin_always_stays(node: Node) -> None:
    node.write_primary()
    node.start(pod_name="", pod_namespace="")
    await node.wait_ready()
    delete_daemonset(node)
    revoke_credentials(node)
    await node.stop()
    assert node.plugin_in_place()


async def test_a_daemonset_the_agent_cannot_see_is_reported_at_start(node: Node,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ambient.cni")
    node.write_primary()
    node.start(daemonset_name="cni-node")  # not the DaemonSet this pod runs in
    await node.wait_ready()
    await eventually(lambda: _async("DaemonSet istio-system/cni-node not found: pass --daemonset-name" in caplog.text),
                     "a warning naming the flag", SETTLE)

