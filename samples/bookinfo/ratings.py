"""Bookinfo ratings: `GET /ratings/<id>` answers the stars each reviewer gave the book."""

from __future__ import annotations

import os

from aiohttp import web

from samples.bookinfo.products import product_id
from samples.common import env_port, new_app, run, serve_app

RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


async def get_ratings(request: web.Request) -> web.Response:
    return web.json_response({"id": product_id(request), "ratings": RATINGS})


def build_app() -> web.Application:
    app = new_app()
    app.router.add_get("/ratings/{id}", get_ratings)
    return app


async def serve() -> None:
    await serve_app(build_app(), env_port(os.environ, "PORT", 9080))


def main() -> None:
    run("ratings", serve)


if __name__ == "__main__":
    main()
