"""The CA's decisions without gRPC: who may get which identity, and the exact refusal for each mistake.
(The same service over real gRPC, TLS and plaintext, is in tests/integration/identity/test_ca.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from google.protobuf import struct_pb2

from ambient.control.ca_server import (
    AuthBackendUnavailable,
    BootstrapTokenAuthenticator,
    Caller,
    CaRequestError,
    CertificateService,
    InvalidRequest,
    PermissionDenied,
    TokenFileError,
    TokenReviewAuthenticator,
    Unauthenticated,
    parse_token_file,
)
from ambient.identity.certs import uri_sans
from ambient.identity.keys import build_csr, generate_key
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId
from ambient.kube.errors import ApiError
from ambient.proto import ca_pb2

TD = "cluster.local"
ZTUNNEL = SpiffeId(TD, "istio-system", "ztunnel")
SLEEP = SpiffeId(TD, "default", "sleep")
RATINGS = SpiffeId(TD, "bookinfo", "ratings")


class Tokens:
    def __init__(self, callers: dict[str, Caller]) -> None:
        self.callers = callers

    async def authenticate(self, token: str, cluster: str) -> Caller:
        if token not in self.callers:
            raise Unauthenticated("unknown token")
        return self.callers[token]


class Pods:
    def __init__(self, nodes: dict[str, set[tuple[str, str]]]) -> None:
        self.nodes = nodes

    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        return self.nodes.get(node, set())


@pytest.fixture(scope="module")
def signer() -> CaSigner:
    return CaSigner.generate(TD)


@pytest.fixture
def service(signer: CaSigner) -> CertificateService:
    tokens = Tokens({
        "zt-1": Caller(ZTUNNEL, "node-1", is_node_proxy=True),
        "zt-nonode": Caller(ZTUNNEL, None, is_node_proxy=True),
        "sleep": Caller(SLEEP, "node-1"),
    })
    return CertificateService(signer, tokens, Pods({"node-1": {("default", "sleep")},
                                                    "node-2": {("bookinfo", "ratings")}}), cluster_id="Kubernetes")


def request(san: SpiffeId | None, *, impersonate: Any = None, ttl: int = 0, csr: str | None = None
            ) -> ca_pb2.IstioCertificateRequest:
    req = ca_pb2.IstioCertificateRequest(csr=csr if csr is not None else build_csr(generate_key(), san or SLEEP),
                                         validity_duration=ttl)
    if impersonate is not None:
        meta = struct_pb2.Struct()
        meta.update({"ImpersonatedIdentity": impersonate})
        req.metadata.CopyFrom(meta)
    return req


def leaf_san(response: ca_pb2.IstioCertificateResponse) -> list[str]:
    return uri_sans(x509.load_pem_x509_certificate(response.cert_chain[0].encode()))


async def test_grants_the_callers_own_identity(service: CertificateService, signer: CaSigner) -> None:
    response = await service.create_certificate(request(SLEEP), "Bearer sleep", "Kubernetes")
    assert leaf_san(response) == [str(SLEEP)]
    assert response.cert_chain[-1] == signer.root_pem
    assert all(pem.endswith("-----END CERTIFICATE-----\n") for pem in response.cert_chain)


async def test_node_proxy_gets_identities_of_pods_on_its_node(service: CertificateService) -> None:
    response = await service.create_certificate(request(SLEEP, impersonate=str(SLEEP)), "Bearer zt-1", "")
    assert leaf_san(response) == [str(SLEEP)]
    own = await service.create_certificate(request(ZTUNNEL, impersonate=str(ZTUNNEL)), "bearer zt-1", "")
    assert leaf_san(own) == [str(ZTUNNEL)]
    empty = await service.create_certificate(request(ZTUNNEL, impersonate=""), "Bearer zt-1", "")
    assert leaf_san(empty) == [str(ZTUNNEL)]


def bad_csr() -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(SLEEP)), x509.DNSName("x")]), critical=True)
    return builder.sign(generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(("token", "cluster", "build", "error", "message"), [
    ("", "", lambda: request(SLEEP), Unauthenticated, "missing credentials: send metadata 'authorization: Bearer"),
    ("Basic sleep", "", lambda: request(SLEEP), Unauthenticated, "missing credentials"),
    ("Bearer nope", "", lambda: request(SLEEP), Unauthenticated, "unknown token"),
    ("Bearer sleep", "remote", lambda: request(SLEEP), Unauthenticated,
     "client claims to be in cluster 'remote', but this CA serves cluster 'Kubernetes'"),
    ("Bearer sleep", "", lambda: request(RATINGS, impersonate=str(RATINGS)), PermissionDenied,
     "caller spiffe://cluster.local/ns/default/sa/sleep is not allowed to impersonate"),
    ("Bearer zt-1", "", lambda: request(RATINGS, impersonate=str(RATINGS)), PermissionDenied,
     'no instances of "bookinfo/ratings" found on node "node-1"'),
    ("Bearer zt-nonode", "", lambda: request(SLEEP, impersonate=str(SLEEP)), PermissionDenied,
     "without a node name"),
    ("Bearer zt-1", "", lambda: request(SpiffeId("other.td", "default", "sleep"),
                                        impersonate="spiffe://other.td/ns/default/sa/sleep"),
     PermissionDenied, "trust domain 'cluster.local' only"),
    ("Bearer zt-1", "", lambda: request(SLEEP, impersonate=3.0), InvalidRequest, "must be a string SPIFFE id"),
    ("Bearer zt-1", "", lambda: request(SLEEP, impersonate="sleep"), InvalidRequest,
     "ImpersonatedIdentity: invalid SPIFFE id"),
    ("Bearer sleep", "", lambda: request(RATINGS), PermissionDenied,
     "the CSR asks for spiffe://cluster.local/ns/bookinfo/sa/ratings but the caller is granted "
     "spiffe://cluster.local/ns/default/sa/sleep"),
    ("Bearer zt-1", "", lambda: request(SLEEP), PermissionDenied, "must set metadata ImpersonatedIdentity"),
    ("Bearer zt-1", "", lambda: request(SLEEP, impersonate=str(SLEEP), csr=bad_csr()), InvalidRequest,
     "non-URI entries"),
    ("Bearer sleep", "", lambda: request(SLEEP, csr="garbage"), InvalidRequest, "CSR is not PEM"),
    ("Bearer sleep", "", lambda: request(SLEEP, ttl=100 * 24 * 3600), InvalidRequest,
     "CSR signing error (requested TTL 2400h0m0s is greater than the max allowed TTL 2160h0m0s)"),
])
async def test_refusals_carry_the_right_status_and_say_why(
        service: CertificateService, token: str, cluster: str, build: Any, error: type[CaRequestError],
        message: str) -> None:
    with pytest.raises(CaRequestError) as caught:
        await service.create_certificate(build(), token, cluster)
    assert type(caught.value) is error
    assert message in str(caught.value)


# -- TokenReview ------------------------------------------------------------------------------------
class FakeKube:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.sent: list[tuple[str, str, Any]] = []

    async def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        self.sent.append((method, path, body))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def review(username: str, *, authenticated: bool = True, node: str | None = None, error: str = "") -> Any:
    user: dict[str, Any] = {"username": username}
    if node:
        user["extra"] = {"authentication.kubernetes.io/node-name": [node]}
    return {"status": {"authenticated": authenticated, "user": user, **({"error": error} if error else {})}}


async def test_token_review_identifies_a_node_proxy_and_its_node() -> None:
    kube = FakeKube(review("system:serviceaccount:istio-system:ztunnel", node="node-7"))
    caller = await TokenReviewAuthenticator(kube, TD).authenticate("tok", "Kubernetes")
    assert caller == Caller(ZTUNNEL, "node-7", is_node_proxy=True)
    method, path, body = kube.sent[0]
    assert (method, path) == ("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
    assert body["kind"] == "TokenReview" and body["spec"] == {"token": "tok", "audiences": ["istio-ca"]}
    plain = await TokenReviewAuthenticator(FakeKube(review("system:serviceaccount:default:sleep")), TD
                                           ).authenticate("t", "")
    assert plain == Caller(SLEEP, None, is_node_proxy=False)


@pytest.mark.parametrize(("answer", "error", "message"), [
    (review("", authenticated=False, error="token has expired"), Unauthenticated, "token has expired"),
    (review("kubernetes-admin"), Unauthenticated, "belongs to kubernetes-admin, not a service account"),
    (review("system:serviceaccount:default"), Unauthenticated, "not a service account"),
    (ApiError(403, "tokenreviews is forbidden"), AuthBackendUnavailable, "needs RBAC to create tokenreviews"),
])
async def test_token_review_refusals(answer: Any, error: type[CaRequestError], message: str) -> None:
    with pytest.raises(error, match=message):
        await TokenReviewAuthenticator(FakeKube(answer), TD).authenticate("tok", "")


# -- bootstrap token file ---------------------------------------------------------------------------
async def test_bootstrap_tokens_from_yaml_and_json(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("zt-secret: {namespace: istio-system, serviceAccount: ztunnel, node: node-1, nodeProxy: true}\n"
                    "wp-secret: {namespace: bookinfo, serviceAccount: waypoint}\n")
    auth = BootstrapTokenAuthenticator(path, TD)
    assert await auth.authenticate("zt-secret", "") == Caller(ZTUNNEL, "node-1", True)
    assert await auth.authenticate("wp-secret", "") == Caller(SpiffeId(TD, "bookinfo", "waypoint"), None, False)
    with pytest.raises(Unauthenticated, match="not in the control plane's bootstrap token file"):
        await auth.authenticate("zt-secretX", "")
    # The local cluster adds a node: the file is re-read on change, JSON works too.
    path.write_text(json.dumps({"zt2": {"namespace": "istio-system", "serviceAccount": "ztunnel",
                                        "node": "node-2", "nodeProxy": True}}))
    os.utime(path, ns=(1, 1))
    assert (await auth.authenticate("zt2", "")).node == "node-2"
    # A broken edit keeps the tokens loaded before.
    path.write_text("zt3: [not, a, map]\n")
    assert (await auth.authenticate("zt2", "")).node == "node-2"


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "must map tokens to"),
    ("t: {namespace: ns}\n", "entry 1: serviceAccount must be a non-empty string"),
    ("t: {namespace: ns, serviceAccount: sa, nodeProxy: true}\n", "a node proxy needs the node it runs on"),
    ("t: {namespace: ns, serviceAccount: sa, nodeproxy: true}\n", "unknown fields nodeproxy"),
    ("t: {namespace: ns, serviceAccount: sa, nodeProxy: 'yes'}\n", "nodeProxy must be true or false"),
    ("t: {namespace: ns, serviceAccount: 'a/b'}\n", "service account 'a/b'"),
    ("t: {namespace: [x\n", "not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
    ("{\"t\": ", "not valid JSON: Expecting value at line 1"),
])
def test_bad_token_files_name_the_entry_not_the_token(text: str, message: str) -> None:
    with pytest.raises(TokenFileError) as caught:
        parse_token_file(text.replace("t: {", "s3cr3t-token: {"), "/etc/tokens.yaml")
    assert message in str(caught.value)
    assert "/etc/tokens.yaml" in str(caught.value)
    assert "s3cr3t-token" not in str(caught.value)


def test_missing_token_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=r"cannot read the bootstrap token file .*missing.yaml"):
        BootstrapTokenAuthenticator(tmp_path / "missing.yaml", TD)
