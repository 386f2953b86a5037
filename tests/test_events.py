"""The event bus: bounded queues that drop the oldest, publishing that never waits."""

from __future__ import annotations

import asyncio
import time

from p402_tui.core.events import AttemptFailed, CacheHit, EventBus, HealthChanged, SpendUpdated


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
