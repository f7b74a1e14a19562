"""`KubeClient.port_forward` and `http_get_via_port_forward` against the local API server on loopback: a
Pod object whose IP is 127.0.0.1 stands in for a pod, with real TCP servers (echo, talker, silent) and an
HTTP server behind its ports. What a user of a port-forward relies on: bytes arrive intact both ways, the
pod closing is EOF, the client closing reaches the pod, and each failure is the error it should be (the API
server's Status, or the kubelet's words from the error channel)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ambient.kube.client import KubeClient, KubeConfig
from ambient.kube.errors import ApiError
from ambient.kube.portforward import ForwardingFailed, PortForwardError, http_get_via_port_forward
from ambient.kube.resources import ResourceTable
from ambient.local.apiserver import ApiServer
from tests.integration.kube_fixtures import HOST, free_port, local_apiserver
from tests.integration.local.test_apiserver import self_signed

Obj = dict[str, Any]
TOKEN = "portforward-token"
WAIT = 10.0  # bound on every exchange, so a hanging forward fails the test
POD = ResourceTable().require("pods")


@dataclass
class TcpPod:
    """TCP servers on the pod's address: `echo` sends back what it gets until EOF, `talker` says its line and
    closes, `silent` accepts and never answers, `lingerer` sends a whole HTTP answer and keeps the connection
    open until the client goes. `echo_eof` is set when an echo connection's client side ends."""

    echo: int = 0
    talker: int = 0
    silent: int = 0
    lingerer: int = 0
    echo_eof: asyncio.Event = field(default_factory=asyncio.Event)
    servers: list[asyncio.Server] = field(default_factory=list)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        self.echo_eof.set()
        writer.close()

    async def _talker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye from the pod\n")
        await writer.drain()
        writer.close()

    async def _silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def _lingerer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        await reader.read()
        writer.close()

    async def start(self) -> None:
        for name, handler in (("echo", self._echo), ("talker", self._talker), ("silent", self._silent),
                              ("lingerer", self._lingerer)):
            server = await asyncio.start_server(handler, HOST, 0)
            self.servers.append(server)
            setattr(self, name, server.sockets[0].getsockname()[1])

    def close(self) -> None:
        for server in self.servers:
            server.close()


async def dump(_: web.Request) -> web.Response:
    return web.json_response({"workloads": [{"name": "sleep"}]})


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=202)
    response.enable_chunked_encoding()
    await response.prepare(request)
    for part in (b"first ", b"second"):
        await response.write(part)
    await response.write_eof()
    return response


@contextlib.asynccontextmanager
async def http_pod() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/config_dump", dump)
    app.router.add_get("/chunked", chunked)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def add_pod(client: KubeClient, name: str, ip: str | None = HOST, node: str | None = "node-1") -> None:
    spec: Obj = {"containers": [{"name": "app", "image": "busybox"}], **({"nodeName": node} if node else {})}
    await client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "web"},
                         "spec": spec})
    if ip:
        await client.patch(POD, name, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}, "web",
                           status=True)


@dataclass
class Env:
    client: KubeClient
    url: str
    tcp: TcpPod
    http: int


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    tcp = TcpPod()
    await tcp.start()
    try:
        async with http_pod() as http, local_apiserver(TOKEN) as url, \
                KubeClient(KubeConfig(url, token=TOKEN)) as client:
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
            await add_pod(client, "app")
            yield Env(client, url, tcp, http)
    finally:
        tcp.close()


async def read_all(stream: Any) -> bytes:
    data = bytearray()
    while chunk := await stream.read():
        data += chunk
    return bytes(data)


# -- bytes both ways ---------------------------------------------------------------------------------------------
async def test_a_mebibyte_goes_to_the_pod_and_comes_back_intact(env: Env) -> None:
    payload = os.urandom(1024 * 1024)
    async with asyncio.timeout(WAIT), env.client.port_forward("web", "app", env.tcp.echo) as stream:
        assert stream.port == env.tcp.echo
        sending = asyncio.create_task(stream.write(payload))
        received = bytearray()
        while len(received) < len(payload):
            chunk = await stream.read()
            assert chunk, f"EOF after {len(received)} bytes"
            received += chunk
        await sending
    assert bytes(received) == payload


async def test_the_pod_closing_is_eof_after_its_data(env: Env) -> None:
    async with asyncio.timeout(WAIT), env.client.port_forward("web", "app", env.tcp.talker) as stream:
        assert await read_all(stream) == b"bye from the pod\n"
        assert stream.at_eof()
        assert await stream.read() == b""  # and stays at EOF
        with pytest.raises(PortForwardError) as caught:
            await stream.write(b"too late")
        assert caught.value.reason == "Closed"


