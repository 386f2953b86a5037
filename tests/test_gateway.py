"""The gateway against a real server on loopback, the real simulator behind it.

The official OpenAI SDK is the client where the route is OpenAI's; httpx for
P402's own /api/v2.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from p402_tui.core.config import CacheConfig, ConfigFile, Settings
from p402_tui.core.errors import ConfigError
from p402_tui.core.types import ChatChunk
from p402_tui.gateway import sse
from p402_tui.gateway.bodies import parse_chat
from p402_tui.runtime import Runtime
from p402_tui.sim.engine import Fault
from p402_tui.store.queries import create_key, revoke_key

PINNED = "openai/gpt-4o-mini"
HELLO = [{"role": "user", "content": "Say hello to the gateway."}]
NO_CACHE = {"cache-control": "no-cache"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def settings_for(catalog, sim_url: str, **sections) -> Settings:
    # The hashed embedder keeps the semantic cache on without loading a model.
    return Settings(ConfigFile(cache=CacheConfig(embedder="hashed"), **sections), catalog, env={}).point_at(sim_url)


@pytest.fixture
async def runtime(sim, catalog, tmp_path):
    async with Runtime.open(settings_for(catalog, sim.url), db_path=tmp_path / "p402.db") as rt:
        yield rt


@pytest.fixture
async def gateway(runtime):
    running = await runtime.serve_gateway("127.0.0.1", 0)
    yield running
    await running.stop()


@pytest.fixture
async def http(gateway):
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield client


@pytest.fixture
async def sdk(gateway):
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused-without-gateway-keys", max_retries=0)
    yield client
    await client.close()


async def eventually(check, timeout: float = 3.0):
    """Metrics are counted by a subscriber task: give it a moment."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.02)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# --- chat through the OpenAI SDK -----------------------------------------------------------


async def test_sdk_chat_routes_and_reports_where_it_went(sdk):
    completion = await sdk.chat.completions.create(model="auto", messages=HELLO)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert completion.usage.total_tokens > 0
    p402 = completion.model_extra["p402"]
    assert p402["provider"] and p402["model"] and p402["decision_id"]
    assert p402["cost_usd"] > 0 and p402["cached"] is False


async def test_sdk_chat_pins_a_model_and_resolves_a_bare_id(sdk):
    pinned = await sdk.chat.completions.create(model=PINNED, messages=HELLO)
    assert pinned.model_extra["p402"]["provider"] == "openai"
    assert pinned.model == "gpt-4o-mini"
    bare = await sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers={"cache-control": "no-cache"})
    assert bare.model_extra["p402"]["provider"] == "openai"


async def test_sdk_stream_with_usage(sdk):
    stream = await sdk.chat.completions.create(
        model=PINNED, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.model_extra["p402"]["provider"] == "openai"
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("provider", ["anthropic", "google", "cohere"])
async def test_every_wire_streams_openai_chunks_with_the_first_token_in_the_first(sdk, runtime, provider):
    others = [p for p in runtime.settings.catalog.providers if p != provider]
    stream = await sdk.chat.completions.create(
        model="auto", messages=HELLO, stream=True, extra_body={"p402": {"exclude": others}}
    )
    chunks = [chunk async for chunk in stream]
    delta = chunks[0].choices[0].delta
    assert delta.role == "assistant" and delta.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["p402"]["provider"] == provider


async def test_a_cached_answer_streams_with_its_first_token_in_the_first_chunk(sdk):
    question = [{"role": "user", "content": "A question asked twice, the second time streamed."}]
    await sdk.chat.completions.create(model=PINNED, messages=question)

    async def replayed():
        stream = await sdk.chat.completions.create(model=PINNED, messages=question, stream=True)
        chunks = [chunk async for chunk in stream]
        return chunks if chunks[-1].model_extra["p402"]["cached"] else None

    chunks = await eventually(replayed)  # the cache insert is queued, not awaited by the first request
    assert chunks
    delta = chunks[0].choices[0].delta
    assert delta.role == "assistant" and delta.content


async def test_stream_without_include_usage_sends_no_usage_chunk(sdk):
    stream = await sdk.chat.completions.create(model=PINNED, messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].model_extra["p402"]["cost_usd"] > 0  # the finishing chunk carries P402's meta


async def test_a_stream_is_written_as_its_first_token_then_the_rest_with_the_end(gateway, runtime):
    # What the gateway hands uvicorn, each item one write: the first token alone, for time to first
    # token; from the finish on, everything waits for the meta and leaves with [DONE] in one write.
    body = json.dumps({"model": PINNED, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}})
    chat, options, ctx = parse_chat(body.encode(), runtime.orchestrator.catalog, api_key_id=None, no_cache=True)
    response = await gateway.gateway._stream(chat, options, ctx)
    writes = [item async for item in response.frames]
    await response.cleanup()
    frames = [item.split(b"\n\n")[:-1] for item in writes]
    first = json.loads(frames[0][0][len(b"data: "):])
    assert len(frames[0]) == 1 and first["choices"][0]["delta"]["content"]
    last = frames[-1]
    assert last[-1] == b"data: [DONE]"
    assert len(last) > 3  # the latency-free simulator's last read holds text too: it left with the finish
    finishing, usage = (json.loads(frame[len(b"data: "):]) for frame in last[-3:-1])
    assert finishing["choices"][0]["finish_reason"] == "stop" and finishing["p402"]["cost_usd"] > 0
    assert usage["usage"]["completion_tokens"] > 0
    assert all(b"finish_reason\":\"stop" not in frame for item in frames[:-1] for frame in item)
    # A text chunk's frame is written from a template: the same bytes as the generic path.
    text = json.loads(frames[1][0][len(b"data: "):])
    chunk = ChatChunk(text["choices"][0]["delta"]["content"])
    generic = chunk.to_openai(id=text["id"], model=text["model"], created=text["created"])
    assert frames[1][0] + b"\n\n" == sse.data_frame(generic)


