"""PeerAuthentication → the DENY policies ztunnel enforces (PROTOCOLS.md §5.3), as istiod's ambient index.

istiod's mechanism, mirrored here:
- As soon as any PeerAuthentication exists it publishes one static policy,
  `<root>/istio_converted_static_strict`: DENY when the peer has no identity (`not_principals: [presence]`).
  Its scope is WORKLOAD_SELECTOR and it binds by name: a workload lists it in `authorization_policies`
  exactly when its effective mode is STRICT. That is how a namespace PERMISSIVE policy overrides a
  mesh-wide STRICT one: that namespace's workloads simply do not list it.
- The effective mode inherits mesh → namespace → workload (UNSET inherits; DISABLE counts as PERMISSIVE,
  since ztunnel cannot turn mTLS off). With several candidates at one level the oldest wins.
- A selector policy with `portLevelMtls` that changes the outcome for some ports becomes
  `<ns>/converted_peer_authentication_<name>`; workloads it selects list that instead of the static one.
  A STRICT workload with PERMISSIVE ports: one rule "no identity AND port not in the exceptions";
  a PERMISSIVE workload with STRICT ports: one rule per port, "no identity AND this port".

istiod computes the parent mode slightly differently in its two halves (which workloads reference the
converted policy vs. what the policy contains); here one function decides both, with the documented
inheritance, so a workload never references a policy that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import empty_pb2

from ambient.proto import authorization_pb2

from .model import ClusterState, Key, Obj, meta, selects, spec

STATIC_STRICT_NAME = "istio_converted_static_strict"  # '_' is illegal in Kubernetes names: no clash
CONVERTED_PREFIX = "converted_peer_authentication_"

STRICT, PERMISSIVE, DISABLE, UNSET = "STRICT", "PERMISSIVE", "DISABLE", "UNSET"


def _no_identity() -> authorization_pb2.Match:
    return authorization_pb2.Match(not_principals=[authorization_pb2.StringMatch(presence=empty_pb2.Empty())])


def _mode(mtls: Any) -> str:
    mode = mtls.get("mode") if isinstance(mtls, Mapping) else None
    return mode if mode in (STRICT, PERMISSIVE, DISABLE) else UNSET


def _match_labels(policy: Obj) -> Mapping[str, Any]:
    selector = spec(policy).get("selector")
    labels = selector.get("matchLabels") if isinstance(selector, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def _age(item: tuple[Key, Obj]) -> tuple[str, str]:
    """Oldest first; same-second ties broken by name, as Istio resolves policy conflicts."""
    key, policy = item
    return str(meta(policy).get("creationTimestamp") or ""), key[1]


class PeerAuthentications:
    """The PeerAuthentications of one snapshot: the policies they become, and which of them each
    workload must list."""

    def __init__(self, state: ClusterState, root_namespace: str) -> None:
        self._root = root_namespace
        self._any = bool(state.peer_authentications)
        level: dict[str, tuple[Key, Obj]] = {}  # oldest mesh (root ns) or namespace-wide policy per namespace
        self._selector_policies: dict[str, list[tuple[Key, Obj]]] = {}
        for item in sorted(state.peer_authentications.items(), key=_age):
            (namespace, _), policy = item
            if not _match_labels(policy):
                level.setdefault(namespace, item)
            elif namespace != root_namespace:  # istiod ignores selector policies in the root namespace
                self._selector_policies.setdefault(namespace, []).append(item)
        self._mesh_mode = _mode(spec(level[root_namespace][1]).get("mtls")) if root_namespace in level else UNSET
        self._namespace_modes = {ns: _mode(spec(p).get("mtls")) for ns, (_, p) in level.items()}
        self._converted: dict[Key, authorization_pb2.Authorization | None] = {
            key: self._convert(key, policy)
            for items in self._selector_policies.values() for key, policy in items}

    @property
    def static_strict_name(self) -> str:
        return f"{self._root}/{STATIC_STRICT_NAME}"

    def authorizations(self) -> dict[str, authorization_pb2.Authorization]:
        result: dict[str, authorization_pb2.Authorization] = {}
        if self._any:
            result[self.static_strict_name] = authorization_pb2.Authorization(
                name=STATIC_STRICT_NAME, namespace=self._root, scope=authorization_pb2.WORKLOAD_SELECTOR,
                action=authorization_pb2.DENY,
                rules=[authorization_pb2.Rule(clauses=[authorization_pb2.Clause(matches=[_no_identity()])])])
        for converted in self._converted.values():
            if converted is not None:
                result[f"{converted.namespace}/{converted.name}"] = converted
        return result

    def _parent_strict(self, namespace: str) -> bool:
        """Mesh mode, overridden by the namespace's own policy unless that one is UNSET."""
        mode = self._namespace_modes.get(namespace, UNSET) if namespace != self._root else UNSET
        return (mode if mode != UNSET else self._mesh_mode) == STRICT

    def keys_for(self, namespace: str, workload_labels: Mapping[str, str]) -> list[str]:
        """The PeerAuthentication-derived policy names a workload lists in `authorization_policies`."""
        strict = self._parent_strict(namespace)
        for key, policy in self._selector_policies.get(namespace, []):
            if not selects(_match_labels(policy), workload_labels):
                continue
            mode = _mode(spec(policy).get("mtls"))  # the oldest selecting policy decides
            if mode != UNSET:
                strict = mode == STRICT
            converted = self._converted[key]
            if converted is not None:
                return [f"{converted.namespace}/{converted.name}"]
            break
        return [self.static_strict_name] if strict else []

    def _convert(self, key: Key, policy: Obj) -> authorization_pb2.Authorization | None:
        namespace, name = key
        mode = _mode(spec(policy).get("mtls"))
        strict = mode == STRICT or (mode == UNSET and self._parent_strict(namespace))
        port_modes = _port_modes(spec(policy).get("portLevelMtls"))
        if strict:
            exceptions = [p for p, m in port_modes if m in (PERMISSIVE, DISABLE)]
            if not exceptions:
                return None  # plain STRICT: the static policy covers it
            port_clauses = [authorization_pb2.Clause(matches=[authorization_pb2.Match(not_destination_ports=[p])])
                            for p in exceptions]
            identity = [authorization_pb2.Clause(matches=[_no_identity()])]
            # istiod's order: the workload's own STRICT first, a merged inherited STRICT last.
            clauses = identity + port_clauses if mode == STRICT else port_clauses + identity
            rules = [authorization_pb2.Rule(clauses=clauses)]
        else:
            strict_ports = [p for p, m in port_modes if m == STRICT]
            if not strict_ports:
                return None
            rules = [authorization_pb2.Rule(clauses=[authorization_pb2.Clause(matches=[authorization_pb2.Match(
                not_principals=_no_identity().not_principals, destination_ports=[p])])]) for p in strict_ports]
        return authorization_pb2.Authorization(
            name=CONVERTED_PREFIX + name, namespace=namespace, scope=authorization_pb2.WORKLOAD_SELECTOR,
            action=authorization_pb2.DENY, rules=rules)


def _port_modes(port_level: Any) -> list[tuple[int, str]]:
    """(target port, mode) sorted by port; keys that are not port numbers are skipped."""
    if not isinstance(port_level, Mapping):
        return []
    result = []
    for port, mtls in port_level.items():
        text = str(port)
        if text.isdigit() and 0 < int(text) < 65536:
            result.append((int(text), _mode(mtls)))
    return sorted(result)
