"""ZDS server and stand-in ztunnel over a real SOCK_SEQPACKET socket with real fds (PROTOCOLS.md §4).

Temporary files stand in for pod network namespaces (the fake ztunnel only fstat()s them, as ztunnel
identifies a netns by inode and device); one test hands over /proc/self/ns/net.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient.zds.protocol import (
    AddWorkload,
    SnapshotSent,
    WorkloadInfo,
    ZdsError,
    decode_response,
    encode_hello,
    encode_request,
    encode_response,
)
from cni.zds_client import FakeZtunnel, WorkloadTable
from cni.zds_server import SeqpacketChannel, SnapshotEntry, ZdsServer

REPO = Path(__file__).resolve().parents[3]


def info(name: str) -> WorkloadInfo:
    return WorkloadInfo(name, "bookinfo", f"sa-{name}")


def netns_id(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_dev)


async def until(condition: Callable[[], Any], what: str, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def receive(channel: SeqpacketChannel) -> bytes:
    async with asyncio.timeout(3):
        datagram = await channel.recv()
    assert datagram is not None, "the server hung up"
    for fd in datagram.fds:
        os.close(fd)
    return datagram.data


async def ack_snapshot(server: ZdsServer) -> SeqpacketChannel:
    """A hand-driven ztunnel that says hello and acks the (empty) snapshot, then does what the test says."""
    raw = await SeqpacketChannel.connect(server.path)
    await raw.send(encode_hello())
    assert await receive(raw) == encode_request(SnapshotSent())
    await raw.send(encode_response())
    await until(server.ready.is_set, "snapshot done")
    return raw


async def until_closed(channel: SeqpacketChannel, timeout: float = 3.0) -> list[bytes]:
    """Read until the server drops us; returns what it sent meanwhile."""
    seen = []
    async with asyncio.timeout(timeout):
        while (datagram := await channel.recv()) is not None:
            seen.append(datagram.data)
    channel.close()
    return seen


class Pods:
    """The agent's enrolled pods, as the snapshot callable sees them."""

    def __init__(self) -> None:
        self.entries: list[SnapshotEntry] = []

    async def snapshot(self) -> list[SnapshotEntry]:
        return list(self.entries)


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="zds-", dir="/tmp"))  # short: AF_UNIX paths stop at 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def netns(tmp: Path) -> Callable[[str], str]:
    def make(name: str) -> str:
        path = tmp / f"netns-{name}"
        path.write_text(name)
        return str(path)
    return make


@pytest.fixture
def pods() -> Pods:
    return Pods()


StartServer = Callable[..., Awaitable[ZdsServer]]


@pytest.fixture
async def start_server(tmp: Path, pods: Pods) -> AsyncIterator[StartServer]:
    servers: list[ZdsServer] = []

    async def start(ack_timeout: float = 2.0) -> ZdsServer:
        server = ZdsServer(str(tmp / "run" / "ztunnel" / "ztunnel.sock"), pods.snapshot, ack_timeout=ack_timeout)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def server(start_server: StartServer) -> ZdsServer:
    return await start_server()


@pytest.fixture
async def ztunnels() -> AsyncIterator[Callable[..., Awaitable[FakeZtunnel]]]:
    fakes: list[FakeZtunnel] = []

    async def connect(server: ZdsServer, **kwargs: Any) -> FakeZtunnel:
        fake = await FakeZtunnel.connect(server.path, **kwargs)
        fakes.append(fake)
        await asyncio.wait_for(fake.snapshot_done.wait(), 3)
        return fake

    yield connect
    for fake in fakes:
        await fake.close()


def kinds(fake: FakeZtunnel) -> list[tuple[str, str]]:
    return [(r.request.kind.value, getattr(r.request, "uid", "")) if r.request else ("invalid", "")
            for r in fake.received]


async def test_snapshot_sends_adds_and_keeps(server: ZdsServer, pods: Pods, netns: Callable[[str], str],
                                             ztunnels: Any) -> None:
    a = netns("a")
    pods.entries = [("uid-a", info("a"), a), ("uid-b", info("b"), None), ("uid-c", info("c"), "/nonexistent/netns")]
    assert not server.ready.is_set()
    fake = await ztunnels(server)
    assert kinds(fake) == [("add", "uid-a"), ("keep", "uid-b"), ("keep", "uid-c"), ("snapshot_sent", "")]
    assert fake.workloads == {"uid-a": (info("a"), netns_id(a))}
    assert [r.error for r in fake.received] == ["", "", "", ""]
    await until(server.ready.is_set, "server ready")
    assert server.connected() == 1


