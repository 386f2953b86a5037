"""The SQLite store: schema and migrations, the writer task, ledger rows, decisions, health, gateway keys."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ENGINES, SQLITE_ONLY, open_engine_store

from p402_tui.core.hooks import CallContext, RequestRecord, RouteOptions
from p402_tui.core.types import Attempt, ChatRequest
from p402_tui.store import queries
from p402_tui.store.db import SCHEMA_VERSION, StoreError, connect
from p402_tui.persistence import Persistence
from p402_tui.store.sqlite_writer import Writer
from p402_tui.store.store import Store

TABLES = {"requests", "router_decisions", "agent_sessions", "session_messages", "provider_health", "semantic_cache",
          "gateway_keys", "guardrail_hits"}  # fmt: skip
VIEWS = {"spend_by_day", "spend_by_provider", "spend_by_model", "spend_by_session"}


@pytest.fixture(params=ENGINES)
async def store(request, tmp_path):
    opened = await open_engine_store(request, tmp_path / "p402.db")
    try:
        yield opened
    finally:
        await opened.aclose()


def record(n: int, **fields) -> RequestRecord:
    return RequestRecord(id=f"req-{n}", provider="openai", model="gpt-4o", cost_usd=n / 1000, **fields)


# --- schema ---------------------------------------------------------------------------------


@SQLITE_ONLY
async def test_fresh_file_is_migrated_to_the_current_schema_in_wal_mode(store):
    assert await store.scalar("PRAGMA user_version") == SCHEMA_VERSION
    assert (await store.scalar("PRAGMA journal_mode")).lower() == "wal"
    objects = {r["name"]: r["type"] for r in await store.fetchall("SELECT name, type FROM sqlite_master")}
    assert TABLES <= {name for name, kind in objects.items() if kind == "table"}
    assert VIEWS <= {name for name, kind in objects.items() if kind == "view"}
    ledger = {r["name"] for r in await store.fetchall("PRAGMA table_info(requests)")}
    assert set(RequestRecord.__dataclass_fields__) <= ledger  # every RequestRecord field has a column


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
async def test_a_fresh_postgresql_database_is_migrated_to_the_current_schema(store):
    assert await store.schema_version() == SCHEMA_VERSION
    found = await store.fetchall(
        "SELECT table_name AS name, table_type AS kind FROM information_schema.tables WHERE table_schema = 'public'"
    )
    assert TABLES <= {r["name"] for r in found if r["kind"] == "BASE TABLE"}
    assert VIEWS <= {r["name"] for r in found if r["kind"] == "VIEW"}
    columns = await store.fetchall(
        "SELECT column_name AS name, data_type AS kind FROM information_schema.columns WHERE table_name = 'requests'"
    )
    assert set(RequestRecord.__dataclass_fields__) <= {c["name"] for c in columns}
    assert {c["kind"] for c in columns if c["name"] == "ts"} == {"double precision"}  # not PostgreSQL's 4-byte REAL


@SQLITE_ONLY
async def test_every_index_is_one_a_query_searches_by(store):
    """Each index costs every request a B-tree insert: keep only those the reads use."""
    indexes = {r["name"] for r in await store.fetchall("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    assert {"requests_ts", "requests_session", "router_decisions_ts"} <= indexes
    assert not indexes & {"requests_model", "requests_tag", "requests_prompt_key", "router_decisions_chosen"}
    plan = " ".join(
        r["detail"] for r in await store.fetchall(
            "EXPLAIN QUERY PLAN SELECT provider, model, COUNT(*) FROM requests WHERE ts >= ? AND ts < ? "
            "AND status = 'ok' GROUP BY provider, model", (0, 1)
        )
    )  # fmt: skip
    assert "requests_ts" in plan


async def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path):
    path = tmp_path / "p402.db"
    async with await Store.open(path) as first:
        first.put(queries.INSERT_REQUEST, queries.request_row(record(1)))
    async with await Store.open(path) as second:
        assert await second.scalar("SELECT COUNT(*) FROM requests") == 1
        assert await second.scalar("PRAGMA user_version") == SCHEMA_VERSION


async def test_a_version_1_file_is_migrated_keeping_json_decisions_and_dropping_ranked_records(tmp_path):
    from p402_tui.store.db import MIGRATIONS, migration_sql, statements

    path = tmp_path / "v1.db"
    kept = {"id": "dec-json", "ts": 1.0, "mode": "cost", "chosen": None, "candidates": []}
    with sqlite3.connect(path) as conn:
        for statement in statements(migration_sql(MIGRATIONS[0], "sqlite")):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        # A binary record of the old formats is read only by ranking it again with today's code: dropped.
        conn.execute("INSERT INTO router_decisions (id, ts, decision) VALUES ('dec-old', 2.0, x'50343032646563310000')")
        conn.execute("INSERT INTO router_decisions (id, ts, decision) VALUES (?, 1.0, ?)", ("dec-json", json.dumps(kept)))
    async with await Store.open(path) as opened:
        assert await opened.scalar("PRAGMA user_version") == SCHEMA_VERSION
        assert await queries.get_decision(opened, "dec-old") is None
        assert await queries.get_decision(opened, "dec-json") == kept


async def test_a_file_from_a_newer_p402_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this P402"):
        await Store.open(path)


async def test_a_file_that_is_not_a_database_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        await Store.open(path)


async def test_two_processes_opening_a_fresh_file_at_once_both_succeed(tmp_path):
    path = tmp_path / "race.db"
    stores = await asyncio.gather(Store.open(path), Store.open(path))
    for opened in stores:
        assert await opened.scalar("PRAGMA user_version") == SCHEMA_VERSION
        await opened.aclose()


# --- the writer -------------------------------------------------------------------------------


async def test_writes_are_batched_and_flush_waits_for_all_of_them(store):
    for n in range(3000):
        store.put(queries.INSERT_REQUEST, queries.request_row(record(n)))
    assert await store.scalar("SELECT COUNT(*) FROM requests") < 3000  # put returned before anything waited
    await store.flush()
    assert await store.scalar("SELECT COUNT(*) FROM requests") == 3000
    assert store.writer.stats.batches < 100  # thousands of rows, a handful of transactions


async def test_a_write_becomes_visible_without_flush_within_the_interval(store):
    started = time.perf_counter()
    store.put(queries.INSERT_REQUEST, queries.request_row(record(1)))
    while await store.scalar("SELECT COUNT(*) FROM requests") == 0:
        assert time.perf_counter() - started < 2.0, "the writer did not commit on its own"
        await asyncio.sleep(0.005)
    # 50 ms interval plus one commit; generous for a loaded machine, still proves no flush was needed
    assert time.perf_counter() - started < 1.0


def _count_rows(store, path):
    """How many ledger rows another connection sees, from any thread: the commit as another process sees it."""
    if store.engine == "postgresql":
        import psycopg

        def count() -> int:
            with psycopg.connect(store.url, autocommit=True) as conn:
                return conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    else:
        def count() -> int:
            with sqlite3.connect(path) as conn:
                return conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    return count


async def test_the_writer_commits_on_its_own_clock_while_the_loop_is_saturated(store, tmp_path):
    # A saturated gateway: every loop turn runs 100 ready callbacks of 5 ms of CPU each, so a writer that
    # waited for a turn at any step (its timer, making rows, its driver's I/O, a hop to its thread and
    # back) would commit half a second or more after the put. The writer's thread commits within its
    # interval plus a commit, on either engine.
    count = _count_rows(store, tmp_path / "p402.db")
    stop = False

    async def busy() -> None:
        while not stop:
            until = time.perf_counter() + 0.005
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    seen: list[float] = []

    def watch() -> None:  # timed off the loop
        while not seen:
            if count():
                seen.append(time.perf_counter())
            time.sleep(0.001)

    hogs = [asyncio.create_task(busy()) for _ in range(100)]
    watcher = threading.Thread(target=watch)
    try:
        await asyncio.sleep(0.3)  # the loop is saturated
        watcher.start()
        made = time.perf_counter()
        store.put_later(lambda: [(queries.INSERT_REQUEST, queries.request_row(record(1)))])
        while not seen and time.perf_counter() - made < 5:
            await asyncio.sleep(0)
        turn = time.perf_counter() - made  # one turn of the loop, at least, and more if the row came late
    finally:
        stop = True
        await asyncio.gather(*hogs)
        if not seen:
            seen.append(math.inf)  # the row never came: stop the watcher
        watcher.join(timeout=10)
    assert turn >= 0.3, "the loop was not saturated"
    assert seen[0] - made < 0.25, f"committed {1000 * (seen[0] - made):.0f} ms after the put"


@SQLITE_ONLY  # PostgreSQL's pool gives each statement its own snapshot
async def test_a_read_after_a_flush_sees_the_rows_while_other_reads_run(store):
    # A read left open between jobs on the reader (a cursor read row by row) kept its snapshot for every
    # query run meanwhile on the connection: one right after a flush could miss the rows just committed.
    for n in range(50):
        store.put(queries.INSERT_REQUEST, queries.request_row(record(n)))
    await store.flush()
    busy = True

    async def other_reads() -> None:  # as a gateway's own reads (keys, sessions, budgets) go on meanwhile
        while busy:
            await store.fetchone("SELECT id FROM requests ORDER BY ts")

    readers = [asyncio.create_task(other_reads()) for _ in range(3)]
    try:
        for n in range(50, 250):
            store.put(queries.INSERT_REQUEST, queries.request_row(record(n)))
            await store.flush()
            assert await store.scalar("SELECT COUNT(*) FROM requests") == n + 1
    finally:
        busy = False
        await asyncio.gather(*readers)


async def test_a_steady_trickle_of_rows_is_committed_once_an_interval_not_after_every_commit(store):
    # A gateway at concurrency 1 queues a request's rows every millisecond or two, so rows are always
    # waiting when a commit ends; a writer that took them at once committed every few requests, paying a
    # transaction's cost (its round trips, the server's work) for each.
    started = time.monotonic()
    n, slowest = 0, 0.0
    while time.monotonic() - started < 1.0:
        store.put(queries.INSERT_REQUEST, queries.request_row(record(n)))
        n += 1
        await asyncio.sleep(0.001)
        # How long a batch took, due to commit: the writer keeps the last few, so they are watched throughout.
        slowest = max(slowest, max(store.writer._costs, default=0.0))
    elapsed = time.monotonic() - started
    await store.flush()
    assert await store.scalar("SELECT COUNT(*) FROM requests") == n
    stats = store.writer.stats
    # Rows wait for company: taken at once, they went a few to a transaction.
    assert stats.written / stats.batches >= 5, (stats.batches, n)
    # About one transaction per 25 ms interval, with room for late wake-ups, while batches are quick. A batch
    # that took most of the interval (a loaded machine, a far server) makes the next ones go early, by design:
    # what a kill -9 can lose stays within about the interval.
    if slowest < store.writer.interval / 2:
        assert stats.batches <= 1.5 * elapsed / store.writer.interval + 3, (stats.batches, n, slowest)


async def test_the_wal_is_copied_into_the_file_by_a_checkpointer_not_by_the_writers_commits(tmp_path):
    # The writer's connection never checkpoints (SQLite's default would, in the commit that crosses 1000
    # pages, holding answered requests' rows for tens of ms); a second connection does, about every second.
    path = tmp_path / "wal.db"
    store = await Store.open(path)
    try:
        before = path.stat().st_size
        # Bursts of writes, 125 kB or so each, until the file has grown: over a second of them (a cue
        # comes with the first batch a second after the last) and less than SQLite's own threshold.
        deadline = time.monotonic() + 10
        bursts = 0
        while path.stat().st_size < before + 500_000:
            assert time.monotonic() < deadline, "the WAL was never copied into the database file"
            for n in range(200):
                store.put(queries.INSERT_REQUEST, queries.request_row(record(bursts * 200 + n)))
            await store.flush()
            bursts += 1
            await asyncio.sleep(0.1)
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size < 1000 * 4096  # short of the 1000 pages at which SQLite's own commit would copy it
        assert await store.scalar("SELECT COUNT(*) FROM requests") == bursts * 200
    finally:
        await store.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_under_steady_writes_the_wal_starts_over_once_it_is_long(tmp_path):
    # A checkpoint copies the WAL while the writer keeps committing, so it never finds the whole WAL
    # copied when a transaction begins: the WAL grew for good. Once it is `restart_frames` long (here
    # 64 pages), the checkpointer copies the rest with the writer's commits held off and it starts over.
    path = tmp_path / "wal.db"
    store = await Store.open(path)
    store.writer.restart_frames = 64
    wal = path.with_name(path.name + "-wal")
    try:
        n = 0
        deadline = time.monotonic() + 3.5  # the checkpointer is cued once a second
        while time.monotonic() < deadline:  # bursts all along: the writer commits one after the other
            for _ in range(200):
                store.put(queries.INSERT_REQUEST, queries.request_row(record(n)))
                n += 1
            await asyncio.sleep(0.01)
        await store.flush()
        header = wal.read_bytes()[:16]
        assert int.from_bytes(header[12:16], "big") >= 2  # the WAL's checkpoint sequence: started over twice
        assert await store.scalar("SELECT COUNT(*) FROM requests") == n
    finally:
        await store.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_writer_refuses_an_interval_above_100_ms(tmp_path):
    with pytest.raises(ValueError, match="100 ms"):
        Writer(tmp_path / "p402.db", interval=0.2)


async def test_close_commits_everything_queued(tmp_path):
    path = tmp_path / "p402.db"
    opened = await Store.open(path)
    for n in range(1500):
        opened.put(queries.INSERT_REQUEST, queries.request_row(record(n)))
    await opened.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1500
    with pytest.raises(StoreError, match="closed"):
        opened.put(queries.INSERT_REQUEST, queries.request_row(record(9999)))


async def test_one_bad_row_is_dropped_and_logged_the_rest_of_its_batch_is_kept(store):
    store.put(queries.INSERT_REQUEST, queries.request_row(record(1)))
    store.put("INSERT INTO agent_sessions (id, name, status, created, updated) VALUES (?, ?, ?, ?, ?)",
              ("s1", "x", "bogus-status", 0, 0))  # fmt: skip
    store.put(queries.INSERT_REQUEST, queries.request_row(record(2)))
    await store.flush()
    assert await store.scalar("SELECT COUNT(*) FROM requests") == 2
    assert store.writer.stats.failed == 1
    assert "check constraint" in store.writer.stats.errors[-1].lower()


async def test_rows_made_later_are_made_in_order_and_a_failing_maker_loses_only_its_rows(store):
    made: list[str] = []
    done: list[str] = []

    def rows(n: int):
        made.append(f"made {n}")
        return [(queries.INSERT_REQUEST, queries.request_row(record(n)))]

    def broken():
        raise RuntimeError("no row today")

    store.put_later(lambda: rows(1), done=lambda: done.append("1"))
    store.put_later(broken, done=lambda: done.append("broken"))
    store.put(queries.INSERT_REQUEST, queries.request_row(record(2)))
    store.put_later(lambda: rows(3))
    assert made == []  # nothing is built while requests are being answered
    await store.flush()
    assert made == ["made 1", "made 3"]
    assert sorted(done) == ["1", "broken"]
    assert [r["id"] for r in await store.fetchall(f"SELECT id FROM requests ORDER BY {store.dialect.rowid}")] == [
        record(1).id, record(2).id, record(3).id
    ]
    assert store.writer.stats.failed == 1 and "no row today" in store.writer.stats.errors[-1]


async def test_run_waits_for_the_commit_and_raises_the_error(store):
    assert await store.run("INSERT INTO gateway_keys (id, name, hash, prefix, created) VALUES ('k', 'n', 'h', 'p', 0)") == 1
    with pytest.raises(StoreError, match="(?i)unique"):
        await store.run("INSERT INTO gateway_keys (id, name, hash, prefix, created) VALUES ('k2', 'n', 'h', 'p', 0)")


CHILD = r"""
import asyncio, sys
from p402_tui.core.hooks import RequestRecord
from p402_tui.core.types import Attempt
from p402_tui.store.queries import INSERT_REQUEST, request_row
from p402_tui.store.store import Store

