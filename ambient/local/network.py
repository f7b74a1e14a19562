"""The local cluster's network: a host bridge, one network namespace per simulated node, routes.

Layout (all addresses fixed so that docs and tests can name them):

    root netns   bridge amb0 172.30.0.1/24  ── API server :6443, cluster DNS :53
       │ veth amb-n<i>
    node netns amb-node-<i>   eth0 172.30.0.(10+i)/24, default via 172.30.0.1
       │ bridge cni0 (made by the CNI bridge plugin), pods on 10.244.<i>.0/24
    pod netns amb-pod-<uid>   eth0 10.244.<i>.x

Every node routes the other nodes' pod CIDRs via their node IPs; the host routes every pod CIDR too, so
`curl <podIP>` works from the host. This module only creates and removes those pieces; it runs no
processes. Everything it creates is named with the `amb` prefix and recorded in the state dir.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ambient.local.network")

HOST_BRIDGE = "amb0"
NODE_NETWORK = ipaddress.ip_network("172.30.0.0/24")
HOST_IP = "172.30.0.1"  # the API server and cluster DNS listen here
POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")
SERVICE_NETWORK = "10.96.0.0/16"
KUBE_DNS_IP = "10.96.0.10"
KUBERNETES_SERVICE_IP = "10.96.0.1"
NETNS_PREFIX = "amb-"
MAX_NODES = 200  # node IPs are .11 … .210 in NODE_NETWORK


class NetworkError(Exception):
    """A network setup step failed; the message names the command and what it printed."""


@dataclass(frozen=True)
class NodeNet:
    index: int  # 1-based

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}node-{self.index}"

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def ip(self) -> str:
        return str(NODE_NETWORK.network_address + 10 + self.index)

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def host_veth(self) -> str:
        return f"amb-n{self.index}"


def nodes(count: int) -> list[NodeNet]:
    if not 1 <= count <= MAX_NODES:
        raise NetworkError(f"--nodes must be between 1 and {MAX_NODES}, not {count}")
    return [NodeNet(i) for i in range(1, count + 1)]


def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetworkError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _ip_batch(commands: list[str], netns: str | None = None) -> None:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    run(*prefix, "-batch", "-", stdin="\n".join(commands) + "\n")


def link_exists(name: str, netns: str | None = None) -> bool:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    return run(*prefix, "link", "show", name, check=False).returncode == 0


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


# Host FORWARD rules: with br_netfilter, traffic between nodes on amb0 passes the host's FORWARD chain,
# whose policy may be DROP (Docker sets it so); these let the cluster's own traffic through.
_FORWARD_RULES = (["-i", HOST_BRIDGE, "-j", "ACCEPT"], ["-o", HOST_BRIDGE, "-j", "ACCEPT"])
_COMMENT = ["-m", "comment", "--comment", "ambient-local"]


def setup(node_list: list[NodeNet], state_dir: Path) -> None:
    """Create the bridge, the node namespaces and all routes. Idempotent."""
    if not link_exists(HOST_BRIDGE):
        _ip_batch([f"link add {HOST_BRIDGE} type bridge", f"addr add {HOST_IP}/24 dev {HOST_BRIDGE}",
                   f"link set {HOST_BRIDGE} up"])
    for rule in _FORWARD_RULES:
        if run("iptables", "-w", "-C", "FORWARD", *rule, *_COMMENT, check=False).returncode != 0:
            run("iptables", "-w", "-I", "FORWARD", *rule, *_COMMENT)
    for node in node_list:
        _setup_node(node, node_list)
        run("ip", "route", "replace", node.pod_cidr, "via", node.ip)
    (state_dir / "network.json").write_text(json.dumps({"nodes": [n.index for n in node_list]}))


def _setup_node(node: NodeNet, node_list: list[NodeNet]) -> None:
    if not netns_exists(node.netns):
        run("ip", "netns", "add", node.netns)
    if not link_exists("eth0", node.netns):
        run("ip", "link", "del", node.host_veth, check=False)
        _ip_batch([f"link add {node.host_veth} type veth peer name eth0 netns {node.netns}",
                   f"link set {node.host_veth} master {HOST_BRIDGE}", f"link set {node.host_veth} up"])
    routes = [f"route replace {other.pod_cidr} via {other.ip}" for other in node_list if other != node]
    _ip_batch(["link set lo up", f"addr replace {node.ip}/24 dev eth0", "link set eth0 up",
               f"route replace default via {HOST_IP}", *routes], node.netns)
    for sysctl in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
        run("ip", "netns", "exec", node.netns, "sysctl", "-q", "-w", sysctl)


def teardown(state_dir: Path) -> list[str]:
    """Remove everything `setup` made, whatever is left of it. Returns what it removed."""
    removed: list[str] = []
    record = state_dir / "network.json"
    indexes = json.loads(record.read_text())["nodes"] if record.exists() else []
    for index in indexes:
        node = NodeNet(index)
        run("ip", "route", "del", node.pod_cidr, check=False)
        if netns_exists(node.netns):
            run("ip", "netns", "del", node.netns)
            removed.append(f"netns {node.netns}")
        if link_exists(node.host_veth):
            run("ip", "link", "del", node.host_veth, check=False)
        shutil.rmtree(f"/etc/netns/{node.netns}", ignore_errors=True)
    for rule in _FORWARD_RULES:
        while run("iptables", "-w", "-D", "FORWARD", *rule, *_COMMENT, check=False).returncode == 0:
            removed.append(f"iptables FORWARD {' '.join(rule)}")
    if link_exists(HOST_BRIDGE):
        run("ip", "link", "del", HOST_BRIDGE)
        removed.append(f"bridge {HOST_BRIDGE}")
    record.unlink(missing_ok=True)
    return removed


def leftovers() -> list[str]:
    """What of ours is still on the machine (for `down`'s final check and the tests)."""
    found = [f"netns {p.name}" for p in Path("/run/netns").glob(f"{NETNS_PREFIX}*")] if Path(
        "/run/netns").exists() else []
    if link_exists(HOST_BRIDGE):
        found.append(f"bridge {HOST_BRIDGE}")
    found += [f"dir /etc/netns/{p.name}" for p in Path("/etc/netns").glob(f"{NETNS_PREFIX}*")] if Path(
        "/etc/netns").exists() else []
    return found