async def test_sdk_tool_call_round_trip(sdk):
    first = await sdk.chat.completions.create(
        model=PINNED, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER], tool_choice="required"
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    second = await sdk.chat.completions.create(
        model=PINNED,
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4, "sky": "rain"}'},
        ],
        tools=[WEATHER],
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content


async def test_streamed_tool_call_deltas_pass_through(sdk):
    stream = await sdk.chat.completions.create(
        model=PINNED, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
        tool_choice="required", stream=True,
    )
    deltas = [tc async for chunk in stream if chunk.choices for tc in chunk.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas))


@pytest.mark.parametrize("model", [PINNED, "anthropic/claude-haiku-4-5-20251001", "google/gemini-2.5-flash"])
async def test_max_completion_tokens_limits_every_provider(sdk, model):
    """The SDK's newer name for max_tokens: Anthropic and Gemini took no limit from it."""
    answer = await sdk.chat.completions.create(model=model, messages=HELLO, max_completion_tokens=5)
    usage = answer.usage
    written = usage.completion_tokens - (usage.completion_tokens_details.reasoning_tokens or 0)  # Gemini's own thinking
    assert written <= 5 and answer.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as both:
        await sdk.chat.completions.create(model=model, messages=HELLO, max_completion_tokens=5, max_tokens=6)
    assert both.value.body["param"] == "max_completion_tokens"


async def test_sdk_models_list_has_every_usable_model(sdk, runtime):
    models = [model async for model in sdk.models.list()]
    usable = {p.id for p in runtime.settings.usable_providers()}
    expected = {m.id for m in runtime.settings.catalog.models.values() if m.provider in usable}
    # The router's names lead, so a client that only picks from this list can still ask for routing.
    assert [m.id for m in models[:6]] == ["p402/auto", "p402/cost", "p402/quality", "p402/speed", "p402/balanced",
                                          "p402/adaptive"]
    assert {m.id for m in models[6:]} == expected
    assert all(m.object == "model" and m.owned_by == m.id.split("/")[0] and m.created > 0 for m in models)
    routed = await sdk.chat.completions.create(model=models[1].id, messages=HELLO)  # p402/cost
    assert routed.model_extra["p402"]["decision_id"]


async def test_sdk_models_retrieve_one_model(sdk, runtime, http, monkeypatch):
    model = await sdk.models.retrieve(PINNED)
    assert (model.id, model.object, model.owned_by) == (PINNED, "model", "openai") and model.created > 0
    assert (await sdk.models.retrieve("gpt-4o-mini")).id == PINNED  # a bare wire id, as chat takes it
    assert (await http.get("/v1/models/openai%2Fgpt-4o-mini")).json()["id"] == PINNED
    assert (await sdk.models.retrieve("p402/auto")).owned_by == "p402"
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.retrieve("nowhere/no-such-model")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    usable = runtime.settings.usable_providers()
    monkeypatch.setattr(runtime.settings, "usable_providers", lambda: [p for p in usable if p.id != "groq"])
    unusable = next(m.id for m in runtime.settings.catalog.models.values() if m.provider == "groq")
    error = assert_openai_error(await http.get(f"/v1/models/{unusable}"), 404, "model_not_found")
    assert "not usable" in error["message"]


