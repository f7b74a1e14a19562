"""The `/cmdadd` payload (PROTOCOLS.md §3): what the plugin sends for each spec version's result shape, what
the agent accepts, and that the agent's parser turns any bytes into a `CmdAdd` or a `CmdAddError`."""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni.cmdadd import MAX_BODY, CmdAdd, CmdAddError, PodIP, build_cmdadd, parse_cmdadd, result_ips

Obj = dict[str, Any]

BRIDGE_1_0 = {  # what bridge + host-local print for a 1.0.0 conflist
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:00:00:01"}, {"name": "veth1", "mac": "aa:bb:cc:00:00:02"},
                   {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/p"}],
    "ips": [{"interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1"}],
    "routes": [{"dst": "0.0.0.0/0"}], "dns": {},
}


def test_payload_from_a_1_0_result() -> None:
    body = build_cmdadd("/var/run/netns/p", "web-1", "apps", BRIDGE_1_0)
    assert body == {
        "Netns": "/var/run/netns/p", "PodName": "web-1", "PodNamespace": "apps",
        "IPs": [{"Interface": 2, "Address": {"IP": "10.244.1.5", "Mask": "////AA=="}, "Gateway": "10.244.1.1"},
                {"Interface": 2, "Address": {"IP": "fd00:10:244:1::5",
                                             "Mask": base64.b64encode(b"\xff" * 8 + b"\x00" * 8).decode()},
                 "Gateway": "fd00:10:244:1::1"}],
    }


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_payload_from_a_legacy_result(version: str) -> None:
    result = {"cniVersion": version, "ips": [{"version": "4", "address": "10.1.2.3/16"}]}
    assert build_cmdadd("/proc/7/ns/net", "p", "n", result)["IPs"] == \
        [{"Interface": None, "Address": {"IP": "10.1.2.3", "Mask": "//8AAA=="}, "Gateway": None}]


def test_payload_without_ips() -> None:
    assert build_cmdadd("/n", "p", "ns", {"cniVersion": "1.0.0"})["IPs"] == []


@pytest.mark.parametrize(("result", "message"), [
    ({"ips": {"address": "10.1.2.3/24"}}, "prevResult.ips must be a list"),
    ({"ips": ["10.1.2.3/24"]}, r"prevResult.ips\[0\] must be an object"),
    ({"ips": [{"address": "10.1.2.3"}]}, "not an address in CIDR notation"),
    ({"ips": [{"address": "10.1.2.300/24"}]}, "not an address in CIDR notation"),
    ({"ips": [{"address": "10.1.2.3/24", "interface": -1}]}, r"ips\[0\].interface must be a non-negative"),
    ({"ips": [{"address": "10.1.2.3/24", "gateway": "router"}]}, r"ips\[0\].gateway 'router' is not an IP"),
])
def test_bad_results(result: Obj, message: str) -> None:
    with pytest.raises(CmdAddError, match=message):
        build_cmdadd("/n", "p", "ns", result)


def test_round_trip_through_the_wire() -> None:
    body = json.dumps(build_cmdadd("/var/run/netns/p", "web-1", "apps", BRIDGE_1_0)).encode()
    assert parse_cmdadd(body) == CmdAdd("/var/run/netns/p", "web-1", "apps", result_ips(BRIDGE_1_0))
    assert parse_cmdadd(body).ips[0] == PodIP(2, ipaddress.ip_interface("10.244.1.5/24"),
                                              ipaddress.ip_address("10.244.1.1"))


def test_accepts_what_istios_go_plugin_sends() -> None:
    """Go encodes a nil slice as null, a nil net.IP as "" and a nil mask as null."""
    body = (b'{"Netns":"/var/run/netns/x","PodName":"p","PodNamespace":"n","Extra":1,'
            b'"IPs":[{"Interface":null,"Address":{"IP":"99.9.9.9","Mask":null},"Gateway":""}]}')
    assert parse_cmdadd(body).ips == (PodIP(None, ipaddress.ip_interface("99.9.9.9/32"), None),)
    assert parse_cmdadd(b'{"Netns":"x","PodName":"p","PodNamespace":"n","IPs":null}').ips == ()


def good(**changes: Any) -> bytes:
    doc: Obj = {"Netns": "/n", "PodName": "p", "PodNamespace": "ns",
                "IPs": [{"Interface": 0, "Address": {"IP": "10.0.0.1", "Mask": "////AA=="}, "Gateway": None}]}
    for key, value in changes.items():
        if key.startswith("ip_"):
            doc["IPs"][0][key[3:]] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("body", "message"), [
    (b"", "not JSON"), (b"\xff", "not JSON"), (b"[]", "must be a JSON object"), (b"[" * 100_000, "not JSON"),
    (b"{" + b" " * MAX_BODY + b"}", "larger than"),
    (good(Netns=""), "Netns must be a non-empty string"), (good(PodName=None), "PodName must be"),
    (good(PodNamespace=3), "PodNamespace must be"), (good(IPs={}), "IPs must be a list"),
    (good(IPs=[5]), r"IPs\[0\] must be an object"),
    (good(ip_Address="10.0.0.1/24"), r"IPs\[0\].Address must be an object"),
    (good(ip_Address={"IP": "", "Mask": None}), r"Address.IP must be an IP address string"),
    (good(ip_Address={"IP": "10.0.0.256"}), r"Address.IP '10.0.0.256' is not an IP address"),
    (good(ip_Address={"IP": "10.0.0.1", "Mask": "***"}), "Mask '\\*\\*\\*' is not base64"),
    (good(ip_Address={"IP": "10.0.0.1", "Mask": 24}), "Mask must be a base64 string"),
    (good(ip_Address={"IP": "10.0.0.1", "Mask": base64.b64encode(b"\xff" * 16).decode()}),
     "16 bytes; an IPv4 mask is 4"),
    (good(ip_Address={"IP": "fd00::1", "Mask": "////AA=="}), "4 bytes; an IPv6 mask is 16"),
    (good(ip_Address={"IP": "10.0.0.1", "Mask": "/wD/AA=="}), "not a contiguous netmask"),
    (good(ip_Interface=True), "Interface must be a non-negative integer"),
    (good(ip_Interface=1.0), "Interface must be a non-negative integer"),
    (good(ip_Gateway=["10.0.0.254"]), "Gateway must be an IP address string or null"),
    (good(ip_Gateway="gw"), "Gateway 'gw' is not an IP address"),
])
def test_agent_rejects_bad_bodies(body: bytes, message: str) -> None:
    with pytest.raises(CmdAddError, match=message):
        parse_cmdadd(body)


