"""The control plane's work queue: keys reconciled once per pass, failures retried with backoff and logged
once rather than on every attempt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from ambient.control.workqueue import WorkQueue
from ambient.kube.errors import ApiError

log = logging.getLogger("test.workqueue")
WAIT = 2.0  # seconds any expectation may take


@contextlib.asynccontextmanager
async def running(queue: WorkQueue[str]) -> AsyncIterator[WorkQueue[str]]:
    task = asyncio.create_task(queue.run())
    try:
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


async def test_a_burst_of_adds_is_one_reconcile_per_key_in_order() -> None:
    seen: list[str] = []

    async def reconcile(key: str) -> None:
        seen.append(key)

    queue = WorkQueue("thing", reconcile, log, debounce=0.02)
    async with running(queue):
        for key in ("b", "a", "b", "b", "a"):
            queue.add(key)
        await until(lambda: len(seen) >= 2, "both keys reconciled")
        await asyncio.sleep(0.05)  # nothing more arrives for keys added only before the pass
    assert seen == ["b", "a"]


async def test_a_failing_key_is_retried_until_it_succeeds_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[str] = []

    async def reconcile(key: str) -> None:
        attempts.append(key)
        if len(attempts) < 5:
            raise ApiError(403, 'configmaps is forbidden: cannot create resource "configmaps"')

    queue = WorkQueue("ConfigMap in", reconcile, log, debounce=0, retry_min=0.001, retry_max=0.01)
    with caplog.at_level(logging.INFO, logger="test.workqueue"):
        async with running(queue):
            queue.add("shop")
            await until(lambda: len(attempts) >= 5 and not queue.failing(), "recovered")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "ConfigMap in shop" in warnings[0].getMessage() and "Forbidden" in warnings[0].getMessage()
    assert warnings[0].exc_info is None  # an API error is expected: no traceback
    assert any("succeeded after 4 failed attempt(s)" in r.getMessage() for r in caplog.records)


async def test_a_bug_gets_one_traceback_and_a_changed_error_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[Exception] = [KeyError("spec"), KeyError("spec"), ApiError(500, "boom"), ApiError(500, "boom")]

    async def reconcile(key: str) -> None:
        if errors:
            raise errors.pop(0)

    queue = WorkQueue("thing", reconcile, log, debounce=0, retry_min=0.001, retry_max=0.005)
    with caplog.at_level(logging.WARNING, logger="test.workqueue"):
        async with running(queue):
            queue.add("x")
            await until(lambda: not errors and not queue.failing(), "recovered")
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.exc_info is not None) for r in logged] == [("ERROR", True), ("WARNING", False)]


async def test_stopping_drops_pending_retries() -> None:
    calls = 0

    async def reconcile(key: str) -> None:
        nonlocal calls
        calls += 1
        raise ApiError(500, "down")

    queue = WorkQueue("thing", reconcile, log, debounce=0, retry_min=0.05, retry_max=0.05)
    async with running(queue):
        queue.add("x")
        await until(lambda: calls == 1, "first attempt")
    await asyncio.sleep(0.1)  # past the retry's due time: nothing may run once stopped
    assert calls == 1
