"""The server's logs: one line per record, JSON or text, written to stderr by a thread of their own.

Every `logging` record (P402's warnings and errors, uvicorn's) goes through a `QueueHandler` that
only enqueues it; a `QueueListener` thread formats what waits every 0.1 s and writes it in one
go, so a slow or blocked stderr never holds the event loop. The gateway's access line takes a
shorter way still: `AccessLog.write` puts a tuple of what it saw on the same queue, and the
listener builds the line from it. Past `MAX_QUEUED` lines waiting (each holds its request's
record), new ones are dropped and counted rather than grow memory without end.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from .core.types import usd_json

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
MAX_QUEUED = 10_000  # seconds of traffic at full speed; a batch is usually ~100 lines
ACCESS_LOGGER = "p402.access"


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text: most lines share it


def _iso(ts: float) -> str:
    whole = int(ts)
    if _second[0] != whole:
        _second[:] = [whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((ts - whole) * 1000):03d}Z"


def access_fields(item: tuple[Any, ...]) -> dict[str, Any]:
    """An access line's fields, in their stable order: what `AccessLog.write` enqueued, read off the thread."""
    ts, method, path, status, latency_ms, key_id, request_id, client_request_id, ctx = item
    record = getattr(ctx, "record", None)
    fields: dict[str, Any] = {
        "ts": _iso(ts), "level": "info", "logger": ACCESS_LOGGER, "msg": "access",
        "method": method, "path": path, "status": status, "latency_ms": round(latency_ms, 2),
        "key_id": key_id, "request_id": request_id, "client_request_id": client_request_id,
        "model": None, "provider": None, "cost_usd": None, "cached": None, "stream": None, "error_kind": None,
    }  # fmt: skip
    if record is not None:
        fields["model"] = record.model
        fields["provider"] = record.provider
        fields["cost_usd"] = None if record.cost_usd is None else usd_json(record.cost_usd)
        fields["cached"] = record.cached
        fields["stream"] = record.stream
        fields["error_kind"] = record.error_kind
    return fields


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Any other record's fields: ts, level, logger, msg (and exc, a traceback's text, when it has one)."""
    fields = {
        "ts": _iso(record.created), "level": record.levelname.lower(), "logger": record.name,
        "msg": record.getMessage(),
    }  # fmt: skip
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


def json_line(fields: dict[str, Any]) -> str:
    return orjson.dumps(fields).decode()


def text_line(fields: dict[str, Any]) -> str:
    """`TS LEVEL logger msg`; an access line's fields follow as key=value, the empty ones left out."""
    if fields.get("logger") == ACCESS_LOGGER:
        head = f"{fields['ts']} INFO access {fields['method']} {fields['path']} {fields['status']} {fields['latency_ms']}ms"
        rest = " ".join(
            f"{name}={_text(value)}" for name, value in fields.items()
            if name not in _ACCESS_HEAD and value is not None
        )  # fmt: skip
        return f"{head} {rest}" if rest else head
    line = f"{fields['ts']} {fields['level'].upper()} {fields['logger']} {fields['msg']}"
    if "exc" in fields:
        line += "\n" + fields["exc"]
    return line


_ACCESS_HEAD = frozenset({"ts", "level", "logger", "msg", "method", "path", "status", "latency_ms"})


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class _Listener(logging.handlers.QueueListener):
    """Formats and writes on its own thread: logging records and access tuples alike.

    It wakes every `interval_s` and writes all that waits in one write, rather than waking for
    each line: a thread woken per request made the event loop hand over the GIL at every request.
    """

    interval_s = 0.1

    def __init__(self, q: queue.SimpleQueue[Any], stream: TextIO, line: Any) -> None:
        super().__init__(q)
        self.stream = stream
        self.line = line

    def dequeue(self, block: bool) -> Any:
        """The lines waiting as one batch (a list), or the sentinel once those before it are written."""
        while True:
            time.sleep(self.interval_s)
            batch = []
            try:
                while True:
                    item = self.queue.get_nowait()
                    if item is self._sentinel:
                        self.handle(batch)
                        return item
                    batch.append(item)
            except queue.Empty:
                pass
            if batch:
                return batch

    def handle(self, batch: Any) -> None:
        lines = []
        for item in batch:
            try:
                lines.append(self.line(access_fields(item) if type(item) is tuple else record_fields(item)))
            except (ValueError, TypeError):  # an odd value: that line is lost, the others are written
                continue
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stderr: the lines are lost, the server runs on
            return


