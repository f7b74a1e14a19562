"""xDS push latency: from a change in the control plane's resource source to the client's ACK.

Runs our delta xDS server and N of our clients over real gRPC on 127.0.0.1, loads a cluster-sized set of
workloads, then changes one workload at a time (waiting for every client's ACK before the next change)
and prints p50/p99 of the time from the change to each ACK. The server's debounce is part of what is
measured; `--debounce 0` shows the cost of the machinery alone.

    .venv/bin/python bench/xds_push.py [--changes 200] [--workloads 1000] [--clients 1] [--debounce 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import grpc

from ambient.proto import workload_pb2
from ambient.xds.client import ClientConfig, XdsClient
from ambient.xds.server import SERVER_OPTIONS, ServerConfig, XdsServer
from ambient.xds.server_state import RequestKind, RequestOutcome
from ambient.xds.source import MemorySource
from ambient.xds.store import WorkloadStore
from ambient.xds.types import ADDRESS_TYPE_URL, XdsResource, address_resource, ztunnel_node_id


def workload(i: int, revision: int = 0) -> XdsResource:
    return address_resource(workload_pb2.Workload(
        uid=f"Kubernetes//Pod/bench/pod-{i}", name=f"pod-{i}", namespace="bench", node=f"node-{i % 4}",
        addresses=[bytes([10, 244, (i >> 8) & 0xFF, i & 0xFF])], tunnel_protocol=workload_pb2.HBONE,
        service_account="default", trust_domain="cluster.local", canonical_name="bench",
        canonical_revision=str(revision)))


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def measure(changes: int, workloads: int, clients: int, debounce: float) -> list[float]:
    source = MemorySource()
    source.replace(ADDRESS_TYPE_URL, [workload(i) for i in range(workloads)])
    waiting: dict[tuple[str, str], asyncio.Future[float]] = {}

    def on_request(node_id: str, outcome: RequestOutcome) -> None:
        if outcome.kind is RequestKind.ACK:
            for name, version in outcome.versions.items():
                future = waiting.pop((node_id, f"{name}@{version}"), None)
                if future is not None and not future.done():
                    future.set_result(time.perf_counter())

    xds = XdsServer(source, ServerConfig(debounce_after=debounce, debounce_max=max(debounce, 1.0)),
                    on_request=on_request)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    xds.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    nodes = [ztunnel_node_id(f"172.30.0.{10 + n}", f"ztunnel-{n}", "istio-system") for n in range(clients)]
    xds_clients = [XdsClient(ClientConfig(f"127.0.0.1:{port}", node), WorkloadStore()) for node in nodes]
    try:
        async with asyncio.TaskGroup() as tasks:
            debouncer = tasks.create_task(xds.run(), name="xds-debounce")
            runners = [tasks.create_task(c.run(), name=f"xds-client-{n}") for n, c in enumerate(xds_clients)]
            await asyncio.gather(*(c.ready.wait() for c in xds_clients))
            latencies: list[float] = []
            loop = asyncio.get_running_loop()
            for change in range(changes):
                updated = workload(change % workloads, revision=change + 1)
                acks = {node: loop.create_future() for node in nodes}
                for node, future in acks.items():
                    waiting[(node, f"{updated.name}@{updated.version}")] = future
                started = time.perf_counter()
                source.update(ADDRESS_TYPE_URL, [updated])
                for acked_at in await asyncio.wait_for(asyncio.gather(*acks.values()), 30):
                    latencies.append(acked_at - started)
            for task in (debouncer, *runners):
                task.cancel()
    finally:
        with contextlib.suppress(Exception):
            await server.stop(None)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--workloads", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--debounce", type=float, default=0.1, help="server debounce in seconds (istiod: 0.1)")
    args = parser.parse_args()
    latencies = asyncio.run(measure(args.changes, args.workloads, args.clients, args.debounce))
    ms = [x * 1000 for x in latencies]
    print(f"xDS push latency, source change -> client ACK: {args.changes} changes, {args.workloads} workloads, "
          f"{args.clients} client(s), debounce {args.debounce * 1000:.0f} ms")
    print(f"  p50 {percentile(ms, 0.50):.1f} ms   p99 {percentile(ms, 0.99):.1f} ms   "
          f"mean {statistics.fmean(ms):.1f} ms   max {max(ms):.1f} ms   ({len(ms)} ACKs)")


if __name__ == "__main__":
    main()
