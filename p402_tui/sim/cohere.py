"""Cohere's v2 API, simulated: `POST /v2/chat`, `POST /v2/embed`, `GET /v1/models`.

Requests are checked the way the real API checks them (Bearer key, unknown fields,
roles, tool results that answer no tool call, `p` and `k` ranges, limits from the
catalog) and refused in Cohere's shape `{"id", "message"}`; a rejected key
(`engine.key_is_known`) is a 401 "invalid api token".

Answers come from the engine. Usage has Cohere's two counts: `billed_units` without
the preamble Cohere prepends to every prompt, and `tokens` with it. Streams are SSE
with an `event:` line and a `data:` line per event, in the real order: message-start,
content-start, content-delta..., content-end (or tool-plan-delta..., tool-call-start,
tool-call-delta..., tool-call-end), message-end with finish_reason and usage.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.catalog import ModelSpec, ProviderSpec
from ..core.tokens import count_text
from .engine import LARGE_PROMPT_CHARS, Answer, Fault, SimState, json_fragments, key_is_known, word_vector
from .server import Invalid, SimStream, hang_until_disconnect, whole_answer, words_asked

# Tokens of the system preamble Cohere puts before every prompt: counted in `tokens`, not billed.
PREAMBLE_TOKENS = 165
EMBEDDING_DIMS = {"embed-v4.0": 1536}  # the v3 models are 1024
EMBEDDING_TYPES = ("float", "int8", "uint8")
EMBED_BATCH = 96  # texts per call
INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")

FINISH_REASONS = {"stop": "COMPLETE", "length": "MAX_TOKENS", "tool_calls": "TOOL_CALL"}
FAULT_ERRORS = {
    500: (500, "internal server error, this has been reported to our developers"),
    502: (502, "bad gateway"),
    503: (503, "service unavailable"),
    504: (504, "gateway timeout"),
    529: (503, "service unavailable"),  # Cohere has no 529; overload is 503
}
CHAT_FIELDS = frozenset(
    {"model", "messages", "tools", "strict_tools", "documents", "citation_options", "response_format", "safety_mode",
     "max_tokens", "stop_sequences", "temperature", "seed", "frequency_penalty", "presence_penalty", "k", "p",
     "logprobs", "tool_choice", "thinking", "priority", "stream"}
)  # fmt: skip
EMBED_FIELDS = frozenset(
    {"model", "texts", "images", "inputs", "input_type", "embedding_types", "output_dimension", "max_tokens",
     "truncate", "priority"}
)  # fmt: skip
ROLES = ("system", "user", "assistant", "tool")


def routes(state: SimState, provider: ProviderSpec) -> list[Route]:
    api = CohereAPI(state, provider)
    return [
        Route("/v2/chat", api.chat, methods=["POST"]),
        Route("/v2/embed", api.embed, methods=["POST"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model}", api.get_model, methods=["GET"]),
    ]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"id": str(uuid.uuid4()), "message": message}, status_code=status, headers=headers)


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()


def _content_delta(piece: str) -> bytes:
    # Built by hand: one per streamed piece, and the rest of the event never changes.
    return (
        b'event: content-delta\ndata: {"type":"content-delta","index":0,"delta":{"message":{"content":{"text":'
        + json.dumps(piece).encode()
        + b"}}}}\n\n"
    )


@dataclass(slots=True)
class Reply:
    """One answer as the wire needs it."""

    id: str
    model: str
    answer: Answer
    tool_plan: str
    billed_input: int
    output_tokens: int

    @property
    def usage(self) -> dict[str, Any]:
        return {
            "billed_units": {"input_tokens": self.billed_input, "output_tokens": self.output_tokens},
            "tokens": {"input_tokens": self.billed_input + PREAMBLE_TOKENS, "output_tokens": self.output_tokens},
            "cached_tokens": 0,
        }


class CohereAPI:
    def __init__(self, state: SimState, provider: ProviderSpec) -> None:
        self.state = state
        self.provider = provider

    # --- auth, bodies, models ---------------------------------------------------------

    def _auth(self, request: Request) -> Response | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return error(401, "no api key supplied")
        if not key_is_known(key):
            return error(401, "invalid api token")
        return None

    async def _body(self, request: Request, fields: frozenset[str]) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise Invalid("invalid request: request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Invalid("invalid request: request body must be a JSON object")
        # Clients (the official SDK among them) may send null for what they leave out.
        body = {k: v for k, v in body.items() if v is not None}
        unknown = sorted(set(body) - fields)
        if unknown:
            raise Invalid(f"invalid request: unknown field: parameter {unknown[0]} is not a valid field")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise Invalid("invalid request: model must be specified")
        return body

    def _model_entry(self, spec: ModelSpec) -> dict[str, Any]:
        embeds = "embeddings" in spec.capabilities
        return {
            "name": spec.model,
            "endpoints": ["embed"] if embeds else ["chat"],
            "finetuned": False,
            "context_length": spec.context_window,
            "tokenizer_url": None,
            "default_endpoints": [],
            "features": [] if embeds else ["tools", "strict_tools"],
            "is_deprecated": False,
        }

    async def list_models(self, request: Request) -> Response:
        refusal = self._auth(request)
        if refusal is not None:
            return refusal
        specs = self.state.catalog.models_of(self.provider.id)
        endpoint = request.query_params.get("endpoint")
        if endpoint:
            specs = [s for s in specs if endpoint in self._model_entry(s)["endpoints"]]
        try:
            size = int(request.query_params.get("page_size", "20"))
            start = int(request.query_params.get("page_token") or 0)
        except ValueError:
            return error(400, "invalid request: page_size and page_token must be integers")
        if not 1 <= size <= 1000:
            return error(400, "invalid request: page_size must be between 1 and 1000")
        page = specs[start : start + size]
        body: dict[str, Any] = {"models": [self._model_entry(s) for s in page]}
        if start + size < len(specs):
            body["next_page_token"] = str(start + size)
        return JSONResponse(body)

    async def get_model(self, request: Request) -> Response:
        refusal = self._auth(request)
        if refusal is not None:
            return refusal
        spec = self.state.model_spec(self.provider.id, request.path_params["model"])
        if spec is None:
            return error(404, f"model '{request.path_params['model']}' not found")
        return JSONResponse(self._model_entry(spec))

    def _spec(self, model: str, capability: str) -> ModelSpec | Response:
        spec = self.state.model_spec(self.provider.id, model)
        if spec is None:
            return error(
                404, f"model '{model}' not found, make sure the correct model ID was used and that you have access to the model."
            )
        if capability not in spec.capabilities:
            endpoint = "chat" if capability == "chat" else "embed"
            return error(400, f"invalid request: model '{model}' does not support the {endpoint} endpoint")
        return spec

    # --- /v2/chat ---------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        refusal = self._auth(request)
        if refusal is not None:
            return refusal
        try:
            body = await self._body(request, CHAT_FIELDS)
            found = self._spec(body["model"], "chat")
            if isinstance(found, Response):
                return found
            spec = found
            prompt_text, tools, call_tool = check_chat(body)
        except Invalid as problem:
            return error(400, str(problem))
        if body.get("max_tokens") is not None and body["max_tokens"] > spec.max_output_tokens:
            return error(400, f"invalid request: max_tokens cannot exceed {spec.max_output_tokens} for model '{spec.model}'")
        provider, model = self.provider.id, spec.model
        self.state.record_call(provider, model)
        words = words_asked(request)
        if len(prompt_text) > LARGE_PROMPT_CHARS:
            reply = await asyncio.to_thread(self._reply, body, spec, prompt_text, tools, call_tool, words)
        else:
            reply = self._reply(body, spec, prompt_text, tools, call_tool, words)
        total = reply.billed_input + PREAMBLE_TOKENS
        if total > spec.context_window:
            return error(
                400,
                f"too many tokens: total number of tokens in the prompt cannot exceed {spec.context_window} - received "
                f"{total}. Try using a shorter prompt, or enabling prompt truncating. See "
                "https://docs.cohere.com/reference/chat for more details.",
            )
        fault = self.state.fault_for(provider, model)
        streaming = bool(body.get("stream"))
        if fault is not None and fault.refuses(streaming):
            return await _refuse(request, fault)
        if streaming:
            return SimStream(self._stream(reply, fault), media_type="text/event-stream", headers={"cache-control": "no-cache"})
        await self.state.full_latency(provider, model, len(reply.answer.pieces) or 1)
        return whole_answer(_response(reply), fault)

    def _reply(
        self,
        body: dict[str, Any],
        spec: ModelSpec,
        prompt_text: str,
        tools: list[dict[str, Any]],
        call_tool: str | None,
        words: int | None,
    ) -> Reply:
        provider, model = self.provider.id, spec.model
        json_format = (body.get("response_format") or {}).get("type") == "json_object"
        if call_tool is None and json_format:
            answer = self.state.json_answer(provider, model, prompt_text, body["response_format"].get("json_schema"))
        else:
            answer = self.state.answer(
                provider, model, prompt_text, max_tokens=body.get("max_tokens"), tools=tools, call_tool=call_tool,
                words=words,
            )
            if answer.tool_call is None and body.get("stop_sequences"):
                answer, _ = answer.cut_at_stop(body["stop_sequences"])
        plan = ""
        output = answer.completion_tokens
        if answer.tool_call is not None:
            plan = f"I will use {answer.tool_call['name']} to answer this."
            output += count_text(plan).tokens
        return Reply(str(uuid.uuid4()), model, answer, plan, answer.prompt_tokens, output)

    async def _stream(self, reply: Reply, fault: Fault | None) -> AsyncIterator[bytes]:
        answer = reply.answer
        call = answer.tool_call
        if call is not None:
            plan_pieces = re.findall(r"\S+\s*", reply.tool_plan)
            pieces = plan_pieces + json_fragments(call["arguments"])
        else:
            plan_pieces, pieces = [], answer.pieces
        late_fault = fault if fault is not None and fault.written_in_stream else None
        strike_at = min(late_fault.after_tokens, len(pieces)) if late_fault else -1
        with self.state.track_stream() as tracker:
            start = {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
            yield _event("message-start", {"id": reply.id, "delta": {"message": start}})
            if call is None:
                yield _event("content-start", {"index": 0, "delta": {"message": {"content": {"type": "text", "text": ""}}}})
            sent = 0
            async for piece in self.state.paced(self.provider.id, reply.model, pieces, fault):
                if sent == strike_at:
                    break
                if call is None:
                    yield _content_delta(piece)
                elif sent < len(plan_pieces):
                    yield _event("tool-plan-delta", {"delta": {"message": {"tool_plan": piece}}})
                else:
                    if sent == len(plan_pieces):
                        head = {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": ""}}
                        yield _event("tool-call-start", {"index": 0, "delta": {"message": {"tool_calls": head}}})
                    delta = {"message": {"tool_calls": {"function": {"arguments": piece}}}}
                    yield _event("tool-call-delta", {"index": 0, "delta": delta})
                sent += 1
            if late_fault is not None and sent == strike_at:
                tracker.broken = True
                if late_fault.kind == "malformed":
                    yield b'event: content-delta\ndata: {"type":"content-delta","index":0,"delta":{"mess\n\n'
                else:
                    message = FAULT_ERRORS.get(late_fault.status or 500, FAULT_ERRORS[500])[1]
                    yield _event("message-end", {"delta": {"error": message, "finish_reason": "ERROR"}})
                return
            yield _event("tool-call-end" if call is not None else "content-end", {"index": 0})
            yield _event("message-end", {"delta": {"finish_reason": FINISH_REASONS[answer.finish_reason], "usage": reply.usage}})

    # --- /v2/embed --------------------------------------------------------------------

    async def embed(self, request: Request) -> Response:
        refusal = self._auth(request)
        if refusal is not None:
            return refusal
        try:
            body = await self._body(request, EMBED_FIELDS)
            found = self._spec(body["model"], "embeddings")
            if isinstance(found, Response):
                return found
            spec = found
            texts, types, dims = check_embed(body, spec)
        except Invalid as problem:
            return error(400, str(problem))
        self.state.record_call(self.provider.id, spec.model)
        fault = self.state.fault_for(self.provider.id, spec.model)
        if fault is not None and fault.refuses(streaming=False):
            return await _refuse(request, fault)
        await self.state.full_latency(self.provider.id, spec.model, 1)
        floats = [word_vector(t, dims) for t in texts]
        embeddings: dict[str, Any] = {}
        for kind in types:
            if kind == "float":
                embeddings["float"] = floats
            elif kind == "int8":
                embeddings["int8"] = [[max(-128, min(127, round(v * 127))) for v in vec] for vec in floats]
            else:
                embeddings["uint8"] = [[max(0, min(255, round(v * 127) + 128)) for v in vec] for vec in floats]
        payload = {
            "id": str(uuid.uuid4()),
            "embeddings": embeddings,
            "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": sum(count_text(t).tokens for t in texts)}},
            "response_type": "embeddings_by_type",
        }
        return whole_answer(payload, fault)


# --- request checks ---------------------------------------------------------------------


def check_chat(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """Check a v2 chat body; return the prompt text, the tools, and the tool the model will call."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("invalid request: messages must not be empty")
    for name, low, high in (("p", 0.01, 0.99), ("k", 0, 500), ("temperature", 0, math.inf)):
        value = body.get(name)
        if value is not None and (not isinstance(value, int | float) or not low <= value <= high):
            raise Invalid(f"invalid request: {name} must be between {low} and {high}, received {value}")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or len(stops) > 5 or not all(isinstance(s, str) for s in stops)):
        raise Invalid("invalid request: stop_sequences must be a list of at most 5 strings")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise Invalid("invalid request: max_tokens must be a positive integer")
    tools = _check_tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice is not None:
        if choice not in ("REQUIRED", "NONE"):
            raise Invalid("invalid request: tool_choice must be one of REQUIRED, NONE")
        if not tools:
            raise Invalid("invalid request: tool_choice can only be used when tools are specified")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object")
    ):
        raise Invalid("invalid request: response_format.type must be one of text, json_object")
    texts = [json.dumps(t, sort_keys=True) for t in body.get("tools") or ()]
    calls: set[str] = set()
    last_role = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise Invalid(f"invalid request: messages[{i}].role must be one of {', '.join(ROLES)}")
        role = message["role"]
        if role == "assistant":
            for call in message.get("tool_calls") or ():
                if not isinstance(call, dict) or not call.get("id") or not (call.get("function") or {}).get("name"):
                    raise Invalid(f"invalid request: messages[{i}].tool_calls must have an id and a function name")
                calls.add(call["id"])
                texts.append(json.dumps(call["function"], sort_keys=True))
            if not message.get("tool_calls") and not message.get("content"):
                raise Invalid(f"invalid request: messages[{i}] must have content or tool_calls")
        elif role == "tool":
            if message.get("tool_call_id") not in calls:
                raise Invalid(
                    f"invalid request: messages[{i}].tool_call_id '{message.get('tool_call_id')}' does not match "
                    "any tool call in the conversation"
                )
        elif message.get("content") in (None, "", []):
            raise Invalid(f"invalid request: messages[{i}].content must not be empty")
        texts.append(_content_text(message.get("content"), i))
        last_role = role
    call_tool = None
    if tools and choice != "NONE" and (choice == "REQUIRED" or last_role == "user"):
        call_tool = tools[0]["name"]
    return "\n".join(texts), tools, call_tool


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise Invalid("invalid request: tools must be a list")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise Invalid(f"invalid request: tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", name):
            raise Invalid(f"invalid request: tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$")
        out.append({"name": name, "parameters": function.get("parameters") or {}})
    return out


