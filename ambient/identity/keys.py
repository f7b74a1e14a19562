"""Workload keys and certificate signing requests, as Istio's CA expects them (PROTOCOLS.md §5).

A workload key is ECDSA P-256; its CSR is signed with SHA-256, has an empty subject and exactly one
subjectAltName, a URI that is the SPIFFE id. `csr_identity` is the server-side check of the same shape,
with a precise message for each way a CSR can be wrong. Nothing here does I/O.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambient.identity.errors import InvalidCsr, InvalidSpiffeId
from ambient.identity.spiffe import SpiffeId

MIN_RSA_BITS = 2048  # a CSR with a smaller RSA key is refused, as Istio's CA does
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)  # the curves ztunnel, Envoy and Go's crypto/tls all use


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> str:
    """A PEM CSR for `identity`: empty subject, one URI SAN (critical, since the subject is empty), SHA-256."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(san, critical=True).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse and check a PEM CSR's signature and key; raises `InvalidCsr`."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise InvalidCsr("CSR is not PEM: expected a '-----BEGIN CERTIFICATE REQUEST-----' block")
    try:
        csr = x509.load_pem_x509_csr(data)
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCsr(f"CSR cannot be parsed: {exc}") from None
    if not valid:
        raise InvalidCsr("CSR signature does not verify with its own public key")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ACCEPTED_CURVES):
            raise InvalidCsr(f"CSR key uses curve {key.curve.name}; use ECDSA P-256 (or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidCsr(f"CSR RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required")
    else:
        raise InvalidCsr(f"CSR key type {type(key).__name__} is not supported; use ECDSA P-256")
    return csr


def csr_identity(csr: x509.CertificateSigningRequest) -> SpiffeId:
    """The one SPIFFE id a CSR asks for; raises `InvalidCsr` unless there is exactly one URI SAN and
    nothing else in the subjectAltName."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise InvalidCsr("CSR has no subjectAltName; it must carry exactly one URI SAN, the SPIFFE id "
                         "spiffe://<trust domain>/ns/<namespace>/sa/<service account>") from None
    except ValueError as exc:  # duplicate or malformed extensions
        raise InvalidCsr(f"CSR extensions cannot be parsed: {exc}") from None
    names = list(ext.value)
    others = [n for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        kinds = sorted({type(n).__name__ for n in others})
        raise InvalidCsr(f"CSR subjectAltName has non-URI entries ({', '.join(kinds)}); only one URI SAN, "
                         "the SPIFFE id, is allowed")
    if len(names) != 1:
        raise InvalidCsr(f"CSR has {len(names)} URI SANs; exactly one (the SPIFFE id) is allowed")
    try:
        return SpiffeId.parse(names[0].value)
    except InvalidSpiffeId as exc:
        raise InvalidCsr(f"CSR URI SAN is not a workload SPIFFE id: {exc}") from None
