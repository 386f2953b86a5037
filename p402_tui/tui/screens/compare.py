"""The compare view: one prompt to two to six models at once, side by side.

Each column streams its own answer through its own `MarkdownStream`, all at
the same time, and ends with the numbers that tell models apart: time to first
token, total time, tokens, tokens per second and cost. Keys 1-6 (or the
column's button) mark the winner, which is kept with the comparison's agent
session: every run is a user message and one answer per model, and the
session's metadata lists each comparison with its figures and its winner.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Button, Footer, Input, Label, Markdown, SelectionList, Static
from textual.widgets.selection_list import Selection

from ...core.hooks import CallContext, RouteOptions
from ...core.types import ChatMessage, ChatRequest
from ..commands import Command, ListedCommands
from ..format import ms
from ..widgets.status import StatusLine
from .chat import ChatLink, Figures, LinkedScreen, Outcome, SessionLog, relay

MIN_MODELS = 2
MAX_MODELS = 6
COLUMN_FRAME_S = 1 / 10  # up to six answers re-render at once: each column takes new text less often than chat


class Columns(Horizontal):
    """The answers side by side; focusable, so 1-6 pick a winner once the prompt box lets go."""

    can_focus = True


class CompareColumn(Vertical):
    """One model's answer and its figures."""

    def __init__(self, index: int, model: str) -> None:
        super().__init__(classes="compare-column")
        self.index = index
        self.model = model
        self.border_title = f"{index} {model}"
        self.markdown = Markdown()
        self.cost = Label("waiting…", classes="meta-cost")
        self.timing = Label("", classes="meta-timing")
        self.figures: Figures | None = None
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="compare-answer"):
            yield self.markdown
        yield self.cost
        yield self.timing
        yield Button(f"{self.index} ★ winner", id=f"winner-{self.index}", classes="winner-button", compact=True)

    def show(self, figures: Figures, outcome: Outcome) -> None:
        self.figures = figures
        note = " · stopped" if outcome.stopped else ""
        self.cost.update(f"{figures.cost_text()} · {figures.tokens_text()}{note}")
        rate = f"{figures.tokens_per_s:,.0f} tok/s" if figures.tokens_per_s else "- tok/s"
        self.timing.update(f"TTFT {ms(figures.ttft_ms)} · total {ms(figures.latency_ms)} · {rate}")
        if outcome.error:
            self.fail(f"broke off: {outcome.error}")

    def fail(self, message: str) -> None:
        self.error = message
        self.add_class("-error")
        self.cost.update(message)

    def crown(self, winner: bool) -> None:
        self.set_class(winner, "-winner")
        self.border_subtitle = "★ winner" if winner else ""

    def result(self) -> dict[str, Any]:
        figures = self.figures
        out: dict[str, Any] = {"model": self.model, "error": self.error}
        if figures is not None:
            out.update(served_by=figures.model, cost_usd=figures.cost_usd, latency_ms=figures.latency_ms,
                       ttft_ms=figures.ttft_ms, tokens=figures.tokens, tokens_per_s=figures.tokens_per_s)
        return out


class CompareCommands(ListedCommands):
    """The compare view's actions in the command palette."""

    def commands(self) -> list[Command]:
        screen = self.screen
        if not isinstance(screen, CompareScreen):
            return []
        commands = [
            ("Compare: stop", screen.action_stop, "Cancel every column still streaming (escape)"),
            ("Compare: choose models", screen.action_pick, "Pick 2 to 6 models on the left (f2)"),
            ("Compare: type the prompt", screen.action_prompt, "Focus the prompt box (f3)"),
            ("Compare: new session", screen.action_new_session, "Keep the next comparisons in a new session (ctrl+n)"),
        ]
        for column in screen.columns():
            commands.append((f"Compare: winner is {column.model}", lambda i=column.index: screen.action_winner(i),
                             f"Mark column {column.index} the winner ({column.index})"))
        return commands


