"""`ambientctl install`: the Kubernetes manifests of every component, rendered for given values.

The objects are built here, once, from named values; `deploy/*.yaml` is this module's output for the
default values (`write_deploy_dir`, checked by a test), so the plain YAML a reviewer reads is exactly
what `ambientctl install --dry-run | kubectl apply -f -` applies.

What runs where (PROTOCOLS.md §1 ports, §8 waypoints, §9 labels):
- `ambient-control` Deployment behind the Service `istiod` (the name ztunnel and waypoints dial by
  default and the DNS SAN of the control plane's 15012 certificate), ports 15010/15012/15014;
- `ambient-cni-node` DaemonSet: installs the `istio-cni` plugin into the node's CNI config and runs the
  node agent (host network and PID namespace: it enters pod network namespaces found through /proc);
- `ztunnel` DaemonSet: in-pod mode, ZDS socket in /var/run/ztunnel, a projected token for the CA;
- the `istio-waypoint` GatewayClass (the controller deploys waypoints from `ambient/control/waypoints.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from ambient.cli.errors import CliError
from ambient.control import rootcert
from ambient.control.waypoints import CONTAINER_NAME, DEFAULT_IMAGE, WAYPOINT_CLASS, WAYPOINT_CLUSTER_ROLE
from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.local.admission import check_name
from cni.agent_config import PLUGIN_BUNDLE

Obj = dict[str, Any]

NAMESPACE = "istio-system"  # Istio's; ambient-control runs in it and trusts `<namespace>/ztunnel` as node proxy
IMAGE = DEFAULT_IMAGE  # what the Dockerfile at the repo root builds
TRUST_DOMAIN = "cluster.local"
CLUSTER_ID = "Kubernetes"  # istiod's default
CONTROLLER_NAME = "istio.io/mesh-controller"  # GatewayClass controllerName for istio-waypoint
CONTROL_SERVICE = "istiod"  # see the module docstring
XDS_PLAINTEXT_PORT, XDS_TLS_PORT, CONTROL_MONITORING_PORT = 15010, 15012, 15014
ZTUNNEL_READY_PORT, ZTUNNEL_METRICS_PORT = 15021, 15020
# ztunnel's pod grace period; it drains for this minus 5 s (ztunnel/config.py `drain_deadline`, as Istio's).
ZTUNNEL_GRACE_SECONDS = 30
CNI_HEALTH_PORT, CNI_METRICS_PORT = 8000, 15014
TOKEN_AUDIENCE = "istio-ca"  # what the CA's TokenReview asks for (ca_server.TOKEN_AUDIENCES)
TOKEN_SECONDS = 43200  # Istio's ztunnel chart
ROOT_CERT_CONFIGMAP = rootcert.CONFIGMAP_NAME  # Istio's name, key root-cert.pem; ambient-control publishes it
ZDS_DIR, CNI_RUN_DIR = "/var/run/ztunnel", "/var/run/istio-cni"
HOST_CNI_BIN, HOST_CNI_CONF = "/opt/cni/bin", "/etc/cni/net.d"
# deploy/ file → which objects it holds, in apply order (namespace first, class last).
FILES = ("namespace.yaml", "control.yaml", "cni-node.yaml", "ztunnel.yaml", "waypoint-rbac.yaml",
         "gatewayclass.yaml")


@dataclass(frozen=True)
class InstallValues:
    namespace: str = NAMESPACE
    image: str = IMAGE
    trust_domain: str = TRUST_DOMAIN
    cluster_id: str = CLUSTER_ID

    @property
    def control_address(self) -> str:
        return f"{CONTROL_SERVICE}.{self.namespace}.svc:{XDS_TLS_PORT}"

    def check(self) -> None:
        """Refuse values that would render manifests the API server or the kubelet rejects."""
        try:
            check_name("Namespace", self.namespace)
        except ApiError:
            raise CliError(f"--namespace {self.namespace!r} is not a valid namespace name (lowercase letters, "
                           "digits and '-', at most 63)") from None
        for flag, value in (("--image", self.image), ("--trust-domain", self.trust_domain),
                            ("--cluster-id", self.cluster_id)):
            if not value.strip() or value != value.strip():
                raise CliError(f"{flag} must be a non-empty value without surrounding blanks (got {value!r})")


# -- small builders --------------------------------------------------------------------------------
def _meta(name: str, namespace: str | None = None, **labels: str) -> Obj:
    meta: Obj = {"name": name, **({"namespace": namespace} if namespace else {})}
    meta["labels"] = {"app.kubernetes.io/part-of": "ambient-py", "app": name, **labels}
    return meta


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> Obj:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


READ = ["get", "list", "watch"]
WRITE = ["create", "update", "patch", "delete"]


def _cluster_rbac(name: str, namespace: str, rules: list[Obj]) -> list[Obj]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta(name), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": _meta(name),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]


def _role_binding(name: str, namespace: str) -> Obj:
    """Binds Role `name` to ServiceAccount `name`, both in `namespace`."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(name, namespace),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}


