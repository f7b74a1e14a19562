"""The istio_tcp_* counters: Istio's label rules, the Prometheus text they render (parsed back with
prometheus_client's parser), byte directions per reporter, failures, and the process metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ambient.identity.spiffe import SpiffeId
from ambient.proto import workload_pb2
from ambient.telemetry.labels import LABEL_NAMES, ConnectionLabels
from ztunnel.metrics import TcpMetrics, ZtunnelMetrics, labels_for

SLEEP = workload_pb2.Workload(
    uid="Kubernetes//Pod/default/sleep-7d4f9", name="sleep-7d4f9", namespace="default", workload_name="sleep",
    canonical_name="sleep", canonical_revision="v1", service_account="sleep", trust_domain="cluster.local",
    cluster_id="Kubernetes", addresses=[bytes([10, 244, 1, 5])])
HTTPBIN = workload_pb2.Workload(
    uid="Kubernetes//Pod/default/httpbin-5c6f", name="httpbin-5c6f", namespace="default", workload_name="httpbin",
    canonical_name="httpbin", canonical_revision="v2", service_account="httpbin", cluster_id="Kubernetes",
    addresses=[bytes([10, 244, 2, 4])])
HTTPBIN_SVC = workload_pb2.Service(name="httpbin", namespace="default", hostname="httpbin.default.svc.cluster.local")
SLEEP_ID = SpiffeId("cluster.local", "default", "sleep")


def parse(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name → [(labels, value)] from the rendered exposition text (fails on malformed output)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(text: bytes, name: str, **labels: str) -> float | None:
    matches = [v for got, v in parse(text).get(name, []) if all(got.get(k) == want for k, want in labels.items())]
    assert len(matches) <= 1, f"{name} {labels}: {len(matches)} series"
    return matches[0] if matches else None


def test_labels_follow_istio_rules_for_a_mutual_tls_outbound_connection() -> None:
    labels = labels_for(SLEEP, HTTPBIN, HTTPBIN_SVC, SLEEP_ID, None, "source", True)
    assert labels._asdict() == {
        "reporter": "source",
        "source_workload": "sleep", "source_canonical_service": "sleep", "source_canonical_revision": "v1",
        "source_workload_namespace": "default", "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "source_app": "sleep", "source_version": "v1", "source_cluster": "Kubernetes",
        "destination_service": "httpbin.default.svc.cluster.local", "destination_service_namespace": "default",
        "destination_service_name": "httpbin", "destination_workload": "httpbin",
        "destination_canonical_service": "httpbin", "destination_canonical_revision": "v2",
        "destination_workload_namespace": "default",
        # no trust domain on the workload: ztunnel's default cluster.local
        "destination_principal": "spiffe://cluster.local/ns/default/sa/httpbin",
        "destination_app": "httpbin", "destination_version": "v2", "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "mutual_tls",
    }


def test_everything_unknown_is_unknown_and_plaintext_is_not_mutual_tls() -> None:
    labels = labels_for(None, None, None, None, None, "destination", False)
    assert labels.reporter == "destination" and labels.request_protocol == "tcp" and labels.response_flags == "-"
    rest = {k: v for k, v in labels._asdict().items() if k not in {"reporter", "request_protocol", "response_flags"}}
    assert set(rest.values()) == {"unknown"}


def test_empty_workload_fields_become_unknown_and_the_given_identity_wins() -> None:
    bare = workload_pb2.Workload(name="p", namespace="ns")  # no workload name, canonical names or cluster
    labels = labels_for(bare, bare, None, "", "spiffe://td/ns/ns/sa/peer", "destination", True)
    assert labels.source_workload == labels.source_app == labels.source_cluster == "unknown"
    assert labels.source_principal == "unknown"  # an empty identity is no identity
    assert labels.destination_principal == "spiffe://td/ns/ns/sa/peer"
    assert labels.destination_service == "unknown" and labels.destination_workload_namespace == "ns"


def test_render_has_help_type_and_every_label_of_each_series() -> None:
    metrics = TcpMetrics()
    conn = metrics.open(labels_for(SLEEP, HTTPBIN, HTTPBIN_SVC, SLEEP_ID, None, "source", True))
    conn.add_sent(100)
    conn.add_received(250)
    conn.close()
    text = metrics.render()
    for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                 "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total",
                 "istio_tcp_connections_failed_total"):
        assert f"# HELP {name} ".encode() in text and f"# TYPE {name} counter\n".encode() in text
    (labels, opened), = parse(text)["istio_tcp_connections_opened_total"]
    assert opened == 1 and tuple(labels) == LABEL_NAMES  # Istio's label order
    assert labels["connection_security_policy"] == "mutual_tls" and labels["reporter"] == "source"
    assert value(text, "istio_tcp_connections_closed_total", response_flags="-") == 1
    assert "istio_tcp_connections_failed_total" not in parse(text)  # nothing failed: no series


def test_bytes_follow_istio_directions_for_both_reporters() -> None:
    """Istio counts request bytes (client → server) as received and response bytes as sent, for either
    reporter; our add_sent/add_received are the local workload's view."""
    metrics = TcpMetrics()
    outbound = metrics.open(labels_for(SLEEP, HTTPBIN, HTTPBIN_SVC, SLEEP_ID, None, "source", True))
    inbound = metrics.open(labels_for(SLEEP, HTTPBIN, None, SLEEP_ID, None, "destination", True))
    outbound.add_sent(10)  # the client pod sends the request ...
    inbound.add_received(10)  # ... which the server pod receives
    outbound.add_received(700)  # the response
    inbound.add_sent(700)
    text = metrics.render()
    for reporter in ("source", "destination"):
        assert value(text, "istio_tcp_received_bytes_total", reporter=reporter) == 10
        assert value(text, "istio_tcp_sent_bytes_total", reporter=reporter) == 700


