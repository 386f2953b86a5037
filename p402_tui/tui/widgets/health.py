"""The Provider health pane: status, latency, errors, circuit and traffic per provider."""

from __future__ import annotations

import time
from typing import Any

from ..format import ms, pct, sparkline
from .palette import Palette
from .table import Cell, Column, LiveTable, Row, num

COLUMNS = (
    Column("provider", "Provider", 10),
    Column("status", "Status", 10),
    Column("p50", "p50", 5),
    Column("p95", "p95", 5),
    Column("ttft", "TTFT", 5),
    Column("errors", "Err", 5),
    Column("circuit", "Circuit", 9),
    Column("rpm", "Req/m", 5),
    Column("trend", "Latency trend", 13),
)

STATUS_ICON = {"healthy": "●", "degraded": "◐", "down": "○"}
STATUS_RANK = {"down": 0, "degraded": 1, "healthy": 2}


class HealthTable(LiveTable):
    def __init__(self) -> None:
        super().__init__(COLUMNS, sort_column="provider", id="health-table")


def health_cells(health: dict[str, Any], colors: Palette, now: float) -> list[Cell]:
    status = health.get("status", "healthy")
    circuit = health.get("circuit", "closed")
    circuit_text = circuit.replace("_", "-")
    retry_at = health.get("retry_at")
    if circuit == "open" and retry_at:
        circuit_text = f"open {max(retry_at - now, 0):.0f}s"
    error_rate = health.get("error_rate")
    rpm = health.get("requests_per_min") or 0.0
    return [
        Cell(health["provider"]),
        Cell(f"{STATUS_ICON.get(status, '?')} {status}", (STATUS_RANK.get(status, 3), health["provider"]), style=colors.status(status)),
        num(ms(health.get("latency_ms_p50")), health.get("latency_ms_p50")),
        num(ms(health.get("latency_ms_p95")), health.get("latency_ms_p95")),
        num(ms(health.get("ttft_ms_ewma")), health.get("ttft_ms_ewma")),
        num(pct(error_rate), error_rate, style=colors.error if (error_rate or 0) >= 0.2 else ""),
        Cell(circuit_text, circuit, style=colors.status(circuit)),
        num(f"{rpm:.0f}", rpm),
        Cell(sparkline(health.get("history") or [], 13), style=colors.primary),
    ]


def health_rows(snapshot: dict[str, dict[str, Any]], rev: int, colors: Palette, now: float | None = None) -> list[Row]:
    now = time.time() if now is None else now
    return [Row(pid, rev, lambda h=health: health_cells(h, colors, now)) for pid, health in snapshot.items()]
