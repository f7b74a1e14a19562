"""Interop with a real Envoy (1.40, BoringSSL, nghttp2/oghttp2) on loopback, both directions:

- our `HboneClient` → Envoy terminating HBONE → a TCP echo server: bytes round-trip, our client verified
  Envoy's SPIFFE SAN (and refuses it when it expects another identity), Envoy saw our client identity.
- Envoy originating HBONE (TCP listener → HTTP/2 CONNECT over mTLS) → our `HboneServer` → the echo
  server: bytes round-trip and half close propagate, our server saw Envoy's identity and authority,
  concurrent tunnels share one pooled HTTP/2 connection, and Envoy refuses our server when it expects
  another SAN.
- Both rendered bootstraps pass `envoy --mode validate`.

Envoy comes from scripts/setup.sh (.venv-envoy); without it the module is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ambient.hbone import ConnectError, HboneClient
from ambient.identity.spiffe import SpiffeId
from bench.envoy import (
    DOWNSTREAM_LOCAL_ADDRESS,
    EnvoyProcess,
    TlsFiles,
    Tunnel,
    envoy_binary,
    hbone_client_bootstrap,
    hbone_terminator_bootstrap,
    render,
)
from tests.integration.hbone.conftest import SERVER_ID, TD, WAIT, Env, Mesh, eventually, read_all

pytestmark = pytest.mark.timeout(30)
if envoy_binary() is None:
    pytest.skip("Envoy is not installed at .venv-envoy/bin/envoy (run scripts/setup.sh)", allow_module_level=True)

ENVOY_SERVER_ID = SpiffeId(TD, "istio-system", "envoy-terminator")
ENVOY_CLIENT_ID = SpiffeId(TD, "istio-system", "envoy-client")
OTHER_ID = SpiffeId(TD, "other", "impostor")


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo server that half-closes after the client's EOF."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def access_log_lines(path: Path) -> list[str]:
    lines: list[str] = await eventually(lambda: path.exists() and path.read_text().splitlines(), f"a line in {path}")
    return lines


async def tcp_round_trip(port: int, payload: bytes) -> bytes:
    """Send `payload`, half close, read until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        async with asyncio.timeout(WAIT):
            return await reader.read()
    finally:
        writer.close()


# -- our client → Envoy terminator ------------------------------------------------------------------------
@pytest.fixture
async def envoy_terminator(mesh: Mesh, echo_port: int, tmp_path: Path) -> AsyncIterator[EnvoyProcess]:
    tls = TlsFiles.write(mesh.cert(ENVOY_SERVER_ID), tmp_path, "terminator")
    bootstrap = hbone_terminator_bootstrap(tls, ("127.0.0.1", echo_port), TD, access_log=tmp_path / "access.log")
    async with await EnvoyProcess.start(bootstrap, tmp_path, "terminator") as envoy:
        yield envoy


async def test_our_client_through_envoy_terminator(mesh: Mesh, envoy_terminator: EnvoyProcess, echo_port: int,
                                                   tmp_path: Path) -> None:
    client = HboneClient()
    authority = f"127.0.0.1:{echo_port}"
    try:
        stream = await client.connect(mesh.client_cert, ("127.0.0.1", envoy_terminator.port("hbone")), authority,
                                      [str(ENVOY_SERVER_ID)])
        assert stream.peer_identity == str(ENVOY_SERVER_ID)  # the SAN we verified on Envoy's certificate
        payload = bytes(range(256)) * 1024  # 256 KiB: several DATA frames and window updates each way
        received = bytearray()

        async def reader() -> None:
            while len(received) < len(payload) and (data := await stream.read()):
                received.extend(data)

        reading = asyncio.create_task(reader())
        await stream.write(payload)
        async with asyncio.timeout(WAIT):
            await reading
        assert bytes(received) == payload
        stream.write_eof()  # Envoy half-closes the backend; the echo server then ends its side
        async with asyncio.timeout(WAIT):
            assert await read_all(stream) == b""
        stream.close()
    finally:
        await client.close()
    (line,) = await access_log_lines(tmp_path / "access.log")
    assert f"peer={mesh.client_cert.identity}" in line  # Envoy verified and logged our client certificate
    assert f"authority={authority}" in line
    assert "status=200" in line


