"""ztunnel on the local cluster, side by side with no mesh (issue 5 benchmarks, through real pods).

Brings up its own 2-node cluster in a temporary state dir and always takes it down. Two namespaces get the
same pods: `bench-plain` (not in the mesh) and `bench-mesh` (labelled `istio.io/dataplane-mode=ambient`).
In each, the server pod (tcp-echo on 9000 plus a `samples.loadclient sink` on 9100) runs on node-2 and the
load client pod (`sleep infinity`; the load runs with `ambientctl exec`) on node-1, so meshed traffic goes
pod → ztunnel node-1 → HBONE over the node link → ztunnel node-2 → pod.

1. Single-stream throughput: `loadclient throughput` to the sink (MB/s up to the sink's receipt), with the
   CPU seconds per GiB of each ztunnel.
2. 1 KiB request/response at a fixed rate (default 1,000/s over 4 connections): `loadclient tcp` to
   tcp-echo; p50/p99 and the latency the mesh adds; CPU seconds per 1,000 requests of each ztunnel.
3. New connections per second: closed loop, W workers each connect, echo 1 KiB, close.
4. ztunnel memory: RSS with no pods, with 1,000 open connections through the mesh, and with N idle
   enrolled pods on one node (a `sleep` Deployment scaled to N, pinned to node-1).

Rounds of 1-3 are interleaved (plain, mesh, plain, mesh, ...) and reported as median (min-max). CPU comes
from psutil (user + system of the ztunnel process and any children, from `<state>/pids/ztunnel-node-N.json`)
sampled around each `ambientctl exec`, so it includes the second or so of process start-up around each run;
the "idle-corrected" figures subtract each ztunnel's idle CPU rate, measured first, over the same window.

Needs root and no other local cluster running. Prints only; asserts nothing.
Usage: python bench/ztunnel_cluster.py [--rounds 3] [--idle-pods 100] [--help for the rest]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
CTL = [sys.executable, "-m", "ambient.cli"]
PLAIN, MESH, IDLE = "bench-plain", "bench-mesh", "bench-idle"
CLIENT_NODE, SERVER_NODE = "node-1", "node-2"
NODE_IPS = {"node-1": "172.30.0.11", "node-2": "172.30.0.12"}
ECHO_PORT, SINK_PORT = 9000, 9100
GiB = 1 << 30
MiB = 1 << 20
TARGETS = {"cpu_per_1k": 0.1, "conns_per_s": 1000.0, "rss_idle_mb": 80.0}  # issue 5

# In the client pod: closed-loop new connections, each echoing one 1 KiB line; one JSON line out.
NEW_CONNECTIONS = r"""
import asyncio, json, socket, sys, time, uvloop
host, port, seconds, workers = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ip = socket.gethostbyname(host)  # once: the DNS lookups are not what is measured
payload = b"x" * 1023 + b"\n"
latencies, errors = [], {}
async def worker(deadline):
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
            try:
                writer.write(payload)
                line = await asyncio.wait_for(reader.readline(), 5)
            finally:
                writer.close()
            if not line.endswith(payload):
                raise ValueError("bad echo")
            latencies.append(time.perf_counter() - began)
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
async def main():
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(workers)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    pick = lambda f: latencies[max(0, round(f * len(latencies)) - 1)] * 1000 if latencies else 0.0
    print(json.dumps({"connections": len(latencies), "errors": errors, "elapsed_s": elapsed,
                      "per_s": len(latencies) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}), flush=True)
uvloop.run(main())
"""

# In the client pod: open N connections (each proven end to end with one echo), say "ready", hold them.
HOLD_CONNECTIONS = r"""
import asyncio, socket, sys, time, uvloop
host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ip = socket.gethostbyname(host)
async def one(gate):
    async with gate:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 10)
        writer.write(b"hi\n")
        if not (await asyncio.wait_for(reader.readline(), 10)).endswith(b"hi\n"):
            raise RuntimeError("bad echo")
        return writer
async def main():
    began = time.monotonic()
    gate = asyncio.Semaphore(50)
    writers = await asyncio.gather(*(one(gate) for _ in range(count)))
    print(f"ready {len(writers)} {time.monotonic() - began:.1f}", flush=True)
    await asyncio.sleep(hold)
