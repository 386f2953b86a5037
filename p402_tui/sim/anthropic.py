"""Anthropic's Messages API, simulated: `POST /v1/messages` and `GET /v1/models`.

Requests are checked the way the real API checks them (headers, required fields,
role order, tool_use / tool_result pairing, limits from the catalog) and refused
in Anthropic's error shape `{"type": "error", "error": {"type", "message"}}`.
Answers come from the engine; this module only speaks the wire format, including
the named-event SSE sequence and prompt caching for blocks marked `cache_control`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.catalog import ModelSpec, ProviderSpec
from ..core.tokens import count_text
from .engine import (
    LARGE_PROMPT_CHARS,
    UNPACED_BATCH,
    Answer,
    Fault,
    SimDisconnect,
    SimState,
    json_fragments,
    key_is_known,
)
from .server import Invalid, SimStream, hang_until_disconnect, whole_answer, words_asked

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
        "mcp_servers", "context_management", "cache_control", "diagnostics", "inference_geo", "speed",
        "user_profile_id", "workspace_id",
    }
)  # fmt: skip
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
USER_BLOCKS = frozenset({"text", "image", "document", "tool_result", "search_result"})
ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking", "server_tool_use"})
COUNT_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "output_config", "context_management"}
)
# The usage fields a message_delta event carries (a message's usage has three more).
DELTA_USAGE = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens",
               "output_tokens_details", "server_tool_use")
# Headers the stats record as received (`GET /_sim/stats`): what a gateway passed on is seen there.
RECORDED_HEADERS = ("anthropic-beta", "anthropic-version")
CACHE_MIN_TOKENS = 1024  # shorter prefixes are not cached (Anthropic's prompt-caching docs)
CACHE_TTL_S = 300.0
CACHE_MAX_ENTRIES = 10_000  # expired prefixes are dropped when the cache reaches this size
EMPTY_MESSAGE = "messages.{i}: all messages must have non-empty content except for the optional final assistant message"


def routes(state: SimState, provider: ProviderSpec) -> list[Route]:
    api = MessagesAPI(state, provider)
    return [
        Route("/v1/messages", api.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", api.count_tokens, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
    ]


def _refuse_key(request: Request) -> Response | None:
    """Anthropic's 401 for a missing or unknown key: `x-api-key`, or `Authorization: Bearer` (newer SDKs send it so)."""
    key = request.headers.get("x-api-key", "")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not key and scheme.lower() == "bearer":
        key = token
    if not key.strip():
        return error(401, "authentication_error", "x-api-key header is required")
    if not key_is_known(key):
        return error(401, "authentication_error", "invalid x-api-key")
    return None


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers={"request-id": request_id, **(headers or {})})


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


