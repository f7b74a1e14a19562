"""The HBONE client on loopback: server identity checks, the pool (sharing, capacity, keys, idle eviction),
keepalive PINGs that detect a dead peer, the socket factory, and errors that say what to check."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ambient.hbone import ConnectError, HboneClient, HboneConfig, InvalidRequest, StreamError
from ambient.hbone.tls import server_context
from ambient.identity.spiffe import SpiffeId
from tests.integration.hbone.conftest import SERVER_ID, TD, Env, Mesh, eventually, running_env

pytestmark = pytest.mark.timeout(30)


async def test_a_server_without_an_expected_identity_is_rejected(env: Env) -> None:
    with pytest.raises(ConnectError) as err:
        await env.connect(expected_identities=["spiffe://cluster.local/ns/bookinfo/sa/reviews"])
    assert err.value.reason == "identity_mismatch"
    assert str(SERVER_ID) in str(err.value) and "bookinfo/sa/reviews" in str(err.value)
    assert env.requests == []  # nothing was sent to the wrong server
    # Any one of several expected identities is enough (workload SA or a service's subject_alt_names).
    stream = await env.connect(expected_identities=["spiffe://cluster.local/ns/x/sa/y", str(SERVER_ID)])
    stream.close()


async def test_150_concurrent_streams_open_two_connections(env: Env) -> None:
    env.gate.clear()  # keep every stream open until all are up
    streams = await asyncio.gather(*(env.connect() for _ in range(150)))
    assert env.server.connections == 2
    assert sorted(c.streams for c in env.client.connections()) == [50, 100]
    assert {c.capacity for c in env.client.connections()} == {100}
    env.gate.set()
    for stream in streams:
        stream.close()


async def test_capacity_follows_a_lower_peer_limit(mesh: Mesh) -> None:
    async with running_env(mesh, HboneConfig(server_max_streams=10)) as env:
        first = await env.connect()  # learns the peer's SETTINGS_MAX_CONCURRENT_STREAMS
        env.gate.clear()
        streams = [first, *await asyncio.gather(*(env.connect() for _ in range(14)))]
        assert sorted(c.streams for c in env.client.connections()) == [5, 10]
        env.gate.set()
        for stream in streams:
            stream.close()


async def test_connections_are_shared_only_within_a_pool_key(env: Env, mesh: Mesh) -> None:
    other_source = mesh.cert(SpiffeId(TD, "default", "other"))
    streams = [await env.connect(), await env.connect(),  # same key: one connection
               await env.connect(cert=other_source),  # another source identity
               await env.connect(expected_identities=[str(SERVER_ID), "spiffe://cluster.local/ns/a/sa/b"]),
               await env.connect(local_bind="127.0.0.1")]  # another source IP (None before)
    assert env.server.connections == 4
    for stream in streams:
        stream.close()
    # Sequential streams reuse the connection once the first is done.
    before = env.server.connections
    for _ in range(3):
        (await env.connect()).close()
    assert env.server.connections == before


async def test_idle_connections_are_evicted(mesh: Mesh) -> None:
    async with running_env(mesh, HboneConfig(pool_idle_timeout=0.2)) as env:
        stream = await env.connect()
        await stream.write(b"x")
        await stream.read()
        stream.close()
        assert len(env.client.connections()) == 1
        await eventually(lambda: env.server.connections == 0, "the idle pooled connection to be closed")
        assert env.client.connections() == []


async def test_a_peer_that_stops_answering_pings_is_dropped(mesh: Mesh) -> None:
    # A TLS server that completes the handshake and then never says anything: no SETTINGS, no PING ACK.
    silent: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0, ssl=server_context(mesh.server_cert))
    port = server.sockets[0].getsockname()[1]
    client = HboneClient(HboneConfig(ping_interval=0.05, ping_timeout=0.2))
    try:
        with pytest.raises(StreamError) as err:
            await asyncio.wait_for(client.connect(mesh.client_cert, ("127.0.0.1", port), "10.0.0.1:80",
                                                  [str(SERVER_ID)]), 5)
        assert err.value.reason == "ping_timeout"
        assert "PING" in str(err.value)
    finally:
        await client.close()
        for writer in silent:
            writer.close()
        server.close()


async def test_the_socket_factory_makes_the_socket(env: Env) -> None:
    made: list[socket.socket] = []

    def factory() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        made.append(sock)
        return sock

    stream = await env.connect(socket_factory=factory)
    assert len(made) == 1
    assert env.requests[0].peer_addr[1] == stream.local_addr[1]  # the server saw our socket's port
    stream.close()


async def test_connection_refused_says_what_to_check(mesh: Mesh) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = HboneClient()
    with pytest.raises(ConnectError) as err:
        await client.connect(mesh.client_cert, ("127.0.0.1", port), "10.0.0.1:80", [str(SERVER_ID)])
    assert err.value.reason == "connect_refused"
    assert "15008" in str(err.value)
    await client.close()


async def test_invalid_requests_fail_before_connecting(mesh: Mesh) -> None:
    client = HboneClient()
    for authority, headers in (("reviews:9080", {}), ("10.0.0.1:80", {"Baggage": "x"}),
                               ("10.0.0.1:80", {"connection": "close"}), ("10.0.0.1:80", {"x": "a\r\nb"})):
        with pytest.raises(InvalidRequest):
            await client.connect(mesh.client_cert, ("127.0.0.1", 1), authority, [str(SERVER_ID)], headers)
    assert client.connections() == []
