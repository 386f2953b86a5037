"""The console's top-level views, each a Textual mode with its own screen stack.

The dashboard is registered here. Another view (chat, compare) registers itself
with `register_view` before the app starts; the app then gives it a mode, its
key and a command in the palette.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from textual.screen import Screen

REFRESH_STEPS = (0.25, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class View:
    name: str
    title: str
    key: str
    screen: Callable[[], Screen]
    description: str


VIEWS: dict[str, View] = {}


def register_view(view: View) -> None:
    VIEWS[view.name] = view


def _dashboard() -> Screen:
    from .screens.dashboard import DashboardScreen

    return DashboardScreen()


register_view(View("dashboard", "Dashboard", "d", _dashboard, "Live decisions, provider health, spend and sessions"))
