"""ConfigIndex end to end: the Bookinfo traffic-management steps as route selections, precedence between
HTTPRoute and VirtualService and among several of each, subset cross-checks, namespaces, ports, and
DestinationRule lookup."""

from __future__ import annotations

import json
from typing import Any

import pytest

from waypoint.routing.model import (
    DEFAULT_INBOUND_RETRY_POLICY,
    Forward,
    LbAlgorithm,
    RouteTable,
    UnknownSubset,
)
from waypoint.routing.table import ConfigIndex

from .fixtures import (
    HTTPBIN,
    RATINGS,
    REVIEWS,
    backend,
    destination_rule,
    fields,
    head,
    http_route,
    lookup,
    to,
    virtual_service,
)


def index(vs: list[Any] = (), routes: list[Any] = (), drs: list[Any] = (),  # type: ignore[assignment]
          waypoint_namespace: str | None = "bookinfo") -> ConfigIndex:
    return ConfigIndex(vs, routes, drs, services=lookup, waypoint_namespace=waypoint_namespace,
                       waypoint_name="waypoint")


def target(table: RouteTable, **request: Any) -> list[tuple[str, int | None, str | None, int]]:
    """Where the selected route sends the request: (host, port, subset, weight) per destination."""
    route = table.select(head(**request), table.port)
    assert route is not None
    assert isinstance(route.action, Forward)
    return [(d.host, d.port, d.subset, d.weight) for d in route.action.destinations]


def test_no_configuration_routes_everything_to_the_service() -> None:
    table = index().routes_for(REVIEWS, 9080)
    assert table.source == "default"
    assert target(table, path="/anything", method="DELETE") == [(REVIEWS, 9080, None, 1)]
    route = table.routes[0]
    assert route.timeout is None and route.retries == DEFAULT_INBOUND_RETRY_POLICY


# --- the Bookinfo request-routing and traffic-shifting tasks -----------------------------------------

def test_all_traffic_to_v1() -> None:
    table = index([virtual_service([{"route": [to("reviews", "v1")]}])], drs=[destination_rule()]).routes_for(
        REVIEWS, 9080)
    assert table.source == "VirtualService"
    assert target(table) == [(REVIEWS, 9080, "v1", 1)]


def test_weighted_shift() -> None:
    vs = virtual_service([{"route": [to("reviews", "v1", 90), to("reviews", "v2", 10)]}])
    table = index([vs], drs=[destination_rule()]).routes_for(REVIEWS, 9080)
    assert target(table) == [(REVIEWS, 9080, "v1", 90), (REVIEWS, 9080, "v2", 10)]


def test_jason_gets_v3_everyone_else_v2() -> None:
    vs = virtual_service([
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to("reviews", "v3")]},
        {"route": [to("reviews", "v2")]},
    ])
    table = index([vs], drs=[destination_rule()]).routes_for(REVIEWS, 9080)
    assert target(table, headers=[("end-user", "jason")]) == [(REVIEWS, 9080, "v3", 1)]
    assert target(table, headers=[("end-user", "someone")]) == [(REVIEWS, 9080, "v2", 1)]
    assert target(table) == [(REVIEWS, 9080, "v2", 1)]


def test_routes_without_a_catch_all_leave_other_requests_unrouted() -> None:
    vs = virtual_service([{"match": [{"uri": {"prefix": "/reviews"}}], "route": [to("reviews", "v1")]}])
    table = index([vs], drs=[destination_rule()]).routes_for(REVIEWS, 9080)
    assert table.select(head("/health"), 9080) is None


# --- subset cross-checks -----------------------------------------------------------------------------

