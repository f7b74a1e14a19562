"""ambientctl's pure helpers (targets, apply patches, durations, conditions), printers and entry points."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ambient.cli.main import (
    LAST_APPLIED,
    CliError,
    _apply_patch,
    _condition_met,
    _duration,
    _removal_patch,
    cli,
    split_targets,
)
from ambient.cli.printers import pod_status, table

Obj = dict[str, Any]


# -- targets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (("pods",), [("pods", None)]),
    (("pods", "a", "b"), [("pods", "a"), ("pods", "b")]),
    (("pod/a", "svc/b"), [("pod", "a"), ("svc", "b")]),
    (("pods,svc",), [("pods", None), ("svc", None)]),
    (("pods,svc", "a"), [("pods", "a"), ("svc", "a")]),
])
def test_split_targets(args: tuple[str, ...], expected: list[tuple[str, str | None]]) -> None:
    assert split_targets(args) == expected


@pytest.mark.parametrize(("args", "message"), [
    ((), "you must specify the type of resource"),
    (("pod/a", "b"), "arguments in resource/name form: b"),
    (("pod/",), "arguments in resource/name form: pod/"),
])
def test_split_targets_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CliError, match=message):
        split_targets(args)


# -- apply patches -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("last", "new", "patch"), [
    ({"a": 1, "b": 2}, {"a": 1}, {"a": 1, "b": None}),
    ({"spec": {"x": 1, "y": 2}}, {"spec": {"x": 1}}, {"spec": {"x": 1, "y": None}}),
    ({"spec": {"x": {"deep": 1}, "k": 1}}, {"spec": {"k": 2}}, {"spec": {"k": 2, "x": None}}),
    ({"spec": {"ports": [1, 2]}}, {"spec": {"ports": [3]}}, {"spec": {"ports": [3]}}),
    ({"spec": {"ports": [{"a": 1}]}}, {"spec": {"ports": []}}, {"spec": {"ports": []}}),
    ({"a": 1}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ({}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ({"a": {"b": 1}}, {}, {"a": None}),
])
def test_removal_patch(last: Obj, new: Obj, patch: Obj) -> None:
    assert _removal_patch(last, new) == patch


def configmap(data: Obj, annotations: Obj | None = None) -> Obj:
    meta: Obj = {"name": "cfg", "namespace": "default"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def live_from(applied: Obj) -> Obj:
    live = copy.deepcopy(applied)
    live["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(applied, sort_keys=True)
    live["metadata"]["uid"] = "u1"
    live["status"] = {"ignored": True}
    return live


def test_apply_patch_removes_what_was_dropped_and_carries_the_last_applied() -> None:
    live = live_from(configmap({"keep": "1", "drop": "2"}))
    new = configmap({"keep": "3"})
    patch = _apply_patch(live, new)
    assert patch["data"] == {"keep": "3", "drop": None}
    assert patch["metadata"]["annotations"] == {LAST_APPLIED: json.dumps(new, sort_keys=True)}
    assert "status" not in patch


def test_apply_patch_without_a_previous_apply() -> None:
    live = configmap({"k": "v"})
    new = configmap({"k": "w"})
    before = copy.deepcopy(new)
    patch = _apply_patch(live, new)
    assert patch == {**before, "metadata": {**before["metadata"],
                                            "annotations": {LAST_APPLIED: json.dumps(before, sort_keys=True)}}}
    assert new == before, "the manifest itself must not gain the annotation"


def test_apply_patch_removes_annotations_dropped_from_the_manifest() -> None:
    live = live_from(configmap({}, {"team": "a", "owner": "b"}))
    new = configmap({})
    annotations = _apply_patch(live, new)["metadata"]["annotations"]
    assert annotations == {"team": None, "owner": None, LAST_APPLIED: json.dumps(new, sort_keys=True)}
    new_kept = configmap({}, {"team": "c"})
    annotations = _apply_patch(live, new_kept)["metadata"]["annotations"]
    assert annotations == {"team": "c", "owner": None, LAST_APPLIED: json.dumps(new_kept, sort_keys=True)}
    assert new_kept["metadata"]["annotations"] == {"team": "c"}


# -- durations and conditions --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("2m", 120.0), ("1.5h", 5400.0), ("500ms", 0.5), ("45", 45.0), ("0.25", 0.25), ("0s", 0.0),
])
def test_duration(text: str, seconds: float) -> None:
    assert _duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "abc", "10x", "-5s", "1.2.3s", "5 s", "m5"])
def test_duration_rejects(text: str) -> None:
    with pytest.raises(CliError, match="invalid --timeout"):
        _duration(text)


OBJ_WITH_CONDITIONS: Obj = {"status": {"conditions": [{"type": "Ready", "status": "True"},
                                                      {"type": "Available", "status": "False"}]}}


@pytest.mark.parametrize(("condition", "met"), [
    ("ready", True),
    ("Ready", True),
    ("ready=true", True),
    ("ready=False", False),
    ("available", False),
    ("available=false", True),
    ("initialized", False),
])
def test_condition_met(condition: str, met: bool) -> None:
    assert _condition_met(OBJ_WITH_CONDITIONS, condition) is met


def test_condition_met_without_status() -> None:
    assert not _condition_met({}, "ready")
    assert not _condition_met({"status": {"conditions": None}}, "ready")


# -- printers ------------------------------------------------------------------------------------------

def pod(name: str = "web-1", phase: str | None = "Running", states: list[Obj] | None = None, *,
        deleting: bool = False, ip: str | None = None, node: str | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": "default"}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: Obj = {"containerStatuses": [{"name": f"c{i}", "state": s, "ready": "running" in s, "restartCount": i}
                                         for i, s in enumerate(states or [])]}
    if phase:
        status["phase"] = phase
    if ip:
        status["podIP"] = ip
    spec: Obj = {"containers": [{"name": f"c{i}"} for i in range(len(states or [{}]))]}
    if node:
        spec["nodeName"] = node
    return {"metadata": meta, "spec": spec, "status": status}


@pytest.mark.parametrize(("subject", "expected"), [
    (pod(deleting=True, states=[{"running": {}}]), "Terminating"),
    (pod(states=[{"waiting": {"reason": "CrashLoopBackOff"}}]), "CrashLoopBackOff"),
    (pod(phase="Pending", states=[{"waiting": {"reason": "ContainerCreating"}}]), "ContainerCreating"),
    (pod(phase="Pending", states=[{"waiting": {}}]), "Pending"),
    (pod(phase="Succeeded", states=[{"terminated": {"reason": "Completed", "exitCode": 0}}]), "Completed"),
    (pod(phase="Failed", states=[{"terminated": {"reason": "Error", "exitCode": 1}}]), "Error"),
    (pod(phase="Failed", states=[{"terminated": {"exitCode": 1}}]), "Failed"),
    (pod(states=[{"terminated": {"reason": "Error"}}]), "Running"),
    (pod(states=[{"running": {}}]), "Running"),
    (pod(phase=None), "Pending"),
])
def test_pod_status(subject: Obj, expected: str) -> None:
    assert pod_status(subject) == expected


def columns_of(line: str, headers: list[str], header_line: str) -> list[str]:
    """Cut `line` at the header's column starts."""
    starts = [header_line.index(h) for h in headers]
    ends = [*starts[1:], None]
    return [line[s:e].strip() for s, e in zip(starts, ends, strict=True)]


