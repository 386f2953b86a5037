"""The chat view through Textual's Pilot, against the real orchestrator and the simulator over loopback."""

from __future__ import annotations

import asyncio
import base64
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from test_tui_fixtures import SIZE, T0, run_command
from textual.widgets import Input, Select

from p402_tui.core.config import Settings
from p402_tui.core.events import EventBus
from p402_tui.core.orchestrator import Orchestrator
from p402_tui.runtime import Runtime
from p402_tui.store.sessions import get_session, session_messages
from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.screens.chat import AnswerView, ChatScreen, ImageError, load_image
from p402_tui.tui.source import LocalSource

# A 1x1 PNG, the smallest real image there is.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


async def wait_until(pilot, condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


@asynccontextmanager
async def chat_console(settings: Settings, *, db_path: Path | None = None):
    """The console on the chat view, its runtime on the simulator; with a store when `db_path` is given."""
    if db_path is not None:
        settings.cache.enabled = False  # sessions are under test here, not the semantic cache
    async with Runtime.open(settings, db_path=db_path, persist=db_path is not None) as runtime:
        app = ConsoleApp(LocalSource(runtime), view="chat", clock=lambda: T0)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.query("#chat-input"))
            screen = app.screen
            await wait_until(pilot, lambda: len(screen.query_one("#chat-model", Select)._options) > 1)
            yield app, pilot, screen, runtime


async def ask(pilot, screen: ChatScreen, text: str) -> AnswerView:
    box = screen.query_one("#chat-input", Input)
    box.focus()
    box.value = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: screen.query(AnswerView))
    answer = screen.query(AnswerView).last()
    await wait_until(pilot, lambda: not screen.streaming)
    await pilot.pause()
    return answer


def notices(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_a_streamed_answer_appears_with_its_route_and_cost(fresh_sim, fresh_sim_settings):
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        answer = await ask(pilot, screen, "how does routing work?")
        text = answer.markdown.source
        assert len(text.split()) >= 20  # the simulator's answer, every piece of it
        route = str(answer.route.content)
        assert route.startswith("→ ") and "balanced" in route and "candidates" in route and "1 attempt" in route
        cost = str(answer.cost.content)
        assert cost.startswith("$") and "tok" in cost
        assert "TTFT" in str(answer.timing.content)
        assert answer.border_title == route.split()[1]  # the model that answered
        assert [m.role for m in screen.history] == ["user", "assistant"]
        assert screen.history[1].content == text
        # No store here: the conversation is kept in memory, and the screen says so.
        assert screen.session.session_id is None
        assert "in memory (no store)" in str(screen.query_one("#chat-session").content)
        assert any("kept in memory only" in m for m in notices(app))
        # The next question carries the conversation so far.
        await ask(pilot, screen, "and then?")
        assert [m.role for m in screen.history] == ["user", "assistant", "user", "assistant"]
        assert len(screen.query(AnswerView)) == 2
        assert fresh_sim.state.streams.completed == 2


async def test_f2_pins_a_model_and_f3_picks_the_routing_mode(fresh_sim, fresh_sim_settings):
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        await pilot.press("f2")
        picker = screen.query_one("#chat-model", Select)
        assert picker.expanded
        await pilot.press(*"deep", "enter")  # type to search: the first deepseek model
        await wait_until(pilot, lambda: picker.value == "deepseek/deepseek-chat")
        assert screen.query_one("#chat-mode", Select).disabled  # a pinned model has no routing mode
        answer = await ask(pilot, screen, "hello")
        assert str(answer.route.content).startswith("→ deepseek/deepseek-chat · pinned · ")
        assert fresh_sim.state.calls["deepseek"]["deepseek-chat"] == 1
        await pilot.press("f2", *"auto", "enter")
        await wait_until(pilot, lambda: picker.value == "auto" and not screen.query_one("#chat-mode", Select).disabled)
        await pilot.press("f3", *"co", "enter")
        await wait_until(pilot, lambda: screen.mode == "cost")
        answer = await ask(pilot, screen, "cheap please")
        assert " · cost · " in str(answer.route.content)


async def test_escape_stops_the_answer_and_cancels_the_upstream(fresh_sim, fresh_sim_settings):
    with httpx.Client(base_url=fresh_sim.url) as sim:  # every model hangs after three pieces
        sim.post("/_sim/faults", json={"kind": "timeout", "after_tokens": 3}).raise_for_status()
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        box = screen.query_one("#chat-input", Input)
        box.value = "tell me everything"
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.query(AnswerView) and screen.query(AnswerView).last().markdown.source)
        assert screen.streaming
        await pilot.press("escape")
        await wait_until(pilot, lambda: not screen.streaming)
        await wait_until(pilot, lambda: fresh_sim.state.streams.cancelled == 1)
        answer = screen.query(AnswerView).last()
        assert answer.border_subtitle == "stopped"
        assert "upstream call was cancelled" in " ".join(notices(app))
        assert app.is_running


