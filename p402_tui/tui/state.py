"""What the console knows, folded from bus events: small, explicit and free of Textual.

Events arrive in batches (the app drains its bus subscription a few times a
second); `ConsoleState.fold` turns each batch into rows the panes can diff.
Every row carries a revision number that changes when the row does, so a pane
updates only the rows that moved since it last looked.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.hooks import api_of
from ..core.events import DecisionBrief


@dataclass(slots=True)
class DecisionRow:
    """One routed request: the decision, then its outcome when the request completes."""

    key: str  # the decision id; a request id for answers that never reached the router
    ts: float
    mode: str
    chosen: str  # provider/model, or "-" when nothing was eligible
    candidates: int
    est_cost: float | None
    decision: Any = None  # the RouteDecision object (its to_dict() is built only when shown)
    cost: float | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    attempts: int = 0
    status: str = "routing"  # routing | retrying | ok | error | cached | refused (a 4xx from the gateway)
    provider: str | None = None
    model: str | None = None  # where the answer finally came from
    session_id: str | None = None
    request_id: str | None = None
    error: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # AttemptFailed payloads, in order
    record: Any = None  # the RequestRecord once the request completed
    api: str = ""  # the gateway API it came through when not chat completions (messages), from its record
    gateway: str | None = None  # the gateway of a fleet that made it, as its events are labelled
    rev: int = 0

    @property
    def served_by(self) -> str:
        if self.provider and self.model:
            return f"{self.provider}/{self.model}"
        return self.chosen


@dataclass(slots=True)
class SpendSeries:
    """Spend per provider in fixed time buckets over a sliding window."""

    bucket_s: float = 10.0
    buckets: int = 60
    by_provider: dict[str, dict[int, float]] = field(default_factory=dict)
    rev: int = 0

    def add(self, ts: float, provider: str, usd: float) -> None:
        index = int(ts // self.bucket_s)
        series = self.by_provider.setdefault(provider, {})
        series[index] = series.get(index, 0.0) + usd
        self.rev += 1

    def window(self, now: float, min_buckets: int = 6) -> list[int]:
        """The buckets to show: the whole window, or from the first spend on once there is less."""
        last = int(now // self.bucket_s)
        first = last - self.buckets + 1
        seen = [min(series) for series in self.by_provider.values() if series]
        if seen:
            first = max(first, min(min(seen) - 1, last - min_buckets + 1))
        return list(range(first, last + 1))

    def trim(self, now: float) -> None:
        first = int(now // self.bucket_s) - self.buckets + 1
        for series in self.by_provider.values():
            for index in [i for i in series if i < first]:
                del series[index]

    def cumulative(self, now: float, top: int = 6) -> tuple[list[int], dict[str, list[float]]]:
        """Bucket indexes and, per provider (the `top` biggest, the rest as `other`), spend summed over the window."""
        window = self.window(now)
        totals = {p: sum(s.get(i, 0.0) for i in window) for p, s in self.by_provider.items()}
        ranked = [p for p, total in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])) if total > 0]
        shown, rest = ranked[:top], ranked[top:]
        lines: dict[str, list[float]] = {}
        for provider in shown:
            lines[provider] = _running(self.by_provider[provider].get(i, 0.0) for i in window)
        if rest:
            lines["other"] = _running(sum(self.by_provider[p].get(i, 0.0) for p in rest) for i in window)
        return window, lines


def candidate_count(decision: Any) -> int:
    """How many models were eligible, without building every candidate's scores.

    With failover on (the default) the fallbacks are every other eligible model,
    and listing their ids is cheap; building each candidate is not, at 500 decisions/s.
    """
    if decision.options.failover:
        return (decision.chosen is not None) + len(decision.fallbacks)
    return len(decision.candidates)


def _running(values: Iterable[float]) -> list[float]:
    out, total = [], 0.0
    for value in values:
        total += value
        out.append(total)
    return out


@dataclass(slots=True)
class Throughput:
    """Requests and errors per second over the last minute."""

    seconds: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=60))  # (second, requests, errors)

    def add(self, ts: float, error: bool) -> None:
        second = int(ts)
        if self.seconds and self.seconds[-1][0] == second:
            _, n, e = self.seconds[-1]
            self.seconds[-1] = (second, n + 1, e + int(error))
        elif not self.seconds or second > self.seconds[-1][0]:
            self.seconds.append((second, 1, int(error)))
        else:  # a late event for an earlier second: count it where it belongs
            for i, (s, n, e) in enumerate(self.seconds):
                if s == second:
                    self.seconds[i] = (s, n + 1, e + int(error))
                    break

    def rate(self, now: float, over_s: int = 10) -> tuple[float, float]:
        """(requests/s, error fraction) over the last `over_s` whole seconds."""
        since = int(now) - over_s
        n = sum(count for s, count, _ in self.seconds if since <= s < int(now))
        e = sum(errors for s, _, errors in self.seconds if since <= s < int(now))
        return n / over_s, (e / n if n else 0.0)


@dataclass(slots=True, frozen=True)
class CacheInfo:
    """The answer cache as the console shows it: off, or the embedder it matches with (None while that loads)."""

    enabled: bool
    embedder: str | None = None  # all-MiniLM-L6-v2, hashed-ngram, or a provider's provider/model
    label: str | None = None  # semantic, two-stage (static candidates, MiniLM confirms), or lexical
    exact_hit_rate: float | None = None  # hits per lookup, by tier (None: no lookups yet)
    semantic_hit_rate: float | None = None
    semantic_cpu_ms: float | None = None  # worker CPU of the semantic tier per lookup that reached it

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> CacheInfo:
        """From `SemanticCache.snapshot()` in-process, or the gateway's /api/v2/cache."""
        embedder = data.get("embedder") or {}
        name, label = embedder.get("name"), embedder.get("label")
        if name is not None and data.get("confirmer") is not None:
            name, label = "all-MiniLM-L6-v2", "two-stage"  # static vectors find, MiniLM confirms
        looked_up = data.get("hits", 0) + data.get("misses", 0)
        return cls(
            enabled=bool(data.get("enabled")),
            embedder=name,
            label=label,
            exact_hit_rate=data.get("exact_hit_rate") if looked_up else None,
            semantic_hit_rate=data.get("semantic_hit_rate") if looked_up else None,
            semantic_cpu_ms=data.get("semantic_cpu_ms_per_lookup") if data.get("semantic_lookups") else None,
        )


