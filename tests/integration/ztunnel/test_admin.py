"""ztunnel's admin (15000), readiness (15021) and metrics (15020) servers over real HTTP on 127.0.0.1 with
a fake state provider (which tests/integration/cli/test_ztunnel_config.py serves to `ambientctl ztunnel-config`)."""

from __future__ import annotations

import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from ambient.identity.certs import WorkloadCertificate
from ambient.identity.keys import build_csr, generate_key, load_csr, private_key_pem
from ambient.identity.manager import CertificateStatus
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId
from ambient.proto import authorization_pb2, workload_pb2
from ambient.telemetry import logs
from ambient.telemetry.admin_http import Readiness
from ambient.xds.store import StoreChanges, WorkloadSnapshot, WorkloadStore
from ztunnel.admin import (
    AdminServer,
    CertificateInfo,
    ConnectionEntry,
    MetricsServer,
    ReadinessServer,
    WorkloadState,
)
from ztunnel.errors import ConfigError

HOST = "127.0.0.1"
SLEEP_ID = SpiffeId("cluster.local", "default", "sleep")
BROKEN_ID = SpiffeId("cluster.local", "default", "broken")

WAYPOINT = workload_pb2.GatewayAddress(
    hostname=workload_pb2.NamespacedHostname(namespace="web", hostname="waypoint.web.svc.cluster.local"),
    hbone_mtls_port=15008)
SLEEP = workload_pb2.Workload(
    uid="Kubernetes//Pod/default/sleep-7d4f9", name="sleep-7d4f9", namespace="default",
    addresses=[bytes([10, 244, 1, 5])], tunnel_protocol=workload_pb2.HBONE, service_account="sleep",
    workload_name="sleep", canonical_name="sleep", canonical_revision="latest", node="node-1",
    cluster_id="Kubernetes")
HTTPBIN = workload_pb2.Workload(
    uid="Kubernetes//Pod/web/httpbin-5c6f", name="httpbin-5c6f", namespace="web", addresses=[bytes([10, 244, 2, 4])],
    tunnel_protocol=workload_pb2.HBONE, trust_domain="cluster.local", service_account="httpbin",
    workload_name="httpbin", canonical_name="httpbin", canonical_revision="v1", node="node-2", waypoint=WAYPOINT,
    authorization_policies=["web/allow-sleep"],
    services={"web/httpbin.web.svc.cluster.local": workload_pb2.PortList(
        ports=[workload_pb2.Port(service_port=8000, target_port=8080)])})
HTTPBIN_SICK = workload_pb2.Workload(
    uid="Kubernetes//Pod/web/httpbin-9a1b", name="httpbin-9a1b", namespace="web", addresses=[bytes([10, 244, 2, 9])],
    service_account="httpbin", workload_type=workload_pb2.POD, status=workload_pb2.UNHEALTHY, node="node-2",
    services={"web/httpbin.web.svc.cluster.local": workload_pb2.PortList(
        ports=[workload_pb2.Port(service_port=8000, target_port=8080)])})
HTTPBIN_SVC = workload_pb2.Service(
    name="httpbin", namespace="web", hostname="httpbin.web.svc.cluster.local",
    addresses=[workload_pb2.NetworkAddress(address=bytes([10, 96, 0, 20]))],
    ports=[workload_pb2.Port(service_port=8000, target_port=8080)], waypoint=WAYPOINT,
    subject_alt_names=["spiffe://cluster.local/ns/web/sa/httpbin"])
WAYPOINT_SVC = workload_pb2.Service(
    name="waypoint", namespace="web", hostname="waypoint.web.svc.cluster.local",
    addresses=[workload_pb2.NetworkAddress(address=bytes([10, 96, 0, 30]))],
    ports=[workload_pb2.Port(service_port=15008, target_port=15008)])
ALLOW_SLEEP = authorization_pb2.Authorization(
    name="allow-sleep", namespace="web", scope=authorization_pb2.WORKLOAD_SELECTOR, action=authorization_pb2.ALLOW,
    rules=[authorization_pb2.Rule(clauses=[
        authorization_pb2.Clause(matches=[authorization_pb2.Match(
            principals=[authorization_pb2.StringMatch(exact="cluster.local/ns/default/sa/sleep")],
            source_ips=[authorization_pb2.Address(address=bytes([10, 244, 0, 0]), length=16)])]),
        authorization_pb2.Clause(matches=[authorization_pb2.Match(destination_ports=[8080])])])])
