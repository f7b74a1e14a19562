"""The inputs and outputs of translation: an immutable snapshot of the Kubernetes objects istiod's
ambient index reads, and the workload model (PROTOCOLS.md §5.1-5.2) made from it.

Plain dicts in, exactly as the API server returns them; nothing here talks to the API server, and
nothing in the translate package mutates an input object.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ambient.proto import authorization_pb2, workload_pb2

Obj = Mapping[str, Any]
Key = tuple[str, str]  # (namespace, name); a Namespace is keyed ("", name)
Condition = dict[str, Any]
StatusKey = tuple[str, str, str]  # (kind, namespace, name) of the object whose status gets the conditions

# Kubernetes' default; istiod's --domain flag.
DOMAIN_SUFFIX = "cluster.local"
# istiod's default meshConfig.rootNamespace.
ROOT_NAMESPACE = "istio-system"
# The HBONE port of every waypoint (PROTOCOLS.md §1, §8); istiod hard-codes it as well.
HBONE_PORT = 15008
WAYPOINT_CLASS = "istio-waypoint"

# Labels and annotations (PROTOCOLS.md §9 and Istio's well-known names).
ANN_REDIRECTION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
LABEL_TUNNEL = "networking.istio.io/tunnel"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
LABEL_INGRESS_USE_WAYPOINT = "istio.io/ingress-use-waypoint"
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
LABEL_GATEWAY_MANAGED = "gateway.istio.io/managed"
GATEWAY_MANAGED_MESH = "istio.io-mesh-controller"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
ANN_SUBJECT_ALT_NAMES = "security.istio.io/subject-alt-names"

_GATEWAY_API_GROUP = "gateway.networking.k8s.io"
_ISTIO_SECURITY_GROUP = "security.istio.io"


def _freeze(objects: Mapping[Any, Obj] | None) -> Mapping[Any, Obj]:
    return MappingProxyType(dict(objects or {}))


@dataclass(frozen=True)
class ClusterState:
    """Everything translation reads, keyed by (namespace, name). Treat the object dicts as read-only."""

    pods: Mapping[Key, Obj] = field(default_factory=dict)
    services: Mapping[Key, Obj] = field(default_factory=dict)
    endpointslices: Mapping[Key, Obj] = field(default_factory=dict)
    namespaces: Mapping[str, Obj] = field(default_factory=dict)
    authorization_policies: Mapping[Key, Obj] = field(default_factory=dict)
    peer_authentications: Mapping[Key, Obj] = field(default_factory=dict)
    gateways: Mapping[Key, Obj] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("pods", "services", "endpointslices", "namespaces", "authorization_policies",
                     "peer_authentications", "gateways"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))

    @classmethod
    def from_objects(cls, objects: Iterable[Obj]) -> ClusterState:
        """Sort a mixed list of objects (a `kubectl get -o yaml` dump, a test case) by kind; kinds
        translation does not read (Deployments, ConfigMaps, Istio's networking Gateway...) are skipped."""
        tables: dict[str, dict[Any, Obj]] = {name: {} for name in (
            "pods", "services", "endpointslices", "namespaces", "authorization_policies",
            "peer_authentications", "gateways")}
        for obj in objects:
            table = _table_for(obj) if isinstance(obj, Mapping) else None
            if table is None:
                continue
            name = str(meta(obj).get("name", ""))
            key: Any = name if table == "namespaces" else (str(meta(obj).get("namespace") or "default"), name)
            tables[table][key] = obj
        return cls(**tables)


def _table_for(obj: Obj) -> str | None:
    kind = obj.get("kind")
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    if group == "":
        return {"Pod": "pods", "Service": "services", "Namespace": "namespaces"}.get(str(kind))
    if group == "discovery.k8s.io" and kind == "EndpointSlice":
        return "endpointslices"
    if group == _ISTIO_SECURITY_GROUP:
        return {"AuthorizationPolicy": "authorization_policies",
                "PeerAuthentication": "peer_authentications"}.get(str(kind))
    if group == _GATEWAY_API_GROUP and kind == "Gateway":
        return "gateways"
    return None


@dataclass(frozen=True)
class Translation:
    """The workload model for one snapshot.

    `addresses` are keyed by xDS resource name (workload uid `<cluster>//Pod/<ns>/<name>`, service
    `<ns>/<hostname>`), `authorizations` by `<ns>/<name>`; `statuses` holds the conditions the control
    plane should write back, keyed (kind, namespace, name).
    """

    addresses: dict[str, workload_pb2.Address]
    authorizations: dict[str, authorization_pb2.Authorization]
    statuses: dict[StatusKey, list[Condition]]


# --- small helpers shared by the rule modules -------------------------------------------------------

# Objects come from users: every accessor below tolerates any JSON value where a field should be.

def mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def meta(obj: Obj) -> Mapping[str, Any]:
    return mapping(obj.get("metadata"))


def spec(obj: Obj) -> Mapping[str, Any]:
    return mapping(obj.get("spec"))


def status(obj: Obj) -> Mapping[str, Any]:
    return mapping(obj.get("status"))


def _string_map(value: Any) -> Mapping[str, str]:
    """Labels and annotations are string maps; the API server enforces that, garbage is dropped here."""
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def labels(obj: Obj) -> Mapping[str, str]:
    return _string_map(meta(obj).get("labels"))


def annotations_of(obj: Obj) -> Mapping[str, str]:
    return _string_map(meta(obj).get("annotations"))


def selects(selector: Mapping[str, Any], target: Mapping[str, str]) -> bool:
    """matchLabels semantics: every selector pair is present in the target's labels."""
    return all(target.get(k) == str(v) for k, v in selector.items())


def ip_bytes(text: Any) -> bytes | None:
    """4 or 16 bytes for an IP literal; None for anything else (garbage in a status field, a hostname)."""
    try:
        return ipaddress.ip_address(str(text)).packed
    except ValueError:
        return None


def service_hostname(name: str, namespace: str, domain_suffix: str) -> str:
    return f"{name}.{namespace}.svc.{domain_suffix}"


def port_number(value: Any) -> int | None:
    """1-65535 as an int or a digit string; None for names, bools and anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and 0 < value < 65536 else None


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def as_str_list(value: Any) -> list[str]:
    return [str(v) for v in as_list(value)]
