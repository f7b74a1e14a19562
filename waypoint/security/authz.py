"""L7 authorization at the waypoint: `security.istio.io` AuthorizationPolicy, as istiod compiles it into
Envoy's RBAC filters for a waypoint proxy (issue 6, deliverable 4; PROTOCOLS.md §8 for attachment).

Sans-IO. `PolicySet.compile(objects, waypoint=(ns, name))` turns every AuthorizationPolicy object into
matchers once per config change; `PolicySet.evaluate(AuthzRequest, service)` decides one request. Which
policies apply is `waypoint.security.attachment` (targetRefs to this Gateway, to the destination Service, or
to the `istio-waypoint` GatewayClass from the root namespace; selector and untargeted policies do not apply).

Evaluation, as Istio documents it: CUSTOM first (not supported here: see below), then a matching DENY
denies; if no ALLOW policy applies the request is allowed; a matching ALLOW allows; otherwise deny. AUDIT
policies never decide (`Decision.audited` lists those that matched). Policies annotated
`istio.io/dry-run: "true"` are evaluated and reported in `Decision.dry_run` but never decide.

Matching, as istiod's authz model generates it: rules OR; in a rule, any `from` entry AND any `to` entry AND
every `when` condition; in an entry every present field; a field holds when any of its values match and none
of its not-values do. An absent attribute matches no value, so its not-values hold. String values are
exact, `prefix*`, `*suffix`, or `*` (present and non-empty). `principals` match the peer's SPIFFE id without
`spiffe://`; `namespaces` the namespace in it; `requestPrincipals` `<iss>/<sub>` of the request's JWT;
`hosts` the request authority case-insensitively, exactly as sent (write `host:*` to cover explicit ports, as
Istio asks); `paths` the path without its query, with Envoy URI templates (`{*}`, `{**}`) when present;
header conditions the header's values joined by `,`.

Broken or unsupported pieces (never silently dropped: each is a `ConfigError`):
- a rule istiod would reject or skip (unknown field or `when` key, bad CIDR, bad port, empty value,
  malformed path template): an ALLOW rule never matches; a DENY rule matches every request (fail closed —
  istiod's validating webhook would have refused the policy; when that is bypassed istiod drops bad values
  of DENY rules, widening them, and this goes all the way); an AUDIT rule matches every request.
- `action: CUSTOM` (no ext_authz providers here): its rules deny, as istiod generates for a CUSTOM policy
  whose provider it cannot find.
- `experimental.envoy.filters.*` / `request.experimental.inline.headers[...]` conditions (Envoy filter
  metadata we do not have): never hold in an ALLOW rule, always hold in DENY/AUDIT rules, as istiod treats
  attributes a filter chain cannot evaluate. `connection.sni` is never present (HBONE's inner stream has
  no TLS), so its values never match.

This module does no I/O; `compile` logs each error once at WARNING.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from waypoint.http.message import HeadersReader
from waypoint.security import (
    ROOT_NAMESPACE,
    Attachment,
    ConfigError,
    ServiceLike,
    WaypointScope,
    attachment,
    identify,
)

log = logging.getLogger("waypoint.security.authz")

KIND = "AuthorizationPolicy"
DENIED_STATUS = 403
DENIED_BODY = b"RBAC: access denied"  # Envoy's RBAC filter body, byte for byte
DENIED_DETAILS = "rbac_access_denied_matched_policy"  # Envoy's response code details prefix
DRY_RUN_ANNOTATION = "istio.io/dry-run"
SPIFFE = "spiffe://"

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Envoy's URI template operators (what Istio hands paths containing `{*}` / `{**}` to): one path segment,
# and any run of segments (the last operator only). The character classes are RFC 3986 pchar, as Envoy's.
_ONE_SEGMENT = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+"
_ANY_SEGMENTS = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=/]*"
_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")
_DIGITS = re.compile(r"[0-9]{1,5}")
_MAX_SERVICE_ACCOUNTS = 16  # istiod's limit on serviceAccounts values


class _NoHeaders:
    def get(self, name: str, default: str | None = None) -> str | None:
        return default

    def get_all(self, name: str) -> list[str]:
        return []


NO_HEADERS: HeadersReader = _NoHeaders()


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """One request as authorization sees it.

    `source_principal` is the peer's SPIFFE id from the HBONE connection (`spiffe://td/ns/x/sa/y`; the form
    without the scheme is accepted too), None for no identity. `source_namespace` must come from that
    identity (None: read it from the principal). `remote_ip` is the original client (X-Forwarded-For aware);
    None means `source_ip`. `host` is the authority as received, `path` the request target with its query.
    `request_principal` (`<iss>/<sub>`), `claims`, `audiences` and `presenter` come from a verified JWT
    (`jwt.JwtResult`); audiences and presenter default to the `aud` / `azp` claims.
    """

    source_principal: str | None = None
    source_namespace: str | None = None
    source_ip: str | None = None
    remote_ip: str | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    host: str = ""
    method: str = ""
    path: str = "/"
    headers: HeadersReader = NO_HEADERS
    request_principal: str | None = None
    claims: Mapping[str, Any] | None = None
    audiences: Sequence[str] | None = None
    presenter: str | None = None


@dataclass(frozen=True)
class Decision:
    """The verdict. `policy` (`<ns>/<name>`) and `rule_index` name the DENY or ALLOW rule that decided; both
    None when no policy applied (allowed) or when ALLOW policies applied and none matched (denied).
    `audited` lists the AUDIT policies that matched; `dry_run` one log line per dry-run policy outcome."""

    allowed: bool
    policy: str | None = None
    rule_index: int | None = None
    audited: tuple[str, ...] = ()
    dry_run: tuple[str, ...] = ()

    @property
    def details(self) -> str:
        """Envoy's response code details for a denial (`%RESPONSE_CODE_DETAILS%`), "" when allowed:
        `rbac_access_denied_matched_policy[ns[<ns>]-policy[<name>]-rule[<i>]]`, or `[none]` when no ALLOW
        policy matched."""
        if self.allowed:
            return ""
        return f"{DENIED_DETAILS}[{policy_id(self.policy, self.rule_index)}]"


def policy_id(policy: str | None, rule_index: int | None) -> str:
    """Istio's RBAC policy name for one rule: `ns[<ns>]-policy[<name>]-rule[<i>]` ("none" without one)."""
    if policy is None:
        return "none"
    namespace, _, name = policy.partition("/")
    return f"ns[{namespace}]-policy[{name}]-rule[{rule_index or 0}]"


