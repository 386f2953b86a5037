"""The event bus: how the console, the gateway's event stream and the store hear what happens.

Publishing never waits. Each subscriber has a bounded queue; when a slow
subscriber's queue is full its oldest event is dropped (and counted), so a
stalled screen can never slow a request down. A subscriber that must see every
event or none (the gateway's event stream) asks for `on_lag` instead: when its
queue passes its bound in events or in bytes, the queue is let go, the subscriber
leaves the bus, and its next `get()` raises `SubscriberLagged`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(slots=True)
class Event:
    """Base of all events. `kind` names the event on the wire (the gateway's SSE `event:` field)."""

    kind: ClassVar[str] = "event"
    ts: float = field(default_factory=time.time, kw_only=True)
    # Its wire form, made by the first subscriber that sends it and shared by the rest.
    frame: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "ts": self.ts}
        data.update(self.payload())
        return data

    def payload(self) -> dict[str, Any]:
        return {}


@dataclass(slots=True)
class RouteDecided(Event):
    kind: ClassVar[str] = "route_decided"
    decision: Any  # router.RouteDecision

    def payload(self) -> dict[str, Any]:
        return {"decision": self.decision.to_dict()}


@dataclass(slots=True)
class AttemptFailed(Event):
    kind: ClassVar[str] = "attempt_failed"
    request_id: str
    decision_id: str | None
    provider: str
    model: str
    error_kind: str
    error: str
    will_retry: bool

    def payload(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "decision_id": self.decision_id,
            "provider": self.provider,
            "model": self.model,
            "error_kind": self.error_kind,
            "error": self.error,
            "will_retry": self.will_retry,
        }


@dataclass(slots=True)
class RequestCompleted(Event):
    kind: ClassVar[str] = "request_completed"
    record: Any  # hooks.RequestRecord

    def payload(self) -> dict[str, Any]:
        return {"record": self.record.to_dict()}


@dataclass(slots=True)
class HealthChanged(Event):
    kind: ClassVar[str] = "health_changed"
    provider: str
    status: str  # healthy | degraded | down
    previous: str
    reason: str = ""
    circuit: str = "closed"  # closed | open | half_open
    retry_at: float | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "previous": self.previous,
            "reason": self.reason,
            "circuit": self.circuit,
            "retry_at": self.retry_at,
        }


@dataclass(slots=True)
class SpendUpdated(Event):
    kind: ClassVar[str] = "spend_updated"
    provider: str
    model: str
    cost_usd: float
    session_id: str | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "cost_usd": self.cost_usd,
            "session_id": self.session_id,
        }


@dataclass(slots=True)
class CacheHit(Event):
    kind: ClassVar[str] = "cache_hit"
    request_id: str
    match: str  # exact | semantic
    similarity: float
    saved_usd: float
    namespace: str | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "match": self.match,
            "similarity": self.similarity,
            "saved_usd": self.saved_usd,
            "namespace": self.namespace,
        }


# What a subscriber can ask for by name (the gateway's `/api/v2/events?kinds=`), in the order they happen.
EVENT_KINDS = tuple(
    event.kind for event in (RouteDecided, AttemptFailed, RequestCompleted, HealthChanged, SpendUpdated, CacheHit)
)


class SubscriberLagged(Exception):
    """The subscriber fell further behind than its bound: it has left the bus."""


_LAGGED: Any = object()  # wakes a `get()` that waits on a subscription that lagged


class Subscription:
    """One subscriber's bounded queue. Iterate it, or call `get()`; `dropped` counts what it missed.

    `size(event)` is an event's weight in bytes for `max_bytes` (events are shared between
    subscribers, so this bounds what one may pin, not a copy it owns).
    """

    def __init__(
        self,
        bus: "EventBus",
        maxsize: int,
        kinds: frozenset[str] | None,
        *,
        max_bytes: int | None = None,
        size: Callable[[Event], int] | None = None,
        on_lag: Callable[[], None] | None = None,
    ) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.kinds = kinds
        self.dropped = 0
        self.max_bytes = max_bytes
        self._size = size
        self._bytes = 0
        self._on_lag = on_lag
        self.lagged = False

    def offer(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        weight = self._size(event) if self._size is not None else 0
        if self._queue.full() or (self.max_bytes is not None and self._bytes and self._bytes + weight > self.max_bytes):
            if self._on_lag is not None:
                self._lag()
                return
            self._take(self._queue.get_nowait())
            self.dropped += 1
        self._bytes += weight
        self._queue.put_nowait(event)

    def _lag(self) -> None:
        self.lagged = True
        self.dropped += self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._bytes = 0
        self._queue.put_nowait(_LAGGED)
        self.close()
        assert self._on_lag is not None
        self._on_lag()

    def _take(self, event: Event) -> Event:
        if self._size is not None and event is not _LAGGED:
            self._bytes -= self._size(event)
        return event

    async def get(self) -> Event:
        if self.lagged and self._queue.empty():
            raise SubscriberLagged
        event = self._take(await self._queue.get())
        if event is _LAGGED:
            raise SubscriberLagged
        return event

    def drain(self, max_bytes: int | None = None) -> list[Event]:
        """What is waiting, without waiting: how a UI batches its updates. With `max_bytes`, stop
        once that many bytes of events are taken, so that a writer's pieces stay bounded."""
        events: list[Event] = []
        taken = 0
        while not self._queue.empty():
            if max_bytes is not None and taken >= max_bytes:
                break
            event = self._queue.get_nowait()
            if event is _LAGGED:
                self._queue.put_nowait(event)  # for the next `get()`
                break
            self._take(event)
            events.append(event)
            if self._size is not None:
                taken += self._size(event)
        return events

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self._queue.get()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


log = logging.getLogger(__name__)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []
        self._listeners: list[tuple[frozenset[str] | None, Callable[[Event], None]]] = []
        self.published = 0

    def subscribe(
        self,
        maxsize: int = 1000,
        kinds: set[str] | None = None,
        *,
        max_bytes: int | None = None,
        size: Callable[[Event], int] | None = None,
        on_lag: Callable[[], None] | None = None,
    ) -> Subscription:
        """A queue of what is published from now on; see `Subscription` for the bounds."""
        subscription = Subscription(
            self, maxsize, frozenset(kinds) if kinds else None, max_bytes=max_bytes, size=size, on_lag=on_lag
        )
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def listen(self, callback: Callable[[Event], None], kinds: set[str] | None = None) -> Callable[[], None]:
        """Call `callback` with each event (of `kinds`) as it is published; returns what stops it.

        For bookkeeping that must see every event and costs microseconds, such as counters:
        no queue, no task woken per event, nothing dropped. The callback runs inside
        `publish`, so it never waits; one that raises is logged and stays listening.
        """
        entry = (frozenset(kinds) if kinds else None, callback)
        self._listeners.append(entry)

        def stop() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)

        return stop

    def publish(self, event: Event) -> None:
        self.published += 1
        for kinds, callback in self._listeners:
            if kinds is None or event.kind in kinds:
                try:
                    callback(event)
                except Exception:  # a broken counter must not fail the request that published
                    log.exception("event listener %r failed on %s", callback, event.kind)
        for subscription in tuple(self._subscribers):  # a subscriber that lags leaves the list meanwhile
            subscription.offer(event)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
