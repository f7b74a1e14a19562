"""The table of resource types: kind ↔ group/version/plural, and which are namespaced.

Clients need it to turn a manifest's `apiVersion` + `kind` into a REST path (what kubectl learns from
discovery); the local API server uses the same table to name list kinds and to know scope. Kinds not in
the table (custom resources) fall back to the Kubernetes pluralisation rule and are namespaced unless the
server says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    namespaced: bool = True
    has_status: bool = True
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
            if sub:
                base += f"/{sub}"
        return base


def _t(api_version: str, kind: str, plural: str, *, namespaced: bool = True, status: bool = True,
       short: tuple[str, ...] = ()) -> ResourceType:
    group, _, version = api_version.rpartition("/")
    return ResourceType(group, version, kind, plural, namespaced, status, short)


BUILTIN: tuple[ResourceType, ...] = (
    _t("v1", "Namespace", "namespaces", namespaced=False, short=("ns",)),
    _t("v1", "Node", "nodes", namespaced=False, short=("no",)),
    _t("v1", "Pod", "pods", short=("po",)),
    _t("v1", "Service", "services", short=("svc",)),
    _t("v1", "ServiceAccount", "serviceaccounts", status=False, short=("sa",)),
    _t("v1", "ConfigMap", "configmaps", status=False, short=("cm",)),
    _t("v1", "Secret", "secrets", status=False),
    _t("v1", "Endpoints", "endpoints", status=False, short=("ep",)),
    _t("v1", "Event", "events", status=False, short=("ev",)),
    _t("apps/v1", "Deployment", "deployments", short=("deploy",)),
    _t("apps/v1", "ReplicaSet", "replicasets", short=("rs",)),
    _t("apps/v1", "DaemonSet", "daemonsets", short=("ds",)),
    _t("apps/v1", "StatefulSet", "statefulsets", short=("sts",)),
    _t("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", status=False),
    _t("coordination.k8s.io/v1", "Lease", "leases", status=False),
    _t("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", namespaced=False, status=False),
    _t("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False, status=False),
    _t("rbac.authorization.k8s.io/v1", "Role", "roles", status=False),
    _t("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", status=False),
    _t("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions",
       namespaced=False, short=("crd", "crds")),
    _t("networking.istio.io/v1", "VirtualService", "virtualservices", short=("vs",)),
    _t("networking.istio.io/v1", "DestinationRule", "destinationrules", short=("dr",)),
    _t("networking.istio.io/v1", "ServiceEntry", "serviceentries", short=("se",)),
    _t("networking.istio.io/v1", "Gateway", "gateways"),
    _t("networking.istio.io/v1", "Sidecar", "sidecars"),
    _t("networking.istio.io/v1", "WorkloadEntry", "workloadentries", short=("we",)),
    _t("security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies", short=("ap",)),
    _t("security.istio.io/v1", "PeerAuthentication", "peerauthentications", short=("pa",)),
    _t("security.istio.io/v1", "RequestAuthentication", "requestauthentications", short=("ra",)),
    _t("telemetry.istio.io/v1", "Telemetry", "telemetries"),
    _t("gateway.networking.k8s.io/v1", "Gateway", "gateways", short=("gtw",)),
    _t("gateway.networking.k8s.io/v1", "GatewayClass", "gatewayclasses", namespaced=False, short=("gc",)),
    _t("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
    _t("gateway.networking.k8s.io/v1", "GRPCRoute", "grpcroutes"),
    _t("gateway.networking.k8s.io/v1beta1", "ReferenceGrant", "referencegrants"),
)

# Other versions the same stored objects are served under (Istio and Gateway API serve several).
EXTRA_VERSIONS = {
    "networking.istio.io": ("v1beta1", "v1alpha3"),
    "security.istio.io": ("v1beta1",),
    "telemetry.istio.io": ("v1alpha1",),
    "gateway.networking.k8s.io": ("v1beta1", "v1alpha2"),
}


def plural_of(kind: str) -> str:
    """The Kubernetes default pluralisation for custom kinds."""
    lower = kind.lower()
    if lower.endswith(("s", "x", "z", "ch", "sh")):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in "aeiou":
        return lower[:-1] + "ies"
    return lower + "s"


class ResourceTable:
    """Lookup by (group, plural), (apiVersion, kind) or a kubectl-style name (`pods`, `po`, `deploy.apps`)."""

    def __init__(self, types: tuple[ResourceType, ...] = BUILTIN) -> None:
        self._by_plural: dict[tuple[str, str], ResourceType] = {}
        self._by_kind: dict[tuple[str, str], ResourceType] = {}
        for rt in types:
            self.add(rt)

    def add(self, rt: ResourceType) -> None:
        self._by_plural.setdefault((rt.group, rt.plural), rt)
        self._by_kind.setdefault((rt.group, rt.kind), rt)

    def types(self) -> list[ResourceType]:
        return list(self._by_plural.values())

    def by_plural(self, group: str, version: str, plural: str) -> ResourceType | None:
        rt = self._by_plural.get((group, plural))
        if rt is None:
            return None
        return rt if rt.version == version else ResourceType(
            rt.group, version, rt.kind, rt.plural, rt.namespaced, rt.has_status, rt.short_names)

    def for_manifest(self, api_version: str, kind: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        rt = self._by_kind.get((group, kind))
        if rt is None:
            return ResourceType(group, version, kind, plural_of(kind))
        if rt.version != version:
            return ResourceType(group, version, rt.kind, rt.plural, rt.namespaced, rt.has_status,
                                rt.short_names)
        return rt

    def require(self, name: str) -> ResourceType:
        """`resolve` for names the caller knows are built in."""
        rt = self.resolve(name)
        if rt is None:
            raise KeyError(f"unknown resource type {name!r}")
        return rt

    def resolve(self, name: str) -> ResourceType | None:
        """kubectl-style: `pods`, `pod`, `po`, `Pod`, `deployments.apps`, `gateways.gateway.networking.k8s.io`."""
        lower = name.lower()
        base, _, group = lower.partition(".")
        matches = [
            rt for rt in self._by_plural.values()
            if base in (rt.plural, rt.kind.lower(), *rt.short_names) and (not group or rt.group == group)
        ]
        # A bare name shared by two groups (Gateway) prefers the Kubernetes Gateway API, as kubectl does.
        matches.sort(key=lambda rt: (rt.group != "", not rt.group.endswith("k8s.io"), rt.group))
        return matches[0] if matches else None