async def test_upstream_failure_is_a_notice_and_the_console_stays(fresh_sim, fresh_sim_settings):
    with httpx.Client(base_url=fresh_sim.url) as sim:
        sim.post("/_sim/faults", json={"kind": "error", "status": 500}).raise_for_status()
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        answer = await ask(pilot, screen, "anyone there?")
        assert answer.has_class("-error")
        assert any("failed" in message or "500" in message for message in notices(app))
        assert screen.history == []  # nothing came back, so the question can be asked again
        assert app.is_running


async def test_an_image_from_a_path_goes_with_the_next_message(fresh_sim_settings, tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(PNG)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture")
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, runtime):
        await pilot.press("ctrl+o")
        box = screen.query_one("#chat-input", Input)
        assert box.value == "/image " and box.has_focus
        # Bad paths are notices, and nothing is attached.
        box.value = f"/image {tmp_path / 'missing.png'}"
        await pilot.press("enter")
        await wait_until(pilot, lambda: any("missing.png" in m and "no such file" in m for m in notices(app)))
        box.value = f"/image {text_file}"
        await pilot.press("enter")  # the newest notice takes the message corner over
        await wait_until(pilot, lambda: any("notes.txt" in m and "not a PNG, JPEG, GIF or WebP" in m for m in notices(app)))
        assert screen.attachments == []
        assert box.value == f"/image {text_file}"  # the mistyped command stays, to be corrected
        # A real image is read off the loop and rides with the next question.
        box.value = f"/image {image}"
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.attachments)
        assert box.value == ""
        assert "dot.png" in str(screen.query_one("#chat-attachments").content)
        answer = await ask(pilot, screen, "what is in this picture?")
        served = str(answer.route.content).split()[1]
        assert "vision" in runtime.settings.catalog.models[served].capabilities
        parts = screen.history[0].content
        assert parts[1].image_url.url.startswith("data:image/png;base64,")
        assert screen.attachments == []


def test_load_image_reads_the_type_from_the_bytes(tmp_path):
    jpeg = tmp_path / "photo.png"  # the name lies; the bytes say JPEG
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 16)
    assert load_image(str(jpeg)).data_url.startswith("data:image/jpeg;base64,")
    with pytest.raises(ImageError, match="not a file"):
        load_image(str(tmp_path))
    with pytest.raises(ImageError, match="give a path"):
        load_image("  ")


async def test_history_is_kept_in_an_agent_session(fresh_sim_settings, tmp_path):
    async with chat_console(fresh_sim_settings, db_path=tmp_path / "p402.db") as (app, pilot, screen, runtime):
        await ask(pilot, screen, "remember this")
        await ask(pilot, screen, "and this")
        session_id = screen.session.session_id
        assert session_id is not None
        assert session_id in str(screen.query_one("#chat-session").content)
        await runtime.store.flush()
        session = await get_session(runtime.store, session_id)
        assert session["requests"] == 2 and session["spent_usd"] > 0
        assert session["metadata"]["kind"] == "chat"
        messages = await session_messages(runtime.store, session_id)
        assert [(m["role"], m["content"]) for m in messages][0::2] == [("user", "remember this"), ("user", "and this")]
        assert messages[1]["content"] == screen.history[1].content


async def test_ctrl_n_starts_over_and_the_palette_reaches_the_chat_actions(fresh_sim, fresh_sim_settings):
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        await ask(pilot, screen, "hello")
        with httpx.Client(base_url=fresh_sim.url) as sim:  # the next answer hangs after three pieces
            sim.post("/_sim/faults", json={"kind": "timeout", "after_tokens": 3}).raise_for_status()
        screen.query_one("#chat-input", Input).value = "a long one"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(screen.query(AnswerView)) == 2 and screen.query(AnswerView).last().markdown.source)
        await pilot.press("ctrl+n")  # mid-answer: that answer stops, and nothing of it leaks into the new chat
        await wait_until(pilot, lambda: not screen.streaming and fresh_sim.state.streams.cancelled == 1)
        await pilot.pause()
        assert screen.history == [] and not screen.query(AnswerView)
        assert screen.session.persistent is None
        await pilot.press("ctrl+p")
        await run_command(pilot, "routing mode")
        await wait_until(pilot, lambda: app.screen is screen and screen.query_one("#chat-mode", Select).expanded)


async def test_ctrl_n_on_an_empty_chat_or_twice_in_a_row_keeps_the_console_up(fresh_sim_settings):
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        await pilot.press("ctrl+n")  # nothing asked yet: the welcome text is still there
        await pilot.pause()
        await ask(pilot, screen, "hello")
        await pilot.press("ctrl+n", "ctrl+n")
        await pilot.pause()
        assert app.is_running and app.screen is screen
        assert len(screen.query("#chat-empty")) == 1 and not screen.query(AnswerView)
        await ask(pilot, screen, "again")
        assert not screen.query("#chat-empty")
        await pilot.press("ctrl+p")
        await run_command(pilot, "new conversation")  # the palette's way: the same action, awaited there too
        await wait_until(pilot, lambda: app.screen is screen and not screen.query(AnswerView))
        assert len(screen.query("#chat-empty")) == 1 and screen.history == []


