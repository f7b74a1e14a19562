"""`ambient-control`: the parts of istiod that ambient needs, speaking istiod's protocols.

One process, one event loop:
- informers on Pods, Services, EndpointSlices, Namespaces, AuthorizationPolicies, PeerAuthentications
  and Gateways feed `ambient.control.translate` (debounced); its output replaces the xDS resource set, so
  unchanged objects cause no push;
- delta xDS (`ambient.xds.server`) on 15010 (plaintext) and 15012 (TLS, with the CA), PROTOCOLS §5;
- the Istio CA (`ambient.control.ca_server`) on 15012, the only holder of the CA key;
- the waypoint controller (Gateway `istio-waypoint` → ServiceAccount, Deployment, Service, status, and
  the ClusterRoleBinding that lets the waypoints read their L7 configuration);
- the root certificate publisher (ConfigMap `istio-ca-root-cert` in every namespace, as istiod's);
- an HTTP endpoint (15014) with `/ready`, `/metrics`-style counters and `/debug/xds`, a JSON dump of
  every resource served (what `ambientctl` shows and tests read).

It runs in its system namespace (`--system-namespace`, default the pod's `POD_NAMESPACE`, else
`istio-system`): the CA Secret lives there, ztunnel is trusted as a node proxy only as `<ns>/ztunnel`, and
clients reach it as the Service `istiod.<ns>.svc` (the DNS name of its 15012 certificate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message

from ambient.aio import cancel_on_signals
from ambient.control.ca_server import (
    Authenticator,
    BootstrapTokenAuthenticator,
    CertificateService,
    TokenReviewAuthenticator,
)
from ambient.control.rootcert import RootCertPublisher
from ambient.control.translate import ClusterState, translate
from ambient.control.translate.canonical import message_to_canonical
from ambient.control.waypoints import (
    DEFAULT_COMMAND,
    DEFAULT_IMAGE,
    WAYPOINT_CLUSTER_ROLE,
    WaypointController,
    WaypointTemplate,
)
from ambient.identity import istiod
from ambient.identity.errors import IdentityError
from ambient.identity.signer import CaSigner, load_or_create_in_cluster
from ambient.kube.client import KubeClient, KubeConfig, KubeConfigError
from ambient.kube.errors import ApiError
from ambient.kube.informer import Informer
from ambient.kube.resources import ResourceTable
from ambient.proto import authorization_pb2, workload_pb2
from ambient.xds.errors import XdsAuthError
from ambient.xds.server import SERVER_OPTIONS, CallMetadata, XdsServer
from ambient.xds.source import MemorySource
from ambient.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, XdsResource

log = logging.getLogger("ambient.control")
Obj = dict[str, Any]
TYPES = ResourceTable()

CLUSTER_ID = "Kubernetes"  # istiod's default cluster id
TRUST_DOMAIN = "cluster.local"
SYSTEM_NAMESPACE = istiod.SYSTEM_NAMESPACE  # when not running in a pod (no $POD_NAMESPACE)
ROOT_NAMESPACE = SYSTEM_NAMESPACE  # Istio's meshConfig.rootNamespace defaults to istiod's namespace too
NODE_PROXY_ACCOUNT = "ztunnel"  # Istio's CA_TRUSTED_NODE_ACCOUNTS for ambient: <system ns>/ztunnel
XDS_PLAINTEXT_PORT = 15010  # istiod's ports (PROTOCOLS §1)
XDS_TLS_PORT = 15012
MONITORING_PORT = 15014
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1123 label, as Kubernetes checks
STATUS_KINDS = {"AuthorizationPolicy": TYPES.require("authorizationpolicies.security.istio.io")}
TRANSLATE_DEBOUNCE = 0.05  # seconds: gather a burst of watch events into one translation

# What translation reads: (table name in ClusterState, resource name for the table).
INPUTS = (
    ("pods", "pods"), ("services", "services"), ("endpointslices", "endpointslices"),
    ("namespaces", "namespaces"), ("authorization_policies", "authorizationpolicies.security.istio.io"),
    ("peer_authentications", "peerauthentications.security.istio.io"),
    ("gateways", "gateways.gateway.networking.k8s.io"),
)


@dataclass(frozen=True)
class ControlConfig:
    kubeconfig: str | None
    cluster_id: str = CLUSTER_ID
    trust_domain: str = TRUST_DOMAIN
    system_namespace: str = SYSTEM_NAMESPACE
    root_namespace: str = ROOT_NAMESPACE
    ca_dir: str = ""  # persisted CA (local); empty = the cluster's Secret
    ca_cert: str = ""
    ca_key: str = ""
    bootstrap_tokens: str = ""  # local token file; empty = Kubernetes TokenReview
    listen: str = "0.0.0.0"
    serving_ips: tuple[str, ...] = ("127.0.0.1",)
    xds_plaintext_port: int = XDS_PLAINTEXT_PORT
    xds_tls_port: int = XDS_TLS_PORT
    monitoring_port: int = MONITORING_PORT
    root_cert_out: str = ""  # where to publish the mesh root for clients (local cluster)
    waypoint_command: tuple[str, ...] = DEFAULT_COMMAND
    waypoint_image: str = DEFAULT_IMAGE
    waypoint_cluster_role: str = WAYPOINT_CLUSTER_ROLE  # empty: no ClusterRoleBinding for waypoints

    @property
    def control_address(self) -> str:
        """How pods reach us: `istiod.<system ns>.svc:<TLS port>` (the Service carries our port numbers)."""
        return istiod.address(self.system_namespace, self.xds_tls_port)

    @property
    def serving_names(self) -> tuple[str, ...]:
        """DNS SANs of the 15012 certificate: `istiod.<system ns>.svc`, which clients dialling the Service
        verify, and Istio's default name, which clients dialling an IP address verify (PROTOCOLS §5)."""
        return tuple(dict.fromkeys((istiod.dns_name(self.system_namespace), istiod.CONTROL_SERVER_NAME)))

    @property
    def node_proxies(self) -> frozenset[tuple[str, str]]:
        return frozenset({(self.system_namespace, NODE_PROXY_ACCOUNT)})

    @property
    def waypoint_template(self) -> WaypointTemplate:
        return WaypointTemplate(command=self.waypoint_command, image=self.waypoint_image,
                                control_address=self.control_address, cluster_id=self.cluster_id,
                                trust_domain=self.trust_domain, root_namespace=self.root_namespace)


