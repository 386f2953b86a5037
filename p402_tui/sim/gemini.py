"""Google's Gemini API, simulated: `/v1beta/models/{model}:{method}` (and the same under `/v1`).

Methods: generateContent, streamGenerateContent (SSE with `alt=sse`, else one JSON array
streamed piece by piece), countTokens, embedContent, batchEmbedContents; GET models and
models/{model}. Requests are checked the way the real API checks them and refused in
Google's RPC error shape `{"error": {"code", "message", "status", "details"}}`:

- a missing key is 403 PERMISSION_DENIED; a blank or rejected key (`engine.key_is_known`) is 400
  with reason API_KEY_INVALID;
- unknown body fields, empty contents or parts, bad roles, function turns out of order,
  Gemini 3 function calls sent back without their `thoughtSignature`;
- unknown models (404), prompts over the context window, maxOutputTokens over the limit.

Answers come from the engine. Thinking models report `thoughtsTokenCount` (and return the
thoughts when `includeThoughts` is set); implicit caching reports `cachedContentTokenCount`
for a repeated prompt prefix of at least CACHE_MIN_TOKENS; usage is cumulative on every
streamed chunk and the last chunk has the finishReason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.catalog import ModelSpec, ProviderSpec
from ..core.tokens import count_text
from .engine import LARGE_PROMPT_CHARS, Answer, Fault, SimState, key_is_known, word_vector
from .server import Invalid, SimStream, hang_until_disconnect, whole_answer, words_asked

API_VERSIONS = ("v1beta", "v1")
CHAT_METHODS = ("generateContent", "streamGenerateContent", "countTokens")
EMBED_METHODS = ("embedContent", "batchEmbedContents")
IMAGE_TOKENS = 258  # what Gemini counts for an image of up to 384x384 pixels
CACHE_MIN_TOKENS = 1024  # implicit caching's minimum prefix (Gemini 2.5 Flash)
CACHE_ENTRIES = 4096
THOUGHT_TOKENS = 16  # how long a thinking model thinks, every time
EMBEDDING_DIMS = 3072  # gemini-embedding-001's default outputDimensionality
EMBED_BATCH = 100  # batchEmbedContents' limit

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
FAULT_ERRORS = {
    500: (500, "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"),
    502: (502, "Bad Gateway"),
    503: (503, "The model is overloaded. Please try again later."),
    504: (504, "Deadline expired before operation could complete."),
    529: (503, "The model is overloaded. Please try again later."),  # Google has no 529; overload is 503
}
FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP"}  # Gemini says STOP after a call

REQUEST_FIELDS = frozenset(
    {"model", "contents", "tools", "toolConfig", "safetySettings", "systemInstruction", "generationConfig",
     "cachedContent", "labels", "serviceTier", "store"}
)  # fmt: skip
FREE_FORM = frozenset(
    {"args", "response", "parameters", "parametersJsonSchema", "responseSchema", "responseJsonSchema", "labels"}
)
PART_DATA = (
    "text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode", "codeExecutionResult",
    "toolCall", "toolResponse",
)  # fmt: skip
TOOL_MODES = ("MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED")
UNREGISTERED = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-:]{0,127}$")


def routes(state: SimState, provider: ProviderSpec) -> list[Route]:
    api = GeminiAPI(state, provider)
    out: list[Route] = []
    for version in API_VERSIONS:
        out += [
            Route(f"/{version}/models", api.list_models, methods=["GET"]),
            Route(f"/{version}/models/{{target}}", api.get_model, methods=["GET"]),
            Route(f"/{version}/models/{{target}}", api.call, methods=["POST"]),
        ]
    return out


def error(code: int, message: str, details: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "status": STATUS_NAMES.get(code, "UNKNOWN")}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=code)


def _bad_key() -> JSONResponse:
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
    return error(400, "API key not valid. Please pass a valid API key.", [info])


def _rate_limited(wait: float | None) -> JSONResponse:
    # No Retry-After header: the real API puts the wait only in the RetryInfo detail.
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                }
            ],
        },
    ]
    if wait is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{wait:g}s"})
    message = (
        "You exceeded your current quota, please check your plan and billing details. "
        "For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
        + (f" Please retry in {wait:g}s." if wait is not None else "")
    )
    return error(429, message, details)


def _fault_error(fault: Fault) -> tuple[int, str]:
    return FAULT_ERRORS.get(fault.status or 500, FAULT_ERRORS[500])


@dataclass(slots=True)
class Prompt:
    """What a generateContent body asks, as the simulator needs it."""

    segments: list[str]  # system and tools first, then one per content: prefixes are what caching sees
    images: int = 0
    tools: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "AUTO"
    allowed: list[str] = field(default_factory=list)
    last_is_user_text: bool = True
    max_output: int | None = None
    stops: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None
    json_mode: bool = False
    thinking_budget: int | None = None
    include_thoughts: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.segments)


class GeminiAPI:
    def __init__(self, state: SimState, provider: ProviderSpec) -> None:
        self.state = state
        self.provider = provider
        self.cache: OrderedDict[str, None] = OrderedDict()  # digests of prompt prefixes seen (implicit caching)

    # --- auth and lookup ------------------------------------------------------------

    def _auth(self, request: Request) -> Response | None:
        key = request.headers.get("x-goog-api-key")
        if key is None:
            key = request.query_params.get("key")
        if key is None:
            return error(403, UNREGISTERED)
        if not key_is_known(key):
            return _bad_key()
        return None

    def _model_entry(self, spec: ModelSpec) -> dict[str, Any]:
        methods = list(EMBED_METHODS) if "embeddings" in spec.capabilities else list(CHAT_METHODS)
        entry: dict[str, Any] = {
            "name": f"models/{spec.model}",
            "version": "001",
            "displayName": spec.name,
            "description": spec.name,
            "inputTokenLimit": spec.context_window,
            "outputTokenLimit": spec.max_output_tokens,
            "supportedGenerationMethods": methods,
        }
        if "chat" in spec.capabilities:
            entry.update(temperature=1, topP=0.95, topK=64, maxTemperature=2, thinking="reasoning" in spec.capabilities)
        return entry

    async def list_models(self, request: Request) -> Response:
        refusal = self._auth(request)
        if refusal is not None:
            return refusal
        specs = self.state.catalog.models_of(self.provider.id)
        token = request.query_params.get("pageToken")
        try:
            size = int(request.query_params.get("pageSize", "50"))
            start = int(base64.urlsafe_b64decode(token).decode()) if token else 0
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return error(400, "Invalid page token or page size.")
        size = min(max(size, 1), 1000)
        page = specs[start : start + size]
        body: dict[str, Any] = {"models": [self._model_entry(s) for s in page]}
        if start + size < len(specs):
            body["nextPageToken"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
        return JSONResponse(body)

    async def get_model(self, request: Request) -> Response:
        refusal = self._auth(request)
        if refusal is not None:
            return refusal
        model = request.path_params["target"]
        spec = self.state.model_spec(self.provider.id, model)
        if spec is None:
            return error(404, f"models/{model} is not found for API version {_version(request)}")
        return JSONResponse(self._model_entry(spec))

    async def call(self, request: Request) -> Response:
        refusal = self._auth(request)
        if refusal is not None:
            return refusal
        model, _, method = request.path_params["target"].rpartition(":")
        if not model or method not in CHAT_METHODS + EMBED_METHODS:
            return error(404, f"Method not found: {request.path_params['target']}")
        spec = self.state.model_spec(self.provider.id, model)
        wanted = "embeddings" if method in EMBED_METHODS else "chat"
        if spec is None or wanted not in spec.capabilities:
            return error(
                404,
                f"models/{model} is not found for API version {_version(request)}, or is not supported for "
                f"{method}. Call ListModels to see the list of available models and their supported methods.",
            )
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return error(400, "Invalid JSON payload received. Unexpected token.")
        body = camel_keys(body)
        try:
            if method == "countTokens":
                return self._count_tokens(body, spec)
            if method in EMBED_METHODS:
                return await self._embed(request, body, spec, batch=method == "batchEmbedContents")
            prompt = parse_prompt(body, spec)
        except Invalid as problem:
            return error(400, str(problem))
        streaming = method == "streamGenerateContent"
        return await self._generate(request, prompt, spec, streaming=streaming, sse=request.query_params.get("alt") == "sse")

    # --- generateContent ----------------------------------------------------------------

    async def _generate(self, request: Request, prompt: Prompt, spec: ModelSpec, *, streaming: bool, sse: bool) -> Response:
        provider, model = self.provider.id, spec.model
        if prompt.max_output is not None and prompt.max_output > spec.max_output_tokens:
            return error(
                400,
                f"Unable to submit request because it has a maxOutputTokens value of {prompt.max_output} but the "
                f"supported range is from 1 (inclusive) to {spec.max_output_tokens + 1} (exclusive). "
                "Update the value and try again.",
            )
        self.state.record_call(provider, model)
        words = words_asked(request)
        if len(prompt.text) > LARGE_PROMPT_CHARS:
            answer, thought, cached = await asyncio.to_thread(self._answer, prompt, spec, words)
        else:
            answer, thought, cached = self._answer(prompt, spec, words)
        prompt_tokens = answer.prompt_tokens + IMAGE_TOKENS * prompt.images
        if prompt_tokens > spec.context_window:
            return error(
                400,
                f"The input token count ({prompt_tokens}) exceeds the maximum number of tokens allowed "
                f"({spec.context_window}).",
            )
        usage = _usage(prompt_tokens, min(cached, prompt_tokens), answer.completion_tokens, thought, prompt.images)
        fault = self.state.fault_for(provider, model)
        if fault is not None and fault.refuses(streaming):
            return await _refuse(request, fault)
        response_id = uuid.uuid4().hex[:22]
        signature = _signature(answer) if thought is not None and answer.tool_call is not None else None
        if streaming:
            chunks = self._stream(model, response_id, answer, thought, prompt, usage, signature, fault, sse)
            media = "text/event-stream" if sse else "application/json"
            return SimStream(chunks, media_type=media, headers={"cache-control": "no-cache"})
        await self.state.full_latency(provider, model, len(answer.pieces) or 1)
        parts = _thought_parts(thought, prompt) + _answer_parts(answer, signature)
        reply = _reply(model, response_id, parts, FINISH_REASONS[answer.finish_reason], usage)
        return whole_answer(reply, fault)

    def _answer(self, prompt: Prompt, spec: ModelSpec, words: int | None) -> tuple[Answer, Answer | None, int]:
        """The answer, the thoughts before it (thinking models), and the implicitly cached prefix tokens."""
        provider, model = self.provider.id, spec.model
        text = prompt.text
        call_tool = _tool_to_call(prompt)
        if call_tool is None and prompt.json_mode:
            answer = self.state.json_answer(provider, model, text, prompt.json_schema)
        else:
            answer = self.state.answer(
                provider, model, text, max_tokens=prompt.max_output, tools=prompt.tools, call_tool=call_tool, words=words
            )
            if answer.tool_call is None and prompt.stops:
                answer, _ = answer.cut_at_stop(prompt.stops)
        thought = None
        if "reasoning" in spec.capabilities and prompt.thinking_budget != 0:
            thought = self.state.answer(provider, model, f"thinking|{text}", max_tokens=THOUGHT_TOKENS)
        return answer, thought, self._cached_tokens(model, prompt.segments)

    def _cached_tokens(self, model: str, segments: list[str]) -> int:
        """Tokens of the longest prompt prefix an earlier request already sent (implicit caching)."""
        digest = hashlib.sha256(model.encode())
        hit = 0
        for i, segment in enumerate(segments):
            digest.update(b"\x00" + segment.encode())
            key = digest.hexdigest()
            if key in self.cache:
                hit = i + 1
                self.cache.move_to_end(key)
            else:
                self.cache[key] = None
        while len(self.cache) > CACHE_ENTRIES:
            self.cache.popitem(last=False)
        if not hit:
            return 0
        tokens = count_text("\n".join(segments[:hit])).tokens
        return tokens if tokens >= CACHE_MIN_TOKENS else 0

    async def _stream(
        self,
        model: str,
        response_id: str,
        answer: Answer,
        thought: Answer | None,
        prompt: Prompt,
        usage: dict[str, Any],
        signature: str | None,
        fault: Fault | None,
        sse: bool,
    ) -> AsyncIterator[bytes]:
        chunks: list[list[dict[str, Any]]] = []
        if thought is not None and prompt.include_thoughts:
            chunks += [[{"text": piece, "thought": True}] for piece in thought.pieces]
        first_answer_chunk = len(chunks)
        if answer.tool_call is not None:
            chunks.append(_answer_parts(answer, signature))
        else:
            chunks += [[{"text": piece}] for piece in answer.pieces] or [[{"text": ""}]]
        answer_chunks = len(chunks) - first_answer_chunk
        finish = FINISH_REASONS[answer.finish_reason]
        late_fault = fault if fault is not None and fault.written_in_stream else None
        strike_at = min(late_fault.after_tokens, len(chunks) - 1) if late_fault else -1
        opened = False

        def frame(payload: bytes) -> bytes:
            nonlocal opened
            if sse:
                return b"data: " + payload + b"\r\n\r\n"
            lead = b"," if opened else b"["
            opened = True
            return lead + b"\r\n" + payload

        with self.state.track_stream() as tracker:
            async for i in self.state.paced(self.provider.id, model, range(len(chunks)), fault):
                if i == strike_at:
                    tracker.broken = True
                    if late_fault.kind == "malformed":
                        yield frame(b'{"candidates": [{"content": {"parts": [{"te')
                    else:
                        code, message = _fault_error(late_fault)
                        status = STATUS_NAMES.get(code, "UNKNOWN")
                        payload = {"error": {"code": code, "message": message, "status": status}}
                        yield frame(json.dumps(payload).encode())
                        if not sse:
                            yield b"\r\n]"
                    return
                last = i == len(chunks) - 1
                done = max(i - first_answer_chunk + 1, 0)
                so_far = _usage_so_far(usage, done, answer_chunks, last)
                reply = _reply(model, response_id, chunks[i], finish if last else None, so_far)
                yield frame(json.dumps(reply).encode())
            if not sse:
                yield b"\r\n]"

    # --- countTokens and embeddings ----------------------------------------------------

    def _count_tokens(self, body: dict[str, Any], spec: ModelSpec) -> Response:
        inner = body.get("generateContentRequest")
        if inner is not None:
            if not isinstance(inner, dict):
                raise Invalid("* CountTokensRequest.generate_content_request: must be an object")
            prompt = parse_prompt(inner, spec)
        else:
            unknown = sorted(set(body) - {"contents"})
            if unknown:
                raise Invalid(f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.')
            prompt = parse_prompt({"contents": body.get("contents")}, spec)
        text_tokens = count_text(prompt.text).tokens
        details = [{"modality": "TEXT", "tokenCount": text_tokens}]
        if prompt.images:
            details.append({"modality": "IMAGE", "tokenCount": IMAGE_TOKENS * prompt.images})
        return JSONResponse({"totalTokens": text_tokens + IMAGE_TOKENS * prompt.images, "promptTokensDetails": details})

    async def _embed(self, request: Request, body: dict[str, Any], spec: ModelSpec, *, batch: bool) -> Response:
        if batch:
            entries = body.get("requests")
            if not isinstance(entries, list) or not entries:
                raise Invalid("* BatchEmbedContentsRequest.requests: requests is not specified")
            if len(entries) > EMBED_BATCH:
                raise Invalid(f"* BatchEmbedContentsRequest.requests: at most {EMBED_BATCH} requests can be in one batch")
        else:
            entries = [body]
        texts: list[str] = []
        dims: list[int] = []
        for i, entry in enumerate(entries):
            where = f"requests[{i}]." if batch else ""
            if not isinstance(entry, dict):
                raise Invalid(f"* BatchEmbedContentsRequest.{where}: must be an object")
            if batch and entry.get("model") not in (None, f"models/{spec.model}"):
                raise Invalid(f"Model in request {entry['model']} does not match the model of the batch models/{spec.model}.")
            content = entry.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            if not isinstance(parts, list) or not parts:
                raise Invalid(f"* EmbedContentRequest.{where}content: content is not specified")
            texts.append("".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)))
            size = entry.get("outputDimensionality") or EMBEDDING_DIMS
            if not isinstance(size, int) or not 1 <= size <= EMBEDDING_DIMS:
                raise Invalid(f"* EmbedContentRequest.{where}output_dimensionality: must be in [1, {EMBEDDING_DIMS}]")
            dims.append(size)
        longest = max(count_text(t).tokens for t in texts)
        if longest > spec.context_window:
            raise Invalid(
                f"The input token count ({longest}) exceeds the maximum number of tokens allowed ({spec.context_window})."
            )
        self.state.record_call(self.provider.id, spec.model)
        fault = self.state.fault_for(self.provider.id, spec.model)
        if fault is not None and fault.refuses(streaming=False):
            return await _refuse(request, fault)
        await self.state.full_latency(self.provider.id, spec.model, 1)
        vectors = [{"values": word_vector(t, d)} for t, d in zip(texts, dims)]
        return whole_answer({"embeddings": vectors} if batch else {"embedding": vectors[0]}, fault)


# --- request checks ---------------------------------------------------------------------


def camel_keys(value: Any) -> Any:
    """Field names in lowerCamelCase: Google's JSON parser takes snake_case too, and the SDK mixes both.

    Free-form values (function arguments and results, JSON schemas) keep their keys as sent.
    """
    if isinstance(value, list):
        return [camel_keys(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        head, *rest = key.split("_")
        name = head + "".join(word[:1].upper() + word[1:] for word in rest)
        out[name] = item if name in FREE_FORM else camel_keys(item)
    return out


def parse_prompt(body: dict[str, Any], spec: ModelSpec) -> Prompt:
    """Check a generateContent body as the API does and return what it asks."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise Invalid(f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.')
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise Invalid("* GenerateContentRequest.contents: contents is not specified")
    prompt = Prompt(segments=[])
    head: list[str] = []
    system = body.get("systemInstruction")
    if system is not None:
        parts = system.get("parts") if isinstance(system, dict) else None
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
            raise Invalid("* GenerateContentRequest.system_instruction.parts: system instruction must be text parts")
        head.append("".join(p["text"] for p in parts))
    _read_tools(body, prompt, head)
    prompt.segments.append("\n".join(head))
    _read_contents(contents, prompt, spec)
    _read_generation_config(body.get("generationConfig"), prompt)
    return prompt


