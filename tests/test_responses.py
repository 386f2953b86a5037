"""`/v1/responses`, OpenAI's Responses API, through the official OpenAI SDK on a real gateway,
the real simulator behind it, on a model of each wire family."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from p402_tui.runtime import Runtime
from p402_tui.sim.engine import Fault
from p402_tui.store.queries import create_key
from test_gateway import NO_CACHE, assert_openai_error, gateway, http, runtime, sdk, settings_for  # noqa: F401 - fixtures

# A chat model of each wire family.
FAMILIES = [
    "openai/gpt-4o-mini",
    "anthropic/claude-haiku-4-5-20251001",
    "google/gemini-2.5-flash",
    "cohere/command-r-08-2024",
]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
UNCACHED = {"p402": {"cache": False}}


@pytest.mark.parametrize("model", FAMILIES)
async def test_plain_answer_on_every_family(sdk, model):
    response = await sdk.responses.create(model=model, input="Say hello to the gateway.", instructions="Be brief.")
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    assert response.output_text
    message = response.output[-1]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.instructions == "Be brief."
    assert response.model_extra["p402"]["provider"] == model.split("/")[0]


@pytest.mark.parametrize("model", FAMILIES)
async def test_streamed_answer_on_every_family_has_the_typed_events_in_order(sdk, model):
    stream = await sdk.responses.create(model=model, input="Say hello to the gateway.", stream=True, extra_body=UNCACHED)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                 "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert kind in kinds, (kind, kinds)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert text and done.output_text == text and done.status == "completed"
    assert done.usage.output_tokens > 0
    assert done.model_extra["p402"]["provider"] == model.split("/")[0]


@pytest.mark.parametrize("model", FAMILIES)
async def test_the_sdks_stream_helper_accumulates_the_same_answer(sdk, model):
    async with sdk.responses.stream(model=model, input="Say hello to the gateway.", extra_body=UNCACHED) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text and final.status == "completed"


@pytest.mark.parametrize("model", FAMILIES)
async def test_function_call_round_trip_on_every_family(sdk, model):
    first = await sdk.responses.create(
        model=model, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required", extra_body=UNCACHED
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    # The whole turn handed back as input items, the call's output after it.
    second = await sdk.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp_c": 4, "sky": "rain"}'},
        ],
        tools=[WEATHER],
        extra_body=UNCACHED,
    )
    assert second.status == "completed" and second.output_text


@pytest.mark.parametrize("model", FAMILIES)
async def test_a_streamed_function_call_has_its_argument_events(sdk, model):
    stream = await sdk.responses.create(
        model=model, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required", stream=True, extra_body=UNCACHED
    )
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.done" in kinds, kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert done.name == "get_weather" and json.loads(done.arguments) and deltas == done.arguments
    final = events[-1].response
    call = next(item for item in final.output if item.type == "function_call")
    assert call.arguments == done.arguments and call.call_id


async def test_previous_response_id_continues_across_families(sdk):
    first = await sdk.responses.create(model=FAMILIES[0], input="My name is Ada. Remember it.", extra_body=UNCACHED)
    turn = first
    for model in FAMILIES[1:]:  # each next turn on another family, the conversation carried by id
        turn = await sdk.responses.create(
            model=model, input="What is my name?", previous_response_id=turn.id, extra_body=UNCACHED
        )
        assert turn.previous_response_id is not None and turn.output_text
    streamed = await sdk.responses.create(
        model=FAMILIES[0], input="And again?", previous_response_id=turn.id, stream=True, extra_body=UNCACHED
    )
    events = [e async for e in streamed]
    follow = events[-1].response
    # Its input held the whole conversation, five user turns and four answers (counted by the first's tokenizer).
    assert follow.usage.input_tokens > first.usage.input_tokens * 4
    again = await sdk.responses.create(model=FAMILIES[1], input="Once more", previous_response_id=follow.id)
    assert again.output_text  # a streamed answer is stored for the next turn too


async def test_get_and_delete_a_stored_response(sdk, http):
    made = await sdk.responses.create(model=FAMILIES[0], input="Keep this answer.")
    fetched = await sdk.responses.retrieve(made.id)
    assert fetched.id == made.id and fetched.output_text == made.output_text
    assert fetched.usage.total_tokens == made.usage.total_tokens
    await sdk.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.create(model=FAMILIES[0], input="x", previous_response_id=made.id)
    response = await http.delete(f"/v1/responses/{made.id}")
    assert_openai_error(response, 404, "not_found")
    # store=false keeps nothing.
    unkept = await sdk.responses.create(model=FAMILIES[0], input="Forget this.", store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(unkept.id)


async def test_stored_responses_outlive_the_gateway_in_the_store(sim, catalog, tmp_path):
    settings = settings_for(catalog, sim.url)
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as rt:
        running = await rt.serve_gateway("127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            made = (await client.post("/v1/responses", json={"model": FAMILIES[0], "input": "Remember me."})).json()
        await running.stop()
    async with Runtime.open(settings_for(catalog, sim.url), db_path=tmp_path / "p402.db") as rt:
        running = await rt.serve_gateway("127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            fetched = (await client.get(f"/v1/responses/{made['id']}")).json()
            follow = await client.post("/v1/responses", json={"model": FAMILIES[2], "input": "Who?",
                                                             "previous_response_id": made["id"]})
        await running.stop()
    assert fetched["output"] == made["output"]
    assert follow.status_code == 200 and follow.json()["usage"]["input_tokens"] > made["usage"]["input_tokens"]


async def test_json_schema_and_json_object_formats(sdk):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    response = await sdk.responses.create(
        model=FAMILIES[0], input="Name a city.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    assert "city" in json.loads(response.output_text)
    assert response.text.format.type == "json_schema"
    response = await sdk.responses.create(model=FAMILIES[2], input="Name a city as JSON.",
                                          text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(response.output_text), dict)


async def test_max_output_tokens_ends_an_answer_incomplete(sdk):
    response = await sdk.responses.create(model=FAMILIES[0], input="Tell me a long story.", max_output_tokens=16,
                                          extra_body=UNCACHED)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens <= 16
    stream = await sdk.responses.create(model=FAMILIES[0], input="Tell me a long story.", max_output_tokens=16,
                                        stream=True, extra_body=UNCACHED)
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == "max_output_tokens"


async def test_an_image_input_routes_to_a_vision_model(sdk):
    pixel = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
    response = await sdk.responses.create(model="auto", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is in this picture?"},
        {"type": "input_image", "image_url": pixel},
    ]}])  # fmt: skip
    assert response.output_text


async def test_usage_and_cost_equal_the_same_request_through_chat(http):
    for model in FAMILIES:
        chat = (await http.post("/v1/chat/completions", headers=NO_CACHE, json={
            "model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Say hello to the gateway."}],
            "max_tokens": 50})).json()  # fmt: skip
        response = (await http.post("/v1/responses", headers=NO_CACHE, json={
            "model": model, "instructions": "Be brief.", "input": "Say hello to the gateway.",
            "max_output_tokens": 50})).json()  # fmt: skip
        assert response["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"], model
        assert response["usage"]["output_tokens"] == chat["usage"]["completion_tokens"], model
        assert response["p402"]["cost_usd"] == chat["p402"]["cost_usd"] > 0, model
        for stream in (False, True):
            body = {"model": model, "input": "Say hello.", "stream": stream}
            chat_body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "stream": stream,
                         "stream_options": {"include_usage": True}} if stream else {
                         "model": model, "messages": [{"role": "user", "content": "Say hello."}]}  # fmt: skip
            chat = await http.post("/v1/chat/completions", headers=NO_CACHE, json=chat_body)
            response = await http.post("/v1/responses", headers=NO_CACHE, json=body)
            if stream:
                chunks = [json.loads(line[6:]) for line in chat.text.splitlines() if line.startswith("data: {")]
                chat_usage, chat_cost = chunks[-1]["usage"], chunks[-1]["p402"]["cost_usd"]
                events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
                done = events[-1]["response"]
            else:
                chat_usage, chat_cost = chat.json()["usage"], chat.json()["p402"]["cost_usd"]
                done = response.json()
            assert done["usage"]["input_tokens"] == chat_usage["prompt_tokens"], (model, stream)
            assert done["usage"]["output_tokens"] == chat_usage["completion_tokens"], (model, stream)
            assert done["p402"]["cost_usd"] == chat_cost, (model, stream)


async def test_built_in_tools_and_unknown_items_are_refused_with_a_clear_400(http):
    for tool in ({"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
                 {"type": "web_search_preview"}, {"type": "code_interpreter", "container": {"type": "auto"}}):
        response = await http.post("/v1/responses", json={"model": "auto", "input": "x", "tools": [tool]})
        error = assert_openai_error(response, 400, "unsupported_tool")
        assert tool["type"] in error["message"] and error["param"] == "tools[0].type"
    cases = [
        ({"model": "auto"}, "input"),
        ({"model": "auto", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"model": "auto", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "auto", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input[0].content[0].type"),
        ({"model": "auto", "input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"model": "auto", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"model": "auto", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "auto", "input": "x", "background": True}, "background"),
        ({"model": "auto", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "auto", "input": "x", "tools": [{"type": "function", "name": "f", "strict": 1e16}]}, "tools[0].strict"),
        ({"model": "auto", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": []}]},
         "tools[0].parameters"),
        ({"model": "auto", "input": "x", "tools": [{"type": "function", "name": "f", "description": 7}]},
         "tools[0].description"),
    ]
    for body, param in cases:
        response = await http.post("/v1/responses", json=body)
        assert assert_openai_error(response, 400)["param"] == param, (body, response.text)
    assert_openai_error(await http.post("/v1/responses", json={"model": "nobody/nothing", "input": "x"}), 404)
    assert_openai_error(await http.get("/v1/responses/resp_nothing"), 404, "not_found")
    response = await http.post("/v1/responses", json={"model": "auto", "input": "x", "previous_response_id": "resp_no"})
    assert_openai_error(response, 404, "previous_response_not_found")


async def test_a_stream_that_breaks_ends_with_response_failed(http, sim):
    sim.state.add_fault(Fault(provider="openai", kind="disconnect", after_tokens=3))
    response = await http.post("/v1/responses", headers=NO_CACHE,
                               json={"model": FAMILIES[0], "input": "Tell me a long story.", "stream": True})
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["message"]


async def test_every_upstream_down_is_a_503_before_the_stream_starts(http, sim):
    sim.state.add_fault(Fault(provider="*", kind="error", status=503))
    for stream in (False, True):
        response = await http.post("/v1/responses", headers=NO_CACHE, json={
            "input": "x", "stream": stream, "p402": {"failover": {"max_retries": 1}}})  # fmt: skip
        assert_openai_error(response, 503, "overloaded")


async def test_another_keys_responses_are_not_found(gateway, runtime):
    _, first = await create_key(runtime.store, "one")
    _, second = await create_key(runtime.store, "two")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        made = await client.post("/v1/responses", json={"model": FAMILIES[0], "input": "mine"},
                                 headers={"authorization": f"Bearer {first}"})
        assert made.status_code == 200, made.text
        rid = made.json()["id"]
        theirs = await client.get(f"/v1/responses/{rid}", headers={"authorization": f"Bearer {second}"})
        assert_openai_error(theirs, 404)
        deleted = await client.delete(f"/v1/responses/{rid}", headers={"authorization": f"Bearer {second}"})
        assert_openai_error(deleted, 404)
        mine = await client.get(f"/v1/responses/{rid}", headers={"authorization": f"Bearer {first}"})
        assert mine.status_code == 200


async def test_a_models_reasoning_comes_as_a_reasoning_item_plain_and_streamed(sdk):
    model = "deepseek/deepseek-reasoner"  # the simulator gives its reasoning, as the provider does
    plain = await sdk.responses.create(model=model, input="Think: what is 2+2?", extra_body=UNCACHED)
    assert [item.type for item in plain.output] == ["reasoning", "message"]
    assert plain.output[0].summary[0].text and plain.output_text
    async with sdk.responses.stream(model=model, input="Think: what is 2+2?", extra_body=UNCACHED) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.reasoning_summary_text.delta" in kinds and "response.reasoning_summary_text.done" in kinds
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text


async def test_metrics_and_the_ledger_name_the_api_each_request_came_through(http, runtime):
    from test_gateway import eventually

    await http.post("/v1/responses", json={"model": FAMILIES[0], "input": "Which API?"}, headers=NO_CACHE)
    await http.post("/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "Which API?"})

    async def counted() -> str | None:
        text = (await http.get("/metrics")).text
        wanted = ('model="gpt-4o-mini",status="ok",endpoint="responses"} 1',
                  'model="text-embedding-3-small",status="ok",endpoint="embeddings"} 1')
        return text if all(w in text for w in wanted) else None

    assert await eventually(counted), (await http.get("/metrics")).text
    await runtime.store.flush()
    sources = {row["source"] for row in await runtime.store.fetchall("SELECT source FROM requests")}
    assert {"gateway:responses", "gateway:embeddings"} <= sources


async def test_a_streamed_answer_with_no_output_is_still_one_empty_message(http):
    """A stream that yields no text and no call (here a cached answer replayed) ends as one empty message
    with every event in order, never a 500 (found by the conformance fuzz)."""
    tool = {"type": "function", "name": "f", "parameters": None, "strict": None}
    body = {"model": "openai/gpt-4o-mini", "input": "x=", "tools": [tool], "max_output_tokens": 16}
    assert (await http.post("/v1/responses", json={**body, "stream": True})).status_code == 200
    assert (await http.post("/v1/responses", json=body)).status_code == 200
    again = await http.post("/v1/responses", json={**body, "stream": True})
    assert again.status_code == 200, again.text
    events = [line.split(": ", 1)[1] for line in again.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    done = json.loads(again.text.strip().split("\n\n")[-1].split("data: ", 1)[1])
    assert done["response"]["output"], done
