"""An in-process waypoint on loopback with real sockets and real mTLS, for `test_app.py`.

One mesh CA; a `WorkloadStore` filled directly (what xDS would deliver): the Service
`reviews.bookinfo.svc.cluster.local` (VIP 10.96.0.50, port 9080 declared HTTP/1.1, port 9090 declared TCP)
with three endpoints reviews-v1/v2/v3 whose "pod IPs" are distinct loopback addresses, plus the calling
productpage pod. Each endpoint is what a pod behind its ztunnel looks like from the waypoint: an HBONE
server on `<pod IP>:15008` presenting the reviews identity, which answers the CONNECT and relays it to the
app on `<pod IP>:<target port>` — an aiohttp app on 9080 (answers with its version and echoes what it got;
an HTTP/2 prior-knowledge tunnel is served in-process with the same answer, aiohttp has no h2c) and a TCP
echo on 9090. The `Waypoint` of `waypoint/app.py` serves HBONE on 127.0.0.1:<free port>; the tests call it
as a ztunnel would: an HBONE tunnel with authority `10.96.0.50:<port>`, the productpage certificate, and a
`forwarded: for=` header naming the calling pod.

App behaviour by path: `/delay/<ms>` answers after that long; `/status/<code>` answers that code;
`/flaky` fails (503) two tries out of three, counted across every endpoint; anything else 200. An
endpoint whose `status` is set answers every request with it (an endpoint gone bad).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ambient.hbone import ConnectRequest, HboneClient, HboneServer, HboneStream
from ambient.hbone.headers import forwarded_for
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId
from ambient.proto import workload_pb2
from ambient.relay import relay
from ambient.xds.store import StoreChanges, WorkloadStore
from tests.integration.hbone.conftest import issue
from waypoint.app import Waypoint
from waypoint.config import WaypointConfig
from waypoint.http.detect import sniff
from waypoint.http.http1 import Http1ClientConnection
from waypoint.http.http2 import Http2ClientConnection, serve_http2
from waypoint.http.message import Body, Headers, HttpLimits, RequestHead, ResponseHead, TcpByteStream, bytes_body
from waypoint.sources import L7Objects

TD = "cluster.local"
NS = "bookinfo"
WAYPOINT = "waypoint"
HOST = f"reviews.{NS}.svc.{TD}"
SERVICE_KEY = f"{NS}/{HOST}"
VIP = "10.96.0.50"
HTTP_PORT = 9080  # declared HTTP/1.1
TCP_PORT = 9090  # declared TCP
AUTHORITY = "reviews:9080"  # the Host header productpage sends
HBONE_PORT = 15008  # where the waypoint dials endpoints (waypoint/proxy.py HBONE_PORT)
# Pod IPs: loopback addresses no other test here uses (Linux routes all of 127/8 to lo).
PRODUCTPAGE_IP = "127.6.0.10"
VERSIONS = {"v1": "127.6.0.11", "v2": "127.6.0.12", "v3": "127.6.0.13"}

WAYPOINT_ID = SpiffeId(TD, NS, WAYPOINT)
PRODUCTPAGE_ID = SpiffeId(TD, NS, "bookinfo-productpage")
REVIEWS_ID = SpiffeId(TD, NS, "bookinfo-reviews")
SLEEP_ID = SpiffeId(TD, "default", "sleep")

WAIT = 10.0  # bound on every wait
DRAIN = 0.5  # seconds the waypoint's teardown waits for open requests


# -- certificates ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    signer: CaSigner
    waypoint: WorkloadCertificate
    productpage: WorkloadCertificate
    sleep: WorkloadCertificate
    reviews: Mapping[str, WorkloadCertificate]  # per version: each pod has its own key, same identity


def make_certs() -> Certs:
    signer = CaSigner.generate(TD)
    return Certs(signer, issue(signer, WAYPOINT_ID), issue(signer, PRODUCTPAGE_ID), issue(signer, SLEEP_ID),
                 {version: issue(signer, REVIEWS_ID) for version in VERSIONS})


# -- polling --------------------------------------------------------------------------------------------------
async def eventually(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- the workload model ---------------------------------------------------------------------------------------
def pod_name(version: str) -> str:
    return f"reviews-{version}-5c9d7f8b6d-{version}x"


POD_LABELS: dict[tuple[str, str], dict[str, str]] = {
    (NS, pod_name(v)): {"app": "reviews", "version": v} for v in VERSIONS}


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def reviews_service() -> workload_pb2.Service:
    return workload_pb2.Service(
        name="reviews", namespace=NS, hostname=HOST,
        addresses=[workload_pb2.NetworkAddress(address=_ip(VIP))],
        ports=[workload_pb2.Port(service_port=HTTP_PORT, target_port=HTTP_PORT, app_protocol=workload_pb2.HTTP11),
               workload_pb2.Port(service_port=TCP_PORT, target_port=TCP_PORT, app_protocol=workload_pb2.TCP)],
        waypoint=workload_pb2.GatewayAddress())


def reviews_workload(version: str) -> workload_pb2.Workload:
    ports = workload_pb2.PortList(ports=[workload_pb2.Port(service_port=HTTP_PORT, target_port=HTTP_PORT),
                                         workload_pb2.Port(service_port=TCP_PORT, target_port=TCP_PORT)])
    return workload_pb2.Workload(
        uid=f"Kubernetes//Pod/{NS}/{pod_name(version)}", name=pod_name(version), namespace=NS,
        addresses=[_ip(VERSIONS[version])], tunnel_protocol=workload_pb2.HBONE, trust_domain=TD,
        service_account=REVIEWS_ID.service_account, node="node-1", canonical_name="reviews",
        canonical_revision=version, workload_type=workload_pb2.DEPLOYMENT, workload_name=f"reviews-{version}",
        services={SERVICE_KEY: ports}, cluster_id="Kubernetes")


def productpage_workload() -> workload_pb2.Workload:
    name = "productpage-v1-7b6d9d9d4c-pp"
    return workload_pb2.Workload(
        uid=f"Kubernetes//Pod/{NS}/{name}", name=name, namespace=NS, addresses=[_ip(PRODUCTPAGE_IP)],
        tunnel_protocol=workload_pb2.HBONE, trust_domain=TD, service_account=PRODUCTPAGE_ID.service_account,
        node="node-1", canonical_name="productpage", canonical_revision="v1",
        workload_type=workload_pb2.DEPLOYMENT, workload_name="productpage-v1", cluster_id="Kubernetes")


def store_changes() -> StoreChanges:
    workloads = {w.uid: w for w in [*(reviews_workload(v) for v in VERSIONS), productpage_workload()]}
    return StoreChanges(workloads=workloads, services={SERVICE_KEY: reviews_service()})


# -- the Istio resources --------------------------------------------------------------------------------------
def _meta(name: str, namespace: str, created: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "creationTimestamp": created}


def virtual_service(http: list[dict[str, Any]], name: str = "reviews", hosts: Iterable[str] = ("reviews",),
                    created: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": _meta(name, NS, created),
            "spec": {"hosts": list(hosts), "http": http}}


def destination(subset: str | None = None, weight: int | None = None, host: str = "reviews") -> dict[str, Any]:
    dest: dict[str, Any] = {"host": host}
    if subset is not None:
        dest["subset"] = subset
    entry: dict[str, Any] = {"destination": dest}
    if weight is not None:
        entry["weight"] = weight
    return entry


def destination_rule(traffic_policy: dict[str, Any] | None = None, subsets: Iterable[str] = tuple(VERSIONS),
                     name: str = "reviews") -> dict[str, Any]:
    spec: dict[str, Any] = {"host": "reviews", "subsets": [{"name": s, "labels": {"version": s}} for s in subsets]}
    if traffic_policy is not None:
        spec["trafficPolicy"] = traffic_policy
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": _meta(name, NS, "2024-01-01T00:00:00Z"), "spec": spec}


GATEWAY_REF = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": WAYPOINT}


def authorization_policy(name: str, action: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _meta(name, NS, "2024-01-01T00:00:00Z"),
            "spec": {"targetRefs": [GATEWAY_REF], "action": action, "rules": rules}}


def request_authentication(name: str, jwt_rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": _meta(name, NS, "2024-01-01T00:00:00Z"),
            "spec": {"targetRefs": [GATEWAY_REF], "jwtRules": jwt_rules}}


# -- the endpoints ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """One request as the app received it."""

    method: str
    path: str
    host: str
    protocol: str
    headers: Mapping[str, str]


@dataclass
class Tunnel:
    """One CONNECT as the endpoint's HBONE server received it."""

    authority: str
    peer_identity: str | None
    forwarded: str | None


