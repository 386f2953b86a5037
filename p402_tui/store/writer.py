"""The one writer of a store's database: `BatchWriter`'s interface, `LoopWriter` for PostgreSQL's async
driver (`postgres.PgWriter`); SQLite's is `sqlite_writer.Writer`, a thread of its own.

Requests never wait for the database: hooks `put` a statement (or `put_later` a function that makes
rows) on a queue and return. The writer takes what arrived within about `interval` (25 ms by
default, at most 100 ms by design) of the oldest write waiting, makes the rows and commits them as
one transaction, so a process killed mid-burst leaves either a whole batch or none of it.

What a `kill -9` can lose (the batch window) is what was answered within the last `interval` or so:
SQLite's writer aims to commit each row `interval` after it was queued, taking a batch early by what
making and committing the slowest recent batch took (`sqlite_writer`). The window holds only while the writer's
steps never wait for the event loop's turns: on a saturated loop each turn comes after every ready
request, and a writer on the loop (a timer, rows made on the loop, a hop to its thread and one back)
fell 67 to 243 ms behind (bench/soak.py kill9). PostgreSQL's writer is still a task on the loop
(`LoopWriter`): its window is interval plus a commit, more on a saturated loop. `urgent` writes (the
gateway's strict durability) are committed without waiting for the window.

A batch is never dropped because another process holds the database (or its server is away): it is
retried with a backoff capped at `MAX_BACKOFF_S` for as long as the lock lasts. Meanwhile the
queue grows; past `max_pending` the writer is `saturated` and the gateway refuses new requests
(503) instead of queueing rows it cannot write. A row that fails alone is dropped and logged; its
batch is then written one row per transaction, so it sinks nothing else. `flush()` waits until
everything put before it is committed; `aclose()` flushes and stops, giving up on a batch the
database still refuses after `CLOSE_GRACE_S`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .db import ConstraintError, StoreError
from .rollups import AFTER_INSERTS, coalesce

log = logging.getLogger("p402.store")

Params = Sequence[Any] | dict[str, Any]


@dataclass(slots=True)
class Write:
    sql: str
    params: Params = ()
    done: Callable[[], None] | None = None  # called on the loop after the batch ends, committed or not
    result: asyncio.Future[int] | None = None  # set for writes a caller awaits (`run`)
    outcome: int | BaseException | None = None  # for `result`: the rows changed, or why it failed


@dataclass(slots=True)
class _Later:
    """Writes made when their batch is assembled, by `make()`: [(sql, params), ...]."""

    make: Callable[[], Iterable[tuple[str, Params]]]
    done: Callable[[], None] | None = None


@dataclass(slots=True)
class _Flush:
    future: asyncio.Future[None]


@dataclass(slots=True)
class Batch:
    """What one turn of the writer took, and what to tell the loop once it is committed."""

    writes: list[Write] = field(default_factory=list)
    dones: list[Callable[[], None]] = field(default_factory=list)  # makers that made no rows
    flushes: list[asyncio.Future[None]] = field(default_factory=list)
    stop: bool = False


_STOP = object()
MAKE_SLICE_S = 0.0003  # a loop writer makes rows on the loop; at most this long before requests get a turn
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
    """Batches writes into transactions. A subclass supplies where the queue lives and who drains it
    (`_enqueue`, `pending`, `_alive`, `_stopped`), and which of its engine's errors mean "try again
    later" (`_is_busy`) rather than "this row is bad"."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)  # what a bad row or a busy database raises

    def __init__(
        self, *, interval: float = 0.025, max_batch: int = 2000, max_pending: int = MAX_PENDING
    ) -> None:
        _check_interval(interval)
        self.interval = interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.stats = WriterStats()
        self._closed = False
        self._give_up_at: float | None = None  # set by aclose

    # --- what a subclass supplies --------------------------------------------------------

    def _enqueue(self, item: Any, urgent: bool) -> None:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Writes (and makers of rows) queued and not yet taken."""
        raise NotImplementedError

    def _alive(self) -> bool:
        raise NotImplementedError

    async def _stopped(self) -> None:
        """Wait until the writer has taken `_STOP` and committed what was queued before it."""
        raise NotImplementedError

    def _is_busy(self, error: BaseException) -> bool:
        """The batch could not be committed now but may be later: it is retried, never dropped."""
        raise NotImplementedError

    def _is_constraint(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError)

    async def _close(self) -> None:
        """Release the engine's connection."""

    def start(self) -> None:
        """Begin taking writes (a writer whose thread runs from its opening has nothing to do)."""

    # --- the interface -------------------------------------------------------------------

    @property
    def saturated(self) -> bool:
        """More is queued than the database has kept up with: new work should wait or be refused."""
        return self.pending >= self.max_pending

    def put(self, sql: str, params: Params = (), *, done: Callable[[], None] | None = None) -> None:
        """Queue a write and return at once. A bad row is logged and dropped, never raised here."""
        self._check_open()
        self._enqueue(Write(sql, params, done), False)

    def put_later(
        self, make: Callable[[], Iterable[tuple[str, Params]]], *, done: Callable[[], None] | None = None,
        urgent: bool = False,
    ) -> None:
        """Queue writes whose rows `make()` builds when their batch is assembled, after the request
        that recorded them has been answered, perhaps on another thread: `make` reads only what no
        one changes. `done` is called on the loop once they are committed (or dropped).
        `urgent`: commit as soon as the writer is free, without waiting for `interval`."""
        self._check_open()
        self._enqueue(_Later(make, done), urgent)

    async def run(self, sql: str, params: Params = ()) -> int:
        """Write now and wait for the commit; errors reach the caller. Returns the rows changed."""
        self._check_open()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(Write(sql, params, result=future), True)
        return await future

    async def flush(self) -> None:
        """Wait until every write put before this call is committed."""
        if not self._alive():
            return
        if self._closed:  # closing commits everything already queued
            await self._stopped()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Flush(future), True)
        await future

    async def aclose(self) -> None:
        """Commit what is queued, then stop and close the connection. Later `put`s raise."""
        if self._closed:
            return
        self._closed = True
        self._give_up_at = time.monotonic() + CLOSE_GRACE_S
        try:
            if self._alive():
                self._enqueue(_STOP, True)
                await self._stopped()
        finally:
            await self._close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")
        if not self._alive():
            raise StoreError("the store writer was not started")

    # --- a batch, wherever it is assembled -------------------------------------------------

    def _assemble(self, items: list[Any]) -> Batch:
        """Make the rows of what was taken, in order, and merge the rollup upserts."""
        batch = Batch()
        for item in items:
            self._add(batch, item)
        return self._assembled(batch)

    def _add(self, batch: Batch, item: Any) -> None:
        if isinstance(item, Write):
            batch.writes.append(item)
        elif isinstance(item, _Later):
            batch.writes += self._made(item, batch.dones)
        elif isinstance(item, _Flush):
            batch.flushes.append(item.future)
        elif item is _STOP:
            batch.stop = True

    def _assembled(self, batch: Batch) -> Batch:
        batch.writes = coalesce(batch.writes)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch.writes))
        return batch

    def _made(self, later: _Later, dones: list[Callable[[], None]]) -> list[Write]:
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
                dones.append(later.done)
        return writes

    def _committed(self, writes: list[Write], counts: list[int]) -> None:
        self.stats.batches += 1
        self.stats.written += len(writes)
        for write, count in zip(writes, counts):
            write.outcome = count

    def _retry_delay(self, error: BaseException, attempt: int) -> float | None:
        """How long to wait before trying a batch again, or None: raise the error."""
        # Another process holds the lock, or the server is away: wait and try the batch again, for as
        # long as it takes. Dropping it would lose answered requests from the ledger.
        if not self._is_busy(error) or (self._give_up_at is not None and time.monotonic() > self._give_up_at):
            return None
        self.stats.retries += 1
        if attempt % 10 == 1:
            log.warning("store writer: %s; %d writes wait (try %d)", _first_line(error), self.pending, attempt)
        return min(MAX_BACKOFF_S, 0.05 * attempt)

    def _lost(self, writes: list[Write], error: BaseException) -> None:
        self.stats.failed += len(writes)
        message = f"{len(writes)} writes lost at close: {_first_line(error)}"
        self.stats.errors.append(message)
        log.error("store writer: %s", message)
        for write in writes:
            if write.result is not None:
                write.outcome = StoreError(f"database write failed: {_first_line(error)}")

    def _failed(self, write: Write, error: BaseException) -> None:
        self.stats.failed += 1
        if write.result is not None:
            kind = ConstraintError if self._is_constraint(error) else StoreError
            failure = kind(f"database write failed: {_first_line(error)}")
            failure.__cause__ = error  # a caller may tell a broken constraint from a broken disk
            write.outcome = failure
            return
        message = f"{type(error).__name__}: {_first_line(error)} in {write.sql.split('(')[0].strip()}"
        self.stats.errors.append(message)
        log.error("store writer dropped a row: %s", message)

    @staticmethod
    def _settle(batch: Batch) -> None:
        """On the loop, once the batch has ended: answer `run` callers, call `done`s, release `flush`es."""
        for write in batch.writes:
            future = write.result
            if future is not None and not future.done():
                if isinstance(write.outcome, BaseException):
                    future.set_exception(write.outcome)
                else:
                    future.set_result(write.outcome if write.outcome is not None else 0)
            if write.done is not None:
                _call(write.done)
        for done in batch.dones:
            _call(done)
        for future in batch.flushes:
            if not future.done():
                future.set_result(None)


