"""The Cohere wire family end to end: the official cohere SDK and our adapter against the simulator.

What every provider does alike (answers, usage, tools, images, each fault, errors, closing a
stream) is tested once for all in test_provider_suite.py; this file holds what this family does its own way.
"""

from __future__ import annotations

import json

import cohere
import httpx
import pytest
from pydantic import SecretStr

from helpers import (
    PNG,
    TIME,
    WEATHER,
    collect,
    joined,
    own_sim_adapter,
    user,
    with_context_window,
)

from p402_tui.core import errors
from p402_tui.core.costs import call_cost
from p402_tui.core.types import ChatRequest

MODEL = "command-a-03-2025"


def chat(*messages: dict, model: str = MODEL, **fields) -> ChatRequest:
    return ChatRequest(model=f"cohere/{model}", messages=list(messages), **fields)


@pytest.fixture
def adapter(adapter_for):
    return adapter_for("cohere")


@pytest.fixture
async def sdk(sim):
    async with httpx.AsyncClient() as http:
        yield cohere.AsyncClientV2(api_key="sim-key", base_url=f"{sim.url}/cohere", httpx_client=http, max_retries=0)


async def raw(sim, body: dict, *, key: str | None = "sim-key", path: str = "/v2/chat") -> httpx.Response:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient() as client:
        return await client.post(f"{sim.url}/cohere{path}", json=body, headers=headers)


# --- the official SDK proves the wire format --------------------------------------


async def test_sdk_reads_answer_streamed_and_not(sdk):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    response = await sdk.chat(model=MODEL, messages=messages, max_tokens=300)
    assert response.finish_reason == "COMPLETE" and response.message.role == "assistant"
    text = response.message.content[0].text
    assert text and response.message.content[0].type == "text"
    usage = response.usage
    assert usage.tokens.input_tokens > usage.billed_units.input_tokens > 0  # the preamble is not billed
    assert usage.tokens.output_tokens == usage.billed_units.output_tokens > 0

    events = [event async for event in sdk.chat_stream(model=MODEL, messages=messages, max_tokens=300)]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["message-start", "content-start"] and kinds[-2:] == ["content-end", "message-end"]
    assert set(kinds[2:-2]) == {"content-delta"}
    assert events[0].id and events[0].delta.message.role == "assistant"
    assert "".join(e.delta.message.content.text for e in events if e.type == "content-delta") == text
    end = events[-1].delta
    assert end.finish_reason == "COMPLETE"
    assert end.usage.tokens.input_tokens == usage.tokens.input_tokens
    assert end.usage.tokens.output_tokens == usage.tokens.output_tokens


async def test_sdk_tool_call_round_trip(sdk):
    question = {"role": "user", "content": "Weather in Paris?"}
    response = await sdk.chat(model=MODEL, messages=[question], tools=[WEATHER])
    assert response.finish_reason == "TOOL_CALL" and response.message.tool_plan
    call = response.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    events = [event async for event in sdk.chat_stream(model=MODEL, messages=[question], tools=[WEATHER])]
    kinds = [event.type for event in events]
    assert kinds[0] == "message-start" and kinds[-2:] == ["tool-call-end", "message-end"]
    assert "tool-plan-delta" in kinds and kinds.index("tool-plan-delta") < kinds.index("tool-call-start")
    start = next(e for e in events if e.type == "tool-call-start")
    assert start.delta.message.tool_calls.id == call.id and start.delta.message.tool_calls.function.name == "get_weather"
    arguments = "".join(e.delta.message.tool_calls.function.arguments for e in events if e.type == "tool-call-delta")
    assert arguments == call.function.arguments
    assert events[-1].delta.finish_reason == "TOOL_CALL"
    assert events[-1].delta.usage.tokens.output_tokens == response.usage.tokens.output_tokens

    history = [
        question,
        {"role": "assistant", "tool_plan": response.message.tool_plan, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "21C"},
    ]
    answer = await sdk.chat(model=MODEL, messages=history, tools=[WEATHER])
    assert answer.finish_reason == "COMPLETE" and answer.message.content[0].text


async def test_sdk_models_embeddings_and_errors(sim, sdk):
    listed = await sdk.models.list(page_size=3)
    assert len(listed.models) == 3 and listed.next_page_token
    embedded = await sdk.embed(model="embed-v4.0", texts=["one", "two"], input_type="search_document", embedding_types=["float"])
    assert len(embedded.embeddings.float_) == 2 and len(embedded.embeddings.float_[0]) == 1536
    assert embedded.meta.billed_units.input_tokens > 0

    with pytest.raises(cohere.NotFoundError):
        await sdk.chat(model="command-nope", messages=[{"role": "user", "content": "Hi"}])
    async with httpx.AsyncClient() as http:
        bad = cohere.AsyncClientV2(api_key="invalid-key", base_url=f"{sim.url}/cohere", httpx_client=http, max_retries=0)
        with pytest.raises(cohere.UnauthorizedError) as caught:
            await bad.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["message"] == "invalid api token"


# --- the simulator's own checks -------------------------------------------------------


@pytest.mark.parametrize(
    "body, words",
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model must be specified"),
        ({"model": MODEL, "messages": []}, "messages must not be empty"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_p": 0.5}, "top_p is not a valid field"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "p": 1.0}, "p must be between"),
        ({"model": MODEL, "messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "does not match any tool call"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tool_choice": "REQUIRED"}, "only be used when tools"),
    ],
)
async def test_bodies_are_checked(sim, body, words):
    response = await raw(sim, body)
    assert response.status_code == 400 and words in response.json()["message"]


async def test_keys_are_checked(sim):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    assert (await raw(sim, body, key=None)).status_code == 401
    refused = await raw(sim, body, key="invalid-key")
    assert refused.status_code == 401 and refused.json()["message"] == "invalid api token"


# --- our adapter -----------------------------------------------------------------------


async def test_complete_and_stream_agree_on_content_usage_and_cost(sim, adapter, catalog):
    request = chat({"role": "system", "content": "Be terse."}, user("Tell me about routers."), max_tokens=300)
    sent = (await raw(sim, adapter.payload(request, MODEL))).json()["usage"]
    response = await adapter.complete(request)
    chunks = await collect(adapter.stream(request))

    assert response.content and joined(chunks) == response.content
    assert response.finish_reason == "stop" and chunks[-1].finish_reason == "stop"
    assert chunks[0].role == "assistant"
    assert response.usage.prompt_tokens == sent["tokens"]["input_tokens"]
    assert response.usage.completion_tokens == sent["tokens"]["output_tokens"]
    assert chunks[-1].usage == response.usage
    spec = catalog.model(f"cohere/{MODEL}")
    assert call_cost(spec, chunks[-1].usage) == call_cost(spec, response.usage) > 0


async def test_request_mapping_reaches_the_wire(adapter):
    request = chat(
        {"role": "developer", "content": "Answer in JSON."},
        user("Weather?"),
        temperature=0.2,
        top_p=1.0,
        max_tokens=64,
        stop="END",
        seed=7,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object", "properties": {"temp": {"type": "integer"}}}},
        },
    )
    payload = adapter.payload(request, MODEL)
    assert payload["messages"][0] == {"role": "system", "content": "Answer in JSON."}
    assert (payload["temperature"], payload["p"], payload["max_tokens"], payload["seed"]) == (0.2, 0.99, 64, 7)
    assert payload["stop_sequences"] == ["END"] and payload["stream"] is False
    assert payload["response_format"] == {
        "type": "json_object",
        "json_schema": {"type": "object", "properties": {"temp": {"type": "integer"}}},
    }
    response = await adapter.complete(request)
    assert isinstance(json.loads(response.content)["temp"], int)


async def test_stop_sequence_and_max_tokens(adapter):
    full = await adapter.complete(chat(user("Say a lot.")))
    word = full.content.split()[3]
    cut = await adapter.complete(chat(user("Say a lot."), stop=[word]))
    assert cut.content == full.content[: full.content.index(word)]
    short = await adapter.complete(chat(user("Say a lot."), max_tokens=5))
    assert short.finish_reason == "length" and short.usage.completion_tokens <= 5


async def test_tool_calls_both_ways(adapter):
    question = user("Weather in Paris?")
    request = chat(question, tools=[WEATHER])
    response = await adapter.complete(request)
    assert response.finish_reason == "tool_calls" and response.content is None and response.reasoning
    call = response.tool_calls[0]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])

    chunks = await collect(adapter.stream(request))
    deltas = [d for c in chunks for d in c.tool_calls or ()]
    assert deltas[0].id == call["id"] and deltas[0].name == "get_weather"
    assert "".join(d.arguments for d in deltas) == call["function"]["arguments"]
    assert "".join(c.reasoning for c in chunks) == response.reasoning
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage == response.usage

    result = {"role": "tool", "tool_call_id": call["id"], "content": "21C"}
    answer = await adapter.complete(chat(question, {"role": "assistant", "tool_calls": [call]}, result, tools=[WEATHER]))
    assert answer.finish_reason == "stop" and answer.content


async def test_tool_choice(adapter):
    ask = user("What now?")
    none = await adapter.complete(chat(ask, tools=[WEATHER, TIME], tool_choice="none"))
    assert none.content and not none.tool_calls
    named = await adapter.complete(chat(ask, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert named.tool_calls[0]["function"]["name"] == "get_time"
    payload = adapter.payload(chat(ask, tools=[WEATHER], tool_choice="auto"), MODEL)
    assert "tool_choice" not in payload


async def test_images_are_sent_as_image_url_parts(adapter):
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    assert adapter.payload(chat(user(parts)), MODEL)["messages"][0]["content"] == parts
    assert (await adapter.complete(chat(user(parts)))).content


async def test_models_and_embeddings(adapter):
    adapter.page_size = 4  # several pages
    models = await adapter.list_models()
    assert MODEL in models and "embed-v4.0" in models and len(models) == len(set(models))
    embedded = await adapter.embed(["the router", "the router again", "bananas"], model="cohere/embed-v4.0")
    assert len(embedded.vectors) == 3 and len(embedded.vectors[0]) == 1536 and embedded.prompt_tokens > 0
    close = sum(a * b for a, b in zip(embedded.vectors[0], embedded.vectors[1]))
    far = sum(a * b for a, b in zip(embedded.vectors[0], embedded.vectors[2]))
    assert close > far
    assert (await adapter.health_check()).ok
    many = await adapter.embed([f"text {i}" for i in range(250)], model=embedded.provider + "/" + embedded.model)
    assert len(many.vectors) == 250 and many.vectors[0] == (await adapter.embed(["text 0"], model=many.model)).vectors[0]


# --- errors ---------------------------------------------------------------------------


async def test_bad_key_is_authentication(adapter_for):
    adapter = adapter_for("cohere", api_key=SecretStr("invalid-key"))
    with pytest.raises(errors.AuthenticationError) as caught:
        await adapter.complete(chat(user("Hi")))
    assert caught.value.status == 401 and caught.value.message == "invalid api token"
    assert "invalid-key" not in str(caught.value)


async def test_unknown_model_and_context_length(adapter, catalog):
    with pytest.raises(errors.ModelNotFoundError):
        await adapter.complete(chat(user("Hi"), model="command-nope"))

    small = with_context_window(catalog, f"cohere/{MODEL}", 200)
    async with own_sim_adapter(small, "cohere", latency=False) as (cramped, _):
        with pytest.raises(errors.ContextLengthError) as caught:
            await cramped.complete(chat(user("word " * 100)))
    assert "too many tokens" in caught.value.message