def _read_tools(body: dict[str, Any], prompt: Prompt, head: list[str]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise Invalid("* GenerateContentRequest.tools: must be a list")
        names: set[str] = set()
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise Invalid(f"* GenerateContentRequest.tools[{i}]: must be an object")
            for j, declaration in enumerate(tool.get("functionDeclarations") or ()):
                where = f"* GenerateContentRequest.tools[{i}].function_declarations[{j}]"
                name = declaration.get("name") if isinstance(declaration, dict) else None
                if not isinstance(name, str) or not _NAME.match(name):
                    raise Invalid(
                        f"{where}.name: Invalid function name. Must start with a letter or an underscore. Must be "
                        "a-z, A-Z, 0-9, or contain underscores, dots, colons and dashes, with a maximum length of 128."
                    )
                if name in names:
                    raise Invalid(f"{where}.name: Duplicate function declaration name: {name}")
                names.add(name)
                parameters = declaration.get("parameters") or declaration.get("parametersJsonSchema") or {}
                if parameters.get("type", "object").lower() == "object" and "properties" in parameters and not parameters["properties"]:
                    raise Invalid(f"{where}.parameters.properties: should be non-empty for OBJECT type")
                prompt.tools.append({"name": name, "parameters": parameters})
                head.append(json.dumps(declaration, sort_keys=True))
    config = body.get("toolConfig")
    if config is None:
        return
    calling = config.get("functionCallingConfig") if isinstance(config, dict) else None
    if not isinstance(calling, dict):
        raise Invalid("* GenerateContentRequest.tool_config.function_calling_config: must be an object")
    mode = calling.get("mode", "AUTO")
    if mode not in TOOL_MODES:
        raise Invalid(f'Invalid value at \'tool_config.function_calling_config.mode\', "{mode}"')
    allowed = calling.get("allowedFunctionNames") or []
    if allowed and mode not in ("ANY", "VALIDATED"):
        raise Invalid(
            "* GenerateContentRequest.tool_config.function_calling_config.allowed_function_names: "
            "allowed_function_names is only allowed when the mode is ANY or VALIDATED."
        )
    unknown = [n for n in allowed if n not in {t["name"] for t in prompt.tools}]
    if unknown:
        raise Invalid(
            "* GenerateContentRequest.tool_config.function_calling_config.allowed_function_names: "
            f"function {unknown[0]} is not declared in tools."
        )
    prompt.mode = "AUTO" if mode == "MODE_UNSPECIFIED" else mode
    prompt.allowed = list(allowed)


def _read_contents(contents: list[Any], prompt: Prompt, spec: ModelSpec) -> None:
    previous: tuple[str, int, int] | None = None  # (role, function calls, function responses) of the last turn
    for i, content in enumerate(contents):
        where = f"* GenerateContentRequest.contents[{i}]"
        if not isinstance(content, dict):
            raise Invalid(f"{where}: must be an object")
        role = content.get("role") or "user"
        if role not in ("user", "model"):
            raise Invalid("Please use a valid role: user, model.")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise Invalid(f"{where}.parts: contents.parts must not be empty.")
        texts: list[str] = []
        calls = responses = 0
        for j, part in enumerate(parts):
            kinds = [k for k in PART_DATA if isinstance(part, dict) and k in part]
            if len(kinds) != 1:
                raise Invalid(f"{where}.parts[{j}].data: required oneof field 'data' must have one initialized field")
            kind = kinds[0]
            value = part[kind]
            if kind == "text":
                if not isinstance(value, str):
                    raise Invalid(f"Invalid value at 'contents[{i}].parts[{j}].text' (TYPE_STRING)")
                texts.append(value)
            elif kind == "inlineData":
                _check_blob(value, f"contents[{i}].parts[{j}].inline_data")
                prompt.images += 1
            elif kind == "fileData":
                if not isinstance(value, dict) or not value.get("fileUri"):
                    raise Invalid(f"{where}.parts[{j}].file_data.file_uri: file_uri is not specified")
                prompt.images += 1
            elif kind == "functionCall":
                if not isinstance(value, dict) or not value.get("name"):
                    raise Invalid(f"{where}.parts[{j}].function_call.name: name is not specified")
                if role != "model":
                    raise Invalid("Please ensure that function call turns come from the model.")
                if calls == 0 and spec.model.startswith("gemini-3") and not part.get("thoughtSignature") and _in_current_turn(contents, i):
                    raise Invalid(
                        "Function call is missing a thought_signature in functionCall parts. This is required for "
                        "tools to work correctly, and missing thought_signature may lead to degraded model performance. "
                        f"Additional data, function call `default_api:{value['name']}` , position {j + 1}. Please refer "
                        "to https://ai.google.dev/gemini-api/docs/thought-signatures for more details."
                    )
                calls += 1
                texts.append(json.dumps(value, sort_keys=True))
            elif kind == "functionResponse":
                if not isinstance(value, dict) or not value.get("name"):
                    raise Invalid(f"{where}.parts[{j}].function_response.name: name is not specified")
                if not isinstance(value.get("response"), dict):
                    raise Invalid(f"{where}.parts[{j}].function_response.response: response must be an object")
                responses += 1
                texts.append(json.dumps(value, sort_keys=True))
            else:
                texts.append(json.dumps(value, sort_keys=True))
        if calls and (previous is None or previous[0] != "user"):
            raise Invalid("Please ensure that function call turn comes immediately after a user turn or after a function response turn.")
        if responses:
            if previous is None or previous[1] == 0:
                raise Invalid("Please ensure that function response turn comes immediately after a function call turn.")
            if responses != previous[1]:
                raise Invalid(
                    "Please ensure that the number of function response parts is equal to the number of function "
                    "call parts of the function call turn."
                )
        previous = (role, calls, responses)
        prompt.segments.append("".join(texts))
    prompt.last_is_user_text = previous is not None and previous[0] == "user" and previous[2] == 0


def _in_current_turn(contents: list[Any], index: int) -> bool:
    """Whether content `index` comes after the last user turn that has text (Gemini 3 checks only that turn)."""
    for content in contents[index + 1 :]:
        parts = content.get("parts") if isinstance(content, dict) else None
        if (content.get("role") or "user") == "user" and any(isinstance(p, dict) and "text" in p for p in parts or ()):
            return False
    return True


def _check_blob(blob: Any, where: str) -> None:
    if not isinstance(blob, dict) or not blob.get("mimeType"):
        raise Invalid(f"* GenerateContentRequest.{where}.mime_type: mime_type is not specified")
    data = blob.get("data")
    try:
        if not isinstance(data, str) or not data:
            raise ValueError
        base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise Invalid(f"Invalid value at '{where}.data' (TYPE_BYTES), Base64 decoding failed") from None
    if not blob["mimeType"].startswith(("image/", "audio/", "video/", "application/pdf", "text/")):
        raise Invalid(f"Unsupported MIME type: {blob['mimeType']}")


def _read_generation_config(config: Any, prompt: Prompt) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise Invalid("* GenerateContentRequest.generation_config: must be an object")
    temperature = config.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 2):
        raise Invalid("* GenerateContentRequest.generation_config.temperature: must be in the range [0.0, 2.0]")
    top_p = config.get("topP")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0 <= top_p <= 1):
        raise Invalid("* GenerateContentRequest.generation_config.top_p: must be in the range [0.0, 1.0]")
    max_output = config.get("maxOutputTokens")
    if max_output is not None:
        if not isinstance(max_output, int) or isinstance(max_output, bool) or max_output < 1:
            raise Invalid("* GenerateContentRequest.generation_config.max_output_tokens: must be positive")
        prompt.max_output = max_output
    stops = config.get("stopSequences")
    if stops is not None:
        if not isinstance(stops, list) or len(stops) > 5 or not all(isinstance(s, str) and s for s in stops):
            raise Invalid("* GenerateContentRequest.generation_config.stop_sequences: at most 5 non-empty strings")
        prompt.stops = stops
    mime = config.get("responseMimeType")
    if mime not in (None, "text/plain", "application/json", "text/x.enum"):
        raise Invalid(f"* GenerateContentRequest.generation_config.response_mime_type: unsupported MIME type {mime}")
    schema = config.get("responseSchema") or config.get("responseJsonSchema")
    if schema is not None and mime != "application/json":
        raise Invalid(
            "* GenerateContentRequest.generation_config.response_schema: response_mime_type must be "
            "application/json when a response schema is set"
        )
    prompt.json_mode = mime == "application/json"
    prompt.json_schema = schema if isinstance(schema, dict) else None
    thinking = config.get("thinkingConfig") or {}
    if isinstance(thinking, dict):
        prompt.thinking_budget = thinking.get("thinkingBudget")
        prompt.include_thoughts = bool(thinking.get("includeThoughts"))


