"""Where the xDS server reads resources from: the `ResourceSource` seam and an in-memory implementation.

The control plane owns the source and writes translated resources into it; the server only reads
snapshots and waits for the generation to move. Snapshots are immutable mappings, so the server can diff
them on its own schedule (debounced, per client) without copying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

from ambient.xds.types import TYPE_URLS, XdsResource


class ResourceSource(Protocol):
    @property
    def generation(self) -> int:
        """Increases on every change of any type."""
        ...

    def snapshot(self, type_url: str) -> Mapping[str, XdsResource]:
        """Every resource of `type_url` by name. The mapping returned must never change afterwards."""
        ...

    async def wait_changed(self, after: int) -> int:
        """Return the current generation once it is greater than `after`. Must be safe to cancel."""
        ...


class MemorySource:
    """A `ResourceSource` held in memory. Writes that change nothing (same name and version) do not move
    the generation, so re-writing an unchanged translation never causes a push."""

    def __init__(self, types: tuple[str, ...] = TYPE_URLS) -> None:
        self._maps: dict[str, Mapping[str, XdsResource]] = {t: MappingProxyType({}) for t in types}
        self._generation = 0
        self._changed = asyncio.Event()

    @property
    def generation(self) -> int:
        return self._generation

    def snapshot(self, type_url: str) -> Mapping[str, XdsResource]:
        return self._maps[type_url]

    async def wait_changed(self, after: int) -> int:
        while self._generation <= after:
            await self._changed.wait()
        return self._generation

    def update(self, type_url: str, upserts: Iterable[XdsResource] = (), removals: Iterable[str] = ()) -> bool:
        """Add or replace `upserts`, delete `removals`; True when anything changed."""
        current = self._maps[type_url]
        new = dict(current)
        for name in removals:
            new.pop(name, None)
        for resource in upserts:
            new[resource.name] = resource
        return self._commit(type_url, new)

    def replace(self, type_url: str, resources: Iterable[XdsResource]) -> bool:
        """Make `resources` the whole set of `type_url`; True when anything changed."""
        return self._commit(type_url, {r.name: r for r in resources})

    def _commit(self, type_url: str, new: dict[str, XdsResource]) -> bool:
        current = self._maps[type_url]
        if new.keys() == current.keys() and all(current[n].version == r.version for n, r in new.items()):
            return False
        self._maps[type_url] = MappingProxyType(new)
        self._generation += 1
        # Wake every waiter, then start a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        return True
