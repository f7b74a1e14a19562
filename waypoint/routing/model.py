"""The compiled routing model every other part of the waypoint reads.

Frozen dataclasses built once per configuration change (by `virtualservice.py`, `httproute.py`,
`destinationrule.py`, assembled by `table.py`) and read per request by the proxy. Nothing here does IO
or knows about sockets; a value here never changes after it is built.

Also here, because every compiler shares them: `ConfigError` (one rejected or suspicious piece of
configuration, with the field path a user can find in their YAML), `Invalid` (raised inside a compiler
to reject the smallest enclosing unit), duration and percentage parsing, and `dump()` for
`/config_dump`.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# ---------------------------------------------------------------------------------------------------
# Defaults (Istio's, each with the reason)
# ---------------------------------------------------------------------------------------------------

#: MeshConfig.connectTimeout defaults to 10s; DestinationRule connectionPool.tcp.connectTimeout too.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: connectionPool.http.idleTimeout: "If not set, the default is 1 hour" (Envoy's HTTP default).
DEFAULT_HTTP_IDLE_TIMEOUT = 3600.0
#: outlierDetection.consecutive5xxErrors "defaults to 5 but can be disabled by setting the value to 0".
DEFAULT_CONSECUTIVE_5XX = 5
#: outlierDetection.interval "Default is 10s".
DEFAULT_OUTLIER_INTERVAL = 10.0
#: outlierDetection.baseEjectionTime "Default is 30s".
DEFAULT_BASE_EJECTION_TIME = 30.0
#: outlierDetection.maxEjectionPercent "Defaults to 10%".
DEFAULT_MAX_EJECTION_PERCENT = 10
#: outlierDetection.minHealthPercent: Istio sets Envoy's panic threshold to 0 unless told otherwise.
DEFAULT_MIN_HEALTH_PERCENT = 0
#: Istio's retry policy when a route says nothing (route/retry/retry.go defaultRetryOn, 2 retries).
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_ON = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                              "retriable-status-codes"})
DEFAULT_RETRIABLE_STATUS_CODES = frozenset({503})  # with it, as Istio's DefaultPolicy
#: The route Istio gives a waypoint's service that has no VirtualService/HTTPRoute: inbound default,
#: 2 retries on reset-before-request (retry.go defaultInboundRetryOn), no timeout.
DEFAULT_INBOUND_RETRY_ON = frozenset({"reset-before-request"})
#: Envoy's retry_on vocabulary as Istio validates it (pkg/config/validation/agent supportedRetryOnPolicies),
#: HTTP conditions then gRPC status conditions.
RETRY_ON_POLICIES = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "retriable-4xx",
    "refused-stream", "retriable-status-codes", "retriable-headers", "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
})
#: VirtualService redirects default to 301 (Envoy MOVED_PERMANENTLY); HTTPRoute's CRD default is 302.
VS_REDIRECT_CODE = 301
GATEWAY_REDIRECT_CODE = 302
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

Severity = Literal["error", "warning"]


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigError:
    """One piece of configuration we rejected (severity "error") or accepted with a caveat ("warning").

    `field` is the path inside the object (`spec.http[1].route[0].weight`) so the user can find it.
    """

    kind: str
    namespace: str
    name: str
    field: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.severity}: {self.kind} {self.namespace}/{self.name}: {where}{self.message}"


class Invalid(Exception):
    """Raised inside a compiler: the enclosing unit (an http route, a rule, a subset) is rejected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RoutingError(Exception):
    """Base of the errors the routing package raises at runtime; `reason` is a stable label."""

    reason = "routing"


class UnknownSubset(RoutingError, LookupError):
    """`policy_for` asked for a subset no DestinationRule defines (routes naming one are dropped)."""

    reason = "unknown_subset"


