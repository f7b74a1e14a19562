"""Sans-IO bookkeeping of one delta xDS stream on the server side (PROTOCOLS.md §5).

`DeltaStream.receive(request)` classifies each `DeltaDiscoveryRequest` (subscribe, ACK, NACK, ...) and
updates the stream's subscriptions and per-resource versions; `next_response(type_url, resources)` diffs
the current resource set against what this client has and returns the `DeltaDiscoveryResponse` to send,
or None. No sockets, clocks or tasks here: the gRPC shell in `server.py` drives it.

Rules (the delta xDS protocol as Envoy, ztunnel and istiod use it):
- The first request of a type subscribes: an empty `resource_names_subscribe` (or `*`) means wildcard;
  its `initial_resource_versions` say what the client already has (after a reconnect), so those are not
  sent again, and names it has that no longer exist are sent as `removed_resources`.
- That first request is always answered, even with nothing in it, so that the client can become ready.
- ACK = `response_nonce` echoed; NACK = the same plus `error_detail`. A NACKed resource is remembered at
  its version and not sent again until its version changes; the rest keep flowing.
- Pushes do not wait for ACKs: each response is a diff against what was already sent, so a client that
  ACKs late (or never) still converges and holds up nobody.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ambient.proto import discovery_pb2
from ambient.xds.errors import XdsProtocolError
from ambient.xds.types import TYPE_URLS, XdsResource

WILDCARD = "*"
# Nonces kept waiting for an ACK per stream; older ones are forgotten (their ACK is then "stale").
MAX_PENDING_NONCES = 64


class RequestKind(enum.StrEnum):
    SUBSCRIBE = "subscribe"  # first request of a type on this stream
    ACK = "ack"
    NACK = "nack"
    UPDATE = "update"  # subscription change without a nonce
    STALE = "stale"  # ACK/NACK of a nonce this stream does not know (any longer)


@dataclass(frozen=True)
class RequestOutcome:
    type_url: str
    kind: RequestKind
    respond: bool  # this type owes the client a response: call next_response
    nonce: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)  # resources of the ACKed/NACKed response
    removed: tuple[str, ...] = ()  # removals in the ACKed/NACKed response
    error: str = ""  # the NACK's error_detail.message


@dataclass
class _Pending:
    type_url: str
    versions: dict[str, str]
    removed: tuple[str, ...]


@dataclass
class _TypeState:
    subscribed: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    unresolved: set[str] = field(default_factory=set)  # newly subscribed names not yet answered
    sent: dict[str, str] = field(default_factory=dict)  # what the client has (or was sent), name → version
    acked: dict[str, str] = field(default_factory=dict)
    nacked: dict[str, str] = field(default_factory=dict)
    owed: bool = False
    diffed: Mapping[str, XdsResource] | None = None  # the resource set of the last diff


class DeltaStream:
    """The server's view of one client stream."""

    def __init__(self, types: tuple[str, ...] = TYPE_URLS, *, nonce_prefix: str = "",
                 max_pending: int = MAX_PENDING_NONCES) -> None:
        self.types = types
        self.node_id = ""
        self._nonce_prefix = nonce_prefix
        self._next_nonce = 0
        self._max_pending = max_pending
        self._states = {type_url: _TypeState() for type_url in types}
        self._pending: dict[str, _Pending] = {}

    # -- views (for debugging and the control plane's config dump) --

    def subscribed(self, type_url: str) -> bool:
        state = self._states.get(type_url)
        return state is not None and state.subscribed

    def sent(self, type_url: str) -> Mapping[str, str]:
        return dict(self._states[type_url].sent)

    def acked(self, type_url: str) -> Mapping[str, str]:
        return dict(self._states[type_url].acked)

    def nacked(self, type_url: str) -> Mapping[str, str]:
        return dict(self._states[type_url].nacked)

    @property
    def pending_nonces(self) -> tuple[str, ...]:
        return tuple(self._pending)

    # -- input --

    def receive(self, request: discovery_pb2.DeltaDiscoveryRequest) -> RequestOutcome:
        if not self.node_id:
            if not request.node.id:
                raise XdsProtocolError(
                    "the first DeltaDiscoveryRequest has no node id; send node {id: "
                    "\"ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local\"}", reason="missing_node")
            self.node_id = request.node.id
        state = self._states.get(request.type_url)
        if state is None:
            raise XdsProtocolError(
                f"type_url {request.type_url!r} is not served here; subscribe to {' or '.join(self.types)}",
                reason="unsupported_type")
        if not state.subscribed:
            self._subscribe_first(state, request)
            return RequestOutcome(request.type_url, RequestKind.SUBSCRIBE, respond=True)
        respond = self._change_subscriptions(state, request)
        if not request.response_nonce:
            return RequestOutcome(request.type_url, RequestKind.UPDATE, respond=respond)
        pending = self._pending.get(request.response_nonce)
        if pending is None or pending.type_url != request.type_url:
            return RequestOutcome(request.type_url, RequestKind.STALE, respond=respond, nonce=request.response_nonce)
        del self._pending[request.response_nonce]
        if request.HasField("error_detail"):
            state.nacked.update(pending.versions)
            return RequestOutcome(request.type_url, RequestKind.NACK, respond=respond, nonce=request.response_nonce,
                                  versions=pending.versions, removed=pending.removed,
                                  error=request.error_detail.message)
        for name, version in pending.versions.items():
            state.acked[name] = version
            if state.nacked.get(name) != version:
                state.nacked.pop(name, None)
        for name in pending.removed:
            state.acked.pop(name, None)
        return RequestOutcome(request.type_url, RequestKind.ACK, respond=respond, nonce=request.response_nonce,
                              versions=pending.versions, removed=pending.removed)

    def _subscribe_first(self, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        names = set(request.resource_names_subscribe)
        state.subscribed = True
        state.wildcard = not names or WILDCARD in names
        state.names = names - {WILDCARD}
        state.unresolved = set(state.names)
        state.sent = dict(request.initial_resource_versions)
        state.acked = dict(request.initial_resource_versions)
        state.owed = True
        state.diffed = None

    def _change_subscriptions(self, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        """Apply (un)subscribe lists of a later request; True when the client now expects a response."""
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if not subscribe and not unsubscribe:
            return False
        if WILDCARD in unsubscribe:
            state.wildcard = False
        if WILDCARD in subscribe:
            state.wildcard = True
        added = subscribe - {WILDCARD} - state.names
        state.names |= added
        state.unresolved |= added
        state.names -= unsubscribe
        # The client drops what it unsubscribed from; forget it rather than send removals.
        for name in list(state.sent):
            if not self._wants(state, name):
                state.sent.pop(name)
                state.acked.pop(name, None)
        state.diffed = None
        if added or WILDCARD in subscribe:
            state.owed = True
        return state.owed

    @staticmethod
    def _wants(state: _TypeState, name: str) -> bool:
        return state.wildcard or name in state.names

    # -- output --

    def next_response(self, type_url: str, resources: Mapping[str, XdsResource],
                      system_version: str = "") -> discovery_pb2.DeltaDiscoveryResponse | None:
        """The diff between `resources` (name → resource, must not be mutated later) and what this client
        has, as a response to send now; None when there is nothing to say. Records it as sent."""
        state = self._states.get(type_url)
        if state is None or not state.subscribed:
            return None
        if resources is state.diffed and not state.owed:
            return None
        if state.wildcard:
            candidates = list(resources.values())
        else:
            candidates = [resources[name] for name in state.names if name in resources]
        updates = sorted((r for r in candidates
                          if state.sent.get(r.name) != r.version and state.nacked.get(r.name) != r.version),
                         key=lambda r: r.name)
        removed = {name for name in state.sent if name not in resources}
        removed |= {name for name in state.unresolved if name not in resources}
        owed = state.owed
        state.owed, state.diffed, state.unresolved = False, resources, set()
        if not updates and not removed and not owed:
            return None
        nonce = self._new_nonce()
        response = discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url, nonce=nonce, system_version_info=system_version,
            removed_resources=sorted(removed))
        for resource in updates:
            response.resources.add(name=resource.name, version=resource.version, resource=resource.body)
            state.sent[resource.name] = resource.version
        for name in removed:
            state.sent.pop(name, None)
            state.nacked.pop(name, None)  # a resource that comes back is new to the client
        self._pending[nonce] = _Pending(type_url, {r.name: r.version for r in updates}, tuple(sorted(removed)))
        while len(self._pending) > self._max_pending:
            del self._pending[next(iter(self._pending))]
        return response

    def _new_nonce(self) -> str:
        self._next_nonce += 1
        return f"{self._nonce_prefix}{self._next_nonce}"
