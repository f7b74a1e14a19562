"""ZDS, the node agent ⇄ ztunnel protocol (PROTOCOLS.md §4), without any I/O.

Message encoding/decoding and the per-connection state machines of both ends, as transition tables:
`ServerConnection` is the node agent's side (it sends the snapshot, adds and deletes and expects one
response to each), `ClientConnection` is ztunnel's side (it says hello and answers every request).
Callers feed received datagrams in (bytes, how many fds rode along, whether the kernel truncated it) and
get decoded events or bytes to send back. Sockets, fds and timers live in `cni.zds_server` and
`cni.zds_client`; this module must not touch them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError

from ambient.proto import zds_pb2 as pb

DEFAULT_SOCKET_PATH = "/var/run/ztunnel/ztunnel.sock"  # istio-cni's and ztunnel's default
MAX_MESSAGE_SIZE = 1024  # both ends read into a 1024-byte buffer and reject anything longer
VERSION_V1 = pb.V1


class ZdsError(Exception):
    """A ZDS operation failed. `reason` is stable (log field, metric label): no_ztunnel, nack, timeout,
    disconnected, closed, netns, snapshot, too_large, state, socket_path, or a `ZdsProtocolError` reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ZdsProtocolError(ZdsError):
    """The peer broke the protocol (garbage, truncation, wrong fds, message out of order): the connection
    cannot be trusted any more. Reasons: malformed, truncated, fds, version, unexpected_message."""


class Kind(enum.Enum):
    """What can happen on a connection; the direction is implied by the side."""

    HELLO = "hello"
    ADD = "add"
    KEEP = "keep"
    DEL = "del"
    SNAPSHOT_SENT = "snapshot_sent"
    RESPONSE = "response"


class WorkloadInfoLike(Protocol):
    """What an add carries about the pod: `WorkloadInfo` below or a generated `zds_pb2.WorkloadInfo`."""

    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def service_account(self) -> str: ...


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class AddWorkload:
    kind: ClassVar[Kind] = Kind.ADD
    uid: str
    info: WorkloadInfoLike | None


@dataclass(frozen=True)
class KeepWorkload:
    kind: ClassVar[Kind] = Kind.KEEP
    uid: str


@dataclass(frozen=True)
class DelWorkload:
    kind: ClassVar[Kind] = Kind.DEL
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    kind: ClassVar[Kind] = Kind.SNAPSHOT_SENT


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


@dataclass(frozen=True)
class Hello:
    version: int


@dataclass(frozen=True)
class Response:
    """ztunnel's answer to `request`; an empty `error` is an ack, anything else a NACK."""

    request: Request
    error: str

    @property
    def ok(self) -> bool:
        return not self.error


# --- encoding ---------------------------------------------------------------------------------------


def _checked(data: bytes, what: str) -> bytes:
    if len(data) > MAX_MESSAGE_SIZE:
        raise ZdsError("too_large", f"ZDS {what} is {len(data)} bytes; the peer reads at most {MAX_MESSAGE_SIZE}")
    return data


def encode_hello() -> bytes:
    return bytes(pb.ZdsHello(version=pb.V1).SerializeToString())


def encode_request(request: Request) -> bytes:
    if isinstance(request, AddWorkload):
        add = pb.AddWorkload(uid=request.uid)
        if request.info is not None:
            add.workload_info.CopyFrom(pb.WorkloadInfo(name=request.info.name, namespace=request.info.namespace,
                                                       service_account=request.info.service_account))
        msg = pb.WorkloadRequest(add=add)
    elif isinstance(request, KeepWorkload):
        msg = pb.WorkloadRequest(keep=pb.KeepWorkload(uid=request.uid))
    elif isinstance(request, DelWorkload):
        msg = pb.WorkloadRequest(**{"del": pb.DelWorkload(uid=request.uid)})
    else:
        msg = pb.WorkloadRequest(snapshot_sent=pb.SnapshotSent())
    return _checked(msg.SerializeToString(), f"{request.kind.value} request")


def encode_response(error: str = "") -> bytes:
    return _checked(pb.WorkloadResponse(ack=pb.Ack(error=error)).SerializeToString(), "response")


# --- decoding (untrusted input: only ZdsProtocolError escapes) --------------------------------------


def _parse(message: pb.ZdsHello | pb.WorkloadRequest | pb.WorkloadResponse, data: bytes) -> None:
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise ZdsProtocolError("malformed", f"not a ZDS {type(message).__name__}: {e}") from None


