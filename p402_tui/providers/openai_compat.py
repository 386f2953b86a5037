"""OpenAI Chat Completions, for OpenAI and every provider that speaks its wire.

Groq, DeepSeek, Mistral, Together, Fireworks, OpenRouter, Perplexity, AI21 and
configured local servers (Ollama, vLLM) take the same request with small
differences, handled here: parameters a provider rejects are dropped, usage is
read wherever the provider puts it, and provider extras (DeepSeek's reasoning,
Perplexity's citations) are kept.

Stream chunks are parsed with orjson (`json_value`) straight into `ChatChunk`: this loop
runs once per token for every streamed answer, so it builds no pydantic models.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ..core.errors import (
    MalformedResponseError,
    ProviderError,
    StreamInterruptedError,
    error_for_status,
)
from ..core.types import ChatChunk, ChatRequest, ChatResponse, Embeddings, ToolCallDelta, Usage, json_value, new_id
from .base import (
    TRANSPORT_ERRORS,
    Adapter,
    Headers,
    chunks_of,
    retry_after_seconds,
    sse_batches,
    with_first_token_timeout,
)

# Providers of this family without an embeddings endpoint (reference wire-formats.md section 0).
NO_EMBEDDINGS = frozenset({"groq", "deepseek", "openrouter", "ai21"})
# Where the embeddings endpoint is, relative to the base URL, when it is not /embeddings.
EMBEDDINGS_PATH = {"perplexity": "/v1/embeddings"}
OPENROUTER_TITLE = "P402 Console"

_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "context window",
    "maximum context",
    "prompt is too long",
    "too many tokens",
)
_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)


class OpenAICompatAdapter(Adapter):
    wire = "openai"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsupported = frozenset(self.provider.spec.unsupported_params)

    def auth_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        key = self.provider.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if self.flavor == "openrouter":
            # App attribution; X-Title is the older name some OpenRouter deployments still read.
            referer = os.environ.get("OPENROUTER_REFERER")
            if referer:
                headers["HTTP-Referer"] = referer
            headers["X-OpenRouter-Title"] = OPENROUTER_TITLE
            headers["X-Title"] = OPENROUTER_TITLE
        return headers

    # --- requests -------------------------------------------------------------

    def payload(self, request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        """The JSON body: what the caller set (extra fields too), in this provider's dialect."""
        body = request.model_dump(exclude_none=True)
        body["model"] = model
        body.pop("stream", None)
        if stream:
            body["stream"] = True
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)
        if self.flavor not in ("openai", "azure"):
            _developer_as_system(body["messages"])
        if self.flavor == "mistral":
            _to_mistral(body)
        for name in self.unsupported:
            body.pop(name, None)
        return body

    # --- chat -------------------------------------------------------------------

    def chat_url(self, model: str) -> str:
        """Where chat requests for `model` go, relative to the base URL."""
        return "/chat/completions"

    async def complete(self, request: ChatRequest, *, model: str | None = None) -> ChatResponse:
        model = self.wire_model(request, model)
        data = await self.post_json(self.chat_url(model), self.payload(request, model, stream=False), model)
        return self.parse_completion(data, model)

    def parse_completion(self, data: Any, model: str) -> ChatResponse:
        if not isinstance(data, dict):
            raise MalformedResponseError("answer is not a JSON object", provider=self.id, model=model)
        if data.get("error"):  # OpenRouter reports failures after routing inside a 200 answer
            raise self.error_from_body(data, 502, model, status_from_code=True)
        choices = data.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise MalformedResponseError("answer has no choices", provider=self.id, model=model)
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise MalformedResponseError("answer has no message", provider=self.id, model=model)
        content, reasoning = _content_and_thinking(message.get("content"))
        reasoning = message.get("reasoning_content") or message.get("reasoning") or reasoning
        raw_usage = data.get("usage") or (data.get("x_groq") or {}).get("usage")
        return ChatResponse(
            provider=self.id,
            model=data.get("model") or model,
            content=content,
            reasoning=reasoning or None,
            tool_calls=message.get("tool_calls") or None,
            finish_reason=choice.get("finish_reason") or "stop",
            usage=usage_from(raw_usage) if raw_usage else Usage(),
            id=data.get("id") or new_id(),
            created=data.get("created") or int(time.time()),
            extra=_extras(data),
        )

    def stream(self, request: ChatRequest, *, model: str | None = None) -> AsyncIterator[ChatChunk]:
        return chunks_of(self.stream_batches(request, model=model))

    def stream_batches(self, request: ChatRequest, *, model: str | None = None) -> AsyncIterator[list[ChatChunk]]:
        model = self.wire_model(request, model)
        if self.flavor == "ai21" and request.tools:
            # AI21 refuses stream=true with tools: ask for the whole answer and replay it as chunks.
            batches = self._replay(request, model)
        else:
            batches = self._batches(self.payload(request, model, stream=True), model)
        return with_first_token_timeout(batches, self.provider.first_token_timeout_s, self.id, model)

    async def _replay(self, request: ChatRequest, model: str) -> AsyncIterator[list[ChatChunk]]:
        yield _as_chunks(await self.complete(request, model=model))

    async def _batches(self, body: dict[str, Any], model: str) -> AsyncIterator[list[ChatChunk]]:
        reader = _EventReader(self, model)
        try:
            # Not `open_stream`: every call's stream would pay for a context manager's generator.
            response = await self.start_stream("POST", self.chat_url(model), model, body)
            try:
                if "text/event-stream" not in response.headers.get("content-type", "text/event-stream"):
                    # Some servers ignore stream=true (or fail inside a 200); take the whole answer.
                    data = _json_or_none(await response.read())
                    yield _as_chunks(self.parse_completion(data, model))
                    return
                async for events in sse_batches(response):
                    at = 0
                    while at < len(events) and not reader.done:  # after [DONE]: read on, so the connection is reused
                        batch, error, at = reader.read(events, at)
                        if batch:
                            yield batch  # what came before a failure still reaches the caller
                        if error is not None:
                            raise error
            finally:
                response.close()
        except TRANSPORT_ERRORS as error:
            if not reader.done:  # a connection lost while draining after [DONE] takes nothing from the answer
                raise self.transport_error(error, model, started=reader.started) from None
        if not reader.done and not reader.finished:
            raise self._broken("stream ended before the answer did", model, reader.started)
        if reader.usage is not None or reader.extra:
            yield [ChatChunk(usage=reader.usage, extra=reader.extra)]

    def _broken(self, message: str, model: str, started: bool) -> ProviderError:
        kind = StreamInterruptedError if started else MalformedResponseError
        return kind(self.clean(message), provider=self.id, model=model)

    # --- models and embeddings ---------------------------------------------------

    async def list_models(self) -> list[str]:
        data = await self.get_json("/models")
        items = data.get("data") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise MalformedResponseError("model list has no data", provider=self.id)
        return [item["id"] for item in items if isinstance(item, dict) and "id" in item]

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        if self.flavor in NO_EMBEDDINGS:
            return await super().embed(texts, model=model)
        model = self.wire_name(model)
        path = EMBEDDINGS_PATH.get(self.flavor, "/embeddings")
        payload: dict[str, Any] = {"model": model, "input": texts}
        if dimensions is not None:
            payload["dimensions"] = dimensions
        data = await self.post_json(path, payload, model)
        try:
            items = sorted(data["data"], key=lambda item: item["index"])
            vectors = [_vector(item["embedding"]) for item in items]
        except (KeyError, TypeError, ValueError):
            raise MalformedResponseError("embeddings answer has no vectors", provider=self.id, model=model) from None
        if len(vectors) != len(texts):
            raise MalformedResponseError(
                f"asked for {len(texts)} embeddings, got {len(vectors)}", provider=self.id, model=model
            )
        tokens = (data.get("usage") or {}).get("prompt_tokens") or 0
        return Embeddings(self.id, model, vectors, prompt_tokens=tokens)

    # --- errors ---------------------------------------------------------------------

    def error_from_response(self, status: int, body: bytes, headers: Headers, model: str) -> ProviderError:
        return self.error_from_body(_json_or_none(body), status, model, headers=headers, raw=body)

    def error_from_body(
        self,
        data: Any,
        status: int,
        model: str,
        *,
        headers: Headers | None = None,
        raw: bytes = b"",
        status_from_code: bool = False,
    ) -> ProviderError:
        """Our error for a provider's error body: `{"error": {...}}`, `{"detail": ...}` or `{"message": ...}`.

        `status_from_code`: the error came inside a 200 answer or a stream event, where
        OpenRouter puts the HTTP status it stands for in `error.code`.
        """
        message, code, kind, param = _error_fields(data)
        if status_from_code and isinstance(code, int) and 400 <= code <= 599:
            status = code
        if not message:
            text = raw.decode("utf-8", errors="replace").strip()
            message = text[:300] if text else f"HTTP {status}"
        lowered = message.lower()
        context_length = code == "context_length_exceeded" or any(hint in lowered for hint in _CONTEXT_HINTS)
        hint = _retry_hint(message) if status == 429 else None
        retry_after = retry_after_seconds(headers, hint) if headers is not None else hint
        return error_for_status(
            status,
            self.clean(message),
            context_length=context_length,
            provider=self.id,
            model=model,
            retry_after_s=retry_after,
            body={"type": kind, "code": code, "param": param},
        )


