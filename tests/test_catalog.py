"""The shipped catalog's integrity, its loader's errors, overrides and the LiteLLM price import."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from p402_tui.core.catalog import (
    CATALOG_PATH,
    import_litellm_prices,
    load_catalog,
    merge_overrides,
    parse_catalog,
)
from p402_tui.core.errors import CatalogError
from p402_tui.core.types import CAPABILITIES, TIERS

PROVIDER_IDS = [
    "openai",
    "anthropic",
    "google",
    "groq",
    "deepseek",
    "mistral",
    "together",
    "fireworks",
    "openrouter",
    "cohere",
    "perplexity",
    "ai21",
    "azure",
]

# What each provider's official SDK means by base_url, and where its key lives.
PROVIDER_WIRING = {
    "openai": ("openai", "https://api.openai.com/v1", ["OPENAI_API_KEY"]),
    "anthropic": ("anthropic", "https://api.anthropic.com", ["ANTHROPIC_API_KEY"]),
    "google": ("gemini", "https://generativelanguage.googleapis.com", ["GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_AI_API_KEY"]),
    "groq": ("openai", "https://api.groq.com/openai/v1", ["GROQ_API_KEY"]),
    "deepseek": ("openai", "https://api.deepseek.com", ["DEEPSEEK_API_KEY"]),
    "mistral": ("openai", "https://api.mistral.ai/v1", ["MISTRAL_API_KEY"]),
    "together": ("openai", "https://api.together.xyz/v1", ["TOGETHER_API_KEY"]),
    "fireworks": ("openai", "https://api.fireworks.ai/inference/v1", ["FIREWORKS_API_KEY"]),
    "openrouter": ("openai", "https://openrouter.ai/api/v1", ["OPENROUTER_API_KEY"]),
    "cohere": ("cohere", "https://api.cohere.com", ["CO_API_KEY", "COHERE_API_KEY"]),
    "perplexity": ("openai", "https://api.perplexity.ai", ["PERPLEXITY_API_KEY"]),
    "ai21": ("openai", "https://api.ai21.com/studio/v1", ["AI21_API_KEY"]),
    "azure": ("azure", "https://YOUR-RESOURCE.openai.azure.com", ["AZURE_OPENAI_API_KEY"]),
}
# Azure's models are its configured deployments of OpenAI's: the shipped catalog lists none.
LISTING_PROVIDERS = [p for p in PROVIDER_IDS if p != "azure"]

# The seed list and the current models users pick.
SEED_MODELS = [
    "openai/gpt-4o",
    "openai/gpt-4o-mini",
    "openai/gpt-4",
    "openai/gpt-4-turbo",
    "openai/gpt-3.5-turbo",
    "openai/o1",
    "openai/gpt-4.1",
    "openai/gpt-5",
    "openai/o3",
    "openai/o4-mini",
    "anthropic/claude-opus-4-5-20251101",
    "anthropic/claude-sonnet-4-5-20250929",
    "anthropic/claude-haiku-4-5-20251001",
    "anthropic/claude-3-haiku-20240307",
    "anthropic/claude-3-opus-20240229",
    "google/gemini-2.0-flash",
    "google/gemini-1.5-pro",
    "google/gemini-1.5-flash",
    "google/gemini-2.5-pro",
    "google/gemini-2.5-flash",
    "groq/llama-3.3-70b-versatile",
    "groq/llama-3.1-8b-instant",
    "groq/mixtral-8x7b-32768",
    "groq/deepseek-r1-distill-llama-70b",
    "deepseek/deepseek-chat",
    "deepseek/deepseek-coder",
    "deepseek/deepseek-reasoner",
    "mistral/mistral-large-latest",
    "mistral/mistral-small-latest",
    "mistral/codestral-latest",
    "mistral/ministral-8b-latest",
    "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "together/Qwen/Qwen3-235B-A22B-Instruct-2507-tput",
    "together/deepseek-ai/DeepSeek-R1",
    "together/databricks/dbrx-instruct",
    "fireworks/accounts/fireworks/models/llama-v3p3-70b-instruct",
    "fireworks/accounts/fireworks/models/qwen3-coder-480b-a35b-instruct",
    "fireworks/accounts/fireworks/models/firefunction-v2",
    "openrouter/openai/gpt-4o",
    "openrouter/anthropic/claude-sonnet-4.5",
    "openrouter/google/gemini-2.5-pro",
    "cohere/command-r",
    "cohere/command-r-plus",
    "cohere/command-a-03-2025",
    "perplexity/sonar",
    "perplexity/sonar-pro",
    "ai21/jamba-large-1.7",
    "ai21/jamba-mini-1.7",
]


def expected_tier(input_per_1m: float, output_per_1m: float) -> str:
    """The catalog's tier rule: flagship-class prices are premium, cheap inputs budget, the rest mid."""
    if input_per_1m >= 2.5 or output_per_1m >= 10:
        return "premium"
    if input_per_1m <= 0.3:
        return "budget"
    return "mid"


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads(CATALOG_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def is_chat(model) -> bool:
    return "chat" in model.capabilities


def test_thirteen_providers_in_order(catalog):
    assert list(catalog.providers) == PROVIDER_IDS
    # models come in provider blocks, in provider order
    blocks: list[str] = []
    for model in catalog.models.values():
        if not blocks or blocks[-1] != model.provider:
            blocks.append(model.provider)
    assert blocks == LISTING_PROVIDERS


@pytest.mark.parametrize("provider_id", PROVIDER_IDS)
def test_provider_wiring(catalog, provider_id):
    provider = catalog.provider(provider_id)
    wire, base_url, key_env = PROVIDER_WIRING[provider_id]
    assert (provider.wire, provider.base_url, provider.api_key_env) == (wire, base_url, key_env)
    assert not provider.keyless


def test_unsupported_params_are_the_documented_ones(catalog):
    declared = {p.id: sorted(p.unsupported_params) for p in catalog.providers.values() if p.unsupported_params}
    assert declared == {
        "anthropic": ["seed"],
        "mistral": ["stream_options"],
        "perplexity": ["tool_choice", "tools"],
    }


def test_checked_on_is_a_date(catalog):
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", catalog.checked_on)


def test_enough_models_and_no_duplicate_ids(raw, catalog):
    ids = [entry["id"] for entry in raw["models"]]
    assert len(ids) == len(set(ids))
    assert len(catalog.models) >= 130


def test_every_provider_has_models(catalog):
    assert catalog.models_of("azure") == []
    for provider_id in LISTING_PROVIDERS:
        assert len(catalog.models_of(provider_id)) >= 4, provider_id


def test_every_model_priced_with_a_context_window(catalog):
    for model in catalog.models.values():
        assert model.input_per_1m > 0, model.id
        assert model.context_window > 0, model.id
        assert 0 < model.max_output_tokens <= model.context_window, model.id
        if is_chat(model):
            assert model.output_per_1m > 0, model.id
        if model.cached_input_per_1m is not None:
            assert model.cached_input_per_1m < model.input_per_1m, model.id


def test_tiers_follow_the_price_rule(catalog):
    for model in catalog.models.values():
        assert model.tier in TIERS
        assert model.tier == expected_tier(model.input_per_1m, model.output_per_1m), model.id


def test_capabilities(catalog):
    for model in catalog.models.values():
        assert model.capabilities <= set(CAPABILITIES), model.id
        if "embeddings" in model.capabilities:
            # embedding models bill input only and must never be routed a chat
            assert model.capabilities == {"embeddings"}, model.id
            assert model.output_per_1m == 0 and model.max_output_tokens == 1, model.id
        else:
            assert {"chat", "streaming"} <= model.capabilities, model.id


def test_priors_are_plausible(catalog):
    by_tier: dict[str, list[float]] = {tier: [] for tier in TIERS}
    for model in catalog.models.values():
        assert 0.4 <= model.quality <= 1, model.id
        assert model.tokens_per_s > 0, model.id
        assert 150 <= model.ttft_ms <= 1500, model.id
        if is_chat(model):
            by_tier[model.tier].append(model.quality)
            if model.tier == "premium":
                assert model.quality >= 0.7, model.id

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    assert mean(by_tier["budget"]) < mean(by_tier["mid"]) < mean(by_tier["premium"])


def test_seed_models_present(catalog):
    missing = [model_id for model_id in SEED_MODELS if model_id not in catalog.models]
    assert missing == []


def test_each_provider_has_a_budget_tool_model(catalog):
    # Perplexity's Sonar has no function calling (wire-formats.md section 5).
    for provider_id in LISTING_PROVIDERS:
        budget_chat = [m for m in catalog.models_of(provider_id) if m.tier == "budget" and is_chat(m)]
        if provider_id == "perplexity":
            assert all("function_calling" not in m.capabilities for m in catalog.models_of(provider_id))
            continue
        assert any("function_calling" in m.capabilities for m in budget_chat), provider_id


def test_cache_read_rates(catalog):
    assert catalog.model("anthropic/claude-sonnet-4-5-20250929").cached_input_per_1m == pytest.approx(0.3)
    assert catalog.model("anthropic/claude-opus-5-5").cached_input_per_1m == pytest.approx(0.2)
    assert catalog.model("deepseek/deepseek-chat").cached_input_per_1m == 0.028


def test_model_wire_ids_are_kept_exactly(catalog):
    fireworks = catalog.model("fireworks/accounts/fireworks/models/llama-v3p3-70b-instruct")
    assert fireworks.model == "accounts/fireworks/models/llama-v3p3-70b-instruct"
    assert catalog.model("groq/openai/gpt-oss-20b").model == "openai/gpt-oss-20b"


# --- broken entries -------------------------------------------------------------------


def test_broken_entry_names_the_model(raw):
    broken = copy.deepcopy(raw)
    broken["models"][5]["tier"] = "cheap"
    broken_id = broken["models"][5]["id"]
    with pytest.raises(CatalogError) as error:
        parse_catalog(broken)
    assert broken_id in str(error.value)
    assert "tier" in str(error.value)


def test_missing_field_names_the_model(raw):
    broken = copy.deepcopy(raw)
    del broken["models"][-1]["context_window"]
    with pytest.raises(CatalogError) as error:
        parse_catalog(broken)
    assert broken["models"][-1]["id"] in str(error.value)
    assert "context_window" in str(error.value)


def test_duplicate_and_orphan_models_are_named(raw):
    duplicated = copy.deepcopy(raw)
    duplicated["models"].append(dict(duplicated["models"][0]))
    with pytest.raises(CatalogError, match=re.escape(raw["models"][0]["id"])):
        parse_catalog(duplicated)
    orphan = copy.deepcopy(raw)
    orphan["models"][0] = {**orphan["models"][0], "id": "nobody/some-model"}
    with pytest.raises(CatalogError, match="nobody/some-model"):
        parse_catalog(orphan)


def test_unreadable_catalog_is_a_catalog_error(tmp_path: Path):
    path = tmp_path / "catalog.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(path)


# --- overrides ------------------------------------------------------------------------


def test_overrides_apply_to_known_models(tmp_path: Path):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(
        json.dumps({"models": {"openai/gpt-4o": {"input_per_1m": 2.0, "context_window": 64000, "quality": 0.1}}}),
        encoding="utf-8",
    )
    shipped = CATALOG_PATH.read_bytes()
    catalog = load_catalog(overrides_path=overrides)
    gpt4o = catalog.model("openai/gpt-4o")
    assert (gpt4o.input_per_1m, gpt4o.context_window) == (2.0, 64000)
    assert gpt4o.quality != 0.1  # only prices and limits can be overridden
    assert CATALOG_PATH.read_bytes() == shipped


@pytest.mark.parametrize("price", [-1, float("inf"), float("nan")])
def test_bad_override_names_the_model(tmp_path: Path, price: float):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"models": {"openai/gpt-4o": {"input_per_1m": price}}}), encoding="utf-8")
    with pytest.raises(CatalogError, match="openai/gpt-4o"):
        load_catalog(overrides_path=overrides)


