"""Cost intelligence from the ledger: where the money went, and where it need not go.

Whole UTC hours are read from the ledger's hourly sums (`store.rollups`), the cut hours at a
period's edges from the ledger itself, so every figure is the ledger's to the row. Monthly
figures extrapolate the volume seen: (amount over the observed span) / days * 30,
where the observed span runs from the period's first request to its end (at least
one day), so a young ledger is not diluted by empty days.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from ..core.catalog import Catalog
from ..core.costs import cheapest
from ..core.errors import P402Error
from . import rollups
from .rollups import HOUR
from .store import Store

DAY = 86400.0
MONTH_DAYS = 30.0
BREAKDOWNS = ("provider", "model", "session", "tag", "key", "day")

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


# --- periods as whole hours and edges ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cut:
    """A period as the whole hours [lo, hi) the rollups hold, and the ledger's ranges around them."""

    lo: int
    hi: int
    edges: tuple[tuple[float, float], ...]


def _cut(period: Period) -> _Cut:
    lo, hi = math.ceil(period.start / HOUR), math.floor(period.end / HOUR)
    if lo >= hi:
        return _Cut(0, 0, ((period.start, period.end),) if period.start < period.end else ())
    edges = []
    if period.start < lo * HOUR:
        edges.append((period.start, float(lo * HOUR)))
    if hi * HOUR < period.end:
        edges.append((float(hi * HOUR), period.end))
    return _Cut(lo, hi, tuple(edges))


@dataclass(frozen=True, slots=True)
class _Rows:
    """Which rows a report counts: simulated ones only when asked for; with `api_key_id`, that key's only."""

    include_simulated: bool = False
    api_key_id: str | None = None
    simulated_only: bool = False

    def sql(self, *, both: bool = False) -> tuple[str, tuple[Any, ...]]:
        """The filter; with `both`, of the key only: simulated and not, for the caller to tell apart."""
        where = "" if both or self.include_simulated else " AND simulated = 1" if self.simulated_only else " AND simulated = 0"
        if self.api_key_id is None:
            return where, ()
        return where + " AND api_key_id = ?", (self.api_key_id,)


# Ledger rows in the shape of `spend_hourly`'s (aliased `r`); repeats are worked out only when asked for.
_LEDGER_SPEND = (
    "1, CASE WHEN status = 'ok' THEN 1 ELSE 0 END, cached, COALESCE(cost_usd, 0.0), saved_usd, prompt_tokens, "
    "completion_tokens, 1 - priced, CASE WHEN priced = 0 THEN prompt_tokens ELSE 0 END, "
    "CASE WHEN priced = 0 THEN completion_tokens ELSE 0 END, ts"
)
_REPEATS = (
    f"CASE WHEN status = 'ok' AND cached = 0 AND prompt_key IS NOT NULL AND {rollups.REPEAT_SQL} THEN 1 ELSE 0 END, "
    f"CASE WHEN status = 'ok' AND cached = 0 AND prompt_key IS NOT NULL AND {rollups.REPEAT_SQL} "
    "THEN COALESCE(cost_usd, 0.0) ELSE 0.0 END"
)


def _count(column: str) -> str:
    # PostgreSQL sums BIGINTs as NUMERIC, which Python gets as Decimal: counts come back as integers.
    return f"CAST(SUM({column}) AS BIGINT) AS {column}"


_SUMS = ", ".join(
    [*(_count(c) for c in ("requests", "ok", "cached", "prompt_tokens", "completion_tokens", "unpriced",
                           "unpriced_prompt_tokens", "unpriced_completion_tokens", "repeats")),
     "SUM(cost_usd) AS cost_usd", "SUM(saved_usd) AS saved_usd", "MIN(first_ts) AS first_ts",
     "SUM(repeat_cost_usd) AS repeat_cost_usd"]
)  # fmt: skip
_ROLLED = ", ".join(
    [*(f"SUM({c}) AS {c}" for c in ("requests", "ok", "cached", "cost_usd", "saved_usd", "prompt_tokens",
                                    "completion_tokens", "unpriced", "unpriced_prompt_tokens",
                                    "unpriced_completion_tokens")),
     "MIN(first_ts) AS first_ts", "SUM(repeats) AS repeats", "SUM(repeat_cost_usd) AS repeat_cost_usd"]
)  # fmt: skip
# Per breakdown: the dim of `spend_hourly` it reads, and its key there and in the ledger.
_KEYS = {
    "provider": ("provider", "value", rollups.DIM_SQL["provider"]),
    "model": ("model", "value", rollups.DIM_SQL["model"]),
    "session": ("session", "value", rollups.DIM_SQL["session"]),
    "tag": ("tag", "value", rollups.DIM_SQL["tag"]),
    "key": (
        "provider", f"CASE WHEN api_key_id = '' THEN '{rollups.NONE}' ELSE api_key_id END",
        f"COALESCE(api_key_id, '{rollups.NONE}')",
    ),
}


