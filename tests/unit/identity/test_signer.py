"""The CA signer: leaf shape (PROTOCOLS.md §5, §6), chains that verify to the root (with cryptography's
verifier and a real TLS 1.3 mTLS handshake), persistence, user-supplied roots and intermediates."""

from __future__ import annotations

import datetime
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from ambient.identity.certs import WorkloadCertificate, load_certs
from ambient.identity.errors import CaMaterialError, InvalidCertificate, SigningError
from ambient.identity.keys import build_csr, generate_key, load_csr, private_key_pem
from ambient.identity.signer import (
    CA_KEY_FILE,
    DEFAULT_CERT_TTL,
    ROOT_CERT_FILE,
    CaSigner,
    CertPolicy,
)
from ambient.identity.spiffe import SpiffeId
from tests.unit.identity.tls import handshake

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")
REVIEWS = SpiffeId(TD, "bookinfo", "reviews")


def issue(signer: CaSigner, identity: SpiffeId, ttl: int = 0) -> WorkloadCertificate:
    key = generate_key()
    chain = signer.sign_workload(load_csr(build_csr(key, identity)), identity, ttl)
    return WorkloadCertificate.from_chain(identity, private_key_pem(key), chain)


def make_ca(name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
            days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate the way a user's own PKI would make one (root, or intermediate under `issuer`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    signer_cert, signer_key = issuer if issuer else (None, key)
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(signer_cert.subject if signer_cert else subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(signer_key, hashes.SHA256()))
    return cert, key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def signer() -> CaSigner:
    return CaSigner.generate(TD)


def verify_with_cryptography(cert: WorkloadCertificate) -> list[x509.GeneralName]:
    """cryptography's RFC 5280 path validation, as a TLS server would validate a client (EKU clientAuth)."""
    certs = load_certs("".join(cert.cert_chain), "test")
    verifier = PolicyBuilder().store(Store([certs[-1]])).build_client_verifier()
    verified = verifier.verify(certs[0], certs[1:-1])
    assert verified.subjects is not None
    return list(verified.subjects)


def test_leaf_has_only_the_spiffe_san_and_the_usages_hbone_needs(signer: CaSigner) -> None:
    cert = issue(signer, SLEEP)
    leaf = x509.load_pem_x509_certificate(cert.leaf_pem.encode())
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(str(SLEEP))]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert not usage.key_cert_sign and not usage.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.lifetime == DEFAULT_CERT_TTL
    assert len(cert.cert_chain) == 2 and cert.root_pem == signer.root_pem


def test_chain_verifies_to_the_root(signer: CaSigner) -> None:
    cert = issue(signer, SLEEP)
    assert verify_with_cryptography(cert) == [x509.UniformResourceIdentifier(str(SLEEP))]


def test_two_workload_certs_complete_an_mtls_handshake(signer: CaSigner) -> None:
    server, client = issue(signer, REVIEWS), issue(signer, SLEEP)
    seen_by_client, seen_by_server = handshake((server.presented_chain_pem, server.key_pem), signer.root_pem,
                                               client=(client.presented_chain_pem, client.key_pem))
    assert ("URI", str(REVIEWS)) in seen_by_client["subjectAltName"]
    assert seen_by_server is not None and ("URI", str(SLEEP)) in seen_by_server["subjectAltName"]


def test_a_cert_from_another_root_is_refused_in_the_handshake(signer: CaSigner) -> None:
    stranger = issue(CaSigner.generate(TD), SLEEP)
    server = issue(signer, REVIEWS)
    with pytest.raises(ssl.SSLError):
        handshake((server.presented_chain_pem, server.key_pem), signer.root_pem,
                  client=(stranger.presented_chain_pem, stranger.key_pem))


def test_ttl_default_requested_refused_and_clamped(signer: CaSigner) -> None:
    assert issue(signer, SLEEP, ttl=3600).lifetime == 3600
    assert issue(signer, SLEEP, ttl=-5).lifetime == DEFAULT_CERT_TTL
    with pytest.raises(SigningError, match=r"requested TTL 2160h0m1s is greater than the max allowed TTL 2160h0m0s"):
        issue(signer, SLEEP, ttl=90 * 24 * 3600 + 1)
    root, root_key = make_ca("short-lived root", days=1)
    short = CaSigner.from_pem(pem(root), key_pem(root_key), TD, policy=CertPolicy(max_ttl=10 * 24 * 3600))
    cert = issue(short, SLEEP, ttl=5 * 24 * 3600)
    assert cert.not_after == int(root.not_valid_after_utc.timestamp())  # never outlives its issuer


