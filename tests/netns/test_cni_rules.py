"""In-pod redirection rules (PROTOCOLS.md §2) in real network namespaces, for both backends (root only).

Each test gets a "node" and a "pod" namespace joined by a veth (node 10.99.0.1, pod 10.99.0.2), both deleted
afterwards, which takes every rule, set, route and socket in them along. A fake ztunnel in the pod netns
listens on 15001/15006/15008/15053 with SO_MARK 1337, as the real one does, to show where traffic lands.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import pytest

from cni.rules import HostProbe, InpodRules, NetnsError, PodRuleConfig, RuleError, in_netns

pytestmark = pytest.mark.netns
T = TypeVar("T")

NODE_IP, POD_IP = "10.99.0.1", "10.99.0.2"
NODE_IP6, POD_IP6 = "fd99::1", "fd99::2"
ZTUNNEL_MARK = 1337
SO_ORIGINAL_DST = 80
TIMEOUT = 5.0  # seconds any single connect/accept/recv may take before the test fails
BACKENDS = ["iptables", "nftables"]


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@dataclass
class Topology:
    node: str
    pod: str
    ipv6: bool

    def pod_sh(self, *argv: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.pod, *argv, check=check)


@pytest.fixture
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("ip", "nsenter", "iptables-restore", "nft", "ipset"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} on PATH")
    suffix = uuid.uuid4().hex[:8]
    t = Topology(node=f"ambt-{suffix}-node", pod=f"ambt-{suffix}-pod", ipv6=False)
    try:
        sh("ip", "netns", "add", t.node)
        sh("ip", "netns", "add", t.pod)
        sh("ip", "-n", t.node, "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns", t.pod)
        for ns, dev, ip in ((t.node, "veth-pod", NODE_IP), (t.pod, "eth0", POD_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", t.pod, "route", "add", "default", "via", NODE_IP)
        t.ipv6 = add_ipv6(t)
        yield t
    finally:
        sh("ip", "netns", "del", t.pod, check=False)
        sh("ip", "netns", "del", t.node, check=False)


def add_ipv6(t: Topology) -> bool:
    """Give both ends an IPv6 address; False when the kernel has IPv6 off (the IPv6 tests then skip)."""
    if not os.path.exists("/proc/sys/net/ipv6"):
        return False
    for ns, dev, ip in ((t.node, "veth-pod", NODE_IP6), (t.pod, "eth0", POD_IP6)):
        proc = subprocess.run(["ip", "-n", ns, "-6", "addr", "add", f"{ip}/64", "dev", dev, "nodad"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return False
    return True


# --- what a netns holds --------------------------------------------------------------------------------------

def listing(t: Topology, backend: str) -> str:
    """Our rules as the tools list them, counters and timestamps stripped, so two listings compare."""
    if backend == "iptables":
        text = t.pod_sh("iptables-save") + t.pod_sh("ip6tables-save")
        return "\n".join(re.sub(r"\[\d+:\d+\]", "", x) for x in text.splitlines() if not x.startswith("#"))
    return re.sub(r"counter packets \d+ bytes \d+", "counter", t.pod_sh("nft", "list", "ruleset"))


def leftovers(t: Topology) -> list[str]:
    found = []
    for family in ("iptables", "ip6tables"):
        if "ISTIO" in t.pod_sh(f"{family}-save"):
            found.append(f"{family} ISTIO chains")
    if "istio-ambient" in t.pod_sh("nft", "list", "ruleset"):
        found.append("nft istio tables")
    for flag in ("-4", "-6"):
        if "32764" in sh("ip", "-n", t.pod, flag, "rule"):
            found.append(f"ip {flag} rule pref 32764")
        if "table 100" in sh("ip", "-n", t.pod, flag, "route", "show", "table", "all"):
            found.append(f"ip {flag} route in table 100")
    return found


# --- lifecycle -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_is_idempotent_and_remove_leaves_nothing(topo: Topology, backend: str) -> None:
    rules, cfg = InpodRules(backend), PodRuleConfig()
    assert rules.backend == backend
    rules.apply(topo.pod, cfg)
    assert rules.verify(topo.pod, cfg) == []
    first = listing(topo, backend)
    rules.apply(f"/run/netns/{topo.pod}", cfg)  # the same netns by path
    assert listing(topo, backend) == first, "a second apply changed the rule set"
    assert rules.verify(topo.pod, cfg) == []
    assert sh("ip", "-n", topo.pod, "rule").count("32764") == 1

    rules.remove(topo.pod)
    assert leftovers(topo) == []
    rules.remove(topo.pod)  # idempotent
    rules.remove("ambt-never-existed")  # a netns that is gone has nothing left


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_variant_applies_over_any_other_and_verifies_clean(topo: Topology, backend: str) -> None:
    if not topo.ipv6:
        pytest.skip("IPv6 is not available in network namespaces on this kernel")
    rules = InpodRules(backend)
    variants = [PodRuleConfig(ipv6=True), PodRuleConfig(ipv6=True, ingress=True),
                PodRuleConfig(ipv6=True, dns_capture=False),
                PodRuleConfig(ipv6=True, virtual_interfaces=("vm0", "vm1")),
                PodRuleConfig(ipv6=True, ingress=True, virtual_interfaces=("vm0",)), PodRuleConfig(ipv6=True)]
    for cfg in variants:
        rules.apply(topo.pod, cfg)
        assert rules.verify(topo.pod, cfg) == [], cfg
    assert "32764" in sh("ip", "-n", topo.pod, "-6", "rule")
    rules.remove(topo.pod)
    assert leftovers(topo) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_clears_the_other_backend_too(topo: Topology, backend: str) -> None:
    other = "nftables" if backend == "iptables" else "iptables"
    InpodRules(other).apply(topo.pod, PodRuleConfig())
    InpodRules(backend).remove(topo.pod)
    assert leftovers(topo) == []


def test_apply_to_a_missing_netns_names_it() -> None:
    with pytest.raises(RuleError) as e:
        InpodRules("nftables").apply("/run/netns/ambt-does-not-exist", PodRuleConfig())
    assert e.value.reason == "netns-missing" and "/run/netns/ambt-does-not-exist" in e.value.message


def test_in_netns_runs_code_inside_the_namespace_and_hands_back_results_and_errors(topo: Topology) -> None:
    def addresses() -> list[str]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((NODE_IP, 9))  # no packet is sent: this only asks the routing table for a source address
            return [s.getsockname()[0]]

    assert in_netns(topo.pod, addresses) == [POD_IP]
    assert in_netns(f"/run/netns/{topo.node}", addresses) == [NODE_IP]
    with pytest.raises(ZeroDivisionError):
        in_netns(topo.pod, lambda: 1 // 0)
    with pytest.raises(NetnsError, match="cannot open network namespace /run/netns/ambt-missing"):
        in_netns("ambt-missing", addresses)


# --- drift ---------------------------------------------------------------------------------------------------

def delete_rule_14_by_hand(t: Topology, backend: str) -> None:
    if backend == "iptables":
        t.pod_sh("iptables", "-t", "nat", "-D", "ISTIO_OUTPUT", "!", "-d", "127.0.0.1/32", "-p", "tcp", "-m", "mark",
                 "!", "--mark", "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15001")
        return
    chain = t.pod_sh("nft", "-a", "list", "chain", "inet", "istio-ambient-nat", "istio-output")
    handle = re.findall(r"redirect to :15001 # handle (\d+)", chain)[0]
    t.pod_sh("nft", "delete", "rule", "inet", "istio-ambient-nat", "istio-output", "handle", handle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drift_is_reported_and_repaired(topo: Topology, backend: str) -> None:
    rules, cfg = InpodRules(backend), PodRuleConfig()
    rules.apply(topo.pod, cfg)
    delete_rule_14_by_hand(topo, backend)
    sh("ip", "-n", topo.pod, "rule", "del", "pref", "32764")
    expected_rule = "nat ISTIO_OUTPUT rule 14 missing" if backend == "iptables" else \
        "istio-ambient-nat istio-output rule 14 missing"
    assert rules.verify(topo.pod, cfg) == ["ip rule fwmark 0x111/0xfff lookup 100 missing", expected_rule]
    rules.apply(topo.pod, cfg)
    assert rules.verify(topo.pod, cfg) == []


# --- traffic -------------------------------------------------------------------------------------------------

def marked(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
    return sock


def listen(kind: int, addr: str, port: int, mark: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mark:
        marked(sock)
    sock.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    sock.settimeout(TIMEOUT)
    return sock


def client(kind: int = socket.SOCK_STREAM, mark: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    if mark:
        marked(sock)
    sock.settimeout(TIMEOUT)
    return sock


def original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def nothing_pending(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
        return False
    except BlockingIOError:
        return True
    finally:
        listener.settimeout(TIMEOUT)


@dataclass
class FakeZtunnel:
    """Listeners in the pod netns with ztunnel's mark, plus a plain app on 8080 and servers on the node."""

    t: Topology
    sockets: dict[str, socket.socket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
        for name, kind, port in (("outbound", tcp, 15001), ("inbound", tcp, 15006), ("hbone", tcp, 15008),
                                 ("dns_tcp", tcp, 15053), ("dns_udp", udp, 15053)):
            self.sockets[name] = in_netns(self.t.pod, partial(listen, kind, "0.0.0.0", port, mark=True))
        self.sockets["app"] = in_netns(self.t.pod, partial(listen, tcp, "0.0.0.0", 8080, mark=False))
        self.sockets["node_http"] = in_netns(self.t.node, partial(listen, tcp, NODE_IP, 80, mark=False))
        self.sockets["node_dns"] = in_netns(self.t.node, partial(listen, udp, NODE_IP, 53, mark=False))

    def __getitem__(self, name: str) -> socket.socket:
        return self.sockets[name]

    def pod_client(self, kind: int = socket.SOCK_STREAM, mark: bool = False) -> socket.socket:
        return in_netns(self.t.pod, partial(client, kind, mark))

    def node_client(self) -> socket.socket:
        return in_netns(self.t.node, client)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


@pytest.fixture(params=BACKENDS)
def captured(request: pytest.FixtureRequest, topo: Topology) -> Iterator[tuple[FakeZtunnel, InpodRules]]:
    rules = InpodRules(request.param)
    rules.apply(topo.pod, PodRuleConfig())
    z = FakeZtunnel(topo)
    try:
        yield z, rules
    finally:
        z.close()


def test_outbound_tcp_lands_on_15001_with_its_original_destination(captured: tuple[FakeZtunnel, InpodRules]) -> None:
    z, _ = captured
    with z.pod_client() as c:
        c.connect((NODE_IP, 80))
        conn, _ = z["outbound"].accept()
        with conn:
            assert original_dst(conn) == (NODE_IP, 80)
    assert nothing_pending(z["node_http"])


def test_inbound_tcp_lands_on_15006_with_its_original_destination(captured: tuple[FakeZtunnel, InpodRules]) -> None:
    z, _ = captured
    with z.node_client() as c:
        c.connect((POD_IP, 8080))
        conn, peer = z["inbound"].accept()
        with conn:
            assert original_dst(conn) == (POD_IP, 8080)
            assert peer[0] == NODE_IP
    assert nothing_pending(z["app"])


def test_hbone_port_15008_is_not_captured(captured: tuple[FakeZtunnel, InpodRules]) -> None:
    z, _ = captured
    with z.node_client() as c:
        c.connect((POD_IP, 15008))
        conn, _ = z["hbone"].accept()
        conn.close()
    assert nothing_pending(z["inbound"])


def test_ztunnels_own_marked_connections_are_not_captured(captured: tuple[FakeZtunnel, InpodRules]) -> None:
    z, _ = captured
    with z.pod_client(mark=True) as c:
        c.connect((NODE_IP, 80))
        conn, _ = z["node_http"].accept()
        conn.close()
    assert nothing_pending(z["outbound"])


def test_dns_is_captured_to_15053_only_with_dns_capture_on(captured: tuple[FakeZtunnel, InpodRules]) -> None:
    z, rules = captured
    with z.pod_client(socket.SOCK_DGRAM) as c:
        c.sendto(b"query-1", (NODE_IP, 53))
        assert z["dns_udp"].recvfrom(100)[0] == b"query-1"
    with z.pod_client() as c:
        c.connect((NODE_IP, 53))
        conn, _ = z["dns_tcp"].accept()
        with conn:
            assert original_dst(conn) == (NODE_IP, 53)

    rules.apply(z.t.pod, PodRuleConfig(dns_capture=False))
    with z.pod_client(socket.SOCK_DGRAM) as c:
        c.sendto(b"query-2", (NODE_IP, 53))
        assert z["node_dns"].recvfrom(100)[0] == b"query-2"
    z["dns_udp"].setblocking(False)
    with pytest.raises(BlockingIOError):
        z["dns_udp"].recvfrom(100)


def test_kubelet_probes_are_snatted_and_skip_capture(captured: tuple[FakeZtunnel, InpodRules]) -> None:
    z, rules = captured
    probe = HostProbe(rules.backend, kubelet_uid=os.geteuid())
    in_netns(z.t.node, probe.ensure)
    in_netns(z.t.node, lambda: probe.add("pod-uid-1", [POD_IP]))
    assert in_netns(z.t.node, probe.verify) == []
    assert in_netns(z.t.node, probe.members) == {POD_IP: "pod-uid-1"}
    with z.node_client() as c:
        c.connect((POD_IP, 8080))
        conn, peer = z["app"].accept()
        conn.close()
    assert peer[0] == "169.254.7.127"
    assert nothing_pending(z["inbound"])

    in_netns(z.t.node, lambda: probe.remove("pod-uid-1", [POD_IP]))
    with z.node_client() as c:
        c.connect((POD_IP, 8080))
        conn, peer = z["inbound"].accept()
        conn.close()
    assert peer[0] == NODE_IP


# --- host probe bookkeeping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_host_probe_sets_track_pod_uids_and_teardown_leaves_nothing(topo: Topology, backend: str) -> None:
    probe = HostProbe(backend, ipv6=topo.ipv6)

    def node(fn: Callable[[], T]) -> T:
        return in_netns(topo.node, fn)

    node(probe.ensure)
    node(probe.ensure)
    node(lambda: probe.add("uid-a", ["10.99.0.2", "10.99.0.3"] + (["fd99::2"] if topo.ipv6 else [])))
    node(lambda: probe.add("uid-b", ["10.99.0.3"]))  # the IP moved to a new pod
    node(lambda: probe.remove("uid-a", ["10.99.0.3"]))  # the old pod's removal must not take it away
    expected = {"10.99.0.2": "uid-a", "10.99.0.3": "uid-b"} | ({"fd99::2": "uid-a"} if topo.ipv6 else {})
    assert node(probe.members) == expected
    assert node(probe.verify) == []
    node(lambda: probe.remove("uid-a"))
    assert node(probe.members) == {"10.99.0.3": "uid-b"}

    node(probe.teardown)
    node(probe.teardown)
    nat = sh("ip", "netns", "exec", topo.node, "iptables-save", "-t", "nat")
    assert "ISTIO_POSTRT" not in nat
    assert "istio-ambient-nat" not in sh("ip", "netns", "exec", topo.node, "nft", "list", "ruleset")
    assert "istio-inpod-probes" not in sh("ip", "netns", "exec", topo.node, "ipset", "list", "-n")
