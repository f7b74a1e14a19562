"""The xDS package's exceptions: one base with a stable `reason` (a log field and metric label).

gRPC exceptions are caught where the stream is driven (`server.py`, `client.py`) and wrapped here, so
callers never need to know grpc's exception types.
"""

from __future__ import annotations


class XdsError(Exception):
    """Base of every error this package raises; `reason` is a short stable token."""

    reason = "xds_error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class XdsProtocolError(XdsError):
    """A peer broke the delta xDS protocol (no node id, a type URL we do not serve, ...)."""

    reason = "protocol"


class XdsAuthError(XdsError):
    """The caller's `authorization`/`clusterid` metadata was missing or not accepted."""

    reason = "unauthenticated"


class ResourceRejected(XdsError):
    """A resource failed to decode or a handler refused it; the client NACKs it with this message."""

    reason = "rejected"


class XdsConnectionError(XdsError):
    """The client could not open or keep the stream to the control plane."""

    reason = "connection"
