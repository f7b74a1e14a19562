"""Retry decisions as a table (Envoy's retry_on), Istio's defaults, attempt limits, budget and back-off."""

from __future__ import annotations

import random

import pytest

from waypoint.routing.model import DEFAULT_RETRY_POLICY, RetryPolicy
from waypoint.routing.virtualservice import parse_retry_on
from waypoint.upstream.retry import RetryBudget, RetryDecision, RetryState, backoff


def policy(retry_on: str | None = "5xx", attempts: int = 3, **more: object) -> RetryPolicy:
    """What the VirtualService parser makes of `retries: {attempts, retryOn}` (None: retryOn unset)."""
    names, codes = parse_retry_on(retry_on, "retryOn")
    return RetryPolicy(attempts, retry_on=names, retriable_status_codes=codes, **more)  # type: ignore[arg-type]


def state(retry_on: str | None, attempts: int = 3) -> RetryState:
    return RetryState(policy(retry_on, attempts))


# --- what each policy retries ------------------------------------------------------------------------------

# (retryOn, status, reset, connect_failure, refused_stream, grpc_status, retried?)
TABLE = [
    ("5xx", 500, False, False, False, None, True),
    ("5xx", 503, False, False, False, None, True),
    ("5xx", 404, False, False, False, None, False),
    ("5xx", None, True, False, False, None, True),
    ("5xx", None, False, True, False, None, True),
    ("5xx", None, True, False, True, None, True),
    ("gateway-error", 500, False, False, False, None, False),
    ("gateway-error", 502, False, False, False, None, True),
    ("gateway-error", 504, False, False, False, None, True),
    ("gateway-error", None, True, False, False, None, True),
    ("gateway-error", None, False, True, False, None, True),
    ("reset", 503, False, False, False, None, False),
    ("reset", None, True, False, False, None, True),
    ("reset", None, False, True, False, None, True),
    ("connect-failure", None, False, True, False, None, True),
    ("connect-failure", None, True, False, False, None, False),
    ("connect-failure", 503, False, False, False, None, False),
    ("refused-stream", None, True, False, True, None, True),
    ("refused-stream", None, True, False, False, None, False),
    ("refused-stream", None, False, True, False, None, False),
    ("retriable-4xx", 409, False, False, False, None, True),
    ("retriable-4xx", 404, False, False, False, None, False),
    ("retriable-status-codes", 503, False, False, False, None, False),   # no codes listed
    ("retriable-status-codes,503", 503, False, False, False, None, True),
    ("5xx,409", 409, False, False, False, None, True),
    ("429", 429, False, False, False, None, True),
    ("429", 503, False, False, False, None, False),
    ("unavailable", 200, False, False, False, 14, True),
    ("unavailable", 200, False, False, False, 2, False),
    ("cancelled", 200, False, False, False, 1, True),
    ("deadline-exceeded", 200, False, False, False, 4, True),
    ("resource-exhausted", 200, False, False, False, 8, True),
    ("internal", 200, False, False, False, 13, True),
    ("unavailable", 200, False, False, False, None, False),
    ("envoy-ratelimited,retriable-headers", 503, False, False, False, None, False),
    # Istio's default (no retryOn): connect-failure, refused-stream, unavailable, cancelled, 503.
    (None, 503, False, False, False, None, True),
    (None, 500, False, False, False, None, False),
    (None, 502, False, False, False, None, False),
    (None, None, False, True, False, None, True),
    (None, None, True, False, True, None, True),
    (None, None, True, False, False, None, False),
    (None, 200, False, False, False, 14, True),
    (None, 200, False, False, False, 1, True),
    (None, 200, False, False, False, 4, False),
]


