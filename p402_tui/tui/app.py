"""The P402 console: a Textual app over a `ConsoleSource`.

One worker drains the bus subscription: it waits for the first event, lets more
gather for one refresh interval, folds the batch into `ConsoleState` and asks
the screen on top to show it. So the screen is redrawn at most once per
interval however fast events come, and an idle console sleeps on the queue.

Views are registered in `VIEWS`; each is a Textual mode with its own screen
stack, reached by its key and from the command palette. The dashboard is the
first; other views (chat, compare) register themselves the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from textual import work
from textual.app import App, ScreenStackError
from textual.notifications import Notify, SeverityLevel
from textual.binding import Binding
from textual.reactive import reactive

from .commands import ConsoleCommands
from .views import REFRESH_STEPS, VIEWS, View, register_view
from .source import ConsoleSource
from .state import ConsoleState


def _chat_screen() -> Any:
    from .screens.chat import ChatScreen

    return ChatScreen()


def _compare_screen() -> Any:
    from .screens.compare import CompareScreen

    return CompareScreen()


register_view(View("chat", "Chat", "c", _chat_screen, "Stream answers from any model or the router, cost under each"))
register_view(View("compare", "Compare", "v", _compare_screen, "One prompt to 2-6 models side by side; mark a winner"))

IDLE_POLL_S = 5.0  # with no events, health is still re-read this often (circuits reopen with time)
STORE_POLL_S = 2.0  # sessions and ledger totals are re-read at most this often


class ConsoleApp(App):
    """The console. `source` None shows `state` as given (fixed pictures, tests)."""

    CSS_PATH = "app.tcss"
    TITLE = "P402 Console"
    COMMANDS = App.COMMANDS | {ConsoleCommands}
    ENABLE_COMMAND_PALETTE = True

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
        # Its own binding: where a text box takes "?", the footer offers f1 instead of showing "?" for it.
        Binding("f1", "help", "Help"),
        Binding("space", "toggle_pause", "Pause"),
        Binding("plus,equals_sign", "faster", "Faster", show=False),
        Binding("minus", "slower", "Slower", show=False),
        # k9s habit: one key, the next theme; the palette's theme picker would keep the keys that follow.
        Binding("t", "cycle_theme", "Theme", show=False),
    ]

    paused: reactive[bool] = reactive(False)
    refresh_interval: reactive[float] = reactive(0.5)

    def __init__(
        self,
        source: ConsoleSource | None = None,
        *,
        state: ConsoleState | None = None,
        refresh_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        view: str = "dashboard",
    ) -> None:
        super().__init__()
        self.state = state or ConsoleState()
        self.clock = clock
        self.source: ConsoleSource | None = None
        self.first_frame_at: float | None = None
        self.renders = 0
        self.dropped = 0
        self._pending_source = source
        self._mounted = False
        self._initial_view = view
        self._store_polled = 0.0
        self._store_busy = False
        self.set_reactive(ConsoleApp.refresh_interval, refresh_interval)
        for spec in VIEWS.values():
            self.add_mode(spec.name, spec.screen)
            self.bind(spec.key, f"view('{spec.name}')", description=spec.title, show=False)

    # --- lifecycle -------------------------------------------------------------------

    def on_mount(self) -> None:
        # A screen coming back shows the current message; the toasts it held of older ones leave holders.
        self.screen_change_signal.subscribe(self, lambda screen: self.call_after_refresh(self._tidy_toasts, screen))
        self.switch_mode(self._initial_view)
        self.call_after_refresh(self._first_frame)
        self._mounted = True
        if self._pending_source is not None:
            self.connect(self._pending_source)

    def _first_frame(self) -> None:
        self.first_frame_at = time.perf_counter()

    def connect(self, source: ConsoleSource) -> None:
        """Start showing `source` live (the runtime may open after the first frame)."""
        if not self._mounted:
            self._pending_source = source
            return
        self.source = source
        self.sub_title = source.label
        self._feed()

    @property
    def simulated(self) -> bool:
        return bool(self.source and self.source.simulated)

    # --- the feed ----------------------------------------------------------------------

    @work(exclusive=True, group="feed", exit_on_error=False, description="live events")
    async def _feed(self) -> None:
        source = self.source
        assert source is not None
        subscription = source.subscribe()  # first: nothing decided while the history is read goes missing
        try:
            try:
                self.state.backfill(await source.history())
            except Exception as error:
                self.notify(f"past decisions not read: {error}", severity="warning")
            events: list[Any] = []
            force = True  # read the store now, not only once traffic comes
            while True:
                try:  # one bad batch or read must not end the live view: say what broke and go on
                    self.state.fold(events)
                    self.dropped = subscription.dropped
                    await self._poll(source, force=force)
                    self._show_notices()
                    if not self.paused:
                        await asyncio.sleep(0)  # keys pressed while the batch gathered go first
                        self.show_state()
                except Exception as error:
                    self.notify(f"live view not updated: {error}", severity="error")
                    await asyncio.sleep(1.0)
                try:
                    first = await asyncio.wait_for(subscription.get(), IDLE_POLL_S)
                except asyncio.TimeoutError:
                    first = None
                if first is not None:
                    await asyncio.sleep(self.refresh_interval)  # let a batch gather: one redraw per interval
                events = ([first] if first is not None else []) + subscription.drain()
                force = first is None
        finally:
            subscription.close()

    async def _poll(self, source: ConsoleSource, *, force: bool) -> None:
        """Read health every time; sessions and ledger totals at most every STORE_POLL_S."""
        self.state.set_health(source.health())
        now = time.monotonic()
        if self._store_busy or (not force and now - self._store_polled < STORE_POLL_S):
            return
        self._store_polled = now
        self._poll_store(source)

    @work(exclusive=True, group="store", exit_on_error=False, description="sessions and spend")
    async def _poll_store(self, source: ConsoleSource) -> None:
        self._store_busy = True
        revs = (self.state.sessions_rev, self.state.summary_rev)
        try:
            self.state.set_sessions(await source.sessions())
            summary = await source.summary()
            if summary is not None:
                self.state.set_summary(summary)
            if not self.paused and (self.state.sessions_rev, self.state.summary_rev) != revs:
                self.show_state()  # with no traffic the live loop waits seconds before it next draws
        except Exception as error:
            self.notify(f"could not read the store: {error}", severity="error")
        finally:
            self._store_busy = False

    def _show_notices(self) -> None:
        notices = self.state.notices
        if notices:
            worst = next((s for s in ("error", "warning") if any(n[0] == s for n in notices)), "information")
            self.notify("; ".join(message for _, message in notices[-3:]), severity=worst)  # type: ignore[arg-type]
        notices.clear()

    def show_state(self) -> None:
        """Redraw the live parts of the screen on top."""
        refresh = getattr(self.screen, "show_state", None)
        if refresh is not None:
            refresh(self.state)
            self.renders += 1

    # --- actions -------------------------------------------------------------------------

    def action_view(self, name: str) -> None:
        if name in VIEWS and self.current_mode != name:
            self.switch_mode(name)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_cycle_theme(self) -> None:
        names = sorted(self.available_themes)
        at = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(at + 1) % len(names)]
        self.notify(f"theme {self.theme}", timeout=2)

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """One line in the message corner (top right, over the end of the status line), which the
        newest message takes over: the title leads the text, since a second line or a stack of
        toasts would cover the panes under them."""
        text = " ".join((f"{title}: {message}" if title else message).split())
        super().notify(text, severity=severity, timeout=timeout, markup=markup)

    def on_notify(self, event: Notify) -> None:
        self.clear_notifications()  # runs before App's own handler adds the new one
        try:
            screen = self.screen
        except ScreenStackError:  # a notice that arrives as the app closes: no screen is left to tidy
            return
        self._tidy_toasts(screen, every=True)

    def _tidy_toasts(self, screen: Any, every: bool = False) -> None:
        """Textual takes a replaced toast out but leaves its holder: a blank line in the one-line
        message corner that would push the next toast out of sight."""
        for holder in screen.query("ToastHolder"):
            if every or not holder.children:
                holder.remove()

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused

    def watch_paused(self, paused: bool) -> None:
        if not paused:
            self.show_state()
        self._status_changed()

    def action_faster(self) -> None:
        self.set_refresh_interval(_step(self.refresh_interval, -1))

    def action_slower(self) -> None:
        self.set_refresh_interval(_step(self.refresh_interval, +1))

    def set_refresh_interval(self, seconds: float) -> None:
        self.refresh_interval = seconds
        self.notify(f"refreshing every {seconds:g}s", timeout=2)

    def watch_refresh_interval(self) -> None:
        self._status_changed()

    def _status_changed(self) -> None:
        update = getattr(self.screen, "update_status", None)
        if update is not None:
            update()

    def status_fields(self) -> dict[str, Any]:
        requests_per_s, error_rate = self.state.rates(self.clock())
        return {
            "label": self.source.label if self.source else "offline",
            "simulated": self.simulated,
            "paused": self.paused,
            "interval": self.refresh_interval,
            "rate": requests_per_s,
            "errors": error_rate,
            "dropped": self.dropped,
        }


def _step(current: float, direction: int) -> float:
    index = min(range(len(REFRESH_STEPS)), key=lambda i: abs(REFRESH_STEPS[i] - current))
    return REFRESH_STEPS[max(0, min(len(REFRESH_STEPS) - 1, index + direction))]
