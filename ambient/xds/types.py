"""Wire names of the workload discovery service (PROTOCOLS.md §5) and the resource value both ends use.

The control plane turns its model into `XdsResource`s with `address_resource` / `authorization_resource`;
the version is a digest of the deterministic encoding, so an unchanged object never causes a push.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf import any_pb2
from google.protobuf.message import Message

from ambient.proto import authorization_pb2, workload_pb2

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)  # what ztunnel subscribes to, in its order

# 64 bits of SHA-256: versions only need to tell two states of one resource apart.
VERSION_DIGEST_CHARS = 16


def short_type(type_url: str) -> str:
    """`type.googleapis.com/istio.workload.Address` → `Address`, for log lines."""
    return type_url.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class XdsResource:
    """One named resource at one version, as it travels in a `DeltaDiscoveryResponse`."""

    name: str
    version: str
    body: any_pb2.Any

    @classmethod
    def of(cls, name: str, message: Message) -> XdsResource:
        body = any_pb2.Any()
        body.Pack(message, deterministic=True)
        return cls(name, content_version(body), body)


def content_version(body: any_pb2.Any) -> str:
    return hashlib.sha256(body.value).hexdigest()[:VERSION_DIGEST_CHARS]


def workload_resource_name(workload: workload_pb2.Workload) -> str:
    return workload.uid


def service_resource_name(service: workload_pb2.Service) -> str:
    return f"{service.namespace}/{service.hostname}"


def authorization_resource_name(policy: authorization_pb2.Authorization) -> str:
    return f"{policy.namespace}/{policy.name}"


def address_resource(item: workload_pb2.Workload | workload_pb2.Service) -> XdsResource:
    """Wrap a Workload or Service in an `Address` named as PROTOCOLS.md §5 says."""
    if isinstance(item, workload_pb2.Workload):
        return XdsResource.of(workload_resource_name(item), workload_pb2.Address(workload=item))
    return XdsResource.of(service_resource_name(item), workload_pb2.Address(service=item))


def authorization_resource(policy: authorization_pb2.Authorization) -> XdsResource:
    return XdsResource.of(authorization_resource_name(policy), policy)


def ztunnel_node_id(ip: str, pod: str, namespace: str) -> str:
    """The node id istiod expects from ztunnel: `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`."""
    return f"ztunnel~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"
