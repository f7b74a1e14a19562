"""The waypoint's telemetry (issue 6, PROTOCOLS.md §10): Istio's request metrics, one access log line per
request, and trace context.

Metrics (15020, `reporter="waypoint"`): `istio_requests_total` (counter), `istio_request_duration_milliseconds`,
`istio_request_bytes` and `istio_response_bytes` (histograms), labelled with ztunnel's connection label set
(`ambient.telemetry.labels`) plus `request_protocol` (`http` | `grpc`), `response_code`, `grpc_response_status`
and `response_flags`; `connection_security_policy` is `mutual_tls` (every request arrives over HBONE).
The data path pays one small dict lookup and three histogram observations per request: the label tuples of a
(source, destination, service) are resolved once and cached (`PeerMetrics`), and each (code, flags, protocol,
gRPC status) below it once more. The request counter is folded from the duration histogram's counts when the
page is rendered, off the data path.

Access log (scope `access`, through `ambient.telemetry.logs`, so `/logging?level=access=off` silences it):
`request complete` with the fields of Istio's JSON access log format (`start_time`, `method`, `path`,
`protocol`, `response_code`, `response_flags`, `response_code_details`, `bytes_received`, `bytes_sent`,
`duration`, `x_forwarded_for`, `user_agent`, `request_id`, `authority`, `upstream_host`, `upstream_cluster`,
`downstream_remote_address`, `downstream_local_address`, `route_name`) plus ztunnel's `src.*`/`dst.*` workload
and identity fields. Written in the process's text or JSON log format.

Trace context (`ensure_trace`), as Envoy's connection manager does it: `x-request-id` is kept or created
(always, Envoy's `generate_request_id` default); `traceparent` (W3C) is kept with a new span id of ours (the
caller's span becomes the parent) or created; B3 headers (`x-b3-*`, or single `b3`) are rewritten to the same
trace and span when the caller sent them, and never created: Envoy emits B3 only with a Zipkin tracer, which
Istio configures only when a tracing provider is set up. When both arrive and disagree, `traceparent` wins.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import ProcessCollector

from ambient.proto import workload_pb2
from ambient.telemetry.labels import (
    NO_FLAGS,
    REPORTER_WAYPOINT,
    UNKNOWN,
    ConnectionLabels,
    labels_for,
)
from ambient.telemetry.logs import Bare, FieldValue, LineWriter, line_format, writer_for
from ambient.telemetry.registry import HistogramSeries, LabelText, Registry
from waypoint.http.message import Body, Headers, RequestHead, ResponseHead

# Envoy's default histogram buckets (`supported_buckets` of its stats library). Istio sets no bucket
# override for its request metrics unless a pod carries `sidecar.istio.io/statsHistogramBuckets`, so all
# three histograms of a real waypoint use these, the size histograms too (in bytes).
DURATION_BUCKETS: tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                                       60000, 300000, 600000, 1800000, 3600000)
SIZE_BUCKETS: tuple[float, ...] = DURATION_BUCKETS
MAX_PEER_CACHE = 4096  # resolved (source, destination, service, identity) label sets kept; then the cache restarts
DEFAULT_SAMPLED = False  # a trace started here is not sampled: this waypoint reports no spans
SCOPE = "access"
MESSAGE = "request complete"
GRPC = "grpc"
HTTP = "http"

# Envoy's response flags in the order its access log lists several of them (`ResponseFlagUtils`).
FLAG_ORDER = ("LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
              "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR")
_FLAG_RANK = {flag: rank for rank, flag in enumerate(FLAG_ORDER)}

REQUEST_LABEL_NAMES: tuple[str, ...] = (
    *ConnectionLabels._fields[:ConnectionLabels._fields.index("request_protocol")],
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy")
_PEER_FIELDS = len(REQUEST_LABEL_NAMES) - 5  # the source/destination part shared with ConnectionLabels


def flags_text(flags: set[str] | frozenset[str] | Sequence[str]) -> str:
    """Envoy's `%RESPONSE_FLAGS%`: `-` for none, else the flags in Envoy's order joined with commas."""
    if not flags:
        return NO_FLAGS
    return ",".join(sorted(set(flags), key=lambda f: (_FLAG_RANK.get(f, len(FLAG_ORDER)), f)))


# -- metrics ------------------------------------------------------------------------------------------------
class PeerMetrics:
    """The series of one (source, destination, service): `record` is the per-request call."""

    __slots__ = ("_owner", "_series", "labels")

    def __init__(self, owner: RequestMetrics, labels: ConnectionLabels) -> None:
        self._owner = owner
        self.labels = labels
        self._series: dict[tuple[int, str, str, str], tuple[HistogramSeries, HistogramSeries, HistogramSeries]] = {}

    def record(self, code: int, flags: str, protocol: str, grpc_status: str, duration_ms: float,
               request_bytes: int, response_bytes: int) -> None:
        key = (code, flags, protocol, grpc_status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._owner._resolve(self.labels, key)
        duration, request, response = series
        duration.observe(duration_ms)
        request.observe(request_bytes)
        response.observe(response_bytes)


class RequestMetrics:
    """istio_requests_total and the three request histograms in one registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        labels = LabelText(REQUEST_LABEL_NAMES)
        self.requests = registry.counter_family(
            "istio_requests", "The total number of requests", labels)
        self.duration = registry.histogram_family(
            "istio_request_duration_milliseconds", "The request duration in milliseconds", labels, DURATION_BUCKETS)
        self.request_bytes = registry.histogram_family(
            "istio_request_bytes", "The size of the request body in bytes", labels, SIZE_BUCKETS)
        self.response_bytes = registry.histogram_family(
            "istio_response_bytes", "The size of the response body in bytes", labels, SIZE_BUCKETS)
        self._peers: dict[ConnectionLabels, PeerMetrics] = {}
        registry.before_render(self._fold_counts)

    def peer(self, labels: ConnectionLabels) -> PeerMetrics:
        found = self._peers.get(labels)
        if found is None:
            found = self._peers[labels] = PeerMetrics(self, labels)
        return found

    def _resolve(self, labels: ConnectionLabels,
                 key: tuple[int, str, str, str]) -> tuple[HistogramSeries, HistogramSeries, HistogramSeries]:
        code, flags, protocol, grpc_status = key
        full = (*labels[:_PEER_FIELDS], protocol, str(code), grpc_status, flags, labels.connection_security_policy)
        self.requests.ensure(full)
        return self.duration.series(full), self.request_bytes.series(full), self.response_bytes.series(full)

    def _fold_counts(self) -> None:
        """Every request is one duration observation: the counter is that count, copied at render time."""
        values = self.requests.values
        for key, series in self.duration.values.items():
            values[key] = series.count


