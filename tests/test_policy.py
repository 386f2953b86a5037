"""Gateway keys with roles and policies, through real HTTP: the official OpenAI SDK for model calls,
httpx for /api/v2, the real simulator behind the gateway, the real store under it."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time

import httpx
import openai
import pytest

from p402_tui.core.hooks import RouteOptions
from p402_tui.core.router import NOT_ALLOWED
from p402_tui.core.types import ChatRequest
from p402_tui.service import keys
from p402_tui.store.sessions import create_session
from conftest import run_cli
from test_gateway import HELLO, assert_openai_error, runtime, settings_for  # noqa: F401 - runtime: a fixture

PINNED = "openai/gpt-4o-mini"
NO_CACHE = {"cache-control": "no-cache"}


@pytest.fixture
async def gateway(runtime):
    running = await runtime.serve_gateway("127.0.0.1", 0)
    yield running
    await running.stop()


@pytest.fixture
async def admin(runtime):
    _, secret = await keys.create_key(runtime.store, "root", role="admin")
    return secret


def sdk(gateway, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)


def api(gateway, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gateway.url, headers={"authorization": f"Bearer {secret}"}, timeout=10)


async def test_roles_decide_what_every_route_returns(runtime, gateway, admin):
    alice_key, alice = await keys.create_key(runtime.store, "alice", role="user")
    bob_key, bob = await keys.create_key(runtime.store, "bob", role="user")
    _, viewer = await keys.create_key(runtime.store, "watcher", role="viewer")
    async with api(gateway, alice) as a, api(gateway, bob) as b, api(gateway, viewer) as v, api(gateway, admin) as root:
        created = await a.post("/api/v2/sessions", json={"name": "alice-work", "budget_usd": 1.0})
        assert created.status_code == 201
        session = created.json()["id"]
        async with sdk(gateway, alice) as client:
            answer = await client.chat.completions.create(
                model=PINNED, messages=HELLO, extra_body={"p402": {"session_id": "alice-work"}}
            )
        decision_id = answer.model_extra["p402"]["decision_id"]

        # Another user's session is as good as missing, whatever the route.
        for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/requests"), ("GET", "/messages")]:
            body = {"status": "paused"} if method == "PATCH" else None
            response = await b.request(method, f"/api/v2/sessions/{session}{path}", json=body)
            assert_openai_error(response, 404, "session_not_found")
        # The operator's sessions (made without a key) every key finds by name, and sees.
        shared = await create_session(runtime.store, name="shared", budget_usd=1.0)
        assert [s["id"] for s in (await b.get("/api/v2/sessions")).json()["data"]] == [shared["id"]]
        assert (await b.get("/api/v2/sessions/shared")).status_code == 200
        assert_openai_error(await b.get(f"/api/v2/decisions/{decision_id}"), 404, "decision_not_found")
        assert (await b.get("/api/v2/decisions")).json()["data"] == []
        spend = (await b.get("/api/v2/analytics/spend", params={"by": "key"})).json()
        assert spend["requests"] == 0 and spend["breakdown"] == []
        async with sdk(gateway, bob) as client:
            with pytest.raises(openai.NotFoundError):  # nor charge it, nor write into its history
                await client.chat.completions.create(model=PINNED, messages=HELLO, extra_body={"p402": {"session_id": session}})

        # Its owner sees it all.
        assert [s["id"] for s in (await a.get("/api/v2/sessions")).json()["data"]] == [session, shared["id"]]
        assert (await a.get(f"/api/v2/sessions/{session}/messages")).json()["data"]
        assert [d["id"] for d in (await a.get("/api/v2/decisions")).json()["data"]] == [decision_id]
        assert (await a.get(f"/api/v2/decisions/{decision_id}")).status_code == 200

        # A viewer reads everything and calls no model.
        assert [s["id"] for s in (await v.get("/api/v2/sessions")).json()["data"]] == [session, shared["id"]]
        assert (await v.get(f"/api/v2/decisions/{decision_id}")).status_code == 200
        assert (await v.get("/metrics")).status_code == 200
        async with sdk(gateway, viewer) as client:
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await client.chat.completions.create(model=PINNED, messages=HELLO)
            assert refused.value.body["code"] == "permission_denied"
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="auto", messages=HELLO, stream=True)
        assert_openai_error(await v.post("/api/v2/sessions", json={"name": "mine"}), 403, "permission_denied")
        assert_openai_error(await v.delete(f"/api/v2/sessions/{session}"), 403, "permission_denied")

        # Keys are the admin's alone; the admin sees every key's data.
        assert_openai_error(await a.get("/api/v2/keys"), 403, "permission_denied")
        assert_openai_error(await v.get("/api/v2/keys"), 403, "permission_denied")
        listed = (await root.get("/api/v2/keys")).json()["data"]
        assert {k["name"] for k in listed} == {"root", "alice", "bob", "watcher"}
        assert all("key" not in k and "hash" not in k for k in listed)
        assert (await root.get(f"/api/v2/sessions/{session}")).status_code == 200
        by_key = (await root.get("/api/v2/analytics/spend", params={"by": "key"})).json()["breakdown"]
        assert [row["key"] for row in by_key] == [alice_key["id"]]
        assert bob_key["id"] not in {row["key"] for row in by_key}
        assert (await root.get("/api/v2/analytics/spend", params={"key": alice_key["id"]})).json()["requests"] == 1
        assert (await root.get("/api/v2/analytics/spend", params={"key": bob_key["id"]})).json()["requests"] == 0
        assert (await b.get("/api/v2/analytics/spend", params={"key": alice_key["id"]})).json()["requests"] == 0
        assert (await b.get("/api/v2/analytics/recommendations")).json()["data"] == []  # from bob's traffic: none
        assert (await root.get("/api/v2/analytics/recommendations", params={"key": alice_key["id"]})).status_code == 200
        assert_openai_error(await root.get("/api/v2/analytics/recommendations", params={"key": "x' OR 1"}), 400)
        alices = (await root.get("/api/v2/sessions", params={"key": alice_key["id"]})).json()["data"]
        assert [s["id"] for s in alices] == [session, shared["id"]]
        assert (await root.delete(f"/api/v2/sessions/{session}")).status_code == 200


async def test_a_user_key_streams_only_its_own_events(runtime, gateway, admin):
    _, alice = await keys.create_key(runtime.store, "alice", role="user")
    bob_key, bob = await keys.create_key(runtime.store, "bob", role="user")
    seen: list[dict] = []

    async def listen() -> None:
        async with api(gateway, bob) as b, b.stream("GET", "/api/v2/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1].get("kind") == "request_completed":
                        return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.3)
    async with sdk(gateway, alice) as a_client, sdk(gateway, bob) as b_client:
        await a_client.chat.completions.create(model=PINNED, messages=HELLO, extra_headers=NO_CACHE)
        await asyncio.sleep(0.3)  # alice's events are published before bob asks
        await b_client.chat.completions.create(model=PINNED, messages=HELLO, extra_headers=NO_CACHE)
    await asyncio.wait_for(listener, 5)
    completed = [e for e in seen if e.get("kind") == "request_completed"]
    assert [e["record"]["api_key_id"] for e in completed] == [bob_key["id"]]
    assert {e["kind"] for e in seen} <= {"route_decided", "request_completed", "spend_updated"}


async def _estimate_and_cost(runtime, gateway, admin, body: dict) -> tuple[float, float]:
    """The router's worst-case estimate for this request, and what it really costs."""
    decision = runtime.orchestrator.route(ChatRequest.model_validate(body), RouteOptions(model=PINNED))
    async with sdk(gateway, admin) as client:
        answer = await client.chat.completions.create(**body, extra_headers=NO_CACHE)
    return decision.est_cost_usd, answer.model_extra["p402"]["cost_usd"]


