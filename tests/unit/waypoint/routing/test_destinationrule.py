"""DestinationRule → policy layers and subsets: every section, Istio's defaults, section-level error
isolation, and merging several rules for one host."""

from __future__ import annotations

from typing import Any

import pytest

from waypoint.routing.destinationrule import compile_destination_rule, merge_rules
from waypoint.routing.model import (
    ConnectionPoolSettings,
    ConsistentHash,
    HashCookie,
    LbAlgorithm,
    LoadBalancer,
    OutlierSettings,
    TrafficPolicy,
)

from .fixtures import REVIEWS, destination_rule, fields


def top_of(policy: dict[str, Any]) -> TrafficPolicy:
    compiled = compile_destination_rule(destination_rule(trafficPolicy=policy))
    assert fields(compiled.errors, "error") == []
    assert compiled.top is not None
    return compiled.top


def test_host_and_subsets() -> None:
    compiled = compile_destination_rule(destination_rule())
    assert compiled.host == REVIEWS
    assert [(s.name, dict(s.labels)) for s in compiled.subsets] == [
        ("v1", {"version": "v1"}), ("v2", {"version": "v2"}), ("v3", {"version": "v3"})]
    assert compiled.top is None
    assert compiled.errors == ()


@pytest.mark.parametrize(("lb", "expected"), [
    ({"simple": "ROUND_ROBIN"}, LoadBalancer(LbAlgorithm.ROUND_ROBIN)),
    ({"simple": "LEAST_REQUEST"}, LoadBalancer(LbAlgorithm.LEAST_REQUEST)),
    ({"simple": "RANDOM"}, LoadBalancer(LbAlgorithm.RANDOM)),
    ({"simple": "PASSTHROUGH"}, LoadBalancer(LbAlgorithm.PASSTHROUGH)),
    ({"simple": "UNSPECIFIED"}, LoadBalancer(LbAlgorithm.LEAST_REQUEST)),
    ({"consistentHash": {"httpHeaderName": "X-User"}}, LoadBalancer(consistent_hash=ConsistentHash(header="x-user"))),
    ({"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}},
     LoadBalancer(consistent_hash=ConsistentHash(cookie=HashCookie("user", None, 0.0)))),
    ({"consistentHash": {"httpCookie": {"name": "user", "path": "/", "ttl": "10s"}, "ringHash":
                         {"minimumRingSize": 1024}}},
     LoadBalancer(consistent_hash=ConsistentHash(cookie=HashCookie("user", "/", 10.0)))),
    ({"consistentHash": {"useSourceIp": True}}, LoadBalancer(consistent_hash=ConsistentHash(use_source_ip=True))),
    ({"consistentHash": {"httpQueryParameterName": "user"}},
     LoadBalancer(consistent_hash=ConsistentHash(query_parameter="user"))),
])
def test_load_balancer(lb: dict[str, Any], expected: LoadBalancer) -> None:
    assert top_of({"loadBalancer": lb}).lb == expected


def test_least_conn_is_least_request_with_a_warning() -> None:
    compiled = compile_destination_rule(destination_rule(trafficPolicy={"loadBalancer": {"simple": "LEAST_CONN"}}))
    assert compiled.top is not None and compiled.top.lb == LoadBalancer(LbAlgorithm.LEAST_REQUEST)
    assert fields(compiled.errors, "warning") == ["spec.trafficPolicy.loadBalancer.simple"]


def test_connection_pool_as_in_the_circuit_breaking_task() -> None:
    pool = top_of({"connectionPool": {"tcp": {"maxConnections": 1},
                                      "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}})
    assert pool.connection_pool == ConnectionPoolSettings(max_connections=1, http1_max_pending_requests=1,
                                                          max_requests_per_connection=1)


def test_connection_pool_everything() -> None:
    pool = top_of({"connectionPool": {
        "tcp": {"maxConnections": 100, "connectTimeout": "30ms", "idleTimeout": "5m", "maxConnectionDuration": "1h"},
        "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 1000, "maxRequestsPerConnection": 0,
                 "maxRetries": 3, "idleTimeout": "90s"}}}).connection_pool
    assert pool == ConnectionPoolSettings(max_connections=100, http1_max_pending_requests=10, http2_max_requests=1000,
                                          max_requests_per_connection=None, max_retries=3, connect_timeout=0.03,
                                          idle_timeout=90.0, tcp_idle_timeout=300.0, max_connection_duration=3600.0)


@pytest.mark.parametrize(("outlier", "expected", "warnings"), [
    ({"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "3m", "maxEjectionPercent": 100},
     OutlierSettings(consecutive_5xx=1, interval=1.0, base_ejection_time=180.0, max_ejection_percent=100), []),
    ({"consecutiveErrors": 2}, OutlierSettings(consecutive_5xx=2),
     ["spec.trafficPolicy.outlierDetection.consecutiveErrors"]),
    ({"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 3},
     OutlierSettings(consecutive_5xx=0, consecutive_gateway_errors=3), []),
    ({}, OutlierSettings(), []),
    ({"minHealthPercent": 50, "outlierDetectionHttpErrorCodes": [500, 429]},
     OutlierSettings(min_health_percent=50, error_status_codes=frozenset({500, 429})), []),
    ({"consecutive5xxErrors": 4, "consecutiveErrors": 9}, OutlierSettings(consecutive_5xx=4),
     ["spec.trafficPolicy.outlierDetection.consecutiveErrors"]),
])
def test_outlier_detection(outlier: dict[str, Any], expected: OutlierSettings, warnings: list[str]) -> None:
    compiled = compile_destination_rule(destination_rule(trafficPolicy={"outlierDetection": outlier}))
    assert fields(compiled.errors, "warning") == warnings
    assert compiled.top is not None and compiled.top.outlier == expected


def test_outlier_defaults_are_istios() -> None:
    defaults = OutlierSettings()
    assert (defaults.consecutive_5xx, defaults.interval, defaults.base_ejection_time, defaults.max_ejection_percent,
            defaults.min_health_percent, defaults.consecutive_gateway_errors) == (5, 10.0, 30.0, 10, 0, 0)


def test_port_level_settings_and_subset_policies() -> None:
    obj = destination_rule(subsets=(), trafficPolicy={
        "loadBalancer": {"simple": "RANDOM"},
        "portLevelSettings": [{"port": {"number": 9080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}]})
    obj["spec"]["subsets"] = [{"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {
        "connectionPool": {"tcp": {"maxConnections": 2}},
        "portLevelSettings": [{"port": {"number": 9443}, "outlierDetection": {}}]}}]
    compiled = compile_destination_rule(obj)
    assert compiled.errors == ()
    assert compiled.top == TrafficPolicy(lb=LoadBalancer(LbAlgorithm.RANDOM),
                                         port_overrides={9080: TrafficPolicy(lb=LoadBalancer(LbAlgorithm.ROUND_ROBIN))})
    v2 = compiled.subsets[0]
    assert v2.policy == TrafficPolicy(connection_pool=ConnectionPoolSettings(max_connections=2),
                                      port_overrides={9443: TrafficPolicy(outlier=OutlierSettings())})


# --- errors stay local -------------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "field", "kept"), [
    ({"loadBalancer": {"simple": "FASTEST"}, "connectionPool": {"tcp": {"maxConnections": 1}}},
     "spec.trafficPolicy.loadBalancer.simple", "connection_pool"),
    ({"loadBalancer": {"simple": "RANDOM", "consistentHash": {"useSourceIp": True}},
      "connectionPool": {"tcp": {"maxConnections": 1}}}, "spec.trafficPolicy.loadBalancer", "connection_pool"),
    ({"loadBalancer": {"consistentHash": {}}, "outlierDetection": {}},
     "spec.trafficPolicy.loadBalancer.consistentHash", "outlier"),
    ({"connectionPool": {"tcp": {"maxConnections": -1}}, "loadBalancer": {"simple": "RANDOM"}},
     "spec.trafficPolicy.connectionPool.tcp.maxConnections", "lb"),
    ({"connectionPool": {"tcp": {"connectTimeout": "fast"}}, "loadBalancer": {"simple": "RANDOM"}},
     "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "lb"),
    ({"connectionPool": {"http": {"maxPending": 1}}, "loadBalancer": {"simple": "RANDOM"}},
     "spec.trafficPolicy.connectionPool.http.maxPending", "lb"),
    ({"outlierDetection": {"maxEjectionPercent": 150}, "loadBalancer": {"simple": "RANDOM"}},
     "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "lb"),
    ({"outlierDetection": {"interval": "0s"}, "loadBalancer": {"simple": "RANDOM"}},
     "spec.trafficPolicy.outlierDetection.interval", "lb"),
    ({"outlierDetection": {"consecutive5xxErrors": -2}, "loadBalancer": {"simple": "RANDOM"}},
     "spec.trafficPolicy.outlierDetection.consecutive5xxErrors", "lb"),
    ({"loadBalancr": {"simple": "RANDOM"}, "outlierDetection": {}}, "spec.trafficPolicy.loadBalancr", "outlier"),
])
def test_a_bad_section_is_dropped_alone(policy: dict[str, Any], field: str, kept: str) -> None:
    compiled = compile_destination_rule(destination_rule(trafficPolicy=policy))
    assert fields(compiled.errors, "error") == [field]
    assert compiled.top is not None
    assert getattr(compiled.top, kept) is not None
    assert [s.name for s in compiled.subsets] == ["v1", "v2", "v3"]


def test_bad_subsets_are_dropped_alone() -> None:
    obj = destination_rule()
    obj["spec"]["subsets"] += [{"name": "v1", "labels": {"version": "again"}}, {"labels": {"version": "x"}},
                               {"name": "v4", "labels": {"version": 4}}, {"name": "v5", "lables": {}}]
    compiled = compile_destination_rule(obj)
    assert fields(compiled.errors, "error") == ["spec.subsets[3].name", "spec.subsets[4].name",
                                                "spec.subsets[5].labels.version", "spec.subsets[6].lables"]
    assert [s.name for s in compiled.subsets] == ["v1", "v2", "v3"]
    assert compiled.subsets[0].labels == {"version": "v1"}


def test_bad_port_level_entry_is_dropped_alone() -> None:
    compiled = compile_destination_rule(destination_rule(trafficPolicy={"portLevelSettings": [
        {"loadBalancer": {"simple": "RANDOM"}},
        {"port": {"number": 9080}, "loadBalancer": {"simple": "ROUND_ROBIN"}},
        {"port": {"number": 9080}, "loadBalancer": {"simple": "RANDOM"}}]}))
    assert fields(compiled.errors, "error") == ["spec.trafficPolicy.portLevelSettings[0].port"]
    assert fields(compiled.errors, "warning") == ["spec.trafficPolicy.portLevelSettings[2].port"]
    assert compiled.top is not None
    assert compiled.top.port_overrides == {9080: TrafficPolicy(lb=LoadBalancer(LbAlgorithm.ROUND_ROBIN))}


@pytest.mark.parametrize(("spec", "field", "severity"), [
    ({"subsets": []}, "spec.host", "error"),
    ({"host": "reviews", "workloadSelector": {"matchLabels": {"app": "x"}}}, "spec.workloadSelector", "warning"),
])
def test_unusable_rules(spec: dict[str, Any], field: str, severity: str) -> None:
    obj = destination_rule()
    obj["spec"] = spec
    compiled = compile_destination_rule(obj)
    assert fields(compiled.errors, severity) == [field]
    assert compiled.host == ""


@pytest.mark.parametrize(("policy", "field"), [
    ({"tunnel": {"targetHost": "x", "targetPort": 1}}, "spec.trafficPolicy.tunnel"),
    ({"loadBalancer": {"simple": "RANDOM", "localityLbSetting": {"enabled": True}}},
     "spec.trafficPolicy.loadBalancer.localityLbSetting"),
    ({"connectionPool": {"tcp": {"tcpKeepalive": {"time": "1s"}}}},
     "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive"),
    ({"outlierDetection": {"splitExternalLocalOriginErrors": True}},
     "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors"),
])
def test_unsupported_fields_are_warned_about(policy: dict[str, Any], field: str) -> None:
    compiled = compile_destination_rule(destination_rule(trafficPolicy=policy))
    assert fields(compiled.errors, "warning") == [field]
    assert fields(compiled.errors, "error") == []


def test_tls_and_export_to_are_accepted_silently() -> None:
    compiled = compile_destination_rule(destination_rule(trafficPolicy={"tls": {"mode": "ISTIO_MUTUAL"}},
                                                         exportTo=["."]))
    assert compiled.errors == ()


# --- merging -----------------------------------------------------------------------------------------

def test_rules_for_one_host_merge_oldest_first() -> None:
    older = compile_destination_rule(destination_rule(
        subsets=("v1", "v2"), name="a", created="2024-01-01T00:00:00Z",
        trafficPolicy={"loadBalancer": {"simple": "RANDOM"}}))
    newer = compile_destination_rule(destination_rule(
        subsets=("v2", "v3"), name="b", created="2024-02-01T00:00:00Z",
        trafficPolicy={"loadBalancer": {"simple": "ROUND_ROBIN"}}))
    policy, errors = merge_rules(REVIEWS, [newer, older])
    assert sorted(policy.subsets) == ["v1", "v2", "v3"]
    assert policy.subsets["v2"].labels == {"version": "v2"}
    assert policy.lb == LoadBalancer(LbAlgorithm.RANDOM)
    assert [(e.name, e.field, e.severity) for e in errors] == [("b", "spec.subsets[0]", "warning"),
                                                               ("b", "spec.trafficPolicy", "warning")]


def test_a_later_rule_supplies_the_policy_the_first_lacks() -> None:
    older = compile_destination_rule(destination_rule(name="a", created="2024-01-01T00:00:00Z"))
    newer = compile_destination_rule(destination_rule(
        subsets=(), name="b", created="2024-02-01T00:00:00Z",
        trafficPolicy={"connectionPool": {"tcp": {"maxConnections": 1}}}))
    policy, errors = merge_rules(REVIEWS, [older, newer])
    assert policy.connection_pool.max_connections == 1
    assert sorted(policy.subsets) == ["v1", "v2", "v3"]
    assert errors == []
