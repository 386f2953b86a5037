"""The hourly rollups agree with the ledger, on SQLite and on a real PostgreSQL, and periods that cut hours stay exact."""

from __future__ import annotations

import math
import random
import sqlite3
from typing import Any

import pytest

from p402_tui.core.hooks import RequestRecord
from p402_tui.core.types import Attempt
from p402_tui.store import analytics, db, maintenance, queries, rollups
from p402_tui.store.analytics import Period
from p402_tui.store.sessions import create_session
from p402_tui.store.store import Store

HOUR = 3600
BASE = 1_780_000_000 - 1_780_000_000 % HOUR  # a whole hour, with hours cut on either side below
KEY = "key-000000000001"
MODELS = (("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-6"), ("groq", "llama-3.1-8b-instant"),
          ("mistral", "mistral-small-latest"))  # fmt: skip


def ledger(count: int = 400, seed: int = 21, sessions: tuple[str, ...] = ("ses-a",)) -> list[tuple[RequestRecord, dict]]:
    """Varied records over 30 hours: failures, failovers, cache hits, repeats, unpriced, simulated, sessions, tags."""
    rng = random.Random(seed)
    made = []
    for i in range(count):
        provider, model = rng.choice(MODELS)
        # A few asked 9 days before, beyond the cache's lifetime: their next asking is no repeat.
        old = i < 20
        roll = rng.random()
        status, error_kind, attempts = "ok", None, [Attempt(provider, model, None, None, rng.uniform(50, 500))]
        if roll < 0.1:  # failed over from mistral
            attempts.insert(0, Attempt("mistral", "mistral-small-latest", "server_error", "boom", 250.0))
        elif roll < 0.15:
            status, error_kind = "error", "timeout"
            attempts = [Attempt(provider, model, "timeout", "slow", 900.0)]
        cached = status == "ok" and rng.random() < 0.1
        unpriced = rng.random() < 0.05
        cost = None if unpriced else (0.0 if cached or status != "ok" else round(rng.uniform(0.0001, 0.05), 6))
        record = RequestRecord(
            id=f"r{i:04d}", ts=BASE - 5 * HOUR + rng.uniform(0, 30 * HOUR) - (9 * 86400 if old else 0),
            provider=provider, model=model,
            session_id=rng.choice((*sessions, None)), api_key_id=rng.choice((KEY, None)),
            tag=rng.choice(("nightly", "adhoc", None)), mode=rng.choice(("balanced", "quality", None)),
            prompt_tokens=rng.randint(10, 3000), completion_tokens=rng.randint(5, 800), cost_usd=cost,
            saved_usd=0.01 if cached else 0.0, status=status, error_kind=error_kind, cached=cached,
            attempts=[] if cached else attempts, namespace=rng.choice(("default", None)),
            latency_ms=rng.uniform(100, 2000),
        )  # fmt: skip
        made.append((record, {"needs": rng.choice(("chat", "chat,vision")), "prompt_key": f"p{rng.randrange(i % 3, 90, 3)}",
                              "simulated": rng.random() < 0.1}))  # fmt: skip
    return sorted(made, key=lambda made: made[0].ts)  # written as they end, which is about as they began


def write_through_writer(store: Store, records: list[tuple[RequestRecord, dict]]) -> None:
    for record, extra in records:
        store.put_later(lambda record=record, extra=extra: queries.ledger_writes(record, **extra))


# Periods that cut hours at both ends, one within an hour, one on hour edges, and everything.
PERIODS = (
    Period(BASE - 2 * HOUR + 1234.5, BASE + 17 * HOUR + 777.25, "cut"),
    Period(BASE + 3 * HOUR + 100, BASE + 3 * HOUR + 2000, "inside one hour"),
    Period(BASE, BASE + 10 * HOUR, "whole hours"),
    Period(0.0, BASE + 40 * HOUR, "all"),
)


