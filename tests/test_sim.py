"""The simulator speaks the real OpenAI wire: the official `openai` SDK parses it, for every path it serves.

Also: each provider's quirks on the raw wire, the fault control API, and `p402 sim` as a process.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import tomllib

import httpx
import openai
import pytest

from helpers import OPENAI_FAMILY_MODELS as MODELS
from helpers import WEATHER

from p402_tui.providers.base import tls_context

PROMPT = [{"role": "user", "content": "Tell me about the router."}]


@pytest.fixture
def client_for(fresh_sim, catalog):
    """An official OpenAI SDK client whose base_url is the simulated provider's."""
    made: list[openai.OpenAI] = []

    def build(pid: str, key: str = "sim-key") -> openai.OpenAI:
        base = f"{fresh_sim.url}/{pid}{catalog.providers[pid].base_path}"
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=10)
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


@pytest.fixture
def control(fresh_sim):
    with httpx.Client(base_url=fresh_sim.url, verify=tls_context()) as client:
        yield client


# --- the official SDK against every OpenAI-family path ------------------------------------------


@pytest.mark.parametrize("pid", list(MODELS))
def test_sdk_parses_plain_and_streamed_answers(pid, client_for):
    client = client_for(pid)
    model = MODELS[pid]
    completion = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=300)
    assert completion.object == "chat.completion" and completion.model == model
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant" and choice.message.content
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # Mistral refuses stream_options (its usage comes on the last chunk anyway).
    options = {} if pid == "mistral" else {"stream_options": {"include_usage": True}}
    chunks = list(client.chat.completions.create(model=model, messages=PROMPT, max_tokens=300, stream=True, **options))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usages = [c.usage for c in chunks if c.usage is not None]
    if pid == "groq":  # the OpenAI-style usage chunk; x_groq.usage rides on the finish chunk as well
        assert chunks[-2].model_extra["x_groq"]["usage"]["completion_tokens"] == usage.completion_tokens
    assert len(usages) == 1
    assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize("pid", ["openai", "groq", "deepseek", "openrouter", "fireworks"])
def test_usage_only_when_asked_where_the_provider_says_so(pid, client_for):
    chunks = list(client_for(pid).chat.completions.create(model=MODELS[pid], messages=PROMPT, stream=True))
    usages = [c for c in chunks if c.usage is not None]
    if pid == "openrouter":
        assert len(usages) == 1 and usages[0].usage.model_extra["cost"] > 0  # always, with its cost
    else:
        assert usages == []


@pytest.mark.parametrize("pid", ["openai", "groq", "deepseek", "openrouter"])
def test_sdk_parses_tool_calls_both_ways(pid, client_for):
    client = client_for(pid)
    ask = [{"role": "user", "content": "Weather in Lima?"}]
    completion = client.chat.completions.create(model=MODELS[pid], messages=ask, tools=[WEATHER])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    stream = client.chat.completions.create(model=MODELS[pid], messages=ask, tools=[WEATHER], stream=True)
    pieces = [tc for chunk in stream if chunk.choices for tc in chunk.choices[0].delta.tool_calls or ()]
    assert pieces[0].id == call.id and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments

    follow_up = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 19}'},
    ]
    answer = client.chat.completions.create(model=MODELS[pid], messages=follow_up, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content


def test_named_tool_choice_forces_that_tool(client_for):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    completion = client_for("openai").chat.completions.create(
        model="gpt-4o-mini",
        messages=PROMPT,
        tools=[WEATHER, other],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert completion.choices[0].message.tool_calls[0].function.name == "get_time"


def test_sdk_reads_provider_extras(client_for):
    reasoner = client_for("deepseek").chat.completions.create(model="deepseek-reasoner", messages=PROMPT)
    message = reasoner.choices[0].message
    assert message.model_extra["reasoning_content"] and message.content
    details = reasoner.usage.completion_tokens_details
    assert details.reasoning_tokens > 0 and reasoner.usage.model_extra["prompt_cache_miss_tokens"] > 0

    sonar = client_for("perplexity").chat.completions.create(model="sonar", messages=PROMPT)
    assert sonar.model_extra["citations"] and sonar.model_extra["search_results"][0]["url"]

    o3 = client_for("openai").chat.completions.create(model="o3", messages=PROMPT, max_completion_tokens=400)
    assert o3.usage.completion_tokens_details.reasoning_tokens > 0


def test_sdk_embeddings_and_models(client_for, catalog):
    client = client_for("openai")
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])  # the SDK asks for base64
    assert [len(item.embedding) for item in result.data] == [1536, 1536]
    assert math.isclose(sum(x * x for x in result.data[0].embedding), 1.0, rel_tol=1e-4)
    assert result.usage.prompt_tokens == 2
    narrow = client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=256)
    assert len(narrow.data[0].embedding) == 256
    ids = {m.id for m in client.models.list()}
    assert ids == {m.model for m in catalog.models_of("openai")}


