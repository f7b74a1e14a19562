from __future__ import annotations

import pytest

from samples.bookinfo.reviews import RATINGS_UNAVAILABLE, ReviewsConfig, reviews_body
from samples.common import ConfigError, UpstreamError


def config(version: str) -> ReviewsConfig:
    return ReviewsConfig.from_env({"VERSION": version, "HOSTNAME": "reviews-x", "RATINGS_HOSTNAME": "r"})


def ratings(body: dict[str, object]) -> list[object]:
    reviews = body["reviews"]
    assert isinstance(reviews, list)
    return [review.get("rating") for review in reviews]


def test_config_defaults_follow_istio() -> None:
    defaults = ReviewsConfig.from_env({"HOSTNAME": "pod"})

    assert defaults.version == "v1"
    assert defaults.port == 9080
    assert defaults.ratings_url == "http://ratings:9080"
    assert defaults.clustername == "null"
    assert config("v2").ratings_url == "http://r:9080"


def test_unknown_version_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="v4"):
        config("v4")


def test_v1_has_no_ratings() -> None:
    body = reviews_body(config("v1"), 3, None)

    assert body["id"] == "3"
    assert body["podname"] == "reviews-x"
    assert ratings(body) == [None, None]


@pytest.mark.parametrize(("version", "color"), [("v2", "black"), ("v3", "red")])
def test_v2_and_v3_colour_the_stars(version: str, color: str) -> None:
    body = reviews_body(config(version), 0, {"Reviewer1": 5, "Reviewer2": 4})

    assert ratings(body) == [
        {"stars": 5, "color": color},
        {"stars": 4, "color": color},
    ]


def test_failed_ratings_become_an_error_per_review() -> None:
    body = reviews_body(config("v2"), 0, UpstreamError("ratings", "timeout"))

    assert ratings(body) == [{"error": RATINGS_UNAVAILABLE}] * 2
