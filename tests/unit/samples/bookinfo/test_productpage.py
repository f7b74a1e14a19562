from __future__ import annotations

import pytest

from samples.bookinfo.productpage import USER_NAME, ProductPageConfig


def test_config_defaults_to_the_service_names() -> None:
    config = ProductPageConfig.from_env({})

    assert config.port == 9080
    assert config.details_url == "http://details:9080"
    assert config.reviews_url == "http://reviews:9080"
    assert config.ratings_url == "http://ratings:9080"


def test_config_reads_hostnames_and_ports() -> None:
    config = ProductPageConfig.from_env({"REVIEWS_HOSTNAME": "127.0.0.1", "REVIEWS_SERVICE_PORT": "19080"})

    assert config.reviews_url == "http://127.0.0.1:19080"


@pytest.mark.parametrize("user", ["jason", "a.b@c-d_e"])
def test_user_names_that_fit_a_cookie_and_a_header(user: str) -> None:
    assert USER_NAME.fullmatch(user)


@pytest.mark.parametrize("user", ["", "two words", "x;y", "a\r\nSet-Cookie: z", "x" * 65])
def test_user_names_refused(user: str) -> None:
    assert not USER_NAME.fullmatch(user)
