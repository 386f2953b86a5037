#!/usr/bin/env python3
"""Spend and recommendations at millions of ledger rows, timed as a user runs them.

For each size (1 and 10 million rows by default) it makes a fresh store, fills it in bulk with a
ledger spread over 90 days (providers and models from the catalog, gateway keys, sessions, tags,
cache hits, failovers and failures, repeated prompts, a few unpriced and simulated calls), each row
as the gateway writes it, drawn with numpy a chunk at a time (SQLite: executemany, a million rows a
transaction; PostgreSQL: COPY ... FREEZE in one transaction, every ledger index built after). It
sums the rollups the way the migration does for an existing ledger (one INSERT ... SELECT GROUP BY
per table) and adds the tries of failed and failed-over rows, which SQL cannot read out of their
JSON, summed by the gateway's own code as the rows are made: the rollups the gateway's writer would
have kept (tests/test_bench_store.py checks both), then runs `p402 spend --period 30d --by model` and `p402 recommendations` as subprocesses against
it, `--runs` times each, and prints JSON: rows, size on disk (and per million rows), the fill's
duration, and each command's median and every run's seconds.

    python bench/store.py                               # 1M and 10M rows, SQLite then PostgreSQL
    python bench/store.py --rows 1000000 --engine sqlite --runs 3
    python bench/store.py --engine postgres --url postgresql://p402@127.0.0.1:5432/bench
    python bench/store.py --rows 10000000 --runs 3 2>/dev/null    # the issue's size, both engines, quietly

PostgreSQL runs on a cluster the bench starts itself in a temporary folder on a free loopback port
(tests/postgres.py, as the tests do; as root it belongs to the `postgres` user), one new database
per size, unless `--url` names an empty database. Its CPU seconds are the CLI's own; the server's
work shows in the wall seconds. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import pg_cluster_module  # bench/gateway.py, beside this file

from p402_tui.core.catalog import load_catalog
from p402_tui.store import queries, rollups

DAYS = 90
CHUNK = 100_000  # rows made at a time
MODELS = (  # (model id, share of traffic)
    ("openai/gpt-4o", 12), ("openai/gpt-4o-mini", 20), ("openai/gpt-5", 6), ("openai/gpt-4.1-mini", 8),
    ("anthropic/claude-sonnet-4-6", 12), ("anthropic/claude-haiku-4-5-20251001", 8),
    ("anthropic/claude-opus-4-6", 3), ("google/gemini-2.5-flash", 14), ("google/gemini-2.5-pro", 5),
    ("groq/llama-3.1-8b-instant", 6), ("mistral/mistral-small-latest", 4), ("deepseek/deepseek-chat", 2),
)  # fmt: skip
KEYS = [f"key-{i:012x}" for i in range(1, 9)] + [None]
TAGS = ["nightly", "adhoc", "eval", "support", "search", "etl", "agents", "docs"] + [None] * 6
MODES = ("cost", "balanced", "balanced", "quality", None)
NEEDS = ["chat"] * 15 + ["chat,function_calling"] * 4 + ["chat,vision"]
ERROR_KINDS = ("timeout", "server_error", "rate_limited")
ERROR = "upstream said no"
COLUMNS = queries.LEDGER_COLUMNS  # every column the gateway writes, in its order
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
SECONDARY_INDEXES = ("requests_session", "requests_key", "requests_prompt")
REPEATED_PROMPTS = 50_000


def _models() -> list[tuple[str, str, Any, int]]:
    catalog = load_catalog()
    found = []
    for model_id, share in MODELS:
        spec = catalog.models.get(model_id)
        if spec is not None:
            provider, _, name = model_id.partition("/")
            found.append((provider, name, spec, share))
    if not found:
        raise SystemExit("none of the bench's models is in the catalog")
    return found


def _try(provider: str, model: str, error_kind: str | None, latency_ms: float) -> str:
    """One attempt as `queries.request_row` writes it (compact JSON; floats as Python prints them)."""
    if error_kind is None:
        return f'{{"provider":"{provider}","model":"{model}","error_kind":null,"error":null,"latency_ms":{latency_ms!r}}}'
    return (f'{{"provider":"{provider}","model":"{model}","error_kind":"{error_kind}","error":"{ERROR}",'
            f'"latency_ms":{latency_ms!r}}}')  # fmt: skip


def _hex_ids(rng: np.random.Generator, count: int, width: int = 32) -> list[str]:
    text = rng.bytes(count * width // 2).hex()
    return [text[i : i + width] for i in range(0, count * width, width)]


def generate(total: int, now: float, seed: int = 402) -> Iterator[tuple[list[tuple], dict[tuple, list[float]]]]:
    """Chunks of ledger rows in time order, each row as `queries.request_row` makes it from the gateway's
    record, and the attempt sums of the chunk's failed and failed-over rows (what SQL cannot read out of
    their JSON), summed by the gateway's own `rollups.attempt_sums`, per (hour, provider, key, simulated).

    The columns are drawn with numpy a chunk at a time; only the strings are made row by row."""
    rng = np.random.default_rng(seed)
    models = _models()
    shares = np.array([m[3] for m in models], dtype=float)
    input_price = np.array([m[2].input_per_1m for m in models])
    output_price = np.array([m[2].output_per_1m for m in models])
    start = now - DAYS * 86400.0
    step = DAYS * 86400.0 / total
    repeated = [key * 2 for key in _hex_ids(rng, REPEATED_PROMPTS)]
    made = 0
    while made < total:
        size = min(CHUNK, total - made)
        ts = start + (np.arange(made, made + size) + rng.random(size)) * step
        made += size
        pick = rng.choice(len(models), size, p=shares / shares.sum())
        prompt = rng.integers(50, 4001, size)
        completion = rng.integers(10, 1201, size)
        # ModelSpec.cost's terms in its order (no cached tokens): the same floats the gateway bills.
        full_cost = prompt * input_price[pick] / 1e6 + 0.0 + completion * output_price[pick] / 1e6
        roll = rng.random(size)  # < 0.08 cached, < 0.13 failed over from another provider, < 0.16 failed
        latency = np.round(rng.uniform(200, 4000, size), 1)
        wasted = np.round(rng.uniform(100, 3000, size), 1)
        columns = (
            ts.tolist(), pick.tolist(), prompt.tolist(), completion.tolist(), full_cost.tolist(), roll.tolist(),
            latency.tolist(), wasted.tolist(), rng.integers(0, len(KEYS), size).tolist(),
            (rng.random(size) < 0.02).tolist(), (rng.random(size) < 0.01).tolist(),
            rng.integers(0, len(ERROR_KINDS), size).tolist(), rng.integers(0, len(TAGS), size).tolist(),
            rng.integers(0, len(MODES), size).tolist(), rng.integers(0, len(NEEDS), size).tolist(),
            rng.integers(0, 2, size).tolist(), (rng.random(size) < 0.3).tolist(),
            rng.integers(0, REPEATED_PROMPTS, size).tolist(), (rng.random(size) < 0.3).tolist(),
            rng.integers(0, 20, size).tolist(), _hex_ids(rng, size), _hex_ids(rng, size), _hex_ids(rng, size, 64),
        )  # fmt: skip
        rows: list[tuple] = []
        attempts: dict[tuple, list[float]] = {}
        for (ts_, m, p, c, cost_full, r, lat, waste, k, sim, unpriced, kind, tag, mode, need, stream, again, which,
             in_session, session_no, id_, decision, fresh) in zip(*columns):  # fmt: skip
            provider, model = models[m][0], models[m][1]
            key = KEYS[k]
            cached = r < 0.08
            status, error_kind = "ok", None
            if cached:
                tries = "[]"
            elif r < 0.13:
                other = models[(m + 3) % len(models)]
                tries = f"[{_try(other[0], other[1], 'rate_limited', waste)},{_try(provider, model, None, lat)}]"
            elif r < 0.16:
                status, error_kind = "error", ERROR_KINDS[kind]
                tries = f"[{_try(provider, model, error_kind, lat)}]"
            else:
                tries = f"[{_try(provider, model, None, lat)}]"
            cost = None if unpriced else (0.0 if cached or status != "ok" else cost_full)
            if not cached and (status != "ok" or r >= 0.08 and r < 0.13):
                hour = int(ts_ // rollups.HOUR)
                for name, sums in rollups.attempt_sums(provider, status, error_kind, lat, json.loads(tries)).items():
                    into = attempts.setdefault((hour, name, key or "", int(sim)), [0, 0, 0, 0.0])
                    for i, value in enumerate(sums):
                        into[i] += value
            session = f"ses-{int((ts_ - start) // 86400):03d}-{session_no:02d}" if in_session else None
            rows.append((
                id_, ts_, session, key, TAGS[tag], MODES[mode], provider, model, p, c, 0, 0,
                cost, cost, cost_full if cached else 0.0, lat, lat / 4, status, error_kind,
                ERROR if error_kind else None, int(cached), decision, stream, "default", "gateway", tries,
                NEEDS[need], repeated[which] if again else fresh, int(sim), 0, int(not unpriced), None,
            ))  # fmt: skip
        yield rows, attempts


def _add(into: dict[tuple, list[float]], sums: dict[tuple, list[float]]) -> None:
    for key, values in sums.items():
        found = into.setdefault(key, [0, 0, 0, 0.0])
        for i, value in enumerate(values):
            found[i] += value


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], timeout: float) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall seconds, CPU seconds (user + system, what a loaded machine does not inflate), the outcome."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    began, cpu = time.perf_counter(), _cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    return time.perf_counter() - began, _cpu() - cpu, done


def migrate(db: str, timeout: float) -> None:
    _, _, done = _run([sys.executable, "-m", "p402_tui", "db", "migrate", "--db", db], timeout)
    if done.returncode != 0:
        raise SystemExit(f"`p402 db migrate --db {db}` failed (exit {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-400:]}")  # fmt: skip


def _figures(began: float, cpu: float, loaded: float, loaded_cpu: float, size: int, empty: int) -> dict[str, Any]:
    return {"load_s": round(loaded - began, 1), "load_cpu_s": round(loaded_cpu - cpu, 1),
            "indexes_and_rollups_s": round(time.perf_counter() - loaded, 1),
            "indexes_and_rollups_cpu_s": round(time.process_time() - loaded_cpu, 1), "size_bytes": size,
            "empty_size_bytes": empty}  # fmt: skip


def _sum_rollups(execute: Any, attempts: dict[tuple, list[float]]) -> list[tuple]:
    """Sum the loaded ledger as the migration does (one INSERT ... SELECT GROUP BY per table), then add the failed
    and failed-over rows' attempts summed as the rows were made; the UPSERT_ATTEMPTS rows are returned to run.

    No `attempts_summed_to` mark is left: as in a store the gateway wrote from the start, every attempt is in
    the rollups and the reports read none from the ledger's JSON."""
    for table in rollups.ROLLUP_TABLES:
        execute(f"DELETE FROM {table}")
    for statement in rollups.BACKFILL:
        execute(statement)
    execute("DELETE FROM rollup_state")
    return [(*key, *sums) for key, sums in attempts.items()]


