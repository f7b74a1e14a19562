"""`ambient-cni-agent`: the node agent that enrolls this node's ambient pods (PROTOCOLS §2-§4, §9).

Enrollment order (§3): install the in-pod rules → hand the netns to ztunnel over ZDS and wait for its
ack → add the pod IPs to the host probe set → annotate `ambient.istio.io/redirection: enabled`. If
ztunnel does not ack, the pod is annotated `pending` and the enrollment fails (so a plugin ADD fails
closed). Removal runs in reverse, triggered by the pod and namespace informers (CNI DEL does nothing).

Sources of work: the plugin's synchronous `POST /cmdadd` during pod creation; pod and namespace watch
events (a namespace label flip enrolls or removes running pods without restarting them); a periodic
drift check that re-verifies every enrolled pod's rules and repairs them — the annotation is never
trusted on its own.
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
from cni.installer import Installer, InstallError
from cni.rules import HostProbe, InpodRules, PodRuleConfig, RuleError
from cni.zds_server import ZdsError, ZdsServer

log = logging.getLogger("ambient.cni.agent")
Obj = dict[str, Any]
TYPES = ResourceTable()
POD, NAMESPACE = TYPES.require("pods"), TYPES.require("namespaces")
# Pods enrolled in parallel (a uid is never handled by two at once: per-pod locks); a namespace label
# flip on a busy node is bounded by rule installation in each netns, which runs off the event loop.
RECONCILE_WORKERS = 4


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
        self.ready = asyncio.Event()
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
        assert self.installer is not None
        while True:
            try:
                if not self.installer.installed() and self.installer.install():
                    log.info("CNI plugin configuration (re)installed")
            except (InstallError, OSError) as exc:
                log.error("CNI install: %s", exc)
            await asyncio.sleep(1)

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
        return web.Response(status=503, text="not ready: syncing pods or installing the CNI config")

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
                    await asyncio.to_thread(self.installer.install)
                    tg.create_task(self._installer_loop(), name="installer")
                for worker in range(RECONCILE_WORKERS):
                    tg.create_task(self._reconcile_loop(), name=f"reconcile-{worker}")
                tg.create_task(self._drift_loop(), name="drift")
                for pod in self.pods.items():
                    self._queue(pod["metadata"]["uid"])
                self.ready.set()
                log.info("ready: node %s, %d pod(s) enrolled, plugin socket %s, ZDS %s", self.config.node_name,
                         len(self.enrolled), self.config.plugin_socket, self.config.zds_socket)
                await asyncio.Event().wait()
            finally:
                for runner in runners:
                    await runner.cleanup()
                await self.zds.close()


def build_installer(config: AgentConfig) -> Installer | None:
    if not config.cni_conf_dir:
        return None
    entry = {"plugin_log_level": "info", "cni_agent_run_dir": config.run_dir, "ambient_enabled": True,
             "exclude_namespaces": list(config.exclude_namespaces)}
    source = Path(config.plugin_source) if config.plugin_source else default_plugin_source()
    return Installer(Path(config.cni_conf_dir), Path(config.cni_bin_dir), source, entry,
                     Path(config.plugin_kubeconfig) if config.plugin_kubeconfig else None)


async def main_async(config: AgentConfig) -> None:
    cancel_on_signals()
    client = KubeClient(KubeConfig.load(config.kubeconfig))
    agent = NodeAgent(config, client, InpodRules(config.rules_backend), HostProbe(config.rules_backend,
                      config.host_probe_uid), build_installer(config))
    started = time.monotonic()
    try:
        await agent.run()
    except asyncio.CancelledError:
        log.info("stopping after %.0fs; enrolled pods keep their rules", time.monotonic() - started)
    finally:
        await client.close()


def main() -> None:
    command, config, level = parse_args()
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "uninstall":
        installer = build_installer(config)
        if installer is None:
            sys.exit("ambient-cni-agent uninstall: --cni-conf-dir and --cni-bin-dir are required")
        installer.uninstall()
        return
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main_async(config))
    except KubeConfigError as exc:
        sys.exit(f"ambient-cni-agent: {exc}")


if __name__ == "__main__":
    main()
