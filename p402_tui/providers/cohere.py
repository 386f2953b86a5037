"""Cohere v2 chat: `POST /v2/chat` with a Bearer key. Close to OpenAI's shape, not equal to it.

What differs, and how it is bridged:

- Messages keep their roles; content is a string or `text` / `image_url` parts. Assistant
  tool calls and `tool` results (with `tool_call_id`) look like OpenAI's.
- `top_p` is `p`, `stop` is `stop_sequences`. `tool_choice` knows only REQUIRED and NONE:
  "auto" is the default and is left out; naming one function sends only that tool, required.
- JSON mode: `response_format {"type": "json_object", "json_schema": {...}}`.
- The answer's content is a list of `text` (and `thinking`) items; `tool_plan` is the model's
  stated plan before it calls tools, so it is reported as reasoning.
- Streaming is SSE with `event:` names: message-start, content-delta, tool-plan-delta,
  tool-call-start/-delta/-end, and message-end, which carries finish_reason and usage.
- Errors are `{"message": ...}` bodies.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from ..core.errors import (
    AuthenticationError,
    BadRequestError,
    ConnectionLostError,
    MalformedResponseError,
    OverloadedError,
    ProviderError,
    ServerError,
    StreamInterruptedError,
    error_for_status,
)
from ..core.types import ChatChunk, ChatMessage, ChatRequest, ChatResponse, Embeddings, ToolCallDelta, Usage, json_value, new_id
from .base import Adapter, Headers, iter_sse, retry_after_seconds, stop_sequences

FINISH_REASONS = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
}
# Cohere ends a generation that failed part-way with these; the answer is not usable.
FAILED_REASONS = ("ERROR", "TIMEOUT")

_CONTEXT_PHRASES = ("too many tokens", "context length", "prompt is too long")
P_MIN, P_MAX = 0.01, 0.99
EMBED_BATCH = 96  # texts per /v2/embed call, the API's limit


class CohereAdapter(Adapter):
    wire = "cohere"
    page_size = 1000  # Cohere's largest models page

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.provider.key()}"}

    # --- requests ---------------------------------------------------------------

    def chat_path(self, model: str) -> str:
        return "/v2/chat"

    def payload(self, request: ChatRequest, model: str, *, stream: bool = False) -> dict[str, Any]:
        """The v2 chat body for an OpenAI-shaped request."""
        body: dict[str, Any] = {"model": model, "messages": [self.message(m, model) for m in request.messages]}
        tools = [t.model_dump(exclude_none=True) for t in request.tools or ()]
        choice = request.tool_choice
        if isinstance(choice, dict):
            # Cohere cannot name the tool to call; offering only that one and requiring a call can.
            wanted = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if t["function"]["name"] == wanted] or tools
            body["tool_choice"] = "REQUIRED"
        elif choice in ("required", "none") and tools:
            body["tool_choice"] = choice.upper()
        if tools:
            body["tools"] = tools
        response_format = _response_format(request.response_format)
        if response_format:
            body["response_format"] = response_format
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            # Cohere takes p in [0.01, 0.99]; OpenAI's 0 and 1 mean the same ends of the range.
            body["p"] = min(max(request.top_p, P_MIN), P_MAX)
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.stop:
            body["stop_sequences"] = stop_sequences(request)
        if request.seed is not None:
            body["seed"] = request.seed
        body["stream"] = stream
        return body

    def message(self, message: ChatMessage, model: str) -> dict[str, Any]:
        if message.role in ("system", "developer"):
            return {"role": "system", "content": message.text()}
        if message.role == "tool":
            if not message.tool_call_id:
                raise BadRequestError("a tool message needs tool_call_id", provider=self.id, model=model)
            return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.text()}
        if message.role == "assistant":
            out: dict[str, Any] = {"role": "assistant"}
            text = message.text()
            if text:
                out["content"] = text
            if message.tool_calls:
                out["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                    for c in message.tool_calls
                ]
            return out
        if isinstance(message.content, list):
            parts: list[dict[str, Any]] = []
            for part in message.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                elif part.image_url is not None:
                    parts.append({"type": "image_url", "image_url": part.image_url.model_dump(exclude_none=True)})
            return {"role": "user", "content": parts}
        return {"role": "user", "content": message.content or ""}

    # --- calls ------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        names: list[str] = []
        params: dict[str, Any] = {"page_size": self.page_size}
        while True:
            page = await self.get_json("/v1/models", params=params)
            try:
                names.extend(entry["name"] for entry in page["models"])
            except (KeyError, TypeError):
                raise MalformedResponseError("model list has no models", provider=self.id) from None
            token = page.get("next_page_token")
            if not token:
                return names
            params["page_token"] = token

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        name = self.wire_name(model)
        vectors: list[list[float]] = []
        billed = 0
        for start in range(0, len(texts), EMBED_BATCH):
            batch = texts[start : start + EMBED_BATCH]
            payload: dict[str, Any] = {
                "model": name, "texts": batch, "input_type": "search_document", "embedding_types": ["float"]
            }
            if dimensions is not None:
                payload["output_dimension"] = dimensions
            data = await self.post_json("/v2/embed", payload, name)
            try:
                vectors.extend(list(v) for v in data["embeddings"]["float"])
            except (KeyError, TypeError):
                raise MalformedResponseError("embedding answer has no float embeddings", provider=self.id, model=name) from None
            billed += int(((data.get("meta") or {}).get("billed_units") or {}).get("input_tokens") or 0)
        return Embeddings(provider=self.id, model=name, vectors=vectors, prompt_tokens=billed)

    # --- answers ----------------------------------------------------------------

    def read_answer(self, data: dict[str, Any], model: str) -> ChatResponse:
        reason = data.get("finish_reason") or "COMPLETE"
        if reason in FAILED_REASONS:
            raise ServerError(f"generation ended with {reason}", provider=self.id, model=model)
        message = data["message"]
        text: list[str] = []
        thinking: list[str] = [message["tool_plan"]] if message.get("tool_plan") else []
        for item in message.get("content") or ():
            if item.get("type") == "thinking":
                thinking.append(item.get("thinking") or "")
            elif item.get("type") == "text":
                text.append(item.get("text") or "")
        calls = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": call["function"].get("arguments") or "{}"},
            }
            for call in message.get("tool_calls") or ()
        ]
        return ChatResponse(
            provider=self.id,
            model=model,
            content="".join(text) if text or not calls else None,
            reasoning="".join(thinking) or None,
            tool_calls=calls or None,
            finish_reason=FINISH_REASONS.get(reason, "stop"),
            usage=_usage(data.get("usage") or {}),
            id=f"chatcmpl-{data['id']}" if data.get("id") else new_id(),
        )

    async def read_stream(self, payload: dict[str, Any], model: str) -> AsyncIterator[ChatChunk]:
        """The v2 SSE sequence as chunks; message-end gives the last one its finish_reason and usage."""
        role: str | None = "assistant"  # rides on the first chunk that says something
        async with self.open_events("/v2/chat", model, payload) as response:
            async for event, data in iter_sse(response):
                if data == "[DONE]":
                    break
                try:
                    message = json_value(data)
                    kind = message.get("type") or event
                    delta = message.get("delta") or {}
                    if kind == "content-delta":
                        content = delta["message"]["content"]
                        chunk = ChatChunk(content=content.get("text") or "", reasoning=content.get("thinking") or "", role=role)
                    elif kind == "tool-plan-delta":
                        chunk = ChatChunk(reasoning=delta["message"].get("tool_plan") or "", role=role)
                    elif kind == "tool-call-start":
                        call = delta["message"]["tool_calls"]
                        function = call.get("function") or {}
                        piece = ToolCallDelta(
                            message.get("index") or 0, id=call["id"], name=function.get("name"),
                            arguments=function.get("arguments") or "",
                        )
                        chunk = ChatChunk(tool_calls=[piece], role=role)
                    elif kind == "tool-call-delta":
                        arguments = delta["message"]["tool_calls"]["function"].get("arguments") or ""
                        chunk = ChatChunk(tool_calls=[ToolCallDelta(message.get("index") or 0, arguments=arguments)], role=role)
                    elif kind == "message-end":
                        if delta.get("error"):
                            raise StreamInterruptedError(
                                self.clean(str(delta["error"])), provider=self.id, model=model
                            )
                        reason = delta.get("finish_reason") or "COMPLETE"
                        if reason in FAILED_REASONS:
                            raise StreamInterruptedError(f"generation ended with {reason}", provider=self.id, model=model)
                        yield ChatChunk(
                            finish_reason=FINISH_REASONS.get(reason, "stop"),
                            usage=_usage(delta.get("usage") or {}),
                            role=role,
                        )
                        return
                    else:  # message-start, content-start/-end, tool-call-end, citations, debug
                        continue
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise self.unreadable_event(data, model) from None
                if chunk.content or chunk.reasoning or chunk.tool_calls:
                    role = None
                    yield chunk
        raise StreamInterruptedError("stream ended before message-end", provider=self.id, model=model)

    # --- errors -----------------------------------------------------------------

    def error_from_response(self, status: int, body: bytes, headers: Headers, model: str) -> ProviderError:
        try:
            message = str(json.loads(body)["message"])
        except (ValueError, KeyError, TypeError):
            message = body.decode(errors="replace")[:300] or f"HTTP {status}"
        text = self.clean(message)
        where = {"provider": self.id, "model": model}
        if status in (402, 498):  # payment required, invalid token: this key will not work anywhere
            return AuthenticationError(text, status=status, **where)
        if status == 499:  # the request was cancelled on the way; trying again may work
            return ConnectionLostError(text, status=status, **where)
        if status == 503:
            return OverloadedError(text, status=status, **where)
        return error_for_status(
            status,
            text,
            context_length=any(p in message.lower() for p in _CONTEXT_PHRASES),
            retry_after_s=retry_after_seconds(headers) if status == 429 else None,
            **where,
        )


def _response_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        return {"type": "json_object", "json_schema": schema} if schema else {"type": "json_object"}
    return None


def _usage(raw: dict[str, Any]) -> Usage:
    """v2 usage as OpenAI usage.

    Cohere reports two counts. `billed_units` is what it charges and leaves out the preamble
    Cohere prepends to every prompt; `tokens` is what the model actually processed. We report
    `tokens` so prompt sizes compare across providers and spend errs on the high side; billed
    units are the fallback when `tokens` is absent.
    """
    counted = raw.get("tokens") or raw.get("billed_units") or {}
    return Usage(
        prompt_tokens=int(counted.get("input_tokens") or 0),
        completion_tokens=int(counted.get("output_tokens") or 0),
        cached_tokens=int(raw.get("cached_tokens") or 0),
    )
