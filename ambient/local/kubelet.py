"""The local cluster's kubelet: runs the pods bound to one simulated node.

One process per node, started inside the node's network namespace. For each pod it creates a network
namespace (`amb-pod-<uid>`), wires it by running the node's CNI configuration list exactly as a container
runtime does, writes the pod's resolv.conf, runs each container's command as a process inside the pod
namespace (`ip netns exec`), runs readiness probes, honours `restartPolicy`, and writes the pod's status
back. Deleting a pod stops its processes, runs CNI DEL and removes the namespace. The same process also
keeps this node's Service VIP rules in sync (`ambient.local.kubeproxy`).

It must not schedule pods, create pods or touch other nodes' pods: those are the controllers' jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ambient.aio import cancel_on_signals
from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.events import EventRecorder, now_rfc3339
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable
from ambient.local import cni
from ambient.local.kubeproxy import KubeProxy
from ambient.local.layout import StateDir, pod_netns_name
from ambient.local.network import KUBE_DNS_IP, NodeNet, run

log = logging.getLogger("ambient.kubelet")
Obj = dict[str, Any]
TYPES = ResourceTable()
POD = TYPES.require("pods")
NODE = TYPES.require("nodes")
SERVICE = TYPES.require("services")
SLICE = TYPES.require("endpointslices")

HEARTBEAT_INTERVAL = 10.0  # seconds between Node Ready heartbeats
SANDBOX_RETRY_MAX = 10.0  # seconds: cap of the backoff between failed sandbox (CNI ADD) attempts
CRASH_BACKOFF_MAX = 20.0  # seconds: cap of CrashLoopBackOff (Kubernetes uses 5 min; tests want minutes less)
MAX_STOP_GRACE = 10.0  # seconds we wait for SIGTERM before SIGKILL, whatever the pod asks for
PROXY_DEBOUNCE = 0.1  # seconds to gather Service/EndpointSlice changes into one iptables-restore
# A mirror pod stands for a process something else runs on the node (a static pod; here each node's ztunnel,
# see ambient/local/supervisor.py): the kubelet runs nothing for it.
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


def resolv_conf(namespace: str) -> str:
    search = f"{namespace}.svc.cluster.local svc.cluster.local cluster.local"
    return f"search {search}\nnameserver {KUBE_DNS_IP}\noptions ndots:5\n"


# `$$` is matched first so that `$$(VAR)` stays the literal `$(VAR)`, as Kubernetes escapes it.
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion in command and args; unknown references stay as written."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class Sandbox:
    netns: str | None  # None for hostNetwork pods
    ips: list[str]
    cni_result: Obj | None
    container_id: str

    @property
    def netns_path(self) -> str | None:
        return f"/run/netns/{self.netns}" if self.netns else None


def _field_ref(pod: Obj, path: str, node: NodeNet, sandbox: Sandbox) -> str:
    meta = pod["metadata"]
    values = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": node.name, "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": sandbox.ips[0] if sandbox.ips else "", "status.hostIP": node.ip,
    }
    if m := re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path):
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    return str(values.get(path, ""))


@dataclass
class ContainerRunner:
    """One container: its process, restarts and readiness."""

    worker: PodWorker
    spec: Obj
    restart_count: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    process: asyncio.subprocess.Process | None = None
    done: bool = False  # will not run again (restartPolicy)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> Obj:
        return {"name": self.name, "ready": self.ready, "started": self.started,
                "restartCount": self.restart_count, "state": self.state, "lastState": self.last_state,
                "image": self.spec.get("image", ""), "imageID": "", "containerID": f"local://{self.worker.uid}/"
                f"{self.name}"}

    def _env(self) -> dict[str, str]:
        w = self.worker
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "HOSTNAME": w.pod["metadata"]["name"], "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
        }
        for var in self.spec.get("env") or []:
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
            elif ref := (var.get("valueFrom") or {}).get("fieldRef"):
                env[var["name"]] = _field_ref(w.pod, ref.get("fieldPath", ""), w.node, w.sandbox_or_empty)
        return env

    def _argv(self, env: dict[str, str], cwd: str) -> list[str]:
        if not Path(cwd).is_dir():
            raise RuntimeError(f"workingDir {cwd!r} does not exist on this host")
        command = [expand(a, env) for a in (self.spec.get("command") or [])]
        args = [expand(a, env) for a in (self.spec.get("args") or [])]
        if not command:
            # No image is run here, so a container needs its command spelled out.
            raise RuntimeError("the local cluster runs a container's `command` (images are not used); "
                               "this container has none")
        argv = command + args
        netns = self.worker.sandbox_or_empty.netns
        return ["ip", "netns", "exec", netns, *argv] if netns else argv

    async def run(self) -> None:
        backoff = 1.0
        policy = self.worker.pod["spec"].get("restartPolicy", "Always")
        while True:
            began = time.monotonic()
            exit_code = await self._run_once()
            if exit_code is None:
                return  # stopped by the worker
            if policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                self.done = True
                self.worker.changed.set()
                return
            if time.monotonic() - began > 60:
                backoff = 1.0
            self.last_state = self.state
            self.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                f"back-off {backoff:.0f}s restarting failed container={self.name} "
                f"pod={self.worker.pod['metadata']['name']}")}}
            self.worker.changed.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, CRASH_BACKOFF_MAX)
            self.restart_count += 1

    async def _run_once(self) -> int | None:
        w = self.worker
        env = self._env()
        cwd = self.spec.get("workingDir") or "/"
        log_path = w.pod_dir / f"{self.name}.log"
        try:
            argv = self._argv(env, cwd)
            with log_path.open("ab") as out:
                self.process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    env=env, cwd=cwd, start_new_session=True)
        except (OSError, RuntimeError) as exc:
            message = str(exc)
            with log_path.open("a") as out:
                out.write(f"failed to start container {self.name}: {message}\n")
            self.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                         "finishedAt": now_rfc3339()}}
            await w.events.record(w.pod, "Warning", "Failed", f"Error: {message}")
            self.worker.changed.set()
            return 128
        w.record_pid(self.name, self.process.pid)
        self.started = True
        self.state = {"running": {"startedAt": now_rfc3339()}}
        await w.events.record(w.pod, "Normal", "Started", f"Started container {self.name}")
        self.worker.changed.set()
        probe = asyncio.create_task(self._probe_loop(), name=f"probe-{self.name}")
        try:
            code = await self.process.wait()
        except asyncio.CancelledError:
            probe.cancel()
            await self.stop()
            return None
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        self.ready = False
        self.started = False
        reason = "Completed" if code == 0 else "Error"
        self.state = {"terminated": {"exitCode": code if code >= 0 else 128 - code, "reason": reason,
                                     "finishedAt": now_rfc3339()}}
        self.worker.changed.set()
        return code

    async def stop(self) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        grace = min(float(self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30)), MAX_STOP_GRACE)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Children that outlived the leader (a shell's background jobs) go with the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def _probe_loop(self) -> None:
        probe = self.spec.get("readinessProbe")
        if not probe:
            self.ready = True
            self.worker.changed.set()
            return
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        period = float(probe.get("periodSeconds", 10))
        success_needed = int(probe.get("successThreshold", 1))
        failure_needed = int(probe.get("failureThreshold", 3))
        successes = failures = 0
        while True:
            ok, detail = await self.worker.probe(probe, self.spec)
            if ok:
                successes, failures = successes + 1, 0
                if not self.ready and successes >= success_needed:
                    self.ready = True
                    self.worker.changed.set()
            else:
                successes, failures = 0, failures + 1
                if (self.ready and failures >= failure_needed) or (not self.ready and failures == failure_needed):
                    if self.ready:
                        self.ready = False
                        self.worker.changed.set()
                    await self.worker.events.record(self.worker.pod, "Warning", "Unhealthy",
                                                    f"Readiness probe failed: {detail}")
            await asyncio.sleep(period)


class PodWorker:
    """Everything about one pod on this node, driven by the latest pod object from the informer."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.uid: str = pod["metadata"]["uid"]
        self.node = kubelet.node
        self.state = kubelet.state
        self.events = kubelet.events
        self.changed = asyncio.Event()
        self.sandbox: Sandbox | None = None
        self.sandbox_error: str | None = None
        self.containers = [ContainerRunner(self, c) for c in pod["spec"]["containers"]]
        self.tasks: list[asyncio.Task[None]] = []
        self.pod_dir = self.state.pod_dir(self.node.name, pod["metadata"]["namespace"], pod["metadata"]["name"],
                                          self.uid)
        self.start_time = now_rfc3339()
        self._published: Obj | None = None

    @property
    def sandbox_or_empty(self) -> Sandbox:
        return self.sandbox or Sandbox(None, [], None, "")

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def update(self, pod: Obj) -> None:
        self.pod = pod
        self.changed.set()

    def record_pid(self, container: str, pid: int) -> None:
        record = self._record()
        with contextlib.suppress(psutil.Error):
            record.setdefault("pids", {})[container] = [pid, psutil.Process(pid).create_time()]
        self._write_record(record)

    def _record(self) -> Obj:
        path = self.pod_dir / "sandbox.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_record(self, record: Obj) -> None:
        (self.pod_dir / "sandbox.json").write_text(json.dumps(record))

    async def run(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._ensure_sandbox()
            if self.sandbox is not None and not self.deleting:
                self.tasks = [asyncio.create_task(c.run(), name=f"{self.uid}/{c.name}") for c in self.containers]
            while not self.deleting and not self.kubelet.stopping:
                await self.publish()
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 5)
        finally:
            await self.teardown()
        if self.deleting and not self.kubelet.stopping:
            with contextlib.suppress(ApiError):
                await self.kubelet.client.delete(POD, self.pod["metadata"]["name"], self.pod["metadata"]["namespace"],
                                                 grace_period=0)

    async def _ensure_sandbox(self) -> None:
        delay = 1.0
        while self.sandbox is None and not self.deleting and not self.kubelet.stopping:
            try:
                self.sandbox = await self.kubelet.create_sandbox(self.pod, self.pod_dir)
                self.sandbox_error = None
            except (cni.CniError, OSError) as exc:
                self.sandbox_error = str(exc)
                log.warning("pod %s/%s: sandbox failed: %s", self.pod["metadata"]["namespace"],
                            self.pod["metadata"]["name"], exc)
                await self.events.record(self.pod, "Warning", "FailedCreatePodSandBox",
                                         f"Failed to create pod sandbox: {exc}")
                await self.publish()
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), delay)
                delay = min(delay * 2, SANDBOX_RETRY_MAX)

    async def teardown(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.deleting:
            await self.events.record(self.pod, "Normal", "Killing", "Stopping pod")
        await self.kubelet.destroy_sandbox(self.pod, self.pod_dir, self.sandbox)
        self.sandbox = None

    async def probe(self, probe: Obj, container: Obj) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds", 1))
        ip = self.sandbox_or_empty.ips[0] if self.sandbox_or_empty.ips else self.node.ip
        try:
            if "httpGet" in probe:
                spec = probe["httpGet"]
                port = _resolve_port(spec.get("port"), container)
                return await asyncio.wait_for(_http_probe(spec.get("host") or ip, port, spec.get("path", "/"),
                                                          spec.get("httpHeaders") or []), timeout)
            if "tcpSocket" in probe:
                port = _resolve_port(probe["tcpSocket"].get("port"), container)
                _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
                writer.close()
                return True, ""
            if "exec" in probe:
                netns = self.sandbox_or_empty.netns
                argv = probe["exec"].get("command") or []
                full = ["ip", "netns", "exec", netns, *argv] if netns else argv
                proc = await asyncio.create_subprocess_exec(*full, stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.STDOUT)
                try:
                    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    raise
                return proc.returncode == 0, out.decode(errors="replace").strip()[:200]
            return True, ""
        except TimeoutError:
            return False, f"timeout after {timeout:.0f}s"
        except (OSError, ValueError) as exc:
            return False, str(exc)

    def status(self) -> Obj:
        containers = [c.status() for c in self.containers]
        all_ready = self.sandbox is not None and all(c.ready for c in self.containers)
        if self.sandbox is None:
            phase = "Pending"
            for c in containers:
                c["state"] = {"waiting": {"reason": "ContainerCreating",
                                          **({"message": self.sandbox_error} if self.sandbox_error else {})}}
        elif all(c.done for c in self.containers):
            failed = any(c.state.get("terminated", {}).get("exitCode", 0) != 0 for c in self.containers)
            phase = "Failed" if failed else "Succeeded"
        elif any(c.started or c.restart_count for c in self.containers):
            phase = "Running"
        else:
            phase = "Pending"

        def condition(kind: str, ok: bool, message: str | None = None) -> Obj:
            cond: Obj = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None}
            if message and not ok:
                cond["message"] = message
                cond["reason"] = "FailedCreatePodSandBox" if kind == "PodReadyToStartContainers" else "NotReady"
            return cond

        sandbox = self.sandbox_or_empty
        return {
            "phase": phase,
            "hostIP": self.node.ip,
            "hostIPs": [{"ip": self.node.ip}],
            "podIP": sandbox.ips[0] if sandbox.ips else None,
            "podIPs": [{"ip": ip} for ip in sandbox.ips] or None,
            "startTime": self.start_time,
            "conditions": [
                condition("PodReadyToStartContainers", self.sandbox is not None, self.sandbox_error),
                condition("Initialized", True),
                condition("ContainersReady", all_ready),
                condition("Ready", all_ready),
                condition("PodScheduled", True),
            ],
            "containerStatuses": containers,
            "qosClass": "BestEffort",
        }

    async def publish(self) -> None:
        status = self.status()
        if status == self._published:
            return
        try:
            await self.kubelet.client.patch(POD, self.pod["metadata"]["name"], {"status": status},
                                            self.pod["metadata"]["namespace"], status=True)
            self._published = status
        except ApiError as exc:
            if exc.code != 404:
                log.warning("pod %s: status update failed: %s", self.pod["metadata"]["name"], exc)


