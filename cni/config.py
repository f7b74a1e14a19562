"""The istio-cni plugin's inputs, parsed and checked (PROTOCOLS.md §3): the `CNI_*` environment, the
network configuration on stdin, the plugin's kubeconfig document, and the ambient selection rule.

Pure: no IO, no logging, no clock. Every problem a user or a runtime can cause becomes a `CniError` that
carries the CNI spec's error code, a message naming the key at fault and details saying what to fix.

This runs on every pod creation, so it stays lean: records are NamedTuples (`dataclasses` imports
`inspect`, ~7 ms per exec), and the label-selector library is imported only when custom
`enablement_selectors` are configured; the default rule is written out below.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from collections.abc import Mapping
from typing import Any, NamedTuple

Obj = dict[str, Any]

# Spec versions, oldest first (order matters: CHECK, GC and STATUS need a minimum version).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}  # when each verb entered the spec
# What libcni's skel requires per verb (CNI_NETNS is optional on DEL: the namespace may already be gone).
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
}

DEFAULT_AGENT_RUN_DIR = "/var/run/istio-cni"  # Istio's default; the node agent listens there
DEFAULT_LOG_LEVEL = "info"  # Istio's default plugin_log_level
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "none")

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Istio's node agent DaemonSet pods: their own ADD must not wait on the agent they are about to start.
AGENT_POD_PREFIX = "istio-cni-node-"

# CNI spec error codes (SPEC.md "Error"); 100 and up are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_KUBE = 100  # reading the pod or its namespace from the Kubernetes API failed
ERR_AGENT = 101  # the node agent could not be reached or did not enroll the pod
ERR_INTERNAL = 999  # a bug in the plugin; it still fails closed
REASONS = {
    ERR_INCOMPATIBLE_VERSION: "incompatible_version",
    ERR_INVALID_ENV: "invalid_env",
    ERR_DECODE: "decode",
    ERR_INVALID_CONFIG: "invalid_config",
    ERR_KUBE: "kube_api",
    ERR_AGENT: "agent",
    ERR_INTERNAL: "internal",
}


class CniError(Exception):
    """A failure reported to the runtime as a CNI error object; `reason` is a stable log/metric label."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code, self.msg, self.details = code, msg, details

    @property
    def reason(self) -> str:
        return REASONS.get(self.code, "unknown")

    def to_json(self, cni_version: str) -> Obj:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}


def check_command_version(command: str, version: str) -> None:
    """CHECK, GC and STATUS exist only from some spec version on (as libcni's skel enforces)."""
    minimum = MIN_VERSION.get(command)
    if minimum and SUPPORTED_VERSIONS.index(version) < SUPPORTED_VERSIONS.index(minimum):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {command}",
                       f"{command} needs cniVersion {minimum} or later")


# -- CNI_* environment ---------------------------------------------------------------------------------
class CniEnv(NamedTuple):
    command: str
    container_id: str
    netns: str
    ifname: str
    path: str
    args: dict[str, str]  # CNI_ARGS, e.g. K8S_POD_NAME, K8S_POD_NAMESPACE, K8S_POD_UID

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")


def parse_env(environ: Mapping[str, str]) -> CniEnv:
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command!r}" if command else "CNI_COMMAND is not set",
                       f"the container runtime sets it to one of {', '.join(COMMANDS)}")
    missing = [key for key in REQUIRED_ENV.get(command, ()) if not environ.get(key)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing",
                       f"the container runtime sets them for {command}; is the plugin being run by hand?")
    return CniEnv(command, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
                  environ.get("CNI_IFNAME", ""), environ.get("CNI_PATH", ""),
                  parse_cni_args(environ.get("CNI_ARGS", "")))


