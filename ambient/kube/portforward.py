"""Port-forward to a pod through the API server, over WebSocket: the byte stream `kubectl port-forward` gives,
for a client that has no SPDY. Both ends live here: the frame codec and channel bookkeeping (pure, tested
with transcripts), the client's stream (`open_stream`, behind `KubeClient.port_forward`), a one-shot HTTP
GET over it (`http_get_via_port_forward`), and the helpers the local API server uses to serve the same
endpoint (ambient/local/apiserver.py).

The wire, as Kubernetes speaks it (sources named, nothing copied):

- Request: `GET /api/v1/namespaces/{ns}/pods/{name}/portforward?ports={port}` with a WebSocket upgrade and
  subprotocol `v4.channel.k8s.io`. kube-apiserver checks the pod and that it has a node ("pod X does not
  have a host assigned", 400), then proxies the upgrade unchanged to the kubelet, which hands it to the
  container runtime's streaming server (pkg/registry/core/pod/rest/subresources.go `PortForwardREST.Connect`,
  pkg/registry/core/pod/strategy.go `PortForwardLocation`, which passes `ports` on as the kubelet's `port`).
  Refusals before the upgrade are ordinary `Status` answers: 404 no such pod, 400 "Upgrade request required"
  for a request without one (apimachinery util/proxy/upgradeaware.go), 403 from RBAC (the WebSocket GET
  needs `get` on pods/portforward, and `create` too where the AuthorizePodWebsocketUpgradeCreatePermission
  gate is on).
- Subprotocols the kubelet accepts for port-forward: `v4.channel.k8s.io` (binary), `v4.base64.channel.k8s.io`
  (text, base64) and none (binary) (k8s.io/kubelet/pkg/cri/streaming/portforward/websocket.go
  `handleWebSocketStreams`). Newer kubectl instead tunnels SPDY inside the WebSocket (subprotocol
  `SPDY/3.1+portforward.k8s.io`: client-go tools/portforward/tunneling_dialer.go, translated by
  kube-apiserver under the PortForwardWebsockets gate; `v2.portforward.k8s.io` names that version); any other
  WebSocket request reaches the kubelet as it is. That SPDY framing is not implemented here.
- Frames (apimachinery util/httpstream/wsstream/conn.go, "channel.k8s.io"): every binary message, both
  ways, is one channel byte then payload; base64 variant: the channel as the ASCII digit, then the payload
  base64-encoded. Empty messages are ignored, and so are messages for channels that do not exist.
- Channels (websocket.go): port i (in `ports` order) has data channel 2*i (read/write) and error channel
  2*i+1 (server → client only). The server's first message on each of the two is the port, 2 bytes
  little-endian; the client sends no preamble (kubernetes-client/python stream/ws_client.py `PortForward`
  checks that first message is exactly those 2 bytes and that the port matches).
- Errors: when forwarding a port fails, the kubelet writes `error forwarding port {port} to pod {pod}, uid
  {uid}: {err}` on its error channel (websocket.go `portForward`); containerd's err for a refused dial is
  `failed to connect to localhost:{port} inside namespace "{sandbox}", IPv4: dial tcp4 127.0.0.1:{port}: connect:
  connection refused IPv6 ...` (containerd's CRI `portForward`, sandbox_portforward_linux.go; `{pod}` is then
  the sandbox ID, `{uid}` empty), because the runtime dials localhost inside the pod's network namespace.
  The Python client treats any text on the error channel as the port's error and closes the port.
- End: v4 has no half-close and no per-channel close. When the forward ends (the pod closed the connection,
  or the dial failed) the kubelet closes both streams and then the WebSocket (a close frame, status 1000,
  as kubernetes-client/java#2574 observed); the client ends a forward by closing the WebSocket. So a request/answer
  protocol must let the pod's side close, e.g. HTTP/1.1 with `Connection: close`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from ambient.kube.errors import ApiError

if TYPE_CHECKING:
    from ambient.kube.client import KubeClient

PROTOCOL = "v4.channel.k8s.io"  # what the client asks for
BASE64_PROTOCOL = "v4.base64.channel.k8s.io"
SERVER_PROTOCOLS = (PROTOCOL, BASE64_PROTOCOL)  # what the kubelet (and the local API server) accept, besides none
DATA, ERROR = 0, 1  # offsets of a port's two channels (the kubelet's dataChannel, errorChannel)
WRITE_CHUNK = 32 * 1024  # bytes per frame sent: Go's io.Copy buffer, what the kubelet's frames carry at most
CLOSE_TIMEOUT = 5.0  # seconds to wait for the server's close frame after ours
HANDSHAKE_TIMEOUT = 30.0  # seconds for the upgrade, as the client's other short requests
MAX_HTTP_RESPONSE = 64 * 1024 * 1024  # bytes `http_get_via_port_forward` accepts (a config dump is ~MBs)


class PortForwardError(Exception):
    """A port-forward that did not work; `reason` is stable (log field, tests)."""

    reason = "PortForwardFailed"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason


class ForwardingFailed(PortForwardError):
    """The kubelet's error channel spoke: it could not connect to the port inside the pod, or the forward
    broke. `message` is its text; `received` the data bytes that arrived before it (0: never connected)."""

    reason = "ForwardingFailed"

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message)
        self.received = received


class ProtocolViolation(PortForwardError):
    """Frames that do not follow the channel protocol."""

    reason = "ProtocolViolation"


# -- frames (pure) -----------------------------------------------------------------------------------------
def encode_frame(channel: int, payload: bytes) -> bytes:
    """A binary message of `channel.k8s.io`: the channel byte, then the payload."""
    if not 0 <= channel <= 255:
        raise ValueError(f"channel {channel} does not fit in a byte")
    return bytes((channel,)) + payload


def decode_frame(message: bytes) -> tuple[int, bytes]:
    """(channel, payload) of a binary message; empty messages are a `ProtocolViolation` (callers skip them)."""
    if not message:
        raise ProtocolViolation("empty port-forward frame")
    return message[0], bytes(message[1:])


def encode_base64_frame(channel: int, payload: bytes) -> str:
    """A text message of `base64.channel.k8s.io`: the channel as an ASCII digit, then base64."""
    if not 0 <= channel <= 0xFF - ord("0"):
        raise ValueError(f"channel {channel} has no one-character form")
    return chr(ord("0") + channel) + base64.b64encode(payload).decode()


def decode_base64_frame(message: str) -> tuple[int, bytes]:
    """(channel, payload) of a text message; the channel byte is `first char - '0'` modulo 256, as Go's byte
    arithmetic in wsstream (so a char below '0' names a channel no one uses, not a negative one)."""
    if not message:
        raise ProtocolViolation("empty port-forward frame")
    if ord(message[0]) > 0xFF:
        raise ProtocolViolation(f"port-forward frame starts with {message[0]!r}, not a channel")
    try:
        return (ord(message[0]) - ord("0")) % 256, base64.b64decode(message[1:], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolViolation(f"port-forward frame is not base64: {exc}") from None


def port_preamble(port: int) -> bytes:
    """The first payload on both of a port's channels: the port, 16 bits little-endian."""
    return port.to_bytes(2, "little")


