"""List-and-watch informer: keeps a local cache of one resource type and calls a handler on changes.

Relists when the watch expires (410) or breaks, with capped backoff, so callers see a consistent cache
across API server restarts. The handler runs on the informer's task; it must not block.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceType

log = logging.getLogger("ambient.kube.informer")
Obj = dict[str, Any]
Handler = Callable[[str, Obj], Awaitable[None] | None]

RETRY_MIN, RETRY_MAX = 0.2, 5.0  # seconds between relist attempts after errors


def object_key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


class Informer:
    def __init__(self, client: KubeClient, rt: ResourceType, *, namespace: str | None = None,
                 label_selector: str | None = None, field_selector: str | None = None,
                 handler: Handler | None = None) -> None:
        self.client, self.rt = client, rt
        self.namespace, self.label_selector, self.field_selector = namespace, label_selector, field_selector
        self.handler = handler
        self.cache: dict[tuple[str, str], Obj] = {}
        self.synced = asyncio.Event()

    def get(self, name: str, namespace: str = "") -> Obj | None:
        return self.cache.get((namespace, name))

    def items(self) -> list[Obj]:
        return list(self.cache.values())

    async def _notify(self, event: str, obj: Obj) -> None:
        if self.handler is not None:
            result = self.handler(event, obj)
            if result is not None:
                await result

    async def run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                rv = await self._relist()
                delay = RETRY_MIN
                while True:
                    async for event, obj in self.client.watch(self.rt, self.namespace, rv, self.label_selector,
                                                              self.field_selector):
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if event == "BOOKMARK":
                            continue
                        key = object_key(obj)
                        if event == "DELETED":
                            self.cache.pop(key, None)
                        else:
                            self.cache[key] = obj
                        await self._notify(event, obj)
            except ApiError as exc:
                if exc.code != 410:
                    log.warning("watch %s failed: %s; relisting in %.1fs", self.rt.plural, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)

    async def _relist(self) -> str:
        listing = await self.client.list(self.rt, self.namespace, self.label_selector, self.field_selector)
        fresh = {object_key(o): o for o in listing["items"]}
        for key, old in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                await self._notify("DELETED", old)
        for key, obj in fresh.items():
            previous = self.cache.get(key)
            self.cache[key] = obj
            if previous is None or previous["metadata"].get("resourceVersion") != obj["metadata"].get(
                    "resourceVersion"):
                await self._notify("ADDED" if previous is None else "MODIFIED", obj)
        self.synced.set()
        return str(listing["metadata"].get("resourceVersion", ""))
