"""The top line: product, where the data comes from (SIMULATED in the demo), rate, errors, live or paused."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from ..format import pct
from .palette import Palette


def status_text(fields: dict[str, Any], colors: Palette, view: str = "") -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(" P402 Console ", style="bold reverse")
    if view:
        text.append(f" {view}", style="bold")
    text.append("  ")
    if fields["simulated"]:
        text.append(" SIMULATED ", style=f"bold reverse {colors.warning}")
        text.append(" no keys, no network", style="dim")
    else:
        text.append(f" {fields['label']} ", style="reverse")
    text.append(f"   {fields['rate']:.1f} req/s", style="bold")
    errors = fields["errors"]
    text.append(f"   {pct(errors)} errors", style=colors.error if errors >= 0.05 else "")
    if fields["dropped"]:
        text.append(f"   {fields['dropped']:,} events dropped", style=colors.warning)
    text.append("   ")
    if fields["paused"]:
        text.append(" ❚❚ PAUSED ", style=f"bold reverse {colors.warning}")
        text.append("  space resumes", style="dim")
    else:
        text.append(f"● live every {fields['interval']:g}s", style=colors.ok)
    return text


class StatusLine(Static):
    DEFAULT_CSS = "StatusLine { height: 1; width: 1fr; }"

    def __init__(self) -> None:
        super().__init__(id="status-line")
        self._last: Text | None = None

    def show(self, text: Text) -> None:
        if self._last is None or text.plain != self._last.plain or text.spans != self._last.spans:
            self._last = text
            self.update(text, layout=False)  # one line, always: no need to lay the screen out again
