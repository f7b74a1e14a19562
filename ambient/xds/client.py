"""The delta xDS client used by ztunnel and the waypoint: one gRPC stream to the control plane,
subscribed to both workload types, feeding a `WorkloadStore` through its single mutator.

`XdsClient.run()` connects (TLS with a given root and optional name override, or plaintext), sends the
auth metadata (`authorization: Bearer <token>`, `clusterid`), applies every response before ACKing it,
and reconnects forever with exponential backoff and jitter, re-subscribing with the versions it holds.
`ready` is set once the first response of each type has been applied and stays set across reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ambient.proto import discovery_pb2, discovery_pb2_grpc
from ambient.xds.client_state import Decoder, DeltaClientState
from ambient.xds.errors import XdsConnectionError
from ambient.xds.store import WorkloadStore
from ambient.xds.types import short_type

log = logging.getLogger("ambient.xds.client")

BACKOFF_INITIAL = 0.1  # first retry soon: a control plane restart is the common case
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 15.0  # do not leave a node without updates for long once the control plane is back
DEFAULT_CLUSTER_ID = "Kubernetes"  # istiod's default cluster id
# A wildcard response lists every workload of the cluster at once; gRPC's default 4 MiB is too small.
MAX_RECEIVE_MESSAGE = 512 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000  # find a dead control plane within a minute (istiod permits pings every 15 s)
KEEPALIVE_TIMEOUT_MS = 10_000
# Words in gRPC's UNAVAILABLE details that point at TLS rather than at an unreachable port.
_TLS_WORDS = ("ssl", "tls", "handshake", "certificate", "verification")


@dataclass(frozen=True)
class ClientConfig:
    address: str  # host:port of the control plane (15012 TLS, 15010 plaintext)
    node_id: str  # e.g. types.ztunnel_node_id(ip, pod, namespace)
    cluster_id: str = DEFAULT_CLUSTER_ID
    token: str | None = None
    token_file: Path | None = None  # read on every connect (projected tokens rotate); wins over `token`
    root_cert: bytes | None = None  # PEM roots; None means plaintext
    server_name: str | None = None  # TLS name to verify (and authority to send) instead of the host
    node_metadata: Mapping[str, str] = field(default_factory=dict)
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX


class Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling up to the cap."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 factor: float = BACKOFF_FACTOR, rng: random.Random | None = None) -> None:
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._rng = rng or random.Random()
        self._current = initial

    def next(self) -> float:
        delay = self._current
        self._current = min(self._current * self.factor, self.maximum)
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def reset(self) -> None:
        self._current = self.initial


class XdsClient:
    def __init__(self, config: ClientConfig, store: WorkloadStore, *,
                 decoders: Mapping[str, Decoder] | None = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.store = store
        self.state = DeltaClientState(config.node_id, node_metadata=config.node_metadata, decoders=decoders)
        self.ready = asyncio.Event()
        self.connected = False
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, rng=rng)

    async def run(self) -> None:
        """Keep a stream open forever; cancel the task to stop."""
        while True:
            try:
                await self._stream()
                problem = f"the control plane at {self.config.address} ended the xDS stream"
            except XdsConnectionError as exc:
                problem = str(exc)
            finally:
                self.connected = False
            delay = self._backoff.next()
            log.warning("xds: %s; reconnecting in %.1fs", problem, delay)
            await asyncio.sleep(delay)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.config.token
        if self.config.token_file is not None:
            try:
                token = self.config.token_file.read_text().strip()
            except OSError as exc:
                raise XdsConnectionError(f"cannot read the xDS token file {self.config.token_file}: "
                                         f"{exc.strerror}", reason="token") from None
        metadata = [("clusterid", self.config.cluster_id)]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        return tuple(metadata)

    def _channel(self) -> grpc.aio.Channel:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ]
        if self.config.root_cert is None:
            return grpc.aio.insecure_channel(self.config.address, options=options)
        if self.config.server_name:
            options.append(("grpc.ssl_target_name_override", self.config.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.config.root_cert)
        return grpc.aio.secure_channel(self.config.address, credentials, options=options)

    async def _stream(self) -> None:
        metadata = self._metadata()
        channel = self._channel()
        stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.DeltaAggregatedResources(metadata=metadata)
        try:
            for request in self.state.start_stream():
                await call.write(request)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
                await call.write(self._handle(response))
        except grpc.aio.AioRpcError as exc:
            raise self._explain(exc.code(), exc.details()) from None
        except asyncio.InvalidStateError:
            # write() raced with the server ending the call (e.g. refusing our token): its status says why.
            raise self._explain(await call.code(), await call.details()) from None
        finally:
            await channel.close()

    def _handle(self, response: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        if not self.connected:
            self.connected = True
            self._backoff.reset()
            log.info("xds: connected to %s as %s", self.config.address, self.config.node_id)
        result = self.state.on_response(response)
        self.store.apply(result.changes)
        if result.rejected:
            log.warning("xds: NACK %s response %s: %s", short_type(response.type_url), response.nonce,
                        result.request.error_detail.message)
        if result.became_ready:
            log.info("xds: ready (%d workloads, %d services, %d authorizations)",
                     len(self.store.snapshot.workloads), len(self.store.snapshot.services),
                     len(self.store.snapshot.authorizations))
            self.ready.set()
        return result.request

    def _explain(self, code: grpc.StatusCode, details: str | None) -> XdsConnectionError:
        where, details = self.config.address, details or ""
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return XdsConnectionError(f"the control plane at {where} refused our credentials ({details}); "
                                      "check the token and cluster id", reason="unauthenticated")
        if code is grpc.StatusCode.UNAVAILABLE and any(word in details.lower() for word in _TLS_WORDS):
            return XdsConnectionError(f"TLS with the control plane at {where} failed ({details}); check the root "
                                      "certificate, and set the server name to a name in the control plane's "
                                      "certificate (e.g. istiod.istio-system.svc)", reason="tls")
        if code is grpc.StatusCode.UNAVAILABLE:
            return XdsConnectionError(f"cannot reach the control plane at {where} ({details}); is it running "
                                      "and is the port reachable from here?", reason="unavailable")
        return XdsConnectionError(f"xDS stream to {where} failed: {code.name}: {details}", reason=code.name.lower())
