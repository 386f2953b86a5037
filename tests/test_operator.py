"""What an operator sees of a running gateway: its refusals, and its decisions page by page."""

from __future__ import annotations

import httpx
from test_gateway import HELLO, PINNED, assert_openai_error, eventually, gateway, http, runtime, sdk  # noqa: F401

from p402_tui.core.events import RequestRejected
from p402_tui.store.queries import create_key


async def test_every_refusal_is_counted_by_status_and_reason_and_published(gateway, http, runtime):
    rejected: list[RequestRejected] = []
    stop = runtime.bus.listen(rejected.append, kinds={RequestRejected.kind})
    try:
        assert_openai_error(await http.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
        assert_openai_error(await http.post("/v1/chat/completions", json={"model": "nope/none", "messages": HELLO}),
                            404, "model_not_found")
        big = {"messages": [{"role": "user", "content": "x" * (runtime.settings.gateway.max_body_bytes + 1)}]}
        assert_openai_error(await http.post("/v1/chat/completions", json=big), 413, "request_too_large")
        session = (await http.post("/api/v2/sessions", json={"name": "broke", "budget_usd": 0.0})).json()
        over = {"model": PINNED, "messages": HELLO, "p402": {"session_id": session["id"]}}
        assert_openai_error(await http.post("/v1/chat/completions", json=over), 402, "budget_exceeded")
        assert_openai_error(await http.delete("/v1/models"), 405, "method_not_allowed")
        gateway.gateway.auth.ttl_s = 0  # see the new key now rather than after the remembered window
        await create_key(runtime.store, "ops")  # from now on every call needs a key
        assert_openai_error(await http.get("/api/v2/providers"), 401, "missing_api_key")
    finally:
        stop()
    assert [(e.status, e.reason) for e in rejected] == [
        (400, "invalid_json"), (404, "model_not_found"), (413, "request_too_large"), (402, "budget_exceeded"),
        (405, "method_not_allowed"), (401, "missing_api_key"),
    ]
    # Only the budget refusal reached the orchestrator, which recorded it as a failed request.
    assert [e.request_id is not None for e in rejected] == [False, False, False, True, False, False]
    assert rejected[2].path == "/v1/chat/completions" and rejected[2].method == "POST" and rejected[2].message

    metrics = gateway.gateway.metrics.render()
    for status, reason in ((400, "invalid_json"), (401, "missing_api_key"), (402, "budget_exceeded"),
                           (404, "model_not_found"), (405, "method_not_allowed"), (413, "request_too_large")):
        assert f'p402_rejected_total{{status="{status}",reason="{reason}"}} 1' in metrics


def usd_figures(node, key: str = ""):
    """Every `*_usd` number in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from usd_figures(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from usd_figures(v, key)
    elif isinstance(node, float) and key.endswith("_usd"):
        yield node


async def test_decisions_come_a_page_of_summaries_at_a_time_and_each_whole_by_id(http):
    answered = []
    for n in range(25):
        body = {"messages": [{"role": "user", "content": f"Question {n}: what does a router do?"}]}
        answer = await http.post("/v1/chat/completions", json=body, headers={"cache-control": "no-cache"})
        answered.append(answer.json()["p402"])
    newest_first = [p["decision_id"] for p in reversed(answered)]

    response = await http.get("/api/v2/decisions", params={"limit": 20})
    page = response.json()
    assert len(response.content) / 20 < 2048, len(response.content) / 20  # was ~42 kB a decision
    assert [d["id"] for d in page["data"]] == newest_first[:20]
    assert page["has_more"] is True and page["first_id"] == newest_first[0] and page["last_id"] == newest_first[19]
    summary = page["data"][0]
    assert summary["status"] == "ok" and summary["chosen"] and summary["model"] == f"{answered[-1]['provider']}/{answered[-1]['model']}"
    assert summary["cost_usd"] == answered[-1]["cost_usd"] and summary["latency_ms"] > 0
    assert summary["candidates"] > 1 and summary["excluded"] >= 0 and summary["mode"] == "balanced"
    assert "options" not in summary and isinstance(summary["candidates"], int)

    rest = (await http.get("/api/v2/decisions", params={"limit": 20, "before": page["last_id"]})).json()
    assert [d["id"] for d in rest["data"]] == newest_first[20:25] and rest["has_more"] is False

    whole = (await http.get(f"/api/v2/decisions/{summary['id']}")).json()
    assert len(whole["candidates"]) == summary["candidates"] and len(whole["excluded"]) == summary["excluded"]
    assert {"score", "components", "est_cost_usd"} <= set(whole["candidates"][0]) and whole["options"]["mode"] == "balanced"
    assert_openai_error(await http.get("/api/v2/decisions/dec-nowhere"), 404, "decision_not_found")
    assert assert_openai_error(await http.get("/api/v2/decisions", params={"before": "dec-nowhere"}), 400)["param"] == "before"

    # Dollars in JSON carry 12 significant digits at most: sums read as the decimals they are.
    spend = (await http.get("/api/v2/analytics/spend", params={"period": "today", "by": "model"})).json()
    figures = [*usd_figures(page), *usd_figures(whole), *usd_figures(spend), *usd_figures(answered)]
    assert figures and all(float(f"{v:.12g}") == v for v in figures)


async def test_without_a_store_the_ring_gives_the_same_summaries(runtime):
    from p402_tui.gateway.app import Gateway
    from p402_tui.gateway.server import start_gateway

    running = await start_gateway(Gateway(runtime.orchestrator, settings=runtime.settings), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=5) as http:
            ids = []
            for _ in range(3):
                answer = await http.post("/v1/chat/completions", json={"model": PINNED, "messages": HELLO},
                                         headers={"cache-control": "no-cache"})
                ids.append(answer.json()["p402"]["decision_id"])
            page = (await http.get("/api/v2/decisions", params={"limit": 2})).json()
            assert [d["id"] for d in page["data"]] == ids[::-1][:2] and page["has_more"]
            assert page["data"][0]["status"] == "ok" and page["data"][0]["model"] == PINNED
            rest = (await http.get("/api/v2/decisions", params={"before": page["last_id"]})).json()
            assert [d["id"] for d in rest["data"]] == ids[:1] and not rest["has_more"]
            assert (await http.get(f"/api/v2/decisions/{ids[0]}")).json()["candidates"]
    finally:
        await running.stop()


# --- the attached console ------------------------------------------------------------------------


async def test_the_attached_console_starts_with_what_the_gateway_did_before_it(fresh_sim_settings, tmp_path):
    from test_attach import chat_body, wait_for
    from test_attach import gateway as serving
    from test_tui_fixtures import SIZE

    from p402_tui.tui.app import ConsoleApp
    from p402_tui.tui.attach import open_remote
    from p402_tui.tui.widgets.decisions import DecisionsTable

    async with serving(fresh_sim_settings, db_path=tmp_path / "p402.db") as (_runtime, running):
        async with httpx.AsyncClient(base_url=running.url) as other:
            before = [(await other.post("/v1/chat/completions", json=chat_body(f"asked before, {n}"))).json()["p402"]
                      for n in range(3)]
            async with open_remote(running.url, None) as source:
                assert set(source.health()) == set(source.providers()) and source.providers()  # before going live
                app = ConsoleApp(source, refresh_interval=0.25)
                async with app.run_test(size=SIZE) as pilot:
                    await wait_for(lambda: all(p["decision_id"] in app.state.decisions for p in before))
                    first = before[0]
                    row = app.state.decisions[first["decision_id"]]
                    assert row.status == "ok" and row.cost == first["cost_usd"] and row.candidates > 1
                    assert row.served_by == f"{first['provider']}/{first['model']}"
                    await wait_for(lambda: app.state.summary.requests_today == 3)  # the ledger's spend
                    table = app.screen.query_one(DecisionsTable)
                    await wait_for(lambda: table.index_of(first["decision_id"]) is not None)

                    # A refusal after attaching: a row of its own, counted in the error rate.
                    assert (await other.post("/v1/chat/completions", content=b"{oops")).status_code == 400
                    await wait_for(lambda: any(r.status == "refused" for r in app.state.decisions.values()))
                    refused = next(r for r in app.state.decisions.values() if r.status == "refused")
                    assert refused.chosen == "400 invalid_json" and app.state.rates(refused.ts + 1)[1] > 0  # the second it fell in

                    # A decision from before opens whole, read from /api/v2/decisions/{id}.
                    table.focus()
                    table.move_cursor(table.index_of(first["decision_id"]))
                    await pilot.press("enter")
                    await wait_for(lambda: getattr(app.screen, "decision", None) is not None)
                    assert len(app.screen.decision["candidates"]) == row.candidates


def test_the_attach_key_comes_from_p402_key(monkeypatch):
    from p402_tui.cli import build_parser

    monkeypatch.setenv("P402_KEY", "p402-from-env")
    assert build_parser().parse_args(["console", "--attach", "http://127.0.0.1:4020"]).key == "p402-from-env"
    args = build_parser().parse_args(["console", "--attach", "http://127.0.0.1:4020", "--key", "p402-given"])
    assert args.key == "p402-given"
    monkeypatch.delenv("P402_KEY")
    assert build_parser().parse_args(["console"]).key is None


def test_every_event_kind_rebuilds_from_its_wire_form():
    from p402_tui.core.events import AttemptFailed, CacheHit, HealthChanged, SpendUpdated
    from p402_tui.client import event_from_dict

    sent = [
        AttemptFailed(request_id="req-1", decision_id="dec-1", provider="groq", model="m", error_kind="timeout",
                      error="slow", will_retry=True),
        RequestRejected(status=413, reason="request_too_large", method="POST", path="/v1/chat/completions"),
        HealthChanged(provider="groq", status="down", previous="healthy", reason="5 errors", circuit="open", retry_at=9.0),
        SpendUpdated(provider="groq", model="m", cost_usd=0.25, session_id="ses-1"),
        CacheHit(request_id="req-2", match="semantic", similarity=0.97, saved_usd=0.01),
    ]
    for event in sent:  # each was dropped as unreadable on the attached console before
        back = event_from_dict(event.kind, event.to_dict())
        assert type(back) is type(event) and back.to_dict() == event.to_dict()


# --- the catalog on the command line -------------------------------------------------------------


def test_models_mark_the_retired_ones(catalog):
    from datetime import date

    from test_cli import ok_json

    from conftest import run_cli

    today = date.today().isoformat()
    rows = {r["id"]: r for r in ok_json("models", "--json")}
    retired = {m.id for m in catalog.models.values() if m.deprecated_on and m.deprecated_on <= today}
    assert retired and {i for i, r in rows.items() if r["retired"]} == retired
    some = sorted(retired)[0]
    table = run_cli("models", "--provider", some.split("/")[0]).stdout
    line = next(line for line in table.splitlines() if line.startswith(some + " "))
    assert line.rstrip().endswith(f"retired {catalog.models[some].deprecated_on}")


def test_compare_prices_a_chat_turn_when_not_told_the_size():
    from test_cli import ok_json

    from conftest import run_cli

    assert ok_json("compare", "--json", "--top", "3") == ok_json(
        "compare", "--json", "--top", "3", "--input-tokens", "1000", "--output-tokens", "500")
    result = run_cli("compare", "--top", "3")
    assert result.returncode == 0 and result.stderr.startswith("one call of 1,000 tokens in and 500 out")
    assert result.stdout.startswith("MODEL ")
