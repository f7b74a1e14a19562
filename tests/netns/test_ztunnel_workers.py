"""`ztunnel --workers 2` as real processes in throwaway network namespaces (issue 5, deliverable 9).

A "node" netns runs the ztunnel main process (with a mesh root and token on disk but no control plane: the
pods' listeners do not need one); a "pod" netns is joined to it by a veth. The node agent is the real
`cni.zds_server.ZdsServer` in the test process. Checked: each worker opens its own 15001/15006/15008 in the
pod netns (two PIDs per port), the kernel spreads connections over them, a killed worker is restarted and
listens again, a delete closes everything, the main's admin/metrics/readiness speak for the workers, and
the workers go when the main goes (SIGTERM drains; SIGKILL of the main reaches them through PDEATHSIG)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from ambient.identity.signer import CaSigner
from ambient.netns import in_netns
from cni.zds_server import SnapshotEntry, WorkloadInfo, ZdsError, ZdsServer
from tests.netns.conftest import REPO

pytestmark = pytest.mark.netns

NODE_IP, POD_IP = "10.98.0.1", "10.98.0.2"
PORTS = (15001, 15006, 15008)
UID = "uid-productpage"
INFO = WorkloadInfo("productpage-v1", "bookinfo", "bookinfo-productpage")
NO_CONTROL_PLANE = "127.0.0.1:1"  # nothing listens there: xDS and CA retry in the background
WAIT = 20.0  # seconds for a process to start (three interpreters on a loaded host) or a state to show
SPREAD_CONNECTIONS = 32  # all on one of two workers by chance: 2 * 2**-32


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


async def until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll `condition` (run on a thread: it may call `ss`) until truthy; fail naming `what`."""
    last: Any = None
    async with asyncio.timeout(timeout):
        while True:
            last = await asyncio.to_thread(condition)
            if last:
                return last
            await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")  # pragma: no cover


