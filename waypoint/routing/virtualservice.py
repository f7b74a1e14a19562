"""VirtualService (networking.istio.io v1 / v1beta1 / v1alpha3, as a dict) → compiled routes + errors.

What a waypoint does with a VirtualService, following Istio's (pilot listener_waypoint.go):
- `hosts` name the services it applies to: a short name is a Service in the VirtualService's namespace,
  an FQDN is taken as written, `*.suffix` is a wildcard, an IP is the service that owns that VIP.
- Only VirtualServices bound to the `mesh` gateway (no `gateways`, or a list containing `mesh`) apply.
- `http[]` in order, first match wins; `match` entries are OR, the fields inside one are AND. A match
  using `sourceLabels`, `sourceNamespace`, or `gateways` without `mesh` is dropped (Istio ambient
  cannot select by client), with a warning; a route whose matches are all dropped never applies.
- A bad http route is rejected on its own (ConfigError naming the field); the others still apply.

Subset references are checked later, against DestinationRules, by `table.py`.
"""

from __future__ import annotations

import base64
import binascii
import http
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from waypoint.routing.match import compile_regex
from waypoint.routing.model import (
    DEFAULT_RETRIABLE_STATUS_CODES,
    DEFAULT_RETRY_ON,
    DEFAULT_RETRY_POLICY,
    NO_HEADER_OPS,
    REDIRECT_CODES,
    RETRY_ON_POLICIES,
    VS_REDIRECT_CODE,
    ConfigError,
    Diagnostics,
    DirectResponse,
    Fault,
    FaultAbort,
    FaultDelay,
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
    expect_bool,
    expect_choice,
    expect_int,
    expect_list,
    expect_mapping,
    expect_str,
    fqdn,
    host_matches,
    is_ip,
    metadata_of,
    parse_istio_duration,
    parse_percent,
    percent_number,
    port_number,
)
from waypoint.routing.model import Action as RouteAction

KIND = "VirtualService"
API_VERSIONS = frozenset({"networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"})
MESH_GATEWAY = "mesh"

_SPEC_FIELDS = {"hosts", "gateways", "http", "tls", "tcp", "exportTo"}
_HTTP_FIELDS = {"name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout", "retries",
                "fault", "mirror", "mirrors", "mirrorPercent", "mirror_percent", "mirrorPercentage", "corsPolicy",
                "headers"}
_MATCH_FIELDS = {"name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels", "gateways",
                 "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace", "statPrefix"}
_STRING_MATCH_FIELDS = {"exact", "prefix", "regex"}
_DESTINATION_FIELDS = {"host", "subset", "port"}
_ROUTE_DESTINATION_FIELDS = {"destination", "weight", "headers"}
_HEADERS_FIELDS = {"request", "response"}
_HEADER_OPERATION_FIELDS = {"set", "add", "remove"}
_REDIRECT_FIELDS = {"uri", "authority", "port", "derivePort", "scheme", "redirectCode", "prefixRewrite"}
_DERIVE_PORT: dict[str, Literal["request", "scheme"]] = {"FROM_PROTOCOL_DEFAULT": "scheme",
                                                         "FROM_REQUEST_PORT": "request"}
_DIRECT_RESPONSE_FIELDS = {"status", "body"}
_REWRITE_FIELDS = {"uri", "authority", "uriRegexRewrite"}
_RETRY_FIELDS = {"attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "retryIgnorePreviousHosts",
                 "backoff"}
_FAULT_FIELDS = {"delay", "abort"}
_DELAY_FIELDS = {"fixedDelay", "exponentialDelay", "percentage", "percent"}
_ABORT_FIELDS = {"httpStatus", "grpcStatus", "http2Error", "percentage", "percent"}
_MIRROR_POLICY_FIELDS = {"destination", "percentage"}
_AUTHORITY_HEADERS = frozenset({":authority", "host"})
# Header keys Istio ignores in a match ("The keys uri, scheme, method, and authority will be ignored").
_IGNORED_HEADER_KEYS = frozenset({"uri", "scheme", "method", "authority"})
_GRPC_STATUS = {name: code for code, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}
_HTTP_STATUS_CODES = frozenset(status.value for status in http.HTTPStatus)


