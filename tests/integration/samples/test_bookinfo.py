"""Bookinfo end to end on loopback: productpage -> details, reviews (v1/v2/v3) -> ratings."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from samples.bookinfo.reviews import RATINGS_TIMEOUT_S
from samples.common import PROPAGATED_HEADERS

from .programs import Program, Programs, free_port

VERSIONS = ("v1", "v2", "v3")


def upstream_env(service: str, port: int) -> dict[str, str]:
    prefix = service.upper()
    return {f"{prefix}_HOSTNAME": "127.0.0.1", f"{prefix}_SERVICE_PORT": str(port)}


def start_reviews(programs: Programs, name: str, version: str, ratings_port: int) -> Program:
    env = {"VERSION": version, "HOSTNAME": name, **upstream_env("ratings", ratings_port)}
    return programs.start("samples.bookinfo.reviews", name, env=env)


def start_productpage(
    programs: Programs, name: str, *, details_port: int, reviews_port: int, ratings_port: int
) -> Program:
    env = {
        **upstream_env("details", details_port),
        **upstream_env("reviews", reviews_port),
        **upstream_env("ratings", ratings_port),
    }
    return programs.start("samples.bookinfo.productpage", name, env=env)


@dataclass
class Bookinfo:
    details: Program
    ratings: Program
    reviews: dict[str, Program]
    productpage: dict[str, Program]  # by the reviews version it calls
    reviews_without_ratings: Program
    productpage_without_details: Program
    productpage_without_reviews: Program


@pytest.fixture(scope="module")
def bookinfo(module_programs: Programs) -> Bookinfo:
    programs = module_programs
    dead = free_port()
    details = programs.start("samples.bookinfo.details", "details")
    ratings = programs.start("samples.bookinfo.ratings", "ratings")
    reviews = {v: start_reviews(programs, f"reviews-{v}", v, ratings.port) for v in VERSIONS}
    productpage = {
        v: start_productpage(
            programs,
            f"productpage-{v}",
            details_port=details.port,
            reviews_port=reviews[v].port,
            ratings_port=ratings.port,
        )
        for v in VERSIONS
    }
    stack = Bookinfo(
        details=details,
        ratings=ratings,
        reviews=reviews,
        productpage=productpage,
        reviews_without_ratings=start_reviews(programs, "reviews-no-ratings", "v2", dead),
        productpage_without_details=start_productpage(
            programs,
            "productpage-no-details",
            details_port=dead,
            reviews_port=reviews["v1"].port,
            ratings_port=ratings.port,
        ),
        productpage_without_reviews=start_productpage(
            programs,
            "productpage-no-reviews",
            details_port=details.port,
            reviews_port=dead,
            ratings_port=ratings.port,
        ),
    )
    programs.wait_ready(
        details,
        ratings,
        *reviews.values(),
        *productpage.values(),
        stack.reviews_without_ratings,
        stack.productpage_without_details,
        stack.productpage_without_reviews,
    )
    return stack


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_page(http: aiohttp.ClientSession, program: Program, headers: Mapping[str, str] | None = None) -> str:
    async with http.get(f"{program.url}/productpage", headers=headers) as response:
        assert response.status == 200
        return await response.text()


def section(page: str, section_id: str) -> str:
    match = re.search(rf'<div id="{section_id}">(.*?)</div>', page, re.DOTALL)
    assert match, f"no {section_id} section in:\n{page}"
    return match.group(1)


async def test_page_shows_details_and_reviews_without_stars_from_v1(
    bookinfo: Bookinfo, http: aiohttp.ClientSession
) -> None:
    page = await get_page(http, bookinfo.productpage["v1"])

    assert "<title>Simple Bookstore App</title>" in page
    details = section(page, "details")
    assert "William Shakespeare" in details
    assert "123-1234567890" in details
    reviews = section(page, "reviews")
    assert "Reviewer1" in reviews
    assert "Reviewer2" in reviews
    assert "reviews-v1" in reviews
    assert "★" not in reviews


@pytest.mark.parametrize(("version", "color"), [("v2", "black"), ("v3", "red")])
async def test_reviews_v2_and_v3_show_coloured_stars(
    bookinfo: Bookinfo, http: aiohttp.ClientSession, version: str, color: str
) -> None:
    reviews = section(await get_page(http, bookinfo.productpage[version]), "reviews")

    assert f'<span class="stars" style="color: {color}">★★★★★</span>' in reviews
    assert f'<span class="stars" style="color: {color}">★★★★☆</span>' in reviews


async def test_details_down_shows_details_error_in_a_200_page(bookinfo: Bookinfo, http: aiohttp.ClientSession) -> None:
    page = await get_page(http, bookinfo.productpage_without_details)

    assert "Error fetching product details" in section(page, "details")
    assert "Reviewer1" in section(page, "reviews")


async def test_reviews_down_shows_reviews_error_in_a_200_page(bookinfo: Bookinfo, http: aiohttp.ClientSession) -> None:
    page = await get_page(http, bookinfo.productpage_without_reviews)

    assert "Error fetching product reviews" in section(page, "reviews")
    assert "William Shakespeare" in section(page, "details")


async def test_ratings_down_leaves_reviews_with_a_ratings_error(
    bookinfo: Bookinfo, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{bookinfo.reviews_without_ratings.url}/reviews/0") as response:
        assert response.status == 200
        body = await response.json()

    assert [review["rating"] for review in body["reviews"]] == [
        {"error": "Ratings service is currently unavailable"}
    ] * 2


async def test_services_answer_json(bookinfo: Bookinfo, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{bookinfo.details.url}/details/7") as response:
        details = await response.json()
    async with http.get(f"{bookinfo.ratings.url}/ratings/7") as response:
        ratings = await response.json()
    async with http.get(f"{bookinfo.reviews['v3'].url}/reviews/7") as response:
        reviews = await response.json()
    async with http.get(f"{bookinfo.details.url}/details/seven") as response:
        bad_id_status = response.status

    assert details["id"] == 7
    assert set(details) >= {"author", "year", "type", "pages", "publisher", "language", "ISBN-10", "ISBN-13"}
    assert ratings == {"id": 7, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert reviews["podname"] == "reviews-v3"
    assert reviews["clustername"] == "null"
    assert reviews["reviews"][0]["rating"] == {"stars": 5, "color": "red"}
    assert bad_id_status == 400


async def test_product_api(bookinfo: Bookinfo, http: aiohttp.ClientSession) -> None:
    base = f"{bookinfo.productpage['v2'].url}/api/v1/products"
    answers = {}
    for path in ("", "/0", "/0/reviews", "/0/ratings"):
        async with http.get(base + path) as response:
            assert response.status == 200, path
            answers[path] = await response.json()
    async with http.get(f"{bookinfo.productpage_without_details.url}/api/v1/products/0") as response:
        failed_status = response.status

    assert answers[""][0]["title"] == "The Comedy of Errors"
    assert answers["/0"]["author"] == "William Shakespeare"
    assert answers["/0/reviews"]["reviews"][1]["rating"] == {"stars": 4, "color": "black"}
    assert answers["/0/ratings"]["ratings"]["Reviewer1"] == 5
    assert failed_status == 503


async def test_index_links_to_productpage(bookinfo: Bookinfo, http: aiohttp.ClientSession) -> None:
    async with http.get(bookinfo.productpage["v1"].url + "/") as response:
        assert 'href="/productpage"' in await response.text()


async def test_login_sets_session_and_logout_clears_it(bookinfo: Bookinfo, http: aiohttp.ClientSession) -> None:
    productpage = bookinfo.productpage["v1"]
    async with http.post(f"{productpage.url}/login", data={"username": "jason"}, allow_redirects=False) as login:
        assert login.status == 302
        assert login.headers["Location"] == "/productpage"
        assert login.cookies["session"].value == "jason"
    signed_in = await get_page(http, productpage, headers={"Cookie": "session=jason"})
    async with http.get(f"{productpage.url}/logout", allow_redirects=False) as logout:
        assert logout.status == 302
        assert logout.cookies["session"].value == ""

    assert "signed in as jason" in signed_in
    assert "signed in as" not in await get_page(http, productpage)


class RatingsRecorder:
    """A stand-in ratings service that keeps the headers of every request it gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    async def ratings(self, request: web.Request) -> web.Response:
        self.requests.append({name.lower(): value for name, value in request.headers.items()})
        return web.json_response({"id": 0, "ratings": {"Reviewer1": 1, "Reviewer2": 2}})


