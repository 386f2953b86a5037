"""An open catalog: any model a provider serves, models and deployments from config, aliases, Azure, parameter rules.

Everything runs against the real simulator; the gateway is called with the official `openai` SDK,
Azure's side with its `AzureOpenAI` client. The simulator serves any id holding "heldout" as a model
released after the catalog was checked.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from helpers import adapters_on

from p402_tui.core.catalog import load_catalog
from p402_tui.core.config import ConfigFile, Settings, read_config_file
from p402_tui.core.errors import ConfigError, ContentFilterError, UnknownModelError
from p402_tui.core.hooks import CallContext
from p402_tui.core.orchestrator import Orchestrator
from p402_tui.core.hooks import RouteOptions
from p402_tui.core.router import UNPRICED, Router
from p402_tui.core.types import ChatRequest
from p402_tui.providers.base import tls_context
from p402_tui.runtime import Runtime
from p402_tui.sim.azure import CONTENT_FILTER_TRIGGER

HELLO = [{"role": "user", "content": "Say hello to the open catalog."}]


def ask(**fields) -> ChatRequest:
    return ChatRequest(messages=HELLO, **fields)


def settings_from_toml(tmp_path: Path, text: str, catalog, sim_url: str | None = None) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    settings = Settings(read_config_file(path), catalog, env={})
    return settings.point_at(sim_url) if sim_url else settings


async def sim_calls(sim) -> dict:
    async with httpx.AsyncClient(verify=tls_context()) as client:
        return (await client.get(f"{sim.url}/_sim/stats")).json()["providers"]


async def add_fault(sim, **body) -> None:
    async with httpx.AsyncClient(verify=tls_context()) as client:
        response = await client.post(f"{sim.url}/_sim/faults", json=body)
        assert response.status_code == 201, response.text


# --- 1. any model, pinned ------------------------------------------------------------------


def test_a_provider_prefixed_id_beyond_the_catalog_resolves_unpriced(catalog):
    settings = Settings(ConfigFile(), catalog, env={})
    spec = settings.catalog.resolve("openrouter/some-vendor/brand-new-model")
    assert (spec.provider, spec.model, spec.priced, spec.source) == ("openrouter", "some-vendor/brand-new-model", False, "pinned")
    assert spec.to_dict()["input_per_1m"] is None and spec.to_dict()["priced"] is False
    # A dated snapshot gets its family's parameter rules.
    assert settings.catalog.resolve("openai/o3-2031-01-01").renames == {"max_tokens": "max_completion_tokens"}
    with pytest.raises(UnknownModelError):  # no provider prefix: still unknown
        settings.catalog.resolve("brand-new-model")
    with pytest.raises(UnknownModelError):
        settings.catalog.resolve("nosuchprovider/model")
    assert "openrouter/some-vendor/brand-new-model" not in catalog.models  # the shipped catalog is untouched


def test_the_router_never_picks_an_unpriced_model_unasked(tmp_path, catalog):
    settings = settings_from_toml(tmp_path, '[providers.groq]\napi_key = "k"\nmodels = ["llama-heldout-2"]\n', catalog)
    assert settings.catalog.models["groq/llama-heldout-2"].priced is False
    router = Router.from_settings(settings)
    for mode in ("cost", "quality", "speed", "balanced"):
        decision = router.route(ask(), RouteOptions(mode=mode))
        assert decision.chosen_id != "groq/llama-heldout-2"
        assert "groq/llama-heldout-2" not in decision.fallbacks
    assert {"id": "groq/llama-heldout-2", "reason": UNPRICED} in decision.to_dict()["excluded"]
    assert router.route(ask(), RouteOptions(model="groq/llama-heldout-2")).chosen_id == "groq/llama-heldout-2"


async def test_a_pinned_unknown_model_through_the_gateway_is_unpriced_everywhere(sim, catalog, tmp_path):
    db = tmp_path / "p402.db"
    settings = Settings(ConfigFile(), catalog, env={}).point_at(sim.url)
    settings.file.store.durability = "strict"  # each row committed before its answer ends
    async with Runtime.open(settings, db_path=db) as runtime:
        gateway = await runtime.serve_gateway("127.0.0.1", 0)
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        try:
            with pytest.raises(openai.NotFoundError):  # not yet used: not listed
                await client.models.retrieve("openai/gpt-heldout-9")
            answer = await client.chat.completions.create(model="openai/gpt-heldout-9", messages=HELLO)
            p402 = answer.model_extra["p402"]
            assert (p402["provider"], p402["model"], p402["cost_usd"], p402["priced"]) == (
                "openai", "gpt-heldout-9", None, False)
            stream = await client.chat.completions.create(
                model="openai/gpt-heldout-9", messages=HELLO, stream=True, extra_headers={"cache-control": "no-cache"})
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].model_extra["p402"]["priced"] is False and chunks[-1].model_extra["p402"]["cost_usd"] is None
            assert (await client.models.retrieve("openai/gpt-heldout-9")).id == "openai/gpt-heldout-9"
            with pytest.raises(openai.NotFoundError):  # a bare id the catalog does not list stays a 404
                await client.chat.completions.create(model="gpt-heldout-9", messages=HELLO)
            # A priced call beside it, so the spend shows both lines.
            await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
            async with httpx.AsyncClient(base_url=gateway.url) as http:
                spend = (await http.get("/api/v2/analytics/spend", params={
                    "period": "today", "by": "model", "include_simulated": "true"})).json()
        finally:
            await client.close()
            await gateway.stop()
    assert spend["unpriced"]["requests"] == 2 and spend["unpriced"]["completion_tokens"] > 0
    rows = {row["key"]: row for row in spend["breakdown"]}
    assert rows["openai/gpt-heldout-9"]["cost_usd"] is None and rows["openai/gpt-heldout-9"]["unpriced"] == 2
    assert spend["total_usd"] == rows["openai/gpt-4o-mini"]["cost_usd"] > 0
    assert (await sim_calls(sim))["openai"]["models"]["gpt-heldout-9"] == 2  # its exact id reached the provider
    with sqlite3.connect(db) as conn:
        ledger = conn.execute("SELECT model, cost_usd, priced FROM requests ORDER BY ts").fetchall()
    assert ("gpt-heldout-9", None, 0) in ledger and any(m == "gpt-4o-mini" and c > 0 and p == 1 for m, c, p in ledger)


def test_a_pinned_unknown_model_through_the_cli_and_spend(sim_process, tmp_path):
    from conftest import run_cli

    env = {"P402_DB": str(tmp_path / "cli.db")}
    run = run_cli("chat", "--no-cache", "--json", "--model", "groq/llama-heldout-70b", "Hello there",
                  config=sim_process["config"], env=env)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["model"], result["cost_usd"], result["priced"]) == ("groq/llama-heldout-70b", None, False)
    stats = httpx.get(f"{sim_process['url']}/_sim/stats").json()
    assert stats["providers"]["groq"]["models"]["llama-heldout-70b"] >= 1
    spend = run_cli("spend", "--include-simulated", "--by", "model", config=sim_process["config"], env=env)
    assert spend.returncode == 0, spend.stderr
    assert "unpriced: 1 requests to models without a known price" in spend.stdout
    row = next(line for line in spend.stdout.splitlines() if line.startswith("groq/llama-heldout-70b"))
    assert row.split()[1:3] == ["unpriced", "1"]  # its own row: no dollar figure, one request
    as_json = json.loads(run_cli("spend", "--include-simulated", "--json", config=sim_process["config"], env=env).stdout)
    assert as_json["unpriced"]["requests"] == 1 and as_json["total_usd"] == 0


# --- 2. models from config -------------------------------------------------------------------

HELDOUT_PRICED = """
[models."openai/gpt-heldout-10"]
input_per_1m = 0.001
output_per_1m = 0.002
context_window = 200000
tier = "budget"
capabilities = ["chat", "streaming", "function_calling"]

