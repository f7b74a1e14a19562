"""Fixtures for HBONE over real sockets on loopback: a mesh CA, workload certificates, an HBONE server with
a scriptable handler, a client, and a raw HTTP/2-over-TLS peer for requests our client refuses to send.

Handler behaviour by target port (what a ztunnel inbound would decide):
  ECHO_PORT → 200 and echo until EOF, then half close;  DENY_PORT → 401;  any other port → connect to
  127.0.0.1:<port> and relay (503 when nothing listens there).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509

from ambient.hbone import ConnectRequest, HboneClient, HboneConfig, HboneServer, HboneStream
from ambient.hbone.tls import client_context
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.keys import build_csr, generate_key, private_key_pem
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId

TD = "cluster.local"
ECHO_PORT, DENY_PORT = 7, 9
SERVER_ID = SpiffeId(TD, "echo", "echo-server")
CLIENT_ID = SpiffeId(TD, "default", "sleep")
WAIT = 5.0  # bound on every wait


def issue(signer: CaSigner, identity: SpiffeId) -> WorkloadCertificate:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, identity).encode())
    return WorkloadCertificate.from_chain(identity, private_key_pem(key), signer.sign_workload(csr, identity, 0))


async def eventually(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def read_all(stream: HboneStream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


def listener(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(512)
    return sock


@dataclass
class Mesh:
    signer: CaSigner
    server_cert: WorkloadCertificate
    client_cert: WorkloadCertificate

    def cert(self, identity: SpiffeId) -> WorkloadCertificate:
        return issue(self.signer, identity)


@pytest.fixture(scope="session")
def mesh() -> Mesh:
    signer = CaSigner.generate(TD)
    return Mesh(signer, issue(signer, SERVER_ID), issue(signer, CLIENT_ID))


async def relay(a: HboneStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def up() -> None:
        while data := await a.read():
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    async def down() -> None:
        while data := await reader.read(65536):
            await a.write(data)
        a.write_eof()

    await asyncio.gather(up(), down())
    writer.close()


@dataclass
class Env:
    """A running server (`port`) and a client; `requests` records every request the handler saw."""

    mesh: Mesh
    server: HboneServer
    client: HboneClient
    port: int
    requests: list[ConnectRequest] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # the echo handler reads only once set

    async def connect(self, authority: str = f"127.0.0.1:{ECHO_PORT}", **kwargs: Any) -> HboneStream:
        kwargs.setdefault("expected_identities", [str(SERVER_ID)])
        return await self.client.connect(kwargs.pop("cert", self.mesh.client_cert), ("127.0.0.1", self.port),
                                         authority, **kwargs)


def make_handler(env_requests: list[ConnectRequest], gate: asyncio.Event
                 ) -> Callable[[ConnectRequest], Any]:
    async def handler(request: ConnectRequest) -> None:
        env_requests.append(request)
        ip, port = request.target
        if port == DENY_PORT:
            request.respond(401)
            return
        if port == ECHO_PORT:
            stream = request.respond(200, {"baggage": "k8s.namespace.name=echo"})
            await gate.wait()
            while data := await stream.read():
                await stream.write(data)
            stream.write_eof()
            return
        try:
            reader, writer = await asyncio.open_connection(ip, port)
        except OSError:
            request.respond(503)
            return
        await relay(request.respond(200), reader, writer)

    return handler


@contextlib.asynccontextmanager
async def running_env(mesh: Mesh, config: HboneConfig | None = None, host: str = "127.0.0.1"
                      ) -> AsyncIterator[Env]:
    requests: list[ConnectRequest] = []
    gate = asyncio.Event()
    gate.set()
    server = HboneServer(lambda ip: mesh.server_cert, make_handler(requests, gate), config)
    sock = listener(host)
    port = sock.getsockname()[1]
    serving = asyncio.create_task(server.serve(sock))
    client = HboneClient(config)
    try:
        yield Env(mesh, server, client, port, requests, gate)
    finally:
        await client.close()
        await server.close()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


@pytest.fixture
async def env(mesh: Mesh) -> AsyncIterator[Env]:
    async with running_env(mesh) as running:
        yield running


# -- a raw HTTP/2 client over TLS, for requests our client would never send ---------------------------
@dataclass
class RawResponse:
    status: int | None
    reset: int | None
    closed: bool


async def raw_request(port: int, cert: WorkloadCertificate | None, root_pem: str,
                      headers: list[tuple[str, str]]) -> RawResponse:
    """Send one request head with h2 over TLS (`cert=None`: no client certificate) and report what came back."""
    if cert is not None:
        ctx = client_context(cert)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=root_pem)
        ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, headers)
    writer.write(conn.data_to_send())
    status = reset = None
    closed = False
    try:
        async with asyncio.timeout(WAIT):
            while status is None and reset is None:
                data = await reader.read(65536)
                if not data:
                    closed = True
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers or [])[b":status"])
                    elif isinstance(event, h2.events.StreamReset):
                        reset = int(event.error_code or 0)
                writer.write(conn.data_to_send())
    except (ssl.SSLError, ConnectionError):
        closed = True
    writer.close()
    return RawResponse(status, reset, closed)
