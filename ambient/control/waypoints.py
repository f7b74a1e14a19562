"""The waypoint controller (PROTOCOLS.md §8, §9): what istiod's Gateway deployment controller does for
`gatewayClassName: istio-waypoint`.

For each waypoint Gateway it keeps a ServiceAccount, a Deployment and a Service named after the Gateway
(Istio's waypoint template, trimmed to what runs here), each with an ownerReference to the Gateway, and
writes the Gateway's status:

- `Accepted`: True when the Gateway has a listener on port 15008 with protocol `HBONE`; otherwise False
  (reason `ListenersNotValid`, with Istio's message) and nothing is deployed.
- `Programmed` and `status.addresses`: once the Service has a ClusterIP *and* a waypoint pod is Ready,
  `addresses` = `[{IPAddress: <ClusterIP>}, {Hostname: <gw>.<ns>.svc.cluster.local}]` (Istio reports
  both for this class, so consumers can pick) and `Programmed` True (reason `Programmed`). Before that,
  `Programmed` is False with Istio's reasons: `AddressNotUsable` while the Service is missing,
  `AddressNotAssigned` while no waypoint pod is Ready. istiod itself does not wait for a ready pod; we do
  (PROTOCOLS §8), because the data plane starts sending traffic to a waypoint as soon as its Gateway has
  an address. As in istiod, an address once reported is kept while the pod restarts, so traffic does not
  flip back to bypassing the waypoint's policy.

Deleting the Gateway deletes the three objects: explicitly here, and through the ownerReferences by a
cluster's garbage collector. A Gateway that stops being a valid waypoint loses them too.

The waypoint pod is what a real cluster runs (`WaypointTemplate`): our image, a projected ServiceAccount
token for the CA (`istio-token`, audience `istio-ca`) at /var/run/secrets/tokens, the mesh root from
ConfigMap `istio-ca-root-cert` (`rootcert.py` publishes it) at /var/run/secrets/istio, and `CA_ADDRESS` /
`XDS_ADDRESS` naming the control plane's Service: the names and paths of Istio's waypoint template, which
are also the waypoint's own defaults (waypoint/config.py). The local cluster replaces the command.

Waypoints read their L7 configuration from the API server themselves, so their ServiceAccounts need read
access: the controller keeps one ClusterRoleBinding (`--waypoint-cluster-role`, to the ClusterRole of that
name) whose subjects are exactly the ServiceAccounts of the accepted waypoint Gateways, rather than granting
it to every ServiceAccount in the cluster.

The object and status construction are pure functions (`waypoint_objects`, `gateway_status`,
`update_patch`); `WaypointController` is the asyncio shell that watches and writes. It must not decide
anything about traffic: which workloads use a waypoint is the translation's job (`translate/waypoints.py`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ambient.control.rootcert import CONFIGMAP_NAME as ROOT_CERT_CONFIGMAP
from ambient.control.workqueue import WorkQueue
from ambient.identity import istiod
from ambient.kube.client import KubeClient
from ambient.kube.errors import ApiError
from ambient.kube.events import now_rfc3339
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable, ResourceType

log = logging.getLogger("ambient.control.waypoints")
Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, Gateway name)

# -- names from Istio and the Gateway API (PROTOCOLS §8, §9) ---------------------------------------
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
WAYPOINT_CLASS = "istio-waypoint"
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
LABEL_GATEWAY_CLASS = "gateway.networking.k8s.io/gateway-class-name"
LABEL_MANAGED = "gateway.istio.io/managed"
MANAGED_BY_MESH_CONTROLLER = "istio.io-mesh-controller"  # istiod's value for waypoint objects
LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
GATEWAY_API_PREFIX = "gateway.networking.k8s.io/"  # infrastructure labels may not use it (Istio drops them)

HBONE_PORT = 15008
HBONE_PROTOCOL = "HBONE"
STATUS_PORT = 15021  # readiness, `GET /healthz/ready`
METRICS_PORT = 15020
CONTAINER_NAME = "istio-proxy"  # Istio's name; tools (`istioctl`, `kubectl logs -c`) look for it
DOMAIN_SUFFIX = "cluster.local"

# The waypoint reads its Gateway's name and namespace from flags; `$(VAR)` is expanded by the kubelet from
# the container's env, so a stand-in command (a test's HTTP server) can drop the flags and still work.
DEFAULT_COMMAND: tuple[str, ...] = ("waypoint", "--name", "$(GATEWAY_NAME)", "--namespace", "$(POD_NAMESPACE)")
DEFAULT_IMAGE = "ambient-py:0.1.0"  # what the Dockerfile at the repo root builds (one image, every entry point)
# Istio's waypoint pod: the CA token and the mesh root, by Istio's volume names and paths (the waypoint's
# defaults, waypoint/config.py).
TOKEN_VOLUME, TOKEN_DIR, TOKEN_FILE = "istio-token", "/var/run/secrets/tokens", "istio-token"
TOKEN_AUDIENCE = "istio-ca"  # what the CA's TokenReview asks for (ca_server.TOKEN_AUDIENCES)
TOKEN_SECONDS = 43200  # Istio's projected token lifetime; the kubelet refreshes it at 80%
ROOT_CERT_VOLUME, ROOT_CERT_DIR = "istiod-ca-cert", "/var/run/secrets/istio"
PROXY_UID = 1337  # Istio's proxy user; the image's USER too
# Readiness every 2 s: Istio probes every 15 s behind a 1 s startupProbe; the local kubelet has no startup
# probes, so readiness alone has to notice a waypoint that just started.
READINESS_PERIOD = 2
READINESS_FAILURES = 4  # Istio's failureThreshold

# Istio's strings, kept so that users grep for the same text.
LISTENER_MESSAGE = f'Expected a single listener on port {HBONE_PORT} with protocol "{HBONE_PROTOCOL}"'

RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
WAYPOINT_CLUSTER_ROLE = "ambient-waypoint"  # the ClusterRole our installer renders (what waypoints read)
MANAGED_BY = {"app.kubernetes.io/managed-by": "ambient-control"}

TYPES = ResourceTable()
GATEWAY = TYPES.for_manifest(GATEWAY_API_VERSION, "Gateway")
SERVICE_ACCOUNT, DEPLOYMENT, SERVICE, POD, CLUSTER_ROLE_BINDING = (
    TYPES.require(n) for n in ("serviceaccounts", "deployments.apps", "services", "pods",
                               "clusterrolebindings.rbac.authorization.k8s.io"))
OWNED_TYPES: tuple[ResourceType, ...] = (SERVICE_ACCOUNT, DEPLOYMENT, SERVICE)


@dataclass(frozen=True)
class WaypointTemplate:
    """What every waypoint pod gets from the control plane's configuration."""

    command: tuple[str, ...] = DEFAULT_COMMAND  # the container's whole argv
    image: str = DEFAULT_IMAGE
    control_address: str = istiod.address()  # CA_ADDRESS and XDS_ADDRESS: istiod.<system ns>.svc:15012
    cluster_id: str = "Kubernetes"  # the waypoint must present the control plane's cluster id ...
    trust_domain: str = "cluster.local"  # ... ask for identities in its trust domain ...
    root_namespace: str = istiod.SYSTEM_NAMESPACE  # ... and read mesh-wide policies where it does


