"""What one gateway tells the rest of its fleet, and how it applies what they tell it.

- `gate`: an ejection or a throttle decided here (`HealthTracker.on_gate`); the others hold the same
  provider or model until the same moment (`apply_remote`), and show it with the sender's name.
- `cache`: an answer cached here, by its keys once its row is committed; the others load the row,
  vector included, into their own tiers (`SemanticCache.adopt`).
- `event`: each event this gateway publishes, in its wire form; the others put it on their event
  stream, labelled with this gateway (`EventBus.relay`), so any gateway's `/api/v2/events` shows the fleet's.
  Only while one of them is watched: relaying every event of every request cost a worker a third of its
  CPU, so a gateway with a watcher (`EventBus.watched`) says `watching` at once and every WATCH_EVERY_S
  after, and the others relay for WATCHED_FOR_S after each. A new watcher sees the fleet's events from
  about half a second on (a tick here and the bus's delivery), its own gateway's at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ..core.events import EVENT_KINDS, Event, EventBus, Relayed
from .bus import FleetBus, Message

log = logging.getLogger("p402.fleet")

TICK_S = 0.25  # how soon a first watcher here is told to the fleet
WATCH_EVERY_S = 2.0  # while watched, said again this often
WATCHED_FOR_S = 3 * WATCH_EVERY_S  # a fleet that heard it relays its events this long: a lost message or two is no gap


def _key_of(event: Event) -> str | None:
    record = getattr(event, "record", None)
    return record.api_key_id if record is not None else getattr(event, "api_key_id", None)


class FleetLink:
    def __init__(self, bus: FleetBus, events: EventBus, health: Any, cache: Any = None, *, relay_events: bool = True):
        self.bus = bus
        self.events = events
        self.health = health
        self.cache = cache
        self.relay_events = relay_events
        self._stops: list[Any] = []
        self._adopting: set[asyncio.Task[Any]] = set()
        self._watched_until = 0.0  # monotonic: another gateway has a watcher until then
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        bus = self.bus
        self.events.gateway = bus.gateway
        self.health.on_gate = lambda gate: bus.publish("gate", gate)
        if self.cache is not None:
            self.cache.on_insert = lambda namespace, key: bus.publish("cache", {"namespace": namespace, "exact_key": key})
        if self.relay_events:
            self._stops.append(self.events.listen(self._tell_event, kinds=set(EVENT_KINDS)))
        self._stops.append(bus.subscribe(self._heard))
        await bus.start()
        if self.relay_events:
            self._ticker = asyncio.create_task(self._say_watching(), name="p402-fleet-watching")

    async def aclose(self) -> None:
        for stop in self._stops:
            stop()
        self._stops = []
        self.health.on_gate = None
        if self.cache is not None:
            self.cache.on_insert = None
        for task in list(self._adopting):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.bus.aclose()

    @property
    def watched(self) -> bool:
        """Some other gateway of the fleet has a watcher of its event stream now: events are relayed."""
        return time.monotonic() < self._watched_until

    async def _say_watching(self) -> None:
        said = None  # when this gateway last said so; None while nobody watches here
        while True:
            now = time.monotonic()
            if not self.events.watched:
                said = None
            elif said is None or now - said >= WATCH_EVERY_S:
                said = now
                self.bus.publish("watching", {})
            await asyncio.sleep(TICK_S)

    def _tell_event(self, event: Event) -> None:
        if self.watched:
            self.bus.publish_later("event", lambda: {"event": event.wire(), "api_key_id": _key_of(event)})

    def _heard(self, message: Message) -> None:
        payload = message.payload
        if message.kind == "gate":
            self.health.apply_remote(
                payload["scope"], payload["target"], payload["kind"], float(payload["until"]), payload.get("reason", ""),
                message.gateway,
            )
        elif message.kind == "watching":
            self._watched_until = time.monotonic() + WATCHED_FOR_S
        elif message.kind == "event":
            data = dict(payload["event"])
            data["gateway"] = message.gateway
            self.events.relay(Relayed(data, payload.get("api_key_id")))
        elif message.kind == "cache" and self.cache is not None:
            task = asyncio.create_task(self.cache.adopt(payload["namespace"], payload["exact_key"]))
            self._adopting.add(task)
            task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("fleet: could not load a cached answer: %s", task.exception())


def open_bus(store: Any, gateway: str, url: str | None = None) -> FleetBus:
    """LISTEN/NOTIFY on the PostgreSQL server at `url`, else on the store's if it is one; else the store's table."""
    url = url or str(getattr(store, "url", "") or "")
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresBus

        return PostgresBus(url, gateway)
    from .bus import StoreBus

    return StoreBus(store, gateway)