def data_channel(index: int) -> int:
    return 2 * index + DATA


def error_channel(index: int) -> int:
    return 2 * index + ERROR


@dataclass(frozen=True)
class Data:
    payload: bytes


@dataclass(frozen=True)
class Error:
    text: str


class Demux:
    """The client's side of one forwarded port (index `index` in the request's `ports`): each message from
    the server → `Data`, `Error`, or None (the preamble, or an empty payload). Anything else is a
    `ProtocolViolation`, as the Python client treats it."""

    def __init__(self, port: int, index: int = 0) -> None:
        self.port, self.index = port, index
        self._preamble_seen = {data_channel(index): False, error_channel(index): False}

    def feed(self, message: bytes) -> Data | Error | None:
        channel, payload = decode_frame(message)
        if channel not in self._preamble_seen:
            raise ProtocolViolation(f"port-forward frame on channel {channel}, which port {self.port} does not use "
                                    f"(its channels are {data_channel(self.index)} and {error_channel(self.index)})")
        if not self._preamble_seen[channel]:
            if len(payload) != 2:
                raise ProtocolViolation(f"first port-forward frame on channel {channel} has {len(payload)} bytes, "
                                        "not the 2-byte port")
            port = int.from_bytes(payload, "little")
            if port != self.port:
                raise ProtocolViolation(f"port-forward channel {channel} is for port {port}, not {self.port}")
            self._preamble_seen[channel] = True
            return None
        if not payload:
            return None
        if channel == error_channel(self.index):
            return Error(payload.decode(errors="replace"))
        return Data(payload)


