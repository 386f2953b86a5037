"""Anthropic's Messages API shapes, and their translation to and from the chat shape.

A Messages body becomes a `NativeRequest`: the chat request every adapter reads,
with the body kept as it came for an Anthropic model (see `core.native`). Answers
go back as Anthropic messages; a stream as Anthropic's named events, either the
upstream's own (when the answering model is Anthropic's) or written here from the
chunks of any other model. P402's own figures ride in `p402-*` headers, so the
bodies stay exactly Anthropic's.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.catalog import Catalog
from ..core.errors import AllAttemptsFailedError, ConnectionLostError, P402Error, ServerError
from ..core.native import NativeRequest
from ..core.types import JSON_INTEGER, ChatChunk, ChatResponse, P402Meta, Usage, json_bytes, new_id
from . import errors
from .bodies import resolve_model
from .errors import GatewayError, from_validation_error

WIRE = "anthropic"

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# Anthropic's error type for each status it sends (its SDK picks the exception class by status).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# Thinking budgets as OpenAI's reasoning_effort, for models of the other families.
_EFFORTS = ((1024, "low"), (4096, "medium"))

_DATED = re.compile(r"^(.*)-(\d{8})$")
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")  # what Anthropic's document allows in a tool_use id
_ENCODED_ID = "toolu_p402_"  # an upstream tool call id outside that alphabet, base64url-encoded after this


def tool_use_id(upstream: str) -> str:
    """A tool call's id as a tool_use id: as it is when Anthropic's alphabet allows it, else encoded
    (Gemini's carry thought signatures with `/`, `+`, `=`), so that it comes back unchanged."""
    if _TOOL_ID.match(upstream):
        return upstream
    return _ENCODED_ID + base64.urlsafe_b64encode(upstream.encode()).decode().rstrip("=")


def upstream_id(tool_id: str) -> str:
    """The upstream's tool call id for a tool_use id `tool_use_id` gave out."""
    if not tool_id.startswith(_ENCODED_ID):
        return tool_id
    encoded = tool_id[len(_ENCODED_ID):]
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except ValueError:
        return tool_id


# --- requests ---------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class MessageParam(_Open):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesBody(_Open):
    """The fields of a Messages request P402 reads; the rest pass through to Anthropic's models."""

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), JSON_INTEGER]
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1, strict=True)
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    top_k: Annotated[int, Field(ge=0), JSON_INTEGER] | None = None
    metadata: dict[str, Any] | None = None
    stream: bool = Field(default=False, strict=True)
    thinking: dict[str, Any] | None = None


