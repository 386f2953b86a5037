"""The ledger summed by UTC hour, kept in step with it: what spend and recommendations read.

Each ledger row adds itself to three tables in the transaction that inserts it:
- `spend_hourly`: one row per (dim, hour, value, key, simulated) for each of the dims provider,
  model, session and tag; sums of what the row cost and counted (costs as billed, never recomputed);
- `model_hourly`: the premium-routing candidates (answered upstream, priced, not routed for quality)
  by provider, model and the capabilities they needed;
- `attempt_hourly`: each provider's tries, failures, failovers and the time the failures wasted.

A report reads whole hours here and the cut hours at its period's edges from the ledger (by its
`ts` index), so any period is exact. Every statement is in the SQL both engines accept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.hooks import RequestRecord

HOUR = 3600
NONE = "(none)"  # a report's name for "no provider/model/session/tag/key"

# floor(ts / 3600) in SQL both engines read alike: SQLite's CAST truncates, PostgreSQL's rounds.
HOUR_SQL = "(CAST(ts / 3600 AS INTEGER) - CASE WHEN CAST(ts / 3600 AS INTEGER) > ts / 3600 THEN 1 ELSE 0 END)"
# Each ledger row's value per dim, as the reports name it.
DIM_SQL = {
    "provider": f"COALESCE(provider, '{NONE}')",
    "model": f"CASE WHEN model IS NULL THEN '{NONE}' ELSE provider || '/' || model END",
    "session": f"COALESCE(session_id, '{NONE}')",
    "tag": f"COALESCE(tag, '{NONE}')",
}
# Premium-routing candidates: what `recommendations` prices on a cheaper model.
CANDIDATE_SQL = (
    "status = 'ok' AND cached = 0 AND priced = 1 AND (mode IS NULL OR mode != 'quality') "
    "AND provider IS NOT NULL AND model IS NOT NULL"
)
# A ledger row that an answered request of the same namespace (and simulated-ness) had asked exactly within
# the cache's default lifetime before it: the cache could have answered it. `r` is the row's alias.
REPEAT_WINDOW_S = 7 * 86400  # CacheConfig.ttl_s's default
REPEAT_SQL = (
    "EXISTS (SELECT 1 FROM requests p WHERE p.prompt_key = r.prompt_key AND p.status = 'ok' "
    "AND p.simulated = r.simulated AND COALESCE(p.namespace, '') = COALESCE(r.namespace, '') "
    f"AND (p.ts < r.ts OR (p.ts = r.ts AND p.id < r.id)) AND p.ts >= r.ts - {REPEAT_WINDOW_S})"
)
# Ledger rows whose attempt list the SQL backfill cannot read (it holds JSON): failed or failed over.
TANGLED_SQL = "(status != 'ok' OR attempts LIKE '%},{%')"

_SPEND_SUMS = (
    "requests", "ok", "cached", "cost_usd", "saved_usd", "prompt_tokens", "completion_tokens",
    "unpriced", "unpriced_prompt_tokens", "unpriced_completion_tokens",
)  # fmt: skip
_KEY = "(dim, hour, value, api_key_id, simulated)"
UPSERT_SPEND = (
    f"INSERT INTO spend_hourly (dim, hour, value, api_key_id, simulated, {', '.join(_SPEND_SUMS)}, first_ts) "
    f"VALUES (?, ?, ?, ?, ?, {', '.join('?' for _ in _SPEND_SUMS)}, ?) ON CONFLICT {_KEY} DO UPDATE SET "
    + ", ".join(f"{c} = spend_hourly.{c} + excluded.{c}" for c in _SPEND_SUMS)
    + ", first_ts = CASE WHEN excluded.first_ts < spend_hourly.first_ts THEN excluded.first_ts "
    "ELSE spend_hourly.first_ts END"
)
# Run after the ledger row and its provider upsert, in their transaction: the row's `id` finds it as `r`.
MARK_REPEAT = (
    "UPDATE spend_hourly SET repeats = repeats + 1, repeat_cost_usd = repeat_cost_usd + ? "
    "WHERE dim = 'provider' AND hour = ? AND value = ? AND api_key_id = ? AND simulated = ? "
    f"AND EXISTS (SELECT 1 FROM requests r WHERE r.id = ? AND {REPEAT_SQL})"
)
_MARK_COLUMNS = "cost, hour, value, api_key_id, simulated, id"  # MARK_REPEAT's parameters, in order
_MARK_TYPES = ("DOUBLE PRECISION", "INTEGER", "TEXT", "TEXT", "INTEGER", "TEXT")  # and their types


def mark_repeats(rows: int, engine: str = "sqlite") -> str:
    """MARK_REPEAT for `rows` ledger rows in one statement (the writers'): the same parameters, a row's
    after another's. Each spend row gets the count and the cost of its rows that are repeats.

    PostgreSQL's form casts each parameter (a VALUES list's columns are compared with the table's) and
    looks each row up on its own (LATERAL ... LIMIT 1): as an EXISTS in the WHERE, its planner made the
    lookups one hash join of the whole ledger with itself, 52 s at 20,000 rows."""
    if engine == "postgresql":
        row = ", ".join(f"CAST(? AS {t})" for t in _MARK_TYPES)
        hits = f"v CROSS JOIN LATERAL (SELECT 1 FROM requests r WHERE r.id = v.id AND {REPEAT_SQL} LIMIT 1) hit"
    else:
        row = "?, ?, ?, ?, ?, ?"
        hits = f"v WHERE EXISTS (SELECT 1 FROM requests r WHERE r.id = v.id AND {REPEAT_SQL})"
    values = ", ".join([f"({row})"] * rows)
    return (
        f"WITH v({_MARK_COLUMNS}) AS (VALUES {values}), m AS (SELECT hour, value, api_key_id, simulated, "
        f"COUNT(*) AS n, SUM(cost) AS cost FROM {hits} GROUP BY hour, value, api_key_id, simulated) "
        "UPDATE spend_hourly SET repeats = repeats + m.n, repeat_cost_usd = repeat_cost_usd + m.cost FROM m "
        "WHERE spend_hourly.dim = 'provider' AND spend_hourly.hour = m.hour AND spend_hourly.value = m.value "
        "AND spend_hourly.api_key_id = m.api_key_id AND spend_hourly.simulated = m.simulated"
    )


# Statements a batch may send after its inserts (up to the next statement of another kind): each reads
# rows those inserts make, and nothing in the batch reads what it changes. Gathered, they go as one group.
AFTER_INSERTS = frozenset({MARK_REPEAT})
UPSERT_MODEL = (
    "INSERT INTO model_hourly (hour, provider, model, needs, api_key_id, simulated, requests, prompt_tokens, "
    "completion_tokens, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (hour, provider, model, needs, api_key_id, simulated) DO UPDATE SET "
    "requests = model_hourly.requests + excluded.requests, prompt_tokens = model_hourly.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = model_hourly.completion_tokens + excluded.completion_tokens, "
    "cost_usd = model_hourly.cost_usd + excluded.cost_usd"
)
UPSERT_ATTEMPTS = (
    "INSERT INTO attempt_hourly (hour, provider, api_key_id, simulated, attempts, failures, failovers, wasted_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour, provider, api_key_id, simulated) DO UPDATE SET "
    "attempts = attempt_hourly.attempts + excluded.attempts, failures = attempt_hourly.failures + excluded.failures, "
    "failovers = attempt_hourly.failovers + excluded.failovers, "
    "wasted_ms = attempt_hourly.wasted_ms + excluded.wasted_ms"
)

# The migration's DDL; BACKFILL then sums the ledger already written (also after a bulk load). DOUBLE PRECISION
# and BIGINT, which SQLite reads as REAL and INTEGER: PostgreSQL's REAL is 4 bytes, its INTEGER overflows.
TABLES = f"""
CREATE TABLE spend_hourly (
    dim TEXT NOT NULL,
    hour INTEGER NOT NULL,
    value TEXT NOT NULL,
    api_key_id TEXT NOT NULL,
    simulated INTEGER NOT NULL,
    requests BIGINT NOT NULL,
    ok BIGINT NOT NULL,
    cached BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    saved_usd DOUBLE PRECISION NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    unpriced BIGINT NOT NULL,
    unpriced_prompt_tokens BIGINT NOT NULL,
    unpriced_completion_tokens BIGINT NOT NULL,
    first_ts DOUBLE PRECISION NOT NULL,
    repeats BIGINT NOT NULL DEFAULT 0,
    repeat_cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY {_KEY}
);
CREATE TABLE model_hourly (
    hour INTEGER NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    needs TEXT NOT NULL,
    api_key_id TEXT NOT NULL,
    simulated INTEGER NOT NULL,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hour, provider, model, needs, api_key_id, simulated)
);
CREATE TABLE attempt_hourly (
    hour INTEGER NOT NULL,
    provider TEXT NOT NULL,
    api_key_id TEXT NOT NULL,
    simulated INTEGER NOT NULL,
    attempts BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    failovers BIGINT NOT NULL,
    wasted_ms DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hour, provider, api_key_id, simulated)
);
CREATE TABLE rollup_state (
    name TEXT PRIMARY KEY,
    value DOUBLE PRECISION
);
CREATE INDEX requests_prompt ON requests(prompt_key) WHERE status = 'ok';
"""

# The ledger with each row's hour and, for the provider dim (which keeps the repeats), when its prompt was
# answered last before it: a repeat is a row answered upstream whose prompt was answered within the window.
# Only the columns the sums read: the window sorts every row, and the whole row would be ten times wider.
_READ = (
    "ts, status, cached, cost_usd, saved_usd, prompt_tokens, completion_tokens, priced, api_key_id, simulated, "
    "provider, model, session_id, tag"
)
_LEDGER = f"SELECT {_READ}, {HOUR_SQL} AS hour, 0 AS is_repeat FROM requests r"
_LEDGER_REPEATS = (
    f"SELECT b.*, CASE WHEN status = 'ok' AND cached = 0 AND previous_ts >= ts - {REPEAT_WINDOW_S} THEN 1 ELSE 0 END "
    f"AS is_repeat FROM (SELECT {_READ}, {HOUR_SQL} AS hour, CASE WHEN status = 'ok' AND prompt_key IS NOT NULL THEN "
    "LAG(ts) OVER (PARTITION BY status, simulated, COALESCE(namespace, ''), prompt_key ORDER BY ts, id) END "
    "AS previous_ts FROM requests r) AS b"
)


def _spend_backfill(dim: str) -> str:
    ledger = _LEDGER_REPEATS if dim == "provider" else _LEDGER
    repeat = "is_repeat = 1"
    return (
        "INSERT INTO spend_hourly (dim, hour, value, api_key_id, simulated, requests, ok, cached, cost_usd, saved_usd, "
        "prompt_tokens, completion_tokens, unpriced, unpriced_prompt_tokens, unpriced_completion_tokens, first_ts, "
        f"repeats, repeat_cost_usd) SELECT '{dim}', hour, {DIM_SQL[dim]}, COALESCE(api_key_id, ''), simulated, COUNT(*), "
        "SUM(CASE WHEN status = 'ok' THEN 1 ELSE 0 END), SUM(cached), COALESCE(SUM(cost_usd), 0.0), SUM(saved_usd), "
        "SUM(prompt_tokens), SUM(completion_tokens), SUM(1 - priced), SUM(CASE WHEN priced = 0 THEN prompt_tokens "
        "ELSE 0 END), SUM(CASE WHEN priced = 0 THEN completion_tokens ELSE 0 END), MIN(ts), "
        f"SUM(CASE WHEN {repeat} THEN 1 ELSE 0 END), SUM(CASE WHEN {repeat} THEN COALESCE(cost_usd, 0.0) ELSE 0.0 END) "
        f"FROM ({ledger}) AS b GROUP BY hour, {DIM_SQL[dim]}, COALESCE(api_key_id, ''), simulated;"
    )


BACKFILL = (
    *(_spend_backfill(dim) for dim in DIM_SQL),
    (
        "INSERT INTO model_hourly (hour, provider, model, needs, api_key_id, simulated, requests, prompt_tokens, "
        f"completion_tokens, cost_usd) SELECT {HOUR_SQL}, provider, model, COALESCE(needs, ''), "
        "COALESCE(api_key_id, ''), simulated, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd) "
        f"FROM requests WHERE {CANDIDATE_SQL} GROUP BY {HOUR_SQL}, provider, model, COALESCE(needs, ''), "
        "COALESCE(api_key_id, ''), simulated;"
    ),
    # A request answered at its first try was one try of the provider that answered it. Failed and
    # failed-over rows hold their tries in JSON, which SQL common to both engines cannot read: the
    # reports read those from the ledger, up to the last row summed here.
    (
        "INSERT INTO attempt_hourly (hour, provider, api_key_id, simulated, attempts, failures, failovers, wasted_ms) "
        f"SELECT {HOUR_SQL}, provider, COALESCE(api_key_id, ''), simulated, COUNT(*), 0, 0, 0.0 FROM requests "
        f"WHERE cached = 0 AND provider IS NOT NULL AND NOT {TANGLED_SQL} "
        f"GROUP BY {HOUR_SQL}, provider, COALESCE(api_key_id, ''), simulated;"
    ),
    "INSERT INTO rollup_state (name, value) SELECT 'attempts_summed_to', MAX(ts) FROM requests HAVING COUNT(*) > 0;",
)
MIGRATION = TABLES + "\n".join(BACKFILL)
ROLLUP_TABLES = ("spend_hourly", "model_hourly", "attempt_hourly")


# Each upsert's key (its first parameters), the parameters it adds, and the one it keeps the least of.
_ADDITIVE = {
    UPSERT_SPEND: (5, range(5, 5 + len(_SPEND_SUMS)), 5 + len(_SPEND_SUMS)),
    UPSERT_MODEL: (6, range(6, 10), None),
    UPSERT_ATTEMPTS: (4, range(4, 8), None),
}


def coalesce(writes: list[Any]) -> list[Any]:
    """A batch's writes with the rollup upserts of one key merged into the first (`Write`s of the writer).

    A burst of requests lands in a few rollup rows: one upsert each instead of four or more per request.
    The merged upsert takes the place of the first, so whatever follows any of them (a repeat's mark)
    still finds its row, and it carries their callbacks (a request's last row carries the request's:
    one batch, one transaction, so they run when they would have). Writes a caller waits for are left
    as they are."""
    merged: dict[tuple, Any] = {}
    out = []
    for write in writes:
        shape = _ADDITIVE.get(write.sql)
        if shape is None or write.result is not None:
            out.append(write)
            continue
        size, sums, least = shape
        key = (write.sql, write.params[:size])
        first = merged.get(key)
        if first is None:
            merged[key] = write
            out.append(write)
            continue
        if write.done is not None:
            if first.done is None:
                first.done = write.done
            elif isinstance(first.done, _Callbacks):
                first.done.calls.append(write.done)
            else:
                first.done = _Callbacks(first.done, write.done)
        into = first.params
        if type(into) is tuple:
            into = first.params = list(into)
        params = write.params
        for i in sums:
            into[i] += params[i]
        if least is not None and params[least] < into[least]:
            into[least] = params[least]
    return out


class _Callbacks:
    """Several writes' callbacks as one: each is called, whatever an earlier one raised."""

    __slots__ = ("calls",)

    def __init__(self, *calls: Callable[[], None]) -> None:
        self.calls = list(calls)

    def __call__(self) -> None:
        failed: BaseException | None = None
        for call in self.calls:
            try:
                call()
            except Exception as error:  # noqa: BLE001 - the writer logs it, after the rest have run
                failed = failed or error
        if failed is not None:
            raise failed


def hour_of(ts: float) -> int:
    return int(ts // HOUR)


def attempt_sums(record_provider: str | None, status: str, error_kind: str | None, latency_ms: float,
                 tries: list[dict[str, Any]]) -> dict[str, list[float]]:  # fmt: skip
    """provider -> [attempts, failures, failovers, wasted_ms] of one request (not served from the cache)."""
    if not tries and record_provider:  # no attempt list: the row itself is the one try
        tries = [{"provider": record_provider, "error_kind": error_kind if status != "ok" else None,
                  "latency_ms": latency_ms}]  # fmt: skip
    sums: dict[str, list[float]] = {}
    for position, attempt in enumerate(tries):
        provider = attempt.get("provider")
        if not provider:
            continue
        counts = sums.setdefault(provider, [0, 0, 0, 0.0])
        counts[0] += 1
        if attempt.get("error_kind"):
            counts[1] += 1
            counts[3] += attempt.get("latency_ms") or 0.0
            if position < len(tries) - 1:
                counts[2] += 1
    return sums


def writes(record: RequestRecord, *, needs: str | None, prompt_key: str | None, simulated: bool) -> list[tuple[str, tuple]]:
    """What a ledger row adds to the rollups: statements for the transaction that inserts it."""
    hour = hour_of(record.ts)
    key = record.api_key_id or ""
    sim = int(simulated)
    ok = int(record.status == "ok")
    cached = int(record.cached)
    priced = record.cost_usd is not None
    cost = record.cost_usd if priced else 0.0
    unpriced_prompt, unpriced_completion = (0, 0) if priced else (record.prompt_tokens, record.completion_tokens)
    sums = (1, ok, cached, cost, record.saved_usd, record.prompt_tokens, record.completion_tokens,
            int(not priced), unpriced_prompt, unpriced_completion, record.ts)  # fmt: skip
    provider = record.provider or NONE
    model = NONE if record.model is None else f"{record.provider}/{record.model}"
    out: list[tuple[str, tuple]] = [
        (UPSERT_SPEND, ("provider", hour, provider, key, sim, *sums)),
        (UPSERT_SPEND, ("model", hour, model, key, sim, *sums)),
        (UPSERT_SPEND, ("session", hour, record.session_id or NONE, key, sim, *sums)),
        (UPSERT_SPEND, ("tag", hour, record.tag or NONE, key, sim, *sums)),
    ]
    if ok and not cached and prompt_key is not None:
        out.append((MARK_REPEAT, (cost, hour, provider, key, sim, record.id)))
    if (ok and not cached and priced and record.mode != "quality" and record.provider is not None
            and record.model is not None):  # fmt: skip
        out.append((UPSERT_MODEL, (hour, record.provider, record.model, needs or "", key, sim, 1,
                                   record.prompt_tokens, record.completion_tokens, cost)))  # fmt: skip
    if not cached:
        tries = [{"provider": a.provider, "error_kind": a.error_kind, "latency_ms": a.latency_ms} for a in record.attempts]
        for name, (attempts, failures, failovers, wasted) in attempt_sums(
            record.provider, record.status, record.error_kind, record.latency_ms, tries
        ).items():
            out.append((UPSERT_ATTEMPTS, (hour, name, key, sim, attempts, failures, failovers, wasted)))
    return out
