"""One scenario suite for every provider, whatever its wire family, against the real simulator.

Plain and streamed answers, usage and cost, tools, images, each fault the simulator
injects, the errors a provider answers with, and closing a stream. A new provider or
wire family joins by adding its model to `MODELS`; what only one family does (its
dialect, its SDK, its own error shapes) stays in that family's test file.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from helpers import OPENAI_FAMILY_MODELS, PNG, WEATHER, adapters_on, own_sim_adapter, wait_until, with_context_window

from p402_tui.core import errors
from p402_tui.core.costs import call_cost
from p402_tui.core.types import ChatRequest
from p402_tui.providers.base import StreamAssembler

MODELS = {
    **OPENAI_FAMILY_MODELS,
    "anthropic": "claude-haiku-4-5-20251001",
    "google": "gemini-2.5-flash",
    "cohere": "command-a-03-2025",
}
PROVIDERS = list(MODELS)
FAMILIES = ["openai", "anthropic", "google", "cohere"]  # one provider of each wire family
# An error status the simulator injects, and what each family's adapter makes of it.
STATUS_ERRORS = {
    "openai": {500: errors.ServerError, 502: errors.ServerError, 503: errors.ServerError, 529: errors.OverloadedError},
    "anthropic": {500: errors.ServerError, 503: errors.ServerError, 529: errors.OverloadedError},
    "google": {500: errors.ServerError, 503: errors.OverloadedError},
    "cohere": {500: errors.ServerError, 503: errors.OverloadedError},
}


def family(pid: str) -> str:
    return pid if pid in FAMILIES else "openai"


def ask(text: str = "Say something about routers.", **fields) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **fields)


@pytest.fixture
async def adapters(fresh_sim_settings):
    async with adapters_on(fresh_sim_settings) as build:
        yield build


async def streamed(adapter, request, model):
    """The chunks of a streamed answer, and the answer they make up."""
    chunks = [chunk async for chunk in adapter.stream(request, model=model)]
    assembler = StreamAssembler(adapter.id, model)
    for chunk in chunks:
        assembler.add(chunk)
    return chunks, assembler.response()


async def contents_until_error(adapter, request, model, expected):
    seen = []
    with pytest.raises(expected) as caught:
        async for chunk in adapter.stream(request, model=model):
            if chunk.content:
                seen.append(chunk.content)
    return seen, caught.value


# --- answers, usage and cost ---------------------------------------------------------------


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_plain_and_streamed_answers_agree_and_are_billed_the_same(pid, adapters, catalog):
    adapter, model = adapters(pid), MODELS[pid]
    request = ask("Twins cost the same, right?", max_tokens=120)
    plain = await adapter.complete(request, model=model)
    assert plain.provider == pid and plain.content and plain.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0

    chunks, stream = await streamed(adapter, request, model)
    assert chunks[0].role == "assistant"
    assert [c.usage for c in chunks if c.usage is not None] == [plain.usage]  # usage exactly once, the same
    assert [c.finish_reason for c in chunks if c.finish_reason] == [plain.finish_reason]
    assert (stream.content, stream.reasoning) == (plain.content, plain.reasoning)
    spec = catalog.models[f"{pid}/{model}"]
    assert call_cost(spec, stream.usage) == call_cost(spec, plain.usage) > 0


# --- tools and images ----------------------------------------------------------------------


@pytest.mark.parametrize("pid", [pid for pid in PROVIDERS if pid != "perplexity"])  # Sonar has no tools
async def test_tool_calls_both_ways(pid, adapters):
    adapter, model = adapters(pid), MODELS[pid]
    request = ask("What is the weather in Paris?", tools=[WEATHER])
    plain = await adapter.complete(request, model=model)
    assert plain.finish_reason == "tool_calls" and not plain.content
    call = plain.tool_calls[0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    assert "city" in json.loads(call["function"]["arguments"])

    chunks, stream = await streamed(adapter, request, model)
    def named(calls):
        return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]

    assert named(stream.tool_calls) == named(plain.tool_calls) and stream.usage == plain.usage
    if pid != "google":  # the simulator gives each Gemini answer's calls fresh ids
        assert stream.tool_calls == plain.tool_calls
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["tool_calls"]
    # AI21 cannot stream with tools (the adapter replays the whole answer); Gemini streams a call whole.
    if pid not in ("ai21", "google"):
        assert sum(1 for c in chunks if c.tool_calls) > 1  # the call arrived in pieces

    follow_up = ChatRequest(
        messages=[
            *request.messages,
            {"role": "assistant", "content": None, "tool_calls": plain.tool_calls},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 21}'},
        ],
        tools=[WEATHER],
    )
    answer = await adapter.complete(follow_up, model=model)
    assert answer.content and not answer.tool_calls and answer.finish_reason == "stop"


@pytest.mark.parametrize("pid", FAMILIES)
async def test_an_image_part_is_answered(pid, adapters):
    adapter, model = adapters(pid), MODELS[pid]
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    request = ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    plain = await adapter.complete(request, model=model)
    _, stream = await streamed(adapter, request, model)
    assert plain.content and plain.finish_reason == "stop" and stream.content == plain.content


# --- models and health ---------------------------------------------------------------------


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_list_models_and_health(pid, adapters, catalog):
    adapter = adapters(pid)
    assert set(await adapter.list_models()) == {m.model for m in catalog.models_of(pid)}
    health = await adapter.health_check()
    assert health.ok and health.latency_ms > 0


# --- errors the provider answers with ------------------------------------------------------


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_a_missing_key_is_an_authentication_error(pid, adapters):
    keyless = adapters(pid, api_key=None)
    for attempt in (keyless.complete(ask(), model=MODELS[pid]), streamed(keyless, ask(), MODELS[pid])):
        with pytest.raises(errors.AuthenticationError) as caught:
            await attempt
        # Google answers a missing key with 400 INVALID_ARGUMENT; the adapter still calls it authentication.
        assert caught.value.status == (400 if pid == "google" else 401)
        assert caught.value.message and not caught.value.retryable
    assert not (await keyless.health_check()).ok


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_an_unknown_model_is_model_not_found(pid, adapters):
    adapter = adapters(pid)
    with pytest.raises(errors.ModelNotFoundError):
        await adapter.complete(ask(), model="no-such-model")
    with pytest.raises(errors.ModelNotFoundError):
        await streamed(adapter, ask(), "no-such-model")


@pytest.mark.parametrize("pid", FAMILIES)
async def test_a_prompt_over_the_context_window_is_a_context_length_error(pid, catalog):
    small = with_context_window(catalog, f"{pid}/{MODELS[pid]}", 200)
    async with own_sim_adapter(small, pid, latency=False) as (adapter, _):
        for attempt in (adapter.complete(ask("word " * 300), model=MODELS[pid]),
                        streamed(adapter, ask("word " * 300), MODELS[pid])):  # fmt: skip
            with pytest.raises(errors.ContextLengthError) as caught:
                await attempt
            assert caught.value.scope == "model" and caught.value.retryable


# --- each fault the simulator injects ----------------------------------------------------


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_error_statuses(pid, adapters, fault):
    adapter = adapters(pid)
    for status, kind in STATUS_ERRORS[family(pid)].items():
        await fault.clear()
        await fault(provider=pid, kind="error", status=status, count=2)
        with pytest.raises(kind) as caught:
            await adapter.complete(ask(), model=MODELS[pid])
        assert type(caught.value) is kind and caught.value.status == status and caught.value.retryable
        with pytest.raises(kind):
            await streamed(adapter, ask(), MODELS[pid])


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_an_error_event_mid_stream_interrupts_it_after_the_content_so_far(pid, adapters, fault):
    await fault(provider=pid, kind="error", after_tokens=3)
    # Anthropic's error event names its kind (api_error here); the others only say the stream broke.
    expected = errors.ServerError if pid == "anthropic" else errors.StreamInterruptedError
    seen, error = await contents_until_error(adapters(pid), ask(), MODELS[pid], expected)
    assert len(seen) == 3 and error.retryable
    if family(pid) == "openai":  # the others pass on the message their error event carries
        assert error.message.startswith("stream broke: ")


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_a_rate_limit_carries_the_wait(pid, adapters, fault):
    wait = 3.0 if pid == "cohere" else 2.5  # Cohere's Retry-After is whole seconds
    await fault(provider=pid, kind="rate_limit", retry_after_s=wait, count=2)
    adapter = adapters(pid)
    for attempt in (adapter.complete(ask(), model=MODELS[pid]), streamed(adapter, ask(), MODELS[pid])):
        with pytest.raises(errors.RateLimitError) as caught:
            await attempt
        assert caught.value.status == 429 and caught.value.retry_after_s == wait and caught.value.retryable


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_a_silent_provider_times_out(pid, adapters, fault):
    await fault(provider=pid, kind="timeout", count=2)
    adapter = adapters(pid, timeout_s=0.3, first_token_timeout_s=0.3)
    with pytest.raises(errors.TimeoutError) as caught:
        await adapter.complete(ask(), model=MODELS[pid])
    assert caught.value.phase == "read"
    with pytest.raises(errors.TimeoutError) as caught:
        await streamed(adapter, ask(), MODELS[pid])
    assert caught.value.phase == "first_token"


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_a_disconnect(pid, adapters, fault, fresh_sim):
    await fault(provider=pid, kind="disconnect", after_tokens=4, count=2)
    adapter = adapters(pid)
    seen, _ = await contents_until_error(adapter, ask(), MODELS[pid], errors.StreamInterruptedError)
    assert len(seen) == 4
    with pytest.raises(errors.ConnectionLostError):
        await adapter.complete(ask(), model=MODELS[pid])
    streams = fresh_sim.state.streams
    await wait_until(lambda: streams.broken == 1)
    assert streams.broken == 1


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_a_malformed_answer(pid, adapters, fault, fresh_sim):
    await fault(provider=pid, kind="malformed", count=2)
    adapter = adapters(pid)
    with pytest.raises(errors.MalformedResponseError):
        await adapter.complete(ask(), model=MODELS[pid])
    # Garbage before any content; the other families' streams open with a start event, which it then breaks.
    with pytest.raises(errors.MalformedResponseError if family(pid) == "openai" else errors.StreamInterruptedError):
        await streamed(adapter, ask(), MODELS[pid])
    await fault(provider=pid, kind="malformed", after_tokens=2)
    seen, error = await contents_until_error(adapter, ask(), MODELS[pid], errors.StreamInterruptedError)
    assert len(seen) == 2 and "unreadable" in error.message  # garbage after content began
    streams = fresh_sim.state.streams
    await wait_until(lambda: streams.broken == 2)  # the simulator counts a stream once it has finished writing
    assert streams.broken == 2


# --- closing a stream ----------------------------------------------------------------------


@pytest.mark.parametrize("pid", FAMILIES)
async def test_closing_or_cancelling_a_stream_closes_the_upstream(pid, catalog):
    async with own_sim_adapter(catalog, pid, latency=True, speed=4) as (adapter, running):
        streams = running.state.streams
        stream = adapter.stream(ask("Tell me a long story."), model=MODELS[pid])
        async for chunk in stream:
            if chunk.content:
                break
        await stream.aclose()
        await wait_until(lambda: streams.cancelled == 1)

        started = asyncio.Event()

        async def consume() -> None:
            async for _ in adapter.stream(ask("Another long story."), model=MODELS[pid]):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: streams.cancelled == 2 and streams.open_now == 0)
        assert (streams.opened, streams.cancelled, streams.completed, streams.open_now) == (2, 2, 0, 0)
