"""HBONE single-stream throughput on loopback: our client → our server, one tunnel, N MiB through.

The server runs in a child process (as the two ztunnels of a node pair would, each on its own core); its
handler reads and discards, then answers the byte count when the client half closes. The same transfer is
measured over plain TCP and over TLS 1.3 without HTTP/2, between the same two processes and event loop
kind, so the ratios show what the tunnel costs. Print-only; the figures go to bench/README.md.

    .venv/bin/python bench/hbone_pair.py [--mib 1024] [--repeat 3] [--chunk-kib 1024] [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509

from ambient.hbone import ConnectRequest, HboneClient, HboneServer
from ambient.hbone.tls import client_context, server_context
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.keys import build_csr, generate_key, private_key_pem
from ambient.identity.signer import CaSigner
from ambient.identity.spiffe import SpiffeId

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "bench", "server")
CLIENT_ID = SpiffeId(TD, "bench", "client")
READ_SIZE = 1 << 20


def issue(signer: CaSigner, identity: SpiffeId) -> WorkloadCertificate:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, identity).encode())
    return WorkloadCertificate.from_chain(identity, private_key_pem(key), signer.sign_workload(csr, identity, 0))


def use_uvloop(enabled: bool) -> str:
    if enabled:
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        uvloop.install()
        return "uvloop"
    return "asyncio"


# -- the server process -----------------------------------------------------------------------------
async def discard_and_count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Plain TCP and TLS: an 8-byte length first (asyncio's TLS streams cannot half close), then the data."""
    remaining = int.from_bytes(await reader.readexactly(8), "big")
    total, cpu = remaining, time.process_time()
    while remaining and (data := await reader.read(min(READ_SIZE, remaining))):
        remaining -= len(data)
    writer.write(f"{total - remaining} {time.process_time() - cpu}".encode())
    await writer.drain()
    writer.close()


async def hbone_handler(request: ConnectRequest) -> None:
    stream = request.respond(200)
    total, cpu = 0, time.process_time()
    while data := await stream.read():
        total += len(data)
    await stream.write(f"{total} {time.process_time() - cpu}".encode())
    stream.write_eof()


async def serve(cert_file: Path) -> None:
    data = json.loads(cert_file.read_text())
    cert = WorkloadCertificate.from_chain(SpiffeId.parse(data["identity"]), data["key"], data["chain"])
    hbone_sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    server = HboneServer(lambda ip: cert, hbone_handler)
    tcp = await asyncio.start_server(discard_and_count, "127.0.0.1", 0)
    tls = await asyncio.start_server(discard_and_count, "127.0.0.1", 0, ssl=server_context(cert))
    ports = {"hbone": hbone_sock.getsockname()[1], "tcp": tcp.sockets[0].getsockname()[1],
             "tls": tls.sockets[0].getsockname()[1]}
    print(json.dumps(ports), flush=True)
    serving = asyncio.ensure_future(server.serve(hbone_sock))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    serving.cancel()


# -- the client side --------------------------------------------------------------------------------
Sample = tuple[float, float, float]  # wall seconds, client CPU seconds, server CPU seconds


def sample(start: float, cpu: float, answer: bytes, total: int) -> Sample:
    received, server_cpu = answer.split()
    assert int(received) == total, answer
    return time.perf_counter() - start, time.process_time() - cpu, float(server_cpu)


async def through_stream(port: int, total: int, chunk: bytes, ctx: ssl.SSLContext | None) -> Sample:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="" if ctx else None)
    start, cpu = time.perf_counter(), time.process_time()
    writer.write(total.to_bytes(8, "big"))
    for _ in range(total // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    result = sample(start, cpu, await reader.read(), total)
    writer.close()
    return result


async def through_hbone(client: HboneClient, cert: WorkloadCertificate, port: int, total: int, chunk: bytes
                        ) -> Sample:
    stream = await client.connect(cert, ("127.0.0.1", port), "127.0.0.1:9", [str(SERVER_ID)])
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(total // len(chunk)):
        await stream.write(chunk)
    stream.write_eof()
    answer = b""
    while data := await stream.read():
        answer += data
    stream.close()
    return sample(start, cpu, answer, total)


async def measure(args: argparse.Namespace, ports: dict[str, int], client_cert: WorkloadCertificate) -> None:
    total = args.mib << 20
    chunk = b"\x5a" * (args.chunk_kib << 10)
    client = HboneClient()
    tls_ctx = client_context(client_cert)
    runs: dict[str, Callable[[], Awaitable[Sample]]] = {"tcp": lambda: through_stream(ports["tcp"], total, chunk, None),
            "tls": lambda: through_stream(ports["tls"], total, chunk, tls_ctx),
            "hbone": lambda: through_hbone(client, client_cert, ports["hbone"], total, chunk)}
    rates: dict[str, float] = {}
    gib = total / (1 << 30)
    print(f"{'':>6}  {'MB/s':>8}  {'client CPU s/GiB':>16}  {'server CPU s/GiB':>16}   "
          f"({args.mib} MiB per run, best of {args.repeat})")
    for name, run in runs.items():
        await run()  # warm up: handshakes, pooled connection, allocator
        wall, client_cpu, server_cpu = min([await run() for _ in range(args.repeat)])
        rates[name] = total / wall / 1e6
        print(f"{name:>6}  {rates[name]:8.0f}  {client_cpu / gib:16.2f}  {server_cpu / gib:16.2f}")
    print(f"hbone/tcp = {rates['hbone'] / rates['tcp']:.2f}   hbone/tls = {rates['hbone'] / rates['tls']:.2f}")
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB per transfer")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per mode; the best counts")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="size of each write")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop on both sides")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    loop_kind = use_uvloop(not args.no_uvloop)
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    signer = CaSigner.generate(TD)
    server_cert, client_cert = issue(signer, SERVER_ID), issue(signer, CLIENT_ID)
    with tempfile.TemporaryDirectory() as tmp:
        cert_file = Path(tmp) / "server.json"
        cert_file.write_text(json.dumps({"identity": str(server_cert.identity), "key": server_cert.key_pem,
                                         "chain": list(server_cert.cert_chain)}))
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(cert_file)]
                                 + (["--no-uvloop"] if args.no_uvloop else []),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            ports = json.loads(child.stdout.readline())
            print(f"loop: {loop_kind}; server in pid {child.pid}, client in pid {Path('/proc/self').resolve().name}")
            asyncio.run(measure(args, ports, client_cert))
        finally:
            if child.stdin:
                child.stdin.close()
            child.wait(timeout=10)


if __name__ == "__main__":
    main()
