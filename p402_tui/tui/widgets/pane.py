"""A titled box around one live view, with its own `/` filter bar."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Input

from .table import LiveTable


class FilterBar(Input):
    """Typed text filters the pane's table as you type; enter keeps it, escape clears it."""

    BINDINGS = [Binding("escape", "clear", "Clear filter", show=True)]

    def __init__(self) -> None:
        super().__init__(placeholder="filter: words  !not  column:value  regex", classes="filter-bar")

    def action_clear(self) -> None:
        self.value = ""
        pane = self.parent
        if isinstance(pane, Pane):
            pane.close_filter()


class Pane(Vertical):
    """One dashboard pane. `body` is its table or chart; `z` maximises it, `/` filters it."""

    ALLOW_MAXIMIZE = True
    # Only while a filter is kept; otherwise escape goes on to the screen (restore, back).
    BINDINGS = [Binding("escape", "clear_filter", "Clear filter")]

    def __init__(self, title: str, body: Widget, *, id: str) -> None:
        super().__init__(id=id, classes="pane")
        self.title = title
        self.body = body
        self.border_title = title
        self.whole = 0  # how many rows there are in all, when the source sent only some (a session's requests)

    def compose(self) -> ComposeResult:
        yield self.body
        if isinstance(self.body, LiveTable):
            bar = FilterBar()
            bar.display = False
            yield bar

    @property
    def table(self) -> LiveTable | None:
        return self.body if isinstance(self.body, LiveTable) else None

    @property
    def filter_bar(self) -> FilterBar | None:
        found = self.query(FilterBar)
        return found.first() if found else None

    def focus_body(self) -> None:
        """Focus the table or chart inside (the spend pane's chart sits one level down)."""
        if self.body.can_focus:
            self.body.focus()
            return
        for widget in self.body.query("*"):
            if widget.can_focus:
                widget.focus()
                return

    def open_filter(self) -> bool:
        bar = self.filter_bar
        if bar is None:
            return False
        bar.display = True
        bar.focus()
        return True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "clear_filter":
            return self.table is not None and bool(self.table.row_filter)
        return True

    def action_clear_filter(self) -> None:
        bar = self.filter_bar
        if bar is not None:
            bar.value = ""
            bar.display = False
        if self.table is not None:
            self.table.set_filter("")
            self.update_title()
        self.refresh_bindings()

    def close_filter(self) -> None:
        bar = self.filter_bar
        if bar is None:
            return
        if not bar.value:
            bar.display = False
        self.body.focus()

    @on(Input.Changed, ".filter-bar")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self.table is not None:
            self.table.set_filter(event.value)
            self.update_title()
            self.refresh_bindings()

    @on(Input.Submitted, ".filter-bar")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.close_filter()

    def update_title(self, extra: str = "") -> None:
        """The border title: the pane's name, its row count, and the filter and sort in force."""
        parts = [self.title]
        table = self.table
        if table is not None:
            matched, total = table.matched_rows, table.total_rows
            count = f"{matched}" if matched == total else f"{matched}/{total}"  # n/m: the filter's doing
            if table.row_count < matched:  # the cap's: only the first rows in the sort order are drawn
                count = f"first {table.row_count} of {count}"
            elif self.whole > total:  # the source's cap, said the same way
                count = f"first {total} of {self.whole}" if matched == total else f"{matched}/first {total} of {self.whole}"
            parts.append(count)
            if table.row_filter:
                parts.append(f"/{table.row_filter.text}")
            parts.append(f"sort {table.sort_label()}")
        if extra:
            parts.append(extra)
        title = " · ".join(parts)
        if title != self.border_title:
            self.border_title = title
