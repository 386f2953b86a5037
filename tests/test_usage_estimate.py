"""Usage a provider did not send: counted by us, billed on that count, and flagged everywhere it shows."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from egress_servers import threaded_sim

from p402_tui.cli import main
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.runtime import Runtime
from p402_tui.store.queries import _ledger_dict
from p402_tui.tui.attach import record_from_dict
from p402_tui.tui.state import DecisionRow
from p402_tui.tui.widgets.decisions import decision_cells
from p402_tui.tui.widgets.palette import Palette

MODEL = "openai/gpt-4o-mini"
PROMPT = "Say something about token counts."


@pytest.fixture(scope="module")
def countless(catalog):
    """`p402 sim --no-usage`: the OpenAI family sends no usage, streamed or not."""
    with threaded_sim(catalog, usage=False) as running:
        yield running


@pytest.fixture
def config(countless, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[providers.openai]\napi_key = "sim-key"\nbase_url = "{countless.url}/openai/v1"\n')
    return path


def test_the_sim_switch_sends_no_usage(countless):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20}
    headers = {"authorization": "Bearer sim-key"}
    plain = httpx.post(f"{countless.url}/openai/v1/chat/completions", json=body, headers=headers).json()
    assert plain["choices"][0]["message"]["content"] and "usage" not in plain
    streamed = httpx.post(f"{countless.url}/openai/v1/chat/completions", headers=headers,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}).text  # fmt: skip
    assert "[DONE]" in streamed and '"usage":{' not in streamed  # ("usage": null on each chunk, as OpenAI's)


@pytest.mark.parametrize("stream", [True, False])
def test_cli_json_and_the_ledger_bill_an_estimate_and_say_so(config, tmp_path, monkeypatch, capsys, stream):
    monkeypatch.setenv("P402_CONFIG", str(config))
    db = tmp_path / "ledger.db"
    args = ["chat", "--json", "--no-cache", "--db", str(db), "--model", MODEL, *(["--stream"] if stream else []), PROMPT]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usage_estimated"] is True
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] > 0
    assert out["cost_usd"] > 0  # not the $0 a missing usage used to bill
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM requests").fetchone())
    assert row["usage_estimated"] == 1 and row["cost_usd"] == pytest.approx(out["cost_usd"])
    assert row["completion_tokens"] == out["usage"]["completion_tokens"]
    # The console's decision table puts `~` before a cost billed on our count.
    record = record_from_dict(_ledger_dict(row))
    shown = DecisionRow(key=record.id, ts=record.ts, mode="balanced", chosen=MODEL, candidates=1, est_cost=None)
    shown.record, shown.cost = record, record.cost_usd
    cost_cell = decision_cells(shown, Palette("green", "red", "yellow", "blue", "white", "grey50"))[5]
    assert cost_cell.plain.startswith("~$")


async def test_the_gateway_flags_an_estimated_usage_in_its_p402_object(countless, catalog):
    settings = Settings(ConfigFile(), catalog, env={}).point_at(countless.url)
    async with Runtime.open(settings, persist=False) as runtime:
        gateway = await runtime.serve_gateway(port=0)
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            plain = (await client.post("/v1/chat/completions", json=body, headers={"cache-control": "no-cache"})).json()
            streamed = await client.post(
                "/v1/chat/completions", headers={"cache-control": "no-cache"},
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )  # fmt: skip
    assert plain["p402"]["usage_estimated"] is True and plain["usage"]["completion_tokens"] > 0
    assert plain["p402"]["cost_usd"] > 0
    frames = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    last = frames[-1]
    assert last["p402"]["usage_estimated"] is True and last["usage"]["completion_tokens"] > 0
