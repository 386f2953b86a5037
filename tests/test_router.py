"""The router over a small hand-made catalog: known winners, every filter, every exclusion reason."""

from __future__ import annotations

from datetime import date

import pytest

from p402_tui.core.catalog import load_catalog, parse_catalog
from p402_tui.core.config import RouterConfig, RouterWeights
from p402_tui.core.errors import InvalidRequestError, RateLimitError, UnknownModelError
from p402_tui.core.health import HealthTracker
from p402_tui.core.hooks import RouteOptions
from p402_tui.core import router as router_module
from p402_tui.core.router import Router, _lower_hull
from p402_tui.core.tokens import count_messages
from p402_tui.core.types import ChatRequest


def model(mid: str, tier: str, inp: float, out: float, caps: list[str], quality: float, tps: float, ttft: float, **kw):
    return {
        "id": mid,
        "name": mid,
        "tier": tier,
        "context_window": kw.pop("context_window", 128_000),
        "max_output_tokens": kw.pop("max_output_tokens", 8192),
        "input_per_1m": inp,
        "output_per_1m": out,
        "capabilities": ["chat", "streaming", *caps],
        "quality": quality,
        "tokens_per_s": tps,
        "ttft_ms": ttft,
        **kw,
    }


def provider(pid: str, wire: str = "openai") -> dict:
    return {"id": pid, "name": pid.title(), "wire": wire, "base_url": f"https://{pid}.invalid/v1"}


RAW = {
    "checked_on": "2026-01-01",
    "providers": [provider("alpha"), provider("beta", "anthropic"), provider("gamma"), provider("delta"), provider("omega")],
    "models": [
        model("alpha/cheap", "budget", 0.10, 0.20, ["json_mode"], 0.50, 100, 300),
        model("alpha/smart", "premium", 5.00, 15.0, ["vision", "function_calling", "json_mode"], 0.95, 40, 900),
        model("beta/fast", "mid", 1.00, 2.00, ["function_calling"], 0.70, 400, 100),
        model("beta/vision", "mid", 0.50, 1.50, ["vision", "function_calling", "json_mode"], 0.75, 80, 500),
        model("gamma/tiny", "budget", 0.05, 0.10, [], 0.40, 150, 200, context_window=4096, max_output_tokens=1024),
        model("gamma/old", "budget", 0.01, 0.01, [], 0.30, 100, 300, deprecated_on="2025-06-01"),
        model("delta/any", "budget", 0.01, 0.01, [], 0.99, 999, 10),
        model("omega/any", "budget", 0.01, 0.01, [], 0.99, 999, 10),
    ],
}
USABLE = ["alpha", "beta", "gamma"]
TODAY = date(2026, 1, 1)


@pytest.fixture
def catalog():
    return parse_catalog(RAW)


@pytest.fixture
def router(catalog):
    return Router(catalog, RouterConfig(), usable=USABLE, disabled=["delta"], today=TODAY)


def ask(text: str = "Name three rivers.", **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


def reasons(decision) -> dict[str, str]:
    return {e.id: e.reason for e in decision.excluded}


# --- modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "winner"),
    [
        ("cost", "gamma/tiny"),  # 0.05 / 0.10 per 1M: the cheapest usable, current model
        ("quality", "alpha/smart"),  # 0.95
        ("speed", "beta/fast"),  # 100 ms + 512 tokens at 400/s = 1.38 s; the next is 3.6 s
    ],
)
def test_each_single_objective_mode_has_its_known_winner(router, mode, winner):
    decision = router.route(ask(), RouteOptions(mode=mode))
    assert decision.chosen.id == winner
    assert decision.mode == mode
    assert decision.chosen.score == pytest.approx(1.0)


def test_cost_mode_ranks_every_candidate_by_estimated_cost(router):
    decision = router.route(ask(max_tokens=100), RouteOptions(mode="cost"))
    costs = [c.est_cost_usd for c in decision.candidates]
    assert costs == sorted(costs)
    assert decision.fallbacks == [c.id for c in decision.candidates[1:]]
    assert [c.id for c in decision.candidates] == ["gamma/tiny", "alpha/cheap", "beta/vision", "beta/fast", "alpha/smart"]


