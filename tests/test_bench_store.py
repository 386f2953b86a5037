"""bench/store.py's bulk fill: rows as the gateway writes them, the rollups its writer would keep for them, and
the same ledger, rollups and reports on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import importlib.util
import json
import math
import sqlite3
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from p402_tui.core.hooks import RequestRecord
from p402_tui.core.types import Attempt
from p402_tui.store import queries
from p402_tui.store.store import Store

ROOT = Path(__file__).resolve().parent.parent
ROWS = 3000


def _bench():
    spec = importlib.util.spec_from_file_location("bench_store", ROOT / "bench" / "store.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOTALS = {
    "requests": "SELECT count(*), round(sum(cost_usd) * 1e6) FROM requests",
    "spend_hourly": "SELECT sum(requests), round(sum(cost_usd) * 1e6), sum(cached) FROM spend_hourly WHERE dim = 'model'",
    "model_hourly": "SELECT sum(requests), sum(prompt_tokens) FROM model_hourly",
    "attempt_hourly": "SELECT sum(attempts), sum(failures), sum(failovers) FROM attempt_hourly",
}
ROLLUPS = {  # each rollup table in a fixed order
    "spend_hourly": "dim, hour, value, api_key_id, simulated",
    "model_hourly": "hour, provider, model, needs, api_key_id, simulated",
    "attempt_hourly": "hour, provider, api_key_id, simulated",
}


def _record(row: tuple) -> tuple[RequestRecord, dict]:
    """The gateway's record of a bench row, and what the writer is told beside it."""
    values = dict(zip(queries.LEDGER_COLUMNS, row))
    extra = {"needs": values.pop("needs"), "prompt_key": values.pop("prompt_key"), "simulated": bool(values.pop("simulated"))}
    values.pop("priced")
    for flag in ("cached", "stream", "usage_estimated"):
        values[flag] = bool(values[flag])
    values["attempts"] = [Attempt(**attempt) for attempt in json.loads(values["attempts"])]
    return RequestRecord(**values), extra


async def test_bench_rows_and_rollups_are_what_the_gateway_writes(tmp_path):
    bench, now = _bench(), time.time()
    rows = [row for chunk, _ in bench.generate(800, now) for row in chunk]
    kinds = {(row[17], len(json.loads(row[25]))) for row in rows}
    assert {("ok", 0), ("ok", 1), ("ok", 2), ("error", 1)} <= kinds  # cached, answered, failed over, failed
    records = [_record(row) for row in rows]
    for row, (record, extra) in zip(rows, records):
        assert queries.request_row(record, **extra) == row  # the ledger row, column for column

    bench.fill_sqlite(tmp_path / "bulk.db", 800, now, 120)
    async with await Store.open(tmp_path / "written.db") as written:
        for record, extra in records:
            written.put_later(lambda record=record, extra=extra: queries.ledger_writes(record, **extra))
        await written.flush()
        bulk = sqlite3.connect(tmp_path / "bulk.db")
        bulk.row_factory = sqlite3.Row
        for table, order in ROLLUPS.items():
            by_writer = await written.fetchall(f"SELECT * FROM {table} ORDER BY {order}")
            by_bench = [dict(row) for row in bulk.execute(f"SELECT * FROM {table} ORDER BY {order}")]
            assert len(by_bench) == len(by_writer) > 0, table
            for a, b in zip(by_bench, by_writer):
                assert a.keys() == b.keys()
                assert all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-9) if isinstance(a[k], float)
                           else a[k] == b[k] for k in a), (table, a, b)  # fmt: skip
        assert await written.scalar("SELECT count(*) FROM rollup_state") == 0
        assert bulk.execute("SELECT count(*) FROM rollup_state").fetchone()[0] == 0


def _report(db: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "p402_tui", *args, "--db", db, "--json"], capture_output=True,
                          text=True, timeout=120, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    report = json.loads(done.stdout)
    if isinstance(report, dict):
        report.pop("period", None)
    return report


def _rounded(value):
    """Floats to 4 places: the engines add costs in different orders."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def test_bulk_fill_gives_both_engines_the_same_ledger_rollups_and_reports(tmp_path, pg_url):
    import psycopg

    bench, now = _bench(), time.time()
    path = tmp_path / "ledger.db"
    on_sqlite = bench.fill_sqlite(path, ROWS, now, 120)
    on_postgres = bench.fill_postgres(pg_url, ROWS, now, 120)
    assert on_sqlite["size_bytes"] > on_sqlite["empty_size_bytes"]
    assert on_postgres["size_bytes"] > on_postgres["empty_size_bytes"]

    lite = sqlite3.connect(path)
    with psycopg.connect(pg_url) as pg:
        for name, sql in TOTALS.items():
            expected = tuple(float(v) for v in lite.execute(sql).fetchone())
            assert tuple(float(v) for v in pg.execute(sql).fetchone()) == expected, name
        assert expected[0] > 0  # the attempts were summed, failovers included
        indexes = {row[0] for row in pg.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'requests'")}
        key = pg.execute("SELECT count(*) FROM pg_constraint WHERE conrelid = 'requests'::regclass AND contype = 'p'")
        assert key.fetchone()[0] == 1
    assert set(bench.SECONDARY_INDEXES) | {"requests_ts", "requests_pkey"} <= indexes  # dropped for the load, built after
    assert lite.execute("SELECT count(*) FROM requests").fetchone()[0] == ROWS

    # Fixed dates around the whole ledger, so that the period (and the span a month is scaled from) is the same
    # in both commands, however long the first took: a period ending now moves between them.
    first = date.fromtimestamp(now) - timedelta(days=bench.DAYS + 1)
    period = f"{first}..{date.fromtimestamp(now) + timedelta(days=1)}"
    for args in (("spend", "--period", period, "--by", "model"), ("recommendations", "--period", period)):
        on_sqlite, on_postgres = _report(str(path), *args), _report(pg_url, *args)
        assert on_sqlite, args
        assert _rounded(on_sqlite) == _rounded(on_postgres), args