@dataclass(frozen=True)
class CompiledRoute:
    """A compiled http route with where its parts came from, for errors found later (table.py)."""

    route: Route
    field: str                              # "spec.http[1]"
    destination_fields: tuple[str, ...]     # parallel to route.action.destinations (Forward only)
    mirror_fields: tuple[str, ...]          # parallel to route.mirrors


@dataclass(frozen=True)
class CompiledVirtualService:
    namespace: str
    name: str
    created: str
    hosts: tuple[str, ...]          # FQDNs and "*.suffix" / "*" patterns; VIP hosts already resolved
    routes: tuple[CompiledRoute, ...]
    applies_to_mesh: bool
    errors: tuple[ConfigError, ...]

    @property
    def key(self) -> tuple[str, str, str]:
        """Istio's precedence among VirtualServices: oldest first, then namespace/name."""
        return (self.created, self.namespace, self.name)

    def applies_to(self, hostname: str) -> bool:
        return any(host_matches(pattern, hostname) for pattern in self.hosts)


def compile_virtual_service(obj: Mapping[str, Any], services: ServiceLookup,
                            domain: str = "cluster.local") -> CompiledVirtualService:
    """Compile one VirtualService. Never raises for bad input: problems become ConfigErrors."""
    namespace, name, created = metadata_of(obj)
    diag = Diagnostics(KIND, namespace, name)

    def unusable(field: str, message: str) -> CompiledVirtualService:
        diag.error(field, message)
        return CompiledVirtualService(namespace, name, created, (), (), False, tuple(diag.errors))

    api_version = obj.get("apiVersion")
    if api_version is not None and (not isinstance(api_version, str) or api_version not in API_VERSIONS):
        return unusable("apiVersion", f"{api_version!r} is not a VirtualService API version "
                                      f"(expected one of {', '.join(sorted(API_VERSIONS))})")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return unusable("spec", "missing or not an object")
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    for field in unknown:
        diag.error(f"spec.{field}", f"unknown field {field!r}; ignored (known: {', '.join(sorted(_SPEC_FIELDS))})")

    try:
        gateways = [expect_str(g, f"spec.gateways[{i}]") for i, g in enumerate(expect_list(spec.get("gateways", []),
                                                                                           "spec.gateways"))]
    except Invalid as exc:
        return unusable(exc.field, exc.message)
    if gateways and MESH_GATEWAY not in gateways:
        diag.warning("spec.gateways", f"bound to {', '.join(gateways)} only, not to \"mesh\": waypoints do not "
                                      "apply it (add \"mesh\" to spec.gateways to route mesh traffic)")
        return CompiledVirtualService(namespace, name, created, (), (), False, tuple(diag.errors))

    hosts = _hosts(spec, namespace, domain, services, diag)
    if not hosts:
        return CompiledVirtualService(namespace, name, created, (), (), False, tuple(diag.errors))

    for field in ("tcp", "tls"):
        if spec.get(field):
            diag.warning(f"spec.{field}", f"{field} routes are not supported by this waypoint; ignored "
                                          "(TCP traffic is relayed to the service unchanged)")

    routes: list[CompiledRoute] = []
    try:
        http_routes = expect_list(spec.get("http", []), "spec.http")
    except Invalid as exc:
        return unusable(exc.field, exc.message)
    for index, body in enumerate(http_routes):
        field = f"spec.http[{index}]"
        try:
            compiled = _http_route(body, field, namespace, name, index, domain, services, diag)
        except Invalid as exc:
            diag.rejected(exc)
            continue
        if compiled is not None:
            routes.append(compiled)
    return CompiledVirtualService(namespace, name, created, tuple(hosts), tuple(routes), True, tuple(diag.errors))


def _hosts(spec: Mapping[str, Any], namespace: str, domain: str, services: ServiceLookup,
           diag: Diagnostics) -> list[str]:
    raw = spec.get("hosts")
    if not isinstance(raw, list) or not raw:
        diag.error("spec.hosts", "a VirtualService needs at least one host")
        return []
    hosts: list[str] = []
    for i, host in enumerate(raw):
        field = f"spec.hosts[{i}]"
        if not isinstance(host, str) or not host:
            diag.error(field, f"expected a host name, got {host!r}")
            continue
        if host == "*":
            diag.error(field, "wildcard host \"*\" is not allowed for VirtualServices bound to the mesh")
            continue
        if is_ip(host):
            service = services(host)
            if service is None:
                diag.warning(field, f"{host} is not the VIP of any known service; this host is ignored")
                continue
            hosts.append(service.hostname)
            continue
        hosts.append(fqdn(host, namespace, domain))
    return hosts


