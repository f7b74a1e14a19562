"""The whole waypoint (`waypoint/app.py` + `waypoint/proxy.py`) in process, over real sockets and real mTLS:
HBONE in from a caller presenting productpage's certificate, the L7 pipeline, HBONE out to reviews-v1/v2/v3
on their own loopback "pod IPs" (see `harness.py`). Each test configures the waypoint as one of Istio's
tutorials does and measures what callers and endpoints see."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ambient.hbone.errors import HboneError
from ambient.xds.store import StoreChanges
from tests.integration.waypoint.harness import (
    AUTHORITY,
    HOST,
    HTTP_PORT,
    NS,
    PRODUCTPAGE_ID,
    REVIEWS_ID,
    TCP_PORT,
    VERSIONS,
    WAYPOINT_ID,
    Certs,
    Mesh,
    Reply,
    authorization_policy,
    destination,
    destination_rule,
    eventually,
    make_certs,
    read_body,
    request_authentication,
    reviews_workload,
    running_mesh,
    virtual_service,
)
from tests.unit.waypoint.security.jwtkeys import SigningKey, jwks, make_key
from waypoint.http.http1 import Http1ClientConnection
from waypoint.http.message import Headers, RequestHead, bytes_body

pytestmark = pytest.mark.timeout(60)

ISSUER = "testing@secure.istio.io"


@pytest.fixture(scope="module")
def certs() -> Certs:
    return make_certs()


@pytest.fixture
async def mesh(certs: Certs) -> AsyncIterator[Mesh]:
    async with running_mesh(certs) as running:
        yield running


def versions(replies: list[Reply]) -> Counter[str | None]:
    return Counter(reply.version for reply in replies)


def only_to(subset: str, **route: Any) -> dict[str, Any]:
    return {"name": f"to-{subset}", "route": [destination(subset)], **route}


# -- relaying ---------------------------------------------------------------------------------------------
async def test_default_route_relays_to_every_endpoint_over_hbone(mesh: Mesh) -> None:
    replies = [await mesh.get("/reviews/0?x=1", [("x-custom", "kept")]) for _ in range(30)]
    assert {r.status for r in replies} == {200}
    seen_by_app = replies[0].json
    assert seen_by_app["path"] == "/reviews/0?x=1" and seen_by_app["method"] == "GET"
    assert seen_by_app["host"] == AUTHORITY
    assert seen_by_app["headers"]["x-custom"] == "kept"
    assert seen_by_app["headers"]["x-request-id"]  # created by the waypoint (Envoy's generate_request_id)
    assert seen_by_app["headers"]["traceparent"].startswith("00-")
    assert set(versions(replies)) == set(VERSIONS), "the default route balances over every endpoint"
    for version, ip in VERSIONS.items():
        endpoint = mesh.endpoints[version]
        assert endpoint.tunnels, f"{version} got no tunnel"
        # HBONE out: authority podIP:targetPort, the waypoint's own identity (PROTOCOLS §6)
        assert {t.authority for t in endpoint.tunnels} == {f"{ip}:{HTTP_PORT}"}
        assert {t.peer_identity for t in endpoint.tunnels} == {str(WAYPOINT_ID)}


async def test_workload_addressed_http_is_proxied_to_that_pod(mesh: Mesh) -> None:
    """A workload waypoint gets CONNECTs for `podIP:port`: HTTP to it goes to that pod (as its L4 relay does)."""
    v1 = VERSIONS["v1"]
    stream = await mesh.client.connect(mesh.certs.productpage, ("127.0.0.1", mesh.port), f"{v1}:{HTTP_PORT}",
                                       [str(WAYPOINT_ID)])
    conn = Http1ClientConnection(stream)
    try:
        reply = await mesh.get("/reviews/0", conn=conn, authority=f"{v1}:{HTTP_PORT}")
    finally:
        await conn.close()
    assert reply.status == 200, reply.body
    assert reply.version == "v1"
    assert [t.authority for t in mesh.endpoints["v1"].tunnels] == [f"{v1}:{HTTP_PORT}"]


async def test_endpoints_follow_the_workload_store(mesh: Mesh) -> None:
    v3 = reviews_workload("v3")
    mesh.store.apply(StoreChanges(removed_addresses=(v3.uid,)))
    replies = await mesh.many(30)
    assert {r.status for r in replies} == {200}
    assert set(versions(replies)) == {"v1", "v2"}, "a removed endpoint gets no traffic"
    mesh.store.apply(StoreChanges(workloads={v3.uid: v3}))
    deadline = time.monotonic() + 5.0
    while (await mesh.get("/reviews/0")).version != "v3":
        assert time.monotonic() < deadline, "an added endpoint never got traffic"


async def test_unknown_destination_is_refused(mesh: Mesh) -> None:
    with pytest.raises(HboneError) as refused:
        await mesh.client.connect(mesh.certs.productpage, ("127.0.0.1", mesh.port), f"10.96.0.99:{HTTP_PORT}",
                                  [str(WAYPOINT_ID)])
    assert refused.value.status == 503


async def test_tcp_port_is_relayed(mesh: Mesh) -> None:
    stream = await mesh.tunnel(port=TCP_PORT)
    payload = b"ping " * 10_000
    await stream.write(payload)
    stream.write_eof()
    received = b""
    async with asyncio.timeout(10):
        while chunk := await stream.read():
            received += chunk
    version, _, echoed = received.partition(b":")
    assert version.decode() in VERSIONS
    assert echoed == payload
    endpoint = mesh.endpoints[version.decode()]
    assert [t.authority for t in endpoint.tunnels] == [f"{VERSIONS[version.decode()]}:{TCP_PORT}"]


async def test_http2_request_through_the_waypoint(mesh: Mesh) -> None:
    conn = await mesh.h2_connection()
    try:
        replies = await asyncio.gather(*(mesh.get(f"/h2/{i}", [("x-n", str(i))], conn=conn) for i in range(5)))
    finally:
        await conn.close()
    assert [r.status for r in replies] == [200] * 5
    assert all(r.version in VERSIONS for r in replies)
    assert [r.json["path"] for r in replies] == [f"/h2/{i}" for i in range(5)]
    assert [r.json["headers"]["x-n"] for r in replies] == [str(i) for i in range(5)]


async def test_http2_caller_to_an_http11_port_reaches_the_app_as_http11(mesh: Mesh) -> None:
    """The port is declared HTTP/1.1 (`appProtocol: http`): Envoy speaks HTTP/1.1 to such an upstream
    whatever the caller spoke (Istio sets no http2_protocol_options unless the port says http2/grpc or a
    DestinationRule asks `h2UpgradePolicy: UPGRADE`). An app that only speaks HTTP/1.1 must keep working
    when a caller switches to HTTP/2."""
    conn = await mesh.h2_connection()
    try:
        reply = await mesh.get("/reviews/1", conn=conn)
    finally:
        await conn.close()
    assert reply.status == 200
    assert reply.json["protocol"] == "HTTP/1.1"


# -- routing ----------------------------------------------------------------------------------------------
async def test_weighted_split_80_20(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([{"route": [destination("v1", 80), destination("v2", 20)]}])],
                   destination_rules=[destination_rule()])
    replies = await mesh.many(500)
    assert {r.status for r in replies} == {200}
    counts = versions(replies)
    assert set(counts) <= {"v1", "v2"}, counts
    share = counts["v1"] / len(replies)
    assert 0.74 <= share <= 0.86, f"v1 got {share:.1%} of 500 requests, expected 80% ± 6"


async def test_header_match_sends_jason_to_v3(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [destination("v3")]},
        {"route": [destination("v2")]}])], destination_rules=[destination_rule()])
    jason = [await mesh.get("/reviews/0", [("end-user", "jason")]) for _ in range(10)]
    others = [await mesh.get("/reviews/0", [("end-user", "jasonx")]) for _ in range(5)]
    others += [await mesh.get("/reviews/0") for _ in range(5)]
    assert versions(jason) == {"v3": 10}
    assert versions(others) == {"v2": 10}


async def test_subset_routing_selects_endpoints_by_pod_labels(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([only_to("v2")])], destination_rules=[destination_rule()])
    replies = await mesh.many(20)
    assert versions(replies) == {"v2": 20}
    assert len(mesh.seen("v2")) == 20
    assert mesh.seen("v1") == [] and mesh.seen("v3") == []


async def test_unknown_subset_drops_only_that_route(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([
        {"name": "broken", "match": [{"uri": {"prefix": "/broken"}}], "route": [destination("v9")]},
        {"name": "canary", "match": [{"uri": {"prefix": "/canary"}}], "route": [destination("v3")]},
        only_to("v1")])], destination_rules=[destination_rule()])
    canary = await mesh.get("/canary")
    broken = await mesh.get("/broken")
    other = await mesh.get("/other")
    assert (canary.status, canary.version) == (200, "v3")
    assert (broken.status, broken.version) == (200, "v1"), "the dropped route's traffic falls through"
    assert (other.status, other.version) == (200, "v1")
    errors = [e for e in mesh.app.compiled.errors if e.kind == "VirtualService" and e.name == "reviews"]
    assert errors, mesh.app.compiled.errors
    assert any("subset" in e.field and "v9" in f"{e.field} {e.message}" for e in errors), errors
    assert any("v9" in text for text in mesh.app.config_dump()["errors"])


# -- faults, timeouts, retries -------------------------------------------------------------------------------
async def test_fault_abort_100_percent(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([
        {"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}}, "route": [destination()]}])])
    replies = [await mesh.get("/reviews/0") for _ in range(5)]
    assert [(r.status, r.body) for r in replies] == [(503, b"fault filter abort")] * 5
    assert all(not mesh.seen(v) for v in VERSIONS), "an aborted request never reaches an endpoint"
    await eventually(lambda: mesh.requests_total(response_code="503", response_flags="FI") == 5,
                     "5 requests counted with flag FI")


async def test_fault_delay_applies(mesh: Mesh) -> None:
    delay = 0.3
    mesh.configure(virtual_services=[virtual_service([
        {"match": [{"uri": {"prefix": "/slow"}}],
         "fault": {"delay": {"fixedDelay": f"{delay}s", "percentage": {"value": 100}}}, "route": [destination()]},
        {"route": [destination()]}])])
    delayed = [await mesh.get("/slow") for _ in range(3)]
    fast = await mesh.get("/fast")
    assert {r.status for r in delayed} == {200}
    assert min(r.elapsed for r in delayed) >= delay
    assert fast.elapsed < delay
    await eventually(lambda: mesh.requests_total(response_code="200", response_flags="DI") == 3,
                     "3 delayed requests counted with flag DI")


async def test_route_timeout_cuts_a_slow_upstream(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([{"timeout": "0.3s", "route": [destination()]}])])
    reply = await mesh.get("/delay/3000")
    assert (reply.status, reply.body) == (504, b"upstream request timeout")
    assert 0.3 <= reply.elapsed < 2.0
    quick = await mesh.get("/delay/10")
    assert quick.status == 200
    await eventually(lambda: mesh.requests_total(response_code="504", response_flags="UT") == 1,
                     "the timeout counted with flag UT")


async def test_retries_hide_an_upstream_failing_two_tries_of_three(mesh: Mesh) -> None:
    # without a retry policy on 5xx, two requests in three fail: the flaky app is what we think it is
    without = [await mesh.get("/flaky") for _ in range(6)]
    assert sorted(r.status for r in without) == [200, 200, 503, 503, 503, 503]
    assert mesh.flaky.tries == 6
    mesh.configure(virtual_services=[virtual_service([
        {"retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"}, "route": [destination()]}])])
    replies = [await mesh.get("/flaky") for _ in range(15)]
    assert [r.status for r in replies] == [200] * 15
    assert mesh.flaky.tries == 6 + 15 * 3, "each request took exactly three tries"


async def test_a_virtualservice_route_gets_istios_default_retries_unless_attempts_is_0(mesh: Mesh) -> None:
    """No `retries`: Istio's default, 2 retries on 503 among others, so the flaky app always answers 200.
    `attempts: 0`: no retry at all, every 503 reaches the caller."""
    mesh.configure(virtual_services=[virtual_service([{"route": [destination()]}])])
    replies = [await mesh.get("/flaky") for _ in range(6)]
    assert [r.status for r in replies] == [200] * 6
    assert mesh.flaky.tries == 6 * 3
    mesh.configure(virtual_services=[virtual_service([{"retries": {"attempts": 0}, "route": [destination()]}])])
    replies = [await mesh.get("/flaky") for _ in range(6)]
    assert sorted(r.status for r in replies) == [200, 200, 503, 503, 503, 503]
    assert mesh.flaky.tries == 6 * 3 + 6


# -- destination policies --------------------------------------------------------------------------------------
async def test_circuit_breaker_overflow_is_503_uo(mesh: Mesh) -> None:
    pool = {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}
    mesh.configure(virtual_services=[virtual_service([only_to("v1")])],
                   destination_rules=[destination_rule({"connectionPool": pool})])
    replies = await asyncio.gather(*(mesh.get("/delay/400") for _ in range(4)))
    statuses = Counter(r.status for r in replies)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1 and statuses[200] >= 1, statuses
    for reply in replies:
        if reply.status == 503:
            assert reply.body.endswith(b"reset reason: overflow")
    assert mesh.endpoints["v1"].max_in_flight == 1, "one connection: the app never sees two requests at once"
    await eventually(lambda: mesh.requests_total(response_code="503", response_flags="UO") == statuses[503],
                     f"{statuses[503]} overflows counted with flag UO")


async def test_max_connections_does_not_starve_other_endpoints(mesh: Mesh) -> None:
    """maxConnections is cluster-wide; a request balanced to an endpoint that has no connection yet must not
    wait forever for another endpoint's idle connection. Envoy always opens a connection for a host pool
    that has none, even past the limit (`ConnPoolImplBase::tryCreateNewConnection`)."""
    pool = {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 10}}
    mesh.configure(destination_rules=[destination_rule({"connectionPool": pool,
                                                       "loadBalancer": {"simple": "ROUND_ROBIN"}})])
    replies = []
    for i in range(6):  # sequential: never more than one request in flight
        try:
            replies.append(await asyncio.wait_for(mesh.get("/reviews/0"), 3.0))
        except TimeoutError:
            raise AssertionError(f"request {i + 1} (after {[r.version for r in replies]}) never got an answer: "
                                 "it waits for a connection slot held by another endpoint's idle connection") from None
    assert [r.status for r in replies] == [200] * 6
    assert set(versions(replies)) == set(VERSIONS)


async def test_a_caller_that_leaves_gives_its_pending_slot_back(mesh: Mesh) -> None:
    """Envoy resets the upstream side of a request whose caller disconnected (flag DC); a request that was
    waiting for a connection leaves the pending queue, so it cannot cause overflows for later callers."""
    pool = {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}
    mesh.configure(virtual_services=[virtual_service([only_to("v1")])],
                   destination_rules=[destination_rule({"connectionPool": pool})])
    busy = asyncio.create_task(mesh.get("/delay/1500"))
    await eventually(lambda: mesh.endpoints["v1"].in_flight == 1, "the first request at v1")
    leaving = asyncio.create_task(mesh.get("/delay/10"))
    limits = next(iter(mesh.app.proxy.clusters.values())).limits
    await eventually(lambda: limits.pending == 1, "the second request pending")
    leaving.cancel()  # the caller gives up: its tunnel closes
    await asyncio.gather(leaving, return_exceptions=True)
    later = await mesh.get("/delay/10")  # waits for the first to finish, as the pending one would have
    assert (await busy).status == 200
    assert later.status == 200, later.body
    assert later.version == "v1"


async def test_outlier_detection_ejects_a_failing_endpoint_and_takes_it_back(mesh: Mesh) -> None:
    base_ejection = 2.0
    mesh.configure(destination_rules=[destination_rule({"outlierDetection": {
        "consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": f"{base_ejection:g}s",
        "maxEjectionPercent": 100}})])
    bad = mesh.endpoints["v3"]
    bad.status = 500
    ejected_at = None
    for _ in range(100):
        reply = await mesh.get("/reviews/0")
        if reply.status == 500:
            ejected_at = time.monotonic()
            assert reply.version == "v3"
            break
        assert reply.version in ("v1", "v2")
    assert ejected_at is not None, "v3 never got a request"
    before = len(bad.requests)
    after_ejection = [await mesh.get("/reviews/0") for _ in range(30)]
    assert {r.status for r in after_ejection} == {200}
    assert set(versions(after_ejection)) == {"v1", "v2"}, "traffic moved to the others"
    assert len(bad.requests) == before
    bad.status = None  # v3 recovers; it takes traffic again once its ejection is over

    async def v3_answers() -> bool:
        return (await mesh.get("/reviews/0")).version == "v3"

    deadline = time.monotonic() + base_ejection + 4.0
    while not await v3_answers():
        assert time.monotonic() < deadline, "v3 never came back"
    assert time.monotonic() - ejected_at >= base_ejection * 0.9, "v3 came back before baseEjectionTime"


# -- security ----------------------------------------------------------------------------------------------
async def test_deny_policy_on_the_waypoint_blocks_admin(mesh: Mesh) -> None:
    mesh.configure(authorization_policies=[authorization_policy(
        "deny-admin", "DENY", [{"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}])])
    denied = await mesh.get("/admin")
    denied_sub = await mesh.get("/admin/users")
    allowed = await mesh.get("/reviews/0")
    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    assert (denied_sub.status, denied_sub.body) == (403, b"RBAC: access denied")
    assert allowed.status == 200 and allowed.version in VERSIONS
    assert not any(seen.path.startswith("/admin") for v in VERSIONS for seen in mesh.seen(v))


async def test_allow_policy_by_principal(mesh: Mesh) -> None:
    mesh.configure(authorization_policies=[authorization_policy(
        "allow-productpage", "ALLOW", [{"from": [{"source": {"principals": [
            f"{PRODUCTPAGE_ID.trust_domain}/ns/{NS}/sa/{PRODUCTPAGE_ID.service_account}"]}}]}])])
    productpage = await mesh.get("/reviews/0")
    sleep = await mesh.get("/reviews/0", cert=mesh.certs.sleep)
    assert productpage.status == 200
    assert (sleep.status, sleep.body) == (403, b"RBAC: access denied")
    assert sum(len(mesh.seen(v)) for v in VERSIONS) == 1


@pytest.fixture(scope="module")
def jwt_key() -> SigningKey:
    return make_key("RS256", kid="test-key")


async def test_jwt_request_authentication(mesh: Mesh, jwt_key: SigningKey) -> None:
    other_key = make_key("RS256", kid="test-key")  # same kid, another key: a forged token
    mesh.configure(
        request_authentications=[request_authentication("jwt", [{"issuer": ISSUER, "jwks": jwks(jwt_key)}])],
        authorization_policies=[authorization_policy(
            "require-jwt", "ALLOW", [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}]}])])
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "jason", "iat": now, "exp": now + 3600}
    good = await mesh.get("/reviews/0", [("authorization", f"Bearer {jwt_key.sign(claims)}")])
    bad = await mesh.get("/reviews/0", [("authorization", f"Bearer {other_key.sign(claims)}")])
    expired = await mesh.get("/reviews/0", [("authorization", f"Bearer {jwt_key.sign({**claims, 'exp': now - 600})}")])
    missing = await mesh.get("/reviews/0")
    assert good.status == 200
    assert "authorization" not in good.json["headers"], "the token is not forwarded (forwardOriginalToken false)"
    assert bad.status == 401 and bad.body == b"Jwt verification fails"
    assert expired.status == 401 and expired.body == b"Jwt is expired"
    assert (missing.status, missing.body) == (403, b"RBAC: access denied")
    assert sum(len(mesh.seen(v)) for v in VERSIONS) == 1


# -- mirroring -------------------------------------------------------------------------------------------
async def test_mirror_100_percent_to_v3(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([
        {"route": [destination("v2")], "mirror": {"host": "reviews", "subset": "v3"},
         "mirrorPercentage": {"value": 100.0}}])], destination_rules=[destination_rule()])
    replies = [await mesh.get(f"/reviews/{i}") for i in range(20)]
    assert versions(replies) == {"v2": 20}, "callers only see v2"
    copies = await eventually(lambda: len(mesh.seen("v3")) == 20 and mesh.seen("v3"), "20 copies at v3")
    assert {seen.host for seen in copies} == {"reviews-shadow:9080"}
    assert sorted(seen.path for seen in copies) == sorted(f"/reviews/{i}" for i in range(20))
    assert mesh.seen("v1") == []


# -- telemetry and admin ---------------------------------------------------------------------------------
async def test_requests_total_counts_exactly(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([only_to("v2")])], destination_rules=[destination_rule()])
    replies = await mesh.many(25)
    not_found = [await mesh.get("/status/404") for _ in range(3)]
    assert [r.status for r in replies] == [200] * 25 and [r.status for r in not_found] == [404] * 3
    labels = {"destination_workload": "reviews-v2", "destination_canonical_revision": "v2",
              "destination_service": HOST, "destination_service_name": "reviews",
              "destination_service_namespace": NS, "source_workload": "productpage-v1",
              "source_principal": str(PRODUCTPAGE_ID), "destination_principal": str(REVIEWS_ID),
              "connection_security_policy": "mutual_tls", "response_flags": "-"}
    await eventually(lambda: mesh.requests_total(response_code="200", **labels) == 25, "25 requests counted")
    await eventually(lambda: mesh.requests_total(response_code="404", **labels) == 3, "3 requests counted")
    assert mesh.requests_total() == 28


async def test_config_dump_is_json_and_lists_the_routes(mesh: Mesh) -> None:
    mesh.configure(virtual_services=[virtual_service([
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [destination("v3")]},
        only_to("v2")])], destination_rules=[destination_rule()])
    assert (await mesh.get("/reviews/0")).version == "v2"
    dump = json.loads(json.dumps(mesh.app.config_dump()))
    assert dump["waypoint"] == {"name": "waypoint", "namespace": NS, "identity": str(WAYPOINT_ID)}
    tables = dump["routes"]["route_tables"]
    assert f"{HOST}:{HTTP_PORT}" in tables, tables.keys()
    text = json.dumps(tables[f"{HOST}:{HTTP_PORT}"])
    assert "jason" in text and "to-v2" in text
    assert [vs["name"] for vs in dump["routes"]["virtual_services"]] == ["reviews"]
    assert any(c["name"] == f"outbound|{HTTP_PORT}|v2|{HOST}" for c in dump["clusters"]), dump["clusters"]
    assert dump["errors"] == []
    assert dump["services"] == 1 and dump["workloads"] == 4


async def test_request_body_reaches_the_app(mesh: Mesh) -> None:
    conn = await mesh.connection()
    try:
        payload = b"x" * 100_000
        response, body = await conn.request(RequestHead("POST", "/upload", AUTHORITY, Headers()),
                                            bytes_body(payload))
        data = json.loads(await read_body(body))
    finally:
        await conn.close()
    assert response.status == 200 and data["body"] == len(payload) and data["method"] == "POST"


def test_on_uvloop(certs: Certs) -> None:
    """The waypoint runs on uvloop when it is installed: relaying, routing and the TCP path work there too."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")

    async def main() -> None:
        async with running_mesh(certs) as mesh:
            mesh.configure(virtual_services=[virtual_service([only_to("v2")])], destination_rules=[destination_rule()])
            replies = await mesh.many(20)
            assert versions(replies) == {"v2": 20}
            stream = await mesh.tunnel(port=TCP_PORT)
            await stream.write(b"hello")
            stream.write_eof()
            received = b""
            while chunk := await stream.read():
                received += chunk
            assert received.endswith(b":hello")

    uvloop.run(main())
