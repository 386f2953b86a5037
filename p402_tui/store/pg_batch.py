"""A batch of writes no caller waits for, as one transaction sent at once on libpq's pipeline.

psycopg's own pipeline polls the socket after each statement it queues, and again around a
transaction: 75 polls a batch of eight requests sent a statement per row, 26 with multi-row
statements. Each poll lets go of the GIL and takes it back, and on a gateway at concurrency 1 the
loop is mostly serving a request and wants it back: a hand-over each way, with a thread woken each
time. Here BEGIN, the statements and COMMIT go into libpq's buffer together, are flushed, and their
results are read once the server has run them all: the writer lets go of the GIL about twice a batch.

Statements are prepared on the connection the first time they are sent (by text and parameter
types, as psycopg's own cache), so the server parses and plans each shape once: planned at each
batch, the repeat marks alone cost the server 1.3 ms a batch, and its CPU a request went from 0.20
to 0.38 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import psycopg
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.waiting import Ready, Wait

MAX_PREPARED = 100  # statement shapes kept prepared on one connection, the least recently used let go
_BEGIN, _COMMIT = b"BEGIN", b"COMMIT"


class Batches:
    """What one connection keeps between batches: its parameter dumper and the statements prepared on it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.dumper = Transformer.from_context(conn)
        self.prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = {}  # oldest use first
        self._made = 0

    def send(self, statements: Sequence[tuple[bytes, Sequence[Any]]]) -> None:
        """Commit `statements` ((SQL with `$1` placeholders, parameters), ...) as one transaction, all of it
        or none. A statement the server refuses raises its error (psycopg's class for its SQLSTATE) once
        the transaction is rolled back; a connection that fails midway is closed, to be opened again."""
        pgconn = self.conn.pgconn
        sends: list[Callable[[], None]] = [partial(pgconn.send_query_params, _BEGIN, None)]
        new: list[tuple[bytes, tuple[int, ...]]] = []
        for sql, params in statements:
            values = self.dumper.dump_sequence(params, [PyFormat.AUTO] * len(params))
            types, formats = tuple(self.dumper.types), list(self.dumper.formats)
            key = (sql, types)
            name = self.prepared.pop(key, None)
            if name is None:
                if len(self.prepared) >= MAX_PREPARED:
                    old = self.prepared.pop(next(iter(self.prepared)))
                    sends.append(partial(pgconn.send_query_params, b"DEALLOCATE " + old, None))
                self._made += 1
                name = b"p402_w%d" % self._made
                new.append(key)
                sends.append(partial(pgconn.send_prepare, name, sql, param_types=types))
            self.prepared[key] = name
            sends.append(partial(pgconn.send_query_prepared, name, values, param_formats=formats))
        sends.append(partial(pgconn.send_query_params, _COMMIT, None))
        try:
            pgconn.enter_pipeline_mode()
            for send in sends:
                send()
            failed = self.conn.wait(_sync_and_read(pgconn))
            pgconn.exit_pipeline_mode()
        except BaseException as error:
            self.conn.close()  # where a batch broke off is unknown: the writer connects again
            if isinstance(error, psycopg.Error):
                raise
            raise psycopg.OperationalError(f"the batch broke off: {error}") from error
        if failed is None:
            return
        for key in new:  # a pipeline skips what follows an error: these may not have been made
            self.prepared.pop(key, None)
        if pgconn.transaction_status == TransactionStatus.INERROR:
            self.conn.execute("ROLLBACK")
        raise psycopg.errors.error_from_result(failed, encoding=self.conn.info.encoding)


def _sync_and_read(pgconn: Any) -> Any:
    """Send what libpq holds and a sync, then read every result up to the sync's; the first error, or None.
    A generator for psycopg's `Connection.wait`, which polls the socket (the GIL let go) where it yields."""
    pgconn.pipeline_sync()
    while pgconn.flush():  # more than the socket took at once
        ready = yield Wait.RW
        if ready & Ready.R:  # the server answers while it reads: its replies must not fill its socket
            pgconn.consume_input()
    failed = None
    while True:
        while pgconn.is_busy():
            if (yield Wait.R):
                pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:  # the end of one statement's results
            continue
        if result.status == ExecStatus.PIPELINE_SYNC:
            return failed
        if result.status == ExecStatus.FATAL_ERROR and failed is None:
            failed = result
