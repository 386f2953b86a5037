"""The event bus: how the console, the gateway's event stream and the store hear what happens.

Publishing never waits. Each subscriber has a bounded queue; when a slow
subscriber's queue is full its oldest event is dropped (and counted), so a
stalled screen can never slow a request down.

Many readers that must see every event or none (the gateway's event streams) share
one `EventLog` instead: an event is appended once however many read it, and a
reader that falls further behind than the log holds is told it lagged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .hooks import api_of


@dataclass(slots=True)
class Event:
    """Base of all events. `kind` names the event on the wire (the gateway's SSE `event:` field)."""

    kind: ClassVar[str] = "event"
    ts: float = field(default_factory=time.time, kw_only=True)
    gateway: str | None = field(default=None, kw_only=True, compare=False)  # which gateway of a fleet made it
    # Its wire form, made by the first subscriber that sends it and shared by the rest.
    frame: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "ts": self.ts}
        if self.gateway is not None:
            data["gateway"] = self.gateway
        data.update(self.payload())
        return data

    def payload(self) -> dict[str, Any]:
        return {}

    def wire(self) -> dict[str, Any]:
        """Its form on the gateway's event stream."""
        return self.to_dict()


@dataclass(slots=True)
class RouteDecided(Event):
    """A decision made: whole in process; on the gateway's event stream, in brief (`wire()`)."""

    kind: ClassVar[str] = "route_decided"
    decision: Any  # router.RouteDecision, or a DecisionBrief where only the brief travelled
    api_key_id: str | None = None  # the gateway key that asked

    def payload(self) -> dict[str, Any]:
        return {"decision": self.decision.to_dict()}

    def wire(self) -> dict[str, Any]:
        # ~0.35 kB rather than ~40 kB with every candidate: hundreds of subscribers each get every
        # one. `/api/v2/decisions/{id}` has the whole decision for whoever opens it.
        data = {"kind": self.kind, "ts": self.ts, "decision": decision_summary(decision_columns(self.decision), None)}
        if self.gateway is not None:
            data["gateway"] = self.gateway
        return data


def decision_columns(decision: Any) -> dict[str, Any]:
    """A `RouteDecision`'s indexed columns, counted as the store counts them (`RouteDecision.columns`)."""
    return decision.columns()


def decision_summary(decision: Mapping[str, Any], outcome: Mapping[str, Any] | None) -> dict[str, Any]:
    """One decision in brief: its indexed columns and, once the request finished, its ledger row's outcome
    (with the API it came through: `source` as recorded, `api` as `hooks.api_of` names it)."""
    if outcome is not None:
        status = outcome["status"]
    else:
        status = "pending" if decision["chosen"] else "no_model"
    source = outcome.get("source") if outcome else None
    return {
        "id": decision["id"],
        "ts": decision["ts"],
        "mode": decision["mode"],
        "chosen": decision["chosen"],
        "model": f"{outcome['provider']}/{outcome['model']}" if outcome and outcome["provider"] else None,
        "status": status,
        "error_kind": outcome["error_kind"] if outcome else None,
        "est_cost_usd": decision["est_cost_usd"],
        "cost_usd": outcome["cost_usd"] if outcome else None,
        "latency_ms": outcome["latency_ms"] if outcome else None,
        "candidates": decision["candidates"],
        "excluded": decision["excluded"],
        "request_id": outcome["id"] if outcome else None,
        "session_id": outcome["session_id"] if outcome else None,
        "source": source,
        "api": api_of(source) if source else None,
    }


@dataclass(frozen=True, slots=True)
class DecisionBrief:
    """A decision as `decision_summary` gives it: what a console shows in a row, and the id to
    fetch the whole decision by."""

    id: str
    ts: float
    mode: str
    chosen: str | None  # provider/model the router chose
    est_cost_usd: float | None
    candidates: int
    excluded: int
    status: str = "pending"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionBrief:
        return cls(
            id=data["id"], ts=float(data.get("ts") or time.time()), mode=data.get("mode") or "-",
            chosen=data.get("chosen"), est_cost_usd=data.get("est_cost_usd"),
            candidates=int(data.get("candidates") or 0), excluded=int(data.get("excluded") or 0),
            status=data.get("status") or "pending",
        )  # fmt: skip


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