class InformerPods:
    """`PodsOnNode` for the CA, answered from the control plane's pod cache."""

    def __init__(self, pods: Informer) -> None:
        self.pods = pods

    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        return {(p["metadata"]["namespace"], p["spec"].get("serviceAccountName", "default"))
                for p in self.pods.items() if p["spec"].get("nodeName") == node}


class ControlPlane:
    def __init__(self, config: ControlConfig, client: KubeClient) -> None:
        self.config, self.client = config, client
        self.source = MemorySource()
        self._changed = asyncio.Event()
        self.informers = {table: Informer(client, TYPES.require(name), handler=self._on_change)
                          for table, name in INPUTS}
        self.statuses: dict[tuple[str, str, str], list[Obj]] = {}
        self._written: dict[tuple[str, str, str], list[Obj]] = {}
        self.translations = 0
        self.last_translate_ms = 0.0
        self.ready = asyncio.Event()

    def _on_change(self, event: str, obj: Obj) -> None:
        self._changed.set()

    def state(self) -> ClusterState:
        tables: dict[str, dict[Any, Obj]] = {}
        for table, informer in self.informers.items():
            tables[table] = {(k[1] if table == "namespaces" else k): v for k, v in informer.cache.items()}
        return ClusterState(**tables)

    def retranslate(self) -> bool:
        started = time.perf_counter()
        result = translate(self.state(), self.config.cluster_id, self.config.trust_domain, self.config.root_namespace)
        changed = self.source.replace(ADDRESS_TYPE_URL, [XdsResource.of(n, m) for n, m in result.addresses.items()])
        changed |= self.source.replace(AUTHORIZATION_TYPE_URL,
                                       [XdsResource.of(n, m) for n, m in result.authorizations.items()])
        self.translations += 1
        self.last_translate_ms = (time.perf_counter() - started) * 1000
        self.statuses = result.statuses
        return changed

    async def write_statuses(self) -> None:
        """Policy conditions from translation (e.g. `ZtunnelAccepted` False when L7 fields were ignored),
        written to each object's status; only what changed since the last write."""
        from ambient.kube.events import now_rfc3339

        wanted = dict(self.statuses)
        for key in set(self._written) | set(wanted):
            conditions = wanted.get(key)
            if self._written.get(key) == conditions:
                continue
            kind, namespace, name = key
            rt = STATUS_KINDS.get(kind)
            if rt is None:
                continue
            stamped = [{**c, "lastTransitionTime": now_rfc3339()} for c in conditions or []]
            try:
                await self.client.patch(rt, name, {"status": {"conditions": stamped or None}}, namespace, status=True)
            except ApiError as exc:
                if exc.code != 404:
                    log.warning("status of %s %s/%s: %s", kind, namespace, name, exc)
                    continue
            if conditions is None:
                self._written.pop(key, None)
            else:
                self._written[key] = conditions

    async def translate_loop(self) -> None:
        for informer in self.informers.values():
            await informer.synced.wait()
        self.retranslate()
        await self.write_statuses()
        self.ready.set()
        log.info("initial translation: %d addresses, %d authorizations",
                 len(self.source.snapshot(ADDRESS_TYPE_URL)), len(self.source.snapshot(AUTHORIZATION_TYPE_URL)))
        while True:
            await self._changed.wait()
            await asyncio.sleep(TRANSLATE_DEBOUNCE)
            self._changed.clear()
            try:
                self.retranslate()
                await self.write_statuses()
            except Exception:
                log.exception("translation failed; keeping the previous resources")

    def dump(self) -> Obj:
        """Every served resource in the canonical JSON form (IPs as text), with its version."""

        def render(type_url: str, message_type: type[Message]) -> dict[str, Any]:
            out = {}
            for name, res in self.source.snapshot(type_url).items():
                message = message_type()
                res.body.Unpack(message)
                out[name] = {**message_to_canonical(message), "version": res.version}
            return out

        return {"addresses": render(ADDRESS_TYPE_URL, workload_pb2.Address),
                "authorizations": render(AUTHORIZATION_TYPE_URL, authorization_pb2.Authorization),
                "generation": self.source.generation, "translations": self.translations,
                "lastTranslateMs": round(self.last_translate_ms, 2)}


