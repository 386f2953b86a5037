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
