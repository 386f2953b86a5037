"""Live provider health: passive stats from every call, outlier ejection, optional probes.

Every attempt the orchestrator makes is recorded here. Per provider (and per model)
we keep EWMA latency, time to first token and tokens/s, an error rate over a
sliding window, consecutive failures, requests per minute and a short latency
history for sparklines.

Ejection follows Envoy's outlier detection, per model first:

    a model is ejected when its error rate over the window reaches `error_rate_threshold`
      once the window holds `min_requests` calls (one unlucky call never ejects anything);
    a provider is ejected when `provider_ejected_models` of its models are ejected at
      once, or fail together at that rate and volume (one model may draw all its traffic),
      or at once on a rejected key, or after `hard_failures` connections refused in a row
      (the fast path: those say the whole host is unreachable);
    a 429 throttles only the model it came from (the provider when the key's whole
      quota is spent) for its Retry-After; without one for `rate_limit_default_s`,
      doubled for each further 429 before a success;
    an ejection lasts `base_ejection_s`, doubled for each ejection in a row up to
      `max_ejection_s`; then half-open admits up to `half_open_trials` calls at once:
      a success closes it, a failure ejects again for longer.

Ejection is advice, not a wall: the orchestrator never lets more than
`max_ejection_percent` of a request's candidates be skipped for ejection; beyond
that it tries the least-bad ejected ones anyway (`ejection()` says how bad). Only
a throttle, which the provider asked for, is always honoured.

`ProviderHealth` sums it up per provider for the console and the API: down while
the provider is ejected or its key throttled, degraded while half-open, while any
of its models is ejected or throttled, or while it fails often.

Time comes from an injectable clock (`time.monotonic` by default) so tests can
drive it without sleeping. Status changes are published as `HealthChanged`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ProviderError
from .events import EventBus, HealthChanged

if TYPE_CHECKING:
    from .adapters import Adapter

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"

# Errors that say nothing about the provider's health: the request itself was wrong,
# or too long for that one model (a bigger model will take it).
_NOT_HEALTH = frozenset({"bad_request", "context_length"})
# Errors of this machine's own egress (a proxy refusing): no provider is at fault, none is marked down.
_LOCAL = frozenset({"proxy"})
# Errors that mean no connection could be made to the provider's host.
_CONNECT_KINDS = frozenset({"connection", "connection_refused", "dns", "tls"})


@dataclass(slots=True)
class HealthPolicy:
    """When a model or provider is ejected and for how long: the `[health]` table (config.HealthConfig)."""

    window_s: float = 60.0
    window_max: int = 100  # the window also holds at most this many calls
    min_requests: int = 20
    error_rate_threshold: float = 0.5
    hard_failures: int = 3
    provider_ejected_models: int = 2
    base_ejection_s: float = 5.0
    max_ejection_s: float = 120.0
    max_ejection_percent: float = 50.0
    half_open_trials: int = 3
    rate_limit_default_s: float = 1.0
    rate_limit_max_s: float = 300.0
    auth_ejection_s: float = 60.0
    trial_timeout_s: float = 30.0  # a trial that never reports frees its slot
    degraded_error_rate: float = 0.2
    ewma_alpha: float = 0.3
    history: int = 60  # latency points kept for sparklines


class _Stats:
    """Running numbers for one provider or one model."""

    __slots__ = (
        "requests",
        "failures",
        "consecutive_failures",
        "latency_ewma",
        "ttft_ewma",
        "tps_ewma",
        "last_error",
        "window",
        "window_failures",
        "history",
    )

    def __init__(self, policy: HealthPolicy) -> None:
        self.requests = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.latency_ewma: float | None = None
        self.ttft_ewma: float | None = None
        self.tps_ewma: float | None = None
        self.last_error: str | None = None
        self.window: deque[tuple[float, bool, float]] = deque()  # (t, ok, latency_ms)
        self.window_failures = 0
        self.history: deque[float] = deque(maxlen=policy.history)

    def add(self, now: float, ok: bool, latency_ms: float, policy: HealthPolicy) -> None:
        self.requests += 1
        self.window.append((now, ok, latency_ms))
        if not ok:
            self.failures += 1
            self.window_failures += 1
        if len(self.window) > policy.window_max:
            self._pop()
        self.expire(now, policy)

    def _pop(self) -> None:
        _, ok, _ = self.window.popleft()
        if not ok:
            self.window_failures -= 1

    def expire(self, now: float, policy: HealthPolicy) -> None:
        horizon = now - policy.window_s
        while self.window and self.window[0][0] <= horizon:
            self._pop()

    def error_rate(self) -> float:
        return self.window_failures / len(self.window) if self.window else 0.0

    def tally_since(self, since: float) -> tuple[int, int]:
        """(calls, failures) in the window after `since`."""
        if not self.window or self.window[0][0] > since:
            return len(self.window), self.window_failures
        calls = failed = 0
        for t, ok, _ in reversed(self.window):
            if t <= since:
                break
            calls += 1
            failed += not ok
        return calls, failed

    def latencies(self) -> list[float]:
        return sorted(lat for _, ok, lat in self.window if ok)


def _ewma(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else previous + alpha * (value - previous)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class _Gate:
    """Ejection and throttle state of one model or one provider."""

    __slots__ = ("state", "until", "ejections", "reason", "trials", "since", "closed_at", "hard",
                 "throttled_until", "throttle_reason", "limited", "missing", "scope", "target", "source")

    def __init__(self, scope: str = "provider", target: str = "") -> None:
        self.scope = scope  # provider | model
        self.target = target  # its id
        self.source: str | None = None  # the other gateway whose ejection or throttle holds it (None: this one's)
        self.state = CLOSED
        self.until = 0.0  # while OPEN: clock time half-open begins
        self.ejections = 0  # in a row: the backoff's exponent
        self.reason = ""
        self.trials: list[float] = []  # start times of the trials under way while half-open
        self.since = -math.inf  # the error rate that ejects counts only calls after the last closing
        self.closed_at = -math.inf
        self.hard = 0  # consecutive hard failures (providers only)
        self.throttled_until = 0.0
        self.throttle_reason = ""
        self.limited = 0  # 429s without a wait since the last success: the default wait's exponent
        self.missing = False  # ejected because the provider does not know the model: says nothing of the provider

    def ejected(self, now: float) -> bool:
        return self.state == OPEN and now < self.until

    def throttled(self, now: float) -> bool:
        return now < self.throttled_until

    def trial_due(self, now: float) -> bool:
        """Half-open, or open with its time served: a call now is a trial."""
        return self.state == HALF_OPEN or (self.state == OPEN and now >= self.until)


@dataclass(slots=True)
class Ejection:
    """Why a model may not be called now, for the orchestrator's least-bad choice."""

    throttled: bool  # the provider asked for the wait: never overridden
    retry_in_s: float  # until it may be called again (a half-open one with its trials full: about now)
    error_rate: float  # over the window, the worse of the model's and its provider's