def test_estimated_cost_uses_the_real_prompt_count_and_max_tokens(router, catalog):
    request = ask("A fairly long question about the rivers of Europe and their tributaries?", max_tokens=300)
    decision = router.route(request, RouteOptions(mode="cost"))
    prompt = count_messages(request.messages).tokens
    assert decision.prompt_tokens == prompt
    assert decision.est_output_tokens == 300
    assert decision.chosen.est_cost_usd == pytest.approx(catalog.models["gamma/tiny"].cost(prompt, 300))


def test_the_prompt_counts_remembered_hold_a_bounded_amount_of_text(router, monkeypatch):
    monkeypatch.setattr(router_module, "PROMPT_MEMO_CHARS", 100_000)
    long = [ask(f"{i} " + "word " * 12_000) for i in range(10)]  # 60,000 characters each
    for request in long:
        router.route(request)
    held = sum(len(part) for key in router._prompts for part in key if type(part) is str)
    assert 60_000 < held <= 100_000
    short = ask("a short question")
    router.route(short)
    assert router.count_prompt(short) == count_messages(short.messages).tokens  # remembered beside the long one
    assert len(router._prompts) == 2


def test_without_max_tokens_the_per_mode_default_is_expected(catalog):
    config = RouterConfig(default_output_tokens=256, output_tokens={"quality": 2048})
    router = Router(catalog, config, usable=USABLE, today=TODAY)
    assert router.route(ask(), RouteOptions(mode="cost")).est_output_tokens == 256
    assert router.route(ask(), RouteOptions(mode="quality")).est_output_tokens == 2048


def test_balanced_weights_move_the_winner(catalog):
    def winner(cost: float, quality: float, speed: float) -> str:
        config = RouterConfig(weights=RouterWeights(cost=cost, quality=quality, speed=speed))
        router = Router(catalog, config, usable=USABLE, today=TODAY)
        return router.route(ask(), RouteOptions(mode="balanced")).chosen.id

    assert winner(1, 0, 0) == "gamma/tiny"
    assert winner(0, 1, 0) == "alpha/smart"
    assert winner(0, 0, 1) == "beta/fast"


def test_balanced_score_is_the_weighted_sum_of_its_components(router):
    decision = router.route(ask(), RouteOptions(mode="balanced"))
    for candidate in decision.candidates:
        expected = 0.4 * candidate.cost + 0.4 * candidate.quality + 0.2 * candidate.speed
        assert candidate.score == pytest.approx(expected)
        for value in (candidate.cost, candidate.quality, candidate.speed, candidate.health):
            assert 0.0 <= value <= 1.0
    scores = [c.score for c in decision.candidates]
    assert scores == sorted(scores, reverse=True)
    assert decision.chosen.id == "beta/fast"  # fastest by far, mid price and quality


def test_adaptive_weighs_live_health_in(catalog):
    health = HealthTracker(clock=lambda: 100.0)
    router = Router(catalog, RouterConfig(), health, usable=USABLE, today=TODAY)
    assert router.route(ask(), RouteOptions(mode="adaptive")).chosen.id == "beta/fast"
    health.record_failure("beta", "beta/fast", "server_error")
    decision = router.route(ask(), RouteOptions(mode="adaptive"))
    assert decision.chosen.id == "gamma/tiny"  # balanced's runner-up
    beta = {c.id: c for c in decision.candidates}
    assert beta["beta/fast"].health == 0.0 and beta["beta/fast"].score == 0.0
    assert beta["beta/vision"].health == 0.0  # the provider's health counts for all its models
    assert router.route(ask(), RouteOptions(mode="balanced")).chosen.id == "beta/fast"  # balanced ignores health


def test_speed_follows_live_measurements_over_catalog_figures(catalog):
    health = HealthTracker()
    router = Router(catalog, RouterConfig(), health, usable=USABLE, today=TODAY)
    assert router.route(ask(), RouteOptions(mode="speed")).chosen.id == "beta/fast"
    for _ in range(5):  # alpha/cheap measures far faster than its catalog 300 ms and 100 tokens/s
        health.record_success("alpha", "alpha/cheap", latency_ms=60, ttft_ms=10, output_tokens=500)
    decision = router.route(ask(), RouteOptions(mode="speed"))
    assert decision.chosen.id == "alpha/cheap"
    assert decision.chosen.est_latency_ms < 100


