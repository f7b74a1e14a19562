"""The plugin's inputs (`cni.config`): CNI environment, network configuration, kubeconfig, and the ambient
selection rule of PROTOCOLS.md §3 — table-driven, no IO."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cni import config
from cni.config import CniError, NetConf, Selection, api_target, parse_env, parse_netconf, parse_plugin_conf

Obj = dict[str, Any]
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, *,
        host_network: bool = False, ns: str = "apps") -> Obj:
    meta: Obj = {"name": "web-1", "namespace": ns}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"hostNetwork": host_network, "containers": [{"name": "app"}]}}


def namespace(labels: dict[str, str] | None = None, name: str = "apps") -> Obj:
    return {"metadata": {"name": name, **({"labels": labels} if labels is not None else {})}}


# -- selection rule ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("the_pod", "the_ns", "excluded", "ambient", "reason_has"), [
    (pod(), namespace(AMBIENT), (), True, "namespace apps label"),
    (pod(NONE), namespace(AMBIENT), (), False, "opted out"),
    (pod({"istio.io/dataplane-mode": "other"}), namespace(AMBIENT), (), True, "namespace apps label"),
    (pod(AMBIENT), namespace(), (), True, "pod label"),
    (pod(AMBIENT), namespace(NONE), (), True, "pod label"),
    (pod(), namespace(), (), False, "neither"),
    (pod(), namespace({"istio.io/dataplane-mode": "Ambient"}), (), False, "neither"),  # values are exact
    (pod(), namespace(AMBIENT), ("apps",), False, "exclude_namespaces"),
    (pod(AMBIENT), namespace(AMBIENT), ("apps",), False, "exclude_namespaces"),
    (pod(AMBIENT, {"sidecar.istio.io/status": "{}"}), namespace(AMBIENT), (), False, "sidecar"),
    (pod(AMBIENT, host_network=True), namespace(AMBIENT), (), False, "hostNetwork"),
    (pod(AMBIENT, {"sidecar.istio.io/inject": "true"}), namespace(), (), True, "pod label"),  # only status counts
    ({"metadata": {"name": "bare", "namespace": "apps"}}, namespace(AMBIENT), (), True, "namespace"),
    ({}, {}, (), False, "neither"),  # nothing to go on: not ambient, no crash
])
def test_selection_rule(the_pod: Obj, the_ns: Obj, excluded: tuple[str, ...], ambient: bool, reason_has: str) -> None:
    selection = config.select_ambient(the_pod, the_ns, frozenset(excluded))
    assert selection.ambient is ambient
    assert reason_has in selection.reason


ISTIO_DEFAULT_SELECTORS = [
    {"podSelector": {"matchLabels": AMBIENT}},
    {"podSelector": {"matchExpressions": [{"key": "istio.io/dataplane-mode", "operator": "NotIn",
                                           "values": ["none"]}]},
     "namespaceSelector": {"matchLabels": AMBIENT}},
]


@pytest.mark.parametrize(("the_pod", "the_ns"), [
    (pod(), namespace(AMBIENT)), (pod(NONE), namespace(AMBIENT)), (pod(AMBIENT), namespace()),
    (pod(), namespace()), (pod(AMBIENT, host_network=True), namespace()),
    (pod(AMBIENT, {"sidecar.istio.io/status": "{}"}), namespace(AMBIENT)),
])
def test_istio_default_selectors_agree_with_the_built_in_rule(the_pod: Obj, the_ns: Obj) -> None:
    selectors = config.parse_enablement_selectors(ISTIO_DEFAULT_SELECTORS)
    assert config.select_ambient(the_pod, the_ns, frozenset(), selectors).ambient == \
        config.select_ambient(the_pod, the_ns).ambient


def test_custom_selectors_replace_the_label_rule_but_not_the_safety_checks() -> None:
    selectors = config.parse_enablement_selectors([{"namespaceSelector": {"matchLabels": {"team": "a"}}}])
    assert config.select_ambient(pod(), namespace({"team": "a"}), frozenset(), selectors) == \
        Selection(True, "enablement_selectors[0] matches")
    assert not config.select_ambient(pod(AMBIENT), namespace(AMBIENT), frozenset(), selectors).ambient
    assert not config.select_ambient(pod(host_network=True), namespace({"team": "a"}), frozenset(), selectors).ambient
    assert not config.select_ambient(pod(), namespace(), frozenset(), config.parse_enablement_selectors([])).ambient


@pytest.mark.parametrize(("value", "message"), [
    ("ambient", "must be a list"),
    (["x"], "enablement_selectors[0] must be an object"),
    ([{"podSelector": "app=x"}], "podSelector must be a LabelSelector"),
    ([{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}], "unknown matchExpressions"),
    ([{"namespaceSelector": {"matchExpressions": ["a"]}}], "enablement_selectors[0].namespaceSelector"),
])
def test_bad_enablement_selectors(value: Any, message: str) -> None:
    with pytest.raises(CniError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        config.parse_enablement_selectors(value)
    assert info.value.code == config.ERR_INVALID_CONFIG


# -- CNI environment ---------------------------------------------------------------------------------
FULL_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web-1;K8S_POD_UID=u-1"}


def test_env_for_add() -> None:
    env = parse_env(FULL_ENV)
    assert (env.command, env.container_id, env.netns, env.ifname, env.path) == \
        ("ADD", "c1", "/var/run/netns/p", "eth0", "/opt/cni/bin")
    assert (env.pod_name, env.pod_namespace, env.args["K8S_POD_UID"], env.args["IgnoreUnknown"]) == \
        ("web-1", "apps", "u-1", "1")


@pytest.mark.parametrize(("changes", "message"), [
    ({"CNI_COMMAND": None}, "CNI_COMMAND is not set"),
    ({"CNI_COMMAND": "FROB"}, "unknown CNI_COMMAND: 'FROB'"),
    ({"CNI_NETNS": None}, r"required env variables \[CNI_NETNS\] missing"),
    ({"CNI_CONTAINERID": "", "CNI_IFNAME": None}, r"\[CNI_CONTAINERID,CNI_IFNAME\] missing"),
    ({"CNI_ARGS": "K8S_POD_NAME=a;garbage"}, "CNI_ARGS: invalid pair 'garbage'"),
    ({"CNI_ARGS": "=x"}, "CNI_ARGS: invalid pair '=x'"),
])
def test_env_errors(changes: dict[str, str | None], message: str) -> None:
    environ = {k: v for k, v in {**FULL_ENV, **changes}.items() if v is not None}
    with pytest.raises(CniError, match=message) as info:
        parse_env(environ)
    assert info.value.code == config.ERR_INVALID_ENV


@pytest.mark.parametrize(("command", "present"), [
    ("DEL", {"CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"}),  # the netns may already be gone
    ("VERSION", set()), ("GC", set()), ("STATUS", set()),
])
def test_env_requirements_per_command(command: str, present: set[str]) -> None:
    environ = {k: v for k, v in FULL_ENV.items() if k in present} | {"CNI_COMMAND": command}
    assert parse_env(environ).command == command


def test_empty_cni_args() -> None:
    assert config.parse_cni_args("") == {}
    assert config.parse_cni_args("A=;B=c=d") == {"A": "", "B": "c=d"}


# -- network configuration ---------------------------------------------------------------------------
def netconf(**extra: Any) -> bytes:
    base: Obj = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni"}
    return json.dumps({k: v for k, v in {**base, **extra}.items() if v is not None}).encode()


@pytest.mark.parametrize(("stdin", "code", "message"), [
    (b"", config.ERR_DECODE, "no network configuration on stdin"),
    (b"  \n", config.ERR_DECODE, "no network configuration on stdin"),
    (b"{not json", config.ERR_DECODE, "not JSON"),
    (b"\xff\xfe\x00", config.ERR_DECODE, "not JSON"),
    (b"[1, 2]", config.ERR_DECODE, "must be a JSON object, not a list"),
    (netconf(cniVersion=None), config.ERR_INVALID_CONFIG, "no cniVersion"),
    (netconf(cniVersion="0.2.0"), config.ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions"),
    (netconf(cniVersion=1), config.ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions"),
    (netconf(name=None), config.ERR_INVALID_CONFIG, "missing network name"),
    (netconf(name=7), config.ERR_INVALID_CONFIG, "missing network name"),
    (netconf(type=None), config.ERR_INVALID_CONFIG, "missing plugin type"),
])
def test_netconf_errors(stdin: bytes, code: int, message: str) -> None:
    with pytest.raises(CniError, match=message) as info:
        parse_netconf(stdin)
    assert info.value.code == code
    assert info.value.details  # always says what to check


def test_incompatible_version_names_both_sides() -> None:
    with pytest.raises(CniError) as info:
        parse_netconf(netconf(cniVersion="2.0.0"))
    assert "'2.0.0'" in info.value.details and "1.1.0" in info.value.details


PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.2.3/24"}]}


def plugin_conf(command: str = "ADD", **extra: Any) -> config.PluginConf:
    return parse_plugin_conf(parse_netconf(netconf(**{"prevResult": PREV, **extra})), command)


def test_plugin_conf_defaults() -> None:
    conf = plugin_conf()
    assert conf.agent_run_dir == "/var/run/istio-cni"
    assert config.agent_socket(conf) == "/var/run/istio-cni/pluginevent.sock"
    assert (conf.ambient_enabled, conf.log_level, conf.log_file, conf.kubeconfig) == (False, "info", None, None)
    assert conf.enablement_selectors is None and conf.exclude_namespaces == frozenset()


def test_plugin_conf_istio_keys() -> None:
    conf = plugin_conf(ambient_enabled=True, cni_agent_run_dir="/run/x", plugin_log_level="DEBUG",
                       exclude_namespaces=["kube-system"], pod_namespace="istio-system",
                       kubernetes={"kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig",
                                   "exclude_namespaces": ["istio-system"]},
                       enablement_selectors=ISTIO_DEFAULT_SELECTORS)
    assert config.agent_socket(conf) == "/run/x/pluginevent.sock"
    assert conf.log_level == "debug"
    assert conf.exclude_namespaces == {"kube-system", "istio-system"}
    assert conf.kubeconfig == "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig"
    assert conf.enablement_selectors is not None and len(conf.enablement_selectors) == 2
    assert config.is_agent_pod(conf, "istio-cni-node-x7k2p", "istio-system")
    assert not config.is_agent_pod(conf, "istio-cni-node-x7k2p", "apps")
    assert not config.is_agent_pod(conf, "web-1", "istio-system")
    assert not config.is_agent_pod(plugin_conf(), "istio-cni-node-x", "")


@pytest.mark.parametrize(("extra", "command", "message"), [
    ({"prevResult": None}, "ADD", "chained plugin and got no prevResult"),
    ({"prevResult": [1]}, "ADD", "prevResult must be an object"),
    ({"ambient_enabled": "true"}, "ADD", "ambient_enabled must be a boolean, not a string"),
    ({"ambient_enabled": True}, "ADD", "kubernetes.kubeconfig is not set"),
    ({"plugin_log_level": "loud"}, "ADD", "unknown plugin_log_level 'loud'"),
    ({"exclude_namespaces": "kube-system"}, "ADD", "exclude_namespaces must be a list, not a string"),
    ({"exclude_namespaces": ["a", 1]}, "ADD", "exclude_namespaces must be a list of strings"),
    ({"kubernetes": {"exclude_namespaces": [None]}}, "ADD", "kubernetes.exclude_namespaces must be a list"),
    ({"kubernetes": "/etc/kubeconfig"}, "ADD", "kubernetes must be an object"),
    ({"kubernetes": {"kubeconfig": 5}}, "ADD", "kubernetes.kubeconfig must be a string, not a number"),
    ({"cni_agent_run_dir": ["/x"]}, "DEL", "cni_agent_run_dir must be a string, not a list"),
])
def test_plugin_conf_errors(extra: Obj, command: str, message: str) -> None:
    with pytest.raises(CniError, match=message) as info:
        plugin_conf(command, **extra)
    assert info.value.code == config.ERR_INVALID_CONFIG


def test_del_and_check_need_no_prev_result_or_kubeconfig() -> None:
    for command in ("DEL", "CHECK"):
        conf = plugin_conf(command, prevResult=None, ambient_enabled=True)
        assert conf.prev_result is None


@pytest.mark.parametrize(("command", "version", "allowed"), [
    ("CHECK", "0.3.1", False), ("CHECK", "0.4.0", True), ("GC", "1.0.0", False), ("GC", "1.1.0", True),
    ("STATUS", "1.0.0", False), ("ADD", "0.3.0", True), ("DEL", "0.3.0", True),
])
def test_verbs_need_their_spec_version(command: str, version: str, allowed: bool) -> None:
    if allowed:
        config.check_command_version(command, version)
    else:
        with pytest.raises(CniError, match=f"config version does not allow {command}") as info:
            config.check_command_version(command, version)
        assert info.value.code == config.ERR_INCOMPATIBLE_VERSION


def test_error_object_shape() -> None:
    error = CniError(config.ERR_AGENT, "agent down", "is it running?")
    assert error.to_json("0.4.0") == {"cniVersion": "0.4.0", "code": 101, "msg": "agent down",
                                      "details": "is it running?"}
    assert error.reason == "agent"
    assert NetConf("1.0.0", "n", "t", {}).cni_version == "1.0.0"


# -- kubeconfig --------------------------------------------------------------------------------------
def kubeconfig(cluster: Obj, user: Obj | None = None, top: Obj | None = None) -> Obj:
    doc: Obj = {"apiVersion": "v1", "kind": "Config", "current-context": "ctx",
                "clusters": [{"name": "other", "cluster": {"server": "https://wrong"}},
                             {"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user or {}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}]}
    doc.update(top or {})
    return doc


def test_kubeconfig_token_and_ca_file() -> None:
    target = api_target(kubeconfig({"server": "https://10.0.0.1:6443/", "certificate-authority": "pki/ca.crt"},
                                   {"token": "t0k"}), "/etc/cni/net.d/kubeconfig")
    assert target.server == "https://10.0.0.1:6443"
    assert target.ca_file == "/etc/cni/net.d/pki/ca.crt"  # relative to the kubeconfig, like kubectl
    assert (target.token, target.insecure, target.ca_data) == ("t0k", False, None)


def test_kubeconfig_inline_data_and_insecure() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    target = api_target(kubeconfig(
        {"server": "https://h", "certificate-authority-data": base64.b64encode(pem.encode()).decode(),
         "insecure-skip-tls-verify": True},
        {"tokenFile": "/var/run/token", "client-certificate-data": base64.b64encode(b"CERT").decode(),
         "client-key": "/abs/key"}), "/k")
    assert target.ca_data == pem and target.insecure
    assert (target.token, target.token_file) == (None, "/var/run/token")
    assert (target.client_cert_data, target.client_key) == (b"CERT", "/abs/key")


@pytest.mark.parametrize(("doc", "message"), [
    ("just text", "not a kubeconfig"),
    (kubeconfig({"server": "https://h"}, top={"current-context": None}), "no current-context"),
    (kubeconfig({"server": "https://h"}, top={"current-context": "nope"}), "no context named 'nope'"),
    (kubeconfig({"server": "https://h"}, top={"contexts": [{"name": "ctx", "context": {"cluster": "x"}}]}),
     "no cluster named 'x'"),
    (kubeconfig({"server": "h:6443"}), "is not an http"),
    (kubeconfig({"server": "https://h", "certificate-authority-data": "!!"}), "certificate-authority-data is not "
                                                                              "base64"),
])
def test_kubeconfig_errors(doc: Any, message: str) -> None:
    with pytest.raises(CniError, match=message) as info:
        api_target(doc, "/etc/cni/net.d/kubeconfig")
    assert info.value.code == config.ERR_KUBE
    assert "/etc/cni/net.d/kubeconfig" in info.value.msg
