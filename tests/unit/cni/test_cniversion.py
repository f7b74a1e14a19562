"""Result conversion between CNI spec versions: the plugin passes `prevResult` on in its config's version."""

from __future__ import annotations

from typing import Any

import pytest

from cni.cniversion import convert_result
from cni.config import ERR_INCOMPATIBLE_VERSION, ERR_INVALID_CONFIG, CniError

Obj = dict[str, Any]

RESULT_0_4 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/p"}],
    "ips": [{"version": "4", "interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
            {"version": "6", "interface": 0, "address": "fd00::5/64"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
    "dns": {"nameservers": ["10.96.0.10"]},
}
RESULT_1_1 = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:03", "mtu": 1450, "sandbox": "/var/run/netns/p",
                    "socketPath": "/s"}],
    "ips": [{"interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
            {"interface": 0, "address": "fd00::5/64"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400, "table": 5}],
    "dns": {"nameservers": ["10.96.0.10"]},
}


def test_legacy_to_1_0_drops_the_ip_version() -> None:
    out = convert_result(RESULT_0_4, "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert out["ips"] == [{"interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                          {"interface": 0, "address": "fd00::5/64"}]
    assert out["interfaces"] == RESULT_0_4["interfaces"] and out["routes"] == RESULT_0_4["routes"]
    assert out["dns"] == RESULT_0_4["dns"]


def test_1_1_to_legacy_adds_versions_and_keeps_only_0_4_fields() -> None:
    out = convert_result(RESULT_1_1, "0.4.0")
    assert out == {
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/p"}],
        "ips": [{"version": "4", "interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                {"version": "6", "interface": 0, "address": "fd00::5/64"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    }


@pytest.mark.parametrize(("result", "to"), [(RESULT_0_4, "0.3.1"), (RESULT_1_1, "1.0.0"), (RESULT_1_1, "1.1.0")])
def test_same_shape_keeps_every_field(result: Obj, to: str) -> None:
    assert convert_result(result, to) == {**result, "cniVersion": to}


def test_result_without_version_is_in_the_config_version() -> None:
    assert convert_result({"ips": [{"address": "10.0.0.1/8"}]}, "0.3.0") == \
        {"cniVersion": "0.3.0", "ips": [{"version": "4", "address": "10.0.0.1/8"}]}
    assert convert_result({}, "1.0.0") == {"cniVersion": "1.0.0"}


def test_input_is_not_modified() -> None:
    before = repr(RESULT_1_1)
    convert_result(RESULT_1_1, "0.3.0")
    assert repr(RESULT_1_1) == before


@pytest.mark.parametrize(("result", "code", "message"), [
    ({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.1/8"}}, ERR_INCOMPATIBLE_VERSION, "from CNI version '0.2.0'"),
    ({"cniVersion": "1.0.0", "ips": "10.0.0.1/8"}, ERR_INVALID_CONFIG, "prevResult.ips must be a list of objects"),
    ({"cniVersion": "1.0.0", "interfaces": [None]}, ERR_INVALID_CONFIG, "prevResult.interfaces must be a list"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1"}]}, ERR_INVALID_CONFIG, "not an address in CIDR"),
    ({"cniVersion": "1.0.0", "ips": [{"address": None}]}, ERR_INVALID_CONFIG, "not an address in CIDR"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "x/8"}]}, ERR_INVALID_CONFIG, r"ips\[0\].address 'x/8'"),
])
def test_malformed_results(result: Obj, code: int, message: str) -> None:
    with pytest.raises(CniError, match=message) as info:
        convert_result(result, "1.0.0")
    assert info.value.code == code
