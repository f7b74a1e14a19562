"""DestinationRule connectionPool settings → pool limits (None = Istio's unlimited)."""

from __future__ import annotations

from waypoint.http.pool import UNLIMITED, ConnectionPoolLimits
from waypoint.routing.model import ConnectionPoolSettings


def test_limits_from_a_destination_rule() -> None:
    limits = ConnectionPoolLimits.from_policy(ConnectionPoolSettings(
        max_connections=1, http1_max_pending_requests=1, max_requests_per_connection=10, connect_timeout=2.5,
        idle_timeout=30.0))
    assert limits == ConnectionPoolLimits(max_connections=1, http1_max_pending_requests=1,
                                          http2_max_requests=UNLIMITED, max_requests_per_connection=10,
                                          idle_timeout=30.0, connect_timeout=2.5)


def test_unset_settings_are_istios_defaults() -> None:
    limits = ConnectionPoolLimits.from_policy(ConnectionPoolSettings())
    assert (limits.max_connections, limits.http1_max_pending_requests, limits.http2_max_requests,
            limits.max_requests_per_connection) == (2**32 - 1, 2**32 - 1, 2**32 - 1, 0)