# --- answers ------------------------------------------------------------------------------


def _tool_to_call(prompt: Prompt) -> str | None:
    """The function the model calls: ANY always calls; AUTO calls when the user just spoke."""
    if not prompt.tools or prompt.mode == "NONE":
        return None
    if prompt.mode in ("ANY", "VALIDATED"):
        return prompt.allowed[0] if prompt.allowed else prompt.tools[0]["name"]
    return prompt.tools[0]["name"] if prompt.last_is_user_text else None


def _signature(answer: Answer) -> str:
    """An opaque thoughtSignature, as thinking models attach to a function call."""
    seed = (answer.tool_call or {}).get("id", "")
    return base64.b64encode(hashlib.sha256(f"signature|{seed}".encode()).digest()).decode()


def _thought_parts(thought: Answer | None, prompt: Prompt) -> list[dict[str, Any]]:
    if thought is None or not prompt.include_thoughts:
        return []
    return [{"text": thought.text, "thought": True}]


def _answer_parts(answer: Answer, signature: str | None) -> list[dict[str, Any]]:
    if answer.tool_call is None:
        return [{"text": answer.text}]
    call = answer.tool_call
    part: dict[str, Any] = {"functionCall": {"name": call["name"], "args": json.loads(call["arguments"])}}
    if signature:
        part["thoughtSignature"] = signature
    return [part]