ALLOWED = Decision(True)


# -- the request's attributes, derived once per evaluation ---------------------------------------------------
class _Attrs:
    def __init__(self, request: AuthzRequest) -> None:
        self.request = request

    @cached_property
    def principal(self) -> str | None:
        principal = self.request.source_principal
        if not principal:
            return None
        return principal if principal.startswith(SPIFFE) else SPIFFE + principal

    @cached_property
    def namespace(self) -> str | None:
        if self.request.source_namespace:
            return self.request.source_namespace
        principal = self.principal
        if principal is None or "/ns/" not in principal:
            return None
        return principal.split("/ns/", 1)[1].split("/", 1)[0] or None

    @cached_property
    def source_ip(self) -> IpAddress | None:
        return _ip(self.request.source_ip)

    @cached_property
    def remote_ip(self) -> IpAddress | None:
        return _ip(self.request.remote_ip) if self.request.remote_ip else self.source_ip

    @cached_property
    def destination_ip(self) -> IpAddress | None:
        return _ip(self.request.destination_ip)

    @cached_property
    def path(self) -> str:
        path = self.request.path
        for separator in ("?", "#"):
            path = path.split(separator, 1)[0]
        return path

    @cached_property
    def issuer_subject(self) -> tuple[str | None, str | None]:
        claims = self.request.claims
        if claims is not None:
            iss, sub = claims.get("iss"), claims.get("sub")
            return (iss if isinstance(iss, str) else None), (sub if isinstance(sub, str) else None)
        principal = self.request.request_principal
        if not principal or "/" not in principal:
            return None, None
        iss, _, sub = principal.rpartition("/")
        return iss, sub

    @cached_property
    def audiences(self) -> list[str]:
        if self.request.audiences is not None:
            return list(self.request.audiences)
        return self.claim(("aud",))

    @cached_property
    def presenter(self) -> list[str]:
        if self.request.presenter is not None:
            return [self.request.presenter]
        return self.claim(("azp",))

    def claim(self, path: Sequence[str]) -> list[str]:
        """A claim's string values (a string claim, or the strings of a list claim); [] when absent."""
        value: Any = self.request.claims
        for key in path:
            if not isinstance(value, Mapping) or key not in value:
                return []
            value = value[key]
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        return []

    def header(self, name: str) -> str | None:
        values = self.request.headers.get_all(name)
        return ",".join(values) if values else None


