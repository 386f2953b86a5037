"""The console driven by keys through Textual's Pilot: every screen and every binding."""

from __future__ import annotations

import asyncio

import pytest
from test_tui_fixtures import CATALOG, SIZE, T0, pin_timezone, run_command, sample_state
from textual.command import CommandPalette

from p402_tui.core.catalog import parse_catalog
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.core.events import EventBus, RequestCompleted, RouteDecided
from p402_tui.core.hooks import RequestRecord
from p402_tui.core.orchestrator import Orchestrator
from p402_tui.core.types import ChatMessage, ChatRequest
from p402_tui.runtime import Runtime
from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.screens.dashboard import DashboardScreen
from p402_tui.tui.screens.decision import DecisionScreen
from p402_tui.tui.screens.help import HelpScreen
from p402_tui.tui.screens.session import SessionScreen
from p402_tui.tui.source import LocalSource
from p402_tui.tui.widgets.pane import FilterBar, Pane
from p402_tui.tui.widgets.spend import SpendChart
from p402_tui.tui.widgets.status import StatusLine

pin_timezone()


def fixed_app(**kwargs) -> ConsoleApp:
    return ConsoleApp(state=sample_state(), clock=lambda: T0, **kwargs)


def table(app: ConsoleApp, pane: str):
    return app.screen.query_one(f"#{pane}", Pane).table


def rows(app: ConsoleApp, pane: str) -> list[str]:
    t = table(app, pane)
    return t.keys()


