"""Embeddings: choose an embedding model, call it with failover, and count the call as chat is counted.

`model` pins one model or routes among the catalog's embedding models (`auto`, `p402/<mode>`),
cheapest first unless a mode says otherwise. A pinned model never fails over: another model's
vectors live in another space, and a caller mixing them would get wrong answers, not an error.

Every text's vector is kept by exact input (namespace, model, dimensions, text), so the same
input on the same model never goes upstream twice; a request partly seen before sends only
the rest. Each call makes one ledger row, spend and events like a chat request.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .catalog import ModelSpec
from .costs import call_cost
from .errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NoEligibleModelError,
    P402Error,
    ProviderError,
    UnavailableError,
)
from .events import CacheHit, RequestCompleted, SpendUpdated
from .hooks import CallContext, RequestRecord, RouteOptions
from .router import parse_model_ref
from .tokens import count_text
from .types import TIER_RANK, Attempt, ChatRequest, P402Meta, Usage

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

# Models known to shorten their vectors on request (OpenAI `dimensions`, Gemini `outputDimensionality`,
# Cohere v4 `output_dimension`, Fireworks' Matryoshka-trained nomic); the rest refuse the field.
SHORTENS = frozenset(
    {
        "openai/text-embedding-3-small",
        "openai/text-embedding-3-large",
        "google/gemini-embedding-001",
        "cohere/embed-v4.0",
        "fireworks/nomic-ai/nomic-embed-text-v1.5",
    }
)
CACHE_BYTES = 64 * 1024 * 1024  # vectors kept by exact input, least recently used dropped first


class VectorCache:
    """Vectors by exact input, least recently used dropped past `limit` bytes."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()

    @staticmethod
    def key(namespace: str, model_id: str, dimensions: int | None, text: str) -> bytes:
        raw = f"{namespace}\0{model_id}\0{dimensions}\0".encode() + text.encode("utf-8", "surrogatepass")
        return hashlib.blake2b(raw, digest_size=16).digest()

    def get(self, key: bytes) -> np.ndarray | None:
        vector = self._vectors.get(key)
        if vector is None:
            self.misses += 1
            return None
        self._vectors.move_to_end(key)
        self.hits += 1
        return vector

    def put(self, key: bytes, vector: np.ndarray) -> None:
        old = self._vectors.pop(key, None)
        if old is not None:
            self.size -= old.nbytes
        self._vectors[key] = vector
        self.size += vector.nbytes
        while self.size > self.limit and self._vectors:
            _, dropped = self._vectors.popitem(last=False)
            self.size -= dropped.nbytes

    def __len__(self) -> int:
        return len(self._vectors)


class EmbeddingLedgerEntry(ChatRequest):
    """An embeddings call as the ledger keys it: its texts as one user message, needing embeddings."""

    def needs(self) -> set[str]:
        return {"embeddings"}


@dataclass(slots=True)
class EmbeddingResult:
    vectors: list[np.ndarray]  # float64, one per text, in order
    prompt_tokens: int
    meta: P402Meta
    model: str = ""  # the provider's wire id
    attempts: list[Attempt] = field(default_factory=list)


