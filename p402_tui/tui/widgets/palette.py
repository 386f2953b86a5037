"""Status colours taken from the active Textual theme, for cells drawn as Rich text."""

from __future__ import annotations

from dataclasses import dataclass

from rich.color import Color as RichColor, ColorParseError
from textual.app import App

SERIES_FALLBACK = ("#4EBF71", "#0178D4", "#ffa62b", "#ba3c5b", "#a371f7", "#2ec4b6", "#e0e0e0")


@dataclass(frozen=True, slots=True)
class Palette:
    ok: str
    error: str
    warning: str
    accent: str
    primary: str
    muted: str

    def status(self, status: str) -> str:
        return {
            "ok": self.ok,
            "healthy": self.ok,
            "closed": self.ok,
            "cached": self.accent,
            "active": self.ok,
            "error": f"bold {self.error}",
            "refused": self.error,
            "down": f"bold {self.error}",
            "open": f"bold {self.error}",
            "retrying": self.warning,
            "degraded": self.warning,
            "half_open": self.warning,
            "paused": self.warning,
            "over budget": f"bold {self.error}",
        }.get(status, self.muted)

    def series(self) -> list[str]:
        """Distinct colours for chart lines, the theme's own first."""
        seen: list[str] = []
        for colour in (self.primary, self.ok, self.warning, self.error, self.accent, *SERIES_FALLBACK):
            if colour.lower() not in (c.lower() for c in seen):
                seen.append(colour)
        return seen


def palette_of(app: App) -> Palette:
    theme = app.current_theme
    return Palette(
        ok=_rich(theme.success, "green"),
        error=_rich(theme.error, "red"),
        warning=_rich(theme.warning, "yellow"),
        accent=_rich(theme.accent, "cyan"),
        primary=_rich(theme.primary, "blue"),
        muted="dim",
    )


def _rich(colour: str | None, default: str) -> str:
    """A theme colour as Rich spells it: the ANSI themes say ansi_red, which Rich only knows as red
    (the terminal's own red, which is the point of those themes)."""
    if not colour:
        return default
    colour = colour.removeprefix("ansi_")
    try:
        RichColor.parse(colour)
    except ColorParseError:
        return default
    return colour