class CountBody(_Open):
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def validated(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise GatewayError(400, "the request body must be a JSON object", code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error) from None


def resolve(catalog: Catalog, ref: str) -> str | None:
    """A model reference as the router takes it: Anthropic's ids resolve with or without their
    date suffix (`claude-sonnet-4-5` and `claude-sonnet-4-5-20250929`), besides every name the chat route takes."""
    try:
        return resolve_model(catalog, ref)
    except GatewayError:
        bare = ref.removeprefix(f"{WIRE}/")
        dated = _DATED.match(bare)
        if dated is not None and f"{WIRE}/{dated.group(1)}" in catalog.models:
            return f"{WIRE}/{dated.group(1)}"
        dated_ids = sorted(m.id for m in catalog.models_of(WIRE) if _undated(m.model) == bare)
        if dated_ids:
            return dated_ids[-1]  # the newest snapshot, as Anthropic's undated aliases point at
        raise


def _undated(model: str) -> str | None:
    dated = _DATED.match(model)
    return dated.group(1) if dated is not None else None


def to_chat(
    body: MessagesBody | CountBody, raw: dict[str, Any], model: str | None, headers: dict[str, str] | None = None
) -> NativeRequest:
    """The chat request a Messages body stands for, with `raw` (less P402's own object) and the
    `headers` for Anthropic's upstream (see `upstream_headers`) kept for Anthropic."""
    messages: list[dict[str, Any]] = []
    system = _system(body.system)
    if system is not None:
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(body.messages):
        where = f"messages[{index}]"
        if message.role == "user":
            messages += _user(message.content, where)
        else:
            messages.append(_assistant(message.content, where))
    chat: dict[str, Any] = {"model": model, "messages": messages}
    if body.tools:
        chat["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(body.tools)]
        if body.tool_choice is not None:
            chat["tool_choice"] = _tool_choice(body.tool_choice)
    if isinstance(body, MessagesBody):
        chat["max_tokens"] = body.max_tokens
        chat["stream"] = body.stream
        for name in ("temperature", "top_p"):
            if getattr(body, name) is not None:
                chat[name] = getattr(body, name)
        if body.stop_sequences:
            chat["stop"] = body.stop_sequences
        effort = _effort(body.thinking)
        if effort is not None:
            chat["reasoning_effort"] = effort
    try:
        return NativeRequest.of(chat, wire=WIRE, body=raw, headers=headers)
    except ValidationError as error:  # a field the checks above let through, named as the chat request has it
        raise from_validation_error(error) from None


def _text_of(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise GatewayError(400, f"{where}.text: a text block needs its text", param=f"{where}.text", code="invalid_value")
    return text


def _system(system: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
    if system is None or isinstance(system, str):
        return system or None
    parts = []
    for index, block in enumerate(system):
        where = f"system[{index}]"
        if block.get("type") != "text":
            raise GatewayError(400, f"{where}.type: system blocks are text", param=f"{where}.type", code="invalid_value")
        parts.append(_text_part(block, where))
    return parts or None


def _text_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "text", "text": _text_of(block, where)}
    if block.get("cache_control"):
        part["cache_control"] = block["cache_control"]  # Anthropic's adapter keeps it through the chat shape
    return part


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    source = source if isinstance(source, dict) else {}
    data, media_type, link = source.get("data"), source.get("media_type"), source.get("url")
    if source.get("type") == "base64" and isinstance(data, str) and isinstance(media_type, str):
        url = f"data:{media_type};base64,{data}"
    elif source.get("type") == "url" and isinstance(link, str):
        url = link
    else:
        message = f"{where}.source: an image needs a base64 source (media_type, data) or a url source"
        raise GatewayError(400, message, param=f"{where}.source", code="invalid_value")
    return {"type": "image_url", "image_url": {"url": url}}


def _user(content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """One user turn as chat messages: its tool results first (each a `tool` message), then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = block.get("type")
        if kind == "text":
            parts.append(_text_part(block, at))
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_result":
            results.append(_tool_result(block, at))
        elif kind == "document" and (block.get("source") or {}).get("type") == "text":
            parts.append({"type": "text", "text": str(block["source"].get("data") or "")})
        else:
            message = f"{at}.type: {kind!r} blocks are not supported in a user message here"
            raise GatewayError(400, message, param=f"{at}.type", code="invalid_value")
    out = results
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    tool_id = block.get("tool_use_id")
    if not isinstance(tool_id, str) or not tool_id:
        raise GatewayError(400, f"{where}.tool_use_id: required", param=f"{where}.tool_use_id", code="invalid_value")
    content = block.get("content")
    if isinstance(content, list):
        text = "".join(_text_of(part, f"{where}.content[{index}]") for index, part in enumerate(content)
                       if isinstance(part, dict) and part.get("type") == "text")  # fmt: skip
    else:
        text = content if isinstance(content, str) else ""
    if block.get("is_error"):
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": upstream_id(tool_id), "content": text}


def _assistant(content: str | list[dict[str, Any]], where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = block.get("type")
        if kind == "text":
            text.append(_text_of(block, at))
        elif kind == "tool_use":
            name, tool_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(tool_id, str):
                raise GatewayError(400, f"{at}: a tool_use block needs its id and name", param=at, code="invalid_value")
            arguments = json.dumps(block.get("input") or {})
            function = {"name": name, "arguments": arguments}
            calls.append({"id": upstream_id(tool_id), "type": "function", "function": function})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # only Anthropic's models read their own thinking back; they get the body as sent
        else:
            message = f"{at}.type: {kind!r} blocks are not supported in an assistant message here"
            raise GatewayError(400, message, param=f"{at}.type", code="invalid_value")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if tool.get("type") not in (None, "custom"):
        message = f"{where}.type: Anthropic's built-in tool {tool.get('type')!r} is not served through P402"
        raise GatewayError(400, message, param=f"{where}.type", code="invalid_value")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise GatewayError(400, f"{where}.name: required", param=f"{where}.name", code="invalid_value")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        message = f"{where}.input_schema: required, a JSON Schema object"
        raise GatewayError(400, message, param=f"{where}.input_schema", code="invalid_value")
    if not isinstance(tool.get("description"), (str, type(None))):
        raise GatewayError(400, f"{where}.description: must be a string", param=f"{where}.description",
                           code="invalid_value")  # fmt: skip
    function: dict[str, Any] = {"name": name, "parameters": schema}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any]) -> str | dict[str, Any]:
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise GatewayError(400, "tool_choice.type: one of auto, any, tool (with a name), none", param="tool_choice.type",
                       code="invalid_value")  # fmt: skip


def _effort(thinking: dict[str, Any] | None) -> str | None:
    if not thinking or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int):
        return "medium"
    return next((effort for limit, effort in _EFFORTS if budget <= limit), "high")


# --- answers -----------------------------------------------------------------------------


DIRECT = {"type": "direct"}  # a tool_use block's caller: the model itself


def delta_usage(usage: Usage) -> dict[str, Any]:
    """Anthropic's usage as `message_delta` carries it: `input_tokens` is the prompt less what the
    provider's prompt cache read or wrote. Every field Anthropic's document requires is there, null
    where P402 has no value."""
    return {
        "input_tokens": max(0, usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens),
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "output_tokens_details": {"thinking_tokens": usage.reasoning_tokens} if usage.reasoning_tokens else None,
        "server_tool_use": None,
    }


def usage(usage: Usage) -> dict[str, Any]:
    """Anthropic's usage as a message carries it."""
    return {
        **delta_usage(usage),
        "cache_creation": {"ephemeral_5m_input_tokens": usage.cache_write_tokens, "ephemeral_1h_input_tokens": 0},
        "inference_geo": None,
        "service_tier": None,
    }


def message(response: ChatResponse) -> dict[str, Any]:
    """The answer as an Anthropic message: Anthropic's own when an Anthropic model gave it."""
    if response.native is not None:
        return response.native
    content: list[dict[str, Any]] = []
    if response.reasoning:
        content.append({"type": "thinking", "thinking": response.reasoning, "signature": ""})
    if response.content:
        content.append({"type": "text", "text": response.content, "citations": None})
    for call in response.tool_calls or ():
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        content.append({"type": "tool_use", "id": tool_use_id(call.get("id") or new_id("toolu", 12)),
                        "name": function.get("name"), "input": arguments if isinstance(arguments, dict) else {},
                        "caller": DIRECT})  # fmt: skip
    return {
        "id": _message_id(response.id),
        "type": "message",
        "role": "assistant",
        "model": response.model,
        "content": content,
        "stop_reason": STOP_REASONS.get(response.finish_reason, "end_turn"),
        "stop_sequence": None,
        "stop_details": None,
        "usage": usage(response.usage),
        "container": None,
    }


def _message_id(answer_id: str) -> str:
    return answer_id if answer_id.startswith("msg") else "msg_" + answer_id.rpartition("-")[2]


def meta_headers(meta: P402Meta | None) -> dict[str, str]:
    """P402's figures for an answer, as headers: the body stays exactly Anthropic's."""
    if meta is None:
        return {}
    return {
        "p402-provider": meta.provider,
        "p402-model": meta.model,
        "p402-cost-usd": "null" if meta.cost_usd is None else repr(meta.to_dict()["cost_usd"]),  # null: unpriced
        "p402-priced": "true" if meta.cost_usd is not None else "false",
        "p402-cached": "true" if meta.cached else "false",
        "p402-decision-id": meta.decision_id or "",
    }


# --- streams -------------------------------------------------------------------------------


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


PING = event("ping", {"type": "ping"})
MESSAGE_STOP = event("message_stop", {"type": "message_stop"})
STREAM_END = b'"message_stop"}\n\n'  # how a stream's last event ends, ours or Anthropic's own


class EventWriter:
    """Anthropic's event sequence for a stream of chat chunks from any model.

    message_start, a ping, then each content block (thinking, text, one per tool call)
    as content_block_start, its deltas and content_block_stop; message_delta with the
    stop reason and usage, and message_stop.
    """

    __slots__ = ("kind", "index", "tool", "out", "text_head")

    def __init__(self) -> None:
        self.kind: str | None = None  # the open block's type
        self.index = -1
        self.tool: int | None = None  # the chat tool call index of the open tool_use block
        self.out: list[bytes] = []
        self.text_head = b""

    def start(self, message_id: str, model: str, input_tokens: int) -> None:
        self.out.append(event("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "stop_details": None,
            "usage": usage(Usage(prompt_tokens=input_tokens)), "container": None,
        }}))  # fmt: skip
        self.out.append(PING)

    def _open(self, kind: str, block: dict[str, Any]) -> None:
        self.close()
        self.index += 1
        self.kind = kind
        self.out.append(event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                      "content_block": block}))  # fmt: skip

    def close(self) -> None:
        if self.kind is not None:
            self.out.append(event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
            self.kind = None
            self.tool = None

    def _delta(self, delta: dict[str, Any]) -> None:
        self.out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                      "delta": delta}))  # fmt: skip

    def chunk(self, chunk: ChatChunk) -> None:
        if chunk.reasoning:
            if self.kind != "thinking":
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self._delta({"type": "thinking_delta", "thinking": chunk.reasoning})
        if chunk.content:
            if self.kind != "text":
                self._open("text", {"type": "text", "text": "", "citations": None})
                self.text_head = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                                  + str(self.index).encode() + b',"delta":{"type":"text_delta","text":')
            # The usual event, written around the text's JSON: byte for byte what `_delta` makes of it.
            self.out.append(self.text_head + json_bytes(chunk.content) + b"}}\n\n")
        for call in chunk.tool_calls or ():
            if self.kind != "tool_use" or (call.index != self.tool and (call.id is not None or call.name is not None)):
                block = {"type": "tool_use", "id": tool_use_id(call.id or new_id("toolu", 12)), "name": call.name or "",
                         "input": {}, "caller": DIRECT}  # fmt: skip
                self._open("tool_use", block)
                self.tool = call.index
            if call.arguments:
                self._delta({"type": "input_json_delta", "partial_json": call.arguments})

    def finish(self, finish_reason: str | None, final: Usage | None) -> None:
        self.close()
        delta = {"stop_reason": STOP_REASONS.get(finish_reason or "stop", "end_turn"), "stop_sequence": None,
                 "stop_details": None, "container": None}  # fmt: skip
        self.out.append(event("message_delta", {"type": "message_delta", "delta": delta,
                                                "usage": delta_usage(final or Usage())}))  # fmt: skip
        self.out.append(MESSAGE_STOP)

    def take(self) -> bytes:
        out, self.out = self.out, []
        return b"".join(out)


