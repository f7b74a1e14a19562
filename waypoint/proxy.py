"""The L7 pipeline: what happens to one request between the downstream codec and the upstream pool.

In order (Istio's filter chain in a waypoint): trace context and request id → JWT (RequestAuthentication;
a bad token is a 401 here) → authorization (DENY, then ALLOW; 403 `RBAC: access denied`) → route
selection (first match) → fault injection (delay, then abort) → redirect / direct response → request header
operations and rewrite → weighted destination → mirrors (fire and forget) → upstream with the route's
timeout and retries: load balancing over the destination's endpoints (subset = pod labels; endpoints ejected
by outlier detection skipped), a pooled connection (circuit breaking: overflow is a 503 `UO`), an HBONE
tunnel to `podIP:15008` → response header operations → telemetry when the response body ends.

L4 traffic (declared TCP, or undetected) is relayed to one endpoint of the destination over HBONE.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ambient.hbone.client import HboneClient
from ambient.hbone.errors import HboneError
from ambient.hbone.headers import forwarded_for
from ambient.hbone.server import ConnectRequest
from ambient.hbone.stream import HboneStream
from ambient.identity.certs import WorkloadCertificate
from ambient.proto import workload_pb2
from ambient.relay import relay
from ambient.telemetry.labels import workload_identity
from ambient.xds.store import WorkloadSnapshot
from waypoint.config import WaypointConfig
from waypoint.http.errors import BodyTooLarge, ConnectFailure, Overflow, StreamReset, UpstreamReset
from waypoint.http.message import (
    Body,
    BytesBody,
    ByteStream,
    Headers,
    HttpLimits,
    RequestHead,
    ResponseHead,
    TcpByteStream,
    bytes_body,
    prepend,
    read_all,
)
from waypoint.http.pool import ClusterLimits, ConnectionPoolLimits, UpstreamPool
from waypoint.routing.match import redirect_location, rewritten_path, select_with_match, shadow_authority
from waypoint.routing.model import (
    DestinationPolicy,
    DirectResponse,
    Forward,
    Mirror,
    Redirect,
    RoutingError,
    ServiceRef,
)
from waypoint.routing.table import ConfigIndex
from waypoint.security.authz import DENIED_BODY, DENIED_STATUS, AuthzRequest, PolicySet
from waypoint.security.jwt import JwtAuthenticator
from waypoint.sources import L7Objects
from waypoint.telemetry import RequestRecord, Telemetry, ensure_trace
from waypoint.upstream.endpoints import Endpoint, endpoints_for
from waypoint.upstream.lb import hash_key, make_balancer
from waypoint.upstream.outlier import OutlierDetector, usable_hosts
from waypoint.upstream.retry import RetryBudget, RetryDecision, RetryState

log = logging.getLogger("waypoint.proxy")

HBONE_PORT = 15008
NO_ROUTE_BODY = b"route not found"  # Envoy answers 404 with an empty body; a hint helps more
NO_HEALTHY_BODY = b"no healthy upstream"  # Envoy's body, byte for byte
TIMEOUT_BODY = b"upstream request timeout"  # Envoy's
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
CONNECT_FAILURE_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
RESET_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
FAULT_ABORT_BODY = b"fault filter abort"  # Envoy's
OUTLIER_SWEEP = 1.0  # seconds between outlier detection sweeps (each cluster's own interval gates ejection)


@dataclass(frozen=True)
class Downstream:
    """Facts about one HBONE tunnel into the waypoint, shared by every request on it."""

    peer_identity: str | None
    source_ip: str
    source_workload: workload_pb2.Workload | None
    target_ip: str
    target_port: int
    service: workload_pb2.Service | None
    workload: workload_pb2.Workload | None

    @property
    def hostname(self) -> str:
        return self.service.hostname if self.service is not None else self.target_ip

    @property
    def source_namespace(self) -> str:
        if self.peer_identity and "/ns/" in self.peer_identity:
            return self.peer_identity.split("/ns/", 1)[1].split("/", 1)[0]
        return self.source_workload.namespace if self.source_workload is not None else ""


@dataclass
class Compiled:
    """One compile of the L7 configuration against one workload snapshot; requests read whichever is
    current. Route tables are built lazily per (hostname, port) and cached in the index."""

    index: ConfigIndex
    policies: PolicySet
    objects: L7Objects
    snapshot: WorkloadSnapshot
    errors: list[Any] = field(default_factory=list)
    generation: int = 0

    def pod_labels(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return self.objects.pod_labels.get((namespace, name))


def service_lookup(snapshot: WorkloadSnapshot) -> Callable[[str], ServiceRef | None]:
    """What the routing compilers ask: a service by FQDN hostname or by one of its VIPs."""

    def lookup(name: str) -> ServiceRef | None:
        found = snapshot.services_by_hostname.get(name.lower())
        service = found[0] if found else None
        if service is None:
            with contextlib.suppress(ValueError):
                service = snapshot.service_by_vip(name)
        if service is None:
            return None
        return ServiceRef(service.hostname, service.namespace, service.name,
                          tuple(p.service_port for p in service.ports),
                          tuple(_ip_text(a.address) for a in service.addresses))
    return lookup


def compile_config(objects: L7Objects, snapshot: WorkloadSnapshot, config: WaypointConfig,
                   previous: Compiled | None = None) -> Compiled:
    index = ConfigIndex(objects.virtual_services, objects.http_routes, objects.destination_rules,
                        services=service_lookup(snapshot), waypoint_namespace=config.namespace,
                        waypoint_name=config.name, domain=config.domain_suffix, root_namespace=config.root_namespace)
    policies = PolicySet.compile(objects.authorization_policies, waypoint=(config.namespace, config.name),
                                 root_namespace=config.root_namespace)
    return Compiled(index, policies, objects, snapshot, [*index.errors, *policies.errors],
                    (previous.generation + 1) if previous is not None else 0)


def local_reply(status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> tuple[ResponseHead, Body]:
    """A response the waypoint makes itself (denials, faults, redirects, upstream errors)."""
    response = Headers([*headers, ("content-length", str(len(body)))])
    if body and "content-type" not in response:
        response.add("content-type", "text/plain")
    return ResponseHead(status, response), bytes_body(body)


class UpstreamFailure(Exception):
    """The request could not be served upstream: answered locally with `status` and Envoy's `flag`."""

    def __init__(self, status: int, body: bytes, flag: str) -> None:
        super().__init__(body.decode())
        self.status, self.body, self.flag = status, body, flag


