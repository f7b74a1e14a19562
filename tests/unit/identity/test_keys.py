"""Workload keys and CSRs (PROTOCOLS.md §5): what ztunnel sends, and the CA-side check of that shape."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambient.identity.errors import InvalidCsr
from ambient.identity.keys import build_csr, csr_identity, generate_key, load_csr
from ambient.identity.spiffe import SpiffeId

ID = SpiffeId("cluster.local", "default", "sleep")


def csr_with(names: list[x509.GeneralName] | None, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
             ) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    csr = builder.sign(key or generate_key(), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_csr_is_p256_sha256_empty_subject_one_uri_san() -> None:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, ID).encode())
    assert csr.is_signature_valid
    assert len(csr.subject) == 0
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(ID))]
    assert csr_identity(load_csr(build_csr(key, ID))) == ID


@pytest.mark.parametrize(("names", "message"), [
    (None, "no subjectAltName"),
    ([x509.UniformResourceIdentifier(str(ID)), x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")],
     "2 URI SANs"),
    ([x509.UniformResourceIdentifier(str(ID)), x509.DNSName("sleep.default.svc")], "non-URI entries (DNSName)"),
    ([x509.UniformResourceIdentifier("https://example.com/")], "not a workload SPIFFE id"),
])
def test_csr_identity_refuses_anything_but_one_spiffe_uri(names: list[x509.GeneralName] | None,
                                                          message: str) -> None:
    with pytest.raises(InvalidCsr) as caught:
        csr_identity(load_csr(csr_with(names)))
    assert message in str(caught.value)


def test_load_csr_refuses_garbage_tampering_and_weak_keys() -> None:
    with pytest.raises(InvalidCsr, match="not PEM"):
        load_csr("hello")
    with pytest.raises(InvalidCsr, match="cannot be parsed"):
        load_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    der = bytearray(x509.load_pem_x509_csr(build_csr(generate_key(), ID).encode())
                    .public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s value: still DER, no longer a valid signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCsr, match="signature does not verify"):
        load_csr(tampered)
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(InvalidCsr, match="1024 bits"):
        load_csr(csr_with([x509.UniformResourceIdentifier(str(ID))], weak))
    p521 = ec.generate_private_key(ec.SECP521R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    pem521 = builder.sign(p521, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCsr, match="secp521r1"):
        load_csr(pem521)
