"""A DataTable for live data: keyed rows diffed in place, with filter and sort.

`LiveTable.sync(rows)` is given the full set of rows each time; it removes the
rows that went away, adds the new ones and updates only the cells whose text
changed, all inside one `batch_update`. It never clears and refills, so the
cursor and the scroll position survive every refresh.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowDoesNotExist


class Cell(Text):
    """Text that also carries the value it sorts by (the number behind "$0.0012", say)."""

    def __init__(self, text: str, sort: Any = None, style: str = "", justify: str | None = None) -> None:
        super().__init__(text, style=style, justify=justify, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]
        self.sort_value = text.lower() if sort is None else sort

    def same(self, other: "Cell") -> bool:
        return self.plain == other.plain and str(self.style) == str(other.style)


def num(text: str, value: float | None, style: str = "") -> Cell:
    """A right-aligned number cell; missing values sort first."""
    return Cell(text, (value is not None, value if value is not None else 0.0), style=style, justify="right")


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    width: int | None = None


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


class LiveTable(DataTable):
    """Rows with keys, updated cell by cell; sortable by any column, filterable, capped in size."""

    DEFAULT_CSS = """
    LiveTable { height: 1fr; }
    """

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
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self.spec = list(columns)
        self.column_keys = [c.key for c in columns]
        self.sort_column = sort_column or self.column_keys[0]
        self.sort_reverse = sort_reverse
        self.max_rows = max_rows
        self.row_filter = RowFilter("", self.column_keys)
        self.total_rows = 0  # rows offered before the filter and the cap
        self._shown: dict[str, tuple[int, list[Cell]]] = {}  # key -> (rev, cells) as drawn
        self._cache: dict[str, tuple[int, list[Cell]]] = {}  # key -> (rev, cells) of every row offered
        self._order: list[str] = []
        self._last: list[Row] = []

    def on_mount(self) -> None:
        for column in self.spec:
            self.add_column(column.label, key=column.key, width=column.width)

    # --- the public knobs ------------------------------------------------------

    def set_filter(self, text: str) -> None:
        self.row_filter = RowFilter(text, self.column_keys)
        self.sync(self._last)

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if reverse is None:
            reverse = not self.sort_reverse if column == self.sort_column else self.sort_reverse
        self.sort_column, self.sort_reverse = column, reverse
        self._order = []
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
        """Rebuild every cell on the next sync (after a theme change: colours live in the cells)."""
        self._cache.clear()
        self._shown = {key: (-1, cells) for key, (_, cells) in self._shown.items()}

    @property
    def highlighted_key(self) -> str | None:
        if not self.row_count or self.cursor_row < 0:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except RowDoesNotExist:
            return None

    # --- the diff ------------------------------------------------------------------

    def sync(self, rows: Iterable[Row]) -> None:
        """Make the table show `rows` (filtered, sorted, capped) touching only what changed."""
        rows = list(rows)
        self._last = rows
        self.total_rows = len(rows)
        cache = self._cache
        fresh: dict[str, tuple[int, list[Cell]]] = {}
        for row in rows:
            cached = cache.get(row.key)
            fresh[row.key] = cached if cached is not None and cached[0] == row.rev else (row.rev, list(row.cells()))
        self._cache = fresh
        keys = [k for k, (_, cells) in fresh.items() if not self.row_filter or self.row_filter.match(cells)]
        index = self.column_keys.index(self.sort_column)
        keys.sort(key=lambda k: fresh[k][1][index].sort_value, reverse=self.sort_reverse)
        if self.max_rows is not None:
            keys = keys[: self.max_rows]
        wanted = set(keys)
        follow = self.cursor_row <= 0  # at the top: keep following the newest rows
        anchor = None if follow else self.highlighted_key
        order_changed = keys != self._order
        with self.app.batch_update():
            for key in [k for k in self._shown if k not in wanted]:
                self.remove_row(key)
                del self._shown[key]
            for key in keys:
                rev, cells = fresh[key]
                shown = self._shown.get(key)
                if shown is None:
                    self.add_row(*cells, key=key)
                elif shown[0] != rev:
                    for column, old, new in zip(self.column_keys, shown[1], cells):
                        if not old.same(new):
                            self.update_cell(key, column, new)
                self._shown[key] = (rev, cells)
            if order_changed:
                self.sort(self.sort_column, key=_sort_value, reverse=self.sort_reverse)
                self._order = keys
                if anchor is not None and anchor in wanted:
                    self.move_cursor(row=self.get_row_index(anchor), animate=False, scroll=False)
                elif follow and self.row_count:
                    self.move_cursor(row=0, animate=False, scroll=False)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(_column_name(event.column_key))


def _sort_value(cell: Cell) -> Any:
    return cell.sort_value


def _column_name(key: ColumnKey) -> str:
    return str(key.value)


class DrillTable(LiveTable):
    """A live table whose rows open a detail screen with enter (shown in the footer)."""

    BINDINGS = [Binding("enter", "select_cursor", "Open")]