def no_healthy_upstream() -> UpstreamFailure:
    """A fresh exception each time: a shared instance would collect every raise's traceback."""
    return UpstreamFailure(503, NO_HEALTHY_BODY, "UH")


class Cluster:
    """One (service hostname, subset, port): its endpoints, balancer, outlier detector, limits and pools."""

    def __init__(self, key: tuple[str, str | None, int], policy: DestinationPolicy, rng: random.Random,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.key = key
        self.rng = rng
        self.spawn = spawn  # owned background work (closing the pools of endpoints that left)
        self.policy = policy
        self.balancer = make_balancer(policy.lb, rng=rng)
        self.outlier = OutlierDetector(policy.outlier) if policy.outlier is not None else None
        self.limits = ClusterLimits(ConnectionPoolLimits.from_policy(policy.connection_pool))
        self.retry_budget = RetryBudget(policy.connection_pool.max_retries)
        self.endpoints: list[Endpoint] = []
        self.generation = -1
        self.pools: dict[str, UpstreamPool] = {}

    def update(self, endpoints: list[Endpoint], policy: DestinationPolicy, generation: int) -> None:
        if policy != self.policy:
            if policy.lb != self.policy.lb:
                self.balancer = make_balancer(policy.lb, rng=self.rng)
            if policy.outlier != self.policy.outlier:
                self.outlier = OutlierDetector(policy.outlier) if policy.outlier is not None else None
            self.limits.update(ConnectionPoolLimits.from_policy(policy.connection_pool))
            if policy.connection_pool.max_retries != self.policy.connection_pool.max_retries:
                self.retry_budget = RetryBudget(policy.connection_pool.max_retries)
            self.policy = policy
        self.endpoints = endpoints
        self.generation = generation
        alive = {ep.uid for ep in endpoints}
        for uid in [uid for uid in self.pools if uid not in alive]:
            self.spawn(self.pools.pop(uid).close())

    def pick(self, key: Any = None, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint | None:
        return self.balancer.pick(usable_hosts(self.endpoints, self.outlier).hosts, key, exclude)

    def describe(self) -> dict[str, Any]:
        hostname, subset, port = self.key
        return {"name": f"outbound|{port}|{subset or ''}|{hostname}",
                "endpoints": [{"address": ep.authority, "identity": ep.identity, "healthy": ep.healthy,
                               "ejected": bool(self.outlier and self.outlier.ejected(ep.uid))}
                              for ep in self.endpoints],
                "loadBalancer": self.balancer.describe(),
                "outlierDetection": self.outlier.describe() if self.outlier is not None else None,
                "connections": sum(pool.connections for pool in self.pools.values())}

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
        self.pools.clear()


class Proxy:
    def __init__(self, config: WaypointConfig, current: Callable[[], Compiled],
                 certificate: Callable[[], Awaitable[WorkloadCertificate]], hbone: HboneClient,
                 telemetry: Telemetry | None = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.current = current
        self.certificate = certificate
        self.hbone = hbone
        self.telemetry = telemetry or Telemetry(config.access_log, log_format=config.log_format)
        self.rng = rng or random.Random()
        self.limits = HttpLimits()
        self.jwt = JwtAuthenticator(waypoint=(config.namespace, config.name), root_namespace=config.root_namespace)
        self.clusters: dict[tuple[str, str | None, int], Cluster] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- configuration -------------------------------------------------------------------------------
    def config_changed(self, compiled: Compiled) -> None:
        self.jwt.update(compiled.objects.request_authentications)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_outliers())

    async def start(self) -> None:
        await self.jwt.start()

    async def _sweep_outliers(self) -> None:
        while True:
            await asyncio.sleep(OUTLIER_SWEEP)
            for cluster in list(self.clusters.values()):
                if cluster.outlier is not None:
                    cluster.outlier.sweep()

    def cluster(self, compiled: Compiled, hostname: str, subset: str | None, port: int) -> Cluster:
        key = (hostname, subset, port)
        cluster = self.clusters.get(key)
        if cluster is not None and cluster.generation == compiled.generation:
            return cluster
        policy = compiled.index.policy_for(hostname, subset, port)
        if cluster is None:
            cluster = self.clusters[key] = Cluster(key, policy, self.rng, self._spawn)
        subset_labels = policy.subset.labels if policy.subset is not None else None
        endpoints: list[Endpoint] = []
        for service in compiled.snapshot.services_by_hostname.get(hostname.lower(), ()):
            endpoints += endpoints_for(compiled.snapshot, service, port, compiled.pod_labels, subset_labels)
        if not endpoints and subset is None:  # a workload-addressed destination (workload waypoints): that pod
            with contextlib.suppress(ValueError):
                workload = compiled.snapshot.workload_by_ip(hostname)
                if workload is not None:
                    endpoints = [workload_endpoint(workload, port)]
        cluster.update(endpoints, policy, compiled.generation)
        return cluster

    def describe(self) -> list[dict[str, Any]]:
        return [cluster.describe() for cluster in self.clusters.values()]

    # -- L4 ------------------------------------------------------------------------------------------
    async def relay_tcp(self, down: Downstream, request: ConnectRequest) -> None:
        """Declared-TCP ports: reach an endpoint first, so a failure is the CONNECT's 503."""
        try:
            upstream = await self._open_l4(down)
        except (UpstreamFailure, ConnectFailure, RoutingError) as exc:
            log.info("tcp to %s:%d: %s", down.hostname, down.target_port, exc)
            request.respond(503)
            return
        await self._relay(request.respond(200), upstream, b"")

    async def relay_opened(self, down: Downstream, stream: HboneStream, first: bytes) -> None:
        """An undetected protocol on an already answered tunnel: relay it as TCP."""
        try:
            upstream = await self._open_l4(down)
        except (UpstreamFailure, ConnectFailure, RoutingError) as exc:
            log.info("tcp to %s:%d: %s", down.hostname, down.target_port, exc)
            stream.abort()
            return
        await self._relay(stream, upstream, first)

    async def _open_l4(self, down: Downstream) -> ByteStream:
        if down.workload is not None:
            return await self._dial(workload_endpoint(down.workload, down.target_port), down)
        cluster = self.cluster(self.current(), down.hostname, None, down.target_port)
        endpoint = cluster.pick()
        if endpoint is None:
            raise no_healthy_upstream()
        return await self._dial(endpoint, down)

    async def _relay(self, stream: HboneStream, upstream: ByteStream, first: bytes) -> None:
        try:
            if first:
                await upstream.write(first)
            await relay(stream, upstream, _ignore, _ignore)
        finally:
            upstream.close()
            stream.close()

    # -- dialing -------------------------------------------------------------------------------------
    async def _dial(self, endpoint: Endpoint, down: Downstream | None = None) -> ByteStream:
        """A byte stream to the endpoint's app port: an HBONE tunnel when the pod is in the mesh."""
        try:
            if endpoint.hbone:
                cert = await self.certificate()
                headers = {"forwarded": forwarded_for(down.source_ip, 0)} if down is not None else {}
                return await asyncio.wait_for(self.hbone.connect(
                    cert, (endpoint.ip, HBONE_PORT), endpoint.authority, [endpoint.identity], headers=headers),
                    self.config.connect_timeout)
            return await asyncio.wait_for(TcpByteStream.connect(endpoint.ip, endpoint.target_port),
                                          self.config.connect_timeout)
        except (OSError, TimeoutError, HboneError) as exc:
            raise ConnectFailure(f"{endpoint.authority}: {exc or 'timed out'}") from exc

    def _pool(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamPool:
        pool = cluster.pools.get(endpoint.uid)
        if pool is None:
            async def dial() -> ByteStream:
                return await self._dial(endpoint)
            pool = cluster.pools[endpoint.uid] = UpstreamPool(dial, cluster.limits, name=endpoint.authority)
        return pool

    # -- L7 ------------------------------------------------------------------------------------------
    def handler(self, down: Downstream) -> Callable[[RequestHead, Body], Awaitable[tuple[ResponseHead, Body]]]:
        async def handle(head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
            return await self.handle(down, head, body)
        return handle

    async def handle(self, down: Downstream, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        record = RequestRecord.start(head, down)
        body = record.request_body(body)
        ensure_trace(head.headers)
        try:
            response, response_body = await self._handle(down, head, body, record)
        except UpstreamFailure as exc:
            record.flags.add(exc.flag)
            response, response_body = local_reply(exc.status, exc.body)
        except Exception:
            log.exception("%s %s%s failed", head.method, head.authority, head.path)
            response, response_body = local_reply(500, b"internal error")
        record.response(response)
        return response, self.telemetry.track(record, response_body)

    async def _handle(self, down: Downstream, head: RequestHead, body: Body,
                      record: RequestRecord) -> tuple[ResponseHead, Body]:
        compiled = self.current()
        service = down.service
        jwt = await self.jwt.authenticate(head, service)
        if not jwt.ok:
            record.details = jwt.details
            return local_reply(jwt.status, jwt.body, jwt.response_headers)
        for name in jwt.headers_to_remove:
            head.headers.remove(name)
        for name, value in jwt.headers_to_set:
            head.headers.set(name, value)
        decision = compiled.policies.evaluate(AuthzRequest(
            source_principal=_principal(down.peer_identity), source_namespace=down.source_namespace,
            source_ip=down.source_ip, remote_ip=down.source_ip, destination_ip=down.target_ip,
            destination_port=down.target_port, host=head.authority, method=head.method, path=head.path,
            headers=head.headers, request_principal=jwt.principal, claims=jwt.claims,
            audiences=jwt.audiences, presenter=jwt.presenter), service=service)
        if not decision.allowed:
            log.info("request denied by %s: %s %s%s from %s", decision.policy or "no matching ALLOW policy",
                     head.method, head.authority, head.path, down.peer_identity)
            record.policy, record.details = decision.policy, decision.details
            return local_reply(DENIED_STATUS, DENIED_BODY)

        port = down.target_port
        selected = select_with_match(compiled.index.routes_for(down.hostname, port), head, port)
        if selected is None:
            record.flags.add("NR")
            return local_reply(404, NO_ROUTE_BODY)
        route, match = selected
        record.route = route.name
        if route.fault is not None:
            delay = route.fault.delay_for(self.rng)
            if delay:
                record.flags.add("DI")
                await asyncio.sleep(delay)
            abort = route.fault.abort_for(self.rng)
            if abort is not None:
                record.flags.add("FI")
                if abort.grpc_status is not None and record.grpc:
                    return local_reply(200, b"", [("content-type", "application/grpc"),
                                                  ("grpc-status", str(abort.grpc_status))])
                return local_reply(abort.http_status or 503, FAULT_ABORT_BODY)
        action = route.action
        if isinstance(action, Redirect):
            return local_reply(action.code, b"", [("location", redirect_location(action, head, port, match))])
        if isinstance(action, DirectResponse):
            return local_reply(action.status, action.body)
        assert isinstance(action, Forward)

        destination = action.choose(self.rng.random())
        if destination.error:
            return local_reply(500, destination.error.encode())
        route.request_headers.apply(head.headers)
        destination.request_headers.apply(head.headers)
        if route.rewrite is not None:
            head.path = rewritten_path(route.rewrite, match, head.path)
            if route.rewrite.authority:
                head.authority = route.rewrite.authority
        if destination.authority:
            head.authority = destination.authority

        retry_policy = route.retries  # the routing model's: Istio's default, or None when attempts is 0
        replay: BytesBody | None = None
        if retry_policy is not None or route.mirrors:
            replay, body = await _replayable(body, self.config.replay_buffer)
        for mirror in route.mirrors:
            if mirror.sample(self.rng):
                self._spawn(self._mirror(compiled, mirror, head, replay, port))

        target_port = destination.port or port
        try:
            cluster = self.cluster(compiled, destination.host, destination.subset, target_port)
        except RoutingError as exc:  # a subset that vanished between compile and request
            log.info("%s: %s", route.name, exc)
            raise no_healthy_upstream() from None
        record.destination(cluster, destination)
        retry = RetryState(retry_policy, cluster.retry_budget) if retry_policy is not None else None
        protocol = upstream_protocol(down.service, port, head.protocol)
        forward = self._forward(cluster, down, head, body, replay, protocol, retry, record)
        try:
            response, response_body = await (asyncio.wait_for(forward, route.timeout) if route.timeout else forward)
        except TimeoutError:
            raise UpstreamFailure(504, TIMEOUT_BODY, "UT") from None
        finally:
            if retry is not None:
                retry.close()
        route.response_headers.apply(response.headers)
        destination.response_headers.apply(response.headers)
        return response, response_body

    async def _forward(self, cluster: Cluster, down: Downstream, head: RequestHead, body: Body,
                       replay: BytesBody | None, protocol: str, retry: RetryState | None,
                       record: RequestRecord) -> tuple[ResponseHead, Body]:
        """Tries until a response is final: each try picks an endpoint (another one on a retry when the
        policy prefers it), goes through that endpoint's pool, and feeds outlier detection."""
        hashed = hash_key(cluster.policy.lb, head, down.source_ip)
        avoid_tried = retry is not None and retry.prefer_other_hosts and cluster.balancer.retries_prefer_other_hosts
        tried: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            endpoint = cluster.pick(hashed, tried if avoid_tried else frozenset())
            if endpoint is None and tried:
                endpoint = cluster.pick(hashed)  # every endpoint was tried: any will do
            if endpoint is None:
                raise no_healthy_upstream()
            tried.add(endpoint.uid)
            record.upstream_host, record.upstream_workload = endpoint.authority, endpoint.workload
            send = replay.replay() if replay is not None else body
            status: int | None = None
            failure: UpstreamFailure | None = None
            connect_failure = reset = False
            cluster.balancer.started(endpoint)
            try:
                request = self._pool(cluster, endpoint).request(head, send, protocol)
                per_try = retry.per_try_timeout if retry is not None else None
                response, response_body = await (asyncio.wait_for(request, per_try) if per_try else request)
                status = response.status
            except Overflow:
                raise UpstreamFailure(503, OVERFLOW_BODY, "UO") from None
            except ConnectFailure:
                failure, connect_failure = UpstreamFailure(503, CONNECT_FAILURE_BODY, "UF"), True
            except (UpstreamReset, StreamReset):
                failure, reset = UpstreamFailure(503, RESET_BODY, "UC"), True
            except TimeoutError:
                failure, reset = UpstreamFailure(504, TIMEOUT_BODY, "UT"), True
            finally:
                cluster.balancer.finished(endpoint)
            if cluster.outlier is not None:
                cluster.outlier.record(endpoint.uid, status)
            if hashed is not None and hashed.set_cookie and failure is None:
                response.headers.add("set-cookie", hashed.set_cookie)
            can_replay = replay is not None or (attempt == 1 and _unsent(send))
            grpc_status = _grpc_status(response) if failure is None else None
            decision = RetryDecision.NO if retry is None else retry.decide(
                status, reset, connect_failure, attempt, grpc_status=grpc_status, request_sent=not connect_failure)
            if decision is RetryDecision.RETRY and not can_replay:
                decision = RetryDecision.NO
            if decision is not RetryDecision.RETRY:
                if decision is RetryDecision.LIMIT_EXCEEDED:
                    record.flags.add("URX")
                if failure is not None:
                    raise failure
                return response, response_body
            if failure is None:
                await response_body.aclose()
            record.retries += 1
            assert retry is not None
            await asyncio.sleep(retry.backoff(attempt, self.rng))

    async def _mirror(self, compiled: Compiled, mirror: Mirror, head: RequestHead, replay: BytesBody | None,
                      port: int) -> None:
        """A copy of the request to the mirror destination; its answer is dropped, its failure only logged.
        Bodies too large to keep are mirrored without their body."""
        copy = RequestHead(head.method, head.path, shadow_authority(head.authority), head.headers.copy(),
                           head.scheme, head.protocol)
        body = replay.replay() if replay is not None else bytes_body(b"")
        try:
            cluster = self.cluster(compiled, mirror.host, mirror.subset, mirror.port or port)
            endpoint = cluster.pick()
            if endpoint is None:
                return
            _response, response_body = await self._pool(cluster, endpoint).request(copy, body, head.protocol)
            await response_body.aclose()
        except Exception as exc:  # a mirror never affects the caller
            log.debug("mirror to %s failed: %s", mirror.host, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._background):
            task.cancel()
        for cluster in self.clusters.values():
            await cluster.close()
        await self.jwt.close()


# -- helpers ---------------------------------------------------------------------------------------------
def workload_endpoint(workload: workload_pb2.Workload, port: int) -> Endpoint:
    """A workload-addressed destination (a workload waypoint): that pod, on the port asked for."""
    return Endpoint(uid=workload.uid, ip=_ip_text(workload.addresses[0]), target_port=port,
                    identity=workload_identity(workload), labels={}, healthy=True, node=workload.node,
                    hbone=workload.tunnel_protocol == workload_pb2.HBONE, workload=workload)


def _ip_text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _ignore(_n: int) -> None:
    pass


def _principal(identity: str | None) -> str:
    """Istio's principals are SPIFFE ids without the scheme: `cluster.local/ns/x/sa/y`."""
    return identity.removeprefix("spiffe://") if identity else ""


def declared_protocol(service: workload_pb2.Service | None, port: int) -> int:
    """The service port's `app_protocol` (UNKNOWN for an unknown port or a workload-addressed destination)."""
    if service is not None:
        for p in service.ports:
            if p.service_port == port:
                return int(p.app_protocol)
    return int(workload_pb2.UNKNOWN)


def upstream_protocol(service: workload_pb2.Service | None, port: int, downstream: str) -> str:
    """As Envoy in Istio: HTTP/2 to ports declared http2/grpc, HTTP/1.1 to ports declared http; the caller's
    protocol only where the port declares none (and for workload-addressed destinations)."""
    declared = declared_protocol(service, port)
    if declared in (workload_pb2.HTTP2, workload_pb2.GRPC):
        return "HTTP/2"
    if declared == workload_pb2.HTTP11:
        return "HTTP/1.1"
    return downstream


def _grpc_status(response: ResponseHead) -> int | None:
    value = response.headers.get("grpc-status")
    return int(value) if value is not None and value.isdigit() else None


def _unsent(body: Body) -> bool:
    return isinstance(body, BytesBody) and body.unread


async def _replayable(body: Body, limit: int) -> tuple[BytesBody | None, Body]:
    """Keep the body for replays when it is at most `limit` bytes: (the kept copy, the body to send first).
    A larger body streams once (no retries after it was sent, mirrors get no body)."""
    if body.length is not None and body.length > limit:
        return None, body
    if body.length == 0:  # most requests (GETs): nothing to read
        kept = BytesBody(b"", None)
        return kept, kept.replay()
    try:
        data = await read_all(body, limit)
    except BodyTooLarge as exc:
        return None, prepend(exc.data, body)
    kept = BytesBody(data, body.trailers)
    return kept, kept.replay()