async def test_concurrent_requests_cannot_overspend_a_key_budget(runtime, gateway, admin):
    body = {"model": PINNED, "messages": HELLO, "max_tokens": 24}
    estimate, cost = await _estimate_and_cost(runtime, gateway, admin, body)
    assert 0 < cost <= estimate * (1 + 1e-9) and estimate <= 1.5 * cost  # max_tokens caps the answer: worst case
    budget = 10.5 * cost  # ten requests' real cost, never room for an eleventh estimate
    record, secret = await keys.create_key(runtime.store, "runaway", policy={"budget_usd": budget, "budget_period": "day"})

    async with sdk(gateway, secret) as client:
        async def one() -> str:
            try:
                await client.chat.completions.create(**body, extra_headers=NO_CACHE)
                return "ok"
            except openai.APIStatusError as error:
                assert error.status_code == 402 and error.body["code"] == "budget_exceeded", error.body
                return "refused"

        outcomes = await asyncio.gather(*(one() for _ in range(50)))
        assert 1 <= outcomes.count("ok") <= 10
        served = outcomes.count("ok")
        while served < 10:  # what the burst left of the budget, one request at a time
            await client.chat.completions.create(**body, extra_headers=NO_CACHE)
            served += 1
        with pytest.raises(openai.APIStatusError) as eleventh:
            await client.chat.completions.create(**body, extra_headers=NO_CACHE)
    assert eleventh.value.status_code == 402
    assert eleventh.value.body["code"] == "budget_exceeded" and eleventh.value.body["type"] == "insufficient_quota"
    assert "day budget" in eleventh.value.body["message"] and "resets at" in eleventh.value.body["message"]

    await runtime.store.flush()
    spent = await runtime.store.scalar("SELECT SUM(cost_usd) FROM requests WHERE api_key_id = ?", (record["id"],))
    ok = await runtime.store.scalar("SELECT COUNT(*) FROM requests WHERE api_key_id = ? AND status = 'ok'", (record["id"],))
    assert ok == 10
    assert spent <= budget  # reserved on the estimate, which is never below the real cost
    shown = await keys.show_key(runtime.store, record["id"])
    assert shown["usage"]["spent_usd"] == pytest.approx(spent) and shown["usage"]["remaining_usd"] < estimate


