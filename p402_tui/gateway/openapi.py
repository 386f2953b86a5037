"""The OpenAPI 3.2 description of the gateway, served at /openapi.json.

Request bodies come from the same pydantic models that validate them, so the
document cannot drift from what the gateway accepts; answers are described by
hand, in OpenAI's shapes where the route is OpenAI's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from .. import __version__
from ..core.events import EVENT_KINDS
from ..core.sessions import SESSION_STATUSES
from ..core.types import ChatRequest
from ..service.spend import PERIOD_PATTERN
from ..policy.rules import KeyPolicy
from .bodies import DECISION_RING, SESSION_PAGE_MAX, CompareBody, P402Options, SessionCreate, SessionPatch
from .messages import openapi_paths as messages_paths
from .messages import openapi_schemas as messages_schemas
from .keys import KeyCreate, KeyPatch

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _events(data: str, event: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `text/event-stream` media type: the body is text, each event an object (OpenAPI 3.2's `itemSchema`)."""
    properties: dict[str, Any] = {"data": {"type": "string", "description": data}}
    if event is not None:
        properties["event"] = event
    item = {"type": "object", "required": ["data"], "properties": properties}
    return {"schema": {"type": "string"}, "itemSchema": item}


def _list_of(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": schema}},
    }


def _page_of(schema: dict[str, Any]) -> dict[str, Any]:
    page = _list_of(schema)
    page["required"] = ["object", "data", "has_more"]
    page["properties"] |= {
        "has_more": {"type": "boolean"},
        "first_id": {"type": ["string", "null"]},
        "last_id": {"type": ["string", "null"]},
    }
    return page


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid body or parameter; no eligible model",
        401: "A gateway key is needed (Authorization: Bearer)",
        402: "The session's or the key's budget would be exceeded (code budget_exceeded)",
        403: "The key's role or model rules refuse it (code permission_denied or model_not_allowed)",
        404: "Unknown model or resource",
        409: "The session is paused or closed, or the name is taken",
        413: "Body larger than the configured limit",
        429: "The key's requests or tokens a minute are reached; Retry-After and x-ratelimit-* say when",
        502: "Every upstream attempt failed; the message lists them",
        503: "No store behind this gateway, or one of its limits reached (Retry-After says when to retry)",
        504: "The request's deadline (p402.timeout_s, else [router] request_timeout_s) passed",
    }
    return {str(s): _json(_ref("Error"), reasons[s]) for s in statuses}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """JSON schemas of the body models, their nested definitions lifted into components."""
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


_AUTHED = [{"bearer": []}]
_PERIOD = {
    "name": "period",
    "in": "query",
    "description": "today, Nd (7d, 30d; the default), all, or FROM..TO local dates (YYYY-MM-DD)",
    "schema": {"type": "string", "pattern": PERIOD_PATTERN},
}
_ID = {"name": "session_id", "in": "path", "required": True, "description": "the session's id, or its name",
       "schema": {"type": "string"}}
_INCLUDE_SIMULATED = {
    "name": "include_simulated",
    "in": "query",
    "description": "count requests the simulator answered (default: only on a gateway that simulates, `serve --sim`)",
    "schema": {"type": "boolean"},
}


def _limit(default: int, maximum: int = SESSION_PAGE_MAX) -> dict[str, Any]:
    return {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": maximum,
                                                       "default": default}}


def _session_list(summary: str, item: str, default_limit: int) -> dict[str, Any]:
    """A list under one session: its path parameter, a limit, and 404 for an unknown session."""
    return {
        "parameters": [_ID],
        "get": {
            "summary": summary,
            "parameters": [_limit(default_limit)],
            "responses": {"200": _json(_list_of(_ref(item))), **_errors(400, 401, 404, 503)},
        },
    }

_HEALTH = {
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "not_ready"]},
        "reason": {"type": ["string", "null"]},
        "uptime_s": {"type": "number"},
        "providers_usable": {"type": "integer"},
        "embedder": {"anyOf": [_ref("Embedder"), {"type": "null"}]},
    },
}

