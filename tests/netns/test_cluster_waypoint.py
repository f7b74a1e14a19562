"""The waypoint end to end (issue 6): Bookinfo in the mesh on the local cluster, one waypoint for the
namespace, and each step of Istio's ambient and traffic-management tasks applied from the sample files
(samples/bookinfo/networking/, samples/httpbin/httpbin-resilience.yaml) and measured from inside the mesh:
who answered, with what status, how long it took, what the waypoint's and ztunnel's metrics and the
workloads' logs say.

Requests come from productpage-v1 (or ratings-v1 as "another source"): `sleep` in `default` is not in the
mesh, so its requests bypass the waypoint. Each measurement is one `ambientctl exec` running `CLIENT` (an
aiohttp loop over keep-alive connections) inside the pod; the waypoint balances per request, so one
connection carries a whole split. Every test waits (by polling the waypoint's /config_dump) until the
waypoint runs what it applied, and deletes it afterwards.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns.conftest import REPO, Cluster, eventually

NS = "bookinfo"
NETWORKING = REPO / "samples/bookinfo/networking"
RESILIENCE = REPO / "samples/httpbin/httpbin-resilience.yaml"
TCP_ECHO = REPO / "samples/tcp_echo/tcp-echo.yaml"
SOURCE = "productpage-v1"
OTHER_SOURCE = "ratings-v1"
REVIEWS = "http://reviews:9080/reviews/0"
DETAILS = "http://details:9080/details/0"
RATINGS = "http://ratings:9080/ratings/0"
PAGE = "http://productpage:9080/productpage"
HTTPBIN = "http://httpbin:8000"
DENIED = "RBAC: access denied"
ISSUER = "testing@secure.istio.io"
CONFIG_TIMEOUT = 30.0  # seconds for an applied object to show in the waypoint's /config_dump
SPLIT_TOLERANCE = 3.0  # percentage points (issue 6)

# One measurement, run inside a pod: argv[1] is a JSON spec {url, n | duration, concurrency, method,
# headers ("{i}" → request index), body, keep_body, gap, timeout, close (a new connection per request)}.
# Prints a JSON list of [status or exception name, who answered, seconds taken, seconds since start,
# first keep_body chars of the body].
# "Who answered": httpbin's x-served-by, reviews' JSON podname, or the product page's reviews-pod.
CLIENT = r"""
import asyncio, json, re, sys, time
import aiohttp

async def main(spec):
    out = []
    started = time.monotonic()
    data = spec.get("body", "").encode() or None
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=spec["close"]),
                                    timeout=aiohttp.ClientTimeout(total=spec.get("timeout", 30)),
                                    cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)

    async def one(i):
        headers = {k: v.replace("{i}", str(i)) for k, v in spec.get("headers", {}).items()}
        t0 = time.monotonic()
        try:
            async with session.request(spec.get("method", "GET"), spec["url"], headers=headers, data=data,
                                       allow_redirects=False) as r:
                raw = await r.read()
                status, served = r.status, r.headers.get("x-served-by", "")
        except Exception as exc:
            out.append([type(exc).__name__, "", time.monotonic() - t0, t0 - started, ""])
            return
        if not served and raw[:1] == b"{":
            try:
                served = json.loads(raw).get("podname", "")
            except ValueError:
                pass
        if not served:
            found = re.search(rb'id="reviews-pod">([^<]*)<', raw)
            served = found[1].decode() if found else ""
        out.append([status, served, time.monotonic() - t0, t0 - started,
                    raw[:spec.get("keep_body", 0)].decode(errors="replace")])

    async with session:
        if "duration" in spec:
            i = 0
            while time.monotonic() - started < spec["duration"]:
                await one(i)
                i += 1
                await asyncio.sleep(spec.get("gap", 0))
        else:
            todo = iter(range(spec["n"]))

            async def worker():
                for i in todo:
                    await one(i)
            await asyncio.gather(*(worker() for _ in range(spec.get("concurrency", 1))))
    json.dump(out, sys.stdout)

asyncio.run(main(json.loads(sys.argv[1])))
"""

# Raw TCP inside a pod: sends each argv[3:] item as a line and prints what came back, as JSON.
TCP_CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
replies = []
for line in sys.argv[3:]:
    s.sendall(line.encode() + b"\n")
    replies.append(f.readline().decode())
print(json.dumps(replies))
"""


@dataclass(frozen=True)
class Reply:
    status: int | str
    served: str       # the pod that answered ("" when the waypoint answered itself)
    elapsed: float    # seconds
    at: float         # seconds since the measurement started
    body: str

    @property
    def version(self) -> str:
        """`reviews-v2-<hash>-<id>` → `v2`."""
        found = re.match(r"[a-z]+-(v\d)-", self.served)
        return found[1] if found else self.served