[models."openai/gpt-4o-mini"]
input_per_1m = 9.0
"""


def test_config_models_in_models_and_compare(tmp_path):
    from conftest import run_cli

    config = tmp_path / "config.toml"
    config.write_text(HELDOUT_PRICED, encoding="utf-8")
    rows = {r["id"]: r for r in json.loads(run_cli("models", "--json", config=config).stdout)}
    new, changed = rows["openai/gpt-heldout-10"], rows["openai/gpt-4o-mini"]
    assert (new["source"], new["input_per_1m"], new["output_per_1m"], new["context_window"], new["tier"]) == (
        "config", 0.001, 0.002, 200000, "budget")
    assert new["max_output_tokens"] == 16384 and new["quality"] == 0.5  # documented defaults
    assert (changed["source"], changed["input_per_1m"], changed["output_per_1m"]) == ("config", 9.0, 0.6)
    assert rows["openai/gpt-4o"]["source"] == "catalog"
    compared = {r["id"]: r for r in json.loads(run_cli("compare", "--json", config=config).stdout)}
    assert compared["openai/gpt-heldout-10"]["cost_usd"] == pytest.approx(1000 * 0.001 / 1e6 + 500 * 0.002 / 1e6)
    assert compared["openai/gpt-4o-mini"]["input_per_1m"] == 9.0


async def test_config_priced_models_route_and_bill(sim, catalog, tmp_path):
    settings = settings_from_toml(tmp_path, HELDOUT_PRICED, catalog, sim.url)
    async with Orchestrator(settings) as orchestrator:
        decision = orchestrator.route(ask(), RouteOptions(mode="cost"))
        assert decision.chosen_id == "openai/gpt-heldout-10"  # the cheapest model of all, as the config prices it
        answer = await orchestrator.complete(ask(), RouteOptions(mode="cost"))
        usage = answer.usage
        assert answer.p402.model == "gpt-heldout-10" and answer.p402.priced
        assert answer.p402.cost_usd == pytest.approx(usage.prompt_tokens * 0.001 / 1e6 + usage.completion_tokens * 0.002 / 1e6)
        mini = await orchestrator.complete(ask(), RouteOptions(model="openai/gpt-4o-mini"))
        assert mini.p402.cost_usd == pytest.approx(mini.usage.prompt_tokens * 9.0 / 1e6 + mini.usage.completion_tokens * 0.6 / 1e6)


def test_config_model_mistakes_are_clear(tmp_path, catalog):
    with pytest.raises(ConfigError, match="needs input_per_1m and output_per_1m"):
        settings_from_toml(tmp_path, '[models."openai/gpt-heldout-11"]\ntier = "mid"\n', catalog)
    with pytest.raises(ConfigError, match="known provider"):
        settings_from_toml(tmp_path, '[models."nobody/model"]\ninput_per_1m = 1\noutput_per_1m = 1\n', catalog)
    # models = [...] under a built-in provider: ids served unpriced; a price there is refused, pointing at [models]
    with pytest.raises(ConfigError, match=r'\[models\."groq/x"\]'):
        settings_from_toml(tmp_path, '[providers.groq]\nmodels = [{model = "x", input_per_1m = 1.0}]\n', catalog)
    settings = settings_from_toml(tmp_path, '[providers.groq]\nmodels = ["x", {model = "y", context_window = 8000}]\n', catalog)
    assert settings.catalog.models["groq/x"].source == "config" and not settings.catalog.models["groq/x"].priced
    assert settings.catalog.models["groq/y"].context_window == 8000
    from p402_tui.core.costs import compare

    assert "groq/x" not in {row.id for row in compare(settings.catalog, 1000, 500)}  # no price to compare


# --- 3 and 4. aliases and deployments -----------------------------------------------------------

DEPLOYMENTS = """
[providers.openai-eu]
inherits = "openai"
api_key = "eu-key"

