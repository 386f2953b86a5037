"""The OpenAI routes beyond chat in the gateway's OpenAPI document: embeddings and the Responses API.

Request bodies come from the pydantic models that validate them; answers are described
by hand in OpenAI's shapes, P402's additions in the `p402` object.
"""

from __future__ import annotations

from typing import Any

from .embeddings import EmbeddingsBody
from .openapi import _errors, _events, _json, _ref, _schemas
from .responses_wire import BUILT_IN_TOOLS, ResponsesBody

_OVERLOADED = {
    **_json(_ref("Error"), "No candidate can answer now, or a gateway limit is reached: retry after Retry-After"),
    "headers": {"Retry-After": {"description": "Seconds until a retry may be answered",
                                "schema": {"type": "integer", "minimum": 1}}},
}  # fmt: skip
_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}


def schemas() -> dict[str, Any]:
    out = _schemas(EmbeddingsBody, ResponsesBody)
    for name in ("EmbeddingsBody", "ResponsesBody"):
        out[name]["properties"]["p402"] = {"anyOf": [_ref("P402Options"), {"type": "null"}]}
    out["EmbeddingList"] = {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["object", "index", "embedding"],
                    "properties": {
                        "object": {"const": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {
                            "anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}],
                            "description": "floats, or with encoding_format base64 their little-endian float32 bytes",
                        },
                    },
                },
            },
            "model": {"type": "string"},
            "usage": {
                "type": "object",
                "required": ["prompt_tokens", "total_tokens"],
                "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
            },
            "p402": _ref("P402Meta"),
        },
    }
    out["ResponseObject"] = {
        "type": "object",
        "description": "OpenAI's Response object: output items (reasoning, message, function_call) and usage",
        "required": ["id", "object", "created_at", "status", "error", "incomplete_details", "instructions", "model",
                     "output", "parallel_tool_calls", "metadata", "tool_choice", "tools", "temperature", "top_p"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "created_at": {"type": "number"},
            "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
            "output": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
            "previous_response_id": {"type": ["string", "null"]},
            "p402": _ref("P402Meta"),
        },
    }  # fmt: skip
    return out


def paths() -> dict[str, Any]:
    return {
        "/v1/embeddings": {
            "post": {
                "summary": "Embeddings on any catalog embedding model (OpenAI-compatible)",
                "description": (
                    "`model` pins one (`provider/model` or a wire id) or routes: `auto` takes the cheapest "
                    "embedding model, `p402/quality` the best; a pinned model never fails over (another "
                    "model's vectors are in another space). `input` is a string, strings, or token arrays "
                    "(cl100k ids). The same input on the same model is answered from memory "
                    "(`p402.cached`), never sent upstream twice; `Cache-Control: no-cache` skips that."
                ),
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("EmbeddingsBody")}}},
                "responses": {
                    "200": _json(_ref("EmbeddingList")),
                    **_errors(400, 401, 402, 404, 413, 502, 504),
                    "503": _OVERLOADED,
                },
            }
        },
        "/v1/responses": {
            "post": {
                "summary": "OpenAI's Responses API, routed by P402 to any model",
                "description": (
                    "Runs as a chat completion (same routing, cache, budgets, ledger, usage and cost). "
                    "`previous_response_id` continues a stored response's conversation on any model; "
                    "`store: false` keeps nothing. Function tools only: built-in tools "
                    f"({', '.join(BUILT_IN_TOOLS[:4])}...) are refused with a 400. With `stream: true`, "
                    "typed events: response.created, response.in_progress, response.output_item.added, "
                    "response.content_part.added, response.output_text.delta/.done, "
                    "response.function_call_arguments.delta/.done, response.output_item.done, and "
                    "response.completed (response.incomplete when max_output_tokens cut it short, response.failed if the "
                    "stream breaks after it began)."
                ),
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ResponsesBody")}}},
                "responses": {
                    "200": {
                        "description": "The Response object, with a `p402` object",
                        "content": {
                            "application/json": {"schema": _ref("ResponseObject")},
                            "text/event-stream": _events("The event as JSON", {"type": "string"}),
                        },
                    },
                    **_errors(400, 401, 402, 404, 409, 413, 502, 504),
                    "503": _OVERLOADED,
                },
            }
        },
        "/v1/responses/{response_id}": {
            "parameters": [_RESPONSE_ID],
            "get": {
                "summary": "A stored response, as it was answered",
                "responses": {"200": _json(_ref("ResponseObject")), **_errors(401, 404)},
            },
            "delete": {
                "summary": "Delete a stored response",
                "responses": {
                    "200": _json({
                        "type": "object",
                        "required": ["id", "object", "deleted"],
                        "properties": {"id": {"type": "string"}, "object": {"const": "response.deleted"},
                                       "deleted": {"const": True}},
                    }),  # fmt: skip
                    **_errors(401, 404),
                },
            },
        },
    }
