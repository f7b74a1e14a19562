"""A metrics registry cheap enough for the data path, rendered in the Prometheus text format on demand.

Why not prometheus_client's `Counter.labels(...).inc()` per chunk: resolving a child by 23 label values
costs microseconds (see `bench/metrics_path.py`); here a series is a plain `dict[tuple, int]` entry that
callers add to, and the label text of each series is escaped once and cached. Histograms hand out one
`HistogramSeries` per label key, resolved once by the caller and then observed with a bisect and three adds.
Rendering walks the dicts; it never blocks writers (there is one asyncio loop) and costs O(series).

Not thread-safe by design: every writer and the renderer run on the owning process's loop. Series are
never removed (Prometheus counters are monotonic), as in ztunnel's prometheus-client families.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format 0.0.4

LabelKey = tuple[str, ...]


def escape_label_value(value: str) -> str:
    r"""Label values escape `\`, `"` and newline (exposition format 0.0.4)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    r"""HELP text escapes `\` and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class LabelText:
    """`{name="value",...}` for each label key, built once per key and shared by every family that uses
    the same label names (the istio_tcp_* counters all key on the same label tuples)."""

    __slots__ = ("_cache", "names")

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._cache: dict[LabelKey, str] = {}

    def __call__(self, key: LabelKey) -> str:
        text = self._cache.get(key)
        if text is None:
            if len(key) != len(self.names):
                raise ValueError(f"label key has {len(key)} values for {len(self.names)} names {self.names}")
            pairs = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(self.names, key, strict=True))
            text = self._cache[key] = "{" + pairs + "}"
        return text


class CounterFamily:
    """A counter with labels. `values` is public on purpose: hot paths may add to it directly."""

    __slots__ = ("_label_text", "help", "name", "values")

    def __init__(self, name: str, help_text: str, labels: LabelText) -> None:
        self.name = name  # without the `_total` suffix
        self.help = help_text
        self._label_text = labels
        self.values: dict[LabelKey, int] = {}

    def inc(self, key: LabelKey, amount: int = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def ensure(self, key: LabelKey) -> None:
        """Make the series exist (rendered as 0) without counting anything."""
        self.values.setdefault(key, 0)

    def get(self, key: LabelKey) -> int:
        return self.values.get(key, 0)

    def render(self, out: list[str]) -> None:
        total = f"{self.name}_total"
        out.append(f"# HELP {total} {escape_help(self.help)}\n# TYPE {total} counter\n")
        label_text = self._label_text
        out.extend(f"{total}{label_text(key)} {value}\n" for key, value in self.values.items())


class Counter:
    """A counter without labels."""

    __slots__ = ("help", "name", "value")

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help, self.value = name, help_text, 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def render(self, out: list[str]) -> None:
        total = f"{self.name}_total"
        out.append(f"# HELP {total} {escape_help(self.help)}\n# TYPE {total} counter\n{total} {self.value}\n")


class Gauge:
    """A gauge without labels."""

    __slots__ = ("help", "name", "value")

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help, self.value = name, help_text, 0

    def set(self, value: int) -> None:
        self.value = value

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} gauge\n{self.name} {self.value}\n")


def format_bound(bound: float) -> str:
    """A bucket bound as Envoy's Prometheus output writes `le` (`%.32g`: 0.5, 1, 3600000)."""
    return "+Inf" if math.isinf(bound) else f"{bound:.32g}"


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, others in Python's shortest round-trip form."""
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(value)


class HistogramSeries:
    """One label key's buckets (not cumulative: `buckets[i]` counts values in (bounds[i-1], bounds[i]],
    the last one the values above every bound), sum and count."""

    __slots__ = ("_bounds", "buckets", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.sum: float = 0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self._bounds, value)] += 1  # le is inclusive: value == bound fits it
        self.sum += value
        self.count += 1


class HistogramFamily:
    """A histogram with labels. Hot paths resolve `series(key)` once per key and keep it."""

    __slots__ = ("_label_text", "_le", "bounds", "help", "name", "values")

    def __init__(self, name: str, help_text: str, labels: LabelText, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"histogram {name}: bucket bounds must be increasing and unique, got {list(bounds)}")
        self.name = name
        self.help = help_text
        self._label_text = labels
        self.bounds = tuple(float(b) for b in bounds)
        self._le = [f'le="{format_bound(b)}"' for b in self.bounds] + ['le="+Inf"']
        self.values: dict[LabelKey, HistogramSeries] = {}

    def series(self, key: LabelKey) -> HistogramSeries:
        found = self.values.get(key)
        if found is None:
            self._label_text(key)  # validates the key's length now rather than at render time
            found = self.values[key] = HistogramSeries(self.bounds)
        return found

    def observe(self, key: LabelKey, value: float) -> None:
        self.series(key).observe(value)

    def render(self, out: list[str]) -> None:
        name = self.name
        out.append(f"# HELP {name} {escape_help(self.help)}\n# TYPE {name} histogram\n")
        label_text = self._label_text
        for key, series in self.values.items():
            labels = label_text(key)
            open_labels = labels[:-1] + "," if labels != "{}" else "{"
            cumulative = 0
            for le, count in zip(self._le, series.buckets, strict=True):
                cumulative += count
                out.append(f"{name}_bucket{open_labels}{le}}} {cumulative}\n")
            out.append(f"{name}_sum{labels} {format_value(series.sum)}\n{name}_count{labels} {series.count}\n")


Metric = CounterFamily | Counter | Gauge | HistogramFamily
M = TypeVar("M", CounterFamily, Counter, Gauge, HistogramFamily)


class Registry:
    """The metrics one process exposes. `before_render` hooks run first (e.g. to fold the bytes of open
    connections into the totals); prometheus_client collectors (the process collector) render last."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._hooks: list[Callable[[], None]] = []
        self._collectors = CollectorRegistry(auto_describe=False)
        self._has_collectors = False

    def _add(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter_family(self, name: str, help_text: str, labels: LabelText) -> CounterFamily:
        return self._add(CounterFamily(name, help_text, labels))

    def histogram_family(self, name: str, help_text: str, labels: LabelText,
                         bounds: Sequence[float]) -> HistogramFamily:
        return self._add(HistogramFamily(name, help_text, labels, bounds))

    def counter(self, name: str, help_text: str) -> Counter:
        return self._add(Counter(name, help_text))

    def gauge(self, name: str, help_text: str) -> Gauge:
        return self._add(Gauge(name, help_text))

    def before_render(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)

    def add_collector(self, collector: Any) -> None:
        """A prometheus_client collector (e.g. `prometheus_client.ProcessCollector(registry=None)`)."""
        self._collectors.register(collector)
        self._has_collectors = True

    def metrics(self) -> Iterable[Metric]:
        return self._metrics.values()

    def render(self) -> bytes:
        for hook in self._hooks:
            hook()
        out: list[str] = []
        for metric in self._metrics.values():
            metric.render(out)
        text = "".join(out).encode()
        if self._has_collectors:
            text += generate_latest(self._collectors)
        return text