# --- LiteLLM import -------------------------------------------------------------------


def litellm_entry(provider: str, input_cost: float, output_cost: float, **extra) -> dict:
    return {
        "litellm_provider": provider,
        "mode": "chat",
        "input_cost_per_token": input_cost,
        "output_cost_per_token": output_cost,
        **extra,
    }


@pytest.fixture
def litellm_file(tmp_path: Path) -> Path:
    """A small file in LiteLLM's model_prices_and_context_window.json format."""
    data = {
        "sample_spec": {"litellm_provider": "one of https://docs.litellm.ai/docs/providers", "mode": "chat"},
        # changed price and a new cached rate
        "gpt-4o": litellm_entry(
            "openai", 2e-06, 8e-06, cache_read_input_token_cost=1e-06, max_input_tokens=128000, max_output_tokens=16384
        ),
        # same values as the catalog: unchanged
        "groq/llama-3.3-70b-versatile": litellm_entry(
            "groq", 5.9e-07, 7.9e-07, max_input_tokens=128000, max_output_tokens=32768
        ),
        # a new context window
        "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo": litellm_entry(
            "together_ai", 8.8e-07, 8.8e-07, max_input_tokens=262144
        ),
        "fireworks_ai/accounts/fireworks/models/gpt-oss-20b": litellm_entry("fireworks_ai", 5e-08, 3e-07),
        "openrouter/openai/gpt-4o": litellm_entry("openrouter", 2.5e-06, 1e-05, max_output_tokens=16384),
        "gemini/gemini-2.5-flash": litellm_entry("gemini", 3e-07, 2e-06),
        "command-r": litellm_entry("cohere_chat", 1.5e-07, 6e-07, max_input_tokens=128000, max_output_tokens=4096),
        "mistral/mistral-small-latest": litellm_entry("mistral", 6e-08, 1.8e-07, max_input_tokens=131072),
        "perplexity/sonar": litellm_entry("perplexity", 1e-06, 1e-06, max_input_tokens=127072),
        "deepseek/deepseek-chat": litellm_entry("deepseek", 2.7e-07, 4.2e-07),
        "deepseek-chat": litellm_entry("deepseek", 9e-07, 9e-07),  # same model again: the first entry wins
        "text-embedding-3-small": {
            "litellm_provider": "openai",
            "mode": "embedding",
            "input_cost_per_token": 2e-08,
            "output_cost_per_token": 1e-09,
            "max_input_tokens": 8191,
        },
        # not ours: other providers' hosts and models we do not list
        "vertex_ai/gemini-2.5-flash": litellm_entry("vertex_ai-language-models", 1e-07, 1e-07),
        "azure/gpt-4o": litellm_entry("azure", 1e-07, 1e-07),
        "gpt-99-imaginary": litellm_entry("openai", 1e-07, 1e-07),
        "broken-entry": "not an object",
    }
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_import_maps_litellm_keys_onto_known_models(litellm_file, catalog):
    overrides, report = import_litellm_prices(json.loads(litellm_file.read_text()), catalog)
    assert overrides == {
        "models": {
            "openai/gpt-4o": {"input_per_1m": 2.0, "output_per_1m": 8.0, "cached_input_per_1m": 1.0},
            "together/meta-llama/Llama-3.3-70B-Instruct-Turbo": {"context_window": 262144},
            "fireworks/accounts/fireworks/models/gpt-oss-20b": {"input_per_1m": 0.05},
            "openrouter/openai/gpt-4o": {"max_output_tokens": 16384},
            "google/gemini-2.5-flash": {"output_per_1m": 2.0},
            "perplexity/sonar": {"context_window": 127072},
            "deepseek/deepseek-chat": {"input_per_1m": 0.27},
            # a chat model of ours the catalog lacks: added whole, with its prices
            "openai/gpt-99-imaginary": {
                "input_per_1m": 0.1, "output_per_1m": 0.1, "capabilities": ["chat", "streaming"], "source": "import",
            },
        }
    }
    assert report.updated == sorted(set(overrides["models"]) - {"openai/gpt-99-imaginary"})
    assert report.added == ["openai/gpt-99-imaginary"]
    # groq llama, cohere command-r, mistral small and the embedding model match already
    assert report.unchanged == 4
    assert report.unknown == 2  # vertex's and azure's hosts are not ours


