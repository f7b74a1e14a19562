"""Load balancers: measured distributions with a seeded RNG, retries avoiding tried endpoints, hash keys."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest

from waypoint.routing.model import ConsistentHash, HashCookie, LbAlgorithm, LoadBalancer
from waypoint.upstream.endpoints import Endpoint
from waypoint.upstream.lb import (
    DEFAULT_MINIMUM_RING_SIZE,
    HashKey,
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    hash_key,
    make_balancer,
)


def endpoint(name: str) -> Endpoint:
    return Endpoint(uid=f"Kubernetes//Pod/default/{name}", ip="10.0.0.1", target_port=9080,
                    identity="spiffe://cluster.local/ns/default/sa/reviews", labels=MappingProxyType({}),
                    healthy=True, node="n1", hbone=True)


PODS = [endpoint(f"reviews-{i}") for i in range(4)]


class FakeHeaders:
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = [(k.lower(), v) for k, v in items]

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._items if k == name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_all(name)
        return values[0] if values else default


@dataclass
class Head:
    path: str = "/"
    headers: FakeHeaders = field(default_factory=lambda: FakeHeaders([]))
    authority: str = "reviews:9080"
    method: str = "GET"
    scheme: str = "http"


def rng() -> random.Random:
    return random.Random(1234)


# --- policy selection ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "kind"), [
    (None, LeastRequestBalancer),
    (LoadBalancer(), LeastRequestBalancer),  # Istio's default (unset, UNSPECIFIED, LEAST_CONN parse to it)
    (LoadBalancer(LbAlgorithm.LEAST_REQUEST), LeastRequestBalancer),
    (LoadBalancer(LbAlgorithm.ROUND_ROBIN), RoundRobinBalancer),
    (LoadBalancer(LbAlgorithm.RANDOM), RandomBalancer),
    (LoadBalancer(LbAlgorithm.PASSTHROUGH), LeastRequestBalancer),  # not implemented: the default
    (LoadBalancer(consistent_hash=ConsistentHash(use_source_ip=True)), RingHashBalancer),
])
def test_make_balancer_follows_the_destination_rule(settings: LoadBalancer | None, kind: type) -> None:
    assert type(make_balancer(settings, rng=rng())) is kind


def test_every_balancer_returns_none_without_endpoints() -> None:
    for settings in (LoadBalancer(LbAlgorithm.ROUND_ROBIN), LoadBalancer(LbAlgorithm.RANDOM), None,
                     LoadBalancer(consistent_hash=ConsistentHash(header="x"))):
        assert make_balancer(settings, rng=rng()).pick([]) is None


# --- round robin ---------------------------------------------------------------------------------------

def test_round_robin_is_an_exact_rotation() -> None:
    balancer = make_balancer(LoadBalancer(LbAlgorithm.ROUND_ROBIN), rng=rng())
    picks = [balancer.pick(PODS) for _ in range(400)]
    assert Counter(p.uid for p in picks if p) == {p.uid: 100 for p in PODS}
    for start in range(0, 400, 4):
        assert len({p.uid for p in picks[start:start + 4] if p}) == 4


def test_round_robin_start_differs_between_waypoints() -> None:
    policy = LoadBalancer(LbAlgorithm.ROUND_ROBIN)
    starts = {make_balancer(policy, rng=random.Random(seed)).pick(PODS) for seed in range(20)}
    assert len(starts) > 1


# --- random --------------------------------------------------------------------------------------------

def test_random_is_uniform_within_tolerance() -> None:
    balancer = make_balancer(LoadBalancer(LbAlgorithm.RANDOM), rng=rng())
    counts = Counter(p.uid for p in (balancer.pick(PODS) for _ in range(10_000)) if p)
    assert all(abs(n - 2500) < 150 for n in counts.values()), counts


# --- least request -------------------------------------------------------------------------------------

def test_least_request_never_picks_the_busy_endpoint_while_an_idle_one_is_sampled() -> None:
    balancer = make_balancer(None, rng=rng())
    busy, idle = PODS[0], PODS[1]
    for _ in range(5):
        balancer.started(busy)
    assert Counter(p.uid for p in (balancer.pick([busy, idle]) for _ in range(1000)) if p) == {idle.uid: 1000}
    # With three endpoints any pair holds an idle one: the busy endpoint gets nothing.
    three = PODS[:3]
    counts = Counter(p.uid for p in (balancer.pick(three) for _ in range(3000)) if p)
    assert busy.uid not in counts and all(n > 1200 for n in counts.values())


def test_least_request_spreads_in_flight_requests_evenly() -> None:
    balancer = make_balancer(LoadBalancer(LbAlgorithm.LEAST_REQUEST), rng=rng())
    for _ in range(400):
        chosen = balancer.pick(PODS)
        assert chosen is not None
        balancer.started(chosen)
    loads = [balancer.active(p.uid) for p in PODS]
    assert sum(loads) == 400 and max(loads) - min(loads) <= 3, loads


def test_finished_requests_are_no_longer_counted() -> None:
    balancer = make_balancer(None, rng=rng())
    balancer.started(PODS[0])
    balancer.started(PODS[0])
    balancer.finished(PODS[0])
    assert balancer.active(PODS[0].uid) == 1
    balancer.finished(PODS[0])
    balancer.finished(PODS[0])   # an extra finish never goes negative
    assert balancer.active(PODS[0].uid) == 0
    assert balancer.describe() == {"policy": "LEAST_REQUEST", "active_requests": {}}


# --- retries prefer other endpoints --------------------------------------------------------------------

@pytest.mark.parametrize("simple", [LbAlgorithm.ROUND_ROBIN, LbAlgorithm.RANDOM, LbAlgorithm.LEAST_REQUEST])
def test_retries_avoid_tried_endpoints_while_others_remain(simple: LbAlgorithm) -> None:
    balancer = make_balancer(LoadBalancer(simple), rng=rng())
    tried = {PODS[0].uid, PODS[1].uid}
    assert {p.uid for p in (balancer.pick(PODS, exclude=tried) for _ in range(200)) if p} == \
        {PODS[2].uid, PODS[3].uid}
    assert balancer.retries_prefer_other_hosts
    # Everything tried: pick anyway rather than fail the request.
    assert balancer.pick(PODS[:2], exclude=tried) in PODS[:2]


# --- ring hash -----------------------------------------------------------------------------------------

def ring() -> RingHashBalancer:
    balancer = make_balancer(LoadBalancer(consistent_hash=ConsistentHash(header="x-user")), rng=rng())
    assert isinstance(balancer, RingHashBalancer)
    return balancer


def keys(count: int) -> list[HashKey]:
    settings = LoadBalancer(consistent_hash=ConsistentHash(header="x-user"))
    found = [hash_key(settings, Head(headers=FakeHeaders([("x-user", f"user-{i}")])), None) for i in range(count)]
    return [k for k in found if k is not None]


def test_ring_hash_same_key_same_endpoint_across_balancers() -> None:
    one, other = ring(), RingHashBalancer(random.Random(99))
    for key in keys(500):
        first = one.pick(PODS, key)
        assert one.pick(PODS, key) == first == other.pick(list(reversed(PODS)), key)


def test_ring_hash_spreads_keys_evenly() -> None:
    balancer = ring()
    counts = Counter(p.uid for p in (balancer.pick(PODS, k) for k in keys(10_000)) if p)
    assert all(2000 < n < 3000 for n in counts.values()), counts


def test_ring_hash_removing_one_of_four_moves_only_its_keys() -> None:
    balancer = ring()
    all_keys = keys(10_000)
    before = {k: balancer.pick(PODS, k) for k in all_keys}
    removed = PODS[2]
    after = {k: balancer.pick([p for p in PODS if p != removed], k) for k in all_keys}
    moved = [k for k in all_keys if before[k] != after[k]]
    assert all(before[k] == removed for k in moved)        # only the removed endpoint's keys move
    assert 0.20 < len(moved) / len(all_keys) < 0.30          # ~1/4
    # Adding it back restores every key to where it was.
    assert {k: balancer.pick(PODS, k) for k in all_keys} == before


def test_ring_hash_without_a_key_picks_a_random_endpoint() -> None:
    balancer = ring()
    assert len({balancer.pick(PODS, None) for _ in range(200)}) == 4


def test_ring_hash_exclude_walks_to_the_next_endpoint() -> None:
    balancer = ring()
    assert not balancer.retries_prefer_other_hosts
    for key in keys(200):
        hashed = balancer.pick(PODS, key)
        assert hashed is not None
        retry = balancer.pick(PODS, key, exclude={hashed.uid})
        assert retry is not None and retry != hashed
        # the same as if the tried endpoint had left the ring
        assert retry == balancer.pick([p for p in PODS if p != hashed], key)


def test_ring_size_is_virtual_nodes_per_endpoint() -> None:
    balancer = RingHashBalancer(rng(), 64)
    balancer.pick(PODS, HashKey(1))
    assert balancer.describe()["ring_size"] == 4 * 64
    default = ring()
    default.pick(PODS, HashKey(1))
    assert default.describe()["ring_size"] == 4 * DEFAULT_MINIMUM_RING_SIZE


# --- hash keys -----------------------------------------------------------------------------------------

def settings_with(**kwargs: object) -> LoadBalancer:
    return LoadBalancer(consistent_hash=ConsistentHash(**kwargs))  # type: ignore[arg-type]


def test_no_hash_key_without_consistent_hash() -> None:
    assert hash_key(None, Head(), "10.0.0.9") is None
    assert hash_key(LoadBalancer(LbAlgorithm.ROUND_ROBIN), Head(), "10.0.0.9") is None


def test_header_key_is_case_insensitive_and_absent_header_gives_none() -> None:
    settings = settings_with(header="X-User")
    jason = hash_key(settings, Head(headers=FakeHeaders([("x-user", "jason")])), None)
    assert jason == hash_key(settings, Head(headers=FakeHeaders([("X-USER", "jason")])), "10.1.1.1")
    assert jason != hash_key(settings, Head(headers=FakeHeaders([("x-user", "bob")])), None)
    assert hash_key(settings, Head(), None) is None
    host = settings_with(header="host")
    assert hash_key(host, Head(authority="a"), None) != hash_key(host, Head(authority="b"), None)


def test_source_ip_key() -> None:
    settings = settings_with(use_source_ip=True)
    assert hash_key(settings, Head(), "10.0.0.1") == hash_key(settings, Head(path="/x"), "10.0.0.1")
    assert hash_key(settings, Head(), "10.0.0.1") != hash_key(settings, Head(), "10.0.0.2")
    assert hash_key(settings, Head(), None) is None


def test_query_parameter_key() -> None:
    settings = settings_with(query_parameter="u")
    one = hash_key(settings, Head(path="/p?a=1&u=jason"), None)
    assert one is not None and one == hash_key(settings, Head(path="/q?u=jason"), None)
    assert hash_key(settings, Head(path="/p?a=1"), None) is None
    assert hash_key(settings, Head(path="/p"), None) is None


def test_cookie_key_present_quoted_or_not() -> None:
    settings = settings_with(cookie=HashCookie("session", ttl=60))
    plain = hash_key(settings, Head(headers=FakeHeaders([("cookie", "a=1; session=abc")])), None)
    quoted = hash_key(settings, Head(headers=FakeHeaders([("cookie", "a=1"), ("cookie", 'session="abc"')])), None)
    assert plain is not None and plain == quoted
    assert plain.set_cookie is None


def test_missing_cookie_with_ttl_is_generated_and_routes_like_the_returned_cookie() -> None:
    settings = settings_with(cookie=HashCookie("session", path="/", ttl=3600))
    generated = hash_key(settings, Head(), None, rng=random.Random(7))
    assert generated is not None and generated.set_cookie is not None
    name_value, *attributes = generated.set_cookie.split("; ")
    assert attributes == ["Max-Age=3600", "Path=/", "HttpOnly"]
    assert name_value.startswith('session="') and name_value.endswith('"')
    returned = hash_key(settings, Head(headers=FakeHeaders([("cookie", name_value)])), None)
    assert returned is not None and returned.value == generated.value
    balancer = ring()
    assert balancer.pick(PODS, generated) == balancer.pick(PODS, returned)


def test_missing_cookie_without_ttl_gives_no_key_and_ttl_zero_is_a_session_cookie() -> None:
    assert hash_key(settings_with(cookie=HashCookie("session")), Head(), None) is None
    session = hash_key(settings_with(cookie=HashCookie("session", ttl=0)), Head(), None, rng=random.Random(1))
    assert session is not None and session.set_cookie is not None
    assert "Max-Age" not in session.set_cookie and "Path" not in session.set_cookie