def test_sdk_errors_have_the_real_shapes(client_for, control):
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for("openai", key="sk-invalid-key").chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert caught.value.code == "invalid_api_key"

    client = client_for("openai")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=PROMPT)
    assert caught.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4", messages=PROMPT, max_tokens=8192)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="o3", messages=PROMPT, max_tokens=100)
    assert caught.value.code == "unsupported_parameter"

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[])

    control.post("/_sim/faults", json={"provider": "openai", "kind": "rate_limit", "retry_after_s": 7})
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert caught.value.response.headers["retry-after"] == "7" and caught.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    "pid,status,body_key",
    [("openrouter", 401, "error"), ("ai21", 401, "detail"), ("mistral", 422, "message"), ("groq", 401, "error")],
)
def test_each_provider_answers_in_its_own_error_shape(pid, status, body_key, fresh_sim, catalog):
    url = f"{fresh_sim.url}/{pid}{catalog.providers[pid].base_path}/chat/completions"
    headers = {} if status == 401 else {"Authorization": "Bearer k"}
    body = {"model": MODELS[pid], "messages": PROMPT, "stream_options": {"include_usage": True}}
    response = httpx.post(url, json=body, headers=headers, verify=tls_context())
    assert response.status_code == status and body_key in response.json()
    if pid == "openrouter":
        assert response.json()["error"]["code"] == 401


