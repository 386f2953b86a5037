"""The gateway says which embedder the answer cache uses, and how the cache is doing.

A real server on loopback with the real simulator behind it, as in test_gateway.py;
the hashed embedder keeps the cache on without loading a model.
"""

from __future__ import annotations

import httpx
import pytest
from test_gateway import HELLO, PINNED, eventually, settings_for

from p402_tui.core.config import CacheConfig, ConfigFile, Settings
from p402_tui.runtime import Runtime
from p402_tui.store.queries import create_key


@pytest.fixture
async def runtime(sim, catalog, tmp_path):
    async with Runtime.open(settings_for(catalog, sim.url), db_path=tmp_path / "p402.db") as rt:
        await rt.cache.ready()  # the embedder loads in the background; these tests read it
        yield rt


@pytest.fixture
async def http(runtime):
    running = await runtime.serve_gateway("127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        yield client
    await running.stop()


async def test_cache_names_its_embedder_and_counts_hits_misses_and_savings(http):
    before = (await http.get("/api/v2/cache")).json()
    assert before["enabled"] is True and before["loaded"] is True
    embedder = before["embedder"]
    assert (embedder["name"], embedder["dim"], embedder["label"]) == ("hashed-ngram", 1024, "lexical")
    # a lexical embedder holds the semantic tier to near-exact matches, above the configured 0.84
    assert before["threshold"] == embedder["min_threshold"] > before["configured_threshold"] == 0.84
    assert (before["hits"], before["misses"], before["entries"], before["saved_usd"]) == (0, 0, 0, 0.0)

    body = {"model": PINNED, "messages": HELLO}
    first = (await http.post("/v1/chat/completions", json=body)).json()["p402"]
    assert first["cached"] is False

    async def served_from_cache() -> bool:  # the insert is queued behind the first answer
        return (await http.post("/v1/chat/completions", json=body)).json()["p402"]["cached"]

    assert await eventually(served_from_cache)
    after = (await http.get("/api/v2/cache")).json()
    assert after["hits"] == after["exact_hits"] == 1 and after["entries"] == 1
    assert after["hit_rate"] == pytest.approx(after["hits"] / (after["hits"] + after["misses"]))
    assert after["saved_usd"] == pytest.approx(first["cost_usd"])


async def test_health_says_which_embedder_is_active(http):
    health = (await http.get("/health")).json()
    assert health["status"] == "ok"
    assert health["embedder"]["name"] == "hashed-ngram" and health["embedder"]["label"] == "lexical"


async def test_openapi_describes_every_field_the_cache_answers(http):
    document = (await http.get("/openapi.json")).json()
    assert document["paths"]["/api/v2/cache"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CacheStats"
    }
    schemas = document["components"]["schemas"]
    answer = (await http.get("/api/v2/cache")).json()
    assert set(answer) == set(schemas["CacheStats"]["properties"])
    assert set(answer["embedder"]) == set(schemas["Embedder"]["properties"])
    health = document["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set((await http.get("/health")).json()) == set(health["properties"])


@pytest.mark.parametrize(("enabled", "persist"), [(False, True), (True, False)], ids=["cache-disabled", "no-store"])
async def test_a_gateway_without_a_cache_says_so(sim, catalog, tmp_path, enabled, persist):
    settings = Settings(ConfigFile(cache=CacheConfig(enabled=enabled, embedder="hashed")), catalog, env={})
    async with Runtime.open(settings.point_at(sim.url), db_path=tmp_path / "p402.db", persist=persist) as rt:
        running = await rt.serve_gateway("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
                assert (await client.get("/api/v2/cache")).json() == {"enabled": False}
                assert (await client.get("/health")).json()["embedder"] is None
        finally:
            await running.stop()


async def test_one_keys_answers_reach_another_only_through_a_namespace_both_name(runtime, http):
    (_, alice), (_, bob) = await create_key(runtime.store, "alice"), await create_key(runtime.store, "bob")

    async def ask(secret: str, text: str, namespace: str | None = None) -> httpx.Response:
        body: dict = {"model": PINNED, "messages": [{"role": "user", "content": text}]}
        if namespace is not None:
            body["p402"] = {"namespace": namespace}
        return await http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"})

    async def cached(secret: str, text: str, namespace: str | None = None) -> bool:
        return (await ask(secret, text, namespace)).json()["p402"]["cached"]

    # No namespace given: each key's answers are its own.
    assert not await cached(alice, "What does alice's contract say?")
    assert await eventually(lambda: cached(alice, "What does alice's contract say?"))
    assert not await cached(bob, "What does alice's contract say?")
    # Different namespaces given: still apart.
    assert not await cached(alice, "What is in the roadmap?", "alice-team")
    assert await eventually(lambda: cached(alice, "What is in the roadmap?", "alice-team"))
    assert not await cached(bob, "What is in the roadmap?", "bob-team")
    # The same namespace given to both: shared.
    assert not await cached(alice, "What is the office wifi called?", "company")
    assert await eventually(lambda: cached(alice, "What is the office wifi called?", "company"))
    assert await cached(bob, "What is the office wifi called?", "company")  # bob's first time
    # A key cannot name another key's own namespace.
    refused = await ask(bob, "What does alice's contract say?", "key:anything/default")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "p402.namespace" and "own" in refused.json()["error"]["message"]


async def test_a_streamed_tool_call_is_not_cached_as_an_empty_answer(http):
    """A streamed answer's tool calls arrive in deltas; the same request unstreamed must get them from
    the provider again, never an empty answer from the cache."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [tool], "tool_choice": "required", "max_tokens": 64}
    streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    assert '"tool_calls"' in streamed.text
    whole = (await http.post("/v1/chat/completions", json=body)).json()
    assert not whole["p402"]["cached"] and whole["choices"][0]["message"]["tool_calls"]
