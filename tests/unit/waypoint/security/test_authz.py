"""L7 AuthorizationPolicy at the waypoint as transcripts: policy objects + request → decision."""

from __future__ import annotations

from typing import Any

import pytest

from waypoint.http.message import Headers
from waypoint.security import ServiceRef
from waypoint.security.authz import DENIED_BODY, DENIED_STATUS, AuthzRequest, Decision, PolicySet

WAYPOINT = ("bookinfo", "waypoint")
GATEWAY = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
DETAILS = ServiceRef("bookinfo", "details")
REVIEWS = ServiceRef("bookinfo", "reviews")
PRODUCTPAGE = "cluster.local/ns/bookinfo/sa/bookinfo-productpage"


def policy(name: str, *rules: Any, action: str | None = None, namespace: str = "bookinfo",
           targets: list[dict[str, Any]] | None = None, no_rules: bool = False, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"targetRefs": [GATEWAY] if targets is None else targets, **spec}
    if targets == []:
        del body["targetRefs"]
    if action is not None:
        body["action"] = action
    if not no_rules:
        body["rules"] = list(rules)
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def request(**overrides: Any) -> AuthzRequest:
    fields: dict[str, Any] = {
        "source_principal": "spiffe://" + PRODUCTPAGE, "source_ip": "10.244.1.7", "destination_ip": "10.96.0.20",
        "destination_port": 9080, "host": "details:9080", "method": "GET", "path": "/details/0?lang=en",
        "headers": Headers([("user-agent", "curl/8"), ("x-group", "a"), ("x-group", "b")]),
    }
    fields.update(overrides)
    return AuthzRequest(**fields)


def allows(rule: dict[str, Any], **overrides: Any) -> bool:
    """Whether an ALLOW policy with this single rule lets the request through (i.e. the rule matches)."""
    policies = PolicySet.compile([policy("p", rule)], waypoint=WAYPOINT)
    assert policies.errors == ()
    return policies.evaluate(request(**overrides), DETAILS).allowed


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> dict[str, Any]:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return {"when": [condition]}


JWT = {"request_principal": "https://issuer.example/alice",
       "claims": {"iss": "https://issuer.example", "sub": "alice", "aud": ["bookinfo", "other"], "azp": "web",
                  "groups": ["dev", "ops"], "role": "admin", "nested": {"team": "blue", "n": 3}}}

