"""The Kubernetes objects the waypoint reads: the L7 resources (VirtualService, DestinationRule, HTTPRoute,
AuthorizationPolicy, RequestAuthentication), its own Gateway, and pod labels (DestinationRule subsets select
endpoints by pod labels, which the workload model does not carry).

One informer per kind, cluster-wide (a VirtualService in another namespace may route to a service this
waypoint serves; mesh-wide policies live in the root namespace). Every change marks the sources dirty; the
app recompiles after a short debounce, so a burst of applies costs one compile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ambient.kube.client import KubeClient
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable, ResourceType

log = logging.getLogger("waypoint.sources")
Obj = dict[str, Any]

DEBOUNCE = 0.05  # seconds: gather a burst of watch events into one recompile

_TYPES = ResourceTable()
KINDS: dict[str, ResourceType] = {
    "VirtualService": _TYPES.require("virtualservices.networking.istio.io"),
    "DestinationRule": _TYPES.require("destinationrules.networking.istio.io"),
    "HTTPRoute": _TYPES.require("httproutes.gateway.networking.k8s.io"),
    "AuthorizationPolicy": _TYPES.require("authorizationpolicies.security.istio.io"),
    "RequestAuthentication": _TYPES.require("requestauthentications.security.istio.io"),
    "Gateway": _TYPES.require("gateways.gateway.networking.k8s.io"),
}
PODS = _TYPES.require("pods")


@dataclass(frozen=True)
class L7Objects:
    """What the compilers read: the objects of each kind, oldest first (Istio breaks ties by age)."""

    virtual_services: tuple[Obj, ...] = ()
    destination_rules: tuple[Obj, ...] = ()
    http_routes: tuple[Obj, ...] = ()
    authorization_policies: tuple[Obj, ...] = ()
    request_authentications: tuple[Obj, ...] = ()
    gateways: tuple[Obj, ...] = ()
    pod_labels: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)  # (ns, name) → labels


def by_age(objects: list[Obj]) -> tuple[Obj, ...]:
    def key(obj: Obj) -> tuple[str, str, str]:
        meta = obj.get("metadata", {})
        return str(meta.get("creationTimestamp", "")), str(meta.get("namespace", "")), str(meta.get("name", ""))
    return tuple(sorted(objects, key=key))


class KubeSources:
    """Informers for every kind the waypoint reads; `on_change()` is called (debounced) after changes."""

    def __init__(self, client: KubeClient, on_change: Callable[[], None]) -> None:
        self.client = client
        self._on_change = on_change
        self.informers = {kind: Informer(client, rt, handler=self._changed) for kind, rt in KINDS.items()}
        self.pods = Informer(client, PODS, handler=self._pod_changed)
        self._labels: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self._pending: asyncio.TimerHandle | None = None

    def _changed(self, _event: str, _obj: Obj) -> None:
        self._schedule()

    def _pod_changed(self, event: str, pod: Obj) -> None:
        meta = pod.get("metadata", {})
        uid = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        labels = tuple(sorted((meta.get("labels") or {}).items()))
        if event == "DELETED":
            if self._labels.pop(uid, None) is not None:
                self._schedule()
        elif self._labels.get(uid) != labels:  # pod status updates do not recompile anything
            self._labels[uid] = labels
            self._schedule()

    def _schedule(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(DEBOUNCE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        if self.synced:
            self._on_change()

    @property
    def synced(self) -> bool:
        return self.pods.synced.is_set() and all(i.synced.is_set() for i in self.informers.values())

    async def wait_synced(self) -> None:
        for informer in (*self.informers.values(), self.pods):
            await informer.synced.wait()

    def objects(self) -> L7Objects:
        items = {kind: informer.items() for kind, informer in self.informers.items()}
        return L7Objects(
            virtual_services=by_age(items["VirtualService"]),
            destination_rules=by_age(items["DestinationRule"]),
            http_routes=by_age(items["HTTPRoute"]),
            authorization_policies=by_age(items["AuthorizationPolicy"]),
            request_authentications=by_age(items["RequestAuthentication"]),
            gateways=by_age(items["Gateway"]),
            pod_labels={uid: dict(labels) for uid, labels in self._labels.items()},
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for kind, informer in self.informers.items():
                tg.create_task(informer.run(), name=f"informer {kind}")
            tg.create_task(self.pods.run(), name="informer Pod")
            await self.wait_synced()
            self._on_change()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