@dataclass(slots=True)
class RequestRejected(Event):
    """The gateway refused a request with a 4xx: bad body, no key, over budget, too large, unknown model.

    `request_id` is set when the request reached the orchestrator, which has already
    published its `RequestCompleted` (as an error): counters of requests must not count it twice.
    """

    kind: ClassVar[str] = "request_rejected"
    status: int
    reason: str  # the error code of the answer: invalid_api_key, request_too_large, budget_exceeded
    method: str
    path: str
    message: str = ""
    request_id: str | None = None
    api_key_id: str | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "api_key_id": self.api_key_id,
            "status": self.status,
            "reason": self.reason,
            "method": self.method,
            "path": self.path,
            "message": self.message,
            "request_id": self.request_id,
        }


class Relayed(Event):
    """An event another gateway of the fleet published, as it travels (its wire form, labelled with that
    gateway): for the event stream, which shows the whole fleet's, never for counters of this process."""

    __slots__ = ("api_key_id", "data")

    def __init__(self, data: dict[str, Any], api_key_id: str | None = None) -> None:
        super().__init__(ts=float(data.get("ts") or time.time()), gateway=data.get("gateway"))
        self.data = data
        self.api_key_id = api_key_id

    @property  # type: ignore[override]
    def kind(self) -> str:  # type: ignore[override]
        return str(self.data.get("kind") or "event")

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def wire(self) -> dict[str, Any]:
        return self.data


# What a subscriber can ask for by name (the gateway's `/api/v2/events?kinds=`), in the order they happen.
EVENT_KINDS = tuple(
    event.kind
    for event in (RouteDecided, AttemptFailed, RequestCompleted, RequestRejected, HealthChanged, SpendUpdated, CacheHit)
)


class Subscription:
    """One subscriber's bounded queue. Iterate it, or call `get()`; `dropped` counts what it missed."""

    def __init__(self, bus: "EventBus", maxsize: int, kinds: frozenset[str] | None) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.kinds = kinds
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        return await self._queue.get()

    def drain(self) -> list[Event]:
        """Everything waiting, without waiting: how a UI batches its updates."""
        events = []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
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
        self._relayed: list[tuple[frozenset[str] | None, Callable[[Event], None]]] = []
        self.published = 0
        self.gateway: str | None = None  # set in a fleet: the label of every event published here

    def subscribe(self, maxsize: int = 1000, kinds: set[str] | None = None) -> Subscription:
        subscription = Subscription(self, maxsize, frozenset(kinds) if kinds else None)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def listen(
        self, callback: Callable[[Event], None], kinds: set[str] | None = None, *, relayed: bool = False
    ) -> Callable[[], None]:
        """Call `callback` with each event (of `kinds`) as it is published; returns what stops it.

        For bookkeeping that must see every event and costs microseconds, such as counters:
        no queue, no task woken per event, nothing dropped. The callback runs inside
        `publish`, so it never waits; one that raises is logged and stays listening.
        `relayed`: it hears the other gateways' events (`relay`) too.
        """
        entry = (frozenset(kinds) if kinds else None, callback)
        lists = (self._listeners, self._relayed) if relayed else (self._listeners,)
        for listeners in lists:
            listeners.append(entry)

        def stop() -> None:
            for listeners in lists:
                if entry in listeners:
                    listeners.remove(entry)

        return stop

    def relay(self, event: Relayed) -> None:
        """An event from another gateway of the fleet: only for the listeners that asked for those."""
        for kinds, callback in self._relayed:
            if kinds is None or event.kind in kinds:
                try:
                    callback(event)
                except Exception:
                    log.exception("event listener %r failed on a relayed %s", callback, event.kind)

    def publish(self, event: Event) -> None:
        self.published += 1
        if self.gateway is not None and event.gateway is None:
            event.gateway = self.gateway
        for kinds, callback in self._listeners:
            if kinds is None or event.kind in kinds:
                try:
                    callback(event)
                except Exception:  # a broken counter must not fail the request that published
                    log.exception("event listener %r failed on %s", callback, event.kind)
        for subscription in self._subscribers:
            subscription.offer(event)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def watched(self) -> bool:
        """Something here wants the other gateways' events (an event stream's log): the fleet should relay them."""
        return bool(self._relayed)