async def test_rpm_refuses_the_sixth_request_until_the_window_moves(runtime, gateway, admin):
    _, secret = await keys.create_key(runtime.store, "script", policy={"rpm": 5, "tpm": 100_000})
    engine = gateway.gateway.policy
    async with sdk(gateway, secret) as client:
        for left in (4, 3, 2, 1, 0):
            raw = await client.chat.completions.with_raw_response.create(model=PINNED, messages=HELLO)
            assert raw.headers["x-ratelimit-limit-requests"] == "5"
            assert raw.headers["x-ratelimit-remaining-requests"] == str(left)
            assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100_000
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=PINNED, messages=HELLO)
        headers = limited.value.response.headers
        assert 55 <= int(headers["retry-after"]) <= 60
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.value.body["code"] == "rate_limit_exceeded"
        real = time.monotonic
        engine.clock = lambda: real() + 61  # the minute has passed
        answer = await client.chat.completions.create(model=PINNED, messages=HELLO)
        assert answer.choices[0].message.content


async def test_tpm_holds_back_requests_on_their_estimate(runtime, gateway, admin):
    _, secret = await keys.create_key(runtime.store, "tokens", policy={"tpm": 200})
    async with sdk(gateway, secret) as client:
        await client.chat.completions.create(model=PINNED, messages=HELLO, max_tokens=100, extra_headers=NO_CACHE)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=PINNED, messages=HELLO, max_tokens=150, extra_headers=NO_CACHE)
    assert limited.value.response.headers["x-ratelimit-limit-tokens"] == "200"
    assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_model_rules_pin_and_auto(runtime, gateway, admin):
    _, secret = await keys.create_key(runtime.store, "openai-only", policy={"models": ["openai/*"]})
    async with sdk(gateway, secret) as client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="anthropic/claude-haiku-5-5", messages=HELLO)
        assert refused.value.body["code"] == "model_not_allowed" and refused.value.body["param"] == "model"
        for mode in ("cost", "quality", "speed", "balanced"):
            answer = await client.chat.completions.create(
                model="auto", messages=HELLO, extra_headers=NO_CACHE, extra_body={"p402": {"mode": mode}}
            )
            assert answer.model_extra["p402"]["provider"] == "openai", mode
    async with api(gateway, admin) as root:
        decision = (await root.get(f"/api/v2/decisions/{answer.model_extra['p402']['decision_id']}")).json()
    assert all(c["provider"] == "openai" for c in decision["candidates"])
    assert any(e["reason"] == NOT_ALLOWED for e in decision["excluded"])


async def test_key_defaults_and_tier_cap_apply_to_every_request(runtime, gateway, admin):
    _, secret = await keys.create_key(
        runtime.store, "cheap", policy={"max_tier": "budget", "defaults": {"mode": "quality", "tag": "team-a"}}
    )
    async with sdk(gateway, secret) as client:
        answer = await client.chat.completions.create(model="auto", messages=HELLO, extra_headers=NO_CACHE)
    await runtime.store.flush()
    decision_id = answer.model_extra["p402"]["decision_id"]
    row = await runtime.store.fetchone("SELECT tag, mode FROM requests WHERE decision_id = ?", (decision_id,))
    assert row == {"tag": "team-a", "mode": "quality"}
    chosen = runtime.orchestrator.catalog.models[f"{answer.model_extra['p402']['provider']}/{answer.model_extra['p402']['model']}"]
    assert chosen.tier == "budget"


