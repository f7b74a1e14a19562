"""The httpbin-like echo server over real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from samples.httpbin.server import build_app, fail_status

from .programs import Program, Programs


@pytest.fixture(scope="module")
def httpbin(module_programs: Programs) -> Program:
    program = module_programs.start("samples.httpbin.server", "httpbin")
    module_programs.wait_ready(program)
    return program


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def test_status_answers_the_code_asked_for(httpbin: Program, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{httpbin.url}/status/418") as teapot, http.get(f"{httpbin.url}/status/204") as empty:
        assert teapot.status == 418
        assert empty.status == 204
    async with http.get(f"{httpbin.url}/status/teapot") as bad:
        assert bad.status == 400


async def test_headers_echoes_request_headers(httpbin: Program, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{httpbin.url}/headers", headers={"X-Custom": "mesh"}) as response:
        headers = (await response.json())["headers"]

    assert headers["X-Custom"] == "mesh"


async def test_delay_waits_before_answering(httpbin: Program, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with http.get(f"{httpbin.url}/delay/1") as response:
        assert response.status == 200
        assert (await response.json())["path"] == "/delay/1"

    assert time.monotonic() - started >= 1.0


async def test_any_method_on_any_path_echoes(httpbin: Program, http: aiohttp.ClientSession) -> None:
    url = f"{httpbin.url}/anything/deep/path?a=1&a=2&b=3"
    async with http.put(url, data=b"payload", headers={"X-Trace": "t1"}) as anything:
        echoed = await anything.json()
    async with http.delete(f"{httpbin.url}/no/such/route") as other:
        other_echo = await other.json()

    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/anything/deep/path"
    assert echoed["args"] == {"a": ["1", "2"], "b": "3"}
    assert echoed["headers"]["X-Trace"] == "t1"
    assert echoed["body"] == "payload"
    assert echoed["origin"] == "127.0.0.1"
    assert echoed["url"].endswith("/anything/deep/path?a=1&a=2&b=3")
    assert other_echo["method"] == "DELETE"


async def test_get_ip_bytes_and_stream(httpbin: Program, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{httpbin.url}/get?x=y") as response:
        assert (await response.json())["args"] == {"x": "y"}
    async with http.get(f"{httpbin.url}/ip") as response:
        assert await response.json() == {"origin": "127.0.0.1"}
    async with http.get(f"{httpbin.url}/bytes/1000") as response:
        assert len(await response.read()) == 1000
    async with http.get(f"{httpbin.url}/stream/3") as response:
        lines = (await response.text()).splitlines()
    assert len(lines) == 3


async def test_flaky_fails_the_first_of_every_cycle(httpbin: Program, http: aiohttp.ClientSession) -> None:
    statuses = []
    for _ in range(6):
        async with http.get(f"{httpbin.url}/flaky/2/3") as response:
            statuses.append(response.status)
            assert response.headers["x-served-by"]

    assert statuses == [503, 503, 200, 503, 503, 200]


async def test_fail_status_makes_every_path_fail_but_health() -> None:
    async with TestClient(TestServer(build_app(fail_status({"FAIL_STATUS": "500"})))) as client:
        failing = await client.get("/get")
        health = await client.get("/health")

    assert (failing.status, health.status) == (500, 200)
    with pytest.raises(SystemExit, match="FAIL_STATUS"):
        fail_status({"FAIL_STATUS": "oops"})