class CompareScreen(LinkedScreen):
    """Two to six models answer the same prompt side by side."""

    VIEW = "Compare"
    MAIN = "#compare-columns"
    COMMANDS = {CompareCommands}
    BINDINGS = [
        Binding("f2", "pick", "Models"),
        Binding("f3", "prompt", "Prompt"),
        Binding("ctrl+n", "new_session", "New session"),
        Binding("1", "winner(1)", "Winner", key_display="1-6"),
        *[Binding(str(i), f"winner({i})", f"Winner {i}", show=False) for i in range(2, MAX_MODELS + 1)],
    ]

    DEFAULT_CSS = """
    CompareScreen #compare-body { height: 1fr; }
    CompareScreen #compare-picker { width: 40; border-right: vkey $panel; padding: 0 1; }
    CompareScreen #compare-filter { margin: 0 0 1 0; }
    CompareScreen #compare-models { height: 1fr; }
    CompareScreen #compare-picked { height: auto; color: $text-muted; padding: 1 0 0 0; }
    CompareScreen #compare-main { width: 1fr; }
    CompareScreen #compare-columns { height: 1fr; }
    CompareScreen #compare-columns:focus-within, CompareScreen #compare-columns:focus { background: $boost; }
    CompareScreen #compare-empty { color: $text-muted; padding: 1 2; width: 1fr; }
    CompareScreen #compare-prompt { margin: 0 1; }
    CompareScreen .compare-column { width: 1fr; height: 1fr; border: round $accent 50%; padding: 0 1;
                                    border-title-color: $accent; border-subtitle-color: $success; }
    CompareScreen .compare-column.-winner { border: double $success; }
    CompareScreen .compare-column.-error { border: round $error; }
    CompareScreen .compare-answer { height: 1fr; }
    CompareScreen .compare-answer Markdown { margin: 0; padding: 0; }
    CompareScreen .compare-column Label { color: $text-muted; width: 1fr; }
    CompareScreen .winner-button { width: 1fr; margin: 0; }
    """

    running: reactive[bool] = reactive(False, bindings=True)

    def __init__(self) -> None:
        super().__init__(id="compare")
        self.session = SessionLog("compare")
        self.chosen: list[str] = []
        self.models: list[str] = []
        self.comparisons: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None  # the comparison on screen, once its columns are done
        self._said_in_memory = False

    def compose(self) -> ComposeResult:
        yield StatusLine()
        with Horizontal(id="compare-body"):
            with Vertical(id="compare-picker"):
                yield Input(placeholder="filter models", id="compare-filter")
                yield SelectionList[str](id="compare-models")
                yield Static(self._picked_text(), id="compare-picked")
            with Vertical(id="compare-main"):
                with Columns(id="compare-columns"):
                    yield self._empty()
                yield Input(placeholder="One prompt for every chosen model…", id="compare-prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.update_status()
        self._load_models()
        self.query_one("#compare-filter", Input).focus()

    @staticmethod
    def _empty() -> Static:
        return Static(
            "Choose 2 to 6 models on the left (space toggles), type a prompt below, press enter.\n"
            "The answers stream side by side; 1-6 marks the winner, which is kept with the session.",
            id="compare-empty",
        )

    @property
    def busy(self) -> bool:
        return self.running

    def columns(self) -> list[CompareColumn]:
        return list(self.query(CompareColumn))

    # --- choosing models -------------------------------------------------------------------

    def show_model_list(self, link: ChatLink, models: list[str]) -> None:
        self.models = models
        self._show_models()

    def _show_models(self) -> None:
        needle = self.query_one("#compare-filter", Input).value.strip().lower()
        shown = [m for m in self.models if needle in m.lower()] if needle else self.models
        picker = self.query_one("#compare-models", SelectionList)
        picker.clear_options()
        picker.add_options([Selection(model, model, model in self.chosen) for model in shown])
        if shown:
            picker.highlighted = 0  # so space toggles the best match at once

    @on(Input.Changed, "#compare-filter")
    def _filter_changed(self) -> None:
        self._show_models()

    @on(Input.Submitted, "#compare-filter")
    def _filter_done(self) -> None:
        self.query_one("#compare-models", SelectionList).focus()

    @on(SelectionList.SelectionToggled, "#compare-models")
    def _toggled(self, event: SelectionList.SelectionToggled) -> None:
        model = event.selection.value
        if model in self.chosen:
            self.chosen.remove(model)
        elif len(self.chosen) >= MAX_MODELS:
            event.selection_list.deselect(model)
            self.notify(f"at most {MAX_MODELS} models side by side", severity="warning", timeout=3)
        else:
            self.chosen.append(model)
        self.query_one("#compare-picked", Static).update(self._picked_text())

    def choose(self, models: list[str]) -> None:
        """Choose these models (the palette, tests, a scripted screenshot)."""
        unknown = [m for m in models if m not in self.models]
        if unknown:
            raise ValueError(f"not a usable model: {', '.join(unknown)}")
        self.chosen = list(models[:MAX_MODELS])
        self._show_models()
        self.query_one("#compare-picked", Static).update(self._picked_text())

    def _picked_text(self) -> str:
        if not self.chosen:
            return f"none chosen; pick {MIN_MODELS} to {MAX_MODELS}"
        return f"{len(self.chosen)} of {MAX_MODELS}: " + ", ".join(
            f"{i}. {m}" for i, m in enumerate(self.chosen, 1))

    def action_pick(self) -> None:
        self.query_one("#compare-models", SelectionList).focus()

    def action_prompt(self) -> None:
        self.query_one("#compare-prompt", Input).focus()

    # --- running -------------------------------------------------------------------------

    @on(Input.Submitted, "#compare-prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.running:
            self.notify("a comparison is still running: escape stops it", severity="warning", timeout=3)
            return
        if not MIN_MODELS <= len(self.chosen) <= MAX_MODELS:
            self.notify(f"choose {MIN_MODELS} to {MAX_MODELS} models first (f2)", severity="warning")
            return
        link = self.link
        if link is None:
            self.notify("the console is not connected yet", severity="warning")
            return
        self.running = True
        self._run(link, prompt, list(self.chosen))

    @work(exclusive=True, group="compare", exit_on_error=False, description="comparison")
    async def _run(self, link: ChatLink, prompt: str, models: list[str]) -> None:
        area = self.query_one("#compare-columns", Columns)
        self.current = None
        session = self.session
        columns: list[CompareColumn] = []
        try:
            await area.remove_children()
            columns = [CompareColumn(i, model) for i, model in enumerate(models, 1)]
            await area.mount_all(columns)
            session_id = await session.open(link, prompt)
            self._say_where_kept()
            await asyncio.gather(*(self._answer(link, column, prompt, session_id) for column in columns))
        except asyncio.CancelledError:
            if columns and self.session is session:  # after ctrl+n the run's columns are gone, and so is its place
                self._record(prompt, columns, stopped=True)
            raise
        except Exception as error:
            reason = getattr(error, "message", None) or str(error) or type(error).__name__
            self.notify(reason, severity="error")
        else:
            self._record(prompt, columns, stopped=False)
            area.focus()
        finally:
            self.running = False

    def _record(self, prompt: str, columns: list[CompareColumn], *, stopped: bool) -> None:
        """Keep the comparison with the session, stopped ones too: what each model gave, and (later) the winner."""
        self.current = {"ts": time.time(), "prompt": prompt, "models": [c.model for c in columns],
                        "results": [c.result() for c in columns], "stopped": stopped, "winner": None}
        self.comparisons.append(self.current)
        self._save()

    async def _answer(self, link: ChatLink, column: CompareColumn, prompt: str, session_id: str | None) -> None:
        """One column: its own stream into its own Markdown; its errors stay in the column."""
        request = ChatRequest(messages=[ChatMessage(role="user", content=prompt)], stream=True)
        options = RouteOptions(model=column.model, failover=False)  # exactly this model, or its error
        ctx = CallContext(session_id=session_id, source="console", tag="compare")
        outcome = Outcome()
        sink = Markdown.get_stream(column.markdown)
        stream = None
        try:
            stream = link.stream(request, options, ctx)
            await relay(stream, sink, outcome, frame_s=COLUMN_FRAME_S)
        except asyncio.CancelledError:
            outcome.stopped = True
            raise
        except Exception as error:
            column.fail(getattr(error, "message", None) or str(error) or type(error).__name__)
        finally:
            await sink.stop()
            if stream is not None:
                await stream.aclose()
                if column.error is None:
                    column.show(Figures.of(stream, outcome), outcome)

    def _say_where_kept(self) -> None:
        if self.session.persistent is False and not self._said_in_memory:
            self._said_in_memory = True
            self.notify("no store: comparisons and winners are kept in memory only",
                        severity="warning")

    def action_stop(self) -> None:
        if self.running:
            self.workers.cancel_group(self, "compare")

    # --- the winner -----------------------------------------------------------------------

    @on(Button.Pressed, ".winner-button")
    def _winner_pressed(self, event: Button.Pressed) -> None:
        column = event.button.parent
        if isinstance(column, CompareColumn):
            self.action_winner(column.index)

    def action_winner(self, index: int) -> None:
        columns = self.columns()
        if self.running:
            self.notify("wait for every column to finish (or escape)", severity="warning", timeout=2)
            return
        if self.current is None or not columns:
            self.notify("run a comparison first", severity="warning", timeout=2)
            return
        if not 1 <= index <= len(columns):
            self.notify(f"there are {len(columns)} columns", severity="warning", timeout=2)
            return
        for column in columns:
            column.crown(column.index == index)
        self.current["winner"] = columns[index - 1].model
        self._save(winner=self.current["winner"])

    @work(exclusive=True, group="compare-save", exit_on_error=False)
    async def _save(self, winner: str | None = None) -> None:
        """Write every comparison so far into the session's metadata (the latest write has them all)."""
        link = self.link
        try:
            if link is not None:
                await self.session.update(link, comparisons=self.comparisons)
        except Exception as error:
            self.notify(f"the comparison was not saved: {error}", severity="error")
            return
        if winner is not None:
            where = f"session {self.session.session_id}" if self.session.session_id else "memory (no store)"
            self.notify(f"winner: {winner}; kept in {where}", timeout=3)

    async def action_new_session(self) -> None:
        if self.running:
            self.action_stop()
        self.session = SessionLog("compare")
        self.comparisons = []
        self.current = None
        area = self.query_one("#compare-columns", Columns)
        await area.remove_children()  # columns left on screen would offer a winner for a comparison no longer kept
        await area.mount(self._empty())
        self.notify("the next comparison starts a new session", timeout=2)

