"""The Bookinfo catalogue and the product-id parsing every Bookinfo service shares."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class Product:
    id: int
    title: str
    description_html: str

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "title": self.title, "descriptionHtml": self.description_html}


PRODUCTS = (
    Product(
        id=0,
        title="The Comedy of Errors",
        description_html=(
            '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
            "Two pairs of twins, separated as infants, land in the same city on the same day. "
            "Merchants, wives and officers mistake each for the other, and a day of wrong deliveries, "
            "locked doors and false arrests follows until the family is reunited."
        ),
    ),
)


def product_id(request: web.Request) -> int:
    """The `{id}` path parameter as an int, or a 400 JSON answer."""
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "please provide a numeric product id"}', content_type="application/json"
        ) from None
