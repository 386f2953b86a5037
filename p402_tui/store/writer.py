"""The one task that writes to the database (`BatchWriter`; `Writer` is SQLite's, `postgres.PgWriter` PostgreSQL's).

Requests never wait for the database: hooks `put` a statement on a queue and return.
The writer gathers what arrived within `interval` (25 ms by default, at most 100 ms
by design; writes that queued during the previous commit go at once) and commits it
as one transaction, so a process killed mid-burst leaves
either a whole batch or none of it. What a `kill -9` can lose is what was answered
within that window plus one commit; `urgent` writes (the gateway's strict durability)
are committed without waiting for the window.

A batch is never dropped because another process holds the database (or its server is away): it is retried
with a backoff capped at `MAX_BACKOFF_S` for as long as the lock lasts. Meanwhile the
queue grows; past `max_pending` the writer is `saturated` and the gateway refuses new
requests (503) instead of queueing rows it cannot write. A batch crosses to the writer's own thread once, as a
whole: a hop per statement (aiosqlite's way) cost the gateway a quarter of its CPU.
`flush()` waits until everything put before it is committed; `aclose()` flushes
and stops, giving up on a batch the database still refuses after `CLOSE_GRACE_S`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .db import ConstraintError, StoreError, is_busy, open_sync
from .rollups import coalesce

log = logging.getLogger("p402.store")

Params = Sequence[Any] | dict[str, Any]


@dataclass(slots=True)
class Write:
    sql: str
    params: Params = ()
    done: Callable[[], None] | None = None  # called after the batch ends, committed or not
    result: asyncio.Future[int] | None = None  # set for writes a caller awaits (`run`)


@dataclass(slots=True)
class _Later:
    """Writes made when their batch is assembled, by `make()`: [(sql, params), ...]."""

    make: Callable[[], Iterable[tuple[str, Params]]]
    done: Callable[[], None] | None = None


@dataclass(slots=True)
class _Flush:
    future: asyncio.Future[None]


_STOP = object()
MAKE_SLICE_S = 0.0003  # rows are made on the loop; at most this long before requests get a turn
MAX_BACKOFF_S = 1.0  # between tries of a batch while the database is locked
CLOSE_GRACE_S = 5.0  # closing, a batch the database still refuses is given up after this: shutdown is bounded
MAX_PENDING = 50_000  # queued writes past which new requests are refused (about 15k requests' rows)


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    written: int = 0
    failed: int = 0
    retries: int = 0
    largest_batch: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "written": self.written,
            "failed": self.failed,
            "retries": self.retries,
            "largest_batch": self.largest_batch,
            "last_errors": self.errors[-5:],
        }


class BatchWriter:
    """Batches writes into transactions; an engine supplies how a batch is committed (`_transact`)
    and which of its errors mean "try again later" (`_is_busy`) rather than "this row is bad"."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)  # what a bad row or a busy database raises

    def __init__(
        self, *, interval: float = 0.025, max_batch: int = 2000, max_pending: int = MAX_PENDING
    ) -> None:
        _check_interval(interval)
        self.interval = interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.stats = WriterStats()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._give_up_at: float | None = None  # set by aclose

    async def _transact(self, writes: list[Write]) -> list[int]:
        """Commit `writes` as one transaction; the rows each changed."""
        raise NotImplementedError

    def _is_busy(self, error: BaseException) -> bool:
        """The batch could not be committed now but may be later: it is retried, never dropped."""
        raise NotImplementedError

    def _is_constraint(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError)

    async def _close(self) -> None:
        """Release the engine's connection."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="p402-store-writer")

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def saturated(self) -> bool:
        """More is queued than the database has kept up with: new work should wait or be refused."""
        return self._queue.qsize() >= self.max_pending

    def put(self, sql: str, params: Params = (), *, done: Callable[[], None] | None = None) -> None:
        """Queue a write and return at once. A bad row is logged and dropped, never raised here."""
        self._check_open()
        self._queue.put_nowait(Write(sql, params, done))
        if self._queue.qsize() >= self.max_batch:
            self._urgent.set()

    def put_later(
        self, make: Callable[[], Iterable[tuple[str, Params]]], *, done: Callable[[], None] | None = None,
        urgent: bool = False,
    ) -> None:
        """Queue writes whose rows `make()` builds when their batch is assembled, after the request
        that recorded them has been answered. `done` is called once they are committed (or dropped).
        `urgent`: commit as soon as the writer is free, without waiting for `interval`."""
        self._check_open()
        self._queue.put_nowait(_Later(make, done))
        if urgent or self._queue.qsize() >= self.max_batch:
            self._urgent.set()

    async def run(self, sql: str, params: Params = ()) -> int:
        """Write now and wait for the commit; errors reach the caller. Returns the rows changed."""
        self._check_open()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Write(sql, params, result=future))
        self._urgent.set()
        return await future

    async def flush(self) -> None:
        """Wait until every write put before this call is committed."""
        if self._task is None or self._task.done():
            return
        if self._closed:  # closing commits everything already queued
            await asyncio.shield(self._task)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Flush(future))
        self._urgent.set()
        await future

    async def aclose(self) -> None:
        """Commit what is queued, then stop and close the connection. Later `put`s raise."""
        if self._closed:
            return
        self._closed = True
        self._give_up_at = time.monotonic() + CLOSE_GRACE_S
        try:
            if self._task is not None:
                self._queue.put_nowait(_STOP)
                self._urgent.set()
                await self._task
        finally:
            await self._close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")
        if self._task is None:
            raise StoreError("the store writer was not started")

    async def _run(self) -> None:
        while True:
            # Writes that queued while the last batch was committed have waited a commit already:
            # they go at once, so that a row's age at its commit stays within interval + one commit.
            waited = not self._queue.empty()
            first = await self._queue.get()
            if not (waited or self._urgent.is_set()) and self.interval > 0 and self._queue.qsize() < self.max_batch - 1:
                try:
                    await asyncio.wait_for(self._urgent.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
            self._urgent.clear()
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            writes: list[Write] = []
            began = assembling = time.perf_counter()
            for item in batch:
                if isinstance(item, Write):
                    writes.append(item)
                elif isinstance(item, _Later):
                    writes += self._made(item)
                    now = time.perf_counter()
                    # Let waiting requests through (a batch's rows are milliseconds of work), but only while
                    # the batch is young: on a saturated loop every turn waits behind all the requests, and a
                    # writer that kept yielding fell seconds behind, all of it lost to a kill -9.
                    if now - began > MAKE_SLICE_S and now - assembling < self.interval:
                        await asyncio.sleep(0)
                        began = time.perf_counter()
            if writes:
                await self._commit(coalesce(writes))
            for item in batch:
                if isinstance(item, _Flush) and not item.future.done():
                    item.future.set_result(None)
            if any(item is _STOP for item in batch):
                return

    async def _commit(self, writes: list[Write]) -> None:
        self.stats.largest_batch = max(self.stats.largest_batch, len(writes))
        try:
            await self._commit_retrying(writes)
        except self.errors as error:
            if self._is_busy(error):  # closing, and the database still refuses: these rows are lost
                self._lost(writes, error)
            elif len(writes) == 1:
                self._failed(writes[0], error)
            else:
                # One bad row must not sink the rest: write them one by one, each in its own transaction.
                for write in writes:
                    try:
                        await self._commit_retrying([write])
                    except self.errors as single_error:
                        self._failed(write, single_error)
        finally:
            for write in writes:
                if write.done is not None:
                    try:
                        write.done()
                    except Exception:  # a callback's bug must not stop the writer
                        log.exception("store writer: done-callback failed")

    async def _commit_retrying(self, writes: list[Write]) -> None:
        attempt = 0
        while True:
            try:
                counts = await self._transact(writes)
            except self.errors as error:
                # Another process holds the lock, or the server is away: wait and try the batch again,
                # for as long as it takes. Dropping it would lose answered requests from the ledger.
                if not self._is_busy(error) or (self._give_up_at is not None and time.monotonic() > self._give_up_at):
                    raise
                attempt += 1
                self.stats.retries += 1
                if attempt % 10 == 1:
                    log.warning("store writer: %s; %d writes wait (try %d)", _first_line(error), self.pending, attempt)
                await asyncio.sleep(min(MAX_BACKOFF_S, 0.05 * attempt))
                continue
            self.stats.batches += 1
            self.stats.written += len(writes)
            for write, count in zip(writes, counts):
                if write.result is not None and not write.result.done():
                    write.result.set_result(count)
            return

    def _made(self, later: _Later) -> list[Write]:
        try:
            writes = [Write(sql, params) for sql, params in later.make()]
        except Exception as error:  # a bug in a row builder loses its rows, never the batch
            self.stats.failed += 1
            self.stats.errors.append(f"{type(error).__name__}: {error} while making rows")
            log.exception("store writer: could not make rows")
            writes = []
        if later.done is not None:
            if writes:
                writes[-1].done = later.done
            else:
                later.done()
        return writes

    def _lost(self, writes: list[Write], error: BaseException) -> None:
        self.stats.failed += len(writes)
        message = f"{len(writes)} writes lost at close: {_first_line(error)}"
        self.stats.errors.append(message)
        log.error("store writer: %s", message)
        for write in writes:
            if write.result is not None and not write.result.done():
                write.result.set_exception(StoreError(f"database write failed: {_first_line(error)}"))

    def _failed(self, write: Write, error: BaseException) -> None:
        self.stats.failed += 1
        if write.result is not None and not write.result.done():
            kind = ConstraintError if self._is_constraint(error) else StoreError
            failure = kind(f"database write failed: {_first_line(error)}")
            failure.__cause__ = error  # a caller may tell a broken constraint from a broken disk
            write.result.set_exception(failure)
            return
        message = f"{type(error).__name__}: {_first_line(error)} in {write.sql.split('(')[0].strip()}"
        self.stats.errors.append(message)
        log.error("store writer dropped a row: %s", message)


class Writer(BatchWriter):
    """The SQLite file's writer: its own connection, used only from its own thread."""

    def __init__(self, conn: sqlite3.Connection, thread: ThreadPoolExecutor, **options: Any) -> None:
        super().__init__(**options)
        self.conn = conn
        self.thread = thread

    @classmethod
    async def open(cls, path: Path, *, interval: float = 0.025) -> Writer:
        """A writer on its own connection to `path` (already migrated), opened on its own thread."""
        _check_interval(interval)  # before a thread and a connection exist to be leaked
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p402-store-writer")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(thread, open_sync, path)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(conn, thread, interval=interval)

    async def _transact(self, writes: list[Write]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.thread, self._transaction, writes)

    def _is_busy(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and is_busy(error)

    async def _close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.thread, self.conn.close)
        self.thread.shutdown(wait=False)

    def _transaction(self, writes: list[Write]) -> list[int]:
        """One batch, on the writer's thread: all of it committed, or none."""
        conn = self.conn
        cursor = conn.cursor()
        counts: list[int] = []
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for write in writes:
                counts.append(cursor.execute(write.sql, write.params).rowcount)
            cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        finally:
            cursor.close()
        return counts


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_interval(interval: float) -> None:
    if not 0 <= interval <= 0.1:
        raise ValueError("the writer flushes at least every 100 ms: interval must be within [0, 0.1]")
