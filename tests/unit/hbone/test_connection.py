"""The HTTP/2 connection core without sockets: a `ServerConnection` on an in-memory transport talking to a
scripted h2 client. Checks the frames that matter for HBONE: flow-control credit only as the reader
consumes (and for the connection as a whole even when no single stream has read much), GOAWAY in both
directions without cutting streams, refusal of streams after our GOAWAY, and that the DATA short path
(our own frame splitting, DATA without h2's per-frame machinery) behaves exactly like h2 alone on any
frame sequence, split anywhere."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import h2.config
import h2.connection
import h2.events as ev
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient.hbone.connection import HboneConfig, MiB
from ambient.hbone.server import ConnectRequest, HboneServer, ServerConnection
from ambient.hbone.stream import HboneStream

CLIENT_SAN = "spiffe://cluster.local/ns/default/sa/sleep"
CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.2:9080")]


class MemoryTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.extra: dict[str, Any] = {"peername": ("10.0.0.1", 40000), "sockname": ("10.0.0.2", 15008),
                                      "peercert": {"subjectAltName": (("URI", CLIENT_SAN),)}}

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close


class Harness:
    """Our server connection and a scripted h2 client, wired through memory."""

    def __init__(self, config: HboneConfig | None = None) -> None:
        self.requests: list[ConnectRequest] = []
        self.streams: list[HboneStream] = []

        async def handler(request: ConnectRequest) -> None:
            self.requests.append(request)
            self.streams.append(request.respond(200))
            await asyncio.Event().wait()  # keep the stream open; the test drives it

        self.server = HboneServer(lambda ip: None, handler,  # type: ignore[arg-type,return-value]
                                  config or HboneConfig())
        self.transport = MemoryTransport()
        self.conn = ServerConnection(self.server, "cluster.local")
        self.peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.peer.initiate_connection()
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    async def exchange(self) -> list[ev.Event]:
        """Let our side run, then deliver bytes both ways until quiet; → the client's events."""
        events: list[ev.Event] = []
        quiet = 0
        while quiet < 3:  # handler tasks and scheduled flushes need a few loop turns
            await asyncio.sleep(0)
            out, self.transport.out = bytes(self.transport.out), bytearray()
            if out:
                events += self.peer.receive_data(out)
            data = self.peer.data_to_send()
            if data:
                self.conn.data_received(data)
            quiet = 0 if out or data else quiet + 1
        return events

    async def open(self, stream_id: int = 1) -> HboneStream:
        self.peer.send_headers(stream_id, CONNECT)
        events = await self.exchange()
        assert any(isinstance(e, ev.ResponseReceived) and e.stream_id == stream_id for e in events)
        return self.streams[-1]

    async def close(self) -> None:
        await self.server.close()


def window_updates(events: list[ev.Event], stream_id: int) -> int:
    return sum(e.delta or 0 for e in events if isinstance(e, ev.WindowUpdated) and e.stream_id == stream_id)


async def test_settings_advertise_the_hbone_windows_and_stream_limit() -> None:
    h = Harness()
    events = await h.exchange()
    settings = h.peer.remote_settings
    assert settings.initial_window_size == 4 * MiB
    assert settings.max_frame_size == MiB
    assert settings.max_concurrent_streams == 200
    assert window_updates(events, 0) == 16 * MiB - 65_535  # connection window 16 MiB
    await h.close()


async def test_credit_is_returned_only_as_the_reader_consumes() -> None:
    h = Harness()
    stream = await h.open()
    for _ in range(3):
        h.peer.send_data(1, b"x" * MiB)
    events = await h.exchange()
    assert window_updates(events, 1) == 0  # nobody read: the peer's window shrinks, nothing is granted
    assert stream.buffered == 3 * MiB
    assert h.peer.local_flow_control_window(1) == MiB

    got = 0
    while got < 3 * MiB:
        got += len(await stream.read())
    events = await h.exchange()
    assert window_updates(events, 1) == 2 * MiB  # consumed → granted back, in half-window steps
    assert h.peer.local_flow_control_window(1) == 3 * MiB
    await h.close()


async def test_a_received_goaway_does_not_cut_open_streams() -> None:
    h = Harness()
    stream = await h.open()
    h.peer.close_connection()  # the client sends GOAWAY (h2 itself would now refuse every frame)
    h.peer.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN  # the scripted peer keeps going
    h.peer.send_data(1, b"after goaway")
    await h.exchange()
    assert await stream.read() == b"after goaway"
    await stream.write(b"reply")
    events = await h.exchange()
    assert [e.data for e in events if isinstance(e, ev.DataReceived)] == [b"reply"]
    assert not h.transport.closed
    await h.close()