_CHAT = {
    "post": {
        "summary": "Chat completion, routed by P402 (OpenAI-compatible)",
        "description": (
            "`model` absent or `auto` routes (`p402/cost`, `p402/quality`... route in that mode); `provider/model` "
            "pins; a bare wire id is looked up in the catalog. "
            "P402 options go in a `p402` object (the OpenAI SDK's `extra_body`). With `stream: true` the answer is "
            "`text/event-stream` of `chat.completion.chunk` objects ending with `data: [DONE]`; "
            "`stream_options.include_usage` adds a final chunk with `choices: []` and `usage`. "
            "`Cache-Control: no-cache` skips the answer cache."
        ),
        "requestBody": _body("ChatCompletionRequest"),
        "responses": {
            "200": {
                "description": "The answer, with a `p402` object: provider, model, cost, latency, attempts",
                "content": {
                    "application/json": {"schema": _ref("ChatCompletion")},
                    "text/event-stream": _events(
                        "A `chat.completion.chunk` as JSON, or `{\"error\": {...}}` if the stream breaks after it "
                        "began; the last event's data is `[DONE]`"
                    ),
                },
            },
            **_errors(400, 401, 402, 403, 404, 409, 413, 429, 502, 504),
            "503": {
                **_json(_ref("Error"), "No candidate can answer now (each throttled or ejected, or every attempt "
                        "failed; `type` overloaded_error), or one of the gateway's own limits is reached "
                        "(`code` overloaded or store_overloaded): try again after Retry-After"),
                "headers": {"Retry-After": {"description": "Seconds until a retry may be answered",
                                            "schema": {"type": "integer", "minimum": 1}}},
            },
        },
    }
}


_KEY_FILTER = {
    "name": "key", "in": "query", "schema": {"type": "string"},
    "description": "only this gateway key's (a user key always sees only its own)",
}
_KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
# Admin keys only: any other role gets a 403.
_KEYS: dict[str, Any] = {
    "/api/v2/keys": {
        "get": {
            "summary": "Every gateway key (never its secret) with its role, policy, spend this period and live figures",
            "responses": {"200": _json(_list_of({"type": "object"})), **_errors(401, 403)},
        },
        "post": {
            "summary": "Make a key; the answer's `key` is the secret, shown this once (policy: see KeyPolicy)",
            "requestBody": _body("KeyCreate"),
            "responses": {"201": _json({"type": "object"}, "Created"), **_errors(400, 401, 403, 413)},
        },
    },
    "/api/v2/keys/{key_id}": {
        "parameters": [_KEY_ID],
        "get": {"summary": "One key", "responses": {"200": _json({"type": "object"}), **_errors(401, 403, 404)}},
        "patch": {
            "summary": "Change a key's name, role or policy (merged; a field sent as null goes); gateways apply it at once",
            "requestBody": _body("KeyPatch"),
            "responses": {"200": _json({"type": "object"}), **_errors(400, 401, 403, 404, 413)},
        },
        "delete": {"summary": "Revoke a key", "responses": {"200": _json({"type": "object"}), **_errors(401, 403, 404)}},
    },
    "/api/v2/keys/{key_id}/requests": {
        "parameters": [_KEY_ID],
        "get": {
            "summary": "The key's latest requests from the ledger, newest first",
            "responses": {"200": _json(_list_of(_ref("LedgerRow"))), **_errors(401, 403, 404)},
        },
    },
}


