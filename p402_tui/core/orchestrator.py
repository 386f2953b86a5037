"""The orchestrator: every request from the CLI, the gateway and the console goes through here.

One request is: route -> budget check (hooks) -> cache lookup (hooks) -> call the
chosen model -> on a retryable error, the next fallback -> record (hooks, events,
health). The cache is asked only once a request could be served: a refused one
costs no embedding. A large prompt is counted on a small thread pool first, so
routing it never holds the event loop. A request has one deadline across all its
attempts (`[router] request_timeout_s`, or the caller's `timeout_s`), apart from
each attempt's own timeout: past it, `DeadlineExceededError`. Failover follows the error's scope: after a provider-level failure (5xx,
overload, timeout, connection lost, rate limit) the rest of that provider's models
are skipped; after a model-level one (prompt too long, model not found) the same
provider's other models may follow; a rejected key moves to another provider; a bad
request stops at once, because no other model would take it either.

A stream fails over only until its first content has gone to the caller. After that
an error ends it with one last chunk whose `error` is set and whose finish_reason is
"error". Closing a stream (or cancelling its task) closes the upstream at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from .adapters import Adapter, make_adapter
from .catalog import ModelSpec
from .config import ResolvedProvider, Settings
from .costs import call_cost
from .errors import (
    LOCAL_KINDS,
    DeadlineExceededError,
    EgressFailedError,
    NoEligibleModelError,
    P402Error,
    ProviderError,
    UnavailableError,
)
from .events import AttemptFailed, CacheHit, EventBus, RequestCompleted, RouteDecided, SpendUpdated
from .health import HealthPolicy, HealthTracker
from .hooks import CallContext, Hooks, NoHooks, RequestRecord, RouteOptions
from .params import apply_rules
from .router import CIRCUIT_OPEN, RouteDecision, Router
from .tokens import PIECE_CHARS, count_text, off_loop, warm
from .types import Attempt, ChatChunk, ChatRequest, ChatResponse, P402Meta, ToolCallDelta, Usage, new_id

log = logging.getLogger(__name__)


class ChatStream:
    """An answer as it arrives: an async iterator of `ChatChunk`.

    `meta` fills in as the stream goes (provider and model once content flows, cost
    and latency after the last chunk); `decision` is the routing decision. Use it as
    `async with` or call `aclose()` to stop early: the upstream is closed at once.
    A consumer that writes chunks on in bulk reads `batches()` instead (not both).
    """

    def __init__(self, orchestrator: Orchestrator, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> None:
        self.id = new_id()
        self.created = int(time.time())
        self.request_id = ctx.request_id
        self.meta = P402Meta(provider="", model="")
        self.usage: Usage | None = None  # what the answer was billed on, once it is done (an estimate if none came)
        self.decision: RouteDecision | None = None
        self._batches = orchestrator._stream(self, request, options, ctx)
        self._pending: deque[ChatChunk] = deque()

    def batches(self) -> AsyncIterator[list[ChatChunk]]:
        """The chunks in the lists they arrived in from upstream: one hop per read, not per chunk."""
        return self._batches

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> ChatChunk:
        while not self._pending:
            self._pending.extend(await self._batches.__anext__())
        return self._pending.popleft()

    async def aclose(self) -> None:
        await self._batches.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Plan:
    """The models still to try for one request, and what the failures so far rule out."""

    def __init__(self, orchestrator: Orchestrator, decision: RouteDecision, options: RouteOptions) -> None:
        self._orchestrator = orchestrator
        self._decision = decision
        chosen = decision.chosen_id
        self._queue = [chosen] if chosen is not None else []
        # Most calls succeed first time: rank the fallbacks only when one is needed.
        self._fallbacks: RouteDecision | None = decision if options.failover else None
        # The candidates the router left out as ejected, looked at once the others are spent.
        self._ejected: RouteDecision | None = decision if options.failover or chosen is None else None
        self._despite: set[str] = set()  # ejected, but sent anyway under the ejection cap
        self._failover = options.failover
        retries = options.max_retries if options.max_retries is not None else orchestrator.settings.router.max_retries
        self._left = 1 + (retries if options.failover else 0)
        self._dead_providers: set[str] = set()
        self.attempts: list[Attempt] = []
        self.last_error: ProviderError | None = None
        self.skipped: list[str] = []  # candidates not called because they are ejected or throttled

    def next(self) -> ModelSpec | None:
        """The next model worth a call, or None when the plan is spent."""
        if self._left <= 0:
            return None
        health = self._orchestrator.health
        models = self._orchestrator.catalog.models
        while self._queue or self._unfold() or self._over_cap():
            model_id = self._queue.pop(0)
            spec = models[model_id]
            if spec.provider in self._dead_providers:
                continue
            if not health.allow(spec.provider, spec.id, despite_ejection=model_id in self._despite):
                self.skipped.append(model_id)  # ejected, throttled, or half-open with its trials under way
                continue
            self._left -= 1
            return spec
        return None

    def _over_cap(self) -> bool:
        """Queue the least-bad ejected candidates beyond `max_ejection_percent` of them all (once)."""
        decision, self._ejected = self._ejected, None
        if decision is None:
            return False
        orchestrator = self._orchestrator
        models = orchestrator.catalog.models
        pt, ot, max_cost = decision.prompt_tokens, decision.est_output_tokens, decision.options.max_cost_usd
        # The router stopped at the ejection: the request's own limits still apply.
        ejected = [
            e.id for e in decision.excluded
            if e.reason == CIRCUIT_OPEN and models[e.id].context_window >= pt + ot and models[e.id].max_output_tokens >= ot
            and (max_cost is None or call_cost(models[e.id], Usage(prompt_tokens=pt, completion_tokens=ot)) <= max_cost)
        ]
        ranked_out = len(ejected)
        ejected += [mid for mid in dict.fromkeys(self.skipped) if mid not in ejected]
        if not ejected:
            return False
        eligible = (decision.chosen_id is not None) + len(decision.fallbacks)  # ids only: no scores built
        total = (eligible if self._failover else 0) + ranked_out
        room = len(ejected) - math.floor(total * orchestrator.health.policy.max_ejection_percent / 100)
        standing = [(mid, orchestrator.health.ejection(models[mid].provider, mid)) for mid in ejected]
        tryable = [(e.error_rate, e.retry_in_s, mid) for mid, e in standing if e is not None and not e.throttled]
        tryable.sort()
        for _, _, mid in tryable[: max(room, 0)]:
            self._despite.add(mid)
            self._queue.append(mid)
        return bool(self._queue)

    def retry_after_s(self) -> float:
        """The soonest any candidate may be called again, for a refusal's Retry-After."""
        health = self._orchestrator.health
        models = self._orchestrator.catalog.models
        decision = self._decision
        ids = [*self.skipped, *(e.id for e in decision.excluded if e.reason == CIRCUIT_OPEN)]
        ids += [a.provider + "/" + a.model for a in self.attempts]
        waits = []
        for mid in dict.fromkeys(ids):
            spec = models.get(mid)
            standing = health.ejection(spec.provider, mid) if spec is not None else None
            waits.append(standing.retry_in_s if standing is not None else 0.0)
        return max(min(waits, default=0.0), 1.0)

    def failed(self, spec: ModelSpec, error: ProviderError, latency_ms: float) -> bool:
        """Note a failure; True when another model may still be tried."""
        self.attempts.append(Attempt(spec.provider, spec.model, error.kind, str(error), latency_ms))
        self.last_error = error
        if not error.retryable and error.kind != "authentication":
            self._left = 0  # a bad request: no other model would take it either
            return False
        if error.scope == "provider":
            self._dead_providers.add(spec.provider)  # a rejected key too: it will not work for the other models
        models = self._orchestrator.catalog.models
        self._unfold()
        if self._left > 0 and not any(models[mid].provider not in self._dead_providers for mid in self._queue):
            self._over_cap()
        return self._left > 0 and any(models[mid].provider not in self._dead_providers for mid in self._queue)

    def _unfold(self) -> bool:
        """Queue the decision's fallbacks (once); True if that added any."""
        if self._fallbacks is None:
            return False
        decision, self._fallbacks = self._fallbacks, None
        if decision.chosen_id is not None:
            self._queue.extend(decision.fallbacks)
        else:  # the pinned model is ejected or throttled: failing over from it is still failing over
            self._queue.extend(c.id for c in decision.candidates)
        return bool(self._queue)

    def succeeded(self, spec: ModelSpec, latency_ms: float) -> None:
        self.attempts.append(Attempt(spec.provider, spec.model, None, None, latency_ms))

    def exhausted(self) -> P402Error:
        """The error for a request no model answered."""
        tried = len(self.attempts)
        last = self.last_error
        if last is not None and (not last.retryable or (tried == 1 and not self._failover)):
            # A bad request, or the one model failover-off allows: the provider's own error says it best.
            return last
        kinds = {attempt.error_kind for attempt in self.attempts}
        if tried > 1 and last is not None and kinds == {last.kind} and last.kind in LOCAL_KINDS:
            return EgressFailedError(
                f"every provider failed for the same local reason: {last.message}",
                list(self.attempts), last, reason=last.kind,
            )  # fmt: skip
        retry = self.retry_after_s()
        if not tried:
            return UnavailableError(
                f"no candidate can be called now: {len(self.skipped) or 'every'} ejected or throttled; "
                f"try again in {retry:.0f}s", [], None, retry_after_s=retry,
            )
        return UnavailableError(
            f"all {tried} attempt(s) failed; last: {last}; try again in {retry:.0f}s",
            list(self.attempts), last, retry_after_s=retry,
        )


