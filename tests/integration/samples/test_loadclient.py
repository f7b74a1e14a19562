"""The load client against the httpbin sample: counts, exit codes, the importable API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from samples.loadclient import Pacing, run_http

from .programs import REPO_ROOT, Program, Programs


@pytest.fixture(scope="module")
def httpbin(module_programs: Programs) -> Program:
    program = module_programs.start("samples.httpbin.server", "httpbin-for-load")
    module_programs.wait_ready(program)
    return program


def loadclient(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "samples.loadclient", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_fixed_rate_sends_rate_times_duration_requests(httpbin: Program) -> None:
    run = loadclient("http", f"{httpbin.url}/get", "--rate", "50", "--duration", "1", "--json")

    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["requests"] == 50
    assert result["successes"] == 50
    assert result["errors"] == {}
    # The last request is due at 0.98 s: a fixed rate really is spread over the duration.
    assert result["elapsed_s"] >= 0.98
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max"}


def test_error_responses_are_counted_by_status_and_exit_1(httpbin: Program) -> None:
    run = loadclient("http", f"{httpbin.url}/status/503", "--requests", "5", "--header", "X-Test: yes")

    assert run.returncode == 1
    assert "503 x5" in run.stdout


def test_bad_arguments_exit_2() -> None:
    run = loadclient("http", "ftp://example.com/")

    assert run.returncode == 2
    assert "is not an http:// or https:// URL" in run.stderr


async def test_run_http_is_importable_for_benchmarks(httpbin: Program) -> None:
    result = await run_http(f"{httpbin.url}/get", Pacing(requests=40, concurrency=4))

    assert result.requests == 40
    assert result.error_count == 0
    assert result.throughput_rps > 0