# (name, rule, request overrides, rule matches?)
FIELD_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    ("principal exact", src(principals=[PRODUCTPAGE]), {}, True),
    ("principal other", src(principals=["cluster.local/ns/bookinfo/sa/other"]), {}, False),
    ("principal prefix", src(principals=["cluster.local/ns/bookinfo/*"]), {}, True),
    ("principal suffix", src(principals=["*/sa/bookinfo-productpage"]), {}, True),
    ("principal presence", src(principals=["*"]), {}, True),
    ("principal presence, no identity", src(principals=["*"]), {"source_principal": None}, False),
    ("principal given without scheme", src(principals=[PRODUCTPAGE]), {"source_principal": PRODUCTPAGE}, True),
    ("notPrincipals hit", src(notPrincipals=[PRODUCTPAGE]), {}, False),
    ("notPrincipals miss", src(notPrincipals=["cluster.local/ns/x/sa/y"]), {}, True),
    ("notPrincipals holds without identity", src(notPrincipals=["*"]), {"source_principal": None}, True),
    ("namespace exact", src(namespaces=["bookinfo"]), {}, True),
    ("namespace other", src(namespaces=["default"]), {}, False),
    ("namespace glob", src(namespaces=["book*"]), {}, True),
    ("namespace needs an identity", src(namespaces=["*"]), {"source_principal": None}, False),
    ("notNamespaces", src(notNamespaces=["bookinfo"]), {}, False),
    ("namespace from source_namespace", src(namespaces=["legacy"]), {"source_namespace": "legacy"}, True),
    ("ipBlocks cidr", src(ipBlocks=["10.244.0.0/16"]), {}, True),
    ("ipBlocks single", src(ipBlocks=["10.244.1.7"]), {}, True),
    ("ipBlocks miss", src(ipBlocks=["192.168.0.0/16"]), {}, False),
    ("ipBlocks v4-mapped source", src(ipBlocks=["10.244.1.7/32"]), {"source_ip": "::ffff:10.244.1.7"}, True),
    ("notIpBlocks", src(notIpBlocks=["10.244.1.0/24"]), {}, False),
    ("remoteIpBlocks default to source", src(remoteIpBlocks=["10.244.1.7"]), {}, True),
    ("remoteIpBlocks from remote_ip", src(remoteIpBlocks=["203.0.113.0/24"]), {"remote_ip": "203.0.113.9"}, True),
    ("notRemoteIpBlocks", src(notRemoteIpBlocks=["203.0.113.0/24"]), {"remote_ip": "203.0.113.9"}, False),
    ("serviceAccounts same namespace", src(serviceAccounts=["bookinfo-productpage"]), {}, True),
    ("serviceAccounts ns/name", src(serviceAccounts=["bookinfo/bookinfo-productpage"]), {}, True),
    ("serviceAccounts other", src(serviceAccounts=["default/bookinfo-productpage"]), {}, False),
    ("notServiceAccounts", src(notServiceAccounts=["bookinfo-productpage"]), {}, False),
    ("requestPrincipals exact", src(requestPrincipals=["https://issuer.example/alice"]), JWT, True),
    ("requestPrincipals issuer, any subject", src(requestPrincipals=["https://issuer.example/*"]), JWT, True),
    ("requestPrincipals any issuer, subject", src(requestPrincipals=["*/alice"]), JWT, True),
    ("requestPrincipals suffix subject", src(requestPrincipals=["*ice"]), JWT, True),
    ("requestPrincipals other subject", src(requestPrincipals=["https://issuer.example/bob"]), JWT, False),
    ("requestPrincipals presence", src(requestPrincipals=["*"]), JWT, True),
    ("requestPrincipals presence, no token", src(requestPrincipals=["*"]), {}, False),
    ("requestPrincipals from principal only", src(requestPrincipals=["https://issuer.example/alice"]),
     {"request_principal": "https://issuer.example/alice"}, True),
    ("notRequestPrincipals holds without token", src(notRequestPrincipals=["*"]), {}, True),
    ("notRequestPrincipals with token", src(notRequestPrincipals=["*"]), JWT, False),
    ("hosts exact, case-insensitive", op(hosts=["DETAILS:9080"]), {}, True),
    ("hosts without port do not match an authority with one", op(hosts=["details"]), {}, False),
    ("hosts port wildcard", op(hosts=["details:*"]), {}, True),
    ("hosts suffix", op(hosts=["*.example.com"]), {"host": "api.Example.com"}, True),
    ("notHosts", op(notHosts=["details*"]), {}, False),
    ("ports", op(ports=["9080"]), {}, True),
    ("ports as numbers", op(ports=[9080]), {}, True),
    ("ports miss", op(ports=["8080"]), {}, False),
    ("notPorts", op(notPorts=["9080"]), {}, False),
    ("methods", op(methods=["GET", "HEAD"]), {}, True),
    ("methods are case-sensitive", op(methods=["get"]), {}, False),
    ("notMethods", op(notMethods=["GET"]), {}, False),
    ("paths exact ignores the query", op(paths=["/details/0"]), {}, True),
    ("paths prefix", op(paths=["/details/*"]), {}, True),
    ("paths suffix", op(paths=["*/0"]), {}, True),
    ("paths presence", op(paths=["*"]), {}, True),
    ("paths miss", op(paths=["/reviews*"]), {}, False),
    ("paths template one segment", op(paths=["/details/{*}"]), {}, True),
    ("paths template one segment is one", op(paths=["/{*}"]), {}, False),
    ("paths template any segments", op(paths=["/{**}"]), {"path": "/a/b/c"}, True),
    ("paths template literal after", op(paths=["/{*}/0"]), {}, True),
    ("notPaths", op(notPaths=["/details/*"]), {}, False),
    ("when header", when("request.headers[User-Agent]", ["curl/*"]), {}, True),
    ("when header miss", when("request.headers[user-agent]", ["Mozilla*"]), {}, False),
    ("when header presence", when("request.headers[user-agent]", ["*"]), {}, True),
    ("when header absent", when("request.headers[x-missing]", ["*"]), {}, False),
    ("when header absent, notValues hold", when("request.headers[x-missing]", not_values=["x"]), {}, True),
    ("when header values joined by comma", when("request.headers[x-group]", ["a,b"]), {}, True),
    ("when header notValues", when("request.headers[user-agent]", not_values=["curl*"]), {}, False),
    ("when source.ip", when("source.ip", ["10.244.0.0/16"]), {}, True),
    ("when remote.ip", when("remote.ip", ["10.244.1.7"]), {}, True),
    ("when source.namespace", when("source.namespace", ["bookinfo"]), {}, True),
    ("when source.principal", when("source.principal", [PRODUCTPAGE]), {}, True),
    ("when source.serviceAccount", when("source.serviceAccount", ["bookinfo/bookinfo-productpage"]), {}, True),
    ("when request.auth.principal", when("request.auth.principal", ["https://issuer.example/alice"]), JWT, True),
    ("when request.auth.audiences", when("request.auth.audiences", ["bookinfo"]), JWT, True),
    ("when request.auth.audiences miss", when("request.auth.audiences", ["nope"]), JWT, False),
    ("when request.auth.audiences explicit", when("request.auth.audiences", ["x"]), {"audiences": ["x"]}, True),
    ("when request.auth.presenter", when("request.auth.presenter", ["web"]), JWT, True),
    ("when claim string", when("request.auth.claims[role]", ["admin"]), JWT, True),
    ("when claim list", when("request.auth.claims[groups]", ["ops"]), JWT, True),
    ("when claim list miss", when("request.auth.claims[groups]", ["qa"]), JWT, False),
    ("when nested claim", when("request.auth.claims[nested][team]", ["blue"]), JWT, True),
    ("when nested claim not a string", when("request.auth.claims[nested][n]", ["3"]), JWT, False),
    ("when claim without token", when("request.auth.claims[role]", ["admin"]), {}, False),
    ("when claim notValues", when("request.auth.claims[role]", not_values=["admin"]), JWT, False),
    ("when destination.ip", when("destination.ip", ["10.96.0.0/12"]), {}, True),
    ("when destination.port", when("destination.port", ["9080"]), {}, True),
    ("when destination.port miss", when("destination.port", ["80"]), {}, False),
    ("when connection.sni never matches", when("connection.sni", ["*"]), {}, False),
    ("when connection.sni notValues hold", when("connection.sni", not_values=["details"]), {}, True),
]


