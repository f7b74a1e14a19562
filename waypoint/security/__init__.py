"""The waypoint's L7 security: AuthorizationPolicy (`authz.py`) and RequestAuthentication (`jwt.py`).

This module holds what both share: which policies attach to this waypoint and to the request's destination
service (Istio's `WorkloadPolicyMatcher.ShouldAttachPolicy` for a waypoint) and the small read-only views of
a request they take. Errors are the routing model's `ConfigError` (one record for every compiler of the
waypoint), re-exported here. It must not import `ztunnel` (nor anything that does I/O).

Attachment at a waypoint, exactly as istiod decides it for a waypoint proxy:

- `targetRefs` (or the legacy single `targetRef`) naming
  - `kind: Gateway`, group `gateway.networking.k8s.io`, this waypoint's Gateway, the policy in its namespace;
  - `kind: Service`, group `""`/`core`, the request's destination Service, the policy in its namespace;
  - `kind: GatewayClass`, group `gateway.networking.k8s.io`, name `istio-waypoint`, the policy in the root
    namespace: every waypoint of the mesh.
  A targetRef naming another namespace never matches (Istio rejects cross-namespace references).
- A policy with a `selector` never applies at a waypoint (it is for ztunnel and sidecars).
- A policy with neither selector nor targetRefs (namespace-wide, or mesh-wide in the root namespace) does NOT
  apply at a waypoint either: istiod skips "workload-scoped" policies for waypoints (`IsWaypoint` → false),
  ztunnel enforces them at L4. `untargeted=True` makes them apply here too (a local choice, not Istio's):
  a root-namespace one to every request, another to requests for Services of its namespace (and to
  workload-addressed requests when that is the waypoint's namespace).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from waypoint.routing.model import ConfigError as ConfigError  # re-exported for authz and jwt

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"  # the GatewayClass every Istio waypoint belongs to (PROTOCOLS §8)
ROOT_NAMESPACE = "istio-system"  # Istio's default mesh root namespace
_CORE_GROUPS = frozenset({"", "core"})  # istio's CanonicalGroup("") is "core"


class ServiceLike(Protocol):
    """The request's destination Service: an xDS `workload_pb2.Service` or a `ServiceRef`."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class ServiceRef:
    namespace: str
    name: str


@dataclass(frozen=True)
class WaypointScope:
    """Where policies are being attached: this waypoint's Gateway, the mesh root namespace, and whether
    untargeted (namespace-/mesh-wide) policies are enforced here as well."""

    namespace: str
    name: str
    root_namespace: str = ROOT_NAMESPACE
    untargeted: bool = False


@dataclass(frozen=True)
class Attachment:
    """Where one policy applies at this waypoint: to every request through it (`waypoint`), or to requests
    for the named Services of the policy's own namespace (`services`), or — an untargeted policy, opted in —
    to requests for any Service of its namespace and to workload-addressed requests when that namespace is
    the waypoint's own (`namespace_wide`, `workloads`)."""

    namespace: str
    waypoint: bool
    services: frozenset[str] = frozenset()
    namespace_wide: bool = False
    workloads: bool = False

    def applies_to(self, service: ServiceLike | None) -> bool:
        if self.waypoint:
            return True
        if service is None:
            return self.workloads
        return service.namespace == self.namespace and (self.namespace_wide or service.name in self.services)


def attachment(obj: Mapping[str, Any], kind: str, scope: WaypointScope,
               errors: list[ConfigError]) -> Attachment | None:
    """How `obj` (an AuthorizationPolicy or RequestAuthentication, per `kind`) attaches to this waypoint; None
    when it does not apply here at all. Problems with its targets are appended to `errors`."""
    namespace, name = identify(obj)
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        return None  # the compilers report a spec that is not an object; there is nothing to attach
    refs: Any = spec.get("targetRefs") or []
    if not refs and spec.get("targetRef"):
        refs = [spec["targetRef"]]
    if not isinstance(refs, list):
        errors.append(ConfigError(kind, namespace, name, "spec.targetRefs", "must be a list of references"))
        return None
    if spec.get("selector") is not None:
        if refs:
            errors.append(ConfigError(kind, namespace, name, "spec.selector",
                                      "at most one of selector and targetRefs may be set; the policy is ignored"))
        return None  # workload-selected: ztunnel's (or a sidecar's), never a waypoint's
    if not refs:
        if not scope.untargeted:
            return None
        if namespace == scope.root_namespace:
            return Attachment(namespace, waypoint=True)
        return Attachment(namespace, False, namespace_wide=True, workloads=namespace == scope.namespace)
    waypoint = False
    services: set[str] = set()
    for i, ref in enumerate(refs):
        field = f"spec.targetRefs[{i}]"
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref.get("kind"):
            errors.append(ConfigError(kind, namespace, name, field, "needs a kind and a name"))
            continue
        ref_namespace = ref.get("namespace") or namespace
        if ref_namespace != namespace:
            errors.append(ConfigError(kind, namespace, name, field,
                                      f"cross-namespace reference to {ref_namespace!r} is not supported"))
            continue
        group, ref_kind, ref_name = ref.get("group") or "", ref["kind"], ref["name"]
        if ref_kind == "Service" and group in _CORE_GROUPS:
            services.add(ref_name)
        elif ref_kind == "Gateway" and group == GATEWAY_API_GROUP:
            waypoint |= namespace == scope.namespace and ref_name == scope.name
        elif ref_kind == "GatewayClass" and group == GATEWAY_API_GROUP:
            waypoint |= namespace == scope.root_namespace and ref_name == WAYPOINT_GATEWAY_CLASS
        elif ref_kind not in {"ServiceEntry", "HTTPRoute", "Gateway", "GatewayClass"}:
            errors.append(ConfigError(kind, namespace, name, field,
                                      f"{ref_kind} ({group or 'core'}) is not a supported target; expected a "
                                      "Gateway, a Service or the istio-waypoint GatewayClass"))
    if not waypoint and not services:
        return None
    return Attachment(namespace, waypoint, frozenset(services))


def identify(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of a Kubernetes object, empty strings where missing. (List responses carry no
    `kind` in their items, so callers name the kind themselves.)"""
    meta = obj.get("metadata") or {}
    if not isinstance(meta, Mapping):
        meta = {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")
