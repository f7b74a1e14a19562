"""The waypoint vs a real Envoy as the same L7 proxy, side by side on loopback (issue 6).

Every path carries HTTP/1.1 keep-alive requests (1 KiB responses) over HBONE on both sides of the proxy,
the way ztunnel → waypoint → ztunnel does:

    direct            load client ══HBONE══▶ terminator → backend         (no L7 proxy: the baseline)
    envoy             load client ══HBONE══▶ Envoy ══HBONE══▶ terminator → backend
    waypoint          load client ══HBONE══▶ our waypoint ══HBONE══▶ terminator → backend
                      (asyncio's loop, as waypoint.main runs it)
    waypoint+uvloop   the same waypoint on uvloop

- The **load client** (this process, uvloop) is our `HboneClient` with the calling pod's certificate: each
  worker opens one CONNECT tunnel (authority `VIP:80`, `forwarded: for=<pod>`) on the pooled mTLS HTTP/2
  connection, as a ztunnel multiplexes, and sends keep-alive `GET`s on it.
- The **terminator** (`--role terminator`) plays the backend pod's ztunnel: our `HboneServer` on
  `<pod ip>:15008` relaying each CONNECT to its authority over TCP. The **backend** (`--role backend`) is a
  minimal HTTP/1.1 server answering every request with 1 KiB. Both proxies use the same terminator and
  backend, so only the L7 proxy differs.
- **Our waypoint** is `bench/waypoint_harness.py`: `waypoint.app.Waypoint` with a directly filled
  `WorkloadStore` and a VirtualService (header match route + default route).
- **Envoy** (`.venv-envoy/bin/envoy`, `--concurrency 1`) is configured the way Istio configures a waypoint,
  reduced to this one service: listener `connect_terminate` (TLS 1.3, client certificate required, HTTP/2
  CONNECT) → internal listener `main_internal` (HTTP connection manager, the same two routes with Istio's
  default retry policy, router) → cluster `outbound|80||echo...` whose endpoint is internal listener
  `connect_originate` (`tcp_proxy` tunnelling every upstream HTTP connection as a CONNECT to `podIP:port`
  over mTLS HTTP/2 to `<pod ip>:15008`, verifying the pod's SAN).

By default both proxies write one access log line per request to a file (our waypoint through its logging,
Envoy with Istio's default text format); `--no-access-log` turns both off. `--waypoints` picks the waypoint
paths: `asyncio` (asyncio's default loop), `uvloop`, `asyncio+gcfreeze` and `uvloop+gcfreeze`
(`gc.freeze()` once serving); `waypoint.main` runs as `uvloop+gcfreeze`. After the report each
waypoint's garbage collections are listed (count, total and longest pause per generation);
`--lag-monitor` adds how often its event loop ran more than 5 ms late; `--keep-logs DIR` keeps the logs,
Envoy's bootstrap and stats.

Measurements, `--rounds` interleaved rounds over all paths, medians (min-max):

1. Fixed rate: `--rate` (1,000/s) over `--connections` (4) tunnels, open loop, latency from each request's
   due time (no coordinated omission; `samples.loadclient.pacing`): p50/p99, added over `direct`, and the
   proxy's CPU seconds per 1,000 requests (psutil user+system over all threads).
2. Max rate: closed loop, `--max-concurrency` tunnels: requests/s reached on this machine, the proxy's
   CPU use, and requests/s per core of the proxy (requests ÷ the proxy's CPU seconds).
3. RSS of each proxy process: after start-up, and after all rounds (with the peak, VmHWM).

The report ends with the ratios waypoint ÷ Envoy and the issue's targets (at most 2x Envoy's CPU per
request and 2x Envoy's added p99). Print-only; see bench/README.md ("Waypoint (issue 6)").

    .venv/bin/python bench/waypoint_l7.py [--rounds 5] [--seconds 2] [--rate 1000] [--connections 4]
                                          [--max-concurrency 16] [--waypoints asyncio,uvloop] [--no-access-log]
    .venv/bin/python bench/waypoint_l7.py --quick        # smoke run, < 20 s
    .venv/bin/python bench/waypoint_l7.py --profile [--waypoints uvloop]   # cProfile the waypoint, no Envoy

Needs no root and no cluster: everything is on 127.0.0.1 and `--pod-ip` (127.7.0.2), port 15008 there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.*` when run as a script

from ambient.hbone import HboneClient, HboneError, HboneServer, HboneStream
from ambient.hbone.headers import forwarded_for
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.signer import CaSigner
from bench.envoy import EnvoyError, EnvoyProcess, TlsFiles, _address, _admin_get, envoy_binary
from bench.hbone_throughput import (
    CpuMeter,
    fmt,
    issue,
    load_cert,
    med,
    ratio,
    relay_to_target,
    run,
    spread,
    until_stdin_closes,
    write_cert_json,
)
from bench.waypoint_harness import (
    CLIENT_IP,
    HOST,
    IDS,
    LOCALHOST,
    MATCH_HEADER,
    POD_IP,
    ROUTE_NAMES,
    SERVICE_PORT,
    SERVICE_VIP,
    TD,
)
from samples.loadclient.pacing import Pacing, drive
from samples.loadclient.result import LoadResult

HERE = Path(__file__).resolve().parent
HBONE_PORT = 15008  # where the waypoint dials endpoints (waypoint/proxy.py)
RESPONSE_SIZE = 1024
START_TIMEOUT = 20.0  # seconds for a child process to report its ports
STOP_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0  # per request of the load client
PROFILE_RATE = 200.0  # fixed rate of a profiled run (cProfile makes the waypoint ~4x slower)
TARGET_CPU = 2.0  # waypoint CPU per request ÷ Envoy's
TARGET_ADDED_P99 = 2.0  # waypoint added p99 ÷ Envoy's
ENVOY_ACCESS_LOG_FORMAT = (  # Istio's default text access log format
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%" '
    '%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" '
    '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    '%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% '
    '%ROUTE_NAME%\n')
# Istio's default retry policy for a VirtualService route without `retries` (what our waypoint applies too)
ISTIO_RETRY_POLICY = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                      "num_retries": 2, "retriable_status_codes": [503],
                      "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions"
                                                                 ".retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                      "host_selection_retry_max_attempts": "5"}


# -- child roles: the backend and the terminator -------------------------------------------------------------
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            + f"content-length: {RESPONSE_SIZE}\r\n\r\n".encode() + b"b" * RESPONSE_SIZE)


class BackendConnection(asyncio.Protocol):
    """HTTP/1.1 keep-alive, bodiless requests (the bench sends GETs): every request head gets RESPONSE."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = 0
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            del self.buffer[:end + 4]
            answers += 1
        if answers and self.transport is not None:
            self.transport.write(RESPONSE * answers)


