"""Table-test harness for ambient.control.translate: hand-written Kubernetes objects in
`cases/<name>.yaml`, the expected workload model in `cases/<name>.json` (canonical JSON: proto field
names, IPs as strings, sorted keys; proto3 leaves out zero values, so DEPLOYMENT, HEALTHY, ALLOW,
GLOBAL and NONE do not appear).

A leading `kind: CaseOptions` document may set clusterId, trustDomain and rootNamespace.
After changing a rule on purpose: `AMBIENT_UPDATE_CASES=1 pytest tests/unit/control`, then read the diff.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ambient.control.translate import ClusterState, Translation, translate
from ambient.control.translate.canonical import dumps, to_canonical

CASES = Path(__file__).parent / "cases"


@dataclass(frozen=True)
class Case:
    name: str
    objects: list[dict[str, Any]]
    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"

    def translate(self, objects: list[dict[str, Any]] | None = None) -> Translation:
        state = ClusterState.from_objects(self.objects if objects is None else objects)
        return translate(state, self.cluster_id, self.trust_domain, self.root_namespace)


def load_case(name: str) -> Case:
    documents = [d for d in yaml.safe_load_all((CASES / f"{name}.yaml").read_text()) if d]
    options: dict[str, Any] = {}
    if documents and documents[0].get("kind") == "CaseOptions":
        raw = documents.pop(0)
        options = {"cluster_id": raw.get("clusterId", "Kubernetes"),
                   "trust_domain": raw.get("trustDomain", "cluster.local"),
                   "root_namespace": raw.get("rootNamespace", "istio-system")}
    return Case(name=name, objects=documents, **options)


def all_case_names() -> list[str]:
    return sorted(p.stem for p in CASES.glob("*.yaml"))


def check_case(name: str) -> dict[str, Any]:
    """Translate the case and compare with its expected JSON; returns the canonical output."""
    actual = to_canonical(load_case(name).translate())
    expected_path = CASES / f"{name}.json"
    if os.environ.get("AMBIENT_UPDATE_CASES"):
        expected_path.write_text(dumps(actual))
    expected = json.loads(expected_path.read_text())
    assert json.loads(dumps(actual)) == expected, f"translation of cases/{name}.yaml differs from cases/{name}.json"
    return actual
