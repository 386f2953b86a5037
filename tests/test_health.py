"""Health tracking and outlier ejection, driven by an injected clock (no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import free_port
from helpers import adapters_on
from p402_tui.core.config import ConfigFile, HealthConfig, Settings
from p402_tui.core.errors import (
    AuthenticationError,
    BadRequestError,
    ConnectionLostError,
    ContextLengthError,
    RateLimitError,
    ServerError,
)
from p402_tui.core.events import EventBus, HealthChanged
from p402_tui.core.health import HealthPolicy, HealthTracker
from p402_tui.core.adapters import make_adapter
from p402_tui.core.types import ChatRequest
from p402_tui.sim.engine import Fault


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def bus():
    return EventBus()


@pytest.fixture
def health(clock, bus):
    return HealthTracker(bus=bus, clock=clock)


def fail(health: HealthTracker, provider: str = "groq", model: str = "groq/m", **kw) -> None:
    health.record_failure(provider, model, ServerError("boom", provider=provider, status=503), **kw)


def changes(subscription) -> list[tuple[str, str]]:
    return [(e.status, e.circuit) for e in subscription.drain() if isinstance(e, HealthChanged)]


def test_ewma_latency_ttft_and_tokens_per_second(health):
    health.record_success("groq", "groq/m", latency_ms=100, ttft_ms=20, output_tokens=81)
    health.record_success("groq", "groq/m", latency_ms=200, ttft_ms=40, output_tokens=161)
    state = health.provider("groq")
    assert state.latency_ms_ewma == pytest.approx(100 + 0.3 * (200 - 100))
    assert state.ttft_ms_ewma == pytest.approx(20 + 0.3 * (40 - 20))
    # 80 tokens/80 ms after the first, then 160 more in 160 ms: 1012.5 then 1006.25 tokens/s
    assert state.tokens_per_s == pytest.approx(1012.5 + 0.3 * (1006.25 - 1012.5))
    assert state.history == [100, 200]
    assert state.requests == 2 and state.status == "healthy"
    live = health.model_live("groq/m")
    assert live is not None and live.ttft_ms == pytest.approx(26.0)


def test_error_rate_is_over_a_sliding_window(health, clock):
    fail(health)
    health.record_success("groq", "groq/m", latency_ms=10)
    state = health.provider("groq")
    assert state.error_rate == pytest.approx(0.5)
    assert state.status == "degraded" and "error rate 50%" in state.reason
    clock.advance(59)
    health.record_success("groq", "groq/m", latency_ms=10)
    assert health.provider("groq").error_rate == pytest.approx(1 / 3)
    clock.advance(2)  # the failure and the first success are now older than the 60 s window
    state = health.provider("groq")
    assert state.error_rate == 0.0 and state.status == "healthy"
    assert state.requests == 3 and state.failures == 1  # totals keep counting


def test_count_bounded_window(clock):
    health = HealthTracker(clock=clock, policy=HealthPolicy(window_max=10, min_requests=100))
    for _ in range(10):
        fail(health)
    for _ in range(10):
        health.record_success("groq", "groq/m", latency_ms=5)
    assert health.provider("groq").error_rate == 0.0


def test_the_config_table_and_the_policy_agree_on_every_default():
    assert HealthPolicy(**HealthConfig().model_dump()) == HealthPolicy()


# --- ejection by error rate, per model first ---------------------------------------------------


def test_failures_below_the_minimum_volume_never_eject(health):
    for _ in range(19):  # however many in a row: consecutive errors are no reason on their own
        fail(health)
    assert health.allow("groq", "groq/m") and not health.blocked("groq", "groq/m")
    fail(health)  # the 20th call: 100 % over the minimum volume
    assert health.blocked("groq", "groq/m") and not health.allow("groq", "groq/m")
    assert not health.blocked("groq", "groq/other") and health.allow("groq", "groq/other")
    state = health.provider("groq")
    assert state.circuit == "closed" and state.status == "degraded"  # one model out: not the provider
    assert "groq/m ejected" in state.reason


def test_an_ordinary_error_rate_keeps_serving(health):
    for i in range(200):  # 20 % failing, as in the probe: no ejection at all
        if i % 5 == 0:
            fail(health)
        else:
            health.record_success("groq", "groq/m", latency_ms=10)
        assert health.allow("groq", "groq/m")
    assert health.ejection("groq", "groq/m") is None and health.circuit("groq") == "closed"


def test_several_ejected_models_eject_their_provider(health, bus):
    events = bus.subscribe()
    for _ in range(60):  # a busy model that never fails keeps the provider's own rate under half
        health.record_success("groq", "groq/fine", latency_ms=10)
    for _ in range(20):
        fail(health, model="groq/a")
    assert health.circuit("groq") == "closed" and health.allow("groq", "groq/b")
    for _ in range(20):
        fail(health, model="groq/b")
    state = health.provider("groq")
    assert state.circuit == "open" and state.status == "down" and state.retry_at is not None
    assert "2 of its models ejected (groq/a, groq/b)" in state.reason
    assert health.blocked("groq") and not health.allow("groq", "groq/never-called")
    assert changes(events)[-2:] == [("degraded", "closed"), ("down", "open")]


def test_several_models_failing_together_eject_their_provider(health):
    for _ in range(30):  # one model failing alone, however badly, is that model's trouble
        fail(health, model="groq/a")
    assert health.circuit("groq") == "closed" and health.blocked("groq", "groq/a")
    assert health.allow("groq", "groq/b")
    fail(health, model="groq/b")  # a second model fails too: it is the provider
    state = health.provider("groq")
    assert state.circuit == "open" and "error rate 100% over 31 calls to 2 of its models" in state.reason


def test_refused_connections_eject_the_provider_fast(health):
    def refused():
        health.record_failure("groq", "groq/m", ConnectionLostError("refused", provider="groq", phase="connect"))

    refused()
    refused()
    fail(health)  # another kind of failure breaks the run
    refused()
    refused()
    for _ in range(5):  # a connection the server closed before answering is an ordinary failure
        health.record_failure("groq", "groq/m", ConnectionLostError("closed", provider="groq", phase="read"))
    refused()
    refused()
    assert health.circuit("groq") == "closed"
    refused()
    assert health.circuit("groq") == "open" and "3 connections refused in a row" in health.provider("groq").reason


async def test_a_refused_connection_is_told_from_one_closed_mid_answer(sim, adapter_for, sim_settings):
    dead = Settings(ConfigFile(), sim_settings.catalog, env={}).point_at(f"http://127.0.0.1:{free_port()}")
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}])
    async with adapters_on(dead) as build:
        with pytest.raises(ConnectionLostError) as refused:
            await build("groq").complete(request, model="llama-3.3-70b-versatile")
    assert refused.value.phase == "connect"
    sim.state.add_fault(Fault(provider="groq", kind="disconnect", count=1))
    with pytest.raises(ConnectionLostError) as closed:
        await adapter_for("groq").complete(request, model="llama-3.3-70b-versatile")
    assert closed.value.phase == "read"


def test_a_rejected_key_ejects_the_provider_at_once(health, clock):
    health.record_failure("groq", "groq/m", AuthenticationError("bad key", provider="groq", status=401))
    assert health.circuit("groq") == "open" and not health.allow("groq", "groq/other")
    clock.advance(59.9)
    assert health.blocked("groq")
    clock.advance(0.1)
    assert not health.blocked("groq") and health.allow("groq")


def test_model_not_found_ejects_only_that_model(health):
    health.record_failure("groq", "groq/gone", "model_not_found")
    assert health.blocked("groq", "groq/gone")
    assert not health.blocked("groq", "groq/other")
    assert health.allow("groq", "groq/other")
    assert health.circuit("groq") == "closed"
    eject(health, "groq/other")  # one failing model and one the provider never had: not the provider's fault
    assert health.circuit("groq") == "closed"


# --- half-open and backoff -------------------------------------------------------------------------


def eject(health: HealthTracker, model: str = "groq/m") -> None:
    for _ in range(20):
        fail(health, model=model)


def test_half_open_admits_a_bounded_number_of_trials_then_closes(health, clock, bus):
    events = bus.subscribe()
    eject(health)
    clock.advance(4.9)
    assert not health.allow("groq", "groq/m")
    clock.advance(0.1)  # the first ejection's 5 s are served
    assert [health.allow("groq", "groq/m") for _ in range(4)] == [True, True, True, False]
    health.release("groq", "groq/m")  # a cancelled trial gives its slot back
    assert health.allow("groq", "groq/m") and not health.allow("groq", "groq/m")
    clock.advance(30)  # trials that never report free their slots
    assert health.allow("groq", "groq/m")
    health.record_success("groq", "groq/m", latency_ms=10)
    assert health.allow("groq", "groq/m") and health.ejection("groq", "groq/m") is None
    fail(health)  # the failures that ejected it are judged: one more does not eject it again
    assert health.allow("groq", "groq/m")
    state = health.provider("groq")  # back in service, degraded by its last failure: not ejected
    assert state.status == "degraded" and "ejected" not in state.reason
    assert [s for s, _ in changes(events)] == ["degraded"]


def test_a_failed_trial_ejects_again_for_twice_as_long_up_to_the_cap(health, clock):
    eject(health)
    waits = []
    for _ in range(7):
        start = clock.now
        while not health.allow("groq", "groq/m"):
            clock.advance(0.5)
        waits.append(clock.now - start)
        fail(health)  # the trial fails
    assert waits == [5, 10, 20, 40, 80, 120, 120]


def test_the_backoff_starts_over_after_a_healthy_stretch(health, clock):
    eject(health)
    clock.advance(5)
    assert health.allow("groq", "groq/m")
    fail(health)  # ejected again: 10 s
    clock.advance(10)
    assert health.allow("groq", "groq/m")
    health.record_success("groq", "groq/m", latency_ms=10)
    clock.advance(121)  # healthy for longer than the longest ejection
    eject(health)
    assert health.ejection("groq", "groq/m").retry_in_s == pytest.approx(5)


# --- 429: a throttle of the model, for as long as asked ------------------------------------------


def limited(health, model="groq/m", retry_after_s=None, body=None):
    error = RateLimitError("slow down", provider="groq", status=429, retry_after_s=retry_after_s, body=body)
    health.record_failure("groq", model, error)


def test_a_429_throttles_only_its_model_for_its_retry_after(health, clock, bus):
    events = bus.subscribe()
    limited(health, retry_after_s=7.5)
    assert health.blocked("groq", "groq/m") and not health.allow("groq", "groq/m")
    assert not health.blocked("groq") and health.allow("groq", "groq/other")
    state = health.provider("groq")
    assert state.circuit == "closed" and state.status == "degraded" and "groq/m throttled" in state.reason
    standing = health.ejection("groq", "groq/m")
    assert standing.throttled and standing.retry_in_s == pytest.approx(7.5)
    assert not health.allow("groq", "groq/m", despite_ejection=True)  # the ejection cap does not override a throttle
    clock.advance(7.5)
    assert not health.blocked("groq", "groq/m") and health.allow("groq", "groq/m")
    health.tick()
    assert changes(events) == [("degraded", "closed"), ("healthy", "closed")]


def test_a_429_without_retry_after_waits_a_doubling_default_and_a_long_one_is_capped(health, clock):
    waits = []
    for _ in range(4):
        limited(health, model="groq/a")
        waits.append(health.ejection("groq", "groq/a").retry_in_s)
        clock.advance(waits[-1])
    assert waits == [1, 2, 4, 8]
    health.record_success("groq", "groq/a", latency_ms=10)  # the limit has passed: back to the short wait
    limited(health, model="groq/a")
    assert health.ejection("groq", "groq/a").retry_in_s == pytest.approx(1)
    limited(health, model="groq/b", retry_after_s=86400)
    assert health.ejection("groq", "groq/b").retry_in_s == pytest.approx(300)


def test_many_429s_never_eject_anything(health):
    for _ in range(100):
        limited(health, retry_after_s=0)
    assert health.circuit("groq") == "closed" and health.allow("groq", "groq/m")


def test_a_spent_quota_throttles_the_key_so_the_whole_provider(health):
    limited(health, retry_after_s=30, body={"type": "insufficient_quota", "code": "insufficient_quota"})
    assert health.blocked("groq") and not health.allow("groq", "groq/other")
    state = health.provider("groq")
    assert state.status == "down" and "key quota" in state.reason


def test_ejection_reports_how_bad_a_candidate_is(health, clock):
    eject(health, "groq/a")
    for i in range(20):
        if i % 4:
            fail(health, model="groq/c")
        else:
            health.record_success("groq", "groq/c", latency_ms=10)
    a, c = health.ejection("groq", "groq/a"), health.ejection("groq", "groq/c")
    assert not a.throttled and a.retry_in_s == pytest.approx(5)
    assert c.error_rate < a.error_rate  # c is the least bad: tried first beyond the ejection cap


def test_request_errors_leave_health_alone(health):
    health.record_failure("groq", "groq/m", BadRequestError("bad", provider="groq", status=400))
    health.record_failure("groq", "groq/m", ContextLengthError("too long", provider="groq", status=400))
    assert health.snapshot() == {}


def test_snapshot_shape_and_hooks_callback(clock):
    seen = []
    health = HealthTracker(clock=clock, on_change=seen.append)
    fail(health, latency_ms=42)
    data = health.snapshot()["groq"].to_dict()
    assert set(data) >= {
        "provider", "status", "reason", "circuit", "retry_at", "failures", "consecutive_failures", "error_rate",
        "requests", "requests_per_min", "latency_ms_p50", "latency_ms_p95", "ttft_ms_ewma", "tokens_per_s",
        "last_error", "history",
    }
    assert data["requests_per_min"] == 1.0 and data["history"] == [42]
    assert seen and seen[-1]["provider"] == "groq" and seen[-1]["status"] == "degraded"


def test_latency_percentiles(health):
    for latency in range(1, 101):
        health.record_success("groq", "groq/m", latency_ms=float(latency))
    state = health.provider("groq")
    assert state.latency_ms_p50 == 50 and state.latency_ms_p95 == 95


async def test_active_probes_call_the_real_adapter(sim, sim_settings):
    health = HealthTracker()
    alive = make_adapter(sim_settings.providers["anthropic"])
    dead_settings = Settings(ConfigFile(), sim_settings.catalog, env={}).point_at(f"http://127.0.0.1:{free_port()}")
    dead = make_adapter(dead_settings.providers["mistral"])  # nothing listens there
    try:
        health.start_probes({"anthropic": alive, "mistral": dead}, 0.02)
        for _ in range(300):
            if health.provider("anthropic").requests >= 2 and health.provider("mistral").requests >= 2:
                break
            await asyncio.sleep(0.01)
        up, down = health.provider("anthropic"), health.provider("mistral")
        assert up.requests >= 2 and up.failures == 0 and up.status == "healthy"
        assert down.failures >= 2 and down.status in ("degraded", "down")
        assert down.last_error.startswith("probe: connection")
    finally:
        await health.aclose()
        await alive.aclose()
        await dead.aclose()


@pytest.mark.parametrize("provider", ["openai", "anthropic", "google", "cohere", "mistral"])
async def test_a_bare_429_carries_no_wait_and_throttles_for_the_default(sim, adapter_for, provider):
    # The simulator's `wait_hint: false` is a 429 without Retry-After (or reset header, or RetryInfo).
    adapter = adapter_for(provider)
    model = next(m.model for m in sim.state.catalog.models.values() if m.provider == provider)
    sim.state.add_fault(Fault(provider=provider, kind="rate_limit", wait_hint=False, count=1))
    with pytest.raises(RateLimitError) as limited:
        await adapter.complete(ChatRequest(messages=[{"role": "user", "content": "hi"}]), model=model)
    assert limited.value.status == 429 and limited.value.retry_after_s is None
    health = HealthTracker()
    health.record_failure(provider, f"{provider}/{model}", limited.value)
    assert health.ejection(provider, f"{provider}/{model}").retry_in_s == pytest.approx(1, abs=0.1)
