"""`ztunnel --workers N`, the main process's side (`ztunnel.workers.WorkerPool`) over real SEQPACKET
socketpairs, a real node agent (`cni.zds_server.ZdsServer`) and real HTTP: workers are in-process stand-ins
(the worker's real ZDS client, `MainConnection`, with a recording pod manager) started through the pool's
launcher seam. Pods are files standing in for netns files (the fd's inode proves which one arrived).
The real processes in real network namespaces are in tests/netns/test_ztunnel_workers.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from ambient.xds.store import WorkloadSnapshot
from ambient.zds.channel import SeqpacketChannel
from ambient.zds.protocol import WorkloadInfo, WorkloadInfoLike
from cni.zds_server import SnapshotEntry, ZdsError, ZdsServer
from ztunnel.admin import AdminServer, ConnectionEntry, MetricsServer, WorkloadState
from ztunnel.config import ZtunnelConfig
from ztunnel.workers import InheritedSocketServer, MainConnection, WorkerError, WorkerPool, WorkerSpec
from ztunnel.zds_client import ZdsClient

WAIT = 5.0
UID = "uid-productpage"
INFO = WorkloadInfo("productpage-v1", "bookinfo", "bookinfo-productpage")


class RecordingPods:
    """A worker's pod manager that records what the main sent it; `refuse` makes its adds fail."""

    def __init__(self, refuse: str = "") -> None:
        self.events: list[tuple[Any, ...]] = []
        self.refuse = refuse
        self.changed = asyncio.Event()

    def _record(self, *event: Any) -> None:
        self.events.append(event)
        self.changed.set()

    async def add_pod(self, uid: str, info: WorkloadInfoLike | None, netns_fd: int) -> None:
        assert info is not None
        self._record("add", uid, info.name, os.fstat(netns_fd).st_ino)
        if self.refuse:
            raise RuntimeError(self.refuse)

    async def keep_pod(self, uid: str) -> None:
        self._record("keep", uid)

    async def remove_pod(self, uid: str) -> None:
        self._record("del", uid)

    async def retain_only(self, uids: set[str]) -> None:
        self._record("retain", sorted(uids))

    def snapshot_received(self) -> None:
        self._record("snapshot_sent")

    async def wait_for(self, *event: Any) -> None:
        async with asyncio.timeout(WAIT):
            while event not in self.events:
                self.changed.clear()
                await self.changed.wait()


class FakeWorker:
    """A `WorkerHandle` running the worker's ZDS client on a task; killing it closes its channel."""

    pids = iter(range(900_000, 1_000_000))

    def __init__(self, spec: WorkerSpec, pods: RecordingPods, *, hello: bool = True) -> None:
        self.pid = next(self.pids)
        self.returncode: int | None = None
        self.pods = pods
        channel = SeqpacketChannel(spec.channel.dup())  # the pool closes its copy of the worker's end
        self._task = asyncio.get_running_loop().create_task(
            MainConnection(channel, pods).run() if hello else self._exit_at_once(channel))
        self._task.add_done_callback(self._exited)

    @staticmethod
    async def _exit_at_once(channel: SeqpacketChannel) -> None:
        channel.close()

    def _exited(self, task: asyncio.Task[None]) -> None:
        if self.returncode is None:
            self.returncode = -9 if task.cancelled() else 1

    async def wait(self) -> int:
        await asyncio.wait([self._task])
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self.returncode = -15
        self._task.cancel()

    def kill(self) -> None:
        self._task.cancel()