def decode_hello(data: bytes) -> int:
    hello = pb.ZdsHello()
    _parse(hello, data)
    if hello.version != VERSION_V1:
        raise ZdsProtocolError("version", f"ZdsHello carries version {int(hello.version)}; this agent speaks V1 (1)")
    return int(hello.version)


def decode_request(data: bytes) -> Request:
    msg = pb.WorkloadRequest()
    _parse(msg, data)
    payload = msg.WhichOneof("payload")
    if payload == "add":
        info = None
        if msg.add.HasField("workload_info"):
            wi = msg.add.workload_info
            info = WorkloadInfo(wi.name, wi.namespace, wi.service_account)
        return AddWorkload(msg.add.uid, info)
    if payload == "keep":
        return KeepWorkload(msg.keep.uid)
    if payload == "del":
        return DelWorkload(getattr(msg, "del").uid)
    if payload == "snapshot_sent":
        return SnapshotSent()
    raise ZdsProtocolError("malformed", "WorkloadRequest has no payload")


def decode_response(data: bytes) -> str:
    """The NACK text of a WorkloadResponse ("" for an ack)."""
    msg = pb.WorkloadResponse()
    _parse(msg, data)
    if msg.WhichOneof("payload") != "ack":
        raise ZdsProtocolError("malformed", "not a WorkloadResponse: it carries no ack")
    return msg.ack.error


# --- state machines ---------------------------------------------------------------------------------


class ServerState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    SNAPSHOT = "snapshot"  # hello received, sending adds/keeps, none outstanding
    SNAPSHOT_PENDING = "snapshot_pending"  # an add/keep awaits its response
    SNAPSHOT_SENT_PENDING = "snapshot_sent_pending"
    READY = "ready"  # snapshot done: only add/del from now on
    READY_PENDING = "ready_pending"
    CLOSED = "closed"


class ClientState(enum.Enum):
    CONNECTED = "connected"  # hello not yet sent
    SNAPSHOT = "snapshot"
    SNAPSHOT_REPLY = "snapshot_reply"  # a snapshot request awaits our response
    SNAPSHOT_SENT_REPLY = "snapshot_sent_reply"
    READY = "ready"
    READY_REPLY = "ready_reply"
    FAILED = "failed"  # the last request was invalid: NACK it, then disconnect (as ztunnel does)
    CLOSED = "closed"


# One request outstanding at a time: responses carry no correlation id, only their order.
SERVER_TRANSITIONS: Mapping[tuple[ServerState, Kind], ServerState] = {
    (ServerState.AWAIT_HELLO, Kind.HELLO): ServerState.SNAPSHOT,
    (ServerState.SNAPSHOT, Kind.ADD): ServerState.SNAPSHOT_PENDING,
    (ServerState.SNAPSHOT, Kind.KEEP): ServerState.SNAPSHOT_PENDING,
    (ServerState.SNAPSHOT_PENDING, Kind.RESPONSE): ServerState.SNAPSHOT,
    (ServerState.SNAPSHOT, Kind.SNAPSHOT_SENT): ServerState.SNAPSHOT_SENT_PENDING,
    (ServerState.SNAPSHOT_SENT_PENDING, Kind.RESPONSE): ServerState.READY,
    (ServerState.READY, Kind.ADD): ServerState.READY_PENDING,
    (ServerState.READY, Kind.DEL): ServerState.READY_PENDING,
    (ServerState.READY_PENDING, Kind.RESPONSE): ServerState.READY,
}

# ztunnel accepts a delete at any time after hello; keep and snapshot_sent only during the snapshot.
CLIENT_TRANSITIONS: Mapping[tuple[ClientState, Kind], ClientState] = {
    (ClientState.CONNECTED, Kind.HELLO): ClientState.SNAPSHOT,
    (ClientState.SNAPSHOT, Kind.ADD): ClientState.SNAPSHOT_REPLY,
    (ClientState.SNAPSHOT, Kind.KEEP): ClientState.SNAPSHOT_REPLY,
    (ClientState.SNAPSHOT, Kind.DEL): ClientState.SNAPSHOT_REPLY,
    (ClientState.SNAPSHOT_REPLY, Kind.RESPONSE): ClientState.SNAPSHOT,
    (ClientState.SNAPSHOT, Kind.SNAPSHOT_SENT): ClientState.SNAPSHOT_SENT_REPLY,
    (ClientState.SNAPSHOT_SENT_REPLY, Kind.RESPONSE): ClientState.READY,
    (ClientState.READY, Kind.ADD): ClientState.READY_REPLY,
    (ClientState.READY, Kind.DEL): ClientState.READY_REPLY,
    (ClientState.READY_REPLY, Kind.RESPONSE): ClientState.READY,
    (ClientState.FAILED, Kind.RESPONSE): ClientState.CLOSED,
}

