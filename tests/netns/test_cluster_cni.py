"""Ambient enrollment in the local cluster end to end (issue 3): labelling a namespace enrolls its
running pods without restarting them, a new pod is enrolled during its CNI ADD, removed rules are
repaired, and unlabelling removes everything. A stand-in ztunnel (cni.zds_client) acks over ZDS."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from typing import Any

from cni.enrollment import REDIRECTION_ANNOTATION, rule_config
from cni.rules import InpodRules
from tests.netns.conftest import Cluster, eventually


def annotation(pod: dict[str, Any]) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)


def netns_of(cluster: Cluster, pod: dict[str, Any]) -> str:
    uid, node = pod["metadata"]["uid"], pod["spec"]["nodeName"]
    record = next(cluster.state_dir.glob(f"nodes/{node}/pods/*_{uid}/sandbox.json"))
    return f"/run/netns/{json.loads(record.read_text())['netns']}"


def pids(cluster: Cluster, pod: dict[str, Any]) -> list[int]:
    uid, node = pod["metadata"]["uid"], pod["spec"]["nodeName"]
    record = next(cluster.state_dir.glob(f"nodes/{node}/pods/*_{uid}/sandbox.json"))
    return sorted(pid for pid, _ in json.loads(record.read_text())["pids"].values())


def plugin_requests(node_ip: str) -> float:
    text = urllib.request.urlopen(f"http://{node_ip}:8000/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r'^ambient_cni_plugin_requests_total\{result="ok"\} (\S+)$', text, re.M))


def rules_in_place(pod: dict[str, Any], netns: str) -> list[str]:
    ips = [p["ip"] for p in pod["status"].get("podIPs") or []]
    return InpodRules("iptables").verify(netns, rule_config(pod, True, ips))


def test_agents_chain_istio_cni_after_the_reference_plugins(cluster: Cluster) -> None:
    for node in ("node-1", "node-2"):
        conflist = next((cluster.state_dir / "nodes" / node / "net.d").glob("*.conflist"))
        types = [p["type"] for p in json.loads(conflist.read_text())["plugins"]]
        assert types == ["bridge", "istio-cni"]
        assert (cluster.state_dir / "nodes" / node / "bin" / "istio-cni").exists()


def test_labelling_a_namespace_enrolls_running_pods_without_restarting_them(cluster: Cluster) -> None:
    before = {p["metadata"]["uid"]: pids(cluster, p) for p in cluster.pods("bookinfo")}
    assert all(annotation(p) is None for p in cluster.pods("bookinfo"))
    cluster.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")
    eventually(lambda: all(annotation(p) == "enabled" for p in cluster.pods("bookinfo")), timeout=30,
               what="every bookinfo pod annotated enabled")
    pods = cluster.pods("bookinfo")
    assert {p["metadata"]["uid"]: pids(cluster, p) for p in pods} == before, "pods must not restart"
    assert all(c["restartCount"] == 0 for p in pods for c in p["status"]["containerStatuses"])
    for pod in pods:
        assert rules_in_place(pod, netns_of(cluster, pod)) == [], pod["metadata"]["name"]
    # Pods elsewhere are untouched.
    sleep_pod = cluster.pods("default", "app=sleep")[0]
    assert annotation(sleep_pod) is None


def test_new_pod_is_enrolled_during_its_cni_add(cluster: Cluster) -> None:
    node_ips = {"node-1": "172.30.0.11", "node-2": "172.30.0.12"}
    before = {node: plugin_requests(ip) for node, ip in node_ips.items()}
    old = cluster.pods("bookinfo", "app=ratings")[0]
    cluster.ctl("delete", "pod", "-n", "bookinfo", old["metadata"]["name"])
    new = eventually(lambda: [p for p in cluster.pods("bookinfo", "app=ratings")
                              if p["metadata"]["uid"] != old["metadata"]["uid"] and p["status"].get("podIP")],
                     what="the replacement ratings pod")[0]
    node = new["spec"]["nodeName"]
    assert annotation(new) == "enabled"
    assert plugin_requests(node_ips[node]) == before[node] + 1, "the plugin's /cmdadd enrolled it"
    assert rules_in_place(new, netns_of(cluster, new)) == []


def test_removed_rules_are_repaired(cluster: Cluster) -> None:
    pod = cluster.pods("bookinfo", "app=details")[0]
    netns = netns_of(cluster, pod)
    subprocess.run(["nsenter", f"--net={netns}", "iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"], check=True)
    assert rules_in_place(pod, netns) != []
    eventually(lambda: rules_in_place(pod, netns) == [], timeout=20, what="the agent to repair the rules")


def test_unlabelling_removes_annotations_and_rules(cluster: Cluster) -> None:
    cluster.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode-")
    eventually(lambda: all(annotation(p) is None for p in cluster.pods("bookinfo")), timeout=30,
               what="annotations removed")

    def rules_gone() -> bool:
        return all("ISTIO" not in subprocess.run(["nsenter", f"--net={netns_of(cluster, pod)}", "iptables-save"],
                                                 capture_output=True, text=True, check=True).stdout
                   for pod in cluster.pods("bookinfo"))

    eventually(rules_gone, timeout=30, what="the in-pod rules removed from every bookinfo pod")
    page = cluster.exec("deploy/sleep", "curl", "-sf", "--max-time", "10",
                        "http://productpage.bookinfo:9080/productpage").stdout
    assert "Simple Bookstore App" in page, "traffic flows again without the mesh"