class Diagnostics:
    """Collects the ConfigErrors of one resource while it compiles."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.errors: list[ConfigError] = []

    def error(self, field: str, message: str) -> None:
        self.errors.append(ConfigError(self.kind, self.namespace, self.name, field, message, "error"))

    def warning(self, field: str, message: str) -> None:
        self.errors.append(ConfigError(self.kind, self.namespace, self.name, field, message, "warning"))

    def rejected(self, exc: Invalid) -> None:
        self.error(exc.field, exc.message)


# ---------------------------------------------------------------------------------------------------
# Request-side matching
# ---------------------------------------------------------------------------------------------------

StringMatchKind = Literal["exact", "prefix", "regex", "present"]
PathMatchKind = Literal["exact", "prefix", "segment_prefix", "regex"]


@dataclass(frozen=True)
class StringMatch:
    """exact / prefix / regex (RE2-style, whole value) / present (any value, even empty)."""

    kind: StringMatchKind
    value: str = ""
    ignore_case: bool = False
    test: Callable[[str], object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "test", _string_test(self.kind, self.value, self.ignore_case))

    def matches(self, value: str) -> bool:
        return bool(self.test(value))


def _string_test(kind: str, value: str, ignore_case: bool) -> Callable[[str], object]:
    # Built once per config change so the per-request check is one call with no branching.
    if kind == "present":
        return _always
    if kind == "regex":
        return re.compile(value).fullmatch
    if ignore_case:
        folded = value.lower()
        if kind == "exact":
            return lambda v: v.lower() == folded
        return lambda v: v.lower().startswith(folded)
    if kind == "exact":
        return value.__eq__
    return lambda v: v.startswith(value)


def _always(_value: str) -> bool:
    return True


@dataclass(frozen=True)
class PathMatch:
    """How a route matches the request path.

    exact / regex: against the path without its query string (Envoy `path` / `safe_regex`);
    prefix: against the whole `:path` (Envoy `prefix`); segment_prefix: Gateway API PathPrefix, element
    by element (`/abc` matches `/abc`, `/abc/`, `/abc/def`, not `/abcd`), trailing `/` of the value ignored.
    """

    kind: PathMatchKind
    value: str
    ignore_case: bool = False
    test: Callable[[str, str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "test", _path_test(self.kind, self.value, self.ignore_case))

    def matches(self, path: str, path_only: str) -> bool:
        return self.test(path, path_only)


def _path_test(kind: str, value: str, ignore_case: bool) -> Callable[[str, str], bool]:
    if kind == "regex":
        pattern = re.compile(value)
        return lambda _path, path_only: pattern.fullmatch(path_only) is not None
    if kind == "segment_prefix":
        prefix = value.rstrip("/")
        if not prefix:  # "/" matches everything
            return lambda _path, _path_only: True
        size = len(prefix)
        if ignore_case:
            prefix = prefix.lower()
            return lambda _path, path_only: (path_only.lower().startswith(prefix)
                                             and (len(path_only) == size or path_only[size] == "/"))
        return lambda _path, path_only: (path_only.startswith(prefix)
                                         and (len(path_only) == size or path_only[size] == "/"))
    if ignore_case:
        folded = value.lower()
        if kind == "exact":
            return lambda _path, path_only: path_only.lower() == folded
        return lambda path, _path_only: path.lower().startswith(folded)
    if kind == "exact":
        return lambda _path, path_only: path_only == value
    return lambda path, _path_only: path.startswith(value)


@dataclass(frozen=True)
class HeaderMatch:
    """A request header condition. `match=None` means "present". `invert` is VirtualService
    `withoutHeaders`: the condition holds when the inner match fails; a missing header then counts as
    an empty value unless the inner match is a presence check (Envoy `treat_missing_header_as_empty`)."""

    name: str
    match: StringMatch | None = None
    invert: bool = False


@dataclass(frozen=True)
class QueryParamMatch:
    """A query parameter condition against its first value; `match=None` means "present"."""

    name: str
    match: StringMatch | None = None


@dataclass(frozen=True)
class RouteMatch:
    """All conditions hold (AND). A Route's `matches` are alternatives (OR)."""

    name: str = ""
    path: PathMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryParamMatch, ...] = ()
    port: int | None = None


# ---------------------------------------------------------------------------------------------------
# Actions and per-route policies
# ---------------------------------------------------------------------------------------------------

class HeadersLike(Protocol):
    def set(self, name: str, value: str) -> None: ...
    def add(self, name: str, value: str) -> None: ...
    def remove(self, name: str) -> None: ...


