"""A stand-in ztunnel for ZDS (PROTOCOLS.md §4): connects to the node agent's socket, says hello, answers
every request and keeps the pod netns fds it is handed open, as ztunnel does.

`FakeZtunnel` is the test double; `python -m cni.zds_client --socket PATH` runs it per node in the local
cluster until our ztunnel exists (reconnecting with ztunnel's backoff, one log line per request, an
optional JSON-lines record). Error texts are ztunnel's, so tests read like the real thing. It must not
enter a netns or open proxy listeners.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from ambient.aio import cancel_on_signals
from ambient.zds.channel import Datagram, SeqpacketChannel
from ambient.zds.protocol import (
    DEFAULT_SOCKET_PATH,
    AddWorkload,
    ClientConnection,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    WorkloadInfoLike,
    ZdsError,
    ZdsProtocolError,
    decode_request,
)

log = logging.getLogger("cni.zds_client")

RECONNECT_INITIAL = 0.01  # ztunnel's first reconnect delay (10 ms), doubled after each failure ...
RECONNECT_MAX = 15.0  # ... up to ztunnel's cap

NetnsId = tuple[int, int]  # (inode, dev): how ztunnel tells "same netns" from "a new one"


@dataclass(frozen=True)
class ReceivedRequest:
    request: Request | None  # None when the datagram could not be decoded
    fds: int
    netns: NetnsId | None  # of the fd an add carried
    error: str  # the NACK text we answered with; "" for an ack


class WorkloadTable:
    """Pods handed to this ztunnel, with their netns fds held open. Outlives a connection, as ztunnel's
    state does, so that a reconnect's snapshot can keep or drop them."""

    def __init__(self) -> None:
        self._pods: dict[str, tuple[WorkloadInfoLike | None, NetnsId, int]] = {}

    def view(self) -> dict[str, tuple[WorkloadInfoLike | None, NetnsId]]:
        return {uid: (info, netns) for uid, (info, netns, _) in self._pods.items()}

    def add(self, uid: str, info: WorkloadInfoLike | None, fd: int) -> str:
        """Take ownership of `fd`. Same uid and same netns is a no-op; a different netns replaces it."""
        st = os.fstat(fd)
        netns = (st.st_ino, st.st_dev)
        old = self._pods.get(uid)
        if old is not None and old[1] == netns:
            os.close(fd)
            self._pods[uid] = (info, netns, old[2])
            return "unchanged"
        self._pods[uid] = (info, netns, fd)
        if old is not None:
            os.close(old[2])
            return "replaced"
        return "added"

    def remove(self, uid: str) -> bool:
        entry = self._pods.pop(uid, None)
        if entry is not None:
            os.close(entry[2])
        return entry is not None

    def retain_only(self, uids: set[str]) -> list[str]:
        gone = [uid for uid in self._pods if uid not in uids]
        for uid in gone:
            self.remove(uid)
        return gone

    def close(self) -> None:
        self.retain_only(set())


class FakeZtunnel:
    """One ZDS connection playing ztunnel. Acks everything except adds of `nack_uids`; an invalid
    request (no fd or two fds on an add, garbage, out of order) gets ztunnel's NACK, then a disconnect."""

    def __init__(self, channel: SeqpacketChannel, table: WorkloadTable | None, nack_uids: Iterable[str],
                 on_request: Callable[[ReceivedRequest], None] | None) -> None:
        self._channel = channel
        self._owns_table = table is None
        self.table = table if table is not None else WorkloadTable()
        self.nack_uids = set(nack_uids)
        self.core = ClientConnection()
        self.received: list[ReceivedRequest] = []
        self.snapshot_done = asyncio.Event()
        self.disconnected = asyncio.Event()
        self._snapshot_uids: set[str] = set()
        self._on_request = on_request
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str, *, table: WorkloadTable | None = None, nack_uids: Iterable[str] = (),
                      on_request: Callable[[ReceivedRequest], None] | None = None) -> FakeZtunnel:
        """Connect and say hello. Raises OSError when nobody listens on `path`."""
        fake = cls(await SeqpacketChannel.connect(path), table, nack_uids, on_request)
        await fake._channel.send(fake.core.hello())
        fake._task = asyncio.get_running_loop().create_task(fake._serve(), name=f"fake-ztunnel {path}")
        return fake

    @property
    def workloads(self) -> dict[str, tuple[WorkloadInfoLike | None, NetnsId]]:
        return self.table.view()

    async def close(self) -> None:
        self._channel.close()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._owns_table:
            self.table.close()

    async def _serve(self) -> None:
        try:
            while (datagram := await self._channel.recv()) is not None and await self._answer(datagram):
                pass
        except ZdsError as e:
            if e.reason != "closed":
                log.warning("ZDS connection failed: %s", e)
        finally:
            self._channel.close()
            self.disconnected.set()

    async def _answer(self, datagram: Datagram) -> bool:
        """Answer one request; False when the connection must end."""
        try:
            request = self.core.receive(datagram.data, fds=len(datagram.fds), truncated=datagram.truncated)
        except ZdsProtocolError as e:
            for unwanted in datagram.fds:
                os.close(unwanted)
            stage = "process" if e.reason == "unexpected_message" else "read"
            error = f"failure to {stage} message : {e}"
            self._record(ReceivedRequest(_peek(datagram.data), len(datagram.fds), None, error))
            await self._channel.send(self.core.respond(error))
            return False
        fd = datagram.fds[0] if datagram.fds else None
        netns = _netns_of(fd) if fd is not None else None
        error = self._apply(request, fd)
        self._record(ReceivedRequest(request, len(datagram.fds), netns, error))
        await self._channel.send(self.core.respond(error))
        if isinstance(request, SnapshotSent):
            self.snapshot_done.set()
        return True

    def _apply(self, request: Request, fd: int | None) -> str:
        if isinstance(request, AddWorkload):
            assert fd is not None  # the core rejects an add without exactly one fd
            if request.uid in self.nack_uids:
                os.close(fd)
                return f"failure to start proxy : pod {request.uid} is in this fake ztunnel's NACK list"
            self.table.add(request.uid, request.info, fd)
            self._snapshot_uids.add(request.uid)
        elif isinstance(request, KeepWorkload):
            self._snapshot_uids.add(request.uid)
        elif isinstance(request, DelWorkload):
            self.table.remove(request.uid)
            self._snapshot_uids.discard(request.uid)
        else:
            for uid in self.table.retain_only(self._snapshot_uids):
                log.info("snapshot: dropped pod %s (not in the agent's snapshot)", uid)
        return ""

    def _record(self, entry: ReceivedRequest) -> None:
        self.received.append(entry)
        if self._on_request is not None:
            self._on_request(entry)


