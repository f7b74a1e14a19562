"""ztunnel's HTTP side ports (PROTOCOLS.md §1, §10): admin (15000), metrics (15020), readiness (15021).

- 15000, localhost of the component: `GET /config_dump` (JSON in the shape of Istio ztunnel's, so that
  `istioctl ztunnel-config` can read it), `GET|POST /logging[?level=]`, `POST /quitquitquit`,
  `GET /healthz/ready`.
- 15020, all addresses: `GET /metrics` and `GET /stats/prometheus` (rendered on demand).
- 15021, all addresses: `GET /healthz/ready` → `200 ready\\n` / `500 not ready, pending: a, b\\n`.

The config dump's field names and value spellings follow Istio ztunnel's serde output (`src/admin.rs`,
`state/workload.rs`, `state/service.rs`, `rbac.rs`): camelCase keys, enums as `HBONE`, `Healthy`,
`Allow`, `WorkloadSelector`; addresses as `<network>/<ip>`; certificate PEMs base64-encoded, serial
numbers in decimal, times in RFC 3339. The conversion functions are pure; the servers are thin shells on
`ambient.telemetry.admin_http` (not aiohttp: it would cost every ztunnel ~10 MB of RSS) that own nothing
but their listening socket.
"""

from __future__ import annotations

import base64
import datetime
import importlib.metadata
import ipaddress
import json
import logging
import platform
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from ambient.identity.certs import WorkloadCertificate
from ambient.identity.manager import CertificateStatus
from ambient.proto import authorization_pb2, workload_pb2
from ambient.telemetry import admin_http
from ambient.telemetry.admin_http import Readiness, Request, Response, Router, text_response
from ambient.telemetry.registry import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ambient.xds.store import WorkloadSnapshot
from ztunnel.errors import ConfigError

log = logging.getLogger("ztunnel.admin")

Json = dict[str, Any]
Address = tuple[str, int]
DEFAULT_TRUST_DOMAIN = "cluster.local"  # ztunnel's defaults for empty xDS fields (state/workload.rs)
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_CLUSTER_ID = "Kubernetes"


# -- what the app provides ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConnectionEntry:
    """One open connection of a workload, as `workloadState.<uid>.connections` lists it."""

    src: str  # "ip:port"
    actual_dst: str  # the address dialled / accepted on
    protocol: str  # "HBONE" | "TCP"
    original_dst: str | None = None  # inbound: the service the caller meant, when known; outbound: the original dst
    src_identity: str | None = None  # inbound: the caller's SPIFFE ID (mutual TLS only)


@dataclass(frozen=True)
class WorkloadState:
    """One pod this ztunnel proxies for."""

    name: str
    namespace: str
    service_account: str
    state: str = "Up"  # "Up" | "Pending" (ztunnel's inpod proxy state)
    inbound: Sequence[ConnectionEntry] = ()
    outbound: Sequence[ConnectionEntry] = ()


@dataclass(frozen=True)
class CertificateInfo:
    """A certificate manager entry with the certificate itself (a bare `CertificateStatus` dumps without
    its chain)."""

    status: CertificateStatus
    certificate: WorkloadCertificate | None = None


class StateProvider(Protocol):
    """What the ztunnel app exposes to the admin port."""

    def snapshot(self) -> WorkloadSnapshot: ...
    def certificates(self) -> Sequence[CertificateStatus | CertificateInfo]: ...
    def workload_states(self) -> Mapping[str, WorkloadState]: ...
    def config(self) -> Mapping[str, Any]: ...


