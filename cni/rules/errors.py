"""The one exception of the rules package: every failure to install, inspect or remove redirection state."""

from __future__ import annotations

# Stable `reason` values (metric labels, log fields).
NETNS_MISSING = "netns-missing"  # the pod's network namespace path does not exist or cannot be entered
TOOL_MISSING = "tool-missing"  # iptables-restore / nft / ipset / nsenter not installed
COMMAND_FAILED = "command-failed"  # a rule tool exited non-zero
NETLINK_FAILED = "netlink-failed"  # the ip rule / table-100 route could not be read or changed
BAD_CONFIG = "bad-config"  # an interface name, pod UID or IP the caller passed is not usable
BACKEND_UNAVAILABLE = "backend-unavailable"  # neither iptables nor nftables works here


class RuleError(Exception):
    """Installing, checking or removing redirection state failed; `message` names the command and its stderr."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
