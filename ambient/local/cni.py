"""Run a CNI network configuration list the way a container runtime does (libcni's semantics).

ADD runs each plugin in order, feeding the previous plugin's result as `prevResult`; DEL runs them in
reverse with the cached ADD result; CHECK runs them in order. Plugins are executables found on
`CNI_PATH`, given the `CNI_*` environment and the plugin's config (plus `name`, `cniVersion`,
`prevResult`) on stdin. This module does not know what any plugin does.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
PLUGIN_TIMEOUT = 30.0  # seconds one plugin may take before the runtime gives up on it


class CniError(Exception):
    def __init__(self, plugin: str, command: str, message: str, code: int = 0, details: str = "") -> None:
        self.plugin, self.command, self.code, self.details = plugin, command, code, details
        text = f"plugin type={plugin!r} failed ({command.lower()}): {message}"
        super().__init__(f"{text}: {details}" if details else text)


@dataclass(frozen=True)
class Invocation:
    container_id: str
    netns: str
    ifname: str
    pod_name: str
    pod_namespace: str
    pod_uid: str

    def env(self, command: str, cni_path: str) -> dict[str, str]:
        args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.pod_namespace};K8S_POD_NAME={self.pod_name};"
                f"K8S_POD_INFRA_CONTAINER_ID={self.container_id};K8S_POD_UID={self.pod_uid}")
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
                "CNI_CONTAINERID": self.container_id, "CNI_NETNS": self.netns, "CNI_IFNAME": self.ifname,
                "CNI_ARGS": args, "CNI_PATH": cni_path}


def load_conflist(conf_dir: Path) -> Obj:
    """The first config in lexical order, as runtimes pick; a single `.conf` is wrapped as a list."""
    files = sorted(p for p in conf_dir.glob("*") if p.suffix in (".conflist", ".conf", ".json"))
    if not files:
        raise CniError("", "LOAD", f"no network config found in {conf_dir}")
    path = files[0]
    try:
        conf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CniError("", "LOAD", f"cannot parse {path}: {exc}") from None
    if "plugins" not in conf:
        conf = {"cniVersion": conf.get("cniVersion", "0.4.0"), "name": conf.get("name", ""), "plugins": [conf]}
    if not isinstance(conf.get("plugins"), list) or not conf["plugins"]:
        raise CniError("", "LOAD", f"{path} has no plugins")
    return dict(conf)


async def _exec(plugin: Obj, conflist: Obj, command: str, inv: Invocation, cni_path: str,
                prev_result: Obj | None) -> Obj:
    ptype = str(plugin.get("type", ""))
    binary = next((Path(d) / ptype for d in cni_path.split(":") if (Path(d) / ptype).is_file()), None)
    if binary is None:
        raise CniError(ptype, command, f"failed to find plugin {ptype!r} in path {cni_path}")
    config = {**plugin, "cniVersion": conflist.get("cniVersion"), "name": conflist.get("name")}
    if prev_result is not None:
        config["prevResult"] = prev_result
    proc = await asyncio.create_subprocess_exec(
        str(binary), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=inv.env(command, cni_path))
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(config).encode()), PLUGIN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CniError(ptype, command, f"timed out after {PLUGIN_TIMEOUT:.0f}s") from None
    text = out.decode(errors="replace").strip()
    try:
        result = json.loads(text) if text else {}
    except json.JSONDecodeError:
        result = {}
    if proc.returncode != 0:
        if isinstance(result, dict) and ("msg" in result or "code" in result):
            raise CniError(ptype, command, str(result.get("msg", "")), int(result.get("code", 0) or 0),
                           str(result.get("details", "")))
        raise CniError(ptype, command, f"exit status {proc.returncode}",
                       details=(err.decode(errors="replace").strip() or text)[-2000:])
    return result if isinstance(result, dict) else {}


async def add(conflist: Obj, inv: Invocation, cni_path: str) -> Obj:
    result: Obj | None = None
    for plugin in conflist["plugins"]:
        result = await _exec(plugin, conflist, "ADD", inv, cni_path, result)
    return result or {}


async def delete(conflist: Obj, inv: Invocation, cni_path: str, cached_result: Obj | None) -> list[CniError]:
    """Run DEL on every plugin, last first; return the failures instead of stopping at the first."""
    errors = []
    for plugin in reversed(conflist["plugins"]):
        try:
            await _exec(plugin, conflist, "DEL", inv, cni_path, cached_result)
        except CniError as exc:
            errors.append(exc)
    return errors


def result_ips(result: Obj) -> list[str]:
    return [ip["address"].split("/")[0] for ip in result.get("ips", []) if "address" in ip]