[providers.azure]
api_key = "az-key"
deployments = {"gpt-4o-mini" = "prod-4o-mini"}

[aliases.mini]
models = ["openai/gpt-4o-mini", "openai-eu/gpt-4o-mini"]

[aliases.everywhere]
models = ["openai/gpt-4o-mini", "openai-eu/gpt-4o-mini", "azure/gpt-4o-mini"]
mode = "cost"

[aliases.open]
models = ["groq/llama-3.3-70b-versatile", "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"]
"""


def test_inherited_deployments_are_priced_as_their_parent(tmp_path, catalog):
    settings = settings_from_toml(tmp_path, DEPLOYMENTS, catalog)
    eu, parent = settings.catalog.models["openai-eu/gpt-4o-mini"], catalog.models["openai/gpt-4o-mini"]
    assert (eu.input_per_1m, eu.output_per_1m, eu.provider, eu.model) == (
        parent.input_per_1m, parent.output_per_1m, "openai-eu", "gpt-4o-mini")
    assert settings.providers["openai-eu"].spec.wire == "openai" and settings.providers["openai-eu"].key() == "eu-key"
    assert settings.catalog.models["azure/gpt-4o-mini"].input_per_1m == parent.input_per_1m
    assert settings.catalog.models["openai-eu/o3"].renames == {"max_tokens": "max_completion_tokens"}
    with pytest.raises(ConfigError, match="inherits 'nope'"):
        settings_from_toml(tmp_path, '[providers.x]\ninherits = "nope"\n', catalog)
    with pytest.raises(ConfigError, match=r"\[aliases\.bad\]"):
        settings_from_toml(tmp_path, '[aliases.bad]\nmodels = ["not-a-model"]\n', catalog)


async def test_an_alias_routes_only_among_its_members_and_shares_equal_ones(sim, catalog, tmp_path):
    settings = settings_from_toml(tmp_path, DEPLOYMENTS, catalog, sim.url)
    settings.file.cache.enabled = False
    async with Orchestrator(settings) as orchestrator:
        decision = orchestrator.route(ask(), RouteOptions(model="open"))
        assert {decision.chosen_id, *decision.fallbacks} == {
            "groq/llama-3.3-70b-versatile", "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"}
        served = Counter()
        for _ in range(100):
            answer = await orchestrator.complete(ask(), RouteOptions(model="mini"))
            served[answer.p402.provider] += 1
    assert set(served) == {"openai", "openai-eu"} and max(served.values()) <= 70, served


async def test_an_alias_fails_over_among_its_members_and_inherits_has_its_own_circuit(sim, catalog, tmp_path):
    settings = settings_from_toml(tmp_path, DEPLOYMENTS, catalog, sim.url)
    # The EU deployment is down: nothing listens where it points.
    dead = settings.providers["openai-eu"]
    import dataclasses
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.providers["openai-eu"] = dataclasses.replace(dead, base_url=f"http://127.0.0.1:{port}/v1")
    async with Orchestrator(settings) as orchestrator:
        served = Counter()
        for _ in range(20):
            answer = await orchestrator.complete(ask(), RouteOptions(model="mini"))
            served[answer.p402.provider] += 1
            assert all(f"{a.provider}/{a.model}" in ("openai/gpt-4o-mini", "openai-eu/gpt-4o-mini")
                       for a in answer.p402.attempts)
        assert served == {"openai": 20}
        health = orchestrator.health.snapshot(["openai", "openai-eu"])
        eu, main = health["openai-eu"].to_dict(), health["openai"].to_dict()
        assert main["status"] == "healthy" and main["circuit"] == "closed"
        assert (eu["status"], eu["circuit"]) == ("down", "open")  # its own circuit, opened by its own failures


async def test_an_alias_is_a_model_name_for_the_gateway(sim, catalog, tmp_path):
    settings = settings_from_toml(tmp_path, DEPLOYMENTS, catalog, sim.url)
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as runtime:
        gateway = await runtime.serve_gateway("127.0.0.1", 0)
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        try:
            listed = [m.id async for m in client.models.list()]
            answer = await client.chat.completions.create(model="everywhere", messages=HELLO)
        finally:
            await client.close()
            await gateway.stop()
    first_alias = listed.index("mini")
    assert listed[:first_alias][-1] == "p402/adaptive" and listed[first_alias:first_alias + 3] == ["mini", "everywhere", "open"]
    assert f"{answer.model_extra['p402']['provider']}/{answer.model_extra['p402']['model']}".endswith("/gpt-4o-mini")


# --- 5. Azure OpenAI ---------------------------------------------------------------------------


def test_the_official_azure_client_chats_and_streams_with_the_simulator(sim_process):
    client = openai.AzureOpenAI(
        azure_endpoint=f"{sim_process['url']}/azure", api_key="az-key", api_version="2024-10-21", max_retries=0
    )
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    assert answer.model == "gpt-4o-mini"
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError, match="deployment for this resource does not exist") as missing:
        client.chat.completions.create(model="no-such-deployment", messages=HELLO)
    assert missing.value.code == "DeploymentNotFound"
    with pytest.raises(openai.BadRequestError, match="content management policy") as filtered:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": CONTENT_FILTER_TRIGGER}])
    assert filtered.value.code == "content_filter"
    bad = openai.AzureOpenAI(azure_endpoint=f"{sim_process['url']}/azure", api_key="sk-invalid-x",
                             api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="gpt-4o-mini", messages=HELLO)


async def test_the_azure_adapter_sends_api_key_deployment_and_api_version(tmp_path, catalog):
    """A loopback server that records what the adapter sends, then answers as Azure does."""
    import asyncio

    seen: list[tuple[str, dict]] = []
    answer = {"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}

    async def handle(reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        await reader.readexactly(int(headers.get("content-length", 0)))
        seen.append((lines[0], headers))
        body = json.dumps(answer).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = settings_from_toml(tmp_path, f"""
