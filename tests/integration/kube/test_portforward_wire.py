"""The local API server's `pods/{name}/portforward` on the wire, spoken to with raw aiohttp WebSockets (what a
kubelet-facing client sees, which `KubeClient` hides): the checks kube-apiserver and the kubelet make, in
their words, the subprotocols the kubelet accepts, the port preamble on both channels of every port, frames
the client must not send ignored, and forwards closed when the server shuts down."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from ambient.kube.client import KubeClient, KubeConfig
from ambient.local.apiserver import ApiServer
from tests.integration.kube.test_portforward import TcpPod, add_pod
from tests.integration.kube_fixtures import HOST, free_port

TOKEN = "portforward-wire-token"
WAIT = 10.0
PATH = "/api/v1/namespaces/web/pods/{pod}/portforward"


@dataclass
class Wire:
    server: ApiServer
    http: aiohttp.ClientSession  # base URL set, bearer token sent
    client: KubeClient
    tcp: TcpPod

    def path(self, pod: str = "app") -> str:
        return PATH.format(pod=pod)


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    tcp = TcpPod()
    await tcp.start()
    server, port = ApiServer(None, TOKEN), free_port()
    await server.start([HOST], port)
    url = f"http://{HOST}:{port}"
    try:
        async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"}) as http, \
                KubeClient(KubeConfig(url, token=TOKEN)) as client:
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
            await add_pod(client, "app")
            yield Wire(server, http, client, tcp)
    finally:
        await server.close()
        tcp.close()


async def frames(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[bytes | str]:
    got: list[bytes | str] = []
    async with asyncio.timeout(WAIT):
        while len(got) < count:
            msg = await ws.receive()
            assert msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), msg
            got.append(msg.data)
    return got


async def test_binary_protocol_sends_the_port_first_on_both_channels(wire: Wire) -> None:
    port = wire.tcp.echo
    async with wire.http.ws_connect(wire.path(), params={"ports": str(port)},
                                    protocols=("v5.channel.k8s.io", "v4.channel.k8s.io")) as ws:
        assert ws.protocol == "v4.channel.k8s.io"
        preamble = port.to_bytes(2, "little")
        assert sorted(await frames(ws, 2)) == sorted([b"\x00" + preamble, b"\x01" + preamble])
        await ws.send_bytes(b"\x00hello")
        assert await frames(ws, 1) == [b"\x00hello"]


async def test_base64_protocol_frames_are_text(wire: Wire) -> None:
    port = wire.tcp.echo
    async with wire.http.ws_connect(wire.path(), params={"ports": str(port)},
                                    protocols=("v4.base64.channel.k8s.io",)) as ws:
        assert ws.protocol == "v4.base64.channel.k8s.io"
        b64 = base64.b64encode(port.to_bytes(2, "little")).decode()
        assert sorted(await frames(ws, 2)) == sorted(["0" + b64, "1" + b64])
        await ws.send_str("0!not base64")  # ignored, as wsstream ignores a frame it cannot decode
        await ws.send_str("0" + base64.b64encode(b"hi").decode())
        assert await frames(ws, 1) == ["0" + base64.b64encode(b"hi").decode()]


async def test_no_subprotocol_is_binary_framing(wire: Wire) -> None:
    async with wire.http.ws_connect(wire.path(), params={"ports": str(wire.tcp.echo)}) as ws:
        assert ws.protocol is None
        await frames(ws, 2)
        await ws.send_bytes(b"\x00raw")
        assert await frames(ws, 1) == [b"\x00raw"]


async def test_two_ports_get_channels_0_1_and_2_3(wire: Wire) -> None:
    echo, talker = wire.tcp.echo, wire.tcp.talker
    async with wire.http.ws_connect(wire.path(), params={"ports": f"{echo},{talker}"},
                                    protocols=("v4.channel.k8s.io",)) as ws:
        first = await frames(ws, 5)  # four preambles and the talker's line, in some order
        assert b"\x02" + talker.to_bytes(2, "little") in first and b"\x03" + talker.to_bytes(2, "little") in first
        assert b"\x02bye from the pod\n" in first
        await ws.send_bytes(b"\x00still here")  # the echo port's forward outlives the talker's
        assert await frames(ws, 1) == [b"\x00still here"]


async def test_frames_a_client_must_not_send_are_ignored(wire: Wire) -> None:
    async with wire.http.ws_connect(wire.path(), params={"ports": str(wire.tcp.echo)},
                                    protocols=("v4.channel.k8s.io",)) as ws:
        await frames(ws, 2)
        for ignored in (b"", b"\x01to the error channel", b"\x07no such channel"):
            await ws.send_bytes(ignored)
        await ws.send_bytes(b"\x00after")
        assert await frames(ws, 1) == [b"\x00after"]


async def test_the_websocket_closes_when_the_pod_does(wire: Wire) -> None:
    async with wire.http.ws_connect(wire.path(), params={"ports": str(wire.tcp.talker)},
                                    protocols=("v4.channel.k8s.io",)) as ws:
        assert b"\x00bye from the pod\n" in await frames(ws, 3)
        async with asyncio.timeout(WAIT):
            msg = await ws.receive()
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.OK)


async def test_shutting_the_server_down_closes_open_forwards(wire: Wire) -> None:
    async with wire.http.ws_connect(wire.path(), params={"ports": str(wire.tcp.echo)},
                                    protocols=("v4.channel.k8s.io",)) as ws:
        await frames(ws, 2)
        async with asyncio.timeout(WAIT):
            await wire.server.close()
            msg = await ws.receive()
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)


@pytest.mark.parametrize(("query", "headers", "code", "message"), [
    ({"ports": "1"}, {}, 400, "Upgrade request required"),
    ({"ports": "1"}, {"Upgrade": "SPDY/3.1", "Connection": "Upgrade"}, 400, "Upgrade request required"),
    ({}, "ws", 400, 'query parameter "port" is required'),
    ({"ports": "http"}, "ws", 400, 'unable to parse "http" as a port'),
    ({"ports": "0"}, "ws", 400, 'port "0" must be > 0'),
])
async def test_requests_the_kubelet_refuses(wire: Wire, query: dict[str, str], headers: dict[str, str] | str,
                                            code: int, message: str) -> None:
    if headers == "ws":
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}
    assert isinstance(headers, dict)
    async with wire.http.get(wire.path(), params=query, headers=headers) as response:
        body = await response.json()
    assert (response.status, body["kind"], body["code"], body["message"]) == (code, "Status", code, message)


async def test_only_tunnelled_spdy_offered_is_forbidden(wire: Wire) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await wire.http.ws_connect(wire.path(), params={"ports": "1"}, protocols=("SPDY/3.1+portforward.k8s.io",))
    assert caught.value.status == 403


async def test_an_unknown_subresource_is_still_404(wire: Wire) -> None:
    async with wire.http.get(wire.path() + "/extra") as response:
        assert response.status == 404