def build_openapi(providers: Iterable[str] = (), *, keys_enforced: bool = True) -> dict[str, Any]:
    """The document for a gateway routing to `providers`; without keys in force no operation needs one."""
    schemas = _schemas(ChatRequest, P402Options, CompareBody, SessionCreate, SessionPatch, KeyCreate, KeyPatch, KeyPolicy)
    known = list(providers)
    if known:
        for field in ("prefer", "exclude"):
            schemas["P402Options"]["properties"][field]["items"] = {"enum": known}
    schemas["ChatCompletionRequest"] = {
        "allOf": [_ref("ChatRequest"), {"type": "object", "properties": {"p402": _ref("P402Options")}}]
    }
    schemas.update(
        {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "param", "code"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                    }
                },
            },
            "ChatCompletion": {
                "type": "object",
                "required": ["id", "object", "created", "model", "choices", "usage"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "chat.completion"},
                    "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object"}},
                    "usage": {"type": "object"},
                    "p402": _ref("P402Meta"),
                },
            },
            "P402Meta": {
                "type": "object",
                "properties": {
                    "provider": {"type": "string"},
                    "model": {"type": "string"},
                    "cost_usd": {"type": ["number", "null"], "description": "null: the model has no known price"},
                    "priced": {"type": "boolean"},
                    "dropped_params": {"type": "array", "items": {"type": "string"},
                                       "description": "parameters the model's rules left out of the request"},
                    "cached": {"type": "boolean"},
                    "latency_ms": {"type": "number"},
                    "ttft_ms": {"type": ["number", "null"]},
                    "attempts": {"type": "array", "items": {"type": "object"}},
                    "decision_id": {"type": ["string", "null"]},
                    "saved_usd": {"type": "number"},
                },
            },
            "Model": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                },
            },
            "Provider": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "name": {"type": "string"},
                    "wire": {"type": "string"},
                    "usable": {"type": "boolean"},
                    "enabled": {"type": "boolean"},
                    "health": {"type": ["object", "null"]},
                    "models": {"type": "array", "items": {"type": "object"}},
                },
            },
            "Embedder": {
                "type": "object",
                "description": "What turns prompts into vectors for the semantic tier",
                "properties": {
                    "name": {"type": "string", "description": "all-MiniLM-L6-v2, hashed-ngram, or provider/model"},
                    "dim": {"type": "integer"},
                    "label": {
                        "enum": ["semantic", "lexical"],
                        "description": "lexical: no model weights, so only near-exact prompts match",
                    },
                    "min_threshold": {"type": "number"},
                },
            },
            "CacheStats": {
                "type": "object",
                "required": ["enabled"],
                "description": "Only `enabled: false` when the cache is off or the gateway has no store",
                "properties": {
                    "enabled": {"type": "boolean"},
                    "embedder": {"anyOf": [_ref("Embedder"), {"type": "null"}]},
                    "loaded": {"type": "boolean", "description": "the embedder and stored entries are loaded"},
                    "building": {"type": "boolean", "description": "the static vectors are being made (first use)"},
                    "confirmer": {
                        "anyOf": [_ref("Embedder"), {"type": "object", "properties": {"loaded": {"const": False}}},
                                  {"type": "null"}],
                        "description": "the model that confirms the static stage's candidates; loaded at the first one",
                    },
                    "threshold": {"type": "number", "description": "cosine in force (a lexical embedder raises it)"},
                    "candidate_threshold": {
                        "type": ["number", "null"],
                        "description": "static-stage cosine for a candidate worth confirming (null: one stage)",
                    },
                    "configured_threshold": {"type": "number"},
                    "ttl_s": {"type": "number"},
                    "max_entries": {"type": "integer"},
                    "entries": {"type": "integer"},
                    "indexed": {"type": "integer"},
                    "index_bytes": {"type": "integer"},
                    "memory_bytes": {
                        "type": "integer",
                        "description": "what the cache keeps in memory as it counts it: entries, LRU table, indexes, probes",
                    },
                    "warning": {"type": ["string", "null"]},
                    "hits": {"type": "integer"},
                    "exact_hits": {"type": "integer"},
                    "semantic_hits": {"type": "integer"},
                    "misses": {"type": "integer"},
                    "hit_rate": {"type": "number"},
                    "exact_hit_rate": {"type": "number", "description": "exact-tier hits / lookups"},
                    "semantic_hit_rate": {"type": "number", "description": "semantic-tier hits / lookups"},
                    "semantic_lookups": {"type": "integer", "description": "lookups that embedded their prompt"},
                    "semantic_batches": {
                        "type": "integer",
                        "description": "worker jobs those lookups went in (lookups that arrive together share one)",
                    },
                    "semantic_cpu_ms_per_lookup": {
                        "type": "number",
                        "description": "worker CPU of the semantic tier (embed, search, confirm) per such lookup",
                    },
                    "confirmations": {"type": "integer", "description": "lookups whose candidates MiniLM judged"},
                    "saved_usd": {"type": "number"},
                    "refused_near_misses": {"type": "integer"},
                    "inserts": {"type": "integer"},
                    "evictions": {"type": "integer"},
                    "expired": {"type": "integer"},
                    "embed_errors": {"type": "integer"},
                },
            },
            "Session": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "name": {"type": "string"},
                    "budget_usd": {"type": ["number", "null"]},
                    "spent_usd": {"type": "number"},
                    "requests": {"type": "integer"},
                    "status": {"enum": list(SESSION_STATUSES)},
                    "agent": {"type": ["string", "null"]},
                    "metadata": {"type": "object"},
                },
            },
            "LedgerRow": {
                "type": "object",
                "description": "One request as the spend ledger keeps it",
                "properties": {
                    **{name: {"type": "string"} for name in ("id", "status", "source")},
                    **{
                        name: {"type": ["string", "null"]}
                        for name in ("session_id", "api_key_id", "tag", "mode", "provider", "model", "error_kind",
                                     "error", "decision_id", "namespace", "needs", "prompt_key")
                    },
                    **{
                        name: {"type": "integer"}
                        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
                    },
                    **{name: {"type": "number"} for name in ("ts", "saved_usd", "latency_ms")},
                    **{name: {"type": ["number", "null"]} for name in ("cost_usd", "est_cost_usd", "ttft_ms")},
                    "priced": {"type": "boolean", "description": "false: the model had no known price (cost_usd null)"},
                    "cached": {"type": "boolean"},
                    "stream": {"type": "boolean"},
                    "attempts": {"type": "array", "items": {"type": "object"}},
                },
            },
            "DecisionSummary": {
                "type": "object",
                "description": "A routing decision in brief, and how its request went once it finished",
                "properties": {
                    "id": {"type": "string"},
                    "ts": {"type": "number"},
                    "mode": {"type": "string"},
                    "chosen": {"type": ["string", "null"], "description": "provider/model the router chose"},
                    "model": {"type": ["string", "null"], "description": "provider/model that answered (a failover differs)"},
                    "status": {"enum": ["ok", "error", "pending", "no_model"]},
                    **{name: {"type": ["string", "null"]} for name in ("error_kind", "request_id", "session_id")},
                    "source": {"type": ["string", "null"], "description": "where the request came from, as recorded"},
                    "api": {"type": ["string", "null"], "description": "the API it came through: chat_completions, "
                            "messages, responses or embeddings; cli or console when not through the gateway"},
                    **{name: {"type": ["number", "null"]} for name in ("est_cost_usd", "cost_usd", "latency_ms")},
                    "candidates": {"type": "integer", "description": "eligible models ranked"},
                    "excluded": {"type": "integer", "description": "models excluded, each with a reason in the detail"},
                },
            },
            "SessionMessage": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "role": {"enum": ["user", "assistant"]},
                    "content": {"type": "string"},
                    "model": {"type": ["string", "null"], "description": "provider/model of an answer"},
                    "request_id": {"type": ["string", "null"]},
                    "ts": {"type": "number"},
                },
            },
        }
    )
    paths: dict[str, Any] = {
        "/v1/chat/completions": _CHAT,
        "/api/v2/chat/completions": _CHAT,
        "/v1/models": {
            "get": {
                "summary": "The router's own names (p402/auto, p402/<mode>), then every catalog model of a usable provider"
                " (OpenAI list shape)",
                "responses": {"200": _json(_list_of(_ref("Model"))), **_errors(401)},
            }
        },
        "/v1/models/{model}": {
            "parameters": [
                {
                    "name": "model",
                    "in": "path",
                    "required": True,
                    "description": "`provider/model`, or a wire id only one provider has; the slash may come as is",
                    "schema": {"type": "string"},
                    "example": "openai/gpt-4o-mini",
                }
            ],
            "get": {
                "summary": "One model of a usable provider (OpenAI model object)",
                "responses": {"200": _json(_ref("Model")), **_errors(401, 404)},
            },
        },
        "/api/v2/providers": {
            "get": {
                "summary": "Providers with their models, usability and live health",
                "responses": {"200": _json(_list_of(_ref("Provider"))), **_errors(401)},
            },
            "post": {
                "summary": "What a call of a given size costs on each model, cheapest first",
                "requestBody": _body("CompareBody"),
                "responses": {"200": _json(_list_of({"type": "object"})), **_errors(400, 401, 413)},
            },
        },
        "/api/v2/analytics/spend": {
            "get": {
                "summary": "Spend over a period, grouped",
                "parameters": [
                    _PERIOD,
                    {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"}},
                    {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"}},
                    {"name": "by", "in": "query",
                     "schema": {"enum": ["provider", "model", "session", "tag", "key", "day"]}},
                    _KEY_FILTER,
                    _INCLUDE_SIMULATED,
                ],
                "responses": {"200": _json({"type": "object"}), **_errors(400, 401, 503)},
            }
        },
        "/api/v2/analytics/recommendations": {
            "get": {
                "summary": "Ways to spend less, from the ledger, biggest monthly saving first",
                "parameters": [_PERIOD, _INCLUDE_SIMULATED, _KEY_FILTER],
                "responses": {"200": _json(_list_of({"type": "object"})), **_errors(400, 401, 503)},
            }
        },
        "/api/v2/cache": {
            "get": {
                "summary": "The answer cache: its active embedder, threshold, and hits, misses and USD saved since start",
                "responses": {"200": _json(_ref("CacheStats")), **_errors(401)},
            }
        },
        "/api/v2/sessions": {
            "get": {
                "summary": "Agent sessions with their spend",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"enum": list(SESSION_STATUSES)}},
                    _KEY_FILTER,
                ],
                "responses": {"200": _json(_list_of(_ref("Session"))), **_errors(400, 401, 503)},
            },
            "post": {
                "summary": "Open a session (a named budget requests charge against)",
                "requestBody": _body("SessionCreate"),
                "responses": {"201": _json(_ref("Session"), "Created"), **_errors(400, 401, 409, 413, 503)},
            },
        },
        "/api/v2/sessions/{session_id}": {
            "parameters": [_ID],
            "get": {"summary": "One session", "responses": {"200": _json(_ref("Session")), **_errors(401, 404)}},
            "patch": {
                "summary": "Change a session's name, budget, status, agent or metadata",
                "requestBody": _body("SessionPatch"),
                "responses": {"200": _json(_ref("Session")), **_errors(400, 401, 404, 409, 413)},
            },
            "delete": {
                "summary": "Delete a session (its ledger rows stay)",
                "responses": {"200": _json({"type": "object"}), **_errors(401, 404)},
            },
        },
        "/api/v2/sessions/{session_id}/requests": _session_list(
            "The session's requests from the ledger, newest first", "LedgerRow", 100
        ),
        "/api/v2/sessions/{session_id}/messages": _session_list(
            "The session's chat history (each answered request's question and answer), oldest first",
            "SessionMessage",
            200,
        ),
        "/api/v2/decisions": {
            "get": {
                "summary": "Recent router decisions in brief, newest first, a page at a time",
                "description": "`before` (the `last_id` of a page) gives the next page; one decision whole is "
                "`/api/v2/decisions/{decision_id}`.",
                "parameters": [
                    _limit(20, DECISION_RING),
                    {"name": "before", "in": "query", "schema": {"type": "string"}, "description": "a decision id"},
                ],
                "responses": {"200": _json(_page_of(_ref("DecisionSummary"))), **_errors(400, 401)},
            }
        },
        "/api/v2/decisions/{decision_id}": {
            "get": {
                "summary": "One router decision whole: every candidate with its scores, every exclusion with its reason",
                "parameters": [{"name": "decision_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json({"type": "object"}), **_errors(401, 404)},
            }
        },
        "/api/v2/events": {
            "get": {
                "summary": "Live events as server-sent events (`event: <kind>`, `data: <json>`)",
                "description": (
                    f"Kinds: {', '.join(EVENT_KINDS)}. Comment lines are heartbeats. `kinds=a,b` filters; "
                    "an unknown kind is a 400. `route_decided` carries the decision in brief (a "
                    "`DecisionSummary`); `/api/v2/decisions/{decision_id}` has it whole. A subscriber that "
                    "falls further behind than its buffer gets a "
                    "last `lagged` event and is disconnected; past [gateway] max_event_subscribers a new one "
                    "gets a 503."
                ),
                "parameters": [{"name": "kinds", "in": "query", "schema": {"type": "string"}}],
                "responses": {
                    "200": {
                        "description": "An event stream",
                        "content": {
                            "text/event-stream": _events("The event as JSON", {"enum": [*EVENT_KINDS, "lagged"]})
                        },
                    },
                    **_errors(400, 401, 503),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "Readiness (never needs a key), and which embedder the answer cache uses",
                "description": "503 `not_ready` while no provider is usable: every chat request would be refused.",
                "security": [],
                "responses": {
                    "200": _json(_HEALTH),
                    "503": _json(_HEALTH),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (p402_ prefix)",
                "responses": {"200": _text("text/plain", "Prometheus text format 0.0.4"), **_errors(401)},
            }
        },
        **_KEYS,
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json({"type": "object"}), **_errors(401)}},
        },
        **messages_paths(),
    }
    from . import openapi_openai  # the routes beyond chat, in their own module

    schemas.update(openapi_openai.schemas())
    paths.update(openapi_openai.paths())
    from .probes import openapi_paths as probe_paths

    paths.update(probe_paths())
    return {
        "openapi": "3.2.0",  # for itemSchema: a stream described an event at a time
        "info": {
            "title": "P402 gateway",
            "version": __version__,
            "description": "OpenAI-compatible chat routed across providers, plus P402's own API under /api/v2.",
        },
        "paths": paths,
        "components": {
            "schemas": {**schemas, **messages_schemas()},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A gateway key from `p402 keys create`; needed once any key was made (revoked ones count)",
                },
                "x_api_key": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The same key as Anthropic's SDKs send it (ANTHROPIC_API_KEY)",
                },
            },
        },
        "security": _AUTHED if keys_enforced else [],
    }
