"""The outbound decision (PROTOCOLS.md §7) as transcripts: snapshot + source + original destination → decision.

The builders here (`workload`, `service`, `snapshot_of`) are shared with the authz and DNS core tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import pytest

from ambient.proto import authorization_pb2, workload_pb2
from ambient.xds.store import StoreChanges, WorkloadSnapshot, WorkloadStore
from ztunnel.decision import (
    HBONE_PORT,
    Kind,
    OutboundDecision,
    authority,
    decide_outbound,
    service_endpoints,
    workload_identity,
)
from ztunnel.errors import NoHealthyUpstream, SelfCall, UnknownWaypoint

T = TypeVar("T")
DOMAIN = "cluster.local"


def first(candidates: Sequence[T]) -> T:
    return candidates[0]


def last(candidates: Sequence[T]) -> T:
    return candidates[-1]


def workload(
    name: str,
    namespace: str = "default",
    ips: Iterable[str] = (),
    *,
    sa: str | None = None,
    services: Mapping[str, Iterable[tuple[int, int]]] | None = None,
    hbone: bool = True,
    healthy: bool = True,
    waypoint: workload_pb2.GatewayAddress | None = None,
    network: str = "",
    policies: Iterable[str] = (),
) -> workload_pb2.Workload:
    w = workload_pb2.Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}", name=name, namespace=namespace,
        addresses=[ipaddress.ip_address(ip).packed for ip in ips], service_account=sa or name,
        tunnel_protocol=workload_pb2.HBONE if hbone else workload_pb2.NONE,
        status=workload_pb2.HEALTHY if healthy else workload_pb2.UNHEALTHY, network=network,
        authorization_policies=list(policies))
    for key, ports in (services or {}).items():
        w.services[key].ports.extend(workload_pb2.Port(service_port=s, target_port=t) for s, t in ports)
    if waypoint is not None:
        w.waypoint.CopyFrom(waypoint)
    return w


def service(
    name: str,
    namespace: str = "default",
    vips: Iterable[str] = (),
    ports: Iterable[tuple[int, int]] = (),
    *,
    hostname: str | None = None,
    waypoint: workload_pb2.GatewayAddress | None = None,
    sans: Iterable[str] = (),
    **fields: Any,
) -> workload_pb2.Service:
    s = workload_pb2.Service(
        name=name, namespace=namespace, hostname=hostname or f"{name}.{namespace}.svc.{DOMAIN}",
        addresses=[workload_pb2.NetworkAddress(address=ipaddress.ip_address(ip).packed) for ip in vips],
        ports=[workload_pb2.Port(service_port=p, target_port=t) for p, t in ports],
        subject_alt_names=list(sans), **fields)
    if waypoint is not None:
        s.waypoint.CopyFrom(waypoint)
    return s


def key(s: workload_pb2.Service) -> str:
    return f"{s.namespace}/{s.hostname}"


def snapshot_of(*items: workload_pb2.Workload | workload_pb2.Service | authorization_pb2.Authorization,
                store: WorkloadStore | None = None) -> WorkloadSnapshot:
    """Apply the items to a (new) store as one xDS batch and return the snapshot readers would see."""
    return (store or WorkloadStore()).apply(StoreChanges(
        workloads={i.uid: i for i in items if isinstance(i, workload_pb2.Workload)},
        services={key(i): i for i in items if isinstance(i, workload_pb2.Service)},
        authorizations={f"{i.namespace}/{i.name}": i for i in items
                        if isinstance(i, authorization_pb2.Authorization)}))


def by_hostname(namespace: str, name: str, port: int = HBONE_PORT) -> workload_pb2.GatewayAddress:
    return workload_pb2.GatewayAddress(
        hostname=workload_pb2.NamespacedHostname(namespace=namespace, hostname=f"{name}.{namespace}.svc.{DOMAIN}"),
        hbone_mtls_port=port)


def by_address(ip: str, port: int = HBONE_PORT) -> workload_pb2.GatewayAddress:
    return workload_pb2.GatewayAddress(
        address=workload_pb2.NetworkAddress(address=ipaddress.ip_address(ip).packed), hbone_mtls_port=port)


def spiffe(namespace: str, sa: str) -> str:
    return f"spiffe://cluster.local/ns/{namespace}/sa/{sa}"


# ---- the world every transcript runs in -------------------------------------------------------------------

WEB = service("web", vips=["10.96.0.10", "fd00:96::10"], ports=[(80, 8080)])
LEGACY = service("legacy", vips=["10.96.0.11"], ports=[(80, 8080)])
EMPTY = service("empty", vips=["10.96.0.12"], ports=[(80, 8080)])
NAMED = service("named", vips=["10.96.0.13"], ports=[(80, 0)])  # targetPort is a name: per pod
REVIEWS = service("reviews", vips=["10.96.0.20"], ports=[(9080, 9080)], waypoint=by_hostname("default", "waypoint"))
RATINGS = service("ratings", vips=["10.96.0.21"], ports=[(9080, 9080)], waypoint=by_address("10.96.0.30"))
GHOST = service("ghost", vips=["10.96.0.22"], ports=[(80, 80)], waypoint=by_hostname("default", "missing"))
WAYPOINT = service("waypoint", vips=["10.96.0.30"], ports=[(15008, 15008)])
DB = service("db", vips=["10.96.0.31"], ports=[(5432, 5432)])
SANS = service("sans", vips=["10.96.0.32"], ports=[(80, 8080)], sans=[spiffe("default", "extra")])
PASS = service("pass", vips=["10.96.0.40"], ports=[(80, 80)],
               load_balancing=workload_pb2.LoadBalancing(mode=workload_pb2.LoadBalancing.PASSTHROUGH))
PRIVATE = service("private", "other", vips=["10.96.0.50"], ports=[(80, 80)],
                  visibility=workload_pb2.Service.NAMESPACE)
LENIENT = service("lenient", vips=["10.96.0.60"], ports=[(80, 80)],
                  load_balancing=workload_pb2.LoadBalancing(health_policy=workload_pb2.LoadBalancing.ALLOW_ALL))
STRICT = service("strict", vips=["10.96.0.61"], ports=[(80, 80)])
SPLIT = service("split", vips=["10.96.0.62"], ports=[(80, 80)])

SLEEP = workload("sleep", "client", ["10.1.0.2"])
OTHER_SLEEP = workload("sleep", "other", ["10.1.0.3"])
WEB_1 = workload("web-1", ips=["10.1.0.5", "fd00:1::5"], sa="web", services={key(WEB): [(80, 8080)]})
WEB_2 = workload("web-2", ips=["10.1.0.6"], sa="web", services={key(WEB): [(80, 8080)]}, healthy=False)
LEGACY_1 = workload("legacy-1", ips=["10.1.0.7"], services={key(LEGACY): [(80, 8080)]}, hbone=False)
NAMED_1 = workload("named-1", ips=["10.1.0.11"], services={key(NAMED): [(80, 9090)]})
NAMED_2 = workload("named-2", ips=["10.1.0.12"], services={key(NAMED): []})  # does not declare the port name
REVIEWS_1 = workload("reviews-1", ips=["10.1.0.8"], services={key(REVIEWS): [(9080, 9080)]})
RATINGS_1 = workload("ratings-1", ips=["10.1.0.13"], services={key(RATINGS): [(9080, 9080)]})
WAYPOINT_1 = workload("waypoint-1", ips=["10.1.0.9"], sa="waypoint", services={key(WAYPOINT): [(15008, 15008)]})
DB_1 = workload("db-1", ips=["10.1.0.10"], services={key(DB): [(5432, 5432)]},
                waypoint=by_hostname("default", "waypoint"))
SANS_1 = workload("sans-1", ips=["10.1.0.14"], services={key(SANS): [(80, 8080)]})
PRIVATE_1 = workload("private-1", "other", ["10.1.0.15"], services={key(PRIVATE): [(80, 80)]})
LENIENT_1 = workload("lenient-1", ips=["10.1.0.16"], services={key(LENIENT): [(80, 80)]}, healthy=False)
STRICT_1 = workload("strict-1", ips=["10.1.0.17"], services={key(STRICT): [(80, 80)]}, healthy=False)
SPLIT_1 = workload("split-1", ips=["10.1.0.18"], services={key(SPLIT): [(80, 80)]}, network="remote")
SPLIT_2 = workload("split-2", ips=["10.1.0.19"], services={key(SPLIT): [(80, 80)]})

WORLD = snapshot_of(
    WEB, LEGACY, EMPTY, NAMED, REVIEWS, RATINGS, GHOST, WAYPOINT, DB, SANS, PASS, PRIVATE, LENIENT, STRICT, SPLIT,
    SLEEP, OTHER_SLEEP, WEB_1, WEB_2, LEGACY_1, NAMED_1, NAMED_2, REVIEWS_1, RATINGS_1, WAYPOINT_1, DB_1, SANS_1,
    PRIVATE_1, LENIENT_1, STRICT_1, SPLIT_1, SPLIT_2)


def summary(decision: OutboundDecision) -> dict[str, Any]:
    """The parts of a decision a transcript states (workloads and services by name)."""
    return {
        "kind": decision.kind,
        "target": decision.target,
        "authority": decision.authority,
        "identities": decision.expected_identities,
        "workload": decision.destination_workload.name if decision.destination_workload else None,
        "service": decision.destination_service.name if decision.destination_service else None,
        "via_waypoint": decision.via_waypoint,
        "reason": decision.error.reason if decision.error else "",
    }


def hbone(target: str, auth: str, identities: Iterable[str], wl: str, svc: str | None,
          via_waypoint: bool = False, port: int = HBONE_PORT) -> dict[str, Any]:
    return {"kind": Kind.HBONE, "target": (target, port), "authority": auth, "identities": tuple(identities),
            "workload": wl, "service": svc, "via_waypoint": via_waypoint, "reason": ""}


def tcp(target: tuple[str, int], wl: str, svc: str | None) -> dict[str, Any]:
    return {"kind": Kind.TCP, "target": target, "authority": None, "identities": (), "workload": wl,
            "service": svc, "via_waypoint": False, "reason": ""}


def passthrough(target: tuple[str, int], svc: str | None = None) -> dict[str, Any]:
    return {"kind": Kind.PASSTHROUGH, "target": target, "authority": None, "identities": (), "workload": None,
            "service": svc, "via_waypoint": False, "reason": ""}


def deny(target: tuple[str, int], reason: str) -> dict[str, Any]:
    return {"kind": Kind.DENY, "target": target, "authority": None, "identities": (), "workload": None,
            "service": None, "via_waypoint": False, "reason": reason}


WAYPOINT_ID = spiffe("default", "waypoint")

TRANSCRIPTS = [
    # 1. the self-call guard: ztunnel's own ports on loopback, v4 and v6
    pytest.param(SLEEP, "127.0.0.1", 15001, deny(("127.0.0.1", 15001), "self_call"), id="self-call-15001"),
    pytest.param(SLEEP, "127.0.0.1", 15006, deny(("127.0.0.1", 15006), "self_call"), id="self-call-15006"),
    pytest.param(SLEEP, "::1", 15008, deny(("::1", 15008), "self_call"), id="self-call-v6-15008"),
    pytest.param(SLEEP, "127.0.0.1", 8080, passthrough(("127.0.0.1", 8080)), id="loopback-other-port"),
    # 2. service with a waypoint → HBONE to the waypoint, authority = original VIP:port
    pytest.param(SLEEP, "10.96.0.20", 9080,
                 hbone("10.1.0.9", "10.96.0.20:9080", [WAYPOINT_ID], "waypoint-1", "reviews", True),
                 id="service-waypoint-by-hostname"),
    pytest.param(SLEEP, "10.96.0.21", 9080,
                 hbone("10.1.0.9", "10.96.0.21:9080", [WAYPOINT_ID], "waypoint-1", "ratings", True),
                 id="service-waypoint-by-address"),
    pytest.param(WAYPOINT_1, "10.96.0.20", 9080,
                 hbone("10.1.0.8", "10.1.0.8:9080", [spiffe("default", "reviews-1")], "reviews-1", "reviews"),
                 id="the-waypoint-itself-goes-direct"),
    pytest.param(SLEEP, "10.96.0.22", 80, deny(("10.96.0.22", 80), "unknown_waypoint"), id="unknown-waypoint"),
    # 3. VIP → a healthy endpoint serving the port; pod IP → that workload; else passthrough
    pytest.param(SLEEP, "10.96.0.10", 80,
                 hbone("10.1.0.5", "10.1.0.5:8080", [spiffe("default", "web")], "web-1", "web"), id="vip-to-hbone"),
    pytest.param(SLEEP, "fd00:96::10", 80,
                 hbone("fd00:1::5", "[fd00:1::5]:8080", [spiffe("default", "web")], "web-1", "web"),
                 id="vip-v6-keeps-family"),
    pytest.param(SLEEP, "10.96.0.10", 81, deny(("10.96.0.10", 81), "no_healthy_upstream"), id="vip-unknown-port"),
    pytest.param(SLEEP, "10.96.0.12", 80, deny(("10.96.0.12", 80), "no_healthy_upstream"), id="vip-no-endpoints"),
    pytest.param(SLEEP, "10.96.0.61", 80, deny(("10.96.0.61", 80), "no_healthy_upstream"), id="vip-only-unhealthy"),
    pytest.param(SLEEP, "10.96.0.60", 80,
                 hbone("10.1.0.16", "10.1.0.16:80", [spiffe("default", "lenient-1")], "lenient-1", "lenient"),
                 id="vip-allow-all-health-policy"),
    pytest.param(SLEEP, "10.96.0.13", 80,
                 hbone("10.1.0.11", "10.1.0.11:9090", [spiffe("default", "named-1")], "named-1", "named"),
                 id="vip-named-target-port-per-pod"),
    pytest.param(SLEEP, "10.96.0.62", 80,
                 hbone("10.1.0.19", "10.1.0.19:80", [spiffe("default", "split-2")], "split-2", "split"),
                 id="vip-skips-other-network"),
    pytest.param(SLEEP, "10.96.0.32", 80,
                 hbone("10.1.0.14", "10.1.0.14:8080", [spiffe("default", "sans-1"), spiffe("default", "extra")],
                       "sans-1", "sans"), id="vip-subject-alt-names"),
    pytest.param(SLEEP, "10.96.0.40", 80, passthrough(("10.96.0.40", 80), "pass"), id="vip-passthrough-mode"),
    pytest.param(OTHER_SLEEP, "10.96.0.50", 80,
                 hbone("10.1.0.15", "10.1.0.15:80", [spiffe("other", "private-1")], "private-1", "private"),
                 id="namespace-visible-service-same-namespace"),
    pytest.param(SLEEP, "10.96.0.50", 80, passthrough(("10.96.0.50", 80)), id="namespace-visible-service-hidden"),
    pytest.param(SLEEP, "10.1.0.5", 8080,
                 hbone("10.1.0.5", "10.1.0.5:8080", [spiffe("default", "web")], "web-1", None), id="pod-ip-hbone"),
    pytest.param(SLEEP, "fd00:1::5", 8080,
                 hbone("fd00:1::5", "[fd00:1::5]:8080", [spiffe("default", "web")], "web-1", None),
                 id="pod-ip-v6"),
    pytest.param(SLEEP, "93.184.216.34", 443, passthrough(("93.184.216.34", 443)), id="unknown-passthrough"),
    # 4. pod-IP-addressed workload with its own waypoint
    pytest.param(SLEEP, "10.1.0.10", 5432,
                 hbone("10.1.0.9", "10.1.0.10:5432", [WAYPOINT_ID], "waypoint-1", None, True),
                 id="workload-waypoint"),
    pytest.param(WAYPOINT_1, "10.1.0.10", 5432,
                 hbone("10.1.0.10", "10.1.0.10:5432", [spiffe("default", "db-1")], "db-1", None),
                 id="workload-waypoint-caller-is-waypoint"),
    pytest.param(SLEEP, "10.96.0.31", 5432,
                 hbone("10.1.0.10", "10.1.0.10:5432", [spiffe("default", "db-1")], "db-1", "db"),
                 id="workload-waypoint-ignored-when-service-addressed"),
    # 5. tunnel protocol NONE → plain TCP to podIP:targetPort
    pytest.param(SLEEP, "10.96.0.11", 80, tcp(("10.1.0.7", 8080), "legacy-1", "legacy"), id="vip-to-plain-tcp"),
    pytest.param(SLEEP, "10.1.0.7", 8080, tcp(("10.1.0.7", 8080), "legacy-1", None), id="pod-ip-plain-tcp"),
]


@pytest.mark.parametrize(("source", "dst_ip", "dst_port", "expected"), TRANSCRIPTS)
def test_transcript(source: workload_pb2.Workload, dst_ip: str, dst_port: int, expected: dict[str, Any]) -> None:
    assert summary(decide_outbound(WORLD, source, dst_ip, dst_port, pick=first)) == expected


def test_deny_messages_keep_ztunnel_wording() -> None:
    self_call = decide_outbound(WORLD, SLEEP, "127.0.0.1", 15008)
    assert isinstance(self_call.error, SelfCall)
    assert self_call.reason == "attempted recursive call to ourselves"
    empty = decide_outbound(WORLD, SLEEP, "10.96.0.12", 80)
    assert isinstance(empty.error, NoHealthyUpstream)
    assert empty.reason.startswith("no healthy upstream: 10.96.0.12:80")
    assert "default/empty.default.svc.cluster.local" in empty.reason
    ghost = decide_outbound(WORLD, SLEEP, "10.96.0.22", 80)
    assert isinstance(ghost.error, UnknownWaypoint)
    assert ghost.reason == "unknown waypoint: waypoint missing.default.svc.cluster.local not found"
    assert decide_outbound(WORLD, SLEEP, "10.96.0.10", 80).reason == ""


def test_load_balancing_picks_among_healthy_endpoints_in_uid_order() -> None:
    web_3 = workload("web-3", ips=["10.1.0.20"], sa="web", services={key(WEB): [(80, 8081)]})
    snapshot = snapshot_of(WEB, SLEEP, WEB_1, WEB_2, web_3)
    offered: list[list[str]] = []

    def record(candidates: Sequence[T]) -> T:
        offered.append([c[0].name for c in candidates])  # type: ignore[index]
        return candidates[-1]

    decision = decide_outbound(snapshot, SLEEP, "10.96.0.10", 80, pick=record)
    assert offered == [["web-1", "web-3"]]  # the unhealthy web-2 is never offered
    assert (decision.target, decision.authority) == (("10.1.0.20", HBONE_PORT), "10.1.0.20:8081")
    assert decide_outbound(snapshot, SLEEP, "10.96.0.10", 80, pick=last) == decision  # deterministic given pick


def test_default_pick_spreads_over_endpoints() -> None:
    web_3 = workload("web-3", ips=["10.1.0.20"], sa="web", services={key(WEB): [(80, 8080)]})
    snapshot = snapshot_of(WEB, SLEEP, WEB_1, web_3)
    seen = {decide_outbound(snapshot, SLEEP, "10.96.0.10", 80).target[0] for _ in range(200)}
    assert seen == {"10.1.0.5", "10.1.0.20"}


def test_waypoint_with_several_pods_is_load_balanced_and_every_pod_counts_as_the_waypoint() -> None:
    waypoint_2 = workload("waypoint-2", ips=["10.1.0.21"], sa="waypoint", services={key(WAYPOINT): [(15008, 15008)]})
    snapshot = snapshot_of(REVIEWS, WAYPOINT, REVIEWS_1, WAYPOINT_1, waypoint_2, SLEEP)
    assert decide_outbound(snapshot, SLEEP, "10.96.0.20", 9080, pick=last).target == ("10.1.0.21", HBONE_PORT)
    from_waypoint = decide_outbound(snapshot, waypoint_2, "10.96.0.20", 9080, pick=first)
    assert (from_waypoint.via_waypoint, from_waypoint.target) == (False, ("10.1.0.8", HBONE_PORT))


def test_waypoint_port_and_identity_come_from_the_gateway_address_and_its_service() -> None:
    waypoint = service("waypoint", vips=["10.96.0.30"], ports=[(15008, 15008)], sans=[spiffe("default", "gw")])
    reviews = service("reviews", vips=["10.96.0.20"], ports=[(9080, 9080)],
                      waypoint=by_hostname("default", "waypoint", port=15088))
    snapshot = snapshot_of(reviews, waypoint, REVIEWS_1, WAYPOINT_1, SLEEP)
    decision = decide_outbound(snapshot, SLEEP, "10.96.0.20", 9080)
    assert decision.target == ("10.1.0.9", 15088)
    assert decision.expected_identities == (WAYPOINT_ID, spiffe("default", "gw"))


def test_waypoint_without_healthy_pods_fails() -> None:
    sick = workload("waypoint-1", ips=["10.1.0.9"], sa="waypoint", services={key(WAYPOINT): [(15008, 15008)]},
                    healthy=False)
    decision = decide_outbound(snapshot_of(REVIEWS, WAYPOINT, REVIEWS_1, sick, SLEEP), SLEEP, "10.96.0.20", 9080)
    assert (decision.kind, decision.error and decision.error.reason) == (Kind.DENY, "unknown_waypoint")
    assert "no healthy endpoints" in decision.reason


def test_waypoint_addressed_by_pod_ip() -> None:
    reviews = service("reviews", vips=["10.96.0.20"], ports=[(9080, 9080)], waypoint=by_address("10.1.0.9"))
    decision = decide_outbound(snapshot_of(reviews, REVIEWS_1, WAYPOINT_1, SLEEP), SLEEP, "10.96.0.20", 9080)
    assert summary(decision) == hbone("10.1.0.9", "10.96.0.20:9080", [WAYPOINT_ID], "waypoint-1", "reviews", True)


def test_dual_stack_pod_asked_by_the_other_family_answers_in_the_asked_one() -> None:
    decision = decide_outbound(WORLD, SLEEP, "fd00:1::5", 8080)
    assert decision.target == ("fd00:1::5", HBONE_PORT)


def test_identity_defaults_for_empty_trust_domain_and_service_account() -> None:
    bare = workload_pb2.Workload(name="x", namespace="ns")
    assert workload_identity(bare) == "spiffe://cluster.local/ns/ns/sa/default"
    bare.trust_domain, bare.service_account = "example.org", "api"
    assert workload_identity(bare) == "spiffe://example.org/ns/ns/sa/api"


@pytest.mark.parametrize(("ip", "port", "expected"),
                         [("10.0.0.1", 80, "10.0.0.1:80"), ("fd00::1", 443, "[fd00::1]:443")])
def test_authority_format(ip: str, port: int, expected: str) -> None:
    assert authority(ip, port) == expected


def test_endpoint_index_follows_the_snapshot() -> None:
    store = WorkloadStore()
    first_snapshot = snapshot_of(WEB, WEB_1, store=store)
    assert [w.name for w in service_endpoints(first_snapshot, key(WEB))] == ["web-1"]
    second = snapshot_of(WEB_2, store=store)
    assert [w.name for w in service_endpoints(second, key(WEB))] == ["web-1", "web-2"]
    assert [w.name for w in service_endpoints(first_snapshot, key(WEB))] == ["web-1"]  # old snapshots keep theirs
    # After endpoints go away the VIP fails fast instead of passing through.
    gone = store.apply(StoreChanges(removed_addresses=(WEB_1.uid, WEB_2.uid), workloads={SLEEP.uid: SLEEP}))
    assert decide_outbound(gone, SLEEP, "10.96.0.10", 80).kind is Kind.DENY
