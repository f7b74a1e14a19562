"""DestinationRule (networking.istio.io, as a dict) → TrafficPolicy layers and subsets, with errors.

The waypoint applies DestinationRules to the destinations it forwards to: subsets select endpoints by
pod labels (Istio's ambient mode does not support subsets; we do, for the canary tutorials), the
traffic policy sets load balancing, the connection pool (circuit breaking) and outlier detection.
`DestinationPolicy.resolve` (model.py) merges the layers for one subset and port the way Istio does.

A section that fails validation (say `connectionPool`) is dropped on its own with a ConfigError and
the rest of the rule still applies; a subset that fails is dropped (routes naming it are then dropped
by `table.py`); a rule without a usable host is dropped. `exportTo` and `tls` are accepted and
ignored: every waypoint sees every rule, and HBONE is always mutual TLS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from waypoint.routing.model import (
    DEFAULT_BASE_EJECTION_TIME,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_HTTP_IDLE_TIMEOUT,
    DEFAULT_LB_ALGORITHM,
    DEFAULT_MAX_EJECTION_PERCENT,
    DEFAULT_MIN_HEALTH_PERCENT,
    DEFAULT_OUTLIER_INTERVAL,
    ConfigError,
    ConnectionPoolSettings,
    ConsistentHash,
    DestinationPolicy,
    Diagnostics,
    HashCookie,
    Invalid,
    LbAlgorithm,
    LoadBalancer,
    OutlierSettings,
    Subset,
    TrafficPolicy,
    check_fields,
    expect_bool,
    expect_choice,
    expect_int,
    expect_labels,
    expect_list,
    expect_mapping,
    expect_str,
    fqdn,
    metadata_of,
    parse_duration,
    parse_istio_duration,
    port_number,
)

KIND = "DestinationRule"
API_VERSIONS = frozenset({"networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"})

_SPEC_FIELDS = {"host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"}
_POLICY_FIELDS = {"loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings", "tunnel",
                  "proxyProtocol", "retryBudget"}
_PORT_POLICY_FIELDS = {"port", "loadBalancer", "connectionPool", "outlierDetection", "tls"}
_UNSUPPORTED_POLICY_FIELDS = ("tunnel", "proxyProtocol", "retryBudget")
_SUBSET_FIELDS = {"name", "labels", "trafficPolicy"}
_LB_FIELDS = {"simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup", "zoneAwareLbSetting"}
_HASH_FIELDS = {"httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName", "ringHash", "maglev",
                "minimumRingSize"}
_HASH_KEYS = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
_COOKIE_FIELDS = {"name", "path", "ttl", "attributes"}
_POOL_FIELDS = {"tcp", "http"}
_TCP_FIELDS = {"maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration", "idleTimeout"}
_HTTP_POOL_FIELDS = {"http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries",
                     "idleTimeout", "h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams", "http2KeepAlive"}
_OUTLIER_FIELDS = {"consecutiveErrors", "consecutive5xxErrors", "consecutiveGatewayErrors",
                   "consecutiveLocalOriginFailures", "splitExternalLocalOriginErrors", "interval", "baseEjectionTime",
                   "maxEjectionPercent", "minHealthPercent", "outlierDetectionHttpErrorCodes"}
_SIMPLE_LB = {"ROUND_ROBIN": LbAlgorithm.ROUND_ROBIN, "LEAST_REQUEST": LbAlgorithm.LEAST_REQUEST,
              "LEAST_CONN": LbAlgorithm.LEAST_REQUEST, "RANDOM": LbAlgorithm.RANDOM,
              "PASSTHROUGH": LbAlgorithm.PASSTHROUGH, "UNSPECIFIED": DEFAULT_LB_ALGORITHM}

T = TypeVar("T")


@dataclass(frozen=True)
class CompiledDestinationRule:
    namespace: str
    name: str
    created: str
    host: str                              # FQDN or "*.suffix" pattern; "" when unusable
    top: TrafficPolicy | None              # None when the rule sets no top-level trafficPolicy
    subsets: tuple[Subset, ...]
    errors: tuple[ConfigError, ...]
    subset_fields: Mapping[str, str] = field(default_factory=dict)  # subset name → "spec.subsets[i]"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.created, self.namespace, self.name)

    @property
    def origin(self) -> str:
        return f"{KIND} {self.namespace}/{self.name}"


def compile_destination_rule(obj: Mapping[str, Any], domain: str = "cluster.local") -> CompiledDestinationRule:
    """Compile one DestinationRule. Never raises for bad input: problems become ConfigErrors."""
    namespace, name, created = metadata_of(obj)
    diag = Diagnostics(KIND, namespace, name)

    def unusable(where: str, message: str) -> CompiledDestinationRule:
        diag.error(where, message)
        return CompiledDestinationRule(namespace, name, created, "", None, (), tuple(diag.errors))

    api_version = obj.get("apiVersion")
    if api_version is not None and (not isinstance(api_version, str) or api_version not in API_VERSIONS):
        return unusable("apiVersion", f"{api_version!r} is not a DestinationRule API version")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return unusable("spec", "missing or not an object")
    for unknown in sorted(set(spec) - _SPEC_FIELDS):
        diag.error(f"spec.{unknown}", f"unknown field {unknown!r}; ignored (known: {', '.join(sorted(_SPEC_FIELDS))})")
    host = spec.get("host")
    if not isinstance(host, str) or not host:
        return unusable("spec.host", "a DestinationRule needs a host")
    if spec.get("workloadSelector"):
        diag.warning("spec.workloadSelector", "a DestinationRule with workloadSelector applies to the selected "
                                              "client workloads only; waypoints ignore it")
        return CompiledDestinationRule(namespace, name, created, "", None, (), tuple(diag.errors))

    top = traffic_policy(spec["trafficPolicy"], "spec.trafficPolicy", diag) if "trafficPolicy" in spec else None
    subsets: list[Subset] = []
    subset_fields: dict[str, str] = {}
    try:
        entries = expect_list(spec.get("subsets", []), "spec.subsets")
    except Invalid as exc:
        diag.rejected(exc)
        entries = []
    for i, entry in enumerate(entries):
        where = f"spec.subsets[{i}]"
        try:
            subset = _subset(entry, where, diag)
        except Invalid as exc:
            diag.rejected(exc)
            continue
        if subset.name in subset_fields:
            diag.error(f"{where}.name", f"duplicate subset name {subset.name!r} (first defined at "
                                        f"{subset_fields[subset.name]}); this one is ignored")
            continue
        subsets.append(subset)
        subset_fields[subset.name] = where
    return CompiledDestinationRule(namespace, name, created, fqdn(host, namespace, domain), top, tuple(subsets),
                                   tuple(diag.errors), subset_fields)


def merge_rules(hostname: str, rules: Sequence[CompiledDestinationRule]) -> tuple[DestinationPolicy, list[ConfigError]]:
    """Istio's mergeDestinationRule for rules of one host in one namespace, oldest first: subsets are
    concatenated (a later duplicate name is ignored), the first top-level trafficPolicy wins."""
    ordered = sorted(rules, key=lambda rule: rule.key)
    errors: list[ConfigError] = []
    subsets: dict[str, Subset] = {}
    top: TrafficPolicy | None = None
    top_origin = ""
    for rule in ordered:
        for subset in rule.subsets:
            if subset.name in subsets:
                errors.append(ConfigError(KIND, rule.namespace, rule.name, rule.subset_fields.get(subset.name, ""),
                                          f"subset {subset.name!r} is already defined by an older DestinationRule "
                                          f"for {rule.host}; this one is ignored", "warning"))
                continue
            subsets[subset.name] = subset
        if rule.top is not None:
            if top is None:
                top, top_origin = rule.top, rule.origin
            else:
                errors.append(ConfigError(KIND, rule.namespace, rule.name, "spec.trafficPolicy",
                                          f"{top_origin} also sets a trafficPolicy for {rule.host} and is older; "
                                          "this one is ignored", "warning"))
    origin = ", ".join(rule.origin for rule in ordered)
    policy = DestinationPolicy(hostname, subsets=subsets, top=top or TrafficPolicy(), origin=origin)
    return policy.resolve(None, None), errors


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------

def _section(parse: Callable[[Any, str], T], raw: object, where: str, diag: Diagnostics) -> T | None:
    """Parse one section; on failure record the error and drop only this section."""
    try:
        return parse(raw, where)
    except Invalid as exc:
        diag.error(exc.field, f"{exc.message}; {where} is ignored")
        return None


def traffic_policy(raw: object, where: str, diag: Diagnostics, *, port_level: bool = True) -> TrafficPolicy | None:
    try:
        body = expect_mapping(raw, where)
    except Invalid as exc:
        diag.rejected(exc)
        return None
    known = _POLICY_FIELDS if port_level else _PORT_POLICY_FIELDS
    for unknown in sorted(set(body) - known):
        diag.error(f"{where}.{unknown}", f"unknown field {unknown!r}; ignored")
    for unsupported in _UNSUPPORTED_POLICY_FIELDS:
        if body.get(unsupported):
            diag.warning(f"{where}.{unsupported}", f"{unsupported} is not supported by this waypoint; ignored")
    lb = _section(lambda r, w: _load_balancer(r, w, diag), body["loadBalancer"], f"{where}.loadBalancer",
                  diag) if "loadBalancer" in body else None
    pool = _section(lambda r, w: _connection_pool(r, w, diag), body["connectionPool"], f"{where}.connectionPool",
                    diag) if "connectionPool" in body else None
    outlier = _section(lambda r, w: _outlier(r, w, diag), body["outlierDetection"], f"{where}.outlierDetection",
                       diag) if "outlierDetection" in body else None
    overrides: dict[int, TrafficPolicy] = {}
    if port_level and "portLevelSettings" in body:
        try:
            entries = expect_list(body["portLevelSettings"], f"{where}.portLevelSettings")
        except Invalid as exc:
            diag.rejected(exc)
            entries = []
        for i, entry in enumerate(entries):
            item = f"{where}.portLevelSettings[{i}]"
            try:
                port = _port_of(entry, item)
            except Invalid as exc:
                diag.error(exc.field, f"{exc.message}; {item} is ignored")
                continue
            if port in overrides:
                diag.warning(f"{item}.port", f"port {port} already has settings earlier in the list; these are "
                                             "ignored (Istio uses the first)")
                continue
            layer = traffic_policy(entry, item, diag, port_level=False)
            if layer is not None:
                overrides[port] = layer
    return TrafficPolicy(lb, pool, outlier, overrides)


def _port_of(raw: object, where: str) -> int:
    body = expect_mapping(raw, where)
    port = expect_mapping(body.get("port"), f"{where}.port")
    check_fields(port, {"number"}, f"{where}.port")
    return port_number(port.get("number"), f"{where}.port.number")


def _subset(raw: object, where: str, diag: Diagnostics) -> Subset:
    body = expect_mapping(raw, where)
    check_fields(body, _SUBSET_FIELDS, where)
    name = expect_str(body.get("name"), f"{where}.name")
    labels = expect_labels(body.get("labels", {}), f"{where}.labels")
    policy = traffic_policy(body["trafficPolicy"], f"{where}.trafficPolicy", diag) if "trafficPolicy" in body \
        else None
    return Subset(name, labels, policy)


def _load_balancer(raw: object, where: str, diag: Diagnostics) -> LoadBalancer:
    body = expect_mapping(raw, where)
    check_fields(body, _LB_FIELDS, where)
    for unsupported in ("localityLbSetting", "warmupDurationSecs", "warmup", "zoneAwareLbSetting"):
        if body.get(unsupported):
            diag.warning(f"{where}.{unsupported}", f"{unsupported} is not supported by this waypoint; ignored")
    if "simple" in body and "consistentHash" in body:
        raise Invalid(where, "set either simple or consistentHash, not both")
    if "consistentHash" in body:
        return LoadBalancer(consistent_hash=_consistent_hash(body["consistentHash"], f"{where}.consistentHash"))
    simple = expect_choice(body.get("simple", "UNSPECIFIED"), _SIMPLE_LB, f"{where}.simple", "a load balancer")
    if simple == "LEAST_CONN":
        diag.warning(f"{where}.simple", "LEAST_CONN is deprecated; it means LEAST_REQUEST")
    return LoadBalancer(simple=_SIMPLE_LB[simple])


def _consistent_hash(raw: object, where: str) -> ConsistentHash:
    body = expect_mapping(raw, where)
    check_fields(body, _HASH_FIELDS, where)
    keys = [key for key in _HASH_KEYS if key in body]
    if len(keys) != 1:
        raise Invalid(where, "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName")
    key = keys[0]
    if key == "httpHeaderName":
        return ConsistentHash(header=expect_str(body[key], f"{where}.{key}").lower())
    if key == "httpQueryParameterName":
        return ConsistentHash(query_parameter=expect_str(body[key], f"{where}.{key}"))
    if key == "useSourceIp":
        if not expect_bool(body[key], f"{where}.{key}"):
            raise Invalid(f"{where}.{key}", "useSourceIp: false selects no hash key")
        return ConsistentHash(use_source_ip=True)
    cookie_where = f"{where}.httpCookie"
    cookie = expect_mapping(body[key], cookie_where)
    check_fields(cookie, _COOKIE_FIELDS, cookie_where)
    return ConsistentHash(cookie=HashCookie(
        name=expect_str(cookie.get("name"), f"{cookie_where}.name"),
        path=expect_str(cookie["path"], f"{cookie_where}.path") if cookie.get("path") else None,
        ttl=parse_duration(cookie["ttl"], f"{cookie_where}.ttl") if "ttl" in cookie else None,
    ))


def _limit(body: Mapping[str, Any], key: str, where: str) -> int | None:
    """A connection-pool limit: absent or 0 = unlimited (Istio applies only values > 0)."""
    if key not in body:
        return None
    value = expect_int(body[key], f"{where}.{key}", minimum=0)
    return value or None


def _connection_pool(raw: object, where: str, diag: Diagnostics) -> ConnectionPoolSettings:
    body = expect_mapping(raw, where)
    check_fields(body, _POOL_FIELDS, where)
    tcp = expect_mapping(body.get("tcp", {}), f"{where}.tcp")
    check_fields(tcp, _TCP_FIELDS, f"{where}.tcp")
    http = expect_mapping(body.get("http", {}), f"{where}.http")
    check_fields(http, _HTTP_POOL_FIELDS, f"{where}.http")
    for section, unsupported in (("tcp", "tcpKeepalive"), ("http", "h2UpgradePolicy"), ("http", "useClientProtocol"),
                                 ("http", "maxConcurrentStreams"), ("http", "http2KeepAlive")):
        if (tcp if section == "tcp" else http).get(unsupported):
            diag.warning(f"{where}.{section}.{unsupported}", f"{unsupported} is not supported by this waypoint; "
                                                             "ignored")
    tcp_where, http_where = f"{where}.tcp", f"{where}.http"
    return ConnectionPoolSettings(
        max_connections=_limit(tcp, "maxConnections", tcp_where),
        http1_max_pending_requests=_limit(http, "http1MaxPendingRequests", http_where),
        http2_max_requests=_limit(http, "http2MaxRequests", http_where),
        max_requests_per_connection=_limit(http, "maxRequestsPerConnection", http_where),
        max_retries=_limit(http, "maxRetries", http_where),
        connect_timeout=parse_istio_duration(tcp["connectTimeout"], f"{tcp_where}.connectTimeout")
        if "connectTimeout" in tcp else DEFAULT_CONNECT_TIMEOUT,
        idle_timeout=parse_duration(http["idleTimeout"], f"{http_where}.idleTimeout")
        if "idleTimeout" in http else DEFAULT_HTTP_IDLE_TIMEOUT,
        tcp_idle_timeout=parse_duration(tcp["idleTimeout"], f"{tcp_where}.idleTimeout")
        if "idleTimeout" in tcp else None,
        max_connection_duration=parse_istio_duration(tcp["maxConnectionDuration"],
                                                     f"{tcp_where}.maxConnectionDuration")
        if "maxConnectionDuration" in tcp else None,
    )


def _outlier(raw: object, where: str, diag: Diagnostics) -> OutlierSettings:
    body = expect_mapping(raw, where)
    check_fields(body, _OUTLIER_FIELDS, where)
    if "consecutive5xxErrors" in body:
        consecutive_5xx = expect_int(body["consecutive5xxErrors"], f"{where}.consecutive5xxErrors", minimum=0)
        if "consecutiveErrors" in body:
            diag.warning(f"{where}.consecutiveErrors", "deprecated and overridden by consecutive5xxErrors; ignored")
    elif "consecutiveErrors" in body:
        consecutive_5xx = expect_int(body["consecutiveErrors"], f"{where}.consecutiveErrors", minimum=0)
        diag.warning(f"{where}.consecutiveErrors", "deprecated; treated as consecutive5xxErrors (use that name)")
    else:
        consecutive_5xx = DEFAULT_CONSECUTIVE_5XX
    for unsupported in ("consecutiveLocalOriginFailures", "splitExternalLocalOriginErrors"):
        if body.get(unsupported):
            diag.warning(f"{where}.{unsupported}", f"{unsupported} is not supported by this waypoint; ignored "
                                                   "(connect failures count as 5xx)")
    codes = frozenset(expect_int(code, f"{where}.outlierDetectionHttpErrorCodes[{i}]", minimum=100, maximum=599)
                      for i, code in enumerate(expect_list(body.get("outlierDetectionHttpErrorCodes", []),
                                                           f"{where}.outlierDetectionHttpErrorCodes")))
    max_ejection = expect_int(body.get("maxEjectionPercent", 0), f"{where}.maxEjectionPercent", minimum=0,
                              maximum=100)
    return OutlierSettings(
        consecutive_5xx=consecutive_5xx,
        consecutive_gateway_errors=expect_int(body.get("consecutiveGatewayErrors", 0),
                                              f"{where}.consecutiveGatewayErrors", minimum=0),
        interval=parse_istio_duration(body["interval"], f"{where}.interval") if "interval" in body
        else DEFAULT_OUTLIER_INTERVAL,
        base_ejection_time=parse_istio_duration(body["baseEjectionTime"], f"{where}.baseEjectionTime")
        if "baseEjectionTime" in body else DEFAULT_BASE_EJECTION_TIME,
        max_ejection_percent=max_ejection or DEFAULT_MAX_EJECTION_PERCENT,
        min_health_percent=expect_int(body.get("minHealthPercent", DEFAULT_MIN_HEALTH_PERCENT),
                                      f"{where}.minHealthPercent", minimum=0, maximum=100),
        error_status_codes=codes,
    )