def test_a_success_folds_in_within_the_interval_and_a_failure_at_once(catalog, monkeypatch):
    from p402_tui.core import router as router_module

    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    health = HealthTracker()
    router = Router(catalog, RouterConfig(), health, usable=USABLE, today=TODAY)
    speed = RouteOptions(mode="speed")
    health.record_success("alpha", "alpha/cheap", latency_ms=60, ttft_ms=10, output_tokens=500)
    first = router.route(ask(), speed).chosen
    assert first.id == "alpha/cheap"  # the first change folds in at once
    for _ in range(20):  # alpha/cheap slows down a lot
        health.record_success("alpha", "alpha/cheap", latency_ms=9000, ttft_ms=4000, output_tokens=500)
    assert router.route(ask(), speed).chosen.est_latency_ms == first.est_latency_ms  # not yet: within the interval
    now[0] += router_module.LIVE_FOLD_S
    assert router.route(ask(), speed).chosen.id == "beta/fast"  # folded in
    router.route(ask(), speed)
    health.record_failure("beta", "beta/fast", "server_error")  # a failure does not wait
    decision = router.route(ask(), RouteOptions(mode="adaptive"))
    assert {c.id: c for c in decision.candidates}["beta/fast"].health == 0.0


def test_a_record_made_after_health_moved_on_reuses_the_figures_it_was_ranked_with(catalog, monkeypatch):
    from p402_tui.core import router as router_module

    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    health = HealthTracker()
    router = Router(catalog, RouterConfig(), health, usable=USABLE, today=TODAY)
    pinned = router.route(ask(), RouteOptions(model="alpha/cheap"))
    ranked = router.route(ask(), RouteOptions(model="alpha/cheap"))
    ranked.snapshot()  # what the store writer does once the answer has gone
    health.record_success("alpha", "alpha/cheap", latency_ms=60, ttft_ms=10, output_tokens=500)
    now[0] += router_module.LIVE_FOLD_S
    later = router.route(ask(), RouteOptions(model="alpha/cheap"))  # folds the success in: a new epoch
    assert later._ranked().vectors.epoch > ranked._ranked().vectors.epoch
    # Recorded after the fold, the first decision still gets its own epoch's figures, computed once.
    assert pinned._ranked().vectors is ranked._ranked().vectors
    assert pinned.snapshot().live is ranked.snapshot().live  # one live part for the store to keep
    assert pinned.candidates == ranked.candidates


# --- filters and exclusion reasons -------------------------------------------------------------


def test_unusable_and_retired_models_are_excluded_with_their_reason(router):
    decision = router.route(ask(), RouteOptions(mode="cost"))
    why = reasons(decision)
    assert why["delta/any"] == "provider disabled"
    assert why["omega/any"] == "provider not configured"
    assert why["gamma/old"] == "retired on 2025-06-01"
    assert {c.id for c in decision.candidates}.isdisjoint(why)
    assert len(decision.candidates) + len(decision.excluded) == 8


def test_require_and_request_implied_capabilities(router):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with_image = ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}])
    for request, options in [
        (with_image, RouteOptions(mode="cost")),
        (ask(), RouteOptions.from_dict({"mode": "cost", "require": ["vision"]})),
    ]:
        decision = router.route(request, options)
        assert decision.chosen.id == "beta/vision"
        assert reasons(decision)["alpha/cheap"] == "missing capability vision"
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    decision = router.route(ask(tools=tools), RouteOptions(mode="cost"))
    assert reasons(decision)["gamma/tiny"] == "missing capability function_calling"
    decision = router.route(ask(response_format={"type": "json_object"}), RouteOptions(mode="speed"))
    assert reasons(decision)["beta/fast"] == "missing capability json_mode"
    assert decision.chosen.id == "alpha/cheap"  # 5.4 s expected; beta/vision 6.9 s
    decision = router.route(ask(tools=tools), RouteOptions.from_dict({"mode": "cost", "require": ["vision", "json_mode"]}))
    assert reasons(decision)["beta/fast"] == "missing capabilities vision, json_mode"


def test_prefer_puts_a_provider_first_and_keeps_the_rest_as_fallbacks(router):
    decision = router.route(ask(), RouteOptions.from_dict({"mode": "cost", "prefer": ["beta"]}))
    assert [c.id for c in decision.candidates][:2] == ["beta/vision", "beta/fast"]
    assert decision.fallbacks[1:] == ["gamma/tiny", "alpha/cheap", "alpha/smart"]


def test_exclude_max_tier_and_max_cost(router):
    decision = router.route(ask(), RouteOptions.from_dict({"mode": "cost", "exclude": ["gamma"]}))
    assert reasons(decision)["gamma/tiny"] == "excluded provider"
    assert decision.chosen.id == "alpha/cheap"
    decision = router.route(ask(), RouteOptions(mode="quality", max_tier="mid"))
    assert reasons(decision)["alpha/smart"] == "over max_tier"
    assert decision.chosen.id == "beta/vision"
    decision = router.route(ask(max_tokens=1000), RouteOptions(mode="quality", max_cost_usd=0.005))
    assert reasons(decision)["alpha/smart"] == "over max_cost_usd"  # 1000 x $15/1M alone is $0.015
    assert all(c.est_cost_usd <= 0.005 for c in decision.candidates)


def test_context_window_and_output_limit(router):
    long_prompt = "word " * 5000  # about 5000 tokens: more than gamma/tiny's 4096 window
    decision = router.route(ask(long_prompt), RouteOptions(mode="cost"))
    assert reasons(decision)["gamma/tiny"] == "context too small"
    assert decision.chosen.id == "alpha/cheap"
    decision = router.route(ask(max_tokens=2000), RouteOptions(mode="cost"))
    assert reasons(decision)["gamma/tiny"] == "max_tokens over output limit"


def test_open_circuit_excludes_a_provider_until_its_wait_is_over(catalog):
    now = [0.0]
    health = HealthTracker(clock=lambda: now[0])
    router = Router(catalog, RouterConfig(), health, usable=USABLE, today=TODAY)
    health.record_failure("gamma", "gamma/tiny", RateLimitError("slow down", provider="gamma", retry_after_s=5))
    decision = router.route(ask(), RouteOptions(mode="cost"))
    assert reasons(decision)["gamma/tiny"] == "circuit open"
    assert decision.chosen.id == "alpha/cheap"
    now[0] = 5.0
    assert router.route(ask(), RouteOptions(mode="cost")).chosen.id == "gamma/tiny"


def test_nothing_eligible_gives_no_choice_and_says_why(router):
    decision = router.route(ask(), RouteOptions(mode="cost", max_cost_usd=1e-12))
    assert decision.chosen is None and decision.fallbacks == [] and decision.plan() == []
    assert "5 over max_cost_usd" in decision.why_none()


# --- pins, tie-breaks, errors, shape -------------------------------------------------------------


def test_a_pinned_model_is_chosen_with_optional_fallbacks(router):
    decision = router.route(ask(), RouteOptions(mode="cost", model="alpha/smart"))
    assert decision.chosen.id == "alpha/smart"
    assert decision.fallbacks == ["gamma/tiny", "alpha/cheap", "beta/vision", "beta/fast"]
    decision = router.route(ask(), RouteOptions(model="alpha/smart", failover=False))
    assert decision.fallbacks == [] and [c.id for c in decision.plan()] == ["alpha/smart"]
    decision = router.route(ask(model="smart"), RouteOptions(mode="cost"))  # a bare wire id from the request
    assert decision.chosen.id == "alpha/smart"
    decision = router.route(ask(), RouteOptions(model="omega/any"))
    assert decision.chosen is None and decision.why_none() == "omega/any: provider not configured"
    decision = router.route(ask(), RouteOptions(model="alpha/nope"))  # beyond the catalog: passed through, unpriced
    assert decision.chosen.id == "alpha/nope" and decision.est_cost_usd == 0.0
    with pytest.raises(UnknownModelError):  # a bare id the catalog does not know stays unknown
        router.route(ask(), RouteOptions(model="nope"))


def test_request_model_auto_and_mode_aliases_route(router):
    assert router.route(ask(model="auto"), RouteOptions(mode="quality")).chosen.id == "alpha/smart"
    decision = router.route(ask(model="p402/speed"))
    assert decision.mode == "speed" and decision.chosen.id == "beta/fast"


def test_ties_break_by_id_every_time():
    raw = {
        "checked_on": "2026-01-01",
        "providers": [provider("zeta"), provider("eta")],
        "models": [
            model("zeta/b", "mid", 1, 1, [], 0.5, 100, 100),
            model("zeta/a", "mid", 1, 1, [], 0.5, 100, 100),
            model("eta/c", "mid", 1, 1, [], 0.5, 100, 100),
        ],
    }
    router = Router(parse_catalog(raw), RouterConfig(), today=TODAY)
    for mode in ("cost", "quality", "speed", "balanced", "adaptive"):
        seen = {tuple(c.id for c in router.route(ask(), RouteOptions(mode=mode)).candidates) for _ in range(3)}
        assert seen == {("eta/c", "zeta/a", "zeta/b")}


def test_bad_options_are_a_clear_error(router):
    for options, text in [
        (RouteOptions(mode="cheapest"), "unknown mode"),
        (RouteOptions.from_dict({"require": ["telepathy"]}), "unknown capability"),
        (RouteOptions(max_tier="ultra"), "unknown tier"),
        (RouteOptions.from_dict({"exclude": ["nobody"]}), "unknown provider"),
    ]:
        with pytest.raises(InvalidRequestError, match=text):
            router.route(ask(), options)


def test_decision_to_dict_has_the_documented_shape(router):
    decision = router.route(ask(), RouteOptions.from_dict({"mode": "balanced", "exclude": ["gamma"]}))
    data = decision.to_dict()
    assert set(data) == {
        "id", "ts", "mode", "chosen", "fallbacks", "candidates", "excluded",
        "prompt_tokens", "est_output_tokens", "decision_us", "options",
    }
    assert set(data["chosen"]) == {"id", "provider", "model", "tier", "est_cost_usd", "score"}
    assert set(data["candidates"][0]) == {
        "id", "provider", "model", "tier", "score", "components", "est_cost_usd", "est_latency_ms"
    }
    assert set(data["candidates"][0]["components"]) == {"cost", "quality", "speed", "health"}
    assert {"id": "gamma/tiny", "reason": "excluded provider"} in data["excluded"]
    assert data["options"]["mode"] == "balanced" and data["options"]["exclude"] == ["gamma"]
    assert 0 < data["decision_us"] < 1_000_000
    assert decision.id != router.route(ask()).id


def test_options_accept_plain_lists(router):
    options = RouteOptions(mode="cost")
    options.require, options.exclude = ["vision"], ["beta"]  # type: ignore[assignment]
    assert router.route(ask(), options).chosen.id == "alpha/smart"


def test_the_whole_shipped_catalog_routes_in_every_mode():
    router = Router(load_catalog())
    for mode in ("cost", "quality", "speed", "balanced", "adaptive"):
        decision = router.route(ask(), RouteOptions.from_dict({"mode": mode, "require": ["function_calling"], "max_tier": "mid"}))
        assert decision.chosen is not None
        assert all(c.tier != "premium" and c.id not in dict.fromkeys(e.id for e in decision.excluded)
                   for c in decision.candidates)
        assert len(decision.candidates) + len(decision.excluded) == len(router.models())


def test_cost_bounds_come_from_the_price_hull():
    points = [(0.0, 5.0), (1.0, 1.0), (2.0, 0.5), (3.0, 3.0), (0.5, 4.0), (4.0, 0.0), (2.0, 2.0)]
    hull = _lower_hull(points)
    for x in (0.0, 0.3, 1.0, 7.0, 100.0):
        for y in (0.0, 0.5, 2.0, 9.0):
            assert min(x * a + y * b for a, b in hull) == pytest.approx(min(x * a + y * b for a, b in points))


@pytest.mark.parametrize("mode", ["cost", "quality", "speed", "balanced", "adaptive"])
def test_no_model_passing_the_option_filters_is_an_empty_decision(router, mode):
    decision = router.route(ask(), RouteOptions.from_dict({"mode": mode, "require": ["web_search"]}))
    assert decision.chosen is None and decision.candidates == [] and decision.fallbacks == []
    assert decision.why_none().startswith("5 missing capability web_search")
    assert decision.to_dict()["chosen"] is None


@pytest.mark.parametrize("mode", ["cost", "quality", "speed", "balanced", "adaptive"])
@pytest.mark.parametrize(
    "options, max_tokens",
    [
        ({}, None),
        ({"max_cost_usd": 1e-5, "prefer": ["groq"]}, 16),
        ({"require": ["vision"], "exclude": ["openai"], "failover": False}, 200_000),
        ({"model": "openai/gpt-4o-mini"}, 16),
    ],
)
def test_a_decision_dict_is_its_candidates_and_reads_back_through_from_dict(mode, options, max_tokens):
    import json

    from p402_tui.core.router import RouteDecision

    router = Router(load_catalog())
    request = ChatRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens)
    decision = router.route(request, RouteOptions.from_dict({"mode": mode, **options}))
    data = decision.to_dict()
    assert data["candidates"] == [c.to_dict() for c in decision.candidates]
    assert data["excluded"] == [e.to_dict() for e in decision.excluded]
    assert data["fallbacks"] == decision.fallbacks
    again = RouteDecision.from_dict(data)
    assert json.dumps(again.to_dict()) == json.dumps(data)  # same keys, order and float digits
    assert [c.id for c in again.plan()] == [c.id for c in decision.plan()]


def test_route_options_come_from_one_mapping_shape():
    options = RouteOptions(
        mode="cost", require=frozenset({"vision", "json_mode"}), prefer=("groq",), exclude=("openai",),
        max_tier="mid", max_cost_usd=0.01, model="groq/llama-3.1-8b-instant", failover=False, max_retries=2,
    )
    assert RouteOptions.from_dict(options.to_dict()) == options
    partial = RouteOptions.from_dict({"require": ["vision"], "prefer": ["groq"], "failover": None})
    assert partial == RouteOptions(require=frozenset({"vision"}), prefer=("groq",))  # lists made hashable, the rest defaults
    assert RouteOptions.from_dict({}) == RouteOptions()
    with pytest.raises(TypeError, match="unknown route option 'max_cost'"):
        RouteOptions.from_dict({"max_cost": 1.0})


@pytest.mark.parametrize(
    "ref, parsed",
    [
        (None, (None, None)), ("", (None, None)), ("auto", (None, None)), ("p402/auto", (None, None)),
        ("router", (None, None)), ("p402/cost", (None, "cost")), ("p402/adaptive", (None, "adaptive")),
        ("openai/gpt-4o-mini", ("openai/gpt-4o-mini", None)), ("gpt-4o-mini", ("gpt-4o-mini", None)),
        ("p402/fastest", ("p402/fastest", None)),  # no such mode: a model the catalog will not know
    ],
)
def test_a_model_reference_asks_the_router_or_pins_a_model(ref, parsed):
    from p402_tui.core.router import parse_model_ref

    assert parse_model_ref(ref) == parsed


def test_the_router_takes_the_mode_a_model_reference_names_unless_the_options_name_one():
    router = Router(load_catalog())
    assert router.route(ask(model="p402/quality")).mode == "quality"
    assert router.route(ask(model="p402/quality"), RouteOptions(mode="cost")).mode == "cost"
    assert router.route(ask(model="auto")).mode == router.config.mode


def test_a_pinned_decision_ranks_the_others_only_when_read():
    router = Router(load_catalog())
    pinned = router.route(ask(), RouteOptions(model="openai/gpt-4o-mini"))
    assert pinned._ranked()._key is None and pinned._ranked()._eligible is None
    assert pinned.snapshot().ranked[0] == pinned._ranked().chosen  # the pin leads its ranking, best or not