def by_hand_spend(rows: list[dict[str, Any]], period: Period, by: str, key: str | None = None,
                  include_simulated: bool = False) -> dict[str, Any]:  # fmt: skip
    """What spend must say, summed here from the ledger's rows."""
    names = {"provider": lambda r: r["provider"] or "(none)",
             "model": lambda r: "(none)" if r["model"] is None else f"{r['provider']}/{r['model']}",
             "session": lambda r: r["session_id"] or "(none)", "tag": lambda r: r["tag"] or "(none)",
             "key": lambda r: r["api_key_id"] or "(none)"}  # fmt: skip
    chosen = [r for r in rows if period.start <= r["ts"] < period.end and (include_simulated or not r["simulated"])
              and (key is None or r["api_key_id"] == key)]  # fmt: skip
    groups: dict[str, dict[str, Any]] = {}
    for r in chosen:
        group = groups.setdefault(names[by](r), {"cost": [], "requests": 0, "cached": 0, "unpriced": 0, "saved": 0.0})
        group["requests"] += 1
        group["cached"] += r["cached"]
        group["saved"] += r["saved_usd"]
        if r["cost_usd"] is None:
            group["unpriced"] += 1
        else:
            group["cost"].append(r["cost_usd"])
    return {
        "total": math.fsum(r["cost_usd"] or 0.0 for r in chosen), "requests": len(chosen),
        "errors": sum(r["status"] != "ok" for r in chosen), "cached": sum(r["cached"] for r in chosen),
        "unpriced": sum(r["cost_usd"] is None for r in chosen),
        "groups": {k: (None if not g["cost"] else math.fsum(g["cost"]), g["requests"], g["cached"], g["unpriced"])
                   for k, g in groups.items()},
    }  # fmt: skip


def assert_spend_matches(report: dict[str, Any], expected: dict[str, Any]) -> None:
    assert report["requests"] == expected["requests"] and report["errors"] == expected["errors"]
    assert report["cached"] == expected["cached"] and report["unpriced"]["requests"] == expected["unpriced"]
    assert math.isclose(report["total_usd"], expected["total"], abs_tol=1e-9)
    got = {b["key"]: (b["cost_usd"], b["requests"], b["cached"], b["unpriced"]) for b in report["breakdown"]}
    assert set(got) == set(expected["groups"])
    for name, (cost, requests, cached, unpriced) in expected["groups"].items():
        assert got[name][1:] == (requests, cached, unpriced), name
        assert (got[name][0] is None) == (cost is None), name  # a group of unpriced calls only costs null
        assert cost is None or math.isclose(got[name][0], cost, abs_tol=1e-9), name


def by_hand_repeats(rows: list[dict[str, Any]], period: Period) -> tuple[int, float, int]:
    """Repeats in the period: answered upstream, asked within the cache's default lifetime before by an answered
    request of the namespace."""
    seen: dict[tuple, float] = {}
    repeats, cost, answered = 0, 0.0, 0
    for r in sorted(rows, key=lambda r: (r["ts"], r["id"])):
        if r["status"] != "ok":
            continue
        prompt = (r["simulated"], r["namespace"] or "", r["prompt_key"])
        inside = period.start <= r["ts"] < period.end and not r["simulated"]
        if inside:
            answered += 1
            if prompt in seen and r["ts"] - seen[prompt] <= rollups.REPEAT_WINDOW_S and not r["cached"]:
                repeats += 1
                cost += r["cost_usd"] or 0.0
        seen[prompt] = r["ts"]
    return repeats, cost, answered


@pytest.fixture
async def store(tmp_path):
    opened = await Store.open(tmp_path / "rollups.db")
    try:
        yield opened
    finally:
        await opened.aclose()


async def _ledger_rows(store: Store) -> list[dict[str, Any]]:
    return await store.fetchall("SELECT * FROM requests")


async def test_rollups_sum_the_ledger_written_through_the_writer(store):
    write_through_writer(store, ledger())
    await store.flush()
    for dim, expr in rollups.DIM_SQL.items():
        from_ledger = await store.fetchall(
            f"SELECT {expr} AS value, COUNT(*) AS n, COALESCE(SUM(cost_usd), 0.0) AS cost, SUM(cached) AS cached, "
            "SUM(saved_usd) AS saved, SUM(prompt_tokens) AS tokens FROM requests GROUP BY value ORDER BY value"
        )
        from_rollup = await store.fetchall(
            "SELECT value, SUM(requests) AS n, SUM(cost_usd) AS cost, SUM(cached) AS cached, SUM(saved_usd) AS saved, "
            "SUM(prompt_tokens) AS tokens FROM spend_hourly WHERE dim = ? GROUP BY value ORDER BY value", (dim,)
        )
        assert [(r["value"], r["n"], r["cached"], r["tokens"]) for r in from_ledger] == [
            (r["value"], r["n"], r["cached"], r["tokens"]) for r in from_rollup]  # fmt: skip
        for a, b in zip(from_ledger, from_rollup):
            assert math.isclose(a["cost"], b["cost"], abs_tol=1e-12) and math.isclose(a["saved"], b["saved"])
    per_hour = await store.fetchall(
        f"SELECT {rollups.HOUR_SQL} AS hour, COUNT(*) AS n, MIN(ts) AS first FROM requests GROUP BY 1 ORDER BY 1"
    )
    rolled = await store.fetchall(
        "SELECT hour, SUM(requests) AS n, MIN(first_ts) AS first FROM spend_hourly WHERE dim = 'tag' "
        "GROUP BY hour ORDER BY hour"
    )
    assert per_hour == rolled  # every row in its own UTC hour, its first ts kept exactly


