"""Cost math by hand, the cached and cache-write rates, comparison and the cheapest pick."""

from __future__ import annotations

import pytest

from p402_tui.core.catalog import load_catalog, parse_catalog
from p402_tui.core.costs import CostRow, call_cost, cheapest, compare
from p402_tui.core.types import TIER_RANK, Usage


def model_entry(model_id: str, tier: str, price_in: float, price_out: float, capabilities: list[str], **extra) -> dict:
    return {
        "id": model_id,
        "name": model_id,
        "tier": tier,
        "context_window": 100_000,
        "max_output_tokens": 8_000,
        "input_per_1m": price_in,
        "output_per_1m": price_out,
        "capabilities": capabilities,
        "quality": 0.7,
        "tokens_per_s": 100,
        **extra,
    }


@pytest.fixture(scope="module")
def small():
    """Four models whose costs are easy to check by hand, two of them tied."""
    provider = {"wire": "openai", "base_url": "http://127.0.0.1:1/v1"}
    return parse_catalog(
        {
            "checked_on": "2026-10-07",
            "providers": [{"id": "alpha", "name": "Alpha", **provider}, {"id": "beta", "name": "Beta", **provider}],
            "models": [
                model_entry("alpha/big", "premium", 3.0, 15.0, ["chat", "streaming", "function_calling", "vision"]),
                model_entry("alpha/small", "budget", 0.2, 0.8, ["chat", "streaming", "function_calling"]),
                model_entry("beta/tie-b", "mid", 0.5, 1.0, ["chat", "streaming"]),
                model_entry("beta/tie-a", "mid", 0.5, 1.0, ["chat", "streaming", "function_calling"]),
            ],
        }
    )


@pytest.fixture(scope="module")
def shipped():
    return load_catalog()


def test_call_cost_by_hand(small):
    big = small.model("alpha/big")
    usage = Usage(prompt_tokens=1200, completion_tokens=300)
    assert call_cost(big, usage) == 1200 * 3.0 / 1e6 + 300 * 15.0 / 1e6
    assert call_cost(big, usage) == pytest.approx(0.0081)
    assert call_cost(big, Usage()) == 0


def test_reasoning_tokens_are_not_billed_twice(small):
    big = small.model("alpha/big")
    plain = Usage(prompt_tokens=100, completion_tokens=1000)
    thinking = Usage(prompt_tokens=100, completion_tokens=1000, reasoning_tokens=800)
    assert call_cost(big, thinking) == call_cost(big, plain)


def test_cached_tokens_at_the_cached_rate(shipped):
    gpt4o = shipped.model("openai/gpt-4o")  # 2.5 in, 1.25 cached, 10 out
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400)
    assert call_cost(gpt4o, usage) == pytest.approx((600 * 2.5 + 400 * 1.25 + 500 * 10) / 1e6)
    assert call_cost(gpt4o, usage) < call_cost(gpt4o, Usage(prompt_tokens=1000, completion_tokens=500))


def test_cached_tokens_without_a_cached_rate_pay_full_input(small):
    big = small.model("alpha/big")
    cached = Usage(prompt_tokens=1000, completion_tokens=10, cached_tokens=600)
    assert call_cost(big, cached) == pytest.approx(call_cost(big, Usage(prompt_tokens=1000, completion_tokens=10)))


def test_cache_writes_pay_the_surcharge(shipped):
    sonnet = shipped.model("anthropic/claude-sonnet-4-5-20250929")  # 3 in, 0.3 cache read, 15 out
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=500, cache_write_tokens=200)
    expected = (300 * 3 + 500 * 0.3 + 200 * 3 * 1.25 + 100 * 15) / 1e6
    assert call_cost(sonnet, usage) == pytest.approx(expected)


def test_compare_lists_every_model_cheapest_first(shipped):
    rows = compare(shipped, 1000, 500)
    assert len(rows) == len(shipped.models)
    assert {row.id for row in rows} == set(shipped.models)
    assert [(r.cost_usd, r.id) for r in rows] == sorted((r.cost_usd, r.id) for r in rows)
    for row in rows:
        model = shipped.model(row.id)
        assert row.cost_usd == 1000 * model.input_per_1m / 1e6 + 500 * model.output_per_1m / 1e6
        assert (row.provider, row.model, row.tier) == (model.provider, model.model, model.tier)
        assert (row.input_per_1m, row.output_per_1m) == (model.input_per_1m, model.output_per_1m)


def test_compare_by_hand(small):
    rows = compare(small, 1_000_000, 1_000_000)
    assert rows == [
        CostRow("alpha/small", "alpha", "small", "budget", 0.2, 0.8, 0.2 + 0.8),
        CostRow("beta/tie-a", "beta", "tie-a", "mid", 0.5, 1.0, 1.5),
        CostRow("beta/tie-b", "beta", "tie-b", "mid", 0.5, 1.0, 1.5),
        CostRow("alpha/big", "alpha", "big", "premium", 3.0, 15.0, 18.0),
    ]
    assert rows[0].to_dict()["cost_usd"] == 1.0


def test_compare_filters(small, shipped):
    assert [r.id for r in compare(small, 10, 10, require={"function_calling"})] == [
        "alpha/small",
        "beta/tie-a",
        "alpha/big",
    ]
    assert [r.id for r in compare(small, 10, 10, max_tier="mid")] == ["alpha/small", "beta/tie-a", "beta/tie-b"]
    assert [r.id for r in compare(small, 10, 10, top=2)] == ["alpha/small", "beta/tie-a"]
    vision = compare(shipped, 1000, 500, require={"chat", "vision"}, max_tier="budget", top=5)
    assert len(vision) == 5
    for row in vision:
        model = shipped.model(row.id)
        assert "vision" in model.capabilities and model.tier == "budget"


def test_bad_arguments_are_clear(small):
    with pytest.raises(ValueError, match="unknown capability 'telepathy'"):
        compare(small, 1, 1, require={"telepathy"})
    with pytest.raises(ValueError, match="unknown tier 'cheap'"):
        cheapest(small, {"chat"}, max_tier="cheap")
    with pytest.raises(ValueError, match="from 0 to 1,000,000,000,000,000"):
        compare(small, -1, 1)
    with pytest.raises(ValueError, match="from 0 to"):
        cheapest(small, {"chat"}, input_tokens=1, output_tokens=10**400)
    with pytest.raises(ValueError, match="top"):
        compare(small, 1, 1, top=0)


def test_cheapest(small):
    assert cheapest(small, {"chat"}).id == "alpha/small"
    assert cheapest(small, {"vision"}).id == "alpha/big"
    assert cheapest(small, {"vision"}, max_tier="mid") is None
    assert cheapest(small, {"chat"}, providers={"beta"}).id == "beta/tie-a"  # a tie goes to the lower id
    assert cheapest(small, {"embeddings"}) is None


def test_cheapest_matches_brute_force_on_the_shipped_catalog(shipped):
    need = {"chat", "function_calling"}
    for max_tier in ("budget", "mid", "premium"):
        pick = cheapest(shipped, need, max_tier=max_tier, input_tokens=2000, output_tokens=1000)
        candidates = [
            m for m in shipped.models.values() if m.has(need) and TIER_RANK[m.tier] <= TIER_RANK[max_tier]
        ]
        best = min(candidates, key=lambda m: (2000 * m.input_per_1m + 1000 * m.output_per_1m, m.id))
        assert pick == best
        assert "chat" in pick.capabilities  # embedding models never answer a chat
