"""One routing decision in full: every candidate's scores, every exclusion, every attempt."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.widgets import Footer, Static

from ..format import ms, stamp, usd
from ..state import DecisionRow
from ..widgets.palette import Palette, palette_of
from ..widgets.pane import Pane
from ..widgets.table import Cell, Column, LiveTable, Row, num
from .base import PaneScreen

CANDIDATE_COLUMNS = (
    Column("rank", "#", 3),
    Column("model", "Model", 30, flex=True),
    Column("tier", "Tier", 7),
    Column("score", "Score", 6),
    Column("cost", "Cost", 6),
    Column("quality", "Quality", 7),
    Column("speed", "Speed", 6),
    Column("health", "Health", 6),
    Column("est", "Est cost", 10),
    Column("latency", "Est latency", 11),
)
EXCLUDED_COLUMNS = (Column("model", "Model", 29, flex=True), Column("reason", "Reason", 27))
ATTEMPT_COLUMNS = (
    Column("n", "#", 2),
    Column("model", "Model", 24, flex=True),
    Column("result", "Result", 6),
    Column("kind", "Error kind", 12),
    Column("error", "Error", 29),
    Column("latency", "Latency", 7),
)


def _score(value: Any) -> Cell:
    return num("-" if value is None else f"{value:.3f}", value)


def candidate_rows(decision: dict[str, Any], colors: Palette, served_by: str | None = None) -> list[Row]:
    """The ranked candidates: the chosen one in green, the one that answered after a failover in amber."""
    chosen = (decision.get("chosen") or {}).get("id")
    rows = []
    for rank, candidate in enumerate(decision.get("candidates") or [], 1):
        components = candidate.get("components") or {}
        model_id = candidate["id"]
        if model_id == chosen:
            label, style = f"✓ {model_id}", f"bold {colors.ok}"
        elif model_id == served_by:
            label, style = f"» {model_id}", f"bold {colors.warning}"
        else:
            label, style = f"  {model_id}", ""
        cells = [
            num(str(rank), rank),
            Cell(label, model_id, style=style, middle=True),
            Cell(candidate.get("tier") or "-"),
            _score(candidate.get("score")),
            _score(components.get("cost")),
            _score(components.get("quality")),
            _score(components.get("speed")),
            _score(components.get("health")),
            num(usd(candidate.get("est_cost_usd")), candidate.get("est_cost_usd")),
            num(ms(candidate.get("est_latency_ms")), candidate.get("est_latency_ms")),
        ]
        rows.append(Row(model_id, 0, lambda cells=cells: cells))
    return rows


def excluded_rows(decision: dict[str, Any]) -> list[Row]:
    return [
        Row(item["id"], 0, lambda item=item: [Cell(item["id"], middle=True), Cell(item.get("reason") or "-")])
        for item in decision.get("excluded") or []
    ]


def attempts_of(row: DecisionRow) -> list[dict[str, Any]]:
    """Each try: from the finished request's record, else the failures seen so far."""
    record = row.record
    if record is not None and record.attempts:
        return [
            {
                "provider": a.provider,
                "model": a.model,
                "error_kind": a.error_kind,
                "error": a.error,
                "latency_ms": a.latency_ms or None,
            }
            for a in record.attempts
        ]
    return [
        {"provider": f["provider"], "model": f["model"], "error_kind": f["error_kind"], "error": f["error"], "latency_ms": None}
        for f in row.failures
    ]


def attempt_rows(attempts: list[dict[str, Any]], colors: Palette) -> list[Row]:
    rows = []
    for n, attempt in enumerate(attempts, 1):
        failed = attempt.get("error_kind") is not None
        model = f"{attempt['provider']}/{attempt['model']}"
        cells = [
            num(str(n), n),
            Cell(model, middle=True),
            Cell("failed" if failed else "ok", style=colors.status("error" if failed else "ok")),
            Cell(attempt.get("error_kind") or "-"),
            Cell(attempt.get("error") or "-"),
            num(ms(attempt.get("latency_ms")), attempt.get("latency_ms")),
        ]
        rows.append(Row(str(n), 0, lambda cells=cells: cells))
    return rows