uvloop.run(main())
"""


def fail(message: str) -> SystemExit:
    return SystemExit(f"ztunnel_cluster: {message}")


@dataclass
class Cluster:
    state: Path

    def ctl(self, *args: str, stdin: str | None = None, timeout: float = 180) -> str:
        proc = subprocess.run([*CTL, "--state-dir", str(self.state), *args], input=stdin, capture_output=True,
                              text=True, check=False, cwd=REPO, timeout=timeout)
        if proc.returncode != 0:
            raise fail(f"ambientctl {' '.join(args)[:200]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def apply(self, docs: list[dict[str, Any]]) -> None:
        self.ctl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))

    def pods(self, namespace: str) -> list[dict[str, Any]]:
        return list(json.loads(self.ctl("get", "pods", "-n", namespace, "-o", "json"))["items"])

    def exec_argv(self, namespace: str, *command: str, target: str = "deploy/loadclient") -> list[str]:
        return [*CTL, "--state-dir", str(self.state), "exec", "-n", namespace, target, "--", *command]

    def exec_json(self, namespace: str, *command: str, timeout: float = 120) -> dict[str, Any]:
        proc = subprocess.run(self.exec_argv(namespace, *command), capture_output=True, text=True, check=False,
                              cwd=REPO, timeout=timeout)
        try:
            return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            raise fail(f"{' '.join(command[:4])} in {namespace} printed no JSON (exit {proc.returncode}): "
                       f"{proc.stdout[-300:]} {proc.stderr[-500:]}") from None


# -- manifests ----------------------------------------------------------------------------------------------
def on_node(spec: dict[str, Any], node: str) -> dict[str, Any]:
    return {**spec, "nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0}


def server_docs(namespace: str) -> list[dict[str, Any]]:
    """samples/tcp_echo/tcp-echo.yaml in `namespace`, pinned to the server node, plus a sink container."""
    docs = [d for d in yaml.safe_load_all((REPO / "samples/tcp_echo/tcp-echo.yaml").read_text()) if d]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "Service":
            doc["spec"]["ports"].append({"name": "sink", "port": SINK_PORT, "targetPort": SINK_PORT})
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            pod["containers"].append({
                "name": "sink", "image": "ambient-py/samples",
                "command": ["python3", "-m", "samples.loadclient", "sink", "--port", str(SINK_PORT)],
                "readinessProbe": {"tcpSocket": {"port": SINK_PORT}, "periodSeconds": 1}})
            doc["spec"]["template"]["spec"] = on_node(pod, SERVER_NODE)
    return docs


def deployment(namespace: str, name: str, node: str, replicas: int = 1) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": {"app": name}},
                "spec": on_node({"containers": [{"name": name, "image": "ambient-py/samples",
                                                 "command": ["sleep", "infinity"]}]}, node)}}}


def namespace_doc(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


# -- measuring ztunnel -----------------------------------------------------------------------------------
class Ztunnels:
    """Both nodes' ztunnel processes (and any worker children), found through the cluster's PID files."""

    def __init__(self, state: Path) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for node in NODE_IPS:
            record = json.loads((state / "pids" / f"ztunnel-{node}.json").read_text())
            self.procs[node] = psutil.Process(int(record["pid"]))

    def _tree(self, node: str) -> list[psutil.Process]:
        proc = self.procs[node]
        if not proc.is_running():
            raise fail(f"ztunnel on {node} (pid {proc.pid}) is gone; see its log in the state dir")
        return [proc, *proc.children(recursive=True)]

    def cpu(self) -> dict[str, float]:
        def used(p: psutil.Process) -> float:
            times = p.cpu_times()
            return float(times.user + times.system)
        return {node: sum(used(p) for p in self._tree(node)) for node in self.procs}

    def rss_mb(self) -> dict[str, float]:
        return {node: sum(p.memory_info().rss for p in self._tree(node)) / 1e6 for node in self.procs}

    def processes(self) -> dict[str, int]:
        return {node: len(self._tree(node)) for node in self.procs}


@dataclass
class CpuWindow:
    used: dict[str, float]
    seconds: float

    def corrected(self, idle_rate: dict[str, float]) -> dict[str, float]:
        return {node: max(0.0, used - idle_rate[node] * self.seconds) for node, used in self.used.items()}


@contextmanager
def cpu_window(ztunnels: Ztunnels) -> Iterator[CpuWindow]:
    window = CpuWindow({}, 0.0)
    before, began = ztunnels.cpu(), time.monotonic()
    yield window
    after = ztunnels.cpu()
    window.seconds = time.monotonic() - began
    window.used = {node: after[node] - before[node] for node in after}


def metric_total(node: str, name: str, match: dict[str, str]) -> float:
    text = urllib.request.urlopen(f"http://{NODE_IPS[node]}:15020/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in match.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the runs ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    value: float
    extra: dict[str, Any]
    cpu: CpuWindow


def throughput_run(c: Cluster, z: Ztunnels, ns: str, seconds: float) -> Sample:
    with cpu_window(z) as cpu:
        r = c.exec_json(ns, "python3", "-m", "samples.loadclient", "throughput", f"tcp-echo.{ns}:{SINK_PORT}",
                        "--duration", str(seconds), "--json")
    if r["error"]:
        raise fail(f"throughput in {ns}: {r['error']}")
    return Sample(float(r["mb_per_s"]), r, cpu)


def latency_run(c: Cluster, z: Ztunnels, ns: str, args: argparse.Namespace) -> Sample:
    with cpu_window(z) as cpu:
        r = c.exec_json(ns, "python3", "-m", "samples.loadclient", "tcp", f"tcp-echo.{ns}:{ECHO_PORT}",
                        "--rate", str(args.rate), "--connections", str(args.connections), "--size", "1024",
                        "--duration", str(args.seconds), "--json")
    return Sample(float(r["latency_ms"]["p99"]), r, cpu)


def connections_run(c: Cluster, z: Ztunnels, ns: str, args: argparse.Namespace) -> Sample:
    with cpu_window(z) as cpu:
        r = c.exec_json(ns, "python3", "-c", NEW_CONNECTIONS, f"tcp-echo.{ns}", str(ECHO_PORT),
                        str(args.conn_seconds), str(args.conn_workers))
    return Sample(float(r["per_s"]), r, cpu)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def per_node(samples: list[Sample], idle: dict[str, float], per: Callable[[Sample], float]
             ) -> dict[str, tuple[float, float]]:
    """Median over samples of (raw, idle-corrected) CPU seconds per unit, for each node."""
    out = {}
    for node in NODE_IPS:
        raw = [s.cpu.used[node] / per(s) for s in samples if per(s) > 0]
        fixed = [s.cpu.corrected(idle)[node] / per(s) for s in samples if per(s) > 0]
        out[node] = (med(raw), med(fixed))
    return out


def cpu_text(values: dict[str, tuple[float, float]], fmt: str = "{:.3f}") -> str:
    return " | ".join(f"ztunnel {node} {fmt.format(raw)} ({fmt.format(fixed)})"
                      for node, (raw, fixed) in values.items())


# -- memory ------------------------------------------------------------------------------------------------
def hold_connections(c: Cluster, z: Ztunnels, count: int) -> tuple[dict[str, float], str]:
    """RSS of both ztunnels while the mesh client holds `count` connections to tcp-echo."""
    proc = subprocess.Popen(c.exec_argv(MESH, "python3", "-c", HOLD_CONNECTIONS, f"tcp-echo.{MESH}", str(ECHO_PORT),
                                        str(count), "120"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready N seconds", or EOF if it failed
        if not line.startswith("ready"):
            raise fail(f"holding {count} connections failed: {line}{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(1.0)  # let both ztunnels settle (access log, metrics) before sampling
        rss = {node: max(z.rss_mb()[node] for _ in range(3)) for node in NODE_IPS}
        return rss, line.split()[2]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def idle_pods(c: Cluster, z: Ztunnels, count: int, timeout: float) -> tuple[int, float, dict[str, float]]:
    """Scale an idle Deployment pinned to the client node to `count`; → (enrolled, seconds, RSS)."""
    began = time.monotonic()
    c.apply([namespace_doc(IDLE, ambient=True), deployment(IDLE, "idle", CLIENT_NODE, replicas=count)])

    def enrolled() -> int:
        dump = json.loads(urllib.request.urlopen(f"http://{NODE_IPS[CLIENT_NODE]}:15000/config_dump",
                                                 timeout=10).read())
        states = dump.get("workloadState") or {}
        return sum(1 for state in states.values() if (state.get("info") or {}).get("namespace") == IDLE)

    have = 0
    while time.monotonic() - began < timeout:
        have = enrolled()
        if have >= count:
            break
        time.sleep(1)
    took = time.monotonic() - began
    time.sleep(3)  # certificate fetch and the last listeners
    rss = {node: max(z.rss_mb()[node] for _ in range(3)) for node in NODE_IPS}
    return have, took, rss


# -- main --------------------------------------------------------------------------------------------------
def setup(c: Cluster) -> None:
    docs: list[dict[str, Any]] = []
    for ns, ambient in ((PLAIN, False), (MESH, True)):
        docs += [namespace_doc(ns, ambient), *server_docs(ns), deployment(ns, "loadclient", CLIENT_NODE)]
    c.apply(docs)
    for ns in (PLAIN, MESH):
        c.ctl("wait", "--for=condition=ready", "pod", "--all", "-n", ns, "--timeout=120s")
    deadline = time.monotonic() + 60
    while not all((p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection") == "enabled"
                  for p in c.pods(MESH)):
        if time.monotonic() > deadline:
            raise fail(f"the {MESH} pods were not enrolled in the mesh within 60 s")
        time.sleep(0.5)
    for ns in (PLAIN, MESH):
        nodes = {p["metadata"]["labels"]["app"]: p["spec"]["nodeName"] for p in c.pods(ns)}
        if nodes != {"tcp-echo": SERVER_NODE, "loadclient": CLIENT_NODE}:
            raise fail(f"unexpected placement in {ns}: {nodes}")
        # Thousands of short connections per second would otherwise run the pods out of ephemeral ports
        # (28k, each held 60 s in TIME_WAIT by whoever closed first), and connect() slows to a crawl
        # searching for a free one. The sysctl is per network namespace: only these pods change.
        for target in ("deploy/loadclient", "deploy/tcp-echo"):
            subprocess.run(c.exec_argv(ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", target=target), check=True,
                           capture_output=True, cwd=REPO, timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 1-3 (default 3)")
    p.add_argument("--throughput-seconds", type=float, default=3.0, help="upload length per run (default 3)")
    p.add_argument("--rate", type=float, default=1000.0, help="requests/s for 2 (default 1000)")
    p.add_argument("--connections", type=int, default=4, help="connections for 2 (default 4)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each run of 2 (default 4)")
    p.add_argument("--conn-seconds", type=float, default=3.0, help="length of each run of 3 (default 3)")
    p.add_argument("--conn-workers", type=int, default=32,
                   help="concurrent connectors in 3 (default 32: fewer leave the mesh path latency-bound)")
    p.add_argument("--open-connections", type=int, default=1000, help="connections held open in 4 (default 1000)")
    p.add_argument("--idle-pods", type=int, default=100, help="idle enrolled pods on one node in 4 (default 100)")
    p.add_argument("--idle-timeout", type=float, default=180.0,
                   help="seconds to wait for the idle pods; RSS is then reported at however many enrolled")
    args = p.parse_args()

    if os.geteuid() != 0:
        raise fail("needs root: the local cluster creates network namespaces, links and iptables rules")
    from ambient.local.cluster import current_state_dir, running
    from ambient.local.layout import StateDir
    other = current_state_dir()
    if other and running(StateDir(other)):
        raise fail(f"a local cluster is already running (state dir {other}); take it down first "
                   f"(ambientctl --state-dir {other} down): its fixed addresses would clash")

    tmp = Path(tempfile.mkdtemp(prefix="ztunnel-bench-"))
    c = Cluster(tmp / "state")
    began = time.monotonic()
    try:
        c.ctl("up", "--nodes", "2")
        z = Ztunnels(c.state)
        time.sleep(1)
        rss_empty = z.rss_mb()
        setup(c)
        print(f"cluster up with the bench pods in {time.monotonic() - began:.0f} s; cores: {os.cpu_count()}; "
              f"ztunnel processes per node: {z.processes()}; load average {load()}", flush=True)
        # Memory with idle pods first, on ztunnels that have carried no traffic yet (Python keeps what a
        # traffic run allocated). The idle pods then stay, idle, for the traffic runs.
        rss_bench = z.rss_mb()
        idle = idle_pods(c, z, args.idle_pods, args.idle_timeout)
        print(f"  {idle[0]} idle pods enrolled on {CLIENT_NODE} in {idle[1]:.0f} s", flush=True)
        rows = [("no pods (fresh cluster)", rss_empty),
                ("bench pods only (1 meshed pod per node), no traffic yet", rss_bench),
                (f"{idle[0]} idle enrolled pods on {CLIENT_NODE} (+ the bench pods), enrolled in {idle[1]:.0f} s",
                 idle[2])]
        run(c, z, args, rows, idle)
    finally:
        downing = time.monotonic()
        subprocess.run([*CTL, "--state-dir", str(c.state), "down"], capture_output=True, text=True, check=False,
                       timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"cluster down in {time.monotonic() - downing:.0f} s; whole run {time.monotonic() - began:.0f} s; "
              f"load average {load()}")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run(c: Cluster, z: Ztunnels, args: argparse.Namespace, rss_rows: list[tuple[str, dict[str, float]]],
        idle: tuple[int, float, dict[str, float]]) -> None:
    paths = (PLAIN, MESH)
    # Warm-up: Python start-up caches, the HBONE pool between the ztunnels, certificates.
    for ns in paths:
        throughput_run(c, z, ns, 0.5)
        c.exec_json(ns, "python3", "-m", "samples.loadclient", "tcp", f"tcp-echo.{ns}:{ECHO_PORT}", "--rate", "200",
                    "--requests", "100", "--connections", str(args.connections), "--size", "1024", "--json")
    with cpu_window(z) as quiet:
        time.sleep(3)
    idle_rate = {node: used / quiet.seconds for node, used in quiet.used.items()}

    thr: dict[str, list[Sample]] = {ns: [] for ns in paths}
    lat: dict[str, list[Sample]] = {ns: [] for ns in paths}
    con: dict[str, list[Sample]] = {ns: [] for ns in paths}
    for round_ in range(args.rounds):
        for ns in paths:
            thr[ns].append(throughput_run(c, z, ns, args.throughput_seconds))
        for ns in paths:
            lat[ns].append(latency_run(c, z, ns, args))
        for ns in paths:
            con[ns].append(connections_run(c, z, ns, args))
        print(f"  round {round_ + 1}/{args.rounds} done; load average {load()}", flush=True)

    mesh_policy = metric_total(SERVER_NODE, "istio_tcp_connections_opened_total",
                               {"reporter": "destination", "destination_workload_namespace": MESH,
                                "connection_security_policy": "mutual_tls"})
    plain_seen = metric_total(SERVER_NODE, "istio_tcp_connections_opened_total",
                              {"destination_workload_namespace": PLAIN})

    rss_after = z.rss_mb()
    held_rss, held_took = hold_connections(c, z, args.open_connections)
    enrolled, _, idle_rss = idle

    # -- report --------------------------------------------------------------------------------------------
    print()
    print(f"paths: {PLAIN} (no mesh) and {MESH} (ambient); client pod on {CLIENT_NODE}, server pod on "
          f"{SERVER_NODE}; {args.rounds} interleaved rounds, median (min-max)")
    print(f"check: ztunnel {SERVER_NODE} counted {mesh_policy:.0f} inbound mutual_tls connections into {MESH} and "
          f"{plain_seen:.0f} into {PLAIN}")
    print("idle ztunnel CPU: " + ", ".join(f"{n} {r * 1000:.1f} ms/s" for n, r in idle_rate.items())
          + "; CPU figures: raw (idle-corrected)")

    print(f"\n1. single-stream throughput, {args.throughput_seconds:g} s upload to the sink per run")
    print(f"{'path':<12} {'MB/s':>22} {'x plain':>8}  CPU s per GiB moved")
    base = med([s.value for s in thr[PLAIN]])
    for ns in paths:
        values = [s.value for s in thr[ns]]
        cpu = per_node(thr[ns], idle_rate, lambda s: s.extra["received"] / GiB)
        print(f"{ns:<12} {spread(values):>22} {med(values) / base:>8.2f}  {cpu_text(cpu, '{:.2f}')}")

    print(f"\n2. 1 KiB request/response, {args.rate:g}/s over {args.connections} connections, {args.seconds:g} s "
          "per run; latency in ms from each request's due time")
    print(f"{'path':<12} {'reqs':>6} {'err':>4} {'p50':>6} {'p99':>18} {'+p50':>6} {'+p99':>6}  "
          "CPU s per 1,000 requests")
    p50_base = med([s.extra["latency_ms"]["p50"] for s in lat[PLAIN]])
    p99_base = med([s.value for s in lat[PLAIN]])
    cpu_req: dict[str, tuple[float, float]] = {}
    for ns in paths:
        reqs = sum(s.extra["requests"] for s in lat[ns]) // len(lat[ns])
        errs = sum(s.extra["error_count"] for s in lat[ns])
        p50 = med([s.extra["latency_ms"]["p50"] for s in lat[ns]])
        p99s = [s.value for s in lat[ns]]
        cpu = per_node(lat[ns], idle_rate, lambda s: s.extra["requests"] / 1000)
        if ns == MESH:
            cpu_req = cpu
        print(f"{ns:<12} {reqs:>6} {errs:>4} {p50:>6.2f} {spread(p99s, '{:.2f}'):>18} {p50 - p50_base:>6.2f} "
              f"{med(p99s) - p99_base:>6.2f}  {cpu_text(cpu)}")

    print(f"\n3. new connections per second: closed loop, {args.conn_workers} workers, {args.conn_seconds:g} s per run;"
          " each: connect, 1 KiB echo, close")
    print(f"{'path':<12} {'conns/s':>22} {'err':>4} {'p99 ms':>7} {'x plain':>8}  CPU s per 1,000 connections")
    cps_base = med([s.value for s in con[PLAIN]])
    for ns in paths:
        values = [s.value for s in con[ns]]
        errs = sum(sum(s.extra["errors"].values()) for s in con[ns])
        p99 = med([s.extra["p99_ms"] for s in con[ns]])
        cpu = per_node(con[ns], idle_rate, lambda s: s.extra["connections"] / 1000)
        print(f"{ns:<12} {spread(values):>22} {errs:>4} {p99:>7.2f} {med(values) / cps_base:>8.2f}  {cpu_text(cpu)}")
    cps_mesh = med([s.value for s in con[MESH]])

    print("\n4. ztunnel RSS (MB)")
    rows = [*rss_rows, ("after the traffic runs 1-3", rss_after),
            (f"{args.open_connections} connections held open {MESH} client → tcp-echo (opened in {held_took} s)",
             held_rss)]
    for label, rss in rows:
        print(f"  {label:<78} " + "  ".join(f"{n} {v:6.1f}" for n, v in rss.items()))
    if enrolled < args.idle_pods:
        print(f"  NOTE: only {enrolled} of {args.idle_pods} idle pods were enrolled within {args.idle_timeout:g} s")

    print("\nissue 5 targets (through the local cluster; medians)")
    worst = max(cpu_req.values(), key=lambda v: v[0]) if cpu_req else (0.0, 0.0)
    print(f"  ≤ {TARGETS['cpu_per_1k']} CPU s per 1,000 requests per ztunnel: "
          + ", ".join(f"{n} {raw:.3f} ({fixed:.3f})" for n, (raw, fixed) in cpu_req.items())
          + f" — {'met' if worst[0] <= TARGETS['cpu_per_1k'] else 'NOT MET'}")
    print(f"  ≥ {TARGETS['conns_per_s']:.0f} new connections/s through the mesh: {cps_mesh:.0f}/s — "
          f"{'met' if cps_mesh >= TARGETS['conns_per_s'] else 'NOT MET'}")
    idle_mb = idle_rss[CLIENT_NODE]
    verdict = ("not measured at 100 pods" if enrolled < 100 else
               "met" if idle_mb <= TARGETS["rss_idle_mb"] else "NOT MET")
    print(f"  ≤ {TARGETS['rss_idle_mb']:.0f} MB RSS at 100 idle pods: {idle_mb:.1f} MB with {enrolled} idle pods on "
          f"{CLIENT_NODE} — {verdict}")


if __name__ == "__main__":
    main()