async def test_the_client_closing_reaches_the_pod(env: Env) -> None:
    async with asyncio.timeout(WAIT):
        async with env.client.port_forward("web", "app", env.tcp.echo) as stream:
            await stream.write(b"ping")
            assert await stream.read() == b"ping"
        await env.tcp.echo_eof.wait()  # the pod's connection sees EOF once the forward is closed


async def test_forwards_to_the_same_pod_are_independent(env: Env) -> None:
    async with asyncio.timeout(WAIT), env.client.port_forward("web", "app", env.tcp.echo) as one, \
            env.client.port_forward("web", "app", env.tcp.echo) as two:
        await one.write(b"one")
        await two.write(b"two")
        assert (await one.read(), await two.read()) == (b"one", b"two")


# -- what goes wrong ---------------------------------------------------------------------------------------------
async def test_a_port_nobody_listens_on_is_the_kubelets_error(env: Env) -> None:
    closed = free_port()
    pod = await env.client.get(POD, "app", "web")
    async with asyncio.timeout(WAIT), env.client.port_forward("web", "app", closed) as stream:
        with pytest.raises(ForwardingFailed) as caught:
            await stream.read()
    assert caught.value.received == 0
    assert caught.value.message == (f"error forwarding port {closed} to pod app_web, uid {pod['metadata']['uid']}: "
                                    f"dial tcp {HOST}:{closed}: connect: connection refused")


async def test_a_missing_pod_is_a_404_status(env: Env) -> None:
    with pytest.raises(ApiError) as caught:
        async with env.client.port_forward("web", "ghost", env.tcp.echo):
            pass
    assert (caught.value.code, caught.value.reason, caught.value.message) == (404, "NotFound", 'pods "ghost" not found')


async def test_a_pod_without_ip_or_node_is_a_400_status(env: Env) -> None:
    await add_pod(env.client, "pending", ip=None)
    await add_pod(env.client, "unscheduled", node=None)
    for name, message in (("pending", "pod pending has no IP address"),
                          ("unscheduled", "pod unscheduled does not have a host assigned")):
        with pytest.raises(ApiError, match=message) as caught:
            async with env.client.port_forward("web", name, env.tcp.echo):
                pass
        assert caught.value.code == 400


async def test_a_wrong_token_is_unauthorized(env: Env) -> None:
    async with KubeClient(KubeConfig(env.url, token="wrong")) as intruder:
        with pytest.raises(ApiError) as caught:
            async with intruder.port_forward("web", "app", env.tcp.echo):
                pass
    assert (caught.value.code, caught.value.reason) == (401, "Unauthorized")


async def test_an_unreachable_api_server_is_a_503(env: Env) -> None:
    async with KubeClient(KubeConfig(f"http://{HOST}:{free_port()}", token=TOKEN)) as lost:
        with pytest.raises(ApiError, match="cannot reach the API server") as caught:
            async with lost.port_forward("web", "app", env.tcp.echo):
                pass
    assert caught.value.code == 503


# -- HTTP over a forward -----------------------------------------------------------------------------------------
async def test_http_get_reads_a_whole_answer(env: Env) -> None:
    status, body = await http_get_via_port_forward(env.client, "web", "app", env.http, "/config_dump", WAIT)
    assert (status, json.loads(body)) == (200, {"workloads": [{"name": "sleep"}]})
    assert await http_get_via_port_forward(env.client, "web", "app", env.http, "/chunked", WAIT) == \
        (202, b"first second")
    status, _ = await http_get_via_port_forward(env.client, "web", "app", env.http, "/nothing-here", WAIT)
    assert status == 404


async def test_http_get_returns_at_the_end_of_the_answer_not_at_eof(env: Env) -> None:
    """A runtime may keep the forward open a while after the pod is done (containerd: up to 1 s)."""
    assert await http_get_via_port_forward(env.client, "web", "app", env.tcp.lingerer, "/", WAIT) == (200, b"hello")


async def test_http_get_to_a_silent_port_times_out(env: Env) -> None:
    with pytest.raises(PortForwardError, match=r"did not answer GET /config_dump .* within 0.3s") as caught:
        await http_get_via_port_forward(env.client, "web", "app", env.tcp.silent, "/config_dump", 0.3)
    assert caught.value.reason == "Timeout"


async def test_port_forward_over_tls_with_the_kubeconfigs_ca(tmp_path: Path) -> None:
    cert_pem, key_pem = self_signed(HOST)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server, port = ApiServer(None, TOKEN), free_port()
    await server.start([HOST], port, server_tls)
    try:
        async with http_pod() as http, KubeClient(KubeConfig(f"https://{HOST}:{port}", token=TOKEN,
                                                             ca_file=str(tmp_path / "tls.crt"))) as client:
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
            await add_pod(client, "app")
            status, body = await http_get_via_port_forward(client, "web", "app", http, "/config_dump", WAIT)
            assert status == 200 and b"sleep" in body
    finally:
        await server.close()
