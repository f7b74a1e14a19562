"""A stand-in for waypoint pods until the waypoint exists (issue 6): it answers readiness on 15021 as the
waypoint will (`GET /healthz/ready` → `200 ready`), so the waypoint controller's flow (Deployment, Ready
pod, Gateway `status.addresses`, service binding) runs for real on the local cluster. It moves no traffic.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from ambient.aio import cancel_on_signals

READINESS_PORT = 15021  # PROTOCOLS §1


async def ready(_: web.Request) -> web.Response:
    return web.Response(text="ready\n")


async def serve() -> None:
    cancel_on_signals()
    app = web.Application()
    app.router.add_get("/healthz/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", READINESS_PORT).start()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass
    finally:
        await runner.cleanup()


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
