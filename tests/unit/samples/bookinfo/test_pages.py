from __future__ import annotations

from samples.bookinfo import pages
from samples.bookinfo.products import PRODUCTS

REVIEWS = {
    "podname": "reviews-v3-abc",
    "reviews": [
        {"reviewer": "Reviewer1", "text": "Good", "rating": {"stars": 5, "color": "red"}},
        {"reviewer": "Reviewer2", "text": "Fine", "rating": {"error": "Ratings service is currently unavailable"}},
    ],
}


def test_stars_show_filled_and_empty_in_colour() -> None:
    assert pages.stars({"stars": 3, "color": "black"}) == ('<span class="stars" style="color: black">★★★☆☆</span>')
    assert pages.stars({"stars": 99, "color": "red"}).count("★") == 5
    assert pages.stars(None) == ""


def test_page_with_everything() -> None:
    page = pages.product_page(PRODUCTS[0], {"author": "W. S.", "pages": 200}, REVIEWS, "jason")

    assert "<title>Simple Bookstore App</title>" in page
    assert "signed in as jason" in page
    assert "<dd>200</dd>" in page
    assert '<span class="stars" style="color: red">★★★★★</span>' in page
    assert "Ratings service is currently unavailable" in page
    assert "reviews-v3-abc" in page


def test_failed_upstreams_show_their_errors() -> None:
    page = pages.product_page(PRODUCTS[0], None, None, None)

    assert pages.DETAILS_ERROR in page
    assert pages.REVIEWS_ERROR in page
    assert 'action="/login"' in page


def test_upstream_text_is_escaped() -> None:
    hostile = {"reviews": [{"reviewer": "<script>x</script>", "text": "a&b", "rating": {"stars": 1, "color": '"><b'}}]}

    page = pages.reviews_section(hostile)

    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "a&amp;b" in page
    assert '"><b' not in page
