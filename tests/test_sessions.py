"""Agent sessions: create/list/get/update/delete, spend from the ledger, budgets and status enforced before any upstream call."""

from __future__ import annotations

import asyncio
import math

import pytest
from conftest import ENGINES, SQLITE_ONLY, open_engine_store

from p402_tui.core.errors import BudgetExceededError
from p402_tui.core.hooks import CallContext, RequestRecord, RouteOptions
from p402_tui.core.orchestrator import Orchestrator
from p402_tui.core.types import ChatRequest
from p402_tui.store import queries
from p402_tui.persistence import Persistence
from p402_tui.store.sessions import (
    SessionError,
    SessionInactiveError,
    SessionNotFoundError,
    create_session,
    delete_session,
    get_session,
    SessionNameTakenError,
    list_sessions,
    resolve_session,
    session_messages,
    update_session,
)
from p402_tui.store.store import Store


@pytest.fixture(params=ENGINES)
async def store(request, tmp_path):
    opened = await open_engine_store(request, tmp_path / "sessions.db")
    try:
        yield opened
    finally:
        await opened.aclose()


def hello() -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hello"}])


def charge(store: Store, session_id: str, *amounts: float) -> None:
    for i, amount in enumerate(amounts):
        store.put(queries.INSERT_REQUEST, queries.request_row(
            RequestRecord(id=f"{session_id}-{i}-{amount}", session_id=session_id, provider="openai", model="gpt-4o",
                          cost_usd=amount)))  # fmt: skip


# --- CRUD --------------------------------------------------------------------------------------


async def test_create_get_list_update_delete(store):
    created = await create_session(store, name="researcher", budget_usd=2.5, agent="crawler", metadata={"team": "a"})
    assert created["id"].startswith("ses-")
    assert {k: created[k] for k in ("name", "budget_usd", "spent_usd", "requests", "status", "agent", "metadata")} == {
        "name": "researcher", "budget_usd": 2.5, "spent_usd": 0.0, "requests": 0, "status": "active",
        "agent": "crawler", "metadata": {"team": "a"},
    }  # fmt: skip
    assert created == await get_session(store, created["id"])  # the answer is what was stored, not read back
    other = await create_session(store, name="writer")
    assert other["budget_usd"] is None and other["remaining_usd"] is None
    assert [s["id"] for s in await list_sessions(store)] == [created["id"], other["id"]]

    updated = await update_session(store, created["id"], name="lead researcher", budget_usd=5.0, status="paused",
                                   metadata={"team": "b"})  # fmt: skip
    assert (updated["name"], updated["budget_usd"], updated["status"], updated["metadata"]) == (
        "lead researcher", 5.0, "paused", {"team": "b"})  # fmt: skip
    assert updated["updated"] >= created["updated"]
    assert [s["id"] for s in await list_sessions(store, status="paused")] == [created["id"]]
    assert (await update_session(store, created["id"], budget_usd=None))["budget_usd"] is None

    await delete_session(store, created["id"])
    with pytest.raises(SessionNotFoundError):
        await get_session(store, created["id"])
    assert [s["id"] for s in await list_sessions(store)] == [other["id"]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"name": " "}, "non-empty name"), ({"name": "x", "budget_usd": -1}, "non-negative"),
     ({"name": "x", "budget_usd": float("nan")}, "non-negative"), ({"name": "x", "status": "asleep"}, "status must be"),
     ({"name": "x", "metadata": ["not", "an", "object"]}, "JSON object")],
)  # fmt: skip
async def test_bad_fields_are_refused_with_a_clear_error(store, fields, message):
    with pytest.raises(SessionError, match=message):
        await create_session(store, **fields)
    assert await list_sessions(store) == []


async def test_unknown_sessions_are_not_found(store):
    for action in (get_session(store, "ses-nope"), update_session(store, "ses-nope", name="x"),
                   delete_session(store, "ses-nope")):  # fmt: skip
        with pytest.raises(SessionNotFoundError, match="ses-nope"):
            await action


