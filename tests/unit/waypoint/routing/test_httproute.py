"""HTTPRoute (GAMMA) → compiled routes: parentRefs, matches, precedence keys, backends and weights,
filters, timeouts, retries, and rule-level error isolation."""

from __future__ import annotations

from typing import Any

import pytest

from waypoint.routing.httproute import Attachment, CompiledHTTPRoute, compile_http_route
from waypoint.routing.model import (
    DEFAULT_RETRY_POLICY,
    DirectResponse,
    Forward,
    HeaderMatch,
    HeaderOps,
    Mirror,
    PathMatch,
    QueryParamMatch,
    Redirect,
    RetryPolicy,
    Rewrite,
    Route,
    RouteMatch,
    StringMatch,
    WeightedDestination,
)

from .fixtures import HTTPBIN, RATINGS, REVIEWS, backend, fields, http_route, lookup

GOOD = {"backendRefs": [backend()]}
ROOT = PathMatch("segment_prefix", "/")


def compile_one(rules: list[Any], **kwargs: Any) -> CompiledHTTPRoute:
    return compile_http_route(http_route(rules, **kwargs), lookup, waypoint=("bookinfo", "waypoint"))


def only_route(rule: dict[str, Any]) -> Route:
    compiled = compile_one([rule])
    assert fields(compiled.errors, "error") == []
    assert len(compiled.routes) == 1
    return compiled.routes[0].route


# --- parents -----------------------------------------------------------------------------------------

def test_service_parent_attaches_to_the_service() -> None:
    compiled = compile_one([GOOD])
    assert compiled.attachments == (Attachment(REVIEWS, "bookinfo", None, "spec.parentRefs[0]"),)
    assert compile_one([GOOD], port=9080).attachments[0].port == 9080


@pytest.mark.parametrize(("ref", "attached", "warning"), [
    ({"group": "", "kind": "Service", "name": "httpbin", "namespace": "web"}, (HTTPBIN,), None),
    ({"group": "core", "kind": "Service", "name": "reviews"}, (REVIEWS,), None),
    ({"kind": "Service", "group": "", "name": "nosuch"}, ("nosuch.bookinfo.svc.cluster.local",), "spec.parentRefs[0]"),
    ({"name": "waypoint"}, (), "spec.parentRefs[0]"),  # the waypoint Gateway (default group/kind)
    ({"name": "bookinfo-gateway"}, (), None),          # an ingress Gateway: not ours, no noise
    ({"group": "networking.istio.io", "kind": "ServiceEntry", "name": "x"}, (), "spec.parentRefs[0]"),
])
def test_parent_refs(ref: dict[str, Any], attached: tuple[str, ...], warning: str | None) -> None:
    obj = http_route([GOOD])
    obj["spec"]["parentRefs"] = [ref]
    compiled = compile_http_route(obj, lookup, waypoint=("bookinfo", "waypoint"))
    assert tuple(a.hostname for a in compiled.attachments) == attached
    assert fields(compiled.errors, "warning") == ([warning] if warning else [])


def test_waypoint_gateway_parent_warning_says_what_to_do() -> None:
    obj = http_route([GOOD])
    obj["spec"]["parentRefs"] = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}]
    compiled = compile_http_route(obj, lookup, waypoint=("bookinfo", "waypoint"))
    assert "attach the route to the Service" in compiled.errors[0].message
    assert compiled.routes == ()


def test_no_parent_refs() -> None:
    obj = http_route([GOOD])
    del obj["spec"]["parentRefs"]
    compiled = compile_http_route(obj, lookup)
    assert fields(compiled.errors, "warning") == ["spec.parentRefs"]
    assert compiled.attachments == ()


# --- matches and precedence --------------------------------------------------------------------------

