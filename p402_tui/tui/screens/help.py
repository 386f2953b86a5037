"""`?`: every key of every view, read from the bindings themselves so it never goes stale."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from ..views import VIEWS

FILTERS = """\
## Filters (`/` on any table)

| you type | shows rows |
|---|---|
| `groq` | with *groq* in any column |
| `groq cost` | with both words |
| `!cached` | without *cached* |
| `status:error` | whose Status column has *error* |
| `gpt-4.*mini` | matching the regular expression |

Enter keeps the filter and returns to the table; escape clears it.
"""

INTRO = """\
# P402 Console: keys

Keyboard first, like k9s: the footer shows the keys of the view you are in,
`ctrl+p` finds every action by name, and `tab` moves between panes.
Live panes redraw at most once per refresh interval (`+` and `-` change it);
`space` freezes them while you read, events keep being counted meanwhile.
"""


def _key(binding: Binding) -> str:
    keys = binding.key_display or binding.key
    names = {"question_mark": "?", "slash": "/", "equals_sign": "=", "space": "space", "backspace": "backspace"}
    return ", ".join(f"`{names.get(k.strip(), k.strip())}`" for k in keys.split(","))


def _section(title: str, bindings: list[Binding]) -> str:
    lines = [f"## {title}", "", "| key | does |", "|---|---|"]
    for binding in bindings:
        lines.append(f"| {_key(binding)} | {binding.description or binding.action} |")
    return "\n".join(lines) + "\n"


def help_markdown() -> str:
    from ..app import ConsoleApp
    from ..widgets.table import LiveTable
    from .base import PaneScreen
    from .dashboard import DashboardScreen
    from .decision import DecisionScreen
    from .session import SessionScreen

    def own(cls: type) -> list[Binding]:
        return [b if isinstance(b, Binding) else Binding(*b) for b in cls.__dict__.get("BINDINGS", [])]

    everywhere = own(ConsoleApp) + [
        Binding(view.key, "", f"{view.title}: {view.description}") for view in VIEWS.values()
    ] + [
        Binding("ctrl+p", "", "Command palette: every action by name"),
        Binding("tab,shift+tab", "", "Next / previous pane"),
    ]
    panes = own(PaneScreen) + own(LiveTable) + [Binding("up,down,pgup,pgdn,home,end", "", "Move in a table")]
    return "\n".join(
        [
            INTRO,
            _section("Everywhere", everywhere),
            _section("Every screen of panes", panes),
            _section("Dashboard", own(DashboardScreen)),
            _section("Decision", own(DecisionScreen)),
            _section("Session", own(SessionScreen)),
            FILTERS,
        ]
    )


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(help_markdown(), id="help-text")

    def action_close(self) -> None:
        self.dismiss()
