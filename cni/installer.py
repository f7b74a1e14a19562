"""Installer mode for real nodes: put the `istio-cni` plugin and its entry into the node's CNI config.

Copies the plugin executable into the CNI bin dir, writes the plugin's kubeconfig next to the config,
and makes `istio-cni` the last plugin of the primary network config (the first file in lexical order,
as runtimes choose; a single-plugin `.conf` is rewritten as a `.conflist`). `ensure()` re-inserts the
entry if another CNI rewrote the file. `uninstall()` removes all of it; an agent restart (upgrade)
leaves it in place so that pods created meanwhile fail closed instead of starting unredirected.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ambient.cni.installer")
PLUGIN_TYPE = "istio-cni"
KUBECONFIG_NAME = "ZZZ-istio-cni-kubeconfig"
CONFIG_SUFFIXES = (".conflist", ".conf", ".json")


class InstallError(Exception):
    """The CNI config cannot be changed; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Installer:
    conf_dir: Path
    bin_dir: Path
    plugin_source: Path
    plugin_entry: dict[str, Any]
    kubeconfig_source: Path | None = None

    def primary_config(self) -> Path | None:
        files = sorted(p for p in self.conf_dir.glob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file())
        return files[0] if files else None

    def _entry(self) -> dict[str, Any]:
        entry = dict(self.plugin_entry)
        if self.kubeconfig_source:
            entry["kubernetes"] = {**entry.get("kubernetes", {}), "kubeconfig": str(self.conf_dir / KUBECONFIG_NAME)}
        return {"type": PLUGIN_TYPE, **entry}

    def installed(self) -> bool:
        primary = self.primary_config()
        if primary is None or not (self.bin_dir / PLUGIN_TYPE).exists():
            return False
        try:
            plugins = json.loads(primary.read_text()).get("plugins") or []
        except (OSError, ValueError):
            return False
        return bool(plugins) and plugins[-1] == self._entry()

    def install(self) -> bool:
        """Make the plugin and its entry present; True if anything changed."""
        changed = self._install_binary()
        if self.kubeconfig_source:
            target = self.conf_dir / KUBECONFIG_NAME
            data = self.kubeconfig_source.read_bytes()
            if not target.exists() or target.read_bytes() != data:
                _atomic_write(target, data, 0o600)
                changed = True
        primary = self.primary_config()
        if primary is None:
            raise InstallError(f"no CNI network config in {self.conf_dir}: the primary CNI must be installed first")
        try:
            conf = json.loads(primary.read_text())
        except (OSError, ValueError) as exc:
            raise InstallError(f"cannot parse {primary}: {exc}") from None
        if "plugins" not in conf:
            conf = {"cniVersion": conf.get("cniVersion", "0.3.1"), "name": conf.get("name", "k8s-pod-network"),
                    "plugins": [conf]}
        plugins = [p for p in conf["plugins"] if p.get("type") != PLUGIN_TYPE]
        wanted = [*plugins, self._entry()]
        if conf["plugins"] != wanted or primary.suffix != ".conflist":
            conf["plugins"] = wanted
            target = primary.with_suffix(".conflist")
            _atomic_write(target, json.dumps(conf, indent=2).encode(), 0o644)
            if target != primary:
                primary.unlink()
            log.info("inserted %s into %s", PLUGIN_TYPE, target)
            changed = True
        return changed

    def _install_binary(self) -> bool:
        target = self.bin_dir / PLUGIN_TYPE
        source = self.plugin_source.read_bytes()
        if target.exists() and target.read_bytes() == source:
            return False
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, source, 0o755)
        return True

    def uninstall(self) -> None:
        primary = self.primary_config()
        if primary is not None:
            try:
                conf = json.loads(primary.read_text())
            except (OSError, ValueError):
                conf = {}
            if any(p.get("type") == PLUGIN_TYPE for p in conf.get("plugins") or []):
                conf["plugins"] = [p for p in conf["plugins"] if p.get("type") != PLUGIN_TYPE]
                _atomic_write(primary, json.dumps(conf, indent=2).encode(), 0o644)
        (self.conf_dir / KUBECONFIG_NAME).unlink(missing_ok=True)
        (self.bin_dir / PLUGIN_TYPE).unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


__all__ = ["InstallError", "Installer"]
