"""Health tracking and the circuit breaker, driven by an injected clock (no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import free_port
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.core.errors import BadRequestError, ContextLengthError, RateLimitError, ServerError
from p402_tui.core.events import EventBus, HealthChanged
from p402_tui.core.health import HealthPolicy, HealthTracker
from p402_tui.core.adapters import make_adapter


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
    health = HealthTracker(clock=clock, policy=HealthPolicy(window_max=10, failure_threshold=100))
    for _ in range(10):
        fail(health)
    for _ in range(10):
        health.record_success("groq", "groq/m", latency_ms=5)
    assert health.provider("groq").error_rate == 0.0


def test_consecutive_failures_open_then_half_open_then_closed(health, clock, bus):
    events = bus.subscribe()
    fail(health)
    fail(health)
    assert health.circuit("groq") == "closed" and health.allow("groq")
    assert health.provider("groq").consecutive_failures == 2
    fail(health)
    state = health.provider("groq")
    assert state.circuit == "open" and state.status == "down"
    assert "3 consecutive failures (server_error)" in state.reason
    assert state.retry_at is not None
    assert not health.allow("groq") and health.blocked("groq")
    clock.advance(9.9)
    assert not health.allow("groq")
    clock.advance(0.1)  # the 10 s cooldown is over: one trial request may go
    assert health.allow("groq")
    assert health.circuit("groq") == "half_open"
    assert not health.allow("groq")  # only one trial at a time
    health.record_success("groq", "groq/m", latency_ms=10)
    assert health.circuit("groq") == "closed" and health.allow("groq")
    assert changes(events) == [("degraded", "closed"), ("down", "open"), ("degraded", "half_open"), ("degraded", "closed")]
    assert "error rate 75%" in health.provider("groq").reason  # closed again, but the window remembers
    clock.advance(60)
    assert health.provider("groq").status == "healthy"


def test_a_failed_trial_reopens_with_a_longer_wait(health, clock):
    for _ in range(3):
        fail(health)
    clock.advance(10)
    assert health.allow("groq")
    fail(health)
    assert health.circuit("groq") == "open"
    clock.advance(19.9)
    assert not health.allow("groq")
    clock.advance(0.1)
    assert health.allow("groq")


def test_a_cancelled_trial_frees_its_slot(health, clock):
    for _ in range(3):
        fail(health)
    clock.advance(10)
    assert health.allow("groq") and not health.allow("groq")
    health.release("groq")
    assert health.allow("groq")


def test_rate_limit_with_a_wait_opens_for_exactly_that_wait(health, clock, bus):
    events = bus.subscribe()
    health.record_failure("groq", "groq/m", RateLimitError("slow down", provider="groq", status=429, retry_after_s=7.5))
    state = health.provider("groq")
    assert state.circuit == "open" and "retry after 7.5s" in state.reason
    clock.advance(7.49)
    assert health.blocked("groq") and not health.allow("groq")
    clock.advance(0.01)
    assert not health.blocked("groq") and health.allow("groq")
    health.record_success("groq", "groq/m", latency_ms=10)
    assert [c for _, c in changes(events)] == ["open", "half_open", "closed"]


def test_a_high_error_rate_opens_the_circuit(clock):
    health = HealthTracker(clock=clock)
    for i in range(10):
        if i % 2:
            fail(health)
        else:
            health.record_success("groq", "groq/m", latency_ms=10)
    state = health.provider("groq")
    assert state.circuit == "open" and "error rate 50% over 10 calls" in state.reason


def test_request_errors_leave_health_alone(health):
    health.record_failure("groq", "groq/m", BadRequestError("bad", provider="groq", status=400))
    health.record_failure("groq", "groq/m", ContextLengthError("too long", provider="groq", status=400))
    assert health.snapshot() == {}


def test_model_not_found_opens_only_that_models_circuit(health):
    health.record_failure("groq", "groq/gone", "model_not_found")
    assert health.blocked("groq", "groq/gone")
    assert not health.blocked("groq", "groq/other")
    assert health.allow("groq", "groq/other")
    assert health.circuit("groq") == "closed"


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
