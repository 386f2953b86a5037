"""Anthropic's Messages API, simulated: `POST /v1/messages` and `GET /v1/models`.

Requests are checked the way the real API checks them (headers, required fields,
role order, tool_use / tool_result pairing, limits from the catalog) and refused
in Anthropic's error shape `{"type": "error", "error": {"type", "message"}}`.
Answers come from the engine; this module only speaks the wire format, including
the named-event SSE sequence and prompt caching for blocks marked `cache_control`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.catalog import ModelSpec, ProviderSpec
from ..core.tokens import count_text
from .engine import Answer, Fault, SimDisconnect, SimState
from .server import SimStream, hang_until_disconnect

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
FAULT_ERRORS = {
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
BODY_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k",
        "tools", "tool_choice", "metadata", "thinking", "service_tier", "output_config", "container",
        "mcp_servers", "context_management",
    }
)  # fmt: skip
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
USER_BLOCKS = frozenset({"text", "image", "document", "tool_result", "search_result"})
ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking", "server_tool_use"})
CACHE_MIN_TOKENS = 1024  # shorter prefixes are not cached (Anthropic's prompt-caching docs)
CACHE_TTL_S = 300.0
LARGE_PROMPT_CHARS = 50_000  # counting more than this off the event loop
JSON_PIECE_CHARS = 12
UNPACED_BATCH = 64  # pieces per write when latency is off, as a server flushing its buffer


class Invalid(Exception):
    """The body breaks one of the API's rules; the message is what the API would say."""