STRICT = authorization_pb2.Authorization(
    name="istio_converted_static_strict", namespace="istio-system", scope=authorization_pb2.GLOBAL,
    action=authorization_pb2.DENY, rules=[authorization_pb2.Rule(clauses=[authorization_pb2.Clause(matches=[
        authorization_pb2.Match(not_principals=[authorization_pb2.StringMatch(presence={})],
                                service_accounts=[authorization_pb2.ServiceAccountMatch(
                                    namespace="web", serviceAccount="httpbin")])])])])


def issue(identity: SpiffeId) -> WorkloadCertificate:
    signer = CaSigner.generate("cluster.local")
    key = generate_key()
    chain = signer.sign_workload(load_csr(build_csr(key, identity)), identity, 3600)
    return WorkloadCertificate.from_chain(identity, private_key_pem(key), chain)


SLEEP_CERT = issue(SLEEP_ID)


class FakeState:
    """What the ztunnel app provides, fixed."""

    def __init__(self) -> None:
        store = WorkloadStore()
        self._snapshot = store.apply(StoreChanges(
            workloads={w.uid: w for w in (SLEEP, HTTPBIN, HTTPBIN_SICK)},
            services={"web/httpbin.web.svc.cluster.local": HTTPBIN_SVC,
                      "web/waypoint.web.svc.cluster.local": WAYPOINT_SVC},
            authorizations={"web/allow-sleep": ALLOW_SLEEP, "istio-system/strict": STRICT}))

    def snapshot(self) -> WorkloadSnapshot:
        return self._snapshot

    def certificates(self) -> Sequence[CertificateStatus | CertificateInfo]:
        available = CertificateStatus(SLEEP_ID, "available", SLEEP_CERT.not_before, SLEEP_CERT.not_after, None, 0,
                                      None, 1)
        broken = CertificateStatus(BROKEN_ID, "unavailable", None, None, None, 3, "CA down", 1)
        return [broken, CertificateInfo(available, SLEEP_CERT)]

    def workload_states(self) -> Mapping[str, WorkloadState]:
        return {SLEEP.uid: WorkloadState("sleep-7d4f9", "default", "sleep", outbound=[
            ConnectionEntry("10.244.1.5:40936", "10.244.2.4:15008", "HBONE", original_dst="10.96.0.20:8000")]),
            HTTPBIN.uid: WorkloadState("httpbin-5c6f", "web", "httpbin", inbound=[
                ConnectionEntry("10.244.1.5:40936", "10.244.2.4:8080", "HBONE",
                                src_identity="spiffe://cluster.local/ns/default/sa/sleep")])}

    def config(self) -> Mapping[str, Any]:
        return {"nodeName": "node-1", "clusterId": "Kubernetes"}


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, list[str]]]:
    quits: list[str] = []
    readiness = Readiness({"xds"})
    server = AdminServer(FakeState(), lambda: quits.append("quit"), (HOST, 0), readiness=readiness)
    await server.start()
    yield server, quits
    await server.close()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.request(method, f"http://{HOST}:{port}{path}") as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