@pytest.fixture
async def ratings_recorder() -> AsyncIterator[tuple[RatingsRecorder, int]]:
    recorder = RatingsRecorder()
    app = web.Application()
    app.router.add_get("/ratings/{id}", recorder.ratings)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield recorder, runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_headers_propagate_from_productpage_through_reviews_to_ratings(
    programs: Programs, ratings_recorder: tuple[RatingsRecorder, int], http: aiohttp.ClientSession
) -> None:
    recorder, ratings_port = ratings_recorder
    reviews = start_reviews(programs, "reviews-recorded", "v2", ratings_port)
    productpage = start_productpage(
        programs,
        "productpage-recorded",
        details_port=free_port(),
        reviews_port=reviews.port,
        ratings_port=ratings_port,
    )
    await asyncio.to_thread(programs.wait_ready, reviews, productpage)
    sent = {name: f"value-of-{name}" for name in PROPAGATED_HEADERS if name not in ("end-user", "cookie")}

    page = await get_page(http, productpage, headers={**sent, "Cookie": "session=jason"})

    assert '<span class="stars" style="color: black">★☆☆☆☆</span>' in page
    [received] = recorder.requests
    assert received["end-user"] == "jason"
    assert received["cookie"] == "session=jason"
    for name, value in sent.items():
        assert received[name] == value, name


async def test_logs_one_line_per_request_with_the_request_id(bookinfo: Bookinfo, http: aiohttp.ClientSession) -> None:
    await get_page(http, bookinfo.productpage["v2"], headers={"x-request-id": "trace-me-42"})

    for program in (bookinfo.productpage["v2"], bookinfo.details, bookinfo.reviews["v2"], bookinfo.ratings):
        lines = [line for line in program.log().splitlines() if "trace-me-42" in line]
        assert len(lines) == 1, program.log()
        assert " 200 " in lines[0]


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose connections complete (the kernel's backlog) but are never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_slow_ratings_times_out_into_a_ratings_error(
    programs: Programs, black_hole: int, http: aiohttp.ClientSession
) -> None:
    reviews = start_reviews(programs, "reviews-slow-ratings", "v3", black_hole)
    await asyncio.to_thread(programs.wait_ready, reviews)

    started = time.monotonic()
    async with http.get(f"{reviews.url}/reviews/0") as response:
        body = await response.json()
    waited = time.monotonic() - started

    assert RATINGS_TIMEOUT_S <= waited < RATINGS_TIMEOUT_S + 1
    assert body["reviews"][0]["rating"] == {"error": "Ratings service is currently unavailable"}
