"""ztunnel in the local cluster end to end (issue 5): Bookinfo in the mesh across two nodes with the
callers' SPIFFE identities, mutual-TLS metrics and only TLS on the node link; PERMISSIVE vs STRICT; L4
AuthorizationPolicies (deny-all, by principal, by source namespace, by port, closing open connections);
passthrough and fail-fast outbound; a killed ztunnel recovering without restarting pods."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns.conftest import AMBIENTCTL, REPO, Cluster, eventually

NODE_IPS = {"node-1": "172.30.0.11", "node-2": "172.30.0.12"}
NODE_LINKS = ("amb-n1", "amb-n2")  # the host side of each node's veth: every cross-node packet passes one
TRUST_DOMAIN = "cluster.local"
PRODUCTPAGE_ID = f"spiffe://{TRUST_DOMAIN}/ns/bookinfo/sa/bookinfo-productpage"
PRODUCTPAGE_PRINCIPAL = PRODUCTPAGE_ID.removeprefix("spiffe://")
PAGE = "http://productpage.bookinfo:9080/productpage"
DETAILS = "http://details.bookinfo:9080/details/0"
RATINGS = "http://ratings.bookinfo:9080/ratings/0"
REDIRECTION = "ambient.istio.io/redirection"

# A TCP client for tcp-echo, run inside a pod: "once" prints one echo; "hold" keeps the connection open,
# pinging every 0.2 s, and prints "closed: ..." when the peer closes it (exit 0) or "still open" after 60 s.
ECHO_CLIENT = """
import socket, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=5)
deadline = time.monotonic() + 60
try:
    while time.monotonic() < deadline:
        s.sendall(b"ping\\n")
        data = s.recv(100)
        if not data:
            print("closed: eof", flush=True)
            sys.exit(0)
        print(data.decode().strip(), flush=True)
        if mode == "once":
            sys.exit(0)
        time.sleep(0.2)
    print("still open", flush=True)
    sys.exit(3)
except OSError as exc:
    print(f"closed: {exc}", flush=True)
"""


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(cluster: Cluster) -> Cluster:
    """Bookinfo labelled ambient, every pod enrolled, plus tcp-echo in `bookinfo` (meshed) and `default`."""
    echo = list(yaml.safe_load_all((REPO / "samples/tcp_echo/tcp-echo.yaml").read_text()))
    meshed_echo = [{**doc, "metadata": {**doc["metadata"], "namespace": "bookinfo"}} for doc in echo]
    cluster.ctl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                       "items": [*echo, *meshed_echo]}))
    cluster.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")
    cluster.ctl("wait", "--for=condition=ready", "pod", "-l", "app=tcp-echo", "-n", "bookinfo", "--timeout=60s")
    cluster.ctl("wait", "--for=condition=ready", "pod", "-l", "app=tcp-echo", "--timeout=60s")
    eventually(lambda: all(annotation(p) == "enabled" for p in cluster.pods("bookinfo")), timeout=30,
               what="every bookinfo pod annotated redirection=enabled")
    eventually(lambda: "Book Details" in curl(cluster, "deploy/sleep", PAGE).stdout, timeout=30,
               what="the product page through the mesh")
    return cluster


# -- helpers --------------------------------------------------------------------------------------------
def annotation(pod: dict[str, Any]) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get(REDIRECTION)


def curl(cluster: Cluster, target: str, *args: str, namespace: str = "default", max_time: float = 5
         ) -> subprocess.CompletedProcess[str]:
    """curl inside a pod; never raises on curl's failures (look at returncode)."""
    return cluster.exec(target, "curl", "-sS", "--max-time", str(max_time), *args, namespace=namespace, check=False)


def pod_of(cluster: Cluster, namespace: str, app: str, version: str | None = None) -> dict[str, Any]:
    selector = f"app={app}" + (f",version={version}" if version else "")
    return cluster.pods(namespace, selector)[0]


