"""Bookinfo details: `GET /details/<id>` answers the book's publication facts.

Every id gets the same book, as in Istio's sample; the service exists to be called, not to be a catalogue.
"""

from __future__ import annotations

import os

from aiohttp import web

from samples.bookinfo.products import product_id
from samples.common import env_port, new_app, run, serve_app

BOOK = {
    "author": "William Shakespeare",
    "year": 1595,
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
    "ISBN-10": "1234567890",
    "ISBN-13": "123-1234567890",
}


async def get_details(request: web.Request) -> web.Response:
    return web.json_response({"id": product_id(request), **BOOK})


def build_app() -> web.Application:
    app = new_app()
    app.router.add_get("/details/{id}", get_details)
    return app


async def serve() -> None:
    await serve_app(build_app(), env_port(os.environ, "PORT", 9080))


def main() -> None:
    run("details", serve)


if __name__ == "__main__":
    main()