def family_call(pid: str, key: str) -> tuple[str, dict, dict]:
    """A chat call to one provider of each wire family: path, body, and its key where that API takes it."""
    if pid == "anthropic":
        body = {"model": "claude-haiku-4-5-20251001", "max_tokens": 10, "messages": PROMPT}
        return "/anthropic/v1/messages", body, {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if pid == "google":
        body = {"contents": [{"parts": [{"text": "Hi"}]}]}
        return "/google/v1beta/models/gemini-2.5-flash:generateContent", body, {"x-goog-api-key": key}
    if pid == "cohere":
        return "/cohere/v2/chat", {"model": "command-a-03-2025", "messages": PROMPT}, {"Authorization": f"Bearer {key}"}
    return "/openai/v1/chat/completions", {"model": MODELS["openai"], "messages": PROMPT}, {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("key", ["invalid-key", "sk-invalid-key", "sim-key"])
def test_every_family_refuses_the_same_keys_in_its_own_status(key, fresh_sim):
    statuses = {}
    for pid in ("openai", "anthropic", "google", "cohere"):
        path, body, headers = family_call(pid, key)
        statuses[pid] = httpx.post(fresh_sim.url + path, json=body, headers=headers, verify=tls_context()).status_code
    if key == "sim-key":
        assert statuses == {"openai": 200, "anthropic": 200, "google": 200, "cohere": 200}
    else:  # Google says API_KEY_INVALID with a 400; the others a 401
        assert statuses == {"openai": 401, "anthropic": 401, "google": 400, "cohere": 401}


def test_bad_bodies_are_400s(fresh_sim):
    url = f"{fresh_sim.url}/openai/v1/chat/completions"
    auth = {"Authorization": "Bearer k"}
    with httpx.Client(verify=tls_context(), headers=auth) as client:
        assert client.post(url, content=b"{not json").status_code == 400
        assert client.post(url, json={"model": "gpt-4o-mini"}).json()["error"]["param"] == "messages"
        assert client.post(url, json={"messages": PROMPT}).json()["error"]["param"] == "model"
        bad_role = {"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]}
        assert client.post(url, json=bad_role).status_code == 400


# --- raw wire quirks --------------------------------------------------------------------------------


def raw_stream(fresh_sim, catalog, pid: str, **extra) -> str:
    url = f"{fresh_sim.url}/{pid}{catalog.providers[pid].base_path}/chat/completions"
    body = {"model": MODELS[pid], "messages": PROMPT, "stream": True, **extra}
    response = httpx.post(url, json=body, headers={"Authorization": "Bearer k"}, verify=tls_context())
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return response.text


def test_stream_quirks_on_the_wire(fresh_sim, catalog):
    assert raw_stream(fresh_sim, catalog, "deepseek").startswith(": keep-alive\n\n")
    assert raw_stream(fresh_sim, catalog, "openrouter").startswith(": OPENROUTER PROCESSING\n\n")
    together = [json.loads(line[6:]) for line in raw_stream(fresh_sim, catalog, "together").splitlines()
                if line.startswith("data: {")]
    assert "token_id" in together[1]["choices"][0]["delta"] and together[-1]["usage"]["completion_tokens"] > 0
    assert together[-1]["choices"][0]["finish_reason"] == "stop"
    mistral = raw_stream(fresh_sim, catalog, "mistral").splitlines()
    assert '"usage"' in [line for line in mistral if line.startswith("data: {")][-1]
    for pid in MODELS:
        assert raw_stream(fresh_sim, catalog, pid).rstrip().endswith("data: [DONE]")


# --- the control API --------------------------------------------------------------------------------


def test_faults_add_list_and_clear(control):
    assert control.post("/_sim/faults", json={"provider": "openai", "kind": "error", "status": 503}).status_code == 201
    assert control.post("/_sim/faults", json={"provider": "groq", "kind": "timeout"}).status_code == 201
    listed = control.get("/_sim/faults").json()
    expected = [("openai", "error", 503), ("groq", "timeout", None)]
    assert [(f["provider"], f["kind"], f["status"]) for f in listed] == expected
    assert control.delete("/_sim/faults", params={"provider": "groq"}).json()["faults"] == 1
    assert [f["provider"] for f in control.get("/_sim/faults").json()] == ["openai"]
    assert control.delete("/_sim/faults").json()["faults"] == 0
    assert control.get("/_sim/faults").json() == []


@pytest.mark.parametrize(
    "body,expect",
    [
        (b'{"provider": "openai", "kind": "explode"}', "kind"),
        (b'{"provider": "nobody", "kind": "error"}', "unknown provider"),
        (b'{"provider": "openai", "kind": "error", "probability": 2}', "probability"),
        (b'{"provider": "openai", "kind": "rate_limit", "status": 503}', "status only applies"),
        (b'{"provider": "openai", "kind": "error", "status": 404}', "5xx"),
        (b'{"provider": "openai", "model": "gpt-9", "kind": "error"}', "no model"),
        (b'{"provider": "openai", "kind": "error", "surprise": 1}', "surprise"),
        (b"{nope", "json"),
    ],
)
def test_bad_fault_bodies_are_json_400s(body, expect, control):
    response = control.post("/_sim/faults", content=body)
    assert response.status_code == 400
    assert expect in response.json()["error"].lower()
    assert control.get("/_sim/faults").json() == []


def test_clearing_an_unknown_provider_is_a_400(control):
    response = control.delete("/_sim/faults", params={"provider": "nobody"})
    assert response.status_code == 400 and "nobody" in response.json()["error"]


def test_fault_count_and_probability(client_for, control):
    client = client_for("openai")
    control.post("/_sim/faults", json={"provider": "openai", "kind": "error", "status": 502, "count": 2})
    control.post("/_sim/faults", json={"provider": "openai", "kind": "error", "probability": 0})
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT).choices[0].message.content
    assert [f["probability"] for f in control.get("/_sim/faults").json()] == [0]  # the counted one retired


def test_stats_count_calls_and_streams(client_for, control):
    openai_client, groq = client_for("openai"), client_for("groq")
    openai_client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    openai_client.chat.completions.create(model="gpt-4o", messages=PROMPT)
    list(groq.chat.completions.create(model=MODELS["groq"], messages=PROMPT, stream=True))
    openai_client.embeddings.create(model="text-embedding-3-small", input="x")
    stats = control.get("/_sim/stats").json()
    assert stats["calls"] == 4
    assert stats["providers"]["openai"] == {
        "calls": 3, "models": {"gpt-4o-mini": 1, "gpt-4o": 1, "text-embedding-3-small": 1}
    }
    assert stats["providers"]["groq"]["models"] == {MODELS["groq"]: 1}
    assert stats["streams"] == {"opened": 1, "completed": 1, "cancelled": 0, "broken": 0, "open_now": 0}
    assert control.delete("/_sim/stats").status_code == 200
    assert control.get("/_sim/stats").json()["calls"] == 0


# --- `p402 sim` as a process ----------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_p402_sim_serves_until_signalled(stop):
    proc = subprocess.Popen(
        [sys.executable, "-m", "p402_tui.cli", "sim", "--port", "0", "--seed", "3", "--no-latency"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("p402 sim: 13 providers at http://127.0.0.1:"), banner + proc.stderr.read()
        url = banner.split(" at ")[1].split()[0]
        hint = proc.stdout.readline() + proc.stdout.readline()
        assert f"{url}/openai/v1" in hint
        block = []  # the config it suggests, up to the faults line: TOML as printed
        while not (line := proc.stdout.readline()).lstrip().startswith("faults:") and line:
            block.append(line)
        config = tomllib.loads(textwrap.dedent("".join(block)))
        assert config["providers"]["openai"] == {"base_url": f"{url}/openai/v1", "api_key": "any"}
        assert httpx.get(f"{url}/_sim/stats", verify=tls_context()).json()["calls"] == 0
        proc.send_signal(stop)
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_p402_sim_refuses_a_busy_port(sim_process):
    port = sim_process["url"].rsplit(":", 1)[1]
    run = subprocess.run(
        [sys.executable, "-m", "p402_tui.cli", "sim", "--port", port], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 1 and run.stderr.startswith("p402: error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in run.stderr