def test_persisted_root_is_reloaded_unchanged(tmp_path: Path) -> None:
    first = CaSigner.load_or_create(tmp_path / "ca", TD)
    assert (tmp_path / "ca" / CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = CaSigner.load_or_create(tmp_path / "ca", TD)
    assert again.root_pem == first.root_pem
    assert key_pem(again.key) == key_pem(first.key)  # type: ignore[arg-type]
    cert = issue(again, SLEEP)
    assert cert.root_pem == first.root_pem


def test_half_written_ca_directory_is_reported_not_replaced(tmp_path: Path) -> None:
    CaSigner.load_or_create(tmp_path, TD)
    (tmp_path / CA_KEY_FILE).unlink()
    with pytest.raises(CaMaterialError, match=r"found .*ca-cert.pem but not .*ca-key.pem"):
        CaSigner.load_or_create(tmp_path, TD)


def test_user_intermediate_chain_ends_at_the_users_root(tmp_path: Path) -> None:
    root, root_key = make_ca("corp root")
    inter, inter_key = make_ca("mesh intermediate", (root, root_key))
    (tmp_path / "ca.crt").write_bytes(pem(inter))
    (tmp_path / "ca.key").write_bytes(key_pem(inter_key))
    (tmp_path / "root.crt").write_bytes(pem(root))
    signer = CaSigner.from_files(tmp_path / "ca.crt", tmp_path / "ca.key", TD, root_cert=tmp_path / "root.crt")
    cert = issue(signer, SLEEP)
    assert len(cert.cert_chain) == 3
    assert cert.root_pem.encode() == pem(root)
    assert verify_with_cryptography(cert) == [x509.UniformResourceIdentifier(str(SLEEP))]
    server = issue(signer, REVIEWS)
    handshake((server.presented_chain_pem, server.key_pem), pem(root).decode(),
              client=(cert.presented_chain_pem, cert.key_pem))
    # The same CA as one bundle (intermediate then root) in --ca-cert.
    (tmp_path / "bundle.crt").write_bytes(pem(inter) + pem(root))
    bundled = CaSigner.from_files(tmp_path / "bundle.crt", tmp_path / "ca.key", TD)
    assert bundled.root_pem.encode() == pem(root)
    # And persisted in Istio's cacerts layout, which a directory load reads back.
    bundled.save(tmp_path / "cacerts")
    assert CaSigner.load_or_create(tmp_path / "cacerts", TD).chain_pem == bundled.chain_pem
    assert (tmp_path / "cacerts" / ROOT_CERT_FILE).read_bytes() == pem(root)


def test_user_supplied_material_errors_say_what_to_fix(tmp_path: Path) -> None:
    root, root_key = make_ca("corp root")
    inter, inter_key = make_ca("mesh intermediate", (root, root_key))
    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CaMaterialError, match="does not belong to the CA certificate"):
        CaSigner.from_pem(pem(root), key_pem(other_key), TD)
    with pytest.raises(CaMaterialError, match=r"must end with a self-signed root.*pass the root"):
        CaSigner.from_pem(pem(inter), key_pem(inter_key), TD)
    leaf = issue(CaSigner.generate(TD), SLEEP)
    with pytest.raises(CaMaterialError, match="is not a CA certificate"):
        CaSigner.from_pem(leaf.leaf_pem.encode(), leaf.key_pem.encode(), TD)
    with pytest.raises(CaMaterialError, match="cannot read the CA private key"):
        CaSigner.from_pem(pem(root), b"not a key", TD)
    with pytest.raises(CaMaterialError, match="no PEM CERTIFICATE block"):
        CaSigner.from_pem(b"", key_pem(root_key), TD)
    with pytest.raises(CaMaterialError, match=r"--ca-cert .*missing.crt: No such file"):
        CaSigner.from_files(tmp_path / "missing.crt", tmp_path / "missing.key", TD)


def test_serving_certificate_for_the_control_plane(signer: CaSigner) -> None:
    serving = signer.issue_serving_certificate(ips=["127.0.0.1", "172.30.0.1"])
    leaf = x509.load_pem_x509_certificate(serving.cert_chain_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["istiod.istio-system.svc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "172.30.0.1"]
    seen, _ = handshake((serving.cert_chain_pem, serving.key_pem), serving.root_pem,
                        server_hostname="istiod.istio-system.svc")
    assert ("DNS", "istiod.istio-system.svc") in seen["subjectAltName"]
    with pytest.raises(SigningError, match="does not appear to be an IPv4 or IPv6 address"):
        signer.issue_serving_certificate(ips=["not-an-ip"])


def test_workload_certificate_checks_what_the_ca_returned(signer: CaSigner) -> None:
    key = generate_key()
    chain = signer.sign_workload(load_csr(build_csr(key, SLEEP)), SLEEP, 0)
    with pytest.raises(InvalidCertificate, match="not the requested identity"):
        WorkloadCertificate.from_chain(REVIEWS, private_key_pem(key), chain)
    with pytest.raises(InvalidCertificate, match="does not carry our public key"):
        WorkloadCertificate.from_chain(SLEEP, private_key_pem(generate_key()), chain)
    foreign_root = CaSigner.generate(TD).root_pem
    with pytest.raises(InvalidCertificate, match="is not issued by"):
        WorkloadCertificate.from_chain(SLEEP, private_key_pem(key), [chain[0], foreign_root])
    with pytest.raises(InvalidCertificate, match="empty certificate chain"):
        WorkloadCertificate.from_chain(SLEEP, private_key_pem(key), [])
    # istiod may send several certificates in one entry; they are split, leaf first.
    cert = WorkloadCertificate.from_chain(SLEEP, private_key_pem(key), ["".join(chain)])
    assert cert.cert_chain == tuple(chain)
    assert cert.valid_at(time.time()) and not cert.valid_at(cert.not_after)
