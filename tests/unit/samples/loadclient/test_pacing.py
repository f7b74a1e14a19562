from __future__ import annotations

from typing import Any

import pytest

from samples.loadclient.pacing import Pacing, Schedule


def due_times(schedule: Schedule, now: float) -> list[float]:
    times = []
    while (due := schedule.next_due(now)) is not None:
        times.append(due)
    return times


def test_fixed_rate_slots_are_spread_over_the_duration() -> None:
    times = due_times(Schedule(Pacing(rate=10, duration_s=0.5), start=100.0), now=100.0)

    assert times == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])


def test_fixed_rate_due_times_do_not_move_when_workers_are_late() -> None:
    schedule = Schedule(Pacing(rate=4, requests=3), start=0.0)

    assert [schedule.next_due(now=5.0) for _ in range(4)] == [0.0, 0.25, 0.5, None]


@pytest.mark.parametrize(("rate", "duration", "sends"), [(50, 1, 50), (0.1 * 3, 10, 3), (3, 0.1, 1), (1000, 0.0015, 2)])
def test_total_sends_is_rate_times_duration_rounded_up(rate: float, duration: float, sends: int) -> None:
    assert Pacing(rate=rate, duration_s=duration).total_sends() == sends


def test_max_rate_runs_until_the_deadline_or_the_count() -> None:
    by_time = Schedule(Pacing(duration_s=2), start=0.0)
    by_count = Schedule(Pacing(requests=2), start=0.0)

    assert by_time.next_due(now=1.5) == 1.5
    assert by_time.next_due(now=2.0) is None
    assert due_times(by_count, now=7.0) == [7.0, 7.0]


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 0, "duration_s": 1}, {"duration_s": -1}, {"requests": 0}, {"duration_s": 1, "concurrency": 0}, {}],
)
def test_pacing_rejects_impossible_runs(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Pacing(**kwargs)
