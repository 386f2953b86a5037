"""The simulator's core: deterministic answers, latency profiles, faults and stats.

Each wire family module (`sim/openai_family.py`, `sim/anthropic.py`,
`sim/gemini.py`, `sim/cohere.py`) turns what this engine produces into its
provider's exact wire format. The engine knows nothing of wire formats.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..core.catalog import Catalog, ModelSpec, unlisted_model
from ..core.tokens import count_text

FaultKind = Literal["error", "rate_limit", "timeout", "disconnect", "malformed"]
Piece = TypeVar("Piece")

# Keys that stand for ones a provider does not know (revoked, mistyped): they begin with "invalid",
# bare or after OpenAI's "sk-". Every family refuses them, and blank keys, in its provider's words.
REJECTED_KEY_PREFIXES = ("invalid", "sk-invalid")
# Counting the tokens of a longer prompt takes real CPU time, so families count it off the event loop.
LARGE_PROMPT_CHARS = 50_000
# Pieces sent per write when latency is off: as fast as a real server flushing its buffer.
UNPACED_BATCH = 64
# Streamed JSON (tool-call arguments, JSON-mode answers) goes out in fragments this long, as real streams send it.
JSON_PIECE_CHARS = 12


# A model id holding this is one the simulated provider serves though the catalog does not list it
# (released after the catalog was checked): how tests reach a model beyond the catalog.
HELD_OUT = "heldout"


def key_is_known(key: str) -> bool:
    """Whether a simulated provider accepts this API key: any that is not blank or rejected."""
    return bool(key.strip()) and not key.startswith(REJECTED_KEY_PREFIXES)


class Fault(BaseModel):
    """A rehearsed outage: `POST /_sim/faults` takes this body."""

    model_config = ConfigDict(extra="forbid")

    provider: str = "*"  # a provider id, or * for every provider
    model: str | None = None  # a wire model id, or None for every model
    kind: FaultKind
    probability: float = Field(default=1.0, ge=0, le=1)
    status: int | None = None  # error: 500 (default), 502, 503 or 529
    retry_after_s: float | None = Field(default=None, ge=0)
    # rate_limit: False sends a bare 429 with no hint of the wait (no Retry-After, reset header or RetryInfo)
    wait_hint: bool = True
    # disconnect / malformed / timeout mid-stream after N tokens; an error with N > 0 breaks a stream that began
    # (a family sends it the way its provider reports errors mid-answer)
    after_tokens: int = Field(default=0, ge=0)
    count: int | None = Field(default=None, ge=1)  # fire at most this many times, then retire
    _fired: int = PrivateAttr(default=0)

    def matches(self, provider: str, model: str) -> bool:
        return self.provider in ("*", provider) and self.model in (None, model)

    @property
    def wait_s(self) -> float:
        """The wait a rate limit asks for."""
        return self.retry_after_s if self.retry_after_s is not None else 1.0

    def refuses(self, streaming: bool) -> bool:
        """Whether the fault is sent instead of the answer, before any content.

        A rate limit always is, an error unless it is to break a stream that began, and a
        timeout when the answer is not streamed (the server hangs, then gives up). The others
        strike later: while a stream is paced, written into its body, or cutting a whole answer.
        """
        if self.kind == "rate_limit":
            return True
        if self.kind == "error":
            return not (streaming and self.after_tokens)
        return self.kind == "timeout" and not streaming

    @property
    def written_in_stream(self) -> bool:
        """Whether a stream carries this fault as content (a garbled frame or an error event).

        Disconnects and timeouts need no words from a family: `SimState.paced` applies them.
        """
        return self.kind in ("malformed", "error")


class SimDisconnect(Exception):
    """Raised inside a response body to drop the connection mid-answer."""


@dataclass(slots=True)
class Answer:
    """What the simulated model says, before any wire format is applied."""

    text: str
    pieces: list[str]  # streamed deltas, joined they make `text`
    prompt_tokens: int
    completion_tokens: int
    tool_call: dict[str, Any] | None = None  # {"id", "name", "arguments" (JSON text)}
    finish_reason: Literal["stop", "length", "tool_calls"] = "stop"

    def cut_at_stop(self, stops: list[str]) -> tuple[Answer, str | None]:
        """The answer up to the first stop sequence (which it leaves out, as the APIs do), and that sequence."""
        hits = [(self.text.find(s), s) for s in stops if s and s in self.text]
        if not hits:
            return self, None
        cut, sequence = min(hits)
        pieces: list[str] = []
        length = 0
        for piece in self.pieces:
            if length + len(piece) >= cut:
                if cut > length:
                    pieces.append(piece[: cut - length])
                break
            pieces.append(piece)
            length += len(piece)
        text = self.text[:cut]
        return Answer(text, pieces, self.prompt_tokens, count_text(text).tokens, None, "stop"), sequence


@dataclass(slots=True)
class StreamStats:
    opened: int = 0
    completed: int = 0
    cancelled: int = 0  # the client went away before the end
    broken: int = 0  # cut short or garbled on purpose by a fault
    open_now: int = 0


class StreamTracker:
    """Counts one streamed body: wrap the body generator's work in `with state.track_stream():`.

    GeneratorExit or CancelledError inside the block means the client closed early.
    """

    __slots__ = ("stats", "broken")

    def __init__(self, stats: StreamStats) -> None:
        self.stats = stats
        self.broken = False  # set when a fault garbles the stream but the body still ends normally

    def __enter__(self) -> "StreamTracker":
        self.stats.opened += 1
        self.stats.open_now += 1
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        self.stats.open_now -= 1
        if kind is None:
            if self.broken:
                self.stats.broken += 1
            else:
                self.stats.completed += 1
        elif issubclass(kind, (GeneratorExit, asyncio.CancelledError)):
            self.stats.cancelled += 1
        else:
            self.stats.broken += 1


_WORDS = (
    "the router weighs cost quality and speed before it picks a model for each request while the cache "
    "remembers answers that were paid for once so a repeated question costs nothing a provider that fails "
    "opens its circuit and traffic moves to the next candidate until a probe finds it healthy again every "
    "token is counted every cent is kept in the ledger and the console shows decisions as they happen "
    "latency budgets tiers context windows and capabilities narrow the field streaming answers arrive "
    "piece by piece with the first token measured and the spend updated when the usage comes in"
).split()


class SimState:
    """Everything one simulator process knows: catalog, faults, counters, randomness."""

    def __init__(
        self, catalog: Catalog, *, seed: int = 0, latency: bool = True, speed: float = 1.0, usage: bool = True,
        azure_deployments: dict[str, str] | None = None,
    ) -> None:
        # The providers' own model lists as they stand at start: ids callers pin later are not added to them.
        self.catalog = Catalog(
            catalog.checked_on, dict(catalog.providers),
            {mid: m for mid, m in catalog.models.items() if m.source != "pinned"}, catalog.rules,
        )
        self.usage = usage  # False: the OpenAI family reports no usage, as some self-hosted servers do
        self.azure_deployments = dict(azure_deployments or {})  # Azure: deployment name -> OpenAI model
        self.seed = seed
        self.latency = latency
        self.speed = speed  # >1 answers faster than the catalog profile
        self.faults: list[Fault] = []
        self.calls: dict[str, Counter[str]] = defaultdict(Counter)
        # Values of the API headers that steer an answer (Anthropic's betas and version), as received.
        self.headers: dict[str, Counter[str]] = defaultdict(Counter)
        self.streams = StreamStats()
        self.started = time.time()
        self._rng = random.Random(seed)
        self.prompts: deque[str] = deque(maxlen=200)  # the latest prompts as they arrived, for tests to inspect

    # --- faults and stats ---------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear_faults(self, provider: str | None = None) -> None:
        self.faults = [f for f in self.faults if provider is not None and f.provider != provider]

    def fault_for(self, provider: str, model: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(provider, model) and self._rng.random() < fault.probability:
                fault._fired += 1
                if fault.count is not None and fault._fired >= fault.count:
                    self.faults.remove(fault)
                return fault
        return None

    def record_call(self, provider: str, model: str) -> None:
        self.calls[provider][model] += 1

    def record_headers(self, received: Any, names: Sequence[str]) -> None:
        for name in names:
            value = received.get(name)
            if value:
                self.headers[name][value] += 1

    def track_stream(self) -> StreamTracker:
        return StreamTracker(self.streams)

    def reset_stats(self) -> None:
        self.calls.clear()
        self.headers.clear()
        self.streams = StreamStats()

    def stats(self) -> dict[str, Any]:
        providers = {
            pid: {"calls": sum(models.values()), "models": dict(models)} for pid, models in sorted(self.calls.items())
        }
        return {
            "calls": sum(p["calls"] for p in providers.values()),
            "providers": providers,
            "streams": asdict(self.streams),
            "headers": {name: dict(values) for name, values in sorted(self.headers.items())},
            "faults": [f.model_dump() for f in self.faults],
            "uptime_s": round(time.time() - self.started, 3),
        }

    # --- models and answers -------------------------------------------------

    def model_spec(self, provider: str, model: str) -> ModelSpec | None:
        found = self.catalog.models.get(f"{provider}/{model}")
        if found is None and HELD_OUT in model and provider in self.catalog.providers:
            found = unlisted_model(f"{provider}/{model}", self.catalog)
        return found

    def knows(self, provider: str, model: str) -> bool:
        return self.model_spec(provider, model) is not None

    def answer(
        self,
        provider: str,
        model: str,
        prompt_text: str,
        *,
        max_tokens: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        call_tool: str | None = None,
        words: int | None = None,
    ) -> Answer:
        """A deterministic answer: the same seed, model and prompt always give the same words.

        `tools` are function definitions ({"name", "parameters"}); `call_tool` names the one to call
        (the family module decides, from tool_choice and whether the last turn was a tool result).
        `words` fixes the answer's length in streamed pieces (benchmarks want an exact count).
        """
        self.prompts.append(prompt_text)
        prompt_tokens = count_text(prompt_text).tokens
        digest = hashlib.sha256(f"{self.seed}|{provider}/{model}|{prompt_text}".encode()).digest()
        rng = random.Random(digest)
        if call_tool and tools:
            tool = next((t for t in tools if t.get("name") == call_tool), tools[0])
            arguments = json.dumps(_arguments_for(tool.get("parameters") or {}, rng), separators=(",", ":"))
            call = {"id": f"call_{digest.hex()[:24]}", "name": tool["name"], "arguments": arguments}
            return Answer("", [], prompt_tokens, count_text(arguments).tokens, call, "tool_calls")
        target = words if words is not None else rng.randint(24, 90)
        chosen = [rng.choice(_WORDS) for _ in range(target)]
        pieces: list[str] = []
        budget = max_tokens if max_tokens is not None else 1 << 30
        spent = 0  # tokens so far, piece by piece, so completion tokens never exceed max_tokens
        finish: Literal["stop", "length"] = "stop"
        sentence_start = True
        for i, word in enumerate(chosen):
            text = word.capitalize() if sentence_start else word
            sentence_start = rng.random() < 0.12 or i == len(chosen) - 1
            punct = "." if sentence_start else ""
            piece = ("" if i == 0 else " ") + text + punct
            if max_tokens is not None:
                spent += count_text(piece).tokens
                if spent > budget:
                    finish = "length"
                    break
            pieces.append(piece)
        text = "".join(pieces)
        return Answer(text, pieces, prompt_tokens, count_text(text).tokens, None, finish)

    def json_answer(self, provider: str, model: str, prompt_text: str, schema: dict[str, Any] | None) -> Answer:
        """JSON mode: an object that fits the schema (or {"answer": ...}), streamed in short pieces."""
        schema = schema or {"type": "object", "properties": {"answer": {"type": "string"}}}
        made = self.answer(provider, model, prompt_text, tools=[{"name": "json", "parameters": schema}], call_tool="json")
        body = made.tool_call["arguments"] if made.tool_call else "{}"
        return Answer(body, json_fragments(body), made.prompt_tokens, made.completion_tokens, None, "stop")

    # --- pacing ---------------------------------------------------------------

    def profile(self, provider: str, model: str) -> tuple[float, float]:
        """(time to first token in s, seconds per streamed piece); zero when latency is off."""
        if not self.latency:
            return 0.0, 0.0
        spec = self.model_spec(provider, model)
        ttft_ms = spec.ttft_ms if spec else 400.0
        tps = spec.tokens_per_s if spec else 60.0
        return ttft_ms / 1000 / self.speed, 1.0 / (tps * self.speed)

    async def paced(
        self, provider: str, model: str, pieces: Sequence[Piece], fault: Fault | None = None
    ) -> AsyncIterator[Piece]:
        """Yield pieces at the model's pace; apply a disconnect or timeout fault when one is due."""
        first_wait, per_piece = self.profile(provider, model)
        if first_wait:
            await asyncio.sleep(first_wait)
        for i, piece in enumerate(pieces):
            if fault is not None and i == fault.after_tokens:
                if fault.kind == "disconnect":
                    raise SimDisconnect()
                if fault.kind == "timeout":
                    await asyncio.sleep(3600)
            if per_piece and i:
                await asyncio.sleep(per_piece)
            yield piece

    async def full_latency(self, provider: str, model: str, pieces: int) -> None:
        """A non-streamed answer takes as long as its streamed twin would."""
        first_wait, per_piece = self.profile(provider, model)
        total = first_wait + per_piece * max(pieces - 1, 0)
        if total:
            await asyncio.sleep(total)


