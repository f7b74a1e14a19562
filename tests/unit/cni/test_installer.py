"""Installer mode: the istio-cni entry ends up last in the primary conflist, survives rewrites by another
CNI, and goes away on uninstall; the plugin is a single file or a bundle directory installed as versions
behind a link that switches atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cni.installer import (
    KUBECONFIG_NAME,
    LEGACY_KUBECONFIG_NAME,
    PLUGIN_TYPE,
    VERSIONS_DIR,
    CopiedKubeconfig,
    Installer,
    InstallError,
    PluginKubeconfig,
    tree_hash,
)

ENTRY = {"cni_agent_run_dir": "/var/run/istio-cni", "ambient_enabled": True}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    plugin = tmp_path / "ambient-cni"
    plugin.write_text("#!/bin/sh\necho plugin\n")
    return conf, bin_dir, plugin


def installer(dirs: tuple[Path, Path, Path], kubeconfig: Path | None = None) -> Installer:
    """With `kubeconfig`: copied to `<run dir>/istio-cni-kubeconfig`, the run dir beside the conf dir."""
    conf, bin_dir, plugin = dirs
    target = PluginKubeconfig(conf.parent / "run" / KUBECONFIG_NAME, CopiedKubeconfig(kubeconfig)) if kubeconfig \
        else None
    return Installer(conf, bin_dir, plugin, ENTRY, target)


def write(path: Path, doc: dict[str, object]) -> None:
    path.write_text(json.dumps(doc))


def test_appends_entry_last_to_the_primary_conflist(dirs: tuple[Path, Path, Path]) -> None:
    conf, bin_dir, _ = dirs
    write(conf / "10-net.conflist", {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    write(conf / "20-other.conflist", {"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "ptp"}]})
    inst = installer(dirs)
    assert not inst.installed()
    assert inst.install()
    plugins = json.loads((conf / "10-net.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", PLUGIN_TYPE]
    assert json.loads((conf / "20-other.conflist").read_text())["plugins"] == [{"type": "ptp"}]
    assert (bin_dir / PLUGIN_TYPE).read_text().startswith("#!/bin/sh")
    assert (bin_dir / PLUGIN_TYPE).stat().st_mode & 0o111
    assert inst.installed()
    assert not inst.install(), "a second install changes nothing"


def test_wraps_a_single_conf_into_a_conflist(dirs: tuple[Path, Path, Path]) -> None:
    conf, _, _ = dirs
    write(conf / "05-flannel.conf", {"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel"})
    installer(dirs).install()
    assert not (conf / "05-flannel.conf").exists()
    wrapped = json.loads((conf / "05-flannel.conflist").read_text())
    assert wrapped["cniVersion"] == "0.3.1" and wrapped["name"] == "cbr0"
    assert [p["type"] for p in wrapped["plugins"]] == ["flannel", PLUGIN_TYPE]


def test_reinserts_after_another_cni_rewrites_the_file(dirs: tuple[Path, Path, Path]) -> None:
    conf, _, _ = dirs
    primary = conf / "10-net.conflist"
    write(primary, {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    inst = installer(dirs)
    inst.install()
    write(primary, {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}, {"type": "portmap"}]})
    assert not inst.installed()
    inst.install()
    assert [p["type"] for p in json.loads(primary.read_text())["plugins"]] == ["bridge", "portmap", PLUGIN_TYPE]


def test_moves_an_entry_that_is_not_last_and_keeps_one_copy(dirs: tuple[Path, Path, Path]) -> None:
    conf, _, _ = dirs
    primary = conf / "10-net.conflist"
    write(primary, {"cniVersion": "1.0.0", "name": "net",
                    "plugins": [{"type": "bridge"}, {"type": PLUGIN_TYPE, "old": True}, {"type": "portmap"}]})
    installer(dirs).install()
    types = [p["type"] for p in json.loads(primary.read_text())["plugins"]]
    assert types == ["bridge", "portmap", PLUGIN_TYPE]


def test_kubeconfig_is_written_and_referenced(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    conf, _, _ = dirs
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    write(conf / "10-net.conflist", {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    inst = installer(dirs, kubeconfig)
    inst.install()
    entry = json.loads((conf / "10-net.conflist").read_text())["plugins"][-1]
    written = tmp_path / "run" / KUBECONFIG_NAME
    assert entry["kubernetes"]["kubeconfig"] == str(written)
    assert written.read_text() == "apiVersion: v1\n"
    assert written.stat().st_mode & 0o777 == 0o600, "it holds a token"
    assert not (conf / KUBECONFIG_NAME).exists(), "not in the conf dir other CNIs and the runtime watch"
    assert inst.installed()
    kubeconfig.write_text("apiVersion: v1\n# changed\n")
    assert not inst.installed(), "a changed source is noticed by the agent's poll"
    assert inst.ensure() and written.read_text().endswith("# changed\n")
    assert not inst.ensure()


def test_uninstall_removes_everything_it_added(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    conf, bin_dir, _ = dirs
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("x")
    write(conf / "10-net.conflist", {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    inst = installer(dirs, kubeconfig)
    inst.install()
    (conf / LEGACY_KUBECONFIG_NAME).write_text("left by an older install")
    inst.uninstall()
    assert json.loads((conf / "10-net.conflist").read_text())["plugins"] == [{"type": "bridge"}]
    assert not (bin_dir / PLUGIN_TYPE).exists() and not (tmp_path / "run" / KUBECONFIG_NAME).exists()
    assert not (conf / LEGACY_KUBECONFIG_NAME).exists()
    inst.uninstall()  # idempotent
    # A poll still running in its thread when the agent shut down must not put the plugin back.
    assert inst.ensure() is False and inst.install() is False
    assert json.loads((conf / "10-net.conflist").read_text())["plugins"] == [{"type": "bridge"}]
    assert not (bin_dir / PLUGIN_TYPE).exists()


def test_no_primary_config_or_garbage_is_an_actionable_error(dirs: tuple[Path, Path, Path]) -> None:
    conf, bin_dir, _ = dirs
    with pytest.raises(InstallError, match="primary CNI must be installed first") as waiting:
        installer(dirs).install()
    assert waiting.value.reason == "no_primary_config", "the agent waits on this reason"
    assert not bin_dir.exists(), "nothing is installed before the primary config exists"
    for garbage in ("{not json", "[1, 2]", '{"plugins": {"type": "bridge"}}', '{"plugins": ["bridge"]}'):
        (conf / "10-net.conflist").write_text(garbage)
        with pytest.raises(InstallError, match=r"10-net\.conflist") as bad:
            installer(dirs).install()
        assert bad.value.reason == "bad_primary_config"
        assert not installer(dirs).installed()
        installer(dirs).uninstall()  # leaves what it cannot parse alone, without failing
        assert (conf / "10-net.conflist").read_text() == garbage


# -- the plugin as a bundle directory (what the image ships) ------------------------------------------
def make_bundle(path: Path, release: str) -> Path:
    """A stand-in for `cni.plugin_bundle`'s onedir: the executable finds its `_internal/` beside its real path,
    as PyInstaller's bootloader does through a symlink."""
    (path / "_internal").mkdir(parents=True)
    (path / "_internal" / "release").write_text(release)
    (path / "_internal" / "libpython.so").symlink_to("release")
    (path / PLUGIN_TYPE).write_text('#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\ncat "$here/_internal/release"\n')
    (path / PLUGIN_TYPE).chmod(0o755)
    return path