def _peek(data: bytes) -> Request | None:
    try:
        return decode_request(data)
    except ZdsProtocolError:
        return None


def _netns_of(fd: int) -> NetnsId:
    st = os.fstat(fd)
    return (st.st_ino, st.st_dev)


# --- `python -m cni.zds_client` -----------------------------------------------------------------------


def describe(entry: ReceivedRequest) -> dict[str, object]:
    """One request as a flat JSON-able record (also the log line's content)."""
    request = entry.request
    record: dict[str, object] = {"time": round(time.time(), 3),
                                 "request": request.kind.value if request is not None else "invalid"}
    if request is not None and not isinstance(request, SnapshotSent):
        record["uid"] = request.uid
    if isinstance(request, AddWorkload) and request.info is not None:
        record.update(name=request.info.name, namespace=request.info.namespace,
                      service_account=request.info.service_account)
    if entry.netns is not None:
        record["netns"] = f"{entry.netns[1]}:{entry.netns[0]}"
    record.update(fds=entry.fds, error=entry.error)
    return record


async def run(path: str, nack_uids: Iterable[str], record: TextIO | None) -> None:
    """Stay connected to the agent at `path` until cancelled (SIGTERM/SIGINT)."""
    table = WorkloadTable()

    def on_request(entry: ReceivedRequest) -> None:
        fields = describe(entry)
        log.info("%s", " ".join(f"{k}={v}" for k, v in fields.items() if k != "time"))
        if record is not None:
            record.write(json.dumps(fields) + "\n")
            record.flush()

    delay = RECONNECT_INITIAL
    fake: FakeZtunnel | None = None
    try:
        while True:
            try:
                fake = await FakeZtunnel.connect(path, table=table, nack_uids=nack_uids, on_request=on_request)
            except (OSError, ZdsError) as e:
                delay = min(RECONNECT_MAX, delay * 2)
                log.warning("failed to connect to the Istio CNI node agent over %s, is the node agent healthy? "
                            "details: %s. retrying in %.2fs", path, getattr(e, "strerror", None) or e, delay)
                await asyncio.sleep(delay)
                continue
            log.info("connected to the node agent over %s", path)
            await fake.disconnected.wait()
            if fake.snapshot_done.is_set():
                delay = RECONNECT_INITIAL
            log.info("node agent connection ended (%d pods held); reconnecting in %.2fs", len(table.view()), delay)
            await fake.close()
            fake = None
            await asyncio.sleep(delay)
    finally:
        if fake is not None:
            await fake.close()
        table.close()


async def _main(args: argparse.Namespace, record: TextIO | None) -> None:
    cancel_on_signals()
    try:
        await run(args.socket, args.nack_uid, record)
    except asyncio.CancelledError:
        log.info("shutting down")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cni.zds_client",
                                     description="Stand-in ztunnel: acks ZDS requests from the node agent.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET_PATH, help=f"ZDS socket (default {DEFAULT_SOCKET_PATH})")
    parser.add_argument("--nack-uid", action="append", default=[], metavar="UID", help="NACK adds of this pod uid")
    parser.add_argument("--record", metavar="FILE", help="append one JSON line per request to FILE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s zds-client: %(message)s")
    try:
        record = open(args.record, "a", encoding="utf-8") if args.record else None  # noqa: SIM115
    except OSError as e:
        sys.exit(f"zds-client: cannot open --record file {args.record}: {e.strerror}")
    try:
        asyncio.run(_main(args, record))
    finally:
        if record is not None:
            record.close()


if __name__ == "__main__":
    main()
