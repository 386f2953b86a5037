"""The gateway's JSON back into P402's own objects: events, answers, chunks, errors."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from ..core.errors import P402Error
from ..core.events import (
    AttemptFailed,
    CacheHit,
    DecisionBrief,
    Event,
    HealthChanged,
    RequestCompleted,
    RequestRejected,
    RouteDecided,
    SpendUpdated,
)
from ..core.hooks import RequestRecord
from ..core.router import RouteDecision
from ..core.types import Attempt, ChatChunk, ChatResponse, P402Meta, ToolCallDelta, Usage


class GatewayError(P402Error):
    """The gateway answered with an error (its OpenAI-shaped body), or could not be reached."""

    kind = "gateway"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def error_from(status: int, body: str) -> GatewayError:
    """The gateway's own words for an error (its OpenAI-shaped body), else the status."""
    code = None
    try:
        error = json.loads(body)["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = body.strip()[:200] or "no details"
    return GatewayError(f"gateway answered {status}: {message}", status=status, code=code)


def network_message(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.ReadTimeout):
        return "no word from the gateway (not even a keep-alive)"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect to the gateway"
    text = str(exc).strip()
    return f"link error: {text}" if text else f"link error: {type(exc).__name__}"


# --- events ----------------------------------------------------------------------------------

_RECORD_FIELDS = frozenset(RequestRecord.__dataclass_fields__) - {"attempts"}


def record_from_dict(data: dict[str, Any]) -> RequestRecord:
    record = RequestRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})
    record.attempts = [attempt_from_dict(a) for a in data.get("attempts") or ()]
    return record


def attempt_from_dict(data: dict[str, Any]) -> Attempt:
    return Attempt(
        provider=data.get("provider", ""),
        model=data.get("model", ""),
        error_kind=data.get("error_kind"),
        error=data.get("error"),
        latency_ms=float(data.get("latency_ms") or 0.0),
    )


def _fields(cls: type[Event], data: dict[str, Any]) -> dict[str, Any]:
    # dataclasses.fields, not __dataclass_fields__: that holds `kind` (a ClassVar) too.
    names = {f.name for f in dataclasses.fields(cls) if f.init} - {"ts", "gateway"}
    return {k: v for k, v in data.items() if k in names}


def event_from_dict(kind: str, data: dict[str, Any]) -> Event | None:
    """The `core.events` object an event-stream frame carries; None for kinds this client does not know.

    A `route_decided` from the gateway carries a `DecisionBrief`; one whole (as in process) a `RouteDecision`.
    """
    ts = float(data.get("ts") or time.time())
    gateway = data.get("gateway")  # the gateway of a fleet that made it
    if kind == RouteDecided.kind:
        decision = data["decision"]
        if isinstance(decision.get("candidates"), list):
            return RouteDecided(decision=RouteDecision.from_dict(decision), ts=ts, gateway=gateway)
        return RouteDecided(decision=DecisionBrief.from_dict(decision), ts=ts, gateway=gateway)
    if kind == RequestCompleted.kind:
        return RequestCompleted(record=record_from_dict(data["record"]), ts=ts, gateway=gateway)
    for cls in (AttemptFailed, RequestRejected, HealthChanged, SpendUpdated, CacheHit):
        if kind == cls.kind:
            return cls(**_fields(cls, data), ts=ts, gateway=gateway)
    return None


# --- answers ---------------------------------------------------------------------------------


def usage_from_dict(data: dict[str, Any] | None) -> Usage | None:
    if not data:
        return None
    return Usage(
        prompt_tokens=data.get("prompt_tokens") or 0,
        completion_tokens=data.get("completion_tokens") or 0,
        cached_tokens=(data.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        reasoning_tokens=(data.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0,
    )


def meta_from_dict(data: dict[str, Any], ttft_ms: float | None = None) -> P402Meta:
    return P402Meta(
        provider=data.get("provider") or "",
        model=data.get("model") or "",
        cost_usd=float(data.get("cost_usd") or 0.0),
        latency_ms=float(data.get("latency_ms") or 0.0),
        ttft_ms=data.get("ttft_ms", ttft_ms),
        attempts=[attempt_from_dict(a) for a in data.get("attempts") or ()],
        decision_id=data.get("decision_id"),
        cached=bool(data.get("cached")),
        saved_usd=float(data.get("saved_usd") or 0.0),
        usage_estimated=bool(data.get("usage_estimated")),
    )


def response_from_dict(data: dict[str, Any]) -> ChatResponse:
    """A `chat.completion` body as the `ChatResponse` it was made from; `p402` holds where it went."""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    meta = meta_from_dict(data["p402"]) if data.get("p402") else None
    return ChatResponse(
        provider=meta.provider if meta is not None else "",
        model=data.get("model") or "",
        content=message.get("content"),
        reasoning=message.get("reasoning_content"),
        tool_calls=message.get("tool_calls"),
        finish_reason=choice.get("finish_reason") or "stop",
        usage=usage_from_dict(data.get("usage")) or Usage(),
        id=data.get("id") or "",
        created=int(data.get("created") or time.time()),
        p402=meta,
    )


def chunk_from_dict(frame: dict[str, Any]) -> ChatChunk | None:
    """One `chat.completion.chunk` as a `ChatChunk`; None for a frame with nothing in it."""
    usage = usage_from_dict(frame.get("usage"))
    choices = frame.get("choices") or []
    if not choices:
        return ChatChunk(usage=usage) if usage else None
    delta = choices[0].get("delta") or {}
    tool_calls = None
    if delta.get("tool_calls"):
        tool_calls = [
            ToolCallDelta(
                index=t.get("index", 0),
                id=t.get("id"),
                name=(t.get("function") or {}).get("name"),
                arguments=(t.get("function") or {}).get("arguments") or "",
            )
            for t in delta["tool_calls"]
        ]
    return ChatChunk(
        content=delta.get("content") or "",
        reasoning=delta.get("reasoning_content") or "",
        tool_calls=tool_calls,
        finish_reason=choices[0].get("finish_reason"),
        usage=usage,
        role=delta.get("role"),
    )
