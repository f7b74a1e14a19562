"""iptables renderer transcripts: `iptables-save` output in, `iptables-restore --noflush` input or drift out.

The `listed_iptables_save_*.txt` files are what iptables-nft 1.8.9 printed after applying the default
dual-stack rule set in a real namespace.
"""

from __future__ import annotations

from pathlib import Path

from cni.rules import PodRuleConfig, render_iptables
from cni.rules.iptables import normalize, parse_save, removal_input, restore_input, verify_host, verify_pod
from cni.rules.model import HOST_CHAINS, POD_CHAINS, host_rules, pod_rules

GOLDEN = Path(__file__).parent / "golden"
SAVED_V4 = (GOLDEN / "listed_iptables_save_ipv4.txt").read_text()
SAVED_V6 = (GOLDEN / "listed_iptables_save_ipv6.txt").read_text()
DEFAULT = PodRuleConfig(ipv6=True)


def without(saved: str, line: str) -> str:
    """`saved` minus the first occurrence of `line` (jumps repeat across tables; the first is mangle's)."""
    lines = saved.splitlines()
    lines.remove(line)
    return "\n".join(lines) + "\n"


def with_extra(saved: str, after: str, line: str) -> str:
    return saved.replace(f"{after}\n", f"{after}\n{line}\n", 1)


def test_parse_save_reads_chains_and_rules_per_table() -> None:
    tables = parse_save(SAVED_V4)
    assert set(tables) == {"mangle", "nat", "raw"}
    assert {"ISTIO_PRERT", "ISTIO_OUTPUT", "PREROUTING"} <= set(tables["nat"].chains)
    assert tables["nat"].rules["PREROUTING"] == ["-j ISTIO_PRERT"]
    assert len(tables["nat"].rules["ISTIO_OUTPUT"]) == 6


def test_applied_rules_verify_clean_in_both_families() -> None:
    assert verify_pod(DEFAULT, "ipv4", SAVED_V4) == []
    assert verify_pod(DEFAULT, "ipv6", SAVED_V6) == []


def test_reapplying_over_the_same_state_adds_no_jumps() -> None:
    delta = restore_input(pod_rules(DEFAULT, "ipv4"), POD_CHAINS, SAVED_V4)
    lines = delta.splitlines()
    assert not [x for x in lines if x.startswith(("-A PREROUTING", "-A OUTPUT", "-D", "-I"))]
    # own chains are declared (which flushes them) and refilled in the same transaction
    assert lines.count(":ISTIO_OUTPUT - [0:0]") == 3
    assert [x for x in lines if x.startswith("-A ISTIO")] == [
        x for x in render_iptables(DEFAULT, "ipv4").splitlines() if x.startswith("-A ISTIO")]


def test_a_missing_jump_is_added_and_a_duplicate_deleted() -> None:
    saved = without(SAVED_V4, "-A OUTPUT -j ISTIO_OUTPUT")
    saved = with_extra(saved, "-A PREROUTING -j ISTIO_PRERT", "-A PREROUTING -j ISTIO_PRERT")
    delta = restore_input(pod_rules(DEFAULT, "ipv4"), POD_CHAINS, saved)
    mangle = delta.split("COMMIT")[0].splitlines()
    assert mangle == ["*mangle", ":ISTIO_PRERT - [0:0]", ":ISTIO_OUTPUT - [0:0]",
                      "-D PREROUTING -j ISTIO_PRERT", "-A OUTPUT -j ISTIO_OUTPUT",
                      "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
                      "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark "
                      "--nfmask 0xffffffff --ctmask 0xffffffff"]
    assert verify_pod(DEFAULT, "ipv4", saved) == ["mangle PREROUTING rule 1 present 2 times",
                                                  "mangle OUTPUT rule 2 (-j ISTIO_OUTPUT) missing"]


def test_turning_dns_capture_off_removes_the_raw_chains() -> None:
    off = PodRuleConfig(dns_capture=False)
    delta = restore_input(pod_rules(off, "ipv4"), POD_CHAINS, SAVED_V4)
    raw = delta.split("*raw\n")[1]
    assert raw == ("-D PREROUTING -j ISTIO_PRERT\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_PRERT\n-F ISTIO_OUTPUT\n"
                   "-X ISTIO_PRERT\n-X ISTIO_OUTPUT\nCOMMIT\n")
    drift = verify_pod(off, "ipv4", SAVED_V4)
    assert "raw chain ISTIO_PRERT present but not expected" in drift
    assert "raw PREROUTING unexpected rule: -A PREROUTING -j ISTIO_PRERT" in drift
    assert "nat ISTIO_OUTPUT unexpected rule: ! -o lo -p udp -m mark ! --mark 0x539/0xfff --dport 53 -j REDIRECT " \
           "--to-ports 15053" in drift


