"""The seam between the orchestrator and what remembers: cache, budgets, ledger.

The orchestrator calls these hooks around every request; `persistence.Persistence`
is the real implementation, on the store and the cache, and
`NoHooks` runs the orchestrator with nothing remembered (tests of routing, the
dry-run CLI). Hooks that write must not make the request wait: they enqueue.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .types import Attempt, ChatRequest, ChatResponse, new_id, usd_json


# What one request may carry, so its work stays bounded: every surface refuses more with a clear error.
MAX_MESSAGES = 2048  # OpenAI's own limit on a request's messages
MAX_LABEL_CHARS = 128  # a tag, cache namespace or session id
MAX_SESSION_NAME_CHARS = 200


@dataclass(slots=True)
class RouteOptions:
    """How to choose a model. None means the configured default."""

    mode: str | None = None
    require: frozenset[str] = frozenset()
    prefer: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_tier: str | None = None
    max_cost_usd: float | None = None
    model: str | None = None  # pin `provider/model` (or a bare id the catalog resolves)
    failover: bool = True
    max_retries: int | None = None
    allow: frozenset[str] | None = None  # the only models that may be chosen (a gateway key's rules); None: any

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "require": sorted(self.require),
            "prefer": list(self.prefer),
            "exclude": list(self.exclude),
            "max_tier": self.max_tier,
            "max_cost_usd": self.max_cost_usd,
            "model": self.model,
            "failover": self.failover,
            "max_retries": self.max_retries,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteOptions:
        """From `to_dict()`'s shape or any part of it (CLI flags, a request body, a stored decision): a missing
        key is the default, lists become the frozenset and tuples the router's cache keys on."""
        if not _OPTION_KEYS.issuperset(data):
            raise TypeError(f"unknown route option {sorted(data.keys() - _OPTION_KEYS)[0]!r}")
        get = data.get
        failover = get("failover")
        return cls(
            mode=get("mode"),
            require=frozenset(get("require") or ()),
            prefer=tuple(get("prefer") or ()),
            exclude=tuple(get("exclude") or ()),
            max_tier=get("max_tier"),
            max_cost_usd=get("max_cost_usd"),
            model=get("model"),
            failover=True if failover is None else failover,
            max_retries=get("max_retries"),
        )


_OPTION_KEYS = frozenset(RouteOptions.__dataclass_fields__)


KEY_NAMESPACE_PREFIX = "key:"


def reserved_namespace(name: str) -> str | None:
    """Why `name` cannot be given as a cache namespace, or None."""
    if name.startswith(KEY_NAMESPACE_PREFIX):
        return f"cache namespaces starting with {KEY_NAMESPACE_PREFIX!r} are each gateway key's own; choose another name"
    return None


def api_of(source: str) -> str:
    """The API a request came through, from its source: the gateway's routes by name (chat_completions,
    messages), else where it was made (cli, console)."""
    if source == "gateway":
        return "chat_completions"
    return source.removeprefix("gateway:")


@dataclass(slots=True)
class CallContext:
    """Who asks and how the answer is kept."""

    session_id: str | None = None
    tag: str | None = None
    namespace: str | None = None  # explicit cache namespace: shared by every caller that names it
    cache: bool = True
    api_key_id: str | None = None
    # cli | console | demo | gateway (its chat completions) | gateway:<api> (its other APIs: gateway:messages)
    source: str = "cli"
    request_id: str = field(default_factory=lambda: new_id("req", 10))
    client_request_id: str | None = None  # the caller's own id for it (x-request-id), kept beside ours
    timeout_s: float | None = None  # the whole request's deadline, across attempts; None: [router] request_timeout_s
    # A key's claim on its budget and tokens (`policy.engine.Admission`): `admit(ctx, decision)` after routing,
    # before any upstream call; `settle(record)` when the request is over.
    policy: Any = None
    # What became of it, for whoever observes the request from outside (the gateway's access log, traces):
    # its ledger row (filled in as it goes) and its routing decision, once made.
    record: RequestRecord | None = None
    decision: Any = None

    def cache_namespace(self) -> str:
        """The named namespace; else the session's, else "default", each inside the gateway key's own."""
        if self.namespace:
            return self.namespace
        implicit = self.session_id or "default"
        # Explicit names may not start with the prefix (`reserved_namespace`), so no caller can name another key's.
        return implicit if self.api_key_id is None else f"{KEY_NAMESPACE_PREFIX}{self.api_key_id}/{implicit}"


