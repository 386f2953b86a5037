"""The compare view through Textual's Pilot, against the real orchestrator and the simulator over loopback."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from test_tui_fixtures import SIZE, T0, run_command
from textual.widgets import Input, SelectionList

from p402_tui.core.config import Settings
from p402_tui.core.events import EventBus
from p402_tui.core.orchestrator import Orchestrator
from p402_tui.runtime import Runtime
from p402_tui.store.sessions import get_session, session_messages
from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.screens.compare import CompareColumn, CompareScreen
from p402_tui.tui.source import LocalSource

THREE = ["deepseek/deepseek-chat", "groq/llama-3.1-8b-instant", "mistral/mistral-small-latest"]


async def wait_until(pilot, condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


@asynccontextmanager
async def compare_console(settings: Settings, *, db_path: Path | None = None):
    if db_path is not None:
        settings.cache.enabled = False
    async with Runtime.open(settings, db_path=db_path, persist=db_path is not None) as runtime:
        app = ConsoleApp(LocalSource(runtime), view="compare", clock=lambda: T0)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.models)
            yield app, pilot, app.screen, runtime


async def run(pilot, screen: CompareScreen, prompt: str) -> list[CompareColumn]:
    await pilot.press("f3")
    box = screen.query_one("#compare-prompt", Input)
    assert box.has_focus
    box.value = prompt
    await pilot.press("enter")
    await wait_until(pilot, lambda: screen.columns() and not screen.running)
    await pilot.pause()
    return screen.columns()


def notices(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_three_models_stream_into_three_columns_with_their_figures(fresh_sim, fresh_sim_settings):
    async with compare_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        # Pick with the keys: f2 to the list, type in the filter, space toggles.
        for model in THREE:
            screen.query_one("#compare-filter", Input).value = model
            await pilot.press("f2", "space")
        assert screen.chosen == THREE
        assert "3 of 6" in str(screen.query_one("#compare-picked").content)
        columns = await run(pilot, screen, "summarise the router")
        assert [c.model for c in columns] == THREE
        for column in columns:
            assert len(column.markdown.source.split()) >= 20
            cost = str(column.cost.content)
            assert cost.startswith("$") and "tok" in cost
            timing = str(column.timing.content)
            assert timing.startswith("TTFT ") and " total " in timing and "tok/s" in timing
            assert column.figures is not None and column.figures.tokens and column.figures.cost_usd
        for model in THREE:
            provider, name = model.split("/", 1)
            assert fresh_sim.state.calls[provider][name] == 1
        assert app.screen.focused is screen.query_one("#compare-columns")  # ready for 1-6


async def test_a_number_key_or_a_button_marks_the_winner_and_the_session_keeps_it(fresh_sim_settings, tmp_path):
    async with compare_console(fresh_sim_settings, db_path=tmp_path / "p402.db") as (app, pilot, screen, runtime):
        screen.choose(THREE)
        await run(pilot, screen, "which is best?")
        await pilot.press("2")
        await wait_until(pilot, lambda: any("winner: " in m for m in notices(app)))
        assert [c.model for c in screen.columns() if c.has_class("-winner")] == [THREE[1]]
        assert screen.columns()[1].border_subtitle == "★ winner"
        await pilot.click("#winner-1")  # a change of mind, by mouse (left, clear of the toasts)
        await wait_until(pilot, lambda: screen.comparisons[-1]["winner"] == THREE[0])
        assert [c.model for c in screen.columns() if c.has_class("-winner")] == [THREE[0]]
        await wait_until(pilot, lambda: any(f"winner: {THREE[0]}" in m for m in notices(app)))  # saved
        await runtime.store.flush()
        session = await get_session(runtime.store, screen.session.session_id)
        comparison = session["metadata"]["comparisons"][-1]
        assert comparison["winner"] == THREE[0]
        assert comparison["prompt"] == "which is best?"
        assert [r["model"] for r in comparison["results"]] == THREE
        assert all(r["cost_usd"] > 0 and r["tokens"] > 0 for r in comparison["results"])
        assert session["requests"] == 3
        messages = await session_messages(runtime.store, session["id"])
        assert sorted(m["model"] for m in messages if m["role"] == "assistant") == sorted(THREE)


async def test_escape_stops_every_column_and_cancels_their_upstreams(fresh_sim, fresh_sim_settings):
    with httpx.Client(base_url=fresh_sim.url) as sim:
        sim.post("/_sim/faults", json={"kind": "timeout", "after_tokens": 2}).raise_for_status()
    async with compare_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        screen.choose(THREE)
        await pilot.press("f3")
        screen.query_one("#compare-prompt", Input).value = "go"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(screen.columns()) == 3 and all(c.markdown.source for c in screen.columns()))
        await pilot.press("escape")
        await wait_until(pilot, lambda: not screen.running)
        await wait_until(pilot, lambda: fresh_sim.state.streams.cancelled == 3)
        assert all("stopped" in str(c.cost.content) for c in screen.columns())
        assert screen.comparisons[-1]["stopped"] and screen.comparisons[-1]["prompt"] == "go"
        await pilot.click("#winner-1")  # what came before the stop can still be judged
        await wait_until(pilot, lambda: screen.comparisons[-1]["winner"] == THREE[0])
        assert app.is_running


def footer_keys(screen) -> dict[str, str]:
    from textual.widgets._footer import FooterKey

    return {k.description: k.key_display for k in screen.query(FooterKey)}


async def test_escape_leaves_a_text_box_for_the_columns_unless_a_comparison_runs(fresh_sim, fresh_sim_settings):
    async with compare_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        assert screen.query_one("#compare-filter", Input).has_focus
        await wait_until(pilot, lambda: footer_keys(screen).get("Leave input") == "esc")
        await pilot.press("escape")
        assert app.screen.focused is screen.query_one("#compare-columns")
        await pilot.press("v")  # a key again (this view's own), not a letter in the filter
        assert screen.query_one("#compare-filter", Input).value == ""
        screen.choose(THREE)
        with httpx.Client(base_url=fresh_sim.url) as sim:
            sim.post("/_sim/faults", json={"kind": "timeout", "after_tokens": 2}).raise_for_status()
        await pilot.press("f3")
        box = screen.query_one("#compare-prompt", Input)
        box.value = "go"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(screen.columns()) == 3 and all(c.markdown.source for c in screen.columns()))
        await wait_until(pilot, lambda: "Stop" in footer_keys(screen) and "Leave input" not in footer_keys(screen))
        await pilot.press("escape")  # running: escape stops, the prompt keeps the focus
        await wait_until(pilot, lambda: not screen.running)
        assert box.has_focus and all("stopped" in str(c.cost.content) for c in screen.columns())
        await pilot.press("escape", "1")
        await wait_until(pilot, lambda: screen.comparisons[-1]["winner"] == THREE[0])
        assert box.value == "go"  # the 1 picked the winner, it was not typed


async def test_ctrl_n_clears_the_columns_of_the_comparison_it_leaves_behind(fresh_sim, fresh_sim_settings):
    async with compare_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        screen.choose(THREE)
        await run(pilot, screen, "first")
        assert len(screen.columns()) == 3 and not screen.query("#compare-empty")
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: not screen.columns())
        assert len(screen.query("#compare-empty")) == 1
        assert screen.comparisons == [] and screen.current is None
        # Mid-run too: the stopped columns go, and nothing of that run lands in the new session.
        with httpx.Client(base_url=fresh_sim.url) as sim:
            sim.post("/_sim/faults", json={"kind": "timeout", "after_tokens": 2}).raise_for_status()
        await pilot.press("f3")
        screen.query_one("#compare-prompt", Input).value = "second"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(screen.columns()) == 3 and all(c.markdown.source for c in screen.columns()))
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: not screen.running and fresh_sim.state.streams.cancelled == 3)
        await pilot.pause()
        assert not screen.columns() and len(screen.query("#compare-empty")) == 1
        assert screen.comparisons == [] and screen.current is None
        with httpx.Client(base_url=fresh_sim.url) as sim:
            sim.delete("/_sim/faults").raise_for_status()
        await run(pilot, screen, "third")  # the next comparison still runs after a fresh start
        assert [c.model for c in screen.columns()] == THREE
        assert [c["prompt"] for c in screen.comparisons] == ["third"]


async def test_a_failing_model_fails_only_its_column(fresh_sim, fresh_sim_settings):
    with httpx.Client(base_url=fresh_sim.url) as sim:
        sim.post("/_sim/faults", json={"provider": "groq", "kind": "error", "status": 500}).raise_for_status()
    async with compare_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        screen.choose(THREE)
        columns = await run(pilot, screen, "who fails?")
        failed = [c.model for c in columns if c.has_class("-error")]
        assert failed == [THREE[1]]  # no failover in a comparison: that model, or its error
        assert columns[0].figures is not None and columns[2].figures is not None
        assert fresh_sim.state.calls["deepseek"]["deepseek-chat"] == 1


async def test_the_filter_narrows_the_list_and_two_to_six_models_are_needed(fresh_sim_settings):
    async with compare_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        picker = screen.query_one("#compare-models", SelectionList)
        everything = picker.option_count
        await pilot.press(*"groq/")
        assert 0 < picker.option_count < everything
        assert all(picker.get_option_at_index(i).value.startswith("groq/") for i in range(picker.option_count))
        screen.query_one("#compare-filter", Input).value = ""
        await pilot.press("f2")
        assert picker.has_focus and picker.option_count == everything
        for _ in range(6):
            await pilot.press("space", "down")
        assert len(screen.chosen) == 6
        await pilot.press("space")
        assert any("at most 6" in m for m in notices(app))
        assert len(screen.chosen) == 6 and len(picker.selected) == 6
        screen.choose(THREE[:1])
        await pilot.press("f3")
        screen.query_one("#compare-prompt", Input).value = "alone"
        await pilot.press("enter")
        await pilot.pause()
        assert not screen.columns()
        assert any("choose 2 to 6 models" in m for m in notices(app))


async def test_v_opens_compare_and_the_palette_reaches_its_actions(fresh_sim_settings):
    async with Runtime.open(fresh_sim_settings, persist=False) as runtime:
        app = ConsoleApp(LocalSource(runtime), clock=lambda: T0)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("v")
            await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.models)
            screen = app.screen
            await pilot.press("ctrl+p")
            await run_command(pilot, "type the prompt")
            await wait_until(pilot, lambda: app.screen is screen and screen.query_one("#compare-prompt").has_focus)


# --- the picture ---------------------------------------------------------------------------------


def test_compare_snapshot(snap_compare, fresh_sim_settings):
    bus = EventBus()
    runtime = Runtime(settings=fresh_sim_settings, bus=bus, orchestrator=Orchestrator(fresh_sim_settings, bus=bus))
    app = ConsoleApp(view="compare", clock=lambda: T0)

    async def run_before(pilot) -> None:
        app.connect(LocalSource(runtime))
        screen = app.screen
        await wait_until(pilot, lambda: screen.models)
        screen.choose(THREE)
        await run(pilot, screen, "Explain a circuit breaker in two sentences.")
        await pilot.press("2")
        await wait_until(pilot, lambda: screen.comparisons[-1]["winner"] == THREE[1])
        for label in screen.query(".meta-timing"):
            label.update("(timings masked in the snapshot)")
        for box in screen.query(Input):
            box.cursor_blink = False
        app.clear_notifications()
        await runtime.orchestrator.aclose()
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