# -- config_dump: pure conversions ----------------------------------------------------------------------
_PROTOCOL = {workload_pb2.NONE: "TCP", workload_pb2.HBONE: "HBONE", workload_pb2.LEGACY_ISTIO_MTLS: "LEGACY_ISTIO_MTLS"}
_NETWORK_MODE = {workload_pb2.STANDARD: "Standard", workload_pb2.HOST_NETWORK: "HostNetwork"}
_STATUS = {workload_pb2.HEALTHY: "Healthy", workload_pb2.UNHEALTHY: "Unhealthy"}
_APP_TUNNEL = {workload_pb2.ApplicationTunnel.NONE: "NONE", workload_pb2.ApplicationTunnel.PROXY: "PROXY"}
_LB_MODE = {workload_pb2.LoadBalancing.UNSPECIFIED_MODE: "Standard", workload_pb2.LoadBalancing.STRICT: "Strict",
            workload_pb2.LoadBalancing.FAILOVER: "Failover", workload_pb2.LoadBalancing.PASSTHROUGH: "Passthrough"}
_LB_HEALTH = {workload_pb2.LoadBalancing.ONLY_HEALTHY: "OnlyHealthy", workload_pb2.LoadBalancing.ALLOW_ALL: "AllowAll"}
_LB_SCOPE = {workload_pb2.LoadBalancing.REGION: "Region", workload_pb2.LoadBalancing.ZONE: "Zone",
             workload_pb2.LoadBalancing.SUBZONE: "Subzone", workload_pb2.LoadBalancing.NODE: "Node",
             workload_pb2.LoadBalancing.CLUSTER: "Cluster", workload_pb2.LoadBalancing.NETWORK: "Network"}
_IP_FAMILIES = {workload_pb2.IPV4_ONLY: "IPv4", workload_pb2.IPV6_ONLY: "IPv6", workload_pb2.DUAL: "Dual"}
_VISIBILITY = {workload_pb2.Service.PUBLIC: "Public", workload_pb2.Service.NAMESPACE: "Namespace"}
_SCOPE = {authorization_pb2.GLOBAL: "Global", authorization_pb2.NAMESPACE: "Namespace",
          authorization_pb2.WORKLOAD_SELECTOR: "WorkloadSelector"}
_ACTION = {authorization_pb2.ALLOW: "Allow", authorization_pb2.DENY: "Deny"}


def _ip(raw: bytes) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:  # not 4 or 16 bytes: show it rather than fail the whole dump
        return raw.hex()


def _gateway(gw: workload_pb2.GatewayAddress) -> Json:
    if gw.HasField("hostname"):
        destination = f"{gw.hostname.namespace}/{gw.hostname.hostname}"
    else:
        destination = f"{gw.address.network}/{_ip(gw.address.address)}"
    return {"destination": destination, "hboneMtlsPort": gw.hbone_mtls_port}


def _ports(ports: Iterable[workload_pb2.Port]) -> Json:
    return {str(p.service_port): p.target_port for p in ports}


def workload_json(w: workload_pb2.Workload) -> Json:
    """One workload as ztunnel serializes `state::workload::Workload` (defaults left out as it does)."""
    out: Json = {"workloadIps": [_ip(a) for a in w.addresses]}
    if w.HasField("waypoint"):
        out["waypoint"] = _gateway(w.waypoint)
    if w.HasField("network_gateway"):
        out["networkGateway"] = _gateway(w.network_gateway)
    out["protocol"] = _PROTOCOL.get(w.tunnel_protocol, str(w.tunnel_protocol))
    out["networkMode"] = _NETWORK_MODE.get(w.network_mode, str(w.network_mode))
    if w.uid:
        out["uid"] = w.uid
    out["name"] = w.name
    out["namespace"] = w.namespace
    out["trustDomain"] = w.trust_domain or DEFAULT_TRUST_DOMAIN
    out["serviceAccount"] = w.service_account or DEFAULT_SERVICE_ACCOUNT
    optional = {"network": w.network, "workloadName": w.workload_name,
                "workloadType": workload_pb2.WorkloadType.Name(w.workload_type).lower(),
                "canonicalName": w.canonical_name, "canonicalRevision": w.canonical_revision,
                "hostname": w.hostname, "node": w.node}
    out.update((k, v) for k, v in optional.items() if v)
    if w.native_tunnel:
        out["nativeTunnel"] = True
    if w.HasField("application_tunnel"):
        out["applicationTunnel"] = {"protocol": _APP_TUNNEL.get(w.application_tunnel.protocol, "NONE"),
                                    "port": w.application_tunnel.port or None}
    if w.authorization_policies:
        out["authorizationPolicies"] = list(w.authorization_policies)
    out["status"] = _STATUS.get(w.status, str(w.status))
    out["clusterId"] = w.cluster_id or DEFAULT_CLUSTER_ID
    if w.locality.region or w.locality.zone or w.locality.subzone:
        out["locality"] = {"region": w.locality.region, "zone": w.locality.zone, "subzone": w.locality.subzone}
    if w.services:
        out["services"] = sorted(w.services)
    out["capacity"] = w.capacity.value if w.HasField("capacity") else 1
    return out


