"""The console reads cleanly: notifications, model ids, filters, themes, refusals (Pilot)."""

from __future__ import annotations

from test_tui_fixtures import SIZE, T0, pin_timezone, sample_state
from textual.command import CommandPalette
from textual.widgets import Input
from textual.widgets._toast import Toast

from p402_tui.core.events import RequestRejected
from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.screens.dashboard import DashboardScreen
from p402_tui.tui.state import DecisionRow
from p402_tui.tui.widgets.pane import FilterBar, Pane

pin_timezone()

LONG_ID = "fireworks/accounts/fireworks/models/llama-v3p1-405b-instruct"  # 60 characters


def fixed_app() -> ConsoleApp:
    return ConsoleApp(state=sample_state(), clock=lambda: T0)


def with_long_model(app: ConsoleApp) -> DecisionRow:
    provider, _, model = LONG_ID.partition("/")
    row = DecisionRow(key="dec-long", ts=T0 + 5, mode="cost", chosen=LONG_ID, candidates=3, est_cost=0.0012,
                      cost=0.0011, latency_ms=420.0, attempts=1, status="ok", provider=provider, model=model)
    app.state.decisions[row.key] = row
    app.state._bump(row)
    return row


def drawn_lines(widget) -> list[str]:
    return [widget.render_line(y).text for y in range(widget.size.height)]


def toasts(app: ConsoleApp) -> list[Toast]:
    return [t for t in app.screen.query(Toast) if t.region.area]


async def settled_toasts(app: ConsoleApp, pilot, done, timeout: float = 5.0) -> list[Toast]:
    """The toasts once `done(toasts)` holds (or as they are at `timeout`): a busy machine lays them out late."""
    shown = toasts(app)
    for _ in range(int(timeout / 0.05)):
        if done(shown):
            break
        await pilot.pause(0.05)
        shown = toasts(app)
    return shown


async def test_notifications_never_cover_the_focused_input_or_a_pane():
    app = fixed_app()
    long = "the ledger could not be read because the database file is locked by another process " * 3
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        for n, view in enumerate(("dashboard", "chat", "compare", "dashboard")):  # back: the toasts it held are old
            if n:
                await pilot.press({"dashboard": "d", "chat": "c", "compare": "v"}[view])
                await pilot.pause()
            if view == "dashboard":
                await pilot.press("slash")  # the filter box, at the foot of the decisions pane
            assert isinstance(app.focused, Input), view
            app.notify(long, title="Store", severity="error")
            app.notify("second", severity="warning")
            shown = await settled_toasts(app, pilot, lambda shown: len(shown) == 1 and "second" in shown[0]._notification.message)
            assert len(shown) == 1 and "second" in shown[0]._notification.message, view  # the newest, alone
            for toast in shown:
                assert toast.region.y == 0 and toast.region.height == 1, view  # the message line
                assert not toast.region.overlaps(app.focused.region), view
                for pane in app.screen.query(Pane):
                    assert not toast.region.overlaps(pane.region), (view, pane.id)
            app.notify(long, title="Store", severity="error")
            (toast,) = await settled_toasts(app, pilot, lambda shown: len(shown) == 1 and "locked" in shown[0]._notification.message)
            assert toast.region.height == 1 and toast.region.width <= SIZE[0] // 2  # long text is cut, not wrapped
            await pilot.press("escape")  # out of the text box, so the next view key is a key


async def test_a_zoomed_decisions_pane_shows_a_whole_60_character_model_id():
    assert len(LONG_ID) == 60
    app = fixed_app()
    with_long_model(app)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.screen.query_one("#decisions", Pane).table
        (line,) = [text for text in drawn_lines(table) if "fireworks/" in text]
        assert LONG_ID not in line
        assert "fireworks/…/" in line and "instruct " in line  # cut in the middle, never the end
        await pilot.press("z")
        await pilot.pause()
        assert app.screen.maximized is not None
        (line,) = [text for text in drawn_lines(table) if "fireworks/" in text]
        assert LONG_ID in line


async def test_escape_clears_a_kept_filter_then_restores_the_zoom():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        pane = app.screen.query_one("#decisions", Pane)
        await pilot.press("z", "slash", *"status:error", "enter")  # kept: the box closes, the rows stay filtered
        await pilot.pause()
        assert pane.table.row_filter and app.focused is pane.table
        filtered = pane.table.row_count
        await pilot.press("escape")
        await pilot.pause()
        assert not pane.table.row_filter and pane.table.row_count > filtered
        assert not pane.query_one(FilterBar).display and "/status" not in pane.border_title
        assert app.screen.maximized is pane  # that escape only cleared the filter
        await pilot.press("escape")
        assert app.screen.maximized is None


async def test_t_cycles_the_theme_and_the_next_key_does_what_it_says():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        first = app.theme
        await pilot.press("t")
        await pilot.pause()
        assert app.theme != first and not isinstance(app.screen, CommandPalette)
        await pilot.press("z")
        await pilot.pause()
        assert app.screen.maximized is app.screen.query_one("#decisions", Pane)
        seen = {app.theme}
        for _ in range(len(app.available_themes) - 1):
            await pilot.press("t")
            seen.add(app.theme)
        assert len(seen) == len(app.available_themes) and app.theme == first  # every theme once, then round again


async def test_refused_requests_are_listed_with_their_reason_and_counted_as_errors():
    app = ConsoleApp(clock=lambda: T0 + 0.5)
    state = app.state
    state.fold([
        RequestRejected(status=401, reason="invalid_api_key", method="POST", path="/v1/chat/completions",
                        message="the gateway key is not valid", ts=T0 - 1),
        RequestRejected(status=413, reason="request_too_large", method="POST", path="/v1/chat/completions", ts=T0 - 1),
    ])
    assert state.rates(T0 + 0.5) == (0.2, 1.0)  # two requests in the last ten seconds, both refused
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.show_state()
        assert isinstance(app.screen, DashboardScreen)
        text = "\n".join(drawn_lines(app.screen.query_one("#decisions", Pane).table))
        assert "401 invalid_api_key" in text and "413 request_too_large" in text and "refused" in text
        await pilot.press("enter")
        await pilot.pause()
        assert "refused by the gateway" in str(app.screen.query_one("#decision-summary").render())