PING = _event("ping", {"type": "ping"})
MESSAGE_STOP = _event("message_stop", {"type": "message_stop"})


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
        refusal = _refuse_key(request)
        if refusal is not None:
            return refusal
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
        refusal = _refuse_key(request)
        if refusal is not None:
            return refusal
        model_id = request.path_params["model_id"]
        spec = self.state.model_spec(self.provider.id, model_id)
        if spec is None:
            return error(404, "not_found_error", f"model: {model_id}")
        return JSONResponse(self._model_entry(spec))

    # --- /v1/messages -----------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        refusal = _refuse_key(request)
        if refusal is not None:
            return refusal
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
        if _thinks(body) and "reasoning" not in spec.capabilities:
            return error(400, "invalid_request_error", f"'{model}' does not support thinking.")
        self.state.record_call(provider, model)
        self.state.record_headers(request.headers, RECORDED_HEADERS)

        parts = prompt_parts(body)
        if sum(len(text) for text, _ in parts) > LARGE_PROMPT_CHARS:
            turn, usage = await asyncio.to_thread(self._answer, request, body, spec, parts)
        else:
            turn, usage = self._answer(request, body, spec, parts)
        if usage is None:
            return error(
                400,
                "invalid_request_error",
                f"prompt is too long: {turn.answer.prompt_tokens} tokens > {spec.context_window} maximum",
            )

        fault = self.state.fault_for(provider, model)
        streaming = bool(body.get("stream"))
        if fault is not None and fault.refuses(streaming):
            return await _refuse(request, fault)
        reply = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "stop_details": None,
            "usage": usage,
            "container": None,
        }
        headers = {"request-id": f"req_{uuid.uuid4().hex[:24]}"}
        if streaming:
            events = self._stream(reply, turn, fault)
            return SimStream(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
        await self.state.full_latency(provider, model, sum(len(block.pieces) for block in turn.blocks))
        reply.update(
            content=[block.whole_shape for block in turn.blocks],
            stop_reason=turn.stop_reason,
            stop_sequence=turn.stop_sequence,
        )
        return whole_answer(reply, fault, headers)

    async def count_tokens(self, request: Request) -> Response:
        """`{"input_tokens": N}`: the prompt's texts (and tool definitions) as the simulator counts them."""
        refusal = _refuse_key(request)
        if refusal is not None:
            return refusal
        self.state.record_headers(request.headers, RECORDED_HEADERS)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "invalid_request_error", "There was an error parsing the body of your request")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return error(400, "invalid_request_error", "messages: Field required")
        extra = sorted(set(body) - COUNT_FIELDS)
        if extra:
            return error(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted")
        model = body.get("model")
        if not isinstance(model, str) or self.state.model_spec(self.provider.id, model) is None:
            return error(404, "not_found_error", f"model: {model}")
        try:
            texts = [text for text, _ in prompt_parts(body)]
        except (KeyError, TypeError, AttributeError):
            return error(400, "invalid_request_error", "messages: Input should be a valid list of messages")
        if body.get("tools"):
            texts.append(json.dumps(body["tools"]))
        tokens = sum(count_text(text).tokens for text in texts) + 3 * len(body["messages"])
        return JSONResponse({"input_tokens": tokens})

    def _answer(
        self, request: Request, body: dict[str, Any], spec: ModelSpec, parts: list[tuple[str, bool]]
    ) -> tuple[Turn, dict[str, Any] | None]:
        """The turn and its usage; no usage (and no cache write) when the prompt does not fit."""
        turn = self._turn(request, body, spec, "\n".join(text for text, _ in parts))
        if turn.answer.prompt_tokens > spec.context_window:
            return turn, None
        return turn, self._usage(spec.model, parts, turn)

    def _turn(self, request: Request, body: dict[str, Any], spec: ModelSpec, prompt_text: str) -> Turn:
        """The engine's answer to a checked body: optional thinking, then words or one tool call."""
        provider, model = self.provider.id, spec.model
        budget = body["max_tokens"]
        thinking = None
        if _thinks(body):
            limit = body["thinking"].get("budget_tokens") or budget // 2
            thinking = self.state.answer(provider, model, f"think: {prompt_text}", max_tokens=min(limit, budget - 1))
            budget -= thinking.completion_tokens
        tools = [{"name": t["name"], "parameters": t.get("input_schema")} for t in body.get("tools") or ()]
        choice = body.get("tool_choice") or {"type": "auto"}
        call_tool = None
        if tools and choice["type"] != "none" and not _answers_tool_use(body["messages"]):
            call_tool = choice["name"] if choice["type"] == "tool" else tools[0]["name"]
        json_mode, schema = _json_wanted(body)
        if json_mode and call_tool is None:
            answer = self.state.json_answer(provider, model, prompt_text, schema)
        else:
            answer = self.state.answer(
                provider,
                model,
                prompt_text,
                max_tokens=max(budget, 1),
                tools=tools,
                call_tool=call_tool,
                words=words_asked(request),
            )
        stop_reason, stop_sequence = STOP_REASONS[answer.finish_reason], None
        if answer.tool_call is None and body.get("stop_sequences"):
            answer, stop_sequence = answer.cut_at_stop(body["stop_sequences"])
            if stop_sequence is not None:
                stop_reason = "stop_sequence"
        blocks = [] if thinking is None else [Block.thinking(thinking)]
        blocks.append(Block.tool_use(answer.tool_call) if answer.tool_call is not None else Block.text(answer))
        return Turn(answer, thinking, blocks, stop_reason, stop_sequence)

    def _usage(self, model: str, parts: list[tuple[str, bool]], turn: Turn) -> dict[str, Any]:
        """Input split into fresh, cache-read and cache-written tokens, as prompt caching reports it."""
        read = written = 0
        marked = max((i for i, (_, mark) in enumerate(parts) if mark), default=-1)
        if marked >= 0:
            prefix = "\n".join(text for text, _ in parts[: marked + 1])
            tokens = min(count_text(prefix).tokens, turn.answer.prompt_tokens)
            if tokens >= CACHE_MIN_TOKENS:
                now = time.monotonic()
                key = hashlib.sha256(f"{model}\n{prefix}".encode()).hexdigest()
                if self.cache.get(key, 0.0) > now:
                    read = tokens
                else:
                    written = tokens
                    if len(self.cache) >= CACHE_MAX_ENTRIES:
                        self.cache = {k: expiry for k, expiry in self.cache.items() if expiry > now}
                self.cache[key] = now + CACHE_TTL_S
        thought = turn.thinking.completion_tokens if turn.thinking is not None else 0
        # Every field Anthropic's published document requires, null where the real API sends null.
        usage: dict[str, Any] = {
            "input_tokens": turn.answer.prompt_tokens - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0},
            "output_tokens": turn.answer.completion_tokens + thought,
            "output_tokens_details": None if turn.thinking is None else {"thinking_tokens": thought},
            "server_tool_use": None,
            "service_tier": "standard",
            "inference_geo": None,
        }
        return usage

    async def _stream(self, reply: dict[str, Any], turn: Turn, fault: Fault | None) -> AsyncIterator[bytes]:
        """The named-event SSE body; faults strike between pieces, as a real stream breaks mid-answer."""
        units = _stream_units(turn.blocks)
        late = fault if fault is not None and fault.written_in_stream else None
        if late is not None:
            units = units[: late.after_tokens]
        batch = 1 if self.state.latency else UNPACED_BATCH
        with self.state.track_stream() as tracker:
            start = {**reply, "usage": {**reply["usage"], "output_tokens": 1, "output_tokens_details": None}}
            yield _event("message_start", {"type": "message_start", "message": start}) + turn.blocks[0].start(0) + PING
            frames: list[bytes] = []
            try:
                async for unit in self.state.paced(self.provider.id, reply["model"], units, fault):
                    frames.append(unit.encode())
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
                message_delta = {
                    "type": "message_delta",
                    "delta": {"stop_reason": turn.stop_reason, "stop_sequence": turn.stop_sequence, "stop_details": None,
                              "container": None},
                    "usage": {k: reply["usage"][k] for k in DELTA_USAGE},
                }
                last = len(turn.blocks) - 1
                frames += [turn.blocks[last].end(last), _event("message_delta", message_delta), MESSAGE_STOP]
            yield b"".join(frames)


