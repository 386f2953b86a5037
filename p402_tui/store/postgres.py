"""The store on PostgreSQL: what `Store` does for a SQLite file, for a server several gateways share.

Reads take a connection from a psycopg pool. Writes go through the batching writer SQLite's go
through (`writer.BatchWriter`, a thread of its own), here on a synchronous connection of its own:
what was put within the interval is committed as one transaction in one pipeline (`pg_batch` when no
caller waits on it), the inserts of one shape as a few multi-row statements (`rows`); while the server
is unreachable a batch is retried with a capped backoff, never dropped, and the store says it is
`unavailable` so the gateway answers 503 instead of queueing what it cannot write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..core.config import describe_store as redact
from .base import StoreBase
from .db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ConstraintError,
    StoreError,
    StoreUnavailableError,
    migration_sql,
    statements,
)
from .dialect import POSTGRES, postgres_sql
from .rows import groupable, grouped, multi_row, numbered
from .writer import INTERVAL_S, BatchWriter, Params, Write, shapes

log = logging.getLogger("p402.store")
# The pool logs each failed reconnection, several a second while the server is away; the store says
# once that it is away and once that it is back.
logging.getLogger("psycopg").setLevel(logging.ERROR)

try:
    import psycopg
    from psycopg.adapt import Dumper
    from psycopg.rows import dict_row
    from psycopg.types.numeric import FloatLoader
    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    from .pg_batch import Batches
except ImportError:  # the `postgres` extra is not installed: `open_store` says so
    psycopg = None  # type: ignore[assignment]

CONNECT_TIMEOUT_S = 5
POOL_TIMEOUT_S = 5.0  # a read waits this long for a connection before the store is called unavailable
POOL_MAX = 8
PROBE_EVERY_S = 1.0  # while unavailable, how often a caller's question sends a probe


def transient(error: BaseException) -> bool:
    """The server away, restarting, out of connections or space, a lock or deadlock timeout: what passes.
    A statement the server refuses for what it is (a value too large, say) does not."""
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = getattr(error, "sqlstate", None)
    return state is None or state[:2] in ("08", "40", "53", "57") or state == "55P03"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _require_driver() -> None:
    if psycopg is None:
        raise StoreError("PostgreSQL needs the postgres extra: pip install 'p402-tui[postgres]'")


if psycopg is not None:

    class _BoolAsInt(Dumper):
        """Flags are INTEGER columns in both engines; Python's bools go in as 0 and 1, as sqlite3 sends them."""

        oid = psycopg.adapters.types["int4"].oid

        def dump(self, obj: bool) -> bytes:
            return b"1" if obj else b"0"


def local_zone() -> str | None:
    """This process's time zone by name, so the server's local days (`dialect.local_day`) are ours, as
    SQLite's 'localtime' is: TZ, else what /etc/localtime links to; None when neither says."""
    zone = os.environ.get("TZ", "").lstrip(":")
    if not zone:
        try:
            zone = os.path.realpath("/etc/localtime").split("/zoneinfo/", 1)[1]
        except (OSError, IndexError):
            return None
    return zone or None


_SET_ZONE = "SELECT set_config('TimeZone', %s, false)"


async def _set_zone(conn: Any) -> None:
    zone = local_zone()
    if zone:
        try:
            await conn.execute(_SET_ZONE, (zone,))
        except psycopg.DataError:  # a name the server does not know: its own zone stays
            pass


def _adapt(conn: Any) -> None:
    conn.adapters.register_dumper(bool, _BoolAsInt)
    # SUM and AVG of integers are NUMERIC in PostgreSQL: floats here, as SQLite gives them.
    conn.adapters.register_loader("numeric", FloatLoader)


async def connect(url: str) -> Any:
    """One connection in autocommit mode with our adapters; a clear StoreError when it cannot be had."""
    _require_driver()
    where = redact(url)
    try:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, row_factory=dict_row
        )
    except psycopg.OperationalError as error:
        why = _first_line(error).replace(url, where)  # libpq may quote the URL, password and all
        raise StoreUnavailableError(f"cannot reach PostgreSQL at {where}: {why}") from None
    except psycopg.Error as error:
        why = _first_line(error).replace(url, where)
        raise StoreError(f"not a usable PostgreSQL URL {where}: {why}") from None
    _adapt(conn)
    await _set_zone(conn)
    return conn


