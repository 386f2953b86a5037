"""The command palette (ctrl+p): every console action, by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .views import REFRESH_STEPS, VIEWS

Command = tuple[str, Callable[[], object], str]


class ListedCommands(Provider):
    """A palette provider over a plain list of (name, action, help): subclasses say what `commands()` are."""

    def commands(self) -> Iterable[Command]:
        raise NotImplementedError

    async def discover(self) -> Hits:
        for name, run, help_text in self.commands():
            yield DiscoveryHit(name, run, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, run, help_text in self.commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), run, help=help_text)


class ConsoleCommands(ListedCommands):
    """Views, live-view control, panes (focus, zoom, filter, sort) and drill-downs."""

    def commands(self) -> Iterator[Command]:
        app = self.app
        screen = self.screen
        for view in VIEWS.values():
            yield f"View: {view.title}", partial(app.action_view, view.name), f"{view.description} ({view.key})"  # type: ignore[attr-defined]
        paused = getattr(app, "paused", False)
        yield (
            "Live: resume" if paused else "Live: pause",
            app.action_toggle_pause,  # type: ignore[attr-defined]
            "Freeze or unfreeze the live panes (space)",
        )
        for seconds in REFRESH_STEPS:
            yield (
                f"Live: refresh every {seconds:g}s",
                partial(app.set_refresh_interval, seconds),  # type: ignore[attr-defined]
                "How often live panes redraw (+ and - step through these)",
            )
        yield "Help: keys and filters", app.action_help, "Every key of every view (?)"  # type: ignore[attr-defined]
        yield "Keys: gateway keys", partial(self._keys, app), "Each key's role, spend against budget, rate, refusals"
        yield "Screenshot: save SVG", partial(app.action_screenshot), "Save an SVG of the screen in the current directory"

        from .screens.dashboard import PANES, DashboardScreen

        if isinstance(screen, DashboardScreen):
            for name in PANES:
                pane = screen.query_one(f"#{name}")
                title = pane.title  # type: ignore[attr-defined]
                yield f"Pane: focus {title}", partial(screen.action_focus_pane, name), "Tab and 1-4 move between panes"
                yield f"Pane: zoom {title}", partial(self._zoom, screen, name), "Fill the screen with this pane (z)"
                table = pane.table  # type: ignore[attr-defined]
                if table is None:
                    continue
                yield f"Filter: {title}", partial(self._filter, screen, name), "Show only matching rows (/)"
                for column in table.spec:
                    yield (
                        f"Sort: {title} by {column.label}",
                        partial(self._sort, screen, name, column.key),
                        "Sort this table by the column (s cycles, S reverses)",
                    )
            yield "Open: selected decision", partial(self._open, screen, "decisions"), "Candidates, exclusions, attempts (enter)"
            yield "Open: selected session", partial(self._open, screen, "sessions"), "Its requests and messages (enter)"
        else:
            back = getattr(screen, "action_back", None)
            if back is not None:
                yield "Back", back, "Return to the previous screen (escape)"

    @staticmethod
    def _keys(app) -> None:
        from .screens.keys import KeysScreen

        if not isinstance(app.screen, KeysScreen):
            app.push_screen(KeysScreen())

    @staticmethod
    def _zoom(screen, name: str) -> None:
        pane = screen.query_one(f"#{name}")
        screen.action_focus_pane(name)  # focus moves on the next turn: maximise the pane itself
        screen.maximize(pane, container=False)

    @staticmethod
    def _filter(screen, name: str) -> None:
        screen.query_one(f"#{name}").open_filter()

    @staticmethod
    def _sort(screen, name: str, column: str) -> None:
        pane = screen.query_one(f"#{name}")
        pane.table.sort_by(column)
        pane.update_title()

    @staticmethod
    def _open(screen, name: str) -> None:
        screen.action_focus_pane(name)
        table = screen.query_one(f"#{name}").table
        if table.row_count:
            table.action_select_cursor()
        else:
            screen.notify(f"no {name} to open yet", severity="warning", timeout=2)

