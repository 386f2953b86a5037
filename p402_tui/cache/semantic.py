"""The response cache: exact matches first, then meaning.

Two tiers, both inside one namespace (namespaces never see each other's entries):

1. Exact: a hash of the normalised request (messages, model or routing options,
   every parameter that changes the answer). A dict lookup.
2. Semantic: the last user message is embedded and compared with cached prompts
   of the same *scope* only: same model or routing options, same answer-changing
   parameters, same system prompt and earlier turns. A hit needs cosine >= the
   threshold and must pass the near-miss guard (`near_miss`), because embeddings
   average over shared words and rate "sort by value" close to "sort by key".

Entries live in SQLite (the writer task writes them) and, for searching, in one
float32 `VectorIndex` per (namespace, scope) rebuilt from SQLite at start.
Entries expire after `ttl_s`; past `max_entries` the least recently used go.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from ..core import gil
from ..core.errors import ConfigError, P402Error
from ..core.hooks import CachedAnswer, RouteOptions
from ..core.malloc import release_free_memory
from ..core.tokens import PIECE_CHARS, off_loop
from ..core.types import ChatMessage, ChatRequest, ChatResponse, Usage
from ..store.store import Store
from .embedders import (
    MAX_CHARS,
    BuildStopped,
    Embedder,
    EmbedderPlan,
    LocalEmbedder,
    plan_embedders,
    release_memory,
)
from .index import (
    PROJECT_FROM_ROWS,
    Snapshot,
    Trained,
    VectorIndex,
    fit_projection,
    planes_bytes,
    project,
    search,
    search_many,
    sign_codes,
    train_buckets,
    warm,
)

log = logging.getLogger("p402.cache")

EXACT, SEMANTIC = "exact", "semantic"
# Request fields that change the answer; `stream` does not, so streamed and plain requests share entries.
ANSWER_PARAMS = frozenset({"temperature", "top_p", "max_tokens", "tools", "tool_choice", "response_format", "seed", "stop"})
# Of those, the ones that hold plain JSON values (numbers, strings, a list of strings).
_PLAIN_PARAMS = ("temperature", "top_p", "max_tokens", "seed", "stop")
# Unknown (extra) request fields are assumed to change the answer, except these.
NEUTRAL_EXTRAS = frozenset({"user", "metadata", "cache", "store", "stream", "stream_options", "service_tier"})
MINIMAL_PAIR_SPAN = 3
MINIMAL_PAIR_MIN_SIMILARITY = 0.95
MAX_PROBES = 10_000


# --- keys --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestKeys:
    exact: str  # the whole normalised request
    scope: str  # everything but the last user message's text
    prompt: str  # the last user message's text: what gets embedded


def _normalise_text(text: str) -> str:
    """Its words joined by single spaces. A long text goes in pieces cut at white space (the same
    words): each piece is one call holding the GIL, so keying a huge prompt on a worker thread
    lets the event loop run in between."""
    if len(text) <= PIECE_CHARS:
        return " ".join(text.split())
    parts = []
    start = 0
    while start < len(text):
        cut = _SPACE.search(text, min(start + PIECE_CHARS, len(text)))
        end = cut.start() if cut is not None else len(text)
        part = _squeezed(text[start:end])
        if part:
            parts.append(part)
        start = end
    return " ".join(parts)


def _squeezed(text: str) -> str:
    """`" ".join(text.split())` without a string per word: an ASCII text's white space made spaces and
    their runs halved until none is left, all in bytes. Splitting made a million words of an 8 MB
    prompt (75 ms of CPU on a quiet machine, several times that on a busy one, all of it holding the
    GIL the event loop waits for); this takes a tenth of it."""
    if not text.isascii():
        return " ".join(text.split())
    data = text.encode("ascii").translate(_ASCII_SPACES)
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.strip(b" ").decode("ascii")


_SPACE = re.compile(r"\s")
_ASCII_SPACES = bytes(32 if chr(i).isspace() else i for i in range(256))  # str.split's white space, to a space


def _message_key(message: ChatMessage) -> dict[str, Any]:
    key: dict[str, Any] = {"role": message.role, "text": _normalise_text(message.text())}
    images = [image.url for image in message.images()]
    if images:
        key["images"] = images
    if message.name:
        key["name"] = message.name
    if message.tool_calls:
        key["tool_calls"] = [[call.function.name, call.function.arguments] for call in message.tool_calls]
    if message.tool_call_id:
        key["tool_call_id"] = message.tool_call_id
    return key


def _route_key(request: ChatRequest, options: RouteOptions) -> dict[str, Any]:
    model = options.model or request.model
    if model:
        return {"model": model}
    return {
        "mode": options.mode,
        # streaming is how the answer travels, not what it says
        "require": sorted(options.require - {"streaming"}),
        "prefer": list(options.prefer),
        "exclude": list(options.exclude),
        "max_tier": options.max_tier,
        "max_cost_usd": options.max_cost_usd,
    }


def _params_key(request: ChatRequest) -> dict[str, Any]:
    extras = {name for name in (request.model_extra or {}) if name not in NEUTRAL_EXTRAS}
    if extras or request.tools is not None or request.tool_choice is not None or request.response_format is not None:
        return request.model_dump(include=ANSWER_PARAMS | extras, exclude_none=True, mode="json")
    # The usual request has plain values only: read as they are, they are what model_dump
    # gives (a test holds the two equal), at a fifth of its cost on every cached request.
    return {name: value for name in _PLAIN_PARAMS if (value := getattr(request, name)) is not None}


# For what orjson will not take (an int past 64 bits, a lone surrogate).
_KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _digest(data: Any) -> str:
    """sha256 of the data's canonical JSON: keys sorted, no spaces, UTF-8.

    orjson writes the same bytes as the standard library's encoder did (a test holds the two
    equal) at a sixth of the cost, except for floats under 1e-4 and non-finite ones: a key
    with those changed once, when P402 moved to orjson.
    """
    try:
        text = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        text = _KEY_JSON.encode(data).encode("utf-8", "surrogatepass")
    return hashlib.sha256(text).hexdigest()


def _keyed(request: ChatRequest, options: RouteOptions | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What every key is made of: the route and answer-changing params, and each message's key."""
    base = {"route": _route_key(request, options or RouteOptions()), "params": _params_key(request)}
    return base, [_message_key(m) for m in request.messages]


def exact_key(request: ChatRequest, options: RouteOptions | None = None) -> str:
    """`request_keys(...).exact` alone: the ledger's prompt key for a request the cache was not asked about."""
    base, messages = _keyed(request, options)
    return _digest({**base, "messages": messages})