def workload_name(pod: dict[str, Any]) -> str:
    """The workload label ztunnel reports: the Deployment's name (the pod name without the two suffixes)."""
    return str(pod["metadata"]["name"].rsplit("-", 2)[0])


def spiffe(pod: dict[str, Any]) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{pod['metadata']['namespace']}/sa/{pod['spec']['serviceAccountName']}"


def ztunnel_log(cluster: Cluster, node: str) -> str:
    return (cluster.state_dir / "logs" / f"ztunnel-{node}.log").read_text(errors="replace")


FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)')


def access_lines(cluster: Cluster, node: str) -> list[dict[str, str]]:
    """The node's ztunnel access log lines as {field: value} (quotes removed)."""
    return [{k: v.strip('"') for k, v in FIELD.findall(line)}
            for line in ztunnel_log(cluster, node).splitlines() if "\taccess\t" in line]


METRIC = re.compile(r"^(\w+)\{(.*)\} (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def tcp_metrics(node: str, name: str = "istio_tcp_connections_opened_total") -> list[dict[str, str]]:
    text = urllib.request.urlopen(f"http://{NODE_IPS[node]}:15020/metrics", timeout=5).read().decode()
    return [dict(LABEL.findall(labels)) for metric, labels, _ in METRIC.findall(text) if metric == name]


def apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    cluster.ctl("apply", "-f", "-", stdin=json.dumps(obj))


def delete(cluster: Cluster, kind: str, name: str, namespace: str) -> None:
    cluster.ctl("delete", kind, name, "-n", namespace, "--ignore-not-found", check=False)


def authorization_policy(name: str, spec: dict[str, Any], namespace: str = "bookinfo") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def works(result: subprocess.CompletedProcess[str], marker: str) -> bool:
    return result.returncode == 0 and marker in result.stdout


def refused(result: subprocess.CompletedProcess[str]) -> bool:
    """ztunnel refuses by closing: curl sees an empty reply (52) or a reset (56), not a timeout (28)."""
    return result.returncode in (52, 56)


def sandbox_pids(cluster: Cluster, pod: dict[str, Any]) -> list[int]:
    uid, node = pod["metadata"]["uid"], pod["spec"]["nodeName"]
    record = next(cluster.state_dir.glob(f"nodes/{node}/pods/*_{uid}/sandbox.json"))
    return sorted(pid for pid, _ in json.loads(record.read_text())["pids"].values())


def ztunnel_pid(cluster: Cluster, node: str) -> int:
    return int(json.loads((cluster.state_dir / "pids" / f"ztunnel-{node}.json").read_text())["pid"])


def ready(node: str) -> bool:
    try:
        return bool(urllib.request.urlopen(f"http://{NODE_IPS[node]}:15021/healthz/ready", timeout=2).status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass(frozen=True)
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


class LinkCapture:
    """What crosses the node links, read with AF_PACKET sockets on the host side of each node's veth (the
    tcpdump of the issue, without needing tcpdump installed): IPv4 TCP segments only."""

    ETH_P_ALL = 0x0003

    def __init__(self, links: tuple[str, ...]) -> None:
        self.segments: list[Segment] = []
        self._stop = threading.Event()
        self._sockets = []
        for link in links:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.ETH_P_ALL))
            sock.bind((link, 0))
            sock.settimeout(0.1)
            self._sockets.append(sock)
        self._threads = [threading.Thread(target=self._read, args=(s,), daemon=True) for s in self._sockets]

    def __enter__(self) -> LinkCapture:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        for sock in self._sockets:
            sock.close()

    def _read(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if segment := self.parse(frame):
                self.segments.append(segment)

    @staticmethod
    def parse(frame: bytes) -> Segment | None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != socket.IPPROTO_TCP:
            return None
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0] or len(ip)
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            return None
        sport, dport = struct.unpack("!HH", tcp[:4])
        offset = (tcp[12] >> 4) * 4
        return Segment(socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport, bytes(tcp[offset:]))