async def test_our_client_refuses_envoy_with_unexpected_identity(mesh: Mesh, envoy_terminator: EnvoyProcess
                                                                 ) -> None:
    client = HboneClient()
    try:
        with pytest.raises(ConnectError) as caught:
            await client.connect(mesh.client_cert, ("127.0.0.1", envoy_terminator.port("hbone")), "127.0.0.1:9",
                                 [str(OTHER_ID)])
    finally:
        await client.close()
    assert caught.value.reason == "identity_mismatch"
    assert str(ENVOY_SERVER_ID) in str(caught.value)


# -- Envoy client → our server ------------------------------------------------------------------------------
@pytest.fixture
async def envoy_client(mesh: Mesh, env: Env, echo_port: int, tmp_path: Path) -> AsyncIterator[EnvoyProcess]:
    """Listener `to-ours` tunnels to our server as CONNECT 127.0.0.1:<echo>; `to-impostor` does the same
    but expects a SAN our server does not have."""
    tls = TlsFiles.write(mesh.cert(ENVOY_CLIENT_ID), tmp_path, "client")
    hbone, authority = ("127.0.0.1", env.port), f"127.0.0.1:{echo_port}"
    bootstrap = hbone_client_bootstrap(tls, [Tunnel("to-ours", hbone, authority, str(SERVER_ID)),
                                             Tunnel("to-impostor", hbone, authority, str(OTHER_ID))],
                                       access_log=tmp_path / "access.log")
    async with await EnvoyProcess.start(bootstrap, tmp_path, "client") as envoy:
        yield envoy


async def test_envoy_client_through_our_server(env: Env, envoy_client: EnvoyProcess, echo_port: int,
                                               tmp_path: Path) -> None:
    payload = b"hello from envoy\n" * 20_000  # 340 KiB
    assert await tcp_round_trip(envoy_client.port("to-ours"), payload) == payload
    (request,) = env.requests
    assert request.peer_identity == str(ENVOY_CLIENT_ID)  # Envoy's client certificate, verified by our server
    assert request.authority == f"127.0.0.1:{echo_port}"
    assert request.target == ("127.0.0.1", echo_port)
    (line,) = await access_log_lines(tmp_path / "access.log")
    assert f"upstream_peer={SERVER_ID}" in line  # Envoy verified our server's SAN


async def test_envoy_client_many_tunnels_share_one_connection(env: Env, envoy_client: EnvoyProcess) -> None:
    payloads = [f"tunnel {i}\n".encode() * 100 for i in range(8)]
    port = envoy_client.port("to-ours")
    echoed = await asyncio.gather(*(tcp_round_trip(port, p) for p in payloads))
    assert echoed == payloads
    assert len(env.requests) == 8
    assert len({request.peer_addr for request in env.requests}) == 1  # Envoy pooled them on one HTTP/2 connection


async def test_envoy_client_refuses_our_server_with_unexpected_identity(env: Env, envoy_client: EnvoyProcess
                                                                        ) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", envoy_client.port("to-impostor"))
    try:
        writer.write(b"never delivered\n")
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(ConnectionError):  # Envoy closes or resets the downstream
                assert await reader.read() == b""
    finally:
        writer.close()
    stats = await envoy_client.stats("cluster.to-impostor-hbone.ssl.fail_verify_san")
    assert stats == {"cluster.to-impostor-hbone.ssl.fail_verify_san": 1}
    assert env.requests == []  # the handshake failed before any CONNECT reached our server



async def test_bootstraps_pass_envoy_validation(mesh: Mesh, tmp_path: Path) -> None:
    """Both bootstraps, including the `%DOWNSTREAM_LOCAL_ADDRESS%` authority, as Envoy's own validator sees
    them (`--mode validate` checks every field and extension without serving)."""
    tls = TlsFiles.write(mesh.client_cert, tmp_path, "validate")
    bootstraps = {
        "client": hbone_client_bootstrap(tls, [Tunnel("dynamic", ("127.0.0.1", 15008), DOWNSTREAM_LOCAL_ADDRESS,
                                                      str(SERVER_ID), listen=("127.0.0.1", 15001))]),
        "terminator": hbone_terminator_bootstrap(tls, ("127.0.0.1", 8080), TD, listen=("0.0.0.0", 15008)),
    }
    for name, bootstrap in bootstraps.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(render(bootstrap))
        proc = await asyncio.create_subprocess_exec(str(envoy_binary()), "--mode", "validate", "-c", str(config),
                                                    "--disable-hot-restart", stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, f"{name} bootstrap rejected:\n{output.decode()}"
    assert bootstraps["client"]["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["tunneling_config"] == {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}