async def test_reports_over_periods_that_cut_hours_are_exact(store, catalog):
    session = await create_session(store, name="burner", budget_usd=0.5)
    write_through_writer(store, ledger(sessions=(session["id"],)))
    await store.flush()
    rows = await _ledger_rows(store)
    for period in PERIODS:
        for by in ("provider", "model", "session", "tag", "key"):
            for key in (None, KEY):
                report = await analytics.spend(store, period, by, api_key_id=key)
                assert_spend_matches(report, by_hand_spend(rows, period, by, key))
        days = await analytics.spend(store, period, "day")
        assert sum(b["requests"] for b in days["breakdown"]) == days["requests"]
        assert math.isclose(sum(b["cost_usd"] or 0.0 for b in days["breakdown"]), days["total_usd"], abs_tol=1e-9)
        found = {(r["kind"], r["title"]): r for r in await analytics.recommendations(store, catalog, period)}
        kinds = {kind: r for (kind, _), r in found.items()}
        repeats, cost, answered = by_hand_repeats(rows, period)
        if repeats and cost > 0:
            numbers = kinds["cache_repeats"]["numbers"]
            assert (numbers["repeats"], numbers["requests"]) == (repeats, answered)
            assert math.isclose(numbers["saving_usd"], cost, abs_tol=1e-9)
        inside = [r for r in rows if period.start <= r["ts"] < period.end and not r["simulated"] and not r["cached"]]
        tries = [(a, i < len(attempts) - 1) for r in inside
                 for attempts in [queries._ledger_dict(dict(r))["attempts"]] for i, a in enumerate(attempts)
                 if a["provider"] == "mistral"]  # fmt: skip
        failed = [(a, failed_over) for a, failed_over in tries if a["error_kind"]]
        if len(tries) >= 5 and len(failed) / len(tries) >= 0.05:
            numbers = next(r["numbers"] for r in found.values() if r["kind"] == "unreliable_provider"
                           and r["numbers"]["provider"] == "mistral")  # fmt: skip
            assert (numbers["attempts"], numbers["failures"], numbers["failovers"]) == (
                len(tries), len(failed), sum(over for _, over in failed))
            assert math.isclose(numbers["added_latency_ms"], math.fsum(a["latency_ms"] for a, _ in failed))
    spent = math.fsum(r["cost_usd"] or 0.0 for r in rows if r["session_id"] == session["id"] and not r["simulated"])
    burning = next(r for r in await analytics.recommendations(store, catalog, PERIODS[0]) if r["kind"] == "session_budget")
    assert math.isclose(burning["numbers"]["spent_usd"], spent, abs_tol=1e-9)


async def test_spend_counts_simulated_requests_when_asked_and_otherwise_says_how_many_it_left_out(store):
    write_through_writer(store, ledger())
    await store.flush()
    rows = await _ledger_rows(store)
    for period in PERIODS:
        for by in ("provider", "model", "session", "tag", "key"):
            for key in (None, KEY):
                counted = await analytics.spend(store, period, by, include_simulated=True, api_key_id=key)
                assert_spend_matches(counted, by_hand_spend(rows, period, by, key, include_simulated=True))
                assert counted["simulated_left_out"] == 0
                report = await analytics.spend(store, period, by, api_key_id=key)
                assert report["simulated_left_out"] == sum(
                    1 for r in rows if period.start <= r["ts"] < period.end and r["simulated"]
                    and (key is None or r["api_key_id"] == key))  # fmt: skip
                assert report["requests"] + report["simulated_left_out"] == counted["requests"]
    assert (await analytics.spend(store, PERIODS[-1], "model"))["simulated_left_out"] > 0


async def test_pruning_the_ledger_prunes_its_whole_hours_from_the_rollups(store):
    write_through_writer(store, ledger())
    await store.flush()
    cut = BASE + 2 * HOUR + 100
    removed = await maintenance.prune(store, cut, batch=50)
    assert removed["requests"] > 50 and removed["spend_hourly"] > 0
    assert await store.scalar("SELECT MIN(hour) FROM spend_hourly") == (BASE + 2 * HOUR) // HOUR
    rows = await _ledger_rows(store)
    after = Period(BASE + 3 * HOUR, BASE + 40 * HOUR, "after the cut hour")
    assert_spend_matches(await analytics.spend(store, after, "model"), by_hand_spend(rows, after, "model"))


