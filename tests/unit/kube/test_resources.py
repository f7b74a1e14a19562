"""The kind ↔ plural table: REST paths, versions, kubectl-style names and the custom-kind fallback."""

from __future__ import annotations

import pytest

from ambient.kube.resources import BUILTIN, EXTRA_VERSIONS, ResourceTable, ResourceType, plural_of


@pytest.mark.parametrize(("kind", "plural"), [
    ("Widget", "widgets"),
    ("Ingress", "ingresses"),
    ("Box", "boxes"),
    ("Buzz", "buzzes"),
    ("Patch", "patches"),
    ("Mesh", "meshes"),
    ("Policy", "policies"),
    ("Gateway", "gateways"),
    ("Key", "keys"),
    ("WasmPlugin", "wasmplugins"),
])
def test_plural_of(kind: str, plural: str) -> None:
    assert plural_of(kind) == plural


def test_builtin_table_has_no_duplicate_kind_or_plural_per_group() -> None:
    kinds = [(rt.group, rt.kind) for rt in BUILTIN]
    plurals = [(rt.group, rt.plural) for rt in BUILTIN]
    assert len(kinds) == len(set(kinds))
    assert len(plurals) == len(set(plurals))
    assert set(EXTRA_VERSIONS) <= {rt.group for rt in BUILTIN}


@pytest.mark.parametrize(("api_version", "kind", "plural", "namespaced"), [
    ("v1", "Pod", "pods", True),
    ("v1", "Namespace", "namespaces", False),
    ("v1", "Node", "nodes", False),
    ("apps/v1", "Deployment", "deployments", True),
    ("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", True),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False),
    ("networking.istio.io/v1", "ServiceEntry", "serviceentries", True),
    ("gateway.networking.k8s.io/v1", "GatewayClass", "gatewayclasses", False),
    ("example.com/v1", "Widget", "widgets", True),  # unknown: default plural, namespaced
])
def test_for_manifest(api_version: str, kind: str, plural: str, namespaced: bool) -> None:
    rt = ResourceTable().for_manifest(api_version, kind)
    assert (rt.api_version, rt.kind, rt.plural, rt.namespaced) == (api_version, kind, plural, namespaced)


def test_for_manifest_keeps_the_requested_version_of_a_known_kind() -> None:
    rt = ResourceTable().for_manifest("networking.istio.io/v1beta1", "VirtualService")
    assert (rt.group, rt.version, rt.plural) == ("networking.istio.io", "v1beta1", "virtualservices")
    assert rt.path("ns", "vs") == "/apis/networking.istio.io/v1beta1/namespaces/ns/virtualservices/vs"


@pytest.mark.parametrize(("rt", "args", "path"), [
    (ResourceType("", "v1", "Pod", "pods"), (), "/api/v1/pods"),
    (ResourceType("", "v1", "Pod", "pods"), ("ns",), "/api/v1/namespaces/ns/pods"),
    (ResourceType("", "v1", "Pod", "pods"), ("ns", "p"), "/api/v1/namespaces/ns/pods/p"),
    (ResourceType("", "v1", "Pod", "pods"), ("ns", "p", "status"), "/api/v1/namespaces/ns/pods/p/status"),
    (ResourceType("", "v1", "Pod", "pods"), ("ns", None, "status"), "/api/v1/namespaces/ns/pods"),
    (ResourceType("", "v1", "Node", "nodes", namespaced=False), ("ns", "n"), "/api/v1/nodes/n"),
    (ResourceType("apps", "v1", "Deployment", "deployments"), ("ns", "d"),
     "/apis/apps/v1/namespaces/ns/deployments/d"),
])
def test_path(rt: ResourceType, args: tuple[str | None, ...], path: str) -> None:
    assert rt.path(*args) == path


@pytest.mark.parametrize(("name", "group", "plural"), [
    ("pods", "", "pods"),
    ("pod", "", "pods"),
    ("Pod", "", "pods"),
    ("po", "", "pods"),
    ("svc", "", "services"),
    ("deploy", "apps", "deployments"),
    ("deployments.apps", "apps", "deployments"),
    ("vs", "networking.istio.io", "virtualservices"),
    ("gateway", "gateway.networking.k8s.io", "gateways"),  # the Gateway API wins a bare name, as in kubectl
    ("gateways.networking.istio.io", "networking.istio.io", "gateways"),
    ("crd", "apiextensions.k8s.io", "customresourcedefinitions"),
])
def test_resolve(name: str, group: str, plural: str) -> None:
    rt = ResourceTable().resolve(name)
    assert rt is not None
    assert (rt.group, rt.plural) == (group, plural)


@pytest.mark.parametrize("name", ["widgets", "pods.apps", "deploy.extensions"])
def test_resolve_unknown(name: str) -> None:
    assert ResourceTable().resolve(name) is None


def test_by_plural_serves_any_version_of_a_known_group() -> None:
    table = ResourceTable()
    rt = table.by_plural("networking.istio.io", "v1alpha3", "virtualservices")
    assert rt is not None
    assert (rt.kind, rt.api_version) == ("VirtualService", "networking.istio.io/v1alpha3")
    assert table.by_plural("example.com", "v1", "widgets") is None


def test_add_learns_a_custom_kind_and_keeps_the_first_registration() -> None:
    table = ResourceTable()
    table.add(ResourceType("example.com", "v1", "Gizmo", "gizmoes", namespaced=False))
    table.add(ResourceType("example.com", "v2", "Gizmo", "gizmoes", namespaced=True))
    rt = table.for_manifest("example.com/v1", "Gizmo")
    assert (rt.plural, rt.namespaced) == ("gizmoes", False)
    resolved = table.resolve("gizmoes.example.com")
    assert resolved is not None
    assert resolved.version == "v1"