async def test_add_and_delete_after_snapshot(server: ZdsServer, ztunnels: Any) -> None:
    fake = await ztunnels(server)
    await server.add_workload("uid-a", info("a"), "/proc/self/ns/net")
    assert fake.workloads == {"uid-a": (info("a"), netns_id("/proc/self/ns/net"))}
    await server.del_workload("uid-a")
    assert fake.workloads == {}
    assert kinds(fake)[-2:] == [("add", "uid-a"), ("del", "uid-a")]


async def test_reconnect_gets_a_new_snapshot(server: ZdsServer, pods: Pods, netns: Callable[[str], str],
                                             ztunnels: Any) -> None:
    table = WorkloadTable()  # ztunnel's state survives its reconnects
    try:
        first = await ztunnels(server, table=table)
        a, b = netns("a"), netns("b")
        await server.add_workload("uid-a", info("a"), a)
        await server.add_workload("uid-b", info("b"), b)
        await first.close()
        await until(lambda: server.connected() == 0 and not server.ready.is_set(), "the server to see the close")
        with pytest.raises(ZdsError) as err:
            await server.add_workload("uid-c", info("c"), netns("c"))
        assert err.value.reason == "no_ztunnel"

        pods.entries = [("uid-b", info("b"), None), ("uid-c", info("c"), netns("c"))]  # uid-a left meanwhile
        second = await ztunnels(server, table=table)
        assert kinds(second) == [("keep", "uid-b"), ("add", "uid-c"), ("snapshot_sent", "")]
        assert second.workloads == {"uid-b": (info("b"), netns_id(b)), "uid-c": (info("c"), netns_id(netns("c")))}
        await until(server.ready.is_set, "server ready again")
        assert server.connected() == 1
    finally:
        table.close()


async def test_adds_go_to_the_newest_connection_and_deletes_to_all(server: ZdsServer, netns: Callable[[str], str],
                                                                     ztunnels: Any) -> None:
    old = await ztunnels(server)
    new = await ztunnels(server)
    assert server.connected() == 2
    await server.add_workload("uid-a", info("a"), netns("a"))
    assert "uid-a" in new.workloads and "uid-a" not in old.workloads
    await server.del_workload("uid-a")
    assert kinds(old)[-1] == ("del", "uid-a") and kinds(new)[-1] == ("del", "uid-a")

    await new.close()  # the upgrade rolled back: the remaining connection gets adds again
    await until(lambda: server.connected() == 1, "the newest connection to go")
    await server.add_workload("uid-b", info("b"), netns("b"))
    assert "uid-b" in old.workloads


async def test_nack_raises_with_the_ztunnel_error_text(server: ZdsServer, netns: Callable[[str], str],
                                                       ztunnels: Any) -> None:
    fake = await ztunnels(server, nack_uids={"uid-bad"})
    with pytest.raises(ZdsError) as err:
        await server.add_workload("uid-bad", info("bad"), netns("bad"))
    assert err.value.reason == "nack"
    assert "uid-bad" in str(err.value) and "failure to start proxy" in str(err.value)
    await server.add_workload("uid-ok", info("ok"), netns("ok"))  # a NACK does not cost the connection
    assert list(fake.workloads) == ["uid-ok"]


async def test_add_with_an_unopenable_netns_says_which(server: ZdsServer, ztunnels: Any) -> None:
    await ztunnels(server)
    with pytest.raises(ZdsError) as err:
        await server.add_workload("uid-a", info("a"), "/nonexistent/netns")
    assert err.value.reason == "netns" and "/nonexistent/netns" in str(err.value)


async def test_concurrent_adds_are_serialized(server: ZdsServer, netns: Callable[[str], str],
                                              ztunnels: Any) -> None:
    fake = await ztunnels(server)  # its core NACKs and disconnects on a request sent before the last answer
    paths = [netns(str(i)) for i in range(20)]
    await asyncio.gather(*(server.add_workload(f"uid-{i}", info(str(i)), p) for i, p in enumerate(paths)))
    assert sorted(fake.workloads) == sorted(f"uid-{i}" for i in range(20))
    assert all(r.error == "" for r in fake.received)