# --- schema -------------------------------------------------------------------------------

_LOCK = 4020402  # an advisory lock: one process migrates at a time


async def schema_version(conn: Any) -> int | None:
    """The store's version, or None where P402 has not made its tables."""
    cursor = await conn.execute("SELECT to_regclass('p402_schema') IS NOT NULL AS made")
    if not (await cursor.fetchone())["made"]:
        return None
    cursor = await conn.execute("SELECT version FROM p402_schema")
    row = await cursor.fetchone()
    return row["version"] if row else 0


async def migrate(conn: Any, where: str) -> int:
    """Bring the database to SCHEMA_VERSION, a version a transaction; the version found first."""
    found: int | None = None
    try:
        while True:
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK})")
                await conn.execute("CREATE TABLE IF NOT EXISTS p402_schema (version INTEGER NOT NULL)")
                version = await schema_version(conn) or 0
                if not (await (await conn.execute("SELECT COUNT(*) AS n FROM p402_schema")).fetchone())["n"]:
                    await conn.execute("INSERT INTO p402_schema (version) VALUES (0)")
                found = version if found is None else found
                if version >= SCHEMA_VERSION:
                    break
                for statement in statements(migration_sql(MIGRATIONS[version], "postgresql")):
                    await conn.execute(statement)
                await conn.execute("UPDATE p402_schema SET version = %s", (version + 1,))
    except psycopg.OperationalError as error:
        raise StoreUnavailableError(f"cannot migrate PostgreSQL at {where}: {_first_line(error)}") from None
    except psycopg.Error as error:
        raise StoreError(f"cannot migrate PostgreSQL at {where}: {_first_line(error)}") from None
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{where} has schema version {version}, newer than this P402 knows ({SCHEMA_VERSION}); upgrade p402"
        )
    return found or 0


async def status(url: str, tables: tuple[str, ...]) -> dict[str, Any]:
    """What `maintenance.status` reports for a SQLite file, for a PostgreSQL database (never migrated)."""
    where = redact(url)
    report: dict[str, Any] = {
        "engine": "postgresql", "path": where, "exists": False, "schema_version": None,
        "current_version": SCHEMA_VERSION, "up_to_date": False, "size_bytes": 0, "rows": {},
    }  # fmt: skip
    conn = await connect(url)
    try:
        version = await schema_version(conn)
        if version is None:
            return report
        rows = {}
        for table in tables:
            made = await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL AS made", (table,))).fetchone()
            if made["made"]:
                rows[table] = (await (await conn.execute(f"SELECT COUNT(*) AS n FROM {table}")).fetchone())["n"]
        size = (await (await conn.execute("SELECT pg_database_size(current_database()) AS n")).fetchone())["n"]
    except psycopg.OperationalError as error:
        raise StoreUnavailableError(f"cannot read PostgreSQL at {where}: {_first_line(error)}") from None
    finally:
        await conn.close()
    report.update(exists=True, schema_version=version, up_to_date=version == SCHEMA_VERSION, size_bytes=size, rows=rows)
    return report


# --- the writer ---------------------------------------------------------------------------


