"""SQLite's writer (`Writer`): `writer.BatchWriter`'s thread on a connection of its own to the file.

SQLite's automatic checkpoint, run by the commit that crosses 1000 pages of WAL, held that commit for
15 to 50 ms instead of 0.3 (measured under kill9's load), with a batch of answered requests not yet
written: a second thread does it instead, on its own connection (`_checkpoints`).

The WAL starts again from its beginning only when a write transaction begins with every frame of it
copied, and under steady writes the writer always commits more while the checkpointer copies: the WAL
grew by 33 kB a request for good (650 MB after 20,000 cached requests), and each connection's mapping
of its index (32 kB per 4,096 frames) with it. So once a checkpoint has copied a long WAL whole, the
checkpointer copies what was committed meanwhile (a batch or two) with the writer's commits held off,
and the writer's next transaction starts the WAL over. That holds a commit up to the time of two fsyncs
(up to 60 ms on a loaded machine, 10 to 30 usually), hence only once per `WAL_RESTART_FRAMES` written;
should a reader keep the WAL from starting over, the next try is as many frames later.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..core import gil
from .db import StoreError, is_busy, open_sync
from .rows import groupable, grouped
from .writer import INTERVAL_S, Batch, BatchWriter, Write, _first_line, log, shapes

CHECKPOINT_EVERY_S = 1.0  # at most this often; about 1000 pages of WAL at 1,000 requests a second
WAL_RESTART_FRAMES = 16_384  # 64 MB of 4 kB pages: a WAL this long is started over once copied


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
        self._committing = threading.Lock()  # held by each commit, and by the checkpointer's last copy
        self.restart_frames = WAL_RESTART_FRAMES

    @classmethod
    async def open(cls, path: Path, *, interval: float = INTERVAL_S, realtime: bool = False) -> Writer:
        """A writer on its own connection to `path` (already migrated), opened on its own thread."""
        writer = cls(path, interval=interval, realtime=realtime)
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
        gil.named()
        try:
            conn = open_sync(self.path)
        except StoreError as error:
            log.warning("store checkpointer: %s; the writer checkpoints between its batches", error)
            return
        tried = last = 0  # the WAL's length when it was last to start over, and at the last checkpoint
        try:
            while True:
                self._checkpoint.wait()
                self._checkpoint.clear()
                if self._ending:
                    return
                done = _checkpoint(conn)
                if done is None:
                    continue
                _, frames, copied = done
                if frames < last:  # it has started over
                    tried = 0
                last = frames
                if frames == copied >= tried + self.restart_frames:
                    with self._committing:
                        _checkpoint(conn)
                    tried = frames
        finally:
            conn.close()

    def _transaction(self, writes: list[Write]) -> list[int]:
        conn = self.conn
        assert conn is not None
        cursor = conn.cursor()
        counts: list[Any] = [1] * len(writes)  # a grouped write is fire-and-forget: no one reads its count
        with self._committing:
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
    rows = [w.params for w in writes]
    if not groupable(sql, rows):
        cursor.executemany(sql, rows)
        return
    for statement, params in grouped(sql, rows):
        cursor.execute(statement, params)


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int] | None:
    """A passive checkpoint's (busy, frames in the WAL, frames copied); None if it failed."""
    try:
        return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error as error:  # the next cue tries again; the WAL only grows meanwhile
        log.warning("store checkpoint: %s", _first_line(error))
        return None
