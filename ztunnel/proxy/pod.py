"""One enrolled pod: its network namespace (entered once, on a parked thread), its four listeners created
there (15001, 15006, 15008, 15053 — PROTOCOLS §1), and the connections it owns. Removing the pod closes
the listeners and gives open connections a deadline (drain)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ambient.aio import OwnedTasks
from ambient.netns import NetnsExecutor
from ambient.proto import workload_pb2
from ztunnel.config import DNS_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_PORT, OUTBOUND_PORT
from ztunnel.proxy import sockets

log = logging.getLogger("ztunnel.pod")

AcceptHandler = Callable[["PodProxy", socket.socket], Awaitable[None]]


@dataclass
class PodListeners:
    outbound: socket.socket
    inbound_plaintext: socket.socket
    inbound: socket.socket
    dns_udp: socket.socket | None
    dns_tcp: socket.socket | None

    def all(self) -> list[socket.socket]:
        return [s for s in (self.outbound, self.inbound_plaintext, self.inbound, self.dns_udp, self.dns_tcp) if s]


def open_listeners(dns: bool, ipv6: bool) -> PodListeners:
    """Runs on the pod's netns thread. Dual-stack `[::]` when the pod has IPv6, else `0.0.0.0`."""
    any_host = "::" if ipv6 else "0.0.0.0"
    opened: list[socket.socket] = []
    try:
        outbound = sockets.listener(any_host, OUTBOUND_PORT)
        opened.append(outbound)
        plaintext = sockets.listener(any_host, INBOUND_PLAINTEXT_PORT)
        opened.append(plaintext)
        inbound = sockets.listener(any_host, INBOUND_PORT)
        opened.append(inbound)
        dns_udp = dns_tcp = None
        if dns:
            dns_udp = sockets.listener("127.0.0.1", DNS_PORT, socket.SOCK_DGRAM)
            opened.append(dns_udp)
            dns_tcp = sockets.listener("127.0.0.1", DNS_PORT)
            opened.append(dns_tcp)
        return PodListeners(outbound, plaintext, inbound, dns_udp, dns_tcp)
    except OSError:
        for sock in opened:
            sock.close()
        raise


@dataclass(eq=False)
class PodProxy:
    uid: str
    name: str
    namespace: str
    service_account: str
    netns: NetnsExecutor
    workload: workload_pb2.Workload | None = None
    listeners: PodListeners | None = None
    inbound: dict[int, Any] = field(default_factory=dict)  # open connections for the admin dump
    outbound: dict[int, Any] = field(default_factory=dict)
    tasks: OwnedTasks = field(default_factory=lambda: OwnedTasks(log))
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def ips(self) -> list[str]:
        from ipaddress import ip_address

        return [str(ip_address(a)) for a in self.workload.addresses] if self.workload else []

    async def start(self, handlers: dict[str, AcceptHandler], dns: bool,
                    extra: Callable[[PodProxy], Awaitable[None]] | None = None) -> None:
        """Open the listeners in the pod netns and start accepting; `handlers` keyed outbound/plaintext."""
        ipv6 = any(":" in ip for ip in self.ips)
        self.listeners = await self.netns.call(lambda: open_listeners(dns, ipv6))
        loop = asyncio.get_running_loop()
        for key, sock in (("outbound", self.listeners.outbound), ("plaintext", self.listeners.inbound_plaintext)):
            handler = handlers[key]
            self.tasks.spawn(self._accept_loop(loop, sock, handler), name=f"{self.name}-{key}")
        if extra is not None:
            await extra(self)

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                           handler: AcceptHandler) -> None:
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if sock.fileno() < 0:
                    return
                log.warning("pod %s/%s: accept failed: %s", self.namespace, self.name, exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._handle(handler, conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    async def _handle(self, handler: AcceptHandler, conn: socket.socket) -> None:
        try:
            await handler(self, conn)
        except Exception:
            log.exception("pod %s/%s: connection handler failed", self.namespace, self.name)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    async def stop(self, deadline: float) -> None:
        """Stop accepting; give open connections `deadline` seconds, then cancel them."""
        await self.tasks.cancel_all()
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer()
        for server in self.servers:
            server.close()
        if self.listeners:
            for sock in self.listeners.all():
                sock.close()
        if self.connections:
            _, pending = await asyncio.wait(set(self.connections), timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.netns.close()