@dataclass(slots=True)
class SpendSummary:
    """Totals the store keeps (or, with no store, what this console saw since it started)."""

    today_usd: float = 0.0
    week_usd: float = 0.0
    month_usd: float = 0.0
    requests_today: int = 0
    saved_usd: float = 0.0
    cache_hits: int = 0
    top_models: list[tuple[str, float, int]] = field(default_factory=list)  # (model id, usd, requests)
    since_start: bool = False  # True: these are this session's numbers, not the ledger's
    cache: CacheInfo | None = None  # None: there is no cache to ask (no store)


class ConsoleState:
    """Decisions, health, spend and sessions as the console shows them."""

    def __init__(self, max_decisions: int = 500, bucket_s: float = 10.0) -> None:
        self.max_decisions = max_decisions
        self.decisions: OrderedDict[str, DecisionRow] = OrderedDict()
        self.health: dict[str, dict[str, Any]] = {}
        self.health_rev = 0
        self.spend = SpendSeries(bucket_s=bucket_s)
        self.summary = SpendSummary(since_start=True)
        self.summary_rev = 0
        self.sessions: dict[str, dict[str, Any]] = {}
        self.sessions_rev = 0
        self.throughput = Throughput()
        self.seen = 0  # events folded since start
        self.notices: list[tuple[str, str]] = []  # (severity, message) for the app to show, then cleared
        self._rev = 0
        # this console's own tallies, the spend summary when there is no store
        self._today_usd = 0.0
        self._saved_usd = 0.0
        self._hits = 0
        self._requests = 0
        self._models: Counter[str] = Counter()
        self._model_usd: Counter[str] = Counter()
        self._request_rows: dict[str, str] = {}  # request id -> row key, to find a request's row
        self.gateways: set[str] = set()  # the gateway labels the events carried: more than one is a fleet

    def _bump(self, row: DecisionRow) -> None:
        self._rev += 1
        row.rev = self._rev

    # --- folding ----------------------------------------------------------------

    def fold(self, events: Iterable[Any]) -> bool:
        """Apply a batch of bus events; True if anything shown changed."""
        changed = False
        for event in events:
            self.seen += 1
            handler = _HANDLERS.get(event.kind)
            if handler is not None:
                handler(self, event)
                changed = True
                gateway = getattr(event, "gateway", None)
                if gateway is not None:
                    self.gateways.add(gateway)
        while len(self.decisions) > self.max_decisions:
            _, row = self.decisions.popitem(last=False)
            if row.request_id:
                self._request_rows.pop(row.request_id, None)
        return changed

    def _route_decided(self, event: Any) -> None:
        decision = event.decision
        row = self.decisions.get(decision.id)
        if row is None:
            row = DecisionRow(key=decision.id, ts=decision.ts, mode=decision.mode, chosen="-", candidates=0, est_cost=None)
            self.decisions[decision.id] = row
        # else the request completed first: its events can arrive in one batch, in any order
        row.mode = decision.mode
        if isinstance(decision, DecisionBrief):  # from a gateway: the whole decision is fetched when opened
            chosen_id, row.est_cost, row.candidates = decision.chosen, decision.est_cost_usd, decision.candidates
        else:
            chosen = decision.chosen
            row.decision = decision
            row.candidates = candidate_count(decision)
            chosen_id = chosen.id if chosen is not None else None
            row.est_cost = chosen.est_cost_usd if chosen is not None else None
        row.chosen = chosen_id or "-"
        row.gateway = event.gateway or row.gateway
        if chosen_id is None and row.status == "routing":
            row.status = "error"
        self._bump(row)

    def _attempt_failed(self, event: Any) -> None:
        row = self.decisions.get(event.decision_id) if event.decision_id else None
        if row is None:
            return
        row.failures.append(event.to_dict())
        row.attempts = max(row.attempts, len(row.failures) + (1 if event.will_retry else 0))
        if row.status == "routing" and event.will_retry:
            row.status = "retrying"
        self._bump(row)

    def _request_completed(self, event: Any) -> None:
        record = event.record
        key = record.decision_id or record.id
        row = self.decisions.get(key)
        if row is None:
            row = DecisionRow(
                key=key,
                ts=record.ts,
                mode=record.mode or "-",
                chosen=f"{record.provider}/{record.model}" if record.provider else "-",
                candidates=0,
                est_cost=record.est_cost_usd,
            )
            self.decisions[key] = row
        row.record = record
        row.gateway = event.gateway or row.gateway
        row.api = _shown_api(record.source)
        row.request_id = record.id
        row.session_id = record.session_id
        row.cost = record.cost_usd
        row.latency_ms = record.latency_ms
        row.ttft_ms = record.ttft_ms
        row.provider, row.model = record.provider, record.model
        row.attempts = max(len(record.attempts), row.attempts, 1 if record.provider else 0)
        row.error = record.error
        row.status = "cached" if record.cached else ("ok" if record.status == "ok" else "error")
        self._request_rows[record.id] = key
        self._bump(row)
        self.throughput.add(record.ts, record.status != "ok")
        if record.provider and record.cost_usd:
            self.spend.add(record.ts, record.provider, record.cost_usd)
        self._requests += 1
        self._today_usd += record.cost_usd or 0.0
        self._saved_usd += record.saved_usd or 0.0
        self._hits += int(bool(record.cached))
        if record.provider and record.model:
            model_id = f"{record.provider}/{record.model}"
            self._models[model_id] += 1
            self._model_usd[model_id] += record.cost_usd or 0.0
        if self.summary.since_start:
            self._summarise_own()

    def _request_rejected(self, event: Any) -> None:
        why = f"{event.status} {event.reason}"
        key_id = getattr(event, "api_key_id", None)
        if key_id is not None:  # a key's own refusal (its rate, budget, model rules, guardrails) names the key
            why = f"{why} · {key_id}"
        if event.request_id is not None:  # the orchestrator's RequestCompleted came first and was counted
            row = self.row_for_request(event.request_id)
            if row is not None:
                row.status, row.error = "refused", row.error or why
                self._bump(row)
            return
        key = f"rejected-{self.seen}"
        row = DecisionRow(key=key, ts=event.ts, mode="-", chosen=why, candidates=0, est_cost=None,
                          status="refused", error=event.message or why, gateway=event.gateway)
        self.decisions[key] = row
        self._bump(row)
        self.throughput.add(event.ts, True)

    def _health_changed(self, event: Any) -> None:
        if event.status == event.previous:
            return
        reason = f": {event.reason}" if event.reason else ""
        if event.status == "down":
            self.notices.append(("error", f"{event.provider} is down{reason}"))
        elif event.status == "degraded":
            self.notices.append(("warning", f"{event.provider} is degraded{reason}"))
        elif event.previous in ("down", "degraded"):
            self.notices.append(("information", f"{event.provider} recovered"))
        current = self.health.setdefault(event.provider, {"provider": event.provider})
        current.update(status=event.status, reason=event.reason, circuit=event.circuit, retry_at=event.retry_at)
        self.health_rev += 1

    # --- snapshots from the source ----------------------------------------------------

    def backfill(self, summaries: Iterable[dict[str, Any]]) -> None:
        """Decisions made before this console looked (in brief, newest first, as `/api/v2/decisions`
        gives them), put behind those it has seen since."""
        older: OrderedDict[str, DecisionRow] = OrderedDict()
        for brief in reversed(list(summaries)):
            key = brief["id"]
            if key in self.decisions:
                continue
            provider, _, model = (brief.get("model") or "").partition("/")
            row = DecisionRow(
                key=key,
                ts=brief["ts"],
                mode=brief.get("mode") or "-",
                chosen=brief.get("chosen") or "-",
                candidates=brief.get("candidates") or 0,
                est_cost=brief.get("est_cost_usd"),
                cost=brief.get("cost_usd"),
                latency_ms=brief.get("latency_ms"),
                attempts=1 if provider else 0,
                status={"pending": "routing", "no_model": "error"}.get(brief.get("status") or "", brief.get("status") or "-"),
                provider=provider or None,
                model=model or None,
                session_id=brief.get("session_id"),
                request_id=brief.get("request_id"),
                error=brief.get("error_kind"),
                api=_shown_api(brief.get("source") or ""),
            )
            self._bump(row)
            older[key] = row
            if row.request_id:
                self._request_rows[row.request_id] = key
            if provider and row.cost:
                self.spend.add(row.ts, provider, row.cost)
        if older:
            older.update(self.decisions)
            self.decisions = older
            while len(self.decisions) > self.max_decisions:
                _, row = self.decisions.popitem(last=False)
                if row.request_id:
                    self._request_rows.pop(row.request_id, None)

    def set_health(self, snapshot: dict[str, dict[str, Any]]) -> None:
        if snapshot != self.health:
            self.health = snapshot
            self.health_rev += 1

    def set_summary(self, summary: SpendSummary) -> None:
        if summary != self.summary:
            self.summary = summary
            self.summary_rev += 1

    def set_sessions(self, sessions: Iterable[dict[str, Any]]) -> None:
        fresh = {s["id"]: s for s in sessions}
        if fresh != self.sessions:
            self.sessions = fresh
            self.sessions_rev += 1

    def _summarise_own(self) -> None:
        top = [(m, self._model_usd[m], n) for m, n in self._models.most_common()]
        top.sort(key=lambda t: (-t[1], t[0]))
        self.summary = SpendSummary(
            today_usd=self._today_usd,
            week_usd=self._today_usd,
            month_usd=self._today_usd,
            requests_today=self._requests,
            saved_usd=self._saved_usd,
            cache_hits=self._hits,
            top_models=top[:5],
            since_start=True,
        )
        self.summary_rev += 1

    # --- reading ----------------------------------------------------------------------

    def row_for_request(self, request_id: str) -> DecisionRow | None:
        key = self._request_rows.get(request_id)
        return self.decisions.get(key) if key else None

    def rates(self, now: float | None = None) -> tuple[float, float]:
        return self.throughput.rate(time.time() if now is None else now)


_HANDLERS = {
    "route_decided": ConsoleState._route_decided,
    "attempt_failed": ConsoleState._attempt_failed,
    "request_completed": ConsoleState._request_completed,
    "request_rejected": ConsoleState._request_rejected,
    "health_changed": ConsoleState._health_changed,
}


def _shown_api(source: str) -> str:
    """The API a row names: the gateway's routes other than chat completions (messages, responses...)."""
    return api_of(source) if source.startswith("gateway:") else ""
