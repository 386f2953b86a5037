"""Anthropic's Messages API on the gateway: `POST /v1/messages` and `/v1/messages/count_tokens`.

Any routed model answers, through the same path as the chat route (`Gateway.run`):
routing, failover, the cache, budgets, sessions and the ledger. Every refusal is in
Anthropic's error shape, with its status, so Anthropic's SDKs raise their own typed
exceptions; 529 `overloaded_error` when no candidate could answer.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..core import jsonpieces
from ..core.errors import AllAttemptsFailedError, P402Error, ProviderError, UnavailableError
from ..core.tokens import count_messages, off_loop
from ..core.types import ChatResponse, json_bytes
from . import anthropic_wire as wire
from .bodies import route_options
from .errors import NO_ANSWER, GatewayError, describe_attempts

logger = logging.getLogger("p402.gateway")

PATHS = ("/v1/messages", "/v1/messages/count_tokens")
SOURCE = "gateway:messages"  # a record's source: the gateway, through this API
LARGE_COUNT_BYTES = 256 * 1024  # a body this large is counted off the loop


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, request_id: str | None = None
) -> Response:
    body = json_bytes(wire.error_body(kind, message, request_id))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def from_gateway_error(error: GatewayError, request_id: str | None = None) -> Response:
    """One of the gateway's own refusals (bad body, no key, too large) in Anthropic's shape."""
    message = error.message
    if error.status == 401:
        message += " (Anthropic's SDKs send it as x-api-key: set ANTHROPIC_API_KEY to a P402 key)"
    kind = wire.ERROR_TYPES.get(error.status, "api_error")
    return error_response(error.status, kind, message, error.headers, request_id)


def from_p402_error(error: P402Error, request_id: str | None = None) -> Response:
    status, kind = wire.status_and_type(error)
    message = str(error.message)
    if isinstance(error, AllAttemptsFailedError) and error.attempts:
        message = describe_attempts(error)
    headers = None
    if isinstance(error, UnavailableError):
        headers = {"retry-after": str(max(1, round(error.retry_after_s + 0.5)))}
    return error_response(status, kind, message, headers, request_id)


def _refused(request: Request, reason: str | None, message: str) -> None:
    request.scope["p402.refusal"] = (reason, message)  # read by the gateway's RequestRejected event


class MessagesRoute:
    """The Messages endpoints of one gateway."""

    def __init__(self, gateway: Any, read_body: Any) -> None:
        self.gateway = gateway
        self.read_body = read_body  # the gateway's, with its size limit

    async def create(self, request: Request) -> Response:
        try:
            parse = functools.partial(parse_messages, headers=wire.upstream_headers(request.headers))
            return await self.gateway.run(request, parse, answer, frames)
        except Exception as error:
            return self._refusal(request, error)

    async def count_tokens(self, request: Request) -> Response:
        try:
            return await self._count(request)
        except Exception as error:
            return self._refusal(request, error)

    def _refusal(self, request: Request, error: Exception) -> Response:
        request_id = request.scope.get("p402.request_id")  # the ledger row, once the request has one
        if isinstance(error, GatewayError):
            _refused(request, error.code, error.message)
            return from_gateway_error(error, request_id)
        if isinstance(error, P402Error):
            _refused(request, error.kind, error.message)
            return from_p402_error(error, request_id)
        if isinstance(error, ClientDisconnect):
            return NO_ANSWER
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, "api_error", "internal error in the gateway; see its log")

    async def _count(self, request: Request) -> Response:
        catalog = self.gateway.orchestrator.catalog
        body = await self.read_body(request, self.gateway.max_body)
        data = _json(body)
        parsed = wire.validated(wire.CountBody, data)
        data.pop("p402", None)
        model = wire.resolve(catalog, parsed.model)
        chat = wire.to_chat(parsed, data, model, wire.upstream_headers(request.headers))
        spec = catalog.models.get(model or "")
        if spec is not None and catalog.providers[spec.provider].wire == wire.WIRE:
            counted = await self._provider_count(chat, spec)
            if counted is not None:  # Anthropic's own count
                return Response(json_bytes({"input_tokens": counted}), media_type="application/json",
                                headers={"p402-token-count": f"provider; {spec.provider}"})  # fmt: skip
        wire_model = spec.model if spec is not None else None
        if len(body) >= LARGE_COUNT_BYTES:
            count = await off_loop(count_messages, chat.messages, wire_model, chat.tools)
        else:
            count = count_messages(chat.messages, wire_model, chat.tools)
        how = f"p402; tokenizer={count.tokenizer}; {'exact' if count.exact else 'estimate'}"
        return Response(json_bytes({"input_tokens": count.tokens}), media_type="application/json",
                        headers={"p402-token-count": how})  # fmt: skip


    async def _provider_count(self, chat: Any, spec: Any) -> int | None:
        """The provider's own count; None (P402 counts instead) when it cannot be asked or does not answer.
        A request the provider refuses as bad is refused here too."""
        try:
            adapter = self.gateway.orchestrator.adapter(spec.provider)
            return await adapter.count_tokens(chat, model=spec.model)
        except ProviderError as error:
            if error.scope == "request" and 400 <= error.http_status < 500:
                raise
            logger.info("no token count from %s, counting here: %s", spec.provider, error.message)
            return None


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = jsonpieces.loads(body)
    except ValueError as error:
        raise GatewayError(400, f"request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the request body must be a JSON object", code="invalid_value")
    return data


def parse_messages(
    body: bytes, catalog: Any, *, api_key_id: str | None, no_cache: bool, headers: dict[str, str] | None = None
) -> tuple[Any, Any, Any]:
    """A Messages body as the chat request, route options and context `Gateway.run` takes;
    `headers`: those an Anthropic model's upstream gets as they came (see `anthropic_wire.upstream_headers`)."""
    data = _json(body)
    parsed = wire.validated(wire.MessagesBody, data)
    raw_options = data.pop("p402", None)
    model = wire.resolve(catalog, parsed.model)
    options, ctx = route_options(raw_options, model, catalog, api_key_id=api_key_id, no_cache=no_cache)
    ctx.source = SOURCE
    return wire.to_chat(parsed, data, model, headers), options, ctx