# -- validation ------------------------------------------------------------------------------------
def is_waypoint(gateway: Obj) -> bool:
    return bool((gateway.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS)


def _listeners(gateway: Obj) -> list[Obj]:
    listeners = (gateway.get("spec") or {}).get("listeners") or []
    return [entry for entry in listeners if isinstance(entry, dict)] if isinstance(listeners, list) else []


def _is_hbone_listener(listener: Mapping[str, Any]) -> bool:
    return listener.get("port") == HBONE_PORT and listener.get("protocol") == HBONE_PROTOCOL


def mesh_listener(gateway: Obj) -> Obj | None:
    """The listener the waypoint serves: the first on 15008 with protocol HBONE (istioctl names it `mesh`)."""
    return next((entry for entry in _listeners(gateway) if _is_hbone_listener(entry)), None)


def listener_problem(gateway: Obj) -> str | None:
    """Why this waypoint Gateway cannot be accepted, or None. Like istiod, other listeners next to the HBONE
    one are marked unsupported in `status.listeners` but do not stop the waypoint."""
    if mesh_listener(gateway) is not None:
        return None
    found = ", ".join(f"{entry.get('name', '?')} (port {entry.get('port')}, protocol {entry.get('protocol')})"
                      for entry in _listeners(gateway)) or "none"
    return (f"{LISTENER_MESSAGE}; add `{{name: mesh, port: {HBONE_PORT}, protocol: {HBONE_PROTOCOL}}}` to "
            f"spec.listeners (listeners found: {found})")


# -- the objects -----------------------------------------------------------------------------------
def owner_reference(gateway: Obj) -> Obj:
    """Istio's form (no `controller`), so that a cluster's garbage collector deletes the objects with the
    Gateway while another controller may still own them."""
    meta = gateway["metadata"]
    return {"apiVersion": GATEWAY_API_VERSION, "kind": "Gateway", "name": meta["name"], "uid": meta["uid"]}


def infrastructure_labels(gateway: Obj) -> dict[str, str]:
    """Labels copied from the Gateway onto what it deploys (so `istio.io/waypoint-for` reaches the Service):
    `spec.infrastructure.labels` when set, else the Gateway's own labels, as Istio does."""
    infra = (gateway.get("spec") or {}).get("infrastructure") or {}
    if isinstance(infra.get("labels"), dict):
        return {str(k): str(v) for k, v in infra["labels"].items() if not str(k).startswith(GATEWAY_API_PREFIX)}
    return {str(k): str(v) for k, v in (gateway["metadata"].get("labels") or {}).items()}


def _port_name(listener_name: str, index: int) -> str:
    """A Service port name from a listener name, as Istio sanitises it (lower case, [a-z0-9-], ≤ 63)."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", listener_name.lower())).strip("-")[:63].rstrip("-")
    return name or f"hbone-{index}"


def accepted(gateway: Obj) -> bool:
    """A live waypoint Gateway with a valid HBONE listener: the ones that get a waypoint deployed."""
    return (is_waypoint(gateway) and listener_problem(gateway) is None
            and not gateway["metadata"].get("deletionTimestamp"))


def _pod_env(name: str, template: WaypointTemplate) -> list[Obj]:
    env: list[Obj] = [{"name": "GATEWAY_NAME", "value": name}]
    env += [{"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}} for var, path in (
        ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"), ("POD_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"), ("NODE_NAME", "spec.nodeName"))]
    env += [{"name": var, "value": value} for var, value in (
        ("CA_ADDRESS", template.control_address), ("XDS_ADDRESS", template.control_address),
        ("CLUSTER_ID", template.cluster_id), ("TRUST_DOMAIN", template.trust_domain),
        ("ROOT_NAMESPACE", template.root_namespace))]
    return env


def _pod_volumes() -> list[Obj]:
    return [
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": TOKEN_SECONDS, "path": TOKEN_FILE}}]}},
        {"name": ROOT_CERT_VOLUME, "configMap": {"name": ROOT_CERT_CONFIGMAP}},
    ]


def waypoint_objects(gateway: Obj, template: WaypointTemplate = WaypointTemplate()) -> list[Obj]:
    """The ServiceAccount, Deployment and Service a waypoint Gateway wants; [] when it is not a waypoint or
    not accepted."""
    if not is_waypoint(gateway) or listener_problem(gateway) is not None:
        return []
    meta = gateway["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    listener = mesh_listener(gateway) or {}
    infra = infrastructure_labels(gateway)
    fixed = {LABEL_GATEWAY_NAME: name, LABEL_GATEWAY_CLASS: WAYPOINT_CLASS}
    owned_meta = {"name": name, "namespace": namespace, "ownerReferences": [owner_reference(gateway)]}
    pod_labels = {
        "sidecar.istio.io/inject": "false",
        "service.istio.io/canonical-name": name,
        "service.istio.io/canonical-revision": "latest",
        **infra, **fixed, LABEL_MANAGED: MANAGED_BY_MESH_CONTROLLER,
        # Never captured by ztunnel: the waypoint speaks HBONE itself.
        LABEL_DATAPLANE_MODE: "none",
    }
    container = {
        "name": CONTAINER_NAME,
        "image": template.image,  # not run by the local cluster, which runs `command` on the host
        "imagePullPolicy": "IfNotPresent",
        "command": list(template.command),
        "env": _pod_env(name, template),
        "ports": [
            {"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT, "scheme": "HTTP"},
            "initialDelaySeconds": 0, "periodSeconds": READINESS_PERIOD, "timeoutSeconds": 1,
            "successThreshold": 1, "failureThreshold": READINESS_FAILURES,
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": ROOT_CERT_VOLUME, "mountPath": ROOT_CERT_DIR, "readOnly": True},
        ],
        # Istio's waypoint: every port is above 1024 and nothing is written, so no privilege at all.
        "securityContext": {"runAsNonRoot": True, "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID,
                            "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                            # Admitted where Pod Security "restricted" is enforced.
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    service_account = {"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {**copy.deepcopy(owned_meta), "labels": {**infra, **fixed}}}
    # No `replicas`: the API server's default is 1 and a user may scale the waypoint (Istio leaves it unset too).
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {**copy.deepcopy(owned_meta),
                     "labels": {**infra, **fixed, LABEL_MANAGED: MANAGED_BY_MESH_CONTROLLER}},
        "spec": {
            "selector": {"matchLabels": {LABEL_GATEWAY_NAME: name}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {
                    "prometheus.io/path": "/stats/prometheus", "prometheus.io/port": str(METRICS_PORT),
                    "prometheus.io/scrape": "true"}},
                "spec": {"serviceAccountName": name, "containers": [container], "volumes": _pod_volumes()},
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {**copy.deepcopy(owned_meta), "labels": {**infra, **fixed}},
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_GATEWAY_NAME: name},
            "ports": [
                {"name": "status-port", "port": STATUS_PORT, "protocol": "TCP", "appProtocol": "tcp"},
                {"name": _port_name(str(listener.get("name", "")), 1), "port": HBONE_PORT, "protocol": "TCP",
                 "appProtocol": "hbone"},
            ],
        },
    }
    return [service_account, deployment, service]


# -- status ----------------------------------------------------------------------------------------
def service_hostname(gateway: Obj, domain_suffix: str = DOMAIN_SUFFIX) -> str:
    meta = gateway["metadata"]
    return f"{meta['name']}.{meta['namespace']}.svc.{domain_suffix}"


def pod_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _condition(kind: str, ok: bool, reason: str, message: str, previous: Iterable[Obj], generation: int,
               now: str) -> Obj:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    # The transition time moves only when the status does, as in Kubernetes' meta.SetStatusCondition.
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or now, "observedGeneration": generation}


def gateway_status(gateway: Obj, service: Obj | None, pods: Iterable[Obj], *, now: str | None = None,
                   domain_suffix: str = DOMAIN_SUFFIX) -> Obj:
    """The Gateway's whole `status` given its Service (None when missing) and the pods carrying its
    `gateway-name` label. Deterministic for a fixed `now`; conditions keep their `lastTransitionTime` while
    their status holds, so an unchanged world yields an unchanged status (and no write)."""
    now = now or now_rfc3339()
    name = gateway["metadata"]["name"]
    generation = int(gateway["metadata"].get("generation") or 1)
    previous = gateway.get("status") or {}
    before = [c for c in previous.get("conditions") or [] if isinstance(c, dict)]
    host = service_hostname(gateway, domain_suffix)
    problem = listener_problem(gateway)
    addresses: list[Obj] = []
    if problem is not None:
        accepted = _condition("Accepted", False, "ListenersNotValid", problem, before, generation, now)
        programmed = _condition("Programmed", False, "Invalid",
                                "The Gateway is not accepted, so no waypoint is deployed for it", before,
                                generation, now)
    else:
        accepted = _condition("Accepted", True, "Accepted", "Resource accepted", before, generation, now)
        cluster_ip = ((service or {}).get("spec") or {}).get("clusterIP")
        if cluster_ip in (None, "", "None"):
            programmed = _condition("Programmed", False, "AddressNotUsable",
                                    f'Failed to assign to any requested addresses: hostname "{host}" not found',
                                    before, generation, now)
        elif not any(pod_ready(p) and (p["metadata"].get("labels") or {}).get(LABEL_GATEWAY_NAME) == name
                     for p in pods):
            programmed = _condition("Programmed", False, "AddressNotAssigned", (
                f"Assigned to service(s) {host}:{HBONE_PORT}, but failed to assign to all requested addresses: "
                f'address pending for hostname "{host}": no waypoint pod is ready yet'), before, generation, now)
        else:
            programmed = _condition("Programmed", True, "Programmed",
                                    f"Resource programmed, assigned to service(s) {host}:{HBONE_PORT}", before,
                                    generation, now)
            addresses = [{"type": "IPAddress", "value": cluster_ip}, {"type": "Hostname", "value": host}]
        if not addresses:
            # Never removed once reported (istiod does the same): a restarting waypoint pod must not
            # send traffic around the waypoint's policy.
            addresses = copy.deepcopy([a for a in previous.get("addresses") or [] if isinstance(a, dict)])
    listeners = [_listener_status(entry, _previous_listener(previous, entry.get("name")), generation, now)
                 for entry in _listeners(gateway)]
    status: Obj = {"conditions": [accepted, programmed], "listeners": listeners}
    if addresses:
        status = {"addresses": addresses, **status}
    return status


def _previous_listener(previous: Obj, name: Any) -> list[Obj]:
    for entry in previous.get("listeners") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return [c for c in entry.get("conditions") or [] if isinstance(c, dict)]
    return []


def _listener_status(listener: Obj, before: list[Obj], generation: int, now: str) -> Obj:
    if _is_hbone_listener(listener):
        accepted = _condition("Accepted", True, "Accepted", "No errors found", before, generation, now)
        programmed = _condition("Programmed", True, "Programmed", "No errors found", before, generation, now)
    else:
        accepted = _condition("Accepted", False, "UnsupportedProtocol", LISTENER_MESSAGE, before, generation, now)
        programmed = _condition("Programmed", False, "Invalid", "The listener is not accepted", before, generation,
                                now)
    return {"name": listener.get("name", ""), "supportedKinds": [], "attachedRoutes": 0,
            "conditions": [accepted, programmed]}


def status_patch(current: Obj, desired: Obj) -> Obj:
    """A merge patch taking `status` from `current` to `desired` (keys that went away are nulled)."""
    return {"status": {**{k: None for k in current if k not in desired}, **desired}}


# -- keeping objects in line with what is wanted ---------------------------------------------------
def _covers(have: Any, want: Any) -> bool:
    """`have` holds everything `want` says; fields the server or others added are fine."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(key in have and _covers(have[key], value) for key, value in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(_covers, have, want))
    return bool(have == want)


def _owner_refs(current: Obj, desired: Obj) -> list[Obj]:
    """Ours first, then whatever other owners the object has (a stale ref to a re-created Gateway goes)."""
    ours = desired["metadata"]["ownerReferences"]
    others = [r for r in current["metadata"].get("ownerReferences") or []
              if not (r.get("kind") == "Gateway" and str(r.get("apiVersion", "")).startswith(GATEWAY_API_PREFIX))]
    return [*copy.deepcopy(ours), *others]


def up_to_date(current: Obj, desired: Obj) -> bool:
    """Whether `current` needs no patch. Its labels must be exactly ours: a label we no longer want (a dropped
    `waypoint-for`) has to go, and the pod template's labels change only together with them."""
    body = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}
    meta = desired["metadata"]
    return (_covers(current, body)
            and (current["metadata"].get("labels") or {}) == meta.get("labels", {})
            and _owner_refs(current, desired) == (current["metadata"].get("ownerReferences") or []))