def _http_route(body: object, field: str, namespace: str, vs_name: str, index: int, domain: str,
                services: ServiceLookup, diag: Diagnostics) -> CompiledRoute | None:
    rule = expect_mapping(body, field)
    check_fields(rule, _HTTP_FIELDS, field)
    if "delegate" in rule:
        raise Invalid(f"{field}.delegate", "delegate VirtualServices are not supported by this waypoint")
    has_route = bool(rule.get("route"))
    if "redirect" in rule:
        for other in ("route", "fault", "rewrite", "directResponse"):
            if rule.get(other):
                raise Invalid(f"{field}.redirect", f"an HTTP route cannot have both redirect and {other}")
    elif "directResponse" in rule:
        for other in ("route", "fault", "rewrite"):
            if rule.get(other):
                raise Invalid(f"{field}.directResponse", f"an HTTP route cannot have both directResponse and {other}")
    elif not has_route:
        raise Invalid(field, "an HTTP route needs route, redirect or directResponse")
    if rule.get("mirror") and rule.get("mirrors"):
        raise Invalid(f"{field}.mirrors", "an HTTP route cannot have both mirror and mirrors")

    matches, dropped_all = _matches(rule.get("match"), f"{field}.match", diag)
    if dropped_all:
        diag.warning(f"{field}.match", "every match of this route was dropped, so the route never applies")
        return None

    request_ops, response_ops, header_authority = _headers(rule.get("headers"), f"{field}.headers")
    rewrite = _rewrite(rule.get("rewrite"), f"{field}.rewrite", matches)
    if header_authority is not None:
        if rewrite is not None and rewrite.authority is not None:
            raise Invalid(f"{field}.headers.request", "the authority is set both by rewrite.authority and by a "
                                                      "host/:authority header; set it once")
        rewrite = Rewrite(authority=header_authority) if rewrite is None else Rewrite(
            prefix=rewrite.prefix, regex=rewrite.regex, substitution=rewrite.substitution, authority=header_authority)

    destination_fields: tuple[str, ...] = ()
    action: RouteAction
    if "redirect" in rule:
        action = _redirect(rule["redirect"], f"{field}.redirect")
    elif "directResponse" in rule:
        action = _direct_response(rule["directResponse"], f"{field}.directResponse")
    else:
        action, destination_fields = _forward(rule["route"], f"{field}.route", namespace, domain, services, diag)

    mirrors, mirror_fields = _mirrors(rule, field, namespace, domain, services, diag)
    name = rule.get("name")
    route = Route(
        name=expect_str(name, f"{field}.name") if name is not None else f"{namespace}.{vs_name}.{index}",
        matches=tuple(matches),
        action=action,
        timeout=parse_istio_duration(rule["timeout"], f"{field}.timeout") if "timeout" in rule else None,
        retries=_retries(rule.get("retries"), f"{field}.retries"),
        fault=_fault(rule.get("fault"), f"{field}.fault", diag),
        mirrors=mirrors,
        request_headers=request_ops,
        response_headers=response_ops,
        rewrite=rewrite,
        origin=f"{KIND} {namespace}/{vs_name} {field}",
    )
    if rule.get("corsPolicy"):
        diag.warning(f"{field}.corsPolicy", "CORS is not supported by this waypoint; the route applies without it")
    return CompiledRoute(route, field, destination_fields, mirror_fields)


# ---------------------------------------------------------------------------------------------------
# Matches
# ---------------------------------------------------------------------------------------------------

def _matches(raw: object, field: str, diag: Diagnostics) -> tuple[list[RouteMatch], bool]:
    """The route's usable matches, and whether there were matches but none was usable."""
    if raw is None:
        return [], False
    entries = expect_list(raw, field)
    matches: list[RouteMatch] = []
    for j, entry in enumerate(entries):
        compiled = _match(entry, f"{field}[{j}]", diag)
        if compiled is not None:
            matches.append(compiled)
    return matches, bool(entries) and not matches


