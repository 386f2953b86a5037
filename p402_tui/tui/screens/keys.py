"""Gateway keys: each key's role, spend against its budget, requests a minute against its limit,
refusals in the last hour; enter opens a key's latest requests. Opened from the palette (ctrl+p)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.widgets import Footer, Static

from ..format import bar, stamp, usd
from ..widgets.palette import Palette, palette_of
from ..widgets.pane import Pane
from ..widgets.table import Cell, Column, DrillTable, LiveTable, Row, num
from .base import PaneScreen
from .session import REQUEST_COLUMNS, request_rows

COLUMNS = (
    Column("name", "Key", 14),
    Column("role", "Role", 6),
    Column("budget", "Spent of budget", 16),
    Column("spent", "Spent", 9),
    Column("rate", "Req/min", 9),
    Column("refusals", "Refused 1h", 10),
    Column("status", "Status", 7),
)
POLL_S = 2.0


def _fraction(key: dict[str, Any]) -> float | None:
    usage = key.get("usage") or {}
    budget = usage.get("budget_usd")
    return None if not budget else (usage.get("spent_usd") or 0.0) / budget


def key_cells(key: dict[str, Any], colors: Palette) -> list[Cell]:
    usage = key.get("usage") or {}
    live = key.get("live")
    fraction = _fraction(key)
    if fraction is None:
        budget_text, style = "no budget", colors.muted
    else:
        budget_text = f"{bar(fraction, 8)} {min(fraction, 9.99) * 100:3.0f}%"
        style = colors.error if fraction >= 0.9 else colors.warning if fraction >= 0.7 else colors.ok
    rpm = (key.get("policy") or {}).get("rpm")
    per_minute = None if live is None else live["requests_last_minute"]
    rate = "-" if per_minute is None else f"{per_minute}/{rpm}" if rpm else str(per_minute)
    refusals = None if live is None else live["refusals_last_hour"]
    status = "active" if key.get("active") else "revoked"
    return [
        Cell(key.get("name") or key["id"]),
        Cell(key.get("role") or "admin"),
        Cell(budget_text, (fraction is not None, fraction or 0.0), style=style),
        num(usd(usage.get("spent_usd") or 0.0), usage.get("spent_usd") or 0.0),
        num(rate, per_minute or 0),
        num("-" if refusals is None else str(refusals), refusals or 0),
        Cell(status, style=colors.status("active" if key.get("active") else "error")),
    ]


def key_rows(keys: list[dict[str, Any]], colors: Palette, rev: int) -> list[Row]:
    return [Row(key["id"], rev, lambda k=key: key_cells(k, colors)) for key in keys]


def key_summary(key: dict[str, Any], colors: Palette) -> Text:
    usage = key.get("usage") or {}
    text = Text()
    text.append(key.get("name") or key["id"], style="bold")
    text.append(f"   {key['id']}   role ", style="dim")
    text.append(key.get("role") or "admin")
    text.append("   ")
    text.append("active" if key.get("active") else "revoked", style=colors.ok if key.get("active") else colors.error)
    text.append(f"\nspent this {usage.get('period', 'month')} ", style="dim")
    text.append(usd(usage.get("spent_usd") or 0.0), style="bold")
    fraction = _fraction(key)
    if fraction is not None:
        text.append(f" of {usd(usage['budget_usd'])}  ", style="dim")
        text.append(f"{bar(fraction, 24)} {fraction * 100:.0f}%", style=colors.error if fraction >= 0.9 else colors.ok)
    text.append(f"   requests {usage.get('requests') or 0:,}", style="dim")
    text.append("\npolicy ", style="dim")
    policy = key.get("policy") or {}
    text.append(", ".join(f"{k}={v}" for k, v in sorted(policy.items())) or "none")
    if key.get("created"):
        text.append("\ncreated ", style="dim")
        text.append(stamp(key["created"]))
    return text


class KeysScreen(PaneScreen):
    """Every gateway key, polled; escape goes back."""

    BINDINGS = [Binding("escape,backspace", "back", "Back"), Binding("r", "reload", "Reload")]

    def __init__(self) -> None:
        super().__init__(id="keys-screen")
        self.keys: list[dict[str, Any]] = []
        self.rev = 0
        self.problem: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text(" Gateway keys ", style="bold reverse"), classes="screen-title")
        yield Pane("Keys", DrillTable(COLUMNS, sort_column="name", id="keys-table"), id="keys")
        yield Static(id="keys-note")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#keys", Pane).focus_body()
        self.action_reload()
        self.set_interval(POLL_S, self.action_reload)

    def action_reload(self) -> None:
        source = getattr(self.app, "source", None)
        if source is not None:
            self.run_worker(self._fetch(source), exclusive=True, group="keys", exit_on_error=False)

    async def _fetch(self, source: Any) -> None:
        try:
            self.keys, self.problem = await source.keys(), None
        except Exception as error:  # an attached console's key may not be an admin's: say so, keep the screen
            self.problem = f"keys are not readable here: {error}"
        self.rev += 1
        self.redraw()

    def redraw(self) -> None:
        self.fill("keys", key_rows(self.keys, palette_of(self.app), self.rev))
        note = self.problem or "enter opens a key's latest requests; `p402 keys` changes them"
        self.query_one("#keys-note", Static).update(Text(note, style="dim"))

    @on(LiveTable.Selected, "#keys-table")
    def _open_key(self, event: LiveTable.Selected) -> None:
        key = next((k for k in self.keys if k["id"] == event.key), None)
        if key is not None:
            self.app.push_screen(KeyScreen(key))

    def action_back(self) -> None:
        self.app.pop_screen()


class KeyScreen(PaneScreen):
    """One key: its policy and spend, and its latest requests from the ledger."""

    BINDINGS = [Binding("escape,backspace", "back", "Back"), Binding("r", "reload", "Reload")]

    def __init__(self, key: dict[str, Any]) -> None:
        super().__init__(id="key-screen")
        self.key = key
        self.requests: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Static(Text(" Gateway key ", style="bold reverse"), classes="screen-title")
        yield Static(id="key-summary")
        with Grid(id="key-panes"):
            yield Pane("Requests", LiveTable(REQUEST_COLUMNS, sort_column="time", sort_reverse=True), id="requests")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.redraw()
        self.query_one("#requests", Pane).focus_body()
        self.action_reload()

    def action_reload(self) -> None:
        source = getattr(self.app, "source", None)
        if source is not None:
            self.run_worker(self._fetch(source), exclusive=True, group="key", exit_on_error=False)

    async def _fetch(self, source: Any) -> None:
        try:
            self.requests = await source.key_requests(self.key["id"])
        except Exception as error:
            self.notify(f"could not read the requests of {self.key['id']}: {error}", severity="error")
            return
        self.redraw()

    def redraw(self) -> None:
        colors = palette_of(self.app)
        self.query_one("#key-summary", Static).update(key_summary(self.key, colors))
        self.fill("requests", request_rows(self.requests, colors))

    def action_back(self) -> None:
        self.app.pop_screen()