class _Flow:
    """One streamed attempt as it goes."""

    __slots__ = ("spec", "prompt_tokens", "started", "text", "usage", "ttft_ms", "finish_reason", "held", "called")

    def __init__(self, spec: ModelSpec, prompt_tokens: int) -> None:
        self.spec = spec
        self.prompt_tokens = prompt_tokens
        self.started = time.perf_counter()
        self.text: list[str] = []
        self.usage: Usage | None = None
        self.ttft_ms: float | None = None
        self.finish_reason: str | None = None
        self.held: list[ChatChunk] = []  # a role-only preamble, held back while the attempt may still fail over
        self.called = False  # the answer holds tool calls (in deltas, not assembled here)

    def take(self, batch: list[ChatChunk], meta: P402Meta, started: float) -> list[ChatChunk]:
        """What of one upstream batch goes on to the caller; the first real chunk marks the first token."""
        out: list[ChatChunk] = []
        for chunk in batch:
            if chunk.usage is not None:
                self.usage = chunk.usage
            if self.ttft_ms is None:
                if not (chunk.content or chunk.reasoning or chunk.tool_calls or chunk.finish_reason):
                    self.held.append(chunk)
                    continue
                now = time.perf_counter()
                self.ttft_ms = (now - self.started) * 1000
                meta.provider, meta.model = self.spec.provider, self.spec.model
                meta.ttft_ms = (now - started) * 1000
                out += self.held
            if chunk.content:
                self.text.append(chunk.content)
            if chunk.tool_calls:
                self.called = True
            if chunk.finish_reason:
                self.finish_reason = chunk.finish_reason
            out.append(chunk)
        return out

    def final_usage(self) -> Usage:
        """The provider's usage; our own count when the stream ended without one."""
        if self.usage is not None:
            return self.usage
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=count_text("".join(self.text)).tokens, estimated=True
        )