def _match(raw: object, field: str, diag: Diagnostics) -> RouteMatch | None:
    body = expect_mapping(raw, field)
    check_fields(body, _MATCH_FIELDS, field)
    if body.get("sourceLabels"):
        diag.warning(f"{field}.sourceLabels", "waypoints cannot select by client labels (Istio ambient drops "
                                              "such matches); this match is ignored")
        return None
    if body.get("sourceNamespace"):
        diag.warning(f"{field}.sourceNamespace", "waypoints cannot select by client namespace; this match is "
                                                 "ignored")
        return None
    gateways = [expect_str(g, f"{field}.gateways[{i}]") for i, g in enumerate(expect_list(body.get("gateways", []),
                                                                                        f"{field}.gateways"))]
    if gateways and MESH_GATEWAY not in gateways:
        diag.warning(f"{field}.gateways", f"applies to {', '.join(gateways)} only, not to \"mesh\"; this match "
                                          "is ignored by waypoints")
        return None

    ignore_case = expect_bool(body["ignoreUriCase"], f"{field}.ignoreUriCase") if "ignoreUriCase" in body else False
    headers: list[HeaderMatch] = []
    for name, value in _string_map(body.get("headers"), f"{field}.headers"):
        where = f"{field}.headers.{name}"
        if name.startswith("@request.auth.claims"):
            diag.error(where, "routing on JWT claims is not supported by this waypoint; this match is ignored")
            return None
        if name in _IGNORED_HEADER_KEYS:
            diag.warning(where, f"Istio ignores the header key {name!r} in a match (use the {name} field)")
            continue
        headers.append(HeaderMatch(name, _string_match(value, where, presence_star=False)))
    for name, value in _string_map(body.get("withoutHeaders"), f"{field}.withoutHeaders"):
        where = f"{field}.withoutHeaders.{name}"
        headers.append(HeaderMatch(name, _string_match(value, where, presence_star=True), invert=True))
    query = [QueryParamMatch(name, _string_match(value, f"{field}.queryParams.{name}", presence_star=True))
             for name, value in _string_map(body.get("queryParams"), f"{field}.queryParams", lower=False)]
    return RouteMatch(
        name=expect_str(body["name"], f"{field}.name", allow_empty=True) if "name" in body else "",
        path=_uri_match(body.get("uri"), f"{field}.uri", ignore_case),
        method=_optional_string_match(body.get("method"), f"{field}.method"),
        authority=_optional_string_match(body.get("authority"), f"{field}.authority"),
        scheme=_optional_string_match(body.get("scheme"), f"{field}.scheme"),
        headers=tuple(headers),
        query_params=tuple(query),
        port=port_number(body["port"], f"{field}.port") if body.get("port") else None,
    )


def _string_map(raw: object, field: str, *, lower: bool = True) -> list[tuple[str, object]]:
    if raw is None:
        return []
    body = expect_mapping(raw, field)
    pairs = [(expect_str(key, field), value) for key, value in body.items()]
    if lower:
        pairs = [(key.lower(), value) for key, value in pairs]
    return sorted(pairs, key=lambda pair: pair[0])


def _uri_match(raw: object, field: str, ignore_case: bool) -> PathMatch | None:
    if raw is None:
        return None
    body = expect_mapping(raw, field)
    kind, value = _one_of(body, field)
    if kind is None:
        return None
    if kind == "regex":
        return PathMatch("regex", compile_regex(value, f"{field}.regex"))
    return PathMatch("exact" if kind == "exact" else "prefix", value, ignore_case)


def _optional_string_match(raw: object, field: str) -> StringMatch | None:
    if raw is None:
        return None
    return _string_match(raw, field, presence_star=False)


def _string_match(raw: object, field: str, *, presence_star: bool) -> StringMatch | None:
    """An Istio StringMatch; None (or `{}`) means "present". In withoutHeaders and queryParams,
    `regex: "*"` also means "present" (Istio's canBeConvertedToPresentMatch)."""
    if raw is None:
        return None
    body = expect_mapping(raw, field)
    kind, value = _one_of(body, field)
    if kind is None:
        return None
    if kind == "regex":
        if presence_star and value == "*":
            return None
        return StringMatch("regex", compile_regex(value, f"{field}.regex"))
    if kind == "prefix" and not value:
        raise Invalid(f"{field}.prefix", "a prefix match must not be empty")
    return StringMatch(kind, value)


_MatchKind = Literal["exact", "prefix", "regex"]
_MATCH_KINDS: tuple[_MatchKind, ...] = ("exact", "prefix", "regex")


