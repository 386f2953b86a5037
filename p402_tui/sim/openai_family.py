"""The simulator's OpenAI chat wire, as OpenAI and the eight compatible providers speak it.

One `Dialect` per provider holds what differs: the error body shape, where stream
usage goes, SSE comments, and extras such as Perplexity's citations or Groq's
`x_groq`. Everything else is the OpenAI Chat Completions format
(see /work/shared/reference/wire-formats.md sections 1 and 5).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.catalog import ModelSpec, ProviderSpec
from ..core.tokens import count_messages, count_text, encoding_for
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
from .server import SimStream, hang_until_disconnect, whole_answer, words_asked

ErrorShape = Literal["openai", "openrouter", "mistral", "detail"]
StreamUsage = Literal["requested", "last_chunk", "final_message"]

# How an OpenAI-style key the simulator refuses begins (`engine.key_is_known` has the rule).
REJECTED_KEY_PREFIX = "sk-invalid"
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one provider departs from OpenAI's own wire."""

    errors: ErrorShape = "openai"
    stream_usage: StreamUsage = "requested"  # requested: only with stream_options.include_usage
    comment: bytes = b""  # an SSE comment the provider sends before the answer
    x_groq: bool = False
    citations: bool = False
    usage_cost: bool = False
    cache_hit_fields: bool = False  # DeepSeek's prompt_cache_hit_tokens / _miss_tokens
    cache_unit: int = 0  # prompt cache granularity in tokens; 0: no prompt cache
    token_ids: bool = False  # Together adds choices[].text and delta.token_id
    openai_extras: bool = False  # system_fingerprint, refusal, usage details, logprobs
    tools_forbid_stream: bool = False  # AI21: "stream must be False if using tools"
    mistral_tool_choice: bool = False  # auto | none | any; no object form


DIALECTS: dict[str, Dialect] = {
    "openai": Dialect(openai_extras=True, cache_unit=128),
    "groq": Dialect(x_groq=True),
    "deepseek": Dialect(comment=b": keep-alive\n\n", cache_hit_fields=True, cache_unit=64),
    "mistral": Dialect(errors="mistral", stream_usage="last_chunk", mistral_tool_choice=True),
    "together": Dialect(stream_usage="last_chunk", token_ids=True),
    "fireworks": Dialect(),
    "openrouter": Dialect(
        errors="openrouter", stream_usage="final_message", comment=b": OPENROUTER PROCESSING\n\n", usage_cost=True
    ),
    "perplexity": Dialect(stream_usage="last_chunk", citations=True),
    "ai21": Dialect(errors="detail", stream_usage="last_chunk", tools_forbid_stream=True),
}
# Embedding widths the real models return; others default to 1024.
EMBED_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "BAAI/bge-base-en-v1.5": 768,
    "nomic-ai/nomic-embed-text-v1.5": 768,
}
# The OpenAI models that reason before answering (their hidden reasoning is billed as output).
_OPENAI_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


def routes(state: SimState, provider: ProviderSpec) -> list[Route]:
    family = OpenAIFamily(state, provider)
    found = [
        Route("/chat/completions", family.chat, methods=["POST"]),
        Route("/models", family.models, methods=["GET"]),
        Route("/models/{model:path}", family.model, methods=["GET"]),
    ]
    if any("embeddings" in m.capabilities for m in state.catalog.models_of(provider.id)):
        found.append(Route("/embeddings", family.embeddings, methods=["POST"]))
    if not provider.base_path:
        # DeepSeek and Perplexity have no version in their base URL but answer under /v1 as well.
        found += [Route(f"/v1{r.path}", r.endpoint, methods=list(r.methods or ())) for r in found]
    return found


