"""The Decisions pane: every routed request, newest first, with what it cost and how it went."""

from __future__ import annotations

from ..format import clock, ms, usd
from ..state import ConsoleState, DecisionRow
from .palette import Palette
from .table import Cell, Column, DrillTable, Row, num

COLUMNS = (
    Column("time", "Time", 8),
    Column("mode", "Mode", 8),
    Column("model", "Chosen model", 16, flex=True),
    Column("cands", "Cand", 4),
    Column("est", "Est", 9),
    Column("cost", "Cost", 9),
    Column("latency", "Time", 6),
    Column("tries", "Try", 3),
    Column("status", "Status", 7),
)


class DecisionsTable(DrillTable):
    def __init__(self, max_rows: int = 200) -> None:
        super().__init__(COLUMNS, sort_column="time", sort_reverse=True, max_rows=max_rows, id="decisions-table")


def decision_cells(row: DecisionRow, colors: Palette) -> list[Cell]:
    served = row.served_by
    rerouted = row.provider is not None and served != row.chosen
    return [
        Cell(clock(row.ts), (row.ts, row.key)),
        Cell(f"{row.mode} {row.api}" if row.api else row.mode),  # which API, when not chat completions
        Cell(served, style=colors.warning if rerouted else "", middle=True),
        num(str(row.candidates) if row.decision is not None or row.candidates else "-", row.candidates),
        num(usd(row.est_cost), row.est_cost),
        num(_estimated(row) + usd(row.cost), row.cost),
        num(ms(row.latency_ms), row.latency_ms),
        num(str(row.attempts or "-"), row.attempts, style=colors.warning if row.attempts > 1 else ""),
        Cell(row.status, style=colors.status(row.status)),
    ]


def _estimated(row: DecisionRow) -> str:
    """`~` before a cost billed on our own token count (the provider sent no usage)."""
    return "~" if getattr(row.record, "usage_estimated", False) else ""


def decision_rows(state: ConsoleState, colors: Palette) -> list[Row]:
    return [Row(row.key, row.rev, lambda row=row: decision_cells(row, colors)) for row in state.decisions.values()]
