"""Gateway API HTTPRoute (gateway.networking.k8s.io v1, as a dict) → compiled routes + errors.

The GAMMA (mesh) case: a parentRef of kind Service (group "" / core) attaches the route to that
Service, optionally to one of its ports; `spec.hostnames` play no part (Istio uses the Service's own
hostname). A parentRef naming a Gateway is not applied: Istio's waypoint does not convert routes
attached to it (gateway_collection.go: "Waypoint doesn't convert routes to VirtualServices"), so a
route attached to the waypoint Gateway gets a warning telling the user to attach it to the Service.

Each match of each rule becomes one Route carrying its precedence key (Gateway API: Exact path >
longest PathPrefix > regex > method > most headers > most query params; ties: oldest route, then
namespace/name, then rule order) so `table.py` can sort the routes of all HTTPRoutes of a Service.
A bad rule is rejected on its own; an invalid backend keeps its share of traffic, answered with 500
as the Gateway API requires.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from waypoint.routing.match import compile_regex
from waypoint.routing.model import (
    DEFAULT_RETRY_POLICY,
    GATEWAY_REDIRECT_CODE,
    NO_HEADER_OPS,
    REDIRECT_CODES,
    ConfigError,
    Diagnostics,
    DirectResponse,
    Forward,
    HeaderMatch,
    HeaderOps,
    Invalid,
    Mirror,
    PathMatch,
    QueryParamMatch,
    Redirect,
    RetryPolicy,
    Rewrite,
    Route,
    RouteMatch,
    ServiceLookup,
    StringMatch,
    WeightedDestination,
    check_fields,
    expect_choice,
    expect_int,
    expect_list,
    expect_mapping,
    expect_str,
    metadata_of,
    parse_duration,
    port_number,
)
from waypoint.routing.model import Action as RouteAction

KIND = "HTTPRoute"
API_VERSIONS = frozenset({"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"})
GATEWAY_GROUP = "gateway.networking.k8s.io"
ISTIO_GROUP = "networking.istio.io"
#: Gateway API: "Implementations SHOULD retry on connection errors ... if a retry stanza is configured"
#: (Istio's conversion uses exactly these).
RETRY_CONNECTION_ERRORS = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled"})

_SPEC_FIELDS = {"parentRefs", "hostnames", "rules", "useDefaultGateways"}
_PARENT_FIELDS = {"group", "kind", "namespace", "name", "sectionName", "port"}
_RULE_FIELDS = {"name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"}
_MATCH_FIELDS = {"path", "headers", "queryParams", "method"}
_PATH_FIELDS = {"type", "value"}
_NAMED_MATCH_FIELDS = {"type", "name", "value"}
_FILTER_FIELDS = {"type", "requestHeaderModifier", "responseHeaderModifier", "requestMirror", "requestRedirect",
                  "urlRewrite", "cors", "externalAuth", "extensionRef"}
_FILTER_BODY = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
                "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite",
                "CORS": "cors", "ExternalAuth": "externalAuth", "ExtensionRef": "extensionRef"}
_HEADER_FILTER_FIELDS = {"set", "add", "remove"}
_BACKEND_FIELDS = {"group", "kind", "name", "namespace", "port", "weight", "filters"}
_OBJECT_REF_FIELDS = {"group", "kind", "name", "namespace", "port"}
_MIRROR_FIELDS = {"backendRef", "percent", "fraction"}
_REDIRECT_FIELDS = {"scheme", "hostname", "path", "port", "statusCode"}
_REWRITE_FIELDS = {"hostname", "path"}
_PATH_MODIFIER_FIELDS = {"type", "replaceFullPath", "replacePrefixMatch"}
_TIMEOUT_FIELDS = {"request", "backendRequest"}
_RETRY_FIELDS = {"codes", "attempts", "backoff"}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_PATH_RANK = {"exact": 3, "segment_prefix": 2, "prefix": 2, "regex": 1}


@dataclass(frozen=True)
class Attachment:
    """The route applies to this Service (and only to `port` when set)."""

    hostname: str
    service_namespace: str
    port: int | None
    field: str


@dataclass(frozen=True)
class GatewayRoute:
    """One match of one rule, compiled to a single-match Route, with its Gateway API ordering keys."""

    route: Route
    field: str
    precedence: tuple[int, int, int, int, int]   # sorts ascending = higher precedence first
    order: tuple[str, str, str, int, int]        # created, namespace, name, rule index, match index


@dataclass(frozen=True)
class CompiledHTTPRoute:
    namespace: str
    name: str
    created: str
    attachments: tuple[Attachment, ...]
    routes: tuple[GatewayRoute, ...]
    errors: tuple[ConfigError, ...]
    destination_fields: Mapping[str, tuple[str, ...]]   # route field → backendRef fields, for late errors


def compile_http_route(obj: Mapping[str, Any], services: ServiceLookup, domain: str = "cluster.local",
                       waypoint: tuple[str, str] | None = None) -> CompiledHTTPRoute:
    """Compile one HTTPRoute. `waypoint` = (namespace, name) of this waypoint's Gateway, to warn about
    routes attached to it. Never raises for bad input: problems become ConfigErrors."""
    namespace, name, created = metadata_of(obj)
    diag = Diagnostics(KIND, namespace, name)

    def unusable(where: str, message: str) -> CompiledHTTPRoute:
        diag.error(where, message)
        return CompiledHTTPRoute(namespace, name, created, (), (), tuple(diag.errors), {})

    api_version = obj.get("apiVersion")
    if api_version is not None and (not isinstance(api_version, str) or api_version not in API_VERSIONS):
        return unusable("apiVersion", f"{api_version!r} is not an HTTPRoute API version")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return unusable("spec", "missing or not an object")
    for unknown in sorted(set(spec) - _SPEC_FIELDS):
        diag.error(f"spec.{unknown}", f"unknown field {unknown!r}; ignored")

    attachments = _attachments(spec.get("parentRefs"), namespace, domain, services, waypoint, diag)
    if not attachments:
        return CompiledHTTPRoute(namespace, name, created, (), (), tuple(diag.errors), {})

    routes: list[GatewayRoute] = []
    destination_fields: dict[str, tuple[str, ...]] = {}
    if "rules" not in spec:
        # The CRD's default: one catch-all rule without backends, which Gateway API answers with 500.
        diag.warning("spec.rules", "no rules: the CRD default (a catch-all rule without backends) answers 500")
    try:
        rules = expect_list(spec.get("rules", [{}]), "spec.rules")
    except Invalid as exc:
        return unusable(exc.field, exc.message)
    if not rules:
        diag.warning("spec.rules", "empty rules: requests to the attached services get 404")
    for index, rule in enumerate(rules):
        field = f"spec.rules[{index}]"
        try:
            compiled = _rule(rule, field, index, namespace, name, created, domain, services, diag)
        except Invalid as exc:
            diag.rejected(exc)
            continue
        for route, backend_fields in compiled:
            routes.append(route)
            destination_fields[route.field] = backend_fields
    return CompiledHTTPRoute(namespace, name, created, tuple(attachments), tuple(routes), tuple(diag.errors),
                             destination_fields)


def _attachments(raw: object, namespace: str, domain: str, services: ServiceLookup,
                 waypoint: tuple[str, str] | None, diag: Diagnostics) -> list[Attachment]:
    if not raw:
        diag.warning("spec.parentRefs", "no parentRefs: the route attaches to nothing (for mesh routing, "
                                        "add a parentRef of kind Service with group \"\")")
        return []
    attachments: list[Attachment] = []
    for i, entry in enumerate(raw if isinstance(raw, list) else [raw]):
        where = f"spec.parentRefs[{i}]"
        try:
            ref = expect_mapping(entry, where)
            check_fields(ref, _PARENT_FIELDS, where)
            group = ref.get("group", GATEWAY_GROUP)
            kind = ref.get("kind", "Gateway")
            ref_name = expect_str(ref.get("name"), f"{where}.name")
            ref_namespace = expect_str(ref["namespace"], f"{where}.namespace") if ref.get("namespace") else namespace
            port = port_number(ref["port"], f"{where}.port") if "port" in ref else None
        except Invalid as exc:
            diag.rejected(exc)
            continue
        if group in ("", "core") and kind == "Service":
            hostname = f"{ref_name}.{ref_namespace}.svc.{domain}"
            if services(hostname) is None:
                diag.warning(where, f"parent Service {ref_namespace}/{ref_name} is not known to this waypoint")
            if ref.get("sectionName"):
                diag.warning(f"{where}.sectionName", "sectionName is ignored for Service parents; use port")
            attachments.append(Attachment(hostname, ref_namespace, port, where))
        elif group == GATEWAY_GROUP and kind == "Gateway":
            if waypoint is not None and (ref_namespace, ref_name) == waypoint:
                diag.warning(where, "routes attached to a waypoint Gateway are not applied (Istio's waypoint does "
                                    "not either); attach the route to the Service (parentRef kind: Service, "
                                    "group: \"\")")
        elif group == ISTIO_GROUP and kind == "ServiceEntry":
            diag.warning(where, "ServiceEntry parents are not supported by this waypoint; ignored")
        else:
            diag.warning(where, f"parent {group or 'core'}/{kind} is not supported by this waypoint; ignored")
    return attachments


# ---------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------

def _rule(raw: object, field: str, index: int, namespace: str, route_name: str, created: str, domain: str,
          services: ServiceLookup, diag: Diagnostics) -> list[tuple[GatewayRoute, tuple[str, ...]]]:
    rule = expect_mapping(raw, field)
    check_fields(rule, _RULE_FIELDS, field)
    raw_matches = expect_list(rule.get("matches", []), f"{field}.matches")
    matches = [_match(m, f"{field}.matches[{j}]") for j, m in enumerate(raw_matches)] or [
        RouteMatch(path=PathMatch("segment_prefix", "/"))]

    request_ops = response_ops = NO_HEADER_OPS
    mirrors: list[Mirror] = []
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    seen: set[str] = set()
    filters = expect_list(rule.get("filters", []), f"{field}.filters")
    for k, entry in enumerate(filters):
        where = f"{field}.filters[{k}]"
        kind, body = _filter(entry, where)
        if kind in seen and kind != "RequestMirror":
            raise Invalid(f"{where}.type", f"the {kind} filter cannot be repeated in a rule")
        seen.add(kind)
        body_where = f"{where}.{_FILTER_BODY[kind]}"
        if kind == "RequestHeaderModifier":
            request_ops = _header_filter(body, body_where)
        elif kind == "ResponseHeaderModifier":
            response_ops = _header_filter(body, body_where)
        elif kind == "RequestMirror":
            mirror = _mirror(body, body_where, namespace, domain, services, diag)
            if mirror is not None:
                mirrors.append(mirror)
        elif kind == "RequestRedirect":
            redirect = _redirect(body, body_where, raw_matches)
        elif kind == "URLRewrite":
            rewrite = _rewrite(body, body_where, raw_matches)
        elif kind == "CORS":
            diag.warning(where, "the CORS filter is not supported by this waypoint; the rule applies without it")
        else:
            raise Invalid(f"{where}.type", f"the {kind} filter is not supported by this waypoint")
    if redirect is not None and rewrite is not None:
        raise Invalid(f"{field}.filters", "RequestRedirect and URLRewrite cannot be used in the same rule")

    backends = expect_list(rule.get("backendRefs", []), f"{field}.backendRefs")
    if redirect is not None and backends:
        raise Invalid(f"{field}.backendRefs", "a rule with a RequestRedirect filter must not have backendRefs")
    action: RouteAction
    backend_fields: tuple[str, ...] = ()
    if redirect is not None:
        action = redirect
    else:
        destinations, backend_fields = _backends(backends, f"{field}.backendRefs", namespace, domain, services, diag)
        # Gateway API: no backend with weight > 0 → every request that matches gets 500.
        action = Forward(destinations) if destinations else DirectResponse(500)

    timeout, backend_timeout = _timeouts(rule.get("timeouts"), f"{field}.timeouts")
    retries = _retry(rule.get("retry"), f"{field}.retry") if "retry" in rule else DEFAULT_RETRY_POLICY
    if backend_timeout is not None:
        # Istio's conversion: backendRequest is the per-try timeout when retries are configured,
        # otherwise it becomes the route timeout.
        if "retry" in rule and retries is not None:
            retries = RetryPolicy(retries.attempts, backend_timeout, retries.retry_on, retries.retriable_status_codes,
                                  retries.backoff, retries.ignore_previous_hosts)
        else:
            timeout = backend_timeout
    if rule.get("sessionPersistence"):
        diag.warning(f"{field}.sessionPersistence", "session persistence is not supported by this waypoint; "
                                                    "ignored")

    rule_name = rule.get("name")
    name = expect_str(rule_name, f"{field}.name") if rule_name is not None else f"{namespace}.{route_name}.{index}"
    out = []
    for j, match in enumerate(matches):
        where = f"{field}.matches[{j}]" if raw_matches else field
        route = Route(name=name, matches=(match,), action=action, timeout=timeout, retries=retries,
                      mirrors=tuple(mirrors), request_headers=request_ops, response_headers=response_ops,
                      rewrite=rewrite, origin=f"{KIND} {namespace}/{route_name} {where}")
        out.append((GatewayRoute(route, where, _precedence(match), (created, namespace, route_name, index, j)),
                    backend_fields))
    return out


def _precedence(match: RouteMatch) -> tuple[int, int, int, int, int]:
    path = match.path
    rank = _PATH_RANK[path.kind] if path is not None else -1
    length = len(path.value.rstrip("/") or "/") if path is not None else 0
    return (-rank, -length, 0 if match.method is not None else 1, -len(match.headers), -len(match.query_params))


def _match(raw: object, field: str) -> RouteMatch:
    body = expect_mapping(raw, field)
    check_fields(body, _MATCH_FIELDS, field)
    path = _path_match(body.get("path"), f"{field}.path")
    headers: list[HeaderMatch] = []
    seen: set[str] = set()
    for i, entry in enumerate(expect_list(body.get("headers", []), f"{field}.headers")):
        header_name, match = _named_match(entry, f"{field}.headers[{i}]")
        header_name = header_name.lower()
        if header_name in seen:  # "Subsequent entries with an equivalent header name MUST be ignored"
            continue
        seen.add(header_name)
        headers.append(HeaderMatch(header_name, match))
    query: list[QueryParamMatch] = []
    seen_params: set[str] = set()
    for i, entry in enumerate(expect_list(body.get("queryParams", []), f"{field}.queryParams")):
        param, match = _named_match(entry, f"{field}.queryParams[{i}]")
        if param in seen_params:
            continue
        seen_params.add(param)
        query.append(QueryParamMatch(param, match))
    method = None
    if "method" in body:
        value = expect_str(body["method"], f"{field}.method")
        if value not in _METHODS:
            raise Invalid(f"{field}.method", f"{value!r} is not an HTTP method (use upper case: "
                                             f"{', '.join(sorted(_METHODS))})")
        method = StringMatch("exact", value)
    return RouteMatch(path=path, method=method, headers=tuple(headers), query_params=tuple(query))


def _path_match(raw: object, field: str) -> PathMatch:
    if raw is None:
        return PathMatch("segment_prefix", "/")
    body = expect_mapping(raw, field)
    check_fields(body, _PATH_FIELDS, field)
    kind = expect_choice(body.get("type", "PathPrefix"), ("Exact", "PathPrefix", "RegularExpression"),
                         f"{field}.type", "a path match type")
    value = expect_str(body.get("value", "/"), f"{field}.value")
    if kind == "RegularExpression":
        return PathMatch("regex", compile_regex(value, f"{field}.value"))
    if not value.startswith("/") or "//" in value:
        raise Invalid(f"{field}.value", f"{value!r} must be an absolute path starting with \"/\", without \"//\"")
    return PathMatch("exact" if kind == "Exact" else "segment_prefix", value)


def _named_match(raw: object, field: str) -> tuple[str, StringMatch]:
    body = expect_mapping(raw, field)
    check_fields(body, _NAMED_MATCH_FIELDS, field)
    name = expect_str(body.get("name"), f"{field}.name")
    value = expect_str(body.get("value"), f"{field}.value")
    kind = expect_choice(body.get("type", "Exact"), ("Exact", "RegularExpression"), f"{field}.type", "a match type")
    if kind == "Exact":
        return name, StringMatch("exact", value)
    return name, StringMatch("regex", compile_regex(value, f"{field}.value"))


# ---------------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------------

def _filter(raw: object, field: str) -> tuple[str, Mapping[str, Any]]:
    body = expect_mapping(raw, field)
    check_fields(body, _FILTER_FIELDS, field)
    kind = expect_choice(body.get("type"), sorted(_FILTER_BODY), f"{field}.type", "a filter type")
    key = _FILTER_BODY[kind]
    for other in set(_FILTER_BODY.values()) - {key}:
        if other in body:
            raise Invalid(f"{field}.{other}", f"filter.{other} must not be set when type is {kind}")
    if kind in ("CORS", "ExternalAuth", "ExtensionRef"):
        return kind, {}
    if key not in body:
        raise Invalid(f"{field}.{key}", f"required when type is {kind}")
    return kind, expect_mapping(body[key], f"{field}.{key}")


def _header_filter(body: Mapping[str, Any], field: str) -> HeaderOps:
    check_fields(body, _HEADER_FILTER_FIELDS, field)
    touched: dict[str, str] = {}

    def claim(name: str, where: str) -> str:
        lowered = name.lower()
        if lowered in touched:
            raise Invalid(where, f"header {name!r} is already modified at {touched[lowered]}; one action per header")
        if lowered.startswith(":") or lowered == "host":
            raise Invalid(where, f"{name!r} cannot be modified by a header filter (use URLRewrite hostname)")
        touched[lowered] = where
        return lowered

    pairs: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
    for operation in ("set", "add"):
        for i, entry in enumerate(expect_list(body.get(operation, []), f"{field}.{operation}")):
            where = f"{field}.{operation}[{i}]"
            header = expect_mapping(entry, where)
            check_fields(header, {"name", "value"}, where)
            value = expect_str(header.get("value"), f"{where}.value", allow_empty=True)
            if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
                raise Invalid(f"{where}.value", "header values must not contain control characters")
            pairs[operation].append((claim(expect_str(header.get("name"), f"{where}.name"), where), value))
    removes = tuple(claim(expect_str(name, f"{field}.remove[{i}]"), f"{field}.remove[{i}]")
                    for i, name in enumerate(expect_list(body.get("remove", []), f"{field}.remove")))
    return HeaderOps(tuple(pairs["set"]), tuple(pairs["add"]), removes)


def _object_ref(body: Mapping[str, Any], field: str, namespace: str, domain: str,
                known: set[str]) -> tuple[str, int | None, str | None]:
    """A backend reference → (host, port, error). `error` set = invalid backend (500 for its share)."""
    check_fields(body, known, field)
    group = body.get("group", "")
    kind = body.get("kind", "Service")
    name = expect_str(body.get("name"), f"{field}.name")
    ref_namespace = expect_str(body["namespace"], f"{field}.namespace") if body.get("namespace") else namespace
    port = port_number(body["port"], f"{field}.port") if "port" in body else None
    if group in ("", "core") and kind == "Service":
        if port is None:
            return f"{name}.{ref_namespace}.svc.{domain}", None, "port is required for a Service backendRef"
        return f"{name}.{ref_namespace}.svc.{domain}", port, None
    if group == ISTIO_GROUP and kind == "Hostname":
        if port is None:
            return name, None, "port is required for a Hostname backendRef"
        return name.lower(), port, None
    return name, port, f"backend kind {group or 'core'}/{kind} is not supported"


def _backends(raw: Sequence[Any], field: str, namespace: str, domain: str,
              services: ServiceLookup, diag: Diagnostics) -> tuple[tuple[WeightedDestination, ...], tuple[str, ...]]:
    out: list[tuple[WeightedDestination, str]] = []
    for i, entry in enumerate(raw):
        where = f"{field}[{i}]"
        body = expect_mapping(entry, where)
        weight = expect_int(body.get("weight", 1), f"{where}.weight", minimum=0, maximum=1_000_000)
        host, port, error = _object_ref(body, where, namespace, domain, _BACKEND_FIELDS)
        if error is None and services(host) is None:
            error = f"backend {host} not found"
        if error is not None:
            diag.error(where, f"{error}; requests sent to this backend get 500")
        request_ops = response_ops = NO_HEADER_OPS
        for k, entry_filter in enumerate(expect_list(body.get("filters", []), f"{where}.filters")):
            filter_where = f"{where}.filters[{k}]"
            kind, filter_body = _filter(entry_filter, filter_where)
            if kind == "RequestHeaderModifier":
                request_ops = _header_filter(filter_body, f"{filter_where}.requestHeaderModifier")
            elif kind == "ResponseHeaderModifier":
                response_ops = _header_filter(filter_body, f"{filter_where}.responseHeaderModifier")
            else:
                raise Invalid(f"{filter_where}.type", f"only header modifier filters are supported on a backendRef, "
                                                      f"not {kind}")
        if weight > 0:
            out.append((WeightedDestination(host, port, None, weight, request_ops, response_ops, error=error), where))
    if len(out) == 1:
        only, where = out[0]
        return (WeightedDestination(only.host, only.port, None, 1, only.request_headers, only.response_headers,
                                    error=only.error),), (where,)
    return tuple(d for d, _ in out), tuple(w for _, w in out)


def _mirror(body: Mapping[str, Any], field: str, namespace: str, domain: str, services: ServiceLookup,
            diag: Diagnostics) -> Mirror | None:
    """The mirror, or None when its backend is invalid (Gateway API: that mirror is dropped, the rule
    stays)."""
    check_fields(body, _MIRROR_FIELDS, field)
    ref = expect_mapping(body.get("backendRef"), f"{field}.backendRef")
    host, port, error = _object_ref(ref, f"{field}.backendRef", namespace, domain, _OBJECT_REF_FIELDS)
    if error is None and services(host) is None:
        error = f"backend {host} not found"
    if "percent" in body and "fraction" in body:
        raise Invalid(field, "set either percent or fraction, not both")
    percentage = 100.0
    if "percent" in body:
        percentage = float(expect_int(body["percent"], f"{field}.percent", minimum=0, maximum=100))
    elif "fraction" in body:
        fraction = expect_mapping(body["fraction"], f"{field}.fraction")
        check_fields(fraction, {"numerator", "denominator"}, f"{field}.fraction")
        numerator = expect_int(fraction.get("numerator"), f"{field}.fraction.numerator", minimum=0)
        denominator = expect_int(fraction.get("denominator", 100), f"{field}.fraction.denominator", minimum=1)
        if numerator > denominator:
            raise Invalid(f"{field}.fraction", "numerator must not exceed denominator")
        percentage = 100.0 * numerator / denominator
    if error is not None:
        diag.error(f"{field}.backendRef", f"{error}; this mirror is dropped")
        return None
    return Mirror(host, port, None, percentage)


def _path_modifier(raw: object, field: str, raw_matches: Sequence[Any]) -> tuple[str, str]:
    body = expect_mapping(raw, field)
    check_fields(body, _PATH_MODIFIER_FIELDS, field)
    kind = expect_choice(body.get("type"), ("ReplaceFullPath", "ReplacePrefixMatch"), f"{field}.type",
                         "a path modifier")
    if kind == "ReplaceFullPath":
        return kind, expect_str(body.get("replaceFullPath"), f"{field}.replaceFullPath", allow_empty=True)
    if kind == "ReplacePrefixMatch":
        path = raw_matches[0].get("path", {}) if len(raw_matches) == 1 and isinstance(raw_matches[0], Mapping) else None
        if not isinstance(path, Mapping) or path.get("type", "PathPrefix") != "PathPrefix":
            raise Invalid(f"{field}.replacePrefixMatch", "ReplacePrefixMatch needs exactly one match, of type "
                                                         "PathPrefix")
    return kind, expect_str(body.get("replacePrefixMatch"), f"{field}.replacePrefixMatch", allow_empty=True)


def _redirect(body: Mapping[str, Any], field: str, raw_matches: Sequence[Any]) -> Redirect:
    check_fields(body, _REDIRECT_FIELDS, field)
    scheme = body.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise Invalid(f"{field}.scheme", f"scheme must be http or https, got {scheme!r}")
    code = expect_int(body.get("statusCode", GATEWAY_REDIRECT_CODE), f"{field}.statusCode")
    if code not in REDIRECT_CODES:
        raise Invalid(f"{field}.statusCode", f"{code} is not a redirect code")
    uri = prefix = None
    if "path" in body:
        kind, value = _path_modifier(body["path"], f"{field}.path", raw_matches)
        if kind == "ReplaceFullPath":
            uri = value or "/"
        else:
            prefix = value
    port = port_number(body["port"], f"{field}.port") if "port" in body else None
    # Gateway API: without a port, a scheme implies its well-known port; otherwise the listener's.
    derive: Literal["request", "scheme"] | None = None if port is not None else ("scheme" if scheme else "request")
    hostname = expect_str(body["hostname"], f"{field}.hostname") if body.get("hostname") else None
    return Redirect(uri=uri, prefix_rewrite=prefix, authority=hostname, scheme=scheme, port=port,
                    derive_port=derive, code=code)


def _rewrite(body: Mapping[str, Any], field: str, raw_matches: Sequence[Any]) -> Rewrite | None:
    check_fields(body, _REWRITE_FIELDS, field)
    authority = expect_str(body["hostname"], f"{field}.hostname") if body.get("hostname") else None
    if "path" in body:
        kind, value = _path_modifier(body["path"], f"{field}.path", raw_matches)
        if kind == "ReplaceFullPath":
            return Rewrite(full_path=value or "/", authority=authority)
        return Rewrite(replace_prefix_match=value, authority=authority)
    return Rewrite(authority=authority) if authority is not None else None


def _timeouts(raw: object, field: str) -> tuple[float | None, float | None]:
    """(request timeout, backendRequest timeout); "0s" disables one."""
    if raw is None:
        return None, None
    body = expect_mapping(raw, field)
    check_fields(body, _TIMEOUT_FIELDS, field)
    request = parse_duration(body["request"], f"{field}.request") if "request" in body else None
    backend = parse_duration(body["backendRequest"], f"{field}.backendRequest") if "backendRequest" in body else None
    if request and backend and backend > request:
        raise Invalid(f"{field}.backendRequest", "backendRequest timeout cannot be longer than request timeout")
    return request or None, backend or None


def _retry(raw: object, field: str) -> RetryPolicy | None:
    body = expect_mapping(raw, field)
    check_fields(body, _RETRY_FIELDS, field)
    attempts = expect_int(body.get("attempts", 2), f"{field}.attempts", minimum=0)
    if attempts == 0:
        return None
    codes = frozenset(expect_int(code, f"{field}.codes[{i}]", minimum=400, maximum=599)
                      for i, code in enumerate(expect_list(body.get("codes", []), f"{field}.codes")))
    retry_on = RETRY_CONNECTION_ERRORS | ({"retriable-status-codes"} if codes else set())
    backoff = parse_duration(body["backoff"], f"{field}.backoff") if "backoff" in body else None
    return RetryPolicy(attempts, None, frozenset(retry_on), codes, backoff)

