"""Istio's standard connection label set (PROTOCOLS.md §10), shared by ztunnel and, later, the waypoint.

`labels_for` follows ztunnel's rules (`proxy/metrics.rs`): workload = the workload's `workload_name`,
canonical service/app = `canonical_name`, canonical revision/version = `canonical_revision`, cluster =
`cluster_id`, principal = the SPIFFE ID (`spiffe://...`), service = the destination service's hostname,
name and namespace; every empty value becomes `unknown`. The source principal is only the identity the
caller vouches for (the mTLS peer, or our own identity when we originate mTLS); the destination principal
falls back to the destination workload's identity.
"""

from __future__ import annotations

from typing import NamedTuple

from ambient.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from ambient.proto import workload_pb2

UNKNOWN = "unknown"
REPORTER_SOURCE = "source"  # ztunnel, outbound
REPORTER_DESTINATION = "destination"  # ztunnel, inbound
REPORTER_WAYPOINT = "waypoint"
MUTUAL_TLS = "mutual_tls"
NO_FLAGS = "-"
DEFAULT_SERVICE_ACCOUNT = "default"  # what ztunnel assumes for a workload without one

Identity = SpiffeId | str | None


class ConnectionLabels(NamedTuple):
    """One series of the istio_tcp_* counters; field order is the label order Istio renders."""

    reporter: str
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = NO_FLAGS
    connection_security_policy: str = UNKNOWN


LABEL_NAMES: tuple[str, ...] = ConnectionLabels._fields


def _v(value: str) -> str:
    return value or UNKNOWN


def workload_identity(workload: workload_pb2.Workload) -> str:
    """`spiffe://<td>/ns/<ns>/sa/<sa>` with ztunnel's defaults for an empty trust domain or account."""
    return (f"spiffe://{workload.trust_domain or DEFAULT_TRUST_DOMAIN}/ns/{workload.namespace}"
            f"/sa/{workload.service_account or DEFAULT_SERVICE_ACCOUNT}")


def labels_for(src: workload_pb2.Workload | None, dst: workload_pb2.Workload | None,
               service: workload_pb2.Service | None, src_identity: Identity, dst_identity: Identity,
               reporter: str, secure: bool) -> ConnectionLabels:
    """The label set of one connection; computed once when it opens."""
    dst_principal = str(dst_identity) if dst_identity else (workload_identity(dst) if dst and dst.namespace else "")
    return ConnectionLabels(
        reporter=reporter,
        source_workload=_v(src.workload_name) if src else UNKNOWN,
        source_canonical_service=_v(src.canonical_name) if src else UNKNOWN,
        source_canonical_revision=_v(src.canonical_revision) if src else UNKNOWN,
        source_workload_namespace=_v(src.namespace) if src else UNKNOWN,
        source_principal=_v(str(src_identity) if src_identity else ""),
        source_app=_v(src.canonical_name) if src else UNKNOWN,
        source_version=_v(src.canonical_revision) if src else UNKNOWN,
        source_cluster=_v(src.cluster_id) if src else UNKNOWN,
        destination_service=_v(service.hostname) if service else UNKNOWN,
        destination_service_namespace=_v(service.namespace) if service else UNKNOWN,
        destination_service_name=_v(service.name) if service else UNKNOWN,
        destination_workload=_v(dst.workload_name) if dst else UNKNOWN,
        destination_canonical_service=_v(dst.canonical_name) if dst else UNKNOWN,
        destination_canonical_revision=_v(dst.canonical_revision) if dst else UNKNOWN,
        destination_workload_namespace=_v(dst.namespace) if dst else UNKNOWN,
        destination_principal=_v(dst_principal),
        destination_app=_v(dst.canonical_name) if dst else UNKNOWN,
        destination_version=_v(dst.canonical_revision) if dst else UNKNOWN,
        destination_cluster=_v(dst.cluster_id) if dst else UNKNOWN,
        connection_security_policy=MUTUAL_TLS if secure else UNKNOWN,
    )
