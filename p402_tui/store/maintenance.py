"""The store's upkeep: its status without touching it, whether it can serve, and pruning old history.

Everything here names tables and asks the engine through its store; what the engines report
differently (a file's size, a server's database) comes from each engine's own module.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from ..core.config import is_store_url
from .db import SCHEMA_VERSION, StoreError
from .rollups import HOUR, ROLLUP_TABLES
from .store import Store

ENGINE = "sqlite"
# What `status` counts and `prune` trims: the history that grows with traffic.
MAIN_TABLES = ("requests", "router_decisions", "provider_health", "agent_sessions", "gateway_keys", "semantic_cache")
HISTORY_TABLES = ("requests", "router_decisions", "provider_health", "guardrail_hits")
PRUNE_BATCH = 500  # rows a transaction: the writer's other work waits at most one batch
ROLLUP_PRUNE_HOURS = 6  # hours of rollups a transaction, some thousands of rows


async def status(target: Path | str) -> dict[str, Any]:
    """Engine, path (or URL), schema version against this P402's, rows of the main tables, size.

    Read-only: a store of an older version is reported as it is, not migrated (that is `migrate`).
    """
    if is_store_url(target):
        from . import postgres

        return await postgres.status(str(target), MAIN_TABLES)
    return await asyncio.to_thread(_file_status, Path(target).expanduser())


def _file_status(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = {
        "engine": ENGINE, "path": str(path), "exists": path.is_file(), "schema_version": None,
        "current_version": SCHEMA_VERSION, "up_to_date": False, "size_bytes": 0, "rows": {},
    }  # fmt: skip
    if not report["exists"]:
        return report
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise StoreError(f"cannot open database {path}: {error}") from None
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in MAIN_TABLES if t in names}
    except sqlite3.Error as error:
        raise StoreError(f"cannot read database {path}: {error}") from None
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.is_file())
    report.update(schema_version=version, up_to_date=version == SCHEMA_VERSION, size_bytes=size, rows=rows)
    return report


async def check(store: Store) -> dict[str, Any]:
    """Whether the store answers and is at this P402's schema version: {ok, schema_version, reason}."""
    down = store.unavailable
    if down:  # the writer or a read found the server away: no need to wait on it again
        return {"ok": False, "schema_version": None, "reason": f"the store does not answer: {down}"}
    try:
        version = await asyncio.wait_for(store.schema_version(), 2.0)
    except TimeoutError:
        return {"ok": False, "schema_version": None, "reason": "the store does not answer within 2 s"}
    except (sqlite3.Error, StoreError, ValueError) as error:  # ValueError: its connection was closed
        return {"ok": False, "schema_version": None, "reason": f"the store does not answer: {error}"}
    if version != SCHEMA_VERSION:
        reason = f"schema version {version}, this P402 needs {SCHEMA_VERSION} (run `p402 db migrate`)"
        return {"ok": False, "schema_version": version, "reason": reason}
    return {"ok": True, "schema_version": version, "reason": None}


async def prune(store: Store, before_ts: float, *, batch: int = PRUNE_BATCH) -> dict[str, int]:
    """Delete history rows older than `before_ts`, `batch` rows a transaction; rows removed by table."""
    removed = {}
    for table in HISTORY_TABLES:
        total = 0
        while True:
            row = store.dialect.rowid
            sql = f"DELETE FROM {table} WHERE {row} IN (SELECT {row} FROM {table} WHERE ts < ? LIMIT ?)"
            count = await store.run(sql, (before_ts, batch))
            total += count
            if count < batch:
                break
        removed[table] = total
    # The ledger's hourly sums go with it, whole hours only (the hour the cut falls in still counts its rows),
    # a few hours a transaction.
    cut = int(before_ts // HOUR)
    for table in ROLLUP_TABLES:
        total = 0
        while (first := await store.scalar(f"SELECT MIN(hour) FROM {table}")) is not None and first < cut:
            total += await store.run(f"DELETE FROM {table} WHERE hour < ?", (min(cut, first + ROLLUP_PRUNE_HOURS),))
        removed[table] = total
    return removed
