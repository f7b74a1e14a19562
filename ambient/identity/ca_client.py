"""Client of the Istio CA API: a fresh key and CSR per request, `CreateCertificate` over gRPC, the
response checked before it is used (PROTOCOLS.md §5).

Every call carries `authorization: Bearer <token>` and `clusterid: <cluster>`; the token is read again for
each request because projected service-account tokens rotate. A node proxy (ztunnel) sets `impersonate`
so that each request names the pod identity in `metadata.ImpersonatedIdentity`. TLS to the CA (port
15012) trusts only the given root and checks `server_name` (`istiod.<system namespace>.svc`, see
`ambient.identity.istiod`), whatever address is dialled; plaintext is for tests. grpc errors are wrapped
into `CaError` here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import struct_pb2

from ambient.identity.certs import WorkloadCertificate
from ambient.identity.errors import CaError, InvalidCertificate
from ambient.identity.keys import build_csr, generate_key, private_key_pem
from ambient.identity.signer import DEFAULT_CERT_TTL, ISTIOD_DNS_NAMES
from ambient.identity.spiffe import SpiffeId
from ambient.proto import ca_pb2, ca_pb2_grpc

DEFAULT_CLUSTER_ID = "Kubernetes"  # istiod's default cluster id
REQUEST_TIMEOUT = 10.0  # seconds for one CreateCertificate; the manager retries with backoff after that
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # the metadata key istiod reads
_generated: Any = ca_pb2_grpc  # the generated module is untyped


class CertificateSource(Protocol):
    """What the certificate manager needs from a CA: a certificate for one identity, or `CaError`."""

    async def fetch_certificate(self, identity: SpiffeId) -> WorkloadCertificate: ...


@dataclass(frozen=True)
class CaClientConfig:
    address: str  # host:port of the CA (15012 with TLS, any port plaintext)
    root_pem: str | None = None  # trust anchor for TLS; None = plaintext
    server_name: str = ISTIOD_DNS_NAMES[0]  # name the CA's serving certificate must carry
    cluster_id: str = DEFAULT_CLUSTER_ID
    ttl: int = DEFAULT_CERT_TTL  # seconds asked for in validity_duration
    impersonate: bool = False  # node proxy: ask for pod identities with ImpersonatedIdentity
    timeout: float = REQUEST_TIMEOUT


def token_from_file(path: str | os.PathLike[str]) -> Callable[[], str]:
    """A token source that re-reads `path` on every request (projected tokens are rotated by the kubelet)."""
    def read() -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise CaError(f"cannot read the CA token file {path}: {exc.strerror}", "TOKEN_UNREADABLE") from None
    return read


class CaClient:
    """Implements `CertificateSource` against an Istio-compatible CA. One channel, reused; `close()` it."""

    def __init__(self, config: CaClientConfig, token: str | Callable[[], str]) -> None:
        self.config = config
        self._token = token if callable(token) else (lambda: token)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _connect(self) -> Any:
        if self._stub is None:
            cfg = self.config
            if cfg.root_pem is None:
                self._channel = grpc.aio.insecure_channel(cfg.address)
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=cfg.root_pem.encode())
                self._channel = grpc.aio.secure_channel(cfg.address, creds, options=[
                    ("grpc.ssl_target_name_override", cfg.server_name),
                    ("grpc.default_authority", cfg.server_name)])
            self._stub = _generated.IstioCertificateServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub = None, None

    async def fetch_certificate(self, identity: SpiffeId) -> WorkloadCertificate:
        cfg = self.config
        key = generate_key()
        request = ca_pb2.IstioCertificateRequest(csr=build_csr(key, identity), validity_duration=cfg.ttl)
        if cfg.impersonate:
            metadata = struct_pb2.Struct()
            metadata.update({IMPERSONATED_IDENTITY: str(identity)})
            request.metadata.CopyFrom(metadata)
        call_metadata = (("authorization", f"Bearer {self._token()}"), ("clusterid", cfg.cluster_id))
        try:
            response = await self._connect().CreateCertificate(request, metadata=call_metadata,
                                                               timeout=cfg.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _wrap(exc, cfg, identity) from None
        try:
            return WorkloadCertificate.from_chain(identity, private_key_pem(key), list(response.cert_chain),
                                                  what=f"CA {cfg.address} response for {identity}")
        except InvalidCertificate as exc:
            raise CaError(str(exc), "INVALID_RESPONSE") from None


def _wrap(exc: grpc.aio.AioRpcError, cfg: CaClientConfig, identity: SpiffeId) -> CaError:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = (" (plaintext to a TLS port? pass the mesh root)" if cfg.root_pem is None else
                f" (the CA's certificate must chain to the given root and name {cfg.server_name})")
        message = (f"cannot reach the CA at {cfg.address}: {details}; is the control plane running and port "
                   f"15012 reachable?{hint if 'handshake' in details.lower() or 'ssl' in details.lower() else ''}")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the CA at {cfg.address} did not answer within {cfg.timeout:g}s"
    else:
        message = f"the CA at {cfg.address} refused a certificate for {identity}: {code.name}: {details}"
    return CaError(message, code.name)