@pytest.mark.parametrize(("match", "expected"), [
    ({"path": {"type": "Exact", "value": "/login"}}, RouteMatch(path=PathMatch("exact", "/login"))),
    ({"path": {"type": "PathPrefix", "value": "/api/"}}, RouteMatch(path=PathMatch("segment_prefix", "/api/"))),
    ({"path": {"value": "/api"}}, RouteMatch(path=PathMatch("segment_prefix", "/api"))),
    ({"path": {"type": "RegularExpression", "value": "/r/[0-9]+"}}, RouteMatch(path=PathMatch("regex", "/r/[0-9]+"))),
    ({"headers": [{"name": "End-User", "value": "jason"}]},
     RouteMatch(path=ROOT, headers=(HeaderMatch("end-user", StringMatch("exact", "jason")),))),
    ({"headers": [{"name": "x", "value": "1"}, {"name": "X", "value": "2"}]},
     RouteMatch(path=ROOT, headers=(HeaderMatch("x", StringMatch("exact", "1")),))),
    ({"headers": [{"type": "RegularExpression", "name": "ua", "value": ".*curl.*"}]},
     RouteMatch(path=ROOT, headers=(HeaderMatch("ua", StringMatch("regex", ".*curl.*")),))),
    ({"queryParams": [{"name": "v", "value": "2"}, {"name": "v", "value": "3"}]},
     RouteMatch(path=ROOT, query_params=(QueryParamMatch("v", StringMatch("exact", "2")),))),
    ({"method": "POST"}, RouteMatch(path=ROOT, method=StringMatch("exact", "POST"))),
])
def test_match_fields(match: dict[str, Any], expected: RouteMatch) -> None:
    assert only_route({"matches": [match], **GOOD}).matches == (expected,)


def test_no_matches_means_prefix_slash() -> None:
    assert only_route(GOOD).matches == (RouteMatch(path=PathMatch("segment_prefix", "/")),)


def test_each_match_becomes_a_route() -> None:
    compiled = compile_one([{"matches": [{"path": {"value": "/a"}}, {"path": {"value": "/b"}}], **GOOD}])
    assert [g.field for g in compiled.routes] == ["spec.rules[0].matches[0]", "spec.rules[0].matches[1]"]
    assert [g.order[3:] for g in compiled.routes] == [(0, 0), (0, 1)]


def precedence(match: dict[str, Any]) -> tuple[int, ...]:
    return compile_one([{"matches": [match], **GOOD}]).routes[0].precedence


def test_precedence_keys_follow_gateway_api() -> None:
    ordered: list[dict[str, Any]] = [
        {"path": {"type": "Exact", "value": "/a/b/c"}},
        {"path": {"type": "Exact", "value": "/a"}},
        {"path": {"value": "/a/b"}},
        {"path": {"value": "/a/"}, "method": "GET"},    # trailing slash ignored: as long as "/a"
        {"path": {"value": "/a"}, "headers": [{"name": "x", "value": "1"}, {"name": "y", "value": "1"}]},
        {"path": {"value": "/a"}, "headers": [{"name": "x", "value": "1"}],
         "queryParams": [{"name": "q", "value": "1"}]},
        {"path": {"value": "/a"}, "headers": [{"name": "x", "value": "1"}]},
        {"path": {"value": "/a"}},
        {"path": {"value": "/"}},
        {"path": {"type": "RegularExpression", "value": "/.*"}},
    ]
    keys = [precedence(m) for m in ordered]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


# --- backends ----------------------------------------------------------------------------------------

def test_weighted_backends() -> None:
    route = only_route({"backendRefs": [backend("reviews", weight=90), backend("ratings", weight=10)]})
    assert route.action == Forward((WeightedDestination(REVIEWS, 9080, None, 90),
                                    WeightedDestination(RATINGS, 9080, None, 10)))


def test_default_weight_is_one_and_zero_is_dropped() -> None:
    route = only_route({"backendRefs": [backend("reviews"), backend("ratings"), backend("httpbin", 8000, 0,
                                                                                       namespace="web")]})
    assert isinstance(route.action, Forward)
    assert [(d.host, d.weight) for d in route.action.destinations] == [(REVIEWS, 1), (RATINGS, 1)]


def test_a_lone_backend_takes_everything() -> None:
    route = only_route({"backendRefs": [backend("reviews", weight=7)]})
    assert route.action == Forward((WeightedDestination(REVIEWS, 9080, None, 1),))


@pytest.mark.parametrize("backends", [[], [backend(weight=0)], [backend(weight=0), backend("ratings", weight=0)]])
def test_no_weighted_backend_answers_500(backends: list[Any]) -> None:
    assert only_route({"backendRefs": backends}).action == DirectResponse(500)


@pytest.mark.parametrize(("ref", "problem"), [
    (backend("reviews", port=None), "port is required"),
    (backend("nosuch"), "not found"),
    (backend("reviews", group="apps", kind="Deployment"), "not supported"),
])
def test_invalid_backend_keeps_its_share_as_500(ref: dict[str, Any], problem: str) -> None:
    compiled = compile_one([{"backendRefs": [backend("ratings"), ref]}])
    assert fields(compiled.errors, "error") == ["spec.rules[0].backendRefs[1]"]
    assert problem in compiled.errors[0].message
    action = compiled.routes[0].route.action
    assert isinstance(action, Forward)
    assert action.destinations[0].error is None
    assert action.destinations[1].error is not None and problem in action.destinations[1].error
    assert action.choose(0.75) is action.destinations[1]


def test_istio_hostname_backend() -> None:
    route = only_route({"backendRefs": [{"group": "networking.istio.io", "kind": "Hostname",
                                         "name": "ratings.bookinfo.svc.cluster.local", "port": 9080}]})
    assert route.action == Forward((WeightedDestination(RATINGS, 9080, None, 1),))


def test_backend_header_filters() -> None:
    ref = backend("reviews", filters=[{"type": "RequestHeaderModifier",
                                       "requestHeaderModifier": {"set": [{"name": "X-V", "value": "1"}]}},
                                      {"type": "ResponseHeaderModifier",
                                       "responseHeaderModifier": {"remove": ["server"]}}])
    route = only_route({"backendRefs": [ref]})
    assert isinstance(route.action, Forward)
    assert route.action.destinations[0].request_headers == HeaderOps(set=(("x-v", "1"),))
    assert route.action.destinations[0].response_headers == HeaderOps(remove=("server",))


# --- filters -----------------------------------------------------------------------------------------

def test_header_modifiers() -> None:
    route = only_route({"filters": [
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {
            "set": [{"name": "X-Set", "value": "a"}], "add": [{"name": "x-add", "value": "b"}], "remove": ["X-Rm"]}},
        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-r", "value": "c"}]}},
    ], **GOOD})
    assert route.request_headers == HeaderOps((("x-set", "a"),), (("x-add", "b"),), ("x-rm",))
    assert route.response_headers == HeaderOps(add=(("x-r", "c"),))


@pytest.mark.parametrize(("mirror", "percentage"), [
    ({}, 100.0), ({"percent": 10}, 10.0), ({"fraction": {"numerator": 1, "denominator": 1000}}, 0.1),
    ({"fraction": {"numerator": 5}}, 5.0),
])
def test_request_mirror(mirror: dict[str, Any], percentage: float) -> None:
    route = only_route({"filters": [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"name": "httpbin", "namespace": "web", "port": 8000}, **mirror}}],
        **GOOD})
    assert route.mirrors == (Mirror(HTTPBIN, 8000, None, percentage),)


@pytest.mark.parametrize(("redirect", "expected"), [
    ({"hostname": "example.com"}, Redirect(authority="example.com", derive_port="request", code=302)),
    ({"scheme": "https", "statusCode": 301}, Redirect(scheme="https", derive_port="scheme", code=301)),
    ({"port": 8443}, Redirect(port=8443, code=302)),
    ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}},
     Redirect(uri="/new", derive_port="request", code=302)),
])
def test_request_redirect(redirect: dict[str, Any], expected: Redirect) -> None:
    assert only_route({"filters": [{"type": "RequestRedirect", "requestRedirect": redirect}]}).action == expected