def _content_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise Invalid(f"invalid request: messages[{i}].content must be a string or a list of content items")
    texts: list[str] = []
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("text", "thinking"):
            texts.append(str(item.get(kind) or ""))
        elif kind == "image_url":
            url = (item.get("image_url") or {}).get("url") if isinstance(item.get("image_url"), dict) else None
            if not isinstance(url, str) or not url.startswith(("data:image/", "http://", "https://")):
                raise Invalid(f"invalid request: messages[{i}].content[{j}].image_url.url must be a data: or http(s) URL")
        elif kind == "document":
            texts.append(json.dumps(item.get("document"), sort_keys=True))
        else:
            raise Invalid(f"invalid request: messages[{i}].content[{j}].type must be one of text, image_url, document")
    return "".join(texts)


def check_embed(body: dict[str, Any], spec: ModelSpec) -> tuple[list[str], list[str], int]:
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise Invalid("invalid request: texts must be a non-empty list of strings")
    if len(texts) > EMBED_BATCH:
        raise Invalid(f"invalid request: texts must contain at most {EMBED_BATCH} items, received {len(texts)}")
    if body.get("input_type") not in INPUT_TYPES:
        raise Invalid("invalid request: valid input_type must be provided with the provided model")
    types = body.get("embedding_types") or ["float"]
    unsupported = [t for t in types if t not in EMBEDDING_TYPES]
    if unsupported:
        raise Invalid(f"invalid request: embedding type '{unsupported[0]}' is not one the simulator serves: {', '.join(EMBEDDING_TYPES)}")
    dims = EMBEDDING_DIMS.get(spec.model, 1024)
    wanted = body.get("output_dimension")
    if wanted is not None:
        if spec.model not in EMBEDDING_DIMS or wanted not in (256, 512, 1024, 1536):
            raise Invalid(f"invalid request: output_dimension {wanted} is not supported for model '{spec.model}'")
        dims = wanted
    return texts, list(types), dims