def request_keys(request: ChatRequest, options: RouteOptions | None = None) -> RequestKeys:
    base, messages = _keyed(request, options)
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
    context = list(messages)
    prompt = ""
    if last_user is not None:
        prompt = messages[last_user]["text"]
        # The question's text is what the semantic tier compares; its images (if any) must match exactly.
        context[last_user] = {**messages[last_user], "text": None}
    return RequestKeys(
        exact=_digest({**base, "messages": messages}),
        scope=_digest({**base, "context": context}),
        prompt=prompt,
    )


# --- the near-miss guard --------------------------------------------------------------

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"\w+")


# Words whose presence turns a question around; an inserted one is never a paraphrase.
_NEGATIONS = frozenset({"not", "no", "never", "without", "cannot", "t"})  # "t": what is left of "don't"
# Opposites that embeddings rate as near-synonyms (both sides of a pair are "the same topic").
_OPPOSITES = {
    frozenset(pair)
    for pair in (
        ("up", "down"), ("in", "out"), ("on", "off"), ("first", "last"), ("good", "bad"), ("better", "worse"),
        ("best", "worst"), ("before", "after"), ("above", "below"), ("over", "under"), ("high", "low"),
        ("higher", "lower"), ("increase", "decrease"), ("raise", "lower"), ("enable", "disable"), ("open", "close"),
        ("start", "stop"), ("add", "remove"), ("push", "pull"), ("import", "export"), ("read", "write"),
        ("encode", "decode"), ("encrypt", "decrypt"), ("min", "max"), ("minimum", "maximum"), ("more", "less"),
        ("most", "least"), ("largest", "smallest"), ("biggest", "smallest"), ("hottest", "coldest"),
        ("fastest", "slowest"), ("faster", "slower"), ("fast", "slow"), ("hot", "cold"), ("north", "south"),
        ("east", "west"), ("left", "right"), ("true", "false"), ("yes", "no"), ("pros", "cons"),
        ("advantages", "disadvantages"), ("benefits", "risks"), ("safe", "dangerous"), ("like", "dislike"),
        ("love", "hate"), ("buy", "sell"), ("win", "lose"), ("send", "receive"), ("upload", "download"),
        ("install", "uninstall"), ("ascending", "descending"), ("early", "late"), ("old", "new"), ("young", "old"),
        ("male", "female"), ("light", "dark"), ("gain", "lose"), ("plus", "minus"), ("lock", "unlock"),
        ("mount", "unmount"), ("zip", "unzip"), ("follow", "unfollow"), ("subscribe", "unsubscribe"),
    )
}
_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "de")


def _opposed(a: str, b: str) -> bool:
    if frozenset((a, b)) in _OPPOSITES:
        return True
    short, long = sorted((a, b), key=len)
    return any(long == prefix + short for prefix in _PREFIXES)


def near_miss(query: str, cached: str, similarity: float) -> str | None:
    """Why a semantic match must not be served, or None.

    Embeddings rate prompts that share most words as close even when the one
    word that differs changes the answer. Cheap checks catch the common cases:
    - the numbers must be the same ("17 times 23" is not "17 times 24");
    - the same words in another order ask another thing ("list to a string" /
      "string to a list", "Is Linux better than Windows" / "... Windows ... Linux");
    - when the prompts are word for word the same except one short span (a
      "minimal pair"), that span is the whole question: an inserted negation
      ("safe" / "not safe"), a word and its opposite ("up" / "down", "safe" /
      "unsafe") never match, and any other swapped word ("by value" / "by key")
      needs cosine >= 0.95, which synonyms ("fastest" / "quickest") reach and
      different things mostly do not.
    """
    if _NUMBER.findall(query) != _NUMBER.findall(cached):
        return "the numbers differ"
    a = _WORD.findall(query.lower())
    b = _WORD.findall(cached.lower())
    if a != b and sorted(a) == sorted(b):
        return "the same words in another order"
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    span_a, span_b = a[prefix : len(a) - suffix], b[prefix : len(b) - suffix]
    if len(span_a) <= MINIMAL_PAIR_SPAN and len(span_b) <= MINIMAL_PAIR_SPAN:
        if _NEGATIONS.intersection(span_a) != _NEGATIONS.intersection(span_b):
            return "one is negated"
        if any(_opposed(x, y) for x in span_a for y in span_b):
            return f"opposites ({' '.join(span_a)!r} vs {' '.join(span_b)!r})"
        if span_a and span_b and similarity < MINIMAL_PAIR_MIN_SIMILARITY:
            return f"one part differs ({' '.join(span_a)!r} vs {' '.join(span_b)!r})"
    return None


# --- stored answers ------------------------------------------------------------------------


def encode_response(response: ChatResponse) -> str:
    data = {
        "provider": response.provider,
        "model": response.model,
        "content": response.content,
        "reasoning": response.reasoning,
        "tool_calls": response.tool_calls,
        "finish_reason": response.finish_reason,
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
            "cached_tokens": response.usage.cached_tokens,
            "reasoning_tokens": response.usage.reasoning_tokens,
            "cache_write_tokens": response.usage.cache_write_tokens,
        },
        "extra": response.extra,
    }
    try:  # every miss is encoded on the loop: orjson at a fifth of the standard library's cost
        return orjson.dumps(data).decode()
    except TypeError:  # what orjson will not take (an int past 64 bits, a lone surrogate)
        return json.dumps(data)