async def role_backend(spec: dict[str, Any]) -> None:
    server = await asyncio.get_running_loop().create_server(BackendConnection, spec["ip"], 0, backlog=1024)
    print(json.dumps({"ports": {"backend": server.sockets[0].getsockname()[1]}}), flush=True)
    async with server:
        await until_stdin_closes()


async def role_terminator(spec: dict[str, Any]) -> None:
    """The backend pod's ztunnel: every CONNECT relayed to its authority over TCP (no policy)."""
    cert = load_cert(spec["cert"])

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((spec["ip"], HBONE_PORT))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"terminator: cannot listen on {spec['ip']}:{HBONE_PORT} ({exc.strerror}): another bench "
                         f"run, or something on 0.0.0.0:{HBONE_PORT}? Check `ss -ltn`, or pass --pod-ip") from None
    sock.listen(1024)
    server = HboneServer(lambda _ip: cert, relay_to_target)
    print(json.dumps({"ports": {"hbone": HBONE_PORT}}), flush=True)
    serving = asyncio.ensure_future(server.serve(sock))
    await until_stdin_closes()
    serving.cancel()
    await server.close()


ROLES: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, None]]] = {
    "backend": role_backend, "terminator": role_terminator}


@dataclass
class Child:
    """A Python child process; `ports` is what it printed when it was ready. Stops when its stdin closes."""

    name: str
    proc: asyncio.subprocess.Process
    ports: dict[str, int] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)  # what it printed (JSON) after its stdin closed

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, name: str, argv: list[str], log: Path) -> Child:
        """Run `python argv...` with stderr to `log` (a deployed proxy's log goes to a file too)."""
        with log.open("ab") as log_out:
            proc = await asyncio.create_subprocess_exec(sys.executable, *argv, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, stderr=log_out)
        child = cls(name, proc)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except BaseException:
            await child.stop()
            raise
        if not line:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{name} exited with status {await proc.wait()} before it was ready:\n{tail}")
        child.ports = json.loads(line)["ports"]
        return child

    async def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            if self.proc.stdout is not None:
                out = await asyncio.wait_for(self.proc.stdout.read(), STOP_TIMEOUT)
                for line in out.splitlines():
                    with contextlib.suppress(ValueError):
                        self.final.update(json.loads(line))
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


