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

The installer also writes the plugin's kubeconfig and makes `istio-cni` the last plugin of the primary
network config (the first file in lexical order, as runtimes choose; a single-plugin `.conf` is rewritten
as a `.conflist`). `installed()` is the cheap check the agent polls: the entry is last, the plugin is the
source's (same bytes, or the link names the bundle's version and its executable exists) and the
kubeconfig holds what its source renders now; `install()` repairs whatever differs (another CNI rewrote
the file, a version was deleted, the service account token rotated) and also re-verifies an existing
version directory's content. Without a primary config `install()` changes nothing and raises
`InstallError` with reason `no_primary_config` (the agent waits for the primary CNI). `uninstall()`
removes all of it; whether the agent calls it when it stops (uninstall) or not (upgrade, restart: pods
created meanwhile fail closed instead of starting unredirected) is the agent's decision.

The plugin's kubeconfig, as Istio's install-cni writes it (cni/pkg/install/kubeconfig.go): in a pod, the
API server is `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` (the `kubernetes` Service, IPv6
bracketed), its CA and bearer token are the pod's service account's, inline (the plugin runs on the host,
which cannot see the pod's token file). As Istio does since it moved the file out of the shared CNI conf
dir, it is written as `istio-cni-kubeconfig` in the agent's run dir (mode 0600): a host path the agent's
pod mounts at the same path (the entry's `cni_agent_run_dir` relies on that too), so the path named in
the entry is right on the host, and token rotations do not churn the directory other CNIs and the
runtime watch. Outside a pod (the local cluster) a given kubeconfig file is copied there instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("ambient.cni.installer")
PLUGIN_TYPE = "istio-cni"
VERSIONS_DIR = f"{PLUGIN_TYPE}.d"  # in the bin dir: one subdirectory per installed bundle version
KUBECONFIG_NAME = "istio-cni-kubeconfig"  # in the run dir, as Istio's constants.CNIPluginKubeconfName
LEGACY_KUBECONFIG_NAME = "ZZZ-istio-cni-kubeconfig"  # where older installs put it (conf dir); uninstall removes it
KUBECONFIG_MODE = 0o600  # it holds a bearer token (Istio's DefaultKubeconfigMode)
CONFIG_SUFFIXES = (".conflist", ".conf", ".json")
VERSION_LENGTH = 16  # hex digits of the bundle's sha256 that name its directory


class InstallError(Exception):
    """The CNI config cannot be changed; the message names the file and what is wrong. `reason` is stable:
    `no_primary_config` (wait for the primary CNI), `bad_primary_config`, `bad_plugin_source` (fatal at
    start), `kubeconfig` (the plugin's kubeconfig cannot be rendered), `failed`."""

    def __init__(self, message: str, reason: str = "failed") -> None:
        self.reason = reason
        super().__init__(message)


# -- the plugin's kubeconfig ---------------------------------------------------------------------------
def api_server_url(host: str, port: str) -> str:
    """`https://host:port` from $KUBERNETES_SERVICE_HOST/PORT, an IPv6 host bracketed (Go's JoinHostPort)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def render_kubeconfig(server: str, ca_pem: bytes, token: str) -> bytes:
    """The plugin's kubeconfig: Istio's names (cluster `local`, user `istio-cni`, context `istio-cni-context`),
    CA and token inline. JSON (valid YAML): the plugin parses it with the stdlib, without loading PyYAML."""
    doc = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "local", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode("ascii")}}],
        "users": [{"name": "istio-cni", "user": {"token": token}}],
        "contexts": [{"name": "istio-cni-context", "context": {"cluster": "local", "user": "istio-cni"}}],
        "current-context": "istio-cni-context",
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


class KubeconfigSource(Protocol):
    def content(self) -> bytes:
        """What the plugin's kubeconfig must hold now; `InstallError` (reason `kubeconfig`) if unavailable."""
        ...


@dataclass(frozen=True)
class CopiedKubeconfig:
    """A kubeconfig file given to the agent (`--plugin-kubeconfig`: the local cluster's), copied as is."""

    source: Path

    def content(self) -> bytes:
        try:
            return self.source.read_bytes()
        except OSError as exc:
            raise InstallError(f"cannot read the plugin kubeconfig {self.source} (--plugin-kubeconfig): "
                               f"{exc.strerror}", "kubeconfig") from None


@dataclass(frozen=True)
class ServiceAccountKubeconfig:
    """The pod's own service account, rendered for the plugin; re-read on every check, so that a rotated
    projected token (or CA) is rewritten within one poll of the agent's install loop."""

    host: str  # $KUBERNETES_SERVICE_HOST
    port: str  # $KUBERNETES_SERVICE_PORT
    account_dir: Path  # the pod's mounted service account: `token`, `ca.crt`

    def content(self) -> bytes:
        def read(name: str) -> bytes:
            path = self.account_dir / name
            try:
                return path.read_bytes()
            except OSError as exc:
                raise InstallError(f"cannot read the service account {name} {path} for the plugin's kubeconfig: "
                                   f"{exc.strerror}; the agent's pod needs its service account token mounted "
                                   "(automountServiceAccountToken), or pass --plugin-kubeconfig",
                                   "kubeconfig") from None

        token = read("token").decode("utf-8", "replace").strip()
        if not token:
            raise InstallError(f"the service account token {self.account_dir / 'token'} is empty", "kubeconfig")
        return render_kubeconfig(api_server_url(self.host, self.port), read("ca.crt"), token)


@dataclass(frozen=True)
class PluginKubeconfig:
    """Where the plugin's kubeconfig goes (a path the host sees as this agent does) and what it holds."""

    path: Path
    source: KubeconfigSource

    def current(self) -> bool:
        """The file holds what the source renders now (False if either cannot be read)."""
        try:
            return self.path.read_bytes() == self.source.content()
        except (OSError, InstallError):
            return False

    def write(self) -> bool:
        """Write it if it differs; True if it did."""
        data = self.source.content()
        try:
            if self.path.read_bytes() == data and stat.S_IMODE(self.path.stat().st_mode) == KUBECONFIG_MODE:
                return False
        except OSError:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path, data, KUBECONFIG_MODE)
        log.info("wrote the plugin's kubeconfig %s", self.path)  # never its content: it holds a token
        return True


class _Guard:
    """Serialises the agent's polling `ensure()` (run in a worker thread) with `uninstall()` on shutdown: a
    cancelled poll's thread runs on, and must not write the entry back after the plugin was removed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.retired = False


@dataclass(frozen=True)
class Installer:
    conf_dir: Path
    bin_dir: Path
    plugin_source: Path  # an executable file, or a bundle directory holding the executable `istio-cni`
    plugin_entry: dict[str, Any]
    kubeconfig: PluginKubeconfig | None = None
    _guard: _Guard = field(default_factory=_Guard, compare=False, repr=False)

    def primary_config(self) -> Path | None:
        files = sorted(p for p in self.conf_dir.glob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file())
        return files[0] if files else None

    def _entry(self) -> dict[str, Any]:
        entry = dict(self.plugin_entry)
        if self.kubeconfig is not None:
            entry["kubernetes"] = {**entry.get("kubernetes", {}), "kubeconfig": str(self.kubeconfig.path)}
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
                                   "pass a bundle built by `python -m cni.plugin_bundle DIR`, or a plugin executable",
                                   "bad_plugin_source")
            return tree_hash(source)[:VERSION_LENGTH]
        if not source.is_file():
            raise InstallError(f"plugin source {source} does not exist: pass --plugin-source with the plugin bundle "
                               "directory (/opt/ambient/cni-plugin in the image) or a plugin executable",
                               "bad_plugin_source")
        return None

    def check_source(self) -> str | None:
        """Validate the plugin source (`InstallError` reason `bad_plugin_source`); → its bundle version."""
        return self.bundle_version

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
        if self.kubeconfig is not None and not self.kubeconfig.current():
            return False
        try:
            conf = json.loads(primary.read_text())
        except (OSError, ValueError):
            return False
        plugins = conf.get("plugins") if isinstance(conf, dict) else None
        return isinstance(plugins, list) and bool(plugins) and plugins[-1] == self._entry()

    def ensure(self) -> bool:
        """`install()` unless `installed()`: what the agent polls. True if anything changed."""
        with self._guard.lock:
            return False if self._guard.retired or self.installed() else self._install()

    def install(self) -> bool:
        """Make the plugin, its kubeconfig and its entry present; True if anything changed. The primary config
        is checked first: without a usable one nothing is written (and no bundle hashed). Does nothing once
        this installer has uninstalled."""
        with self._guard.lock:
            return False if self._guard.retired else self._install()

    def _install(self) -> bool:
        primary = self.primary_config()
        if primary is None:
            raise InstallError(f"no CNI network config in {self.conf_dir}: the primary CNI must be installed first",
                               "no_primary_config")
        try:
            conf = json.loads(primary.read_text())
        except (OSError, ValueError) as exc:
            raise InstallError(f"cannot parse {primary}: {exc}", "bad_primary_config") from None
        plugins_ok = isinstance(conf, dict) and isinstance(conf.get("plugins", []), list) and all(
            isinstance(p, dict) for p in conf.get("plugins", []))
        if not plugins_ok:
            raise InstallError(f"{primary} is not a CNI network config (expected an object with a plugins list)",
                               "bad_primary_config")
        changed = self._install_plugin()
        if self.kubeconfig is not None:
            changed = self.kubeconfig.write() or changed
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
        with self._guard.lock:
            self._guard.retired = True
            self._uninstall()

    def _uninstall(self) -> None:
        primary = self.primary_config()
        if primary is not None:
            try:
                conf = json.loads(primary.read_text())
            except (OSError, ValueError):
                conf = {}
            if not isinstance(conf, dict) or not isinstance(conf.get("plugins"), list):
                conf = {}
            ours = [p for p in conf.get("plugins") or [] if isinstance(p, dict) and p.get("type") == PLUGIN_TYPE]
            if ours:
                conf["plugins"] = [p for p in conf["plugins"] if not any(p is o for o in ours)]
                _atomic_write(primary, json.dumps(conf, indent=2).encode(), 0o644)
        if self.kubeconfig is not None:
            self.kubeconfig.path.unlink(missing_ok=True)
        (self.conf_dir / LEGACY_KUBECONFIG_NAME).unlink(missing_ok=True)
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
                raise InstallError(f"{path}: not a file, directory or symlink; the plugin bundle cannot hold it",
                                   "bad_plugin_source")
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
    tmp.unlink(missing_ok=True)  # never write through a leftover symlink (O_EXCL refuses one too)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # born with `mode`: a token is never readable
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


__all__ = ["KUBECONFIG_NAME", "VERSIONS_DIR", "CopiedKubeconfig", "InstallError", "Installer", "PluginKubeconfig",
           "ServiceAccountKubeconfig", "api_server_url", "render_kubeconfig", "tree_hash"]