def _ip(text: str | None) -> IpAddress | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# -- compiling values into matchers --------------------------------------------------------------------------
Pred = Callable[[_Attrs], bool]
StrMatch = Callable[[str], bool]


class _Invalid(Exception):  # a compile-time signal, never raised past this module
    """A value istiod would reject: the rule is broken."""


class _Unsupported(Exception):
    """A condition this waypoint cannot evaluate."""


def _string(pattern: str, ignore_case: bool = False) -> StrMatch:
    """Istio's string match: `*` (present, non-empty), `*suffix`, `prefix*`, or exact."""
    if pattern == "*":
        return bool
    if ignore_case:
        inner = _string(pattern.lower())
        return lambda value: inner(value.lower())
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda value: value.endswith(suffix)
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda value: value.startswith(prefix)
    return pattern.__eq__


def _principal(pattern: str) -> Pred:
    # istiod: StringMatcherWithPrefix(value, "spiffe://"): `*` is any non-empty identity, the other forms
    # are anchored after the scheme.
    if pattern == "*":
        return lambda a: bool(a.principal)
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda a: (a.principal is not None and a.principal.startswith(SPIFFE)
                          and a.principal[len(SPIFFE):].endswith(suffix))
    match = _string(SPIFFE + pattern)
    return lambda a: a.principal is not None and match(a.principal)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _namespace(pattern: str) -> Pred:
    # istiod matches `.*/ns/<pattern with * as .*>/.*` against the principal.
    regex = _glob_regex(pattern)
    return lambda a: a.namespace is not None and regex.fullmatch(a.namespace) is not None


def _service_account(policy_namespace: str) -> Callable[[str], Pred]:
    def make(value: str) -> Pred:
        if "*" in value:
            raise _Invalid(f"wildcard not allowed in service account {value!r}")
        namespace, sep, account = value.partition("/")
        if not sep:
            namespace, account = policy_namespace, value
        if not namespace or not account or "/" in account:
            raise _Invalid(f"expected 'serviceAccount' or 'namespace/serviceAccount', found {value!r}")
        regex = re.compile(rf"spiffe://.+/ns/{re.escape(namespace)}/(.+/|)sa/{re.escape(account)}(/.+)?")
        return lambda a: a.principal is not None and regex.fullmatch(a.principal) is not None
    return make


def _request_principal(value: str) -> Pred:
    # istiod's requestPrincipalGenerator: split at the last "/" into issuer and subject, each matched on
    # its own claim; `*` parts mean "present and non-empty".
    slash = value.rfind("/")
    found = slash >= 0
    iss, sub = (value[:slash], value[slash + 1:]) if found else (value, "")
    match_iss: StrMatch
    match_sub: StrMatch
    if value == "*":
        match_iss = match_sub = bool
    elif value.startswith("*"):
        if found:
            match_iss = bool if iss == "*" else _suffix(iss[1:])
            match_sub = sub.__eq__
        else:
            match_iss, match_sub = bool, _suffix(value[1:])
    elif value.endswith("*"):
        if found:
            match_iss = iss.__eq__
            match_sub = bool if sub == "*" else _prefix(sub[:-1])
        else:
            match_iss, match_sub = _prefix(value[:-1]), bool
    else:
        match_iss, match_sub = iss.__eq__, sub.__eq__

    def holds(a: _Attrs) -> bool:
        got_iss, got_sub = a.issuer_subject
        return got_iss is not None and got_sub is not None and match_iss(got_iss) and match_sub(got_sub)
    return holds


