"""The shapes every part of P402 speaks.

Requests arrive in the OpenAI chat shape (pydantic, validated once at the edge).
Responses and stream chunks are slotted dataclasses: they are built on the hot
path, once per token, and only turned into OpenAI-shaped dicts when they leave.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from random import getrandbits
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_ASCII_JSON = json.JSONEncoder(separators=(",", ":")).encode


def json_bytes(data: Any) -> bytes:
    """Compact JSON of wire data: orjson (~10x faster than json, and every answer and chunk passes through),
    or ASCII-escaped json for what orjson refuses (a lone surrogate in a text, a huge integer)."""
    try:
        return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return _ASCII_JSON(data).encode()


def usd_json(value: float) -> float:
    """A dollar figure as JSON carries it: 12 significant digits, so a sum of binary fractions
    reads as the decimal it is (0.07, not 0.07000000000000001)."""
    return float(f"{value:.12g}")


def round_costs(data: Any) -> Any:
    """`data` with every `*_usd` number in it, at any depth, put through `usd_json` (a copy: the
    snapshots it is given may be live state)."""
    if isinstance(data, dict):
        return {k: usd_json(v) if isinstance(v, float) and k.endswith("_usd") else round_costs(v) for k, v in data.items()}
    if isinstance(data, list):
        return [round_costs(v) for v in data]
    return data


async def aclose_iterator(iterator: Any) -> None:
    """Close an async iterator that can be closed (a generator, a stream); others need nothing."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def json_value(data: str | bytes) -> Any:
    """Parsed JSON: orjson, or json for what orjson refuses and json reads (a lone surrogate escape).
    Raises ValueError when the text is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)

Role = Literal["system", "developer", "user", "assistant", "tool"]
Tier = Literal["budget", "mid", "premium"]
Wire = Literal["openai", "anthropic", "gemini", "cohere", "azure"]
Capability = Literal[
    "chat",
    "streaming",
    "vision",
    "function_calling",
    "json_mode",
    "reasoning",
    "web_search",
    "embeddings",
]
CAPABILITIES: tuple[str, ...] = Capability.__args__  # type: ignore[attr-defined]
TIERS: tuple[str, ...] = Tier.__args__  # type: ignore[attr-defined]
TIER_RANK = {tier: rank for rank, tier in enumerate(TIERS)}


# --- Requests (OpenAI chat shape) ------------------------------------------


def _json_integer(value: Any) -> Any:
    # Lax mode would read `true` as 1 and "16" as 16; OpenAI's API refuses both. 16.0 is an integer to JSON Schema.
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected an integer, not {json.dumps(value)}")
    if isinstance(value, float) and value.is_integer():
        # As an int, a whole 1e20 meets the field's bound and its message, not "unable to parse input string".
        return int(value)
    return value


# Request fields take JSON's types as they are: `Annotated[int, Field(...), JSON_INTEGER]` (the
# constraints first, or the JSON schema loses them), and `strict=True` on floats (which still take
# integers) and booleans.
JSON_INTEGER = BeforeValidator(_json_integer)


class _Open(BaseModel):
    """Wire models keep fields we do not know, so nothing a caller sent is lost."""

    # cache_strings: a request's JSON is parsed keeping no value for later; pydantic's default keeps up to
    # 16,384 strings of up to 64 characters (short prompts, each one different) for the process's life.
    model_config = ConfigDict(extra="allow", cache_strings="keys")


class ImageURL(_Open):
    url: str
    detail: str | None = None


class ContentPart(_Open):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(_Open):
    name: str
    arguments: str = "{}"


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text, image parts left out."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def images(self) -> list[ImageURL]:
        if isinstance(self.content, list):
            return [p.image_url for p in self.content if p.type == "image_url" and p.image_url]
        return []


class FunctionDef(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class ChatRequest(_Open):
    """An OpenAI chat completion request. `model` is a wire id, `provider/model`, or None to route."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    # OpenAI's bound; the router's sums are int64.
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), JSON_INTEGER] | None = None
    # The OpenAI SDK's newer name for max_tokens. Read into max_tokens, so the router and every
    # adapter see the one limit (each writes it in its provider's dialect), then left unset.
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), JSON_INTEGER] | None = None
    # One answer a request: each adapter reads one choice, so n > 1 would be answered short, silently.
    n: Annotated[int, Field(ge=1, le=1, description="P402 answers with one choice"), JSON_INTEGER] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1), JSON_INTEGER] | None = None  # int64, as providers take it
    stream: bool = Field(default=False, strict=True)
    stream_options: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if not isinstance(kind, str) or kind not in RESPONSE_FORMATS:
            raise ValueError(f"type must be one of {', '.join(RESPONSE_FORMATS)}")
        if kind == "json_schema" and not isinstance(value.get("json_schema"), dict):
            raise ValueError("json_schema must be an object with the schema's name and schema")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _known_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError("must be none, auto, required or a function to call")
        if isinstance(value, dict):
            kind = value.get("type")
            if kind not in ("function", "custom", "allowed_tools"):
                raise ValueError("type must be function, custom or allowed_tools")
            # Each type's own object: the chosen tool, whose name adapters read, or the set of allowed ones.
            chosen = value.get(kind)
            if kind == "allowed_tools" and not isinstance(chosen, dict):
                raise ValueError('allowed_tools is an object: {"mode": ..., "tools": [...]}')
            if kind != "allowed_tools" and (not isinstance(chosen, dict) or not isinstance(chosen.get("name"), str)):
                raise ValueError(f'a {kind} choice names its tool: {{"type": "{kind}", "{kind}": {{"name": ...}}}}')
            if not isinstance(value.get("function", {}), dict):  # adapters read a name from it whatever the type
                raise ValueError("function must be an object naming the tool")
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: Any) -> Any:
        # OpenAI's document declares `stream` nullable (default false); typed clients send the null.
        return False if value is None else value

    @field_validator("max_completion_tokens")
    @classmethod
    def _same_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if value is not None and max_tokens is not None and value != max_tokens:
            raise ValueError(f"differs from max_tokens ({max_tokens}); send one of the two")
        return value

    @model_validator(mode="after")
    def _one_limit(self) -> ChatRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens, self.max_completion_tokens = self.max_completion_tokens, None
        return self

    def prompt_chars(self) -> int:
        """About how much text the prompt holds (plain-text messages; enough to spot a large one)."""
        return sum(len(m.content) for m in self.messages if type(m.content) is str)

    def has_images(self) -> bool:
        return any(m.images() for m in self.messages)

    def needs(self) -> set[str]:
        """Capabilities the request itself implies."""
        need = {"chat"}
        if self.has_images():
            need.add("vision")
        if self.tools:
            need.add("function_calling")
        if self.response_format and self.response_format.get("type") in ("json_object", "json_schema"):
            need.add("json_mode")
        if self.stream:
            need.add("streaming")
        return need

    def system_text(self) -> str:
        return "\n\n".join(m.text() for m in self.messages if m.role in ("system", "developer"))

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        return ""


