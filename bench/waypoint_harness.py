"""The waypoint under test for `bench/waypoint_l7.py`: a real `waypoint.app.Waypoint` in its own process.

It is what `waypoint.main` runs, minus the control plane: the `WorkloadStore` is filled directly with what
xDS would deliver, the certificate comes from a file instead of the CA, and the L7 objects are set directly
instead of coming from informers. One Service (`echo.bench.svc.cluster.local`, VIP `SERVICE_VIP`, port 80
declared HTTP/1.1) has one endpoint workload, the "backend pod" at `--pod-ip`. The bench runs an HBONE
terminator there on port 15008 (the pod's ztunnel) in front of the backend on `<pod ip>:<target port>`. The
VirtualService has a header-match route and a default route, so every request evaluates a real route table
(the bench's requests take the default route).

The process imports `waypoint.main`, so it loads every module a deployed waypoint loads (gRPC, the
Kubernetes client) and its RSS is comparable; it does not run the xDS client, informers or admin ports.
Logging goes through `ambient.telemetry.logs` to stderr as in `waypoint.main` (the access log lines too,
unless `access_log` is false); the bench sends it to a file, as a pod's container log. The event loop is
asyncio's default unless the spec asks for uvloop (which `waypoint.main` uses when installed). When its stdin closes it
prints one more JSON line: its garbage collections (and with `lag_monitor`, its event loop's lags).

Run by the bench (it prints `{"ports": {"hbone": N}}` when serving, and stops when its stdin closes):

    .venv/bin/python bench/waypoint_harness.py --spec '{"cert": "...", "pod_ip": "127.7.0.2", ...}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import ipaddress
import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when run as a script

import waypoint.main  # noqa: F401  (loaded for its imports: the RSS of a deployed waypoint process)
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.spiffe import SpiffeId
from ambient.proto import workload_pb2
from ambient.telemetry.logs import setup_logging
from ambient.xds.store import StoreChanges, WorkloadStore
from bench.hbone_throughput import load_cert
from waypoint.app import Waypoint
from waypoint.config import WaypointConfig
from waypoint.sources import L7Objects

TD = "cluster.local"
NS = "bench"
WAYPOINT_NAME = "waypoint"
SERVICE_NAME = "echo"
HOST = f"{SERVICE_NAME}.{NS}.svc.{TD}"
SERVICE_KEY = f"{NS}/{HOST}"
SERVICE_VIP = "10.96.7.10"  # never dialled: only the CONNECT authority names it
SERVICE_PORT = 80
CLIENT_IP = "127.7.0.1"  # the calling pod (the `forwarded: for=` of every tunnel)
POD_IP = "127.7.0.2"  # default endpoint pod IP: a loopback address nothing else here uses
LOCALHOST = "127.0.0.1"
MATCH_HEADER = ("end-user", "jason")  # the VirtualService's header-match route (the bench never sends it)
ROUTE_NAMES = ("jason", "default")

IDS = {
    "client": SpiffeId(TD, NS, "sleep"),  # the load client, playing the calling pod's ztunnel
    "backend": SpiffeId(TD, NS, "echo"),  # the terminator, playing the backend pod's ztunnel
    "waypoint": SpiffeId(TD, NS, WAYPOINT_NAME),
    "envoy": SpiffeId(TD, NS, "envoy-waypoint"),
}
LISTEN_BACKLOG = 1024


# -- the workload model and the VirtualService (shared with bench/waypoint_l7.py) ---------------------------
def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def echo_service() -> workload_pb2.Service:
    return workload_pb2.Service(
        name=SERVICE_NAME, namespace=NS, hostname=HOST,
        addresses=[workload_pb2.NetworkAddress(address=_ip(SERVICE_VIP))],
        ports=[workload_pb2.Port(service_port=SERVICE_PORT, target_port=0, app_protocol=workload_pb2.HTTP11)],
        waypoint=workload_pb2.GatewayAddress())


def echo_workload(pod_ip: str, target_port: int) -> workload_pb2.Workload:
    name = "echo-7d4b9c6f5-bench"
    return workload_pb2.Workload(
        uid=f"Kubernetes//Pod/{NS}/{name}", name=name, namespace=NS, addresses=[_ip(pod_ip)],
        tunnel_protocol=workload_pb2.HBONE, trust_domain=TD, service_account=IDS["backend"].service_account,
        node="node-1", canonical_name=SERVICE_NAME, canonical_revision="v1", workload_type=workload_pb2.DEPLOYMENT,
        workload_name=SERVICE_NAME,
        services={SERVICE_KEY: workload_pb2.PortList(ports=[workload_pb2.Port(service_port=SERVICE_PORT,
                                                                              target_port=target_port)])},
        cluster_id="Kubernetes")


def client_workload() -> workload_pb2.Workload:
    name = "sleep-6b8d7c9f4-bench"
    return workload_pb2.Workload(
        uid=f"Kubernetes//Pod/{NS}/{name}", name=name, namespace=NS, addresses=[_ip(CLIENT_IP)],
        tunnel_protocol=workload_pb2.HBONE, trust_domain=TD, service_account=IDS["client"].service_account,
        node="node-1", canonical_name="sleep", canonical_revision="v1", workload_type=workload_pb2.DEPLOYMENT,
        workload_name="sleep", cluster_id="Kubernetes")


def store_changes(pod_ip: str, target_port: int) -> StoreChanges:
    workloads = [echo_workload(pod_ip, target_port), client_workload()]
    return StoreChanges(workloads={w.uid: w for w in workloads}, services={SERVICE_KEY: echo_service()})


def virtual_service() -> dict[str, Any]:
    """Header `end-user: jason` → route "jason", everything else → route "default"; both to the service."""
    destination = {"destination": {"host": SERVICE_NAME, "port": {"number": SERVICE_PORT}}}
    name, value = MATCH_HEADER
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": SERVICE_NAME, "namespace": NS, "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"hosts": [SERVICE_NAME],
                     "http": [{"name": ROUTE_NAMES[0], "match": [{"headers": {name: {"exact": value}}}],
                               "route": [destination]},
                              {"name": ROUTE_NAMES[1], "route": [destination]}]}}


# -- the process ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    cert: str  # write_cert_json's JSON file with the waypoint's certificate
    pod_ip: str  # the endpoint pod's IP (its HBONE terminator listens on <pod_ip>:15008)
    target_port: int  # the backend's port on the pod
    access_log: bool = True
    uvloop: bool = False
    profile: str | None = None  # cProfile (CPU time) output path
    gc_freeze: bool = False  # gc.freeze() once serving, as waypoint.main does
    lag_monitor: bool = False  # measure the event loop's lag (LoopLag; costs ~100 wake-ups/s)

    @classmethod
    def parse(cls, text: str) -> Spec:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"waypoint_harness: bad --spec ({exc}); it is written by bench/waypoint_l7.py") from None


class GcPauses:
    """Durations of the garbage collector's runs, per generation (a `gc.callbacks` entry)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self.started)

    def summary(self) -> dict[str, list[float]]:
        """generation → [collections, total ms, max ms]."""
        return {str(gen): [len(p), round(sum(p) * 1000, 2), round(max(p, default=0) * 1000, 2)]
                for gen, p in self.pauses.items()}