def native_events(chunk: ChatChunk) -> bytes:
    """The upstream's own events a chunk was read from, as they came."""
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + data.encode() + b"\n\n" for name, data in chunk.native or ()
    )


async def message_events(
    stream: Any, first: list[ChatChunk] | None, durable: Callable[[str], Awaitable[None]] | None = None
) -> AsyncIterator[bytes]:
    """A stream as Anthropic's events, the events of one upstream batch in one piece.

    An Anthropic model's events are passed on as they came; any other model's chunks (and a
    cached answer's) are written as Anthropic's. With `durable`, the last piece waits for the
    ledger row's commit.
    """
    writer: EventWriter | None = None
    finish: str | None = None  # the stop reason and usage wait for the end: OpenAI's usage comes after the finish
    final: Usage | None = None
    out: list[bytes] = []
    try:
        async with stream:
            batches = stream.batches()
            batch = first
            while batch is not None:
                for chunk in batch:
                    if chunk.error is not None:
                        if writer is not None:
                            writer.close()
                            out.append(writer.take())
                        out.append(error_event(_stream_error_type(chunk.error.get("kind")),
                                               str(chunk.error.get("message") or "the stream broke")))  # fmt: skip
                        yield b"".join(out)
                        return
                    if chunk.native is not None and writer is None:
                        out.append(native_events(chunk))
                        continue
                    if writer is None:
                        writer = EventWriter()
                        prompt = stream.decision.prompt_tokens if stream.decision is not None else 0
                        writer.start(_message_id(stream.id), stream.meta.model, prompt)
                    writer.chunk(chunk)
                    if chunk.usage is not None:
                        final = chunk.usage
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                    out.append(writer.take())
                batch = await anext(batches, None)
                if batch is not None and out and finish is None:
                    yield b"".join(out)
                    out = []
            if writer is not None:
                writer.finish(finish, final)
                out.append(writer.take())
            if durable is not None:
                await durable(stream.request_id)
    except P402Error as error:
        status, kind = status_and_type(error)
        out.append(error_event(kind, error.message))
    if out:
        yield b"".join(out)


