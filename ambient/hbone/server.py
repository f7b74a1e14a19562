"""The HBONE server (PROTOCOLS.md §6): terminates mTLS + HTTP/2 on a listening socket it is given and hands
each CONNECT to a handler.

`HboneServer(cert_provider, handler)`: `cert_provider(local_ip)` returns (or awaits) the certificate of
the workload being connected to, so one server can answer for every pod whose listener it serves.
`handler(request)` decides: `request.respond(200, headers)` returns the tunnel, `respond(401)` /
`respond(503)` refuse. The handler's lifetime is the stream's: when it returns, the stream is closed, and
a handler that returns without answering (or raises) makes the server answer 503.

Answered without the handler: 400 for a method other than CONNECT or an authority that is not
`ip:port`. Clients must present a certificate chaining to the root of the server's certificate; one
naming another trust domain is dropped right after the TLS handshake, before any HTTP/2 byte (TLS 1.3
lets the client finish first, so it sees the connection closed rather than a TLS alert).

`drain()` stops accepting, sends GOAWAY on every connection and waits for in-flight streams.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping

import h2.events as ev
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame, PushPromiseFrame

from ambient.aio import OwnedTasks
from ambient.hbone.connection import HboneConfig, HboneConnection
from ambient.hbone.errors import ConnectError, HboneError
from ambient.hbone.headers import ConnectHead, Refusal, format_authority, parse_request, response_block
from ambient.hbone.stream import HboneStream
from ambient.hbone.tls import TlsContexts, client_identity, peer_uri_sans
from ambient.identity.certs import WorkloadCertificate

log = logging.getLogger("ambient.hbone.server")

CertProvider = Callable[[str], WorkloadCertificate | Awaitable[WorkloadCertificate]]
ACCEPT_RETRY_DELAY = 0.1  # seconds; out of file descriptors: let connections close before accepting more
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ConnectRequest:
    """One CONNECT the handler must answer. `target` is the parsed authority (ip, port); `peer_identity`
    the client's SPIFFE id; `peer_addr`/`local_addr` the TCP endpoints of the HBONE connection."""

    __slots__ = ("authority", "headers", "local_addr", "peer_addr", "peer_identity", "stream", "target")

    def __init__(self, head: ConnectHead, stream: HboneStream, conn: ServerConnection) -> None:
        self.authority = head.authority
        self.target = head.target
        self.headers = head.headers
        self.peer_identity = conn.peer_identity
        self.peer_addr = conn.peer_addr
        self.local_addr = conn.local_addr
        self.stream = stream

    @property
    def answered(self) -> bool:
        return self.stream.status != 0

    def respond(self, status: int, headers: Mapping[str, str] | None = None) -> HboneStream:
        """Answer once. 200 → the open tunnel; 400/401/503 (any other status) → the stream, already ended."""
        if self.answered:
            raise HboneError(f"CONNECT {self.authority} was already answered with {self.stream.status}",
                             "already_answered")
        extra = dict(headers or {})
        self.stream._send_response(status, extra, response_block(status, extra))
        return self.stream

    def __repr__(self) -> str:
        return f"<ConnectRequest {self.authority} from {self.peer_identity} {format_authority(*self.peer_addr)}>"


Handler = Callable[[ConnectRequest], Awaitable[None]]


class BoundedFrameBuffer(FrameBuffer):
    """h2's frame buffer, refusing oversized input when it is announced rather than once it is in memory.

    h2 checks a frame's length only after the whole frame has arrived (a header announcing 16 MiB makes it
    buffer 16 MiB first), and a header block's size only when it decodes the block, after the last of up
    to 64 CONTINUATIONs of `max_frame_size` each: with our 1 MiB frames, 64 MiB held per connection for
    any client with a certificate. Here the length is checked from the 9-byte frame header, and a header
    block (HEADERS + CONTINUATIONs) may not exceed `max_header_block` encoded bytes. Both raise h2
    protocol errors, which end the connection with GOAWAY like any other."""

    def __init__(self, max_header_block: int, max_frame_size: int) -> None:
        super().__init__(server=True)
        self.max_header_block = max_header_block
        self.max_frame_size = max_frame_size

    def __next__(self) -> Frame:
        if len(self._data) >= 9:
            self._validate_frame_length(int.from_bytes(self._data[:3], "big"))
        return super().__next__()

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, (HeadersFrame, ContinuationFrame, PushPromiseFrame)):
            size = len(f.data) + sum(len(part.data) for part in self._headers_buffer)
            if size > self.max_header_block:
                raise DenialOfServiceError(f"header block over {self.max_header_block} bytes ({size} so far)")
        return super()._update_header_buffer(f)