def _endpoints(workloads: Iterable[workload_pb2.Workload]) -> dict[str, Json]:
    """service key `<ns>/<hostname>` → {workload uid → endpoint}, from each workload's `services` map."""
    by_service: dict[str, Json] = {}
    for w in workloads:
        for key, port_list in w.services.items():
            by_service.setdefault(key, {})[w.uid] = {
                "workloadUid": w.uid, "port": _ports(port_list.ports),
                "status": _STATUS.get(w.status, str(w.status))}
    return by_service


def service_json(s: workload_pb2.Service, endpoints: Json) -> Json:
    """One service as ztunnel serializes `state::service::Service`."""
    vips, cidr_vips = [], []
    for a in s.addresses:
        full = 32 if len(a.address) == 4 else 128
        if a.HasField("length") and a.length < full:
            cidr_vips.append({"network": a.network, "cidr": f"{_ip(a.address)}/{a.length}"})
        else:
            vips.append(f"{a.network}/{_ip(a.address)}")
    out: Json = {"name": s.name, "namespace": s.namespace, "hostname": s.hostname, "vips": vips}
    if cidr_vips:
        out["cidrVips"] = cidr_vips
    out["ports"] = _ports(s.ports)
    out["endpoints"] = endpoints
    out["subjectAltNames"] = list(s.subject_alt_names)
    if s.HasField("waypoint"):
        out["waypoint"] = _gateway(s.waypoint)
    if s.weighted_waypoints:
        out["weightedWaypoints"] = [{"destination": _gateway(ww.destination), "weight": ww.weight}
                                    for ww in s.weighted_waypoints]
    if s.HasField("load_balancing"):
        lb = s.load_balancing
        out["loadBalancer"] = {"routingPreferences": [_LB_SCOPE[p] for p in lb.routing_preference if p in _LB_SCOPE],
                               "mode": _LB_MODE.get(lb.mode, "Standard"),
                               "healthPolicy": _LB_HEALTH.get(lb.health_policy, "OnlyHealthy")}
    if s.ip_families in _IP_FAMILIES:
        out["ipFamilies"] = _IP_FAMILIES[s.ip_families]
    out["canonical"] = s.canonical
    out["visibility"] = _VISIBILITY.get(s.visibility, "Public")
    return out


def _string_match(m: authorization_pb2.StringMatch) -> Json:
    kind = m.WhichOneof("match_type")
    if kind == "exact":
        return {"Exact": m.exact}
    if kind == "prefix":
        return {"Prefix": m.prefix}
    if kind == "suffix":
        return {"Suffix": m.suffix}
    return {"Presence": []}  # serde's spelling of ztunnel's `StringMatch::Presence()`


