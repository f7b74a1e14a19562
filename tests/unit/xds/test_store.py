from __future__ import annotations

from ambient.proto import authorization_pb2, workload_pb2
from ambient.xds.store import StoreChanges, WorkloadSnapshot, WorkloadStore


def pod(name: str, ip: bytes, network: str = "") -> workload_pb2.Workload:
    return workload_pb2.Workload(uid=f"c//Pod/ns/{name}", name=name, namespace="ns", addresses=[ip], network=network)


A, B = pod("a", bytes([10, 0, 0, 1])), pod("b", bytes([10, 0, 0, 2]))
SVC = workload_pb2.Service(name="s", namespace="ns", hostname="s.ns.svc.cluster.local", addresses=[
    workload_pb2.NetworkAddress(address=bytes([10, 96, 0, 1])),
    workload_pb2.NetworkAddress(address=bytes(15) + b"\x01")])
POLICY = authorization_pb2.Authorization(name="p", namespace="ns")


def test_apply_indexes_workloads_and_services() -> None:
    store = WorkloadStore()
    snap = store.apply(StoreChanges(workloads={A.uid: A, B.uid: B}, services={"ns/s.ns.svc.cluster.local": SVC},
                                    authorizations={"ns/p": POLICY}))
    assert snap.generation == 1 and store.snapshot is snap
    assert snap.workload_by_ip("10.0.0.2") == B and snap.workload_by_ip(bytes([10, 0, 0, 1])) == A
    assert snap.workload_by_ip("10.0.0.1", network="other") is None
    assert snap.service_by_vip("10.96.0.1") == SVC and snap.service_by_vip("::1") == SVC
    assert snap.authorizations["ns/p"] == POLICY


def test_old_snapshots_do_not_change() -> None:
    store = WorkloadStore()
    before = store.apply(StoreChanges(workloads={A.uid: A}))
    store.apply(StoreChanges(removed_addresses=(A.uid,), workloads={B.uid: B}))
    assert list(before.workloads) == [A.uid] and before.workload_by_ip("10.0.0.1") == A
    assert list(store.snapshot.workloads) == [B.uid] and store.snapshot.workload_by_ip("10.0.0.1") is None


def test_removal_by_name_covers_workloads_services_and_policies() -> None:
    store = WorkloadStore()
    store.apply(StoreChanges(workloads={A.uid: A}, services={"ns/s.ns.svc.cluster.local": SVC},
                             authorizations={"ns/p": POLICY}))
    snap = store.apply(StoreChanges(removed_addresses=("ns/s.ns.svc.cluster.local", A.uid),
                                    removed_authorizations=("ns/p",)))
    assert not snap.workloads and not snap.services and not snap.authorizations
    assert snap.service_by_vip("10.96.0.1") is None


def test_shared_ip_is_stable_and_falls_back_when_the_owner_goes() -> None:
    node_ip = bytes([172, 30, 0, 11])
    first, second = pod("host-a", node_ip), pod("host-b", node_ip)
    store = WorkloadStore()
    assert store.apply(StoreChanges(workloads={second.uid: second, first.uid: first})).workload_by_ip(node_ip) == first
    assert store.apply(StoreChanges(removed_addresses=(first.uid,))).workload_by_ip(node_ip) == second


def test_callbacks_see_each_change_and_a_failing_one_does_not_stop_updates() -> None:
    store = WorkloadStore()
    seen: list[tuple[int, StoreChanges]] = []

    def broken(snapshot: WorkloadSnapshot, changes: StoreChanges) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    unsubscribe = store.subscribe(lambda snap, changes: seen.append((snap.generation, changes)))
    changes = StoreChanges(workloads={A.uid: A})
    store.apply(changes)
    store.apply(StoreChanges())  # empty: no new generation, no callback
    assert seen == [(1, changes)] and store.snapshot.generation == 1
    unsubscribe()
    store.apply(StoreChanges(workloads={B.uid: B}))
    assert len(seen) == 1 and B.uid in store.snapshot.workloads