@dataclass(slots=True)
class RequestRecord:
    """One ledger row: every request, failed and cached ones too."""

    id: str
    ts: float = field(default_factory=time.time)
    session_id: str | None = None
    api_key_id: str | None = None
    tag: str | None = None
    mode: str | None = None
    provider: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_estimated: bool = False  # the provider sent no usage: tokens and cost are on our count
    cost_usd: float | None = 0.0  # None: unpriced (the model has no known price)
    est_cost_usd: float | None = None
    saved_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: str = "ok"  # ok | error
    error_kind: str | None = None
    error: str | None = None
    cached: bool = False
    decision_id: str | None = None
    stream: bool = False
    namespace: str | None = None
    source: str = "cli"
    attempts: list[Attempt] = field(default_factory=list)
    client_request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "session_id": self.session_id,
            "api_key_id": self.api_key_id,
            "tag": self.tag,
            "mode": self.mode,
            "provider": self.provider,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "usage_estimated": self.usage_estimated,
            "cost_usd": None if self.cost_usd is None else usd_json(self.cost_usd),
            "priced": self.cost_usd is not None,
            "est_cost_usd": None if self.est_cost_usd is None else usd_json(self.est_cost_usd),
            "saved_usd": usd_json(self.saved_usd),
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "status": self.status,
            "error_kind": self.error_kind,
            "error": self.error,
            "cached": self.cached,
            "decision_id": self.decision_id,
            "stream": self.stream,
            "namespace": self.namespace,
            "source": self.source,
            "client_request_id": self.client_request_id,
            "attempts": [
                {"provider": a.provider, "model": a.model, "error_kind": a.error_kind, "error": a.error}
                for a in self.attempts
            ],
        }


@dataclass(slots=True)
class CachedAnswer:
    """A cache hit: the stored answer and what it saves."""

    response: ChatResponse
    match: str  # exact | semantic
    similarity: float
    saved_usd: float


class Hooks(Protocol):
    async def lookup(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> CachedAnswer | None:
        """Before routing: a cached answer, or None."""

    async def check_budget(self, ctx: CallContext, est_cost_usd: float) -> None:
        """Before any upstream call: raise BudgetExceededError if the session cannot afford it."""

    def decided(self, decision: Any) -> None:
        """A routing decision was made (enqueue its write)."""

    def completed(
        self, record: RequestRecord, request: ChatRequest, response: ChatResponse | None, options: RouteOptions, ctx: CallContext
    ) -> None:
        """After every request, ok or not: ledger row, cache insert on success (enqueue, never wait)."""

    async def committed(self, request_id: str) -> None:
        """Return once the request's ledger row is committed (the gateway's strict durability waits on this)."""

    def health(self, snapshot: dict[str, Any]) -> None:
        """A provider's health changed (enqueue a snapshot write)."""


class NoHooks:
    """Remember nothing."""

    async def lookup(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> CachedAnswer | None:
        return None

    async def check_budget(self, ctx: CallContext, est_cost_usd: float) -> None:
        return None

    def decided(self, decision: Any) -> None:
        return None

    def completed(
        self, record: RequestRecord, request: ChatRequest, response: ChatResponse | None, options: RouteOptions, ctx: CallContext
    ) -> None:
        return None

    async def committed(self, request_id: str) -> None:
        return None

    def health(self, snapshot: dict[str, Any]) -> None:
        return None