def load(cluster: Cluster, url: str, n: int = 1, *, source: str = SOURCE, concurrency: int = 1,
         method: str = "GET", headers: dict[str, str] | None = None, body: str = "", keep_body: int = 200,
         duration: float | None = None, gap: float = 0.0, timeout: float = 30.0,
         new_connections: bool = False) -> list[Reply]:
    """`n` requests over `concurrency` keep-alive connections (or one connection each), or requests one
    after the other for `duration` seconds, `gap` apart, from a pod of deployment `source`."""
    spec: dict[str, Any] = {"url": url, "n": n, "concurrency": concurrency, "method": method,
                            "headers": headers or {}, "body": body, "keep_body": keep_body, "timeout": timeout,
                            "close": new_connections}
    if duration is not None:
        spec.update(duration=duration, gap=gap)
    proc = cluster.ctl("exec", "-n", NS, f"deploy/{source}", "--", sys.executable, "-c", CLIENT, json.dumps(spec),
                       timeout=max(120.0, (duration or 0) + 3 * timeout))
    return [Reply(*row) for row in json.loads(proc.stdout)]


def get(cluster: Cluster, url: str, **kwargs: Any) -> Reply:
    return load(cluster, url, 1, **kwargs)[0]


def tally(replies: Sequence[Reply], key: Callable[[Reply], Any] = lambda r: (r.status, r.version)) -> dict[Any, int]:
    return dict(collections.Counter(key(r) for r in replies))


def share(replies: Sequence[Reply], version: str) -> float:
    return 100.0 * sum(1 for r in replies if r.status == 200 and r.version == version) / len(replies)


# -- the waypoint's view ---------------------------------------------------------------------------------
def in_waypoint(cluster: Cluster, *command: str) -> str:
    return cluster.ctl("exec", "-n", NS, "deploy/waypoint", "--", *command).stdout


def config_dump(cluster: Cluster) -> dict[str, Any]:
    return dict(json.loads(in_waypoint(cluster, "curl", "-sS", "--max-time", "5", "localhost:15000/config_dump")))


