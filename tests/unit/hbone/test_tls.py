"""HBONE's TLS settings and identity checks (PROTOCOLS.md §6): TLS 1.3 only, ALPN h2, no tickets, the
server's SAN must be an expected identity, the client's must be in the server's trust domain."""

from __future__ import annotations

import ssl

import pytest
from cryptography import x509

from ambient.hbone.errors import ConnectError
from ambient.hbone.tls import (
    TlsContexts,
    check_server_identity,
    client_context,
    client_identity,
    peer_uri_sans,
    server_context,
)
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.keys import build_csr, generate_key, private_key_pem
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId

REVIEWS = "spiffe://cluster.local/ns/bookinfo/sa/reviews"


@pytest.fixture(scope="module")
def cert() -> WorkloadCertificate:
    signer = CaSigner.generate("cluster.local")
    identity = SpiffeId("cluster.local", "bookinfo", "reviews")
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, identity).encode())
    return WorkloadCertificate.from_chain(identity, private_key_pem(key), signer.sign_workload(csr, identity, 0))


def test_contexts_are_tls13_only_with_mutual_verification(cert: WorkloadCertificate) -> None:
    for ctx in (client_context(cert), server_context(cert)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        assert ctx.options & ssl.OP_NO_TICKET
    assert server_context(cert).num_tickets == 0


def test_contexts_are_cached_per_certificate(cert: WorkloadCertificate) -> None:
    contexts = TlsContexts(size=1)
    client = contexts.client(cert)
    assert contexts.client(cert) is client
    assert contexts.server(cert) is not client
    assert contexts.client(cert) is not client  # size 1: the server context evicted it


def test_peer_uri_sans() -> None:
    assert peer_uri_sans({"subjectAltName": (("URI", REVIEWS), ("DNS", "x"))}) == [REVIEWS]
    assert peer_uri_sans(None) == []
    assert peer_uri_sans({}) == []


def test_server_identity_must_be_expected() -> None:
    assert check_server_identity([REVIEWS], ["spiffe://cluster.local/ns/a/sa/b", REVIEWS], "10.0.0.1:15008") == REVIEWS
    with pytest.raises(ConnectError) as err:
        check_server_identity([REVIEWS], ["spiffe://cluster.local/ns/bookinfo/sa/ratings"], "10.0.0.1:15008")
    assert err.value.reason == "identity_mismatch"
    assert REVIEWS in str(err.value) and "ratings" in str(err.value)
    with pytest.raises(ConnectError, match="no URI SAN"):
        check_server_identity([], [REVIEWS], "10.0.0.1:15008")


def test_client_identity_must_be_in_the_trust_domain() -> None:
    assert client_identity(["urn:x", REVIEWS], "cluster.local", "10.0.0.1:1") == REVIEWS
    with pytest.raises(ConnectError) as err:
        client_identity(["spiffe://other.domain/ns/a/sa/b"], "cluster.local", "10.0.0.1:1")
    assert err.value.reason == "untrusted_peer"
    assert "other.domain" in str(err.value)
    with pytest.raises(ConnectError, match="no SPIFFE URI SAN"):
        client_identity([], "cluster.local", "10.0.0.1:1")