def candidates(
    orchestrator: Orchestrator, options: RouteOptions, *, dimensions: int | None, longest: int, tokens: int
) -> tuple[list[ModelSpec], bool]:
    """The embedding models to try in order, and whether the caller pinned one. `longest`: the tokens of
    the longest input; `tokens`: of them all, for `max_cost_usd`."""
    limit = options.max_cost_usd
    catalog = orchestrator.catalog
    ref, named_mode = parse_model_ref(options.model)
    mode = options.mode or named_mode
    if ref is not None:
        spec = catalog.resolve(ref)  # `provider/<any id>` passes through, unpriced
        if "embeddings" not in spec.capabilities:
            raise InvalidRequestError(f"{spec.id} is not an embedding model; `auto` routes among those that are")
        if dimensions is not None and spec.id not in SHORTENS:
            raise InvalidRequestError(f"{spec.id} cannot shorten its vectors: leave out dimensions, or choose one of "
                                      f"{', '.join(sorted(SHORTENS))}")
        if longest > spec.context_window:
            raise InvalidRequestError(f"an input holds {longest} tokens; {spec.id} takes at most {spec.context_window}")
        if spec.provider not in orchestrator.router.usable:
            raise NoEligibleModelError(f"{spec.id} is not usable here: provider {spec.provider!r} has no key or is off")
        if limit is not None and spec.priced and call_cost(spec, Usage(prompt_tokens=tokens)) > limit:
            raise NoEligibleModelError(f"{spec.id} would cost more than max_cost_usd ({limit:g}) for these inputs")
        return [spec], True
    tier_cap = TIER_RANK[options.max_tier] if options.max_tier is not None else len(TIER_RANK)
    found = [
        m for m in catalog.models.values()
        if "embeddings" in m.capabilities and m.priced and m.provider in orchestrator.router.usable
        and m.provider not in options.exclude and m.tier_rank <= tier_cap and m.has(options.require - {"chat"})
        and (dimensions is None or m.id in SHORTENS) and longest <= m.context_window
        and m.deprecated_on is None
        and (limit is None or call_cost(m, Usage(prompt_tokens=tokens)) <= limit)
    ]  # fmt: skip
    if not found:
        raise NoEligibleModelError(
            "no embedding model fits: none usable here takes these options"
            + (" and shortens its vectors" if dimensions is not None else "")
        )
    mode = mode or "cost"
    prefer = options.prefer
    if mode == "quality":
        found.sort(key=lambda m: (m.provider not in prefer, -m.quality, m.input_per_1m, m.id))
    elif mode == "speed":
        found.sort(key=lambda m: (m.provider not in prefer, m.ttft_ms, m.input_per_1m, m.id))
    else:  # cost, and balanced: vectors of one size differ little but in price
        found.sort(key=lambda m: (m.provider not in prefer, m.input_per_1m, -m.quality, m.id))
    return found, False


async def embed(
    orchestrator: Orchestrator,
    texts: list[str],
    *,
    options: RouteOptions,
    ctx: CallContext,
    dimensions: int | None = None,
    cache: VectorCache | None = None,
) -> EmbeddingResult:
    """One vector per text from the chosen model (or the cache), recorded like a chat request."""
    started = time.perf_counter()
    record = RequestRecord(
        id=ctx.request_id, session_id=ctx.session_id, api_key_id=ctx.api_key_id, tag=ctx.tag,
        namespace=ctx.cache_namespace(), source=ctx.source, mode=options.mode or "cost",
        client_request_id=ctx.client_request_id,
    )  # fmt: skip
    ledger = EmbeddingLedgerEntry(model=options.model, messages=[{"role": "user", "content": "\n".join(texts)}])
    counts = [count_text(t).tokens for t in texts]
    estimate = sum(counts)
    plan, pinned = candidates(
        orchestrator, options, dimensions=dimensions, longest=max(counts, default=0), tokens=estimate
    )
    record.est_cost_usd = call_cost(plan[0], Usage(prompt_tokens=estimate))
    attempts: list[Attempt] = []
    timeout = ctx.timeout_s if ctx.timeout_s is not None else orchestrator.settings.router.request_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await _run(orchestrator, texts, plan, pinned, counts, record, ledger, options, ctx, dimensions,
                              cache, attempts, started)
    except TimeoutError:
        error = DeadlineExceededError(f"no complete answer within the request's deadline of {timeout:g}s")
        _failed(orchestrator, record, ledger, options, ctx, error.kind, str(error), attempts, started)
        raise error from None
    except asyncio.CancelledError:
        _failed(orchestrator, record, ledger, options, ctx, "cancelled", "the caller went away", attempts, started)
        raise
    except P402Error as error:
        _failed(orchestrator, record, ledger, options, ctx, error.kind, str(error), attempts, started)
        raise


