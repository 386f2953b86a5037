"""How numbers look on screen: money, durations, times, bars and sparklines. No Textual here."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

SPARKS = "▁▂▃▄▅▆▇█"


def usd(value: float | None) -> str:
    """Dollars with enough digits to tell small calls apart: $0.000123, $0.0123, $1.23."""
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    if abs(value) < 0.001:
        return fine_usd(value)
    if abs(value) < 1:
        return f"${value:.4f}"
    return f"${value:,.2f}"


def fine_usd(value: float) -> str:
    """Six decimals; under a micro-dollar (a few tokens on a cheap model) two significant digits,
    since six decimals would read as free. The console and the CLI both price calls this small."""
    if value and abs(value) < 0.000001:
        return f"${value:.{1 - math.floor(math.log10(abs(value)))}f}"
    return f"${value:.6f}"


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1000:
        return f"{value:.0f}ms"
    return f"{value / 1000:.1f}s"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def clock(ts: float) -> str:
    """Local wall-clock time of an event."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def bar(fraction: float, width: int = 10) -> str:
    """A budget bar: █ for what is spent, ░ for what is left (eighths for the edge)."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part else ""
    filled = "█" * full + partial.strip()
    return filled + "░" * (width - len(filled))


def sparkline(values: Sequence[float], width: int = 12) -> str:
    """The last `width` values as block characters scaled to their own maximum."""
    values = list(values)[-width:]
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(int(v / top * (len(SPARKS) - 1) + 0.5), len(SPARKS) - 1)] for v in values)


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def short_id(text: str, width: int) -> str:
    """A model id cut in the middle, where ids differ least: the provider and the model's own name stay.

    `fireworks/accounts/fireworks/models/llama-v3p1-8b-instruct` in 34 columns is
    `fireworks/…/llama-v3p1-8b-instruct`: whole path segments are dropped while they must
    be, and only a name too long for what is left loses characters from its own middle.
    """
    if len(text) <= width:
        return text
    if width < 2:
        return text[:width]
    head, sep, rest = text.partition("/")
    if sep and len(head) + 3 < width:
        parts = rest.split("/")
        for at in range(1, len(parts)):
            tail = "/".join(parts[at:])
            if len(head) + 3 + len(tail) <= width:
                return f"{head}/…/{tail}"
        name, dropped = parts[-1], "…/" if len(parts) > 1 else ""
        keep = width - len(head) - len(dropped) - 2
        if keep >= 6:  # the provider, then the name's start and (more of) its end: sizes and versions
            front = keep * 2 // 5
            return f"{head}/{dropped}{name[:front]}…{name[len(name) - (keep - front):]}"
    front = (width - 1) // 2
    return text[:front] + "…" + text[len(text) - (width - 1 - front):]
