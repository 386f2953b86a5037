"""`Store`: the SQLite file opened for one process (`postgres.PgStore` is the same for a server).

Two connections: the writer's (on its own thread), and one for reads (aiosqlite). In WAL mode reads never
wait for the writer and only ever see whole, committed batches.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from .base import StoreBase
from .db import StoreError, connect
from .dialect import SQLITE
from .sqlite_writer import Writer
from .writer import INTERVAL_S, Params


class Store(StoreBase):
    engine = "sqlite"
    dialect = SQLITE
    unavailable: str | None = None  # a file does not go away as a server does

    def __init__(self, path: Path, reader: aiosqlite.Connection, writer: Writer) -> None:
        self.path = path
        self.reader = reader
        super().__init__()
        self.writer = writer

    @classmethod
    async def open(
        cls, path: Path | str, *, interval: float = INTERVAL_S, create: bool = True, realtime: bool = False
    ) -> "Store":
        """`create=False` for reports: a mistyped --db then says so instead of reporting an empty new file."""
        path = Path(path).expanduser()
        if not create and not await asyncio.to_thread(path.is_file):
            raise StoreError(f"no P402 database at {path}: nothing has been recorded there")
        reader = await connect(path)  # creates and migrates the file
        try:
            writer = await Writer.open(path, interval=interval, realtime=realtime)
        except BaseException:
            await reader.close()
            raise
        return cls(path, reader, writer)

    async def aclose(self) -> None:
        """Commit everything queued, then close. Nothing put before this is lost."""
        try:
            await self.writer.aclose()
        finally:
            await self.reader.close()

    # --- reads -----------------------------------------------------------------

    # Every read is one job on the reader's thread, run to its end (`execute_fetchall`). A statement left open
    # between jobs (a cursor read row by row) keeps its read snapshot, and any query another task runs on the
    # connection meanwhile reads that snapshot too: it missed rows committed since, even after a flush.
    # The single-row reads are lookups by key and aggregates: reading them to the end costs nothing.

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in await self.reader.execute_fetchall(sql, params)]

    async def rows(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Rows as `sqlite3.Row`, for bulk reads that are then processed off the event loop."""
        return await self.reader.execute_fetchall(sql, params)  # type: ignore[return-value]  # a list, typed Iterable

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        found = await self.reader.execute_fetchall(sql, params)
        return dict(found[0]) if found else None

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        found = await self.reader.execute_fetchall(sql, params)
        return found[0][0] if found else None

    async def schema_version(self) -> int:
        return await self.scalar("PRAGMA user_version")

    async def integrity_check(self) -> str:
        return await self.scalar("PRAGMA integrity_check")
