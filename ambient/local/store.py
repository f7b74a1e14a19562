"""The local API server's object store: versioned objects, an event log for watches, persistence.

Every write goes through `Store.put`/`Store.remove`, which stamp a new resourceVersion, append the event
to a bounded log, fan it out to matching watchers and persist the object under the state directory.
It knows nothing about HTTP or about what a kind means (defaults, validation and graceful deletion live
in `ambient.local.apiserver`); it must only ever be used from the API server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambient.kube.errors import ApiError

Obj = dict[str, Any]
# (group, plural, namespace, name); namespace is "" for cluster-scoped objects.
Key = tuple[str, str, str, str]

EVENT_LOG_SIZE = 10_000  # watches older than this many events get 410 Gone and relist, as with etcd compaction
WATCH_QUEUE_SIZE = 10_000  # a watcher this far behind is closed rather than buffering without bound


@dataclass
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    group: str
    plural: str
    obj: Obj
    prev: Obj | None = None  # the object before this change (for DELETED: the object as it was)


@dataclass(eq=False)
class Watcher:
    group: str
    plural: str
    namespace: str
    accept: Callable[[Obj], bool]
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(WATCH_QUEUE_SIZE))

    def wants(self, event: Event) -> bool:
        ns = event.obj["metadata"].get("namespace", "")
        return (event.group, event.plural) == (self.group, self.plural) and self.namespace in ("", ns)


class Store:
    def __init__(self, state_dir: Path | None) -> None:
        self._objects: dict[Key, Obj] = {}
        self._log: deque[Event] = deque(maxlen=EVENT_LOG_SIZE)
        self._watchers: set[Watcher] = set()
        self._dir = state_dir / "objects" if state_dir else None
        self.rv = 0
        if self._dir:
            self._load()
        self._compacted_rv = self.rv  # events at or below this rv are no longer in the log

    # -- reads -----------------------------------------------------------------------------------
    def get(self, key: Key) -> Obj | None:
        return self._objects.get(key)

    def items(self, group: str, plural: str, namespace: str = "") -> Iterator[Obj]:
        for (g, p, ns, _), obj in sorted(self._objects.items()):
            if g == group and p == plural and (not namespace or ns == namespace):
                yield obj

    def namespaces_in_use(self, namespace: str) -> Iterator[Key]:
        return (k for k in list(self._objects) if k[2] == namespace)

    # -- writes ----------------------------------------------------------------------------------
    def put(self, key: Key, obj: Obj) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        prev = self._objects.get(key)
        self._objects[key] = obj
        self._persist(key, obj)
        self._emit(Event(self.rv, "ADDED" if prev is None else "MODIFIED", key[0], key[1], obj, prev))
        return obj

    def remove(self, key: Key) -> Obj:
        obj = self._objects.pop(key)
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        self._persist(key, None)
        self._emit(Event(self.rv, "DELETED", key[0], key[1], obj, obj))
        return obj

    # -- watches ---------------------------------------------------------------------------------
    def watch(self, watcher: Watcher, since_rv: int | None) -> None:
        """Register a watcher. With `since_rv`, replay the logged events after it (410 when compacted);
        without, send the current state as ADDED first, like a watch with resourceVersion unset."""
        if since_rv is not None and since_rv < self._compacted_rv:
            raise ApiError(410, f"too old resource version: {since_rv} ({self._compacted_rv})", "Expired")
        if since_rv is None:
            for obj in self.items(watcher.group, watcher.plural, watcher.namespace):
                self._offer(watcher, Event(int(obj["metadata"]["resourceVersion"]), "ADDED",
                                           watcher.group, watcher.plural, obj))
        else:
            for event in self._log:
                if event.rv > since_rv and watcher.wants(event):
                    self._offer(watcher, event)
        self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def close_watchers(self) -> None:
        for w in list(self._watchers):
            with contextlib.suppress(asyncio.QueueFull):
                w.queue.put_nowait(None)
        self._watchers.clear()

    def _emit(self, event: Event) -> None:
        if len(self._log) == self._log.maxlen:
            self._compacted_rv = self._log[0].rv
        self._log.append(event)
        for w in list(self._watchers):
            if w.wants(event):
                self._offer(w, event)

    def _offer(self, w: Watcher, event: Event) -> None:
        # Selector-filtered watches see an object enter as ADDED and leave as DELETED, like the
        # Kubernetes watch cache: compare the match before and after the change.
        now = event.type != "DELETED" and w.accept(event.obj)
        before = event.prev is not None and w.accept(event.prev)
        if now:
            kind = event.type if before else "ADDED"
        elif before:
            kind = "DELETED"
        else:
            return
        try:
            w.queue.put_nowait(Event(event.rv, kind, event.group, event.plural, event.obj))
        except asyncio.QueueFull:
            # Too far behind: end its stream; the client relists, as after an apiserver restart.
            self._watchers.discard(w)
            w.queue = asyncio.Queue(1)
            w.queue.put_nowait(None)

    # -- persistence -----------------------------------------------------------------------------
    def _path(self, key: Key) -> Path:
        assert self._dir is not None
        group, plural, ns, name = key
        return self._dir / (group or "core") / plural / (ns or "_cluster") / f"{name}.json"

    def _persist(self, key: Key, obj: Obj | None) -> None:
        if not self._dir:
            return
        path = self._path(key)
        if obj is None:
            path.unlink(missing_ok=True)
            # The removed object took the newest resourceVersion with it; record that version so a restart
            # never hands out one that clients have already seen.
            _write_atomically(self._dir / "resourceVersion", str(self.rv))
            return
        _write_atomically(path, json.dumps(obj, separators=(",", ":")))

    def _load(self) -> None:
        assert self._dir is not None
        for path in self._dir.glob("*/*/*/*.json"):
            group_dir, plural, ns_dir, _ = path.relative_to(self._dir).parts
            obj = json.loads(path.read_text())
            group = "" if group_dir == "core" else group_dir
            ns = "" if ns_dir == "_cluster" else ns_dir
            self._objects[(group, plural, ns, obj["metadata"]["name"])] = obj
            self.rv = max(self.rv, int(obj["metadata"].get("resourceVersion", "0")))
        rv_file = self._dir / "resourceVersion"
        if rv_file.is_file():
            self.rv = max(self.rv, int(rv_file.read_text()))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