[providers.azure]
base_url = "http://127.0.0.1:{port}"
api_key = "az-secret"
api_version = "2025-01-01-preview"
deployments = {{"gpt-4o-mini" = "prod-4o-mini"}}
""", catalog)
    try:
        async with adapters_on(settings) as build:
            response = await build("azure").complete(ask(), model="gpt-4o-mini")
    finally:
        server.close()
        await server.wait_closed()
    line, headers = seen[0]
    assert line == "POST /openai/deployments/prod-4o-mini/chat/completions?api-version=2025-01-01-preview HTTP/1.1"
    assert headers["api-key"] == "az-secret" and "authorization" not in headers
    assert response.content == "hi"


def test_azure_reads_the_sdks_environment(catalog):
    from p402_tui.core.config import ConfigFile as File

    env = {"AZURE_OPENAI_API_KEY": "env-key", "AZURE_OPENAI_ENDPOINT": "https://mine.openai.azure.com",
           "OPENAI_API_VERSION": "2024-06-01"}
    azure = Settings(File(), catalog, env=env).providers["azure"]
    assert (azure.key(), azure.base_url, azure.api_version) == ("env-key", "https://mine.openai.azure.com", "2024-06-01")
    assert Settings(File(), catalog, env={}).providers["azure"].api_version == "2024-10-21"  # the documented default


async def test_azure_through_the_orchestrator_and_its_content_filter(sim, catalog, tmp_path):
    settings = settings_from_toml(tmp_path, DEPLOYMENTS, catalog, sim.url)
    sim.state.azure_deployments["prod-4o-mini"] = "gpt-4o-mini"
    async with Orchestrator(settings) as orchestrator:
        answer = await orchestrator.complete(ask(), RouteOptions(model="azure/gpt-4o-mini"))
        parent = catalog.models["openai/gpt-4o-mini"]
        assert answer.p402.provider == "azure" and answer.p402.cost_usd == pytest.approx(
            answer.usage.prompt_tokens * parent.input_per_1m / 1e6 + answer.usage.completion_tokens * parent.output_per_1m / 1e6)
        streamed = orchestrator.stream(ask(stream=True), RouteOptions(model="azure/gpt-4o-mini"))
        text = "".join([chunk.content async for chunk in streamed])
        assert text == answer.content and streamed.meta.cost_usd == answer.p402.cost_usd
        filtered = ChatRequest(messages=[{"role": "user", "content": f"please {CONTENT_FILTER_TRIGGER}"}])
        with pytest.raises(ContentFilterError, match="content filter") as caught:
            # failover is on (the fallbacks include openai/gpt-4o-mini), but a content filter's refusal ends it
            await orchestrator.complete(filtered, RouteOptions(model="azure/gpt-4o-mini"))
        assert not caught.value.retryable and caught.value.provider == "azure"
    assert (await sim_calls(sim))["azure"]["models"]["gpt-4o-mini"] >= 2


# --- 6. parameter rules as data ------------------------------------------------------------------


async def test_a_dropped_parameter_never_reaches_the_model_and_is_reported(sim, catalog, tmp_path):
    settings = Settings(ConfigFile(), catalog, env={}).point_at(sim.url)
    assert "temperature" in catalog.models["openai/o3"].drops
    async with Orchestrator(settings) as orchestrator:
        # The simulator refuses temperature for o3 as OpenAI does: this answers only because it was dropped.
        answer = await orchestrator.complete(ask(temperature=0.2, max_tokens=200), RouteOptions(model="openai/o3"))
        assert answer.p402.dropped_params == ["temperature"] and answer.content is not None
        stream = orchestrator.stream(ask(temperature=0.2, stream=True), RouteOptions(model="openai/o3"))
        [chunk async for chunk in stream]
        assert stream.meta.dropped_params == ["temperature"]
        plain = await orchestrator.complete(ask(temperature=0.2), RouteOptions(model="openai/gpt-4o-mini"))
        assert plain.p402.dropped_params == []


async def test_parameter_rules_through_the_gateway_and_overridden_in_config(sim, catalog, tmp_path):
    settings = settings_from_toml(
        tmp_path, '[models."openai/gpt-4o-mini"]\ndrops = ["seed", "top_p"]\ninput_per_1m = 9.0\n', catalog, sim.url)
    assert settings.catalog.models["openai/gpt-4o-mini"].to_dict()["drops"] == ["seed", "top_p"]
    settings.file.store.durability = "strict"  # each row committed before its answer ends
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as runtime:
        gateway = await runtime.serve_gateway("127.0.0.1", 0)
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        try:
            answer = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, seed=7,
                                                          temperature=0.5)
            o3 = await client.chat.completions.create(model="openai/o3", messages=HELLO, temperature=0.3)
        finally:
            await client.close()
            await gateway.stop()
    assert answer.model_extra["p402"]["dropped_params"] == ["seed"]
    assert o3.model_extra["p402"]["dropped_params"] == ["temperature"]
    # The config's price is the one billed, in the answer and in the ledger.
    usage = answer.usage
    billed = usage.prompt_tokens * 9.0 / 1e6 + usage.completion_tokens * 0.6 / 1e6
    assert answer.model_extra["p402"]["cost_usd"] == pytest.approx(billed)
    with sqlite3.connect(tmp_path / "p402.db") as conn:
        (ledger,) = conn.execute("SELECT cost_usd FROM requests WHERE model = 'gpt-4o-mini'").fetchone()
    assert ledger == pytest.approx(billed)


def test_models_json_shows_rules_and_source():
    from conftest import run_cli

    rows = {r["id"]: r for r in json.loads(run_cli("models", "--json").stdout)}
    assert rows["openai/o3"]["renames"] == {"max_tokens": "max_completion_tokens"}
    assert "temperature" in rows["openai/o3"]["drops"] and rows["openai/o3"]["source"] == "catalog"
    assert rows["mistral/mistral-small-latest"]["drops"] == ["stream_options"]  # the provider's, as data


# --- catalog import ---------------------------------------------------------------------------------


def test_catalog_import_adds_models_it_did_not_have(tmp_path):
    from conftest import run_cli

    prices = tmp_path / "model_prices_and_context_window.json"
    prices.write_text(json.dumps({
        "gpt-7-heldout": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 3e-06,
                          "output_cost_per_token": 1.2e-05, "max_input_tokens": 400000, "max_output_tokens": 64000,
                          "supports_function_calling": True, "supports_vision": True},
        "groq/new-llama-heldout": {"litellm_provider": "groq", "mode": "chat", "input_cost_per_token": 1e-07,
                                   "output_cost_per_token": 2e-07},
        "gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2e-06,
                   "output_cost_per_token": 8e-06},
        "dall-e-9": {"litellm_provider": "openai", "mode": "image_generation", "input_cost_per_token": 1e-06},
    }), encoding="utf-8")
    overrides = tmp_path / "overrides.json"
    env = {"P402_CATALOG_OVERRIDES": str(overrides)}
    run = run_cli("catalog", "import", str(prices), "--provider", "openai", "--overrides", str(overrides), "--json",
                  env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["added"] == ["openai/gpt-7-heldout"] and report["updated"] == ["openai/gpt-4o"]
    rows = {r["id"]: r for r in json.loads(run_cli("models", "--json", env=env).stdout)}
    new = rows["openai/gpt-7-heldout"]
    assert (new["source"], new["input_per_1m"], new["output_per_1m"], new["context_window"]) == ("import", 3.0, 12.0, 400000)
    assert {"function_calling", "vision"} <= set(new["capabilities"])
    assert rows["openai/gpt-4o"]["input_per_1m"] == 2.0
    assert "groq/new-llama-heldout" not in rows  # --provider openai left it out
    again = json.loads(run_cli("catalog", "import", str(prices), "--overrides", str(overrides), "--json", env=env).stdout)
    assert again["added"] == ["groq/new-llama-heldout"]
    assert load_catalog(overrides_path=overrides).models["groq/new-llama-heldout"].source == "import"
    bad = run_cli("catalog", "import", str(prices), "--provider", "nobody", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("p402: ") and "nobody" in bad.stderr


async def test_the_console_offers_aliases_and_routes_them(sim, catalog, tmp_path):
    from p402_tui.tui.screens.chat import LocalLink

    settings = settings_from_toml(tmp_path, DEPLOYMENTS, catalog, sim.url)
    async with Orchestrator(settings) as orchestrator:
        link = LocalLink(orchestrator)
        offered = await link.models()
        assert offered[:3] == ["mini", "everywhere", "open"] and "openai/gpt-4o-mini" in offered
        # What the console's chat sends for a picked model: RouteOptions(model=...)
        stream = link.stream(ask(stream=True), RouteOptions(model="open"), CallContext(source="console"))
        [chunk async for chunk in stream]
        assert f"{stream.meta.provider}/{stream.meta.model}" in (
            "groq/llama-3.3-70b-versatile", "together/meta-llama/Llama-3.3-70B-Instruct-Turbo")


def test_apply_rules_leaves_the_callers_request_alone():
    from p402_tui.core.params import apply_rules

    request = ChatRequest(messages=HELLO, temperature=0.5, max_tokens=10, seed=3, logit_bias={"1": 2})
    shaped, dropped = apply_rules(request, frozenset({"seed", "logit_bias", "top_p"}),
                                  {"max_tokens": "max_completion_tokens"}, {"reasoning_effort": "low"})
    assert dropped == ["logit_bias", "seed"]  # top_p was not set: nothing to report
    body = shaped.model_dump(exclude_none=True)
    assert body["max_completion_tokens"] == 10 and "max_tokens" not in body and "seed" not in body
    assert body["reasoning_effort"] == "low" and "logit_bias" not in body and body["temperature"] == 0.5
    assert request.seed == 3 and request.max_tokens == 10 and request.model_extra == {"logit_bias": {"1": 2}}
    same, none = apply_rules(request, frozenset({"top_p"}), {}, {})
    assert same is request and none == []


async def test_an_answer_azure_cut_short_for_its_content_filter_is_a_clear_error(tmp_path, catalog):
    settings = settings_from_toml(tmp_path, '[providers.azure]\napi_key = "k"\n', catalog)
    filtered = {"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Part of"},
                             "finish_reason": "content_filter"}]}
    async with adapters_on(settings) as build:
        adapter = build("azure")
        assert adapter.headers["api-key"] == "k" and "Authorization" not in adapter.headers
        with pytest.raises(ContentFilterError, match="content filter stopped the answer") as caught:
            adapter.parse_completion(filtered, "gpt-4o-mini")
    assert caught.value.kind == "content_filter" and not caught.value.retryable


async def test_a_pinned_unknown_embedding_model_through_the_gateway(sim, catalog, tmp_path):
    settings = Settings(ConfigFile(), catalog, env={}).point_at(sim.url)
    settings.file.store.durability = "strict"
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as runtime:
        gateway = await runtime.serve_gateway("127.0.0.1", 0)
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        try:
            vectors = await client.embeddings.create(model="openai/text-embedding-heldout", input=["one", "two"])
        finally:
            await client.close()
            await gateway.stop()
    assert len(vectors.data) == 2 and (await sim_calls(sim))["openai"]["models"]["text-embedding-heldout"] == 1
    with sqlite3.connect(tmp_path / "p402.db") as conn:
        assert conn.execute("SELECT cost_usd, priced FROM requests WHERE model = 'text-embedding-heldout'").fetchall() == [
            (None, 0)]