def objects_in(dump: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every bookinfo object the waypoint compiled."""
    found = {("VirtualService", vs["name"]) for vs in dump["routes"]["virtual_services"] if vs["namespace"] == NS}
    for policy in dump["routes"]["destination_rules"].get(NS, {}).values():
        found |= {("DestinationRule", name) for name in re.findall(rf"DestinationRule {NS}/([\w.-]+)",
                                                                   json.dumps(policy.get("origin")))}
    found |= {("AuthorizationPolicy", p["policy"].split("/", 1)[1]) for p in dump["policies"]
              if p["policy"].startswith(f"{NS}/")}
    found |= {("RequestAuthentication", r["policy"].split("/", 1)[1]) for r in dump["requestAuthentication"]["rules"]
              if r["policy"].startswith(f"{NS}/")}
    return found


def weights(dump: dict[str, Any], name: str) -> list[list[tuple[str | None, int]]] | None:
    """The compiled (subset, weight) destinations of each route of VirtualService `name`."""
    for vs in dump["routes"]["virtual_services"]:
        if vs["namespace"] == NS and vs["name"] == name:
            return [[(d["subset"], d["weight"]) for d in route["action"].get("destinations", [])]
                    for route in vs["routes"]]
    return None


def wait_config(cluster: Cluster, condition: Callable[[dict[str, Any]], bool], what: str) -> None:
    eventually(lambda: condition(config_dump(cluster)), timeout=CONFIG_TIMEOUT, interval=0.3,
               what=f"the waypoint to run {what}")


def manifest_objects(source: Path | dict[str, Any]) -> list[dict[str, Any]]:
    return [source] if isinstance(source, dict) else [d for d in yaml.safe_load_all(source.read_text()) if d]


def apply(cluster: Cluster, *sources: Path | dict[str, Any]) -> set[tuple[str, str]]:
    """`ambientctl apply -f <file>` (objects built in the test go through stdin); waits until the waypoint
    has compiled every object named."""
    keys: set[tuple[str, str]] = set()
    for source in sources:
        if isinstance(source, dict):
            cluster.ctl("apply", "-f", "-", stdin=json.dumps(source))
        else:
            cluster.ctl("apply", "-f", str(source.relative_to(REPO)))
        keys |= {(o["kind"], o["metadata"]["name"]) for o in manifest_objects(source)}
    wait_config(cluster, lambda dump: keys <= objects_in(dump), f"{sorted(keys)}")
    return keys


def delete(cluster: Cluster, *sources: Path | dict[str, Any]) -> None:
    """`ambientctl delete -f <file>`; waits until the waypoint has dropped every object named."""
    keys: set[tuple[str, str]] = set()
    for source in sources:
        if isinstance(source, dict):
            cluster.ctl("delete", "-f", "-", "--ignore-not-found", stdin=json.dumps(source))
        else:
            cluster.ctl("delete", "-f", str(source.relative_to(REPO)), "--ignore-not-found")
        keys |= {(o["kind"], o["metadata"]["name"]) for o in manifest_objects(source)}
    wait_config(cluster, lambda dump: not keys & objects_in(dump), f"without {sorted(keys)}")


@contextmanager
def applied(cluster: Cluster, *sources: Path | dict[str, Any]) -> Iterator[None]:
    try:
        apply(cluster, *sources)
        yield
    finally:
        delete(cluster, *sources)


# -- metrics -----------------------------------------------------------------------------------------------
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every `name` series whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, _, value = line.rpartition(" ")
        found = dict(LABEL.findall(series))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def waypoint_metrics(cluster: Cluster) -> str:
    return in_waypoint(cluster, "curl", "-sS", "--max-time", "5", "localhost:15020/stats/prometheus")


def ztunnel_metrics(cluster: Cluster, pod_prefix: str) -> str:
    """The metrics of the ztunnel on the node of the bookinfo pod named `pod_prefix-...`."""
    from ambient.local.network import NodeNet

    node = next(p["spec"]["nodeName"] for p in cluster.pods(NS) if p["metadata"]["name"].startswith(pod_prefix + "-"))
    ip = NodeNet(int(node.removeprefix("node-"))).ip
    with urllib.request.urlopen(f"http://{ip}:15020/metrics", timeout=5) as response:
        return str(response.read().decode())


def pod_log(cluster: Cluster, deployment: str) -> str:
    return cluster.ctl("logs", "-n", NS, f"deploy/{deployment}").stdout


# -- the mesh ---------------------------------------------------------------------------------------------
def tcp_echo_in_bookinfo() -> str:
    items = manifest_objects(TCP_ECHO)
    for item in items:
        item["metadata"]["namespace"] = NS
    # The same pods behind a port whose name declares no protocol: the waypoint has to detect it.
    items.append({"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": "tcp-echo-raw", "namespace": NS, "labels": {"app": "tcp-echo"}},
                  "spec": {"ports": [{"port": 9001, "name": "raw", "targetPort": 9000}],
                           "selector": {"app": "tcp-echo"}}})
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def services_with_waypoint(cluster: Cluster, node: str) -> set[str]:
    services = json.loads(cluster.ctl("ztunnel-config", "services", "--node", node, "-n", NS, "-o", "json").stdout)
    return {s["name"] for s in services if s.get("waypoint")}


BOUND = {"productpage", "details", "reviews", "ratings", "httpbin", "httpbin-pool", "tcp-echo", "tcp-echo-raw"}


def bound_everywhere(cluster: Cluster) -> bool:
    return all(services_with_waypoint(cluster, node) >= BOUND for node in ("node-1", "node-2"))


@pytest.fixture(scope="module")
def mesh(cluster: Cluster) -> Iterator[Cluster]:
    """Bookinfo, httpbin and tcp-echo in the ambient mesh, with a waypoint for the namespace."""
    cluster.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
    cluster.ctl("apply", "-f", str(RESILIENCE.relative_to(REPO)))
    cluster.ctl("apply", "-f", "-", stdin=tcp_echo_in_bookinfo())
    cluster.ctl("wait", "--for=condition=ready", "pod", "--all", "-n", NS, "--timeout=90s")
    eventually(lambda: all((p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection") == "enabled"
                           for p in cluster.pods(NS)), timeout=30, what="every bookinfo pod enrolled")
    cluster.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace", "--wait")
    try:
        eventually(lambda: bound_everywhere(cluster),
                   timeout=30, interval=0.5, what="every ztunnel to send bookinfo's services to the waypoint")
        yield cluster
    finally:
        cluster.ctl("waypoint", "delete", "-n", NS, check=False)
        cluster.ctl("label", "namespace", NS, "istio.io/use-waypoint-", "istio.io/dataplane-mode-", check=False)


# -- request routing (Istio: request routing, traffic shifting) -------------------------------------------
def test_all_traffic_to_v1(mesh: Cluster) -> None:
    with applied(mesh, NETWORKING / "destination-rule-all.yaml", NETWORKING / "virtual-service-all-v1.yaml"):
        replies = load(mesh, REVIEWS, 100, concurrency=4)
        assert tally(replies) == {(200, "v1"): 100}
        pages = load(mesh, PAGE, 10, concurrency=2)
        assert tally(pages) == {(200, "v1"): 10}, "the product page shows reviews-v1 every time"
        for url in (DETAILS, RATINGS):
            assert tally(load(mesh, url, 10, concurrency=2), lambda r: r.status) == {200: 10}


def test_canary_90_10_then_50_50(mesh: Cluster) -> None:
    rule, vs_90, vs_50 = (NETWORKING / "destination-rule-reviews.yaml",
                          NETWORKING / "virtual-service-reviews-90-10.yaml",
                          NETWORKING / "virtual-service-reviews-50-50.yaml")
    with applied(mesh, rule, vs_90):
        replies = load(mesh, REVIEWS, 2000, concurrency=16)
        assert set(tally(replies)) == {(200, "v1"), (200, "v2")}, tally(replies)
        assert abs(share(replies, "v2") - 10) <= SPLIT_TOLERANCE, f"90/10 measured {tally(replies)}"

        mesh.ctl("apply", "-f", str(vs_50.relative_to(REPO)))
        wait_config(mesh, lambda dump: weights(dump, "reviews") == [[("v1", 50), ("v2", 50)]], "the 50/50 split")
        replies = load(mesh, REVIEWS, 4000, concurrency=16)
        assert set(tally(replies)) == {(200, "v1"), (200, "v2")}, tally(replies)
        assert abs(share(replies, "v1") - 50) <= SPLIT_TOLERANCE, f"50/50 measured {tally(replies)}"


def test_user_based_routing_jason(mesh: Cluster) -> None:
    # Istio's virtual-service-reviews-jason-v2-v3.yaml: end-user jason → v2, everyone else → v3.
    with applied(mesh, NETWORKING / "destination-rule-reviews.yaml",
                 NETWORKING / "virtual-service-reviews-jason-v2-v3.yaml"):
        assert tally(load(mesh, REVIEWS, 50, concurrency=4, headers={"end-user": "jason"})) == {(200, "v2"): 50}
        assert tally(load(mesh, REVIEWS, 50, concurrency=4, headers={"end-user": "alice"})) == {(200, "v3"): 50}
        assert tally(load(mesh, REVIEWS, 50, concurrency=4)) == {(200, "v3"): 50}
        # As in the task: signed in (session cookie), productpage sends end-user to reviews.
        assert tally(load(mesh, PAGE, 10, concurrency=2, headers={"cookie": "session=jason"})) == {(200, "v2"): 10}
        assert tally(load(mesh, PAGE, 10, concurrency=2)) == {(200, "v3"): 10}

    # The other way round (the issue's wording): end-user jason → v3, everyone else → v2.
    jason_v3 = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": "reviews", "namespace": "bookinfo"},
                "spec": {"hosts": ["reviews"], "http": [
                    {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                     "route": [{"destination": {"host": "reviews", "subset": "v3"}}]},
                    {"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}]}}
    with applied(mesh, NETWORKING / "destination-rule-reviews.yaml", jason_v3):
        assert tally(load(mesh, REVIEWS, 50, concurrency=4, headers={"end-user": "jason"})) == {(200, "v3"): 50}
        assert tally(load(mesh, REVIEWS, 50, concurrency=4)) == {(200, "v2"): 50}


# -- mirroring ----------------------------------------------------------------------------------------------
def test_mirroring_to_v3(mesh: Cluster) -> None:
    run = uuid.uuid4().hex[:12]
    with applied(mesh, NETWORKING / "destination-rule-reviews.yaml",
                 NETWORKING / "virtual-service-reviews-v2-mirror-v3.yaml"):
        replies = load(mesh, REVIEWS, 40, concurrency=4, headers={"x-request-id": f"mirror-{run}-{{i}}"})
        assert tally(replies) == {(200, "v2"): 40}, "callers see only v2's answers"

        def ids(deployment: str) -> set[str]:
            return set(re.findall(rf"mirror-{run}-\d+", pod_log(mesh, deployment)))

        expected = {f"mirror-{run}-{i}" for i in range(40)}
        eventually(lambda: ids("reviews-v3") == expected, timeout=15, interval=0.3,
                   what="reviews-v3 to receive a copy of every request")
        assert ids("reviews-v2") == expected
        assert ids("reviews-v1") == set()


# -- fault injection, timeouts, retries -----------------------------------------------------------------------
def test_fault_injection_delay_10_percent_abort_20_percent(mesh: Cluster) -> None:
    n = 1000
    with applied(mesh, NETWORKING / "virtual-service-ratings-fault.yaml"):
        replies = load(mesh, RATINGS, n, concurrency=200, timeout=20)
    delayed = [r for r in replies if r.elapsed >= 5.0]
    aborted = [r for r in replies if r.status == 500]
    assert {r.status for r in replies} == {200, 500}, tally(replies, lambda r: r.status)
    assert all(r.body == "fault filter abort" and r.served == "" for r in aborted), "aborts come from the waypoint"
    assert all(r.elapsed < 5.0 + 2.0 for r in delayed), max(r.elapsed for r in replies)
    assert all(r.elapsed < 2.0 for r in replies if r.elapsed < 5.0), "requests not delayed are fast"
    # Binomial(1000, p): 4 standard deviations are 3.8 points at 10%, 5.1 points at 20%.
    assert abs(100 * len(delayed) / n - 10) <= 3.8, f"{len(delayed)} of {n} delayed by 5 s"
    assert abs(100 * len(aborted) / n - 20) <= 5.1, f"{len(aborted)} of {n} aborted with 500"


def test_timeout_cuts_a_slow_upstream(mesh: Cluster) -> None:
    slow = get(mesh, f"{HTTPBIN}/delay/3")
    assert slow.status == 200 and slow.elapsed >= 3.0, "without a timeout the slow answer arrives"
    with applied(mesh, NETWORKING / "virtual-service-httpbin-timeout.yaml"):
        cut = load(mesh, f"{HTTPBIN}/delay/3", 3, concurrency=3)
        assert all(r.status == 504 and r.body == "upstream request timeout" for r in cut), cut
        assert all(2.0 <= r.elapsed < 2.9 for r in cut), [r.elapsed for r in cut]
        fast = get(mesh, f"{HTTPBIN}/delay/1")
        assert fast.status == 200 and fast.served.startswith("httpbin-")


def test_retries_hide_a_flaky_upstream(mesh: Cluster) -> None:
    # /flaky/2/3 fails the first 2 of every 3 requests httpbin receives. Without a VirtualService the
    # waypoint retries only resets before the request, so callers see 2 failures in 3.
    baseline = load(mesh, f"{HTTPBIN}/flaky/2/3", 30)
    assert tally(baseline, lambda r: r.status) == {503: 20, 200: 10}
    run = uuid.uuid4().hex[:12]
    with applied(mesh, NETWORKING / "virtual-service-httpbin-retries.yaml"):
        replies = load(mesh, f"{HTTPBIN}/flaky/2/3", 30, headers={"x-request-id": f"retry-{run}-{{i}}"})
        assert tally(replies, lambda r: r.status) == {200: 30}, "every caller gets an answer"

        def tries() -> dict[str, int]:
            return dict(collections.Counter(re.findall(rf"GET /flaky/2/3 (\d+) [\d.]+ms retry-{run}-\d+",
                                                       pod_log(mesh, "httpbin"))))
        # httpbin saw each request fail twice, then answer: 3 tries per request, same request id.
        eventually(lambda: tries() == {"503": 60, "200": 30}, timeout=10, interval=0.3,
                   what="httpbin's log to show 3 tries per request")


# -- circuit breaking, outlier detection ------------------------------------------------------------------------
def test_circuit_breaking_overflow_is_503_uo(mesh: Cluster) -> None:
    def overflows() -> float:
        return metric_sum(waypoint_metrics(mesh), "istio_requests_total", reporter="waypoint",
                          destination_service_name="httpbin", response_code="503", response_flags="UO")

    with applied(mesh, NETWORKING / "destination-rule-httpbin-circuit-breaker.yaml"):
        alone = load(mesh, f"{HTTPBIN}/delay/0.1", 5, concurrency=1)
        assert tally(alone, lambda r: r.status) == {200: 5}, "one caller at a time stays within the limits"
        before = overflows()
        replies = load(mesh, f"{HTTPBIN}/delay/0.2", 30, concurrency=3)
        rejected = [r for r in replies if r.status == 503]
        assert rejected and len(rejected) < len(replies), tally(replies, lambda r: r.status)
        assert {r.status for r in replies} == {200, 503}
        assert all(r.body.endswith("reset reason: overflow") and r.served == "" for r in rejected), rejected[0]
        eventually(lambda: overflows() - before == len(rejected), timeout=10, interval=0.3,
                   what=f'{len(rejected)} more istio_requests_total{{response_code="503", response_flags="UO"}}')


def test_outlier_detection_ejects_and_returns(mesh: Cluster) -> None:
    base_ejection = 3.0
    with applied(mesh, NETWORKING / "destination-rule-httpbin-pool-outlier.yaml"):
        replies = load(mesh, "http://httpbin-pool:8000/get", duration=7.0, gap=0.03)
    bad = [r for r in replies if "httpbin-pool-bad" in r.served]
    good = [r for r in replies if "httpbin-pool-ok" in r.served]
    assert len(bad) + len(good) == len(replies)
    assert all(r.status == 500 for r in bad) and all(r.status == 200 for r in good)
    assert len({r.served for r in good}) == 2, "both healthy replicas take traffic"
    # Round robin over 3 replicas, consecutive5xxErrors 2: the bad replica fails twice and is ejected for
    # baseEjectionTime (rounded up to the next 1 s sweep); back, it fails twice again and is ejected for
    # twice as long, past the end of the run.
    at = [round(r.at, 2) for r in bad]
    assert len(bad) == 4, f"the bad replica answered at {at} s"
    assert at[1] - at[0] < 1.0 and at[3] - at[2] < 1.0, at
    assert base_ejection - 0.2 <= at[2] - at[1] <= base_ejection + 2.5, f"ejected from {at[1]} s to {at[2]} s"
    during = [r for r in replies if bad[1].at < r.at < bad[2].at]
    assert len(during) >= 20 and all(r.status == 200 for r in during), tally(during, lambda r: (r.status, r.served))


# -- authorization ------------------------------------------------------------------------------------------------
def test_deny_all_then_allow_productpage_to_get_details(mesh: Cluster) -> None:
    allow_nothing = NETWORKING / "authorization-policy-allow-nothing.yaml"
    viewer = NETWORKING / "authorization-policy-details-viewer.yaml"
    with applied(mesh, allow_nothing):
        for url in (REVIEWS, DETAILS, RATINGS, PAGE):
            denied = get(mesh, url)
            assert (denied.status, denied.body, denied.served) == (403, DENIED, ""), url
        assert get(mesh, DETAILS, source=OTHER_SOURCE).status == 403
        with applied(mesh, viewer):
            assert get(mesh, DETAILS).status == 200
            post = get(mesh, DETAILS, method="POST", body="{}")
            assert (post.status, post.body) == (403, DENIED), "GET only"
            other = get(mesh, DETAILS, source=OTHER_SOURCE)
            assert (other.status, other.body) == (403, DENIED), "productpage only"
            assert get(mesh, REVIEWS).status == 403, "the namespace's other services stay denied"
    assert get(mesh, REVIEWS).status == 200
    assert get(mesh, DETAILS, source=OTHER_SOURCE).status == 200


def test_authorization_by_path_and_method(mesh: Cluster) -> None:
    with applied(mesh, NETWORKING / "authorization-policy-reviews-paths.yaml"):
        assert get(mesh, REVIEWS).status == 200
        assert get(mesh, REVIEWS, method="HEAD").status == 200
        assert get(mesh, REVIEWS, source=OTHER_SOURCE).status == 200, "any source, as the policy says"
        for method, url in (("POST", REVIEWS), ("DELETE", REVIEWS), ("GET", "http://reviews:9080/health"),
                            ("GET", "http://reviews:9080/reviewsX/0")):
            reply = get(mesh, url, method=method)
            assert (reply.status, reply.body) == (403, DENIED), (method, url)
        assert get(mesh, DETAILS).status == 200, "the policy targets reviews only"


# -- JWT ----------------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """An RSA key and its JWKS; signs RS256 tokens for `ISSUER`."""

    def __init__(self, kid: str = "test-key") -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()

        def raw(n: int) -> bytes:
            return n.to_bytes((n.bit_length() + 7) // 8, "big")
        return json.dumps({"keys": [{"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig",
                                     "n": _b64(raw(numbers.n)), "e": _b64(raw(numbers.e))}]})

    def token(self, **claims: Any) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = _b64(json.dumps({"alg": "RS256", "kid": self.kid, "typ": "JWT"}).encode())
        payload = _b64(json.dumps({"iss": ISSUER, "sub": ISSUER, "exp": int(time.time()) + 3600, **claims}).encode())
        signature = self.key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{payload}.{_b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_jwt_request_authentication_and_claims(mesh: Cluster) -> None:
    issuer, impostor = Issuer(), Issuer()  # the impostor signs with another key under the same kid
    authn = manifest_objects(NETWORKING / "request-authentication-jwt.yaml")[0]
    json.loads(authn["spec"]["jwtRules"][0]["jwks"])  # the sample's inline JWKS is valid JSON
    authn["spec"]["jwtRules"][0]["jwks"] = issuer.jwks()
    good, grouped = issuer.token(), issuer.token(groups=["group1", "group2"])
    url = f"{HTTPBIN}/headers"
    with applied(mesh, authn, NETWORKING / "authorization-policy-require-jwt.yaml"):
        missing = get(mesh, url)
        assert (missing.status, missing.body) == (403, DENIED), "no token: no principal, denied"
        for token, why in ((impostor.token(), "Jwt verification fails"),
                           (issuer.token(exp=int(time.time()) - 3600), "Jwt is expired"),
                           ("not-a-jwt", "Jwt is not in the form of Header.Payload.Signature")):
            bad = get(mesh, url, headers=bearer(token))
            assert (bad.status, bad.body) == (401, why)
        ok = get(mesh, url, headers=bearer(good), keep_body=100_000)
        assert ok.status == 200 and ok.served.startswith("httpbin-")
        assert "authorization" not in {k.lower() for k in json.loads(ok.body)["headers"]}, \
            "the token is not forwarded (forwardOriginalToken: false)"
        assert get(mesh, DETAILS).status == 200, "services without the policy need no token"
        assert get(mesh, DETAILS, headers=bearer(impostor.token())).status == 401, "but a bad token is refused"

        # The claim-based step: only tokens whose groups claim holds group1.
        mesh.ctl("apply", "-f", str((NETWORKING / "authorization-policy-require-jwt-group1.yaml").relative_to(REPO)))
        eventually(lambda: get(mesh, url, headers=bearer(good)).status == 403, timeout=CONFIG_TIMEOUT, interval=0.3,
                   what="a token without group1 to be denied")
        assert get(mesh, url, headers=bearer(grouped)).status == 200
        assert get(mesh, url).status == 403


# -- telemetry ------------------------------------------------------------------------------------------------
def test_metrics_count_each_request_and_ztunnel_sends_to_the_waypoint(mesh: Cluster) -> None:
    n = 25
    source = {"reporter": "waypoint", "source_workload": "productpage-v1", "response_code": "200"}

    def requests_to(workload: str) -> float:
        return metric_sum(waypoint_metrics(mesh), "istio_requests_total", destination_workload=workload, **source)

    def ztunnel_connections() -> dict[str, float]:
        text = ztunnel_metrics(mesh, "productpage-v1")
        return {w: metric_sum(text, "istio_tcp_connections_opened_total", reporter="source",
                              source_workload="productpage-v1", destination_service_name="reviews",
                              destination_workload=w) for w in ("waypoint", "reviews-v1", "reviews-v2", "reviews-v3")}

    with applied(mesh, NETWORKING / "destination-rule-reviews.yaml",
                 NETWORKING / "virtual-service-reviews-jason-v2-v3.yaml"):
        before = {w: requests_to(w) for w in ("reviews-v2", "reviews-v3")}
        ratings_before = metric_sum(waypoint_metrics(mesh), "istio_requests_total", reporter="waypoint",
                                    source_workload="reviews-v2", destination_workload="ratings-v1",
                                    response_code="200")
        connections_before = ztunnel_connections()
        assert tally(load(mesh, REVIEWS, n, headers={"end-user": "jason"})) == {(200, "v2"): n}
        eventually(lambda: requests_to("reviews-v2") - before["reviews-v2"] >= n, timeout=10, interval=0.3,
                   what=f'{n} more istio_requests_total{{destination_workload="reviews-v2"}}')
        text = waypoint_metrics(mesh)
        assert metric_sum(text, "istio_requests_total", destination_workload="reviews-v2", **source) \
            - before["reviews-v2"] == n, "exactly the requests sent"
        assert metric_sum(text, "istio_requests_total", destination_workload="reviews-v3", **source) \
            == before["reviews-v3"]
        assert metric_sum(text, "istio_requests_total", reporter="waypoint", source_workload="reviews-v2",
                          destination_workload="ratings-v1", response_code="200") - ratings_before == n, \
            "reviews-v2's calls to ratings, through the same waypoint"
        delta = {w: v - connections_before[w] for w, v in ztunnel_connections().items()}
        assert delta["waypoint"] >= 1 and delta["reviews-v1"] == delta["reviews-v2"] == delta["reviews-v3"] == 0, \
            f"productpage's ztunnel opened connections for reviews to: {delta}"


# -- no configuration, no waypoint --------------------------------------------------------------------------------
def test_unconfigured_waypoint_relays_http_and_tcp_unchanged(mesh: Cluster) -> None:
    assert not objects_in(config_dump(mesh)), "no L7 configuration left over"

    def through_waypoint() -> float:
        return metric_sum(waypoint_metrics(mesh), "istio_requests_total", reporter="waypoint",
                          source_workload="productpage-v1", destination_service_name="httpbin")

    before = through_waypoint()
    body = "".join(f"line {i:05d} of a request body that has to arrive byte for byte\n" for i in range(1000))
    reply = get(mesh, f"{HTTPBIN}/anything/a%20b?x=1&x=2&y=%C3%A9", method="PUT", body=body, keep_body=1_000_000,
                headers={"x-custom": "one", "x-list": "two, three", "content-type": "text/plain"})
    assert reply.status == 200
    echo = json.loads(reply.body)
    assert (echo["method"], echo["path"], echo["args"]) == ("PUT", "/anything/a b", {"x": ["1", "2"], "y": "é"})
    assert echo["body"] == body
    sent = {"x-custom": "one", "x-list": "two, three", "content-type": "text/plain", "content-length": str(len(body))}
    assert sent.items() <= {k.lower(): v for k, v in echo["headers"].items()}.items(), echo["headers"]
    stream = load(mesh, f"{HTTPBIN}/stream/20", keep_body=1_000_000)[0]
    assert [json.loads(line)["id"] for line in stream.body.splitlines()] == list(range(20))
    eventually(lambda: through_waypoint() - before == 2, timeout=10, interval=0.3,
               what="the waypoint to have served both HTTP requests")

    def tcp_through_waypoint(service: str) -> float:
        return metric_sum(ztunnel_metrics(mesh, "productpage-v1"), "istio_tcp_connections_opened_total",
                          reporter="source", source_workload="productpage-v1", destination_service_name=service,
                          destination_workload="waypoint")

    big = "x" * 100_000  # one argv string holds at most 128 KiB
    for service, port in (("tcp-echo", 9000), ("tcp-echo-raw", 9001)):  # declared TCP; undeclared (detected)
        opened = tcp_through_waypoint(service)
        lines = ["world", "hello again", big]
        out = mesh.ctl("exec", "-n", NS, f"deploy/{SOURCE}", "--", sys.executable, "-c", TCP_CLIENT, service,
                       str(port), *lines).stdout
        assert json.loads(out) == [f"hello {line}\n" for line in lines], service
        eventually(lambda service=service, opened=opened: tcp_through_waypoint(service) - opened >= 1,  # type: ignore[misc]
                   timeout=10, interval=0.3,
                   what=f"productpage's ztunnel to report a connection to the waypoint for {service}")


def test_deleting_the_waypoint_sends_traffic_direct(mesh: Cluster) -> None:
    def reviews_via(workloads: Sequence[str]) -> dict[str, float]:
        text = ztunnel_metrics(mesh, "productpage-v1")
        return {w: metric_sum(text, "istio_tcp_connections_opened_total", reporter="source",
                              source_workload="productpage-v1", destination_service_name="reviews",
                              destination_workload=w) for w in workloads}

    workloads = ("waypoint", "reviews-v1", "reviews-v2", "reviews-v3")
    with applied(mesh, NETWORKING / "destination-rule-reviews.yaml",
                 NETWORKING / "virtual-service-reviews-jason-v2-v3.yaml"):  # everyone but jason → v3
        assert tally(load(mesh, REVIEWS, 30, concurrency=3)) == {(200, "v3"): 30}
        try:
            mesh.ctl("waypoint", "delete", "-n", NS)
            eventually(lambda: not any(services_with_waypoint(mesh, n) for n in ("node-1", "node-2")), timeout=30,
                       interval=0.5, what="every ztunnel to forget the waypoint")
            before = reviews_via(workloads)
            # The VirtualService is the waypoint's: without it ztunnel balances reviews' connections (L4, one
            # endpoint per connection) over every version.
            replies = load(mesh, REVIEWS, 60, concurrency=6, new_connections=True)
            assert {r.status for r in replies} == {200} and {r.version for r in replies} == {"v1", "v2", "v3"}, \
                tally(replies)
            delta = {w: v - before[w] for w, v in reviews_via(workloads).items()}
            assert delta["waypoint"] == 0 and sum(delta.values()) >= 1, f"connections for reviews went to {delta}"
        finally:
            mesh.ctl("waypoint", "apply", "-n", NS, "--wait")
            eventually(lambda: bound_everywhere(mesh),
                       timeout=30, interval=0.5, what="every ztunnel to send bookinfo to the new waypoint")
        # The namespace kept its istio.io/use-waypoint label: a new waypoint of that name takes over again.
        reviews = {("VirtualService", "reviews"), ("DestinationRule", "reviews")}
        wait_config(mesh, lambda dump: reviews <= objects_in(dump), "the reviews VirtualService and DestinationRule")
        assert tally(load(mesh, REVIEWS, 30, concurrency=3)) == {(200, "v3"): 30}
