"""`p402 spend|recommendations|sessions list --key`: reports on one gateway key's traffic, read from the
ledger that a real gateway (the official OpenAI SDK in front, the simulator behind) wrote."""

from __future__ import annotations

import json

import pytest

from p402_tui.service import keys
from p402_tui.store.sessions import create_session
from conftest import run_cli
from test_gateway import HELLO, runtime  # noqa: F401 - runtime: a fixture
from test_policy import NO_CACHE, admin, api, gateway, sdk  # noqa: F401 - admin, gateway: fixtures

PREMIUM = "openai/gpt-4o"
BUDGET = "openai/gpt-4o-mini"


def cli_json(*args: str) -> object:
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_reports_filter_by_key_id_or_name(runtime, gateway, admin, tmp_path):
    alpha, alpha_secret = await keys.create_key(runtime.store, "alpha", role="user")
    beta, beta_secret = await keys.create_key(runtime.store, "beta", role="user")
    await create_session(runtime.store, name="shared", budget_usd=1.0)  # the operator's: every key sees it
    async with api(gateway, alpha_secret) as a, api(gateway, beta_secret) as b:
        assert (await a.post("/api/v2/sessions", json={"name": "alpha-work"})).status_code == 201
        assert (await b.post("/api/v2/sessions", json={"name": "beta-work"})).status_code == 201
    # alpha asks the same thing of a premium model three times, past the cache: two kinds of advice.
    async with sdk(gateway, alpha_secret) as client:
        for _ in range(3):
            await client.chat.completions.create(
                model=PREMIUM, messages=HELLO, extra_headers=NO_CACHE, extra_body={"p402": {"session_id": "alpha-work"}}
            )
    # beta asks different things of a budget model: nothing to advise.
    async with sdk(gateway, beta_secret) as client:
        for n in range(2):
            await client.chat.completions.create(
                model=BUDGET, messages=[{"role": "user", "content": f"Question {n}?"}], extra_headers=NO_CACHE
            )
    await runtime.store.flush()
    ledger = {
        row["key"]: (row["cost"], row["requests"])
        for row in await runtime.store.fetchall(
            "SELECT api_key_id AS key, SUM(cost_usd) AS cost, COUNT(*) AS requests FROM requests GROUP BY api_key_id"
        )
    }
    assert set(ledger) == {alpha["id"], beta["id"]} and all(cost > 0 for cost, _ in ledger.values())
    db = ("--db", str(tmp_path / "p402.db"), "--include-simulated", "--period", "all")

    for key in (alpha, beta):
        for ref in (key["id"], key["name"]):
            spent = cli_json("spend", "--key", ref, *db)
            assert spent["total_usd"] == pytest.approx(ledger[key["id"]][0])
            assert spent["requests"] == ledger[key["id"]][1]
        by_key = cli_json("spend", "--key", key["name"], "--by", "key", *db)["breakdown"]
        assert [row["key"] for row in by_key] == [key["id"]]

    advice = {item["kind"]: item for item in cli_json("recommendations", "--key", "alpha", *db)}
    assert {"cheaper_model", "cache_repeats"} <= set(advice)
    assert advice["cache_repeats"]["numbers"]["requests"] == 3  # alpha's requests only, not beta's two
    assert advice["cheaper_model"]["numbers"]["cost_usd"] == pytest.approx(ledger[alpha["id"]][0])
    assert cli_json("recommendations", "--key", beta["id"], *db) == []
    assert {"cheaper_model", "cache_repeats"} <= {item["kind"] for item in cli_json("recommendations", *db)}

    sessions = ("sessions", "list", "--db", str(tmp_path / "p402.db"))
    assert [s["name"] for s in cli_json(*sessions, "--key", "alpha")] == ["shared", "alpha-work"]
    assert [s["name"] for s in cli_json(*sessions, "--key", beta["id"])] == ["shared", "beta-work"]
    assert {s["name"] for s in cli_json(*sessions)} == {"shared", "alpha-work", "beta-work"}


async def test_an_unknown_or_ambiguous_key_is_a_one_line_error(runtime, tmp_path):
    await keys.create_key(runtime.store, "twin")
    twins = [(await keys.create_key(runtime.store, "twin"))[0]["id"]]
    db = str(tmp_path / "p402.db")
    for command in (("spend",), ("recommendations",), ("sessions", "list")):
        result = run_cli(*command, "--key", "nobody", "--db", db)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == "p402: key_not_found: no key 'nobody' (by id or name); `p402 keys list` shows them\n"
        result = run_cli(*command, "--key", "twin", "--db", db)
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert "2 keys are named 'twin'" in result.stderr and twins[0] in result.stderr
    # No database yet: no key in it either, and nothing is created by asking.
    missing = tmp_path / "none.db"
    result = run_cli("spend", "--key", "alpha", "--db", str(missing))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and not missing.exists()