def _one_of(body: Mapping[str, Any], field: str) -> tuple[_MatchKind | None, str]:
    check_fields(body, _STRING_MATCH_FIELDS, field)
    present = [key for key in _MATCH_KINDS if key in body]
    if len(present) > 1:
        raise Invalid(field, f"set only one of exact, prefix, regex (got {', '.join(present)})")
    if not present:
        return None, ""
    kind = present[0]
    return kind, expect_str(body[kind], f"{field}.{kind}", allow_empty=True)


# ---------------------------------------------------------------------------------------------------
# Destinations
# ---------------------------------------------------------------------------------------------------

def _destination(raw: object, field: str, namespace: str, domain: str, services: ServiceLookup,
                 diag: Diagnostics) -> tuple[str, int | None, str | None]:
    body = expect_mapping(raw, field)
    check_fields(body, _DESTINATION_FIELDS, field)
    host = expect_str(body.get("host"), f"{field}.host")
    if "*" in host:
        raise Invalid(f"{field}.host", f"a destination must name one service, not a wildcard ({host!r})")
    if is_ip(host):
        service = services(host)
        if service is None:
            raise Invalid(f"{field}.host", f"{host} is not the VIP of any known service")
        hostname = service.hostname
    else:
        hostname = fqdn(host, namespace, domain)
        if services(hostname) is None:
            hint = ""
            if "." in host and services(f"{hostname}.svc.{domain}") is not None:
                hint = f" (did you mean {hostname}.svc.{domain}? only names without dots are expanded)"
            diag.warning(f"{field}.host", f"no known service {hostname}; requests routed here fail with 503{hint}")
    port: int | None = None
    if "port" in body:
        port_body = expect_mapping(body["port"], f"{field}.port")
        check_fields(port_body, {"number"}, f"{field}.port")
        if "number" in port_body:
            port = port_number(port_body["number"], f"{field}.port.number")
    subset = expect_str(body["subset"], f"{field}.subset") if body.get("subset") is not None else None
    return hostname, port, subset


def _forward(raw: object, field: str, namespace: str, domain: str, services: ServiceLookup,
             diag: Diagnostics) -> tuple[Forward, tuple[str, ...]]:
    entries = expect_list(raw, field)
    parsed: list[tuple[WeightedDestination, str]] = []
    total = 0
    for j, entry in enumerate(entries):
        where = f"{field}[{j}]"
        body = expect_mapping(entry, where)
        check_fields(body, _ROUTE_DESTINATION_FIELDS, where)
        if "destination" not in body:
            raise Invalid(f"{where}.destination", "required")
        host, port, subset = _destination(body["destination"], f"{where}.destination", namespace, domain,
                                          services, diag)
        weight = expect_int(body.get("weight", 0), f"{where}.weight")
        if weight < 0:
            raise Invalid(f"{where}.weight", f"weight {weight} is negative")
        request_ops, response_ops, authority = _headers(body.get("headers"), f"{where}.headers")
        total += weight
        parsed.append((WeightedDestination(host, port, subset, weight, request_ops, response_ops, authority),
                       f"{where}.destination"))
    if len(parsed) == 1:
        only, only_field = parsed[0]
        return Forward((WeightedDestination(only.host, only.port, only.subset, 1, only.request_headers,
                                            only.response_headers, only.authority),)), (only_field,)
    if total == 0:
        raise Invalid(f"{field}[0].weight", f"the weights of these {len(parsed)} destinations sum to 0; give "
                                            "each a weight (they are shares of 100)")
    if total != 100:
        diag.warning(f"{field}[0].weight", f"the weights sum to {total}, not 100; each destination gets "
                                           "weight/sum of the traffic (Istio normalizes the same way)")
    kept = [(destination, where) for destination, where in parsed if destination.weight > 0]
    return Forward(tuple(d for d, _ in kept)), tuple(w for _, w in kept)