@pytest.fixture
def net(tmp_path: Path) -> tuple[Path, Path]:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    write(conf / "10-net.conflist", {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    return conf, bin_dir


def bundle_installer(net: tuple[Path, Path], source: Path) -> Installer:
    return Installer(net[0], net[1], source, ENTRY)


def run_installed(bin_dir: Path) -> str:
    """What the runtime gets when it execs `<bin>/istio-cni`."""
    return subprocess.run([bin_dir / PLUGIN_TYPE], capture_output=True, text=True, check=True).stdout


def versions(bin_dir: Path) -> set[str]:
    return {p.name for p in (bin_dir / VERSIONS_DIR).iterdir()}


def test_bundle_is_installed_as_a_version_dir_behind_a_relative_link(net: tuple[Path, Path], tmp_path: Path) -> None:
    _, bin_dir = net
    inst = bundle_installer(net, make_bundle(tmp_path / "v1", "one"))
    assert not inst.installed()
    assert inst.install()
    version = inst.bundle_version
    assert version and len(version) == 16
    # Relative: the agent sees the host's bin dir under another mount path than the runtime does.
    assert os.readlink(bin_dir / PLUGIN_TYPE) == f"{VERSIONS_DIR}/{version}/{PLUGIN_TYPE}"
    assert (bin_dir / VERSIONS_DIR / version / "_internal" / "libpython.so").is_symlink()
    assert run_installed(bin_dir) == "one"
    assert inst.installed()
    assert not inst.install(), "a second install (an agent restart) changes nothing"
    assert versions(bin_dir) == {version}


def test_the_version_is_the_bundle_content_not_its_path(tmp_path: Path) -> None:
    a, b = make_bundle(tmp_path / "a", "same"), make_bundle(tmp_path / "b", "same")
    assert tree_hash(a) == tree_hash(b)
    (b / PLUGIN_TYPE).chmod(0o644)
    assert tree_hash(a) != tree_hash(b), "the executable bit is part of the content"
    (b / PLUGIN_TYPE).chmod(0o755)
    (b / "_internal" / "libpython.so").unlink()
    (b / "_internal" / "libpython.so").symlink_to("elsewhere")
    assert tree_hash(a) != tree_hash(b), "so is a symlink's target"


def test_upgrade_switches_the_link_and_keeps_only_the_replaced_version(net: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    _, bin_dir = net
    releases = [bundle_installer(net, make_bundle(tmp_path / name, name)) for name in ("one", "two", "three")]
    one, two, three = (inst.bundle_version for inst in releases)
    releases[0].install()
    assert releases[1].install()
    assert run_installed(bin_dir) == "two"
    assert versions(bin_dir) == {one, two}, "the replaced version stays for plugins started before the switch"
    assert not releases[0].installed(), "the old agent's check sees the mismatch"
    assert releases[2].install()
    assert run_installed(bin_dir) == "three"
    assert versions(bin_dir) == {two, three}
    assert releases[0].install(), "a rollback is a switch like any other"
    assert run_installed(bin_dir) == "one"
    assert versions(bin_dir) == {three, one}


def test_a_deleted_or_modified_version_is_detected_and_repaired(net: tuple[Path, Path], tmp_path: Path) -> None:
    _, bin_dir = net
    inst = bundle_installer(net, make_bundle(tmp_path / "v1", "one"))
    inst.install()
    installed = bin_dir / VERSIONS_DIR / str(inst.bundle_version)
    shutil.rmtree(installed)
    assert not inst.installed(), "the agent's poll notices a dangling link"
    assert inst.install()
    assert run_installed(bin_dir) == "one"

    (installed / "_internal" / "release").write_text("tampered")
    assert inst.install(), "install (agent start, repair) re-verifies the version's content"
    assert run_installed(bin_dir) == "one"
    assert versions(bin_dir) == {inst.bundle_version}


def test_switching_between_a_file_and_a_bundle(net: tuple[Path, Path], tmp_path: Path) -> None:
    _, bin_dir = net
    script = tmp_path / "ambient-cni"
    script.write_text("#!/bin/sh\necho -n file\n")
    as_file = bundle_installer(net, script)
    as_bundle = bundle_installer(net, make_bundle(tmp_path / "v1", "bundle"))
    as_file.install()
    assert as_bundle.install() and run_installed(bin_dir) == "bundle"
    assert not as_file.installed(), "a link to the bundle is not the file"
    assert as_file.install() and run_installed(bin_dir) == "file"
    assert not (bin_dir / PLUGIN_TYPE).is_symlink()
    assert as_file.installed() and not as_bundle.installed()
    assert versions(bin_dir) == {as_bundle.bundle_version}, "kept until the next switch, then removed"


def test_a_changed_single_file_is_a_mismatch(dirs: tuple[Path, Path, Path]) -> None:
    conf, bin_dir, _ = dirs
    write(conf / "10-net.conflist", {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    inst = installer(dirs)
    inst.install()
    (bin_dir / PLUGIN_TYPE).write_text("#!/bin/sh\necho stale\n")
    assert not inst.installed()
    assert inst.install()
    assert inst.installed()


def test_uninstall_removes_the_link_and_every_version(net: tuple[Path, Path], tmp_path: Path) -> None:
    conf, bin_dir = net
    bundle_installer(net, make_bundle(tmp_path / "v1", "one")).install()
    inst = bundle_installer(net, make_bundle(tmp_path / "v2", "two"))
    inst.install()
    inst.uninstall()
    assert not (bin_dir / PLUGIN_TYPE).is_symlink() and not (bin_dir / PLUGIN_TYPE).exists()
    assert not (bin_dir / VERSIONS_DIR).exists()
    assert json.loads((conf / "10-net.conflist").read_text())["plugins"] == [{"type": "bridge"}]
    inst.uninstall()  # idempotent


@pytest.mark.parametrize("source", ["missing", "empty-dir"])
def test_an_unusable_source_is_an_actionable_error(net: tuple[Path, Path], tmp_path: Path, source: str) -> None:
    path = tmp_path / source
    if source == "empty-dir":
        path.mkdir()
    inst = bundle_installer(net, path)
    with pytest.raises(InstallError, match=r"pass --plugin-source|python -m cni\.plugin_bundle") as bad:
        inst.check_source()
    assert bad.value.reason == "bad_plugin_source", "fatal at agent start, not retried"
    with pytest.raises(InstallError, match=r"pass --plugin-source|python -m cni\.plugin_bundle"):
        inst.install()
    with pytest.raises(InstallError, match=re.escape(str(path))):
        inst.installed()
