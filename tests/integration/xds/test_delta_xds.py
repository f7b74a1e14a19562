"""Delta xDS conformance over real gRPC streams on 127.0.0.1: our server against hand-driven streams and
against our client library, with an in-memory resource source standing in for the control plane."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ambient.proto import authorization_pb2, discovery_pb2, discovery_pb2_grpc, workload_pb2
from ambient.xds.client import ClientConfig, XdsClient
from ambient.xds.errors import XdsAuthError
from ambient.xds.server import (
    SERVER_OPTIONS,
    CallMetadata,
    ServerConfig,
    XdsServer,
    static_token_authenticator,
)
from ambient.xds.server_state import RequestKind, RequestOutcome
from ambient.xds.source import MemorySource
from ambient.xds.store import WorkloadStore
from ambient.xds.types import ADDRESS_TYPE_URL as ADDR
from ambient.xds.types import AUTHORIZATION_TYPE_URL as AUTHZ
from ambient.xds.types import XdsResource, address_resource, authorization_resource, ztunnel_node_id

TIMEOUT = 5.0
NODE_1 = ztunnel_node_id("172.30.0.11", "ztunnel-1", "istio-system")
NODE_2 = ztunnel_node_id("172.30.0.12", "ztunnel-2", "istio-system")


def pod(name: str, ip: int, revision: str = "v1", padding: int = 0) -> XdsResource:
    return address_resource(workload_pb2.Workload(
        uid=f"Kubernetes//Pod/default/{name}", name=name, namespace="default", canonical_revision=revision,
        addresses=[bytes([10, 244, 1, ip])], tunnel_protocol=workload_pb2.HBONE, hostname="x" * padding))


def service(name: str, vip: int) -> XdsResource:
    return address_resource(workload_pb2.Service(
        name=name, namespace="default", hostname=f"{name}.default.svc.cluster.local",
        addresses=[workload_pb2.NetworkAddress(address=bytes([10, 96, 0, vip]))]))


def policy(name: str, action: authorization_pb2.Action = authorization_pb2.ALLOW) -> XdsResource:
    return authorization_resource(authorization_pb2.Authorization(
        name=name, namespace="default", scope=authorization_pb2.NAMESPACE, action=action))


def uid(name: str) -> str:
    return f"Kubernetes//Pod/default/{name}"


def contents(response: discovery_pb2.DeltaDiscoveryResponse) -> tuple[dict[str, str], list[str]]:
    return {r.name: r.version for r in response.resources}, list(response.removed_resources)


def versions(*items: XdsResource) -> dict[str, str]:
    return {r.name: r.version for r in items}


async def until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll `condition` on the running loop until it is truthy; fail naming `what` after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := condition()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return result


@dataclass
class ControlPlane:
    source: MemorySource
    xds: XdsServer
    server: grpc.aio.Server
    port: int
    task: asyncio.Task[None]
    outcomes: list[tuple[str, RequestOutcome]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.server.stop(None)

    async def published(self) -> None:
        """Wait until the debounced push of every source change so far has happened."""
        await until(lambda: self.xds.published_generation == self.source.generation, "the debounced push")

    async def outcome(self, node: str, kind: RequestKind, type_url: str = ADDR, nonce: str | None = None
                      ) -> RequestOutcome:
        def found() -> RequestOutcome | None:
            for who, outcome in self.outcomes:
                if who == node and outcome.kind is kind and outcome.type_url == type_url and \
                        nonce in (None, outcome.nonce):
                    return outcome
            return None
        return await until(found, f"{kind} of {type_url} {nonce or ''} from {node}")  # type: ignore[no-any-return]


async def start_control_plane(source: MemorySource, port: int = 0, debounce: float = 0.02,
                              authenticate: Any = None) -> ControlPlane:
    outcomes: list[tuple[str, RequestOutcome]] = []
    xds = XdsServer(source, ServerConfig(debounce_after=debounce), authenticate=authenticate,
                    on_request=lambda node, outcome: outcomes.append((node, outcome)))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    xds.add_to_server(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    task = asyncio.create_task(xds.run(), name="xds-debounce")
    return ControlPlane(source, xds, server, bound, task, outcomes)


class RawStream:
    """A hand-driven DeltaAggregatedResources stream: what a ztunnel would send, one message at a time."""

    def __init__(self, address: str, node_id: str, metadata: Iterable[tuple[str, str]] = ()) -> None:
        self.node_id = node_id
        self.channel = grpc.aio.insecure_channel(address)
        stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.call = stub.DeltaAggregatedResources(metadata=tuple(metadata))

    async def subscribe(self, type_url: str, initial: Mapping[str, str] | None = None) -> None:
        await self.call.write(discovery_pb2.DeltaDiscoveryRequest(
            node=discovery_pb2.Node(id=self.node_id), type_url=type_url, initial_resource_versions=initial or {}))

    async def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url,
                                                                  response_nonce=response.nonce))

    async def nack(self, response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> None:
        await self.call.write(discovery_pb2.DeltaDiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce,
            error_detail=discovery_pb2.Status(code=3, message=message)))

    async def recv(self) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse), f"stream ended: {response!r}"
        return response

    async def initial(self, initial: Mapping[str, Mapping[str, str]] | None = None
                      ) -> dict[str, discovery_pb2.DeltaDiscoveryResponse]:
        """Subscribe to both types (wildcard) and return the first response of each, ACKed."""
        for type_url in (ADDR, AUTHZ):
            await self.subscribe(type_url, (initial or {}).get(type_url))
        first: dict[str, discovery_pb2.DeltaDiscoveryResponse] = {}
        while len(first) < 2:
            response = await self.recv()
            assert response.type_url not in first, "two responses for one type before the other's first"
            first[response.type_url] = response
            await self.ack(response)
        return first

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@pytest.fixture
async def source() -> MemorySource:
    source = MemorySource()
    source.replace(ADDR, [pod("a", 1), pod("b", 2), service("web", 1)])
    source.replace(AUTHZ, [policy("allow-web")])
    return source


@pytest.fixture
async def control_plane(source: MemorySource) -> AsyncIterator[ControlPlane]:
    plane = await start_control_plane(source)
    yield plane
    await plane.stop()


@pytest.fixture
async def streams(control_plane: ControlPlane) -> AsyncIterator[Callable[[str], RawStream]]:
    opened: list[RawStream] = []

    def open_stream(node_id: str = NODE_1) -> RawStream:
        opened.append(RawStream(control_plane.address, node_id))
        return opened[-1]

    yield open_stream
    for stream in opened:
        await stream.close()


@pytest.fixture
async def run_client(control_plane: ControlPlane) -> AsyncIterator[Callable[..., Awaitable[XdsClient]]]:
    tasks: list[asyncio.Task[None]] = []

    async def start(node_id: str = NODE_1, address: str | None = None, **kwargs: Any) -> XdsClient:
        client = XdsClient(ClientConfig(address or control_plane.address, node_id, **kwargs), WorkloadStore())
        tasks.append(asyncio.create_task(client.run(), name=f"xds-client-{node_id}"))
        return client

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the server, driven by hand --

async def test_initial_wildcard_response_has_every_resource_of_both_types(
        control_plane: ControlPlane, streams: Callable[[str], RawStream]) -> None:
    first = await streams(NODE_1).initial()
    assert contents(first[ADDR]) == (versions(pod("a", 1), pod("b", 2), service("web", 1)), [])
    assert contents(first[AUTHZ]) == (versions(policy("allow-web")), [])
    assert first[ADDR].resources[0].resource.type_url == ADDR


async def test_empty_type_still_gets_a_first_response(control_plane: ControlPlane,
                                                      streams: Callable[[str], RawStream]) -> None:
    control_plane.source.replace(AUTHZ, [])
    await control_plane.published()
    first = await streams(NODE_1).initial()
    assert contents(first[AUTHZ]) == ({}, [])


async def test_incremental_add_update_remove_after_a_source_change(
        control_plane: ControlPlane, streams: Callable[[str], RawStream]) -> None:
    stream = streams(NODE_1)
    await stream.initial()
    a2, c = pod("a", 1, revision="v2"), pod("c", 3)
    control_plane.source.update(ADDR, [a2, c], removals=[uid("b")])
    update = await stream.recv()
    assert update.type_url == ADDR and contents(update) == (versions(a2, c), [uid("b")])
    await stream.ack(update)

    deny = policy("deny-all", authorization_pb2.DENY)
    control_plane.source.update(AUTHZ, [deny], removals=["default/allow-web"])
    update = await stream.recv()
    assert update.type_url == AUTHZ and contents(update) == (versions(deny), ["default/allow-web"])


async def test_burst_of_changes_is_debounced_into_one_push(source: MemorySource,
                                                           streams: Callable[[str], RawStream]) -> None:
    plane = await start_control_plane(source, debounce=0.2)
    try:
        stream = RawStream(plane.address, NODE_1)
        await stream.initial()
        for revision in range(20):
            source.update(ADDR, [pod("a", 1, revision=str(revision))])
            await asyncio.sleep(0)  # let the server see each change
        update = await stream.recv()
        # Without the debounce the first push would carry one of the first revisions.
        assert contents(update) == (versions(pod("a", 1, revision="19")), [])
        await stream.close()
    finally:
        await plane.stop()


async def test_ack_advances_the_clients_acked_versions(control_plane: ControlPlane,
                                                       streams: Callable[[str], RawStream]) -> None:
    stream = streams(NODE_1)
    await stream.initial()
    await control_plane.outcome(NODE_1, RequestKind.ACK, AUTHZ)
    await until(lambda: control_plane.xds.clients()[0].acked[ADDR], "the first ACK")
    [client] = control_plane.xds.clients()
    assert client.node_id == NODE_1 and client.acked[ADDR][uid("a")] == pod("a", 1).version

    a2 = pod("a", 1, revision="v2")
    control_plane.source.update(ADDR, [a2])
    update = await stream.recv()
    assert control_plane.xds.clients()[0].acked[ADDR][uid("a")] == pod("a", 1).version  # sent, not yet ACKed
    await stream.ack(update)
    await control_plane.outcome(NODE_1, RequestKind.ACK, ADDR, update.nonce)
    assert control_plane.xds.clients()[0].acked[ADDR][uid("a")] == a2.version


async def test_nacked_resource_is_not_resent_until_it_changes_and_others_still_flow(
        control_plane: ControlPlane, streams: Callable[[str], RawStream], caplog: pytest.LogCaptureFixture) -> None:
    stream = streams(NODE_1)
    await stream.initial()
    bad = pod("a", 1, revision="broken")
    control_plane.source.update(ADDR, [bad])
    update = await stream.recv()
    assert contents(update) == (versions(bad), [])
    await stream.nack(update, f"{uid('a')}: unsupported field")
    nack = await control_plane.outcome(NODE_1, RequestKind.NACK, ADDR, update.nonce)
    assert nack.error == f"{uid('a')}: unsupported field"
    assert f"NACKed Address response {update.nonce}" in caplog.text
    assert control_plane.xds.clients()[0].nacked[ADDR] == {uid("a"): bad.version}

    b2 = pod("b", 2, revision="v2")
    control_plane.source.update(ADDR, [bad, b2])
    update = await stream.recv()
    assert contents(update) == (versions(b2), [])  # b flows, the NACKed a is not offered again
    await stream.ack(update)

    fixed = pod("a", 1, revision="fixed")
    control_plane.source.update(ADDR, [fixed])
    update = await stream.recv()
    assert contents(update) == (versions(fixed), [])


async def test_reconnect_with_initial_versions_sends_no_duplicates_and_removes_what_was_deleted(
        control_plane: ControlPlane, streams: Callable[[str], RawStream]) -> None:
    first = await streams(NODE_1).initial()
    held = {type_url: contents(response)[0] for type_url, response in first.items()}

    # While the client is away: a changes, b goes, c arrives, web and the policy stay as they were.
    a2, c = pod("a", 1, revision="v2"), pod("c", 3)
    control_plane.source.update(ADDR, [a2, c], removals=[uid("b")])
    await control_plane.published()
    again = await streams(NODE_1).initial(held)
    assert contents(again[ADDR]) == (versions(a2, c), [uid("b")])
    assert contents(again[AUTHZ]) == ({}, [])


async def test_two_clients_with_different_states_each_get_what_they_need(
        control_plane: ControlPlane, streams: Callable[[str], RawStream]) -> None:
    a, b, web = pod("a", 1), pod("b", 2), service("web", 1)
    fresh = await streams(NODE_1).initial()
    behind = await streams(NODE_2).initial({
        ADDR: {a.name: a.version, b.name: "an-old-version", uid("gone"): "1"},
        AUTHZ: versions(policy("allow-web")),
    })
    assert contents(fresh[ADDR]) == (versions(a, b, web), [])
    assert contents(behind[ADDR]) == (versions(b, web), [uid("gone")])
    assert contents(fresh[AUTHZ]) == (versions(policy("allow-web")), [])
    assert contents(behind[AUTHZ]) == ({}, [])


async def test_a_client_that_never_acks_or_reads_does_not_block_others(
        control_plane: ControlPlane, streams: Callable[[str], RawStream],
        run_client: Callable[..., Awaitable[XdsClient]]) -> None:
    stuck = streams(NODE_2)
    for type_url in (ADDR, AUTHZ):
        await stuck.subscribe(type_url)  # ...and then never reads nor ACKs anything
    await until(lambda: len(control_plane.xds.clients()) == 1, "the stuck client to connect")
    client = await run_client(NODE_1)
    await asyncio.wait_for(client.ready.wait(), TIMEOUT)

    # 40 pushes of ~512 KiB each: far beyond what HTTP/2 flow control lets the stuck stream buffer.
    async def reaches_healthy_client(revision: str) -> None:
        await until(lambda: client.store.snapshot.workloads[uid("a")].canonical_revision == revision,
                    f"revision {revision} to reach the healthy client")

    for revision in map(str, range(40)):
        control_plane.source.update(ADDR, [pod("a", 1, revision=revision, padding=512 * 1024)])
        await reaches_healthy_client(revision)
    pushes = {c.node_id: c.pushes for c in control_plane.xds.clients()}
    assert pushes[NODE_2] < 20 < pushes[NODE_1], f"the stuck stream was not held up by flow control: {pushes}"


async def test_protocol_errors_close_the_stream_with_a_clear_status(
        control_plane: ControlPlane, streams: Callable[[str], RawStream]) -> None:
    stream = streams("")
    await stream.subscribe(ADDR)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.recv()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "has no node id" in (caught.value.details() or "")

    stream = streams(NODE_1)
    await stream.subscribe("type.googleapis.com/envoy.config.listener.v3.Listener")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.recv()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "subscribe to type.googleapis.com/istio.workload.Address" in (caught.value.details() or "")


async def test_auth_hook_sees_token_and_cluster_id_and_refuses_strangers(source: MemorySource) -> None:
    seen: list[CallMetadata] = []
    check = static_token_authenticator("s3cret")

    async def authenticate(call: CallMetadata) -> str:
        seen.append(call)
        return await check(call)

    plane = await start_control_plane(source, authenticate=authenticate)
    stranger = RawStream(plane.address, NODE_2, metadata=[("authorization", "Bearer wrong")])
    client = XdsClient(ClientConfig(plane.address, NODE_1, cluster_id="cluster-7", token="s3cret"), WorkloadStore())
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.ready.wait(), TIMEOUT)
        assert any(c.token == "s3cret" and c.cluster_id == "cluster-7" for c in seen)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stranger.recv()
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (caught.value.details() or "")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stranger.close()
        await plane.stop()


# -- the client library --

async def test_client_keeps_retrying_when_refused_and_rereads_its_token_file(
        source: MemorySource, tmp_path: Path) -> None:
    token_file = tmp_path / "istio-token"
    token_file.write_text("expired\n")
    refused: list[str | None] = []
    check = static_token_authenticator("rotated")

    async def authenticate(call: CallMetadata) -> str:
        try:
            return await check(call)
        except XdsAuthError:
            refused.append(call.token)
            raise

    plane = await start_control_plane(source, authenticate=authenticate)
    client = XdsClient(ClientConfig(plane.address, NODE_1, token_file=token_file), WorkloadStore())
    task = asyncio.create_task(client.run())
    try:
        await until(lambda: len(refused) >= 2, "two refused attempts")
        assert refused[0] == "expired" and not client.ready.is_set() and not task.done()
        token_file.write_text("rotated\n")
        await asyncio.wait_for(client.ready.wait(), TIMEOUT)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await plane.stop()


async def test_client_fills_the_store_and_nacks_what_it_cannot_use(
        control_plane: ControlPlane, run_client: Callable[..., Awaitable[XdsClient]]) -> None:
    broken = address_resource(workload_pb2.Workload(uid=uid("broken"), addresses=[b"\x0a\x00\x00"]))
    control_plane.source.update(ADDR, [broken])
    client = await run_client(NODE_1)
    await asyncio.wait_for(client.ready.wait(), TIMEOUT)
    snapshot = client.store.snapshot
    assert snapshot.workload_by_ip("10.244.1.2").name == "b"  # type: ignore[union-attr]
    assert snapshot.service_by_vip("10.96.0.1").name == "web"  # type: ignore[union-attr]
    assert list(snapshot.authorizations) == ["default/allow-web"]
    assert uid("broken") not in snapshot.workloads
    nack = await control_plane.outcome(NODE_1, RequestKind.NACK, ADDR)
    assert f"{uid('broken')}: a workload address is 3 bytes" in nack.error

    control_plane.source.update(ADDR, [pod("d", 4)], removals=[uid("a")])
    await until(lambda: client.store.snapshot.workload_by_ip("10.244.1.4"), "the new pod in the store")
    assert uid("a") not in client.store.snapshot.workloads


def tls_material(dns_name: str) -> tuple[bytes, bytes, bytes]:
    """(root PEM, server chain PEM, server key PEM): a throwaway CA and a server cert for `dns_name`."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
                    ca: bool, san: str | None = None) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    root_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = certificate("test root", root_key, "test root", root_key, ca=True)
    leaf = certificate(dns_name, server_key, "test root", root_key, ca=False, san=dns_name)
    pem = serialization.Encoding.PEM
    key_pem = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return root.public_bytes(pem), leaf.public_bytes(pem), key_pem


