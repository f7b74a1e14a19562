"""`ambient-cni-agent`: the node agent that enrolls this node's ambient pods (PROTOCOLS §2-§4, §9).

Enrollment order (§3): install the in-pod rules → hand the netns to ztunnel over ZDS and wait for its
ack → add the pod IPs to the host probe set → annotate `ambient.istio.io/redirection: enabled`. If
ztunnel does not ack, the pod is annotated `pending` and the enrollment fails (so a plugin ADD fails
closed). Removal runs in reverse, triggered by the pod and namespace informers (CNI DEL does nothing).

Sources of work: the plugin's synchronous `POST /cmdadd` during pod creation; pod and namespace watch
events (a namespace label flip enrolls or removes running pods without restarting them); a periodic
drift check that re-verifies every enrolled pod's rules and repairs them — the annotation is never
trusted on its own.

Installer mode (`--cni-conf-dir`): a loop keeps the plugin, its kubeconfig (re-rendered when the service
account token rotates) and its config entry in place. Until the primary CNI has written its network
config the agent waits for it, not ready, as Istio's install-cni does (`/readyz` is 200 once informers
are synced and the plugin is installed, PROTOCOLS §1). When it stops in a pod, it removes the plugin
only if its own DaemonSet is gone or being deleted, or the API refuses its credentials; otherwise (upgrade,
restart, node drain, API unreachable) the plugin stays, so pods created meanwhile fail closed rather than
start without redirection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from ambient.aio import cancel_on_signals
from ambient.kube.client import KubeClient, KubeConfig, KubeConfigError
from ambient.kube.errors import ApiError
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable
from ambient.proto import zds_pb2
from cni import enrollment, netns_discovery
from cni.agent_config import RETRY_MAX, RETRY_MIN, AgentConfig, default_plugin_source, parse_args
from cni.cmdadd import CmdAddError, parse_cmdadd
from cni.enrollment import REDIRECTION_ANNOTATION, Action
from cni.installer import (
    KUBECONFIG_NAME,
    CopiedKubeconfig,
    Installer,
    InstallError,
    KubeconfigSource,
    PluginKubeconfig,
    ServiceAccountKubeconfig,
)
from cni.rules import HostProbe, InpodRules, PodRuleConfig, RuleError
from cni.zds_server import ZdsError, ZdsServer

log = logging.getLogger("ambient.cni.agent")
Obj = dict[str, Any]
TYPES = ResourceTable()
POD, NAMESPACE, DAEMONSET = TYPES.require("pods"), TYPES.require("namespaces"), TYPES.require("daemonsets")
# Pods enrolled in parallel (a uid is never handled by two at once: per-pod locks); a namespace label
# flip on a busy node is bounded by rule installation in each netns, which runs off the event loop.
RECONCILE_WORKERS = 4
# Seconds for the start-time read of our own DaemonSet (only a warning depends on it; no grace period applies).
DAEMONSET_CHECK_TIMEOUT = 10.0


class EnrollError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass
class Enrollment:
    uid: str
    name: str
    namespace: str
    service_account: str
    netns: str
    ips: list[str]
    rules: PodRuleConfig


@dataclass(frozen=True)
class ShutdownDecision:
    uninstall: bool
    reason: str  # for the log line


def decide_shutdown(answer: Obj | ApiError | None, daemonset: str) -> ShutdownDecision:
    """Whether an agent stopping in a pod removes the CNI plugin, from the API's answer to a GET of its own
    DaemonSet (`daemonset` is "namespace/name"; `answer` None: no answer in time). Only a positive sign
    that the install is going away uninstalls: the DaemonSet is gone (404) or being deleted, or the API
    refuses our credentials (401/403: the service account or its RBAC was deleted with the install — and the
    plugin's kubeconfig holds the same dead token, so every pod ADD on the node would fail). Anything else
    (DaemonSet present: an upgrade, restart or drain; API down, slow or 5xx) keeps the plugin, so that pods
    created until the next agent starts fail closed instead of starting unredirected.

    Istio (cni/pkg/nodeagent/server.go `ShouldStopCleanup`) also keeps it when the DaemonSet is present and
    removes it on NotFound, deletionTimestamp and 401. It differs where we are more conservative: on other
    errors a chained install there cleans up (so an API outage during an upgrade opens an unredirected
    window), and it treats 403 as such an error; it also cleans up when the DaemonSet's node affinity no
    longer matches this node, which we do not check (the plugin stays until the node's next agent, or
    `ambient-cni-agent uninstall`)."""
    if isinstance(answer, ApiError):
        if answer.code == 404:
            return ShutdownDecision(True, f"DaemonSet {daemonset} is gone (404): the install was deleted")
        if answer.code in (401, 403):
            return ShutdownDecision(True, f"the API server refuses this agent's credentials ({answer.code} "
                                          f"{answer.reason}: {answer}): its service account or RBAC was deleted "
                                          "with the install, and the plugin's token is as dead")
        return ShutdownDecision(False, f"cannot read DaemonSet {daemonset} ({answer.code} {answer.reason}: "
                                       f"{answer}); assuming an upgrade or restart")
    if answer is None:
        return ShutdownDecision(False, f"no answer about DaemonSet {daemonset} in time; assuming an upgrade or "
                                       "restart")
    if (answer.get("metadata") or {}).get("deletionTimestamp"):
        return ShutdownDecision(True, f"DaemonSet {daemonset} is being deleted: the install is being removed")
    return ShutdownDecision(False, f"DaemonSet {daemonset} is still there: an upgrade, restart or node drain")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.enrolled = Gauge("ambient_cni_pods_enrolled", "Pods currently enrolled on this node",
                              registry=self.registry)
        self.enrollments = Counter("ambient_cni_enrollments", "Enrollment attempts by result", ["result"],
                                   registry=self.registry)
        self.removals = Counter("ambient_cni_removals", "Pods removed from the mesh", registry=self.registry)
        self.repairs = Counter("ambient_cni_drift_repairs", "Enrolled pods whose rules had to be re-applied",
                               registry=self.registry)
        self.plugin_requests = Counter("ambient_cni_plugin_requests", "POST /cmdadd from the CNI plugin by result",
                                       ["result"], registry=self.registry)
        self.ztunnels = Gauge("ambient_cni_ztunnel_connections", "Connected ztunnels", registry=self.registry)


class NodeAgent:
    def __init__(self, config: AgentConfig, client: KubeClient, rules: InpodRules, probe: HostProbe,
                 installer: Installer | None) -> None:
        self.config, self.client, self.rules, self.probe, self.installer = config, client, rules, probe, installer
        self.metrics = Metrics()
        self.enrolled: dict[str, Enrollment] = {}
        self.netns_hints: dict[str, str] = {}  # uid → netns path given by the plugin
        self._locks: dict[str, asyncio.Lock] = {}
        self._retry: dict[str, float] = {}  # uid → backoff seconds after a failed enrollment
        self.ready = asyncio.Event()  # set while synced and (no installer or the plugin is installed)
        self.synced = False
        self.plugin_installed = False
        self.install_problem = "not checked yet"  # why the plugin is not installed, for /readyz and the log
        self.pods = Informer(client, POD, field_selector=f"spec.nodeName={config.node_name}", handler=self._on_pod)
        self.namespaces = Informer(client, NAMESPACE, handler=self._on_namespace)
        self.zds = ZdsServer(config.zds_socket, self._zds_snapshot)
        self._work: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()

    # -- informer events: queue pod uids for reconciliation -------------------------------------------
    def _queue(self, uid: str) -> None:
        if uid not in self._queued:
            self._queued.add(uid)
            self._work.put_nowait(uid)

    def _on_pod(self, event: str, pod: Obj) -> None:
        self._queue(pod["metadata"]["uid"])

    def _on_namespace(self, event: str, ns: Obj) -> None:
        name = ns["metadata"]["name"]
        for pod in self.pods.items():
            if pod["metadata"]["namespace"] == name:
                self._queue(pod["metadata"]["uid"])

    def _pod_by_uid(self, uid: str) -> Obj | None:
        return next((p for p in self.pods.items() if p["metadata"]["uid"] == uid), None)

    async def _reconcile_loop(self) -> None:
        while True:
            uid = await self._work.get()
            self._queued.discard(uid)
            try:
                await self.reconcile(uid)
            except Exception:
                log.exception("reconciling pod %s failed", uid)

    async def reconcile(self, uid: str) -> None:
        async with self._lock(uid):
            pod = self._pod_by_uid(uid)
            namespace = self.namespaces.get(pod["metadata"]["namespace"]) if pod else None
            decision = enrollment.decide(pod, namespace, uid in self.enrolled, self.config.exclude_namespaces)
            if decision.action is Action.ENROLL and pod is not None:
                netns = self._find_netns(pod)
                if netns is None:
                    return  # not started yet; the plugin's /cmdadd or a later event brings the netns
                try:
                    await self._enroll(pod, netns, enrollment.pod_ips(pod))
                except EnrollError as exc:
                    log.warning("enrolling %s/%s failed: %s", pod["metadata"]["namespace"], pod["metadata"]["name"],
                                exc)
                    self._schedule_retry(uid)
            elif decision.action is Action.REMOVE:
                log.info("removing pod %s from the mesh: %s", uid, decision.reason)
                await self._remove(self.enrolled[uid], pod)

    def _schedule_retry(self, uid: str) -> None:
        delay = self._retry.get(uid, RETRY_MIN)
        self._retry[uid] = min(delay * 2, RETRY_MAX)
        asyncio.get_running_loop().call_later(delay, self._queue, uid)

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def _find_netns(self, pod: Obj) -> str | None:
        uid = pod["metadata"]["uid"]
        hint = self.netns_hints.get(uid)
        if hint and Path(hint).exists():
            return hint
        return netns_discovery.find_netns(uid, enrollment.pod_ips(pod), self.config.kubelet_pod_dirs)

    # -- enrollment (PROTOCOLS §3 order) -----------------------------------------------------------------
    async def _enroll(self, pod: Obj, netns: str, ips: list[str]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        config = enrollment.rule_config(pod, self.config.dns_capture, ips)
        try:
            await asyncio.to_thread(self.rules.apply, netns, config)
        except RuleError as exc:
            self.metrics.enrollments.labels("rules_failed").inc()
            raise EnrollError("rules_failed", f"installing redirection rules in {netns}: {exc}") from None
        info = zds_pb2.WorkloadInfo(name=meta["name"], namespace=meta["namespace"],
                                    service_account=pod["spec"].get("serviceAccountName", "default"))
        try:
            await self.zds.add_workload(uid, info, netns)
        except ZdsError as exc:
            self.metrics.enrollments.labels("ztunnel_failed").inc()
            await self._annotate(pod, "pending")
            raise EnrollError("ztunnel_failed", f"ztunnel did not take the pod: {exc}") from None
        if ips:
            await asyncio.to_thread(self.probe.add, uid, ips)
        self.enrolled[uid] = Enrollment(uid, meta["name"], meta["namespace"], info.service_account, netns, ips,
                                        config)
        self._retry.pop(uid, None)
        await self._annotate(pod, "enabled")
        self.metrics.enrollments.labels("ok").inc()
        self.metrics.enrolled.set(len(self.enrolled))
        log.info("enrolled %s/%s (netns %s, ips %s)", meta["namespace"], meta["name"], netns, ips)

    async def _remove(self, entry: Enrollment, pod: Obj | None) -> None:
        if pod is not None:
            await self._annotate(pod, None)
        if entry.ips:
            await asyncio.to_thread(self.probe.remove, entry.uid, entry.ips)
        await self.zds.del_workload(entry.uid)
        if Path(entry.netns).exists():
            try:
                await asyncio.to_thread(self.rules.remove, entry.netns)
            except RuleError as exc:
                log.warning("removing rules from %s: %s", entry.netns, exc)
        self.enrolled.pop(entry.uid, None)
        self.netns_hints.pop(entry.uid, None)
        self.metrics.removals.inc()
        self.metrics.enrolled.set(len(self.enrolled))

    async def _annotate(self, pod: Obj, value: str | None) -> None:
        current = (pod["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)
        if current == value:
            return
        try:
            await self.client.patch(POD, pod["metadata"]["name"],
                                    {"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}},
                                    pod["metadata"]["namespace"], status=True)
        except ApiError as exc:
            if exc.code != 404:
                log.warning("annotating %s: %s", pod["metadata"]["name"], exc)

    # -- the plugin's synchronous path ---------------------------------------------------------------------
    async def handle_cmdadd(self, request: web.Request) -> web.Response:
        try:
            add = parse_cmdadd(await request.read())
        except CmdAddError as exc:
            self.metrics.plugin_requests.labels("bad_request").inc()
            return web.Response(status=400, text=str(exc))
        log.info("plugin ADD for %s/%s (netns %s)", add.pod_namespace, add.pod_name, add.netns)
        try:
            pod = await self.client.get(POD, add.pod_name, add.pod_namespace)
        except ApiError as exc:
            self.metrics.plugin_requests.labels("failed").inc()
            return web.Response(status=500, text=f"cannot read pod {add.pod_namespace}/{add.pod_name}: {exc}")
        uid = pod["metadata"]["uid"]
        self.netns_hints[uid] = add.netns
        ips = [str(ip.address.ip) for ip in add.ips] or enrollment.pod_ips(pod)
        async with self._lock(uid):
            try:
                await self._enroll(pod, add.netns, ips)
            except EnrollError as exc:
                self.metrics.plugin_requests.labels("failed").inc()
                return web.Response(status=500, text=str(exc))
        self.metrics.plugin_requests.labels("ok").inc()
        return web.Response(status=200, text="enrolled")

    # -- ZDS snapshot, drift repair, installer ---------------------------------------------------------
    async def _zds_snapshot(self) -> list[tuple[str, zds_pb2.WorkloadInfo, str | None]]:
        return [(e.uid, zds_pb2.WorkloadInfo(name=e.name, namespace=e.namespace, service_account=e.service_account),
                 e.netns if Path(e.netns).exists() else None) for e in self.enrolled.values()]

    async def rebuild(self) -> None:
        """After a restart: pods annotated `enabled` on this node are ours again (rules re-verified by the
        drift check); their netns is rediscovered."""
        for pod in self.pods.items():
            annotations = pod["metadata"].get("annotations") or {}
            if annotations.get(REDIRECTION_ANNOTATION) != "enabled" or not enrollment.running(pod):
                continue
            netns = self._find_netns(pod)
            if netns is None:
                continue
            meta = pod["metadata"]
            ips = enrollment.pod_ips(pod)
            self.enrolled[meta["uid"]] = Enrollment(
                meta["uid"], meta["name"], meta["namespace"], pod["spec"].get("serviceAccountName", "default"),
                netns, ips, enrollment.rule_config(pod, self.config.dns_capture, ips))
        self.metrics.enrolled.set(len(self.enrolled))

    async def _drift_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.drift_interval)
            await self.repair_drift()

    async def repair_drift(self) -> int:
        repaired = 0
        for entry in list(self.enrolled.values()):
            if not Path(entry.netns).exists():
                continue
            async with self._lock(entry.uid):
                drift = await asyncio.to_thread(self.rules.verify, entry.netns, entry.rules)
                if drift:
                    log.warning("pod %s/%s: redirection drifted (%s); repairing", entry.namespace, entry.name,
                                "; ".join(drift))
                    await asyncio.to_thread(self.rules.apply, entry.netns, entry.rules)
                    self.metrics.repairs.inc()
                    repaired += 1
        for pod in self.pods.items():
            self._queue(pod["metadata"]["uid"])
        return repaired

    async def _installer_loop(self) -> None:
        """Install the plugin, then keep it installed (another CNI rewrote the config, the token rotated):
        every `install_check_interval` a cheap check, a repair when it fails. Each problem is logged once,
        when it starts; waiting for the primary CNI's config is expected at node start-up, not an error."""
        installer = self.installer
        assert installer is not None
        while True:
            try:
                changed = await asyncio.to_thread(installer.ensure)
            except (InstallError, OSError) as exc:
                waiting = isinstance(exc, InstallError) and exc.reason == "no_primary_config"
                problem = (f"waiting for the primary CNI network config in {installer.conf_dir}" if waiting
                           else f"CNI install failed: {exc}")
                if problem != self.install_problem:
                    log.log(logging.INFO if waiting else logging.ERROR, "%s", problem)
                self._set_installed(False, problem)
            else:
                if changed:
                    log.info("CNI plugin installed in %s (entry in %s)", installer.bin_dir, installer.primary_config())
                self._set_installed(True, "")
            await asyncio.sleep(self.config.install_check_interval)

    def _set_installed(self, installed: bool, problem: str) -> None:
        self.plugin_installed, self.install_problem = installed, problem
        self._update_ready()

    def _update_ready(self) -> None:
        ready = self.synced and (self.installer is None or self.plugin_installed)
        if ready and not self.ready.is_set():
            self.ready.set()
            log.info("ready: node %s, %d pod(s) enrolled, plugin socket %s, ZDS %s", self.config.node_name,
                     len(self.enrolled), self.config.plugin_socket, self.config.zds_socket)
        elif not ready and self.ready.is_set():
            self.ready.clear()
            log.warning("not ready: %s", self.install_problem)

    # -- stopping: uninstall or keep the plugin ----------------------------------------------------------
    @property
    def own_daemonset(self) -> str:
        return f"{self.config.pod_namespace}/{self.config.daemonset_name}"

    async def read_own_daemonset(self, timeout: float) -> Obj | ApiError | None:
        """The agent's DaemonSet, the API's refusal, or None (no answer within `timeout`)."""
        try:
            return await asyncio.wait_for(
                self.client.get(DAEMONSET, self.config.daemonset_name, self.config.pod_namespace), timeout)
        except ApiError as exc:
            return exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("reading DaemonSet %s: %r", self.own_daemonset, exc)
            return None

    async def _check_own_daemonset(self) -> None:
        """At start, in a pod: warn now if the stop-time decision could not see our DaemonSet, since it would
        then remove the plugin at every upgrade."""
        answer = await self.read_own_daemonset(DAEMONSET_CHECK_TIMEOUT)
        if not isinstance(answer, ApiError):
            return
        consequence = ("otherwise the agent removes the CNI plugin from this node whenever it stops, upgrades "
                       "included")
        if answer.code == 404:
            log.warning("DaemonSet %s not found: pass --daemonset-name with the DaemonSet this agent runs in; %s",
                        self.own_daemonset, consequence)
        elif answer.code in (401, 403):
            log.warning("cannot read DaemonSet %s (%d %s: %s): grant this pod's service account `get` on "
                        "daemonsets.apps in namespace %s; %s", self.own_daemonset, answer.code, answer.reason,
                        answer, self.config.pod_namespace, consequence)

    async def shutdown(self) -> None:
        """After `run` was cancelled (SIGTERM): in a pod, remove the plugin if the install is going away
        (`decide_shutdown`); outside a pod (the local cluster) always keep it."""
        if self.installer is None:
            return
        if not self.config.in_pod:
            log.info("not running in a pod ($POD_NAME/$POD_NAMESPACE unset): leaving the CNI plugin installed")
            return
        answer = await self.read_own_daemonset(self.config.shutdown_check_timeout)
        decision = decide_shutdown(answer, self.own_daemonset)
        if not decision.uninstall:
            log.info("leaving the CNI plugin installed (new pods fail closed until the agent is back): %s",
                     decision.reason)
            return
        log.info("removing the CNI plugin from this node: %s", decision.reason)
        try:
            await asyncio.to_thread(self.installer.uninstall)
        except OSError as exc:
            log.error("removing the CNI plugin: %s; run `ambient-cni-agent uninstall` on the node", exc)

    async def serve(self) -> None:
        """`run` until cancelled (SIGTERM, through `cancel_on_signals`), then `shutdown`. A crash (an exception
        out of `run`) propagates without touching the plugin: the container restarts."""
        started = time.monotonic()
        try:
            await self.run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: what follows may await (and time out) normally
            log.info("stopping after %.0fs; enrolled pods keep their rules", time.monotonic() - started)
            await self.shutdown()

    # -- servers -----------------------------------------------------------------------------------------
    async def _serve(self) -> list[web.AppRunner]:
        runners = []
        plugin_app = web.Application()
        plugin_app.router.add_post("/cmdadd", self.handle_cmdadd)
        socket_path = self.config.plugin_socket
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        runner = web.AppRunner(plugin_app, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(socket_path)).start()
        runners.append(runner)

        health = web.Application()
        health.router.add_get("/healthz", self._healthz)
        health.router.add_get("/readyz", self._readyz)
        health.router.add_get("/metrics", self._metrics)
        for address in {self.config.health_address, self.config.metrics_address}:
            runner = web.AppRunner(health, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, address[0], address[1], reuse_address=True).start()
            runners.append(runner)
        return runners

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.ready.is_set():
            return web.Response(text="ready")
        why = "syncing pods" if not self.synced else self.install_problem
        return web.Response(status=503, text=f"not ready: {why}")

    async def _metrics(self, _: web.Request) -> web.Response:
        self.metrics.ztunnels.set(self.zds.connected())
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def run(self) -> None:
        await asyncio.to_thread(self.probe.ensure)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.pods.run(), name="pod-informer")
            tg.create_task(self.namespaces.run(), name="namespace-informer")
            await self.pods.synced.wait()
            await self.namespaces.synced.wait()
            await self.rebuild()
            await self.zds.start()
            runners = await self._serve()
            try:
                if self.installer is not None:
                    tg.create_task(self._installer_loop(), name="installer")
                    if self.config.in_pod:
                        tg.create_task(self._check_own_daemonset(), name="daemonset-check")
                for worker in range(RECONCILE_WORKERS):
                    tg.create_task(self._reconcile_loop(), name=f"reconcile-{worker}")
                tg.create_task(self._drift_loop(), name="drift")
                for pod in self.pods.items():
                    self._queue(pod["metadata"]["uid"])
                self.synced = True
                self._update_ready()
                await asyncio.Event().wait()
            finally:
                for runner in runners:
                    await runner.cleanup()
                await self.zds.close()