_EMPTY: dict[str, Any] = {}
_loads = orjson.loads


class _EventReader:
    """One stream's events read into chunks, and what the stream has told so far."""

    __slots__ = ("adapter", "model", "started", "finished", "done", "usage", "extra")

    def __init__(self, adapter: OpenAICompatAdapter, model: str) -> None:
        self.adapter = adapter
        self.model = model
        self.started = False  # content has reached the caller
        self.finished = False  # a finish_reason arrived
        self.done = False  # [DONE] arrived
        self.usage: Usage | None = None
        self.extra: dict[str, Any] | None = None

    def read(
        self, events: list[tuple[str | None, str]], at: int
    ) -> tuple[list[ChatChunk], ProviderError | None, int]:
        """The chunks of one read's events from `at` on, the error that ended them if one did, and
        where to go on from. The first chunk with content comes alone, before the rest is parsed:
        time to first token waits for nothing else.

        Every streamed token passes here, so the usual event (text only, no usage, no extras)
        takes as few steps as it can.
        """
        batch: list[ChatChunk] = []
        adapter, model = self.adapter, self.model
        for at in range(at, len(events)):
            data = events[at][1]
            if data == "[DONE]":
                self.done = True
                break
            try:
                obj = _loads(data)
            except ValueError:
                try:
                    obj = json_value(data)  # what orjson refuses and json reads (a lone surrogate escape)
                except ValueError:
                    return batch, adapter._broken(f"unreadable stream event: {data[:80]!r}", model, self.started), at
            if type(obj) is not dict:
                return batch, adapter._broken("stream event is not a JSON object", model, self.started), at
            choices = obj.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta") or _EMPTY
                content = delta.get("content") or ""
                finish = choice.get("finish_reason")
                if len(delta) == 1 and "content" in delta and type(content) is str:  # text alone
                    if content or finish:
                        chunk = ChatChunk(content, "", None, finish)
                    else:
                        chunk = None
                else:
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    calls = delta.get("tool_calls")
                    if type(content) is list:
                        content, thought = _content_and_thinking(content)
                        content, reasoning = content or "", reasoning or thought or ""
                    if content or reasoning or calls or finish:
                        chunk = ChatChunk(content, reasoning, _tool_deltas(calls) if calls else None, finish)
                    else:
                        chunk = None
                if chunk is not None:
                    if finish:
                        self.finished = True
                    batch.append(chunk)
                    if not self.started:
                        chunk.role = "assistant"
                        self.started = True
                        self._usage_and_extras(obj)
                        return batch, None, at + 1
            elif obj.get("error") or obj.get("detail") or obj.get("object") == "error":
                # An answer that fails after it began arrives as an error event, status 200.
                error = adapter.error_from_body(obj, 502, model, status_from_code=True)
                if self.started:
                    error = StreamInterruptedError(
                        f"stream broke: {error.message}", provider=adapter.id, model=model, status=error.status
                    )
                return batch, error, at
            if obj.get("usage") or "x_groq" in obj or "citations" in obj or "search_results" in obj:
                self._usage_and_extras(obj)
        return batch, None, len(events)

    def _usage_and_extras(self, obj: dict[str, Any]) -> None:
        raw_usage = obj.get("usage")
        if raw_usage:
            self.usage = usage_from(raw_usage)
        elif "x_groq" in obj and (obj["x_groq"] or _EMPTY).get("usage"):
            self.usage = usage_from(obj["x_groq"]["usage"])
        if "citations" in obj or "search_results" in obj:
            self.extra = _extras(obj)