def decode_response(text: str) -> ChatResponse:
    """A fresh response (new id, created now) carrying the stored answer."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:  # a lone surrogate, written by the standard library's encoder
        data = json.loads(text)
    return ChatResponse(
        provider=data["provider"],
        model=data["model"],
        content=data.get("content"),
        reasoning=data.get("reasoning"),
        tool_calls=data.get("tool_calls"),
        finish_reason=data.get("finish_reason") or "stop",
        usage=Usage(**data.get("usage", {})),
        extra=data.get("extra"),
    )


# --- the cache --------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Entry:
    namespace: str
    exact_key: str
    scope_key: str
    prompt: str
    model: str | None
    cost_usd: float
    created: float
    last_hit: float
    hits: int = 0
    payload: str | None = None  # the encoded answer, kept in memory only until its row is committed
    index: VectorIndex | None = None
    row: int = -1


def _block(size: int) -> int:
    """The memory an object of `size` bytes takes: Python's allocator hands out multiples of 16 bytes up to
    512, and C's malloc a multiple of 16 with an 8-byte header past that (an entry's strings and numbers
    took 720 bytes where their sizes summed to 661)."""
    return (size + 15) & ~15 if size <= 512 else (size + 23) & ~15


_FLOAT = _block(sys.getsizeof(0.0))
# Each entry's numbers: its cost and created floats and its row (an int past the small ones Python
# shares); and the (namespace, exact key) tuple that keys it in the LRU table. Its last_hit is the
# created float itself until its first hit.
_ENTRY_EXTRAS = 2 * _FLOAT + _block(sys.getsizeof(1000)) + _block(sys.getsizeof(("", "")))


def entry_bytes(entry: Entry) -> int:
    """What one entry holds in memory besides its index row and its LRU slot: the object, its strings
    (the encoded answer until its row is committed) and numbers, and its key. Its namespace is shared."""
    size = sys.getsizeof
    total = _block(size(entry)) + _block(size(entry.exact_key)) + _block(size(entry.scope_key)) + _block(size(entry.prompt))
    total += _ENTRY_EXTRAS if entry.last_hit is entry.created else _ENTRY_EXTRAS + _FLOAT
    if entry.model is not None:
        total += _block(size(entry.model))
    if entry.payload is not None:
        total += _block(size(entry.payload))
    return total


def _held_by(entries: OrderedDict[tuple[str, str], Entry]) -> int:
    return sum(map(entry_bytes, entries.values()))


@dataclass(slots=True)
class _Probe:
    """What a missed lookup learnt, so the insert after the upstream call need not hash or embed again."""

    namespace: str
    keys: RequestKeys
    vector: np.ndarray | None
    code: np.ndarray | None  # the vector's sign code, when the worker made it
    bucket: tuple[np.ndarray, int] | None  # its closest bucket, and the centres that was measured against
    head: tuple[np.ndarray, np.ndarray] | None  # the basis it was projected on, and its projection
    embedder: str | None


@dataclass(slots=True, eq=False)
class _Ask:
    """A lookup waiting for the next batch on the worker pool."""

    embedder: LocalEmbedder
    prompt: str
    index: VectorIndex | None
    threshold: float
    future: asyncio.Future[_Found]


# A lookup's vector, its sign code, the rows close to it, its closest bucket with the centres it is one of,
# and its projection with the basis it was taken on.
_Found = tuple[
    np.ndarray, np.ndarray | None, list[tuple[int, float]], tuple[np.ndarray, int] | None,
    tuple[np.ndarray, np.ndarray] | None,
]


@dataclass(slots=True)
class CacheStats:
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    refused: int = 0  # semantic matches the near-miss guard turned down
    saved_usd: float = 0.0
    inserts: int = 0
    evictions: int = 0
    expired: int = 0
    embed_errors: int = 0
    semantic_lookups: int = 0  # lookups that reached the semantic tier (embedded their prompt)
    semantic_cpu_s: float = 0.0  # worker-thread CPU of those: embedding, search, confirmation
    confirmations: int = 0  # lookups whose candidates the confirmer had to judge
    semantic_batches: int = 0  # worker jobs those lookups went in (lookups that queue together share one)

    @property
    def hits(self) -> int:
        return self.exact_hits + self.semantic_hits

    def to_dict(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            "hits": self.hits,
            "exact_hits": self.exact_hits,
            "semantic_hits": self.semantic_hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "exact_hit_rate": self.exact_hits / lookups if lookups else 0.0,
            "semantic_hit_rate": self.semantic_hits / lookups if lookups else 0.0,
            "semantic_lookups": self.semantic_lookups,
            "semantic_batches": self.semantic_batches,
            "semantic_cpu_ms_per_lookup": (
                self.semantic_cpu_s * 1000 / self.semantic_lookups if self.semantic_lookups else 0.0
            ),
            "confirmations": self.confirmations,
            "saved_usd": self.saved_usd,
            "refused_near_misses": self.refused,
            "inserts": self.inserts,
            "evictions": self.evictions,
            "expired": self.expired,
            "embed_errors": self.embed_errors,
        }


_INSERT = (
    "INSERT INTO semantic_cache (namespace, exact_key, scope_key, prompt, model, response, cost_usd, "
    "created, last_hit, hits, embedder, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (namespace, exact_key) DO UPDATE SET scope_key = excluded.scope_key, prompt = excluded.prompt, "
    "model = excluded.model, response = excluded.response, cost_usd = excluded.cost_usd, created = excluded.created, "
    "last_hit = excluded.last_hit, hits = excluded.hits, embedder = excluded.embedder, embedding = excluded.embedding"
)
_TOUCH = "UPDATE semantic_cache SET hits = hits + 1, last_hit = ? WHERE namespace = ? AND exact_key = ?"
_DELETE = "DELETE FROM semantic_cache WHERE namespace = ? AND exact_key = ? AND created <= ?"

EmbedderLoader = Callable[[], EmbedderPlan]
# Embedding and searching run here, never on the event loop, at most this many at once:
# on a small machine more threads only queue for the same cores (and each keeps a malloc arena).
EMBED_WORKERS = 2
# Under load, lookups that arrive while a batch is on the pool wait this long for more to join them before
# they go as the next batch. A batch's search reads the whole index (or its projections) once, whatever
# its size: about a millisecond of CPU at 10,000 entries, so 13 lookups a batch cost 0.09 ms each and 64
# cost 0.05. Only after a batch of at least GATHER_AFTER lookups (a busy gateway, whose requests already
# queue for tens of milliseconds) and only while fewer than GATHER_UP_TO wait: a quiet gateway never waits.
GATHER_S = 0.008
GATHER_AFTER = 8
GATHER_UP_TO = 48


def _search_batch(embedder: LocalEmbedder, jobs: list[tuple[str, Snapshot | None, float]]) -> tuple[
    np.ndarray, list[np.ndarray | None], list[list[tuple[int, float]]], list[tuple[np.ndarray, int] | None],
    list[tuple[np.ndarray, np.ndarray] | None],
]:
    """Each prompt's vector, sign code (for an index that keeps codes), close rows, closest bucket (with the
    centres it is one of) and projection (with its basis): one worker job for a batch of lookups. Lookups of
    one scope are searched together; what a miss's insert needs is computed here, once, not again on the loop."""
    prompts = [prompt for prompt, _, _ in jobs]
    vectors = embedder.encode(prompts)
    codes: list[np.ndarray | None] = [None] * len(jobs)
    found: list[list[tuple[int, float]]] = [[] for _ in jobs]
    nearest: list[tuple[np.ndarray, int] | None] = [None] * len(jobs)
    projected: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(jobs)
    groups: dict[tuple[int, float], list[int]] = {}
    for i, (_, snapshot, threshold) in enumerate(jobs):
        if snapshot is not None:
            groups.setdefault((id(snapshot), threshold), []).append(i)
    for (_, threshold), members in groups.items():
        snapshot = jobs[members[0]][1]
        assert snapshot is not None
        heads = None if snapshot.basis is None else project(snapshot.basis, vectors[members])
        coded = None if snapshot.codes is None else sign_codes(vectors[members])
        results, buckets = search_many(snapshot, vectors[members], threshold, coded, heads=heads)
        for j, i in enumerate(members):
            found[i] = results[j]
            if coded is not None:
                codes[i] = coded[j]
            if buckets is not None and snapshot.buckets is not None:
                nearest[i] = (snapshot.buckets.centres, int(buckets[j]))
            if heads is not None and snapshot.basis is not None:
                projected[i] = (snapshot.basis, heads[j])
    if any(len(prompt) > MAX_CHARS for prompt in prompts):
        release_memory()
    return vectors, codes, found, nearest, projected