# -- Envoy as a waypoint -------------------------------------------------------------------------------------
def _cluster(name: str, address: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "10s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": address}}]}]}, **extra}


def _internal(listener: str) -> dict[str, Any]:
    return {"envoy_internal_address": {"server_listener_name": listener}}


def _router() -> list[dict[str, Any]]:
    return [{"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]


def _access_log(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    return {"access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(path),
        "log_format": {"text_format_source": {"inline_string": ENVOY_ACCESS_LOG_FORMAT}}}}]}


class WaypointEnvoy(EnvoyProcess):
    """EnvoyProcess whose listener ports skip internal listeners (they have no socket address)."""

    async def _read_ports(self) -> None:
        status, body = await _admin_get(self.admin, "/listeners?format=json")
        if status != 200:
            raise EnvoyError(f"Envoy admin /listeners answered {status}: {body[:200]!r}")
        for listener in json.loads(body).get("listener_statuses", []):
            address = listener.get("local_address", {}).get("socket_address")
            if address is not None:
                self.ports[listener["name"]] = int(address["port_value"])


HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def envoy_waypoint_bootstrap(tls: TlsFiles, pod_ip: str, target_port: int, pod_san: str,
                             access_log: Path | None) -> dict[str, Any]:
    """Envoy as a waypoint for the bench service (see the module docstring); listener `connect_terminate`."""
    outbound = f"outbound|{SERVICE_PORT}||{HOST}"
    downstream_tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": tls.common_tls_context({"prefix": f"spiffe://{TD}/"}),
    }
    terminate = {
        "@type": HCM_TYPE, "stat_prefix": "connect_terminate", "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"name": "connect_terminate", "virtual_hosts": [{
            "name": "connect_terminate", "domains": ["*"],
            "routes": [{"match": {"connect_matcher": {}},
                        "route": {"cluster": "main_internal",
                                  "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]},
        "http_filters": _router(),
    }
    name, value = MATCH_HEADER
    route_action = {"cluster": outbound, "timeout": "0s", "retry_policy": ISTIO_RETRY_POLICY}
    main_internal = {
        "@type": HCM_TYPE, "stat_prefix": "main_internal", "codec_type": "AUTO",
        "route_config": {"name": f"{HOST}:{SERVICE_PORT}", "virtual_hosts": [{
            "name": f"{HOST}:{SERVICE_PORT}", "domains": ["*"],
            "routes": [{"name": ROUTE_NAMES[0],
                        "match": {"prefix": "/", "headers": [{"name": name, "string_match": {"exact": value}}]},
                        "route": route_action},
                       {"name": ROUTE_NAMES[1], "match": {"prefix": "/"}, "route": route_action}]}]},
        "http_filters": _router(),
        **_access_log(access_log),
    }
    originate = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "connect_originate", "cluster": "connect_originate",
        "tunneling_config": {"hostname": f"{pod_ip}:{target_port}"},
    }
    upstream_tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": tls.common_tls_context({"exact": pod_san}),
    }
    http2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    listeners = [
        {"name": "connect_terminate", "address": _address(LOCALHOST, 0),
         "filter_chains": [{"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": downstream_tls},
                            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                         "typed_config": terminate}]}]},
        {"name": "main_internal", "internal_listener": {},
         "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                         "typed_config": main_internal}]}]},
        {"name": "connect_originate", "internal_listener": {},
         "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": originate}]}]},
    ]
    clusters = [
        _cluster("main_internal", _internal("main_internal")),
        _cluster(outbound, _internal("connect_originate")),
        _cluster("connect_originate", _address(pod_ip, HBONE_PORT), typed_extension_protocol_options=http2,
                 transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": upstream_tls}),
    ]
    return {
        "admin": {"address": _address(LOCALHOST, 0)},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}],
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# -- the load client ---------------------------------------------------------------------------------------------
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """How the load client reaches one path: the HBONE server, the CONNECT authority, its identity."""

    dst: tuple[str, int]
    authority: str
    identity: str


