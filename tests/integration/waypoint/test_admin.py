"""The waypoint's admin (15000), metrics (15020) and readiness (15021) ports over real HTTP on 127.0.0.1:
the config dump of the compiled configuration, log levels, shutdown, metrics scraped from real requests'
telemetry, and readiness with its reason."""

from __future__ import annotations

import enum
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from ambient.proto import workload_pb2
from ambient.telemetry import logs
from ambient.telemetry.admin_http import ListenError, Readiness, fetch
from waypoint.admin import AdminServer, MetricsServer, ReadinessServer, config_dump_document
from waypoint.http.message import Headers, RequestHead, ResponseHead, bytes_body
from waypoint.telemetry import RequestRecord, Telemetry

HOST = "127.0.0.1"


class Lb(enum.Enum):
    ROUND_ROBIN = 1
    LEAST_REQUEST = 2


@dataclass(frozen=True)
class Match:
    uri_regex: re.Pattern[str]
    methods: frozenset[str]


@dataclass(frozen=True)
class Route:
    name: str
    matches: tuple[Match, ...]
    timeout: float | None = None


@dataclass(frozen=True)
class Policy:
    lb: Lb
    subsets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


class App:
    """What the waypoint app hands to its admin port."""

    def __init__(self) -> None:
        self.broken = False

    def config_dump(self) -> Mapping[str, Any]:
        if self.broken:
            raise RuntimeError("config not compiled yet")
        return {
            "routes": {"reviews.bookinfo.svc.cluster.local:9080": [
                Route("reviews-v2", (Match(re.compile(r"^/reviews/\d+$"), frozenset({"GET", "HEAD"})),), 2.0)]},
            "clusters": {"outbound|9080|v2|reviews.bookinfo.svc.cluster.local": Policy(
                Lb.LEAST_REQUEST, {"v2": {"version": "v2"}})},
            "certificates": [{"identity": "spiffe://cluster.local/ns/bookinfo/sa/waypoint", "state": "Available"}],
            "errors": [{"kind": "VirtualService", "name": "reviews", "field": "http[1].route[0].destination.subset",
                        "message": "unknown subset v9"}],
            "services": [workload_pb2.Service(name="reviews", namespace="bookinfo", hostname="reviews.bookinfo")],
        }


@dataclass(frozen=True)
class Down:
    peer_identity: str | None = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
    source_ip: str = "10.244.1.7"
    source_workload: workload_pb2.Workload | None = None
    target_ip: str = "10.96.0.40"
    target_port: int = 9080
    service: workload_pb2.Service | None = None
    workload: workload_pb2.Workload | None = None


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
async def admin(app: App) -> AsyncIterator[tuple[AdminServer, list[str], Readiness, Telemetry]]:
    quits: list[str] = []
    readiness = Readiness(["certificate", "xds"])
    telemetry = Telemetry(False, process=False)
    server = AdminServer(app, lambda: quits.append("quit"), (HOST, 0), readiness=readiness,
                         metrics=telemetry.render)
    await server.start()
    yield server, quits, readiness, telemetry
    await server.close()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    status, body = await fetch(HOST, port, path, method=method)
    return status, body.decode()


async def a_request(telemetry: Telemetry, status: int) -> None:
    record = RequestRecord.start(RequestHead("GET", "/ratings/0", "ratings:9080", Headers()), Down())
    record.response(ResponseHead(status, Headers()))
    body = telemetry.track(record, bytes_body(b"{}"))
    while await body.read():
        pass


# -- 15000 ----------------------------------------------------------------------------------------------------
async def test_config_dump_shows_the_compiled_configuration(admin: Any) -> None:
    status, body = await get(admin[0].port, "/config_dump")
    assert status == 200
    dump = json.loads(body)
    assert list(dump) == ["routes", "clusters", "policies", "errors", "certificates", "version", "services"]
    assert dump["routes"] == {"reviews.bookinfo.svc.cluster.local:9080": [
        {"name": "reviews-v2", "matches": [{"uriRegex": r"^/reviews/\d+$", "methods": ["GET", "HEAD"]}],
         "timeout": 2.0}]}
    assert dump["clusters"] == {"outbound|9080|v2|reviews.bookinfo.svc.cluster.local": {
        "lb": "LEAST_REQUEST", "subsets": {"v2": {"version": "v2"}}}}
    assert dump["policies"] == [] and dump["errors"][0]["message"] == "unknown subset v9"
    assert dump["certificates"][0]["state"] == "Available"
    assert dump["version"]["version"] and dump["version"]["pythonVersion"]
    assert dump["services"] == [{"name": "reviews", "namespace": "bookinfo", "hostname": "reviews.bookinfo"}]


