"""The foundation commands as a user runs them: JSON shapes, math, errors, help."""

from __future__ import annotations

import json
import time

import pytest

from conftest import run_cli

PROVIDER_IDS = [
    "openai", "anthropic", "google", "groq", "deepseek", "mistral",
    "together", "fireworks", "openrouter", "cohere", "perplexity", "ai21", "azure",
]


def ok_json(*args: str, **kw):
    result = run_cli(*args, **kw)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_providers_json_lists_exactly_the_thirteen():
    rows = ok_json("providers", "--json")
    assert [r["id"] for r in rows] == PROVIDER_IDS
    for row in rows:
        assert {"id", "name", "wire", "models", "configured"} <= row.keys()
        # Azure's models are the deployments a config maps; the shipped catalog lists none.
        assert row["models"] >= 4 or (row["id"], row["models"]) == ("azure", 0)
        assert row["configured"] is False  # no keys in the test environment


def test_providers_configured_by_env_key():
    rows = ok_json("providers", "--json", env={"GROQ_API_KEY": "gsk_test"})
    assert {r["id"]: r["configured"] for r in rows}["groq"] is True


def test_models_json_shape_and_size():
    rows = ok_json("models", "--json")
    assert len(rows) >= 106
    for row in rows:
        assert {"id", "provider", "model", "tier", "context_window", "input_per_1m", "output_per_1m", "capabilities"} <= row.keys()
        assert row["id"] == f"{row['provider']}/{row['model']}"
        assert row["context_window"] > 0
        assert row["input_per_1m"] >= 0 and row["output_per_1m"] >= 0


def test_models_filters():
    rows = ok_json("models", "--json", "--provider", "anthropic", "--capability", "vision", "--max-tier", "mid")
    assert rows
    assert all(r["provider"] == "anthropic" and "vision" in r["capabilities"] and r["tier"] != "premium" for r in rows)


def test_compare_costs_every_chat_model_ascending(catalog):
    rows = ok_json("compare", "--input-tokens", "1000", "--output-tokens", "500", "--json")
    # Embedding models write no answer: priced at $0 output they would lead every comparison.
    assert {r["id"] for r in rows} == {m.id for m in catalog.models.values() if "chat" in m.capabilities}
    embedders = ok_json("compare", "--input-tokens", "1000", "--output-tokens", "0", "--capability", "embeddings", "--json")
    assert embedders and all("chat" not in catalog.models[r["id"]].capabilities for r in embedders)
    for row in rows:
        model = catalog.models[row["id"]]
        assert row["cost_usd"] == pytest.approx(1000 * model.input_per_1m / 1e6 + 500 * model.output_per_1m / 1e6, abs=1e-15)
    costs = [r["cost_usd"] for r in rows]
    assert costs == sorted(costs)


def test_compare_refuses_a_count_no_float_holds():
    result = run_cli("compare", "--input-tokens", "1" + "0" * 400, "--output-tokens", "5")  # was a traceback
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--input-tokens: must be at most 1,000,000,000,000,000" in result.stderr


def test_compare_top_and_capability():
    rows = ok_json("compare", "--input-tokens", "2000", "--output-tokens", "100", "--capability", "vision", "--top", "3", "--json")
    assert len(rows) == 3


def test_compare_table_never_shows_a_nonzero_cost_as_zero():
    rows = ok_json("compare", "--input-tokens", "1", "--output-tokens", "1", "--top", "8", "--json")
    result = run_cli("compare", "--input-tokens", "1", "--output-tokens", "1", "--top", "8")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert len(lines) == len(rows) and all(r["cost_usd"] > 0 for r in rows)
    for line, row in zip(lines, rows):
        shown = float(line.split()[-1].lstrip("$"))
        assert shown == pytest.approx(row["cost_usd"], rel=0.05)  # two significant digits at least
    assert {len(line) for line in [header, *lines]} == {len(header)}  # the COST column stays right-aligned


def test_tokens_says_token_for_one():
    assert run_cli("tokens", "hi").stdout.startswith("1 token (")
    assert run_cli("tokens", "hello world").stdout.startswith("2 tokens (")


