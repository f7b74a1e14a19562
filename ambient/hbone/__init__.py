"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS with SPIFFE identities (PROTOCOLS.md §6).

Used by ztunnel (client and server) and by the waypoint; nothing here knows about either. See README.md.
"""

from ambient.hbone.client import HboneClient, PoolKey
from ambient.hbone.connection import HboneConfig
from ambient.hbone.errors import ConnectError, ConnectRejected, HboneError, InvalidRequest, StreamError
from ambient.hbone.headers import HBONE_PORT, format_authority, forwarded_for, new_traceparent, parse_authority
from ambient.hbone.server import ConnectRequest, HboneServer
from ambient.hbone.stream import HboneStream

__all__ = ["HBONE_PORT", "ConnectError", "ConnectRejected", "ConnectRequest", "HboneClient", "HboneConfig",
           "HboneError", "HboneServer", "HboneStream", "InvalidRequest", "PoolKey", "StreamError",
           "format_authority", "forwarded_for", "new_traceparent", "parse_authority"]