@dataclass
class FlakyCounter:
    tries: int = 0

    def fails(self) -> bool:
        """Two tries out of three fail: tries 1 and 2 fail, try 3 succeeds, and so on."""
        self.tries += 1
        return self.tries % 3 != 0


@dataclass
class Endpoint:
    version: str
    ip: str
    cert: WorkloadCertificate
    flaky: FlakyCounter
    status: int | None = None  # set: every request is answered with this status
    requests: list[Seen] = field(default_factory=list)
    tunnels: list[Tunnel] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    tcp_bytes: int = 0

    async def answer(self, method: str, path: str, host: str, protocol: str, headers: Mapping[str, str],
                     body: bytes) -> tuple[int, bytes]:
        self.requests.append(Seen(method, path, host, protocol, dict(headers)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status = 200
            parts = path.split("?", 1)[0].strip("/").split("/")
            if parts[0] == "delay" and len(parts) == 2:
                await asyncio.sleep(int(parts[1]) / 1000)
            elif parts[0] == "status" and len(parts) == 2:
                status = int(parts[1])
            elif parts[0] == "flaky" and self.flaky.fails():
                status = 503
            if self.status is not None:
                status = self.status
            payload = {"version": self.version, "method": method, "path": path, "host": host,
                       "protocol": protocol, "headers": dict(headers), "body": len(body)}
            return status, json.dumps(payload).encode()
        finally:
            self.in_flight -= 1

    # the app on <ip>:9080 (aiohttp: HTTP/1.1)
    async def aiohttp_handler(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {name.lower(): ",".join(request.headers.getall(name)) for name in request.headers}
        status, payload = await self.answer(request.method, request.path_qs, request.host, "HTTP/1.1", headers, body)
        return web.Response(status=status, body=payload, content_type="application/json",
                            headers={"x-version": self.version})

    # the same app for h2c prior knowledge, in-process
    async def h2_handler(self, head: RequestHead, body: Body) -> tuple[ResponseHead, Body]:
        data = b""
        while chunk := await body.read():
            data += chunk
        headers: dict[str, str] = {}
        for name, value in head.headers:
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        status, payload = await self.answer(head.method, head.path, head.authority, head.protocol, headers, data)
        return (ResponseHead(status, Headers([("content-type", "application/json"), ("x-version", self.version),
                                              ("content-length", str(len(payload)))])), bytes_body(payload))

    # what the pod's ztunnel does with an inbound CONNECT
    async def on_connect(self, request: ConnectRequest) -> None:
        self.tunnels.append(Tunnel(request.authority, request.peer_identity, request.headers.get("forwarded")))
        ip, port = request.target
        if ip != self.ip or port not in (HTTP_PORT, TCP_PORT):
            request.respond(503)
            return
        try:
            app = await TcpByteStream.connect(ip, port)
        except OSError:
            request.respond(503)
            return
        stream = request.respond(200)
        if port == HTTP_PORT:
            kind, first = await sniff(stream, 2.0)
            if kind == "http2":
                app.close()
                await serve_http2(stream, self.h2_handler, first=first, limits=HttpLimits())
                return
            if first:
                await app.write(first)
        await relay(stream, app, _ignore, _ignore)

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """TCP_PORT: `<version>:` then everything received, until EOF."""
        try:
            writer.write(f"{self.version}:".encode())
            while data := await reader.read(65536):
                self.tcp_bytes += len(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _ignore(_n: int) -> None:
    pass


def bind(ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise RuntimeError(f"{ip}:{port} is in use (another test run, or something listening on "
                               f"0.0.0.0:{port}); these tests need it free: check `ss -ltn`") from exc
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running_endpoint(endpoint: Endpoint) -> AsyncIterator[Endpoint]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", endpoint.aiohttp_handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        await web.SockSite(runner, bind(endpoint.ip, HTTP_PORT)).start()
        echo = await asyncio.start_server(endpoint.echo, sock=bind(endpoint.ip, TCP_PORT))
        stack.callback(echo.close)
        server = HboneServer(lambda _ip: endpoint.cert, endpoint.on_connect)
        serving = asyncio.create_task(server.serve(bind(endpoint.ip, HBONE_PORT)))

        async def stop() -> None:
            await server.close()
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        stack.push_async_callback(stop)
        yield endpoint


# -- responses and metrics ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    headers: Headers
    body: bytes
    elapsed: float

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value

    @property
    def version(self) -> str | None:
        """The answering endpoint's version (None for a response the waypoint made itself)."""
        return self.headers.get("x-version")


async def read_body(body: Body) -> bytes:
    data = bytearray()
    while chunk := await body.read():
        data += chunk
    return bytes(data)


def requests_total(rendered: bytes, **labels: str) -> float:
    """The sum of `istio_requests_total` over the series whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(rendered.decode()):
        for sample in family.samples:
            if sample.name != "istio_requests_total":
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- the whole thing ------------------------------------------------------------------------------------------
@dataclass
class Mesh:
    certs: Certs
    store: WorkloadStore
    app: Waypoint
    endpoints: dict[str, Endpoint]
    port: int  # the waypoint's HBONE port on 127.0.0.1
    client: HboneClient
    flaky: FlakyCounter

    # configuration
    def configure(self, *, virtual_services: Iterable[dict[str, Any]] = (),
                  destination_rules: Iterable[dict[str, Any]] = (),
                  authorization_policies: Iterable[dict[str, Any]] = (),
                  request_authentications: Iterable[dict[str, Any]] = ()) -> None:
        self.app.set_objects(L7Objects(
            virtual_services=tuple(virtual_services), destination_rules=tuple(destination_rules),
            authorization_policies=tuple(authorization_policies),
            request_authentications=tuple(request_authentications), pod_labels=POD_LABELS))

    # the calling side: what productpage's ztunnel sends
    async def tunnel(self, port: int = HTTP_PORT, cert: WorkloadCertificate | None = None,
                     source_ip: str = PRODUCTPAGE_IP) -> HboneStream:
        return await self.client.connect(cert or self.certs.productpage, ("127.0.0.1", self.port), f"{VIP}:{port}",
                                         [str(WAYPOINT_ID)], headers={"forwarded": forwarded_for(source_ip, 41000)})

    async def connection(self, cert: WorkloadCertificate | None = None) -> Http1ClientConnection:
        return Http1ClientConnection(await self.tunnel(cert=cert))

    async def h2_connection(self, cert: WorkloadCertificate | None = None) -> Http2ClientConnection:
        return Http2ClientConnection(await self.tunnel(cert=cert))

    async def get(self, path: str = "/", headers: Iterable[tuple[str, str]] = (),
                  conn: Http1ClientConnection | Http2ClientConnection | None = None,
                  cert: WorkloadCertificate | None = None, method: str = "GET",
                  authority: str = AUTHORITY) -> Reply:
        """One request: on `conn` when given (kept open), else on a fresh tunnel closed afterwards."""
        own = conn is None
        connection = conn if conn is not None else await self.connection(cert)
        started = time.monotonic()
        try:
            async with asyncio.timeout(WAIT):
                head = RequestHead(method, path, authority, Headers(headers))
                if isinstance(connection, Http2ClientConnection):
                    head.protocol = "HTTP/2"
                response, body = await connection.request(head, bytes_body(b""))
                data = await read_body(body)
        finally:
            if own:
                await connection.close()
        return Reply(response.status, response.headers, data, time.monotonic() - started)

    async def many(self, count: int, path: str = "/", headers: Iterable[tuple[str, str]] = (),
                   connections: int = 4) -> list[Reply]:
        """`count` requests over `connections` keep-alive connections in parallel, in order of sending."""
        headers = list(headers)
        conns = [await self.connection() for _ in range(connections)]
        replies: list[Reply | None] = [None] * count

        async def worker(index: int) -> None:
            for i in range(index, count, connections):
                replies[i] = await self.get(path, headers, conn=conns[index])

        try:
            await asyncio.gather(*(worker(i) for i in range(connections)))
        finally:
            for conn in conns:
                await conn.close()
        return [r for r in replies if r is not None]

    def metrics(self) -> bytes:
        return self.app.proxy.telemetry.render()

    def requests_total(self, **labels: str) -> float:
        return requests_total(self.metrics(), reporter="waypoint", **labels)

    def seen(self, version: str) -> list[Seen]:
        return self.endpoints[version].requests


def certificate_of(cert: WorkloadCertificate) -> Callable[[], Awaitable[WorkloadCertificate]]:
    async def provide() -> WorkloadCertificate:
        return cert
    return provide


@contextlib.asynccontextmanager
async def running_mesh(certs: Certs) -> AsyncIterator[Mesh]:
    flaky = FlakyCounter()
    endpoints = {v: Endpoint(v, ip, certs.reviews[v], flaky) for v, ip in VERSIONS.items()}
    async with contextlib.AsyncExitStack() as stack:
        for endpoint in endpoints.values():
            await stack.enter_async_context(running_endpoint(endpoint))
        store = WorkloadStore()
        store.apply(store_changes())
        config = WaypointConfig(name=WAYPOINT, namespace=NS, service_account=WAYPOINT, access_log=False,
                                drain_timeout=DRAIN, connect_timeout=2.0)
        app = Waypoint(config, store, certificate_of(certs.waypoint))
        await app.proxy.start()
        stack.push_async_callback(app.close)
        app.set_objects(L7Objects(pod_labels=POD_LABELS))
        sock = bind("127.0.0.1", 0)
        port = sock.getsockname()[1]
        serving = asyncio.create_task(app.server.serve(sock))

        async def stop_serving() -> None:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        stack.push_async_callback(stop_serving)
        client = HboneClient()
        stack.push_async_callback(client.close)
        yield Mesh(certs, store, app, endpoints, port, client, flaky)