def test_redirect_replace_prefix_match() -> None:
    route = only_route({"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}], "filters": [
        {"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplacePrefixMatch",
                                                                 "replacePrefixMatch": "/new"}}}]})
    assert route.action == Redirect(prefix_rewrite="/new", derive_port="request", code=302)


@pytest.mark.parametrize(("rewrite", "expected"), [
    ({"hostname": "ratings"}, Rewrite(authority="ratings")),
    ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/v2"}}, Rewrite(full_path="/v2")),
])
def test_url_rewrite(rewrite: dict[str, Any], expected: Rewrite) -> None:
    assert only_route({"filters": [{"type": "URLRewrite", "urlRewrite": rewrite}], **GOOD}).rewrite == expected


def test_url_rewrite_replace_prefix_match() -> None:
    route = only_route({"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                        "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
                            "type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}}], **GOOD})
    assert route.rewrite == Rewrite(replace_prefix_match="/v2")


def test_mirror_to_an_unknown_backend_is_dropped_alone() -> None:
    compiled = compile_one([{"filters": [
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "nosuch", "port": 80}}},
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "ratings", "port": 9080}}}], **GOOD}])
    assert fields(compiled.errors) == ["spec.rules[0].filters[0].requestMirror.backendRef"]
    assert compiled.routes[0].route.mirrors == (Mirror(RATINGS, 9080, None, 100.0),)


def test_missing_rules_default_to_a_catch_all_answering_500() -> None:
    obj = http_route([])
    del obj["spec"]["rules"]
    compiled = compile_http_route(obj, lookup)
    assert fields(compiled.errors, "warning") == ["spec.rules"]
    assert [g.route.action for g in compiled.routes] == [DirectResponse(500)]
    assert compile_one([]).routes == ()


def test_cors_filter_is_ignored_with_a_warning() -> None:
    compiled = compile_one([{"filters": [{"type": "CORS", "cors": {"allowOrigins": ["*"]}}], **GOOD}])
    assert fields(compiled.errors, "warning") == ["spec.rules[0].filters[0]"]
    assert len(compiled.routes) == 1


# --- timeouts and retries ----------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "timeout", "retries"), [
    ({"timeouts": {"request": "10s"}}, 10.0, DEFAULT_RETRY_POLICY),
    ({"timeouts": {"request": "0s"}}, None, DEFAULT_RETRY_POLICY),
    ({"timeouts": {"request": "10s", "backendRequest": "2s"}}, 2.0, DEFAULT_RETRY_POLICY),
    ({"timeouts": {"request": "10s", "backendRequest": "2s"}, "retry": {"attempts": 3, "codes": [503]}}, 10.0,
     RetryPolicy(3, 2.0, frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                                    "retriable-status-codes"}), frozenset({503}))),
    ({"retry": {"backoff": "100ms"}}, None,
     RetryPolicy(2, None, frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled"}), backoff=0.1)),
    ({"retry": {"attempts": 0}}, None, None),
])
def test_timeouts_and_retries(rule: dict[str, Any], timeout: float | None, retries: RetryPolicy | None) -> None:
    route = only_route({**rule, **GOOD})
    assert route.timeout == timeout
    assert route.retries == retries


# --- errors reject one rule --------------------------------------------------------------------------

