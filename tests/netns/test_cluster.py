"""The local cluster end to end, as a newcomer uses it: two nodes, Bookinfo and a sleep client, requests
by pod IP and by service name across nodes, pod lifecycle through the real CNI chain, and `down`
leaving nothing behind. The last test tears the cluster down; tests run in file order."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psutil

from ambient.local.layout import pod_netns_name
from tests.netns.conftest import Cluster, eventually


def test_bookinfo_pods_run_on_both_nodes_with_ips(cluster: Cluster) -> None:
    pods = cluster.pods("bookinfo")
    assert len(pods) == 6
    assert all(p["status"]["phase"] == "Running" and p["status"]["podIP"] for p in pods)
    assert {p["spec"]["nodeName"] for p in pods} == {"node-1", "node-2"}
    for pod in pods:
        node_index = pod["spec"]["nodeName"].split("-")[1]
        assert pod["status"]["podIP"].startswith(f"10.244.{node_index}.")
    wide = cluster.ctl("get", "pods", "-A", "-o", "wide").stdout
    assert "NODE" in wide.splitlines()[0] and "node-2" in wide and "10.244." in wide


def test_productpage_through_service_name(cluster: Cluster) -> None:
    page = cluster.exec("deploy/sleep", "curl", "-sf", "--max-time", "10",
                        "http://productpage.bookinfo:9080/productpage").stdout
    assert "Simple Bookstore App" in page
    assert 'id="reviews"' in page


def test_cross_node_pod_to_pod_by_ip_and_by_fqdn(cluster: Cluster) -> None:
    sleep_pod = cluster.pods("default", "app=sleep")[0]
    other = next(p for p in cluster.pods("bookinfo") if p["spec"]["nodeName"] != sleep_pod["spec"]["nodeName"])
    by_ip = cluster.exec("deploy/sleep", "curl", "-sf", "--max-time", "5",
                         f"http://{other['status']['podIP']}:9080/health")
    assert by_ip.returncode == 0
    by_name = cluster.exec("deploy/sleep", "curl", "-sf", "--max-time", "5",
                           "http://details.bookinfo.svc.cluster.local:9080/details/0").stdout
    assert json.loads(by_name)["id"] == 0


def test_unknown_service_name_does_not_resolve(cluster: Cluster) -> None:
    result = cluster.exec("deploy/sleep", "curl", "-s", "--max-time", "5", "http://nosuch.bookinfo:9080/",
                          check=False)
    assert result.returncode == 6, result  # curl: could not resolve host


def test_deleting_a_pod_runs_cni_del_and_stops_its_processes(cluster: Cluster) -> None:
    pod = cluster.pods("bookinfo", "app=ratings")[0]
    uid, ip, node = pod["metadata"]["uid"], pod["status"]["podIP"], pod["spec"]["nodeName"]
    ipam = cluster.state_dir / "nodes" / node / "ipam" / "ambient-local"
    assert (ipam / ip).exists(), "host-local should hold the pod's IP"
    record = json.loads(next(cluster.state_dir.glob(f"nodes/{node}/pods/*_{uid}/sandbox.json")).read_text())
    pids = [pid for pid, _ in record["pids"].values()]
    cluster.ctl("delete", "pod", "-n", "bookinfo", pod["metadata"]["name"])
    assert not (ipam / ip).exists(), "CNI DEL should release the IP in host-local"
    assert not Path(f"/run/netns/{pod_netns_name(uid)}").exists()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    # The Deployment replaces it.
    eventually(lambda: [p for p in cluster.pods("bookinfo", "app=ratings")
                        if p["metadata"]["uid"] != uid and p["status"].get("podIP")], what="a replacement pod")


def test_failed_cni_add_leaves_pod_container_creating_and_is_retried(cluster: Cluster) -> None:
    conf_dir = cluster.state_dir / "nodes" / "node-2" / "net.d"
    good = next(conf_dir.glob("*.conflist"))
    original = good.read_text()
    broken = json.loads(original)
    broken["plugins"].append({"type": "no-such-plugin"})
    good.write_text(json.dumps(broken))
    name = f"pinned-{uuid.uuid4().hex[:6]}"
    manifest = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                           "spec": {"nodeSelector": {"kubernetes.io/hostname": "node-2"},
                                    "containers": [{"name": "main", "command": ["sleep", "infinity"]}]}})
    try:
        cluster.ctl("apply", "-f", "-", stdin=manifest)

        def waiting_reason() -> str:
            pod = cluster.json("get", "pod", name)
            state = (pod["status"].get("containerStatuses") or [{}])[0].get("state", {})
            return str(state.get("waiting", {}).get("message", "")) if "no-such-plugin" in json.dumps(state) else ""

        message = eventually(waiting_reason, what="the CNI error on the pod")
        assert "no-such-plugin" in message
        assert "ContainerCreating" in cluster.ctl("get", "pod", name).stdout
        events = cluster.ctl("get", "events").stdout
        assert "FailedCreatePodSandBox" in events
    finally:
        good.write_text(original)
    eventually(lambda: cluster.json("get", "pod", name)["status"]["phase"] == "Running", timeout=30,
               what="the pod to start once the CNI config is fixed")
    cluster.ctl("delete", "pod", name)


def test_restart_policy_and_readiness_probe(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    pods: list[dict[str, Any]] = [
        {"name": "once", "restartPolicy": "Never", "command": ["sh", "-c", "exit 3"]},
        {"name": "retry", "restartPolicy": "OnFailure", "command": ["sh", "-c", "exit 1"]},
        {"name": "probed", "restartPolicy": "Always", "command": ["sleep", "infinity"],
         "readinessProbe": {"exec": {"command": ["test", "-f", str(marker)]}, "periodSeconds": 1}},
    ]
    docs = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p["name"], "namespace": "default"},
             "spec": {"restartPolicy": p["restartPolicy"], "containers": [
                 {"name": "main", "command": p["command"],
                  **({"readinessProbe": p["readinessProbe"]} if "readinessProbe" in p else {})}]}} for p in pods]
    cluster.ctl("apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in docs))
    try:
        eventually(lambda: cluster.json("get", "pod", "once")["status"]["phase"] == "Failed", what="once Failed")
        once = cluster.json("get", "pod", "once")["status"]["containerStatuses"][0]
        assert once["state"]["terminated"]["exitCode"] == 3 and once["restartCount"] == 0
        eventually(lambda: cluster.json("get", "pod", "retry")["status"]["containerStatuses"][0]["restartCount"] >= 1,
                   what="retry restarted")
        eventually(lambda: cluster.json("get", "pod", "probed")["status"]["phase"] == "Running", what="probed running")
        probed = cluster.json("get", "pod", "probed")
        assert not probed["status"]["containerStatuses"][0]["ready"]
        marker.touch()
        cluster.ctl("wait", "--for=condition=ready", "pod/probed", "--timeout=20s")
    finally:
        cluster.ctl("delete", "pod", "once", "retry", "probed", "--timeout", "60")


def test_bad_manifest_names_document_and_field_and_applies_nothing(cluster: Cluster) -> None:
    bad = "\n---\n".join([
        json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fine-1"}}),
        json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "broken"},
                    "spec": {"ports": [{"port": 70000}]}}),
    ])
    result = cluster.ctl("apply", "-f", "-", stdin=bad, check=False)
    assert result.returncode == 1
    assert "document 2" in result.stderr and "spec.ports[0].port" in result.stderr
    assert cluster.ctl("get", "configmap", "fine-1", check=False).returncode == 1, "nothing may be applied"


def test_down_leaves_nothing_behind(cluster: Cluster) -> None:
    from ambient.local import network

    supervisor = json.loads((cluster.state_dir / "supervisor.pid").read_text())["pid"]
    kubelets = [json.loads(p.read_text())["pid"] for p in (cluster.state_dir / "pids").glob("*.json")]
    pod_pids = [pid for record in cluster.state_dir.glob("nodes/*/pods/*/sandbox.json")
                for pid, _ in json.loads(record.read_text()).get("pids", {}).values()]
    assert kubelets and pod_pids
    cluster.ctl("down")
    assert network.leftovers() == []
    assert not cluster.state_dir.exists()
    for pid in [supervisor, *kubelets, *pod_pids]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    assert "10.244." not in routes and "amb0" not in routes
    forward = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=True).stdout
    assert "ambient-local" not in forward
