"""Fixed console data for the TUI tests and snapshots (this module holds no tests).

Decisions come from the real router over a small hand-made catalog, health from
the real health tracker on a fixed clock, and the outcomes are real bus events,
so the pictures show what the code does; only ids, times and the catalog are
pinned so that they never change between runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import date

from textual.command import CommandList, CommandPalette

from p402_tui.core.catalog import parse_catalog
from p402_tui.core.config import RouterConfig
from p402_tui.core.events import AttemptFailed, HealthChanged, RequestCompleted, RouteDecided
from p402_tui.core.health import HealthTracker
from p402_tui.core.hooks import RequestRecord
from p402_tui.core.router import Router
from p402_tui.core.types import Attempt
from p402_tui.sim.traffic import TrafficGenerator
from p402_tui.tui.state import CacheInfo, ConsoleState, SpendSummary

T0 = 1_790_000_000.0  # a fixed "now" for every picture
SIZE = (160, 48)

CATALOG = {
    "checked_on": "2026-01-01",
    "providers": [
        {"id": "openai", "name": "OpenAI", "wire": "openai", "base_url": "https://example.invalid/v1"},
        {"id": "anthropic", "name": "Anthropic", "wire": "anthropic", "base_url": "https://example.invalid/v1"},
        {"id": "groq", "name": "Groq", "wire": "openai", "base_url": "https://example.invalid/openai/v1"},
        {"id": "mistral", "name": "Mistral", "wire": "openai", "base_url": "https://example.invalid/v1"},
    ],
    "models": [
        {"id": "openai/gpt-mini", "name": "GPT mini", "tier": "budget", "context_window": 128000, "max_output_tokens": 16000,
         "input_per_1m": 0.15, "output_per_1m": 0.6, "quality": 0.62, "tokens_per_s": 90, "ttft_ms": 350,
         "capabilities": ["chat", "streaming", "vision", "function_calling", "json_mode"]},
        {"id": "openai/gpt-large", "name": "GPT large", "tier": "premium", "context_window": 200000, "max_output_tokens": 32000,
         "input_per_1m": 5.0, "output_per_1m": 15.0, "quality": 0.92, "tokens_per_s": 45, "ttft_ms": 700,
         "capabilities": ["chat", "streaming", "vision", "function_calling", "json_mode", "reasoning"]},
        {"id": "anthropic/haiku", "name": "Haiku", "tier": "budget", "context_window": 200000, "max_output_tokens": 8000,
         "input_per_1m": 0.8, "output_per_1m": 4.0, "quality": 0.66, "tokens_per_s": 110, "ttft_ms": 400,
         "capabilities": ["chat", "streaming", "vision", "function_calling"]},
        {"id": "anthropic/sonnet", "name": "Sonnet", "tier": "mid", "context_window": 200000, "max_output_tokens": 64000,
         "input_per_1m": 3.0, "output_per_1m": 15.0, "quality": 0.88, "tokens_per_s": 60, "ttft_ms": 600,
         "capabilities": ["chat", "streaming", "vision", "function_calling", "json_mode", "reasoning"]},
        {"id": "groq/llama-fast", "name": "Llama fast", "tier": "budget", "context_window": 131072, "max_output_tokens": 8192,
         "input_per_1m": 0.05, "output_per_1m": 0.08, "quality": 0.5, "tokens_per_s": 700, "ttft_ms": 150,
         "capabilities": ["chat", "streaming", "function_calling", "json_mode"]},
        {"id": "groq/llama-big", "name": "Llama big", "tier": "mid", "context_window": 131072, "max_output_tokens": 8192,
         "input_per_1m": 0.59, "output_per_1m": 0.79, "quality": 0.7, "tokens_per_s": 300, "ttft_ms": 200,
         "capabilities": ["chat", "streaming", "function_calling", "json_mode"]},
        {"id": "mistral/small", "name": "Mistral small", "tier": "budget", "context_window": 32000, "max_output_tokens": 8192,
         "input_per_1m": 0.1, "output_per_1m": 0.3, "quality": 0.58, "tokens_per_s": 150, "ttft_ms": 300,
         "capabilities": ["chat", "streaming", "function_calling", "json_mode"]},
        {"id": "mistral/large", "name": "Mistral large", "tier": "premium", "context_window": 128000, "max_output_tokens": 8192,
         "input_per_1m": 2.0, "output_per_1m": 6.0, "quality": 0.84, "tokens_per_s": 70, "ttft_ms": 500,
         "capabilities": ["chat", "streaming", "vision", "function_calling", "json_mode"]},
    ],
}  # fmt: skip

SESSIONS = [
    {"id": "ses-support", "name": "support-bot", "budget_usd": 0.5, "spent_usd": 0.1234, "requests": 41, "status": "active"},
    {"id": "ses-review", "name": "code-review-agent", "budget_usd": 2.0, "spent_usd": 1.62, "requests": 118, "status": "active"},
    {"id": "ses-nightly", "name": "nightly-summaries", "budget_usd": 0.05, "spent_usd": 0.0497, "requests": 12, "status": "paused"},
    {"id": "ses-research", "name": "research-assistant", "budget_usd": None, "spent_usd": 3.2101, "requests": 64, "status": "active"},
]


def pin_timezone() -> None:
    """Times on screen are local: pin the zone so pictures match anywhere."""
    os.environ["TZ"] = "UTC"
    time.tzset()


def sample_health() -> dict[str, dict]:
    """Four providers: groq healthy and busy, anthropic degraded, mistral down (refusing connections), ejected."""
    now = [1000.0]
    tracker = HealthTracker(clock=lambda: now[0])
    for i in range(40):
        now[0] += 1.5
        tracker.record_success("groq", "groq/llama-fast", latency_ms=180 + (i * 37) % 160, ttft_ms=90, output_tokens=120)
        tracker.record_success("openai", "openai/gpt-mini", latency_ms=600 + (i * 53) % 500, ttft_ms=330, output_tokens=120)
        if i % 3 == 0:
            tracker.record_failure("anthropic", "anthropic/haiku", "server_error", latency_ms=900)
        else:
            tracker.record_success("anthropic", "anthropic/haiku", latency_ms=1100 + (i * 71) % 700, ttft_ms=420, output_tokens=90)
        if i < 34:
            tracker.record_success("mistral", "mistral/small", latency_ms=500 + (i * 29) % 300, ttft_ms=260, output_tokens=100)
        else:
            tracker.record_failure("mistral", "mistral/small", "connection", latency_ms=120)
    snapshot = {pid: h.to_dict() for pid, h in tracker.snapshot(["anthropic", "groq", "mistral", "openai"]).items()}
    for health in snapshot.values():
        if health["retry_at"] is not None:
            health["retry_at"] = T0 + 8  # the tracker's wall clock, pinned
    return snapshot


def sample_state(decisions: int = 36) -> ConsoleState:
    """A console state after a minute of varied traffic, one failover, one error, one cached answer."""
    catalog = parse_catalog(CATALOG)
    router = Router(catalog, RouterConfig(), today=date(2026, 1, 1))
    traffic = TrafficGenerator(None, None, seed=11)
    state = ConsoleState()
    events = []
    for i in range(decisions):
        request, options, ctx = traffic.next_request()
        decision = router.route(request, options)
        decision.id, decision.ts, decision.decision_us = f"dec-{i:04d}", T0 - 60 + i * 1.6, 18.0 + i % 7
        events.append(RouteDecided(decision=decision, ts=decision.ts))
        chosen = decision.chosen
        if chosen is None:
            continue
        done = decision.ts + 0.4 + (i % 5) * 0.2
        provider, model = chosen.provider, chosen.model
        attempts: list[Attempt] = []
        if i % 9 == 4 and decision.fallbacks:
            error = "server_error 503 from {0}/{1}: the model is overloaded".format(provider, model)
            attempts.append(Attempt(provider, model, "server_error", error, 210.0))
            events.append(
                AttemptFailed(
                    request_id=f"req-{i:04d}", decision_id=decision.id, provider=provider, model=model,
                    error_kind="server_error", error=error, will_retry=True, ts=decision.ts + 0.2,
                )
            )  # fmt: skip
            provider, model = decision.fallbacks[0].split("/", 1)
        failed = i % 13 == 7
        attempts.append(Attempt(provider, model, "rate_limited" if failed else None, "429: slow down" if failed else None, 300.0))
        cost = 0.0 if failed else round(chosen.est_cost_usd * (0.6 + (i % 4) * 0.1), 8)
        record = RequestRecord(
            id=f"req-{i:04d}", ts=done, session_id=ctx.session_id, mode=decision.mode, provider=provider, model=model,
            prompt_tokens=decision.prompt_tokens, completion_tokens=0 if failed else 80 + i * 3, cost_usd=cost,
            est_cost_usd=chosen.est_cost_usd, latency_ms=(done - decision.ts) * 1000, ttft_ms=150.0 + i,
            status="error" if failed else "ok", error_kind="rate_limited" if failed else None,
            error="all attempts failed: 429: slow down" if failed else None, decision_id=decision.id,
            attempts=attempts, source="demo",
        )  # fmt: skip
        events.append(RequestCompleted(record=record, ts=done))
    cached = RequestRecord(
        id="req-cached", ts=T0 - 2, mode="balanced", provider="openai", model="gpt-mini", cached=True,
        saved_usd=0.000321, latency_ms=3.0, status="ok", source="demo",
    )  # fmt: skip
    events.append(RequestCompleted(record=cached, ts=cached.ts))
    events.append(HealthChanged(provider="mistral", status="down", previous="healthy", reason="3 failures in a row", circuit="open"))
    state.fold(events)
    state.notices.clear()
    state.set_health(sample_health())
    state.set_sessions(SESSIONS)
    state.set_summary(
        SpendSummary(
            today_usd=4.8123, week_usd=31.07, month_usd=118.4, requests_today=1834, saved_usd=0.4172, cache_hits=212,
            top_models=[("anthropic/sonnet", 2.91, 310), ("openai/gpt-mini", 0.88, 902), ("groq/llama-fast", 0.12, 488)],
            cache=CacheInfo(enabled=True, embedder="all-MiniLM-L6-v2", label="semantic"),
        )
    )  # fmt: skip
    return state


async def run_command(pilot, query: str, timeout: float = 10.0) -> None:
    """Type `query` into the open command palette and run the top hit once its title has every word of it.

    The palette searches in a worker and lists hits in batches: after a fixed pause,
    Enter on a loaded machine may pick an earlier query's hit, or nothing.
    """
    await pilot.press(*query)
    words = query.lower().split()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        palette = pilot.app.screen
        if isinstance(palette, CommandPalette):
            hits = palette.query_one(CommandList)
            if hits.option_count and hits.highlighted is not None:
                title = hits.get_option_at_index(hits.highlighted).prompt.plain.split("\n")[0].lower()
                if all(word in title for word in words):
                    break
        if loop.time() > deadline:
            raise AssertionError(f"the palette offered no command for {query!r}")
        await pilot.pause(0.02)
    await pilot.press("enter")
