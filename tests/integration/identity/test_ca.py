"""The CA over real gRPC on 127.0.0.1, TLS (as on 15012) and plaintext: issuance, impersonation by a node
proxy, every refusal's status, rotation at half-life and the old certificate kept through a CA outage.

Waits poll a condition with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from ambient.control.ca_server import (
    BootstrapTokenAuthenticator,
    CaServer,
    CaServerError,
    KubePodsOnNode,
    serve_ca,
)
from ambient.identity.ca_client import CaClient, CaClientConfig
from ambient.identity.certs import WorkloadCertificate, load_certs
from ambient.identity.errors import CaError, CertificateUnavailable
from ambient.identity.keys import build_csr, generate_key
from ambient.identity.manager import CertificateManager
from ambient.identity.signer import CaSigner, load_or_create_in_cluster
from ambient.identity.spiffe import SpiffeId
from ambient.kube.client import KubeClient, KubeConfig
from ambient.local.apiserver import ApiServer
from ambient.proto import ca_pb2, ca_pb2_grpc

TD = "cluster.local"
HOST = "127.0.0.1"
WAIT = 5.0  # bound on every wait
SLEEP = SpiffeId(TD, "default", "sleep")
REVIEWS = SpiffeId(TD, "bookinfo", "reviews")
RATINGS = SpiffeId(TD, "bookinfo", "ratings")
TOKENS = """\
zt-node-1: {namespace: istio-system, serviceAccount: ztunnel, node: node-1, nodeProxy: true}
sleep-token: {namespace: default, serviceAccount: sleep, node: node-1}
"""
T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await probe()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Pods:
    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        return {"node-1": {("default", "sleep"), ("bookinfo", "reviews")},
                "node-2": {("bookinfo", "ratings")}}.get(node, set())


@dataclass
class Ca:
    signer: CaSigner
    server: CaServer
    tls: bool

    def client(self, token: str, *, impersonate: bool = False, ttl: int = 0, root: str | None = None) -> CaClient:
        root_pem = (root or self.signer.root_pem) if self.tls else None
        return CaClient(CaClientConfig(f"{HOST}:{self.server.port}", root_pem, impersonate=impersonate, ttl=ttl),
                        token)

    async def raw(self, request: ca_pb2.IstioCertificateRequest, token: str) -> Any:
        """A call without CaClient's checks, for requests a correct client never sends."""
        target = f"{HOST}:{self.server.port}"
        if self.tls:
            creds = grpc.ssl_channel_credentials(self.signer.root_pem.encode())
            channel = grpc.aio.secure_channel(target, creds, options=[
                ("grpc.ssl_target_name_override", "istiod.istio-system.svc")])
        else:
            channel = grpc.aio.insecure_channel(target)
        async with channel:
            stub: Any = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            return await stub.CreateCertificate(request, metadata=(("authorization", f"Bearer {token}"),
                                                                   ("clusterid", "Kubernetes")), timeout=WAIT)


async def start_ca(tmp_path: Path, tls: bool) -> Ca:
    signer = CaSigner.load_or_create(tmp_path / "ca", TD)
    (tmp_path / "tokens.yaml").write_text(TOKENS)
    serving = signer.issue_serving_certificate(ips=[HOST])
    server = await serve_ca(signer, BootstrapTokenAuthenticator(tmp_path / "tokens.yaml", TD), Pods(),
                            f"{HOST}:0", (serving.cert_chain_pem, serving.key_pem) if tls else None)
    return Ca(signer, server, tls)


@pytest.fixture(params=["tls", "plaintext"])
async def ca(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ca]:
    running = await start_ca(tmp_path, request.param == "tls")
    yield running
    await running.server.stop()


def verified_sans(cert: WorkloadCertificate, root_pem: str) -> list[str]:
    certs = load_certs("".join(cert.cert_chain), "test")
    root = load_certs(root_pem, "root")[0]
    verified = PolicyBuilder().store(Store([root])).build_client_verifier().verify(certs[0], certs[1:-1])
    return [n.value for n in verified.subjects or [] if isinstance(n, x509.UniformResourceIdentifier)]


async def test_issues_the_callers_identity_with_a_chain_to_the_root(ca: Ca) -> None:
    client = ca.client("sleep-token")
    try:
        cert = await client.fetch_certificate(SLEEP)
    finally:
        await client.close()
    assert verified_sans(cert, ca.signer.root_pem) == [str(SLEEP)]
    assert cert.root_pem == ca.signer.root_pem
    assert round(cert.lifetime) == 24 * 3600


async def test_node_proxy_impersonates_pods_on_its_node_only(ca: Ca) -> None:
    ztunnel = ca.client("zt-node-1", impersonate=True)
    try:
        cert = await ztunnel.fetch_certificate(REVIEWS)
        assert verified_sans(cert, ca.signer.root_pem) == [str(REVIEWS)]
        with pytest.raises(CaError) as caught:
            await ztunnel.fetch_certificate(RATINGS)
    finally:
        await ztunnel.close()
    assert caught.value.code == "PERMISSION_DENIED"
    assert 'no instances of "bookinfo/ratings" found on node "node-1"' in str(caught.value)