@pytest.mark.parametrize(("retry_on", "status", "reset", "connect_failure", "refused", "grpc", "retried"), TABLE)
def test_retry_on_semantics(retry_on: str | None, status: int | None, reset: bool, connect_failure: bool,
                            refused: bool, grpc: int | None, retried: bool) -> None:
    decision = state(retry_on).should_retry(status, reset, connect_failure, 1, refused_stream=refused,
                                            grpc_status=grpc)
    assert decision is retried


def test_reset_before_request_only_when_nothing_was_sent() -> None:
    retry = state("reset-before-request")
    assert retry.should_retry(None, True, False, 1, request_sent=False)
    assert not retry.should_retry(None, True, False, 1, request_sent=True)
    assert retry.should_retry(None, False, True, 1)                       # a connect failure sent nothing
    assert not retry.should_retry(503, False, False, 1)


# --- attempts, budget, Istio's default policy ---------------------------------------------------------------

def test_attempts_count_retries_then_the_limit_is_reported() -> None:
    retry = state("5xx", attempts=2)
    assert [retry.decide(503, attempt=n) for n in (1, 2, 3)] == [
        RetryDecision.RETRY, RetryDecision.RETRY, RetryDecision.LIMIT_EXCEEDED]
    assert retry.decide(200, attempt=3) is RetryDecision.NO


def test_budget_caps_concurrent_retries_per_cluster() -> None:
    budget = RetryBudget(max_active=1)
    first = RetryState(policy("5xx"), budget)
    second = RetryState(policy("5xx"), budget)
    assert first.decide(503) is RetryDecision.RETRY
    assert second.decide(503) is RetryDecision.OVERFLOW
    assert budget.overflows == 1
    # The retried try answered: the slot is released when the next decision is taken.
    assert first.decide(200, attempt=2) is RetryDecision.NO
    assert second.decide(503) is RetryDecision.RETRY
    second.close()
    assert budget.active == 0


def test_unlimited_budget_by_default() -> None:
    budget = RetryBudget()
    states = [RetryState(policy("5xx"), budget) for _ in range(1000)]
    assert all(s.decide(503) is RetryDecision.RETRY for s in states)
    assert budget.active == 1000


def test_istios_default_policy() -> None:
    """A route without `retries` gets it: 2 retries on connect-failure, refused-stream, unavailable, cancelled
    and 503 (Istio's DefaultPolicy), the same as `retries` with attempts and no retryOn."""
    assert DEFAULT_RETRY_POLICY.attempts == 2
    assert policy(None, attempts=2) == DEFAULT_RETRY_POLICY
    assert policy(None).retriable_status_codes == frozenset({503})
    assert RetryState(policy("5xx", per_try_timeout=2.0)).per_try_timeout == 2.0


# --- back-off -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)])
def test_backoff_is_fully_jittered_exponential_with_envoys_defaults(attempt: int, ceiling: float) -> None:
    rng = random.Random(5)
    samples = [backoff(attempt, rng) for _ in range(2000)]
    assert all(0 <= s < ceiling for s in samples)
    assert max(samples) > 0.95 * ceiling and min(samples) < 0.05 * ceiling


def test_policy_backoff_base_interval() -> None:
    retry = RetryState(policy("5xx", backoff=0.1))
    samples = [retry.backoff(1, random.Random(i)) for i in range(500)]
    assert max(samples) < 0.1 and max(samples) > 0.09


def test_codes_apart_and_the_previous_hosts_flag() -> None:
    retry = RetryState(RetryPolicy(2, None, frozenset({"retriable-status-codes"}), frozenset({503}),
                                   ignore_previous_hosts=False))
    assert retry.should_retry(503, False, False, 1)
    assert not retry.should_retry(500, False, False, 1)
    assert not retry.prefer_other_hosts
    assert state("5xx").prefer_other_hosts
    # Codes alone (an HTTPRoute's `retry.codes`) imply `retriable-status-codes`.
    assert RetryState(RetryPolicy(3, retry_on=frozenset({"gateway-error"}),
                                  retriable_status_codes=frozenset({409}))).should_retry(409, False, False, 3)
