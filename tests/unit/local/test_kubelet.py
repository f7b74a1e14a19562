"""The kubelet's pure helpers and the CNI runner, the latter driven by small fake plugin executables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ambient.local import cni
from ambient.local.cni import CniError, Invocation, load_conflist, result_ips
from ambient.local.kubelet import Sandbox, _field_ref, _resolve_port, expand, resolv_conf
from ambient.local.network import NodeNet

Obj = dict[str, Any]


# -- $(VAR) expansion ----------------------------------------------------------------------------------

ENV = {"A": "1", "B": "two", "DOLLARS": "$$"}


@pytest.mark.parametrize(("text", "expected"), [
    ("$(A)", "1"),
    ("x-$(A)-$(B)-y", "x-1-two-y"),
    ("$(MISSING)", "$(MISSING)"),
    ("$(A)$(MISSING)", "1$(MISSING)"),
    ("$$(A)", "$(A)"),
    ("a$$b", "a$b"),
    ("$$$(A)", "$1"),
    ("$A and $(", "$A and $("),
    ("$(DOLLARS)", "$$"),  # an expanded value is not unescaped a second time
    ("", ""),
])
def test_expand(text: str, expected: str) -> None:
    assert expand(text, ENV) == expected


def test_resolv_conf() -> None:
    assert resolv_conf("prod").splitlines() == [
        "search prod.svc.cluster.local svc.cluster.local cluster.local",
        "nameserver 10.96.0.10",
        "options ndots:5",
    ]


# -- ports and field references ------------------------------------------------------------------------

CONTAINER: Obj = {"name": "app", "ports": [{"name": "http", "containerPort": 8080},
                                           {"name": "metrics", "containerPort": 15020}]}


@pytest.mark.parametrize(("port", "expected"), [
    (9090, 9090),
    ("9090", 9090),
    ("http", 8080),
    ("metrics", 15020),
])
def test_resolve_port(port: Any, expected: int) -> None:
    assert _resolve_port(port, CONTAINER) == expected


@pytest.mark.parametrize("container", [CONTAINER, {"name": "app"}, {"name": "app", "ports": None}])
def test_resolve_port_unknown_name_names_the_container(container: Obj) -> None:
    with pytest.raises(ValueError, match=r"'grpc'.*container app"):
        _resolve_port("grpc", container)


POD: Obj = {"metadata": {"name": "web-1", "namespace": "prod", "uid": "u-123",
                         "labels": {"app": "web", "app.kubernetes.io/name": "web"},
                         "annotations": {"note": "hi"}},
            "spec": {"serviceAccountName": "web-sa"}}


@pytest.mark.parametrize(("path", "expected"), [
    ("metadata.name", "web-1"),
    ("metadata.namespace", "prod"),
    ("metadata.uid", "u-123"),
    ("status.podIP", "10.244.1.7"),
    ("status.hostIP", NodeNet(2).ip),
    ("spec.nodeName", "node-2"),
    ("spec.serviceAccountName", "web-sa"),
    ("metadata.labels['app']", "web"),
    ("metadata.labels['app.kubernetes.io/name']", "web"),
    ("metadata.labels['missing']", ""),
    ("metadata.annotations['note']", "hi"),
    ("spec.unknown", ""),
])
def test_field_ref(path: str, expected: str) -> None:
    sandbox = Sandbox(netns="amb-pod-u-123", ips=["10.244.1.7"], cni_result=None, container_id="c1")
    assert _field_ref(POD, path, NodeNet(2), sandbox) == expected


def test_field_ref_pod_ip_before_the_sandbox_has_one() -> None:
    sandbox = Sandbox(netns=None, ips=[], cni_result=None, container_id="c1")
    assert _field_ref(POD, "status.podIP", NodeNet(1), sandbox) == ""


# -- CNI configuration ---------------------------------------------------------------------------------

def write_json(path: Path, obj: Obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_load_conflist_takes_the_first_file_in_lexical_order(tmp_path: Path) -> None:
    write_json(tmp_path / "20-second.conflist", {"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "b"}]})
    write_json(tmp_path / "10-first.conflist", {"cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "a"}]})
    (tmp_path / "00-notes.txt").write_text("not a config")
    assert load_conflist(tmp_path)["name"] == "a"


@pytest.mark.parametrize(("conf", "version"), [
    ({"cniVersion": "0.3.1", "name": "net", "type": "bridge"}, "0.3.1"),
    ({"name": "net", "type": "bridge"}, "0.4.0"),
])
def test_load_conflist_wraps_a_single_conf(tmp_path: Path, conf: Obj, version: str) -> None:
    write_json(tmp_path / "10-net.conf", conf)
    assert load_conflist(tmp_path) == {"cniVersion": version, "name": "net", "plugins": [conf]}


def test_load_conflist_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(CniError, match=f"no network config found in {tmp_path}"):
        load_conflist(tmp_path)


def test_load_conflist_invalid_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "10-bad.conflist"
    bad.write_text("{not json")
    with pytest.raises(CniError, match=f"cannot parse {bad}"):
        load_conflist(tmp_path)


def test_load_conflist_without_plugins(tmp_path: Path) -> None:
    path = write_json(tmp_path / "10-empty.conflist", {"cniVersion": "1.0.0", "name": "x", "plugins": []})
    with pytest.raises(CniError, match=f"{path} has no plugins"):
        load_conflist(tmp_path)


INV = Invocation(container_id="ctr-1", netns="/run/netns/amb-pod-u1", ifname="eth0", pod_name="web-1",
                 pod_namespace="prod", pod_uid="u1")


def test_invocation_env() -> None:
    env = INV.env("ADD", "/opt/cni/bin:/usr/lib/cni")
    assert env["CNI_ARGS"] == ("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-1;"
                               "K8S_POD_INFRA_CONTAINER_ID=ctr-1;K8S_POD_UID=u1")
    assert {k: v for k, v in env.items() if k not in {"PATH", "CNI_ARGS"}} == {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-1", "CNI_NETNS": "/run/netns/amb-pod-u1",
        "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni"}
    assert env["PATH"]


@pytest.mark.parametrize(("result", "expected"), [
    ({"ips": [{"address": "10.244.1.5/24"}, {"address": "fd00::5/64"}]}, ["10.244.1.5", "fd00::5"]),
    ({"ips": [{"gateway": "10.244.1.1"}, {"address": "10.244.1.5/24"}]}, ["10.244.1.5"]),
    ({"ips": []}, []),
    ({}, []),
])
def test_result_ips(result: Obj, expected: list[str]) -> None:
    assert result_ips(result) == expected


# -- running plugins -----------------------------------------------------------------------------------

IPAM_RESULT = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}]}

# Each fake plugin appends `<command> <type>` to `../calls` and keeps its stdin in `../<type>.<command>.stdin`.
RECORD = """#!/bin/sh
out="$(dirname "$0")/.."
cat > "$out/$(basename "$0").$CNI_COMMAND.stdin"
echo "$CNI_COMMAND $(basename "$0")" >> "$out/calls"
"""
# Echoes the prevResult it was given, like a plugin that only adds side effects; also keeps its CNI_* env.
PASSTHROUGH = """#!{python} -I
import json, os, sys
out, name, command = os.path.dirname(sys.argv[0]) + "/..", os.path.basename(sys.argv[0]), os.environ["CNI_COMMAND"]
conf = json.load(sys.stdin)
open(f"{{out}}/{{name}}.{{command}}.stdin", "w").write(json.dumps(conf))
open(f"{{out}}/{{name}}.env", "w").write(json.dumps({{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}))
open(f"{{out}}/calls", "a").write(f"{{command}} {{name}}\\n")
print(json.dumps(conf.get("prevResult", {{}})))
"""
PLUGINS = {
    "ipam": RECORD + f"echo '{json.dumps(IPAM_RESULT)}'\n",
    "boom": RECORD + """echo '{"code": 7, "msg": "boom", "details": "disk"}'\nexit 1\n""",
    "crash": RECORD + "echo 'stack trace here' >&2\nexit 2\n",
    "passthrough": PASSTHROUGH.format(python=sys.executable),
}


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    """A CNI_PATH directory holding the fake plugins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in PLUGINS.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def conflist(*types: str) -> Obj:
    return {"cniVersion": "1.0.0", "name": "test-net", "plugins": [{"type": t, "option": t} for t in types]}


def calls(plugins: Path) -> list[str]:
    path = plugins.parent / "calls"
    return path.read_text().splitlines() if path.exists() else []


def stdin_of(plugins: Path, name: str, command: str) -> Obj:
    data: Obj = json.loads((plugins.parent / f"{name}.{command}.stdin").read_text())
    return data


async def test_add_chains_prev_result_in_order(plugins: Path) -> None:
    result = await cni.add(conflist("ipam", "passthrough"), INV, f"/nonexistent:{plugins}")
    assert result == IPAM_RESULT
    assert calls(plugins) == ["ADD ipam", "ADD passthrough"]
    first = stdin_of(plugins, "ipam", "ADD")
    assert first == {"type": "ipam", "option": "ipam", "cniVersion": "1.0.0", "name": "test-net"}
    second = stdin_of(plugins, "passthrough", "ADD")
    assert second["prevResult"] == IPAM_RESULT
    assert (second["name"], second["cniVersion"], second["option"]) == ("test-net", "1.0.0", "passthrough")


async def test_del_runs_in_reverse_with_the_cached_result(plugins: Path) -> None:
    cached = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.9/24"}]}
    errors = await cni.delete(conflist("ipam", "passthrough"), INV, str(plugins), cached)
    assert errors == []
    assert calls(plugins) == ["DEL passthrough", "DEL ipam"]
    assert stdin_of(plugins, "passthrough", "DEL")["prevResult"] == cached


async def test_del_without_a_cached_result_sends_no_prev_result(plugins: Path) -> None:
    assert await cni.delete(conflist("passthrough"), INV, str(plugins), None) == []
    assert "prevResult" not in stdin_of(plugins, "passthrough", "DEL")


async def test_failing_plugin_stops_add_with_its_error_object(plugins: Path) -> None:
    with pytest.raises(CniError) as info:
        await cni.add(conflist("ipam", "boom", "passthrough"), INV, str(plugins))
    err = info.value
    assert (err.plugin, err.command, err.code, err.details) == ("boom", "ADD", 7, "disk")
    assert str(err) == "plugin type='boom' failed (add): boom: disk"
    assert calls(plugins) == ["ADD ipam", "ADD boom"]


async def test_failing_plugin_without_an_error_object_reports_exit_status_and_stderr(plugins: Path) -> None:
    with pytest.raises(CniError, match=r"plugin type='crash' failed \(add\): exit status 2: stack trace here"):
        await cni.add(conflist("crash"), INV, str(plugins))


async def test_missing_plugin_names_the_search_path(plugins: Path) -> None:
    path = f"/nonexistent:{plugins}"
    with pytest.raises(CniError, match=f"failed to find plugin 'nope' in path {path}") as info:
        await cni.add(conflist("ipam", "nope"), INV, path)
    assert info.value.plugin == "nope"


async def test_del_continues_past_failures_and_returns_them(plugins: Path) -> None:
    errors = await cni.delete(conflist("ipam", "nope", "boom", "passthrough"), INV, str(plugins), IPAM_RESULT)
    assert [(e.plugin, e.command) for e in errors] == [("boom", "DEL"), ("nope", "DEL")]
    assert errors[0].code == 7
    assert calls(plugins) == ["DEL passthrough", "DEL boom", "DEL ipam"]


async def test_plugins_receive_the_cni_environment(plugins: Path) -> None:
    await cni.add(conflist("passthrough"), INV, str(plugins))
    env = json.loads((plugins.parent / "passthrough.env").read_text())
    assert env == {k: v for k, v in INV.env("ADD", str(plugins)).items() if k.startswith("CNI_")}


# -- mirror pods ---------------------------------------------------------------------------------------
async def test_kubelet_runs_nothing_for_a_mirror_pod(tmp_path: Path) -> None:
    """A mirror pod stands for a process the node already runs (its ztunnel): no sandbox, no CNI."""
    from ambient.kube.client import KubeClient, KubeConfig
    from ambient.local.kubelet import MIRROR_ANNOTATION, Kubelet
    from ambient.local.layout import StateDir

    async with KubeClient(KubeConfig("http://127.0.0.1:1")) as client:
        kubelet = Kubelet(StateDir(tmp_path), NodeNet(1), client)
        mirror = {"metadata": {"name": "ztunnel-node-1", "namespace": "istio-system", "uid": "u1",
                               "annotations": {MIRROR_ANNOTATION: "abc"}},
                  "spec": {"nodeName": "node-1", "hostNetwork": True, "containers": [{"name": "istio-proxy"}]}}
        kubelet._on_pod("ADDED", mirror)
        try:
            assert kubelet.workers == {} and kubelet.tasks == {}
        finally:
            for task in kubelet.tasks.values():
                task.cancel()
