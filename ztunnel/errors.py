"""ztunnel's errors: one small hierarchy, each class with a stable `reason` for metrics labels and log fields.

Messages keep Istio ztunnel's wording where users grep for it ("attempted recursive call to ourselves",
"explicitly denied by: <ns>/<name>", "allow policies exist, but none allowed", "no healthy upstream: ...").
Third-party failures (ssl, h2, sockets) are wrapped at the boundary that meets them, not here.
"""

from __future__ import annotations


class ZtunnelError(Exception):
    """Base of ztunnel's errors."""

    reason = "ztunnel_error"


class ConfigError(ZtunnelError):
    """A flag, environment variable or file the user gave is wrong; the message says how to fix it."""

    reason = "bad_config"


class OutboundError(ZtunnelError):
    """A captured outbound connection cannot be routed (PROTOCOLS.md §7)."""

    reason = "outbound_error"


class SelfCall(OutboundError):
    """The destination is one of ztunnel's own ports on loopback: serving it would loop forever."""

    reason = "self_call"

    def __init__(self) -> None:
        super().__init__("attempted recursive call to ourselves")


class NoHealthyUpstream(OutboundError):
    """A known service has no endpoint to send this connection to; fail fast rather than pass through."""

    reason = "no_healthy_upstream"

    def __init__(self, target: str, why: str = "") -> None:
        super().__init__(f"no healthy upstream: {target}" + (f" ({why})" if why else ""))


class UnknownWaypoint(OutboundError):
    """The destination names a waypoint the workload store does not know (or that has no usable pod)."""

    reason = "unknown_waypoint"

    def __init__(self, detail: str) -> None:
        super().__init__(f"unknown waypoint: {detail}")


class AuthorizationDenied(ZtunnelError):
    """Inbound L4 authorization rejected the connection (PROTOCOLS.md §5.3): 401 on HBONE, close on 15006."""

    reason = "authorization_denied"


class ExplicitlyDenied(AuthorizationDenied):
    """A DENY policy matched."""

    reason = "explicitly_denied"

    def __init__(self, policy: str) -> None:
        self.policy = policy
        super().__init__(f"explicitly denied by: {policy}")


class NotAllowed(AuthorizationDenied):
    """ALLOW policies apply to the destination and none of them matched."""

    reason = "not_allowed"

    def __init__(self) -> None:
        super().__init__("allow policies exist, but none allowed")
