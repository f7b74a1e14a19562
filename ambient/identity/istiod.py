"""How the mesh names its control plane (PROTOCOLS.md §1, §5): the Service `istiod` in the system
namespace, reached on 15012 for xDS and the CA, and the DNS name its serving certificate carries.

Shared by the control plane (which name to put in its 15012 certificate, which address to hand waypoint
pods) and every client of 15012 (which name to verify, how to read Istio's `XDS_ADDRESS`/`CA_ADDRESS`).
Pure functions of strings; no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

SYSTEM_NAMESPACE = "istio-system"  # Istio's default; ambient-control takes the namespace it runs in
SERVICE_NAME = "istiod"  # the Service ztunnel and waypoints dial (Istio's name, so its charts' values work)
TLS_PORT = 15012  # xDS + CA over TLS (PROTOCOLS §1)


def dns_name(namespace: str = SYSTEM_NAMESPACE) -> str:
    """`istiod.<ns>.svc`: the SAN of the control plane's 15012 certificate, what clients verify."""
    return f"{SERVICE_NAME}.{namespace}.svc"


def address(namespace: str = SYSTEM_NAMESPACE, port: int = TLS_PORT) -> str:
    """`istiod.<ns>.svc:15012`: Istio's `CA_ADDRESS`/`XDS_ADDRESS` for a pod in the mesh."""
    return f"{dns_name(namespace)}:{port}"


CONTROL_SERVER_NAME = dns_name()  # the name verified when the control plane is dialled by IP address


def istio_address(value: str) -> str:
    """Istio takes `XDS_ADDRESS`/`CA_ADDRESS` as URIs (`https://host:port`, scheme optional); gRPC here
    dials `host:port`."""
    return value.removeprefix("https://").rstrip("/")


def default_server_name(env: Mapping[str, str], xds_address: str) -> str:
    """The name the control plane's certificate must carry: `XDS_SERVER_NAME` or Istio's `ALT_XDS_HOSTNAME`,
    else the host of the xDS address when it is a DNS name (as Istio's proxies verify, e.g.
    `istiod-canary.istio-system.svc` for a revision, `istiod.<ns>.svc` for another system namespace), else
    `istiod.istio-system.svc` (an IP address: the name istiod's certificate carries by default)."""
    named = env.get("XDS_SERVER_NAME") or env.get("ALT_XDS_HOSTNAME")
    if named:
        return named
    host = istio_address(xds_address).rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host if host and host != "localhost" else CONTROL_SERVER_NAME
    return CONTROL_SERVER_NAME
