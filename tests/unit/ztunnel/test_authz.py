"""L4 authorization (PROTOCOLS.md §5.3) as transcripts: policies + destination + connection → verdict."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from typing import Any

import pytest
from google.protobuf import empty_pb2

from ambient.identity.spiffe import SpiffeId
from ambient.proto import authorization_pb2 as pb
from ambient.xds.store import WorkloadStore
from tests.unit.ztunnel.test_decision import snapshot_of, workload
from ztunnel.authz import DRY_RUN_ALLOW, DRY_RUN_DENY, DRY_RUN_NO_ALLOW, AuthzResult, ConnectionInfo, authorize
from ztunnel.errors import ExplicitlyDenied, NotAllowed

ROOT = "istio-system"
# Lists a selector policy and the mesh-wide STRICT conversion, as a workload whose effective mode is STRICT.
DEST = workload("web-1", "default", ["10.1.0.5"], sa="web",
                policies=["default/selected", "istio-system/istio_converted_static_strict"])
CLIENT = SpiffeId("cluster.local", "client", "sleep")
NOT_ALLOWED = "allow policies exist, but none allowed"


def exact(v: str) -> pb.StringMatch:
    return pb.StringMatch(exact=v)


def prefix(v: str) -> pb.StringMatch:
    return pb.StringMatch(prefix=v)


def suffix(v: str) -> pb.StringMatch:
    return pb.StringMatch(suffix=v)


PRESENCE = pb.StringMatch(presence=empty_pb2.Empty())


def cidr(text: str) -> pb.Address:
    net = ipaddress.ip_network(text, strict=False)
    return pb.Address(address=net.network_address.packed, length=net.prefixlen)


def sa(namespace: str, name: str) -> pb.ServiceAccountMatch:
    return pb.ServiceAccountMatch(namespace=namespace, serviceAccount=name)


def match(**fields: Any) -> pb.Match:
    return pb.Match(**fields)


def rule(*clauses: Iterable[pb.Match]) -> pb.Rule:
    return pb.Rule(clauses=[pb.Clause(matches=list(c)) for c in clauses])


def policy(name: str, namespace: str = "default", *rules: pb.Rule, deny: bool = False, scope: Any = None,
           dry_run: bool = False) -> pb.Authorization:
    if scope is None:
        scope = pb.GLOBAL if namespace == ROOT else pb.NAMESPACE
    return pb.Authorization(name=name, namespace=namespace, scope=scope, action=pb.DENY if deny else pb.ALLOW,
                            rules=list(rules), dry_run=dry_run)


def allow(name: str, *matches: pb.Match, namespace: str = "default", **kw: Any) -> pb.Authorization:
    """A one-rule, one-clause ALLOW policy: the common shape of `from:` or `to:` alone."""
    return policy(name, namespace, rule(matches), **kw)


def deny(name: str, *matches: pb.Match, namespace: str = "default", **kw: Any) -> pb.Authorization:
    return policy(name, namespace, rule(matches), deny=True, **kw)


def conn(identity: SpiffeId | str | None = CLIENT, src: str = "10.1.0.2", dst: str = "10.1.0.5",
         port: int = 8080) -> ConnectionInfo:
    return ConnectionInfo(src_ip=src, dst_ip=dst, dst_port=port, src_identity=identity)


def verdict(*policies: pb.Authorization, connection: ConnectionInfo | None = None) -> AuthzResult:
    return authorize(snapshot_of(DEST, *policies), DEST, connection or conn())


def allowed(by: str | None = None) -> tuple[bool, str | None, str]:
    return True, by, ""


def denied(by: str | None = None) -> tuple[bool, str | None, str]:
    return False, by, f"explicitly denied by: {by}" if by else NOT_ALLOWED


PLAINTEXT = conn(identity=None)
STRICT = deny("istio_converted_static_strict", match(not_principals=[PRESENCE]), namespace=ROOT,
              scope=pb.WORKLOAD_SELECTOR)
PERMISSIVE_DEST = workload("web-1", "default", ["10.1.0.5"], sa="web")  # its namespace overrides to PERMISSIVE

TRANSCRIPTS = [
    # Which policies apply.
    pytest.param([], conn(), allowed(), id="no-policies-allow"),
    pytest.param([policy("deny-all", ROOT)], conn(), denied(), id="global-applies-everywhere"),
    pytest.param([policy("deny-all", "other")], conn(), allowed(), id="other-namespace-ignored"),
    pytest.param([policy("deny-all")], conn(), denied(), id="own-namespace-applies"),
    pytest.param([policy("selected", scope=pb.WORKLOAD_SELECTOR)], conn(), denied(), id="listed-selector-applies"),
    pytest.param([policy("unlisted", scope=pb.WORKLOAD_SELECTOR)], conn(), allowed(), id="unlisted-selector-ignored"),
    # Order: DENY first, then default allow, then ALLOW.
    pytest.param([deny("no-sleep", match(principals=[exact("cluster.local/ns/client/sa/sleep")])),
                  allow("all", match(principals=[PRESENCE]))], conn(), denied("default/no-sleep"),
                 id="deny-beats-allow"),
    pytest.param([deny("no-other", match(namespaces=[exact("other")]))], conn(), allowed(),
                 id="unmatched-deny-and-no-allow-allows"),
    pytest.param([allow("from-client", match(namespaces=[exact("client")]))], conn(), allowed("default/from-client"),
                 id="matching-allow-allows"),
    pytest.param([allow("from-other", match(namespaces=[exact("other")])),
                  allow("from-client", match(namespaces=[exact("client")]))], conn(), allowed("default/from-client"),
                 id="any-allow-suffices"),
    pytest.param([allow("from-other", match(namespaces=[exact("other")]))], conn(), denied(), id="no-allow-matches"),
    # Empty shapes.
    pytest.param([policy("deny-nothing", deny=True)], conn(), allowed(), id="deny-without-rules-matches-nothing"),
    pytest.param([policy("allow-all", "default", rule())], conn(), allowed("default/allow-all"),
                 id="rule-without-clauses-matches-all"),
    pytest.param([policy("empty-clause", "default", rule([]))], conn(), allowed("default/empty-clause"),
                 id="clause-without-matches-holds"),
    pytest.param([policy("empty-match", "default", rule([match()]))], conn(), denied(),
                 id="empty-match-never-matches"),
    # Rules OR, clauses AND, matches OR, fields AND.
    pytest.param([policy("or", "default", rule([match(destination_ports=[9])]),
                         rule([match(destination_ports=[8080])]))], conn(), allowed("default/or"), id="rules-or"),
    pytest.param([policy("and", "default", rule([match(destination_ports=[8080])],
                                                [match(namespaces=[exact("x")])]))],
                 conn(), denied(), id="clauses-and"),
    pytest.param([policy("and", "default", rule([match(destination_ports=[8080])],
                                                [match(namespaces=[exact("client")])]))],
                 conn(), allowed("default/and"), id="clauses-and-both-hold"),
    pytest.param([allow("or", match(destination_ports=[9]), match(namespaces=[exact("client")]))], conn(),
                 allowed("default/or"), id="matches-or"),
    pytest.param([allow("fields", match(destination_ports=[8080], namespaces=[exact("x")]))], conn(), denied(),
                 id="fields-and"),
    # principals: the SPIFFE id without the scheme.
    pytest.param([allow("p", match(principals=[exact("cluster.local/ns/client/sa/sleep")]))], conn(),
                 allowed("default/p"), id="principal-exact"),
    pytest.param([allow("p", match(principals=[exact("spiffe://cluster.local/ns/client/sa/sleep")]))], conn(),
                 denied(), id="principal-with-scheme-never-matches"),
    pytest.param([allow("p", match(principals=[prefix("cluster.local/ns/client/")]))], conn(), allowed("default/p"),
                 id="principal-prefix"),
    pytest.param([allow("p", match(principals=[suffix("/sa/sleep")]))], conn(), allowed("default/p"),
                 id="principal-suffix"),
    pytest.param([allow("p", match(principals=[suffix("/sa/curl")]))], conn(), denied(), id="principal-mismatch"),
    pytest.param([allow("p", match(principals=[PRESENCE]))], PLAINTEXT, denied(), id="plaintext-matches-no-principal"),
    pytest.param([allow("p", match(not_principals=[exact("cluster.local/ns/client/sa/sleep")]))], conn(), denied(),
                 id="not-principals"),
    pytest.param([allow("p", match(principals=[pb.StringMatch()]))], conn(), denied(),
                 id="unset-string-match-is-dropped"),
    # STRICT mTLS is a DENY of `not_principals: [presence]`.
    pytest.param([STRICT], PLAINTEXT, denied(f"{ROOT}/istio_converted_static_strict"), id="strict-denies-plaintext"),
    pytest.param([STRICT], conn(), allowed(), id="strict-allows-mtls"),
    # namespaces: from the identity.
    pytest.param([allow("n", match(namespaces=[prefix("cli")]))], conn(), allowed("default/n"), id="namespace-prefix"),
    pytest.param([allow("n", match(namespaces=[PRESENCE]))], PLAINTEXT, denied(), id="plaintext-has-no-namespace"),
    pytest.param([deny("n", match(not_namespaces=[exact("default")]))], conn(), denied("default/n"),
                 id="not-namespaces"),
    pytest.param([deny("n", match(not_namespaces=[exact("default")]))], PLAINTEXT, denied("default/n"),
                 id="not-namespaces-matches-plaintext"),
    # service accounts.
    pytest.param([allow("s", match(service_accounts=[sa("client", "sleep")]))], conn(), allowed("default/s"),
                 id="service-account"),
    pytest.param([allow("s", match(service_accounts=[sa("other", "sleep")]))], conn(), denied(),
                 id="service-account-other-namespace"),
    pytest.param([allow("s", match(service_accounts=[sa("client", "sleep")]))], PLAINTEXT, denied(),
                 id="service-account-plaintext"),
    pytest.param([deny("s", match(not_service_accounts=[sa("client", "sleep")]))], PLAINTEXT, denied("default/s"),
                 id="not-service-accounts-plaintext"),
    # addresses and ports.
    pytest.param([allow("ip", match(source_ips=[cidr("10.1.0.0/24")]))], conn(), allowed("default/ip"),
                 id="source-cidr"),
    pytest.param([allow("ip", match(source_ips=[cidr("10.2.0.0/16"), cidr("10.1.0.2/32")]))], conn(),
                 allowed("default/ip"), id="source-any-of"),
    pytest.param([allow("ip", match(source_ips=[cidr("10.1.0.0/24")]))], conn(src="::ffff:10.1.0.2"),
                 allowed("default/ip"), id="source-v4-mapped"),
    pytest.param([deny("ip", match(not_source_ips=[cidr("10.0.0.0/8")]))], conn(src="192.168.1.1"),
                 denied("default/ip"), id="not-source-ips"),
    pytest.param([allow("ip", match(source_ips=[cidr("fd00::/8")]))], conn(), denied(), id="source-other-family"),
    pytest.param([allow("ip", match(destination_ips=[cidr("10.1.0.5/32")]))], conn(), allowed("default/ip"),
                 id="destination-ip"),
    pytest.param([allow("ip", match(not_destination_ips=[cidr("10.1.0.5/32")]))], conn(), denied(),
                 id="not-destination-ips"),
    pytest.param([allow("ip", match(source_ips=[pb.Address(address=b"\x0a\x01", length=8)]))], conn(),
                 denied(), id="invalid-address-dropped-leaves-empty-match"),
    pytest.param([allow("port", match(destination_ports=[80]))], conn(port=8080), denied(),
                 id="ports-compare-to-target-port"),
    pytest.param([allow("port", match(destination_ports=[80, 8080]))], conn(port=8080), allowed("default/port"),
                 id="port-any-of"),
    pytest.param([deny("port", match(not_destination_ports=[8080]))], conn(port=9090), denied("default/port"),
                 id="not-destination-ports"),
    # Identity given as a string.
    pytest.param([allow("p", match(namespaces=[exact("client")]))], conn(identity=str(CLIENT)), allowed("default/p"),
                 id="identity-as-string"),
    pytest.param([allow("p", match(principals=[exact("x")]), match(namespaces=[PRESENCE]))], conn(identity="garbage"),
                 denied(), id="unparsable-identity"),
]


@pytest.mark.parametrize(("policies", "connection", "expected"), TRANSCRIPTS)
def test_transcript(policies: list[pb.Authorization], connection: ConnectionInfo,
                    expected: tuple[bool, str | None, str]) -> None:
    result = verdict(*policies, connection=connection)
    assert (result.allowed, result.policy, result.reason) == expected


def test_strict_applies_only_where_listed() -> None:
    snapshot = snapshot_of(STRICT)
    assert not authorize(snapshot, DEST, PLAINTEXT).allowed
    assert authorize(snapshot, PERMISSIVE_DEST, PLAINTEXT).allowed


def test_errors_carry_stable_reasons_and_exact_messages() -> None:
    explicit = verdict(deny("no", match(destination_ports=[8080]))).error()
    assert isinstance(explicit, ExplicitlyDenied)
    assert (explicit.reason, str(explicit), explicit.policy) == (
        "explicitly_denied", "explicitly denied by: default/no", "default/no")
    none = verdict(allow("yes", match(destination_ports=[9]))).error()
    assert isinstance(none, NotAllowed)
    assert (none.reason, str(none)) == ("not_allowed", NOT_ALLOWED)
    assert verdict().error() is None


def test_dry_run_policies_report_but_never_decide() -> None:
    result = verdict(deny("audit-deny", match(destination_ports=[8080]), dry_run=True),
                     allow("audit-allow", match(destination_ports=[9]), dry_run=True))
    assert (result.allowed, result.policy) == (True, None)
    assert result.dry_run == (f"{DRY_RUN_DENY}: default/audit-deny", DRY_RUN_NO_ALLOW)
    matched = verdict(allow("audit-allow", match(destination_ports=[8080]), dry_run=True),
                      allow("real", match(destination_ports=[9])))
    assert (matched.allowed, matched.reason) == (False, NOT_ALLOWED)
    assert matched.dry_run == (f"{DRY_RUN_ALLOW}: default/audit-allow",)


def test_policy_changes_are_seen_by_the_next_evaluation() -> None:
    store = WorkloadStore()
    snapshot_of(DEST, store=store)
    open_connection = conn()
    assert authorize(store.snapshot, DEST, open_connection).allowed
    snapshot_of(deny("lockdown", match(namespaces=[PRESENCE])), store=store)
    assert authorize(store.snapshot, DEST, open_connection).reason == "explicitly denied by: default/lockdown"
    # Another store at the same generation must not reuse this one's compiled policies.
    other = snapshot_of(DEST)
    assert other.generation == 1 and authorize(other, DEST, open_connection).allowed


def test_missing_listed_policy_is_skipped() -> None:
    ghost = workload("web-1", "default", ["10.1.0.5"], policies=["default/not-pushed-yet"])
    assert authorize(snapshot_of(ghost), ghost, conn()).allowed


def test_evaluation_is_fast_with_many_policies() -> None:
    policies = [allow(f"p{i}", match(principals=[exact(f"cluster.local/ns/n{i}/sa/s")], destination_ports=[i]))
                for i in range(200)]
    policies.append(allow("last", match(namespaces=[exact("client")], source_ips=[cidr("10.0.0.0/8")])))
    snapshot = snapshot_of(DEST, *policies)
    authorize(snapshot, DEST, conn())  # compile once
    started = time.perf_counter()
    for _ in range(200):
        assert authorize(snapshot, DEST, conn()).policy == "default/last"
    per_call = (time.perf_counter() - started) / 200
    assert per_call < 0.002, f"{per_call * 1e6:.0f} µs per connection with 201 policies"