BAD_RULES: list[tuple[str, dict[str, Any], str]] = [
    ("bad regex", {"matches": [{"path": {"type": "RegularExpression", "value": "(x"}}], **GOOD},
     "spec.rules[0].matches[0].path.value"),
    ("relative path", {"matches": [{"path": {"type": "Exact", "value": "login"}}], **GOOD},
     "spec.rules[0].matches[0].path.value"),
    ("bad path type", {"matches": [{"path": {"type": "Prefix", "value": "/"}}], **GOOD},
     "spec.rules[0].matches[0].path.type"),
    ("bad method", {"matches": [{"method": "get"}], **GOOD}, "spec.rules[0].matches[0].method"),
    ("bad header type", {"matches": [{"headers": [{"type": "Prefix", "name": "a", "value": "b"}]}], **GOOD},
     "spec.rules[0].matches[0].headers[0].type"),
    ("header without value", {"matches": [{"headers": [{"name": "a"}]}], **GOOD},
     "spec.rules[0].matches[0].headers[0].value"),
    ("unknown rule field", {"retries": {"attempts": 1}, **GOOD}, "spec.rules[0].retries"),
    ("unknown filter", {"filters": [{"type": "Compress"}], **GOOD}, "spec.rules[0].filters[0].type"),
    ("extension ref", {"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "y", "name": "z"}}],
                       **GOOD}, "spec.rules[0].filters[0].type"),
    ("filter body missing", {"filters": [{"type": "RequestHeaderModifier"}], **GOOD},
     "spec.rules[0].filters[0].requestHeaderModifier"),
    ("filter body mismatch", {"filters": [{"type": "RequestHeaderModifier", "urlRewrite": {}}], **GOOD},
     "spec.rules[0].filters[0].urlRewrite"),
    ("repeated filter", {"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "a"}},
                                     {"type": "URLRewrite", "urlRewrite": {"hostname": "b"}}], **GOOD},
     "spec.rules[0].filters[1].type"),
    ("redirect and rewrite", {"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "a"}},
                                          {"type": "RequestRedirect", "requestRedirect": {"hostname": "b"}}]},
     "spec.rules[0].filters"),
    ("redirect with backends", {"filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "b"}}],
                                **GOOD}, "spec.rules[0].backendRefs"),
    ("redirect status", {"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]},
     "spec.rules[0].filters[0].requestRedirect.statusCode"),
    ("prefix rewrite needs one prefix match", {"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplacePrefixMatch", "replacePrefixMatch": "/x"}}}], **GOOD},
     "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch"),
    ("same header twice", {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "x", "value": "1"}], "remove": ["X"]}}], **GOOD},
     "spec.rules[0].filters[0].requestHeaderModifier.remove[0]"),
    ("control characters", {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "x", "value": "a\nb"}]}}], **GOOD},
     "spec.rules[0].filters[0].requestHeaderModifier.set[0].value"),
    ("mirror percent and fraction", {"filters": [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"name": "reviews", "port": 9080}, "percent": 5, "fraction": {"numerator": 1}}}], **GOOD},
     "spec.rules[0].filters[0].requestMirror"),
    ("backend filter not allowed", {"backendRefs": [backend(filters=[{"type": "URLRewrite", "urlRewrite": {}}])]},
     "spec.rules[0].backendRefs[0].filters[0].type"),
    ("negative weight", {"backendRefs": [backend(weight=-1)]}, "spec.rules[0].backendRefs[0].weight"),
    ("bad timeout", {"timeouts": {"request": "soon"}, **GOOD}, "spec.rules[0].timeouts.request"),
    ("backend timeout too long", {"timeouts": {"request": "1s", "backendRequest": "2s"}, **GOOD},
     "spec.rules[0].timeouts.backendRequest"),
    ("retry code", {"retry": {"codes": [200]}, **GOOD}, "spec.rules[0].retry.codes[0]"),
]


@pytest.mark.parametrize(("rule", "field"), [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES])
def test_bad_rule_is_rejected_alone(rule: dict[str, Any], field: str) -> None:
    good = {"matches": [{"path": {"value": "/ok"}}], **GOOD}
    compiled = compile_one([rule, good])
    errors = [e for e in compiled.errors if e.severity == "error"]
    assert [e.field for e in errors] == [field]
    assert (errors[0].kind, errors[0].namespace, errors[0].name) == ("HTTPRoute", "bookinfo", "reviews")
    assert [g.field for g in compiled.routes] == ["spec.rules[1].matches[0]"]
