"""The Gemini wire family end to end: the official google-genai SDK and our adapter against the simulator.

What every provider does alike (answers, usage, tools, images, each fault, errors, closing a
stream) is tested once for all in test_provider_suite.py; this file holds what this family does its own way.
"""

from __future__ import annotations

import json

import httpx
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import SecretStr

from helpers import (
    PNG,
    TIME,
    WEATHER,
    add_fault,
    collect,
    joined,
    own_sim_adapter,
    user,
    with_context_window,
)

from p402_tui.core import errors
from p402_tui.core.costs import call_cost
from p402_tui.core.types import ChatRequest

MODEL = "gemini-2.5-flash"  # thinks by default, cached input has its own price
GEMINI_3 = "gemini-3-flash-preview"  # rejects function calls sent back without their thoughtSignature


def chat(*messages: dict, model: str = MODEL, **fields) -> ChatRequest:
    return ChatRequest(model=f"google/{model}", messages=list(messages), **fields)


@pytest.fixture
def adapter(adapter_for):
    return adapter_for("google")


@pytest.fixture
async def sdk(sim):
    options = types.HttpOptions(base_url=f"{sim.url}/google", retry_options=types.HttpRetryOptions(attempts=1))
    client = genai.Client(api_key="sim-key", http_options=options)
    yield client
    await client.aio.aclose()


async def raw(sim, method: str, body: dict, *, model: str = MODEL, key: str | None = "sim-key", query: str = "") -> httpx.Response:
    headers = {} if key is None else {"x-goog-api-key": key}
    async with httpx.AsyncClient() as client:
        return await client.post(f"{sim.url}/google/v1beta/models/{model}:{method}{query}", json=body, headers=headers)


# --- the official SDK proves the wire format --------------------------------------


async def test_sdk_reads_answer_streamed_and_not(sdk):
    config = types.GenerateContentConfig(system_instruction="Be terse.", max_output_tokens=400)
    response = await sdk.aio.models.generate_content(model=MODEL, contents="Hi", config=config)
    assert response.text and response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage.prompt_token_count > 0 and usage.candidates_token_count > 0 and usage.thoughts_token_count > 0
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count + usage.thoughts_token_count

    chunks = [c async for c in await sdk.aio.models.generate_content_stream(model=MODEL, contents="Hi", config=config)]
    assert len(chunks) > 3
    assert "".join(c.text or "" for c in chunks) == response.text
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    counts = [c.usage_metadata.candidates_token_count for c in chunks]
    assert counts == sorted(counts)  # cumulative
    assert chunks[-1].usage_metadata.candidates_token_count == usage.candidates_token_count
    assert chunks[-1].usage_metadata.prompt_token_count == usage.prompt_token_count


async def test_sdk_function_call_round_trip(sdk):
    declaration = types.FunctionDeclaration(
        name="get_weather", description="Weather by city", parameters_json_schema=WEATHER["function"]["parameters"]
    )
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[declaration])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    question = types.Content(role="user", parts=[types.Part(text="Weather in Paris?")])
    response = await sdk.aio.models.generate_content(model=GEMINI_3, contents=[question], config=config)
    call = response.function_calls[0]
    assert call.name == "get_weather" and isinstance(call.args["city"], str)
    assert response.candidates[0].content.parts[0].thought_signature  # thinking models sign their calls
    assert response.usage_metadata.candidates_token_count > 0

    streamed = [c async for c in await sdk.aio.models.generate_content_stream(model=GEMINI_3, contents=[question], config=config)]
    assert streamed[-1].function_calls[0].args == call.args

    result = types.Part.from_function_response(name="get_weather", response={"temp_c": 21})
    history = [question, response.candidates[0].content, types.Content(role="user", parts=[result])]
    answer = await sdk.aio.models.generate_content(model=GEMINI_3, contents=history, config=config)
    assert answer.text and not answer.function_calls


async def test_sdk_models_tokens_embeddings_and_errors(sim, sdk):
    names = [model.name async for model in await sdk.aio.models.list(config={"page_size": 4})]
    assert f"models/{MODEL}" in names and len(names) == len(set(names)) > 4
    counted = await sdk.aio.models.count_tokens(model=MODEL, contents="How many tokens is this?")
    assert counted.total_tokens > 0
    embedded = await sdk.aio.models.embed_content(model="gemini-embedding-001", contents=["one", "two"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0].values) == 3072

    with pytest.raises(genai_errors.ClientError) as caught:
        await sdk.aio.models.generate_content(model="gemini-0-nope", contents="Hi")
    assert caught.value.code == 404 and caught.value.status == "NOT_FOUND"
    bad = genai.Client(api_key="invalid-key", http_options=types.HttpOptions(base_url=f"{sim.url}/google"))
    try:
        with pytest.raises(genai_errors.ClientError) as caught:
            await bad.aio.models.generate_content(model=MODEL, contents="Hi")
        assert caught.value.code == 400 and "API key not valid" in caught.value.message
    finally:
        await bad.aio.aclose()


# --- the simulator's own checks -------------------------------------------------------


async def test_keys_are_checked_as_google_does(sim):
    body = {"contents": [{"parts": [{"text": "Hi"}]}]}
    missing = await raw(sim, "generateContent", body, key=None)
    assert missing.status_code == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"
    for key in ("", "invalid-key"):
        refused = await raw(sim, "generateContent", body, key=key)
        assert refused.status_code == 400
        assert refused.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    async with httpx.AsyncClient() as client:
        by_query = await client.post(f"{sim.url}/google/v1beta/models/{MODEL}:generateContent?key=sim-key", json=body)
    assert by_query.status_code == 200


@pytest.mark.parametrize(
    "body, words",
    [
        ({}, "contents is not specified"),
        ({"contents": [{"role": "assistant", "parts": [{"text": "Hi"}]}]}, "valid role"),
        ({"contents": [{"parts": []}]}, "must not be empty"),
        ({"contents": [{"parts": [{"text": "Hi"}]}], "temprature": 1}, 'Unknown name "temprature"'),
        ({"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "not base64!"}}]}]}, "Base64"),
        (
            {"contents": [{"parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
            "function response turn comes immediately after a function call turn",
        ),
    ],
)
async def test_bodies_are_checked(sim, body, words):
    response = await raw(sim, "generateContent", body)
    assert response.status_code == 400 and response.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert words in response.json()["error"]["message"]


async def test_stream_without_alt_sse_is_one_json_array(sim):
    response = await raw(sim, "streamGenerateContent", {"contents": [{"parts": [{"text": "Hi"}]}]})
    chunks = json.loads(response.text)
    assert len(chunks) > 3 and chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "finishReason" not in chunks[0]["candidates"][0]
    assert all("usageMetadata" in c for c in chunks)


# --- our adapter -----------------------------------------------------------------------


async def test_complete_and_stream_agree_on_content_usage_and_cost(sim, adapter, catalog):
    request = chat({"role": "system", "content": "Be terse."}, user("Tell me about routers."), max_tokens=300)
    sent = (await raw(sim, "generateContent", adapter.payload(request, MODEL))).json()["usageMetadata"]
    response = await adapter.complete(request)
    chunks = await collect(adapter.stream(request))

    assert response.content and joined(chunks) == response.content
    assert response.finish_reason == "stop" and chunks[-1].finish_reason == "stop"
    assert chunks[0].role == "assistant"
    assert response.usage.prompt_tokens == sent["promptTokenCount"]
    assert response.usage.reasoning_tokens == sent["thoughtsTokenCount"] > 0
    assert response.usage.completion_tokens == sent["candidatesTokenCount"] + sent["thoughtsTokenCount"]
    assert chunks[-1].usage == response.usage
    spec = catalog.model(f"google/{MODEL}")
    assert call_cost(spec, chunks[-1].usage) == call_cost(spec, response.usage) > 0


async def test_reasoning_effort_returns_thoughts_as_reasoning(adapter):
    request = chat(user("Think first."), reasoning_effort="low")
    assert adapter.payload(request, MODEL)["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 1024,
        "includeThoughts": True,
    }
    response = await adapter.complete(request)
    chunks = await collect(adapter.stream(request))
    assert response.reasoning and "".join(c.reasoning for c in chunks) == response.reasoning
    assert joined(chunks) == response.content and response.content not in response.reasoning
    assert response.usage.reasoning_tokens > 0 and chunks[-1].usage == response.usage

    off = await adapter.complete(chat(user("Think first."), reasoning_effort="none"))
    assert off.reasoning is None and off.usage.reasoning_tokens == 0


async def test_request_mapping_reaches_the_wire(sim, adapter):
    request = chat(
        {"role": "developer", "content": "Answer in JSON."},
        user("Weather?"),
        temperature=0.2,
        top_p=0.9,
        max_tokens=64,
        stop=["END"],
        seed=7,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object", "properties": {"temp": {"type": "integer"}}}},
        },
    )
    payload = adapter.payload(request, MODEL)
    assert payload["systemInstruction"] == {"parts": [{"text": "Answer in JSON."}]}
    assert payload["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 64,
        "stopSequences": ["END"],
        "seed": 7,
        "responseMimeType": "application/json",
        "responseSchema": {"type": "object", "properties": {"temp": {"type": "integer"}}},
    }
    response = await adapter.complete(request)
    assert isinstance(json.loads(response.content)["temp"], int)


async def test_stop_sequence_and_max_tokens(adapter):
    full = await adapter.complete(chat(user("Say a lot.")))
    word = full.content.split()[3]
    cut = await adapter.complete(chat(user("Say a lot."), stop=word))
    assert cut.content == full.content[: full.content.index(word)]
    short = await adapter.complete(chat(user("Say a lot."), max_tokens=5))
    assert short.finish_reason == "length" and short.usage.completion_tokens - short.usage.reasoning_tokens <= 5


async def test_tool_calls_both_ways_and_thought_signatures(adapter):
    question = user("Weather in Paris?")
    request = chat(question, model=GEMINI_3, tools=[WEATHER])
    response = await adapter.complete(request)
    assert response.finish_reason == "tool_calls" and response.content is None
    call = response.tool_calls[0]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
    assert call["extra_content"]["google"]["thought_signature"]

    chunks = await collect(adapter.stream(request))
    deltas = [d for c in chunks for d in c.tool_calls or ()]
    assert len(deltas) == 1 and deltas[0].name == "get_weather" and deltas[0].id
    assert json.loads(deltas[0].arguments) == json.loads(call["function"]["arguments"])
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage == response.usage

    signature = call["extra_content"]["google"]["thought_signature"]
    assert call["id"].endswith(f"__thought__{signature}") and deltas[0].id.endswith(signature)

    def history(tool_call: dict, model: str = GEMINI_3) -> ChatRequest:
        result = {"role": "tool", "tool_call_id": tool_call["id"], "content": '{"temp_c": 21}'}
        return chat(question, {"role": "assistant", "tool_calls": [tool_call]}, result, model=model, tools=[WEATHER])

    answer = await adapter.complete(history(call))
    assert answer.finish_reason == "stop" and answer.content
    # A streamed call has only its id to carry the signature; the id is enough.
    streamed = {"id": deltas[0].id, "type": "function", "function": {"name": "get_weather", "arguments": deltas[0].arguments}}
    assert adapter.payload(history(streamed), GEMINI_3)["contents"][1]["parts"][0]["thoughtSignature"] == signature
    assert (await adapter.complete(history(streamed))).content

    # A call Gemini never made (say, from another provider before a failover) gets Google's stand-in.
    foreign = {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    assert (await adapter.complete(history(foreign))).content
    assert "thoughtSignature" not in adapter.payload(history(foreign, MODEL), MODEL)["contents"][1]["parts"][0]


async def test_gemini_3_refuses_function_calls_without_signature(sim):
    call = {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]}
    result = {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 3}}}]}
    body = {"contents": [{"role": "user", "parts": [{"text": "Weather?"}]}, call, result]}
    refused = await raw(sim, "generateContent", body, model=GEMINI_3)
    assert refused.status_code == 400 and "missing a thought_signature" in refused.json()["error"]["message"]
    assert (await raw(sim, "generateContent", body, model=MODEL)).status_code == 200


async def test_tool_choice(adapter):
    ask = user("What now?")
    none = await adapter.complete(chat(ask, tools=[WEATHER, TIME], tool_choice="none"))
    assert none.content and not none.tool_calls
    named = await adapter.complete(chat(ask, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert named.tool_calls[0]["function"]["name"] == "get_time"
    payload = adapter.payload(chat(ask, tools=[WEATHER], tool_choice="required"), MODEL)
    assert payload["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


async def test_images_become_inline_and_file_data(adapter):
    text_only = await adapter.complete(chat(user("What is this?")))
    inline = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    with_image = await adapter.complete(chat(user(inline)))
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 258

    linked = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/cat.png"}}]
    assert adapter.payload(chat(user(linked)), MODEL)["contents"][0]["parts"] == [
        {"fileData": {"fileUri": "http://127.0.0.1/cat.png", "mimeType": "image/png"}}
    ]
    assert (await adapter.complete(chat(user(linked)))).content
    with pytest.raises(errors.BadRequestError):
        await adapter.complete(chat(user([{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}])))


async def test_repeated_long_prompt_is_cached_and_cheaper(adapter, catalog):
    system = {"role": "system", "content": "Route every request with care. " * 250}  # over 1024 tokens
    request = chat(system, user("Hi"))
    first = await adapter.complete(request)
    again = await adapter.complete(request)
    assert first.usage.cached_tokens == 0
    assert 1024 <= again.usage.cached_tokens <= again.usage.prompt_tokens == first.usage.prompt_tokens
    spec = catalog.model(f"google/{MODEL}")
    assert call_cost(spec, again.usage) < call_cost(spec, first.usage)


async def test_models_and_embeddings(adapter):
    adapter.page_size = 4  # several pages
    models = await adapter.list_models()
    assert MODEL in models and "gemini-embedding-001" in models and len(models) == len(set(models))
    embedded = await adapter.embed(["the router", "the router again", "bananas"], model="google/gemini-embedding-001")
    assert len(embedded.vectors) == 3 and len(embedded.vectors[0]) == 3072
    close = sum(a * b for a, b in zip(embedded.vectors[0], embedded.vectors[1]))
    far = sum(a * b for a, b in zip(embedded.vectors[0], embedded.vectors[2]))
    assert close > far
    assert (await adapter.health_check()).ok
    many = await adapter.embed([f"text {i}" for i in range(250)], model=embedded.provider + "/" + embedded.model)
    assert len(many.vectors) == 250 and many.vectors[0] == (await adapter.embed(["text 0"], model=many.model)).vectors[0]


# --- errors ---------------------------------------------------------------------------


async def test_bad_key_is_authentication_even_though_400(adapter_for):
    adapter = adapter_for("google", api_key=SecretStr("invalid-key"))
    with pytest.raises(errors.AuthenticationError) as caught:
        await adapter.complete(chat(user("Hi")))
    assert caught.value.status == 400 and not caught.value.retryable
    assert "invalid-key" not in str(caught.value)
    health = await adapter.health_check()
    assert not health.ok and health.detail.startswith("authentication")


async def test_unknown_model_and_context_length(sim, adapter, catalog):
    with pytest.raises(errors.ModelNotFoundError):
        await adapter.complete(chat(user("Hi"), model="gemini-0-nope"))
    with pytest.raises(errors.ModelNotFoundError):
        await collect(adapter.stream(chat(user("Hi"), model="gemini-0-nope")))

    small = with_context_window(catalog, f"google/{MODEL}", 40)
    async with own_sim_adapter(small, "google", latency=False) as (cramped, _):
        with pytest.raises(errors.ContextLengthError) as caught:
            await cramped.complete(chat(user("word " * 100)))
    assert "exceeds the maximum number of tokens" in caught.value.message


async def test_rate_limit_wait_comes_from_retry_info(sim, adapter):
    await add_fault(sim, "google", kind="rate_limit", retry_after_s=12, count=1)
    limited = await raw(sim, "generateContent", {"contents": [{"parts": [{"text": "Hi"}]}]})
    assert limited.status_code == 429 and "retry-after" not in limited.headers
    assert limited.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    await add_fault(sim, "google", kind="rate_limit", retry_after_s=12.5)
    with pytest.raises(errors.RateLimitError) as caught:
        await adapter.complete(chat(user("Hi")))
    assert caught.value.retry_after_s == 12.5 and caught.value.retryable
