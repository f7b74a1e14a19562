"""Convert a CNI result between spec versions, so the plugin can pass `prevResult` on in the version of
its network configuration (libcni's `convert`, for the versions we support).

Two shapes exist: 0.3.0/0.3.1/0.4.0 (each `ips[]` entry has `version: "4"|"6"`) and 1.0.0/1.1.0 (no
`version`; 1.1.0 only adds optional fields). `ips[].address` is CIDR notation in both. Converting down
to 0.x keeps only the fields 0.4.0 defines; within a shape every field is kept. Pure.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from cni.config import ERR_INCOMPATIBLE_VERSION, ERR_INVALID_CONFIG, SUPPORTED_VERSIONS, CniError

Obj = dict[str, Any]

LEGACY_VERSIONS = ("0.3.0", "0.3.1", "0.4.0")
# The 0.4.0 result schema, for converting down from 1.x.
LEGACY_FIELDS = {"interfaces": ("name", "mac", "sandbox"), "ips": ("version", "interface", "address", "gateway"),
                 "routes": ("dst", "gw")}


def convert_result(result: Obj, to_version: str) -> Obj:
    """`result` in `to_version`'s shape. A result without `cniVersion` is taken to be in `to_version`
    already (the runtime hands a plugin its prevResult in the configuration's version)."""
    from_version = result.get("cniVersion") or to_version
    if from_version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"cannot convert prevResult from CNI version {from_version!r}",
                       f"supported versions are {', '.join(SUPPORTED_VERSIONS)}; the previous plugin in the chain "
                       "returned a result in another version")
    legacy = to_version in LEGACY_VERSIONS
    down = legacy and from_version not in LEGACY_VERSIONS
    out: Obj = {"cniVersion": to_version}
    for key, value in result.items():
        if key == "cniVersion":
            continue
        if key in ("interfaces", "ips", "routes"):
            if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
                raise CniError(ERR_INVALID_CONFIG, f"prevResult.{key} must be a list of objects",
                               "the previous plugin in the chain returned a malformed result")
            items = [{k: item[k] for k in LEGACY_FIELDS[key] if k in item} for item in value] if down else value
            if key == "ips":
                items = [_ip_entry(item, index, legacy) for index, item in enumerate(items)]
            out[key] = items
        elif not down or key == "dns":
            out[key] = value
    return out


def _ip_entry(entry: Obj, index: int, legacy: bool) -> Obj:
    address = entry.get("address")
    try:
        version = ipaddress.ip_interface(address).version if isinstance(address, str) and "/" in address else None
    except ValueError:
        version = None
    if version is None:
        raise CniError(ERR_INVALID_CONFIG, f"prevResult.ips[{index}].address {address!r} is not an address in "
                                           "CIDR notation",
                       "the previous plugin in the chain returned a malformed result")
    rest = {k: v for k, v in entry.items() if k != "version"}
    return {"version": str(version), **rest} if legacy else rest
