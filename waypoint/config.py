"""The waypoint's configuration: one frozen object built once from flags and the environment (the names
Istio's waypoint pods get where they exist), every default a named constant with its reason.

The defaults are what the waypoint pod the control plane deploys provides (ambient/control/waypoints.py,
Istio's names and paths): the CA token at /var/run/secrets/tokens/istio-token, the mesh root at
/var/run/secrets/istio/root-cert.pem, `CA_ADDRESS`/`XDS_ADDRESS` naming `istiod.<system ns>.svc:15012`,
and the pod's ServiceAccount for the API server (in-cluster configuration) when no kubeconfig is given.
Flags win over the environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from ambient.identity import istiod

CA_ADDRESS = istiod.address()  # istiod.istio-system.svc:15012 (PROTOCOLS §1); the pod's $CA_ADDRESS wins
XDS_ADDRESS = istiod.address()
CONTROL_SERVER_NAME = istiod.CONTROL_SERVER_NAME  # the SAN verified on 15012 when dialled by IP address
TOKEN_PATH = "/var/run/secrets/tokens/istio-token"  # the pod's projected token (audience istio-ca)
ROOT_CERT = "/var/run/secrets/istio/root-cert.pem"  # ConfigMap istio-ca-root-cert, mounted
CLUSTER_ID = "Kubernetes"
TRUST_DOMAIN = "cluster.local"
ROOT_NAMESPACE = istiod.SYSTEM_NAMESPACE  # mesh-wide policies and the GatewayClass live here (Istio's default)
DOMAIN_SUFFIX = "cluster.local"
HBONE_PORT = 15008  # PROTOCOLS §1
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
# Protocol detection for ports that declare no protocol: wait this long for the client's first bytes; a
# client that says nothing is talking to a server-first protocol and gets an L4 relay.
DETECT_TIMEOUT = 1.0
# Bodies up to this size are kept so a retry or a mirror can replay them (Envoy buffers retried requests
# up to its per-request buffer limit, 16 KiB by default in Istio's sidecars; tutorials post small bodies).
REPLAY_BUFFER = 64 * 1024
CONNECT_TIMEOUT = 10.0  # seconds to open an upstream tunnel (Istio's DestinationRule default)
DRAIN_TIMEOUT = 5.0  # seconds open requests get after SIGTERM


@dataclass(frozen=True)
class WaypointConfig:
    name: str  # the Gateway's name
    namespace: str
    pod_name: str = ""
    pod_ip: str = ""
    service_account: str = ""
    node_name: str = ""
    xds_address: str = XDS_ADDRESS
    ca_address: str = CA_ADDRESS
    server_name: str = CONTROL_SERVER_NAME
    root_cert: str = ROOT_CERT
    token_path: str = TOKEN_PATH
    impersonate: bool = False  # the local cluster hands waypoints their node's proxy token
    cluster_id: str = CLUSTER_ID
    trust_domain: str = TRUST_DOMAIN
    root_namespace: str = ROOT_NAMESPACE
    domain_suffix: str = DOMAIN_SUFFIX
    kubeconfig: str | None = None  # None: $KUBECONFIG, ~/.kube/config, else in-cluster (KubeConfig.load)
    hbone_address: tuple[str, int] = ("0.0.0.0", HBONE_PORT)
    admin_address: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    metrics_address: tuple[str, int] = ("0.0.0.0", METRICS_PORT)
    readiness_address: tuple[str, int] = ("0.0.0.0", READINESS_PORT)
    detect_timeout: float = DETECT_TIMEOUT
    replay_buffer: int = REPLAY_BUFFER
    connect_timeout: float = CONNECT_TIMEOUT
    drain_timeout: float = DRAIN_TIMEOUT
    log_format: str = "text"
    access_log: bool = True

    @property
    def identity(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account or self.name}"


def _address(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> tuple[WaypointConfig, str]:
    env = os.environ
    p = argparse.ArgumentParser(prog="waypoint", description="ambient L7 proxy (Istio waypoint)")
    p.add_argument("--name", default=env.get("GATEWAY_NAME", ""), help="the waypoint Gateway's name")
    p.add_argument("--namespace", default=env.get("POD_NAMESPACE", ""))
    p.add_argument("--kubeconfig", default=env.get("KUBECONFIG"),
                   help="default: $KUBECONFIG, else the pod's ServiceAccount (in-cluster configuration)")
    p.add_argument("--xds-address", default=env.get("XDS_ADDRESS") or XDS_ADDRESS)
    p.add_argument("--ca-address", default=env.get("CA_ADDRESS") or CA_ADDRESS)
    p.add_argument("--server-name", default=None, help="TLS name of the control plane (default: "
                   "$XDS_SERVER_NAME, $ALT_XDS_HOSTNAME, the xDS address's host name, istiod.istio-system.svc)")
    p.add_argument("--root-cert", default=env.get("XDS_ROOT_CA") or env.get("CA_ROOT_CA") or ROOT_CERT)
    p.add_argument("--token-path", default=env.get("TOKEN_PATH") or TOKEN_PATH)
    p.add_argument("--impersonate", action="store_true",
                   help="the token is a node proxy's: ask the CA for this pod's identity by impersonation")
    # Istio's charts set ISTIO_META_CLUSTER_ID, which wins over CLUSTER_ID there too.
    p.add_argument("--cluster-id", default=env.get("ISTIO_META_CLUSTER_ID") or env.get("CLUSTER_ID") or CLUSTER_ID)
    p.add_argument("--trust-domain", default=env.get("TRUST_DOMAIN", TRUST_DOMAIN))
    p.add_argument("--root-namespace", default=env.get("ROOT_NAMESPACE", ROOT_NAMESPACE))
    p.add_argument("--admin-address", default=f"127.0.0.1:{ADMIN_PORT}")
    p.add_argument("--listen-ip", default="0.0.0.0", help="address of the HBONE, metrics and readiness ports")
    p.add_argument("--detect-timeout", type=float, default=DETECT_TIMEOUT)
    p.add_argument("--log-format", choices=["text", "json"], default=env.get("LOG_FORMAT", "text"))
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", "info"))
    p.add_argument("--no-access-log", action="store_true")
    a = p.parse_args(argv)
    missing = [flag for flag, value in (("--name", a.name), ("--namespace", a.namespace)) if not value]
    if missing:
        p.error(f"{' and '.join(missing)} required (or $GATEWAY_NAME / $POD_NAMESPACE): "
                "the waypoint serves the services bound to its own Gateway")
    try:
        admin = _address(a.admin_address, ADMIN_PORT)
    except ValueError:
        p.error(f"--admin-address {a.admin_address!r}: expected HOST:PORT")
    return WaypointConfig(
        name=a.name, namespace=a.namespace, pod_name=env.get("POD_NAME", ""), pod_ip=env.get("POD_IP", ""),
        service_account=env.get("SERVICE_ACCOUNT", a.name), node_name=env.get("NODE_NAME", ""),
        xds_address=istiod.istio_address(a.xds_address), ca_address=istiod.istio_address(a.ca_address),
        server_name=a.server_name or istiod.default_server_name(env, a.xds_address), root_cert=a.root_cert,
        token_path=a.token_path, impersonate=a.impersonate, cluster_id=a.cluster_id, trust_domain=a.trust_domain,
        root_namespace=a.root_namespace, kubeconfig=a.kubeconfig,
        hbone_address=(a.listen_ip, HBONE_PORT), admin_address=admin,
        metrics_address=(a.listen_ip, METRICS_PORT), readiness_address=(a.listen_ip, READINESS_PORT),
        detect_timeout=a.detect_timeout, log_format=a.log_format, access_log=not a.no_access_log), a.log_level