def _database_before_rollups(path) -> None:
    """A store at the schema version before the rollups, as an older P402 left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    before = db.MIGRATIONS.index(rollups.MIGRATION)
    for script in db.MIGRATIONS[:before]:
        for statement in db.statements(db.migration_sql(script, "sqlite")):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={before}")
    conn.close()


async def test_the_migration_sums_a_ledger_written_before_it(tmp_path, catalog):
    records = ledger(seed=7)
    _database_before_rollups(tmp_path / "old.db")
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    conn.executemany(queries.INSERT_REQUEST, [queries.request_row(r, **extra) for r, extra in records])
    conn.close()
    async with await Store.open(tmp_path / "old.db") as migrated, await Store.open(tmp_path / "new.db") as written:
        assert await migrated.scalar("PRAGMA user_version") == db.SCHEMA_VERSION
        write_through_writer(written, records)
        await written.flush()
        for table, order in (("spend_hourly", "dim, hour, value, api_key_id, simulated"),
                             ("model_hourly", "hour, provider, model, needs, api_key_id, simulated")):  # fmt: skip
            old, new = [await s.fetchall(f"SELECT * FROM {table} ORDER BY {order}") for s in (migrated, written)]
            assert len(old) == len(new) and old  # the same sums, summed by SQL or row by row
            for a, b in zip(old, new):
                assert {k: v for k, v in a.items() if "usd" not in k} == {k: v for k, v in b.items() if "usd" not in k}
                assert all(math.isclose(a[k], b[k], abs_tol=1e-12) for k in a if "usd" in k)
        # Failed-over rows hold their tries in JSON: the reports read those from the ledger, to the same figures.
        for period in PERIODS:
            for by in ("provider", "model", "key"):
                a, b = [await analytics.spend(s, period, by) for s in (migrated, written)]
                assert _close(a, b)
            a, b = [await analytics.recommendations(s, catalog, period) for s in (migrated, written)]
            assert _close(a, b)


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


# --- the same SQL on PostgreSQL ---------------------------------------------------------------------


class PgReader:
    """The read side of `Store` on a psycopg connection: `?` placeholders made `%s`, rows as dicts."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @staticmethod
    def sql(text: str) -> str:
        return text.replace("%", "%%").replace("?", "%s")

    async def fetchall(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        async with self.conn.cursor() as cursor:
            await cursor.execute(self.sql(sql), params)
            return [dict(row) for row in await cursor.fetchall()]

    rows = fetchall

    async def fetchone(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        found = await self.fetchall(sql, params)
        return found[0] if found else None

    async def scalar(self, sql: str, params: Any = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))


# The tables the rollups read and write, as PostgreSQL declares them (the PostgreSQL engine owns the real DDL).
PG_TABLES = """
CREATE TABLE requests (id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, session_id TEXT, api_key_id TEXT, tag TEXT,
    mode TEXT, provider TEXT, model TEXT, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, cost_usd DOUBLE PRECISION DEFAULT 0,
    saved_usd DOUBLE PRECISION NOT NULL DEFAULT 0, latency_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    status TEXT NOT NULL, error_kind TEXT, cached INTEGER NOT NULL DEFAULT 0, namespace TEXT,
    attempts TEXT NOT NULL DEFAULT '[]', needs TEXT, prompt_key TEXT, simulated INTEGER NOT NULL DEFAULT 0,
    priced INTEGER NOT NULL DEFAULT 1);
CREATE INDEX requests_ts ON requests(ts);
CREATE TABLE agent_sessions (id TEXT PRIMARY KEY, name TEXT NOT NULL, budget_usd DOUBLE PRECISION,
    status TEXT NOT NULL DEFAULT 'active');
"""
PG_COLUMNS = ("id", "ts", "session_id", "api_key_id", "tag", "mode", "provider", "model", "prompt_tokens",
              "completion_tokens", "cost_usd", "saved_usd", "latency_ms", "status", "error_kind", "cached",
              "namespace", "attempts", "needs", "prompt_key", "simulated", "priced")  # fmt: skip


def _pg_ledger_row(record: RequestRecord, extra: dict) -> tuple:
    full = dict(zip(queries.LEDGER_COLUMNS, queries.request_row(record, **extra)))
    return tuple(full[c] for c in PG_COLUMNS)


async def test_the_rollup_sql_runs_on_postgresql_with_the_same_answers(pg_url, store, catalog):
    psycopg = pytest.importorskip("psycopg")
    from psycopg.rows import dict_row

    records = ledger(seed=11)
    before, after = records[:150], records[150:]  # half there when the migration runs, half written after
    insert = f"INSERT INTO requests ({', '.join(PG_COLUMNS)}) VALUES ({', '.join('%s' for _ in PG_COLUMNS)})"
    async with await psycopg.AsyncConnection.connect(pg_url, row_factory=dict_row) as conn:
        await conn.execute(PG_TABLES)
        async with conn.cursor() as cursor:
            await cursor.executemany(insert, [_pg_ledger_row(r, extra) for r, extra in before])
        for statement in db.statements(rollups.MIGRATION):  # the migration's own text, as PostgreSQL takes it
            await conn.execute(PgReader.sql(statement))
        for record, extra in after:  # each row with its rollup statements, in one transaction
            async with conn.transaction():
                await conn.execute(insert, _pg_ledger_row(record, extra))
                for sql, params in rollups.writes(record, **extra):
                    await conn.execute(PgReader.sql(sql), params)
        await conn.commit()

        # The same ledger on SQLite: old rows through the migration, later ones through the writer.
        _database_before_rollups(store.path.with_name("pg-twin.db"))
        twin_conn = sqlite3.connect(store.path.with_name("pg-twin.db"), isolation_level=None)
        twin_conn.executemany(queries.INSERT_REQUEST, [queries.request_row(r, **extra) for r, extra in before])
        twin_conn.close()
        async with await Store.open(store.path.with_name("pg-twin.db")) as twin:
            write_through_writer(twin, after)
            await twin.flush()
            pg = PgReader(conn)
            for period in PERIODS:
                for by in ("provider", "model", "session", "tag", "key", "day"):
                    for key in (None, KEY):
                        a = await analytics.spend(twin, period, by, api_key_id=key)
                        b = await analytics.spend(pg, period, by, api_key_id=key)  # type: ignore[arg-type]
                        assert _close(a, b), (period.label, by, key)
                a = await analytics.recommendations(twin, catalog, period)
                b = await analytics.recommendations(pg, catalog, period)  # type: ignore[arg-type]
                assert a and _close(a, b), period.label


async def test_both_engines_writers_roll_the_same_ledger_up_alike_and_call_every_callback_once(store, pg_url):
    """One batch of many requests: PostgreSQL's writer sends each statement shape as one group (the repeat
    marks after the inserts) and both engines merge the rollup upserts of a key, the requests' callbacks
    with them."""
    from p402_tui.store.postgres import PgStore

    records = ledger(count=300, seed=5)
    called: dict[str, list[str]] = {"sqlite": [], "postgresql": []}
    async with await PgStore.open(pg_url) as on_postgres:
        for engine, target in (("sqlite", store), ("postgresql", on_postgres)):
            for record, extra in records:
                target.put_later(lambda record=record, extra=extra: queries.ledger_writes(record, **extra),
                                 done=lambda engine=engine, record=record: called[engine].append(record.id))
            await target.flush()
            assert sorted(called[engine]) == sorted(record.id for record, _ in records)  # each once
            assert target.writer.stats.failed == 0
        assert on_postgres.writer.stats.batches < 20  # gathered into a few batches, not one per request
        tables = {
            "spend_hourly": "SELECT dim, hour, value, api_key_id, simulated, requests, ok, cached, repeats, prompt_tokens, "
                            "completion_tokens, unpriced, ROUND(cost_usd * 1e9) AS cost, ROUND(repeat_cost_usd * 1e9) "
                            "AS repeat_cost, first_ts FROM spend_hourly ORDER BY dim, hour, value, api_key_id, simulated",
            "model_hourly": "SELECT * FROM model_hourly ORDER BY hour, provider, model, needs, api_key_id, simulated",
            "attempt_hourly": "SELECT hour, provider, api_key_id, simulated, attempts, failures, failovers, "
                              "ROUND(wasted_ms * 1000) AS wasted FROM attempt_hourly ORDER BY hour, provider, api_key_id, simulated",
        }
        for table, sql in tables.items():
            on_sqlite = [{k: _plain(v) for k, v in row.items()} for row in await store.fetchall(sql)]
            on_pg = [{k: _plain(v) for k, v in row.items()} for row in await on_postgres.fetchall(sql)]
            assert on_sqlite and on_sqlite == on_pg, table
        assert sum(r["repeats"] for r in await on_postgres.fetchall("SELECT repeats FROM spend_hourly")) > 0


def _plain(value: Any) -> Any:
    return round(float(value), 6) if isinstance(value, float) else value
