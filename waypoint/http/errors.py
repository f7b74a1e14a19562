"""The HTTP layer's exceptions: one base with a stable `reason` (a log field and metric label).

h2, httptools and stream errors (OSError, `ambient.hbone.HboneError`) are caught where a connection is
driven (`http1.py`, `http2.py`, `pool.py`) and wrapped here. Upstream failures carry the Envoy response
flag the proxy reports (`UO`, `UF`, `UC`) and the status it answers with.
"""

from __future__ import annotations

import copy
from typing import Self


class HttpError(Exception):
    """Base of every error this package raises; `reason` is a short stable token."""

    reason = "http_error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    def fresh(self) -> Self:
        """A copy to raise again: re-raising a stored error would chain every raise's traceback (and the
        frames, streams and connections they hold) to it."""
        return copy.copy(self)


class ProtocolError(HttpError):
    """The peer sent bytes that are not valid HTTP (a bad request line, bad chunk framing, an h2 violation).
    Reasons: `bad_request`, `headers_too_large`, `protocol_error`."""

    reason = "protocol_error"


class StreamReset(HttpError):
    """A message was cut short: the peer reset the stream (HTTP/2 RST_STREAM) or closed the connection
    before the message ended. `error_code` is the HTTP/2 error code when there was one."""

    reason = "stream_reset"

    def __init__(self, message: str, reason: str | None = None, error_code: int | None = None) -> None:
        super().__init__(message, reason)
        self.error_code = error_code


class BodyTooLarge(HttpError):
    """`read_all` met more than `limit` bytes. `data` holds what was read (the body is positioned after it),
    so a caller can still forward the body unbuffered: `prepend(err.data, body)`."""

    reason = "body_too_large"

    def __init__(self, limit: int, data: bytes) -> None:
        super().__init__(f"body is larger than the {limit} bytes that may be buffered")
        self.limit = limit
        self.data = data


class UpstreamError(HttpError):
    """A request could not be completed upstream. `response_flag` is Envoy's flag for the access log and
    metrics; `status` what the proxy answers downstream when no response has started."""

    reason = "upstream_error"
    response_flag = "-"
    status = 503


class Overflow(UpstreamError):
    """A circuit breaker (DestinationRule connectionPool) refused the request: no connection could be opened
    and the pending queue is full, or too many requests are active."""

    reason = "overflow"
    response_flag = "UO"


class ConnectFailure(UpstreamError):
    """Dialling the upstream (the HBONE tunnel to the endpoint) failed."""

    reason = "connect_failure"
    response_flag = "UF"


class UpstreamReset(UpstreamError, StreamReset):
    """The upstream connection or stream broke before the response was complete. `retryable` is True when
    the upstream provably did not process the request (HTTP/2 REFUSED_STREAM or past a GOAWAY, or an
    HTTP/1.1 connection closed before any response byte after it had been idle in the pool)."""

    reason = "upstream_reset"
    response_flag = "UC"

    def __init__(self, message: str, reason: str | None = None, error_code: int | None = None,
                 retryable: bool = False) -> None:
        StreamReset.__init__(self, message, reason, error_code)
        self.retryable = retryable