def answer(response: ChatResponse) -> Response:
    return Response(json_bytes(wire.message(response)), media_type="application/json",
                    headers=wire.meta_headers(response.p402))  # fmt: skip


def frames(stream: Any, first: Any, chat: Any, durable: Any) -> Any:
    return wire.message_events(stream, first, durable)


frames.end = wire.STREAM_END  # type: ignore[attr-defined]
frames.ping = wire.PING  # type: ignore[attr-defined]


# --- the OpenAPI document's part ------------------------------------------------------------

_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error", "request_id"],
    "properties": {
        "type": {"const": "error"},
        "request_id": {"type": ["string", "null"], "description": "P402's id of the request, once it has one"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"enum": sorted(set(wire.ERROR_TYPES.values()))}, "message": {"type": "string"}},
        },
    },
}
_USAGE = {
    "type": "object",
    "required": ["input_tokens", "output_tokens"],
    "properties": {name: {"type": "integer"} for name in
                   ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")},
}  # fmt: skip
_MESSAGE = {
    "type": "object",
    "required": ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "stop_details", "usage",
                 "container"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "model": {"type": "string"},
        "content": {"type": "array", "items": {"type": "object", "required": ["type"],
                                               "properties": {"type": {"type": "string"}}}},  # fmt: skip
        "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal", None]},
        "stop_sequence": {"type": ["string", "null"]},
        "stop_details": {"type": ["object", "null"]},
        "usage": _USAGE,
        "container": {"type": ["object", "null"]},
    },
}
_STATUSES = {
    400: "Invalid body (`invalid_request_error`)",
    401: "A gateway key is needed: `x-api-key` or `Authorization: Bearer` (`authentication_error`)",
    402: "The session's budget would be exceeded (`billing_error`)",
    404: "Unknown model (`not_found_error`)",
    413: "Body larger than the configured limit (`request_too_large`)",
    504: "The request's deadline passed (`timeout_error`)",
    529: "No candidate could answer: every one is down or failed (`overloaded_error`)",
}


def _refusals(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": _STATUSES[s], "content": {"application/json": {"schema": _ANTHROPIC_ERROR}}}
            for s in statuses}  # fmt: skip


def openapi_schemas() -> dict[str, Any]:
    """The request bodies' schemas, for the document's components."""
    out: dict[str, Any] = {}
    for name, model in (("MessagesRequest", wire.MessagesBody), ("CountTokensRequest", wire.CountBody)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[name] = schema
    return out


def openapi_paths() -> dict[str, Any]:
    """The Messages routes as the gateway's OpenAPI document describes them."""
    security = [{"bearer": []}, {"x_api_key": []}]
    body = {"required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MessagesRequest"}}}}  # fmt: skip
    count_body = {"required": True,
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CountTokensRequest"}}}}
    return {
        "/v1/messages": {
            "post": {
                "summary": "Anthropic's Messages API, answered by any routed model",
                "description": (
                    "Anthropic's request and answer shapes for every model P402 routes to: an Anthropic model gets "
                    "the body as sent and its answer comes back whole; other models' answers are translated. "
                    "`model` takes Anthropic's ids with or without their date, `provider/model`, or `auto`. P402 "
                    "options go in a `p402` object; P402's figures come back in `p402-*` headers (provider, model, "
                    "cost, decision id). With `stream: true`, Anthropic's named events: message_start, ping, "
                    "content_block_start/delta/stop, message_delta, message_stop (or error)."
                ),
                "security": security,
                "requestBody": body,
                "responses": {
                    "200": {
                        "description": "The answer, an Anthropic message",
                        "content": {
                            "application/json": {"schema": _MESSAGE},
                            "text/event-stream": {"schema": {"type": "string"}, "itemSchema": {
                                "type": "object", "required": ["event", "data"],
                                "properties": {"event": {"enum": ["message_start", "ping", "content_block_start",
                                                                  "content_block_delta", "content_block_stop",
                                                                  "message_delta", "message_stop", "error"]},
                                               "data": {"type": "string", "description": "The event as JSON"}},
                            }},
                        },
                    },
                    **_refusals(400, 401, 402, 404, 413, 504, 529),
                },
            }
        },
        "/v1/messages/count_tokens": {
            "post": {
                "summary": "Tokens a Messages request's prompt holds",
                "description": "Anthropic's models: Anthropic's own count (`p402-token-count: provider; anthropic`). "
                               "Others: P402's tokenizer for the model; the `p402-token-count` header says which "
                               "tokenizer and whether the count is exact or an estimate.",
                "security": security,
                "requestBody": count_body,
                "responses": {
                    "200": {"description": "The count", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["input_tokens"],
                        "properties": {"input_tokens": {"type": "integer"}}}}}},  # fmt: skip
                    **_refusals(400, 401, 404, 413),
                },
            }
        },
    }
