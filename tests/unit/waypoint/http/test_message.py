"""The shared message model: header multi-map semantics, head helpers, in-memory bodies and read_all."""

from __future__ import annotations

import pytest

from waypoint.http.errors import BodyTooLarge
from waypoint.http.message import EMPTY, Body, BytesBody, Headers, RequestHead, bytes_body, prepend, read_all


class ChunkBody(Body):
    """A streamed body from a list of chunks (what a codec delivers)."""

    def __init__(self, chunks: list[bytes], length: int | None = None) -> None:
        super().__init__(length)
        self.chunks = list(chunks)
        self.closed = False

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        self.closed = True


def test_headers_are_a_case_insensitive_ordered_multimap() -> None:
    headers = Headers([("Content-Type", "text/plain"), ("X-A", "1"), ("x-a", "2")])
    assert headers.get("content-type") == "text/plain"
    assert headers.get("X-A") == "1"
    assert headers.get_all("x-a") == ["1", "2"]
    assert "CONTENT-TYPE" in headers and "missing" not in headers
    assert headers.get("missing", "dflt") == "dflt"
    assert list(headers) == [("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2")]
    assert len(headers) == 3


def test_set_replaces_every_value_in_the_first_ones_place() -> None:
    headers = Headers([("a", "1"), ("b", "x"), ("A", "2"), ("c", "y")])
    headers.set("a", "new")
    assert list(headers) == [("a", "new"), ("b", "x"), ("c", "y")]
    headers.set("d", "appended")
    assert list(headers)[-1] == ("d", "appended")


def test_add_remove_and_copy_are_independent() -> None:
    headers = Headers([("a", "1")])
    copy = headers.copy()
    headers.add("A", "2")
    headers.remove("b")
    assert headers.get_all("a") == ["1", "2"]
    assert copy.get_all("a") == ["1"]
    headers.remove("A")
    assert len(headers) == 0
    assert Headers([("X", "1")]) == Headers([("x", "1")])


def test_request_head_query_and_path_only() -> None:
    head = RequestHead("GET", "/productpage?u=normal&u=2&flag&e=%20x#frag", "productpage:9080", Headers())
    assert head.path_only == "/productpage"
    assert head.query == {"u": ["normal", "2"], "flag": [""], "e": [" x"]}
    assert RequestHead("GET", "/a#b?c", "h", Headers()).path_only == "/a"
    assert RequestHead("GET", "/plain", "h", Headers()).query == {}


async def test_bytes_body_reads_once_and_replays() -> None:
    body = bytes_body(b"hello", Headers([("grpc-status", "0")]))
    assert body.length == 5
    assert isinstance(body, BytesBody) and body.unread
    copy = body.replay()
    assert body.read_nowait() == b"hello"
    assert await body.read() == b""
    assert not body.unread
    assert body.trailers == Headers([("grpc-status", "0")])
    assert await read_all(copy, 10) == b"hello"
    assert [chunk async for chunk in bytes_body(b"xy")] == [b"xy"]


async def test_empty_is_shareable() -> None:
    assert EMPTY.length == 0
    assert await read_all(EMPTY, 0) == b""
    assert await read_all(EMPTY, 0) == b""
    assert isinstance(EMPTY, BytesBody) and EMPTY.unread


async def test_read_all_joins_chunks_and_keeps_trailers() -> None:
    body = ChunkBody([b"ab", b"cd", b"e"])
    assert await read_all(body, 5) == b"abcde"


async def test_read_all_past_the_limit_keeps_what_it_read_so_the_body_can_still_be_forwarded() -> None:
    body = ChunkBody([b"abc", b"def", b"ghi"])
    with pytest.raises(BodyTooLarge) as err:
        await read_all(body, 4)
    assert err.value.data == b"abcdef"
    assert err.value.reason == "body_too_large"
    restored = prepend(err.value.data, body)
    assert await read_all(restored, 100) == b"abcdefghi"


async def test_read_all_refuses_a_declared_length_above_the_limit_without_reading() -> None:
    body = ChunkBody([b"x" * 10], length=10)
    with pytest.raises(BodyTooLarge) as err:
        await read_all(body, 9)
    assert err.value.data == b""
    assert body.chunks == [b"x" * 10]