S = TypeVar("S", ServerState, ClientState)


class _Machine(Generic[S]):
    def __init__(self, initial: S, table: Mapping[tuple[S, Kind], S], closed: S) -> None:
        self.state: S = initial
        self._table: Mapping[tuple[S, Kind], S] = table
        self._closed: S = closed

    def _next(self, kind: Kind) -> S | None:
        following: S | None = self._table.get((self.state, kind))
        return following

    def _advance(self, kind: Kind) -> None:
        following = self._next(kind)
        if following is None:
            raise ZdsError("state", f"ZDS {kind.value} not allowed in state {self.state.value}")
        self.state = following

    def close(self) -> None:
        self.state = self._closed

    @property
    def closed(self) -> bool:
        return self.state is self._closed


def _check_datagram(truncated: bool, peer: str) -> None:
    if truncated:
        raise ZdsProtocolError("truncated", f"{peer} sent a truncated message (more than {MAX_MESSAGE_SIZE} bytes "
                                            "or more file descriptors than expected)")


class ServerConnection(_Machine[ServerState]):
    """The node agent's end of one ztunnel connection."""

    def __init__(self) -> None:
        super().__init__(ServerState.AWAIT_HELLO, SERVER_TRANSITIONS, ServerState.CLOSED)
        self.pending: Request | None = None

    @property
    def snapshot_done(self) -> bool:
        return self.state in (ServerState.READY, ServerState.READY_PENDING)

    def can_send(self, kind: Kind) -> bool:
        return self._next(kind) is not None

    def send(self, request: Request) -> bytes:
        """Bytes for `request`; the caller sends them (an add with exactly one netns fd)."""
        data = encode_request(request)
        self._advance(request.kind)
        self.pending = request
        return data

    def receive(self, data: bytes, *, fds: int = 0, truncated: bool = False) -> Hello | Response:
        """Decode a datagram from ztunnel. Any ZdsProtocolError closes the connection."""
        try:
            event = self._decode(data, fds, truncated)
        except ZdsProtocolError:
            self.close()
            raise
        if isinstance(event, Hello):
            self._advance(Kind.HELLO)
            return event
        request, self.pending = self.pending, None
        assert request is not None  # _decode only decodes a response while one is pending
        self._advance(Kind.RESPONSE)
        return Response(request, event)

    def _decode(self, data: bytes, fds: int, truncated: bool) -> Hello | str:
        _check_datagram(truncated, "ztunnel")
        if fds:
            raise ZdsProtocolError("fds", f"ztunnel sent {fds} file descriptor(s); it never sends any")
        if self.state is ServerState.AWAIT_HELLO:
            return Hello(decode_hello(data))
        if self.pending is None:
            raise ZdsProtocolError("unexpected_message", f"ztunnel sent a message in state {self.state.value} "
                                                         "while no request was outstanding")
        return decode_response(data)


class ClientConnection(_Machine[ClientState]):
    """ztunnel's end of the connection: hello, then one response per request. Error texts are ztunnel's."""

    def __init__(self) -> None:
        super().__init__(ClientState.CONNECTED, CLIENT_TRANSITIONS, ClientState.CLOSED)

    @property
    def snapshot_done(self) -> bool:
        return self.state in (ClientState.READY, ClientState.READY_REPLY)

    def hello(self) -> bytes:
        self._advance(Kind.HELLO)
        return encode_hello()

    def receive(self, data: bytes, *, fds: int = 0, truncated: bool = False) -> Request:
        """Decode a request. On ZdsProtocolError the caller NACKs with its text, then disconnects."""
        try:
            request, following = self._decode(data, fds, truncated)
        except ZdsProtocolError:
            self.state = ClientState.FAILED
            raise
        self.state = following
        return request

    def _decode(self, data: bytes, fds: int, truncated: bool) -> tuple[Request, ClientState]:
        _check_datagram(truncated, "node agent")
        if fds > 1:
            raise ZdsProtocolError("fds", f"Expected 1 FD, got {fds}")
        request = decode_request(data)
        if request.kind is Kind.ADD and fds == 0:
            raise ZdsProtocolError("fds", "No control message")
        if request.kind is not Kind.ADD and fds:
            raise ZdsProtocolError("fds", "Unexpected control message")
        following = self._next(request.kind)
        if following is None:
            raise ZdsProtocolError("unexpected_message", f"{request.kind.value} received in state {self.state.value}")
        return request, following

    def respond(self, error: str = "") -> bytes:
        self._advance(Kind.RESPONSE)
        return encode_response(error)
