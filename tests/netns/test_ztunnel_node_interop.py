"""Interop (issue 5): Node's `http2` CONNECT client — an HTTP/2 and TLS stack that is not ours — against
ztunnel's real inbound HBONE port (PROTOCOLS.md §6, §5.3).

The ztunnel is `ztunnel.app.Ztunnel` in the test process, given one pod the way the node agent gives it
(`add_pod` with the fd of a throwaway network namespace), so its listeners are the real 15001/15006/15008
inside that namespace, with ztunnel's socket options. Its certificates come from a real mesh CA over gRPC
(node-proxy impersonation); the workload store is filled directly instead of over xDS. The pod's app is a
greeting echo server on POD_IP:8080 in the same namespace; Node runs there too (`ip netns exec`), from a
second local address, so the app sees the caller's address only if ztunnel preserved it.

The matrix: a mesh certificate → 200 and bytes both ways; no client certificate, a certificate from another
root, one from another trust domain → refused before any HTTP/2; a method other than CONNECT → 400; an
authority IP that is not the pod's → 400; an identity a DENY policy names → 401.

A failed handshake is closed by asyncio's TLS transport without sending the TLS alert (it force-closes;
rustls in Istio's ztunnel sends `certificate_required` / `unknown_ca`), so Node sees the connection close
rather than an alert; the refusal is checked as "no HTTP/2 SETTINGS, no response" plus the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ambient.control.ca_server import BootstrapTokenAuthenticator, CaServer, serve_ca
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.keys import build_csr, generate_key, private_key_pem
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId
from ambient.netns import in_netns
from ambient.proto import authorization_pb2 as authz_pb2
from ambient.proto import workload_pb2
from ambient.xds.store import StoreChanges
from ambient.zds.protocol import WorkloadInfo
from ztunnel.app import Ztunnel
from ztunnel.config import INBOUND_PORT, ZtunnelConfig

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SCRIPT = Path(__file__).with_name("node_hbone_client.js")
TD = "cluster.local"
NAMESPACE = "interop"
POD_IP = "10.250.0.2"  # the pod's address (its workload's)
CLIENT_IP = "10.250.0.3"  # where Node connects from
NOT_THE_POD = "10.250.0.4"
APP_PORT = 8080
PAYLOAD_SIZE = 1 << 20  # larger than Node's 64 KiB receive window: flow control on both sides is exercised
NODE_TIMEOUT = 20.0  # seconds for one Node run (the script gives up on its own after 10)
CA_HOST = "127.0.0.1"
NO_CONTROL_PLANE = "127.0.0.1:1"  # xDS is not started: the test fills the store

SERVER_ID = SpiffeId(TD, NAMESPACE, "echo")
CLIENT_ID = SpiffeId(TD, NAMESPACE, "sleep")
DENIED_ID = SpiffeId(TD, NAMESPACE, "denied")
POD_UID = "Kubernetes//Pod/interop/echo-0"
POD_INFO = WorkloadInfo("echo-0", NAMESPACE, SERVER_ID.service_account)
WORKLOAD = workload_pb2.Workload(
    uid=POD_UID, name="echo-0", namespace=NAMESPACE, service_account=SERVER_ID.service_account,
    addresses=[ipaddress.ip_address(POD_IP).packed], tunnel_protocol=workload_pb2.HBONE, node="node-1",
    cluster_id="Kubernetes", workload_name="echo", canonical_name="echo", canonical_revision="v1")
DENY_POLICY = authz_pb2.Authorization(
    name="deny-denied", namespace=NAMESPACE, scope=authz_pb2.NAMESPACE, action=authz_pb2.DENY,
    rules=[authz_pb2.Rule(clauses=[authz_pb2.Clause(matches=[authz_pb2.Match(
        principals=[authz_pb2.StringMatch(exact=f"{TD}/ns/{NAMESPACE}/sa/{DENIED_ID.service_account}")])])])])
TOKENS = "zt-node-1: {namespace: istio-system, serviceAccount: ztunnel, node: node-1, nodeProxy: true}\n"


class PodsOnNode1:
    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        return {(NAMESPACE, SERVER_ID.service_account)} if node == "node-1" else set()


def issue(signer: CaSigner, identity: SpiffeId) -> WorkloadCertificate:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, identity).encode())
    return WorkloadCertificate.from_chain(identity, private_key_pem(key), signer.sign_workload(csr, identity, 0))


def sh(*argv: str, check: bool = True) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")


@pytest.fixture
def pod_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("node") is None:
        pytest.skip("node is not installed (scripts/setup.sh installs nodejs); the interop tests run Node's "
                    "http2 client")
    if shutil.which("ip") is None:
        pytest.skip("needs ip (iproute2) on PATH")
    name = f"ambt-{uuid.uuid4().hex[:8]}-nodeiop"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        for ip in (POD_IP, CLIENT_IP):
            sh("ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "lo")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@dataclass
class Inbound:
    netns: str
    signer: CaSigner
    ztunnel: Ztunnel
    files: Path
    callers: list[str] = field(default_factory=list)  # the source address of every connection the app got

    async def node(self, cert: WorkloadCertificate | None, *, method: str = "CONNECT",
                   authority: str = f"{POD_IP}:{APP_PORT}") -> dict[str, Any]:
        """Run Node's http2 client from CLIENT_IP to the pod's 15008; what it saw (see the script)."""
        spec: dict[str, Any] = {"host": POD_IP, "port": INBOUND_PORT, "localAddress": CLIENT_IP,
                                "ca": str(self.files / "root.pem"), "method": method, "authority": authority,
                                "payloadSize": PAYLOAD_SIZE}
        if cert is not None:
            tag = uuid.uuid4().hex[:8]
            (self.files / f"{tag}-cert.pem").write_text(cert.presented_chain_pem)
            (self.files / f"{tag}-key.pem").write_text(cert.key_pem)
            spec |= {"cert": str(self.files / f"{tag}-cert.pem"), "key": str(self.files / f"{tag}-key.pem")}
        node = shutil.which("node")
        assert node is not None
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.netns, node, str(SCRIPT), json.dumps(spec),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"node did not finish within {NODE_TIMEOUT}s") from None
        assert proc.returncode == 0, f"node failed ({proc.returncode}):\n{stdout.decode()}\n{stderr.decode()}"
        seen: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
        assert not seen["timedOut"], f"node saw nothing end within 10 s: {seen}"
        return seen


@pytest.fixture
async def inbound(pod_netns: str, tmp_path: Path) -> AsyncIterator[Inbound]:
    """A real CA, ztunnel with the pod added (its 15008 listening in `pod_netns`), the pod's app."""
    signer = CaSigner.generate(TD)
    (tmp_path / "root.pem").write_text(signer.root_pem)
    (tmp_path / "token").write_text("zt-node-1\n")
    (tmp_path / "tokens.yaml").write_text(TOKENS)
    serving = signer.issue_serving_certificate(ips=[CA_HOST])
    ca: CaServer = await serve_ca(signer, BootstrapTokenAuthenticator(tmp_path / "tokens.yaml", TD), PodsOnNode1(),
                                  f"{CA_HOST}:0", (serving.cert_chain_pem, serving.key_pem))
    config = ZtunnelConfig(node_name="node-1", node_ip=CA_HOST, xds_address=NO_CONTROL_PLANE,
                           ca_address=f"{CA_HOST}:{ca.port}", root_cert=str(tmp_path / "root.pem"),
                           token_path=str(tmp_path / "token"), trust_domain=TD, dns_capture=False)
    ztunnel = Ztunnel(config)
    ztunnel.store.apply(StoreChanges(workloads={POD_UID: WORKLOAD},
                                     authorizations={f"{NAMESPACE}/{DENY_POLICY.name}": DENY_POLICY}))
    env = Inbound(pod_netns, signer, ztunnel, tmp_path)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller = writer.get_extra_info("peername")[0]
        env.callers.append(caller)
        writer.write(f"hello {caller}\n".encode())
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        writer.close()

    app_sock = in_netns(pod_netns, lambda: socket.create_server((POD_IP, APP_PORT)))
    app_server = await asyncio.start_server(app, sock=app_sock)
    fd = os.open(f"/run/netns/{pod_netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        await ztunnel.add_pod(POD_UID, POD_INFO, fd)  # what the node agent's ZDS add does
    finally:
        os.close(fd)
    try:
        await asyncio.wait_for(ztunnel.certs.fetch(SERVER_ID), 10)  # prefetched by add_pod, from the CA
        yield env
    finally:
        await ztunnel.remove_pod(POD_UID)
        await ztunnel.drain()
        app_server.close()
        await app_server.wait_closed()
        await ca.stop()


def refused_before_http2(seen: dict[str, Any]) -> None:
    """No response and no SETTINGS: the server never spoke HTTP/2 on this connection."""
    assert seen["status"] is None, seen
    assert not seen["settings"], seen


async def test_mesh_certificate_connect_gets_200_and_bytes_flow_both_ways(inbound: Inbound) -> None:
    seen = await inbound.node(issue(inbound.signer, CLIENT_ID))

    assert seen["status"] == 200, seen
    assert seen["serverSan"] == f"URI:{SERVER_ID}"  # ztunnel presents the pod's certificate from the CA
    assert seen["greeting"] == f"hello {CLIENT_IP}"  # app → Node, and the app saw the caller's own address
    assert (seen["echoLength"], seen["echoSha256"]) == (PAYLOAD_SIZE, seen["sentSha256"])  # Node → app → Node
    assert inbound.callers == [CLIENT_IP]


async def test_no_client_certificate_is_refused_in_the_tls_handshake(inbound: Inbound,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "ambient.hbone.server")

    seen = await inbound.node(None)

    refused_before_http2(seen)
    assert "TLS handshake with HBONE client 10.250.0.3:" in caplog.text
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text
    assert inbound.callers == []


async def test_a_certificate_from_another_root_is_refused_in_the_tls_handshake(
        inbound: Inbound, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "ambient.hbone.server")
    stranger = issue(CaSigner.generate(TD), CLIENT_ID)  # same trust domain name, another mesh's root

    seen = await inbound.node(stranger)

    refused_before_http2(seen)
    assert "TLS handshake with HBONE client 10.250.0.3:" in caplog.text
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert inbound.callers == []


async def test_a_certificate_of_another_trust_domain_is_refused(inbound: Inbound,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    foreign = issue(inbound.signer, SpiffeId("example.org", NAMESPACE, "sleep"))  # our root, another domain

    seen = await inbound.node(foreign)

    refused_before_http2(seen)  # TLS 1.3 lets the client finish first; the server then drops the connection
    assert inbound.callers == []
    assert "presented spiffe://example.org/ns/interop/sa/sleep, which is not in trust domain cluster.local" \
        in caplog.text


async def test_a_method_other_than_connect_gets_400(inbound: Inbound) -> None:
    seen = await inbound.node(issue(inbound.signer, CLIENT_ID), method="GET")

    assert seen["settings"], seen
    assert seen["status"] == 400, seen
    assert inbound.callers == []


async def test_an_authority_that_is_not_the_pods_ip_gets_400(inbound: Inbound) -> None:
    seen = await inbound.node(issue(inbound.signer, CLIENT_ID), authority=f"{NOT_THE_POD}:{APP_PORT}")

    assert seen["status"] == 400, seen
    assert inbound.callers == []


async def test_an_identity_denied_by_authorization_gets_401(inbound: Inbound,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    seen = await inbound.node(issue(inbound.signer, DENIED_ID))

    assert seen["status"] == 401, seen
    assert inbound.callers == []
    assert f"connection denied: explicitly denied by: {NAMESPACE}/{DENY_POLICY.name}" in caplog.text
    # The same connection setup with an identity the policy does not name goes through.
    allowed = await inbound.node(issue(inbound.signer, CLIENT_ID))
    assert allowed["status"] == 200, allowed
