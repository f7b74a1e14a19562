"""The `POST /cmdadd` payload between the CNI plugin and the node agent (PROTOCOLS.md §3).

Wire form (Istio's `CNIPluginAddEvent`, Go's default JSON encoding of `net.IPNet`):
`{"Netns": str, "PodName": str, "PodNamespace": str,
  "IPs": [{"Interface": int|null, "Address": {"IP": "10.1.2.3", "Mask": "<base64 mask bytes>"}, "Gateway": str|null}]}`
— `IP` is the pod's address (not the network's), the mask is 4 bytes for IPv4 and 16 for IPv6.

The plugin builds it from the previous plugin's result (`build_cmdadd`); the agent checks it
(`parse_cmdadd`, whose `CmdAddError` message is the 400 body). Pure and stdlib-only: the plugin imports
this on every pod creation.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from typing import Any, NamedTuple

CMDADD_PATH = "/cmdadd"
SOCKET_NAME = "pluginevent.sock"  # in the agent's run dir (`cni_agent_run_dir`, /var/run/istio-cni)
TIMEOUT = 5.0  # seconds the plugin waits for the agent: enrollment includes ztunnel's ack of the netns
MAX_BODY = 1 << 20  # bytes the agent reads; a pod with a few IPs needs well under 1 KiB

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CmdAddError(ValueError):
    """A payload that cannot be built or parsed; the message names the field (the agent's 400 body)."""

    reason = "bad_cmdadd"


class PodIP(NamedTuple):
    interface: int | None  # index into the CNI result's `interfaces`
    address: IPInterface  # the pod's address with its prefix length
    gateway: IPAddress | None


class CmdAdd(NamedTuple):
    netns: str
    pod_name: str
    pod_namespace: str
    ips: tuple[PodIP, ...]

    def to_json(self) -> dict[str, Any]:
        return {"Netns": self.netns, "PodName": self.pod_name, "PodNamespace": self.pod_namespace,
                "IPs": [_encode_ip(ip) for ip in self.ips]}


def _encode_ip(ip: PodIP) -> dict[str, Any]:
    mask = base64.b64encode(ip.address.network.netmask.packed).decode("ascii")
    return {"Interface": ip.interface, "Address": {"IP": str(ip.address.ip), "Mask": mask},
            "Gateway": str(ip.gateway) if ip.gateway is not None else None}


def build_cmdadd(netns: str, pod_name: str, pod_namespace: str, prev_result: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for a pod whose previous plugin returned `prev_result` (any spec version: `ips[].address`
    is CIDR notation in 0.3.x, 0.4.0 and 1.x alike)."""
    return CmdAdd(netns, pod_name, pod_namespace, result_ips(prev_result)).to_json()


def result_ips(result: dict[str, Any]) -> tuple[PodIP, ...]:
    ips = result.get("ips") or []
    if not isinstance(ips, list):
        raise CmdAddError("prevResult.ips must be a list")
    out = []
    for index, entry in enumerate(ips):
        where = f"prevResult.ips[{index}]"
        if not isinstance(entry, dict):
            raise CmdAddError(f"{where} must be an object")
        address = entry.get("address")
        if not isinstance(address, str) or "/" not in address:
            raise CmdAddError(f"{where}.address {address!r} is not an address in CIDR notation")
        try:
            interface_address = ipaddress.ip_interface(address)
        except ValueError:
            raise CmdAddError(f"{where}.address {address!r} is not an address in CIDR notation") from None
        gateway = entry.get("gateway")
        out.append(PodIP(_interface_index(entry.get("interface"), f"{where}.interface"), interface_address,
                         _ip_or_none(gateway, f"{where}.gateway")))
    return tuple(out)


def parse_cmdadd(body: bytes) -> CmdAdd:
    """Check a `/cmdadd` body; raises `CmdAddError` saying which field is wrong."""
    if len(body) > MAX_BODY:
        raise CmdAddError(f"body is larger than {MAX_BODY} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CmdAddError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CmdAddError("body must be a JSON object with Netns, PodName, PodNamespace and IPs")
    netns, name, namespace = (_required_string(doc, key) for key in ("Netns", "PodName", "PodNamespace"))
    ips = doc.get("IPs")
    if ips is None:  # Go encodes an empty slice as null
        ips = []
    if not isinstance(ips, list):
        raise CmdAddError("IPs must be a list")
    return CmdAdd(netns, name, namespace, tuple(_parse_ip(entry, f"IPs[{i}]") for i, entry in enumerate(ips)))


def _required_string(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise CmdAddError(f"{key} must be a non-empty string")
    return value


def _parse_ip(entry: Any, where: str) -> PodIP:
    if not isinstance(entry, dict):
        raise CmdAddError(f"{where} must be an object")
    address = entry.get("Address")
    if not isinstance(address, dict):
        raise CmdAddError(f"{where}.Address must be an object with IP and Mask")
    raw_ip = address.get("IP")
    if not isinstance(raw_ip, str) or not raw_ip:
        raise CmdAddError(f"{where}.Address.IP must be an IP address string")
    try:
        ip = ipaddress.ip_address(raw_ip)
    except ValueError:
        raise CmdAddError(f"{where}.Address.IP {raw_ip!r} is not an IP address") from None
    prefix = _prefix_length(address.get("Mask"), ip.max_prefixlen, f"{where}.Address.Mask")
    return PodIP(_interface_index(entry.get("Interface"), f"{where}.Interface"),
                 ipaddress.ip_interface((ip, prefix)), _ip_or_none(entry.get("Gateway"), f"{where}.Gateway"))


def _prefix_length(mask: Any, bits: int, where: str) -> int:
    if mask is None:  # Go's nil mask: a host address
        return bits
    if not isinstance(mask, str):
        raise CmdAddError(f"{where} must be a base64 string")
    try:
        raw = base64.b64decode(mask, validate=True)
    except (binascii.Error, ValueError):
        raise CmdAddError(f"{where} {mask!r} is not base64") from None
    if len(raw) * 8 != bits:
        raise CmdAddError(f"{where} is {len(raw)} bytes; an IPv{4 if bits == 32 else 6} mask is {bits // 8}")
    host_bits = ~int.from_bytes(raw, "big") & ((1 << bits) - 1)
    if host_bits & (host_bits + 1):
        raise CmdAddError(f"{where} {mask!r} is not a contiguous netmask")
    return bits - host_bits.bit_length()


def _interface_index(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CmdAddError(f"{where} must be a non-negative integer or null")
    return value


def _ip_or_none(value: Any, where: str) -> IPAddress | None:
    if value is None or value == "":  # Go encodes a nil net.IP as ""
        return None
    if not isinstance(value, str):
        raise CmdAddError(f"{where} must be an IP address string or null")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise CmdAddError(f"{where} {value!r} is not an IP address") from None
