"""The TCP echo server, alone and under the load client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from .programs import REPO_ROOT, Program, Programs


@pytest.fixture(scope="module")
def echo_servers(module_programs: Programs) -> dict[str, Program]:
    servers = {
        "raw": module_programs.start("samples.tcp_echo.server", "tcp-echo", kind="tcp"),
        "hello": module_programs.start(
            "samples.tcp_echo.server", "tcp-echo-hello", kind="tcp", env={"PREFIX": "hello"}
        ),
    }
    module_programs.wait_ready(*servers.values())
    return servers


async def round_trip(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\n"), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_echoes_bytes(echo_servers: dict[str, Program]) -> None:
    assert await round_trip(echo_servers["raw"].port, b"ping\n") == b"ping\n"


async def test_prefixes_each_line(echo_servers: dict[str, Program]) -> None:
    assert await round_trip(echo_servers["hello"].port, b"world\n") == b"hello world\n"


@pytest.mark.parametrize(
    ("server", "pacing"),
    [("hello", ["--rate", "300", "--duration", "1"]), ("raw", ["--max-rate", "--requests", "500"])],
)
def test_loadclient_tcp_round_trips_without_errors(
    echo_servers: dict[str, Program], server: str, pacing: list[str]
) -> None:
    target = f"127.0.0.1:{echo_servers[server].port}"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "samples.loadclient",
            "tcp",
            target,
            *pacing,
            "--connections",
            "4",
            "--size",
            "256",
            "--json",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["requests"] == (300 if server == "hello" else 500)
    assert result["error_count"] == 0
    assert result["latency_ms"]["max"] > 0