def fill_sqlite(path: Path, total: int, now: float, timeout: float) -> dict[str, Any]:
    migrate(str(path), timeout)
    empty = path.stat().st_size
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # a bulk load; the store's own writes keep NORMAL
    conn.execute("PRAGMA cache_size=-400000")
    conn.execute("PRAGMA temp_store=FILE")  # the GROUP BYs' sorters spill to disk, not to memory
    indexes = {name: sql for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")}
    for name in SECONDARY_INDEXES:  # built once after the load, not row by row in random order
        conn.execute(f"DROP INDEX {name}")
    began, cpu = time.perf_counter(), time.process_time()
    attempts: dict[tuple, list[float]] = {}
    conn.execute("BEGIN")
    for made, (rows, sums) in enumerate(generate(total, now), 1):
        conn.executemany(INSERT, rows)
        _add(attempts, sums)
        if made % 10 == 0:  # a million rows a transaction: the WAL stays small
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    loaded, loaded_cpu = time.perf_counter(), time.process_time()
    for name in SECONDARY_INDEXES:
        conn.execute(indexes[name])
    conn.execute("BEGIN")
    conn.executemany(rollups.UPSERT_ATTEMPTS, _sum_rollups(conn.execute, attempts))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.is_file())
    return _figures(began, cpu, loaded, loaded_cpu, size, empty)


