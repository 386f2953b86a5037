"""The OpenAI-compatible adapter against the real simulator, for all nine providers of the family.

What every provider does alike (answers, usage, tools, images, each fault, errors, closing a
stream) is tested once for all in test_provider_suite.py; this file holds what this family does its own way.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import ssl
import time
from dataclasses import replace

import httpx
import pytest
from pydantic import SecretStr

from helpers import OPENAI_FAMILY_MODELS as MODELS
from helpers import WEATHER, adapters_on

from p402_tui.core import errors
from p402_tui.core.adapters import make_adapter
from p402_tui.core.catalog import load_catalog
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.core.costs import call_cost
from p402_tui.core.tokens import count_messages
from p402_tui.core.types import ChatRequest
from p402_tui.providers import http
from p402_tui.providers.base import StreamAssembler, tls_context
from p402_tui.providers.openai_compat import OpenAICompatAdapter
from p402_tui.sim.server import start_sim

PROVIDERS = list(MODELS)
KEY = "sk-test-0123456789abcdef"
LOCAL_URL = "http://localhost:11434/v1"  # where an Ollama server would be; the test serves it from the simulator


def ask(text: str = "Say something about routers.", **fields) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **fields)


@pytest.fixture
async def adapters(fresh_sim_settings):
    """Build adapters for the shared simulator (closed after the test); changes apply to the provider settings."""
    async with adapters_on(fresh_sim_settings, api_key=SecretStr(KEY)) as build:
        yield build


async def raw_answer(sim, catalog, adapter: OpenAICompatAdapter, request: ChatRequest, model: str, *, stream: bool):
    """What the simulator sends for the adapter's own request body, read without our parser."""
    spec = catalog.providers[adapter.id]
    body = adapter.payload(request, model, stream=stream)
    url = f"{sim.url}/{adapter.id}{spec.base_path}/chat/completions"
    async with httpx.AsyncClient(verify=tls_context()) as client:
        response = await client.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    if not stream:
        data = response.json()
        return data["choices"][0]["message"].get("content"), data["usage"]
    content, usage = [], None
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices", []):
            content.append(choice["delta"].get("content") or "")
        usage = event.get("usage") or (event.get("x_groq") or {}).get("usage") or usage
    return "".join(content), usage


