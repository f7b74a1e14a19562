"""ztunnel's wiring: the xDS store, certificates, the ZDS-driven pod manager and the handlers of each
pod's ports. Where each thing runs (see docs/ztunnel.md): one asyncio loop per worker process carries
control work (xDS, certificates, admin) and the data path; rendering metrics walks totals on demand.

Handlers, per PROTOCOLS §6-§7:
- 15001 outbound: original destination → `decide_outbound` → HBONE (pooled, from the pod's identity) or
  plain TCP from the pod's netns; every socket marked 1337.
- 15008 inbound HBONE: the authority must be this pod's IP; authorize with the peer's identity; connect
  to the app from the caller's IP (IP_TRANSPARENT); relay.
- 15006 inbound plaintext: authorize with no identity (STRICT denies it); connect from the caller's IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambient.hbone.client import HboneClient
from ambient.hbone.errors import HboneError
from ambient.hbone.server import ConnectRequest, HboneServer
from ambient.identity.ca_client import CaClient, CaClientConfig, token_from_file
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.manager import CertificateManager
from ambient.identity.spiffe import SpiffeId
from ambient.netns import NetnsExecutor
from ambient.proto import workload_pb2
from ambient.relay import ByteStream, TcpStream, relay
from ambient.xds.client import ClientConfig, XdsClient
from ambient.xds.store import StoreChanges, WorkloadSnapshot, WorkloadStore
from ambient.xds.types import ztunnel_node_id
from ambient.zds.protocol import WorkloadInfoLike
from ztunnel import accesslog, authz, decision
from ztunnel.admin import ConnectionEntry, WorkloadState
from ztunnel.config import CONNECT_TIMEOUT, WORKLOAD_WAIT, ZtunnelConfig
from ztunnel.dns import DnsProxy
from ztunnel.metrics import ZtunnelMetrics, labels_for
from ztunnel.proxy import sockets
from ztunnel.proxy.pod import PodProxy

log = logging.getLogger("ztunnel")


@dataclass(eq=False)
class OpenInbound:
    """An authorized inbound connection, kept so that a policy change can re-check and close it."""

    pod: PodProxy
    info: authz.ConnectionInfo
    close: Callable[[], None]


def spiffe_of(workload: workload_pb2.Workload, trust_domain: str) -> SpiffeId:
    return SpiffeId(workload.trust_domain or trust_domain, workload.namespace, workload.service_account)


class Ztunnel:
    def __init__(self, config: ZtunnelConfig) -> None:
        self.config_ = config
        self.store = WorkloadStore()
        root = Path(config.root_cert).read_bytes()
        self.xds = XdsClient(ClientConfig(
            address=config.xds_address, node_id=ztunnel_node_id(config.node_ip, config.pod_name, config.pod_namespace),
            cluster_id=config.cluster_id, token_file=Path(config.token_path), root_cert=root,
            server_name=config.server_name), self.store)
        self.ca = CaClient(CaClientConfig(address=config.ca_address, root_pem=root.decode(),
                                          server_name=config.server_name, cluster_id=config.cluster_id,
                                          impersonate=True), token_from_file(config.token_path))
        self.certs = CertificateManager(self.ca)
        self.pods: dict[str, PodProxy] = {}
        self.hbone = HboneClient()
        self.metrics = ZtunnelMetrics()
        self.access = accesslog.AccessLog(config.log_format)
        self.snapshot_seen = asyncio.Event()
        self.open_inbound: set[OpenInbound] = set()
        self.store.subscribe(self._reauthorize)

    def snapshot(self) -> WorkloadSnapshot:
        return self.store.snapshot

    # -- pods (ZDS) ------------------------------------------------------------------------------------
    async def add_pod(self, uid: str, info: WorkloadInfoLike | None, netns_fd: int) -> None:
        if info is None:
            raise ValueError(f"pod {uid}: add without workload info")
        existing = self.pods.get(uid)
        netns = NetnsExecutor(netns_fd, name=f"pod-{info.name}")
        if existing is not None:
            if existing.netns.inode == netns.inode:
                netns.close()
                return  # same pod, same netns: nothing to do
            await self.remove_pod(uid)
        pod = PodProxy(uid, info.name, info.namespace, info.service_account, netns)
        # During the pod's CNI ADD its IP is not in the API yet, so xDS may not have its workload: open the
        # listeners now (the agent waits for our ack) and resolve the workload per connection.
        pod.workload = self._lookup(pod)
        try:
            await pod.start({"outbound": self.handle_outbound, "plaintext": self.handle_plaintext},
                            dns=self.config_.dns_capture, extra=self._start_inbound)
        except OSError as exc:
            await pod.stop(0)
            raise RuntimeError(f"cannot open listeners in pod {info.namespace}/{info.name}: {exc}") from None
        self.pods[uid] = pod
        manager = self.metrics.workload_manager
        manager.proxies_started.inc()
        manager.active_proxy_count.set(len(self.pods))
        self.certs.prefetch(SpiffeId(self.config_.trust_domain, info.namespace, info.service_account))
        log.info("pod %s/%s added (uid %s)", info.namespace, info.name, uid)

    def _lookup(self, pod: PodProxy) -> workload_pb2.Workload | None:
        """The pod's workload as xDS knows it now, by (name, namespace, service account)."""
        if pod.workload is not None:
            fresh = self.snapshot().workloads.get(pod.workload.uid)
            if fresh is not None:
                pod.workload = fresh
                return fresh
        for workload in self.snapshot().workloads.values():
            if (workload.name, workload.namespace, workload.service_account) == (
                    pod.name, pod.namespace, pod.service_account):
                pod.workload = workload
                return workload
        return None

    async def _workload(self, pod: PodProxy) -> workload_pb2.Workload | None:
        """`_lookup`, waiting up to 5 s for a pod whose workload has not arrived over xDS yet."""
        deadline = time.monotonic() + WORKLOAD_WAIT
        while (workload := self._lookup(pod)) is None or not workload.addresses:
            if time.monotonic() > deadline:
                log.warning("pod %s/%s: no workload from xDS after %.0fs", pod.namespace, pod.name, WORKLOAD_WAIT)
                return workload
            await asyncio.sleep(0.05)
        return workload

    async def keep_pod(self, uid: str) -> None:
        if uid not in self.pods:
            log.info("keep for unknown pod %s: nothing to keep", uid)

    async def remove_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            self.metrics.workload_manager.proxies_stopped.inc()
            self.metrics.workload_manager.active_proxy_count.set(len(self.pods))
            await pod.stop(self.config_.drain_deadline)
            log.info("pod %s/%s removed", pod.namespace, pod.name)

    async def retain_only(self, uids: set[str]) -> None:
        for uid in set(self.pods) - uids:
            await self.remove_pod(uid)

    def snapshot_received(self) -> None:
        self.snapshot_seen.set()

    async def _cert(self, workload: workload_pb2.Workload) -> WorkloadCertificate:
        return await self.certs.fetch(spiffe_of(workload, self.config_.trust_domain))

    # -- 15001 outbound --------------------------------------------------------------------------------
    async def handle_outbound(self, pod: PodProxy, conn: socket.socket) -> None:
        started = time.monotonic()
        dst_ip, dst_port = sockets.original_destination(conn)
        src_ip, src_port = conn.getpeername()[:2]
        source = await self._workload(pod)
        if source is None:
            log.warning("pod %s/%s: outbound before its workload is known; refusing", pod.namespace, pod.name)
            return
        choice = decision.decide_outbound(self.snapshot(), source, dst_ip, dst_port)
        labels = labels_for(source, choice.destination_workload, choice.destination_service,
                            str(spiffe_of(source, self.config_.trust_domain)),
                            choice.expected_identities[0] if choice.expected_identities else None,
                            "source", choice.kind == decision.Kind.HBONE)
        counters = self.metrics.tcp.open(labels)
        client = await TcpStream.from_socket(conn)
        entry = ConnectionEntry(_hostport(src_ip, src_port), _hostport(*choice.target),
                                "HBONE" if choice.kind == decision.Kind.HBONE else "TCP", _hostport(dst_ip, dst_port))
        pod.outbound[id(entry)] = entry
        error = ""
        try:
            if choice.kind == decision.Kind.DENY:
                error = choice.reason
                return
            upstream: Any
            if choice.kind == decision.Kind.HBONE:
                cert = await self._cert(source)
                target_ip = choice.target[0]
                assert choice.authority is not None
                upstream = await asyncio.wait_for(self.hbone.connect(
                    cert, choice.target, choice.authority, list(choice.expected_identities),
                    headers={"forwarded": f'for="{_hostport(src_ip, src_port)}"'}, local_bind=src_ip,
                    socket_factory=lambda: pod.netns.call(lambda: sockets.outbound(target_ip))), CONNECT_TIMEOUT)
            else:
                sock = await pod.netns.call(lambda: sockets.outbound(choice.target[0]))
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, choice.target), CONNECT_TIMEOUT)
                upstream = await TcpStream.from_socket(sock)
            await relay(client, upstream, counters.add_sent, counters.add_received)
        except (OSError, HboneError, TimeoutError) as exc:
            error = f"connection to {choice.target[0]}:{choice.target[1]} failed: {exc}"
        finally:
            pod.outbound.pop(id(entry), None)
            client.close()
            counters.close(failed=bool(error), response_flags="CONNECT" if error else "-")
            hbone = _split(choice.authority) if choice.authority and choice.kind == decision.Kind.HBONE else None
            self.access.connection(direction="outbound", src=(src_ip, src_port),
                                   dst=choice.target, hbone=hbone,
                                   labels=labels, sent=counters.sent, received=counters.received,
                                   duration=time.monotonic() - started, error=error)

    # -- 15008 inbound HBONE ---------------------------------------------------------------------------
    async def _start_inbound(self, pod: PodProxy) -> None:
        assert pod.listeners is not None

        def cert_for(_: str) -> Any:
            return self.certs.fetch(SpiffeId(self.config_.trust_domain, pod.namespace, pod.service_account))

        server = HboneServer(cert_for, lambda request: self.handle_inbound(pod, request))
        pod.tasks.spawn(server.serve(pod.listeners.inbound), name=f"{pod.name}-hbone")
        pod.closers.append(server.close)
        if pod.listeners.dns_udp is not None and pod.listeners.dns_tcp is not None:
            def upstream_socket(family: socket.AddressFamily) -> Awaitable[socket.socket]:
                # In the pod's netns and marked, so the forwarded query is not captured again.
                return pod.netns.call(lambda: sockets.udp(family))

            proxy = DnsProxy(self.snapshot, self.config_.dns_upstreams, namespace=pod.namespace,
                             upstream_socket=upstream_socket)
            await proxy.serve_udp(pod.listeners.dns_udp)
            await proxy.serve_tcp(pod.listeners.dns_tcp)
            pod.closers.append(proxy.close)

    async def handle_inbound(self, pod: PodProxy, request: ConnectRequest) -> None:
        """15008: the authority must be this pod's IP (else 400); then the shared inbound path."""
        host, port = request.target
        src_ip, src_port = request.peer_addr[:2]
        workload = await self._workload(pod)
        if workload is None or host not in pod.ips:
            request.respond(400)
            return
        if port in (15001, 15006, 15008):
            log.warning("attempted recursive call to ourselves: %s", request.authority)
            request.respond(400)
            return
        entry = ConnectionEntry(_hostport(src_ip, src_port), request.authority, "HBONE", None,
                                request.peer_identity)
        await self._inbound(pod, workload, authz.ConnectionInfo(src_ip, host, port, request.peer_identity),
                            src_port, entry, accept=lambda: request.respond(200), refuse=request.respond)


    async def _connect_app(self, pod: PodProxy, client_ip: str, host: str, port: int) -> TcpStream:
        """To the pod's app, from the caller's IP (PROTOCOLS §6: IP_TRANSPARENT + connmark)."""
        transparent = client_ip not in pod.ips

        def make() -> socket.socket:
            return sockets.outbound(host, client_ip if transparent else None, transparent=transparent)

        sock = await pod.netns.call(make)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return await TcpStream.from_socket(sock)

    # -- 15006 inbound plaintext -----------------------------------------------------------------------

    async def handle_plaintext(self, pod: PodProxy, conn: socket.socket) -> None:
        """15006: plaintext from a caller outside the mesh; authorized with no identity (STRICT denies it)."""
        dst_ip, dst_port = sockets.original_destination(conn)
        src_ip, src_port = conn.getpeername()[:2]
        client = await TcpStream.from_socket(conn)
        try:
            workload = await self._workload(pod)
            if workload is None:
                return
            entry = ConnectionEntry(_hostport(src_ip, src_port), _hostport(dst_ip, dst_port), "TCP")
            await self._inbound(pod, workload, authz.ConnectionInfo(src_ip, dst_ip, dst_port, None), src_port,
                                entry, accept=lambda: client, refuse=lambda _status: None)
        finally:
            client.close()

    async def _inbound(self, pod: PodProxy, workload: workload_pb2.Workload, info: authz.ConnectionInfo,
                       src_port: int, entry: ConnectionEntry, accept: Callable[[], ByteStream],
                       refuse: Callable[[int], object]) -> None:
        """Both inbound ports: authorize (PROTOCOLS §5.3), connect to the app from the caller's IP, relay
        while the connection stays allowed (policy changes re-check it), and account for it."""
        started = time.monotonic()
        identity = str(info.src_identity) if info.src_identity else None
        verdict = authz.authorize(self.snapshot(), workload, info)
        labels = labels_for(self.snapshot().workload_by_ip(info.src_ip), workload, None, identity,
                            str(spiffe_of(workload, self.config_.trust_domain)), "destination", identity is not None)
        counters = self.metrics.tcp.open(labels)
        pod.inbound[id(entry)] = entry
        error = ""
        try:
            if not verdict.allowed:
                error = verdict.reason
                log.info("connection denied: %s", verdict.reason)
                refuse(401)
                return
            try:
                app = await self._connect_app(pod, info.src_ip, info.dst_ip, info.dst_port)
            except (OSError, TimeoutError) as exc:
                error = f"connection to {info.dst_ip}:{info.dst_port} failed: {exc}"
                refuse(503)
                return
            client = accept()
            tracked = OpenInbound(pod, info, _all(client.close, app.close))
            self.open_inbound.add(tracked)
            try:
                await relay(client, app, counters.add_received, counters.add_sent)
            finally:
                self.open_inbound.discard(tracked)
        finally:
            pod.inbound.pop(id(entry), None)
            counters.close(failed=bool(error), response_flags="DENY" if not verdict.allowed else
                           ("CONNECT" if error else "-"))
            self.access.connection(direction="inbound", src=(info.src_ip, src_port), dst=(info.dst_ip, info.dst_port),
                                   hbone=None, labels=labels, sent=counters.sent, received=counters.received,
                                   duration=time.monotonic() - started, error=error)


    def _reauthorize(self, snapshot: WorkloadSnapshot, changes: StoreChanges) -> None:
        """PROTOCOLS §5.3: policy changes re-evaluate open inbound connections and close those now denied."""
        if not (changes.authorizations or changes.removed_authorizations or changes.workloads):
            return
        for conn in list(self.open_inbound):
            workload = self._lookup(conn.pod)
            if workload is None:
                continue
            verdict = authz.authorize(snapshot, workload, conn.info)
            if not verdict.allowed:
                log.info("connection closed because it is no longer allowed after a policy update: %s (src %s)",
                         verdict.reason, conn.info.src_ip)
                self.open_inbound.discard(conn)
                conn.close()

    # -- admin state (ztunnel.admin.StateProvider) ----------------------------------------------------
    def certificates(self) -> list[Any]:
        return list(self.certs.snapshot())

    def workload_states(self) -> dict[str, WorkloadState]:
        return {uid: WorkloadState(p.name, p.namespace, p.service_account, "Up" if p.listeners else "Pending",
                                   tuple(p.inbound.values()), tuple(p.outbound.values()))
                for uid, p in self.pods.items()}

    def config(self) -> dict[str, Any]:
        c = self.config_
        return {"nodeName": c.node_name, "nodeIp": c.node_ip, "xdsAddress": c.xds_address,
                "caAddress": c.ca_address, "clusterId": c.cluster_id, "trustDomain": c.trust_domain,
                "zdsSocket": c.zds_socket, "dnsCapture": c.dns_capture, "workers": c.workers,
                "pod": f"{c.pod_namespace}/{c.pod_name}", "drainDeadlineSeconds": c.drain_deadline}

    # -- lifecycle -------------------------------------------------------------------------------------
    async def drain(self) -> None:
        await asyncio.gather(*(self.remove_pod(uid) for uid in list(self.pods)), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.hbone.close()
        await self.certs.close()
        await self.ca.close()


def _all(*closers: Callable[[], None]) -> Callable[[], None]:
    def close() -> None:
        for closer in closers:
            closer()

    return close


def _split(authority: str) -> tuple[str, int]:
    host, _, port = authority.rpartition(":")
    return host.strip("[]"), int(port)


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"