@dataclass(slots=True)
class Block:
    """One content block of an answer, whole (non-streamed) or as streamed pieces."""

    start_shape: dict[str, Any]
    whole_shape: dict[str, Any]
    pieces: list[str]
    delta_type: str
    delta_field: str
    signature: str | None = None

    @classmethod
    def text(cls, answer: Answer) -> Block:
        # Every block streams at least one delta, so its start and stop frames have a piece to ride on.
        pieces = answer.pieces or [""]
        start = {"type": "text", "text": "", "citations": None}
        return cls(start, {**start, "text": answer.text}, pieces, "text_delta", "text")

    @classmethod
    def thinking(cls, answer: Answer) -> Block:
        signature = base64.b64encode(hashlib.sha256(answer.text.encode()).digest()).decode()
        return cls(
            {"type": "thinking", "thinking": "", "signature": ""},
            {"type": "thinking", "thinking": answer.text, "signature": signature},
            answer.pieces or [""],
            "thinking_delta",
            "thinking",
            signature,
        )

    @classmethod
    def tool_use(cls, call: dict[str, Any]) -> Block:
        tool_id, arguments = _tool_use_id(call["id"]), json.loads(call["arguments"])
        pieces = json_fragments(json.dumps(arguments))  # spaced like the real API's partial_json
        shape = {"type": "tool_use", "id": tool_id, "name": call["name"], "caller": {"type": "direct"}}
        return cls({**shape, "input": {}}, {**shape, "input": arguments}, pieces, "input_json_delta", "partial_json")

    def start(self, index: int) -> bytes:
        start = {"type": "content_block_start", "index": index, "content_block": self.start_shape}
        return _event("content_block_start", start)

    def end(self, index: int) -> bytes:
        out = b""
        if self.signature is not None:
            delta = {"type": "signature_delta", "signature": self.signature}
            out = _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        return out + _event("content_block_stop", {"type": "content_block_stop", "index": index})

    def delta_prefix(self, index: int) -> str:
        return (
            f'event: content_block_delta\ndata: {{"type":"content_block_delta","index":{index},'
            f'"delta":{{"type":"{self.delta_type}","{self.delta_field}":'
        )


@dataclass(slots=True)
class Turn:
    answer: Answer
    thinking: Answer | None
    blocks: list[Block]
    stop_reason: str
    stop_sequence: str | None


