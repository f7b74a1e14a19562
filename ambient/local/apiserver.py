"""The local cluster's API server: Kubernetes REST semantics over `Store`, served with aiohttp.

Paths, verbs, query parameters, watch framing and `Status` errors follow the Kubernetes API so that
`ambient.kube.client` (and kubectl) talk to it as to a real cluster. Objects of kinds it does not know
(Istio and Gateway API custom resources) are stored as given. It does not run controllers: those are
clients of this server (`ambient.local.controllers`).

`pods/{name}[:port]/proxy/{path}` forwards a request to the pod's IP as kube-apiserver's pod proxy does.
`pods/{name}/portforward?ports=P` is port-forward over WebSocket (`v4.channel.k8s.io`, the framing in
ambient/kube/portforward.py), served here as the kubelet serves it, with one difference: the kubelet (its
container runtime) dials `localhost:P` inside the pod's network namespace, so ports bound to 127.0.0.1 in the
pod are reachable; here the API server dials `status.podIP:P` from the host, so the pod's port must listen on
its IP. That is how `ambientctl ztunnel-config` reaches a ztunnel's admin port, here and on a real cluster
(where it listens on localhost only).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from ambient.kube import portforward
from ambient.kube.errors import ApiError, not_found
from ambient.kube.events import now_rfc3339
from ambient.kube.merge import merge_patch
from ambient.kube.resources import EXTRA_VERSIONS, ResourceTable, ResourceType
from ambient.kube.selectors import (
    SelectorError,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from ambient.local import admission
from ambient.local.store import Event, Key, Obj, Store, Watcher

log = logging.getLogger("ambient.apiserver")

BOOKMARK_INTERVAL = 10.0  # seconds between BOOKMARK events on idle watches that asked for them
DEFAULT_WATCH_TIMEOUT = 1800  # Kubernetes picks 30-60 min when the client does not say
JSON = "application/json"
MERGE_PATCH_TYPES = {"application/merge-patch+json", "application/strategic-merge-patch+json"}
PROXY_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})  # pods/proxy's, as Kubernetes
PROXY_DIAL_TIMEOUT = 30.0  # seconds to connect to a pod: Go's default dialer timeout, which the API server's proxy uses
PROXY_DEFAULT_PORTS = {"http": 80, "https": 443}  # when neither the path nor the pod's containers name a port
FORWARD_READ = 32 * 1024  # bytes per read from a pod, one frame each: Go's io.Copy buffer, as the kubelet's
FORWARD_QUEUE = 64  # frames from the client buffered per port while the pod is slow (the kubelet: an io.Pipe)
# Never forwarded: hop-by-hop headers (RFC 9110 §7.6.1), and the caller's credentials, which are for this
# server only (kube-apiserver drops Authorization once it has authenticated the request).
PROXY_DROPPED_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                                   "trailer", "transfer-encoding", "upgrade", "host", "authorization",
                                   "content-length"})


class ApiServer:
    def __init__(self, state_dir: Path | None, token: str | None = None) -> None:
        self.store = Store(state_dir / "apiserver" if state_dir else None)
        self.types = ResourceTable()
        self.token = token
        self.ips = admission.ServiceIPs(
            obj.get("spec", {}).get("clusterIP", "") for obj in self.store.items("", "services"))
        self._runner: web.AppRunner | None = None
        self._proxy_session: aiohttp.ClientSession | None = None
        self._forwards: set[web.WebSocketResponse] = set()
        for crd in self.store.items("apiextensions.k8s.io", "customresourcedefinitions"):
            self._register_crd(crd)

    # -- lifecycle -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def start(self, hosts: list[str], port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        for host in hosts:
            await web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_address=True).start()

    async def close(self) -> None:
        self.store.close_watchers()
        for ws in list(self._forwards):  # "going away", so the runner need not wait for the handlers
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        if self._runner:
            await self._runner.cleanup()
        if self._proxy_session:
            await self._proxy_session.close()

    # -- HTTP plumbing ---------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self.token and request.path not in ("/healthz", "/readyz", "/livez") and \
                request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status_response(ApiError(401, "Unauthorized"))
        try:
            return await handler(request)
        except ApiError as exc:
            return _status_response(exc)
        except SelectorError as exc:
            return _status_response(ApiError(400, str(exc)))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if parts == ["version"]:
            return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-ambient-local",
                                      "platform": "linux/amd64"})
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if parts == ["apis"]:
            return web.json_response(self._group_list())
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, f"the server could not find the requested resource ({request.path})")
        if not rest:
            return web.json_response(self._resource_list(group, version))
        pod_subresource = group == "" and len(rest) >= 5 and rest[0] == "namespaces" and rest[2] == "pods"
        if pod_subresource and rest[4] == "proxy":
            return await self._pod_proxy(request, rest[1], rest[3])
        if pod_subresource and rest[4] == "portforward" and len(rest) == 5:
            return await self._pod_port_forward(request, rest[1], rest[3])
        return await self._resource_request(request, group, version, rest)

    def _parse_target(self, group: str, version: str, rest: list[str]) -> tuple[ResourceType, str, str, str]:
        """→ (type, namespace, name, subresource) from the path after /api/v1 or /apis/g/v."""
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3 and not (group == "" and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else ""), (rest[2] if len(rest) > 2 else "")
        if len(rest) > 3:
            raise ApiError(404, "the server could not find the requested resource")
        rt = self.types.by_plural(group, version, plural)
        if rt is None:
            # An unknown kind: accept it as a namespaced custom resource; its kind comes from the body.
            rt = ResourceType(group, version, "", plural)
        if rt.namespaced is False and namespace:
            raise ApiError(404, f"the server could not find the requested resource ({plural} is cluster-scoped)")
        return rt, namespace, name, sub

    async def _resource_request(self, request: web.Request, group: str, version: str,
                                rest: list[str]) -> web.StreamResponse:
        rt, namespace, name, sub = self._parse_target(group, version, rest)
        q = request.query
        method = request.method
        if sub and sub != "status":
            raise ApiError(404, f"the server could not find the requested resource ({sub})")
        if not name:
            if method == "GET":
                if q.get("watch") in ("true", "1"):
                    return await self._watch(request, rt, namespace)
                return web.json_response(self._list(rt, namespace, q.get("labelSelector"), q.get("fieldSelector")))
            if method == "POST":
                body = await _read_body(request)
                dry_run = q.get("dryRun") == "All"
                return web.json_response(self.create(rt, namespace, body, dry_run=dry_run), status=201)
            if method == "DELETE":
                items = self._list(rt, namespace, q.get("labelSelector"), q.get("fieldSelector"))["items"]
                for item in items:
                    self.delete(rt, item["metadata"].get("namespace", ""), item["metadata"]["name"])
                return web.json_response(self._list(rt, namespace, q.get("labelSelector"), None))
            raise ApiError(405, f"method {method} not allowed on a collection")
        if method == "GET":
            return web.json_response(self._present(rt, self._require(rt, namespace, name)))
        dry_run = q.get("dryRun") == "All"
        if method == "PUT":
            body = await _read_body(request)
            # Responses, like reads, are in the requested version (the stored one may differ).
            updated = self.update(rt, namespace, name, body, status_only=sub == "status", dry_run=dry_run)
            return web.json_response(self._present(rt, updated))
        if method == "PATCH":
            ctype = request.content_type
            if ctype not in MERGE_PATCH_TYPES:
                raise ApiError(415, f"the body of the request was in an unsupported patch type {ctype!r}; "
                                    "use application/merge-patch+json")
            patch = await _read_body(request)
            patched = self.patch(rt, namespace, name, patch, status_only=sub == "status", dry_run=dry_run)
            return web.json_response(self._present(rt, patched))
        if method == "DELETE":
            grace = q.get("gracePeriodSeconds")
            if request.can_read_body:
                with contextlib.suppress(ApiError):
                    options = await _read_body(request)
                    if options.get("gracePeriodSeconds") is not None:
                        grace = str(options["gracePeriodSeconds"])
            deleted = self.delete(rt, namespace, name, None if grace is None else int(grace))
            return web.json_response(self._present(rt, deleted))
        raise ApiError(405, f"method {method} not allowed")

    # -- verbs -----------------------------------------------------------------------------------
    def _key(self, rt: ResourceType, namespace: str, name: str) -> Key:
        return (rt.group, rt.plural, namespace if rt.namespaced else "", name)

    def _require(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        obj = self.store.get(self._key(rt, namespace, name))
        if obj is None:
            raise not_found(rt.plural, name, rt.group)
        return obj

    def _present(self, rt: ResourceType, obj: Obj) -> Obj:
        """The stored object as seen through the requested version."""
        if obj.get("apiVersion") == rt.api_version:
            return obj
        return {**obj, "apiVersion": rt.api_version}

    def _list(self, rt: ResourceType, namespace: str, label_selector: str | None,
              field_selector: str | None) -> Obj:
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector)
        items = [self._present(rt, o) for o in self.store.items(rt.group, rt.plural, namespace)
                 if labels_match(labels, o["metadata"].get("labels")) and fields_match(fields, o)]
        kind = rt.kind or (items[0]["kind"] if items else "")
        return {"kind": f"{kind}List", "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)}, "items": items}

    def create(self, rt: ResourceType, namespace: str, body: Obj, *, dry_run: bool = False) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object")
        kind = rt.kind or str(obj.get("kind") or "")
        if not kind:
            raise ApiError(400, "Object 'Kind' is missing in the request body")
        if rt.kind and obj.get("kind") not in (None, rt.kind):
            raise ApiError(400, f"the kind {obj.get('kind')!r} does not match the resource {rt.plural!r}")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + admission.random_suffix()
            else:
                raise ApiError(422, f"{kind} is invalid: metadata.name: Required value: name or generateName "
                                    "is required", details={"kind": kind, "causes": [
                                        {"reason": "FieldValueRequired", "field": "metadata.name"}]})
        name = meta["name"]
        admission.check_name(kind, name)
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and namespace and body_ns != namespace:
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent on "
                                    "the request")
            namespace = namespace or body_ns or ""
            if not namespace:
                raise ApiError(400, "a namespace is required for namespaced resources")
            ns_obj = self.store.get(("", "namespaces", "", namespace))
            if ns_obj is None:
                raise not_found("namespaces", namespace)
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise ApiError(403, f'{kind.lower()}s "{name}" is forbidden: unable to create new content in '
                                    f"namespace {namespace} because it is being terminated", "Forbidden")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        key = self._key(rt, namespace, name)
        if self.store.get(key) is not None:
            raise ApiError(409, f'{rt.plural}{"." + rt.group if rt.group else ""} "{name}" already exists',
                           "AlreadyExists", {"name": name, "kind": rt.plural})
        obj["apiVersion"], obj["kind"] = rt.api_version, kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        for transient in ("resourceVersion", "deletionTimestamp", "selfLink"):
            meta.pop(transient, None)
        admission.default_and_validate(kind, obj, None, self.ips.dry() if dry_run else self.ips)
        if dry_run:
            return obj
        if not rt.kind:
            self._learn(rt, kind, bool(namespace))
        if kind == "CustomResourceDefinition":
            self._register_crd(obj)
        return self.store.put(key, obj)

    def update(self, rt: ResourceType, namespace: str, name: str, body: Obj, *, status_only: bool = False,
               dry_run: bool = False) -> Obj:
        old = self._require(rt, namespace, name)
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise ApiError(400, f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                                f"({name})")
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, f'Operation cannot be fulfilled on {rt.plural} "{name}": the object has been '
                                "modified; please apply your changes to the latest version and try again",
                           "Conflict", {"name": name, "kind": rt.plural})
        return self._replace(rt, old, copy.deepcopy(body), status_only=status_only, dry_run=dry_run)

    def patch(self, rt: ResourceType, namespace: str, name: str, patch: Obj, *, status_only: bool = False,
              dry_run: bool = False) -> Obj:
        old = self._require(rt, namespace, name)
        if not isinstance(patch, dict):
            raise ApiError(400, "a merge patch must be a JSON object")
        rv = (patch.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, f'Operation cannot be fulfilled on {rt.plural} "{name}": the object has been '
                                "modified; please apply your changes to the latest version and try again",
                           "Conflict", {"name": name, "kind": rt.plural})
        return self._replace(rt, old, merge_patch(old, patch), status_only=status_only, dry_run=dry_run)

    def _replace(self, rt: ResourceType, old: Obj, new: Obj, *, status_only: bool, dry_run: bool = False) -> Obj:
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        has_status = rt.has_status or not rt.kind
        if status_only:
            status_meta = new.get("metadata") or {}
            new = {**copy.deepcopy(old), "status": new.get("status")}
            meta = new["metadata"]
            if old["kind"] == "Pod":
                # As Kubernetes' pod status strategy allows: labels and annotations may change through
                # pods/status (the CNI agent sets ambient.istio.io/redirection this way).
                for field in ("labels", "annotations"):
                    if field in status_meta:
                        meta[field] = status_meta[field]
        elif has_status and rt.kind:
            # With a status subresource, writes to the main resource leave status alone.
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        for immutable in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                          "deletionGracePeriodSeconds"):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
            else:
                meta.pop(immutable, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        admission.default_and_validate(old["kind"], new, old, self.ips)
        # Compared after defaulting: re-sending a manifest without the server's defaults is no spec change.
        meta["generation"] = old_meta.get("generation", 1) + (
            0 if status_only or new.get("spec") == old.get("spec") else 1)
        if dry_run:
            return new
        key = self._key(rt, old_meta.get("namespace", ""), old_meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not self._held(new):
            return self._remove(key, new)
        return self.store.put(key, new)

    def delete(self, rt: ResourceType, namespace: str, name: str, grace: int | None = None) -> Obj:
        obj = self._require(rt, namespace, name)
        key = self._key(rt, namespace, name)
        meta = obj["metadata"]
        if meta.get("finalizers") or (self._held(obj) and grace != 0):
            if meta.get("deletionTimestamp"):
                return obj
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            if obj["kind"] == "Pod":
                new["metadata"]["deletionGracePeriodSeconds"] = (
                    grace if grace is not None else obj["spec"].get("terminationGracePeriodSeconds", 30))
            if obj["kind"] == "Namespace":
                new["status"] = {**new.get("status", {}), "phase": "Terminating"}
            return self.store.put(key, new)
        return self._remove(key, obj)

    def _remove(self, key: Key, obj: Obj) -> Obj:
        """The one way objects leave the store, so a Service's ClusterIP is always released."""
        if obj["kind"] == "Service":
            self.ips.release(obj.get("spec", {}).get("clusterIP"))
        return self.store.remove(key)

    @staticmethod
    def _held(obj: Obj) -> bool:
        """Deleted objects that stay until someone finishes: a bound pod until its kubelet has stopped it
        (and deletes it with grace 0); a namespace until the namespace controller empties it and clears
        `spec.finalizers`."""
        if obj["kind"] == "Pod":
            return bool(obj.get("spec", {}).get("nodeName"))
        if obj["kind"] == "Namespace":
            return bool(obj.get("spec", {}).get("finalizers"))
        return False

    # -- watch -----------------------------------------------------------------------------------
    async def _watch(self, request: web.Request, rt: ResourceType, namespace: str) -> web.StreamResponse:
        q = request.query
        labels = parse_label_selector(q.get("labelSelector"))
        fields = parse_field_selector(q.get("fieldSelector"))
        rv_param = q.get("resourceVersion", "")
        since = int(rv_param) if rv_param.isdigit() and rv_param != "0" else None
        if rv_param and not rv_param.isdigit():
            raise ApiError(400, f"invalid resourceVersion {rv_param!r}")
        watcher = Watcher(rt.group, rt.plural, namespace,
                          lambda o: labels_match(labels, o["metadata"].get("labels")) and fields_match(fields, o))
        self.store.watch(watcher, since)
        response = web.StreamResponse(headers={"Content-Type": JSON, "Transfer-Encoding": "chunked"})
        await response.prepare(request)
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                wait = min(remaining, BOOKMARK_INTERVAL) if bookmarks else remaining
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and time.monotonic() < deadline:
                        await response.write(_frame("BOOKMARK", {
                            "kind": rt.kind, "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(self.store.rv)}}))
                    continue
                if event is None:
                    break
                await response.write(_frame(event.type, self._present(rt, event.obj)))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unwatch(watcher)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    # -- pods/proxy ------------------------------------------------------------------------------
    async def _pod_proxy(self, request: web.Request, namespace: str, target: str) -> web.StreamResponse:
        """The request, without the caller's credentials, sent on to `http(s)://<pod IP>:<port>/<path>?<query>`
        and the pod's answer streamed back as it is. Errors are Kubernetes' own: 404 for no such pod, 400
        `address not allowed` for a pod without an IP, 503 `error trying to reach service: ...` when the pod
        does not answer."""
        if request.method not in PROXY_METHODS:
            raise ApiError(405, f"the server does not allow the method {request.method} on pods/proxy")
        scheme, name, port = split_scheme_name_port(target)
        pod = self._require(self.types.require("pods"), namespace, name)
        # The path after `/proxy`, still percent-encoded, trailing slash kept: as the caller wrote it.
        raw_parts = request.rel_url.raw_path.split("/")
        tail = "/" + "/".join(raw_parts[8:]) if raw_parts[7:8] == ["proxy"] else "/"
        host, port_number = pod_location(pod, scheme, port)
        url = f"{scheme}://{host}:{port_number}{tail}"
        if request.rel_url.raw_query_string:
            url += f"?{request.rel_url.raw_query_string}"
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in PROXY_DROPPED_HEADERS]
        headers += [("X-Forwarded-For", request.remote or ""), ("X-Forwarded-Host", request.host),
                    ("X-Forwarded-Proto", request.scheme), ("X-Forwarded-Uri", request.rel_url.raw_path)]
        body = await request.read() if request.can_read_body else None
        response: web.StreamResponse | None = None
        try:
            async with self._proxy().request(request.method, URL(url, encoded=True),
                                             headers=headers, data=body, allow_redirects=False) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in PROXY_DROPPED_HEADERS:
                        response.headers.add(key, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            if response is not None and response.prepared:
                # The status line is out: all that is left is to cut the connection, so the caller sees a
                # truncated answer rather than a short one that looks whole.
                log.warning("pods/proxy %s/%s: the pod's answer broke off: %s", namespace, name, exc)
                if request.transport is not None:
                    request.transport.close()
                return response
            raise ApiError(503, f"error trying to reach service: {_dial_error(host, port_number, exc)}") from None

    def _proxy(self) -> aiohttp.ClientSession:
        if self._proxy_session is None:
            # Pods' certificates are not checked (kube-apiserver's proxy transport does not either), and bodies
            # pass through still encoded.
            self._proxy_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=False), auto_decompress=False, skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=PROXY_DIAL_TIMEOUT))
        return self._proxy_session

    # -- pods/portforward ------------------------------------------------------------------------------
    async def _pod_port_forward(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        """Port-forward over WebSocket as kube-apiserver + kubelet serve it: the checks the API server makes
        (404 no such pod, 400 `pod X does not have a host assigned`, 400 `Upgrade request required`), the
        kubelet's (its words for bad `ports`; 403 for no supported subprotocol), then both channels' port
        preamble, a dial to the pod, bytes relayed both ways, a failed dial reported on the error channel, and
        the WebSocket closed once every port's forward has ended. The error text is the kubelet's sentence
        naming the pod as the kubelet does (`<name>_<namespace>`, its uid), with this server's dial error
        (`dial tcp <pod IP>:<port>: connect: connection refused`) where a runtime reports its own."""
        pod = self._require(self.types.require("pods"), namespace, name)
        if not (pod.get("spec") or {}).get("nodeName"):
            raise ApiError(400, f"pod {name} does not have a host assigned")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            # SPDY (older `kubectl port-forward`) lands here too: the local server speaks WebSocket only.
            raise ApiError(400, "Upgrade request required")
        try:
            ports = portforward.parse_ports(request.query.getall("ports", []))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        ip = pod_ip(pod)
        if ip is None:
            raise ApiError(400, f"pod {name} has no IP address to forward to (the local API server dials the "
                                "pod IP)")
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            protocol = portforward.negotiate(offered)
        except ValueError as exc:
            raise ApiError(403, str(exc)) from None
        ws = web.WebSocketResponse(protocols=(protocol,) if protocol else (), autoping=True)
        await ws.prepare(request)
        self._forwards.add(ws)
        try:
            relay = _PortForwardRelay(ws, protocol == portforward.BASE64_PROTOCOL, ip, ports,
                                      f"{name}_{namespace}", str(pod["metadata"].get("uid", "")))
            await relay.run()
        finally:
            self._forwards.discard(ws)
        return ws

    # -- discovery and custom resources ----------------------------------------------------------
    def _learn(self, rt: ResourceType, kind: str, namespaced: bool) -> None:
        self.types.add(ResourceType(rt.group, rt.version, kind, rt.plural, namespaced))

    def _register_crd(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        if not (spec.get("group") and names.get("plural") and names.get("kind")):
            return
        for v in spec.get("versions") or [{"name": spec.get("version", "v1")}]:
            self.types.add(ResourceType(spec["group"], v["name"], names["kind"], names["plural"],
                                        spec.get("scope", "Namespaced") == "Namespaced", True,
                                        tuple(names.get("shortNames") or ())))

    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rt in self.types.types():
            if rt.group:
                versions = groups.setdefault(rt.group, [])
                for v in (rt.version, *EXTRA_VERSIONS.get(rt.group, ())):
                    if v not in versions:
                        versions.append(v)
        return groups

    def _group_list(self) -> Obj:
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
            for g, vs in sorted(self._group_versions().items())]}

    def _resource_list(self, group: str, version: str) -> Obj:
        if group and version not in self._group_versions().get(group, []):
            raise ApiError(404, f"the server could not find the requested resource ({group}/{version})")
        resources = []
        for rt in self.types.types():
            if rt.group != group:
                continue
            verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
            resources.append({"name": rt.plural, "singularName": rt.kind.lower(), "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": verbs, "shortNames": list(rt.short_names)})
            if rt.has_status:
                resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                                  "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}