async def test_our_goaway_refuses_new_streams_and_closes_after_the_last_one() -> None:
    h = Harness()
    stream = await h.open()
    h.conn.goaway()
    raw = bytes(h.transport.out)
    goaway = GoAwayFrame(0)
    goaway.parse_body(memoryview(raw[-8:]))
    assert (goaway.last_stream_id, goaway.error_code) == (1, 0)
    h.transport.out.clear()

    h.peer.send_headers(3, CONNECT)  # too late: above the GOAWAY's last stream id
    events = await h.exchange()
    assert [(e.stream_id, e.error_code) for e in events if isinstance(e, ev.StreamReset)] == \
        [(3, ErrorCodes.REFUSED_STREAM)]
    assert len(h.requests) == 1

    h.peer.send_data(1, b"in flight", end_stream=True)
    await h.exchange()
    assert await stream.read() == b"in flight"
    assert not h.transport.closed
    stream.write_eof()
    events = await h.exchange()
    assert any(isinstance(e, ev.StreamEnded) and e.stream_id == 1 for e in events)  # flushed before closing
    assert h.transport.closed
    await h.close()


async def test_a_closed_stream_with_unread_data_returns_its_credit() -> None:
    h = Harness()
    stream = await h.open()
    for _ in range(3):
        h.peer.send_data(1, b"y" * MiB)  # unread
    h.conn.data_received(h.peer.data_to_send())
    connection_window = h.peer.outbound_flow_control_window
    stream.close()
    await h.exchange()
    assert h.peer.outbound_flow_control_window == connection_window  # not granted yet: 3 MiB < half window
    # Read 5 MiB more on new streams: connection credit is granted at half of 16 MiB, so it comes only if
    # the 3 MiB dropped on close were counted (otherwise the connection would slowly starve).
    for stream_id, mib in ((3, 4), (5, 1)):
        more = await h.open(stream_id)
        for _ in range(mib):
            h.peer.send_data(stream_id, b"z" * MiB)
        await h.exchange()
        while more.buffered:
            await more.read()
    events = await h.exchange()
    assert window_updates(events, 0) == 8 * MiB
    await h.close()


async def test_connection_credit_is_returned_even_when_no_stream_read_much() -> None:
    """Credit is handed to h2 in quarter-window steps per stream; 20 streams reading 900 KiB each (below a
    stream's step) still consume more than the 16 MiB connection window, so the connection's share must be
    returned on its own or the peer stalls."""
    h = Harness()
    streams = [await h.open(stream_id) for stream_id in range(1, 41, 2)]
    sent = 0
    for stream_id, stream in zip(range(1, 41, 2), streams, strict=True):
        assert h.peer.local_flow_control_window(stream_id) >= 900 * 1024, f"the peer is stalled after {sent} bytes"
        h.peer.send_data(stream_id, b"q" * (900 * 1024))
        sent += 900 * 1024
        await h.exchange()
        got = 0
        while got < 900 * 1024:
            got += len(await stream.read())
    assert sent > 16 * MiB
    await h.close()


async def test_writes_become_data_frames_within_the_peer_limits_and_window() -> None:
    h = Harness()
    stream = await h.open()
    payload = bytes(range(256)) * 1024  # 256 KiB: the peer allows 16 KiB frames and a 64 KiB window
    writer = asyncio.ensure_future(stream.write(payload))
    received = bytearray()
    while len(received) < len(payload):
        events = await h.exchange()
        for event in events:
            if isinstance(event, ev.DataReceived):
                assert len(event.data) <= h.peer.max_inbound_frame_size
                received += event.data
                h.peer.acknowledge_received_data(event.flow_controlled_length, 1)
        assert not events or received, "nothing arrived"
    await writer
    assert received == payload
    await h.close()


async def test_try_write_sends_all_or_nothing() -> None:
    h = Harness()
    stream = await h.open()
    window = h.peer.local_settings.initial_window_size  # what the peer lets us send on a stream: 64 KiB
    assert not stream.try_write(b"x" * (window + 1))  # does not fit: nothing is sent
    assert not [e for e in await h.exchange() if isinstance(e, ev.DataReceived)]
    assert stream.try_write(b"y" * window)
    events = await h.exchange()
    assert sum(len(e.data) for e in events if isinstance(e, ev.DataReceived)) == window
    assert not stream.try_write(b"z")  # the window is used up
    stream.write_eof()
    assert not stream.try_write(b"z")  # and after END_STREAM nothing goes
    await h.close()


# -- the DATA short path against h2 alone ----------------------------------------------------------------
SMALL = HboneConfig(stream_window=40_000, connection_window=70_000, max_frame_size=16_384)


def h2_only(conn: ServerConnection) -> None:
    """Make `conn` take every byte through h2, as before the short path existed."""

    def data_received(data: bytes | memoryview) -> None:
        conn._receive_h2(data)
        conn._flush()

    conn.data_received = data_received  # type: ignore[method-assign]


def raw_frame(frame_type: int, flags: int, stream_id: int, body: bytes) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([frame_type, flags]) + stream_id.to_bytes(4, "big") + body