class LoopLag:
    """How late the event loop runs a timer due every `interval`: lags over `threshold`, each with the
    CPU time this thread used meanwhile (near the lag: the loop was busy; near zero: the process did not run,
    or another thread held the GIL)."""

    def __init__(self, interval: float = 0.01, threshold: float = 0.005) -> None:
        self.interval, self.threshold = interval, threshold
        self.lags: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.interval)
            late = time.perf_counter() - wall - self.interval
            if late > self.threshold:
                self.lags.append((late, time.thread_time() - cpu))

    def summary(self) -> dict[str, float]:
        busy = [late for late, cpu in self.lags if cpu >= late / 2]
        idle = [late for late, cpu in self.lags if cpu < late / 2]
        return {"lags": len(self.lags), "longest_ms": round(max((lag for lag, _ in self.lags), default=0) * 1000, 1),
                "busy": len(busy), "busy_longest_ms": round(max(busy, default=0) * 1000, 1),
                "not_running": len(idle), "not_running_longest_ms": round(max(idle, default=0) * 1000, 1)}


def listen(ip: str, port: int = 0) -> socket.socket:
    sock = socket.create_server((ip, port), backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def until_stdin_closes() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def serve(spec: Spec) -> None:
    cert = load_cert(spec.cert)

    async def certificate() -> WorkloadCertificate:
        return cert

    store = WorkloadStore()
    store.apply(store_changes(spec.pod_ip, spec.target_port))
    config = WaypointConfig(name=WAYPOINT_NAME, namespace=NS, service_account=WAYPOINT_NAME, trust_domain=TD,
                            hbone_address=(LOCALHOST, 0), access_log=spec.access_log)
    app = Waypoint(config, store, certificate)
    app.set_objects(L7Objects(virtual_services=(virtual_service(),)))
    if app.compiled.errors:
        raise SystemExit(f"waypoint_harness: the bench VirtualService did not compile: {app.compiled.errors}")
    routes = [route.name for route in app.compiled.index.routes_for(HOST, SERVICE_PORT).routes]
    if routes != list(ROUTE_NAMES):
        raise SystemExit(f"waypoint_harness: expected routes {list(ROUTE_NAMES)} for {HOST}, got {routes}")
    await app.proxy.start()
    if spec.gc_freeze:
        gc.freeze()  # start-up's objects (modules, config) out of every later collection
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    lag = LoopLag() if spec.lag_monitor else None
    monitor = asyncio.get_running_loop().create_task(lag.run()) if lag is not None else None
    sock = listen(LOCALHOST)
    serving = asyncio.get_running_loop().create_task(app.server.serve(sock))
    print(json.dumps({"ports": {"hbone": sock.getsockname()[1]}}), flush=True)
    try:
        await until_stdin_closes()
    finally:
        for task in (serving, monitor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await app.close()
        gc.callbacks.remove(pauses)
        final: dict[str, Any] = {"gc": pauses.summary(), "gc_objects": len(gc.get_objects())}
        if lag is not None:
            final["loop_lag"] = lag.summary()
        print(json.dumps(final), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="JSON: cert, pod_ip, target_port, access_log, uvloop, profile")
    spec = Spec.parse(parser.parse_args(argv).spec)
    setup_logging("text", "info")  # to stderr, as waypoint.main (in a pod, the container log file)
    profiler = cProfile.Profile(time.process_time) if spec.profile else None  # CPU, not wall, time
    if profiler is not None:
        profiler.enable()
    try:
        if spec.uvloop:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(serve(spec))
        else:
            asyncio.run(serve(spec))
    except KeyboardInterrupt:
        pass
    finally:
        if profiler is not None and spec.profile:
            profiler.disable()
            profiler.dump_stats(spec.profile)


if __name__ == "__main__":
    main()
