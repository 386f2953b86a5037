"""Issue 5 acceptance through the CLI against a real `p402 sim` process: caching, spend, sessions, recommendations.

Each CLI run is a whole process (imports, and MiniLM when the cache is used), so the
tests run independent commands two at a time and keep the number of runs down.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import run_cli

MODEL = "openai/gpt-4o-mini"


def sim_calls(sim_process) -> int:
    return httpx.get(f"{sim_process['url']}/_sim/stats").json()["calls"]


def p402(sim_process, *args: str, config=None):
    return run_cli(*args, config=config or sim_process["config"])


def p402_json(sim_process, *args: str, config=None):
    run = p402(sim_process, *args, "--json", config=config)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def chat(sim_process, db, prompt: str, *extra: str, config=None) -> dict:
    return p402_json(sim_process, "chat", "--model", MODEL, "--db", str(db), *extra, prompt, config=config)


def both(first, second):
    """Two independent commands at once."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(first), pool.submit(second)
        return a.result(), b.result()


def test_repeat_paraphrase_and_namespace_through_p402_chat(static_table, sim_process, tmp_path):
    db = tmp_path / "p402.db"
    before = sim_calls(sim_process)
    first = chat(sim_process, db, "What is the capital of France?")
    again = chat(sim_process, db, "What is the capital of France?", "--stream")  # streamed requests hit too
    assert sim_calls(sim_process) - before == 1
    assert not first["cached"] and first["cost_usd"] > 0 and first["saved_usd"] == 0
    assert again["cached"] and again["cost_usd"] == 0 and again["saved_usd"] == first["cost_usd"]
    assert again["content"] == first["content"]

    paraphrase, elsewhere = both(
        lambda: chat(sim_process, db, "What's the capital city of France?"),
        lambda: chat(sim_process, db, "What is the capital of France?", "--namespace", "team-b"),
    )
    assert paraphrase["cached"] and paraphrase["content"] == first["content"]
    assert not elsewhere["cached"] and elsewhere["cost_usd"] > 0
    assert sim_calls(sim_process) - before == 2  # only the other namespace went upstream

    with sqlite3.connect(db) as conn:
        ledger = conn.execute("SELECT cached, cost_usd, saved_usd FROM requests WHERE namespace = 'default'").fetchall()
    assert sorted(ledger) == [(0, first["cost_usd"], 0.0), (1, 0.0, first["cost_usd"]), (1, 0.0, first["cost_usd"])]

    stats = p402_json(sim_process, "cache", "stats", "--db", str(db))
    # static vectors find candidates, MiniLM (loaded only when a candidate needs it) confirms
    assert stats["embedder"] == {"name": "static-minilm-53aa5117-v1", "dim": 256, "label": "semantic", "min_threshold": 0.0}
    assert stats["confirmer"] == {"loaded": False} and stats["candidate_threshold"] == 0.74
    built = p402_json(sim_process, "cache", "build", "--db", str(db))  # made by the static_table fixture already
    assert built["built"] is False and built["embedder"] == stats["embedder"]
    assert stats["threshold"] == 0.84
    assert {n["namespace"]: n["entries"] for n in stats["namespaces"]} == {"default": 1, "team-b": 1}
    assert p402_json(sim_process, "cache", "clear", "--namespace", "team-b", "--db", str(db)) == {
        "removed": 1, "namespace": "team-b"}  # fmt: skip


def test_an_expired_entry_misses(sim_process, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(sim_process["config"].read_text() + "\n[cache]\nttl_s = 1\n")
    db = tmp_path / "p402.db"
    before = sim_calls(sim_process)
    chat(sim_process, db, "Give me a haiku about rain.", config=config)
    with sqlite3.connect(db) as conn:
        (created,) = conn.execute("SELECT created FROM semantic_cache").fetchone()
    time.sleep(max(0.0, created + 1.05 - time.time()))  # only until the entry's second is up
    again = chat(sim_process, db, "Give me a haiku about rain.", config=config)
    assert not again["cached"] and sim_calls(sim_process) - before == 2


def ledger(db: str, sql: str) -> list[tuple]:
    """Rows of the store at `db` (either engine), read through the store as the CLI reads it."""
    from p402_tui.store.engine import open_store

    async def read() -> list[tuple]:
        store = await open_store(db, create=False)
        try:
            return [tuple(row.values()) for row in await store.fetchall(sql)]
        finally:
            await store.aclose()

    return asyncio.run(read())


def test_spend_json_totals_equal_the_ledger_per_breakdown_too(sim_process, engine_db):
    db = engine_db
    # --no-cache: the ledger is the subject, and each process then skips loading MiniLM.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: chat(sim_process, db, *args, "--no-cache"), [
            ("Tell me about owls.", "--tag", "birds"),
            ("Tell me about crows.", "--tag", "birds", "--model", "groq/llama-3.1-8b-instant"),
            ("Tell me about bees.",),
        ]))  # fmt: skip
    rows = ledger(db, "SELECT provider || '/' || model AS model, tag, cost_usd FROM requests")
    total = sum(row[-1] for row in rows)
    assert total > 0 and len(rows) == 3

    reports = {}
    with ThreadPoolExecutor(2) as pool:
        for by, report in zip(("provider", "model", "session", "tag", "key", "day"), pool.map(
            lambda by: p402_json(sim_process, "spend", "--by", by, "--db", str(db)),
            ("provider", "model", "session", "tag", "key", "day"),
        )):  # fmt: skip
            reports[by] = report
    for by, report in reports.items():
        assert math.isclose(report["total_usd"], total) and report["requests"] == 3, by
        assert math.isclose(sum(b["cost_usd"] for b in report["breakdown"]), total), by
        assert sum(b["requests"] for b in report["breakdown"]) == 3, by
        assert all({"key", "cost_usd", "requests"} <= set(b) for b in report["breakdown"]), by
    for by, column in (("model", 0), ("tag", 1)):
        by_hand: dict[str, float] = {}
        for row in rows:
            key = row[column] or "(none)"
            by_hand[key] = by_hand.get(key, 0.0) + row[-1]
        got = {b["key"]: b["cost_usd"] for b in reports[by]["breakdown"]}
        assert got.keys() == by_hand.keys() and all(math.isclose(got[k], v) for k, v in by_hand.items())


