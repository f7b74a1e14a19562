"""What counting bytes costs the data path: `ConnectionMetrics.add_sent` vs prometheus_client.

    .venv/bin/python bench/metrics_path.py [--calls 1000000] [--series 1000]

Prints numbers; asserts nothing. Compared per call:
  - ours: `conn.add_sent(n)` on a ConnectionMetrics resolved once per connection (an integer add);
  - prometheus_client: `counter.labels(**23 labels).inc(n)`, what a naive data path would do per chunk;
  - prometheus_client with the child resolved once per connection: `child.inc(n)` (a lock and a float add).
Then the cost of one scrape (`render()`) with `--series` distinct label sets open at once.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from ambient.telemetry.labels import LABEL_NAMES, ConnectionLabels
from ztunnel.metrics import TcpMetrics


def labels(i: int = 0) -> ConnectionLabels:
    return ConnectionLabels("source", source_workload=f"client-{i}", source_canonical_service="client",
                            source_workload_namespace="default",
                            source_principal="spiffe://cluster.local/ns/default/sa/client",
                            destination_service="server.default.svc.cluster.local", destination_workload="server",
                            destination_principal="spiffe://cluster.local/ns/default/sa/server",
                            connection_security_policy="mutual_tls")


def per_call_ns(fn: Callable[[int], None], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn(1500)
    return (time.perf_counter_ns() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--series", type=int, default=1_000)
    args = parser.parse_args()

    ours = TcpMetrics().open(labels())
    counter = PromCounter("istio_tcp_sent_bytes", "bytes", LABEL_NAMES, registry=CollectorRegistry())
    values = labels()._asdict()
    child = counter.labels(**values)

    def naive(n: int) -> None:
        counter.labels(**values).inc(n)

    baseline = per_call_ns(lambda n: None, args.calls)  # the loop and call overhead every variant pays
    results = {
        "ConnectionMetrics.add_sent": per_call_ns(ours.add_sent, args.calls),
        "prometheus_client labels(...).inc": per_call_ns(naive, args.calls),
        "prometheus_client child.inc (resolved once)": per_call_ns(child.inc, args.calls),
    }
    ours_ns = results["ConnectionMetrics.add_sent"] - baseline
    print(f"per call, {args.calls:,} calls (loop overhead {baseline:.0f} ns subtracted):")
    for name, ns in results.items():
        net = ns - baseline
        print(f"  {name:45s} {net:8.1f} ns   {net / ours_ns:6.1f}x ours")

    metrics = TcpMetrics()
    connections = [metrics.open(labels(i)) for i in range(args.series)]
    for conn in connections:
        conn.add_sent(1000)
        conn.add_received(5000)
    metrics.render()  # first render escapes and caches each label set
    start = time.perf_counter()
    body = metrics.render()
    took = time.perf_counter() - start
    print(f"render with {args.series:,} open connections / series: {took * 1000:.2f} ms, {len(body):,} bytes")


if __name__ == "__main__":
    main()
