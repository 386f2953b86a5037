"""The Sessions pane: agent sessions with their budget, spend and status."""

from __future__ import annotations

from typing import Any

from ..format import bar, usd
from .palette import Palette
from .table import Cell, Column, DrillTable, Row, num

COLUMNS = (
    Column("name", "Session", 15),
    Column("budget", "Budget", 11),
    Column("spent", "Spent", 9),
    Column("requests", "Reqs", 5),
    Column("status", "Status", 6),
)


class SessionsTable(DrillTable):
    def __init__(self) -> None:
        super().__init__(COLUMNS, sort_column="name", id="sessions-table")


def budget_fraction(session: dict[str, Any]) -> float | None:
    budget = session.get("budget_usd")
    if not budget:
        return None
    return (session.get("spent_usd") or 0.0) / budget


def session_cells(session: dict[str, Any], colors: Palette) -> list[Cell]:
    fraction = budget_fraction(session)
    spent = session.get("spent_usd") or 0.0
    if fraction is None:
        budget_text, style = "no budget", colors.muted
    else:
        budget_text = f"{bar(fraction, 6)} {min(fraction, 9.99) * 100:3.0f}%"
        style = colors.error if fraction >= 0.9 else colors.warning if fraction >= 0.7 else colors.ok
    status = session.get("status") or "active"
    return [
        Cell(session.get("name") or session["id"]),
        Cell(budget_text, (fraction is not None, fraction or 0.0), style=style),
        num(usd(spent), spent),
        num(str(session.get("requests") or 0), session.get("requests") or 0),
        Cell(status, style=colors.status(status)),
    ]


def session_rows(sessions: dict[str, dict[str, Any]], rev: int, colors: Palette) -> list[Row]:
    return [Row(sid, rev, lambda s=session: session_cells(s, colors)) for sid, session in sessions.items()]
