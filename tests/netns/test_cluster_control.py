"""The control plane in the local cluster end to end (issue 4): what ambient-control serves over delta
xDS for Bookinfo, a real TLS xDS client and CA client authenticated as node-1's ztunnel, and a waypoint
Gateway turned into a deployed waypoint bound to services."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from ambient.identity.ca_client import CaClient, CaClientConfig
from ambient.identity.errors import CaError
from ambient.identity.spiffe import SpiffeId
from ambient.xds.client import ClientConfig, XdsClient
from ambient.xds.store import WorkloadStore
from ambient.xds.types import ztunnel_node_id
from tests.netns.conftest import Cluster, eventually

CONTROL = "172.30.0.1"


def xds_dump() -> dict[str, Any]:
    return dict(json.loads(urllib.request.urlopen(f"http://{CONTROL}:15014/debug/xds", timeout=5).read()))


@pytest.fixture(scope="module")
def enrolled(cluster: Cluster) -> Cluster:
    cluster.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")
    eventually(lambda: all((p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection") == "enabled"
                           for p in cluster.pods("bookinfo")), timeout=30, what="bookinfo enrolled")
    return cluster


def bookinfo_workloads(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: a["workload"] for name, a in dump["addresses"].items()
            if "workload" in a and a["workload"].get("namespace") == "bookinfo"}


def test_every_enrolled_workload_is_served_with_hbone_and_every_service_with_its_vip(enrolled: Cluster) -> None:
    pods = enrolled.pods("bookinfo")

    def all_hbone() -> bool:
        workloads = bookinfo_workloads(xds_dump())
        return len(workloads) == len(pods) and all(w.get("tunnel_protocol") == "HBONE" for w in workloads.values())

    eventually(all_hbone, timeout=20, what="every bookinfo workload with HBONE")
    dump = xds_dump()
    for pod in pods:
        workload = dump["addresses"][f"Kubernetes//Pod/bookinfo/{pod['metadata']['name']}"]["workload"]
        assert workload["addresses"] == [pod["status"]["podIP"]]
        assert workload["service_account"] == pod["spec"]["serviceAccountName"]
        assert workload["node"] == pod["spec"]["nodeName"]
    services = enrolled.json("get", "svc", "-n", "bookinfo")["items"]
    for svc in services:
        served = dump["addresses"][f"bookinfo/{svc['metadata']['name']}.bookinfo.svc.cluster.local"]["service"]
        assert [a["address"] for a in served["addresses"]] == [svc["spec"]["clusterIP"]]


def test_node_ztunnel_identity_gets_xds_over_tls_and_only_its_pods_certificates(enrolled: Cluster) -> None:
    state = enrolled.state_dir
    token = (state / "nodes" / "node-1" / "ztunnel" / "token").read_text().strip()
    root = (state / "pki" / "mesh-root.pem").read_bytes()

    async def scenario() -> None:
        store = WorkloadStore()
        client = XdsClient(ClientConfig(address=f"{CONTROL}:15012", node_id=ztunnel_node_id("172.30.0.11", "ztunnel",
                                                                                            "istio-system"),
                                        token=token, root_cert=root, server_name="istiod.istio-system.svc"), store)
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.ready.wait(), 15)
            snapshot = store.snapshot
            assert any(s.hostname == "productpage.bookinfo.svc.cluster.local" for s in snapshot.services.values())
            pod_ip = enrolled.pods("bookinfo", "app=ratings")[0]["status"]["podIP"]
            assert snapshot.workload_by_ip(pod_ip) is not None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        pods = enrolled.pods("bookinfo")
        on_node1 = {p["spec"]["serviceAccountName"] for p in pods if p["spec"]["nodeName"] == "node-1"}
        elsewhere = {p["spec"]["serviceAccountName"] for p in pods if p["spec"]["nodeName"] != "node-1"} - on_node1
        ca = CaClient(CaClientConfig(address=f"{CONTROL}:15012", root_pem=root.decode(), impersonate=True), token)
        try:
            allowed = SpiffeId("cluster.local", "bookinfo", sorted(on_node1)[0])
            cert = await ca.fetch_certificate(allowed)
            assert cert.identity == allowed
            if elsewhere:
                with pytest.raises(CaError) as denied:
                    await ca.fetch_certificate(SpiffeId("cluster.local", "bookinfo", sorted(elsewhere)[0]))
                assert denied.value.code == "PERMISSION_DENIED"
        finally:
            await ca.close()

    asyncio.run(scenario())


def test_waypoint_gateway_is_deployed_and_bound_to_services(enrolled: Cluster) -> None:
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "waypoint", "namespace": "bookinfo"},
               "spec": {"gatewayClassName": "istio-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}
    enrolled.ctl("apply", "-f", "-", stdin=json.dumps(gateway))

    def programmed() -> bool:
        gw = enrolled.json("get", "gateways.gateway.networking.k8s.io", "waypoint", "-n", "bookinfo")
        conditions = gw.get("status", {}).get("conditions", [])
        return any(c["type"] == "Programmed" and c["status"] == "True" for c in conditions)

    eventually(programmed, timeout=60, what="the waypoint Gateway to be Programmed")
    gw = enrolled.json("get", "gateways.gateway.networking.k8s.io", "waypoint", "-n", "bookinfo")
    assert gw["status"]["addresses"]
    waypoint_pod = enrolled.pods("bookinfo", "gateway.networking.k8s.io/gateway-name=waypoint")[0]
    assert waypoint_pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    enrolled.ctl("label", "namespace", "bookinfo", "istio.io/use-waypoint=waypoint")

    def bound() -> bool:
        service = xds_dump()["addresses"]["bookinfo/reviews.bookinfo.svc.cluster.local"]["service"]
        return bool(service.get("waypoint"))

    eventually(bound, timeout=20, what="reviews bound to the waypoint")
    waypoint = xds_dump()["addresses"]["bookinfo/reviews.bookinfo.svc.cluster.local"]["service"]["waypoint"]
    assert waypoint["hostname"] == {"namespace": "bookinfo", "hostname": "waypoint.bookinfo.svc.cluster.local"}
    assert waypoint["hbone_mtls_port"] == 15008
    enrolled.ctl("delete", "gateways.gateway.networking.k8s.io", "waypoint", "-n", "bookinfo")
    eventually(lambda: not enrolled.pods("bookinfo", "gateway.networking.k8s.io/gateway-name=waypoint"), timeout=60,
               what="waypoint pods gone with the Gateway")


def test_l7_policy_for_ztunnel_is_served_without_l7_rules_and_says_so_in_status(enrolled: Cluster) -> None:
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "get-only", "namespace": "bookinfo"},
              "spec": {"selector": {"matchLabels": {"app": "ratings"}}, "action": "ALLOW",
                       "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}}
    enrolled.ctl("apply", "-f", "-", stdin=json.dumps(policy))

    def condition() -> dict[str, Any] | None:
        obj = enrolled.json("get", "authorizationpolicies", "get-only", "-n", "bookinfo")
        return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "ZtunnelAccepted"), None)

    accepted = eventually(condition, timeout=20, what="the ZtunnelAccepted condition")
    assert accepted["reason"] == "UnsupportedValue" and "methods" in accepted["message"]  # istiod: True + reason
    served = xds_dump()["authorizations"]["bookinfo/get-only"]
    # An ALLOW with only L7 parts allows nothing at L4 (the canonical form omits the default ALLOW).
    assert served.get("action", "ALLOW") == "ALLOW" and not served.get("rules")
    ratings = [w for w in bookinfo_workloads(xds_dump()).values() if w.get("canonical_name") == "ratings"]
    assert ratings and all("bookinfo/get-only" in w.get("authorization_policies", []) for w in ratings)
    enrolled.ctl("delete", "authorizationpolicies", "get-only", "-n", "bookinfo")


def test_the_mesh_root_is_published_in_every_namespace_and_repaired(enrolled: Cluster) -> None:
    """As istiod: ConfigMap istio-ca-root-cert (root-cert.pem) in each namespace, what ztunnel and waypoint pods
    mount on a real cluster; deleted or edited, it comes back."""
    from ambient.local.layout import StateDir

    root = StateDir(enrolled.state_dir).mesh_root_cert.read_text()

    def published(namespace: str) -> bool:
        proc = enrolled.ctl("get", "configmap", "istio-ca-root-cert", "-n", namespace, "-o", "json", check=False)
        return proc.returncode == 0 and json.loads(proc.stdout)["data"]["root-cert.pem"] == root

    for namespace in ("default", "bookinfo", "kube-system", "istio-system"):
        eventually(lambda ns=namespace: published(ns), timeout=20, what=f"istio-ca-root-cert in {namespace}")
    enrolled.ctl("apply", "-f", "-",
                 stdin='{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late-arrival"}}')
    eventually(lambda: published("late-arrival"), timeout=20, what="istio-ca-root-cert in a new namespace")
    enrolled.ctl("delete", "configmap", "istio-ca-root-cert", "-n", "bookinfo")
    eventually(lambda: published("bookinfo"), timeout=20, what="the deleted istio-ca-root-cert to come back")
    enrolled.ctl("delete", "namespace", "late-arrival")


def test_the_rendered_install_passes_the_running_api_servers_dry_run(enrolled: Cluster) -> None:
    """Every object `ambientctl install` renders is accepted by the local cluster's API server (server-side dry
    run: validated, defaulted, returned as it would be stored, nothing written) and reads back as rendered."""
    from ambient.cli.install import render
    from ambient.kube.client import KubeClient, KubeConfig
    from ambient.kube.errors import ApiError
    from ambient.local.layout import StateDir
    from tests.integration.kube_fixtures import contains

    async def check() -> list[str]:
        problems = []
        async with KubeClient(KubeConfig.load(str(StateDir(enrolled.state_dir).kubeconfig))) as client:
            for obj in render():
                meta = obj["metadata"]
                rt = await client.resource(obj["apiVersion"], obj["kind"])
                try:
                    await client.get(rt, meta["name"], meta.get("namespace"))
                except ApiError as exc:
                    assert exc.code == 404, exc
                    stored = await client.create(obj, dry_run=True)
                else:  # the local cluster made it already (the istio-system namespace): a dry-run patch
                    stored = await client.patch(rt, meta["name"], obj, meta.get("namespace"), dry_run=True)
                if not contains(stored, obj):
                    problems.append(f"{obj['kind']}/{meta['name']}")
                if obj["kind"] != "Namespace":
                    with pytest.raises(ApiError) as gone:
                        await client.get(rt, meta["name"], meta.get("namespace"))
                    assert gone.value.code == 404, "a dry run wrote the object"
        return problems

    assert asyncio.run(check()) == []
