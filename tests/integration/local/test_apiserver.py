"""The local API server over real HTTP: the Kubernetes semantics controllers rely on, spoken to with
`KubeClient` and, where the client hides the wire (Status bodies, watch framing, auth), with raw aiohttp.

Every wait is bounded by `WAIT`; nothing sleeps to synchronise: watches are read until an expected
event arrives and informers are polled for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ambient.kube.client import KubeClient, KubeConfig, KubeConfigError
from ambient.kube.errors import ApiError
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceType
from ambient.local import apiserver, store
from ambient.local.apiserver import ApiServer

Obj = dict[str, Any]
Stream = AsyncGenerator[tuple[str, Obj], None]

HOST = "127.0.0.1"
TOKEN = "test-token"
WAIT = 5.0  # bound on every network wait, so a broken server fails a test instead of hanging it
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")

PODS = ResourceType("", "v1", "Pod", "pods")
SERVICES = ResourceType("", "v1", "Service", "services")
CONFIGMAPS = ResourceType("", "v1", "ConfigMap", "configmaps", has_status=False)
NAMESPACES = ResourceType("", "v1", "Namespace", "namespaces", namespaced=False)


# -- manifests -------------------------------------------------------------------------------------
def namespace(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def pod(name: str, *, ns: str = "default", labels: dict[str, str] | None = None, node: str | None = None,
        finalizers: list[str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": ns}
    if labels is not None:
        meta["labels"] = labels
    if finalizers is not None:
        meta["finalizers"] = finalizers
    spec: Obj = {"containers": [{"name": "app", "image": "busybox"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def service(name: str, *, cluster_ip: str | None = None, port: int = 80, finalizers: list[str] | None = None) -> Obj:
    spec: Obj = {"selector": {"app": name}, "ports": [{"port": port}]}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    meta: Obj = {"name": name, "namespace": "default"}
    if finalizers:
        meta["finalizers"] = finalizers
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def configmap(name: str, *, labels: dict[str, str] | None = None, finalizers: list[str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": "default", **({"labels": labels} if labels else {})}
    if finalizers:
        meta["finalizers"] = finalizers
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


def deployment(name: str, selector: Obj, template_labels: dict[str, str]) -> Obj:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": selector, "template": {
                "metadata": {"labels": template_labels},
                "spec": {"containers": [{"name": "app", "image": "busybox"}]}}}}


def virtual_service(name: str) -> Obj:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}}


# -- a running server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running(state_dir: Path, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[ApiServer, str]]:
    server = ApiServer(state_dir, TOKEN)
    port = free_port()
    try:
        await server.start([HOST], port, ssl_context)
        yield server, f"{'https' if ssl_context else 'http'}://{HOST}:{port}"
    finally:
        await server.close()


@dataclass
class Cluster:
    server: ApiServer
    url: str
    client: KubeClient
    http: aiohttp.ClientSession  # raw, with the bearer token

    async def rv(self) -> int:
        listing = await self.client.list(NAMESPACES)
        return int(listing["metadata"]["resourceVersion"])


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running(tmp_path) as (server, url), KubeClient(KubeConfig(url, token=TOKEN)) as client, \
            aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        await client.create(namespace("default"))
        yield Cluster(server, url, client, http)


async def raw(http: aiohttp.ClientSession, method: str, path: str, body: Any = None, *,
              content_type: str = "application/json") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    async with asyncio.timeout(WAIT), http.request(method, path, data=data,
                                                   headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json(content_type=None)


def assert_status(code: int, body: Any, expected_code: int, reason: str) -> None:
    """A Kubernetes `Status` failure object, with the HTTP code repeated in it."""
    assert code == expected_code, body
    assert isinstance(body, dict)
    assert (body["kind"], body["apiVersion"], body["status"]) == ("Status", "v1", "Failure")
    assert (body["code"], body["reason"]) == (expected_code, reason), body
    assert body["message"]


async def expect_error(call: Any, code: int, reason: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        await call
    assert (info.value.code, info.value.reason) == (code, reason), info.value.message
    return info.value


# -- watch helpers ---------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def watching(client: KubeClient, rt: ResourceType, namespace: str | None = "default",
                   **kwargs: Any) -> AsyncIterator[Stream]:
    stream = cast(Stream, client.watch(rt, namespace, **kwargs))
    try:
        yield stream
    finally:
        await stream.aclose()


async def take(stream: Stream, count: int, *, skip_bookmarks: bool = True) -> list[tuple[str, Obj]]:
    events: list[tuple[str, Obj]] = []
    try:
        async with asyncio.timeout(WAIT):
            async for event_type, obj in stream:
                if skip_bookmarks and event_type == "BOOKMARK":
                    continue
                events.append((event_type, obj))
                if len(events) == count:
                    return events
    except TimeoutError:
        pass
    pytest.fail(f"expected {count} watch events within {WAIT}s, got {names(events)}")


def names(events: list[tuple[str, Obj]]) -> list[tuple[str, str]]:
    return [(t, o["metadata"]["name"]) for t, o in events]


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds or `WAIT` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- CRUD for core and custom kinds ----------------------------------------------------------------
CORE_KINDS: list[Obj] = [
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {"kubernetes.io/os": "linux"}}},
    pod("web-1", labels={"app": "web"}),
    service("web"),
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "default"}},
    configmap("settings"),
    deployment("web", {"matchLabels": {"app": "web"}}, {"app": "web", "version": "v1"}),
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "web-x1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
     "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.5"]}], "ports": [{"port": 80, "protocol": "TCP"}]},
]


@pytest.mark.parametrize("manifest", CORE_KINDS, ids=[m["kind"] for m in CORE_KINDS])
async def test_create_get_list_delete(cluster: Cluster, manifest: Obj) -> None:
    client = cluster.client
    rt = await client.resource(manifest["apiVersion"], manifest["kind"])
    ns = manifest["metadata"].get("namespace")
    created = await client.create(manifest)
    meta = created["metadata"]
    assert (created["apiVersion"], created["kind"], meta["name"]) == (
        manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])
    assert meta.get("namespace") == ns
    assert meta["uid"] and meta["creationTimestamp"] and int(meta["resourceVersion"]) > 0
    assert meta["generation"] == 1

    assert await client.get(rt, meta["name"], ns) == created
    listing = await client.list(rt, ns)
    assert listing["kind"] == f"{manifest['kind']}List"
    assert [o["metadata"]["uid"] for o in listing["items"]] == [meta["uid"]]
    assert int(listing["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])

    await client.delete(rt, meta["name"], ns)
    await expect_error(client.get(rt, meta["name"], ns), 404, "NotFound")
    assert (await client.list(rt, ns))["items"] == []


async def test_namespace_create_get_list(cluster: Cluster) -> None:
    created = await cluster.client.create(namespace("apps"))
    assert created["status"] == {"phase": "Active"}
    assert created["metadata"]["labels"] == {"kubernetes.io/metadata.name": "apps"}
    assert "namespace" not in created["metadata"]
    listing = await cluster.client.list(NAMESPACES)
    assert [o["metadata"]["name"] for o in listing["items"]] == ["apps", "default"]


async def test_defaults_are_applied(cluster: Cluster) -> None:
    created = await cluster.client.create(pod("p"))
    assert created["status"] == {"phase": "Pending"}
    spec = created["spec"]
    assert (spec["restartPolicy"], spec["serviceAccountName"], spec["terminationGracePeriodSeconds"]) == (
        "Always", "default", 30)
    svc = await cluster.client.create(service("web"))
    assert svc["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert svc["spec"]["type"] == "ClusterIP"


async def test_generate_name(cluster: Cluster) -> None:
    manifest = configmap("")
    manifest["metadata"] = {"generateName": "cfg-", "namespace": "default"}
    first = await cluster.client.create(manifest)
    second = await cluster.client.create(manifest)
    assert first["metadata"]["name"].startswith("cfg-")
    assert first["metadata"]["name"] != second["metadata"]["name"]


async def test_istio_kind_is_served_under_every_version_with_api_version_rewritten(cluster: Cluster) -> None:
    client = cluster.client
    created = await client.create(virtual_service("reviews"))
    assert created["apiVersion"] == "networking.istio.io/v1"
    for version in ("v1", "v1beta1", "v1alpha3"):
        rt = await client.resource(f"networking.istio.io/{version}", "VirtualService")
        assert rt.path("default", "reviews") == (
            f"/apis/networking.istio.io/{version}/namespaces/default/virtualservices/reviews")
        got = await client.get(rt, "reviews", "default")
        assert got["apiVersion"] == f"networking.istio.io/{version}"
        assert (got["spec"], got["metadata"]["uid"]) == (created["spec"], created["metadata"]["uid"])
        listing = await client.list(rt, "default")
        assert listing["apiVersion"] == f"networking.istio.io/{version}"
        assert [o["apiVersion"] for o in listing["items"]] == [f"networking.istio.io/{version}"]
        patched = await client.patch(rt, "reviews", {"metadata": {"labels": {"seen": version}}}, "default")
        assert patched["apiVersion"] == f"networking.istio.io/{version}"

    v1beta1 = await client.resource("networking.istio.io/v1beta1", "VirtualService")
    async with watching(client, v1beta1, resource_version=created["metadata"]["resourceVersion"]) as stream:
        [(event_type, obj)] = await take(stream, 1)
    assert (event_type, obj["apiVersion"]) == ("MODIFIED", "networking.istio.io/v1beta1")


async def test_unknown_custom_kind_is_stored_as_given(cluster: Cluster) -> None:
    client = cluster.client
    widget = {"apiVersion": "example.com/v1", "kind": "Widget",
              "metadata": {"name": "w", "namespace": "default"},
              "spec": {"size": 3, "nested": {"list": [1, "two", None]}}, "extra": True}
    created = await client.create(widget)
    rt = await client.resource("example.com/v1", "Widget")
    assert rt.path("default", "w") == "/apis/example.com/v1/namespaces/default/widgets/w"
    got = await client.get(rt, "w", "default")
    assert got == created
    assert (got["apiVersion"], got["kind"], got["spec"], got["extra"]) == (
        "example.com/v1", "Widget", widget["spec"], True)
    listing = await client.list(rt, "default")
    assert listing["kind"] == "WidgetList"
    assert [o["metadata"]["name"] for o in listing["items"]] == ["w"]
    await client.delete(rt, "w", "default")
    await expect_error(client.get(rt, "w", "default"), 404, "NotFound")


# -- errors as Status objects ----------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    """A request the server must refuse with a `Status` of `code`/`reason`, naming `field` when set."""

    method: str
    path: str
    body: Any
    code: int
    reason: str
    field: str | None = None
    content_type: str = "application/json"


CM_PATH = "/api/v1/namespaces/default/configmaps"
ERRORS = [
    pytest.param(Bad("GET", f"{CM_PATH}/missing", None, 404, "NotFound"), id="missing-object"),
    pytest.param(Bad("POST", "/api/v1/namespaces/nowhere/pods", pod("p", ns="nowhere"), 404, "NotFound"),
                 id="missing-namespace"),
    pytest.param(Bad("POST", CM_PATH, configmap("seed"), 409, "AlreadyExists"), id="already-exists"),
    pytest.param(Bad("POST", CM_PATH, configmap("Bad_Name"), 422, "Invalid", "metadata.name"), id="bad-name"),
    pytest.param(Bad("POST", CM_PATH, {"kind": "ConfigMap", "metadata": {}}, 422, "Invalid", "metadata.name"),
                 id="no-name"),
    pytest.param(Bad("POST", CM_PATH, configmap("c", labels={"app": "a b"}), 422, "Invalid", "metadata.labels.app"),
                 id="bad-label-value"),
    pytest.param(Bad("POST", "/api/v1/namespaces/default/services", service("s", port=70000), 422, "Invalid",
                     "spec.ports[0].port"), id="service-port-out-of-range"),
    pytest.param(Bad("POST", "/apis/apps/v1/namespaces/default/deployments",
                     deployment("d", {"matchLabels": {"app": "web"}}, {"app": "api"}), 422, "Invalid",
                     "spec.template.metadata.labels"), id="deployment-selector-mismatch"),
    pytest.param(Bad("POST", "/apis/apps/v1/namespaces/default/deployments",
                     deployment("d", {"matchExpressions": [{"operator": "Exists"}]}, {"app": "web"}), 422, "Invalid",
                     "spec.selector"), id="deployment-malformed-selector"),
    pytest.param(Bad("POST", "/apis/apps/v1/namespaces/default/deployments",
                     {**deployment("d", {"matchLabels": {"app": "web"}}, {"app": "web"}),
                      "spec": {"selector": {"matchLabels": {"app": "web"}},
                               "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}}},
                     422, "Invalid", "spec.template.spec.containers"), id="deployment-template-without-containers"),
    pytest.param(Bad("POST", "/api/v1/namespaces/default/pods", {**pod("p"), "spec": {"containers": []}},
                     422, "Invalid", "spec.containers"), id="pod-without-containers"),
    pytest.param(Bad("POST", CM_PATH, b'{"kind": "ConfigMap",', 400, "BadRequest"), id="malformed-json"),
    pytest.param(Bad("POST", CM_PATH, b"[1, 2]", 400, "BadRequest"), id="json-not-an-object"),
    pytest.param(Bad("PUT", f"{CM_PATH}/seed", b"[]", 400, "BadRequest"), id="update-with-json-array"),
    pytest.param(Bad("PUT", f"{CM_PATH}/seed", configmap("other"), 400, "BadRequest"), id="name-mismatch"),
    pytest.param(Bad("PATCH", f"{CM_PATH}/seed", [{"op": "remove"}], 415, "UnsupportedMediaType",
                     content_type="application/json-patch+json"), id="unsupported-patch-type"),
    pytest.param(Bad("GET", "/api/v1/pods?labelSelector=app+in+web", None, 400, "BadRequest"),
                 id="bad-label-selector"),
    pytest.param(Bad("GET", "/api/v1/pods?fieldSelector=spec.hostNetwork%3Dtrue", None, 400, "BadRequest"),
                 id="unsupported-field-selector"),
    pytest.param(Bad("GET", "/nothing/here", None, 404, "NotFound"), id="unknown-path"),
    pytest.param(Bad("GET", f"{CM_PATH}/seed/scale", None, 404, "NotFound"), id="unknown-subresource"),
    pytest.param(Bad("GET", "/api/v1/namespaces/default/nodes/n", None, 404, "NotFound"),
                 id="cluster-scoped-kind-under-namespace"),
]


@pytest.mark.parametrize("bad", ERRORS)
async def test_errors_are_status_objects(cluster: Cluster, bad: Bad) -> None:
    await cluster.client.create(configmap("seed"))
    status, reply = await raw(cluster.http, bad.method, bad.path, bad.body, content_type=bad.content_type)
    assert_status(status, reply, bad.code, bad.reason)
    if bad.field is not None:
        assert bad.field in [c["field"] for c in reply["details"]["causes"]], reply
        assert bad.field in reply["message"]


async def test_client_raises_api_error_from_status(cluster: Cluster) -> None:
    error = await expect_error(cluster.client.create(service("s", port=0)), 422, "Invalid")
    assert [c["field"] for c in error.details["causes"]] == ["spec.ports[0].port"]
    error = await expect_error(cluster.client.get(PODS, "missing", "default"), 404, "NotFound")
    assert error.message == 'pods "missing" not found'


async def test_stale_resource_version_conflicts(cluster: Cluster) -> None:
    client = cluster.client
    stale = await client.create(configmap("c"))
    fresh = await client.replace({**stale, "data": {"k": "first"}})
    assert int(fresh["metadata"]["resourceVersion"]) > int(stale["metadata"]["resourceVersion"])
    error = await expect_error(client.replace({**stale, "data": {"k": "second"}}), 409, "Conflict")
    assert "the object has been modified" in error.message
    stale_patch = {"metadata": {"resourceVersion": stale["metadata"]["resourceVersion"]}, "data": {"k": "third"}}
    await expect_error(client.patch(CONFIGMAPS, "c", stale_patch, "default"), 409, "Conflict")
    assert (await client.get(CONFIGMAPS, "c", "default"))["data"] == {"k": "first"}
    # Without a resourceVersion an update is unconditional, as in Kubernetes.
    unconditional = copy.deepcopy(stale)
    del unconditional["metadata"]["resourceVersion"]
    unconditional["data"] = {"k": "last"}
    assert (await client.replace(unconditional))["data"] == {"k": "last"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}],
                         ids=["none", "wrong-token", "not-bearer"])
async def test_requests_without_the_bearer_token_are_unauthorized(cluster: Cluster, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession(cluster.url, headers=headers) as anonymous:
        status, body = await raw(anonymous, "GET", "/api/v1/namespaces")
        assert_status(status, body, 401, "Unauthorized")
        async with asyncio.timeout(WAIT), anonymous.get("/healthz") as resp:
            assert resp.status == 200
    with_wrong_token = KubeClient(KubeConfig(cluster.url, token="wrong"))
    async with with_wrong_token:
        await expect_error(with_wrong_token.list(PODS), 401, "Unauthorized")


# -- updates: merge patch, status subresource, generation ------------------------------------------
async def test_merge_patch_adds_and_removes_labels(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(pod("p", labels={"app": "web", "old": "x"}))
    patched = await client.patch(PODS, "p", {"metadata": {"labels": {"old": None, "new": "y"}}}, "default")
    assert patched["metadata"]["labels"] == {"app": "web", "new": "y"}
    assert patched["spec"]["containers"] == [{"name": "app", "image": "busybox"}]
    assert (await client.get(PODS, "p", "default"))["metadata"]["labels"] == {"app": "web", "new": "y"}
    await expect_error(client.patch(PODS, "missing", {"metadata": {"labels": {"a": "b"}}}, "default"),
                       404, "NotFound")


async def test_status_subresource(cluster: Cluster) -> None:
    client = cluster.client
    created = await client.create(pod("p"))

    # PATCH /status changes status (and, for pods, labels/annotations as Kubernetes allows) but never
    # spec, and does not bump generation.
    after_status = await client.patch(PODS, "p", {"status": {"phase": "Running", "podIP": "10.1.0.5"},
                                                  "spec": {"nodeName": "node-a"},
                                                  "metadata": {"labels": {"sneaky": "yes"}}},
                                      "default", status=True)
    assert after_status["status"] == {"phase": "Running", "podIP": "10.1.0.5"}
    assert after_status["spec"] == created["spec"]
    assert after_status["metadata"]["labels"] == {"sneaky": "yes"}
    assert after_status["metadata"]["generation"] == 1

    # A PUT to the main resource leaves status alone but takes the spec change.
    main = copy.deepcopy(after_status)
    main["status"] = {"phase": "Failed"}
    main["spec"]["activeDeadlineSeconds"] = 60
    after_main = await client.replace(main)
    assert after_main["status"] == {"phase": "Running", "podIP": "10.1.0.5"}
    assert after_main["spec"]["activeDeadlineSeconds"] == 60
    assert after_main["metadata"]["generation"] == 2

    # PUT /status takes the status only.
    status_put = copy.deepcopy(after_main)
    status_put["status"]["phase"] = "Succeeded"
    status_put["spec"]["activeDeadlineSeconds"] = 5
    after_put = await client.replace(status_put, status=True)
    assert after_put["status"]["phase"] == "Succeeded"
    assert after_put["spec"]["activeDeadlineSeconds"] == 60
    assert after_put["metadata"]["generation"] == 2

    status_code, body = await raw(cluster.http, "GET", "/api/v1/namespaces/default/pods/p/status")
    assert status_code == 200
    assert body["status"]["phase"] == "Succeeded"


async def test_generation_bumps_only_on_spec_change(cluster: Cluster) -> None:
    client = cluster.client
    manifest = deployment("web", {"matchLabels": {"app": "web"}}, {"app": "web"})
    created = await client.create(manifest)
    assert created["metadata"]["generation"] == 1
    rt = await client.resource("apps/v1", "Deployment")

    labelled = await client.patch(rt, "web", {"metadata": {"labels": {"team": "a"}}}, "default")
    assert labelled["metadata"]["generation"] == 1
    with_status = await client.patch(rt, "web", {"status": {"replicas": 1}}, "default", status=True)
    assert with_status["metadata"]["generation"] == 1

    # Re-sending the manifest as written (without the server's defaults) is not a spec change.
    resent = copy.deepcopy(manifest)
    resent["metadata"]["resourceVersion"] = with_status["metadata"]["resourceVersion"]
    resent = await client.replace(resent)
    assert resent["metadata"]["generation"] == 1

    scaled = await client.patch(rt, "web", {"spec": {"replicas": 3}}, "default")
    assert scaled["metadata"]["generation"] == 2
    assert scaled["status"] == {"replicas": 1}
    again = await client.patch(rt, "web", {"spec": {"replicas": 3}}, "default")
    assert again["metadata"]["generation"] == 2


async def test_immutable_metadata_survives_update(cluster: Cluster) -> None:
    created = await cluster.client.create(configmap("c"))
    forged = copy.deepcopy(created)
    forged["metadata"].update(uid="forged", creationTimestamp="2000-01-01T00:00:00Z")
    forged["data"] = {"k": "v2"}
    updated = await cluster.client.replace(forged)
    assert (updated["metadata"]["uid"], updated["metadata"]["creationTimestamp"]) == (
        created["metadata"]["uid"], created["metadata"]["creationTimestamp"])
    assert updated["data"] == {"k": "v2"}


# -- list with selectors ---------------------------------------------------------------------------
SELECTED: list[tuple[str | None, str | None, list[str]]] = [
    # (labelSelector, fieldSelector, expected names)
    (None, None, ["a", "b", "c", "d"]),
    ("app=web", None, ["a", "b"]),
    ("app==web", None, ["a", "b"]),
    ("app!=web", None, ["c", "d"]),
    ("app in (api, web)", None, ["a", "b", "c"]),
    ("app notin (web)", None, ["c", "d"]),
    ("tier", None, ["a", "b"]),
    ("!tier", None, ["c", "d"]),
    ("app=web,tier=front", None, ["a"]),
    (None, "spec.nodeName=node-1", ["a", "c"]),
    (None, "spec.nodeName!=node-1", ["b", "d"]),
    (None, "spec.nodeName=", ["d"]),
    ("app=web", "spec.nodeName=node-2", ["b"]),
    (None, "metadata.name=c", ["c"]),
]


async def test_list_with_label_and_field_selectors(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(pod("a", labels={"app": "web", "tier": "front"}, node="node-1"))
    await client.create(pod("b", labels={"app": "web", "tier": "back"}, node="node-2"))
    await client.create(pod("c", labels={"app": "api"}, node="node-1"))
    await client.create(pod("d"))
    for label_selector, field_selector, expected in SELECTED:
        listing = await client.list(PODS, "default", label_selector, field_selector)
        got = [o["metadata"]["name"] for o in listing["items"]]
        assert got == expected, (label_selector, field_selector)


async def test_list_across_namespaces_and_resource_version(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(namespace("other"))
    await client.create(pod("p1"))
    last = await client.create(pod("p2", ns="other"))
    listing = await client.list(PODS)
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in listing["items"]] == [
        ("default", "p1"), ("other", "p2")]
    assert listing["metadata"]["resourceVersion"] == last["metadata"]["resourceVersion"]
    assert [o["metadata"]["name"] for o in (await client.list(PODS, "other"))["items"]] == ["p2"]
    # The list version moves with any write, not just writes of this kind.
    await client.create(configmap("c"))
    assert int((await client.list(PODS))["metadata"]["resourceVersion"]) > int(last["metadata"]["resourceVersion"])


async def test_delete_collection_by_label(cluster: Cluster) -> None:
    await cluster.client.create(configmap("a", labels={"drop": "yes"}))
    await cluster.client.create(configmap("b"))
    status, _ = await raw(cluster.http, "DELETE", "/api/v1/namespaces/default/configmaps?labelSelector=drop")
    assert status == 200
    left = await cluster.client.list(CONFIGMAPS, "default")
    assert [o["metadata"]["name"] for o in left["items"]] == ["b"]


# -- watch -----------------------------------------------------------------------------------------
async def test_watch_orders_added_modified_deleted(cluster: Cluster) -> None:
    client = cluster.client
    start = await cluster.rv()
    await client.create(namespace("other"))
    created = await client.create(pod("p", labels={"v": "1"}))
    await client.create(pod("elsewhere", ns="other"))
    await client.patch(PODS, "p", {"metadata": {"labels": {"v": "2"}}}, "default")
    await client.create(pod("q"))
    await client.delete(PODS, "p", "default")
    async with watching(client, PODS, resource_version=str(start)) as stream:
        events = await take(stream, 4)
        assert names(events) == [("ADDED", "p"), ("MODIFIED", "p"), ("ADDED", "q"), ("DELETED", "p")]
        versions = [int(o["metadata"]["resourceVersion"]) for _, o in events]
        assert versions == sorted(versions)
        assert len(set(versions)) == 4
        assert events[1][1]["metadata"]["labels"] == {"v": "2"}
        assert events[3][1]["metadata"]["uid"] == created["metadata"]["uid"]

        # The same stream carries later writes live, in order.
        await client.patch(PODS, "q", {"metadata": {"labels": {"live": "yes"}}}, "default")
        await client.delete(PODS, "q", "default")
        assert names(await take(stream, 2)) == [("MODIFIED", "q"), ("DELETED", "q")]


async def test_watch_from_resource_version_replays_only_later_events(cluster: Cluster) -> None:
    client = cluster.client
    first = await client.create(pod("first"))
    await client.create(pod("second"))
    async with watching(client, PODS, resource_version=first["metadata"]["resourceVersion"]) as stream:
        assert names(await take(stream, 1)) == [("ADDED", "second")]
        await client.create(pod("third"))
        assert names(await take(stream, 1)) == [("ADDED", "third")]


async def test_watch_without_resource_version_starts_with_current_state(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(pod("a"))
    await client.create(pod("b"))
    await client.delete(PODS, "a", "default")
    async with watching(client, PODS) as stream:
        assert names(await take(stream, 1)) == [("ADDED", "b")]
        await client.create(pod("c"))
        assert names(await take(stream, 1)) == [("ADDED", "c")]


async def test_label_selected_watch_sees_objects_leave_and_enter(cluster: Cluster) -> None:
    client = cluster.client
    start = await cluster.rv()
    await client.create(pod("p", labels={"app": "web"}))
    await client.create(pod("other", labels={"app": "api"}))
    await client.patch(PODS, "p", {"metadata": {"labels": {"app": "api"}}}, "default")  # leaves
    await client.patch(PODS, "p", {"metadata": {"labels": {"extra": "x"}}}, "default")  # unseen
    await client.patch(PODS, "p", {"metadata": {"labels": {"app": "web"}}}, "default")  # enters
    await client.patch(PODS, "p", {"metadata": {"labels": {"extra": "y"}}}, "default")  # changes inside
    await client.delete(PODS, "p", "default")
    async with watching(client, PODS, resource_version=str(start), label_selector="app=web") as stream:
        events = await take(stream, 5)
    assert names(events) == [("ADDED", "p"), ("DELETED", "p"), ("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    assert events[1][1]["metadata"]["labels"] == {"app": "api"}  # the object as it left the selection
    assert events[3][1]["metadata"]["labels"] == {"app": "web", "extra": "y"}


async def test_field_selected_watch_sees_pod_bound_to_its_node(cluster: Cluster) -> None:
    client = cluster.client
    start = await cluster.rv()
    await client.create(pod("p"))
    await client.create(pod("elsewhere", node="node-2"))
    await client.replace({**(await client.get(PODS, "p", "default")), "spec": {
        **(await client.get(PODS, "p", "default"))["spec"], "nodeName": "node-1"}})
    async with watching(client, PODS, resource_version=str(start), field_selector="spec.nodeName=node-1") as stream:
        [(event_type, obj)] = await take(stream, 1)
    assert (event_type, obj["metadata"]["name"], obj["spec"]["nodeName"]) == ("ADDED", "p", "node-1")


async def test_watch_from_compacted_resource_version_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "EVENT_LOG_SIZE", 4)
    async with running(tmp_path) as (_, url), KubeClient(KubeConfig(url, token=TOKEN)) as client, \
            aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        await client.create(namespace("default"))
        first = await client.create(configmap("c0"))
        for i in range(1, 6):
            await client.create(configmap(f"c{i}"))
        old = first["metadata"]["resourceVersion"]
        status, body = await raw(http, "GET", f"/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={old}")
        assert_status(status, body, 410, "Expired")
        with pytest.raises(ApiError) as info:
            async with watching(client, CONFIGMAPS, resource_version=old) as stream:
                await take(stream, 1)
        assert (info.value.code, info.value.reason) == (410, "Expired")
        # A version still in the log replays what followed it.
        recent = (await client.get(CONFIGMAPS, "c4", "default"))["metadata"]["resourceVersion"]
        async with watching(client, CONFIGMAPS, resource_version=recent) as stream:
            assert names(await take(stream, 1)) == [("ADDED", "c5")]


async def test_informer_relists_after_410_and_converges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "EVENT_LOG_SIZE", 8)
    monkeypatch.setattr(store, "WATCH_QUEUE_SIZE", 4)
    async with running(tmp_path) as (server, url), KubeClient(KubeConfig(url, token=TOKEN)) as client:
        await client.create(namespace("default"))
        for i in range(3):
            await client.create(pod(f"keep-{i}"))

        lists = 0
        real_list = client.list

        async def counting_list(*args: Any, **kwargs: Any) -> Obj:
            nonlocal lists
            lists += 1
            return await real_list(*args, **kwargs)

        monkeypatch.setattr(client, "list", counting_list)
        seen: list[tuple[str, str]] = []
        informer = Informer(client, PODS, namespace="default",
                            handler=lambda event, obj: seen.append((event, obj["metadata"]["name"])))
        task = asyncio.create_task(informer.run(), name="informer")
        try:
            async with asyncio.timeout(WAIT):
                await informer.synced.wait()
            assert sorted(seen) == [("ADDED", "keep-0"), ("ADDED", "keep-1"), ("ADDED", "keep-2")]

            # A burst the watch cannot keep up with, written without yielding to the event loop: the
            # watcher's queue overflows and the log compacts past the informer's resourceVersion.
            pods = server.types.by_plural("", "v1", "pods")
            assert pods is not None
            server.delete(pods, "default", "keep-0")
            for i in range(20):
                server.create(pods, "default", pod(f"burst-{i}"))
            server.patch(pods, "default", "keep-1", {"metadata": {"labels": {"touched": "yes"}}})

            def converged() -> bool:
                return {k: o["metadata"]["resourceVersion"] for k, o in informer.cache.items()} == {
                    ("default", o["metadata"]["name"]): o["metadata"]["resourceVersion"]
                    for o in server.store.items("", "pods", "default")}

            await eventually(converged, "the informer cache to match the server after the burst")
            assert lists >= 2, "the informer should have relisted after 410 Gone"
            assert ("DELETED", "keep-0") in seen
            assert informer.get("keep-1", "default") is not None
            assert informer.get("keep-1", "default")["metadata"]["labels"] == {"touched": "yes"}  # type: ignore[index]

            # And it keeps watching afterwards.
            await client.create(pod("after"))
            await eventually(lambda: informer.get("after", "default") is not None, "the informer to see `after`")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_bookmarks_arrive_when_requested(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apiserver, "BOOKMARK_INTERVAL", 0.05)
    created = await cluster.client.create(pod("p"))
    current = str(await cluster.rv())
    async with watching(cluster.client, PODS, resource_version=current) as stream:
        [(event_type, obj)] = await take(stream, 1, skip_bookmarks=False)
        assert event_type == "BOOKMARK"
        assert obj["kind"] == "Pod"
        assert obj["metadata"]["resourceVersion"] == current
        await cluster.client.delete(PODS, "p", "default")
        events = await take(stream, 1)
        assert names(events) == [("DELETED", "p")]
        assert int(events[0][1]["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])


async def test_timeout_seconds_ends_the_stream_without_unrequested_bookmarks(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apiserver, "BOOKMARK_INTERVAL", 0.05)
    current = await cluster.rv()
    path = f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={current}&timeoutSeconds=1"
    async with asyncio.timeout(WAIT), cluster.http.get(path) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.read()  # returns only when the server ends the stream
    assert body == b""

    # Through the client: the iterator simply ends.
    async with asyncio.timeout(WAIT), watching(cluster.client, PODS, resource_version=str(current),
                                               timeout_seconds=1) as stream:
        assert [e async for e in stream if e[0] != "BOOKMARK"] == []


async def test_watch_frames_are_json_lines(cluster: Cluster) -> None:
    start = await cluster.rv()
    await cluster.client.create(configmap("a"))
    await cluster.client.create(configmap("b"))
    path = f"/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={start}&timeoutSeconds=5"
    async with asyncio.timeout(WAIT), cluster.http.get(path) as resp:
        lines = [json.loads(await resp.content.readline()) for _ in range(2)]
    assert [(e["type"], e["object"]["kind"], e["object"]["metadata"]["name"]) for e in lines] == [
        ("ADDED", "ConfigMap", "a"), ("ADDED", "ConfigMap", "b")]


# -- deletion: graceful pods, finalizers, namespaces -----------------------------------------------
async def test_bound_pod_deletion_is_graceful(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(pod("p", node="node-a"))
    deleting = await client.delete(PODS, "p", "default")
    assert deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 30
    still = await client.get(PODS, "p", "default")
    assert still["metadata"]["deletionTimestamp"] == deleting["metadata"]["deletionTimestamp"]

    # Repeating the delete changes nothing; the kubelet's status writes keep the deletion mark.
    again = await client.delete(PODS, "p", "default")
    assert again["metadata"]["resourceVersion"] == still["metadata"]["resourceVersion"]
    status = await client.patch(PODS, "p", {"status": {"phase": "Succeeded"}}, "default", status=True)
    assert status["metadata"]["deletionTimestamp"] == deleting["metadata"]["deletionTimestamp"]
    cleared = copy.deepcopy(status)
    del cleared["metadata"]["deletionTimestamp"]
    assert (await client.replace(cleared))["metadata"]["deletionTimestamp"] == deleting["metadata"]["deletionTimestamp"]

    # The kubelet's final delete with grace 0 removes it.
    await client.delete(PODS, "p", "default", grace_period=0)
    await expect_error(client.get(PODS, "p", "default"), 404, "NotFound")


async def test_grace_period_from_delete_options_body(cluster: Cluster) -> None:
    await cluster.client.create(pod("p", node="node-a"))
    status, body = await raw(cluster.http, "DELETE", "/api/v1/namespaces/default/pods/p",
                             {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 7})
    assert (status, body["metadata"]["deletionGracePeriodSeconds"]) == (200, 7)
    status, _ = await raw(cluster.http, "DELETE", "/api/v1/namespaces/default/pods/p", {"gracePeriodSeconds": 0})
    assert status == 200
    await expect_error(cluster.client.get(PODS, "p", "default"), 404, "NotFound")


async def test_unbound_pod_is_deleted_at_once(cluster: Cluster) -> None:
    await cluster.client.create(pod("p"))
    deleted = await cluster.client.delete(PODS, "p", "default")
    assert "deletionTimestamp" not in deleted["metadata"]
    await expect_error(cluster.client.get(PODS, "p", "default"), 404, "NotFound")
    await expect_error(cluster.client.delete(PODS, "p", "default"), 404, "NotFound")


async def test_finalizers_hold_an_object_until_cleared(cluster: Cluster) -> None:
    client = cluster.client
    created = await client.create(configmap("c", finalizers=["example.com/hold"]))
    start = created["metadata"]["resourceVersion"]
    deleting = await client.delete(CONFIGMAPS, "c", "default")
    assert deleting["metadata"]["deletionTimestamp"]
    held = await client.get(CONFIGMAPS, "c", "default")
    assert held["metadata"]["finalizers"] == ["example.com/hold"]

    # Updates that keep the finalizer keep the object (and its deletion mark).
    relabelled = await client.patch(CONFIGMAPS, "c", {"metadata": {"labels": {"a": "b"}}}, "default")
    assert relabelled["metadata"]["deletionTimestamp"] == deleting["metadata"]["deletionTimestamp"]

    await client.patch(CONFIGMAPS, "c", {"metadata": {"finalizers": None}}, "default")
    await expect_error(client.get(CONFIGMAPS, "c", "default"), 404, "NotFound")
    async with watching(client, CONFIGMAPS, resource_version=start) as stream:
        assert names(await take(stream, 3)) == [("MODIFIED", "c"), ("MODIFIED", "c"), ("DELETED", "c")]


async def test_deleting_a_namespace_terminates_it(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(namespace("doomed"))
    await client.create(configmap("existing") | {"metadata": {"name": "existing", "namespace": "doomed"}})
    deleting = await client.delete(NAMESPACES, "doomed")
    assert deleting["status"]["phase"] == "Terminating"
    assert deleting["metadata"]["deletionTimestamp"]
    got = await client.get(NAMESPACES, "doomed")
    assert got["status"]["phase"] == "Terminating"

    error = await expect_error(client.create(pod("p", ns="doomed")), 403, "Forbidden")
    assert "being terminated" in error.message
    status, body = await raw(cluster.http, "POST", "/api/v1/namespaces/doomed/configmaps",
                             {"kind": "ConfigMap", "metadata": {"name": "new"}})
    assert_status(status, body, 403, "Forbidden")
    # What is already there can still be read and deleted (the namespace controller's job).
    await client.get(CONFIGMAPS, "existing", "doomed")
    await client.delete(CONFIGMAPS, "existing", "doomed")

    # Clearing spec.finalizers (as the namespace controller does once empty) removes it.
    await client.replace({**got, "spec": {"finalizers": []}})
    await expect_error(client.get(NAMESPACES, "doomed"), 404, "NotFound")


# -- ClusterIP allocation --------------------------------------------------------------------------
async def test_cluster_ips_are_unique_and_in_range(cluster: Cluster) -> None:
    ips = [(await cluster.client.create(service(f"s{i}")))["spec"]["clusterIP"] for i in range(10)]
    assert len(set(ips)) == 10
    assert all(ipaddress.ip_address(ip) in SERVICE_CIDR for ip in ips)
    created = await cluster.client.get(SERVICES, "s0", "default")
    assert created["spec"]["clusterIPs"] == [created["spec"]["clusterIP"]]


async def test_requested_cluster_ip(cluster: Cluster) -> None:
    client = cluster.client
    assert (await client.create(service("dns", cluster_ip="10.96.0.10")))["spec"]["clusterIP"] == "10.96.0.10"
    for requested, message in (("10.96.0.10", "already allocated"), ("10.97.0.1", "not in the valid range"),
                               ("not-an-ip", "must be an IP")):
        error = await expect_error(client.create(service("other", cluster_ip=requested)), 422, "Invalid")
        assert [c["field"] for c in error.details["causes"]] == ["spec.clusterIP"]
        assert message in error.message
    headless = await client.create(service("headless", cluster_ip="None"))
    assert headless["spec"]["clusterIP"] == "None"


async def test_cluster_ip_is_kept_across_updates_and_released_on_delete(cluster: Cluster) -> None:
    client = cluster.client
    manifest = service("web")
    created = await client.create(manifest)
    ip = created["spec"]["clusterIP"]

    # An update built from the manifest (no clusterIP) keeps the allocated address.
    resent = copy.deepcopy(manifest)
    resent["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    resent["spec"]["ports"] = [{"port": 8080}]
    updated = await client.replace(resent)
    assert updated["spec"]["clusterIP"] == ip
    assert updated["spec"]["ports"][0]["port"] == 8080

    changed = copy.deepcopy(updated)
    changed["spec"]["clusterIP"] = "10.96.200.200"
    error = await expect_error(client.replace(changed), 422, "Invalid")
    assert "immutable" in error.message

    await client.delete(SERVICES, "web", "default")
    assert (await client.create(service("again", cluster_ip=ip)))["spec"]["clusterIP"] == ip


async def test_cluster_ip_is_released_when_finalizers_are_cleared(cluster: Cluster) -> None:
    client = cluster.client
    ip = (await client.create(service("web", finalizers=["example.com/hold"])))["spec"]["clusterIP"]
    await client.delete(SERVICES, "web", "default")
    await client.patch(SERVICES, "web", {"metadata": {"finalizers": None}}, "default")
    await expect_error(client.get(SERVICES, "web", "default"), 404, "NotFound")
    assert (await client.create(service("again", cluster_ip=ip)))["spec"]["clusterIP"] == ip


# -- persistence -----------------------------------------------------------------------------------
async def test_objects_and_versions_survive_a_restart(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, url), KubeClient(KubeConfig(url, token=TOKEN)) as client:
        await client.create(namespace("default"))
        kept = await client.create(configmap("kept"))
        svc = await client.create(service("web"))
        await client.create(virtual_service("reviews"))
        await client.create(configmap("gone"))
        await client.delete(CONFIGMAPS, "gone", "default")  # the last write is a delete
        before = int((await client.list(CONFIGMAPS))["metadata"]["resourceVersion"])

    async with running(tmp_path) as (_, url), KubeClient(KubeConfig(url, token=TOKEN)) as client:
        assert await client.get(CONFIGMAPS, "kept", "default") == kept
        await expect_error(client.get(CONFIGMAPS, "gone", "default"), 404, "NotFound")
        vs = await client.get(await client.resource("networking.istio.io/v1", "VirtualService"), "reviews", "default")
        assert vs["spec"]["hosts"] == ["reviews"]
        after = int((await client.list(CONFIGMAPS))["metadata"]["resourceVersion"])
        assert after >= before, "resourceVersion went backwards across a restart"
        new = await client.create(configmap("new"))
        assert int(new["metadata"]["resourceVersion"]) > before
        # The allocator remembers addresses in use; a watch from before the restart must relist.
        error = await expect_error(client.create(service("dup", cluster_ip=svc["spec"]["clusterIP"])), 422, "Invalid")
        assert "already allocated" in error.message
        with pytest.raises(ApiError) as info:
            async with watching(client, CONFIGMAPS, resource_version=kept["metadata"]["resourceVersion"]) as stream:
                await take(stream, 1)
        assert info.value.code == 410


# -- discovery and CRDs ----------------------------------------------------------------------------
async def test_discovery(cluster: Cluster) -> None:
    http = cluster.http
    status, body = await raw(http, "GET", "/api")
    assert (status, body["kind"], body["versions"]) == (200, "APIVersions", ["v1"])

    status, body = await raw(http, "GET", "/apis")
    groups = {g["name"]: [v["version"] for v in g["versions"]] for g in body["groups"]}
    assert groups["apps"] == ["v1"]
    assert groups["networking.istio.io"] == ["v1", "v1beta1", "v1alpha3"]
    assert "discovery.k8s.io" in groups
    assert "" not in groups

    status, body = await raw(http, "GET", "/apis/networking.istio.io/v1")
    assert (status, body["kind"], body["groupVersion"]) == (200, "APIResourceList", "networking.istio.io/v1")
    resources = {r["name"]: r for r in body["resources"]}
    assert resources["virtualservices"]["kind"] == "VirtualService"
    assert resources["virtualservices"]["namespaced"] is True
    assert "watch" in resources["virtualservices"]["verbs"]
    assert "virtualservices/status" in resources

    status, body = await raw(http, "GET", "/api/v1")
    resources = {r["name"]: r for r in body["resources"]}
    assert resources["namespaces"]["namespaced"] is False
    assert resources["pods"]["shortNames"] == ["po"]
    assert "pods/status" in resources
    assert "configmaps/status" not in resources

    status, body = await raw(http, "GET", "/apis/networking.istio.io/v9")
    assert_status(status, body, 404, "NotFound")


async def test_crd_registers_its_kind(cluster: Cluster) -> None:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "gizmoes.example.org"},
           "spec": {"group": "example.org", "scope": "Cluster",
                    "names": {"kind": "Gizmo", "plural": "gizmoes", "singular": "gizmo", "shortNames": ["gz"]},
                    "versions": [{"name": "v1", "served": True, "storage": True}]}}
    await cluster.client.create(crd)

    status, body = await raw(cluster.http, "GET", "/apis/example.org/v1")
    assert status == 200
    [resource] = [r for r in body["resources"] if r["name"] == "gizmoes"]
    assert (resource["kind"], resource["namespaced"], resource["shortNames"]) == ("Gizmo", False, ["gz"])

    # A fresh client knows nothing of Gizmo; discovery teaches it the irregular plural and the scope.
    async with KubeClient(KubeConfig(cluster.url, token=TOKEN)) as fresh:
        rt = await fresh.resource("example.org/v1", "Gizmo")
        assert (rt.plural, rt.namespaced) == ("gizmoes", False)
        gizmo = await fresh.create({"apiVersion": "example.org/v1", "kind": "Gizmo",
                                    "metadata": {"name": "g1"}, "spec": {"teeth": 12}})
        assert "namespace" not in gizmo["metadata"]
        assert (await fresh.get(rt, "g1"))["spec"] == {"teeth": 12}
        assert fresh.types.resolve("gz") == rt


# -- kubeconfig ------------------------------------------------------------------------------------
def write_kubeconfig(path: Path, server: str, *, token: str | None = TOKEN, ca_data: bytes | None = None,
                     namespace: str | None = None) -> Path:
    cluster: Obj = {"server": server}
    if ca_data is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_data).decode()
    context: Obj = {"cluster": "local", "user": "admin"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": cluster}],
        "contexts": [{"name": "local", "context": context}],
        "users": [{"name": "admin", "user": {"token": token} if token else {}}],
    }))
    return path


async def test_kubeconfig_with_token_reaches_the_server(cluster: Cluster, tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kubeconfig", cluster.url + "/", namespace="apps")
    config = KubeConfig.load(path)
    assert (config.server, config.token, config.namespace, config.ca_file) == (cluster.url, TOKEN, "apps", None)
    async with KubeClient(config) as client:
        assert [o["metadata"]["name"] for o in (await client.list(NAMESPACES))["items"]] == ["default"]


def test_kubeconfig_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_kubeconfig(tmp_path / "config", "http://127.0.0.1:1")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{path}")
    config = KubeConfig.load()
    assert (config.server, config.token, config.namespace) == ("http://127.0.0.1:1", TOKEN, "default")


def self_signed(host: str) -> tuple[bytes, bytes]:
    """A CA certificate valid for `host` (an IP) and its key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ambient-test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_kubeconfig_certificate_authority_data_verifies_a_tls_server(tmp_path: Path) -> None:
    cert_pem, key_pem = self_signed(HOST)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")

    async with running(tmp_path / "state", server_tls) as (_, url):
        config = KubeConfig.load(write_kubeconfig(tmp_path / "kubeconfig", url, ca_data=cert_pem))
        assert config.ca_file is not None
        try:
            assert Path(config.ca_file).read_bytes() == cert_pem
            async with KubeClient(config) as client:
                created = await client.create(namespace("secure"))
                assert created["metadata"]["name"] == "secure"
        finally:
            Path(config.ca_file).unlink()

        # Without the CA the same server is refused: verification is really on.
        async with KubeClient(KubeConfig(url, token=TOKEN)) as unverified:
            error = await expect_error(unverified.list(NAMESPACES), 503, "ServiceUnavailable")
            assert "certificate" in error.message.lower()


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "no kubeconfig at"),
    ("not-yaml", "cannot read kubeconfig"),
    ("no-context", "has no current-context"),
    ("unknown-context", "no context named 'elsewhere'"),
])
def test_unusable_kubeconfig_says_what_to_do(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "kubeconfig"
    context = None
    if setup == "not-yaml":
        path.write_text("clusters: [unclosed")
    elif setup == "no-context":
        path.write_text(yaml.safe_dump({"clusters": []}))
    elif setup == "unknown-context":
        write_kubeconfig(path, "http://127.0.0.1:1")
        context = "elsewhere"
    with pytest.raises(KubeConfigError, match=message) as info:
        KubeConfig.load(path, context)
    assert str(path) in str(info.value)
    if setup == "missing":
        assert "ambientctl up" in str(info.value)
        assert "--kubeconfig" in str(info.value)



def test_pod_annotations_can_change_through_the_status_subresource() -> None:
    """The CNI agent annotates pods through pods/status, as Istio's does; other metadata stays put."""
    from ambient.kube.resources import ResourceTable
    from ambient.local.apiserver import ApiServer

    server = ApiServer(None, None)
    pods = ResourceTable().require("pods")
    server.create(ResourceTable().require("namespaces"), "", {"metadata": {"name": "ns"}})
    server.create(pods, "ns", {"metadata": {"name": "p", "labels": {"app": "x"}},
                               "spec": {"containers": [{"name": "c"}]}})
    patched = server.patch(pods, "ns", "p", {
        "metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}, "ownerReferences": [{"x": 1}]},
        "status": {"phase": "Running"}}, status_only=True)
    assert patched["metadata"]["annotations"] == {"ambient.istio.io/redirection": "enabled"}
    assert patched["metadata"]["labels"] == {"app": "x"}
    assert "ownerReferences" not in patched["metadata"]
    assert patched["status"]["phase"] == "Running"
