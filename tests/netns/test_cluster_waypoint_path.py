"""ztunnel in the local cluster: a service bound to a waypoint is reached through the waypoint, over HBONE
with the caller's identity (the waypoint's access log names the caller and the service VIP it was sent to);
unbound, it is reached directly again."""

from __future__ import annotations

import json
import subprocess

from tests.netns.conftest import Cluster, eventually

PAGE = "http://productpage.bookinfo:9080/productpage"
PRODUCTPAGE_ID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
GATEWAY = "gateways.gateway.networking.k8s.io"
WAYPOINT = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "bookinfo"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}



def pages(cluster: Cluster, count: int = 8) -> subprocess.CompletedProcess[str]:
    """`count` product pages fetched in parallel: productpage keeps its connections to reviews alive (aiohttp
    pools them), so parallel requests make it open new ones, which ztunnel routes as it is configured now."""
    return cluster.exec("deploy/sleep", "curl", "-sS", "--max-time", "10", "-Z", "--parallel-max", str(count),
                        *[PAGE] * count, check=False)


def render_reviews(result: subprocess.CompletedProcess[str], count: int = 8) -> bool:
    rendered = result.stdout.split("</html>")[:-1]
    return (result.returncode == 0 and len(rendered) == count
            and all('id="reviews-pod"' in p and "currently unavailable" not in p for p in rendered))


def waypoint_log(cluster: Cluster) -> str:
    return cluster.ctl("logs", "-n", "bookinfo", "deploy/waypoint", check=False).stdout


def through_waypoint(cluster: Cluster, vip: str) -> int:
    """Requests the waypoint logged for `vip:9080` from productpage's identity."""
    return sum(1 for line in waypoint_log(cluster).splitlines()
               if f"downstream_local_address={vip}:9080" in line and f'src.identity="{PRODUCTPAGE_ID}"' in line)


def ztunnel_sees_waypoint(cluster: Cluster, node: str) -> bool:
    services = json.loads(cluster.ctl("ztunnel-config", "services", "--node", node, "-n", "bookinfo",
                                      "-o", "json").stdout)
    return any(s["name"] == "reviews" and s.get("waypoint") for s in services)


def test_waypoint_bound_service_goes_through_the_waypoint(cluster: Cluster) -> None:
    cluster.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")
    eventually(lambda: all((p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection") == "enabled"
                           for p in cluster.pods("bookinfo")), timeout=30, what="bookinfo enrolled")
    eventually(lambda: render_reviews(pages(cluster, 1), 1), timeout=30, what="the product page through the mesh")
    cluster.ctl("apply", "-f", "-", stdin=json.dumps(WAYPOINT))
    try:
        def programmed() -> bool:
            gw = cluster.json("get", GATEWAY, "waypoint", "-n", "bookinfo")
            return any(c["type"] == "Programmed" and c["status"] == "True"
                       for c in (gw.get("status") or {}).get("conditions", []))

        eventually(programmed, timeout=60, what="the waypoint Gateway to be Programmed")
        vip = cluster.json("get", "svc", "reviews", "-n", "bookinfo")["spec"]["clusterIP"]
        assert through_waypoint(cluster, vip) == 0
        cluster.ctl("label", "service", "reviews", "-n", "bookinfo", "istio.io/use-waypoint=waypoint")
        eventually(lambda: all(ztunnel_sees_waypoint(cluster, node) for node in ("node-1", "node-2")), timeout=30,
                   interval=0.5, what="every ztunnel to see reviews bound to the waypoint")
        # Once ztunnel has the binding, productpage's new connections to reviews are CONNECTs to the waypoint
        # carrying productpage's identity, and the pages still show the reviews.
        eventually(lambda: render_reviews(pages(cluster)) and through_waypoint(cluster, vip) > 0, timeout=30,
                   interval=0.5, what="rendered pages and productpage's requests in the waypoint's access log")

        # Unbound, reviews is reached directly. Once every ztunnel has dropped the binding, a new productpage
        # pod (fresh connections) gets its pages without a single CONNECT to the waypoint.
        cluster.ctl("label", "service", "reviews", "-n", "bookinfo", "istio.io/use-waypoint-")
        eventually(lambda: not any(ztunnel_sees_waypoint(cluster, node) for node in ("node-1", "node-2")), timeout=30,
                   interval=0.5, what="every ztunnel to see reviews without a waypoint")
        before = through_waypoint(cluster, vip)
        old = cluster.pods("bookinfo", "app=productpage")[0]["metadata"]["name"]
        cluster.ctl("delete", "pod", old, "-n", "bookinfo")
        eventually(lambda: any(p["metadata"]["name"] != old and (p["metadata"].get("annotations") or {}).get(
            "ambient.istio.io/redirection") == "enabled" for p in cluster.pods("bookinfo", "app=productpage")),
            timeout=60, what="a new productpage pod enrolled")
        eventually(lambda: render_reviews(pages(cluster)), timeout=30, interval=0.5,
                   what="pages with reviews reached directly after unbinding")
        assert through_waypoint(cluster, vip) == before, "reviews still reached through the waypoint"
    finally:
        cluster.ctl("label", "service", "reviews", "-n", "bookinfo", "istio.io/use-waypoint-", check=False)
        cluster.ctl("delete", GATEWAY, "waypoint", "-n", "bookinfo", "--ignore-not-found", check=False)
