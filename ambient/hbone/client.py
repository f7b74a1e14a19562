"""The HBONE client and its connection pool (PROTOCOLS.md §6).

`HboneClient.connect(...)` returns an `HboneStream` once the server has answered the CONNECT with 200, or
raises an `HboneError` (`ConnectRejected` with the status for 400/401/503, `ConnectError` for TCP/TLS/
identity failures, `StreamError` when the connection broke).

Pooling: connections are shared by key (source identity, expected destination identities, source IP,
destination ip:port); a connection carries at most min(100, peer's SETTINGS_MAX_CONCURRENT_STREAMS)
streams, then another is opened; callers that arrive while a connection is being set up wait for it and
share it; an unused connection is closed after 5 minutes. Which connection a stream goes on is decided by
`PoolBook`, a pure class; `HboneClient` is the asyncio shell around it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from h2.exceptions import H2Error

from ambient.aio import OwnedTasks
from ambient.hbone.connection import HboneConfig, HboneConnection
from ambient.hbone.errors import ConnectError, ConnectRejected, HboneError, StreamError
from ambient.hbone.headers import Block, format_authority, request_block
from ambient.hbone.stream import HboneStream
from ambient.hbone.tls import ALPN_H2, TlsContexts, check_server_identity, peer_uri_sans
from ambient.identity.certs import WorkloadCertificate

log = logging.getLogger("ambient.hbone.client")

# Makes the unconnected socket; may be async (ztunnel creates it on a pod's netns thread without
# blocking the event loop).
SocketFactory = Callable[[], socket.socket | Awaitable[socket.socket]]
MAX_ATTEMPTS = 3  # a stream refused by a draining or over-full connection is retried on another, this often

H = TypeVar("H")


# -- the pure pool -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolKey:
    """Streams with equal keys may share a connection."""

    src_identity: str
    dst_identities: frozenset[str]
    src_ip: str | None
    dst: tuple[str, int]
    # Which certificate of that identity: after a rotation new streams open a connection presenting the new
    # one, while tunnels on the old connections finish undisturbed and the idle sweep closes them.
    src_cert: float = 0.0


@dataclass(eq=False)
class PoolSlot(Generic[H]):
    """One pooled connection as the book sees it; `handle` is whatever the shell attaches."""

    key: PoolKey
    capacity: int
    in_use: int = 0
    idle_since: float | None = None
    retired: bool = False
    handle: H | None = None


class PoolBook(Generic[H]):
    """Which connection a new stream goes on. Pure: callers pass the time and carry out the answers."""

    def __init__(self, max_streams: int, idle_timeout: float) -> None:
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._slots: dict[PoolKey, list[PoolSlot[H]]] = {}

    def checkout(self, key: PoolKey, now: float) -> tuple[PoolSlot[H], bool]:
        """Reserve a stream: on the oldest connection of `key` with room (also one still being set up), or
        on a new slot (→ True: the caller must open its connection)."""
        slots = self._slots.setdefault(key, [])
        for slot in slots:
            if slot.in_use < slot.capacity:
                slot.in_use += 1
                slot.idle_since = None
                return slot, False
        slot = PoolSlot[H](key, self.max_streams, in_use=1)
        slots.append(slot)
        return slot, True

    def release(self, slot: PoolSlot[H], now: float) -> bool:
        """A stream is done; → True when the connection has become idle (check again after the timeout)."""
        slot.in_use = max(0, slot.in_use - 1)
        if slot.in_use == 0 and not slot.retired:
            slot.idle_since = now
            return True
        return False

    def peer_max_streams(self, slot: PoolSlot[H], value: int) -> None:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS: capacity is min(our cap, theirs)."""
        slot.capacity = max(0, min(self.max_streams, value))

    def retire(self, slot: PoolSlot[H]) -> None:
        """No new streams on this connection (closed, draining, failed to connect)."""
        slot.retired = True
        slot.idle_since = None
        slots = self._slots.get(slot.key)
        if slots is not None and slot in slots:
            slots.remove(slot)
            if not slots:
                del self._slots[slot.key]

    def evict_idle(self, now: float) -> list[PoolSlot[H]]:
        """Retire and return the connections unused for `idle_timeout` (the caller closes them)."""
        expired = [slot for slots in self._slots.values() for slot in slots
                   if slot.idle_since is not None and now - slot.idle_since >= self.idle_timeout]
        for slot in expired:
            self.retire(slot)
        return expired

    def slots(self, key: PoolKey | None = None) -> list[PoolSlot[H]]:
        if key is not None:
            return list(self._slots.get(key, ()))
        return [slot for slots in self._slots.values() for slot in slots]


# -- the asyncio shell ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PooledConnection:
    """What `HboneClient.connections()` reports about one pooled connection."""

    key: PoolKey
    streams: int
    capacity: int
    peer_identity: str | None
    local_addr: tuple[str, int]
    idle: bool


