"""Certificates per identity for a proxy: issued on demand or prefetched, refreshed at half their lifetime,
retried with exponential backoff while the CA fails, the old certificate kept while it is still valid
(PROTOCOLS.md §5), identities forgotten once no workload uses them.

`fetch(identity)` is what the data path calls: it returns the current certificate at once when there is a
valid one, waits for the first issuance otherwise, and fails fast (`CertificateUnavailable`, with the CA's
last error) when the CA is failing and nothing valid is left. All CA traffic happens on one background
task per identity, at most `max_concurrent` requests at a time, so the data path never waits for a
refresh. Time comes through a `Clock` so that tests can drive rotation and backoff without sleeping.

Forgetting: `prefetch` pins an identity (ztunnel calls it once per local pod); `forget` unpins it and, at
zero pins, drops it at once. An identity only ever fetched on demand is dropped at its next refresh if
nobody fetched it for `forget_after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

from ambient.identity.ca_client import CertificateSource
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.errors import CaError, CertificateUnavailable, IdentityError
from ambient.identity.spiffe import SpiffeId

log = logging.getLogger("ambient.identity.manager")

REFRESH_FRACTION = 0.5  # refresh at half the lifetime, as ztunnel and istio-agent do
BACKOFF_INITIAL = 0.5  # seconds before the first retry after a failed request
BACKOFF_MULTIPLIER = 2.0
BACKOFF_MAX = 150.0  # seconds; the retry interval never grows beyond this
BACKOFF_JITTER = 0.2  # each delay is drawn from [(1 - jitter) * d, d], so retries of many identities spread out
MAX_CONCURRENT = 8  # CA requests in flight at once; ztunnel's SecretManager uses 8
FORGET_AFTER = 3600.0  # seconds an on-demand-only identity may go unused before its refresh is skipped


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (certificate validity is wall-clock time)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class ManagerConfig:
    max_concurrent: int = MAX_CONCURRENT
    forget_after: float = FORGET_AFTER


def refresh_at(cert: WorkloadCertificate, fetched_at: float) -> float:
    """When to ask for the next certificate: at half its lifetime (ztunnel's rule). A CA that backdates
    `not_before` would make that moment early or even past, so never before half of what remained
    when the certificate arrived."""
    half_life = cert.not_before + cert.lifetime * REFRESH_FRACTION
    half_remaining = fetched_at + (cert.not_after - fetched_at) * REFRESH_FRACTION
    return max(half_life, half_remaining)


def backoff_delay(failures: int, rng: random.Random) -> float:
    """Seconds to wait after `failures` consecutive failures (≥ 1): 0.5 s * 2^(failures-1), capped at 150 s,
    minus up to 20 % jitter."""
    exponent = min(max(failures, 1) - 1, 64)  # 2^64 * 0.5 s is far past the cap; avoids float overflow
    base = min(BACKOFF_INITIAL * BACKOFF_MULTIPLIER ** exponent, BACKOFF_MAX)
    return base * rng.uniform(1 - BACKOFF_JITTER, 1.0)


@dataclass(frozen=True)
class CertificateStatus:
    """One identity as `ztunnel-config certificates` shows it."""

    identity: SpiffeId
    state: str  # "initializing" | "available" | "unavailable"
    not_before: float | None
    not_after: float | None
    next_refresh: float | None
    failures: int
    error: str | None
    pinned: int


@dataclass(eq=False)
class _Entry:
    identity: SpiffeId
    last_used: float
    pins: int = 0
    cert: WorkloadCertificate | None = None
    error: Exception | None = None
    failures: int = 0
    next_refresh: float | None = None
    attempt: asyncio.Future[None] | None = None  # done when the request in flight (if any) has finished
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class CertificateManager:
    def __init__(self, source: CertificateSource, *, clock: Clock | None = None, rng: random.Random | None = None,
                 config: ManagerConfig = ManagerConfig()) -> None:
        self._source = source
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._config = config
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._entries: dict[SpiffeId, _Entry] = {}

    # -- public API ------------------------------------------------------------------------------
    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        """The current certificate for `identity`, issuing it first if needed; `CertificateUnavailable`
        when there is no valid certificate and the CA's last answer was a failure."""
        now = self._clock.now()
        entry = self._entry(identity)
        entry.last_used = now
        if entry.cert is not None and not entry.cert.expired(now):
            return entry.cert
        if entry.attempt is not None and not entry.attempt.done():
            await asyncio.shield(entry.attempt)
            now = self._clock.now()
            if entry.cert is not None and not entry.cert.expired(now):
                return entry.cert
        raise self._unavailable(entry, now)

    def prefetch(self, identity: SpiffeId) -> None:
        """Start issuing `identity` now and keep it refreshed until a matching `forget`."""
        entry = self._entry(identity)
        entry.pins += 1
        entry.last_used = self._clock.now()

    def forget(self, identity: SpiffeId) -> None:
        """Undo one `prefetch`; at zero the identity and its certificate are dropped."""
        entry = self._entries.get(identity)
        if entry is None:
            return
        entry.pins = max(entry.pins - 1, 0)
        if entry.pins == 0:
            self._drop(entry)

    def identities(self) -> list[SpiffeId]:
        return sorted(self._entries)

    def snapshot(self) -> list[CertificateStatus]:
        now = self._clock.now()
        statuses = []
        for identity in sorted(self._entries):
            e = self._entries[identity]
            state = ("available" if e.cert is not None and not e.cert.expired(now) else
                     "initializing" if e.error is None else "unavailable")
            statuses.append(CertificateStatus(
                identity, state, e.cert.not_before if e.cert else None, e.cert.not_after if e.cert else None,
                e.next_refresh, e.failures, str(e.error) if e.error else None, e.pins))
        return statuses

    async def close(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for entry in list(self._entries.values()):
            self._drop(entry)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- internals -------------------------------------------------------------------------------
    def _entry(self, identity: SpiffeId) -> _Entry:
        entry = self._entries.get(identity)
        if entry is None:
            entry = _Entry(identity, last_used=self._clock.now())
            entry.attempt = asyncio.get_running_loop().create_future()
            entry.task = asyncio.get_running_loop().create_task(self._run(entry), name=f"cert {identity}")
            entry.task.add_done_callback(_log_crash)
            self._entries[identity] = entry
        return entry

    def _drop(self, entry: _Entry) -> None:
        if self._entries.get(entry.identity) is entry:
            del self._entries[entry.identity]
        if entry.task is not None and entry.task is not asyncio.current_task():
            entry.task.cancel()
        if entry.attempt is not None and not entry.attempt.done():
            entry.attempt.set_result(None)  # waiters wake and report the identity as unavailable
        log.info("forgot the certificate for %s", entry.identity)

    def _unavailable(self, entry: _Entry, now: float) -> CertificateUnavailable:
        if self._entries.get(entry.identity) is not entry:
            return CertificateUnavailable(f"no certificate for {entry.identity}: it was forgotten while waiting")
        cause = f": {entry.error}" if entry.error else ""
        if entry.cert is not None and now >= entry.cert.not_after:
            return CertificateUnavailable(
                f"certificate for {entry.identity} expired at {_iso(entry.cert.not_after)} and the CA has not "
                f"issued a new one{cause}; retrying in {max((entry.next_refresh or now) - now, 0):.1f}s")
        return CertificateUnavailable(f"no certificate for {entry.identity} yet{cause}")

    async def _run(self, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if entry.attempt is None or entry.attempt.done():
                entry.attempt = loop.create_future()
            async with self._slots:
                try:
                    cert: WorkloadCertificate | None = await self._source.fetch_certificate(entry.identity)
                    error: Exception | None = None
                except IdentityError as exc:
                    cert, error = None, exc
                except Exception as exc:  # a bug in a source must not end the refresh loop
                    log.exception("certificate request for %s failed unexpectedly", entry.identity)
                    cert, error = None, exc
            now = self._clock.now()
            if cert is not None and cert.expired(now):  # refreshing "at half-life" would spin on the CA
                error = CaError(f"the CA issued a certificate for {entry.identity} that expired at "
                                f"{_iso(cert.not_after)}; are the CA's and this host's clocks in sync?",
                                "EXPIRED_ON_ARRIVAL")
                cert = None
            if cert is not None:
                entry.cert, entry.error, entry.failures = cert, None, 0
                delay = refresh_at(cert, now) - now
                log.info("certificate for %s issued, valid until %s, refresh in %.1fs", entry.identity,
                         _iso(cert.not_after), delay)
            else:
                entry.error, entry.failures = error, entry.failures + 1
                delay = backoff_delay(entry.failures, self._rng)
                if entry.cert is not None and entry.cert.expired(now):
                    entry.cert = None
                kept = (f"keeping the current certificate (valid until {_iso(entry.cert.not_after)})"
                        if entry.cert is not None else "no valid certificate")
                log.warning("certificate request for %s failed (attempt %d): %s; %s; retrying in %.1fs",
                            entry.identity, entry.failures, error, kept, delay)
            entry.next_refresh = now + delay
            entry.attempt.set_result(None)
            await self._clock.sleep(max(delay, 0.0))
            if entry.pins == 0 and self._clock.now() - entry.last_used >= self._config.forget_after:
                self._drop(entry)
                return


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("certificate refresh task %s died: %r", task.get_name(), task.exception())
