"""The local cluster's controllers: what kube-scheduler and kube-controller-manager do, in miniature.

- scheduler: binds unscheduled pods to the Ready node with the fewest pods (`nodeSelector` honoured);
- Deployments → ReplicaSets (named by pod-template hash; new set scaled up, old ones scaled down once the
  new one is ready) → Pods;
- EndpointSlices from Service selectors, pod readiness and named/numeric target ports;
- namespaces: a `default` ServiceAccount in each; deleting one deletes its contents, then the namespace;
- garbage collection of objects whose owner is gone;
- the cluster DNS zone, fed from Services, EndpointSlices and Pods.

Each controller reconciles the whole cluster from informer caches whenever something it watches changes
(debounced): small clusters make that cheap and it cannot miss an edge. Writes go through the API like any
client; they never touch the store directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.kube.events import EventRecorder
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable, ResourceType
from ambient.kube.selectors import labels_match, selector_from_match_labels
from ambient.local.dns import ClusterZone

log = logging.getLogger("ambient.controllers")
Obj = dict[str, Any]
TYPES = ResourceTable()


POD, NODE, NAMESPACE, SERVICE = (TYPES.require(n) for n in ("pods", "nodes", "namespaces", "services"))
DEPLOYMENT, REPLICASET, SLICE, SA = (
    TYPES.require(n) for n in ("deployments", "replicasets", "endpointslices", "serviceaccounts"))

DEBOUNCE = 0.05  # seconds: gather a burst of watch events into one reconcile
EXPECTATION_TTL = 30.0  # seconds a created/deleted pod may take to show up in the cache
SLICE_MANAGER = "endpointslice-controller.k8s.io"


def owned_by(obj: Obj, owner: Obj) -> bool:
    uid = owner["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def owner_ref(owner: Obj) -> Obj:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def pod_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def pod_active(pod: Obj) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and pod.get("status", {}).get("phase") not in (
        "Succeeded", "Failed")


def template_hash(template: Obj) -> str:
    """A stable 10-character hash of a pod template, like the `pod-template-hash` label."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    value = int(digest[:16], 16)
    return "".join(alphabet[(value >> (5 * i)) % len(alphabet)] for i in range(10))


def resolve_target_port(service_port: Obj, pod: Obj) -> int | None:
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in pod["spec"].get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == target and p.get("protocol", "TCP") == service_port.get("protocol", "TCP"):
                return int(p["containerPort"])
    return None