@pytest.mark.parametrize(("fds", "error"), [
    (0, "failure to read message : No control message"),
    (2, "failure to read message : Expected 1 FD, got 2"),
])
async def test_fake_ztunnel_rejects_an_add_without_exactly_one_fd(tmp: Path, netns: Callable[[str], str],
                                                                 fds: int, error: str) -> None:
    path = str(tmp / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    opened = [os.open(netns(str(i)), os.O_RDONLY) for i in range(fds)]
    fake = await FakeZtunnel.connect(path)
    try:
        sock, _ = await asyncio.get_running_loop().sock_accept(listener)
        agent = SeqpacketChannel(sock)
        assert await receive(agent) == encode_hello()
        await agent.send(encode_request(AddWorkload("uid-a", info("a"))), opened)
        response = await agent.recv()
        assert response is not None and decode_response(response.data) == error
        assert await until_closed(agent) == []  # and then it hangs up, as ztunnel does
        assert fake.workloads == {}
        assert fake.received[0].request == AddWorkload("uid-a", info("a")) and fake.received[0].fds == fds
    finally:
        await fake.close()
        listener.close()
        for fd in opened:
            os.close(fd)


async def test_server_drops_a_client_that_sends_fds(server: ZdsServer, ztunnels: Any) -> None:
    raw = await SeqpacketChannel.connect(server.path)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        await raw.send(encode_hello(), [fd])
        assert await until_closed(raw) == []
    finally:
        os.close(fd)
    await ztunnels(server)  # still serving
    assert server.connected() == 1


def _hello_twice() -> list[bytes]:
    return [encode_hello(), encode_hello()]


@pytest.mark.parametrize("datagrams", [
    [b"\xff\xff\xff"],  # not protobuf
    [bytes.fromhex("0802")],  # a hello for a version we do not speak
    [encode_response()],  # a response where the hello belongs
    [b"\x08\x01" + b"\x00" * 2000],  # longer than the 1024-byte read buffer: truncated
    _hello_twice(),
], ids=["garbage", "version", "wrong-type", "truncated", "hello-twice"])
async def test_garbage_drops_the_connection_not_the_server(server: ZdsServer, pods: Pods,
                                                           netns: Callable[[str], str], ztunnels: Any,
                                                           datagrams: list[bytes]) -> None:
    pods.entries = [("uid-a", info("a"), netns("a"))]
    raw = await SeqpacketChannel.connect(server.path)
    for data in datagrams:
        await raw.send(data)
    await until_closed(raw)
    await until(lambda: server.connected() == 0, "the bad connection to be dropped")
    fake = await ztunnels(server)
    await server.add_workload("uid-b", info("b"), netns("b"))
    assert sorted(fake.workloads) == ["uid-a", "uid-b"]


async def test_garbage_instead_of_an_ack_fails_the_pending_add(server: ZdsServer, netns: Callable[[str], str]) -> None:
    raw = await ack_snapshot(server)
    add = asyncio.create_task(server.add_workload("uid-a", info("a"), netns("a")))
    request = await raw.recv()
    assert request is not None and len(request.fds) == 1
    os.close(request.fds[0])
    await raw.send(b"\x0a\x05garbage")
    with pytest.raises(ZdsError) as err:
        await add
    assert err.value.reason == "disconnected" and "not a ZDS WorkloadResponse" in str(err.value)
    await until_closed(raw)


async def test_silent_clients_time_out(start_server: StartServer, netns: Callable[[str], str],
                                       ztunnels: Any) -> None:
    server = await start_server(ack_timeout=0.2)
    mute = await SeqpacketChannel.connect(server.path)  # never says hello
    assert await until_closed(mute) == []

    stuck = await ack_snapshot(server)  # then stops answering
    with pytest.raises(ZdsError) as err:
        await server.add_workload("uid-a", info("a"), netns("a"))
    assert err.value.reason == "timeout" and "did not answer add of pod uid-a" in str(err.value)
    await until_closed(stuck)
    assert server.connected() == 0 and not server.ready.is_set()


async def test_delete_skips_dead_connections(start_server: StartServer, ztunnels: Any) -> None:
    server = await start_server(ack_timeout=0.2)
    live = await ztunnels(server)
    stuck = await ack_snapshot(server)  # then stops answering
    assert server.connected() == 2
    await server.del_workload("uid-a")  # the stuck one times out and is dropped, without an error
    assert kinds(live)[-1] == ("del", "uid-a")
    assert server.connected() == 1
    stuck.close()


async def test_close_fails_pending_requests(server: ZdsServer, netns: Callable[[str], str]) -> None:
    raw = await ack_snapshot(server)
    add = asyncio.create_task(server.add_workload("uid-a", info("a"), netns("a")))
    await receive(raw)
    await server.close()
    with pytest.raises(ZdsError) as err:
        await add
    assert err.value.reason == "closed"
    raw.close()


async def test_socket_file_lifecycle(tmp: Path, pods: Pods) -> None:
    path = tmp / "run" / "ztunnel" / "ztunnel.sock"
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))  # an agent that crashed left its socket behind
    stale.close()
    server = ZdsServer(str(path), pods.snapshot)
    await server.start()
    fake = await FakeZtunnel.connect(str(path))
    await asyncio.wait_for(fake.snapshot_done.wait(), 3)
    await fake.close()
    await server.close()
    assert not path.exists()

    path.write_text("not a socket")
    with pytest.raises(ZdsError) as err:
        await ZdsServer(str(path), pods.snapshot).start()
    assert err.value.reason == "socket_path" and "is not a socket" in str(err.value)

    created = ZdsServer(str(tmp / "new" / "dir" / "z.sock"), pods.snapshot)  # parents are created
    await created.start()
    await created.close()


