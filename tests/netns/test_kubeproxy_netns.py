"""KubeProxy against a real nat table, inside a throwaway network namespace (root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient.local.kubeproxy import chains_in, jump_rules_missing

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
NETNS_PREFIX = "ambt-"
# 60 s: generous for one iptables round trip, short enough that a wedged xtables lock fails the test.
COMMAND_TIMEOUT = 60

# Runs in the namespace, so the rules land in its nat table and nowhere else.
KUBE_PROXY_SCRIPT = """
import json, sys
from ambient.local.kubeproxy import KubeProxy
request = json.load(sys.stdin)
proxy = KubeProxy()
if request["op"] == "sync":
    proxy.sync(request["services"], request["slices"])
else:
    proxy.remove()
"""

SERVICE = {
    "metadata": {"namespace": "default", "name": "web"},
    "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
}


def web_slice(*ready_ips: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ready_ips],
    }


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} on PATH")
    name = f"{NETNS_PREFIX}{uuid.uuid4().hex[:10]}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if added.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {added.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def in_netns(netns: str, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, f"{argv} in {netns} failed: {done.stderr}"
    return done.stdout


def kube_proxy(netns: str, op: str, services: list[Any] | None = None, slices: list[Any] | None = None) -> None:
    request = json.dumps({"op": op, "services": services or [], "slices": slices or []})
    in_netns(netns, sys.executable, "-c", KUBE_PROXY_SCRIPT, stdin=request)


def nat_table(netns: str) -> str:
    return in_netns(netns, "iptables-save", "-t", "nat")


def rule_lines(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("-A ")]


def ours(table: str, prefix: str = "AMBIENT-") -> set[str]:
    return {chain for chain in chains_in(table) if chain.startswith(prefix)}


def test_sync_installs_dnat_and_is_idempotent(netns: str) -> None:
    kube_proxy(netns, "sync", [SERVICE], [web_slice("10.1.0.5", "10.1.0.6")])
    table = nat_table(netns)
    assert "-j DNAT --to-destination 10.1.0.5:8080" in table
    assert "-j DNAT --to-destination 10.1.0.6:8080" in table
    assert "--set-xmark 0x4000/0x4000" in table
    assert "-j MASQUERADE" in table
    assert len(ours(table, "AMBIENT-SEP-")) == 2
    assert jump_rules_missing(table) == []

    kube_proxy(netns, "sync", [SERVICE], [web_slice("10.1.0.5", "10.1.0.6")])
    again = nat_table(netns)
    assert rule_lines(again) == rule_lines(table)
    assert ours(again) == ours(table)


def test_endpoints_going_away_removes_their_chains(netns: str) -> None:
    kube_proxy(netns, "sync", [SERVICE], [web_slice("10.1.0.5")])
    assert len(ours(nat_table(netns), "AMBIENT-SEP-")) == 1

    kube_proxy(netns, "sync", [SERVICE], [web_slice()])
    table = nat_table(netns)
    assert ours(table, "AMBIENT-SEP-") == set()
    assert ours(table, "AMBIENT-SVC-") == set()
    assert "DNAT" not in table
    assert jump_rules_missing(table) == []


def test_remove_leaves_no_ambient_chains(netns: str) -> None:
    kube_proxy(netns, "sync", [SERVICE], [web_slice("10.1.0.5")])
    kube_proxy(netns, "remove")
    table = nat_table(netns)
    assert "AMBIENT" not in table
    kube_proxy(netns, "remove")  # removing again is a no-op, not an error