class Launcher:
    """The pool's launcher seam: `pods_for(index)` picks each new worker's pod manager."""

    def __init__(self, pods_for: Callable[[int], RecordingPods] = lambda _: RecordingPods(), *,
                 hello: bool = True) -> None:
        self.pods_for = pods_for
        self.hello = hello
        self.started: list[tuple[int, FakeWorker]] = []
        self.extra: list[Callable[[WorkerSpec], Any]] = []

    async def __call__(self, spec: WorkerSpec) -> FakeWorker:
        worker = FakeWorker(spec, self.pods_for(spec.index), hello=self.hello)
        for start in self.extra:
            await start(spec)
        self.started.append((spec.index, worker))
        return worker

    def current(self, index: int) -> FakeWorker:
        return [w for i, w in self.started if i == index][-1]


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="zw-", dir="/tmp"))  # short: AF_UNIX paths stop at 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Node:
    """The node agent, the main's ZDS client and the pool, wired as `ztunnel --workers 2` does."""

    def __init__(self, tmp: Path, launcher: Launcher) -> None:
        self.netns = tmp / "netns-productpage"  # stands in for the pod's netns file
        self.netns.write_text("pod")
        self.agent_pods: list[SnapshotEntry] = []
        self.agent = ZdsServer(str(tmp / "ztunnel.sock"), self.snapshot, ack_timeout=WAIT)
        config = ZtunnelConfig(node_name="node-1", node_ip="127.0.0.1", zds_socket=str(tmp / "ztunnel.sock"),
                               workers=2)
        self.pool = WorkerPool(config, launcher=launcher)
        self.launcher = launcher
        self._zds: asyncio.Task[None] | None = None

    async def snapshot(self) -> list[SnapshotEntry]:
        return list(self.agent_pods)

    async def start(self) -> None:
        await self.agent.start()
        await self.pool.start()
        self._zds = asyncio.get_running_loop().create_task(ZdsClient(self.agent.path, self.pool).run())
        async with asyncio.timeout(WAIT):
            await self.agent.ready.wait()

    async def close(self) -> None:
        if self._zds is not None:
            self._zds.cancel()
            await asyncio.gather(self._zds, return_exceptions=True)
        await self.pool.close()
        await self.agent.close()

    def inode(self) -> int:
        return os.stat(self.netns).st_ino


@pytest.fixture
async def node(tmp: Path) -> AsyncIterator[Callable[[Launcher], Any]]:
    nodes: list[Node] = []

    async def start(launcher: Launcher) -> Node:
        n = Node(tmp, launcher)
        nodes.append(n)
        await n.start()
        return n

    yield start
    for n in nodes:
        await n.close()


async def test_an_add_reaches_every_worker_with_the_pod_netns_and_a_del_leaves_none(node: Any) -> None:
    n: Node = await node(Launcher())
    workers = [n.launcher.current(0), n.launcher.current(1)]
    for w in workers:  # each worker got the (empty) pod set as a snapshot before the agent connected
        assert w.pods.events == [("retain", []), ("snapshot_sent",)]

    await n.agent.add_workload(UID, INFO, str(n.netns))

    for w in workers:
        assert w.pods.events[-1] == ("add", UID, INFO.name, n.inode())
    assert set(n.pool.pods) == {UID}

    await n.agent.del_workload(UID)
    for w in workers:
        assert w.pods.events[-1] == ("del", UID)
    assert n.pool.pods == {}


async def test_a_nack_from_one_worker_nacks_the_agent_and_takes_the_pod_back_from_the_others(node: Any) -> None:
    refusing = RecordingPods(refuse="cannot open listeners in pod bookinfo/productpage-v1: [Errno 98] in use")
    n: Node = await node(Launcher(lambda index: refusing if index == 1 else RecordingPods()))
    healthy = n.launcher.current(0)

    with pytest.raises(ZdsError) as nack:
        await n.agent.add_workload(UID, INFO, str(n.netns))

    worker_1 = n.launcher.current(1)
    assert nack.value.reason == "nack"
    assert f"worker 1 (pid {worker_1.pid}): cannot open listeners in pod bookinfo/productpage-v1" in str(nack.value)
    assert "failure to start proxy : failure to start proxy" not in str(nack.value)
    assert healthy.pods.events[-2:] == [("add", UID, INFO.name, n.inode()), ("del", UID)]
    assert n.pool.pods == {}  # proxied by nobody: a restarted worker does not get it back either


async def test_a_worker_that_dies_is_restarted_and_gets_the_pod_set_again(node: Any) -> None:
    n: Node = await node(Launcher())
    await n.agent.add_workload(UID, INFO, str(n.netns))
    dead = n.launcher.current(0)

    dead.kill()
    async with asyncio.timeout(WAIT):
        while (replacement := n.launcher.current(0)) is dead:
            await asyncio.sleep(0.01)
    await replacement.pods.wait_for("snapshot_sent")

    assert replacement.pods.events == [("add", UID, INFO.name, n.inode()), ("retain", [UID]), ("snapshot_sent",)]
    assert replacement.pid in n.pool.pids() and dead.pid not in n.pool.pids()
    await n.agent.del_workload(UID)  # the agent's connection never noticed
    assert replacement.pods.events[-1] == ("del", UID)


