"""kube-proxy rule rendering and the iptables shell, driven by a scripted command runner."""

from __future__ import annotations

import random
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.local.kubeproxy import (
    CHAIN_POSTROUTING,
    CHAIN_SERVICES,
    KubeProxy,
    KubeProxyError,
    chains_in,
    jump_rules_missing,
    jump_rules_to_delete,
    render,
    render_removal,
    run_command,
)

Obj = dict[str, Any]


def service(
    name: str = "web",
    namespace: str = "default",
    cluster_ip: str | None = "10.96.0.10",
    ports: list[Obj] | None = None,
) -> Obj:
    spec: Obj = {"ports": ports if ports is not None else [{"name": "http", "port": 80, "targetPort": 8080}]}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


def endpoint(ip: str, ready: bool | None = True) -> Obj:
    conditions = {} if ready is None else {"ready": ready}
    return {"addresses": [ip], "conditions": conditions}


def endpoint_slice(
    endpoints: list[Obj],
    service_name: str = "web",
    namespace: str = "default",
    ports: list[Obj] | None = None,
    name: str = "web-abcde",
) -> Obj:
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def rules(payload: str, chain_prefix: str = "") -> list[str]:
    return [line for line in payload.splitlines() if line.startswith(f"-A {chain_prefix}")]


def declared(payload: str, prefix: str) -> list[str]:
    return [line[1:].split()[0] for line in payload.splitlines() if line.startswith(f":{prefix}")]


def jump_target(rule: str) -> str:
    return rule.rsplit(maxsplit=1)[-1]


def args(command_line: str) -> list[str]:
    return shlex.split(command_line)


BASE_CHAINS = [CHAIN_SERVICES, CHAIN_POSTROUTING]


def test_two_ready_endpoints_of_three_spread_evenly() -> None:
    payload = render(
        [service()],
        [endpoint_slice([endpoint("10.1.0.5"), endpoint("10.1.0.6"), endpoint("10.1.0.7", ready=False)])],
    )
    svc_chains = declared(payload, "AMBIENT-SVC-")
    sep_chains = declared(payload, "AMBIENT-SEP-")
    assert len(svc_chains) == 1
    assert len(sep_chains) == 2

    [portal] = rules(payload, CHAIN_SERVICES)
    assert portal.startswith("-A AMBIENT-SERVICES -d 10.96.0.10/32 -p tcp ")
    assert portal.endswith(f"-m tcp --dport 80 -j {svc_chains[0]}")

    first, last = rules(payload, svc_chains[0])
    assert "-m statistic --mode random --probability 0.5000000000 " in first
    assert "statistic" not in last
    assert {jump_target(first), jump_target(last)} == set(sep_chains)

    dnats = [rule for rule in rules(payload, "AMBIENT-SEP-") if "DNAT" in rule]
    assert [rule.split()[-1] for rule in dnats] == ["10.1.0.5:8080", "10.1.0.6:8080"]
    assert "10.1.0.7" not in payload


def test_endpoint_without_ready_condition_counts_as_ready() -> None:
    payload = render([service()], [endpoint_slice([endpoint("10.1.0.5", ready=None)])])
    assert "--to-destination 10.1.0.5:8080" in payload


def test_hairpin_is_marked_in_endpoint_chain_and_masqueraded() -> None:
    payload = render([service()], [endpoint_slice([endpoint("10.1.0.5")])])
    [sep_chain] = declared(payload, "AMBIENT-SEP-")
    mark, dnat = rules(payload, sep_chain)
    assert mark.startswith(f"-A {sep_chain} -s 10.1.0.5/32 ")
    assert mark.endswith("-j MARK --set-xmark 0x4000/0x4000")
    assert dnat.endswith("-p tcp -m comment --comment default/web:http -m tcp -j DNAT --to-destination 10.1.0.5:8080")
    assert rules(payload, CHAIN_POSTROUTING) == [
        "-A AMBIENT-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A AMBIENT-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A AMBIENT-POSTROUTING -m comment --comment "ambient hairpin traffic requiring SNAT" -j MASQUERADE',
    ]


def test_named_target_port_resolves_through_the_slice_port_of_the_same_name() -> None:
    svc = service(ports=[{"name": "web", "port": 80, "targetPort": "http"}, {"name": "admin", "port": 9090}])
    slices = [
        # Two slices because the pods behind them name different container ports "http".
        endpoint_slice([endpoint("10.1.0.5")], ports=[{"name": "web", "port": 8080, "protocol": "TCP"}]),
        endpoint_slice([endpoint("10.1.0.6")], ports=[{"name": "web", "port": 8081, "protocol": "TCP"}], name="b"),
    ]
    payload = render([svc], slices)
    assert [r.split()[-1] for r in rules(payload, "AMBIENT-SEP-") if "DNAT" in r] == ["10.1.0.5:8080", "10.1.0.6:8081"]
    # "admin" has no slice port of that name, hence no endpoints and no rules.
    assert len(rules(payload, CHAIN_SERVICES)) == 1
    assert "admin" not in payload


