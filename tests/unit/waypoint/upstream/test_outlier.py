"""Outlier detection as transcripts on a fake clock: results in, ejections and returns out."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from waypoint.upstream.endpoints import Endpoint
from waypoint.upstream.outlier import OutlierDetector, UsableHosts, usable_hosts


@dataclass(frozen=True)
class Settings:
    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def endpoint(i: int, healthy: bool = True) -> Endpoint:
    return Endpoint(uid=f"pod-{i}", ip=f"10.0.0.{i}", target_port=80, identity="spiffe://td/ns/a/sa/b",
                    labels=MappingProxyType({}), healthy=healthy, node="n", hbone=True)


def detector(hosts: int = 4, clock: Clock | None = None, **settings: int | float) -> OutlierDetector:
    found = OutlierDetector(Settings(**settings), clock or Clock())  # type: ignore[arg-type]
    found.set_hosts(f"pod-{i}" for i in range(hosts))
    return found


def feed(d: OutlierDetector, uid: str, *statuses: int | None) -> list[bool]:
    return [d.record(uid, status) for status in statuses]


def test_consecutive_5xx_ejects_on_the_threshold_response() -> None:
    d = detector(consecutive_5xx=3, max_ejection_percent=100)
    assert feed(d, "pod-0", 500, 503) == [False, False]
    assert not d.ejected("pod-0")
    assert feed(d, "pod-0", 500) == [True]
    assert d.ejected("pod-0") and not d.ejected("pod-1")


def test_a_success_resets_the_count() -> None:
    d = detector(consecutive_5xx=3, max_ejection_percent=100)
    feed(d, "pod-0", 500, 500, 200, 500, 500, 404, 500, 500)
    assert not d.ejected("pod-0")


def test_connect_failures_count_as_5xx() -> None:
    d = detector(consecutive_5xx=2, max_ejection_percent=100)
    assert feed(d, "pod-0", None, 500) == [False, True]


def test_gateway_errors_only_502_503_504_and_connect_failures() -> None:
    d = detector(consecutive_5xx=0, consecutive_gateway_errors=3, max_ejection_percent=100)
    feed(d, "pod-0", 500, 500, 500, 500)          # 5xx detector is off; 500 is not a gateway error
    assert not d.ejected("pod-0")
    feed(d, "pod-0", 502, 503, 500, 504)          # the 500 broke the streak
    assert not d.ejected("pod-0")
    assert feed(d, "pod-0", None, 502) == [False, True]


def test_defaults_are_envoys_five_5xx_and_ten_percent() -> None:
    d = detector(hosts=10)
    assert feed(d, "pod-0", *[500] * 5)[-1]
    # A second ejection would make 20 % of 10 hosts: refused, and counted.
    assert not feed(d, "pod-1", *[500] * 5)[-1]
    assert not d.ejected("pod-1") and d.ejections_overflow == 1


def test_max_ejection_percent_below_one_host_ejects_nothing_like_envoy() -> None:
    d = detector(hosts=3, consecutive_5xx=1)          # default 10 % of 3 hosts < 1 host
    feed(d, "pod-0", 500)
    assert not d.ejected("pod-0")


def test_max_ejection_percent_limits_the_ejected_share() -> None:
    d = detector(hosts=4, consecutive_5xx=1, max_ejection_percent=50)
    for i in range(4):
        feed(d, f"pod-{i}", 500)
    assert [d.ejected(f"pod-{i}") for i in range(4)] == [True, True, False, False]
    every = detector(hosts=4, consecutive_5xx=1, max_ejection_percent=100)
    for i in range(4):
        feed(every, f"pod-{i}", 500)
    assert all(every.ejected(f"pod-{i}") for i in range(4))


def test_ejected_endpoint_returns_at_the_first_sweep_after_base_ejection_time() -> None:
    clock = Clock()
    d = detector(clock=clock, consecutive_5xx=1, max_ejection_percent=100, interval=10, base_ejection_time=30)
    feed(d, "pod-0", 500)
    for t in (10, 20, 29.9):
        assert d.sweep(t) == [] and d.ejected("pod-0")
    assert d.sweep(30) == ["pod-0"]
    assert not d.ejected("pod-0")


def test_repeat_ejections_last_longer_and_decay_while_healthy() -> None:
    clock = Clock()
    d = detector(clock=clock, consecutive_5xx=1, max_ejection_percent=100, interval=10, base_ejection_time=30)
    feed(d, "pod-0", 500)                     # 1st ejection: 30 s
    assert d.sweep(30) == ["pod-0"]
    clock.now = 31
    feed(d, "pod-0", 500)                     # 2nd ejection right away: 60 s
    assert d.sweep(31 + 59) == [] and d.sweep(31 + 60) == ["pod-0"]
    # Healthy for two full intervals after returning: the backoff decays back to 0 ...
    d.sweep(101)
    d.sweep(111)
    clock.now = 112
    feed(d, "pod-0", 500)                     # ... so the 3rd ejection is 30 s again
    assert d.sweep(112 + 29) == [] and d.sweep(112 + 30) == ["pod-0"]


def test_ejection_time_grows_linearly_up_to_300s() -> None:
    clock = Clock()
    d = detector(clock=clock, consecutive_5xx=1, max_ejection_percent=100, interval=1, base_ejection_time=100)
    for duration in (100, 200, 300):
        feed(d, "pod-0", 500)
        start = clock.now
        assert d.sweep(start + duration - 1) == [] and d.sweep(start + duration) == ["pod-0"]
        clock.now = start + duration
    # The next ones would be 400 s and 500 s; Envoy's cap is max(300 s, base_ejection_time).
    for _ in range(2):
        feed(d, "pod-0", 500)
        start = clock.now
        assert d.sweep(start + 299) == [] and d.sweep(start + 300) == ["pod-0"]
        clock.now = start + 300


def test_a_base_ejection_time_above_300s_is_its_own_cap() -> None:
    clock = Clock()
    d = detector(clock=clock, consecutive_5xx=1, max_ejection_percent=100, base_ejection_time=400)
    feed(d, "pod-0", 500)
    assert d.sweep(400) == ["pod-0"]
    clock.now = 400
    feed(d, "pod-0", 500)
    assert d.sweep(799) == [] and d.sweep(800) == ["pod-0"]


def test_counters_restart_after_return() -> None:
    clock = Clock()
    d = detector(clock=clock, consecutive_5xx=3, max_ejection_percent=100, base_ejection_time=30)
    feed(d, "pod-0", 500, 500, 500)
    feed(d, "pod-0", 500, 500)                 # still failing while ejected (panic traffic)
    assert d.sweep(30) == ["pod-0"]
    assert feed(d, "pod-0", 500, 500) == [False, False]
    assert not d.ejected("pod-0")


def test_select_skips_ejected_endpoints_and_panics_below_min_health() -> None:
    pods = [endpoint(i) for i in range(3)]
    d = detector(hosts=0, consecutive_5xx=1, max_ejection_percent=100, min_health_percent=50)
    assert d.select(pods) == UsableHosts(tuple(pods))
    feed(d, "pod-0", 500)
    assert d.select(pods) == UsableHosts((pods[1], pods[2]))     # 67 % healthy: no panic
    feed(d, "pod-1", 500)
    assert d.select(pods) == UsableHosts(tuple(pods), panic=True)  # 33 % < 50 %: use all


def test_without_panic_threshold_all_ejected_means_no_hosts() -> None:
    pods = [endpoint(i) for i in range(2)]
    d = detector(hosts=0, consecutive_5xx=1, max_ejection_percent=100)
    d.select(pods)
    feed(d, "pod-0", 500)
    feed(d, "pod-1", 500)
    assert d.select(pods) == UsableHosts(())


def test_usable_hosts_drops_unhealthy_and_ejected() -> None:
    pods = [endpoint(0), endpoint(1, healthy=False), endpoint(2)]
    assert usable_hosts(pods).hosts == (pods[0], pods[2])
    d = detector(hosts=0, consecutive_5xx=1, max_ejection_percent=100)
    usable_hosts(pods, d)
    feed(d, "pod-2", 500)
    assert usable_hosts(pods, d).hosts == (pods[0],)
    # The unhealthy endpoint is not part of the cluster the percentages are computed on.
    assert set(d.describe()["hosts"]) == {"pod-0", "pod-2"}


def test_endpoints_that_leave_lose_their_state() -> None:
    d = detector(hosts=2, consecutive_5xx=1, max_ejection_percent=100)
    feed(d, "pod-0", 500)
    d.set_hosts(["pod-1"])
    d.set_hosts(["pod-0", "pod-1"])
    assert not d.ejected("pod-0")


def test_describe_for_config_dump() -> None:
    clock = Clock()
    d = detector(hosts=2, clock=clock, consecutive_5xx=2, max_ejection_percent=100, base_ejection_time=30)
    feed(d, "pod-0", 500, 500)
    feed(d, "pod-1", 502)
    clock.now = 10
    dump = d.describe()
    assert dump["settings"] == {"consecutive_5xx": 2, "consecutive_gateway_errors": 0, "interval": 10.0,
                                "base_ejection_time": 30.0, "max_ejection_percent": 100,
                                "min_health_percent": 0}
    assert dump["hosts"]["pod-0"] == {"consecutive_5xx": 0, "consecutive_gateway_errors": 0, "ejections": 1,
                                      "ejected": True, "ejected_for_seconds": 10.0,
                                      "returns_after_seconds": 20.0}
    assert dump["hosts"]["pod-1"] == {"consecutive_5xx": 1, "consecutive_gateway_errors": 1, "ejections": 0,
                                      "ejected": False}


def test_routing_model_outlier_settings_are_accepted() -> None:
    from waypoint.routing import model

    d = OutlierDetector(model.OutlierSettings(consecutive_5xx=2, max_ejection_percent=100), Clock())
    d.set_hosts(["pod-0", "pod-1"])
    assert feed(d, "pod-0", 500, 500) == [False, True]
    assert d.interval == 10.0 and d.base_ejection_time == 30.0
