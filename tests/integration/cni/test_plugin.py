"""The istio-cni plugin as the container runtime runs it: a real subprocess (`python -m cni.plugin`) with the
CNI environment and config on stdin, reading pods from a real local API server on loopback and posting
`/cmdadd` to a fake node agent on a unix socket (PROTOCOLS.md §3).

Each case checks what a user relies on: which pods reach the agent and with what body, that the previous
result is passed on in the right spec version, and that every failure fails the ADD (closed) with a CNI
error saying what to check.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from ambient.kube.resources import ResourceTable
from ambient.local import pki
from ambient.local.apiserver import ApiServer

Obj = dict[str, Any]

HOST = "127.0.0.1"
TOKEN = "plugin-token"
REPO = Path(__file__).resolve().parents[3]
PLUGIN = [sys.executable, "-m", "cni.plugin"]
RUN_LIMIT = 20.0  # bound on one plugin run; its own network timeouts are 5 s
NETNS = "/var/run/netns/amb-pod-1234"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
PODS, NAMESPACES = ResourceTable().require("pods"), ResourceTable().require("namespaces")

PREV_1_0 = {  # what bridge + host-local print for a 1.0.0 conflist
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:00:00:01"}, {"name": "veth1", "mac": "aa:bb:cc:00:00:02"},
                   {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": NETNS}],
    "ips": [{"interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
PREV_0_4 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": NETNS}],
    "ips": [{"version": "4", "interface": 0, "address": "10.244.1.6/24", "gateway": "10.244.1.1"},
            {"version": "6", "interface": 0, "address": "fd00:10:244:1::6/64"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


# -- the fake node agent -----------------------------------------------------------------------------
@dataclass
class FakeAgent:
    """Plays the node agent's plugin-event server: records each POST /cmdadd body, answers as told."""

    socket_path: Path
    status: int = 200
    reason: str = ""
    hang: bool = False
    bodies: list[Obj] = field(default_factory=list)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/json"
        self.bodies.append(json.loads(await request.read()))
        if self.hang:
            await self._release.wait()
        return web.Response(status=self.status, text=self.reason)


@dataclass
class Env:
    run_dir: Path
    agent: FakeAgent
    server: ApiServer
    url: str
    kubeconfig: Path

    def conf(self, version: str = "1.0.0", prev: Obj | None = PREV_1_0, **extra: Any) -> Obj:
        conf: Obj = {"cniVersion": version, "name": "ambient-local", "type": "istio-cni",
                     "cni_agent_run_dir": str(self.run_dir), "ambient_enabled": True,
                     "exclude_namespaces": ["kube-system"], "pod_namespace": "istio-system",
                     "kubernetes": {"kubeconfig": str(self.kubeconfig), "exclude_namespaces": ["istio-system"]}}
        if prev is not None:
            conf["prevResult"] = prev
        conf.update(extra)
        return conf

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.server.create(NAMESPACES, "", {"metadata": {"name": name, "labels": labels or {}}})

    def add_pod(self, namespace: str, name: str, labels: dict[str, str] | None = None,
                annotations: dict[str, str] | None = None, host_network: bool = False) -> None:
        self.server.create(PODS, namespace, {
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"hostNetwork": host_network, "containers": [{"name": "app", "image": "app"}]}})


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> Obj:
        """stdout holds exactly one JSON document: the result or the CNI error (logs never go there)."""
        doc = json.loads(self.stdout)
        assert isinstance(doc, dict)
        return doc


