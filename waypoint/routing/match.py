"""Per-request route selection and the request edits a selected route implies.

Pure functions over the compiled model: `select` walks a RouteTable in order and returns the first
route whose match holds (VirtualService: declared order; HTTPRoute: Gateway API precedence, already
sorted by `httproute.py`). Regexes were compiled when the table was built; a request allocates
nothing here unless a route tests headers with several values or query parameters.

Also here: RE2 checks for user regexes (Istio validates with Go's RE2; Python's `re` accepts more),
path rewriting (`rewritten_path`) and redirect targets (`redirect_location`), which depend on which
match selected the route.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from waypoint.http.message import RequestHeadLike
from waypoint.routing.model import (
    HeaderMatch,
    Invalid,
    Redirect,
    Rewrite,
    Route,
    RouteMatch,
    RouteTable,
)


class RoutableHead(RequestHeadLike, Protocol):
    """What routing reads of waypoint.http.message.RequestHead: the common request view plus the query."""

    @property
    def query(self) -> Mapping[str, Sequence[str]]: ...


# Header names that mean a pseudo-header: Envoy matches them against the request line, and our
# Headers never carry them (RequestHead keeps them as attributes).
_PSEUDO_HEADERS = {"host": "authority", ":authority": "authority", ":method": "method", ":path": "path",
                   ":scheme": "scheme"}

# RE2 (what Istio validates with) has no lookaround, backreferences or atomic groups; Python does.
_NOT_RE2 = re.compile(r"\(\?(?:=|!|<=|<!|>|P=)|\\[1-9]")


def compile_regex(pattern: object, field_path: str) -> str:
    """Validate a user regex (RE2 dialect, matched against the whole value). Returns it. Raises Invalid."""
    if not isinstance(pattern, str):
        raise Invalid(field_path, f"expected a regular expression string, got {pattern!r}")
    unsupported = _NOT_RE2.search(pattern)
    if unsupported:
        raise Invalid(field_path, f"regex {pattern!r} uses {unsupported.group(0)!r}, which RE2 (Istio's regex "
                                  "dialect) does not support")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise Invalid(field_path, f"invalid regex {pattern!r}: {exc}") from None
    return pattern


def select(table: RouteTable, head: RoutableHead, port: int) -> Route | None:
    """The first route of `table` that matches the request, or None (the proxy answers 404 `NR`)."""
    selected = select_with_match(table, head, port)
    return selected[0] if selected is not None else None


def select_with_match(table: RouteTable, head: RoutableHead,
                      port: int) -> tuple[Route, RouteMatch | None] | None:
    """Like `select`, also returning which of the route's matches held (None for a catch-all route):
    prefix rewrites and redirects replace the prefix that matched."""
    path = head.path
    cut = path.find("?")
    path_only = path if cut < 0 else path[:cut]
    query: Mapping[str, Sequence[str]] | None = None
    for route in table.routes:
        if not route.matches:
            return route, None
        for match in route.matches:
            if match.port is not None and match.port != port:
                continue
            if match.path is not None and not match.path.test(path, path_only):
                continue
            if match.method is not None and not match.method.test(head.method):
                continue
            if match.authority is not None and not match.authority.test(head.authority):
                continue
            if match.scheme is not None and not match.scheme.test(head.scheme):
                continue
            if match.headers and not _headers_match(match.headers, head):
                continue
            if match.query_params:
                if query is None:
                    query = head.query
                if not _query_matches(match, query):
                    continue
            return route, match
    return None


def _headers_match(conditions: tuple[HeaderMatch, ...], head: RoutableHead) -> bool:
    headers = head.headers
    for condition in conditions:
        pseudo = _PSEUDO_HEADERS.get(condition.name)
        if pseudo is not None:
            value: str | None = getattr(head, pseudo)
        else:
            values = headers.get_all(condition.name)
            # Envoy matches a repeated header against its values joined with ",".
            value = (values[0] if len(values) == 1 else ",".join(values)) if values else None
        inner = condition.match
        if value is None:
            if not condition.invert:
                return False
            if inner is not None and inner.kind != "present" and inner.test(""):
                return False  # withoutHeaders treats a missing header as empty
            continue
        holds = inner is None or bool(inner.test(value))
        if holds == condition.invert:
            return False
    return True


def _query_matches(match: RouteMatch, query: Mapping[str, Sequence[str]]) -> bool:
    for condition in match.query_params:
        values = query.get(condition.name)
        if not values:
            return False
        if condition.match is not None and not condition.match.test(values[0]):
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# What a selected route does to the request
# ---------------------------------------------------------------------------------------------------

def _split_query(path: str) -> tuple[str, str]:
    cut = path.find("?")
    return (path, "") if cut < 0 else (path[:cut], path[cut:])


def replace_path_prefix(path_only: str, prefix: str, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch: element-wise, trailing slashes of both ignored (see the table in
    HTTPPathModifier): /foo/bar with /foo → /xyz gives /xyz/bar; /foo with /foo → "" gives /."""
    matched = prefix.rstrip("/")
    rest = path_only[len(matched):] if path_only.lower().startswith(matched.lower()) else path_only
    result = replacement.rstrip("/") + rest
    if not result.startswith("/"):
        result = "/" + result
    return result


