"""Both writers send a batch as a few multi-row statements, not one statement per row: on SQLite each
statement lets go of the GIL and must take it back, on PostgreSQL each costs psycopg's Python on the
gateway's GIL and the server's parse, bind and execute."""

from __future__ import annotations

import sqlite3
import time

import pytest

from p402_tui.core.hooks import RequestRecord
from p402_tui.store import queries, rollups
from p402_tui.store.rows import multi_row as _multi_row
from p402_tui.store.store import Store


def record(n: int, **fields) -> RequestRecord:
    return RequestRecord(id=f"req-{n}", ts=1e9 + n, provider="openai", model="gpt-4o", cost_usd=n / 1000,
                         tag=f"tag-{n}", **fields)


async def test_a_batch_of_many_requests_is_a_handful_of_statements(tmp_path):
    store = await Store.open(tmp_path / "p402.db")
    sent: list[str] = []
    try:
        # A maker runs on the writer's thread, the only one its connection may be used from.
        store.put_later(lambda: store.writer.conn.set_trace_callback(sent.append) or [])
        await store.flush()
        for n in range(100):  # the same prompt each time: every ledger row after the first is a repeat
            store.put_later(lambda n=n: queries.ledger_writes(record(n), prompt_key="same-prompt"))
        await store.flush()
        store.put_later(lambda: store.writer.conn.set_trace_callback(None) or [])
        rows = await store.fetchall("SELECT COUNT(*) AS n, SUM(repeats) AS repeats FROM spend_hourly WHERE dim = 'tag'")
        provider = await store.fetchall("SELECT requests, repeats, repeat_cost_usd FROM spend_hourly WHERE dim = 'provider'")
    finally:
        await store.aclose()
    assert await_count(tmp_path) == 100
    assert rows[0]["n"] == 100  # a tag rollup row each: 100 upserts of distinct keys
    assert provider[0]["requests"] == 100
    assert provider[0]["repeats"] == 99
    assert abs(provider[0]["repeat_cost_usd"] - sum(n / 1000 for n in range(1, 100))) < 1e-9
    statements = [s for s in sent if s not in ("BEGIN IMMEDIATE", "COMMIT")]
    # 400+ statements a row at a time; in groups, per table a few of at most 128 rows (64 + 32 + 4).
    assert 4 <= len(statements) <= 20, statements


async def test_a_batch_of_many_requests_is_a_handful_of_statements_on_postgresql(pg_url, tmp_path):
    from p402_tui.store.engine import open_store

    store = await open_store(pg_url)
    trace = (tmp_path / "trace").open("w")
    try:
        # libpq's own trace of what the writer's connection sends: one Execute message per statement.
        store.put_later(lambda: store.writer.conn.pgconn.trace(trace.fileno()) or [])
        await store.flush()
        for n in range(100):
            store.put_later(lambda n=n: queries.ledger_writes(record(n), prompt_key="same-prompt"))
        await store.flush()
        store.put_later(lambda: store.writer.conn.pgconn.untrace() or [])
        await store.flush()
        count = await store.scalar("SELECT COUNT(*) FROM requests")
        tags = await store.scalar("SELECT COUNT(*) FROM spend_hourly WHERE dim = 'tag'")
        provider = await store.fetchall("SELECT requests, repeats, repeat_cost_usd FROM spend_hourly WHERE dim = 'provider'")
    finally:
        await store.aclose()
        trace.close()
    assert count == 100 and tags == 100
    assert provider[0]["requests"] == 100 and provider[0]["repeats"] == 99
    assert abs(provider[0]["repeat_cost_usd"] - sum(n / 1000 for n in range(1, 100))) < 1e-9
    executes = [line for line in (tmp_path / "trace").read_text().splitlines() if "\tExecute\t" in line and "F\t" in line]
    # 400+ statements a row at a time (each its own result for psycopg to read); in groups, a few per table.
    assert 4 <= len(executes) <= 20, len(executes)


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_an_upsert_of_one_key_twice_in_a_batch_keeps_the_later_row(store_kind, tmp_path, request):
    # PostgreSQL refuses one statement that updates a row twice; the writer splits the group there.
    from p402_tui.store.engine import open_store

    store = await open_store(request.getfixturevalue("pg_url") if store_kind == "postgres" else tmp_path / "p.db")
    upsert = "INSERT INTO rollup_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value"
    try:
        for n, name in enumerate(["a", "b", "a", "c", "a", "b"]):
            store.put(upsert, (name, float(n)))
        await store.flush()
        rows = {r["name"]: r["value"] for r in await store.fetchall("SELECT name, value FROM rollup_state")}
        batches, failed = store.writer.stats.batches, store.writer.stats.failed
    finally:
        await store.aclose()
    assert {k: rows[k] for k in "abc"} == {"a": 4.0, "b": 5.0, "c": 3.0}
    assert failed == 0 and batches == 1  # one transaction: not failed, then written a row at a time