class HboneHttpProbe:
    """One worker: one HBONE tunnel carrying HTTP/1.1 keep-alive GETs; an answer counts when it is a 200
    with a 1 KiB body. A failed request drops the tunnel; the next send opens a new one."""

    def __init__(self, client: HboneClient, cert: WorkloadCertificate, target: Target, request: bytes) -> None:
        self.client, self.cert, self.target, self.request = client, cert, target, request
        self.headers = {"forwarded": forwarded_for(CLIENT_IP, 0)}
        self.stream: HboneStream | None = None
        self.buffer = bytearray()

    async def _connect(self) -> HboneStream:
        if self.stream is None:
            self.stream = await self.client.connect(self.cert, self.target.dst, self.target.authority,
                                                    [self.target.identity], headers=self.headers)
            self.buffer.clear()
        return self.stream

    async def open(self) -> None:
        with contextlib.suppress(HboneError, OSError, TimeoutError):
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await self._connect()

    async def _fill(self, stream: HboneStream) -> None:
        data = await stream.read()
        if not data:
            raise EOFError
        self.buffer += data

    async def _exchange(self, stream: HboneStream) -> tuple[str, int | None]:
        """Send the request, read one response: (status, body length; None without content-length)."""
        await stream.write(self.request)
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            await self._fill(stream)
        head = bytes(buffer[:end + 2])
        found = CONTENT_LENGTH.search(head)
        if found is None:
            return head[9:12].decode(errors="replace"), None
        length = int(found.group(1))
        while len(buffer) < end + 4 + length:
            await self._fill(stream)
        del buffer[:end + 4 + length]
        return head[9:12].decode(errors="replace"), length

    async def send(self) -> str | None:
        error: str | None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, length = await self._exchange(await self._connect())
        except TimeoutError:
            error = "timeout"
        except EOFError:
            error = "closed by peer"
        except (HboneError, OSError) as exc:
            error = type(exc).__name__
        else:
            if length is None:
                error = f"{status} without content-length"
            else:
                error = None if status == "200" and length == RESPONSE_SIZE else f"{status} {length} B"
        if error is not None:
            self._drop()
        return error

    def _drop(self) -> None:
        if self.stream is not None:
            self.stream.abort()
            self.stream = None

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def http_request() -> bytes:
    return (f"GET /bench HTTP/1.1\r\nhost: {HOST.split('.')[0]}:{SERVICE_PORT}\r\nuser-agent: bench-waypoint\r\n"
            "accept: */*\r\n\r\n").encode()


@dataclass
class Load:
    client: HboneClient
    cert: WorkloadCertificate

    async def run(self, target: Target, pacing: Pacing, name: str) -> LoadResult:
        request = http_request()
        return await drive(pacing, lambda: HboneHttpProbe(self.client, self.cert, target, request), "hbone-http", name)


# -- the rig -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSpec:
    name: str
    target: Target
    proxy: str | None  # the process measured (None: the direct baseline)


@dataclass
class Rig:
    children: list[Child] = field(default_factory=list)
    envoys: list[EnvoyProcess] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    paths: list[PathSpec] = field(default_factory=list)
    workdir: Path = Path()
    client_cert: WorkloadCertificate | None = None

    async def child(self, name: str, argv: list[str]) -> Child:
        child = await Child.start(name, argv, self.workdir / f"{name}.log")
        self.children.append(child)
        self.pids[name] = child.pid
        return child

    async def close(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.envoys), return_exceptions=True)
        for child in reversed(self.children):  # proxies before the terminator, the terminator before the backend
            with contextlib.suppress(Exception):
                await child.stop()


