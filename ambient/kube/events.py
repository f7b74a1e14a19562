"""Kubernetes Events, as recorded by our components (kubelet, scheduler, controllers, the waypoint).

Events are best effort, as in Kubernetes: a failure to record one is logged and never fails the caller.
Repeats of the same (object, reason, message) bump `count` instead of creating a new Event.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable

log = logging.getLogger("ambient.events")
Obj = dict[str, Any]
EVENT = ResourceTable().require("events")


def now_rfc3339() -> str:
    """A Kubernetes timestamp (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    def __init__(self, client: KubeClient, component: str, host: str = "") -> None:
        self.client, self.component, self.host = client, component, host
        self._seen: dict[tuple[str, str, str], Obj] = {}

    async def record(self, obj: Obj, event_type: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        key = (meta.get("uid", ""), reason, message)
        now = now_rfc3339()
        try:
            if previous := self._seen.get(key):
                patched = await self.client.patch(EVENT, previous["metadata"]["name"], {
                    "count": previous.get("count", 1) + 1, "lastTimestamp": now}, namespace)
                self._seen[key] = patched
                return
            event = await self.client.create({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": namespace},
                "involvedObject": {"kind": obj.get("kind", "Pod"), "name": meta["name"], "namespace": namespace,
                                   "uid": meta.get("uid", ""), "apiVersion": obj.get("apiVersion", "v1")},
                "reason": reason, "message": message, "type": event_type, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": self.component, **({"host": self.host} if self.host else {})},
            })
            self._seen[key] = event
        except ApiError as exc:
            log.debug("event %s for %s not recorded: %s", reason, meta.get("name"), exc)