def priced(spec, usage: dict) -> float:
    """The catalog's price math, written out: fresh input, cached input, output."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    cached_rate = spec.cached_input_per_1m if spec.cached_input_per_1m is not None else spec.input_per_1m
    fresh = usage["prompt_tokens"] - cached
    return (fresh * spec.input_per_1m + cached * cached_rate + usage["completion_tokens"] * spec.output_per_1m) / 1e6


async def collect(adapter, request, model=None) -> tuple[list, object]:
    chunks = [chunk async for chunk in adapter.stream(request, model=model)]
    assembler = StreamAssembler(adapter.id, model or "")
    for chunk in chunks:
        assembler.add(chunk)
    return chunks, assembler.response()


# --- answers, usage and cost -------------------------------------------------------


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_complete_reports_the_usage_the_simulator_sent(pid, fresh_sim, catalog, adapters):
    adapter = adapters(pid)
    request = ask(max_tokens=200)
    response = await adapter.complete(request, model=MODELS[pid])
    content, usage = await raw_answer(fresh_sim, catalog, adapter, request, MODELS[pid], stream=False)
    assert response.content == content and content
    assert response.usage.prompt_tokens == usage["prompt_tokens"] > 0
    assert response.usage.completion_tokens == usage["completion_tokens"] > 0
    spec = catalog.models[f"{pid}/{MODELS[pid]}"]
    assert math.isclose(call_cost(spec, response.usage), priced(spec, usage), rel_tol=1e-12)


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_stream_reports_the_usage_the_simulator_sent(pid, fresh_sim, catalog, adapters):
    adapter = adapters(pid)
    request = ask(max_tokens=200)
    chunks, response = await collect(adapter, request, MODELS[pid])
    content, usage = await raw_answer(fresh_sim, catalog, adapter, request, MODELS[pid], stream=True)
    assert response.content == content and content
    assert [c.usage for c in chunks if c.usage is not None] == [response.usage]  # usage exactly once
    assert response.usage.prompt_tokens == usage["prompt_tokens"]
    assert response.usage.completion_tokens == usage["completion_tokens"]
    assert chunks[0].role == "assistant"


async def test_a_stream_comes_in_the_batches_it_was_read_in(adapters):
    """The latency-free simulator flushes an answer in one write: its chunks come as one list, not one by one."""
    adapter = adapters("openai")
    request = ask(max_tokens=40)
    batches = [batch async for batch in adapter.stream_batches(request, model=MODELS["openai"])]
    chunks, _ = await collect(adapter, request, MODELS["openai"])
    assert all(batches) and max(len(batch) for batch in batches) > 5
    flat = [chunk for batch in batches for chunk in batch]
    assert [(c.role, c.content, c.finish_reason, c.usage) for c in flat] == [
        (c.role, c.content, c.finish_reason, c.usage) for c in chunks
    ]


async def test_an_error_event_read_with_content_lets_the_content_through_first(adapters, fault):
    """Content that arrived in the same read as an error event still reaches the caller before the error."""
    await fault(provider="openai", kind="error", status=502, after_tokens=3)
    seen: list[str] = []
    with pytest.raises(errors.StreamInterruptedError):
        async for batch in adapters("openai").stream_batches(ask(), model=MODELS["openai"]):
            seen += [chunk.content for chunk in batch]
    assert len(seen) == 3


async def test_model_prefix_in_the_request_is_ours_not_the_providers(adapters):
    adapter = adapters("openrouter")
    response = await adapter.complete(ask(model="openrouter/anthropic/claude-sonnet-4.5", max_tokens=20))
    assert response.model == "anthropic/claude-sonnet-4.5"


async def test_image_parts_reach_the_provider(adapters):
    adapter = adapters("openai")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            ],
        }
    ]
    response = await adapter.complete(ChatRequest(messages=messages), model="gpt-4o")
    # The simulator counts a low-detail image as 85 prompt tokens, so the part arrived intact.
    assert response.usage.prompt_tokens == count_messages(messages, "openai/gpt-4o").tokens
    text_only = await adapter.complete(ask("What is this?"), model="gpt-4o")
    assert response.usage.prompt_tokens - text_only.usage.prompt_tokens == 85


async def test_cached_prompt_tokens_are_reported_and_priced_at_the_cached_rate(adapters, catalog):
    adapter = adapters("openai")
    spec = catalog.models["openai/gpt-4o-mini"]
    request = ask("Context. " * 700, max_tokens=30)
    first = await adapter.complete(request, model="gpt-4o-mini")
    second = await adapter.complete(request, model="gpt-4o-mini")
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == second.usage.prompt_tokens // 128 * 128 > 1024
    expected = (
        (second.usage.prompt_tokens - second.usage.cached_tokens) * spec.input_per_1m
        + second.usage.cached_tokens * spec.cached_input_per_1m
        + second.usage.completion_tokens * spec.output_per_1m
    ) / 1e6
    assert math.isclose(call_cost(spec, second.usage), expected, rel_tol=1e-12)
    assert call_cost(spec, second.usage) < call_cost(spec, first.usage)


async def test_deepseek_prompt_cache_hits_count_as_cached(adapters):
    adapter = adapters("deepseek")
    request = ask("Context. " * 100, max_tokens=30)
    await adapter.complete(request, model="deepseek-chat")
    _, streamed = await collect(adapter, request, "deepseek-chat")
    assert streamed.usage.cached_tokens == streamed.usage.prompt_tokens // 64 * 64 > 0


# --- provider quirks ------------------------------------------------------------------


async def test_deepseek_reasoning_content_both_ways(adapters):
    adapter = adapters("deepseek")
    request = ask("Think first.", max_tokens=300)
    plain = await adapter.complete(request, model="deepseek-reasoner")
    chunks, streamed = await collect(adapter, request, "deepseek-reasoner")
    assert plain.reasoning and plain.content
    assert streamed.reasoning == plain.reasoning and streamed.content == plain.content
    assert plain.usage.reasoning_tokens > 0 and streamed.usage == plain.usage
    first_content = next(i for i, c in enumerate(chunks) if c.content)
    assert all(c.reasoning for c in chunks[:first_content])  # thinking streams before the answer


async def test_perplexity_citations_and_search_results_are_kept(adapters):
    adapter = adapters("perplexity")
    plain = await adapter.complete(ask(), model="sonar")
    _, streamed = await collect(adapter, ask(), "sonar")
    assert plain.extra["citations"] and plain.extra["search_results"][0]["url"] == plain.extra["citations"][0]
    assert streamed.extra == plain.extra
    assert plain.to_openai()["citations"] == plain.extra["citations"]


async def test_perplexity_tools_are_dropped_not_refused(adapters):
    adapter = adapters("perplexity")
    response = await adapter.complete(ask(tools=[WEATHER], tool_choice="auto"), model="sonar")
    assert response.content and not response.tool_calls


async def test_openrouter_attribution_headers(fresh_sim_settings, monkeypatch):
    monkeypatch.setenv("OPENROUTER_REFERER", "https://p402.example")
    adapter = make_adapter(fresh_sim_settings.providers["openrouter"])
    try:
        assert adapter.headers["HTTP-Referer"] == "https://p402.example"
        assert adapter.headers["X-Title"] == "P402 Console"
        assert (await adapter.complete(ask(max_tokens=10), model="openai/gpt-4o")).content
    finally:
        await adapter.aclose()


async def test_reasoning_models_get_max_completion_tokens(adapters, catalog):
    """The catalog's rule for o3 (data, applied by the orchestrator before any adapter) renames the limit."""
    from p402_tui.core.params import apply_rules

    adapter = adapters("openai")
    o3 = catalog.models["openai/o3"]
    shaped, dropped = apply_rules(ask(max_tokens=64), o3.drops, o3.renames, o3.requires)
    body = adapter.payload(shaped, "o3", stream=False)
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body and dropped == []
    # The simulator refuses max_tokens for o3 as OpenAI does, so this only works because of the rule.
    response = await adapter.complete(shaped, model="o3")
    assert response.usage.completion_tokens <= 64 and response.usage.reasoning_tokens > 0
    assert adapter.payload(ask(max_tokens=64), "gpt-4o", stream=False)["max_tokens"] == 64