@dataclass(slots=True)
class ProviderHealth:
    """What the console and `/p402/health` show for one provider."""

    provider: str
    status: str = HEALTHY
    reason: str = ""
    circuit: str = CLOSED
    retry_at: float | None = None  # wall-clock (epoch s) of the next trial while open
    failures: int = 0
    consecutive_failures: int = 0
    error_rate: float = 0.0
    requests: int = 0
    requests_per_min: float = 0.0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_ewma: float | None = None
    ttft_ms_ewma: float | None = None
    tokens_per_s: float | None = None
    last_error: str | None = None
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "provider": self.provider,
            "status": self.status,
            "reason": self.reason,
            "circuit": self.circuit,
            "retry_at": self.retry_at,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "error_rate": round(self.error_rate, 4),
            "requests": self.requests,
            "requests_per_min": round(self.requests_per_min, 2),
            "latency_ms_p50": r(self.latency_ms_p50),
            "latency_ms_p95": r(self.latency_ms_p95),
            "latency_ms_ewma": r(self.latency_ms_ewma),
            "ttft_ms_ewma": r(self.ttft_ms_ewma),
            "tokens_per_s": r(self.tokens_per_s),
            "last_error": self.last_error,
            "history": [round(v, 2) for v in self.history],
        }


@dataclass(slots=True)
class LiveModel:
    """What the router reads for one model: measured speed (None until measured) and its success rate."""

    ttft_ms: float | None
    tokens_per_s: float | None
    health: float