def _field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _host_path(name: str, path: str, kind: str = "Directory") -> Obj:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def _selector(name: str) -> Obj:
    return {"matchLabels": {"app": name}}


# -- the components --------------------------------------------------------------------------------
def namespace_objects(v: InstallValues) -> list[Obj]:
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(v.namespace)}]


def control_objects(v: InstallValues) -> list[Obj]:
    name, ns = "ambient-control", v.namespace
    rules = [
        _rule([""], ["pods", "services", "namespaces", "nodes", "endpoints"], READ),
        _rule(["discovery.k8s.io"], ["endpointslices"], READ),
        _rule(["security.istio.io"], ["authorizationpolicies", "peerauthentications", "requestauthentications"],
              READ),
        _rule(["security.istio.io"], ["authorizationpolicies/status"], ["update", "patch"]),
        _rule(["networking.istio.io"], ["virtualservices", "destinationrules", "serviceentries", "workloadentries"],
              READ),
        _rule(["gateway.networking.k8s.io"], ["gateways", "gatewayclasses", "httproutes", "grpcroutes"], READ),
        _rule(["gateway.networking.k8s.io"], ["gateways/status"], ["update", "patch"]),
        _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        # The waypoint controller: ServiceAccount, Deployment and Service per waypoint Gateway.
        _rule([""], ["serviceaccounts", "services"], READ + WRITE),
        _rule(["apps"], ["deployments"], READ + WRITE),
        _rule([""], ["events"], ["create", "patch"]),
        _rule(["events.k8s.io"], ["events"], ["create", "patch"]),
        # The mesh root in ConfigMap `istio-ca-root-cert` of every namespace (as istiod); `create` cannot be
        # limited by name, the rest is (the publisher watches with a metadata.name field selector).
        _rule([""], ["configmaps"], ["create"]),
        {**_rule([""], ["configmaps"], [*READ, "update", "patch"]), "resourceNames": [ROOT_CERT_CONFIGMAP]},
        # The ClusterRoleBinding that grants the waypoints' ServiceAccounts (and only those) ClusterRole
        # `ambient-waypoint`; `bind` lets it grant that one role without holding every permission in it.
        _rule(["rbac.authorization.k8s.io"], ["clusterrolebindings"], ["create"]),
        {**_rule(["rbac.authorization.k8s.io"], ["clusterrolebindings"], READ + WRITE),
         "resourceNames": [WAYPOINT_CLUSTER_ROLE]},
        {**_rule(["rbac.authorization.k8s.io"], ["clusterroles"], ["bind"]), "resourceNames": [WAYPOINT_CLUSTER_ROLE]},
    ]
    # The CA root lives in Secret `cacerts` (yours) or `istio-ca-secret` (created on first start) in its
    # namespace; only this namespace's secrets, never cluster-wide.
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(name, ns),
            "rules": [_rule([""], ["secrets"], ["get", "create"])]}
    container = {
        "name": "discovery", "image": v.image, "imagePullPolicy": "IfNotPresent",
        # Its namespace (POD_NAMESPACE) is the system namespace: CA Secret, trusted ztunnel, root namespace.
        "command": ["ambient-control"], "args": ["--serving-ip", "$(POD_IP)", "--waypoint-image", v.image],
        "env": [{"name": "CLUSTER_ID", "value": v.cluster_id}, {"name": "TRUST_DOMAIN", "value": v.trust_domain},
                _field_env("POD_IP", "status.podIP"), _field_env("POD_NAMESPACE", "metadata.namespace")],
        "ports": [{"name": "grpc-xds", "containerPort": XDS_PLAINTEXT_PORT, "protocol": "TCP"},
                  {"name": "https-dds", "containerPort": XDS_TLS_PORT, "protocol": "TCP"},
                  {"name": "http-monitoring", "containerPort": CONTROL_MONITORING_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": CONTROL_MONITORING_PORT},
                           "periodSeconds": 3, "timeoutSeconds": 1},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, ns),
        "spec": {"replicas": 1, "selector": _selector(name), "template": {
            # No scrape annotations: 15014 serves /ready and /debug, not metrics.
            "metadata": {"labels": {"app": name, "istio.io/dataplane-mode": "none"}},
            "spec": {"serviceAccountName": name, "containers": [container]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(CONTROL_SERVICE, ns),
        "spec": {"selector": {"app": name}, "ports": [
            {"name": "grpc-xds", "port": XDS_PLAINTEXT_PORT, "protocol": "TCP"},
            {"name": "https-dds", "port": XDS_TLS_PORT, "protocol": "TCP"},
            {"name": "http-monitoring", "port": CONTROL_MONITORING_PORT, "protocol": "TCP"}]},
    }
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, ns)},
            *_cluster_rbac(name, ns, rules), role, _role_binding(name, ns), deployment, service]