# -- /config_dump -------------------------------------------------------------------------------------------
async def test_config_dump_workloads_in_ztunnels_shape(admin: tuple[AdminServer, list[str]]) -> None:
    status, content_type, body = await get(admin[0].port, "/config_dump")
    assert status == 200 and content_type == "application/json; charset=utf-8"
    dump = json.loads(body)
    assert list(dump) == ["workloads", "services", "policies", "version", "config", "certificates", "workloadState"]
    assert [w["uid"] for w in dump["workloads"]] == sorted([SLEEP.uid, HTTPBIN.uid, HTTPBIN_SICK.uid])
    httpbin = next(w for w in dump["workloads"] if w["name"] == "httpbin-5c6f")
    assert httpbin == {
        "workloadIps": ["10.244.2.4"],
        "waypoint": {"destination": "web/waypoint.web.svc.cluster.local", "hboneMtlsPort": 15008},
        "protocol": "HBONE", "networkMode": "Standard", "uid": HTTPBIN.uid, "name": "httpbin-5c6f",
        "namespace": "web", "trustDomain": "cluster.local", "serviceAccount": "httpbin", "workloadName": "httpbin",
        "workloadType": "deployment", "canonicalName": "httpbin", "canonicalRevision": "v1", "node": "node-2",
        "authorizationPolicies": ["web/allow-sleep"], "status": "Healthy", "clusterId": "Kubernetes",
        "services": ["web/httpbin.web.svc.cluster.local"], "capacity": 1}
    sick = next(w for w in dump["workloads"] if w["name"] == "httpbin-9a1b")
    assert (sick["protocol"], sick["status"], sick["workloadType"]) == ("TCP", "Unhealthy", "pod")
    assert sick["clusterId"] == "Kubernetes" and "waypoint" not in sick  # ztunnel's defaults; absent fields left out


async def test_config_dump_services_policies_and_the_rest(admin: tuple[AdminServer, list[str]]) -> None:
    dump = json.loads((await get(admin[0].port, "/config_dump"))[2])
    httpbin = next(s for s in dump["services"] if s["name"] == "httpbin")
    assert httpbin == {
        "name": "httpbin", "namespace": "web", "hostname": "httpbin.web.svc.cluster.local", "vips": ["/10.96.0.20"],
        "ports": {"8000": 8080},
        "endpoints": {
            HTTPBIN.uid: {"workloadUid": HTTPBIN.uid, "port": {"8000": 8080}, "status": "Healthy"},
            HTTPBIN_SICK.uid: {"workloadUid": HTTPBIN_SICK.uid, "port": {"8000": 8080}, "status": "Unhealthy"}},
        "subjectAltNames": ["spiffe://cluster.local/ns/web/sa/httpbin"],
        "waypoint": {"destination": "web/waypoint.web.svc.cluster.local", "hboneMtlsPort": 15008},
        "canonical": False, "visibility": "Public"}
    allow, strict = sorted(dump["policies"], key=lambda p: p["name"])
    assert allow == {"name": "allow-sleep", "namespace": "web", "scope": "WorkloadSelector", "action": "Allow",
                     "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/sleep"}],
                                  "sourceIps": ["10.244.0.0/16"]}],
                                [{"destinationPorts": [8080]}]]],
                     "dryRun": False}
    assert (strict["scope"], strict["action"]) == ("Global", "Deny")
    assert strict["rules"] == [[[{"serviceAccounts": [{"namespace": "web", "serviceAccount": "httpbin"}],
                                  "notPrincipals": [{"Presence": []}]}]]]
    assert dump["config"] == {"nodeName": "node-1", "clusterId": "Kubernetes"}
    assert dump["version"]["version"] and dump["version"]["pythonVersion"]
    assert dump["workloadState"][HTTPBIN.uid] == {
        "state": "Up",
        "connections": {"inbound": [{"src": "10.244.1.5:40936", "originalDst": None, "actualDst": "10.244.2.4:8080",
                                     "protocol": "HBONE",
                                     "srcIdentity": "spiffe://cluster.local/ns/default/sa/sleep"}],
                        "outbound": []},
        "info": {"name": "httpbin-5c6f", "namespace": "web", "serviceAccount": "httpbin"}}


async def test_config_dump_certificates(admin: tuple[AdminServer, list[str]]) -> None:
    dump = json.loads((await get(admin[0].port, "/config_dump"))[2])
    broken, sleep = dump["certificates"]  # sorted by identity
    assert broken == {"identity": str(BROKEN_ID), "state": "Unavailable: CA down", "certChain": [], "rootCerts": []}
    assert sleep["identity"] == "spiffe://cluster.local/ns/default/sa/sleep" and sleep["state"] == "Available"
    (leaf,), (root,) = sleep["certChain"], sleep["rootCerts"]
    assert base64.b64decode(leaf["pem"]).decode() == SLEEP_CERT.leaf_pem
    assert base64.b64decode(root["pem"]).decode() == SLEEP_CERT.root_pem
    parsed = x509.load_pem_x509_certificate(SLEEP_CERT.leaf_pem.encode())
    assert leaf["serialNumber"] == str(parsed.serial_number)
    assert leaf["validFrom"] == parsed.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert leaf["expirationTime"] == parsed.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_config_dump_failure_is_a_500_with_the_reason() -> None:
    class Broken(FakeState):
        def config(self) -> Mapping[str, Any]:
            raise RuntimeError("config not loaded")

    server = AdminServer(Broken(), lambda: None, (HOST, 0))
    await server.start()
    try:
        status, _, body = await get(server.port, "/config_dump")
    finally:
        await server.close()
    assert status == 500 and body == "config_dump failed: config not loaded\n"


