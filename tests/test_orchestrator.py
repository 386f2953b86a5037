"""The orchestrator against the real simulator over loopback: failover, circuits, streams, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import pytest
from pydantic import SecretStr

from conftest import run_cli
from p402_tui.core.config import RouterWeights
from p402_tui.core.errors import (
    AllAttemptsFailedError,
    AuthenticationError,
    BadRequestError,
    ConnectionLostError,
    BudgetExceededError,
    ContextLengthError,
    DeadlineExceededError,
    NoEligibleModelError,
    RateLimitError,
    ServerError,
    UnavailableError,
)
from p402_tui.core.events import AttemptFailed, HealthChanged, RequestCompleted, RouteDecided
from p402_tui.core.health import HealthTracker
from p402_tui.core.hooks import CachedAnswer, CallContext, NoHooks
from p402_tui.core.orchestrator import Orchestrator, _Plan
from p402_tui.core.hooks import RouteOptions
from p402_tui.core.types import ChatRequest, ChatResponse, Usage
from p402_tui.sim.engine import Fault
from p402_tui.sim.openai_family import REJECTED_KEY_PREFIX


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def ask(text: str = "Say something about routers.", **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture
async def orchestrator(sim_settings):
    orchestrator = Orchestrator(sim_settings)
    await orchestrator.start()
    yield orchestrator
    await orchestrator.aclose()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def clocked(sim_settings, clock):
    """An orchestrator whose health runs on a clock the test moves."""
    orchestrator = Orchestrator(sim_settings, health=HealthTracker(clock=clock))
    yield orchestrator
    await orchestrator.aclose()


def winner(orchestrator: Orchestrator, mode: str, request: ChatRequest | None = None):
    decision = orchestrator.route(request or ask(), RouteOptions(mode=mode))
    return orchestrator.catalog.models[decision.chosen_id]


def first_other_provider(orchestrator: Orchestrator, mode: str, provider: str) -> str:
    decision = orchestrator.route(ask(), RouteOptions(mode=mode))
    return next(orchestrator.catalog.models[mid] for mid in decision.fallbacks
                if orchestrator.catalog.models[mid].provider != provider).provider


async def test_a_503_on_the_cost_winner_is_answered_by_the_next_candidate(orchestrator, sim):
    cost_winner = winner(orchestrator, "cost")
    expected = first_other_provider(orchestrator, "cost", cost_winner.provider)
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{sim.url}/_sim/faults", json={"provider": cost_winner.provider, "kind": "error", "status": 503}
        )
        assert reply.status_code == 201
    events = orchestrator.bus.subscribe()
    response = await orchestrator.complete(ask(), RouteOptions(mode="cost"))
    meta = response.p402
    assert response.content and response.provider == expected == meta.provider
    assert [(a.provider, a.error_kind) for a in meta.attempts] == [(cost_winner.provider, "server_error"), (expected, None)]
    assert meta.cost_usd > 0 and meta.decision_id and not meta.cached
    seen = events.drain()
    assert [type(e) for e in seen if not isinstance(e, HealthChanged)][:3] == [RouteDecided, AttemptFailed, RequestCompleted]
    record = next(e.record for e in seen if isinstance(e, RequestCompleted))
    assert record.status == "ok" and len(record.attempts) == 2 and record.decision_id == meta.decision_id


async def test_a_429_throttles_only_its_model_for_its_wait(clocked, sim, clock):
    # A 429 is about the model (or key) it came from: the provider's other models go on serving.
    cost_winner = winner(clocked, "cost")
    provider = cost_winner.provider
    sim.state.add_fault(Fault(provider=provider, model=cost_winner.model, kind="rate_limit", retry_after_s=30, count=1))
    events = clocked.bus.subscribe(kinds={"health_changed"})
    response = await clocked.complete(ask(), RouteOptions(mode="cost"))
    assert response.p402.attempts[0].error_kind == "rate_limited" and response.provider != provider
    state = clocked.health.provider(provider)
    assert state.circuit == "closed" and state.status == "degraded" and f"{cost_winner.id} throttled" in state.reason

    clock.now += 29.9
    decision = clocked.route(ask(), RouteOptions(mode="cost"))
    assert [e.id for e in decision.excluded if e.reason == "circuit open"] == [cost_winner.id]
    assert (await clocked.complete(ask(), RouteOptions(mode="cost"))).model != cost_winner.model

    clock.now += 0.1  # the wait is over: the cost winner answers again
    response = await clocked.complete(ask(), RouteOptions(mode="cost"))
    assert response.model == cost_winner.model and len(response.p402.attempts) == 1
    assert clocked.health.provider(provider).status == "healthy"
    assert [(e.status, e.circuit) for e in events.drain() if e.provider == provider] == [
        ("degraded", "closed"), ("healthy", "closed")]


async def test_beyond_the_ejection_cap_the_least_bad_candidates_are_tried_anyway(clocked, clock):
    # Every provider ejected (three refused connections each) would refuse everything; the cap keeps serving,
    # from the least bad: the one provider that also answered lately.
    health = clocked.health
    best = sorted(clocked.router.usable)[3]
    for _ in range(10):
        health.record_success(best, f"{best}/x", latency_ms=10)
    for provider in clocked.router.usable:
        for _ in range(3):
            health.record_failure(provider, f"{provider}/x", ConnectionLostError("refused", provider=provider, phase="connect"))
    assert all(health.circuit(p) == "open" for p in clocked.router.usable)
    assert clocked.route(ask(), RouteOptions(mode="cost")).chosen is None
    response = await clocked.complete(ask(), RouteOptions(mode="cost"))
    assert response.content and response.provider == best and len(response.p402.attempts) == 1
    assert health.circuit(best) == "open"  # a call sent despite the ejection is no trial: it does not close it
    pinned = await clocked.complete(ask(), RouteOptions(model=response.p402.provider + "/" + response.p402.model, failover=False))
    assert pinned.content  # a pin is the whole candidate set: ejected, it is still the least bad
    clock.now += 5
    await clocked.complete(ask(), RouteOptions(mode="cost"))
    assert any(health.circuit(p) == "closed" for p in clocked.router.usable)  # trials closed one


async def test_with_every_candidate_throttled_the_answer_is_503_with_the_soonest_retry(clocked, clock):
    health = clocked.health
    pin = "openai/gpt-4o-mini"
    health.record_failure("openai", pin, RateLimitError("slow down", provider="openai", status=429, retry_after_s=30))
    clock.now += 10
    with pytest.raises(UnavailableError) as refused:
        await clocked.complete(ask(), RouteOptions(model=pin, failover=False))
    assert refused.value.http_status == 503 and refused.value.retry_after_s == pytest.approx(20)
    assert refused.value.attempts == [] and "no candidate can be called now" in str(refused.value)

    response = await clocked.complete(ask(), RouteOptions(model=pin))  # with failover, the others answer
    assert response.content and response.model != "gpt-4o-mini"

    spent = {"type": "insufficient_quota", "code": "insufficient_quota"}  # the key's quota: the whole provider
    for i, provider in enumerate(sorted(clocked.router.usable)):
        error = RateLimitError("quota", provider=provider, status=429, retry_after_s=12 + i, body=spent)
        health.record_failure(provider, f"{provider}/x", error)
    with pytest.raises(UnavailableError) as refused:
        await clocked.complete(ask())
    assert refused.value.retry_after_s == pytest.approx(12)
    with pytest.raises(UnavailableError):
        async with clocked.stream(ask()) as stream:
            async for _ in stream:
                pass


async def test_adaptive_stops_choosing_a_failing_provider_and_returns_after_recovery(sim_settings, sim, clock):
    # Speed out of the weights: the simulator answers at once, so measured speed would swamp the catalog's.
    sim_settings.file.router.weights = RouterWeights(cost=0.5, quality=0.5, speed=0.0)
    async with Orchestrator(sim_settings, health=HealthTracker(clock=clock)) as clocked:
        await _adaptive_round_trip(clocked, sim, clock)


async def _adaptive_round_trip(clocked: Orchestrator, sim, clock: Clock) -> None:
    best = winner(clocked, "adaptive")
    sim.state.add_fault(Fault(provider=best.provider, kind="error", status=500))
    response = await clocked.complete(ask(), RouteOptions(mode="adaptive"))
    assert response.provider != best.provider and response.p402.attempts[0].error_kind == "server_error"
    for _ in range(3):  # no circuit is open (one failure), adaptive scoring alone keeps it away
        assert winner(clocked, "adaptive").provider != best.provider
        assert (await clocked.complete(ask(), RouteOptions(mode="adaptive"))).provider != best.provider
    assert clocked.health.circuit(best.provider) == "closed"
    assert winner(clocked, "balanced").id == best.id  # balanced does not look at health

    sim.state.clear_faults()
    clock.now += 61  # the failure leaves the 60 s window
    assert winner(clocked, "adaptive").id == best.id
    response = await clocked.complete(ask(), RouteOptions(mode="adaptive"))
    assert response.provider == best.provider and len(response.p402.attempts) == 1


async def collect(stream) -> list:
    return [chunk async for chunk in stream]


async def test_a_stream_read_in_batches_carries_the_same_chunks(orchestrator):
    """`batches()` hands on what arrived together; joined up it is what per-chunk reading gives."""
    request = ask(stream=True, max_tokens=40)
    options = RouteOptions(model="openai/gpt-4o-mini")
    stream = orchestrator.stream(request, options)
    async with stream:
        batches = [batch async for batch in stream.batches()]
    chunks = await collect(orchestrator.stream(request, options))
    flat = [chunk for batch in batches for chunk in batch]
    assert len(batches) < len(flat) and all(batches)
    assert flat[0].role == "assistant" and flat[0].content  # the held preamble leads the first content
    assert [(c.content, c.finish_reason, c.usage) for c in flat] == [(c.content, c.finish_reason, c.usage) for c in chunks]
    assert stream.meta.ttft_ms is not None and stream.meta.cost_usd > 0


async def test_a_stream_cut_before_its_first_token_fails_over_unseen(orchestrator, sim):
    fastest = winner(orchestrator, "speed", ask(stream=True))
    sim.state.add_fault(Fault(provider=fastest.provider, kind="disconnect", after_tokens=0))
    stream = orchestrator.stream(ask(stream=True), RouteOptions(mode="speed"))
    chunks = await asyncio.wait_for(collect(stream), 10)
    assert all(c.error is None for c in chunks)
    assert "".join(c.content for c in chunks).strip()
    assert chunks[-1].finish_reason in ("stop", "length") or any(c.finish_reason for c in chunks)
    assert [a.provider for a in stream.meta.attempts][0] == fastest.provider
    assert len(stream.meta.attempts) == 2 and stream.meta.attempts[1].error_kind is None
    assert stream.meta.provider != fastest.provider and stream.meta.ttft_ms is not None
    assert stream.meta.cost_usd > 0 and stream.decision is not None


async def test_a_stream_cut_after_content_ends_with_an_error_chunk(orchestrator, sim):
    fastest = winner(orchestrator, "speed", ask(stream=True))
    sim.state.add_fault(Fault(provider=fastest.provider, kind="disconnect", after_tokens=3))
    events = orchestrator.bus.subscribe(kinds={"request_completed"})
    stream = orchestrator.stream(ask(stream=True), RouteOptions(mode="speed"))
    chunks = await asyncio.wait_for(collect(stream), 10)  # a hang fails here, fast
    assert "".join(c.content for c in chunks)  # content did reach the caller
    last = chunks[-1]
    assert last.finish_reason == "error" and last.error["kind"] == "stream_interrupted"
    assert [a.error_kind for a in stream.meta.attempts] == ["stream_interrupted"]  # no failover after content
    assert stream.meta.provider == fastest.provider
    (event,) = events.drain()
    assert event.record.status == "error" and event.record.error_kind == "stream_interrupted"
    assert event.record.completion_tokens > 0  # the partial answer is still counted
    # The error chunk carries that count, so a client assembling the stream sees what it pays for.
    assert last.usage is not None and last.usage.completion_tokens == event.record.completion_tokens


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_cancelling_a_stream_closes_the_upstream(orchestrator, sim, how):
    fastest = winner(orchestrator, "speed", ask(stream=True))
    sim.state.add_fault(Fault(provider=fastest.provider, kind="timeout", after_tokens=2))  # then it hangs
    events = orchestrator.bus.subscribe(kinds={"request_completed"})
    stream = orchestrator.stream(ask(stream=True), RouteOptions(mode="speed"))
    if how == "aclose":  # the caller stops reading mid-answer
        chunk = await asyncio.wait_for(stream.__anext__(), 10)
        while not chunk.content:
            chunk = await asyncio.wait_for(stream.__anext__(), 10)
        await stream.aclose()
    else:  # the caller's task is cancelled while it waits on a hanging upstream
        while True:
            pending = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=0.3)
            if not done:
                break
            assert pending.result().error is None
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    for _ in range(200):
        if sim.state.streams.cancelled:
            break
        await asyncio.sleep(0.01)
    assert sim.state.streams.cancelled == 1 and sim.state.streams.open_now == 0
    (event,) = events.drain()
    assert event.record.error_kind == "cancelled"


async def test_a_hung_upstream_ends_at_the_requests_deadline_across_attempts(orchestrator, sim):
    sim.state.add_fault(Fault(kind="timeout"))  # every provider hangs; each attempt alone would wait 120 s
    events = orchestrator.bus.subscribe(kinds={"request_completed"})
    began = time.perf_counter()
    with pytest.raises(DeadlineExceededError) as caught:
        await orchestrator.complete(ask(), ctx=CallContext(timeout_s=0.5))
    took = time.perf_counter() - began
    assert 0.5 <= took < 2 and caught.value.http_status == 504
    (event,) = events.drain()
    assert event.record.error_kind == "deadline_exceeded"
    assert event.record.attempts[-1].error_kind == "deadline_exceeded"


async def test_a_stream_past_its_deadline_ends_with_an_error_chunk(orchestrator, sim):
    fastest = winner(orchestrator, "speed", ask(stream=True))
    sim.state.add_fault(Fault(provider=fastest.provider, kind="timeout", after_tokens=2))  # then it hangs
    events = orchestrator.bus.subscribe(kinds={"request_completed"})
    stream = orchestrator.stream(ask(stream=True), RouteOptions(mode="speed"), CallContext(timeout_s=1.0))
    chunks = [c async for c in stream]
    assert any(c.content for c in chunks[:-1])
    assert chunks[-1].finish_reason == "error" and chunks[-1].error["kind"] == "deadline_exceeded"
    (event,) = events.drain()
    assert event.record.error_kind == "deadline_exceeded" and event.record.completion_tokens > 0
    for _ in range(200):
        if sim.state.streams.cancelled:
            break
        await asyncio.sleep(0.01)
    assert sim.state.streams.open_now == 0


async def test_aclose_after_the_last_chunk_counts_as_a_complete_answer(orchestrator):
    events = orchestrator.bus.subscribe(kinds={"request_completed"})
    stream = orchestrator.stream(ask(stream=True), RouteOptions(mode="cost"))
    async for chunk in stream:
        if chunk.finish_reason:
            break
    await stream.aclose()
    (event,) = events.drain()
    assert event.record.status == "ok" and event.record.cost_usd > 0


async def test_a_rejected_key_moves_to_another_provider(sim_settings, sim):
    cost_winner = None
    async with Orchestrator(sim_settings) as probe:
        decision = probe.route(ask(), RouteOptions.from_dict({"mode": "cost", "exclude": ["anthropic", "google", "cohere"]}))
        cost_winner = probe.catalog.models[decision.chosen_id]
    provider = sim_settings.providers[cost_winner.provider]
    sim_settings.providers[cost_winner.provider] = dataclasses.replace(
        provider, api_key=SecretStr(f"{REJECTED_KEY_PREFIX}-0123456789")
    )
    async with Orchestrator(sim_settings) as orchestrator:
        response = await orchestrator.complete(
            ask(), RouteOptions.from_dict({"mode": "cost", "exclude": ["anthropic", "google", "cohere"]})
        )
        assert response.p402.attempts[0].error_kind == "authentication"
        assert response.provider != cost_winner.provider
        assert REJECTED_KEY_PREFIX not in response.p402.attempts[0].error
        assert orchestrator.health.circuit(cost_winner.provider) == "open"


async def test_failover_follows_the_error_scope(orchestrator):
    decision = orchestrator.route(ask(), RouteOptions(mode="cost"))
    models = orchestrator.catalog.models
    first = models[decision.chosen_id]

    def fresh() -> _Plan:
        plan = _Plan(orchestrator, decision, RouteOptions(mode="cost", max_retries=10))
        assert plan.next() is first
        return plan

    plan = fresh()
    assert plan.failed(first, ServerError("down", provider=first.provider, status=503), 1.0)
    assert plan.next().provider != first.provider  # provider-level: its other models are skipped

    plan = fresh()
    assert plan.failed(first, ContextLengthError("too long", provider=first.provider, status=400), 1.0)
    same = [mid for mid in decision.fallbacks if models[mid].provider == first.provider]
    assert plan.next().id == decision.fallbacks[0]  # model-level: the very next candidate, whoever it is
    assert same  # (the cost winner's provider does have more models in the plan)

    plan = fresh()
    assert plan.failed(first, AuthenticationError("bad key", provider=first.provider, status=401), 1.0)
    assert plan.next().provider != first.provider

    plan = fresh()
    assert not plan.failed(first, BadRequestError("nonsense", provider=first.provider, status=400), 1.0)
    assert plan.next() is None
    assert isinstance(plan.exhausted(), BadRequestError)


async def test_max_retries_bounds_the_attempts(orchestrator, sim):
    sim.state.add_fault(Fault(provider="*", kind="error", status=503))
    with pytest.raises(AllAttemptsFailedError) as caught:
        await orchestrator.complete(ask(), RouteOptions(mode="cost", max_retries=1))
    assert len(caught.value.attempts) == 2
    assert len({a.provider for a in caught.value.attempts}) == 2
    events = orchestrator.bus.subscribe(kinds={"request_completed"})
    with pytest.raises(ServerError) as single:  # one model tried: its own error, as the provider said it
        await orchestrator.complete(ask(), RouteOptions(mode="cost", failover=False))
    assert single.value.status == 503
    (event,) = events.drain()
    assert len(event.record.attempts) == 1 and event.record.error_kind == "server_error"


async def test_nothing_eligible_is_an_error_and_still_recorded(orchestrator):
    events = orchestrator.bus.subscribe(kinds={"request_completed"})
    with pytest.raises(NoEligibleModelError, match="over max_cost_usd"):
        await orchestrator.complete(ask(), RouteOptions(max_cost_usd=1e-12))
    (event,) = events.drain()
    assert event.record.status == "error" and event.record.error_kind == "no_eligible_model"


async def test_a_refused_request_never_reaches_the_cache(sim_settings, sim):
    hooks = CachingHooks(budget_left=0.0)
    async with Orchestrator(sim_settings, hooks=hooks) as orchestrator:
        with pytest.raises(NoEligibleModelError):
            await orchestrator.complete(ask("cached?"), RouteOptions(max_cost_usd=1e-12))
        with pytest.raises(BudgetExceededError):
            await orchestrator.complete(ask("cached?"), ctx=CallContext(session_id="s1"))
        with pytest.raises(BudgetExceededError):
            await orchestrator.stream(ask("cached?", stream=True), ctx=CallContext(session_id="s1")).__anext__()
    assert hooks.lookups == 0 and len(hooks.budget_checks) == 2 and sim.state.stats()["calls"] == 0


class CachingHooks(NoHooks):
    """The cache seam as the store package fills it: one canned answer, and what was recorded."""

    def __init__(self, budget_left: float = float("inf")) -> None:
        self.completed_records = []
        self.budget_checks = []
        self.lookups = 0
        self.budget_left = budget_left

    async def lookup(self, request, options, ctx):
        self.lookups += 1
        if request.last_user_text() != "cached?":
            return None
        answer = ChatResponse(provider="groq", model="m", content="from the cache", usage=Usage(10, 5))
        return CachedAnswer(answer, "exact", 1.0, saved_usd=0.002)

    async def check_budget(self, ctx, est_cost_usd):
        self.budget_checks.append(est_cost_usd)
        if est_cost_usd > self.budget_left:
            raise BudgetExceededError("over the test's budget")

    def completed(self, record, request, response, options, ctx):
        self.completed_records.append(record)


async def test_hooks_cache_hit_budget_check_and_ledger(sim_settings, sim):
    hooks = CachingHooks()
    async with Orchestrator(sim_settings, hooks=hooks) as orchestrator:
        events = orchestrator.bus.subscribe()
        hit = await orchestrator.complete(ask("cached?"), ctx=CallContext(session_id="s1"))
        assert hit.content == "from the cache"
        assert hit.p402.cached and hit.p402.cost_usd == 0 and hit.p402.saved_usd == 0.002
        assert [e.kind for e in events.drain()] == ["cache_hit", "request_completed"]
        # The budget is checked before the cache: only a request that could be served costs a lookup.
        assert sim.state.stats()["calls"] == 0 and len(hooks.budget_checks) == 1
        chunks = [c async for c in orchestrator.stream(ask("cached?", stream=True))]
        assert "".join(c.content for c in chunks) == "from the cache" and chunks[-1].usage.prompt_tokens == 10
        miss = await orchestrator.complete(ask("fresh"), ctx=CallContext(session_id="s1"))
        assert not miss.p402.cached and len(hooks.budget_checks) == 3 and hooks.budget_checks[-1] > 0
        assert [r.cached for r in hooks.completed_records] == [True, True, False]
        assert hooks.completed_records[-1].session_id == "s1"


def test_cli_chat_routes_around_a_503_on_the_cost_winner(sim_process, catalog):
    from p402_tui.core.config import load_settings
    from p402_tui.core.router import Router

    settings = load_settings(sim_process["config"], env={})
    request = ask("Which river is longest?")
    decision = Router.from_settings(settings).route(request, RouteOptions(mode="cost"))
    loser = catalog.models[decision.chosen_id].provider
    httpx.delete(f"{sim_process['url']}/_sim/faults")
    httpx.post(f"{sim_process['url']}/_sim/faults", json={"provider": loser, "kind": "error", "status": 503}).raise_for_status()
    try:
        result = run_cli("chat", "--mode", "cost", "--json", "Which river is longest?", config=sim_process["config"])
    finally:
        httpx.delete(f"{sim_process['url']}/_sim/faults")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [a["provider"] for a in data["attempts"]][0] == loser
    assert len(data["attempts"]) == 2 and data["attempts"][0]["error_kind"] == "server_error"
    assert data["provider"] != loser and data["content"] and data["decision_id"]
    assert {"usage", "cost_usd", "latency_ms", "ttft_ms", "model"} <= set(data)


def test_cli_route_dry_run_json_and_table(sim_process):
    result = run_cli(
        "route", "--mode", "cost", "--require", "vision", "--exclude", "groq", "--max-tier", "mid",
        "--max-cost", "0.01", "--max-tokens", "200", "--json", "Describe the picture.", config=sim_process["config"],
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"id", "provider", "model", "tier", "est_cost_usd"} <= set(data["chosen"])
    assert data["fallbacks"] == [c["id"] for c in data["candidates"][1:]]
    assert all({"id", "score", "est_cost_usd", "components"} <= set(c) for c in data["candidates"])
    reasons = {e["reason"] for e in data["excluded"]}
    assert {"missing capability vision", "excluded provider", "over max_tier"} <= reasons
    assert data["decision_us"] > 0 and data["est_output_tokens"] == 200
    table = run_cli("route", "--mode", "quality", "--top", "3", "Hello", config=sim_process["config"])
    assert table.returncode == 0 and "chosen:" in table.stdout and "MODEL" in table.stdout


def test_cli_route_without_providers_says_so(tmp_path):
    empty = tmp_path / "config.toml"
    empty.write_text("")
    result = run_cli("route", "Hello", config=empty)
    assert result.returncode == 1 and result.stderr.startswith("p402: config: no provider is configured")
    assert "--all" in result.stderr and result.stderr.count("\n") == 1
    explore = run_cli("route", "--all", "--json", "Hello", config=empty)
    assert explore.returncode == 0 and json.loads(explore.stdout)["chosen"]


def test_ids_are_hex_of_their_size_and_do_not_repeat():
    import re

    from p402_tui.core.types import new_id

    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"chatcmpl-[0-9a-f]{24}", i) for i in ids)
    assert re.fullmatch(r"req-[0-9a-f]{20}", new_id("req", 10))