# -- trace context ------------------------------------------------------------------------------------------
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_HEX16_OR_32 = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The trace this request is part of, after `ensure_trace`."""

    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16 hex digits: the waypoint's span, the parent of whatever the upstream does
    parent_id: str | None  # the caller's span; None when the trace starts here
    sampled: bool
    request_id: str
    flags: int = 0  # the traceparent trace-flags byte (bit 0 = sampled)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


class HeaderMap(Protocol):
    """What `ensure_trace` needs of a header collection (`waypoint.http.message.Headers` is one)."""

    def get(self, name: str, default: str | None = None) -> str | None: ...
    def set(self, name: str, value: str) -> None: ...
    def remove(self, name: str) -> None: ...


def _traceparent(value: str | None) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a valid W3C traceparent (version 00, or a later version read
    as 00 per the spec), else None."""
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


@dataclass(frozen=True, slots=True)
class _B3:
    trace_id: str  # as sent: 16 or 32 hex digits
    span_id: str
    sampled: bool | None
    single: bool  # the `b3` header rather than `x-b3-*`


def _b3_sampled(value: str | None) -> bool | None:
    if value is None:
        return None
    value = value.strip().lower()
    if value in ("1", "true", "d"):
        return True
    if value in ("0", "false"):
        return False
    return None


def _b3(headers: HeaderMap) -> _B3 | None:
    trace_id = (headers.get("x-b3-traceid") or "").strip().lower()
    span_id = (headers.get("x-b3-spanid") or "").strip().lower()
    if _HEX16_OR_32.fullmatch(trace_id) and _HEX16.fullmatch(span_id):
        debug = (headers.get("x-b3-flags") or "").strip() == "1"
        return _B3(trace_id, span_id, True if debug else _b3_sampled(headers.get("x-b3-sampled")), single=False)
    single = (headers.get("b3") or "").strip().lower().split("-")
    if len(single) >= 2 and _HEX16_OR_32.fullmatch(single[0]) and _HEX16.fullmatch(single[1]):
        return _B3(single[0], single[1], _b3_sampled(single[2]) if len(single) > 2 else None, single=True)
    return None


def _new_id(rng: random.Random, bits: int) -> str:
    value = 0
    while value == 0:  # all-zero ids are invalid in both W3C and B3
        value = rng.getrandbits(bits)
    return f"{value:0{bits // 4}x}"


