"""The local API server's `pods/{name}[:port]/proxy/{path}` over real HTTP: a fake pod (an aiohttp server on
loopback, its address written into a Pod's status) answers, and the server must pass requests and answers
through as kube-apiserver does, failing with Kubernetes' own `Status` objects and words."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable
from ambient.local.apiserver import pod_location, split_scheme_name_port
from tests.integration.kube_fixtures import HOST, free_port, local_apiserver

Obj = dict[str, Any]
TOKEN = "proxy-test-token"
WAIT = 5.0  # bound on every request, so a hanging proxy fails the test
TYPES = ResourceTable()
POD, NAMESPACE = TYPES.require("pods"), TYPES.require("namespaces")


@dataclass
class FakePod:
    """An HTTP server standing in for a pod: remembers every request and answers as told."""

    port: int
    seen: list[Obj] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"method": request.method, "raw_path": request.rel_url.raw_path,
                          "query": request.rel_url.raw_query_string, "headers": dict(request.headers), "body": body})
        if request.path == "/broken":
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"only the start")
            assert request.transport is not None
            request.transport.close()
            return response
        if request.path == "/teapot":
            return web.Response(status=418, text="short and stout", headers={"X-Pod": "yes"})
        return web.Response(status=201 if request.method == "POST" else 200, body=b"\x00\x01binary\xff",
                            content_type="application/octet-stream", headers={"X-Pod": "yes"})


@contextlib.asynccontextmanager
async def fake_pod() -> AsyncIterator[FakePod]:
    fake = FakePod(free_port())
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, fake.port).start()
    try:
        yield fake
    finally:
        await runner.cleanup()


@dataclass
class Env:
    client: KubeClient
    http: aiohttp.ClientSession  # raw, with the bearer token
    url: str
    pod: FakePod

    async def add_pod(self, name: str, ip: str | None = HOST, ports: list[int] | None = None) -> None:
        container: Obj = {"name": "app", "image": "busybox"}
        if ports:
            container["ports"] = [{"containerPort": p} for p in ports]
        await self.client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "web"},
                                  "spec": {"containers": [container], "nodeName": "node-1"}})
        if ip:
            await self.client.patch(POD, name, {"status": {"phase": "Running", "podIP": ip,
                                                           "podIPs": [{"ip": ip}]}}, "web", status=True)

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(WAIT), self.http.request(method, path, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with local_apiserver(TOKEN) as url, fake_pod() as pod, KubeClient(KubeConfig(url, token=TOKEN)) as client, \
            aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
        yield Env(client, http, url, pod)


def proxy(target: str, tail: str = "") -> str:
    return f"/api/v1/namespaces/web/pods/{target}/proxy{tail}"


def status_of(body: bytes) -> Obj:
    status: Obj = json.loads(body)
    assert (status["kind"], status["status"]) == ("Status", "Failure"), status
    return status


async def test_get_passes_path_query_and_answer_through_without_the_callers_token(env: Env) -> None:
    await env.add_pod("web-1")
    status, headers, body = await env.call("GET", proxy(f"web-1:{env.pod.port}", "/stats/a%2Fb/?filter=x&n=1"))
    assert (status, body, headers["X-Pod"]) == (200, b"\x00\x01binary\xff", "yes")
    assert headers["Content-Type"] == "application/octet-stream"
    [seen] = env.pod.seen
    assert (seen["method"], seen["raw_path"], seen["query"]) == ("GET", "/stats/a%2Fb/", "filter=x&n=1")
    assert "Authorization" not in seen["headers"]
    assert seen["headers"]["X-Forwarded-Uri"] == proxy(f"web-1:{env.pod.port}", "/stats/a%2Fb/")
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    assert seen["headers"]["Host"] == f"{HOST}:{env.pod.port}"


async def test_post_body_and_pod_error_statuses_pass_through_verbatim(env: Env) -> None:
    await env.add_pod("web-1")
    status, _, body = await env.call("POST", proxy(f"http:web-1:{env.pod.port}", "/logging?level=debug"),
                                     data=b"payload")
    assert (status, body) == (201, b"\x00\x01binary\xff")
    assert (env.pod.seen[0]["method"], env.pod.seen[0]["body"]) == ("POST", b"payload")
    # The pod's own error is its answer, not a Status: the proxy worked.
    status, headers, body = await env.call("GET", proxy(f"web-1:{env.pod.port}", "/teapot"))
    assert (status, body, headers["X-Pod"]) == (418, b"short and stout", "yes")


async def test_without_a_port_the_first_declared_container_port_is_used(env: Env) -> None:
    await env.add_pod("web-1", ports=[env.pod.port, 9])
    status, _, _ = await env.call("GET", proxy("web-1"))
    assert status == 200
    assert env.pod.seen[0]["raw_path"] == "/"


async def test_client_raw_reads_through_the_proxy_and_raises_the_status(env: Env) -> None:
    await env.add_pod("web-1")
    assert await env.client.raw("GET", proxy(f"web-1:{env.pod.port}", "/config_dump")) == b"\x00\x01binary\xff"
    with pytest.raises(ApiError) as info:
        await env.client.raw("GET", proxy("missing:15000", "/config_dump"))
    assert (info.value.code, info.value.reason, info.value.message) == (404, "NotFound", 'pods "missing" not found')


@pytest.mark.parametrize(("target", "code", "reason", "message"), [
    ("missing:80", 404, "NotFound", 'pods "missing" not found'),
    ("no-ip:80", 400, "BadRequest", "address not allowed"),
    ("a:b:c:d", 400, "BadRequest", "invalid pod request 'a:b:c:d'"),
    ("ftp:web-1:80", 400, "BadRequest", "invalid pod request 'ftp:web-1:80'"),
    ("web-1:no-such-service", 503, "ServiceUnavailable",
     "error trying to reach service: dial tcp: lookup tcp/no-such-service: unknown port"),
])
async def test_errors_are_kubernetes_status_objects(env: Env, target: str, code: int, reason: str,
                                                    message: str) -> None:
    await env.add_pod("web-1")
    await env.add_pod("no-ip", ip=None)
    status, _, body = await env.call("GET", proxy(target, "/x"))
    reply = status_of(body)
    assert (status, reply["code"], reply["reason"], reply["message"]) == (code, code, reason, message)
    assert env.pod.seen == []


async def test_a_pod_that_does_not_listen_is_503_with_gos_dial_error(env: Env) -> None:
    await env.add_pod("web-1")
    closed = free_port()
    status, _, body = await env.call("GET", proxy(f"web-1:{closed}", "/config_dump"))
    reply = status_of(body)
    assert (status, reply["reason"]) == (503, "ServiceUnavailable")
    assert reply["message"] == f"error trying to reach service: dial tcp {HOST}:{closed}: connect: connection refused"


async def test_proxy_requests_need_the_token_and_an_allowed_method(env: Env) -> None:
    await env.add_pod("web-1")
    async with aiohttp.ClientSession(env.url) as anonymous, asyncio.timeout(WAIT), \
            anonymous.get(proxy(f"web-1:{env.pod.port}", "/")) as resp:
        assert resp.status == 401
    status, _, body = await env.call("TRACE", proxy(f"web-1:{env.pod.port}", "/"))
    assert (status, status_of(body)["reason"]) == (405, "MethodNotAllowed")
    assert env.pod.seen == []


async def test_an_answer_that_breaks_off_is_not_passed_off_as_whole(env: Env) -> None:
    await env.add_pod("web-1")
    with pytest.raises(aiohttp.ClientPayloadError):
        await env.call("GET", proxy(f"web-1:{env.pod.port}", "/broken"))
    # The server is still fine afterwards.
    status, _, _ = await env.call("GET", proxy(f"web-1:{env.pod.port}", "/"))
    assert status == 200


# -- the pure parts ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "expected"), [
    ("web", ("http", "web", "")), ("web:15000", ("http", "web", "15000")),
    ("https:web:8443", ("https", "web", "8443")), ("http:web:", ("http", "web", "")),
])
def test_split_scheme_name_port(target: str, expected: tuple[str, str, str]) -> None:
    assert split_scheme_name_port(target) == expected


@pytest.mark.parametrize(("ip", "scheme", "port", "containers", "expected"), [
    ("10.244.1.5", "http", "15000", [], ("10.244.1.5", 15000)),
    ("10.244.1.5", "http", "", [{"name": "a"}, {"name": "b", "ports": [{"containerPort": 9080}]}],
     ("10.244.1.5", 9080)),
    ("10.244.1.5", "https", "", [], ("10.244.1.5", 443)),
    ("fd00::5", "http", "", [], ("[fd00::5]", 80)),
    ("10.244.1.5", "http", "http", [], ("10.244.1.5", 80)),
])
def test_pod_location(ip: str, scheme: str, port: str, containers: list[Obj], expected: tuple[str, int]) -> None:
    pod = {"spec": {"containers": containers}, "status": {"podIPs": [{"ip": ip}]}}
    assert pod_location(pod, scheme, port) == expected


@pytest.mark.parametrize("ip", ["", "0.0.0.0", "169.254.1.1", "224.0.0.1", "not-an-ip"])
def test_pod_location_refuses_addresses_kubernetes_refuses(ip: str) -> None:
    with pytest.raises(ApiError, match="address not allowed"):
        pod_location({"spec": {"containers": []}, "status": {"podIP": ip}}, "http", "80")
