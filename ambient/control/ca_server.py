"""The control plane's CA: `istio.v1.auth.IstioCertificateService/CreateCertificate` (PROTOCOLS.md §5).

A request is decided in this order, each refusal with its own gRPC status and a message saying what to fix:

1. authenticate the bearer token (`Authenticator`: Kubernetes TokenReview on a cluster, a bootstrap token
   file locally) and the `clusterid` header → UNAUTHENTICATED;
2. parse the CSR: PEM, valid signature, a P-256/P-384 or ≥2048-bit RSA key, exactly one URI SAN that is a
   SPIFFE id → INVALID_ARGUMENT;
3. grant an identity: the caller's own, or `metadata.ImpersonatedIdentity` when the caller is a node proxy
   and a pod with that namespace and service account is scheduled on the caller's node → PERMISSION_DENIED;
4. the CSR's SAN must equal the granted identity (istiod silently ignores the CSR's SAN; refusing it makes
   a client bug visible) → PERMISSION_DENIED;
5. sign: `validity_duration` 0 means 24 h, above the maximum is refused (as istiod) → INVALID_ARGUMENT.

The response is `cert_chain` = [leaf, signing CA, ..., root], one PEM per entry.

Bootstrap token file (JSON or YAML), re-read when it changes; each token maps to who presents it:

    <token>: {namespace: istio-system, serviceAccount: ztunnel, node: node-1, nodeProxy: true}
    <token>: {namespace: istio-system, serviceAccount: waypoint}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import yaml

from ambient.identity.ca_client import DEFAULT_CLUSTER_ID, IMPERSONATED_IDENTITY
from ambient.identity.errors import InvalidCsr, InvalidSpiffeId, SigningError
from ambient.identity.keys import csr_identity, load_csr
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId
from ambient.kube.errors import ApiError
from ambient.proto import ca_pb2, ca_pb2_grpc

log = logging.getLogger("ambient.control.ca")

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"  # set by the API server on node-bound tokens
SERVICE_ACCOUNT_USER_PREFIX = "system:serviceaccount:"
DEFAULT_NODE_PROXIES = frozenset({("istio-system", "ztunnel")})  # Istio's CA_TRUSTED_NODE_ACCOUNTS for ambient
TOKEN_AUDIENCES = ("istio-ca",)  # the audience ztunnel's projected token is minted for
STOP_GRACE = 1.0  # seconds in-flight requests get when the server stops
_generated: Any = ca_pb2_grpc  # the generated module is untyped


# -- errors ----------------------------------------------------------------------------------------
class CaRequestError(Exception):
    """A refused certificate request; `code` is the gRPC status returned, `reason` a stable label."""

    code = grpc.StatusCode.INTERNAL
    reason = "ca_internal"


class Unauthenticated(CaRequestError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class PermissionDenied(CaRequestError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class InvalidRequest(CaRequestError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_request"


class AuthBackendUnavailable(CaRequestError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "auth_backend_unavailable"


class TokenFileError(Exception):
    """The bootstrap token file is missing or malformed; the message names the file and the entry."""


class CaServerError(Exception):
    """The CA server cannot start (for example its address is taken)."""


# -- who is calling --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    identity: SpiffeId
    node: str | None = None  # the node the caller runs on, when its credential says so
    is_node_proxy: bool = False  # may ask for the identities of pods on `node`


class Authenticator(Protocol):
    async def authenticate(self, token: str, cluster: str) -> Caller:
        """The caller behind `token`, or raise `Unauthenticated` (or `AuthBackendUnavailable`)."""
        ...


class PodsOnNode(Protocol):
    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        """(namespace, service account) of every pod scheduled on `node`."""
        ...


class KubeRequester(Protocol):
    async def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> Any: ...


class TokenReviewAuthenticator:
    """Asks the Kubernetes API who a service-account token belongs to (`authentication.k8s.io/v1`
    TokenReview), the way istiod authenticates ztunnel and workloads on a cluster."""

    def __init__(self, kube: KubeRequester, trust_domain: str, *,
                 node_proxies: frozenset[tuple[str, str]] = DEFAULT_NODE_PROXIES,
                 audiences: tuple[str, ...] = TOKEN_AUDIENCES) -> None:
        self.kube, self.trust_domain = kube, trust_domain
        self.node_proxies, self.audiences = node_proxies, audiences

    async def authenticate(self, token: str, cluster: str) -> Caller:
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, **({"audiences": list(self.audiences)} if self.audiences else {})}}
        try:
            result = await self.kube.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
        except ApiError as exc:
            raise AuthBackendUnavailable(f"cannot review the token with the Kubernetes API: {exc}; the control "
                                         "plane needs RBAC to create tokenreviews") from None
        status = (result or {}).get("status") or {}
        if not status.get("authenticated"):
            raise Unauthenticated("the Kubernetes API rejected the token: "
                                  f"{status.get('error') or 'not authenticated'} (a projected service-account "
                                  f"token with audience {', '.join(self.audiences) or 'of the API server'} "
                                  "is expected)")
        user = status.get("user") or {}
        username = str(user.get("username") or "")
        parts = username.removeprefix(SERVICE_ACCOUNT_USER_PREFIX).split(":")
        if not username.startswith(SERVICE_ACCOUNT_USER_PREFIX) or len(parts) != 2:
            raise Unauthenticated(f"the token belongs to {username or 'an unnamed user'}, not a service "
                                  "account; certificates are only issued to service accounts")
        namespace, service_account = parts
        nodes = (user.get("extra") or {}).get(NODE_NAME_EXTRA) or []
        node = str(nodes[0]) if isinstance(nodes, list) and nodes else None
        try:
            identity = SpiffeId(self.trust_domain, namespace, service_account)
        except InvalidSpiffeId as exc:
            raise Unauthenticated(f"the token's service account cannot be a SPIFFE id: {exc}") from None
        return Caller(identity, node, (namespace, service_account) in self.node_proxies)


@dataclass(frozen=True)
class _TokenEntry:
    namespace: str
    service_account: str
    node: str | None
    node_proxy: bool


class BootstrapTokenAuthenticator:
    """Tokens listed in a local file (written by the local cluster), re-read whenever the file changes.
    A file that turns bad after start is logged and the previous tokens stay in force."""

    def __init__(self, path: str | os.PathLike[str], trust_domain: str) -> None:
        self.path, self.trust_domain = Path(path), trust_domain
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, _TokenEntry] = {}
        self._reload(initial=True)

    def _reload(self, *, initial: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            self._tokens = parse_token_file(self.path.read_text(), str(self.path))
            self._stamp = stamp
            log.info("loaded %d bootstrap tokens from %s", len(self._tokens), self.path)
        except (OSError, TokenFileError) as exc:
            error = exc if isinstance(exc, TokenFileError) else TokenFileError(
                f"cannot read the bootstrap token file {self.path}: {exc.strerror}")
            if initial:
                raise error from None
            log.error("%s; keeping the %d tokens loaded before", error, len(self._tokens))

    async def authenticate(self, token: str, cluster: str) -> Caller:
        self._reload()
        entry = self._tokens.get(token)
        if entry is None:
            log.warning("unknown bootstrap token (not in %s)", self.path)
            raise Unauthenticated("unknown token: it is not in the control plane's bootstrap token file")
        return Caller(SpiffeId(self.trust_domain, entry.namespace, entry.service_account), entry.node,
                      entry.node_proxy)


def parse_token_file(text: str, where: str) -> dict[str, _TokenEntry]:
    """Parse and validate the bootstrap token file; `TokenFileError` names the entry (never the token)."""
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise TokenFileError(f"bootstrap token file {where} is not valid JSON: {exc.msg} at line {exc.lineno}") \
            from None
    except yaml.YAMLError as exc:  # the parser's message quotes the line, which holds a token: keep it out
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise TokenFileError(f"bootstrap token file {where} is not valid YAML: "
                             f"{getattr(exc, 'problem', None) or 'syntax error'}{at}") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise TokenFileError(f"bootstrap token file {where} must map tokens to "
                             "{namespace, serviceAccount, node?, nodeProxy?}")
    tokens: dict[str, _TokenEntry] = {}
    for index, (token, entry) in enumerate(doc.items(), 1):
        at = f"bootstrap token file {where}, entry {index}"
        if not isinstance(token, str) or not token:
            raise TokenFileError(f"{at}: the token must be a non-empty string")
        if not isinstance(entry, Mapping):
            raise TokenFileError(f"{at}: expected {{namespace, serviceAccount, node?, nodeProxy?}}")
        unknown = sorted(set(entry) - {"namespace", "serviceAccount", "node", "nodeProxy"})
        if unknown:
            raise TokenFileError(f"{at}: unknown fields {', '.join(map(str, unknown))}")
        for name in ("namespace", "serviceAccount"):
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise TokenFileError(f"{at}: {name} must be a non-empty string")
        node = entry.get("node")
        if node is not None and (not isinstance(node, str) or not node):
            raise TokenFileError(f"{at}: node must be a non-empty string")
        node_proxy = entry.get("nodeProxy", False)
        if not isinstance(node_proxy, bool):
            raise TokenFileError(f"{at}: nodeProxy must be true or false")
        if node_proxy and node is None:
            raise TokenFileError(f"{at}: a node proxy needs the node it runs on (node: <name>)")
        try:
            SpiffeId("x", entry["namespace"], entry["serviceAccount"])
        except InvalidSpiffeId as exc:
            raise TokenFileError(f"{at}: {exc}") from None
        tokens[token] = _TokenEntry(entry["namespace"], entry["serviceAccount"], node, node_proxy)
    return tokens


class KubePodsOnNode:
    """`PodsOnNode` straight from the API (a list by `spec.nodeName`); the control plane can answer from
    its informer cache instead."""

    def __init__(self, kube: Any) -> None:
        self.kube = kube

    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        try:
            pods = await self.kube.list(self.kube.types.require("pods"), field_selector=f"spec.nodeName={node}")
        except ApiError as exc:
            raise AuthBackendUnavailable(f"cannot list the pods of node {node}: {exc}") from None
        return {(p["metadata"]["namespace"], p.get("spec", {}).get("serviceAccountName") or "default")
                for p in pods.get("items", [])
                if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")}


# -- the service -----------------------------------------------------------------------------------
class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """The servicer; `register(server)` adds it to any grpc.aio server (e.g. the one that also serves xDS)."""

    def __init__(self, signer: CaSigner, authenticator: Authenticator, pods_on_node: PodsOnNode, *,
                 cluster_id: str = DEFAULT_CLUSTER_ID) -> None:
        self.signer, self.authenticator, self.pods_on_node = signer, authenticator, pods_on_node
        self.cluster_id = cluster_id

    def register(self, server: grpc.aio.Server) -> None:
        _generated.add_IstioCertificateServiceServicer_to_server(self, server)

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,  # gRPC's method name
                                context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.IstioCertificateResponse:
        headers = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        try:
            return await self.create_certificate(request, headers.get("authorization", ""),
                                                 headers.get("clusterid", ""))
        except CaRequestError as exc:
            log.warning("certificate request from %s refused (%s): %s", context.peer(), exc.code.name, exc)
            await context.abort(exc.code, str(exc))
            raise  # abort raises; this keeps type checkers aware that nothing is returned

    async def create_certificate(self, request: ca_pb2.IstioCertificateRequest, authorization: str,
                                 cluster: str) -> ca_pb2.IstioCertificateResponse:
        caller = await self._authenticate(authorization, cluster)
        try:
            csr = load_csr(request.csr)
            requested = csr_identity(csr)
        except InvalidCsr as exc:
            raise InvalidRequest(str(exc)) from None
        granted = await self._grant(caller, request)
        if requested != granted:
            hint = ("; a node proxy asking for a pod's identity must set metadata "
                    f"{IMPERSONATED_IDENTITY}" if caller.is_node_proxy and granted == caller.identity else "")
            raise PermissionDenied(f"the CSR asks for {requested} but the caller is granted {granted}{hint}")
        try:
            chain = self.signer.sign_workload(csr, granted, request.validity_duration)
        except SigningError as exc:
            raise InvalidRequest(f"CSR signing error ({exc})") from None
        log.info("issued a certificate for %s to %s%s", granted, caller.identity,
                 f" on node {caller.node}" if caller.node else "")
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    async def _authenticate(self, authorization: str, cluster: str) -> Caller:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        if cluster and cluster != self.cluster_id:
            raise Unauthenticated(f"client claims to be in cluster {cluster!r}, but this CA serves cluster "
                                  f"{self.cluster_id!r}; fix the client's clusterid (CLUSTER_ID)")
        return await self.authenticator.authenticate(token.strip(), cluster or self.cluster_id)

    async def _grant(self, caller: Caller, request: ca_pb2.IstioCertificateRequest) -> SpiffeId:
        field = request.metadata.fields.get(IMPERSONATED_IDENTITY) if request.HasField("metadata") else None
        if field is None or (field.WhichOneof("kind") == "string_value" and not field.string_value):
            return caller.identity
        if field.WhichOneof("kind") != "string_value":
            raise InvalidRequest(f"metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE id")
        try:
            wanted = SpiffeId.parse(field.string_value)
        except InvalidSpiffeId as exc:
            raise InvalidRequest(f"metadata {IMPERSONATED_IDENTITY}: {exc}") from None
        if wanted == caller.identity:
            return wanted
        if not caller.is_node_proxy:
            raise PermissionDenied(f"caller {caller.identity} is not allowed to impersonate {wanted}: only node "
                                   "proxies (ztunnel) may ask for other identities")
        if wanted.trust_domain != self.signer.trust_domain:
            raise PermissionDenied(f"cannot impersonate {wanted}: this CA issues identities in trust domain "
                                   f"{self.signer.trust_domain!r} only")
        if not caller.node:
            raise PermissionDenied(f"node proxy {caller.identity} presented a credential without a node name, so "
                                   f"it cannot impersonate {wanted}; use a node-bound token")
        local = await self.pods_on_node.service_accounts_on_node(caller.node)
        if (wanted.namespace, wanted.service_account) not in local:
            raise PermissionDenied(f'cannot impersonate {wanted}: no instances of '
                                   f'"{wanted.namespace}/{wanted.service_account}" found on node "{caller.node}" '
                                   "(a node proxy may only ask for identities of pods scheduled on its node)")
        return wanted


# -- serving ---------------------------------------------------------------------------------------
class CaServer:
    """`CertificateService` on its own grpc.aio server: `await start()` → bound port, `await stop()`."""

    def __init__(self, service: CertificateService, address: str, tls: tuple[str, str] | None = None) -> None:
        self.service, self.address, self.tls = service, address, tls
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # a second CA on the port must fail loudly
        self.service.register(server)
        try:
            if self.tls is None:
                port = int(server.add_insecure_port(self.address))
            else:
                chain_pem, key_pem = self.tls
                creds = grpc.ssl_server_credentials([(key_pem.encode(), chain_pem.encode())])
                port = int(server.add_secure_port(self.address, creds))
        except RuntimeError:
            raise CaServerError(f"the CA cannot listen on {self.address}: the port is in use or the address is "
                                "not one of this host's") from None
        await server.start()
        self._server, self.port = server, port
        log.info("CA listening on %s:%d (%s)", self.address.rpartition(":")[0], port,
                 "TLS" if self.tls else "plaintext")
        return port

    async def stop(self, grace: float = STOP_GRACE) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


async def serve_ca(signer: CaSigner, authenticator: Authenticator, pods_on_node: PodsOnNode, address: str,
                   tls: tuple[str, str] | None = None, *, cluster_id: str = DEFAULT_CLUSTER_ID) -> CaServer:
    """Start a CA on `address` (`host:port`, port 0 = any); `tls` is (certificate chain PEM, key PEM), e.g.
    from `signer.issue_serving_certificate(...)`."""
    server = CaServer(CertificateService(signer, authenticator, pods_on_node, cluster_id=cluster_id), address, tls)
    await server.start()
    return server

