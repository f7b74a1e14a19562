"""A stand-in for waypoint pods until the waypoint exists (issue 6), local-cluster-only wiring.

It answers readiness on 15021 as the waypoint will (`GET /healthz/ready` → `200 ready`), so the waypoint
controller's flow (Deployment, Ready pod, Gateway `status.addresses`, service binding) runs for real.

Given a CA (`--ca-address`, `--root-cert`, `--token-path`), it also terminates HBONE on 15008 (PROTOCOLS §6)
as the waypoint's own identity (`spiffe://<td>/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT`) and passes every
CONNECT through at L4: it logs `standin-waypoint CONNECT <authority> from <peer identity>` and relays the
tunnel to the authority over plain TCP. No L7 policy, no routing: only enough for tests to see that traffic
to a waypoint-bound service reaches the waypoint with the caller's identity. The local cluster's supervisor
passes the node's ztunnel token (a node proxy, allowed to ask for identities of pods on its node), so the
certificate is requested with impersonation. Readiness waits for that certificate, as a real waypoint
is not ready before it can serve HBONE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from aiohttp import web

from ambient.aio import cancel_on_signals
from ambient.hbone.server import ConnectRequest, HboneServer
from ambient.hbone.stream import HboneStream
from ambient.identity.ca_client import CaClient, CaClientConfig, token_from_file
from ambient.identity.errors import IdentityError
from ambient.identity.manager import CertificateManager
from ambient.identity.spiffe import SpiffeId

log = logging.getLogger("ambient.local.standin_waypoint")

READINESS_PORT = 15021  # PROTOCOLS §1
HBONE_PORT = 15008  # PROTOCOLS §1
TRUST_DOMAIN = "cluster.local"
CONNECT_TIMEOUT = 5.0  # seconds to reach the authority before answering 503
CHUNK = 64 * 1024  # bytes per read in the relay
DRAIN_TIMEOUT = 5.0  # seconds for open tunnels on shutdown


async def _copy_to_tcp(stream: HboneStream, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await stream.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def _copy_to_stream(reader: asyncio.StreamReader, stream: HboneStream) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(CHUNK):
            await stream.write(data)
        stream.write_eof()


async def pass_through(request: ConnectRequest) -> None:
    """One CONNECT: log it, dial the authority with plain TCP, relay both ways (half-close kept)."""
    print(f"standin-waypoint CONNECT {request.authority} from {request.peer_identity}", flush=True)
    host, port = request.target
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        print(f"standin-waypoint cannot reach {request.authority}: {exc or 'timed out'}", flush=True)
        request.respond(503)
        return
    stream = request.respond(200)
    try:
        await asyncio.gather(_copy_to_tcp(stream, writer), _copy_to_stream(reader, stream))
    finally:
        writer.close()


def _hbone_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", HBONE_PORT))
    sock.listen(1024)
    return sock


async def serve(args: argparse.Namespace) -> None:
    cancel_on_signals()
    ready = asyncio.Event()
    manager: CertificateManager | None = None
    identity: SpiffeId | None = None
    if args.ca_address:
        identity = SpiffeId(args.trust_domain, os.environ["POD_NAMESPACE"], os.environ["SERVICE_ACCOUNT"])
        ca = CaClient(CaClientConfig(address=args.ca_address, root_pem=Path(args.root_cert).read_text(),
                                     impersonate=True), token_from_file(args.token_path))
        manager = CertificateManager(ca)
        manager.prefetch(identity)
    else:
        ready.set()

    async def readiness(_: web.Request) -> web.Response:
        if not ready.is_set():
            return web.Response(status=503, text="no certificate yet\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/healthz/ready", readiness)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", READINESS_PORT).start()
    server: HboneServer | None = None
    try:
        if manager is not None and identity is not None:
            wanted, certs = identity, manager
            server = HboneServer(lambda _ip: certs.fetch(wanted), pass_through)
            hbone = asyncio.create_task(server.serve(_hbone_socket()))
            while True:
                try:
                    await manager.fetch(identity)
                    break
                except IdentityError as exc:  # the CA failing; the manager keeps retrying with backoff
                    print(f"standin-waypoint waiting for a certificate for {identity}: {exc}", flush=True)
                    await asyncio.sleep(1)
            print(f"standin-waypoint serving HBONE on {HBONE_PORT} as {identity}", flush=True)
            ready.set()
            await hbone
        else:
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass
    finally:
        if server is not None:
            await server.drain(DRAIN_TIMEOUT)
        if manager is not None:
            await manager.close()
        await runner.cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="standin_waypoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--ca-address", help="host:port of the mesh CA; without it, readiness only (no HBONE)")
    p.add_argument("--root-cert", help="the mesh root certificate (PEM) the CA's certificate chains to")
    p.add_argument("--token-path", help="a bootstrap token allowed to ask for this pod's identity")
    p.add_argument("--trust-domain", default=TRUST_DOMAIN)
    args = p.parse_args(argv)
    if args.ca_address:
        missing = [flag for flag, value in (("--root-cert", args.root_cert), ("--token-path", args.token_path))
                   if not value]
        missing += [f"${var}" for var in ("POD_NAMESPACE", "SERVICE_ACCOUNT") if not os.environ.get(var)]
        if missing:
            p.error(f"--ca-address also needs {', '.join(missing)}")
        if not Path(args.root_cert).is_file():
            p.error(f"--root-cert {args.root_cert}: no such file")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