def _resolve_port(port: Any, container: Obj) -> int:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"port {port!r} is not a number nor a named port of container {container['name']}")


async def _http_probe(host: str, port: int, path: str, headers: list[Obj]) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        extra = "".join(f"{h['name']}: {h['value']}\r\n" for h in headers)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.30\r\n{extra}"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        line = (await reader.readline()).decode(errors="replace")
        parts = line.split()
        code = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        return 200 <= code < 400, f"HTTP probe failed with statuscode: {code}" if code else "no HTTP response"
    finally:
        writer.close()


class Kubelet:
    def __init__(self, state: StateDir, node: NodeNet, client: KubeClient) -> None:
        self.state, self.node, self.client = state, node, client
        self.events = EventRecorder(client, "kubelet", node.name)
        self.workers: dict[str, PodWorker] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping = False
        self.proxy = KubeProxy()
        self._proxy_dirty = asyncio.Event()
        self.pods = Informer(client, POD, field_selector=f"spec.nodeName={node.name}", handler=self._on_pod)
        self.services = Informer(client, SERVICE, handler=self._on_proxy_change)
        self.slices = Informer(client, SLICE, handler=self._on_proxy_change)
        self.cni_path = f"{state.cni_bin_dir(node.name)}:/usr/lib/cni:/opt/cni/bin"

    # -- pods --------------------------------------------------------------------------------------
    def _on_pod(self, event: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if self.stopping or MIRROR_ANNOTATION in (pod["metadata"].get("annotations") or {}):
            return
        worker = self.workers.get(uid)
        if event == "DELETED":
            if worker:
                worker.pod["metadata"].setdefault("deletionTimestamp", now_rfc3339())
                worker.changed.set()
            return
        if worker:
            worker.update(pod)
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not pod["metadata"].get(
                "deletionTimestamp"):
            return  # a finished pod from an earlier kubelet run: nothing to run
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        self.tasks[uid] = asyncio.create_task(self._run_worker(worker), name=f"pod-{uid}")

    async def _run_worker(self, worker: PodWorker) -> None:
        try:
            await worker.run()
        except Exception:
            log.exception("pod worker %s failed", worker.uid)
        finally:
            self.workers.pop(worker.uid, None)
            self.tasks.pop(worker.uid, None)

    async def create_sandbox(self, pod: Obj, pod_dir: Path) -> Sandbox:
        meta = pod["metadata"]
        if pod["spec"].get("hostNetwork"):
            return Sandbox(None, [self.node.ip], None, meta["uid"])
        netns = pod_netns_name(meta["uid"])
        record: Obj = {"netns": netns, "pod": f"{meta['namespace']}/{meta['name']}"}
        (pod_dir / "sandbox.json").write_text(json.dumps(record))
        if not Path(f"/run/netns/{netns}").exists():
            run("ip", "netns", "add", netns)
        run("ip", "-n", netns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / netns
        etc.mkdir(parents=True, exist_ok=True)
        if pod["spec"].get("dnsPolicy") == "Default":
            shutil.copyfile("/etc/resolv.conf", etc / "resolv.conf")
        else:
            (etc / "resolv.conf").write_text(resolv_conf(meta["namespace"]))
        conflist = cni.load_conflist(self.state.cni_conf_dir(self.node.name))
        inv = cni.Invocation(meta["uid"], f"/run/netns/{netns}", "eth0", meta["name"], meta["namespace"], meta["uid"])
        try:
            result = await cni.add(conflist, inv, self.cni_path)
        except cni.CniError:
            # As a runtime does: undo the part of the chain that succeeded, and start the next attempt
            # from a fresh namespace.
            await cni.delete(conflist, inv, self.cni_path, None)
            run("ip", "netns", "del", netns, check=False)
            raise
        record.update(cni_result=result, conflist=conflist)
        (pod_dir / "sandbox.json").write_text(json.dumps(record))
        ips = cni.result_ips(result)
        if not ips:
            raise cni.CniError(conflist["plugins"][-1].get("type", ""), "ADD", "the chain returned no IP address")
        return Sandbox(netns, ips, result, meta["uid"])

    async def destroy_sandbox(self, pod: Obj, pod_dir: Path, sandbox: Sandbox | None) -> None:
        """Stop what is left of a pod and remove its network namespace. Safe to call twice."""
        record_path = pod_dir / "sandbox.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        kill_recorded(record)
        netns = record.get("netns") or (sandbox.netns if sandbox else None)
        if netns:
            meta = pod["metadata"]
            inv = cni.Invocation(meta["uid"], f"/run/netns/{netns}", "eth0", meta["name"], meta["namespace"],
                                 meta["uid"])
            conflist = record.get("conflist")
            if conflist is None:
                with contextlib.suppress(cni.CniError):
                    conflist = cni.load_conflist(self.state.cni_conf_dir(self.node.name))
            if conflist:
                for error in await cni.delete(conflist, inv, self.cni_path, record.get("cni_result")):
                    log.warning("pod %s/%s: CNI DEL: %s", meta["namespace"], meta["name"], error)
                    await self.events.record(pod, "Warning", "FailedKillPod", f"CNI DEL failed: {error}")
            run("ip", "netns", "del", netns, check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        record_path.unlink(missing_ok=True)

    async def cleanup_stale_sandboxes(self) -> None:
        """Sandboxes left by an earlier run of this kubelet: remove them; the pods get fresh ones."""
        pods_dir = self.state.pods(self.node.name)
        for record in pods_dir.glob("*/sandbox.json"):
            ns, name, uid = record.parent.name.split("_", 2)
            stub = {"metadata": {"namespace": ns, "name": name, "uid": uid}, "spec": {}}
            await self.destroy_sandbox(stub, record.parent, None)

    # -- node --------------------------------------------------------------------------------------
    async def register_node(self) -> None:
        node = self.node
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {
                "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "ambient-local"}},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
        }
        try:
            await self.client.create(body)
        except ApiError as exc:
            if exc.code != 409:
                raise
        await self.heartbeat()

    async def heartbeat(self) -> None:
        now = now_rfc3339()
        status = {
            "addresses": [{"type": "InternalIP", "address": self.node.ip},
                          {"type": "Hostname", "address": self.node.name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubelet is posting ready status", "lastHeartbeatTime": now,
                            "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": "v1.30.0-ambient-local", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "ambient-local://netns"},
        }
        await self.client.patch(NODE, self.node.name, {"status": status}, status=True)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self.heartbeat()
            except ApiError as exc:
                log.warning("node heartbeat failed: %s", exc)

    # -- kube-proxy --------------------------------------------------------------------------------
    def _on_proxy_change(self, event: str, obj: Obj) -> None:
        self._proxy_dirty.set()

    async def _proxy_loop(self) -> None:
        await self.services.synced.wait()
        await self.slices.synced.wait()
        while True:
            await self._proxy_dirty.wait()
            await asyncio.sleep(PROXY_DEBOUNCE)
            self._proxy_dirty.clear()
            try:
                await asyncio.to_thread(self.proxy.sync, self.services.items(), self.slices.items())
            except Exception as exc:
                log.error("service rules sync failed: %s", exc)
                self._proxy_dirty.set()
                await asyncio.sleep(1)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        self.state.pods(self.node.name).mkdir(parents=True, exist_ok=True)
        await self.cleanup_stale_sandboxes()
        await self.register_node()
        self._proxy_dirty.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.pods.run(), name="pod-informer")
            tg.create_task(self.services.run(), name="service-informer")
            tg.create_task(self.slices.run(), name="slice-informer")
            tg.create_task(self._proxy_loop(), name="kube-proxy")
            tg.create_task(self._heartbeat_loop(), name="heartbeat")

    async def shutdown(self) -> None:
        """Stop every pod on this node (processes, CNI DEL, namespace) without deleting the Pod objects."""
        self.stopping = True
        for worker in list(self.workers.values()):
            worker.changed.set()
        tasks = list(self.tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=MAX_STOP_GRACE + 20)


def kill_recorded(record: Obj) -> None:
    """Kill the recorded container processes (and their groups), only if they are still the same
    processes: a PID is checked against its recorded start time before anything is signalled."""
    for pid, created in (record.get("pids") or {}).values():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.01:
                continue
            os.killpg(pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue


async def main_async(args: argparse.Namespace) -> None:
    state = StateDir(Path(args.state_dir))
    node = NodeNet(args.node_index)
    client = KubeClient(KubeConfig.load(state.kubeconfig))
    kubelet = Kubelet(state, node, client)
    cancel_on_signals()
    try:
        await kubelet.run()
    except asyncio.CancelledError:
        log.info("stopping: tearing down pods on %s", node.name)
        await kubelet.shutdown()
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="local cluster kubelet for one simulated node")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--node-index", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