def summary_text(row: DecisionRow, decision: dict[str, Any] | None, colors: Palette) -> Text:
    text = Text()
    text.append(f"{row.key}", style="bold")
    text.append(f"   {stamp(row.ts)}   mode ", style="dim")
    text.append(row.mode, style="bold")
    text.append("   status ", style="dim")
    text.append(row.status, style=colors.status(row.status))
    if row.gateway is not None:  # one of a fleet's gateways (or workers) made it
        text.append("   gateway ", style="dim")
        text.append(row.gateway, style="bold")
    text.append("\nchosen ", style="dim")
    text.append(row.chosen, style=f"bold {colors.ok}")
    if row.provider and row.served_by != row.chosen:
        text.append("   served by ", style="dim")
        text.append(row.served_by, style=f"bold {colors.warning}")
    text.append("   est ", style="dim")
    text.append(usd(row.est_cost))
    text.append("   actual ", style="dim")
    text.append(usd(row.cost))
    text.append("   latency ", style="dim")
    text.append(ms(row.latency_ms))
    text.append("   ttft ", style="dim")
    text.append(ms(row.ttft_ms))
    text.append("   attempts ", style="dim")
    text.append(str(row.attempts or "-"))
    if decision is not None:
        text.append("\nprompt ", style="dim")
        text.append(f"{decision.get('prompt_tokens', 0):,} tokens")
        text.append("   expected output ", style="dim")
        text.append(f"{decision.get('est_output_tokens', 0):,} tokens")
        text.append("   decided in ", style="dim")
        text.append(f"{decision.get('decision_us', 0):.0f}µs")
        fallbacks = decision.get("fallbacks") or []
        if fallbacks:
            text.append("   fallbacks ", style="dim")
            text.append(", ".join(fallbacks[:3]) + (" …" if len(fallbacks) > 3 else ""))
        options = {k: v for k, v in (decision.get("options") or {}).items() if v not in (None, [], True) and k != "mode"}
        if options:
            text.append("\noptions ", style="dim")
            text.append("  ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in options.items()))
    else:
        text.append("\nno routing decision: ", style="dim")
        text.append({"cached": "answered from the cache", "refused": "refused by the gateway"}.get(
            row.status, "the request failed before routing"))
    if row.error:
        text.append("\nerror ", style="dim")
        text.append(row.error, style=colors.error)
    return text


class DecisionScreen(PaneScreen):
    """Opened with enter on a decision; escape goes back."""

    BINDINGS = [
        Binding("escape,backspace", "back", "Back"),
        Binding("1", "focus_pane('candidates')", "Candidates", show=False),
        Binding("2", "focus_pane('excluded')", "Excluded", show=False),
        Binding("3", "focus_pane('attempts')", "Attempts", show=False),
    ]

    def __init__(self, row: DecisionRow) -> None:
        super().__init__(id="decision-screen")
        self.row = row
        self.decision: dict[str, Any] | None = row.decision.to_dict() if row.decision is not None else None
        self._rev = row.rev

    def show_state(self, state: object) -> None:
        """Live while open: a request still running fills in its outcome and attempts as they come."""
        if self.row.rev != self._rev and self.is_mounted:
            self._rev = self.row.rev
            self.show_decision()

    def compose(self) -> ComposeResult:
        yield Static(id="decision-title", classes="screen-title")
        yield Static(id="decision-summary")
        with Grid(id="decision-panes"):
            yield Pane("Candidates", LiveTable(CANDIDATE_COLUMNS, sort_column="rank"), id="candidates")
            yield Pane("Excluded", LiveTable(EXCLUDED_COLUMNS, sort_column="model"), id="excluded")
            yield Pane("Attempts", LiveTable(ATTEMPT_COLUMNS, sort_column="n"), id="attempts")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#decision-title", Static).update(Text(" Decision ", style="bold reverse"))
        if self.decision is None and self.row.decision is None and self.row.status not in ("cached", "refused"):
            self._load()
        self.show_decision()
        self.query_one("#candidates", Pane).focus_body()

    def _load(self) -> None:
        source = getattr(self.app, "source", None)
        if source is not None:
            self.run_worker(self._fetch(source), exclusive=True, group="decision", exit_on_error=False)

    async def _fetch(self, source: Any) -> None:
        try:
            found = await source.decision(self.row.key)
        except Exception as error:
            self.notify(f"could not read decision {self.row.key}: {error}", severity="error")
            return
        if found is not None:
            self.decision = found
            self.show_decision()

    def redraw(self) -> None:
        self.show_decision()

    def show_decision(self) -> None:
        colors = palette_of(self.app)
        decision = self.decision or {}
        self.query_one("#decision-summary", Static).update(summary_text(self.row, self.decision, colors))
        panes = {
            "candidates": candidate_rows(decision, colors, self.row.served_by),
            "excluded": excluded_rows(decision),
            "attempts": attempt_rows(attempts_of(self.row), colors),
        }
        for name, rows in panes.items():
            self.fill(name, rows)

    def action_back(self) -> None:
        if self.maximized is not None:
            self.minimize()
        else:
            self.app.pop_screen()