def _match_json(m: authorization_pb2.Match) -> Json:
    def sa(items: Iterable[authorization_pb2.ServiceAccountMatch]) -> list[Json]:
        return [{"namespace": i.namespace, "serviceAccount": i.serviceAccount} for i in items]

    def nets(items: Iterable[authorization_pb2.Address]) -> list[str]:
        return [f"{_ip(i.address)}/{i.length}" for i in items]

    fields: Json = {
        "namespaces": [_string_match(x) for x in m.namespaces],
        "notNamespaces": [_string_match(x) for x in m.not_namespaces],
        "serviceAccounts": sa(m.service_accounts), "notServiceAccounts": sa(m.not_service_accounts),
        "principals": [_string_match(x) for x in m.principals],
        "notPrincipals": [_string_match(x) for x in m.not_principals],
        "sourceIps": nets(m.source_ips), "notSourceIps": nets(m.not_source_ips),
        "destinationIps": nets(m.destination_ips), "notDestinationIps": nets(m.not_destination_ips),
        "destinationPorts": list(m.destination_ports), "notDestinationPorts": list(m.not_destination_ports),
    }
    return {k: v for k, v in fields.items() if v}


def policy_json(a: authorization_pb2.Authorization) -> Json:
    """One policy as ztunnel serializes `rbac::Authorization`: rules → clauses → matches."""
    return {"name": a.name, "namespace": a.namespace, "scope": _SCOPE.get(a.scope, str(a.scope)),
            "action": _ACTION.get(a.action, str(a.action)),
            "rules": [[[_match_json(m) for m in clause.matches] for clause in rule.clauses] for rule in a.rules],
            "dryRun": a.dry_run}


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cert_json(pem: str) -> Json:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return {"pem": base64.b64encode(pem.encode()).decode(), "serialNumber": str(cert.serial_number),
            "validFrom": _rfc3339(cert.not_valid_before_utc), "expirationTime": _rfc3339(cert.not_valid_after_utc)}


_CERT_STATE = {"available": "Available", "initializing": "Initializing", "unavailable": "Unavailable"}


def certificate_json(entry: CertificateStatus | CertificateInfo) -> Json:
    """`{identity, state, certChain, rootCerts}` as ztunnel's `CertsDump` (chain = leaf + intermediates)."""
    info = entry if isinstance(entry, CertificateInfo) else CertificateInfo(entry)
    status = info.status
    state = _CERT_STATE.get(status.state, status.state)
    if status.state == "unavailable" and status.error:
        state = f"Unavailable: {status.error}"
    chain: list[Json] = []
    roots: list[Json] = []
    cert = info.certificate
    if cert is not None and status.state == "available":
        leaf_and_intermediates = cert.cert_chain[:-1] if len(cert.cert_chain) > 1 else cert.cert_chain
        chain = [cert_json(pem) for pem in leaf_and_intermediates]
        roots = [cert_json(cert.root_pem)]
    return {"identity": str(status.identity), "state": state, "certChain": chain, "rootCerts": roots}


def _connection_json(c: ConnectionEntry) -> Json:
    out: Json = {"src": c.src, "originalDst": c.original_dst, "actualDst": c.actual_dst, "protocol": c.protocol}
    if c.src_identity:
        out["srcIdentity"] = c.src_identity
    return out


def workload_state_json(s: WorkloadState) -> Json:
    return {"state": s.state,
            "connections": {"inbound": [_connection_json(c) for c in s.inbound],
                            "outbound": [_connection_json(c) for c in s.outbound]},
            "info": {"name": s.name, "namespace": s.namespace, "serviceAccount": s.service_account}}


def version_json() -> Json:
    try:
        version = importlib.metadata.version("ambient-py")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "pythonVersion": platform.python_version()}


def config_dump(state: StateProvider) -> Json:
    """The whole `/config_dump` document; workloads sorted by uid, services by hostname, policies by name."""
    snap = state.snapshot()
    workloads = sorted(snap.workloads.values(), key=lambda w: w.uid)
    endpoints = _endpoints(workloads)
    services = sorted(snap.services.values(), key=lambda s: (s.hostname, s.namespace))
    policies = sorted(snap.authorizations.values(), key=lambda a: (a.namespace, a.name))
    certificates = sorted(state.certificates(),
                          key=lambda c: str(c.status.identity if isinstance(c, CertificateInfo) else c.identity))
    return {
        "workloads": [workload_json(w) for w in workloads],
        "services": [service_json(s, endpoints.get(f"{s.namespace}/{s.hostname}", {})) for s in services],
        "policies": [policy_json(a) for a in policies],
        "version": version_json(),
        "config": dict(state.config()),
        "certificates": [certificate_json(c) for c in certificates],
        "workloadState": {uid: workload_state_json(s) for uid, s in sorted(state.workload_states().items())},
    }