async def test_guardrails_redact_before_the_prompt_leaves_and_deny_refuses(runtime, gateway, admin, sim):
    record, secret = await keys.create_key(
        runtime.store, "careful", policy={"redact": ["email", "card"], "deny": ["(?i)drop\\s+table"]}
    )
    prompt = "Email jane.doe@example.com the receipt for card 4111 1111 1111 1111, not 4111 1111 1111 1112."
    async with sdk(gateway, secret) as client:
        answer = await client.chat.completions.create(
            model=PINNED, messages=[{"role": "user", "content": prompt}], extra_headers=NO_CACHE
        )
        with pytest.raises(openai.BadRequestError) as denied:
            await client.chat.completions.create(model=PINNED, messages=[{"role": "user", "content": "DROP  TABLE users"}])
    assert answer.choices[0].message.content
    assert denied.value.body["code"] == "guardrail" and "DROP" not in denied.value.body["message"]
    arrived = [p for p in sim.state.prompts if "receipt" in p]
    assert arrived and all("jane.doe@example.com" not in p and "4111 1111 1111 1111" not in p for p in arrived)
    assert "[REDACTED:email]" in arrived[-1] and "[REDACTED:card]" in arrived[-1]
    assert "4111 1111 1111 1112" in arrived[-1]  # fails Luhn: not a card number
    assert not any("DROP" in p for p in sim.state.prompts)
    await runtime.store.flush()
    hits = await runtime.store.fetchall(
        "SELECT rule, action, count FROM guardrail_hits WHERE api_key_id = ? ORDER BY rule", (record["id"],)
    )
    assert hits == [
        {"rule": "card", "action": "redact", "count": 1},
        {"rule": "deny:1", "action": "deny", "count": 1},
        {"rule": "email", "action": "redact", "count": 1},
    ]


async def test_spend_by_key_matches_the_ledger_and_no_key_is_kept_anywhere(runtime, gateway, admin, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    made = [admin]
    for name in ("one", "two"):
        _, secret = await keys.create_key(runtime.store, name, policy={"budget_usd": 5.0, "rpm": 100})
        made.append(secret)
        async with sdk(gateway, secret) as client:
            for _ in range(2 if name == "one" else 3):
                await client.chat.completions.create(model="auto", messages=HELLO, extra_headers=NO_CACHE)
    async with api(gateway, admin) as root:
        created = (await root.post("/api/v2/keys", json={"name": "three", "role": "viewer"})).json()
        made.append(created["key"])
        metrics = (await root.get("/metrics")).text
        assert_openai_error(await root.post("/api/v2/keys", json={"name": "x", "policy": {"rpm": 0}}), 400)
        bad = await root.get("/v1/models", headers={"authorization": f"Bearer {made[1]}x"})
        assert made[1] not in bad.text
    await runtime.store.flush()
    rows = await runtime.store.fetchall(
        "SELECT api_key_id AS key, SUM(cost_usd) AS cost FROM requests GROUP BY api_key_id ORDER BY cost DESC"
    )
    db = tmp_path / "p402.db"
    result = run_cli("spend", "--by", "key", "--json", "--db", str(db), "--include-simulated")
    assert result.returncode == 0, result.stderr
    breakdown = {row["key"]: row["cost_usd"] for row in json.loads(result.stdout)["breakdown"]}
    assert breakdown == pytest.approx({row["key"]: row["cost"] for row in rows})
    assert len(breakdown) == 2  # the two keys that made requests
    files = b"".join(p.read_bytes() for p in tmp_path.glob("p402.db*"))
    for secret in made:
        assert secret.encode() not in files
        assert secret not in metrics
        assert secret not in caplog.text


async def test_revocation_and_changes_reach_other_processes_within_a_second(runtime, gateway, admin, tmp_path):
    record, secret = await keys.create_key(runtime.store, "leaving")
    db = str(tmp_path / "p402.db")
    async with sdk(gateway, secret) as client:
        await client.models.list()
        updated = run_cli("keys", "update", record["id"], "--models", "openai/*", "--db", db)
        assert updated.returncode == 0, updated.stderr
        await asyncio.sleep(1.0)
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="anthropic/claude-haiku-5-5", messages=HELLO)
        revoked = run_cli("keys", "revoke", record["id"], "--db", db)
        assert revoked.returncode == 0, revoked.stderr
        await asyncio.sleep(1.0)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    _, other = await keys.create_key(runtime.store, "here")
    async with api(gateway, admin) as root, sdk(gateway, other) as client:
        await client.models.list()
        key_id = next(k["id"] for k in (await root.get("/api/v2/keys")).json()["data"] if k["name"] == "here")
        assert (await root.delete(f"/api/v2/keys/{key_id}")).json()["active"] is False
        with pytest.raises(openai.AuthenticationError):  # at once in the process that revoked it
            await client.models.list()