def _suffix(suffix: str) -> StrMatch:
    return lambda value: value.endswith(suffix)


def _prefix(prefix: str) -> StrMatch:
    return lambda value: value.startswith(prefix)


def _network(value: str) -> IpNetwork:
    try:
        if "/" in value:
            return ipaddress.ip_network(value, strict=False)
        return ipaddress.ip_network(ipaddress.ip_address(value))
    except ValueError:
        raise _Invalid(f"bad IP address or CIDR range {value!r}") from None


def _source_ip(value: str) -> Pred:
    network = _network(value)
    return lambda a: a.source_ip is not None and a.source_ip in network


def _remote_ip(value: str) -> Pred:
    network = _network(value)
    return lambda a: a.remote_ip is not None and a.remote_ip in network


def _destination_ip(value: str) -> Pred:
    network = _network(value)
    return lambda a: a.destination_ip is not None and a.destination_ip in network


def _port(value: str) -> Pred:
    if not _DIGITS.fullmatch(value) or int(value) > 65535:
        raise _Invalid(f"bad port {value!r}: must be a number from 0 to 65535")
    port = int(value)
    return lambda a: a.request.destination_port == port


def _host(value: str) -> Pred:
    if value == "*":
        return lambda a: True  # `:authority` is always present
    match = _string(value, ignore_case=True)
    return lambda a: match(a.request.host)


def _method(value: str) -> Pred:
    match = _string(value)
    return lambda a: match(a.request.method)


def _path(value: str) -> Pred:
    if "{*}" in value or "{**}" in value:
        regex = _path_template(value)
        return lambda a: regex.fullmatch(a.path) is not None
    match = _string(value)
    return lambda a: match(a.path)


def _path_template(template: str) -> re.Pattern[str]:
    """An Envoy URI template as a regex, validated the way istiod validates it."""
    seen_any = False
    for segment in template.strip("/").split("/"):
        if segment in ("{*}", "{**}"):
            if seen_any:
                raise _Invalid(f"invalid path template {template!r}: {{**}} must be the last operator")
            seen_any = segment == "{**}"
        elif "{" in segment or "}" in segment:
            raise _Invalid(f"invalid path template {template!r}: '{{' or '}}' beyond a supported operator")
        elif segment and not _LITERAL.fullmatch(segment):
            raise _Invalid(f"invalid path template {template!r}: segment {segment!r} is not a valid literal")
    parts = re.split(r"(\{\*\*\}|\{\*\})", template)
    regex = "".join(_ANY_SEGMENTS if p == "{**}" else _ONE_SEGMENT if p == "{*}" else re.escape(p) for p in parts)
    return re.compile(regex)


def _header(name: str) -> Callable[[str], Pred]:
    def make(value: str) -> Pred:
        if value == "*":
            return lambda a: bool(a.request.headers.get_all(name))
        match = _string(value)

        def holds(a: _Attrs) -> bool:
            joined = a.header(name)
            return joined is not None and match(joined)
        return holds
    return make


def _claim(path: tuple[str, ...]) -> Callable[[str], Pred]:
    def make(value: str) -> Pred:
        match = _string(value)
        return lambda a: any(match(v) for v in a.claim(path))
    return make


def _audience(value: str) -> Pred:
    match = _string(value)
    return lambda a: any(match(v) for v in a.audiences)


def _presenter(value: str) -> Pred:
    match = _string(value)
    return lambda a: any(match(v) for v in a.presenter)


def _never(_value: str) -> Pred:
    return lambda a: False


def _unsupported(_value: str) -> Pred:
    raise _Unsupported


def _bracketed(key: str, prefix: str) -> list[str]:
    """`prefix[a]` → ["a"]; `prefix[a][b]` → ["a", "b"] (istiod's nested claim form)."""
    rest = key[len(prefix):]
    if not rest.startswith("[") or not rest.endswith("]") or len(rest) < 3:
        raise _Invalid(f"bad key {key!r}: should have the form {prefix}[name]")
    names = rest[1:-1].split("][")
    if any(not n or "[" in n or "]" in n for n in names):
        raise _Invalid(f"bad key {key!r}: should have the form {prefix}[name]")
    return names


