"""Installer mode: the istio-cni entry ends up last in the primary conflist, survives rewrites by another
CNI, and goes away on uninstall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni.installer import KUBECONFIG_NAME, PLUGIN_TYPE, Installer, InstallError

ENTRY = {"cni_agent_run_dir": "/var/run/istio-cni", "ambient_enabled": True}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    plugin = tmp_path / "ambient-cni"
    plugin.write_text("#!/bin/sh\necho plugin\n")
    return conf, bin_dir, plugin


def installer(dirs: tuple[Path, Path, Path], kubeconfig: Path | None = None) -> Installer:
    conf, bin_dir, plugin = dirs
    return Installer(conf, bin_dir, plugin, ENTRY, kubeconfig)


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
    installer(dirs, kubeconfig).install()
    entry = json.loads((conf / "10-net.conflist").read_text())["plugins"][-1]
    assert entry["kubernetes"]["kubeconfig"] == str(conf / KUBECONFIG_NAME)
    assert (conf / KUBECONFIG_NAME).read_text() == "apiVersion: v1\n"


def test_uninstall_removes_everything_it_added(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    conf, bin_dir, _ = dirs
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("x")
    write(conf / "10-net.conflist", {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    inst = installer(dirs, kubeconfig)
    inst.install()
    inst.uninstall()
    assert json.loads((conf / "10-net.conflist").read_text())["plugins"] == [{"type": "bridge"}]
    assert not (bin_dir / PLUGIN_TYPE).exists() and not (conf / KUBECONFIG_NAME).exists()
    inst.uninstall()  # idempotent


def test_no_primary_config_or_garbage_is_an_actionable_error(dirs: tuple[Path, Path, Path]) -> None:
    conf, _, _ = dirs
    with pytest.raises(InstallError, match="primary CNI must be installed first"):
        installer(dirs).install()
    (conf / "10-net.conflist").write_text("{not json")
    with pytest.raises(InstallError, match=r"10-net\.conflist"):
        installer(dirs).install()
