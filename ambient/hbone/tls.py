"""TLS for HBONE (PROTOCOLS.md §6): TLS 1.3 only, ALPN `h2`, no SNI, no session resumption, SPIFFE
certificates on both sides chaining to the mesh root.

Who the peer is comes from the URI SANs of its leaf: the client accepts a server only if one of them is an
expected identity; the server accepts any client certificate that chains to the root and names an identity
in its own trust domain (which identities may connect is authorization's job, not TLS's).

Python's `ssl` has no verification callback, so the SAN and trust-domain checks run right after the
handshake, before a single HTTP/2 byte is read or written. Contexts are built from a
`WorkloadCertificate` and cached (building one costs about a millisecond). Nothing here does network I/O.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ambient.hbone.errors import ConnectError
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.errors import InvalidSpiffeId
from ambient.identity.spiffe import SpiffeId

ALPN_H2 = "h2"
CONTEXT_CACHE_SIZE = 256  # certificates in use at once on a node: one per local identity, plus rotations


def _load_identity(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    """Load the presented chain and key. `ssl` only reads files: use an anonymous memory file so the
    private key never touches a disk (a private temporary file where memfd is missing)."""
    pem = (cert.key_pem + "\n" + cert.presented_chain_pem).encode()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("hbone-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(suffix=".pem") as tmp:  # pragma: no cover - non-Linux
        tmp.write(pem)
        tmp.flush()
        ctx.load_cert_chain(tmp.name)


def _base_context(server: bool, cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identities are URI SANs, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.load_verify_locations(cadata=cert.root_pem)
    _load_identity(ctx, cert)
    return ctx


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Presents `cert`, trusts its root. Connect with `server_hostname=""` so that no SNI is sent."""
    return _base_context(False, cert)


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Presents `cert`, requires a client certificate chaining to its root, issues no session tickets."""
    ctx = _base_context(True, cert)
    ctx.num_tickets = 0  # TLS 1.3 resumption needs a ticket; sending none disables it
    return ctx


class TlsContexts:
    """Client and server contexts per certificate, least recently used dropped first. A rotated
    certificate is a new key, so new connections use it while open ones keep theirs."""

    def __init__(self, size: int = CONTEXT_CACHE_SIZE) -> None:
        self._size = size
        self._cache: OrderedDict[tuple[bool, WorkloadCertificate], ssl.SSLContext] = OrderedDict()

    def client(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self._get(False, cert)

    def server(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self._get(True, cert)

    def _get(self, server: bool, cert: WorkloadCertificate) -> ssl.SSLContext:
        key = (server, cert)
        ctx = self._cache.get(key)
        if ctx is None:
            ctx = server_context(cert) if server else client_context(cert)
            self._cache[key] = ctx
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return ctx


def peer_uri_sans(peercert: dict[str, Any] | None) -> list[str]:
    """The URI SANs of the verified peer leaf, from `SSLObject.getpeercert()`."""
    if not peercert:
        return []
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]


def check_server_identity(sans: list[str], expected: Iterable[str], peer: str) -> str:
    """The SAN that matched one of `expected`; raises `ConnectError(identity_mismatch)` otherwise."""
    wanted = list(expected)
    for san in sans:
        if san in wanted:
            return san
    raise ConnectError(f"{peer} presented {', '.join(sans) or 'no URI SAN'}, but the connection expects "
                       f"{' or '.join(wanted) or 'no identity'}: is the destination workload running with "
                       "the service account it is registered with?", "identity_mismatch")


def client_identity(sans: list[str], trust_domain: str, peer: str) -> str:
    """The client's SPIFFE id in `trust_domain`; raises `ConnectError(untrusted_peer)` otherwise."""
    seen: list[str] = []
    for san in sans:
        try:
            spiffe = SpiffeId.parse(san)
        except InvalidSpiffeId:
            continue
        if spiffe.trust_domain == trust_domain:
            return san
        seen.append(san)
    raise ConnectError(f"client {peer} presented {', '.join(seen or sans) or 'no SPIFFE URI SAN'}, which is not "
                       f"in trust domain {trust_domain}", "untrusted_peer")