def parse_cni_args(text: str) -> dict[str, str]:
    """`K8S_POD_NAME=a;K8S_POD_NAMESPACE=b;IgnoreUnknown=1` → dict (unknown keys are kept, not refused)."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: invalid pair {pair!r}", "CNI_ARGS is KEY=VALUE;KEY=VALUE")
        args[key] = value
    return args


# -- network configuration (stdin) -------------------------------------------------------------------
class NetConf(NamedTuple):
    """What every verb checks: the JSON object, its spec version, name and type."""

    cni_version: str
    name: str
    type: str
    raw: Obj


def parse_netconf(stdin: bytes) -> NetConf:
    if not stdin.strip():
        raise CniError(ERR_DECODE, "no network configuration on stdin",
                       "the container runtime passes this plugin's entry of the CNI conflist on stdin")
    try:
        raw = json.loads(stdin)
    except (ValueError, RecursionError) as exc:
        raise CniError(ERR_DECODE, f"network configuration on stdin is not JSON: {exc}",
                       "check the istio-cni entry of the CNI conflist") from None
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, f"network configuration must be a JSON object, not {_kind(raw)}",
                       "check the istio-cni entry of the CNI conflist")
    version = raw.get("cniVersion")
    if not version:
        raise CniError(ERR_INVALID_CONFIG, "network configuration has no cniVersion",
                       f"set cniVersion to one of {', '.join(SUPPORTED_VERSIONS)} in the CNI conflist")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")
    name, ptype = raw.get("name"), raw.get("type")
    if not name or not isinstance(name, str):
        raise CniError(ERR_INVALID_CONFIG, "missing network name", "set `name` in the CNI conflist")
    if not ptype or not isinstance(ptype, str):
        raise CniError(ERR_INVALID_CONFIG, "missing plugin type", "the plugin's entry needs `type: istio-cni`")
    return NetConf(version, name, ptype, raw)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


# -- the plugin's own keys ---------------------------------------------------------------------------
class EnablementSelector(NamedTuple):
    """Istio's `enablement_selectors` entry: a pod is ambient when both label selectors match."""

    pod: tuple[Any, ...]  # ambient.kube.selectors.Requirement (not imported at start-up)
    namespace: tuple[Any, ...]


class PluginConf(NamedTuple):
    cni_version: str
    name: str
    prev_result: Obj | None
    log_level: str
    log_file: str | None  # ours: also append logs to this file (stderr always gets them)
    agent_run_dir: str
    ambient_enabled: bool
    enablement_selectors: tuple[EnablementSelector, ...] | None  # None: the PROTOCOLS §3 rule
    exclude_namespaces: frozenset[str]  # `exclude_namespaces` + `kubernetes.exclude_namespaces`
    pod_namespace: str  # where the node agent's own pods run
    kubeconfig: str | None  # `kubernetes.kubeconfig`


def parse_plugin_conf(net: NetConf, command: str) -> PluginConf:
    """The plugin's keys. ADD needs `prevResult` (the plugin is chained) and, with ambient on, a kubeconfig."""
    raw = net.raw
    kube = _typed(raw, "kubernetes", dict, {})
    prev_result = raw.get("prevResult")
    if prev_result is not None and not isinstance(prev_result, dict):
        raise CniError(ERR_INVALID_CONFIG, f"prevResult must be an object, not {_kind(prev_result)}",
                       "the container runtime builds prevResult from the previous plugin's output")
    if command == "ADD" and prev_result is None:
        raise CniError(ERR_INVALID_CONFIG, "istio-cni is a chained plugin and got no prevResult",
                       "put istio-cni last in the plugins list of a conflist, after the plugin that gives the "
                       "pod its interface and IP (e.g. bridge + host-local)")
    log_level = _typed(raw, "plugin_log_level", str, DEFAULT_LOG_LEVEL).lower() or DEFAULT_LOG_LEVEL
    if log_level not in LOG_LEVELS:
        raise CniError(ERR_INVALID_CONFIG, f"unknown plugin_log_level {log_level!r}",
                       f"use one of {', '.join(LOG_LEVELS)}")
    excluded = _string_list(raw, "exclude_namespaces") + _string_list(kube, "exclude_namespaces",
                                                                      "kubernetes.exclude_namespaces")
    ambient = _typed(raw, "ambient_enabled", bool, False)
    kubeconfig = _typed(kube, "kubeconfig", str, "", "kubernetes.kubeconfig") or None
    if command == "ADD" and ambient and not kubeconfig:
        raise CniError(ERR_INVALID_CONFIG, "ambient_enabled is true but kubernetes.kubeconfig is not set",
                       "the plugin reads pod and namespace labels with that kubeconfig; the node agent's "
                       "installer writes it")
    return PluginConf(
        cni_version=net.cni_version, name=net.name, prev_result=prev_result, log_level=log_level,
        log_file=_typed(raw, "plugin_log_file", str, "") or None,
        agent_run_dir=_typed(raw, "cni_agent_run_dir", str, "") or DEFAULT_AGENT_RUN_DIR,
        ambient_enabled=ambient, enablement_selectors=parse_enablement_selectors(raw.get("enablement_selectors")),
        exclude_namespaces=frozenset(excluded), pod_namespace=_typed(raw, "pod_namespace", str, ""),
        kubeconfig=kubeconfig)