@pytest.mark.parametrize(("rule", "overrides", "expected"), [c[1:] for c in FIELD_CASES],
                         ids=[c[0] for c in FIELD_CASES])
def test_rule_field_matching(rule: dict[str, Any], overrides: dict[str, Any], expected: bool) -> None:
    assert allows(rule, **overrides) is expected


def test_fields_in_an_entry_and_entries_in_a_list() -> None:
    rule = {"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}, {"source": {"namespaces": ["bookinfo"]}}],
            "to": [{"operation": {"methods": ["POST"]}}, {"operation": {"methods": ["GET"], "paths": ["/details/*"]}}]}
    assert allows(rule)  # second source OR second operation
    assert not allows(rule, method="DELETE")
    both = {"to": [{"operation": {"methods": ["GET"], "paths": ["/reviews/*"]}}]}
    assert not allows(both)  # fields of one operation AND
    assert not allows({**both, **when("request.headers[user-agent]", ["curl*"])})
    assert allows({"to": [{"operation": {"methods": ["GET"]}}], **when("source.ip", ["10.0.0.0/8"])})
    assert not allows({"to": [{"operation": {"methods": ["GET"]}}], **when("source.ip", ["192.168.0.0/16"])})


def test_empty_rule_matches_everything_and_allow_without_rules_denies_everything() -> None:
    everything = PolicySet.compile([policy("all", {})], waypoint=WAYPOINT)
    assert everything.evaluate(request(), DETAILS) == Decision(True, "bookinfo/all", 0)
    nothing = PolicySet.compile([policy("none", no_rules=True)], waypoint=WAYPOINT)
    denied = nothing.evaluate(request(), DETAILS)
    assert not denied.allowed and denied.policy is None
    assert denied.details == "rbac_access_denied_matched_policy[none]"


