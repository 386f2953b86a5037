"""`?`: every key of every view, read from the bindings themselves so it never goes stale."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ..views import VIEWS

INTRO = (
    "Keyboard first, like k9s: the footer shows the keys of the view you are in, ctrl+p finds every "
    "action by name, tab moves between panes. Live panes redraw at most once per refresh interval "
    "(+ and - change it); space freezes them while you read, and events keep being counted meanwhile."
)

FILTERS = [
    ("groq", "rows with groq in any column"),
    ("groq cost", "rows with both words"),
    ("!cached", "rows without cached"),
    ("status:error", "rows whose Status column has error"),
    ("gpt-4.*mini", "a regular expression"),
    ("enter / escape", "keep the filter / clear it"),
]

KEY_NAMES = {"question_mark": "?", "slash": "/", "equals_sign": "=", "plus": "+", "minus": "-"}

Section = tuple[str, list[tuple[str, str]]]


def _keys(binding: Binding) -> str:
    keys = binding.key_display or binding.key
    return " ".join(KEY_NAMES.get(k.strip(), k.strip()) for k in keys.split(","))


def _own(cls: type) -> list[tuple[str, str]]:
    bindings = [b if isinstance(b, Binding) else Binding(*b) for b in cls.__dict__.get("BINDINGS", [])]
    rows = []
    family_shown: set[str] = set()  # a binding with a key display ("1-6") speaks for its action's whole family
    for binding in bindings:
        family = binding.action.split("(", 1)[0]
        if family in family_shown:
            continue
        if binding.key_display:
            family_shown.add(family)
        rows.append((_keys(binding), binding.description or binding.action))
    return rows


def help_sections() -> list[Section]:
    from ..app import ConsoleApp
    from ..widgets.pane import FilterBar
    from ..widgets.table import DrillTable
    from .base import PaneScreen
    from .chat import ChatScreen, LinkedScreen
    from .compare import CompareScreen
    from .dashboard import DashboardScreen
    from .decision import DecisionScreen
    from .session import SessionScreen

    everywhere = _own(ConsoleApp) + [(view.key, f"{view.title} view") for view in VIEWS.values()]
    everywhere += [("ctrl+p", "Command palette: every action"), ("tab shift+tab", "Next / previous pane")]
    panes = _own(PaneScreen) + _own(DrillTable) + [("↑ ↓ pgup pgdn", "Move in a table"), ("click header", "Sort by it")]
    return [
        ("Everywhere", everywhere),
        ("Screens of panes", panes),
        ("Dashboard", _own(DashboardScreen)),
        ("Decision", _own(DecisionScreen)),
        ("Session", _own(SessionScreen)),
        ("Chat", _own(LinkedScreen) + _own(ChatScreen)),
        ("Compare", _own(LinkedScreen) + _own(CompareScreen)),
        ("Filter bar", _own(FilterBar)),
        ("Filters (/ on any table)", FILTERS),
    ]


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    seen = set()
    for keys, does in rows:
        if (keys, does) in seen:
            continue
        seen.add((keys, does))
        table.add_row(keys, does)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(Text.assemble(("P402 Console: keys\n", "bold"), (INTRO, "dim")), id="help-intro")
            with Grid(id="help-grid"):
                for title, rows in help_sections():
                    yield Static(_table(title, rows), classes="help-section")

    def action_close(self) -> None:
        self.dismiss()
