"""nftables renderer transcripts: `nft list ruleset` output in, drift out; element scripts for the probe sets.

`listed_nft_ruleset_dual.txt` is what nft 1.0.6 listed after applying the default dual-stack rule set in a
real namespace (after an iptables-nft run, so foreign `ip`/`ip6` tables are in it too);
`listed_nft_ruleset_host.txt` the host probe table with one pod (uid-1) enrolled.
"""

from __future__ import annotations

from pathlib import Path

from cni.rules import PodRuleConfig
from cni.rules.nftables import normalize, parse_ruleset, render_elements, render_removal, verify_host, verify_pod

GOLDEN = Path(__file__).parent / "golden"
LISTED = (GOLDEN / "listed_nft_ruleset_dual.txt").read_text()
HOST = (GOLDEN / "listed_nft_ruleset_host.txt").read_text()
DUAL = PodRuleConfig(ipv6=True)

RULE14_V4 = ("meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0x00000fff != 0x00000539 counter packets 0 "
             "bytes 0 redirect to :15001")


def without_line(text: str, needle: str) -> str:
    lines = text.splitlines()
    lines.remove(next(x for x in lines if x.strip() == needle))
    return "\n".join(lines) + "\n"


def test_parse_ruleset_reads_hooks_with_named_priorities_and_rules() -> None:
    tables = parse_ruleset(LISTED)
    nat = tables["inet istio-ambient-nat"]
    assert nat.chains["prerouting"].hook == ("nat", "prerouting", -100)  # listed as "priority dstnat"
    assert tables["inet istio-ambient-raw"].chains["output"].hook == ("filter", "output", -300)  # "priority raw"
    assert nat.chains["prerouting"].rules == ["jump istio-prerouting"]
    assert len(nat.chains["istio-output"].rules) == 10  # rules 8, 11, 13, 14 twice; 10 and 12 once
    assert "ip nat" in tables  # foreign tables are parsed, not confused with ours


def test_applied_rules_verify_clean() -> None:
    assert verify_pod(DUAL, LISTED) == []


def test_a_deleted_rule_is_named_with_its_family() -> None:
    drift = verify_pod(DUAL, without_line(LISTED, RULE14_V4))
    assert drift == ["istio-ambient-nat istio-output rule 14 (ipv4) missing"]


def test_ipv4_only_config_reports_the_ipv6_twins_as_unexpected() -> None:
    drift = verify_pod(PodRuleConfig(), LISTED)
    assert len(drift) == 6
    assert all("unexpected rule" in d and "ip6 " in d for d in drift)


def test_dns_off_reports_the_raw_table_and_dns_redirects() -> None:
    drift = verify_pod(PodRuleConfig(ipv6=True, dns_capture=False), LISTED)
    assert "istio-ambient-raw table present but not expected" in drift
    assert sum("redirect to :15053" in d for d in drift) == 3


def test_a_base_chain_with_the_wrong_priority_is_reported() -> None:
    listed = LISTED.replace("type filter hook prerouting priority mangle;", "type filter hook prerouting priority 0;")
    assert verify_pod(DUAL, listed) == [
        "istio-ambient-mangle prerouting is type filter hook prerouting priority 0, "
        "expected type filter hook prerouting priority -150"]


def test_missing_tables_are_one_item_each() -> None:
    assert verify_pod(DUAL, "") == ["istio-ambient-nat table missing", "istio-ambient-mangle table missing",
                                    "istio-ambient-raw table missing"]


def test_normalize_matches_what_older_and_newer_nft_print() -> None:
    assert normalize("mark and 0xfff != 0x539 counter") == normalize(
        "meta mark & 0x00000fff != 0x00000539 counter packets 12 bytes 720")
    assert normalize('oifname "lo" ip daddr != 127.0.0.1/32 counter accept') == normalize(
        "oifname lo ip daddr != 127.0.0.1 counter accept")
    # nft folds `& 0xfffff000 | 0x111` into `& 0xfffff111 | 0x111` when it prints
    assert normalize("ct mark set ct mark & 0xfffff000 | 0x111") == normalize(
        "ct mark set ct mark & 0xfffff111 | 0x00000111")


def test_removal_deletes_every_table_even_when_absent() -> None:
    assert render_removal() == ("add table inet istio-ambient-nat\ndelete table inet istio-ambient-nat\n"
                                "add table inet istio-ambient-mangle\ndelete table inet istio-ambient-mangle\n"
                                "add table inet istio-ambient-raw\ndelete table inet istio-ambient-raw\n")


def test_host_table_verifies_against_the_uid_it_was_installed_for() -> None:
    assert verify_host(0, ("ipv4", "ipv6"), HOST) == []
    drift = verify_host(1000, ("ipv4",), HOST)
    assert drift[0] == "istio-ambient-nat postrouting probe snat (ipv4) missing"
    assert len(drift) == 3  # and both skuid-0 rules are not ours
    assert verify_host(0, ("ipv4",), "") == ["istio-ambient-nat table missing"]
    assert parse_ruleset(HOST)["inet istio-ambient-nat"].sets == {"istio-inpod-probes-v4", "istio-inpod-probes-v6"}


def test_element_scripts() -> None:
    assert render_elements("add", "ipv4", {"10.0.0.1": "uid-1", "10.0.0.2": "uid-1"}) == (
        'add element inet istio-ambient-nat istio-inpod-probes-v4 { 10.0.0.1 comment "uid-1", '
        '10.0.0.2 comment "uid-1" }\n')
    assert render_elements("delete", "ipv6", {"fd00::1": None}) == (
        "delete element inet istio-ambient-nat istio-inpod-probes-v6 { fd00::1 }\n")
    assert render_elements("add", "ipv4", {}) == ""