def _readiness_response(readiness: Readiness | None) -> Response:
    status, text = readiness.status() if readiness is not None else (200, "ready\n")
    return text_response(text, status)


# -- HTTP shells ----------------------------------------------------------------------------------------
class HttpServer(admin_http.HttpServer):
    """One of the three ports on `ambient.telemetry.admin_http`; `port` is the bound port (useful with
    port 0). `start(sock)` serves on a socket already listening (a worker's, bound by the main)."""

    def __init__(self, router: Router, address: Address, what: str) -> None:
        super().__init__(router, address, what=what)

    async def start(self, sock: socket.socket | None = None) -> None:
        try:
            await super().start(sock)
        except admin_http.ListenError as exc:
            raise ConfigError(f"{exc}; is another ztunnel running on this node?") from None
        if sock is None:
            log.info("%s listening on %s:%d", self.what, self.address[0], self.port)


INDEX = """ztunnel admin
  /config_dump      workloads, services, policies, certificates and pod state (JSON)
  /logging          current log level; ?level=debug|info|warn|error|off or <scope>=<level>
  /quitquitquit     POST: shut down
  /healthz/ready    readiness
"""


class AdminServer(HttpServer):
    """Port 15000. `POST /quitquitquit` calls `on_quit()`, which should start the shutdown and return (e.g.
    set an event or cancel the main task). It answers at once rather than after the drain (as upstream
    does), so that the drain is free to close this server."""

    def __init__(self, state: StateProvider, on_quit: Callable[[], None], address: Address = ("127.0.0.1", 15000),
                 *, readiness: Readiness | None = None) -> None:
        self._state = state
        self._on_quit = on_quit
        self._readiness = readiness
        router = Router()
        router.get("/", self._index)
        router.get("/config_dump", self._config_dump)
        router.add(("GET", "POST"), "/logging", self._logging)
        router.post("/quitquitquit", self._quit)
        router.get("/healthz/ready", self._ready)
        super().__init__(router, address, "admin server")

    def _index(self, _: Request) -> Response:
        return text_response(INDEX)

    async def _config_dump(self, _: Request) -> Response:
        try:
            body = json.dumps(config_dump(self._state), indent=2)
        except Exception as exc:
            log.exception("config_dump failed")
            return text_response(f"config_dump failed: {exc}\n", 500)
        return Response(body=body.encode(), content_type=admin_http.JSON)

    async def _logging(self, request: Request) -> Response:
        return admin_http.log_level(request)

    def _quit(self, _: Request) -> Response:
        log.info("shutdown requested on the admin port")
        self._on_quit()
        return text_response("shutdown now\n")

    def _ready(self, _: Request) -> Response:
        return _readiness_response(self._readiness)


class ReadinessServer(HttpServer):
    """Port 15021: `GET /healthz/ready`."""

    def __init__(self, readiness: Readiness, address: Address = ("0.0.0.0", 15021)) -> None:
        self._readiness = readiness
        router = Router()
        router.get("/healthz/ready", self._ready)
        super().__init__(router, address, "readiness server")

    def _ready(self, _: Request) -> Response:
        return _readiness_response(self._readiness)


class MetricsServer(HttpServer):
    """Port 15020: `GET /metrics` and `GET /stats/prometheus`, the body from `render()`."""

    def __init__(self, render: Callable[[], bytes], address: Address = ("0.0.0.0", 15020)) -> None:
        self._render = render
        router = Router()
        router.get("/metrics", self._metrics)
        router.get("/stats/prometheus", self._metrics)
        super().__init__(router, address, "metrics server")

    async def _metrics(self, _: Request) -> Response:
        return Response(body=self._render(), content_type=METRICS_CONTENT_TYPE)
