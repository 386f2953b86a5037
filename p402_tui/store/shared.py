"""Budgets and rate windows that every gateway on one database shares, changed atomically in the database.

A budget is a counter row per scope (`key:<id>`, `session:<id>`) and period: what was spent and what
requests in flight reserved. A reservation is one conditional UPDATE, applied atomically by the database
(SQLite's single writer; PostgreSQL's row lock, under which the WHERE is judged again on the row as it
stands), so gateways together never reserve past a budget. Each reservation has a hold row (its amount,
and when it expires) queued just before it: a hold still there after its expiry belongs to a process that
died, and `reclaim` gives its amount back. A counter row is made from the ledger the first time a scope
needs it, and dropped when its budget changes, to be made again.

A rate window counts a key's requests and tokens for the minute from its first request (a window
anchored there, not a sliding one): an upsert takes a request, or a request's estimated tokens, only if
the window has room, and starts a new window once the old one is a minute old.

Statements use `?` placeholders and SQL that SQLite 3.40 and PostgreSQL 15 both accept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

HOLD_TTL_S = 900.0  # a hold older than this (longer than any request's deadline) belongs to a dead process
WINDOW_S = 60.0
NO_LIMIT = 1 << 62

_USAGE = "SELECT spent, reserved FROM budget_usage WHERE scope = ? AND period_start = ?"
_HOLD = (
    "INSERT INTO budget_holds (id, scope, period_start, amount, expires) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO NOTHING"
)
_UNHOLD = "DELETE FROM budget_holds WHERE id = ?"
_RESERVE = (
    "UPDATE budget_usage SET reserved = reserved + ? "
    "WHERE scope = ? AND period_start = ? AND spent + reserved + ? <= ?"
)
_SETTLE = (
    "UPDATE budget_usage SET spent = spent + ?, "
    "reserved = reserved - COALESCE((SELECT amount FROM budget_holds WHERE id = ?), 0.0) "
    "WHERE scope = ? AND period_start = ?"
)
_SPENT_BY_KEY = (
    "INSERT INTO budget_usage (scope, period_start, spent, reserved) "
    "SELECT ?, ?, COALESCE(SUM(cost_usd), 0.0), 0.0 FROM requests WHERE api_key_id = ? AND ts >= ? "
    "ON CONFLICT (scope, period_start) DO NOTHING"
)
_SPENT_BY_SESSION = (
    "INSERT INTO budget_usage (scope, period_start, spent, reserved) "
    "SELECT ?, ?, COALESCE(SUM(cost_usd), 0.0), 0.0 FROM requests WHERE session_id = ? "
    "ON CONFLICT (scope, period_start) DO NOTHING"
)
_EXPIRED = (
    "FROM budget_holds h WHERE h.scope = budget_usage.scope AND h.period_start = budget_usage.period_start "
    "AND h.expires < ?"
)
_RECLAIM = (
    f"UPDATE budget_usage SET reserved = reserved - (SELECT COALESCE(SUM(h.amount), 0.0) {_EXPIRED}) "
    f"WHERE EXISTS (SELECT 1 {_EXPIRED})"
)

_CURRENT = "CASE WHEN rate_windows.window_start > ? THEN rate_windows.{0} ELSE 0 END"
_TAKE = (
    "INSERT INTO rate_windows (scope, window_start, requests, tokens) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (scope) DO UPDATE SET "
    f"requests = {_CURRENT.format('requests')} + excluded.requests, "
    f"tokens = {_CURRENT.format('tokens')} + excluded.tokens, "
    "window_start = CASE WHEN rate_windows.window_start > ? THEN rate_windows.window_start "
    "ELSE excluded.window_start END "
    f"WHERE {_CURRENT.format('requests')} + excluded.requests <= ? "
    f"AND {_CURRENT.format('tokens')} + excluded.tokens <= ? "
    "RETURNING window_start, requests, tokens"
)
_WINDOW = "SELECT window_start, requests, tokens FROM rate_windows WHERE scope = ?"
_RETOKEN = (
    "UPDATE rate_windows SET tokens = CASE WHEN tokens + ? > 0 THEN tokens + ? ELSE 0 END "
    "WHERE scope = ? AND window_start = ?"
)


# --- budgets ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Hold:
    """A request's reservation against one budget."""

    id: str
    scope: str
    period_start: float
    amount: float