_rng = random.Random()


def _uuid4(rng: random.Random) -> str:
    """A random (version 4, RFC 4122 variant) UUID's text, without `uuid.UUID`'s validation cost."""
    value = rng.getrandbits(128) & ~(0xF000 << 64 | 0xC000 << 48) | (0x4000 << 64 | 0x8000 << 48)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def ensure_trace(headers: HeaderMap, rng: random.Random | None = None) -> TraceContext:
    """Make `headers` carry this hop's trace context (see the module docstring) and return it."""
    rng = rng or _rng
    request_id = (headers.get("x-request-id") or "").strip()
    if not request_id:
        request_id = _uuid4(rng)
        headers.set("x-request-id", request_id)
    incoming = _traceparent(headers.get("traceparent"))
    b3 = _b3(headers)
    parent_id: str | None
    if incoming is not None:
        trace_id, parent_id, flags = incoming
    else:
        headers.remove("tracestate")  # it belongs to a traceparent we did not get (or could not read)
        if b3 is not None:
            trace_id, parent_id = b3.trace_id.rjust(32, "0"), b3.span_id
            sampled = DEFAULT_SAMPLED if b3.sampled is None else b3.sampled
        else:
            trace_id, parent_id, sampled = _new_id(rng, 128), None, DEFAULT_SAMPLED
        flags = 1 if sampled else 0
    context = TraceContext(trace_id, _new_id(rng, 64), parent_id, bool(flags & 1), request_id, flags)
    headers.set("traceparent", context.traceparent)
    if b3 is not None:
        _rewrite_b3(headers, b3, context)
    return context


def _rewrite_b3(headers: HeaderMap, b3: _B3, context: TraceContext) -> None:
    # A 64-bit B3 trace id stays 64-bit when it is still this trace (the lower half of it): B3 peers that
    # only know 64-bit ids keep working.
    trace_id = b3.trace_id if context.trace_id == b3.trace_id.rjust(32, "0") else context.trace_id
    sampled = "1" if context.sampled else "0"
    if b3.single:
        parent = f"-{context.parent_id}" if context.parent_id else ""
        headers.set("b3", f"{trace_id}-{context.span_id}-{sampled}{parent}")
        return
    headers.set("x-b3-traceid", trace_id)
    headers.set("x-b3-spanid", context.span_id)
    if context.parent_id:
        headers.set("x-b3-parentspanid", context.parent_id)
    else:
        headers.remove("x-b3-parentspanid")
    if (headers.get("x-b3-flags") or "").strip() != "1":  # debug implies sampled; Envoy leaves the pair alone
        headers.set("x-b3-sampled", sampled)


# -- one request --------------------------------------------------------------------------------------------
class DownstreamInfo(Protocol):
    """What the proxy knows about the HBONE tunnel a request came in on (`waypoint.proxy.Downstream`)."""

    @property
    def peer_identity(self) -> str | None: ...
    @property
    def source_ip(self) -> str: ...
    @property
    def source_workload(self) -> workload_pb2.Workload | None: ...
    @property
    def target_ip(self) -> str: ...
    @property
    def target_port(self) -> int: ...
    @property
    def service(self) -> workload_pb2.Service | None: ...
    @property
    def workload(self) -> workload_pb2.Workload | None: ...


class ClusterInfo(Protocol):
    @property
    def key(self) -> tuple[str, str | None, int]: ...  # (service hostname, subset, port)


class DestinationInfo(Protocol):
    @property
    def host(self) -> str: ...


