"""`p402_tui.client` against a running gateway (`p402 serve --sim` in its own process)."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from helpers import Served

from p402_tui.client import P402, AsyncP402, GatewayError
from p402_tui.core.events import DecisionBrief, RequestCompleted, RouteDecided
from p402_tui.service import P402Service, Service

HI = [{"role": "user", "content": "hello through the client"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served("--sim", "--db", str(tmp_path_factory.mktemp("client") / "p402.db"))
    try:
        yield served.url
    finally:
        served.stop()


async def test_chat_plain_and_streamed_with_p402s_options(served):
    async with AsyncP402(served) as p402:
        await p402.create_session("client-chat", budget_usd=10.0)
        answer = await p402.chat(HI, mode="cost", require=["chat"], exclude=["openai"], max_cost=0.5,
                                 session="client-chat", tag="client-test", extra={"max_tokens": 40})
        assert answer.content and answer.p402 is not None and answer.p402.provider != "openai"
        assert answer.p402.cost_usd > 0 and answer.usage.completion_tokens > 0
        stream = p402.stream(HI, model="p402/quality", session="client-chat", tag="client-test")
        text = await stream.text()
        assert text and stream.meta.provider and stream.meta.decision_id
        assert stream.decision is not None and stream.decision.id == stream.meta.decision_id
        assert stream.decision.mode == "quality" and len(stream.decision.candidates) > 1
        session = await p402.session("client-chat")  # a session is named by its name or its id
        assert session["requests"] == 2 and session["spent_usd"] > 0
        requests = await p402.session_requests("client-chat")
        assert {r["tag"] for r in requests} == {"client-test"}
        assert [m["role"] for m in await p402.session_messages("client-chat")] == ["user", "assistant"] * 2
        with pytest.raises(GatewayError) as refused:
            await p402.chat(HI, mode="cheapest")
        assert refused.value.status == 400 and "mode" in refused.value.message


async def test_sessions_spend_recommendations_and_decisions(served):
    async with AsyncP402(served) as p402:
        made = await p402.create_session("client-budget", budget_usd=5.0, agent="tests", metadata={"team": "a"})
        assert made["name"] == "client-budget" and made["budget_usd"] == 5.0
        changed = await p402.update_session("client-budget", status="paused", metadata={"team": "b"})
        assert changed["status"] == "paused" and changed["metadata"] == {"team": "b"}
        assert "client-budget" in {s["name"] for s in await p402.sessions(status="paused")}
        await p402.delete_session(made["id"])
        with pytest.raises(GatewayError) as gone:
            await p402.session(made["id"])
        assert gone.value.status == 404 and gone.value.code == "session_not_found"
        answer = await p402.chat(HI, tag="spend-check", cache=False)
        spend = await p402.spend("today", by="tag")
        assert spend["requests"] >= 1 and "spend-check" in {row["key"] for row in spend["breakdown"]}
        assert isinstance(await p402.recommendations("7d"), list)
        page = await p402.decisions(limit=2)
        assert len(page["data"]) == 2 and page["has_more"] in (True, False)
        newest = page["data"][0]
        assert newest["id"] == answer.p402.decision_id and newest["status"] in ("ok", "pending")
        whole = await p402.decision(newest["id"])
        assert whole is not None and len(whole["candidates"]) == newest["candidates"]
        assert await p402.decision("dec-nothing") is None
        assert "openai/gpt-4o-mini" in await p402.models()


async def test_the_live_event_stream_arrives_typed(served):
    async with AsyncP402(served) as p402:
        opened = asyncio.Event()
        seen: list = []

        async def follow() -> None:
            async for event in p402.events(kinds=["route_decided", "request_completed"], on_open=opened.set):
                seen.append(event)
                if isinstance(event, RequestCompleted):
                    return

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(opened.wait(), 10)
        answer = await p402.chat(HI, cache=False)  # a cached answer is not routed: no decision to see
        await asyncio.wait_for(follower, 10)
        decided = next(e for e in seen if isinstance(e, RouteDecided))
        assert isinstance(decided.decision, DecisionBrief) and decided.decision.id == answer.p402.decision_id
        assert seen[-1].record.decision_id == answer.p402.decision_id
        with pytest.raises(GatewayError, match="unknown event kind"):
            async for _ in p402.events(kinds=["gossip"]):
                pass


def test_the_sync_client_does_the_same(served):
    with P402(served) as p402:
        answer = p402.chat(HI, mode="speed", cache=False)
        assert answer.content and answer.p402.decision_id
        stream = p402.stream(HI, cache=False)
        pieces = [chunk.content for chunk in stream]
        assert "".join(pieces) and stream.meta.cost_usd > 0
        assert p402.decision(answer.p402.decision_id)["id"] == answer.p402.decision_id
        assert p402.spend()["requests"] >= 2
    with pytest.raises(GatewayError, match="cannot connect"):
        with P402("http://127.0.0.1:9") as nowhere:
            nowhere.sessions()


def test_the_client_and_the_local_service_answer_one_protocol():
    wanted = {name: inspect.signature(f) for name, f in vars(P402Service).items() if inspect.iscoroutinefunction(f)}
    assert {"sessions", "spend", "recommendations", "decisions", "decision"} <= set(wanted)
    for implementation in (Service, AsyncP402):
        for name, signature in wanted.items():
            own = inspect.signature(getattr(implementation, name))
            for parameter in signature.parameters.values():  # every argument the protocol names, taken the same way
                assert parameter.name in own.parameters, (implementation.__name__, name, parameter.name)
                assert own.parameters[parameter.name].kind == parameter.kind, (implementation.__name__, name)