class HealthTracker:
    """Health of every provider and model, from the calls that pass through; decides ejections and throttles.

    The orchestrator asks `allow()` before each call (it takes a half-open trial slot),
    reports the outcome with `record_success` / `record_failure` (or `release` when the
    call was cancelled), and asks `ejection()` when it must choose which ejected
    candidates to try anyway. The router reads `blocked()`, `provider_factor()` and
    `model_live()`; the console and the API read `provider()` / `snapshot()`.
    """

    def __init__(
        self,
        *,
        bus: EventBus | None = None,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.bus = bus
        self.policy = policy or HealthPolicy()
        self.clock = clock
        self.on_change = on_change  # called with ProviderHealth.to_dict() when status or circuit changes
        # Told of each ejection and throttle decided here (not those applied from elsewhere), for the
        # other gateways of a fleet: {"scope", "target", "kind": eject|throttle, "until" (wall-clock), "reason"}.
        self.on_gate: Callable[[dict[str, Any]], None] | None = None
        self._providers: dict[str, _Stats] = {}
        self._models: dict[str, _Stats] = {}
        self._gates: dict[str, _Gate] = {}  # provider id -> its gate
        self._model_gates: dict[str, _Gate] = {}  # only for models in _models
        self._models_of: dict[str, list[str]] = {}  # provider -> ids of its models in _models
        self._status: dict[str, tuple[str, str]] = {}  # provider -> (status, circuit) last published
        self._listeners: list[Callable[[str, bool], None]] = []
        self._probes: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()

    # --- recording -----------------------------------------------------------

    def record_success(
        self,
        provider: str,
        model_id: str,
        *,
        latency_ms: float,
        ttft_ms: float | None = None,
        output_tokens: int = 0,
    ) -> None:
        """A call that answered. `model_id` is `provider/model`."""
        now = self.clock()
        policy = self.policy
        generating_s = (latency_ms - (ttft_ms or 0.0)) / 1000
        tps = output_tokens / generating_s if output_tokens > 1 and generating_s > 0.001 else None
        for stats in (self._stats(provider), self._model_stats(model_id)):
            stats.add(now, True, latency_ms, policy)
            stats.consecutive_failures = 0
            stats.latency_ewma = _ewma(stats.latency_ewma, latency_ms, policy.ewma_alpha)
            stats.ttft_ewma = _ewma(stats.ttft_ewma, ttft_ms if ttft_ms is not None else latency_ms, policy.ewma_alpha)
            if tps is not None:
                stats.tps_ewma = _ewma(stats.tps_ewma, tps, policy.ewma_alpha)
            stats.history.append(latency_ms)
        # Only a trial closes a gate: a call already under way when it was ejected, or sent
        # despite the ejection, does not.
        closed = False
        for gate in (self._gates.get(provider), self._model_gates.get(model_id)):
            if gate is None:
                continue
            gate.hard = 0
            gate.limited = 0
            if gate.trial_due(now):
                self._close(gate, now)
                closed = True
        self._changed(provider, urgent=closed)

    def record_failure(self, provider: str, model_id: str, error: ProviderError | str, *, latency_ms: float = 0.0) -> None:
        """A call that failed. Request-level errors (bad request, prompt too long) leave health alone."""
        kind = error if isinstance(error, str) else error.kind
        if kind in _NOT_HEALTH:
            return
        if kind in _LOCAL:
            self.release(provider, model_id)
            return
        now = self.clock()
        policy = self.policy
        message = kind if isinstance(error, str) else str(error)
        if kind == "rate_limited":
            self._throttle(provider, model_id, None if isinstance(error, str) else error, message, now)
            self._changed(provider)
            return
        if kind == "model_not_found":
            stats = self._model_stats(model_id)
            stats.add(now, False, latency_ms, policy)
            stats.consecutive_failures += 1
            stats.last_error = message
            gate = self._model_gate(model_id)
            self._eject(gate, now, f"{model_id}: model not found", policy.max_ejection_s)
            gate.missing = True
            self._changed(provider)
            return
        for stats in (self._stats(provider), self._model_stats(model_id)):
            stats.add(now, False, latency_ms, policy)
            stats.consecutive_failures += 1
            stats.last_error = message
            stats.history.append(latency_ms)
        # A connection refused (not one closed mid-answer) says the host is unreachable, whatever the model.
        hard = kind in _CONNECT_KINDS and getattr(error, "phase", "connect") == "connect"
        self._judge(provider, model_id, kind, hard, now)
        self._changed(provider)

    def record_probe(self, provider: str, ok: bool, latency_ms: float, detail: str = "") -> None:
        """An active probe's outcome: a failure counts like a failed call, a success closes a half-open provider."""
        now = self.clock()
        stats = self._stats(provider)
        gate = self._gate(provider)
        if ok:
            stats.add(now, True, latency_ms, self.policy)
            stats.consecutive_failures = 0
            gate.hard = 0
            if gate.trial_due(now):
                self._close(gate, now)
            self._changed(provider)
            return
        kind = detail.split(":", 1)[0] if ":" in detail else "connection"
        if kind in _NOT_HEALTH or kind in _LOCAL:
            return
        stats.add(now, False, latency_ms, self.policy)
        stats.consecutive_failures += 1
        stats.last_error = f"probe: {detail}"
        self._judge(provider, None, kind, kind == "connection", now)
        self._changed(provider)

    # --- deciding ----------------------------------------------------------------

    def _judge(self, provider: str, model_id: str | None, kind: str, hard: bool, now: float) -> None:
        """Eject whatever this failure calls for: the fast path, a failed trial, then the error rates."""
        policy = self.policy
        gate = self._gate(provider)
        if kind == "authentication":
            # A rejected key will not fix itself soon, and no model of the provider takes it either.
            self._eject(gate, now, "authentication failed", policy.auth_ejection_s)
            return
        gate.hard = gate.hard + 1 if hard else 0
        if gate.hard >= policy.hard_failures and not gate.ejected(now):
            self._eject(gate, now, f"{gate.hard} connections refused in a row")
            return
        if gate.trial_due(now):
            self._eject(gate, now, f"trial request failed ({kind})")
            return
        if model_id is None:
            if gate.state == CLOSED and self._rate_exceeded(self._providers[provider], gate):
                self._eject(gate, now, f"error rate {self._providers[provider].error_rate():.0%} (probes)")
            return
        model_gate = self._model_gate(model_id)
        if model_gate.trial_due(now):
            self._eject(model_gate, now, f"trial request failed ({kind})")
        elif model_gate.state == CLOSED and self._rate_exceeded(self._models[model_id], model_gate):
            n, failed = self._models[model_id].tally_since(model_gate.since)
            self._eject(model_gate, now, f"error rate {failed / n:.0%} over {n} calls ({kind})")
        if gate.state != CLOSED:
            return
        # The provider, when several of its models fail: each ejected on its own, or failing
        # together at the ejecting rate (one busy model ejected may have drawn all its traffic).
        gates = self._model_gates
        mine = [mid for mid in self._models_of.get(provider, []) if not (mid in gates and gates[mid].missing)]
        ejected = [mid for mid in mine if mid in gates and gates[mid].ejected(now)]
        if len(ejected) >= policy.provider_ejected_models:
            self._eject(gate, now, f"{len(ejected)} of its models ejected ({', '.join(ejected[:3])})")
            return
        stats = self._providers[provider]
        if self._rate_exceeded(stats, gate):
            failing = [mid for mid in mine if self._models[mid].tally_since(gate.since)[1]]
            if len(failing) >= policy.provider_ejected_models:
                n, failed = stats.tally_since(gate.since)
                self._eject(gate, now, f"error rate {failed / n:.0%} over {n} calls to {len(failing)} of its models")

    def _rate_exceeded(self, stats: _Stats, gate: _Gate) -> bool:
        n, failed = stats.tally_since(gate.since)
        return n >= self.policy.min_requests and failed >= self.policy.error_rate_threshold * n

    def _throttle(self, provider: str, model_id: str, error: ProviderError | None, message: str, now: float) -> None:
        """A 429: the model (or, when the key's whole quota is spent, the provider) waits as asked."""
        policy = self.policy
        asked = error.retry_after_s if error is not None else None
        stats = self._model_stats(model_id)
        stats.requests += 1
        stats.failures += 1
        stats.last_error = message
        # A throttle is capacity, not a fault: it stays out of the windows that eject.
        key_wide = error is not None and isinstance(error.body, dict) and "insufficient_quota" in (
            error.body.get("code"), error.body.get("type"))
        gate = self._gate(provider) if key_wide else self._model_gate(model_id)
        if asked is None:  # no wait given: a short one, doubled while the 429s go on
            asked = policy.rate_limit_default_s * 2 ** min(gate.limited, 16)
            gate.limited += 1
        wait = min(asked, policy.rate_limit_max_s)
        until = now + wait
        if until > gate.throttled_until:
            gate.throttled_until = until
            scope = "key quota" if key_wide else model_id
            gate.throttle_reason = f"rate limited ({scope}): retry after {wait:g}s"
            gate.source = None
            self._wake_at(wait)
            self._tell(gate, "throttle", wait, gate.throttle_reason)

    def _eject(self, gate: _Gate, now: float, reason: str, wait_s: float | None = None) -> None:
        policy = self.policy
        if gate.state == CLOSED and now - gate.closed_at > policy.max_ejection_s:
            gate.ejections = 0  # healthy for a whole maximum ejection: the backoff starts over
        if wait_s is None:
            wait_s = min(policy.base_ejection_s * 2**gate.ejections, policy.max_ejection_s)
        gate.state = OPEN
        gate.until = now + wait_s
        gate.ejections += 1
        gate.reason = reason
        gate.trials.clear()
        gate.missing = False
        gate.source = None
        self._wake_at(wait_s)
        self._tell(gate, "eject", wait_s, reason)

    def _tell(self, gate: _Gate, kind: str, wait_s: float, reason: str) -> None:
        if self.on_gate is not None:
            self.on_gate({"scope": gate.scope, "target": gate.target, "kind": kind,
                          "until": time.time() + wait_s, "reason": reason})  # fmt: skip

    def apply_remote(self, scope: str, target: str, kind: str, until: float, reason: str, source: str) -> None:
        """Another gateway (`source`) ejected or throttled `target`, a provider or a model, until `until`
        (wall-clock): held here too, so no call of this one goes where the fleet knows it will fail."""
        wait = until - time.time()
        if wait <= 0 or kind not in ("eject", "throttle") or scope not in ("provider", "model"):
            return
        now = self.clock()
        gate = self._gate(target) if scope == "provider" else self._model_gate(target)
        label = f"{reason} (from {source})"
        if kind == "throttle":
            if now + wait <= gate.throttled_until:
                return
            gate.throttled_until = now + wait
            gate.throttle_reason = label
            gate.source = source
        else:
            if gate.ejected(now) and gate.until >= now + wait:
                return
            gate.state = OPEN
            gate.until = now + wait
            gate.reason = label
            gate.trials.clear()
            gate.source = source
        self._wake_at(wait)
        self._changed(target if scope == "provider" else target.split("/", 1)[0])

    @staticmethod
    def _close(gate: _Gate, now: float) -> None:
        gate.state = CLOSED
        gate.reason = ""
        gate.trials.clear()
        gate.since = now  # the failures that ejected it are judged and done with
        gate.closed_at = now

    # --- admission -------------------------------------------------------------------

    def allow(self, provider: str, model_id: str | None = None, *, despite_ejection: bool = False) -> bool:
        """May a call go to this provider (and model) now? Takes a trial slot when half-open.

        `despite_ejection`: the orchestrator's ejection cap sends it anyway; a throttle still holds.
        """
        now = self.clock()
        gates = [g for g in (self._gates.get(provider), self._model_gates.get(model_id or "")) if g is not None]
        if any(g.throttled(now) for g in gates):
            return False
        if despite_ejection:
            for gate in gates:
                if gate.state != CLOSED and not gate.ejected(now):
                    gate.trials.append(now)  # over the limit, but `release` gives back what was taken
            return True
        trials = []
        for gate in gates:
            if gate.state == CLOSED:
                continue
            if gate.ejected(now):
                return False
            if gate.state == OPEN:
                gate.state = HALF_OPEN
                self._changed(provider)
            timeout = self.policy.trial_timeout_s
            gate.trials[:] = [t for t in gate.trials if now - t < timeout]
            if len(gate.trials) >= self.policy.half_open_trials:
                return False
            trials.append(gate)
        for gate in trials:
            gate.trials.append(now)
        return True

    def release(self, provider: str, model_id: str | None = None) -> None:
        """A call admitted by `allow` ended without an outcome (cancelled): free its trial slot."""
        for gate in (self._gates.get(provider), self._model_gates.get(model_id or "")):
            if gate is not None and gate.state == HALF_OPEN and gate.trials:
                gate.trials.pop(0)

    def blocked(self, provider: str, model_id: str | None = None, now: float | None = None) -> bool:
        """True while an ejection or a throttle keeps calls away (a half-open gate lets trials through)."""
        now = self.clock() if now is None else now
        gate = self._gates.get(provider)
        if gate is not None and (gate.ejected(now) or gate.throttled(now)):
            return True
        if model_id is not None:
            gate = self._model_gates.get(model_id)
            if gate is not None and (gate.ejected(now) or gate.throttled(now)):
                return True
        return False

    def ejection(self, provider: str, model_id: str) -> Ejection | None:
        """Why the model may not be called now (None: it may)."""
        now = self.clock()
        throttled = False
        wait = 0.0
        held = False
        for gate in (self._gates.get(provider), self._model_gates.get(model_id)):
            if gate is None:
                continue
            if gate.throttled(now):
                throttled = held = True
                wait = max(wait, gate.throttled_until - now)
            if gate.ejected(now):
                held = True
                wait = max(wait, gate.until - now)
            elif gate.state != CLOSED and len(gate.trials) >= self.policy.half_open_trials:
                held = True  # its trials are under way: the soonest any ends is unknown, call it a second
                wait = max(wait, 1.0)
        if not held:
            return None
        rates = [stats.error_rate() for stats in (self._providers.get(provider), self._models.get(model_id)) if stats]
        return Ejection(throttled, wait, max(rates, default=0.0))

    def circuit(self, provider: str) -> str:
        gate = self._gates.get(provider)
        if gate is None or gate.state == CLOSED:
            return CLOSED
        return OPEN if gate.ejected(self.clock()) else HALF_OPEN

    def _wake_at(self, delay_s: float) -> None:
        """Re-evaluate when an ejection or throttle ends, so the change is published on time."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._timers.discard(handle)  # type: ignore[arg-type]
            self.tick()

        handle = loop.call_later(max(delay_s, 0.0) + 0.001, fire)
        self._timers.add(handle)

    def tick(self) -> None:
        """Publish the changes that time alone makes (an ejection or throttle ending, failures ageing out)."""
        for provider in dict.fromkeys([*self._providers, *self._gates, *self._models_of]):
            self._changed(provider)

    # --- reading -------------------------------------------------------------------

    def provider(self, provider: str) -> ProviderHealth:
        now = self.clock()
        health = ProviderHealth(provider)
        health.status, health.circuit, health.reason, retry_in = self._condition(provider, now)
        if retry_in is not None:
            health.retry_at = time.time() + retry_in
        stats = self._providers.get(provider)
        if stats is not None:
            ordered = stats.latencies()
            health.failures = stats.failures
            health.consecutive_failures = stats.consecutive_failures
            health.error_rate = stats.error_rate()
            health.requests = stats.requests
            span = min(self.policy.window_s, 60.0)
            health.requests_per_min = sum(1 for t, _, _ in stats.window if t > now - span) * 60.0 / span
            health.latency_ms_p50 = _percentile(ordered, 0.5)
            health.latency_ms_p95 = _percentile(ordered, 0.95)
            health.latency_ms_ewma = stats.latency_ewma
            health.ttft_ms_ewma = stats.ttft_ewma
            health.tokens_per_s = stats.tps_ewma
            health.last_error = stats.last_error
            health.history = list(stats.history)
        elif provider in self._models_of:
            health.last_error = next(
                (self._models[m].last_error for m in self._models_of[provider] if self._models[m].last_error), None)
        return health

    def snapshot(self, providers: Iterable[str] | None = None) -> dict[str, ProviderHealth]:
        """Health of the given providers (default: every provider seen so far)."""
        if providers is None:
            wanted = [*self._providers, *(p for p in self._models_of if p not in self._providers)]
        else:
            wanted = list(providers)
        return {pid: self.provider(pid) for pid in wanted}

    def provider_factor(self, provider: str) -> float:
        """The provider's part of the router's 0..1 health score.

        Its success rate over the window, halved while the provider itself is ejected or
        half-open, and lowered when the p95 of its recent latencies runs far above their
        median (it answers, but unevenly).
        """
        stats = self._providers.get(provider)
        factor = 1.0
        if stats is not None:
            stats.expire(self.clock(), self.policy)
            factor = 1.0 - stats.error_rate()
            ordered = sorted(stats.history)  # the last calls: a bounded sort, however busy the provider
            if len(ordered) >= 5:
                p50, p95 = _percentile(ordered, 0.5), _percentile(ordered, 0.95)
                if p50 and p95 and p95 > 3 * p50:
                    factor *= max(0.5, 3 * p50 / p95)
        gate = self._gates.get(provider)
        if gate is not None and gate.state != CLOSED:
            factor *= 0.5
        return factor

    def model_live(self, model_id: str) -> LiveModel | None:
        """Measured speed and the model's own success rate; None before its first call."""
        stats = self._models.get(model_id)
        if stats is None:
            return None
        stats.expire(self.clock(), self.policy)
        return LiveModel(stats.ttft_ewma, stats.tps_ewma, 1.0 - stats.error_rate())

    def next_change_at(self) -> float:
        """The clock time at which time alone next changes what `live`/`blocked` say (inf: never)."""
        soonest = math.inf
        now = self.clock()
        for gate in (*self._gates.values(), *self._model_gates.values()):
            if gate.state == OPEN and gate.until > now:
                soonest = min(soonest, gate.until)
            if gate.throttled_until > now:
                soonest = min(soonest, gate.throttled_until)
        for stats in (*self._providers.values(), *self._models.values()):
            if stats.window_failures and stats.window:
                soonest = min(soonest, stats.window[0][0] + self.policy.window_s)
        return soonest

    def _condition(self, provider: str, now: float) -> tuple[str, str, str, float | None]:
        """(status, circuit, reason, seconds until it may be called while down); cheap enough for every call."""
        gate = self._gates.get(provider)
        if gate is not None:
            wait = max(gate.until - now if gate.ejected(now) else 0.0, gate.throttled_until - now)
            if wait > 0:
                why = gate.reason if gate.ejected(now) else gate.throttle_reason
                return DOWN, OPEN, f"ejected: {why}; next try in {wait:.1f}s", wait
            if gate.state != CLOSED:
                trials = self.policy.half_open_trials
                return DEGRADED, HALF_OPEN, f"half-open after {gate.reason}: up to {trials} trial requests", None
        held = []
        for model_id in self._models_of.get(provider, ()):
            model_gate = self._model_gates.get(model_id)
            if model_gate is None:
                continue
            by = f", from {model_gate.source}" if model_gate.source else ""
            if model_gate.throttled(now):
                held.append(f"{model_id} throttled ({model_gate.throttled_until - now:.1f}s{by})")
            elif model_gate.ejected(now):
                held.append(f"{model_id} ejected ({model_gate.until - now:.1f}s{by})")
        if held:
            return DEGRADED, CLOSED, "; ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else ""), None
        stats = self._providers.get(provider)
        if stats is not None:
            stats.expire(now, self.policy)
            if stats.consecutive_failures:
                return DEGRADED, CLOSED, f"{stats.consecutive_failures} consecutive failure(s): {stats.last_error}", None
            rate = stats.error_rate()
            if rate >= self.policy.degraded_error_rate:
                return DEGRADED, CLOSED, f"error rate {rate:.0%} over the last {self.policy.window_s:g}s", None
        return HEALTHY, CLOSED, "", None

    # --- change notification ----------------------------------------------------------

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """`listener(provider, urgent)` is called after anything about that provider changes (the router's cue).

        Urgent: a failure, a probe, an ejection or a throttle changed what may be called.
        Not urgent: a success only moved the provider's latency and speed figures.
        """
        self._listeners.append(listener)

    def _changed(self, provider: str, *, urgent: bool = True) -> None:
        for listener in self._listeners:
            listener(provider, urgent)
        status, circuit, _, _ = self._condition(provider, self.clock())
        previous_status, previous_circuit = self._status.get(provider, (HEALTHY, CLOSED))
        if (status, circuit) == (previous_status, previous_circuit):
            return
        self._status[provider] = (status, circuit)
        health = self.provider(provider)
        if self.bus is not None:
            self.bus.publish(
                HealthChanged(
                    provider=provider,
                    status=health.status,
                    previous=previous_status,
                    reason=health.reason,
                    circuit=health.circuit,
                    retry_at=health.retry_at,
                )
            )
        if self.on_change is not None:
            self.on_change(health.to_dict())

    def _stats(self, provider: str) -> _Stats:
        stats = self._providers.get(provider)
        if stats is None:
            stats = self._providers[provider] = _Stats(self.policy)
        return stats

    def _model_stats(self, model_id: str) -> _Stats:
        stats = self._models.get(model_id)
        if stats is None:
            stats = self._models[model_id] = _Stats(self.policy)
            self._models_of.setdefault(model_id.split("/", 1)[0], []).append(model_id)
        return stats

    def models_seen(self, provider: str) -> list[str]:
        """The provider's models with live stats (and so perhaps a gate of their own); the rest read as catalog figures."""
        return self._models_of.get(provider, [])

    def _gate(self, provider: str) -> _Gate:
        gate = self._gates.get(provider)
        if gate is None:
            gate = self._gates[provider] = _Gate("provider", provider)
        return gate

    def _model_gate(self, model_id: str) -> _Gate:
        self._model_stats(model_id)
        gate = self._model_gates.get(model_id)
        if gate is None:
            gate = self._model_gates[model_id] = _Gate("model", model_id)
        return gate

    # --- active probes -------------------------------------------------------------------

    def start_probes(self, adapters: dict[str, Adapter], interval_s: float) -> None:
        """One task per provider calling `adapter.health_check()` every `interval_s`."""
        for provider, adapter in adapters.items():
            self._probes.append(asyncio.create_task(self._probe_loop(provider, adapter, interval_s)))

    async def _probe_loop(self, provider: str, adapter: Adapter, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                result = await adapter.health_check()
            except Exception as error:  # a broken probe is a failed probe, never a dead loop
                self.record_probe(provider, False, 0.0, f"connection: {type(error).__name__}")
                continue
            self.record_probe(provider, result.ok, result.latency_ms, result.detail)

    async def aclose(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for task in self._probes:
            task.cancel()
        for task in self._probes:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probes.clear()