def _label_changes(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    return {**{k: None for k in current or {} if k not in desired}, **desired}


def update_patch(current: Obj, desired: Obj) -> Obj:
    """A merge patch that brings `current` to `desired`: spec fields replaced, labels made exactly ours,
    annotations and ownerReferences merged. The Service's ClusterIP is left to the server (immutable)."""
    patch: Obj = {k: copy.deepcopy(v) for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}
    patch["metadata"] = {
        "labels": _label_changes(current["metadata"].get("labels"), desired["metadata"].get("labels", {})),
        "ownerReferences": _owner_refs(current, desired),
    }
    template_labels = ((desired.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels")
    if template_labels is not None:
        current_template = ((current.get("spec") or {}).get("template") or {}).get("metadata") or {}
        patch["spec"]["template"]["metadata"]["labels"] = _label_changes(current_template.get("labels"),
                                                                         template_labels)
    return patch


def gateway_keys(obj: Obj) -> set[Key]:
    """The Gateways an owned object or waypoint pod belongs to: its label and its Gateway ownerReferences."""
    meta = obj["metadata"]
    namespace = meta.get("namespace", "")
    keys = {(namespace, str(r["name"])) for r in meta.get("ownerReferences") or []
            if r.get("kind") == "Gateway" and r.get("name")}
    label = (meta.get("labels") or {}).get(LABEL_GATEWAY_NAME)
    if label:
        keys.add((namespace, str(label)))
    return keys


def ours(obj: Obj, name: str) -> bool:
    """Made by a waypoint controller for the Gateway `name`: only those are deleted when it goes away."""
    if (obj["metadata"].get("labels") or {}).get(LABEL_GATEWAY_CLASS) != WAYPOINT_CLASS:
        return False
    return any(r.get("kind") == "Gateway" and r.get("name") == name and
               str(r.get("apiVersion", "")).startswith(GATEWAY_API_PREFIX)
               for r in obj["metadata"].get("ownerReferences") or [])


# -- RBAC for the waypoints' own reads ------------------------------------------------------------
def waypoint_subjects(gateways: Iterable[Obj]) -> list[Obj]:
    """The ServiceAccounts of the accepted waypoint Gateways (each runs as the account named after it),
    sorted by namespace and name, each once: the subjects of the waypoints' ClusterRoleBinding."""
    accounts = {(g["metadata"]["namespace"], g["metadata"]["name"]) for g in gateways if accepted(g)}
    return [{"kind": "ServiceAccount", "name": name, "namespace": namespace}
            for namespace, name in sorted(accounts)]


def cluster_role_binding(role: str, subjects: list[Obj]) -> Obj:
    """The binding of ClusterRole `role` (same name) to `subjects`."""
    return {"apiVersion": RBAC_API_VERSION, "kind": "ClusterRoleBinding",
            "metadata": {"name": role, "labels": dict(MANAGED_BY)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": copy.deepcopy(subjects)}


def _subject_keys(subjects: Any) -> list[tuple[str, str, str]]:
    return [(str(s.get("kind", "")), str(s.get("namespace", "")), str(s.get("name", "")))
            for s in subjects or [] if isinstance(s, dict)]


def binding_subjects_patch(current: Obj, desired: Obj) -> Obj | None:
    """A merge patch replacing the subjects (a list: replaced whole), or None when they already match."""
    if _subject_keys(current.get("subjects")) == _subject_keys(desired["subjects"]):
        return None
    return {"subjects": copy.deepcopy(desired["subjects"])}


def same_role(current: Obj, desired: Obj) -> bool:
    """`roleRef` is immutable: a binding pointing elsewhere has to be re-created, not patched."""
    have, want = current.get("roleRef") or {}, desired["roleRef"]
    return bool(have.get("kind") == want["kind"] and have.get("name") == want["name"])


# -- the controller --------------------------------------------------------------------------------
class WaypointController:
    """Watches Gateways and the objects they own; one reconcile per changed Gateway (debounced), retried
    with capped backoff when a write fails. With `cluster_role`, also keeps the ClusterRoleBinding of that
    name in line with the accepted Gateways (recomputed from all of them after any Gateway changes). Run it
    with `await controller.run()` (cancel to stop)."""

    def __init__(self, client: KubeClient, template: WaypointTemplate = WaypointTemplate(), *,
                 namespace: str | None = None, domain_suffix: str = DOMAIN_SUFFIX, cluster_role: str = "") -> None:
        self.client = client
        self.template = template
        self.domain_suffix = domain_suffix
        self.cluster_role = cluster_role
        self.gateways = Informer(client, GATEWAY, namespace=namespace, handler=self._gateway_changed)
        # Only objects that carry the gateway-name label: never a cluster's worth of pods.
        self.owned = {rt.plural: Informer(client, rt, namespace=namespace, label_selector=LABEL_GATEWAY_NAME,
                                          handler=self._owned_changed)
                      for rt in (*OWNED_TYPES, POD)}
        self.queue: WorkQueue[Key] = WorkQueue("waypoint", self._reconcile_key, log, describe="/".join)
        self.binding_queue: WorkQueue[str] = WorkQueue("waypoint ClusterRoleBinding", self.sync_binding, log)
        # Only our binding (the field selector also lets RBAC scope the watch to it by resourceNames).
        self.binding = Informer(client, CLUSTER_ROLE_BINDING, field_selector=f"metadata.name={cluster_role}",
                                handler=self._binding_changed) if cluster_role else None

    @property
    def informers(self) -> list[Informer]:
        return [self.gateways, *self.owned.values(), *([self.binding] if self.binding else [])]

    async def wait_synced(self) -> None:
        for informer in self.informers:
            await informer.synced.wait()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for informer in self.informers:
                tg.create_task(informer.run(), name=f"waypoints-informer-{informer.rt.plural}")
            tg.create_task(self._work(), name="waypoints-reconcile")

    # -- events → queue ----------------------------------------------------------------------------
    def _gateway_changed(self, event: str, gateway: Obj) -> None:
        self.queue.add((gateway["metadata"].get("namespace", ""), gateway["metadata"]["name"]))
        if self.cluster_role:
            self.binding_queue.add(self.cluster_role)

    def _owned_changed(self, event: str, obj: Obj) -> None:
        for key in gateway_keys(obj):
            self.queue.add(key)

    def _binding_changed(self, event: str, obj: Obj) -> None:
        self.binding_queue.add(self.cluster_role)

    async def _work(self) -> None:
        await self.wait_synced()
        # A first pass over everything, so objects whose Gateway went away while we were down are removed.
        for gateway in self.gateways.items():
            self._gateway_changed("SYNC", gateway)
        for informer in self.owned.values():
            for obj in informer.items():
                self._owned_changed("SYNC", obj)
        if self.cluster_role:
            self.binding_queue.add(self.cluster_role)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.queue.run(), name="waypoints-queue")
            tg.create_task(self.binding_queue.run(), name="waypoints-binding-queue")

    async def _reconcile_key(self, key: Key) -> None:
        await self.reconcile(*key)

    # -- the ClusterRoleBinding --------------------------------------------------------------------
    async def sync_binding(self, role: str) -> None:
        desired = cluster_role_binding(role, waypoint_subjects(self.gateways.items()))
        current = self.binding.get(role) if self.binding is not None else None
        if current is not None and not same_role(current, desired):
            log.warning("ClusterRoleBinding %s binds %s %s, not ClusterRole %s; re-creating it", role,
                        (current.get("roleRef") or {}).get("kind"), (current.get("roleRef") or {}).get("name"), role)
            try:
                await self.client.delete(CLUSTER_ROLE_BINDING, role)
            except ApiError as exc:
                if exc.code != 404:
                    raise
            current = None
        if current is None:
            try:
                await self.client.create(desired)
            except ApiError as exc:
                if exc.code != 409:  # our cache has not seen it yet; its watch event brings another pass
                    raise
                return
            log.info("ClusterRoleBinding %s: created for %d waypoint ServiceAccount(s)", role, len(desired["subjects"]))
            return
        patch = binding_subjects_patch(current, desired)
        if patch is not None:
            await self.client.patch(CLUSTER_ROLE_BINDING, role, patch)
            log.info("ClusterRoleBinding %s: now %d waypoint ServiceAccount(s)", role, len(desired["subjects"]))

    # -- one Gateway -------------------------------------------------------------------------------
    def _current(self, rt: ResourceType, namespace: str, name: str) -> Obj | None:
        return self.owned[rt.plural].get(name, namespace)

    async def reconcile(self, namespace: str, name: str) -> None:
        gateway = self.gateways.get(name, namespace)
        live = gateway if gateway and is_waypoint(gateway) and not gateway["metadata"].get("deletionTimestamp") \
            else None
        desired = {obj["kind"]: obj for obj in (waypoint_objects(live, self.template) if live else [])}
        for rt in OWNED_TYPES:
            current = self._current(rt, namespace, name)
            want = desired.get(rt.kind)
            if want is None:
                if current is not None and ours(current, name):
                    await self._delete(rt, namespace, name)
            elif current is None:
                await self._create(want)
            elif not up_to_date(current, want):
                log.info("waypoint %s/%s: updating %s", namespace, name, rt.kind)
                await self.client.patch(rt, name, update_patch(current, want), namespace)
        if live is not None:
            await self._write_status(live)

    async def _create(self, obj: Obj) -> None:
        meta = obj["metadata"]
        try:
            await self.client.create(obj)
            log.info("waypoint %s/%s: created %s", meta["namespace"], meta["name"], obj["kind"])
        except ApiError as exc:
            # Our cache has not seen our own earlier create yet; its watch event brings another pass.
            if exc.code != 409:
                raise

    async def _delete(self, rt: ResourceType, namespace: str, name: str) -> None:
        try:
            await self.client.delete(rt, name, namespace)
            log.info("waypoint %s/%s: deleted %s", namespace, name, rt.kind)
        except ApiError as exc:
            if exc.code != 404:
                raise

    async def _write_status(self, gateway: Obj) -> None:
        meta = gateway["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        pods = [p for p in self.owned[POD.plural].items() if p["metadata"].get("namespace") == namespace]
        current = gateway.get("status") or {}
        status = gateway_status(gateway, self._current(SERVICE, namespace, name), pods,
                                domain_suffix=self.domain_suffix)
        if status == current:
            return
        try:
            await self.client.patch(GATEWAY, name, status_patch(current, status), namespace, status=True)
        except ApiError as exc:
            if exc.code != 404:  # the Gateway went away meanwhile; its DELETED event cleans up
                raise
            return
        programmed = next(c for c in status["conditions"] if c["type"] == "Programmed")
        log.info("waypoint %s/%s: Programmed=%s (%s)", namespace, name, programmed["status"], programmed["reason"])
