"""`p402 chat` against a real `p402 sim` process, for every one of the twelve providers.

The usage the simulator sent is read with each wire family's official SDK, so the
CLI's numbers are checked against an independent parser, and the cost against the
catalog's prices written out. Every call says --no-cache: these tests are about what
the simulator sent, and the same prompt goes to every provider.
"""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_cli

from p402_tui.cli import main

PROMPT = "Which model should answer this question?"
MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5-20251001",
    "google": "gemini-2.0-flash",
    "groq": "llama-3.3-70b-versatile",
    "deepseek": "deepseek-reasoner",
    "mistral": "mistral-small-latest",
    "together": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "fireworks": "accounts/fireworks/models/llama-v3p1-405b-instruct",
    "openrouter": "openai/gpt-4o",
    "cohere": "command-r-08-2024",
    "perplexity": "sonar",
    "ai21": "jamba-mini-1.7",
}
ADAPTER_MODULES = {
    "anthropic": "p402_tui.providers.anthropic",
    "google": "p402_tui.providers.gemini",
    "cohere": "p402_tui.providers.cohere",
}


def sdk_usage(url: str, base_path: str, pid: str, model: str) -> tuple[str, int, int]:
    """(content, prompt tokens, completion tokens) as the provider's official SDK reads the simulator's answer."""
    base = f"{url}/{pid}"
    if pid == "anthropic":
        import anthropic

        with anthropic.Anthropic(base_url=base, api_key="sim-key", max_retries=0) as client:
            message = client.messages.create(
                model=model, max_tokens=1024, messages=[{"role": "user", "content": PROMPT}]
            )
        text = "".join(block.text for block in message.content if block.type == "text")
        usage = message.usage
        prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)
        return text, prompt, usage.output_tokens
    if pid == "google":
        from google import genai
        from google.genai import types

        client = genai.Client(api_key="sim-key", http_options=types.HttpOptions(base_url=base))
        try:
            response = client.models.generate_content(model=model, contents=PROMPT)
        finally:
            client.close()
        meta = response.usage_metadata
        return response.text, meta.prompt_token_count, (meta.candidates_token_count or 0) + (
            meta.thoughts_token_count or 0
        )
    if pid == "cohere":
        import cohere

        client = cohere.ClientV2(api_key="sim-key", base_url=base)
        response = client.chat(model=model, messages=[{"role": "user", "content": PROMPT}])
        text = "".join(part.text for part in response.message.content or () if part.type == "text")
        tokens = response.usage.tokens
        return text, int(tokens.input_tokens), int(tokens.output_tokens)
    import openai

    with openai.OpenAI(base_url=f"{base}{base_path}", api_key="sim-key", max_retries=0) as client:
        completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}])
    usage = completion.usage
    return completion.choices[0].message.content, usage.prompt_tokens, usage.completion_tokens


def chat(config, *args: str):
    return run_cli("chat", *args, config=config)


def explain(run) -> str:
    """Everything a failed child left behind, so a failure that does not repeat still explains itself."""
    return f"{run.args[3:]} exited {run.returncode}\nstdout: {run.stdout[-2000:]!r}\nstderr: {run.stderr[-4000:]}"


@pytest.mark.parametrize("pid", list(MODELS))
def test_chat_json_for_every_provider(pid, sim_process, catalog):
    if pid in ADAPTER_MODULES:
        pytest.importorskip(ADAPTER_MODULES[pid])
    model_id = f"{pid}/{MODELS[pid]}"
    spec = catalog.models[model_id]
    base = ["--no-cache", "--model", model_id, "--json", PROMPT]
    # Both CLI processes and the SDK's call at once: the SDK (and its first import) runs
    # here while the children start, so a provider costs about one process's time.
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(chat, sim_process["config"], *extra, *base) for extra in ([], ["--stream"])]
        sdk = pool.submit(sdk_usage, sim_process["url"], catalog.providers[pid].base_path, pid, MODELS[pid])
        plain_run, stream_run = (run.result() for run in runs)
        text, prompt_tokens, completion_tokens = sdk.result()
    expected_cost = (prompt_tokens * spec.input_per_1m + completion_tokens * spec.output_per_1m) / 1e6
    for run, streamed in ((plain_run, False), (stream_run, True)):
        assert run.returncode == 0, explain(run)
        out = json.loads(run.stdout)
        assert out["content"] == text and text
        assert (out["provider"], out["model"]) == (pid, model_id)
        assert out["usage"]["prompt_tokens"] == prompt_tokens
        assert out["usage"]["completion_tokens"] == completion_tokens
        assert out["usage"]["total_tokens"] == prompt_tokens + completion_tokens
        assert math.isclose(out["cost_usd"], expected_cost, rel_tol=1e-9) and expected_cost > 0
        assert out["finish_reason"] == "stop"
        assert out["latency_ms"] > 0
        assert (out["ttft_ms"] is not None) == streamed
        if streamed:
            assert 0 < out["ttft_ms"] <= out["latency_ms"]
        if pid == "deepseek":
            assert out["reasoning"] and 0 < out["usage"]["reasoning_tokens"] < completion_tokens
        if pid == "perplexity":
            assert out["citations"] and out["search_results"]


