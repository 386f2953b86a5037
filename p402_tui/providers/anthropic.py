"""Anthropic Messages: `POST /v1/messages` with `x-api-key` and `anthropic-version`.

What differs from the OpenAI shape, and how it is bridged:

- There is no system role: system and developer messages become the top-level `system`.
- `max_tokens` is required: the request's, else the model's output limit capped at
  `DEFAULT_MAX_TOKENS` (a missing limit must not turn into a 128k-token bill).
- Content is blocks. Images become `image` blocks (data: URLs as base64, http(s) as url).
  Assistant `tool_calls` become `tool_use` blocks; `tool` messages become `tool_result`
  blocks in a user turn. Consecutive turns of the same role are merged into one.
- `response_format` json_schema becomes Anthropic's structured output (`output_config.format`)
  on the models that have it; json_object, and json_schema on older models, become an
  instruction appended to `system` (with the schema when there is one): there is no JSON-mode flag.
- `temperature` is 0..1 here (0..2 in OpenAI's), so it is clamped; `seed` has no
  equivalent and is dropped.
- `reasoning_effort` turns on extended thinking with a token budget; thinking comes
  back as `reasoning`, and its tokens as `reasoning_tokens`.
- Usage: the prompt is `input_tokens` plus both cache counts; `cache_read_input_tokens`
  is what is billed at the cached rate. A `cache_control` mark on a text part is passed on,
  so prompt caching works through the OpenAI shape.
- A request that came to the gateway in the Messages shape (`NativeRequest`) is sent as it
  came, with the `anthropic-beta` and `anthropic-version` headers it came with, and its answer (or every event of its stream) is kept beside the chat shape, so the
  gateway can hand it back without loss.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..core.catalog import Catalog, load_catalog
from ..core.config import ResolvedProvider
from ..core.errors import (
    BadRequestError,
    MalformedResponseError,
    ProviderError,
    StreamInterruptedError,
    error_for_status,
)
from ..core.native import native_body, native_headers
from ..core.types import ChatChunk, ChatMessage, ChatRequest, ChatResponse, ContentPart, ToolCallDelta, Usage, json_value, new_id
from .base import (
    Adapter, Headers, RequestHeaders, iter_sse, retry_after_seconds, split_data_url, stop_sequences, tool_arguments,
    with_first_token_timeout,
)
from .transport import Transport

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
MIN_THINKING_BUDGET = 1024
# OpenAI's reasoning_effort as an Anthropic thinking budget (LiteLLM's mapping; 1024 is Anthropic's minimum).
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096, "xhigh": 8192}

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# The status an error type stands for, for `error` events that arrive inside a 200 stream.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# What a count_tokens body takes of a Messages body.
COUNT_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "output_config", "context_management"}
)
_CONTEXT_PHRASES = ("prompt is too long", "exceed context limit", "context window")
_RESET_HEADERS = tuple(
    f"anthropic-ratelimit-{kind}" for kind in ("requests", "tokens", "input-tokens", "output-tokens")
)


@lru_cache(maxsize=1)
def _shipped_catalog() -> Catalog:
    return load_catalog()


class AnthropicAdapter(Adapter):
    wire = "anthropic"

    def __init__(
        self, provider: ResolvedProvider, transport: Transport | None = None, *, catalog: Catalog | None = None
    ) -> None:
        super().__init__(provider, transport)
        # Read once here, at construction, so no request ever waits on the catalog file.
        self.catalog = catalog or _shipped_catalog()

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.provider.key(), "anthropic-version": API_VERSION}

    # --- requests ---------------------------------------------------------------

    def chat_path(self, model: str) -> str:
        return "/v1/messages"

    def default_max_tokens(self, model: str) -> int:
        spec = self.catalog.models.get(f"{self.flavor}/{model}")  # a deployment (`inherits`) reads its parent's entry
        return min(spec.max_output_tokens, DEFAULT_MAX_TOKENS) if spec else DEFAULT_MAX_TOKENS

    def payload(self, request: ChatRequest, model: str, *, stream: bool = False) -> dict[str, Any]:
        """The Messages API body for an OpenAI-shaped request, or the caller's own Messages body."""
        native = native_body(request, self.wire)
        if native is not None:
            body = {**native, "model": model}
            body.pop("stream", None)
            if stream:
                body["stream"] = True
            return body
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": request.max_tokens or self.default_max_tokens(model),
            "messages": self.messages(request.messages, model),
        }
        schema = _output_schema(request.response_format, model)
        system = _system(request, structured=schema is not None)
        if system:
            body["system"] = system
        if schema is not None:
            body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        choice = None
        if request.tools:
            body["tools"] = [_tool(t.function) for t in request.tools]
            choice = _tool_choice(request.tool_choice)
            if choice is not None:
                body["tool_choice"] = choice
        forced_tool = choice is not None and choice["type"] in ("any", "tool")
        thinking = self.thinking_budget(request, model, forced_tool=forced_tool)
        if thinking:
            body["thinking"] = {"type": "enabled", "budget_tokens": thinking}
            if not request.max_tokens:
                body["max_tokens"] = thinking + self.default_max_tokens(model)
            # Anthropic refuses sampling settings while thinking, so they are left out.
        elif request.temperature is not None:
            body["temperature"] = min(request.temperature, 1.0)
        elif request.top_p is not None:
            # Newer Claude models refuse temperature and top_p together; temperature wins.
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = stop_sequences(request)
        if stream:
            body["stream"] = True
        return body

    def thinking_budget(self, request: ChatRequest, model: str, *, forced_tool: bool) -> int | None:
        """Extended thinking tokens for OpenAI's `reasoning_effort`, or None for no thinking.

        None too when the catalog says the model cannot think, when a tool call is forced
        (Anthropic refuses both at once), or when the caller's max_tokens leaves no room.
        """
        budget = THINKING_BUDGETS.get((request.model_extra or {}).get("reasoning_effort") or "")
        spec = self.catalog.models.get(f"{self.flavor}/{model}")  # a deployment (`inherits`) reads its parent's entry
        if budget is None or forced_tool or (spec is not None and "reasoning" not in spec.capabilities):
            return None
        if request.max_tokens is not None:
            if request.max_tokens <= MIN_THINKING_BUDGET:
                return None
            budget = min(budget, request.max_tokens - 1)
        return budget

    def messages(self, messages: list[ChatMessage], model: str) -> list[dict[str, Any]]:
        """User and assistant turns as content blocks, same-role neighbours merged."""
        turns: list[dict[str, Any]] = []
        for message in messages:
            if message.role in ("system", "developer"):
                continue
            if message.role == "tool":
                role, blocks = "user", [_tool_result(message, self.id, model)]
            elif message.role == "assistant":
                role, blocks = "assistant", _assistant_blocks(message, self.id, model)
            else:
                role, blocks = "user", _user_blocks(message, self.id, model)
            if not blocks:
                continue
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"].extend(blocks)
            else:
                turns.append({"role": role, "content": blocks})
        if not turns:
            raise BadRequestError("the request has no user or assistant message", provider=self.id, model=model)
        return turns

    # --- calls ------------------------------------------------------------------

    async def count_tokens(self, request: ChatRequest, *, model: str) -> int:
        """The prompt's input tokens as Anthropic counts them (`/v1/messages/count_tokens`)."""
        name = self.wire_name(model)
        payload = self.payload(request, name)
        body = {key: value for key, value in payload.items() if key in COUNT_FIELDS}
        data = await self.post_json("/v1/messages/count_tokens", body, name, headers=self.call_headers(request))
        try:
            return int(data["input_tokens"])
        except (KeyError, TypeError, ValueError):
            raise MalformedResponseError(f"unreadable token count: {self.clean(str(data)[:200])}", provider=self.id,
                                         model=name) from None  # fmt: skip

    async def complete(self, request: ChatRequest, *, model: str | None = None) -> ChatResponse:
        name = self.wire_model(request, model)
        data = await self.post_json(self.chat_path(name), self.payload(request, name), name,
                                    headers=self.call_headers(request))  # fmt: skip
        response = self.response(data, name)
        response.native = data
        return response

    def stream(self, request: ChatRequest, *, model: str | None = None) -> AsyncIterator[ChatChunk]:
        name = self.wire_model(request, model)
        chunks = self.read_stream(self.payload(request, name, stream=True), name, headers=self.call_headers(request))
        return with_first_token_timeout(chunks, self.provider.first_token_timeout_s, self.id, name)

    def call_headers(self, request: ChatRequest) -> RequestHeaders | None:
        """The adapter's headers with the caller's `anthropic-beta` / `anthropic-version` over them,
        for a request that came in the Messages shape with them; else None (the adapter's own)."""
        return self.with_headers(native_headers(request, self.wire))

    async def list_models(self) -> list[str]:
        ids: list[str] = []
        params: dict[str, Any] = {"limit": 1000}
        while True:
            page = await self.get_json("/v1/models", params=params)
            try:
                ids.extend(entry["id"] for entry in page["data"])
                if not page.get("has_more") or not page.get("last_id"):
                    return ids
                params["after_id"] = page["last_id"]
            except (KeyError, TypeError):
                raise MalformedResponseError("model list has no data", provider=self.id) from None

    # --- answers ----------------------------------------------------------------

    def read_answer(self, data: dict[str, Any], model: str) -> ChatResponse:
        text: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in data["content"]:
            kind = block["type"]
            if kind == "text":
                text.append(block["text"])
            elif kind == "thinking":
                thinking.append(block.get("thinking", ""))
            elif kind == "tool_use":
                function = {"name": block["name"], "arguments": json.dumps(block.get("input") or {})}
                calls.append({"id": block["id"], "type": "function", "function": function})
        return ChatResponse(
            provider=self.id,
            model=data.get("model") or model,
            content="".join(text) if text or not calls else None,
            reasoning="".join(thinking) or None,
            tool_calls=calls or None,
            finish_reason=STOP_REASONS.get(data.get("stop_reason") or "end_turn", "stop"),
            usage=_usage(data["usage"]),
            id=data.get("id") or new_id("msg"),
        )

    async def read_stream(
        self, payload: dict[str, Any], model: str, *, headers: RequestHeaders | None = None
    ) -> AsyncIterator[ChatChunk]:
        """The Messages SSE sequence as chunks; the last one carries finish_reason and usage."""
        usage = Usage()
        tool_index: dict[int, int] = {}  # content block index -> OpenAI tool call index
        role: str | None = "assistant"  # rides on the first chunk that says something
        stop_reason = "end_turn"
        events: list[tuple[str, str]] = []  # as they came, since the last chunk: for `ChatChunk.native`
        async with self.open_events("/v1/messages", model, payload, headers=headers) as response:
            async for event, data in iter_sse(response):
                events.append((event or "", data))
                if event == "ping":
                    continue
                try:
                    message = json_value(data)
                    kind = message["type"]
                    if kind == "content_block_delta":
                        delta = message["delta"]
                        delta_type = delta["type"]
                        if delta_type == "text_delta":
                            chunk = ChatChunk(content=delta["text"], role=role)
                        elif delta_type == "input_json_delta":
                            index = tool_index.get(message["index"], 0)
                            piece = ToolCallDelta(index, arguments=delta["partial_json"])
                            chunk = ChatChunk(tool_calls=[piece], role=role)
                        elif delta_type == "thinking_delta":
                            chunk = ChatChunk(reasoning=delta["thinking"], role=role)
                        else:  # signature and citation deltas have no place in the OpenAI shape
                            continue
                    elif kind == "content_block_start":
                        block = message["content_block"]
                        if block["type"] == "tool_use":
                            index = tool_index[message["index"]] = len(tool_index)
                            piece = ToolCallDelta(index, id=block["id"], name=block["name"])
                            chunk = ChatChunk(tool_calls=[piece], role=role)
                        elif block["type"] == "text" and block.get("text"):
                            chunk = ChatChunk(content=block["text"], role=role)
                        else:
                            continue
                    elif kind == "message_start":
                        usage = _usage(message["message"]["usage"])
                        continue
                    elif kind == "message_delta":
                        stop_reason = message["delta"].get("stop_reason") or stop_reason
                        _update_usage(usage, message.get("usage") or {})
                        continue
                    elif kind == "message_stop":
                        finish = STOP_REASONS.get(stop_reason, "stop")
                        yield ChatChunk(finish_reason=finish, usage=usage, role=role, native=events)
                        return
                    elif kind == "error":
                        error = message["error"]
                        error_type, text = error.get("type", ""), error.get("message", "")
                        raise self.error(None, error_type, text, response.headers, model)
                    else:  # content_block_stop, and event types newer than this code
                        continue
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise self.unreadable_event(data, model) from None
                role = None
                chunk.native, events = events, []
                yield chunk
        raise StreamInterruptedError("stream ended before message_stop", provider=self.id, model=model)

    # --- errors -----------------------------------------------------------------

    def error_from_response(self, status: int, body: bytes, headers: Headers, model: str) -> ProviderError:
        try:
            error = json.loads(body)["error"]
            kind, message = error.get("type", ""), error.get("message", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            kind, message = "", body.decode(errors="replace")[:300] or f"HTTP {status}"
        return self.error(status, kind, message, headers, model)

    def error(
        self, status: int | None, kind: str, message: str, headers: Headers, model: str
    ) -> ProviderError:
        """Our error for an Anthropic error type; `status` is None for an `error` event inside a stream."""
        status = status or ERROR_STATUS.get(kind, 500)
        text = self.clean(f"{kind}: {message}" if kind else message)
        lowered = message.lower()
        return error_for_status(
            status,
            text,
            context_length=kind == "invalid_request_error" and any(p in lowered for p in _CONTEXT_PHRASES),
            provider=self.id,
            model=model,
            retry_after_s=retry_after_seconds(headers, _ratelimit_reset(headers)) if status == 429 else None,
        )


# --- request pieces ---------------------------------------------------------------


# Models from before structured outputs (Sonnet 4.5, Opus 4.1 and Haiku 4.5 were the first to have them).
_UNSTRUCTURED = ("claude-3", "claude-opus-4-20250514", "claude-sonnet-4-20250514")


def _output_schema(response_format: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    """The JSON schema for `output_config.format`, when the request has one and the model takes it."""
    if (response_format or {}).get("type") != "json_schema" or model.startswith(_UNSTRUCTURED):
        return None
    schema = ((response_format or {}).get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def _system(request: ChatRequest, *, structured: bool = False) -> str | list[dict[str, Any]]:
    """System and developer texts as one string, or as text blocks when one carries `cache_control`."""
    blocks = [
        block
        for message in request.messages
        if message.role in ("system", "developer")
        for block in _text_blocks(message)
    ]
    instruction = "" if structured else _json_instruction(request.response_format)
    if instruction:
        blocks.append({"type": "text", "text": instruction})
    if any("cache_control" in block for block in blocks):
        return blocks
    return "\n\n".join(block["text"] for block in blocks)


def _text_blocks(message: ChatMessage) -> list[dict[str, Any]]:
    if isinstance(message.content, str) or message.content is None:
        return [{"type": "text", "text": message.content}] if message.content else []
    return [_text_block(part) for part in message.content if part.type == "text" and part.text]


def _text_block(part: ContentPart) -> dict[str, Any]:
    # A `cache_control` mark on an OpenAI text part (as OpenRouter and LiteLLM accept it) is kept,
    # so callers can use Anthropic's prompt caching through the OpenAI shape.
    block: dict[str, Any] = {"type": "text", "text": part.text}
    cache_control = (part.model_extra or {}).get("cache_control")
    if cache_control:
        block["cache_control"] = cache_control
    return block


def _user_blocks(message: ChatMessage, provider: str, model: str) -> list[dict[str, Any]]:
    if isinstance(message.content, str) or message.content is None:
        return [{"type": "text", "text": message.content}] if message.content else []
    blocks: list[dict[str, Any]] = []
    for part in message.content:
        if part.type == "text":
            if part.text:
                blocks.append(_text_block(part))
        elif part.image_url is not None:
            blocks.append(_image(part.image_url.url, provider, model))
    return blocks


def _image(url: str, provider: str, model: str) -> dict[str, Any]:
    if url.startswith("data:"):
        media_type, data = split_data_url(url, provider, model)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequestError(f"unsupported image URL {url[:40]!r}", provider=provider, model=model)


def _assistant_blocks(message: ChatMessage, provider: str, model: str) -> list[dict[str, Any]]:
    text = message.text()
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for call in message.tool_calls or ():
        arguments = tool_arguments(call, provider, model)
        blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments})
    return blocks


def _tool_result(message: ChatMessage, provider: str, model: str) -> dict[str, Any]:
    if not message.tool_call_id:
        raise BadRequestError("a tool message needs tool_call_id", provider=provider, model=model)
    return {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.text()}


def _tool(function: Any) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": function.name, "input_schema": function.parameters}
    if function.description:
        tool["description"] = function.description
    return tool


def _tool_choice(choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return {"type": "tool", "name": name} if name else None
    return {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}.get(choice)


def _json_instruction(response_format: dict[str, Any] | None) -> str:
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return "Answer with one JSON object and nothing else."
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if schema:
            return f"Answer with one JSON object that matches this JSON schema and nothing else: {json.dumps(schema)}"
        return "Answer with one JSON object and nothing else."
    return ""


# --- answer pieces ------------------------------------------------------------------


def _usage(raw: dict[str, Any]) -> Usage:
    cache_read = raw.get("cache_read_input_tokens") or 0
    cache_write = raw.get("cache_creation_input_tokens") or 0
    return Usage(
        prompt_tokens=(raw.get("input_tokens") or 0) + cache_read + cache_write,
        completion_tokens=raw.get("output_tokens") or 0,
        cached_tokens=cache_read,
        reasoning_tokens=(raw.get("output_tokens_details") or {}).get("thinking_tokens") or 0,
        cache_write_tokens=cache_write,
    )


def _update_usage(usage: Usage, raw: dict[str, Any]) -> None:
    """`message_delta` usage is cumulative: output always, input and cache counts when present."""
    if "output_tokens" in raw:
        usage.completion_tokens = raw["output_tokens"] or 0
    if raw.get("output_tokens_details"):
        usage.reasoning_tokens = raw["output_tokens_details"].get("thinking_tokens") or 0
    if any(raw.get(k) is not None for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")):
        fresh = raw.get("input_tokens")
        if fresh is None:
            fresh = usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
        if raw.get("cache_read_input_tokens") is not None:
            usage.cached_tokens = raw["cache_read_input_tokens"]
        if raw.get("cache_creation_input_tokens") is not None:
            usage.cache_write_tokens = raw["cache_creation_input_tokens"]
        usage.prompt_tokens = fresh + usage.cached_tokens + usage.cache_write_tokens


def _ratelimit_reset(headers: Headers) -> float | None:
    """Seconds until an exhausted `anthropic-ratelimit-*` limit resets (RFC 3339 timestamps)."""
    waits: list[float] = []
    for prefix in _RESET_HEADERS:
        reset = headers.get(f"{prefix}-reset")
        if not reset or headers.get(f"{prefix}-remaining") not in ("0", None):
            continue
        try:
            moment = datetime.fromisoformat(reset.replace("Z", "+00:00"))
        except ValueError:
            continue
        waits.append(max(moment.timestamp() - datetime.now(moment.tzinfo).timestamp(), 0.0))
    return max(waits) if waits else None