def plugin_kubeconfig(config: AgentConfig) -> PluginKubeconfig | None:
    """The plugin's kubeconfig, in the run dir (the same path on the host and in the agent's pod): a copy of
    `--plugin-kubeconfig`, else, in a pod, one rendered from its service account; else none."""
    source: KubeconfigSource
    if config.plugin_kubeconfig:
        source = CopiedKubeconfig(Path(config.plugin_kubeconfig))
    elif config.api_host:
        source = ServiceAccountKubeconfig(config.api_host, config.api_port or "443", Path(config.service_account_dir))
    else:
        return None
    return PluginKubeconfig(Path(config.run_dir) / KUBECONFIG_NAME, source)


def build_installer(config: AgentConfig) -> Installer | None:
    if not config.cni_conf_dir:
        return None
    entry = {"plugin_log_level": "info", "cni_agent_run_dir": config.run_dir, "ambient_enabled": True,
             "exclude_namespaces": list(config.exclude_namespaces)}
    source = Path(config.plugin_source) if config.plugin_source else default_plugin_source()
    return Installer(Path(config.cni_conf_dir), Path(config.cni_bin_dir), source, entry, plugin_kubeconfig(config))


async def main_async(config: AgentConfig, installer: Installer | None) -> None:
    cancel_on_signals()
    client = KubeClient(KubeConfig.load(config.kubeconfig))
    agent = NodeAgent(config, client, InpodRules(config.rules_backend), HostProbe(config.rules_backend,
                      config.host_probe_uid), installer)
    try:
        await agent.serve()
    finally:
        await client.close()


def main() -> None:
    command, config, level = parse_args()
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    installer = build_installer(config)
    if command == "uninstall":
        if installer is None:
            sys.exit("ambient-cni-agent uninstall: --cni-conf-dir and --cni-bin-dir are required")
        installer.uninstall()
        (Path(config.run_dir) / KUBECONFIG_NAME).unlink(missing_ok=True)
        return
    if installer is not None:
        try:
            installer.check_source()  # a wrong --plugin-source is a deployment error, not something to wait out
        except (InstallError, OSError) as exc:
            sys.exit(f"ambient-cni-agent: {exc}")
    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):  # a second SIGTERM while stopping
            asyncio.run(main_async(config, installer))
    except KubeConfigError as exc:
        sys.exit(f"ambient-cni-agent: {exc}")


if __name__ == "__main__":
    main()