# -- server side (pure) ------------------------------------------------------------------------------------
def parse_ports(values: Sequence[str]) -> list[int]:
    """The forwarded ports from the kubelet's `port` (the API's `ports`) query values, each a comma list; the
    kubelet's words for what is wrong (websocket.go `NewV4Options`)."""
    if not values:
        raise ValueError('query parameter "port" is required')
    ports = []
    for value in values:
        if not value:
            raise ValueError('query parameter "port" cannot be empty')
        for part in value.split(","):
            if not _is_number(part) or int(part) > 65535:
                raise ValueError(f'unable to parse "{value}" as a port')
            if int(part) < 1:
                raise ValueError(f'port "{value}" must be > 0')
            ports.append(int(part))
    return ports


def negotiate(offered: Sequence[str]) -> str | None:
    """The subprotocol the server picks from the client's: None when the client offered none (binary
    framing then, as the kubelet's "" entry), else the first it supports; a `ValueError` in wsstream's words
    when there is none (x/net/websocket then answers 403)."""
    if not offered:
        return None
    for protocol in offered:
        if protocol in SERVER_PROTOCOLS:
            return protocol
    raise ValueError(f"requested protocol(s) are not supported: [{' '.join(offered)}]; supports "
                     f"[{' '.join(('', *SERVER_PROTOCOLS))}]")


def forwarding_error(port: int, pod: str, uid: str, cause: str) -> str:
    """The kubelet's error-channel text."""
    return f"error forwarding port {port} to pod {pod}, uid {uid}: {cause}"


# -- client side -------------------------------------------------------------------------------------------
class PortForwardStream:
    """A byte stream to a pod's port over one port-forward WebSocket. `read` returns b"" at EOF (the server
    closed the WebSocket), and raises `ForwardingFailed` instead when the error channel said why.
    Not safe for two concurrent readers; one reader and one writer may run at once."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, port: int, target: str) -> None:
        self._ws, self._demux, self.target = ws, Demux(port), target
        self._buffer = bytearray()
        self._error = ""
        self._received = 0
        self._eof = False

    @property
    def port(self) -> int:
        return self._demux.port

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (any number if -1) once some are there; b"" at EOF."""
        while not self._buffer and not self._eof:
            await self._receive()
        if not self._buffer:
            if self._error:
                raise ForwardingFailed(self._error, self._received)
            return b""
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    async def write(self, data: bytes) -> None:
        """Send `data` on the data channel, in frames of at most `WRITE_CHUNK` bytes (waits for the socket)."""
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            if self._ws.closed:
                raise PortForwardError(f"the port-forward to {self.target} is closed", "Closed")
            try:
                await self._ws.send_bytes(encode_frame(data_channel(0), bytes(view[start:start + WRITE_CHUNK])))
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise PortForwardError(f"the port-forward to {self.target} is closed: {exc}", "Closed") from None

    async def close(self) -> None:
        """End the forward (the kubelet then closes the pod-side connection)."""
        self._eof = True
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
            await self._ws.close()

    async def _receive(self) -> None:
        msg = await self._ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            event = self._demux.feed(msg.data)
            if isinstance(event, Data):
                self._buffer += event.payload
                self._received += len(event.payload)
            elif isinstance(event, Error):
                self._error += event.text
        elif msg.type == aiohttp.WSMsgType.TEXT:
            raise ProtocolViolation(f"text frame on the port-forward to {self.target}, which asked for binary "
                                    f"{PROTOCOL}")
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            self._eof = True
        elif msg.type == aiohttp.WSMsgType.ERROR:
            self._eof = True
            if not self._error:
                raise PortForwardError(f"the port-forward to {self.target} broke: {msg.data}", "Broken")


async def refused_upgrade(response: aiohttp.ClientResponse) -> None:
    """The session's `raise_for_status` hook: a WebSocket upgrade answered with something other than 101 is
    the API server's refusal, an `ApiError` from its `Status` (aiohttp's handshake error would drop it)."""
    if response.status == 101 or response.request_info.headers.get("Upgrade", "").lower() != "websocket":
        return
    body = await response.read()
    text = body.decode(errors="replace")
    try:
        payload: object = json.loads(text) if text else f"HTTP {response.status} {response.reason}"
    except ValueError:
        payload = text.strip() or f"HTTP {response.status} {response.reason}"
    raise ApiError.from_status(response.status, payload)