async def test_a_worker_that_exits_before_its_hello_stops_the_main_with_why(tmp: Path) -> None:
    config = ZtunnelConfig(node_name="node-1", node_ip="127.0.0.1", workers=2)
    pool = WorkerPool(config, launcher=Launcher(hello=False))
    try:
        with pytest.raises(WorkerError) as failed:
            await pool.start()
    finally:
        await pool.close()
    assert "exited with code 1 before it said hello; its log lines (worker=" in str(failed.value)


class WorkerState:
    """What a worker's admin port dumps: one pod with one open inbound connection."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def snapshot(self) -> WorkloadSnapshot:
        return WorkloadSnapshot()

    def certificates(self) -> list[Any]:
        return []

    def workload_states(self) -> Mapping[str, WorkloadState]:
        connection = ConnectionEntry(f"{self.peer}:40000", "10.244.1.5:9080", "HBONE", None,
                                     "spiffe://cluster.local/ns/default/sa/sleep")
        return {UID: WorkloadState(INFO.name, INFO.namespace, INFO.service_account, "Up", (connection,))}

    def config(self) -> Mapping[str, Any]:
        return {"nodeName": "node-1", "workers": 2}


def worker_page(index: int) -> bytes:
    series = 'istio_tcp_connections_opened_total{reporter="destination",source_workload="sleep"}'
    return (f"# HELP istio_tcp_connections_opened_total The total number of TCP connections opened\n"
            f"# TYPE istio_tcp_connections_opened_total counter\n{series} {index + 2}\n"
            f"# HELP workload_manager_active_proxy_count The total number current workloads with active proxies\n"
            f"# TYPE workload_manager_active_proxy_count gauge\nworkload_manager_active_proxy_count 1\n").encode()


async def test_the_main_serves_the_workers_metrics_and_connections_merged(node: Any) -> None:
    launcher = Launcher()
    servers: list[InheritedSocketServer] = []

    async def serve_admin(spec: WorkerSpec) -> None:
        # Dups: a real worker holds its own copies of the sockets the main bound for it.
        admin = AdminServer(WorkerState(f"10.244.0.{spec.index + 1}"), lambda: None)
        for server in (InheritedSocketServer(admin, spec.admin.dup()),
                       InheritedSocketServer(MetricsServer(lambda: worker_page(spec.index)), spec.metrics.dup())):
            await server.start()
            servers.append(server)

    launcher.extra.append(serve_admin)
    try:
        n: Node = await node(launcher)
        page = (await n.pool.metrics_text()).decode()
        dump = await n.pool.config_dump()
    finally:
        for server in servers:
            await server.close()

    assert 'istio_tcp_connections_opened_total{reporter="destination",source_workload="sleep"} 5\n' in page
    assert page.count("# TYPE istio_tcp_connections_opened_total counter") == 1
    assert "workload_manager_active_proxy_count 1\n" in page  # every worker proxies every pod: not 2
    assert "process_cpu_seconds_total" in page  # the main's own process is part of the page
    connections = dump["workloadState"][UID]["connections"]["inbound"]
    assert sorted(c["src"] for c in connections) == ["10.244.0.1:40000", "10.244.0.2:40000"]
    assert dump["config"]["workerPids"] == n.pool.pids()


async def test_config_dump_falls_back_to_the_main_view_when_no_worker_answers(node: Any) -> None:
    n: Node = await node(Launcher())  # these workers serve no admin page
    await n.agent.add_workload(UID, INFO, str(n.netns))
    dump = await n.pool.config_dump()
    assert dump["workloadState"][UID]["info"]["name"] == INFO.name
    assert dump["config"]["workers"] == 2 and len(dump["config"]["workerPids"]) == 2


def test_worker_sockets_listen_on_loopback_when_the_admin_address_is_a_wildcard() -> None:
    pool = WorkerPool(ZtunnelConfig(node_name="n", node_ip="", admin_address=("0.0.0.0", 15000), workers=2))
    assert pool.host == "127.0.0.1"
    pool = WorkerPool(ZtunnelConfig(node_name="n", node_ip="", admin_address=("172.30.0.11", 15000), workers=2))
    assert pool.host == "172.30.0.11"