def load_signer(config: ControlConfig, client: KubeClient) -> CaSigner | asyncio.Future[CaSigner]:
    if config.ca_cert and config.ca_key:
        return CaSigner.from_files(config.ca_cert, config.ca_key, config.trust_domain)
    if config.ca_dir:
        return CaSigner.load_or_create(config.ca_dir, config.trust_domain)
    return asyncio.ensure_future(load_or_create_in_cluster(client, config.trust_domain, config.system_namespace))


def xds_authenticator(authenticator: Authenticator, cluster_id: str):  # type: ignore[no-untyped-def]
    async def authenticate(meta: CallMetadata) -> str:
        if not meta.token:
            raise XdsAuthError("missing `authorization: Bearer <token>` metadata", "unauthenticated")
        try:
            caller = await authenticator.authenticate(meta.token, meta.cluster_id or cluster_id)
        except Exception as exc:
            raise XdsAuthError(f"authentication failed: {exc}", "unauthenticated") from None
        return str(caller.identity)

    return authenticate


async def run(config: ControlConfig) -> None:
    cancel_on_signals()
    client = KubeClient(KubeConfig.load(config.kubeconfig))
    plane = ControlPlane(config, client)
    signer_or_future = load_signer(config, client)
    signer = signer_or_future if isinstance(signer_or_future, CaSigner) else await signer_or_future
    if config.root_cert_out:
        Path(config.root_cert_out).write_text(signer.root_pem)
    authenticator: Authenticator = (
        BootstrapTokenAuthenticator(config.bootstrap_tokens, config.trust_domain) if config.bootstrap_tokens
        else TokenReviewAuthenticator(client, config.trust_domain, node_proxies=config.node_proxies))
    xds = XdsServer(plane.source, authenticate=xds_authenticator(authenticator, config.cluster_id))
    ca = CertificateService(signer, authenticator, InformerPods(plane.informers["pods"]),
                            cluster_id=config.cluster_id)
    serving = signer.issue_serving_certificate(config.serving_ips, config.serving_names)
    tls_server = grpc.aio.server(options=SERVER_OPTIONS)
    xds.add_to_server(tls_server)
    ca.register(tls_server)
    creds = grpc.ssl_server_credentials([(serving.key_pem.encode(), serving.cert_chain_pem.encode())])
    tls_server.add_secure_port(f"{config.listen}:{config.xds_tls_port}", creds)
    plain_server = grpc.aio.server(options=SERVER_OPTIONS)
    xds.add_to_server(plain_server)
    plain_server.add_insecure_port(f"{config.listen}:{config.xds_plaintext_port}")
    monitor = await _serve_monitoring(plane, xds, config)
    waypoints = WaypointController(client, config.waypoint_template, cluster_role=config.waypoint_cluster_role)
    root_certs = RootCertPublisher(client, signer.root_pem)
    try:
        await tls_server.start()
        await plain_server.start()
        log.info("serving xDS on :%d (plaintext) and xDS + CA on :%d (TLS) as %s, trust domain %s",
                 config.xds_plaintext_port, config.xds_tls_port, config.control_address, config.trust_domain)
        async with asyncio.TaskGroup() as tg:
            for table, informer in plane.informers.items():
                tg.create_task(informer.run(), name=f"informer-{table}")
            tg.create_task(plane.translate_loop(), name="translate")
            tg.create_task(xds.run(), name="xds-push")
            tg.create_task(waypoints.run(), name="waypoint-controller")
            tg.create_task(root_certs.run(), name="root-cert-publisher")
    except asyncio.CancelledError:
        log.info("stopping")
    finally:
        await tls_server.stop(grace=1)
        await plain_server.stop(grace=1)
        await monitor.cleanup()
        await client.close()