def _mirrors(rule: Mapping[str, Any], field: str, namespace: str, domain: str, services: ServiceLookup,
             diag: Diagnostics) -> tuple[tuple[Mirror, ...], tuple[str, ...]]:
    mirrors: list[Mirror] = []
    fields: list[str] = []
    if rule.get("mirror") is not None:
        host, port, subset = _destination(rule["mirror"], f"{field}.mirror", namespace, domain, services, diag)
        percentage = 100.0
        if "mirrorPercentage" in rule:
            percentage = parse_percent(rule["mirrorPercentage"], f"{field}.mirrorPercentage")
        else:
            for legacy in ("mirrorPercent", "mirror_percent"):
                if legacy in rule:
                    percentage = percent_number(rule[legacy], f"{field}.{legacy}")
                    diag.warning(f"{field}.{legacy}", f"{legacy} is deprecated; use mirrorPercentage: {{value: ...}}")
        if percentage > 0:  # an explicit 0 turns mirroring off
            mirrors.append(Mirror(host, port, subset, percentage))
            fields.append(f"{field}.mirror")
    for j, entry in enumerate(expect_list(rule.get("mirrors", []), f"{field}.mirrors")):
        where = f"{field}.mirrors[{j}]"
        body = expect_mapping(entry, where)
        check_fields(body, _MIRROR_POLICY_FIELDS, where)
        if "destination" not in body:
            raise Invalid(f"{where}.destination", "required")
        host, port, subset = _destination(body["destination"], f"{where}.destination", namespace, domain,
                                          services, diag)
        percentage = parse_percent(body["percentage"], f"{where}.percentage") if "percentage" in body else 100.0
        if percentage > 0:
            mirrors.append(Mirror(host, port, subset, percentage))
            fields.append(f"{where}.destination")
    return tuple(mirrors), tuple(fields)


# ---------------------------------------------------------------------------------------------------
# Headers, rewrite, redirect, direct response
# ---------------------------------------------------------------------------------------------------

def _headers(raw: object, field: str) -> tuple[HeaderOps, HeaderOps, str | None]:
    """(request ops, response ops, authority set through a request host/:authority header)."""
    if raw is None:
        return NO_HEADER_OPS, NO_HEADER_OPS, None
    body = expect_mapping(raw, field)
    check_fields(body, _HEADERS_FIELDS, field)
    request, authority = _header_operations(body.get("request"), f"{field}.request", allow_authority=True)
    response, _ = _header_operations(body.get("response"), f"{field}.response", allow_authority=False)
    return request, response, authority


def _header_operations(raw: object, field: str, *, allow_authority: bool) -> tuple[HeaderOps, str | None]:
    if raw is None:
        return NO_HEADER_OPS, None
    body = expect_mapping(raw, field)
    check_fields(body, _HEADER_OPERATION_FIELDS, field)
    authority: str | None = None
    pairs: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
    for operation in ("set", "add"):
        for name, value in sorted(expect_mapping(body.get(operation, {}), f"{field}.{operation}").items()):
            where = f"{field}.{operation}.{name}"
            lowered = expect_str(name, where).lower()
            text = expect_str(value, where, allow_empty=True)
            if lowered in _AUTHORITY_HEADERS:
                if not allow_authority:
                    raise Invalid(where, "the authority can only be set on requests")
                if authority is not None:
                    raise Invalid(where, "the authority header is set more than once")
                authority = text
                continue
            if lowered.startswith(":"):
                raise Invalid(where, f"pseudo-header {name!r} cannot be modified")
            pairs[operation].append((lowered, text))
    removes = []
    for i, name in enumerate(expect_list(body.get("remove", []), f"{field}.remove")):
        lowered = expect_str(name, f"{field}.remove[{i}]").lower()
        if lowered.startswith(":") or lowered == "host":
            raise Invalid(f"{field}.remove[{i}]", f"{name!r} cannot be removed")
        removes.append(lowered)
    return HeaderOps(tuple(pairs["set"]), tuple(pairs["add"]), tuple(removes)), authority


def _rewrite(raw: object, field: str, matches: Sequence[RouteMatch]) -> Rewrite | None:
    if raw is None:
        return None
    body = expect_mapping(raw, field)
    check_fields(body, _REWRITE_FIELDS, field)
    uri = expect_str(body["uri"], f"{field}.uri", allow_empty=True) if "uri" in body else ""
    authority = expect_str(body["authority"], f"{field}.authority") if "authority" in body else None
    regex_body = body.get("uriRegexRewrite")
    if uri and regex_body is not None:
        raise Invalid(field, "set either uri or uriRegexRewrite, not both")
    if regex_body is not None:
        where = f"{field}.uriRegexRewrite"
        rx = expect_mapping(regex_body, where)
        check_fields(rx, {"match", "rewrite"}, where)
        pattern = compile_regex(expect_str(rx.get("match"), f"{where}.match"), f"{where}.match")
        substitution = expect_str(rx.get("rewrite", ""), f"{where}.rewrite", allow_empty=True)
        return Rewrite(regex=re.compile(pattern), substitution=substitution, authority=authority)
    if uri:
        for match in matches:
            if match.path is not None and match.path.kind == "regex":
                raise Invalid(f"{field}.uri", "rewrite.uri replaces the matched prefix and cannot be used with a "
                                              "regex uri match; use uriRegexRewrite")
        return Rewrite(prefix=uri, authority=authority)
    if authority is None:
        raise Invalid(field, "a rewrite needs uri, uriRegexRewrite or authority")
    return Rewrite(authority=authority)