def await_count(path) -> int:
    with sqlite3.connect(path / "p402.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_a_bad_row_among_grouped_ones_is_dropped_alone(store_kind, tmp_path, request):
    from p402_tui.store.engine import open_store

    store = await open_store(request.getfixturevalue("pg_url") if store_kind == "postgres" else tmp_path / "p402.db")
    try:
        good = "INSERT INTO agent_sessions (id, name, status, created, updated) VALUES (?, ?, ?, ?, ?)"
        for round_ in ("a", "b"):  # the second batch's statements work after the first one's failed
            for n in range(10):
                store.put(good, (f"{round_}{n}", f"name {round_}{n}", "bogus-status" if n == 4 else "active", 0, 0))
            await store.flush()
        ids = [r["id"] for r in await store.fetchall("SELECT id FROM agent_sessions ORDER BY id")]
        assert store.writer.stats.failed == 2
        store.put(good, ("c0", "name c0", "active", 0, 0))
        store.put(good, ("c1", "name c1", "active", 0, 0))
        await store.flush()
        assert await store.scalar("SELECT COUNT(*) FROM agent_sessions WHERE id LIKE 'c%'") == 2
    finally:
        await store.aclose()
    assert ids == [f"{r}{n}" for r in "ab" for n in range(10) if n != 4]


def test_multi_row_forms():
    one = "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT (a) DO UPDATE SET b = excluded.b"
    assert _multi_row(one, 3) == (
        "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?) ON CONFLICT (a) DO UPDATE SET b = excluded.b"
    )
    assert _multi_row("INSERT INTO t (a) VALUES (?, lower(?))") is None  # not bare parameters: executemany
    assert _multi_row("UPDATE t SET a = ?") is None
    assert _multi_row(rollups.MARK_REPEAT, 2) == rollups.mark_repeats(2)
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (a PRIMARY KEY, b)")
        conn.execute(_multi_row(one, 3), (1, "x", 2, "y", 1, "z"))  # a key twice in one statement: the later wins
        assert conn.execute("SELECT a, b FROM t ORDER BY a").fetchall() == [(1, "z"), (2, "y")]


def test_a_batch_is_taken_early_by_the_longest_a_recent_batch_took(tmp_path):
    # Taken by `_take` on this thread: no writer thread runs. Each take waits until its oldest write is due.
    from p402_tui.store.sqlite_writer import Writer

    writer = Writer(tmp_path / "p402.db", interval=0.1)
    for costs, allowed in (([], 0.0), ([0.002, 0.06, 0.001], 0.06)):
        writer._costs.extend(costs)
        writer._enqueue("item", False)
        since = writer._since
        items, due = writer._take()
        assert items == ["item"]
        # Taken interval after the write was queued, less the slowest recent batch's cost.
        assert abs(due - (since + 0.1 - allowed)) < 1e-6
        writer._costs.clear()
    writer._costs.append(0.5)  # longer than interval: taken at once, not waited for at all
    writer._enqueue("item", False)
    since = writer._since
    began = time.monotonic()
    writer._take()
    assert time.monotonic() - began < 0.05


async def test_postgresql_marks_repeats_a_row_at_a_time_not_by_joining_the_ledger(pg_url):
    # As an EXISTS in the WHERE, PostgreSQL planned a batch's marks as the ledger hash-joined with itself:
    # 52 s at 20,000 rows. Each row is looked up by its id instead, whatever the ledger's size.
    import psycopg

    from p402_tui.store.dialect import postgres_sql
    from p402_tui.store.engine import open_store
    from p402_tui.store.rows import multi_row

    store = await open_store(pg_url)
    try:
        for n in range(3000):
            store.put_later(lambda n=n: queries.ledger_writes(record(n), prompt_key="same-prompt"))
        await store.flush()
    finally:
        await store.aclose()
    params = [v for n in range(2984, 3000) for v in (n / 1000, rollups.hour_of(1e9 + n), "openai", "", 0, f"req-{n}")]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE requests")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + postgres_sql(multi_row(rollups.MARK_REPEAT, 16, "postgresql")), params))
    assert "Seq Scan on requests" not in plan and "Hash Semi Join" not in plan, plan
    assert "requests_pkey" in plan, plan


async def test_postgresql_keeps_a_bounded_set_of_statements_prepared(pg_url, monkeypatch):
    # Each batch's statements are prepared by text and parameter types; past MAX_PREPARED the least
    # recently used goes (DEALLOCATE), so a writer seeing many shapes holds no more on the server.
    from p402_tui.store import pg_batch
    from p402_tui.store.engine import open_store

    monkeypatch.setattr(pg_batch, "MAX_PREPARED", 3)
    store = await open_store(pg_url)
    upsert = "INSERT INTO rollup_state (name, value) VALUES (?, ?)"
    held: list[int] = []

    def count_prepared() -> list:
        held.append(store.writer.conn.execute("SELECT COUNT(*) FROM pg_prepared_statements WHERE name LIKE 'p402_w%'").fetchone()["count"])
        return []

    try:
        values = [1.5, 7, 100_000, 2**40, None, 2.5, 8]  # float8, int2, int4, int8, unknown: five shapes
        for n, value in enumerate(values):
            store.put(upsert, (f"a{n}", value))
            store.put(upsert, (f"b{n}", value))
            await store.flush()
            store.put_later(count_prepared)
            await store.flush()
        rows = await store.scalar("SELECT COUNT(*) FROM rollup_state WHERE name ~ '^[ab][0-9]$'")
        assert store.writer.stats.failed == 0
    finally:
        await store.aclose()
    assert rows == 2 * len(values)
    assert max(held) == 3 and held[:3] == [1, 2, 3], held
