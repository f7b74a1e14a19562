"""The workload store an xDS client keeps: workloads, services and authorizations, with lookup indexes.

Readers take `store.snapshot` (immutable; safe to hold across awaits). `apply(changes)` is the only
mutator — the xDS client is its only caller — and it runs change callbacks after swapping the snapshot.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from ambient.proto import authorization_pb2, workload_pb2

log = logging.getLogger("ambient.xds.store")

Workload = workload_pb2.Workload
Service = workload_pb2.Service
Authorization = authorization_pb2.Authorization
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (network, ip): the same IP may exist once per network, as in ztunnel's NetworkAddress.
IpKey = tuple[str, IpAddress]
ChangeCallback = Callable[["WorkloadSnapshot", "StoreChanges"], None]


def ip_key(ip: str | bytes | IpAddress, network: str = "") -> IpKey:
    """Normalise an address given as text, 4/16 raw bytes or an ipaddress object into an index key."""
    return network, ipaddress.ip_address(ip)


@dataclass(frozen=True)
class StoreChanges:
    """One batch of upserts and removals, keyed by xDS resource name (uid, `<ns>/<hostname>`, `<ns>/<name>`).

    `removed_addresses` names workloads or services: xDS removes an `Address` by name without saying
    which of the two it was.
    """

    workloads: Mapping[str, Workload] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)
    authorizations: Mapping[str, Authorization] = field(default_factory=dict)
    removed_addresses: tuple[str, ...] = ()
    removed_authorizations: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.workloads or self.services or self.authorizations or self.removed_addresses
                    or self.removed_authorizations)


@dataclass(frozen=True)
class WorkloadSnapshot:
    """An immutable view of the store at one generation."""

    generation: int = 0
    workloads: Mapping[str, Workload] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    authorizations: Mapping[str, Authorization] = field(default_factory=lambda: MappingProxyType({}))
    workloads_by_ip: Mapping[IpKey, Workload] = field(default_factory=lambda: MappingProxyType({}))
    services_by_vip: Mapping[IpKey, Service] = field(default_factory=lambda: MappingProxyType({}))

    def workload_by_ip(self, ip: str | bytes | IpAddress, network: str = "") -> Workload | None:
        return self.workloads_by_ip.get(ip_key(ip, network))

    def service_by_vip(self, ip: str | bytes | IpAddress, network: str = "") -> Service | None:
        return self.services_by_vip.get(ip_key(ip, network))

    # Derived indexes, built once per snapshot on first use (the snapshot is immutable).
    @cached_property
    def endpoints_by_service(self) -> Mapping[str, tuple[Workload, ...]]:
        """`<ns>/<hostname>` → the workloads listing that service in `Workload.services`, by uid."""
        index: dict[str, list[Workload]] = {}
        for uid in sorted(self.workloads):
            workload = self.workloads[uid]
            for key in workload.services:
                index.setdefault(key, []).append(workload)
        return MappingProxyType({key: tuple(members) for key, members in index.items()})

    @cached_property
    def services_by_hostname(self) -> Mapping[str, tuple[Service, ...]]:
        """Lower-cased hostname → the services with that hostname, by resource name."""
        index: dict[str, list[Service]] = {}
        for key in sorted(self.services):
            service = self.services[key]
            index.setdefault(service.hostname.lower(), []).append(service)
        return MappingProxyType({host: tuple(found) for host, found in index.items()})


class WorkloadStore:
    def __init__(self) -> None:
        self._snapshot = WorkloadSnapshot()
        self._callbacks: list[ChangeCallback] = []

    @property
    def snapshot(self) -> WorkloadSnapshot:
        return self._snapshot

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call `callback(snapshot, changes)` after every non-empty apply; returns the unsubscribe function."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def apply(self, changes: StoreChanges) -> WorkloadSnapshot:
        """The single mutator: apply one batch, publish a new snapshot, run the callbacks."""
        if not changes:
            return self._snapshot
        old = self._snapshot
        workloads, services = dict(old.workloads), dict(old.services)
        for name in changes.removed_addresses:
            workloads.pop(name, None)
            services.pop(name, None)
        for name, workload in changes.workloads.items():
            services.pop(name, None)
            workloads[name] = workload
        for name, service in changes.services.items():
            workloads.pop(name, None)
            services[name] = service
        authorizations = old.authorizations
        if changes.authorizations or changes.removed_authorizations:
            updated = dict(old.authorizations)
            for name in changes.removed_authorizations:
                updated.pop(name, None)
            updated.update(changes.authorizations)
            authorizations = MappingProxyType(updated)
        addresses_changed = bool(changes.removed_addresses or changes.workloads or changes.services)
        self._snapshot = WorkloadSnapshot(
            generation=old.generation + 1,
            workloads=MappingProxyType(workloads) if addresses_changed else old.workloads,
            services=MappingProxyType(services) if addresses_changed else old.services,
            authorizations=authorizations,
            workloads_by_ip=_index_workloads(workloads) if addresses_changed else old.workloads_by_ip,
            services_by_vip=_index_services(services) if addresses_changed else old.services_by_vip,
        )
        for callback in list(self._callbacks):
            try:
                callback(self._snapshot, changes)
            except Exception:
                log.exception("workload store change callback %r failed", callback)
        return self._snapshot


# The indexes are rebuilt from scratch when addresses change: O(n) per batch, which keeps them exact
# when two workloads share an IP (host-network pods); the smallest uid wins, so the result is stable.
def _index_workloads(workloads: Mapping[str, Workload]) -> Mapping[IpKey, Workload]:
    index: dict[IpKey, Workload] = {}
    for name in sorted(workloads):
        workload = workloads[name]
        for raw in workload.addresses:
            index.setdefault(ip_key(raw, workload.network), workload)
    return MappingProxyType(index)


def _index_services(services: Mapping[str, Service]) -> Mapping[IpKey, Service]:
    index: dict[IpKey, Service] = {}
    for name in sorted(services):
        service = services[name]
        for address in service.addresses:
            index.setdefault(ip_key(address.address, address.network), service)
    return MappingProxyType(index)

