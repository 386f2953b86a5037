"""What every screen made of panes shares: filter, sort, zoom, and moving between panes."""

from __future__ import annotations

from collections.abc import Iterable

from textual.binding import Binding
from textual.screen import Screen

from ..widgets.pane import Pane
from ..widgets.table import LiveTable, Row


class PaneScreen(Screen):
    """Subclasses draw their panes in `redraw`, which runs again after a theme change."""

    # Escape's own bindings decide: a kept filter goes first, then the zoom (Textual would
    # otherwise take escape for the zoom before any binding sees it).
    ESCAPE_TO_MINIMIZE = False

    BINDINGS = [
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("z", "maximize_pane", "Zoom"),
    ]

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, self._theme_changed)

    def _theme_changed(self, _theme: object) -> None:
        for table in self.query(LiveTable):
            table.invalidate()  # colours live in the cells: build them again
        self.redraw()

    def redraw(self) -> None:
        raise NotImplementedError

    def fill(self, name: str, rows: Iterable[Row]) -> None:
        """Bring one pane's table up to date with `rows` (only changed lines redraw) and retitle it."""
        pane = self.query_one(f"#{name}", Pane)
        assert pane.table is not None
        pane.table.sync(rows)
        pane.update_title()

    def focused_pane(self) -> Pane | None:
        widget = self.focused
        while widget is not None and not isinstance(widget, Pane):
            widget = widget.parent  # type: ignore[assignment]
        return widget

    def action_focus_pane(self, name: str) -> None:
        pane = self.query_one(f"#{name}", Pane)
        if self.maximized is not None and self.maximized is not pane:
            self.minimize()
        pane.focus_body()

    def action_filter(self) -> None:
        pane = self.focused_pane()
        if pane is None or not pane.open_filter():
            self.notify("this pane has no table to filter", severity="warning", timeout=2)

    def action_sort(self) -> None:
        pane = self.focused_pane()
        if pane is not None and pane.table is not None:
            pane.table.next_sort_column()
            pane.update_title()

    def action_reverse(self) -> None:
        pane = self.focused_pane()
        if pane is not None and pane.table is not None:
            pane.table.sort_by(pane.table.sort_column, not pane.table.sort_reverse)
            pane.update_title()

    def action_maximize_pane(self) -> None:
        if self.maximized is not None:
            self.minimize()
            return
        pane = self.focused_pane()
        if pane is not None:
            self.maximize(pane, container=False)