@dataclass
class EchoHolder:
    """The ECHO_CLIENT in "hold" mode inside a pod, as a process this test owns."""

    process: subprocess.Popen[str]
    output: Path

    def text(self) -> str:
        return self.output.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def hold_echo_connection(cluster: Cluster, target: str, namespace: str, host: str, output: Path) -> EchoHolder:
    env = {**os.environ, "AMBIENT_STATE_DIR": str(cluster.state_dir)}
    env.pop("KUBECONFIG", None)
    with output.open("w") as out:
        process = subprocess.Popen(
            [*AMBIENTCTL, "exec", "-n", namespace, target, "--", "python3", "-c", ECHO_CLIENT, host, "9000", "hold"],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True)
    return EchoHolder(process, output)


# -- 1. Bookinfo in the mesh ----------------------------------------------------------------------------
def test_bookinfo_works_through_the_mesh_across_and_within_nodes(mesh: Cluster) -> None:
    pods = {workload_name(p): p for p in mesh.pods("bookinfo")}
    node = {name: p["spec"]["nodeName"] for name, p in pods.items()}
    assert set(node.values()) == {"node-1", "node-2"}, f"bookinfo must span both nodes: {node}"
    calls = {("productpage-v1", "details-v1"), *(("productpage-v1", f"reviews-v{v}") for v in (1, 2, 3)),
             ("reviews-v2", "ratings-v1"), ("reviews-v3", "ratings-v1")}
    same_node_possible = any(node[a] == node[b] for a, b in calls)
    served_by: set[str] = set()
    starred = 0

    def observed_pairs() -> set[tuple[str, str]]:
        return {(m["source_workload"], m["destination_workload"]) for n in NODE_IPS for m in tcp_metrics(n)
                if m["reporter"] == "destination" and m["connection_security_policy"] == "mutual_tls"
                and m["destination_workload_namespace"] == "bookinfo"}

    def spread() -> bool:
        # Parallel requests make productpage open several connections to reviews, each balanced by ztunnel.
        nonlocal starred
        result = curl(mesh, "deploy/sleep", "-Z", "--parallel-max", "8", *[PAGE] * 8, max_time=10)
        assert result.returncode == 0, result.stderr
        pages = result.stdout.split("</html>")[:-1]
        assert len(pages) == 8 and all("Book Details" in p and 'id="reviews-pod"' in p for p in pages), result.stdout
        assert "currently unavailable" not in result.stdout and 'class="rating error"' not in result.stdout
        served_by.update(re.findall(r'id="reviews-pod">([^<]+)<', result.stdout))
        starred += sum("★" in p for p in pages)
        pairs = observed_pairs() & calls
        cross = {(a, b) for a, b in pairs if node[a] != node[b]}
        return bool(starred and cross and (not same_node_possible or pairs - cross))

    # Up to a minute: productpage pools its connections, so new pairs appear only as it opens new ones.
    eventually(spread, timeout=60, interval=0, what="v2/v3 stars and both cross-node and same-node calls")
    assert served_by <= {p["metadata"]["name"] for p in pods.values()}
    assert served_by & {pods["reviews-v2"]["metadata"]["name"], pods["reviews-v3"]["metadata"]["name"]}