def _stream_error_type(kind: str | None) -> str:
    return {"timeout": "timeout_error", "deadline_exceeded": "timeout_error", "overloaded": "overloaded_error",
            "rate_limited": "rate_limit_error"}.get(kind or "", "api_error")  # fmt: skip


# --- errors -----------------------------------------------------------------------------------


def error_body(kind: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


def error_event(kind: str, message: str) -> bytes:
    return event("error", error_body(kind, message))


def status_and_type(error: P402Error) -> tuple[int, str]:
    """Anthropic's status and error type for one of our errors: 529 overloaded_error when no candidate could answer."""
    # Every candidate failed (or the one the request allowed was down).
    if isinstance(error, (AllAttemptsFailedError, ServerError, ConnectionLostError)):
        return 529, "overloaded_error"
    status = errors.p402_status(error)
    return status, ERROR_TYPES.get(status, "api_error")


def upstream_headers(headers: Any) -> dict[str, str]:
    """The request headers an Anthropic model's upstream gets as they came: `anthropic-beta` (the betas
    a body's beta fields need; given twice, joined as Anthropic reads a list) and `anthropic-version`."""
    out: dict[str, str] = {}
    betas = headers.getlist("anthropic-beta")
    if betas:
        out["anthropic-beta"] = ",".join(betas)
    version = headers.get("anthropic-version")
    if version:
        out["anthropic-version"] = version
    return out
