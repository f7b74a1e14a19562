"""httpbin-like echo server. Any method on any path answers what it received as JSON; a few httpbin
paths (`/status/<code>`, `/delay/<s>`, `/bytes/<n>`, `/stream/<n>`, `/headers`, `/ip`) shape the answer.
Every answer carries `x-served-by: <pod name>` so callers can see which replica answered.

For resilience tutorials: `/flaky/<fail>/<of>` fails (503) the first `fail` of every `of` requests it
receives and answers the rest, deterministically per pod; `$FAIL_STATUS` makes every path except `/health`
answer that status (an unhealthy replica for outlier detection).

Sizes are capped and delays cut to 10 s, as in httpbin, so a typo cannot tie up the pod.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from samples.common import env_port, new_app, run, serve_app

MAX_DELAY_S = 10.0
MAX_BYTES = 100 * 1024
MAX_STREAM_LINES = 100
# Bodies must be empty for these (RFC 9110), so /status/<code> sends none.
BODYLESS_STATUSES = frozenset({204, 304})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Number = TypeVar("Number", int, float)


FLAKY_STATUS = 503
SERVED_BY = "x-served-by"


def bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def path_number(request: web.Request, name: str, kind: type[Number], low: Number, high: Number) -> Number:
    """The `{name}` path parameter as a `kind` within [low, high], or a 400."""
    raw = request.match_info[name]
    try:
        value = kind(raw)
    except ValueError:
        raise bad_request(f"{name} must be a number, not {raw!r}") from None
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}")
    return value


def headers_of(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def args_of(request: web.Request) -> dict[str, str | list[str]]:
    args: dict[str, str | list[str]] = {}
    for name in request.query:
        values = request.query.getall(name)
        args[name] = values[0] if len(values) == 1 else values
    return args


async def echo_body(request: web.Request) -> dict[str, object]:
    body = await request.read()
    return {
        "method": request.method,
        "path": request.path,
        "args": args_of(request),
        "headers": headers_of(request),
        "origin": request.remote,
        "url": str(request.url),
        "body": body.decode("utf-8", errors="replace"),
    }


async def echo(request: web.Request) -> web.Response:
    return web.json_response(await echo_body(request))


async def headers(request: web.Request) -> web.Response:
    return web.json_response({"headers": headers_of(request)})


async def ip(request: web.Request) -> web.Response:
    return web.json_response({"origin": request.remote})


async def status(request: web.Request) -> web.Response:
    code = path_number(request, "code", int, 200, 599)
    if code in BODYLESS_STATUSES:
        return web.Response(status=code)
    return web.Response(status=code, text=f"{code}\n")


async def delay(request: web.Request) -> web.Response:
    await asyncio.sleep(min(path_number(request, "seconds", float, 0.0, math.inf), MAX_DELAY_S))
    return await echo(request)


async def random_bytes(request: web.Request) -> web.Response:
    count = path_number(request, "n", int, 0, MAX_BYTES)
    return web.Response(body=os.urandom(count), content_type="application/octet-stream")


async def stream(request: web.Request) -> web.StreamResponse:
    lines = path_number(request, "n", int, 0, MAX_STREAM_LINES)
    body = await echo_body(request)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    for line in range(lines):
        await response.write(json.dumps({**body, "id": line}).encode() + b"\n")
    await response.write_eof()
    return response


class Flaky:
    """`/flaky/<fail>/<of>`: of every `of` requests (counted per path, per pod), the first `fail` get a 503."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], int] = {}

    async def __call__(self, request: web.Request) -> web.Response:
        of = path_number(request, "of", int, 1, 1000)
        fail = path_number(request, "fail", int, 0, of)
        position = self.seen.get((fail, of), 0)
        self.seen[(fail, of)] = position + 1
        if position % of < fail:
            return web.Response(status=FLAKY_STATUS, text=f"flaky: failing {position % of + 1} of {fail}\n")
        return await echo(request)


def failing(status_code: int) -> Handler:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=status_code, text=f"{status_code} (FAIL_STATUS)\n")
    return fail


@web.middleware
async def served_by(request: web.Request, handler: Handler) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    response.headers[SERVED_BY] = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", "httpbin")
    return response


def build_app(fail_status: int | None = None) -> web.Application:
    app = new_app()
    app.middlewares.append(served_by)
    if fail_status is not None:
        app.router.add_route("*", "/{tail:.*}", failing(fail_status))
        return app
    app.router.add_route("*", "/flaky/{fail}/{of}", Flaky())
    app.router.add_get("/get", echo)
    app.router.add_get("/headers", headers)
    app.router.add_get("/ip", ip)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/delay/{seconds}", delay)
    app.router.add_get("/bytes/{n}", random_bytes)
    app.router.add_get("/stream/{n}", stream)
    # /anything and every other path echo.
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def fail_status(env: dict[str, str] | os._Environ[str]) -> int | None:
    raw = env.get("FAIL_STATUS", "")
    if not raw:
        return None
    if not raw.isdigit() or not 200 <= int(raw) <= 599:
        raise SystemExit(f"httpbin: FAIL_STATUS={raw!r} must be an HTTP status between 200 and 599")
    return int(raw)


async def serve() -> None:
    await serve_app(build_app(fail_status(os.environ)), env_port(os.environ, "PORT", 8080))


def main() -> None:
    run("httpbin", serve)


if __name__ == "__main__":
    main()
