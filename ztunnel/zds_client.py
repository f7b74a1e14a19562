"""ztunnel's side of ZDS (PROTOCOLS §4): connect to the node agent, say hello, and turn each request into
a call on the pod manager — add (with the pod's netns fd), keep, del, snapshot_sent — answering each with
an ack or the manager's error (a NACK). Reconnects with backoff; after each snapshot, pods the agent did
not mention are dropped."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Protocol

from ambient.zds.channel import Datagram, SeqpacketChannel
from ambient.zds.protocol import (
    AddWorkload,
    ClientConnection,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfoLike,
    ZdsError,
    ZdsProtocolError,
)

log = logging.getLogger("ztunnel.zds")
BACKOFF_INITIAL, BACKOFF_MAX = 0.01, 15.0  # seconds, as ztunnel retries the agent's socket


class PodManager(Protocol):
    async def add_pod(self, uid: str, info: WorkloadInfoLike | None, netns_fd: int) -> None: ...
    async def keep_pod(self, uid: str) -> None: ...
    async def remove_pod(self, uid: str) -> None: ...
    async def retain_only(self, uids: set[str]) -> None: ...
    def snapshot_received(self) -> None: ...


class ZdsClient:
    def __init__(self, path: str, pods: PodManager) -> None:
        self.path, self.pods = path, pods
        self.connected = asyncio.Event()

    async def run(self) -> None:
        delay = BACKOFF_INITIAL
        while True:
            try:
                channel = await SeqpacketChannel.connect(self.path)
            except OSError as exc:
                log.warning("failed to connect to the Istio CNI node agent over %s, is the node agent healthy? "
                            "details: %s. retrying in %.2fs", self.path, exc.strerror or exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.0))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_INITIAL
            try:
                await self._serve(channel)
            except ZdsError as exc:
                log.warning("ZDS connection to %s ended: %s", self.path, exc)
            finally:
                channel.close()
                self.connected.clear()

    async def _serve(self, channel: SeqpacketChannel) -> None:
        core = ClientConnection()
        await channel.send(core.hello())
        self.connected.set()
        log.info("connected to the node agent at %s", self.path)
        mentioned: set[str] = set()
        while (datagram := await channel.recv()) is not None:
            error, keep_going = await self._handle(core, datagram, mentioned)
            await channel.send(core.respond(error))
            if not keep_going:
                return

    async def _handle(self, core: ClientConnection, datagram: Datagram, mentioned: set[str]) -> tuple[str, bool]:
        try:
            request = core.receive(datagram.data, fds=len(datagram.fds), truncated=datagram.truncated)
        except ZdsProtocolError as exc:
            for fd in datagram.fds:
                os.close(fd)
            return f"failure to read message : {exc}", False
        try:
            if isinstance(request, AddWorkload):
                fd = datagram.fds[0]
                try:
                    await self.pods.add_pod(request.uid, request.info, fd)
                finally:
                    os.close(fd)
                mentioned.add(request.uid)
            elif isinstance(request, KeepWorkload):
                await self.pods.keep_pod(request.uid)
                mentioned.add(request.uid)
            elif isinstance(request, DelWorkload):
                await self.pods.remove_pod(request.uid)
                mentioned.discard(request.uid)
            elif isinstance(request, SnapshotSent):
                await self.pods.retain_only(set(mentioned))
                self.pods.snapshot_received()
        except Exception as exc:  # any failure is the agent's to retry: NACK with the reason
            log.warning("ZDS %s failed: %s", type(request).__name__, exc)
            return f"failure to start proxy : {exc}", True
        return "", True