def test_unknown_subset_drops_that_route_only() -> None:
    vs = virtual_service([
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to("reviews", "v9")]},
        {"route": [to("reviews", "v1")]},
    ])
    config = index([vs], drs=[destination_rule()])
    assert [(e.kind, e.name, e.field, e.severity) for e in config.errors] == [
        ("VirtualService", "reviews", "spec.http[0].route[0].destination.subset", "error")]
    assert "'v9'" in config.errors[0].message and "v1, v2, v3" in config.errors[0].message
    table = config.routes_for(REVIEWS, 9080)
    assert len(table.routes) == 1
    assert target(table, headers=[("end-user", "jason")]) == [(REVIEWS, 9080, "v1", 1)]


def test_subset_without_any_destination_rule() -> None:
    config = index([virtual_service([{"route": [to("reviews", "v1")]}])])
    assert fields(config.errors) == ["spec.http[0].route[0].destination.subset"]
    assert "no DestinationRule applies" in config.errors[0].message
    assert config.routes_for(REVIEWS, 9080).source == "default"


def test_unknown_subset_in_a_split_drops_the_whole_route() -> None:
    vs = virtual_service([{"route": [to("reviews", "v1", 50), to("reviews", "v4", 50)]}, {"route": [to("reviews")]}])
    config = index([vs], drs=[destination_rule()])
    assert fields(config.errors) == ["spec.http[0].route[1].destination.subset"]
    assert target(config.routes_for(REVIEWS, 9080)) == [(REVIEWS, 9080, None, 1)]


def test_unknown_mirror_subset_drops_only_the_mirror() -> None:
    vs = virtual_service([{"route": [to("reviews", "v1")], "mirror": {"host": "reviews", "subset": "v7"}}])
    config = index([vs], drs=[destination_rule()])
    assert fields(config.errors) == ["spec.http[0].mirror.subset"]
    route = config.routes_for(REVIEWS, 9080).routes[0]
    assert route.mirrors == ()
    assert isinstance(route.action, Forward) and route.action.destinations[0].subset == "v1"


def test_mirror_to_v3() -> None:
    vs = virtual_service([{"route": [to("reviews", "v2")], "mirror": {"host": "reviews", "subset": "v3"},
                           "mirrorPercentage": {"value": 100}}])
    route = index([vs], drs=[destination_rule()]).routes_for(REVIEWS, 9080).routes[0]
    assert [(m.host, m.port, m.subset, m.percentage) for m in route.mirrors] == [(REVIEWS, 9080, "v3", 100.0)]


# --- precedence between resources --------------------------------------------------------------------

def test_httproute_wins_over_virtualservice_for_the_same_service() -> None:
    vs = virtual_service([{"route": [to("reviews", "v1")]}])
    route = http_route([{"backendRefs": [backend("ratings")]}])
    config = index([vs], [route], [destination_rule()])
    assert fields(config.errors, "warning") == ["spec.hosts[0]"]
    assert "HTTPRoute bookinfo/reviews also attaches" in config.errors[0].message
    table = config.routes_for(REVIEWS, 9080)
    assert table.source == "HTTPRoute"
    assert target(table) == [(RATINGS, 9080, None, 1)]


def test_port_bound_httproute_leaves_other_ports_to_the_virtualservice() -> None:
    vs = virtual_service([{"route": [to("httpbin.web.svc.cluster.local")]}], hosts=["httpbin"], namespace="web",
                         name="httpbin")
    route = http_route([{"backendRefs": [backend("ratings", namespace="bookinfo")]}], parent="httpbin",
                       namespace="web", name="httpbin", port=8000)
    config = index([vs], [route], waypoint_namespace="web")
    assert config.routes_for(HTTPBIN, 8000).source == "HTTPRoute"
    vs_table = config.routes_for(HTTPBIN, 8080)
    assert vs_table.source == "VirtualService"
    # a destination without a port on a multi-port service goes to the request's port
    assert target(vs_table) == [(HTTPBIN, 8080, None, 1)]