async def run_plugin(conf: Obj | bytes | None, command: str = "ADD", pod: tuple[str, str] | None = ("apps", "web-1"),
                     env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()) -> Run:
    args = "IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-1"
    if pod:
        args += f";K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]}"
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee",
               "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": args,
               **(env or {})}
    stdin = conf if isinstance(conf, bytes) else b"" if conf is None else json.dumps(conf).encode()
    proc = await asyncio.create_subprocess_exec(
        PLUGIN[0], *python_flags, *PLUGIN[1:], cwd=REPO, env=environ, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), RUN_LIMIT)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def expect_error(run: Run, code: int, *fragments: str) -> Obj:
    assert run.code != 0, run
    error = run.output
    assert set(error) == {"cniVersion", "code", "msg", "details"}, error
    assert error["code"] == code, error
    text = f"{error['msg']} | {error['details']}"
    for fragment in fragments:
        assert fragment in text, (fragment, error)
    assert error["details"], "a CNI error always says what to check"
    return error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def write_kubeconfig(path: Path, server: str, *, token: str = TOKEN, as_yaml: bool = False,
                     cluster: Obj | None = None) -> Path:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "plugin",
           "clusters": [{"name": "local", "cluster": {"server": server, **(cluster or {})}}],
           "users": [{"name": "istio-cni", "user": {"token": token}}],
           "contexts": [{"name": "plugin", "context": {"cluster": "local", "user": "istio-cni"}}]}
    path.write_text(yaml.safe_dump(doc) if as_yaml else json.dumps(doc))
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="cni-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def env(short_dir: Path) -> AsyncIterator[Env]:
    server = ApiServer(None, TOKEN)
    port = free_port()
    agent = FakeAgent(short_dir / "pluginevent.sock")
    app = web.Application()
    app.router.add_post("/cmdadd", agent.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await server.start([HOST], port)
        await web.UnixSite(runner, str(agent.socket_path)).start()
        url = f"http://{HOST}:{port}"
        env = Env(short_dir, agent, server, url, write_kubeconfig(short_dir / "kubeconfig", url))
        env.add_namespace("apps", AMBIENT)
        env.add_namespace("plain")
        env.add_pod("apps", "web-1")
        yield env
    finally:
        agent._release.set()
        await runner.cleanup()
        await server.close()


# -- who reaches the agent ---------------------------------------------------------------------------
async def test_pod_in_labelled_namespace_is_enrolled_before_add_returns(env: Env) -> None:
    run = await run_plugin(env.conf())
    assert run.code == 0, run
    assert run.output == PREV_1_0
    assert env.agent.bodies == [{
        "Netns": NETNS, "PodName": "web-1", "PodNamespace": "apps",
        "IPs": [{"Interface": 2, "Address": {"IP": "10.244.1.5", "Mask": "////AA=="}, "Gateway": "10.244.1.1"}],
    }]
    assert base64.b64decode(env.agent.bodies[0]["IPs"][0]["Address"]["Mask"]) == b"\xff\xff\xff\x00"


async def test_dual_stack_legacy_result(env: Env) -> None:
    run = await run_plugin(env.conf("0.4.0", PREV_0_4))
    assert run.code == 0, run
    assert run.output == PREV_0_4
    ips = env.agent.bodies[0]["IPs"]
    assert [ip["Address"]["IP"] for ip in ips] == ["10.244.1.6", "fd00:10:244:1::6"]
    assert base64.b64decode(ips[1]["Address"]["Mask"]) == b"\xff" * 8 + b"\x00" * 8
    assert (ips[0]["Interface"], ips[1]["Gateway"]) == (0, None)


async def test_pod_opted_out_in_labelled_namespace_is_passed_through(env: Env) -> None:
    env.add_pod("apps", "batch", labels={"istio.io/dataplane-mode": "none"})
    run = await run_plugin(env.conf(), pod=("apps", "batch"))
    assert (run.code, run.output, env.agent.bodies) == (0, PREV_1_0, [])
    assert "opted out" in run.stderr


async def test_pod_label_alone_enrolls_it(env: Env) -> None:
    env.add_pod("plain", "solo", labels=AMBIENT)
    env.add_pod("plain", "other")
    assert (await run_plugin(env.conf(), pod=("plain", "solo"))).code == 0
    assert (await run_plugin(env.conf(), pod=("plain", "other"))).code == 0
    assert [(b["PodNamespace"], b["PodName"]) for b in env.agent.bodies] == [("plain", "solo")]


@pytest.mark.parametrize("namespace", ["kube-system", "istio-system"])  # top-level and kubernetes.* lists
async def test_excluded_namespace_is_passed_through_without_asking_anyone(env: Env, namespace: str) -> None:
    # Not even in the API: exclusion is decided before the lookup, so it cannot fail.
    run = await run_plugin(env.conf(), pod=(namespace, "coredns-1"))
    assert (run.code, run.output, env.agent.bodies) == (0, PREV_1_0, [])


async def test_sidecar_pod_is_passed_through(env: Env) -> None:
    env.add_pod("apps", "legacy", annotations={"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'})
    run = await run_plugin(env.conf(), pod=("apps", "legacy"))
    assert (run.code, run.output, env.agent.bodies) == (0, PREV_1_0, [])


async def test_host_network_pod_is_passed_through(env: Env) -> None:
    env.add_pod("apps", "node-exporter", labels=AMBIENT, host_network=True)
    run = await run_plugin(env.conf(), pod=("apps", "node-exporter"))
    assert (run.code, run.output, env.agent.bodies) == (0, PREV_1_0, [])


async def test_ambient_disabled_touches_nothing(env: Env) -> None:
    conf = env.conf(ambient_enabled=False, kubernetes={"kubeconfig": "/nonexistent"})
    run = await run_plugin(conf)
    assert (run.code, run.output, env.agent.bodies) == (0, PREV_1_0, [])


async def test_the_agents_own_pod_never_waits_on_the_agent(env: Env) -> None:
    run = await run_plugin(env.conf(kubernetes={"kubeconfig": "/nonexistent"}), pod=("istio-system",
                                                                                      "istio-cni-node-x7k2p"))
    assert (run.code, run.output, env.agent.bodies) == (0, PREV_1_0, [])


async def test_not_a_kubernetes_pod_is_passed_through(env: Env) -> None:
    run = await run_plugin(env.conf(), pod=None)
    assert (run.code, run.output, env.agent.bodies) == (0, PREV_1_0, [])


async def test_custom_enablement_selectors(env: Env) -> None:
    env.add_namespace("team-a", {"team": "a"})
    env.add_pod("team-a", "api")
    selectors = [{"podSelector": {}, "namespaceSelector": {"matchLabels": {"team": "a"}}}]
    assert (await run_plugin(env.conf(enablement_selectors=selectors), pod=("team-a", "api"))).code == 0
    assert (await run_plugin(env.conf(enablement_selectors=selectors))).code == 0  # apps is not team a
    assert [b["PodName"] for b in env.agent.bodies] == ["api"]


# -- fail closed -------------------------------------------------------------------------------------
async def test_agent_not_running_fails_add_naming_the_socket(env: Env) -> None:
    env.agent.socket_path.unlink()
    error = expect_error(await run_plugin(env.conf()), 101, "is the istio-cni node agent running on this node?",
                         f"socket {env.agent.socket_path} not found")
    assert error["cniVersion"] == "1.0.0"
    assert error["msg"].startswith("istio-cni cmdAdd failed to contact node Istio CNI agent")


async def test_stale_agent_socket_fails_add(env: Env, short_dir: Path) -> None:
    stale = short_dir / "stale"
    stale.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale / "pluginevent.sock"))  # bound, never listening: what a crashed agent leaves
        run = await run_plugin(env.conf(cni_agent_run_dir=str(stale)))
    expect_error(run, 101, "connection refused", "is the node agent restarting?")


async def test_agent_failure_fails_add_with_its_reason(env: Env) -> None:
    env.agent.status, env.agent.reason = 500, "ztunnel did not ack pod apps/web-1 within 5s"
    expect_error(await run_plugin(env.conf()), 101, "status code 500",
                 "ztunnel did not ack pod apps/web-1 within 5s", "could not enroll the pod")
    assert len(env.agent.bodies) == 1


async def test_agent_rejecting_the_body_fails_add(env: Env) -> None:
    env.agent.status, env.agent.reason = 400, "IPs[0].Address.Mask is not base64"
    expect_error(await run_plugin(env.conf()), 101, "status code 400", "rejected the request",
                 "IPs[0].Address.Mask is not base64")


async def test_agent_that_never_answers_fails_add_after_5s(env: Env) -> None:
    env.agent.hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    expect_error(await run_plugin(env.conf()), 101, "no answer", "within 5s")
    assert 4.5 < loop.time() - started < RUN_LIMIT


async def test_pod_missing_from_the_api_fails_closed(env: Env) -> None:
    expect_error(await run_plugin(env.conf(), pod=("apps", "ghost")), 100, "pod apps/ghost not found",
                 str(env.kubeconfig))
    assert env.agent.bodies == []


async def test_api_server_unreachable_fails_closed(env: Env, short_dir: Path) -> None:
    dead = write_kubeconfig(short_dir / "dead-kubeconfig", f"http://{HOST}:{free_port()}")
    expect_error(await run_plugin(env.conf(kubernetes={"kubeconfig": str(dead)})), 100,
                 "cannot reach the Kubernetes API server", "is the API server reachable from this node?")
    assert env.agent.bodies == []


async def test_rejected_token_fails_closed(env: Env, short_dir: Path) -> None:
    wrong = write_kubeconfig(short_dir / "wrong-kubeconfig", env.url, token="expired")
    expect_error(await run_plugin(env.conf(kubernetes={"kubeconfig": str(wrong)})), 100, "refused", "401",
                 "token may be expired")


@pytest.mark.parametrize(("contents", "message"), [
    (None, "cannot read the plugin kubeconfig"),
    ("{not json", "cannot parse the plugin kubeconfig"),
    ("clusters: [", "cannot parse the plugin kubeconfig"),
    ('{"clusters": []}', "no current-context"),
])
async def test_broken_kubeconfig_fails_closed(env: Env, short_dir: Path, contents: str | None, message: str) -> None:
    path = short_dir / "broken-kubeconfig"
    if contents is not None:
        path.write_text(contents)
    expect_error(await run_plugin(env.conf(kubernetes={"kubeconfig": str(path)})), 100, message, str(path))


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("stdin", "code", "message"), [
    (b"", 6, "no network configuration on stdin"),
    (b"cniVersion: 1.0.0", 6, "not JSON"),
    (b'{"name": "n", "type": "istio-cni"}', 7, "no cniVersion"),
    (b'{"cniVersion": "1.0.0", "type": "istio-cni"}', 7, "missing network name"),
    (b'{"cniVersion": "1.0.0", "name": "n"}', 7, "missing plugin type"),
    (b'{"cniVersion": "9.9.9", "name": "n", "type": "istio-cni"}', 1, "incompatible CNI versions"),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"}', 7, "no prevResult"),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni", "prevResult": {}, "ambient_enabled": "yes"}', 7,
     "ambient_enabled must be a boolean"),
])
async def test_malformed_config_gives_a_clear_cni_error(env: Env, stdin: bytes, code: int, message: str) -> None:
    run = await run_plugin(stdin)
    expect_error(run, code, message)
    assert "Traceback" not in run.stderr
    assert env.agent.bodies == []


