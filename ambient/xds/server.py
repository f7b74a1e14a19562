"""The delta xDS server: `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`
(PROTOCOLS.md §5), serving `ResourceSource` snapshots to ztunnels and waypoints.

Shape: one debounce task turns bursts of source changes into "publish" events (`run()`); every stream
has a reader task feeding its sans-IO `DeltaStream` and a writer (the RPC coroutine itself) that, when
woken, diffs the latest published snapshot against what that client has. Nothing is queued per push, so
a slow or stuck client costs one blocked write on its own coroutine and later gets the newest state in
one response — it never delays another client.

TLS, ports and the CA live in the control plane, which adds this servicer to its gRPC server.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc

from ambient.proto import discovery_pb2, discovery_pb2_grpc
from ambient.xds.errors import XdsAuthError, XdsError, XdsProtocolError
from ambient.xds.server_state import DeltaStream, RequestKind, RequestOutcome
from ambient.xds.source import ResourceSource
from ambient.xds.types import TYPE_URLS, XdsResource, short_type

log = logging.getLogger("ambient.xds.server")

DEBOUNCE_AFTER = 0.1  # quiet time before a push: istiod's PILOT_DEBOUNCE_AFTER default
DEBOUNCE_MAX = 1.0  # under non-stop churn push at least this often (istiod allows 10 s; we favour freshness)

# Options for the control plane's grpc.aio.server: accept the clients' keepalive pings (every 30 s, see
# client.py) on idle streams instead of answering them with GOAWAY "too_many_pings".
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


@dataclass(frozen=True)
class ServerConfig:
    debounce_after: float = DEBOUNCE_AFTER
    debounce_max: float = DEBOUNCE_MAX
    types: tuple[str, ...] = TYPE_URLS


@dataclass(frozen=True)
class CallMetadata:
    """What a caller presents: `authorization: Bearer <token>` and `clusterid` (PROTOCOLS.md §5)."""

    token: str | None
    cluster_id: str | None
    peer: str


# Returns the caller's identity (for logs); raises XdsAuthError to refuse the stream.
Authenticator = Callable[[CallMetadata], Awaitable[str]]
# Sees every processed request: (node id, outcome). For metrics, tests and benchmarks; must not block.
RequestObserver = Callable[[str, RequestOutcome], None]


def static_token_authenticator(token: str) -> Authenticator:
    """Accept callers that present exactly `token` (the local cluster's bootstrap token)."""
    async def authenticate(call: CallMetadata) -> str:
        if call.token is None or not hmac.compare_digest(call.token.encode(), token.encode()):
            raise XdsAuthError("missing or wrong bearer token in the `authorization` metadata; "
                               "pass the control plane's bootstrap token")
        return f"token@{call.peer}"
    return authenticate


@dataclass(frozen=True)
class ClientInfo:
    """A connected stream, for config dumps and tests."""

    connection: int
    node_id: str
    peer: str
    caller: str  # what the authenticator said about the caller
    pushes: int
    acked: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # type_url → name → version
    nacked: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


class _Connection:
    def __init__(self, number: int, peer: str, caller: str, stream: DeltaStream) -> None:
        self.number, self.peer, self.caller, self.stream = number, peer, caller, stream
        self.wake = asyncio.Event()
        self.error: XdsError | None = None
        self.closed = False
        self.pushes = 0

    @property
    def label(self) -> str:
        return self.stream.node_id or f"{self.peer} (no node id yet)"


class XdsServer(discovery_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, source: ResourceSource, config: ServerConfig | None = None, *,
                 authenticate: Authenticator | None = None, on_request: RequestObserver | None = None) -> None:
        self.source = source
        self.config = config or ServerConfig()
        self._authenticate = authenticate
        self._on_request = on_request
        self._connections: dict[int, _Connection] = {}
        self._numbers = itertools.count(1)
        self._published: dict[str, Mapping[str, XdsResource]] = {}
        self._published_generation = -1
        self._publish()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        discovery_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)  # type: ignore[no-untyped-call]

    @property
    def published_generation(self) -> int:
        """The source generation clients are being brought to (lags the source by the debounce)."""
        return self._published_generation

    def clients(self) -> list[ClientInfo]:
        return [ClientInfo(c.number, c.stream.node_id, c.peer, c.caller, c.pushes,
                           {t: c.stream.acked(t) for t in self.config.types if c.stream.subscribed(t)},
                           {t: c.stream.nacked(t) for t in self.config.types if c.stream.subscribed(t)})
                for c in self._connections.values()]

    # -- publishing --

    async def run(self) -> None:
        """Debounce source changes into pushes, forever. Run it next to the gRPC server."""
        loop = asyncio.get_running_loop()
        seen = self._published_generation
        while True:
            seen = await self.source.wait_changed(seen)
            first = loop.time()
            while (quiet := min(self.config.debounce_after,
                                first + self.config.debounce_max - loop.time())) > 0:
                try:
                    async with asyncio.timeout(quiet):
                        seen = await self.source.wait_changed(seen)
                except TimeoutError:
                    break
            seen = self._publish()

    def _publish(self) -> int:
        generation = self.source.generation
        self._published = {t: self.source.snapshot(t) for t in self.config.types}
        self._published_generation = generation
        for connection in self._connections.values():
            connection.wake.set()
        return generation

    # -- the RPC --

    async def DeltaAggregatedResources(
            self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
            context: grpc.aio.ServicerContext) -> None:
        peer = context.peer() or "unknown peer"
        caller = await self._check_caller(context, peer)
        number = next(self._numbers)
        connection = _Connection(number, peer, caller,
                                 DeltaStream(self.config.types, nonce_prefix=f"{uuid.uuid4().hex[:8]}-"))
        self._connections[number] = connection
        reader = asyncio.create_task(self._read(connection, request_iterator), name=f"xds-read-{number}")
        try:
            await self._write(connection, context)
        finally:
            del self._connections[number]
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("xds: reading from %s failed", connection.label)
            log.info("xds: %s disconnected after %d pushes", connection.label, connection.pushes)

    async def _check_caller(self, context: grpc.aio.ServicerContext, peer: str) -> str:
        if self._authenticate is None:
            return "no authentication"
        metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        authorization = str(metadata.get("authorization", ""))
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else None
        cluster_id = metadata.get("clusterid")
        try:
            return await self._authenticate(CallMetadata(token, str(cluster_id) if cluster_id else None, peer))
        except XdsAuthError as exc:
            log.warning("xds: refused %s: %s", peer, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # abort() raises; this keeps type checkers honest

    async def _read(self, connection: _Connection,
                    requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]) -> None:
        try:
            async for request in requests:
                first = not connection.stream.node_id
                outcome = connection.stream.receive(request)
                if first:
                    log.info("xds: %s connected from %s (%s)", connection.stream.node_id, connection.peer,
                             connection.caller)
                self._log_outcome(connection, outcome)
                self._observe(connection, outcome)
                if outcome.respond:
                    connection.wake.set()
        except XdsProtocolError as exc:
            connection.error = exc
        finally:
            connection.closed = True
            connection.wake.set()

    def _observe(self, connection: _Connection, outcome: RequestOutcome) -> None:
        if self._on_request is None:
            return
        try:
            self._on_request(connection.stream.node_id, outcome)
        except Exception:
            log.exception("xds: request observer failed on %s from %s", outcome.kind, connection.label)

    @staticmethod
    def _log_outcome(connection: _Connection, outcome: RequestOutcome) -> None:
        kind = short_type(outcome.type_url)
        if outcome.kind is RequestKind.NACK:
            rejected = ", ".join(f"{n}@{v}" for n, v in sorted(outcome.versions.items()))
            log.warning("xds: %s NACKed %s response %s (%s): %s; not re-sending until they change",
                        connection.label, kind, outcome.nonce, rejected or "removals only", outcome.error)
        elif outcome.kind is RequestKind.STALE:
            log.debug("xds: %s answered unknown %s nonce %s", connection.label, kind, outcome.nonce)
        elif outcome.kind is not RequestKind.ACK:
            log.debug("xds: %s %s %s", connection.label, outcome.kind, kind)

    async def _write(self, connection: _Connection, context: grpc.aio.ServicerContext) -> None:
        while True:
            await connection.wake.wait()
            connection.wake.clear()
            if connection.error is not None:
                log.warning("xds: closing the stream of %s: %s", connection.label, connection.error)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(connection.error))
            if connection.closed:
                return
            version = str(self._published_generation)
            for type_url in self.config.types:
                response = connection.stream.next_response(type_url, self._published[type_url], version)
                if response is not None:
                    await context.write(response)
                    connection.pushes += 1