async def test_sdk_raises_its_own_typed_errors(sdk):
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(model=PINNED, messages=HELLO, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.chat.completions.create(model="nowhere/no-such-model", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as filtered:
        await sdk.chat.completions.create(
            model="auto", messages=HELLO, extra_body={"p402": {"require": ["embeddings", "vision"], "max_tier": "budget"}}
        )
    assert filtered.value.body["code"] == "no_eligible_model"
    assert "embeddings" in filtered.value.body["message"]  # the filter that left nothing is named


async def test_sdk_authentication_error_when_keys_exist(gateway, runtime):
    record, secret = await create_key(runtime.store, "ci")
    anonymous = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="p402-not-a-key", max_retries=0)
    keyed = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await anonymous.chat.completions.create(model=PINNED, messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            await anonymous.models.list()
        answer = await keyed.chat.completions.create(model=PINNED, messages=HELLO)
        assert answer.choices[0].message.content
    finally:
        await anonymous.close()
        await keyed.close()
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.get("/health")).status_code == 200  # never needs a key
        error = assert_openai_error(await http.get("/api/v2/providers"), 401, "missing_api_key")
        assert "Bearer" in error["message"]
        second, other_secret = await create_key(runtime.store, "second")
        assert await revoke_key(runtime.store, record["id"])
        gateway.gateway.auth.ttl_s = 0  # see the revocation now rather than after the remembered window
        revoked = await http.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
        assert_openai_error(revoked, 401, "invalid_api_key")
        assert (await http.get("/v1/models", headers={"authorization": f"Bearer {other_secret}"})).status_code == 200
        assert (await http.get("/openapi.json", headers={"authorization": f"Bearer {other_secret}"})).json()[
            "security"
        ] == [{"bearer": []}]  # keys in force: the document says every operation needs one
        assert await revoke_key(runtime.store, second["id"])
        # Every key revoked: the gateway stays locked (opening it again would let the revoked keys back in).
        assert_openai_error(await http.get("/v1/models"), 401, "missing_api_key")
        assert_openai_error(await http.get("/v1/models", headers={"authorization": f"Bearer {other_secret}"}), 401)


# --- the p402 object and caching ----------------------------------------------------------------


async def test_p402_options_steer_routing_and_are_not_sent_upstream(http, sim):
    body = {
        "messages": HELLO,
        "p402": {"mode": "cost", "require": ["function_calling"], "exclude": ["openai"], "max_tier": "budget",
                 "tag": "ci", "failover": {"enabled": False}},
    }
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    p402 = response.json()["p402"]
    assert p402["provider"] != "openai"
    decision = (await http.get(f"/api/v2/decisions/{p402['decision_id']}")).json()
    assert decision["id"] == p402["decision_id"]
    assert decision["mode"] == "cost"
    assert decision["options"]["exclude"] == ["openai"] and decision["options"]["failover"] is False


async def test_p402_option_errors_name_the_param(http):
    response = await http.post("/v1/chat/completions", json={"messages": HELLO, "p402": {"max_tier": "gold"}})
    assert assert_openai_error(response, 400)["param"] == "p402.max_tier"
    response = await http.post("/v1/chat/completions", json={"messages": HELLO, "p402": {"colour": "red"}})
    assert assert_openai_error(response, 400)["param"] == "p402.colour"
    response = await http.post("/v1/chat/completions", json={"messages": HELLO, "p402": {"exclude": ["groq", "nowhere"]}})
    assert assert_openai_error(response, 400)["param"] == "p402.exclude[1]"


async def test_the_routers_own_model_names_route(http):
    response = await http.post("/v1/chat/completions", json={"model": "p402/quality", "messages": HELLO})
    assert response.status_code == 200, response.text
    decision = (await http.get("/api/v2/decisions", params={"limit": 1})).json()["data"][0]
    assert decision["id"] == response.json()["p402"]["decision_id"] and decision["mode"] == "quality"


async def test_cache_control_no_cache_skips_the_cache(http):
    body = {"model": PINNED, "messages": [{"role": "user", "content": "A question worth caching."}]}
    first = (await http.post("/v1/chat/completions", json=body)).json()
    assert first["p402"]["cached"] is False
    again = await eventually(
        lambda: _cached(http, body, {}), timeout=3.0
    )  # the cache insert is queued, not awaited by the request
    assert again
    fresh = (await http.post("/v1/chat/completions", json=body, headers={"cache-control": "no-cache"})).json()
    assert fresh["p402"]["cached"] is False


async def _cached(http: httpx.AsyncClient, body: dict, headers: dict) -> bool:
    response = await http.post("/v1/chat/completions", json=body, headers=headers)
    return response.json()["p402"]["cached"]


# --- error shapes -------------------------------------------------------------------------------


async def test_invalid_json_and_body(http):
    assert_openai_error(await http.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
    error = assert_openai_error(await http.post("/v1/chat/completions", json={"messages": []}), 400)
    assert error["param"] == "messages"
    error = assert_openai_error(
        await http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}), 400
    )
    assert error["param"] == "messages[0].role"
    # Beyond int64 the router's cost arithmetic would fail: refused at the edge like OpenAI does it.
    error = assert_openai_error(await http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 10**23}), 400)
    assert error["param"] == "max_tokens"


