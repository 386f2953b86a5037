"""Per-key budgets: reserved on the worst-case estimate before a call, settled on the real cost after.

The ledger is read once per key and period (and again every `RESYNC_S`, after the
writer flushed) so other processes' spend is seen; between reads this process adds
what it settled. A reservation and the check before it happen without yielding, so
concurrent requests cannot together pass a budget by more than their estimates.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import KeyBudgetExceededError

RESYNC_S = 10.0


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


@dataclass(slots=True)
class Book:
    start: float = -1.0
    base_usd: float = 0.0  # the ledger's spend for the period when last read
    settled_usd: float = 0.0  # what this process settled, ever (only grows)
    mark_usd: float = 0.0  # settled_usd when the ledger was last read
    synced_at: float = float("-inf")
    reserved: dict[str, float] = field(default_factory=dict)  # request id -> estimate
    syncing: asyncio.Future[None] | None = None

    def spent(self) -> float:
        return self.base_usd + self.settled_usd - self.mark_usd


class Budgets:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.books: dict[str, Book] = {}

    async def _sync(self, key_id: str, book: Book, start: float) -> None:
        if book.syncing is not None:
            await asyncio.shield(book.syncing)
            return
        book.syncing = asyncio.get_running_loop().create_future()
        try:
            mark = book.settled_usd  # settled before the flush is committed by its end: counted once or twice, never missed
            await self.store.flush()
            spent = await self.store.scalar(
                "SELECT COALESCE(SUM(cost_usd), 0.0) FROM requests WHERE api_key_id = ? AND ts >= ?", (key_id, start)
            )
            book.start, book.base_usd, book.mark_usd, book.synced_at = start, float(spent), mark, time.monotonic()
        finally:
            book.syncing.set_result(None)
            book.syncing = None

    async def spent(self, key_id: str, period: str) -> float:
        """What the key has spent this period, in flight included."""
        book = await self._book(key_id, period)
        return book.spent() + sum(book.reserved.values())

    async def _book(self, key_id: str, period: str) -> Book:
        book = self.books.setdefault(key_id, Book())
        start, _ = period_bounds(period, time.time())
        if book.start != start or time.monotonic() - book.synced_at > RESYNC_S:
            await self._sync(key_id, book, start)
        return book

    async def reserve(self, key_id: str, budget: float, period: str, request_id: str, estimate: float) -> None:
        book = await self._book(key_id, period)
        # From here to the reservation nothing yields: the check and the reservation are one step.
        spent = book.spent() + sum(book.reserved.values())
        if spent + estimate > budget:
            _, reset = period_bounds(period, time.time())
            when = "never resets" if reset is None else f"resets at {datetime.fromtimestamp(reset, timezone.utc):%Y-%m-%d %H:%M} UTC"
            raise KeyBudgetExceededError(
                f"this key's {period} budget of ${budget:.6f} has ${max(0.0, budget - spent):.6f} left; this request is "
                f"estimated at ${estimate:.6f}; the budget {when}",
                period=period, budget_usd=budget, spent_usd=spent, estimated_usd=estimate, resets_at=reset,
            )
        book.reserved[request_id] = estimate

    def settle(self, key_id: str, request_id: str, cost: float) -> None:
        book = self.books.get(key_id)
        if book is None:
            return
        if book.reserved.pop(request_id, None) is not None or cost:
            book.settled_usd += cost
