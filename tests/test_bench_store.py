"""bench/store.py's bulk fill: the same ledger and rollups on SQLite and on a real PostgreSQL, and both
engines' reports agree on it."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

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


def _report(db: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "p402_tui", *args, "--db", db, "--json"], capture_output=True,
                          text=True, timeout=120, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    report = json.loads(done.stdout)
    if isinstance(report, dict):
        report.pop("period", None)  # the moment the command ran
    return report


def _rounded(value):
    """Floats to 4 places: the engines add costs in different orders, and a month is scaled from the run's moment."""
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
    assert set(bench.SECONDARY_INDEXES) <= indexes  # dropped for the load, built again after it
    assert lite.execute("SELECT count(*) FROM requests").fetchone()[0] == ROWS

    # `all`: a 30-day window moves between the two commands, and a row at its edge may fall either side
    for args in (("spend", "--period", "all", "--by", "model"), ("recommendations",)):
        assert _rounded(_report(str(path), *args)) == _rounded(_report(pg_url, *args)), args
