"""The CONNECT heads of PROTOCOLS.md §6: authority parsing (IPv4, IPv6, everything that must be refused),
the headers a caller may pass through, and the server's 400 decisions."""

from __future__ import annotations

import ipaddress
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.hbone.errors import InvalidRequest
from ambient.hbone.headers import (
    ConnectHead,
    Refusal,
    format_authority,
    forwarded_for,
    new_traceparent,
    parse_authority,
    parse_request,
    parse_response,
    request_block,
    response_block,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("10.244.1.7:9080", ("10.244.1.7", 9080)),
    ("[fd00::7]:80", ("fd00::7", 80)),
    ("[FD00:0:0::7]:80", ("fd00::7", 80)),  # canonical form, as the pod IP index stores it
    ("[::ffff:10.0.0.1]:1", (str(ipaddress.ip_address("::ffff:10.0.0.1")), 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_valid_authorities(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("reviews.bookinfo.svc:9080", "not an IP address"),
    ("10.0.0.1", "port is missing"),
    ("10.0.0.1:", "not a number"),
    ("10.0.0.1:0", "not a number in 1..65535"),
    ("10.0.0.1:65536", "1..65535"),
    ("10.0.0.1:+80", "not a number"),
    ("10.0.0.1:0080x", "not a number"),
    ("fd00::7:80", "must be written as [<ip>]:<port>"),
    ("[10.0.0.1]:80", "must be written as [<ip>]:<port>"),
    ("[fd00::7]80", "expected [<IPv6>]:<port>"),
    ("[fd00::7", "expected [<IPv6>]:<port>"),
    ("[fe80::1%eth0]:80", "zone"),
    ("010.0.0.1:80", "not an IP address"),
    ("", "port is missing"),
])
def test_invalid_authorities_say_why(text: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(why)):
        parse_authority(text)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_format_and_parse_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = format_authority(str(ip), port)
    assert parse_authority(text) == (str(ip), port)


@given(st.text(max_size=60))
def test_parse_authority_never_fails_otherwise(text: str) -> None:
    try:
        ip, port = parse_authority(text)
    except InvalidRequest:
        return
    assert 0 < port < 65536
    ipaddress.ip_address(ip)


def test_forwarded_and_traceparent_shapes() -> None:
    assert forwarded_for("10.244.1.5", 40000) == 'for="10.244.1.5:40000"'
    assert forwarded_for("fd00::5", 40000) == 'for="[fd00::5]:40000"'
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", new_traceparent(random.Random(1)))


def test_request_block_is_connect_without_scheme_or_path() -> None:
    block = request_block("10.0.0.1:80", {"baggage": "k8s.cluster.name=Kubernetes", "forwarded": 'for="1.2.3.4:5"'})
    assert block == [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"),
                     (b"baggage", b"k8s.cluster.name=Kubernetes"), (b"forwarded", b'for="1.2.3.4:5"')]


@pytest.mark.parametrize("headers", [
    {":path": "/"}, {"Baggage": "x"}, {"host": "x"}, {"connection": "close"}, {"transfer-encoding": "chunked"},
    {"x": "a\r\nb"}, {"x": " padded"}, {"x": "nul\x00"}, {"bad name": "x"}, {"": "x"},
])
def test_headers_that_cannot_be_sent(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        request_block("10.0.0.1:80", headers)


def test_response_block() -> None:
    assert response_block(200, {"baggage": "a=b"}) == [(b":status", b"200"), (b"baggage", b"a=b")]
    assert response_block(401) == [(b":status", b"401")]
    with pytest.raises(InvalidRequest):
        response_block(100)


def test_parse_request_accepts_a_plain_connect() -> None:
    head = parse_request([(b":method", b"CONNECT"), (b":authority", b"[fd00::7]:9080"),
                          (b"baggage", b"a=1"), (b"baggage", b"b=2"), (b"traceparent", b"00-x-y-00")])
    assert head == ConnectHead("[fd00::7]:9080", ("fd00::7", 9080), {"baggage": "a=1, b=2", "traceparent": "00-x-y-00"})


@pytest.mark.parametrize("block", [
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"10.0.0.1:80")],
    [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"10.0.0.1:80")],
    [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/"),
     (b":authority", b"10.0.0.1:80")],
    [(b":method", b"CONNECT"), (b":authority", b"reviews:9080")],
    [(b":method", b"CONNECT")],
])
def test_parse_request_refuses_with_400(block: list[tuple[bytes, bytes]]) -> None:
    refusal = parse_request(block)
    assert isinstance(refusal, Refusal)
    assert refusal.status == 400


def test_parse_response() -> None:
    assert parse_response([(b":status", b"200"), (b"baggage", b"x=y")]) == (200, {"baggage": "x=y"})
    assert parse_response([(b":status", b"2xx")])[0] == 0