def agent_socket(conf: PluginConf) -> str:
    from cni.cmdadd import SOCKET_NAME

    return posixpath.join(conf.agent_run_dir, SOCKET_NAME)


def _typed(source: Obj, key: str, kind: type, default: Any, label: str | None = None) -> Any:
    value = source.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CniError(ERR_INVALID_CONFIG, f"{label or key} must be {_kind(kind())}, not {_kind(value)}",
                       "check the istio-cni entry of the CNI conflist")
    return value


def _string_list(source: Obj, key: str, label: str | None = None) -> list[str]:
    value = _typed(source, key, list, [], label)
    if not all(isinstance(item, str) for item in value):
        raise CniError(ERR_INVALID_CONFIG, f"{label or key} must be a list of strings",
                       "check the istio-cni entry of the CNI conflist")
    return list(value)


def parse_enablement_selectors(value: Any) -> tuple[EnablementSelector, ...] | None:
    """`[{podSelector: LabelSelector, namespaceSelector: LabelSelector}, ...]`; absent or null → None.

    An empty LabelSelector matches everything (as in Istio); an empty list matches no pod.
    """
    if value is None:
        return None
    if not isinstance(value, list):
        raise CniError(ERR_INVALID_CONFIG, f"enablement_selectors must be a list, not {_kind(value)}",
                       "each entry is {podSelector: ..., namespaceSelector: ...}")
    from ambient.kube.selectors import SelectorError, selector_from_match_labels

    selectors = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise CniError(ERR_INVALID_CONFIG, f"enablement_selectors[{index}] must be an object",
                           "each entry is {podSelector: ..., namespaceSelector: ...}")
        parts = []
        for key in ("podSelector", "namespaceSelector"):
            selector = entry.get(key) or {}
            if not isinstance(selector, dict):
                raise CniError(ERR_INVALID_CONFIG, f"enablement_selectors[{index}].{key} must be a LabelSelector "
                               "object", "use matchLabels and/or matchExpressions")
            try:
                parts.append(selector_from_match_labels(
                    {"matchLabels": selector.get("matchLabels") or {},
                     "matchExpressions": selector.get("matchExpressions") or []}))
            except (SelectorError, AttributeError, TypeError) as exc:
                raise CniError(ERR_INVALID_CONFIG, f"enablement_selectors[{index}].{key}: {exc}",
                               "use matchLabels and/or matchExpressions") from None
        selectors.append(EnablementSelector(parts[0], parts[1]))
    return tuple(selectors)


# -- the ambient selection rule ----------------------------------------------------------------------
class Selection(NamedTuple):
    ambient: bool
    reason: str  # for the log line: why the pod is (not) captured


