"""Cost intelligence from the ledger: where the money went, and where it need not go.

Every number comes from the `requests` table; nothing is kept twice. Monthly
figures extrapolate the volume seen: (amount over the observed span) / days * 30,
where the observed span runs from the period's first request to its end (at least
one day), so a young ledger is not diluted by empty days.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from ..core.catalog import Catalog
from ..core.costs import cheapest
from ..core.errors import P402Error
from .store import Store

DAY = 86400.0
MONTH_DAYS = 30.0
BREAKDOWNS = {
    "provider": "COALESCE(provider, '(none)')",
    "model": "CASE WHEN model IS NULL THEN '(none)' ELSE provider || '/' || model END",
    "session": "COALESCE(session_id, '(none)')",
    "tag": "COALESCE(tag, '(none)')",
    "key": "COALESCE(api_key_id, '(none)')",
    "day": "date(ts, 'unixepoch', 'localtime')",
}

# Recommendation thresholds, kept here so the numbers behind each advice are visible.
PROVIDER_MIN_ATTEMPTS = 5
PROVIDER_ERROR_RATE = 0.05
SESSION_USED_SHARE = 0.8
SESSION_DAYS_LEFT = 7.0


class PeriodError(P402Error):
    kind = "invalid_period"
    http_status = 400


@dataclass(frozen=True, slots=True)
class Period:
    start: float
    end: float
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "start": self.start,
            "end": self.end,
            "from": datetime.fromtimestamp(self.start).isoformat(timespec="seconds"),
            "to": datetime.fromtimestamp(self.end).isoformat(timespec="seconds"),
        }


# A period's grammar, which the parser below and the gateway's OpenAPI document both use.
DAYS_PATTERN = "[1-9][0-9]{0,4}d"  # up to 99999 days, more than the epoch holds
DATE_PATTERN = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
PERIOD_PATTERN = rf"^(today|all|{DAYS_PATTERN}|({DATE_PATTERN})?\.\.({DATE_PATTERN})?)$"
_DAYS = re.compile(DAYS_PATTERN, re.ASCII)  # fullmatch
_DATE = re.compile(DATE_PATTERN, re.ASCII)
_EPOCH_DAY = date(1970, 1, 2)  # the first whole local day every timezone can turn into a timestamp
_LAST_DAY = date.max - timedelta(days=1)  # the last whose next midnight is a date


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day).timestamp()


def _parse_day(text: str) -> date:
    try:
        if _DATE.fullmatch(text):  # fromisoformat also takes 20240101 and week dates
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise PeriodError(f"{text!r} is not a date; use YYYY-MM-DD")


def parse_period(
    period: str | None = None, *, start: str | None = None, end: str | None = None, now: float | None = None
) -> Period:
    """`today`, `Nd` (7d, 30d...), `all`, or local dates `start`..`end` (both inclusive; YYYY-MM-DD)."""
    now = time.time() if now is None else now
    if start is not None or end is not None:  # given empty, a date is wrong, not absent
        if period is not None:
            raise PeriodError("give a period or from/to dates, not both")
        return _dates(start, end, now)
    if period is None:
        period = "30d"
    if period == "today":
        return Period(_midnight(datetime.fromtimestamp(now).date()), now, "today")
    if period == "all":
        return Period(0.0, now, "all")
    if _DAYS.fullmatch(period):
        return Period(max(0.0, now - int(period[:-1]) * DAY), now, period)
    if ".." in period:
        first_text, _, last_text = period.partition("..")
        return _dates(first_text or None, last_text or None, now)  # either side may be open
    raise PeriodError(f"unknown period {period!r}; use today, 7d, 30d, all, or FROM..TO dates")


def _dates(start: str | None, end: str | None, now: float) -> Period:
    """Local days `start`..`end`, both inclusive; an open side reaches the epoch or today.

    Days beyond what timestamps hold are clamped: nothing was recorded before 1970 or after 9999."""
    first = max(_parse_day(start), _EPOCH_DAY) if start is not None else _EPOCH_DAY
    last = min(_parse_day(end), _LAST_DAY) if end is not None else datetime.fromtimestamp(now).date()
    if last < first:
        raise PeriodError(f"the period ends ({last}) before it starts ({first})")
    return Period(_midnight(first), _midnight(last + timedelta(days=1)), f"{first}..{last}")


# --- spend ------------------------------------------------------------------------------------


KEY_ID = re.compile(r"key-[0-9a-f]{12}")  # what `queries.create_key` makes


def _rows(include_simulated: bool, alias: str = "", api_key_id: str | None = None) -> str:
    """The ledger rows a report counts: simulated ones only when asked for; with `api_key_id`, that key's only."""
    real = "" if include_simulated else f" AND {alias}simulated = 0"
    if api_key_id is None:
        return real
    if not KEY_ID.fullmatch(api_key_id):  # checked, so it can sit in the SQL of every query a report makes
        raise PeriodError(f"no gateway key {api_key_id!r}: key ids look like key-0123456789ab", param="key")
    return f"{real} AND {alias}api_key_id = '{api_key_id}'"


