"""ztunnel's configuration: one frozen object built once from flags and the environment variables
Istio's ztunnel uses (where they exist), every default a named constant with its reason."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ambient.identity import istiod
from ambient.identity.istiod import default_server_name, istio_address

ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"  # PROTOCOLS §4
CA_ADDRESS = XDS_ADDRESS = istiod.address()  # istiod.istio-system.svc:15012 (PROTOCOLS §1)
CONTROL_SERVER_NAME = istiod.CONTROL_SERVER_NAME  # the SAN ztunnel verifies on 15012 when dialling an IP
TOKEN_PATH = "/var/run/secrets/tokens/istio-token"
ROOT_CERT = "/var/run/secrets/istio/root-cert.pem"
CLUSTER_ID = "Kubernetes"
TRUST_DOMAIN = "cluster.local"
ADMIN_PORT = 15000  # PROTOCOLS §1
METRICS_PORT = 15020
READINESS_PORT = 15021
OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_PORT, DNS_PORT = 15001, 15006, 15008, 15053
WORKLOAD_WAIT = 5.0  # seconds to wait for a new pod's workload to arrive over xDS (as ztunnel)
DRAIN_DEADLINE = 5.0  # seconds open connections get after SIGTERM (or their pod's removal) before they close
SYSTEM_NAMESPACE = istiod.SYSTEM_NAMESPACE
CONNECT_TIMEOUT = 10.0  # seconds for outbound TCP/HBONE connects


@dataclass(frozen=True)
class ZtunnelConfig:
    node_name: str
    node_ip: str
    xds_address: str = XDS_ADDRESS
    ca_address: str = CA_ADDRESS
    server_name: str = CONTROL_SERVER_NAME
    root_cert: str = ROOT_CERT
    token_path: str = TOKEN_PATH
    cluster_id: str = CLUSTER_ID
    trust_domain: str = TRUST_DOMAIN
    zds_socket: str = ZDS_SOCKET
    admin_address: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    metrics_address: tuple[str, int] = ("0.0.0.0", METRICS_PORT)
    readiness_address: tuple[str, int] = ("0.0.0.0", READINESS_PORT)
    dns_capture: bool = True
    dns_upstreams: tuple[str, ...] = ()
    log_format: str = "text"
    workers: int = 1
    # Who this ztunnel is, for the xDS node id (`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`): the
    # pod's name and namespace from the downward API, as Istio's chart sets them.
    pod_name: str = "ztunnel"
    pod_namespace: str = SYSTEM_NAMESPACE
    drain_deadline: float = DRAIN_DEADLINE


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration (`5s`, `1m30s`, `250ms`), the syntax of Istio's duration env vars."""
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}: use a number with a unit, e.g. 5s, 1m30s, 500ms")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def drain_deadline(env: Mapping[str, str]) -> float:
    """How long open connections get to finish on shutdown, as Istio's ztunnel decides it:
    `CONNECTION_TERMINATION_DEADLINE` if set; else from the pod's `TERMINATION_GRACE_PERIOD_SECONDS`,
    leaving a margin before the kubelet's SIGKILL (5 s when the grace period is over 10 s, else 1 s,
    never under 1 s); else 5 s."""
    explicit = env.get("CONNECTION_TERMINATION_DEADLINE")
    if explicit:
        return parse_go_duration(explicit)
    grace = env.get("TERMINATION_GRACE_PERIOD_SECONDS")
    if grace:
        try:
            seconds = int(grace)
        except ValueError:
            raise ValueError(f"invalid TERMINATION_GRACE_PERIOD_SECONDS={grace!r}: expected whole seconds") from None
        return float(max(seconds - 5 if seconds > 10 else seconds - 1, 1))
    return DRAIN_DEADLINE


def parse_args(argv: list[str] | None = None) -> tuple[ZtunnelConfig, str]:
    env = os.environ
    p = argparse.ArgumentParser(prog="ztunnel", description="ambient node L4 proxy (Istio ztunnel, in-pod mode)")
    p.add_argument("--node-name", default=env.get("NODE_NAME", ""))
    p.add_argument("--node-ip", default=env.get("INSTANCE_IP", ""))
    p.add_argument("--xds-address", default=env.get("XDS_ADDRESS", XDS_ADDRESS))
    p.add_argument("--ca-address", default=env.get("CA_ADDRESS", CA_ADDRESS))
    p.add_argument("--server-name", default=None, help="TLS name of the control plane (default: "
                   "$XDS_SERVER_NAME, $ALT_XDS_HOSTNAME, the xDS address's host name, istiod.istio-system.svc)")
    p.add_argument("--root-cert", default=env.get("XDS_ROOT_CA") or env.get("CA_ROOT_CA") or ROOT_CERT)
    p.add_argument("--token-path", default=env.get("TOKEN_PATH") or env.get("AUTH_TOKEN") or TOKEN_PATH)
    # Istio's chart sets ISTIO_META_CLUSTER_ID, which wins over CLUSTER_ID there too.
    p.add_argument("--cluster-id", default=env.get("ISTIO_META_CLUSTER_ID") or env.get("CLUSTER_ID") or CLUSTER_ID)
    p.add_argument("--trust-domain", default=env.get("TRUST_DOMAIN", TRUST_DOMAIN))
    p.add_argument("--zds-socket", default=env.get("INPOD_UDS", ZDS_SOCKET))
    p.add_argument("--admin-address", default=f"127.0.0.1:{ADMIN_PORT}")
    p.add_argument("--listen-ip", default="0.0.0.0", help="address of the metrics and readiness ports")
    p.add_argument("--dns-upstream", action="append", default=[])
    p.add_argument("--log-format", choices=["text", "json"], default=env.get("LOG_FORMAT", "text"))
    p.add_argument("--log-level", default=env.get("RUST_LOG", "info"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--drain-deadline", type=float, default=None, help="seconds open connections get on "
                   "shutdown (default: $CONNECTION_TERMINATION_DEADLINE, else from "
                   "$TERMINATION_GRACE_PERIOD_SECONDS, else 5)")
    a = p.parse_args(argv)
    if not a.node_name:
        p.error("--node-name (or $NODE_NAME) is required: ztunnel serves the pods of its own node")
    try:
        deadline = a.drain_deadline if a.drain_deadline is not None else drain_deadline(env)
    except ValueError as exc:
        p.error(str(exc))
    host, _, port = a.admin_address.rpartition(":")
    # Istio's ISTIO_META_DNS_CAPTURE: the DNS proxy runs unless it is "false".
    dns_capture = env.get("ISTIO_META_DNS_CAPTURE", "true").lower() != "false"
    return ZtunnelConfig(
        node_name=a.node_name, node_ip=a.node_ip, xds_address=istio_address(a.xds_address),
        ca_address=istio_address(a.ca_address),
        server_name=a.server_name or default_server_name(env, a.xds_address), dns_capture=dns_capture,
        root_cert=a.root_cert, token_path=a.token_path, cluster_id=a.cluster_id,
        trust_domain=a.trust_domain, zds_socket=a.zds_socket, admin_address=(host, int(port)),
        metrics_address=(a.listen_ip, METRICS_PORT), readiness_address=(a.listen_ip, READINESS_PORT),
        dns_upstreams=tuple(a.dns_upstream), log_format=a.log_format, workers=a.workers,
        pod_name=env.get("POD_NAME") or "ztunnel", pod_namespace=env.get("POD_NAMESPACE") or SYSTEM_NAMESPACE,
        drain_deadline=deadline), a.log_level