class _Handle:
    __slots__ = ("conn", "ready")

    def __init__(self, ready: asyncio.Future[ClientConnection]) -> None:
        self.ready = ready
        self.conn: ClientConnection | None = None


class ClientConnection(HboneConnection):
    """The client end: checks the server's identity before sending a byte and reports to the pool."""

    def __init__(self, client: HboneClient, slot: PoolSlot[_Handle], expected: frozenset[str]) -> None:
        super().__init__(client.config, client_side=True)
        self._client = client
        self._slot = slot
        self._expected = expected
        self.peer_identity: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        try:
            self.peer_identity = self._verify(transport)
        except ConnectError as exc:
            self.error = exc
            self.transport = transport
            transport.abort()  # nothing was sent: the server learns nothing from us
            return
        super().connection_made(transport)

    def _verify(self, transport: asyncio.Transport) -> str:
        """ALPN h2 and a SAN we expect, checked before we send a byte."""
        ssl_object = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername")
        where = format_authority(str(peer[0]), int(peer[1])) if peer else "server"
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
            raise ConnectError(f"{where} did not negotiate HTTP/2 (ALPN h2): is this port an HBONE server "
                               "(15008)?", "alpn")
        return check_server_identity(peer_uri_sans(ssl_object.getpeercert()), self._expected, where)

    def start_stream(self, authority: str, block: Block, headers: dict[str, str]) -> HboneStream:
        """Send the CONNECT head; the stream is registered (and released to the pool when it finishes)."""
        if self.is_closed or self.draining:
            raise StreamError(f"HBONE connection to {self.peer} is closing", "goaway", retryable=True)
        h2 = self._h2
        try:
            stream_id = h2.get_next_available_stream_id()
            h2.send_headers(stream_id, block)
        except H2Error as exc:  # TooManyStreamsError, NoAvailableStreamIDError: use another connection
            raise StreamError(f"cannot open a stream to {self.peer}: {exc}", "refused", retryable=True) from None
        stream = HboneStream(self, stream_id, authority, headers, self.peer_identity)
        self.streams[stream_id] = stream
        self.schedule_flush()
        return stream

    def _on_stream_finished(self, stream: HboneStream) -> None:
        self._client._release(self._slot)

    def _on_peer_max_streams(self, value: int) -> None:
        self._client._book.peer_max_streams(self._slot, value)

    def _on_goaway(self, error_code: int, last_stream_id: int) -> None:
        self._client._book.retire(self._slot)
        super()._on_goaway(error_code, last_stream_id)

    def _on_closed(self) -> None:
        self._client._book.retire(self._slot)


