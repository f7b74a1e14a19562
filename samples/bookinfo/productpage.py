"""Bookinfo productpage: the HTML front end and JSON API, calling details and reviews (and ratings for
the ratings API).

A failed upstream shows as an error section in a 200 page, never as a hung or failed page: each call has
a timeout, as in Istio's sample. Signing in only sets a `session` cookie; the user name then travels to
reviews as the `end-user` header, which is what Istio's user-based routing examples match on.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from samples.bookinfo import pages
from samples.bookinfo.products import PRODUCTS, product_id
from samples.common import (
    CLIENT,
    UpstreamError,
    env_port,
    fetch_json,
    log,
    new_app,
    propagated_headers,
    run,
    serve_app,
)

UPSTREAM_TIMEOUT_S = 3.0  # the original app's budget for details and reviews
SESSION_COOKIE = "session"
# User names end up in a cookie and a header: keep them to characters both carry unquoted.
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


@dataclass(frozen=True)
class ProductPageConfig:
    port: int
    details_url: str
    reviews_url: str
    ratings_url: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProductPageConfig:
        def upstream(service: str) -> str:
            host = env.get(f"{service.upper()}_HOSTNAME") or service
            return f"http://{host}:{env_port(env, f'{service.upper()}_SERVICE_PORT', 9080)}"

        return cls(
            port=env_port(env, "PORT", 9080),
            details_url=upstream("details"),
            reviews_url=upstream("reviews"),
            ratings_url=upstream("ratings"),
        )


CONFIG = web.AppKey("config", ProductPageConfig)


def signed_in_user(request: web.Request) -> str | None:
    user = request.cookies.get(SESSION_COOKIE, "")
    return user if USER_NAME.fullmatch(user) else None


def upstream_headers(request: web.Request) -> dict[str, str]:
    headers = propagated_headers(request)
    if user := signed_in_user(request):
        headers["end-user"] = user
    return headers


async def call(request: web.Request, upstream: str, path: str) -> object:
    config = request.app[CONFIG]
    base = {"details": config.details_url, "reviews": config.reviews_url, "ratings": config.ratings_url}
    return await fetch_json(
        request.app[CLIENT], upstream, base[upstream] + path, upstream_headers(request), UPSTREAM_TIMEOUT_S
    )


async def call_or_none(request: web.Request, upstream: str, path: str) -> Mapping[str, object] | None:
    try:
        answer = await call(request, upstream, path)
    except UpstreamError as exc:
        log.warning("%s unavailable: %s", upstream, exc.reason)
        return None
    return answer if isinstance(answer, dict) else None


async def index(_: web.Request) -> web.Response:
    return web.Response(text=pages.index_page(), content_type="text/html")


async def product_page(request: web.Request) -> web.Response:
    product = PRODUCTS[0]
    details, reviews = await asyncio.gather(
        call_or_none(request, "details", f"/details/{product.id}"),
        call_or_none(request, "reviews", f"/reviews/{product.id}"),
    )
    page = pages.product_page(product, details, reviews, signed_in_user(request))
    return web.Response(text=page, content_type="text/html")


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    user = form.get("username")
    if not isinstance(user, str) or not USER_NAME.fullmatch(user):
        return web.Response(status=400, text="user name: 1-64 letters, digits or ._@-\n")
    response = web.Response(status=302, headers={"Location": "/productpage"})
    response.set_cookie(SESSION_COOKIE, user, httponly=True, samesite="Lax")
    return response


async def logout(_: web.Request) -> web.Response:
    response = web.Response(status=302, headers={"Location": "/productpage"})
    response.del_cookie(SESSION_COOKIE)
    return response


async def api_products(_: web.Request) -> web.Response:
    return web.json_response([product.to_json() for product in PRODUCTS])


async def api_upstream(request: web.Request, upstream: str, path: str) -> web.Response:
    try:
        return web.json_response(await call(request, upstream, path))
    except UpstreamError as exc:
        log.warning("%s unavailable: %s", upstream, exc.reason)
        message = f"Sorry, product {upstream} are currently unavailable for this book."
        return web.json_response({"error": message}, status=exc.status)


async def api_details(request: web.Request) -> web.Response:
    return await api_upstream(request, "details", f"/details/{product_id(request)}")


async def api_reviews(request: web.Request) -> web.Response:
    return await api_upstream(request, "reviews", f"/reviews/{product_id(request)}")


async def api_ratings(request: web.Request) -> web.Response:
    return await api_upstream(request, "ratings", f"/ratings/{product_id(request)}")


def build_app(config: ProductPageConfig) -> web.Application:
    app = new_app(with_client=True)
    app[CONFIG] = config
    app.router.add_get("/", index)
    app.router.add_get("/productpage", product_page)
    app.router.add_post("/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_get("/api/v1/products", api_products)
    app.router.add_get("/api/v1/products/{id}", api_details)
    app.router.add_get("/api/v1/products/{id}/reviews", api_reviews)
    app.router.add_get("/api/v1/products/{id}/ratings", api_ratings)
    return app


async def serve() -> None:
    config = ProductPageConfig.from_env(os.environ)
    await serve_app(build_app(config), config.port)


def main() -> None:
    run("productpage", serve)


if __name__ == "__main__":
    main()
