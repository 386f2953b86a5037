"""Spend analytics and recommendations on a seeded ledger, checked against numbers computed here by hand."""

from __future__ import annotations

import math
import time
from datetime import datetime

import pytest
from conftest import ENGINES, open_engine_store

from p402_tui.core.hooks import RequestRecord
from p402_tui.core.types import Attempt
from p402_tui.store import queries
from p402_tui.store.analytics import PeriodError, parse_period, recommendations, spend
from p402_tui.store.sessions import create_session
from p402_tui.store.store import Store

NOW = time.time()
DAY = 86400.0


@pytest.fixture(params=ENGINES)
async def store(request, tmp_path):
    opened = await open_engine_store(request, tmp_path / "analytics.db")
    try:
        yield opened
    finally:
        await opened.aclose()


def put(store: Store, rid: str, *, needs: str = "chat", prompt_key: str | None = None, **fields) -> None:
    record = RequestRecord(id=rid, **fields)
    store.put_later(lambda: queries.ledger_writes(record, needs=needs, prompt_key=prompt_key or rid))


# --- periods -----------------------------------------------------------------------------------


def test_periods():
    now = datetime(2026, 3, 15, 13, 30).timestamp()
    assert parse_period("today", now=now).start == datetime(2026, 3, 15).timestamp()
    assert parse_period("7d", now=now).start == now - 7 * DAY
    assert parse_period(None, now=now).label == "30d"
    assert parse_period("all", now=now).start == 0
    span = parse_period(start="2026-03-01", end="2026-03-02", now=now)
    assert (span.start, span.end) == (datetime(2026, 3, 1).timestamp(), datetime(2026, 3, 3).timestamp())
    assert parse_period("2026-03-01..2026-03-02", now=now) == span
    for bad, message in (("yesterday", "unknown period"), ("0d", "unknown period"), ("2026-13-01..", "not a date"),
                         ("2026-03-05..2026-03-01", "ends")):  # fmt: skip
        with pytest.raises(PeriodError, match=message):
            parse_period(bad, now=now)
    with pytest.raises(PeriodError, match="not both"):
        parse_period("7d", start="2026-03-01")


# --- spend -------------------------------------------------------------------------------------------


async def test_spend_totals_and_every_breakdown_add_up_to_the_ledger(store):
    rows = [
        ("a", "openai", "gpt-4o", "ses-1", "nightly", 0.50, NOW - 1 * DAY),
        ("b", "openai", "gpt-4o-mini", "ses-1", None, 0.02, NOW - 2 * DAY),
        ("c", "groq", "llama-3.1-8b-instant", None, "nightly", 0.001, NOW - 3 * DAY),
        ("d", "anthropic", "claude-sonnet-4-6", "ses-2", "adhoc", 1.25, NOW - 29 * DAY),
        ("old", "openai", "gpt-4o", "ses-1", "nightly", 9.0, NOW - 40 * DAY),  # outside 30d
    ]
    for rid, provider, model, session, tag, cost, ts in rows:
        put(store, rid, provider=provider, model=model, session_id=session, tag=tag, cost_usd=cost, ts=ts)
    put(store, "hit", provider="openai", model="gpt-4o", cached=True, saved_usd=0.5, ts=NOW - DAY)
    await store.flush()

    period = parse_period("30d")
    in_period = [r for r in rows if r[6] >= period.start]
    expected_total = sum(r[5] for r in in_period)
    for by, key in (("provider", lambda r: r[1]), ("model", lambda r: f"{r[1]}/{r[2]}"),
                    ("session", lambda r: r[3] or "(none)"), ("tag", lambda r: r[4] or "(none)"),
                    ("day", lambda r: datetime.fromtimestamp(r[6]).date().isoformat())):  # fmt: skip
        report = await spend(store, period, by)
        assert math.isclose(report["total_usd"], expected_total) and report["requests"] == len(in_period) + 1
        assert math.isclose(sum(b["cost_usd"] for b in report["breakdown"]), report["total_usd"])
        assert sum(b["requests"] for b in report["breakdown"]) == report["requests"]
        by_hand: dict[str, float] = {}
        for r in in_period:
            by_hand[key(r)] = by_hand.get(key(r), 0.0) + r[5]
        got = {b["key"]: b["cost_usd"] for b in report["breakdown"]}
        assert set(by_hand) <= set(got) and all(math.isclose(got[k], v) for k, v in by_hand.items())
    report = await spend(store, period, "provider")
    assert [b["key"] for b in report["breakdown"]] == ["anthropic", "openai", "groq"]  # most expensive first
    assert report["cached"] == 1 and math.isclose(report["saved_usd"], 0.5)
    assert math.isclose((await spend(store, parse_period("all"), "provider"))["total_usd"], expected_total + 9.0)
    today = await spend(store, parse_period("today"), "day")
    assert today["requests"] == 0 or today["breakdown"][0]["key"] == datetime.now().date().isoformat()
    with pytest.raises(PeriodError, match="cannot break spend down"):
        await spend(store, period, "planet")


# --- recommendations --------------------------------------------------------------------------------


async def test_recommendations_from_a_seeded_ledger_match_the_hand_computed_savings(store, catalog):
    start = NOW - 10 * DAY  # the ledger's first request: the observed span is 10 days
    # 1. Premium traffic not routed for quality: 10 x gpt-4o, 1000 in / 500 out, chat only.
    gpt4o = catalog.models["openai/gpt-4o"]
    for i in range(10):
        put(store, f"p{i}", provider="openai", model="gpt-4o", mode="balanced", prompt_tokens=1000,
            completion_tokens=500, cost_usd=gpt4o.cost(1000, 500), ts=start + i)  # fmt: skip
    # Premium traffic routed for quality is left alone.
    put(store, "q", provider="anthropic", model="claude-opus-4-1-20250805", mode="quality", prompt_tokens=1000,
        completion_tokens=500, cost_usd=0.09, ts=start + 20)  # fmt: skip
    # 2. Repeated prompts on a budget model: k1 four times (one served by the cache), k2 twice.
    for rid, key, cached, cost in (("k1a", "k1", False, 0.001), ("k1b", "k1", False, 0.001),
                                   ("k1c", "k1", True, 0.0), ("k1d", "k1", False, 0.001),
                                   ("k2a", "k2", False, 0.002), ("k2b", "k2", False, 0.002)):  # fmt: skip
        put(store, rid, prompt_key=key, provider="groq", model="llama-3.1-8b-instant", cached=cached, cost_usd=cost,
            ts=start + 100 + len(rid) + ord(rid[-1]))  # fmt: skip
    # 3. Mistral fails 3 of its 10 attempts, each failure waited 250 ms before failing over to groq.
    for i in range(10):
        failed = i < 3
        attempts = [Attempt("mistral", "mistral-small-latest", "server_error" if failed else None, "boom" if failed else None,
                            250.0 if failed else 100.0)]  # fmt: skip
        if failed:
            attempts.append(Attempt("groq", "llama-3.1-8b-instant", None, None, 80.0))
        put(store, f"m{i}", provider="groq" if failed else "mistral",
            model="llama-3.1-8b-instant" if failed else "mistral-small-latest",
            attempts=attempts, cost_usd=0.0001, ts=start + 200 + i)  # fmt: skip
    # 4. A session that has used 90% of its budget over 2 days; one well within its budget; one paused.
    burning = await create_session(store, name="burner", budget_usd=1.0)
    calm = await create_session(store, name="calm", budget_usd=100.0)
    paused = await create_session(store, name="stopped", budget_usd=0.1, status="paused")
    for sid, cost, ts in ((burning["id"], 0.4, NOW - 2 * DAY), (burning["id"], 0.5, NOW - DAY),
                          (calm["id"], 1.0, NOW - 2 * DAY), (paused["id"], 5.0, NOW - DAY)):  # fmt: skip
        put(store, f"s-{sid}-{cost}", session_id=sid, provider="groq", model="llama-3.1-8b-instant", cost_usd=cost, ts=ts)
    await store.flush()

    found = await recommendations(store, catalog, parse_period("30d", now=NOW))
    by_kind = {r["kind"]: [x for x in found if x["kind"] == r["kind"]] for r in found}
    span = (NOW - start) / DAY

    # 1 by hand: the cheapest non-premium chat model for 10,000 in / 5,000 out tokens.
    alternatives = [m for m in catalog.models.values() if m.tier != "premium" and "chat" in m.capabilities]
    cheapest = min(alternatives, key=lambda m: (m.cost(10_000, 5_000), m.id))
    saving = 10 * gpt4o.cost(1000, 500) - cheapest.cost(10_000, 5_000)
    (model_rec,) = by_kind["cheaper_model"]
    assert model_rec["numbers"]["model"] == "openai/gpt-4o"
    assert model_rec["numbers"]["alternative"] == cheapest.id
    assert math.isclose(model_rec["numbers"]["saving_usd"], saving)
    assert math.isclose(model_rec["monthly_saving_usd"], saving / span * 30, rel_tol=1e-6)

    # 2 by hand: k1b, k1d and k2b went upstream again: 3 repeats, $0.004, out of every ok request.
    (cache_rec,) = by_kind["cache_repeats"]
    ok_requests = 10 + 1 + 6 + 10 + 4
    assert cache_rec["numbers"]["repeats"] == 3
    assert math.isclose(cache_rec["numbers"]["saving_usd"], 0.004)
    assert math.isclose(cache_rec["numbers"]["repeat_rate"], 3 / ok_requests)
    assert math.isclose(cache_rec["monthly_saving_usd"], 0.004 / span * 30, rel_tol=1e-6)

    # 3 by hand: mistral 3 failures in 10 attempts, 3 failovers, 750 ms added.
    (provider_rec,) = by_kind["unreliable_provider"]
    assert provider_rec["numbers"] == {"provider": "mistral", "attempts": 10, "failures": 3, "error_rate": 0.3,
                                       "failovers": 3, "added_latency_ms": 750.0, "added_latency_ms_per_failure": 250.0}  # fmt: skip

    # 4 by hand: burner spent 0.9 of 1.0, at 0.9 over 2 days = 0.45/day: 0.1 / 0.45 days left.
    (session_rec,) = by_kind["session_budget"]
    numbers = session_rec["numbers"]
    assert numbers["session_id"] == burning["id"]
    assert math.isclose(numbers["spent_usd"], 0.9) and math.isclose(numbers["used_share"], 0.9)
    assert math.isclose(numbers["per_day_usd"], 0.45, rel_tol=1e-6)
    assert math.isclose(numbers["days_left"], 0.1 / 0.45, rel_tol=1e-5)

    assert [r["kind"] for r in found][:2] == ["cheaper_model", "cache_repeats"]  # biggest monthly saving first
    assert all(r["title"] and r["detail"] for r in found)


async def test_an_empty_ledger_has_nothing_to_recommend(store, catalog):
    assert await recommendations(store, catalog, parse_period("30d")) == []
    assert (await spend(store, parse_period("7d")))["total_usd"] == 0.0