def usage_from(raw: dict[str, Any]) -> Usage:
    """Usage as the provider reported it, with OpenAI's, DeepSeek's and OpenRouter's detail fields."""
    prompt_details = raw.get("prompt_tokens_details") or _EMPTY
    completion_details = raw.get("completion_tokens_details") or _EMPTY
    return Usage(
        prompt_tokens=raw.get("prompt_tokens") or 0,
        completion_tokens=raw.get("completion_tokens") or 0,
        cached_tokens=prompt_details.get("cached_tokens") or raw.get("prompt_cache_hit_tokens") or 0,
        reasoning_tokens=completion_details.get("reasoning_tokens") or raw.get("reasoning_tokens") or 0,
        cache_write_tokens=prompt_details.get("cache_write_tokens") or 0,
    )


def _tool_deltas(calls: list[dict[str, Any]]) -> list[ToolCallDelta]:
    out = []
    for position, call in enumerate(calls):
        function = call.get("function") or _EMPTY
        arguments = function.get("arguments") or ""
        out.append(ToolCallDelta(call.get("index", position), call.get("id"), function.get("name"), arguments))
    return out


def _as_chunks(response: ChatResponse) -> list[ChatChunk]:
    """A whole answer as the chunks a stream of it would have carried."""
    calls = None
    if response.tool_calls:
        calls = [
            ToolCallDelta(i, call.get("id"), (call.get("function") or {}).get("name"),
                          (call.get("function") or {}).get("arguments") or "")
            for i, call in enumerate(response.tool_calls)
        ]
    first = ChatChunk(response.content or "", response.reasoning or "", calls, response.finish_reason, role="assistant")
    return [first, ChatChunk(usage=response.usage, extra=response.extra)]