async def test_body_over_the_limit_is_413(http, runtime):
    limit = runtime.settings.gateway.max_body_bytes
    big = {"messages": [{"role": "user", "content": "x" * (limit + 1)}]}
    assert_openai_error(await http.post("/v1/chat/completions", json=big), 413, "request_too_large")

    async def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    assert_openai_error(await http.post("/v1/chat/completions", content=chunked()), 413, "request_too_large")

    async def in_pieces():  # a body under the limit, sent in pieces, is read whole
        text = json.dumps({"model": PINNED, "messages": HELLO}).encode()
        for at in range(0, len(text), 7):
            yield text[at : at + 7]

    response = await http.post("/v1/chat/completions", content=in_pieces())
    assert response.status_code == 200 and response.json()["p402"]["model"]


async def test_unknown_routes_and_methods(http):
    assert_openai_error(await http.get("/v1/nothing"), 404, "not_found")
    assert_openai_error(await http.delete("/v1/models"), 405, "method_not_allowed")
    # A 405 names every method the path takes, as RFC 9110 asks.
    refused = await http.put("/api/v2/sessions/ses-1")
    assert_openai_error(refused, 405, "method_not_allowed")
    assert set(refused.headers["allow"].split(", ")) == {"GET", "HEAD", "PATCH", "DELETE"}
    head, get = await http.head("/api/v2/sessions"), await http.get("/api/v2/sessions")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


async def test_json_types_are_taken_as_they_are(http):
    """As OpenAI's API does: a number is no boolean, a boolean no number, a blank name no name."""
    sid = (await http.post("/api/v2/sessions", json={"name": "strict"})).json()["id"]
    for method, path, body, param in (
        ("POST", "/v1/chat/completions", {"messages": HELLO, "stream": 0}, "stream"),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "temperature": "0.7"}, "temperature"),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "p402": {"cache": 0}}, "p402.cache"),
        ("POST", "/api/v2/sessions", {"name": "x", "budget_usd": False}, "budget_usd"),
        ("POST", "/api/v2/sessions", {"name": "\f"}, "name"),
        ("PATCH", f"/api/v2/sessions/{sid}", {"budget_usd": True}, "budget_usd"),
        ("POST", "/api/v2/providers", {"input_tokens": 10, "output_tokens": True}, "output_tokens"),
        ("POST", "/api/v2/providers", {"input_tokens": 10**400, "output_tokens": 1}, "input_tokens"),  # was a 500
        ("POST", "/api/v2/providers", {"input_tokens": 1, "output_tokens": 1e20}, "output_tokens"),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": "16"}, "max_tokens"),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 16.5}, "max_tokens"),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2**31}, "max_tokens"),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "seed": 2**63}, "seed"),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "n": 2}, "n"),  # was answered with one choice
        ("PATCH", f"/api/v2/sessions/{sid}", {"name": " "}, "name"),
        # Whitespace to Python but not to the schema's \S: the store's own check refuses it, naming the field.
        ("POST", "/api/v2/sessions", {"name": "\x1c"}, "name"),
        ("PATCH", f"/api/v2/sessions/{sid}", {"name": "\x1f "}, "name"),
    ):
        error = assert_openai_error(await http.request(method, path, json=body), 400)
        assert error["param"] == param, (body, error)
    # JSON Schema's integers include 16.0, and a number may be written without a fraction.
    ok = await http.post("/v1/chat/completions", json={"messages": HELLO, "temperature": 1, "max_tokens": 16.0, "n": 1})
    assert ok.status_code == 200, ok.text
    assert (await http.post("/api/v2/providers", json={"input_tokens": 10.0, "output_tokens": 5})).status_code == 200
    # The largest max_tokens passes the edge; no model writes that much, which routing then says.
    biggest = await http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2**31 - 1})
    assert_openai_error(biggest, 400, "no_eligible_model")


async def test_events_refuse_an_unknown_kind_naming_the_known_ones(http):
    error = assert_openai_error(await http.get("/api/v2/events", params={"kinds": "route_decided,gossip"}), 400)
    assert error["param"] == "kinds" and "unknown event kind gossip" in error["message"]
    assert "route_decided, attempt_failed" in error["message"]  # in the order they happen


async def test_a_request_without_a_body_is_a_400(http):
    sid = (await http.post("/api/v2/sessions", json={"name": "empty"})).json()["id"]
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/api/v2/sessions"),
                         ("PATCH", f"/api/v2/sessions/{sid}"), ("POST", "/api/v2/providers")):
        error = assert_openai_error(await http.request(method, path), 400, "invalid_json")
        assert "no body" in error["message"]


async def test_every_upstream_failing_is_a_503_with_retry_after_listing_the_attempts(http, sim):
    sim.state.add_fault(Fault(provider="*", kind="error", status=503))
    response = await http.post("/v1/chat/completions", json={"messages": HELLO, "p402": {"failover": {"max_retries": 1}}})
    error = assert_openai_error(response, 503, "overloaded")
    assert error["type"] == "overloaded_error" and int(response.headers["retry-after"]) >= 1
    assert error["message"].startswith("all 2 upstream attempt(s) failed: server_error 503 from ")
    assert error["message"].count("server_error 503 from ") == 2  # the first choice and one retry, each named


