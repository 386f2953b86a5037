"""`POST /v1/embeddings` through the official OpenAI SDK, on a real gateway with the real simulator behind it."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from p402_tui.core.tokens import encoding_for
from p402_tui.sim.engine import Fault
from test_gateway import assert_openai_error, gateway, http, runtime, sdk  # noqa: F401 - fixtures

# One model of each family that has embeddings, as catalog ids.
FAMILIES = ["openai/text-embedding-3-small", "mistral/mistral-embed", "google/gemini-embedding-001", "cohere/embed-v4.0"]


@pytest.mark.parametrize("model", FAMILIES)
async def test_each_family_embeds_float_and_base64_and_the_second_call_is_cached(sdk, sim, model):
    texts = ["the router picks a model", "bananas are yellow"]
    first = await sdk.embeddings.create(model=model, input=texts, encoding_format="float")
    assert first.object == "list" and [d.index for d in first.data] == [0, 1]
    assert first.model == model.split("/", 1)[1]
    vectors = [np.array(d.embedding) for d in first.data]
    assert len(vectors[0]) > 100 and abs(np.linalg.norm(vectors[0]) - 1) < 1e-3
    assert not np.allclose(vectors[0], vectors[1])
    assert first.usage.prompt_tokens > 0 and first.usage.total_tokens == first.usage.prompt_tokens
    meta = first.model_extra["p402"]
    assert meta["provider"] == model.split("/")[0] and not meta["cached"] and meta["cost_usd"] > 0
    provider, wire = model.split("/", 1)
    calls = sim.state.calls[provider][wire]

    # Left to itself the SDK asks for base64 and decodes it; asked for base64, it hands over the string.
    decoded = await sdk.embeddings.create(model=model, input=texts)
    assert np.allclose(decoded.data[0].embedding, vectors[0], atol=1e-6)
    again = await sdk.embeddings.create(model=model, input=texts, encoding_format="base64")
    raw = again.data[0].embedding
    assert isinstance(raw, str)
    assert np.allclose(np.frombuffer(base64.b64decode(raw), dtype="<f4"), vectors[0], atol=1e-6)
    meta = again.model_extra["p402"]
    assert meta["cached"] and meta["cost_usd"] == 0 and meta["saved_usd"] > 0
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert sim.state.calls[provider][wire] == calls  # the second call never reached the provider


async def test_the_same_input_never_goes_upstream_twice(http, sim):
    body = {"model": "openai/text-embedding-3-small", "input": ["one", "two"]}
    first = (await http.post("/v1/embeddings", json=body)).json()
    before = sim.state.calls["openai"]["text-embedding-3-small"]
    second = (await http.post("/v1/embeddings", json={**body, "input": ["two", "three"]})).json()
    # "two" came from the cache; only "three" went upstream, and only it was billed.
    assert second["data"][0]["embedding"] == first["data"][1]["embedding"]
    assert sim.state.calls["openai"]["text-embedding-3-small"] == before + 1
    assert not second["p402"]["cached"] and second["p402"]["saved_usd"] > 0
    nocache = await http.post("/v1/embeddings", json=body, headers={"cache-control": "no-cache"})
    assert not nocache.json()["p402"]["cached"]
    assert sim.state.calls["openai"]["text-embedding-3-small"] == before + 2


async def test_base64_on_the_wire_is_little_endian_float32(http):
    body = {"model": "cohere/embed-v4.0", "input": "hello", "encoding_format": "base64"}
    data = (await http.post("/v1/embeddings", json=body, headers={"cache-control": "no-cache"})).json()
    raw = data["data"][0]["embedding"]
    assert isinstance(raw, str)
    floats = (await http.post("/v1/embeddings", json={**body, "encoding_format": "float"})).json()
    assert np.allclose(np.frombuffer(base64.b64decode(raw), dtype="<f4"), floats["data"][0]["embedding"], atol=1e-6)


async def test_auto_routes_to_the_cheapest_embedding_model_unless_told_otherwise(http, runtime):
    catalog = runtime.orchestrator.catalog
    models = [m for m in catalog.models.values() if "embeddings" in m.capabilities]
    cheapest = min(models, key=lambda m: (m.input_per_1m, -m.quality, m.id))
    best = max(models, key=lambda m: (m.quality, -m.input_per_1m))
    data = (await http.post("/v1/embeddings", json={"model": "auto", "input": "x"})).json()
    assert f"{data['p402']['provider']}/{data['p402']['model']}" == cheapest.id
    data = (await http.post("/v1/embeddings", json={"model": "p402/quality", "input": "x"})).json()
    assert data["p402"]["provider"] + "/" + data["p402"]["model"] == best.id or catalog.models[
        data["p402"]["provider"] + "/" + data["p402"]["model"]].quality == best.quality
    data = (await http.post("/v1/embeddings", json={"model": "auto", "input": "x", "p402": {"exclude": [cheapest.provider]}})).json()
    assert data["p402"]["provider"] != cheapest.provider
    # Shorter vectors: only models that can give them are candidates.
    data = (await http.post("/v1/embeddings", json={"model": "auto", "input": "x", "dimensions": 256})).json()
    assert len(data["data"][0]["embedding"]) == 256


async def test_dimensions_on_each_family_that_shortens(http):
    for model in ["openai/text-embedding-3-small", "google/gemini-embedding-001", "cohere/embed-v4.0"]:
        data = (await http.post("/v1/embeddings", json={"model": model, "input": "x", "dimensions": 512})).json()
        assert len(data["data"][0]["embedding"]) == 512, (model, data)


async def test_token_arrays_are_embedded_as_the_text_they_encode(http):
    encoding, _ = encoding_for("text-embedding-3-small")
    if encoding is None:
        pytest.skip("no cl100k tokenizer")
    tokens = encoding.encode("the router picks a model")
    as_text = (await http.post("/v1/embeddings", json={"model": "cohere/embed-v4.0", "input": "the router picks a model"})).json()
    one = (await http.post("/v1/embeddings", json={"model": "cohere/embed-v4.0", "input": tokens})).json()
    many = (await http.post("/v1/embeddings", json={"model": "cohere/embed-v4.0", "input": [tokens, tokens]})).json()
    assert one["data"][0]["embedding"] == as_text["data"][0]["embedding"] and one["p402"]["cached"]
    assert len(many["data"]) == 2


async def test_bad_requests_are_openai_shaped_400s_and_404s(http):
    cases = [
        ({"model": "auto"}, 400, "input"),
        ({"model": "auto", "input": ""}, 400, "input"),
        ({"model": "auto", "input": []}, 400, "input"),
        ({"model": "auto", "input": [""]}, 400, "input[0]"),
        ({"model": "auto", "input": [[]]}, 400, "input[0]"),
        ({"model": "auto", "input": [10**9]}, 400, "input"),
        ({"model": "auto", "input": [[1, 1064470817308]]}, 400, "input[0][1]"),
        ({"model": "auto", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "auto", "input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"model": "auto", "input": ["x"] * 2049}, 400, "input"),
        ({"model": "openai/gpt-4o-mini", "input": "x"}, 400, None),
        ({"model": "openai/text-embedding-ada-002", "input": "x", "dimensions": 64}, 400, None),
        ({"model": "nobody/nothing", "input": "x"}, 404, "model"),
    ]
    for body, status, param in cases:
        response = await http.post("/v1/embeddings", json=body)
        error = assert_openai_error(response, status)
        if param is not None:
            assert error["param"] == param, (body, error)


async def test_the_ledger_spend_and_events_count_embeddings(http, runtime):
    response = await http.post("/v1/embeddings", json={"model": "mistral/mistral-embed", "input": ["a", "b"],
                                                      "p402": {"tag": "rag"}})
    data = response.json()
    await runtime.store.flush()
    row = await runtime.store.fetchone("SELECT * FROM requests WHERE tag = 'rag'")
    assert row["provider"] == "mistral" and row["model"] == "mistral-embed" and row["needs"] == "embeddings"
    assert row["prompt_tokens"] == data["usage"]["prompt_tokens"] and row["cost_usd"] == pytest.approx(data["p402"]["cost_usd"])
    spend = (await http.get("/api/v2/analytics/spend", params={"by": "model", "include_simulated": "true"})).json()
    assert "mistral-embed" in str(spend)


async def test_a_pinned_model_does_not_fail_over_and_auto_does(http, sim):
    sim.state.add_fault(Fault(provider="openai", model="text-embedding-3-small", kind="error", status=503))
    response = await http.post("/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "x"})
    assert response.status_code in (502, 503), response.text
    sim.state.add_fault(Fault(provider="perplexity", kind="error", status=503))
    data = (await http.post("/v1/embeddings", json={"model": "auto", "input": "y"})).json()
    assert data["p402"]["provider"] != "perplexity" and data["p402"]["attempts"][0]["error_kind"] is not None


async def test_openapi_documents_embeddings_and_responses(http):
    document = (await http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    post = document["paths"]["/v1/embeddings"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/EmbeddingsBody")
    assert set(schemas["EmbeddingsBody"]["properties"]) >= {"input", "model", "dimensions", "encoding_format", "p402"}
    assert schemas["EmbeddingsBody"]["properties"]["encoding_format"]["enum"] == ["float", "base64"]
    assert set(document["paths"]["/v1/responses/{response_id}"]) >= {"get", "delete"}
    responses = document["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
    assert set(responses) == {"application/json", "text/event-stream"}
    assert {"previous_response_id", "store", "tools", "text"} <= set(schemas["ResponsesBody"]["properties"])


async def test_max_cost_and_the_deadline_hold_for_embeddings(http, sim):
    pinned = {"model": "openai/text-embedding-3-large", "input": "a few words"}
    response = await http.post("/v1/embeddings", json={**pinned, "p402": {"max_cost_usd": 1e-12}})
    assert_openai_error(response, 400, "no_eligible_model")
    data = (await http.post("/v1/embeddings", json={"model": "auto", "input": "x", "p402": {"max_cost_usd": 1e-3}})).json()
    assert data["p402"]["cost_usd"] <= 1e-3
    sim.state.add_fault(Fault(provider="openai", model="text-embedding-3-large", kind="timeout"))
    response = await http.post("/v1/embeddings", json={**pinned, "p402": {"timeout_s": 0.3}})
    assert_openai_error(response, 504)