class PgWriter(BatchWriter):
    """The writer's thread on a connection of its own (autocommit; a transaction per batch), made again
    when the server drops it."""

    def __init__(
        self, url: str, on_reach: Callable[[BaseException | None], None], down: Callable[[], bool], **options: Any
    ) -> None:
        super().__init__(**options)
        self.url = url
        self.on_reach = on_reach  # told on the loop when the server does not answer, and when it answers again
        self.down = down  # whether the server is known to be away
        self.errors = (psycopg.Error,)
        self.conn: Any = None  # the thread's
        self._batches: Any = None  # `pg_batch.Batches` on that connection

    def _connect(self) -> None:
        conn = psycopg.Connection.connect(
            self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, row_factory=dict_row
        )
        _adapt(conn)
        zone = local_zone()
        if zone:
            try:
                conn.execute(_SET_ZONE, (zone,))
            except psycopg.DataError:  # as `_set_zone`
                pass
        self.conn = conn
        self._batches = Batches(conn)

    def _disconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _transaction(self, writes: list[Write]) -> list[int]:
        counts: list[Any] = [1] * len(writes)
        alone: list[tuple[int, Any]] = []
        groups = shapes(writes)  # each group a few multi-row statements
        try:
            if self.conn is None:
                self._connect()
            conn = self.conn
            if len(groups) == 1 and len(groups[0]) == 1:
                # One statement is a transaction of its own (autocommit): no BEGIN and COMMIT to wait for.
                alone.append((0, conn.execute(postgres_sql(writes[0].sql), writes[0].params)))
            elif all(w.result is None and type(w.params) in (tuple, list) for w in writes):
                # What requests leave behind, no caller waiting: sent at once (`pg_batch`), one round trip.
                self._batches.send(_statements(writes, groups))
            else:
                # One pipeline for the whole transaction, BEGIN to COMMIT: gateways on one server upsert
                # the same rollup rows, and a row lock held across round trips stalls the others' writers.
                with conn.pipeline(), conn.transaction():
                    _send(conn, writes, groups, alone)
        except psycopg.Error as error:
            if self.conn is not None and (self.conn.broken or self.conn.closed):
                self._disconnect()  # a new connection at the next try
            if transient(error):
                self._tell(self.on_reach, error)
            raise
        if self.down():
            self._tell(self.on_reach, None)
        for i, cursor in alone:
            if writes[i].returning:
                row = cursor.fetchone()
                counts[i] = None if row is None else tuple(row.values())
            else:
                counts[i] = max(cursor.rowcount, 0)
        return counts

    def _is_busy(self, error: BaseException) -> bool:
        return transient(error)

    def _is_constraint(self, error: BaseException) -> bool:
        return isinstance(error, psycopg.IntegrityError)


def _send(conn: Any, writes: list[Write], groups: list[list[int]], alone: list[tuple[int, Any]]) -> None:
    cursor = conn.cursor()
    for group in groups:
        first = writes[group[0]]
        if len(group) == 1:
            cursor.execute(postgres_sql(first.sql), first.params)
            alone.append((group[0], cursor))
            cursor = conn.cursor()
            continue
        rows = [writes[i].params for i in group]
        if groupable(first.sql, rows):
            raw = psycopg.RawCursor(conn)
            for sql, params in grouped(first.sql, rows, "postgresql"):
                raw.execute(sql, params)
        else:
            cursor.executemany(postgres_sql(first.sql), rows)


def _statements(writes: list[Write], groups: list[list[int]]) -> list[tuple[bytes, Any]]:
    """A batch's groups as (SQL numbered `$1`, parameters) for `pg_batch`: multi-row statements where
    there is a form for one, else a statement a row."""
    out: list[tuple[bytes, Any]] = []
    for group in groups:
        sql = writes[group[0]].sql
        rows = [writes[i].params for i in group]
        if len(group) > 1 and multi_row(sql) is not None:
            out += grouped(sql, rows, "postgresql")
        else:
            raw = numbered(sql)
            out += [(raw, row) for row in rows]
    return out


# --- the store ----------------------------------------------------------------------------


