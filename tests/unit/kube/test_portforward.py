"""The port-forward wire, pure: channel frames (binary and base64), the client's view of a port's two
channels (scripted transcripts of what a kubelet sends), the server's parsing of `ports` and subprotocols,
and the HTTP answer parser used over a forward. Hypothesis feeds the parsers garbage: they fail with the
package's own errors, never anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.kube import portforward
from ambient.kube.portforward import (
    AnswerEnd,
    Data,
    Demux,
    Error,
    PortForwardError,
    ProtocolViolation,
    decode_base64_frame,
    decode_frame,
    encode_base64_frame,
    encode_frame,
    parse_http_response,
)


# -- frames ---------------------------------------------------------------------------------------------------
def test_a_binary_frame_is_the_channel_byte_then_the_payload() -> None:
    assert encode_frame(0, b"foo\n") == bytes([0, 102, 111, 111, 10])  # wsstream's own example
    assert decode_frame(bytes([1, 10])) == (1, b"\n")
    assert decode_frame(b"\x03") == (3, b"")


def test_a_base64_frame_is_the_channel_digit_then_base64() -> None:
    assert encode_base64_frame(0, b"foo\n") == "0Zm9vCg=="
    assert decode_base64_frame("1Cg==") == (1, b"\n")
    with pytest.raises(ProtocolViolation, match="not base64"):
        decode_base64_frame("0!!")
    assert decode_base64_frame("/") == (255, b"")  # below '0': byte arithmetic wraps, as Go's
    with pytest.raises(ProtocolViolation, match="not a channel"):
        decode_base64_frame("\u2603Zg==")


def test_the_port_preamble_is_16_bits_little_endian() -> None:
    assert portforward.port_preamble(15000) == b"\x98\x3a"
    assert portforward.port_preamble(80) == b"\x50\x00"


def test_port_i_has_data_channel_2i_and_error_channel_2i_plus_1() -> None:
    assert [(portforward.data_channel(i), portforward.error_channel(i)) for i in range(3)] == [(0, 1), (2, 3), (4, 5)]


def test_channels_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_frame(256, b"")
    with pytest.raises(ValueError):
        encode_base64_frame(208, b"")
    with pytest.raises(ProtocolViolation):
        decode_frame(b"")


@given(st.integers(0, 255), st.binary())
def test_binary_frames_round_trip(channel: int, payload: bytes) -> None:
    assert decode_frame(encode_frame(channel, payload)) == (channel, payload)


@given(st.integers(0, 207), st.binary())
def test_base64_frames_round_trip(channel: int, payload: bytes) -> None:
    assert decode_base64_frame(encode_base64_frame(channel, payload)) == (channel, payload)


# -- the client's demultiplexer: transcripts of what the server sends -------------------------------------------
def test_a_forward_that_connects_yields_the_data_after_both_preambles() -> None:
    demux = Demux(15000)
    transcript = [b"\x00\x98\x3a", b"\x01\x98\x3a", b"\x00HTTP/1.1 200 OK\r\n", b"\x00", b"\x00\r\n"]
    assert [demux.feed(m) for m in transcript] == [None, None, Data(b"HTTP/1.1 200 OK\r\n"), None, Data(b"\r\n")]


def test_text_on_the_error_channel_is_the_error() -> None:
    demux = Demux(15000)
    demux.feed(b"\x00\x98\x3a")
    demux.feed(b"\x01\x98\x3a")
    assert demux.feed(b"\x01error forwarding port 15000 to pod x, uid : dial failed") == \
        Error("error forwarding port 15000 to pod x, uid : dial failed")


def test_the_second_port_of_a_request_uses_channels_2_and_3() -> None:
    demux = Demux(8080, index=1)
    assert demux.feed(b"\x02\x90\x1f") is None
    assert demux.feed(b"\x02data") == Data(b"data")
    with pytest.raises(ProtocolViolation, match="channel 0"):
        demux.feed(b"\x00\x90\x1f")


@pytest.mark.parametrize(("first", "problem"), [
    (b"\x00\x98", "1 bytes, not the 2-byte port"),
    (b"\x00\x98\x3aextra", "7 bytes"),
    (b"\x00\x50\x00", "for port 80, not 15000"),
    (b"\x05\x98\x3a", "channel 5"),
])
def test_a_bad_first_frame_is_a_protocol_violation(first: bytes, problem: str) -> None:
    with pytest.raises(ProtocolViolation, match=problem) as caught:
        Demux(15000).feed(first)
    assert caught.value.reason == "ProtocolViolation"


@given(st.text(max_size=12))
def test_base64_decoding_fails_only_with_protocol_violations(message: str) -> None:
    try:
        channel, _ = decode_base64_frame(message)
    except ProtocolViolation:
        return
    assert 0 <= channel <= 255


@given(st.lists(st.binary(max_size=8), max_size=6))
def test_the_demultiplexer_fails_only_with_protocol_violations(messages: list[bytes]) -> None:
    demux = Demux(15000)
    for message in messages:
        try:
            event = demux.feed(message)
        except ProtocolViolation:
            return
        assert event is None or isinstance(event, Data | Error)


# -- the server's side ------------------------------------------------------------------------------------------
def test_ports_are_comma_lists_in_one_or_more_values() -> None:
    assert portforward.parse_ports(["15000"]) == [15000]
    assert portforward.parse_ports(["80,443", "8080"]) == [80, 443, 8080]


@pytest.mark.parametrize(("values", "message"), [
    ([], 'query parameter "port" is required'),
    ([""], 'query parameter "port" cannot be empty'),
    (["http"], 'unable to parse "http" as a port'),
    (["70000"], 'unable to parse "70000" as a port'),
    (["80,²"], 'unable to parse "80,²" as a port'),
    (["0"], 'port "0" must be > 0'),
])
def test_bad_ports_are_refused_in_the_kubelets_words(values: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        portforward.parse_ports(values)


def test_subprotocol_negotiation_follows_the_kubelet() -> None:
    assert portforward.negotiate([]) is None  # binary framing, no subprotocol in the answer
    assert portforward.negotiate(["v5.channel.k8s.io", "v4.channel.k8s.io"]) == "v4.channel.k8s.io"
    assert portforward.negotiate(["v4.base64.channel.k8s.io"]) == "v4.base64.channel.k8s.io"
    with pytest.raises(ValueError, match=r"requested protocol\(s\) are not supported: \[SPDY/3.1\+portforward"):
        portforward.negotiate(["SPDY/3.1+portforward.k8s.io"])


def test_the_forwarding_error_is_the_kubelets_sentence() -> None:
    assert portforward.forwarding_error(15000, "ztunnel-a_istio-system", "u-1", "dial tcp 10.0.0.1:15000: boom") == \
        "error forwarding port 15000 to pod ztunnel-a_istio-system, uid u-1: dial tcp 10.0.0.1:15000: boom"


# -- HTTP answers over a forward --------------------------------------------------------------------------------
def test_an_answer_with_content_length() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    assert parse_http_response(raw) == (200, b"{}")


def test_a_chunked_answer_is_dechunked() -> None:
    raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert parse_http_response(raw) == (404, b"hello world")


def test_an_answer_without_length_runs_to_eof() -> None:
    assert parse_http_response(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nall of it") == (200, b"all of it")


@pytest.mark.parametrize(("raw", "problem"), [
    (b"", "closed without an answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "ended before its headers"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "ended after 5 of 10 bytes"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "broke off inside a chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 2\xb2\xb2 OK\r\n\r\n", "not an HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "bad Content-Length"),
])
def test_a_bad_or_cut_answer_is_a_bad_response(raw: bytes, problem: str) -> None:
    with pytest.raises(PortForwardError, match=problem) as caught:
        parse_http_response(raw)
    assert caught.value.reason == "BadResponse"


def test_a_content_length_answer_ends_at_its_last_byte() -> None:
    end, raw = AnswerEnd(), b""
    for piece, whole in ((b"HTTP/1.1 200 OK\r\nContent-", False), (b"Length: 5\r\n\r\nhel", False), (b"lo", True)):
        raw += piece
        assert end.reached(raw) is whole


def test_a_chunked_answer_ends_at_its_last_chunk() -> None:
    end = AnswerEnd()
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert not end.reached(head + b"3\r\n0\r\n\r\n")  # looks like the end, but is inside a chunk
    assert end.reached(head + b"3\r\nabc\r\n0\r\n\r\n")


def test_an_answer_without_framing_ends_only_at_eof() -> None:
    assert not AnswerEnd().reached(b"HTTP/1.0 200 OK\r\n\r\nsome body")


@given(st.binary(max_size=200))
def test_the_http_parser_fails_only_with_bad_response(raw: bytes) -> None:
    try:
        status, body = parse_http_response(raw)
    except PortForwardError as exc:
        assert exc.reason == "BadResponse"
    else:
        assert 0 <= status <= 999 and isinstance(body, bytes)
