"""A workload's certificate as handed to TLS: key, chain (leaf first, root last) and validity.

`WorkloadCertificate.from_chain` checks what a CA response must satisfy before anyone uses it: the leaf
names the requested identity, matches our key, and each certificate is signed by the next one up to a
self-signed root. Pure data and parsing; nothing here does I/O.
"""

from __future__ import annotations

import datetime
import itertools
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ambient.identity.errors import InvalidCertificate
from ambient.identity.spiffe import SpiffeId

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)


def split_pem_certs(data: str | bytes) -> list[str]:
    """Every CERTIFICATE block of a PEM bundle, in order, each ending in a newline (as istiod sends them)."""
    raw = data.encode() if isinstance(data, str) else data
    return [m.group(0).decode() + "\n" for m in _PEM_CERT.finditer(raw)]


def load_certs(data: str | bytes, what: str) -> list[x509.Certificate]:
    """Parse a PEM bundle; raises `InvalidCertificate` naming `what` (a file name or "CA response")."""
    blocks = split_pem_certs(data)
    if not blocks:
        raise InvalidCertificate(f"{what}: no PEM CERTIFICATE block found")
    try:
        return [x509.load_pem_x509_certificate(b.encode()) for b in blocks]
    except ValueError as exc:
        raise InvalidCertificate(f"{what}: certificate cannot be parsed: {exc}") from None


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def check_chain(certs: list[x509.Certificate], what: str) -> None:
    """Each certificate is signed by the next; the last is a self-signed root. Raises `InvalidCertificate`."""
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            raise InvalidCertificate(f"{what}: {child.subject.rfc4514_string() or 'leaf'} is not issued by "
                                     f"{parent.subject.rfc4514_string()}: {exc or 'bad signature'}") from None
    root = certs[-1]
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise InvalidCertificate(f"{what}: the chain must end with a self-signed root, but the last certificate "
                                 f"({root.subject.rfc4514_string()}) is issued by "
                                 f"{root.issuer.rfc4514_string()}") from None


def _epoch(moment: datetime.datetime) -> float:
    return moment.timestamp()


@dataclass(frozen=True)
class WorkloadCertificate:
    identity: SpiffeId
    key_pem: str
    cert_chain: tuple[str, ...]  # PEM, leaf first, root last (as IstioCertificateResponse.cert_chain)
    not_before: float  # epoch seconds, from the leaf
    not_after: float

    @classmethod
    def from_chain(cls, identity: SpiffeId, key_pem: str, cert_chain: list[str] | tuple[str, ...],
                   what: str = "CA response") -> WorkloadCertificate:
        blocks = [b for pem in cert_chain for b in split_pem_certs(pem)]
        if not blocks:
            raise InvalidCertificate(f"{what}: empty certificate chain")
        certs = load_certs("".join(blocks), what)
        leaf = certs[0]
        if str(identity) not in uri_sans(leaf):
            raise InvalidCertificate(f"{what}: leaf certificate names {uri_sans(leaf) or 'no URI SAN'}, "
                                     f"not the requested identity {identity}")
        try:
            key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise InvalidCertificate(f"{what}: private key cannot be parsed: {exc}") from None
        if key.public_key() != leaf.public_key():
            raise InvalidCertificate(f"{what}: leaf certificate does not carry our public key")
        check_chain(certs, what)
        return cls(identity, key_pem, tuple(blocks), _epoch(leaf.not_valid_before_utc),
                   _epoch(leaf.not_valid_after_utc))

    @property
    def leaf_pem(self) -> str:
        return self.cert_chain[0]

    @property
    def root_pem(self) -> str:
        return self.cert_chain[-1]

    @property
    def presented_chain_pem(self) -> str:
        """Leaf and intermediates (what a TLS peer presents); the root is the trust anchor, not sent."""
        chain = self.cert_chain[:-1] if len(self.cert_chain) > 1 else self.cert_chain
        return "".join(chain)

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def expired(self, now: float) -> bool:
        """Past `not_after`. (A `not_before` slightly ahead of our clock is the CA's skew, not a reason to
        throw a fresh certificate away; peers judge that.)"""
        return now >= self.not_after
