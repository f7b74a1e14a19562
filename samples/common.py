"""Plumbing shared by the sample servers: env parsing, request logging, header propagation,
upstream JSON calls and a process runner that exits cleanly on SIGTERM.

It must stay small and dependency-free beyond aiohttp: the samples are demo workloads, and whatever
lives here runs inside every sample pod.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, NoReturn

import aiohttp
import uvloop
from aiohttp import web

LISTEN_HOST = "0.0.0.0"
# Kubernetes gives a pod 30 s between SIGTERM and SIGKILL; in-flight requests get a short drain so a
# rollout in the local cluster does not wait on a slow /delay call.
SHUTDOWN_DRAIN_S = 5.0

# The headers Istio's Bookinfo forwards so that traces, user routing and sessions follow a request
# across services; the mesh cannot do this for the application.
PROPAGATED_HEADERS = (
    "end-user",
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "baggage",
    "user-agent",
    "cookie",
)

log = logging.getLogger("sample")

CLIENT = web.AppKey("client", aiohttp.ClientSession)


class ConfigError(Exception):
    """A bad environment variable; the program exits 2 with this message."""


class UpstreamError(Exception):
    """An upstream call that gave no usable JSON. `reason` is short and stable, for logs and pages."""

    def __init__(self, upstream: str, reason: str, status: int = 503) -> None:
        super().__init__(f"{upstream}: {reason}")
        self.upstream = upstream
        self.reason = reason
        self.status = status


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def env_port(env: Mapping[str, str], name: str, default: int) -> int:
    port = env_int(env, name, default)
    if not 0 < port < 65536:
        raise ConfigError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def propagated_headers(request: web.Request) -> dict[str, str]:
    """The tracing, user and session headers of `request` to copy onto every call it makes."""
    headers = {}
    for name in PROPAGATED_HEADERS:
        values = request.headers.getall(name, ())
        if values:
            headers[name] = ("; " if name == "cookie" else ", ").join(values)
    return headers


async def fetch_json(
    session: aiohttp.ClientSession, upstream: str, url: str, headers: Mapping[str, str], timeout: float
) -> Any:
    """GET `url` and decode its JSON body; every failure becomes an UpstreamError naming `upstream`."""
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise UpstreamError(upstream, f"{url} answered {resp.status}", resp.status)
            return await resp.json(content_type=None)
    except TimeoutError:
        raise UpstreamError(upstream, f"{url} timed out after {timeout:g}s", 504) from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(upstream, f"{url} failed: {exc}") from None
    except ValueError:
        raise UpstreamError(upstream, f"{url} answered with invalid JSON", 502) from None


@web.middleware
async def log_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One stdout line per request, with the request id so a call can be followed across services."""
    started = time.perf_counter()
    status: int | str = "-"
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        request_id = request.headers.get("x-request-id", "-")
        log.info("%s %s %s %.1fms %s", request.method, request.path_qs, status, elapsed_ms, request_id)


async def health(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _client_session(app: web.Application) -> Any:
    # No cookie jar: one session serves every user, so cookies travel only by explicit propagation.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        app[CLIENT] = session
        yield


def new_app(*, with_client: bool = False) -> web.Application:
    """An application with request logging, `GET /health` and, if asked, a shared client session."""
    app = web.Application(middlewares=[log_requests])
    app.router.add_get("/health", health)
    if with_client:
        app.cleanup_ctx.append(_client_session)
    return app


async def until_terminated() -> None:
    """Return on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def serve_app(app: web.Application, port: int) -> None:
    """Serve `app` on LISTEN_HOST:`port` until SIGTERM, then drain and stop."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_DRAIN_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, LISTEN_HOST, port).start()
        log.info("listening on %s:%d", LISTEN_HOST, port)
        await until_terminated()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def run(name: str, serve: Callable[[], Coroutine[Any, Any, None]]) -> NoReturn:
    """Entry point of a sample: log to stdout as `name`, run `serve`, map expected failures to exit codes."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format=f"%(asctime)s {name} %(message)s", force=True)
    try:
        uvloop.run(serve())
    except ConfigError as exc:
        failure, code = f"bad configuration: {exc}", 2
    except OSError as exc:
        # At start-up the only OSError is a failed bind, e.g. the port is taken.
        failure, code = f"cannot start: {exc}", 1
    else:
        sys.exit(0)
    # Expected failures: one line saying what to fix, no traceback.
    log.error("%s", failure)
    sys.exit(code)