def test_imported_overrides_load_and_leave_the_shipped_file_alone(litellm_file, catalog, tmp_path: Path):
    shipped = CATALOG_PATH.read_bytes()
    overrides, _ = import_litellm_prices(json.loads(litellm_file.read_text()), catalog)
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(overrides), encoding="utf-8")
    updated = load_catalog(overrides_path=path)
    gpt4o = updated.model("openai/gpt-4o")
    assert (gpt4o.input_per_1m, gpt4o.output_per_1m, gpt4o.cached_input_per_1m) == (2.0, 8.0, 1.0)
    assert updated.model("together/meta-llama/Llama-3.3-70B-Instruct-Turbo").context_window == 262144
    assert updated.model("openai/gpt-4.1") == catalog.model("openai/gpt-4.1")
    assert CATALOG_PATH.read_bytes() == shipped


def test_import_of_unchanged_values_is_empty(catalog):
    groq = catalog.model("groq/llama-3.3-70b-versatile")
    same = {
        "groq/llama-3.3-70b-versatile": litellm_entry(
            "groq",
            groq.input_per_1m / 1e6,
            groq.output_per_1m / 1e6,
            max_input_tokens=groq.context_window,
            max_output_tokens=groq.max_output_tokens,
        )
    }
    overrides, report = import_litellm_prices(same, catalog)
    assert overrides == {"models": {}}
    assert (report.updated, report.unchanged, report.unknown) == ([], 1, 0)


def test_merge_overrides_is_field_by_field():
    existing = {"models": {"a/x": {"input_per_1m": 1.0, "context_window": 1000}, "b/y": {"output_per_1m": 2.0}}}
    new = {"models": {"a/x": {"input_per_1m": 1.5}, "c/z": {"max_output_tokens": 10}}}
    merged = merge_overrides(existing, new)
    assert merged == {
        "models": {
            "a/x": {"input_per_1m": 1.5, "context_window": 1000},
            "b/y": {"output_per_1m": 2.0},
            "c/z": {"max_output_tokens": 10},
        }
    }
    assert existing["models"]["a/x"]["input_per_1m"] == 1.0  # inputs untouched
    assert merge_overrides({}, new) == new