def test_tokens_exact_offline(tmp_path):
    # An empty tiktoken cache and a dead proxy: any download attempt would fail or hang.
    # The bound catches a hang (a download retried against the dead proxy), not slowness: a loaded
    # CI machine takes 2 s to start a process that imports tiktoken.
    env = {
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    start = time.monotonic()
    data = ok_json("tokens", "--json", "hello world", env=env)
    elapsed = time.monotonic() - start
    assert data["tokens"] == 2
    assert data["exact"] is True
    assert data["tokenizer"].startswith("cl100k_base")
    assert elapsed < 15.0


def test_tokens_reads_stdin():
    data = ok_json("tokens", "--json", "-", input="hello world")
    assert data["tokens"] == 2


def test_tokens_for_a_claude_model_says_it_is_approximate():
    data = ok_json("tokens", "--json", "--model", "anthropic/claude-sonnet-4-5-20250929", "hello world")
    assert data["exact"] is False


@pytest.mark.parametrize(
    "args, needle",
    [
        (("models", "--capability", "telepathy"), "telepathy"),
        (("models", "--provider", "nope"), "nope"),
        (("compare", "--input-tokens", "10", "--output-tokens", "5", "--capability", "telepathy"), "telepathy"),
        (("tokens", "--model", "nope/nothing", "hi"), "nope/nothing"),
        (("catalog", "import", "/nonexistent/prices.json"), "no such file"),
    ],
)
def test_errors_are_one_line_and_non_zero(args, needle):
    result = run_cli(*args)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[1]", "are not of the form"),
        ('{"models": {"openai/gpt-4o": 3}}', "are not of the form"),
        ('{"models": ', "cannot read catalog overrides"),
        ('{"models": {"openai/gpt-4o": {"input_per_1m": "cheap"}}}', "with the overrides in"),
    ],
)
def test_a_broken_catalog_override_file_is_named_not_a_traceback(tmp_path, content, needle):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(content)
    prices = tmp_path / "prices.json"
    prices.write_text("{}")
    for args, env in ((("models",), {"P402_CATALOG_OVERRIDES": str(overrides)}),
                      (("catalog", "import", str(prices), "--overrides", str(overrides)), None)):
        if "with the overrides" in needle and args[0] == "catalog":
            continue  # a bad price is only found when the catalog is read with it
        result = run_cli(*args, env=env)
        assert result.returncode == 1, result.stdout
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert needle in result.stderr and str(overrides) in result.stderr


def test_bad_config_file_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[router]\nmode = 3\n")
    result = run_cli("providers", "--config", str(bad))
    assert result.returncode == 1 and "router.mode" in result.stderr and "Traceback" not in result.stderr


def test_config_flag_and_env_are_accepted_everywhere(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[providers.mistral]\napi_key = "m-key"\n')
    rows = ok_json("providers", "--json", "--config", str(cfg))
    assert {r["id"]: r["configured"] for r in rows}["mistral"] is True
    rows = ok_json("providers", "--json", env={"P402_CONFIG": str(cfg)})
    assert {r["id"]: r["configured"] for r in rows}["mistral"] is True


def test_config_flag_before_the_command_is_not_dropped(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[providers.mistral]\napi_key = "m-key"\n')
    rows = ok_json("--config", str(cfg), "providers", "--json")
    assert {r["id"]: r["configured"] for r in rows}["mistral"] is True
    result = run_cli("--config", str(tmp_path / "missing.toml"), "models")
    assert result.returncode == 1 and "config file not found" in result.stderr


@pytest.mark.parametrize("command", ["providers", "models", "compare", "tokens", "catalog", "demo"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "--config" in result.stdout


def test_catalog_import_writes_overrides_not_the_catalog(tmp_path, catalog):
    prices = tmp_path / "model_prices_and_context_window.json"
    prices.write_text(json.dumps({
        "gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 3e-06,
                   "output_cost_per_token": 1.2e-05, "max_input_tokens": 128000, "max_output_tokens": 16384},
        "some-unknown-model": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06},
    }))
    overrides = tmp_path / "overrides.json"
    data = ok_json("catalog", "import", str(prices), "--overrides", str(overrides), "--json")
    assert "openai/gpt-4o" in data["updated"]
    rows = ok_json("models", "--json", "--provider", "openai", env={"P402_CATALOG_OVERRIDES": str(overrides)})
    gpt4o = next(r for r in rows if r["id"] == "openai/gpt-4o")
    assert gpt4o["input_per_1m"] == pytest.approx(3.0)
    shipped = ok_json("models", "--json", "--provider", "openai")
    assert next(r for r in shipped if r["id"] == "openai/gpt-4o")["input_per_1m"] == catalog.models["openai/gpt-4o"].input_per_1m
