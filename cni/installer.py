"""Installer mode for real nodes: put the `istio-cni` plugin and its entry into the node's CNI config.

The plugin source is either a single executable (the `ambient-cni` console script on the local cluster,
in tests), copied as `<bin>/istio-cni`, or a self-contained bundle directory (what the image ships:
`cni.plugin_bundle` builds it, a PyInstaller onedir with the executable `istio-cni` and `_internal/`). A
bundle is copied whole to `<bin>/istio-cni.d/<content hash>/` and `<bin>/istio-cni` becomes a relative
symlink to its executable (the bootloader resolves the link to find `_internal/`; relative, because the
agent sees the host's bin dir under another mount path). Each switch is one `rename` of the link, so a
runtime exec sees the old plugin or the new one, never a half-copied one. After a switch every version
but the new one and the one just replaced is removed: a plugin started just before the switch may still
load modules lazily from its version.

The installer also writes the plugin's kubeconfig next to the config and makes `istio-cni` the last plugin
of the primary network config (the first file in lexical order, as runtimes choose; a single-plugin
`.conf` is rewritten as a `.conflist`). `installed()` is the cheap check the agent polls: the entry is
last, and the plugin is the source's (same bytes, or the link names the bundle's version and its
executable exists); `install()` repairs whatever differs (another CNI rewrote the file, a version was
deleted) and also re-verifies an existing version directory's content. `uninstall()` removes all of it;
an agent restart (upgrade) leaves it in place, so that pods created meanwhile fail closed instead of
starting unredirected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger("ambient.cni.installer")
PLUGIN_TYPE = "istio-cni"
VERSIONS_DIR = f"{PLUGIN_TYPE}.d"  # in the bin dir: one subdirectory per installed bundle version
KUBECONFIG_NAME = "ZZZ-istio-cni-kubeconfig"
CONFIG_SUFFIXES = (".conflist", ".conf", ".json")
VERSION_LENGTH = 16  # hex digits of the bundle's sha256 that name its directory


class InstallError(Exception):
    """The CNI config cannot be changed; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Installer:
    conf_dir: Path
    bin_dir: Path
    plugin_source: Path  # an executable file, or a bundle directory holding the executable `istio-cni`
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

    @property
    def plugin_path(self) -> Path:
        """What the runtime executes: `<bin>/istio-cni` (a file, or a link into the versions dir)."""
        return self.bin_dir / PLUGIN_TYPE

    @cached_property
    def bundle_version(self) -> str | None:
        """The bundle's content hash, which names its directory under `istio-cni.d`; None for a single-file
        source. Computed once: the source is part of the agent's image."""
        source = self.plugin_source
        if source.is_dir():
            if not os.access(source / PLUGIN_TYPE, os.X_OK) or not (source / PLUGIN_TYPE).is_file():
                raise InstallError(f"plugin source {source} is a directory without an executable {PLUGIN_TYPE}: "
                                   "pass a bundle built by `python -m cni.plugin_bundle DIR`, or a plugin executable")
            return tree_hash(source)[:VERSION_LENGTH]
        if not source.is_file():
            raise InstallError(f"plugin source {source} does not exist: pass --plugin-source with the plugin bundle "
                               "directory (/opt/ambient/cni-plugin in the image) or a plugin executable")
        return None

    def _link_target(self, version: str) -> str:
        return f"{VERSIONS_DIR}/{version}/{PLUGIN_TYPE}"

    def plugin_installed(self) -> bool:
        """The runtime would execute this source's plugin."""
        try:
            version = self.bundle_version
            if version is None:
                target = self.plugin_path
                return not target.is_symlink() and target.read_bytes() == self.plugin_source.read_bytes()
            return (os.readlink(self.plugin_path) == self._link_target(version)
                    and (self.bin_dir / VERSIONS_DIR / version / PLUGIN_TYPE).is_file())
        except OSError:
            return False

    def installed(self) -> bool:
        primary = self.primary_config()
        if primary is None or not self.plugin_installed():
            return False
        try:
            plugins = json.loads(primary.read_text()).get("plugins") or []
        except (OSError, ValueError):
            return False
        return bool(plugins) and plugins[-1] == self._entry()

    def install(self) -> bool:
        """Make the plugin and its entry present; True if anything changed."""
        changed = self._install_plugin()
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

    def _install_plugin(self) -> bool:
        version = self.bundle_version
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        replaced = _version_of(self.plugin_path)
        if version is None:
            if self.plugin_installed():
                return False
            _atomic_write(self.plugin_path, self.plugin_source.read_bytes(), 0o755)
            log.info("installed %s from %s", self.plugin_path, self.plugin_source)
        else:
            copied = self._install_version(version)
            if not copied and self.plugin_installed():
                return False
            tmp = self.bin_dir / f".{PLUGIN_TYPE}.link.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(self._link_target(version), tmp)
            os.replace(tmp, self.plugin_path)
            log.info("installed %s -> %s (bundle %s)", self.plugin_path, self._link_target(version), self.plugin_source)
        self._remove_versions(keep={version, replaced})
        return True

    def _install_version(self, version: str) -> bool:
        """Make `istio-cni.d/<version>` a verified copy of the bundle; True if it had to be (re)copied."""
        versions = self.bin_dir / VERSIONS_DIR
        target = versions / version
        if target.is_dir() and not target.is_symlink() and tree_hash(target)[:VERSION_LENGTH] == version:
            return False
        versions.mkdir(exist_ok=True)
        staging = versions / f".{version}.tmp"
        _remove(staging)
        shutil.copytree(self.plugin_source, staging, symlinks=True)
        if target.exists() or target.is_symlink():  # a damaged copy: swap it out (the link dangles meanwhile)
            damaged = versions / f".{version}.damaged"
            _remove(damaged)
            os.rename(target, damaged)
            log.warning("plugin version %s in %s was modified; reinstalling it", version, versions)
            os.rename(staging, target)
            _remove(damaged)
        else:
            os.rename(staging, target)
        return True

    def _remove_versions(self, keep: set[str | None]) -> None:
        versions = self.bin_dir / VERSIONS_DIR
        if not versions.is_dir():
            return
        for path in versions.iterdir():
            if path.name not in keep:
                _remove(path)
                log.info("removed plugin version %s", path)

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
        self.plugin_path.unlink(missing_ok=True)
        _remove(self.bin_dir / VERSIONS_DIR)


def tree_hash(root: Path) -> str:
    """sha256 over a directory's relative paths, file contents, executable bits and symlink targets."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root).encode()
            if stat.S_ISLNK(info.st_mode):
                digest.update(b"L\0" + rel + b"\0" + os.readlink(path).encode() + b"\0")
            elif stat.S_ISDIR(info.st_mode):
                digest.update(b"D\0" + rel + b"\0")
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").digest()
                digest.update(b"X" if info.st_mode & 0o111 else b"F")
                digest.update(b"\0" + rel + b"\0" + content)
            else:
                raise InstallError(f"{path}: not a file, directory or symlink; the plugin bundle cannot hold it")
    return digest.hexdigest()


def _version_of(link: Path) -> str | None:
    """The bundle version `<bin>/istio-cni` points at; None for a file or nothing."""
    try:
        parts = Path(os.readlink(link)).parts
    except OSError:
        return None
    return parts[1] if len(parts) == 3 and parts[0] == VERSIONS_DIR else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # never write through a leftover symlink
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


__all__ = ["VERSIONS_DIR", "InstallError", "Installer", "tree_hash"]
