"""AuthorizationPolicy → Authorization (ambient/control/translate/authorization.py)."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.control.translate import Translation
from ambient.control.translate.authorization import convert_authorization_policy, string_matches
from ambient.control.translate.canonical import message_to_canonical
from ambient.proto import authorization_pb2

from .translate_cases import check_case, load_case


@pytest.fixture(scope="module")
def translation() -> Translation:
    return load_case("authorization").translate()


def _policy(namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": namespace}, "spec": spec}


def test_case_matches_expected() -> None:
    check_case("authorization")


@pytest.mark.parametrize(("namespace", "spec", "scope"), [
    ("istio-system", {}, authorization_pb2.GLOBAL),
    ("shop", {}, authorization_pb2.NAMESPACE),
    ("shop", {"selector": {"matchLabels": {"app": "web"}}}, authorization_pb2.WORKLOAD_SELECTOR),
    ("istio-system", {"selector": {"matchLabels": {"app": "web"}}}, authorization_pb2.WORKLOAD_SELECTOR),
])
def test_scope(namespace: str, spec: dict[str, Any], scope: int) -> None:
    converted = convert_authorization_policy(_policy(namespace, spec), "istio-system")
    assert converted.authorization is not None
    assert converted.authorization.scope == scope


@pytest.mark.parametrize(("pattern", "expected"), [
    ("*", {"presence": {}}),
    ("cluster.local/ns/a/*", {"prefix": "cluster.local/ns/a/"}),
    ("*/sa/admin", {"suffix": "/sa/admin"}),
    ("cluster.local/ns/a/sa/b", {"exact": "cluster.local/ns/a/sa/b"}),
])
def test_principal_patterns(pattern: str, expected: dict[str, Any]) -> None:
    assert message_to_canonical(string_matches([pattern])[0]) == expected


def test_rules_absent_match_nothing_and_empty_rule_matches_everything(translation: Translation) -> None:
    assert len(translation.authorizations["shop/allow-nothing"].rules) == 0
    allow_all = translation.authorizations["shop/allow-all-web"].rules
    assert len(allow_all) == 1 and len(allow_all[0].clauses) == 0


def test_allow_rules_with_http_attributes_are_dropped(translation: Translation) -> None:
    mixed = translation.authorizations["shop/allow-mixed"]
    assert [message_to_canonical(r) for r in mixed.rules] == [{"clauses": [{"matches": [
        {"principals": [{"exact": "cluster.local/ns/shop/sa/batch"}]}]}]}]
    assert len(translation.authorizations["shop/allow-http-only"].rules) == 0


def test_deny_rules_keep_their_l4_parts(translation: Translation) -> None:
    deny = translation.authorizations["shop/deny-mixed"]
    assert deny.action == authorization_pb2.DENY
    assert [message_to_canonical(r) for r in deny.rules] == [
        {"clauses": [{"matches": [{"principals": [{"prefix": "cluster.local/ns/other/"}]}]}]},
        {"clauses": [{"matches": [{"destination_ports": [8080]}]}]},
    ]


def test_status_reports_ignored_http_attributes(translation: Translation) -> None:
    (condition,) = translation.statuses[("AuthorizationPolicy", "shop", "allow-mixed")]
    assert condition["type"] == "ZtunnelAccepted" and condition["status"] == "True"
    assert condition["reason"] == "UnsupportedValue"
    assert "found: methods, paths" in condition["message"]
    assert "Within an ALLOW policy, rules matching HTTP attributes are omitted" in condition["message"]
    assert condition["observedGeneration"] == 2
    (deny,) = translation.statuses[("AuthorizationPolicy", "shop", "deny-mixed")]
    assert "remoteIpBlocks" in deny["message"] and "enforced without the HTTP rules" in deny["message"]
    (accepted,) = translation.statuses[("AuthorizationPolicy", "shop", "l4-everything")]
    assert (accepted["reason"], accepted["message"]) == ("Accepted", "attached to ztunnel")


def test_custom_and_audit_are_not_sent_and_say_so(translation: Translation) -> None:
    for name, action in (("ext-authz", "CUSTOM"), ("audit", "AUDIT")):
        assert f"shop/{name}" not in translation.authorizations
        (condition,) = translation.statuses[("AuthorizationPolicy", "shop", name)]
        assert condition["status"] == "False"
        assert condition["message"] == f"ztunnel does not support the {action} action"


def test_target_ref_policies_belong_to_waypoints(translation: Translation) -> None:
    for name in ("waypoint-l7", "service-l7"):
        assert f"shop/{name}" not in translation.authorizations
        assert ("AuthorizationPolicy", "shop", name) not in translation.statuses


def test_selector_policies_are_listed_by_the_workloads_they_select(translation: Translation) -> None:
    def policies(uid: str) -> list[str]:
        return list(translation.addresses[uid].workload.authorization_policies)

    # sorted; CUSTOM (not sent) and the `other` namespace's policy are not listed
    assert policies("Kubernetes//Pod/shop/web-1") == ["shop/allow-all-web", "shop/allow-mixed", "shop/deny-mixed"]
    # root-namespace selector policies select in every namespace
    assert policies("Kubernetes//Pod/shop/db-1") == ["istio-system/mesh-db-guard", "shop/allow-nothing"]
    assert policies("Kubernetes//Pod/other/db-1") == ["istio-system/mesh-db-guard"]


def test_l4_when_keys_and_not_values(translation: Translation) -> None:
    rule = message_to_canonical(translation.authorizations["shop/l4-everything"].rules[1])
    assert rule["clauses"][0]["matches"] == [{"source_ips": [{"address": "10.0.0.0", "length": 8}],
                                              "not_source_ips": [{"address": "10.9.9.9", "length": 32}]}]
    assert rule["clauses"][4]["matches"] == [{"destination_ports": [8080], "not_destination_ports": [8081]}]


def test_unparsable_ports_and_ip_blocks_are_skipped(translation: Translation) -> None:
    rule = message_to_canonical(translation.authorizations["shop/l4-everything"].rules[0])
    assert rule["clauses"][0]["matches"][0] == {"destination_ports": [8080, 9090]}  # "http", "70000" skipped
    assert len(rule["clauses"][1]["matches"][1]["source_ips"]) == 3  # "bogus" skipped