async def test_missing_runtime_environment(env: Env) -> None:
    expect_error(await run_plugin(env.conf(), env={"CNI_NETNS": ""}), 4, "required env variables [CNI_NETNS] missing")


async def test_malformed_prev_result(env: Env) -> None:
    prev = {"cniVersion": "1.0.0", "ips": [{"interface": 0, "address": "10.244.1.5"}]}
    expect_error(await run_plugin(env.conf(prev=prev)), 7, "prevResult.ips[0].address", "previous plugin")


# -- the other verbs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("command", "version"), [("DEL", "0.3.1"), ("DEL", "1.0.0"), ("CHECK", "1.1.0"),
                                                   ("GC", "1.1.0"), ("STATUS", "1.1.0")])
async def test_other_verbs_succeed_without_contacting_anything(env: Env, command: str, version: str) -> None:
    env.agent.socket_path.unlink()
    conf = env.conf(version, kubernetes={"kubeconfig": "/nonexistent"})
    run = await run_plugin(conf, command=command)
    assert (run.code, run.stdout) == (0, ""), run
    assert env.agent.bodies == []


async def test_del_survives_broken_plugin_settings_but_not_a_missing_config(env: Env) -> None:
    run = await run_plugin(env.conf(ambient_enabled="yes", prev=None), command="DEL", env={"CNI_NETNS": ""})
    assert (run.code, run.stdout) == (0, ""), run
    assert "ignoring invalid plugin settings" in run.stderr
    expect_error(await run_plugin(b"", command="DEL"), 6, "no network configuration on stdin")
    expect_error(await run_plugin(b"{}", command="CHECK"), 7, "no cniVersion")