def select_ambient(pod: Obj, namespace: Obj, exclude_namespaces: frozenset[str] = frozenset(),
                   selectors: tuple[EnablementSelector, ...] | None = None) -> Selection:
    """PROTOCOLS §3: not hostNetwork, no sidecar, namespace not excluded, and the pod labelled
    `istio.io/dataplane-mode=ambient` or its namespace labelled so without the pod saying `none`.
    With custom `selectors`, the last condition is "some selector matches pod and namespace labels"."""
    meta = _mapping(pod.get("metadata"))
    ns_meta = _mapping(namespace.get("metadata"))
    ns_name = str(meta.get("namespace") or ns_meta.get("name") or "")
    labels, annotations = _mapping(meta.get("labels")), _mapping(meta.get("annotations"))
    ns_labels = _mapping(ns_meta.get("labels"))
    if _mapping(pod.get("spec")).get("hostNetwork"):
        return Selection(False, "hostNetwork pod: it shares the node's network namespace, which is never captured")
    if SIDECAR_STATUS_ANNOTATION in annotations:
        return Selection(False, f"sidecar pod ({SIDECAR_STATUS_ANNOTATION} annotation)")
    if ns_name in exclude_namespaces:
        return Selection(False, f"namespace {ns_name} is in exclude_namespaces")
    if selectors is not None:
        for index, selector in enumerate(selectors):
            if all(r.matches(labels) for r in selector.pod) and all(r.matches(ns_labels) for r in selector.namespace):
                return Selection(True, f"enablement_selectors[{index}] matches")
        return Selection(False, "no enablement_selectors entry matches the pod and its namespace")
    pod_mode, ns_mode = labels.get(DATAPLANE_MODE_LABEL), ns_labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == DATAPLANE_MODE_AMBIENT:
        return Selection(True, f"pod label {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}")
    if ns_mode == DATAPLANE_MODE_AMBIENT:
        if pod_mode == DATAPLANE_MODE_NONE:
            return Selection(False, f"pod opted out with {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_NONE}")
        return Selection(True, f"namespace {ns_name} label {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}")
    return Selection(False, f"neither the pod nor namespace {ns_name} has {DATAPLANE_MODE_LABEL}="
                            f"{DATAPLANE_MODE_AMBIENT}")


def is_agent_pod(conf: PluginConf, pod_name: str, pod_namespace: str) -> bool:
    return bool(conf.pod_namespace) and pod_namespace == conf.pod_namespace and pod_name.startswith(AGENT_POD_PREFIX)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# -- the plugin's kubeconfig -------------------------------------------------------------------------
class ApiTarget(NamedTuple):
    """Where and how to reach the API server, from the kubeconfig's current context."""

    server: str
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    client_cert: str | None = None
    client_key: str | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = None
    insecure: bool = False


def api_target(doc: Any, path: str) -> ApiTarget:
    """The current context's cluster and user from a parsed kubeconfig (`path` names it in errors and
    anchors relative file paths, as kubectl does)."""
    def fail(problem: str) -> CniError:
        return CniError(ERR_KUBE, f"plugin kubeconfig {path}: {problem}",
                        "the node agent's installer writes it; check kubernetes.kubeconfig in the CNI config")

    if not isinstance(doc, dict):
        raise fail("not a kubeconfig (expected a mapping)")

    def named(section: str, name: Any) -> Mapping[str, Any]:
        for entry in doc.get(section) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                return _mapping(entry.get(section[:-1]))
        raise fail(f"no {section[:-1]} named {name!r}")

    context_name = doc.get("current-context")
    if not context_name:
        raise fail("no current-context")
    context = named("contexts", context_name)
    cluster = named("clusters", context.get("cluster"))
    user = named("users", context["user"]) if context.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        raise fail(f"cluster server {server!r} is not an http(s) URL")
    base = posixpath.dirname(path)

    def file(source: Mapping[str, Any], key: str) -> str | None:
        value = source.get(key)
        return posixpath.join(base, value) if isinstance(value, str) and value else None

    def data(source: Mapping[str, Any], key: str) -> bytes | None:
        value = source.get(key)
        if not value:
            return None
        try:
            return base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise fail(f"{key} is not base64") from None

    ca_data = data(cluster, "certificate-authority-data")
    return ApiTarget(
        server=server.rstrip("/"), token=str(user["token"]) if user.get("token") else None,
        token_file=file(user, "tokenFile"), ca_file=file(cluster, "certificate-authority"),
        ca_data=ca_data.decode("ascii", "replace") if ca_data else None,
        client_cert=file(user, "client-certificate"), client_key=file(user, "client-key"),
        client_cert_data=data(user, "client-certificate-data"), client_key_data=data(user, "client-key-data"),
        insecure=cluster.get("insecure-skip-tls-verify") is True)
