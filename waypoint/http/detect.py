"""Protocol detection from a connection's first bytes (Envoy's http_inspector, for ports whose protocol is
not declared): the HTTP/2 client preface → "http2" (h2c with prior knowledge), an HTTP/1 request line
start (a known method token and a space) → "http1", anything else → "tcp". A client that sends nothing
within the timeout is taken for a server-first protocol (MySQL, SMTP) → "tcp".

`detect` is pure; `sniff` reads a `ByteStream` until `detect` decides and hands back what it read, which
the caller must replay (`first=` of `serve_http1` / `serve_http2`, or the start of an L4 relay).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from waypoint.http.message import ByteStream

Protocol = Literal["http1", "http2", "tcp"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DETECT_TIMEOUT = 0.1  # seconds: Istio's protocolDetectionTimeout default before 1.10 (100 ms)
# Request methods llhttp knows (RFC 9110, WebDAV, and friends); "PRI" is the HTTP/2 preface's.
METHODS = frozenset(m.encode() for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    "COPY", "LOCK", "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND", "UNBIND",
    "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE",
    "PURGE", "MKCALENDAR", "LINK", "UNLINK", "SOURCE", "QUERY"))
_LONGEST_METHOD = max(map(len, METHODS))


def detect(data: bytes) -> Protocol | None:
    """What `data` (a connection's first bytes) starts; None = undecided, more bytes are needed."""
    if not data:
        return None
    if data[:1] == b"P" and H2_PREFACE.startswith(data[:len(H2_PREFACE)]):
        return "http2" if len(data) >= len(H2_PREFACE) else None
    space = data.find(b" ", 0, _LONGEST_METHOD + 1)
    if space > 0:
        return "http1" if data[:space] in METHODS else "tcp"
    if len(data) > _LONGEST_METHOD:
        return "tcp"
    return None if any(method.startswith(data) for method in METHODS) else "tcp"


async def sniff(stream: ByteStream, timeout: float | None = DETECT_TIMEOUT) -> tuple[Protocol, bytes]:
    """Read from `stream` until the protocol is known; returns it and every byte read. Nothing within
    `timeout` (None: no deadline), undecided bytes at the timeout, or EOF before a decision → "tcp"."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while (protocol := detect(data)) is None:
                chunk = await stream.read(-1)
                if not chunk:
                    return "tcp", data
                data += chunk
            return protocol, data
    except TimeoutError:
        return "tcp", data