async def _serve_monitoring(plane: ControlPlane, xds: XdsServer, config: ControlConfig) -> web.AppRunner:
    async def ready(_: web.Request) -> web.Response:
        return web.Response(text="ready") if plane.ready.is_set() else web.Response(status=503, text="syncing")

    async def debug_xds(_: web.Request) -> web.Response:
        return web.json_response(plane.dump(), dumps=lambda o: json.dumps(o, indent=2, sort_keys=True))

    async def debug_clients(_: web.Request) -> web.Response:
        clients = [{"node": c.node_id, "peer": c.peer, "caller": c.caller, "pushes": c.pushes}
                   for c in xds.clients()]
        return web.json_response(clients)

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/debug/xds", debug_xds)
    app.router.add_get("/debug/connections", debug_clients)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.listen, config.monitoring_port, reuse_address=True).start()
    return runner


def port(text: str) -> int:
    """A TCP port number (argparse names this type in its error: "invalid port value: 'x'")."""
    number = int(text)
    if not 0 < number < 65536:
        raise ValueError(text)
    return number


def parse_args(argv: list[str] | None = None) -> tuple[ControlConfig, str]:
    env = os.environ
    p = argparse.ArgumentParser(prog="ambient-control", description="ambient control plane (istiod's ambient parts)")
    p.add_argument("--kubeconfig", default=env.get("KUBECONFIG"),
                   help="default: $KUBECONFIG, else the pod's ServiceAccount (in-cluster configuration)")
    p.add_argument("--cluster-id", default=env.get("CLUSTER_ID", CLUSTER_ID))
    p.add_argument("--trust-domain", default=env.get("TRUST_DOMAIN", TRUST_DOMAIN))
    p.add_argument("--system-namespace", default=env.get("POD_NAMESPACE") or SYSTEM_NAMESPACE,
                   help="where the CA Secret lives, ztunnel runs and the Service istiod points at us "
                        f"(default: $POD_NAMESPACE, else {SYSTEM_NAMESPACE})")
    p.add_argument("--root-namespace", default=None,
                   help="namespace of mesh-wide policies (default: the system namespace)")
    p.add_argument("--ca-dir", default="", help="persist a self-signed CA here (default: Secret istio-ca-secret)")
    p.add_argument("--ca-cert", default="", help="use this CA certificate (root or intermediate) ...")
    p.add_argument("--ca-key", default="", help="... with this key")
    p.add_argument("--bootstrap-tokens", default="", help="token file for local callers (default: TokenReview)")
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--xds-plaintext-port", type=port, default=XDS_PLAINTEXT_PORT, help="plaintext xDS")
    p.add_argument("--xds-tls-port", type=port, default=XDS_TLS_PORT, help="xDS and the CA over TLS")
    p.add_argument("--monitoring-port", type=port, default=MONITORING_PORT, help="/ready and /debug")
    p.add_argument("--serving-ip", action="append", default=[], help="IP SANs of the 15012 certificate")
    p.add_argument("--root-cert-out", default="", help="write the mesh root certificate here")
    p.add_argument("--waypoint-command", default=" ".join(DEFAULT_COMMAND),
                   help="command of waypoint pods (space separated)")
    p.add_argument("--waypoint-image", default=DEFAULT_IMAGE, help="container image of waypoint pods")
    p.add_argument("--waypoint-cluster-role", default=WAYPOINT_CLUSTER_ROLE,
                   help="ClusterRole bound to every waypoint's ServiceAccount (ClusterRoleBinding of the same "
                        "name, kept by the controller); empty: none")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    if bool(a.ca_cert) != bool(a.ca_key):
        p.error("--ca-cert and --ca-key go together")
    if not NAMESPACE_NAME.fullmatch(a.system_namespace):
        p.error(f"--system-namespace {a.system_namespace!r} is not a namespace name (lowercase letters, digits "
                "and '-', at most 63)")
    if len({a.xds_plaintext_port, a.xds_tls_port, a.monitoring_port}) != 3:
        p.error("--xds-plaintext-port, --xds-tls-port and --monitoring-port must differ")
    if not a.waypoint_command.split():
        p.error("--waypoint-command must name a program")
    return ControlConfig(
        kubeconfig=a.kubeconfig, cluster_id=a.cluster_id, trust_domain=a.trust_domain,
        system_namespace=a.system_namespace, root_namespace=a.root_namespace or a.system_namespace,
        ca_dir=a.ca_dir, ca_cert=a.ca_cert, ca_key=a.ca_key,
        bootstrap_tokens=a.bootstrap_tokens, listen=a.listen, serving_ips=tuple(a.serving_ip or ["127.0.0.1"]),
        xds_plaintext_port=a.xds_plaintext_port, xds_tls_port=a.xds_tls_port, monitoring_port=a.monitoring_port,
        root_cert_out=a.root_cert_out, waypoint_command=tuple(a.waypoint_command.split()),
        waypoint_image=a.waypoint_image, waypoint_cluster_role=a.waypoint_cluster_role), a.log_level


def main() -> None:
    config, level = parse_args()
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(config))
    except (KubeConfigError, ApiError, IdentityError) as exc:  # a kubeconfig, the CA Secret or CA files
        sys.exit(f"ambient-control: {exc}")


if __name__ == "__main__":
    main()