# --- answers ------------------------------------------------------------------------------


def _response(reply: Reply) -> dict[str, Any]:
    answer = reply.answer
    message: dict[str, Any] = {"role": "assistant"}
    if answer.tool_call is not None:
        call = answer.tool_call
        message["tool_plan"] = reply.tool_plan
        message["tool_calls"] = [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        ]
    else:
        message["content"] = [{"type": "text", "text": answer.text}]
    return {
        "id": reply.id,
        "message": message,
        "finish_reason": FINISH_REASONS[answer.finish_reason],
        "usage": reply.usage,
    }


# --- faults -------------------------------------------------------------------------------


async def _refuse(request: Request, fault: Fault) -> Response:
    """What a fault sends in place of the answer (see `Fault.refuses`)."""
    if fault.kind == "rate_limit":
        message = (
            "You are using a Trial key, which is limited to 20 API calls / minute. You can continue to use the "
            "Trial key for free or upgrade to a Production key with higher rate limits at "
            "'https://dashboard.cohere.com/api-keys'."
        )
        return error(429, message, {"retry-after": str(math.ceil(fault.wait_s))} if fault.wait_hint else {})
    if fault.kind == "timeout":
        await hang_until_disconnect(request)
        return error(504, "gateway timeout")
    return error(*FAULT_ERRORS.get(fault.status or 500, FAULT_ERRORS[500]))
