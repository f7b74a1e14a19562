"""The server's bound on what a client can make it buffer before a request exists: frame lengths are
checked from the frame header, header blocks (HEADERS + CONTINUATIONs) are capped at the advertised
header list size. Without sockets: h2 frames in memory."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import pytest
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError, FrameTooLargeError
from hpack.hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from ambient.hbone.connection import HboneConfig, MiB
from ambient.hbone.server import BoundedFrameBuffer, ConnectRequest, HboneServer, ServerConnection

LIMIT = 64 * 1024
CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:9080")]


def block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return bytes(Encoder().encode(headers))


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def server_buffer() -> BoundedFrameBuffer:
    buffer = BoundedFrameBuffer(LIMIT, MiB)
    buffer.add_data(PREFACE)
    return buffer


def frames_of(buffer: BoundedFrameBuffer, *frames: Frame) -> list[Frame]:
    for frame in frames:
        buffer.add_data(frame.serialize())
    return list(buffer)


def test_an_ordinary_connect_passes() -> None:
    [frame] = frames_of(server_buffer(), HeadersFrame(1, data=block(CONNECT), flags=["END_HEADERS"]))
    assert isinstance(frame, HeadersFrame) and frame.data == block(CONNECT)


def test_a_block_split_over_continuations_under_the_limit_passes() -> None:
    filler = block([(b"x-filler", b"a" * 20_000)])
    frames = frames_of(server_buffer(), HeadersFrame(1, data=block(CONNECT)),
                       ContinuationFrame(1, data=filler), ContinuationFrame(1, data=filler, flags=["END_HEADERS"]))
    assert [type(f) for f in frames] == [HeadersFrame]


def test_an_unfinished_header_block_is_refused_as_soon_as_it_passes_the_limit() -> None:
    buffer = server_buffer()
    part = b"\x00" * (LIMIT // 2 + 1)
    assert frames_of(buffer, HeadersFrame(1, data=part)) == []  # waiting for CONTINUATION
    with pytest.raises(DenialOfServiceError, match="header block over 65536 bytes"):
        frames_of(buffer, ContinuationFrame(1, data=part))


def test_one_oversized_headers_frame_is_refused_even_with_end_headers() -> None:
    with pytest.raises(DenialOfServiceError):
        frames_of(server_buffer(), HeadersFrame(1, data=b"\x00" * (LIMIT + 1), flags=["END_HEADERS"]))


def test_an_overlong_frame_is_refused_from_its_header_before_its_body_arrives() -> None:
    buffer = server_buffer()
    header = DataFrame(1, data=b"x" * (MiB + 1)).serialize()[:9]  # only the 9 bytes announcing the length
    buffer.add_data(header)
    with pytest.raises(FrameTooLargeError):
        list(buffer)


class MemoryTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.extra: dict[str, Any] = {"peername": ("10.0.0.1", 40000), "sockname": ("10.0.0.2", 15008),
                                      "peercert": {"subjectAltName": (("URI", "spiffe://cluster.local/ns/a/sa/b"),)}}

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


async def test_a_server_connection_ends_a_client_sending_an_endless_header_block() -> None:
    requests: list[ConnectRequest] = []

    async def handler(request: ConnectRequest) -> None:
        requests.append(request)

    server = HboneServer(lambda ip: None, handler, HboneConfig())  # type: ignore[arg-type,return-value]
    transport = MemoryTransport()
    conn = ServerConnection(server, "cluster.local")
    conn.connection_made(transport)  # type: ignore[arg-type]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    conn.data_received(client.data_to_send())
    conn.data_received(SettingsFrame(0, flags=["ACK"]).serialize())  # our 1 MiB max frame size now applies
    filler = b"\x00" * (40 * 1024)
    conn.data_received(HeadersFrame(1, data=block(CONNECT) + filler).serialize())
    assert not transport.closed
    conn.data_received(ContinuationFrame(1, data=filler).serialize())  # 80 KiB: over 64 KiB, refused
    assert transport.closed and not requests
    goaway = bytes(transport.out)[bytes(transport.out).rindex(b"\x07\x00\x00\x00\x00\x00") - 3:]
    frame, length = Frame.parse_frame_header(memoryview(goaway[:9]))
    frame.parse_body(memoryview(goaway[9:9 + length]))
    assert isinstance(frame, GoAwayFrame) and frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await server.close()
