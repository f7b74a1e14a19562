"""Certificate rotation without dropping connections (issue 5, deliverable 6): a real CA over gRPC issues
5-second certificates to a `CertificateManager` (as ztunnel's, by node-proxy impersonation); an HBONE server
and client take their certificates from it, as ztunnel's inbound and outbound do. An open tunnel keeps
carrying bytes while both certificates rotate and after the ones it was opened with have expired; a new
connection after the rotation presents (and is served) the new certificates.

Which certificate a peer presented is read from the TLS transport under the stream (`HboneStream` exposes
the peer's identity, not its serial). Every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from ambient.hbone import ConnectRequest, HboneClient, HboneServer, HboneStream
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.manager import CertificateManager
from tests.integration.identity.test_ca import REVIEWS, SLEEP, Ca, start_ca

pytestmark = pytest.mark.timeout(60)

TTL = 5  # seconds each certificate lives: the manager rotates at half of it, ~2.5 s
HOST = "127.0.0.1"
AUTHORITY = f"{HOST}:9080"  # the server's handler echoes whatever the authority
WAIT = 5.0  # bound on one round trip or one connect
PACE = 0.05  # seconds between two messages on the open tunnel (pacing, not synchronisation)
SETTLE = TTL + 10.0  # deadline for rotation and expiry of the first certificates
SERVER_ID, CLIENT_ID = REVIEWS, SLEEP  # both on node-1, so node-1's ztunnel token may ask for either


def serial(cert: WorkloadCertificate) -> int:
    return x509.load_pem_x509_certificate(cert.leaf_pem.encode()).serial_number


def peer_serial(stream: HboneStream) -> int:
    """The serial of the certificate the other end presented on this stream's connection."""
    transport = stream._conn.transport
    assert transport is not None, "the connection under the stream is closed"
    return int(transport.get_extra_info("peercert")["serialNumber"], 16)


@dataclass
class Mesh:
    ca: Ca
    manager: CertificateManager
    port: int
    client_serials_seen: list[int] = field(default_factory=list)  # by the server, one per CONNECT

    async def connect(self, client: HboneClient) -> HboneStream:
        """A tunnel from CLIENT_ID with its current certificate, as ztunnel's outbound asks for one."""
        cert = await self.manager.fetch(CLIENT_ID)
        return await asyncio.wait_for(
            client.connect(cert, (HOST, self.port), AUTHORITY, expected_identities=[str(SERVER_ID)]), WAIT)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    ca = await start_ca(tmp_path, tls=True)
    manager = CertificateManager(ca.client("zt-node-1", impersonate=True, ttl=TTL))
    env = Mesh(ca, manager, 0)

    async def echo(request: ConnectRequest) -> None:
        stream = request.respond(200)
        env.client_serials_seen.append(peer_serial(stream))
        while data := await stream.read():
            await stream.write(data)
        stream.write_eof()

    # As ztunnel's inbound: the certificate of the pod being connected to, fetched per handshake.
    server = HboneServer(lambda _ip: manager.fetch(SERVER_ID), echo)
    sock = socket.create_server((HOST, 0))
    env.port = sock.getsockname()[1]
    serving = asyncio.create_task(server.serve(sock))
    try:
        yield env
    finally:
        await server.close()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await manager.close()
        await ca.server.stop()


async def round_trip(stream: HboneStream, n: int) -> None:
    message = b"message %d\n" % n
    async with asyncio.timeout(WAIT):
        await stream.write(message)
        received = b""
        while len(received) < len(message):
            chunk = await stream.read()
            assert chunk, f"the tunnel ended after {n} messages"
            received += chunk
    assert received == message


async def test_open_tunnel_survives_rotation_and_new_connections_use_the_new_certificates(mesh: Mesh) -> None:
    first_client = await mesh.manager.fetch(CLIENT_ID)
    first_server = await mesh.manager.fetch(SERVER_ID)
    assert TTL - 1 <= first_client.lifetime <= TTL  # the CA honoured the short TTL the client asked for
    old_client = HboneClient()
    tunnel = await mesh.connect(old_client)
    assert mesh.client_serials_seen == [serial(first_client)]
    assert peer_serial(tunnel) == serial(first_server)

    # Keep the tunnel busy until both certificates have rotated and the first ones have expired.
    phases = {"before rotation": 0, "after rotation": 0, "after the first certificates expired": 0}
    deadline = time.monotonic() + SETTLE
    n = 0
    while True:
        n += 1
        await round_trip(tunnel, n)
        client_now, server_now = await mesh.manager.fetch(CLIENT_ID), await mesh.manager.fetch(SERVER_ID)
        rotated = serial(client_now) != serial(first_client) and serial(server_now) != serial(first_server)
        expired = time.time() >= max(first_client.not_after, first_server.not_after)
        phase = ("after the first certificates expired" if rotated and expired else
                 "after rotation" if rotated else "before rotation")
        phases[phase] += 1
        if rotated and expired and phases[phase] >= 3:
            break
        assert time.monotonic() < deadline, f"no rotation and expiry within {SETTLE}s: {phases}"
        await asyncio.sleep(PACE)
    assert all(phases.values()), phases  # the same tunnel carried bytes in every phase

    # A new tunnel from the same client (its pool keyed by certificate) opens a new connection presenting the
    # client's new certificate and is served the server's new one.
    fresh = await mesh.connect(old_client)
    await round_trip(fresh, 1)
    assert mesh.client_serials_seen == [serial(first_client), serial(client_now)]
    assert peer_serial(fresh) == serial(server_now)
    assert client_now.not_before >= first_client.not_before and client_now.not_after > first_client.not_after
    fresh.write_eof()
    async with asyncio.timeout(WAIT):
        assert await fresh.read() == b""

    # The old tunnel is still open and still echoes, then ends cleanly.
    await round_trip(tunnel, n + 1)
    tunnel.write_eof()
    async with asyncio.timeout(WAIT):
        assert await tunnel.read() == b""
    await old_client.close()