async def test_request_fields_and_extras_pass_through(adapters):
    adapter = adapters("openai")
    request = ChatRequest(
        messages=[{"role": "user", "content": "hi"}], temperature=0.2, seed=7, stop=["END"], user="u-1"
    )
    body = adapter.payload(request, "gpt-4o-mini", stream=True)
    assert body["temperature"] == 0.2 and body["seed"] == 7 and body["stop"] == ["END"] and body["user"] == "u-1"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "top_p" not in body and "tools" not in body  # unset fields are not sent


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_the_developer_role_is_system_beyond_openai(adapters, pid):
    adapter = adapters(pid)
    request = ChatRequest(messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    model = MODELS[pid]
    roles = [m["role"] for m in adapter.payload(request, model, stream=False)["messages"]]
    assert roles == (["developer", "user"] if pid == "openai" else ["system", "user"])
    assert (await adapter.complete(request, model=model)).content


async def test_mistral_dialect(adapters):
    adapter = adapters("mistral")
    body = adapter.payload(
        ask(seed=3, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        "mistral-small-latest",
        stream=True,
    )
    assert body["random_seed"] == 3 and "seed" not in body
    assert body["tool_choice"] == "any" and "stream_options" not in body
    response = await adapter.complete(
        ask(tools=[WEATHER], tool_choice="required"), model="mistral-small-latest"
    )
    assert response.tool_calls[0]["function"]["name"] == "get_weather"


# --- tools -----------------------------------------------------------------------------


async def test_tool_choice_none_gets_text(adapters):
    adapter = adapters("openai")
    response = await adapter.complete(ask(tools=[WEATHER], tool_choice="none"), model="gpt-4o-mini")
    assert response.content and not response.tool_calls


# --- models, embeddings, health ----------------------------------------------------------


@pytest.mark.parametrize(
    "pid,model,width",
    [
        ("openai", "text-embedding-3-small", 1536),
        ("mistral", "mistral-embed", 1024),
        ("together", "BAAI/bge-base-en-v1.5", 768),
        ("fireworks", "nomic-ai/nomic-embed-text-v1.5", 768),
        ("perplexity", "pplx-embed-v1-0.6b", 1024),
    ],
)
async def test_embeddings(pid, model, width, adapters):
    adapter = adapters(pid)
    result = await adapter.embed(["a cat", "a dog", "a cat"], model=model)
    assert [len(v) for v in result.vectors] == [width] * 3
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in result.vectors)
    assert result.vectors[0] == result.vectors[2] != result.vectors[1]
    assert result.prompt_tokens > 0


async def test_no_embeddings_where_the_provider_has_none(adapters):
    with pytest.raises(NotImplementedError):
        await adapters("groq").embed(["x"], model="llama-3.3-70b-versatile")


async def test_keyless_extra_provider(catalog):
    """A configured OpenAI-compatible local server (Ollama, vLLM) needs no key."""
    settings = Settings(
        ConfigFile.model_validate(
            {"providers": {"local": {"wire": "openai", "base_url": LOCAL_URL, "models": ["llama3.2"]}}}
        ),
        catalog,
        env={},
    )
    running = await start_sim(settings.catalog, latency=False)
    try:
        local = replace(settings.providers["local"], base_url=f"{running.url}/local/v1")
        assert local.usable and local.api_key is None
        adapter = make_adapter(local)
        try:
            assert "authorization" not in adapter.headers
            response = await adapter.complete(ask(model="local/llama3.2", max_tokens=30))
            assert response.content and response.usage.completion_tokens > 0
        finally:
            await adapter.aclose()
    finally:
        await running.stop()


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("pid", PROVIDERS)
async def test_context_length_exceeded(pid, adapters, catalog):
    spec = min(
        (m for m in catalog.models_of(pid) if "chat" in m.capabilities and not m.model.startswith(("o1", "o3", "o4"))),
        key=lambda m: m.context_window,
    )
    adapter = adapters(pid)
    with pytest.raises(errors.ContextLengthError) as caught:
        await adapter.complete(ask(max_tokens=spec.context_window), model=spec.model)
    assert caught.value.scope == "model" and caught.value.retryable


async def test_bad_request_is_not_retryable(adapters, catalog):
    adapter = adapters("openai")
    too_long = catalog.models["openai/gpt-4o-mini"].max_output_tokens + 1
    with pytest.raises(errors.BadRequestError) as caught:
        await adapter.complete(ask(max_tokens=too_long), model="gpt-4o-mini")
    assert type(caught.value) is errors.BadRequestError and not caught.value.retryable
    assert "max_tokens is too large" in caught.value.message


async def test_a_stream_that_stalls_mid_answer_times_out(adapters, fault):
    await fault(provider="openai", kind="timeout", after_tokens=3)
    adapter = adapters("openai", timeout_s=0.3, first_token_timeout_s=5)
    seen = []
    with pytest.raises(errors.TimeoutError) as caught:
        async for chunk in adapter.stream(ask(), model="gpt-4o-mini"):
            seen.append(chunk.content)
    assert caught.value.phase == "read" and len(seen) == 3


async def test_a_slow_stream_that_keeps_sending_outlives_the_idle_timeout(catalog):
    """The idle timeout is between bytes, not for the whole answer: 1.2 s of tokens pass a 0.6 s limit."""
    running = await start_sim(catalog, latency=True)
    provider = Settings(ConfigFile(), catalog, env={}).point_at(running.url).providers["openai"]
    adapter = make_adapter(replace(provider, timeout_s=0.6, first_token_timeout_s=5))
    try:
        started = time.perf_counter()
        chunks = [c async for c in adapter.stream(ask("Tell me about routers in detail.", max_tokens=60), model="gpt-4o-mini")]
        assert time.perf_counter() - started > 0.9 and chunks[-1].usage is not None
    finally:
        await adapter.aclose()
        await running.stop()


async def test_an_error_answer_whose_body_stalls_times_out(adapters):
    """A 500 whose body never ends is cut by the idle timeout, as a stalled stream is."""

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(30)

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    adapter = adapters("openai", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=0.3, first_token_timeout_s=5)
    try:
        started = time.perf_counter()
        with pytest.raises(errors.TimeoutError) as caught:
            async for _ in adapter.stream(ask(), model="gpt-4o-mini"):
                pass
        assert caught.value.phase == "read" and time.perf_counter() - started < 1.0
    finally:
        server.close()


async def test_a_fault_for_one_model_spares_the_others(adapters, fault):
    await fault(provider="openai", model="gpt-4o", kind="error", status=503)
    adapter = adapters("openai")
    assert (await adapter.complete(ask(max_tokens=10), model="gpt-4o-mini")).content
    with pytest.raises(errors.ServerError):
        await adapter.complete(ask(max_tokens=10), model="gpt-4o")


async def test_connection_refused_is_connection_lost(fresh_sim_settings):
    adapter = make_adapter(replace(fresh_sim_settings.providers["openai"], base_url="http://127.0.0.1:9/v1"))
    try:
        with pytest.raises(errors.ConnectionLostError):
            await adapter.complete(ask(), model="gpt-4o-mini")
    finally:
        await adapter.aclose()


async def test_a_connect_that_never_completes_is_a_connect_timeout(fresh_sim_settings):
    """A listener whose accept queue is full drops new handshakes, so connecting hangs until the deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]  # one fills a backlog of 0; the others wait in SYN_SENT
        for sock in queued:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        provider = replace(
            fresh_sim_settings.providers["openai"],
            base_url=f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.2, timeout_s=10,
        )
        adapter = make_adapter(provider)
        started = time.perf_counter()
        try:
            with pytest.raises(errors.TimeoutError) as caught:
                await adapter.complete(ask(), model="gpt-4o-mini")
        finally:
            await adapter.aclose()
            for sock in queued:
                sock.close()
    assert caught.value.phase == "connect" and caught.value.retryable
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    "error,started,kind,phase",
    [
        (http.ConnectTimeout("no connection to api.openai.com:443 in time"), False, errors.TimeoutError, "connect"),
        (http.ReadTimeout("nothing arrived for 60s"), False, errors.TimeoutError, "read"),
        (http.ReadTimeout("nothing arrived for 60s"), True, errors.TimeoutError, "read"),
        (socket.gaierror(-2, "Name or service not known"), False, errors.DnsError, "connect"),
        (ConnectionRefusedError(111, "Connect call failed"), False, errors.ConnectionRefusedError, "connect"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False, errors.TlsError, "connect"),
        (http.ProxyRefused("the proxy at http://p:3128 refused the tunnel: 407", proxy="http://p:3128", status=407),
         False, errors.ProxyError, "connect"),
        (ConnectionResetError(104, "Connection reset by peer"), False, errors.ConnectionLostError, "read"),
        (http.ConnectionClosed("closed before the response ended"), False, errors.ConnectionLostError, "read"),
        (ConnectionResetError(104, "Connection reset by peer"), True, errors.StreamInterruptedError, None),
        (http.ConnectionClosed("closed before the response ended"), True, errors.StreamInterruptedError, None),
        (http.ProtocolError("unreadable HTTP response"), True, errors.StreamInterruptedError, None),
    ],
)
def test_connection_failures_map_to_our_errors(error, started, kind, phase, fresh_sim_settings):
    adapter = OpenAICompatAdapter(replace(fresh_sim_settings.providers["openai"], api_key=SecretStr(KEY)))
    mapped = adapter.transport_error(error, "gpt-4o-mini", started=started)
    assert type(mapped) is kind and mapped.provider == "openai" and mapped.model == "gpt-4o-mini"
    assert getattr(mapped, "phase", None) == phase
    leaky = adapter.transport_error(OSError(f"proxy said: bad key {KEY}"), "gpt-4o-mini", started=started)
    assert KEY not in leaky.message and "***" in leaky.message


async def test_aclose_closes_the_pool(fresh_sim_settings):
    adapter = make_adapter(fresh_sim_settings.providers["openai"])
    assert (await adapter.complete(ask(max_tokens=5), model="gpt-4o-mini")).content
    assert (await adapter.complete(ask(max_tokens=5), model="gpt-4o-mini")).content
    assert len(adapter.transport._open) == 1  # the second call reused the first one's connection
    await adapter.aclose()
    assert adapter.transport.closed and not adapter.transport._open
    with pytest.raises(errors.ConnectionLostError, match="client was closed"):
        await adapter.complete(ask(max_tokens=5), model="gpt-4o-mini")


@pytest.mark.parametrize(
    "body,shape",
    [
        (b'{"error":{"message":"m1","type":"invalid_request_error","code":"context_length_exceeded"}}', "openai"),
        (b'{"error":{"code":402,"message":"m2","metadata":{}}}', "openrouter"),
        (b'{"detail":"m3"}', "fastapi"),
        (b'{"detail":[{"msg":"m4","loc":["body"]}]}', "fastapi list"),
        (b'{"object":"error","message":"m5","type":"rate_limited","code":"1300"}', "mistral"),
        (b"<html>bad gateway</html>", "not json"),
    ],
)
def test_error_bodies_of_every_shape(body, shape, fresh_sim_settings):
    adapter = OpenAICompatAdapter(fresh_sim_settings.providers["openai"])
    error = adapter.error_from_response(400, body, http.Headers(), "m")
    assert error.message in {"m1", "m2", "m3", "m4", "m5", "<html>bad gateway</html>"}, shape
    assert isinstance(error, errors.ContextLengthError) == (shape == "openai")


def test_retry_wait_from_the_message_when_no_header(fresh_sim_settings):
    adapter = OpenAICompatAdapter(fresh_sim_settings.providers["openai"])
    body = b'{"error":{"message":"Rate limit reached. Please try again in 26.604s.","code":"rate_limit_exceeded"}}'
    error = adapter.error_from_response(429, body, {}, "gpt-4o")
    assert isinstance(error, errors.RateLimitError) and error.retry_after_s == 26.604


async def test_keys_never_show(fresh_sim_settings):
    secret = "sk-invalid-THE-SECRET-KEY-42"
    adapter = make_adapter(replace(fresh_sim_settings.providers["openai"], api_key=SecretStr(secret)))
    try:
        # The simulator echoes a rejected key the way OpenAI's 401 does; we must not pass it on.
        with pytest.raises(errors.AuthenticationError) as caught:
            await adapter.complete(ask(), model="gpt-4o-mini")
        texts = [str(caught.value), repr(caught.value), caught.value.message, json.dumps(caught.value.to_dict())]
        texts += [repr(adapter), repr(adapter.provider), repr(adapter.headers), str(caught.value.body)]
        assert caught.value.message.startswith("Incorrect API key provided: ***")
        assert not any(secret in text for text in texts)
    finally:
        await adapter.aclose()


async def test_openrouter_failure_inside_a_200_answer(adapters, fault):
    await fault(provider="openrouter", kind="error", status=503, after_tokens=1)
    with pytest.raises(errors.ServerError) as caught:
        await adapters("openrouter").complete(ask(), model=MODELS["openrouter"])
    assert caught.value.status == 503


def test_wire_json_takes_what_orjson_refuses():
    from p402_tui.core.types import json_bytes, json_value

    assert json_bytes({"text": "caf\u00e9", "n": 1}) == '{"text":"café","n":1}'.encode()
    assert json_bytes({"text": "half \ud83d pair"}) == b'{"text":"half \\ud83d pair"}'  # a lone surrogate: json's escape
    assert json_value('{"text":"half \\ud83d pair"}') == {"text": "half \ud83d pair"}
    with pytest.raises(ValueError):
        json_value(b"{not json")


def test_each_kind_of_delta_is_read_whatever_else_it_carries():
    """Providers send a delta's fields alone or together: text, reasoning, tool calls, a finish, usage."""
    from p402_tui.providers.openai_compat import _EventReader

    settings = Settings(ConfigFile(), load_catalog(), env={}).point_at("http://127.0.0.1:9")
    reader = _EventReader(make_adapter(settings.providers["deepseek"]), "deepseek-reasoner")
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"reasoning_content": "Think."}}]},  # alone: OpenAI-style providers omit content
        {"choices": [{"delta": {"reasoning": " More."}}]},  # OpenRouter's name
        {"choices": [{"delta": {"content": "Answer"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
    ]
    data = [(None, json.dumps(e)) for e in events] + [(None, "[DONE]")]
    chunks, at = [], 0
    while at < len(data) and not reader.done:
        batch, error, at = reader.read(data, at)
        assert error is None
        chunks += batch
    assert [(c.reasoning, c.content) for c in chunks[:3]] == [("Think.", ""), (" More.", ""), ("", "Answer")]
    assert chunks[0].role == "assistant"
    assert chunks[3].tool_calls[0].name == "f" and chunks[4].finish_reason == "stop"
    assert reader.usage.completion_tokens == 5 and reader.done