def test_destination_sees_the_callers_identity_and_both_reporters_count_mutual_tls(mesh: Cluster) -> None:
    productpage, details = pod_of(mesh, "bookinfo", "productpage"), pod_of(mesh, "bookinfo", "details")
    src_node, dst_node = productpage["spec"]["nodeName"], details["spec"]["nodeName"]
    details_ip = details["status"]["podIP"]
    result = curl(mesh, "deploy/productpage-v1", DETAILS, namespace="bookinfo")
    assert works(result, "ISBN-10"), result.stderr
    # The access log of the receiving ztunnel names the caller's SPIFFE identity ...
    inbound = eventually(lambda: [line for line in access_lines(mesh, dst_node) if line.get("direction") == "inbound"
                                  and line.get("dst.workload") == "details-v1"
                                  and line.get("src.identity") == PRODUCTPAGE_ID], timeout=10,
                         what="details' ztunnel to log the inbound connection with productpage's identity")
    assert inbound[-1]["dst.identity"] == spiffe(details)
    # ... and the caller's ztunnel tunnelled it over HBONE to the pod's 15008.
    outbound = eventually(lambda: [line for line in access_lines(mesh, src_node) if line.get("direction") == "outbound"
                                   and line.get("dst.hbone_addr") == f"{details_ip}:9080"], timeout=10,
                          what="productpage's ztunnel to log the outbound HBONE connection")
    assert outbound[-1]["dst.addr"] == f"{details_ip}:15008"
    assert outbound[-1]["src.identity"] == PRODUCTPAGE_ID and outbound[-1]["dst.identity"] == spiffe(details)

    # Open connections (productpage keeps its upstream connections alive) show the identity too.
    def connections_with_identity() -> list[dict[str, Any]]:
        curl(mesh, "deploy/sleep", PAGE)
        dump = json.loads(mesh.ctl("ztunnel-config", "connections", "--node", dst_node, "-n", "bookinfo",
                                   "-o", "json").stdout)
        return [c for state in dump.values() if state["info"]["name"] == details["metadata"]["name"]
                for c in state["connections"]["inbound"] if c.get("srcIdentity") == PRODUCTPAGE_ID]

    eventually(connections_with_identity, timeout=15, what="`ztunnel-config connections` to show productpage's id")

    expected = {"source_workload": "productpage-v1", "source_workload_namespace": "bookinfo",
                "source_principal": PRODUCTPAGE_ID, "destination_workload": "details-v1",
                "destination_workload_namespace": "bookinfo", "destination_principal": spiffe(details),
                "connection_security_policy": "mutual_tls"}

    def reported(node: str, reporter: str) -> list[dict[str, str]]:
        return [m for m in tcp_metrics(node) if m["reporter"] == reporter
                and all(m.get(k) == v for k, v in expected.items())]

    source = reported(src_node, "source")
    assert source, f"no reporter=source mutual_tls series productpage→details on {src_node}"
    assert source[0]["destination_service"] == "details.bookinfo.svc.cluster.local"
    assert reported(dst_node, "destination"), f"no reporter=destination mutual_tls series on {dst_node}"


def test_node_link_carries_only_tls_on_15008(mesh: Cluster) -> None:
    details = pod_of(mesh, "bookinfo", "details")
    caller = next(p for p in mesh.pods("bookinfo") if p["spec"]["nodeName"] != details["spec"]["nodeName"])
    caller_ip, details_ip = caller["status"]["podIP"], details["status"]["podIP"]
    with LinkCapture(NODE_LINKS) as capture:
        for _ in range(3):
            result = curl(mesh, caller["metadata"]["name"], DETAILS, namespace="bookinfo")
            assert works(result, "ISBN-10"), result.stderr  # plaintext HTTP at both ends ...
        # ... so wait for the response bytes to be seen on the link before judging what they looked like.
        eventually(lambda: any(s.payload for s in capture.segments if s.src == details_ip and s.dst == caller_ip),
                   timeout=5, what="the response segments on the node link")
    between = [s for s in capture.segments if {s.src, s.dst} == {caller_ip, details_ip}]
    assert between, f"nothing between {caller_ip} and {details_ip} crossed {NODE_LINKS}"
    assert all(15008 in (s.sport, s.dport) for s in between), \
        {(s.sport, s.dport) for s in between if 15008 not in (s.sport, s.dport)}
    data = b"".join(s.payload for s in between)
    assert b"HTTP/1.1" not in data and b"ISBN-10" not in data and b"GET /details" not in data
    assert any(s.payload[:3] in (b"\x17\x03\x03", b"\x16\x03\x01", b"\x16\x03\x03") for s in between), \
        "expected TLS records on 15008"


