"""The admin HTTP server's pure parts: request heads, body framing, targets, routing and response bytes.
Untrusted input (heads) is also fed through hypothesis: it parses or is refused with BadRequest, never
anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.telemetry.admin_http import (
    BadRequest,
    BodyFraming,
    Request,
    RequestHead,
    Response,
    Router,
    body_framing,
    encode_response,
    find_head_end,
    http_date,
    json_response,
    parse_request_head,
    split_target,
    text_response,
    wants_keep_alive,
)

NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date


# -- heads ------------------------------------------------------------------------------------------------
def test_a_request_head_parses_with_lower_case_names_in_order() -> None:
    head = parse_request_head(b"POST /logging?level=debug HTTP/1.1\r\nHost: 127.0.0.1:15000\r\n"
                              b"X-Tag: a\r\nx-tag:  b \r\nContent-Length: 0\r\n\r\n")
    assert (head.method, head.target, head.version) == ("POST", "/logging?level=debug", "HTTP/1.1")
    assert head.headers == (("host", "127.0.0.1:15000"), ("x-tag", "a"), ("x-tag", "b"), ("content-length", "0"))
    assert head.header("x-tag") == "a, b" and head.header("missing") is None


def test_leading_blank_lines_and_bare_newlines_are_accepted() -> None:
    head = parse_request_head(b"\r\n\r\nGET / HTTP/1.0\nUser-Agent: nc\n\n")
    assert (head.method, head.version, head.headers) == ("GET", "HTTP/1.0", (("user-agent", "nc"),))


@pytest.mark.parametrize(("raw", "status", "says"), [
    (b"GET /\r\n\r\n", 400, "malformed request line 'GET /'"),
    (b"GET  / HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    (b"G(T / HTTP/1.1\r\n\r\n", 400, "malformed method"),
    (b"GET / HTTP/2.0\r\n\r\n", 505, "'HTTP/2.0' is not supported: use HTTP/1.1"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed request line"),  # TLS on a plain port
    (b"GET / HTTP/1.1\r\nHost example\r\n\r\n", 400, "malformed header line 'Host example'"),
    (b"GET / HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n", 400, "obs-fold"),
    (b"GET / HTTP/1.1\r\nA: x\x00y\r\n\r\n", 400, "control character in the value of header 'A'"),
    (b"GET /a\x7fb HTTP/1.1\r\n\r\n", 400, "control character in the request target"),
    (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n", 431, "too many header lines (101, at most 100)"),
])
def test_malformed_heads_are_refused_with_a_status_and_a_reason(raw: bytes, status: int, says: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_request_head(raw)
    assert refused.value.status == status and says in str(refused.value)


def test_head_end_is_the_first_blank_line_of_either_kind() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\nGET /b") == 18
    assert find_head_end(b"GET / HTTP/1.0\n\nrest") == 16
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=1,
                 max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=30)


@given(method=_token, path=st.lists(_token, max_size=4), version=st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
       headers=st.lists(st.tuples(_token, _value), max_size=10))
def test_well_formed_heads_parse_back_to_what_was_written(method: str, path: list[str], version: str,
                                                           headers: list[tuple[str, str]]) -> None:
    target = "/" + "/".join(path)
    raw = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    head = parse_request_head(raw.encode())
    assert head == RequestHead(method, target, version, tuple((n.lower(), v) for n, v in headers))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_are_a_bad_request(data: bytes) -> None:
    try:
        head = parse_request_head(data + b"\r\n\r\n")
    except BadRequest as exc:
        assert 400 <= exc.status < 600
    else:
        assert head.method and head.target
        framing_or_refusal(head)


def framing_or_refusal(head: RequestHead) -> None:
    try:
        body_framing(head)
        split_target(head.target)
    except BadRequest:
        pass


# -- bodies and targets -----------------------------------------------------------------------------------
def head_with(*headers: tuple[str, str]) -> RequestHead:
    return RequestHead("POST", "/", "HTTP/1.1", tuple(headers))


def test_body_framing_by_length_chunked_or_none() -> None:
    assert body_framing(head_with()) == BodyFraming(0)
    assert body_framing(head_with(("content-length", "12"))) == BodyFraming(12)
    assert body_framing(head_with(("content-length", "5"), ("content-length", "5"))) == BodyFraming(5)
    assert body_framing(head_with(("transfer-encoding", "Chunked"))) == BodyFraming(None, chunked=True)


@pytest.mark.parametrize(("headers", "status", "says"), [
    ((("content-length", "-1"),), 400, "invalid Content-Length '-1'"),
    ((("content-length", "1"), ("content-length", "2")), 400, "invalid Content-Length '1, 2'"),
    ((("content-length", "9" * 19),), 400, "invalid Content-Length"),
    ((("transfer-encoding", "chunked"), ("content-length", "3")), 400, "both Transfer-Encoding and Content-Length"),
    ((("transfer-encoding", "gzip, chunked"),), 501, "transfer coding 'gzip, chunked' is not supported"),
])
def test_ambiguous_or_unsupported_framing_is_refused(headers: tuple[tuple[str, str], ...], status: int,
                                                     says: str) -> None:
    with pytest.raises(BadRequest) as refused:
        body_framing(head_with(*headers))
    assert refused.value.status == status and says in str(refused.value)


def test_targets_split_into_a_decoded_path_and_the_query() -> None:
    assert split_target("/logging?level=access%3Doff&level=debug&x=") == (
        "/logging", {"level": "access=off", "x": ""}, {"level": ["access=off", "debug"], "x": [""]})
    assert split_target("/stats%2Fprometheus") == ("/stats/prometheus", {}, {})
    assert split_target("http://127.0.0.1:15000/config_dump?a=1") == ("/config_dump", {"a": "1"}, {"a": ["1"]})
    assert split_target("*") == ("*", {}, {})
    with pytest.raises(BadRequest, match="malformed request target 'config_dump'"):
        split_target("config_dump")


def test_keep_alive_follows_the_version_and_connection_header() -> None:
    def head(version: str, connection: str | None) -> RequestHead:
        return RequestHead("GET", "/", version, (("connection", connection),) if connection else ())

    assert wants_keep_alive(head("HTTP/1.1", None))
    assert not wants_keep_alive(head("HTTP/1.1", "Close"))
    assert not wants_keep_alive(head("HTTP/1.0", None))
    assert wants_keep_alive(head("HTTP/1.0", "keep-alive"))


# -- routing and responses --------------------------------------------------------------------------------
def ok(_: Request) -> Response:
    return text_response("ok\n")


def test_router_finds_handlers_and_answers_404_and_405_itself() -> None:
    router = Router()
    router.get("/config_dump", ok)
    router.add(("GET", "post"), "/logging", ok)
    router.post("/quitquitquit", ok)
    assert router.resolve("GET", "/config_dump") is ok
    assert router.resolve("HEAD", "/config_dump") is ok
    assert router.resolve("POST", "/logging") is ok
    missing = router.resolve("GET", "/nope")
    assert isinstance(missing, Response) and (missing.status, missing.text) == (404, "404 not found: /nope\n")
    wrong = router.resolve("GET", "/quitquitquit")
    assert isinstance(wrong, Response) and wrong.status == 405
    assert wrong.text == "405 method not allowed: use POST /quitquitquit\n" and ("Allow", "POST") in wrong.headers
    wrong = router.resolve("DELETE", "/logging")
    assert isinstance(wrong, Response) and ("Allow", "GET, HEAD, POST") in wrong.headers
    assert router.paths == ["/config_dump", "/logging", "/quitquitquit"]


def test_router_refuses_duplicate_and_relative_routes() -> None:
    router = Router()
    router.get("/a", ok)
    with pytest.raises(ValueError, match="GET /a is already routed"):
        router.get("/a", ok)
    with pytest.raises(ValueError, match="must start with /"):
        router.get("a", ok)


def test_response_bytes() -> None:
    assert http_date(NOW) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert encode_response(text_response("ready\n"), keep_alive=True, now=NOW) == (
        b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 6\r\nConnection: keep-alive\r\n\r\nready\n")
    assert encode_response(json_response({"a": 1}, 503, indent=None), keep_alive=False, head_only=True,
                           now=NOW) == (
        b"HTTP/1.1 503 Service Unavailable\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        b"Content-Type: application/json; charset=utf-8\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
    assert encode_response(Response(204, b"ignored"), keep_alive=True, now=NOW) == (
        b"HTTP/1.1 204 No Content\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: keep-alive\r\n\r\n")
    with pytest.raises(ValueError, match="line break"):
        encode_response(text_response("x", headers=[("X-A", "1\r\nSet-Cookie: y")]), keep_alive=True)
