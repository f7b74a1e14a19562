"""Protocol detection: the h2 preface, HTTP/1 request lines, everything else, and undecided prefixes.
The decision never changes as more bytes arrive (Hypothesis)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.http.detect import H2_PREFACE, detect, sniff


@pytest.mark.parametrize(("data", "expected"), [
    (H2_PREFACE, "http2"),
    (H2_PREFACE + b"\x00\x00\x12\x04", "http2"),
    (H2_PREFACE[:10], None),
    (b"P", None),
    (b"GET / HTTP/1.1\r\n", "http1"),
    (b"GET ", "http1"),
    (b"POST /api", "http1"),
    (b"M-SEARCH * HTTP/1.1", "http1"),
    (b"OPTIONS * HTTP/1.1", "http1"),
    (b"GE", None),
    (b"PROPFI", None),
    (b"", None),
    (b"get / HTTP/1.1", "tcp"),  # methods are case-sensitive
    (b"GETX / HTTP/1.1", "tcp"),
    (b"PRI * HTTP/1.1\r\n", "tcp"),
    (b"\x16\x03\x01\x02\x00", "tcp"),  # a TLS ClientHello
    (b"SSH-2.0-OpenSSH_9.6\r\n", "tcp"),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "tcp"),  # PostgreSQL SSLRequest
    (b"HELLO", "tcp"),
])
def test_detect(data: bytes, expected: str | None) -> None:
    assert detect(data) == expected


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_a_decision_never_changes_with_more_bytes(data: bytes, more: bytes) -> None:
    decided = detect(data)
    if decided is not None:
        assert detect(data + more) == decided


@given(st.binary(min_size=len(H2_PREFACE), max_size=64))
def test_enough_bytes_always_decide(data: bytes) -> None:
    assert detect(data) is not None


class Trickle:
    """A stream that yields the given pieces, then waits forever (a client that stopped sending)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def read(self, max_bytes: int = -1) -> bytes:
        if self.pieces:
            return self.pieces.pop(0)
        await asyncio.Event().wait()
        return b""

    async def write(self, data: Any) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


async def test_sniff_reads_until_decided_and_returns_every_byte() -> None:
    assert await sniff(Trickle(b"PRI * HTTP/2", b".0\r\n\r\nSM\r\n\r\n\x00\x00"), 1) == (
        "http2", H2_PREFACE + b"\x00\x00")
    assert await sniff(Trickle(b"G", b"ET /x HTTP/1.1\r\n"), 1) == ("http1", b"GET /x HTTP/1.1\r\n")


async def test_sniff_takes_silence_for_a_server_first_protocol() -> None:
    assert await sniff(Trickle(), 0.01) == ("tcp", b"")
    assert await sniff(Trickle(b"GE"), 0.01) == ("tcp", b"GE")  # undecided at the deadline


async def test_sniff_at_eof_is_tcp() -> None:
    assert await sniff(Trickle(b"GE", b""), 1) == ("tcp", b"GE")
