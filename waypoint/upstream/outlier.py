"""Outlier detection for one upstream cluster (DestinationRule `outlierDetection`), Envoy's semantics.

Passive only: the caller reports each request's result with `record(uid, status)`; nothing here probes.
- Counters per endpoint: consecutive 5xx, and consecutive gateway errors (502, 503, 504). A connect
  failure, reset or timeout (`status=None`) counts as both, as Envoy does when local-origin errors are not
  split (Istio never splits them). Any non-5xx answer resets both; a 500 resets the gateway counter.
- Ejection is eager: the response that brings a counter to its threshold ejects the endpoint, unless
  that would push the ejected share of the cluster above `max_ejection_percent` (then the counter is
  reset and nothing happens). Envoy only ever ejects past that limit with `always_eject_one_host`, which
  Istio does not set — so with the default 10 %, clusters of fewer than 10 endpoints eject nothing;
  Istio's tutorials set `maxEjectionPercent: 100`.
- An ejection lasts `base_ejection_time * backoff`, where backoff counts up by one per ejection and down
  by one per `interval` spent healthy afterwards, capped at `max(300 s, base_ejection_time)`. Endpoints
  return only on `sweep`, which the caller runs every `interval` (so the real ejection time is rounded
  up to the next sweep, as in Envoy).
- `min_health_percent` (Envoy's panic threshold; Istio's default 0 = disabled): when fewer than that
  share of the endpoints are un-ejected, ejections are ignored and every endpoint takes traffic.

Sans-IO: time comes from the injected `clock` (seconds, monotonic) or the `now` argument.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from waypoint.upstream.endpoints import Endpoint

# Defaults are Envoy's where Istio leaves a field unset (it passes only the fields the user gave).
DEFAULT_CONSECUTIVE_5XX = 5          # Envoy enforces this detector at 100 % by default
DEFAULT_CONSECUTIVE_GATEWAY_ERRORS = 0   # Envoy counts them but enforces at 0 %: off unless configured
DEFAULT_INTERVAL = 10.0
DEFAULT_BASE_EJECTION_TIME = 30.0
DEFAULT_MAX_EJECTION_PERCENT = 10
DEFAULT_MIN_HEALTH_PERCENT = 0       # Istio's default: "not typically applicable in k8s"
DEFAULT_MAX_EJECTION_TIME = 300.0    # Envoy's cap on base * backoff (raised to base if base is larger)
GATEWAY_ERRORS = frozenset({502, 503, 504})
LOCAL_FAILURE_STATUS = 503           # what a connect failure/reset counts as (Envoy's mapping)

Clock = Callable[[], float]


class OutlierSettings(Protocol):
    """What we read from the routing model's outlier settings; None means "not set" (default above).
    Durations are seconds; a threshold of 0 disables that detector."""

    @property
    def consecutive_5xx(self) -> int | None: ...
    @property
    def consecutive_gateway_errors(self) -> int | None: ...
    @property
    def interval(self) -> float | None: ...
    @property
    def base_ejection_time(self) -> float | None: ...
    @property
    def max_ejection_percent(self) -> int | None: ...
    @property
    def min_health_percent(self) -> int | None: ...


@dataclass
class _Host:
    consecutive_5xx: int = 0
    consecutive_gateway_errors: int = 0
    ejected_at: float | None = None
    ejections: int = 0                  # lifetime count, for config_dump
    backoff: int = 0                    # multiplier of base_ejection_time for the next/current ejection
    unejected_at: float | None = None


@dataclass(frozen=True)
class UsableHosts:
    """The endpoints a balancer may pick from, and whether that is the panic set (all of them)."""

    hosts: tuple[Endpoint, ...]
    panic: bool = False


class OutlierDetector:
    def __init__(self, settings: OutlierSettings, clock: Clock = time.monotonic) -> None:
        self.consecutive_5xx = _setting(settings, "consecutive_5xx", DEFAULT_CONSECUTIVE_5XX)
        self.consecutive_gateway_errors = _setting(settings, "consecutive_gateway_errors",
                                                   DEFAULT_CONSECUTIVE_GATEWAY_ERRORS)
        self.interval = float(_setting(settings, "interval", DEFAULT_INTERVAL)) or DEFAULT_INTERVAL
        self.base_ejection_time = float(_setting(settings, "base_ejection_time", DEFAULT_BASE_EJECTION_TIME))
        self.max_ejection_percent = min(100, _setting(settings, "max_ejection_percent",
                                                      DEFAULT_MAX_EJECTION_PERCENT))
        self.min_health_percent = _setting(settings, "min_health_percent", DEFAULT_MIN_HEALTH_PERCENT)
        self.max_ejection_time = max(DEFAULT_MAX_EJECTION_TIME, self.base_ejection_time)
        self._clock = clock
        self._hosts: dict[str, _Host] = {}
        self.ejections_overflow = 0     # ejections refused by max_ejection_percent

    # --- the cluster's membership ---------------------------------------------------------------------

    def set_hosts(self, uids: Iterable[str]) -> None:
        """The cluster's current endpoints (the denominator of max_ejection_percent). Endpoints that left
        lose their state, as in Envoy; new ones start clean."""
        current = set(uids)
        for gone in self._hosts.keys() - current:
            del self._hosts[gone]
        for uid in current:
            self._hosts.setdefault(uid, _Host())

    def select(self, endpoints: Sequence[Endpoint]) -> UsableHosts:
        """`endpoints` (the healthy ones) become the cluster; returns those not ejected, or all of them
        in panic (fewer than min_health_percent not ejected)."""
        if {e.uid for e in endpoints} != self._hosts.keys():
            self.set_hosts(e.uid for e in endpoints)
        available = tuple(e for e in endpoints if self._hosts[e.uid].ejected_at is None)
        if endpoints and 100 * len(available) < self.min_health_percent * len(endpoints):
            return UsableHosts(tuple(endpoints), panic=True)
        return UsableHosts(available)

    # --- results ----------------------------------------------------------------------------------------

    def record(self, uid: str, status: int | None) -> bool:
        """One request's outcome on endpoint `uid`: its HTTP status, or None for a connect failure, reset
        or timeout. Returns True when this result ejected the endpoint."""
        host = self._hosts.setdefault(uid, _Host())
        code = LOCAL_FAILURE_STATUS if status is None else status
        if not 500 <= code <= 599:
            host.consecutive_5xx = host.consecutive_gateway_errors = 0
            return False
        if code in GATEWAY_ERRORS:
            host.consecutive_gateway_errors += 1
        else:
            host.consecutive_gateway_errors = 0
        host.consecutive_5xx += 1
        ejected = False
        if self.consecutive_gateway_errors and host.consecutive_gateway_errors >= self.consecutive_gateway_errors \
                and host.ejected_at is None:
            ejected = self._eject(host)
            host.consecutive_gateway_errors = 0
        if self.consecutive_5xx and host.consecutive_5xx >= self.consecutive_5xx and host.ejected_at is None:
            ejected = self._eject(host)
            host.consecutive_5xx = 0
        return ejected

    def _eject(self, host: _Host) -> bool:
        ejected_now = sum(1 for h in self._hosts.values() if h.ejected_at is not None)
        if 100 * (ejected_now + 1) > self.max_ejection_percent * len(self._hosts):
            self.ejections_overflow += 1
            return False
        host.ejected_at = self._clock()
        host.ejections += 1
        if host.backoff * self.base_ejection_time < self.max_ejection_time + self.base_ejection_time:
            host.backoff += 1
        return True

    def ejected(self, uid: str) -> bool:
        host = self._hosts.get(uid)
        return host is not None and host.ejected_at is not None

    # --- the interval timer -----------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> list[str]:
        """Run every `interval`: return endpoints whose ejection time is over (they are listed) and decay
        the backoff of endpoints that stayed healthy for an interval since they came back."""
        now = self._clock() if now is None else now
        returned = []
        for uid, host in self._hosts.items():
            if host.ejected_at is None:
                if host.unejected_at is not None and now - host.unejected_at >= self.interval \
                        and host.backoff > 0:
                    host.backoff -= 1
                continue
            if min(self.base_ejection_time * host.backoff, self.max_ejection_time) <= now - host.ejected_at:
                host.ejected_at = None
                host.unejected_at = now
                # Start counting afresh, or a counter sitting near its threshold would re-eject at once.
                host.consecutive_5xx = host.consecutive_gateway_errors = 0
                returned.append(uid)
        return sorted(returned)

    # --- admin ------------------------------------------------------------------------------------------

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """For /config_dump: the effective settings and every endpoint's counters and ejection."""
        now = self._clock() if now is None else now
        hosts: dict[str, Any] = {}
        for uid, host in sorted(self._hosts.items()):
            entry: dict[str, Any] = {
                "consecutive_5xx": host.consecutive_5xx,
                "consecutive_gateway_errors": host.consecutive_gateway_errors,
                "ejections": host.ejections,
                "ejected": host.ejected_at is not None,
            }
            if host.ejected_at is not None:
                duration = min(self.base_ejection_time * host.backoff, self.max_ejection_time)
                entry["ejected_for_seconds"] = round(now - host.ejected_at, 3)
                entry["returns_after_seconds"] = round(max(0.0, host.ejected_at + duration - now), 3)
            hosts[uid] = entry
        return {
            "settings": {
                "consecutive_5xx": self.consecutive_5xx,
                "consecutive_gateway_errors": self.consecutive_gateway_errors,
                "interval": self.interval,
                "base_ejection_time": self.base_ejection_time,
                "max_ejection_percent": self.max_ejection_percent,
                "min_health_percent": self.min_health_percent,
            },
            "ejections_overflow": self.ejections_overflow,
            "hosts": hosts,
        }


def usable_hosts(endpoints: Sequence[Endpoint], detector: OutlierDetector | None = None) -> UsableHosts:
    """The endpoints a request may go to: healthy ones (unhealthy workloads never take traffic — Istio
    does not even send them to Envoy), minus ejected ones when the cluster has outlier detection."""
    healthy = [e for e in endpoints if e.healthy]
    if detector is None:
        return UsableHosts(tuple(healthy))
    return detector.select(healthy)


def _setting(settings: object, name: str, default: int | float) -> Any:
    value = getattr(settings, name, None)
    return default if value is None else max(0, value)
