"""Which engine a store is on: a PostgreSQL URL (`postgresql://user@host:port/dbname`) or a SQLite file's path.

Both engines answer the same methods (`put`, `put_later`, `run`, `flush`, `fetchall`, `rows`,
`fetchone`, `scalar`, `schema_version`, `aclose`, `writer`, `dialect`, `unavailable`); the rest of
P402 opens a store here and never asks which it got. psycopg is imported only for a URL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ..core.config import is_store_url
from .store import Store
from .writer import INTERVAL_S


async def open_store(
    value: str | Path, *, interval: float = INTERVAL_S, create: bool = True, realtime: bool = False
) -> Any:
    """The store `value` names, migrated and with its writer running (`realtime`: see `gil.promptly`)."""
    if is_store_url(value):
        from .postgres import PgStore

        return await PgStore.open(str(value), interval=interval, create=create, realtime=realtime)
    return await Store.open(value, interval=interval, create=create, realtime=realtime)


async def exists(value: str | Path) -> bool:
    """Whether there is a store to read: a file, or a database where P402 made its tables."""
    if is_store_url(value):
        from . import postgres

        conn = await postgres.connect(str(value))
        try:
            return await postgres.schema_version(conn) is not None
        finally:
            await conn.close()
    return await asyncio.to_thread(Path(value).expanduser().is_file)
