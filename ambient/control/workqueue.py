"""The control plane's work queue: keys to reconcile, each at most once per pass, retried with backoff.

What client-go's rate-limited workqueue gives istiod's controllers, trimmed to what ours need:
- `add(key)` is cheap and idempotent (watch handlers call it); a burst of adds is gathered for `debounce`
  seconds into one pass, keys in the order first added;
- a key whose reconcile raised comes back after capped exponential backoff, until it succeeds;
- a failure is logged once, when it starts or its message changes, and its end once, so a controller that
  cannot write (RBAC, a webhook, an API server restart) leaves a few lines rather than a traceback a second.
  API errors are expected and logged without a traceback; anything else is a bug and gets one, once.

It owns no informers and decides nothing: the reconcile function does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from ambient.kube.errors import ApiError

K = TypeVar("K", bound=Hashable)

DEBOUNCE = 0.05  # seconds: gather a burst of watch events into one pass
RETRY_MIN, RETRY_MAX = 0.2, 5.0  # seconds between attempts for a key whose reconcile failed


class WorkQueue(Generic[K]):
    def __init__(self, name: str, reconcile: Callable[[K], Awaitable[None]], log: logging.Logger, *,
                 describe: Callable[[K], str] = str, debounce: float = DEBOUNCE, retry_min: float = RETRY_MIN,
                 retry_max: float = RETRY_MAX) -> None:
        self.name, self.log, self.describe = name, log, describe
        self._reconcile = reconcile
        self.debounce, self.retry_min, self.retry_max = debounce, retry_min, retry_max
        self._pending: dict[K, None] = {}  # an insertion-ordered set
        self._wake = asyncio.Event()
        self._failures: dict[K, tuple[int, str]] = {}  # key → (attempts failed in a row, last message logged)
        self._retries: dict[K, asyncio.TimerHandle] = {}

    def add(self, key: K) -> None:
        self._pending[key] = None
        self._wake.set()

    def failing(self) -> dict[K, int]:
        """Keys whose last reconcile failed → failures in a row (for tests and debug output)."""
        return {key: attempts for key, (attempts, _) in self._failures.items()}

    async def run(self) -> None:
        """Reconcile forever; cancel to stop (pending retries are dropped)."""
        try:
            while True:
                await self._wake.wait()
                await asyncio.sleep(self.debounce)
                self._wake.clear()
                keys, self._pending = list(self._pending), {}
                for key in keys:
                    await self._run_one(key)
        finally:
            for handle in self._retries.values():
                handle.cancel()
            self._retries.clear()

    async def _run_one(self, key: K) -> None:
        try:
            await self._reconcile(key)
        except Exception as exc:
            self._failed(key, exc)
            return
        failed = self._failures.pop(key, None)
        if failed is not None:
            self.log.info("%s %s: succeeded after %d failed attempt(s)", self.name, self.describe(key), failed[0])

    def _failed(self, key: K, exc: Exception) -> None:
        attempts, logged = self._failures.get(key, (0, ""))
        attempts += 1
        delay = min(self.retry_min * 2 ** (attempts - 1), self.retry_max)
        message = f"{exc} ({exc.reason})" if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
        if message != logged:
            if isinstance(exc, ApiError):
                self.log.warning("%s %s: %s; retrying with backoff (up to %.0fs), logged again only if the "
                                 "error changes", self.name, self.describe(key), message, self.retry_max)
            else:
                self.log.error("%s %s: reconcile failed; retrying with backoff (up to %.0fs)", self.name,
                               self.describe(key), self.retry_max, exc_info=exc)
        self._failures[key] = (attempts, message)
        previous = self._retries.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._retries[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: K) -> None:
        self._retries.pop(key, None)
        self.add(key)
