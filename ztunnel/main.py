"""`ztunnel`: the ambient node L4 proxy (Istio's ztunnel, in-pod mode).

Start-up: wait for the mesh root and token files, then run the xDS client, the ZDS client (which adds and
removes pod proxies), and the admin (15000), metrics (15020) and readiness (15021) servers. Ready once
both xDS types arrived and the node agent's first snapshot is applied. SIGTERM drains: listeners close,
open connections get a deadline, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path

from ambient.aio import cancel_on_signals
from ambient.telemetry.logs import setup_logging
from ztunnel.admin import AdminServer, MetricsServer, Readiness, ReadinessServer
from ztunnel.config import ZtunnelConfig, parse_args
from ztunnel.errors import ConfigError
from ztunnel.zds_client import ZdsClient

log = logging.getLogger("ztunnel")
FILES_WAIT = 60.0  # seconds to wait for the mesh root and the token to appear (mounted/written at start)


async def _wait_for_files(config: ZtunnelConfig) -> None:
    deadline = time.monotonic() + FILES_WAIT
    for path in (config.root_cert, config.token_path):
        while not Path(path).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"ztunnel: {path} does not exist after {FILES_WAIT:.0f}s; "
                                 "is the control plane running (it publishes the mesh root)?")
            await asyncio.sleep(0.1)


async def run(config: ZtunnelConfig) -> None:
    cancel_on_signals()
    await _wait_for_files(config)
    from ztunnel.app import Ztunnel

    app = Ztunnel(config)
    readiness = Readiness(["xds", "zds"])
    stop = asyncio.Event()
    servers = [AdminServer(app, stop.set, config.admin_address, readiness=readiness),
               MetricsServer(app.metrics.render, config.metrics_address),
               ReadinessServer(readiness, config.readiness_address)]
    for server in servers:
        await server.start()
    zds = ZdsClient(config.zds_socket, app)

    async def mark_ready() -> None:
        await app.xds.ready.wait()
        readiness.mark_ready("xds")
        await app.snapshot_seen.wait()
        readiness.mark_ready("zds")
        log.info("ready: %d pod(s) on node %s", len(app.pods), config.node_name)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(app.xds.run(), name="xds")
            tg.create_task(zds.run(), name="zds")
            tg.create_task(mark_ready(), name="readiness")
            tg.create_task(_stop_when(stop), name="quitquitquit")
    except asyncio.CancelledError:
        pass
    finally:
        log.info("draining %d pod(s)", len(app.pods))
        await app.drain()
        for server in servers:
            await server.close()


async def _stop_when(stop: asyncio.Event) -> None:
    await stop.wait()
    raise asyncio.CancelledError


def main() -> None:
    config, level = parse_args()
    setup_logging(config.log_format, level)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(config))
    except ConfigError as exc:
        sys.exit(f"ztunnel: {exc}")


if __name__ == "__main__":
    main()
