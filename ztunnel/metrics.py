"""ztunnel's metrics (port 15020, PROTOCOLS.md §10): the istio_tcp_* counters, workload_manager_* and the
process metrics.

The data path never touches a shared structure per chunk: `TcpMetrics.open` resolves a connection's
label tuple once and returns a `ConnectionMetrics` whose `add_sent`/`add_received` are plain integer
adds. Open connections are folded into the shared totals when they close and whenever the metrics are
rendered (so a scrape sees the bytes of long-lived connections too, without a timer).

Byte directions: `add_sent`/`add_received` count what the *local* workload sent and received (what the
access log reports). Istio's counters count the request direction (client → server) as
`istio_tcp_received_bytes_total` and the response direction as `istio_tcp_sent_bytes_total` for both
reporters, so for `reporter="source"` (the local workload is the client) the two are swapped when folded.
"""

from __future__ import annotations

from prometheus_client import ProcessCollector

from ambient.telemetry.labels import (
    LABEL_NAMES,
    NO_FLAGS,
    REPORTER_SOURCE,
    ConnectionLabels,
    labels_for,
)
from ambient.telemetry.registry import LabelText, Registry

__all__ = ["ConnectionLabels", "ConnectionMetrics", "TcpMetrics", "WorkloadManagerMetrics", "ZtunnelMetrics",
           "labels_for"]


class ConnectionMetrics:
    """One connection's counters. Not thread-safe: used on the loop that owns the connection."""

    __slots__ = ("_flushed_received", "_flushed_sent", "_owner", "_request_is_sent", "labels", "received", "sent")

    def __init__(self, owner: TcpMetrics, labels: ConnectionLabels) -> None:
        self.labels = labels
        self.sent = 0  # bytes the local workload sent on this connection
        self.received = 0  # bytes it received
        self._flushed_sent = 0
        self._flushed_received = 0
        self._request_is_sent = labels.reporter == REPORTER_SOURCE
        self._owner: TcpMetrics | None = owner

    def add_sent(self, n: int) -> None:
        self.sent += n

    def add_received(self, n: int) -> None:
        self.received += n

    @property
    def closed(self) -> bool:
        return self._owner is None

    def close(self, failed: bool = False, response_flags: str = NO_FLAGS) -> None:
        """Count the close (and the failure) under the final `response_flags`; later calls do nothing."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._closed(self, failed, response_flags)


class TcpMetrics:
    """The istio_tcp_* counters."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        labels = LabelText(LABEL_NAMES)
        family = self.registry.counter_family
        self.opened = family("istio_tcp_connections_opened", "The total number of TCP connections opened", labels)
        self.closed = family("istio_tcp_connections_closed", "The total number of TCP connections closed", labels)
        self.received_bytes = family(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection", labels)
        self.sent_bytes = family(
            "istio_tcp_sent_bytes", "The size of total bytes sent during response in case of a TCP connection",
            labels)
        self.failed = family("istio_tcp_connections_failed",
                             "The total number of TCP connections that failed to establish", labels)
        self._open: set[ConnectionMetrics] = set()
        self.registry.before_render(self.flush)

    def open(self, labels: ConnectionLabels, reporter: str | None = None) -> ConnectionMetrics:
        """Count an opened connection; `reporter`, when given, overrides `labels.reporter`."""
        if reporter is not None and reporter != labels.reporter:
            labels = labels._replace(reporter=reporter)
        conn = ConnectionMetrics(self, labels)
        self.opened.inc(labels)
        self.received_bytes.ensure(labels)  # the byte series exist from the first open, as in ztunnel
        self.sent_bytes.ensure(labels)
        self._open.add(conn)
        return conn

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def flush(self) -> None:
        """Fold the bytes of open connections into the totals."""
        for conn in self._open:
            self._fold(conn)

    def render(self) -> bytes:
        return self.registry.render()

    def _fold(self, conn: ConnectionMetrics) -> None:
        sent, received = conn.sent - conn._flushed_sent, conn.received - conn._flushed_received
        if not (sent or received):
            return
        conn._flushed_sent, conn._flushed_received = conn.sent, conn.received
        request, response = (sent, received) if conn._request_is_sent else (received, sent)
        key = conn.labels
        if request:
            self.received_bytes.inc(key, request)
        if response:
            self.sent_bytes.inc(key, response)

    def _closed(self, conn: ConnectionMetrics, failed: bool, response_flags: str) -> None:
        self._fold(conn)
        self._open.discard(conn)
        key = conn.labels
        if response_flags != key.response_flags:
            key = key._replace(response_flags=response_flags)
        self.closed.inc(key)
        if failed:
            self.failed.inc(key)


class WorkloadManagerMetrics:
    """In-pod proxy counts (ztunnel's `workload_manager_*`, outside the istio_ prefix as upstream)."""

    def __init__(self, registry: Registry) -> None:
        self.active_proxy_count = registry.gauge(
            "workload_manager_active_proxy_count", "The total number current workloads with active proxies")
        self.pending_proxy_count = registry.gauge(
            "workload_manager_pending_proxy_count", "The total number current workloads with pending proxies")
        self.proxies_started = registry.counter(
            "workload_manager_proxies_started", "The total number of proxies that were started")
        self.proxies_stopped = registry.counter(
            "workload_manager_proxies_stopped", "The total number of proxies that were stopped")


class ZtunnelMetrics:
    """Everything ztunnel exposes on 15020: `render()` is the body of `/metrics` and `/stats/prometheus`."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = Registry()
        self.tcp = TcpMetrics(self.registry)
        self.workload_manager = WorkloadManagerMetrics(self.registry)
        if process:  # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
            self.registry.add_collector(ProcessCollector(registry=None))

    def render(self) -> bytes:
        return self.registry.render()
