"""Bookinfo reviews: `GET /reviews/<id>` answers two reviews of the book.

VERSION picks the flavour, as in Istio's sample: v1 shows no stars, v2 black stars and v3 red stars, both
read from the ratings service. When ratings cannot answer, the reviews still come back, each carrying
Istio's "Ratings service is currently unavailable" error in place of its stars.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from samples.bookinfo.products import product_id
from samples.common import (
    CLIENT,
    ConfigError,
    UpstreamError,
    env_port,
    fetch_json,
    log,
    new_app,
    propagated_headers,
    run,
    serve_app,
)

# Star colour per version; v1 does not call ratings at all.
STAR_COLORS: Mapping[str, str | None] = {"v1": None, "v2": "black", "v3": "red"}
# Under productpage's 3 s budget for reviews, so a slow ratings shows as missing stars, not missing reviews.
RATINGS_TIMEOUT_S = 2.0
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"

REVIEWS = (
    ("Reviewer1", "A fast, farcical day of twins and mistaken identities; the slapstick still lands."),
    ("Reviewer2", "Great fun on stage, though thinner in its themes than Shakespeare's later comedies."),
)


@dataclass(frozen=True)
class ReviewsConfig:
    port: int
    version: str
    ratings_url: str
    podname: str
    clustername: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReviewsConfig:
        version = env.get("VERSION") or "v1"
        if version not in STAR_COLORS:
            raise ConfigError(f"VERSION={version!r} is not one of {', '.join(STAR_COLORS)}")
        host = env.get("RATINGS_HOSTNAME") or "ratings"
        return cls(
            port=env_port(env, "PORT", 9080),
            version=version,
            ratings_url=f"http://{host}:{env_port(env, 'RATINGS_SERVICE_PORT', 9080)}",
            podname=env.get("HOSTNAME") or socket.gethostname(),
            # Istio's reviews prints "null" when CLUSTER_NAME is unset; scripts grep for it.
            clustername=env.get("CLUSTER_NAME") or "null",
        )


def reviews_body(
    config: ReviewsConfig, book_id: int, ratings: Mapping[str, object] | UpstreamError | None
) -> dict[str, object]:
    """The JSON answer: `ratings` is None for v1, the reviewer→stars map, or the failed call."""
    color = STAR_COLORS[config.version]
    reviews: list[dict[str, object]] = []
    for reviewer, text in REVIEWS:
        review: dict[str, object] = {"reviewer": reviewer, "text": text}
        if isinstance(ratings, UpstreamError):
            review["rating"] = {"error": RATINGS_UNAVAILABLE}
        elif ratings is not None and isinstance(stars := ratings.get(reviewer), int):
            review["rating"] = {"stars": stars, "color": color}
        reviews.append(review)
    return {
        "id": str(book_id),
        "podname": config.podname,
        "clustername": config.clustername,
        "reviews": reviews,
    }


async def fetch_ratings(request: web.Request, config: ReviewsConfig, book_id: int) -> Mapping[str, object]:
    url = f"{config.ratings_url}/ratings/{book_id}"
    answer = await fetch_json(request.app[CLIENT], "ratings", url, propagated_headers(request), RATINGS_TIMEOUT_S)
    ratings = answer.get("ratings") if isinstance(answer, dict) else None
    if not isinstance(ratings, dict):
        raise UpstreamError("ratings", f"{url} answered without a ratings map", 502)
    return ratings


CONFIG = web.AppKey("config", ReviewsConfig)


async def get_reviews(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    book_id = product_id(request)
    ratings: Mapping[str, object] | UpstreamError | None = None
    if STAR_COLORS[config.version] is not None:
        try:
            ratings = await fetch_ratings(request, config, book_id)
        except UpstreamError as exc:
            log.warning("ratings unavailable: %s", exc.reason)
            ratings = exc
    return web.json_response(reviews_body(config, book_id, ratings))


def build_app(config: ReviewsConfig) -> web.Application:
    app = new_app(with_client=True)
    app[CONFIG] = config
    app.router.add_get("/reviews/{id}", get_reviews)
    return app


async def serve() -> None:
    config = ReviewsConfig.from_env(os.environ)
    await serve_app(build_app(config), config.port)


def main() -> None:
    run("reviews", serve)


if __name__ == "__main__":
    main()