def _estimated_usage(response: ChatResponse, prompt_tokens: int) -> Usage:
    """Usage for an answer that came with none (a self-hosted server, say): our count, flagged as such."""
    text = (response.content or "") + "".join(str(call) for call in response.tool_calls or ())
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=count_text(text).tokens, estimated=True)


class Orchestrator:
    """Routes, calls, fails over and records; the one way requests reach providers."""

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus | None = None,
        hooks: Hooks | None = None,
        adapters: dict[str, Adapter] | None = None,
        health: HealthTracker | None = None,
        transport_for: Callable[[ResolvedProvider], Any] | None = None,
    ) -> None:
        """`transport_for`: the transport a provider's adapter calls through (the runtime's egress choice)."""
        self.settings = settings
        self._transport_for = transport_for
        self.catalog = settings.catalog
        self.bus = bus or EventBus()
        self.hooks: Hooks = hooks or NoHooks()
        self.health = health or HealthTracker(bus=self.bus, policy=HealthPolicy(**settings.health.model_dump()))
        if self.health.bus is None:
            self.health.bus = self.bus
        self.health.on_change = self._health_changed
        self.router = Router.from_settings(settings, self.health)
        self._adapters: dict[str, Adapter] = dict(adapters or {})

    # --- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        """Load tokenizers off the loop; start active health probes when configured."""
        await warm([None])
        interval = self.settings.router.probe_interval_s
        if interval:
            adapters = {}
            for provider in self.router.usable:
                try:
                    adapters[provider] = self.adapter(provider)
                except ProviderError as error:
                    log.warning("no health probe for %s: %s", provider, error)
            self.health.start_probes(adapters, interval)

    async def aclose(self) -> None:
        await self.health.aclose()
        adapters, self._adapters = list(self._adapters.values()), {}
        for adapter in adapters:
            await adapter.aclose()

    async def __aenter__(self) -> Orchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def adapter(self, provider: str) -> Adapter:
        """The provider's adapter, made on first use and kept (one connection pool per provider)."""
        adapter = self._adapters.get(provider)
        if adapter is None:
            resolved = self.settings.providers.get(provider)
            if resolved is None:
                raise ProviderError(f"unknown provider {provider!r}", provider=provider)
            adapter = make_adapter(resolved, self._transport_for(resolved) if self._transport_for else None)
            self._adapters[provider] = adapter
        return adapter

    def _health_changed(self, snapshot: dict[str, Any]) -> None:
        self.hooks.health(snapshot)

    # --- routing -------------------------------------------------------------------

    def route(self, request: ChatRequest, options: RouteOptions | None = None) -> RouteDecision:
        """A dry run: the decision, with no call made and nothing published."""
        return self.router.route(request, options)

    async def _admit(
        self, request: ChatRequest, options: RouteOptions, ctx: CallContext, record: RequestRecord
    ) -> RouteDecision:
        """Route and check the budget; the decision is published now only if it refuses the request."""
        if request.prompt_chars() > PIECE_CHARS:
            await off_loop(self.router.count_prompt, request)  # routing below finds the count made
        decision = ctx.decision = self.router.route(request, options)
        # Only ejected models left: the plan may still try the least bad of them, or answer 503.
        if decision.chosen_id is None and not any(e.reason == CIRCUIT_OPEN for e in decision.excluded):
            self.bus.publish(RouteDecided(decision=decision, api_key_id=ctx.api_key_id))
            self.hooks.decided(decision)
            raise NoEligibleModelError(f"no eligible model: {decision.why_none()}")
        try:
            await self.hooks.check_budget(ctx, decision.est_cost_usd)
            if ctx.policy is not None:
                await ctx.policy.admit(ctx, decision)
        except P402Error:
            self._publish(decision, record)
            raise
        return decision

    def _publish(self, decision: RouteDecision, record: RequestRecord) -> None:
        """A decision that goes on to a call (or a budget refusal): told to the bus and the ledger."""
        self.bus.publish(RouteDecided(decision=decision, api_key_id=record.api_key_id))
        self.hooks.decided(decision)
        self._note_decision(record, decision)

    def _deadline(self, ctx: CallContext) -> asyncio.Timeout:
        timeout = ctx.timeout_s if ctx.timeout_s is not None else self.settings.router.request_timeout_s
        return asyncio.timeout(timeout)

    def _past_deadline(self, ctx: CallContext, plan: _Plan | None, spec: ModelSpec | None) -> DeadlineExceededError:
        """The error for a request whose deadline passed (cutting short the attempt on `spec`, if any)."""
        timeout = ctx.timeout_s if ctx.timeout_s is not None else self.settings.router.request_timeout_s
        error = DeadlineExceededError(f"no complete answer within the request's deadline of {timeout:g}s")
        if spec is not None:
            self.health.release(spec.provider, spec.id)
            if plan is not None:
                plan.attempts.append(Attempt(spec.provider, spec.model, error.kind, str(error), 0.0))
        return error

    # --- complete ------------------------------------------------------------------

    async def complete(
        self, request: ChatRequest, options: RouteOptions | None = None, ctx: CallContext | None = None
    ) -> ChatResponse:
        """The whole answer, with `.p402` filled in."""
        options = options or RouteOptions()
        ctx = ctx or CallContext()
        started = time.perf_counter()
        record = self._record(ctx, stream=False)
        decision: RouteDecision | None = None
        plan: _Plan | None = None
        spec: ModelSpec | None = None
        deadline = self._deadline(ctx)
        try:
            async with deadline:
                decision = await self._admit(request, options, ctx, record)
                cached = await self._cached(request, options, ctx, record, started)
                if cached is not None:
                    return cached
                self._publish(decision, record)
                plan = _Plan(self, decision, options)
                while (spec := plan.next()) is not None:
                    attempt_started = time.perf_counter()
                    call, dropped = _shaped(request, spec)
                    try:
                        response = await self.adapter(spec.provider).complete(call, model=spec.model)
                    except ProviderError as error:
                        latency_ms = (time.perf_counter() - attempt_started) * 1000
                        self.health.record_failure(spec.provider, spec.id, error, latency_ms=latency_ms)
                        again = plan.failed(spec, error, latency_ms)
                        self._attempt_failed(ctx, decision, spec, error, again)
                        if not again:
                            break
                        continue
                    latency_ms = (time.perf_counter() - attempt_started) * 1000
                    plan.succeeded(spec, latency_ms)
                    if not response.usage.total_tokens and (response.content or response.tool_calls):
                        response.usage = _estimated_usage(response, decision.prompt_tokens)
                    self.health.record_success(
                        spec.provider, spec.id, latency_ms=latency_ms, output_tokens=response.usage.completion_tokens
                    )
                    cost = call_cost(spec, response.usage) if spec.priced else None
                    response.p402 = P402Meta(
                        provider=spec.provider,
                        model=spec.model,
                        cost_usd=cost,
                        latency_ms=(time.perf_counter() - started) * 1000,
                        ttft_ms=None,
                        attempts=plan.attempts,
                        decision_id=decision.id,
                        dropped_params=dropped,
                        usage_estimated=response.usage.estimated,
                    )
                    self._finish_ok(record, request, response, options, ctx, response.usage, cost, started, None)
                    return response
                spec = None
                raise plan.exhausted()
        except TimeoutError:
            if not deadline.expired():
                raise
            error = self._past_deadline(ctx, plan, spec)
            self._finish_error(record, request, options, ctx, error.kind, str(error), plan, started)
            raise error from None
        except asyncio.CancelledError:
            if spec is not None:
                self.health.release(spec.provider, spec.id)
            self._finish_error(record, request, options, ctx, "cancelled", "the caller went away", plan, started)
            raise
        except P402Error as error:
            if not record.cached:
                self._finish_error(record, request, options, ctx, error.kind, str(error), plan, started)
            raise

    # --- stream ----------------------------------------------------------------------

    def stream(
        self, request: ChatRequest, options: RouteOptions | None = None, ctx: CallContext | None = None
    ) -> ChatStream:
        """The answer chunk by chunk; errors before the first chunk raise like `complete`."""
        return ChatStream(self, request, options or RouteOptions(), ctx or CallContext())

    async def _stream(
        self, handle: ChatStream, request: ChatRequest, options: RouteOptions, ctx: CallContext
    ) -> AsyncGenerator[list[ChatChunk], None]:
        started = time.perf_counter()
        record = self._record(ctx, stream=True)
        plan: _Plan | None = None
        flow: _Flow | None = None
        finished = False
        deadline = self._deadline(ctx)
        when = deadline.when()
        try:
            try:
                async with deadline:  # no yield inside: the deadline's task is the one reading
                    decision = await self._admit(request, options, ctx, record)
                    cached = await self._cached(request, options, ctx, record, started)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise self._past_deadline(ctx, None, None) from None
            if cached is not None:
                finished = True
                handle.meta = cached.p402  # type: ignore[assignment]
                yield _replay(cached)
                return
            handle.decision = decision
            handle.meta.decision_id = decision.id
            self._publish(decision, record)
            plan = _Plan(self, decision, options)
            handle.meta.attempts = plan.attempts
            while (spec := plan.next()) is not None:
                flow = _Flow(spec, decision.prompt_tokens)
                upstream: AsyncIterator[list[ChatChunk]] | None = None
                call, handle.meta.dropped_params = _shaped(request, spec)
                try:
                    upstream = self.adapter(spec.provider).stream_batches(call, model=spec.model)
                    while (batch := await _next_before(upstream, when)) is not None:
                        out = flow.take(batch, handle.meta, started)
                        if out:
                            yield out
                except (ProviderError, TimeoutError) as caught:
                    latency_ms = (time.perf_counter() - flow.started) * 1000
                    if isinstance(caught, ProviderError):
                        error: P402Error = caught
                        self.health.record_failure(spec.provider, spec.id, caught, latency_ms=latency_ms)
                        if flow.ttft_ms is None:
                            again = plan.failed(spec, caught, latency_ms)
                            self._attempt_failed(ctx, decision, spec, caught, again)
                            flow = None
                            if not again:
                                break
                            continue
                    else:
                        error = self._past_deadline(ctx, plan, spec)
                        if flow.ttft_ms is None:
                            flow = None
                            raise error from None
                    # Content already reached the caller: no failover, a clean ending instead.
                    plan.attempts.append(Attempt(spec.provider, spec.model, error.kind, str(error), latency_ms))
                    self._attempt_failed(ctx, decision, spec, error, False)
                    usage = flow.final_usage()
                    cost = call_cost(spec, usage) if spec.priced else None
                    self._fill_meta(handle.meta, spec, cost, started)
                    finished = True
                    self._finish_error(
                        record, request, options, ctx, error.kind, str(error), plan, started,
                        spec=spec, usage=usage, cost=cost, ttft_ms=handle.meta.ttft_ms,
                    )
                    ended = {"kind": error.kind, "message": str(error)}
                    yield [ChatChunk(finish_reason="error", usage=usage, error=ended)]
                    return
                finally:
                    if upstream is not None:
                        await upstream.aclose()  # type: ignore[attr-defined]
                if flow.ttft_ms is None and flow.held:  # an empty answer is still an answer
                    yield flow.held
                finished = True
                self._stream_done(handle, flow, plan, record, request, options, ctx, started)
                return
            raise plan.exhausted()
        except (asyncio.CancelledError, GeneratorExit):
            if not finished and flow is not None:
                if flow.finish_reason is not None and plan is not None:
                    # The caller stopped reading after the answer's last chunk: that answer is complete.
                    self._stream_done(handle, flow, plan, record, request, options, ctx, started)
                    finished = True
                else:
                    self.health.release(flow.spec.provider, flow.spec.id)
            if not finished:
                self._finish_error(record, request, options, ctx, "cancelled", "the caller went away", plan, started)
            raise
        except P402Error as error:
            if not finished:
                self._finish_error(record, request, options, ctx, error.kind, str(error), plan, started)
            raise

    def _stream_done(
        self,
        handle: ChatStream,
        flow: _Flow,
        plan: _Plan,
        record: RequestRecord,
        request: ChatRequest,
        options: RouteOptions,
        ctx: CallContext,
        started: float,
    ) -> None:
        spec = flow.spec
        latency_ms = (time.perf_counter() - flow.started) * 1000
        plan.succeeded(spec, latency_ms)
        usage = flow.final_usage()
        self.health.record_success(
            spec.provider, spec.id, latency_ms=latency_ms, ttft_ms=flow.ttft_ms, output_tokens=usage.completion_tokens
        )
        cost = call_cost(spec, usage) if spec.priced else None
        self._fill_meta(handle.meta, spec, cost, started)
        handle.meta.usage_estimated = usage.estimated
        handle.usage = usage
        response = ChatResponse(
            provider=spec.provider,
            model=spec.model,
            content="".join(flow.text),
            finish_reason=flow.finish_reason or "stop",
            usage=usage,
            id=handle.id,
            created=handle.created,
            p402=handle.meta,
        )
        if flow.called:
            # The response above holds the text only: cached, a tool call would come back as an empty answer.
            ctx.cache = False
        self._finish_ok(record, request, response, options, ctx, usage, cost, started, handle.meta.ttft_ms)

    # --- shared steps ------------------------------------------------------------------

    async def _cached(
        self, request: ChatRequest, options: RouteOptions, ctx: CallContext, record: RequestRecord, started: float
    ) -> ChatResponse | None:
        if not ctx.cache:
            return None
        hit = await self.hooks.lookup(request, options, ctx)
        if hit is None:
            return None
        source = hit.response
        meta = P402Meta(
            provider=source.provider,
            model=source.model,
            cost_usd=0.0,
            latency_ms=(time.perf_counter() - started) * 1000,
            ttft_ms=None,
            cached=True,
            saved_usd=hit.saved_usd,
        )
        response = dataclasses.replace(source, id=new_id(), created=int(time.time()), p402=meta)
        record.cached = True
        record.provider, record.model = source.provider, source.model
        record.prompt_tokens = source.usage.prompt_tokens
        record.completion_tokens = source.usage.completion_tokens
        record.saved_usd = hit.saved_usd
        record.latency_ms = meta.latency_ms
        self.bus.publish(
            CacheHit(
                request_id=ctx.request_id,
                match=hit.match,
                similarity=hit.similarity,
                saved_usd=hit.saved_usd,
                namespace=ctx.cache_namespace(),
            )
        )
        self.bus.publish(RequestCompleted(record=record))
        self._completed(record, request, response, options, ctx)
        return response

    def _completed(
        self, record: RequestRecord, request: ChatRequest, response: ChatResponse | None, options: RouteOptions,
        ctx: CallContext,
    ) -> None:
        if ctx.policy is not None:
            ctx.policy.settle(record)
        self.hooks.completed(record, request, response, options, ctx)

    @staticmethod
    def _record(ctx: CallContext, *, stream: bool) -> RequestRecord:
        record = ctx.record = RequestRecord(
            id=ctx.request_id,
            session_id=ctx.session_id,
            api_key_id=ctx.api_key_id,
            tag=ctx.tag,
            stream=stream,
            namespace=ctx.cache_namespace(),
            source=ctx.source,
            client_request_id=ctx.client_request_id,
        )
        return record

    @staticmethod
    def _note_decision(record: RequestRecord, decision: RouteDecision) -> None:
        record.mode = decision.mode
        record.decision_id = decision.id
        record.est_cost_usd = decision.est_cost_usd

    def _attempt_failed(
        self, ctx: CallContext, decision: RouteDecision, spec: ModelSpec, error: ProviderError, will_retry: bool
    ) -> None:
        self.bus.publish(
            AttemptFailed(
                request_id=ctx.request_id,
                decision_id=decision.id,
                provider=spec.provider,
                model=spec.model,
                error_kind=error.kind,
                error=str(error),
                will_retry=will_retry,
            )
        )

    @staticmethod
    def _fill_meta(meta: P402Meta, spec: ModelSpec, cost: float | None, started: float) -> None:
        meta.provider, meta.model = spec.provider, spec.model
        meta.cost_usd = cost
        meta.latency_ms = (time.perf_counter() - started) * 1000

    def _finish_ok(
        self,
        record: RequestRecord,
        request: ChatRequest,
        response: ChatResponse,
        options: RouteOptions,
        ctx: CallContext,
        usage: Usage,
        cost: float | None,
        started: float,
        ttft_ms: float | None,
    ) -> None:
        meta = response.p402
        assert meta is not None
        record.provider, record.model = meta.provider, meta.model
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cached_tokens = usage.cached_tokens
        record.reasoning_tokens = usage.reasoning_tokens
        record.usage_estimated = usage.estimated
        record.cost_usd = cost
        record.latency_ms = (time.perf_counter() - started) * 1000
        record.ttft_ms = ttft_ms
        record.attempts = list(meta.attempts)
        self.bus.publish(RequestCompleted(record=record))
        if cost is not None:  # an unpriced call spent no known money
            self.bus.publish(SpendUpdated(provider=meta.provider, model=meta.model, cost_usd=cost, session_id=ctx.session_id))
        self._completed(record, request, response, options, ctx)

    def _finish_error(
        self,
        record: RequestRecord,
        request: ChatRequest,
        options: RouteOptions,
        ctx: CallContext,
        kind: str,
        message: str,
        plan: _Plan | None,
        started: float,
        *,
        spec: ModelSpec | None = None,
        usage: Usage | None = None,
        cost: float | None = 0.0,
        ttft_ms: float | None = None,
    ) -> None:
        record.status = "error"
        record.error_kind = kind
        record.error = message
        record.latency_ms = (time.perf_counter() - started) * 1000
        record.ttft_ms = ttft_ms
        if plan is not None:
            record.attempts = list(plan.attempts)
        if spec is not None:
            record.provider, record.model = spec.provider, spec.model
        if usage is not None:
            record.prompt_tokens = usage.prompt_tokens
            record.completion_tokens = usage.completion_tokens
            record.usage_estimated = usage.estimated
        record.cost_usd = cost
        self.bus.publish(RequestCompleted(record=record))
        if cost and spec is not None:
            self.bus.publish(SpendUpdated(provider=spec.provider, model=spec.model, cost_usd=cost, session_id=ctx.session_id))
        self._completed(record, request, None, options, ctx)