def test_zero_length_mask_and_host_mask() -> None:
    assert parse_cmdadd(good(ip_Address={"IP": "10.0.0.1", "Mask": "AAAAAA=="})).ips[0].address.network.prefixlen == 0
    assert parse_cmdadd(good(ip_Address={"IP": "10.0.0.1", "Mask": "/////w=="})).ips[0].address.network.prefixlen == 32


# -- properties --------------------------------------------------------------------------------------
@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_fail_cleanly(body: bytes) -> None:
    try:
        parsed = parse_cmdadd(body)
    except CmdAddError as exc:
        assert str(exc)
    else:
        assert isinstance(parsed, CmdAdd)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
ip_like = st.dictionaries(
    st.sampled_from(["Interface", "Address", "Gateway"]),
    json_values | st.fixed_dictionaries({}, optional={"IP": json_values | st.sampled_from(["10.0.0.1", "fd00::1"]),
                                                      "Mask": json_values | st.sampled_from(["////AA==", "AA=="])}))


@given(st.fixed_dictionaries({}, optional={
    "Netns": json_values, "PodName": json_values, "PodNamespace": json_values,
    "IPs": st.none() | st.lists(ip_like | json_values, max_size=3)}))
def test_structured_garbage_parses_or_fails_cleanly(doc: Obj) -> None:
    try:
        parse_cmdadd(json.dumps(doc).encode())
    except CmdAddError as exc:
        assert str(exc)


ipv4s = st.ip_addresses(v=4).flatmap(lambda a: st.integers(0, 32).map(lambda p: ipaddress.ip_interface((a, p))))
ipv6s = st.ip_addresses(v=6).flatmap(lambda a: st.integers(0, 128).map(lambda p: ipaddress.ip_interface((a, p))))
pod_ips = st.builds(PodIP, st.none() | st.integers(0, 1000), ipv4s | ipv6s, st.none() | st.ip_addresses())
names = st.text(min_size=1, max_size=30)


@given(st.builds(CmdAdd, names, names, names, st.lists(pod_ips, max_size=4).map(tuple)))
def test_every_payload_round_trips(cmd: CmdAdd) -> None:
    assert parse_cmdadd(json.dumps(cmd.to_json()).encode()) == cmd


@given(st.lists(pod_ips, max_size=4))
def test_build_from_result_matches_the_ips(ips: list[PodIP]) -> None:
    result = {"cniVersion": "1.0.0", "ips": [
        {"address": str(ip.address), **({"interface": ip.interface} if ip.interface is not None else {}),
         **({"gateway": str(ip.gateway)} if ip.gateway is not None else {})} for ip in ips]}
    assert parse_cmdadd(json.dumps(build_cmdadd("/n", "p", "ns", result)).encode()).ips == tuple(ips)