def test_table_aligns_columns() -> None:
    pods = [pod("a", states=[{"running": {}}]),
            pod("a-much-longer-name", phase="Pending", states=[{"waiting": {"reason": "ContainerCreating"}}])]
    lines = table(pods, "Pod", wide=False, with_namespace=False).splitlines()
    headers = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert lines[0].split() == headers
    assert lines[0].index("READY") == len("a-much-longer-name") + 3
    assert columns_of(lines[1], headers, lines[0]) == ["a", "1/1", "Running", "0", "<unknown>"]
    assert columns_of(lines[2], headers, lines[0]) == ["a-much-longer-name", "0/1", "ContainerCreating", "0",
                                                       "<unknown>"]
    assert all(line == line.rstrip() for line in lines)


def test_table_with_namespace_column_first() -> None:
    lines = table([pod("a", states=[{"running": {}}])], "Pod", wide=False, with_namespace=True).splitlines()
    assert lines[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert lines[1].split()[:2] == ["default", "a"]


def test_table_wide_pod_columns_include_ip_and_node() -> None:
    subject = pod("a", states=[{"running": {}}], ip="10.244.1.5", node="node-1")
    lines = table([subject, pod("b", states=[{"running": {}}])], "Pod", wide=True, with_namespace=False).splitlines()
    assert lines[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert lines[1].split()[-2:] == ["10.244.1.5", "node-1"]
    assert lines[2].split()[-2:] == ["<none>", "<none>"]


def test_table_unknown_kind_and_show_kind() -> None:
    obj = {"metadata": {"name": "x"}}
    assert table([obj], "Widget", wide=True, with_namespace=False).splitlines() == ["NAME   AGE", "x      <unknown>"]
    assert table([obj], "Widget", wide=False, with_namespace=False, show_kind="widget.example.com").splitlines()[1] \
        .startswith("widget.example.com/x ")


# -- entry point ---------------------------------------------------------------------------------------

@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig pointing at a port nothing listens on, so a stray request fails fast."""
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\ncurrent-context: test\n"
                    "clusters:\n- name: test\n  cluster: {server: 'http://127.0.0.1:1'}\n"
                    "contexts:\n- name: test\n  context: {cluster: test, namespace: default}\n")
    return path


def test_help_lists_the_verbs() -> None:
    result = CliRunner().invoke(cli, ["--help"], prog_name="ambientctl")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ambientctl")
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed >= {"up", "down", "status", "apply", "get", "delete", "label", "annotate", "exec", "logs", "wait"}


def test_apply_of_a_missing_path_fails_before_any_request(kubeconfig: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--kubeconfig", str(kubeconfig), "--state-dir", str(tmp_path / "state"),
                                      "apply", "-f", "/nonexistent"], prog_name="ambientctl")
    assert result.exit_code == 1
    assert result.stderr == 'error: the path "/nonexistent" does not exist\n'
    assert result.stdout == ""
