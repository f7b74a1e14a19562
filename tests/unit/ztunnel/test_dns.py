"""The DNS proxy core as transcripts: query bytes + snapshot + client → reply bytes or a Forward decision."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from ambient.dnsmsg import Forward, MalformedQuery
from ambient.proto import workload_pb2
from tests.unit.ztunnel.test_decision import key, service, snapshot_of, workload
from ztunnel.dns import TTL, answer, search_domains

WEB = service("web", vips=["10.96.0.10"], ports=[(80, 8080)])
DUAL = service("dual", vips=["10.96.0.11", "fd00:96::11"], ports=[(80, 80)])
V4_ONLY = service("v4only", vips=["10.96.0.12", "fd00:96::12"], ip_families=workload_pb2.IPV4_ONLY)
HEADLESS = service("db", ports=[(5432, 5432)])
HEADLESS_EMPTY = service("nobody")
DB_1 = workload("db-1", ips=["10.1.0.7", "fd00:1::7"], services={key(HEADLESS): [(5432, 5432)]})
DB_2 = workload("db-2", ips=["10.1.0.8"], services={key(HEADLESS): [(5432, 5432)]})
DB_SICK = workload("db-3", ips=["10.1.0.9"], services={key(HEADLESS): [(5432, 5432)]}, healthy=False)
API = service("api", "external", vips=["240.240.0.1"], hostname="api.example.com")
WILDCARD = service("wild", "external", vips=["240.240.0.2"], hostname="*.wild.example.com")
NO_VIP = service("novip", "external", hostname="novip.example.com")
PRIVATE = service("private", "other", vips=["10.96.0.13"], visibility=workload_pb2.Service.NAMESPACE)
SHARED_A = service("shared", "a", vips=["240.240.0.3"], hostname="shared.example.com")
SHARED_B = service("shared", "b", vips=["240.240.0.4"], hostname="shared.example.com")
SHARED_C = service("shared", "c", vips=["240.240.0.5"], hostname="shared.example.com", canonical=True)
REMOTE = service("remote", vips=["10.96.0.14"])
REMOTE.addresses.append(workload_pb2.NetworkAddress(network="east", address=bytes([10, 97, 0, 14])))

WORLD = snapshot_of(WEB, DUAL, V4_ONLY, HEADLESS, HEADLESS_EMPTY, DB_1, DB_2, DB_SICK, API, WILDCARD, NO_VIP,
                    PRIVATE, SHARED_A, SHARED_B, SHARED_C, REMOTE)


def ask(qname: str, qtype: str = "A", namespace: str = "default", *, udp: bool = False) -> DNSRecord | Forward:
    query = DNSRecord.question(qname, qtype)
    result = answer(bytes(query.pack()), WORLD, namespace, search_domains(namespace), udp=udp)
    if isinstance(result, Forward):
        assert result.query == bytes(query.pack())
        return result
    reply = DNSRecord.parse(result)
    assert (reply.header.id, reply.header.qr, reply.q) == (query.header.id, 1, query.q)
    return reply


def records(reply: DNSRecord | Forward) -> Any:
    """`forward`, or (rcode, [(owner, type, data)]) of an answer."""
    if isinstance(reply, Forward):
        return "forward"
    assert reply.header.aa == 1
    assert all(rr.ttl == TTL for rr in reply.rr)
    return reply.header.rcode, [(str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr]


def a(owner: str, *ips: str, rtype: str = "A") -> tuple[int, list[tuple[str, str, str]]]:
    return RCODE.NOERROR, [(owner, rtype, ip) for ip in ips]


NODATA: tuple[int, list[tuple[str, str, str]]] = (RCODE.NOERROR, [])

TRANSCRIPTS = [
    # Service FQDNs, any case, with or without the root dot.
    ("web.default.svc.cluster.local", "A", "default", a("web.default.svc.cluster.local.", "10.96.0.10")),
    ("Web.Default.SVC.cluster.local.", "A", "client", a("Web.Default.SVC.cluster.local.", "10.96.0.10")),
    ("web.default.svc.cluster.local", "AAAA", "default", NODATA),
    ("dual.default.svc.cluster.local", "AAAA", "default", a("dual.default.svc.cluster.local.", "fd00:96::11",
                                                            rtype="AAAA")),
    ("v4only.default.svc.cluster.local", "AAAA", "default", NODATA),
    ("v4only.default.svc.cluster.local", "A", "default", a("v4only.default.svc.cluster.local.", "10.96.0.12")),
    # Short names, expanded as the pod's search list would.
    ("web", "A", "default", a("web.", "10.96.0.10")),
    ("web", "A", "client", "forward"),  # `web.client.svc.cluster.local` does not exist
    ("web.default", "A", "client", a("web.default.", "10.96.0.10")),
    ("web.default.svc", "A", "client", a("web.default.svc.", "10.96.0.10")),
    # A search domain appended by the stub resolver is stripped; the answer points there with a CNAME.
    ("web.default.client.svc.cluster.local", "A", "client", (RCODE.NOERROR, [
        ("web.default.client.svc.cluster.local.", "CNAME", "web.default."),
        ("web.default.", "A", "10.96.0.10")])),
    ("api.example.com.client.svc.cluster.local", "A", "client", (RCODE.NOERROR, [
        ("api.example.com.client.svc.cluster.local.", "CNAME", "api.example.com."),
        ("api.example.com.", "A", "240.240.0.1")])),
    # Headless services: the endpoints' pod IPs of the asked family, healthy only.
    ("db.default.svc.cluster.local", "A", "default", a("db.default.svc.cluster.local.", "10.1.0.7", "10.1.0.8")),
    ("db.default.svc.cluster.local", "AAAA", "default", a("db.default.svc.cluster.local.", "fd00:1::7", rtype="AAAA")),
    ("nobody.default.svc.cluster.local", "A", "default", NODATA),
    # Mesh hostnames outside the cluster domain, exact and wildcard; one without VIPs is not ours to answer.
    ("api.example.com", "A", "default", a("api.example.com.", "240.240.0.1")),
    ("x.wild.example.com", "A", "default", a("x.wild.example.com.", "240.240.0.2")),
    ("novip.example.com", "A", "default", "forward"),
    # Several services with one hostname: the client's namespace, else the canonical one.
    ("shared.example.com", "A", "b", a("shared.example.com.", "240.240.0.4")),
    ("shared.example.com", "A", "z", a("shared.example.com.", "240.240.0.5")),
    # Namespace-private services exist only for their namespace.
    ("private.other.svc.cluster.local", "A", "other", a("private.other.svc.cluster.local.", "10.96.0.13")),
    ("private.other.svc.cluster.local", "A", "default", "forward"),
    # Only VIPs on the client's network.
    ("remote.default.svc.cluster.local", "A", "default", a("remote.default.svc.cluster.local.", "10.96.0.14")),
    # Everything else goes to the node's resolver: unknown names (even in the cluster domain), other types.
    ("nope.default.svc.cluster.local", "A", "default", "forward"),
    ("10-1-0-7.default.pod.cluster.local", "A", "default", "forward"),
    ("example.org", "A", "default", "forward"),
    ("web.default.svc.cluster.local", "SRV", "default", "forward"),
    ("web.default.svc.cluster.local", "MX", "default", "forward"),
    (".", "A", "default", "forward"),
]


@pytest.mark.parametrize(("qname", "qtype", "namespace", "expected"), TRANSCRIPTS,
                         ids=[f"{t[0]}-{t[1]}-from-{t[2]}" for t in TRANSCRIPTS])
def test_transcript(qname: str, qtype: str, namespace: str, expected: Any) -> None:
    assert records(ask(qname, qtype, namespace)) == expected


def test_forward_carries_the_servfail_to_send_when_no_upstream_answers() -> None:
    forward = ask("example.org")
    assert isinstance(forward, Forward)
    assert forward.qname == "example.org."
    servfail = DNSRecord.parse(forward.servfail)
    assert (servfail.header.rcode, str(servfail.q.qname)) == (RCODE.SERVFAIL, "example.org.")


def test_search_domains_are_the_kubernetes_ones() -> None:
    assert search_domains("bookinfo") == ("bookinfo.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert search_domains("ns", "corp.example") == ("ns.svc.corp.example", "svc.corp.example", "corp.example")


def test_custom_domain_and_search_list() -> None:
    svc = service("web", vips=["10.96.0.10"], hostname="web.default.svc.corp.example")
    snapshot = snapshot_of(svc)
    query = bytes(DNSRecord.question("web").pack())
    reply = answer(query, snapshot, "default", ["default.svc.corp.example"], domain="corp.example")
    assert isinstance(reply, bytes)
    assert [str(rr.rdata) for rr in DNSRecord.parse(reply).rr] == ["10.96.0.10"]
    assert isinstance(answer(query, snapshot, "default", ["default.svc.cluster.local"]), Forward)


def test_answers_follow_the_snapshot() -> None:
    query = bytes(DNSRecord.question("web.default.svc.cluster.local").pack())
    assert isinstance(answer(query, snapshot_of(), "default", search_domains("default")), Forward)
    moved = service("web", vips=["10.96.0.99"])
    reply = answer(query, snapshot_of(moved), "default", search_domains("default"))
    assert isinstance(reply, bytes)
    assert [str(rr.rdata) for rr in DNSRecord.parse(reply).rr] == ["10.96.0.99"]


def test_udp_reply_is_truncated_past_the_client_limit() -> None:
    big = service("big")
    pods = [workload(f"p{i}", ips=[f"10.2.{i // 250}.{i % 250 + 1}"], services={key(big): []}) for i in range(100)]
    snapshot = snapshot_of(big, *pods)
    query = bytes(DNSRecord.question("big.default.svc.cluster.local").pack())
    full = answer(query, snapshot, "default", search_domains("default"))
    assert isinstance(full, bytes) and len(DNSRecord.parse(full).rr) == 100
    truncated = answer(query, snapshot, "default", search_domains("default"), udp=True)
    assert isinstance(truncated, bytes)
    assert (DNSRecord.parse(truncated).header.tc, DNSRecord.parse(truncated).rr) == (1, [])


def test_non_query_opcode_is_notimp() -> None:
    data = bytearray(DNSRecord.question("web.default.svc.cluster.local").pack())
    data[2] |= 5 << 3  # UPDATE
    reply = answer(bytes(data), WORLD, "default", search_domains("default"))
    assert isinstance(reply, bytes)
    assert DNSRecord.parse(reply).header.rcode == RCODE.NOTIMP


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, bytes(DNSRecord.question("x").reply().pack())])
def test_garbage_and_responses_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedQuery):
        answer(data, WORLD, "default", search_domains("default"))


def test_two_questions_are_malformed() -> None:
    data = bytearray(DNSRecord.question("web.default.svc.cluster.local").pack())
    data[4:6] = struct.pack("!H", 2)
    with pytest.raises(MalformedQuery):
        answer(bytes(data), WORLD, "default", search_domains("default"))


@given(data=st.binary(max_size=600), udp=st.booleans())
def test_arbitrary_bytes_only_raise_malformed_query(data: bytes, udp: bool) -> None:
    try:
        result = answer(data, WORLD, "default", search_domains("default"), udp=udp)
    except MalformedQuery:
        return
    assert isinstance(result, bytes | Forward)


@given(labels=st.lists(st.sampled_from(["web", "default", "svc", "cluster", "local", "db", "x", "*", "example",
                                        "com", "api", "wild"]), max_size=7),
       qtype=st.sampled_from(["A", "AAAA", "ANY", "TXT"]),
       namespace=st.sampled_from(["default", "client", "other"]))
def test_any_name_is_answered_or_forwarded(labels: list[str], qtype: str, namespace: str) -> None:
    name = ".".join(labels) or "."
    query = DNSRecord.question(name, qtype)
    result = answer(bytes(query.pack()), WORLD, namespace, search_domains(namespace))
    if isinstance(result, bytes):
        reply = DNSRecord.parse(result)
        assert reply.header.rcode == RCODE.NOERROR and reply.header.id == query.header.id
