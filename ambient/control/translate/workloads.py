"""Pods → `istio.workload.Workload` (PROTOCOLS.md §5.1), as istiod's `podWorkloadBuilder`; and the
endpoints of selector-less Services that are not pods, as its `endpointSlicesBuilder`.

Choices where istiod has several behaviours across versions:
- Terminal pods (Succeeded/Failed) and pods without a parsable IP produce no workload. A pod being
  deleted is kept but UNHEALTHY (istiod ≥ 1.22), so ztunnel stops picking it while connections drain.
- `workload_type` comes from the controlling owner (DEPLOYMENT/JOB/CRONJOB, else POD), the way istiod
  did before it pinned every pod to POD.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ambient.proto import workload_pb2

from .model import (
    ANN_REDIRECTION,
    LABEL_SERVICE_NAME,
    LABEL_TUNNEL,
    REDIRECTION_ENABLED,
    ClusterState,
    Key,
    Obj,
    annotations_of,
    as_list,
    ip_bytes,
    labels,
    mapping,
    meta,
    port_number,
    selects,
    service_hostname,
    spec,
    status,
)
from .peerauthn import PeerAuthentications
from .services import ServiceInfo
from .waypoints import WORKLOAD_TRAFFIC, WaypointBinder

# Istio's heuristic for a Job created by a CronJob: `<cronjob>-<8 to 10 digit schedule time>`.
_CRONJOB_JOB = re.compile(r"^(.+)-\d{8,10}$")
_TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class SelectorPolicy:
    """A WORKLOAD_SELECTOR AuthorizationPolicy, for matching against workload labels."""

    namespace: str
    resource_name: str
    match_labels: Mapping[str, str]


def canonical_service(pod_labels: Mapping[str, str], workload_name: str) -> tuple[str, str]:
    """Istio's CanonicalService: the name and revision telemetry and baggage use."""
    name = (pod_labels.get("service.istio.io/canonical-name") or pod_labels.get("app.kubernetes.io/name")
            or pod_labels.get("app") or workload_name)
    revision = (pod_labels.get("service.istio.io/canonical-revision") or pod_labels.get("app.kubernetes.io/version")
                or pod_labels.get("version") or "latest")
    return str(name), str(revision)


def workload_name_and_type(pod: Obj) -> tuple[str, workload_pb2.WorkloadType]:
    """From the controlling owner, as Istio's GetDeployMetaFromPod: a ReplicaSet named
    `<deployment>-<pod-template-hash>` is its Deployment; a Job named like a CronJob's is that CronJob."""
    pod_name = str(meta(pod).get("name", ""))
    owners = [o for o in as_list(meta(pod).get("ownerReferences")) if isinstance(o, Mapping) and o.get("controller")]
    if not owners:
        return pod_name, workload_pb2.POD
    kind, name = str(owners[0].get("kind", "")), str(owners[0].get("name", ""))
    template_hash = labels(pod).get("pod-template-hash")
    if kind == "ReplicaSet" and template_hash and name.endswith(f"-{template_hash}"):
        return name.removesuffix(f"-{template_hash}"), workload_pb2.DEPLOYMENT
    if kind == "Job":
        if m := _CRONJOB_JOB.match(name):
            return m.group(1), workload_pb2.CRONJOB
        return name, workload_pb2.JOB
    return pod_name, workload_pb2.POD


def _pod_ips(pod: Obj) -> list[bytes] | None:
    texts = [entry.get("ip") for entry in as_list(status(pod).get("podIPs")) if isinstance(entry, Mapping)]
    if not texts and status(pod).get("podIP"):
        texts = [status(pod)["podIP"]]
    raw = [ip_bytes(t) for t in texts]
    if not raw or any(r is None for r in raw):
        return None  # anyone can write garbage into status; istiod skips such a pod too
    return [r for r in raw if r is not None]


def _ready(pod: Obj) -> bool:
    return any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
               for c in as_list(status(pod).get("conditions")))


def _named_container_port(pod: Obj, name: str) -> int | None:
    for container in as_list(spec(pod).get("containers")):
        for port in as_list(container.get("ports") if isinstance(container, Mapping) else None):
            if (isinstance(port, Mapping) and port.get("name") == name
                    and str(port.get("protocol") or "TCP") == "TCP"
                    and (number := port_number(port.get("containerPort"))) is not None):
                return number
    return None


