"""Prometheus metrics, counted from the event bus.

Bus listeners count each `RequestCompleted` and `RequestRejected` event as it is published, so
requests made by the console or the CLI in the same process count too. Counting
is a few dictionary updates: cheaper inline than a queue and a task woken per
request. `render()` writes the text exposition format (version 0.0.4).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from ..core.events import Event
from ..core.hooks import RequestRecord, api_of

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Loopback simulators answer in well under a millisecond and real
# models take up to minutes, so the buckets span both.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        index = bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Counters and histograms labelled by provider and model."""

    def __init__(self) -> None:
        self.requests: dict[Labels, float] = defaultdict(float)
        self.errors: dict[Labels, float] = defaultdict(float)
        self.tokens: dict[Labels, float] = defaultdict(float)
        self.cost: dict[Labels, float] = defaultdict(float)
        self.cache_hits: dict[Labels, float] = defaultdict(float)
        self.rejected: dict[Labels, float] = defaultdict(float)
        self.latency: dict[Labels, Histogram] = {}
        self.ttft: dict[Labels, Histogram] = {}

    def count(self, event: Event) -> None:
        """A bus listener for `RequestCompleted`."""
        self.observe(event.record)  # type: ignore[attr-defined]

    def count_rejected(self, event: Event) -> None:
        """A bus listener for `RequestRejected`: the gateway's 4xx answers, by status and error code."""
        self.rejected[(("status", str(event.status)), ("reason", event.reason))] += 1  # type: ignore[attr-defined]

    def observe(self, record: RequestRecord) -> None:
        where = (("provider", record.provider or ""), ("model", record.model or ""))
        self.requests[where + (("status", record.status), ("endpoint", api_of(record.source)))] += 1
        if record.status != "ok":
            self.errors[where + (("kind", record.error_kind or "error"),)] += 1
        if record.prompt_tokens:
            self.tokens[where + (("type", "prompt"),)] += record.prompt_tokens
        if record.completion_tokens:
            self.tokens[where + (("type", "completion"),)] += record.completion_tokens
        if record.cost_usd:
            self.cost[where] += record.cost_usd
        if record.cached:
            self.cache_hits[where] += 1
        if record.status == "ok":
            histogram = self.latency.get(where)
            if histogram is None:
                histogram = self.latency[where] = Histogram(LATENCY_BUCKETS)
            histogram.observe(record.latency_ms / 1000)
            if record.ttft_ms is not None:
                histogram = self.ttft.get(where)
                if histogram is None:
                    histogram = self.ttft[where] = Histogram(TTFT_BUCKETS)
                histogram.observe(record.ttft_ms / 1000)

    def render(self) -> str:
        out: list[str] = []
        _counter(out, "p402_requests_total", "Requests finished, by outcome and the API they came through.",
                 self.requests)
        _counter(out, "p402_errors_total", "Requests that failed, by error kind.", self.errors)
        _counter(out, "p402_tokens_total", "Tokens reported by providers.", self.tokens)
        _counter(out, "p402_cost_usd_total", "Spend in US dollars.", self.cost)
        _counter(out, "p402_cache_hits_total", "Requests answered from the cache.", self.cache_hits)
        _counter(out, "p402_rejected_total", "Requests the gateway refused with a 4xx, by status and reason.", self.rejected)
        _histogram(out, "p402_request_latency_seconds", "Time to the whole answer.", self.latency)
        _histogram(out, "p402_ttft_seconds", "Time to the first token of streamed answers.", self.ttft)
        return "\n".join(out) + "\n"


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _le(bound: float | str) -> str:
    return 'le="' + str(bound) + '"'


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _counter(out: list[str], name: str, help: str, series: dict[Labels, float]) -> None:
    out.append(f"# HELP {name} {help}")
    out.append(f"# TYPE {name} counter")
    for labels, value in sorted(series.items()):
        out.append(f"{name}{_labels(labels)} {_number(value)}")


def _histogram(out: list[str], name: str, help: str, series: dict[Labels, Histogram]) -> None:
    out.append(f"# HELP {name} {help}")
    out.append(f"# TYPE {name} histogram")
    for labels, histogram in sorted(series.items()):
        cumulative = 0
        for bound, count in zip(histogram.bounds, histogram.counts):
            cumulative += count
            out.append(f"{name}_bucket{_labels(labels, _le(bound))} {cumulative}")
        out.append(f"{name}_bucket{_labels(labels, _le('+Inf'))} {histogram.count}")
        out.append(f"{name}_sum{_labels(labels)} {repr(histogram.total)}")
        out.append(f"{name}_count{_labels(labels)} {histogram.count}")
