"""Per-key budgets: reserved on the worst-case estimate before a call, settled on the real cost after.

The reservation is made in the database (`store.shared`), atomically, so every gateway on it
shares one budget: together they never reserve past it, and a request's real cost (never above
its estimate) is what stays spent.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from ..store import shared
from .errors import KeyBudgetExceededError


def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """(start, reset) of the budget period holding `now`, in UTC; `total` never resets."""
    if period == "total":
        return 0.0, None
    day = datetime.fromtimestamp(now, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day.timestamp(), day.timestamp() + 86400
    start = day.replace(day=1)
    reset = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.timestamp(), reset.timestamp()


class Budgets:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.holds: dict[str, shared.Hold] = {}  # request id -> its reservation, until settled

    async def reserve(self, key_id: str, budget: float, period: str, request_id: str, estimate: float) -> None:
        now = time.time()
        start, reset = period_bounds(period, now)
        hold, spent = await shared.reserve(self.store, f"key:{key_id}", start, estimate, budget, request_id)
        if hold is None:
            when = "never resets" if reset is None else f"resets at {datetime.fromtimestamp(reset, timezone.utc):%Y-%m-%d %H:%M} UTC"
            raise KeyBudgetExceededError(
                f"this key's {period} budget of ${budget:.6f} has ${max(0.0, budget - spent):.6f} left; this request is "
                f"estimated at ${estimate:.6f}; the budget {when}",
                period=period, budget_usd=budget, spent_usd=spent, estimated_usd=estimate, resets_at=reset,
            )
        self.holds[request_id] = hold

    def settle(self, request_id: str, cost: float) -> None:
        hold = self.holds.pop(request_id, None)
        if hold is not None:
            shared.settle(self.store, hold, cost)
