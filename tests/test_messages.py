"""Anthropic's Messages API on the gateway, with the official `anthropic` SDK against `p402 serve --sim`.

One gateway (keys in force, the SDK sending a P402 key as ANTHROPIC_API_KEY would) serves the
module; the 529 test starts its own, since it takes every provider down.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pydantic
import pytest
from anthropic import BaseModel
from conftest import run_cli
from helpers import PNG, Served

# One model of each wire family; Anthropic's named as Claude Code names it, without its date.
FAMILIES = {
    "anthropic": "claude-haiku-4-5",
    "openai": "openai/gpt-4o-mini",
    "gemini": "google/gemini-3.5-flash",
    "cohere": "cohere/command-r-plus-08-2024",
}
VISION = ("anthropic", "openai", "gemini")
WEATHER = {
    "name": "get_weather",
    "description": "Weather by city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
NO_CACHE = {"cache-control": "no-cache"}
QUESTION = [{"role": "user", "content": "Say hello to the gateway."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("messages") / "p402.db")
    created = run_cli("keys", "create", "--name", "claude-code", "--db", db, "--json")
    assert created.returncode == 0, created.stderr
    gateway = Served("--sim", "--db", db)
    gateway.key = json.loads(created.stdout)["key"]
    yield gateway
    assert gateway.stop() == 0


@pytest.fixture(scope="module")
def client(served):
    with anthropic.Anthropic(base_url=served.url, api_key=served.key, max_retries=0) as sdk:
        yield sdk


@pytest.mark.parametrize("family", FAMILIES)
def test_create_and_stream_with_every_family(client, family):
    model = FAMILIES[family]
    message = client.messages.create(model=model, max_tokens=64, messages=QUESTION, extra_headers=NO_CACHE)
    assert message.type == "message" and message.role == "assistant"
    assert message.content and message.content[-1].type == "text" and message.content[-1].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    with client.messages.stream(model=model, max_tokens=64, messages=QUESTION, extra_headers=NO_CACHE) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert final.content[-1].type == "text" and final.content[-1].text and final.usage.output_tokens > 0 and final.stop_reason


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tool_round_trip_with_every_family(client, family):
    model = FAMILIES[family]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = client.messages.create(model=model, max_tokens=300, tools=[WEATHER], messages=question)
    assert asked.stop_reason == "tool_use"
    call = next(block for block in asked.content if block.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input, dict) and call.id

    answered = client.messages.create(
        model=model, max_tokens=300, tools=[WEATHER],
        messages=[*question, {"role": "assistant", "content": asked.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C, sunny"}]}],
    )  # fmt: skip
    assert answered.stop_reason in ("end_turn", "max_tokens") and answered.content[-1].type == "text"

    with client.messages.stream(model=model, max_tokens=300, tools=[WEATHER], messages=question) as stream:
        streamed = stream.get_final_message()
    used = next(block for block in streamed.content if block.type == "tool_use")
    assert streamed.stop_reason == "tool_use" and used.name == "get_weather" and "city" in used.input


@pytest.mark.parametrize("family", VISION)
def test_an_image(client, family):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is in this picture?"}]}]
    answer = client.messages.create(model=FAMILIES[family], max_tokens=64, messages=messages, extra_headers=NO_CACHE)
    assert answer.content[-1].text and answer.usage.input_tokens > 0


def test_count_tokens_and_model_ids_with_and_without_their_date(client, served):
    counted = client.messages.count_tokens(model="claude-sonnet-4-5", messages=QUESTION)
    assert counted.input_tokens > 0
    dated = client.messages.count_tokens(model="claude-sonnet-4-5-20250929", messages=QUESTION, tools=[WEATHER])
    assert dated.input_tokens > counted.input_tokens  # the tool's definition counts too
    raw = httpx.post(f"{served.url}/v1/messages/count_tokens", headers={"x-api-key": served.key},
                     json={"model": "openai/gpt-4o-mini", "messages": QUESTION})  # fmt: skip
    assert raw.json() == {"input_tokens": raw.json()["input_tokens"]}  # only Anthropic's field in the body
    assert raw.headers["p402-token-count"].startswith("p402; tokenizer=")  # P402's own count, and says so
    own = httpx.post(f"{served.url}/v1/messages/count_tokens", headers={"x-api-key": served.key},
                     json={"model": "claude-sonnet-4-5", "messages": QUESTION})  # fmt: skip
    assert own.headers["p402-token-count"] == "provider; anthropic"  # Anthropic's models: Anthropic's own count
    assert own.json()["input_tokens"] == counted.input_tokens > 0

    for model in ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "anthropic/claude-sonnet-4-5-20250929"):
        answer = client.messages.create(model=model, max_tokens=16, messages=QUESTION)
        assert answer.model == "claude-sonnet-4-5-20250929"


def test_typed_exceptions_for_400_401_404(client, served):
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="claude-haiku-4-5", max_tokens=0, messages=QUESTION)
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-nonexistent-9", max_tokens=16, messages=QUESTION)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with anthropic.Anthropic(base_url=served.url, api_key="p402-not-a-key", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            stranger.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=QUESTION)
    assert denied.value.body["error"]["type"] == "authentication_error"
    wrong_method = httpx.get(f"{served.url}/v1/messages", headers={"x-api-key": served.key})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_529_overloaded_when_every_candidate_is_down(tmp_path):
    gateway = Served("--sim", "--db", str(tmp_path / "p402.db"))
    try:
        fault = httpx.post(f"{gateway.sim_url}/_sim/faults", json={"kind": "error", "status": 503})
        assert fault.status_code == 201, fault.text
        with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0) as sdk:
            with pytest.raises(anthropic.OverloadedError) as down:
                sdk.messages.create(model="auto", max_tokens=16, messages=QUESTION)
            assert down.value.status_code == 529 and down.value.body["error"]["type"] == "overloaded_error"
            with pytest.raises(anthropic.OverloadedError):
                with sdk.messages.stream(model="claude-haiku-4-5", max_tokens=16, messages=QUESTION) as stream:
                    stream.get_final_message()
    finally:
        assert gateway.stop() == 0


def test_the_stream_is_anthropics_exact_event_sequence(served):
    """Raw events, as the wire carries them: the SDK hides pings."""
    for model in (FAMILIES["anthropic"], FAMILIES["openai"]):
        body = {"model": model, "max_tokens": 32, "messages": QUESTION, "stream": True}
        with httpx.stream("POST", f"{served.url}/v1/messages", json=body,
                          headers={"x-api-key": served.key, **NO_CACHE}) as response:  # fmt: skip
            assert response.headers["content-type"].startswith("text/event-stream")
            text = response.read().decode()
        events = [block.split("\n") for block in text.strip().split("\n\n")]
        names = [lines[0].removeprefix("event: ") for lines in events]
        datas = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
        assert [d["type"] for d in datas] == names  # each event's name is its data's type
        assert names[0] == "message_start" and "ping" in names and names[-2:] == ["message_delta", "message_stop"]
        blocks = [n for n in names if n.startswith("content_block")]
        assert blocks[0] == "content_block_start" and blocks[-1] == "content_block_stop"
        assert datas[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens") and datas[-2]["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_usage_and_cost_equal_the_chat_routes(client, served, family):
    model = FAMILIES[family]
    chat = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.key, max_retries=0)
    prompt = f"Compare the two routes for {family}, please."
    via_chat = chat.chat.completions.create(
        model=model if "/" in model else f"anthropic/{model}-20251001", max_tokens=48,
        messages=[{"role": "user", "content": prompt}], extra_headers=NO_CACHE,
    )
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=48, messages=[{"role": "user", "content": prompt}], extra_headers=NO_CACHE
    )
    via_messages = raw.parse()
    usage = via_messages.usage
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == via_chat.usage.prompt_tokens
    assert usage.output_tokens == via_chat.usage.completion_tokens
    assert float(raw.headers["p402-cost-usd"]) == via_chat.model_extra["p402"]["cost_usd"]

    with client.messages.stream(model=model, max_tokens=48, messages=[{"role": "user", "content": prompt}],
                                extra_headers=NO_CACHE) as stream:  # fmt: skip
        streamed = stream.get_final_message()
    assert streamed.usage.output_tokens == via_chat.usage.completion_tokens
    assert streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens == via_chat.usage.prompt_tokens
    ledger = httpx.get(f"{served.url}/api/v2/decisions", params={"limit": 1}, headers={"x-api-key": served.key})
    latest = ledger.json()["data"][0]  # the streamed request, as the ledger recorded it
    assert latest["cost_usd"] == via_chat.model_extra["p402"]["cost_usd"] and latest["status"] == "ok"


def test_an_anthropic_model_gets_the_body_as_sent_and_its_answer_comes_back_whole(client):
    """Thinking blocks and their signatures, cache_control marks and fields P402 does not know pass both ways."""
    thinking = {"type": "enabled", "budget_tokens": 1024}
    question = [{"role": "user", "content": "Think, then say hello."}]
    thought = client.messages.create(model="claude-haiku-4-5", max_tokens=2048, thinking=thinking, messages=question,
                                     extra_headers=NO_CACHE)  # fmt: skip
    block = thought.content[0]
    assert block.type == "thinking" and block.thinking and block.signature  # the signature survives the gateway
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=2048, thinking=thinking, messages=question,
                                extra_headers=NO_CACHE) as stream:  # fmt: skip
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "thinking" and streamed.content[0].signature  # signature_delta passed on
    follow_up = [*question, {"role": "assistant", "content": thought.content}, {"role": "user", "content": "Again."}]
    again = client.messages.create(model="claude-haiku-4-5", max_tokens=2048, thinking=thinking, messages=follow_up,
                                   extra_headers=NO_CACHE)  # fmt: skip
    assert again.content[-1].type == "text"

    # A system prefix marked for Anthropic's prompt cache: written on the first call, read on the second.
    system = [{"type": "text", "text": "You answer briefly. " * 400, "cache_control": {"type": "ephemeral"}}]
    first = client.messages.create(model="claude-haiku-4-5", max_tokens=16, system=system, messages=question,
                                   extra_headers=NO_CACHE)  # fmt: skip
    second = client.messages.create(model="claude-haiku-4-5", max_tokens=16, system=system, messages=question,
                                    extra_headers=NO_CACHE)  # fmt: skip
    assert first.usage.cache_creation_input_tokens > 0 and second.usage.cache_read_input_tokens > 0

    # A field P402 does not know reaches Anthropic as sent: the simulator refuses it as Anthropic would.
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=question,
                               extra_body={"not_a_field": 1}, extra_headers=NO_CACHE)  # fmt: skip
    assert "not_a_field" in refused.value.body["error"]["message"]


def test_anthropic_beta_and_version_headers_reach_an_anthropic_upstream_only(client, served):
    """Claude Code's betas (context management, say) come as `anthropic-beta`: an Anthropic model's
    upstream gets them and the `anthropic-version` as sent; other families' calls leave them behind."""

    def received(name):
        return httpx.get(f"{served.sim_url}/_sim/stats").json()["headers"].get(name, {})

    def calls_with(beta):  # the SDK adds betas of its own (token-counting for count_tokens)
        return sum(n for value, n in received("anthropic-beta").items() if beta in value.split(","))

    beta = "context-management-2025-06-27"
    edits = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    before = calls_with(beta)
    created = client.beta.messages.create(model="claude-haiku-4-5", max_tokens=32, messages=QUESTION, betas=[beta],
                                          context_management=edits, extra_headers=NO_CACHE)  # fmt: skip
    assert created.content[-1].text
    with client.beta.messages.stream(model="claude-haiku-4-5", max_tokens=32, messages=QUESTION, betas=[beta],
                                     context_management=edits, extra_headers=NO_CACHE) as stream:  # fmt: skip
        assert stream.get_final_message().content[-1].text
    counted = client.beta.messages.count_tokens(model="claude-haiku-4-5", messages=QUESTION, betas=[beta])
    assert counted.input_tokens > 0
    assert calls_with(beta) == before + 3  # created, streamed and counted

    # Two betas, and a version of the caller's own, as headers any Anthropic SDK can send.
    two = "interleaved-thinking-2025-05-14,p402-test-beta"
    client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=QUESTION,
                           extra_headers={**NO_CACHE, "anthropic-beta": two, "anthropic-version": "2023-01-01"})
    assert received("anthropic-beta").get(two) == 1 and received("anthropic-version").get("2023-01-01") == 1

    # Another family's model answers, and no Anthropic upstream saw the beta.
    other = client.beta.messages.create(model=FAMILIES["openai"], max_tokens=16, messages=QUESTION,
                                        betas=["p402-other-family-beta"], extra_headers=NO_CACHE)  # fmt: skip
    assert other.content[-1].text and calls_with("p402-other-family-beta") == 0


