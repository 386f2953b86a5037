"""The one writer of a store's database (`BatchWriter`): a thread of its own that takes the queue, makes
the rows and commits them, for either engine (`sqlite_writer.Writer`, `postgres.PgWriter`, which supply
the connection and the transaction).

Requests never wait for the database: hooks `put` a statement (or `put_later` a function that makes
rows) on a queue and return. The writer takes what arrived within about `interval` (25 ms by
default, at most 100 ms by design) of the oldest write waiting, makes the rows and commits them as
one transaction, so a process killed mid-burst leaves either a whole batch or none of it.

The loop only appends to a queue and, per batch, runs one callback that answers `run` callers, calls
`done`s and releases `flush`es (one `call_soon_threadsafe`). Everything else happens on the thread, on
its own clock: waiting until the oldest write is due (a `threading.Event`, which an urgent write cuts
short), making the rows, committing. A writer on the loop waited for a turn at each of those steps, and
on a saturated gateway every turn comes after all the ready requests: it fell 67 to 243 ms behind
(bench/soak.py kill9). On PostgreSQL it also committed whenever rows had queued during its last
commit, which at concurrency 1 was always: a transaction every third request, its driver's work on
the loop between requests (0.3 ms of the loop's CPU a request).

What a `kill -9` can lose (the batch window) is what was answered within the last `interval` or so:
the writer aims to commit each row `interval` after it was queued, taking a batch early by the longest
that making and committing one of the recent batches took (`_take`). `urgent` writes (the gateway's strict
durability, and `run`) are committed without waiting for the window. The runtime's writer runs as a
real-time thread where Linux allows it (`gil.promptly`): on saturated cores, waiting for a core after
each wait for the GIL had stretched batches to over 100 ms. Behind (rows left after a full take, or a
take of half of one), it drains them as any thread.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core import gil
from .db import ConstraintError, StoreError
from .rollups import AFTER_INSERTS, coalesce

log = logging.getLogger("p402.store")

Params = Sequence[Any] | dict[str, Any]


@dataclass(slots=True)
class Write:
    sql: str
    params: Params = ()
    done: Callable[[], None] | None = None  # called on the loop after the batch ends, committed or not
    result: asyncio.Future[Any] | None = None  # set for writes a caller awaits (`run`, `run_returning`)
    outcome: Any = None  # for `result`: the rows changed (or the row returned), or why it failed
    returning: bool = False  # the caller wants the statement's first row (RETURNING), not a count


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
INTERVAL_S = 0.025  # how long a batch waits for more rows (15 ms was tried: 5 of 16 kill -9 windows over 50 ms, against 1 of 16)
MAX_BACKOFF_S = 1.0  # between tries of a batch while the database is locked
RECENT_BATCHES = 20  # the longest cost of these is allowed for: about half a second of batches
CLOSE_GRACE_S = 5.0  # closing, a batch the database still refuses is given up after this: shutdown is bounded
MAX_PENDING = 50_000  # queued writes past which new requests are refused (about 15k requests' rows)


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    written: int = 0
    failed: int = 0
    retries: int = 0
    largest_batch: int = 0
    realtime: bool = False  # the thread was made real-time (`gil.promptly`); it drains a backlog as any thread
    realtime_refused: str | None = None  # why it is not, when it asked
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "written": self.written,
            "failed": self.failed,
            "retries": self.retries,
            "largest_batch": self.largest_batch,
            "realtime": self.realtime,
            "realtime_refused": self.realtime_refused,
            "last_errors": self.errors[-5:],
        }


class BatchWriter:
    """Batches writes into transactions, on a thread of its own. An engine's subclass supplies the
    connection (`_connect`, `_disconnect`, both called on the thread), the transaction (`_transaction`),
    and which of its errors mean "try again later" (`_is_busy`) rather than "this row is bad"."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)  # what a bad row or a busy database raises

    def __init__(
        self, *, interval: float = INTERVAL_S, max_batch: int = 2000, max_pending: int = MAX_PENDING,
        realtime: bool = False,
    ) -> None:
        _check_interval(interval)
        self.interval = interval
        self.realtime = realtime  # ask for real-time scheduling (`gil.promptly`): the runtime's writer does
        self._lagging = False  # a real-time writer draining a backlog, as any thread meanwhile
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.stats = WriterStats()
        self._closed = False
        self._give_up_at: float | None = None  # set by aclose
        self._queue: deque[Any] = deque()
        self._ready = threading.Event()  # something was queued since the last take
        self._urgent = threading.Event()  # commit without waiting out the interval
        self._since = 0.0  # when the first write after the last take was queued (time.monotonic)
        self._costs: deque[float] = deque(maxlen=RECENT_BATCHES)  # how long batches took, from due time to commit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ended: asyncio.Future[None] | None = None

    # --- what an engine supplies ---------------------------------------------------------

    def _connect(self) -> None:
        """Open the writer's connection (on its thread); an error here is `begin`'s to raise."""
        raise NotImplementedError

    def _disconnect(self) -> None:
        """Close it (on its thread, as it ends)."""

    def _transaction(self, writes: list[Write]) -> list[int]:
        """Commit `writes` as one transaction, all of it or none; the rows each changed (for a `returning`
        write, its first row as a tuple, or None)."""
        raise NotImplementedError

    def _is_busy(self, error: BaseException) -> bool:
        """The batch could not be committed now but may be later: it is retried, never dropped."""
        raise NotImplementedError

    def _is_constraint(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError)

    def _after(self, batch: Batch, ended: float) -> None:
        """On the thread, after each batch: an engine's upkeep between batches."""

    # --- the interface -------------------------------------------------------------------

    async def begin(self) -> None:
        """Open the connection on the writer's own thread and start taking writes."""
        loop = self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._ended = loop.create_future()
        # A daemon: a store left open must not keep the process from exiting. What it had not committed
        # is then lost as to a kill -9: whole batches, never part of one.
        self._thread = threading.Thread(target=self._serve, args=(opened,), name="p402-store-writer", daemon=True)
        self._thread.start()
        try:
            await asyncio.shield(opened)
        except BaseException:
            self._closed = True
            self._enqueue(_STOP, True)
            raise

    @property
    def pending(self) -> int:
        """Writes (and makers of rows) queued and not yet taken."""
        return len(self._queue)

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
        """Queue writes whose rows `make()` builds when their batch is assembled, on the writer's thread,
        after the request that recorded them has been answered: `make` reads only what no one changes.
        `done` is called on the loop once they are committed (or dropped).
        `urgent`: commit as soon as the writer is free, without waiting for `interval`."""
        self._check_open()
        self._enqueue(_Later(make, done), urgent)

    async def run(self, sql: str, params: Params = ()) -> int:
        """Write now and wait for the commit; errors reach the caller. Returns the rows changed."""
        self._check_open()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(Write(sql, params, result=future), True)
        return await future

    async def run_returning(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        """As `run`, for a statement with a RETURNING clause: its first row, None when it returned none."""
        self._check_open()
        future: asyncio.Future[tuple[Any, ...] | None] = asyncio.get_running_loop().create_future()
        self._enqueue(Write(sql, params, result=future, returning=True), True)
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
        if self._alive():
            self._enqueue(_STOP, True)
            await self._stopped()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")
        if not self._alive():
            raise StoreError("the store writer was not started")

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def _stopped(self) -> None:
        if self._ended is not None:
            await asyncio.shield(self._ended)

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
        gil.named()
        try:
            self._connect()
        except Exception as error:  # noqa: BLE001 - it is the opener's to raise, on the loop
            self._tell(_fail, opened, error)
            self._tell(_resolve, self._ended)
            return
        if self.realtime:
            refused = gil.promptly()
            self.stats.realtime, self.stats.realtime_refused = refused is None, refused
            if refused:
                log.info("store writer: runs as any thread, not real-time: %s; on saturated cores a kill -9 may then "
                         "lose more than the last 25 ms or so of answered requests", refused)
        self._tell(_resolve, opened)
        try:
            while self._turn():
                pass
        finally:
            try:
                self._disconnect()
            finally:
                self._tell(_resolve, self._ended)

    def _turn(self) -> bool:
        """Take, make and commit one batch; False once told to stop."""
        items, due = self._take()
        if not items:  # woken for a write an earlier take had already taken
            return True
        if self.stats.realtime:
            self._keep_pace(bool(self._queue) or len(items) >= self.max_batch // 2)
        batch = Batch()
        try:
            with gil.writing():
                for item in items:
                    self._add(batch, item)
                self._assembled(batch)
                if batch.writes:
                    self._commit(batch.writes)
        except Exception as error:  # a bug here must not stop the writer, nor leave a caller waiting
            log.exception("store writer: a batch failed")
            for write in batch.writes:
                if write.result is not None and write.outcome is None:
                    write.outcome = StoreError(f"database write failed: {_first_line(error)}")
        finally:
            self._tell(self._settle, batch)
        ended = time.monotonic()
        self._costs.append(ended - due)
        self._after(batch, ended)
        return not batch.stop

    def _keep_pace(self, behind: bool) -> None:
        """Real-time while the writer keeps up; as any thread while it drains a backlog."""
        if behind and not self._lagging:
            self._lagging = gil.ordinarily()
        elif not behind and self._lagging:
            self._lagging = False
            refused = gil.promptly()
            if refused is not None:  # the process's limits changed meanwhile: it stays as any thread
                self.stats.realtime = False
                self.stats.realtime_refused = refused

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
        """Merge the batch's rollup upserts."""
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
            self.stats.batches += 1
            self.stats.written += len(writes)
            for write, count in zip(writes, counts):
                write.outcome = count
            return

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

    def _tell(self, callback: Callable[..., None], *args: Any) -> None:
        """Have the loop run `callback(*args)`: the thread's only way to reach it."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: no one is left to tell
            pass

    @staticmethod
    def _settle(batch: Batch) -> None:
        """On the loop, once the batch has ended: answer `run` callers, call `done`s, release `flush`es."""
        for write in batch.writes:
            future = write.result
            if future is not None and not future.done():
                if isinstance(write.outcome, BaseException):
                    future.set_exception(write.outcome)
                else:
                    future.set_result(write.outcome if write.outcome is not None or write.returning else 0)
            if write.done is not None:
                _call(write.done)
        for done in batch.dones:
            _call(done)
        for future in batch.flushes:
            if not future.done():
                future.set_result(None)


def shapes(writes: list[Write]) -> list[list[int]]:
    """A batch in groups to send, each group one statement's writes: fire-and-forget inserts gathered by
    statement (their order among themselves does not matter), then the `AFTER_INSERTS` statements among
    them, gathered likewise; any other statement, or one a caller awaits, stays where it was and goes
    alone. Each group goes as a few multi-row statements (`rows`): sent one by one, each statement cost
    SQLite's writer a release and a retaking of the GIL, PostgreSQL's a result for psycopg to read."""
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


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_interval(interval: float) -> None:
    if not 0 <= interval <= 0.1:
        raise ValueError("the writer flushes at least every 100 ms: interval must be within [0, 0.1]")