def split_scheme_name_port(target: str) -> tuple[str, str, str]:
    """`name`, `name:port` or `scheme:name:port` (scheme http or https) → (scheme, name, port), as
    Kubernetes' `SplitSchemeNamePort`; anything else is a 400."""
    match target.split(":"):
        case [name]:
            scheme, port = "", ""
        case [name, port]:
            scheme = ""
        case [scheme, name, port]:
            pass
        case _:
            name = scheme = ""
    if not name or scheme not in ("", *PROXY_DEFAULT_PORTS):
        raise ApiError(400, f"invalid pod request {target!r}")
    return scheme or "http", name, port


def pod_location(pod: Obj, scheme: str, port: str) -> tuple[str, int]:
    """Where pods/proxy sends a request: the pod's (first) IP, and the port asked for, else the first port
    any of its containers declares, else the scheme's. Kubernetes refuses addresses that are not global
    unicast with 400 `address not allowed`; loopback is allowed here, where tests stand a pod in on 127.0.0.1."""
    status = pod.get("status") or {}
    ip = next((entry.get("ip") for entry in status.get("podIPs") or []), None) or status.get("podIP") or ""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ApiError(400, "address not allowed") from None
    if address.is_unspecified or address.is_multicast or address.is_link_local or \
            address == ipaddress.IPv4Address("255.255.255.255"):
        raise ApiError(400, "address not allowed")
    if not port:
        declared = (c["ports"][0].get("containerPort") for c in pod["spec"].get("containers") or [] if c.get("ports"))
        port = str(next(declared, PROXY_DEFAULT_PORTS[scheme]))
    if not port.isdigit():
        try:  # a service name, looked up as Go's dialer does (/etc/services)
            port = str(socket.getservbyname(port, "tcp"))
        except OSError:
            raise ApiError(503, f"error trying to reach service: dial tcp: lookup tcp/{port}: unknown port") from None
    host = f"[{address}]" if address.version == 6 else str(address)
    return host, int(port)