# Everything else runs in-process: `main()` is exactly what the console script runs.


def p402(monkeypatch, capsys, *args: str, stdin: str | None = None, env: dict | None = None):
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plain_output_streams_the_text(sim_process, monkeypatch, capsys):
    env = {"P402_CONFIG": str(sim_process["config"])}
    args = ("chat", "--no-cache", "--model", "openai/gpt-4o-mini")
    plain = p402(monkeypatch, capsys, *args, PROMPT, env=env)
    streamed = p402(monkeypatch, capsys, *args, "--stream", PROMPT, env=env)
    assert plain[0] == streamed[0] == 0
    assert plain[1] == streamed[1] and len(plain[1].strip()) > 20
    assert not plain[1].lstrip().startswith("{")


def test_prompt_from_stdin_system_and_max_tokens(sim_process, monkeypatch, capsys):
    env = {"P402_CONFIG": str(sim_process["config"])}
    args = ("chat", "--no-cache", "--model", "deepseek/deepseek-chat", "--json")
    code, out, err = p402(
        monkeypatch, capsys, *args, "--system", "Be terse.", "--max-tokens", "5", "-", stdin=PROMPT, env=env
    )
    assert code == 0, err
    terse = json.loads(out)
    assert terse["finish_reason"] == "length" and 0 < terse["usage"]["completion_tokens"] <= 5
    plain = json.loads(p402(monkeypatch, capsys, *args, PROMPT, env=env)[1])
    assert terse["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_a_model_the_provider_does_not_know_is_the_providers_404(sim_process, monkeypatch, capsys):
    """A catalog model the upstream has dropped: the provider's 404 comes back as model_not_found."""
    env = {"P402_OPENAI_BASE_URL": f"{sim_process['url']}/groq/openai/v1", "OPENAI_API_KEY": "sim-key"}
    code, _, err = p402(monkeypatch, capsys, "chat", "--no-cache", "--model", "openai/gpt-4o-mini", PROMPT, env=env)
    assert code == 1 and err.startswith("p402: model_not_found: ")


def test_unknown_model_exits_1_with_one_line(sim_process, monkeypatch, capsys):
    env = {"P402_CONFIG": str(sim_process["config"])}
    code, out, err = p402(monkeypatch, capsys, "chat", "--model", "openai/no-such-model", PROMPT, env=env)
    assert code == 1 and out == ""
    assert err.startswith("p402: model_not_found: ") and err.count("\n") == 1


def test_rejected_key_exits_1_without_the_key(sim_process, monkeypatch, capsys):
    key = "sk-invalid-do-not-print-me-123456"
    env = {"P402_OPENAI_BASE_URL": f"{sim_process['url']}/openai/v1", "OPENAI_API_KEY": key}
    code, out, err = p402(monkeypatch, capsys, "chat", "--no-cache", "--model", "openai/gpt-4o-mini", PROMPT, env=env)
    assert code == 1 and err.startswith("p402: authentication: ") and "401" in err
    assert key not in err and key not in out


def test_missing_key_says_which_variable(monkeypatch, capsys):
    code, _, err = p402(monkeypatch, capsys, "chat", "--model", "groq/llama-3.3-70b-versatile", "hi")
    assert code == 1 and err.startswith("p402: config: ") and "GROQ_API_KEY" in err


def test_empty_prompt_is_refused(sim_process, monkeypatch, capsys):
    env = {"P402_CONFIG": str(sim_process["config"])}
    code, _, err = p402(monkeypatch, capsys, "chat", "--model", "openai/gpt-4o-mini", "-", stdin="  \n", env=env)
    assert code == 1 and err.startswith("p402: ") and "empty" in err


def test_every_provider_failing_is_one_line_saying_when_to_retry(sim_process, monkeypatch, capsys):
    import httpx

    faults = f"{sim_process['url']}/_sim/faults"
    httpx.post(faults, json={"provider": "*", "kind": "error", "status": 503}).raise_for_status()
    try:
        env = {"P402_CONFIG": str(sim_process["config"])}
        code, out, err = p402(monkeypatch, capsys, "chat", "--no-cache", PROMPT, env=env)
    finally:
        httpx.delete(faults).raise_for_status()
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("p402: overloaded: all 3 attempt(s) failed") and "try again in 1s" in err
