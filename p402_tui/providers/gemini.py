"""Google Gemini: `POST /v1beta/models/{model}:generateContent` with `x-goog-api-key`.

What differs from the OpenAI shape, and how it is bridged:

- Roles are `user` and `model`; system and developer messages become `systemInstruction`.
- Content is `parts`. Images become `inlineData` (data: URLs) or `fileData` (http URLs).
  Assistant `tool_calls` become `functionCall` parts; `tool` messages become
  `functionResponse` parts in a user turn, named after the call they answer (Gemini
  matches results by function name, not by id). Consecutive tool results share one turn.
- Sampling options live in `generationConfig`; JSON mode is `responseMimeType`; OpenAI's
  `reasoning_effort` becomes a thinking budget with the thoughts returned (as reasoning).
- Gemini's function calls carry no id, so ids are made here. Gemini 3 rejects history whose
  function calls lost their `thoughtSignature`, so the signature rides along twice: in
  `extra_content.google.thought_signature` (what Google's OpenAI-compatible endpoint returns)
  and after `__thought__` in the call id (as LiteLLM does), which survives streaming and
  clients that drop unknown fields. Calls that never had one (history from another model)
  get the dummy signature Google documents for that case.
- Streaming is `?alt=sse`: `data:` lines only, each a whole response; no terminator, the
  connection just closes. `usageMetadata` is cumulative on every chunk, so the last one counts.
- Errors are Google RPC shaped. A bad key is HTTP 400 with reason `API_KEY_INVALID`, and a
  429 has no `Retry-After`: the wait is only in the `RetryInfo` detail.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..core.errors import (
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    OverloadedError,
    ProviderError,
    StreamInterruptedError,
    error_for_status,
)
from ..core.types import ChatChunk, ChatMessage, ChatRequest, ChatResponse, Embeddings, ToolCallDelta, Usage, json_value, new_id
from .base import Adapter, Headers, iter_sse, retry_after_seconds, split_data_url, stop_sequences, tool_arguments

API_VERSION = "v1beta"
EMBED_BATCH = 100  # texts per batchEmbedContents call, the API's limit

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
}

TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
SIGNATURE_SEPARATOR = "__thought__"
# Google's documented stand-in for function calls Gemini did not make (ai.google.dev thought-signatures FAQ).
DUMMY_SIGNATURE = base64.b64encode(b"skip_thought_signature_validator").decode()
# OpenAI's `reasoning_effort` as thinking budgets, the mapping Google's OpenAI-compatible endpoint uses.
THINKING_BUDGETS = {"none": 0, "low": 1024, "medium": 8192, "high": 24576}

# JSON-schema keys Gemini's OpenAPI-style `Schema` understands; anything else goes as a JSON schema.
_SCHEMA_KEYS = frozenset(
    {"type", "properties", "required", "items", "enum", "description", "nullable", "format", "title",
     "minItems", "maxItems", "minimum", "maximum", "propertyOrdering"}
)
_CONTEXT_PHRASES = ("exceeds the maximum number of tokens", "input token count")


class GeminiAdapter(Adapter):
    wire = "gemini"
    page_size = 1000  # Gemini's largest models.list page

    def auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.provider.key()}

    # --- requests ---------------------------------------------------------------

    def wire_name(self, model: str) -> str:
        # Google's own clients name models `models/<id>`; its URLs want the bare id.
        return super().wire_name(model).removeprefix("models/")

    def chat_path(self, model: str) -> str:
        return f"/{API_VERSION}/models/{model}:generateContent"

    def payload(self, request: ChatRequest, model: str, *, stream: bool = False) -> dict[str, Any]:
        """The generateContent body for an OpenAI-shaped request (a streamed one goes to another method, not in the body)."""
        body: dict[str, Any] = {"contents": self.contents(request.messages, model)}
        system = request.system_text()
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        if request.tools:
            body["tools"] = [{"functionDeclarations": [_declaration(t.function) for t in request.tools]}]
            config = _tool_config(request.tool_choice)
            if config is not None:
                body["toolConfig"] = config
        generation = _generation_config(request)
        if generation:
            body["generationConfig"] = generation
        return body

    def contents(self, messages: list[ChatMessage], model: str) -> list[dict[str, Any]]:
        """User and model turns as parts; consecutive tool results go in one user turn."""
        names: dict[str, str] = {}  # tool call id -> function name, for the results that answer them
        turns: list[dict[str, Any]] = []
        previous_role = ""
        for message in messages:
            if message.role in ("system", "developer"):
                continue
            if message.role == "tool":
                part = _function_response(message, names, self.id, model)
                if previous_role == "tool":
                    turns[-1]["parts"].append(part)
                else:
                    turns.append({"role": "user", "parts": [part]})
            elif message.role == "assistant":
                parts = _model_parts(message, names, self.id, model, signed=model.startswith("gemini-3"))
                if parts:
                    turns.append({"role": "model", "parts": parts})
            else:
                parts = _user_parts(message, self.id, model)
                if parts:
                    turns.append({"role": "user", "parts": parts})
            previous_role = message.role
        if not turns:
            raise BadRequestError("the request has no user or assistant message", provider=self.id, model=model)
        return turns

    # --- calls ------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        ids: list[str] = []
        params: dict[str, Any] = {"pageSize": self.page_size}
        while True:
            page = await self.get_json(f"/{API_VERSION}/models", params=params)
            try:
                ids.extend(entry["name"].removeprefix("models/") for entry in page.get("models", []))
            except (KeyError, TypeError, AttributeError):
                raise MalformedResponseError("model list has no names", provider=self.id) from None
            token = page.get("nextPageToken")
            if not token:
                return ids
            params["pageToken"] = token

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        name = self.wire_name(model)
        vectors: list[list[float]] = []
        sized = {} if dimensions is None else {"outputDimensionality": dimensions}
        for start in range(0, len(texts), EMBED_BATCH):
            batch = texts[start : start + EMBED_BATCH]
            payload = {
                "requests": [{"model": f"models/{name}", "content": {"parts": [{"text": t}]}, **sized} for t in batch]
            }
            data = await self.post_json(f"/{API_VERSION}/models/{name}:batchEmbedContents", payload, name)
            try:
                vectors.extend(list(entry["values"]) for entry in data["embeddings"])
            except (KeyError, TypeError):
                raise MalformedResponseError("embedding answer has no embeddings", provider=self.id, model=name) from None
        # batchEmbedContents reports no token usage, so there is none to pass on.
        return Embeddings(provider=self.id, model=name, vectors=vectors)

    # --- answers ----------------------------------------------------------------

    def read_answer(self, data: dict[str, Any], model: str) -> ChatResponse:
        text: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        candidates = data.get("candidates") or []
        candidate = candidates[0] if candidates else {}
        for part in (candidate.get("content") or {}).get("parts") or ():
            if "functionCall" in part:
                calls.append(_tool_call(part))
            elif "text" in part:
                (thoughts if part.get("thought") else text).append(part["text"])
        if candidates:
            finish = _finish_reason(candidate.get("finishReason"), bool(calls))
        else:  # the prompt itself was blocked: promptFeedback.blockReason, no candidates
            finish = "content_filter"
        return ChatResponse(
            provider=self.id,
            model=model,
            content="".join(text) if text or not calls else None,
            reasoning="".join(thoughts) or None,
            tool_calls=calls or None,
            finish_reason=finish,
            usage=_usage(data.get("usageMetadata") or {}),
            id=f"chatcmpl-{data['responseId']}" if data.get("responseId") else new_id(),
        )

    async def read_stream(self, payload: dict[str, Any], model: str) -> AsyncIterator[ChatChunk]:
        """SSE chunks as they come; the last chunk carries finish_reason and the last usage seen."""
        usage_raw: dict[str, Any] = {}
        finish: str | None = None
        calls = 0
        role: str | None = "assistant"  # rides on the first chunk that says something
        # The query is part of the path, so the whole URL is parsed once per model, not per call.
        path = f"/{API_VERSION}/models/{model}:streamGenerateContent?alt=sse"
        async with self.open_events(path, model, payload) as response:
            async for _, data in iter_sse(response):
                try:
                    message = json_value(data)
                    if "error" in message:
                        raise self.error(message["error"], response.headers, model, started=role is None)
                    usage_raw = message.get("usageMetadata") or usage_raw
                    candidates = message.get("candidates") or []
                    if not candidates:
                        if (message.get("promptFeedback") or {}).get("blockReason"):
                            finish = "SAFETY"
                        continue
                    candidate = candidates[0]
                    finish = candidate.get("finishReason") or finish
                    chunk = ChatChunk(role=role)
                    for part in (candidate.get("content") or {}).get("parts") or ():
                        if "functionCall" in part:
                            call = part["functionCall"]
                            arguments = json.dumps(call.get("args") or {})
                            call_id = _call_id(call, part.get("thoughtSignature"))
                            delta = ToolCallDelta(calls, id=call_id, name=call["name"], arguments=arguments)
                            chunk.tool_calls = (chunk.tool_calls or []) + [delta]
                            calls += 1
                        elif part.get("thought"):
                            chunk.reasoning += part.get("text", "")
                        else:
                            chunk.content += part.get("text", "")
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise self.unreadable_event(data, model) from None
                if chunk.content or chunk.reasoning or chunk.tool_calls:
                    role = None
                    yield chunk
        if finish is None:
            # Gemini has no terminator, so a stream cut at a chunk boundary looks like a clean close.
            raise StreamInterruptedError("stream ended without a finishReason", provider=self.id, model=model)
        yield ChatChunk(finish_reason=_finish_reason(finish, calls > 0), usage=_usage(usage_raw), role=role)

    # --- errors -----------------------------------------------------------------

    def error_from_response(self, status: int, body: bytes, headers: Headers, model: str) -> ProviderError:
        try:
            parsed = json.loads(body)
            if isinstance(parsed, list):  # a JSON-array stream reports its error as a one-item array
                parsed = parsed[0]
            error = parsed["error"]
            if not isinstance(error, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, IndexError):
            error = {"code": status, "message": body.decode(errors="replace")[:300] or f"HTTP {status}"}
        error.setdefault("code", status)
        return self.error(error, headers, model, status=status)

    def error(
        self, error: dict[str, Any], headers: Headers, model: str, *, status: int | None = None,
        started: bool = False,
    ) -> ProviderError:
        """Our error for a Google RPC error object; `started` means an answer had begun to stream."""
        code = status or int(error.get("code") or 500)
        rpc_status = error.get("status") or ""
        message = str(error.get("message") or "")
        text = self.clean(f"{rpc_status}: {message}" if rpc_status else message)
        details = error.get("details") if isinstance(error.get("details"), list) else []
        where = {"provider": self.id, "model": model}
        reasons = {d.get("reason") for d in details if isinstance(d, dict)}
        if "API_KEY_INVALID" in reasons or "API key not valid" in message:
            return AuthenticationError(text, status=code, **where)
        if started:
            return StreamInterruptedError(text, status=code, **where)
        if code == 503:
            return OverloadedError(text, status=code, **where)
        return error_for_status(
            code,
            text,
            context_length=any(p in message for p in _CONTEXT_PHRASES),
            retry_after_s=retry_after_seconds(headers, _retry_delay(details)) if code == 429 else None,
            **where,
        )


# --- request pieces ---------------------------------------------------------------


def _user_parts(message: ChatMessage, provider: str, model: str) -> list[dict[str, Any]]:
    if isinstance(message.content, str) or message.content is None:
        return [{"text": message.content}] if message.content else []
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if part.type == "text":
            if part.text:
                parts.append({"text": part.text})
        elif part.image_url is not None:
            parts.append(_image(part.image_url.url, provider, model))
    return parts


def _image(url: str, provider: str, model: str) -> dict[str, Any]:
    if url.startswith("data:"):
        mime_type, data = split_data_url(url, provider, model)
        return {"inlineData": {"mimeType": mime_type, "data": data}}
    if url.startswith(("http://", "https://", "gs://")):
        mime_type = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
        return {"fileData": {"fileUri": url, "mimeType": mime_type}}
    raise BadRequestError(f"unsupported image URL {url[:40]!r}", provider=provider, model=model)


def _model_parts(
    message: ChatMessage, names: dict[str, str], provider: str, model: str, *, signed: bool
) -> list[dict[str, Any]]:
    """Text and function calls; `signed` models need a signature on a turn's first call."""
    text = message.text()
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    for call in message.tool_calls or ():
        names[call.id] = call.function.name
        part: dict[str, Any] = {"functionCall": {"name": call.function.name, "args": tool_arguments(call, provider, model)}}
        extra = (call.model_extra or {}).get("extra_content")
        signature = ((extra.get("google") or {}).get("thought_signature") if isinstance(extra, dict) else None) or (
            call.id.partition(SIGNATURE_SEPARATOR)[2]
        )
        first_call = not any("functionCall" in p for p in parts)
        if signature or (signed and first_call):
            part["thoughtSignature"] = signature or DUMMY_SIGNATURE
        parts.append(part)
    return parts


