"""The routing half of §2 inside a pod netns, over netlink (pyroute2):

    ip rule add fwmark 0x111/0xfff pref 32764 lookup 100
    ip route replace local 0.0.0.0/0 dev lo table 100        (and the IPv6 twins)

Connections ztunnel answers from inside the pod carry connmark 0x111; the rule sends their packets to table
100, whose local default route delivers them to ztunnel's sockets. Every netlink call runs on a thread that
entered the pod netns (`in_netns`): pyroute2 opens its socket per thread, in that thread's namespace.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ambient.netns import NetnsError, in_netns
from cni.rules.errors import NETLINK_FAILED, NETNS_MISSING, RuleError
from cni.rules.model import ADDRESSES, FAMILIES, ROUTE_TABLE, RULE_PRIORITY, Family

T = TypeVar("T")

FWMARK = 0x111
FWMASK = 0xFFF
_AF = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
RTN_LOCAL = 2
RT_SCOPE_HOST = 254  # a `local` route must have host scope, as `ip route` sets it
_UNSUPPORTED = (errno.EAFNOSUPPORT, errno.EOPNOTSUPP)  # IPv6 disabled in this namespace/kernel


def describe_rule(family: Family) -> str:
    return f"ip {'-6 ' if family == 'ipv6' else ''}rule fwmark {FWMARK:#x}/{FWMASK:#x} lookup {ROUTE_TABLE}"


def describe_route(family: Family) -> str:
    return f"ip route local {ADDRESSES[family].any_local} dev lo table {ROUTE_TABLE}"


def _with_iproute(netns: str, what: str, fn: Callable[[IPRoute], T]) -> T:
    def work() -> T:
        with IPRoute() as ipr:
            return fn(ipr)

    try:
        return in_netns(netns, work)
    except NetnsError as e:
        raise RuleError(NETNS_MISSING, str(e)) from e
    except NetlinkError as e:
        raise RuleError(NETLINK_FAILED, f"{what} in netns {netns} failed: {e}") from e


def _ours_rule(rule: Any) -> bool:
    return bool(rule.get("priority") == RULE_PRIORITY and rule.get("fwmark") == FWMARK
                and rule.get("fwmask") == FWMASK and rule.get("table") == ROUTE_TABLE)


def _our_routes(ipr: IPRoute, af: int, lo: int) -> list[Any]:
    try:
        routes = ipr.get_routes(family=af, table=ROUTE_TABLE)
    except NetlinkError as e:
        if e.code == errno.ENOENT:  # "FIB table does not exist": nobody made table 100 yet
            return []
        raise
    return [r for r in routes if r.get("table") == ROUTE_TABLE and r["dst_len"] == 0
            and r["type"] == RTN_LOCAL and r.get("oif") == lo]


def _loopback(ipr: IPRoute) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise RuleError(NETLINK_FAILED, "the namespace has no loopback interface")
    return int(found[0])


def ensure(netns: str, families: Sequence[Family]) -> None:
    """Add what is missing; an existing rule or route is left alone (idempotent)."""

    def work(ipr: IPRoute) -> None:
        lo = _loopback(ipr)
        for family in families:
            af = _AF[family]
            ipr.route("replace", family=af, dst=ADDRESSES[family].any_local, type="local", scope=RT_SCOPE_HOST,
                      oif=lo, table=ROUTE_TABLE)
            if not any(_ours_rule(r) for r in ipr.get_rules(family=af)):
                ipr.rule("add", family=af, fwmark=FWMARK, fwmask=FWMASK, priority=RULE_PRIORITY, table=ROUTE_TABLE)

    _with_iproute(netns, "adding the table-100 rule and route", work)


def remove(netns: str) -> None:
    """Delete our rule and route in both families, wherever present."""

    def work(ipr: IPRoute) -> None:
        lo = _loopback(ipr)
        for family in FAMILIES:
            af = _AF[family]
            try:
                rules = [r for r in ipr.get_rules(family=af) if _ours_rule(r)]
                routes = _our_routes(ipr, af, lo)
            except NetlinkError as e:
                if e.code in _UNSUPPORTED:
                    continue
                raise
            for _ in rules:
                ipr.rule("del", family=af, fwmark=FWMARK, fwmask=FWMASK, priority=RULE_PRIORITY, table=ROUTE_TABLE)
            for _ in routes:
                ipr.route("del", family=af, dst=ADDRESSES[family].any_local, type="local", scope=RT_SCOPE_HOST,
                          oif=lo, table=ROUTE_TABLE)

    _with_iproute(netns, "removing the table-100 rule and route", work)


def verify(netns: str, families: Sequence[Family]) -> list[str]:
    def work(ipr: IPRoute) -> list[str]:
        lo = _loopback(ipr)
        drift: list[str] = []
        for family in families:
            af = _AF[family]
            if not any(_ours_rule(r) for r in ipr.get_rules(family=af)):
                drift.append(f"{describe_rule(family)} missing")
            if not _our_routes(ipr, af, lo):
                drift.append(f"{describe_route(family)} missing")
        return drift

    return _with_iproute(netns, "reading the table-100 rule and route", work)