def pod_ip(pod: Obj) -> str | None:
    """The pod's (first) IP, if it has a usable one."""
    status = pod.get("status") or {}
    ip = next((entry.get("ip") for entry in status.get("podIPs") or []), None) or status.get("podIP") or ""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return None if address.is_unspecified or address.is_multicast else str(address)


class _PortForwardRelay:
    """One port-forward WebSocket: for each requested port a connection to `ip:port`, bytes relayed both ways.
    A port's forward ends when either side does (the pod closed, the client closed the WebSocket) or the dial
    fails (its error channel says so, in the kubelet's words); the WebSocket closes when all have ended."""

    def __init__(self, ws: web.WebSocketResponse, base64: bool, ip: str, ports: list[int], pod: str,
                 uid: str) -> None:
        self.ws, self.base64, self.ip, self.ports, self.pod, self.uid = ws, base64, ip, ports, pod, uid
        # Client → pod bytes per port; None: the client has gone. Bounded, so a slow pod slows the client down.
        self.inbound: list[asyncio.Queue[bytes | None]] = [asyncio.Queue(FORWARD_QUEUE) for _ in ports]
        self.ended = [False for _ in ports]
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        for i, port in enumerate(self.ports):
            await self._send(portforward.data_channel(i), portforward.port_preamble(port))
            await self._send(portforward.error_channel(i), portforward.port_preamble(port))
        async with asyncio.TaskGroup() as tasks:
            receiving = tasks.create_task(self._receive(), name="portforward-receive")
            forwards = [tasks.create_task(self._forward(i, port), name=f"portforward-{self.ip}:{port}")
                        for i, port in enumerate(self.ports)]
            await asyncio.gather(*forwards)
            await self.ws.close()
            receiving.cancel()

    async def _send(self, channel: int, payload: bytes) -> None:
        async with self._send_lock:
            if self.base64:
                await self.ws.send_str(portforward.encode_base64_frame(channel, payload))
            else:
                await self.ws.send_bytes(portforward.encode_frame(channel, payload))

    async def _receive(self) -> None:
        """Client → pods: data-channel frames to their port's queue; the rest (other channels, undecodable
        frames) ignored, as wsstream does. When the client closes, every port's forward is told to end."""
        try:
            async for msg in self.ws:
                try:
                    if msg.type == aiohttp.WSMsgType.BINARY and not self.base64 and msg.data:
                        channel, payload = portforward.decode_frame(msg.data)
                    elif msg.type == aiohttp.WSMsgType.TEXT and self.base64 and msg.data:
                        channel, payload = portforward.decode_base64_frame(msg.data)
                    else:
                        continue
                except portforward.ProtocolViolation as exc:
                    log.info("portforward to %s: frame ignored: %s", self.pod, exc)
                    continue
                index, kind = divmod(channel, 2)
                if kind == portforward.DATA and index < len(self.inbound) and payload and not self.ended[index]:
                    await self.inbound[index].put(payload)
        finally:
            for index, queue in enumerate(self.inbound):
                if not self.ended[index]:
                    await queue.put(None)

    async def _forward(self, index: int, port: int) -> None:
        try:
            await self._connect_and_relay(index, port)
        finally:
            self.ended[index] = True
            while not self.inbound[index].empty():  # unblocks a receiver waiting to queue more for this port
                self.inbound[index].get_nowait()

    async def _connect_and_relay(self, index: int, port: int) -> None:
        def fail(cause: str) -> Awaitable[None]:
            return self._send(portforward.error_channel(index), portforward.forwarding_error(port, self.pod, self.uid,
                                                                                             cause).encode())
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.ip, port), PROXY_DIAL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            with contextlib.suppress(ConnectionError):
                await fail(_dial_error(f"[{self.ip}]" if ":" in self.ip else self.ip, port, exc))
            return

        async def to_pod() -> None:
            while (chunk := await self.inbound[index].get()) is not None:
                writer.write(chunk)
                await writer.drain()

        async def from_pod() -> None:
            while chunk := await reader.read(FORWARD_READ):
                await self._send(portforward.data_channel(index), chunk)

        try:
            async with asyncio.TaskGroup() as both:
                directions = [both.create_task(to_pod()), both.create_task(from_pod())]
                await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
                for direction in directions:
                    direction.cancel()
        except* OSError as group:
            with contextlib.suppress(ConnectionError):
                await fail(str(group.exceptions[0]))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _dial_error(host: str, port: int, exc: BaseException) -> str:
    """Go's words for a failed dial (`dial tcp 10.244.1.5:15000: connect: connection refused`): users and
    tools match on them. `host` as in a URL (IPv6 in brackets)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "EOF"
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, TimeoutError):
        return f"dial tcp {host}:{port}: i/o timeout"
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return f"dial tcp {host}:{port}: connect: {reason}"
    return str(exc) or type(exc).__name__


def _frame(event_type: str, obj: Obj) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _status_response(exc: ApiError) -> web.Response:
    return web.json_response(exc.status(), status=exc.code)


async def _read_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


__all__ = ["ApiServer", "Event"]
