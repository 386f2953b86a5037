"""The schema and its migrations (both engines), and the SQLite file's connections.

One file holds everything P402 remembers. WAL lets the console and the CLI read
while the writer task writes. The schema version lives in `PRAGMA user_version`;
each migration is a script that moves the file one version up, run in one
transaction, so a half-migrated file cannot exist.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from pathlib import Path

import aiosqlite

from ..core.errors import P402Error
from . import rollups

PRAGMAS = (
    "PRAGMA busy_timeout=5000",  # first: another process may be creating the same file right now
    "PRAGMA journal_mode=WAL",
    # NORMAL in WAL mode: a crashed process loses nothing committed; only power loss may drop the last commits.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)


def _as_is(value: object) -> object:
    return value


# sqlite3 passes every parameter that is not exactly an int, float or str through its adapter
# protocol. For None and bytes (half of a ledger row) that is a failed attribute lookup: an
# exception made and dropped per value. Registered as they are, each is a dictionary hit instead.
sqlite3.register_adapter(type(None), _as_is)
sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b

# Spend views share one shape: key, cost_usd, saved_usd, requests, cached.
_SPEND_COLUMNS = (
    "SUM(cost_usd) AS cost_usd, SUM(saved_usd) AS saved_usd, COUNT(*) AS requests, SUM(cached) AS cached"
)

# The first schema, with what the engines spell differently left open: a local day, and the column
# holding a decision record (binary, which PostgreSQL's TEXT cannot hold).
_FIRST_SCHEMA = f"""
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        session_id TEXT,
        api_key_id TEXT,
        tag TEXT,
        mode TEXT,
        provider TEXT,
        model TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        est_cost_usd REAL,
        saved_usd REAL NOT NULL DEFAULT 0,
        latency_ms REAL NOT NULL DEFAULT 0,
        ttft_ms REAL,
        status TEXT NOT NULL,
        error_kind TEXT,
        error TEXT,
        cached INTEGER NOT NULL DEFAULT 0,
        decision_id TEXT,
        stream INTEGER NOT NULL DEFAULT 0,
        namespace TEXT,
        source TEXT,
        attempts TEXT NOT NULL DEFAULT '[]',
        needs TEXT,
        prompt_key TEXT
    );
    CREATE INDEX requests_ts ON requests(ts);
    CREATE INDEX requests_session ON requests(session_id, ts);
    CREATE INDEX requests_model ON requests(provider, model);
    CREATE INDEX requests_tag ON requests(tag);
    CREATE INDEX requests_prompt_key ON requests(prompt_key);

    CREATE TABLE router_decisions (
        id TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        mode TEXT,
        chosen TEXT,
        provider TEXT,
        model TEXT,
        tier TEXT,
        est_cost_usd REAL,
        prompt_tokens INTEGER,
        decision_us REAL,
        candidates INTEGER NOT NULL DEFAULT 0,
        excluded INTEGER NOT NULL DEFAULT 0,
        decision {{record}} NOT NULL
    );
    CREATE INDEX router_decisions_ts ON router_decisions(ts);
    CREATE INDEX router_decisions_chosen ON router_decisions(chosen);

    CREATE TABLE agent_sessions (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        agent TEXT,
        budget_usd REAL CHECK (budget_usd IS NULL OR budget_usd >= 0),
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'closed')),
        metadata TEXT NOT NULL DEFAULT '{{{{}}}}',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );

    CREATE TABLE session_messages (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES agent_sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        model TEXT,
        request_id TEXT,
        ts REAL NOT NULL
    );
    CREATE INDEX session_messages_session ON session_messages(session_id, id);

    CREATE TABLE provider_health (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        provider TEXT NOT NULL,
        status TEXT,
        circuit TEXT,
        error_rate REAL,
        latency_ms_p50 REAL,
        latency_ms_p95 REAL,
        snapshot TEXT NOT NULL
    );
    CREATE INDEX provider_health_provider ON provider_health(provider, ts);

    CREATE TABLE semantic_cache (
        id INTEGER PRIMARY KEY,
        namespace TEXT NOT NULL,
        exact_key TEXT NOT NULL,
        scope_key TEXT NOT NULL,
        prompt TEXT NOT NULL,
        model TEXT,
        response TEXT NOT NULL,
        cost_usd REAL NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        last_hit REAL NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        embedder TEXT,
        embedding BLOB
    );
    CREATE UNIQUE INDEX semantic_cache_key ON semantic_cache(namespace, exact_key);

    CREATE TABLE gateway_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created REAL NOT NULL,
        revoked REAL
    );

    CREATE VIEW spend_by_day AS
        SELECT {{day}} AS day, {_SPEND_COLUMNS} FROM requests GROUP BY day;
    CREATE VIEW spend_by_provider AS
        SELECT provider, {_SPEND_COLUMNS} FROM requests GROUP BY provider;
    CREATE VIEW spend_by_model AS
        SELECT provider, model, {_SPEND_COLUMNS} FROM requests GROUP BY provider, model;
    CREATE VIEW spend_by_session AS
        SELECT session_id, {_SPEND_COLUMNS} FROM requests WHERE session_id IS NOT NULL GROUP BY session_id;
    """

# An entry is SQL both engines run (PostgreSQL reads SQLite's REAL as DOUBLE PRECISION, BLOB as BYTEA
# and INTEGER PRIMARY KEY as an identity column: `postgres_ddl`), or a pair (sqlite, postgres) where
# they must differ. Each moves a store one version up, in one transaction.
Migration = str | tuple[str, str]

MIGRATIONS: tuple[Migration, ...] = (
    # 1: the first schema
    (
        _FIRST_SCHEMA.format(day="date(ts, 'unixepoch', 'localtime')", record="TEXT"),
        _FIRST_SCHEMA.format(day="to_char(to_timestamp(ts), 'YYYY-MM-DD')", record="BLOB"),
    ),
    # 2: a decision's models (half of its record, the same for every request of an option set) kept once
    """
    CREATE TABLE decision_models (
        digest BLOB PRIMARY KEY,
        models BLOB NOT NULL
    ) WITHOUT ROWID;
    ALTER TABLE router_decisions ADD COLUMN models BLOB;  -- a decision_models digest
    """,
    # 3: the live figures a decision was ranked with, the same for every decision until health moves, kept once
    """
    CREATE TABLE decision_vectors (
        digest BLOB PRIMARY KEY,
        vectors BLOB NOT NULL
    ) WITHOUT ROWID;
    ALTER TABLE router_decisions ADD COLUMN vectors BLOB;  -- a decision_vectors digest
    """,
    # 4: decision records without their ranking (P402dec4, ranked when read), which an older P402
    # cannot read: it refuses a file of this version. And indexes no query uses go: each cost every
    # request a B-tree insert (spend, recommendations and session totals all search by time).
    """
    DROP INDEX requests_model;
    DROP INDEX requests_tag;
    DROP INDEX requests_prompt_key;
    DROP INDEX router_decisions_chosen;
    """,
    # 5: decision records hold what was decided (P402rec1, `store.decisions`). Binary records of the
    # versions before cannot be read without ranking them again with today's code, so they go with
    # their parts; rows kept as JSON already hold their decision and stay. The ledger is untouched.
    (
        """
        DELETE FROM router_decisions WHERE typeof(decision) = 'blob';
        DELETE FROM decision_models;
        DELETE FROM decision_vectors;
        """,
        # a PostgreSQL store began after those versions: none of its records is of them
        "DELETE FROM decision_models; DELETE FROM decision_vectors;",
    ),
    # 6: what was made against the simulator, marked so spend and recommendations can leave it out;
    # sessions found by name too, so a name is unique per gateway key (older duplicates get their id added)
    tuple(
        f"""
        ALTER TABLE requests ADD COLUMN simulated INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE router_decisions ADD COLUMN simulated INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE provider_health ADD COLUMN simulated INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE agent_sessions ADD COLUMN api_key_id TEXT;
        UPDATE agent_sessions SET name = name || ' (' || id || ')'
            WHERE {row} NOT IN (SELECT MIN({row}) FROM agent_sessions GROUP BY name);
        CREATE UNIQUE INDEX agent_sessions_name ON agent_sessions(COALESCE(api_key_id, ''), name);
        """
        for row in ("rowid", "ctid")
    ),
    # usage a provider did not send: the row's tokens and cost are our own count, flagged as such
    """
    ALTER TABLE requests ADD COLUMN usage_estimated INTEGER NOT NULL DEFAULT 0;
    """,
    # Responses API answers kept for GET /v1/responses/{id} and previous_response_id: the answer as
    # sent, and the conversation (chat messages, instructions left out) that a next turn continues
    """
    CREATE TABLE stored_responses (
        id TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        api_key_id TEXT,
        response TEXT NOT NULL,
        conversation TEXT NOT NULL
    );
    """,
    # policy: each key's role and policy (JSON), the ledger grouped by key, and which guardrail rules
    # fired on a request and how often (never what they matched). Keys made before roles stay admins.
    """
    ALTER TABLE gateway_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
    ALTER TABLE gateway_keys ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE gateway_keys ADD COLUMN updated REAL;
    CREATE INDEX requests_key ON requests(api_key_id, ts);
    CREATE TABLE guardrail_hits (
        request_id TEXT NOT NULL,
        api_key_id TEXT,
        ts REAL NOT NULL,
        rule TEXT NOT NULL,
        action TEXT NOT NULL,
        count INTEGER NOT NULL
    );
    CREATE INDEX guardrail_hits_key ON guardrail_hits(api_key_id, ts);
    """,
    # a call to a model without a known price (an unlisted id) costs NULL, not $0, and is flagged unpriced.
    # SQLite cannot drop a NOT NULL constraint by ALTER; the table's declaration is edited in place, as
    # https://sqlite.org/lang_altertable.html#otheralter allows for constraints that change no stored data
    # (RESET reloads the schema; the ALTER after it bumps the schema cookie for every other connection).
    (
        """
        PRAGMA writable_schema=ON;
        UPDATE sqlite_schema SET sql = replace(sql, 'cost_usd REAL NOT NULL DEFAULT 0', 'cost_usd REAL DEFAULT 0')
            WHERE type = 'table' AND name = 'requests';
        PRAGMA writable_schema=RESET;
        ALTER TABLE requests ADD COLUMN priced INTEGER NOT NULL DEFAULT 1;
        """,
        """
        ALTER TABLE requests ALTER COLUMN cost_usd DROP NOT NULL;
        ALTER TABLE requests ADD COLUMN priced INTEGER NOT NULL DEFAULT 1;
        """,
    ),
    # the caller's own id of a request (x-request-id), beside ours: callers reuse theirs on retries,
    # so it cannot be the key. Not indexed: no query of ours searches by it.
    """
    ALTER TABLE requests ADD COLUMN client_request_id TEXT;
    """,
    # state gateways share (store/shared.py): budgets as counters reserved and settled atomically, with a
    # row per reservation to reclaim what a dead process held; rate windows; the SQLite fleet bus's messages
    """
    CREATE TABLE budget_usage (
        scope TEXT NOT NULL,
        period_start REAL NOT NULL,
        spent REAL NOT NULL DEFAULT 0,
        reserved REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, period_start)
    );
    CREATE TABLE budget_holds (
        id TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        period_start REAL NOT NULL,
        amount REAL NOT NULL,
        expires REAL NOT NULL
    );
    CREATE INDEX budget_holds_expires ON budget_holds(expires);
    CREATE TABLE rate_windows (
        scope TEXT PRIMARY KEY,
        window_start REAL NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE fleet_messages (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        gateway TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    """,
    # the ledger summed by hour (`store.rollups`), kept in step by every ledger write and filled here from the
    # rows already written, so spend and recommendations read thousands of sums, not millions of rows
    rollups.MIGRATION,
    # PostgreSQL only: a decision record (about 4 KB) stays in its row. Past the default 2 KB target the
    # server first tried to compress it (pglz, which gives up on packed floats: 24 % of its CPU on a
    # write) and then cut it into two chunks of the TOAST table and their index (11 % more). SQLite
    # compresses nothing and has no such target: nothing to do there.
    ("", "ALTER TABLE router_decisions SET (toast_tuple_target = 8160);"),
)

SCHEMA_VERSION = len(MIGRATIONS)


# Turning a fresh file to WAL takes a lock that SQLite does not wait for (busy_timeout does not
# apply): two processes creating one file at once retry it for up to a second.
PRAGMA_TRIES = 50


def is_busy(error: sqlite3.Error) -> bool:
    """Another connection holds the lock this statement needs."""
    text = str(error).lower()
    return "locked" in text or "busy" in text


class StoreError(P402Error):
    kind = "store"
    http_status = 500


class ConstraintError(StoreError):
    """A write broke a constraint (a unique name taken, a check failed), in either engine."""


class StoreUnavailableError(StoreError):
    """The database server does not answer; a retry may succeed once it is back."""

    kind = "store_unavailable"
    http_status = 503


def migration_sql(entry: Migration, engine: str) -> str:
    """The script of one migration for `engine` ("sqlite" or "postgresql")."""
    if isinstance(entry, tuple):
        entry = entry[0] if engine == "sqlite" else entry[1]
    return entry if engine == "sqlite" else postgres_ddl(entry)


_PG_TYPES = (
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b", re.IGNORECASE),
     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    # PostgreSQL's REAL is 4 bytes: a timestamp would keep minutes. SQLite's REAL is 8.
    (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"),
    (re.compile(r"\)\s*WITHOUT\s+ROWID\b", re.IGNORECASE), ")"),
)


def postgres_ddl(sql: str) -> str:
    """SQLite's column types as PostgreSQL spells the same storage."""
    for pattern, replacement in _PG_TYPES:
        sql = pattern.sub(replacement, sql)
    return sql


async def connect(path: Path | str) -> aiosqlite.Connection:
    """An open, migrated connection in autocommit mode (transactions are explicit), for reads."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"cannot open database {path}: {error}") from None
    # aiosqlite.connect() is this with sqlite3.connect; the pragmas run on aiosqlite's thread too.
    conn = aiosqlite.Connection(lambda: open_sync(path), iter_chunk_size=64)
    try:
        await conn
    except BaseException:
        # aiosqlite stops its thread without waiting for it, and the thread then answers the loop:
        # a command that ended meanwhile printed "Event loop is closed" tracebacks after its error.
        thread = getattr(conn, "_thread", None)
        if thread is not None:
            await asyncio.to_thread(thread.join, 5)
        raise
    try:
        await migrate(conn, path)
    except BaseException:
        await conn.close()
        raise
    conn.row_factory = aiosqlite.Row
    return conn


def open_sync(path: Path | str) -> sqlite3.Connection:
    """A plain connection in autocommit mode with our pragmas, for the one thread that will use it."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as error:
        raise StoreError(f"cannot open database {path}: {error}") from None
    try:
        for pragma in PRAGMAS:
            for attempt in range(PRAGMA_TRIES):
                try:
                    conn.execute(pragma)
                    break
                except sqlite3.OperationalError as error:
                    if not is_busy(error) or attempt == PRAGMA_TRIES - 1:
                        raise
                    time.sleep(0.02)
    except sqlite3.Error as error:
        conn.close()
        raise StoreError(f"cannot use database {path}: {error}") from None
    return conn


async def migrate(conn: aiosqlite.Connection, path: Path | str = "database") -> int:
    """Bring the file to SCHEMA_VERSION; refuse a file written by a newer P402.

    Each step re-reads the version inside its write transaction, so two processes
    opening a fresh file at once do not both run the same migration.
    """
    version = 0
    try:
        while True:
            await conn.execute("BEGIN IMMEDIATE")
            async with conn.execute("PRAGMA user_version") as cursor:
                (version,) = await cursor.fetchone()
            if version >= SCHEMA_VERSION:
                await conn.execute("COMMIT")
                break
            for statement in statements(migration_sql(MIGRATIONS[version], "sqlite")):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version={version + 1}")
            await conn.execute("COMMIT")
    except aiosqlite.DatabaseError as error:
        if conn.in_transaction:
            await conn.rollback()
        raise StoreError(f"cannot use database {path}: {error}") from None
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this P402 knows ({SCHEMA_VERSION}); upgrade p402"
        )
    return version


def statements(script: str) -> list[str]:
    """A script cut into whole statements (execute() takes one at a time)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements
