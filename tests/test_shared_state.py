"""State gateways share through the database: budgets, rate windows, the fleet bus; two stores on one file
stand for two processes (tests/test_fleet.py runs real ones), and the PostgreSQL bus runs on a real server.

Each test takes its database from `store_url`, on either engine.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from p402_tui.core.events import EventBus, SpendUpdated
from p402_tui.core.health import HealthTracker
from p402_tui.fleet.bus import KEEP_S, StoreBus
from p402_tui.fleet.link import FleetLink
from p402_tui.store import shared
from p402_tui.store.engine import open_store


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "shared.db")


@pytest.fixture
async def two_stores(store_url):
    a = await open_store(store_url)
    b = await open_store(store_url)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_two_processes_never_reserve_past_one_budget_together(two_stores):
    a, b = two_stores
    scope = "session:ses-000000000001"
    attempts = [a if i % 2 else b for i in range(100)]
    results = await asyncio.gather(
        *(shared.reserve(store, scope, 0.0, 0.25, 10.0, f"req-{i}") for i, store in enumerate(attempts))
    )
    holds = [hold for hold, _ in results if hold is not None]
    assert len(holds) == 40  # $10 at $0.25 each, whichever process asked
    assert all(spent >= 9.75 for hold, spent in results if hold is None)
    await a.flush()
    await b.flush()
    assert await a.scalar("SELECT COUNT(*) FROM budget_holds") == 40
    for i, hold in enumerate(holds):
        shared.settle(a if i % 2 else b, hold, 0.125)  # the real cost, below the estimate
    await a.flush()
    await b.flush()
    assert await shared.usage(a, scope, 0.0) == (5.0, 0.0)
    assert await a.scalar("SELECT COUNT(*) FROM budget_holds") == 0
    more = await asyncio.gather(*(shared.reserve(b, scope, 0.0, 0.25, 10.0, f"again-{i}") for i in range(30)))
    assert sum(1 for hold, _ in more if hold is not None) == 20  # what the settling gave back


async def test_a_counter_starts_from_the_ledger_and_a_dead_process_holds_are_reclaimed(two_stores):
    a, b = two_stores
    now = time.time()
    for i in range(3):  # spent before the counter existed
        await a.run("INSERT INTO requests (id, ts, api_key_id, cost_usd, status) VALUES (?, ?, 'k1', 1.0, 'ok')",
                    (f"old-{i}", now))
    hold, _ = await shared.reserve(a, "key:k1", now - 10, 1.5, 5.0, "r1")
    assert hold is not None and await shared.usage(b, "key:k1", now - 10) == (3.0, 1.5)
    refused, spent = await shared.reserve(b, "key:k1", now - 10, 1.0, 5.0, "r2")
    assert refused is None and spent == pytest.approx(4.5)
    # The process holding r1 dies: its hold expires and any process gives the reservation back.
    await a.run("UPDATE budget_holds SET expires = ? WHERE id = ?", (now - 1, hold.id))
    shared.reclaim(b)
    await b.flush()
    assert await shared.usage(a, "key:k1", now - 10) == (3.0, 0.0)
    assert await a.scalar("SELECT COUNT(*) FROM budget_holds") == 0
    shared.settle(a, hold, 1.2)  # it was alive after all: its cost counts, its reservation is not taken twice
    await a.flush()
    assert await shared.usage(b, "key:k1", now - 10) == (pytest.approx(4.2), 0.0)
    shared.forget(a, "key:k1")  # its budget changed: made again from the ledger next time
    await a.flush()
    assert await shared.usage(b, "key:k1", now - 10) is None


async def test_two_processes_share_one_rate_window(two_stores):
    a, b = two_stores
    now = time.time()
    taken = await asyncio.gather(
        *(shared.take(a if i % 2 else b, "key:k2", now, requests=1, rpm=20) for i in range(50))
    )
    assert sum(1 for ok, _ in taken if ok) == 20
    ok, window = await shared.take(a, "key:k2", now + 1, requests=1, rpm=20)
    assert not ok and window.requests == 20 and window.reset_in(now + 1) == pytest.approx(59.0)
    ok, window = await shared.take(b, "key:k2", now + 61, requests=1, rpm=20)  # a minute on: a new window
    assert ok and window.requests == 1 and window.start == now + 61
    ok, window = await shared.take(a, "key:k2", now + 62, tokens=300, tpm=500)
    assert ok and window.tokens == 300
    ok, _ = await shared.take(b, "key:k2", now + 62, tokens=300, tpm=500)
    assert not ok
    shared.retoken(a, "key:k2", window.start, -250)  # the real count was 50
    await a.flush()
    ok, window = await shared.take(b, "key:k2", now + 63, tokens=300, tpm=500)
    assert ok and window.tokens == 350


async def test_a_request_the_window_takes_costs_one_round_trip_and_reads_the_window_it_left(two_stores):
    a, b = two_stores
    reads = []
    fetchone = a.fetchone

    async def counted(sql, params=()):
        reads.append(sql)
        return await fetchone(sql, params)

    a.fetchone = counted
    now = time.time()
    await shared.take(b, "key:k3", now, requests=1, rpm=3)  # another process's request, in the same window
    ok, window = await shared.take(a, "key:k3", now + 1, requests=1, rpm=3, tokens=40)
    assert ok and (window.start, window.requests, window.tokens) == (now, 2, 40)
    assert reads == []  # the take returned the window: no second trip to read it
    await shared.take(b, "key:k3", now + 2, requests=1, rpm=3)
    ok, window = await shared.take(a, "key:k3", now + 3, requests=1, rpm=3)
    assert not ok and window.requests == 3 and len(reads) == 1  # refused: the window is read as it stands


async def test_the_store_bus_carries_messages_between_processes_within_a_second(two_stores):
    a, b = two_stores
    if a.engine == "postgresql":
        pytest.skip("the store bus is SQLite's; on PostgreSQL the fleet uses LISTEN/NOTIFY (the next test)")
    bus_a, bus_b = StoreBus(a, "gw-a"), StoreBus(b, "gw-b")
    heard_a: list = []
    heard_b: list = []
    bus_a.subscribe(heard_a.append)
    bus_b.subscribe(heard_b.append)
    await bus_a.start()
    await bus_b.start()
    try:
        sent = time.monotonic()
        bus_a.publish("gate", {"target": "openai", "n": 1})
        while not heard_b and time.monotonic() - sent < 2:
            await asyncio.sleep(0.01)
        assert time.monotonic() - sent < 1.0
        assert [(m.gateway, m.kind, m.payload) for m in heard_b] == [("gw-a", "gate", {"target": "openai", "n": 1})]
        await asyncio.sleep(0.3)
        assert heard_a == []  # a gateway never hears itself
        twin = StoreBus(b, "gw-a")  # another worker under the same name is another gateway all the same
        heard_twin: list = []
        twin.subscribe(heard_twin.append)
        await twin.start()
        bus_a.publish("cache", {"n": 2})
        await asyncio.sleep(0.5)
        await twin.aclose()
        assert [(m.gateway, m.payload) for m in heard_twin] == [("gw-a", {"n": 2})]
    finally:
        await bus_a.aclose()
        await bus_b.aclose()
    # Pruning keeps the newest row, so numbering never restarts behind a reader's cursor.
    await a.run("UPDATE fleet_messages SET ts = ?", (time.time() - KEEP_S - 1,))
    a.put("DELETE FROM fleet_messages WHERE ts < ? AND id < (SELECT MAX(id) FROM fleet_messages)", (time.time(),))
    await a.flush()
    assert await a.scalar("SELECT COUNT(*) FROM fleet_messages") == 1


async def test_the_postgres_bus_carries_messages_between_connections(pg_url):
    from p402_tui.fleet.postgres import PostgresBus

    bus_a, bus_b = PostgresBus(pg_url, "gw-a"), PostgresBus(pg_url, "gw-b")
    heard_a: list = []
    heard_b: list = []
    bus_a.subscribe(heard_a.append)
    bus_b.subscribe(heard_b.append)
    await bus_a.start()
    await bus_b.start()
    try:
        sent = time.monotonic()
        for n in range(20):
            bus_a.publish("event", {"n": n})
        bus_a.publish("event", {"big": "x" * 9000})  # over NOTIFY's limit: dropped, not sent
        while len(heard_b) < 20 and time.monotonic() - sent < 3:
            await asyncio.sleep(0.01)
        assert time.monotonic() - sent < 1.0
        assert [m.payload["n"] for m in heard_b] == list(range(20)) and {m.gateway for m in heard_b} == {"gw-a"}
        assert bus_a.dropped == 1
        await asyncio.sleep(0.2)
        assert heard_a == [] and len(heard_b) == 20
    finally:
        await bus_a.aclose()
        await bus_b.aclose()


def test_health_holds_what_another_gateway_ejected_or_throttled():
    changes: list = []
    here = HealthTracker(on_change=changes.append)
    told: list = []
    there = HealthTracker()
    there.on_gate = told.append
    for _ in range(3):
        there.record_failure("openai", "openai/gpt-4o-mini", "rate_limited")
    assert told and told[-1]["kind"] == "throttle" and told[-1]["target"] == "openai/gpt-4o-mini"
    gate = told[-1]
    here.apply_remote(gate["scope"], gate["target"], gate["kind"], gate["until"], gate["reason"], "gw-a")
    assert here.blocked("openai", "openai/gpt-4o-mini") and not here.blocked("openai", "openai/gpt-4o")
    assert "from gw-a" in here.provider("openai").reason  # each gateway shows the fleet's view
    here.apply_remote("provider", "anthropic", "eject", time.time() + 5, "error rate 80%", "gw-a")
    assert here.circuit("anthropic") == "open" and here.blocked("anthropic")
    assert changes and changes[-1]["circuit"] == "open"
    here.apply_remote("provider", "gemini", "eject", time.time() - 1, "long over", "gw-a")
    assert not here.blocked("gemini")


async def test_an_entry_cached_in_one_process_is_adopted_with_its_vector_by_another(two_stores):
    from test_cache import ask, remember

    from p402_tui.cache.embedders import load_embedder
    from p402_tui.cache.semantic import SemanticCache

    embedder, _ = load_embedder("minilm")
    a, b = two_stores
    here, there = SemanticCache(a, embedder=embedder), SemanticCache(b, embedder=embedder)
    await here.ready()
    await there.ready()  # loaded before the entry existed: only the bus can tell it
    told: list = []
    here.on_insert = lambda namespace, key: told.append((namespace, key))
    await remember(here, ask("How do I undo the last git commit?"), "git reset --soft HEAD~1")
    await a.flush()
    assert len(told) == 1
    assert await there.adopt(*told[0])
    exact = await there.lookup(ask("How do I undo the last git commit?"), None, "default", request_id="x")
    close = await there.lookup(ask("How can I undo my most recent git commit?"), None, "default", request_id="y")
    assert exact.match == "exact" and close.match == "semantic"  # the vector came with it, from the store
    assert close.response.content == "git reset --soft HEAD~1" and there.info()["indexed"] == 1
    assert not await there.adopt("default", "no-such-key")


async def test_events_cross_the_fleet_only_while_another_gateway_watches(two_stores):
    a, b = two_stores
    if a.engine == "postgresql":
        pytest.skip("the link is the same on either bus; this one runs on the store's table")
    events_a, events_b = EventBus(), EventBus()
    link_a = FleetLink(StoreBus(a, "gw-a"), events_a, HealthTracker())
    link_b = FleetLink(StoreBus(b, "gw-b"), events_b, HealthTracker())
    await link_a.start()
    await link_b.start()
    heard: list = []
    try:
        for n in range(5):  # nobody watches gw-b: gw-a writes none of its events to the bus
            events_a.publish(SpendUpdated(provider="openai", model="m", cost_usd=float(n)))
        await asyncio.sleep(0.6)
        assert link_a.bus.sent == 0 and not link_a.watched

        stop = events_b.listen(heard.append, relayed=True)  # what an event stream's log does
        watched_at = time.monotonic()
        while not link_a.watched:
            assert time.monotonic() - watched_at < 1.0, "gw-a was not told within a second"
            await asyncio.sleep(0.02)
        events_a.publish(SpendUpdated(provider="openai", model="m", cost_usd=9.0))
        while not heard and time.monotonic() - watched_at < 3:
            await asyncio.sleep(0.02)
        assert [(e.kind, e.wire()["gateway"], e.wire()["cost_usd"]) for e in heard] == [("spend_updated", "gw-a", 9.0)]

        stop()  # the watcher leaves: once its last word runs out, events stay home again
        link_a._watched_until = 0.0  # as if WATCHED_FOR_S had passed
        sent = link_a.bus.sent
        events_a.publish(SpendUpdated(provider="openai", model="m", cost_usd=10.0))
        assert link_a.bus.sent == sent
    finally:
        await link_a.aclose()
        await link_b.aclose()