def cni_node_objects(v: InstallValues) -> list[Obj]:
    name, ns = "ambient-cni-node", v.namespace
    # Kubernetes RBAC cannot scope to a node; the agent lists with `spec.nodeName=<its node>`.
    rules = [
        _rule([""], ["pods"], [*READ, "patch"]),  # the `ambient.istio.io/redirection` annotation
        _rule([""], ["pods/status"], ["patch", "update"]),
        _rule([""], ["namespaces", "nodes"], READ),
        _rule([""], ["events"], ["create", "patch"]),
    ]
    container = {
        "name": "install-cni", "image": v.image, "imagePullPolicy": "IfNotPresent",
        "command": ["ambient-cni-agent"],
        # The plugin the agent installs on the host is the image's self-contained bundle (cni/plugin_bundle.py).
        "args": ["run", "--cni-conf-dir", "/host/etc/cni/net.d", "--cni-bin-dir", "/host/opt/cni/bin",
                 "--plugin-source", PLUGIN_BUNDLE],
        "env": [_field_env("NODE_NAME", "spec.nodeName"), _field_env("POD_NAME", "metadata.name"),
                _field_env("POD_NAMESPACE", "metadata.namespace")],
        "ports": [{"name": "health", "containerPort": CNI_HEALTH_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": CNI_METRICS_PORT, "protocol": "TCP"}],
        # Start-up (informer sync, finding enrolled pods in /proc) may take a while on a busy node: liveness only
        # counts once /healthz first answered, within 2 minutes.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": CNI_HEALTH_PORT}, "periodSeconds": 2,
                         "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": CNI_HEALTH_PORT}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": CNI_HEALTH_PORT}, "periodSeconds": 3},
        # Root, not privileged: it enters pod netns (setns: SYS_ADMIN) to install rules (NET_ADMIN), opens
        # other users' /proc/<pid>/ns/net (SYS_PTRACE) and writes root-owned host CNI dirs (DAC_OVERRIDE).
        "securityContext": {"runAsUser": 0, "runAsGroup": 0, "privileged": False,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "DAC_OVERRIDE",
                                                                    "SYS_PTRACE"]}},
        "volumeMounts": [
            {"name": "cni-bin-dir", "mountPath": "/host/opt/cni/bin"},
            {"name": "cni-net-dir", "mountPath": "/host/etc/cni/net.d"},
            {"name": "cni-socket-dir", "mountPath": CNI_RUN_DIR},
            {"name": "cni-ztunnel-sock-dir", "mountPath": ZDS_DIR},
            {"name": "cni-netns-dir", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"},
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}},
    }
    daemonset = {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(name, ns),
        "spec": {"selector": _selector(name), "updateStrategy": {"type": "RollingUpdate",
                                                                 "rollingUpdate": {"maxUnavailable": 1}},
                 "template": {
                     "metadata": {"labels": {"app": name, "istio.io/dataplane-mode": "none"},
                                  "annotations": {"prometheus.io/scrape": "true",
                                                  "prometheus.io/port": str(CNI_METRICS_PORT)}},
                     "spec": {
                         "serviceAccountName": name,
                         # The runtime does not call CNI for host-network pods, so the agent never captures itself;
                         # host PID: pod network namespaces are found through /proc/<pid>/ns/net.
                         "hostNetwork": True, "hostPID": True, "dnsPolicy": "ClusterFirstWithHostNet",
                         "priorityClassName": "system-node-critical",
                         "tolerations": [{"operator": "Exists", "effect": "NoSchedule"},
                                         {"operator": "Exists", "effect": "NoExecute"}],
                         "terminationGracePeriodSeconds": 5,
                         "containers": [container],
                         "volumes": [
                             _host_path("cni-bin-dir", HOST_CNI_BIN, "DirectoryOrCreate"),
                             _host_path("cni-net-dir", HOST_CNI_CONF, "DirectoryOrCreate"),
                             _host_path("cni-socket-dir", CNI_RUN_DIR, "DirectoryOrCreate"),
                             _host_path("cni-ztunnel-sock-dir", ZDS_DIR, "DirectoryOrCreate"),
                             _host_path("cni-netns-dir", "/var/run/netns", "DirectoryOrCreate"),
                         ]}}},
    }
    # On SIGTERM the agent reads its DaemonSet: gone or being deleted → it takes the plugin out of the node's
    # CNI config (uninstall); present → it leaves it (upgrade). Only that one object.
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(name, ns),
            "rules": [{**_rule(["apps"], ["daemonsets"], ["get"]), "resourceNames": [name]}]}
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, ns)},
            *_cluster_rbac(name, ns, rules), role, _role_binding(name, ns), daemonset]


