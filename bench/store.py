#!/usr/bin/env python3
"""Spend and recommendations at millions of ledger rows, timed as a user runs them.

For each size (1 and 10 million rows by default) it makes a fresh store, fills it in bulk with a
ledger spread over 90 days (providers and models from the catalog, gateway keys, sessions, tags,
cache hits, failovers and failures, repeated prompts, a few unpriced and simulated calls), sums
the rollups the way the migration does for an existing ledger (one INSERT ... SELECT GROUP BY per
table; the attempt sums, which SQL cannot read out of JSON, are summed here as the rows are made),
then runs `p402 spend --period 30d --by model` and `p402 recommendations` as subprocesses against
it, `--runs` times each, and prints JSON: rows, size on disk (and per million rows), the fill's
duration, and each command's median and every run's seconds.

    python bench/store.py                               # 1M and 10M rows, SQLite then PostgreSQL
    python bench/store.py --rows 1000000 --engine sqlite --runs 3
    python bench/store.py --engine postgres --url postgresql://p402@127.0.0.1:5432/bench

PostgreSQL runs on a cluster the bench starts itself in a temporary folder on a free loopback port
(tests/postgres.py, as the tests do; as root it belongs to the `postgres` user), one new database
per size, unless `--url` names an empty database. Its CPU seconds are the CLI's own; the server's
work shows in the wall seconds. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import pg_cluster_module  # bench/gateway.py, beside this file

from p402_tui.core.catalog import load_catalog
from p402_tui.store import rollups

DAYS = 90
CHUNK = 100_000  # rows a transaction
MODELS = (  # (model id, share of traffic)
    ("openai/gpt-4o", 12), ("openai/gpt-4o-mini", 20), ("openai/gpt-5", 6), ("openai/gpt-4.1-mini", 8),
    ("anthropic/claude-sonnet-4-6", 12), ("anthropic/claude-haiku-4-5-20251001", 8),
    ("anthropic/claude-opus-4-6", 3), ("google/gemini-2.5-flash", 14), ("google/gemini-2.5-pro", 5),
    ("groq/llama-3.1-8b-instant", 6), ("mistral/mistral-small-latest", 4), ("deepseek/deepseek-chat", 2),
)  # fmt: skip
KEYS = [f"key-{i:012x}" for i in range(1, 9)] + [None]
TAGS = ["nightly", "adhoc", "eval", "support", "search", "etl", "agents", "docs"] + [None] * 6
NEEDS = ["chat"] * 15 + ["chat,function_calling"] * 4 + ["chat,vision"]
COLUMNS = (
    "id", "ts", "session_id", "api_key_id", "tag", "mode", "provider", "model", "prompt_tokens",
    "completion_tokens", "cost_usd", "est_cost_usd", "saved_usd", "latency_ms", "ttft_ms", "status",
    "error_kind", "error", "cached", "decision_id", "stream", "namespace", "source", "attempts", "needs",
    "prompt_key", "simulated", "priced",
)  # fmt: skip
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
SECONDARY_INDEXES = ("requests_session", "requests_key", "requests_prompt")


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


def _attempt(provider: str, model: str, error_kind: str | None, latency: float) -> str:
    error = '"upstream said no"' if error_kind else "null"
    kind = f'"{error_kind}"' if error_kind else "null"
    return (f'{{"provider":"{provider}","model":"{model}","error_kind":{kind},"error":{error},'
            f'"latency_ms":{latency:.1f}}}')  # fmt: skip


def generate(total: int, now: float, seed: int = 402):
    """Chunks of ledger rows in time order, and the attempt sums per (hour, provider, key, simulated)."""
    rng = random.Random(seed)
    models = _models()
    weights = [m[3] for m in models]
    start = now - DAYS * 86400.0
    step = DAYS * 86400.0 / total
    repeated = [uuid.UUID(int=rng.getrandbits(128)).hex * 2 for _ in range(50_000)]
    attempts: dict[tuple[int, str, str, int], list[float]] = {}
    made = 0
    while made < total:
        rows = []
        picks = rng.choices(models, weights, k=min(CHUNK, total - made))
        for provider, model, spec, _ in picks:
            ts = start + (made + rng.random()) * step
            made += 1
            day = int((ts - start) // 86400)
            key = rng.choice(KEYS)
            simulated = 1 if rng.random() < 0.02 else 0
            prompt, completion = rng.randint(50, 4000), rng.randint(10, 1200)
            roll = rng.random()
            cached = roll < 0.08
            latency = round(rng.uniform(200, 4000), 1)  # as the attempt list keeps it
            status, error_kind, tries = "ok", None, [_attempt(provider, model, None, latency)]
            sums = [(provider, 1, 0, 0, 0.0)]
            if 0.08 <= roll < 0.13:  # failed over from another provider
                other = models[(models.index((provider, model, spec, _)) + 3) % len(models)]
                wasted = round(rng.uniform(100, 3000), 1)
                tries.insert(0, _attempt(other[0], other[1], "rate_limited", wasted))
                sums.append((other[0], 1, 1, 1, wasted))
            elif 0.13 <= roll < 0.16:  # failed
                status, error_kind = "error", rng.choice(("timeout", "server_error", "rate_limited"))
                tries = [_attempt(provider, model, error_kind, latency)]
                sums = [(provider, 1, 1, 0, latency)]
            unpriced = rng.random() < 0.01
            cost = None if unpriced else (0.0 if cached or status != "ok" else spec.cost(prompt, completion))
            saved = spec.cost(prompt, completion) if cached else 0.0
            prompt_key = rng.choice(repeated) if rng.random() < 0.3 else uuid.UUID(int=rng.getrandbits(128)).hex * 2
            session = f"ses-{day:03d}-{rng.randrange(20):02d}" if rng.random() < 0.3 else None
            if not cached:
                hour = int(ts // rollups.HOUR)
                for name, tries_n, failures, failovers, wasted_ms in sums:
                    into = attempts.setdefault((hour, name, key or "", simulated), [0, 0, 0, 0.0])
                    into[0] += tries_n
                    into[1] += failures
                    into[2] += failovers
                    into[3] += wasted_ms
            rows.append((
                uuid.UUID(int=rng.getrandbits(128)).hex, ts, session, key, rng.choice(TAGS),
                rng.choice(("cost", "balanced", "balanced", "quality", None)), provider, model, prompt, completion,
                cost, cost, saved, latency, latency / 4, status, error_kind,
                "upstream said no" if error_kind else None, int(cached), uuid.UUID(int=rng.getrandbits(128)).hex,
                rng.randrange(2), "default", "gateway", "[" + ",".join(tries) + "]" if not cached else "[]",
                rng.choice(NEEDS), prompt_key, simulated, int(not unpriced),
            ))  # fmt: skip
        yield rows, attempts


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


def fill_sqlite(path: Path, total: int, now: float, timeout: float) -> dict[str, Any]:
    migrate(str(path), timeout)
    empty = path.stat().st_size
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # a bulk load; the store's own writes keep NORMAL
    conn.execute("PRAGMA cache_size=-400000")
    indexes = {name: sql for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")}
    for name in SECONDARY_INDEXES:  # built once after the load, not row by row in random order
        conn.execute(f"DROP INDEX {name}")
    began, cpu = time.perf_counter(), time.process_time()
    attempts: dict[Any, list[float]] = {}
    for rows, attempts in generate(total, now):
        conn.execute("BEGIN")
        conn.executemany(INSERT, rows)
        conn.execute("COMMIT")
    loaded, loaded_cpu = time.perf_counter(), time.process_time()
    for name in SECONDARY_INDEXES:
        conn.execute(indexes[name])
    conn.execute("BEGIN")
    for table in rollups.ROLLUP_TABLES:
        conn.execute(f"DELETE FROM {table}")
    for statement in rollups.BACKFILL:
        conn.execute(statement)
    conn.execute("DELETE FROM attempt_hourly")  # the attempt sums made with the rows, failovers included
    conn.execute("DELETE FROM rollup_state")
    conn.executemany(rollups.UPSERT_ATTEMPTS, [(*key, *sums) for key, sums in attempts.items()])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.is_file())
    return {"load_s": round(loaded - began, 1), "load_cpu_s": round(loaded_cpu - cpu, 1),
            "indexes_and_rollups_s": round(time.perf_counter() - loaded, 1),
            "indexes_and_rollups_cpu_s": round(time.process_time() - loaded_cpu, 1), "size_bytes": size,
            "empty_size_bytes": empty}  # fmt: skip


def fill_postgres(url: str, total: int, now: float, timeout: float) -> dict[str, Any]:
    import psycopg

    # Asked first: a P402 without the PostgreSQL engine would take the URL for a file name and make one.
    _, _, done = _run([sys.executable, "-m", "p402_tui", "db", "status", "--db", url, "--json"], timeout)
    engine = json.loads(done.stdout).get("engine") if done.returncode == 0 else None
    if not engine or not engine.startswith("postg"):
        raise SystemExit(f"this P402 has no PostgreSQL engine: `p402 db status --db URL` answers engine {engine!r}")
    migrate(url, timeout)
    attempts: dict[Any, list[float]] = {}
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")  # a bulk load; the store's own writes keep the default
        conn.execute("SET maintenance_work_mem = '256MB'")
        empty = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        indexes = []
        for name in SECONDARY_INDEXES:  # built once after the load, as on SQLite
            found = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (name,)).fetchone()
            if found:
                indexes.append(found[0])
                conn.execute(f"DROP INDEX {name}")
        conn.commit()
        began, cpu = time.perf_counter(), time.process_time()
        for rows, attempts in generate(total, now):
            with conn.cursor().copy(f"COPY requests ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            conn.commit()
        loaded, loaded_cpu = time.perf_counter(), time.process_time()
        for sql in indexes:
            conn.execute(sql)
        for table in rollups.ROLLUP_TABLES:
            conn.execute(f"DELETE FROM {table}")
        for statement in rollups.BACKFILL:
            conn.execute(statement)
        conn.execute("DELETE FROM attempt_hourly")
        conn.execute("DELETE FROM rollup_state")
        with conn.cursor() as cursor:
            cursor.executemany(rollups.UPSERT_ATTEMPTS.replace("?", "%s"),
                               [(*key, *sums) for key, sums in attempts.items()])  # fmt: skip
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")  # what autovacuum would do soon after; the planner needs the statistics
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return {"load_s": round(loaded - began, 1), "load_cpu_s": round(loaded_cpu - cpu, 1),
            "indexes_and_rollups_s": round(time.perf_counter() - loaded, 1),
            "indexes_and_rollups_cpu_s": round(time.process_time() - loaded_cpu, 1), "size_bytes": size,
            "empty_size_bytes": empty}  # fmt: skip


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