class PgStore(StoreBase):
    """`store.Store`'s interface on a PostgreSQL database."""

    engine = "postgresql"
    dialect = POSTGRES

    def __init__(self, url: str, pool: Any, *, interval: float = INTERVAL_S, realtime: bool = False) -> None:
        super().__init__()
        self.url = url
        self.path = redact(url)  # how commands name the store they use
        self.pool = pool
        self.writer = PgWriter(url, self._reached, lambda: self._down is not None, interval=interval,
                               realtime=realtime)
        self._down: str | None = None  # why the server last failed to answer; None while it answers
        self._probed = 0.0
        self._probe: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, url: str, *, interval: float = INTERVAL_S, create: bool = True, realtime: bool = False
    ) -> PgStore:
        """Connect, migrate (unless `create` is false and P402 has no tables there: a StoreError), pool."""
        conn = await connect(url)
        where = redact(url)
        try:
            if not create and await schema_version(conn) is None:
                raise StoreError(f"no P402 database at {where}: nothing has been recorded there (`p402 db migrate` makes it)")
            await migrate(conn, where)
        finally:
            await conn.close()
        pool = AsyncConnectionPool(
            url, min_size=1, max_size=POOL_MAX, timeout=POOL_TIMEOUT_S, open=False, configure=_configured,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S},
            name="p402-store",
        )  # fmt: skip
        await pool.open()
        store = cls(url, pool, interval=interval, realtime=realtime)
        try:
            await store.writer.begin()
        except psycopg.OperationalError as error:
            await pool.close()
            why = _first_line(error).replace(url, where)  # libpq may quote the URL, password and all
            raise StoreUnavailableError(f"cannot reach PostgreSQL at {where}: {why}") from None
        except BaseException:
            await pool.close()
            raise
        return store

    async def aclose(self) -> None:
        """Commit everything queued, then close. Nothing put before this is lost."""
        try:
            await self.writer.aclose()
        finally:
            if self._probe is not None:
                self._probe.cancel()
            await self.pool.close()

    # --- reachability --------------------------------------------------------------------

    def _reached(self, error: BaseException | None) -> None:
        if error is None:
            if self._down is not None:
                log.warning("store: PostgreSQL at %s answers again", self.path)
            self._down = None
        else:
            if self._down is None:
                log.warning("store: PostgreSQL at %s does not answer: %s", self.path, _first_line(error))
            self._down = _first_line(error)
            self._probed = time.monotonic()

    @property
    def unavailable(self) -> str | None:
        """Why the server is taken to be away (None while it answers). Asked while it is away, it
        probes the server in the background at most every PROBE_EVERY_S, so it clears on its own."""
        if self._down is not None and time.monotonic() - self._probed >= PROBE_EVERY_S:
            if self._probe is None or self._probe.done():
                self._probed = time.monotonic()
                self._probe = asyncio.get_running_loop().create_task(self._probe_once(), name="p402-store-probe")
        return self._down

    async def _probe_once(self) -> None:
        try:
            await self.scalar("SELECT 1")
        except StoreError:
            pass

    # --- reads ---------------------------------------------------------------------------

    async def _read(self, sql: str, params: Params, one: bool) -> Any:
        query = postgres_sql(sql)
        for attempt in (1, 2):
            try:
                # Known to be away: a short wait, so requests are refused at once rather than held.
                async with self.pool.connection(timeout=0.5 if self._down else POOL_TIMEOUT_S) as conn:
                    cursor = await conn.execute(query, params)
                    found = await (cursor.fetchone() if one else cursor.fetchall())
            except psycopg.OperationalError as error:
                if not transient(error):
                    raise StoreError(f"database read failed: {_first_line(error)}") from error
                self._reached(error)
                # A connection the server dropped (a restart) fails once; a fresh one may not.
                if attempt == 1 and not isinstance(error, PoolTimeout):
                    continue
                raise StoreUnavailableError(f"PostgreSQL at {self.path} does not answer: {_first_line(error)}") from None
            except psycopg.IntegrityError as error:
                raise ConstraintError(f"database read failed: {_first_line(error)}") from error
            except psycopg.Error as error:
                raise StoreError(f"database read failed: {_first_line(error)}") from error
            self._reached(None)
            return found

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return await self._read(sql, params, False)

    async def rows(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return await self._read(sql, params, False)

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        return await self._read(sql, params, True)

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        row = await self._read(sql, params, True)
        return next(iter(row.values())) if row else None

    async def schema_version(self) -> int | None:
        return await self.scalar("SELECT version FROM p402_schema")

    async def integrity_check(self) -> str:
        return "ok" if await self.scalar("SELECT 1") == 1 else "no answer"


async def _configured(conn: Any) -> None:
    _adapt(conn)
    await _set_zone(conn)
    # P402's queries are short: compiling one (a report at 10 million rows crosses jit_above_cost) took
    # 2.4 s of LLVM for a query that runs in 0.3 s without it.
    await conn.execute("SET jit = off")

