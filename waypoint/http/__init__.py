"""The waypoint's HTTP layer: message model, HTTP/1.1 and HTTP/2 codecs over a `ByteStream` (TCP or an
HBONE tunnel), protocol detection and upstream connection pools with circuit breaking.

Nothing here knows about routing, policy or HBONE itself: a `ByteStream` comes in (server side) or a
dialer produces one (pool side).
"""

from waypoint.http.detect import detect, sniff
from waypoint.http.errors import (
    BodyTooLarge,
    ConnectFailure,
    HttpError,
    Overflow,
    ProtocolError,
    StreamReset,
    UpstreamError,
    UpstreamReset,
)
from waypoint.http.http1 import Http1ClientConnection, serve_http1
from waypoint.http.http2 import Http2ClientConnection, serve_http2
from waypoint.http.message import (
    EMPTY,
    Body,
    ByteStream,
    Handler,
    Headers,
    HttpLimits,
    RequestHead,
    ResponseHead,
    TcpByteStream,
    bytes_body,
    prepend,
    read_all,
)
from waypoint.http.pool import ClusterLimits, ConnectionPoolLimits, UpstreamPool

__all__ = ["EMPTY", "Body", "BodyTooLarge", "ByteStream", "ClusterLimits", "ConnectFailure", "ConnectionPoolLimits",
           "Handler", "Headers", "Http1ClientConnection", "Http2ClientConnection", "HttpError", "HttpLimits",
           "Overflow", "ProtocolError", "RequestHead", "ResponseHead", "StreamReset", "TcpByteStream",
           "UpstreamError", "UpstreamPool", "UpstreamReset", "bytes_body", "detect",
           "prepend", "read_all", "serve_http1", "serve_http2", "sniff"]