class Expectations:
    """Pods a controller has asked for (or to delete) but not yet seen in its cache, per owner; stops
    the next reconcile from acting twice on the same gap."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, float]] = {}

    def expect(self, owner_uid: str, name: str) -> None:
        self._pending.setdefault(owner_uid, {})[name] = time.monotonic()

    def pending(self, owner_uid: str, seen: Callable[[str], bool]) -> set[str]:
        entries = self._pending.get(owner_uid, {})
        now = time.monotonic()
        for name in [n for n, t in entries.items() if seen(n) or now - t > EXPECTATION_TTL]:
            del entries[name]
        return set(entries)


class Controllers:
    def __init__(self, client: KubeClient, zone: ClusterZone | None = None) -> None:
        self.client = client
        self.zone = zone
        self.events = EventRecorder(client, "controller-manager")
        self._dirty = asyncio.Event()
        self.informers = {rt.plural: Informer(client, rt, handler=self._changed)
                          for rt in (POD, NODE, NAMESPACE, SERVICE, DEPLOYMENT, REPLICASET, SLICE, SA)}
        self._creating = Expectations()
        self._deleting = Expectations()
        self._dns_services: set[tuple[str, str]] = set()
        self._dns_pods: set[tuple[str, str]] = set()

    def _changed(self, event: str, obj: Obj) -> None:
        self._dirty.set()

    def cache(self, rt: ResourceType) -> list[Obj]:
        return self.informers[rt.plural].items()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for name, informer in self.informers.items():
                tg.create_task(informer.run(), name=f"informer-{name}")
            tg.create_task(self._loop(), name="reconcile")

    async def _loop(self) -> None:
        for informer in self.informers.values():
            await informer.synced.wait()
        steps: list[Callable[[], Coroutine[Any, Any, None]]] = [
            self.schedule, self.deployments, self.replicasets, self.endpoint_slices, self.namespaces,
            self.garbage_collect, self.feed_dns]
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            for step in steps:
                try:
                    await step()
                except ApiError as exc:
                    # Conflicts and races resolve on the next pass, which the write itself triggers.
                    log.debug("%s: %s", step.__name__, exc)
                    self._dirty.set()
                except Exception:
                    log.exception("controller step %s failed", step.__name__)
            # Periodic resync catches anything that needs a retry without a new event.
            if not self._dirty.is_set():
                asyncio.get_running_loop().call_later(5, self._dirty.set)

    # -- scheduler ---------------------------------------------------------------------------------
    async def schedule(self) -> None:
        nodes = sorted((n for n in self.cache(NODE) if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in n.get("status", {}).get("conditions") or [])), key=lambda n: n["metadata"]["name"])
        if not nodes:
            return
        load = {n["metadata"]["name"]: 0 for n in nodes}
        for pod in self.cache(POD):
            node = pod["spec"].get("nodeName")
            if node in load and pod_active(pod):
                load[node] += 1
        for pod in sorted(self.cache(POD), key=lambda p: p["metadata"].get("creationTimestamp", "")):
            if pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
                continue
            wanted = pod["spec"].get("nodeSelector") or {}
            fits = [n for n in nodes if all((n["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]
            if not fits:
                await self.events.record(pod, "Warning", "FailedScheduling",
                                         f"0/{len(nodes)} nodes are available: node selector {wanted} matches none")
                continue
            target = min(fits, key=lambda n: load[n["metadata"]["name"]])["metadata"]["name"]
            await self.client.patch(POD, pod["metadata"]["name"], {"spec": {"nodeName": target}},
                                    pod["metadata"]["namespace"])
            load[target] += 1
            await self.events.record(pod, "Normal", "Scheduled",
                                     f"Successfully assigned {pod['metadata']['namespace']}/{pod['metadata']['name']}"
                                     f" to {target}")

    # -- deployments and replica sets --------------------------------------------------------------
    async def deployments(self) -> None:
        replicasets = self.cache(REPLICASET)
        for deploy in self.cache(DEPLOYMENT):
            if deploy["metadata"].get("deletionTimestamp"):
                continue
            await self._reconcile_deployment(deploy, [rs for rs in replicasets if owned_by(rs, deploy)])

    async def _reconcile_deployment(self, deploy: Obj, owned: list[Obj]) -> None:
        meta, spec = deploy["metadata"], deploy["spec"]
        desired = spec.get("replicas", 1)
        template = spec["template"]
        hash_ = template_hash(template)
        rs_name = f"{meta['name']}-{hash_}"
        current = next((rs for rs in owned if rs["metadata"]["name"] == rs_name), None)
        if current is None:
            labels = {**(template.get("metadata") or {}).get("labels", {}), "pod-template-hash": hash_}
            selector = spec["selector"]
            current = await self.client.create({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": rs_name, "namespace": meta["namespace"], "labels": labels,
                             "ownerReferences": [owner_ref(deploy)]},
                "spec": {"replicas": desired,
                         "selector": {**selector, "matchLabels": {**selector.get("matchLabels", {}),
                                                                   "pod-template-hash": hash_}},
                         "template": {**template, "metadata": {**(template.get("metadata") or {}), "labels": labels}}},
            })
        elif current["spec"].get("replicas") != desired:
            await self.client.patch(REPLICASET, rs_name, {"spec": {"replicas": desired}}, meta["namespace"])
        new_ready = current.get("status", {}).get("readyReplicas", 0)
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        for old in owned:
            if old["metadata"]["name"] != rs_name and old["spec"].get("replicas", 0) != 0 and (
                    recreate or new_ready >= desired):
                await self.client.patch(REPLICASET, old["metadata"]["name"], {"spec": {"replicas": 0}},
                                        meta["namespace"])
        all_sets = [current, *(rs for rs in owned if rs["metadata"]["name"] != rs_name)]
        total = sum(rs.get("status", {}).get("replicas", 0) for rs in all_sets)
        ready = sum(rs.get("status", {}).get("readyReplicas", 0) for rs in all_sets)
        updated = current.get("status", {}).get("replicas", 0)
        available = ready >= desired
        status = {"observedGeneration": meta.get("generation", 1), "replicas": total, "updatedReplicas": updated,
                  "readyReplicas": ready, "availableReplicas": ready, "unavailableReplicas": max(desired - ready, 0),
                  "conditions": [{"type": "Available", "status": "True" if available else "False",
                                  "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable"}]}
        if {k: deploy.get("status", {}).get(k) for k in status} != status:
            await self.client.patch(DEPLOYMENT, meta["name"], {"status": status}, meta["namespace"], status=True)

    async def replicasets(self) -> None:
        pods = self.cache(POD)
        for rs in self.cache(REPLICASET):
            if rs["metadata"].get("deletionTimestamp"):
                continue
            await self._reconcile_replicaset(rs, [p for p in pods if owned_by(p, rs)])

    async def _reconcile_replicaset(self, rs: Obj, owned: list[Obj]) -> None:
        meta, spec = rs["metadata"], rs["spec"]
        uid = meta["uid"]
        active = [p for p in owned if pod_active(p)]
        names = {p["metadata"]["name"] for p in active}
        creating = self._creating.pending(uid, lambda n: any(p["metadata"]["name"] == n for p in owned))
        deleting = self._deleting.pending(uid, lambda n: n not in names)
        count = len(active) + len(creating) - len(deleting)
        desired = spec.get("replicas", 1)
        template = spec["template"]
        for _ in range(desired - count):
            pod = await self.client.create({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": f"{meta['name']}-", "namespace": meta["namespace"],
                             "labels": (template.get("metadata") or {}).get("labels", {}),
                             "annotations": (template.get("metadata") or {}).get("annotations", {}),
                             "ownerReferences": [owner_ref(rs)]},
                "spec": template["spec"],
            })
            self._creating.expect(uid, pod["metadata"]["name"])
        if count > desired:
            # Remove the least useful first: unscheduled, then not ready, then the newest.
            victims = sorted((p for p in active if p["metadata"]["name"] not in deleting), key=lambda p: (
                bool(p["spec"].get("nodeName")), pod_ready(p), p["metadata"].get("creationTimestamp", "")),
                reverse=False)
            for pod in victims[: count - desired]:
                with contextlib.suppress(ApiError):
                    await self.client.delete(POD, pod["metadata"]["name"], meta["namespace"])
                self._deleting.expect(uid, pod["metadata"]["name"])
        ready = sum(1 for p in active if pod_ready(p))
        status = {"replicas": len(active), "readyReplicas": ready, "availableReplicas": ready,
                  "fullyLabeledReplicas": len(active), "observedGeneration": meta.get("generation", 1)}
        if {k: rs.get("status", {}).get(k) for k in status} != status:
            await self.client.patch(REPLICASET, meta["name"], {"status": status}, meta["namespace"], status=True)

    # -- endpoint slices ---------------------------------------------------------------------------
    async def endpoint_slices(self) -> None:
        pods = self.cache(POD)
        slices = [s for s in self.cache(SLICE)
                  if (s["metadata"].get("labels") or {}).get("endpointslice.kubernetes.io/managed-by") == SLICE_MANAGER]
        for svc in self.cache(SERVICE):
            selector = svc["spec"].get("selector")
            if not selector or svc["metadata"].get("deletionTimestamp"):
                continue
            desired = self.desired_slices(svc, pods)
            existing = {s["metadata"]["name"]: s for s in slices if owned_by(s, svc)}
            for name, body in desired.items():
                current = existing.pop(name, None)
                if current is None:
                    await self.client.create(body)
                elif any(current.get(k) != body.get(k) for k in ("endpoints", "ports", "addressType")):
                    await self.client.replace({**body, "metadata": {**current["metadata"], **body["metadata"]}})
            for name in existing:
                with contextlib.suppress(ApiError):
                    await self.client.delete(SLICE, name, svc["metadata"]["namespace"])

    @staticmethod
    def desired_slices(svc: Obj, pods: list[Obj]) -> dict[str, Obj]:
        meta = svc["metadata"]
        requirements = selector_from_match_labels(svc["spec"]["selector"])
        Ports = tuple[tuple[str, int, str], ...]
        groups: dict[Ports, list[Obj]] = {}
        for pod in pods:
            if pod["metadata"].get("namespace") != meta["namespace"] or not pod.get("status", {}).get("podIP"):
                continue
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                continue
            if not labels_match(requirements, pod["metadata"].get("labels")):
                continue
            resolved: list[tuple[str, int, str]] = []
            for p in svc["spec"].get("ports") or []:
                target = resolve_target_port(p, pod)
                if target is not None:
                    resolved.append((p.get("name", ""), target, p.get("protocol", "TCP")))
            groups.setdefault(tuple(resolved), []).append(pod)
        if not groups:
            numeric = tuple((p.get("name", ""), p["targetPort"], p.get("protocol", "TCP"))
                            for p in svc["spec"].get("ports") or [] if isinstance(p.get("targetPort"), int))
            groups[numeric] = []
        result = {}
        for ports, members in groups.items():
            suffix = hashlib.sha256(repr(ports).encode()).hexdigest()[:5]
            name = f"{meta['name']}-{suffix}"
            result[name] = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": meta["namespace"],
                             "labels": {"kubernetes.io/service-name": meta["name"],
                                        "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER},
                             "ownerReferences": [owner_ref(svc)]},
                "addressType": "IPv4",
                "ports": [{"name": n, "port": port, "protocol": proto} for n, port, proto in ports],
                "endpoints": [{
                    "addresses": [pod["status"]["podIP"]],
                    "conditions": {"ready": pod_ready(pod) and not pod["metadata"].get("deletionTimestamp"),
                                   "serving": pod_ready(pod),
                                   "terminating": bool(pod["metadata"].get("deletionTimestamp"))},
                    "nodeName": pod["spec"].get("nodeName"),
                    "targetRef": {"kind": "Pod", "namespace": meta["namespace"], "name": pod["metadata"]["name"],
                                  "uid": pod["metadata"]["uid"]},
                } for pod in sorted(members, key=lambda p: p["metadata"]["name"])],
            }
        return result

    # -- namespaces --------------------------------------------------------------------------------
    async def namespaces(self) -> None:
        accounts = {(sa["metadata"]["namespace"], sa["metadata"]["name"]) for sa in self.cache(SA)}
        for ns in self.cache(NAMESPACE):
            name = ns["metadata"]["name"]
            if ns["metadata"].get("deletionTimestamp"):
                await self._empty_namespace(ns)
            elif (name, "default") not in accounts:
                with contextlib.suppress(ApiError):
                    await self.client.create({"apiVersion": "v1", "kind": "ServiceAccount",
                                              "metadata": {"name": "default", "namespace": name}})

    async def _empty_namespace(self, ns: Obj) -> None:
        name = ns["metadata"]["name"]
        remaining = 0
        for rt in await self._namespaced_types():
            try:
                items = (await self.client.list(rt, name))["items"]
            except ApiError:
                continue
            for item in items:
                remaining += 1
                if not item["metadata"].get("deletionTimestamp"):
                    with contextlib.suppress(ApiError):
                        await self.client.delete(rt, item["metadata"]["name"], name)
        if remaining == 0:
            await self.client.replace({**ns, "spec": {**ns.get("spec", {}), "finalizers": []}})
        else:
            self._dirty.set()

    async def _namespaced_types(self) -> list[ResourceType]:
        found: list[ResourceType] = []
        groups = await self.client.request("GET", "/apis")
        versions = ["v1", *(g["preferredVersion"]["groupVersion"] for g in groups.get("groups", []))]
        for gv in versions:
            listing = await self.client.request("GET", f"/api/{gv}" if gv == "v1" else f"/apis/{gv}")
            group, _, version = gv.rpartition("/")
            found += [ResourceType(group, version, r["kind"], r["name"], True)
                      for r in listing.get("resources", []) if r.get("namespaced") and "/" not in r["name"]]
        # Pods last, so that their controllers are gone first and do not recreate them.
        return sorted(found, key=lambda rt: rt.plural == "pods")

    # -- garbage collection ------------------------------------------------------------------------
    async def garbage_collect(self) -> None:
        owners = {o["metadata"]["uid"] for rt in (DEPLOYMENT, REPLICASET, SERVICE) for o in self.cache(rt)}
        for rt in (REPLICASET, POD, SLICE):
            for obj in self.cache(rt):
                refs = obj["metadata"].get("ownerReferences") or []
                if not refs or obj["metadata"].get("deletionTimestamp"):
                    continue
                if any(ref.get("uid") in owners for ref in refs):
                    continue
                if await self._owner_exists(refs[0], obj["metadata"].get("namespace", "")):
                    continue
                with contextlib.suppress(ApiError):
                    await self.client.delete(rt, obj["metadata"]["name"], obj["metadata"].get("namespace"))

    async def _owner_exists(self, ref: Obj, namespace: str) -> bool:
        try:
            rt = await self.client.resource(ref["apiVersion"], ref["kind"])
            owner = await self.client.get(rt, ref["name"], namespace)
            return bool(owner["metadata"].get("uid") == ref.get("uid"))
        except ApiError as exc:
            return exc.code != 404

    # -- cluster DNS -------------------------------------------------------------------------------
    async def feed_dns(self) -> None:
        if self.zone is None:
            return
        ready: dict[tuple[str, str], list[str]] = {}
        for s in self.cache(SLICE):
            service = (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name", "")
            key = (s["metadata"]["namespace"], service)
            ready.setdefault(key, []).extend(
                a for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready", True)
                for a in e.get("addresses") or [])
        seen = set()
        for svc in self.cache(SERVICE):
            key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
            seen.add(key)
            ip = svc["spec"].get("clusterIP")
            headless = ip in (None, "", "None")
            self.zone.set_service(key[0], key[1], [] if headless else [ip], sorted(ready.get(key, [])), headless)
        for key in self._dns_services - seen:
            self.zone.delete_service(*key)
        self._dns_services = seen
        pods = {(p["metadata"]["namespace"], p["status"]["podIP"]) for p in self.cache(POD)
                if p.get("status", {}).get("podIP")}
        for key in pods - self._dns_pods:
            self.zone.set_pod(*key)
        for key in self._dns_pods - pods:
            self.zone.delete_pod(*key)
        self._dns_pods = pods