# -- 2. PERMISSIVE and STRICT ---------------------------------------------------------------------------
def test_plaintext_from_outside_the_mesh_is_accepted_until_strict_mtls(mesh: Cluster) -> None:
    productpage = pod_of(mesh, "bookinfo", "productpage")
    assert works(curl(mesh, "deploy/sleep", PAGE), "Book Details"), "PERMISSIVE by default: plaintext is accepted"
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}}
    apply(mesh, strict)
    try:
        def refused_plaintext() -> subprocess.CompletedProcess[str] | None:
            result = curl(mesh, "deploy/sleep", PAGE)
            return result if refused(result) else None

        denied = eventually(refused_plaintext, timeout=15, what="plaintext to productpage refused under STRICT")
        assert "Empty reply" in denied.stderr or "reset" in denied.stderr
        # Mutual TLS from inside the mesh is unaffected.
        assert works(curl(mesh, "deploy/productpage-v1", DETAILS, namespace="bookinfo"), "ISBN-10")
        eventually(lambda: "explicitly denied by: istio-system/istio_converted_static_strict"
                   in ztunnel_log(mesh, productpage["spec"]["nodeName"]), timeout=5, what="the STRICT denial logged")
    finally:
        delete(mesh, "peerauthentications", "default", "istio-system")
    eventually(lambda: works(curl(mesh, "deploy/sleep", PAGE), "Book Details"), timeout=15,
               what="plaintext accepted again without the PeerAuthentication")


# -- 3. L4 AuthorizationPolicy --------------------------------------------------------------------------
def test_allow_nothing_policy_denies_every_connection_into_the_namespace(mesh: Cluster) -> None:
    details = pod_of(mesh, "bookinfo", "details")
    apply(mesh, authorization_policy("allow-nothing", {}))  # Istio's allow-nothing: an ALLOW matching nothing
    try:
        eventually(lambda: refused(curl(mesh, "deploy/productpage-v1", DETAILS, namespace="bookinfo")), timeout=15,
                   what="mTLS from productpage to details refused")
        assert refused(curl(mesh, "deploy/sleep", PAGE)), "plaintext from outside refused too"
        assert "allow policies exist, but none allowed" in ztunnel_log(mesh, details["spec"]["nodeName"])
    finally:
        delete(mesh, "authorizationpolicies", "allow-nothing", "bookinfo")
    eventually(lambda: works(curl(mesh, "deploy/sleep", PAGE), "Book Details"), timeout=15,
               what="traffic allowed again")


def test_allow_by_principal_admits_only_that_caller(mesh: Cluster) -> None:
    policy = authorization_policy("details-from-productpage", {
        "selector": {"matchLabels": {"app": "details"}}, "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": [PRODUCTPAGE_PRINCIPAL]}}]}]})
    apply(mesh, policy)
    try:
        eventually(lambda: refused(curl(mesh, "deploy/sleep", DETAILS)), timeout=15,
                   what="plaintext from sleep to details refused (no principal)")
        assert works(curl(mesh, "deploy/productpage-v1", DETAILS, namespace="bookinfo"), "ISBN-10")
        assert refused(curl(mesh, "deploy/reviews-v1", DETAILS, namespace="bookinfo")), "another principal"
        page = curl(mesh, "deploy/sleep", PAGE)
        assert works(page, "Book Details") and "currently unavailable" not in page.stdout
    finally:
        delete(mesh, "authorizationpolicies", "details-from-productpage", "bookinfo")
    eventually(lambda: works(curl(mesh, "deploy/sleep", DETAILS), "ISBN-10"), timeout=15, what="details open again")