def _condition(key: str, policy_namespace: str) -> Callable[[str], Pred]:
    """The matcher factory for one `when` key (istiod's list of attributes)."""
    simple: dict[str, Callable[[str], Pred]] = {
        "source.ip": _source_ip,
        "remote.ip": _remote_ip,
        "source.namespace": _namespace,
        "source.principal": _principal,
        "source.serviceAccount": _service_account(policy_namespace),
        "request.auth.principal": _request_principal,
        "request.auth.audiences": _audience,
        "request.auth.presenter": _presenter,
        "destination.ip": _destination_ip,
        "destination.port": _port,
        "connection.sni": _never,
    }
    if key in simple:
        return simple[key]
    if key.startswith("request.headers"):
        names = _bracketed(key, "request.headers")
        if len(names) != 1:
            raise _Invalid(f"bad key {key!r}: should have the form request.headers[name]")
        return _header(names[0].lower())
    if key.startswith("request.auth.claims"):
        return _claim(tuple(_bracketed(key, "request.auth.claims")))
    if key.startswith(("experimental.envoy.filters.", "request.experimental.inline.headers")):
        return _unsupported
    if key == "destination.namespace":
        raise _Invalid(f"attribute {key} is replaced by the policy's metadata.namespace")
    if key.startswith("destination.labels"):
        raise _Invalid(f"attribute {key} is replaced by the policy's targetRefs")
    if key in ("destination.name", "destination.user"):
        raise _Invalid(f"deprecated attribute {key}: only supported in v1alpha1")
    raise _Invalid(f"unknown attribute {key!r}")