def ztunnel_objects(v: InstallValues) -> list[Obj]:
    name, ns = "ztunnel", v.namespace
    env = [  # the names Istio's ztunnel chart sets (ztunnel/config.py reads them)
        {"name": "CA_ADDRESS", "value": v.control_address},
        {"name": "XDS_ADDRESS", "value": v.control_address},
        {"name": "XDS_ROOT_CA", "value": "/var/run/secrets/istio/root-cert.pem"},
        {"name": "CA_ROOT_CA", "value": "/var/run/secrets/istio/root-cert.pem"},
        {"name": "CLUSTER_ID", "value": v.cluster_id},
        {"name": "TRUST_DOMAIN", "value": v.trust_domain},
        {"name": "INPOD_UDS", "value": f"{ZDS_DIR}/ztunnel.sock"},
        {"name": "RUST_LOG", "value": "info"},
        {"name": "TERMINATION_GRACE_PERIOD_SECONDS", "value": str(ZTUNNEL_GRACE_SECONDS)},
        _field_env("POD_NAME", "metadata.name"), _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("NODE_NAME", "spec.nodeName"), _field_env("INSTANCE_IP", "status.podIP"),
        _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ]
    container = {
        "name": CONTAINER_NAME, "image": v.image, "imagePullPolicy": "IfNotPresent",
        "command": ["ztunnel"], "args": [], "env": env,
        "ports": [{"name": "ztunnel-stats", "containerPort": ZTUNNEL_METRICS_PORT, "protocol": "TCP"},
                  {"name": "status-port", "containerPort": ZTUNNEL_READY_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": ZTUNNEL_READY_PORT},
                           "periodSeconds": 2, "failureThreshold": 3},
        # Enters pod netns (SYS_ADMIN), sets socket marks and transparent sockets (NET_ADMIN, NET_RAW).
        "securityContext": {"runAsUser": 0, "runAsGroup": 1337, "privileged": False,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}},
        "volumeMounts": [
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": True},
            {"name": "cni-ztunnel-sock-dir", "mountPath": ZDS_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}},
    }
    daemonset = {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(name, ns),
        "spec": {"selector": _selector(name), "updateStrategy": {"type": "RollingUpdate",
                                                                 "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                 "template": {
                     "metadata": {"labels": {"app": name, "istio.io/dataplane-mode": "none",
                                             "sidecar.istio.io/inject": "false"},
                                  "annotations": {"prometheus.io/scrape": "true",
                                                  "prometheus.io/port": str(ZTUNNEL_METRICS_PORT),
                                                  "prometheus.io/path": "/stats/prometheus"}},
                     "spec": {
                         "serviceAccountName": name,
                         "priorityClassName": "system-node-critical",
                         "tolerations": [{"operator": "Exists", "effect": "NoSchedule"},
                                         {"operator": "Exists", "effect": "NoExecute"}],
                         # SIGTERM → open connections get 25 s while the next ztunnel takes over via SO_REUSEPORT.
                         "terminationGracePeriodSeconds": ZTUNNEL_GRACE_SECONDS,
                         "containers": [container],
                         "volumes": [
                             {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                                 "path": "istio-token", "audience": TOKEN_AUDIENCE,
                                 "expirationSeconds": TOKEN_SECONDS}}]}},
                             {"name": "istiod-ca-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}},
                             _host_path("cni-ztunnel-sock-dir", ZDS_DIR, "DirectoryOrCreate"),
                             {"name": "tmp", "emptyDir": {}},
                         ]}}},
    }
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, ns)}, daemonset]