async def wait_until(pilot, condition, timeout: float = 5.0) -> None:
    """Poll the app until `condition()` holds: live views settle in their own time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


# --- the dashboard ------------------------------------------------------------------------


async def test_dashboard_shows_all_four_panes_with_data():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        assert table(app, "decisions").row_count == 37
        assert table(app, "sessions").row_count == 4
        assert table(app, "health").row_count == 4
        assert [name for name, _, _ in app.screen.query_one(SpendChart).legend] == ["anthropic", "openai", "groq", "mistral"]
        newest = rows(app, "decisions")[0]
        assert newest == "req-cached"  # newest first
        status = str(app.screen.query_one(StatusLine).render())
        assert "P402 Console" in status and "live every 0.5s" in status


async def test_enter_opens_the_decision_and_escape_returns():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        failover = next(r for r in app.state.decisions.values() if r.attempts > 1)
        decisions = table(app, "decisions")
        decisions.move_cursor(row=decisions.index_of(failover.key))
        await pilot.press("enter")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, DecisionScreen) and screen.row is failover
        candidates = rows(app, "candidates")
        assert candidates[0] == failover.chosen and len(candidates) == failover.candidates
        attempts = table(app, "attempts")
        assert attempts.row_count == 2
        assert attempts.cell_at(0, "result").plain == "failed"
        assert attempts.cell_at(0, "kind").plain == "server_error"
        assert attempts.cell_at(1, "result").plain == "ok"
        summary = str(screen.query_one("#decision-summary").render())
        assert "served by" in summary and failover.served_by in summary
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)


async def test_decision_shows_every_exclusion_with_its_reason():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        row = next(r for r in app.state.decisions.values() if r.decision is not None and r.decision.excluded)
        app.push_screen(DecisionScreen(row))
        await pilot.pause()
        excluded = table(app, "excluded")
        reasons = {excluded.cell_at(i, "model").plain: excluded.cell_at(i, "reason").plain for i in range(excluded.row_count)}
        assert reasons == {e.id: e.reason for e in row.decision.excluded}
        await pilot.press("backspace")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)


async def test_enter_on_a_session_opens_it():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("2")
        sessions = table(app, "sessions")
        assert app.focused is sessions
        sessions.move_cursor(row=sessions.index_of("ses-review"))
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SessionScreen)
        summary = str(app.screen.query_one("#session-summary").render())
        assert "code-review-agent" in summary and "81%" in summary
        await pilot.press("r")  # reload with no source: nothing to read, nothing breaks
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)


async def test_a_session_with_more_requests_than_shown_says_so():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        session = {**app.state.sessions["ses-review"], "requests": 330}
        app.push_screen(SessionScreen(session))
        await pilot.pause()
        screen = app.screen
        screen.requests = [{"id": f"req-{i}", "ts": T0 - i, "provider": "groq", "model": "llama-fast", "cost_usd": 0.001}
                           for i in range(200)]  # what the sources send: the latest 200
        screen.show_session()
        requests = screen.query_one("#requests", Pane)
        assert requests.border_title.startswith("Requests · first 200 of 330 · ")  # as the dashboard says a cap
        await pilot.press("1", "s")  # a new sort keeps the note
        assert "first 200 of 330" in requests.border_title and "sort Mode" in requests.border_title
        screen.session = {**session, "requests": 200}
        screen.show_session()
        assert "first" not in requests.border_title


async def test_slash_filters_the_focused_table_and_escape_clears_it():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        errors = [k for k, r in app.state.decisions.items() if r.status == "error"]
        await pilot.press("slash")
        bar = app.screen.query_one("#decisions", Pane).query_one(FilterBar)
        assert bar.display and app.focused is bar
        await pilot.press(*"status:error")
        await pilot.pause()
        assert sorted(rows(app, "decisions")) == sorted(errors)
        assert "/status:error" in app.screen.query_one("#decisions", Pane).border_title
        await pilot.press("enter")  # keep the filter, back to the table
        assert app.focused is table(app, "decisions")
        assert sorted(rows(app, "decisions")) == sorted(errors)
        await pilot.press("slash", "escape")
        await pilot.pause()
        assert table(app, "decisions").row_count == 37
        assert not bar.display


async def test_a_capped_table_says_so_in_its_title_rather_than_reading_as_filtered():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        pane = app.screen.query_one("#decisions", Pane)
        assert pane.border_title.startswith("Decisions · 37 · ")
        table(app, "decisions").max_rows = 10  # the dashboard draws the first 200 of however many there are
        app.screen.show_state(app.state)
        assert table(app, "decisions").row_count == 10
        assert pane.border_title.startswith("Decisions · first 10 of 37 · sort Time ↓")
        ok = sum(1 for r in app.state.decisions.values() if r.status == "ok")
        assert ok > 10
        await pilot.press("slash", *"status:ok")
        await pilot.pause()
        assert pane.border_title.startswith(f"Decisions · first 10 of {ok}/37 · /status:ok")
        table(app, "decisions").max_rows = 200
        app.screen.show_state(app.state)
        assert pane.border_title.startswith(f"Decisions · {ok}/37 · /status:ok")


async def test_typing_in_the_filter_never_triggers_shortcuts():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("slash", *"quiz sort", "space", "z")
        await pilot.pause()
        assert app.is_running and not app.paused and app.screen.maximized is None
        assert app.screen.query_one(FilterBar).value == "quiz sort z"


async def test_sort_keys_cycle_columns_and_reverse():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        decisions = table(app, "decisions")
        assert (decisions.sort_column, decisions.sort_reverse) == ("time", True)
        await pilot.press("s")
        assert decisions.sort_column == "mode"
        modes = [decisions.cell_at(i, "mode").plain for i in range(decisions.row_count)]
        assert modes == sorted(modes, reverse=True)
        await pilot.press("S")
        modes = [decisions.cell_at(i, "mode").plain for i in range(decisions.row_count)]
        assert modes == sorted(modes)
        assert "sort Mode ↑" in app.screen.query_one("#decisions", Pane).border_title


async def test_clicking_a_header_sorts_by_that_column():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        health = table(app, "health")
        x = sum(c.width + 2 for c in health.spec[:5]) + 1  # inside the sixth header, "Err"
        await pilot.click(health, offset=(x, 0))
        assert health.sort_column == "errors"
        rates = [health.cell_at(i, "errors").sort_value for i in range(health.row_count)]
        assert rates == sorted(rates)


async def test_z_zooms_the_focused_pane_and_z_or_escape_restores():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("3", "z")
        assert app.screen.maximized is app.screen.query_one("#health", Pane)
        await pilot.press("z")
        assert app.screen.maximized is None
        await pilot.press("z", "escape")
        assert app.screen.maximized is None


async def test_a_zoomed_pane_fits_the_screen():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        for key, pane in zip("1234", ("decisions", "sessions", "health", "spend")):
            await pilot.press(key, "z")
            await pilot.pause()
            assert app.screen.maximized is app.screen.query_one(f"#{pane}", Pane)
            assert app.screen.maximized.region.width == SIZE[0], pane  # its right border on screen
            await pilot.press("z")
        await pilot.press("4", "z")
        await pilot.pause()
        totals = app.screen.query_one("#spend-totals")
        assert totals.region.right <= SIZE[0]


async def test_an_80x24_terminal_shows_decisions_and_the_spend_totals():
    app = fixed_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        decisions = table(app, "decisions")
        assert decisions.size.height - 1 >= 5  # rows under the header, not the header alone
        chart = app.screen.query_one(SpendChart)
        assert not chart.display  # no room beside the totals: they take the pane, z shows the chart
        assert "today" in str(app.screen.query_one("#spend-totals").render())
        await pilot.press("4", "z")
        await pilot.pause()
        assert chart.display and chart.size.width >= 20
        await wait_until(pilot, lambda: bool(chart.legend))  # drawn for its new size


def test_a_chart_with_spend_but_no_room_does_not_say_there_is_none():
    from p402_tui.tui.widgets.spend import render_chart

    state = sample_state()
    text, legend = render_chart(state.spend, T0, 10, 10, ["#ff0000"])
    assert "no spend" not in text.plain and "z zooms" in text.plain and legend == []


async def test_number_keys_and_tab_move_between_panes():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.focused is table(app, "decisions")
        await pilot.press("4")
        assert isinstance(app.focused, SpendChart)
        await pilot.press("3")
        assert app.focused is table(app, "health")
        await pilot.press("1", "tab")
        assert app.focused is table(app, "sessions")
        await pilot.press("shift+tab")
        assert app.focused is table(app, "decisions")


async def test_filter_on_a_chart_pane_says_it_cannot():
    app = fixed_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        await pilot.press("4", "slash")
        await pilot.pause()
        assert any("no table to filter" in n.message for n in app._notifications)


async def test_plus_and_minus_set_the_refresh_interval():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("plus")
        assert app.refresh_interval == 0.25
        await pilot.press("plus")
        assert app.refresh_interval == 0.25  # the fastest step
        await pilot.press("minus", "minus", "minus")
        assert app.refresh_interval == 2.0
        await pilot.pause()
        assert "live every 2s" in str(app.screen.query_one(StatusLine).render())


async def test_question_mark_opens_help_listing_every_view_key():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        from p402_tui.tui.screens.help import help_sections

        keys = {keys for _, rows in help_sections() for keys, _ in rows}
        for key in ("/", "z", "space", "ctrl+p", "escape backspace", "enter", "status:error", "q", "?", "+ =", "d"):
            assert key in keys
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)


async def test_command_palette_reaches_console_actions():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await run_command(pilot, "live: pause")
        await pilot.pause()
        assert app.paused
        await pilot.press("ctrl+p")
        await run_command(pilot, "zoom health")
        await pilot.pause()
        assert app.screen.maximized is app.screen.query_one("#health", Pane)


async def test_palette_lists_a_command_for_every_pane_action():
    from p402_tui.tui.commands import ConsoleCommands

    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        names = [name for name, _, _ in ConsoleCommands(app.screen).commands()]
        for expected in ("View: Dashboard", "Live: pause", "Live: refresh every 2s", "Help: keys and filters",
                         "Pane: focus Decisions", "Pane: zoom Spend", "Filter: Sessions", "Sort: Provider health by p95",
                         "Open: selected decision", "Open: selected session"):  # fmt: skip
            assert expected in names


async def test_a_theme_recolours_cells():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        before = table(app, "decisions").cell_at(1, "status").style
        app.theme = "nord"
        await pilot.pause()
        after = table(app, "decisions").cell_at(1, "status").style
        assert str(before) != str(after)


@pytest.mark.parametrize("theme", ["ansi-dark", "ansi-light"])
async def test_the_terminal_palette_themes_draw_every_screen(theme):
    # Their colours are Textual names (ansi_red) that Rich cannot parse: every coloured cell would raise.
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.theme = theme
        await pilot.pause()
        assert app.is_running and isinstance(app.screen, DashboardScreen)
        assert table(app, "decisions").cell_at(1, "status").style
        await pilot.press("enter")
        await pilot.pause()
        assert app.is_running and isinstance(app.screen, DecisionScreen)
        assert "Candidates" in app.export_screenshot()


async def test_q_quits_at_once():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


async def test_ctrl_q_quits_even_from_the_filter():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("slash", "ctrl+q")
        await pilot.pause()
        assert not app.is_running


# --- live: a real bus, a real orchestrator (nothing is called) -------------------------------


@pytest.fixture
def live_runtime():
    settings = Settings(ConfigFile(), parse_catalog(CATALOG), env={}).point_at("http://127.0.0.1:9")
    bus = EventBus()
    return Runtime(settings=settings, bus=bus, orchestrator=Orchestrator(settings, bus=bus))


def publish_request(runtime: Runtime, n: int, mode: str = "cost", gateway: str | None = None) -> str:
    from p402_tui.core.hooks import RouteOptions

    decision = runtime.orchestrator.route(ChatRequest(messages=[ChatMessage(role="user", content=f"q{n}")]), RouteOptions(mode=mode))
    runtime.bus.publish(RouteDecided(decision=decision, gateway=gateway))
    chosen = decision.chosen
    record = RequestRecord(id=f"req-{n}", provider=chosen.provider, model=chosen.model, cost_usd=chosen.est_cost_usd,
                           latency_ms=200.0, decision_id=decision.id, mode=mode)  # fmt: skip
    runtime.bus.publish(RequestCompleted(record=record, gateway=gateway))
    return decision.id


async def test_the_gateway_column_and_field_appear_once_two_gateways_made_decisions(live_runtime):
    app = ConsoleApp(LocalSource(live_runtime), refresh_interval=0.25)
    async with app.run_test(size=SIZE) as pilot:
        decisions = table(app, "decisions")
        first = publish_request(live_runtime, 1, gateway="edge/w1")
        await wait_until(pilot, lambda: decisions.row_count == 1)
        assert "gateway" not in decisions.column_keys  # one gateway: the table as it always was
        second = publish_request(live_runtime, 2, gateway="edge/w2")
        await wait_until(pilot, lambda: decisions.row_count == 2 and "gateway" in decisions.column_keys)
        shown = {decisions.key_at(i): decisions.cell_at(i, "gateway").plain for i in range(2)}
        assert shown == {first: "edge/w1", second: "edge/w2"}
        assert decisions.cell_at(0, "status").plain == "ok"  # the other columns stay where they were
        decisions.move_cursor(row=decisions.index_of(second))
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, DecisionScreen)
        assert "gateway edge/w2" in str(app.screen.query_one("#decision-summary").render())


async def test_unlabelled_decisions_show_no_gateway(live_runtime):
    app = ConsoleApp(LocalSource(live_runtime), refresh_interval=0.25)
    async with app.run_test(size=SIZE) as pilot:
        decisions = table(app, "decisions")
        publish_request(live_runtime, 1)
        await wait_until(pilot, lambda: decisions.row_count == 1)
        assert "gateway" not in decisions.column_keys and not app.state.gateways
        await pilot.press("enter")
        await pilot.pause()
        assert "gateway" not in str(app.screen.query_one("#decision-summary").render())


async def test_live_events_arrive_batched_and_space_pauses(live_runtime):
    app = ConsoleApp(LocalSource(live_runtime), refresh_interval=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: table(app, "health").row_count == 4)  # every usable provider, before traffic
        first = [publish_request(live_runtime, i) for i in range(50)]
        await wait_until(pilot, lambda: table(app, "decisions").row_count == 50)
        assert rows(app, "decisions")[0] == first[-1]
        renders = app.renders
        assert renders < 10  # 100 events, a handful of redraws
        await pilot.press("space")
        assert app.paused
        assert "PAUSED" in str(app.screen.query_one(StatusLine).render())
        publish_request(live_runtime, 99)
        await pilot.pause(0.6)
        assert table(app, "decisions").row_count == 50  # frozen while paused ...
        assert len(app.state.decisions) == 51  # ... but still counting
        await pilot.press("space")
        await wait_until(pilot, lambda: table(app, "decisions").row_count == 51)


async def test_cursor_stays_on_its_row_while_rows_arrive(live_runtime):
    app = ConsoleApp(LocalSource(live_runtime), refresh_interval=0.25)
    async with app.run_test(size=SIZE) as pilot:
        ids = [publish_request(live_runtime, i) for i in range(10)]
        decisions = None
        await wait_until(pilot, lambda: table(app, "decisions").row_count == 10)
        decisions = table(app, "decisions")
        decisions.move_cursor(row=3)
        held = decisions.highlighted_key
        [publish_request(live_runtime, i) for i in range(10, 15)]
        await wait_until(pilot, lambda: decisions.row_count == 15)
        assert decisions.highlighted_key == held
        assert decisions.cursor_row == 8
        decisions.move_cursor(row=0)
        [publish_request(live_runtime, i) for i in range(15, 17)]
        await wait_until(pilot, lambda: decisions.row_count == 17)
        assert decisions.cursor_row == 0 and decisions.highlighted_key != ids[-1]  # at the top it follows the newest


async def test_a_failing_store_is_a_notice_not_a_crash(live_runtime, tmp_path):
    from p402_tui.store.store import Store

    store = await Store.open(tmp_path / "broken.db")
    await store.aclose()  # every read now fails
    live_runtime.store = store
    app = ConsoleApp(LocalSource(live_runtime), refresh_interval=0.25)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_until(pilot, lambda: any("could not read the store" in n.message for n in app._notifications))
        publish_request(live_runtime, 1)
        await wait_until(pilot, lambda: table(app, "decisions").row_count == 1)
        assert app.is_running


# --- p402 console --listen: the gateway in the console's loop ------------------------------


async def test_console_serves_the_gateway_and_shows_its_traffic(sim_settings, tmp_path):
    import httpx

    from p402_tui.tui.launch import open_console, parse_listen

    async with open_console(sim_settings, db_path=str(tmp_path / "console.db"), listen=parse_listen("127.0.0.1:0")) as source:
        app = ConsoleApp(source, refresh_interval=0.25)
        async with app.run_test(size=SIZE) as pilot:
            url = source.label.split("gateway ", 1)[1]
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200, answer.text
            decision_id = answer.json()["p402"]["decision_id"]
            await wait_until(pilot, lambda: rows(app, "decisions") == [decision_id], timeout=10)
            await wait_until(pilot, lambda: app.state.decisions[decision_id].status == "ok")


def test_listen_wants_host_and_port():
    from p402_tui.core.errors import P402Error
    from p402_tui.tui.launch import parse_listen

    assert parse_listen("0.0.0.0:4020") == ("0.0.0.0", 4020)
    assert parse_listen(":4020") == ("127.0.0.1", 4020)
    for bad in ("4020", "host:", "host:99999", "host:port"):
        with pytest.raises(P402Error, match="HOST:PORT"):
            parse_listen(bad)


async def test_detail_screens_number_keys_and_help_keys():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        row = next(r for r in app.state.decisions.values() if r.attempts > 1)
        app.push_screen(DecisionScreen(row))
        await pilot.pause()
        for key, pane in (("2", "excluded"), ("3", "attempts"), ("1", "candidates")):
            await pilot.press(key)
            assert app.focused is table(app, pane)
        await pilot.press("3", "z")
        assert app.screen.maximized is app.screen.query_one("#attempts", Pane)
        await pilot.press("escape")  # first escape restores the pane, the second goes back
        assert isinstance(app.screen, DecisionScreen) and app.screen.maximized is None
        await pilot.press("escape")
        app.push_screen(SessionScreen(app.state.sessions["ses-support"]))
        await pilot.pause()
        await pilot.press("2")
        assert app.focused is table(app, "messages")
        await pilot.press("1")
        assert app.focused is table(app, "requests")
        await pilot.press("backspace", "f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("q")  # q closes help rather than quitting
        assert app.is_running and isinstance(app.screen, DashboardScreen)
        await pilot.press("question_mark", "question_mark")
        assert isinstance(app.screen, DashboardScreen)
        await pilot.press("d")  # the dashboard's own view key: already there
        assert app.current_mode == "dashboard"


async def test_console_on_the_simulator_counts_its_simulated_spend(catalog, tmp_path):
    """`p402 console --sim`: providers simulated in-process, rows marked, and its spend pane shows them."""
    from p402_tui.core.config import ConfigFile, Settings
    from p402_tui.core.hooks import CallContext
    from p402_tui.core.types import ChatRequest
    from p402_tui.tui.launch import open_console

    settings = Settings(ConfigFile(), catalog, env={})
    settings.db_path = tmp_path / "console.db"
    async with open_console(settings, sim=True) as source:
        assert source.simulated and source.runtime.sim is not None
        request = ChatRequest(messages=[{"role": "user", "content": "hi"}], model="openai/gpt-4o-mini")
        await source.runtime.orchestrator.complete(request, ctx=CallContext(source="console"))
        await source.runtime.store.flush()
        summary = await source.summary()
        assert summary.requests_today == 1
        assert await source.runtime.store.scalar("SELECT simulated FROM requests") == 1