def test_deny_by_source_namespace_is_logged_with_the_policy_name(mesh: Cluster) -> None:
    ratings = pod_of(mesh, "bookinfo", "ratings")
    apply(mesh, authorization_policy("ratings-deny-bookinfo", {
        "selector": {"matchLabels": {"app": "ratings"}}, "action": "DENY",
        "rules": [{"from": [{"source": {"namespaces": ["bookinfo"]}}]}]}))
    try:
        eventually(lambda: refused(curl(mesh, "deploy/reviews-v2", RATINGS, namespace="bookinfo")), timeout=15,
                   what="reviews (namespace bookinfo) refused by ratings")
        eventually(lambda: "explicitly denied by: bookinfo/ratings-deny-bookinfo"
                   in ztunnel_log(mesh, ratings["spec"]["nodeName"]), timeout=5, what="the denial naming the policy")
        # The source namespace comes from the mTLS identity: plaintext has none, so it does not match.
        assert works(curl(mesh, "deploy/sleep", RATINGS), "ratings")
    finally:
        delete(mesh, "authorizationpolicies", "ratings-deny-bookinfo", "bookinfo")
    eventually(lambda: works(curl(mesh, "deploy/reviews-v2", RATINGS, namespace="bookinfo"), "ratings"),
               timeout=15, what="ratings open again")


def test_port_rules_match_the_destination_port(mesh: Cluster) -> None:
    def deny_port(port: str) -> dict[str, Any]:
        return authorization_policy("ratings-deny-port", {
            "selector": {"matchLabels": {"app": "ratings"}}, "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": [port]}}]}]})

    apply(mesh, deny_port("9080"))
    try:
        eventually(lambda: refused(curl(mesh, "deploy/reviews-v2", RATINGS, namespace="bookinfo")), timeout=15,
                   what="port 9080 denied")
        apply(mesh, deny_port("9999"))
        eventually(lambda: works(curl(mesh, "deploy/reviews-v2", RATINGS, namespace="bookinfo"), "ratings"),
                   timeout=15, what="port 9080 allowed once the rule names another port")
    finally:
        delete(mesh, "authorizationpolicies", "ratings-deny-port", "bookinfo")