def test_unnamed_single_port_matches_unnamed_slice_port() -> None:
    svc = service(ports=[{"port": 80, "targetPort": 8080}])
    for slice_port in ({"port": 8080}, {"name": "", "port": 8080, "protocol": "TCP"}):
        payload = render([svc], [endpoint_slice([endpoint("10.1.0.5")], ports=[slice_port])])
        assert "--to-destination 10.1.0.5:8080" in payload
        assert '--comment "default/web cluster IP"' in payload


def test_udp_service() -> None:
    svc = service(name="dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    payload = render([svc], [endpoint_slice([endpoint("10.1.0.9")], service_name="dns", ports=ports)])
    [portal] = rules(payload, CHAIN_SERVICES)
    assert " -p udp " in portal
    assert portal.endswith(f"-m udp --dport 53 -j {declared(payload, 'AMBIENT-SVC-')[0]}")
    assert any(
        r.endswith("-p udp -m comment --comment default/dns:dns -m udp -j DNAT --to-destination 10.1.0.9:5353")
        for r in rules(payload, "AMBIENT-SEP-")
    )


def test_protocol_must_match_between_service_and_slice() -> None:
    svc = service(ports=[{"name": "http", "port": 80, "protocol": "UDP"}])
    payload = render([svc], [endpoint_slice([endpoint("10.1.0.5")])])  # slice port is TCP
    assert rules(payload, CHAIN_SERVICES) == []


@pytest.mark.parametrize("cluster_ip", ["None", "", None])
def test_headless_or_ipless_service_produces_nothing(cluster_ip: str | None) -> None:
    payload = render([service(cluster_ip=cluster_ip)], [endpoint_slice([endpoint("10.1.0.5")])])
    assert declared(payload, "AMBIENT-") == BASE_CHAINS
    assert rules(payload, CHAIN_SERVICES) == []
    assert declared(payload, "AMBIENT-SEP-") == []


def test_service_without_ready_endpoints_has_no_dnat_and_no_chain() -> None:
    payload = render([service()], [endpoint_slice([endpoint("10.1.0.5", ready=False)])])
    assert declared(payload, "AMBIENT-") == BASE_CHAINS
    assert "DNAT" not in payload
    assert "REJECT" not in payload


def test_slices_of_other_services_and_namespaces_are_ignored() -> None:
    slices = [
        endpoint_slice([endpoint("10.1.0.5")], service_name="other"),
        endpoint_slice([endpoint("10.1.0.6")], namespace="prod"),
        {**endpoint_slice([endpoint("fd00::1")]), "addressType": "IPv6"},
    ]
    assert declared(render([service()], slices), "AMBIENT-") == BASE_CHAINS


def test_stale_chains_are_declared_then_deleted() -> None:
    old = render([service()], [endpoint_slice([endpoint("10.1.0.5"), endpoint("10.1.0.6")])])
    current = render([service()], [endpoint_slice([endpoint("10.1.0.6")])])
    stale = set(declared(old, "AMBIENT-SEP-")) - set(declared(current, "AMBIENT-SEP-"))
    assert len(stale) == 1
    existing = set(declared(old, "AMBIENT-")) | {"PREROUTING", "KUBE-SVC-ABC"}

    payload = render([service()], [endpoint_slice([endpoint("10.1.0.6")])], existing_chains=existing)
    lines = payload.splitlines()
    assert [line for line in lines if line.startswith("-X ")] == [f"-X {chain}" for chain in sorted(stale)]
    # Declared (so emptied and unreferenced) before being deleted, all in one transaction.
    [chain] = stale
    assert lines.index(f":{chain} - [0:0]") < lines.index(f"-X {chain}") < lines.index("COMMIT")
    # Apart from the deletions it is the same payload as without existing chains.
    assert [line for line in lines if line != f":{chain} - [0:0]" and not line.startswith("-X")] == (
        current.splitlines()
    )


def test_everything_goes_stale_when_services_disappear() -> None:
    old = render([service()], [endpoint_slice([endpoint("10.1.0.5")])])
    payload = render([], [], existing_chains=set(declared(old, "AMBIENT-")))
    deleted = {line.split()[1] for line in payload.splitlines() if line.startswith("-X ")}
    assert deleted == set(declared(old, "AMBIENT-SVC-")) | set(declared(old, "AMBIENT-SEP-"))
    assert CHAIN_SERVICES not in deleted


def test_output_is_stable_and_independent_of_input_order() -> None:
    services = [service(name=f"s{i}", cluster_ip=f"10.96.0.{i + 1}") for i in range(5)]
    slices = [
        endpoint_slice([endpoint(f"10.1.{i}.{j}") for j in (3, 1, 2)], service_name=f"s{i}", name=f"s{i}-x")
        for i in range(5)
    ]
    expected = render(services, slices)
    assert render(services, slices) == expected
    shuffler = random.Random(7)
    for _ in range(5):
        shuffled_services, shuffled_slices = services[:], slices[:]
        shuffler.shuffle(shuffled_services)
        shuffler.shuffle(shuffled_slices)
        assert render(shuffled_services, shuffled_slices) == expected


def test_chain_names_are_stable_hashes_within_iptables_limit() -> None:
    payload = render([service()], [endpoint_slice([endpoint("10.1.0.5")])])
    names = declared(payload, "AMBIENT-")
    assert all(len(name) <= 28 for name in names)
    assert all(re.fullmatch(r"AMBIENT-(SVC|SEP)-[A-Z2-7]{16}", name) for name in names[2:])
    other_port = render(
        [service(ports=[{"name": "grpc", "port": 80}])],
        [endpoint_slice([endpoint("10.1.0.5")], ports=[{"name": "grpc", "port": 8080}])],
    )
    assert set(declared(other_port, "AMBIENT-SVC-")).isdisjoint(declared(payload, "AMBIENT-SVC-"))


@given(count=st.integers(min_value=1, max_value=40))
def test_statistic_chain_gives_every_endpoint_an_equal_share(count: int) -> None:
    eps = [endpoint(f"10.1.{i // 200}.{i % 200 + 1}") for i in range(count)]
    payload = render([service()], [endpoint_slice(eps)])
    [svc_chain] = declared(payload, "AMBIENT-SVC-")
    remaining, shares = 1.0, []
    for rule in rules(payload, svc_chain):
        match = re.search(r"--probability (\S+)", rule)
        probability = float(match.group(1)) if match else 1.0
        shares.append(remaining * probability)
        remaining -= shares[-1]
    assert len(shares) == count
    assert remaining == pytest.approx(0.0, abs=1e-9)
    assert shares == pytest.approx([1.0 / count] * count, abs=1e-9)


SAVE_WITHOUT_JUMPS = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
# Completed on Mon Jan  1 00:00:00 2024
"""

SAVE_WITH_OURS = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [3:180]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [12:720]
:POSTROUTING ACCEPT [12:720]
:AMBIENT-POSTROUTING - [0:0]
:AMBIENT-SEP-A - [0:0]
:AMBIENT-SERVICES - [0:0]
:AMBIENT-SVC-B - [0:0]
-A PREROUTING -m comment --comment "ambient service portals" -j AMBIENT-SERVICES
-A OUTPUT -m comment --comment "ambient service portals" -j AMBIENT-SERVICES
-A OUTPUT -d 10.0.0.0/8 -j AMBIENT-SERVICES
-A AMBIENT-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http" -m tcp --dport 80 -j AMBIENT-SVC-B
-A AMBIENT-SVC-B -m comment --comment "default/web:http -> 10.1.0.5:8080" -j AMBIENT-SEP-A
-A AMBIENT-SEP-A -p tcp -m comment --comment default/web:http -m tcp -j DNAT --to-destination 10.1.0.5:8080
COMMIT
"""


def test_jump_rules_missing_from_a_table_without_ours() -> None:
    assert jump_rules_missing(SAVE_WITHOUT_JUMPS) == [
        args('-t nat -I PREROUTING -m comment --comment "ambient service portals" -j AMBIENT-SERVICES'),
        args('-t nat -I OUTPUT -m comment --comment "ambient service portals" -j AMBIENT-SERVICES'),
        args('-t nat -I POSTROUTING -m comment --comment "ambient postrouting rules" -j AMBIENT-POSTROUTING'),
    ]
    assert jump_rules_missing("") == jump_rules_missing(SAVE_WITHOUT_JUMPS)


def test_jump_rules_missing_only_reports_what_is_absent() -> None:
    assert [insert[3] for insert in jump_rules_missing(SAVE_WITH_OURS)] == ["POSTROUTING"]
    complete = SAVE_WITH_OURS.replace(
        "COMMIT", '-A POSTROUTING -m comment --comment "ambient postrouting rules" -j AMBIENT-POSTROUTING\nCOMMIT'
    )
    assert jump_rules_missing(complete) == []


def test_jump_rules_to_delete_reproduce_each_rule_spec() -> None:
    assert jump_rules_to_delete(SAVE_WITH_OURS) == [
        args('-t nat -D PREROUTING -m comment --comment "ambient service portals" -j AMBIENT-SERVICES'),
        args('-t nat -D OUTPUT -m comment --comment "ambient service portals" -j AMBIENT-SERVICES'),
        args("-t nat -D OUTPUT -d 10.0.0.0/8 -j AMBIENT-SERVICES"),
    ]
    assert jump_rules_to_delete(SAVE_WITHOUT_JUMPS) == []


def test_chains_in() -> None:
    assert chains_in(SAVE_WITH_OURS) == {
        "PREROUTING",
        "INPUT",
        "OUTPUT",
        "POSTROUTING",
        "AMBIENT-POSTROUTING",
        "AMBIENT-SEP-A",
        "AMBIENT-SERVICES",
        "AMBIENT-SVC-B",
    }


def test_render_removal_deletes_only_our_chains() -> None:
    payload = render_removal(chains_in(SAVE_WITH_OURS) | {"KUBE-SERVICES"})
    deleted = [line.removeprefix("-X ") for line in payload.splitlines() if line.startswith("-X")]
    assert deleted == ["AMBIENT-POSTROUTING", "AMBIENT-SEP-A", "AMBIENT-SERVICES", "AMBIENT-SVC-B"]
    assert "KUBE" not in payload
    assert "PREROUTING" not in payload


class ScriptedRunner:
    """Answers iptables-save with a fixed text and records every command."""

    def __init__(self, save_output: str) -> None:
        self.save_output = save_output
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str:
        self.calls.append((list(argv), stdin))
        return self.save_output if argv[0] == "iptables-save" else ""


def test_sync_saves_restores_then_inserts_missing_jumps() -> None:
    runner = ScriptedRunner(SAVE_WITH_OURS)
    services, slices = [service()], [endpoint_slice([endpoint("10.1.0.6")])]
    KubeProxy(runner).sync(services, slices)
    argvs = [argv for argv, _ in runner.calls]
    assert argvs == [
        ["iptables-save", "-t", "nat"],
        ["iptables-restore", "--noflush", "-w"],
        args(
            'iptables -w -t nat -I POSTROUTING -m comment --comment "ambient postrouting rules" -j AMBIENT-POSTROUTING'
        ),
    ]
    payload = runner.calls[1][1]
    assert payload == render(services, slices, chains_in(SAVE_WITH_OURS))
    assert "-X AMBIENT-SEP-A" in payload


def test_remove_deletes_jumps_then_chains() -> None:
    runner = ScriptedRunner(SAVE_WITH_OURS)
    KubeProxy(runner).remove()
    argvs = [argv for argv, _ in runner.calls]
    assert argvs[0] == ["iptables-save", "-t", "nat"]
    assert [argv[4] for argv in argvs[1:4]] == ["-D", "-D", "-D"]
    assert argvs[4] == ["iptables-restore", "--noflush", "-w"]
    assert runner.calls[4][1] == render_removal(chains_in(SAVE_WITH_OURS))
    assert len(argvs) == 5


def test_remove_with_nothing_of_ours_only_reads() -> None:
    runner = ScriptedRunner(SAVE_WITHOUT_JUMPS)
    KubeProxy(runner).remove()
    assert [argv for argv, _ in runner.calls] == [["iptables-save", "-t", "nat"]]


def test_failed_command_carries_command_and_stderr() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('iptables: Permission denied'); sys.exit(4)"]
    with pytest.raises(KubeProxyError) as caught:
        run_command(argv)
    assert caught.value.command == tuple(argv)
    assert caught.value.stderr == "iptables: Permission denied"
    assert caught.value.returncode == 4
    assert caught.value.reason == "iptables_failed"
    assert shlex.join(argv) in str(caught.value)
    assert "CAP_NET_ADMIN" in str(caught.value)


def test_missing_binary_is_a_kubeproxy_error() -> None:
    with pytest.raises(KubeProxyError) as caught:
        run_command(["/nonexistent/iptables-restore", "--noflush"], "*nat\nCOMMIT\n")
    assert caught.value.command == ("/nonexistent/iptables-restore", "--noflush")


def test_run_command_feeds_stdin_and_returns_stdout() -> None:
    assert run_command([sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"], "nat") == "NAT\n"