async def spend(
    store: Store, period: Period, by: str = "provider", *, include_simulated: bool = False, api_key_id: str | None = None
) -> dict[str, Any]:
    """Totals for the period and a breakdown by provider, model, session, tag, gateway key or day (most expensive
    first); with `api_key_id`, of that key's requests only."""
    if by not in BREAKDOWNS:
        raise PeriodError(f"cannot break spend down by {by!r}; choose {', '.join(BREAKDOWNS)}")
    window: tuple[Any, ...] = (period.start, period.end)
    real = _rows(include_simulated)
    if api_key_id is not None:
        real += " AND api_key_id = ?"
        window += (api_key_id,)
    totals = await store.fetchone(
        "SELECT COALESCE(SUM(cost_usd), 0.0) AS cost_usd, COUNT(*) AS requests, COALESCE(SUM(saved_usd), 0.0) AS saved_usd, "
        "COALESCE(SUM(cached), 0) AS cached, COALESCE(SUM(status != 'ok'), 0) AS errors, "
        "COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, COALESCE(SUM(completion_tokens), 0) AS completion_tokens, "
        "COALESCE(SUM(priced = 0), 0) AS unpriced, "
        "COALESCE(SUM(CASE WHEN priced = 0 THEN prompt_tokens END), 0) AS unpriced_prompt_tokens, "
        "COALESCE(SUM(CASE WHEN priced = 0 THEN completion_tokens END), 0) AS unpriced_completion_tokens "
        f"FROM requests WHERE ts >= ? AND ts < ?{real}",
        window,
    )
    assert totals is not None
    order = "key" if by == "day" else "cost_usd DESC, key"
    rows = await store.fetchall(
        f"SELECT {BREAKDOWNS[by]} AS key, SUM(cost_usd) AS cost_usd, COUNT(*) AS requests, SUM(saved_usd) AS saved_usd, "
        f"SUM(cached) AS cached, SUM(priced = 0) AS unpriced FROM requests WHERE ts >= ? AND ts < ?{real} "
        f"GROUP BY key ORDER BY {order}",
        window,
    )
    left_out = 0 if include_simulated else await store.scalar(
        "SELECT COUNT(*) FROM requests WHERE ts >= ? AND ts < ? AND simulated = 1"
        + (" AND api_key_id = ?" if api_key_id is not None else ""), window
    )
    return {
        "period": period.to_dict(),
        "by": by,
        "simulated_left_out": left_out,
        "total_usd": totals["cost_usd"],
        "requests": totals["requests"],
        "saved_usd": totals["saved_usd"],
        "cached": totals["cached"],
        "errors": totals["errors"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        # Calls to models without a known price: counted here, not as $0 in total_usd (their cost_usd is null).
        "unpriced": {
            "requests": totals["unpriced"],
            "prompt_tokens": totals["unpriced_prompt_tokens"],
            "completion_tokens": totals["unpriced_completion_tokens"],
        },
        "breakdown": rows,
    }


# --- recommendations ----------------------------------------------------------------------------


def _span_days(first_ts: float | None, period: Period) -> float:
    if first_ts is None:
        return 1.0
    return max((period.end - max(first_ts, period.start)) / DAY, 1.0)


def _monthly(amount: float, span_days: float) -> float:
    return amount / span_days * MONTH_DAYS


async def recommendations(
    store: Store, catalog: Catalog, period: Period, *, include_simulated: bool = False, api_key_id: str | None = None
) -> list[dict[str, Any]]:
    """Advice with its numbers, the biggest monthly saving first; with `api_key_id`, from that key's traffic.

    Each item: {kind, title, detail, monthly_saving_usd (None where the gain is not money), numbers}.
    """
    window = (period.start, period.end)
    real = _rows(include_simulated, api_key_id=api_key_id)
    first_ts = await store.scalar(f"SELECT MIN(ts) FROM requests WHERE ts >= ? AND ts < ?{real}", window)
    span = _span_days(first_ts, period)
    found = (
        await _cheaper_models(store, catalog, window, span, real)
        + await _repeated_prompts(store, window, span, real)
        + await _unreliable_providers(store, window, real)
        + await _sessions_burning(store, period, _rows(include_simulated, "r.", api_key_id))
    )
    found.sort(key=lambda r: -(r["monthly_saving_usd"] or 0.0))
    return found


async def _cheaper_models(
    store: Store, catalog: Catalog, window: tuple[float, float], span: float, real: str
) -> list[dict[str, Any]]:
    """Premium-tier traffic not routed for quality, priced on the cheapest non-premium model with what it needed."""
    rows = await store.fetchall(
        "SELECT provider, model, GROUP_CONCAT(DISTINCT needs) AS needs, COUNT(*) AS requests, "
        "SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, SUM(cost_usd) AS cost_usd "
        f"FROM requests WHERE ts >= ? AND ts < ? AND status = 'ok' AND cached = 0 AND priced = 1{real} "
        "AND (mode IS NULL OR mode != 'quality') AND provider IS NOT NULL AND model IS NOT NULL "
        "GROUP BY provider, model",
        window,
    )
    found = []
    for row in rows:
        current = catalog.models.get(f"{row['provider']}/{row['model']}")
        if current is None or current.tier != "premium":
            continue
        needs = {need for joined in (row["needs"] or "chat").split(",") for need in joined.split(",") if need}
        alternative = cheapest(
            catalog, needs, max_tier="mid",
            input_tokens=row["prompt_tokens"], output_tokens=row["completion_tokens"],
        )  # fmt: skip
        if alternative is None:
            continue
        alternative_cost = alternative.cost(row["prompt_tokens"], row["completion_tokens"])
        saving = row["cost_usd"] - alternative_cost
        if saving <= 0:
            continue
        monthly = _monthly(saving, span)
        found.append(
            {
                "kind": "cheaper_model",
                "title": f"Move {current.id} traffic to {alternative.id}",
                "detail": (
                    f"{row['requests']} requests on premium {current.id} were not routed for quality; "
                    f"{alternative.id} ({alternative.tier}) has every capability they used "
                    f"({', '.join(sorted(needs))}) and would have cost ${alternative_cost:.4f} instead of "
                    f"${row['cost_usd']:.4f}: about ${monthly:.2f} a month at this volume."
                ),
                "monthly_saving_usd": monthly,
                "numbers": {
                    "model": current.id,
                    "alternative": alternative.id,
                    "alternative_tier": alternative.tier,
                    "alternative_quality": alternative.quality,
                    "quality": current.quality,
                    "capabilities": sorted(needs),
                    "requests": row["requests"],
                    "prompt_tokens": row["prompt_tokens"],
                    "completion_tokens": row["completion_tokens"],
                    "cost_usd": row["cost_usd"],
                    "alternative_cost_usd": alternative_cost,
                    "saving_usd": saving,
                    "span_days": span,
                },
            }
        )
    return found


async def _repeated_prompts(store: Store, window: tuple[float, float], span: float, real: str) -> list[dict[str, Any]]:
    """Requests asking exactly what an earlier request of the same namespace asked, answered upstream anyway."""
    row = await store.fetchone(
        "SELECT COUNT(*) AS repeats, COALESCE(SUM(cost_usd), 0.0) AS cost_usd, "
        f"(SELECT COUNT(*) FROM requests WHERE ts >= ?1 AND ts < ?2 AND status = 'ok'{real}) AS requests FROM ("
        "  SELECT cost_usd, cached, ROW_NUMBER() OVER ("
        "    PARTITION BY COALESCE(namespace, ''), prompt_key ORDER BY ts, id) AS occurrence"
        f"  FROM requests WHERE ts >= ?1 AND ts < ?2 AND status = 'ok' AND prompt_key IS NOT NULL{real}"
        ") WHERE occurrence > 1 AND cached = 0",
        window,
    )
    assert row is not None
    if not row["repeats"] or row["cost_usd"] <= 0:
        return []
    rate = row["repeats"] / row["requests"]
    monthly = _monthly(row["cost_usd"], span)
    return [
        {
            "kind": "cache_repeats",
            "title": f"Cache repeated prompts: {rate:.0%} of requests asked again",
            "detail": (
                f"{row['repeats']} of {row['requests']} requests repeated an earlier prompt exactly and still went "
                f"upstream for ${row['cost_usd']:.4f}; the cache would have answered them for free: about "
                f"${monthly:.2f} a month. Keep `cache.enabled` on and stop passing --no-cache / Cache-Control: no-cache."
            ),
            "monthly_saving_usd": monthly,
            "numbers": {
                "repeats": row["repeats"],
                "requests": row["requests"],
                "repeat_rate": rate,
                "saving_usd": row["cost_usd"],
                "span_days": span,
            },
        }
    ]


async def _unreliable_providers(store: Store, window: tuple[float, float], real: str) -> list[dict[str, Any]]:
    """Providers whose failed attempts cost failovers and waiting time."""
    rows = await store.fetchall(
        "SELECT provider, status, error_kind, latency_ms, attempts FROM requests "
        f"WHERE ts >= ? AND ts < ? AND cached = 0{real}",
        window,
    )
    attempts: defaultdict[str, int] = defaultdict(int)
    failures: defaultdict[str, int] = defaultdict(int)
    wasted_ms: defaultdict[str, float] = defaultdict(float)
    failovers: defaultdict[str, int] = defaultdict(int)
    for row in rows:
        tries = json.loads(row["attempts"] or "[]")
        if not tries and row["provider"]:
            # No attempt list: the row itself is the one try.
            tries = [{"provider": row["provider"], "error_kind": row["error_kind"] if row["status"] != "ok" else None,
                      "latency_ms": row["latency_ms"]}]  # fmt: skip
        for position, attempt in enumerate(tries):
            provider = attempt.get("provider")
            if not provider:
                continue
            attempts[provider] += 1
            if attempt.get("error_kind"):
                failures[provider] += 1
                wasted_ms[provider] += attempt.get("latency_ms") or 0.0
                if position < len(tries) - 1:
                    failovers[provider] += 1
    found = []
    for provider, total in attempts.items():
        failed = failures[provider]
        rate = failed / total
        if total < PROVIDER_MIN_ATTEMPTS or rate < PROVIDER_ERROR_RATE:
            continue
        found.append(
            {
                "kind": "unreliable_provider",
                "title": f"{provider} fails {rate:.0%} of attempts",
                "detail": (
                    f"{failed} of {total} attempts on {provider} failed; {failovers[provider]} requests failed over "
                    f"after waiting {wasted_ms[provider]:.0f} ms in all ({wasted_ms[provider] / failed:.0f} ms each). "
                    f"Exclude it or route around it until it recovers."
                ),
                "monthly_saving_usd": None,
                "numbers": {
                    "provider": provider,
                    "attempts": total,
                    "failures": failed,
                    "error_rate": rate,
                    "failovers": failovers[provider],
                    "added_latency_ms": wasted_ms[provider],
                    "added_latency_ms_per_failure": wasted_ms[provider] / failed,
                },
            }
        )
    found.sort(key=lambda r: -r["numbers"]["added_latency_ms"])
    return found


async def _sessions_burning(store: Store, period: Period, real: str) -> list[dict[str, Any]]:
    """Active sessions that have used most of their budget or will run out within a week at their pace."""
    rows = await store.fetchall(
        "SELECT s.id, s.name, s.budget_usd, "
        f"(SELECT COALESCE(SUM(cost_usd), 0.0) FROM requests r WHERE r.session_id = s.id{real}) AS spent_usd, "
        f"(SELECT COALESCE(SUM(cost_usd), 0.0) FROM requests r WHERE r.session_id = s.id AND r.ts >= ? AND r.ts < ?{real}) "
        "AS period_usd, "
        f"(SELECT MIN(ts) FROM requests r WHERE r.session_id = s.id AND r.ts >= ? AND r.ts < ?{real}) AS first_ts "
        "FROM agent_sessions s WHERE s.status = 'active' AND s.budget_usd IS NOT NULL",
        (period.start, period.end, period.start, period.end),
    )
    found = []
    for row in rows:
        budget, spent = row["budget_usd"], row["spent_usd"]
        per_day = row["period_usd"] / _span_days(row["first_ts"], period)
        remaining = budget - spent
        days_left = remaining / per_day if per_day > 0 else None
        used = spent / budget if budget > 0 else 1.0
        if used < SESSION_USED_SHARE and (days_left is None or days_left > SESSION_DAYS_LEFT):
            continue
        runway = "its budget is spent" if remaining <= 0 else (
            f"at ${per_day:.4f} a day it runs out in {days_left:.1f} days" if days_left is not None else "it is idle"
        )
        found.append(
            {
                "kind": "session_budget",
                "title": f"Session {row['name']!r} has used {used:.0%} of its budget",
                "detail": f"{row['id']} spent ${spent:.4f} of ${budget:.4f}; {runway}. Raise the budget or rein it in.",
                "monthly_saving_usd": None,
                "numbers": {
                    "session_id": row["id"],
                    "budget_usd": budget,
                    "spent_usd": spent,
                    "used_share": used,
                    "per_day_usd": per_day,
                    "days_left": days_left,
                },
            }
        )
    return found


__all__ = ["BREAKDOWNS", "Period", "PeriodError", "parse_period", "recommendations", "spend"]
