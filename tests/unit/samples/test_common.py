from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from samples.common import ConfigError, env_port, propagated_headers


def test_propagates_only_the_listed_headers_joining_repeats() -> None:
    headers = CIMultiDict(
        [
            ("X-Request-Id", "r1"),
            ("End-User", "jason"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
            ("Baggage", "k=v"),
            ("Baggage", "k2=v2"),
            ("Authorization", "Bearer secret"),
            ("Host", "productpage"),
        ]
    )
    request = make_mocked_request("GET", "/productpage", headers=headers)

    assert propagated_headers(request) == {
        "end-user": "jason",
        "x-request-id": "r1",
        "baggage": "k=v, k2=v2",
        "cookie": "a=1; b=2",
    }


@pytest.mark.parametrize(("value", "port"), [("", 9080), ("8080", 8080)])
def test_env_port(value: str, port: int) -> None:
    assert env_port({"PORT": value}, "PORT", 9080) == port


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_env_port_rejects_non_ports(value: str) -> None:
    with pytest.raises(ConfigError, match="PORT"):
        env_port({"PORT": value}, "PORT", 9080)
