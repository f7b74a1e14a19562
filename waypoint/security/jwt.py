"""Request authentication at the waypoint: `security.istio.io` RequestAuthentication, as Envoy's `jwt_authn`
filter runs it for the config istiod generates (issue 6, deliverable 5).

Two layers. The sans-IO core — `RequestAuthnSet.compile` (objects → `JwtRule`s per attachment, same
targetRefs rules as authorization), `KeySet.parse` (a JWKS), `parse_jwt`, `verify_signature` and
`authenticate_request` (one request → `JwtResult`, given the key sets) — does no I/O and takes the clock as a
number. The asyncio shell, `JwtAuthenticator`, owns the `jwksUri` fetches (aiohttp, with a timeout, cached,
refreshed every 20 minutes as istiod does, retried with backoff when they fail) and calls the core.

Behaviour users see (Envoy's, with istiod's provider config: one provider per rule, `allow_missing`):
- No token at any configured location → passes, no principal (authorization may require one).
- A token → its issuer must be configured for the location it came from (else 401 `Jwt issuer is not
  configured`); then `exp`/`nbf` with 60 s of clock skew (Envoy's default; istiod sets none) → 401 `Jwt is
  expired` / `Jwt not yet valid`; then `audiences` (scheme and trailing `/` ignored, as Envoy) → 403
  `Audiences in Jwt are not allowed`; then the signature with the issuer's keys → 401 `Jwt verification
  fails` (or `Jwks doesn't have key to match kid or alg from Jwt`). Bodies are jwt_verify_lib's strings,
  401s carry `www-authenticate: Bearer realm="<url>", error="invalid_token"`. Every token present must
  verify; the first one gives the principal `<iss>/<sub>` and the claims.
- Keys of an issuer whose `jwksUri` cannot be fetched: its tokens get 401 `Jwks remote fetch is failed`
  (other issuers keep working), the failure is a `ConfigError` on the policy and is retried with backoff;
  a refresh that fails keeps the last keys fetched.
- Default token locations (no fromHeaders/fromParams): `Authorization: Bearer <token>` and the
  `access_token` query parameter (Envoy's defaults). `forwardOriginalToken: false` (the default) removes
  the header the token came from (Envoy leaves query parameters alone). `outputPayloadToHeader` gets the
  token's payload segment (base64url), `outputClaimToHeaders` the claim's value.
- Algorithms: RS256/384/512, PS256/384/512, ES256/384/512, EdDSA (Ed25519), HS256/384/512.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ambient.aio import OwnedTasks
from waypoint.http.message import RequestHeadLike
from waypoint.routing.model import Invalid, Severity, parse_duration
from waypoint.security import (
    ROOT_NAMESPACE,
    Attachment,
    ConfigError,
    ServiceLike,
    WaypointScope,
    attachment,
    identify,
)

log = logging.getLogger("waypoint.security.jwt")

KIND = "RequestAuthentication"
CLOCK_SKEW = 60.0  # seconds: Envoy jwt_authn's default clock_skew_seconds (istiod does not set it)
JWKS_REFRESH = 20 * 60.0  # seconds: istiod's JWT public key refresh interval
JWKS_TIMEOUT = 5.0  # seconds: istiod's JWKS fetch timeout; jwtRules[].timeout overrides it
JWKS_RETRY_INITIAL = 1.0  # seconds before retrying a failed fetch, doubling each time...
JWKS_RETRY_MAX = 60.0  # ...up to a minute, so an issuer whose JWKS server comes back recovers quickly
JWKS_MAX_BYTES = 1024 * 1024  # a JWKS document is a few KiB; refuse to buffer an endless one
OPENID_DISCOVERY = "/.well-known/openid-configuration"  # istiod resolves jwksUri this way when neither is set
DEFAULT_HEADER = ("authorization", "Bearer ")  # Envoy's default token locations
DEFAULT_PARAM = "access_token"

# jwt_verify_lib's status strings: Envoy answers them as the body of the 401/403.
JWT_EXPIRED = "Jwt is expired"
JWT_NOT_YET_VALID = "Jwt not yet valid"
JWT_BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature"
JWT_HEADER_PARSE_ERROR = "Jwt header is an invalid Base64url input or an invalid JSON"
JWT_HEADER_BAD_ALG = "Jwt header [alg] field is not a string"
JWT_HEADER_NOT_IMPLEMENTED_ALG = "Jwt header [alg] field value is invalid"
JWT_HEADER_BAD_KID = "Jwt header [kid] field is not a string"
JWT_PAYLOAD_PARSE_ERROR = "Jwt payload is an invalid Base64 or an invalid JSON"
JWT_SIGNATURE_PARSE_ERROR = "Jwt signature is an invalid Base64"
JWT_UNKNOWN_ISSUER = "Jwt issuer is not configured"
JWT_AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
JWT_VERIFICATION_FAIL = "Jwt verification fails"
JWKS_KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
JWKS_FETCH_FAIL = "Jwks remote fetch is failed"
JWKS_NO_VALID_KEYS = "Jwks doesn't have any valid public key"

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_HMAC_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_EC_CURVES: dict[str, tuple[str, ec.EllipticCurve, int]] = {  # alg → (crv, curve, coordinate bytes)
    "ES256": ("P-256", ec.SECP256R1(), 32), "ES384": ("P-384", ec.SECP384R1(), 48),
    "ES512": ("P-521", ec.SECP521R1(), 66)}
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", *_EC_CURVES, "EdDSA", *_HMAC_DIGESTS})
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-_.]+")  # base64url and dots: what Envoy cuts a token out of a header by


class JwksError(Exception):
    """A JWKS document (inline or fetched) that yields no usable key; the message says why."""

    reason = "bad_jwks"


class JwtFailure(Exception):
    """A token was refused; `status` is jwt_verify_lib's string (the response body users grep for)."""

    reason = "jwt_invalid"

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


