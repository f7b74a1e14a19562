"""`waypoint`: the ambient L7 proxy (Istio's waypoint) for the services bound to one waypoint Gateway.

Start-up: wait for the mesh root and the token, then run the xDS client (workloads and services), the
certificate manager (the waypoint's own SPIFFE identity), the Kubernetes informers (L7 resources), the
HBONE server (15008) and the admin (15000), metrics (15020) and readiness (15021) servers. Ready once the
certificate, both xDS types and every informer's first list are in. SIGTERM (or `POST /quitquitquit`)
drains: the HBONE listener closes, open connections get GOAWAY and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ambient.aio import cancel_on_signals
from ambient.identity.ca_client import CaClient, CaClientConfig, token_from_file
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.manager import CertificateManager
from ambient.identity.spiffe import SpiffeId
from ambient.kube.client import KubeClient, KubeConfig, KubeConfigError
from ambient.telemetry.admin_http import Readiness
from ambient.telemetry.logs import setup_logging
from ambient.xds.client import ClientConfig, XdsClient
from ambient.xds.store import WorkloadStore
from waypoint.admin import AdminServer, MetricsServer, ReadinessServer
from waypoint.app import Waypoint
from waypoint.config import WaypointConfig, parse_args
from waypoint.sources import KubeSources

log = logging.getLogger("waypoint")
FILES_WAIT = 60.0  # seconds to wait for the mesh root and the token to appear (mounted/written at start)
LISTEN_BACKLOG = 1024


def router_node_id(config: WaypointConfig) -> str:
    """Istio's node id for a waypoint (an Envoy router): `router~<ip>~<pod>.<ns>~<ns>.svc.<suffix>`."""
    return (f"router~{config.pod_ip or '0.0.0.0'}~{config.pod_name or config.name}.{config.namespace}~"
            f"{config.namespace}.svc.{config.domain_suffix}")


def _missing_file_message(config: WaypointConfig, path: str, waited: float) -> str:
    if path == config.root_cert:
        what, fix = "the mesh root", ("mount ConfigMap istio-ca-root-cert there (ambient-control publishes it in "
                                      "every namespace) or pass --root-cert")
    else:
        what, fix = "the CA token", ("mount a projected ServiceAccount token with audience istio-ca there or pass "
                                     "--token-path")
    return f"waypoint: {what} {path} does not exist after {waited:.0f}s; {fix}"


async def _wait_for_files(config: WaypointConfig, timeout: float = FILES_WAIT) -> None:
    """Wait for the mesh root and the token (written at start locally, mounted on a cluster); exit with one
    line naming what is missing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for path in (config.root_cert, config.token_path):
        while not Path(path).exists():
            if time.monotonic() > deadline:
                raise SystemExit(_missing_file_message(config, path, timeout))
            await asyncio.sleep(0.1)


def _listen(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def run(config: WaypointConfig) -> None:
    cancel_on_signals()
    main_task = asyncio.current_task()
    assert main_task is not None
    await _wait_for_files(config)
    root = Path(config.root_cert).read_bytes()
    store = WorkloadStore()
    xds = XdsClient(ClientConfig(address=config.xds_address, node_id=router_node_id(config),
                                 cluster_id=config.cluster_id, token_file=Path(config.token_path), root_cert=root,
                                 server_name=config.server_name), store)
    ca = CaClient(CaClientConfig(address=config.ca_address, root_pem=root.decode(), server_name=config.server_name,
                                 cluster_id=config.cluster_id, impersonate=config.impersonate),
                  token_from_file(config.token_path))
    certs = CertificateManager(ca)
    identity = SpiffeId(config.trust_domain, config.namespace, config.service_account or config.name)
    certs.prefetch(identity)

    async def certificate() -> WorkloadCertificate:
        return await certs.fetch(identity)

    kube = KubeClient(KubeConfig.load(config.kubeconfig))  # the file given, else $KUBECONFIG, else in-cluster
    app = Waypoint(config, store, certificate, kube)
    app.certificate_status = lambda: [dataclasses.asdict(status) for status in certs.snapshot()]
    sources = KubeSources(kube, lambda: app.set_objects(sources.objects()))
    readiness = Readiness(["certificate", "xds", "config"])
    servers = [AdminServer(app, main_task.cancel, config.admin_address, readiness=readiness,
                           metrics=app.proxy.telemetry.render),
               MetricsServer(app.proxy.telemetry.render, config.metrics_address),
               ReadinessServer(readiness, config.readiness_address)]
    started = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        await app.proxy.start()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(xds.run(), name="xds")
            tg.create_task(sources.run(), name="sources")
            tg.create_task(_mark(readiness, "certificate", certificate), name="ready-certificate")
            tg.create_task(_mark(readiness, "xds", xds.ready.wait), name="ready-xds")
            tg.create_task(_mark(readiness, "config", app.config_seen.wait), name="ready-config")
            tg.create_task(app.server.serve(_listen(config.hbone_address)), name="hbone")
            log.info("waypoint %s/%s serving HBONE on %s:%d as %s", config.namespace, config.name,
                     *config.hbone_address, identity)
            # Start-up objects (modules, compiled config) never die: keep them out of the collector's full
            # passes, which otherwise pause the data path for tens of milliseconds every few thousand requests.
            gc.freeze()
    except asyncio.CancelledError:
        pass
    finally:
        log.info("draining")
        sources.close()
        await app.close()
        await certs.close()
        for server in started:
            await server.close()
        await kube.close()


async def _mark(readiness: Readiness, name: str, condition: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await condition()
            break
        except Exception as exc:  # the certificate manager keeps retrying; say why we are not ready yet
            log.warning("not ready (%s): %s", name, exc)
            await asyncio.sleep(1.0)
    readiness.mark_ready(name)


def main(argv: list[str] | None = None) -> None:
    config, level = parse_args(argv)
    setup_logging(config.log_format, level)
    with contextlib.suppress(ImportError):  # as ztunnel: uvloop cuts CPU per request and the added latency
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(run(config))
        except (OSError, KubeConfigError) as exc:
            sys.exit(f"waypoint: {exc}")


if __name__ == "__main__":
    main()
