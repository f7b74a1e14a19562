"""Interop: Node's `http2` client (a different HTTP/2 and TLS stack) opens an HBONE tunnel to our server
with its client certificate: CONNECT gets 200 and an echo, a non-CONNECT method gets 400."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.integration.hbone.conftest import CLIENT_ID, ECHO_PORT, SERVER_ID, Env, Mesh

pytestmark = pytest.mark.timeout(30)
SCRIPT = Path(__file__).with_name("node_connect.js")


async def test_node_http2_connect_client(env: Env, mesh: Mesh, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the interop test runs Node's http2 client)")
    cert = mesh.client_cert
    files = {"cert.pem": cert.presented_chain_pem, "key.pem": cert.key_pem, "root.pem": cert.root_pem}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), str(env.port), *(str(tmp_path / name) for name in files), f"127.0.0.1:{ECHO_PORT}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, f"node failed:\n{stdout.decode()}\n{stderr.decode()}"
    seen = json.loads(stdout.decode().strip().splitlines()[-1])
    assert seen == {"serverSan": f"URI:{SERVER_ID}", "connectStatus": 200, "echo": "ping from node",
                    "getStatus": 400}
    (request,) = env.requests  # the GET never reached the handler
    assert request.peer_identity == str(CLIENT_ID)
    assert request.headers["forwarded"] == 'for="10.0.0.9:5000"'
