"""L7 routing configuration of the waypoint: VirtualService, HTTPRoute and DestinationRule compiled into
frozen per-(service, port) route tables and per-destination policies, with a ConfigError for every
piece rejected. Sans-IO and pure: the proxy feeds CRD dicts and a service lookup in, reads tables out.

Start at `table.ConfigIndex` (build) and `match.select` (per request); `README.md` lists every
supported and unsupported field.
"""

from __future__ import annotations

from waypoint.routing.match import redirect_location, rewritten_path, select, select_with_match, shadow_authority
from waypoint.routing.model import ConfigError, DestinationPolicy, Route, RouteTable, ServiceRef
from waypoint.routing.table import ConfigIndex

__all__ = [
    "ConfigError",
    "ConfigIndex",
    "DestinationPolicy",
    "Route",
    "RouteTable",
    "ServiceRef",
    "redirect_location",
    "rewritten_path",
    "select",
    "select_with_match",
    "shadow_authority",
]
