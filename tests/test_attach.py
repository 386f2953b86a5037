"""`p402 console --attach`: the console on a gateway served over loopback, fed by the gateway's own events."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from test_tui_fixtures import SIZE, T0
from textual.widgets import Input

from p402_tui.core.config import Settings
from p402_tui.core.errors import P402Error
from p402_tui.core.events import DecisionBrief, RequestCompleted, RouteDecided
from p402_tui.core.hooks import RequestRecord, RouteOptions
from p402_tui.core.router import RouteDecision
from p402_tui.core.types import Attempt, ChatMessage, ChatRequest
from p402_tui.runtime import Runtime
from p402_tui.store.queries import create_key
from p402_tui.tui.app import ConsoleApp
from p402_tui.client import event_from_dict
from p402_tui.core.sse import iter_sse
from p402_tui.tui.attach import AttachClient, GatewayError, RemoteSource, gateway_url, open_remote
from p402_tui.tui.screens.chat import AnswerView, ChatScreen
from p402_tui.tui.screens.dashboard import DashboardScreen
from p402_tui.tui.source import LocalSource
from p402_tui.tui.widgets.decisions import DecisionsTable

from conftest import free_port, run_cli


async def wait_for(condition, timeout: float = 30.0, step: float = 0.02) -> None:
    # Generous: a met condition returns at once, and a machine busy with the other test worker is slow.
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


@asynccontextmanager
async def gateway(settings: Settings, *, db_path: Path | None = None, port: int = 0):
    """A gateway over the real orchestrator (and a store when `db_path` is given) on a free loopback port."""
    if db_path is not None:
        settings.cache.enabled = False
    async with Runtime.open(settings, db_path=db_path, persist=db_path is not None) as runtime:
        running = await runtime.serve_gateway("127.0.0.1", port)
        yield runtime, running


def chat_body(text: str, **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


async def test_decisions_made_by_another_client_show_in_the_attached_dashboard(fresh_sim_settings):
    async with gateway(fresh_sim_settings) as (_runtime, running):
        source = RemoteSource(AttachClient(running.url))
        await source.start()
        try:
            await source.client.wait_until_up()
            app = ConsoleApp(source, clock=lambda: T0, refresh_interval=0.25)
            async with app.run_test(size=SIZE) as pilot:
                await pilot.pause()
                assert isinstance(app.screen, DashboardScreen)
                async with httpx.AsyncClient(base_url=running.url) as other:
                    plain = await other.post("/v1/chat/completions", json=chat_body("one from elsewhere"))
                    async with other.stream("POST", "/v1/chat/completions",
                                            json=chat_body("two, streamed", stream=True)) as streamed:
                        assert streamed.status_code == 200
                        await streamed.aread()
                assert plain.status_code == 200
                decision_id = plain.json()["p402"]["decision_id"]
                table = app.screen.query_one(DecisionsTable)
                await wait_for(lambda: table.row_count == 2 and all(
                    r.status == "ok" for r in app.state.decisions.values()))
                row = app.state.decisions[decision_id]
                assert row.candidates > 1 and row.cost and row.cost > 0
                assert row.served_by == f"{plain.json()['p402']['provider']}/{plain.json()['p402']['model']}"
                assert source.label == f"attached to {running.url}"
                assert f"attached to {running.url}" in str(app.screen.query_one("#status-line").render())
                # Enter on the row opens its decision, read from the attached event stream.
                table.move_cursor(row=table.index_of(decision_id))
                await pilot.press("enter")
                await pilot.pause()
                assert type(app.screen).__name__ == "DecisionScreen"
                assert (await source.decision(decision_id))["id"] == decision_id
        finally:
            await source.aclose()


async def test_the_link_goes_down_says_so_and_comes_back(fresh_sim_settings):
    # (state, what the header would show, the error) at each change, as it was then: the link moves on
    # (down, connecting, down ...) faster than a loaded machine may poll it.
    said: list[tuple[str, str, str | None]] = []
    async with gateway(fresh_sim_settings) as (runtime, running):
        port = running.port
        client = AttachClient(running.url, backoff_first_s=0.05, backoff_max_s=0.2)
        client.watch(lambda link: said.append((link.state, link.describe(), link.error)))
        async with client:
            await client.wait_until_up()
            await running.stop()
            runtime.gateways.remove(running)
            await wait_for(lambda: any(state == "down" for state, _, _ in said))
            assert all(error for state, _, error in said if state == "down")
            again = await runtime.serve_gateway("127.0.0.1", port)
            await wait_for(lambda: client.link.state == "up")
            async with httpx.AsyncClient(base_url=again.url) as other:
                await other.post("/v1/chat/completions", json=chat_body("after the outage"))
            await wait_for(lambda: len(client.decisions) == 1)
    states = [state for state, _, _ in said]
    assert states[0] == "up" and "down" in states and states[-1] == "up"
    assert any(text.startswith("link down, retrying in ") for state, text, _ in said if state == "down")
    assert said[-1][1] == f"attached to {running.url}"


def test_the_retry_countdown_reads_plainly():
    client = AttachClient("http://127.0.0.1:9")
    client.link.state, client.link.retry_at = "down", 100.0
    assert client.link.describe(now=96.6) == "link down, retrying in 3s"
    client.link.state = "up"
    assert client.link.describe() == "attached to http://127.0.0.1:9"
    assert "key" not in repr(AttachClient("http://127.0.0.1:9", key="p402-secret")) and "secret" not in repr(client)


async def test_a_gateway_with_keys_wants_the_key(fresh_sim_settings, tmp_path):
    async with gateway(fresh_sim_settings, db_path=tmp_path / "p402.db") as (runtime, running):
        _, secret = await create_key(runtime.store, "console")
        async with AttachClient(running.url, backoff_first_s=0.05) as keyless:
            await wait_for(lambda: keyless.link.state == "down")
            assert "401" in keyless.link.error
            assert secret not in keyless.link.error
        async with AttachClient(running.url, key=secret) as keyed:
            await keyed.wait_until_up()
            assert (await keyed.api.sessions()) == []


async def test_attaching_with_a_missing_or_wrong_key_is_an_error_not_a_retry(fresh_sim_settings, tmp_path):
    async with gateway(fresh_sim_settings, db_path=tmp_path / "p402.db") as (runtime, running):
        _, secret = await create_key(runtime.store, "console")
        for key, hint in ((None, "give it with --key"), ("p402-wrong", "check --key")):
            with pytest.raises(GatewayError, match="401") as refused:
                async with open_remote(running.url, key):
                    pass
            assert hint in str(refused.value) and "p402 keys create" in str(refused.value)
        async with open_remote(running.url, secret) as source:
            await source.client.wait_until_up()
    # Nobody there yet is not an error: the console comes up and the link retries.
    async with open_remote(f"http://127.0.0.1:{free_port()}", None) as source:
        assert source.client.link.state in ("connecting", "down")


async def test_sessions_spend_and_winners_go_through_the_gateway_api(fresh_sim_settings, tmp_path):
    async with gateway(fresh_sim_settings, db_path=tmp_path / "p402.db") as (runtime, running):
        source = RemoteSource(AttachClient(running.url))
        await source.start()
        try:
            link = source.chat_link
            session_id = await link.create_session("compare: remote", {"kind": "compare"})
            await link.set_metadata(session_id, {"kind": "compare", "comparisons": [{"winner": "groq/x"}]})
            async with httpx.AsyncClient(base_url=running.url) as other:
                response = await other.post("/v1/chat/completions",
                                            json=chat_body("charge it", p402={"session_id": session_id}))
                assert response.status_code == 200
            await runtime.store.flush()
            sessions = await source.sessions()
            assert [s["id"] for s in sessions] == [session_id]
            assert sessions[0]["metadata"]["comparisons"][0]["winner"] == "groq/x"
            assert sessions[0]["requests"] == 1
            detail = await source.session(session_id)  # the drill-down an attached console opens
            assert detail["session"]["id"] == session_id
            (ledger_row,) = detail["requests"]
            assert ledger_row["session_id"] == session_id and ledger_row["status"] == "ok"
            assert ledger_row["cost_usd"] == pytest.approx(response.json()["p402"]["cost_usd"])
            assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]
            assert detail["messages"][0]["content"] == "charge it"
            summary = await source.summary()
            assert summary.requests_today == 1 and summary.today_usd == pytest.approx(response.json()["p402"]["cost_usd"])
            models = await link.models()  # the model picker's list: catalog models, not the router's names
            assert len(models) > 100 and "openai/gpt-4o-mini" in models
            assert not [m for m in models if m.startswith("p402/")]
            await wait_for(lambda: source.providers() and source.health())
        finally:
            await source.aclose()


async def test_stored_decisions_show_the_api_they_came_through_at_start_and_on_attach(fresh_sim_settings, tmp_path):
    """Rows read back from the store name the API of their request, as live rows do: in a console
    started on the store and in one attached to a gateway, both after the requests were made."""
    db = tmp_path / "p402.db"
    async with gateway(fresh_sim_settings, db_path=db) as (runtime, running):
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as other:
            sent = {
                "messages": await other.post("/v1/messages", json={"model": "auto", "max_tokens": 32,
                                                                   "messages": [{"role": "user", "content": "hi"}]}),
                "responses": await other.post("/v1/responses", json={"model": "auto", "input": "hi"}),
                "": await other.post("/v1/chat/completions", json=chat_body("hi")),  # chat names no API
            }  # fmt: skip
        assert all(r.status_code == 200 for r in sent.values()), {k: r.text for k, r in sent.items()}
        decided = {api: r.headers.get("p402-decision-id") or r.json()["p402"]["decision_id"] for api, r in sent.items()}
        await runtime.store.flush()
        listed = {d["id"]: d for d in (await runtime.service.decisions(limit=10))["data"]}
        assert [listed[decided[api]]["api"] for api in ("messages", "responses", "")] == [
            "messages", "responses", "chat_completions"]
        assert listed[decided["messages"]]["source"] == "gateway:messages"

    async def shows_each_api(source) -> None:
        app = ConsoleApp(source, clock=lambda: T0, refresh_interval=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await wait_for(lambda: all(d in app.state.decisions for d in decided.values()))
            assert {api: app.state.decisions[d].api for api, d in decided.items()} == {a: a for a in decided}
            table = app.screen.query_one(DecisionsTable)
            await wait_for(lambda: table.index_of(decided["messages"]) is not None)
            assert table.cell_at(table.index_of(decided["messages"]), "mode").plain.endswith(" messages")

    async with Runtime.open(fresh_sim_settings, db_path=db, persist=True) as started:  # `p402 console` on the store
        await shows_each_api(LocalSource(started))
    async with gateway(fresh_sim_settings, db_path=db) as (_runtime, running):  # `p402 console --attach`
        remote = RemoteSource(AttachClient(running.url))
        await remote.start()
        try:
            await shows_each_api(remote)
        finally:
            await remote.aclose()


async def test_chat_through_the_gateway_streams_and_escape_cancels_the_upstream(fresh_sim, fresh_sim_settings):
    async with gateway(fresh_sim_settings) as (_runtime, running):
        source = RemoteSource(AttachClient(running.url))
        await source.start()
        try:
            await source.client.wait_until_up()
            app = ConsoleApp(source, view="chat", clock=lambda: T0)
            async with app.run_test(size=SIZE, notifications=True) as pilot:
                await wait_for(lambda: isinstance(app.screen, ChatScreen) and app.screen.query("#chat-input"))
                screen = app.screen
                await wait_for(lambda: len(screen.query_one("#chat-model")._options) > 100)
                box = screen.query_one("#chat-input", Input)
                box.value = "through the gateway"
                await pilot.press("enter")
                await wait_for(lambda: screen.query(AnswerView) and not screen.streaming)
                await pilot.pause()
                answer = screen.query(AnswerView).last()
                assert len(answer.markdown.source.split()) >= 20
                route = str(answer.route.content)
                assert route.startswith("→ ") and " · balanced · " in route and "1 attempt" in route
                assert str(answer.cost.content).startswith("$") and " tok" in str(answer.cost.content)
                assert fresh_sim.state.streams.completed == 1
                with httpx.Client(base_url=fresh_sim.url) as sim:  # the next answer hangs after three pieces
                    sim.post("/_sim/faults", json={"kind": "timeout", "after_tokens": 3}).raise_for_status()
                box.value = "and now hang"
                await pilot.press("enter")
                await wait_for(lambda: len(screen.query(AnswerView)) == 2 and screen.query(AnswerView).last().markdown.source)
                await pilot.press("escape")
                await wait_for(lambda: not screen.streaming)
                await wait_for(lambda: fresh_sim.state.streams.cancelled == 1)
                assert screen.query(AnswerView).last().border_subtitle == "stopped"
        finally:
            await source.aclose()


def test_attach_wants_an_http_url():
    result = run_cli("console", "--attach", "ftp://somewhere")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "--attach wants the gateway's address" in result.stderr
    for bad in ("notaurl", "http://", "http://127.0.0.1:99999"):
        with pytest.raises(P402Error, match="--attach wants the gateway's address"):
            gateway_url(bad)
    assert gateway_url("https://gateway.example:4020/") == "https://gateway.example:4020"


# --- the wire, back to objects ------------------------------------------------------------------


async def test_sse_frames_are_parsed_and_keep_alives_skipped():
    async def pieces():  # split anywhere, as reads of a connection are
        text = b': subscribed\n\nevent: route_decided\r\ndata: {"a":\ndata: 1}\n\n: keep-alive\n\ndata: [DONE]\n\n'
        for at in range(0, len(text), 7):
            yield text[at : at + 7]

    assert [frame async for frame in iter_sse(pieces())] == [("route_decided", '{"a":\n1}'), (None, "[DONE]")]


def test_events_rebuild_as_the_objects_they_were(fresh_sim_settings):
    from p402_tui.core.orchestrator import Orchestrator

    orchestrator = Orchestrator(fresh_sim_settings)
    decision = orchestrator.route(ChatRequest(messages=[ChatMessage(role="user", content="hi")]), RouteOptions(mode="cost"))
    sent = decision.to_dict()
    rebuilt = RouteDecision.from_dict(sent)
    assert rebuilt.to_dict() == sent
    assert rebuilt.chosen.id == decision.chosen.id and len(rebuilt.candidates) == len(decision.candidates)
    assert [c.to_dict() for c in rebuilt.candidates] == sent["candidates"]  # built on demand, each as it was
    assert [c.id for c in rebuilt.plan()] == [c.id for c in decision.plan()]
    assert [e.to_dict() for e in rebuilt.excluded] == sent["excluded"]
    event = event_from_dict("route_decided", RouteDecided(decision=decision).to_dict())
    assert isinstance(event, RouteDecided) and event.decision.to_dict() == decision.to_dict()
    record = RequestRecord(id="req-1", provider="groq", model="m", cost_usd=0.5, decision_id=decision.id,
                           attempts=[Attempt("openai", "x", "rate_limited", "slow down")])
    back = event_from_dict("request_completed", RequestCompleted(record=record).to_dict())
    assert back.record.to_dict() == record.to_dict()
    assert event_from_dict("something_new", {"ts": 1.0}) is None


@pytest.fixture
def served(tmp_path):
    """`p402 serve --sim` in its own process, as an operator would start it; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "p402_tui.cli", "serve", "--sim", "--port", str(port), "--db", str(tmp_path / "p402.db")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"p402 serve --sim did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_attached_to_p402_serve_sim_the_dashboard_shows_another_clients_decisions(served):
    source = RemoteSource(AttachClient(served))
    await source.start()
    try:
        await source.client.wait_until_up()
        app = ConsoleApp(source, clock=lambda: T0, refresh_interval=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            async with httpx.AsyncClient(base_url=served, timeout=30) as other:
                response = await other.post("/v1/chat/completions", json=chat_body("hello from another client"))
            assert response.status_code == 200
            decision_id = response.json()["p402"]["decision_id"]
            table = app.screen.query_one(DecisionsTable)
            await wait_for(lambda: table.index_of(decision_id) is not None
                           and app.state.decisions[decision_id].status == "ok", timeout=15)
            assert app.state.decisions[decision_id].candidates > 1
    finally:
        await source.aclose()


async def test_the_event_stream_sends_decisions_in_brief_and_each_is_read_whole_by_id(fresh_sim_settings, tmp_path):
    async with gateway(fresh_sim_settings, db_path=tmp_path / "p402.db") as (_runtime, running):
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as http:
            async with http.stream("GET", "/api/v2/events", params={"kinds": "route_decided"}) as events:
                frames = iter_sse(events.aiter_raw())
                answer = await http.post("/v1/chat/completions", json=chat_body("in brief, please"))
                kind, data = await anext(frames)
            decision_id = answer.json()["p402"]["decision_id"]
            assert kind == "route_decided" and len(data) < 1024  # whole, a decision is ~40 kB
            brief = json.loads(data)["decision"]
            listed = (await http.get("/api/v2/decisions", params={"limit": 1})).json()["data"][0]
            assert brief.keys() == listed.keys() and brief["id"] == listed["id"] == decision_id
            assert brief["chosen"] == listed["chosen"] and brief["candidates"] == listed["candidates"] > 1
            event = event_from_dict(kind, json.loads(data))
            assert isinstance(event.decision, DecisionBrief) and event.decision.chosen == brief["chosen"]
            whole = (await http.get(f"/api/v2/decisions/{decision_id}")).json()
            assert len(whole["candidates"]) == brief["candidates"]
