"""The certificate manager with a fake clock and a scripted CA: issue on demand, refresh at half-life,
backoff with jitter while the CA fails, the old certificate kept while valid, forgetting."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import AsyncIterator

import pytest

from ambient.identity.certs import WorkloadCertificate
from ambient.identity.errors import CaError, CertificateUnavailable
from ambient.identity.manager import (
    BACKOFF_MAX,
    CertificateManager,
    ManagerConfig,
    backoff_delay,
    refresh_at,
)
from ambient.identity.spiffe import SpiffeId

START = 1_700_000_000.0
SLEEP = SpiffeId("cluster.local", "default", "sleep")
REVIEWS = SpiffeId("cluster.local", "bookinfo", "reviews")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class FakeClock:
    """Time moves only in `advance`; sleepers wake in deadline order, each at its own deadline."""

    def __init__(self) -> None:
        self.t = START
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + seconds, next(self._seq), future))
        await future

    async def advance(self, seconds: float) -> None:
        target = self.t + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self.t = max(self.t, deadline)
            if not future.done():
                future.set_result(None)
            await settle()
        self.t = target
        await settle()


class ScriptedCa:
    """Issues certificates of `ttl` seconds starting now, or fails while `failing` is set."""

    def __init__(self, clock: FakeClock, ttl: float = 100.0) -> None:
        self.clock, self.ttl = clock, ttl
        self.failing = False
        self.calls: list[tuple[SpiffeId, float]] = []
        self.gate: asyncio.Event | None = None
        self.skew = 0.0  # how far the CA's clock is ahead of ours

    async def fetch_certificate(self, identity: SpiffeId) -> WorkloadCertificate:
        self.calls.append((identity, self.clock.now()))
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise CaError("cannot reach the CA at 127.0.0.1:15012", "UNAVAILABLE")
        now = self.clock.now() + self.skew
        return WorkloadCertificate(identity, f"key-{len(self.calls)}", (f"leaf-{len(self.calls)}", "root"),
                                   now, now + self.ttl)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(clock: FakeClock) -> ScriptedCa:
    return ScriptedCa(clock)


@pytest.fixture
async def manager(clock: FakeClock, ca: ScriptedCa) -> AsyncIterator[CertificateManager]:
    mgr = CertificateManager(ca, clock=clock, rng=random.Random(7))
    yield mgr
    await mgr.close()


def times(ca: ScriptedCa) -> list[float]:
    return [t - START for _, t in ca.calls]


async def test_issues_on_demand_once_for_concurrent_callers(manager: CertificateManager, ca: ScriptedCa) -> None:
    ca.gate = asyncio.Event()
    waiters = [asyncio.create_task(manager.fetch(SLEEP)) for _ in range(5)]
    await settle()
    ca.gate.set()
    certs = await asyncio.gather(*waiters)
    assert len(ca.calls) == 1
    assert all(c is certs[0] for c in certs)
    assert await manager.fetch(SLEEP) is certs[0]
    assert len(ca.calls) == 1


async def test_refreshes_at_half_lifetime(manager: CertificateManager, ca: ScriptedCa, clock: FakeClock) -> None:
    first = await manager.fetch(SLEEP)
    await clock.advance(49.9)
    assert times(ca) == [0]
    assert await manager.fetch(SLEEP) is first
    await clock.advance(0.1)
    assert times(ca) == [0, 50]
    second = await manager.fetch(SLEEP)
    assert second is not first and second.not_before == clock.now()
    await clock.advance(50)
    assert times(ca) == [0, 50, 100]


async def test_backoff_doubles_from_half_a_second_to_150s_with_bounded_jitter(
        manager: CertificateManager, ca: ScriptedCa, clock: FakeClock) -> None:
    ca.failing = True
    manager.prefetch(SLEEP)
    await clock.advance(2000)
    gaps = [b - a for a, b in itertools.pairwise(times(ca))]
    expected = [min(0.5 * 2 ** n, BACKOFF_MAX) for n in range(len(gaps))]
    assert len(gaps) >= 15
    for gap, base in zip(gaps, expected, strict=True):
        assert base * 0.8 - 1e-9 <= gap <= base + 1e-9, (gaps, expected)
    assert max(gaps) <= BACKOFF_MAX
    capped = [g for g, b in zip(gaps, expected, strict=True) if b == BACKOFF_MAX]
    assert len(set(capped)) > 1  # jitter keeps retries of many identities from lining up


def test_backoff_delay_bounds() -> None:
    rng = random.Random(1)
    for failures in range(1, 200):
        base = min(0.5 * 2 ** (failures - 1), 150.0)
        assert base * 0.8 <= backoff_delay(failures, rng) <= base
    assert backoff_delay(10_000, rng) <= 150.0


async def test_old_certificate_kept_while_the_ca_fails_then_dropped_at_expiry(
        manager: CertificateManager, ca: ScriptedCa, clock: FakeClock) -> None:
    first = await manager.fetch(SLEEP)
    ca.failing = True
    await clock.advance(60)  # refresh at 50 failed, retries since
    assert len(ca.calls) > 2
    assert await manager.fetch(SLEEP) is first
    [status] = manager.snapshot()
    assert status.state == "available" and status.failures >= 2
    assert "cannot reach the CA" in (status.error or "")
    await clock.advance(39.9)
    assert await manager.fetch(SLEEP) is first
    await clock.advance(0.1)
    with pytest.raises(CertificateUnavailable, match=r"expired at .* cannot reach the CA"):
        await manager.fetch(SLEEP)
    ca.failing = False
    await clock.advance(BACKOFF_MAX)
    fresh = await manager.fetch(SLEEP)
    assert fresh is not first and fresh.valid_at(clock.now())
    assert manager.snapshot()[0].failures == 0


async def test_first_fetch_fails_fast_with_the_cas_error(manager: CertificateManager, ca: ScriptedCa,
                                                          clock: FakeClock) -> None:
    ca.failing = True
    with pytest.raises(CertificateUnavailable, match=r"no certificate for .*sleep yet: cannot reach the CA"):
        await manager.fetch(SLEEP)
    with pytest.raises(CertificateUnavailable):
        await manager.fetch(SLEEP)  # during backoff: no new request from the data path
    assert len(ca.calls) == 1
    assert manager.snapshot()[0].state == "unavailable"


async def test_forget_after_last_prefetch_stops_refreshing(manager: CertificateManager, ca: ScriptedCa,
                                                           clock: FakeClock) -> None:
    manager.prefetch(SLEEP)
    manager.prefetch(SLEEP)  # two pods with the same service account
    await clock.advance(1)
    manager.forget(SLEEP)
    await clock.advance(200)  # pinned: refreshed even though nobody fetched it
    assert len(ca.calls) == 5
    manager.forget(SLEEP)
    assert manager.identities() == []
    await clock.advance(200)
    assert len(ca.calls) == 5


async def test_unused_on_demand_identity_is_forgotten_at_its_next_refresh(ca: ScriptedCa, clock: FakeClock) -> None:
    manager = CertificateManager(ca, clock=clock, config=ManagerConfig(forget_after=30))
    await manager.fetch(SLEEP)
    await manager.fetch(REVIEWS)
    await clock.advance(40)
    await manager.fetch(REVIEWS)  # used 10 s before its refresh: kept
    await clock.advance(10)
    assert manager.identities() == [REVIEWS]
    assert [i for i, _ in ca.calls] == [SLEEP, REVIEWS, REVIEWS]
    await manager.close()


async def test_waiter_cancelled_does_not_cancel_the_request(manager: CertificateManager, ca: ScriptedCa) -> None:
    ca.gate = asyncio.Event()
    impatient = asyncio.create_task(manager.fetch(SLEEP))
    await settle()
    impatient.cancel()
    await settle()
    patient = asyncio.create_task(manager.fetch(SLEEP))
    await settle()
    ca.gate.set()
    assert (await patient).identity == SLEEP
    assert len(ca.calls) == 1


async def test_forget_wakes_waiters(manager: CertificateManager, ca: ScriptedCa) -> None:
    ca.gate = asyncio.Event()
    manager.prefetch(SLEEP)
    waiter = asyncio.create_task(manager.fetch(SLEEP))
    await settle()
    manager.forget(SLEEP)
    with pytest.raises(CertificateUnavailable, match="forgotten"):
        await waiter


async def test_a_ca_clock_slightly_ahead_does_not_make_fresh_certs_unusable(
        manager: CertificateManager, ca: ScriptedCa) -> None:
    ca.skew = 2.0
    cert = await manager.fetch(SLEEP)
    assert cert.not_before > START
    assert manager.snapshot()[0].state == "available"


async def test_a_cert_expired_on_arrival_is_a_failure_not_a_busy_loop(
        manager: CertificateManager, ca: ScriptedCa, clock: FakeClock) -> None:
    ca.skew = -200.0  # the CA's clock is far behind: it issues certificates that are already expired
    with pytest.raises(CertificateUnavailable, match="clocks in sync"):
        await manager.fetch(SLEEP)
    await clock.advance(1)
    assert len(ca.calls) == 2  # retried after 0.4-0.5 s, not in a tight loop


def test_refresh_time_is_half_life_but_never_in_the_past_for_backdated_certs() -> None:
    cert = WorkloadCertificate(SLEEP, "k", ("l",), START, START + 100)
    assert refresh_at(cert, START) == START + 50
    backdated = WorkloadCertificate(SLEEP, "k", ("l",), START - 3600, START + 100)
    assert refresh_at(backdated, START) == START + 50