class ServerConnection(HboneConnection):
    """The server end of one HBONE connection."""

    def __init__(self, server: HboneServer, trust_domain: str) -> None:
        super().__init__(server.config, client_side=False)
        # Before any byte arrives: bound what a client can make us buffer (see BoundedFrameBuffer).
        self._h2.incoming_buffer = BoundedFrameBuffer(self.config.max_header_list_size,
                                                      self._h2.incoming_buffer.max_frame_size)
        self._server = server
        self._trust_domain = trust_domain
        self.peer_identity: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self.peer_identity = client_identity(peer_uri_sans(transport.get_extra_info("peercert")),
                                                 self._trust_domain, _peer_text(transport))
        except ConnectError as exc:
            log.info("refusing HBONE client: %s", exc)
            self.error = exc
            self.transport = transport  # type: ignore[assignment]
            transport.close()  # before any HTTP/2 byte
            return
        super().connection_made(transport)
        self._server._connections.add(self)
        if self._server.draining:
            self.goaway()

    def _on_request(self, event: ev.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        if self.error is not None or (self.goaway_sent is not None and stream_id > self.goaway_sent):
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        head = parse_request(event.headers or [])
        if isinstance(head, Refusal):
            log.debug("400 to %s (%s): %s", self.peer, self.peer_identity, head.why)
            self._h2.send_headers(stream_id, response_block(head.status), end_stream=True)
            if event.stream_ended is None:
                self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            return
        stream = HboneStream(self, stream_id, head.authority, head.headers, self.peer_identity)
        self.streams[stream_id] = stream
        self._server._dispatch(ConnectRequest(head, stream, self))

    def _on_closed(self) -> None:
        self._server._connections.discard(self)


class HboneServer:
    """Serves HBONE on listening sockets it is given (one server can serve many pods' sockets)."""

    def __init__(self, cert_provider: CertProvider, handler: Handler, config: HboneConfig | None = None,
                 contexts: TlsContexts | None = None) -> None:
        self.config = config or HboneConfig()
        self._cert_provider = cert_provider
        self._handler = handler
        self._contexts = contexts or TlsContexts()
        self._tasks = OwnedTasks(log)
        self._acceptors: set[asyncio.Task[None]] = set()
        self._connections: set[ServerConnection] = set()
        self.draining = False

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def serve(self, sock: socket.socket) -> None:
        """Accept on `sock` (listening, any address family) until `drain()`/`close()` or cancellation.
        The server takes the socket over and closes it when it stops accepting."""
        if self.draining:
            sock.close()
            return
        sock.setblocking(False)
        name = _sockname(sock)
        acceptor = self._tasks.spawn(self._accept_loop(sock), name=f"hbone-accept {name}")
        self._acceptors.add(acceptor)
        acceptor.add_done_callback(self._acceptors.discard)
        try:
            await asyncio.wait([acceptor])
        except asyncio.CancelledError:
            acceptor.cancel()
            raise

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn_sock, _ = await loop.sock_accept(sock)
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRNOS:
                        log.warning("accepting on %s: %s; retrying in %gs", _sockname(sock), exc,
                                    ACCEPT_RETRY_DELAY)
                        await asyncio.sleep(ACCEPT_RETRY_DELAY)
                        continue
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue
                    raise
                self._tasks.spawn(self._handshake(conn_sock), name="hbone-handshake")
        finally:
            sock.close()

    async def _handshake(self, conn_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer = _peername(conn_sock)
        try:
            local_ip = str(conn_sock.getsockname()[0])
            provided = self._cert_provider(local_ip)
            cert = await provided if inspect.isawaitable(provided) else provided
            assert isinstance(cert, WorkloadCertificate)
            ctx = self._contexts.server(cert)
        except Exception as exc:
            log.warning("no certificate to serve HBONE on %s (connection from %s dropped): %s",
                        _sockname(conn_sock), peer, exc)
            conn_sock.close()
            return
        trust_domain = cert.identity.trust_domain
        try:
            await loop.connect_accepted_socket(lambda: ServerConnection(self, trust_domain), conn_sock, ssl=ctx,
                                               ssl_handshake_timeout=self.config.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.debug("TLS handshake with HBONE client %s failed: %s", peer, exc)
            conn_sock.close()

    def _dispatch(self, request: ConnectRequest) -> None:
        self._tasks.spawn(self._run_handler(request), name=f"hbone-stream {request.authority}")

    async def _run_handler(self, request: ConnectRequest) -> None:
        stream = request.stream
        try:
            await self._handler(request)
        except asyncio.CancelledError:
            stream.abort()
            raise
        except Exception:
            log.exception("HBONE handler failed for %r", request)
            if request.answered:
                stream.abort()
            else:
                request.respond(503)
            return
        if not request.answered:
            log.warning("HBONE handler returned without answering %r; answering 503", request)
            request.respond(503)
        stream.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, GOAWAY every connection, wait up to `timeout` s for their streams, then close."""
        self.draining = True
        for acceptor in list(self._acceptors):
            acceptor.cancel()
        for conn in list(self._connections):
            conn.goaway()
        pending = [conn.closed for conn in self._connections]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Stop accepting and cut every connection and handler now."""
        self.draining = True
        for conn in list(self._connections):
            conn.abort()
        await self._tasks.cancel_all()


def _sockname(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
        return format_authority(str(name[0]), int(name[1]))
    except (OSError, IndexError, TypeError):
        return "?"


def _peername(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
        return format_authority(str(name[0]), int(name[1]))
    except (OSError, IndexError, TypeError):
        return "?"


def _peer_text(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return format_authority(str(peer[0]), int(peer[1])) if peer else "?"