class _Enqueue(logging.handlers.QueueHandler):
    """Enqueues the record as it is: formatting waits for the listener's thread."""

    def __init__(self, logs: Logs) -> None:
        super().__init__(logs.queue)
        self.logs = logs

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: Any) -> None:
        self.logs.put(record)


class Logs:
    """The process's log output while it runs; `stop()` writes what is queued and restores logging."""

    def __init__(self, fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format {fmt!r}: choose one of {', '.join(FORMATS)}")
        if level not in LEVELS:
            raise ValueError(f"log level {level!r}: choose one of {', '.join(LEVELS)}")
        self.format = fmt
        self.access = level in ("debug", "info")  # access lines are info: a warning level leaves them out
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.dropped = 0
        self._listener = _Listener(self.queue, stream or sys.stderr, json_line if fmt == "json" else text_line)
        self._handler = _Enqueue(self)
        self._root = logging.getLogger()
        self._saved = (self._root.level, list(self._root.handlers))
        self._root.handlers = [self._handler]
        self._root.setLevel(level.upper())
        self._listener.start()
        global active
        active = self

    def put(self, item: Any) -> None:
        if self.queue.qsize() >= MAX_QUEUED:
            self.dropped += 1
            return
        self.queue.put(item)

    def stop(self) -> None:
        """Write what is queued (and how many lines were dropped, if any), then put logging back as it was."""
        if self.dropped:  # said past the bound: the queue may still be full
            message = "%d log lines dropped: stderr could not keep up"
            self.queue.put(logging.LogRecord("p402.logs", logging.WARNING, __file__, 0, message, (self.dropped,), None))
        self._root.handlers, level = self._saved[1], self._saved[0]
        self._root.setLevel(level)
        self._listener.stop()
        global active
        if active is self:
            active = None


active: Logs | None = None  # the process's, while one runs: the gateway writes its access lines there


class AccessLog:
    """One line per gateway request, enqueued as a tuple: the hot path neither formats nor writes."""

    __slots__ = ("put",)

    def __init__(self, logs: Logs) -> None:
        self.put = logs.put

    def write(self, scope: dict[str, Any], started: float) -> None:
        now = time.perf_counter()
        self.put((
            time.time(), scope["method"], scope["path"], scope.get("p402.status", 0), (now - started) * 1000,
            scope.get("p402.api_key_id"), scope.get("p402.request_id"), scope.get("p402.client_request_id"),
            scope.get("p402.ctx"),
        ))  # fmt: skip


def from_flags(settings: Any, args: Any) -> Any:
    """`--log-format`, `--log-level` and `--no-access-log` over the file and the environment."""
    conf = settings.gateway
    if getattr(args, "log_format", None):
        conf.log_format = args.log_format
    if getattr(args, "log_level", None):
        conf.log_level = args.log_level
    if getattr(args, "no_access_log", False):
        conf.access_log = False
    return settings


@contextmanager
def server_logs(settings: Any) -> Iterator[Logs]:
    """The process's logs in the configured format while a gateway runs; what is queued is written at the end."""
    from . import telemetry

    running = Logs(settings.gateway.log_format, settings.gateway.log_level)
    try:
        yield running
    finally:
        telemetry.shutdown()  # its exporter may still log a failure: before the logs stop
        running.stop()
