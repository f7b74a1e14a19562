"""A non-blocking `SOCK_SEQPACKET` channel for asyncio: whole datagrams with `SCM_RIGHTS` fds.

Neither asyncio nor uvloop offers `sock_recvmsg`/`sock_sendmsg`, so this sits on `add_reader`/
`add_writer`. Shared by the CNI agent's ZDS server and ztunnel's ZDS client (PROTOCOLS §4).
"""

from __future__ import annotations

import asyncio
import socket
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from ambient.zds.protocol import MAX_MESSAGE_SIZE, ZdsError

MAX_RECEIVED_FDS = 4  # room to count a wrong number of fds (ztunnel rejects 2) instead of truncating at 1


@dataclass(frozen=True)
class Datagram:
    data: bytes
    fds: list[int]  # received fds, now owned by the receiver
    truncated: bool  # MSG_TRUNC or MSG_CTRUNC: the message is unusable


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return fds


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SeqpacketChannel:
    """A non-blocking `SOCK_SEQPACKET` socket: whole datagrams in and out, fds as `SCM_RIGHTS`.

    Built on `add_reader`/`add_writer`, so it works on asyncio's loop and on uvloop (neither offers
    `sock_recvmsg`). `close()` wakes any waiting `recv`/`send` with `ZdsError("closed")`.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._waiters: set[asyncio.Future[None]] = set()
        self.closed = False

    @classmethod
    async def connect(cls, path: str) -> SeqpacketChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def recv(self) -> Datagram | None:
        """The next datagram, or None once the peer has closed."""
        while True:
            self._check_open()
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    MAX_MESSAGE_SIZE, socket.CMSG_SPACE(MAX_RECEIVED_FDS * array("i").itemsize),
                    socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as e:
                raise ZdsError("disconnected", f"receive failed: {e.strerror or e}") from None
            fds = _fds_from(ancdata)
            if not data and not fds:
                return None  # every ZDS message encodes to at least two bytes, so empty means EOF
            return Datagram(data, fds, truncated=bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)))

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds).tobytes())] if fds else []
        while True:
            self._check_open()
            try:
                self._sock.sendmsg([data], rights)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
            except OSError as e:
                raise ZdsError("disconnected", f"send failed: {e.strerror or e}") from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self._waiters:
            loop = fut.get_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
            if not fut.done():
                fut.set_exception(ZdsError("closed", "connection closed"))
        self._sock.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ZdsError("closed", "connection closed")

    async def _wait(self, *, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
        add(self._fd, _wake, fut)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if not self.closed:
                remove(self._fd)