def service_ports(pod: Obj, info: ServiceInfo) -> workload_pb2.PortList:
    """The Service's ports with target ports as this pod numbers them; a named target port the pod
    does not declare leaves that port out, as istiod does."""
    result = workload_pb2.PortList()
    for port in info.service.ports:
        target = port.target_port
        if (target_name := info.target_port_names.get(port.service_port)) is not None:
            resolved = _named_container_port(pod, target_name)
            if resolved is None:
                continue
            target = resolved
        result.ports.append(workload_pb2.Port(service_port=port.service_port, target_port=target))
    return result


class WorkloadBuilder:
    def __init__(self, state: ClusterState, services: Mapping[Key, ServiceInfo], binder: WaypointBinder,
                 selector_policies: Iterable[SelectorPolicy], peer_authn: PeerAuthentications, *,
                 cluster_id: str, trust_domain: str, root_namespace: str, domain_suffix: str) -> None:
        self._cluster_id = cluster_id
        self._trust_domain = trust_domain
        self._root = root_namespace
        self._binder = binder
        self._peer_authn = peer_authn
        self._services_by_namespace: dict[str, list[ServiceInfo]] = {}
        for key in sorted(services):
            self._services_by_namespace.setdefault(key[0], []).append(services[key])
        self._policies_by_namespace: dict[str, list[SelectorPolicy]] = {}
        for policy in selector_policies:
            self._policies_by_namespace.setdefault(policy.namespace, []).append(policy)
        self._slices = list(_service_slices(state, services, domain_suffix))
        self._slice_services = self._selectorless_members()

    def _selectorless_members(self) -> dict[Key, list[ServiceInfo]]:
        """Pods that selector-less Services reach through hand-written EndpointSlices (targetRef kind Pod)."""
        members: dict[Key, list[ServiceInfo]] = {}
        for key, endpoint_slice, info in self._slices:
            if info.selector:
                continue  # the selector already finds them (and the controller wrote the slice from it)
            for endpoint in as_list(endpoint_slice.get("endpoints")):
                ref = endpoint.get("targetRef") if isinstance(endpoint, Mapping) else None
                if isinstance(ref, Mapping) and ref.get("kind") == "Pod":
                    pod_key = (str(ref.get("namespace") or key[0]), str(ref.get("name", "")))
                    if info not in members.setdefault(pod_key, []):
                        members[pod_key].append(info)
        return members

    def pod_workload(self, key: Key, pod: Obj) -> workload_pb2.Workload | None:
        if status(pod).get("phase") in _TERMINAL_PHASES:
            return None
        addresses = _pod_ips(pod)
        if addresses is None:
            return None
        namespace, name = key
        pod_labels = labels(pod)
        body = spec(pod)
        workload = workload_pb2.Workload(
            uid=f"{self._cluster_id}//Pod/{namespace}/{name}",
            name=name, namespace=namespace, addresses=addresses, network="",
            trust_domain=self._trust_domain,
            service_account=str(body.get("serviceAccountName") or body.get("serviceAccount") or "default"),
            node=str(body.get("nodeName") or ""),
            cluster_id=self._cluster_id,
            status=workload_pb2.HEALTHY if _ready(pod) and not meta(pod).get("deletionTimestamp")
            else workload_pb2.UNHEALTHY,
            authorization_policies=self._policies_for(namespace, pod_labels),
        )
        workload_name, workload_type = workload_name_and_type(pod)
        workload.workload_name = workload_name
        workload.workload_type = workload_type
        workload.canonical_name, workload.canonical_revision = canonical_service(pod_labels, workload_name)
        if body.get("hostNetwork") is True:
            workload.network_mode = workload_pb2.HOST_NETWORK
        if annotations_of(pod).get(ANN_REDIRECTION) == REDIRECTION_ENABLED:
            workload.tunnel_protocol = workload_pb2.HBONE
        if pod_labels.get(LABEL_TUNNEL) == "http":  # a proxy that terminates HBONE itself (a sidecar)
            workload.tunnel_protocol = workload_pb2.HBONE
            workload.native_tunnel = True
        for info in self._services_for(key, pod_labels):
            workload.services[info.resource_name].CopyFrom(service_ports(pod, info))
        waypoint = self._binder.for_object(pod, WORKLOAD_TRAFFIC)
        if waypoint is not None:
            workload.waypoint.CopyFrom(waypoint.address)
        return workload

    def _services_for(self, key: Key, pod_labels: Mapping[str, str]) -> list[ServiceInfo]:
        selected = [info for info in self._services_by_namespace.get(key[0], [])
                    if info.selector and selects(info.selector, pod_labels)]
        return selected + [info for info in self._slice_services.get(key, []) if info not in selected]

    def _policies_for(self, namespace: str, workload_labels: Mapping[str, str]) -> list[str]:
        """Selector policies of the workload's namespace and the root namespace that select it (sorted),
        then the PeerAuthentication-derived ones."""
        candidates = self._policies_by_namespace.get(namespace, [])
        if namespace != self._root:
            candidates = candidates + self._policies_by_namespace.get(self._root, [])
        names = sorted(p.resource_name for p in candidates if selects(p.match_labels, workload_labels))
        return names + self._peer_authn.keys_for(namespace, workload_labels)

    def endpoint_workloads(self) -> dict[str, workload_pb2.Workload]:
        """Endpoints of a Service's EndpointSlices that are not pods (a VM, the API server): bare
        workloads ztunnel can send to, with no identity, like istiod's endpointSlicesBuilder."""
        result: dict[str, workload_pb2.Workload] = {}
        for (namespace, slice_name), endpoint_slice, info in self._slices:
            port_list = _slice_ports(endpoint_slice, info)
            for endpoint in as_list(endpoint_slice.get("endpoints")):
                if not isinstance(endpoint, Mapping):
                    continue
                ref = endpoint.get("targetRef")
                if isinstance(ref, Mapping) and ref.get("kind") == "Pod":
                    continue  # pods have their own, richer workload
                ips = [str(a) for a in as_list(endpoint.get("addresses"))]
                raw = [ip_bytes(a) for a in ips]
                if not ips or any(r is None for r in raw):
                    continue
                uid = f"{self._cluster_id}/discovery.k8s.io/EndpointSlice/{namespace}/{slice_name}/{ips[0]}"
                if uid in result:
                    continue
                ready = mapping(endpoint.get("conditions")).get("ready")
                workload = workload_pb2.Workload(
                    uid=uid, name=slice_name, namespace=namespace, addresses=[r for r in raw if r is not None],
                    network="", trust_domain=self._trust_domain, cluster_id=self._cluster_id,
                    status=workload_pb2.UNHEALTHY if ready is False else workload_pb2.HEALTHY,
                    # Opaque endpoints may share an IP with something else: never index them by address.
                    network_mode=workload_pb2.HOST_NETWORK)
                workload.services[info.resource_name].CopyFrom(port_list)
                result[uid] = workload
        return result