@dataclass
class Node:
    name: str  # node netns
    pod: str  # pod netns
    tmp: Path
    agent: ZdsServer
    log: Path
    process: asyncio.subprocess.Process | None = None
    seen_workers: set[int] = field(default_factory=set)

    def listeners(self, port: int) -> dict[int, int]:
        """pid → accept-queue length of each listener on `port` in the pod netns."""
        out = sh("ip", "netns", "exec", self.pod, "ss", "-Hltnp", f"sport = :{port}")
        found: dict[int, int] = {}
        for line in out.splitlines():
            fields = line.split()
            for pid in re.findall(r"pid=(\d+)", line):
                found[int(pid)] = int(fields[1])
        return found

    async def listening_on_every_port(self, pids: list[int]) -> None:
        for port in PORTS:
            def listening(port: int = port) -> bool:
                return sorted(self.listeners(port)) == pids

            await until(listening, f"listeners on {port} owned by exactly {pids}")

    def ports_of(self, pid: int) -> list[int]:
        """The TCP ports process `pid` listens on in the node netns."""
        out = sh("ip", "netns", "exec", self.name, "ss", "-Hltnp")
        return [int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if f"pid={pid}," in line]

    def workers(self) -> list[int]:
        assert self.process is not None
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                if "ztunnel.workers" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:  # exited (or a zombie not reaped yet): not a worker any more
                continue
        self.seen_workers.update(pids)
        return sorted(pids)

    def http(self, port: int, path: str) -> tuple[int, str]:
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://{NODE_IP}:{port}{path}", timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        return in_netns(self.name, get)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("ip", "ss"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} on PATH")
    suffix = uuid.uuid4().hex[:8]
    node, pod = f"ambt-{suffix}-zwnode", f"ambt-{suffix}-zwpod"
    tmp = Path(tempfile.mkdtemp(prefix="zw-", dir="/tmp"))  # short: AF_UNIX paths stop at 107 bytes
    try:
        sh("ip", "netns", "add", node)
        sh("ip", "netns", "add", pod)
        sh("ip", "-n", node, "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns", pod)
        for ns, dev, ip in ((node, "veth-pod", NODE_IP), (pod, "eth0", POD_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield node, pod, tmp
    finally:
        sh("ip", "netns", "del", pod, check=False)
        sh("ip", "netns", "del", node, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def ztunnel(namespaces: tuple[str, str, Path]) -> AsyncIterator[Node]:
    """The agent, and `ztunnel --workers 2` (main process) in the node netns; everything stopped by PID."""
    node_ns, pod_ns, tmp = namespaces
    (tmp / "root-cert.pem").write_text(CaSigner.generate("cluster.local").root_pem)
    (tmp / "token").write_text("test-token")
    entries: list[SnapshotEntry] = []

    async def snapshot() -> list[SnapshotEntry]:
        return entries

    agent = ZdsServer(str(tmp / "ztunnel.sock"), snapshot)
    await agent.start()
    node = Node(node_ns, pod_ns, tmp, agent, tmp / "ztunnel.log")
    try:
        with node.log.open("wb") as log:
            node.process = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", node_ns, sys.executable, "-m", "ztunnel.main", "--workers", "2",
                "--node-name", "node-1", "--node-ip", NODE_IP, "--zds-socket", str(tmp / "ztunnel.sock"),
                "--root-cert", str(tmp / "root-cert.pem"), "--token-path", str(tmp / "token"),
                "--xds-address", NO_CONTROL_PLANE, "--ca-address", NO_CONTROL_PLANE,
                "--admin-address", f"{NODE_IP}:15000", "--listen-ip", NODE_IP,
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            async with asyncio.timeout(WAIT):
                await agent.ready.wait()  # the main connects once both workers said hello
        except TimeoutError:
            raise AssertionError(f"ztunnel never connected to the agent; its log:\n{node.output()}") from None
        yield node
    finally:
        if node.process is not None and node.process.returncode is None:
            node.workers()  # remember its workers before they lose their parent
            node.process.kill()
            await node.process.wait()
        for pid in node.seen_workers:  # the workers of the process this test started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        await agent.close()


async def test_each_worker_listens_in_the_pod_netns_shares_connections_and_is_restarted(ztunnel: Node) -> None:
    node = ztunnel
    workers = node.workers()
    assert len(workers) == 2, node.output()

    await node.agent.add_workload(UID, INFO, f"/run/netns/{node.pod}")

    await node.listening_on_every_port(workers)  # each worker its own listener per port (SO_REUSEPORT)

    # The kernel spreads new connections over the workers' listeners: with both workers stopped, the
    # connections wait in the accept queue of the listener the kernel picked.
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        clients = in_netns(node.name, lambda: [socket.create_connection((POD_IP, 15008), timeout=5)
                                               for _ in range(SPREAD_CONNECTIONS)])

        def all_queued() -> dict[int, int] | None:
            queues = node.listeners(15008)
            return queues if sum(queues.values()) == SPREAD_CONNECTIONS else None

        queued = await until(all_queued, "every connection queued on a worker's listener")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    for client in clients:
        client.close()
    assert all(queued[pid] > 0 for pid in workers), queued

    # The main speaks for its workers on 15000/15020/15021.
    status, body = node.http(15000, "/config_dump")
    dump = json.loads(body)
    assert status == 200 and dump["workloadState"][UID]["info"]["name"] == INFO.name
    assert sorted(dump["config"]["workerPids"]) == workers and dump["config"]["workers"] == 2
    status, page = node.http(15020, "/metrics")
    assert status == 200 and page.count("# TYPE process_cpu_seconds_total counter") == 1
    assert node.http(15021, "/healthz/ready") == (500, "not ready, pending: xds\n")  # no control plane here
    assert node.http(15000, "/logging?level=debug") == (200, "current log level is debug\n")
    for pid in workers:  # forwarded to each worker's own admin app (on a port the main bound for it)
        answers = [node.http(port, "/logging")[1] for port in node.ports_of(pid)]
        assert "current log level is debug\n" in answers, (pid, answers)

    # A worker that dies is replaced and gets the pod back, without the agent doing anything.
    os.kill(workers[0], signal.SIGKILL)

    def replaced_worker() -> list[int] | None:
        now = node.workers()
        return now if len(now) == 2 and workers[0] not in now else None

    replaced = await until(replaced_worker, "the killed worker to be replaced")
    await node.listening_on_every_port(replaced)

    await node.agent.del_workload(UID)
    await node.listening_on_every_port([])

    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(WAIT):
        code = await node.process.wait()
    assert code == 0, node.output()
    await until(lambda: not any(alive(pid) for pid in replaced), "the workers to exit with the main")


async def test_a_pod_the_workers_cannot_serve_is_nacked_and_workers_exit_when_the_main_is_killed(
        ztunnel: Node) -> None:
    node = ztunnel
    workers = node.workers()

    def occupy() -> socket.socket:  # without SO_REUSEPORT: no worker can listen next to it
        blocker = socket.socket()
        blocker.bind(("0.0.0.0", 15006))
        blocker.listen()
        return blocker

    blocker = in_netns(node.pod, occupy)
    try:
        with pytest.raises(ZdsError) as nack:
            await node.agent.add_workload(UID, INFO, f"/run/netns/{node.pod}")
    finally:
        blocker.close()
    assert nack.value.reason == "nack"
    assert re.search(r"failure to start proxy : worker \d \(pid \d+\): cannot open listeners in pod "
                     r"bookinfo/productpage-v1: .*Address already in use", str(nack.value)), str(nack.value)
    assert not node.listeners(15001)  # nothing left behind by the worker that got further

    await node.agent.add_workload(UID, INFO, f"/run/netns/{node.pod}")  # the agent's retry
    await node.listening_on_every_port(workers)

    assert node.process is not None
    node.process.kill()
    await node.process.wait()

    await until(lambda: not any(alive(pid) for pid in workers), "the workers to exit after the main was killed")
    await node.listening_on_every_port([])


async def test_quitquitquit_on_the_main_stops_it_and_its_workers(ztunnel: Node) -> None:
    node = ztunnel
    workers = node.workers()

    def quit_() -> int:
        request = urllib.request.Request(f"http://{NODE_IP}:15000/quitquitquit", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)

    assert in_netns(node.name, quit_) == 200
    assert node.process is not None
    async with asyncio.timeout(WAIT):
        assert await node.process.wait() == 0, node.output()
    await until(lambda: not any(alive(pid) for pid in workers), "the workers to exit with the main")