async def reserve(
    store: Any, scope: str, period_start: float, amount: float, budget: float, request_id: str
) -> tuple[Hold | None, float]:
    """(the hold, or None when the budget cannot take `amount`; what is spent and reserved when refused)."""
    hold = Hold(f"{scope}|{request_id}", scope, period_start, amount)
    # Queued before the reservation, so it is committed with it or before it: a reservation never lacks its hold.
    store.put(_HOLD, (hold.id, scope, period_start, amount, time.time() + HOLD_TTL_S))
    row = None
    for tried in range(3):
        if await store.run(_RESERVE, (amount, scope, period_start, amount, budget)):
            return hold, 0.0
        row = await store.fetchone(_USAGE, (scope, period_start))
        if row is not None:
            if float(row["spent"]) + float(row["reserved"]) + amount > budget:
                break
            continue  # the counter was made after the UPDATE looked (by a request beside this one): again
        if tried:
            break
        # No counter yet: made from the ledger (this process's queued rows first), then tried again.
        await store.flush()
        kind, _, owner = scope.partition(":")
        if kind == "key":
            await store.run(_SPENT_BY_KEY, (scope, period_start, owner, period_start))
        else:
            await store.run(_SPENT_BY_SESSION, (scope, period_start, owner))
    store.put(_UNHOLD, (hold.id,))
    return None, 0.0 if row is None else float(row["spent"]) + float(row["reserved"])


def settle(store: Any, hold: Hold, cost_usd: float | None) -> None:
    """The request is over: its real cost is spent, its hold released (queued, never awaited). A call
    without a known price (`None`) stays charged its estimate."""
    spent = hold.amount if cost_usd is None else cost_usd
    store.put(_SETTLE, (spent, hold.id, hold.scope, hold.period_start))
    store.put(_UNHOLD, (hold.id,))


async def usage(store: Any, scope: str, period_start: float) -> tuple[float, float] | None:
    """(spent, reserved) of a budget's counter, or None before its first request."""
    row = await store.fetchone(_USAGE, (scope, period_start))
    return None if row is None else (float(row["spent"]), float(row["reserved"]))


def forget(store: Any, scope: str) -> None:
    """A budget changed: its counters go, to be made again from the ledger when next needed."""
    store.put("DELETE FROM budget_usage WHERE scope = ?", (scope,))


def reclaim(store: Any, now: float | None = None) -> None:
    """Give back what holds past their expiry reserved (their processes died), and drop the holds."""
    cutoff = time.time() if now is None else now
    store.put(_RECLAIM, (cutoff, cutoff))
    store.put("UPDATE budget_usage SET reserved = 0.0 WHERE reserved < 0.0")
    store.put("DELETE FROM budget_holds WHERE expires < ?", (cutoff,))


# --- rate windows ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Window:
    """A window as read after a take: when it started, and what it holds."""

    start: float
    requests: int
    tokens: int

    def reset_in(self, now: float) -> float:
        return max(0.0, self.start + WINDOW_S - now)


async def take(
    store: Any, scope: str, now: float, *, requests: int = 0, tokens: int = 0,
    rpm: int | None = None, tpm: int | None = None,
) -> tuple[bool, Window]:
    """Count `requests` and `tokens` in the scope's window if its limits allow; (taken, the window after)."""
    rpm_cap = NO_LIMIT if rpm is None else rpm
    tpm_cap = NO_LIMIT if tpm is None else tpm
    if requests <= rpm_cap and tokens <= tpm_cap:  # a new window takes them unchecked
        cutoff = now - WINDOW_S
        # The window as the take left it comes back with it: a request taken costs one round trip, not two.
        after = await store.run_returning(
            _TAKE, (scope, now, requests, tokens, cutoff, cutoff, cutoff, cutoff, rpm_cap, cutoff, tpm_cap)
        )
        if after is not None:
            return True, Window(float(after[0]), int(after[1]), int(after[2]))
    row = await store.fetchone(_WINDOW, (scope,))
    if row is None or row["window_start"] <= now - WINDOW_S:
        return False, Window(now, 0, 0)
    return False, Window(float(row["window_start"]), int(row["requests"]), int(row["tokens"]))


def retoken(store: Any, scope: str, window_start: float, delta: int) -> None:
    """Replace a request's estimated tokens by its real count (`delta`: real - estimate), in the window it took them."""
    if delta:
        store.put(_RETOKEN, (delta, delta, scope, window_start))