@contextlib.asynccontextmanager
async def open_stream(client: KubeClient, namespace: str, pod: str, port: int) -> AsyncIterator[PortForwardStream]:
    """A `PortForwardStream` to `port` of `namespace/pod`, closed on exit. A refused upgrade is an
    `ApiError` (the server's `Status`), an unreachable server an `ApiError` 503 as for other requests."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
    target = f"port {port} of pod {namespace}/{pod}"
    async with client.reaching_server():
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            ws = await client.session.ws_connect(
                path, params={"ports": str(port)}, protocols=(PROTOCOL,), autoping=True,
                headers=client.auth_headers(),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT))
    if ws.protocol not in (PROTOCOL, None):
        await ws.close()
        raise ProtocolViolation(f"the API server chose subprotocol {ws.protocol!r} for the port-forward to "
                                f"{target}, not {PROTOCOL}")
    stream = PortForwardStream(ws, port, target)
    try:
        yield stream
    finally:
        await stream.close()


# -- HTTP over a port-forward ------------------------------------------------------------------------------
async def http_get_via_port_forward(client: KubeClient, namespace: str, pod: str, port: int, path: str,
                                    timeout: float) -> tuple[int, bytes]:
    """`GET path` (HTTP/1.1, `Connection: close`) to `port` of the pod through a port-forward → (status, body).
    Errors: `ApiError` (the API server refused), `ForwardingFailed` (the pod's port did not accept, ...),
    `PortForwardError` (no answer within `timeout` seconds, or not HTTP)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: ambient-py\r\nAccept: */*\r\n"
               "Connection: close\r\n\r\n").encode()
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout), client.port_forward(namespace, pod, port) as stream:
            await stream.write(request)
            end = AnswerEnd()
            # Stop at the end of a framed answer rather than at EOF: a runtime may linger before closing
            # (containerd waits up to 1 s for the other direction once the pod has closed).
            while not end.reached(raw) and (chunk := await stream.read()):
                raw += chunk
                if len(raw) > MAX_HTTP_RESPONSE:
                    raise PortForwardError(f"the answer from {stream.target} exceeds {MAX_HTTP_RESPONSE} bytes",
                                           "TooLarge")
    except TimeoutError:
        raise PortForwardError(f"port {port} of pod {namespace}/{pod} did not answer GET {path} through a "
                               f"port-forward within {timeout:g}s", "Timeout") from None
    return parse_http_response(bytes(raw))


class AnswerEnd:
    """Whether an HTTP answer read so far is whole by its own framing (Content-Length, or the last chunk of a
    chunked body), cheaply for each read: the headers are looked at once."""

    def __init__(self) -> None:
        self._total: int | None = None  # whole answer's size, once known from Content-Length
        self._chunked = False
        self._headers_seen = False

    def reached(self, raw: bytes | bytearray) -> bool:
        if not self._headers_seen:
            head, sep, _ = bytes(raw).partition(b"\r\n\r\n")
            if not sep:
                return False
            self._headers_seen = True
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip()
                if name == "transfer-encoding" and "chunked" in value.lower():
                    self._chunked = True
                elif name == "content-length" and _is_number(value):
                    self._total = len(head) + 4 + int(value)
        if self._chunked:
            if not raw.endswith(b"0\r\n\r\n"):
                return False
            try:
                parse_http_response(bytes(raw))
            except PortForwardError:
                return False
            return True
        return self._total is not None and len(raw) >= self._total


def parse_http_response(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.x answer read to EOF: body by Content-Length, chunked, or to EOF.
    Garbage, or an answer cut short, is a `PortForwardError` with reason "BadResponse"."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise _bad("the answer ended before its headers did" if raw else "the connection closed without an answer")
    lines = head.decode("latin-1").split("\r\n")
    version, _, status_rest = lines[0].partition(" ")
    status_text = status_rest[:3]
    if not version.startswith("HTTP/1.") or len(status_text) != 3 or not _is_number(status_text):
        raise _bad(f"not an HTTP answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise _bad(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return int(status_text), _dechunk(rest)
    if "content-length" in headers:
        length_text = headers["content-length"]
        if not _is_number(length_text):
            raise _bad(f"bad Content-Length {length_text[:20]!r}")
        length = int(length_text)
        if len(rest) < length:
            raise _bad(f"the body ended after {len(rest)} of {length} bytes")
        return int(status_text), rest[:length]
    return int(status_text), rest


def _dechunk(data: bytes) -> bytes:
    body = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        if not sep or not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise _bad("a chunked body broke off or has a bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            return bytes(body)
        if len(data) < size + 2 or data[size:size + 2] != b"\r\n":
            raise _bad("a chunked body broke off inside a chunk")
        body += data[:size]
        data = data[size + 2:]


def _is_number(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit()


def _bad(what: str) -> PortForwardError:
    return PortForwardError(f"bad HTTP answer through the port-forward: {what}", "BadResponse")