class HboneClient:
    """Opens HBONE tunnels over pooled mTLS HTTP/2 connections. One per process (or per data-path loop)."""

    def __init__(self, config: HboneConfig | None = None, contexts: TlsContexts | None = None) -> None:
        self.config = config or HboneConfig()
        self._contexts = contexts or TlsContexts()
        self._book: PoolBook[_Handle] = PoolBook(self.config.max_streams_per_connection,
                                                 self.config.pool_idle_timeout)
        self._tasks = OwnedTasks(log)
        self._sweep: asyncio.TimerHandle | None = None

    async def connect(self, src_cert: WorkloadCertificate, dst: tuple[str, int], authority: str,
                      expected_identities: Iterable[str], headers: Mapping[str, str] | None = None,
                      local_bind: str | None = None, socket_factory: SocketFactory | None = None) -> HboneStream:
        """A tunnel to `authority` through the HBONE server at `dst` (ip, 15008), presenting `src_cert`.
        The server must present one of `expected_identities`. `headers` (baggage, forwarded, traceparent)
        are sent as given. `socket_factory` makes the unconnected socket (namespaces, marks, binding);
        otherwise a socket bound to `local_bind` (if given) is used."""
        extra = dict(headers or {})
        block = request_block(authority, extra)
        expected = frozenset(expected_identities)
        key = PoolKey(str(src_cert.identity), expected, local_bind, (str(dst[0]), int(dst[1])), src_cert.not_before)
        loop = asyncio.get_running_loop()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            slot, new = self._book.checkout(key, loop.time())
            if new:
                slot.handle = _Handle(loop.create_future())
                self._tasks.spawn(self._establish(slot, src_cert, socket_factory),
                                  name=f"hbone-connect {format_authority(*key.dst)}")
            assert slot.handle is not None
            registered = False
            try:
                conn = await asyncio.shield(slot.handle.ready)
                stream = conn.start_stream(authority, block, extra)
                registered = True
                return await self._await_response(conn, stream)
            except StreamError as exc:
                if not exc.retryable or attempt == MAX_ATTEMPTS:
                    raise
                log.debug("retrying CONNECT %s on another connection: %s", authority, exc)
            finally:
                if not registered:
                    self._release(slot)
        raise AssertionError("unreachable")

    async def _await_response(self, conn: ClientConnection, stream: HboneStream) -> HboneStream:
        try:
            await stream._expect_response()
        except asyncio.CancelledError:
            stream.abort()
            raise
        if stream.status != 200:
            stream.abort()
            raise ConnectRejected(stream.status, stream.authority, conn.peer)
        return stream

    async def _establish(self, slot: PoolSlot[_Handle], cert: WorkloadCertificate,
                         socket_factory: SocketFactory | None) -> None:
        assert slot.handle is not None
        ready = slot.handle.ready
        where = format_authority(*slot.key.dst)
        try:
            conn = await self._dial(slot, cert, socket_factory)
        except asyncio.CancelledError:
            self._book.retire(slot)
            ready.set_exception(ConnectError(f"connection to {where} abandoned: the HBONE client is closing",
                                             "client_closed"))
            ready.exception()
            raise
        except Exception as exc:
            self._book.retire(slot)
            if not isinstance(exc, HboneError):
                log.exception("HBONE connection to %s failed unexpectedly", where)
                exc = ConnectError(f"connection to {where} failed: {exc!r}", "connect_failed")
            ready.set_exception(exc)
            ready.exception()  # every waiter sees it; none must also be logged as unretrieved
            log.debug("HBONE connection to %s failed: %s", where, exc)
            return
        slot.handle.conn = conn
        ready.set_result(conn)
        log.debug("HBONE connection to %s (%s) established", where, conn.peer_identity)

    async def _dial(self, slot: PoolSlot[_Handle], cert: WorkloadCertificate,
                    socket_factory: SocketFactory | None) -> ClientConnection:
        loop = asyncio.get_running_loop()
        key = slot.key
        where = format_authority(*key.dst)
        ctx = self._contexts.client(cert)
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                if socket_factory is not None:
                    made = socket_factory()
                    sock = await made if inspect.isawaitable(made) else made
                else:
                    sock = socket.socket(socket.AF_INET6 if ":" in key.dst[0] else socket.AF_INET,
                                         socket.SOCK_STREAM)
                    if key.src_ip is not None:
                        sock.bind((key.src_ip, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, key.dst)
                _, conn = await loop.create_connection(
                    lambda: ClientConnection(self, slot, key.dst_identities), sock=sock, ssl=ctx,
                    server_hostname="", ssl_handshake_timeout=self.config.connect_timeout)
        except BaseException as exc:
            if sock is not None:
                sock.close()  # a no-op when a failed transport already closed (or detached) it
            raise _dial_error(exc, where, self.config.connect_timeout) from None
        assert isinstance(conn, ClientConnection)
        if conn.error is not None:
            raise conn.error
        return conn

    def _release(self, slot: PoolSlot[_Handle]) -> None:
        loop = asyncio.get_running_loop()
        if self._book.release(slot, loop.time()) and self._sweep is None:
            self._sweep = loop.call_later(self.config.pool_idle_timeout, self._evict_idle)

    def _evict_idle(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweep = None
        for slot in self._book.evict_idle(loop.time()):
            if slot.handle is not None and slot.handle.conn is not None:
                log.debug("closing idle HBONE connection to %s", slot.handle.conn.peer)
                slot.handle.conn.close()
        idle = [s.idle_since for s in self._book.slots() if s.idle_since is not None]
        if idle:
            delay = max(0.0, min(idle) + self.config.pool_idle_timeout - loop.time())
            self._sweep = loop.call_later(delay, self._evict_idle)

    def connections(self) -> list[PooledConnection]:
        """The pooled connections that take new streams (for admin/config dumps and tests)."""
        out = []
        for slot in self._book.slots():
            conn = slot.handle.conn if slot.handle is not None else None
            if conn is not None:
                out.append(PooledConnection(slot.key, len(conn.streams), slot.capacity, conn.peer_identity,
                                            conn.local_addr, slot.idle_since is not None))
        return out

    async def close(self) -> None:
        """Close every pooled connection (GOAWAY) and stop connection attempts in progress."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        await self._tasks.cancel_all()
        closing = []
        for slot in self._book.slots():
            self._book.retire(slot)
            if slot.handle is not None and slot.handle.conn is not None:
                slot.handle.conn.close()
                closing.append(slot.handle.conn.closed)
        if closing:
            await asyncio.wait(closing, timeout=self.config.handshake_timeout)


def _dial_error(exc: BaseException, where: str, timeout: float) -> BaseException:
    """TCP/TLS failures as `ConnectError`s that say what to check; anything else unchanged."""
    if isinstance(exc, TimeoutError):
        return ConnectError(f"connection to {where} timed out after {timeout:g}s, maybe a NetworkPolicy is "
                            "blocking HBONE port 15008", "connect_timeout")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"connection to {where} refused: is ztunnel running on the destination node and "
                            "listening on 15008?", "connect_refused")
    if isinstance(exc, ssl.SSLError):
        return ConnectError(f"TLS handshake with {where} failed: {exc.reason or exc}; both sides need "
                            "certificates from the same mesh root", "tls_handshake")
    if isinstance(exc, OSError):
        return ConnectError(f"connection to {where} failed: {exc.strerror or exc}", "connect_failed")
    return exc
