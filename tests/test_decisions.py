"""A stored router decision is a fact: it reads back as it was made, whatever the ranking or the prices are now."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from conftest import ENGINES, open_engine_store

from conftest import run_cli
from p402_tui.core import router as router_module
from p402_tui.core.catalog import load_catalog
from p402_tui.core.config import CacheConfig, ConfigFile, Settings
from p402_tui.core.events import RouteDecided
from p402_tui.core.health import HealthTracker
from p402_tui.core.hooks import RouteOptions
from p402_tui.core.router import RouteDecision, Router
from p402_tui.core.types import ChatRequest
from p402_tui.runtime import Runtime
from p402_tui.store import decisions as decisions_codec
from p402_tui.store import queries
from p402_tui.persistence import Persistence
from p402_tui.store.store import Store
from p402_tui.tui.attach import open_remote
from p402_tui.tui.source import LocalSource

OPTIONS = [
    ({}, None),
    ({"max_cost_usd": 1e-5, "prefer": ["groq"]}, 16),
    ({"require": ["vision"], "exclude": ["openai"], "failover": False}, 200_000),
    ({"model": "openai/gpt-4o-mini"}, 16),
    ({"model": "openai/gpt-4o-mini", "max_cost_usd": 1e-9}, 16),  # the pin filtered out: nothing chosen
]


@pytest.fixture(params=ENGINES)
async def store(request, tmp_path):
    async with await open_engine_store(request, tmp_path / "p402.db") as opened:
        yield opened


async def stored(store, *decisions):
    persistence = Persistence(store)
    for decision in decisions:
        persistence.decided(decision)
    await store.flush()
    return [await queries.get_decision(store, d.id) for d in decisions]


def text(data) -> str:
    return json.dumps(data)  # same keys, order and float digits


@pytest.mark.parametrize("mode", ["cost", "quality", "speed", "balanced", "adaptive"])
async def test_every_mode_and_filter_reads_back_as_routed(store, mode):
    router = Router(load_catalog())
    request = ChatRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    decisions = [
        router.route(request.model_copy(update={"max_tokens": max_tokens}), RouteOptions.from_dict({"mode": mode, **options}))
        for options, max_tokens in OPTIONS
    ]
    for decision, read in zip(decisions, await stored(store, *decisions)):
        assert text(read) == text(decision.to_dict())


@pytest.mark.parametrize("mode", ["cost", "quality", "speed", "balanced", "adaptive"])
def test_a_decisions_brief_counts_as_its_stored_row(mode, monkeypatch):
    """An event stream's brief is made from `columns()`, before the writer snapshots the decision (with others
    of its option set, `router.snapshots`): the same columns as the row stored, and the snapshots unchanged."""
    router = Router(load_catalog())
    option_sets = [*OPTIONS, ({"model": "openai/gpt-4o-mini", "require": ["vision"]}, 16),
                   ({"model": "groq/llama-3.1-8b-instant", "max_cost_usd": 1e-9}, 200_000)]  # fmt: skip
    decisions = [
        router.route(ChatRequest(messages=[{"role": "user", "content": "word " * words}], max_tokens=max_tokens),
                     RouteOptions.from_dict({"mode": mode, **options}))
        for options, max_tokens in option_sets
        for words in (1, 1, 40_000)  # the last too long for most context windows
    ]  # fmt: skip
    briefs = [decision.columns() for decision in decisions]
    together = []
    snapshot_rows = router_module._snapshot_rows
    monkeypatch.setattr(router_module, "_snapshot_rows", lambda ds: together.append(len(ds)) or snapshot_rows(ds))
    batched = router_module.snapshots(decisions)
    filtered = chosen = 0
    for decision, brief, snapshot in zip(decisions, briefs, batched):
        row, _ = queries.decision_rows(decision, snapshot)
        assert brief == {"id": row[0], "ts": row[1], "mode": row[2], "chosen": row[3], "est_cost_usd": row[7],
                         "candidates": row[10], "excluded": row[11]}  # fmt: skip
        filtered += bool(snapshot.filtered)
        chosen += snapshot.chosen
        read_back = RouteDecision.from_dict(decision.to_dict())  # no ranking: counted from its snapshot
        assert [read_back.columns()[k] for k in ("chosen", "candidates", "excluded")] == [
            brief[k] for k in ("chosen", "candidates", "excluded")]
        assert decisions_codec.encode(snapshot) == decisions_codec.encode(decision.snapshot())
    assert filtered and chosen and chosen < len(decisions)  # request filters, and nothing chosen, both seen
    if mode in ("balanced", "adaptive"):  # briefed first, pinned decisions are still snapshot together
        assert together


@pytest.mark.parametrize("mode", ["speed", "adaptive"])
async def test_decisions_under_live_health_read_back_as_routed(store, mode, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    health = HealthTracker()
    router = Router(load_catalog(), health=health)
    request = ChatRequest(messages=[{"role": "user", "content": "hello " * 300}], max_tokens=400)
    before = router.route(request, RouteOptions(mode=mode))
    for provider, model_id, latency_ms in (("groq", "groq/llama-3.1-8b-instant", 90), ("openai", "openai/gpt-4o-mini", 2400)):
        for _ in range(5):
            health.record_success(provider, model_id, latency_ms=latency_ms, ttft_ms=latency_ms / 4, output_tokens=200)
    health.record_failure("mistral", "mistral/mistral-small-latest", "server_error")
    now[0] += router_module.LIVE_FOLD_S
    after = router.route(request, RouteOptions(mode=mode))
    assert text(before.to_dict()["candidates"]) != text(after.to_dict()["candidates"])
    for decision, read in zip((before, after), await stored(store, before, after)):
        assert text(read) == text(decision.to_dict())
    assert await store.scalar("SELECT COUNT(*) FROM decision_vectors") == 2  # one set of live figures each


async def test_the_codec_remembers_a_few_recent_parts_not_hundreds(store, monkeypatch):
    # Each change of health makes new live figures, kept alive while the codec remembers their part:
    # 256 of those held 1.1 MB. Decisions are encoded in order, so the last few find every repeat.
    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    health = HealthTracker()
    router = Router(load_catalog(), health=health)
    request = ChatRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    decisions = []
    for i in range(3 * decisions_codec.ENCODED_PARTS):
        health.record_success("groq", "groq/llama-3.1-8b-instant", latency_ms=90 + 10 * i, ttft_ms=20, output_tokens=200)
        now[0] += router_module.LIVE_FOLD_S
        decisions += [router.route(request, RouteOptions(mode="speed")) for _ in range(2)]
    for decision, read in zip(decisions, await stored(store, *decisions)):
        assert text(read) == text(decision.to_dict())
    assert len(decisions_codec._encoded) <= decisions_codec.ENCODED_PARTS
    # One set of live figures per change of health, shared by the two decisions made under it.
    assert await store.scalar("SELECT COUNT(*) FROM decision_vectors") == len(decisions) // 2


async def test_a_new_ranking_function_leaves_stored_decisions_as_they_were(store, monkeypatch):
    router = Router(load_catalog())
    request = ChatRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    decision = router.route(request, RouteOptions(mode="balanced"))
    routed = decision.to_dict()
    await stored(store, decision)

    def reversed_key(*args, **kwargs):
        return -original(*args, **kwargs)

    original = router_module._sort_key
    monkeypatch.setattr(router_module, "_sort_key", reversed_key)
    monkeypatch.setattr(router_module, "_score", lambda *args: np.zeros(len(args[2])))
    reranked = Router(load_catalog()).route(request, RouteOptions(mode="balanced"))
    assert reranked.to_dict()["chosen"]["id"] != routed["chosen"]["id"]  # the new ranking does differ
    assert text(await queries.get_decision(store, decision.id)) == text(routed)


async def test_a_new_price_leaves_stored_decisions_as_they_were(store, tmp_path):
    request = ChatRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    decision = Router(load_catalog()).route(request, RouteOptions(mode="cost"))
    routed = decision.to_dict()
    await stored(store, decision)
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"models": {routed["chosen"]["id"]: {"input_per_1m": 90.0, "output_per_1m": 90.0}}}))
    repriced = Router(load_catalog(overrides_path=overrides)).route(request, RouteOptions(mode="cost"))
    assert repriced.to_dict()["chosen"]["id"] != routed["chosen"]["id"]
    assert text(await queries.get_decision(store, decision.id)) == text(routed)


async def test_a_record_is_compact_and_shares_its_listing(store):
    router = Router(load_catalog())
    request = ChatRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    first, second = router.route(request), router.route(request.model_copy(update={"max_tokens": 32}))
    await stored(store, first, second)
    assert await store.scalar("SELECT COUNT(*) FROM decision_models") == 1  # the option set's listing, once
    own = await store.scalar(f"SELECT length(decision) FROM router_decisions WHERE id = '{first.id}'")
    whole = len(text(first.to_dict()))
    assert own < 600 + 26 * len(first.candidates) < whole / 10


async def test_a_decision_routed_then_repriced_reads_back_whole_in_the_cli_the_gateway_and_the_console(
    sim, catalog, tmp_path
):
    db = tmp_path / "p402.db"
    overrides = tmp_path / "overrides.json"

    def settings(with_catalog):
        return Settings(ConfigFile(cache=CacheConfig(enabled=False)), with_catalog, env={}).point_at(sim.url)

    request = ChatRequest(messages=[{"role": "user", "content": "Which model is cheapest?"}], max_tokens=16)
    body = {**request.model_dump(mode="json", exclude_none=True), "p402": {"mode": "cost"}}
    async with Runtime.open(settings(catalog), db_path=db) as runtime:
        decided = runtime.bus.subscribe(kinds={RouteDecided.kind})
        gateway = await runtime.serve_gateway("127.0.0.1", 0)
        async with open_remote(gateway.url, None) as attached:  # `p402 console --attach`, live
            await attached.client.wait_until_up()
            async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
                answer = (await http.post("/v1/chat/completions", json=body)).json()
            routed = json.loads(json.dumps((await decided.get()).decision.to_dict()))  # as the events stream sends it
            assert answer["p402"]["decision_id"] == routed["id"]
            for _ in range(500):
                if routed["id"] in attached.client.decisions:
                    break
                await asyncio.sleep(0.02)
            heard = attached.client.decisions[routed["id"]]  # the event stream's brief; the whole one comes by id
            assert (heard.id, heard.chosen) == (routed["id"], routed["chosen"]["id"])
            assert await attached.decision(routed["id"]) == routed
        await gateway.stop()
        await runtime.store.flush()

    chosen = routed["chosen"]["id"]
    overrides.write_text(json.dumps({"models": {chosen: {"input_per_1m": 90.0, "output_per_1m": 90.0}}}))
    repriced = load_catalog(overrides_path=overrides)
    assert Router(repriced).route(request, RouteOptions(mode="cost")).chosen_id != chosen

    async with Runtime.open(settings(repriced), db_path=db) as runtime:
        assert await LocalSource(runtime).decision(routed["id"]) == routed
        gateway = await runtime.serve_gateway("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
                served = (await http.get(f"/api/v2/decisions/{routed['id']}")).json()
            async with open_remote(gateway.url, None) as attached:  # attached after the fact: read from the gateway
                assert routed["id"] not in attached.client.decisions
                assert await attached.decision(routed["id"]) == routed
        finally:
            await gateway.stop()
    assert served == routed
    assert RouteDecision.from_dict(served).chosen_id == chosen  # what the CLI's table and the console's detail read

    shown = run_cli("decisions", "show", routed["id"], "--db", str(db), "--json",
                    env={"P402_CATALOG_OVERRIDES": str(overrides)})  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == routed
    table = run_cli("decisions", "show", routed["id"], "--db", str(db), env={"P402_CATALOG_OVERRIDES": str(overrides)})
    assert table.returncode == 0 and chosen in table.stdout
    missing = run_cli("decisions", "show", "dec-nope", "--db", str(db))
    assert missing.returncode != 0 and "no decision 'dec-nope'" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("mode", ["balanced", "adaptive"])
async def test_decisions_snapshot_together_are_the_same_to_the_bit_and_read_back_as_routed(store, mode, monkeypatch):
    """The writer snapshots the decisions it takes together (`router.snapshots`), a row of one array each:
    pinned ones and unpinned ones, prompts and answers of every size, a price range of one model."""
    router = Router(load_catalog())
    option_sets = [{}, {"model": "openai/gpt-4o-mini"}, {"prefer": ["groq"], "model": "openai/gpt-4o-mini"},
                   {"require": ["vision"], "exclude": ["openai"]}]  # fmt: skip
    decisions = [
        router.route(
            ChatRequest(messages=[{"role": "user", "content": "word " * (1 + 997 * i % 4000)}], max_tokens=max_tokens),
            RouteOptions.from_dict({"mode": mode, **options}),
        )
        for options in option_sets
        for i, max_tokens in enumerate([16, 16, 200, None, 4096, 16, None, 32])
    ]
    rows = []
    together_rows = router_module._snapshot_rows
    monkeypatch.setattr(router_module, "_snapshot_rows", lambda ds: rows.append(len(ds)) or together_rows(ds))
    together = router_module.snapshots(decisions)
    # the pinned ones of one answer length (16: 3, the default: 2); an unpinned one's key was made as it was routed
    assert sorted(rows) == [2, 2, 3, 3]
    for decision, snapshot in zip(decisions, together):
        assert decisions_codec.encode(snapshot) == decisions_codec.encode(decision.snapshot())
    rows.clear()
    fresh = [router.route(ChatRequest(messages=[{"role": "user", "content": "hi"}]), d.options) for d in decisions]
    for decision, read in zip(fresh, await stored(store, *fresh)):
        assert text(read) == text(decision.to_dict())
    assert rows == [8, 8]  # the writer took them together
