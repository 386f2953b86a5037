"""Requests and tokens per minute over a sliding window, per key, in this process.

Tokens are taken on the estimate before the call and replaced by the real count
after it, so a burst of large requests is held back before it goes upstream.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


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


@dataclass(slots=True)
class Window:
    """One key's last minute: when each request started, and the tokens each took."""

    requests: deque[float] = field(default_factory=deque)
    tokens: dict[str, tuple[float, int]] = field(default_factory=dict)  # request id -> (when, tokens)

    def trim(self, now: float) -> None:
        start = now - WINDOW_S
        while self.requests and self.requests[0] <= start:
            self.requests.popleft()
        if self.tokens:
            for rid in [rid for rid, (t, _) in self.tokens.items() if t <= start]:
                del self.tokens[rid]

    def used_tokens(self) -> int:
        return sum(n for _, n in self.tokens.values())

    def take_request(self, rpm: int | None, tpm: int | None, now: float) -> Verdict:
        """Count one request if `rpm` allows it."""
        self.trim(now)
        ok = rpm is None or len(self.requests) < rpm
        wait = 0.0 if ok else self.requests[0] + WINDOW_S - now
        if ok:
            self.requests.append(now)
        return Verdict(ok, wait, self.headers(rpm, tpm, now))

    def take_tokens(self, request_id: str, estimate: int, tpm: int | None, rpm: int | None, now: float) -> Verdict:
        """Reserve `estimate` tokens for the request if `tpm` allows them."""
        self.trim(now)
        used = self.used_tokens()
        if tpm is not None and used + estimate > tpm:
            # Wait until enough of the window's tokens have aged out (a whole window if it can never fit).
            wait = WINDOW_S
            if estimate <= tpm:
                freed = 0
                for t, n in sorted(self.tokens.values()):
                    freed += n
                    if used - freed + estimate <= tpm:
                        wait = t + WINDOW_S - now
                        break
            return Verdict(False, wait, self.headers(rpm, tpm, now))
        self.tokens[request_id] = (now, estimate)
        return Verdict(True, 0.0, self.headers(rpm, tpm, now))

    def drop_tokens(self, request_id: str) -> None:
        self.tokens.pop(request_id, None)

    def settle_tokens(self, request_id: str, actual: int) -> None:
        taken = self.tokens.get(request_id)
        if taken is not None:
            self.tokens[request_id] = (taken[0], actual)

    def headers(self, rpm: int | None, tpm: int | None, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        if rpm is not None:
            out["x-ratelimit-limit-requests"] = str(rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, rpm - len(self.requests)))
            out["x-ratelimit-reset-requests"] = duration(self.requests[0] + WINDOW_S - now if self.requests else 0)
        if tpm is not None:
            oldest = min((t for t, _ in self.tokens.values()), default=None)
            out["x-ratelimit-limit-tokens"] = str(tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self.used_tokens()))
            out["x-ratelimit-reset-tokens"] = duration(oldest + WINDOW_S - now if oldest is not None else 0)
        return out