def _timed(work: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.thread_time()
    result = work(*args)
    return result, time.thread_time() - started


class _Builder:
    """The thread distilling the static table, and how to stop it (at close, or at exit)."""

    running: set[_Builder] = set()

    def __init__(self, thread: threading.Thread, stop_event: threading.Event) -> None:
        self.thread, self.stop_event = thread, stop_event
        _Builder.running.add(self)

    def stop(self, timeout: float = 12.0) -> None:  # past the child's own CHILD_STOP_S
        self.stop_event.set()
        self.thread.join(timeout)
        _Builder.running.discard(self)


@atexit.register
def _stop_builders() -> None:
    for builder in list(_Builder.running):
        builder.stop()


class SemanticCache:
    def __init__(
        self,
        store: Store,
        *,
        embedder: Embedder | EmbedderLoader,
        confirmer: LocalEmbedder | Callable[[], LocalEmbedder] | None = None,
        enabled: bool = True,
        threshold: float = 0.84,
        candidate_threshold: float = 0.74,
        ttl_s: float = 7 * 24 * 3600,
        max_entries: int = 100_000,
    ) -> None:
        self.store = store
        self.enabled = enabled
        self.configured_threshold = threshold  # the confirmer's cosine, or the embedder's when there is none
        self.candidate_threshold = candidate_threshold  # the embedder's cosine for a candidate to confirm
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.stats = CacheStats()
        self.embedder: Embedder | None = embedder if isinstance(embedder, Embedder) else None
        self.confirmer: LocalEmbedder | None = confirmer if isinstance(confirmer, LocalEmbedder) else None
        self._confirmer_loader = None if isinstance(confirmer, LocalEmbedder) else confirmer
        self._confirmer_lock = threading.Lock()
        self._confirmer_failed: P402Error | None = None
        self.warning: str | None = None
        self.building = False  # the index embedder is being made in the background
        self._builder: _Builder | None = None
        self._loader = embedder
        self._pool = ThreadPoolExecutor(EMBED_WORKERS, thread_name_prefix="p402-embed", initializer=gil.background)
        # Confirmations on a thread of their own: one waits for MiniLM's child (~16 ms, one at a time on its pipe,
        # seconds while the child starts), and on the pool two of them had stopped every lookup's search meanwhile.
        self._confirms = ThreadPoolExecutor(1, thread_name_prefix="p402-confirm", initializer=gil.background)
        # The index's upkeep (buckets, projections, sign codes: up to a second at 100k rows, a few at each doubling)
        # on one more: on the pool, a training and a fit together had held a batch of lookups until both were done.
        self._upkeep = ThreadPoolExecutor(1, thread_name_prefix="p402-index", initializer=gil.background)
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()  # in LRU order, oldest first
        self._held = 0  # the entries' `entry_bytes`, kept as they come and go
        self._indexes: dict[tuple[str, str], VectorIndex] = {}
        self._probes: OrderedDict[str, _Probe] = OrderedDict()
        self._ready: asyncio.Task[None] | None = None
        # Told (namespace, exact key) once an entry made here is committed: the other gateways of a fleet `adopt` it.
        self.on_insert: Callable[[str, str], None] | None = None
        self._warmed: set[int] = set()  # vector sizes `_warm` has run for
        self._asks: list[_Ask] = []  # lookups waiting for the next batch
        self._in_flight: list[_Ask] = []  # the batch on the pool
        self._asking = False  # a batch is on the pool, or about to be sent
        self._gathering: asyncio.TimerHandle | None = None  # the next batch waits for company (GATHER_S)

    @classmethod
    def from_config(cls, store: Store, config: Any, *, adapter_for: Callable[[str], Any] | None = None) -> "SemanticCache":
        """A cache as `[cache]` in the config file describes it (`core.config.CacheConfig`)."""
        return cls(
            store,
            embedder=lambda: plan_embedders(config.embedder, model_dir=config.model_dir, adapter_for=adapter_for),
            enabled=config.enabled,
            threshold=config.threshold,
            candidate_threshold=config.candidate_threshold,
            ttl_s=config.ttl_s,
            max_entries=config.max_entries,
        )

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading the embedder and the stored entries in the background (nothing to load when disabled)."""
        if self._ready is None and self.enabled:
            self._ready = asyncio.get_running_loop().create_task(self._load(), name="p402-cache-load")

    async def ready(self) -> None:
        """Wait for `start()`'s loading; raises what it raised (a bad model folder, say)."""
        self.start()
        if self._ready is not None:
            await asyncio.shield(self._ready)

    async def aclose(self) -> None:
        if self._builder is not None:
            await asyncio.to_thread(self._builder.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._confirms.shutdown(wait=False, cancel_futures=True)
        self._upkeep.shutdown(wait=False, cancel_futures=True)
        if self._gathering is not None:
            self._gathering.cancel()
        for ask in [*self._in_flight, *self._asks]:  # a cancelled job would never answer them
            ask.future.cancel()
        close = getattr(self.confirmer, "close", None)
        if self._confirmer_loader is not None and close is not None:  # one the cache started: its child process ends
            await asyncio.to_thread(close)
        task = self._ready
        if task is None:
            return
        if not task.done():
            task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass  # a failed load was raised to every lookup that waited for it

    async def _load(self) -> None:
        if not isinstance(self._loader, Embedder):
            plan = await asyncio.to_thread(self._loader)
            self.embedder, self.warning = plan.embedder, plan.warning
            if plan.confirmer is not None and self.confirmer is None and self._confirmer_loader is None:
                self._confirmer_loader = plan.confirmer
            if self.warning:
                log.warning(self.warning)
            if plan.embedder is None and plan.build is not None:
                self._build_in_background(plan.build)
        now = time.time()
        self.store.put("DELETE FROM semantic_cache WHERE created < ?", (now - self.ttl_s,))
        rows = await self.store.rows(
            "SELECT namespace, exact_key, scope_key, prompt, model, cost_usd, created, last_hit, hits, embedder, "
            "embedding FROM semantic_cache WHERE created >= ?",
            (now - self.ttl_s,),
        )
        name = self.embedder.name if self.embedder is not None else None
        # Nothing can be inserted meanwhile: inserts follow lookups, and lookups wait for this.
        self._entries, self._indexes = await asyncio.to_thread(_build, rows, name)
        self._held = await asyncio.to_thread(_held_by, self._entries)
        self._evict_overflow()
        # The last step of a gateway's start-up: what it parsed and freed need not stay in its RSS.
        await asyncio.to_thread(release_free_memory)

    def _build_in_background(self, build: Callable[..., Embedder]) -> None:
        """Make the index embedder on a thread of its own; until it is done the semantic tier is skipped.

        Not the loop's executor: shutting down must not wait a minute and a half for a table
        the next start can finish. Closing (or the interpreter's exit) stops the build between
        two batches instead; a daemon thread still inside numpy when Python finalises can crash
        the process. Prompts cached meanwhile serve exact hits.
        """
        loop = asyncio.get_running_loop()
        self.building = True
        log.info("cache: distilling static vectors from MiniLM (once, about 1-2 minutes); semantic tier waits")

        def done(embedder: Embedder | None, error: BaseException | None) -> None:
            self.building = False
            if error is not None:
                self.warning = f"semantic tier off: the static vectors could not be made: {error}"
                log.warning(self.warning)
            else:
                self.embedder = embedder

        stop = threading.Event()

        def work() -> None:
            try:
                result, error = build(stop=stop), None
            except BuildStopped:  # closing, or the child was signalled: tried again at the next start
                result = None
                error = None if stop.is_set() else ConfigError(
                    "its process was stopped by a signal; it is made again at the next start")
            except Exception as exc:  # noqa: BLE001 - reported as the cache's warning
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop has closed: the table is on disk for the next start
                pass

        self._builder = _Builder(threading.Thread(target=work, name="p402-static-build", daemon=True), stop)
        self._builder.thread.start()

    # --- what the outside sees ------------------------------------------------------------

    @property
    def threshold(self) -> float:
        """The threshold in force: a lexical embedder is held to near-exact matches."""
        floor = self.embedder.min_threshold if self.embedder is not None else 0.0
        return max(self.configured_threshold, floor)

    def info(self) -> dict[str, Any]:
        """Which embedder is active and how the cache is set up (for the console and the API)."""
        confirming = self.confirmer is not None or self._confirmer_loader is not None
        return {
            "enabled": self.enabled,
            "embedder": self.embedder.info() if self.embedder is not None else None,
            "building": self.building,
            "confirmer": (self.confirmer.info() if self.confirmer is not None else {"loaded": False})
            if confirming
            else None,
            "loaded": self._ready is not None and self._ready.done(),
            "threshold": self.threshold,
            "candidate_threshold": self.candidate_threshold if confirming else None,
            "configured_threshold": self.configured_threshold,
            "ttl_s": self.ttl_s,
            "max_entries": self.max_entries,
            "entries": len(self._entries),
            "indexed": sum(len(index) for index in self._indexes.values()),
            "index_bytes": sum(index.nbytes for index in self._indexes.values()),
            "memory_bytes": self.memory_bytes(),
            "warning": self.warning,
        }

    def memory_bytes(self) -> int:
        """What the cache keeps in memory, as it counts it: its entries (`entry_bytes`), the LRU table,
        the vector indexes (their rows in use, row lists, and the hyperplanes of their sign codes, which the
        process's indexes share), the probes waiting for their answers, and what the embedder keeps of the
        prompts it has seen (the static stage's word memo)."""
        indexes = sum(index.memory_bytes for index in self._indexes.values()) + planes_bytes()
        probes = sys.getsizeof(self._probes) + sum(_probe_bytes(rid, p) for rid, p in self._probes.items())
        embedder = self.embedder.memory_bytes if self.embedder is not None else 0
        return self._held + sys.getsizeof(self._entries) + indexes + probes + embedder

    def snapshot(self) -> dict[str, Any]:
        return {**self.info(), **self.stats.to_dict()}

    # --- lookup and insert ----------------------------------------------------------------

    async def lookup(
        self, request: ChatRequest, options: RouteOptions | None, namespace: str, *, request_id: str
    ) -> CachedAnswer | None:
        """A stored answer for this request in this namespace, or None (and remember the probe for `insert`)."""
        if not self.enabled:
            return None
        loading = self._ready
        if loading is None or not loading.done():
            await self.ready()
        else:
            loading.result()  # raises what the load raised, as ready() does
        large = request.prompt_chars() > PIECE_CHARS  # keyed on the pool: megabytes hold the loop for tens of ms
        keys = await off_loop(request_keys, request, options) if large else request_keys(request, options)
        now = time.time()
        entry = self._entries.get((namespace, keys.exact))
        if entry is not None:
            if self._expired(entry, now):
                self._evict(entry, expired=True)
            else:
                answer = await self._serve(entry, EXACT, 1.0, now)
                if answer is not None:
                    return answer
        vector = code = bucket = head = None
        embedder = self.embedder
        if keys.prompt and embedder is not None:
            index = self._indexes.get((namespace, keys.scope))
            found: list[tuple[int, float]] = []
            try:
                vector, code, found, bucket, head = await self._embed_and_search(embedder, keys.prompt, index)
            except P402Error as error:  # a provider embedder that failed: the exact tier still works
                self.stats.embed_errors += 1
                log.warning("cache: embedding failed, semantic tier skipped: %s", error)
            if found and index is not None:
                answer = await self._semantic(keys, index, found, vector, now)
                if answer is not None:
                    return answer
        self._remember(request_id, _Probe(namespace, keys, vector, code, bucket, head, embedder.name if embedder else None))
        self.stats.misses += 1
        return None

    @property
    def _confirming(self) -> bool:
        return self.confirmer is not None or self._confirmer_loader is not None

    async def _embed_and_search(self, embedder: Embedder, prompt: str, index: VectorIndex | None) -> _Found:
        """The prompt's vector, its sign code (None from a provider) and the index rows close to it, computed
        on the cache's worker pool."""
        if index is not None and (not len(index) or index.dim != embedder.dim):
            index = None
        threshold = self.candidate_threshold if self._confirming else self.threshold
        if not isinstance(embedder, LocalEmbedder):  # a provider's endpoint: the wait is the network's
            vector = (await embedder.embed([prompt]))[0]
            if index is None:
                return vector, None, [], None, None
            snapshot = index.snapshot()
            found = await asyncio.get_running_loop().run_in_executor(self._pool, search, snapshot, vector, threshold)
            return vector, None, found, None, None
        # Every lookup that arrives while a batch is on the pool goes in the next batch: one hand-off
        # to a worker and one wake-up of the loop per batch, not per request.
        future: asyncio.Future[_Found] = asyncio.get_running_loop().create_future()
        self._asks.append(_Ask(embedder, prompt, index, threshold, future))
        if not self._asking:
            self._asking = True
            asyncio.get_running_loop().call_soon(self._send_asks)
        elif self._gathering is not None and len(self._asks) >= GATHER_UP_TO:
            self._gathering.cancel()
            self._send_asks()
        return await future

    def _send_asks(self) -> None:
        """Put the waiting lookups (those of one embedder) on the pool as one job."""
        self._gathering = None
        if not self._asks:
            self._asking = False
            return
        embedder = self._asks[0].embedder
        batch = [ask for ask in self._asks if ask.embedder is embedder]
        self._asks = [ask for ask in self._asks if ask.embedder is not embedder]
        # Snapshots taken now, not when each lookup asked: rows inserted meanwhile are searched too.
        snapshots: dict[int, Snapshot] = {}
        for ask in batch:
            if ask.index is not None and id(ask.index) not in snapshots:
                snapshots[id(ask.index)] = ask.index.snapshot()
                if ask.index.wants_training():
                    self._train(ask.index)
                if ask.index.wants_projection():
                    self._fit(ask.index, ask.threshold)
                if ask.index.wants_coding():
                    self._code(ask.index)
                if len(ask.index) >= PROJECT_FROM_ROWS and ask.index.dim not in self._warmed:
                    self._warm(ask.index.dim)
        jobs = [(ask.prompt, snapshots[id(ask.index)] if ask.index is not None else None, ask.threshold) for ask in batch]
        loop = asyncio.get_running_loop()

        def work() -> None:
            try:
                result: Any = _timed(_search_batch, embedder, jobs)
            except BaseException as error:  # noqa: BLE001 - handed to every lookup of the batch
                result = error
            try:
                loop.call_soon_threadsafe(self._asks_done, batch, result)
            except RuntimeError:  # the loop has closed
                pass

        self._in_flight = batch
        try:
            self._pool.submit(work)
        except RuntimeError as error:  # the pool has shut down: the cache is closing
            self._asks_done(batch, error)

    def _train(self, index: VectorIndex) -> None:
        """Split a grown index into buckets on the pool; the loop takes them (and mends rows moved meanwhile)."""
        loop = asyncio.get_running_loop()
        vectors = index.start_training()

        def work() -> None:
            try:
                trained: Trained | None = train_buckets(vectors)
            except Exception:  # noqa: BLE001 - the index keeps searching as it did
                log.exception("cache: training the index's buckets failed")
                trained = None
            try:
                loop.call_soon_threadsafe(installed, trained)
            except RuntimeError:  # the loop has closed
                pass

        def installed(trained: Trained | None) -> None:
            if trained is None:
                index.training = False
            else:
                index.install(trained)

        try:
            self._upkeep.submit(work)
        except RuntimeError:  # the pool has shut down
            index.training = False

    def _code(self, index: VectorIndex) -> None:
        """Make the sign codes of an index that has grown to need them on the pool; the loop installs them."""
        loop = asyncio.get_running_loop()
        vectors = index.start_coding()

        def work() -> None:
            try:
                codes: np.ndarray | None = sign_codes(vectors)
            except Exception:  # the index keeps scoring rows exactly
                log.exception("cache: making the index's sign codes failed")
                codes = None
            try:
                loop.call_soon_threadsafe(index.install_codes, codes)
            except RuntimeError:  # the loop has closed
                pass

        try:
            self._upkeep.submit(work)
        except RuntimeError:  # the pool has shut down
            index.coding = False

    def _warm(self, dim: int) -> None:
        """Once an index of this vector size is in use (`PROJECT_FROM_ROWS` rows, when it is first fitted),
        run on the pool what it will need when large (`index.warm`), so that RSS grows with the cache's
        entries alone. Not at start: numpy's random module alone, imported there, is 7 MB of an idle RSS."""
        self._warmed.add(dim)

        def work() -> None:
            try:
                warm(dim)
            except Exception:  # noqa: BLE001 - the index works without it
                log.exception("cache: warming the index's large-index paths failed")

        try:
            self._upkeep.submit(work)
        except RuntimeError:  # the pool has shut down
            pass

    def _fit(self, index: VectorIndex, threshold: float) -> None:
        """Fit the index's projection basis on the pool; the loop installs it (and projects rows moved meanwhile)."""
        loop = asyncio.get_running_loop()
        vectors = index.start_projection()

        def work() -> None:
            failed = False
            try:
                fitted = fit_projection(vectors, threshold)
            except Exception:  # noqa: BLE001 - the index keeps scanning as it did
                log.exception("cache: fitting the index's projection failed")
                fitted, failed = None, True
            try:
                loop.call_soon_threadsafe(installed, fitted, failed)
            except RuntimeError:  # the loop has closed
                pass

        def installed(fitted: tuple[np.ndarray, np.ndarray] | None, failed: bool) -> None:
            if failed:
                index.fitting = False
            elif fitted is None:
                index.install_projection(None)  # not worth it for these rows: asked again when the index doubles
            else:
                index.install_projection(*fitted)

        try:
            self._upkeep.submit(work)
        except RuntimeError:  # the pool has shut down
            index.fitting = False

    def _asks_done(self, batch: list[_Ask], result: Any) -> None:
        self._in_flight = []
        if isinstance(result, BaseException):
            for ask in batch:
                if not ask.future.done():
                    ask.future.set_exception(result)
        else:
            (vectors, codes, found, nearest, projected), cpu = result
            self.stats.semantic_lookups += len(batch)
            self.stats.semantic_batches += 1
            self.stats.semantic_cpu_s += cpu
            for i, ask in enumerate(batch):
                if not ask.future.done():
                    ask.future.set_result((vectors[i], codes[i], found[i], nearest[i], projected[i]))
        if len(batch) >= GATHER_AFTER and 0 < len(self._asks) < GATHER_UP_TO:
            self._gathering = asyncio.get_running_loop().call_later(GATHER_S, self._send_asks)
        else:
            self._send_asks()

    async def _semantic(
        self, keys: RequestKeys, index: VectorIndex, found: list[tuple[int, float]], vector: np.ndarray, now: float
    ) -> CachedAnswer | None:
        candidates: list[tuple[Entry, float]] = []
        floor = self.candidate_threshold if self._confirming else self.threshold
        for row, _ in found:
            if row >= len(index):
                continue
            entry = index.owners[row]
            # The loop may have moved rows while the thread searched: score the entry where it is now.
            similarity = index.score(entry.row, vector) if entry.index is index else -1.0
            if similarity < floor:
                continue
            if self._expired(entry, now):
                self._evict(entry, expired=True)
                continue
            # The checks that do not depend on the cosine, before paying for a confirmation.
            if near_miss(keys.prompt, entry.prompt, 1.0) is not None:
                self.stats.refused += 1
                continue
            candidates.append((entry, similarity))
        if candidates and self._confirming:
            # Only the static stage's best: on the tune split, confirming the top 4 found no more
            # paraphrases (0.793 vs 0.784 recall) and served the project's pairs one wrong answer,
            # and MiniLM's cost grows with every text it reads.
            try:
                candidates = await self._confirm(keys.prompt, [candidates[0][0]])
            except P402Error as error:  # MiniLM would not load: answer upstream, say why once
                self.stats.embed_errors += 1
                if self.warning is None:
                    self.warning = f"semantic hits off: the confirmer did not load: {error}"
                    log.warning(self.warning)
                return None
        for entry, similarity in candidates:
            if similarity < self.threshold:
                continue
            if near_miss(keys.prompt, entry.prompt, similarity) is not None:
                self.stats.refused += 1
                continue
            answer = await self._serve(entry, SEMANTIC, similarity, now)
            if answer is not None:
                return answer
        return None

    async def _confirm(self, prompt: str, entries: list[Entry]) -> list[tuple[Entry, float]]:
        """The candidates with the confirmer's cosine, best first (MiniLM loads here the first time)."""
        texts = [prompt, *(entry.prompt for entry in entries)]

        def work() -> np.ndarray:
            vectors = self._confirmer_now().encode(texts)
            return vectors[1:] @ vectors[0]

        scores, cpu = await asyncio.get_running_loop().run_in_executor(self._confirms, _timed, work)
        self.stats.confirmations += 1
        self.stats.semantic_cpu_s += cpu
        return sorted(zip(entries, map(float, scores)), key=lambda pair: -pair[1])

    def _confirmer_now(self) -> LocalEmbedder:
        """The confirmer, loaded by the first worker that needs it (sync: runs on the pool)."""
        with self._confirmer_lock:
            if self.confirmer is None:
                assert self._confirmer_loader is not None
                if self._confirmer_failed is not None:  # tried once: not again at every candidate
                    raise self._confirmer_failed
                try:
                    self.confirmer = self._confirmer_loader()
                except P402Error as error:
                    self._confirmer_failed = error
                    raise
            return self.confirmer

    async def _serve(self, entry: Entry, match: str, similarity: float, now: float) -> CachedAnswer | None:
        payload = entry.payload
        if payload is None:
            row = await self.store.fetchone(
                "SELECT response FROM semantic_cache WHERE namespace = ? AND exact_key = ?",
                (entry.namespace, entry.exact_key),
            )
            if row is None:  # another process evicted it
                self._drop(entry)
                return None
            payload = row["response"]
        entry.hits += 1
        key = (entry.namespace, entry.exact_key)
        held = key in self._entries
        if held and entry.last_hit is entry.created:  # a float of its own from now on (`entry_bytes`)
            self._held += _FLOAT
        entry.last_hit = now
        if held:
            self._entries.move_to_end(key)
        self.store.put(_TOUCH, (now, entry.namespace, entry.exact_key))
        if match == EXACT:
            self.stats.exact_hits += 1
        else:
            self.stats.semantic_hits += 1
        self.stats.saved_usd += entry.cost_usd
        return CachedAnswer(response=decode_response(payload), match=match, similarity=similarity, saved_usd=entry.cost_usd)

    def insert(self, request_id: str, response: ChatResponse, cost_usd: float) -> bool:
        """Keep an upstream answer for the request a `lookup` missed. Never waits: the row is queued."""
        probe = self._probes.pop(request_id, None)
        if probe is None or not self.enabled:
            return False
        if response.content is None and not response.tool_calls:
            return False
        now = time.time()
        key = (probe.namespace, probe.keys.exact)
        old = self._entries.get(key)
        if old is not None:
            self._drop(old)
        entry = Entry(
            namespace=probe.namespace,
            exact_key=probe.keys.exact,
            scope_key=probe.keys.scope,
            prompt=probe.keys.prompt,
            model=f"{response.provider}/{response.model}",
            cost_usd=cost_usd,
            created=now,
            last_hit=now,
            payload=encode_response(response),
        )
        self._entries[key] = entry
        self._held += entry_bytes(entry)
        vector = probe.vector
        current = self.embedder.name if self.embedder is not None else None
        if vector is not None and probe.embedder == current:
            index = self._indexes.get((probe.namespace, probe.keys.scope))
            if index is None:
                index = self._indexes[(probe.namespace, probe.keys.scope)] = VectorIndex(vector.shape[0])
            if index.dim == vector.shape[0]:
                entry.index = index
                bucket = head = None
                if probe.bucket is not None and index.buckets is not None and probe.bucket[0] is index.buckets.centres:
                    bucket = probe.bucket[1]
                if probe.head is not None and probe.head[0] is index.basis:
                    head = probe.head[1]
                entry.row = index.add(vector, entry, code=probe.code, bucket=bucket, head=head)

        def committed() -> None:
            if self._entries.get(key) is entry and entry.payload is not None:
                self._held -= _block(sys.getsizeof(entry.payload))
            entry.payload = None
            if self.on_insert is not None and self._entries.get(key) is entry:
                self.on_insert(entry.namespace, entry.exact_key)

        self.store.put(
            _INSERT,
            (entry.namespace, entry.exact_key, entry.scope_key, entry.prompt, entry.model, entry.payload,
             entry.cost_usd, now, now, 0, probe.embedder if vector is not None else None,
             np.asarray(vector, np.float32).tobytes() if vector is not None else None),
            done=committed,
        )  # fmt: skip
        self.stats.inserts += 1
        self._evict_overflow()
        return True

    async def adopt(self, namespace: str, exact_key: str) -> bool:
        """An entry another process cached: read from the store, vector and all, into this process's tiers."""
        if not self.enabled:
            return False
        await self.ready()
        row = await self.store.fetchone(
            "SELECT namespace, exact_key, scope_key, prompt, model, cost_usd, created, last_hit, hits, embedder, "
            "embedding FROM semantic_cache WHERE namespace = ? AND exact_key = ?",
            (namespace, exact_key),
        )
        if row is None:
            return False
        key = (namespace, exact_key)
        old = self._entries.get(key)
        if old is not None:
            self._drop(old)
        entry = Entry(
            namespace=namespace, exact_key=exact_key, scope_key=row["scope_key"], prompt=row["prompt"],
            model=row["model"], cost_usd=row["cost_usd"], created=row["created"], last_hit=row["last_hit"],
            hits=row["hits"],
        )  # fmt: skip
        self._entries[key] = entry
        self._held += entry_bytes(entry)
        current = self.embedder.name if self.embedder is not None else None
        if row["embedding"] and row["embedder"] == current:
            vector = np.frombuffer(row["embedding"], dtype=np.float32)
            index = self._indexes.get((namespace, entry.scope_key))
            if index is None:
                index = self._indexes[(namespace, entry.scope_key)] = VectorIndex(vector.shape[0])
            if index.dim == vector.shape[0]:
                entry.index = index
                entry.row = index.add(vector, entry)
        self._evict_overflow()
        return True

    def probed_keys(self, request_id: str) -> RequestKeys | None:
        """The keys a missed `lookup` computed for this request (so the ledger need not compute them again)."""
        probe = self._probes.get(request_id)
        return None if probe is None else probe.keys

    def forget(self, request_id: str) -> None:
        """Drop a probe whose request will not be inserted (it failed, or opted out)."""
        self._probes.pop(request_id, None)

    async def clear(self, namespace: str | None = None) -> int:
        """Delete every entry (of one namespace); returns how many rows went."""
        if self._ready is not None:
            await self.ready()  # a load in progress would bring the entries back
        for entry in [e for e in self._entries.values() if namespace is None or e.namespace == namespace]:
            self._drop(entry)
        if namespace is None:
            return await self.store.run("DELETE FROM semantic_cache")
        return await self.store.run("DELETE FROM semantic_cache WHERE namespace = ?", (namespace,))

    # --- housekeeping ------------------------------------------------------------------------

    def _remember(self, request_id: str, probe: _Probe) -> None:
        self._probes[request_id] = probe
        while len(self._probes) > MAX_PROBES:  # requests that never completed must not pile up
            self._probes.popitem(last=False)

    def _expired(self, entry: Entry, now: float) -> bool:
        return now - entry.created > self.ttl_s

    def _evict_overflow(self) -> None:
        now = time.time()
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries.values()))
            self._evict(oldest, expired=self._expired(oldest, now))

    def _evict(self, entry: Entry, *, expired: bool) -> None:
        self._drop(entry)
        self.store.put(_DELETE, (entry.namespace, entry.exact_key, entry.created))
        if expired:
            self.stats.expired += 1
        else:
            self.stats.evictions += 1

    def _drop(self, entry: Entry) -> None:
        """Forget an entry in memory (the database is the caller's business)."""
        key = (entry.namespace, entry.exact_key)
        if self._entries.get(key) is entry:
            del self._entries[key]
            self._held -= entry_bytes(entry)
        if entry.index is not None:
            _unindex(entry, self._indexes)


