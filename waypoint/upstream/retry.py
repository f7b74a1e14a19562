"""Retry decisions for one request (VirtualService `retries`), with Envoy's `retry_on` semantics.

Istio's translation, which this follows:
- The routing model (waypoint/routing) gives every route its policy: Istio's default when a route has no
  `retries` (2 retries on `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`
  with retriable status 503), None when `attempts: 0` disables them. `attempts` counts *retries*, so
  `attempts: 3` allows 4 tries in all.
- In `retryOn`, numbers are status codes: "5xx,409" means 5xx or 409 (Istio moves them to Envoy's
  `retriable_status_codes` and adds `retriable-status-codes`); the routing parser checks the names.

What each policy retries (Envoy's router):
- `5xx`: any 5xx, and any reset, connect failure or per-try timeout (no response at all).
- `gateway-error`: 502, 503, 504, and likewise any reset, connect failure or per-try timeout.
- `reset`: any reset, connect failure or per-try timeout. `reset-before-request`: only when nothing of
  the request was sent upstream yet. `connect-failure`: connect failures. `refused-stream`: an HTTP/2
  REFUSED_STREAM reset. `retriable-4xx`: 409. `retriable-status-codes`: the listed codes.
- gRPC `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`: the
  `grpc-status` of a trailers-only response (1, 4, 13, 8, 14) — the caller passes it as `grpc_status`.
- `envoy-ratelimited`, `retriable-headers` and `http3-post-connect-failure` are accepted and never match
  (Istio has no field for the headers to match; we set no x-envoy-ratelimited; no HTTP/3).

The caller passes a per-try timeout as `reset=True` (Envoy treats it as a local reset). Circuit-breaker
overflow (`UO`) is never retried: do not ask. Retries wait `backoff(n)` first: fully jittered
exponential, uniform in [0, min(25 ms * 2^(n-1), 250 ms)) as Envoy's back-off strategy computes it.
"""

from __future__ import annotations

import enum
import functools
import random

from waypoint.routing.model import RetryPolicy

# Envoy's defaults: 25 ms base interval, cap at 10 * base.
DEFAULT_BASE_INTERVAL = 0.025
MAX_INTERVAL_FACTOR = 10

GRPC_POLICIES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13,
                 "unavailable": 14}
GATEWAY_ERRORS = frozenset({502, 503, 504})
RETRIABLE_4XX = frozenset({409})
RESET_POLICIES = frozenset({"5xx", "gateway-error", "reset"})


@functools.lru_cache(maxsize=256)
def _conditions(policy: RetryPolicy) -> tuple[frozenset[str], frozenset[int]]:
    """A policy's named conditions and status codes, worked out once per policy rather than per request.
    Listed codes always come with `retriable-status-codes` in Istio's translation."""
    codes = policy.retriable_status_codes
    return (policy.retry_on | {"retriable-status-codes"} if codes else policy.retry_on), codes


class RetryBudget:
    """Concurrent retries allowed to one cluster (`connectionPool.http.maxRetries`; Istio's default is
    unlimited: it raises Envoy's default of 3 to 2^32-1). A retry holds a slot from when it is decided
    until the retried try ends."""

    def __init__(self, max_active: int | None = None) -> None:
        self.max_active = max_active
        self.active = 0
        self.overflows = 0

    def try_acquire(self) -> bool:
        if self.max_active is not None and self.active >= self.max_active:
            self.overflows += 1
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)


class RetryDecision(enum.Enum):
    RETRY = "retry"
    NO = "no"                          # not a retriable outcome: hand the response (or error) back
    LIMIT_EXCEEDED = "limit_exceeded"  # retriable but out of attempts: response flag URX
    OVERFLOW = "overflow"              # retriable but the cluster's retry budget is spent


class RetryState:
    """The retry bookkeeping of one request. Call `decide` after every failed or retriable try; call
    `close` when the request is done (releases the budget slot of the last retry)."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None = None) -> None:
        self.attempts = max(0, policy.attempts)
        self.per_try_timeout = policy.per_try_timeout
        self.policies, self.status_codes = _conditions(policy)
        # Whether a retry should avoid the endpoints already tried (Envoy's previous_hosts predicate).
        self.prefer_other_hosts = policy.ignore_previous_hosts
        self.base_interval = policy.backoff or DEFAULT_BASE_INTERVAL
        self._budget = budget
        self._holding = False

    def retriable(self, status: int | None, reset: bool = False, connect_failure: bool = False, *,
                  refused_stream: bool = False, grpc_status: int | None = None,
                  request_sent: bool = True) -> bool:
        """Whether this outcome matches the policy's conditions (attempts and budget aside)."""
        policies = self.policies
        if connect_failure or refused_stream or reset or status is None:
            if connect_failure and "connect-failure" in policies:
                return True
            if refused_stream and "refused-stream" in policies:
                return True
            if "reset-before-request" in policies and (connect_failure or not request_sent):
                return True
            return bool(policies & RESET_POLICIES)
        if "5xx" in policies and 500 <= status <= 599:
            return True
        if "gateway-error" in policies and status in GATEWAY_ERRORS:
            return True
        if "retriable-4xx" in policies and status in RETRIABLE_4XX:
            return True
        if "retriable-status-codes" in policies and status in self.status_codes:
            return True
        return grpc_status is not None and any(
            GRPC_POLICIES.get(policy) == grpc_status for policy in policies)

    def decide(self, status: int | None, reset: bool = False, connect_failure: bool = False,
               attempt: int = 1, *, refused_stream: bool = False, grpc_status: int | None = None,
               request_sent: bool = True) -> RetryDecision:
        """After try number `attempt` (1 = the first try) ended with `status` (None: no response) or a
        reset / connect failure: retry, or why not."""
        self._release()
        if not self.retriable(status, reset, connect_failure, refused_stream=refused_stream,
                              grpc_status=grpc_status, request_sent=request_sent):
            return RetryDecision.NO
        if attempt > self.attempts:
            return RetryDecision.LIMIT_EXCEEDED
        if self._budget is not None:
            if not self._budget.try_acquire():
                return RetryDecision.OVERFLOW
            self._holding = True
        return RetryDecision.RETRY

    def should_retry(self, status: int | None, reset: bool = False, connect_failure: bool = False,
                     attempt: int = 1, *, refused_stream: bool = False, grpc_status: int | None = None,
                     request_sent: bool = True) -> bool:
        return self.decide(status, reset, connect_failure, attempt, refused_stream=refused_stream,
                           grpc_status=grpc_status, request_sent=request_sent) is RetryDecision.RETRY

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (1 = the first retry)."""
        return backoff(attempt, rng, self.base_interval)

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._holding and self._budget is not None:
            self._budget.release()
        self._holding = False


def backoff(attempt: int, rng: random.Random, base_interval: float = DEFAULT_BASE_INTERVAL,
            max_interval: float | None = None) -> float:
    """Envoy's fully jittered exponential back-off before retry number `attempt` (1-based): uniform in
    [0, min(base * 2^(attempt-1), max)), max defaulting to 10 * base (25 ms → 250 ms)."""
    cap = base_interval * MAX_INTERVAL_FACTOR if max_interval is None else max_interval
    ceiling = min(base_interval * (1 << min(max(attempt, 1) - 1, 32)), cap)
    return rng.random() * ceiling
