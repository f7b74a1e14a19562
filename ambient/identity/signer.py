"""The mesh CA's signing side: the CA key and chain, and leaf certificates for workload identities.

Where the CA material comes from, in the order the control plane tries them:
- user-supplied files (`--ca-cert/--ca-key`, optionally a root or chain file): a root or an intermediate;
  the chain must reach a self-signed root, which ends every chain we hand out;
- a directory in Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`, optional `cert-chain.pem`,
  `root-cert.pem`), created with a fresh self-signed root the first time and reused after;
- on Kubernetes, the Secret `cacerts` (plugged-in CA) or else `istio-ca-secret` in the control plane's
  system namespace (`istio-system` unless configured), created once with a self-signed root, as istiod does.

Leaf certificates (PROTOCOLS.md §5, §6): empty subject, one critical URI SAN (the SPIFFE id),
`digitalSignature|keyEncipherment`, EKU serverAuth+clientAuth, not a CA, lifetime 24 h unless the request
asks otherwise, never longer than the maximum (a longer request is refused, as istiod refuses it) and never
past the signing certificate's own expiry (clamped: such a cert could not verify anyway). The chain
returned is leaf first, root last, one PEM per entry.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambient.identity.certs import check_chain, load_certs, split_pem_certs
from ambient.identity.errors import CaMaterialError, InvalidCertificate, SigningError
from ambient.identity.istiod import SYSTEM_NAMESPACE, dns_name
from ambient.identity.keys import generate_key, private_key_pem
from ambient.identity.spiffe import SpiffeId
from ambient.kube.errors import ApiError

if TYPE_CHECKING:
    from ambient.kube.client import KubeClient

log = logging.getLogger("ambient.identity.signer")

DEFAULT_CERT_TTL = 24 * 3600  # seconds; Istio's DEFAULT_WORKLOAD_CERT_TTL
MAX_CERT_TTL = 90 * 24 * 3600  # seconds; Istio's MAX_WORKLOAD_CERT_TTL
ROOT_TTL = 10 * 365 * 24 * 3600  # seconds; Istio's self-signed root lives ten years
SERVING_CERT_TTL = 365 * 24 * 3600  # seconds; the control plane re-issues its serving cert at every start
ROOT_BACKDATE = 300  # seconds; a new root is valid slightly in the past so skewed clocks accept it at once
ISTIOD_DNS_NAMES = (dns_name(),)  # the name ztunnel verifies when it dials 15012 (default system namespace)

# Istio's `cacerts` layout, shared by the state directory and the Kubernetes Secrets.
CA_CERT_FILE, CA_KEY_FILE = "ca-cert.pem", "ca-key.pem"
CERT_CHAIN_FILE, ROOT_CERT_FILE = "cert-chain.pem", "root-cert.pem"
CA_NAMESPACE = SYSTEM_NAMESPACE  # default; the control plane passes its --system-namespace
PLUGGED_SECRET, SELF_SIGNED_SECRET = "cacerts", "istio-ca-secret"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertPolicy:
    """How long issued certificates live, in seconds."""

    default_ttl: int = DEFAULT_CERT_TTL  # for a request with validity_duration 0
    max_ttl: int = MAX_CERT_TTL  # a longer request is refused with INVALID_ARGUMENT


@dataclass(frozen=True)
class ServingCertificate:
    """A TLS server certificate for the control plane's own port (15012)."""

    cert_chain_pem: str  # leaf + intermediates, what the server presents
    key_pem: str
    root_pem: str  # what clients trust


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _load_key(data: bytes, what: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CaMaterialError(f"{what}: cannot read the CA private key (PEM, unencrypted): {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CaMaterialError(f"{what}: CA key type {type(key).__name__} is not supported; use ECDSA or RSA")
    return key


def _assemble_chain(ca_cert: bytes, cert_chain: bytes | None, root_cert: bytes | None, what: str
                    ) -> list[x509.Certificate]:
    """Signing cert first, root last, from Istio's files: `cert-chain.pem` (when given) supersedes
    `ca-cert.pem` as the chain, and `root-cert.pem` is appended unless the chain already ends with it."""
    try:
        chain = load_certs(cert_chain if cert_chain and split_pem_certs(cert_chain) else ca_cert, what)
        head = load_certs(ca_cert, what)[0]
        if chain[0] != head:
            chain.insert(0, head)
        if root_cert:
            root = load_certs(root_cert, what)[-1]
            if chain[-1] != root:
                chain.append(root)
    except InvalidCertificate as exc:
        raise CaMaterialError(str(exc)) from None
    return chain


class CaSigner:
    """Holds the CA key and chain (signing cert first, root last) and signs leaf certificates."""

    def __init__(self, key: SigningKey, chain: list[x509.Certificate], trust_domain: str, *,
                 policy: CertPolicy = CertPolicy(), what: str = "CA") -> None:
        self.key, self.chain, self.trust_domain, self.policy = key, chain, trust_domain, policy
        self._validate(what)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def generate(cls, trust_domain: str, *, policy: CertPolicy = CertPolicy()) -> CaSigner:
        """A fresh self-signed root (ECDSA P-256, ten years, O=<trust domain>)."""
        now = time.time()
        key = generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                          x509.NameAttribute(NameOID.COMMON_NAME, "ambient mesh root CA")])
        root = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now - ROOT_BACKDATE)).not_valid_after(_utc(now + ROOT_TTL))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, [root], trust_domain, policy=policy)

    @classmethod
    def from_pem(cls, ca_cert: bytes, ca_key: bytes, trust_domain: str, *, cert_chain: bytes | None = None,
                 root_cert: bytes | None = None, what: str = "CA", policy: CertPolicy = CertPolicy()) -> CaSigner:
        chain = _assemble_chain(ca_cert, cert_chain, root_cert, what)
        return cls(_load_key(ca_key, what), chain, trust_domain, what=what, policy=policy)

    @classmethod
    def from_files(cls, ca_cert: str | os.PathLike[str], ca_key: str | os.PathLike[str], trust_domain: str, *,
                   root_cert: str | os.PathLike[str] | None = None,
                   cert_chain: str | os.PathLike[str] | None = None, policy: CertPolicy = CertPolicy()
                   ) -> CaSigner:
        """User-supplied CA (`--ca-cert/--ca-key`): `ca_cert` may be a bundle (signing cert first, then its
        issuers); `root_cert` names the root when the bundle does not end with it."""
        return cls.from_pem(_read(ca_cert, "--ca-cert"), _read(ca_key, "--ca-key"), trust_domain,
                            cert_chain=_read(cert_chain, "cert chain") if cert_chain else None,
                            root_cert=_read(root_cert, "root cert") if root_cert else None,
                            what=f"--ca-cert {ca_cert}", policy=policy)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str], trust_domain: str, *,
                       policy: CertPolicy = CertPolicy()) -> CaSigner:
        """The CA persisted in `directory` (Istio's cacerts layout); a new self-signed root the first time."""
        path = Path(directory)
        cert_path, key_path = path / CA_CERT_FILE, path / CA_KEY_FILE
        if cert_path.exists() != key_path.exists():
            present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
            raise CaMaterialError(f"found {present} but not {missing}: restore it, or remove {present} to make a "
                                  "new root (every workload certificate will then be re-issued)")
        if cert_path.exists():
            def optional(name: str) -> bytes | None:
                file = path / name
                return file.read_bytes() if file.exists() else None
            try:
                return cls.from_pem(cert_path.read_bytes(), key_path.read_bytes(), trust_domain,
                                    cert_chain=optional(CERT_CHAIN_FILE), root_cert=optional(ROOT_CERT_FILE),
                                    what=str(path), policy=policy)
            except OSError as exc:
                raise CaMaterialError(f"cannot read the CA in {path}: {exc}") from None
        signer = cls.generate(trust_domain, policy=policy)
        try:
            signer.save(path)
        except OSError as exc:
            raise CaMaterialError(f"cannot write the new CA to {path}: {exc}") from None
        log.info("created a self-signed mesh root CA in %s", path)
        return signer

    def files(self) -> dict[str, str]:
        """The CA in Istio's cacerts layout (file name → PEM)."""
        key = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
        return {CA_CERT_FILE: _pem(self.chain[0]), CA_KEY_FILE: key,
                CERT_CHAIN_FILE: "".join(_pem(c) for c in self.chain), ROOT_CERT_FILE: self.root_pem}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # The key goes last so that a crash mid-way leaves "cert without key", which load_or_create reports.
        for name, text in sorted(self.files().items(), key=lambda item: item[0] == CA_KEY_FILE):
            tmp = directory / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if name == CA_KEY_FILE else 0o644)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            tmp.replace(directory / name)

    def _validate(self, what: str) -> None:
        head = self.chain[0]
        if self.key.public_key() != head.public_key():
            raise CaMaterialError(f"{what}: the CA key does not belong to the CA certificate "
                                  f"({head.subject.rfc4514_string()})")
        try:
            basic = head.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise CaMaterialError(f"{what}: {head.subject.rfc4514_string()} is not a CA certificate "
                                  "(basicConstraints CA:TRUE is required)")
        try:
            check_chain(self.chain, what)
        except InvalidCertificate as exc:
            raise CaMaterialError(f"{exc}; pass the root with the intermediate (root last) or as root-cert.pem") \
                from None
        if head.not_valid_after_utc.timestamp() <= time.time():
            raise CaMaterialError(f"{what}: the CA certificate expired on {head.not_valid_after_utc:%Y-%m-%d}")

    # -- facts -----------------------------------------------------------------------------------
    @property
    def root_pem(self) -> str:
        return _pem(self.chain[-1])

    @property
    def chain_pem(self) -> list[str]:
        """The CA's chain, signing cert first, root last (the tail of every issued chain)."""
        return [_pem(c) for c in self.chain]

    def resolve_ttl(self, requested: int) -> int:
        """Seconds of validity for a request: the default for 0 or less (as istiod), refused above the max."""
        if requested <= 0:
            return self.policy.default_ttl
        if requested > self.policy.max_ttl:
            raise SigningError(f"requested TTL {_duration(requested)} is greater than the max allowed TTL "
                               f"{_duration(self.policy.max_ttl)}")
        return requested

    # -- signing ---------------------------------------------------------------------------------
    def _leaf_builder(self, public_key: object, ttl: int) -> x509.CertificateBuilder:
        now = int(time.time())
        issuer = self.chain[0]
        not_after = min(now + ttl, int(issuer.not_valid_after_utc.timestamp()))
        try:
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return (x509.CertificateBuilder().issuer_name(issuer.subject)
                .public_key(public_key)  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now)).not_valid_after(_utc(not_after))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                               critical=True)
                .add_extension(aki, critical=False))

    def sign_workload(self, csr: x509.CertificateSigningRequest, identity: SpiffeId, ttl: int) -> list[str]:
        """A leaf for `identity` with the CSR's key → [leaf, signing cert, ..., root] as PEM strings.
        `ttl` is the requested seconds (0 = default); the caller has already authorized `identity`."""
        lifetime = self.resolve_ttl(ttl)
        cert = (self._leaf_builder(csr.public_key(), lifetime).subject_name(x509.Name([]))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return [_pem(cert), *self.chain_pem]

    def issue_serving_certificate(self, ips: Iterable[str] = (), dns_names: Iterable[str] = ISTIOD_DNS_NAMES,
                                  ttl: int = SERVING_CERT_TTL) -> ServingCertificate:
        """The control plane's TLS certificate for 15012: SAN DNS `istiod.<system namespace>.svc` (what
        ztunnel verifies) plus the given host IPs, signed by this CA so that the mesh root is all clients need."""
        names = list(dns_names)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise SigningError(f"serving certificate: {exc}") from None
        if not sans:
            raise SigningError("serving certificate: give at least one DNS name or IP address")
        key = generate_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])] if names else [])
        cert = (self._leaf_builder(key.public_key(), ttl).subject_name(subject)
                .add_extension(x509.SubjectAlternativeName(sans), critical=not names)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        presented = [_pem(cert), *self.chain_pem[:-1]]
        return ServingCertificate("".join(presented), private_key_pem(key), self.root_pem)


def _read(path: str | os.PathLike[str], flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CaMaterialError(f"{flag} {path}: {exc.strerror}") from None


def _duration(seconds: int) -> str:
    """Go's time.Duration style (`24h0m0s`), as in istiod's messages."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s"


# -- Kubernetes Secret persistence ---------------------------------------------------------------
def _from_secret(secret: dict[str, Any], trust_domain: str, policy: CertPolicy) -> CaSigner:
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace')}/{meta.get('name')}"
    data = secret.get("data") or {}
    try:
        files = {str(k): base64.b64decode(v) for k, v in data.items() if v}
    except (ValueError, TypeError, AttributeError) as exc:
        raise CaMaterialError(f"{where}: data is not a map of base64 values: {exc}") from None
    if CA_CERT_FILE not in files or CA_KEY_FILE not in files:
        raise CaMaterialError(f"{where} must hold {CA_CERT_FILE} and {CA_KEY_FILE}")
    return CaSigner.from_pem(files[CA_CERT_FILE], files[CA_KEY_FILE], trust_domain,
                             cert_chain=files.get(CERT_CHAIN_FILE), root_cert=files.get(ROOT_CERT_FILE),
                             what=where, policy=policy)


async def load_or_create_in_cluster(kube: KubeClient, trust_domain: str, namespace: str = CA_NAMESPACE,
                                    policy: CertPolicy = CertPolicy()) -> CaSigner:
    """The CA from Secret `cacerts` (plugged in by the user) or `istio-ca-secret` (created once with a
    self-signed root; if another replica creates it first, theirs is used)."""
    secrets = kube.types.require("secrets")
    for name in (PLUGGED_SECRET, SELF_SIGNED_SECRET):
        try:
            return _from_secret(await kube.get(secrets, name, namespace), trust_domain, policy)
        except ApiError as exc:
            if exc.code != 404:
                raise CaMaterialError(f"cannot read Secret {namespace}/{name}: {exc}") from None
    signer = CaSigner.generate(trust_domain, policy=policy)
    body = {"apiVersion": "v1", "kind": "Secret", "type": "istio.io/ca-root",
            "metadata": {"name": SELF_SIGNED_SECRET, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in signer.files().items()}}
    try:
        await kube.create(body)
    except ApiError as exc:
        if exc.code != 409:
            raise CaMaterialError(f"cannot create Secret {namespace}/{SELF_SIGNED_SECRET}: {exc}") from None
        return _from_secret(await kube.get(secrets, SELF_SIGNED_SECRET, namespace), trust_domain, policy)
    log.info("created a self-signed mesh root CA in Secret %s/%s", namespace, SELF_SIGNED_SECRET)
    return signer