def _function_response(message: ChatMessage, names: dict[str, str], provider: str, model: str) -> dict[str, Any]:
    name = names.get(message.tool_call_id or "") or message.name
    if not name:
        raise BadRequestError(
            f"tool result {message.tool_call_id!r} answers no earlier tool call", provider=provider, model=model
        )
    text = message.text()
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = text
    # `response` must be a JSON object; anything else is wrapped the way Google's examples do.
    response = value if isinstance(value, dict) else {"result": value}
    return {"functionResponse": {"name": name, "response": response}}


def _simple_schema(schema: Any) -> bool:
    """Whether a JSON schema fits Gemini's OpenAPI-style `Schema` as it is."""
    if isinstance(schema, list):
        return all(_simple_schema(s) for s in schema)
    if not isinstance(schema, dict):
        return True
    if not set(schema) <= _SCHEMA_KEYS or not isinstance(schema.get("type", ""), str):
        return False
    properties = schema.get("properties") or {}
    return all(_simple_schema(p) for p in properties.values()) and _simple_schema(schema.get("items"))


def _declaration(function: Any) -> dict[str, Any]:
    declaration: dict[str, Any] = {"name": function.name}
    if function.description:
        declaration["description"] = function.description
    parameters = function.parameters or {}
    # Gemini refuses an OBJECT schema with no properties, so a function without arguments sends none.
    if parameters.get("properties"):
        key = "parameters" if _simple_schema(parameters) else "parametersJsonSchema"
        declaration[key] = parameters
    return declaration


def _tool_config(choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not name:
            return None
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    mode = TOOL_MODES.get(choice)
    return {"functionCallingConfig": {"mode": mode}} if mode else None


def _generation_config(request: ChatRequest) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.max_tokens is not None:
        config["maxOutputTokens"] = request.max_tokens
    if request.stop:
        config["stopSequences"] = stop_sequences(request)
    if request.seed is not None:
        config["seed"] = request.seed
    response_format = request.response_format or {}
    kind = response_format.get("type")
    if kind in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
        if schema:
            config["responseSchema" if _simple_schema(schema) else "responseJsonSchema"] = schema
    budget = THINKING_BUDGETS.get((request.model_extra or {}).get("reasoning_effort"))
    if budget is not None:
        # Asking for effort means wanting the thinking back, as reasoning.
        config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": budget > 0}
    return config


# --- answer pieces ------------------------------------------------------------------


def _call_id(call: dict[str, Any], signature: str | None) -> str:
    call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
    return f"{call_id}{SIGNATURE_SEPARATOR}{signature}" if signature else call_id


def _tool_call(part: dict[str, Any]) -> dict[str, Any]:
    call = part["functionCall"]
    out: dict[str, Any] = {
        "id": _call_id(call, part.get("thoughtSignature")),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call.get("args") or {})},
    }
    if part.get("thoughtSignature"):
        out["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return out


def _finish_reason(reason: str | None, called: bool) -> str:
    # Gemini says STOP after a function call; OpenAI clients look for tool_calls.
    if called and reason in (None, "STOP"):
        return "tool_calls"
    return FINISH_REASONS.get(reason or "STOP", "stop")


def _usage(raw: dict[str, Any]) -> Usage:
    """`usageMetadata` as OpenAI usage: thoughts are completion tokens, spent reasoning.

    `toolUsePromptTokenCount` (prompts Gemini builds for its own tools) is billed as input
    and is part of `totalTokenCount`, so it counts as prompt.
    """
    thoughts = raw.get("thoughtsTokenCount") or 0
    return Usage(
        prompt_tokens=(raw.get("promptTokenCount") or 0) + (raw.get("toolUsePromptTokenCount") or 0),
        completion_tokens=(raw.get("candidatesTokenCount") or 0) + thoughts,
        cached_tokens=raw.get("cachedContentTokenCount") or 0,
        reasoning_tokens=thoughts,
    )


def _retry_delay(details: list[Any]) -> float | None:
    """Seconds from a `google.rpc.RetryInfo` detail: a protobuf duration such as "12s" or "45.8s"."""
    for detail in details:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    return float(delay[:-1])
                except ValueError:
                    return None
            if isinstance(delay, dict):  # the proto3 object form
                return float(delay.get("seconds") or 0) + float(delay.get("nanos") or 0) / 1e9
    return None
