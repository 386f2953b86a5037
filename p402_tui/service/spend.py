"""What was spent, broken down, and what the ledger suggests doing about it."""

from __future__ import annotations

from typing import Any

from ..core.catalog import Catalog
from ..store import analytics
from ..store.store import Store

PERIOD_PATTERN = analytics.PERIOD_PATTERN
PeriodError = analytics.PeriodError


def period_label(period: str | None, *, start: str | None = None, end: str | None = None) -> str:
    """How a report names its period ("today", "30d", "2026-01-01..2026-01-31"); PeriodError if it is none."""
    return analytics.parse_period(period, start=start, end=end).label


async def spend(
    store: Store, period: str | None, *, by: str = "provider", start: str | None = None, end: str | None = None,
    include_simulated: bool = False, api_key_id: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    window = analytics.parse_period(period, start=start, end=end)
    return await analytics.spend(
        store, window, by or "provider", include_simulated=include_simulated, api_key_id=api_key_id
    )


async def recommendations(
    store: Store, catalog: Catalog, period: str | None, *, start: str | None = None, end: str | None = None,
    include_simulated: bool = False, api_key_id: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    window = analytics.parse_period(period, start=start, end=end)
    return await analytics.recommendations(
        store, catalog, window, include_simulated=include_simulated, api_key_id=api_key_id
    )