async def build(rig: Rig, args: argparse.Namespace) -> None:
    workdir = rig.workdir
    signer = CaSigner.generate(TD)
    certs = {name: issue(signer, identity) for name, identity in IDS.items()}
    rig.client_cert = certs["client"]
    me = str(Path(__file__).resolve())
    backend = await rig.child("backend", [me, "--role", "backend", "--spec", json.dumps({"ip": args.pod_ip})])
    target_port = backend.ports["backend"]
    terminator_spec = {"ip": args.pod_ip, "cert": write_cert_json(certs["backend"], workdir / "backend.json")}
    await rig.child("terminator", [me, "--role", "terminator", "--spec", json.dumps(terminator_spec)])
    rig.paths.append(PathSpec("direct", Target((args.pod_ip, HBONE_PORT), f"{args.pod_ip}:{target_port}",
                                               str(IDS["backend"])), None))
    service = f"{SERVICE_VIP}:{SERVICE_PORT}"
    if args.envoy and not args.profile and envoy_binary() is not None:
        log = workdir / "envoy-access.log" if args.access_log else None
        bootstrap = envoy_waypoint_bootstrap(TlsFiles.write(certs["envoy"], workdir, "envoy"), args.pod_ip,
                                             target_port, str(IDS["backend"]), log)
        envoy = await WaypointEnvoy.start(bootstrap, workdir, "envoy")
        rig.envoys.append(envoy)
        rig.pids["envoy"] = envoy.pid
        rig.paths.append(PathSpec("envoy", Target((LOCALHOST, envoy.port("connect_terminate")), service,
                                                  str(IDS["envoy"])), "envoy"))
    waypoint_cert = write_cert_json(certs["waypoint"], workdir / "waypoint.json")
    for variant in args.waypoints:
        name = waypoint_path_name(variant)
        spec = {"cert": waypoint_cert, "pod_ip": args.pod_ip, "target_port": target_port,
                "access_log": args.access_log, "uvloop": "uvloop" in variant, "gc_freeze": "gcfreeze" in variant,
                "lag_monitor": args.lag_monitor,
                "profile": str(workdir / f"{name}.prof") if args.profile else None}
        child = await rig.child(name, [str(HERE / "waypoint_harness.py"), "--spec", json.dumps(spec)])
        rig.paths.append(PathSpec(name, Target((LOCALHOST, child.ports["hbone"]), service, str(IDS["waypoint"])),
                                  name))


WAYPOINT_VARIANTS = ("asyncio", "uvloop", "asyncio+gcfreeze", "uvloop+gcfreeze")


def waypoint_path_name(variant: str) -> str:
    """"asyncio" → "waypoint" (as waypoint.main runs it); "uvloop+gcfreeze" → "waypoint+uvloop+gcfreeze"."""
    return "+".join(["waypoint", *(part for part in variant.split("+") if part != "asyncio")])


# -- measurements ------------------------------------------------------------------------------------------------
@dataclass
class Figures:
    """One path's results, one entry per round."""

    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_per_1k: list[float] = field(default_factory=list)
    kernel_per_1k: list[float] = field(default_factory=list)
    max_rps: list[float] = field(default_factory=list)
    max_cores: list[float] = field(default_factory=list)  # the proxy's CPU seconds per second at max rate
    rps_per_core: list[float] = field(default_factory=list)
    max_errors: dict[str, int] = field(default_factory=dict)
    others_cores: list[float] = field(default_factory=list)  # client + terminator + backend at max rate
    rss_start: float | None = None
    rss_end: float | None = None
    rss_peak: float | None = None


def merge_errors(into: dict[str, int], errors: Any) -> None:
    for kind, count in dict(errors).items():
        into[kind] = into.get(kind, 0) + count


def rss_mb(pid: int) -> tuple[float, float | None]:
    """(RSS, peak RSS) in MB of a process."""
    rss = psutil.Process(pid).memory_info().rss / 1e6
    peak = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024 / 1e6
    return rss, peak


async def measure_latency(load: Load, path: PathSpec, meter: CpuMeter, args: argparse.Namespace, fig: Figures) -> None:
    await load.run(path.target, Pacing(rate=args.rate, duration_s=args.warmup, concurrency=args.connections), path.name)
    meter.reset()
    result = await load.run(path.target, Pacing(rate=args.rate, duration_s=args.seconds, concurrency=args.connections),
                            path.name)
    fig.p50.append(result.latency_ms["p50"])
    fig.p99.append(result.latency_ms["p99"])
    fig.requests += result.requests
    merge_errors(fig.errors, result.errors)
    if path.proxy is not None and result.requests:
        fig.cpu_per_1k.append(meter.used(path.proxy) * 1000 / result.requests)
        fig.kernel_per_1k.append(meter.kernel(path.proxy) * 1000 / result.requests)