def test_a_session_with_a_tiny_budget_refuses_and_the_simulator_sees_no_call(sim_process, engine_db):
    db = engine_db
    session = p402_json(sim_process, "sessions", "create", "--name", "frugal", "--budget", "0.000000001", "--db", db)
    before = sim_calls(sim_process)
    run = p402(sim_process, "chat", "--model", MODEL, "--session", session["id"], "--db", db, "Write an essay on tides.")
    assert run.returncode == 1 and run.stderr.startswith("p402: budget_exceeded: ") and run.stderr.count("\n") == 1
    assert sim_calls(sim_process) == before


def test_sessions_commands_and_their_json(sim_process, engine_db):
    db = engine_db

    def sessions(*args: str):
        return p402_json(sim_process, "sessions", *args, "--db", db)

    created = sessions("create", "--name", "researcher", "--budget", "5", "--metadata", '{"team": "a"}')
    assert (created["name"], created["budget_usd"], created["spent_usd"], created["requests"], created["status"]) == (
        "researcher", 5.0, 0.0, 0, "active")  # fmt: skip
    answer = chat(sim_process, db, "Summarise the water cycle.", "--session", created["id"], "--no-cache")
    shown = sessions("show", created["id"])
    assert shown["requests"] == 1 and math.isclose(shown["spent_usd"], answer["cost_usd"])
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]
    paused = sessions("update", created["id"], "--status", "paused", "--budget", "7")
    assert (paused["status"], paused["budget_usd"]) == ("paused", 7.0)
    refused, listed = both(
        lambda: p402(sim_process, "chat", "--model", MODEL, "--session", created["id"], "--db", db, "Again?"),
        lambda: sessions("list"),
    )
    assert refused.returncode == 1 and refused.stderr.startswith("p402: session_inactive: ")
    assert [(s["id"], s["status"]) for s in listed] == [(created["id"], "paused")]
    assert sessions("delete", created["id"]) == {"id": created["id"], "deleted": True}


def test_recommendations_see_repeated_prompts_that_skipped_the_cache(sim_process, engine_db):
    db = engine_db
    first, second = both(lambda: chat(sim_process, db, "List the planets.", "--no-cache"),
                         lambda: chat(sim_process, db, "List the planets.", "--no-cache"))
    (repeats,) = [r for r in p402_json(sim_process, "recommendations", "--db", db) if r["kind"] == "cache_repeats"]
    assert repeats["numbers"]["repeats"] == 1 and repeats["numbers"]["requests"] == 2
    assert math.isclose(repeats["numbers"]["saving_usd"], first["cost_usd"]) and first["cost_usd"] > 0
    assert first["cost_usd"] == second["cost_usd"]  # the same prompt, answered twice


@pytest.mark.parametrize(
    ("args", "message"),
    [(("spend", "--period", "fortnight"), "p402: invalid_period: unknown period"),
     (("sessions", "update", "ses-nope", "--name", "x"), "p402: session_not_found: "),
     # A report on a mistyped --db says so, instead of making a new file and reporting $0 from it.
     (("spend",), "p402: store: no P402 database at"),
     (("recommendations",), "p402: store: no P402 database at")],
)  # fmt: skip
def test_bad_input_is_one_line_on_stderr(sim_process, tmp_path, args, message):
    run = p402(sim_process, *args, "--db", str(tmp_path / "typo" / "p402.db"))
    assert run.returncode == 1 and run.stderr.startswith(message) and run.stderr.count("\n") == 1
    if args[0] in ("spend", "recommendations"):  # reports only read; `sessions` may write
        assert not (tmp_path / "typo").exists()