def _spend_parts(
    by: str, cut: _Cut, rows: _Rows, *, repeats: bool = False, skip_hours: tuple[int, ...] = (),
    edge_keys: tuple[int, ...] = (), both: bool = False,
) -> tuple[str, tuple[Any, ...]]:  # fmt: skip
    """A UNION ALL of the rollup's whole hours and the ledger's edges, in `spend_hourly`'s columns plus `key`
    (and, with `both`, `simulated`: simulated rows are kept, for the caller to tell apart).

    `by="day"` keys rollup rows by hour and edge i by -(i + 1) (`edge_keys`), for the caller to date."""
    where, params = rows.sql(both=both)
    simulated = "simulated, " if both else ""
    dim, roll_key, ledger_key = _KEYS["provider" if by in ("day", "total") else by]
    if by == "day":
        roll_key = "hour"
    skip = f" AND hour NOT IN ({', '.join('?' for _ in skip_hours)})" if skip_hours else ""
    # The whole hours summed per group first: a hundred thousand rollup rows become a few dozen before the
    # union, which PostgreSQL would otherwise sort on disk (its estimate of a union's groups is blind).
    parts = [
        (
            f"SELECT {roll_key} AS key, {simulated}{_ROLLED} FROM spend_hourly "
            f"WHERE dim = ? AND hour >= ? AND hour < ?{skip}{where} GROUP BY {roll_key}{', simulated' if both else ''}"
        )
    ]
    args: list[Any] = [dim, cut.lo, cut.hi, *skip_hours, *params]
    for index, (start, end) in enumerate(cut.edges):
        key = "CAST(? AS INTEGER)" if by == "day" else ledger_key
        parts.append(
            f"SELECT {key}, {simulated}{_LEDGER_SPEND}, {_REPEATS if repeats else '0, 0.0'} "
            f"FROM requests r WHERE ts >= ? AND ts < ?{where}"
        )
        args += [*((edge_keys[index],) if by == "day" else ()), start, end, *params]
    return " UNION ALL ".join(parts), tuple(args)


async def _spend_rows(store: Store, by: str, cut: _Cut, rows: _Rows, **kw: Any) -> list[dict[str, Any]]:
    parts, args = _spend_parts(by, cut, rows, **kw)
    return await store.fetchall(f"SELECT key, {_SUMS} FROM ({parts}) AS parts GROUP BY key", args)


_ADDED = ("requests", "ok", "cached", "cost_usd", "saved_usd", "prompt_tokens", "completion_tokens", "unpriced",
          "unpriced_prompt_tokens", "unpriced_completion_tokens")  # fmt: skip


async def _spend_groups(store: Store, by: str, cut: _Cut, rows: _Rows) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """The breakdown's groups, the period's totals and how many simulated requests were left out, from one
    read of the breakdown's dim: every ledger row has one value in each dim, so its groups add up to the
    totals, and grouped by `simulated` too they also count what the report leaves out."""
    parts, args = _spend_parts(by, cut, rows, both=True)
    found = await store.fetchall(f"SELECT key, simulated, {_SUMS} FROM ({parts}) AS parts GROUP BY key, simulated", args)
    groups: dict[Any, dict[str, Any]] = {}
    totals: dict[str, Any] = dict.fromkeys(_ADDED, 0)
    left_out = 0
    for row in found:
        if row["simulated"] and not rows.include_simulated:
            left_out += row["requests"]
            continue
        del row["simulated"]
        group = groups.get(row["key"])
        if group is None:
            groups[row["key"]] = row
        else:  # the same key simulated and not, both counted
            for column in _ADDED:
                group[column] += row[column]
        for column in _ADDED:
            totals[column] += row[column]
    return list(groups.values()), totals, left_out


async def _spend_total(store: Store, cut: _Cut, rows: _Rows, *, repeats: bool = False) -> dict[str, Any]:
    parts, args = _spend_parts("total", cut, rows, repeats=repeats)
    total = await store.fetchone(f"SELECT {_SUMS} FROM ({parts}) AS parts", args)
    assert total is not None
    return {k: v or 0 for k, v in total.items()} | {"first_ts": total["first_ts"]}


