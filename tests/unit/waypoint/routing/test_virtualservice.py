"""VirtualService → compiled routes: hosts, matches, destinations and weights, policies, and every
validation error naming its field while the other http routes of the same VirtualService survive."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from waypoint.routing.model import (
    DEFAULT_RETRIABLE_STATUS_CODES,
    DEFAULT_RETRY_ON,
    DEFAULT_RETRY_POLICY,
    DirectResponse,
    Fault,
    FaultAbort,
    FaultDelay,
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
from waypoint.routing.virtualservice import CompiledVirtualService, compile_virtual_service

from .fixtures import HTTPBIN, RATINGS, REVIEWS, fields, lookup, to, virtual_service

GOOD = {"route": [to("reviews", port=9080)]}


def compile_one(http: list[Any], **kwargs: Any) -> CompiledVirtualService:
    return compile_virtual_service(virtual_service(http, **kwargs), lookup)


def only_route(rule: dict[str, Any], **kwargs: Any) -> Route:
    compiled = compile_one([rule], **kwargs)
    assert [e for e in compiled.errors if e.severity == "error"] == []
    assert len(compiled.routes) == 1
    return compiled.routes[0].route


# --- hosts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("hosts", "namespace", "expected"), [
    (["reviews"], "bookinfo", (REVIEWS,)),
    (["reviews.bookinfo.svc.cluster.local"], "other", (REVIEWS,)),
    (["10.96.0.20"], "bookinfo", (REVIEWS,)),                     # a VIP → its service
    (["*.bookinfo.svc.cluster.local"], "bookinfo", ("*.bookinfo.svc.cluster.local",)),
    (["reviews", "ratings"], "bookinfo", (REVIEWS, RATINGS)),
])
def test_hosts(hosts: list[str], namespace: str, expected: tuple[str, ...]) -> None:
    compiled = compile_one([GOOD], hosts=hosts, namespace=namespace)
    assert compiled.hosts == expected
    assert compiled.applies_to_mesh


def test_wildcard_host_applies_to_matching_services() -> None:
    compiled = compile_one([GOOD], hosts=["*.bookinfo.svc.cluster.local"])
    assert compiled.applies_to(REVIEWS)
    assert not compiled.applies_to(HTTPBIN)


@pytest.mark.parametrize(("hosts", "field", "severity"), [
    (["*"], "spec.hosts[0]", "error"),
    (["10.1.2.3"], "spec.hosts[0]", "warning"),     # not any service's VIP
    ([], "spec.hosts", "error"),
    ([7], "spec.hosts[0]", "error"),
])
def test_unusable_hosts(hosts: list[Any], field: str, severity: str) -> None:
    compiled = compile_one([GOOD], hosts=hosts)
    assert fields(compiled.errors, severity) == [field]
    assert compiled.hosts == ()


def test_bad_host_does_not_hide_the_good_ones() -> None:
    compiled = compile_one([GOOD], hosts=["*", "reviews"])
    assert compiled.hosts == (REVIEWS,)
    assert fields(compiled.errors) == ["spec.hosts[0]"]


@pytest.mark.parametrize(("gateways", "applies"), [([], True), (["mesh"], True), (["mesh", "bookinfo-gateway"], True),
                                                   (["bookinfo-gateway"], False)])
def test_only_mesh_bound_virtual_services_apply(gateways: list[str], applies: bool) -> None:
    compiled = compile_one([GOOD], gateways=gateways)
    assert compiled.applies_to_mesh is applies
    assert fields(compiled.errors, "warning") == ([] if applies else ["spec.gateways"])


@pytest.mark.parametrize("api_version", ["networking.istio.io/v1", "networking.istio.io/v1beta1",
                                         "networking.istio.io/v1alpha3"])
def test_api_versions(api_version: str) -> None:
    obj = virtual_service([GOOD])
    obj["apiVersion"] = api_version
    assert len(compile_virtual_service(obj, lookup).routes) == 1


def test_wrong_api_version_or_spec_makes_it_unusable() -> None:
    obj = virtual_service([GOOD])
    obj["apiVersion"] = "networking.istio.io/v2"
    assert fields(compile_virtual_service(obj, lookup).errors) == ["apiVersion"]
    obj = virtual_service([GOOD])
    obj["spec"] = "nope"
    assert fields(compile_virtual_service(obj, lookup).errors) == ["spec"]


def test_unknown_top_level_field_is_reported_but_routes_apply() -> None:
    compiled = compile_one([GOOD], timeout="5s")
    assert fields(compiled.errors) == ["spec.timeout"]
    assert len(compiled.routes) == 1


def test_tcp_and_tls_routes_are_ignored_with_a_warning() -> None:
    compiled = compile_one([GOOD], tcp=[{"route": [to()]}])
    assert fields(compiled.errors, "warning") == ["spec.tcp"]
    assert len(compiled.routes) == 1


# --- matches -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("match", "expected"), [
    ({"uri": {"exact": "/login"}}, RouteMatch(path=PathMatch("exact", "/login"))),
    ({"uri": {"prefix": "/api"}, "ignoreUriCase": True}, RouteMatch(path=PathMatch("prefix", "/api", True))),
    ({"uri": {"regex": "/r/[0-9]+"}}, RouteMatch(path=PathMatch("regex", "/r/[0-9]+"))),
    ({"uri": {"prefix": ""}}, RouteMatch(path=PathMatch("prefix", ""))),
    ({"method": {"exact": "GET"}}, RouteMatch(method=StringMatch("exact", "GET"))),
    ({"authority": {"prefix": "reviews"}}, RouteMatch(authority=StringMatch("prefix", "reviews"))),
    ({"scheme": {"exact": "http"}}, RouteMatch(scheme=StringMatch("exact", "http"))),
    ({"headers": {"End-User": {"exact": "jason"}}},
     RouteMatch(headers=(HeaderMatch("end-user", StringMatch("exact", "jason")),))),
    ({"headers": {"x-canary": {}}}, RouteMatch(headers=(HeaderMatch("x-canary"),))),
    ({"headers": {"x-canary": None}}, RouteMatch(headers=(HeaderMatch("x-canary"),))),
    ({"withoutHeaders": {"x-bot": {"exact": "1"}}},
     RouteMatch(headers=(HeaderMatch("x-bot", StringMatch("exact", "1"), invert=True),))),
    ({"withoutHeaders": {"x-bot": {"regex": "*"}}}, RouteMatch(headers=(HeaderMatch("x-bot", None, invert=True),))),
    ({"queryParams": {"Version": {"exact": "v2"}}},
     RouteMatch(query_params=(QueryParamMatch("Version", StringMatch("exact", "v2")),))),
    ({"queryParams": {"debug": {"regex": "*"}}}, RouteMatch(query_params=(QueryParamMatch("debug"),))),
    ({"port": 9080}, RouteMatch(port=9080)),
    ({"name": "jason", "statPrefix": "x"}, RouteMatch(name="jason")),
    ({"gateways": ["mesh"]}, RouteMatch()),
    ({}, RouteMatch()),
])
def test_match_fields(match: dict[str, Any], expected: RouteMatch) -> None:
    assert only_route({"match": [match], **GOOD}).matches == (expected,)


def test_no_match_is_a_catch_all() -> None:
    assert only_route(GOOD).matches == ()
    assert only_route({"match": [], **GOOD}).matches == ()


@pytest.mark.parametrize(("match", "field"), [
    ({"sourceLabels": {"app": "productpage"}}, "spec.http[0].match[0].sourceLabels"),
    ({"sourceNamespace": "bookinfo"}, "spec.http[0].match[0].sourceNamespace"),
    ({"gateways": ["bookinfo-gateway"]}, "spec.http[0].match[0].gateways"),
])
def test_client_selecting_matches_are_dropped_with_a_warning(match: dict[str, Any], field: str) -> None:
    kept = {"uri": {"prefix": "/kept"}}
    compiled = compile_one([{"match": [match, kept], **GOOD}])
    assert fields(compiled.errors, "warning") == [field]
    assert compiled.routes[0].route.matches == (RouteMatch(path=PathMatch("prefix", "/kept")),)


def test_route_whose_matches_are_all_dropped_never_applies() -> None:
    compiled = compile_one([{"match": [{"sourceLabels": {"app": "x"}}], **GOOD}, GOOD])
    assert len(compiled.routes) == 1
    assert compiled.routes[0].field == "spec.http[1]"
    assert fields(compiled.errors, "warning") == ["spec.http[0].match[0].sourceLabels", "spec.http[0].match"]


def test_jwt_claim_matches_are_unsupported() -> None:
    compiled = compile_one([{"match": [{"headers": {"@request.auth.claims.group": {"exact": "a"}}}], **GOOD}, GOOD])
    assert fields(compiled.errors, "error") == ["spec.http[0].match[0].headers.@request.auth.claims.group"]
    assert [r.field for r in compiled.routes] == ["spec.http[1]"]


def test_header_keys_istio_ignores() -> None:
    compiled = compile_one([{"match": [{"headers": {"uri": {"exact": "/x"}, "a": {"exact": "1"}}}], **GOOD}])
    assert fields(compiled.errors, "warning") == ["spec.http[0].match[0].headers.uri"]
    assert compiled.routes[0].route.matches[0].headers == (HeaderMatch("a", StringMatch("exact", "1")),)


# --- destinations and weights ------------------------------------------------------------------------

def test_single_destination_gets_everything_whatever_its_weight() -> None:
    route = only_route({"route": [to("reviews", "v1", weight=30)]})
    assert route.action == Forward((WeightedDestination(REVIEWS, None, "v1", 1),))


def test_weighted_split() -> None:
    route = only_route({"route": [to("reviews", "v1", 90), to("reviews", "v2", 10)]})
    assert isinstance(route.action, Forward)
    assert [(d.subset, d.weight) for d in route.action.destinations] == [("v1", 90), ("v2", 10)]


def test_zero_weight_destinations_are_dropped() -> None:
    compiled = compile_one([{"route": [to("reviews", "v1", 100), to("reviews", "v2", 0)]}])
    action = compiled.routes[0].route.action
    assert isinstance(action, Forward)
    assert [d.subset for d in action.destinations] == ["v1"]
    assert compiled.routes[0].destination_fields == ("spec.http[0].route[0].destination",)


def test_weights_not_summing_to_100_are_normalized_with_a_warning() -> None:
    compiled = compile_one([{"route": [to("reviews", "v1", 30), to("reviews", "v2", 30)]}])
    assert fields(compiled.errors, "warning") == ["spec.http[0].route[0].weight"]
    assert "sum to 60" in compiled.errors[0].message
    action = compiled.routes[0].route.action
    assert isinstance(action, Forward)
    assert action.total_weight == 60
    assert action.choose(0.49).subset == "v1"
    assert action.choose(0.51).subset == "v2"


@pytest.mark.parametrize(("host", "namespace", "expected"), [
    ("reviews", "bookinfo", REVIEWS),
    ("ratings.bookinfo.svc.cluster.local", "other", RATINGS),
    ("10.96.0.21", "bookinfo", RATINGS),
    ("httpbin.web.svc.cluster.local", "bookinfo", HTTPBIN),
])
def test_destination_hosts(host: str, namespace: str, expected: str) -> None:
    route = only_route({"route": [to(host)]}, namespace=namespace)
    assert isinstance(route.action, Forward)
    assert route.action.destinations[0].host == expected


def test_unknown_destination_host_is_a_warning_with_a_hint() -> None:
    compiled = compile_one([{"route": [to("reviews.bookinfo")]}])
    assert fields(compiled.errors, "warning") == ["spec.http[0].route[0].destination.host"]
    assert "did you mean reviews.bookinfo.svc.cluster.local" in compiled.errors[0].message
    assert len(compiled.routes) == 1


def test_destination_headers_and_authority() -> None:
    entry = to("reviews", "v1", 100)
    entry["headers"] = {"request": {"set": {"X-Version": "v1", "Host": "reviews-v1"}, "remove": ["X-Drop"]},
                        "response": {"add": {"x-served-by": "v1"}}}
    route = only_route({"route": [entry]})
    assert isinstance(route.action, Forward)
    destination = route.action.destinations[0]
    assert destination.request_headers == HeaderOps(set=(("x-version", "v1"),), remove=("x-drop",))
    assert destination.response_headers == HeaderOps(add=(("x-served-by", "v1"),))
    assert destination.authority == "reviews-v1"


# --- actions and policies ----------------------------------------------------------------------------

def test_redirect() -> None:
    route = only_route({"match": [{"uri": {"exact": "/v1/getProductRatings"}}],
                        "redirect": {"uri": "/v1/bookRatings", "authority": "newratings.default.svc.cluster.local"}})
    assert route.action == Redirect(uri="/v1/bookRatings", authority="newratings.default.svc.cluster.local", code=301)


@pytest.mark.parametrize(("redirect", "expected"), [
    ({"uri": "/x", "redirectCode": 302}, Redirect(uri="/x", code=302)),
    ({"scheme": "https", "derivePort": "FROM_PROTOCOL_DEFAULT"}, Redirect(scheme="https", derive_port="scheme")),
    ({"authority": "h", "derivePort": "FROM_REQUEST_PORT"}, Redirect(authority="h", derive_port="request")),
    ({"port": 8443}, Redirect(port=8443)),
])
def test_redirect_forms(redirect: dict[str, Any], expected: Redirect) -> None:
    assert only_route({"redirect": redirect}).action == expected


def test_direct_response() -> None:
    assert only_route({"directResponse": {"status": 503, "body": {"string": "down"}}}).action == \
        DirectResponse(503, b"down")
    encoded = base64.b64encode(b"\x00\x01").decode()
    assert only_route({"directResponse": {"status": 200, "body": {"bytes": encoded}}}).action == \
        DirectResponse(200, b"\x00\x01")


def test_rewrite_forms() -> None:
    assert only_route({"match": [{"uri": {"prefix": "/v1"}}], "rewrite": {"uri": "/v2"}, **GOOD}).rewrite == \
        Rewrite(prefix="/v2")
    rewrite = only_route({"rewrite": {"uriRegexRewrite": {"match": "^/a/(.*)", "rewrite": r"/b/\1"}}, **GOOD}).rewrite
    assert rewrite is not None and rewrite.regex is not None
    assert rewrite.regex.pattern == "^/a/(.*)" and rewrite.substitution == r"/b/\1"
    assert only_route({"rewrite": {"authority": "ratings"}, **GOOD}).rewrite == Rewrite(authority="ratings")
    assert only_route({"headers": {"request": {"set": {":authority": "x"}}}, **GOOD}).rewrite == Rewrite(authority="x")


def test_timeout_and_defaults() -> None:
    route = only_route({"timeout": "0.5s", **GOOD})
    assert route.timeout == 0.5
    assert route.retries == DEFAULT_RETRY_POLICY
    assert only_route(GOOD).timeout is None


@pytest.mark.parametrize(("retries", "expected"), [
    ({"attempts": 3, "perTryTimeout": "2s"}, RetryPolicy(3, 2.0, DEFAULT_RETRY_ON, DEFAULT_RETRIABLE_STATUS_CODES)),
    ({"attempts": 3, "retryOn": "5xx,gateway-error"}, RetryPolicy(3, None, frozenset({"5xx", "gateway-error"}))),
    ({"attempts": 2, "retryOn": "503,reset"},
     RetryPolicy(2, None, frozenset({"reset", "retriable-status-codes"}), frozenset({503}))),
    ({"attempts": 1, "retryOn": "retriable-4xx,connect-failure,refused-stream,retriable-status-codes"},
     RetryPolicy(1, None, frozenset({"retriable-4xx", "connect-failure", "refused-stream",
                                     "retriable-status-codes"}))),
    ({"attempts": 4, "backoff": "25ms", "retryIgnorePreviousHosts": False},
     RetryPolicy(4, None, DEFAULT_RETRY_ON, DEFAULT_RETRIABLE_STATUS_CODES, backoff=0.025,
                 ignore_previous_hosts=False)),
    ({"attempts": 0}, None),
])
def test_retries(retries: dict[str, Any], expected: RetryPolicy | None) -> None:
    assert only_route({"retries": retries, **GOOD}).retries == expected


@pytest.mark.parametrize(("fault", "expected", "warnings"), [
    ({"delay": {"fixedDelay": "5s", "percentage": {"value": 10}}}, Fault(FaultDelay(5.0, 10.0)), []),
    ({"abort": {"httpStatus": 500, "percentage": {"value": 20.5}}}, Fault(abort=FaultAbort(500, 20.5)), []),
    ({"delay": {"fixedDelay": "7s", "percentage": {"value": 100}}, "abort": {"httpStatus": 503, "percentage":
                                                                              {"value": 1}}},
     Fault(FaultDelay(7.0, 100.0), FaultAbort(503, 1.0)), []),
    ({"delay": {"fixedDelay": "1s", "percent": 30}}, Fault(FaultDelay(1.0, 30.0)),
     ["spec.http[0].fault.delay.percent"]),
    ({"abort": {"httpStatus": 400, "percent": 50}}, Fault(abort=FaultAbort(400, 50.0)),
     ["spec.http[0].fault.abort.percent"]),
    ({"abort": {"httpStatus": 500}}, Fault(abort=FaultAbort(500, 0.0)), ["spec.http[0].fault.abort.percentage"]),
    ({"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}}},
     Fault(abort=FaultAbort(None, 100.0, grpc_status=14)), []),
    ({"delay": {"exponentialDelay": "1s"}}, None, ["spec.http[0].fault.delay.exponentialDelay"]),
])
def test_faults(fault: dict[str, Any], expected: Fault | None, warnings: list[str]) -> None:
    compiled = compile_one([{"fault": fault, **GOOD}])
    assert fields(compiled.errors, "error") == []
    assert fields(compiled.errors, "warning") == warnings
    assert compiled.routes[0].route.fault == expected


@pytest.mark.parametrize(("rule", "expected", "warnings"), [
    ({"mirror": {"host": "reviews", "subset": "v3"}}, (Mirror(REVIEWS, None, "v3", 100.0),), []),
    ({"mirror": {"host": "reviews", "subset": "v3"}, "mirrorPercentage": {"value": 25}},
     (Mirror(REVIEWS, None, "v3", 25.0),), []),
    ({"mirror": {"host": "reviews"}, "mirrorPercent": 40}, (Mirror(REVIEWS, None, None, 40.0),),
     ["spec.http[0].mirrorPercent"]),
    ({"mirror": {"host": "reviews"}, "mirrorPercentage": {"value": 0}}, (), []),
    ({"mirrors": [{"destination": {"host": "reviews", "subset": "v2"}, "percentage": {"value": 5}},
                  {"destination": {"host": "ratings", "port": {"number": 9080}}}]},
     (Mirror(REVIEWS, None, "v2", 5.0), Mirror(RATINGS, 9080, None, 100.0)), []),
])
def test_mirrors(rule: dict[str, Any], expected: tuple[Mirror, ...], warnings: list[str]) -> None:
    compiled = compile_one([{**rule, **GOOD}])
    assert fields(compiled.errors, "warning") == warnings
    assert compiled.routes[0].route.mirrors == expected


def test_headers() -> None:
    route = only_route({"headers": {"request": {"set": {"X-A": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]},
                                    "response": {"remove": ["server"]}}, **GOOD})
    assert route.request_headers == HeaderOps((("x-a", "1"),), (("x-b", "2"),), ("x-c",))
    assert route.response_headers == HeaderOps(remove=("server",))


def test_cors_is_ignored_with_a_warning() -> None:
    compiled = compile_one([{"corsPolicy": {"allowOrigins": [{"exact": "x"}]}, **GOOD}])
    assert fields(compiled.errors, "warning") == ["spec.http[0].corsPolicy"]
    assert len(compiled.routes) == 1


def test_route_names() -> None:
    compiled = compile_one([{"name": "jason", **GOOD}, GOOD])
    assert [r.route.name for r in compiled.routes] == ["jason", "bookinfo.reviews.1"]
    assert compiled.routes[1].route.origin == "VirtualService bookinfo/reviews spec.http[1]"


# --- every error path rejects only its own http route ------------------------------------------------

BAD_RULES: list[tuple[str, dict[str, Any], str]] = [
    ("negative weight", {"route": [to("reviews", "v1", -10), to("reviews", "v2", 110)]},
     "spec.http[0].route[0].weight"),
    ("weights sum to 0", {"route": [to("reviews", "v1"), to("reviews", "v2")]}, "spec.http[0].route[0].weight"),
    ("weight not a number", {"route": [to("reviews", "v1"), {**to("reviews", "v2"), "weight": "50"}]},
     "spec.http[0].route[1].weight"),
    ("bad uri regex", {"match": [{"uri": {"regex": "(unclosed"}}], **GOOD}, "spec.http[0].match[0].uri.regex"),
    ("lookahead regex", {"match": [{"headers": {"ua": {"regex": "(?=x)"}}}], **GOOD},
     "spec.http[0].match[0].headers.ua.regex"),
    ("star regex in headers", {"match": [{"headers": {"ua": {"regex": "*"}}}], **GOOD},
     "spec.http[0].match[0].headers.ua.regex"),
    ("two match kinds", {"match": [{"uri": {"exact": "/a", "prefix": "/b"}}], **GOOD}, "spec.http[0].match[0].uri"),
    ("empty header prefix", {"match": [{"headers": {"a": {"prefix": ""}}}], **GOOD},
     "spec.http[0].match[0].headers.a.prefix"),
    ("negative attempts", {"retries": {"attempts": -1}, **GOOD}, "spec.http[0].retries.attempts"),
    ("zero attempts with settings", {"retries": {"attempts": 0, "perTryTimeout": "1s"}, **GOOD},
     "spec.http[0].retries.attempts"),
    ("bad retryOn", {"retries": {"attempts": 2, "retryOn": "5xx,sometimes"}, **GOOD}, "spec.http[0].retries.retryOn"),
    ("bad retry status", {"retries": {"attempts": 2, "retryOn": "999"}, **GOOD}, "spec.http[0].retries.retryOn"),
    ("bad perTryTimeout", {"retries": {"attempts": 2, "perTryTimeout": "soon"}, **GOOD},
     "spec.http[0].retries.perTryTimeout"),
    ("bad timeout", {"timeout": "5", **GOOD}, "spec.http[0].timeout"),
    ("zero timeout", {"timeout": "0s", **GOOD}, "spec.http[0].timeout"),
    ("unknown field", {"retry": {"attempts": 3}, **GOOD}, "spec.http[0].retry"),
    ("unknown match field", {"match": [{"path": {"exact": "/"}}], **GOOD}, "spec.http[0].match[0].path"),
    ("unknown destination field", {"route": [{"destination": {"host": "reviews", "version": "v1"}}]},
     "spec.http[0].route[0].destination.version"),
    ("no host", {"route": [{"destination": {"subset": "v1"}}]}, "spec.http[0].route[0].destination.host"),
    ("wildcard destination", {"route": [to("*.bookinfo.svc.cluster.local")]},
     "spec.http[0].route[0].destination.host"),
    ("unknown VIP destination", {"route": [to("10.9.9.9")]}, "spec.http[0].route[0].destination.host"),
    ("no destination", {"route": [{"weight": 100}]}, "spec.http[0].route[0].destination"),
    ("no action", {"match": [{"uri": {"prefix": "/"}}]}, "spec.http[0]"),
    ("route and redirect", {"redirect": {"uri": "/x"}, **GOOD}, "spec.http[0].redirect"),
    ("redirect and fault", {"redirect": {"uri": "/x"}, "fault": {"abort": {"httpStatus": 500}}},
     "spec.http[0].redirect"),
    ("direct and route", {"directResponse": {"status": 200}, **GOOD}, "spec.http[0].directResponse"),
    ("delegate", {"delegate": {"name": "x"}}, "spec.http[0].delegate"),
    ("mirror and mirrors", {"mirror": {"host": "reviews"}, "mirrors": [{"destination": {"host": "reviews"}}], **GOOD},
     "spec.http[0].mirrors"),
    ("mirror percentage over 100", {"mirror": {"host": "reviews"}, "mirrorPercentage": {"value": 150}, **GOOD},
     "spec.http[0].mirrorPercentage.value"),
    ("fault percentage over 100", {"fault": {"abort": {"httpStatus": 500, "percentage": {"value": 101}}}, **GOOD},
     "spec.http[0].fault.abort.percentage.value"),
    ("abort status out of range", {"fault": {"abort": {"httpStatus": 99, "percentage": {"value": 1}}}, **GOOD},
     "spec.http[0].fault.abort.httpStatus"),
    ("abort without status", {"fault": {"abort": {"percentage": {"value": 1}}}, **GOOD}, "spec.http[0].fault.abort"),
    ("bad grpc status", {"fault": {"abort": {"grpcStatus": "NOPE"}}, **GOOD}, "spec.http[0].fault.abort.grpcStatus"),
    ("delay without fixedDelay", {"fault": {"delay": {"percentage": {"value": 1}}}, **GOOD},
     "spec.http[0].fault.delay.fixedDelay"),
    ("empty fault", {"fault": {}, **GOOD}, "spec.http[0].fault"),
    ("redirect code", {"redirect": {"uri": "/x", "redirectCode": 200}}, "spec.http[0].redirect.redirectCode"),
    ("empty redirect", {"redirect": {}}, "spec.http[0].redirect"),
    ("redirect scheme", {"redirect": {"scheme": "ftp"}}, "spec.http[0].redirect.scheme"),
    ("direct status", {"directResponse": {"status": 42}}, "spec.http[0].directResponse.status"),
    ("direct body bytes", {"directResponse": {"status": 200, "body": {"bytes": "!!"}}},
     "spec.http[0].directResponse.body.bytes"),
    ("rewrite uri with regex match", {"match": [{"uri": {"regex": "/a.*"}}], "rewrite": {"uri": "/b"}, **GOOD},
     "spec.http[0].rewrite.uri"),
    ("rewrite uri and regex", {"rewrite": {"uri": "/b", "uriRegexRewrite": {"match": "a", "rewrite": "b"}}, **GOOD},
     "spec.http[0].rewrite"),
    ("empty rewrite", {"rewrite": {}, **GOOD}, "spec.http[0].rewrite"),
    ("authority twice", {"rewrite": {"authority": "a"}, "headers": {"request": {"set": {"host": "b"}}}, **GOOD},
     "spec.http[0].headers.request"),
    ("pseudo header edit", {"headers": {"request": {"set": {":path": "/x"}}}, **GOOD},
     "spec.http[0].headers.request.set.:path"),
    ("response authority", {"headers": {"response": {"set": {"host": "x"}}}, **GOOD},
     "spec.http[0].headers.response.set.host"),
    ("header value not a string", {"headers": {"request": {"set": {"x-n": 5}}}, **GOOD},
     "spec.http[0].headers.request.set.x-n"),
    ("bad match port", {"match": [{"port": 70000}], **GOOD}, "spec.http[0].match[0].port"),
    ("ignoreUriCase not bool", {"match": [{"ignoreUriCase": "yes"}], **GOOD}, "spec.http[0].match[0].ignoreUriCase"),
    ("route not an object", "just a string", "spec.http[0]"),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("rule", "field"), [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES])
def test_bad_http_route_is_rejected_alone(rule: dict[str, Any], field: str) -> None:
    good_before = {"match": [{"uri": {"prefix": "/before"}}], **GOOD}
    compiled = compile_one([rule, good_before, GOOD], hosts=["reviews"])
    errors = [e for e in compiled.errors if e.severity == "error"]
    assert [e.field for e in errors] == [field]
    assert errors[0].kind == "VirtualService" and (errors[0].namespace, errors[0].name) == ("bookinfo", "reviews")
    assert [r.field for r in compiled.routes] == ["spec.http[1]", "spec.http[2]"]
    assert str(errors[0]).startswith(f"error: VirtualService bookinfo/reviews: {field}: ")
