"""ztunnel's relay on socket pairs (no network): `TcpStream` reads what arrived, reads EOF after a FIN or a
reset, half closes, grows its receive buffer only as far as its limit and stops reading there, and
`relay` copies both ways in order, counts bytes and propagates half closes, with a slow reader slowing
the sender. Every scenario runs on asyncio's loop and on uvloop (what ztunnel runs on)."""

from __future__ import annotations

import array
import asyncio
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from ambient.relay import CHUNK, INITIAL_BUFFER, TcpStream, relay

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
pytestmark = pytest.mark.timeout(30)

WAIT = 5.0
Scenario = Callable[[], Coroutine[Any, Any, None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    def runner(scenario: Scenario) -> None:
        if request.param == "uvloop":
            uvloop.run(scenario())
        else:
            asyncio.run(scenario())

    return runner


async def eventually(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if result := condition():
            return result
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out after {WAIT}s waiting for {what}")


async def tcp_pair() -> tuple[TcpStream, socket.socket]:
    """A TcpStream and the raw, non-blocking socket at the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    return await TcpStream.from_socket(ours), theirs


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def recv_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        data += chunk
    return bytes(data)


def unread_in_kernel(sock: Any) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


def pattern(size: int) -> bytes:
    """Bytes whose order is checkable: a running counter."""
    return array.array("I", range(size // 4)).tobytes()


def test_reads_what_arrived_at_most_max_bytes_then_eof_after_fin(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        stream, peer = await tcp_pair()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(peer, b"hello world")
        await eventually(lambda: stream.buffered == 11, "the bytes to arrive")
        assert await stream.read(5) == b"hello"
        assert await stream.read(100) == b" world"
        peer.shutdown(socket.SHUT_WR)
        assert await stream.read(100) == b""
        assert await stream.read(100) == b""
        stream.close()
        peer.close()

    run(scenario)


def test_write_eof_half_closes_and_the_other_direction_keeps_working(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        stream, peer = await tcp_pair()
        loop = asyncio.get_running_loop()
        await stream.write(b"request")
        stream.write_eof()
        assert await recv_to_eof(peer) == b"request"
        await loop.sock_sendall(peer, b"response after our FIN")
        peer.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := await stream.read(CHUNK):
            received += chunk
        assert received == b"response after our FIN"
        stream.close()
        stream.close()  # idempotent: ztunnel closes again after relay() did
        peer.close()

    run(scenario)


def test_a_reset_reads_as_eof_and_later_writes_fail(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        stream, peer = await tcp_pair()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.write(b"unread by the peer")  # makes its close a reset
        await eventually(lambda: peer.recv(1, socket.MSG_PEEK), "the peer to have unread data")
        peer.close()
        assert await stream.read(100) == b""
        with pytest.raises(ConnectionError):
            for _ in range(100):  # the first writes may still be accepted before the reset is noticed
                await stream.write(b"x" * 65536)
                await asyncio.sleep(0)
        stream.close()

    run(scenario)


def test_receive_buffer_grows_with_the_traffic_and_stops_reading_at_its_limit(
        run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        stream, peer = await tcp_pair()
        loop = asyncio.get_running_loop()
        assert len(stream._buffer) == INITIAL_BUFFER  # a new connection costs 1 KiB
        payload = pattern(4 * CHUNK + 4 * 1024)
        sender = asyncio.ensure_future(loop.sock_sendall(peer, payload))
        await eventually(lambda: stream.buffered == CHUNK, "the receive buffer to fill up to its limit")
        assert len(stream._buffer) == CHUNK
        ours = stream.transport.get_extra_info("socket")  # type: ignore[union-attr]
        # Nobody reads: we stop taking bytes from the kernel, which holds the rest, and the sender waits.
        await eventually(lambda: unread_in_kernel(ours) > 0, "bytes to queue in the kernel")
        assert stream.buffered == CHUNK
        assert not sender.done()
        received = bytearray()
        while len(received) < len(payload):
            received += await stream.read(100_000)  # partial reads of a full buffer resume reading
            assert stream.buffered <= CHUNK
        await sender
        assert received == payload
        stream.close()
        peer.close()

    run(scenario)


def test_a_writer_waits_while_the_peer_does_not_read(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        stream, peer = await tcp_pair()
        payload = pattern(4 << 20)

        async def write_all() -> None:
            for start in range(0, len(payload), CHUNK):
                await stream.write(payload[start:start + CHUNK])
            stream.write_eof()

        writer = asyncio.ensure_future(write_all())
        transport = stream.transport
        assert transport is not None
        high = transport.get_write_buffer_limits()[1]
        await eventually(lambda: transport.get_write_buffer_size() > high, "the send buffer to pass its high mark")
        assert not writer.done()
        assert transport.get_write_buffer_size() <= high + CHUNK  # at most one write beyond the mark
        assert await recv_to_eof(peer) == payload
        await writer
        stream.close()
        peer.close()

    run(scenario)


async def relay_pair(counts: dict[str, int]) -> tuple[socket.socket, socket.socket, asyncio.Future[None]]:
    """client socket ⇄ relay ⇄ server socket; → (client end, server end, the relay's future)."""
    a, client = await tcp_pair()
    b, server = await tcp_pair()

    def counter(key: str) -> Callable[[int], None]:
        def count(n: int) -> None:
            counts[key] += n
        return count

    return client, server, asyncio.ensure_future(relay(a, b, counter("a_to_b"), counter("b_to_a")))


def test_relay_copies_both_ways_counts_and_propagates_half_closes(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        counts = {"a_to_b": 0, "b_to_a": 0}
        client, server, relaying = await relay_pair(counts)
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\n\r\n")
        assert await recv_exactly(server, 18) == b"GET / HTTP/1.1\r\n\r\n"
        await loop.sock_sendall(server, b"HTTP/1.1 200 OK\r\n")
        assert await recv_exactly(client, 17) == b"HTTP/1.1 200 OK\r\n"
        client.shutdown(socket.SHUT_WR)  # the client is done sending; the server still answers
        assert await recv_exactly(server, 1) == b""
        await loop.sock_sendall(server, b"body after the client's FIN")
        server.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(client) == b"body after the client's FIN"
        await asyncio.wait_for(relaying, WAIT)  # both directions ended: the relay returns and closes both
        assert counts == {"a_to_b": 18, "b_to_a": 17 + 27}
        client.close()
        server.close()

    run(scenario)


def test_relay_keeps_order_under_backpressure(run: Callable[[Scenario], None]) -> None:
    """Small writes that go straight through, and a bulk upload that fills every buffer while the server
    reads slowly, must arrive complete and in order."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        counts = {"a_to_b": 0, "b_to_a": 0}
        client, server, relaying = await relay_pair(counts)
        small = [bytes([i]) * (i + 1) for i in range(64)]
        for piece in small:
            await loop.sock_sendall(client, piece)
        assert await recv_exactly(server, sum(map(len, small))) == b"".join(small)
        bulk = pattern(4 << 20)
        sender = asyncio.ensure_future(loop.sock_sendall(client, bulk))
        await eventually(lambda: counts["a_to_b"] > CHUNK, "the upload to start")
        received = bytearray()
        while len(received) < len(bulk):
            chunk = await loop.sock_recv(server, 4096)  # a slow reader: small reads
            assert chunk
            received += chunk
        await sender
        assert received == bulk
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(relaying, WAIT)
        assert counts["a_to_b"] == sum(map(len, small)) + len(bulk)
        client.close()
        server.close()

    run(scenario)


class FakeTransport:
    """Enough of a transport to drive TcpStream as a protocol by hand."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def feed(stream: TcpStream, data: bytes) -> None:
    """What a transport does when bytes arrive: fill the protocol's buffer, report how much."""
    buffer = stream.get_buffer(len(data))
    assert len(buffer) >= len(data)
    buffer[:len(data)] = data
    stream.buffer_updated(len(data))


async def test_data_is_offered_to_the_receiver_only_while_a_read_waits_on_an_empty_buffer() -> None:
    """The direct path must never overtake bytes already buffered for the pump, or a relay reorders."""
    stream = TcpStream()
    stream.connection_made(FakeTransport())  # type: ignore[arg-type]
    offered: list[bytes] = []
    accept = False

    def receiver(data: bytes) -> bool:
        offered.append(data)
        return accept

    stream.set_receiver(receiver)
    feed(stream, b"before any read ")  # nobody waits: buffered, not offered
    assert offered == []
    assert await stream.read(100) == b"before any read "

    reader = asyncio.ensure_future(stream.read(100))
    await asyncio.sleep(0)  # parked on an empty buffer
    feed(stream, b"A")  # offered, refused (say the other side is full): buffered, the reader is woken
    feed(stream, b"B")  # the reader has not run yet: B must queue behind A, not go around it
    assert offered == [b"A"]
    assert await reader == b"AB"

    accept = True
    reader = asyncio.ensure_future(stream.read(100))
    await asyncio.sleep(0)
    feed(stream, b"C")  # taken by the receiver: counts as read, the reader keeps waiting
    assert offered == [b"A", b"C"]
    assert not reader.done()
    assert stream.buffered == 0
    stream.eof_received()
    assert await reader == b""


async def test_a_connection_error_other_than_a_reset_is_raised_to_the_reader() -> None:
    stream = TcpStream()
    stream.connection_made(FakeTransport())  # type: ignore[arg-type]
    reader = asyncio.ensure_future(stream.read(100))
    await asyncio.sleep(0)
    stream.connection_lost(TimeoutError(110, "Connection timed out"))
    with pytest.raises(TimeoutError, match="timed out"):
        await reader
    with pytest.raises(TimeoutError):  # and again on the next read, like asyncio's StreamReader
        await stream.read(100)
    with pytest.raises(ConnectionResetError):
        await stream.write(b"x")
