"""Upstream connection pools with Envoy's circuit breaking (DestinationRule `connectionPool`).

One `UpstreamPool` per upstream endpoint holds its HTTP/1.1 and HTTP/2 connections; the integrator gives it
a dialer that opens the transport (an HBONE tunnel to `podIP:15008`). The circuit-breaker counters live in
a `ClusterLimits` shared by every endpoint pool of one cluster (service + subset), as in Envoy:
- `max_connections`: connections open or being opened, cluster-wide; as in Envoy
  (`ConnPoolImplBase::tryCreateNewConnection`) an endpoint pool with no connection of the protocol at all
  (ready, busy or connecting) dials anyway past it, counted in `cx_overflows` (upstream_cx_overflow), so a
  request balanced to that endpoint is not left waiting for another endpoint's idle connection;
- `http1_max_pending_requests`: requests waiting for a connection (HTTP/2 ones too, as in Envoy);
- `http2_max_requests`: requests in flight, cluster-wide, whatever the protocol (Envoy's max_requests);
beyond them `request` raises `Overflow` (the proxy answers 503, flag UO).

HTTP/1.1: one request per connection at a time; a connection goes back to the pool (or straight to the
longest-waiting request) only when its exchange is over: response body read to its end, request body sent,
keep-alive. HTTP/2: requests share a connection up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS; requests
arriving while the first connection is dialled wait for it instead of dialling their own.
`max_requests_per_connection` retires a connection after that many requests. Idle connections close after
`idle_timeout`. A dial failure raises `ConnectFailure` (UF); a connection breaking before the response
`UpstreamReset` (UC). A request the upstream provably did not process (an idle HTTP/1.1 connection the
peer had closed, HTTP/2 REFUSED_STREAM or GOAWAY) is re-sent once on another connection when its body is
in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ambient.aio import OwnedTasks
from waypoint.http.errors import ConnectFailure, Overflow, UpstreamReset
from waypoint.http.http1 import Http1ClientConnection
from waypoint.http.http2 import Http2ClientConnection
from waypoint.http.message import DEFAULT_LIMITS, Body, BytesBody, ByteStream, HttpLimits, RequestHead, ResponseHead

log = logging.getLogger("waypoint.http.pool")

UNLIMITED = 2**32 - 1  # Istio's default for every connectionPool counter (maxConnections, http1MaxPending...)
POOL_IDLE_TIMEOUT = 3600.0  # seconds; Istio's connectionPool.http.idleTimeout default (1 h)
CONNECT_TIMEOUT = 10.0  # seconds; Istio's connectionPool.tcp.connectTimeout default

Dialer = Callable[[], Awaitable[ByteStream]]
Connection = Http1ClientConnection | Http2ClientConnection


class PoolSettings(Protocol):
    """What `ConnectionPoolLimits.from_policy` reads (the routing model's ConnectionPoolSettings; None =
    unlimited)."""

    @property
    def max_connections(self) -> int | None: ...
    @property
    def http1_max_pending_requests(self) -> int | None: ...
    @property
    def http2_max_requests(self) -> int | None: ...
    @property
    def max_requests_per_connection(self) -> int | None: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ConnectionPoolLimits:
    """DestinationRule `trafficPolicy.connectionPool`, Istio's defaults. `max_requests_per_connection` 0
    means unlimited."""

    max_connections: int = UNLIMITED
    http1_max_pending_requests: int = UNLIMITED
    http2_max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0
    idle_timeout: float = POOL_IDLE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT

    @classmethod
    def from_policy(cls, settings: PoolSettings) -> ConnectionPoolLimits:
        def limit(value: int | None) -> int:
            return UNLIMITED if value is None else value

        return cls(limit(settings.max_connections), limit(settings.http1_max_pending_requests),
                   limit(settings.http2_max_requests), settings.max_requests_per_connection or 0,
                   settings.idle_timeout, settings.connect_timeout)


class ClusterLimits:
    """The circuit-breaker counters of one cluster, shared by its endpoint pools. When a connection slot
    frees, the longest-waiting request of a pool that waits for one is woken."""

    def __init__(self, limits: ConnectionPoolLimits | None = None) -> None:
        self.limits = limits or ConnectionPoolLimits()
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.overflows = 0  # requests refused (for the proxy's stats)
        self.cx_overflows = 0  # maxConnections reached when a request wanted a new connection (upstream_cx_overflow)
        self._pools: list[UpstreamPool] = []

    def update(self, limits: ConnectionPoolLimits) -> None:
        """New limits (a changed DestinationRule); the counters carry over, and requests waiting for a
        connection look again in case there is now room."""
        self.limits = limits
        for pool in self._pools:
            while pool.wake_one():
                pass

    def attach(self, pool: UpstreamPool) -> None:
        self._pools.append(pool)

    def detach(self, pool: UpstreamPool) -> None:
        if pool in self._pools:
            self._pools.remove(pool)

    def connection_closed(self) -> None:
        self.connections -= 1
        for pool in self._pools:
            if pool.wake_one():
                return

    def overflow(self, what: str) -> Overflow:
        self.overflows += 1
        return Overflow(f"upstream overflow: {what}")


class UpstreamPool:
    """Connections to one upstream endpoint. `limits`: the cluster's shared `ClusterLimits`, or
    `ConnectionPoolLimits` for a pool of its own. `request(head, body, protocol)` returns the response head
    and body; read the body to its end or `aclose()` it, which is what gives the connection back."""

    def __init__(self, dialer: Dialer, limits: ClusterLimits | ConnectionPoolLimits | None = None, *,
                 http_limits: HttpLimits = DEFAULT_LIMITS, name: str = "upstream") -> None:
        self.name = name
        self._dialer = dialer
        self._cluster = limits if isinstance(limits, ClusterLimits) else ClusterLimits(limits)
        self._http_limits = http_limits
        self._loop = asyncio.get_running_loop()
        self._tasks = OwnedTasks(log)
        self._h1_idle: list[Http1ClientConnection] = []  # a stack: the warmest connection is reused first
        self._h1_busy: set[Http1ClientConnection] = set()
        self._h1_waiters: deque[asyncio.Future[Http1ClientConnection | None]] = deque()
        self._h1_connecting = 0
        self._h2: list[Http2ClientConnection] = []
        self._h2_dialing: asyncio.Future[Http2ClientConnection] | None = None
        self._h2_waiters: deque[asyncio.Future[None]] = deque()
        self._idle_since: dict[Connection, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._cluster.attach(self)

    @property
    def connections(self) -> int:
        """Open connections of this endpoint (both protocols)."""
        return len(self._h1_idle) + len(self._h1_busy) + len(self._h2)

    @property
    def idle_connections(self) -> int:
        return len(self._h1_idle) + sum(1 for conn in self._h2 if conn.active == 0)

    # -- requests --------------------------------------------------------------------------------
    @property
    def _limits(self) -> ConnectionPoolLimits:
        return self._cluster.limits  # read each time: ClusterLimits.update may replace them

    async def request(self, head: RequestHead, body: Body, protocol: str = "HTTP/1.1") -> tuple[ResponseHead, Body]:
        """`protocol`: "HTTP/1.1" or "HTTP/2" (what to speak upstream)."""
        if protocol not in ("HTTP/1.1", "HTTP/2"):
            raise ValueError(f"upstream protocol must be HTTP/1.1 or HTTP/2, not {protocol!r}")
        if self._closed:
            raise ConnectFailure(f"the connection pool of {self.name} is closed", "pool_closed")
        cluster = self._cluster
        if cluster.requests >= cluster.limits.http2_max_requests:
            raise cluster.overflow(f"{cluster.requests} requests in flight (http2MaxRequests "
                                   f"{cluster.limits.http2_max_requests})")
        cluster.requests += 1
        replayable = isinstance(body, BytesBody) and body.unread  # an in-memory body keeps its bytes
        try:
            try:
                return await self._attempt(head, body, protocol)
            except UpstreamReset as exc:
                if not exc.retryable or not replayable:
                    raise
                log.debug("re-sending %s %s to %s on another connection: %s", head.method, head.path_only,
                          self.name, exc)
            assert isinstance(body, BytesBody)
            return await self._attempt(head, body.replay(), protocol)
        except BaseException:
            cluster.requests -= 1
            raise

    async def _attempt(self, head: RequestHead, body: Body, protocol: str) -> tuple[ResponseHead, Body]:
        """One try on one connection. The cluster's request count is released when the exchange is over,
        which for a returned response is when its body is done."""
        conn: Connection = await (self._acquire_h2() if protocol == "HTTP/2" else self._acquire_h1())
        returned = False
        over = False

        def on_done() -> None:
            nonlocal over
            if over:
                return
            over = True
            self._release(conn)
            if returned:
                self._cluster.requests -= 1

        try:
            response = await conn.request(head, body, on_done=on_done)
        except BaseException:
            on_done()  # idempotent: the connection may have reported it already
            raise
        returned = True
        if over:  # the exchange ended inside request() (an empty response body)
            self._cluster.requests -= 1
        return response

    # -- acquiring connections -------------------------------------------------------------------
    async def _acquire_h1(self) -> Http1ClientConnection:
        cluster = self._cluster
        pending = False
        try:
            while True:
                conn = self._idle_h1()
                if conn is not None:
                    return conn
                if self._may_dial(self._has_h1(), count=not pending):
                    return await self._dial_h1()
                waiter: asyncio.Future[Http1ClientConnection | None] = self._loop.create_future()
                if pending:
                    self._h1_waiters.appendleft(waiter)  # woken for nothing: keep our place
                else:
                    pending = self._enter_pending()
                    self._h1_waiters.append(waiter)
                try:
                    handed = await waiter
                except asyncio.CancelledError:
                    handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
                    if handed is not None:
                        self._release(handed)  # handed over just as we were cancelled: pass it on
                    raise
                if handed is not None:
                    return handed
        finally:
            if pending:
                cluster.pending -= 1

    def _idle_h1(self) -> Http1ClientConnection | None:
        idle = self._h1_idle
        while idle:
            conn = idle.pop()
            self._idle_since.pop(conn, None)
            if conn.closed or not conn.available or conn.at_eof:
                self._forget(conn)
                continue
            self._h1_busy.add(conn)
            return conn
        return None

    async def _acquire_h2(self) -> Http2ClientConnection:
        cluster = self._cluster
        pending = False
        try:
            while True:
                conn = self._available_h2()
                if conn is not None:
                    return conn
                dialing = self._h2_dialing
                if dialing is None and self._may_dial(self._has_h2(), count=not pending):
                    return await self._dial_h2()
                if dialing is not None:
                    pending = pending or self._enter_pending()
                    await asyncio.shield(dialing)  # its failure is ours too (ConnectFailure)
                    continue
                waiter: asyncio.Future[None] = self._loop.create_future()
                if pending:
                    self._h2_waiters.appendleft(waiter)
                else:
                    pending = self._enter_pending()
                    self._h2_waiters.append(waiter)
                await waiter
        finally:
            if pending:
                cluster.pending -= 1

    def _available_h2(self) -> Http2ClientConnection | None:
        limit = self._limits.max_requests_per_connection
        for conn in self._h2:
            if conn.available and (not limit or conn.requests < limit):
                self._idle_since.pop(conn, None)
                return conn
        return None

    def _may_dial(self, has_connections: bool, count: bool) -> bool:
        """A request may open a connection: below maxConnections, or past it when this pool has no
        connection of the protocol (Envoy's `tryCreateNewConnection`); reaching the limit is counted once per
        request (`count`) as upstream_cx_overflow."""
        cluster = self._cluster
        if cluster.connections < cluster.limits.max_connections:
            return True
        if count:
            cluster.cx_overflows += 1
        return not has_connections

    def _has_h1(self) -> bool:
        return bool(self._h1_idle or self._h1_busy or self._h1_connecting)

    def _has_h2(self) -> bool:
        """A connection that is or will be usable (one draining after GOAWAY or its last request is not)."""
        limit = self._limits.max_requests_per_connection
        return self._h2_dialing is not None or any(
            not conn.closed and conn.goaway_received is None and not (limit and conn.requests >= limit)
            for conn in self._h2)

    def _connection_gone(self) -> None:
        """One of this pool's connections closed: its slot goes to the cluster."""
        self._cluster.connection_closed()
        self._wake_if_empty()

    def _wake_if_empty(self) -> None:
        """A request waiting here with no connection of its protocol left is woken to dial its own."""
        if self._h1_waiters and not self._has_h1():
            _wake(self._h1_waiters)
        if self._h2_waiters and not self._has_h2():
            _wake(self._h2_waiters)

    def _enter_pending(self) -> bool:
        cluster = self._cluster
        if cluster.pending >= cluster.limits.http1_max_pending_requests:
            raise cluster.overflow(f"{cluster.connections} connections (maxConnections "
                                   f"{cluster.limits.max_connections}) busy and {cluster.pending} requests pending "
                                   f"(http1MaxPendingRequests {cluster.limits.http1_max_pending_requests})")
        cluster.pending += 1
        return True

    async def _dial(self) -> ByteStream:
        cluster = self._cluster
        cluster.connections += 1
        try:
            async with asyncio.timeout(self._limits.connect_timeout):
                return await self._dialer()
        except BaseException as exc:
            cluster.connection_closed()  # the caller wakes this pool's waiters (_wake_if_empty)
            if isinstance(exc, TimeoutError):
                raise ConnectFailure(f"connecting to {self.name} timed out after {self._limits.connect_timeout:g}s",
                                     "connect_timeout") from exc
            if isinstance(exc, Exception):
                raise ConnectFailure(f"cannot connect to {self.name}: {exc}") from exc
            raise

    async def _dial_h1(self) -> Http1ClientConnection:
        self._h1_connecting += 1
        try:
            stream = await self._dial()
        except BaseException:
            self._h1_connecting -= 1
            self._wake_if_empty()
            raise
        self._h1_connecting -= 1
        conn = Http1ClientConnection(stream, limits=self._http_limits)
        if self._closed:
            await conn.close()
            self._cluster.connection_closed()
            raise ConnectFailure(f"the connection pool of {self.name} is closed", "pool_closed")
        self._h1_busy.add(conn)
        return conn

    async def _dial_h2(self) -> Http2ClientConnection:
        dialing: asyncio.Future[Http2ClientConnection] = self._loop.create_future()
        self._h2_dialing = dialing
        try:
            stream = await self._dial()
        except BaseException as exc:
            dialing.set_exception(exc if isinstance(exc, ConnectFailure) else
                                  ConnectFailure(f"connecting to {self.name} was cancelled", "connect_cancelled"))
            dialing.exception()  # retrieved: nobody may be waiting
            self._h2_dialing = None
            self._wake_if_empty()
            raise
        self._h2_dialing = None
        conn = Http2ClientConnection(stream, limits=self._http_limits)
        conn.on_close = lambda: self._h2_closed(conn)
        self._h2.append(conn)
        dialing.set_result(conn)
        return conn

    # -- giving back -----------------------------------------------------------------------------
    def _release(self, conn: Connection) -> None:
        """An exchange on `conn` is over (called once per request)."""
        if isinstance(conn, Http2ClientConnection):
            self._release_h2(conn)
            return
        if conn not in self._h1_busy:
            return  # the pool was closed meanwhile and has accounted for it
        limit = self._limits.max_requests_per_connection
        if conn.available and not self._closed and not (limit and conn.requests >= limit):
            while self._h1_waiters:
                waiter = self._h1_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)  # stays in _h1_busy
                    return
            self._h1_busy.discard(conn)
            self._h1_idle.append(conn)
            self._idle_since[conn] = self._loop.time()
            self._schedule_sweep()
            return
        self._h1_busy.discard(conn)
        self._retire(conn)

    def _release_h2(self, conn: Http2ClientConnection) -> None:
        limit = self._limits.max_requests_per_connection
        if conn.closed:
            return  # _h2_closed does the bookkeeping
        if limit and conn.requests >= limit:
            if conn.active == 0:
                self._retire(conn)
            return
        if conn.active == 0:
            self._idle_since[conn] = self._loop.time()
            self._schedule_sweep()
        _wake(self._h2_waiters)

    def _h2_closed(self, conn: Http2ClientConnection) -> None:
        if conn in self._h2:
            self._h2.remove(conn)
            self._idle_since.pop(conn, None)
            self._connection_gone()

    def _retire(self, conn: Connection) -> None:
        """Close `conn` and give its slot back."""
        if isinstance(conn, Http2ClientConnection):
            self._tasks.spawn(conn.close(), f"close {conn!r}")  # on_close releases the slot
            return
        self._forget(conn)

    def _forget(self, conn: Http1ClientConnection) -> None:
        self._idle_since.pop(conn, None)
        if not conn.closed:
            self._tasks.spawn(conn.close(), f"close {conn!r}")
        self._connection_gone()

    def wake_one(self) -> bool:
        """A connection slot freed: let the longest-waiting request look again. False if none waits here."""
        return _wake(self._h1_waiters) or _wake(self._h2_waiters)

    # -- idle connections ------------------------------------------------------------------------
    def _schedule_sweep(self) -> None:
        if self._sweep is None and self._idle_since:
            due = min(self._idle_since.values()) + self._limits.idle_timeout
            self._sweep = self._loop.call_at(due, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep = None
        deadline = self._loop.time() - self._limits.idle_timeout + 1e-3
        for conn, since in list(self._idle_since.items()):
            if since > deadline:
                continue
            del self._idle_since[conn]
            if isinstance(conn, Http2ClientConnection):
                if conn.active == 0:
                    log.debug("closing %r to %s: idle for %gs", conn, self.name, self._limits.idle_timeout)
                    self._retire(conn)
            elif conn in self._h1_idle:
                log.debug("closing %r to %s: idle for %gs", conn, self.name, self._limits.idle_timeout)
                self._h1_idle.remove(conn)
                self._forget(conn)
        self._schedule_sweep()

    async def close(self) -> None:
        """Close every connection; waiting requests fail with ConnectFailure, in-flight ones are cut."""
        self._closed = True
        self._cluster.detach(self)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        error = ConnectFailure(f"the connection pool of {self.name} is closed", "pool_closed")
        for waiters in (self._h1_waiters, self._h2_waiters):
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
        h1 = [*self._h1_idle, *self._h1_busy]
        self._h1_idle.clear()
        self._h1_busy.clear()
        self._idle_since.clear()
        for conn in h1:
            self._cluster.connection_closed()
            await conn.close()
        for h2 in list(self._h2):
            await h2.close()  # on_close gives the slot back
        await self._tasks.cancel_all()

    def __repr__(self) -> str:
        return (f"<UpstreamPool {self.name} h1 idle={len(self._h1_idle)} busy={len(self._h1_busy)} "
                f"h2={len(self._h2)}>")


def _wake(waiters: deque[asyncio.Future[Http1ClientConnection | None]] | deque[asyncio.Future[None]]) -> bool:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False