async def test_no_candidate_left_is_a_503_with_retry_after_never_a_400(http, sim):
    sim.state.add_fault(Fault(provider="openai", model="gpt-4o-mini", kind="rate_limit", retry_after_s=30, count=1))
    first = await http.post("/v1/chat/completions", json={"model": PINNED, "messages": HELLO}, headers=NO_CACHE)
    assert first.status_code == 200 and first.json()["p402"]["attempts"][0]["error_kind"] == "rate_limited"
    for stream in (False, True):  # the pinned model is throttled, and without failover nothing else may answer
        body = {"model": PINNED, "messages": HELLO, "stream": stream, "p402": {"failover": {"enabled": False}}}
        response = await http.post("/v1/chat/completions", json=body, headers=NO_CACHE)
        error = assert_openai_error(response, 503, "overloaded")
        assert error["type"] == "overloaded_error" and 29 <= int(response.headers["retry-after"]) <= 30
    documented = (await http.get("/openapi.json")).json()["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "Retry-After" in documented["503"]["headers"]


async def test_the_sdk_sees_a_retryable_503_and_its_retry_is_answered(gateway, sdk, sim):
    sim.state.add_fault(Fault(provider="openai", model="gpt-4o-mini", kind="rate_limit", retry_after_s=1, count=1))
    await sdk.chat.completions.create(model=PINNED, messages=HELLO, extra_headers=NO_CACHE)  # fails over
    pinned_only = {"p402": {"failover": {"enabled": False}}}
    with pytest.raises(openai.InternalServerError) as refused:  # the model waits its second: nothing else may answer
        await sdk.chat.completions.create(model=PINNED, messages=HELLO, extra_headers=NO_CACHE, extra_body=pinned_only)
    assert refused.value.status_code == 503 and refused.value.code == "overloaded"
    assert refused.value.response.headers["retry-after"] == "1"
    retrying = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused-without-gateway-keys", max_retries=2)
    try:
        raw = await retrying.chat.completions.with_raw_response.create(
            model=PINNED, messages=HELLO, extra_headers=NO_CACHE, extra_body=pinned_only)
    finally:
        await retrying.close()
    assert raw.retries_taken >= 1 and raw.parse().choices[0].message.content


async def test_budget_exceeded_is_402(http):
    session = (await http.post("/api/v2/sessions", json={"name": "tiny", "budget_usd": 0.0})).json()
    response = await http.post("/v1/chat/completions", json={"messages": HELLO, "p402": {"session_id": session["id"]}})
    error = assert_openai_error(response, 402, "budget_exceeded")
    assert session["id"] in error["message"]


async def test_mid_stream_failure_sends_an_error_chunk_then_done(http, sim):
    sim.state.add_fault(Fault(provider="openai", kind="disconnect", after_tokens=3))
    body = {"model": PINNED, "messages": HELLO, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == "stream_interrupted" and error["message"]
    assert any('"content"' in line for line in lines[:-2])  # the tokens before the break arrived


async def test_mid_stream_failure_reports_what_was_used_before_the_error_when_asked(http, sim):
    sim.state.add_fault(Fault(provider="openai", kind="disconnect", after_tokens=3))
    body = {"model": PINNED, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2]
    usage_chunk = json.loads(lines[-3][len("data: "):])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 3
    assert usage_chunk["usage"]["prompt_tokens"] > 0 and usage_chunk["p402"]["cost_usd"] > 0


async def test_a_stream_failing_before_content_is_a_plain_http_error(http, sim):
    sim.state.add_fault(Fault(provider="*", kind="error", status=500))
    body = {"model": PINNED, "messages": HELLO, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        await response.aread()
    assert_openai_error(response, 503, "overloaded")


# --- streams end when the client goes ---------------------------------------------------------------


async def test_client_disconnect_cancels_the_upstream_stream(http, sim):
    # The answer stalls after two tokens, as a slow model would: only the client's leaving can end it.
    sim.state.add_fault(Fault(provider="openai", kind="timeout", after_tokens=2))
    body = {"model": PINNED, "messages": HELLO, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if '"content"' in line:
                break  # leave after the first token
    stats = sim.state.streams
    assert await eventually(_async(lambda: stats.cancelled == 1 and stats.open_now == 0), timeout=5)


def _async(check):
    async def run():
        return check()

    return run


# --- /api/v2 ----------------------------------------------------------------------------------------


async def test_providers_with_models_usability_and_health(http, sdk):
    await sdk.chat.completions.create(model=PINNED, messages=HELLO)
    data = (await http.get("/api/v2/providers")).json()["data"]
    by_id = {p["id"]: p for p in data}
    assert len(by_id) == 13 and all(p["usable"] for p in data)
    openai_entry = by_id["openai"]
    assert any(m["id"] == PINNED for m in openai_entry["models"])
    assert openai_entry["health"]["status"] == "healthy"
    assert openai_entry["health"]["requests"] >= 1
    # A usable provider without traffic yet still has a health row (the attached console lists all twelve).
    assert by_id["ai21"]["health"]["status"] == "healthy"
    assert by_id["ai21"]["health"]["requests"] == 0


async def test_provider_cost_comparison(http):
    response = await http.post(
        "/api/v2/providers", json={"input_tokens": 1000, "output_tokens": 500, "require": ["vision"], "top": 3}
    )
    rows = response.json()["data"]
    assert len(rows) == 3
    costs = [r["cost_usd"] for r in rows]
    assert costs == sorted(costs)
    assert_openai_error(await http.post("/api/v2/providers", json={"input_tokens": -1, "output_tokens": 1}), 400)
    error = assert_openai_error(
        await http.post("/api/v2/providers", json={"input_tokens": 1, "output_tokens": 1, "require": ["telepathy"]}), 400
    )
    assert error["param"] == "require[0]"


async def test_spend_and_recommendations(http, sdk):
    for _ in range(3):
        await sdk.chat.completions.create(model=PINNED, messages=HELLO, extra_headers={"cache-control": "no-cache"})
    spend = (await http.get("/api/v2/analytics/spend", params={"period": "today", "by": "model"})).json()
    assert spend["requests"] == 3 and spend["total_usd"] > 0
    assert spend["breakdown"][0]["key"] == PINNED
    assert_openai_error(await http.get("/api/v2/analytics/spend", params={"period": "fortnight"}), 400)
    assert_openai_error(await http.get("/api/v2/analytics/spend", params={"by": "colour"}), 400)
    empty_date = assert_openai_error(await http.get("/api/v2/analytics/spend?to="), 400, "invalid_period")
    assert "not a date" in empty_date["message"]  # given empty is wrong, not the default
    assert_openai_error(await http.get("/api/v2/analytics/recommendations?period="), 400, "invalid_period")
    # Periods the document's pattern allows are answered, however far they reach; the rest are 400s.
    for period in ("99999d", "..9999-12-31", "0001-01-01..", ".."):
        reply = await http.get("/api/v2/analytics/spend", params={"period": period})
        assert reply.status_code == 200, (period, reply.text)
    for period in ("100000d", "07d", "7d\n", "20240101..20240105", "2026-02-30.."):
        assert_openai_error(await http.get("/api/v2/analytics/spend", params={"period": period}), 400, "invalid_period")
    recommendations = (await http.get("/api/v2/analytics/recommendations")).json()
    assert recommendations["object"] == "list"
    assert all({"kind", "title", "monthly_saving_usd"} <= set(r) for r in recommendations["data"])


async def test_sessions_crud(http):
    created = await http.post(
        "/api/v2/sessions", json={"name": "agent-1", "budget_usd": 1.5, "agent": "coder", "metadata": {"repo": "p402"}}
    )
    assert created.status_code == 201
    session = created.json()
    assert {"id", "name", "budget_usd", "spent_usd", "requests", "status", "agent", "metadata"} <= set(session)
    assert session["status"] == "active" and session["spent_usd"] == 0 and session["requests"] == 0
    sid = session["id"]
    answer = await http.post("/v1/chat/completions", json={"model": PINNED, "messages": HELLO, "p402": {"session_id": sid}})
    assert answer.status_code == 200
    fetched = (await http.get(f"/api/v2/sessions/{sid}")).json()
    assert fetched["requests"] == 1 and fetched["spent_usd"] == pytest.approx(answer.json()["p402"]["cost_usd"])
    patched = (await http.patch(f"/api/v2/sessions/{sid}", json={"status": "paused", "budget_usd": None})).json()
    assert patched["status"] == "paused" and patched["budget_usd"] is None and patched["name"] == "agent-1"
    # A name or a status can be left out, not removed; an agent can be removed.
    for field in ("name", "status"):
        error = assert_openai_error(await http.patch(f"/api/v2/sessions/{sid}", json={field: None}), 400)
        assert error["param"] == field and "cannot be null" in error["message"]
    assert (await http.patch(f"/api/v2/sessions/{sid}", json={"agent": None})).json()["agent"] is None
    listed = (await http.get("/api/v2/sessions", params={"status": "paused"})).json()["data"]
    assert [s["id"] for s in listed] == [sid]
    assert (await http.delete(f"/api/v2/sessions/{sid}")).json() == {"id": sid, "deleted": True}
    assert_openai_error(await http.get(f"/api/v2/sessions/{sid}"), 404, "session_not_found")
    assert_openai_error(await http.patch("/api/v2/sessions/ses-nope", json={"name": "x"}), 404)
    assert_openai_error(await http.delete("/api/v2/sessions/ses-nope"), 404)
    assert_openai_error(await http.post("/api/v2/sessions", json={"budget_usd": 1}), 400)
    assert_openai_error(await http.patch(f"/api/v2/sessions/{sid}", json={"status": "sleeping"}), 400)


async def test_a_sessions_requests_and_messages(http):
    sid = (await http.post("/api/v2/sessions", json={"name": "agent-2"})).json()["id"]
    answers = []
    for question in ("first question", "second question"):
        body = {"model": PINNED, "messages": [{"role": "user", "content": question}], "p402": {"session_id": sid}}
        answers.append((await http.post("/v1/chat/completions", json=body)).json())
    requests = (await http.get(f"/api/v2/sessions/{sid}/requests")).json()
    assert requests["object"] == "list" and len(requests["data"]) == 2
    assert [r["session_id"] for r in requests["data"]] == [sid, sid]
    assert requests["data"][0]["ts"] >= requests["data"][1]["ts"]  # newest first
    assert sum(r["cost_usd"] for r in requests["data"]) == pytest.approx(sum(a["p402"]["cost_usd"] for a in answers))
    assert (await http.get(f"/api/v2/sessions/{sid}/requests", params={"limit": 1})).json()["data"] == requests["data"][:1]
    messages = (await http.get(f"/api/v2/sessions/{sid}/messages")).json()["data"]
    assert [(m["role"], m["content"]) for m in messages][::2] == [("user", "first question"), ("user", "second question")]
    assert [m["content"] for m in messages[1::2]] == [a["choices"][0]["message"]["content"] for a in answers]
    assert messages[1]["model"] == PINNED
    assert_openai_error(await http.get("/api/v2/sessions/ses-nope/requests"), 404, "session_not_found")
    assert_openai_error(await http.get("/api/v2/sessions/ses-nope/messages"), 404, "session_not_found")
    assert_openai_error(await http.get(f"/api/v2/sessions/{sid}/messages", params={"limit": 0}), 400)
    assert_openai_error(await http.get(f"/api/v2/sessions/{sid}/requests", params={"limit": "all"}), 400)


async def test_decisions_are_newest_first_with_candidates(http, sdk):
    first = await sdk.chat.completions.create(model="auto", messages=HELLO)
    second = await sdk.chat.completions.create(model="auto", messages=HELLO, extra_headers={"cache-control": "no-cache"})
    data = (await http.get("/api/v2/decisions", params={"limit": 2})).json()["data"]
    assert [d["id"] for d in data] == [second.model_extra["p402"]["decision_id"], first.model_extra["p402"]["decision_id"]]
    candidate = (await http.get(f"/api/v2/decisions/{data[0]['id']}")).json()["candidates"][0]
    assert {"id", "score", "components", "est_cost_usd"} <= set(candidate)
    assert_openai_error(await http.get("/api/v2/decisions", params={"limit": "many"}), 400)


async def test_events_deliver_a_decision_made_after_subscribing(gateway, http):
    subscribers = gateway.gateway.bus.subscribers
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as listener:
        async with listener.stream("GET", "/api/v2/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            lines = events.aiter_lines()
            assert (await anext(lines)).startswith(":")  # subscribed
            answer = await http.post("/v1/chat/completions", json={"model": PINNED, "messages": HELLO})
            decision_id = answer.json()["p402"]["decision_id"]
            kinds: list[str] = []
            async with asyncio.timeout(5):
                async for line in lines:
                    if line.startswith("event: "):
                        kinds.append(line[len("event: "):])
                    elif line.startswith("data: ") and kinds[-1] == "route_decided":
                        assert json.loads(line[len("data: "):])["decision"]["id"] == decision_id
                        break
    assert "route_decided" in kinds
    bus = gateway.gateway.bus
    assert await eventually(_async(lambda: bus.subscribers == subscribers))  # the listener's closed with it


async def test_without_a_store_decisions_come_from_the_ring_and_events_heartbeat(runtime):
    from p402_tui.gateway.app import Gateway
    from p402_tui.gateway.server import start_gateway

    gateway = Gateway(runtime.orchestrator, settings=runtime.settings, heartbeat_s=0.05)
    running = await start_gateway(gateway, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=5) as http:
            answer = (await http.post("/v1/chat/completions", json={"model": PINNED, "messages": HELLO})).json()
            decisions = (await http.get("/api/v2/decisions")).json()["data"]
            assert decisions[0]["id"] == answer["p402"]["decision_id"]
            assert_openai_error(await http.get("/api/v2/sessions"), 503, "no_store")
            async with http.stream("GET", "/api/v2/events", params={"kinds": "health_changed"}) as events:
                lines = events.aiter_lines()
                seen = [await anext(lines) for _ in range(4)]
            error = assert_openai_error(await http.get("/api/v2/events", params={"kinds": "gossip"}), 400)
        assert seen[0] == ": subscribed"
        assert ": keep-alive" in seen
        assert error["param"] == "kinds"
    finally:
        await running.stop()


# --- operations ---------------------------------------------------------------------------------


async def test_health_metrics_and_openapi(http, sdk, runtime):
    health = (await http.get("/health")).json()
    assert health["status"] == "ok" and health["providers_usable"] == 13
    await sdk.chat.completions.create(model=PINNED, messages=HELLO)
    stream = await sdk.chat.completions.create(
        model=PINNED, messages=HELLO, stream=True, extra_headers={"cache-control": "no-cache"}
    )
    async for _ in stream:
        pass

    async def counted() -> str | None:
        text = (await http.get("/metrics")).text
        return text if 'p402_requests_total{provider="openai",model="gpt-4o-mini",status="ok",endpoint="chat_completions"} 2' in text else None

    text = await eventually(counted)
    assert text, (await http.get("/metrics")).text
    for name in ("p402_tokens_total", "p402_cost_usd_total", "p402_request_latency_seconds_bucket",
                 "p402_ttft_seconds_count", "p402_errors_total", "p402_cache_hits_total"):
        assert name in text
    assert 'p402_ttft_seconds_count{provider="openai",model="gpt-4o-mini"} 1' in text
    document = (await http.get("/openapi.json")).json()
    assert document["openapi"] == "3.2.0"
    paths = set(document["paths"])
    assert {
        "/v1/chat/completions", "/api/v2/chat/completions", "/v1/models", "/v1/models/{model}", "/api/v2/providers",
        "/api/v2/analytics/spend", "/api/v2/analytics/recommendations", "/api/v2/sessions",
        "/api/v2/sessions/{session_id}", "/api/v2/sessions/{session_id}/requests",
        "/api/v2/sessions/{session_id}/messages", "/api/v2/decisions", "/api/v2/decisions/{decision_id}",
        "/api/v2/events", "/api/v2/cache", "/health", "/health/live", "/health/ready",
        "/metrics", "/openapi.json", "/v1/messages", "/v1/messages/count_tokens",
        "/v1/embeddings", "/v1/responses", "/v1/responses/{response_id}",
        "/api/v2/keys", "/api/v2/keys/{key_id}", "/api/v2/keys/{key_id}/requests",
    } == paths
    assert "p402" in document["components"]["schemas"]["ChatCompletionRequest"]["allOf"][1]["properties"]
    assert document["security"] == []  # no gateway key exists: no operation needs one

    def keywords(node):  # every key of every schema object in the document
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keywords(value)
        elif isinstance(node, list):
            for value in node:
                yield from keywords(value)

    # Pydantic writes `ge` instead of `minimum` when a constraint follows a validator: not JSON Schema.
    assert not {"ge", "gt", "le", "lt"} & set(keywords(document["components"]))
    max_tokens = document["components"]["schemas"]["ChatRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
    options = document["components"]["schemas"]["P402Options"]["properties"]
    assert options["prefer"]["items"]["enum"] == list(runtime.orchestrator.catalog.providers)
    assert options["exclude"]["items"] == options["prefer"]["items"]
    schemas = document["components"]["schemas"]
    patch_name = schemas["SessionPatch"]["properties"]["name"]
    assert patch_name == {"title": "Name", "type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}
    assert schemas["SessionCreate"]["properties"]["name"]["pattern"] == r"\S"
    # A stream's body is text; each event is described by OpenAPI 3.2's itemSchema.
    chat_events = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert chat_events["schema"] == {"type": "string"} and chat_events["itemSchema"]["required"] == ["data"]
    live = document["paths"]["/api/v2/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    assert "route_decided" in live["itemSchema"]["properties"]["event"]["enum"]
    assert "400" in document["paths"]["/api/v2/events"]["get"]["responses"]  # an unknown kind (schemathesis)


async def test_api_v2_chat_is_the_same_route(http):
    response = await http.post("/api/v2/chat/completions", json={"model": PINNED, "messages": HELLO})
    assert response.json()["object"] == "chat.completion"


async def test_refuses_a_non_loopback_address_without_keys(runtime):
    with pytest.raises(ConfigError, match="without gateway keys"):
        await runtime.serve_gateway("0.0.0.0", 0)


async def test_the_gateway_socket_gets_no_delay_on_asyncio_s_own_loop():
    """asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it every answer's
    body waited for the client's delayed ACK (~40 ms a request on asyncio's loop, as in the console)."""
    import socket

    from p402_tui.gateway.server import _bind

    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await loop.create_server(Probe, sock=_bind("127.0.0.1", 0))
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(accepted, 5) == 1
        writer.close()
    finally:
        server.close()
