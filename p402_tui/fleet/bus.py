"""The fleet bus: messages from one gateway to every other on the same database.

A message is a kind and a JSON payload, stamped with the gateway that sent it; a gateway never
hears its own (told apart by an instance id, so workers sharing one configured name hear each other). Delivery is best effort and quick (well within a second): what travels here is
news (a circuit opened, an answer cached, a decision made), never state that must not be lost,
which lives in the database itself.

`StoreBus` is the SQLite form: messages are rows of `fleet_messages`, written by the store's
writer and read by each process every `interval` (200 ms), newest id onwards; rows older than
`KEEP_S` are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("p402.fleet")

KEEP_S = 60.0  # a message older than this is of no use to anyone: pruned
PRUNE_EVERY_S = 10.0


def instance_id() -> str:
    """What tells this bus apart from every other, whatever its label."""
    return uuid.uuid4().hex[:12]


def gateway_id(name: str | None = None) -> str:
    """This gateway's label in the fleet: the configured name, else hostname:pid."""
    return name or f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True, frozen=True)
class Message:
    gateway: str  # the sender
    kind: str
    payload: dict[str, Any]


Listener = Callable[[Message], None]


class FleetBus(Protocol):
    gateway: str

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Send to every other gateway; never waits."""

    def publish_later(self, kind: str, make: Callable[[], dict[str, Any]]) -> None:
        """Send what `make()` returns, made off the request's path (when the message is written or sent)."""

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call `callback` with each message from another gateway; returns what stops it."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class Listeners:
    """The subscribers of one bus, each called in turn; one that raises is logged and stays."""

    def __init__(self) -> None:
        self._callbacks: list[Listener] = []

    def add(self, callback: Listener) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def deliver(self, message: Message) -> None:
        for callback in list(self._callbacks):
            try:
                callback(message)
            except Exception:
                log.exception("fleet listener failed on %s", message.kind)


_INSERT = "INSERT INTO fleet_messages (ts, gateway, kind, payload) VALUES (?, ?, ?, ?)"
_SINCE = "SELECT id, gateway, kind, payload FROM fleet_messages WHERE id > ? ORDER BY id LIMIT 1000"
# The newest row stays: SQLite numbers a new row after the largest id there is, so an emptied
# table would number from 1 again, behind every reader's cursor.
_PRUNE = "DELETE FROM fleet_messages WHERE ts < ? AND id < (SELECT MAX(id) FROM fleet_messages)"


class StoreBus:
    """The bus as a table in the store, polled."""

    def __init__(self, store: Any, gateway: str, *, interval: float = 0.2) -> None:
        self.store = store
        self.gateway = gateway
        self.sender = f"{gateway}#{instance_id()}"  # the row's gateway column: its label, then who sent it
        self.interval = interval
        self.listeners = Listeners()
        self.cursor = 0
        self.sent = 0
        self.received = 0
        self._task: asyncio.Task[None] | None = None

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        self.sent += 1
        self.store.put(_INSERT, (time.time(), self.sender, kind, json.dumps(payload, separators=(",", ":"))))

    def publish_later(self, kind: str, make: Callable[[], dict[str, Any]]) -> None:
        self.sent += 1
        ts = time.time()
        self.store.put_later(
            lambda: [(_INSERT, (ts, self.sender, kind, json.dumps(make(), separators=(",", ":"))))]
        )

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        return self.listeners.add(callback)

    async def start(self) -> None:
        self.cursor = int(await self.store.scalar("SELECT COALESCE(MAX(id), 0) FROM fleet_messages") or 0)
        self._task = asyncio.create_task(self._poll(), name="p402-fleet-bus")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
                if time.monotonic() - pruned > PRUNE_EVERY_S:
                    pruned = time.monotonic()
                    self.store.put(_PRUNE, (time.time() - KEEP_S,))
            except Exception as error:  # noqa: BLE001 - the database away for a moment: the next tick tries again
                log.warning("fleet bus: %s", error)

    async def poll(self) -> int:
        """Deliver what arrived since the last poll; how many messages that was."""
        rows = await self.store.fetchall(_SINCE, (self.cursor,))
        for row in rows:
            self.cursor = max(self.cursor, int(row["id"]))
            if row["gateway"] == self.sender:
                continue
            self.received += 1
            label = row["gateway"].rpartition("#")[0] or row["gateway"]
            self.listeners.deliver(Message(label, row["kind"], json.loads(row["payload"])))
        return len(rows)
