"""Services → Service, and each pod's `services` port map (ambient/control/translate/services.py)."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.control.translate import Translation
from ambient.control.translate.services import app_protocol
from ambient.proto import workload_pb2

from .translate_cases import check_case, load_case

WEB = "shop/web.shop.svc.cluster.local"


@pytest.fixture(scope="module")
def translation() -> Translation:
    return load_case("services").translate()


def _ports(port_list: workload_pb2.PortList) -> dict[int, int]:
    return {p.service_port: p.target_port for p in port_list.ports}


def test_case_matches_expected() -> None:
    check_case("services")


def test_service_fields(translation: Translation) -> None:
    svc = translation.addresses[WEB].service
    assert (svc.name, svc.namespace, svc.hostname, svc.canonical) == ("web", "shop", "web.shop.svc.cluster.local", True)
    assert [(a.network, a.address) for a in svc.addresses] == [
        ("", bytes([10, 96, 0, 20])), ("", bytes.fromhex("fd000096000000000000000000000020"))]
    # numeric target ports kept, named ones are 0 here (resolved per pod), absent ones default to the port
    assert _ports(workload_pb2.PortList(ports=svc.ports))[80] == 0
    assert _ports(workload_pb2.PortList(ports=svc.ports))[81] == 9081
    assert _ports(workload_pb2.PortList(ports=svc.ports))[83] == 83
    assert list(svc.subject_alt_names) == ["spiffe://example.org/ns/shop/sa/legacy", "spiffe://example.org/ns/shop/sa/web"]


def test_headless_service_has_no_vip(translation: Translation) -> None:
    assert not translation.addresses["shop/db.shop.svc.cluster.local"].service.addresses


def test_load_balancer_ingress_ip_is_a_vip(translation: Translation) -> None:
    edge = translation.addresses["shop/edge.shop.svc.cluster.local"].service
    assert [a.address for a in edge.addresses] == [bytes([10, 96, 0, 30]), bytes([192, 0, 2, 10])]
    assert list(edge.load_balancing.routing_preference) == [workload_pb2.LoadBalancing.NODE]


@pytest.mark.parametrize(("port", "expected"), [
    ({"name": "http"}, workload_pb2.HTTP11),
    ({"name": "HTTP-web"}, workload_pb2.HTTP11),
    ({"name": "http2"}, workload_pb2.HTTP2),
    ({"name": "grpc-api"}, workload_pb2.GRPC),
    ({"name": "grpc-web"}, workload_pb2.UNKNOWN),
    ({"name": "tcp-db"}, workload_pb2.TCP),
    ({"name": "tls"}, workload_pb2.TLS),
    ({"name": "https"}, workload_pb2.TLS),
    ({"name": "web"}, workload_pb2.UNKNOWN),
    ({"name": "tcp", "appProtocol": "http"}, workload_pb2.HTTP11),
    ({"appProtocol": "kubernetes.io/h2c"}, workload_pb2.HTTP2),
    ({"name": "http", "protocol": "UDP"}, workload_pb2.UNKNOWN),
    ({}, workload_pb2.UNKNOWN),
])
def test_app_protocol_from_app_protocol_or_port_name(port: dict[str, Any], expected: int) -> None:
    assert app_protocol(port) == expected


def test_named_target_ports_resolve_per_pod(translation: Translation) -> None:
    web_1 = translation.addresses["Kubernetes//Pod/shop/web-1"].workload.services[WEB]
    web_2 = translation.addresses["Kubernetes//Pod/shop/web-2"].workload.services[WEB]
    assert _ports(web_1)[80] == 8080 and _ports(web_2)[80] == 8888
    assert _ports(web_1)[82] == 9000  # the TCP port named grpc, not the UDP one
    assert 82 not in _ports(web_2)  # web-2 declares no port named grpc
    assert _ports(web_2)[81] == 9081


def test_services_select_only_in_their_namespace(translation: Translation) -> None:
    services = translation.addresses["Kubernetes//Pod/shop/web-1"].workload.services
    assert "other/web.other.svc.cluster.local" not in services


def test_selectorless_service_reaches_pods_and_external_endpoints_through_endpointslices(
        translation: Translation) -> None:
    external = "shop/external.shop.svc.cluster.local"
    assert _ports(translation.addresses["Kubernetes//Pod/shop/web-1"].workload.services[external]) == {
        443: 8443, 9090: 9090}
    opaque = translation.addresses["Kubernetes/discovery.k8s.io/EndpointSlice/shop/external-1/203.0.113.7"].workload
    assert list(opaque.addresses) == [bytes([203, 0, 113, 7])]
    assert opaque.network_mode == workload_pb2.HOST_NETWORK and not opaque.service_account
    assert _ports(opaque.services[external]) == {443: 8443, 9090: 9090}
    not_ready = translation.addresses["Kubernetes/discovery.k8s.io/EndpointSlice/shop/external-1/203.0.113.8"]
    assert not_ready.workload.status == workload_pb2.UNHEALTHY
    assert not any("203.0.113.99" in name for name in translation.addresses)  # slice of no Service