def rewritten_path(rewrite: Rewrite, matched: RouteMatch | None, path: str) -> str:
    """The request path (with its query string) after `rewrite`; unchanged when it rewrites no path."""
    path_only, query = _split_query(path)
    if rewrite.full_path is not None:
        return rewrite.full_path + query
    if rewrite.regex is not None:
        return rewrite.regex.sub(rewrite.substitution, path_only) + query
    path_match = matched.path if matched is not None else None
    if rewrite.replace_prefix_match is not None:
        prefix = path_match.value if path_match is not None else "/"
        return replace_path_prefix(path_only, prefix, rewrite.replace_prefix_match) + query
    if rewrite.prefix is not None:
        if path_match is None:  # no uri match: Envoy's route prefix is "/"
            return rewrite.prefix + path[1:]
        if path_match.kind == "exact":
            return rewrite.prefix + query
        return rewrite.prefix + path[len(path_match.value):]
    return path


_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_authority(authority: str) -> tuple[str, int | None]:
    """"host:port" / "[v6]:port" / "host" → (host, port or None)."""
    if authority.startswith("["):
        end = authority.find("]")
        tail = authority[end + 2:] if end > 0 else ""
        if end > 0 and authority[end + 1:end + 2] == ":" and tail.isdigit():
            return authority[:end + 1], int(tail)
        return authority, None
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return authority, None


def redirect_location(redirect: Redirect, head: RoutableHead, port: int, matched: RouteMatch | None) -> str:
    """The Location of a redirect answer for this request arriving on service port `port`."""
    scheme = redirect.scheme or head.scheme
    request_host, request_port = split_authority(head.authority)
    if redirect.authority is not None:
        host, kept_port = redirect.authority, None
    else:
        host, kept_port = request_host, request_port
        if redirect.scheme and redirect.scheme != head.scheme and request_port == _DEFAULT_PORTS.get(head.scheme):
            kept_port = None  # http://h:80 → https://h, not https://h:80
    if redirect.port is not None:
        final_port: int | None = redirect.port
    elif redirect.derive_port == "request":
        final_port = port
    elif redirect.derive_port == "scheme":
        final_port = None
    else:
        final_port = kept_port
    if final_port is not None and final_port == _DEFAULT_PORTS.get(scheme):
        final_port = None
    path_only, query = _split_query(head.path)
    if redirect.uri is not None:
        path = redirect.uri if "?" in redirect.uri else redirect.uri + query
    elif redirect.prefix_rewrite is not None:
        prefix = matched.path.value if matched is not None and matched.path is not None else "/"
        path = replace_path_prefix(path_only, prefix, redirect.prefix_rewrite) + query
    else:
        path = head.path
    authority = host if final_port is None else f"{host}:{final_port}"
    return f"{scheme}://{authority}{path}"


def shadow_authority(authority: str) -> str:
    """Envoy's authority for a mirrored request: "-shadow" appended to the host ("reviews:9080" →
    "reviews-shadow:9080"), so the mirror target can tell copies apart."""
    host, port = split_authority(authority)
    return f"{host}-shadow" if port is None else f"{host}-shadow:{port}"
