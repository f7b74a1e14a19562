"""Kubernetes objects → the ambient workload model, as istiod's ambient index does it (PROTOCOLS.md
§5.1-5.3, §8, §9). See README.md in this folder for each rule and the Istio behaviour it mirrors.

Pure and deterministic: the same ClusterState, in whatever order its objects arrived, gives resources
that serialize (deterministic=True) to the same bytes, so an unchanged object causes no xDS push.
Must not do IO, log, or mutate its inputs.
"""

from __future__ import annotations

from ambient.proto import authorization_pb2, workload_pb2

from .authorization import convert_authorization_policy
from .model import (
    DOMAIN_SUFFIX,
    ROOT_NAMESPACE,
    ClusterState,
    Condition,
    StatusKey,
    Translation,
)
from .peerauthn import PeerAuthentications
from .services import build_services
from .waypoints import WaypointBinder, build_waypoints
from .workloads import SelectorPolicy, WorkloadBuilder

__all__ = ["DOMAIN_SUFFIX", "ROOT_NAMESPACE", "ClusterState", "Translation", "translate"]


def translate(inputs: ClusterState, cluster_id: str, trust_domain: str, root_namespace: str = ROOT_NAMESPACE,
              *, domain_suffix: str = DOMAIN_SUFFIX) -> Translation:
    authorizations: dict[str, authorization_pb2.Authorization] = {}
    statuses: dict[StatusKey, list[Condition]] = {}
    selector_policies: list[SelectorPolicy] = []
    for (namespace, name) in sorted(inputs.authorization_policies):
        converted = convert_authorization_policy(inputs.authorization_policies[(namespace, name)], root_namespace)
        if converted.condition is not None:
            statuses[("AuthorizationPolicy", namespace, name)] = [converted.condition]
        if converted.authorization is None:
            continue
        resource_name = f"{namespace}/{name}"
        authorizations[resource_name] = converted.authorization
        if converted.selector is not None:
            selector_policies.append(SelectorPolicy(namespace, resource_name, converted.selector))

    peer_authn = PeerAuthentications(inputs, root_namespace)
    authorizations.update(peer_authn.authorizations())

    binder = WaypointBinder(inputs, build_waypoints(inputs))
    services = build_services(inputs, binder, domain_suffix)
    builder = WorkloadBuilder(inputs, services, binder, selector_policies, peer_authn, cluster_id=cluster_id,
                              trust_domain=trust_domain, root_namespace=root_namespace,
                              domain_suffix=domain_suffix)

    addresses: dict[str, workload_pb2.Address] = {}
    for key in sorted(inputs.pods):
        workload = builder.pod_workload(key, inputs.pods[key])
        if workload is not None:
            addresses[workload.uid] = workload_pb2.Address(workload=workload)
    for uid, workload in builder.endpoint_workloads().items():
        addresses[uid] = workload_pb2.Address(workload=workload)
    for info in services.values():
        addresses[info.resource_name] = workload_pb2.Address(service=info.service)
    return Translation(addresses=dict(sorted(addresses.items())),
                       authorizations=dict(sorted(authorizations.items())), statuses=statuses)