def waypoint_rbac_objects(v: InstallValues) -> list[Obj]:
    """Our waypoint reads its L7 config (VirtualService, DestinationRule, HTTPRoute, AuthorizationPolicy,
    RequestAuthentication, Gateway) and pod labels (DestinationRule subsets) from the API with its own
    ServiceAccount, which the controller creates per Gateway. The controller also keeps ClusterRoleBinding
    `ambient-waypoint` naming exactly those ServiceAccounts (ambient/control/waypoints.py), so only the
    ClusterRole is installed here: a rendered binding would fight the controller's."""
    rules = [
        _rule(["networking.istio.io"], ["virtualservices", "destinationrules"], READ),
        _rule(["security.istio.io"], ["authorizationpolicies", "requestauthentications"], READ),
        _rule(["gateway.networking.k8s.io"], ["httproutes", "gateways"], READ),
        _rule([""], ["pods"], READ),
        _rule([""], ["events"], ["create", "patch"]),
    ]
    return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": _meta(WAYPOINT_CLUSTER_ROLE), "rules": rules}]


def gatewayclass_objects(v: InstallValues) -> list[Obj]:
    return [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
             "metadata": _meta(WAYPOINT_CLASS),
             "spec": {"controllerName": CONTROLLER_NAME,
                      "description": "The default Istio waypoint GatewayClass (ambient-py)"}}]


BUILDERS: dict[str, Callable[[InstallValues], list[Obj]]] = dict(zip(FILES, (
    namespace_objects, control_objects, cni_node_objects, ztunnel_objects, waypoint_rbac_objects,
    gatewayclass_objects), strict=True))


def render(values: InstallValues = InstallValues()) -> list[Obj]:
    """Every object, in apply order."""
    return [obj for build in BUILDERS.values() for obj in build(values)]


