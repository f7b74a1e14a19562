"""HostProbe input checks and set listings that need no tool run (the real sets: tests/netns/test_cni_rules.py)."""

from __future__ import annotations

import json

import pytest

from cni.rules import HostProbe, RuleError
from cni.rules.hostprobe import parse_ipset_save, parse_nft_set


@pytest.mark.parametrize(("uid", "ips", "needle"), [
    ('uid" } flush ruleset', ["10.0.0.1"], "is not usable as a set comment"),
    ("uid-1", ["10.0.0.300"], "'10.0.0.300' is not an IP address (pod uid-1)"),
    ("uid-1", ["10.0.0.1\nflush ruleset"], "is not an IP address"),
])
def test_uids_and_ips_that_could_break_the_set_script_are_refused(uid: str, ips: list[str], needle: str) -> None:
    with pytest.raises(RuleError) as e:
        HostProbe("nftables").add(uid, ips)
    assert e.value.reason == "bad-config" and needle in e.value.message


def test_ipv6_addresses_are_skipped_when_ipv6_probes_are_off() -> None:
    HostProbe("nftables", ipv6=False).add("uid-1", ["fd00::1"])  # nothing to add: no nft run at all


def test_ipset_save_lines_give_ip_and_uid() -> None:
    saved = ("create istio-inpod-probes-v4 hash:ip family inet hashsize 1024 maxelem 65536 comment bucketsize 12\n"
             'add istio-inpod-probes-v4 10.1.0.5 comment "0b1c-uid"\n'
             "add istio-inpod-probes-v4 10.1.0.6\n"
             'add other-set 10.1.0.7 comment "x"\n')
    assert parse_ipset_save(saved, "istio-inpod-probes-v4") == {"10.1.0.5": "0b1c-uid", "10.1.0.6": ""}


def test_nft_json_set_listing_gives_ip_and_uid() -> None:
    listing = {"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {
        "family": "inet", "name": "istio-inpod-probes-v4", "table": "istio-ambient-nat", "type": "ipv4_addr",
        "elem": [{"elem": {"val": "10.0.0.1", "comment": "uid-b"}}, "10.0.0.9"]}}]}
    assert parse_nft_set(json.dumps(listing)) == {"10.0.0.1": "uid-b", "10.0.0.9": ""}
