"""A table for live data: keyed rows, filtered and sorted in Python, drawn line by line.

`LiveTable.sync(rows)` is given every row (a key, a revision, a way to build
its cells) each time. Cells are built only for rows whose revision moved; the
table filters, sorts and caps the keys, and redraws only if what it shows
changed. Each drawn line is cached by (row key, revision, width, cursor,
stripe), so when new rows push the others down, the lines already drawn are
reused and only the new ones cost anything. It never clears and refills: the
cursor stays on its row while rows arrive above it, and the scroll position
stays where the user left it.

Why not `DataTable`: every `update_cell`, `add_row` or `remove_row` bumps the
DataTable's update count, which every cached cell render is keyed on, so the
next frame re-renders every visible cell; removals also rebuild its row index.
Under a steady stream of decisions every frame would pay for the whole visible
table; this one pays only for the lines that changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..format import short_id


class Cell(Text):
    """Text that also carries the value it sorts by (the number behind "$0.0012", say).

    `middle`: too long for its column, it loses its middle rather than its end (model ids).
    """

    def __init__(
        self, text: str, sort: Any = None, style: str = "", justify: str | None = None, *, middle: bool = False
    ) -> None:
        super().__init__(text, style=style, justify=justify, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]
        self.sort_value = text.lower() if sort is None else sort
        self.middle = middle

    def same(self, other: "Cell") -> bool:
        return self.plain == other.plain and str(self.style) == str(other.style)


def num(text: str, value: float | None, style: str = "") -> Cell:
    """A right-aligned number cell; missing values sort first."""
    return Cell(text, (value is not None, value if value is not None else 0.0), style=style, justify="right")


@dataclass(frozen=True, slots=True)
class Column:
    """`flex`: the column takes the room the others leave, as much as its longest cell needs (`width` at the least)."""

    key: str
    label: str
    width: int
    flex: bool = False


@dataclass(slots=True)
class Row:
    key: str
    rev: int
    cells: Callable[[], Sequence[Cell]]  # built only when the row changed


class RowFilter:
    """The `/` filter: words that must all match; `!word` must not; `col:value` looks in one column.

    Matching is case-insensitive on the text shown. A word that is a valid regular
    expression is used as one (so `gpt-4.*mini` works), else it is matched literally.
    """

    def __init__(self, text: str, columns: Sequence[str]) -> None:
        self.text = text.strip()
        self.terms: list[tuple[bool, int | None, re.Pattern[str]]] = []
        for word in self.text.split():
            negate = word.startswith("!")
            word = word[1:] if negate else word
            column = None
            if ":" in word:
                name, _, rest = word.partition(":")
                if name in columns and rest:
                    column, word = list(columns).index(name), rest
            if not word:
                continue
            try:
                pattern = re.compile(word, re.IGNORECASE)
            except re.error:
                pattern = re.compile(re.escape(word), re.IGNORECASE)
            self.terms.append((negate, column, pattern))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def match(self, cells: Sequence[Cell]) -> bool:
        for negate, column, pattern in self.terms:
            haystack = (cells[column].plain,) if column is not None else [c.plain for c in cells]
            found = any(pattern.search(text) for text in haystack)
            if found == negate:
                return False
        return True


@lru_cache(maxsize=512)
def _style(text: str) -> Style:
    return Style.parse(text) if text else Style()


def _fit(text: str, width: int, justify: str | None, middle: bool = False) -> str:
    if len(text) > width:
        if middle:
            return short_id(text, width)
        return text[: max(width - 1, 0)] + "…" if width else ""
    return text.rjust(width) if justify == "right" else text.ljust(width)


class LiveTable(ScrollView, can_focus=True):
    """Rows with keys; sortable by any column (s, S, or a click on its header), filterable, capped in size."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "live-table--header",
        "live-table--cursor",
        "live-table--even-row",
    }

    DEFAULT_CSS = """
    LiveTable {
        height: 1fr;
        background: $surface;
        color: $foreground;
        & > .live-table--header { text-style: bold; background: $panel; color: $foreground; }
        & > .live-table--even-row { background: $surface-lighten-1 50%; }
        & > .live-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        &:focus > .live-table--cursor {
            background: $block-cursor-background;
            color: $block-cursor-foreground;
            text-style: $block-cursor-text-style;
        }
        &:dark > .live-table--even-row { background: $surface-darken-1 40%; }
    }
    """

    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
    ]

    cursor_row: reactive[int] = reactive(0, init=False)

    class Selected(Message):
        """A row was chosen (enter, or a click on the highlighted row)."""

        def __init__(self, table: "LiveTable", key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> "LiveTable":
            return self.table

    def __init__(
        self,
        columns: Sequence[Column],
        *,
        sort_column: str | None = None,
        sort_reverse: bool = False,
        max_rows: int | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.spec = list(columns)
        self.column_keys = [c.key for c in columns]
        self.sort_column = sort_column or self.column_keys[0]
        self.sort_reverse = sort_reverse
        self.max_rows = max_rows
        self.row_filter = RowFilter("", self.column_keys)
        self.total_rows = 0  # rows offered before the filter and the cap
        self.matched_rows = 0  # rows the filter lets through, before the cap
        self._cache: dict[str, tuple[int, list[Cell]]] = {}  # key -> (rev, cells) of every row offered
        self._shown: list[str] = []  # keys of the rows shown, top to bottom
        self._last: list[Row] = []
        self._lines: dict[tuple[Any, ...], Strip] = {}
        self._header: Strip | None = None
        self._base: Style | None = None  # the widget's own style, read once per style change (it is not cheap)
        self._widths = [c.width for c in self.spec]  # as drawn: flex columns grow with the table
        self._flex = [i for i, c in enumerate(self.spec) if c.flex]
        self._longest: list[int] = [0] * len(self.spec)  # the widest cell shown, per flex column
        self._width = sum(w + 2 for w in self._widths)

    # --- the public knobs ------------------------------------------------------

    def set_columns(self, columns: Sequence[Column]) -> None:
        """Show these columns from now on: the next `sync`, with rows of as many cells, builds every row again."""
        self.spec = list(columns)
        self.column_keys = [c.key for c in columns]
        if self.sort_column not in self.column_keys:
            self.sort_column = self.column_keys[0]
        self.row_filter = RowFilter(self.row_filter.text, self.column_keys)
        self._widths = [c.width for c in self.spec]
        self._flex = [i for i, c in enumerate(self.spec) if c.flex]
        self._longest = [0] * len(self.spec)
        self._width = sum(w + 2 for w in self._widths)
        self.invalidate()
        self._fit_columns()

    def set_filter(self, text: str) -> None:
        self.row_filter = RowFilter(text, self.column_keys)
        self.sync(self._last)

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if reverse is None:
            reverse = not self.sort_reverse if column == self.sort_column else self.sort_reverse
        self.sort_column, self.sort_reverse = column, reverse
        self._header = None
        self.sync(self._last)

    def next_sort_column(self) -> str:
        index = self.column_keys.index(self.sort_column)
        column = self.column_keys[(index + 1) % len(self.column_keys)]
        self.sort_by(column, self.sort_reverse)
        return column

    def sort_label(self) -> str:
        label = next(c.label for c in self.spec if c.key == self.sort_column)
        return f"{label} {'↓' if self.sort_reverse else '↑'}"

    def invalidate(self) -> None:
        """Forget every built cell and line: the next sync rebuilds them (colours live in the cells)."""
        self._cache.clear()
        self._lines.clear()
        self._header = None

    # --- reading -------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._shown)

    def keys(self) -> list[str]:
        """The keys of the rows shown, top to bottom."""
        return list(self._shown)

    def key_at(self, row: int) -> str | None:
        return self._shown[row] if 0 <= row < len(self._shown) else None

    def index_of(self, key: str) -> int | None:
        try:
            return self._shown.index(key)
        except ValueError:
            return None

    def cells_of(self, key: str) -> list[Cell] | None:
        cached = self._cache.get(key)
        return cached[1] if cached is not None else None

    def cell_at(self, row: int, column: str) -> Cell | None:
        key = self.key_at(row)
        cells = self.cells_of(key) if key is not None else None
        return cells[self.column_keys.index(column)] if cells is not None else None

    @property
    def highlighted_key(self) -> str | None:
        return self.key_at(self.cursor_row)

    # --- the diff ------------------------------------------------------------------

    def sync(self, rows: Iterable[Row]) -> None:
        """Show `rows` filtered, sorted and capped; redraw only if what is shown changed."""
        rows = list(rows)
        self._last = rows
        self.total_rows = len(rows)
        cache = self._cache
        fresh: dict[str, tuple[int, list[Cell]]] = {}
        changed = False
        for row in rows:
            cached = cache.get(row.key)
            if cached is None or cached[0] != row.rev:
                cached = (row.rev, list(row.cells()))
                changed = True
            fresh[row.key] = cached
        self._cache = fresh
        keys = [k for k, (_, cells) in fresh.items() if not self.row_filter or self.row_filter.match(cells)]
        index = self.column_keys.index(self.sort_column)
        keys.sort(key=lambda k: fresh[k][1][index].sort_value, reverse=self.sort_reverse)
        self.matched_rows = len(keys)
        if self.max_rows is not None:
            keys = keys[: self.max_rows]
        if keys == self._shown and not changed:
            return
        if self._flex:
            longest = list(self._longest)
            for i in self._flex:
                longest[i] = max((len(fresh[k][1][i].plain) for k in keys), default=0)
            if longest != self._longest:
                self._longest = longest
                self._fit_columns()
        anchor = self.highlighted_key if self.cursor_row > 0 else None  # at the top: follow the newest
        self._shown = keys
        if len(self._lines) > 4 * max(len(keys), 100):
            self._lines.clear()  # drop lines of rows long gone
        self.virtual_size = Size(self._width, len(keys) + 1)
        moved = self.index_of(anchor) if anchor is not None else None
        if moved is not None:
            self.set_reactive(LiveTable.cursor_row, moved)
            self._scroll_to_cursor()
        elif self.cursor_row >= len(keys):
            self.set_reactive(LiveTable.cursor_row, max(len(keys) - 1, 0))
        self.refresh()

    # --- drawing ---------------------------------------------------------------------

    def on_resize(self) -> None:
        self._fit_columns()

    def _fit_columns(self) -> None:
        """Give the flex columns the room the fixed ones leave (the vertical scrollbar's kept free)."""
        flex = self._flex
        if not flex:
            return
        room = self.size.width - self.styles.scrollbar_size_vertical - sum(c.width + 2 for c in self.spec)
        share, extra = divmod(max(room, 0), len(flex))
        widths = [c.width for c in self.spec]
        for n, i in enumerate(flex):
            widths[i] = min(widths[i] + share + (1 if n < extra else 0), max(widths[i], self._longest[i]))
        if widths != self._widths:
            self._widths = widths
            self._width = sum(w + 2 for w in widths)
            self._lines.clear()
            self._header = None
            self.virtual_size = Size(self._width, len(self._shown) + 1)
            self.refresh()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        scroll_x, scroll_y = self.scroll_offset
        if self._base is None:
            self._base = self.rich_style
        plain = self._base
        if y == 0:
            return self._header_line().crop(scroll_x, scroll_x + width)
        index = scroll_y + y - 1
        if index >= len(self._shown):
            return Strip.blank(width, plain)
        key = self._shown[index]
        rev, cells = self._cache[key]
        cursor = index == self.cursor_row
        even = index % 2 == 1
        line_key = (key, rev, cursor, even, self.has_focus and cursor)
        strip = self._lines.get(line_key)
        if strip is None:
            if cursor:
                base = plain + self.get_component_rich_style("live-table--cursor")
            elif even:
                base = plain + self.get_component_rich_style("live-table--even-row")
            else:
                base = plain
            strip = self._row_line(cells, base, cursor)
            self._lines[line_key] = strip
        return strip.crop(scroll_x, scroll_x + width).extend_cell_length(width, plain)

    def _row_line(self, cells: Sequence[Cell], base: Style, cursor: bool) -> Strip:
        segments = []
        for width, cell in zip(self._widths, cells):
            style = base if cursor else base + _style(str(cell.style))
            segments.append(Segment(" " + _fit(cell.plain, width, cell.justify, cell.middle) + " ", style))
        return Strip(segments, self._width)

    def _header_line(self) -> Strip:
        if self._header is None:
            style = self.get_component_rich_style("live-table--header")
            segments = []
            for column, width in zip(self.spec, self._widths):
                label = column.label
                if column.key == self.sort_column:
                    label = f"{label}{'↓' if self.sort_reverse else '↑'}"
                segments.append(Segment(" " + _fit(label, width, None) + " ", style))
            self._header = Strip(segments, self._width)
        return self._header

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._lines.clear()
        self._header = None
        self._base = None

    def _on_focus(self, event: events.Focus) -> None:
        self._base = None  # :focus changes the background tint
        self.refresh()

    def _on_blur(self, event: events.Blur) -> None:
        self._base = None
        self.refresh()

    # --- the cursor ----------------------------------------------------------------------

    def move_cursor(self, row: int) -> None:
        self.cursor_row = max(0, min(row, len(self._shown) - 1))

    def watch_cursor_row(self) -> None:
        self._scroll_to_cursor()
        self.refresh()

    def _scroll_to_cursor(self) -> None:
        visible = max(self.scrollable_content_region.height - 1, 1)
        top = self.scroll_offset.y
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False)

    def action_cursor(self, step: int) -> None:
        self.move_cursor(self.cursor_row + step)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + direction * max(self.scrollable_content_region.height - 2, 1))

    def action_first(self) -> None:
        self.move_cursor(0)

    def action_last(self) -> None:
        self.move_cursor(len(self._shown) - 1)

    def action_select_cursor(self) -> None:
        key = self.highlighted_key
        if key is not None:
            self.post_message(self.Selected(self, key))

    def _on_click(self, event: events.Click) -> None:
        x, y = event.x + self.scroll_offset.x, event.y
        if y == 0:
            edge = 0
            for column, width in zip(self.spec, self._widths):
                edge += width + 2
                if x < edge:
                    self.sort_by(column.key)
                    break
            return
        row = self.scroll_offset.y + y - 1
        if 0 <= row < len(self._shown):
            if row == self.cursor_row:
                self.action_select_cursor()
            self.move_cursor(row)


class DrillTable(LiveTable):
    """A live table whose rows open a detail screen with enter (shown in the footer)."""

    BINDINGS = [Binding("enter", "select_cursor", "Open")]