def test_httproutes_of_one_service_sort_by_gateway_api_precedence() -> None:
    older = http_route([{"matches": [{"path": {"value": "/"}}], "backendRefs": [backend("reviews")]},
                        {"matches": [{"path": {"value": "/api"}}], "backendRefs": [backend("reviews")]}],
                       name="older", created="2024-01-01T00:00:00Z")
    newer = http_route([{"matches": [{"path": {"type": "Exact", "value": "/api/v1"}}],
                         "backendRefs": [backend("ratings")]},
                        {"matches": [{"path": {"value": "/api"}, "headers": [{"name": "x", "value": "1"}]}],
                         "backendRefs": [backend("ratings")]},
                        {"matches": [{"path": {"value": "/api"}}], "backendRefs": [backend("ratings")]}],
                       name="newer", created="2024-06-01T00:00:00Z")
    table = index(routes=[newer, older]).routes_for(REVIEWS, 9080)
    assert [r.origin for r in table.routes] == [
        "HTTPRoute bookinfo/newer spec.rules[0].matches[0]",   # exact
        "HTTPRoute bookinfo/newer spec.rules[1].matches[0]",   # /api + a header
        "HTTPRoute bookinfo/older spec.rules[1].matches[0]",   # /api, older route first on a tie
        "HTTPRoute bookinfo/newer spec.rules[2].matches[0]",
        "HTTPRoute bookinfo/older spec.rules[0].matches[0]",   # /
    ]
    assert target(table, path="/api/v1") == [(RATINGS, 9080, None, 1)]
    assert target(table, path="/api/v2") == [(REVIEWS, 9080, None, 1)]
    assert target(table, path="/api/v2", headers=[("x", "1")]) == [(RATINGS, 9080, None, 1)]


def test_httproute_ties_on_creation_time_go_by_namespace_and_name() -> None:
    b = http_route([{"backendRefs": [backend("ratings")]}], name="b")
    a = http_route([{"backendRefs": [backend("reviews")]}], name="a")
    table = index(routes=[b, a]).routes_for(REVIEWS, 9080)
    assert [r.origin.split()[1] for r in table.routes] == ["bookinfo/a", "bookinfo/b"]


def test_attached_httproute_without_usable_rules_routes_nothing() -> None:
    route = http_route([{"matches": [{"path": {"type": "Exact", "value": "no-slash"}}], "backendRefs": [backend()]}])
    config = index(routes=[route])
    table = config.routes_for(REVIEWS, 9080)
    assert table.source == "HTTPRoute" and table.routes == ()
    assert table.select(head(), 9080) is None


def test_several_virtualservices_merge_oldest_first() -> None:
    newer = virtual_service([{"route": [to("reviews", "v2")]}], name="newer", created="2024-06-01T00:00:00Z")
    older = virtual_service([{"match": [{"uri": {"prefix": "/old"}}], "route": [to("reviews", "v1")]}], name="older",
                            created="2024-01-01T00:00:00Z")
    config = index([newer, older], drs=[destination_rule()])
    assert [(e.name, e.field, e.severity) for e in config.errors] == [("newer", "spec.hosts[0]", "warning")]
    table = config.routes_for(REVIEWS, 9080)
    assert target(table, path="/old/x") == [(REVIEWS, 9080, "v1", 1)]
    assert target(table, path="/new") == [(REVIEWS, 9080, "v2", 1)]


def test_wildcard_virtualservice_covers_every_matching_service() -> None:
    vs = virtual_service([{"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}},
                           "route": [to("ratings")]}], hosts=["*.bookinfo.svc.cluster.local"], name="all")
    config = index([vs])
    assert config.routes_for(REVIEWS, 9080).source == "VirtualService"
    assert config.routes_for(RATINGS, 9080).source == "VirtualService"
    assert config.routes_for(HTTPBIN, 8000).source == "default"


def test_vip_host() -> None:
    config = index([virtual_service([{"route": [to("ratings")]}], hosts=["10.96.0.20"])])
    assert target(config.routes_for(REVIEWS, 9080)) == [(RATINGS, 9080, None, 1)]