def test_deny_without_rules_never_matches() -> None:
    policies = PolicySet.compile([policy("deny", action="DENY", no_rules=True)], waypoint=WAYPOINT)
    assert policies.evaluate(request(), DETAILS).allowed


def test_deny_beats_allow_and_names_the_rule() -> None:
    policies = PolicySet.compile([
        policy("allow-all", {}),
        policy("deny-post", op(methods=["PUT"]), op(methods=["POST"]), action="DENY"),
    ], waypoint=WAYPOINT)
    assert policies.evaluate(request(method="GET"), DETAILS) == Decision(True, "bookinfo/allow-all", 0)
    denied = policies.evaluate(request(method="POST"), DETAILS)
    assert denied == Decision(False, "bookinfo/deny-post", 1)
    assert denied.details == "rbac_access_denied_matched_policy[ns[bookinfo]-policy[deny-post]-rule[1]]"
    assert (DENIED_STATUS, DENIED_BODY) == (403, b"RBAC: access denied")


def test_no_allow_policy_allows_and_a_non_matching_allow_denies() -> None:
    only_deny = PolicySet.compile([policy("deny-post", op(methods=["POST"]), action="DENY")], waypoint=WAYPOINT)
    assert only_deny.evaluate(request(), DETAILS) == Decision(True)
    allow_get = PolicySet.compile([policy("get", op(methods=["GET"]))], waypoint=WAYPOINT)
    assert not allow_get.evaluate(request(method="POST"), DETAILS).allowed
    assert PolicySet.compile([], waypoint=WAYPOINT).evaluate(request(), DETAILS) == Decision(True)


def test_audit_never_decides_but_is_reported() -> None:
    audit = policy("audit-get", op(methods=["GET"]), action="AUDIT")
    alone = PolicySet.compile([audit], waypoint=WAYPOINT)
    assert alone.evaluate(request(), DETAILS) == Decision(True, audited=("bookinfo/audit-get",))
    assert alone.evaluate(request(method="POST"), DETAILS) == Decision(True)
    with_allow = PolicySet.compile([audit, policy("post-only", op(methods=["POST"]))], waypoint=WAYPOINT)
    denied = with_allow.evaluate(request(), DETAILS)
    assert not denied.allowed and denied.audited == ("bookinfo/audit-get",)


