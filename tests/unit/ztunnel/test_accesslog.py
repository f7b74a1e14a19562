"""Access log lines (PROTOCOLS.md §10) in ztunnel's text and JSON formats, written through a real
LineWriter into a string buffer."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from ambient.identity.spiffe import SpiffeId
from ambient.proto import workload_pb2
from ambient.telemetry.labels import labels_for
from ambient.telemetry.logs import LineWriter
from ztunnel.accesslog import AccessLog

SLEEP = workload_pb2.Workload(name="sleep-7d4f9", namespace="default", workload_name="sleep", canonical_name="sleep",
                              service_account="sleep")
HTTPBIN = workload_pb2.Workload(name="httpbin-5c6f", namespace="web", workload_name="httpbin",
                                canonical_name="httpbin", service_account="httpbin")
HTTPBIN_SVC = workload_pb2.Service(name="httpbin", namespace="web", hostname="httpbin.web.svc.cluster.local")
MTLS = labels_for(SLEEP, HTTPBIN, HTTPBIN_SVC, SpiffeId("cluster.local", "default", "sleep"), None, "source", True)
PLAIN = labels_for(None, HTTPBIN, None, None, None, "destination", False)


def log_lines(log_format: str, *calls: dict[str, object]) -> list[str]:
    """Log each call (kwargs of AccessLog.connection) and return the lines written."""
    buffer = io.StringIO()
    writer = LineWriter(buffer)
    access = AccessLog(log_format, writer)
    for kwargs in calls:
        access.connection(**kwargs)  # type: ignore[arg-type]
    writer.close()
    return buffer.getvalue().splitlines()


OUTBOUND: dict[str, object] = {
    "direction": "outbound", "src": ("10.244.1.5", 40936), "dst": ("10.244.2.4", 15008),
    "hbone": ("10.244.2.4", 8080), "labels": MTLS, "sent": 84, "received": 306, "duration": 0.0071}


@pytest.fixture(autouse=True)
def access_at_info() -> Iterator[None]:
    logger = logging.getLogger("access")
    old = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(old)


def test_text_line_looks_like_ztunnels() -> None:
    line, = log_lines("text", OUTBOUND)
    stamp, level, scope, message, fields = line.split("\t")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert (level, scope, message) == ("info", "access", "connection complete")
    assert fields == (
        'src.addr=10.244.1.5:40936 src.workload="sleep" src.namespace="default" '
        'src.identity="spiffe://cluster.local/ns/default/sa/sleep" '
        'dst.addr=10.244.2.4:15008 dst.hbone_addr=10.244.2.4:8080 dst.service="httpbin.web.svc.cluster.local" '
        'dst.workload="httpbin" dst.namespace="web" dst.identity="spiffe://cluster.local/ns/web/sa/httpbin" '
        'direction="outbound" bytes_sent=84 bytes_recv=306 duration="7ms"')


def test_json_line_has_the_same_fields_typed() -> None:
    line, = log_lines("json", {**OUTBOUND, "src_workload": "sleep-7d4f9"})
    record = json.loads(line)
    assert (record["level"], record["scope"], record["message"]) == ("info", "access", "connection complete")
    assert record["src.workload"] == "sleep-7d4f9"  # the pod's name when the caller knows it
    assert record["src.addr"] == "10.244.1.5:40936" and record["dst.hbone_addr"] == "10.244.2.4:8080"
    assert record["bytes_sent"] == 84 and record["bytes_recv"] == 306 and record["duration"] == "7ms"
    assert list(record)[4:] == ["src.addr", "src.workload", "src.namespace", "src.identity", "dst.addr",
                                "dst.hbone_addr", "dst.service", "dst.workload", "dst.namespace", "dst.identity",
                                "direction", "bytes_sent", "bytes_recv", "duration"]


def test_failure_logs_at_error_with_the_reason() -> None:
    line, = log_lines("text", {**OUTBOUND, "error": 'connection to 10.244.2.4:15008 failed: "refused"'})
    assert line.split("\t")[1] == "error"
    assert line.endswith(' error="connection to 10.244.2.4:15008 failed: \\"refused\\""')
    record = json.loads(log_lines("json", {**OUTBOUND, "error": "explicitly denied by: web/deny"})[0])
    assert record["level"] == "error" and record["error"] == "explicitly denied by: web/deny"


def test_plaintext_has_no_identities_and_unknowns_are_left_out() -> None:
    line, = log_lines("text", {"direction": "inbound", "src": ("fd00::5", 1234), "dst": ("fd00::6", 80),
                                   "hbone": None, "labels": PLAIN, "sent": 0, "received": 12, "duration": 1.5})
    fields = line.split("\t")[4]
    assert fields == ('src.addr=[fd00::5]:1234 dst.addr=[fd00::6]:80 dst.workload="httpbin" dst.namespace="web" '
                      'direction="inbound" bytes_sent=0 bytes_recv=12 duration="1500ms"')


def test_access_logger_level_silences_it() -> None:
    logging.getLogger("access").setLevel(logging.ERROR)
    assert log_lines("text", OUTBOUND) == []
    assert len(log_lines("text", {**OUTBOUND, "error": "boom"})) == 1


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml': use one of text, json"):
        AccessLog("xml")