def _redirect(raw: object, field: str) -> Redirect:
    body = expect_mapping(raw, field)
    check_fields(body, _REDIRECT_FIELDS, field)
    uri = expect_str(body["uri"], f"{field}.uri") if body.get("uri") else None
    prefix = expect_str(body["prefixRewrite"], f"{field}.prefixRewrite") if body.get("prefixRewrite") else None
    authority = expect_str(body["authority"], f"{field}.authority") if body.get("authority") else None
    scheme = expect_str(body["scheme"], f"{field}.scheme") if body.get("scheme") else None
    if scheme is not None and scheme not in ("http", "https"):
        raise Invalid(f"{field}.scheme", f"scheme must be http or https, got {scheme!r}")
    if "port" in body and "derivePort" in body:
        raise Invalid(field, "set either port or derivePort, not both")
    port = port_number(body["port"], f"{field}.port") if body.get("port") else None
    derive: Literal["request", "scheme"] | None = None
    if "derivePort" in body:
        derive = _DERIVE_PORT[expect_choice(body["derivePort"], _DERIVE_PORT, f"{field}.derivePort", "a derivePort")]
    code = expect_int(body.get("redirectCode", VS_REDIRECT_CODE) or VS_REDIRECT_CODE, f"{field}.redirectCode")
    if code not in REDIRECT_CODES:
        raise Invalid(f"{field}.redirectCode", f"{code} is not a redirect code (use one of "
                                               f"{', '.join(map(str, sorted(REDIRECT_CODES)))})")
    if uri is None and prefix is None and authority is None and scheme is None and port is None and derive is None:
        raise Invalid(field, "a redirect needs at least one of uri, authority, scheme, port")
    return Redirect(uri=uri, prefix_rewrite=prefix, authority=authority, scheme=scheme, port=port,
                    derive_port=derive, code=code)


def _direct_response(raw: object, field: str) -> DirectResponse:
    body = expect_mapping(raw, field)
    check_fields(body, _DIRECT_RESPONSE_FIELDS, field)
    status = expect_int(body.get("status"), f"{field}.status", minimum=200, maximum=599)
    payload = b""
    if body.get("body") is not None:
        where = f"{field}.body"
        content = expect_mapping(body["body"], where)
        check_fields(content, {"string", "bytes"}, where)
        if "string" in content and "bytes" in content:
            raise Invalid(where, "set either string or bytes, not both")
        if "string" in content:
            payload = expect_str(content["string"], f"{where}.string", allow_empty=True).encode()
        elif "bytes" in content:
            try:
                payload = base64.b64decode(expect_str(content["bytes"], f"{where}.bytes"), validate=True)
            except binascii.Error:
                raise Invalid(f"{where}.bytes", "not valid base64") from None
    return DirectResponse(status, payload)


# ---------------------------------------------------------------------------------------------------
# Retries and faults
# ---------------------------------------------------------------------------------------------------

def _retries(raw: object, field: str) -> RetryPolicy | None:
    if raw is None:
        return DEFAULT_RETRY_POLICY
    body = expect_mapping(raw, field)
    check_fields(body, _RETRY_FIELDS, field)
    attempts = expect_int(body.get("attempts", 0), f"{field}.attempts")
    if attempts < 0:
        raise Invalid(f"{field}.attempts", f"attempts cannot be negative (got {attempts})")
    if attempts == 0:
        if any(key in body for key in ("perTryTimeout", "retryOn", "retryRemoteLocalities", "backoff")):
            raise Invalid(f"{field}.attempts", "attempts is 0 (retries disabled) but other retry settings are set")
        return None
    per_try = parse_istio_duration(body["perTryTimeout"], f"{field}.perTryTimeout") if "perTryTimeout" in body \
        else None
    backoff = parse_istio_duration(body["backoff"], f"{field}.backoff") if "backoff" in body else None
    retry_on, codes = parse_retry_on(body.get("retryOn"), f"{field}.retryOn")
    ignore_previous = True
    if "retryIgnorePreviousHosts" in body:
        ignore_previous = expect_bool(body["retryIgnorePreviousHosts"], f"{field}.retryIgnorePreviousHosts")
    if "retryRemoteLocalities" in body:
        expect_bool(body["retryRemoteLocalities"], f"{field}.retryRemoteLocalities")
    return RetryPolicy(attempts, per_try, retry_on, codes, backoff, ignore_previous)