async def test_zds_client_process_retries_acks_records_and_stops_on_sigterm(
        tmp: Path, pods: Pods, netns: Callable[[str], str]) -> None:
    sock_path, record = tmp / "run" / "ztunnel.sock", tmp / "record.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cni.zds_client", "--socket", str(sock_path), "--record", str(record),
        "--nack-uid", "uid-bad", cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    server = ZdsServer(str(sock_path), pods.snapshot)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(5):  # no agent yet: the client says so and retries
            first = await proc.stderr.readline()
        assert b"failed to connect to the Istio CNI node agent" in first and b"retrying" in first
        pods.entries = [("uid-a", info("a"), netns("a"))]
        await server.start()  # after the client started: it must retry until the agent is there
        await until(server.ready.is_set, "the client's snapshot", timeout=5)
        await server.add_workload("uid-b", info("b"), netns("b"))
        with pytest.raises(ZdsError):
            await server.add_workload("uid-bad", info("bad"), netns("bad"))
        await server.del_workload("uid-a")
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 5)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.close()
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(line["request"], line.get("uid")) for line in lines] == [
        ("add", "uid-a"), ("snapshot_sent", None), ("add", "uid-b"), ("add", "uid-bad"), ("del", "uid-a")]
    assert lines[0]["name"] == "a" and lines[0]["netns"] == "{1}:{0}".format(*netns_id(netns("a")))
    assert "failure to start proxy" in lines[3]["error"]
    log = stderr.decode()
    assert "request=add uid=uid-b" in log
    assert "Traceback" not in log



async def test_no_fd_is_leaked(tmp: Path, pods: Pods, netns: Callable[[str], str]) -> None:
    """The agent runs for months and opens a netns fd per add: every one must be closed again."""
    paths = [netns(str(i)) for i in range(5)]
    before = len(os.listdir("/proc/self/fd"))
    pods.entries = [("uid-0", info("0"), paths[0]), ("uid-1", info("1"), None)]
    server = ZdsServer(str(tmp / "z.sock"), pods.snapshot, ack_timeout=0.5)
    await server.start()
    fakes = [await FakeZtunnel.connect(server.path, nack_uids={"uid-4"}) for _ in range(2)]
    for fake in fakes:
        await asyncio.wait_for(fake.snapshot_done.wait(), 3)
    for i in (2, 3):
        await server.add_workload(f"uid-{i}", info(str(i)), paths[i])
    with pytest.raises(ZdsError):
        await server.add_workload("uid-4", info("4"), paths[4])
    await server.del_workload("uid-2")
    garbage = await SeqpacketChannel.connect(server.path)
    await garbage.send(b"\xff")
    await until_closed(garbage)
    await fakes[0].close()
    await server.close()
    await fakes[1].close()
    assert len(os.listdir("/proc/self/fd")) == before
