"""ZDS sans-IO core (PROTOCOLS.md §4): wire bytes, both state machines as scripted transcripts, and the
decoders against arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.zds.protocol import (
    MAX_MESSAGE_SIZE,
    AddWorkload,
    ClientConnection,
    ClientState,
    DelWorkload,
    Hello,
    KeepWorkload,
    Request,
    Response,
    ServerConnection,
    ServerState,
    SnapshotSent,
    WorkloadInfo,
    ZdsError,
    ZdsProtocolError,
    decode_hello,
    decode_request,
    decode_response,
    encode_hello,
    encode_request,
    encode_response,
)

INFO = WorkloadInfo("n", "ns", "sa")
HELLO = bytes.fromhex("0801")
ACK = bytes.fromhex("0a00")
NACK_BOOM = bytes.fromhex("0a060a04") + b"boom"
ADD_U1 = bytes.fromhex("0a11" "0a02") + b"u1" + bytes.fromhex("120b" "0a01") + b"n" + bytes.fromhex("1202") + b"ns" \
    + bytes.fromhex("1a02") + b"sa"
KEEP_U1 = bytes.fromhex("2a04" "0a02") + b"u1"
DEL_U1 = bytes.fromhex("1204" "1202") + b"u1"
SNAPSHOT_SENT = bytes.fromhex("1a00")


# --- wire bytes: field numbers are Istio's ----------------------------------------------------------------

@pytest.mark.parametrize(("request_", "wire"), [
    (AddWorkload("u1", INFO), ADD_U1),
    (KeepWorkload("u1"), KEEP_U1),
    (DelWorkload("u1"), DEL_U1),
    (SnapshotSent(), SNAPSHOT_SENT),
])
def test_requests_encode_to_istio_wire_bytes_and_back(request_: Request, wire: bytes) -> None:
    assert encode_request(request_) == wire
    assert decode_request(wire) == request_


def test_hello_and_responses_encode_to_istio_wire_bytes() -> None:
    assert encode_hello() == HELLO
    assert decode_hello(HELLO) == 1
    assert encode_response() == ACK
    assert decode_response(ACK) == ""
    assert encode_response("boom") == NACK_BOOM
    assert decode_response(NACK_BOOM) == "boom"


def test_add_without_workload_info_decodes_with_none() -> None:
    assert decode_request(bytes.fromhex("0a04" "0a02") + b"u1") == AddWorkload("u1", None)


def test_request_longer_than_the_peer_reads_is_refused() -> None:
    with pytest.raises(ZdsError) as err:
        encode_request(AddWorkload("u1", WorkloadInfo("x" * MAX_MESSAGE_SIZE, "ns", "sa")))
    assert err.value.reason == "too_large"


# --- the agent's side -------------------------------------------------------------------------------------

def test_server_transcript_hello_snapshot_then_updates() -> None:
    conn = ServerConnection()
    assert conn.receive(HELLO) == Hello(1)
    assert conn.send(AddWorkload("u1", INFO)) == ADD_U1
    assert conn.receive(ACK) == Response(AddWorkload("u1", INFO), "")
    assert conn.send(KeepWorkload("u1")) == KEEP_U1
    assert conn.receive(NACK_BOOM) == Response(KeepWorkload("u1"), "boom")
    assert not conn.snapshot_done
    assert conn.send(SnapshotSent()) == SNAPSHOT_SENT
    assert conn.receive(ACK) == Response(SnapshotSent(), "")
    assert conn.snapshot_done and conn.state is ServerState.READY
    assert conn.send(AddWorkload("u1", INFO)) == ADD_U1
    assert conn.state is ServerState.READY_PENDING
    assert conn.receive(ACK) == Response(AddWorkload("u1", INFO), "")
    assert conn.send(DelWorkload("u1")) == DEL_U1
    response = conn.receive(NACK_BOOM)
    assert (response.request, response.ok, response.error) == (DelWorkload("u1"), False, "boom")
    assert conn.state is ServerState.READY and conn.pending is None


def _server_at(stage: str) -> ServerConnection:
    conn = ServerConnection()
    if stage == "start":
        return conn
    conn.receive(HELLO)
    if stage == "snapshot":
        return conn
    if stage == "pending":
        conn.send(KeepWorkload("u1"))
        return conn
    conn.send(SnapshotSent())
    conn.receive(ACK)
    return conn


@pytest.mark.parametrize(("stage", "data", "fds", "truncated", "reason"), [
    ("start", ACK, 0, False, "version"),  # a response where the hello belongs
    ("start", bytes.fromhex("0800"), 0, False, "version"),
    ("start", bytes.fromhex("0802"), 0, False, "version"),
    ("start", b"\xff\xff", 0, False, "malformed"),
    ("start", HELLO, 1, False, "fds"),
    ("start", HELLO, 0, True, "truncated"),
    ("snapshot", HELLO, 0, False, "unexpected_message"),  # hello twice
    ("pending", HELLO, 0, False, "malformed"),  # hello twice, while a request waits for its response
    ("pending", b"\x0a\x05\x0a", 0, False, "malformed"),
    ("ready", ACK, 0, False, "unexpected_message"),  # a response nobody asked for
])
def test_server_rejects_protocol_violations_and_closes(stage: str, data: bytes, fds: int, truncated: bool,
                                                        reason: str) -> None:
    conn = _server_at(stage)
    with pytest.raises(ZdsProtocolError) as err:
        conn.receive(data, fds=fds, truncated=truncated)
    assert err.value.reason == reason
    assert conn.closed
    with pytest.raises(ZdsError):
        conn.send(DelWorkload("u1"))


@pytest.mark.parametrize(("stage", "request_"), [
    ("start", AddWorkload("u1", INFO)),  # nothing before the hello
    ("snapshot", DelWorkload("u1")),  # deletes wait for the snapshot
    ("pending", AddWorkload("u2", INFO)),  # one request at a time
    ("ready", KeepWorkload("u1")),  # keep only in a snapshot
    ("ready", SnapshotSent()),  # one snapshot per connection
])
def test_server_refuses_to_send_out_of_order(stage: str, request_: Request) -> None:
    conn = _server_at(stage)
    state = conn.state
    assert not conn.can_send(request_.kind)
    with pytest.raises(ZdsError) as err:
        conn.send(request_)
    assert err.value.reason == "state"
    assert conn.state is state


# --- ztunnel's side ---------------------------------------------------------------------------------------

def test_client_transcript_snapshot_then_updates() -> None:
    conn = ClientConnection()
    assert conn.hello() == HELLO
    assert conn.receive(ADD_U1, fds=1) == AddWorkload("u1", INFO)
    assert conn.respond() == ACK
    assert conn.receive(KEEP_U1) == KeepWorkload("u1")
    assert conn.respond("boom") == NACK_BOOM
    assert conn.receive(DEL_U1) == DelWorkload("u1")
    conn.respond()
    assert conn.receive(SNAPSHOT_SENT) == SnapshotSent()
    assert not conn.snapshot_done
    conn.respond()
    assert conn.snapshot_done and conn.state is ClientState.READY
    assert conn.receive(ADD_U1, fds=1) == AddWorkload("u1", INFO)
    conn.respond()
    assert conn.receive(DEL_U1) == DelWorkload("u1")
    conn.respond()
    assert conn.state is ClientState.READY


def _client_at(stage: str) -> ClientConnection:
    conn = ClientConnection()
    if stage == "start":
        return conn
    conn.hello()
    if stage == "snapshot":
        return conn
    if stage == "reply_due":
        conn.receive(KEEP_U1)
        return conn
    conn.receive(SNAPSHOT_SENT)
    conn.respond()
    return conn


@pytest.mark.parametrize(("stage", "data", "fds", "truncated", "message"), [
    ("snapshot", ADD_U1, 0, False, "No control message"),
    ("snapshot", ADD_U1, 2, False, "Expected 1 FD, got 2"),
    ("ready", ADD_U1, 2, False, "Expected 1 FD, got 2"),
    ("ready", DEL_U1, 1, False, "Unexpected control message"),
    ("snapshot", SNAPSHOT_SENT, 1, False, "Unexpected control message"),
    ("snapshot", ADD_U1, 1, True, "truncated"),
    ("snapshot", b"\x12", 0, False, "not a ZDS WorkloadRequest"),
    ("snapshot", b"", 0, False, "no payload"),
    ("start", KEEP_U1, 0, False, "keep received in state connected"),  # before our hello
    ("ready", KEEP_U1, 0, False, "keep received in state ready"),
    ("ready", SNAPSHOT_SENT, 0, False, "snapshot_sent received in state ready"),
    ("reply_due", DEL_U1, 0, False, "del received in state snapshot_reply"),  # agent did not wait
])
def test_client_rejects_invalid_requests_with_ztunnels_error_text(stage: str, data: bytes, fds: int,
                                                                  truncated: bool, message: str) -> None:
    conn = _client_at(stage)
    with pytest.raises(ZdsProtocolError) as err:
        conn.receive(data, fds=fds, truncated=truncated)
    assert message in str(err.value)
    assert conn.state is ClientState.FAILED
    assert decode_response(conn.respond(str(err.value))) == str(err.value)
    assert conn.closed


def test_client_cannot_respond_without_a_request() -> None:
    conn = _client_at("snapshot")
    with pytest.raises(ZdsError) as err:
        conn.respond()
    assert err.value.reason == "state"


# --- untrusted input never raises anything but ZdsProtocolError -------------------------------------------

FRAGMENTS = [HELLO, ACK, NACK_BOOM, ADD_U1, KEEP_U1, DEL_U1, SNAPSHOT_SENT]
datagrams = st.one_of(
    st.binary(max_size=64),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=4)), max_size=4).map(b"".join),
    st.tuples(st.sampled_from(FRAGMENTS), st.integers(0, 40), st.integers(0, 255)).map(
        lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
)


@given(datagrams)
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (decode_hello, decode_request, decode_response):
        try:
            decode(data)
        except ZdsProtocolError:
            pass


@given(st.sampled_from(["start", "snapshot", "pending", "ready"]), datagrams, st.integers(0, 3), st.booleans())
def test_server_receive_raises_only_protocol_errors(stage: str, data: bytes, fds: int, truncated: bool) -> None:
    conn = _server_at(stage)
    try:
        conn.receive(data, fds=fds, truncated=truncated)
    except ZdsProtocolError:
        assert conn.closed


@given(st.sampled_from(["start", "snapshot", "reply_due", "ready"]), datagrams, st.integers(0, 3), st.booleans())
def test_client_receive_raises_only_protocol_errors(stage: str, data: bytes, fds: int, truncated: bool) -> None:
    conn = _client_at(stage)
    try:
        conn.receive(data, fds=fds, truncated=truncated)
    except ZdsProtocolError:
        assert conn.state is ClientState.FAILED


names = st.text(max_size=60)


@given(st.one_of(
    st.builds(AddWorkload, names, st.one_of(st.none(), st.builds(WorkloadInfo, names, names, names))),
    st.builds(KeepWorkload, names),
    st.builds(DelWorkload, names),
    st.just(SnapshotSent()),
))
def test_requests_round_trip(request_: Request) -> None:
    assert decode_request(encode_request(request_)) == request_