async def measure_max(load: Load, path: PathSpec, meter: CpuMeter, args: argparse.Namespace, fig: Figures,
                      others: list[str]) -> None:
    await load.run(path.target, Pacing(duration_s=args.warmup, concurrency=args.max_concurrency), path.name)
    meter.reset()
    result = await load.run(path.target, Pacing(duration_s=args.seconds, concurrency=args.max_concurrency), path.name)
    fig.max_rps.append(result.successes / result.elapsed_s)
    merge_errors(fig.max_errors, result.errors)
    fig.others_cores.append(sum(meter.used(name) for name in others) / result.elapsed_s)
    if path.proxy is not None:
        cpu = meter.used(path.proxy)
        fig.max_cores.append(cpu / result.elapsed_s)
        if cpu > 0:
            fig.rps_per_core.append(result.successes / cpu)


# -- report ----------------------------------------------------------------------------------------------------
def added_ratio(mine: float | None, envoys: float | None) -> float | None:
    """A ratio of added latencies; none when Envoy added nothing (or less than the noise: below zero)."""
    return None if mine is None or envoys is None or envoys <= 0 else mine / envoys


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(errors.items()))


def report(figures: dict[str, Figures], args: argparse.Namespace) -> None:
    base = figures.get("direct")
    rounds = f"median of {args.rounds} round{'s' * (args.rounds > 1)} (min-max)"

    def added(fig: Figures | None, key: str) -> float | None:
        if fig is None or base is None:
            return None
        mine, direct = med(getattr(fig, key)), med(getattr(base, key))
        return None if mine is None or direct is None else mine - direct

    envoy = figures.get("envoy")
    w = max(len(name) for name in figures)
    print(f"\n1. HTTP/1.1 GET, {RESPONSE_SIZE} B responses, {args.rate:g}/s over {args.connections} HBONE tunnels, "
          f"{args.seconds:g}s per path and round; latency in ms from each request's due time; {rounds}")
    print(f"{'path':<{w}} {'reqs':>6} {'err':>4} {'p50':>6} {'p99':>18} {'+p50':>6} {'+p99':>6} {'+p99/envoy':>10}  "
          "proxy CPU s per 1,000 requests (of which kernel)")
    for name, fig in figures.items():
        cpu = "-" if not fig.cpu_per_1k else f"{spread(fig.cpu_per_1k, '.3f')} ({fmt(med(fig.kernel_per_1k), '.3f')})"
        print(f"{name:<{w}} {fig.requests:>6} {sum(fig.errors.values()):>4} {fmt(med(fig.p50)):>6} "
              f"{spread(fig.p99, '.2f'):>18} {fmt(added(fig, 'p50')):>6} {fmt(added(fig, 'p99')):>6} "
              f"{fmt(added_ratio(added(fig, 'p99'), added(envoy, 'p99'))):>10}  {cpu}")

    print(f"\n2. max rate: closed loop, {args.max_concurrency} HBONE tunnels, {args.seconds:g}s per path and round; "
          f"{rounds}")
    print(f"{'path':<{w}} {'req/s':>20} {'err':>4} {'proxy cores':>12} {'req/s per proxy core':>22} "
          f"{'CPU s/1k':>8}  {'client+terminator+backend cores':>31}")
    for name, fig in figures.items():
        per_core = med(fig.rps_per_core)
        print(f"{name:<{w}} {spread(fig.max_rps, '.0f'):>20} {sum(fig.max_errors.values()):>4} "
              f"{fmt(med(fig.max_cores)):>12} {spread(fig.rps_per_core, '.0f'):>22} "
              f"{fmt(ratio(1000, per_core), '.3f'):>8}  {fmt(med(fig.others_cores)):>31}")

    print("\n3. RSS of the proxy process, MB")
    for name, fig in figures.items():
        if fig.rss_start is not None:
            print(f"{name:<{w}} after start-up {fmt(fig.rss_start, '.1f'):>6}   "
                  f"after the runs {fmt(fig.rss_end, '.1f'):>6}   peak {fmt(fig.rss_peak, '.1f'):>6}")

    for name, fig in figures.items():
        if fig.errors or fig.max_errors:
            print(f"errors on {name}: {errors_text(fig.errors)} {errors_text(fig.max_errors)}".rstrip())

    if envoy is None:
        return
    for name, fig in figures.items():
        if not name.startswith("waypoint"):
            continue
        cpu_ratio = ratio(med(fig.cpu_per_1k), med(envoy.cpu_per_1k))
        p99_ratio = added_ratio(added(fig, "p99"), added(envoy, "p99"))
        per_round = [added_ratio(mine - direct, envoys - direct) if base is not None else None
                     for mine, envoys, direct in zip(fig.p99, envoy.p99, base.p99 if base else [], strict=False)]
        print(f"\n{name} ÷ envoy (medians)")
        print(f"  CPU per request at {args.rate:g}/s: {fmt(med(fig.cpu_per_1k), '.3f')} vs "
              f"{fmt(med(envoy.cpu_per_1k), '.3f')} s/1k = {fmt(cpu_ratio)}x — target ≤ {TARGET_CPU:g}x: "
              f"{verdict(cpu_ratio, TARGET_CPU)}")
        print(f"  added p99 at {args.rate:g}/s: {fmt(added(fig, 'p99'))} vs {fmt(added(envoy, 'p99'))} ms = "
              f"{times(p99_ratio)} — target ≤ {TARGET_ADDED_P99:g}x: {verdict(p99_ratio, TARGET_ADDED_P99)}"
              f"{'' if p99_ratio is not None else ' (Envoy added nothing measurable)'}; per round: "
              + ", ".join(times(r) for r in per_round))
        print(f"  added p50 at {args.rate:g}/s: {fmt(added(fig, 'p50'))} vs {fmt(added(envoy, 'p50'))} ms = "
              f"{times(added_ratio(added(fig, 'p50'), added(envoy, 'p50')))}")
        print(f"  req/s per proxy core at max rate: {fmt(med(fig.rps_per_core), '.0f')} vs "
              f"{fmt(med(envoy.rps_per_core), '.0f')} = {fmt(ratio(med(fig.rps_per_core), med(envoy.rps_per_core)))}x"
              f" (CPU per request at max rate {fmt(ratio(med(envoy.rps_per_core), med(fig.rps_per_core)))}x)")
        print(f"  max req/s reached on this machine: {fmt(med(fig.max_rps), '.0f')} vs {fmt(med(envoy.max_rps), '.0f')}"
              f" = {fmt(ratio(med(fig.max_rps), med(envoy.max_rps)))}x")
        print(f"  RSS after the runs: {fmt(fig.rss_end, '.1f')} vs {fmt(envoy.rss_end, '.1f')} MB = "
              f"{fmt(ratio(fig.rss_end, envoy.rss_end))}x")


