"""The event bus: bounded queues that drop the oldest, publishing that never waits."""

from __future__ import annotations

import asyncio
import time

import pytest

from p402_tui.core.events import (
    AttemptFailed,
    CacheHit,
    EventBus,
    EventLog,
    HealthChanged,
    SpendUpdated,
    SubscriberLagged,
)


def spend(i: int) -> SpendUpdated:
    return SpendUpdated(provider="groq", model="m", cost_usd=float(i))


def test_a_full_queue_drops_its_oldest_events_and_counts_them():
    bus = EventBus()
    slow = bus.subscribe(maxsize=10)
    for i in range(25):
        bus.publish(spend(i))
    assert slow.dropped == 15
    assert [e.cost_usd for e in slow.drain()] == [float(i) for i in range(15, 25)]
    assert bus.published == 25


def test_publish_never_blocks_on_a_subscriber_that_never_reads():
    bus = EventBus()
    stalled = [bus.subscribe(maxsize=100) for _ in range(3)]
    started = time.perf_counter()
    for i in range(20_000):
        bus.publish(spend(i))
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0  # no waiting: 60k offers on a shared CI machine
    assert all(s.dropped == 20_000 - 100 for s in stalled)


def test_each_subscriber_has_its_own_queue_and_kind_filter():
    bus = EventBus()
    everything = bus.subscribe()
    health_only = bus.subscribe(kinds={"health_changed"})
    bus.publish(spend(1))
    bus.publish(HealthChanged(provider="groq", status="down", previous="healthy", circuit="open"))
    assert [e.kind for e in everything.drain()] == ["spend_updated", "health_changed"]
    assert [e.kind for e in health_only.drain()] == ["health_changed"]
    assert health_only.dropped == 0


def test_a_listener_sees_every_event_of_its_kinds_as_it_is_published(caplog):
    bus = EventBus()
    seen: list[float] = []
    stop = bus.listen(lambda event: seen.append(event.cost_usd), kinds={"spend_updated"})

    def broken(event) -> None:
        raise RuntimeError("a bug in a counter")

    bus.listen(broken)
    subscriber = bus.subscribe()
    for i in range(3):
        bus.publish(spend(i))  # the broken listener is logged; the others, and the publisher, go on
    bus.publish(HealthChanged(provider="groq", status="down", previous="healthy"))
    assert seen == [0.0, 1.0, 2.0]
    assert len(subscriber.drain()) == 4
    assert "a bug in a counter" in caplog.text
    stop()
    bus.publish(spend(9))
    assert seen == [0.0, 1.0, 2.0]


async def test_async_subscribers_receive_in_order_and_can_leave():
    bus = EventBus()
    received: list[str] = []

    async def listen(subscription) -> None:
        async for event in subscription:
            received.append(event.request_id)
            if len(received) == 3:
                return

    with bus.subscribe() as subscription:
        task = asyncio.create_task(listen(subscription))
        for i in range(3):
            bus.publish(CacheHit(request_id=f"r{i}", match="exact", similarity=1.0, saved_usd=0.01))
        await asyncio.wait_for(task, 2)
        assert bus.subscribers == 1
    assert received == ["r0", "r1", "r2"]
    assert bus.subscribers == 0
    bus.publish(spend(0))  # nobody listening: fine


def test_events_serialise_with_their_kind():
    event = AttemptFailed(
        request_id="r1", decision_id="d1", provider="groq", model="m", error_kind="server_error", error="503", will_retry=True
    )
    data = event.to_dict()
    assert data["kind"] == "attempt_failed" and data["will_retry"] is True and data["ts"] > 0


async def test_an_event_log_is_shared_bounded_and_says_who_lagged(monkeypatch):
    bus = EventBus()
    log = EventLog(bus, max_events=100, max_bytes=250, size=lambda event: 10)
    lagged = []
    fast, slow = log.reader(on_lag=lambda: lagged.append("fast")), log.reader(on_lag=lambda: lagged.append("slow"))
    spends = log.reader(kinds={"spend_updated"})
    waiting = asyncio.ensure_future(log.wait(fast, timeout=5))
    await asyncio.sleep(0)
    bus.publish(spend(0))
    assert await waiting
    bus.publish(HealthChanged(provider="p", status="down", previous="healthy"))
    assert [e.kind for e in log.read(fast, max_bytes=1000)] == ["spend_updated", "health_changed"]
    assert [e.cost_usd for e in log.read(spends, max_bytes=1000)] == [0]
    for i in range(1, 21):  # 22 events in all: the log holds 25
        bus.publish(spend(i))
    assert len(log.read(fast, max_bytes=50)) == 5  # a piece at a time
    assert len(log.read(fast, max_bytes=1000)) == 15
    for i in range(21, 40):  # 41 events of 10 bytes: the log keeps the last 25
        bus.publish(spend(i))
    assert log.end - log.first == 25 and log.bytes == 250
    assert [e.cost_usd for e in log.read(fast, max_bytes=1000)] == list(range(21, 40))
    with pytest.raises(SubscriberLagged):
        log.read(slow, max_bytes=1000)  # its next event left the log
    assert lagged == ["slow"]
    assert not await log.wait(fast, timeout=0.01)  # nothing new: the heartbeat's turn
    log.forget(fast)
    monkeypatch.setattr(EventLog, "SWEEP_S", 0.0)
    log.reader(on_lag=lambda: lagged.append("stuck"))  # never reads, like a stream blocked in a write
    for i in range(30):
        bus.publish(spend(i))
    assert lagged == ["slow", "stuck"]  # found by the sweep, told once
    log.close()
    end = log.end
    bus.publish(spend(99))
    assert log.end == end  # closed: no longer listening


async def test_a_reader_that_leaves_the_log_with_the_last_events_is_found_without_more(monkeypatch):
    monkeypatch.setattr(EventLog, "SWEEP_S", 0.5)  # long enough that the publishes below all come before it
    bus = EventBus()
    log = EventLog(bus, max_events=5, max_bytes=1000, size=lambda event: 10)
    lagged = []
    log.reader(on_lag=lambda: lagged.append("stuck"))  # never reads, like a stream blocked in a write
    for i in range(10):  # within one sweep's interval: it leaves the log, and nothing is published after
        bus.publish(spend(i))
    assert lagged == []
    await asyncio.sleep(1.0)
    assert lagged == ["stuck"]  # cut off by the sweep that was due, not left until some later event
    log.close()