# --- Responses ----------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    """Token counts as the provider reported them; never recounted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # part of prompt_tokens read from the provider's prompt cache
    reasoning_tokens: int = 0  # part of completion_tokens spent thinking
    cache_write_tokens: int = 0  # Anthropic cache creation, billed above the input rate
    estimated: bool = False  # the provider sent none: our count of the prompt and the text received

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a streamed tool call; pieces with the same index join up."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "function": {"arguments": self.arguments}}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            out["function"]["name"] = self.name
        return out


@dataclass(slots=True)
class ChatChunk:
    """One streamed piece of an answer, in OpenAI's chunk terms."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    role: str | None = None
    extra: dict[str, Any] | None = None  # provider extras: citations, search_results
    error: dict[str, Any] | None = None  # set on the last chunk of a stream that broke
    # The upstream's own events this chunk was read from, (event, data) as they came, for a caller
    # that speaks the provider's API and passes its stream through (`NativeRequest`).
    native: list[tuple[str, str]] | None = None

    def to_openai(self, *, id: str, model: str, created: int) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if self.role:
            delta["role"] = self.role
        if self.content:
            delta["content"] = self.content
        if self.reasoning:
            delta["reasoning_content"] = self.reasoning
        if self.tool_calls:
            delta["tool_calls"] = [t.to_openai() for t in self.tool_calls]
        out: dict[str, Any] = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": self.finish_reason}],
        }
        if self.usage is not None:
            out["usage"] = self.usage.to_openai()
        if self.extra:
            out.update(self.extra)
        return out


@dataclass(slots=True)
class Attempt:
    """One try at one model, kept whether it worked or not."""

    provider: str
    model: str
    error_kind: str | None = None
    error: str | None = None
    latency_ms: float = 0.0


@dataclass(slots=True)
class P402Meta:
    """What P402 adds to every answer: where it went, what it cost, how it got there."""

    provider: str
    model: str
    cost_usd: float | None = 0.0  # None: the model has no known price (an unlisted id)
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    decision_id: str | None = None
    cached: bool = False
    saved_usd: float = 0.0
    usage_estimated: bool = False  # billed on our token count: the provider reported no usage
    dropped_params: list[str] = field(default_factory=list)  # what the model's parameter rules left out

    @property
    def priced(self) -> bool:
        return self.cost_usd is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "cost_usd": None if self.cost_usd is None else usd_json(self.cost_usd),
            "priced": self.cost_usd is not None,
            "dropped_params": list(self.dropped_params),
            "latency_ms": round(self.latency_ms, 3),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "attempts": [
                {"provider": a.provider, "model": a.model, "error_kind": a.error_kind, "error": a.error}
                for a in self.attempts
            ],
            "decision_id": self.decision_id,
            "cached": self.cached,
            "saved_usd": usd_json(self.saved_usd),
            "usage_estimated": self.usage_estimated,
        }


def new_id(prefix: str = "chatcmpl", size: int = 12) -> str:
    """A random id, `size` bytes as hex. Ids name answers and requests and guard nothing, so they
    come from `random` (seeded from the OS, reseeded in a forked child): no system call per id."""
    return f"{prefix}-{getrandbits(size * 8):0{size * 2}x}"


@dataclass(slots=True)
class ChatResponse:
    """A whole answer. `model` is the provider's wire id; `provider` the catalog provider id."""

    provider: str
    model: str
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI shape: {id, type, function: {name, arguments}}
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)
    id: str = field(default_factory=new_id)
    created: int = field(default_factory=lambda: int(time.time()))
    extra: dict[str, Any] | None = None
    p402: P402Meta | None = None
    native: dict[str, Any] | None = None  # the upstream's answer as it came, for a caller speaking its API

    def to_openai(self) -> dict[str, Any]:
        # `refusal` and `logprobs` are required by OpenAI's published document, null when absent.
        message: dict[str, Any] = {"role": "assistant", "content": self.content, "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}],
            "usage": self.usage.to_openai(),
        }
        if self.extra:
            out.update(self.extra)
        if self.p402 is not None:
            out["p402"] = self.p402.to_dict()
        return out


@dataclass(slots=True)
class Embeddings:
    provider: str
    model: str
    vectors: list[list[float]]
    prompt_tokens: int = 0