def verdict(value: float | None, at_most: float) -> str:
    return "n/a" if value is None else ("met" if value <= at_most else "NOT MET")


def print_gc(rig: Rig) -> None:
    """The waypoints' garbage collections over their whole life (warm-ups and every path's runs included)."""
    for child in rig.children:
        if "gc" in child.final:
            gens = ", ".join(f"gen{gen} {n} x, {total:.0f} ms in all, longest {longest:.1f} ms"
                             for gen, (n, total, longest) in sorted(child.final["gc"].items()))
            print(f"{child.name} garbage collections: {gens}; {child.final.get('gc_objects', '?')} objects tracked")
        if "loop_lag" in child.final:
            lag = child.final["loop_lag"]
            print(f"{child.name} event loop late by > 5 ms: {lag['lags']} x (longest {lag['longest_ms']} ms); "
                  f"busy running Python {lag['busy']} x (longest {lag['busy_longest_ms']} ms), not running "
                  f"{lag['not_running']} x (longest {lag['not_running_longest_ms']} ms)")


def print_profiles(rig: Rig, top: int) -> None:
    for path in rig.paths:
        prof = rig.workdir / f"{path.name}.prof"
        if path.proxy is None or not prof.exists():
            continue
        stats = pstats.Stats(str(prof))
        for key in ("tottime", "cumulative"):
            print(f"\n--- {path.name}: top {top} by {key} (CPU time; cProfile's own cost inflates small calls) ---")
            stats.sort_stats(key).print_stats(top)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def check_route(load: Load, path: PathSpec) -> None:
    """One request per path before measuring: a path that fails is a broken rig, not a figure."""
    result = await load.run(path.target, Pacing(requests=1), path.name)
    if result.error_count:
        raise RuntimeError(f"{path.name}: the first request failed: {errors_text(dict(result.errors))}")


