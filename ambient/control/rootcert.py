"""The mesh root in every namespace: ConfigMap `istio-ca-root-cert`, key `root-cert.pem`, as istiod's
namespace controller publishes it (pilot/pkg/serviceregistry/kube/controller/namespacecontroller.go).

Pods mount it to trust the control plane's 15012 certificate and their peers' (the waypoint at
/var/run/secrets/istio, Istio's path). Like istiod:
- every namespace gets it, created with label `istio.io/config: "true"`, except the ones istiod skips;
- a namespace that is terminating is left alone (a create there is refused anyway);
- a deleted ConfigMap is created again, an edited one has its `root-cert.pem` rewritten (other keys stay, as
  istiod's `InsertDataToConfigMap` merges), and a new root (`set_roots`) is written everywhere.

Unlike istiod, which drops a namespace after five quick retries and logs each, failed writes come back with
capped backoff until they succeed and are logged once (`WorkQueue`). It must not touch any other ConfigMap.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ambient.control.workqueue import WorkQueue
from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable

log = logging.getLogger("ambient.control.rootcert")
Obj = dict[str, Any]

CONFIGMAP_NAME = "istio-ca-root-cert"  # istiod's CACertNamespaceConfigMap
DATA_KEY = "root-cert.pem"  # istiod's constants.CACertNamespaceConfigMapDataName
LABELS = {"istio.io/config": "true"}  # istiod's configMapLabel
# Namespaces istiod skips: `inject.IgnoredNamespaces` (pkg/kube/inject/inject.go: kube-system, kube-public,
# kube-node-lease, local-path-storage) minus kube-system, "to enable deploying ztunnel in that namespace"
# (namespacecontroller.go, NewNamespaceController).
IGNORED_NAMESPACES = frozenset({"kube-public", "kube-node-lease", "local-path-storage"})
NAMESPACE_TERMINATING_CAUSE = "NamespaceTerminating"  # the Status cause of a create refused in such a namespace

TYPES = ResourceTable()
NAMESPACES, CONFIGMAPS = TYPES.require("namespaces"), TYPES.require("configmaps")


# -- what is wanted (pure) -------------------------------------------------------------------------
def terminating(namespace: Obj) -> bool:
    return (namespace.get("status") or {}).get("phase") == "Terminating" or bool(
        namespace["metadata"].get("deletionTimestamp"))


def publishes_to(namespace: Obj, ignored: frozenset[str] = IGNORED_NAMESPACES) -> bool:
    """Whether this namespace should hold the ConfigMap now."""
    return namespace["metadata"]["name"] not in ignored and not terminating(namespace)


def root_configmap(namespace: str, roots_pem: str) -> Obj:
    """The ConfigMap as created."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP_NAME, "namespace": namespace, "labels": dict(LABELS)},
            "data": {DATA_KEY: roots_pem}}


def repair_patch(current: Obj, roots_pem: str) -> Obj | None:
    """A merge patch that puts back the roots (and the label, so the ConfigMap stays findable by it), or
    None when `current` already has both. Other data keys and labels are left as they are."""
    data_ok = (current.get("data") or {}).get(DATA_KEY) == roots_pem
    labels = current["metadata"].get("labels") or {}
    labels_ok = all(labels.get(k) == v for k, v in LABELS.items())
    if data_ok and labels_ok:
        return None
    patch: Obj = {"data": {DATA_KEY: roots_pem}}
    if not labels_ok:
        patch["metadata"] = {"labels": dict(LABELS)}
    return patch


def skippable_create_error(exc: ApiError) -> bool:
    """A create that failed because the namespace is going or gone: nothing to retry (istiod skips these too).
    Kubernetes says so with a `NamespaceTerminating` cause; the local API server with its message."""
    if exc.code == 404:
        return True
    causes = (exc.details or {}).get("causes") or []
    return exc.code == 403 and (any(isinstance(c, dict) and c.get("reason") == NAMESPACE_TERMINATING_CAUSE
                                    for c in causes) or "being terminated" in exc.message)


# -- the publisher ---------------------------------------------------------------------------------
class RootCertPublisher:
    """Watches namespaces and the ConfigMaps named `istio-ca-root-cert`; reconciles one namespace per key.
    Run with `await publisher.run()` (cancel to stop)."""

    def __init__(self, client: KubeClient, roots_pem: str, *,
                 ignored: frozenset[str] = IGNORED_NAMESPACES) -> None:
        self.client, self.roots_pem, self.ignored = client, roots_pem, ignored
        self.queue: WorkQueue[str] = WorkQueue("root cert ConfigMap in namespace", self.reconcile, log)
        self.namespaces = Informer(client, NAMESPACES, handler=self._namespace_changed)
        # Only our ConfigMap, as istiod's informer: never a cluster's worth of ConfigMaps in memory.
        self.configmaps = Informer(client, CONFIGMAPS, field_selector=f"metadata.name={CONFIGMAP_NAME}",
                                   handler=self._configmap_changed)

    @property
    def informers(self) -> list[Informer]:
        return [self.namespaces, self.configmaps]

    async def wait_synced(self) -> None:
        for informer in self.informers:
            await informer.synced.wait()

    def set_roots(self, roots_pem: str) -> None:
        """A new mesh root (or a bundle while roots rotate): rewrite every namespace's ConfigMap."""
        if roots_pem == self.roots_pem:
            return
        self.roots_pem = roots_pem
        self._add_all()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for informer in self.informers:
                tg.create_task(informer.run(), name=f"rootcert-informer-{informer.rt.plural}")
            tg.create_task(self._work(), name="rootcert-reconcile")

    async def _work(self) -> None:
        await self.wait_synced()
        self._add_all()
        await self.queue.run()

    def _add_all(self) -> None:
        for namespace in self.namespaces.items():
            self._namespace_changed("SYNC", namespace)

    def _namespace_changed(self, event: str, namespace: Obj) -> None:
        if event != "DELETED" and publishes_to(namespace, self.ignored):
            self.queue.add(namespace["metadata"]["name"])

    def _configmap_changed(self, event: str, configmap: Obj) -> None:
        namespace = configmap["metadata"].get("namespace", "")
        if namespace not in self.ignored:
            self.queue.add(namespace)

    async def reconcile(self, namespace: str) -> None:
        ns = self.namespaces.get(namespace)
        if ns is None or not publishes_to(ns, self.ignored):
            return
        current = self.configmaps.get(CONFIGMAP_NAME, namespace)
        if current is None:
            try:
                await self.client.create(root_configmap(namespace, self.roots_pem))
            except ApiError as exc:
                # 409: our cache has not seen it yet; its watch event brings another pass.
                if exc.code == 409 or skippable_create_error(exc):
                    return
                raise
            log.info("published the mesh root in ConfigMap %s/%s", namespace, CONFIGMAP_NAME)
            return
        patch = repair_patch(current, self.roots_pem)
        if patch is None:
            return
        try:
            await self.client.patch(CONFIGMAPS, CONFIGMAP_NAME, patch, namespace)
        except ApiError as exc:
            if exc.code == 404:  # deleted meanwhile; its DELETED event brings a create
                return
            raise
        log.info("rewrote the mesh root in ConfigMap %s/%s", namespace, CONFIGMAP_NAME)
