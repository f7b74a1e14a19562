"""The HBONE package's exceptions: one base with a stable `reason` (a log field and metric label).

ssl, OSError and h2 exceptions are caught where the connection is driven (`client.py`, `server.py`,
`connection.py`) and wrapped here, so callers handle one hierarchy. Messages say what to check.
"""

from __future__ import annotations

from http import HTTPStatus

# Reasons of a refused CONNECT, by status (PROTOCOLS.md §6).
STATUS_REASONS = {400: "bad_request", 401: "unauthorized", 503: "unreachable"}


class HboneError(Exception):
    """Base of every error this package raises. `reason` is a short stable token; `status` is the HTTP
    status the peer answered (for refused CONNECTs), else None."""

    reason = "hbone_error"

    def __init__(self, message: str, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.status = status


class ConnectError(HboneError):
    """The HBONE connection could not be established: TCP, TLS, ALPN or the peer's identity.
    Reasons: `connect_refused`, `connect_timeout`, `connect_failed`, `tls_handshake`, `alpn`,
    `identity_mismatch`, `untrusted_peer`."""

    reason = "connect_failed"


class ConnectRejected(HboneError):
    """The server answered the CONNECT with a status other than 200 (`status` holds it)."""

    reason = "rejected"

    def __init__(self, status: int, authority: str, peer: str) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "unknown status"
        hint = {400: "the destination does not accept this authority (wrong pod IP or malformed)",
                401: "an authorization policy at the destination denied the connection",
                503: "the destination could not reach the target port (is the application listening?)"}
        super().__init__(f"CONNECT {authority} via {peer}: http status: {status} {phrase}"
                         + (f"; {hint[status]}" if status in hint else ""),
                         STATUS_REASONS.get(status, f"http_{status}"), status)


class StreamError(HboneError):
    """A tunnel broke after it was set up: the peer reset the stream, the connection was lost, a keepalive
    PING went unanswered, or the stream was used after it was closed. `retryable` is True when the server
    never processed the stream (refused or above a GOAWAY's last stream id), so it is safe to retry on
    another connection. Reasons: `stream_reset`, `connection_closed`, `ping_timeout`, `protocol_error`,
    `stream_closed`, `refused`, `goaway`."""

    reason = "stream_error"

    def __init__(self, message: str, reason: str | None = None, retryable: bool = False) -> None:
        super().__init__(message, reason)
        self.retryable = retryable


class InvalidRequest(HboneError, ValueError):
    """A CONNECT request or header the caller built is not valid (bad authority, forbidden header)."""

    reason = "invalid_request"