async def bench(args: argparse.Namespace) -> None:
    if envoy_binary() is None and not args.profile:
        print("Envoy is not installed at .venv-envoy/bin/envoy (run scripts/setup.sh): measuring without it")
    rig = Rig()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="waypoint-bench-") as tmp:
        rig.workdir = Path(tmp)
        client = HboneClient()
        try:
            await build(rig, args)
            assert rig.client_cert is not None
            load = Load(client, rig.client_cert)
            for path in rig.paths:
                await check_route(load, path)
            print(f"cores: {os.cpu_count()}; load average before: {load_average()}; access log: "
                  f"{'on' if args.access_log else 'off'}; processes: "
                  + ", ".join(f"{name} {pid}" for name, pid in rig.pids.items()))
            figures = {path.name: Figures() for path in rig.paths}
            for path in rig.paths:
                if path.proxy is not None:
                    figures[path.name].rss_start = rss_mb(rig.pids[path.proxy])[0]
            meter = CpuMeter({**rig.pids, "client": os.getpid()})  # this process is the load client
            others = ["client", "terminator", "backend"]
            for round_ in range(1, args.rounds + 1):
                for path in rig.paths:
                    print(f"  round {round_}/{args.rounds}: {path.name}", file=sys.stderr, flush=True)
                    await measure_latency(load, path, meter, args, figures[path.name])
                    await measure_max(load, path, meter, args, figures[path.name], others)
            for path in rig.paths:
                if path.proxy is not None:
                    fig = figures[path.name]
                    fig.rss_end, fig.rss_peak = rss_mb(rig.pids[path.proxy])
            print(f"load average after: {load_average()}; whole run {time.monotonic() - started:.0f} s")
            report(figures, args)
            print()
            if args.keep_logs is not None and rig.envoys:
                _, stats = await _admin_get(rig.envoys[0].admin, "/stats")
                (rig.workdir / "envoy-stats.txt").write_bytes(stats)
        finally:
            await client.close()
            await rig.close()
        print_gc(rig)
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for kept in [*rig.workdir.glob("*.log"), *rig.workdir.glob("*.txt"), *rig.workdir.glob("*.yaml"),
                         *rig.workdir.glob("*.prof")]:
                shutil.copy(kept, args.keep_logs / kept.name)
            print(f"logs, Envoy's bootstrap and stats kept in {args.keep_logs}")
        if args.profile:
            print_profiles(rig, args.profile_top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="every path is measured this often, interleaved")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measured run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured run before each measured one")
    parser.add_argument("--rate", type=float, help="requests per second of the fixed-rate runs (default 1000; "
                        f"{PROFILE_RATE:g} with --profile, which slows the waypoint several times)")
    parser.add_argument("--connections", type=int, default=4, help="HBONE tunnels of the fixed-rate runs")
    parser.add_argument("--max-concurrency", type=int, default=16, help="HBONE tunnels of the max-rate runs")
    parser.add_argument("--waypoints", default="asyncio,uvloop",
                        help="the waypoint paths, comma-separated: asyncio, uvloop, asyncio+gcfreeze, "
                             "uvloop+gcfreeze (gc.freeze() once serving; waypoint.main runs as uvloop+gcfreeze); "
                             "none for no waypoint path")
    parser.add_argument("--no-envoy", dest="envoy", action="store_false", help="leave the Envoy path out")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="no access log in either proxy (default: one line per request in both)")
    parser.add_argument("--pod-ip", default=POD_IP,
                        help="loopback address of the backend pod (its port 15008 must be free)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 0.5 s runs (< 20 s in all)")
    parser.add_argument("--profile", action="store_true", help="cProfile the waypoint(s); no Envoy")
    parser.add_argument("--profile-top", type=int, default=30, help="functions per profile listing")
    parser.add_argument("--lag-monitor", action="store_true",
                        help="diagnosis: the waypoints report how often their event loop ran > 5 ms late, and why")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="copy the processes' logs (access logs included) and Envoy's stats here")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        with contextlib.suppress(KeyboardInterrupt):
            run(ROLES[args.role](json.loads(args.spec)), True)
        return
    args.waypoints = [w.strip() for w in args.waypoints.split(",") if w.strip() not in ("", "none")]
    unknown = [w for w in args.waypoints if w not in WAYPOINT_VARIANTS]
    if unknown:
        parser.error(f"--waypoints: unknown {', '.join(unknown)}; use any of {', '.join(WAYPOINT_VARIANTS)} or none")
    if args.rate is None:
        args.rate = PROFILE_RATE if args.profile else 1000.0
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 0.5, 0.2
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        run(bench(args), True)
    except (EnvoyError, RuntimeError) as exc:
        sys.exit(f"waypoint_l7: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
