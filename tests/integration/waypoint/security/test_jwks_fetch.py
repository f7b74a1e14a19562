"""`jwksUri` fetching by the waypoint's JwtAuthenticator against a real HTTP server on loopback: first fetch,
caching, refresh (key rotation), an unreachable or failing server, recovery, OpenID discovery, timeouts."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.unit.waypoint.security.jwtkeys import SigningKey, jwks, make_key
from waypoint.http.message import Headers, RequestHead
from waypoint.security.jwt import (
    JWKS_FETCH_FAIL,
    JWKS_KID_ALG_MISMATCH,
    JwksSettings,
    JwtAuthenticator,
    JwtResult,
)

WAIT = 10.0
GATEWAY = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
FAST = JwksSettings(refresh=0.1, retry_initial=0.05, retry_max=0.1)


class JwksServer:
    """Serves `/jwks` (whatever `document` and `status` say), the OpenID discovery document, and `/slow`,
    which answers only when the test ends."""

    def __init__(self) -> None:
        self.document = ""
        self.status = 200
        self.hits = 0
        self.base = ""
        self.release = asyncio.Event()

    async def jwks(self, _request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=self.status, text=self.document, content_type="application/json")

    async def discovery(self, _request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.base, "jwks_uri": f"{self.base}/jwks"})

    async def slow(self, _request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(text=self.document)


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    state = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks", state.jwks)
    app.router.add_get("/.well-known/openid-configuration", state.discovery)
    app.router.add_get("/slow", state.slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return make_key("RS256", kid="one")


def authenticator(rules: list[dict[str, Any]], settings: JwksSettings = FAST,
                  on_change: Callable[[], None] | None = None) -> JwtAuthenticator:
    authn = JwtAuthenticator(waypoint=("bookinfo", "waypoint"), settings=settings, on_change=on_change)
    authn.update([{"kind": "RequestAuthentication", "metadata": {"name": "jwt", "namespace": "bookinfo"},
                   "spec": {"targetRefs": [GATEWAY], "jwtRules": rules}}])
    return authn


def bearer(token: str) -> RequestHead:
    return RequestHead("GET", "/productpage", "productpage:9080", Headers([("authorization", f"Bearer {token}")]))


def token(key: SigningKey, issuer: str, **extra: Any) -> str:
    return key.sign({"iss": issuer, "sub": "alice", "exp": time.time() + 3600, **extra})


async def eventually(probe: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_keys_are_fetched_once_and_cached(server: JwksServer, key: SigningKey) -> None:
    server.document = jwks(key)
    authn = authenticator([{"issuer": "https://issuer", "jwksUri": f"{server.base}/jwks"}], JwksSettings())
    try:
        first = await authn.authenticate(bearer(token(key, "https://issuer")))  # waits for the first fetch
        assert first.ok and first.principal == "https://issuer/alice"
        assert (await authn.authenticate(bearer(token(key, "https://issuer", sub="bob")))).principal == (
            "https://issuer/bob")
        assert server.hits == 1
        assert authn.errors == ()
        assert authn.describe()["jwks"][0]["keys"] == 1
    finally:
        await authn.close()


async def test_unreachable_jwks_uri_rejects_its_issuer_only(key: SigningKey) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    other = make_key("ES256")
    changes: list[int] = []
    authn = authenticator([{"issuer": "https://down", "jwksUri": f"http://127.0.0.1:{port}/jwks"},
                           {"issuer": "https://inline", "jwks": jwks(other)}], on_change=lambda: changes.append(1))
    try:
        down = await authn.authenticate(bearer(token(key, "https://down")))
        assert (down.ok, down.status, down.body) == (False, 401, JWKS_FETCH_FAIL.encode())
        assert (await authn.authenticate(bearer(token(other, "https://inline")))).principal == "https://inline/alice"
        assert (await authn.authenticate(RequestHead("GET", "/", "h", Headers()))).ok  # no token: passes
        (error,) = authn.errors
        assert (error.kind, error.namespace, error.name, error.field) == (
            "RequestAuthentication", "bookinfo", "jwt", "spec.jwtRules[0].jwksUri")
        assert f"127.0.0.1:{port}" in error.message and "401" in error.message
        assert changes
    finally:
        await authn.close()


async def test_refresh_follows_key_rotation(server: JwksServer, key: SigningKey) -> None:
    server.document = jwks(key)
    authn = authenticator([{"issuer": "https://issuer", "jwksUri": f"{server.base}/jwks"}])
    rotated = make_key("RS256", kid="two")
    try:
        assert (await authn.authenticate(bearer(token(key, "https://issuer")))).ok
        server.document = jwks(rotated)

        async def rotated_in() -> bool:
            return (await authn.authenticate(bearer(token(rotated, "https://issuer")))).ok
        await eventually(rotated_in, "the rotated key to be fetched")
        old = await authn.authenticate(bearer(token(key, "https://issuer")))
        assert not old.ok and old.body == JWKS_KID_ALG_MISMATCH.encode()
    finally:
        await authn.close()


async def test_a_failing_server_is_retried_until_it_recovers(server: JwksServer, key: SigningKey) -> None:
    server.document, server.status = jwks(key), 503
    authn = authenticator([{"issuer": "https://issuer", "jwksUri": f"{server.base}/jwks"}])
    try:
        assert (await authn.authenticate(bearer(token(key, "https://issuer")))).status == 401
        assert "HTTP 503" in authn.errors[0].message
        await eventually(lambda: server.hits >= 3, "retries")
        server.status = 200

        async def recovered() -> JwtResult | None:
            result = await authn.authenticate(bearer(token(key, "https://issuer")))
            return result if result.ok else None
        await eventually(recovered, "the JWKS server to recover")
        assert authn.errors == ()
    finally:
        await authn.close()


async def test_a_failed_refresh_keeps_the_last_keys(server: JwksServer, key: SigningKey) -> None:
    server.document = jwks(key)
    authn = authenticator([{"issuer": "https://issuer", "jwksUri": f"{server.base}/jwks"}])
    try:
        assert (await authn.authenticate(bearer(token(key, "https://issuer")))).ok
        server.status = 500
        await eventually(lambda: authn.errors, "the failed refresh to be reported")
        assert "stay in use" in authn.errors[0].message
        assert (await authn.authenticate(bearer(token(key, "https://issuer")))).ok
    finally:
        await authn.close()


async def test_openid_discovery_when_no_jwks_is_given(server: JwksServer, key: SigningKey) -> None:
    server.document = jwks(key)
    authn = authenticator([{"issuer": server.base}])
    try:
        result = await authn.authenticate(bearer(token(key, server.base)))
        assert result.ok and result.principal == f"{server.base}/alice"
        assert authn.describe()["jwks"][0]["url"] == f"{server.base}/.well-known/openid-configuration"
    finally:
        await authn.close()


async def test_a_server_that_does_not_answer_times_out(server: JwksServer, key: SigningKey) -> None:
    server.document = jwks(key)
    authn = authenticator([{"issuer": "https://issuer", "jwksUri": f"{server.base}/slow", "timeout": "0.2s"}])
    try:
        started = time.monotonic()
        result = await authn.authenticate(bearer(token(key, "https://issuer")))
        assert not result.ok and result.body == JWKS_FETCH_FAIL.encode()
        assert time.monotonic() - started < 3
        assert "no answer within 0.2s" in authn.errors[0].message
    finally:
        await authn.close()


async def test_config_changes_start_and_stop_fetches(server: JwksServer, key: SigningKey) -> None:
    server.document = jwks(key)
    authn = authenticator([{"issuer": "https://issuer", "jwksUri": f"{server.base}/jwks"}], JwksSettings())
    try:
        assert (await authn.authenticate(bearer(token(key, "https://issuer")))).ok
        assert authn.fetching == 1
        authn.update([])
        await eventually(lambda: authn.fetching == 0, "the fetch task to stop")
        assert authn.describe()["jwks"] == []
        assert (await authn.authenticate(bearer("not.even.parsed"))).ok  # no rules any more
        authn.update([{"kind": "RequestAuthentication", "metadata": {"name": "jwt", "namespace": "bookinfo"},
                       "spec": {"targetRefs": [GATEWAY], "jwtRules": [
                           {"issuer": "https://issuer", "jwksUri": f"{server.base}/jwks"}]}}])
        assert authn.fetching == 1
    finally:
        await authn.close()
    assert authn.fetching == 0
