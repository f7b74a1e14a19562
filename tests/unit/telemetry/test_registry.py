"""The registry's histogram family: Prometheus text as Envoy renders it (cumulative buckets with inclusive
upper bounds, `+Inf`, `_sum`, `_count`), next to the counters ztunnel already uses."""

from __future__ import annotations

import pytest

from ambient.telemetry.registry import LabelText, Registry, format_bound, format_value


def test_histogram_buckets_are_cumulative_with_inclusive_bounds() -> None:
    registry = Registry()
    family = registry.histogram_family("istio_request_duration_milliseconds", "The request duration",
                                       LabelText(("reporter", "response_code")), (0.5, 1, 5, 3600000))
    series = family.series(("waypoint", "200"))
    for value in (0.2, 0.5, 0.7, 5, 7000000):
        series.observe(value)
    family.observe(("waypoint", "503"), 1)
    assert family.series(("waypoint", "200")) is series  # resolved once, kept by the caller
    assert registry.render().decode() == (
        "# HELP istio_request_duration_milliseconds The request duration\n"
        "# TYPE istio_request_duration_milliseconds histogram\n"
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="200",le="0.5"} 2\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="200",le="1"} 3\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="200",le="5"} 4\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="200",le="3600000"} 4\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="200",le="+Inf"} 5\n'
        'istio_request_duration_milliseconds_sum{reporter="waypoint",response_code="200"} 7000006.4\n'
        'istio_request_duration_milliseconds_count{reporter="waypoint",response_code="200"} 5\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="503",le="0.5"} 0\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="503",le="1"} 1\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="503",le="5"} 1\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="503",le="3600000"} 1\n'
        'istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code="503",le="+Inf"} 1\n'
        'istio_request_duration_milliseconds_sum{reporter="waypoint",response_code="503"} 1\n'
        'istio_request_duration_milliseconds_count{reporter="waypoint",response_code="503"} 1\n')


def test_a_histogram_without_labels_and_next_to_counters() -> None:
    registry = Registry()
    counters = registry.counter_family("istio_tcp_connections_opened", "opened", LabelText(("reporter",)))
    counters.inc(("source",))
    registry.histogram_family("sizes", "bytes", LabelText(()), (10,)).observe((), 3)
    text = registry.render().decode()
    assert 'istio_tcp_connections_opened_total{reporter="source"} 1\n' in text
    assert 'sizes_bucket{le="10"} 1\nsizes_bucket{le="+Inf"} 1\nsizes_sum{} 3\nsizes_count{} 1\n' in text


def test_histogram_misuse_is_refused_early() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match="increasing and unique"):
        registry.histogram_family("h", "x", LabelText(("a",)), (5, 1))
    family = registry.histogram_family("h", "x", LabelText(("a",)), (1,))
    with pytest.raises(ValueError, match="label key has 2 values for 1 names"):
        family.series(("x", "y"))
    with pytest.raises(ValueError, match="already registered"):
        registry.histogram_family("h", "x", LabelText(("a",)), (1,))


def test_bounds_and_values_render_like_envoy() -> None:
    assert [format_bound(b) for b in (0.5, 1.0, 25.0, 3600000.0, float("inf"))] == [
        "0.5", "1", "25", "3600000", "+Inf"]
    assert [format_value(v) for v in (0, 3.0, 2.25, 10**7)] == ["0", "3", "2.25", "10000000"]
