"""The waypoint's request telemetry: Istio's request metrics with `reporter="waypoint"` and the full label
set, one access log line per request (text and JSON), and trace context kept, created and kept consistent."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.proto import workload_pb2
from ambient.telemetry import logs
from ambient.telemetry.logs import LineWriter
from waypoint.http.message import Body, Headers, RequestHead, ResponseHead, bytes_body
from waypoint.telemetry import (
    DURATION_BUCKETS,
    REQUEST_LABEL_NAMES,
    RequestRecord,
    Telemetry,
    ensure_trace,
    flags_text,
)

PRODUCTPAGE = workload_pb2.Workload(
    uid="Kubernetes//Pod/bookinfo/productpage-v1-5f9", name="productpage-v1-5f9", namespace="bookinfo",
    addresses=[bytes([10, 244, 1, 7])], service_account="bookinfo-productpage", workload_name="productpage-v1",
    canonical_name="productpage", canonical_revision="v1", cluster_id="Kubernetes", trust_domain="cluster.local")
REVIEWS_V2 = workload_pb2.Workload(
    uid="Kubernetes//Pod/bookinfo/reviews-v2-7c4", name="reviews-v2-7c4", namespace="bookinfo",
    addresses=[bytes([10, 244, 2, 9])], service_account="bookinfo-reviews", workload_name="reviews-v2",
    canonical_name="reviews", canonical_revision="v2", cluster_id="Kubernetes", trust_domain="cluster.local")
REVIEWS = workload_pb2.Service(name="reviews", namespace="bookinfo", hostname="reviews.bookinfo.svc.cluster.local")
CALLER = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"


@dataclass(frozen=True)
class Down:
    peer_identity: str | None = CALLER
    source_ip: str = "10.244.1.7"
    source_workload: workload_pb2.Workload | None = field(default_factory=lambda: PRODUCTPAGE)
    target_ip: str = "10.96.0.40"
    target_port: int = 9080
    service: workload_pb2.Service | None = field(default_factory=lambda: REVIEWS)
    workload: workload_pb2.Workload | None = None


@dataclass(frozen=True)
class Cluster:
    key: tuple[str, str | None, int]


@dataclass(frozen=True)
class Destination:
    host: str


Sink = io.StringIO


@pytest.fixture
def out() -> Sink:
    return io.StringIO()


def telemetry(sink: io.StringIO, log_format: str = "text", access_log: bool = True) -> tuple[Telemetry, LineWriter]:
    writer = LineWriter(sink)
    return Telemetry(access_log, log_format=log_format, writer=writer, process=False), writer


def request(method: str = "GET", path: str = "/reviews/0", headers: Headers | None = None) -> RequestHead:
    return RequestHead(method, path, "reviews:9080", headers if headers is not None else Headers(
        [("user-agent", "curl/8.5.0"), ("x-request-id", "req-1")]))


async def serve(t: Telemetry, record: RequestRecord, status: int = 200, body: bytes = b"ok",
                headers: Headers | None = None, trailers: Headers | None = None) -> bytes:
    """What the proxy does: set the response, then the codec reads the tracked body to its end."""
    record.response(ResponseHead(status, headers or Headers()))
    tracked = t.track(record, bytes_body(body, trailers))
    data = b""
    while chunk := await tracked.read():
        data += chunk
    return data


def routed(record: RequestRecord, host: str = "reviews.bookinfo.svc.cluster.local", subset: str | None = "v2",
           workload: workload_pb2.Workload | None = REVIEWS_V2) -> RequestRecord:
    record.destination(Cluster((host, subset, 9080)), Destination(host))
    record.upstream_host = "10.244.2.9:9080"
    record.upstream_workload = workload
    record.route = "reviews-v2"
    return record


def series(text: str, name: str) -> list[tuple[dict[str, str], str]]:
    found = []
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match:
            found.append((dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))), match.group(2)))
    return found


# -- metrics ------------------------------------------------------------------------------------------------
async def test_requests_are_counted_with_the_full_istio_label_set(out: Sink) -> None:
    t, _ = telemetry(out, access_log=False)
    for _ in range(3):
        await serve(t, routed(RequestRecord.start(request(), Down())), body=b"x" * 295)
    await serve(t, routed(RequestRecord.start(request(), Down())), status=503, body=b"no healthy upstream")

    text = t.render().decode()
    counts = series(text, "istio_requests_total")
    assert [(labels["response_code"], value) for labels, value in counts] == [("200", "3"), ("503", "1")]
    labels = counts[0][0]
    assert list(labels) == list(REQUEST_LABEL_NAMES)
    assert labels == {
        "reporter": "waypoint",
        "source_workload": "productpage-v1", "source_canonical_service": "productpage",
        "source_canonical_revision": "v1", "source_workload_namespace": "bookinfo", "source_principal": CALLER,
        "source_app": "productpage", "source_version": "v1", "source_cluster": "Kubernetes",
        "destination_service": "reviews.bookinfo.svc.cluster.local", "destination_service_namespace": "bookinfo",
        "destination_service_name": "reviews", "destination_workload": "reviews-v2",
        "destination_canonical_service": "reviews", "destination_canonical_revision": "v2",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        "destination_app": "reviews", "destination_version": "v2", "destination_cluster": "Kubernetes",
        "request_protocol": "http", "response_code": "200", "grpc_response_status": "", "response_flags": "-",
        "connection_security_policy": "mutual_tls"}
    assert "# TYPE istio_requests_total counter" in text
    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        assert f"# TYPE {name} histogram" in text
        buckets = [(ls["le"], v) for ls, v in series(text, f"{name}_bucket") if ls["response_code"] == "200"]
        assert [le for le, _ in buckets] == [f"{b:.32g}" for b in DURATION_BUCKETS] + ["+Inf"]
        assert buckets[-1][1] == "3"
    response_sum = [v for ls, v in series(text, "istio_response_bytes_sum") if ls["response_code"] == "200"]
    assert response_sum == ["885"]  # 3 requests of 295 bytes
    sizes = {ls["le"]: v for ls, v in series(text, "istio_response_bytes_bucket") if ls["response_code"] == "200"}
    assert (sizes["250"], sizes["500"]) == ("0", "3")


async def test_flags_grpc_status_and_a_request_that_never_reached_an_upstream(out: Sink) -> None:
    t, _ = telemetry(out, access_log=False)
    denied = RequestRecord.start(request(), Down())
    denied.flags.update({"URX", "UF"})
    await serve(t, denied, status=503)
    grpc = routed(RequestRecord.start(request("POST", "/grpc.health.v1.Health/Check", Headers(
        [("content-type", "application/grpc"), ("content-length", "5")])), Down()))
    await serve(t, grpc, body=b"\x00\x00\x00\x00\x00", trailers=Headers([("grpc-status", "14")]))

    counts = series(t.render().decode(), "istio_requests_total")
    failed = next(labels for labels, _ in counts if labels["response_code"] == "503")
    assert failed["response_flags"] == "UF,URX"  # Envoy's order
    assert failed["destination_workload"] == "unknown" and failed["destination_service_name"] == "reviews"
    called = next(labels for labels, _ in counts if labels["request_protocol"] == "grpc")
    assert (called["response_code"], called["grpc_response_status"]) == ("200", "14")
    assert flags_text(set()) == "-" and flags_text({"NR"}) == "NR" and flags_text({"DI", "FI", "XX"}) == "DI,FI,XX"


async def test_a_route_to_another_host_labels_that_service(out: Sink) -> None:
    t, _ = telemetry(out, access_log=False)
    await serve(t, routed(RequestRecord.start(request(), Down()), host="ratings.bookinfo.svc.cluster.local",
                          subset=None, workload=None))
    (labels, _), = series(t.render().decode(), "istio_requests_total")
    assert (labels["destination_service"], labels["destination_service_name"],
            labels["destination_service_namespace"]) == ("ratings.bookinfo.svc.cluster.local", "ratings", "bookinfo")


async def test_label_sets_are_resolved_once_per_peer_and_again_when_a_workload_changes(out: Sink) -> None:
    t, _ = telemetry(out, access_log=False)
    first = t._peer(routed(RequestRecord.start(request(), Down())))
    assert t._peer(routed(RequestRecord.start(request(), Down()))) is first
    moved = workload_pb2.Workload()
    moved.CopyFrom(REVIEWS_V2)
    moved.canonical_revision = "v2b"  # an xDS update is a new object
    other = t._peer(routed(RequestRecord.start(request(), Down()), workload=moved))
    assert other is not first and other.labels.destination_version == "v2b"


async def test_request_bytes_are_counted_or_taken_from_content_length(out: Sink) -> None:
    t, _ = telemetry(out, access_log=False)
    counted = routed(RequestRecord.start(request("POST"), Down()))
    upload = counted.request_body(bytes_body(b"y" * 1200))
    while await upload.read():
        pass
    await serve(t, counted)
    declared = routed(RequestRecord.start(request("POST", headers=Headers([("content-length", "42")])), Down()))
    await serve(t, declared)
    sums = [v for _, v in series(t.render().decode(), "istio_request_bytes_sum")]
    assert sums == ["1242"]


async def test_a_body_closed_early_is_counted_once(out: Sink) -> None:
    t, _ = telemetry(out, access_log=False)
    record = routed(RequestRecord.start(request(), Down()))
    record.response(ResponseHead(200, Headers()))
    tracked: Body = t.track(record, bytes_body(b"abc"))
    assert tracked.read_nowait() == b"abc"
    await tracked.aclose()
    await tracked.aclose()
    t.finish(record)
    assert [v for _, v in series(t.render().decode(), "istio_requests_total")] == ["1"]


# -- access log -----------------------------------------------------------------------------------------------
@pytest.fixture
def access_level() -> Iterator[None]:
    logger = logging.getLogger("access")
    before, overrides = logger.level, dict(logs._overrides)
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(before)
    logs._overrides.clear()
    logs._overrides.update(overrides)


async def test_access_log_line_in_json_has_envoys_and_ztunnels_fields(out: Sink, access_level: None) -> None:
    t, writer = telemetry(out, "json")
    record = routed(RequestRecord.start(request(), Down()))
    ensure_trace(record.headers)
    record.flags.add("URX")
    record.retries = 2
    await serve(t, record, body=b"x" * 10)
    writer.close()
    line = json.loads(out.getvalue())
    assert (line["level"], line["scope"], line["message"]) == ("info", "access", "request complete")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["start_time"])
    assert {k: line[k] for k in ("method", "path", "protocol", "response_code", "response_flags", "bytes_received",
                                 "bytes_sent", "user_agent", "request_id", "authority", "upstream_host",
                                 "upstream_cluster", "downstream_remote_address", "downstream_local_address",
                                 "route_name", "src.workload", "src.namespace", "src.identity", "dst.service",
                                 "dst.workload", "dst.namespace", "dst.identity")} == {
        "method": "GET", "path": "/reviews/0", "protocol": "HTTP/1.1", "response_code": 200,
        "response_flags": "URX", "bytes_received": 0, "bytes_sent": 10, "user_agent": "curl/8.5.0",
        "request_id": "req-1", "authority": "reviews:9080", "upstream_host": "10.244.2.9:9080",
        "upstream_cluster": "outbound|9080|v2|reviews.bookinfo.svc.cluster.local",
        "downstream_remote_address": "10.244.1.7", "downstream_local_address": "10.96.0.40:9080",
        "route_name": "reviews-v2", "src.workload": "productpage-v1-5f9", "src.namespace": "bookinfo",
        "src.identity": CALLER, "dst.service": "reviews.bookinfo.svc.cluster.local",
        "dst.workload": "reviews-v2-7c4", "dst.namespace": "bookinfo",
        "dst.identity": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"}
    assert isinstance(line["duration"], int) and "response_code_details" not in line


async def test_access_log_text_line_and_a_denial_naming_the_policy(out: Sink, access_level: None) -> None:
    t, writer = telemetry(out, "text")
    record = RequestRecord.start(request("DELETE"), Down())
    record.policy = "bookinfo.deny-delete"
    await serve(t, record, status=403, body=b"RBAC: access denied")
    writer.close()
    head, fields = out.getvalue().rstrip("\n").split("\t")[1:4], out.getvalue().rstrip("\n").split("\t")[4]
    assert head == ["info", "access", "request complete"]
    assert 'method="DELETE"' in fields and "response_code=403" in fields and "bytes_sent=19" in fields
    assert 'response_code_details="rbac_access_denied_matched_policy[bookinfo.deny-delete]"' in fields
    assert "downstream_local_address=10.96.0.40:9080" in fields  # addresses unquoted, as ztunnel writes them
    assert "upstream_host" not in fields and "dst.workload" not in fields  # never reached an upstream


async def test_access_log_off_writes_nothing_but_metrics_still_count(out: Sink, access_level: None) -> None:
    logs.set_level("access=off")
    t, writer = telemetry(out)
    await serve(t, routed(RequestRecord.start(request(), Down())))
    writer.close()
    assert out.getvalue() == ""
    assert [v for _, v in series(t.render().decode(), "istio_requests_total")] == ["1"]


# -- trace context ------------------------------------------------------------------------------------------
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def test_a_request_without_context_gets_a_request_id_and_a_new_trace_but_no_b3() -> None:
    headers = Headers([("accept", "*/*")])
    context = ensure_trace(headers, random.Random(7))
    assert uuid.UUID(headers.get("x-request-id") or "").version == 4 and context.request_id == headers.get(
        "x-request-id")
    match = TRACEPARENT.fullmatch(headers.get("traceparent") or "")
    assert match is not None and match.groups() == (context.trace_id, context.span_id, "00")
    assert context.parent_id is None and not context.sampled
    assert not any(name.startswith("x-b3") or name == "b3" for name, _ in headers)


def test_an_incoming_traceparent_keeps_its_trace_and_becomes_the_parent() -> None:
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = Headers([("traceparent", incoming), ("tracestate", "congo=t61rcWkgMzE"), ("x-request-id", "abc")])
    context = ensure_trace(headers)
    assert (context.trace_id, context.parent_id, context.sampled, context.request_id) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True, "abc")
    assert context.span_id != "00f067aa0ba902b7"
    assert headers.get("traceparent") == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{context.span_id}-01"
    assert headers.get("tracestate") == "congo=t61rcWkgMzE" and headers.get("x-request-id") == "abc"


@pytest.mark.parametrize("bad", [
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has 4 fields
    "garbage",
])
def test_an_invalid_traceparent_restarts_the_trace_and_drops_tracestate(bad: str) -> None:
    headers = Headers([("traceparent", bad), ("tracestate", "a=b")])
    context = ensure_trace(headers)
    assert context.parent_id is None and "tracestate" not in headers
    assert TRACEPARENT.fullmatch(headers.get("traceparent") or "")


def test_a_later_traceparent_version_is_read_as_version_00() -> None:
    headers = Headers([("traceparent", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-future")])
    context = ensure_trace(headers)
    assert (context.trace_id, context.parent_id, context.flags) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 3)
    assert (headers.get("traceparent") or "").startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")


def test_b3_headers_from_the_caller_follow_the_trace() -> None:
    headers = Headers([("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"), ("x-b3-spanid", "e457b5a2e4d86bd1"),
                       ("x-b3-parentspanid", "05e3ac9a4f6e3b90"), ("x-b3-sampled", "1")])
    context = ensure_trace(headers)
    assert (context.trace_id, context.parent_id, context.sampled) == (
        "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1", True)
    assert headers.get("traceparent") == f"00-80f198ee56343ba864fe8b2a57d3eff7-{context.span_id}-01"
    assert (headers.get("x-b3-traceid"), headers.get("x-b3-spanid"), headers.get("x-b3-parentspanid"),
            headers.get("x-b3-sampled")) == ("80f198ee56343ba864fe8b2a57d3eff7", context.span_id,
                                             "e457b5a2e4d86bd1", "1")


def test_a_64_bit_b3_trace_id_stays_64_bit() -> None:
    headers = Headers([("X-B3-TraceId", "64fe8b2a57d3eff7"), ("X-B3-SpanId", "e457b5a2e4d86bd1"),
                       ("x-b3-sampled", "0")])
    context = ensure_trace(headers)
    assert context.trace_id == "000000000000000064fe8b2a57d3eff7" and not context.sampled
    assert headers.get("x-b3-traceid") == "64fe8b2a57d3eff7" and headers.get("x-b3-sampled") == "0"


def test_when_traceparent_and_b3_disagree_traceparent_wins_and_b3_is_rewritten() -> None:
    headers = Headers([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
                       ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"), ("x-b3-spanid", "e457b5a2e4d86bd1"),
                       ("x-b3-flags", "1")])
    context = ensure_trace(headers)
    assert headers.get("x-b3-traceid") == "4bf92f3577b34da6a3ce929d0e0e4736" == context.trace_id
    assert headers.get("x-b3-spanid") == context.span_id and headers.get("x-b3-parentspanid") == "00f067aa0ba902b7"
    assert headers.get("x-b3-flags") == "1" and "x-b3-sampled" not in headers  # debug stays as the caller sent it


def test_the_single_b3_header_is_rewritten_in_place() -> None:
    headers = Headers([("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")])
    context = ensure_trace(headers)
    assert headers.get("b3") == f"80f198ee56343ba864fe8b2a57d3eff7-{context.span_id}-1-e457b5a2e4d86bd1"
    assert "x-b3-traceid" not in headers


_header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=70)


@given(st.dictionaries(st.sampled_from(["traceparent", "tracestate", "x-request-id", "x-b3-traceid", "x-b3-spanid",
                                        "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3"]), _header_value))
def test_any_trace_headers_yield_a_valid_traceparent_and_a_request_id(given_headers: dict[str, str]) -> None:
    headers = Headers(list(given_headers.items()))
    context = ensure_trace(headers)
    match = TRACEPARENT.fullmatch(headers.get("traceparent") or "")
    assert match is not None and match.group(1) == context.trace_id and match.group(2) == context.span_id
    assert context.trace_id != "0" * 32 and context.span_id != "0" * 16
    assert (headers.get("x-request-id") or "").strip()


def test_recording_a_request_is_cheap() -> None:
    """The data path's share: a resolved peer, one dict lookup and three observations per request."""
    t = Telemetry(False, process=False)
    record = routed(RequestRecord.start(request(), Down()))
    peer = t._peer(record)
    peer.record(200, "-", "http", "", 3.2, 0, 295)
    started = time.perf_counter()
    for _ in range(20_000):
        peer.record(200, "-", "http", "", 3.2, 0, 295)
    per_call = (time.perf_counter() - started) / 20_000
    assert per_call < 20e-6, f"{per_call * 1e6:.1f} µs per request"  # ~1-2 µs on the bench VM; loose for CI
