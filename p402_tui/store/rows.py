"""A group of one statement's writes as a few multi-row statements, for either engine's writer.

Sent a row at a time, a batch of a hundred requests is some 300 statements. SQLite's writer lets go
of the GIL at each one and waits to take it back (up to the switch interval, while the loop runs);
PostgreSQL's pays each one's protocol messages and result handling in psycopg's Python, on the
gateway's GIL, and the server's parse, bind and execute. As `VALUES (...), (...)` they are a dozen.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from typing import Any

from .dialect import numbered_sql
from .rollups import MARK_REPEAT, mark_repeats

MAX_ROWS = 128  # rows in one multi-row statement
# A statement's parameters: SQLite's limit (since 3.32); PostgreSQL's is 65535.
MAX_VARIABLES = {"sqlite": 32766, "postgresql": 65535}


def multi_row(sql: str, rows: int = 0, engine: str = "sqlite") -> str | None:
    """`sql` (an INSERT of one VALUES row of bare `?`s, or MARK_REPEAT) for `rows` rows; None for any
    other statement. `rows` 0 only asks whether there is a form for it."""
    return _multi_row(sql, rows, engine == "postgresql")


@functools.lru_cache(maxsize=512)
def _multi_row(sql: str, rows: int, typed: bool) -> str | None:
    if sql == MARK_REPEAT:
        return mark_repeats(rows, "postgresql" if typed else "sqlite") if rows else sql
    start = sql.find(" VALUES (")
    if start == -1 or not sql.lstrip().upper().startswith("INSERT"):
        return None
    end = sql.find(")", start)
    values = sql[start + 8:end + 1]
    if end == -1 or values.strip("(?, )"):
        return None
    return f"{sql[:start + 8]}{', '.join([values] * rows)}{sql[end + 1:]}" if rows else sql


def groupable(sql: str, params: Sequence[Any]) -> bool:
    """Whether rows of `params` for `sql` can go as multi-row statements (`grouped`): a form for them,
    and each row a plain sequence (named parameters have no place in a VALUES list)."""
    return multi_row(sql) is not None and all(type(row) in (tuple, list) for row in params)


def grouped(sql: str, params: Sequence[Sequence[Any]], engine: str = "sqlite") -> Iterator[tuple[Any, list[Any]]]:
    """One statement's rows of `params` as (multi-row statement, its parameters), a few per group: sizes
    in powers of two, so each engine's statement cache (SQLite's, psycopg's prepared statements) holds
    a handful of forms per table. PostgreSQL's statements come numbered (`$1`) and encoded, for a
    RawCursor. The caller checks `multi_row(sql)` (or `groupable`) first."""
    width = len(params[0]) if params else 0
    most = max(1, min(MAX_ROWS, MAX_VARIABLES[engine] // max(width, 1)))
    if engine == "postgresql":
        parts = _unique_keys(sql, params)
    else:
        parts = [params]  # SQLite takes a key twice in one upsert: the later row wins
    for part in parts:
        at = 0
        while at < len(part):
            rows = 1 << (min(len(part) - at, most).bit_length() - 1)
            statement = numbered(_multi_row(sql, rows, True)) if engine == "postgresql" else _multi_row(sql, rows, False)
            yield statement, [v for row in part[at:at + rows] for v in row]
            at += rows


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> bytes:
    """`sql` with `$1` placeholders, encoded: what a RawCursor and `pg_batch` send."""
    return numbered_sql(sql).encode()


def _unique_keys(sql: str, params: Sequence[Sequence[Any]]) -> list[Sequence[Sequence[Any]]]:
    """PostgreSQL refuses an upsert that updates one row twice (ON CONFLICT DO UPDATE "cannot affect
    row a second time"): rows in runs with no conflict key twice, in their order, so the later still wins."""
    key = _conflict_key(sql)
    if key is None or len(params) < 2:
        return [params]
    parts: list[Sequence[Sequence[Any]]] = []
    seen: set[tuple[Any, ...]] = set()
    start = 0
    for i, row in enumerate(params):
        k = tuple(row[j] for j in key)
        if k in seen:
            parts.append(params[start:i])
            seen, start = set(), i
        seen.add(k)
    parts.append(params[start:])
    return parts


_CONFLICT = re.compile(r"ON CONFLICT\s*\(([^)]*)\)\s*DO UPDATE", re.IGNORECASE)
_COLUMNS = re.compile(r"INSERT INTO\s+\S+\s*\(([^)]*)\)", re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def _conflict_key(sql: str) -> tuple[int, ...] | None:
    """Where an upsert's conflict columns sit among its parameters; None when it updates nothing on a
    conflict (DO NOTHING takes a key twice), or its key cannot be read (then a twice-updated row fails
    the batch, which the writer then writes a row at a time)."""
    conflict, columns = _CONFLICT.search(sql), _COLUMNS.search(sql)
    if conflict is None or columns is None:
        return None
    names = [c.strip() for c in columns.group(1).split(",")]
    try:
        return tuple(names.index(c.strip()) for c in conflict.group(1).split(","))
    except ValueError:
        return None