def routes(state: SimState, provider: ProviderSpec) -> list[Route]:
    api = MessagesAPI(state, provider)
    return [
        Route("/v1/messages", api.messages, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
    ]


def _has_key(request: Request) -> bool:
    """An `x-api-key`, or `Authorization: Bearer` (newer SDKs send the API key that way)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return bool(request.headers.get("x-api-key")) or (scheme.lower() == "bearer" and bool(token.strip()))


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers={"request-id": request_id, **(headers or {})})


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _text_delta(piece: str) -> bytes:
    # Built by hand: this is one per streamed piece, and the rest of the event never changes.
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":' + json.dumps(piece).encode() + b"}}\n\n"
    )


def _json_delta(piece: str) -> bytes:
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"input_json_delta","partial_json":' + json.dumps(piece).encode() + b"}}\n\n"
    )


PING = _event("ping", {"type": "ping"})
MESSAGE_STOP = _event("message_stop", {"type": "message_stop"})
BLOCK_STOP = _event("content_block_stop", {"type": "content_block_stop", "index": 0})


class MessagesAPI:
    def __init__(self, state: SimState, provider: ProviderSpec) -> None:
        self.state = state
        self.provider = provider
        self.cache: dict[str, float] = {}  # hash of model + cached prefix -> expiry (monotonic)

    # --- /v1/models -------------------------------------------------------------

    def _model_entry(self, spec: ModelSpec) -> dict[str, Any]:
        return {
            "id": spec.model,
            "type": "model",
            "display_name": spec.name,
            "created_at": f"{self.state.catalog.checked_on}T00:00:00Z",
        }

    async def models(self, request: Request) -> Response:
        if not _has_key(request):
            return error(401, "authentication_error", "x-api-key header is required")
        specs = self.state.catalog.models_of(self.provider.id)
        ids = [s.model for s in specs]
        params = request.query_params
        try:
            limit = int(params.get("limit", "20"))
        except ValueError:
            return error(400, "invalid_request_error", "limit: Input should be a valid integer")
        if not 1 <= limit <= 1000:
            return error(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
        start, end = 0, len(specs)
        if params.get("after_id") in ids:
            start = ids.index(params["after_id"]) + 1
        if params.get("before_id") in ids:
            end = ids.index(params["before_id"])
            start = max(start, end - limit)
        page = specs[start : min(end, start + limit)]
        return JSONResponse(
            {
                "data": [self._model_entry(s) for s in page],
                "has_more": start + len(page) < end,
                "first_id": page[0].model if page else None,
                "last_id": page[-1].model if page else None,
            }
        )

    async def model(self, request: Request) -> Response:
        if not _has_key(request):
            return error(401, "authentication_error", "x-api-key header is required")
        model_id = request.path_params["model_id"]
        spec = self.state.model_spec(self.provider.id, model_id)
        if spec is None:
            return error(404, "not_found_error", f"model: {model_id}")
        return JSONResponse(self._model_entry(spec))

    # --- /v1/messages -----------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        if not _has_key(request):
            return error(401, "authentication_error", "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "invalid_request_error", "There was an error parsing the body of your request")
        try:
            validate(body)
        except Invalid as problem:
            return error(400, "invalid_request_error", str(problem))
        provider, model = self.provider.id, body["model"]
        spec = self.state.model_spec(provider, model)
        if spec is None:
            return error(404, "not_found_error", f"model: {model}")
        if body["max_tokens"] > spec.max_output_tokens:
            return error(
                400,
                "invalid_request_error",
                f"max_tokens: {body['max_tokens']} > {spec.max_output_tokens}, which is the maximum allowed "
                f"number of output tokens for {model}",
            )
        self.state.record_call(provider, model)

        parts = prompt_parts(body)
        prompt_text = "\n".join(text for text, _ in parts)
        tools = [{"name": t["name"], "parameters": t.get("input_schema")} for t in body.get("tools") or ()]
        choice = body.get("tool_choice") or {"type": "auto"}
        call_tool = None
        if tools and choice["type"] != "none" and not _answers_tool_use(body["messages"]):
            call_tool = choice["name"] if choice["type"] == "tool" else tools[0]["name"]
        answer_args = (provider, model, prompt_text)
        answer_kw = {"max_tokens": body["max_tokens"], "tools": tools, "call_tool": call_tool}
        if len(prompt_text) > LARGE_PROMPT_CHARS:
            answer = await asyncio.to_thread(self.state.answer, *answer_args, **answer_kw)
        else:
            answer = self.state.answer(*answer_args, **answer_kw)
        if answer.prompt_tokens > spec.context_window:
            return error(
                400,
                "invalid_request_error",
                f"prompt is too long: {answer.prompt_tokens} tokens > {spec.context_window} maximum",
            )
        stop_reason, stop_sequence = STOP_REASONS[answer.finish_reason], None
        if answer.tool_call is None and body.get("stop_sequences"):
            answer, stop_sequence = _cut_at_stop(answer, body["stop_sequences"])
            if stop_sequence is not None:
                stop_reason = "stop_sequence"
        usage = self._usage(model, parts, answer)

        fault = self.state.fault_for(provider, model)
        streaming = bool(body.get("stream"))
        if fault is not None:
            refusal = await self._refuse(request, fault, streaming)
            if refusal is not None:
                return refusal
        reply = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        headers = {"request-id": f"req_{uuid.uuid4().hex[:24]}"}
        if streaming:
            events = self._stream(reply, answer, stop_reason, stop_sequence, fault)
            return SimStream(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
        await self.state.full_latency(provider, model, len(answer.pieces) or 1)
        reply.update(content=_content(answer), stop_reason=stop_reason, stop_sequence=stop_sequence)
        if fault is not None and fault.kind in ("malformed", "disconnect"):
            return _broken_body(json.dumps(reply).encode(), fault)
        return JSONResponse(reply, headers=headers)

    async def _refuse(self, request: Request, fault: Fault, streaming: bool) -> Response | None:
        """The answer a fault gives before any content, or None when it strikes later."""
        if fault.kind == "rate_limit":
            wait = fault.retry_after_s if fault.retry_after_s is not None else 1.0
            reset = datetime.now(timezone.utc) + timedelta(seconds=wait)
            headers = {
                "retry-after": f"{wait:g}",
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": reset.isoformat().replace("+00:00", "Z"),
            }
            message = "This request would exceed your organization's rate limit of 50 requests per minute"
            return error(429, "rate_limit_error", message, headers)
        if fault.kind == "error" and not (streaming and fault.after_tokens):
            status = fault.status or 500
            kind, message = FAULT_ERRORS.get(status, ("api_error", "Internal server error"))
            headers = {"retry-after": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else None
            return error(status, kind, message, headers)
        if fault.kind == "timeout" and not streaming:
            await hang_until_disconnect(request)
            return Response(status_code=504)
        return None

    def _usage(self, model: str, parts: list[tuple[str, bool]], answer: Answer) -> dict[str, int]:
        """Input split into fresh, cache-read and cache-written tokens, as prompt caching reports it."""
        read = written = 0
        marked = max((i for i, (_, mark) in enumerate(parts) if mark), default=-1)
        if marked >= 0:
            prefix = "\n".join(text for text, _ in parts[: marked + 1])
            tokens = min(count_text(prefix).tokens, answer.prompt_tokens)
            if tokens >= CACHE_MIN_TOKENS:
                now = time.monotonic()
                key = hashlib.sha256(f"{model}\n{prefix}".encode()).hexdigest()
                if self.cache.get(key, 0.0) > now:
                    read = tokens
                else:
                    written = tokens
                self.cache[key] = now + CACHE_TTL_S
        return {
            "input_tokens": answer.prompt_tokens - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": answer.completion_tokens,
            "service_tier": "standard",
        }

    async def _stream(
        self,
        reply: dict[str, Any],
        answer: Answer,
        stop_reason: str,
        stop_sequence: str | None,
        fault: Fault | None,
    ) -> AsyncIterator[bytes]:
        """The named-event SSE body; faults strike between pieces, as a real stream breaks mid-answer."""
        if answer.tool_call is not None:
            call = answer.tool_call
            block = {"type": "tool_use", "id": _tool_use_id(call["id"]), "name": call["name"], "input": {}}
            arguments = json.dumps(json.loads(call["arguments"]))
            pieces = [arguments[i : i + JSON_PIECE_CHARS] for i in range(0, len(arguments), JSON_PIECE_CHARS)]
            delta = _json_delta
        else:
            block, pieces, delta = {"type": "text", "text": ""}, answer.pieces, _text_delta
        late = fault if fault is not None and fault.kind in ("malformed", "error") else None
        if late is not None:
            pieces = pieces[: late.after_tokens]
        batch = 1 if self.state.latency else UNPACED_BATCH
        with self.state.track_stream() as tracker:
            start = {**reply, "usage": {**reply["usage"], "output_tokens": 1}}
            yield (
                _event("message_start", {"type": "message_start", "message": start})
                + _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
                + PING
            )
            frames: list[bytes] = []
            try:
                async for piece in self.state.paced(self.provider.id, reply["model"], pieces, fault):
                    frames.append(delta(piece))
                    if len(frames) >= batch:
                        yield b"".join(frames)
                        frames.clear()
            except SimDisconnect:
                if frames:
                    yield b"".join(frames)
                raise
            if late is not None:
                tracker.broken = True
                frames.append(_late_fault(late))
            else:
                usage = {k: v for k, v in reply["usage"].items() if k != "service_tier"}
                message_delta = {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": usage,
                }
                frames += [BLOCK_STOP, _event("message_delta", message_delta), MESSAGE_STOP]
            yield b"".join(frames)


# --- request checks ---------------------------------------------------------------


def validate(body: Any) -> None:
    """Raise Invalid with the API's words for the first rule the body breaks."""
    if not isinstance(body, dict):
        raise Invalid("body: Input should be a valid dictionary")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise Invalid(f"{name}: Field required")
    extra = sorted(set(body) - BODY_FIELDS)
    if extra:
        raise Invalid(f"{extra[0]}: Extra inputs are not permitted")
    if not isinstance(body["model"], str) or not body["model"]:
        raise Invalid("model: Input should be a valid string")
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise Invalid("max_tokens: Input should be greater than or equal to 1")
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int | float) or not 0 <= value <= 1):
            raise Invalid(f"{name}: Input should be less than or equal to 1")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise Invalid("stop_sequences: Input should be a valid list of non-empty strings")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise Invalid("stream: Input should be a valid boolean")
    _check_system(body.get("system"))
    _check_tools(body.get("tools"), body.get("tool_choice"))
    _check_messages(body["messages"])


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise Invalid("system: Input should be a valid string or list of text blocks")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise Invalid(f"system.{i}: Input should be a text block")