def test_dry_run_policies_are_reported_not_enforced() -> None:
    dry = policy("dry-deny", {}, action="DENY")
    dry["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
    policies = PolicySet.compile([dry], waypoint=WAYPOINT)
    decision = policies.evaluate(request(), DETAILS)
    assert decision.allowed and decision.dry_run == ("dry-run: deny policy match: bookinfo/dry-deny",)
    dry_allow = policy("dry-allow", op(methods=["POST"]))
    dry_allow["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
    decision = PolicySet.compile([dry_allow], waypoint=WAYPOINT).evaluate(request(), DETAILS)
    assert decision.allowed and decision.dry_run == ("dry-run: no allow policies match",)


def test_custom_is_rejected_and_denies_what_its_rules_match() -> None:
    custom = policy("ext", op(paths=["/admin*"]), action="CUSTOM", provider={"name": "opa"})
    policies = PolicySet.compile([custom], waypoint=WAYPOINT)
    assert [e.field for e in policies.errors] == ["spec.action"]
    assert "CUSTOM" in policies.errors[0].message and "opa" in policies.errors[0].message
    assert policies.evaluate(request(path="/admin/x"), DETAILS) == Decision(False, "bookinfo/ext", 0)
    assert policies.evaluate(request(), DETAILS).allowed


@pytest.mark.parametrize("bad_rule", [
    when("no.such.attribute", ["x"]),
    src(ipBlocks=["10.0.0.300"]),
    op(ports=["99999"]),
    op(paths=["/a/{**}/{*}"]),
    op(method=["GET"]),  # typo: unknown field
    src(principals=[""]),
    {"when": [{"key": "source.ip"}]},
    "not-an-object",
], ids=["unknown-attribute", "bad-ip", "bad-port", "bad-template", "unknown-field", "empty-value",
        "when-without-values", "not-an-object"])
def test_a_broken_rule_fails_closed_in_deny_and_never_allows(bad_rule: Any) -> None:
    deny = PolicySet.compile([policy("deny", bad_rule, action="DENY")], waypoint=WAYPOINT)
    assert len(deny.errors) == 1 and deny.errors[0].field == "spec.rules[0]"
    assert "fail closed" in deny.errors[0].message
    assert deny.evaluate(request(), DETAILS) == Decision(False, "bookinfo/deny", 0)
    allow = PolicySet.compile([policy("allow", bad_rule, {"to": [{"operation": {"methods": ["POST"]}}]})],
                              waypoint=WAYPOINT)
    assert len(allow.errors) == 1 and "never allows" in allow.errors[0].message
    assert not allow.evaluate(request(), DETAILS).allowed  # the broken rule does not allow GET
    assert allow.evaluate(request(method="POST"), DETAILS) == Decision(True, "bookinfo/allow", 1)


def test_rules_not_a_list_in_deny_denies_everything() -> None:
    broken = policy("deny", action="DENY", no_rules=True)
    broken["spec"]["rules"] = {"to": []}
    policies = PolicySet.compile([broken], waypoint=WAYPOINT)
    assert policies.errors and not policies.evaluate(request(), DETAILS).allowed


def test_unsupported_envoy_filter_condition_never_allows_and_always_denies() -> None:
    condition = when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["[update]"])
    allow = PolicySet.compile([policy("allow", condition)], waypoint=WAYPOINT)
    assert allow.errors and not allow.evaluate(request(), DETAILS).allowed
    deny = PolicySet.compile([policy("deny", {**condition, **op(methods=["POST"])}, action="DENY")],
                             waypoint=WAYPOINT)
    assert deny.errors
    assert not deny.evaluate(request(method="POST"), DETAILS).allowed  # the condition holds...
    assert deny.evaluate(request(method="GET"), DETAILS).allowed  # ...the rest of the rule still applies


def test_unknown_action_is_reported_and_ignored() -> None:
    policies = PolicySet.compile([policy("x", {}, action="REJECT")], waypoint=WAYPOINT)
    assert len(policies) == 0 and policies.errors[0].field == "spec.action"


# -- which policies apply here ---------------------------------------------------------------------------------
GATEWAY_CLASS = {"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}


def deny_all(name: str, namespace: str = "bookinfo", targets: list[dict[str, Any]] | None = None,
             **spec: Any) -> dict[str, Any]:
    return policy(name, {}, action="DENY", namespace=namespace, targets=targets, **spec)


@pytest.mark.parametrize(("obj", "service", "applies"), [
    (deny_all("gw"), DETAILS, True),
    (deny_all("gw"), None, True),
    (deny_all("other-gw", targets=[{**GATEWAY, "name": "other"}]), DETAILS, False),
    (deny_all("gw-elsewhere", namespace="default"), DETAILS, False),
    (deny_all("gw-wrong-group", targets=[{**GATEWAY, "group": "networking.istio.io"}]), DETAILS, False),
    (deny_all("svc", targets=[{"kind": "Service", "group": "", "name": "details"}]), DETAILS, True),
    (deny_all("svc-core", targets=[{"kind": "Service", "group": "core", "name": "details"}]), DETAILS, True),
    (deny_all("svc", targets=[{"kind": "Service", "name": "details"}]), REVIEWS, False),
    (deny_all("svc", targets=[{"kind": "Service", "name": "details"}]), None, False),
    (deny_all("svc-other-ns", namespace="default", targets=[{"kind": "Service", "name": "details"}]), DETAILS,
     False),
    (deny_all("class", namespace="istio-system", targets=[GATEWAY_CLASS]), REVIEWS, True),
    (deny_all("class-not-root", targets=[GATEWAY_CLASS]), REVIEWS, False),
    (deny_all("selector", targets=[], selector={"matchLabels": {"app": "details"}}), DETAILS, False),
    (deny_all("namespace-wide", targets=[]), DETAILS, False),
    (deny_all("mesh-wide", namespace="istio-system", targets=[]), DETAILS, False),
    (deny_all("legacy-targetref", targets=[], targetRef=GATEWAY), DETAILS, True),
], ids=lambda v: v["metadata"]["name"] if isinstance(v, dict) else str(v))
def test_attachment(obj: dict[str, Any], service: ServiceRef | None, applies: bool) -> None:
    policies = PolicySet.compile([obj], waypoint=WAYPOINT)
    assert policies.evaluate(request(), service).allowed is not applies


def test_untargeted_policies_apply_only_when_asked() -> None:
    objects = [deny_all("namespace-wide", targets=[]), deny_all("mesh-wide", namespace="istio-system", targets=[])]
    assert PolicySet.compile(objects, waypoint=WAYPOINT).evaluate(request(), DETAILS).allowed
    opted = PolicySet.compile(objects[:1], waypoint=WAYPOINT, untargeted=True)
    assert opted.evaluate(request(), DETAILS) == Decision(False, "bookinfo/namespace-wide", 0)
    mesh = PolicySet.compile(objects[1:], waypoint=WAYPOINT, untargeted=True)
    assert mesh.evaluate(request(), DETAILS) == Decision(False, "istio-system/mesh-wide", 0)
    assert not opted.evaluate(request(), None).allowed  # a workload address behind this waypoint
    elsewhere = PolicySet.compile([deny_all("other-ns", namespace="default", targets=[])], waypoint=WAYPOINT,
                                  untargeted=True)
    assert elsewhere.evaluate(request(), DETAILS).allowed
    assert elsewhere.evaluate(request(), None).allowed
    assert not elsewhere.evaluate(request(), ServiceRef("default", "web")).allowed  # its namespace's services


def test_target_problems_are_reported() -> None:
    objects = [
        deny_all("cross-ns", targets=[{**GATEWAY, "namespace": "default"}]),
        deny_all("both", selector={"matchLabels": {"app": "x"}}),
        deny_all("weird-kind", targets=[{"kind": "Deployment", "group": "apps", "name": "details"}]),
    ]
    policies = PolicySet.compile(objects, waypoint=WAYPOINT)
    assert {(e.name, e.field) for e in policies.errors} == {
        ("cross-ns", "spec.targetRefs[0]"), ("both", "spec.selector"), ("weird-kind", "spec.targetRefs[0]")}
    assert policies.evaluate(request(), DETAILS).allowed


def test_service_policies_only_for_their_service_and_workload_addresses_get_waypoint_policies() -> None:
    policies = PolicySet.compile([
        policy("details-get-only", op(methods=["GET"]), targets=[{"kind": "Service", "name": "details"}]),
        policy("no-delete", op(methods=["DELETE"]), action="DENY"),
    ], waypoint=WAYPOINT)
    assert policies.applies(DETAILS) == ["bookinfo/details-get-only", "bookinfo/no-delete"]
    assert policies.applies(None) == ["bookinfo/no-delete"]
    assert not policies.evaluate(request(method="POST"), DETAILS).allowed
    assert policies.evaluate(request(method="POST"), REVIEWS).allowed
    assert not policies.evaluate(request(method="DELETE"), None).allowed
    assert policies.describe()[0]["targets"] == {"waypoint": False, "services": ["details"], "namespace_wide": False}
