"""One agent session: its budget, its requests from the ledger and its messages."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.widgets import Footer, Static

from ..format import bar, clock, ms, stamp, usd
from ..widgets.palette import Palette, palette_of
from ..widgets.pane import Pane
from ..widgets.sessions import budget_fraction
from ..widgets.table import Cell, Column, LiveTable, Row, num
from .base import PaneScreen

REQUEST_COLUMNS = (
    Column("time", "Time", 8),
    Column("mode", "Mode", 8),
    Column("model", "Model", 24, flex=True),
    Column("tokens", "Tokens", 7),
    Column("cost", "Cost", 9),
    Column("latency", "Latency", 7),
    Column("status", "Status", 7),
)
MESSAGE_COLUMNS = (
    Column("time", "Time", 8),
    Column("role", "Role", 9),
    Column("model", "Model", 24),
    Column("content", "Content", 60),
)


def request_rows(requests: list[dict[str, Any]], colors: Palette) -> list[Row]:
    rows = []
    for request in requests:
        status = "cached" if request.get("cached") else request.get("status") or "ok"
        model = f"{request['provider']}/{request['model']}" if request.get("provider") else "-"
        tokens = (request.get("prompt_tokens") or 0) + (request.get("completion_tokens") or 0)
        cells = [
            Cell(clock(request["ts"]), request["ts"]),
            Cell(request.get("mode") or "-"),
            Cell(model, middle=True),
            num(f"{tokens:,}", tokens),
            num(usd(request.get("cost_usd")), request.get("cost_usd")),
            num(ms(request.get("latency_ms")), request.get("latency_ms")),
            Cell(status, style=colors.status(status)),
        ]
        rows.append(Row(request["id"], 0, lambda cells=cells: cells))
    return rows


def message_rows(messages: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for message in messages:
        content = " ".join(str(message.get("content") or "").split())
        cells = [
            Cell(clock(message["ts"]), (message["ts"], message.get("id") or 0)),
            Cell(message.get("role") or "-"),
            Cell(message.get("model") or "-"),
            Cell(content),
        ]
        rows.append(Row(str(message.get("id") or len(rows)), 0, lambda cells=cells: cells))
    return rows


def session_summary(session: dict[str, Any], colors: Palette) -> Text:
    text = Text()
    text.append(session.get("name") or session["id"], style="bold")
    text.append(f"   {session['id']}", style="dim")
    status = session.get("status") or "active"
    text.append("   status ", style="dim")
    text.append(status, style=colors.status(status))
    if session.get("agent"):
        text.append("   agent ", style="dim")
        text.append(str(session["agent"]))
    text.append("\nspent ", style="dim")
    text.append(usd(session.get("spent_usd") or 0.0), style="bold")
    fraction = budget_fraction(session)
    if fraction is None:
        text.append("   no budget", style="dim")
    else:
        text.append(f" of {usd(session['budget_usd'])}  ", style="dim")
        style = colors.error if fraction >= 0.9 else colors.warning if fraction >= 0.7 else colors.ok
        text.append(f"{bar(fraction, 24)} {fraction * 100:.0f}%", style=style)
    text.append("   requests ", style="dim")
    text.append(f"{session.get('requests') or 0:,}")
    if session.get("saved_usd"):
        text.append("   cache saved ", style="dim")
        text.append(usd(session["saved_usd"]), style=colors.ok)
    if session.get("created"):
        text.append("\ncreated ", style="dim")
        text.append(stamp(session["created"]))
    return text


class SessionScreen(PaneScreen):
    """Opened with enter on a session; escape goes back. `r` reloads."""

    BINDINGS = [
        Binding("escape,backspace", "back", "Back"),
        Binding("r", "reload", "Reload"),
        Binding("1", "focus_pane('requests')", "Requests", show=False),
        Binding("2", "focus_pane('messages')", "Messages", show=False),
    ]

    def __init__(self, session: dict[str, Any]) -> None:
        super().__init__(id="session-screen")
        self.session = session
        self.requests: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Static(Text(" Session ", style="bold reverse"), classes="screen-title")
        yield Static(id="session-summary")
        with Grid(id="session-panes"):
            yield Pane("Requests", LiveTable(REQUEST_COLUMNS, sort_column="time", sort_reverse=True), id="requests")
            yield Pane("Messages", LiveTable(MESSAGE_COLUMNS, sort_column="time"), id="messages")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.show_session()
        self.query_one("#requests", Pane).focus_body()
        self.action_reload()

    def action_reload(self) -> None:
        source = getattr(self.app, "source", None)
        if source is None:
            return
        self.run_worker(self._fetch(source), exclusive=True, group="session", exit_on_error=False)

    async def _fetch(self, source: Any) -> None:
        try:
            detail = await source.session(self.session["id"])
        except Exception as error:
            self.notify(f"could not read session {self.session['id']}: {error}", severity="error")
            return
        self.session = detail["session"]
        self.requests = detail["requests"]
        self.messages = detail["messages"]
        self.show_session()

    def redraw(self) -> None:
        self.show_session()

    def show_session(self) -> None:
        colors = palette_of(self.app)
        self.query_one("#session-summary", Static).update(session_summary(self.session, colors))
        # The sources send the latest requests only; the title counts them against all there are.
        self.query_one("#requests", Pane).whole = self.session.get("requests") or 0
        self.fill("requests", request_rows(self.requests, colors))
        self.fill("messages", message_rows(self.messages))

    def action_back(self) -> None:
        if self.maximized is not None:
            self.minimize()
        else:
            self.app.pop_screen()