async def test_a_session_is_found_by_name_too_and_a_name_is_unique_per_key(store):
    made = await create_session(store, name="research")
    assert await resolve_session(store, "research") == made["id"]
    assert await resolve_session(store, made["id"]) == made["id"]
    with pytest.raises(SessionNameTakenError):
        await create_session(store, name=" research ")
    other = await create_session(store, name="other")
    with pytest.raises(SessionNameTakenError):
        await update_session(store, other["id"], name="research")
    # Another key may use the name; that key finds its own session first, the CLI's otherwise.
    keyed = await create_session(store, name="research", api_key_id="key-a")
    assert await resolve_session(store, "research", "key-a") == keyed["id"]
    assert await resolve_session(store, "research", "key-b") == made["id"]
    assert await resolve_session(store, "research") == made["id"]
    with pytest.raises(SessionNotFoundError):
        await resolve_session(store, "nobody")
    with pytest.raises(SessionError, match="look like a session id"):
        await create_session(store, name="ses-0123456789ab")


async def test_spend_and_requests_come_from_the_ledger_and_outlive_the_session(store):
    session = await create_session(store, name="agent", budget_usd=1.0)
    charge(store, session["id"], 0.1, 0.2, 0.3)
    await store.flush()
    current = await get_session(store, session["id"])
    assert current["requests"] == 3 and math.isclose(current["spent_usd"], 0.6)
    assert math.isclose(current["remaining_usd"], 0.4)
    await delete_session(store, session["id"])
    assert await store.scalar("SELECT COUNT(*) FROM requests WHERE session_id = ?", (session["id"],)) == 3


# --- budget and status -----------------------------------------------------------------------------


async def test_a_request_that_would_exceed_the_budget_is_refused(store):
    session = await create_session(store, name="agent", budget_usd=1.0)
    charge(store, session["id"], 0.7)
    await store.flush()
    persistence = Persistence(store)
    await persistence.check_budget(CallContext(session_id=session["id"]), 0.3)  # exactly the budget: allowed
    with pytest.raises(BudgetExceededError) as refused:
        await persistence.check_budget(CallContext(session_id=session["id"]), 0.31)
    assert refused.value.http_status == 402
    assert refused.value.details["budget_usd"] == 1.0
    assert "budget" in str(refused.value)


async def test_spend_still_queued_for_the_writer_counts(store):
    session = await create_session(store, name="agent", budget_usd=1.0)
    persistence = Persistence(store)
    ctx = CallContext(session_id=session["id"])
    await persistence.check_budget(ctx, 0.1)
    record = RequestRecord(id=ctx.request_id, session_id=session["id"], provider="openai", model="gpt-4o", cost_usd=0.95)
    persistence.completed(record, hello(), None, RouteOptions(), ctx)  # queued, not yet committed
    with pytest.raises(BudgetExceededError):
        await persistence.check_budget(CallContext(session_id=session["id"]), 0.1)
    await store.flush()
    with pytest.raises(BudgetExceededError):
        await persistence.check_budget(CallContext(session_id=session["id"]), 0.1)
    await persistence.check_budget(CallContext(session_id=session["id"]), 0.05)


async def test_requests_in_flight_reserve_their_estimate(store):
    session = await create_session(store, name="agent", budget_usd=1.0)
    persistence = Persistence(store)
    first, second = CallContext(session_id=session["id"]), CallContext(session_id=session["id"])
    results = await asyncio.gather(
        persistence.check_budget(first, 0.6), persistence.check_budget(second, 0.6), return_exceptions=True
    )
    assert sum(isinstance(r, BudgetExceededError) for r in results) == 1
    # The one that ran finishes cheaper than estimated: its reservation goes, its real cost stays.
    winner = first if results[0] is None else second
    record = RequestRecord(id=winner.request_id, session_id=session["id"], cost_usd=0.2, provider="openai", model="x")
    persistence.completed(record, hello(), None, RouteOptions(), winner)
    await persistence.check_budget(CallContext(session_id=session["id"]), 0.75)


@pytest.mark.parametrize("status", ["paused", "closed"])
async def test_paused_and_closed_sessions_get_no_answers_at_all(store, status):
    session = await create_session(store, name="agent", budget_usd=100.0, status=status)
    persistence = Persistence(store)
    ctx = CallContext(session_id=session["id"])
    with pytest.raises(SessionInactiveError, match=f"is {status}.*--status active"):
        await persistence.check_budget(ctx, 0.0)
    with pytest.raises(SessionInactiveError):
        await persistence.lookup(hello(), RouteOptions(), ctx)  # not even from the cache


async def test_an_unknown_session_id_is_refused(store):
    with pytest.raises(SessionNotFoundError):
        await Persistence(store).check_budget(CallContext(session_id="ses-missing"), 0.0)


# --- against the simulator ----------------------------------------------------------------------------


@pytest.fixture
async def orchestrator(sim, sim_settings, store):
    running = Orchestrator(sim_settings, hooks=Persistence(store))
    await running.start()
    try:
        yield running
    finally:
        await running.aclose()


async def test_a_tiny_budget_refuses_the_request_and_the_simulator_sees_no_call(orchestrator, store, sim):
    session = await create_session(store, name="frugal", budget_usd=1e-9)
    ctx = CallContext(session_id=session["id"])
    with pytest.raises(BudgetExceededError):
        await orchestrator.complete(hello(), RouteOptions(model="openai/gpt-4o"), ctx)
    assert sim.state.stats()["calls"] == 0
    await store.flush()
    refused = await queries.get_request(store, ctx.request_id)
    assert refused["status"] == "error" and refused["error_kind"] == "budget_exceeded" and refused["cost_usd"] == 0


async def test_a_session_keeps_its_chat_history_and_spend(orchestrator, store, sim):
    session = await create_session(store, name="talker", budget_usd=10.0)
    response = await orchestrator.complete(hello(), RouteOptions(model="openai/gpt-4o"), CallContext(session_id=session["id"]))
    await store.flush()
    history = await session_messages(store, session["id"])
    assert [(m["role"], m["content"]) for m in history] == [("user", "hello"), ("assistant", response.content)]
    assert history[1]["model"] == "openai/gpt-4o"
    current = await get_session(store, session["id"])
    assert current["requests"] == 1 and math.isclose(current["spent_usd"], response.p402.cost_usd)


async def test_older_files_with_two_sessions_of_one_name_keep_both(tmp_path):
    import sqlite3

    from p402_tui.store.db import MIGRATIONS, migration_sql, statements

    path = tmp_path / "v4.db"
    with sqlite3.connect(path) as conn:
        for script in MIGRATIONS[:4]:
            for statement in statements(migration_sql(script, "sqlite")):
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 4")
        for sid in ("ses-000000000001", "ses-000000000002"):
            conn.execute("INSERT INTO agent_sessions (id, name, created, updated) VALUES (?, 'twin', 0, 0)", (sid,))
    async with await Store.open(path) as opened:
        names = sorted(s["name"] for s in await list_sessions(opened))
        assert names == ["twin", "twin (ses-000000000002)"]
        assert await resolve_session(opened, "twin") == "ses-000000000001"


async def test_every_surface_offers_the_same_session_statuses(store):
    from p402_tui.cli import build_parser
    from p402_tui.core.sessions import SESSION_STATUSES
    from p402_tui.gateway.bodies import SessionCreate, SessionPatch
    from p402_tui.gateway.openapi import build_openapi

    assert SESSION_STATUSES == ("active", "paused", "closed")
    document = build_openapi(["openai"])
    assert document["components"]["schemas"]["Session"]["properties"]["status"]["enum"] == list(SESSION_STATUSES)
    listed = document["paths"]["/api/v2/sessions"]["get"]["parameters"][0]
    assert listed["name"] == "status" and listed["schema"]["enum"] == list(SESSION_STATUSES)
    for body in (SessionCreate, SessionPatch):
        assert body.model_json_schema()["properties"]["status"]["enum"] == list(SESSION_STATUSES)
    for action in ("list", "update"):
        args = ["sessions", action, *(["ses-1"] if action == "update" else []), "--status"]
        assert build_parser().parse_args([*args, "paused"]).status == "paused"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*args, "archived"])
    for status in SESSION_STATUSES:
        assert (await create_session(store, name=f"s-{status}", status=status))["status"] == status
    with pytest.raises(SessionError, match="status must be one of active, paused, closed"):
        await create_session(store, name="s-archived", status="archived")
