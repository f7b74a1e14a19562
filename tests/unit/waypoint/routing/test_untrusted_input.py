"""CRDs are user input: whatever shape they have, compiling never raises, and a ConfigIndex built from
them still answers routes_for/policy_for. Hypothesis replaces parts of realistic objects with arbitrary
JSON values."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from waypoint.routing.destinationrule import compile_destination_rule
from waypoint.routing.httproute import compile_http_route
from waypoint.routing.table import ConfigIndex
from waypoint.routing.virtualservice import compile_virtual_service

from .fixtures import REVIEWS, backend, destination_rule, head, http_route, lookup, to, virtual_service

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70000) | st.floats(allow_nan=True) |
    st.sampled_from(["", "*", "/", "v1", "reviews", "5s", "(", "GET", "Exact", "PathPrefix", "RegularExpression",
                     "10.96.0.20", "mesh", "RequestRedirect", "URLRewrite", "ReplacePrefixMatch", "RANDOM"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["value", "exact", "prefix", "regex", "name", "type", "number", "host", "subset", "port",
                         "weight", "percentage", "attempts", "simple", "labels", "path"]), children, max_size=3),
    max_leaves=8,
)

VS = virtual_service([
    {"match": [{"uri": {"prefix": "/a"}, "headers": {"end-user": {"exact": "jason"}}, "queryParams": {"q": {}}}],
     "route": [to("reviews", "v1", 50), to("reviews", "v2", 50)], "timeout": "1s",
     "retries": {"attempts": 2, "perTryTimeout": "1s", "retryOn": "5xx"},
     "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 5}}, "abort": {"httpStatus": 500}},
     "mirror": {"host": "reviews", "subset": "v3"}, "mirrorPercentage": {"value": 1},
     "headers": {"request": {"set": {"x": "1"}}}, "rewrite": {"uri": "/b"}},
    {"redirect": {"uri": "/x", "redirectCode": 302}},
    {"directResponse": {"status": 503, "body": {"string": "x"}}},
])
ROUTE = http_route([
    {"matches": [{"path": {"type": "PathPrefix", "value": "/a"}, "headers": [{"name": "x", "value": "1"}],
                  "queryParams": [{"name": "q", "value": "1"}], "method": "GET"}],
     "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": "1"}]}},
                 {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                                                "replacePrefixMatch": "/b"}}},
                 {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "ratings", "port": 9080}}}],
     "backendRefs": [backend(weight=1), backend("ratings", weight=2)], "timeouts": {"request": "2s"}},
], port=9080)
DR = destination_rule(trafficPolicy={
    "loadBalancer": {"consistentHash": {"httpCookie": {"name": "u", "ttl": "1s"}}},
    "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}},
    "outlierDetection": {"consecutive5xxErrors": 1, "interval": "1s"},
    "portLevelSettings": [{"port": {"number": 9080}, "loadBalancer": {"simple": "RANDOM"}}]})


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location inside a JSON-like value."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += paths(item, (*prefix, i))
    return out


def replaced(obj: dict[str, Any], where: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    if not where:
        return value if isinstance(value, dict) else out
    parent = out
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    obj = base
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(obj)))
        obj = replaced(obj, where, draw(JSON))
    return obj


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated(VS))
def test_virtual_service_never_raises(obj: dict[str, Any]) -> None:
    compiled = compile_virtual_service(obj, lookup)
    assert all(error.field is not None for error in compiled.errors)


@FUZZ
@given(mutated(ROUTE))
def test_http_route_never_raises(obj: dict[str, Any]) -> None:
    compile_http_route(obj, lookup)


@FUZZ
@given(mutated(DR))
def test_destination_rule_never_raises(obj: dict[str, Any]) -> None:
    compile_destination_rule(obj)


@FUZZ
@given(mutated(VS), mutated(ROUTE), mutated(DR), st.sampled_from(["/a/b?q=1", "/", "/x"]))
def test_index_answers_whatever_it_was_given(vs: dict[str, Any], route: dict[str, Any], dr: dict[str, Any],
                                             path: str) -> None:
    config = ConfigIndex([vs], [route], [dr], services=lookup, waypoint_namespace="bookinfo")
    table = config.routes_for(REVIEWS, 9080)
    table.select(head(path, headers=[("x", "1"), ("end-user", "jason")]), 9080)
    config.policy_for(REVIEWS, None, 9080)
    config.dump()
