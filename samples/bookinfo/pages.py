"""HTML for productpage, rendered from the JSON its upstreams returned. Pure functions, no I/O.

Everything that came from an upstream or a user is escaped: a sample must not teach XSS.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from samples.bookinfo.products import Product

TITLE = "Simple Bookstore App"
MAX_STARS = 5
DETAILS_ERROR = "Error fetching product details"
REVIEWS_ERROR = "Error fetching product reviews"

# (label, key) in the order the details section lists them.
DETAIL_FIELDS = (
    ("Type", "type"),
    ("Pages", "pages"),
    ("Publisher", "publisher"),
    ("Language", "language"),
    ("ISBN-10", "ISBN-10"),
    ("ISBN-13", "ISBN-13"),
)

STYLE = """
body { font-family: sans-serif; margin: 0; }
nav { background: #222; color: #eee; padding: 0.6em 1em; display: flex; justify-content: space-between; }
nav a, nav button { color: #eee; }
main { padding: 1em 2em; }
.columns { display: flex; gap: 3em; }
.error { color: #a00; }
blockquote { border-left: 3px solid #ccc; margin: 1em 0; padding-left: 1em; }
.stars { font-size: 1.3em; }
"""


def _document(body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{TITLE}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def index_page() -> str:
    return _document(
        f"<main>\n<h2>Hello! This is {TITLE}</h2>\n"
        "<p>Bookinfo: a product page backed by the details, reviews and ratings services.</p>\n"
        '<p><a href="/productpage">Normal user</a></p>\n'
        '<p><a href="/api/v1/products">Products API</a></p>\n</main>'
    )


def _nav(user: str | None) -> str:
    if user:
        account = f'signed in as {escape(user)} <a href="/logout">sign out</a>'
    else:
        account = (
            '<form method="post" action="/login">'
            '<input name="username" placeholder="user name" required> '
            '<button type="submit">Sign in</button></form>'
        )
    return f'<nav><span>BookInfo Sample</span><span id="account">{account}</span></nav>'


def details_section(details: Mapping[str, object] | None) -> str:
    if details is None:
        return (
            f'<div id="details">\n<h4 class="error">{DETAILS_ERROR}</h4>\n'
            "<p>Sorry, product details are currently unavailable for this book.</p>\n</div>"
        )
    rows = "".join(
        f"<dt>{label}:</dt><dd>{escape(str(details[key]))}</dd>\n" for label, key in DETAIL_FIELDS if key in details
    )
    byline = f"{escape(str(details.get('author', '')))}, {escape(str(details.get('year', '')))}"
    return f'<div id="details">\n<h4>Book Details</h4>\n<p>{byline}</p>\n<dl>\n{rows}</dl>\n</div>'


def stars(rating: object) -> str:
    """Filled and empty stars in the rating's colour, or the rating's error; nothing if there is no rating."""
    if not isinstance(rating, Mapping):
        return ""
    if "error" in rating:
        return f'<p class="rating error">{escape(str(rating["error"]))}</p>'
    count = rating.get("stars")
    if not isinstance(count, int):
        return ""
    count = max(0, min(MAX_STARS, count))
    color = escape(str(rating.get("color", "black")))
    return f'<span class="stars" style="color: {color}">{"★" * count}{"☆" * (MAX_STARS - count)}</span>'


def reviews_section(reviews: Mapping[str, object] | None) -> str:
    if reviews is None:
        return (
            f'<div id="reviews">\n<h4 class="error">{REVIEWS_ERROR}</h4>\n'
            "<p>Sorry, product reviews are currently unavailable for this book.</p>\n</div>"
        )
    items = reviews.get("reviews")
    quotes = "".join(
        f'<blockquote class="review">\n<p>{escape(str(review.get("text", "")))}</p>\n'
        f"<small>{escape(str(review.get('reviewer', '')))}</small>\n{stars(review.get('rating'))}\n"
        "</blockquote>\n"
        for review in (items if isinstance(items, list) else [])
        if isinstance(review, Mapping)
    )
    served_by = escape(str(reviews.get("podname", "")))
    return (
        f'<div id="reviews">\n<h4>Book Reviews</h4>\n{quotes}'
        f'<p class="served-by">Reviews served by: <span id="reviews-pod">{served_by}</span></p>\n</div>'
    )


def product_page(
    product: Product,
    details: Mapping[str, object] | None,
    reviews: Mapping[str, object] | None,
    user: str | None,
) -> str:
    """The product page; `details` or `reviews` is None when that upstream failed."""
    return _document(
        f"{_nav(user)}\n<main>\n<h3>{escape(product.title)}</h3>\n<p>{product.description_html}</p>\n"
        f'<div class="columns">\n{details_section(details)}\n{reviews_section(reviews)}\n</div>\n</main>'
    )
