"""The Spend pane: a plotext chart of spend over time by provider, and the totals beside it.

plotext is called directly and its ANSI output turned into Rich text (the
textual-plotext wrapper pins an older plotext). The chart is rebuilt only when
the data or the widget's size changed.
"""

from __future__ import annotations

import plotext
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Static

from ..format import short, short_id, usd
from ..state import CacheInfo, SpendSeries, SpendSummary
from .palette import Palette


def _rgb(colour: str) -> tuple[int, int, int] | None:
    colour = colour.lstrip("#")
    if len(colour) != 6:
        return None
    try:
        return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)
    except ValueError:
        return None


Legend = list[tuple[str, str, float]]  # (provider, colour, spend over the window)
CHART_MIN = (20, 5)  # columns and rows below which plotext draws nothing readable


def render_chart(series: SpendSeries, now: float, width: int, height: int, colours: list[str]) -> tuple[Text, Legend]:
    """The chart as Rich text, and its legend (empty: nothing to draw yet)."""
    window, lines = series.cumulative(now, top=5)
    if not lines:
        return Text(f"no spend in the last {_age(series.bucket_s * series.buckets)}", style="dim"), []
    if width < CHART_MIN[0] or height < CHART_MIN[1]:
        return Text("too small for the chart: z zooms", style="dim"), []
    figure = plotext.figure
    figure.clear()
    figure.theme("simple")
    figure.plot_size(width, height)
    xs = list(range(len(window)))
    for i, (provider, values) in enumerate(lines.items()):
        rgb = _rgb(colours[i % len(colours)])
        marker = plotext.marker("braille", pixel=rgb) if rgb else "braille"
        signal = figure.signal(xs, values, marker=marker)
        signal.lines()
        signal.density("full")
        figure.draw(signal)
    figure.legend(False)  # the legend sits beside the chart, where it covers no line
    last = len(window) - 1
    span = series.bucket_s * last
    figure.ruler("x").ticks([0, last // 2, last], [f"-{_age(span)}", f"-{_age(span / 2)}", "now"])
    top = max(values[-1] for values in lines.values())
    ticks = [top * i / 3 for i in range(4)]
    figure.ruler("y").ticks(ticks, [usd(t) for t in ticks])
    ansi = figure.build().string()
    legend = [(p, colours[i % len(colours)], values[-1]) for i, (p, values) in enumerate(lines.items())]
    return Text.from_ansi(ansi, no_wrap=True), legend


def _age(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 120 else f"{seconds:.0f}s"


class SpendChart(Widget, can_focus=True):
    """Cumulative spend per provider over the window, redrawn on demand."""

    DEFAULT_CSS = "SpendChart { width: 1fr; height: 1fr; }"

    def __init__(self) -> None:
        super().__init__(id="spend-chart")
        self._text: Text = Text("waiting for traffic…", style="dim")
        self._key: tuple[int, int, int, int] | None = None
        self.legend: Legend = []

    def render(self) -> Text:
        return self._text

    def draw(self, series: SpendSeries, now: float, colors: Palette) -> bool:
        """Redraw if the data, the size or the window moved; True if it did."""
        width, height = self.content_size
        key = (series.rev, width, height, int(now // series.bucket_s))
        if key == self._key:
            return False
        self._key = key
        series.trim(now)
        self._text, self.legend = render_chart(series, now, width, height, colors.series())
        self.refresh()
        return True

    def on_resize(self) -> None:
        self._key = None


# The embedders' own names, shortened to fit beside their label in the totals column.
EMBEDDER_NAMES = {"all-MiniLM-L6-v2": "MiniLM-L6", "hashed-ngram": "n-gram hash"}
WIDTH = 28  # the totals column inside its padding (app.tcss: #spend-totals)


def cache_text(cache: CacheInfo) -> str:
    """What the cache matches with: MiniLM-L6 · semantic, n-gram hash · lexical, a provider's model, or off."""
    if not cache.enabled:
        return "off"
    if cache.embedder is None:
        return "loading…"
    label = f" · {cache.label}" if cache.label else ""
    name = EMBEDDER_NAMES.get(cache.embedder, cache.embedder)
    return short(name, WIDTH - len("cache  ") - len(label)) + label


def tier_rows(cache: CacheInfo) -> list[tuple[str, str]]:
    """Hit rate by tier and the semantic tier's CPU per lookup, once there is something to show."""
    rows = []
    if cache.exact_hit_rate is not None and cache.semantic_hit_rate is not None:
        rows.append(("hits exact·sem", f"{cache.exact_hit_rate:.0%} · {cache.semantic_hit_rate:.0%}"))
    if cache.semantic_cpu_ms is not None:
        rows.append(("semantic cpu", f"{cache.semantic_cpu_ms:.2f} ms/req"))
    return rows


def summary_text(summary: SpendSummary, colors: Palette, legend: list[tuple[str, str, float]]) -> Text:
    """Totals, the chart's legend (provider, colour, spend in the window) and the top models."""
    text = Text(no_wrap=True, overflow="ellipsis")
    rows = [("this run" if summary.since_start else "today", usd(summary.today_usd), "bold")]
    if not summary.since_start:
        rows += [("7 days", usd(summary.week_usd), ""), ("30 days", usd(summary.month_usd), "")]
    rows += [
        ("requests", f"{summary.requests_today:,}", ""),
        ("cache saved", usd(summary.saved_usd), colors.ok),
        ("cache hits", f"{summary.cache_hits:,}", ""),
    ]
    for label, value, style in rows:
        text.append(f"{label:<14}", style="dim")
        text.append(f"{value:>14}\n", style=style)
    if summary.cache is not None:
        text.append("cache", style="dim")
        text.append(f"{cache_text(summary.cache):>{WIDTH - len('cache')}}\n")
        for label, value in tier_rows(summary.cache):
            text.append(f"{label:<14}", style="dim")
            text.append(f"{value:>14}\n")
    if legend:
        text.append("in the chart\n", style="bold")
        for provider, colour, total in legend:
            text.append("━━ ", style=colour)
            text.append(f"{short(provider, 13):<13}", style="dim")
            text.append(f"{usd(total):>12}\n")
    if summary.top_models:
        text.append("top models\n" if summary.since_start else "top models · 30 days\n", style="bold")
        for model, cost, _requests in summary.top_models[:3]:
            text.append(f"{short_id(model, 17):<17}", style="dim")
            text.append(f"{usd(cost):>11}\n")
    text.rstrip()
    return text


class SpendPane(Horizontal):
    """The chart on the left, the totals on the right."""

    def compose(self) -> ComposeResult:
        yield SpendChart()
        yield Static(id="spend-totals")

    def on_resize(self) -> None:
        # Where the totals leave the chart too little room (80 columns), they take the pane alone; z brings it back.
        self.query_one(SpendChart).display = self.content_size.width >= WIDTH + 2 + CHART_MIN[0]
        if not getattr(self.app, "paused", True):  # a zoomed chart is drawn for its new size now, not at the next event
            self.call_after_refresh(self.app.show_state)  # type: ignore[attr-defined]

    def show(self, series: SpendSeries, summary: SpendSummary, now: float, colors: Palette, summary_changed: bool) -> None:
        chart = self.query_one(SpendChart)
        if chart.draw(series, now, colors) or summary_changed:
            totals = self.query_one("#spend-totals", Static)
            totals.update(summary_text(summary, colors, chart.legend), layout=False)  # its size is fixed in CSS
