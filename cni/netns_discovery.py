"""Finding a running pod's network namespace when the plugin did not hand it to us (agent restart,
namespace labelled after the pod started).

Three sources, tried in order: the path the local kubelet records (`sandbox.json` in its pod dirs);
then, for real nodes, a `/proc` scan for a process whose cgroup path names the pod UID, accepted only
if that netns really holds one of the pod's IPs (a host-network process in the pod's cgroup would
otherwise fool us).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ambient.netns import in_netns


def _uid_forms(uid: str) -> tuple[str, str]:
    # cgroupfs paths carry the UID as-is; systemd slices replace '-' by '_'.
    return uid, uid.replace("-", "_")


def from_kubelet_records(uid: str, pod_dirs: tuple[str, ...]) -> str | None:
    for pod_dir in pod_dirs:
        for record in Path(pod_dir).glob(f"*_{uid}/sandbox.json"):
            try:
                netns = json.loads(record.read_text()).get("netns")
            except (OSError, ValueError):
                continue
            if netns and Path(f"/run/netns/{netns}").exists():
                return f"/run/netns/{netns}"
    return None


def _netns_ips(path: str) -> set[str]:
    def read() -> set[str]:
        import socket

        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return {addr.get_attr("IFA_ADDRESS") for addr in ipr.get_addr() if addr["family"] in (
                socket.AF_INET, socket.AF_INET6)}

    return in_netns(path, read)


def from_proc(uid: str, pod_ips: list[str], proc: Path = Path("/proc"),
              netns_ips: Callable[[str], set[str]] = _netns_ips) -> str | None:
    forms = _uid_forms(uid)
    seen: set[tuple[int, int]] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            if not any(form in cgroup for form in forms):
                continue
            ns_path = str(entry / "ns" / "net")
            st = os.stat(ns_path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            if not pod_ips or set(pod_ips) & netns_ips(ns_path):
                return ns_path
        except OSError:
            continue
    return None


def find_netns(uid: str, pod_ips: list[str], pod_dirs: tuple[str, ...]) -> str | None:
    return from_kubelet_records(uid, pod_dirs) or from_proc(uid, pod_ips)
