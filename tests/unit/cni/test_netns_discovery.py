"""Finding a running pod's netns: the local kubelet's record, else a /proc scan by cgroup + pod IP."""

from __future__ import annotations

import json
from pathlib import Path

from cni.netns_discovery import from_kubelet_records, from_proc

UID = "1f2e3d4c-0000-4000-8000-123456789abc"


def fake_proc(root: Path, pid: int, cgroup: str) -> None:
    entry = root / str(pid)
    (entry / "ns").mkdir(parents=True)
    (entry / "cgroup").write_text(cgroup)
    (entry / "ns" / "net").write_text(f"netns of {pid}")


def test_proc_scan_matches_uid_in_cgroup_and_checks_pod_ip(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "0::/system.slice/sshd.service\n")
    fake_proc(tmp_path, 20, f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-x.scope\n")
    fake_proc(tmp_path, 30, f"0::/kubepods/besteffort/pod{UID}/abc\n")
    ips = {str(tmp_path / "20" / "ns" / "net"): {"192.168.1.1"},  # a hostNetwork process of the pod
           str(tmp_path / "30" / "ns" / "net"): {"10.0.0.5"}}
    found = from_proc(UID, ["10.0.0.5"], tmp_path, lambda path: ips.get(path, set()))
    assert found == str(tmp_path / "30" / "ns" / "net")
    assert from_proc(UID, ["10.9.9.9"], tmp_path, lambda path: ips.get(path, set())) is None
    assert from_proc("other-uid", [], tmp_path, lambda path: set()) is None


def test_kubelet_record_needs_an_existing_netns(tmp_path: Path) -> None:
    record = tmp_path / f"default_web_{UID}"
    record.mkdir()
    (record / "sandbox.json").write_text(json.dumps({"netns": "amb-does-not-exist"}))
    assert from_kubelet_records(UID, (str(tmp_path),)) is None
    assert from_kubelet_records("missing", (str(tmp_path),)) is None
