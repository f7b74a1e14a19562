"""A thin asyncio Kubernetes client over aiohttp: kubeconfig / in-cluster config, CRUD, merge patch,
status subresource, watch streams, and port-forward (WebSocket, `ambient.kube.portforward`).

It speaks plain Kubernetes REST, so the same calls work against a real API server and against
`ambient.local`'s. Resource paths come from `ambient.kube.resources` (with API discovery as a fallback
for kinds it does not know). Errors are `ApiError`, carrying the server's `Status`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yaml

from ambient.kube import portforward
from ambient.kube.errors import ApiError
from ambient.kube.resources import ResourceTable, ResourceType

Obj = dict[str, Any]

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT = 30.0  # seconds for a non-watch request, as client-go's default for short calls
# A token read from a file (in-cluster, kubeconfig `tokenFile`) is read again at most this often: the kubelet
# rotates projected ServiceAccount tokens, and client-go re-reads its token file every minute too.
TOKEN_RELOAD = 60.0


class KubeConfigError(Exception):
    """A kubeconfig that is missing or unusable; the message says what to fix."""


@dataclass(frozen=True)
class KubeConfig:
    server: str
    token: str | None = None
    token_file: str | None = None  # where `token` came from; read again as it rotates
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    insecure: bool = False
    namespace: str = "default"

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, context: str | None = None) -> KubeConfig:
        """From a kubeconfig file (`path`, else $KUBECONFIG, else ~/.kube/config), or in-cluster."""
        candidates = [Path(path)] if path else [
            Path(p) for p in os.environ.get("KUBECONFIG", "").split(":") if p] or [Path.home() / ".kube/config"]
        for candidate in candidates:
            if candidate.is_file():
                return cls._from_file(candidate, context)
        if not path and (IN_CLUSTER_DIR / "token").is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster()
        raise KubeConfigError(f"no kubeconfig at {', '.join(map(str, candidates))}: run `ambientctl up` for a "
                              "local cluster, or pass --kubeconfig")

    @classmethod
    def in_cluster(cls) -> KubeConfig:
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        if not host or not (IN_CLUSTER_DIR / "token").is_file():
            raise KubeConfigError(f"not running in a Kubernetes pod ($KUBERNETES_SERVICE_HOST unset or no "
                                  f"{IN_CLUSTER_DIR / 'token'}): pass --kubeconfig")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        ns_file = IN_CLUSTER_DIR / "namespace"
        token_file = IN_CLUSTER_DIR / "token"
        return cls(f"https://{host}:{port}", token_file.read_text().strip(), str(token_file),
                   str(IN_CLUSTER_DIR / "ca.crt"),
                   namespace=ns_file.read_text().strip() if ns_file.exists() else "default")

    @classmethod
    def _from_file(cls, path: Path, context: str | None) -> KubeConfig:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from None

        def named(section: str, name: str) -> Obj:
            for entry in doc.get(section) or []:
                if entry.get("name") == name:
                    return entry.get(section[:-1]) or {}
            raise KubeConfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

        ctx_name = context or doc.get("current-context")
        if not ctx_name:
            raise KubeConfigError(f"kubeconfig {path} has no current-context; pass --context")
        ctx = named("contexts", ctx_name)
        cluster = named("clusters", ctx["cluster"])
        user = named("users", ctx["user"]) if ctx.get("user") else {}

        def file_or_data(file_key: str, data_key: str, source: Obj) -> str | None:
            if source.get(file_key):
                return str((path.parent / source[file_key]).resolve())
            if source.get(data_key):
                # ssl loads certificates and keys from files: a private temporary one (0600), removed at exit
                # so that a client key does not stay behind in /tmp after every command.
                fd, name = tempfile.mkstemp(prefix="kube-", suffix=".pem")
                os.write(fd, base64.b64decode(source[data_key]))
                os.close(fd)
                atexit.register(_remove_quietly, name)
                return name
            return None

        token, token_file = user.get("token"), None
        if not token and user.get("tokenFile"):
            token_file = user["tokenFile"]
            token = Path(token_file).read_text().strip()
        return cls(
            server=cluster["server"].rstrip("/"),
            token=token,
            token_file=token_file,
            ca_file=file_or_data("certificate-authority", "certificate-authority-data", cluster),
            client_cert=file_or_data("client-certificate", "client-certificate-data", user),
            client_key=file_or_data("client-key", "client-key-data", user),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            namespace=ctx.get("namespace") or "default",
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.server.startswith("https"):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class KubeClient:
    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self.types = ResourceTable()
        self._session: aiohttp.ClientSession | None = None
        self._discovered: set[str] = set()
        self._token = config.token
        self._token_read_at = time.monotonic()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Accept": "application/json", "User-Agent": "ambient-py"}
            ctx = self.config.ssl_context()
            connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else False, limit=64)
            # The hook only acts on refused WebSocket upgrades (port-forward), keeping the server's Status.
            self._session = aiohttp.ClientSession(self.config.server, headers=headers, connector=connector,
                                                  raise_for_status=portforward.refused_upgrade)
        return self._session

    def auth_headers(self) -> dict[str, str]:
        """The bearer token for one request; a token file is read again every TOKEN_RELOAD seconds (a failed
        read keeps the last token: the file is replaced atomically, so a miss is transient)."""
        path = self.config.token_file
        if path and time.monotonic() - self._token_read_at >= TOKEN_RELOAD:
            self._token_read_at = time.monotonic()
            with contextlib.suppress(OSError):
                self._token = Path(path).read_text().strip() or self._token
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    # -- resource types --------------------------------------------------------------------------
    async def resource(self, api_version: str, kind: str) -> ResourceType:
        """The resource type for a manifest's apiVersion/kind, asking discovery for unknown kinds."""
        rt = self.types.for_manifest(api_version, kind)
        if self.types.resolve(f"{rt.plural}.{rt.group}" if rt.group else rt.plural) is None \
                and api_version not in self._discovered:
            await self._discover(api_version)
            rt = self.types.for_manifest(api_version, kind)
        return rt

    async def _discover(self, api_version: str) -> None:
        self._discovered.add(api_version)
        group, _, version = api_version.rpartition("/")
        path = f"/apis/{api_version}" if group else f"/api/{version}"
        try:
            listing = await self.request("GET", path)
        except ApiError:
            return
        for r in listing.get("resources", []):
            if "/" not in r["name"]:
                self.types.add(ResourceType(group, version, r["kind"], r["name"], r["namespaced"],
                                            short_names=tuple(r.get("shortNames") or ())))

    # -- verbs -----------------------------------------------------------------------------------
    async def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        headers.update(self.auth_headers())
        async with self.reaching_server(), self.session.request(
                method, path, data=data, params=params, headers=headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as resp:
            payload = _payload(await resp.text())
            if resp.status >= 400:
                raise ApiError.from_status(resp.status, payload)
            return payload

    async def raw(self, method: str, path: str) -> bytes:
        """A request whose answer is not a Kubernetes object, such as a pod's `proxy` subresource
        (`/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>`): the body as sent. Errors are `ApiError`s,
        from the server's `Status` (or from the proxied answer itself) as for `request`."""
        async with self.reaching_server(), self.session.request(
                method, path, headers=self.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as resp:
            body = await resp.read()
            if resp.status >= 400:
                raise ApiError.from_status(resp.status, _payload(body.decode(errors="replace")))
            return body

    def port_forward(self, namespace: str, pod: str,
                     port: int) -> contextlib.AbstractAsyncContextManager[portforward.PortForwardStream]:
        """`async with client.port_forward(ns, pod, port) as stream:` a byte stream to `port` inside the pod
        (`stream.read()`, `stream.write()`, b"" at EOF), as `kubectl port-forward` gives; closed on exit. Errors:
        `ApiError` when the API server refuses (no such pod, RBAC), `portforward.ForwardingFailed` when the
        kubelet could not connect to the port."""
        return portforward.open_stream(self, namespace, pod, port)

    @contextlib.asynccontextmanager
    async def reaching_server(self) -> AsyncIterator[None]:
        """Transport failures as the `ApiError`s every caller already handles."""
        try:
            yield
        except aiohttp.ClientConnectionError as exc:
            raise ApiError(503, f"cannot reach the API server at {self.config.server}: {exc}",
                           "ServiceUnavailable") from None
        except TimeoutError:
            raise ApiError(503, f"the API server at {self.config.server} did not answer in {REQUEST_TIMEOUT:.0f}s",
                           "Timeout") from None

    async def get(self, rt: ResourceType, name: str, namespace: str | None = None) -> Obj:
        result: Obj = await self.request("GET", rt.path(namespace, name))
        return result

    async def list(self, rt: ResourceType, namespace: str | None = None, label_selector: str | None = None,
                   field_selector: str | None = None) -> Obj:
        params = {k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v}
        result: Obj = await self.request("GET", rt.path(namespace), params=params)
        return result

    async def create(self, obj: Obj, namespace: str | None = None, *, dry_run: bool = False) -> Obj:
        rt = await self.resource(obj["apiVersion"], obj["kind"])
        ns = namespace or obj.get("metadata", {}).get("namespace")
        result: Obj = await self.request("POST", rt.path(ns), obj, params=_dry(dry_run))
        return result

    async def replace(self, obj: Obj, *, status: bool = False) -> Obj:
        rt = await self.resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        result: Obj = await self.request(
            "PUT", rt.path(meta.get("namespace"), meta["name"], "status" if status else None), obj)
        return result

    async def patch(self, rt: ResourceType, name: str, patch: Obj, namespace: str | None = None, *,
                    status: bool = False, dry_run: bool = False) -> Obj:
        result: Obj = await self.request("PATCH", rt.path(namespace, name, "status" if status else None), patch,
                                         params=_dry(dry_run), content_type="application/merge-patch+json")
        return result

    async def delete(self, rt: ResourceType, name: str, namespace: str | None = None,
                     grace_period: int | None = None) -> Obj:
        params = {"gracePeriodSeconds": str(grace_period)} if grace_period is not None else None
        result: Obj = await self.request("DELETE", rt.path(namespace, name), params=params)
        return result

    async def watch(self, rt: ResourceType, namespace: str | None = None, resource_version: str | None = None,
                    label_selector: str | None = None, field_selector: str | None = None,
                    timeout_seconds: int = 300) -> AsyncIterator[tuple[str, Obj]]:
        """Yields (type, object) until the server ends the stream; ERROR events raise `ApiError`."""
        params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        for key, value in (("resourceVersion", resource_version), ("labelSelector", label_selector),
                           ("fieldSelector", field_selector)):
            if value:
                params[key] = value
        query = urlencode(params)
        try:
            async with self.session.get(f"{rt.path(namespace)}?{query}", headers=self.auth_headers(),
                                        timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=REQUEST_TIMEOUT, sock_read=timeout_seconds + 30)) as resp:
                if resp.status >= 400:
                    raise ApiError.from_status(resp.status, await resp.json(content_type=None))
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            raise ApiError.from_status(int(event["object"].get("code", 500)), event["object"])
                        yield event["type"], event["object"]
        except aiohttp.ClientConnectionError as exc:
            raise ApiError(503, f"watch of {rt.plural} interrupted: {exc}", "ServiceUnavailable") from None
        except TimeoutError:
            return


def _payload(text: str) -> Any:
    """A response body: JSON if it is JSON, else the text (a proxied answer, a non-Kubernetes error page)."""
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text


def _dry(dry_run: bool) -> dict[str, str] | None:
    return {"dryRun": "All"} if dry_run else None
