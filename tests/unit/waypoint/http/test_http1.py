"""HTTP/1.1 without sockets: bytes → events (pipelining, chunked bodies and trailers, limits, upgrades),
events → heads (hop-by-hop stripping, Host, absolute-form), heads → bytes (framing decisions), and body
framing. Hypothesis drives the parser with arbitrary input and round-trips serialized requests."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.http.errors import HttpError, ProtocolError
from waypoint.http.http1 import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    BodyEncoder,
    Http1Input,
    _End,
    _Message,
    encode_trailers,
    request_head,
    response_head,
    serialize_request,
    serialize_response,
)
from waypoint.http.message import Headers, HttpLimits, RequestHead, ResponseHead


class NoStream:
    """Http1Input is fed directly in these tests; it must never read."""

    async def read(self, max_bytes: int = -1) -> bytes:
        raise AssertionError("unexpected read")

    async def write(self, data: Any) -> None:
        raise AssertionError("unexpected write")

    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def parse(*pieces: bytes, response: bool = False, limits: HttpLimits | None = None) -> Http1Input:
    inp = Http1Input(NoStream(), limits or HttpLimits(), response=response)
    for piece in pieces:
        inp.feed(piece)
    return inp


def kinds(inp: Http1Input) -> list[Any]:
    out: list[Any] = []
    for event in inp.queue:
        if isinstance(event, _Message):
            out.append(("head", event.method or event.status, event.url))
        elif isinstance(event, _End):
            out.append(("end", event.trailers))
        else:
            out.append(event)
    return out


def test_pipelined_requests_are_queued_in_order() -> None:
    inp = parse(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kinds(inp) == [("head", "GET", b"/a"), ("end", None),
                          ("head", "POST", b"/b"), b"abc", ("end", None),
                          ("head", "GET", b"/c"), ("end", None)]
    assert inp.error is None


def test_chunked_body_with_trailers_split_anywhere() -> None:
    wire = (b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nGrpc-Status: 0\r\nX-Sum: 11\r\n\r\n")
    for cut in (1, 30, 70, len(wire) - 3):
        inp = parse(wire[:cut], wire[cut:])
        events = kinds(inp)
        assert events[0] == ("head", "POST", b"/upload")
        assert b"".join(e for e in events if isinstance(e, bytes)) == b"hello world"
        assert events[-1] == ("end", [(b"Grpc-Status", b"0"), (b"X-Sum", b"11")])


def test_request_head_strips_hop_by_hop_and_connection_nominated_fields() -> None:
    inp = parse(b"GET /p?q=1 HTTP/1.1\r\nHost: reviews:9080\r\nConnection: keep-alive, X-Private\r\n"
                b"Keep-Alive: timeout=5\r\nX-Private: secret\r\nTE: trailers\r\nUpgrade-Insecure-Requests: 1\r\n"
                b"Proxy-Connection: close\r\nX-Request-Id: abc\r\n\r\n")
    head, expect = request_head(inp.queue[0])  # type: ignore[arg-type]
    assert (head.method, head.path, head.authority, head.protocol) == ("GET", "/p?q=1", "reviews:9080", "HTTP/1.1")
    assert list(head.headers) == [("te", "trailers"), ("upgrade-insecure-requests", "1"), ("x-request-id", "abc")]
    assert not expect


def test_te_other_than_trailers_is_dropped() -> None:
    head, _ = request_head(parse(b"GET / HTTP/1.1\r\nHost: h\r\nTE: gzip\r\n\r\n").queue[0])  # type: ignore[arg-type]
    assert "te" not in head.headers


def test_expect_continue_is_consumed_not_forwarded() -> None:
    inp = parse(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    head, expect = request_head(inp.queue[0])  # type: ignore[arg-type]
    assert expect and "expect" not in head.headers
    assert head.headers.get("content-length") == "4"


def test_absolute_form_target_gives_the_authority() -> None:
    head, _ = request_head(parse(b"GET http://details:9080/details/0?x=1 HTTP/1.1\r\nHost: other\r\n\r\n"
                                 ).queue[0])  # type: ignore[arg-type]
    assert (head.authority, head.path) == ("details:9080", "/details/0?x=1")


@pytest.mark.parametrize("wire", [b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"])
def test_http11_needs_exactly_one_host(wire: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        request_head(parse(wire).queue[0])  # type: ignore[arg-type]
    assert err.value.reason == "bad_request"


def test_http10_without_host_is_accepted_and_not_kept_alive() -> None:
    inp = parse(b"GET /old HTTP/1.0\r\n\r\n")
    msg = inp.queue[0]
    assert isinstance(msg, _Message)
    head, _ = request_head(msg)
    assert head.authority == "" and msg.version == "1.0" and not msg.keep_alive


@pytest.mark.parametrize("wire", [
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_requests_become_a_bad_request_error(wire: bytes) -> None:
    inp = parse(wire)
    assert isinstance(inp.error, ProtocolError) and inp.error.reason == "bad_request"


def test_a_good_request_before_a_bad_one_is_still_served() -> None:
    inp = parse(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
    assert kinds(inp)[:2] == [("head", "GET", b"/ok"), ("end", None)]
    assert inp.error is not None


def test_oversized_heads_and_too_many_headers_are_431() -> None:
    limits = HttpLimits(max_header_bytes=1024, max_headers=10)
    big = parse(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", limits=limits)
    many = parse(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(11)) + b"\r\n", limits=limits)
    # A header that never ends must not be buffered without bound either.
    endless = parse(b"GET / HTTP/1.1\r\nX-Slow: ", *[b"a" * 512] * 4, limits=limits)
    for inp in (big, many, endless):
        assert isinstance(inp.error, ProtocolError) and inp.error.reason == "headers_too_large"


def test_h2c_upgrade_is_ignored_and_parsing_continues() -> None:
    inp = parse(b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [e for e in kinds(inp) if isinstance(e, tuple) and e[0] == "head"] == [("head", "GET", b"/a"),
                                                                                   ("head", "GET", b"/b")]
    msg = inp.queue[0]
    assert isinstance(msg, _Message) and not msg.upgrade
    head, _ = request_head(msg)
    assert not {"upgrade", "connection", "http2-settings"} & {name for name, _ in head.headers}


@pytest.mark.parametrize("wire", [b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
                                  b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"])
def test_connect_and_other_upgrades_are_marked_and_stop_parsing(wire: bytes) -> None:
    inp = parse(wire + b"\x00binary protocol")
    msg = inp.queue[0]
    assert isinstance(msg, _Message) and msg.upgrade and inp.eof


def test_response_to_head_has_no_body_whatever_its_content_length() -> None:
    inp = Http1Input(NoStream(), HttpLimits(), response=True)
    inp.skip_body = True
    inp.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert kinds(inp) == [("head", 200, b""), ("end", None)]
    assert not inp.unclean
    inp.feed(b"HTTP/1.1 204 No Content\r\n\r\n")  # the next response parses normally
    assert kinds(inp)[-2:] == [("head", 204, b""), ("end", None)]


def test_bytes_after_a_head_response_make_the_connection_unclean() -> None:
    inp = Http1Input(NoStream(), HttpLimits(), response=True)
    inp.skip_body = True
    inp.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert inp.unclean


def test_interim_responses_and_bodies_by_status() -> None:
    inp = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                response=True)
    assert kinds(inp) == [("head", 100, b""), ("end", None), ("head", 304, b""), ("end", None),
                          ("head", 200, b""), b"abc", ("end", None)]
    head = response_head(inp.queue[4])  # type: ignore[arg-type]
    assert list(head.headers) == []


def test_serialize_request_framing() -> None:
    head = RequestHead("GET", "/r?x=1", "reviews:9080", Headers([("x-b3-traceid", "1"), ("connection", "close"),
                                                                 ("content-length", "99"), ("host", "ignored")]))
    assert serialize_request(head, 0) == (b"GET /r?x=1 HTTP/1.1\r\nhost: reviews:9080\r\nx-b3-traceid: 1\r\n\r\n",
                                          NO_BODY)
    post = RequestHead("POST", "/p", "h", Headers())
    assert serialize_request(post, 0) == (b"POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n", LENGTH)
    assert serialize_request(post, None) == (b"POST /p HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n",
                                             CHUNKED)


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb"])
def test_serializers_refuse_header_injection(value: str) -> None:
    with pytest.raises(HttpError) as err:
        serialize_request(RequestHead("GET", "/", "h", Headers([("x-user", value)])), 0)
    assert err.value.reason == "invalid_header"


def test_serialize_response_framing() -> None:
    ok = ResponseHead(200, Headers([("content-type", "text/plain"), ("transfer-encoding", "chunked")]))
    assert serialize_response(ok, 2, "GET", "1.1", True) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n", LENGTH, True)
    assert serialize_response(ok, None, "GET", "1.1", True)[1:] == (CHUNKED, True)
    data, framing, keep = serialize_response(ok, None, "GET", "1.0", True)
    assert (framing, keep) == (UNTIL_CLOSE, False) and data.endswith(b"connection: close\r\n\r\n")
    data, framing, keep = serialize_response(ok, 5, "GET", "1.0", True)
    assert (framing, keep) == (LENGTH, True) and b"connection: keep-alive\r\n" in data
    assert b"connection: close\r\n" in serialize_response(ok, 5, "GET", "1.1", False)[0]


def test_bodiless_responses_keep_their_declared_length() -> None:
    with_length = ResponseHead(200, Headers([("content-length", "1234")]))
    data, framing, _ = serialize_response(with_length, 0, "HEAD", "1.1", True)
    assert framing == NO_BODY and b"content-length: 1234\r\n" in data
    data, _, _ = serialize_response(ResponseHead(200, Headers()), 42, "HEAD", "1.1", True)
    assert b"content-length: 42\r\n" in data
    data, framing, _ = serialize_response(ResponseHead(204, Headers([("content-length", "0")])), 0, "GET", "1.1", True)
    assert framing == NO_BODY and b"content-length" not in data
    data, _, _ = serialize_response(ResponseHead(304, Headers([("content-length", "7")])), None, "GET", "1.1", True)
    assert b"content-length: 7\r\n" in data and b"transfer-encoding" not in data


def test_body_encoder_chunks_with_trailers_and_checks_lengths() -> None:
    out: list[bytes] = []
    chunked = BodyEncoder(CHUNKED, None)
    chunked.chunk(b"hello", out)
    chunked.end(Headers([("grpc-status", "0")]), out)
    assert b"".join(out) == b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n"
    assert encode_trailers(None) == b"0\r\n\r\n"
    fixed = BodyEncoder(LENGTH, 3)
    with pytest.raises(HttpError, match="longer"):
        fixed.chunk(b"abcd", [])
    short = BodyEncoder(LENGTH, 3)
    short.chunk(b"ab", [])
    with pytest.raises(HttpError, match="1 bytes short"):
        short.end(None, [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_never_crash_the_parser(pieces: list[bytes]) -> None:
    for response in (False, True):
        inp = parse(*pieces, response=response, limits=HttpLimits(max_header_bytes=512, max_headers=8))
        assert inp.error is None or isinstance(inp.error, ProtocolError)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda name: name not in {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
                              "host", "content-length", "expect", "http2-settings"})
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"),
                 max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_token, _value), max_size=10), st.binary(max_size=200), st.booleans())
def test_serialized_requests_parse_back_to_the_same_message(fields: list[tuple[str, str]], body: bytes,
                                                             chunked: bool) -> None:
    head = RequestHead("POST", "/path?q=1", "svc:80", Headers(fields))
    data, framing = serialize_request(head, None if chunked else len(body))
    out = [data]
    encoder = BodyEncoder(framing, None if chunked else len(body))
    if body:
        encoder.chunk(body, out)
    encoder.end(None, out)
    inp = parse(b"".join(out))
    msg = inp.queue[0]
    assert isinstance(msg, _Message)
    parsed, _ = request_head(msg)
    assert (parsed.method, parsed.path, parsed.authority) == ("POST", "/path?q=1", "svc:80")
    assert [(n, v) for n, v in parsed.headers if n != "content-length"] == [(n, v.strip(" \t")) for n, v in fields]
    assert b"".join(e for e in inp.queue if isinstance(e, bytes)) == body
    assert isinstance(inp.queue[-1], _End)