def test_policy_applied_while_a_connection_is_open_closes_it(mesh: Cluster, tmp_path: Path) -> None:
    echo = pod_of(mesh, "bookinfo", "tcp-echo")
    holder = hold_echo_connection(mesh, "deploy/productpage-v1", "bookinfo", "tcp-echo.bookinfo", tmp_path / "out")
    try:
        eventually(lambda: "hello ping" in holder.text(), timeout=15, what="the echo connection established")
        apply(mesh, authorization_policy("echo-deny-productpage", {
            "selector": {"matchLabels": {"app": "tcp-echo"}}, "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [PRODUCTPAGE_PRINCIPAL]}}]}]}))
        eventually(lambda: holder.process.poll() is not None, timeout=15,
                   what=f"the open connection closed by the new DENY; client said {holder.text()[-200:]!r}")
        assert "closed" in holder.text().splitlines()[-1]
        assert "explicitly denied by: bookinfo/echo-deny-productpage" in ztunnel_log(mesh, echo["spec"]["nodeName"])
    finally:
        holder.stop()
        delete(mesh, "authorizationpolicies", "echo-deny-productpage", "bookinfo")


# -- 4. Outbound outside the mesh -----------------------------------------------------------------------
def test_outbound_to_destinations_outside_the_mesh_passes_through(mesh: Cluster) -> None:
    productpage = pod_of(mesh, "bookinfo", "productpage")
    echo_ip = pod_of(mesh, "default", "tcp-echo")["status"]["podIP"]
    # A pod in a namespace outside the mesh: plain TCP to it.
    result = mesh.exec("deploy/productpage-v1", "python3", "-c", ECHO_CLIENT, "tcp-echo.default", "9000", "once",
                       namespace="bookinfo")
    assert result.stdout.strip() == "hello ping"
    # An address no one in the mesh knows (ambient-control's readiness on the host): passthrough.
    assert curl(mesh, "deploy/productpage-v1", "-o", "/dev/null", "-w", "%{http_code}", "http://172.30.0.1:15014/ready",
                namespace="bookinfo").stdout == "200"

    def plain_tcp_destinations() -> set[str]:
        return {line.get("dst.addr", "") for line in access_lines(mesh, productpage["spec"]["nodeName"])
                if line.get("direction") == "outbound" and line.get("src.workload", "").startswith("productpage")
                and "dst.hbone_addr" not in line and "error" not in line}

    # ztunnel logs the address it dialled: the tcp-echo pod behind the VIP, and the host address as is.
    eventually(lambda: {f"{echo_ip}:9000", "172.30.0.1:15014"} <= plain_tcp_destinations(), timeout=10,
               what="both plain TCP connections in the source ztunnel's access log")


def test_service_without_endpoints_fails_fast(mesh: Cluster) -> None:
    productpage = pod_of(mesh, "bookinfo", "productpage")
    apply(mesh, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nothing", "namespace": "bookinfo"},
                 "spec": {"selector": {"app": "nothing"}, "ports": [{"name": "http", "port": 80}]}})
    try:
        eventually(lambda: "nothing.bookinfo.svc.cluster.local" in mesh.ctl(
            "ztunnel-config", "services", "--node", productpage["spec"]["nodeName"], "-o", "json").stdout,
            timeout=15, what="ztunnel to know the service")
        result = curl(mesh, "deploy/productpage-v1", "-o", "/dev/null", "-w", "%{time_total}",
                      "http://nothing.bookinfo/", namespace="bookinfo")
        assert result.returncode in (7, 52, 56), f"curl exit {result.returncode}: {result.stderr}"
        assert float(result.stdout) < 1.0, f"took {result.stdout}s"
        eventually(lambda: "no healthy upstream" in ztunnel_log(mesh, productpage["spec"]["nodeName"]), timeout=5,
                   what="the failure logged as no healthy upstream")
    finally:
        delete(mesh, "service", "nothing", "bookinfo")


# -- 5. ztunnel restart ---------------------------------------------------------------------------------
def test_killed_ztunnels_come_back_and_pods_regain_connectivity_without_restarting(mesh: Cluster) -> None:
    pods = mesh.pods("bookinfo")
    before = {p["metadata"]["uid"]: sandbox_pids(mesh, p) for p in pods}
    old = {node: ztunnel_pid(mesh, node) for node in NODE_IPS}
    killed = time.monotonic()
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    eventually(lambda: all(ztunnel_pid(mesh, n) != old[n] and ready(n) for n in NODE_IPS), timeout=20,
               what="both ztunnels restarted by the supervisor and ready")

    def meshed_traffic_flows() -> bool:
        return (works(curl(mesh, "deploy/productpage-v1", DETAILS, namespace="bookinfo"), "ISBN-10")
                and works(curl(mesh, "deploy/reviews-v2", RATINGS, namespace="bookinfo"), "ratings")
                and works(curl(mesh, "deploy/sleep", PAGE), "Book Details"))

    eventually(meshed_traffic_flows, timeout=20, what="traffic through the new ztunnels")
    assert time.monotonic() - killed < 30
    after = mesh.pods("bookinfo")
    assert {p["metadata"]["uid"]: sandbox_pids(mesh, p) for p in after} == before, "pods must not restart"
    assert all(c["restartCount"] == 0 for p in after for c in p["status"]["containerStatuses"])


def test_workload_manager_gauges_count_the_pods_each_ztunnel_proxies(mesh: Cluster) -> None:
    for node, ip in NODE_IPS.items():
        enrolled = [p for p in mesh.pods("bookinfo") if p["spec"]["nodeName"] == node]
        text = urllib.request.urlopen(f"http://{ip}:15020/metrics", timeout=5).read().decode()
        active = re.search(r"^workload_manager_active_proxy_count (\S+)$", text, re.M)
        started = re.search(r"^workload_manager_proxies_started_total (\S+)$", text, re.M)
        assert active and float(active.group(1)) >= len(enrolled), (node, active)
        assert started and float(started.group(1)) >= len(enrolled), (node, started)
