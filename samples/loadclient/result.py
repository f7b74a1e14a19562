"""What a load run measured: counts, errors by kind and latency percentiles, as text or JSON."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence; 0.0 when it is empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class LoadResult:
    mode: str  # "http" or "tcp"
    target: str
    rate: float | None  # requests per second asked for; None for max rate
    concurrency: int
    requests: int
    errors: Mapping[str, int]  # kind (status code, "timeout", exception name) -> count
    elapsed_s: float
    latency_ms: Mapping[str, float]  # p50, p90, p99, max

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def successes(self) -> int:
        return self.requests - self.error_count

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "target": self.target,
            "rate": self.rate,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "successes": self.successes,
            "error_count": self.error_count,
            "errors": dict(self.errors),
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_rps": round(self.throughput_rps, 1),
            "latency_ms": {name: round(value, 3) for name, value in self.latency_ms.items()},
        }

    def render(self) -> str:
        pace = "max rate" if self.rate is None else f"{self.rate:g}/s"
        latency = "  ".join(f"{name} {value:.2f}" for name, value in self.latency_ms.items())
        lines = [
            f"{self.mode} {self.target}: {pace}, concurrency {self.concurrency}, {self.elapsed_s:.2f} s",
            f"  requests {self.requests}  successes {self.successes}  errors {self.error_count}",
            f"  throughput {self.throughput_rps:.1f} req/s",
            f"  latency ms  {latency}",
        ]
        if self.errors:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.errors.items()))
            lines.append(f"  errors by kind: {kinds}")
        return "\n".join(lines)


@dataclass
class Recorder:
    """Collects one latency and outcome per request; kept lean, it runs on every request."""

    latencies_s: array[float] = field(default_factory=lambda: array("d"))
    errors: Counter[str] = field(default_factory=Counter)

    def record(self, latency_s: float, error: str | None) -> None:
        self.latencies_s.append(latency_s)
        if error is not None:
            self.errors[error] += 1

    def result(self, mode: str, target: str, rate: float | None, concurrency: int, elapsed_s: float) -> LoadResult:
        ordered = sorted(self.latencies_s)
        latency_ms = {name: percentile(ordered, fraction) * 1000 for name, fraction in PERCENTILES}
        latency_ms["max"] = ordered[-1] * 1000 if ordered else 0.0
        return LoadResult(
            mode=mode,
            target=target,
            rate=rate,
            concurrency=concurrency,
            requests=len(self.latencies_s),
            errors=dict(self.errors),
            elapsed_s=elapsed_s,
            latency_ms=latency_ms,
        )