def test_removal_deletes_jumps_then_flushes_and_deletes_own_chains() -> None:
    removal = removal_input(POD_CHAINS, SAVED_V4)
    assert removal.splitlines()[:9] == ["*mangle", "-D PREROUTING -j ISTIO_PRERT", "-D OUTPUT -j ISTIO_OUTPUT",
                                        "-F ISTIO_PRERT", "-F ISTIO_OUTPUT",
                                        "-X ISTIO_PRERT", "-X ISTIO_OUTPUT", "COMMIT", "*nat"]
    assert removal.count("COMMIT") == 3
    assert removal_input(POD_CHAINS, "") == ""
    assert removal_input(POD_CHAINS, "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""


def test_drift_names_the_rule_that_vanished_and_the_one_that_appeared() -> None:
    rule14 = "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"
    assert verify_pod(DEFAULT, "ipv4", without(SAVED_V4, rule14)) == ["nat ISTIO_OUTPUT rule 14 missing"]
    extra = with_extra(SAVED_V4, rule14, "-A ISTIO_OUTPUT -j ACCEPT")
    assert verify_pod(DEFAULT, "ipv4", extra) == ["nat ISTIO_OUTPUT unexpected rule: -j ACCEPT"]
    assert verify_pod(DEFAULT, "ipv6", "") == [
        "ipv6 mangle PREROUTING rule 1 (-j ISTIO_PRERT) missing", "ipv6 mangle OUTPUT rule 2 (-j ISTIO_OUTPUT) missing",
        "ipv6 mangle chain ISTIO_PRERT missing", "ipv6 mangle chain ISTIO_OUTPUT missing",
        "ipv6 nat OUTPUT rule 5 (-j ISTIO_OUTPUT) missing", "ipv6 nat PREROUTING rule 6 (-j ISTIO_PRERT) missing",
        "ipv6 nat chain ISTIO_PRERT missing", "ipv6 nat chain ISTIO_OUTPUT missing",
        "ipv6 raw PREROUTING rule 15 (-j ISTIO_PRERT) missing", "ipv6 raw OUTPUT rule 15 (-j ISTIO_OUTPUT) missing",
        "ipv6 raw chain ISTIO_PRERT missing", "ipv6 raw chain ISTIO_OUTPUT missing"]


def test_ingress_variant_over_default_state_reports_the_rules_it_does_not_want() -> None:
    drift = verify_pod(PodRuleConfig(ingress=True), "ipv4", SAVED_V4)
    assert drift == ["nat ISTIO_PRERT unexpected rule: -s 169.254.7.127/32 -p tcp -j ACCEPT",
                     "nat ISTIO_PRERT unexpected rule: ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! "
                     "--mark 0x539/0xfff -j REDIRECT --to-ports 15006"]


def test_normalize_ignores_implicit_protocol_matches() -> None:
    assert normalize("-p tcp -m tcp --dport 53  -j ACCEPT") == normalize("-p tcp --dport 53 -j ACCEPT")


HOST_SAVED = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_POSTRT - [0:0]
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -j KUBE-POSTROUTING
-A POSTROUTING -j ISTIO_POSTRT
-A ISTIO_POSTRT {snat}
COMMIT
""".format(snat=host_rules("ipv4")[1].iptables)


def test_host_jump_must_be_first_in_postrouting() -> None:
    assert verify_host("ipv4", HOST_SAVED) == ["nat POSTROUTING probe jump is not the first rule"]
    delta = restore_input(host_rules("ipv4"), HOST_CHAINS, HOST_SAVED).splitlines()
    assert delta[:4] == ["*nat", ":ISTIO_POSTRT - [0:0]", "-D POSTROUTING -j ISTIO_POSTRT",
                         "-I POSTROUTING 1 -j ISTIO_POSTRT"]
    fixed = HOST_SAVED.replace("-A POSTROUTING -j KUBE-POSTROUTING\n-A POSTROUTING -j ISTIO_POSTRT\n",
                               "-A POSTROUTING -j ISTIO_POSTRT\n-A POSTROUTING -j KUBE-POSTROUTING\n")
    assert verify_host("ipv4", fixed) == []
    assert "-I POSTROUTING" not in restore_input(host_rules("ipv4"), HOST_CHAINS, fixed)
    # host removal leaves other people's chains alone
    assert removal_input(HOST_CHAINS, fixed) == ("*nat\n-D POSTROUTING -j ISTIO_POSTRT\n-F ISTIO_POSTRT\n"
                                                 "-X ISTIO_POSTRT\nCOMMIT\n")