def _check_tools(tools: Any, choice: Any) -> None:
    if tools is not None:
        if not isinstance(tools, list):
            raise Invalid("tools: Input should be a valid list")
        names = set()
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise Invalid(f"tools.{i}.name: Field required")
            name = tool["name"]
            if not name or len(name) > 128 or not all(c.isalnum() or c in "_-" for c in name):
                raise Invalid(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
            if name in names:
                raise Invalid("tools: Tool names must be unique.")
            names.add(name)
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise Invalid(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise Invalid("tool_choice: Input tag found using 'type' does not match any of the expected tags")
    if not tools:
        raise Invalid("tool_choice: tool_choice may only be specified while providing tools")
    if choice["type"] == "tool" and choice.get("name") not in {t["name"] for t in tools}:
        raise Invalid(f"tool_choice.tool.name: tool {choice.get('name')!r} is not among the tools given")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: at least one message is required")
    previous_role = None
    pending: set[str] = set()  # tool_use ids the next user turn must answer
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Invalid(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role == "system":
            raise Invalid(
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
                'not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            raise Invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if role == previous_role:
            raise Invalid(
                f'messages: roles must alternate between "user" and "assistant", but found multiple "{role}" roles in a row'
            )
        previous_role = role
        blocks = _blocks(message.get("content"), i, last_assistant=role == "assistant" and i == len(messages) - 1)
        allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
        for j, block in enumerate(blocks):
            if block["type"] not in allowed:
                raise Invalid(f"messages.{i}.content.{j}.type: a {role} message cannot hold a {block['type']!r} block")
        if role == "user":
            results = {b.get("tool_use_id") for b in blocks if b["type"] == "tool_result"}
            missing, unexpected = pending - results, results - pending
            if missing:
                raise Invalid(
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(sorted(missing))}. Each `tool_use` block must have a corresponding `tool_result` "
                    "block in the next message."
                )
            if unexpected:
                raise Invalid(
                    f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{', '.join(sorted(map(str, unexpected)))}. Each `tool_result` block must have a corresponding "
                    "`tool_use` block in the previous message."
                )
            pending = set()
        else:
            pending = {b.get("id") for b in blocks if b["type"] == "tool_use"}
    # A final assistant turn with tool_use blocks is fine: it is a prefill.


def _blocks(content: Any, i: int, *, last_assistant: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):
        if not content and not last_assistant:
            raise Invalid(f"messages.{i}: all messages must have non-empty content except for the optional final assistant message")
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise Invalid(f"messages.{i}.content: Input should be a valid string or list of content blocks")
    if not content and not last_assistant:
        raise Invalid(f"messages.{i}: all messages must have non-empty content except for the optional final assistant message")
    for j, block in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise Invalid(f"{where}: Input should be a valid content block")
        kind = block["type"]
        if kind == "text":
            if not isinstance(block.get("text"), str) or not block["text"]:
                raise Invalid("messages: text content blocks must be non-empty")
        elif kind == "image":
            _check_image(block.get("source"), where)
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise Invalid(f"{where}.tool_use: id and name are required")
            if not isinstance(block.get("input"), dict):
                raise Invalid(f"{where}.tool_use.input: Input should be a valid dictionary")
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise Invalid(f"{where}.tool_result.tool_use_id: Field required")
    return content


def _check_image(source: Any, where: str) -> None:
    if not isinstance(source, dict):
        raise Invalid(f"{where}.image.source: Field required")
    if source.get("type") == "base64":
        if source.get("media_type") not in IMAGE_TYPES:
            raise Invalid(
                f"{where}.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
            )
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise Invalid(f"{where}.image.source.base64.data: Field required")
    elif source.get("type") == "url":
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("http://", "https://")):
            raise Invalid(f"{where}.image.source.url.url: Input should be an http(s) URL")
    else:
        raise Invalid(f"{where}.image.source: Input tag found using 'type' does not match any of the expected tags")


# --- answers ------------------------------------------------------------------------


def prompt_parts(body: dict[str, Any]) -> list[tuple[str, bool]]:
    """The prompt's texts in order, each flagged when it carries a `cache_control` mark."""
    parts: list[tuple[str, bool]] = []
    system = body.get("system")
    if isinstance(system, str):
        if system:
            parts.append((system, False))
    elif system:
        parts.extend((b["text"], "cache_control" in b) for b in system)
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            parts.append((content, False))
            continue
        for block in content:
            kind, marked = block["type"], "cache_control" in block
            if kind == "text":
                parts.append((block["text"], marked))
            elif kind == "tool_use":
                parts.append((json.dumps(block["input"]), marked))
            elif kind == "tool_result":
                parts.append((_result_text(block.get("content")), marked))
    return parts


def _result_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return content if isinstance(content, str) else ""


def _answers_tool_use(messages: list[dict[str, Any]]) -> bool:
    """Whether the last user turn hands back tool results (then the model answers in words)."""
    for message in reversed(messages):
        if message["role"] == "user":
            content = message["content"]
            return isinstance(content, list) and any(b["type"] == "tool_result" for b in content)
    return False


def _cut_at_stop(answer: Answer, stops: list[str]) -> tuple[Answer, str | None]:
    """The answer up to the first stop sequence, and which one stopped it."""
    hits = [(answer.text.find(s), s) for s in stops if s in answer.text]
    if not hits:
        return answer, None
    cut, sequence = min(hits)
    pieces: list[str] = []
    length = 0
    for piece in answer.pieces:
        if length + len(piece) >= cut:
            if cut > length:
                pieces.append(piece[: cut - length])
            break
        pieces.append(piece)
        length += len(piece)
    text = answer.text[:cut]
    return Answer(text, pieces, answer.prompt_tokens, count_text(text).tokens, None, "stop"), sequence


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _content(answer: Answer) -> list[dict[str, Any]]:
    if answer.tool_call is not None:
        call = answer.tool_call
        return [
            {
                "type": "tool_use",
                "id": _tool_use_id(call["id"]),
                "name": call["name"],
                "input": json.loads(call["arguments"]),
            }
        ]
    return [{"type": "text", "text": answer.text}]


def _late_fault(fault: Fault) -> bytes:
    """What a stream sends when a fault strikes after it began."""
    if fault.kind == "malformed":
        return b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_del\n\n'
    kind, message = FAULT_ERRORS.get(fault.status or 500, ("api_error", "Internal server error"))
    return _event("error", {"type": "error", "error": {"type": kind, "message": message}})


def _broken_body(body: bytes, fault: Fault) -> Response:
    """A non-streamed answer cut short: truncated JSON (malformed) or a dropped connection (disconnect)."""
    half = body[: len(body) // 2]
    if fault.kind == "malformed":
        return Response(half, media_type="application/json")

    async def drop() -> AsyncIterator[bytes]:
        yield half
        raise SimDisconnect()

    return SimStream(drop(), media_type="application/json", headers={"content-length": str(len(body))})