def parse_retry_on(raw: object, field: str) -> tuple[frozenset[str], frozenset[int]]:
    """`retryOn: "5xx,gateway-error,503"` → (named conditions, status codes). Empty → Istio's default."""
    if raw is None or raw == "":
        return DEFAULT_RETRY_ON, DEFAULT_RETRIABLE_STATUS_CODES
    text = expect_str(raw, field)
    names: set[str] = set()
    codes: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if item.isdigit():
            if int(item) not in _HTTP_STATUS_CODES:
                raise Invalid(field, f"{item} is not an HTTP status code")
            codes.add(int(item))
        elif item in RETRY_ON_POLICIES:
            names.add(item)
        else:
            raise Invalid(field, f"{item!r} is not a valid retryOn policy (valid: "
                                 f"{', '.join(sorted(RETRY_ON_POLICIES))}, or status codes)")
    if codes:
        names.add("retriable-status-codes")
    return frozenset(names), frozenset(codes)


def _fault(raw: object, field: str, diag: Diagnostics) -> Fault | None:
    if raw is None:
        return None
    body = expect_mapping(raw, field)
    check_fields(body, _FAULT_FIELDS, field)
    if not body.get("delay") and not body.get("abort"):
        raise Invalid(field, "a fault needs delay or abort")
    delay = _delay(body["delay"], f"{field}.delay", diag) if body.get("delay") else None
    abort = _abort(body["abort"], f"{field}.abort", diag) if body.get("abort") else None
    if delay is None and abort is None:
        return None
    return Fault(delay, abort)


def _fault_percentage(body: Mapping[str, Any], field: str, diag: Diagnostics) -> float:
    if "percentage" in body:
        return parse_percent(body["percentage"], f"{field}.percentage")
    if "percent" in body:
        diag.warning(f"{field}.percent", "percent is deprecated; use percentage: {value: ...}")
        return percent_number(expect_int(body["percent"], f"{field}.percent"), f"{field}.percent")
    diag.warning(f"{field}.percentage", "no percentage: Istio injects this fault into no requests "
                                        "(set percentage: {value: 100} for all)")
    return 0.0


def _delay(raw: object, field: str, diag: Diagnostics) -> FaultDelay | None:
    body = expect_mapping(raw, field)
    check_fields(body, _DELAY_FIELDS, field)
    if "exponentialDelay" in body:
        diag.warning(f"{field}.exponentialDelay", "exponential delays are not supported (Istio drops them too); "
                                                  "this delay is ignored")
        return None
    if "fixedDelay" not in body:
        raise Invalid(f"{field}.fixedDelay", "required")
    return FaultDelay(parse_istio_duration(body["fixedDelay"], f"{field}.fixedDelay"),
                      _fault_percentage(body, field, diag))


def _abort(raw: object, field: str, diag: Diagnostics) -> FaultAbort | None:
    body = expect_mapping(raw, field)
    check_fields(body, _ABORT_FIELDS, field)
    if "http2Error" in body:
        diag.warning(f"{field}.http2Error", "HTTP/2 error aborts are not supported (Istio drops them too); "
                                            "this abort is ignored")
        return None
    if "httpStatus" in body:
        status = expect_int(body["httpStatus"], f"{field}.httpStatus", minimum=200, maximum=599)
        return FaultAbort(status, _fault_percentage(body, field, diag))
    if "grpcStatus" in body:
        name = expect_str(body["grpcStatus"], f"{field}.grpcStatus")
        if name not in _GRPC_STATUS:
            raise Invalid(f"{field}.grpcStatus", f"{name!r} is not a gRPC status name (e.g. UNAVAILABLE)")
        return FaultAbort(None, _fault_percentage(body, field, diag), grpc_status=_GRPC_STATUS[name])
    raise Invalid(field, "an abort needs httpStatus or grpcStatus")