# -- rules and policies --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    """One rule: alternatives for the source (`from` entries) and for the operation (`to` entries, each with
    the rule's `when` conditions); a request matches when all predicates of one alternative of each side
    hold. `everything` marks a rule that matches every request (a broken DENY rule)."""

    principals: tuple[tuple[Pred, ...], ...]
    permissions: tuple[tuple[Pred, ...], ...]
    everything: bool = False

    def matches(self, a: _Attrs) -> bool:
        if self.everything:
            return True
        return (any(all(p(a) for p in alt) for alt in self.principals)
                and any(all(p(a) for p in alt) for alt in self.permissions))


_EVERYTHING = _Rule((), (), everything=True)

# Fields of `from.source` and `to.operation`: field name → (negated field name, matcher factory).
_SOURCE_FIELDS: dict[str, tuple[str, Callable[[str], Pred]]] = {
    "principals": ("notPrincipals", _principal),
    "requestPrincipals": ("notRequestPrincipals", _request_principal),
    "namespaces": ("notNamespaces", _namespace),
    "ipBlocks": ("notIpBlocks", _source_ip),
    "remoteIpBlocks": ("notRemoteIpBlocks", _remote_ip),
}
_OPERATION_FIELDS: dict[str, tuple[str, Callable[[str], Pred]]] = {
    "hosts": ("notHosts", _host),
    "ports": ("notPorts", _port),
    "methods": ("notMethods", _method),
    "paths": ("notPaths", _path),
}


class _RuleCompiler:
    """Compiles one rule (raising `_Invalid` when it is broken); `unsupported` collects the conditions it
    cannot check."""

    def __init__(self, action: str, namespace: str) -> None:
        self.action = action
        self.namespace = namespace
        self.unsupported: list[str] = []

    def values(self, container: Mapping[str, Any], key: str, field: str) -> list[str]:
        raw = container.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise _Invalid(f"{field}.{key} must be a list of strings")
        out = []
        for i, item in enumerate(raw):
            # a port written as a YAML number reads as the string istiod would have
            numeric = isinstance(item, int) and not isinstance(item, bool)
            value = str(item) if numeric and key in ("ports", "notPorts", "values", "notValues") else item
            if not isinstance(value, str):
                raise _Invalid(f"{field}.{key}[{i}] must be a string")
            if not value:
                raise _Invalid(f"{field}.{key}[{i}]: empty value not allowed")
            out.append(value)
        return out

    def field_preds(self, values: list[str], not_values: list[str], make: Callable[[str], Pred],
                    where: str) -> list[Pred]:
        preds: list[Pred] = []
        try:
            if values:
                positives = [make(v) for v in values]
                preds.append(lambda a: any(p(a) for p in positives))
            if not_values:
                negatives = [make(v) for v in not_values]
                preds.append(lambda a: not any(p(a) for p in negatives))
        except _Unsupported:
            self.unsupported.append(where)
            # ALLOW: the condition never holds; DENY / AUDIT: it holds, the rest of the rule still applies
            preds = [lambda a: False] if self.action == ALLOW else []
        return preds

    def block(self, container: Any, fields: Mapping[str, tuple[str, Callable[[str], Pred]]],
              field: str) -> list[Pred]:
        if container is None:
            return []
        if not isinstance(container, Mapping):
            raise _Invalid(f"{field} must be an object")
        known = {*fields, *(negated for negated, _ in fields.values())}
        for key in container:
            if key not in known:
                raise _Invalid(f"{field}: unknown field {key!r}")
        preds: list[Pred] = []
        for name, (negated, make) in fields.items():
            values, not_values = self.values(container, name, field), self.values(container, negated, field)
            preds += self.field_preds(values, not_values, make, f"{field}.{name}")
        return preds

    def compile(self, rule: Any) -> _Rule:
        if not isinstance(rule, Mapping):
            raise _Invalid("must be an object (`{}` matches every request)")
        for key in rule:
            if key not in ("from", "to", "when"):
                raise _Invalid(f"unknown field {key!r}")
        # `when` conditions hold for the whole rule: istiod appends them to every from/to alternative.
        conditions: list[Pred] = []
        for i, condition in enumerate(self.items(rule.get("when"), "when")):
            where = f"when[{i}]"
            if not isinstance(condition, Mapping) or not isinstance(condition.get("key"), str):
                raise _Invalid(f"{where} needs a key")
            for key in condition:
                if key not in ("key", "values", "notValues"):
                    raise _Invalid(f"{where}: unknown field {key!r}")
            key = condition["key"]
            values = self.values(condition, "values", where)
            not_values = self.values(condition, "notValues", where)
            if not values and not not_values:
                raise _Invalid(f"{where} ({key}): at least one of values or notValues must be set")
            conditions += self.field_preds(values, not_values, _condition(key, self.namespace),
                                           f"{where} ({key})")
        source_fields = {**_SOURCE_FIELDS,
                         "serviceAccounts": ("notServiceAccounts", _service_account(self.namespace))}
        principals = []
        for i, entry in enumerate(self.items(rule.get("from"), "from")):
            if not isinstance(entry, Mapping):
                raise _Invalid(f"from[{i}] must be an object")
            source = entry.get("source")
            if isinstance(source, Mapping):
                for key in ("serviceAccounts", "notServiceAccounts"):
                    if len(self.values(source, key, f"from[{i}].source")) > _MAX_SERVICE_ACCOUNTS:
                        raise _Invalid(f"from[{i}].source.{key} may not have more than "
                                       f"{_MAX_SERVICE_ACCOUNTS} values")
            principals.append(tuple(self.block(source, source_fields, f"from[{i}].source")))
        permissions = []
        for i, entry in enumerate(self.items(rule.get("to"), "to")):
            if not isinstance(entry, Mapping):
                raise _Invalid(f"to[{i}] must be an object")
            preds = self.block(entry.get("operation"), _OPERATION_FIELDS, f"to[{i}].operation")
            permissions.append((*preds, *conditions))
        if not permissions:
            permissions.append(tuple(conditions))
        return _Rule(tuple(principals) or ((),), tuple(permissions))

    @staticmethod
    def items(value: Any, field: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _Invalid(f"{field} must be a list")
        return value


@dataclass(frozen=True)
class _Policy:
    key: str  # "<ns>/<name>"
    action: str  # ALLOW, DENY or AUDIT (CUSTOM compiles to DENY)
    dry_run: bool
    custom: bool
    attachment: Attachment
    rules: tuple[tuple[int, _Rule], ...]  # (index in spec.rules, rule); broken ALLOW rules are absent

    def match(self, a: _Attrs) -> int | None:
        """The index of the first matching rule, or None."""
        for index, rule in self.rules:
            if rule.matches(a):
                return index
        return None


def _compile_policy(obj: Mapping[str, Any], scope: WaypointScope, errors: list[ConfigError]) -> _Policy | None:
    namespace, name = identify(obj)

    def error(field: str, message: str) -> None:
        errors.append(ConfigError(KIND, namespace, name, field, message))

    if not name:
        return None
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        error("spec", "must be an object; the policy is ignored")
        return None
    target = attachment(obj, KIND, scope, errors)
    if target is None:
        return None
    action = spec.get("action") or ALLOW
    if action not in (ALLOW, DENY, AUDIT, CUSTOM):
        error("spec.action", f"unknown action {action!r} (expected ALLOW, DENY, AUDIT or CUSTOM); the policy is "
              "ignored")
        return None
    custom = action == CUSTOM
    if custom:
        provider = spec.get("provider")
        provider = provider.get("name", "") if isinstance(provider, Mapping) else ""
        error("spec.action", f"CUSTOM (extension provider {provider!r}) is not supported by this waypoint; the "
              "requests its rules match are denied, as Istio does when a CUSTOM provider is missing")
        action = DENY
    dry_run = _dry_run(obj, error)
    rules: list[tuple[int, _Rule]] = []
    raw_rules = spec.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        error("spec.rules", "must be a list of rules; " + _consequence(action))
        raw_rules = [object()]  # one broken rule, handled below
    for index, raw in enumerate(raw_rules or []):
        field = f"spec.rules[{index}]"
        compiler = _RuleCompiler(action, namespace)
        try:
            rule = compiler.compile(raw)
        except _Invalid as exc:
            error(field, f"{exc}; {_consequence(action)}")
            if action != ALLOW:
                rules.append((index, _EVERYTHING))
            continue
        for where in compiler.unsupported:
            error(f"{field}.{where}", "not supported by this waypoint; the condition "
                  + ("never holds (the rule never allows)" if action == ALLOW else "always holds"))
        rules.append((index, rule))
    return _Policy(f"{namespace}/{name}", action, dry_run, custom, target, tuple(rules))


def _consequence(action: str) -> str:
    if action == ALLOW:
        return "the rule never allows"
    if action == DENY:
        return "the rule denies every request (fail closed)"
    return "the rule audits every request"


def _dry_run(obj: Mapping[str, Any], error: Callable[[str, str], None]) -> bool:
    meta = obj.get("metadata") or {}
    annotations = (meta.get("annotations") or {}) if isinstance(meta, Mapping) else {}
    value = annotations.get(DRY_RUN_ANNOTATION) if isinstance(annotations, Mapping) else None
    if value is None:
        return False
    text = str(value)
    if text in ("1", "t", "T", "true", "TRUE", "True"):  # Go's strconv.ParseBool, as istiod parses it
        return True
    if text not in ("0", "f", "F", "false", "FALSE", "False"):
        error(f"metadata.annotations[{DRY_RUN_ANNOTATION}]", f"{text!r} is not a boolean; the policy is enforced")
    return False


@dataclass(frozen=True)
class _Applicable:
    deny: tuple[_Policy, ...]
    allow: tuple[_Policy, ...]
    audit: tuple[_Policy, ...]
    dry_deny: tuple[_Policy, ...]
    dry_allow: tuple[_Policy, ...]

    @property
    def empty(self) -> bool:
        return not (self.deny or self.allow or self.audit or self.dry_deny or self.dry_allow)

    @classmethod
    def of(cls, policies: Iterable[_Policy]) -> _Applicable:
        groups: dict[tuple[str, bool], list[_Policy]] = {}
        for policy in policies:
            groups.setdefault((policy.action, policy.dry_run), []).append(policy)
        def group(action: str, dry_run: bool) -> list[_Policy]:
            return groups.get((action, dry_run), [])
        return cls(tuple(group(DENY, False)), tuple(group(ALLOW, False)),
                   tuple(group(AUDIT, False) + group(AUDIT, True)),
                   tuple(group(DENY, True)), tuple(group(ALLOW, True)))


class PolicySet:
    """Every AuthorizationPolicy, compiled for one waypoint. Immutable once built; `evaluate` is the per-
    request entry point (the applicable policies per destination service are computed once and cached)."""

    def __init__(self, policies: tuple[_Policy, ...], errors: tuple[ConfigError, ...]) -> None:
        self._policies = policies
        self.errors = errors
        self._by_service: dict[tuple[str, str] | None, _Applicable] = {}

    @classmethod
    def compile(cls, objects: Iterable[Mapping[str, Any]], *, waypoint: tuple[str, str] | WaypointScope,
                root_namespace: str = ROOT_NAMESPACE, untargeted: bool = False) -> PolicySet:
        """`objects`: AuthorizationPolicy objects as the API returns them, oldest first (Istio's order).
        `waypoint`: this waypoint's Gateway as (namespace, name), or a full `WaypointScope`."""
        scope = waypoint if isinstance(waypoint, WaypointScope) else WaypointScope(
            waypoint[0], waypoint[1], root_namespace, untargeted)
        errors: list[ConfigError] = []
        policies = []
        for obj in objects:
            policy = _compile_policy(obj, scope, errors)
            if policy is not None:
                policies.append(policy)
        for error in errors:
            log.warning("%s", error)
        return cls(tuple(policies), tuple(errors))

    def __len__(self) -> int:
        return len(self._policies)

    def _applicable(self, service: ServiceLike | None) -> _Applicable:
        key = (service.namespace, service.name) if service is not None else None
        found = self._by_service.get(key)
        if found is None:
            found = self._by_service[key] = _Applicable.of(p for p in self._policies
                                                           if p.attachment.applies_to(service))
        return found

    def applies(self, service: ServiceLike | None) -> list[str]:
        """The keys (`<ns>/<name>`) of the policies that apply to requests for `service`."""
        return [p.key for p in self._policies if p.attachment.applies_to(service)]

    def evaluate(self, request: AuthzRequest, service: ServiceLike | None = None) -> Decision:
        """Decide one request to `service` (None: a workload address, only waypoint-wide policies apply)."""
        applicable = self._applicable(service)
        if applicable.empty:
            return ALLOWED
        attrs = _Attrs(request)
        dry_run: list[str] = []
        for policy in applicable.dry_deny:
            if policy.match(attrs) is not None:
                dry_run.append(f"dry-run: deny policy match: {policy.key}")
        audited = tuple(p.key for p in applicable.audit if p.match(attrs) is not None)
        for policy in applicable.deny:
            index = policy.match(attrs)
            if index is not None:
                return Decision(False, policy.key, index, audited, tuple(dry_run))
        dry_allowed = [p.key for p in applicable.dry_allow if p.match(attrs) is not None]
        dry_run += [f"dry-run: allow policy match: {key}" for key in dry_allowed]
        if applicable.dry_allow and not dry_allowed:
            dry_run.append("dry-run: no allow policies match")
        for policy in applicable.allow:
            index = policy.match(attrs)
            if index is not None:
                return Decision(True, policy.key, index, audited, tuple(dry_run))
        if applicable.allow:
            return Decision(False, None, None, audited, tuple(dry_run))
        return Decision(True, None, None, audited, tuple(dry_run))

    def describe(self) -> list[dict[str, Any]]:
        """The compiled policies for the admin config dump."""
        return [{
            "policy": p.key,
            "action": CUSTOM if p.custom else p.action,
            "enforced_as": p.action,
            "dry_run": p.dry_run,
            "targets": {"waypoint": p.attachment.waypoint, "services": sorted(p.attachment.services),
                        "namespace_wide": p.attachment.namespace_wide},
            "rules": [index for index, _ in p.rules],
        } for p in self._policies]