def test_virtualservice_with_only_bad_routes_leaves_the_default() -> None:
    config = index([virtual_service([{"route": [to("reviews", "v1", -1), to("reviews", "v2", 101)]}])])
    assert fields(config.errors) == ["spec.http[0].route[0].weight"]
    assert config.routes_for(REVIEWS, 9080).source == "default"


def test_gateway_bound_virtualservice_leaves_the_default() -> None:
    config = index([virtual_service([{"route": [to("reviews", "v1")]}], gateways=["bookinfo-gateway"])])
    assert config.routes_for(REVIEWS, 9080).source == "default"


def test_match_ports_select_per_service_port() -> None:
    vs = virtual_service([{"match": [{"port": 8000}], "route": [to("ratings")]},
                          {"route": [to("reviews", port=9080)]}], hosts=["httpbin.web.svc.cluster.local"])
    config = index([vs], waypoint_namespace=None)
    assert target(config.routes_for(HTTPBIN, 8000)) == [(RATINGS, 9080, None, 1)]
    assert target(config.routes_for(HTTPBIN, 8080)) == [(REVIEWS, 9080, None, 1)]


# --- namespaces --------------------------------------------------------------------------------------

def test_routes_from_a_third_namespace_are_ignored() -> None:
    vs = virtual_service([{"route": [to("ratings.bookinfo.svc.cluster.local")]}],
                         hosts=["reviews.bookinfo.svc.cluster.local"], namespace="team-b", name="steal")
    config = index([vs])
    assert [(e.namespace, e.field, e.severity) for e in config.errors] == [("team-b", "spec.hosts[0]", "warning")]
    assert config.routes_for(REVIEWS, 9080).source == "default"


def test_routes_from_the_waypoints_namespace_apply_to_other_namespaces() -> None:
    vs = virtual_service([{"route": [to("reviews")]}], hosts=["httpbin.web.svc.cluster.local"], name="x")
    config = index([vs], waypoint_namespace="bookinfo")
    assert config.errors == []
    assert target(config.routes_for(HTTPBIN, 8000)) == [(REVIEWS, 9080, None, 1)]


def test_consumer_httproute_from_a_third_namespace_is_ignored() -> None:
    route = http_route([{"backendRefs": [backend("ratings", namespace="bookinfo")]}], namespace="team-b",
                       name="consumer")
    route["spec"]["parentRefs"][0]["namespace"] = "bookinfo"
    config = index(routes=[route])
    assert fields(config.errors, "warning") == ["spec.parentRefs[0]"]
    assert config.routes_for(REVIEWS, 9080).source == "default"


# --- DestinationRule lookup --------------------------------------------------------------------------

def test_policy_for_merges_subset_and_port() -> None:
    dr = destination_rule(trafficPolicy={
        "loadBalancer": {"simple": "RANDOM"},
        "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}},
        "outlierDetection": {"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "3m",
                             "maxEjectionPercent": 100}})
    dr["spec"]["subsets"][1]["trafficPolicy"] = {"loadBalancer": {"simple": "ROUND_ROBIN"}}
    config = index(drs=[dr])
    v1 = config.policy_for(REVIEWS, "v1", 9080)
    assert v1.lb.simple is LbAlgorithm.RANDOM
    assert v1.subset is not None and v1.subset.labels == {"version": "v1"}
    assert v1.connection_pool.max_connections == 1
    assert v1.outlier is not None and v1.outlier.base_ejection_time == 180.0
    v2 = config.policy_for(REVIEWS, "v2", 9080)
    assert v2.lb.simple is LbAlgorithm.ROUND_ROBIN
    assert v2.connection_pool.http1_max_pending_requests == 1
    assert config.policy_for(REVIEWS, None, 9080).subset is None


