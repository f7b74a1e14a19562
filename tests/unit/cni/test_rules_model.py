"""The §2 rule model: which rules each variant gets, per-pod annotations, and the chain comparison."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni.rules import PodRuleConfig, RuleError
from cni.rules.model import (
    ANNOTATION_BYPASS_INBOUND,
    ANNOTATION_DNS_CAPTURE,
    ANNOTATION_VIRTUAL_INTERFACES,
    Rule,
    compare_chain,
    nft_pod_rules,
    pod_rules,
)


def numbers(rules: list[Rule]) -> list[int]:
    return [int(r.name.split()[1]) for r in rules if r.name.startswith("rule ")]


def test_default_pod_gets_rules_1_to_17_in_table_order() -> None:
    assert numbers(pod_rules(PodRuleConfig(), "ipv4")) == [*range(1, 16), 15, 16, 17]


def test_ingress_pod_omits_probe_exemption_and_inbound_redirect() -> None:
    assert set(range(1, 18)) - set(numbers(pod_rules(PodRuleConfig(ingress=True), "ipv4"))) == {7, 9}


def test_dns_capture_off_omits_dns_redirects_and_conntrack_zones() -> None:
    got = set(numbers(pod_rules(PodRuleConfig(dns_capture=False), "ipv4")))
    assert set(range(1, 18)) - got == {10, 11, 15, 16, 17}
    assert {r.table for r in pod_rules(PodRuleConfig(dns_capture=False), "ipv4")} == {"mangle", "nat"}


def test_ipv6_rules_use_ipv6_loopback_and_probe_address() -> None:
    text = "\n".join(r.iptables for r in pod_rules(PodRuleConfig(ipv6=True), "ipv6"))
    assert "::1/128" in text and "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128" in text
    assert "127.0.0.1" not in text and "169.254.7.127" not in text


def test_nft_dual_stack_twins_only_family_specific_rules() -> None:
    rules = nft_pod_rules(PodRuleConfig(ipv6=True))
    names = [r.name for r in rules]
    assert names.count("rule 14 (ipv4)") == names.count("rule 14 (ipv6)") == 1
    assert names.count("rule 10") == 1  # no address in it: one rule serves both families
    assert [r.name for r in nft_pod_rules(PodRuleConfig())].count("rule 14") == 1


def test_virtual_interfaces_come_first_in_nat_prerouting_chain() -> None:
    rules = [r for r in pod_rules(PodRuleConfig(virtual_interfaces=("vm0",)), "ipv4") if r.chain == "ISTIO_PRERT"
             and r.table == "nat"]
    assert [r.name for r in rules] == ["virtual interface vm0 redirect", "virtual interface vm0 return",
                                       "rule 7", "rule 9"]


def test_annotations_override_the_node_default() -> None:
    default = PodRuleConfig(dns_capture=False, ipv6=True, virtual_interfaces=("a0",))
    pod = PodRuleConfig.for_pod({ANNOTATION_BYPASS_INBOUND: "true", ANNOTATION_DNS_CAPTURE: "True",
                                 ANNOTATION_VIRTUAL_INTERFACES: "vm0, vm1"}, default)
    assert pod == PodRuleConfig(ingress=True, dns_capture=True, ipv6=True, virtual_interfaces=("vm0", "vm1"))
    assert PodRuleConfig.for_pod({}, default) == default


def test_unparseable_annotation_values_keep_the_default() -> None:
    pod = PodRuleConfig.for_pod({ANNOTATION_DNS_CAPTURE: "yes please", ANNOTATION_BYPASS_INBOUND: ""},
                                PodRuleConfig())
    assert pod == PodRuleConfig()


@pytest.mark.parametrize("name", ["eth0\n-A OUTPUT -j ACCEPT", 'x" accept', "", "a" * 16, "eth 0"])
def test_interface_names_that_could_inject_rules_are_refused(name: str) -> None:
    with pytest.raises(RuleError) as e:
        PodRuleConfig(virtual_interfaces=(name,))
    assert e.value.reason == "bad-config" and "not a valid interface name" in e.value.message


def test_a_config_without_any_family_is_refused() -> None:
    with pytest.raises(RuleError, match="at least one of ipv4 and ipv6"):
        PodRuleConfig(ipv4=False)


@given(st.dictionaries(st.sampled_from([ANNOTATION_BYPASS_INBOUND, ANNOTATION_DNS_CAPTURE,
                                        ANNOTATION_VIRTUAL_INTERFACES, "other"]), st.text()))
def test_any_annotations_give_a_valid_config_or_a_bad_config_error(annotations: dict[str, str]) -> None:
    try:
        cfg = PodRuleConfig.for_pod(annotations, PodRuleConfig())
    except RuleError as e:
        assert e.reason == "bad-config"
        return
    for rule in pod_rules(cfg, "ipv4") + nft_pod_rules(cfg):
        assert "\n" not in rule.iptables and "\n" not in rule.nft


def rule(name: str, text: str) -> Rule:
    return Rule(name, "nat", "ISTIO_OUTPUT", text, "")


def compare(expected: list[Rule], actual: list[str]) -> list[str]:
    return compare_chain("nat ISTIO_OUTPUT", expected, actual, lambda r: r.iptables, str.strip)


def test_compare_chain_reports_missing_unexpected_and_order() -> None:
    a, b = rule("rule 12", "-j A"), rule("rule 14", "-j B")
    assert compare([a, b], ["-j A", "-j B"]) == []
    assert compare([a, b], ["-j A"]) == ["nat ISTIO_OUTPUT rule 14 missing"]
    assert compare([a, b], ["-j A", "-j B", "-j C"]) == ["nat ISTIO_OUTPUT unexpected rule: -j C"]
    assert compare([a, b], ["-j A", "-j A", "-j B"]) == ["nat ISTIO_OUTPUT unexpected rule: -j A"]
    assert compare([a, b], ["-j B", "-j A"]) == ["nat ISTIO_OUTPUT rules out of order"]