def record(n):
    return RequestRecord(
        id=f"r{n:08d}", ts=1e9 + n, provider="openai", model=f"m{n}", prompt_tokens=n, completion_tokens=2 * n,
        cost_usd=n * 1e-6, error="x" * (n % 700), attempts=[Attempt("openai", f"m{n}", None, None, float(n))],
    )

async def main():
    store = await Store.open(sys.argv[1])
    n = 0
    while True:
        for _ in range(1000):  # a burst: the writer commits it while the next one is queued
            store.put(INSERT_REQUEST, request_row(record(n)))
            n += 1
        if n == 3000:
            await store.flush()
            print("writing", flush=True)
        await asyncio.sleep(0.005)  # room for the writer to commit while bursts keep coming

asyncio.run(main())
"""


def test_sigkill_during_a_burst_leaves_a_sound_file_with_whole_rows_only(tmp_path):
    path = tmp_path / "killed.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(0.4)  # mid-burst: the child never stops writing
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute(
            "SELECT id, ts, model, prompt_tokens, completion_tokens, cost_usd, error, attempts, status FROM requests "
            "ORDER BY id"
        ).fetchall()
    assert len(rows) >= 3000
    for expected, (rid, ts, model, prompt, completion, cost, error, attempts, status) in enumerate(rows):
        n = int(rid[1:])
        assert n == expected  # batches commit in order: what is there is a prefix of what was written
        assert (ts, model, prompt, completion, status) == (1e9 + n, f"m{n}", n, 2 * n, "ok")
        assert math.isclose(cost, n * 1e-6, abs_tol=1e-15)
        assert (error or "") == "x" * (n % 700)
        assert json.loads(attempts)[0]["latency_ms"] == float(n)


# --- ledger, decisions, health through the hooks ----------------------------------------------------


async def test_completed_writes_every_record_field_to_the_ledger(store):
    persistence = Persistence(store)
    full = RequestRecord(
        id="req-full", ts=1234.5, session_id=None, api_key_id="key-1", tag="nightly", mode="cost",
        provider="groq", model="llama-3.1-8b-instant", prompt_tokens=11, completion_tokens=22, cached_tokens=3,
        reasoning_tokens=4, cost_usd=0.5, est_cost_usd=0.6, saved_usd=0.0, latency_ms=12.5, ttft_ms=3.5,
        status="error", error_kind="rate_limited", error="slow down", cached=False, decision_id="dec-1",
        stream=True, namespace="ns", source="gateway",
        attempts=[Attempt("openai", "gpt-4o", "server_error", "boom", 40.0), Attempt("groq", "llama-3.1-8b-instant")],
    )  # fmt: skip
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], stream=True)
    persistence.completed(full, request, None, RouteOptions(), CallContext())
    await store.flush()
    row = await queries.get_request(store, "req-full")
    expected = full.to_dict()
    expected["attempts"][0]["latency_ms"] = 40.0
    expected["attempts"][1]["latency_ms"] = 0.0
    assert {k: row[k] for k in expected} == expected
    assert row["needs"] == "chat,streaming"
    assert len(row["prompt_key"]) == 64


async def test_the_ledger_prompt_key_is_the_cache_key_of_the_request(store):
    from p402_tui.cache.embedders import HashedNgramEmbedder
    from p402_tui.cache.semantic import SemanticCache, request_keys

    persistence = Persistence(store, SemanticCache(store, embedder=HashedNgramEmbedder()))
    request = ChatRequest(messages=[{"role": "user", "content": "what is a router?"}], max_tokens=16)
    options, ctx = RouteOptions(mode="cost"), CallContext()
    assert await persistence.lookup(request, options, ctx) is None  # a miss: the cache keeps its keys for the ledger
    persistence.completed(RequestRecord(id="req-k", status="error"), request, None, options, ctx)
    await store.flush()
    row = await queries.get_request(store, "req-k")
    assert row["prompt_key"] == request_keys(request, options).exact


async def test_decisions_are_kept_whole_with_indexed_columns(store):
    decision = {
        "id": "dec-7", "ts": 100.0, "mode": "balanced",
        "chosen": {"id": "openai/gpt-4o", "provider": "openai", "model": "gpt-4o", "tier": "premium",
                   "est_cost_usd": 0.01, "score": 0.8},
        "fallbacks": ["groq/llama-3.1-8b-instant"],
        "candidates": [{"id": "openai/gpt-4o", "score": 0.8}, {"id": "groq/llama-3.1-8b-instant", "score": 0.7}],
        "excluded": [{"id": "x/y", "reason": "no vision"}], "prompt_tokens": 12, "est_output_tokens": 100,
        "decision_us": 55.0, "options": {"mode": None},
    }  # fmt: skip
    Persistence(store).decided(decision)
    await store.flush()
    assert await queries.get_decision(store, "dec-7") == decision
    assert await queries.recent_decisions(store, limit=5) == [decision]
    row = await store.fetchone("SELECT chosen, tier, candidates, excluded FROM router_decisions WHERE id = 'dec-7'")
    assert row == {"chosen": "openai/gpt-4o", "tier": "premium", "candidates": 2, "excluded": 1}


async def test_health_snapshots_are_kept_over_time(store):
    persistence = Persistence(store)
    for i, status in enumerate(["healthy", "degraded", "down"]):
        persistence.health({"provider": "openai", "status": status, "circuit": "closed", "error_rate": i / 10,
                            "latency_ms_p50": 100.0 + i, "latency_ms_p95": 200.0, "ts": 1000.0 + i})  # fmt: skip
    persistence.health({"provider": "groq", "status": "healthy", "ts": 999.0})
    await store.flush()
    history = await queries.health_history(store, provider="openai")
    assert [h["status"] for h in history] == ["healthy", "degraded", "down"]
    assert len(await queries.health_history(store)) == 4


# --- gateway keys --------------------------------------------------------------------------------


async def test_gateway_keys_create_verify_list_revoke(store, tmp_path):
    key, secret = await queries.create_key(store, "ci")
    assert secret.startswith("p402-") and len(secret) > 40
    assert key["active"] and "hash" not in key
    assert await queries.verify_key(store, secret) == key
    assert await queries.verify_key(store, secret + "x") is None
    assert [k["id"] for k in await queries.list_keys(store)] == [key["id"]]
    assert await queries.revoke_key(store, key["id"]) is True
    assert await queries.revoke_key(store, key["id"]) is False
    assert await queries.verify_key(store, secret) is None
    assert (await queries.list_keys(store))[0]["active"] is False
    await store.flush()
    if store.engine == "sqlite":
        assert secret.encode() not in Path(store.path).read_bytes() + Path(f"{store.path}-wal").read_bytes()
    assert not await store.scalar("SELECT COUNT(*) FROM gateway_keys WHERE hash = ? OR prefix = ?", (secret, secret))


async def test_a_route_decision_is_kept_compact_and_reads_back_whole(store):
    from p402_tui.core.catalog import load_catalog
    from p402_tui.core.router import Router
    from p402_tui.core.types import ChatRequest

    router = Router(load_catalog())
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    decision, again = router.route(request), router.route(request)
    persistence = Persistence(store)
    persistence.decided(decision)
    persistence.decided(again)
    await store.flush()
    assert await queries.get_decision(store, decision.id) == decision.to_dict()
    assert [d["id"] for d in await queries.recent_decisions(store)] == [again.id, decision.id]
    assert await store.scalar("SELECT COUNT(*) FROM decision_models") == 1  # an option set's models are kept once
    assert await store.scalar("SELECT COUNT(*) FROM decision_vectors") == 1  # and the live figures, until health moves
    own = await store.scalar(f"SELECT length(decision) FROM router_decisions WHERE id = '{decision.id}'")
    # Header, ranking, and each candidate's score, cost score and estimate: 26 bytes a candidate.
    assert own < 600 + 26 * len(decision.candidates)
    row = await store.fetchone(f"SELECT chosen, candidates, excluded FROM router_decisions WHERE id = '{decision.id}'")
    assert row == {"chosen": decision.chosen_id, "candidates": len(decision.candidates), "excluded": len(decision.excluded)}


async def test_a_database_that_cannot_open_leaves_no_thread_behind(tmp_path):
    """aiosqlite stops its thread without waiting; one still running answered a closed loop with tracebacks."""
    before = set(threading.enumerate())
    with pytest.raises(StoreError, match="cannot open database"):
        await connect(tmp_path)  # a directory
    left = [t for t in threading.enumerate() if t not in before and not t.name.startswith(("asyncio_", "uvloop_"))]  # the loop's pool
    assert [t for t in left if t.is_alive()] == []


def test_sql_is_written_once_and_postgresql_gets_its_placeholders_and_types():
    from p402_tui.store.db import MIGRATIONS, migration_sql, postgres_ddl
    from p402_tui.store.dialect import numbered_sql, postgres_sql

    assert postgres_sql("SELECT a::text, '50%?' FROM t WHERE x = ? AND y LIKE 'a%' -- why?\n AND z = :name") == (
        "SELECT a::text, '50%%?' FROM t WHERE x = %s AND y LIKE 'a%%' -- why?\n AND z = %(name)s"
    )
    assert numbered_sql("SELECT a::text, '50%?' FROM t WHERE x = ? AND y LIKE 'a%' -- why?\n AND z IN (?, ?)") == (
        "SELECT a::text, '50%?' FROM t WHERE x = $1 AND y LIKE 'a%' -- why?\n AND z IN ($2, $3)"
    )
    assert postgres_ddl("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, v BLOB, n INTEGER) WITHOUT ROWID") == (
        "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION, v BYTEA, n INTEGER)"
    )
    portable = "ALTER TABLE requests ADD COLUMN client_request_id TEXT;"  # a plain string serves both engines
    assert migration_sql(portable, "sqlite") == migration_sql(portable, "postgresql") == portable
    for entry in MIGRATIONS:
        assert "PRAGMA" not in migration_sql(entry, "postgresql") and "rowid" not in migration_sql(entry, "postgresql")
