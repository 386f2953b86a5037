"""The one call every model-calling surface makes: `await engine.enforce(scope, chat, options, ctx)`.

It applies the key's role, defaults, model rules, guardrails and request rate, resolves
(and checks the ownership of) the session the request names, and hangs an `Admission`
on the context: the orchestrator asks it, after routing and before any upstream call,
for tokens and budget on the decision's worst-case estimate, and settles it afterwards.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..core.catalog import Catalog
from ..core.hooks import CallContext, RouteOptions
from ..core.types import TIER_RANK, TIERS, ChatRequest
from ..store import shared
from .budget import Budgets
from .errors import ForbiddenError, GuardrailError, ModelNotAllowedError, PolicyError, RateLimitedError
from .guardrails import denied
from .limits import Verdict, headers, token_wait
from .rules import Compiled, compile_policy, parse_policy

INSERT_HIT = "INSERT INTO guardrail_hits (request_id, api_key_id, ts, rule, action, count) VALUES (?, ?, ?, ?, ?, ?)"
REFUSALS_KEPT = 1000


@dataclass(slots=True, frozen=True)
class KeyInfo:
    """A verified key as the request path sees it: never its secret."""

    id: str
    name: str
    role: str
    rules: Compiled


def _limited(message: str, verdict: Verdict) -> RateLimitedError:
    headers = {**verdict.headers, "retry-after": str(max(1, math.ceil(verdict.retry_after_s)))}
    return RateLimitedError(message, headers=headers)


async def _maybe(work: Any) -> Any:
    return None if work is None else await work


class Admission:
    """One request's claim on its key's tokens and budget, from routing to its ledger row."""

    __slots__ = ("engine", "key", "reserved", "headers", "tokens")

    def __init__(self, engine: PolicyEngine, key: KeyInfo, headers: dict[str, str]) -> None:
        self.engine = engine
        self.key = key
        self.reserved = False
        self.headers = headers  # the answer's x-ratelimit-* (the request's scope holds the same dict)
        self.tokens: tuple[float, int] | None = None  # (the window they were taken in, the estimate)

    async def admit(self, ctx: CallContext, decision: Any) -> None:
        policy = self.key.rules.policy
        engine = self.engine
        scope = f"key:{self.key.id}"
        estimate = decision.prompt_tokens + decision.est_output_tokens
        now = engine.now()
        # Both asked at once: their writes share one commit. A refusal of either gives back what the other took.
        tokens = budget = None
        if policy.tpm is not None:
            tokens = shared.take(engine.store, scope, now, tokens=estimate, tpm=policy.tpm)
        if policy.budget_usd is not None:
            budget = engine.budgets.reserve(
                self.key.id, policy.budget_usd, policy.budget_period, ctx.request_id, decision.est_cost_usd
            )
        took, reserved = await asyncio.gather(_maybe(tokens), _maybe(budget), return_exceptions=True)
        counted = took is not None and not isinstance(took, BaseException)
        rate_refused = counted and not took[0]  # type: ignore[index]
        if rate_refused or isinstance(took, BaseException) or isinstance(reserved, BaseException):
            if counted and took[0]:  # type: ignore[index]
                shared.retoken(engine.store, scope, took[1].start, -estimate)  # type: ignore[index]
            if budget is not None and not isinstance(reserved, BaseException):
                engine.budgets.settle(ctx.request_id, 0.0)
            if isinstance(took, BaseException):
                raise took
            if not rate_refused:  # the budget refused (a refusal of the rate is told below, first)
                if isinstance(reserved, PolicyError):
                    engine.refused(self.key.id, reserved.kind)
                raise reserved  # type: ignore[misc]
        if took is not None:
            taken, window = took
            engine.seen[self.key.id] = window
            figures = headers(window, policy.rpm, policy.tpm, now)
            if not taken:
                engine.refused(self.key.id, "rate_limit_exceeded")
                raise _limited(
                    f"this key may use {policy.tpm} tokens a minute; this request is estimated at {estimate}",
                    Verdict(False, token_wait(window, estimate, policy.tpm, now), figures),  # type: ignore[arg-type]
                )
            self.headers.update(figures)
            self.tokens = (window.start, estimate)
        self.reserved = True

    def settle(self, record: Any) -> None:
        """The request is over (answered, failed or cached): real tokens and cost replace the estimates."""
        if not self.reserved:
            return
        self.reserved = False
        if self.tokens is not None:
            used = 0 if record.cached else record.prompt_tokens + record.completion_tokens
            shared.retoken(self.engine.store, f"key:{self.key.id}", self.tokens[0], used - self.tokens[1])
        self.engine.budgets.settle(record.id, record.cost_usd)


class PolicyEngine:
    def __init__(self, store: Any, catalog: Catalog) -> None:
        self.store = store
        self.catalog = catalog
        self.clock = time.monotonic  # shifts the rate windows' time (`now`): a test moves it past a minute
        self.seen: dict[str, shared.Window] = {}  # key id -> its window as this process last read it
        self.budgets = Budgets(store)
        self.refusals: deque[tuple[float, str, str]] = deque(maxlen=REFUSALS_KEPT)  # (time, key id, reason)
        self._compiled: dict[tuple[str, str], Compiled] = {}

    # --- keys ------------------------------------------------------------------------

    def key_info(self, record: dict[str, Any]) -> KeyInfo:
        """A stored key's record, its policy compiled (once per version of it)."""
        import json

        text = json.dumps(record.get("policy") or {}, sort_keys=True)
        compiled = self._compiled.get((record["id"], text))
        if compiled is None:
            try:
                policy = parse_policy(record.get("policy") or {})
            except ValueError:
                policy = parse_policy({"models": ["-"]})  # an unreadable policy allows nothing rather than everything
            if len(self._compiled) > 4096:
                self._compiled.clear()
            compiled = self._compiled[(record["id"], text)] = compile_policy(policy, list(self.catalog.models))
        return KeyInfo(record["id"], record["name"], record.get("role") or "admin", compiled)

    def now(self) -> float:
        """The rate windows' time: wall-clock, as every gateway on the database counts them."""
        return time.time() + self.clock() - time.monotonic()

    def live(self, key_id: str) -> dict[str, Any]:
        """A key's figures: requests and tokens in its current window (the fleet's, as last read here),
        this process's refusals in the last hour."""
        window = self.seen.get(key_id)
        current = window is not None and window.reset_in(self.now()) > 0
        since = time.time() - 3600
        return {
            "requests_last_minute": window.requests if current else 0,  # type: ignore[union-attr]
            "tokens_last_minute": window.tokens if current else 0,  # type: ignore[union-attr]
            "refusals_last_hour": sum(1 for ts, kid, _ in self.refusals if kid == key_id and ts > since),
        }

    def refused(self, key_id: str, reason: str) -> None:
        self.refusals.append((time.time(), key_id, reason))

    # --- the request path ------------------------------------------------------------------

    async def enforce(self, scope: dict[str, Any], chat: ChatRequest, options: RouteOptions, ctx: CallContext) -> None:
        """Everything a key's policy decides before routing; raises the refusal in P402's error types."""
        key: KeyInfo | None = scope.get("p402.key")
        if key is not None:
            try:
                self._before_routing(scope, key, chat, options, ctx)
                await self._take_request(scope, key, ctx)
            except PolicyError as error:
                self.refused(key.id, error.kind)
                raise
        if ctx.session_id is not None and self.store is not None:
            from ..store.sessions import resolve_session

            ctx.session_id = await resolve_session(self.store, ctx.session_id, ctx.api_key_id)
            if key is not None and key.role == "user":
                await self.require_own_session(key, ctx.session_id)

    def _before_routing(
        self, scope: dict[str, Any], key: KeyInfo, chat: ChatRequest, options: RouteOptions, ctx: CallContext
    ) -> None:
        if key.role == "viewer":
            raise ForbiddenError("this key is a viewer: it reads /api/v2, /metrics and events, and calls no model")
        rules = key.rules
        policy = rules.policy
        defaults = policy.defaults
        if options.mode is None and defaults.mode is not None:
            options.mode = defaults.mode
        if ctx.tag is None and defaults.tag is not None:
            ctx.tag = defaults.tag
        if ctx.namespace is None and defaults.namespace is not None:
            ctx.namespace = defaults.namespace
        prefix = defaults.session_prefix
        if prefix and ctx.session_id is not None and not ctx.session_id.startswith(("ses-", prefix)):
            ctx.session_id = prefix + ctx.session_id
        self._model_rules(rules, options)
        if rules.deny:
            rule = denied(chat, rules.deny)
            if rule is not None:
                self._hits(ctx, key, {rule: 1}, "deny")
                raise GuardrailError(f"this request matches the key's guardrail {rule!r} and was refused", param="messages")
        if rules.redactor is not None:
            counts = rules.redactor.request(chat)
            if counts:
                self._hits(ctx, key, counts, "redact")

    async def _take_request(self, scope: dict[str, Any], key: KeyInfo, ctx: CallContext) -> None:
        """The request counted in its key's window (the fleet's, in the database), if the key has limits."""
        policy = key.rules.policy
        figures: dict[str, str] = {}
        if policy.rpm is not None or policy.tpm is not None:
            now = self.now()
            taken, window = await shared.take(self.store, f"key:{key.id}", now, requests=1, rpm=policy.rpm)
            self.seen[key.id] = window
            figures = headers(window, policy.rpm, policy.tpm, now)
            if not taken:
                raise _limited(
                    f"this key may make {policy.rpm} requests a minute; retry after the window",
                    Verdict(False, window.reset_in(now), figures),
                )
            scope["p402.ratelimit"] = figures
        if policy.tpm is not None or policy.budget_usd is not None:
            ctx.policy = Admission(self, key, figures)

    def _model_rules(self, rules: Compiled, options: RouteOptions) -> None:
        policy = rules.policy
        pinned = options.model if options.model in self.catalog.models else None
        if pinned is not None:
            if rules.allowed is not None and pinned not in rules.allowed:
                raise ModelNotAllowedError(
                    f"this key may not use {pinned}; it may use {', '.join(policy.models)}", param="model"
                )
            if rules.max_tier_rank is not None and TIER_RANK[self.catalog.models[pinned].tier] > rules.max_tier_rank:
                raise ModelNotAllowedError(
                    f"this key may use models up to the {policy.max_tier} tier; {pinned} is above it", param="model"
                )
        if rules.allowed is not None:
            options.allow = rules.allowed if options.allow is None else options.allow & rules.allowed
        if rules.max_tier_rank is not None:
            asked = TIER_RANK.get(options.max_tier, len(TIERS)) if options.max_tier else len(TIERS)
            options.max_tier = TIERS[min(asked, rules.max_tier_rank)]
        cap = policy.max_cost_per_request_usd
        if cap is not None:
            options.max_cost_usd = cap if options.max_cost_usd is None else min(cap, options.max_cost_usd)

    def _hits(self, ctx: CallContext, key: KeyInfo, counts: dict[str, int], action: str) -> None:
        if self.store is None:
            return
        now = time.time()
        for rule, count in counts.items():
            self.store.put(INSERT_HIT, (ctx.request_id, key.id, now, rule, action, count))

    async def require_own_session(self, key: KeyInfo, session_id: str) -> None:
        """A `user` key sees the sessions made with it and the operator's (made without a key, which every key
        finds by name): another key's is as good as missing (404)."""
        from ..store.sessions import SessionNotFoundError

        owner = await self.store.fetchone("SELECT api_key_id FROM agent_sessions WHERE id = ?", (session_id,))
        if owner is None or owner["api_key_id"] not in (None, key.id):
            raise SessionNotFoundError(f"no session {session_id!r}; `GET /api/v2/sessions` lists yours")