def _service_slices(state: ClusterState, services: Mapping[Key, ServiceInfo],
                    domain_suffix: str) -> Iterable[tuple[Key, Obj, ServiceInfo]]:
    """EndpointSlices that belong to a known Service (label `kubernetes.io/service-name`), IP-typed."""
    by_resource_name = {info.resource_name: info for info in services.values()}
    for key in sorted(state.endpointslices):
        endpoint_slice = state.endpointslices[key]
        service_name = labels(endpoint_slice).get(LABEL_SERVICE_NAME)
        if service_name is None or endpoint_slice.get("addressType") == "FQDN":
            continue
        info = by_resource_name.get(f"{key[0]}/{service_hostname(str(service_name), key[0], domain_suffix)}")
        if info is not None:
            yield key, endpoint_slice, info


def _slice_ports(endpoint_slice: Obj, info: ServiceInfo) -> workload_pb2.PortList:
    """A slice port is named after the Service port and numbered with the target port."""
    names = {name: number for number, name in info.port_names.items()}
    result = workload_pb2.PortList()
    for port in as_list(endpoint_slice.get("ports")):
        if not isinstance(port, Mapping) or str(port.get("protocol") or "TCP") != "TCP":
            continue
        number = port_number(port.get("port"))
        service_port = names.get(str(port.get("name") or ""))
        if number is not None and service_port is not None:
            result.ports.append(workload_pb2.Port(service_port=service_port, target_port=number))
    return result
