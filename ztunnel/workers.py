"""`--workers N` (issue 5, deliverable 9): N data-plane processes behind one ZDS connection.

Where things run:
- The **main process** owns what must exist once per node: the ZDS connection to the node agent (only one
  connection may own pod adds, PROTOCOLS §4) and the admin (15000), metrics (15020) and readiness (15021)
  ports. It keeps the pod set (uid → workload info + its own dup of the pod's netns fd) and no data path.
- Each **worker** (`python -m ztunnel.workers`, spawned, never forked from a running loop) is a whole
  single-process ztunnel minus the ZDS client: its own xDS stream, certificate manager, HBONE pool and pod
  proxies. It opens its own 15001/15006/15008/15053 listeners in every pod netns; `SO_REUSEPORT` (set by
  `ztunnel.proxy.sockets.listener`) makes the kernel spread new connections across the workers.

Between them the main speaks ZDS itself, playing the node agent's part over a `SOCK_SEQPACKET` socketpair:
the worker says hello, receives the current pod set as a snapshot (adds with the netns fd as `SCM_RIGHTS`,
then `snapshot_sent`), then adds and deletes one at a time, answering each with an ack or a NACK. An add
from the agent is relayed to every running worker and answered once all of them replied: with the first
NACK (after rolling the add back on the others, so a NACKed pod is proxied by nobody) or with an ack.
A worker that is restarting is skipped: it gets the whole pod set when it comes back.

Lifecycle: workers die with the main (`PR_SET_PDEATHSIG` → SIGTERM → drain; also when their channel reaches
EOF). The main restarts a worker that exits (backoff 0.1 s doubling to 5 s, reset after 10 s of uptime)
and replays the pod set to it. A worker that exits before its first hello stops the main with its exit code
(a configuration problem would otherwise restart forever). On SIGTERM the main tells every worker to drain
and waits for them.

Admin and metrics: the main binds one loopback listening socket per worker for its admin app and one for
its metrics app, and passes them at spawn (stable ports across restarts, nothing to announce). The main's
- `/metrics` is the merge of its own process metrics and every worker's page (`merge_metrics`): identical
  series are summed (the istio_tcp_* counters, CPU seconds, memory, open fds), except
  `process_start_time_seconds` (the earliest), `process_max_fds` and `workload_manager_*` (the largest:
  every worker proxies every pod, so summing would count each pod N times).
- `/config_dump` is the first worker's document (xDS state, certificates) with every worker's open
  connections merged per pod and `config.workerPids` added (`merge_config_dumps`). When no worker answers,
  it falls back to the main's own view: the pods it was given, without connections or xDS state.
- `/logging?level=` applies to the main and is forwarded to every worker.
- `/healthz/ready` (15021): `xds` once every worker reports ready, `zds` once the agent's snapshot is done.
A worker that does not answer within `ADMIN_FETCH_TIMEOUT` is left out of that one page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import ctypes
import dataclasses
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ambient.aio import OwnedTasks, cancel_on_signals
from ambient.telemetry import admin_http
from ambient.telemetry.admin_http import FetchError, Readiness
from ambient.telemetry.logs import current_level, setup_logging
from ambient.telemetry.registry import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ambient.xds.store import WorkloadSnapshot
from ambient.zds.channel import SeqpacketChannel
from ambient.zds.protocol import (
    AddWorkload,
    DelWorkload,
    Hello,
    Request,
    Response,
    ServerConnection,
    SnapshotSent,
    WorkloadInfo,
    WorkloadInfoLike,
    ZdsError,
)
from ztunnel.admin import AdminServer, HttpServer, MetricsServer, WorkloadState, config_dump
from ztunnel.config import ZtunnelConfig
from ztunnel.errors import ZtunnelError
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.zds_client import PodManager, ZdsClient

log = logging.getLogger("ztunnel.workers")

WORKER_ACK_TIMEOUT = 4.0  # seconds a worker has to answer an add/del: below the agent's 5 s, so it gets our NACK
WORKER_START_TIMEOUT = 60.0  # seconds from spawn to the worker's hello (interpreter start-up on a loaded node)
RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX = 0.1, 5.0  # seconds; a worker that crashes at once must not spin
STABLE_UPTIME = 10.0  # seconds of uptime after which a crash restarts the backoff from the start
EXIT_GRACE = 2.0  # seconds past the drain deadline before a worker that ignores SIGTERM is killed
ADMIN_FETCH_TIMEOUT = 2.0  # seconds the main waits for a worker's admin/metrics page
READY_POLL_INTERVAL = 0.2  # seconds between polls of the workers' readiness until all are ready
NACK_PREFIX = "failure to start proxy : "  # the worker's ZdsClient prefix; the main's adds its own
PR_SET_PDEATHSIG = 1

Json = dict[str, Any]


class WorkerError(ZtunnelError):
    """A worker could not be started, or refused a pod; the message names the worker and its pid."""

    reason = "worker_failed"


# -- spawning ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is started with: its slot number and the sockets it inherits."""

    index: int
    channel: socket.socket  # the worker's end of the ZDS socketpair
    admin: socket.socket  # listening socket for its admin app (bound by the main)
    metrics: socket.socket  # listening socket for its metrics app


