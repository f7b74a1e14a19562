"""Fixtures for tests that need root and real network namespaces: a local cluster driven through the
`ambientctl` CLI exactly as a user types it, torn down (and checked clean) even when tests fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
AMBIENTCTL = [sys.executable, "-m", "ambient.cli"]
OTHER_CLUSTER_WAIT = 600.0  # seconds to wait for someone else's local cluster to go down before skipping


def skip_unless_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces, links and iptables rules")


@dataclass
class Cluster:
    state_dir: Path

    def ctl(self, *args: str, check: bool = True, timeout: float = 120, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "AMBIENT_STATE_DIR": str(self.state_dir)}
        env.pop("KUBECONFIG", None)
        proc = subprocess.run([*AMBIENTCTL, *args], capture_output=True, text=True, env=env, timeout=timeout,
                              input=stdin, cwd=REPO, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"ambientctl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "-o", "json").stdout)

    def pods(self, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", "pods", *(["-n", namespace] if namespace else ["-A"])]
        if selector:
            args += ["-l", selector]
        return list(self.json(*args)["items"])

    def exec(self, target: str, *command: str, namespace: str = "default", check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        return self.ctl("exec", "-n", namespace, target, "--", *command, check=check, timeout=60)


def eventually(condition: Callable[[], Any], timeout: float = 30, interval: float = 0.1, what: str = "") -> Any:
    """Poll until `condition()` returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}; last value: {last!r}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    skip_unless_root()
    from ambient.local.cluster import current_state_dir, running
    from ambient.local.layout import StateDir

    def free() -> bool:
        other = current_state_dir()
        return not (other and running(StateDir(other)))

    state_dir = tmp_path_factory.mktemp("cluster") / "state"
    c = Cluster(state_dir)

    def started() -> bool:
        """`up` once no other cluster runs; False when another test session's `up` won the race (ours then
        refuses, under `up`'s host lock, with 'another local cluster is running')."""
        if not free():
            return False
        proc = c.ctl("up", "--nodes", "2", check=False)
        if proc.returncode != 0 and "another local cluster is running" in proc.stderr:
            return False
        if proc.returncode != 0:
            raise AssertionError(f"ambientctl up --nodes 2 failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return True

    try:
        # Only one local cluster fits on a host (fixed addresses): wait for someone else's to go, then skip.
        try:
            eventually(started, timeout=OTHER_CLUSTER_WAIT, interval=2, what="another local cluster to go down")
        except AssertionError as exc:
            if "ambientctl up" in str(exc):
                raise
            pytest.skip(f"another local cluster kept running for {OTHER_CLUSTER_WAIT:.0f}s; its addresses would "
                        "clash")
        c.ctl("apply", "-f", "samples/bookinfo/bookinfo.yaml")
        c.ctl("apply", "-f", "samples/sleep/sleep.yaml")
        c.ctl("wait", "--for=condition=ready", "pod", "--all", "-n", "bookinfo", "--timeout=90s")
        c.ctl("wait", "--for=condition=ready", "pod", "-l", "app=sleep", "--timeout=90s")
        yield c
    finally:
        c.ctl("down", check=False)