# -- /logging, /quitquitquit, /healthz/ready ----------------------------------------------------------------
@pytest.fixture
def root_level() -> Iterator[None]:
    root, access = logging.getLogger(), logging.getLogger("access")
    before, access_before, overrides = root.level, access.level, dict(logs._overrides)
    root.setLevel(logging.INFO)
    yield
    root.setLevel(before)
    access.setLevel(access_before)
    logs._overrides.clear()
    logs._overrides.update(overrides)


async def test_logging_reports_and_changes_the_level(admin: tuple[AdminServer, list[str]], root_level: None) -> None:
    port = admin[0].port
    assert await get(port, "/logging") == (200, "text/plain; charset=utf-8", "current log level is info\n")
    assert (await get(port, "/logging?level=debug"))[::2] == (200, "current log level is debug\n")
    assert logging.getLogger().level == logging.DEBUG
    assert (await get(port, "/logging?level=access=off", "POST"))[::2] == (
        200, "current log level is debug,access=off\n")
    status, _, body = await get(port, "/logging?level=loud")
    assert status == 400 and "invalid log level 'loud'" in body
    assert logging.getLogger().level == logging.DEBUG
    assert (await get(port, "/logging", "DELETE"))[0] == 405


async def test_quitquitquit_needs_post_and_calls_back(admin: tuple[AdminServer, list[str]]) -> None:
    server, quits = admin
    assert (await get(server.port, "/quitquitquit"))[0] == 405 and quits == []
    assert (await get(server.port, "/quitquitquit", "POST"))[::2] == (200, "shutdown now\n")
    assert quits == ["quit"]


async def test_admin_readiness_follows_the_readiness_object(admin: tuple[AdminServer, list[str]]) -> None:
    assert (await get(admin[0].port, "/healthz/ready"))[::2] == (500, "not ready, pending: xds\n")


async def test_readiness_server_200_and_500_texts() -> None:
    readiness = Readiness({"zds", "xds", "certificates"})
    server = ReadinessServer(readiness, (HOST, 0))
    await server.start()
    try:
        assert (await get(server.port, "/healthz/ready"))[::2] == (500, "not ready, pending: certificates, xds, zds\n")
        readiness.mark_ready("xds")
        readiness.mark_ready("certificates")
        assert (await get(server.port, "/healthz/ready"))[::2] == (500, "not ready, pending: zds\n")
        readiness.mark_ready("zds")
        assert (await get(server.port, "/healthz/ready"))[::2] == (200, "ready\n")
        readiness.mark_pending("xds")  # e.g. the control plane went away
        assert (await get(server.port, "/healthz/ready"))[0] == 500
    finally:
        await server.close()


async def test_metrics_server_serves_the_rendered_text_on_both_paths() -> None:
    renders: list[int] = []

    def render() -> bytes:
        renders.append(1)
        return b"# HELP up_total x\n# TYPE up_total counter\nup_total 1\n"

    server = MetricsServer(render, (HOST, 0))
    await server.start()
    try:
        for path in ("/metrics", "/stats/prometheus"):
            status, content_type, body = await get(server.port, path)
            assert status == 200 and body.endswith("up_total 1\n")
            assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    finally:
        await server.close()
    assert len(renders) == 2  # rendered on demand, per scrape


async def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ReadinessServer(Readiness(), (HOST, port))
        with pytest.raises(ConfigError, match=f"cannot listen on {HOST}:{port} for the readiness server"):
            await server.start()
