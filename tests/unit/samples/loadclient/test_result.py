from __future__ import annotations

import json

from samples.loadclient.result import Recorder, percentile


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]

    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.9) == 7.0
    assert percentile([], 0.5) == 0.0


def test_result_counts_errors_by_kind() -> None:
    recorder = Recorder()
    for latency in (0.001, 0.002, 0.003):
        recorder.record(latency, None)
    recorder.record(0.010, "503")
    recorder.record(5.0, "timeout")

    result = recorder.result("http", "http://x/", rate=10.0, concurrency=2, elapsed_s=0.5)

    assert result.requests == 5
    assert result.successes == 3
    assert result.errors == {"503": 1, "timeout": 1}
    assert result.throughput_rps == 10.0
    assert result.latency_ms["max"] == 5000.0
    assert result.latency_ms["p50"] == 3.0
    assert json.loads(json.dumps(result.to_json()))["error_count"] == 2
    assert "timeout x1" in result.render()
