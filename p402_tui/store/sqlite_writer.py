"""SQLite's writer (`Writer`): `writer.BatchWriter`'s thread on a connection of its own to the file.

SQLite's automatic checkpoint, run by the commit that crosses 1000 pages of WAL, held that commit for
15 to 50 ms instead of 0.3 (measured under kill9's load), with a batch of answered requests not yet
written: a second thread does it instead, on its own connection (`_checkpoints`).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from .db import StoreError, is_busy, open_sync
from .rows import grouped, multi_row
from .writer import INTERVAL_S, Batch, BatchWriter, Write, _first_line, log, shapes

CHECKPOINT_EVERY_S = 1.0  # at most this often; about 1000 pages of WAL at 1,000 requests a second


class Writer(BatchWriter):
    """The SQLite file's writer: its own connection, used only from its own thread."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(**options)
        self.path = path
        self.conn: sqlite3.Connection | None = None  # the thread's, opened there
        self._checkpoint = threading.Event()  # the WAL has grown: the checkpointer's cue
        self._checkpointed = 0.0  # when the checkpointer was last cued
        self._checkpointer: threading.Thread | None = None
        self._ending = False  # the writer's thread is ending: so is the checkpointer's

    @classmethod
    async def open(cls, path: Path, *, interval: float = INTERVAL_S) -> Writer:
        """A writer on its own connection to `path` (already migrated), opened on its own thread."""
        writer = cls(path, interval=interval)
        await writer.begin()
        return writer

    def _is_busy(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and is_busy(error)

    def _connect(self) -> None:
        self.conn = open_sync(self.path)
        self.conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's work (`_checkpoints`)
        self._checkpointer = threading.Thread(target=self._checkpoints, name="p402-store-checkpoint", daemon=True)
        self._checkpointer.start()

    def _disconnect(self) -> None:
        self._ending = True
        self._checkpoint.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        if self.conn is not None:
            self.conn.close()

    def _after(self, batch: Batch, ended: float) -> None:
        if batch.writes and ended - self._checkpointed >= CHECKPOINT_EVERY_S:
            self._checkpointed = ended
            if self._checkpointer is not None and self._checkpointer.is_alive():
                self._checkpoint.set()
            elif self.conn is not None:
                _checkpoint(self.conn)

    def _checkpoints(self) -> None:
        """Copy the WAL into the database file, on a connection and a thread of their own. A passive
        checkpoint waits for no reader nor writer."""
        try:
            conn = open_sync(self.path)
        except StoreError as error:
            log.warning("store checkpointer: %s; the writer checkpoints between its batches", error)
            return
        try:
            while True:
                self._checkpoint.wait()
                self._checkpoint.clear()
                if self._ending:
                    return
                _checkpoint(conn)
        finally:
            conn.close()

    def _transaction(self, writes: list[Write]) -> list[int]:
        conn = self.conn
        assert conn is not None
        cursor = conn.cursor()
        counts: list[Any] = [1] * len(writes)  # a grouped write is fire-and-forget: no one reads its count
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for group in shapes(writes):
                if len(group) > 1:
                    _execute_rows(cursor, [writes[i] for i in group])
                    continue
                write = writes[group[0]]
                done = cursor.execute(write.sql, write.params)
                counts[group[0]] = done.fetchone() if write.returning else done.rowcount
            cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        finally:
            cursor.close()
        return counts


def _execute_rows(cursor: sqlite3.Cursor, writes: list[Write]) -> None:
    """Writes of one statement as a few multi-row statements (`rows`): each statement the writer sends
    lets go of the GIL while SQLite runs it and must take it back after, a wait of up to the switch
    interval (0.2 ms in `p402 serve`) while the loop runs."""
    sql = writes[0].sql
    if multi_row(sql) is None or not all(type(w.params) in (tuple, list) for w in writes):
        cursor.executemany(sql, [w.params for w in writes])
        return
    for statement, params in grouped(sql, [w.params for w in writes]):
        cursor.execute(statement, params)


def _checkpoint(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as error:  # the next cue tries again; the WAL only grows meanwhile
        log.warning("store checkpoint: %s", _first_line(error))