async def test_check_needs_0_4_0(env: Env) -> None:
    expect_error(await run_plugin(env.conf("0.3.1"), command="CHECK"), 1, "config version does not allow CHECK")


@pytest.mark.parametrize(("stdin", "version"), [(b'{"cniVersion": "0.4.0"}', "0.4.0"), (b"", "1.1.0"),
                                                (b'{"cniVersion": "0.1.0"}', "1.1.0"), (b"garbage", "1.1.0")])
async def test_version(stdin: bytes, version: str) -> None:
    run = await run_plugin(stdin, command="VERSION", env={"CNI_CONTAINERID": "", "CNI_NETNS": ""})
    assert (run.code, run.output) == (0, {"cniVersion": version,
                                          "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})


# -- spec versions of the result ---------------------------------------------------------------------
async def test_legacy_prev_result_is_passed_on_as_1_x(env: Env) -> None:
    run = await run_plugin(env.conf("1.1.0", PREV_0_4))
    assert run.code == 0, run
    assert run.output["cniVersion"] == "1.1.0"
    assert run.output["ips"] == [{"interface": 0, "address": "10.244.1.6/24", "gateway": "10.244.1.1"},
                                 {"interface": 0, "address": "fd00:10:244:1::6/64"}]
    assert run.output["interfaces"] == PREV_0_4["interfaces"]


async def test_1_x_prev_result_is_passed_on_as_legacy(env: Env) -> None:
    env.add_pod("plain", "not-ambient")
    prev = {**PREV_1_0, "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:03", "mtu": 1450, "sandbox": NETNS}]}
    run = await run_plugin(env.conf("0.3.1", prev), pod=("plain", "not-ambient"))
    assert run.code == 0, run
    assert run.output == {
        "cniVersion": "0.3.1", "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": NETNS}],
        "ips": [{"version": "4", "interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


# -- logs, TLS, start-up -----------------------------------------------------------------------------
async def test_logs_go_to_stderr_and_the_log_file_never_stdout(env: Env, short_dir: Path) -> None:
    log_file = short_dir / "plugin.log"
    run = await run_plugin(env.conf(plugin_log_level="debug", plugin_log_file=str(log_file)))
    assert run.code == 0 and run.output == PREV_1_0  # json.loads of the whole stdout: nothing else there
    assert "pod=apps/web-1 enrolled in ambient" in run.stderr
    assert "enrolled in ambient" in log_file.read_text()
    quiet = await run_plugin(env.conf(plugin_log_level="none"))
    assert (quiet.code, quiet.stderr) == (0, "")


async def test_https_api_server_with_the_kubeconfigs_ca(short_dir: Path) -> None:
    ca, cert, key = pki.ensure_apiserver_certs(short_dir / "pki", [HOST], ["localhost"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = ApiServer(None, TOKEN)
    port = free_port()
    agent = FakeAgent(short_dir / "pluginevent.sock")
    app = web.Application()
    app.router.add_post("/cmdadd", agent.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await server.start([HOST], port, tls)
        await web.UnixSite(runner, str(agent.socket_path)).start()
        url = f"https://{HOST}:{port}"
        env = Env(short_dir, agent, server, url, write_kubeconfig(short_dir / "kubeconfig", url, as_yaml=True,
                                                                   cluster={"certificate-authority": str(ca)}))
        env.add_namespace("apps", AMBIENT)
        env.add_pod("apps", "web-1")
        assert (await run_plugin(env.conf())).code == 0  # YAML kubeconfig, CA file
        inline = write_kubeconfig(short_dir / "inline", url, cluster={
            "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode()})
        assert (await run_plugin(env.conf(kubernetes={"kubeconfig": str(inline)}))).code == 0
        assert len(agent.bodies) == 2

        untrusted = write_kubeconfig(short_dir / "untrusted", url)  # system CAs do not know the cluster CA
        expect_error(await run_plugin(env.conf(kubernetes={"kubeconfig": str(untrusted)})), 100,
                     "untrusted certificate", "certificate-authority")
        insecure = write_kubeconfig(short_dir / "insecure", url, cluster={"insecure-skip-tls-verify": True})
        assert (await run_plugin(env.conf(kubernetes={"kubeconfig": str(insecure)}))).code == 0
        assert len(agent.bodies) == 3
    finally:
        await runner.cleanup()
        await server.close()


def imported_modules(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


# The brief's list, plus two stdlib modules measured at ~7 ms each that the plugin avoids on purpose.
HEAVY = ("aiohttp", "yaml", "grpc", "google.protobuf", "ambient.kube.client", "logging", "dataclasses")


@pytest.mark.parametrize("command", ["VERSION", "ADD"])
async def test_start_up_stays_lean(env: Env, command: str) -> None:
    """The plugin runs once per pod creation: neither VERSION nor a full ambient ADD (JSON kubeconfig)
    may pull in the heavy libraries."""
    run = await run_plugin(env.conf(), command=command, python_flags=("-X", "importtime"))
    assert run.code == 0, run
    modules = imported_modules(run.stderr)
    assert "cni.plugin" in modules or "cni.config" in modules
    assert sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)) == []
    if command == "ADD":
        assert len(env.agent.bodies) == 1 and "http.client" in modules