# -- keys ------------------------------------------------------------------------------------------------------
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey | bytes  # bytes: an HMAC secret


@dataclass(frozen=True)
class Jwk:
    kty: str
    key: PublicKey
    kid: str | None = None
    alg: str | None = None
    crv: str | None = None

    def fits(self, alg: str) -> bool:
        """Whether this key can check a signature made with `alg` (jwt_verify_lib's kty/alg pairing)."""
        if self.alg is not None and self.alg != alg:
            return False
        if self.kty == "RSA":
            return alg[:2] in ("RS", "PS")
        if self.kty == "EC":
            return alg in _EC_CURVES and _EC_CURVES[alg][0] == self.crv
        if self.kty == "OKP":
            return alg == "EdDSA"
        return self.kty == "oct" and alg in _HMAC_DIGESTS


@dataclass(frozen=True)
class KeySet:
    keys: tuple[Jwk, ...]
    skipped: tuple[str, ...] = ()  # why some entries were not usable

    @classmethod
    def parse(cls, document: str | bytes) -> KeySet:
        """A JWKS (`{"keys": [...]}`); entries that are not usable public keys are skipped, as Envoy does,
        and a document with none left raises `JwksError`."""
        try:
            data = json.loads(document)
        except (ValueError, UnicodeDecodeError):
            raise JwksError("Jwks is an invalid JSON") from None
        if not isinstance(data, dict) or "keys" not in data:
            raise JwksError("Jwks does not have [keys] field")
        if not isinstance(data["keys"], list):
            raise JwksError("[keys] in Jwks is not an array")
        keys, skipped = [], []
        for i, entry in enumerate(data["keys"]):
            try:
                keys.append(_jwk(entry))
            except JwksError as exc:
                skipped.append(f"keys[{i}]: {exc}")
        if not keys:
            raise JwksError(JWKS_NO_VALID_KEYS + (f" ({'; '.join(skipped)})" if skipped else ""))
        return cls(tuple(keys), tuple(skipped))


def _jwk(entry: Any) -> Jwk:
    if not isinstance(entry, dict):
        raise JwksError("not an object")
    kty, kid, alg = entry.get("kty"), entry.get("kid"), entry.get("alg")
    if not isinstance(kty, str):
        raise JwksError("[kty] is missing in [keys]")
    if kid is not None and not isinstance(kid, str):
        raise JwksError("[kid] is not a string")
    if alg is not None and (not isinstance(alg, str) or alg not in ALGORITHMS):
        raise JwksError(f"[alg] {alg!r} is not supported")
    key: PublicKey
    crv = entry.get("crv")
    try:
        if kty == "RSA":
            n, e = _b64_int(entry, "n"), _b64_int(entry, "e")
            key = rsa.RSAPublicNumbers(e, n).public_key()
        elif kty == "EC":
            curve = next((c for a, c in _EC_CURVES.items() if c[0] == crv), None)
            if curve is None:
                raise JwksError(f"[crv] {crv!r} is not supported for an EC key")
            size = curve[2]
            x, y = _b64_field(entry, "x"), _b64_field(entry, "y")
            if len(x) != size or len(y) != size:
                raise JwksError("Jwks EC [x] and [y] fields have a parse error.")
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve[1], b"\x04" + x + y)
        elif kty == "OKP":
            if crv != "Ed25519":
                raise JwksError(f"[crv] {crv!r} is not supported for an OKP key (only Ed25519)")
            key = Ed25519PublicKey.from_public_bytes(_b64_field(entry, "x"))
        elif kty == "oct":
            key = _b64_field(entry, "k")
        else:
            raise JwksError("[kty] is not supported in [keys]")
    except ValueError as exc:  # cryptography's complaint about the numbers or the point
        raise JwksError(f"bad {kty} key: {exc}") from None
    return Jwk(kty, key, kid, alg, crv if isinstance(crv, str) else None)