def _stream_units(blocks: list[Block]) -> list[str]:
    """One SSE text per paced piece; a block's first piece also closes the block before it and opens its own."""
    units: list[str] = []
    for index, block in enumerate(blocks):
        prefix = block.delta_prefix(index)
        opening = "" if index == 0 else (blocks[index - 1].end(index - 1) + block.start(index)).decode()
        for n, piece in enumerate(block.pieces):
            # Built by hand: one per streamed piece, and only the piece changes.
            units.append((opening if n == 0 else "") + prefix + json.dumps(piece) + "}}\n\n")
    return units


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
    _check_output_config(body.get("output_config"))
    _check_tools(body.get("tools"), body.get("tool_choice"))
    _check_thinking(body)
    _check_messages(body["messages"])


def _thinks(body: dict[str, Any]) -> bool:
    return isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive")


def _check_thinking(body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise Invalid("thinking: Input tag found using 'type' does not match any of the expected tags")
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            raise Invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if body["max_tokens"] <= budget:
            raise Invalid("`max_tokens` must be greater than `thinking.budget_tokens`")
    if not _thinks(body):
        return
    if body.get("temperature") not in (None, 1):
        raise Invalid("`temperature` may only be set to 1 when thinking is enabled or in adaptive mode.")
    if body.get("top_p") is not None and body["top_p"] < 0.95:
        raise Invalid("`top_p` must be greater than or equal to 0.95 or unset when thinking is enabled.")
    if body.get("top_k") is not None:
        raise Invalid("`top_k` must be unset when thinking is enabled.")
    if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
        raise Invalid("Thinking may not be enabled when tool_choice forces tool use.")


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise Invalid("system: Input should be a valid string or list of text blocks")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise Invalid(f"system.{i}: Input should be a text block")


def _check_output_config(config: Any) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise Invalid("output_config: Input should be a valid dictionary")
    extra = sorted(set(config) - {"format", "effort"})
    if extra:
        raise Invalid(f"output_config.{extra[0]}: Extra inputs are not permitted")
    fmt = config.get("format")
    if fmt is not None and (
        not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)
    ):
        raise Invalid("output_config.format: Input should be {'type': 'json_schema', 'schema': {...}}")


# A system prompt that tells the model to answer in JSON (the only JSON mode older models have).
_JSON_ASKED = re.compile(r"\b(answer|respond|reply|output)\b[^.]*\bJSON\b", re.IGNORECASE)


def _json_wanted(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """Whether the answer must be JSON, and the schema it must fit: structured output, or asked for in words."""
    fmt = (body.get("output_config") or {}).get("format")
    if fmt is not None:
        return True, fmt["schema"]
    system = body.get("system")
    text = system if isinstance(system, str) else " ".join(b["text"] for b in system or ())
    return bool(_JSON_ASKED.search(text)), None


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
                f'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
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
            raise Invalid(EMPTY_MESSAGE.format(i=i))
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise Invalid(f"messages.{i}.content: Input should be a valid string or list of content blocks")
    if not content and not last_assistant:
        raise Invalid(EMPTY_MESSAGE.format(i=i))
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
                f"{where}.image.source.base64.media_type: "
                "Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
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
    if body.get("cache_control") and parts:  # top-level cache_control marks the last cacheable block
        parts[-1] = (parts[-1][0], True)
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


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


async def _refuse(request: Request, fault: Fault) -> Response:
    """What a fault sends in place of the answer (see `Fault.refuses`)."""
    if fault.kind == "rate_limit":
        reset = datetime.now(timezone.utc) + timedelta(seconds=fault.wait_s)
        headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0"}
        if fault.wait_hint:
            headers["retry-after"] = f"{fault.wait_s:g}"
            headers["anthropic-ratelimit-requests-reset"] = reset.isoformat().replace("+00:00", "Z")
        message = "This request would exceed your organization's rate limit of 50 requests per minute"
        return error(429, "rate_limit_error", message, headers)
    if fault.kind == "timeout":
        await hang_until_disconnect(request)
        return Response(status_code=504)
    status = fault.status or 500
    kind, message = FAULT_ERRORS.get(status, ("api_error", "Internal server error"))
    headers = {"retry-after": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else None
    return error(status, kind, message, headers)


def _late_fault(fault: Fault) -> bytes:
    """What a stream sends when a fault strikes after it began."""
    if fault.kind == "malformed":
        return b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"te\n\n'
    kind, message = FAULT_ERRORS.get(fault.status or 500, ("api_error", "Internal server error"))
    return _event("error", {"type": "error", "error": {"type": kind, "message": message}})
