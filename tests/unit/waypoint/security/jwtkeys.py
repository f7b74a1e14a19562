"""Test keys and token signing for the JWT tests (unit and integration): real keys made with `cryptography`,
their JWKs, and compact JWS tokens signed with them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

Private = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey | bytes
_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_CURVES = {"ES256": (ec.SECP256R1, "P-256", 32), "ES384": (ec.SECP384R1, "P-384", 48),
           "ES512": (ec.SECP521R1, "P-521", 66)}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(value: int) -> str:
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class SigningKey:
    alg: str
    private: Private
    kid: str

    @property
    def jwk(self) -> dict[str, Any]:
        key = self.private
        base: dict[str, Any] = {"kid": self.kid, "alg": self.alg}
        if isinstance(key, rsa.RSAPrivateKey):
            numbers = key.public_key().public_numbers()
            return {**base, "kty": "RSA", "n": _int(numbers.n), "e": _int(numbers.e)}
        if isinstance(key, ec.EllipticCurvePrivateKey):
            size = _CURVES[self.alg][2]
            point = key.public_key().public_numbers()
            return {**base, "kty": "EC", "crv": _CURVES[self.alg][1], "x": b64(point.x.to_bytes(size, "big")),
                    "y": b64(point.y.to_bytes(size, "big"))}
        if isinstance(key, Ed25519PrivateKey):
            raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            return {**base, "kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
        return {**base, "kty": "oct", "k": b64(key)}

    def sign(self, payload: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        head = {"alg": self.alg, "typ": "JWT", "kid": self.kid, **(header or {})}
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(payload).encode())}".encode()
        return f"{signing_input.decode()}.{b64(self._signature(signing_input))}"

    def _signature(self, data: bytes) -> bytes:
        key, alg = self.private, self.alg
        if isinstance(key, rsa.RSAPrivateKey):
            algorithm = _HASH[alg[2:]]()
            pad: padding.AsymmetricPadding = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(
                mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
            return key.sign(data, pad, algorithm)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_HASH[alg[2:]]())))
            size = _CURVES[alg][2]
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if isinstance(key, Ed25519PrivateKey):
            return key.sign(data)
        return hmac.new(key, data, getattr(hashlib, "sha" + alg[2:])).digest()


def make_key(alg: str, kid: str | None = None, rsa_key: rsa.RSAPrivateKey | None = None) -> SigningKey:
    kid = kid or f"{alg.lower()}-key"
    private: Private
    if alg[:2] in ("RS", "PS"):
        private = rsa_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg in _CURVES:
        private = ec.generate_private_key(_CURVES[alg][0]())
    elif alg == "EdDSA":
        private = Ed25519PrivateKey.generate()
    else:
        private = hashlib.sha256(kid.encode()).digest()
    return SigningKey(alg, private, kid)


def jwks(*keys: SigningKey) -> str:
    return json.dumps({"keys": [k.jwk for k in keys]})
