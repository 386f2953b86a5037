"""Requests and tokens per minute, per key: what a refusal says and the x-ratelimit-* headers.

The windows themselves are counted in the database (`store.shared`), shared by every gateway on
it. Tokens are taken on the estimate before the call and replaced by the real count after it, so
a burst of large requests is held back before it goes upstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..store.shared import WINDOW_S, Window

__all__ = ["WINDOW_S", "Verdict", "duration", "headers", "token_wait"]


@dataclass(slots=True)
class Verdict:
    """What a check found: refused or not, and the x-ratelimit-* figures of the moment."""

    ok: bool
    retry_after_s: float
    headers: dict[str, str]


def duration(seconds: float) -> str:
    """As OpenAI writes x-ratelimit-reset-*: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def headers(window: Window, rpm: int | None, tpm: int | None, now: float) -> dict[str, str]:
    out: dict[str, str] = {}
    reset = duration(window.reset_in(now) if window.requests or window.tokens else 0)
    if rpm is not None:
        out["x-ratelimit-limit-requests"] = str(rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, rpm - window.requests))
        out["x-ratelimit-reset-requests"] = reset
    if tpm is not None:
        out["x-ratelimit-limit-tokens"] = str(tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, tpm - window.tokens))
        out["x-ratelimit-reset-tokens"] = reset
    return out


def token_wait(window: Window, estimate: int, tpm: int, now: float) -> float:
    """How long until `estimate` tokens fit: the window's end, or a whole window if they never can."""
    return WINDOW_S if estimate > tpm else window.reset_in(now)
