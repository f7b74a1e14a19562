"""Route selection per request (first match wins) and the edits a route implies: every match type,
VirtualService's withoutHeaders quirks, pseudo-headers, ports, prefix/regex rewrites, redirects."""

from __future__ import annotations

import re

import pytest

from waypoint.http.message import RequestHead
from waypoint.routing.match import (
    compile_regex,
    redirect_location,
    replace_path_prefix,
    rewritten_path,
    select,
    select_with_match,
    shadow_authority,
    split_authority,
)
from waypoint.routing.model import (
    DirectResponse,
    HeaderMatch,
    Invalid,
    PathMatch,
    QueryParamMatch,
    Redirect,
    Rewrite,
    Route,
    RouteMatch,
    RouteTable,
    StringMatch,
)

from .fixtures import head


def table_of(*matches: RouteMatch | None) -> RouteTable:
    """One route per match (None = a catch-all route), named r0, r1, ..."""
    return RouteTable(tuple(Route(f"r{i}", () if m is None else (m,), DirectResponse(200))
                            for i, m in enumerate(matches)))


def matches(match: RouteMatch, request: RequestHead, port: int = 9080) -> bool:
    return select(table_of(match), request, port) is not None


CASES: list[tuple[str, RouteMatch, RequestHead, bool]] = [
    # uri exact: path without query; case-sensitive unless ignore_case
    ("exact", RouteMatch(path=PathMatch("exact", "/login")), head("/login"), True),
    ("exact ignores query", RouteMatch(path=PathMatch("exact", "/login")), head("/login?next=/x"), True),
    ("exact is exact", RouteMatch(path=PathMatch("exact", "/login")), head("/login/"), False),
    ("exact case", RouteMatch(path=PathMatch("exact", "/login")), head("/LOGIN"), False),
    ("exact ignore case", RouteMatch(path=PathMatch("exact", "/login", ignore_case=True)), head("/LOGIN"), True),
    # uri prefix: plain string prefix (Envoy's), not by segment
    ("prefix", RouteMatch(path=PathMatch("prefix", "/api")), head("/api/v1"), True),
    ("prefix is not by segment", RouteMatch(path=PathMatch("prefix", "/api")), head("/apiary"), True),
    ("prefix miss", RouteMatch(path=PathMatch("prefix", "/api")), head("/ap"), False),
    ("prefix ignore case", RouteMatch(path=PathMatch("prefix", "/API", ignore_case=True)), head("/api/x"), True),
    ("empty prefix", RouteMatch(path=PathMatch("prefix", "")), head("/anything"), True),
    # Gateway API PathPrefix: element by element
    ("segment", RouteMatch(path=PathMatch("segment_prefix", "/abc")), head("/abc"), True),
    ("segment slash", RouteMatch(path=PathMatch("segment_prefix", "/abc")), head("/abc/"), True),
    ("segment child", RouteMatch(path=PathMatch("segment_prefix", "/abc")), head("/abc/def?q=1"), True),
    ("segment not partial", RouteMatch(path=PathMatch("segment_prefix", "/abc")), head("/abcd"), False),
    ("segment trailing slash ignored", RouteMatch(path=PathMatch("segment_prefix", "/abc/")), head("/abc"), True),
    ("segment query", RouteMatch(path=PathMatch("segment_prefix", "/abc")), head("/abc?x"), True),
    ("segment root", RouteMatch(path=PathMatch("segment_prefix", "/")), head("/zzz"), True),
    # regex: whole path without query
    ("regex", RouteMatch(path=PathMatch("regex", r"/reviews/\d+")), head("/reviews/12"), True),
    ("regex full match", RouteMatch(path=PathMatch("regex", r"/reviews/\d+")), head("/reviews/12/x"), False),
    ("regex no query", RouteMatch(path=PathMatch("regex", r"/reviews/\d+")), head("/reviews/1?a=b"), True),
    # method / authority / scheme
    ("method", RouteMatch(method=StringMatch("exact", "POST")), head(method="POST"), True),
    ("method miss", RouteMatch(method=StringMatch("exact", "POST")), head(method="GET"), False),
    ("method regex", RouteMatch(method=StringMatch("regex", "GET|HEAD")), head(method="HEAD"), True),
    ("authority", RouteMatch(authority=StringMatch("prefix", "reviews")), head(authority="reviews:9080"), True),
    ("authority miss", RouteMatch(authority=StringMatch("exact", "reviews")), head(authority="reviews:9080"), False),
    ("scheme", RouteMatch(scheme=StringMatch("exact", "https")), head(scheme="http"), False),
    # headers
    ("header exact", RouteMatch(headers=(HeaderMatch("end-user", StringMatch("exact", "jason")),)),
     head(headers=[("End-User", "jason")]), True),
    ("header exact miss", RouteMatch(headers=(HeaderMatch("end-user", StringMatch("exact", "jason")),)),
     head(headers=[("end-user", "json")]), False),
    ("header absent", RouteMatch(headers=(HeaderMatch("end-user", StringMatch("exact", "jason")),)), head(), False),
    ("header prefix", RouteMatch(headers=(HeaderMatch("ua", StringMatch("prefix", "curl/")),)),
     head(headers=[("ua", "curl/8.1")]), True),
    ("header regex", RouteMatch(headers=(HeaderMatch("ua", StringMatch("regex", ".*Mobile.*")),)),
     head(headers=[("ua", "Mozilla Mobile Safari")]), True),
    ("header present", RouteMatch(headers=(HeaderMatch("x-canary"),)), head(headers=[("x-canary", "")]), True),
    ("header present miss", RouteMatch(headers=(HeaderMatch("x-canary"),)), head(), False),
    ("repeated header joined", RouteMatch(headers=(HeaderMatch("x", StringMatch("exact", "a,b")),)),
     head(headers=[("x", "a"), ("x", "b")]), True),
    ("all headers AND", RouteMatch(headers=(HeaderMatch("a", StringMatch("exact", "1")),
                                            HeaderMatch("b", StringMatch("exact", "2")))),
     head(headers=[("a", "1")]), False),
    # pseudo-headers are read from the request line
    ("host header", RouteMatch(headers=(HeaderMatch("host", StringMatch("exact", "reviews:9080")),)), head(), True),
    (":method header", RouteMatch(headers=(HeaderMatch(":method", StringMatch("exact", "PUT")),)),
     head(method="PUT"), True),
    (":path header", RouteMatch(headers=(HeaderMatch(":path", StringMatch("prefix", "/a")),)), head("/ab"), True),
    # withoutHeaders (invert): a missing header counts as empty unless it is a presence check
    ("without exact, other value", RouteMatch(headers=(HeaderMatch("u", StringMatch("exact", "bot"), True),)),
     head(headers=[("u", "human")]), True),
    ("without exact, same value", RouteMatch(headers=(HeaderMatch("u", StringMatch("exact", "bot"), True),)),
     head(headers=[("u", "bot")]), False),
    ("without exact, missing", RouteMatch(headers=(HeaderMatch("u", StringMatch("exact", "bot"), True),)),
     head(), True),
    ("without empty exact, missing", RouteMatch(headers=(HeaderMatch("u", StringMatch("exact", ""), True),)),
     head(), False),
    ("without presence, missing", RouteMatch(headers=(HeaderMatch("u", None, True),)), head(), True),
    ("without presence, present", RouteMatch(headers=(HeaderMatch("u", None, True),)),
     head(headers=[("u", "x")]), False),
    # query parameters: first value
    ("query exact", RouteMatch(query_params=(QueryParamMatch("v", StringMatch("exact", "2")),)),
     head("/p?v=2"), True),
    ("query first value", RouteMatch(query_params=(QueryParamMatch("v", StringMatch("exact", "2")),)),
     head("/p?v=1&v=2"), False),
    ("query decoded", RouteMatch(query_params=(QueryParamMatch("q", StringMatch("exact", "a b")),)),
     head("/p?q=a%20b"), True),
    ("query regex", RouteMatch(query_params=(QueryParamMatch("id", StringMatch("regex", r"\d+")),)),
     head("/p?id=123"), True),
    ("query regex whole value", RouteMatch(query_params=(QueryParamMatch("id", StringMatch("regex", r"\d+")),)),
     head("/p?id=a123"), False),
    ("query key only", RouteMatch(query_params=(QueryParamMatch("debug", StringMatch("exact", "")),)),
     head("/p?debug"), True),
    ("query present", RouteMatch(query_params=(QueryParamMatch("debug"),)), head("/p?debug=1"), True),
    ("query missing", RouteMatch(query_params=(QueryParamMatch("debug"),)), head("/p?other=1"), False),
    ("query none", RouteMatch(query_params=(QueryParamMatch("debug"),)), head("/p"), False),
    # an empty match matches everything
    ("empty match", RouteMatch(), head("/x", "DELETE"), True),
]