class _PlainDumper(yaml.SafeDumper):
    """Writes a list shared by several rules out each time instead of as a YAML anchor and alias
    (`&id001` / `*id001`), which reviewers and some tools read badly."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(objs: list[Obj]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False) for o in objs)


HEADER = "# Generated by `ambientctl install --write-deploy-dir deploy` (ambient/cli/install.py); do not edit.\n"


def deploy_files(values: InstallValues = InstallValues()) -> dict[str, str]:
    """deploy/ file name → its YAML (the default values)."""
    files = {name: HEADER + dump(build(values)) for name, build in BUILDERS.items()}
    files["kustomization.yaml"] = HEADER + yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(FILES)},
        sort_keys=False)
    return files


def write_deploy_dir(path: Path, values: InstallValues = InstallValues()) -> list[Path]:
    written = []
    for name, text in deploy_files(values).items():
        (path / name).write_text(text)
        written.append(path / name)
    return written


# -- applying --------------------------------------------------------------------------------------
async def apply_objects(client: KubeClient, objs: list[Obj], echo: Callable[[str], None]) -> None:
    """Create each object or merge-patch it to the rendered form (the install is idempotent)."""
    for obj in objs:
        meta = obj["metadata"]
        try:
            rt = await client.resource(obj["apiVersion"], obj["kind"])
        except ApiError as exc:
            raise CliError(
                f"{obj['kind']} ({obj['apiVersion']}) is not served by this cluster ({exc.message}); install the "
                "Gateway API and Istio CRDs first (see deploy/README.md)") from None
        label = f"{obj['kind'].lower()}/{meta['name']}"
        try:
            await client.get(rt, meta["name"], meta.get("namespace"))
        except ApiError as exc:
            if exc.code != 404:
                raise
            await client.create(json.loads(json.dumps(obj)))
            echo(f"{label} created")
            continue
        await client.patch(rt, meta["name"], obj, meta.get("namespace"))
        echo(f"{label} configured")


def waypoint_binding() -> Obj:
    """The ClusterRoleBinding ambient-control keeps for waypoint ServiceAccounts: not rendered (it would fight the
    controller), but part of the install, so `uninstall` removes it."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": WAYPOINT_CLUSTER_ROLE}}


async def delete_objects(client: KubeClient, objs: list[Obj], echo: Callable[[str], None]) -> None:
    """Delete each object (in reverse apply order) that exists; the Namespace is kept, with the mesh CA's
    Secret in it, so that a reinstall keeps the same root and every workload certificate stays valid. The
    DaemonSets go before their ServiceAccounts and RBAC: each node agent then finds its DaemonSet gone and
    takes the CNI plugin out of its node's CNI config."""
    for obj in [*reversed(objs), waypoint_binding()]:
        meta = obj["metadata"]
        label = f"{obj['kind'].lower()}/{meta['name']}"
        if obj["kind"] == "Namespace":
            echo(f"{label} kept (it holds the mesh CA's Secret): `ambientctl delete namespace {meta['name']}` "
                 "removes it")
            continue
        try:
            rt = await client.resource(obj["apiVersion"], obj["kind"])
            await client.delete(rt, meta["name"], meta.get("namespace"))
        except ApiError as exc:
            if exc.code != 404:
                raise
            continue
        echo(f"{label} deleted")


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--dry-run", is_flag=True,
                  help="print the manifests (for `| kubectl apply -f -`) instead of applying them")
    @click.option("-n", "--namespace", default=NAMESPACE, show_default=True, help="namespace of the components")
    @click.option("--image", default=IMAGE, show_default=True, help="image built from the Dockerfile")
    @click.option("--trust-domain", default=TRUST_DOMAIN, show_default=True)
    @click.option("--cluster-id", default=CLUSTER_ID, show_default=True)
    @click.option("--write-deploy-dir", "deploy_dir", type=click.Path(file_okay=False, path_type=Path), hidden=True,
                  help="regenerate deploy/ from the default values")
    @click.pass_context
    def install(ctx: click.Context, dry_run: bool, namespace: str, image: str, trust_domain: str, cluster_id: str,
                deploy_dir: Path | None) -> None:
        """Install ambient-py on the current Kubernetes cluster (CRDs must be installed first)."""
        if deploy_dir is not None:
            for path in write_deploy_dir(deploy_dir):
                click.echo(f"wrote {path}")
            return
        values = InstallValues(namespace=namespace, image=image, trust_domain=trust_domain, cluster_id=cluster_id)
        values.check()
        objs = render(values)
        if dry_run:
            click.echo(dump(objs), nl=False)
            return
        ctx.obj.run(lambda client: apply_objects(client, objs, click.echo))

    @cli.command()
    @click.option("-n", "--namespace", default=NAMESPACE, show_default=True, help="namespace of the components")
    @click.pass_context
    def uninstall(ctx: click.Context, namespace: str) -> None:
        """Remove what `install` created (the namespace and its CA Secret stay). The node agent takes the
        CNI plugin out of each node's CNI config when its DaemonSet is deleted."""
        values = InstallValues(namespace=namespace)
        values.check()
        ctx.obj.run(lambda client: delete_objects(client, render(values), click.echo))