def _usage(prompt: int, cached: int, candidates: int, thought: Answer | None, images: int) -> dict[str, Any]:
    thoughts = thought.completion_tokens if thought is not None else 0
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt - IMAGE_TOKENS * images}],
    }
    if images:
        usage["promptTokensDetails"].append({"modality": "IMAGE", "tokenCount": IMAGE_TOKENS * images})
    if cached:
        usage["cachedContentTokenCount"] = cached
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _usage_so_far(usage: dict[str, Any], done: int, total: int, last: bool) -> dict[str, Any]:
    """Cumulative usage after `done` of `total` answer chunks; exact on the last one."""
    if last:
        return usage
    candidates = math.floor(usage["candidatesTokenCount"] * done / max(total, 1))
    thoughts = usage.get("thoughtsTokenCount", 0)
    return {**usage, "candidatesTokenCount": candidates, "totalTokenCount": usage["promptTokenCount"] + candidates + thoughts}


def _reply(model: str, response_id: str, parts: list[dict[str, Any]], finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": response_id}


# --- faults -------------------------------------------------------------------------------


async def _refuse(request: Request, fault: Fault) -> Response:
    """What a fault sends in place of the answer (see `Fault.refuses`)."""
    if fault.kind == "rate_limit":
        return _rate_limited(fault.wait_s if fault.wait_hint else None)
    if fault.kind == "timeout":
        await hang_until_disconnect(request)
        return error(504, "Deadline expired before operation could complete.")
    return error(*_fault_error(fault))


def _version(request: Request) -> str:
    return "v1" if "/v1/" in request.url.path else "v1beta"