@dataclass(slots=True)
class RequestRecord:
    """What the pipeline learns about one request; `Telemetry.track` turns it into metrics and a log line.
    The proxy sets `route`, `policy` (the policy that denied it), `details`, adds Envoy flags to `flags`,
    and calls `destination()`, `response()` as it goes; `upstream_host`/`upstream_workload` name the
    endpoint of the last attempt."""

    down: DownstreamInfo
    method: str
    path: str
    protocol: str  # "HTTP/1.1" | "HTTP/2": what the downstream spoke
    authority: str
    headers: Headers  # the request's headers (read at the end: ensure_trace may add x-request-id later)
    started: float  # time.monotonic()
    started_wall: float  # time.time(), for the log's start_time
    flags: set[str] = field(default_factory=set)
    route: str | None = None
    policy: str | None = None
    details: str | None = None  # Envoy's %RESPONSE_CODE_DETAILS%, when the proxy knows it
    destination_host: str | None = None
    upstream_cluster: str | None = None
    upstream_host: str | None = None
    upstream_workload: workload_pb2.Workload | None = None
    retries: int = 0
    status: int = 0  # 0 = no response was sent (Envoy logs 0 too)
    response_headers: Headers | None = None
    request_bytes: int | None = None  # counted by `request_body`; else the declared Content-Length
    response_bytes: int = 0
    done: bool = False

    @classmethod
    def start(cls, head: RequestHead, down: DownstreamInfo, now: float | None = None) -> RequestRecord:
        return cls(down, head.method, head.path, head.protocol, head.authority, head.headers,
                   time.monotonic() if now is None else now, time.time())

    def destination(self, cluster: ClusterInfo, destination: DestinationInfo | None = None) -> None:
        """The routed cluster: `outbound|<port>|<subset>|<host>` as Envoy names it."""
        host, subset, port = cluster.key
        self.destination_host = destination.host if destination is not None else host
        self.upstream_cluster = f"outbound|{port}|{subset or ''}|{host}"

    def response(self, head: ResponseHead) -> None:
        self.status = head.status
        self.response_headers = head.headers

    def request_body(self, body: Body) -> Body:
        """`body`, counting its bytes into `request_bytes` as the upstream reads it."""
        self.request_bytes = 0
        return _CountingBody(body, self, None)

    @property
    def grpc(self) -> bool:
        return (self.headers.get("content-type") or "").startswith("application/grpc")


