"""The waypoint process: wiring and lifecycle.

Inputs: workloads and services over delta xDS (`ambient.xds`), the waypoint's own certificate from the CA
(`ambient.identity`), and the L7 resources from the Kubernetes API (`waypoint.sources`). On every change the
L7 configuration is recompiled into an immutable `Compiled` (routes, destination policies, authorization,
JWT) that requests read without locks; a config error is logged, recorded as a Kubernetes Event on the
object, and drops only what it breaks.

Data path: HBONE on 15008 (`ambient.hbone.server`). Each CONNECT names the original destination (a service
`VIP:port`, or a pod `IP:port` for a workload waypoint). The port's declared protocol decides: TCP/TLS →
an L4 relay to an endpoint; HTTP/1.1, HTTP/2, gRPC → the L7 pipeline (`waypoint.proxy`); undeclared → the
first bytes decide (`waypoint.http.detect`), a client that says nothing gets an L4 relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ambient.hbone.client import HboneClient
from ambient.hbone.headers import parse_authority
from ambient.hbone.server import ConnectRequest, HboneServer
from ambient.identity.certs import WorkloadCertificate
from ambient.kube.client import KubeClient
from ambient.kube.events import EventRecorder
from ambient.proto import workload_pb2
from ambient.xds.store import WorkloadStore
from waypoint.config import WaypointConfig
from waypoint.http.detect import sniff
from waypoint.http.http1 import serve_http1
from waypoint.http.http2 import serve_http2
from waypoint.proxy import Compiled, Downstream, Proxy, compile_config, declared_protocol
from waypoint.sources import L7Objects

log = logging.getLogger("waypoint")

CertificateSource = Callable[[], Awaitable[WorkloadCertificate]]
AppProtocol = workload_pb2.AppProtocol
L4_PROTOCOLS = frozenset({workload_pb2.TCP, workload_pb2.TLS})
HTTP_PROTOCOLS = frozenset({workload_pb2.HTTP11, workload_pb2.HTTP2, workload_pb2.GRPC})
INVALID_CONFIG_REASON = "InvalidConfig"  # the Event reason on an object the waypoint could not (fully) apply
CONFIG_WARNING_REASON = "ConfigWarning"  # applied, with something ignored or suspicious
RECOMPILE_WARN = 0.25  # seconds: a compile this slow is worth a log line


def source_ip_of(request: ConnectRequest) -> str:
    """The caller's pod IP: the `forwarded: for=` ztunnel sends (PROTOCOLS §6), else the HBONE peer."""
    forwarded = request.headers.get("forwarded", "")
    for part in forwarded.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "for" and value:
            with contextlib.suppress(ValueError):
                return parse_authority(value.strip('"'))[0]
    return str(request.peer_addr[0])


class ConfigErrorsReporter:
    """Config errors → the waypoint's log and a Warning Event on the object, once per distinct error (the
    configuration is recompiled on every xDS change; an error already reported stays quiet)."""

    def __init__(self, recorder: EventRecorder | None) -> None:
        self.recorder = recorder
        self.seen: set[tuple[str, str, str, str, str]] = set()

    def new_errors(self, errors: list[Any]) -> list[Any]:
        """Remember `errors` as the current set; return those not reported before, logging them."""
        current = {(e.kind, e.namespace, e.name, e.field, e.message): e for e in errors}
        fresh = [error for key, error in current.items() if key not in self.seen]
        self.seen = set(current)
        for error in fresh:
            log.warning("config %s", error)
        return fresh

    async def record(self, errors: list[Any], objects: L7Objects) -> None:
        if self.recorder is None:
            return
        groups = {"VirtualService": objects.virtual_services, "DestinationRule": objects.destination_rules,
                  "HTTPRoute": objects.http_routes, "AuthorizationPolicy": objects.authorization_policies,
                  "RequestAuthentication": objects.request_authentications}
        index = {(kind, o["metadata"].get("namespace"), o["metadata"].get("name")): {"kind": kind, **o}
                 for kind, group in groups.items() for o in group}
        for error in errors:
            obj = index.get((error.kind, error.namespace, error.name))
            if obj is not None:
                reason = INVALID_CONFIG_REASON if error.severity == "error" else CONFIG_WARNING_REASON
                await self.recorder.record(obj, "Warning", reason, f"{error.field}: {error.message}")


