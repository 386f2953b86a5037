"""Operations' use cases: the store's status and migration, pruning old history, readiness."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

from ..core.errors import P402Error
from ..store import maintenance
from ..store.engine import open_store
from ..store.store import Store

logger = logging.getLogger(__name__)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 86400.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class BadAgeError(P402Error):
    kind = "invalid_request"
    http_status = 400


def age_seconds(text: str) -> float:
    """`30d`, `12h`, `90m`, `2w` (a bare number is days) in seconds."""
    match = _AGE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise BadAgeError(f"not an age: {text!r} (say 30d, 12h, 90m or 2w)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


async def status(path: str | Path) -> dict[str, Any]:
    """The store at `path` (a file, or a PostgreSQL URL) as it is (never created nor migrated)."""
    return await maintenance.status(path)


async def migrate(path: str | Path) -> dict[str, Any]:
    """Bring the store at `path` to this P402's schema: its version before and after."""
    before = (await status(path))["schema_version"]
    async with await open_store(path):  # opening migrates
        pass
    after = await status(path)
    return {"engine": after["engine"], "path": after["path"], "from_version": before,
            "to_version": after["schema_version"]}  # fmt: skip


async def prune(store: Store, older_than_s: float) -> dict[str, Any]:
    """Delete the ledger, decisions and health history older than `older_than_s`, in small batches."""
    before = time.time() - older_than_s
    removed = await maintenance.prune(store, before)
    return {"before_ts": before, "removed": removed, "total": sum(removed.values())}


RETAIN_EVERY_S = 3600.0


async def retain(store: Store, days: float, *, every_s: float = RETAIN_EVERY_S) -> None:
    """`[store] retention_days`: prune at start, then every `every_s`, until cancelled."""
    while True:
        try:
            removed = await prune(store, days * 86400)
            if removed["total"]:
                logger.info("retention: removed %d rows older than %g days", removed["total"], days)
        except P402Error as error:  # the store closing or refusing: try again next round
            logger.warning("retention: %s", error)
        await asyncio.sleep(every_s)


async def ready(store: Store | None, usable_providers: int) -> tuple[bool, dict[str, Any]]:
    """Readiness for a load balancer: the store answers at the current schema, and a provider is usable."""
    checks: dict[str, Any] = {}
    if store is not None:
        # realtime_writer: whether a kill -9 on saturated cores loses only the writer's ~25 ms window (gil.promptly)
        writer = store.writer
        why_not = None if writer.stats.realtime else (
            writer.stats.realtime_refused if writer.realtime else "off: [store] realtime_writer = false")
        checks["store"] = {**await maintenance.check(store), "realtime_writer": writer.stats.realtime,
                           "realtime_writer_reason": why_not}
    checks["providers"] = {
        "ok": usable_providers > 0, "usable": usable_providers,
        "reason": None if usable_providers else "no provider is configured (see `p402 providers`)",
    }  # fmt: skip
    return all(check["ok"] for check in checks.values()), checks