class _CountingBody(Body):
    """A body that counts what passes through it; at its end (or `aclose`) it tells `on_end`."""

    __slots__ = ("_inner", "_on_end", "_record")

    def __init__(self, inner: Body, record: RequestRecord, on_end: Telemetry | None) -> None:
        super().__init__(inner.length, inner.trailers)
        self._inner, self._record, self._on_end = inner, record, on_end

    def _count(self, chunk: bytes | None) -> bytes | None:
        if chunk is None:
            return None
        if chunk:
            if self._on_end is None:
                self._record.request_bytes = (self._record.request_bytes or 0) + len(chunk)
            else:
                self._record.response_bytes += len(chunk)
        else:
            self.trailers = self._inner.trailers
            self._end()
        return chunk

    def _end(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end.finish(self._record, self._inner.trailers)

    async def read(self) -> bytes:
        chunk = self._count(await self._inner.read())
        assert chunk is not None
        return chunk

    def read_nowait(self) -> bytes | None:
        return self._count(self._inner.read_nowait())

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._end()


# -- access log ---------------------------------------------------------------------------------------------
def _known(value: str) -> str | None:
    return None if not value or value == UNKNOWN else value


def _address(ip: str, port: int) -> Bare:
    return Bare(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")


def _rfc3339_ms(epoch: float) -> str:
    seconds = int(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((epoch - seconds) * 1000):03d}Z"


def access_fields(record: RequestRecord, labels: ConnectionLabels, flags: str, duration_ms: float,
                  request_bytes: int) -> dict[str, FieldValue]:
    """One access log line's fields: Istio's JSON access log names, then ztunnel's src/dst names."""
    down = record.down
    details = record.details
    if details is None and record.policy is not None:
        details = f"rbac_access_denied_matched_policy[{record.policy}]"
    headers = record.headers
    return {
        "start_time": _rfc3339_ms(record.started_wall),
        "method": record.method,
        "path": record.path,  # as received: a rewrite changes the head, not the record
        "protocol": record.protocol,
        "response_code": record.status,
        "response_flags": flags,
        "response_code_details": details,
        "bytes_received": request_bytes,
        "bytes_sent": record.response_bytes,
        "duration": int(duration_ms),
        "x_forwarded_for": headers.get("x-forwarded-for"),
        "user_agent": headers.get("user-agent"),
        "request_id": headers.get("x-request-id"),
        "authority": record.authority,
        "upstream_host": Bare(record.upstream_host) if record.upstream_host else None,
        "upstream_cluster": record.upstream_cluster,
        "downstream_remote_address": Bare(down.source_ip) if down.source_ip else None,
        "downstream_local_address": _address(down.target_ip, down.target_port),
        "route_name": record.route,
        "src.workload": down.source_workload.name if down.source_workload is not None else None,
        "src.namespace": _known(labels.source_workload_namespace),
        "src.identity": down.peer_identity,
        "dst.service": _known(labels.destination_service),
        "dst.workload": record.upstream_workload.name if record.upstream_workload is not None else None,
        "dst.namespace": _known(labels.destination_workload_namespace),
        "dst.identity": _known(labels.destination_principal) if record.upstream_workload is not None else None,
    }


class RequestAccessLog:
    def __init__(self, log_format: str = "text", writer: LineWriter | None = None) -> None:
        self._format = line_format(log_format)  # ValueError names the accepted formats
        self._writer = writer or writer_for()
        self._logger = logging.getLogger(SCOPE)  # only for its level

    @property
    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, fields: dict[str, FieldValue]) -> None:
        self._writer.write(self._format(time.time(), "info", SCOPE, MESSAGE, fields))


# -- the whole --------------------------------------------------------------------------------------------
def _service_for_host(host: str) -> workload_pb2.Service:
    """Labels for a routed host without a Service in xDS: `<name>.<namespace>.svc...` split as Istio does."""
    parts = host.split(".")
    namespace = parts[1] if len(parts) > 2 and parts[2] == "svc" else ""
    return workload_pb2.Service(hostname=host, name=parts[0] if namespace else "", namespace=namespace)


class Telemetry:
    """Request metrics, access log and rendering for one waypoint process.

    `track(record, response_body)` returns the response body to send; when it ends (or is closed) the
    request is counted and logged. `render()` is the body of `/stats/prometheus` (15000) and `/metrics`
    (15020)."""

    def __init__(self, access_log: bool = True, *, log_format: str = "text", registry: Registry | None = None,
                 writer: LineWriter | None = None, process: bool = True) -> None:
        self.registry = registry if registry is not None else Registry()
        self.metrics = RequestMetrics(self.registry)
        self.access_log = RequestAccessLog(log_format, writer) if access_log else None
        if process:  # process_resident_memory_bytes, process_cpu_seconds_total, ...
            self.registry.add_collector(ProcessCollector(registry=None))
        self._peers: dict[tuple[int, int, int, str | None], tuple[object, object, object, PeerMetrics]] = {}
        self._routed_services: dict[str, workload_pb2.Service] = {}

    def render(self) -> bytes:
        return self.registry.render()

    def track(self, record: RequestRecord, body: Body) -> Body:
        return _CountingBody(body, record, self)

    def finish(self, record: RequestRecord, trailers: Headers | None = None) -> None:
        """Count and log `record` (once; later calls do nothing)."""
        if record.done:
            return
        record.done = True
        duration_ms = (time.monotonic() - record.started) * 1000.0
        request_bytes = record.request_bytes
        if request_bytes is None:
            declared = record.headers.get("content-length") or ""
            request_bytes = int(declared) if declared.isdigit() else 0
        flags = flags_text(record.flags)
        protocol, grpc_status = HTTP, ""
        if record.grpc:
            protocol = GRPC
            grpc_status = ((trailers.get("grpc-status") if trailers is not None else None)
                           or (record.response_headers.get("grpc-status") if record.response_headers else None)
                           or "")
        peer = self._peer(record)
        peer.record(record.status, flags, protocol, grpc_status, duration_ms, request_bytes, record.response_bytes)
        if self.access_log is not None and self.access_log.enabled:
            self.access_log.write(access_fields(record, peer.labels, flags, duration_ms, request_bytes))

    def _service(self, record: RequestRecord) -> workload_pb2.Service | None:
        service = record.down.service
        host = record.destination_host
        if host is None or (service is not None and service.hostname == host):
            return service
        routed = self._routed_services.get(host)
        if routed is None:
            if len(self._routed_services) >= MAX_PEER_CACHE:
                self._routed_services.clear()
            routed = self._routed_services[host] = _service_for_host(host)
        return routed

    def _peer(self, record: RequestRecord) -> PeerMetrics:
        """The label set of (source workload, destination workload, service, caller identity), cached by the
        identity of the xDS objects (a changed workload is a new object, so a new entry)."""
        down = record.down
        src = down.source_workload
        dst = record.upstream_workload if record.upstream_workload is not None else down.workload
        service = self._service(record)
        key = (id(src), id(dst), id(service), down.peer_identity)
        entry = self._peers.get(key)
        if entry is not None and entry[0] is src and entry[1] is dst and entry[2] is service:
            return entry[3]
        labels = labels_for(src, dst, service, down.peer_identity, None, REPORTER_WAYPOINT, secure=True)
        peer = self.metrics.peer(labels)
        if len(self._peers) >= MAX_PEER_CACHE:
            self._peers.clear()
        self._peers[key] = (src, dst, service, peer)
        return peer
