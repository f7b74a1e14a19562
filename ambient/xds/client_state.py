"""Sans-IO core of the delta xDS client (PROTOCOLS.md §5), as ztunnel runs it.

`start_stream()` gives the requests that open a stream: a wildcard subscription per type, carrying the
node id and the versions already held (`initial_resource_versions`) so that a reconnect is not a full
resync. `on_response(response)` decodes and validates each resource and returns the `StoreChanges` to
apply through the store's single mutator plus the ACK — or, when any resource failed to decode or a
decoder refused it, a NACK whose `error_detail` names them; the good ones are applied either way. The
client is ready once the first response of every type has been handled.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from ambient.proto import authorization_pb2, discovery_pb2, workload_pb2
from ambient.xds.errors import ResourceRejected
from ambient.xds.store import StoreChanges
from ambient.xds.types import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    TYPE_URLS,
    authorization_resource_name,
    service_resource_name,
)

NACK_CODE = 3  # google.rpc.Code.INVALID_ARGUMENT: the resource, not the transport, is at fault
MAX_NACK_MESSAGE = 4096  # keep error_detail readable in logs when many resources fail

# Turns one resource body into its message; raises ResourceRejected to NACK it.
Decoder = Callable[[str, any_pb2.Any], Message]


def _unpack(body: any_pb2.Any, message: Message, type_url: str) -> None:
    if body.type_url != type_url:
        raise ResourceRejected(f"carries {body.type_url or 'no body'}, expected {type_url}")
    try:
        message.ParseFromString(body.value)
    except DecodeError as exc:
        raise ResourceRejected(f"cannot decode {type_url.rsplit('/', 1)[-1]}: {exc}") from None


def _check_ip(raw: bytes, what: str) -> None:
    if len(raw) not in (4, 16):
        raise ResourceRejected(f"{what} is {len(raw)} bytes, expected 4 (IPv4) or 16 (IPv6)")


def decode_address(name: str, body: any_pb2.Any) -> workload_pb2.Address:
    address = workload_pb2.Address()
    _unpack(body, address, ADDRESS_TYPE_URL)
    kind = address.WhichOneof("type")
    if kind == "workload":
        workload = address.workload
        if workload.uid != name:
            raise ResourceRejected(f"workload uid {workload.uid!r} differs from the resource name")
        for raw in workload.addresses:
            _check_ip(raw, "a workload address")
    elif kind == "service":
        service = address.service
        if not service.hostname or service_resource_name(service) != name:
            raise ResourceRejected(f"service {service_resource_name(service)!r} differs from the resource name")
        for vip in service.addresses:
            _check_ip(vip.address, "a service address")
    else:
        raise ResourceRejected("Address holds neither a workload nor a service")
    return address


def decode_authorization(name: str, body: any_pb2.Any) -> authorization_pb2.Authorization:
    policy = authorization_pb2.Authorization()
    _unpack(body, policy, AUTHORIZATION_TYPE_URL)
    if authorization_resource_name(policy) != name:
        raise ResourceRejected(f"policy {authorization_resource_name(policy)!r} differs from the resource name")
    for rule in policy.rules:
        for clause in rule.clauses:
            for match in clause.matches:
                for cidr in (*match.source_ips, *match.not_source_ips, *match.destination_ips,
                             *match.not_destination_ips):
                    _check_ip(cidr.address, "an address match")
                    if cidr.length > len(cidr.address) * 8:
                        raise ResourceRejected(f"prefix length {cidr.length} is too long for "
                                               f"{ipaddress.ip_address(cidr.address)}")
    return policy


DEFAULT_DECODERS: Mapping[str, Decoder] = {
    ADDRESS_TYPE_URL: decode_address,
    AUTHORIZATION_TYPE_URL: decode_authorization,
}


@dataclass(frozen=True)
class ResponseResult:
    changes: StoreChanges  # apply these first,
    request: discovery_pb2.DeltaDiscoveryRequest  # then send this ACK or NACK
    rejected: Mapping[str, str] = field(default_factory=dict)  # name → reason
    became_ready: bool = False

    @property
    def is_nack(self) -> bool:
        return bool(self.request.HasField("error_detail"))


class DeltaClientState:
    """What the client holds across streams: versions per resource, and readiness."""

    def __init__(self, node_id: str, *, node_metadata: Mapping[str, str] | None = None,
                 types: tuple[str, ...] = TYPE_URLS, decoders: Mapping[str, Decoder] | None = None) -> None:
        self.node_id = node_id
        self.node_metadata = dict(node_metadata or {})
        self.types = types
        self.decoders = {**DEFAULT_DECODERS, **(decoders or {})}
        missing = [t for t in types if t not in self.decoders]
        if missing:
            raise ValueError(f"no decoder for {missing}")
        self._versions: dict[str, dict[str, str]] = {t: {} for t in types}
        self._answered: set[str] = set()

    @property
    def ready(self) -> bool:
        return self._answered.issuperset(self.types)

    @property
    def waiting_for(self) -> tuple[str, ...]:
        """Types whose first response has not arrived yet."""
        return tuple(t for t in self.types if t not in self._answered)

    def versions(self, type_url: str) -> Mapping[str, str]:
        return dict(self._versions[type_url])

    def start_stream(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        node = discovery_pb2.Node(id=self.node_id)
        if self.node_metadata:
            node.metadata.update(self.node_metadata)
        return [discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=type_url,
                                                    initial_resource_versions=self._versions[type_url])
                for type_url in self.types]

    def on_response(self, response: discovery_pb2.DeltaDiscoveryResponse) -> ResponseResult:
        type_url = response.type_url
        if type_url not in self._versions:
            return ResponseResult(StoreChanges(), self._nack(response, f"type_url {type_url!r} was not requested"))
        held = self._versions[type_url]
        decoded: dict[str, Message] = {}
        versions: dict[str, str] = {}
        rejected: dict[str, str] = {}
        for resource in response.resources:
            if held.get(resource.name) == resource.version:
                continue  # already applied at this version
            try:
                decoded[resource.name] = self._decode(type_url, resource)
                versions[resource.name] = resource.version
            except ResourceRejected as exc:
                rejected[resource.name] = str(exc)
        removed = tuple(name for name in response.removed_resources if name in held)
        for name in removed:
            del held[name]
        held.update(versions)
        changes = _changes(type_url, decoded, removed)
        was_ready = self.ready
        self._answered.add(type_url)
        became_ready = self.ready and not was_ready
        if rejected:
            summary = "; ".join(f"{name}: {reason}" for name, reason in sorted(rejected.items()))
            message = f"rejected {len(rejected)} of {len(response.resources)} resources: {summary}"
            return ResponseResult(changes, self._nack(response, message[:MAX_NACK_MESSAGE]), rejected, became_ready)
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        return ResponseResult(changes, ack, {}, became_ready)

    def _decode(self, type_url: str, resource: discovery_pb2.Resource) -> Message:
        if not resource.HasField("resource"):
            raise ResourceRejected("resource has no body")
        return self.decoders[type_url](resource.name, resource.resource)

    @staticmethod
    def _nack(response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> discovery_pb2.DeltaDiscoveryRequest:
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce,
            error_detail=discovery_pb2.Status(code=NACK_CODE, message=message))


def _changes(type_url: str, decoded: Mapping[str, Message], removed: tuple[str, ...]) -> StoreChanges:
    if type_url == ADDRESS_TYPE_URL:
        workloads = {n: a.workload for n, a in decoded.items()
                     if isinstance(a, workload_pb2.Address) and a.HasField("workload")}
        services = {n: a.service for n, a in decoded.items()
                    if isinstance(a, workload_pb2.Address) and a.HasField("service")}
        return StoreChanges(workloads=workloads, services=services, removed_addresses=removed)
    if type_url == AUTHORIZATION_TYPE_URL:
        policies = {n: p for n, p in decoded.items() if isinstance(p, authorization_pb2.Authorization)}
        return StoreChanges(authorizations=policies, removed_authorizations=removed)
    return StoreChanges()