@pytest.mark.parametrize(("match", "request_head", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_match_types(match: RouteMatch, request_head: RequestHead, expected: bool) -> None:
    assert matches(match, request_head) is expected


def test_port_bound_matches_apply_only_on_that_port() -> None:
    match = RouteMatch(path=PathMatch("prefix", "/"), port=9080)
    assert matches(match, head(), port=9080)
    assert not matches(match, head(), port=8080)


def test_first_match_wins_in_order() -> None:
    table = table_of(RouteMatch(headers=(HeaderMatch("end-user", StringMatch("exact", "jason")),)),
                     RouteMatch(path=PathMatch("prefix", "/")), None)
    assert select(table, head(headers=[("end-user", "jason")]), 9080).name == "r0"  # type: ignore[union-attr]
    assert select(table, head(), 9080).name == "r1"  # type: ignore[union-attr]


def test_matches_within_a_route_are_alternatives() -> None:
    route = Route("r", (RouteMatch(path=PathMatch("exact", "/a")), RouteMatch(path=PathMatch("exact", "/b"))),
                  DirectResponse(200))
    table = RouteTable((route,))
    assert select_with_match(table, head("/b"), 80) == (route, route.matches[1])
    assert select(table, head("/c"), 80) is None


def test_no_route_is_none_and_catch_all_reports_no_match() -> None:
    assert select(table_of(RouteMatch(path=PathMatch("exact", "/a"))), head("/b"), 80) is None
    catch_all = table_of(None)
    assert select_with_match(catch_all, head(), 80) == (catch_all.routes[0], None)
    assert catch_all.select(head(), 80) is catch_all.routes[0]


def test_query_is_parsed_once_and_only_when_needed() -> None:
    class CountingHead:
        method, path, authority, scheme = "GET", "/p?a=1", "h", "http"
        headers = head().headers
        parsed = 0

        @property
        def query(self) -> dict[str, list[str]]:
            self.parsed += 1
            return {"a": ["1"]}

    request = CountingHead()
    table = table_of(RouteMatch(query_params=(QueryParamMatch("a", StringMatch("exact", "2")),)),
                     RouteMatch(query_params=(QueryParamMatch("b"),)),
                     RouteMatch(query_params=(QueryParamMatch("a", StringMatch("exact", "1")),)))
    assert select(table, request, 80).name == "r2"  # type: ignore[union-attr]
    assert request.parsed == 1
    request.parsed = 0
    select(table_of(None), request, 80)
    assert request.parsed == 0


@pytest.mark.parametrize(("pattern", "problem"), [
    ("(?=x)", "RE2"), ("(?!x)", "RE2"), ("(?<=x)y", "RE2"), (r"(a)\1", "RE2"), ("(?P=n)", "RE2"),
    ("*", "invalid regex"), ("[a-", "invalid regex"),
])
def test_regexes_outside_re2_are_rejected(pattern: str, problem: str) -> None:
    with pytest.raises(Invalid, match=re.escape(problem)) as caught:
        compile_regex(pattern, "spec.http[0].match[0].uri.regex")
    assert caught.value.field == "spec.http[0].match[0].uri.regex"


def test_re2_compatible_regexes_pass() -> None:
    assert compile_regex(r"^/api/(?P<v>v\d+)/.*$", "f") == r"^/api/(?P<v>v\d+)/.*$"


# ---------------------------------------------------------------------------------------------------
# Rewrites
# ---------------------------------------------------------------------------------------------------

GATEWAY_PREFIX_TABLE = [  # HTTPPathModifier.ReplacePrefixMatch's documented table
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
    ("/anything", "/", "/xyz", "/xyz/anything"),
]


@pytest.mark.parametrize(("path", "prefix", "replacement", "expected"), GATEWAY_PREFIX_TABLE)
def test_replace_prefix_match_follows_gateway_api_table(path: str, prefix: str, replacement: str,
                                                        expected: str) -> None:
    assert replace_path_prefix(path, prefix, replacement) == expected
    matched = RouteMatch(path=PathMatch("segment_prefix", prefix))
    assert rewritten_path(Rewrite(replace_prefix_match=replacement), matched, path + "?q=1") == expected + "?q=1"


@pytest.mark.parametrize(("rewrite", "matched", "path", "expected"), [
    # VirtualService rewrite.uri: Envoy prefix_rewrite replaces the matched prefix
    (Rewrite(prefix="/v2/"), RouteMatch(path=PathMatch("prefix", "/v1/")), "/v1/items?x=1", "/v2/items?x=1"),
    (Rewrite(prefix="/"), RouteMatch(path=PathMatch("prefix", "/api")), "/api/items", "//items"),
    (Rewrite(prefix="/new"), RouteMatch(path=PathMatch("exact", "/old")), "/old?k=v", "/new?k=v"),
    (Rewrite(prefix="/v1"), None, "/items", "/v1items"),  # no uri match: Envoy's prefix is "/"
    (Rewrite(prefix="/v1/"), RouteMatch(), "/items", "/v1/items"),
    # uriRegexRewrite: every match substituted, query kept
    (Rewrite(regex=re.compile(r"^/service/([^/]+)(/.*)$"), substitution=r"\2/instance/\1"), None,
     "/service/foo/v1/api?a=b", "/v1/api/instance/foo?a=b"),
    (Rewrite(regex=re.compile("o"), substitution="0"), None, "/foo/boo", "/f00/b00"),
    # ReplaceFullPath keeps the query
    (Rewrite(full_path="/fixed"), None, "/any/thing?z=1", "/fixed?z=1"),
    # authority-only rewrite leaves the path alone
    (Rewrite(authority="ratings"), None, "/p?x", "/p?x"),
])
def test_rewritten_path(rewrite: Rewrite, matched: RouteMatch | None, path: str, expected: str) -> None:
    assert rewritten_path(rewrite, matched, path) == expected


# ---------------------------------------------------------------------------------------------------
# Redirects
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("redirect", "request_head", "port", "matched", "location"), [
    (Redirect(uri="/v1/bookRatings"), head("/v1/getProductRatings?id=1", authority="ratings:9080"), 9080, None,
     "http://ratings:9080/v1/bookRatings?id=1"),
    (Redirect(uri="/new?fixed=1"), head("/old?x=1"), 9080, None, "http://reviews:9080/new?fixed=1"),
    (Redirect(authority="newratings.default.svc.cluster.local"), head("/a", authority="ratings:9080"), 9080, None,
     "http://newratings.default.svc.cluster.local/a"),
    (Redirect(scheme="https"), head("/a", authority="h:80"), 80, None, "https://h/a"),
    (Redirect(scheme="https"), head("/a", authority="h:9080"), 9080, None, "https://h:9080/a"),
    (Redirect(port=8443, scheme="https"), head("/a", authority="h"), 80, None, "https://h:8443/a"),
    (Redirect(port=443, scheme="https"), head("/a", authority="h:80"), 80, None, "https://h/a"),
    # Gateway API: no port, no scheme → the listener (service) port; scheme → its default port
    (Redirect(authority="example.com", derive_port="request", code=302), head("/a"), 9080, None,
     "http://example.com:9080/a"),
    (Redirect(authority="example.com", derive_port="request", code=302), head("/a"), 80, None,
     "http://example.com/a"),
    (Redirect(scheme="https", derive_port="scheme"), head("/a", authority="h:9080"), 9080, None, "https://h/a"),
    (Redirect(prefix_rewrite="/new", derive_port="request"), head("/old/x?q=1", authority="h"), 9080,
     RouteMatch(path=PathMatch("segment_prefix", "/old")), "http://h:9080/new/x?q=1"),
    (Redirect(uri="/p"), head("/x", authority="[fd00::1]:9080"), 9080, None, "http://[fd00::1]:9080/p"),
])
def test_redirect_location(redirect: Redirect, request_head: RequestHead, port: int, matched: RouteMatch | None,
                           location: str) -> None:
    assert redirect_location(redirect, request_head, port, matched) == location


@pytest.mark.parametrize(("authority", "host", "port"), [
    ("reviews:9080", "reviews", 9080), ("reviews", "reviews", None), ("[::1]:80", "[::1]", 80),
    ("[::1]", "[::1]", None), ("::1", "::1", None), ("10.0.0.1:8080", "10.0.0.1", 8080),
])
def test_split_authority(authority: str, host: str, port: int | None) -> None:
    assert split_authority(authority) == (host, port)


def test_mirrored_requests_get_a_shadow_authority() -> None:
    assert shadow_authority("reviews:9080") == "reviews-shadow:9080"
    assert shadow_authority("reviews.bookinfo.svc.cluster.local") == "reviews.bookinfo.svc.cluster.local-shadow"
