"""The dashboard: decisions, provider health, spend and sessions, live."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer

from ..state import ConsoleState
from .base import PaneScreen
from ..widgets.decisions import DecisionsTable
from ..widgets.health import HealthTable, health_rows
from ..widgets.palette import palette_of
from ..widgets.pane import Pane
from ..widgets.sessions import SessionsTable, session_rows
from ..widgets.spend import SpendPane
from ..widgets.status import StatusLine, status_text
from ..widgets.table import LiveTable

PANES = ("decisions", "sessions", "health", "spend")


class DashboardScreen(PaneScreen):
    BINDINGS = [
        Binding("escape", "restore", "Restore", show=False),
        Binding("1", "focus_pane('decisions')", "Decisions", show=False),
        Binding("2", "focus_pane('sessions')", "Sessions", show=False),
        Binding("3", "focus_pane('health')", "Health", show=False),
        Binding("4", "focus_pane('spend')", "Spend", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="dashboard")
        self._seen: dict[str, int] = {}

    def compose(self) -> ComposeResult:
        yield StatusLine()
        with Horizontal(id="top-row"):
            yield Pane("Decisions", DecisionsTable(), id="decisions")
            yield Pane("Sessions", SessionsTable(), id="sessions")
        with Horizontal(id="bottom-row"):
            yield Pane("Provider health", HealthTable(), id="health")
            yield Pane("Spend", SpendPane(), id="spend")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(DecisionsTable).focus()
        self.update_status()
        for pane in self.query(Pane):
            pane.update_title()

    def on_screen_resume(self) -> None:
        self.show_state(self.app.state)  # type: ignore[attr-defined]

    def redraw(self) -> None:
        self._seen.clear()
        self.show_state(self.app.state)  # type: ignore[attr-defined]

    # --- drawing -----------------------------------------------------------------------

    def show_state(self, state: ConsoleState) -> None:
        if not self.is_mounted:
            return
        colors = palette_of(self.app)
        now = self.app.clock()  # type: ignore[attr-defined]
        with self.app.batch_update():  # every pane's changes land in one frame
            self.query_one(DecisionsTable).show_rows(state, colors)
            if self._changed("health", state.health_rev) or self._changed("clock", int(now)):
                self.query_one(HealthTable).sync(health_rows(state.health, state.health_rev, colors, now))
            if self._changed("sessions", state.sessions_rev):
                self.query_one(SessionsTable).sync(session_rows(state.sessions, state.sessions_rev, colors))
            summary_changed = self._changed("summary", state.summary_rev)
            self.query_one(SpendPane).show(state.spend, state.summary, now, colors, summary_changed)
            for pane in self.query(Pane):
                pane.update_title()
            self.update_status()

    def _changed(self, what: str, rev: int) -> bool:
        if self._seen.get(what) == rev:
            return False
        self._seen[what] = rev
        return True

    def update_status(self) -> None:
        if self.is_mounted:
            self.query_one(StatusLine).show(status_text(self.app.status_fields(), palette_of(self.app)))  # type: ignore[attr-defined]

    # --- drilling down -------------------------------------------------------------------

    def action_restore(self) -> None:
        if self.maximized is not None:
            self.minimize()

    @on(LiveTable.Selected, "#decisions-table")
    def _open_decision(self, event: LiveTable.Selected) -> None:
        from .decision import DecisionScreen

        row = self.app.state.decisions.get(event.key)  # type: ignore[attr-defined]
        if row is not None:
            self.app.push_screen(DecisionScreen(row))

    @on(LiveTable.Selected, "#sessions-table")
    def _open_session(self, event: LiveTable.Selected) -> None:
        from .session import SessionScreen

        session = self.app.state.sessions.get(event.key)  # type: ignore[attr-defined]
        if session is not None:
            self.app.push_screen(SessionScreen(session))