def _b64_field(entry: Mapping[str, Any], name: str) -> bytes:
    value = entry.get(name)
    if not isinstance(value, str):
        raise JwksError(f"[{name}] field is missing or not a string")
    try:
        return b64url_decode(value)
    except ValueError:
        raise JwksError(f"[{name}] field is an invalid Base64") from None


def _b64_int(entry: Mapping[str, Any], name: str) -> int:
    return int.from_bytes(_b64_field(entry, name), "big")


def b64url_decode(text: str) -> bytes:
    """Base64url with or without padding; anything outside the alphabet raises ValueError."""
    try:
        return base64.b64decode(text.translate(_URL_TO_STD) + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


_URL_TO_STD = str.maketrans("-_", "+/")


# -- tokens ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Jwt:
    """A parsed (not yet verified) token."""

    alg: str
    kid: str | None
    payload: dict[str, Any]
    payload_segment: str
    signing_input: bytes
    signature: bytes

    @property
    def issuer(self) -> str:
        iss = self.payload.get("iss")
        return iss if isinstance(iss, str) else ""

    @property
    def subject(self) -> str | None:
        sub = self.payload.get("sub")
        return sub if isinstance(sub, str) else None

    @property
    def audiences(self) -> list[str]:
        aud = self.payload.get("aud")
        return [aud] if isinstance(aud, str) else list(aud or [])


def parse_jwt(token: str) -> Jwt:
    """Split and decode a compact JWS; raises `JwtFailure` with jwt_verify_lib's status when malformed."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtFailure(JWT_BAD_FORMAT)
    header_b64, payload_b64, signature_b64 = parts
    try:
        header = json.loads(b64url_decode(header_b64))
    except ValueError:
        raise JwtFailure(JWT_HEADER_PARSE_ERROR) from None
    if not isinstance(header, dict):
        raise JwtFailure(JWT_HEADER_PARSE_ERROR)
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str):
        raise JwtFailure(JWT_HEADER_BAD_ALG)
    if alg not in ALGORITHMS:
        raise JwtFailure(JWT_HEADER_NOT_IMPLEMENTED_ALG)
    if kid is not None and not isinstance(kid, str):
        raise JwtFailure(JWT_HEADER_BAD_KID)
    try:
        payload = json.loads(b64url_decode(payload_b64))
    except ValueError:
        raise JwtFailure(JWT_PAYLOAD_PARSE_ERROR) from None
    if not isinstance(payload, dict) or not _payload_types_ok(payload):
        raise JwtFailure(JWT_PAYLOAD_PARSE_ERROR)
    try:
        signature = b64url_decode(signature_b64)
    except ValueError:
        raise JwtFailure(JWT_SIGNATURE_PARSE_ERROR) from None
    return Jwt(alg, kid, payload, payload_b64, f"{header_b64}.{payload_b64}".encode(), signature)


def _payload_types_ok(payload: Mapping[str, Any]) -> bool:
    for name in ("iss", "sub"):
        if name in payload and not isinstance(payload[name], str):
            return False
    aud = payload.get("aud")
    if aud is not None and not isinstance(aud, str) and not (
            isinstance(aud, list) and all(isinstance(a, str) for a in aud)):
        return False
    for name in ("exp", "nbf", "iat"):
        value = payload.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            return False  # Python's json accepts NaN and Infinity; a token must not live forever by them
    return True


def check_time(jwt: Jwt, now: float, skew: float = CLOCK_SKEW) -> None:
    nbf, exp = jwt.payload.get("nbf"), jwt.payload.get("exp")
    if nbf is not None and now + skew < nbf:
        raise JwtFailure(JWT_NOT_YET_VALID)
    if exp is not None and now > exp + skew:
        raise JwtFailure(JWT_EXPIRED)


def _sanitize_audience(aud: str) -> str:
    # jwt_verify_lib compares audiences without the URL scheme and a trailing slash.
    for scheme in ("http://", "https://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme):]
            break
    return aud[:-1] if aud.endswith("/") else aud


def check_audiences(jwt: Jwt, allowed: Iterable[str]) -> None:
    wanted = {_sanitize_audience(a) for a in allowed}
    if wanted and not any(_sanitize_audience(a) in wanted for a in jwt.audiences):
        raise JwtFailure(JWT_AUDIENCE_NOT_ALLOWED)


def verify_signature(jwt: Jwt, keys: KeySet) -> None:
    """Try the keys that fit the token's kid and alg; raises `JwtFailure` when none verifies."""
    tried = False
    for jwk in keys.keys:
        if jwt.kid is not None and jwk.kid is not None and jwk.kid != jwt.kid:
            continue
        if not jwk.fits(jwt.alg):
            continue
        tried = True
        if _signature_ok(jwt, jwk):
            return
    raise JwtFailure(JWT_VERIFICATION_FAIL if tried else JWKS_KID_ALG_MISMATCH)


def _signature_ok(jwt: Jwt, jwk: Jwk) -> bool:
    alg, key, data, signature = jwt.alg, jwk.key, jwt.signing_input, jwt.signature
    try:
        if isinstance(key, bytes):
            expected = hmac.new(key, data, _HMAC_DIGESTS[alg]).digest()
            return hmac.compare_digest(expected, signature)
        if isinstance(key, rsa.RSAPublicKey):
            algorithm = _HASHES[alg[2:]]()
            pad: padding.AsymmetricPadding = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(
                mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
            key.verify(signature, data, pad, algorithm)
            return True
        if isinstance(key, ec.EllipticCurvePublicKey):
            size = _EC_CURVES[alg][2]
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
            key.verify(der, data, ec.ECDSA(_HASHES[alg[2:]]()))
            return True
        key.verify(signature, data)
        return True
    except InvalidSignature:
        return False


# -- RequestAuthentication → rules -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLocation:
    """Where a token may be: a header (with a value prefix), a query parameter or a cookie."""

    header: str | None = None  # lower-case
    prefix: str = ""
    param: str | None = None
    cookie: str | None = None

    def extract(self, head: RequestHeadLike) -> list[str]:
        if self.header is not None:
            return [t for v in head.headers.get_all(self.header) if (t := self._from_header(v))]
        if self.param is not None:
            query = urllib.parse.urlsplit(head.path).query
            return [v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k == self.param and v]
        tokens = []
        for value in head.headers.get_all("cookie"):
            for pair in value.split(";"):
                name, sep, token = pair.strip().partition("=")
                if sep and name == self.cookie and token:
                    tokens.append(token)
        return tokens

    def _from_header(self, value: str) -> str | None:
        # Envoy finds the prefix anywhere in the value and takes the run of token characters after it.
        if not self.prefix:
            return value.strip() or None
        pos = value.find(self.prefix)
        if pos < 0:
            return None
        match = _TOKEN_CHARS.search(value, pos + len(self.prefix))
        return match.group(0) if match else None


DEFAULT_LOCATIONS = (TokenLocation(header=DEFAULT_HEADER[0], prefix=DEFAULT_HEADER[1]),
                     TokenLocation(param=DEFAULT_PARAM))


@dataclass(frozen=True)
class JwtRule:
    """One `jwtRules` entry of one RequestAuthentication."""

    policy: str  # "<ns>/<name>"
    index: int
    issuer: str
    audiences: tuple[str, ...] = ()
    keys: KeySet | None = None  # inline `jwks`
    keys_error: str | None = None  # why inline `jwks` is unusable
    jwks_uri: str | None = None  # None with no inline keys: OpenID discovery from the issuer
    locations: tuple[TokenLocation, ...] = DEFAULT_LOCATIONS
    output_payload_to_header: str | None = None
    forward_original_token: bool = False
    claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    timeout: float = JWKS_TIMEOUT

    @property
    def inline(self) -> bool:
        return self.keys is not None or self.keys_error is not None

    @property
    def source(self) -> JwksSource:
        if self.jwks_uri is not None:
            return JwksSource(self.jwks_uri, discovery=False)
        return JwksSource(self.issuer.rstrip("/") + OPENID_DISCOVERY, discovery=True)


@dataclass(frozen=True)
class JwksSource:
    """Where an issuer's keys are fetched from: its jwksUri, or its OpenID discovery document."""

    url: str
    discovery: bool


@dataclass(frozen=True)
class _Compiled:
    rule: JwtRule
    attachment: Attachment


class RequestAuthnSet:
    """Every RequestAuthentication, compiled for one waypoint; `for_service` gives the rules that apply to a
    request for that destination (cached)."""

    def __init__(self, rules: tuple[_Compiled, ...], errors: tuple[ConfigError, ...]) -> None:
        self._rules = rules
        self.errors = errors
        self._by_service: dict[tuple[str, str] | None, tuple[JwtRule, ...]] = {}

    @classmethod
    def compile(cls, objects: Iterable[Mapping[str, Any]], scope: WaypointScope) -> RequestAuthnSet:
        errors: list[ConfigError] = []
        rules: list[_Compiled] = []
        for obj in objects:
            namespace, name = identify(obj)
            spec = obj.get("spec")
            if not name or spec is None:
                continue
            if not isinstance(spec, Mapping):
                errors.append(ConfigError(KIND, namespace, name, "spec", "must be an object; the policy is ignored"))
                continue
            target = attachment(obj, KIND, scope, errors)
            if target is None:
                continue
            raw_rules = spec.get("jwtRules") or []
            if not isinstance(raw_rules, list):
                errors.append(ConfigError(KIND, namespace, name, "spec.jwtRules", "must be a list"))
                continue
            for index, raw in enumerate(raw_rules):
                rule = _compile_rule(f"{namespace}/{name}", index, raw, errors)
                if rule is not None:
                    rules.append(_Compiled(rule, target))
        for error in errors:
            log.warning("%s", error)
        return cls(tuple(rules), tuple(errors))

    @property
    def rules(self) -> tuple[JwtRule, ...]:
        return tuple(c.rule for c in self._rules)

    def for_service(self, service: ServiceLike | None) -> tuple[JwtRule, ...]:
        key = (service.namespace, service.name) if service is not None else None
        found = self._by_service.get(key)
        if found is None:
            found = self._by_service[key] = tuple(c.rule for c in self._rules if c.attachment.applies_to(service))
        return found


def _compile_rule(policy: str, index: int, raw: Any, errors: list[ConfigError]) -> JwtRule | None:
    namespace, _, name = policy.partition("/")
    where = f"spec.jwtRules[{index}]"

    def error(field: str, message: str, severity: Severity = "error") -> None:
        errors.append(ConfigError(KIND, namespace, name, f"{where}{field}", message, severity))

    if not isinstance(raw, Mapping):
        error("", "must be an object; the rule is ignored")
        return None
    issuer = raw.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        error(".issuer", "is required; the rule is ignored")
        return None
    audiences = _string_list(raw.get("audiences"), ".audiences", error)
    keys = keys_error = jwks_uri = None
    if raw.get("jwks"):
        if raw.get("jwksUri"):
            error(".jwksUri", "ignored: the inline jwks is used", "warning")
        try:
            keys = KeySet.parse(str(raw["jwks"]))
        except JwksError as exc:
            keys_error = str(exc)
            error(".jwks", f"{exc}; tokens from {issuer} are rejected (401 {JWT_VERIFICATION_FAIL})")
    elif raw.get("jwksUri"):
        jwks_uri = str(raw["jwksUri"])
        if urllib.parse.urlsplit(jwks_uri).scheme not in ("http", "https"):
            error(".jwksUri", f"{jwks_uri!r} must be an http:// or https:// URL; the rule is ignored")
            return None
    elif urllib.parse.urlsplit(issuer).scheme not in ("http", "https"):
        error("", f"needs jwks or jwksUri: the issuer {issuer!r} is not a URL to discover keys from; the rule "
              "is ignored")
        return None
    locations: list[TokenLocation] = []
    for i, header in enumerate(_object_list(raw.get("fromHeaders"), ".fromHeaders", error)):
        if not isinstance(header, Mapping) or not isinstance(header.get("name"), str) or not header["name"]:
            error(f".fromHeaders[{i}]", "needs a name; the location is ignored")
            continue
        locations.append(TokenLocation(header=header["name"].lower(), prefix=str(header.get("prefix") or "")))
    locations += [TokenLocation(param=p) for p in _string_list(raw.get("fromParams"), ".fromParams", error)]
    locations += [TokenLocation(cookie=c) for c in _string_list(raw.get("fromCookies"), ".fromCookies", error)]
    claim_headers = []
    for i, item in enumerate(_object_list(raw.get("outputClaimToHeaders"), ".outputClaimToHeaders", error)):
        if (not isinstance(item, Mapping) or not isinstance(item.get("header"), str) or not item["header"]
                or not isinstance(item.get("claim"), str) or not item["claim"]):
            error(f".outputClaimToHeaders[{i}]", "needs a header and a claim; ignored")
            continue
        claim_headers.append((item["header"].lower(), item["claim"]))
    payload_header = raw.get("outputPayloadToHeader")
    timeout = JWKS_TIMEOUT
    if raw.get("timeout") is not None:
        try:
            seconds = parse_duration(raw["timeout"], ".timeout")
        except Invalid:
            seconds = 0.0
        if seconds <= 0:
            error(".timeout", f"{raw['timeout']!r} is not a duration like '5s'; using {JWKS_TIMEOUT:g}s")
        else:
            timeout = seconds
    return JwtRule(
        policy, index, issuer, tuple(audiences), keys, keys_error, jwks_uri,
        tuple(locations) or DEFAULT_LOCATIONS,
        payload_header.lower() if isinstance(payload_header, str) and payload_header else None,
        raw.get("forwardOriginalToken") is True, tuple(claim_headers), timeout)


def _object_list(value: Any, field: str, error: Callable[[str, str], None]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        error(field, "must be a list; ignored")
        return []
    return value


def _string_list(value: Any, field: str, error: Callable[[str, str], None]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        error(field, "must be a list of non-empty strings; ignored")
        return []
    return list(value)


# -- one request -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeysPending:
    """An issuer's keys have not been fetched yet (the first fetch is under way)."""

    source: JwksSource


@dataclass(frozen=True)
class KeysFailed:
    """An issuer's keys are unavailable; `status` is what a request with its token is answered."""

    status: str


KeyState = KeySet | KeysPending | KeysFailed


@dataclass(frozen=True)
class JwtResult:
    """The outcome for one request. When `ok`, apply `headers_to_remove` then `headers_to_set` to the
    upstream request and hand `principal`/`claims` to authorization. Otherwise answer `status` with `body`
    and `response_headers` (`details` is Envoy's response code details for the access log)."""

    ok: bool
    status: int = 200
    body: bytes = b""
    reason: str = ""
    principal: str | None = None
    claims: Mapping[str, Any] | None = None
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()

    @property
    def audiences(self) -> tuple[str, ...] | None:
        if self.claims is None:
            return None
        aud = self.claims.get("aud")
        return (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))

    @property
    def presenter(self) -> str | None:
        azp = self.claims.get("azp") if self.claims is not None else None
        return azp if isinstance(azp, str) else None

    @property
    def details(self) -> str:
        return "" if self.ok else "jwt_authn_access_denied{" + re.sub(r"\s", "_", self.reason) + "}"


NO_TOKEN = JwtResult(True)


def _rejected(status: str, head: RequestHeadLike) -> JwtResult:
    code = 403 if status == JWT_AUDIENCE_NOT_ALLOWED else 401
    url = f"{head.scheme}://{head.authority}{urllib.parse.urlsplit(head.path).path}"
    return JwtResult(False, code, status.encode(), status,
                     response_headers=(("www-authenticate", f'Bearer realm="{url}", error="invalid_token"'),))


def authenticate_request(head: RequestHeadLike, rules: Iterable[JwtRule], keys: Callable[[JwtRule], KeyState],
                         now: float, skew: float = CLOCK_SKEW) -> JwtResult | KeysPending:
    """Authenticate one request against the rules that apply to it. Returns `KeysPending` when a token
    needs keys whose first fetch has not finished (the caller waits for it and asks again)."""
    rules = tuple(rules)
    if not rules:
        return NO_TOKEN
    issuers: dict[TokenLocation, set[str]] = {}
    for rule in rules:
        for location in rule.locations:
            issuers.setdefault(location, set()).add(rule.issuer)
    found: dict[str, list[TokenLocation]] = {}  # token → the locations it was found at
    for location in issuers:
        for token in location.extract(head):
            found.setdefault(token, []).append(location)
    if not found:
        return NO_TOKEN
    verified: list[tuple[Jwt, JwtRule]] = []
    remove: list[str] = []
    for token, locations in found.items():
        outcome = _verify_token(token, locations, issuers, rules, keys, now, skew)
        if isinstance(outcome, KeysPending):
            return outcome
        if isinstance(outcome, str):
            return _rejected(outcome, head)
        verified.append(outcome)
        if not outcome[1].forward_original_token:
            remove += [loc.header for loc in locations if loc.header is not None]
    jwt, rule = verified[0]
    return JwtResult(True, principal=f"{jwt.issuer}/{jwt.subject}" if jwt.subject is not None else None,
                     claims=jwt.payload, headers_to_set=_output_headers(jwt, rule),
                     headers_to_remove=tuple(dict.fromkeys(remove)))


def _verify_token(token: str, locations: list[TokenLocation], issuers: Mapping[TokenLocation, set[str]],
                  rules: tuple[JwtRule, ...], keys: Callable[[JwtRule], KeyState], now: float,
                  skew: float) -> tuple[Jwt, JwtRule] | str | KeysPending:
    """The token and the rule that verified it, or the failure status."""
    try:
        jwt = parse_jwt(token)
    except JwtFailure as exc:
        return exc.status
    if not any(jwt.issuer in issuers[loc] for loc in locations):
        return JWT_UNKNOWN_ISSUER
    candidates = [r for r in rules if r.issuer == jwt.issuer and any(loc in r.locations for loc in locations)]
    failure = JWT_VERIFICATION_FAIL
    for rule in candidates:
        try:
            pending = _verify_with(jwt, rule, keys, now, skew)
        except JwtFailure as exc:
            if rule is candidates[0]:
                failure = exc.status  # several rules for one issuer: report why the first one refused
            continue
        return pending if pending is not None else (jwt, rule)
    return failure


def _verify_with(jwt: Jwt, rule: JwtRule, keys: Callable[[JwtRule], KeyState], now: float,
                 skew: float) -> KeysPending | None:
    """Envoy's order: time, audiences, then the signature; raises `JwtFailure`, None when verified."""
    check_time(jwt, now, skew)
    check_audiences(jwt, rule.audiences)
    state: KeyState
    if rule.keys is not None:
        state = rule.keys
    elif rule.keys_error is not None:
        state = KeysFailed(JWT_VERIFICATION_FAIL)
    else:
        state = keys(rule)
    if isinstance(state, KeysPending):
        return state
    if isinstance(state, KeysFailed):
        raise JwtFailure(state.status)
    verify_signature(jwt, state)
    return None


def _output_headers(jwt: Jwt, rule: JwtRule) -> tuple[tuple[str, str], ...]:
    out = []
    if rule.output_payload_to_header is not None:
        out.append((rule.output_payload_to_header, jwt.payload_segment))
    for header, claim in rule.claim_to_headers:
        value: Any = jwt.payload
        for key in claim.split("."):  # nested claims, as Envoy's claim_to_headers
            value = value.get(key) if isinstance(value, dict) else None
        text = _claim_text(value)
        if text is not None:
            out.append((header, text))
    return tuple(out)


def _claim_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, (list, dict)):  # Envoy: JSON, base64-encoded
        return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()
    return None


# -- the asyncio shell: JWKS fetching and the per-request entry point ------------------------------------------
@dataclass(frozen=True)
class JwksSettings:
    refresh: float = JWKS_REFRESH
    retry_initial: float = JWKS_RETRY_INITIAL
    retry_max: float = JWKS_RETRY_MAX
    max_bytes: int = JWKS_MAX_BYTES
    skew: float = CLOCK_SKEW


@dataclass
class _Fetcher:
    source: JwksSource
    timeout: float
    keys: KeySet | None = None
    error: str | None = None
    fetched_at: float | None = None
    attempted: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def state(self) -> KeyState:
        if self.keys is not None:
            return self.keys  # a failed refresh keeps the last keys
        if self.error is not None:
            return KeysFailed(JWKS_FETCH_FAIL)
        return KeysPending(self.source)


class JwtAuthenticator:
    """RequestAuthentication for one waypoint: compiled rules, fetched key sets, per-request verification.

    `update(objects)` recompiles (call it on every config change); fetches start as soon as a loop runs
    (`start()` or the first `update`/`authenticate` inside one) and stop with `close()`. `errors` holds the
    compile errors plus one per rule whose keys cannot be fetched; `on_change` (optional) is called when that
    fetch-error set changes, so the caller can report it.
    """

    def __init__(self, *, waypoint: tuple[str, str] | WaypointScope, root_namespace: str = ROOT_NAMESPACE,
                 untargeted: bool = False, settings: JwksSettings | None = None,
                 clock: Callable[[], float] = time.time, on_change: Callable[[], None] | None = None) -> None:
        self.scope = waypoint if isinstance(waypoint, WaypointScope) else WaypointScope(
            waypoint[0], waypoint[1], root_namespace, untargeted)
        self.settings = settings or JwksSettings()
        self.clock = clock
        self.on_change = on_change
        self.rules = RequestAuthnSet((), ())
        self._fetchers: dict[JwksSource, _Fetcher] = {}
        self._tasks = OwnedTasks(log)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- configuration ---------------------------------------------------------------------------------------
    def update(self, objects: Iterable[Mapping[str, Any]]) -> None:
        self.rules = RequestAuthnSet.compile(objects, self.scope)
        wanted: dict[JwksSource, float] = {}
        for rule in self.rules.rules:
            if not rule.inline:
                wanted[rule.source] = max(wanted.get(rule.source, 0.0), rule.timeout)
        for source in [s for s in self._fetchers if s not in wanted]:
            fetcher = self._fetchers.pop(source)
            if fetcher.task is not None:
                fetcher.task.cancel()
        for source, timeout in wanted.items():
            existing = self._fetchers.get(source)
            if existing is None:
                self._fetchers[source] = _Fetcher(source, timeout)
            else:
                existing.timeout = timeout
        self._start_fetches()

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        fetch_errors = []
        for rule in self.rules.rules:
            fetcher = None if rule.inline else self._fetchers.get(rule.source)
            if fetcher is None or fetcher.error is None:
                continue
            namespace, _, name = rule.policy.partition("/")
            what = "jwksUri" if rule.jwks_uri is not None else "issuer"
            stale = " (the keys fetched before stay in use)" if fetcher.keys is not None else (
                f"; requests with a token from {rule.issuer} are rejected (401 {JWKS_FETCH_FAIL}) until it succeeds")
            fetch_errors.append(ConfigError(KIND, namespace, name, f"spec.jwtRules[{rule.index}].{what}",
                                            f"{fetcher.error}{stale}"))
        return (*self.rules.errors, *fetch_errors)

    def describe(self) -> dict[str, Any]:
        """Rules and key sources for the admin config dump."""
        return {
            "rules": [{"policy": r.policy, "index": r.index, "issuer": r.issuer, "audiences": list(r.audiences),
                       "jwks": "inline" if r.inline else r.source.url} for r in self.rules.rules],
            "jwks": [{"url": s.url, "keys": len(f.keys.keys) if f.keys is not None else 0, "error": f.error,
                      "fetched_at": f.fetched_at} for s, f in self._fetchers.items()],
        }

    @property
    def fetching(self) -> int:
        """How many JWKS sources are being fetched/refreshed right now."""
        return len(self._tasks)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._closed = False
        self._start_fetches()

    async def close(self) -> None:
        self._closed = True
        await self._tasks.cancel_all()
        for fetcher in self._fetchers.values():
            fetcher.task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _start_fetches(self) -> None:
        if self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop yet: start() or the next update()/authenticate() will
        for fetcher in self._fetchers.values():
            if fetcher.task is None or fetcher.task.done():
                fetcher.task = self._tasks.spawn(self._refresh(fetcher), name=f"jwks {fetcher.source.url}")

    # -- per request ---------------------------------------------------------------------------------------------
    async def authenticate(self, head: RequestHeadLike, service: ServiceLike | None = None) -> JwtResult:
        rules = self.rules.for_service(service)
        if not rules:
            return NO_TOKEN
        result = authenticate_request(head, rules, self._keys, self.clock(), self.settings.skew)
        if isinstance(result, KeysPending):
            self._start_fetches()
            fetcher = self._fetchers.get(result.source)
            if fetcher is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fetcher.attempted.wait(), fetcher.timeout + 1.0)
            result = authenticate_request(head, rules, self._keys, self.clock(), self.settings.skew)
            if isinstance(result, KeysPending):  # the first fetch did not finish in time
                result = _rejected(JWKS_FETCH_FAIL, head)
        return result

    def _keys(self, rule: JwtRule) -> KeyState:
        fetcher = self._fetchers.get(rule.source)
        return fetcher.state if fetcher is not None else KeysFailed(JWKS_FETCH_FAIL)

    # -- fetching ----------------------------------------------------------------------------------------------
    async def _refresh(self, fetcher: _Fetcher) -> None:
        delay = self.settings.retry_initial
        while True:
            try:
                keys = await self._fetch(fetcher)
            except JwksError as exc:
                changed = fetcher.error != str(exc)
                fetcher.error = str(exc)
                fetcher.attempted.set()
                if changed:
                    log.warning("JWKS %s: %s; retrying in %.0fs", fetcher.source.url, exc, delay)
                    self._notify()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            recovered = fetcher.error is not None
            fetcher.keys, fetcher.error, fetcher.fetched_at = keys, None, self.clock()
            fetcher.attempted.set()
            delay = self.settings.retry_initial
            if recovered:
                log.info("JWKS %s: fetched %d keys", fetcher.source.url, len(keys.keys))
                self._notify()
            await asyncio.sleep(self.settings.refresh)

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _fetch(self, fetcher: _Fetcher) -> KeySet:
        url = fetcher.source.url
        if fetcher.source.discovery:
            document = await self._get(url, fetcher.timeout)
            try:
                jwks_uri = json.loads(document)["jwks_uri"]
            except (ValueError, KeyError, TypeError):
                raise JwksError(f"OpenID discovery document {url} has no jwks_uri") from None
            if not isinstance(jwks_uri, str):
                raise JwksError(f"OpenID discovery document {url} has no jwks_uri")
            url = jwks_uri
        try:
            return KeySet.parse(await self._get(url, fetcher.timeout))
        except JwksError as exc:
            raise JwksError(f"{url}: {exc}") from None

    async def _get(self, url: str, timeout: float) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if not 200 <= response.status < 300:
                    raise JwksError(f"fetching {url}: HTTP {response.status}")
                body = bytearray()
                while chunk := await response.content.read(64 * 1024):
                    body += chunk
                    if len(body) > self.settings.max_bytes:
                        raise JwksError(f"fetching {url}: larger than {self.settings.max_bytes} bytes")
                return bytes(body)
        except TimeoutError:
            raise JwksError(f"fetching {url}: no answer within {timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise JwksError(f"fetching {url}: {exc or type(exc).__name__}") from None
