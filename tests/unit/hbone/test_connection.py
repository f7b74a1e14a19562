"""The HTTP/2 connection core without sockets: a `ServerConnection` on an in-memory transport talking to a
scripted h2 client. Checks the frames that matter for HBONE: flow-control credit only as the reader
consumes, GOAWAY in both directions without cutting streams, refusal of streams after our GOAWAY."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.events as ev
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

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

    def __init__(self) -> None:
        self.requests: list[ConnectRequest] = []
        self.streams: list[HboneStream] = []

        async def handler(request: ConnectRequest) -> None:
            self.requests.append(request)
            self.streams.append(request.respond(200))
            await asyncio.Event().wait()  # keep the stream open; the test drives it

        self.server = HboneServer(lambda ip: None, handler, HboneConfig())  # type: ignore[arg-type,return-value]
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
