"""DNS message handling shared by the local cluster's DNS and ztunnel's DNS proxy: parse one query,
build a reply, truncate it for UDP, or decide to forward it.

Sans-IO: bytes in, bytes (or a `Forward` decision) out. dnslib raises several unrelated exception types
on garbage; `parse_query` is the one boundary where they become `MalformedQuery`. This module knows no
zone: what a name resolves to is the caller's business.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSBuffer, DNSHeader, DNSQuestion, DNSRecord

DNS_PORT = 53
# 512 bytes: the RFC 1035 UDP limit for clients that do not announce EDNS0.
CLASSIC_UDP_PAYLOAD = 512
# 1232 bytes: the DNS Flag Day 2020 ceiling that avoids IP fragmentation, whatever EDNS0 asks for.
MAX_UDP_PAYLOAD = 1232

HEADER_LEN = 12
QR_BIT = 0x80  # in the third byte of the header: set on responses
_MAX_NAME_LEN = 255
_ADDRESS_CLASSES = (1, 255)  # IN and ANY ("*" in dnslib's table)


class DnsError(Exception):
    """Base of the DNS errors; `reason` is a stable label for logs and metrics."""

    reason = "dns_error"


class MalformedQuery(DnsError):
    """The bytes are not a DNS query we can answer; servers drop them without a reply."""

    reason = "malformed_query"


class InvalidUpstream(DnsError):
    """An upstream resolver is not written as `ip`, `ip:port` or `[ipv6]:port`."""

    reason = "invalid_upstream"


@dataclass(frozen=True)
class Query:
    """One parsed query: its header, its single question, and the UDP payload size the client accepts."""

    header: Any  # dnslib.DNSHeader
    question: Any  # dnslib.DNSQuestion
    udp_limit: int

    @property
    def labels(self) -> tuple[str, ...]:
        """The question name as lower-case labels, without the root."""
        return tuple(label.decode("utf-8", "replace").lower() for label in self.question.qname.label)


@dataclass(frozen=True)
class Forward:
    """Decision to relay `query` verbatim to an upstream; `servfail` is the reply if none answers."""

    query: bytes
    qname: str
    servfail: bytes


def parse_query(data: bytes) -> Query:
    """Parse a DNS query with exactly one question; anything else raises `MalformedQuery`."""
    try:
        return _parse_query(data)
    except MalformedQuery:
        raise
    except Exception as exc:  # the declared boundary: dnslib raises several unrelated types on garbage
        raise MalformedQuery(f"undecodable message: {exc}") from exc


def _parse_query(data: bytes) -> Query:
    if len(data) < HEADER_LEN:
        raise MalformedQuery(f"{len(data)} bytes is shorter than a DNS header")
    if data[2] & QR_BIT:
        # Never answer a response: that is how two servers end up in a reflection loop.
        raise MalformedQuery("message is a response, not a query")
    buffer = DNSBuffer(data)
    header = DNSHeader.parse(buffer)
    if header.q != 1:
        # Real stub resolvers always ask one question; anything else is noise we do not reflect.
        raise MalformedQuery(f"expected one question, got {header.q}")
    question = DNSQuestion.parse(buffer)
    if len(b".".join(question.qname.label)) > _MAX_NAME_LEN:
        raise MalformedQuery("question name longer than 255 bytes")
    return Query(header, question, _udp_limit(header, data[buffer.offset :]))


def _udp_limit(header: Any, rest: bytes) -> int:
    """The client's EDNS0 payload size, read from an OPT record right after the question."""
    if header.a or header.auth or not header.ar:
        return CLASSIC_UDP_PAYLOAD
    # OPT: root name (one zero byte), TYPE 41, CLASS = payload size.
    if len(rest) >= 5 and rest[0] == 0 and rest[1:3] == b"\x00\x29":
        announced = int.from_bytes(rest[3:5], "big")
        return min(max(announced, CLASSIC_UDP_PAYLOAD), MAX_UDP_PAYLOAD)
    return CLASSIC_UDP_PAYLOAD


def reply(query: Query, rcode: int, records: Iterable[Any] = ()) -> Any:
    """An authoritative reply to `query` (same id, flags and question) with `records` as answers."""
    header = DNSHeader(
        id=query.header.id, qr=1, aa=1, ra=1, rd=query.header.rd, opcode=query.header.opcode, rcode=rcode
    )
    message = DNSRecord(header, q=query.question)
    for record in records:
        message.add_answer(record)
    return message


def pack_reply(query: Query, message: Any, *, udp: bool) -> bytes:
    """Encode `message`; over UDP past the client's payload limit, send it empty with TC set instead."""
    packed = bytes(message.pack())
    if udp and len(packed) > query.udp_limit:
        truncated = reply(query, message.header.rcode)
        truncated.header.tc = 1
        packed = bytes(truncated.pack())
    return packed


def address_records(question: Any, addresses: Sequence[str], ttl: int, name: Any = None) -> list[Any]:
    """A/AAAA records of `addresses` that answer `question` (by type and class), named `name` or the qname."""
    if question.qclass not in _ADDRESS_CLASSES:
        return []
    owner = question.qname if name is None else name
    records = []
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if ip.version == 4 and question.qtype in (QTYPE.A, QTYPE.ANY):
            records.append(RR(owner, QTYPE.A, rdata=A(text), ttl=ttl))
        elif ip.version == 6 and question.qtype in (QTYPE.AAAA, QTYPE.ANY):
            records.append(RR(owner, QTYPE.AAAA, rdata=AAAA(text), ttl=ttl))
    return records


def forward(data: bytes, query: Query) -> Forward:
    """The decision to relay `data` (the query as received) upstream."""
    return Forward(query=bytes(data), qname=str(query.question.qname),
                   servfail=bytes(reply(query, RCODE.SERVFAIL).pack()))


def parse_upstream(spec: str) -> tuple[str, int]:
    """`1.1.1.1` / `1.1.1.1:5353` / `::1` / `[::1]:5353` -> (host, port)."""
    text = spec.strip()
    host, port = text, str(DNS_PORT)
    if not _is_ip(text):
        host, _, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
    if not _is_ip(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidUpstream(f"upstream resolver {spec!r} is not ip, ip:port or [ipv6]:port")
    return comparable_ip(host), int(port)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def comparable_ip(text: str) -> str:
    """The canonical text of an IP address (so `::0001` equals `::1`); other text unchanged."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text
