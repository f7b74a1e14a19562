"""`ztunnel`: the ambient node L4 proxy (Istio's ztunnel, in-pod mode).

Start-up: wait for the mesh root and token files, then run the xDS client, the ZDS client (which adds and
removes pod proxies), and the admin (15000), metrics (15020) and readiness (15021) servers. Ready once
both xDS types arrived and the node agent's first snapshot is applied. SIGTERM (or `POST /quitquitquit`)
drains: listeners close, open connections get a deadline, then close.

`--workers N` (N > 1) runs N data-plane processes behind this one (see `ztunnel/workers.py`): this
process keeps the ZDS connection and the three ports, and relays every pod to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ambient.aio import cancel_on_signals
from ambient.telemetry.admin_http import Readiness
from ambient.telemetry.logs import setup_logging
from ztunnel.admin import AdminServer, MetricsServer, ReadinessServer
from ztunnel.config import ZtunnelConfig, parse_args
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.zds_client import ZdsClient

if TYPE_CHECKING:
    from ztunnel.app import Ztunnel

log = logging.getLogger("ztunnel")
FILES_WAIT = 60.0  # seconds to wait for the mesh root and the token to appear (mounted/written at start)


class Server(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


async def _wait_for_files(config: ZtunnelConfig) -> None:
    deadline = time.monotonic() + FILES_WAIT
    for path in (config.root_cert, config.token_path):
        while not Path(path).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"ztunnel: {path} does not exist after {FILES_WAIT:.0f}s; "
                                 "is the control plane running (it publishes the mesh root)?")
            await asyncio.sleep(0.1)


def quit_on_request() -> Callable[[], None]:
    """What `POST /quitquitquit` calls: cancel the running main task, as SIGTERM does."""
    task = asyncio.current_task()
    assert task is not None

    def on_quit() -> None:
        task.cancel()

    return on_quit


async def mark_ready(readiness: Readiness, checks: Mapping[str, Awaitable[object]],
                     announce: Callable[[], None]) -> None:
    """Mark each readiness check as its condition comes true (in any order), then `announce()`."""

    async def check(name: str, condition: Awaitable[object]) -> None:
        await condition
        readiness.mark_ready(name)

    await asyncio.gather(*(check(name, condition) for name, condition in checks.items()))
    announce()


async def run(config: ZtunnelConfig, log_level: str = "info") -> None:
    if config.workers < 1:
        raise ConfigError(f"--workers {config.workers}: use 1 (one process) or more (processes sharing the load)")
    cancel_on_signals()
    await _wait_for_files(config)
    if config.workers == 1:
        await run_single(config)
    else:
        await run_pool(config, log_level)


async def run_single(config: ZtunnelConfig) -> None:
    from ztunnel.app import Ztunnel

    app = Ztunnel(config)
    readiness = Readiness(["xds", "zds"])
    servers = [AdminServer(app, quit_on_request(), config.admin_address, readiness=readiness),
               MetricsServer(app.metrics.render, config.metrics_address),
               ReadinessServer(readiness, config.readiness_address)]
    await serve_data_plane(app, servers, readiness, ZdsClient(config.zds_socket, app).run)


async def serve_data_plane(app: Ztunnel, servers: Sequence[Server], readiness: Readiness,
                           zds: Callable[[], Awaitable[None]]) -> None:
    """Run one data plane (a single ztunnel, or one worker) until cancelled or until `zds()` returns (a
    worker's main process went away), then drain its pods and close its servers."""

    def announce() -> None:
        log.info("ready: %d pod(s) on node %s", len(app.pods), app.config_.node_name)

    started: list[Server] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        async with asyncio.TaskGroup() as tg:
            xds = tg.create_task(app.xds.run(), name="xds")
            ready = tg.create_task(mark_ready(readiness, {"xds": app.xds.ready.wait(), "zds": app.snapshot_seen.wait()},
                                              announce), name="readiness")
            await zds()
            xds.cancel()
            ready.cancel()
    except asyncio.CancelledError:
        pass
    finally:
        log.info("draining %d pod(s)", len(app.pods))
        await app.drain()
        for server in started:
            await server.close()


async def run_pool(config: ZtunnelConfig, log_level: str) -> None:
    """The main process of `--workers N`: ZDS and the three ports here, the data path in the workers."""
    from ztunnel.workers import PoolAdminServer, PoolMetricsServer, WorkerPool

    pool = WorkerPool(config, log_level=log_level)
    readiness = Readiness(["xds", "zds"])
    servers: list[Server] = [PoolAdminServer(pool, quit_on_request(), config.admin_address, readiness=readiness),
                             PoolMetricsServer(pool, config.metrics_address),
                             ReadinessServer(readiness, config.readiness_address)]

    def announce() -> None:
        log.info("ready: %d pod(s) on node %s, %d workers", len(pool.pods), config.node_name, pool.count)

    started: list[Server] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        await pool.start()  # before the agent connects: every add must reach every worker
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ZdsClient(config.zds_socket, pool).run(), name="zds")
            tg.create_task(mark_ready(readiness, {"xds": pool.wait_ready(), "zds": pool.snapshot_seen.wait()},
                                      announce), name="readiness")
    except asyncio.CancelledError:
        pass
    finally:
        log.info("draining %d pod(s) in %d worker(s)", len(pool.pods), pool.count)
        await pool.close()
        for server in started:
            await server.close()


def main() -> None:
    config, level = parse_args()
    setup_logging(config.log_format, level)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(config, level))
    except ZtunnelError as exc:  # bad configuration, or a worker that cannot start
        sys.exit(f"ztunnel: {exc}")


if __name__ == "__main__":
    main()
