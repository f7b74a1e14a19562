"""The HBONE server on loopback: its answers (200/400/401/503), who it lets in (trust domain, client
certificate), the certificate it picks by local IP, GOAWAY drain, and bad input on the port that must not
disturb an established tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import pytest

from ambient.hbone import ConnectError, ConnectRejected, HboneClient, HboneConfig, HboneServer, StreamError
from ambient.hbone.tls import client_context
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId
from tests.integration.hbone.conftest import (
    DENY_PORT,
    ECHO_PORT,
    SERVER_ID,
    TD,
    Env,
    Mesh,
    eventually,
    issue,
    listener,
    raw_request,
    running_env,
)

pytestmark = pytest.mark.timeout(30)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def echo_once(env: Env, data: bytes = b"ping") -> bytes:
    stream = await env.connect()
    await stream.write(data)
    got = await stream.read()
    stream.close()
    return got


async def test_200_relays_to_the_target_port(env: Env) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello " + await reader.readline())
        writer.close()

    target = await asyncio.start_server(app, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    stream = await env.connect(f"127.0.0.1:{port}")
    await stream.write(b"mesh\n")
    stream.write_eof()
    assert await stream.read() == b"hello mesh\n"
    assert await stream.read() == b""
    stream.close()
    target.close()


async def test_401_when_the_handler_denies(env: Env) -> None:
    with pytest.raises(ConnectRejected) as err:
        await env.connect(f"127.0.0.1:{DENY_PORT}")
    assert (err.value.status, err.value.reason) == (401, "unauthorized")
    assert "authorization policy" in str(err.value)


async def test_503_when_the_target_cannot_be_reached(env: Env) -> None:
    with pytest.raises(ConnectRejected) as err:
        await env.connect(f"127.0.0.1:{closed_port()}")
    assert (err.value.status, err.value.reason) == (503, "unreachable")
    # The refused stream did not poison the pooled connection.
    assert await echo_once(env) == b"ping"
    assert env.server.connections == 1


async def test_handler_that_raises_or_forgets_to_answer_gives_503(env: Env) -> None:
    async def broken(request):  # type: ignore[no-untyped-def]
        if request.target[1] == 1:
            raise RuntimeError("bug")

    env.server._handler = broken
    for port in (1, 2):
        with pytest.raises(ConnectRejected) as err:
            await env.connect(f"127.0.0.1:{port}")
        assert err.value.status == 503


@pytest.mark.parametrize("headers", [
    [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "127.0.0.1:7")],
    [(":method", "CONNECT"), (":authority", "echo.default.svc:7")],
    [(":method", "CONNECT"), (":authority", "127.0.0.1")],
    [(":method", "CONNECT"), (":authority", "::1:7")],
], ids=["GET", "hostname", "no-port", "unbracketed-ipv6"])
async def test_400_without_calling_the_handler(env: Env, mesh: Mesh, headers: list[tuple[str, str]]) -> None:
    response = await raw_request(env.port, mesh.client_cert, mesh.signer.root_pem, headers)
    assert response.status == 400
    assert env.requests == []


async def test_ipv6_authority_reaches_the_handler_parsed(env: Env) -> None:
    stream = await env.connect(f"[::1]:{ECHO_PORT}")
    stream.close()
    assert env.requests[0].target == ("::1", ECHO_PORT)
    assert env.requests[0].authority == f"[::1]:{ECHO_PORT}"


async def test_client_from_another_trust_domain_is_dropped_after_the_handshake(env: Env, mesh: Mesh) -> None:
    stranger = mesh.cert(SpiffeId("other.domain", "default", "sleep"))  # same root, other trust domain
    with pytest.raises(StreamError) as err:
        await env.connect(cert=stranger)
    assert err.value.reason == "connection_closed"
    assert "trust domain" in str(err.value)
    assert env.requests == []


async def test_client_with_a_certificate_from_another_root_fails_tls(env: Env) -> None:
    foreign = issue(CaSigner.generate(TD), SpiffeId(TD, "default", "sleep"))
    with pytest.raises((StreamError, ConnectError)) as err:
        await env.connect(cert=foreign, expected_identities=[str(SERVER_ID)])
    assert err.value.reason in {"connection_closed", "tls_handshake"}
    assert env.requests == []


async def test_client_without_a_certificate_is_refused(env: Env, mesh: Mesh) -> None:
    response = await raw_request(env.port, None, mesh.signer.root_pem,
                                 [(":method", "CONNECT"), (":authority", f"127.0.0.1:{ECHO_PORT}")])
    assert response.status is None
    assert response.closed
    assert env.requests == []


async def test_the_certificate_is_chosen_by_the_local_ip(mesh: Mesh) -> None:
    other_id = SpiffeId(TD, "other", "other-server")
    certs = {"127.0.0.1": mesh.server_cert, "127.0.0.2": mesh.cert(other_id)}
    seen: list[str] = []

    async def provider(ip: str):  # type: ignore[no-untyped-def]
        seen.append(ip)
        return certs[ip]

    async def handler(request):  # type: ignore[no-untyped-def]
        request.respond(200)

    server = HboneServer(provider, handler)
    client = HboneClient()
    socks = [listener("127.0.0.1"), listener("127.0.0.2")]
    serving = [asyncio.create_task(server.serve(s)) for s in socks]
    try:
        for sock, identity in zip(socks, (SERVER_ID, other_id), strict=True):
            ip, port = sock.getsockname()
            stream = await client.connect(mesh.client_cert, (ip, port), "10.0.0.1:80", [str(identity)])
            assert stream.peer_identity == str(identity)
            stream.close()
        assert seen == ["127.0.0.1", "127.0.0.2"]
    finally:
        await client.close()
        await server.close()
        for task in serving:
            await task


async def test_goaway_drain_lets_streams_finish_and_refuses_new_ones(mesh: Mesh) -> None:
    async with running_env(mesh) as env:
        stream = await env.connect()
        drain = asyncio.create_task(env.server.drain(timeout=10))
        await eventually(lambda: not env.client.connections(), "the client to see GOAWAY and stop pooling")
        await stream.write(b"in flight")
        assert await stream.read() == b"in flight"  # the open stream keeps working during the drain
        with pytest.raises(ConnectError) as err:
            await env.connect()  # no new streams: the pooled connection is retired, the listener closed
        assert err.value.reason == "connect_refused"
        assert not drain.done()
        stream.write_eof()
        assert await stream.read() == b""
        stream.close()
        await asyncio.wait_for(drain, 5)  # finished as soon as the last stream did
        assert env.server.connections == 0


async def test_bad_input_on_the_port_does_not_disturb_a_tunnel(mesh: Mesh) -> None:
    config = HboneConfig(handshake_timeout=0.3)
    async with running_env(mesh, config) as env:
        stream = await env.connect()
        await stream.write(b"before")
        assert await stream.read() == b"before"

        async def closed_by_server(reader: asyncio.StreamReader) -> bool:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while await asyncio.wait_for(reader.read(65536), 5):
                    pass
            return True

        bad = []
        for payload in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # half a ClientHello, then silence
                        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plaintext HTTP/1.1
                        bytes(range(256)) * 8,  # garbage
                        b""):  # connect and say nothing
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(payload)
            bad.append((reader, writer))
        # HTTP/1.1 inside a valid mTLS session, no ALPN: not an HTTP/2 preface.
        ctx = client_context(mesh.client_cert)
        ctx.set_alpn_protocols(["http/1.1"])
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port, ssl=ctx, server_hostname="")
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        bad.append((reader, writer))

        await stream.write(b"during")
        assert await stream.read() == b"during"
        for reader, writer in bad:
            assert await closed_by_server(reader)
            writer.close()
        await stream.write(b"after")
        assert await stream.read() == b"after"
        assert env.requests[1:] == []  # none of them reached the handler
        stream.close()
