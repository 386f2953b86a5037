"""The Anthropic wire family end to end: the official SDK and our adapter against the simulator.

What every provider does alike (answers, usage, tools, images, each fault, errors, closing a
stream) is tested once for all in test_provider_suite.py; this file holds what this family does its own way.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import anthropic
import httpx
import pytest
from pydantic import SecretStr

from helpers import PNG, WEATHER, add_fault, collect, joined, user

from p402_tui.core import errors
from p402_tui.core.costs import call_cost
from p402_tui.core.types import ChatRequest, ToolCallDelta, Usage
from p402_tui.providers import http
from p402_tui.providers.anthropic import DEFAULT_MAX_TOKENS

MODEL = "claude-haiku-4-5-20251001"  # 200k context, 64k output
SDK_WEATHER = {
    "name": "get_weather",
    "description": "Weather by city",
    "input_schema": WEATHER["function"]["parameters"],
}


def chat(*messages: dict, **fields) -> ChatRequest:
    return ChatRequest(model=f"anthropic/{MODEL}", messages=list(messages), **fields)


@pytest.fixture
def adapter(adapter_for):
    return adapter_for("anthropic")


@pytest.fixture
async def sdk(sim):
    client = anthropic.AsyncAnthropic(base_url=f"{sim.url}/anthropic", api_key="sim-key", max_retries=0)
    yield client
    await client.close()


# --- the official SDK proves the wire format --------------------------------------


async def test_sdk_reads_answer_streamed_and_not(sdk):
    ask = {"model": MODEL, "max_tokens": 256, "system": "Be terse.", "messages": [{"role": "user", "content": "Hi"}]}
    message = await sdk.messages.create(**ask)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason == "end_turn" and message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    async with sdk.messages.stream(**ask) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text == message.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == message.usage.input_tokens
    assert final.usage.output_tokens == message.usage.output_tokens


async def test_sdk_tool_use_round_trip(sdk):
    question = {"role": "user", "content": "Weather in Paris?"}
    ask = {"model": MODEL, "max_tokens": 256, "tools": [SDK_WEATHER]}
    async with sdk.messages.stream(**ask, messages=[question]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    use = final.content[0]
    assert use.type == "tool_use" and use.id.startswith("toolu_") and use.name == "get_weather"
    assert isinstance(use.input["city"], str)
    assert final.usage.output_tokens > 0

    plain = await sdk.messages.create(**ask, messages=[question])
    assert plain.content[0].input == use.input and plain.usage.output_tokens == final.usage.output_tokens

    answer = await sdk.messages.create(
        **ask,
        messages=[
            question,
            {"role": "assistant", "content": [use.model_dump(include={"type", "id", "name", "input"})]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21C"}]},
        ],
    )
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text" and answer.content[0].text


async def test_sdk_reads_thinking(sdk):
    ask = {
        "model": MODEL,
        "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Think first"}],
    }
    message = await sdk.messages.create(**ask)
    async with sdk.messages.stream(**ask) as stream:
        final = await stream.get_final_message()
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking and thinking.signature
    assert text.type == "text" and text.text
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]
    assert final.usage.output_tokens == message.usage.output_tokens
    assert 0 < message.usage.output_tokens_details.thinking_tokens < message.usage.output_tokens


async def test_sdk_models_and_errors(sdk):
    ids = [model.id async for model in await sdk.models.list(limit=5)]  # pages through has_more / last_id
    assert MODEL in ids and len(ids) == len(set(ids)) > 5
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.create(model="claude-nonexistent", max_tokens=10, messages=[user("x")])
    with pytest.raises(anthropic.BadRequestError, match="roles must alternate"):
        await sdk.messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )


async def test_a_rejected_key_is_anthropics_401(sim, adapter_for):
    key = "invalid-key-0123456789"
    client = anthropic.AsyncAnthropic(base_url=f"{sim.url}/anthropic", api_key=key, max_retries=0)
    try:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(model=MODEL, max_tokens=10, messages=[user("x")])
    finally:
        await client.close()
    assert caught.value.status_code == 401
    assert caught.value.body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}

    with pytest.raises(errors.AuthenticationError) as caught:
        await adapter_for("anthropic", api_key=SecretStr(key)).complete(chat(user("hi")))
    assert caught.value.status == 401 and not caught.value.retryable and key not in str(caught.value)


# --- the adapter --------------------------------------------------------------------


async def test_complete_and_stream_bill_the_same(adapter, sim, catalog):
    request = chat({"role": "system", "content": "Be terse."}, user("Tell me about routers"))
    response = await adapter.complete(request)
    chunks = await collect(adapter.stream(request))

    async with httpx.AsyncClient() as client:  # what the simulator itself says for the same body
        raw = await client.post(
            f"{sim.url}/anthropic/v1/messages",
            json=adapter.payload(request, MODEL),
            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        )
    sent = raw.json()["usage"]

    assert response.provider == "anthropic" and response.model == MODEL and response.finish_reason == "stop"
    assert response.content and response.content == joined(chunks) == raw.json()["content"][0]["text"]
    assert response.usage == Usage(prompt_tokens=sent["input_tokens"], completion_tokens=sent["output_tokens"])
    assert chunks[0].role == "assistant" and chunks[0].content
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage == response.usage
    assert all(c.usage is None for c in chunks[:-1])
    spec = catalog.model(f"anthropic/{MODEL}")
    assert call_cost(spec, chunks[-1].usage) == call_cost(spec, response.usage) > 0


async def test_payload_lifts_system_and_merges_turns(adapter):
    request = chat(
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": "Use metric units."},
        user("first"),
        user("second"),
        {"role": "assistant", "content": "ok"},
        user("third"),
        temperature=1.5,
        top_p=0.5,
        stop="END",
        seed=7,
    )
    body = adapter.payload(request, MODEL)
    assert body["system"] == "Be terse.\n\nUse metric units."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"] == [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert body["max_tokens"] == min(DEFAULT_MAX_TOKENS, 64000)
    assert body["temperature"] == 1.0 and "top_p" not in body and "seed" not in body
    assert body["stop_sequences"] == ["END"]
    # The simulator refuses what the real API refuses (a system role, repeated roles), so this passes only if mapped.
    assert (await adapter.complete(request)).content


async def test_max_tokens_and_stop_sequences(adapter):
    short = await adapter.complete(chat(user("Say a lot"), max_tokens=3))
    assert short.finish_reason == "length" and short.usage.completion_tokens <= 4
    full = await adapter.complete(chat(user("Say a lot")))
    word = full.content.split()[2]
    stopped = await adapter.complete(chat(user("Say a lot"), stop=[word]))
    assert stopped.finish_reason == "stop" and word not in stopped.content
    assert full.content.startswith(stopped.content) and len(stopped.content) < len(full.content)


async def test_tool_calls_both_ways(adapter):
    ask = chat(user("Weather in Paris?"), tools=[WEATHER])
    response = await adapter.complete(ask)
    assert response.finish_reason == "tool_calls" and response.content is None
    [call] = response.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert call["id"].startswith("toolu_") and '"city"' in call["function"]["arguments"]

    chunks = await collect(adapter.stream(ask))
    deltas = [d for c in chunks for d in c.tool_calls or () if isinstance(d, ToolCallDelta)]
    assert deltas[0].id == call["id"] and deltas[0].name == "get_weather"
    assert "".join(d.arguments for d in deltas) == call["function"]["arguments"]
    assert {d.index for d in deltas} == {0}
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage == response.usage

    follow_up = chat(
        user("Weather in Paris and Lima?"),
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "toolu_second"}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "21C"},
        {"role": "tool", "tool_call_id": "toolu_second", "content": "18C"},
        tools=[WEATHER],
    )
    body = adapter.payload(follow_up, MODEL)
    results = body["messages"][2]
    assert [b["type"] for b in body["messages"][1]["content"]] == ["tool_use", "tool_use"]
    assert results["role"] == "user" and [b["tool_use_id"] for b in results["content"]] == [call["id"], "toolu_second"]
    answer = await adapter.complete(follow_up)
    assert answer.finish_reason == "stop" and answer.content and not answer.tool_calls


async def test_reasoning_effort_thinks(adapter):
    request = chat(user("Think about routers"), reasoning_effort="low", temperature=0.2)
    body = adapter.payload(request, MODEL)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024} and "temperature" not in body
    assert body["max_tokens"] > 1024
    assert "thinking" not in adapter.payload(chat(user("hi"), reasoning_effort="low", max_tokens=500), MODEL)

    response = await adapter.complete(request)
    chunks = await collect(adapter.stream(request))
    assert response.reasoning and response.content
    assert "".join(c.reasoning for c in chunks) == response.reasoning and joined(chunks) == response.content
    assert 0 < response.usage.reasoning_tokens < response.usage.completion_tokens
    assert chunks[-1].usage == response.usage


async def test_tool_choice_mapping(adapter):
    def choice(value):
        return adapter.payload(chat(user("hi"), tools=[WEATHER], tool_choice=value), MODEL).get("tool_choice")

    assert choice("auto") == {"type": "auto"}
    assert choice("required") == {"type": "any"}
    assert choice("none") == {"type": "none"}
    assert choice({"type": "function", "function": {"name": "get_weather"}}) == {"type": "tool", "name": "get_weather"}
    assert adapter.payload(chat(user("hi"), tools=[WEATHER]), MODEL)["tools"] == [SDK_WEATHER]
    words = await adapter.complete(chat(user("Weather?"), tools=[WEATHER], tool_choice="none"))
    assert words.finish_reason == "stop" and words.content and not words.tool_calls


async def test_image_parts_and_json_mode(adapter):
    request = chat(
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.jpg"}},
                {"type": "text", "text": "What is this?"},
            ],
        },
        response_format={"type": "json_object"},
    )
    body = adapter.payload(request, MODEL)
    blocks = body["messages"][0]["content"]
    assert blocks[0] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    assert blocks[1] == {"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.jpg"}}
    assert "JSON" in body["system"]
    assert (await adapter.complete(request)).content

    broken = chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]})
    with pytest.raises(errors.BadRequestError):
        await adapter.complete(broken)


async def test_prompt_cache_usage_is_priced_at_the_cached_rate(adapter, catalog):
    long_text = "The ledger keeps every cent of every call. " * 200  # well over the 1024-token minimum
    request = chat(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": long_text, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Summarise."},
            ],
        }
    )
    first = await adapter.complete(request)
    second_chunks = await collect(adapter.stream(request))
    second = second_chunks[-1].usage
    assert first.usage.cache_write_tokens > 1024 and first.usage.cached_tokens == 0
    assert second.cached_tokens == first.usage.cache_write_tokens and second.cache_write_tokens == 0
    assert second.prompt_tokens == first.usage.prompt_tokens
    spec = catalog.model(f"anthropic/{MODEL}")
    fresh = second.prompt_tokens - second.cached_tokens
    expected = (
        fresh * spec.input_per_1m + second.cached_tokens * spec.cached_input_per_1m
        + second.completion_tokens * spec.output_per_1m
    ) / 1e6  # fmt: skip
    assert call_cost(spec, second) == pytest.approx(expected)
    assert call_cost(spec, second) < call_cost(spec, first.usage)


# --- errors ---------------------------------------------------------------------------


async def test_missing_key_unknown_model_and_context_length(adapter_for, adapter, catalog):
    keyless = adapter_for("anthropic", api_key=None)
    with pytest.raises(errors.AuthenticationError) as caught:
        await keyless.complete(chat(user("hi")))
    assert caught.value.status == 401 and not caught.value.retryable
    assert not (await keyless.health_check()).ok

    with pytest.raises(errors.ModelNotFoundError) as caught:
        await adapter.complete(chat(user("hi")), model="claude-nonexistent")
    assert caught.value.status == 404 and "not_found_error" in caught.value.message

    window = catalog.model(f"anthropic/{MODEL}").context_window
    huge = chat(user("word " * (window + 5000)))
    for attempt in (adapter.complete(huge), collect(adapter.stream(huge))):
        with pytest.raises(errors.ContextLengthError, match="prompt is too long") as caught:
            await attempt
        assert caught.value.retryable and caught.value.scope == "model"


async def test_overloaded_error_event_mid_stream(adapter, sim):
    await add_fault(sim, "anthropic", kind="error", status=529, after_tokens=3)
    chunks = []
    with pytest.raises(errors.OverloadedError, match="overloaded_error"):
        async for chunk in adapter.stream(chat(user("hi"))):
            chunks.append(chunk)
    assert len(chunks) == 3 and all(c.content for c in chunks)


async def test_rate_limit_wait_from_anthropic_reset_headers_and_no_key_in_messages(adapter):
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    headers = http.Headers(
        {
            "anthropic-ratelimit-tokens-remaining": "0",
            "anthropic-ratelimit-tokens-reset": soon.isoformat().replace("+00:00", "Z"),
            "anthropic-ratelimit-requests-remaining": "12",  # not exhausted, so its reset is not the wait
            "anthropic-ratelimit-requests-reset": (soon + timedelta(seconds=60)).isoformat(),
        }
    )
    limited = adapter.error(429, "rate_limit_error", "slow down", headers, MODEL)
    assert isinstance(limited, errors.RateLimitError) and 25 < limited.retry_after_s <= 30

    key = adapter.provider.key()
    refused = adapter.error(401, "authentication_error", f"invalid x-api-key {key}", http.Headers(), MODEL)
    assert key not in str(refused) and key not in refused.message
