"""When requests are sent, and the workers that send them.

Fixed rate is open loop: request i is due at start + i/rate whatever happened before it, and its latency
is measured from that due time. A slow server therefore shows up as latency, not as fewer requests
(no coordinated omission). Max rate is closed loop: each worker sends as soon as its last answer came.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from samples.loadclient.result import LoadResult, Recorder

# Slot counts come from float products: 0.1 * 30 must give 3 sends, not 4.
SLOT_EPSILON = 1e-9


@dataclass(frozen=True)
class Pacing:
    rate: float | None = None  # requests per second; None sends as fast as the workers go
    duration_s: float | None = None
    requests: int | None = None  # stop after this many, whichever of the two limits comes first
    concurrency: int = 1  # workers, each with its own connection

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be positive, not {self.rate}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be positive, not {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be at least 1, not {self.requests}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.duration_s is None and self.requests is None:
            raise ValueError("give a duration or a number of requests")

    def total_sends(self) -> int | None:
        """How many requests the run sends, when that is known up front (fixed rate or a request count)."""
        sends = [self.requests] if self.requests is not None else []
        if self.rate is not None and self.duration_s is not None:
            sends.append(max(1, math.ceil(self.rate * self.duration_s - SLOT_EPSILON)))
        return min(sends) if sends else None


class Schedule:
    """Hands the next due time to whichever worker asks; None once the run is over. No I/O, no clock."""

    def __init__(self, pacing: Pacing, start: float) -> None:
        self._interval = 1.0 / pacing.rate if pacing.rate is not None else None
        self._start = start
        self._limit = pacing.total_sends()
        self._deadline = start + pacing.duration_s if pacing.duration_s is not None else None
        self._slots = itertools.count()

    def next_due(self, now: float) -> float | None:
        slot = next(self._slots)
        if self._limit is not None and slot >= self._limit:
            return None
        if self._interval is not None:
            return self._start + slot * self._interval
        if self._deadline is not None and now >= self._deadline:
            return None
        return now


class Probe(Protocol):
    """One worker's way of making a request; errors come back as a short kind, never raised."""

    async def open(self) -> None: ...

    async def send(self) -> str | None: ...

    async def close(self) -> None: ...


async def _work(probe: Probe, schedule: Schedule, recorder: Recorder) -> None:
    clock = time.perf_counter
    while (due := schedule.next_due(clock())) is not None:
        wait = due - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        error = await probe.send()
        recorder.record(clock() - due, error)


async def drive(pacing: Pacing, new_probe: Callable[[], Probe], mode: str, target: str) -> LoadResult:
    """Run `pacing.concurrency` workers, each with a probe from `new_probe`, until the schedule ends."""
    probes = [new_probe() for _ in range(pacing.concurrency)]
    await asyncio.gather(*(probe.open() for probe in probes))
    recorder = Recorder()
    start = time.perf_counter()
    schedule = Schedule(pacing, start)
    try:
        async with asyncio.TaskGroup() as workers:
            for index, probe in enumerate(probes):
                workers.create_task(_work(probe, schedule, recorder), name=f"{mode}-worker-{index}")
    finally:
        await asyncio.gather(*(probe.close() for probe in probes))
    elapsed = time.perf_counter() - start
    return recorder.result(mode, target, pacing.rate, pacing.concurrency, elapsed)