def test_counts_after_many_adds_include_open_connections_and_never_double_count() -> None:
    metrics = TcpMetrics()
    labels = labels_for(SLEEP, HTTPBIN, HTTPBIN_SVC, SLEEP_ID, None, "source", True)
    first, second = metrics.open(labels), metrics.open(labels)
    for _ in range(10_000):
        first.add_sent(3)
        second.add_received(7)
    assert value(metrics.render(), "istio_tcp_received_bytes_total") == 30_000  # still open: folded at render
    first.add_sent(5)
    first.close()
    text = metrics.render()  # a second render folds only what is new
    assert value(text, "istio_tcp_received_bytes_total") == 30_005
    assert value(text, "istio_tcp_sent_bytes_total") == 70_000
    assert value(text, "istio_tcp_connections_opened_total") == 2
    assert value(text, "istio_tcp_connections_closed_total") == 1
    assert (first.sent, second.received, metrics.open_connections) == (30_005, 70_000, 1)


def test_byte_series_exist_from_the_first_open() -> None:
    metrics = TcpMetrics()
    metrics.open(labels_for(None, HTTPBIN, None, None, None, "destination", False))
    text = metrics.render()
    assert value(text, "istio_tcp_received_bytes_total") == 0 and value(text, "istio_tcp_sent_bytes_total") == 0


def test_failed_connection_counts_under_its_response_flags() -> None:
    metrics = TcpMetrics()
    conn = metrics.open(labels_for(SLEEP, HTTPBIN, None, SLEEP_ID, None, "destination", True))
    conn.close(failed=True, response_flags="DENY")
    conn.close(failed=True, response_flags="DENY")  # a second close is ignored
    text = metrics.render()
    assert value(text, "istio_tcp_connections_opened_total", response_flags="-") == 1
    assert value(text, "istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert value(text, "istio_tcp_connections_failed_total", response_flags="DENY") == 1
    assert value(text, "istio_tcp_connections_closed_total", response_flags="-") is None
    assert conn.closed and metrics.open_connections == 0


def test_label_values_are_escaped() -> None:
    metrics = TcpMetrics()
    tricky = 'a"b\\c\nd'
    conn = metrics.open(ConnectionLabels("source", source_workload=tricky))
    conn.close()
    text = metrics.render()
    assert b'source_workload="a\\"b\\\\c\\nd"' in text
    assert value(text, "istio_tcp_connections_opened_total", source_workload=tricky) == 1


def test_reporter_given_to_open_overrides_the_labels() -> None:
    metrics = TcpMetrics()
    conn = metrics.open(ConnectionLabels("source"), reporter="waypoint")
    conn.add_sent(4)
    text = metrics.render()
    assert conn.labels.reporter == "waypoint"
    assert value(text, "istio_tcp_connections_opened_total", reporter="waypoint") == 1
    assert value(text, "istio_tcp_sent_bytes_total", reporter="waypoint") == 4  # not the source reporter's swap


def test_ztunnel_metrics_include_workload_manager_and_process_metrics() -> None:
    metrics = ZtunnelMetrics()
    metrics.workload_manager.active_proxy_count.set(3)
    metrics.workload_manager.pending_proxy_count.set(1)
    metrics.workload_manager.proxies_started.inc()
    metrics.workload_manager.proxies_started.inc()
    metrics.workload_manager.proxies_stopped.inc()
    metrics.tcp.open(ConnectionLabels("source")).close()
    text = metrics.render()
    samples = parse(text)
    assert samples["workload_manager_active_proxy_count"] == [({}, 3)]
    assert samples["workload_manager_pending_proxy_count"] == [({}, 1)]
    assert samples["workload_manager_proxies_started_total"] == [({}, 2)]
    assert samples["workload_manager_proxies_stopped_total"] == [({}, 1)]
    assert b"# TYPE workload_manager_active_proxy_count gauge" in text
    assert samples["istio_tcp_connections_closed_total"][0][1] == 1
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert samples[name][0][1] > 0, name