class Waypoint:
    """One waypoint: the HBONE server, the L7 proxy, and the configuration feeding them."""

    def __init__(self, config: WaypointConfig, store: WorkloadStore, certificate: CertificateSource,
                 kube: KubeClient | None = None, hbone_client: HboneClient | None = None) -> None:
        self.config = config
        self.store = store
        self.certificate = certificate
        self.objects = L7Objects()
        self.compiled: Compiled = compile_config(self.objects, store.snapshot, config)
        self.hbone_client = hbone_client or HboneClient()
        self.proxy = Proxy(config, lambda: self.compiled, certificate, self.hbone_client)
        self.proxy.jwt.on_change = self.report_errors
        self.server = HboneServer(lambda _ip: certificate(), self.on_connect)
        self.errors = ConfigErrorsReporter(EventRecorder(kube, "waypoint") if kube is not None else None)
        self.config_seen = asyncio.Event()
        self.certificate_status: Callable[[], list[dict[str, Any]]] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        store.subscribe(lambda _snapshot, _changes: self.recompile())

    # -- configuration -------------------------------------------------------------------------------
    def set_objects(self, objects: L7Objects) -> None:
        self.objects = objects
        self.recompile()
        self.config_seen.set()

    def recompile(self) -> None:
        started = time.monotonic()
        compiled = compile_config(self.objects, self.store.snapshot, self.config, previous=self.compiled)
        self.compiled = compiled
        self.proxy.config_changed(compiled)
        spent = time.monotonic() - started
        if spent > RECOMPILE_WARN:
            log.warning("recompiling the L7 configuration took %.0f ms", spent * 1000)
        self.report_errors()

    def report_errors(self) -> None:
        """Log and record (as Events) the current config errors: compile errors and JWKS fetch failures."""
        fresh = self.errors.new_errors([*self.compiled.errors, *self.proxy.jwt.errors])
        if fresh and self.errors.recorder is not None:
            task = asyncio.get_running_loop().create_task(self.errors.record(fresh, self.objects))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    # -- data path -----------------------------------------------------------------------------------
    async def on_connect(self, request: ConnectRequest) -> None:
        ip, port = request.target
        snapshot = self.store.snapshot
        service = snapshot.service_by_vip(ip)
        workload = None if service is not None else snapshot.workload_by_ip(ip)
        if service is None and workload is None:
            log.info("CONNECT %s from %s: not a service or workload this waypoint knows", request.authority,
                     request.peer_identity)
            request.respond(503)
            return
        source_ip = source_ip_of(request)
        down = Downstream(peer_identity=request.peer_identity, source_ip=source_ip,
                          source_workload=snapshot.workload_by_ip(source_ip), target_ip=ip, target_port=port,
                          service=service, workload=workload)
        protocol = declared_protocol(service, port)
        if protocol in L4_PROTOCOLS:
            await self.proxy.relay_tcp(down, request)
            return
        stream = request.respond(200)
        timeout = None if protocol in HTTP_PROTOCOLS else self.config.detect_timeout
        kind, first = await sniff(stream, timeout)
        handler = self.proxy.handler(down)
        if kind == "http1":
            await serve_http1(stream, handler, first=first, limits=self.proxy.limits)
        elif kind == "http2":
            await serve_http2(stream, handler, first=first, limits=self.proxy.limits)
        else:
            await self.proxy.relay_opened(down, stream, first)

    def config_dump(self) -> dict[str, Any]:
        """`/config_dump`: what this waypoint runs with, compiled (routes, clusters, policies, errors)."""
        compiled = self.compiled
        return {
            "waypoint": {"name": self.config.name, "namespace": self.config.namespace,
                         "identity": self.config.identity},
            "routes": compiled.index.dump(),
            "clusters": self.proxy.describe(),
            "policies": compiled.policies.describe(),
            "requestAuthentication": self.proxy.jwt.describe(),
            "errors": [str(error) for error in [*compiled.errors, *self.proxy.jwt.errors]],
            "certificates": self.certificates(),
            "workloads": len(compiled.snapshot.workloads),
            "services": len(compiled.snapshot.services),
            "version": compiled.generation,
        }

    def certificates(self) -> list[dict[str, Any]]:
        return self.certificate_status() if self.certificate_status is not None else []

    async def close(self) -> None:
        await self.server.drain(self.config.drain_timeout)
        await self.proxy.close()
        await self.hbone_client.close()
        for task in list(self._reports):
            task.cancel()