class LoopWriter(BatchWriter):
    """A writer task on the event loop, for an engine whose driver is async (`_transact`)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _transact(self, writes: list[Write]) -> list[int]:
        """Commit `writes` as one transaction; the rows each changed."""
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="p402-store-writer")

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _stopped(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def _enqueue(self, item: Any, urgent: bool) -> None:
        self._queue.put_nowait(item)
        if urgent or self._queue.qsize() >= self.max_batch:
            self._urgent.set()

    async def _run(self) -> None:
        while True:
            # Writes that queued while the last batch was committed have waited a commit already:
            # they go at once, so that a row's age at its commit stays within interval + one commit.
            waited = not self._queue.empty()
            first = await self._queue.get()
            if not (waited or self._urgent.is_set()) and self.interval > 0 and self._queue.qsize() < self.max_batch - 1:
                try:
                    await asyncio.wait_for(self._urgent.wait(), self.interval)
                except TimeoutError:
                    pass
            self._urgent.clear()
            items = [first]
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            batch = Batch()
            began = assembling = time.perf_counter()
            for item in items:
                self._add(batch, item)
                now = time.perf_counter()
                # Let waiting requests through (a batch's rows are milliseconds of work), but only while
                # the batch is young: on a saturated loop every turn waits behind all the requests, and a
                # writer that kept yielding fell seconds behind, all of it lost to a kill -9.
                if now - began > MAKE_SLICE_S and now - assembling < self.interval:
                    await asyncio.sleep(0)
                    began = time.perf_counter()
            self._assembled(batch)
            try:
                if batch.writes:
                    await self._commit(batch.writes)
            finally:
                self._settle(batch)
            if batch.stop:
                return

    async def _commit(self, writes: list[Write]) -> None:
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

    async def _commit_retrying(self, writes: list[Write]) -> None:
        attempt = 0
        while True:
            try:
                counts = await self._transact(writes)
            except self.errors as error:
                attempt += 1
                delay = self._retry_delay(error, attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                continue
            self._committed(writes, counts)
            return


def shapes(writes: list[Write]) -> list[list[int]]:
    """A batch in groups to send, each group one statement's writes: fire-and-forget inserts gathered by
    statement (their order among themselves does not matter), then the `AFTER_INSERTS` statements among
    them, gathered likewise; any other statement, or one a caller awaits, stays where it was and goes
    alone. Sent one by one, a batch's statements cost a round trip each: PostgreSQL's on the gateway's
    loop, SQLite's a release and a retaking of the GIL (`sqlite_writer`)."""
    groups: list[list[int]] = []
    inserts: dict[str, list[int]] = {}
    after: dict[str, list[int]] = {}
    for i, write in enumerate(writes):
        if write.result is None:
            if write.sql.lstrip()[:6].upper() == "INSERT":
                inserts.setdefault(write.sql, []).append(i)
                continue
            if write.sql in AFTER_INSERTS:
                after.setdefault(write.sql, []).append(i)
                continue
        groups += [*inserts.values(), *after.values()]
        inserts, after = {}, {}
        groups.append([i])
    groups += [*inserts.values(), *after.values()]
    return groups


def _call(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # a callback's bug must not stop the writer
        log.exception("store writer: done-callback failed")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_interval(interval: float) -> None:
    if not 0 <= interval <= 0.1:
        raise ValueError("the writer flushes at least every 100 ms: interval must be within [0, 0.1]")