async def test_refusals_over_the_wire(ca: Ca) -> None:
    def request(identity: SpiffeId, ttl: int = 0) -> ca_pb2.IstioCertificateRequest:
        return ca_pb2.IstioCertificateRequest(csr=build_csr(generate_key(), identity), validity_duration=ttl)

    cases = [
        (request(RATINGS), "sleep-token", grpc.StatusCode.PERMISSION_DENIED,
         "the CSR asks for spiffe://cluster.local/ns/bookinfo/sa/ratings but the caller is granted"),
        (request(SLEEP, ttl=91 * 24 * 3600), "sleep-token", grpc.StatusCode.INVALID_ARGUMENT,
         "is greater than the max allowed TTL"),
        (ca_pb2.IstioCertificateRequest(csr="not a csr"), "sleep-token", grpc.StatusCode.INVALID_ARGUMENT,
         "CSR is not PEM"),
        (request(SLEEP), "wrong-token", grpc.StatusCode.UNAUTHENTICATED, "unknown token"),
    ]
    for req, token, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ca.raw(req, token)
        assert caught.value.code() == code
        assert message in (caught.value.details() or "")


async def test_bad_token_surfaces_as_unauthenticated_in_the_client(ca: Ca) -> None:
    client = ca.client("wrong-token")
    try:
        with pytest.raises(CaError, match="UNAUTHENTICATED: unknown token") as caught:
            await client.fetch_certificate(SLEEP)
    finally:
        await client.close()
    assert caught.value.code == "UNAUTHENTICATED"


async def test_tls_client_refuses_a_ca_that_does_not_chain_to_its_root(tmp_path: Path) -> None:
    ca = await start_ca(tmp_path, tls=True)
    client = ca.client("sleep-token", root=CaSigner.generate(TD).root_pem)
    try:
        with pytest.raises(CaError, match=r"cannot reach the CA at 127\.0\.0\.1:\d+") as caught:
            await client.fetch_certificate(SLEEP)
    finally:
        await client.close()
        await ca.server.stop()
    assert caught.value.code == "UNAVAILABLE"


async def test_a_taken_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    ca = await start_ca(tmp_path, tls=False)
    try:
        with pytest.raises(CaServerError, match=rf"cannot listen on {HOST}:{ca.server.port}: the port is in use"):
            await serve_ca(ca.signer, BootstrapTokenAuthenticator(tmp_path / "tokens.yaml", TD), Pods(),
                           f"{HOST}:{ca.server.port}")
    finally:
        await ca.server.stop()


async def test_rotation_at_half_life_and_old_cert_kept_through_an_outage(tmp_path: Path) -> None:
    ca = await start_ca(tmp_path, tls=True)
    client = ca.client("zt-node-1", impersonate=True, ttl=4)
    manager = CertificateManager(client)
    try:
        started = time.monotonic()
        first = await manager.fetch(SLEEP)
        assert round(first.lifetime) == 4

        async def rotated() -> WorkloadCertificate | None:
            cert = await manager.fetch(SLEEP)
            return cert if cert is not first else None

        second = await eventually(rotated, "the certificate to rotate")
        assert 1.3 <= time.monotonic() - started <= 3.5  # half of 4 s, give or take the 1 s granularity
        await ca.server.stop(grace=0)

        async def failed() -> bool:
            return manager.snapshot()[0].failures > 0

        await eventually(failed, "a refresh to fail while the CA is down")
        assert await manager.fetch(SLEEP) is second  # the old certificate is kept while valid
        [status] = manager.snapshot()
        assert status.state == "available" and "cannot reach the CA" in (status.error or "")

        async def expired() -> bool:
            try:
                cert = await manager.fetch(SLEEP)
            except CertificateUnavailable as exc:
                assert "expired" in str(exc)
                return True
            assert cert is second and time.time() < second.not_after
            return False

        await eventually(expired, "the kept certificate to expire")
        assert time.time() >= second.not_after
    finally:
        await manager.close()
        await client.close()
        await ca.server.stop()


async def test_ca_persisted_in_a_kubernetes_secret_and_pods_on_node(tmp_path: Path) -> None:
    api = ApiServer(None, "t")
    port = free_port()
    await api.start([HOST], port)
    try:
        async with KubeClient(KubeConfig(f"http://{HOST}:{port}", token="t")) as kube:
            for ns in ("istio-system", "default"):
                await kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            first = await load_or_create_in_cluster(kube, TD)
            again = await load_or_create_in_cluster(kube, TD)
            assert again.root_pem == first.root_pem
            for name, node, sa in (("a", "node-1", "sleep"), ("b", "node-2", "other"), ("c", "node-1", None)):
                spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "app", "image": "x"}]}
                if sa:
                    spec["serviceAccountName"] = sa
                await kube.create({"apiVersion": "v1", "kind": "Pod",
                                   "metadata": {"name": name, "namespace": "default"}, "spec": spec})
            assert await KubePodsOnNode(kube).service_accounts_on_node("node-1") == {("default", "sleep"),
                                                                                    ("default", "default")}
    finally:
        await api.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