@dataclass(frozen=True)
class HeaderOps:
    """Header edits, applied in Envoy's order: remove, then set (replace), then add (append).
    Names are lower-case."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def apply(self, headers: HeadersLike) -> None:
        for name in self.remove:
            headers.remove(name)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)

    def merged(self, later: HeaderOps) -> HeaderOps:
        """Route-level ops followed by destination-level ones (Istio appends the destination's)."""
        if not later:
            return self
        if not self:
            return later
        return HeaderOps(self.set + later.set, self.add + later.add, self.remove + later.remove)


NO_HEADER_OPS = HeaderOps()


class RandomSource(Protocol):
    """random.Random, or a scripted stand-in in tests: random() is uniform in [0, 1)."""

    def random(self) -> float: ...


def sampled(percentage: float, rng: RandomSource) -> bool:
    """True for `percentage`% of calls (0 never, 100 always)."""
    return percentage >= 100.0 or (percentage > 0.0 and rng.random() * 100.0 < percentage)


@dataclass(frozen=True)
class WeightedDestination:
    """One backend of a Forward. `port=None` means the request's own port. `error` set means the
    backend is invalid (Gateway API: answer 500 for its share of traffic) and says why."""

    host: str
    port: int | None = None
    subset: str | None = None
    weight: int = 1
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    authority: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Forward:
    """Send to one of `destinations`, chosen with probability weight/sum(weights). Zero weights are
    dropped at compile time, so every destination here can receive traffic."""

    destinations: tuple[WeightedDestination, ...]
    cumulative: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        running = 0
        totals = []
        for destination in self.destinations:
            running += destination.weight
            totals.append(running)
        object.__setattr__(self, "cumulative", tuple(totals))

    @property
    def total_weight(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def choose(self, fraction: float) -> WeightedDestination:
        """The destination for a uniform random `fraction` in [0, 1)."""
        if len(self.destinations) == 1:
            return self.destinations[0]
        point = int(fraction * self.total_weight)
        return self.destinations[min(bisect.bisect_right(self.cumulative, point), len(self.destinations) - 1)]


@dataclass(frozen=True)
class Redirect:
    """Answer with a redirect. `uri` replaces the path (keeping the query unless `uri` has one);
    `prefix_rewrite` replaces the matched prefix instead (Gateway API ReplacePrefixMatch).
    `derive_port`: "request" uses the service port the request came in on, "scheme" the scheme's
    default port; None leaves the authority's port alone unless `port` is set."""

    uri: str | None = None
    prefix_rewrite: str | None = None
    authority: str | None = None
    scheme: str | None = None
    port: int | None = None
    derive_port: Literal["request", "scheme"] | None = None
    code: int = VS_REDIRECT_CODE


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: bytes = b""


Action = Forward | Redirect | DirectResponse


@dataclass(frozen=True)
class RetryPolicy:
    """Envoy's retry policy as Istio writes it: `attempts` is the number of retries after the first
    try; `retry_on` holds the named conditions, `retriable_status_codes` the numeric ones."""

    attempts: int
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    retriable_status_codes: frozenset[int] = frozenset()
    backoff: float | None = None
    ignore_previous_hosts: bool = True


#: What a VirtualService route without `retries` gets (Istio's mesh default).
DEFAULT_RETRY_POLICY = RetryPolicy(attempts=DEFAULT_RETRY_ATTEMPTS,
                                   retriable_status_codes=DEFAULT_RETRIABLE_STATUS_CODES)
#: What the route of a service with no VirtualService/HTTPRoute gets.
DEFAULT_INBOUND_RETRY_POLICY = RetryPolicy(attempts=DEFAULT_RETRY_ATTEMPTS, retry_on=DEFAULT_INBOUND_RETRY_ON,
                                           ignore_previous_hosts=False)


@dataclass(frozen=True)
class FaultDelay:
    fixed_delay: float
    percentage: float


@dataclass(frozen=True)
class FaultAbort:
    """Abort with `http_status` (or, for gRPC callers, `grpc_status` in a 200 with trailers)."""

    http_status: int | None
    percentage: float
    grpc_status: int | None = None


@dataclass(frozen=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    def delay_for(self, rng: RandomSource) -> float:
        """Seconds to delay this request (0.0 = none), drawn with the delay's percentage."""
        if self.delay is not None and sampled(self.delay.percentage, rng):
            return self.delay.fixed_delay
        return 0.0

    def abort_for(self, rng: RandomSource) -> FaultAbort | None:
        """The abort to answer this request with, drawn with the abort's percentage (None = proceed)."""
        if self.abort is not None and sampled(self.abort.percentage, rng):
            return self.abort
        return None


@dataclass(frozen=True)
class Mirror:
    """Copy requests (best effort, response discarded) to host:port[/subset] for `percentage`%."""

    host: str
    port: int | None = None
    subset: str | None = None
    percentage: float = 100.0

    def sample(self, rng: RandomSource) -> bool:
        """Should this request be copied?"""
        return sampled(self.percentage, rng)


@dataclass(frozen=True)
class Rewrite:
    """Request rewrite before forwarding; at most one path form is set.

    prefix: VirtualService `rewrite.uri` - Envoy prefix_rewrite, replaces the matched prefix (the
        whole path for an exact match) with this value.
    replace_prefix_match: Gateway API ReplacePrefixMatch - element-wise, per its table.
    full_path: Gateway API ReplaceFullPath - the path (without query) becomes this.
    regex / substitution: VirtualService uriRegexRewrite - every match in the path is substituted.
    authority: new Host / :authority.
    """

    prefix: str | None = None
    replace_prefix_match: str | None = None
    full_path: str | None = None
    regex: re.Pattern[str] | None = None
    substitution: str = ""
    authority: str | None = None


@dataclass(frozen=True)
class Route:
    """One routing rule: if any of `matches` holds (or `matches` is empty), apply `action`.

    `origin` names the resource and rule it came from ("VirtualService bookinfo/reviews spec.http[0]").
    `timeout` None = no timeout. `retries` None = retries disabled.
    """

    name: str
    matches: tuple[RouteMatch, ...]
    action: Action
    timeout: float | None = None
    retries: RetryPolicy | None = DEFAULT_RETRY_POLICY
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    rewrite: Rewrite | None = None
    origin: str = ""


RouteSource = Literal["VirtualService", "HTTPRoute", "default"]


@dataclass(frozen=True)
class RouteTable:
    """The routes of one (service hostname, port), in evaluation order: first match wins."""

    routes: tuple[Route, ...]
    hostname: str = ""
    port: int = 0
    source: RouteSource = "default"

    def select(self, head: Any, port: int) -> Route | None:
        """match.select(self, head, port): the first matching route, None = no route (404 NR)."""
        from waypoint.routing.match import select  # match.py builds on this module

        return select(self, head, port)


# ---------------------------------------------------------------------------------------------------
# Destination policies (DestinationRule)
# ---------------------------------------------------------------------------------------------------

class LbAlgorithm(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


#: Istio's default load balancer since 1.14.
DEFAULT_LB_ALGORITHM = LbAlgorithm.LEAST_REQUEST


@dataclass(frozen=True)
class HashCookie:
    """Hash on this cookie; when absent and `ttl` is set, the proxy generates it (Set-Cookie)."""

    name: str
    path: str | None = None
    ttl: float | None = None


@dataclass(frozen=True)
class ConsistentHash:
    """Exactly one key is set."""

    header: str | None = None
    cookie: HashCookie | None = None
    use_source_ip: bool = False
    query_parameter: str | None = None


@dataclass(frozen=True)
class LoadBalancer:
    """`consistent_hash` set means hash-based selection (`simple` is then unused)."""

    simple: LbAlgorithm = DEFAULT_LB_ALGORITHM
    consistent_hash: ConsistentHash | None = None


DEFAULT_LOAD_BALANCER = LoadBalancer()


@dataclass(frozen=True)
class ConnectionPoolSettings:
    """None = unlimited (Envoy's 2^32-1). Per upstream host set of the waypoint (Envoy cluster)."""

    max_connections: int | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_HTTP_IDLE_TIMEOUT
    tcp_idle_timeout: float | None = None
    max_connection_duration: float | None = None


DEFAULT_CONNECTION_POOL = ConnectionPoolSettings()


@dataclass(frozen=True)
class OutlierSettings:
    """Eject an endpoint after `consecutive_5xx` 5xx answers (0 = off) or `consecutive_gateway_errors`
    502/503/504 (0 = off); ejection lasts base_ejection_time x times ejected; at most
    max_ejection_percent of endpoints ejected; detection stops below min_health_percent healthy."""

    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX
    consecutive_gateway_errors: int = 0
    interval: float = DEFAULT_OUTLIER_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT
    min_health_percent: int = DEFAULT_MIN_HEALTH_PERCENT
    error_status_codes: frozenset[int] = frozenset()


@dataclass(frozen=True)
class TrafficPolicy:
    """One layer of a DestinationRule as written: None = not set at this layer.
    `port_overrides` only on the top-level and subset layers (portLevelSettings)."""

    lb: LoadBalancer | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier: OutlierSettings | None = None
    port_overrides: Mapping[int, TrafficPolicy] = field(default_factory=dict)

    def for_port(self, port: int | None) -> tuple[TrafficPolicy, bool]:
        """This layer for `port`: the port-level entry if there is one (it replaces the layer wholesale:
        what it leaves unset falls back to defaults, not to the layer), else the layer itself."""
        if port is not None and port in self.port_overrides:
            return self.port_overrides[port], True
        return self, False


@dataclass(frozen=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    policy: TrafficPolicy | None = None

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Does a pod with `labels` belong to this subset?"""
        return all(labels.get(key) == value for key, value in self.labels.items())


@dataclass(frozen=True)
class DestinationPolicy:
    """The effective policy for one destination host, and (from `ConfigIndex.policy_for`) one subset
    and port: `lb`, `connection_pool` and `outlier` are already merged the way Istio merges them
    (subset port-level > subset > top-level port-level > top-level > defaults). `subset` is the subset
    asked for (its labels select the endpoints); `subsets` and `top` keep the whole rule."""

    host: str
    lb: LoadBalancer = DEFAULT_LOAD_BALANCER
    connection_pool: ConnectionPoolSettings = DEFAULT_CONNECTION_POOL
    outlier: OutlierSettings | None = None
    subset: Subset | None = None
    subsets: Mapping[str, Subset] = field(default_factory=dict)
    top: TrafficPolicy = field(default_factory=TrafficPolicy)
    origin: str = ""

    def resolve(self, subset: str | None, port: int | None) -> DestinationPolicy:
        """Istio's util.MergeSubsetTrafficPolicy: take the top-level layer for the port; if the subset
        has a policy, take its layer for the port and let each of lb / connection pool / outlier it
        sets replace the top-level one (all of them when it was a port-level entry)."""
        chosen: Subset | None = None
        if subset is not None:
            if subset not in self.subsets:
                raise UnknownSubset(f"no DestinationRule for {self.host} defines subset {subset!r}")
            chosen = self.subsets[subset]
        layer, _ = self.top.for_port(port)
        lb, pool, outlier = layer.lb, layer.connection_pool, layer.outlier
        if chosen is not None and chosen.policy is not None:
            sub, whole = chosen.policy.for_port(port)
            if sub.lb is not None or whole:
                lb = sub.lb
            if sub.connection_pool is not None or whole:
                pool = sub.connection_pool
            if sub.outlier is not None or whole:
                outlier = sub.outlier
        return dataclasses.replace(self, lb=lb or DEFAULT_LOAD_BALANCER,
                                   connection_pool=pool or DEFAULT_CONNECTION_POOL,
                                   outlier=outlier, subset=chosen)


# ---------------------------------------------------------------------------------------------------
# Services the waypoint knows (from xDS), as the compilers need them
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServiceRef:
    """A service: FQDN hostname, namespace/name, its service ports, its VIPs."""

    hostname: str
    namespace: str
    name: str
    ports: tuple[int, ...] = ()
    vips: tuple[str, ...] = ()


#: Looks a service up by FQDN hostname or by one of its VIPs; None when unknown.
ServiceLookup = Callable[[str], ServiceRef | None]


# ---------------------------------------------------------------------------------------------------
# Reading CRD dicts (shared by the compilers)
# ---------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, field_path: str) -> float:
    """A Kubernetes/Istio duration ("1.5s", "200ms", "1m", "1h30m", "0") → seconds. Raises Invalid."""
    if not isinstance(value, str) or not value:
        raise Invalid(field_path, f"expected a duration such as \"1.5s\", \"200ms\", \"1m\", got {value!r}")
    if value == "0":
        return 0.0
    total = 0.0
    position = 0
    for part in _DURATION.finditer(value):
        if part.start() != position:
            break
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    if position != len(value) or position == 0:
        raise Invalid(field_path, f"{value!r} is not a duration (use e.g. \"1.5s\", \"200ms\", \"1m\", \"1h\")")
    return total


def parse_istio_duration(value: object, field_path: str) -> float:
    """An Istio API duration: at least 1ms and whole milliseconds (agent.ValidateDuration)."""
    seconds = parse_duration(value, field_path)
    if seconds < 0.001:
        raise Invalid(field_path, f"duration {value!r} must be at least 1ms")
    if abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
        raise Invalid(field_path, f"duration {value!r} must be whole milliseconds")
    return seconds


def parse_percent(value: object, field_path: str) -> float:
    """Istio `Percent` ({value: 10.5}) → a float in [0, 100]. Raises Invalid."""
    body = expect_mapping(value, field_path)
    check_fields(body, {"value"}, field_path)
    return percent_number(body.get("value", 0), f"{field_path}.value")


def percent_number(value: object, field_path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise Invalid(field_path, f"expected a number between 0 and 100, got {value!r}")
    if not 0 <= value <= 100:
        raise Invalid(field_path, f"percentage {value} is not in the range 0..100")
    return float(value)


def expect_mapping(value: object, field_path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Invalid(field_path, f"expected an object, got {type(value).__name__} {value!r}")
    return value


def expect_list(value: object, field_path: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise Invalid(field_path, f"expected a list, got {type(value).__name__} {value!r}")
    return value


def expect_str(value: object, field_path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Invalid(field_path, f"expected a string, got {type(value).__name__} {value!r}")
    if not value and not allow_empty:
        raise Invalid(field_path, "must not be empty")
    return value


def expect_choice(value: object, choices: Iterable[str], field_path: str, what: str) -> str:
    """One of a fixed set of names (an enum field). Raises Invalid listing the valid ones."""
    options = list(choices)
    if not isinstance(value, str) or value not in options:
        raise Invalid(field_path, f"{value!r} is not {what} (use one of {', '.join(options)})")
    return value


def expect_int(value: object, field_path: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(field_path, f"expected an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise Invalid(field_path, f"{value} is less than {minimum}")
    if maximum is not None and value > maximum:
        raise Invalid(field_path, f"{value} is greater than {maximum}")
    return value


def expect_bool(value: object, field_path: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(field_path, f"expected true or false, got {value!r}")
    return value


def expect_labels(value: object, field_path: str) -> dict[str, str]:
    body = expect_mapping(value, field_path)
    labels: dict[str, str] = {}
    for key, label in body.items():
        labels[expect_str(key, field_path)] = expect_str(label, f"{field_path}.{key}", allow_empty=True)
    return labels


def check_fields(body: Mapping[str, Any], known: Iterable[str], field_path: str) -> None:
    """Reject the enclosing unit when `body` has a field its API does not define."""
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise Invalid(f"{field_path}.{unknown[0]}" if field_path else unknown[0],
                      f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")


def port_number(value: object, field_path: str) -> int:
    return expect_int(value, field_path, minimum=1, maximum=65535)


def fqdn(host: str, namespace: str, domain: str) -> str:
    """Istio's short-name rule: a name without dots is a Service in the rule's own namespace
    ("reviews" in bookinfo → reviews.bookinfo.svc.cluster.local); anything else is taken as written."""
    host = host.lower()
    if "." in host or host.startswith("*") or is_ip(host):
        return host
    return f"{host}.{namespace}.svc.{domain}"


def host_matches(pattern: str, hostname: str) -> bool:
    """Istio host matching: "*" matches all, "*.suffix" any name ending in ".suffix", else equality."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:])
    return pattern == hostname


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def metadata_of(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """(namespace, name, creationTimestamp) of a Kubernetes object dict, tolerating absences."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return "", "", ""
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""),
            str(meta.get("creationTimestamp") or ""))


# ---------------------------------------------------------------------------------------------------
# /config_dump
# ---------------------------------------------------------------------------------------------------

def dump(value: object) -> Any:
    """A JSON-ready view of any model value (for the admin /config_dump)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for item in dataclasses.fields(value):
            if not item.compare:  # derived fields (compiled tests, cumulative weights)
                continue
            out[item.name] = dump(getattr(value, item.name))
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(key): dump(item) for key, item in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(dump(item) for item in value)
    if isinstance(value, tuple | list):
        return [dump(item) for item in value]
    return value