def extra_fields(value, where: str = "") -> list[str]:
    """Fields of `value` (a parsed SDK object) its type does not declare, at any depth."""
    found = []
    if isinstance(value, BaseModel):
        found += [f"{where}.{name}" for name in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += extra_fields(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += extra_fields(item, f"{where}[{index}]")
    return found


EVENT_TYPES = {
    "message_start": anthropic.types.RawMessageStartEvent,
    "content_block_start": anthropic.types.RawContentBlockStartEvent,
    "content_block_delta": anthropic.types.RawContentBlockDeltaEvent,
    "content_block_stop": anthropic.types.RawContentBlockStopEvent,
    "message_delta": anthropic.types.RawMessageDeltaEvent,
    "message_stop": anthropic.types.RawMessageStopEvent,
}


def strictly(sdk_type, data):
    """`data` as the SDK's type, refusing what the type leaves out and what it does not declare."""
    parsed = pydantic.TypeAdapter(sdk_type).validate_python(data)
    assert extra_fields(parsed) == [], data
    return parsed


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_validate_strictly_as_the_sdks_types(served, family):
    """Every field the SDK's types require is there, and nothing they do not declare, plain and streamed."""
    headers = {"x-api-key": served.key, **NO_CACHE}
    tools = {"tools": [WEATHER], "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    for extra in ({}, tools, {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048}):
        body = {"model": FAMILIES[family], "max_tokens": 300, "messages": QUESTION, **extra}
        answer = httpx.post(f"{served.url}/v1/messages", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        strictly(anthropic.types.Message, answer.json())
        with httpx.stream("POST", f"{served.url}/v1/messages", json={**body, "stream": True}, headers=headers,
                          timeout=30) as response:  # fmt: skip
            text = response.read().decode()
        for block in text.strip().split("\n\n"):
            event = json.loads(block.split("data: ", 1)[1])
            if event["type"] != "ping":  # the SDK has no type for pings: it drops them
                strictly(EVENT_TYPES[event["type"]], event)
    counted = httpx.post(f"{served.url}/v1/messages/count_tokens", json={"model": FAMILIES[family], "messages": QUESTION},
                         headers=headers)  # fmt: skip
    strictly(anthropic.types.MessageTokensCount, counted.json())
    refused = httpx.post(f"{served.url}/v1/messages", json={"model": FAMILIES[family], "messages": QUESTION},
                         headers=headers)  # fmt: skip
    assert refused.status_code == 400
    strictly(anthropic.types.ErrorResponse, refused.json())


async def test_pings_keep_a_slow_stream_alive(catalog, tmp_path):
    """While the model is slow to send its next piece, Anthropic's ping goes out every heartbeat."""
    from p402_tui.runtime import Runtime
    from p402_tui.sim.server import start_sim
    from test_gateway import settings_for

    sim = await start_sim(catalog)  # paced at each model's real speed
    try:
        async with Runtime.open(settings_for(catalog, sim.url), db_path=tmp_path / "p402.db") as runtime:
            gateway = await runtime.serve_gateway("127.0.0.1", 0)
            gateway.gateway.heartbeat_s = 0.005  # shorter than the pause between two of its tokens
            body = {"model": "openai/gpt-4o-mini", "max_tokens": 60, "messages": QUESTION, "stream": True}
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.post(f"{gateway.url}/v1/messages", json=body, headers=NO_CACHE)
            await gateway.stop()
    finally:
        await sim.stop()
    names = [block.split("\n")[0].removeprefix("event: ") for block in response.text.strip().split("\n\n")]
    assert names[-1] == "message_stop" and names.count("ping") > 1, names


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"model": "auto", "messages": QUESTION}, "max_tokens"),
        ({"model": "auto", "max_tokens": 8, "messages": []}, "messages"),
        ({"model": "auto", "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
         "messages[0].content[0].source"),
        ({"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
         "messages[0].content[0].type"),
        ({"model": "auto", "max_tokens": 8, "messages": QUESTION, "tools": [{"type": "web_search_20250305", "name": "w"}]},
         "tools[0].type"),
        ({"model": "auto", "max_tokens": 8, "messages": QUESTION, "tools": [WEATHER], "tool_choice": {"type": "maybe"}},
         "tool_choice.type"),
        ({"model": "auto", "max_tokens": 8, "messages": QUESTION, "temperature": 1.5}, "temperature"),
        ({"model": "auto", "max_tokens": 8, "messages": QUESTION, "p402": {"mode": "fastest-ever"}}, "p402.mode"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_bodies_are_anthropic_shaped_400s_naming_the_field(served, body, names):
    refused = httpx.post(f"{served.url}/v1/messages", json=body, headers={"x-api-key": served.key})
    assert refused.status_code == 400, refused.text
    error = refused.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert names in error["error"]["message"]
    garbled = httpx.post(f"{served.url}/v1/messages", content=b"{not json", headers={"x-api-key": served.key})
    assert garbled.status_code == 400 and garbled.json()["error"]["type"] == "invalid_request_error"