def test_cli_keys_create_prints_the_key_once_and_validates(tmp_path):
    db = str(tmp_path / "k.db")
    made = run_cli("keys", "create", "--name", "ci", "--role", "viewer", "--budget-usd", "2", "--budget-period", "day",
                   "--rpm", "5", "--models", "openai/*", "--max-tier", "mid", "--redact", "email", "--json", "--db", db)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert {"id", "name", "role", "key"} <= set(key) and key["role"] == "viewer"
    assert key["policy"] == {"budget_usd": 2.0, "budget_period": "day", "rpm": 5, "models": ["openai/*"],
                             "max_tier": "mid", "redact": ["email"]}
    shown = run_cli("keys", "show", key["id"], "--json", "--db", db)
    assert key["key"] not in shown.stdout and json.loads(shown.stdout)["usage"]["budget_usd"] == 2.0
    listed = run_cli("keys", "list", "--db", db)
    assert "ci" in listed.stdout and key["key"] not in listed.stdout
    bad = run_cli("keys", "create", "--name", "x", "--redact", "nope=(", "--db", db)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "redact" in bad.stderr
    missing = run_cli("keys", "update", "key-000000000000", "--rpm", "3", "--db", db)
    assert missing.returncode != 0 and "key_not_found" in missing.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM gateway_keys WHERE hash LIKE ?", (f"%{key['key']}%",)).fetchone()[0] == 0


async def test_a_streamed_answer_settles_the_key_budget_like_a_whole_one(runtime, gateway, admin):
    record, secret = await keys.create_key(runtime.store, "streamer", policy={"budget_usd": 1.0, "tpm": 100_000})
    engine = gateway.gateway.policy
    async with sdk(gateway, secret) as client:
        stream = await client.chat.completions.create(
            model=PINNED, messages=HELLO, stream=True, stream_options={"include_usage": True}, extra_headers=NO_CACHE
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage.total_tokens > 0
    await runtime.store.flush()
    scope = f"key:{record['id']}"
    usage = await runtime.store.fetchone("SELECT spent, reserved FROM budget_usage WHERE scope = ?", (scope,))
    cost = await runtime.store.scalar("SELECT SUM(cost_usd) FROM requests WHERE api_key_id = ?", (record["id"],))
    assert engine.budgets.holds == {} and usage["reserved"] == pytest.approx(0.0, abs=1e-12)
    assert usage["spent"] == pytest.approx(cost) and cost > 0  # the estimate gave way to the real cost
    assert await runtime.store.scalar("SELECT COUNT(*) FROM budget_holds") == 0
    tokens = await runtime.store.scalar("SELECT tokens FROM rate_windows WHERE scope = ?", (scope,))
    assert tokens == chunks[-1].usage.total_tokens


def test_no_key_reaches_the_logs_of_p402_serve_or_its_database(tmp_path, sim_process):
    from helpers import Served

    db = tmp_path / "p402.db"
    env = {"P402_CONFIG": str(sim_process["config"])}
    made = []
    for role in ("admin", "user", "viewer"):
        result = run_cli("keys", "create", "--name", role, "--role", role, "--rpm", "3", "--json", "--db", str(db), env=env)
        assert result.returncode == 0, result.stderr
        made.append(json.loads(result.stdout)["key"])
    served = Served("--db", str(db), env=env)
    try:
        with openai.OpenAI(base_url=f"{served.url}/v1", api_key=made[1], max_retries=0) as client:
            for _ in range(4):  # the fourth is over the key's rpm
                try:
                    client.chat.completions.create(model=PINNED, messages=HELLO)
                except openai.RateLimitError:
                    pass
        for secret in made:
            httpx.get(f"{served.url}/v1/models", headers={"authorization": f"Bearer {secret}x"})  # not a key: 401
        metrics = httpx.get(f"{served.url}/metrics", headers={"authorization": f"Bearer {made[2]}"}).text
        assert 'p402_rejected_total{status="429"' in metrics
    finally:
        served.stop()
    logs = "".join(served.stderr)
    files = b"".join(p.read_bytes() for p in tmp_path.glob("p402.db*"))
    for secret in made:
        assert secret not in logs and secret not in metrics
        assert secret.encode() not in files