class SimError(Exception):
    """A request the real API would refuse; becomes the provider's error response."""

    def __init__(
        self, status: int, message: str, type: str, code: str | None = None, param: str | None = None, **headers: str
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers


@dataclass(slots=True)
class Reply:
    """One answer ready to be put on the wire."""

    id: str
    model: str
    created: int
    answer: Answer
    reasoning: Answer | None  # shown reasoning (DeepSeek reasoning_content)
    hidden_reasoning_tokens: int  # OpenAI reasoning models: billed, never shown
    cached_tokens: int
    include_usage: bool
    spec: ModelSpec
    extra: dict[str, Any] = field(default_factory=dict)


class OpenAIFamily:
    """The request handlers for one OpenAI-compatible provider."""

    def __init__(self, state: SimState, provider: ProviderSpec) -> None:
        self.state = state
        self.provider = provider
        self.id = provider.id
        self.dialect = DIALECTS.get(provider.id, Dialect())
        self._seen_prompts: OrderedDict[str, None] = OrderedDict()  # the provider-side prompt cache

    # --- endpoints ----------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            body = await self._json_body(request)
            return await self._chat(request, body)
        except SimError as error:
            return self.error_response(error)

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except SimError as error:
            return self.error_response(error)
        created = int(self.state.started)
        data = [
            {"id": m.model, "object": "model", "created": created, "owned_by": self.id}
            for m in self.state.catalog.models_of(self.id)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        """One model, as `models.retrieve()` asks for it; a 404 in the provider's words otherwise."""
        try:
            self._check_auth(request)
            spec = self._model({"model": request.path_params["model"]})
        except SimError as error:
            return self.error_response(error)
        return JSONResponse({"id": spec.model, "object": "model", "created": int(self.state.started), "owned_by": self.id})

    async def embeddings(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            body = await self._json_body(request)
            return await self._embeddings(request, body)
        except SimError as error:
            return self.error_response(error)

    # --- validation -----------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        if self.provider.keyless:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            if self.dialect.errors == "openrouter":
                raise SimError(401, "No auth credentials found", "authentication_error")
            if self.dialect.errors == "detail":
                raise SimError(401, "Bad request: bad or missing authentication.", "authentication_error")
            raise SimError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                "invalid_api_key",
            )
        if not key_is_known(key):
            # Real providers quote (part of) a rejected key back; adapters must scrub it.
            message = f"Incorrect API key provided: {key.strip()}."
            raise SimError(401, message, "invalid_request_error", "invalid_api_key")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            raise SimError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                "HTTP library correctly.)",
                "invalid_request_error",
            ) from None
        if not isinstance(body, dict):
            raise SimError(400, "The request body must be a JSON object.", "invalid_request_error")
        return body

    def _model(self, body: dict[str, Any]) -> ModelSpec:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise SimError(400, "you must provide a model parameter", "invalid_request_error", param="model")
        spec = self.state.model_spec(self.id, model)
        if spec is None:
            raise SimError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        return spec

    def _check_chat_body(self, body: dict[str, Any], spec: ModelSpec) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SimError(400, "'messages' must be a non-empty array", "invalid_request_error", param="messages")
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if not isinstance(role, str) or role not in ROLES:
                raise SimError(
                    400,
                    f"Invalid value for 'messages[{i}].role': expected one of {', '.join(sorted(ROLES))}.",
                    "invalid_request_error",
                    param=f"messages[{i}].role",
                )
            _check_message(i, message)
        tools = body.get("tools")
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            if not isinstance(tool, dict):
                raise SimError(
                    400,
                    f"Invalid type for 'tools[{i}]': expected an object, but got {_json_type(tool)} instead.",
                    "invalid_request_error",
                    "invalid_type",
                    f"tools[{i}]",
                )
        if "chat" not in spec.capabilities:
            raise SimError(
                404,
                "This is not a chat model and thus not supported in the v1/chat/completions endpoint.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        for name in self.provider.unsupported_params:
            if name in body:
                raise SimError(
                    422 if self.dialect.errors == "mistral" else 400,
                    f"Extra inputs are not permitted: {name}" if self.dialect.errors == "mistral"
                    else f"Unsupported parameter: '{name}' is not supported by this API.",
                    "invalid_request_error",
                    "extra_forbidden" if self.dialect.errors == "mistral" else "unsupported_parameter",
                    name,
                )
        if self._reasons_hidden(spec) and "max_tokens" in body:
            raise SimError(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "invalid_request_error",
                "unsupported_parameter",
                "max_tokens",
            )
        temperature = body.get("temperature")
        if self._reasons_hidden(spec) and temperature is not None and temperature != 1:
            raise SimError(
                400,
                f"Unsupported value: 'temperature' does not support {temperature} with this model. "
                "Only the default (1) value is supported.",
                "invalid_request_error",
                "unsupported_value",
                "temperature",
            )
        if self.dialect.tools_forbid_stream and body.get("stream") and body.get("tools"):
            raise SimError(422, "stream must be False if using tools", "invalid_request_error", param="stream")
        choice = body.get("tool_choice")
        if self.dialect.mistral_tool_choice and choice is not None and choice not in ("auto", "none", "any"):
            raise SimError(
                422, "tool_choice must be one of 'auto', 'none', 'any'", "invalid_request_error", param="tool_choice"
            )
        response_format = body.get("response_format")
        if response_format is not None and (
            not isinstance(response_format, dict)
            or response_format.get("type") not in ("text", "json_object", "json_schema")
        ):
            raise SimError(
                400,
                "Invalid value for 'response_format.type': expected one of 'text', 'json_object', 'json_schema'.",
                "invalid_request_error",
                param="response_format",
            )
        if response_format is not None and response_format["type"] == "json_schema":
            described = response_format.get("json_schema")
            if not isinstance(described, dict) or not isinstance(described.get("name"), str):
                raise SimError(400, "Missing required parameter: 'response_format.json_schema.name'.",
                               "invalid_request_error", param="response_format.json_schema.name")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise SimError(400, "max_tokens must be a positive integer", "invalid_request_error", param="max_tokens")

    def _reasons_hidden(self, spec: ModelSpec) -> bool:
        return self.id == "openai" and "reasoning" in spec.capabilities and spec.model.startswith(
            _OPENAI_REASONING_PREFIXES
        )

    # --- chat -----------------------------------------------------------------

    async def _chat(self, request: Request, body: dict[str, Any]) -> Response:
        spec = self._model(body)
        self._check_chat_body(body, spec)
        model = spec.model
        self.state.record_call(self.id, model)
        messages: list[dict[str, Any]] = body["messages"]
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))

        if len(await request.body()) > LARGE_PROMPT_CHARS:
            prompt_tokens = (await asyncio.to_thread(count_messages, messages, spec.id, tools)).tokens
        else:
            prompt_tokens = count_messages(messages, spec.id, tools).tokens
        if prompt_tokens + (max_tokens or 0) > spec.context_window:
            raise SimError(
                400,
                f"This model's maximum context length is {spec.context_window} tokens. However, you requested "
                f"{prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the messages, {max_tokens or 0} in "
                "the completion). Please reduce the length of the messages or completion.",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            )
        if max_tokens is not None and max_tokens > spec.max_output_tokens:
            raise SimError(
                400,
                f"max_tokens is too large: {max_tokens}. This model supports at most {spec.max_output_tokens} "
                f"completion tokens, whereas you provided {max_tokens}.",
                "invalid_request_error",
                "invalid_value",
                "max_tokens",
            )
        fault = self.state.fault_for(self.id, model)
        stream = body.get("stream") is True
        if fault is not None and fault.refuses(stream):
            if fault.kind == "timeout":
                await hang_until_disconnect(request)
                return Response(status_code=504)
            error = self._fault_error(fault, model)
            if fault.kind == "error" and fault.after_tokens and self.dialect.errors == "openrouter":
                # OpenRouter reports a failure after routing inside a 200 answer; the others as a status.
                return JSONResponse(self.error_body(error))
            raise error
        reply = self._reply(request, body, spec, messages, tools, prompt_tokens)
        if stream:
            return SimStream(self._stream(reply, fault), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})
        await self.state.full_latency(self.id, model, len(reply.answer.pieces) + _pieces(reply.reasoning))
        return whole_answer(self._completion(reply), fault)

    def _reply(
        self,
        request: Request,
        body: dict[str, Any],
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        prompt_tokens: int,
    ) -> Reply:
        model = spec.model
        prompt_text = "\n".join(f"{m['role']}: {_text(m.get('content'))}" for m in messages)
        functions = [t["function"] for t in tools or () if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        call_tool = self._tool_to_call(body, messages, functions)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        hidden = 0
        if self._reasons_hidden(spec):
            # max_completion_tokens bounds hidden reasoning and the visible answer together.
            hidden = self.state.answer(self.id, model, "think: " + prompt_text).completion_tokens
            if max_tokens is not None:
                hidden = min(hidden, max_tokens)
                max_tokens -= hidden
        json_mode, schema = _json_format(body.get("response_format"))
        if json_mode and call_tool is None:
            answer = self.state.json_answer(self.id, model, prompt_text, schema)
        else:
            answer = self.state.answer(
                self.id,
                model,
                prompt_text,
                max_tokens=max_tokens,
                tools=functions,
                call_tool=call_tool,
                words=words_asked(request),
            )
        answer.prompt_tokens = prompt_tokens
        reasoning = None
        if self._shows_reasoning(spec, body) and answer.tool_call is None:
            reasoning = self.state.answer(self.id, model, "think: " + prompt_text)
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        reply = Reply(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            model=model,
            created=int(time.time()),
            answer=answer,
            reasoning=reasoning,
            hidden_reasoning_tokens=hidden,
            cached_tokens=self._cached(prompt_text, prompt_tokens),
            include_usage=include_usage,
            spec=spec,
        )
        if self.dialect.citations:
            reply.extra = _citations(answer.text)
        return reply

    def _tool_to_call(
        self, body: dict[str, Any], messages: list[dict[str, Any]], functions: list[dict[str, Any]]
    ) -> str | None:
        """Named tool_choice forces a call; otherwise call the first tool when the user just spoke."""
        if not functions or "tools" in self.provider.unsupported_params:
            return None
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            return name if isinstance(name, str) else None
        if choice == "none":
            return None
        if messages[-1].get("role") == "user" or choice in ("required", "any"):
            return functions[0].get("name")
        return None

    def _shows_reasoning(self, spec: ModelSpec, body: dict[str, Any]) -> bool:
        if self.id != "deepseek":
            return False
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
            return thinking["type"] == "enabled"
        return spec.model == "deepseek-reasoner"

    def _cached(self, prompt_text: str, prompt_tokens: int) -> int:
        """Prompt tokens served from the provider's prompt cache: a repeated long prompt, in cache units."""
        unit = self.dialect.cache_unit
        if not unit or prompt_tokens < max(unit, 1024 if self.id == "openai" else unit):
            return 0
        key = hashlib.sha256(prompt_text.encode()).hexdigest()
        if key in self._seen_prompts:
            self._seen_prompts.move_to_end(key)
            return prompt_tokens // unit * unit
        self._seen_prompts[key] = None
        if len(self._seen_prompts) > 4096:
            self._seen_prompts.popitem(last=False)
        return 0

    # --- answers on the wire ------------------------------------------------------

    def usage(self, reply: Reply) -> dict[str, Any]:
        answer = reply.answer
        reasoning_tokens = reply.hidden_reasoning_tokens + (reply.reasoning.completion_tokens if reply.reasoning else 0)
        prompt = answer.prompt_tokens
        completion = answer.completion_tokens + reasoning_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        dialect = self.dialect
        if dialect.openai_extras:
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens, "audio_tokens": 0}
            usage["completion_tokens_details"] = {
                "reasoning_tokens": reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            }
        elif dialect.cache_hit_fields:
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
            if reasoning_tokens:
                usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
            usage["prompt_cache_hit_tokens"] = reply.cached_tokens
            usage["prompt_cache_miss_tokens"] = prompt - reply.cached_tokens
        elif dialect.usage_cost:
            usage["cost"] = reply.spec.cost(prompt, completion, reply.cached_tokens)
            usage["is_byok"] = False
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        elif dialect.x_groq:
            seconds = completion / reply.spec.tokens_per_s
            usage.update(queue_time=0.012, prompt_time=0.004, completion_time=round(seconds, 6),
                         total_time=round(seconds + 0.004, 6))
        elif dialect.citations:
            usage["search_context_size"] = "low"
        return usage

    def _completion(self, reply: Reply) -> dict[str, Any]:
        answer = reply.answer
        message: dict[str, Any] = {"role": "assistant", "content": answer.text if answer.tool_call is None else None}
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning.text
        if answer.tool_call is not None:
            call = answer.tool_call
            function = {"name": call["name"], "arguments": call["arguments"]}
            message["tool_calls"] = [{"id": call["id"], "type": "function", "function": function}]
        if self.dialect.openai_extras:
            message["refusal"] = None
        out: dict[str, Any] = {
            "id": reply.id,
            "object": "chat.completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}],
        }
        if self.state.usage:
            out["usage"] = self.usage(reply)
        if self.dialect.openai_extras:
            out["system_fingerprint"] = "fp_p402sim"
        if self.dialect.x_groq:
            out["x_groq"] = {"id": f"req_{reply.id[9:]}"}
        out.update(reply.extra)
        return out

    def _chunk(self, reply: Reply, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if self.dialect.token_ids:
            choice["text"] = delta.get("content") or ""
        if self.dialect.openai_extras:
            choice["logprobs"] = None
        out: dict[str, Any] = {
            "id": reply.id,
            "object": "chat.completion.chunk",
            "created": reply.created,
            "model": reply.model,
            "choices": [choice],
        }
        if self.dialect.openai_extras:
            out["system_fingerprint"] = "fp_p402sim"
            if reply.include_usage:
                out["usage"] = None
        return out

    async def _stream(self, reply: Reply, fault: Fault | None) -> AsyncIterator[bytes]:
        """The SSE body; faults fire between pieces, as a real stream breaks mid-answer."""
        answer, reasoning = reply.answer, reply.reasoning
        shown = reasoning.pieces if reasoning is not None else []
        calling = answer.tool_call is not None
        pieces = json_fragments(answer.tool_call["arguments"]) if answer.tool_call is not None else answer.pieces
        broken_at = fault.after_tokens if fault is not None and fault.written_in_stream else -1
        # Unpaced answers go out in batches, as a real server flushes; a fault must see each piece sent first.
        batch = 1 if self.state.latency or fault is not None else UNPACED_BATCH
        with self.state.track_stream() as tracker:
            yield self.dialect.comment + _frame(self._head(reply))
            frames: list[bytes] = []
            if answer.tool_call is not None:
                call = answer.tool_call
                first = {"index": 0, "id": call["id"], "type": "function",
                         "function": {"name": call["name"], "arguments": ""}}
                frames.append(_frame(self._chunk(reply, {"tool_calls": [first]})))
            paced = self.state.paced(self.id, reply.model, shown + pieces, fault)
            index = 0
            try:
                async with aclosing(paced):
                    async for piece in paced:
                        if index == broken_at:
                            break
                        if index < len(shown):
                            delta: dict[str, Any] = {"content": None, "reasoning_content": piece}
                        elif calling:
                            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                        else:
                            delta = {"content": piece}
                        if self.dialect.token_ids:
                            delta["token_id"] = index + 1
                        frames.append(_frame(self._chunk(reply, delta)))
                        index += 1
                        if len(frames) >= batch:
                            yield b"".join(frames)
                            frames.clear()
            except SimDisconnect:
                if frames:
                    yield b"".join(frames)
                raise
            if broken_at >= 0 and fault is not None and fault.kind == "error":
                # The error event OpenAI and OpenRouter send when an answer fails mid-stream.
                tracker.broken = True
                frames.append(_frame(self.error_body(self._fault_error(fault, reply.model))))
            elif broken_at >= 0:
                tracker.broken = True
                frames.append(b'data: {"id":"' + reply.id.encode() + b'","object":"chat.completion.ch\n\n')
            else:
                frames += self._tail(reply)
            yield b"".join(frames)

    def _head(self, reply: Reply) -> dict[str, Any]:
        head = self._chunk(reply, {"role": "assistant", "content": ""})
        if self.dialect.x_groq:
            head["x_groq"] = {"id": f"req_{reply.id[9:]}"}
        if self.dialect.token_ids:
            head["choices"][0]["delta"]["token_id"] = 0
        return head

    def _tail(self, reply: Reply) -> list[bytes]:
        """The finish chunk, usage wherever this provider puts it, and [DONE]."""
        dialect = self.dialect
        last = self._chunk(reply, {}, reply.answer.finish_reason)
        if not self.state.usage:  # a server that counts nothing: the stream just ends
            return [_frame({**last, **reply.extra}), b"data: [DONE]\n\n"]
        usage = self.usage(reply)
        if dialect.stream_usage == "last_chunk":
            last["usage"] = usage
        if dialect.x_groq:
            last["x_groq"] = {"id": f"req_{reply.id[9:]}", "usage": usage}
        last.update(reply.extra)
        frames = [_frame(last)]
        if dialect.stream_usage == "final_message" or (dialect.stream_usage == "requested" and reply.include_usage):
            tail = self._chunk(reply, {})
            tail["choices"] = []
            tail["usage"] = usage
            frames.append(_frame(tail))
        frames.append(b"data: [DONE]\n\n")
        return frames

    def _fault_error(self, fault: Fault, model: str) -> SimError:
        if fault.kind == "rate_limit":
            wait = fault.retry_after_s if fault.retry_after_s is not None else 1.0
            headers = {"x-ratelimit-remaining-requests": "0"}
            if fault.wait_hint:
                headers["retry-after"] = f"{wait:g}"
            if self.dialect.errors == "mistral":
                return SimError(429, "Rate limit exceeded", "rate_limited", "1300", **headers)
            return SimError(
                429,
                f"Rate limit reached for {model} on requests per min (RPM): Limit 60, Used 60, Requested 1. "
                + (f"Please try again in {wait:g}s." if fault.wait_hint else "Please try again later."),
                "requests",
                "rate_limit_exceeded",
                **headers,
            )
        status = fault.status or 500
        headers = {"retry-after": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else {}
        messages = {
            500: ("The server had an error while processing your request. Sorry about that!", "server_error"),
            502: ("Bad gateway.", "server_error"),
            503: ("The engine is currently overloaded, please try again later.", "server_error"),
            529: ("That model is currently overloaded with other requests.", "overloaded_error"),
        }
        message, kind = messages.get(status, (f"Upstream error {status}.", "server_error"))
        return SimError(status, message, kind, **headers)

    def error_response(self, error: SimError) -> JSONResponse:
        return JSONResponse(self.error_body(error), status_code=error.status, headers=error.headers)

    def error_body(self, error: SimError) -> dict[str, Any]:
        """The error in this provider's own body shape."""
        shape = self.dialect.errors
        if shape == "detail":
            body: dict[str, Any] = {"detail": error.message}
        elif shape == "mistral":
            body = {"object": "error", "message": error.message, "type": error.type, "param": error.param,
                    "code": error.code}
        elif shape == "openrouter":
            body = {"error": {"code": error.status, "message": error.message, "metadata": {"code": error.code}}}
        else:
            body = {"error": {"message": error.message, "type": error.type, "param": error.param,
                              "code": error.code}}
        return body

    # --- embeddings ---------------------------------------------------------------

    async def _embeddings(self, request: Request, body: dict[str, Any]) -> Response:
        spec = self._model(body)
        if "embeddings" not in spec.capabilities:
            raise SimError(400, f"{spec.model} is not an embeddings model", "invalid_request_error", param="model")
        texts = _embedding_texts(body.get("input"))
        if texts is None:
            raise SimError(400, "'input' must be a string, a non-empty array of strings, or token arrays",
                           "invalid_request_error", param="input")
        self.state.record_call(self.id, spec.model)
        fault = self.state.fault_for(self.id, spec.model)
        if fault is not None and fault.kind == "timeout":
            await hang_until_disconnect(request)
            return Response(status_code=504)
        if fault is not None and fault.kind in ("error", "rate_limit"):
            raise self._fault_error(fault, spec.model)
        dimensions = body.get("dimensions") or EMBED_DIMENSIONS.get(spec.model, 1024)
        if not isinstance(dimensions, int) or dimensions < 1:
            raise SimError(400, "'dimensions' must be a positive integer", "invalid_request_error", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = unit_vector(f"{self.state.seed}|{spec.id}|{text}", dimensions)
            embedding: Any = base64.b64encode(vector.tobytes()).decode() if as_base64 else vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(count_text(t).tokens for t in texts)
        return JSONResponse({"object": "list", "data": data, "model": spec.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _embedding_texts(raw: Any) -> list[str] | None:
    """`input` as texts: a string, strings, one token array or token arrays (cl100k ids, as OpenAI reads them)."""
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw, list) and raw and all(type(t) is int for t in raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        return None
    texts = []
    for item in raw:
        if isinstance(item, list) and item and all(type(t) is int for t in item):
            encoding, _ = encoding_for("text-embedding-3-small")
            try:
                item = encoding.decode(item) if encoding is not None else None
            except (KeyError, ValueError, OverflowError):
                item = None
        if not isinstance(item, str) or not item:
            return None
        texts.append(item)
    return texts


def unit_vector(key: str, dimensions: int) -> np.ndarray:
    """A deterministic float32 unit vector for `key`."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _json_format(response_format: Any) -> tuple[bool, dict[str, Any] | None]:
    """(whether the answer must be JSON, the schema it must fit) from a checked response_format."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = response_format["json_schema"].get("schema")
        return True, schema if isinstance(schema, dict) else None
    return kind == "json_object", None


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _pieces(answer: Answer | None) -> int:
    return len(answer.pieces) if answer is not None else 0


def _citations(text: str) -> dict[str, Any]:
    digest = hashlib.sha256(text.encode()).hexdigest()
    urls = [f"https://example.org/source/{digest[i : i + 8]}" for i in (0, 8)]
    return {
        "citations": urls,
        "search_results": [
            {"title": f"Source {n + 1}", "url": url, "date": "2026-01-01"} for n, url in enumerate(urls)
        ],
    }



def _json_type(value: Any) -> str:
    """How OpenAI's errors name a JSON value's type: 'an array', 'a string', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "an array", str: "a string"}.get(type(value), "an object")


_PART_FIELDS = {"text": ("text", str), "image_url": ("image_url", dict), "input_audio": ("input_audio", dict),
                "file": ("file", dict), "refusal": ("refusal", str)}


def _check_message(i: int, message: dict[str, Any]) -> None:
    """A message's fields have the types OpenAI's API takes, or a 400 names the first that does not."""
    def wrong(path: str, expected: str, value: Any) -> SimError:
        return SimError(
            400,
            f"Invalid type for 'messages[{i}].{path}': expected {expected}, but got {_json_type(value)} instead.",
            "invalid_request_error",
            "invalid_type",
            f"messages[{i}].{path}",
        )

    for name in ("name", "tool_call_id"):
        if name in message and not isinstance(message[name], str):
            raise wrong(name, "a string", message[name])
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in _PART_FIELDS:
                raise wrong(f"content[{j}]", f"an object with a type of {', '.join(_PART_FIELDS)}", part)
            field, expected = _PART_FIELDS[kind]
            if not isinstance(part.get(field), expected):
                raise wrong(f"content[{j}].{field}", "a string" if expected is str else "an object", part.get(field))
    elif content is not None and not isinstance(content, str):
        raise wrong("content", "a string or an array of content parts", content)
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise wrong("tool_calls", "an array", calls)
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise wrong(f"tool_calls[{j}].function", "an object with a name", function)