async def test_client_over_tls_verifies_the_server_name(source: MemorySource,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    root, chain, key = tls_material("istiod.istio-system.svc")
    xds = XdsServer(source, ServerConfig(debounce_after=0.02))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    xds.add_to_server(server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    trusting = XdsClient(ClientConfig(f"127.0.0.1:{port}", NODE_1, root_cert=root,
                                      server_name="istiod.istio-system.svc"), WorkloadStore())
    wrong_name = XdsClient(ClientConfig(f"localhost:{port}", NODE_2, root_cert=root), WorkloadStore())
    tasks = [asyncio.create_task(trusting.run()), asyncio.create_task(wrong_name.run())]
    try:
        await asyncio.wait_for(trusting.ready.wait(), TIMEOUT)
        assert trusting.store.snapshot.service_by_vip("10.96.0.1") is not None
        # "localhost" is not the name in the certificate: the handshake fails and the client keeps retrying.
        await until(lambda: f"TLS with the control plane at localhost:{port} failed" in caplog.text,
                    "the wrong-name client to fail")
        assert not wrong_name.connected and [c.node_id for c in xds.clients()] == [NODE_1]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop(None)


async def test_client_is_ready_only_after_both_types_first_responses() -> None:
    release_authorizations = asyncio.Event()

    class SlowAuthorizations(discovery_pb2_grpc.AggregatedDiscoveryServiceServicer):
        async def DeltaAggregatedResources(self, requests: Any, context: Any) -> None:
            async for request in requests:
                if request.response_nonce:
                    continue
                if request.type_url == AUTHZ:
                    await release_authorizations.wait()
                response = discovery_pb2.DeltaDiscoveryResponse(type_url=request.type_url, nonce=request.type_url)
                if request.type_url == ADDR:
                    a = pod("a", 1)
                    response.resources.add(name=a.name, version=a.version, resource=a.body)
                await context.write(response)

    server = grpc.aio.server()
    discovery_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(  # type: ignore[no-untyped-call]
        SlowAuthorizations(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = XdsClient(ClientConfig(f"127.0.0.1:{port}", NODE_1), WorkloadStore())
    task = asyncio.create_task(client.run())
    try:
        await until(lambda: client.store.snapshot.workloads, "the Address response to be applied")
        assert not client.ready.is_set() and client.state.waiting_for == (AUTHZ,)
        release_authorizations.set()
        await asyncio.wait_for(client.ready.wait(), TIMEOUT)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(None)


async def test_client_reconnects_after_a_server_restart_and_converges(source: MemorySource) -> None:
    plane = await start_control_plane(source)
    client = XdsClient(ClientConfig(plane.address, NODE_1), WorkloadStore())
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.ready.wait(), TIMEOUT)
        await plane.stop()
        await until(lambda: not client.connected, "the client to notice the server went away")

        source.update(ADDR, [pod("c", 3)], removals=[uid("a")])
        source.update(AUTHZ, [policy("deny-all", authorization_pb2.DENY)])
        plane = await start_control_plane(source, port=plane.port)
        await until(lambda: client.connected, "the client to reconnect")
        await until(lambda: set(client.store.snapshot.workloads) == {uid("b"), uid("c")} and
                    len(client.store.snapshot.authorizations) == 2, "the client to converge")
        # It re-subscribed with what it held: the new server sent only the differences.
        acks = [o for _, o in plane.outcomes if o.kind is RequestKind.ACK and o.type_url == ADDR]
        assert acks[0].versions == versions(pod("c", 3)) and acks[0].removed == (uid("a"),)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await plane.stop()