frame_strategy = st.one_of(
    st.builds(lambda n, sid, end: raw_frame(0, 1 if end else 0, sid, b"d" * n),  # DATA, maybe END_STREAM
              st.integers(0, 20_000), st.sampled_from([1, 1, 1, 1, 2, 3]), st.booleans()),
    st.builds(lambda n, pad: raw_frame(0, 0x8, 1, bytes([pad]) + b"p" * n + b"\0" * pad),  # padded DATA
              st.integers(0, 3_000), st.integers(0, 20)),
    st.builds(lambda sid, inc: raw_frame(8, 0, sid, inc.to_bytes(4, "big")),  # WINDOW_UPDATE
              st.sampled_from([0, 1]), st.integers(0, 1 << 16)),
    st.just(raw_frame(6, 0, 0, b"pingpong")),  # PING
    st.just(raw_frame(3, 0, 1, (8).to_bytes(4, "big"))),  # RST_STREAM CANCEL
    st.just(raw_frame(0xFA, 0, 1, b"unknown")),  # extension frame: ignored
    st.just(raw_frame(9, 0x4, 1, b"")),  # CONTINUATION without HEADERS
    st.just(raw_frame(1, 0, 5, b"\x82")),  # HEADERS without END_HEADERS: a header block starts
    st.just(raw_frame(0, 0, 1, b"d" * 17_000)),  # longer than the 16 KiB we allow
    st.builds(lambda last, code: raw_frame(7, 0, 0, last.to_bytes(4, "big") + code.to_bytes(4, "big")),  # GOAWAY
              st.sampled_from([0, 1]), st.sampled_from([0, 2])),
    st.builds(lambda window: raw_frame(4, 0, 0, (4).to_bytes(2, "big") + window.to_bytes(4, "big")),  # SETTINGS
              st.integers(0, 1 << 17)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(frame_strategy, max_size=12), cuts=st.lists(st.integers(0, 1 << 20), max_size=8))
def test_the_data_short_path_behaves_like_h2_alone(frames: list[bytes], cuts: list[int]) -> None:
    async def run() -> None:
        short, plain = Harness(SMALL), Harness(SMALL)
        h2_only(plain.conn)
        for h in (short, plain):
            await h.open()
        assert short.conn._framing  # the short path is on once the preamble and SETTINGS went through h2
        wire = b"".join(frames)
        points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
        for h in (short, plain):
            h.transport.out.clear()
            for start, end in itertools.pairwise(points):
                h.conn.data_received(memoryview(wire)[start:end])
            for _ in range(3):
                await asyncio.sleep(0)  # scheduled flushes
        assert short.transport.closed == plain.transport.closed
        if plain.transport.closed:
            # A GOAWAY with no stream left closes the connection at once. h2 alone reads the rest of the same
            # read before we close and may still answer a frame after the GOAWAY (a RST_STREAM for DATA on a
            # reset stream); the short path closes first. Everything the short path wrote, h2 wrote too.
            assert bytes(plain.transport.out).startswith(bytes(short.transport.out))
        else:
            assert bytes(short.transport.out) == bytes(plain.transport.out)  # same answers: RST, GOAWAY, PING ACK
        assert (short.conn.error and short.conn.error.reason) == (plain.conn.error and plain.conn.error.reason)
        for side in ("_inbound_flow_control_window_manager",):
            assert getattr(short.conn._h2, side).current_window_size == \
                getattr(plain.conn._h2, side).current_window_size
        a, b = short.streams[0], plain.streams[0]
        if plain.conn.error is None:
            assert list(a._chunks) == list(b._chunks)
            assert (a._remote_ended, a._finished) == (b._remote_ended, b._finished)
            assert (a._error and a._error.reason) == (b._error and b._error.reason)
        else:
            # A frame that breaks the protocol ends the connection (same GOAWAY, checked above). h2 alone
            # also drops the events of the frames before it in the same read (DATA, END_STREAM, resets);
            # the short path has already handed those on, which is all that may differ.
            assert b"".join(a._chunks).startswith(b"".join(b._chunks))
        await short.close()
        await plain.close()

    asyncio.run(run())


async def test_data_is_offered_to_the_receiver_only_while_a_read_waits_on_an_empty_buffer() -> None:
    """HboneStream.set_receiver: the direct path must never overtake DATA already queued for a reader."""
    h = Harness()
    stream = await h.open()
    offered: list[bytes] = []
    accept = False

    def receiver(data: bytes) -> bool:
        offered.append(data)
        return accept

    stream.set_receiver(receiver)
    reader = asyncio.ensure_future(stream.read())
    await asyncio.sleep(0)  # parked on an empty buffer
    h.peer.send_data(1, b"A")
    h.conn.data_received(h.peer.data_to_send())  # offered, refused: queued, the reader is woken
    h.peer.send_data(1, b"B")
    h.conn.data_received(h.peer.data_to_send())  # the reader has not run yet: B queues behind A
    assert offered == [b"A"]
    assert await reader == b"A"
    assert await stream.read() == b"B"

    accept = True
    reader = asyncio.ensure_future(stream.read())
    await asyncio.sleep(0)
    h.peer.send_data(1, b"C")
    h.conn.data_received(h.peer.data_to_send())  # taken: counts as read, the reader keeps waiting
    assert offered == [b"A", b"C"]
    assert not reader.done()
    assert stream.buffered == 0
    reader.cancel()
    await h.close()