class SubscriberLagged(Exception):
    """The reader's next event has already left the log: it fell too far behind."""


class LogReader:
    """One reader's place in an `EventLog`: the sequence number of the next event it takes."""

    __slots__ = ("cursor", "kinds", "on_lag", "lagged")

    def __init__(self, cursor: int, kinds: frozenset[str] | None, on_lag: Callable[[], None] | None) -> None:
        self.cursor = cursor
        self.kinds = kinds
        self.on_lag = on_lag
        self.lagged = False


class EventLog:
    """The recent events, once, for many readers: bounded by `max_events` and by `max_bytes`
    (each event weighs `size(event)`), so one reader's lag costs nothing the others do not share.

    Publishing costs the same for one reader or a thousand: an append, and waking the readers
    waiting at that moment (each then takes everything new in one read). A reader stuck
    elsewhere, such as a write to a client that stopped reading, is found by a sweep at most
    once a second; its `on_lag` is called once.
    """

    SWEEP_S = 1.0

    def __init__(self, bus: "EventBus", *, max_events: int, max_bytes: int, size: Callable[[Event], int]) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._size = size
        self._events: deque[tuple[Event, int]] = deque()
        self.first = 0  # the sequence number of the oldest event held
        self.bytes = 0
        self.readers: set[LogReader] = set()
        self._changed: asyncio.Future[None] | None = None
        self._swept = time.monotonic()
        self._sweeping: asyncio.TimerHandle | None = None  # a sweep due after the last events
        self._stop = bus.listen(self._append, relayed=True)

    @property
    def end(self) -> int:
        """The sequence number the next event will get."""
        return self.first + len(self._events)

    def reader(self, kinds: set[str] | None = None, on_lag: Callable[[], None] | None = None) -> LogReader:
        """A reader from the next event on; `forget` it when done."""
        reader = LogReader(self.end, frozenset(kinds) if kinds else None, on_lag)
        self.readers.add(reader)
        return reader

    def forget(self, reader: LogReader) -> None:
        self.readers.discard(reader)

    def close(self) -> None:
        self._stop()
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None

    def _append(self, event: Event) -> None:
        weight = self._size(event)
        self._events.append((event, weight))
        self.bytes += weight
        while len(self._events) > self.max_events or (self.bytes > self.max_bytes and len(self._events) > 1):
            self.bytes -= self._events.popleft()[1]
            self.first += 1
        if self._changed is not None:
            if not self._changed.done():
                self._changed.set_result(None)
            self._changed = None
        now = time.monotonic()
        if now - self._swept >= self.SWEEP_S:
            self._sweep(now)
        elif self._sweeping is None and self.readers:
            # A reader may leave the log with these last events and no more may come: look again when due.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # published outside a loop: the next event's sweep finds it
                return
            self._sweeping = loop.call_later(self._swept + self.SWEEP_S - now, self._sweep_due)

    def _sweep_due(self) -> None:
        self._sweeping = None
        self._sweep(time.monotonic())

    def _sweep(self, now: float) -> None:
        self._swept = now
        for reader in [r for r in self.readers if r.cursor < self.first and not r.lagged]:
            self._lag(reader)

    def _lag(self, reader: LogReader) -> None:
        reader.lagged = True
        if reader.on_lag is not None:
            reader.on_lag()

    async def wait(self, reader: LogReader, timeout: float) -> bool:
        """Until there is something past the reader's place (True) or `timeout` passes (False)."""
        if reader.cursor < self.end:
            return True
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        # asyncio.wait, not await: one reader's cancellation must not cancel the future the others wait on.
        done, _ = await asyncio.wait((self._changed,), timeout=timeout)
        return bool(done)

    def read(self, reader: LogReader, max_bytes: int) -> list[Event]:
        """The reader's events from its place on, about `max_bytes` of them; SubscriberLagged if
        its place has left the log."""
        if reader.cursor < self.first:
            if not reader.lagged:
                self._lag(reader)
            raise SubscriberLagged
        out: list[Event] = []
        taken = 0
        kinds = reader.kinds
        cursor = reader.cursor
        for event, weight in itertools.islice(self._events, cursor - self.first, None):
            if taken >= max_bytes:
                break
            cursor += 1
            if kinds is None or event.kind in kinds:
                out.append(event)
                taken += weight
        reader.cursor = cursor
        return out
