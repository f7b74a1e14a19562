"""RequestAuthentication at the waypoint: the sans-IO core (parse, verify, per-request outcome) with real keys."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.waypoint.security.jwtkeys import SigningKey, b64, jwks, make_key
from waypoint.http.message import Headers, RequestHead
from waypoint.security import ServiceRef, WaypointScope
from waypoint.security.jwt import (
    JWKS_FETCH_FAIL,
    JWKS_KID_ALG_MISMATCH,
    JWT_AUDIENCE_NOT_ALLOWED,
    JWT_BAD_FORMAT,
    JWT_EXPIRED,
    JWT_HEADER_NOT_IMPLEMENTED_ALG,
    JWT_HEADER_PARSE_ERROR,
    JWT_NOT_YET_VALID,
    JWT_PAYLOAD_PARSE_ERROR,
    JWT_UNKNOWN_ISSUER,
    JWT_VERIFICATION_FAIL,
    JwksError,
    JwksSource,
    JwtAuthenticator,
    JwtFailure,
    JwtResult,
    JwtRule,
    KeySet,
    KeysFailed,
    KeysPending,
    KeyState,
    RequestAuthnSet,
    authenticate_request,
    parse_jwt,
)

NOW = 1_700_000_000.0
ISSUER = "https://issuer.example"
OTHER_ISSUER = "https://other.example"
SCOPE = WaypointScope("bookinfo", "waypoint")
GATEWAY = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
DETAILS = ServiceRef("bookinfo", "details")


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return make_key("RS256")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return make_key("ES256")


def claims(**extra: Any) -> dict[str, Any]:
    return {"iss": ISSUER, "sub": "alice", "aud": "bookinfo", "exp": NOW + 3600, "iat": NOW - 10, **extra}


def request_authn(rules: list[dict[str, Any]], name: str = "jwt", namespace: str = "bookinfo",
                  targets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"targetRefs": [GATEWAY] if targets is None else targets, "jwtRules": rules}}


def compiled(*rules: dict[str, Any]) -> tuple[JwtRule, ...]:
    authn = RequestAuthnSet.compile([request_authn(list(rules))], SCOPE)
    assert authn.errors == ()
    return authn.for_service(DETAILS)


def head(token: str | None = None, path: str = "/details/0", **headers: str) -> RequestHead:
    items = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if token is not None:
        items.append(("authorization", f"Bearer {token}"))
    return RequestHead("GET", path, "details:9080", Headers(items))


def no_remote(rule: JwtRule) -> KeyState:
    raise AssertionError(f"{rule.issuer} has inline keys")


def run(rules: tuple[JwtRule, ...], request: RequestHead, keys: Any = no_remote, now: float = NOW) -> JwtResult:
    result = authenticate_request(request, rules, keys, now)
    assert isinstance(result, JwtResult)
    return result


def rejected(result: JwtResult, status: str, code: int = 401) -> bool:
    return (not result.ok and result.status == code and result.body == status.encode()
            and result.reason == status)


# -- signatures ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                                 "EdDSA", "HS256", "HS512"])
def test_every_algorithm_verifies_and_a_tampered_token_does_not(alg: str, rsa_key: SigningKey) -> None:
    key = make_key(alg, rsa_key=rsa_key.private if alg[:2] in ("RS", "PS") else None)  # type: ignore[arg-type]
    rules = compiled({"issuer": ISSUER, "jwks": jwks(key)})
    token = key.sign(claims())
    result = run(rules, head(token))
    assert result.ok and result.principal == f"{ISSUER}/alice" and result.claims == claims()
    header, _payload, signature = token.split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='mallory')).encode())}.{signature}"
    assert rejected(run(rules, head(forged)), JWT_VERIFICATION_FAIL)


def test_a_key_of_another_issuer_set_does_not_verify(rsa_key: SigningKey) -> None:
    stranger = make_key("RS256", kid=rsa_key.kid)
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)})
    assert rejected(run(rules, head(stranger.sign(claims()))), JWT_VERIFICATION_FAIL)


def test_kid_or_alg_without_a_key_is_reported_as_such(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)})
    assert rejected(run(rules, head(rsa_key.sign(claims(), {"kid": "rotated-away"}))), JWKS_KID_ALG_MISMATCH)
    assert rejected(run(rules, head(ec_key.sign(claims()))), JWKS_KID_ALG_MISMATCH)
    # no kid in the token: every key that fits the algorithm is tried
    kidless = SigningKey("RS256", rsa_key.private, kid="")
    token = kidless.sign(claims(), {"kid": None})
    assert run(rules, head(token)).principal == f"{ISSUER}/alice"


def test_unsigned_and_malformed_tokens() -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(make_key("HS256"))})
    unsigned_header = b64(json.dumps({"alg": "none"}).encode())
    none = f"{unsigned_header}.{b64(json.dumps(claims()).encode())}."
    assert rejected(run(rules, head(none)), JWT_HEADER_NOT_IMPLEMENTED_ALG)
    assert rejected(run(rules, head("abc.def")), JWT_BAD_FORMAT)
    assert rejected(run(rules, head("!!!.e30.e30")), JWT_HEADER_PARSE_ERROR)
    key = make_key("HS256")
    forever = key.sign(json.loads(json.dumps(claims(exp=float("inf")))))
    assert rejected(run(compiled({"issuer": ISSUER, "jwks": jwks(key)}), head(forever)), JWT_PAYLOAD_PARSE_ERROR)


# -- claims checks ---------------------------------------------------------------------------------------------
def test_expiry_and_not_before_with_sixty_seconds_of_skew(rsa_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)})
    assert run(rules, head(rsa_key.sign(claims(exp=NOW - 59)))).ok
    assert rejected(run(rules, head(rsa_key.sign(claims(exp=NOW - 61)))), JWT_EXPIRED)
    assert run(rules, head(rsa_key.sign(claims(nbf=NOW + 59)))).ok
    assert rejected(run(rules, head(rsa_key.sign(claims(nbf=NOW + 61)))), JWT_NOT_YET_VALID)
    expired = run(rules, head(rsa_key.sign(claims(exp=NOW - 61))))
    assert expired.details == "jwt_authn_access_denied{Jwt_is_expired}"
    assert dict(expired.response_headers)["www-authenticate"] == (
        'Bearer realm="http://details:9080/details/0", error="invalid_token"')


def test_issuer_must_be_configured(rsa_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)})
    assert rejected(run(rules, head(rsa_key.sign(claims(iss=OTHER_ISSUER)))), JWT_UNKNOWN_ISSUER)
    no_iss = claims()
    del no_iss["iss"]
    assert rejected(run(rules, head(rsa_key.sign(no_iss))), JWT_UNKNOWN_ISSUER)


def test_audiences_are_403_and_compared_without_scheme_or_trailing_slash(rsa_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key), "audiences": ["https://bookinfo.example/", "api"]})
    assert run(rules, head(rsa_key.sign(claims(aud="bookinfo.example")))).ok
    assert run(rules, head(rsa_key.sign(claims(aud=["x", "http://api"])))).ok
    assert rejected(run(rules, head(rsa_key.sign(claims(aud="other")))), JWT_AUDIENCE_NOT_ALLOWED, 403)
    no_aud = claims()
    del no_aud["aud"]
    assert rejected(run(rules, head(rsa_key.sign(no_aud))), JWT_AUDIENCE_NOT_ALLOWED, 403)


# -- where tokens are, and what goes upstream ------------------------------------------------------------------
def test_no_token_passes_without_a_principal(rsa_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)})
    result = run(rules, head(None, cookie="session=1"))
    assert result.ok and result.principal is None and result.claims is None
    assert run(rules, head(None, authorization="Basic dXNlcjpwdw==")).ok  # not a bearer token


def test_token_header_is_removed_unless_forwarded(rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims())
    stripped = run(compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)}), head(token))
    assert stripped.headers_to_remove == ("authorization",)
    kept = run(compiled({"issuer": ISSUER, "jwks": jwks(rsa_key), "forwardOriginalToken": True}), head(token))
    assert kept.ok and kept.headers_to_remove == ()


def test_custom_locations(rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims())
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key), "fromHeaders": [{"name": "X-Jwt-Assertion"},
                     {"name": "x-token", "prefix": "JWT "}], "fromParams": ["my_token"], "fromCookies": ["auth"]})
    assert run(rules, head(None, x_jwt_assertion=token)).headers_to_remove == ("x-jwt-assertion",)
    assert run(rules, head(None, x_token=f"JWT {token}")).principal == f"{ISSUER}/alice"
    from_param = run(rules, head(None, path=f"/details/0?a=1&my_token={token}"))
    assert from_param.ok and from_param.principal and from_param.headers_to_remove == ()
    assert run(rules, head(None, cookie=f"a=b; auth={token}")).principal
    # the default location is not configured any more: a bearer token there is ignored
    assert run(rules, head(token)).principal is None


def test_default_locations_include_the_access_token_parameter(rsa_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)})
    assert run(rules, head(None, path=f"/x?access_token={rsa_key.sign(claims())}")).principal == f"{ISSUER}/alice"


def test_output_payload_and_claims_to_headers(rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(groups=["a", "b"], org={"team": "blue"}, level=3, admin=True))
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key), "outputPayloadToHeader": "X-Jwt-Payload",
                      "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"},
                                               {"header": "x-team", "claim": "org.team"},
                                               {"header": "x-level", "claim": "level"},
                                               {"header": "x-admin", "claim": "admin"},
                                               {"header": "x-groups", "claim": "groups"},
                                               {"header": "x-absent", "claim": "nope"}]})
    out = dict(run(rules, head(token)).headers_to_set)
    assert out["x-jwt-payload"] == token.split(".")[1]
    assert (out["x-sub"], out["x-team"], out["x-level"], out["x-admin"]) == ("alice", "blue", "3", "true")
    assert json.loads(base64.b64decode(out["x-groups"])) == ["a", "b"]
    assert "x-absent" not in out


def test_every_token_present_must_verify(rsa_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwks": jwks(rsa_key), "fromHeaders": [
        {"name": "authorization", "prefix": "Bearer "}, {"name": "x-second"}]})
    good, bad = rsa_key.sign(claims()), rsa_key.sign(claims(exp=NOW - 3600))
    assert rejected(run(rules, head(good, x_second=bad)), JWT_EXPIRED)
    both = run(rules, head(good, x_second=rsa_key.sign(claims(sub="bob"))))
    assert both.principal == f"{ISSUER}/alice" and set(both.headers_to_remove) == {"authorization", "x-second"}


def test_audiences_and_presenter_for_authorization(rsa_key: SigningKey) -> None:
    result = run(compiled({"issuer": ISSUER, "jwks": jwks(rsa_key)}),
                 head(rsa_key.sign(claims(aud=["a", "b"], azp="web"))))
    assert result.audiences == ("a", "b") and result.presenter == "web"


# -- several issuers, keys from elsewhere ----------------------------------------------------------------------
def test_remote_keys_pending_failed_and_other_issuers_unaffected(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    rules = compiled({"issuer": ISSUER, "jwksUri": "https://issuer.example/jwks"},
                     {"issuer": OTHER_ISSUER, "jwks": jwks(ec_key)})
    source = JwksSource("https://issuer.example/jwks", discovery=False)
    assert rules[0].source == source
    token = rsa_key.sign(claims())
    assert authenticate_request(head(token), rules, lambda r: KeysPending(source), NOW) == KeysPending(source)
    failed = run(rules, head(token), lambda r: KeysFailed(JWKS_FETCH_FAIL))
    assert rejected(failed, JWKS_FETCH_FAIL)
    other = run(rules, head(ec_key.sign(claims(iss=OTHER_ISSUER))), lambda r: KeysFailed(JWKS_FETCH_FAIL))
    assert other.ok and other.principal == f"{OTHER_ISSUER}/alice"
    assert run(rules, head(token), lambda r: KeySet.parse(jwks(rsa_key))).ok


def test_no_jwks_means_openid_discovery() -> None:
    (rule,) = compiled({"issuer": ISSUER + "/"})
    assert rule.source == JwksSource("https://issuer.example/.well-known/openid-configuration", discovery=True)


def test_an_unusable_inline_jwks_rejects_that_issuers_tokens(rsa_key: SigningKey) -> None:
    authn = RequestAuthnSet.compile([request_authn([{"issuer": ISSUER, "jwks": '{"keys": []}'}])], SCOPE)
    assert [e.field for e in authn.errors] == ["spec.jwtRules[0].jwks"]
    assert rejected(run(authn.for_service(DETAILS), head(rsa_key.sign(claims()))), JWT_VERIFICATION_FAIL)


# -- configuration ---------------------------------------------------------------------------------------------
def test_targeting_follows_the_authorization_rules(rsa_key: SigningKey) -> None:
    rule = {"issuer": ISSUER, "jwks": jwks(rsa_key)}
    objects = [request_authn([rule], "for-details", targets=[{"kind": "Service", "name": "details"}]),
               request_authn([rule], "by-selector", targets=[]),
               request_authn([{**rule, "issuer": OTHER_ISSUER}], "whole-waypoint")]
    objects[1]["spec"]["selector"] = {"matchLabels": {"app": "details"}}
    authn = RequestAuthnSet.compile(objects, SCOPE)
    assert [r.policy for r in authn.for_service(DETAILS)] == ["bookinfo/for-details", "bookinfo/whole-waypoint"]
    assert [r.issuer for r in authn.for_service(ServiceRef("bookinfo", "reviews"))] == [OTHER_ISSUER]
    assert [r.issuer for r in authn.for_service(None)] == [OTHER_ISSUER]


def test_config_errors_are_reported() -> None:
    authn = RequestAuthnSet.compile([request_authn([
        {"jwksUri": "https://x/jwks"},
        {"issuer": ISSUER, "jwksUri": "file:///etc/jwks.json"},
        {"issuer": ISSUER, "fromHeaders": [{"prefix": "Bearer "}], "timeout": "soon"},
        {"issuer": "testing@secure.istio.io"},
        {"issuer": ISSUER, "jwks": jwks(make_key("HS256")), "jwksUri": "https://x/jwks"},
    ])], SCOPE)
    assert [(e.field, e.severity) for e in authn.errors] == [
        ("spec.jwtRules[0].issuer", "error"), ("spec.jwtRules[1].jwksUri", "error"),
        ("spec.jwtRules[2].fromHeaders[0]", "error"), ("spec.jwtRules[2].timeout", "error"),
        ("spec.jwtRules[3]", "error"), ("spec.jwtRules[4].jwksUri", "warning")]
    assert [r.index for r in authn.rules] == [2, 4]


def test_keyset_parsing_skips_bad_keys_and_needs_one() -> None:
    good = make_key("ES256").jwk
    keys = KeySet.parse(json.dumps({"keys": [{"kty": "RSA", "n": "!!"}, {"kty": "EC", "crv": "P-999"}, good]}))
    assert len(keys.keys) == 1 and len(keys.skipped) == 2
    for document, message in [("not json", "invalid JSON"), ("{}", "[keys]"), ('{"keys": {}}', "not an array"),
                              ('{"keys": [{"kty": "RSA"}]}', "doesn't have any valid public key")]:
        with pytest.raises(JwksError, match=message.replace("[", r"\[").replace("]", r"\]")):
            KeySet.parse(document)


async def test_authenticator_with_inline_keys_needs_no_network(rsa_key: SigningKey) -> None:
    authn = JwtAuthenticator(waypoint=("bookinfo", "waypoint"), clock=lambda: NOW)
    authn.update([request_authn([{"issuer": ISSUER, "jwks": jwks(rsa_key)}],
                                targets=[{"kind": "Service", "name": "details"}])])
    token = rsa_key.sign(claims())
    assert (await authn.authenticate(head(token), DETAILS)).principal == f"{ISSUER}/alice"
    assert (await authn.authenticate(head("garbage"), ServiceRef("bookinfo", "reviews"))).ok  # not targeted
    assert not (await authn.authenticate(head("garbage"), DETAILS)).ok
    assert authn.errors == () and authn.describe()["rules"][0]["jwks"] == "inline"
    await authn.close()


def test_real_clock_is_the_default() -> None:
    authn = JwtAuthenticator(waypoint=("bookinfo", "waypoint"))
    assert abs(authn.clock() - time.time()) < 5


# -- untrusted input never escapes as anything but a refusal ---------------------------------------------------
@given(st.text(alphabet="abcXYZ012-_.=+/!{}\" ", max_size=80))
def test_parse_jwt_only_refuses(token: str) -> None:
    try:
        parse_jwt(token)
    except JwtFailure:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["keys", "kty", "n", "e", "crv", "x", "y", "k", "kid", "alg"]), inner,
                        max_size=5), max_leaves=12))
def test_keyset_parse_only_refuses(document: Any) -> None:
    try:
        KeySet.parse(json.dumps(document))
    except JwksError:
        pass


@given(st.text(max_size=60), st.text(max_size=60))
def test_token_extraction_never_fails(authorization: str, query: str) -> None:
    rules = (JwtRule("bookinfo/jwt", 0, ISSUER, keys=KeySet.parse(jwks(make_key("HS256")))),)
    request = RequestHead("GET", "/?" + query, "h", Headers([("authorization", authorization)]))
    assert isinstance(authenticate_request(request, rules, no_remote, NOW), JwtResult)
