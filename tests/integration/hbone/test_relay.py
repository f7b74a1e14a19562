"""ztunnel's relay on both ends of a real tunnel, as outbound and inbound use it: pod ⇄ TcpStream ⇄ relay ⇄
HboneStream ⇄ mTLS ⇄ HboneStream ⇄ relay ⇄ TcpStream ⇄ app. Small request/responses take the direct path
(handed over in the receive callback), a bulk upload to an app that reads slowly exhausts the HTTP/2
windows and the TCP buffers (the pumps take over), and half closes travel both ways; bytes arrive
complete and in order and are counted exactly. On asyncio's loop and on uvloop."""

from __future__ import annotations

import array
import asyncio
import socket
from collections import Counter
from collections.abc import Callable

import pytest

from ambient.hbone import ConnectRequest
from ambient.relay import TcpStream, relay
from tests.integration.hbone.conftest import WAIT, Env, Mesh, listener, running_env

pytestmark = pytest.mark.timeout(60)

ROUND_TRIPS = 200
MESSAGE = 1024
BULK = 24 << 20  # more than a stream window (4 MiB) plus every buffer on the way


def counter(counts: Counter[str], key: str) -> Callable[[int], None]:
    def count(n: int) -> None:
        counts[key] += n
    return count


async def recv_exactly(sock: socket.socket, size: int, chunk: int = 65536) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        part = await loop.sock_recv(sock, min(chunk, size - len(data)))
        if not part:
            break
        data += part
    return bytes(data)


async def scenario(env: Env) -> None:
    loop = asyncio.get_running_loop()
    counts: Counter[str] = Counter()
    app_listener = listener()
    app_listener.setblocking(False)
    relays: list[asyncio.Future[None]] = []

    async def inbound(request: ConnectRequest) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, request.target)
        app = await TcpStream.from_socket(sock)
        await relay(request.respond(200), app, counter(counts, "in_to_app"), counter(counts, "in_from_app"))

    env.server._handler = inbound
    pod, ours = socket.socketpair()
    pod.setblocking(False)
    ours.setblocking(False)
    tcp = await TcpStream.from_socket(ours)
    tunnel = await env.connect(f"127.0.0.1:{app_listener.getsockname()[1]}")
    relays.append(asyncio.ensure_future(relay(tcp, tunnel, counter(counts, "out_sent"),
                                              counter(counts, "out_received"))))
    app, _ = await asyncio.wait_for(loop.sock_accept(app_listener), WAIT)
    app.setblocking(False)
    try:
        for i in range(ROUND_TRIPS):
            request = bytes([i % 251]) * MESSAGE
            await loop.sock_sendall(pod, request)
            assert await recv_exactly(app, MESSAGE) == request
            await loop.sock_sendall(app, request[::-1])
            assert await recv_exactly(pod, MESSAGE) == request[::-1]

        bulk = array.array("I", range(BULK // 4)).tobytes()  # a counter: any loss or reordering shows
        upload = asyncio.ensure_future(loop.sock_sendall(pod, bulk))
        received = bytearray()
        while len(received) < len(bulk):
            part = await loop.sock_recv(app, 16384)  # a slow app: small reads
            assert part, f"EOF after {len(received)} bytes"
            received += part
        await upload
        assert received == bulk

        pod.shutdown(socket.SHUT_WR)  # the pod is done sending; the app still answers
        assert await asyncio.wait_for(loop.sock_recv(app, 1), WAIT) == b""
        await loop.sock_sendall(app, b"answer after the pod's FIN")
        app.shutdown(socket.SHUT_WR)
        assert await recv_exactly(pod, 100) == b"answer after the pod's FIN"
        await asyncio.wait_for(asyncio.gather(*relays), WAIT)  # both ends done: the outbound relay returns
        up = ROUND_TRIPS * MESSAGE + BULK
        down = ROUND_TRIPS * MESSAGE + len(b"answer after the pod's FIN")
        assert counts == {"out_sent": up, "in_to_app": up, "out_received": down, "in_from_app": down}
    finally:
        for sock in (pod, app, app_listener):
            sock.close()


async def test_relay_over_a_tunnel(env: Env) -> None:
    await scenario(env)


def test_relay_over_a_tunnel_on_uvloop(mesh: Mesh) -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")

    async def main() -> None:
        async with running_env(mesh) as env:
            await scenario(env)

    uvloop.run(main())
