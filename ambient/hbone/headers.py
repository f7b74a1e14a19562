"""The HBONE CONNECT request and response heads (PROTOCOLS.md §6), as pure functions over header blocks.

Request: `:method CONNECT`, `:authority <ip>:<port>` (IPv6 `[ip]:port`), no `:scheme`/`:path`, plus the
caller's headers passed through (`baggage`, `forwarded: for="<ip:port>"`, `traceparent`). The server
refuses with 400 anything that is not a plain CONNECT to an IP authority. Blocks are lists of
`(name, value)` byte pairs, as h2 takes and gives them; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ambient.hbone.errors import InvalidRequest

HBONE_PORT = 15008

Block = list[tuple[bytes, bytes]]

# RFC 9110 token characters, lowercase only: HTTP/2 forbids uppercase field names.
_FIELD_NAME = re.compile(r"[a-z0-9!#$%&'*+\-.^_`|~]+")
# Connection-specific fields are malformed in HTTP/2 (RFC 9113 §8.2.2); `host` would contradict :authority.
_FORBIDDEN = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
                        "host"})
_BAD_VALUE = re.compile(r"[\x00\r\n]|^[ \t]|[ \t]$")


def parse_authority(authority: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port` → (canonical IP text, port). Host names, zones, missing or out-of-range
    ports raise `InvalidRequest` saying which part is wrong."""
    text = authority
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise InvalidRequest(f"authority {authority!r}: expected [<IPv6>]:<port>")
        host, port_text = text[1:close], text[close + 2:]
        want_v6 = True
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise InvalidRequest(f"authority {authority!r}: expected <ip>:<port>, the port is missing")
        want_v6 = False
    if "%" in host:
        raise InvalidRequest(f"authority {authority!r}: IPv6 zone identifiers are not allowed")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidRequest(f"authority {authority!r}: {host!r} is not an IP address (HBONE targets are "
                             "<ip>:<port>, not host names)") from None
    if (ip.version == 6) != want_v6:
        raise InvalidRequest(f"authority {authority!r}: IPv6 addresses must be written as [<ip>]:<port>")
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise InvalidRequest(f"authority {authority!r}: port {port_text!r} is not a number in 1..65535")
    return str(ip), int(port_text)


def format_authority(ip: str, port: int) -> str:
    """(ip, port) → `ip:port`, or `[ip]:port` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def forwarded_for(ip: str, port: int) -> str:
    """The `forwarded` header value naming the original client: `for="10.0.0.1:4000"`."""
    return f'for="{format_authority(ip, port)}"'


def new_traceparent(rng: random.Random | None = None) -> str:
    """A W3C `traceparent` for a connection that has none: `00-<32 hex>-<16 hex>-00` (not sampled)."""
    gen = rng or random.SystemRandom()
    return f"00-{gen.getrandbits(128) or 1:032x}-{gen.getrandbits(64) or 1:016x}-00"


def check_headers(headers: Mapping[str, str]) -> None:
    """Raise `InvalidRequest` for a header the caller may not add to a CONNECT request or response."""
    for name, value in headers.items():
        if not _FIELD_NAME.fullmatch(name):
            raise InvalidRequest(f"header name {name!r}: use lowercase letters, digits and -._ only "
                                 "(pseudo-headers such as :authority are set by the library)")
        if name in _FORBIDDEN:
            raise InvalidRequest(f"header {name!r} is connection-specific and not allowed in HTTP/2")
        if not isinstance(value, str) or _BAD_VALUE.search(value):
            raise InvalidRequest(f"header {name}: value {value!r} must be text without CR, LF, NUL or "
                                 "leading/trailing whitespace")


def request_block(authority: str, headers: Mapping[str, str]) -> Block:
    """The CONNECT request header block; validates the authority and the caller's headers."""
    parse_authority(authority)
    check_headers(headers)
    block: Block = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
    block += [(name.encode(), value.encode()) for name, value in headers.items()]
    return block


def response_block(status: int, headers: Mapping[str, str] | None = None) -> Block:
    if not 200 <= status <= 599:
        raise InvalidRequest(f"status {status} is not a final HTTP status")
    block: Block = [(b":status", str(status).encode())]
    if headers:
        check_headers(headers)
        block += [(name.encode(), value.encode()) for name, value in headers.items()]
    return block


def _fields(block: Iterable[tuple[bytes, bytes]]) -> tuple[dict[bytes, bytes], dict[str, str]]:
    """Pseudo-headers and regular headers (names lowercase text; repeated fields joined with ", ")."""
    pseudo: dict[bytes, bytes] = {}
    regular: dict[str, str] = {}
    for raw_name, raw_value in block:
        if raw_name.startswith(b":"):
            pseudo[raw_name] = raw_value
            continue
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        regular[name] = f"{regular[name]}, {value}" if name in regular else value
    return pseudo, regular


@dataclass(frozen=True)
class ConnectHead:
    """A valid HBONE request: the raw authority, its parsed target and the other headers."""

    authority: str
    target: tuple[str, int]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """A request the server answers without calling its handler."""

    status: int
    why: str


def parse_request(block: Iterable[tuple[bytes, bytes]]) -> ConnectHead | Refusal:
    """A request block (already validated as HTTP/2 by h2) → the CONNECT it asks for, or a 400."""
    pseudo, headers = _fields(block)
    method = pseudo.get(b":method", b"").decode("latin-1")
    if method != "CONNECT":
        return Refusal(400, f"method {method or '(none)'} is not CONNECT")
    if b":protocol" in pseudo or b":path" in pseudo or b":scheme" in pseudo:
        return Refusal(400, "extended CONNECT (:protocol/:path/:scheme) is not HBONE")
    authority = pseudo.get(b":authority", b"").decode("latin-1")
    try:
        target = parse_authority(authority)
    except InvalidRequest as exc:
        return Refusal(400, str(exc))
    return ConnectHead(authority, target, headers)


def parse_response(block: Iterable[tuple[bytes, bytes]]) -> tuple[int, dict[str, str]]:
    """A response block → (status, headers); a missing or non-numeric `:status` reads as 0."""
    pseudo, headers = _fields(block)
    status = pseudo.get(b":status", b"")
    return (int(status) if status.isdigit() and len(status) == 3 else 0), headers