def _shaped(request: ChatRequest, spec: ModelSpec) -> tuple[ChatRequest, list[str]]:
    """The request as this model takes it (its parameter rules), and the parameters dropped for it."""
    if not (spec.drops or spec.renames or spec.requires):
        return request, []
    return apply_rules(request, spec.drops, spec.renames, spec.requires)


async def _next_before(upstream: AsyncIterator[list[ChatChunk]], when: float | None) -> list[ChatChunk] | None:
    """The stream's next batch (None at its end); TimeoutError once the loop's clock passes `when`."""
    async with asyncio.timeout_at(when):
        return await anext(upstream, None)


def _replay(response: ChatResponse) -> list[ChatChunk]:
    """A whole (cached) answer as the chunks a stream would have carried."""
    chunks = [ChatChunk(role="assistant")]
    if response.reasoning:
        chunks.append(ChatChunk(reasoning=response.reasoning))
    if response.content:
        chunks.append(ChatChunk(content=response.content))
    if response.tool_calls:
        deltas = [
            ToolCallDelta(
                index=i,
                id=call.get("id"),
                name=call.get("function", {}).get("name"),
                arguments=call.get("function", {}).get("arguments", ""),
            )
            for i, call in enumerate(response.tool_calls)
        ]
        chunks.append(ChatChunk(tool_calls=deltas))
    chunks.append(ChatChunk(finish_reason=response.finish_reason, usage=response.usage))
    return chunks
