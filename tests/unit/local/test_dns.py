"""The cluster DNS decision logic: zone lookups and query -> reply transcripts, no sockets."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from ambient.local.dns import (
    CLASSIC_UDP_PAYLOAD,
    ZONE_TTL,
    Answer,
    ClusterZone,
    Forward,
    InvalidRecord,
    InvalidUpstream,
    MalformedQuery,
    Outcome,
    answer,
    parse_upstream,
    upstreams_from_resolv_conf,
)


@pytest.fixture
def zone() -> ClusterZone:
    zone = ClusterZone()
    zone.set_service("default", "web", ["10.96.0.10"], ["10.1.0.5", "10.1.0.6"], headless=False)
    zone.set_service("default", "db", [], ["10.1.0.7", "10.1.0.8"], headless=True)
    zone.set_service("default", "empty", [], [], headless=True)
    zone.set_pod("default", "10.1.0.5")
    zone.set_pod("other", "fd00::5")
    return zone


def addresses(*ips: str) -> Answer:
    return Answer(Outcome.ADDRESSES, ips)


NODATA = Answer(Outcome.NODATA)
NXDOMAIN = Answer(Outcome.NXDOMAIN)
FORWARD = Answer(Outcome.FORWARD)


@pytest.mark.parametrize(
    ("qname", "expected"),
    [
        ("web.default.svc.cluster.local", addresses("10.96.0.10")),
        ("web.default.svc.cluster.local.", addresses("10.96.0.10")),
        ("WEB.Default.SVC.Cluster.Local.", addresses("10.96.0.10")),
        ("db.default.svc.cluster.local", addresses("10.1.0.7", "10.1.0.8")),
        ("empty.default.svc.cluster.local", NODATA),
        ("missing.default.svc.cluster.local", NXDOMAIN),
        ("web.nowhere.svc.cluster.local", NXDOMAIN),
        ("default.svc.cluster.local", NODATA),
        ("nowhere.svc.cluster.local", NXDOMAIN),
        ("svc.cluster.local", NODATA),
        ("cluster.local.", NODATA),
        ("pod.cluster.local", NODATA),
        ("10-1-0-5.default.pod.cluster.local", addresses("10.1.0.5")),
        ("10-1-0-9.default.pod.cluster.local", NXDOMAIN),
        ("10-1-0-5.other.pod.cluster.local", NXDOMAIN),
        ("fd00--5.other.pod.cluster.local", addresses("fd00::5")),
        ("not-an-ip.default.pod.cluster.local", NXDOMAIN),
        ("x.web.default.svc.cluster.local", NXDOMAIN),
        ("nonsense.cluster.local", NXDOMAIN),
        ("example.com", FORWARD),
        ("local", FORWARD),
        ("notcluster.local", FORWARD),
        ("", FORWARD),
        (".", FORWARD),
    ],
)
def test_lookup(zone: ClusterZone, qname: str, expected: Answer) -> None:
    assert zone.lookup(qname) == expected


def test_custom_domain_is_normalised() -> None:
    zone = ClusterZone("Corp.Example.")
    zone.set_service("a", "b", ["10.0.0.1"], [], headless=False)
    assert zone.lookup("b.a.svc.corp.example") == addresses("10.0.0.1")
    assert zone.lookup("b.a.svc.cluster.local") == FORWARD


def test_headless_ignores_cluster_ips_and_plain_ignores_endpoints() -> None:
    zone = ClusterZone()
    zone.set_service("ns", "h", ["10.96.0.1"], ["10.1.0.1"], headless=True)
    zone.set_service("ns", "p", ["10.96.0.2"], ["10.1.0.2"], headless=False)
    assert zone.lookup("h.ns.svc.cluster.local") == addresses("10.1.0.1")
    assert zone.lookup("p.ns.svc.cluster.local") == addresses("10.96.0.2")


def test_set_service_replaces_and_delete_removes_namespace() -> None:
    zone = ClusterZone()
    zone.set_service("ns", "s", ["10.96.0.1"], [], headless=False)
    zone.set_service("NS", "S", ["10.96.0.2"], [], headless=False)
    assert zone.lookup("s.ns.svc.cluster.local") == addresses("10.96.0.2")
    zone.delete_service("ns", "s")
    assert zone.lookup("s.ns.svc.cluster.local") == NXDOMAIN
    assert zone.lookup("ns.svc.cluster.local") == NXDOMAIN
    zone.delete_service("ns", "s")  # deleting twice is not an error


def test_pods_come_and_go() -> None:
    zone = ClusterZone()
    zone.set_pod("ns", "10.1.0.1")
    assert zone.lookup("ns.pod.cluster.local") == NODATA
    zone.delete_pod("ns", "10.1.0.1")
    assert zone.lookup("10-1-0-1.ns.pod.cluster.local") == NXDOMAIN
    assert zone.lookup("ns.pod.cluster.local") == NXDOMAIN
    zone.delete_pod("ns", "not an ip")


def test_duplicate_addresses_collapse() -> None:
    zone = ClusterZone()
    zone.set_service("ns", "h", [], ["10.1.0.1", "10.1.0.1"], headless=True)
    assert zone.lookup("h.ns.svc.cluster.local") == addresses("10.1.0.1")


def test_bad_address_is_rejected() -> None:
    with pytest.raises(InvalidRecord):
        ClusterZone().set_service("ns", "s", ["None"], [], headless=False)
    with pytest.raises(InvalidRecord):
        ClusterZone().set_pod("ns", "10.1.0")


def ask(zone: ClusterZone, qname: str, qtype: str = "A", *, udp: bool = False) -> DNSRecord:
    query = DNSRecord.question(qname, qtype)
    result = answer(bytes(query.pack()), zone, udp=udp)
    assert isinstance(result, bytes), result
    reply = DNSRecord.parse(result)
    assert reply.header.id == query.header.id
    assert reply.header.qr == 1
    assert reply.q == query.q
    return reply


def test_a_answer(zone: ClusterZone) -> None:
    reply = ask(zone, "Web.Default.svc.cluster.local")
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.header.aa == 1
    assert [(str(rr.rname), rr.rtype, str(rr.rdata), rr.ttl) for rr in reply.rr] == [
        ("Web.Default.svc.cluster.local.", QTYPE.A, "10.96.0.10", ZONE_TTL)
    ]


def test_headless_answer_has_every_ready_endpoint(zone: ClusterZone) -> None:
    reply = ask(zone, "db.default.svc.cluster.local")
    assert sorted(str(rr.rdata) for rr in reply.rr) == ["10.1.0.7", "10.1.0.8"]


@pytest.mark.parametrize("qtype", ["AAAA", "MX", "TXT", "SRV"])
def test_other_types_for_existing_name_are_nodata(zone: ClusterZone, qtype: str) -> None:
    reply = ask(zone, "web.default.svc.cluster.local", qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.rr == []


def test_aaaa_for_ipv6_pod(zone: ClusterZone) -> None:
    reply = ask(zone, "fd00--5.other.pod.cluster.local", "AAAA")
    assert [(rr.rtype, str(rr.rdata)) for rr in reply.rr] == [(QTYPE.AAAA, "fd00::5")]
    assert ask(zone, "fd00--5.other.pod.cluster.local", "A").rr == []


def test_nxdomain_echoes_query_with_aa(zone: ClusterZone) -> None:
    reply = ask(zone, "missing.default.svc.cluster.local")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert reply.header.aa == 1
    assert reply.rr == []


def test_name_outside_domain_is_forwarded_verbatim(zone: ClusterZone) -> None:
    query = bytes(DNSRecord.question("example.com").pack())
    result = answer(query, zone)
    assert isinstance(result, Forward)
    assert result.query == query
    assert result.qname == "example.com."
    servfail = DNSRecord.parse(result.servfail)
    assert servfail.header.rcode == RCODE.SERVFAIL
    assert servfail.header.id == DNSRecord.parse(query).header.id
    assert str(servfail.q.qname) == "example.com."


def test_udp_reply_is_truncated_past_512_bytes() -> None:
    zone = ClusterZone()
    zone.set_service("ns", "big", [], [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(100)], headless=True)
    assert len(ask(zone, "big.ns.svc.cluster.local").rr) == 100
    reply = ask(zone, "big.ns.svc.cluster.local", udp=True)
    assert reply.header.tc == 1
    assert reply.rr == []


def test_edns_payload_size_raises_the_udp_limit() -> None:
    zone = ClusterZone()
    zone.set_service("ns", "mid", [], [f"10.1.0.{i + 1}" for i in range(40)], headless=True)
    query = DNSRecord.question("mid.ns.svc.cluster.local")
    plain = answer(bytes(query.pack()), zone, udp=True)
    assert isinstance(plain, bytes)
    assert DNSRecord.parse(plain).header.tc == 1
    # OPT pseudo-record: root name, TYPE 41, CLASS = 1232 byte payload, TTL 0, RDLENGTH 0.
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    data = bytearray(query.pack())
    data[10:12] = struct.pack("!H", 1)  # ARCOUNT
    with_edns = answer(bytes(data) + opt, zone, udp=True)
    assert isinstance(with_edns, bytes)
    assert len(with_edns) > CLASSIC_UDP_PAYLOAD
    assert len(DNSRecord.parse(with_edns).rr) == 40


@pytest.mark.parametrize("questions", [0, 2])
def test_not_exactly_one_question_is_malformed(zone: ClusterZone, questions: int) -> None:
    data = bytearray(DNSRecord.question("web.default.svc.cluster.local").pack())
    data[4:6] = struct.pack("!H", questions)
    with pytest.raises(MalformedQuery):
        answer(bytes(data), zone)


def test_non_query_opcode_is_notimp(zone: ClusterZone) -> None:
    data = bytearray(DNSRecord.question("web.default.svc.cluster.local").pack())
    data[2] |= 5 << 3  # UPDATE
    reply = answer(bytes(data), zone)
    assert isinstance(reply, bytes)
    assert DNSRecord.parse(reply).header.rcode == RCODE.NOTIMP
    assert str(DNSRecord.parse(reply).q.qname) == "web.default.svc.cluster.local."


def test_responses_are_never_answered(zone: ClusterZone) -> None:
    response = ask(zone, "web.default.svc.cluster.local")
    with pytest.raises(MalformedQuery):
        answer(bytes(response.pack()), zone)


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x3f"])
def test_short_or_truncated_messages_are_malformed(zone: ClusterZone, data: bytes) -> None:
    with pytest.raises(MalformedQuery):
        answer(data, zone)


def test_pointer_loop_is_malformed(zone: ClusterZone) -> None:
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    with pytest.raises(MalformedQuery):
        answer(header + b"\xc0\x0c\x00\x01\x00\x01", zone)


@given(data=st.binary(max_size=600), udp=st.booleans())
def test_arbitrary_bytes_only_raise_malformed_query(data: bytes, udp: bool) -> None:
    zone = ClusterZone()
    zone.set_service("default", "web", ["10.96.0.10"], [], headless=False)
    try:
        result = answer(data, zone, udp=udp)
    except MalformedQuery:
        return
    assert isinstance(result, bytes | Forward)


@given(
    header=st.binary(min_size=12, max_size=12),
    labels=st.lists(st.binary(min_size=1, max_size=63), max_size=8),
    tail=st.binary(max_size=40),
)
def test_query_shaped_bytes_only_raise_malformed_query(header: bytes, labels: list[bytes], tail: bytes) -> None:
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    data = header[:2] + bytes([header[2] & 0x7F]) + header[3:4] + b"\x00\x01" + header[6:] + name + tail
    try:
        result = answer(data, ClusterZone())
    except MalformedQuery:
        return
    assert isinstance(result, bytes | Forward)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", 53)),
        ("10.0.0.1:5353", ("10.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_parse_upstream(spec: str, expected: tuple[str, int]) -> None:
    assert parse_upstream(spec) == expected


@pytest.mark.parametrize("spec", ["", "dns.google", "10.0.0.1:", "10.0.0.1:99999", "10.0.0.1:x", "[::1]"])
def test_parse_upstream_rejects(spec: str) -> None:
    with pytest.raises(InvalidUpstream):
        parse_upstream(spec)


def test_upstreams_from_resolv_conf_skips_own_addresses(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated\n"
        "search default.svc.cluster.local svc.cluster.local\n"
        "nameserver 10.96.0.10\n"
        "nameserver 192.0.2.53\n"
        "nameserver  2001:db8::53\n"
        "options ndots:5\n"
        "nameserver\n"
    )
    assert upstreams_from_resolv_conf(path, skip=["10.96.0.10"]) == ["192.0.2.53", "2001:db8::53"]
    assert upstreams_from_resolv_conf(path, skip=["2001:0db8::0053"]) == ["10.96.0.10", "192.0.2.53"]