def json_fragments(text: str) -> list[str]:
    """JSON text in the short fragments a stream sends it in; at least one, so a stream has a piece to carry."""
    return [text[i : i + JSON_PIECE_CHARS] for i in range(0, len(text), JSON_PIECE_CHARS)] or [""]


def word_vector(text: str, dims: int) -> list[float]:
    """A unit embedding from hashed words: texts that share words point the same way."""
    vector = [0.0] * dims
    for word in re.findall(r"\w+", text.lower()) or [""]:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dims
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]


def _arguments_for(schema: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Plausible arguments that satisfy a JSON schema (an object's, as tools and JSON mode take)."""
    value = instance_of(schema, rng)
    return value if isinstance(value, dict) else {"answer": value}


_STRINGS = ("Paris", "Tokyo", "Lisbon", "Nairobi", "Lima")
_FORMATS = {
    "date": "2026-03-03",
    "date-time": "2026-03-03T12:00:00Z",
    "time": "12:00:00",
    "email": "ada@example.com",
    "uri": "https://example.com/",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
}
# Lowercased: Gemini's responseSchema spells types in capitals (OBJECT, STRING).
_TYPE_ORDER = ("object", "array", "string", "integer", "number", "boolean", "null")


def instance_of(schema: Any, rng: random.Random, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A small value that validates against `schema`: types, required, enums, consts, arrays, nested
    objects, anyOf/oneOf/allOf and local $refs ($defs, definitions), as pydantic and the SDKs emit them."""
    if not isinstance(schema, dict):
        return {}
    root = schema if root is None else root
    if depth > 12:  # a recursive model: stop where an empty value is allowed
        return None if _types(schema) & {"null"} else ([] if "array" in _types(schema) else {})
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        return instance_of({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key) or () if isinstance(o, dict)]
        if options:
            # The first option that is not null: Optional[X] answers an X.
            chosen = next((o for o in options if _types(o) != {"null"}), options[0])
            return instance_of(chosen, rng, root, depth + 1)
    if schema.get("allOf"):
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        values = [instance_of(part, rng, root, depth + 1) for part in schema["allOf"]]
        if "properties" in rest or "type" in rest:
            values.append(instance_of(rest, rng, root, depth + 1))
        if all(isinstance(v, dict) for v in values):
            return {k: v for value in values for k, v in value.items()}
        return values[0]
    types = _types(schema)
    kind = next((t for t in _TYPE_ORDER if t in types and t != "null"), None)
    if kind is None:
        kind = "object" if "properties" in schema else ("array" if "items" in schema else "null" if types else "string")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: instance_of(prop, rng, root, depth + 1) for name, prop in properties.items()}
    if kind == "array":
        low = schema.get("minItems") or 1
        count = min(low, schema["maxItems"]) if isinstance(schema.get("maxItems"), int) else low
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [instance_of(items, rng, root, depth + 1) for _ in range(count)]
    if kind == "integer":
        return _bounded(schema, rng.randint(1, 100), integer=True)
    if kind == "number":
        return _bounded(schema, round(rng.uniform(0, 100), 2), integer=False)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    text = _FORMATS.get(schema.get("format"), rng.choice(_STRINGS))
    low, high = schema.get("minLength") or 0, schema.get("maxLength")
    text = text.ljust(low, "x")
    return text[:high] if isinstance(high, int) else text


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    names = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else []
    found = {str(name).lower() for name in names}
    if schema.get("nullable") is True:
        found.add("null")
    return found


def _bounded(schema: dict[str, Any], value: float, *, integer: bool) -> float:
    """`value` moved inside the schema's minimum and maximum."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    step = 1 if integer else 0.5
    if isinstance(low, int | float) and value <= low:
        value = low + (step if "exclusiveMinimum" in schema and "minimum" not in schema else 0)
    if isinstance(high, int | float) and value >= high:
        value = high - (step if "exclusiveMaximum" in schema and "maximum" not in schema else 0)
    return int(value) if integer else value
