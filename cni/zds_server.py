"""The node agent's ZDS server: hands pod network namespaces to ztunnel (PROTOCOLS.md §4).

An asyncio shell around `ambient.zds.protocol.ServerConnection`: it listens on a `SOCK_SEQPACKET` unix socket, sends
each connecting ztunnel the snapshot of enrolled pods (add with the netns fd, or keep), then adds (to the
newest connection) and deletes (to all). Protocol decisions live in `ambient.zds.protocol`; this module owns sockets,
fds, timers and tasks. It must not know about Kubernetes: callers pass uids, `WorkloadInfo` and paths.

There is no keepalive timer: every connection has a reader waiting on its socket at all times, so a peer
that closes is seen at once, and a peer that stops answering is dropped after `ack_timeout`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ambient.aio import OwnedTasks
from ambient.zds.channel import Datagram, SeqpacketChannel
from ambient.zds.protocol import (
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    Request,
    Response,
    ServerConnection,
    SnapshotSent,
    WorkloadInfo,
    WorkloadInfoLike,
    ZdsError,
)

__all__ = ["ACK_TIMEOUT", "Datagram", "SeqpacketChannel", "SnapshotEntry", "WorkloadInfo", "ZdsError", "ZdsServer",
           "ZtunnelConnection"]

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0  # istio-cni's read/write deadline per ZDS request
ACCEPT_ERROR_PAUSE = 0.1  # after accept() fails (EMFILE...), so the loop does not spin

SnapshotEntry = tuple[str, WorkloadInfoLike, str | None]  # (pod uid, info, netns path; None → keep)
SnapshotSource = Callable[[], Awaitable[Sequence[SnapshotEntry]]]


# --- SOCK_SEQPACKET datagrams with SCM_RIGHTS (shared with cni.zds_client) ------------------------------


def _fail(fut: asyncio.Future[Any] | None, error: ZdsError) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(error)
        fut.exception()  # whoever awaits it still gets the error; nobody awaiting is not a bug


def _describe(request: Request) -> str:
    uid = getattr(request, "uid", None)
    return f"{request.kind.value} of pod {uid}" if uid is not None else request.kind.value


def open_netns(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


# --- one ztunnel connection ---------------------------------------------------------------------------


class ZtunnelConnection:
    """One accepted ztunnel: hello, snapshot, then requests one at a time (responses carry no id)."""

    def __init__(self, number: int, channel: SeqpacketChannel, ack_timeout: float,
                 on_drop: Callable[[], None]) -> None:
        self.number = number
        self._on_drop = on_drop
        self.core = ServerConnection()
        self._channel = channel
        self._ack_timeout = ack_timeout
        # Held for hello + snapshot, then for each request: later adds/deletes queue behind the snapshot.
        self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._hello: asyncio.Future[Hello] = loop.create_future()
        self._response: asyncio.Future[Response] | None = None
        self.failure: ZdsError | None = None
        self.ended = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self.failure is None

    def drop(self, cause: ZdsError) -> None:
        """Close the connection; a pending request fails with `cause` in its message."""
        if self.failure is not None:
            return
        reason = cause.reason if cause.reason in ("timeout", "closed") else "disconnected"
        self.failure = ZdsError(reason, f"ztunnel connection #{self.number} dropped: {cause}")
        if cause.reason not in ("closed", "disconnected"):
            log.warning("dropping ztunnel connection #%d: %s (reason=%s)", self.number, cause, cause.reason)
        self.core.close()
        _fail(self._hello, self.failure)
        _fail(self._response, self.failure)
        self._channel.close()
        self.ended.set()
        self._on_drop()

    async def serve(self, snapshot: SnapshotSource, on_snapshot_done: Callable[[ZtunnelConnection], None]) -> None:
        reader = asyncio.get_running_loop().create_task(self._read_loop(), name=f"zds-conn-{self.number}-reader")
        try:
            async with self._lock:
                try:
                    async with asyncio.timeout(self._ack_timeout):
                        hello = await self._hello
                except TimeoutError:
                    self.drop(ZdsError("timeout", f"no ZdsHello within {self._ack_timeout}s of connecting"))
                    return
                log.info("ztunnel connection #%d: hello (version %d), sending snapshot", self.number, hello.version)
                try:
                    entries = await snapshot()
                except Exception:
                    log.exception("ztunnel connection #%d: building the snapshot failed", self.number)
                    self.drop(ZdsError("snapshot", "the pod snapshot could not be built"))
                    return
                await self._send_snapshot(entries)
            on_snapshot_done(self)
            await self.ended.wait()
        except ZdsError:
            pass  # the connection was dropped and its cause logged; ztunnel reconnects
        finally:
            self.drop(ZdsError("closed", "connection ended"))
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def request(self, request: Request, fd: int | None = None) -> Response:
        async with self._lock:
            return await self._exchange(request, fd)

    async def _send_snapshot(self, entries: Sequence[SnapshotEntry]) -> None:
        for uid, info, netns_path in entries:
            fd = None
            if netns_path is not None:
                try:
                    fd = open_netns(netns_path)
                except OSError as e:
                    log.warning("cannot reopen netns %s of pod %s (%s): sending keep", netns_path, uid, e.strerror)
            try:
                response = await self._exchange(KeepWorkload(uid) if fd is None else AddWorkload(uid, info), fd)
            finally:
                if fd is not None:
                    os.close(fd)
            if not response.ok:
                log.warning("ztunnel connection #%d rejected snapshot %s: %s", self.number,
                            _describe(response.request), response.error)
        response = await self._exchange(SnapshotSent())
        if not response.ok:
            log.warning("ztunnel connection #%d rejected snapshot_sent: %s", self.number, response.error)
        log.info("ztunnel connection #%d: snapshot of %d pod(s) sent", self.number, len(entries))

    async def _exchange(self, request: Request, fd: int | None = None) -> Response:
        if self.failure is not None:
            raise self.failure
        data = self.core.send(request)
        self._response = asyncio.get_running_loop().create_future()
        try:
            await self._channel.send(data, () if fd is None else (fd,))
            async with asyncio.timeout(self._ack_timeout):
                return await self._response
        except TimeoutError:
            self.drop(ZdsError("timeout", f"ztunnel did not answer {_describe(request)} within {self._ack_timeout}s"))
            raise self.failure or ZdsError("timeout", "timed out") from None
        except ZdsError as e:
            self.drop(e)
            raise self.failure or e from None
        finally:
            self._response = None

    async def _read_loop(self) -> None:
        try:
            while (datagram := await self._channel.recv()) is not None:
                for fd in datagram.fds:
                    os.close(fd)
                event = self.core.receive(datagram.data, fds=len(datagram.fds), truncated=datagram.truncated)
                if isinstance(event, Hello):
                    self._hello.set_result(event)
                elif self._response is not None and not self._response.done():
                    self._response.set_result(event)
            self.drop(ZdsError("disconnected", "ztunnel closed the connection"))
        except ZdsError as e:
            self.drop(e)


# --- the server ---------------------------------------------------------------------------------------


def _replace_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ZdsError("socket_path", f"{path} exists and is not a socket; remove it or choose another ZDS socket path")
    path.unlink()  # left by an agent that did not shut down cleanly (istio-cni does the same)


class ZdsServer:
    """Listens for ztunnel on `path`; `snapshot()` lists the enrolled pods each new connection must get."""

    def __init__(self, path: str, snapshot: SnapshotSource, *, ack_timeout: float = ACK_TIMEOUT) -> None:
        self.path = path
        self._snapshot = snapshot
        self._ack_timeout = ack_timeout
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._inode = 0
        self._connections: list[ZtunnelConnection] = []  # in accept order: the last is the newest
        self._numbers = itertools.count(1)
        self._tasks = OwnedTasks(log)
        self.ready = asyncio.Event()  # set while some connection has completed its snapshot

    async def start(self) -> None:
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _replace_stale_socket(path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            raise ZdsError("socket_path", f"cannot prepare ZDS socket {path}: {e.strerror or e}") from None
        try:
            listener.bind(self.path)
            listener.listen()
            listener.setblocking(False)
            self._inode = os.stat(self.path).st_ino
        except OSError as e:
            listener.close()
            raise ZdsError("socket_path", f"cannot listen on ZDS socket {path}: {e.strerror or e}") from None
        self._listener = listener
        self._accept_task = self._tasks.spawn(self._accept_loop(listener), "zds-accept")
        log.info("ZDS server listening on %s", path)

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._remove_socket_file()
        for conn in list(self._connections):
            conn.drop(ZdsError("closed", "the node agent is shutting down"))
        await self._tasks.cancel_all()

    def connected(self) -> int:
        return sum(1 for conn in self._connections if conn.alive)

    async def add_workload(self, uid: str, info: WorkloadInfoLike, netns_path: str) -> None:
        """Hand pod `uid`'s netns to the newest ztunnel and wait for its ack (PROTOCOLS §4)."""
        conn = next((c for c in reversed(self._connections) if c.alive), None)
        if conn is None:
            raise ZdsError("no_ztunnel", f"no ztunnel is connected to {self.path}; is ztunnel running on this node?")
        try:
            fd = open_netns(netns_path)
        except OSError as e:
            raise ZdsError("netns", f"cannot open netns {netns_path} of pod {uid}: {e.strerror or e}") from None
        try:
            response = await conn.request(AddWorkload(uid, info), fd)
        finally:
            os.close(fd)
        if not response.ok:
            raise ZdsError("nack", f"ztunnel rejected pod {uid}: {response.error}")

    async def del_workload(self, uid: str) -> None:
        """Tell every connected ztunnel to drop pod `uid`. A connection that dies meanwhile is skipped;
        raises ZdsError("nack") if a live ztunnel refuses."""
        conns = [c for c in self._connections if c.alive]
        results = await asyncio.gather(*(c.request(DelWorkload(uid)) for c in conns), return_exceptions=True)
        refusals = []
        for conn, result in zip(conns, results, strict=True):
            if isinstance(result, ZdsError):
                log.info("delete of pod %s not delivered to ztunnel connection #%d: %s", uid, conn.number, result)
            elif isinstance(result, BaseException):
                raise result
            elif not result.ok:
                refusals.append(f"connection #{conn.number}: {result.error}")
        if refusals:
            raise ZdsError("nack", f"ztunnel refused to delete pod {uid}: {'; '.join(refusals)}")

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:
                log.warning("ZDS accept on %s failed: %s", self.path, e.strerror or e)
                await asyncio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            conn = ZtunnelConnection(next(self._numbers), SeqpacketChannel(sock), self._ack_timeout,
                                     self._update_ready)
            self._connections.append(conn)
            log.info("ztunnel connected (connection #%d, %d connected)", conn.number, self.connected())
            self._tasks.spawn(self._serve(conn), f"zds-conn-{conn.number}")

    async def _serve(self, conn: ZtunnelConnection) -> None:
        try:
            await conn.serve(self._snapshot, self._snapshot_done)
        finally:
            self._connections.remove(conn)
            log.info("ztunnel connection #%d closed (%d connected)", conn.number, self.connected())

    def _snapshot_done(self, conn: ZtunnelConnection) -> None:
        self._update_ready()

    def _update_ready(self) -> None:
        if any(c.alive and c.core.snapshot_done for c in self._connections):
            self.ready.set()
        else:
            self.ready.clear()

    def _remove_socket_file(self) -> None:
        try:
            if os.stat(self.path).st_ino == self._inode:  # not a newer agent's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass
