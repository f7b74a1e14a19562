"""The compiled model's own behaviour: durations and percentages as users write them, header edits in
Envoy's order, weighted choice, fault/mirror sampling, Istio's DestinationRule layer merging."""

from __future__ import annotations

import collections
import json
import random

import pytest

from waypoint.http.message import Headers
from waypoint.routing.model import (
    DEFAULT_CONNECTION_POOL,
    DEFAULT_LOAD_BALANCER,
    ConnectionPoolSettings,
    DestinationPolicy,
    Fault,
    FaultAbort,
    FaultDelay,
    Forward,
    HeaderOps,
    Invalid,
    LbAlgorithm,
    LoadBalancer,
    Mirror,
    OutlierSettings,
    Subset,
    TrafficPolicy,
    UnknownSubset,
    WeightedDestination,
    dump,
    fqdn,
    host_matches,
    parse_duration,
    parse_istio_duration,
    parse_percent,
)
from waypoint.routing.virtualservice import compile_virtual_service

from .fixtures import Dice, lookup, virtual_service


@pytest.mark.parametrize(("text", "seconds"), [
    ("1.5s", 1.5), ("200ms", 0.2), ("1m", 60.0), ("1h", 3600.0), ("1h30m", 5400.0), ("0", 0.0), ("0s", 0.0),
    ("10us", 10e-6), ("2m0.5s", 120.5), (".5s", 0.5),
])
def test_durations_parse_as_kubernetes_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text, "spec.x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1.5", "s", "1x", "-1s", "1s ", "1 s", "1s2", 5, None])
def test_bad_durations_name_the_field(text: object) -> None:
    with pytest.raises(Invalid) as caught:
        parse_duration(text, "spec.http[0].timeout")
    assert caught.value.field == "spec.http[0].timeout"


@pytest.mark.parametrize(("text", "problem"), [("0s", "at least 1ms"), ("100us", "at least 1ms"),
                                               ("1.0005s", "whole milliseconds")])
def test_istio_durations_need_whole_milliseconds(text: str, problem: str) -> None:
    with pytest.raises(Invalid, match=problem):
        parse_istio_duration(text, "f")


@pytest.mark.parametrize(("value", "expected"), [({"value": 10}, 10.0), ({"value": 0.5}, 0.5), ({"value": 100}, 100.0),
                                                 ({}, 0.0)])
def test_percentages(value: object, expected: float) -> None:
    assert parse_percent(value, "p") == expected


@pytest.mark.parametrize("value", [{"value": 101}, {"value": -1}, {"value": "10"}, 10, {"value": 1, "x": 2},
                                   {"value": True}])
def test_bad_percentages(value: object) -> None:
    with pytest.raises(Invalid):
        parse_percent(value, "p")


@pytest.mark.parametrize(("host", "namespace", "expected"), [
    ("reviews", "bookinfo", "reviews.bookinfo.svc.cluster.local"),
    ("Reviews", "bookinfo", "reviews.bookinfo.svc.cluster.local"),
    ("reviews.bookinfo.svc.cluster.local", "other", "reviews.bookinfo.svc.cluster.local"),
    ("reviews.bookinfo", "other", "reviews.bookinfo"),  # Istio expands only names without dots
    ("*.bookinfo.svc.cluster.local", "x", "*.bookinfo.svc.cluster.local"),
    ("10.96.0.20", "x", "10.96.0.20"),
])
def test_short_names_resolve_in_the_rules_namespace(host: str, namespace: str, expected: str) -> None:
    assert fqdn(host, namespace, "cluster.local") == expected


@pytest.mark.parametrize(("pattern", "hostname", "expected"), [
    ("*", "a.b", True),
    ("*.bookinfo.svc.cluster.local", "reviews.bookinfo.svc.cluster.local", True),
    ("*.svc.cluster.local", "reviews.bookinfo.svc.cluster.local", True),
    ("*.bookinfo.svc.cluster.local", "bookinfo.svc.cluster.local", False),
    ("reviews.bookinfo.svc.cluster.local", "reviews.bookinfo.svc.cluster.local", True),
    ("reviews.bookinfo.svc.cluster.local", "ratings.bookinfo.svc.cluster.local", False),
])
def test_host_matching(pattern: str, hostname: str, expected: bool) -> None:
    assert host_matches(pattern, hostname) is expected


def test_header_ops_remove_then_set_then_add() -> None:
    headers = Headers([("x-a", "1"), ("x-a", "2"), ("x-b", "keep"), ("x-gone", "z")])
    HeaderOps(set=(("x-a", "set"), ("x-new", "n")), add=(("x-b", "more"),), remove=("x-gone", "x-b")).apply(headers)
    assert list(headers) == [("x-a", "set"), ("x-new", "n"), ("x-b", "more")]


def test_header_ops_merge_keeps_route_ops_first() -> None:
    route = HeaderOps(set=(("a", "1"),))
    destination = HeaderOps(set=(("a", "2"),), remove=("b",))
    merged = route.merged(destination)
    headers = Headers([("b", "x")])
    merged.apply(headers)
    assert list(headers) == [("a", "2")]
    assert route.merged(HeaderOps()) is route
    assert HeaderOps().merged(destination) is destination


def test_weighted_choice_follows_weights() -> None:
    forward = Forward((WeightedDestination("a", weight=90), WeightedDestination("b", weight=10)))
    assert forward.total_weight == 100
    assert forward.choose(0.0).host == "a"
    assert forward.choose(0.8999).host == "a"
    assert forward.choose(0.9).host == "b"
    assert forward.choose(0.99999).host == "b"
    rng = random.Random(7)
    counts = collections.Counter(forward.choose(rng.random()).host for _ in range(20_000))
    assert counts["b"] / 20_000 == pytest.approx(0.10, abs=0.01)


def test_weights_need_not_sum_to_100() -> None:
    forward = Forward((WeightedDestination("a", weight=1), WeightedDestination("b", weight=3)))
    assert [forward.choose(x / 4).host for x in range(4)] == ["a", "b", "b", "b"]


def test_faults_and_mirrors_sample_their_percentage() -> None:
    fault = Fault(FaultDelay(5.0, 10.0), FaultAbort(500, 20.0))
    assert fault.delay_for(Dice(0.05)) == 5.0
    assert fault.delay_for(Dice(0.10)) == 0.0
    assert fault.abort_for(Dice(0.19)) == FaultAbort(500, 20.0)
    assert fault.abort_for(Dice(0.20)) is None
    assert Fault(abort=FaultAbort(503, 100.0)).abort_for(Dice()) is not None  # 100% draws nothing
    assert Fault(delay=FaultDelay(1.0, 0.0)).delay_for(Dice()) == 0.0
    assert Mirror("m", percentage=100.0).sample(Dice())
    assert not Mirror("m", percentage=0.0).sample(Dice())
    assert Mirror("m", percentage=50.0).sample(Dice(0.49))


POOL_TOP = ConnectionPoolSettings(max_connections=100)
POOL_PORT = ConnectionPoolSettings(max_connections=10)
POOL_SUBSET = ConnectionPoolSettings(max_connections=5)
POOL_SUBSET_PORT = ConnectionPoolSettings(max_connections=1)
OUTLIER = OutlierSettings(consecutive_5xx=3)
RANDOM = LoadBalancer(LbAlgorithm.RANDOM)
ROUND_ROBIN = LoadBalancer(LbAlgorithm.ROUND_ROBIN)

POLICY = DestinationPolicy(
    "reviews",
    top=TrafficPolicy(lb=RANDOM, connection_pool=POOL_TOP, outlier=OUTLIER,
                      port_overrides={9080: TrafficPolicy(connection_pool=POOL_PORT)}),
    subsets={
        "v1": Subset("v1", {"version": "v1"}),
        "v2": Subset("v2", {"version": "v2"}, TrafficPolicy(connection_pool=POOL_SUBSET)),
        "v3": Subset("v3", {"version": "v3"}, TrafficPolicy(
            lb=ROUND_ROBIN, port_overrides={9080: TrafficPolicy(connection_pool=POOL_SUBSET_PORT)})),
    },
)


@pytest.mark.parametrize(("subset", "port", "lb", "pool", "outlier"), [
    # top-level only
    (None, 8080, RANDOM, POOL_TOP, OUTLIER),
    # the top-level port entry replaces the top level wholesale: unset fields fall back to defaults
    (None, 9080, DEFAULT_LOAD_BALANCER, POOL_PORT, None),
    # a subset without policy inherits
    ("v1", 8080, RANDOM, POOL_TOP, OUTLIER),
    ("v1", 9080, DEFAULT_LOAD_BALANCER, POOL_PORT, None),
    # a subset policy overrides what it sets, field by field
    ("v2", 8080, RANDOM, POOL_SUBSET, OUTLIER),
    ("v2", 9080, DEFAULT_LOAD_BALANCER, POOL_SUBSET, None),
    # a subset's port entry replaces everything (Istio's hasPortLevel)
    ("v3", 8080, ROUND_ROBIN, POOL_TOP, OUTLIER),
    ("v3", 9080, DEFAULT_LOAD_BALANCER, POOL_SUBSET_PORT, None),
])
def test_policy_layers_merge_like_istio(subset: str | None, port: int, lb: LoadBalancer,
                                        pool: ConnectionPoolSettings, outlier: OutlierSettings | None) -> None:
    resolved = POLICY.resolve(subset, port)
    assert (resolved.lb, resolved.connection_pool, resolved.outlier) == (lb, pool, outlier)
    assert resolved.subset == (POLICY.subsets[subset] if subset else None)


def test_resolving_an_unknown_subset_raises() -> None:
    with pytest.raises(UnknownSubset) as caught:
        POLICY.resolve("v9", 9080)
    assert caught.value.reason == "unknown_subset"


def test_no_policy_means_istio_defaults() -> None:
    resolved = DestinationPolicy("x").resolve(None, 80)
    assert resolved.lb.simple is LbAlgorithm.LEAST_REQUEST
    assert resolved.connection_pool == DEFAULT_CONNECTION_POOL
    assert resolved.connection_pool.connect_timeout == 10.0
    assert resolved.connection_pool.max_connections is None
    assert resolved.outlier is None


def test_subset_selects_pods_by_labels() -> None:
    v2 = Subset("v2", {"version": "v2", "app": "reviews"})
    assert v2.selects({"app": "reviews", "version": "v2", "pod-template-hash": "x"})
    assert not v2.selects({"app": "reviews", "version": "v1"})
    assert Subset("all", {}).selects({"anything": "at all"})


def test_dump_is_json_ready() -> None:
    vs = virtual_service([{"match": [{"uri": {"regex": "/a.*"}}], "route": [{"destination": {"host": "reviews"}}],
                           "retries": {"attempts": 3, "retryOn": "5xx,503"}}])
    compiled = compile_virtual_service(vs, lookup)
    text = json.dumps(dump(compiled.routes[0].route))
    assert '"/a.*"' in text
    assert '"retriable_status_codes": [503]' in text
    assert "test" not in json.loads(text)["matches"][0]["path"]
    assert json.dumps(dump(POLICY))
