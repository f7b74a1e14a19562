"""AuthorizationPolicy (`security.istio.io/v1`) → `istio.security.Authorization` for ztunnel
(PROTOCOLS.md §5.2-5.3), as istiod's `convertAuthorizationPolicy`.

Only L4 attributes reach ztunnel. A rule that also names HTTP attributes is dropped from an ALLOW
policy (it can never match at L4, so the policy allows less) and kept without the HTTP parts in a DENY
policy (it matches more, so the policy denies more); either way the policy's `ZtunnelAccepted`
condition says which attributes were ignored, in istiod's words.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import empty_pb2

from ambient.proto import authorization_pb2

from .model import Condition, Obj, as_list, as_str_list, meta, spec

ZTUNNEL_ACCEPTED = "ZtunnelAccepted"

_HTTP_RULE_FMT = ("ztunnel does not support HTTP attributes (found: {found}). "
                  "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {boilerplate}")
_HTTP_DENY_BOILERPLATE = ("DENY policy with HTTP attributes is enforced without the HTTP rules. "
                          "This will be more restrictive than requested.")
_HTTP_ALLOW_BOILERPLATE = ("Within an ALLOW policy, rules matching HTTP attributes are omitted. "
                           "This will be more restrictive than requested.")

# Fields of `to.operation` and `from.source` that only a waypoint can evaluate. istiod counts
# remoteIpBlocks among them: the "remote" address comes from X-Forwarded-For, an HTTP header.
_HTTP_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_HTTP_SOURCE_FIELDS = ("remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals")
L4_WHEN_KEYS = ("source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port")

T = TypeVar("T")


@dataclass(frozen=True)
class ConvertedPolicy:
    """One AuthorizationPolicy's ztunnel form. `authorization` is None when ztunnel cannot use the
    policy at all; `condition` is None when the policy is not for ztunnel (it targets a waypoint)."""

    authorization: authorization_pb2.Authorization | None
    selector: Mapping[str, str] | None  # matchLabels for WORKLOAD_SELECTOR scope
    condition: Condition | None


def string_matches(values: Sequence[str]) -> list[authorization_pb2.StringMatch]:
    """`*` is presence, `*x` a suffix, `x*` a prefix, anything else exact (Istio's stringToMatch)."""
    result = []
    for v in values:
        if v == "*":
            result.append(authorization_pb2.StringMatch(presence=empty_pb2.Empty()))
        elif v.startswith("*"):
            result.append(authorization_pb2.StringMatch(suffix=v[1:]))
        elif v.endswith("*"):
            result.append(authorization_pb2.StringMatch(prefix=v[:-1]))
        else:
            result.append(authorization_pb2.StringMatch(exact=v))
    return result


def ports(values: Sequence[str]) -> list[int]:
    """Port numbers; anything else is skipped, as istiod does."""
    return [int(v) for v in values if v.isdigit() and int(v) <= 65535]


def ip_blocks(values: Sequence[str]) -> list[authorization_pb2.Address]:
    """`10.0.0.1` (a /32 or /128) or `10.0.0.0/8`; unparsable entries are skipped, as istiod does."""
    result = []
    for v in values:
        try:
            if "/" in v:
                net = ipaddress.ip_network(v, strict=False)
                result.append(authorization_pb2.Address(address=net.network_address.packed, length=net.prefixlen))
            else:
                ip = ipaddress.ip_address(v)
                result.append(authorization_pb2.Address(address=ip.packed, length=ip.max_prefixlen))
        except ValueError:
            continue
    return result


def service_accounts(values: Sequence[str], namespace: str) -> list[authorization_pb2.ServiceAccountMatch]:
    """`ns/sa`, or a bare `sa` in the policy's namespace."""
    result = []
    for v in values:
        ns, sep, sa = v.partition("/")
        result.append(authorization_pb2.ServiceAccountMatch(namespace=ns, serviceAccount=sa) if sep
                      else authorization_pb2.ServiceAccountMatch(namespace=namespace, serviceAccount=v))
    return result


def _when(condition: Mapping[str, Any], key: str, negate: bool,
          convert: Callable[[Sequence[str]], Sequence[T]]) -> list[T]:
    if condition.get("key") != key:
        return []
    return list(convert(as_str_list(condition.get("notValues" if negate else "values"))))


def _field(entry: Any, name: str) -> Mapping[str, Any]:
    value = entry.get(name) if isinstance(entry, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _rule_clauses(rule: Mapping[str, Any], namespace: str) -> tuple[list[authorization_pb2.Clause], list[str]]:
    """The clauses of one rule (its `to` list, its `from` list, each `when`: AND between them, OR inside),
    and the HTTP attributes it names."""
    http: list[str] = []
    clauses: list[list[authorization_pb2.Match]] = []

    to_matches = []
    for entry in as_list(rule.get("to")):
        op = _field(entry, "operation")
        http += [f for f in _HTTP_OPERATION_FIELDS if op.get(f)]
        to_matches.append(authorization_pb2.Match(
            destination_ports=ports(as_str_list(op.get("ports"))),
            not_destination_ports=ports(as_str_list(op.get("notPorts")))))
    from_matches = []
    for entry in as_list(rule.get("from")):
        src = _field(entry, "source")
        http += [f for f in _HTTP_SOURCE_FIELDS if src.get(f)]
        from_matches.append(authorization_pb2.Match(
            source_ips=ip_blocks(as_str_list(src.get("ipBlocks"))),
            not_source_ips=ip_blocks(as_str_list(src.get("notIpBlocks"))),
            namespaces=string_matches(as_str_list(src.get("namespaces"))),
            not_namespaces=string_matches(as_str_list(src.get("notNamespaces"))),
            service_accounts=service_accounts(as_str_list(src.get("serviceAccounts")), namespace),
            not_service_accounts=service_accounts(as_str_list(src.get("notServiceAccounts")), namespace),
            principals=string_matches(as_str_list(src.get("principals"))),
            not_principals=string_matches(as_str_list(src.get("notPrincipals")))))
    clauses += [m for m in (to_matches, from_matches) if m]
    for condition in as_list(rule.get("when")):
        if not isinstance(condition, Mapping):
            continue
        if condition.get("key") not in L4_WHEN_KEYS:
            http.append(str(condition.get("key")))
        clauses.append([authorization_pb2.Match(
            namespaces=_when(condition, "source.namespace", False, string_matches),
            principals=_when(condition, "source.principal", False, string_matches),
            source_ips=_when(condition, "source.ip", False, ip_blocks),
            destination_ports=_when(condition, "destination.port", False, ports),
            destination_ips=_when(condition, "destination.ip", False, ip_blocks),
            not_namespaces=_when(condition, "source.namespace", True, string_matches),
            not_principals=_when(condition, "source.principal", True, string_matches),
            not_source_ips=_when(condition, "source.ip", True, ip_blocks),
            not_destination_ports=_when(condition, "destination.port", True, ports),
            not_destination_ips=_when(condition, "destination.ip", True, ip_blocks))])
    # An empty match (every field stripped or never set) always holds, so its clause always holds and
    # says nothing: omit it. istiod sends the empty match instead; the meaning is the same.
    kept = [authorization_pb2.Clause(matches=c) for c in clauses
            if all(m.ByteSize() > 0 for m in c)]
    return kept, http


def convert_authorization_policy(policy: Obj, root_namespace: str) -> ConvertedPolicy:
    body = spec(policy)
    namespace = str(meta(policy).get("namespace") or "default")
    name = str(meta(policy).get("name", ""))
    if as_list(body.get("targetRefs")) or body.get("targetRef"):
        return ConvertedPolicy(None, None, None)  # bound to a waypoint (or gateway), not to ztunnel

    generation = meta(policy).get("generation")
    selector_spec = body.get("selector")
    selector = None
    if isinstance(selector_spec, Mapping):
        match_labels = selector_spec.get("matchLabels")
        selector = {str(k): str(v) for k, v in match_labels.items()} if isinstance(match_labels, Mapping) else {}
        scope = authorization_pb2.WORKLOAD_SELECTOR
    elif namespace == root_namespace:
        scope = authorization_pb2.GLOBAL
    else:
        scope = authorization_pb2.NAMESPACE

    action_name = str(body.get("action") or "ALLOW")
    if action_name not in ("ALLOW", "DENY"):
        return ConvertedPolicy(None, selector, _condition(
            False, "UnsupportedValue", f"ztunnel does not support the {action_name} action", generation))
    action = authorization_pb2.ALLOW if action_name == "ALLOW" else authorization_pb2.DENY

    authorization = authorization_pb2.Authorization(name=name, namespace=namespace, scope=scope, action=action)
    found_http: set[str] = set()
    for rule in as_list(body.get("rules")):
        clauses, http = _rule_clauses(rule if isinstance(rule, Mapping) else {}, namespace)
        found_http.update(http)
        if http and action == authorization_pb2.ALLOW:
            continue  # an HTTP rule never matches at L4
        authorization.rules.append(authorization_pb2.Rule(clauses=clauses))

    if found_http:
        boilerplate = _HTTP_ALLOW_BOILERPLATE if action == authorization_pb2.ALLOW else _HTTP_DENY_BOILERPLATE
        message = _HTTP_RULE_FMT.format(found=", ".join(sorted(found_http)), boilerplate=boilerplate)
        condition = _condition(True, "UnsupportedValue", message, generation)
    else:
        condition = _condition(True, "Accepted", "attached to ztunnel", generation)
    return ConvertedPolicy(authorization, selector, condition)


def _condition(accepted: bool, reason: str, message: str, generation: Any) -> Condition:
    condition: Condition = {"type": ZTUNNEL_ACCEPTED, "status": "True" if accepted else "False",
                            "reason": reason, "message": message}
    if isinstance(generation, int):
        condition["observedGeneration"] = generation
    return condition
