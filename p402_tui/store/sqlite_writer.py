"""SQLite's writer (`Writer`): a thread of its own that takes the queue, makes the rows, commits them,
and tells the loop once per batch.

The loop only appends to a queue (`put`, `put_later`) and, per batch, runs one callback that answers
`run` callers, calls `done`s and releases `flush`es (one `call_soon_threadsafe`). Everything else
happens on the thread, on its own clock: waiting until the oldest write is due (a `threading.Event`,
which an urgent write cuts short), making the rows, committing. A writer on the loop waited for a
turn at each of those steps, and on a saturated gateway every turn comes after all the ready requests.

Two more things kept a batch late, measured under kill9's load: SQLite's automatic checkpoint, run by
the commit that crosses 1000 pages of WAL (that COMMIT took 15 to 50 ms instead of 0.3), now done by
a second thread on its own connection (`_checkpoints`); and the thread's own wake-up, making and
commit (10 to 20 ms on a busy machine), now taken out of the wait (`_take`).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .db import StoreError, is_busy, open_sync
from .rollups import MARK_REPEAT, mark_repeats
from .writer import _STOP, Batch, BatchWriter, Write, _first_line, log, shapes

RECENT_BATCHES = 20  # the longest cost of these is allowed for: about half a second of batches
CHECKPOINT_EVERY_S = 1.0  # at most this often; about 1000 pages of WAL at 1,000 requests a second


class Writer(BatchWriter):
    """The SQLite file's writer: its own connection, used only from its own thread."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(**options)
        self.path = path
        self.conn: sqlite3.Connection | None = None  # the thread's, opened there
        self._queue: deque[Any] = deque()
        self._ready = threading.Event()  # something was queued since the last take
        self._urgent = threading.Event()  # commit without waiting out the interval
        self._since = 0.0  # when the first write after the last take was queued (time.monotonic)
        self._costs: deque[float] = deque(maxlen=RECENT_BATCHES)  # how long batches took, from due time to commit
        self._checkpoint = threading.Event()  # the WAL has grown: the checkpointer's cue
        self._checkpointed = 0.0  # when the checkpointer was last cued
        self._checkpointer: threading.Thread | None = None
        self._ending = False  # the writer's thread is ending: so is the checkpointer's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ended: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: Path, *, interval: float = 0.025) -> Writer:
        """A writer on its own connection to `path` (already migrated), opened on its own thread."""
        writer = cls(path, interval=interval)
        loop = writer._loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        writer._ended = loop.create_future()
        # A daemon: a store left open must not keep the process from exiting. What it had not committed
        # is then lost as to a kill -9: whole batches, never part of one.
        writer._thread = threading.Thread(target=writer._serve, args=(opened,), name="p402-store-writer", daemon=True)
        writer._thread.start()
        try:
            await asyncio.shield(opened)
        except BaseException:
            writer._closed = True
            writer._enqueue(_STOP, True)
            raise
        return writer

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def _stopped(self) -> None:
        if self._ended is not None:
            await asyncio.shield(self._ended)

    def _is_busy(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and is_busy(error)

    def _enqueue(self, item: Any, urgent: bool) -> None:
        # Called on the loop; deque.append is atomic. The thread clears `_ready` before it takes, so a
        # write queued meanwhile either is taken or sets `_ready` again: none waits for a next one.
        self._queue.append(item)
        if not self._ready.is_set():
            self._since = time.monotonic()
            self._ready.set()
        if (urgent or len(self._queue) >= self.max_batch) and not self._urgent.is_set():
            self._urgent.set()

    # --- on the writer's thread -------------------------------------------------------------

    def _serve(self, opened: asyncio.Future[None]) -> None:
        try:
            self.conn = open_sync(self.path)
            self.conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's work (`_checkpoints`)
        except Exception as error:  # noqa: BLE001 - it is the opener's to raise, on the loop
            self._tell(_fail, opened, error)
            self._tell(_resolve, self._ended)
            return
        self._tell(_resolve, opened)
        self._checkpointer = threading.Thread(target=self._checkpoints, name="p402-store-checkpoint", daemon=True)
        self._checkpointer.start()
        try:
            while self._turn():
                pass
        finally:
            self._ending = True
            self._checkpoint.set()
            self._checkpointer.join()
            self.conn.close()
            self._tell(_resolve, self._ended)

    def _checkpoints(self) -> None:
        """Copy the WAL into the database file, on a connection and a thread of their own. Done by the
        writer's commit (SQLite's default, every 1000 pages), it held that commit for tens of ms, with a
        batch of answered requests not yet written; a passive checkpoint waits for no reader nor writer."""
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

    def _turn(self) -> bool:
        """Take, make and commit one batch; False once told to stop."""
        items, due = self._take()
        if not items:  # woken for a write an earlier take had already taken
            return True
        batch = Batch()
        try:
            for item in items:
                self._add(batch, item)
            self._assembled(batch)
            if batch.writes:
                self._commit(batch.writes)
        except Exception as error:  # noqa: BLE001 - a bug here must not stop the writer, nor leave a caller waiting
            log.exception("store writer: a batch failed")
            for write in batch.writes:
                if write.result is not None and write.outcome is None:
                    write.outcome = StoreError(f"database write failed: {_first_line(error)}")
        finally:
            self._tell(self._settle, batch)
        ended = time.monotonic()
        self._costs.append(ended - due)
        if batch.writes and ended - self._checkpointed >= CHECKPOINT_EVERY_S:
            self._checkpointed = ended
            if self._checkpointer is not None and self._checkpointer.is_alive():
                self._checkpoint.set()
            else:
                _checkpoint(self.conn)
        return not batch.stop

    def _take(self) -> tuple[list[Any], float]:
        """What is queued, once its oldest write is due; and when that was."""
        self._ready.wait()
        # The oldest write waiting decides: it is to be committed `interval` after it was queued, so the
        # batch is taken that long less the longest a recent batch took from its taking to its commit (waking
        # up included: the thread waits for the GIL, the CPU and the disk on a busy machine), or at once if
        # that was longer than interval. An average allowed for the usual batch and let every slow one run
        # past the window: on a loaded machine a tenth of batches took 10 to 50 ms, against 1 ms for most.
        # A row's age at its commit: at most about interval, while batches cost no more than lately.
        due = time.monotonic()
        if self.interval > 0 and not self._urgent.is_set() and len(self._queue) < self.max_batch:
            due = max(due, self._since + self.interval - min(max(self._costs, default=0.0), self.interval))
            self._urgent.wait(due - time.monotonic())
        self._urgent.clear()
        self._ready.clear()
        queue, items = self._queue, []
        while queue and len(items) < self.max_batch:
            items.append(queue.popleft())
        if queue:
            self._ready.set()  # what is left waited a whole batch already: it goes next
        return items, min(due, time.monotonic())

    def _commit(self, writes: list[Write]) -> None:
        try:
            self._commit_retrying(writes)
        except self.errors as error:
            if self._is_busy(error):  # closing, and the database still refuses: these rows are lost
                self._lost(writes, error)
            elif len(writes) == 1:
                self._failed(writes[0], error)
            else:
                # One bad row must not sink the rest: write them one by one, each in its own transaction.
                for write in writes:
                    try:
                        self._commit_retrying([write])
                    except self.errors as single_error:
                        self._failed(write, single_error)

    def _commit_retrying(self, writes: list[Write]) -> None:
        attempt = 0
        while True:
            try:
                counts = self._transaction(writes)
            except self.errors as error:
                attempt += 1
                delay = self._retry_delay(error, attempt)
                if delay is None:
                    raise
                time.sleep(delay)
                continue
            self._committed(writes, counts)
            return

    def _transaction(self, writes: list[Write]) -> list[int]:
        """One batch: all of it committed, or none."""
        conn = self.conn
        assert conn is not None
        cursor = conn.cursor()
        counts = [1] * len(writes)  # a grouped write is fire-and-forget: no one reads its count
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for group in shapes(writes):
                if len(group) == 1:
                    counts[group[0]] = cursor.execute(writes[group[0]].sql, writes[group[0]].params).rowcount
                else:
                    _execute_rows(cursor, [writes[i] for i in group])
            cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        finally:
            cursor.close()
        return counts

    def _tell(self, callback: Callable[..., None], *args: Any) -> None:
        """Have the loop run `callback(*args)`: the thread's only way to reach it."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: no one is left to tell
            pass


def _execute_rows(cursor: sqlite3.Cursor, writes: list[Write]) -> None:
    """Writes of one statement as a few multi-row statements: VALUES (...), (...), ... Each statement
    the writer sends lets go of the GIL while SQLite runs it and must take it back after, a wait of up
    to the switch interval (5 ms) while the loop runs: a batch of a hundred requests was 400 statements
    one by one, and is a dozen so."""
    sql, width = writes[0].sql, len(writes[0].params)
    multi = _multi_row(sql) is not None and all(type(w.params) in (tuple, list) for w in writes)
    if not multi:
        cursor.executemany(sql, [w.params for w in writes])
        return
    most = max(1, min(MAX_ROWS, MAX_VARIABLES // max(width, 1)))
    at = 0
    while at < len(writes):
        # Sizes in powers of two: a handful of statements per table for SQLite's statement cache.
        rows = 1 << (min(len(writes) - at, most).bit_length() - 1)
        params = [value for write in writes[at:at + rows] for value in write.params]
        cursor.execute(_multi_row(sql, rows), params)
        at += rows


MAX_ROWS = 128  # rows in one multi-row statement
MAX_VARIABLES = 32766  # SQLite's own limit on a statement's parameters (since 3.32)


@functools.lru_cache(maxsize=256)
def _multi_row(sql: str, rows: int = 0) -> str | None:
    """`sql` (an INSERT of one VALUES row of bare `?`s, or MARK_REPEAT) for `rows` rows; None for any
    other statement. `rows` 0 only asks whether there is a form for it."""
    if sql == MARK_REPEAT:
        return mark_repeats(rows) if rows else sql
    start = sql.find(" VALUES (")
    if start == -1 or not sql.lstrip().upper().startswith("INSERT"):
        return None
    end = sql.find(")", start)
    values = sql[start + 8:end + 1]
    if end == -1 or values.strip("(?, )"):
        return None
    return f"{sql[:start + 8]}{', '.join([values] * rows)}{sql[end + 1:]}" if rows else sql


def _checkpoint(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as error:  # the next cue tries again; the WAL only grows meanwhile
        log.warning("store checkpoint: %s", _first_line(error))


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