def test_policy_for_without_rules_and_unknown_subsets() -> None:
    config = index(drs=[destination_rule()])
    plain = config.policy_for(RATINGS, None, 9080)
    assert plain.host == RATINGS and plain.lb.simple is LbAlgorithm.LEAST_REQUEST and plain.outlier is None
    with pytest.raises(UnknownSubset):
        config.policy_for(REVIEWS, "v9", 9080)
    with pytest.raises(UnknownSubset):
        config.policy_for(RATINGS, "v1", 9080)


@pytest.mark.parametrize(("rules", "winner"), [
    # the waypoint's namespace first, then the service's, then the root namespace
    ([("root", "istio-system", "reviews.bookinfo.svc.cluster.local"), ("svc", "bookinfo", "reviews")], "svc"),
    ([("root", "istio-system", "*.svc.cluster.local")], "root"),
    # within a namespace, the exact host beats wildcards, and the longest wildcard beats shorter ones
    ([("wide", "bookinfo", "*.svc.cluster.local"), ("narrow", "bookinfo", "*.bookinfo.svc.cluster.local")], "narrow"),
    ([("wild", "bookinfo", "*.bookinfo.svc.cluster.local"), ("exact", "bookinfo", "reviews")], "exact"),
    # a rule in an unrelated namespace does not apply
    ([("other", "team-b", "reviews.bookinfo.svc.cluster.local")], None),
])
def test_destination_rule_lookup_order(rules: list[tuple[str, str, str]], winner: str | None) -> None:
    drs = [destination_rule(host, subsets=(name,), name=name, namespace=namespace) for name, namespace, host in rules]
    config = index(drs=drs, waypoint_namespace="mesh-waypoints")
    policy = config.policy_for(REVIEWS, None, 9080)
    assert list(policy.subsets) == ([winner] if winner else [])
    assert policy.host == REVIEWS


def test_waypoint_namespace_rules_come_first() -> None:
    drs = [destination_rule("reviews.bookinfo.svc.cluster.local", subsets=("mine",), name="mine",
                            namespace="mesh-waypoints"),
           destination_rule("reviews", subsets=("svc",), name="svc")]
    assert list(index(drs=drs, waypoint_namespace="mesh-waypoints").policy_for(REVIEWS, None, 9080).subsets) == \
        ["mine"]


def test_rules_for_one_host_merge_subsets() -> None:
    drs = [destination_rule(subsets=("v1",), name="a", created="2024-01-01T00:00:00Z"),
           destination_rule(subsets=("v2",), name="b", created="2024-02-01T00:00:00Z")]
    config = index([virtual_service([{"route": [to("reviews", "v2")]}])], drs=drs)
    assert config.errors == []
    assert sorted(config.policy_for(REVIEWS, None, 9080).subsets) == ["v1", "v2"]


# --- reporting ---------------------------------------------------------------------------------------

def test_errors_are_collected_from_every_kind() -> None:
    config = index([virtual_service([{"timeout": "x", "route": [to()]}])],
                   [http_route([{"backendRefs": [backend(weight=-1)]}], parent="ratings", name="ratings")],
                   [destination_rule(trafficPolicy={"loadBalancer": {"simple": "NOPE"}})])
    assert sorted((e.kind, e.field) for e in config.errors) == [
        ("DestinationRule", "spec.trafficPolicy.loadBalancer.simple"),
        ("HTTPRoute", "spec.rules[0].backendRefs[0].weight"),
        ("VirtualService", "spec.http[0].timeout"),
    ]


def test_tables_are_memoized_and_dump_is_json() -> None:
    config = index([virtual_service([{"route": [to("reviews", "v1")]}])], drs=[destination_rule()])
    assert config.routes_for(REVIEWS, 9080) is config.routes_for(REVIEWS, 9080)
    text = json.dumps(config.dump())
    assert '"reviews.bookinfo.svc.cluster.local:9080"' in text
    assert '"subset": "v1"' in text