def fill_postgres(url: str, total: int, now: float, timeout: float) -> dict[str, Any]:
    import psycopg

    # Asked first: a P402 without the PostgreSQL engine would take the URL for a file name and make one.
    _, _, done = _run([sys.executable, "-m", "p402_tui", "db", "status", "--db", url, "--json"], timeout)
    engine = json.loads(done.stdout).get("engine") if done.returncode == 0 else None
    if not engine or not engine.startswith("postg"):
        raise SystemExit(f"this P402 has no PostgreSQL engine: `p402 db status --db URL` answers engine {engine!r}")
    migrate(url, timeout)
    attempts: dict[tuple, list[float]] = {}
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")  # a bulk load; the store's own writes keep the default
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("SET work_mem = '64MB'")
        empty = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        # Every index of the ledger, its primary key's too, is built once after the load: a sorted build
        # instead of 10 million inserts into a b-tree of random ids.
        key = conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'requests'::regclass "
                           "AND contype = 'p'").fetchone()  # fmt: skip
        if key:
            conn.execute(f"ALTER TABLE requests DROP CONSTRAINT {key[0]}")
        indexes = [row[1] for row in conn.execute("SELECT indexname, indexdef FROM pg_indexes "
                                                  "WHERE tablename = 'requests' ORDER BY indexname")]  # fmt: skip
        for name in [row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'requests'")]:
            conn.execute(f"DROP INDEX {name}")
        conn.commit()
        began, cpu = time.perf_counter(), time.process_time()
        # One transaction that empties the ledger first, so COPY may write its rows frozen: VACUUM then has
        # no table of 10 million rows to write again to mark them visible.
        conn.execute("TRUNCATE requests")
        for rows, sums in generate(total, now):
            with conn.cursor().copy(f"COPY requests ({', '.join(COLUMNS)}) FROM STDIN WITH (FREEZE)") as copy:
                for row in rows:
                    copy.write_row(row)
            _add(attempts, sums)
        conn.commit()
        loaded, loaded_cpu = time.perf_counter(), time.process_time()
        if key:
            conn.execute(f"ALTER TABLE requests ADD CONSTRAINT {key[0]} PRIMARY KEY (id)")
        for sql in indexes:
            conn.execute(sql)
        with conn.cursor() as cursor:
            cursor.executemany(rollups.UPSERT_ATTEMPTS.replace("?", "%s"), _sum_rollups(conn.execute, attempts))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")  # what autovacuum would do soon after; the planner needs the statistics
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return _figures(began, cpu, loaded, loaded_cpu, size, empty)


def time_commands(db: str, runs: int, timeout: float) -> dict[str, Any]:
    commands = {
        "spend_30d_by_model": ["spend", "--period", "30d", "--by", "model"],
        "recommendations": ["recommendations"],
    }
    found = {}
    for name, args in commands.items():
        seconds, cpu = [], []
        for _ in range(runs):
            took, used, done = _run([sys.executable, "-m", "p402_tui", *args, "--db", db, "--json"], timeout)
            if done.returncode != 0:
                raise SystemExit(f"`p402 {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-400:]}")
            json.loads(done.stdout)  # a whole report came back
            seconds.append(round(took, 3))
            cpu.append(round(used, 3))
        found[name] = {"median_s": statistics.median(seconds), "median_cpu_s": statistics.median(cpu),
                       "runs_s": seconds, "runs_cpu_s": cpu}  # fmt: skip
    # What starting the CLI costs alone, to tell it from the report's own time.
    took, used, _ = _run([sys.executable, "-m", "p402_tui", "--version"], timeout)
    found["cli_start"] = {"wall_s": round(took, 3), "cpu_s": round(used, 3)}
    return found


def _one(engine: str, total: int, folder: Path, cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Fill one store with `total` rows, time the two reports on it, drop it."""
    now = time.time()
    if engine == "sqlite":
        path = folder / f"ledger-{total}.db"
        filled, db = fill_sqlite(path, total, now, args.timeout), str(path)
    else:
        db = args.url or cluster.create_database()
        filled = fill_postgres(db, total, now, args.timeout)
    timings = time_commands(db, args.runs, args.timeout)
    if engine == "sqlite":
        path.replace(args.keep / path.name) if args.keep else path.unlink()
    elif cluster is not None:
        cluster.psql(f"DROP DATABASE {db.rsplit('/', 1)[1]}")
    return {
        "engine": engine, "rows": total, **filled,
        # what the ledger and its rollups add, over the migrated empty store
        "size_mb_per_million_rows": round((filled["size_bytes"] - filled["empty_size_bytes"]) / 1e6 / (total / 1e6), 1),
        **timings, "load_average": os.getloadavg(),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated ledger sizes")
    parser.add_argument("--engine", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--url", help="postgresql://...@127.0.0.1/... (an empty database; default: a cluster of "
                        "the bench's own)")
    parser.add_argument("--dir", type=Path, help="where the SQLite files go (default: a temporary folder)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any one command may take")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each SQLite file in DIR")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)  # made now: a missing one failed a run at its very end
    sizes = [int(size) for size in args.rows.split(",")]
    engines = ["sqlite", "postgres"] if args.engine == "both" else [args.engine]
    if args.url:
        if "postgres" not in engines:
            parser.error("--url is for --engine postgres")
        host = args.url.split("@")[-1].split("/")[0].split(":")[0]
        if host not in ("127.0.0.1", "localhost"):
            parser.error("the bench only talks to 127.0.0.1")
        if len(sizes) > 1:
            parser.error("one size per PostgreSQL database given with --url: give --rows N")
    cluster = None
    if "postgres" in engines and not args.url:
        try:
            cluster = pg_cluster_module().start_cluster()
        except LookupError as error:
            parser.error(f"--engine postgres needs a PostgreSQL server or --url: {error}")
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="p402-bench-store-", dir=args.dir) as folder:
            for total in sizes:
                for engine in engines:
                    results.append(_one(engine, total, Path(folder), cluster, args))
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            pg_cluster_module().remove_cluster(cluster)
    print(json.dumps({"note": "ledger and rollups only (no decision records); timings include starting the CLI; "
                      "PostgreSQL: the bench's own cluster runs with fsync=off, as the tests' does",
                      "results": results}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