async def test_config_dump_takes_a_plain_callable_too() -> None:
    server = AdminServer(lambda: {"routes": {}, "version": "test"}, lambda: None, (HOST, 0))
    await server.start()
    try:
        status, body = await get(server.port, "/config_dump")
    finally:
        await server.close()
    assert status == 200 and json.loads(body) == {"routes": {}, "clusters": [], "policies": [], "errors": [],
                                                  "certificates": [], "version": "test"}
    assert config_dump_document({"clusters": {("a", 1): float("inf")}})["clusters"] == {"['a', 1]": "inf"}


async def test_a_failing_config_dump_is_a_500_with_the_reason(admin: Any, app: App) -> None:
    app.broken = True
    assert await get(admin[0].port, "/config_dump") == (500, "config_dump failed: config not compiled yet\n")


@pytest.fixture
def root_level() -> Iterator[None]:
    root = logging.getLogger()
    before, overrides = root.level, dict(logs._overrides)
    root.setLevel(logging.INFO)
    yield
    root.setLevel(before)
    logging.getLogger("access").setLevel(logging.NOTSET)
    logs._overrides.clear()
    logs._overrides.update(overrides)


async def test_logging_reports_and_changes_the_level(admin: Any, root_level: None) -> None:
    port = admin[0].port
    assert await get(port, "/logging") == (200, "current log level is info\n")
    assert await get(port, "/logging?level=access=off", "POST") == (200, "current log level is info,access=off\n")
    assert not logging.getLogger("access").isEnabledFor(logging.INFO)
    status, body = await get(port, "/logging?level=chatty")
    assert status == 400 and "invalid log level 'chatty'" in body
    assert (await get(port, "/logging", "PUT"))[0] == 405


async def test_quitquitquit_needs_post_and_calls_back(admin: Any) -> None:
    server, quits = admin[0], admin[1]
    assert (await get(server.port, "/quitquitquit"))[0] == 405 and quits == []
    assert await get(server.port, "/quitquitquit", "POST") == (200, "shutdown now\n")
    assert quits == ["quit"]


async def test_admin_serves_stats_and_readiness(admin: Any) -> None:
    server, _, _, telemetry = admin
    await a_request(telemetry, 200)
    status, body = await get(server.port, "/stats/prometheus")
    assert status == 200 and 'response_code="200"' in body and "istio_requests_total{" in body
    assert await get(server.port, "/healthz/ready") == (503, "not ready: pending: certificate, xds\n")


# -- 15020 and 15021 ------------------------------------------------------------------------------------------
async def test_metrics_port_serves_the_page_on_both_paths_rendered_per_scrape() -> None:
    telemetry = Telemetry(False, process=True)
    server = MetricsServer(telemetry.render, (HOST, 0))
    await server.start()
    try:
        await a_request(telemetry, 503)
        for path in ("/stats/prometheus", "/metrics"):
            status, body = await fetch(HOST, server.port, path)
            text = body.decode()
            assert status == 200
            assert re.search(r'istio_requests_total\{reporter="waypoint",.*response_code="503".*\} 1\n', text)
            assert 'istio_request_duration_milliseconds_bucket{reporter="waypoint"' in text
            assert "process_resident_memory_bytes" in text
        await a_request(telemetry, 503)
        assert re.search(r'istio_requests_total\{.*response_code="503".*\} 2\n',
                         (await fetch(HOST, server.port, "/metrics"))[1].decode())
    finally:
        await server.close()


async def test_readiness_port_follows_the_check_with_its_reason() -> None:
    readiness = Readiness(["config", "certificate"])
    server = ReadinessServer(readiness, (HOST, 0))
    await server.start()
    try:
        assert await get(server.port, "/healthz/ready") == (503, "not ready: pending: certificate, config\n")
        readiness.mark_ready("certificate")
        readiness.mark_ready("config")
        assert await get(server.port, "/healthz/ready") == (200, "ready\n")
    finally:
        await server.close()

    def broken() -> tuple[bool, str]:
        raise RuntimeError("xds client gone")

    for check, answer in ((lambda: (False, "draining"), (503, "not ready: draining\n")),
                          (broken, (503, "not ready: readiness check failed: xds client gone\n"))):
        server = ReadinessServer(check, (HOST, 0))
        await server.start()
        try:
            assert await get(server.port, "/healthz/ready") == answer
        finally:
            await server.close()


async def test_a_taken_port_is_an_os_error_naming_the_server() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on {HOST}:{port} for the metrics server") as failed:
            await MetricsServer(lambda: b"", (HOST, port)).start()
        assert isinstance(failed.value, ListenError)