class WorkerHandle(Protocol):
    """A running worker as the main sees it; `asyncio.subprocess.Process` is one."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


Launcher = Callable[[WorkerSpec], Awaitable[WorkerHandle]]


def config_json(config: ZtunnelConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> ZtunnelConfig:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
    return ZtunnelConfig(**fields)


def process_launcher(config: ZtunnelConfig, log_level: Callable[[], str]) -> Launcher:
    """Spawn `python -m ztunnel.workers` with the spec's sockets at the same fd numbers, at the log level
    in force (set through the main's /logging) when it starts."""

    async def launch(spec: WorkerSpec) -> WorkerHandle:
        fds = (spec.channel.fileno(), spec.admin.fileno(), spec.metrics.fileno())
        argv = [sys.executable, "-m", "ztunnel.workers", "--index", str(spec.index), "--parent-pid", str(os.getpid()),
                "--channel-fd", str(fds[0]), "--admin-fd", str(fds[1]), "--metrics-fd", str(fds[2]),
                "--log-level", log_level(), "--config", config_json(config)]
        return await asyncio.create_subprocess_exec(*argv, pass_fds=fds, stdin=asyncio.subprocess.DEVNULL)

    return launch


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


# -- the main's end of one worker's channel ----------------------------------------------------------------
class WorkerLink:
    """The main as the node agent of one worker (PROTOCOLS §4): hello, snapshot, then one request at a time
    (responses carry no id, only their order). Any failure breaks the link for good; the worker is then
    replaced."""

    def __init__(self, index: int, pid: int, channel: SeqpacketChannel) -> None:
        self.index, self.pid = index, pid
        self._channel = channel
        self._core = ServerConnection()
        self._lock = asyncio.Lock()
        self.failure: ZdsError | None = None

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.pid})"

    @property
    def alive(self) -> bool:
        return self.failure is None

    async def hello(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                datagram = await self._channel.recv()
        except TimeoutError:
            raise self._fail(ZdsError("timeout", f"after {timeout:.0f}s without a hello")) from None
        except ZdsError as exc:
            raise self._fail(exc) from None
        if datagram is None:
            raise self._fail(ZdsError("disconnected", "before it said hello"))
        event = self._core.receive(datagram.data, fds=len(datagram.fds), truncated=datagram.truncated)
        assert isinstance(event, Hello)

    async def snapshot(self, pods: Mapping[str, PodEntry], timeout: float) -> None:
        """Send the pod set, then `snapshot_sent`. Requests queue behind it; pods removed meanwhile are skipped."""
        async with self._lock:
            for uid, entry in list(pods.items()):
                if pods.get(uid) is not entry:
                    continue
                error = await self._exchange(AddWorkload(uid, entry.info), entry.netns, timeout)
                if error:
                    log.warning("%s could not take pod %s/%s (uid %s) back: %s", self.name, entry.info.namespace,
                                entry.info.name, uid, error)
            await self._exchange(SnapshotSent(), None, timeout)

    async def request(self, request: Request, fd: int | None, timeout: float) -> str:
        """Send `request` and return the worker's NACK text ("" for an ack); ZdsError if the link broke."""
        async with self._lock:
            return await self._exchange(request, fd, timeout)

    async def _exchange(self, request: Request, fd: int | None, timeout: float) -> str:
        if self.failure is not None:
            raise self.failure
        data = self._core.send(request)
        try:
            await self._channel.send(data, () if fd is None else (fd,))
            async with asyncio.timeout(timeout):
                datagram = await self._channel.recv()
        except TimeoutError:
            raise self._fail(ZdsError("timeout", f"{self.name} did not answer {request.kind.value} within "
                                                 f"{timeout:.0f}s")) from None
        except ZdsError as exc:
            raise self._fail(exc) from None
        if datagram is None:
            raise self._fail(ZdsError("disconnected", f"{self.name} exited"))
        for received in datagram.fds:
            os.close(received)
        try:
            event = self._core.receive(datagram.data, fds=len(datagram.fds), truncated=datagram.truncated)
        except ZdsError as exc:
            raise self._fail(exc) from None
        assert isinstance(event, Response)
        return event.error

    def _fail(self, error: ZdsError) -> ZdsError:
        if self.failure is None:
            self.failure = error
            self._core.close()
            self._channel.close()
        return self.failure

    def close(self) -> None:
        self._fail(ZdsError("closed", f"{self.name}: link closed"))


# -- the pool ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class PodEntry:
    info: WorkloadInfo
    netns: int  # the main's own dup of the pod's netns fd, replayed to restarted workers


@dataclass(eq=False)
class WorkerSlot:
    """One of the N places a worker runs in; its admin/metrics sockets outlive the worker's restarts."""

    index: int
    admin: socket.socket
    metrics: socket.socket
    handle: WorkerHandle | None = None
    link: WorkerLink | None = None

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None


def _listening(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _worker_host(config: ZtunnelConfig) -> str:
    """Workers' admin/metrics listen where the main's admin does, or on loopback when that is a wildcard."""
    host = config.admin_address[0]
    try:
        return "127.0.0.1" if ipaddress.ip_address(host).is_unspecified else host
    except ValueError:
        return "127.0.0.1"


class WorkerPool:
    """N worker processes fed from one ZDS connection: the `PodManager` the main's `ZdsClient` drives, and
    the fallback `StateProvider` of its admin port."""

    def __init__(self, config: ZtunnelConfig, *, log_level: str = "info", launcher: Launcher | None = None) -> None:
        self.config_ = config
        self.count = config.workers
        self.log_level = log_level
        self.launcher = launcher or process_launcher(config, lambda: self.log_level)
        self.host = _worker_host(config)
        self.pods: dict[str, PodEntry] = {}
        self.slots: list[WorkerSlot] = []
        self.metrics = ZtunnelMetrics()  # the main's own process metrics
        self.snapshot_seen = asyncio.Event()
        self._tasks = OwnedTasks(log)
        self._closing = False
        self._fetching = False  # the workers' admin pages are read between start() and close()

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait until each has said hello; WorkerError if one exits first."""
        loop = asyncio.get_running_loop()
        firsts: list[asyncio.Future[None]] = []
        for index in range(self.count):
            admin = _listening(self.host)
            try:
                metrics = _listening(self.host)
            except OSError:
                admin.close()
                raise
            slot = WorkerSlot(index, admin, metrics)
            self.slots.append(slot)
            first: asyncio.Future[None] = loop.create_future()
            firsts.append(first)
            self._tasks.spawn(self._supervise(slot, first), name=f"worker-{index}")
        self._fetching = True
        try:
            await asyncio.gather(*firsts)
        except WorkerError:
            for first in firsts:  # retrieved: only the first failure is reported
                if first.done() and not first.cancelled():
                    first.exception()
            raise
        log.info("%d workers running: pids %s", self.count, ", ".join(str(pid) for pid in self.pids()))

    async def close(self) -> None:
        """Ask every worker to drain (SIGTERM and EOF), wait for them, then kill stragglers."""
        self._closing = True
        handles = [slot.handle for slot in self.slots if slot.handle is not None and slot.handle.returncode is None]
        for handle in handles:
            with contextlib.suppress(ProcessLookupError):
                handle.terminate()
        for slot in self.slots:
            if slot.link is not None:
                slot.link.close()
        if handles:
            _, pending = await asyncio.wait([asyncio.ensure_future(h.wait()) for h in handles],
                                            timeout=self.config_.drain_deadline + EXIT_GRACE)
            for handle in handles:
                if handle.returncode is None:
                    log.warning("worker pid %d did not exit after SIGTERM; killing it", handle.pid)
                    with contextlib.suppress(ProcessLookupError):
                        handle.kill()
            if pending:
                await asyncio.wait(pending, timeout=EXIT_GRACE)
        await self._tasks.cancel_all()
        for entry in self.pods.values():
            os.close(entry.netns)
        self.pods.clear()
        for slot in self.slots:
            slot.admin.close()
            slot.metrics.close()
        self._fetching = False

    def pids(self) -> list[int]:
        return [slot.pid for slot in self.slots if slot.pid is not None]

    async def _supervise(self, slot: WorkerSlot, first: asyncio.Future[None]) -> None:
        delay = RESTART_BACKOFF_INITIAL
        while not self._closing:
            started = time.monotonic()
            try:
                handle = await self._launch(slot)
            except (OSError, WorkerError) as exc:
                if not first.done():
                    first.set_exception(exc if isinstance(exc, WorkerError) else
                                        WorkerError(f"worker {slot.index} could not be started: {exc}"))
                    return
                log.warning("worker %d could not start: %s; retrying in %.1fs", slot.index, exc, delay)
            else:
                if not first.done():
                    first.set_result(None)
                code = await handle.wait()
                if slot.link is not None:
                    slot.link.close()
                if self._closing:
                    return
                if time.monotonic() - started > STABLE_UPTIME:
                    delay = RESTART_BACKOFF_INITIAL
                log.warning("worker %d (pid %d) %s; restarting it in %.1fs and giving it the %d pod(s) again",
                            slot.index, handle.pid, _exit_text(code), delay, len(self.pods))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_MAX)

    async def _launch(self, slot: WorkerSlot) -> WorkerHandle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            handle = await self.launcher(WorkerSpec(slot.index, theirs, slot.admin, slot.metrics))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker holds its own copy: its exit is our EOF
        slot.handle = handle
        link = WorkerLink(slot.index, handle.pid, SeqpacketChannel(ours))
        phase = "hello"
        try:
            await link.hello(WORKER_START_TIMEOUT)
            slot.link = link  # live from now on: requests to it queue behind the snapshot
            phase = "snapshot"
            await link.snapshot(self.pods, WORKER_ACK_TIMEOUT)
        except ZdsError as exc:
            link.close()
            code = await _stop(handle)
            when = str(exc) if phase == "hello" else f"while taking the pod set ({exc})"
            raise WorkerError(f"{link.name} {_exit_text(code)} {when}; its log lines (worker={slot.index}) "
                              "say why") from None
        log.info("%s started with %d pod(s)", link.name, len(self.pods))
        return handle

    # -- PodManager (driven by the main's ZdsClient) ----------------------------------------------------
    async def add_pod(self, uid: str, info: WorkloadInfoLike | None, netns_fd: int) -> None:
        if info is None:
            raise ValueError(f"pod {uid}: add without workload info")
        entry = PodEntry(WorkloadInfo(info.name, info.namespace, info.service_account), os.dup(netns_fd))
        previous = self.pods.get(uid)
        self.pods[uid] = entry  # before relaying: a worker restarting meanwhile gets it in its snapshot
        try:
            errors = await self._relay(AddWorkload(uid, entry.info), entry.netns, need_ack=True)
            if errors:
                # A NACKed pod is proxied by nobody: take it back from the workers that took it.
                if self.pods.get(uid) is entry:
                    del self.pods[uid]
                await self._relay(DelWorkload(uid), None, need_ack=False)
                os.close(entry.netns)
                raise WorkerError(errors[0])
        finally:
            if previous is not None:
                os.close(previous.netns)
        log.info("pod %s/%s added to %d worker(s) (uid %s)", info.namespace, info.name, len(self._links()), uid)

    async def keep_pod(self, uid: str) -> None:
        if uid not in self.pods:
            log.info("keep for unknown pod %s: nothing to keep", uid)

    async def remove_pod(self, uid: str) -> None:
        entry = self.pods.pop(uid, None)
        if entry is None:
            return
        try:
            errors = await self._relay(DelWorkload(uid), None, need_ack=False)
        finally:
            os.close(entry.netns)
        if errors:
            raise WorkerError(errors[0])
        log.info("pod %s/%s removed (uid %s)", entry.info.namespace, entry.info.name, uid)

    async def retain_only(self, uids: set[str]) -> None:
        for uid in set(self.pods) - uids:
            await self.remove_pod(uid)

    def snapshot_received(self) -> None:
        self.snapshot_seen.set()

    def _links(self) -> list[WorkerLink]:
        return [slot.link for slot in self.slots if slot.link is not None and slot.link.alive]

    async def _relay(self, request: Request, fd: int | None, *, need_ack: bool) -> list[str]:
        """Send `request` to every running worker; the NACKs, each naming its worker. With `need_ack`, no
        worker acking at all is a NACK too (nobody would proxy the pod)."""
        links = self._links()
        results = await asyncio.gather(*(link.request(request, fd, WORKER_ACK_TIMEOUT) for link in links),
                                       return_exceptions=True)
        errors, acks = [], 0
        for link, result in zip(links, results, strict=True):
            if isinstance(result, ZdsError):
                log.warning("%s: %s; it is replaced and gets the pod set again", link.name, result)
                self._replace(link)
            elif isinstance(result, BaseException):
                raise result
            elif result:
                errors.append(f"{link.name}: {result.removeprefix(NACK_PREFIX)}")
            else:
                acks += 1
        if need_ack and not errors and not acks:
            errors.append(f"no ztunnel worker is running ({self.count} restarting); retry shortly")
        return errors

    def _replace(self, link: WorkerLink) -> None:
        """A broken link means a lost worker: kill it (if it still runs) so that its slot restarts it."""
        for slot in self.slots:
            if slot.link is link and slot.handle is not None and slot.handle.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.handle.kill()

    # -- admin, metrics, readiness -------------------------------------------------------------------------
    async def _fetch(self, slot: WorkerSlot, port_of: socket.socket, path: str,
                     method: str = "GET") -> tuple[int, bytes] | None:
        if not self._fetching:
            return None
        try:
            return await admin_http.fetch(self.host, port_of.getsockname()[1], path, method=method,
                                          timeout=ADMIN_FETCH_TIMEOUT)
        except FetchError as exc:
            log.debug("worker %d: %s", slot.index, exc)
            return None

    async def config_dump(self) -> Json:
        pages = await asyncio.gather(*(self._fetch(slot, slot.admin, "/config_dump") for slot in self.slots))
        dumps = [json.loads(page) for page in _answered(pages)]
        if not dumps:
            log.warning("no worker answered /config_dump; showing the main process's view (pods only)")
            return config_dump(self)
        merged = merge_config_dumps(dumps)
        merged.setdefault("config", {})["workerPids"] = self.pids()
        return merged

    async def metrics_text(self) -> bytes:
        pages = await asyncio.gather(*(self._fetch(slot, slot.metrics, "/metrics") for slot in self.slots))
        return merge_metrics([self.metrics.render().decode(), *(page.decode() for page in _answered(pages))]).encode()

    async def set_log_level(self, level: str) -> None:
        self.log_level = current_level()  # as the main applied it, for workers started later
        await asyncio.gather(*(self._fetch(slot, slot.admin, f"/logging?level={urllib.parse.quote(level)}", "POST")
                               for slot in self.slots))

    async def wait_ready(self) -> None:
        """Return once every worker's readiness page says ready (xDS synced, pod set applied)."""
        while True:
            answers = await asyncio.gather(*(self._fetch(slot, slot.admin, "/healthz/ready") for slot in self.slots))
            if all(answer is not None and answer[0] == 200 for answer in answers):
                return
            await asyncio.sleep(READY_POLL_INTERVAL)

    # -- StateProvider: the fallback dump when no worker answers ------------------------------------------
    def snapshot(self) -> WorkloadSnapshot:
        return WorkloadSnapshot()

    def certificates(self) -> list[Any]:
        return []

    def workload_states(self) -> dict[str, WorkloadState]:
        return {uid: WorkloadState(e.info.name, e.info.namespace, e.info.service_account)
                for uid, e in self.pods.items()}

    def config(self) -> dict[str, Any]:
        return {"nodeName": self.config_.node_name, "nodeIp": self.config_.node_ip, "workers": self.count,
                "workerPids": self.pids()}


def _answered(answers: Sequence[tuple[int, bytes] | None]) -> list[bytes]:
    return [body for answer in answers if answer is not None for status, body in [answer] if status == 200]


async def _stop(handle: WorkerHandle) -> int:
    if handle.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            handle.kill()
    return await handle.wait()


class PoolAdminServer(AdminServer):
    """The main's 15000: `/config_dump` merged from the workers, `/logging` forwarded to them."""

    def __init__(self, pool: WorkerPool, on_quit: Callable[[], None], address: tuple[str, int], *,
                 readiness: Readiness | None = None) -> None:
        super().__init__(pool, on_quit, address, readiness=readiness)
        self._pool = pool

    async def _config_dump(self, _: admin_http.Request) -> admin_http.Response:
        return admin_http.json_response(await self._pool.config_dump())

    async def _logging(self, request: admin_http.Request) -> admin_http.Response:
        response = await super()._logging(request)
        level = request.query.get("level")
        if level and response.status == 200:
            await self._pool.set_log_level(level)
        return response


class PoolMetricsServer(MetricsServer):
    """The main's 15020: its own process metrics merged with every worker's page."""

    def __init__(self, pool: WorkerPool, address: tuple[str, int]) -> None:
        super().__init__(pool.metrics.render, address)
        self._pool = pool

    async def _metrics(self, _: admin_http.Request) -> admin_http.Response:
        return admin_http.Response(body=await self._pool.metrics_text(), content_type=METRICS_CONTENT_TYPE)


# -- merging the workers' pages (pure) ---------------------------------------------------------------------
def _split_sample(line: str) -> tuple[str, str, str]:
    """`name{labels} value [ts]` → (name, series key, value); label values may hold spaces and braces."""
    brace = line.find("{")
    space = line.find(" ")
    if brace == -1 or (space != -1 and space < brace):
        name, _, rest = line.partition(" ")
        return name, name, rest.split()[0]
    i, quoted = brace + 1, False
    while i < len(line):
        char = line[i]
        if quoted and char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            break
        i += 1
    return line[:brace], line[: i + 1], line[i + 1:].split(maxsplit=1)[0]


def _combiner(name: str) -> Callable[[list[float]], float]:
    if name == "process_start_time_seconds":
        return min
    if name == "process_max_fds" or name.startswith("workload_manager_"):
        return max
    return math.fsum


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def merge_metrics(pages: Sequence[str]) -> str:
    """Several Prometheus text pages as one: families in order of first appearance (HELP/TYPE from the first
    page that has them), each series combined across pages (see the module docstring for how)."""
    families: dict[str, list[str]] = {}  # family → its HELP/TYPE lines
    series: dict[str, dict[str, list[float]]] = {}  # family → series key → values
    names: dict[str, str] = {}  # series key → metric name
    for page in pages:
        family = ""
        for line in page.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in series:
                        families.setdefault(family, []).append(line)
                        if parts[1] == "TYPE":
                            series[family] = {}
                continue
            name, key, value = _split_sample(line)
            if family not in series:
                family = name
                families.setdefault(family, [])
                series[family] = {}
            series[family].setdefault(key, []).append(float(value))
            names[key] = name
    out: list[str] = []
    for family, head in families.items():
        out.extend(f"{line}\n" for line in head)
        for key, values in series.get(family, {}).items():
            out.append(f"{key} {_number(_combiner(names[key])(values))}\n")
    return "".join(out)


def merge_config_dumps(dumps: Sequence[Json]) -> Json:
    """The first worker's dump with every worker's connections merged per pod (a pod is "Up" only where
    every worker has it up) and certificates merged by identity (an available one wins)."""
    merged = copy.deepcopy(dumps[0])
    states: Json = merged.setdefault("workloadState", {})
    certificates: list[Json] = merged.setdefault("certificates", [])
    for other in dumps[1:]:
        for uid, state in other.get("workloadState", {}).items():
            mine = states.get(uid)
            if mine is None:
                states[uid] = copy.deepcopy(state)
                continue
            for direction in ("inbound", "outbound"):
                mine["connections"][direction].extend(state["connections"][direction])
            if state.get("state") != "Up":
                mine["state"] = state.get("state")
        by_identity = {c.get("identity"): i for i, c in enumerate(certificates)}
        for cert in other.get("certificates", []):
            at = by_identity.get(cert.get("identity"))
            if at is None:
                by_identity[cert.get("identity")] = len(certificates)
                certificates.append(cert)
            elif cert.get("state") == "Available" and certificates[at].get("state") != "Available":
                certificates[at] = cert
    merged["workloadState"] = dict(sorted(states.items()))
    merged["certificates"] = sorted(certificates, key=lambda c: str(c.get("identity")))
    return merged


# -- the worker process -----------------------------------------------------------------------------------
class MainConnection(ZdsClient):
    """The worker's ZDS client on the channel the main handed it, instead of the agent's socket. `run()`
    returns when the main goes away."""

    def __init__(self, channel: SeqpacketChannel, pods: PodManager) -> None:
        super().__init__("the main ztunnel process", pods)
        self._channel = channel

    async def run(self) -> None:
        try:
            await self._serve(self._channel)
            log.info("the main ztunnel process closed the worker channel; draining")
        except ZdsError as exc:
            log.warning("worker channel to the main ztunnel process failed: %s; draining", exc)
        finally:
            self._channel.close()


class InheritedSocketServer:
    """Serves an `HttpServer`'s app on a listening socket the main bound for this worker."""

    def __init__(self, server: HttpServer, sock: socket.socket) -> None:
        self.server, self.sock = server, sock

    async def start(self) -> None:
        await self.server.start(self.sock)

    async def close(self) -> None:
        await self.server.close()


class _WorkerField(logging.Filter):
    """Adds `worker=<index>` to every log line of a worker."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**(getattr(record, "fields", None) or {}), "worker": self.index}
        return True


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM (→ drain) when the main dies, even by SIGKILL; exit now if it is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s; this worker would outlive a killed main",
                    os.strerror(ctypes.get_errno()))
    if os.getppid() != parent_pid:
        sys.exit("ztunnel worker: the main ztunnel process exited before this worker started")


async def run_worker(config: ZtunnelConfig, spec: WorkerSpec) -> None:
    from ztunnel.app import Ztunnel
    from ztunnel.main import quit_on_request, serve_data_plane

    cancel_on_signals()
    app = Ztunnel(config)
    readiness = Readiness(["xds", "zds"])
    servers = [InheritedSocketServer(AdminServer(app, quit_on_request(), readiness=readiness), spec.admin),
               InheritedSocketServer(MetricsServer(app.metrics.render), spec.metrics)]
    zds = MainConnection(SeqpacketChannel(spec.channel), app)
    await serve_data_plane(app, servers, readiness, zds.run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ztunnel-worker",
                                description="one data-plane process of `ztunnel --workers N` (started by ztunnel)")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--channel-fd", type=int, required=True)
    p.add_argument("--admin-fd", type=int, required=True)
    p.add_argument("--metrics-fd", type=int, required=True)
    p.add_argument("--log-level", default="info")
    p.add_argument("--config", required=True, help="the main's ZtunnelConfig as JSON")
    a = p.parse_args(argv)
    _die_with_parent(a.parent_pid)
    config = config_from_json(a.config)
    setup_logging(config.log_format, a.log_level).addFilter(_WorkerField(a.index))
    try:
        spec = WorkerSpec(a.index, socket.socket(fileno=a.channel_fd), socket.socket(fileno=a.admin_fd),
                          socket.socket(fileno=a.metrics_fd))
    except OSError as exc:
        sys.exit(f"ztunnel worker: the sockets from the main process are missing ({exc}); "
                 "workers are started by `ztunnel --workers N`, not by hand")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(config, spec))


if __name__ == "__main__":
    main()
