"""The admin HTTP server over real sockets on 127.0.0.1: what curl, Prometheus, kubelet probes and
`ambientctl` rely on (keep-alive, pipelining, bodies, HEAD), what a broken or hostile client gets (a
status and a reason, never a traceback, and no effect on other connections), clean close, and `fetch`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ambient.telemetry.admin_http import (
    FetchError,
    HttpLimits,
    HttpServer,
    ListenError,
    Request,
    Response,
    Router,
    fetch,
    json_response,
    text_response,
)

HOST = "127.0.0.1"


class App:
    """Routes that show what the handler saw."""

    def __init__(self) -> None:
        self.router = Router()
        self.seen: list[Request] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.router.get("/text", self.text)
        self.router.get("/json", self.json)
        self.router.add(("GET", "POST"), "/echo", self.echo)
        self.router.get("/boom", self.boom)
        self.router.get("/slow", self.slow)
        self.router.get("/wrong", lambda _: "not a response")  # type: ignore[arg-type,return-value]

    def text(self, request: Request) -> Response:  # a plain function
        self.seen.append(request)
        return text_response(f"hello {request.query.get('name', 'world')}\n")

    async def json(self, request: Request) -> Response:  # a coroutine
        self.seen.append(request)
        return json_response({"all": dict(request.query_all), "peer": bool(request.peer)})

    async def echo(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(body=request.body, content_type="application/octet-stream",
                        headers=(("X-Method", request.method),))

    def boom(self, _: Request) -> Response:
        raise RuntimeError("state not loaded")

    async def slow(self, _: Request) -> Response:
        self.entered.set()
        await self.release.wait()
        return text_response("done\n")


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
async def server(app: App) -> AsyncIterator[HttpServer]:
    server = HttpServer(app.router, (HOST, 0), what="test server",
                        limits=HttpLimits(max_head_bytes=2048, max_body_bytes=4096, head_timeout=0.5,
                                          idle_timeout=1.0))
    await server.start()
    yield server
    await server.close()


async def exchange(port: int, data: bytes, *, until_eof: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            return await reader.read() if until_eof else await reader.read(65536)
    finally:
        writer.close()


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of whole responses (each with Content-Length)."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        out.append((int(status_line.split()[1]), headers, raw[:length]))
        raw = raw[length:]
    return out


# -- what clients rely on -----------------------------------------------------------------------------------
async def test_a_real_client_gets_text_and_json_with_query_parameters(server: HttpServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{HOST}:{server.port}/text?name=ztunnel") as r:
            assert (r.status, r.headers["Content-Type"], await r.text()) == (
                200, "text/plain; charset=utf-8", "hello ztunnel\n")
        async with session.get(f"http://{HOST}:{server.port}/json?a=1&a=2&b=") as r:
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
            assert await r.json() == {"all": {"a": ["1", "2"], "b": [""]}, "peer": True}


async def test_keep_alive_and_pipelined_requests_are_answered_in_order_on_one_connection(
        server: HttpServer, app: App) -> None:
    raw = await exchange(server.port, b"GET /text?name=a HTTP/1.1\r\nHost: x\r\n\r\n"
                                      b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                                      b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                                      b"GET /text?name=b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = responses(raw)
    assert [(status, body) for status, _, body in answers] == [
        (200, b"hello a\n"), (404, b"404 not found: /nope\n"), (200, b"abc"), (200, b"hello b\n")]
    assert [h["connection"] for _, h, _ in answers] == ["keep-alive"] * 3 + ["close"]
    assert len({r.peer for r in app.seen}) == 1  # one connection for all of them


async def test_http_1_0_closes_unless_asked_to_keep_alive(server: HttpServer) -> None:
    (status, headers, body), = responses(await exchange(server.port, b"GET /text HTTP/1.0\r\n\r\n"))
    assert (status, headers["connection"], body) == (200, "close", b"hello world\n")
    raw = await exchange(server.port, b"GET /text HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", until_eof=False)
    assert b"Connection: keep-alive" in raw


async def test_bodies_by_length_chunked_and_after_100_continue(server: HttpServer, app: App) -> None:
    raw = await exchange(server.port, b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"5;ext=1\r\nlevel\r\n3\r\n=on\r\n0\r\nX-T: 1\r\n\r\n"
                                      b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
                                      b"Connection: close\r\n\r\nok")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    _, _, rest = raw.partition(b"level=on")  # the first answer's body; then 100 Continue, then the second
    assert rest.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert rest.endswith(b"\r\n\r\nok")
    assert [r.body for r in app.seen] == [b"level=on", b"ok"]


async def test_head_gets_the_get_answer_without_its_body(server: HttpServer) -> None:
    raw = await exchange(server.port, b"HEAD /text HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"Content-Length: 12\r\nConnection: close\r\n\r\n")


async def test_wrong_method_is_405_with_allow_and_the_connection_survives(server: HttpServer) -> None:
    raw = await exchange(server.port, b"DELETE /echo HTTP/1.1\r\n\r\nGET /text HTTP/1.1\r\nConnection: close\r\n\r\n")
    (status, headers, body), (status2, _, _) = responses(raw)
    assert (status, headers["allow"], status2) == (405, "GET, HEAD, POST", 200)
    assert body == b"405 method not allowed: use GET or HEAD or POST /echo\n"


async def test_a_failing_handler_is_a_500_naming_the_error_without_a_traceback(
        server: HttpServer, caplog: pytest.LogCaptureFixture) -> None:
    raw = await exchange(server.port, b"GET /boom HTTP/1.1\r\n\r\nGET /wrong HTTP/1.1\r\n\r\n"
                                      b"GET /text HTTP/1.1\r\nConnection: close\r\n\r\n")
    (s1, _, b1), (s2, _, b2), (s3, _, _) = responses(raw)
    assert (s1, b1) == (500, b"500 internal error in GET /boom: RuntimeError: state not loaded\n")
    assert (s2, b2, s3) == (500, b"500 internal error in GET /wrong\n", 200)
    assert b"Traceback" not in raw
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)  # the log has it


# -- broken and hostile clients -----------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "status", "says"), [
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(40)) + b"\r\n\r\n", 400, b"malformed request line"),
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400, b"malformed header line 'bad header'"),
    (b"GET /text HTTP/1.1\r\nX: " + b"a" * 4000 + b"\r\n\r\n", 431, b"request head over 2048 bytes"),
    (b"GET /text HTTP/1.1\r\nX: " + b"a" * 4000, 431, b"request head over 2048 bytes"),  # no end in sight
    (b"POST /echo HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, 413,
     b"body of 5000 bytes is over the limit of 4096"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"x" * 4096 + b"\r\n1\r\nx\r\n0\r\n\r\n",
     413, b"body over 4096 bytes"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, b"malformed chunk size 'zz'"),
    (b"GET / HTTP/3\r\n\r\n", 505, b"'HTTP/3' is not supported"),
])
async def test_bad_requests_get_a_status_and_a_reason_then_the_connection_closes(
        server: HttpServer, data: bytes, status: int, says: bytes) -> None:
    raw = await exchange(server.port, data)  # read to EOF: the server closes
    (got, headers, body), = responses(raw)
    assert (got, headers["connection"]) == (status, "close")
    assert says in body and b"Traceback" not in body


async def test_a_head_that_never_ends_is_a_408_and_an_idle_connection_is_closed(server: HttpServer) -> None:
    assert (await exchange(server.port, b"GET /text HTTP/1.1\r\n")).startswith(b"HTTP/1.1 408 Request Timeout")
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed after idle_timeout (1 s) without a byte sent
    finally:
        writer.close()


async def test_garbage_on_one_connection_does_not_disturb_another(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        writer.write(b"GET /text HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await reader.readuntil(b"hello world\n")
        assert first.startswith(b"HTTP/1.1 200")
        assert b"400 Bad Request" in await exchange(server.port, b"\x00\xff garbage\r\n\r\n")
        writer.write(b"GET /text?name=again HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"hello again\n")).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


# -- lifecycle ----------------------------------------------------------------------------------------------
async def test_close_ends_open_connections_and_requests_and_stops_listening(app: App) -> None:
    server = HttpServer(app.router, (HOST, 0))
    await server.start()
    port = server.port
    idle_reader, idle_writer = await asyncio.open_connection(HOST, port)
    busy_reader, busy_writer = await asyncio.open_connection(HOST, port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await busy_writer.drain()
    async with asyncio.timeout(5):
        await app.entered.wait()
        await server.close()
        assert await idle_reader.read() == b""
        assert await busy_reader.read() == b""
    idle_writer.close()
    busy_writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, port)
    await server.close()  # twice is fine


async def test_serves_on_a_socket_it_is_given(app: App) -> None:
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen()
    server = HttpServer(app.router, what="worker admin")
    await server.start(sock)
    try:
        assert server.port == sock.getsockname()[1]
        assert await fetch(HOST, server.port, "/text") == (200, b"hello world\n")
    finally:
        await server.close()
    assert sock.fileno() == -1  # closed with the server


async def test_a_taken_port_is_a_listen_error_naming_the_address(app: App) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on {HOST}:{port} for the metrics server: "):
            await HttpServer(app.router, (HOST, port), what="metrics server").start()


# -- fetch --------------------------------------------------------------------------------------------------
async def test_fetch_reads_status_and_body_with_method_and_body(server: HttpServer) -> None:
    assert await fetch(HOST, server.port, "/echo", method="POST", body=b"level=debug") == (200, b"level=debug")
    assert await fetch(HOST, server.port, "/nope") == (404, b"404 not found: /nope\n")
    assert await fetch(HOST, server.port, "/text", method="HEAD") == (200, b"")


async def test_fetch_failures_are_fetch_errors_saying_what_happened() -> None:
    with socket.socket() as closed:
        closed.bind((HOST, 0))
        port = closed.getsockname()[1]
    with pytest.raises(FetchError, match=f"GET http://{HOST}:{port}/x: .*refused"):
        await fetch(HOST, port, "/x")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    for handler, says in ((silent, "no answer within 0.2s"), (not_http, "malformed answer: not an HTTP/1.x")):
        other = await asyncio.start_server(handler, HOST, 0)
        try:
            with pytest.raises(FetchError, match=says):
                await fetch(HOST, other.sockets[0].getsockname()[1], "/x", timeout=0.2)
        finally:
            other.close()
