"""`Persistence`: the orchestrator's hooks (`core.hooks.Hooks`) backed by the store and the cache.

Reads that decide a request (cache lookup, budget check) are awaited; every write
is queued for the store's writer, so recording never slows an answer down.

With `strict` durability, each ledger row is queued for an immediate commit and
`committed(request_id)` waits for it: the gateway holds an answer's last byte until then.

A session's budget is reserved in the database on each request's estimate and settled on
its cost (`store.shared`), so concurrent requests, in this process or in any other gateway on
the same database, cannot together slip past it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from .cache.semantic import SemanticCache, exact_key
from .core import router
from .core.errors import BudgetExceededError
from .core.hooks import CachedAnswer, CallContext, RequestRecord, RouteOptions
from .core.tokens import PIECE_CHARS, off_loop
from .core.types import ChatRequest, ChatResponse
from .store.queries import (
    INSERT_DECISION,
    INSERT_HEALTH,
    decision_rows,
    health_row,
    ledger_writes,
)
from .store import shared
from .store.sessions import INSERT_MESSAGE, SessionInactiveError, get_session
from .store.store import Store

log = logging.getLogger("p402.store")


class Persistence:
    def __init__(
        self, store: Store, cache: SemanticCache | None = None, *, simulated: bool = False, strict: bool = False
    ) -> None:
        """`simulated`: every provider is the simulator, and each row says so. `strict`: an answer's
        last byte waits for its ledger row's commit (`committed`)."""
        self.store = store
        self.cache = cache
        self.simulated = int(simulated)
        self.strict = strict
        self._commits: dict[str, asyncio.Future[None]] = {}  # strict: request id -> its row's commit
        self._keying: set[asyncio.Task[None]] = set()  # large prompts' ledger rows, keyed on the pool first
        self._holds: dict[str, shared.Hold] = {}  # request id -> its reservation on its session's budget
        self._parts_put: set[bytes] = set()  # digests of the decision parts already queued
        self._decisions: deque[Any] = deque()  # decided, their rows not made yet (`_decisions_writes`)

    # --- before the call -------------------------------------------------------------

    async def lookup(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> CachedAnswer | None:
        if ctx.session_id is not None:
            # Cache hits skip the budget check, but a paused or closed session gets no answers at all.
            _require_active(await get_session(self.store, ctx.session_id))
        if self.cache is None or not ctx.cache:
            return None
        return await self.cache.lookup(request, options, ctx.cache_namespace(), request_id=ctx.request_id)

    async def check_budget(self, ctx: CallContext, est_cost_usd: float) -> None:
        session_id = ctx.session_id
        if session_id is None:
            return
        session = await get_session(self.store, session_id)
        _require_active(session)
        budget = session["budget_usd"]
        if budget is None:
            return
        hold, spent = await shared.reserve(
            self.store, f"session:{session_id}", 0.0, est_cost_usd, budget, ctx.request_id
        )
        if hold is None:
            raise BudgetExceededError(
                f"session {session['name']!r} ({session_id}) has ${max(0.0, budget - spent):.6f} of its "
                f"${budget:.6f} budget left; this request is estimated at ${est_cost_usd:.6f}",
                session_id=session_id,
                budget_usd=budget,
                spent_usd=spent,
                estimated_usd=est_cost_usd,
            )
        self._holds[ctx.request_id] = hold

    # --- after the call ----------------------------------------------------------------

    def decided(self, decision: Any) -> None:
        # Encoded when the writer takes it, after the request is answered: a decision is immutable. The
        # decisions queued by then are snapshot together (`router.snapshots`): the first one's maker takes
        # them all, and a decision finding the queue empty (taken, or never filled) queues a maker of its own.
        self._decisions.append(decision)
        if len(self._decisions) == 1:
            try:
                self.store.put_later(self._decisions_writes)
            except BaseException:
                self._decisions.clear()  # no maker will take them: the next decision tries again
                raise

    def _decisions_writes(self) -> list[tuple[str, Any]]:
        """The rows of every decision queued, on the writer's thread; one that fails is logged and left out."""
        taken = []
        while self._decisions:
            taken.append(self._decisions.popleft())
        routed = [d for d in taken if not isinstance(d, dict)]
        try:
            snapshots = dict(zip(map(id, routed), router.snapshots(routed)))
        except Exception:  # each is then snapshot alone
            log.exception("store writer: decisions could not be snapshot together")
            snapshots = {}
        writes: list[tuple[str, Any]] = []
        for decision in taken:
            try:
                writes += self._decision_writes(decision, snapshots.get(id(decision)))
            except Exception:  # as the writer does with a maker that fails: these rows only are lost
                log.exception("store writer: could not make a decision's rows")
        return writes

    def _decision_writes(self, decision: Any, snapshot: Any = None) -> list[tuple[str, Any]]:
        row, parts = decision_rows(decision, snapshot)
        writes: list[tuple[str, Any]] = []
        for sql, digest, part in parts:
            if digest not in self._parts_put:
                if len(self._parts_put) >= 10_000:
                    self._parts_put.clear()  # INSERT OR IGNORE keeps a part written twice once
                self._parts_put.add(digest)
                writes.append((sql, (digest, part)))
        writes.append((INSERT_DECISION, (*row, self.simulated)))
        return writes

    async def drain(self) -> None:
        """Wait for ledger rows still being keyed on the pool to be queued."""
        if self._keying:
            await asyncio.gather(*self._keying, return_exceptions=True)

    def completed(
        self,
        record: RequestRecord,
        request: ChatRequest,
        response: ChatResponse | None,
        options: RouteOptions,
        ctx: CallContext,
    ) -> None:
        hold = self._holds.pop(ctx.request_id, None)
        if hold is not None:
            shared.settle(self.store, hold, record.cost_usd)
        session_id = record.session_id
        landed: asyncio.Future[None] | None = None
        if self.strict:
            landed = self._commits[ctx.request_id] = asyncio.get_running_loop().create_future()

        def done() -> None:
            if landed is not None:
                self._commits.pop(ctx.request_id, None)
                if not landed.done():
                    landed.set_result(None)

        keys = self.cache.probed_keys(ctx.request_id) if self.cache is not None else None  # before insert() takes them
        known = keys.exact if keys is not None else None

        def ledger_row(prompt_key: str | None = known) -> list[tuple[str, Any]]:  # made after the answer has gone
            prompt_key = prompt_key if prompt_key is not None else exact_key(request, options)
            needs = ",".join(sorted(request.needs()))
            return ledger_writes(record, needs=needs, prompt_key=prompt_key, simulated=self.simulated)

        if known is None and request.prompt_chars() > PIECE_CHARS:
            # Keying megabytes of prompt takes tens of ms: on the writer's thread it would hold a batch that long.
            async def keyed_first() -> None:
                key = await off_loop(exact_key, request, options)
                self.store.put_later(lambda: ledger_row(key), done=done, urgent=self.strict)

            task = asyncio.create_task(keyed_first())
            self._keying.add(task)
            task.add_done_callback(self._keying.discard)
        else:
            self.store.put_later(ledger_row, done=done, urgent=self.strict)
        ok = record.status == "ok" and response is not None
        if self.cache is not None:
            if ok and not record.cached and ctx.cache:
                self.cache.insert(ctx.request_id, response, record.cost_usd or 0.0)  # unpriced: saves nothing known
            else:
                self.cache.forget(ctx.request_id)
        if ok and session_id is not None:
            assert response is not None
            model = f"{response.provider}/{response.model}"
            self.store.put(INSERT_MESSAGE, (session_id, "user", request.last_user_text(), None, record.id, record.ts))
            self.store.put(INSERT_MESSAGE, (session_id, "assistant", response.content or "", model, record.id, record.ts))

    async def committed(self, request_id: str) -> None:
        """Wait until the request's ledger row is committed (strict durability; at once otherwise)."""
        landed = self._commits.get(request_id)  # gone once committed
        if landed is not None:
            await landed

    def health(self, snapshot: dict[str, Any]) -> None:
        self.store.put(INSERT_HEALTH, (*health_row(snapshot), self.simulated))


def _require_active(session: dict[str, Any]) -> None:
    if session["status"] != "active":
        raise SessionInactiveError(
            f"session {session['name']!r} ({session['id']}) is {session['status']}; "
            f"`p402 sessions update {session['id']} --status active` reopens it"
        )