async def test_the_footer_offers_a_help_key_that_works_while_typing(fresh_sim_settings):
    from textual.widgets._footer import FooterKey

    from p402_tui.tui.screens.help import HelpScreen

    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        assert screen.query_one("#chat-input", Input).has_focus  # "?" would be typed here
        await wait_until(pilot, lambda: {k.description: k.key_display for k in screen.query(FooterKey)}.get("Help") == "f1")
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))


def footer_keys(screen) -> dict[str, str]:
    from textual.widgets._footer import FooterKey

    return {k.description: k.key_display for k in screen.query(FooterKey)}


async def test_escape_leaves_the_input_so_letters_are_keys_again_and_still_stops_an_answer(fresh_sim, fresh_sim_settings):
    from p402_tui.tui.screens.dashboard import DashboardScreen

    with httpx.Client(base_url=fresh_sim.url) as sim:  # every answer hangs after three pieces
        sim.post("/_sim/faults", json={"kind": "timeout", "after_tokens": 3}).raise_for_status()
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        box = screen.query_one("#chat-input", Input)
        assert box.has_focus
        await wait_until(pilot, lambda: "Leave input" in footer_keys(screen))
        assert footer_keys(screen)["Leave input"] == "esc" and "Stop" not in footer_keys(screen)
        box.value = "tell me everything"
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.query(AnswerView) and screen.query(AnswerView).last().markdown.source)
        await wait_until(pilot, lambda: "Stop" in footer_keys(screen))
        assert "Leave input" not in footer_keys(screen)
        await pilot.press("escape")  # while an answer streams, escape stops it and the box keeps the focus
        await wait_until(pilot, lambda: not screen.streaming and fresh_sim.state.streams.cancelled == 1)
        assert box.has_focus and screen.query(AnswerView).last().border_subtitle == "stopped"
        await pilot.press("escape")
        assert screen.query_one("#chat-log").has_focus
        await wait_until(pilot, lambda: "Leave input" not in footer_keys(screen) and "Stop" not in footer_keys(screen))
        await pilot.press("d")  # a key again, not a letter typed into the box
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert box.value == ""


async def test_c_opens_the_chat_from_the_dashboard(fresh_sim_settings):
    async with Runtime.open(fresh_sim_settings, persist=False) as runtime:
        app = ConsoleApp(LocalSource(runtime), clock=lambda: T0)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("c")
            await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen))
            await wait_until(pilot, lambda: app.screen.query("#chat-input") and app.screen.query_one("#chat-input").has_focus)



# --- the picture ---------------------------------------------------------------------------------


def in_process(settings: Settings) -> Runtime:
    """A runtime without a store, built in the test's thread; the snapshot's own loop drives it."""
    bus = EventBus()
    return Runtime(settings=settings, bus=bus, orchestrator=Orchestrator(settings, bus=bus))


async def steady(pilot, runtime: Runtime) -> None:
    """What changes from run to run comes out of the picture: timings, toasts, the blinking cursor."""
    app = pilot.app
    for label in app.screen.query(".meta-timing"):
        label.update("(timings vary from run to run: masked in the snapshot)")
    for box in app.screen.query(Input):
        box.cursor_blink = False
    app.clear_notifications()
    await runtime.orchestrator.aclose()
    await pilot.pause()


def test_chat_snapshot(snap_compare, fresh_sim_settings):
    runtime = in_process(fresh_sim_settings)
    app = ConsoleApp(view="chat", clock=lambda: T0)

    async def run_before(pilot) -> None:
        app.connect(LocalSource(runtime))
        screen = app.screen
        await wait_until(pilot, lambda: len(screen.query_one("#chat-model", Select)._options) > 1)
        await ask(pilot, screen, "How does P402 choose a model for a request?")
        # Measured latencies feed the next decision, so the second question names its model.
        screen.query_one("#chat-model", Select).value = "deepseek/deepseek-chat"
        await ask(pilot, screen, "And when that provider fails?")
        await steady(pilot, runtime)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


async def test_slash_model_pins_a_model_beyond_the_catalog(fresh_sim, fresh_sim_settings):
    """`/model provider/<id>` reaches any model the provider serves; one the catalog lacks is unpriced."""
    async with chat_console(fresh_sim_settings) as (app, pilot, screen, _runtime):
        box = screen.query_one("#chat-input", Input)
        box.focus()
        box.value = "/model openai/gpt-heldout-5"
        await pilot.press("enter")
        picker = screen.query_one("#chat-model", Select)
        await wait_until(pilot, lambda: picker.value == "openai/gpt-heldout-5")
        answer = await ask(pilot, screen, "hello there")
        assert str(answer.route.content).startswith("→ openai/gpt-heldout-5 · pinned · ")
        assert fresh_sim.state.calls["openai"]["gpt-heldout-5"] == 1