def _probe_bytes(request_id: str, probe: _Probe) -> int:
    size = sys.getsizeof
    keys = probe.keys
    total = size(request_id) + size(probe) + size(keys) + size(keys.exact) + size(keys.scope) + size(keys.prompt)
    for array in (probe.vector, probe.code, *(probe.head or ())):
        if array is not None:
            total += size(array)
    return total


def _unindex(entry: Entry, indexes: dict[tuple[str, str], VectorIndex]) -> None:
    index = entry.index
    assert index is not None
    moved = index.remove(entry.row)
    if moved is not None:
        moved.row = entry.row
    if not len(index):
        indexes.pop((entry.namespace, entry.scope_key), None)
    entry.index = None
    entry.row = -1


def _build(rows: list[Any], embedder: str) -> tuple[OrderedDict[tuple[str, str], Entry], dict[tuple[str, str], VectorIndex]]:
    """Entries (least recently used first) and per-scope indexes from stored rows. CPU work: runs in a thread."""
    entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
    grouped: dict[tuple[str, str], tuple[list[bytes], list[Entry]]] = {}
    # Sorted here, not by SQL: SQLite would drag every embedding through its sorter.
    for row in sorted(rows, key=lambda r: r["last_hit"]):
        entry = Entry(
            namespace=row["namespace"],
            exact_key=row["exact_key"],
            scope_key=row["scope_key"],
            prompt=row["prompt"],
            model=row["model"],
            cost_usd=row["cost_usd"],
            created=row["created"],
            last_hit=row["last_hit"],
            hits=row["hits"],
        )
        entries[(entry.namespace, entry.exact_key)] = entry
        # Vectors of another embedder mean nothing to this one; those rows still serve exact hits.
        if row["embedder"] == embedder and row["embedding"]:
            blobs, owners = grouped.setdefault((entry.namespace, entry.scope_key), ([], []))
            blobs.append(row["embedding"])
            owners.append(entry)
    indexes: dict[tuple[str, str], VectorIndex] = {}
    for key, (blobs, owners) in grouped.items():
        dim = len(blobs[0]) // 4
        keep = [i for i, blob in enumerate(blobs) if len(blob) == dim * 4]
        matrix = np.frombuffer(b"".join(blobs[i] for i in keep), dtype=np.float32).reshape(len(keep), dim)
        index = VectorIndex(dim, capacity=max(16, len(keep)))
        index.extend(matrix, [owners[i] for i in keep])
        for row_number, entry in enumerate(index.owners):
            entry.index = index
            entry.row = row_number
        indexes[key] = index
    return entries, indexes