def _content_and_thinking(content: Any) -> tuple[str | None, str | None]:
    """Mistral's reasoning models send content as blocks: text blocks are the answer, thinking blocks reasoning."""
    if not isinstance(content, list):
        return content, None
    text: list[str] = []
    thinking: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(block.get("text") or "")
        elif block.get("type") == "thinking":
            inner = block.get("thinking")
            if isinstance(inner, list):
                thinking.extend(part.get("text") or "" for part in inner if isinstance(part, dict))
            elif isinstance(inner, str):
                thinking.append(inner)
    return "".join(text), "".join(thinking) or None


def _extras(data: dict[str, Any]) -> dict[str, Any] | None:
    extra = {key: data[key] for key in ("citations", "search_results") if data.get(key)}
    return extra or None


def _developer_as_system(messages: list[dict[str, Any]]) -> None:
    """OpenAI's newer name for the system role is OpenAI's own: other OpenAI-wire APIs refuse it
    (DeepInfra answers 422) or let the model ignore it (models behind Ollama). It means the same."""
    for message in messages:
        if message["role"] == "developer":
            message["role"] = "system"


def _to_mistral(body: dict[str, Any]) -> None:
    """Mistral names seed `random_seed` and has tool_choice any instead of required or a named tool."""
    if "seed" in body:
        body["random_seed"] = body.pop("seed")
    choice = body.get("tool_choice")
    if choice == "required":
        body["tool_choice"] = "any"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        body["tool_choice"] = "any"
        if name:
            body["tools"] = [t for t in body.get("tools", ()) if (t.get("function") or {}).get("name") == name]


def _error_fields(data: Any) -> tuple[str, Any, Any, Any]:
    """(message, code, type, param) from any of this family's error shapes."""
    if not isinstance(data, dict):
        return "", None, None, None
    error = data.get("error")
    if isinstance(error, dict):
        message = error.get("message") or ""
        metadata = error.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("raw"), str) and not message:
            message = metadata["raw"]
        return str(message), error.get("code"), error.get("type"), error.get("param")
    if isinstance(error, str):
        return error, data.get("code"), data.get("type"), None
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail, None, None, None
    if isinstance(detail, list):  # FastAPI validation errors
        parts = [str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail]
        return "; ".join(parts), None, "validation_error", None
    message = data.get("message")
    if isinstance(message, str):
        return message, data.get("code"), data.get("type"), data.get("param")
    return "", None, None, None


def _retry_hint(message: str) -> float | None:
    """OpenAI writes the wait into 429 messages: 'Please try again in 26.604s'."""
    match = _TRY_AGAIN.search(message)
    if match is None:
        return None
    value = float(match.group(1))
    return value / 1000 if match.group(2).lower() == "ms" else value


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _vector(embedding: Any) -> list[float]:
    if isinstance(embedding, str):  # encoding_format=base64: little-endian float32
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return [float(x) for x in embedding]