async def _by_day(store: Store, period: Period, cut: _Cut, rows: _Rows) -> list[dict[str, Any]]:
    """Local days: whole hours dated by their start, and ledger ranges each within one local day.

    An hour that a local midnight cuts (zones off the whole hour) is read from the ledger too."""
    midnights = []
    day = datetime.fromtimestamp(max(period.start, 0.0)).date() + timedelta(days=1)
    while day <= _LAST_DAY and (m := _midnight(day)) < period.end:
        midnights.append(m)
        day += timedelta(days=1)
    split = [m for m in midnights if m % HOUR]
    skip = tuple(sorted({int(m // HOUR) for m in split if cut.lo <= m // HOUR < cut.hi}))
    ranges = [*cut.edges, *((h * HOUR, (h + 1) * HOUR) for h in skip)]
    edges = []
    for start, end in ranges:  # cut at the local midnights within
        for m in midnights:
            if start < m < end:
                edges.append((start, m))
                start = m
        edges.append((start, end))
    ledger = _Cut(cut.lo, cut.hi, tuple(edges))
    labels = tuple(-(i + 1) for i in range(len(edges)))
    found = await _spend_rows(store, "day", ledger, rows, skip_hours=skip, edge_keys=labels)
    days: dict[str, dict[str, Any]] = {}
    for row in found:
        key = row["key"]
        ts = edges[-key - 1][0] if key < 0 else key * HOUR
        label = datetime.fromtimestamp(ts).date().isoformat()
        if label in days:
            into = days[label]
            for column in ("requests", "cost_usd", "saved_usd", "cached", "unpriced"):
                into[column] += row[column]
        else:
            days[label] = row | {"key": label}
    return list(days.values())


def _breakdown(row: dict[str, Any]) -> dict[str, Any]:
    # A group of unpriced calls only has no known cost: null, not $0.
    cost = None if row["unpriced"] == row["requests"] else row["cost_usd"]
    return {"key": row["key"], "cost_usd": cost, "requests": row["requests"], "saved_usd": row["saved_usd"],
            "cached": row["cached"], "unpriced": row["unpriced"]}  # fmt: skip


def _key_filter(api_key_id: str | None) -> str | None:
    if api_key_id is not None and not KEY_ID.fullmatch(api_key_id):
        raise PeriodError(f"no gateway key {api_key_id!r}: key ids look like key-0123456789ab", param="key")
    return api_key_id


# --- spend ------------------------------------------------------------------------------------


KEY_ID = re.compile(r"key-[0-9a-f]{12}")  # what `queries.create_key` makes


async def spend(
    store: Store, period: Period, by: str = "provider", *, include_simulated: bool = False, api_key_id: str | None = None
) -> dict[str, Any]:
    """Totals for the period and a breakdown by provider, model, session, tag, gateway key or day (most expensive
    first); with `api_key_id`, of that key's requests only."""
    if by not in BREAKDOWNS:
        raise PeriodError(f"cannot break spend down by {by!r}; choose {', '.join(BREAKDOWNS)}")
    cut = _cut(period)
    rows = _Rows(include_simulated, api_key_id)
    if by == "day":
        totals = await _spend_total(store, cut, rows)
        breakdown = sorted((_breakdown(r) for r in await _by_day(store, period, cut, rows)), key=lambda b: b["key"])
        left_out = 0 if include_simulated else (await _spend_total(store, cut, _Rows(api_key_id=api_key_id,
                                                                                       simulated_only=True)))["requests"]  # fmt: skip
    else:
        groups, totals, left_out = await _spend_groups(store, by, cut, rows)
        breakdown = [_breakdown(r) for r in groups]
        breakdown.sort(key=lambda b: (b["cost_usd"] is None, -(b["cost_usd"] or 0.0), b["key"]))
    return {
        "period": period.to_dict(),
        "by": by,
        "simulated_left_out": left_out,
        "total_usd": float(totals["cost_usd"]),
        "requests": totals["requests"],
        "saved_usd": float(totals["saved_usd"]),
        "cached": totals["cached"],
        "errors": totals["requests"] - totals["ok"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        # Calls to models without a known price: counted here, not as $0 in total_usd (their cost_usd is null).
        "unpriced": {
            "requests": totals["unpriced"],
            "prompt_tokens": totals["unpriced_prompt_tokens"],
            "completion_tokens": totals["unpriced_completion_tokens"],
        },
        "breakdown": breakdown,
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
    A repeat is a request answered upstream whose exact prompt an answered request of its namespace had asked
    within the cache's default lifetime before it (under any key: the cache is shared by namespace).
    """
    cut = _cut(period)
    rows = _Rows(include_simulated, _key_filter(api_key_id))
    totals = await _spend_total(store, cut, rows, repeats=True)
    span = _span_days(totals["first_ts"], period)
    found = (
        await _cheaper_models(store, catalog, cut, span, rows)
        + _repeated_prompts(totals, span)
        + await _unreliable_providers(store, cut, rows)
        + await _sessions_burning(store, period, cut, rows)
    )
    found.sort(key=lambda r: -(r["monthly_saving_usd"] or 0.0))
    return found


async def _cheaper_models(store: Store, catalog: Catalog, cut: _Cut, span: float, rows: _Rows) -> list[dict[str, Any]]:
    """Premium-tier traffic not routed for quality, priced on the cheapest non-premium model with what it needed."""
    where, params = rows.sql()
    parts = [
        (
            "SELECT provider, model, needs, requests, prompt_tokens, completion_tokens, cost_usd FROM model_hourly "
            f"WHERE hour >= ? AND hour < ?{where}"
        )
    ]
    args: list[Any] = [cut.lo, cut.hi, *params]
    for start, end in cut.edges:
        parts.append(
            "SELECT provider, model, COALESCE(needs, ''), 1, prompt_tokens, completion_tokens, cost_usd FROM requests "
            f"WHERE ts >= ? AND ts < ? AND {rollups.CANDIDATE_SQL}{where}"
        )
        args += [start, end, *params]
    grouped = await store.fetchall(
        f"SELECT provider, model, needs, {_count('requests')}, {_count('prompt_tokens')}, "
        f"{_count('completion_tokens')}, SUM(cost_usd) AS cost_usd FROM ({' UNION ALL '.join(parts)}) "
        "AS parts GROUP BY provider, model, needs ORDER BY provider, model",
        args,
    )
    models: dict[tuple[str, str], dict[str, Any]] = {}
    for part in grouped:  # one row per model and set of needs: a model's needs are all its sets'
        row = models.setdefault((part["provider"], part["model"]), {
            "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "needs": set()})  # fmt: skip
        for column in ("requests", "prompt_tokens", "completion_tokens", "cost_usd"):
            row[column] += part[column]
        row["needs"].update(need for need in part["needs"].split(",") if need)
    found = []
    for (provider, model), row in models.items():
        current = catalog.models.get(f"{provider}/{model}")
        if current is None or current.tier != "premium":
            continue
        needs = row["needs"] or {"chat"}
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


def _repeated_prompts(totals: dict[str, Any], span: float) -> list[dict[str, Any]]:
    """Requests asking exactly what an earlier request of the same namespace asked, answered upstream anyway."""
    repeats, cost, answered = totals["repeats"], float(totals["repeat_cost_usd"]), totals["ok"]
    if not repeats or cost <= 0:
        return []
    rate = repeats / answered
    monthly = _monthly(cost, span)
    return [
        {
            "kind": "cache_repeats",
            "title": f"Cache repeated prompts: {rate:.0%} of requests asked again",
            "detail": (
                f"{repeats} of {answered} requests repeated an earlier prompt exactly and still went "
                f"upstream for ${cost:.4f}; the cache would have answered them for free: about "
                f"${monthly:.2f} a month. Keep `cache.enabled` on and stop passing --no-cache / Cache-Control: no-cache."
            ),
            "monthly_saving_usd": monthly,
            "numbers": {
                "repeats": repeats,
                "requests": answered,
                "repeat_rate": rate,
                "saving_usd": cost,
                "span_days": span,
            },
        }
    ]


async def _unreliable_providers(store: Store, cut: _Cut, rows: _Rows) -> list[dict[str, Any]]:
    """Providers whose failed attempts cost failovers and waiting time."""
    where, params = rows.sql()
    sums: dict[str, list[float]] = {}
    for row in await store.fetchall(
        f"SELECT provider, {_count('attempts')}, {_count('failures')}, {_count('failovers')}, "
        f"SUM(wasted_ms) AS wasted_ms FROM attempt_hourly WHERE hour >= ? AND hour < ?{where} GROUP BY provider",
        (cut.lo, cut.hi, *params),
    ):
        sums[row["provider"]] = [row["attempts"], row["failures"], row["failovers"], row["wasted_ms"]]
    # The ledger's own rows: at the edges, and the failed ones the migration's SQL could not sum.
    ranges = [(start, end, "") for start, end in cut.edges]
    summed_to = await store.scalar("SELECT value FROM rollup_state WHERE name = 'attempts_summed_to'")
    if summed_to is not None and cut.lo < cut.hi and cut.lo * HOUR <= summed_to:
        ranges.append((cut.lo * HOUR, min(cut.hi * HOUR, summed_to + 1e-6), f" AND {rollups.TANGLED_SQL}"))
    for start, end, tangled in ranges:
        for row in await store.rows(
            "SELECT provider, status, error_kind, latency_ms, attempts FROM requests "
            f"WHERE ts >= ? AND ts < ? AND cached = 0{tangled}{where}",
            (start, end, *params),
        ):
            tries = json.loads(row["attempts"] or "[]")
            for provider, counts in rollups.attempt_sums(
                row["provider"], row["status"], row["error_kind"], row["latency_ms"], tries
            ).items():
                into = sums.setdefault(provider, [0, 0, 0, 0.0])
                for i, value in enumerate(counts):
                    into[i] += value
    found = []
    for provider, (total, failed, failovers, wasted_ms) in sums.items():
        if total < PROVIDER_MIN_ATTEMPTS or failed / total < PROVIDER_ERROR_RATE:
            continue
        rate = failed / total
        found.append(
            {
                "kind": "unreliable_provider",
                "title": f"{provider} fails {rate:.0%} of attempts",
                "detail": (
                    f"{failed} of {total} attempts on {provider} failed; {failovers} requests failed over "
                    f"after waiting {wasted_ms:.0f} ms in all ({wasted_ms / failed:.0f} ms each). "
                    f"Exclude it or route around it until it recovers."
                ),
                "monthly_saving_usd": None,
                "numbers": {
                    "provider": provider,
                    "attempts": total,
                    "failures": failed,
                    "error_rate": rate,
                    "failovers": failovers,
                    "added_latency_ms": wasted_ms,
                    "added_latency_ms_per_failure": wasted_ms / failed,
                },
            }
        )
    found.sort(key=lambda r: -r["numbers"]["added_latency_ms"])
    return found


async def _sessions_burning(store: Store, period: Period, cut: _Cut, rows: _Rows) -> list[dict[str, Any]]:
    """Active sessions that have used most of their budget or will run out within a week at their pace."""
    sessions = await store.fetchall(
        "SELECT id, name, budget_usd FROM agent_sessions WHERE status = 'active' AND budget_usd IS NOT NULL"
    )
    if not sessions:
        return []
    where, params = rows.sql()
    spent = {
        row["value"]: row["spent_usd"]
        for row in await store.fetchall(
            f"SELECT value, SUM(cost_usd) AS spent_usd FROM spend_hourly WHERE dim = 'session'{where} GROUP BY value",
            params,
        )
    }
    in_period = {row["key"]: row for row in await _spend_rows(store, "session", cut, rows)}
    found = []
    for row in sessions:
        budget, spent_usd = row["budget_usd"], float(spent.get(row["id"]) or 0.0)
        used_in_period = in_period.get(row["id"])
        period_usd = float(used_in_period["cost_usd"]) if used_in_period else 0.0
        per_day = period_usd / _span_days(used_in_period["first_ts"] if used_in_period else None, period)
        remaining = budget - spent_usd
        days_left = remaining / per_day if per_day > 0 else None
        used = spent_usd / budget if budget > 0 else 1.0
        if used < SESSION_USED_SHARE and (days_left is None or days_left > SESSION_DAYS_LEFT):
            continue
        runway = "its budget is spent" if remaining <= 0 else (
            f"at ${per_day:.4f} a day it runs out in {days_left:.1f} days" if days_left is not None else "it is idle"
        )
        found.append(
            {
                "kind": "session_budget",
                "title": f"Session {row['name']!r} has used {used:.0%} of its budget",
                "detail": f"{row['id']} spent ${spent_usd:.4f} of ${budget:.4f}; {runway}. Raise the budget or rein it in.",
                "monthly_saving_usd": None,
                "numbers": {
                    "session_id": row["id"],
                    "budget_usd": budget,
                    "spent_usd": spent_usd,
                    "used_share": used,
                    "per_day_usd": per_day,
                    "days_left": days_left,
                },
            }
        )
    return found


__all__ = ["BREAKDOWNS", "Period", "PeriodError", "parse_period", "recommendations", "spend"]
