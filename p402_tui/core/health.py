"""Live provider health: passive stats from every call, a circuit breaker, optional probes.

Every attempt the orchestrator makes is recorded here. Per provider (and per model)
we keep EWMA latency, time to first token and tokens/s, an error rate over a
sliding window, consecutive failures, requests per minute and a short latency
history for sparklines.

The circuit breaker works per provider, plus per model for errors that only
concern one model (`model_not_found`):

    closed --N consecutive failures, or a high error rate--> open
    closed --429 with a wait--> open for exactly that wait
    open --wait over--> half_open (one trial request)
    half_open --success--> closed        half_open --failure--> open, wait doubled

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


@dataclass(slots=True)
class HealthPolicy:
    """When a circuit opens and for how long."""

    failure_threshold: int = 3  # consecutive provider-level failures
    error_rate_threshold: float = 0.5  # over the window ...
    min_requests: int = 10  # ... once it holds at least this many calls
    window_s: float = 60.0
    window_max: int = 500  # the window also holds at most this many calls
    cooldown_s: float = 10.0  # first open; doubled on each failed trial
    max_cooldown_s: float = 300.0
    auth_cooldown_s: float = 60.0  # a rejected key will not fix itself soon
    trial_timeout_s: float = 30.0  # a half-open trial that never reports frees its slot
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

    def latencies(self) -> list[float]:
        return sorted(lat for _, ok, lat in self.window if ok)


def _ewma(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else previous + alpha * (value - previous)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class _Circuit:
    __slots__ = ("state", "retry_at", "cooldown_s", "reason", "trial_started", "opens")

    def __init__(self) -> None:
        self.state = CLOSED
        self.retry_at: float | None = None  # clock time the next trial may go
        self.cooldown_s = 0.0
        self.reason = ""
        self.trial_started: float | None = None
        self.opens = 0


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
    """Health of every provider and model, from the calls that pass through."""

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
        self._providers: dict[str, _Stats] = {}
        self._models: dict[str, _Stats] = {}
        self._circuits: dict[str, _Circuit] = {}
        self._model_circuits: dict[str, _Circuit] = {}  # only for models in _models
        self._models_of: dict[str, list[str]] = {}  # provider -> ids of its models in _models
        self._status: dict[str, tuple[str, str]] = {}  # provider -> (status, circuit) last published
        self._listeners: list[Callable[[str], None]] = []
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
        # Only a trial closes a circuit: a call that was already under way when it opened does not.
        closed = False
        for circuit in (self._circuits.get(provider), self._model_circuits.get(model_id)):
            if circuit is not None and (circuit.state == HALF_OPEN or (circuit.state == OPEN and self._due(circuit, now))):
                self._close(circuit)
                closed = True
        self._changed(provider, urgent=closed)

    def record_failure(self, provider: str, model_id: str, error: ProviderError | str, *, latency_ms: float = 0.0) -> None:
        """A call that failed. Request-level errors (bad request, prompt too long) leave health alone."""
        kind = error if isinstance(error, str) else error.kind
        if kind in _NOT_HEALTH:
            return
        now = self.clock()
        message = kind if isinstance(error, str) else str(error)
        if kind == "model_not_found":
            stats = self._model_stats(model_id)
            stats.add(now, False, latency_ms, self.policy)
            stats.consecutive_failures += 1
            stats.last_error = message
            circuit = self._model_circuits.setdefault(model_id, _Circuit())
            self._open(circuit, now, self.policy.max_cooldown_s, f"{model_id}: model not found")
            self._changed(provider)
            return
        for stats in (self._stats(provider), self._model_stats(model_id)):
            stats.add(now, False, latency_ms, self.policy)
            stats.consecutive_failures += 1
            stats.last_error = message
            stats.history.append(latency_ms)
        self._trip(provider, now, kind, error)
        self._changed(provider)

    def record_probe(self, provider: str, ok: bool, latency_ms: float, detail: str = "") -> None:
        """An active probe's outcome: a failure counts like a failed call, a success closes a half-open circuit."""
        if ok:
            stats = self._stats(provider)
            stats.add(self.clock(), True, latency_ms, self.policy)
            stats.consecutive_failures = 0
            circuit = self._circuit(provider)
            if circuit.state == HALF_OPEN or (circuit.state == OPEN and self._due(circuit, self.clock())):
                self._close(circuit)
            self._changed(provider)
            return
        kind = detail.split(":", 1)[0] if ":" in detail else "connection"
        stats = self._stats(provider)
        now = self.clock()
        stats.add(now, False, latency_ms, self.policy)
        stats.consecutive_failures += 1
        stats.last_error = f"probe: {detail}"
        self._trip(provider, now, kind, None)
        self._changed(provider)

    # --- the circuit ---------------------------------------------------------------

    def allow(self, provider: str, model_id: str | None = None) -> bool:
        """May a call go to this provider (and model) now? In half-open, only one trial at a time."""
        now = self.clock()
        circuit = self._circuits.get(provider)
        if circuit is not None:
            before = circuit.state
            admitted = self._admit(circuit, now)
            if circuit.state != before:
                self._changed(provider)
            if not admitted:
                return False
        model_circuit = self._model_circuits.get(model_id) if model_id is not None else None
        if model_circuit is not None and not self._admit(model_circuit, now):
            if circuit is not None and circuit.state == HALF_OPEN:
                circuit.trial_started = None  # the provider's trial slot goes back: no call is made
            return False
        return True

    def release(self, provider: str, model_id: str | None = None) -> None:
        """A call admitted by `allow` ended without an outcome (cancelled): free its trial slot."""
        for circuit in (self._circuits.get(provider), self._model_circuits.get(model_id or "")):
            if circuit is not None and circuit.state == HALF_OPEN:
                circuit.trial_started = None

    def blocked(self, provider: str, model_id: str | None = None, now: float | None = None) -> bool:
        """True while an open circuit keeps calls away (a half-open one lets a trial through)."""
        now = self.clock() if now is None else now
        circuit = self._circuits.get(provider)
        if circuit is not None and circuit.state == OPEN and not self._due(circuit, now):
            return True
        if model_id is not None:
            model_circuit = self._model_circuits.get(model_id)
            if model_circuit is not None and model_circuit.state == OPEN and not self._due(model_circuit, now):
                return True
        return False

    def circuit(self, provider: str) -> str:
        circuit = self._circuits.get(provider)
        if circuit is None:
            return CLOSED
        if circuit.state == OPEN and self._due(circuit, self.clock()):
            return HALF_OPEN
        return circuit.state

    def _admit(self, circuit: _Circuit, now: float) -> bool:
        if circuit.state == CLOSED:
            return True
        if circuit.state == OPEN:
            if not self._due(circuit, now):
                return False
            circuit.state = HALF_OPEN
            circuit.trial_started = None
        if circuit.trial_started is not None and now - circuit.trial_started < self.policy.trial_timeout_s:
            return False
        circuit.trial_started = now
        return True

    @staticmethod
    def _due(circuit: _Circuit, now: float) -> bool:
        return circuit.retry_at is not None and now >= circuit.retry_at

    def _trip(self, provider: str, now: float, kind: str, error: ProviderError | None) -> None:
        """Open the provider's circuit when this failure calls for it."""
        policy = self.policy
        circuit = self._circuit(provider)
        stats = self._providers[provider]
        retry_after = getattr(error, "retry_after_s", None)
        if kind == "rate_limited" and retry_after is not None:
            self._open(circuit, now, retry_after, f"rate limited: retry after {retry_after:g}s")
        elif kind == "authentication":
            self._open(circuit, now, policy.auth_cooldown_s, "authentication failed")
        elif circuit.state == HALF_OPEN or (circuit.state == OPEN and self._due(circuit, now)):
            wait = min(max(circuit.cooldown_s * 2, policy.cooldown_s), policy.max_cooldown_s)
            self._open(circuit, now, wait, f"trial request failed ({kind})")
        elif circuit.state == CLOSED:
            if stats.consecutive_failures >= policy.failure_threshold:
                reason = f"{stats.consecutive_failures} consecutive failures ({kind})"
            elif len(stats.window) >= policy.min_requests and stats.error_rate() >= policy.error_rate_threshold:
                reason = f"error rate {stats.error_rate():.0%} over {len(stats.window)} calls"
            else:
                return
            self._open(circuit, now, policy.cooldown_s, reason)

    def _open(self, circuit: _Circuit, now: float, wait_s: float, reason: str) -> None:
        circuit.state = OPEN
        circuit.retry_at = now + wait_s
        circuit.cooldown_s = wait_s
        circuit.reason = reason
        circuit.trial_started = None
        circuit.opens += 1
        self._wake_at(wait_s)

    @staticmethod
    def _close(circuit: _Circuit) -> None:
        circuit.state = CLOSED
        circuit.retry_at = None
        circuit.cooldown_s = 0.0
        circuit.reason = ""
        circuit.trial_started = None

    def _wake_at(self, delay_s: float) -> None:
        """Re-evaluate when an open circuit's wait ends, so the half-open turn is published on time."""
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
        """Publish the changes that time alone makes (an open circuit's wait ending, failures ageing out)."""
        for provider in list(self._providers):
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
        return health

    def snapshot(self, providers: Iterable[str] | None = None) -> dict[str, ProviderHealth]:
        """Health of the given providers (default: every provider seen so far)."""
        wanted = list(self._providers) if providers is None else list(providers)
        return {pid: self.provider(pid) for pid in wanted}

    def provider_factor(self, provider: str) -> float:
        """The provider's part of the router's 0..1 health score.

        Its success rate over the window, halved while its circuit is not closed, and
        lowered when the p95 of its recent latencies runs far above their median (it
        answers, but unevenly).
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
        circuit = self._circuits.get(provider)
        if circuit is not None and circuit.state != CLOSED:
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
        for circuit in (*self._circuits.values(), *self._model_circuits.values()):
            if circuit.state == OPEN and circuit.retry_at is not None:
                soonest = min(soonest, circuit.retry_at)
        for stats in (*self._providers.values(), *self._models.values()):
            if stats.window_failures and stats.window:
                soonest = min(soonest, stats.window[0][0] + self.policy.window_s)
        return soonest

    def _condition(self, provider: str, now: float) -> tuple[str, str, str, float | None]:
        """(status, circuit, reason, seconds until the next trial while open); cheap enough for every call."""
        circuit = self._circuits.get(provider)
        state = CLOSED
        if circuit is not None:
            state = HALF_OPEN if circuit.state == OPEN and self._due(circuit, now) else circuit.state
        if state == OPEN:
            assert circuit is not None and circuit.retry_at is not None
            wait = max(circuit.retry_at - now, 0.0)
            return DOWN, state, f"circuit open: {circuit.reason}; next try in {wait:.1f}s", wait
        if state == HALF_OPEN:
            assert circuit is not None
            return DEGRADED, state, f"half-open after {circuit.reason}: one trial request", None
        stats = self._providers.get(provider)
        if stats is not None:
            stats.expire(now, self.policy)
            if stats.consecutive_failures:
                return DEGRADED, state, f"{stats.consecutive_failures} consecutive failure(s): {stats.last_error}", None
            rate = stats.error_rate()
            if rate >= self.policy.degraded_error_rate:
                return DEGRADED, state, f"error rate {rate:.0%} over the last {self.policy.window_s:g}s", None
        return HEALTHY, state, "", None

    # --- change notification ----------------------------------------------------------

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """`listener(provider, urgent)` is called after anything about that provider changes (the router's cue).

        Urgent: a failure, a probe or a circuit changed what may be called. Not urgent: a
        success only moved the provider's latency and speed figures.
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
        """The provider's models with live stats (and so perhaps a circuit of their own); the rest read as catalog figures."""
        return self._models_of.get(provider, [])

    def _circuit(self, provider: str) -> _Circuit:
        circuit = self._circuits.get(provider)
        if circuit is None:
            circuit = self._circuits[provider] = _Circuit()
        return circuit

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
