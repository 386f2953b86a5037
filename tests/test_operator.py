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