async def _run(
    orchestrator: Orchestrator, texts: list[str], plan: list[ModelSpec], pinned: bool, counts: list[int],
    record: RequestRecord, ledger: ChatRequest, options: RouteOptions, ctx: CallContext, dimensions: int | None,
    cache: VectorCache | None, attempts: list[Attempt], started: float,
) -> EmbeddingResult:
    """The tries in order until one answers; the caller records a failure."""
    await orchestrator.hooks.check_budget(ctx, record.est_cost_usd or 0.0)
    use_cache = cache is not None and ctx.cache
    tries = 1 if pinned or not options.failover else len(plan)
    if not pinned and options.max_retries is not None:
        tries = min(tries, 1 + options.max_retries)
    last: ProviderError | None = None
    for spec in plan[:tries]:
        keys = [VectorCache.key(record.namespace or "", spec.id, dimensions, t) for t in texts] if use_cache else []
        found: list[np.ndarray | None] = [cache.get(k) for k in keys] if use_cache else [None] * len(texts)  # type: ignore[union-attr]
        missing = [i for i, v in enumerate(found) if v is None]
        saved_tokens = sum(counts[i] for i, v in enumerate(found) if v is not None)
        billed_tokens = 0
        if missing:
            if not orchestrator.health.allow(spec.provider, spec.id):
                attempts.append(Attempt(spec.provider, spec.model, "circuit_open", "ejected or throttled", 0.0))
                continue
            called = time.perf_counter()
            try:
                result = await orchestrator.adapter(spec.provider).embed(
                    [texts[i] for i in missing], model=spec.id, dimensions=dimensions
                )
            except ProviderError as error:
                latency_ms = (time.perf_counter() - called) * 1000
                orchestrator.health.record_failure(spec.provider, spec.id, error, latency_ms=latency_ms)
                attempts.append(Attempt(spec.provider, spec.model, error.kind, str(error), latency_ms))
                last = error
                if not error.retryable and error.kind != "authentication":
                    raise
                continue
            except asyncio.CancelledError:
                orchestrator.health.release(spec.provider, spec.id)
                raise
            latency_ms = (time.perf_counter() - called) * 1000
            orchestrator.health.record_success(spec.provider, spec.id, latency_ms=latency_ms, output_tokens=0)
            attempts.append(Attempt(spec.provider, spec.model, None, None, latency_ms))
            # Gemini reports no usage: its tokens are counted here, as a stream without usage is.
            billed_tokens = result.prompt_tokens or sum(counts[i] for i in missing)
            for index, vector in zip(missing, result.vectors):
                found[index] = array = np.asarray(vector, dtype=np.float64)
                if use_cache:
                    cache.put(keys[index], array)  # type: ignore[union-attr]
        # An unpriced (unlisted) model's cost is unknown: None, and no saving claimed for it.
        cost = call_cost(spec, Usage(prompt_tokens=billed_tokens)) if spec.priced else None
        saved = call_cost(spec, Usage(prompt_tokens=saved_tokens)) if spec.priced else 0.0
        meta = P402Meta(
            provider=spec.provider, model=spec.model, cost_usd=cost,
            latency_ms=(time.perf_counter() - started) * 1000, attempts=attempts,
            cached=not missing, saved_usd=saved,
        )  # fmt: skip
        record.provider, record.model = spec.provider, spec.model
        record.prompt_tokens = billed_tokens + saved_tokens
        record.cost_usd, record.saved_usd = cost, saved
        record.cached = not missing
        record.latency_ms = meta.latency_ms
        record.attempts = list(attempts)
        if not missing:
            orchestrator.bus.publish(
                CacheHit(request_id=ctx.request_id, match="exact", similarity=1.0, saved_usd=saved,
                         namespace=record.namespace or "")
            )  # fmt: skip
        orchestrator.bus.publish(RequestCompleted(record=record))
        if cost:
            orchestrator.bus.publish(
                SpendUpdated(provider=spec.provider, model=spec.model, cost_usd=cost, session_id=ctx.session_id)
            )
        orchestrator.hooks.completed(record, ledger, None, options, ctx)
        return EmbeddingResult([v for v in found if v is not None], record.prompt_tokens, meta, spec.model, attempts)
    if last is not None and pinned:
        raise last
    raise UnavailableError(
        f"all {len(attempts)} embedding attempt(s) failed" + (f"; last: {last}" if last else ""),
        attempts, last, retry_after_s=1.0,
    )

def _failed(
    orchestrator: Orchestrator, record: RequestRecord, ledger: ChatRequest, options: RouteOptions, ctx: CallContext,
    kind: str, message: str, attempts: list[Attempt], started: float,
) -> None:
    record.status, record.error_kind, record.error = "error", kind, message
    record.latency_ms = (time.perf_counter() - started) * 1000
    record.attempts = list(attempts)
    orchestrator.bus.publish(RequestCompleted(record=record))
    orchestrator.hooks.completed(record, ledger, None, options, ctx)


def as_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes."""
    import base64

    return base64.b64encode(vector.astype("<f4").tobytes()).decode()


def untokenize(tokens: list[int]) -> str:
    """A token array (OpenAI's cl100k ids, as text-embedding-3 reads them) as the text it encodes."""
    from .tokens import encoding_for

    encoding, _ = encoding_for("text-embedding-3-small")
    if encoding is None:
        raise InvalidRequestError("token arrays need the cl100k_base tokenizer, which is not installed; send text")
    try:
        return encoding.decode(tokens, errors="strict")
    except (KeyError, ValueError, OverflowError) as error:  # an id past the vocabulary, or past any integer it has
        raise InvalidRequestError(f"input holds token ids that do not decode: {error}") from None
