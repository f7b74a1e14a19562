"""HTTP and TCP load generator for benchmarks and resilience tests.

Command line: `python3 -m samples.loadclient http|tcp|throughput|sink ...`. From code::

    from samples.loadclient import Pacing, run_http
    result = await run_http("http://127.0.0.1:8000/get", Pacing(rate=100, duration_s=5, concurrency=8))
"""

from __future__ import annotations

from samples.loadclient.http_load import run_http
from samples.loadclient.pacing import Pacing
from samples.loadclient.result import LoadResult
from samples.loadclient.tcp_load import run_tcp

__all__ = ["LoadResult", "Pacing", "run_http", "run_tcp"]
