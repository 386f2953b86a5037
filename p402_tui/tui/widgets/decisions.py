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
# Once the console has seen decisions of more than one gateway (a fleet, or `--workers`): which made each.
FLEET_COLUMNS = (*COLUMNS, Column("gateway", "Gateway", 10))


class DecisionsTable(DrillTable):
    def __init__(self, max_rows: int = 200) -> None:
        super().__init__(COLUMNS, sort_column="time", sort_reverse=True, max_rows=max_rows, id="decisions-table")
        self.fleet = False

    def show_rows(self, state: ConsoleState, colors: Palette) -> None:
        """The state's decisions, with the gateway column once more than one gateway made them."""
        fleet = len(state.gateways) > 1
        if fleet != self.fleet:
            self.fleet = fleet
            self.set_columns(FLEET_COLUMNS if fleet else COLUMNS)
        self.sync(decision_rows(state, colors, gateways=fleet))


def decision_cells(row: DecisionRow, colors: Palette, gateways: bool = False) -> list[Cell]:
    served = row.served_by
    rerouted = row.provider is not None and served != row.chosen
    cells = [
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
    if gateways:
        cells.append(Cell(row.gateway or "-", middle=True))
    return cells


def _estimated(row: DecisionRow) -> str:
    """`~` before a cost billed on our own token count (the provider sent no usage)."""
    return "~" if getattr(row.record, "usage_estimated", False) else ""


def decision_rows(state: ConsoleState, colors: Palette, gateways: bool = False) -> list[Row]:
    return [
        Row(row.key, row.rev, lambda row=row: decision_cells(row, colors, gateways)) for row in state.decisions.values()
    ]
