"""The gateway's traces through OpenTelemetry's SDK, exported over OTLP/HTTP.

One server span per request (`POST /v1/chat/completions`), made once the request is over from
what the gateway saw (`_Front.observe`) and what the orchestrator left on its `CallContext`: the
ledger row and the routing decision. Each upstream attempt is a client span under it, placed end
to end back from the request's end by each attempt's measured latency. Attribute names follow
OpenTelemetry's GenAI and HTTP semantic conventions where they have one, `p402.*` otherwise.
"""

from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context


class Traces:
    """A tracer provider of P402's own (the process's global one is left alone) with a batching OTLP exporter."""

    def __init__(self) -> None:
        resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "p402"})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("p402_tui.gateway")

    def shutdown(self) -> None:
        self.provider.shutdown()

    def observe(self, scope: dict[str, Any], started: float) -> None:
        """The request's span tree, from its scope once it is over."""
        end = time.time_ns()
        start = end - int((time.perf_counter() - started) * 1e9)
        status = scope.get("p402.status", 0)
        attributes: dict[str, Any] = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "http.response.status_code": status,
        }
        for key, name in (("p402.request_id", "p402.request_id"), ("p402.client_request_id", "p402.client_request_id"),
                          ("p402.api_key_id", "p402.key_id")):  # fmt: skip
            if scope.get(key) is not None:
                attributes[name] = scope[key]
        ctx = scope.get("p402.ctx")
        record = getattr(ctx, "record", None)
        decision = getattr(ctx, "decision", None)
        if decision is not None:
            attributes["p402.route.mode"] = decision.mode
            attributes["p402.route.decision_id"] = decision.id
            attributes["p402.route.candidates"] = len(decision.candidates)
            if decision.chosen_id is not None:
                attributes["p402.route.chosen"] = decision.chosen_id
        if record is not None:
            attributes.update(_outcome(record))
        parent = extract(_headers(scope)) if _has_traceparent(scope) else None
        span = self.tracer.start_span(
            f"{scope['method']} {scope['path']}", context=parent, kind=SpanKind.SERVER, attributes=attributes,
            start_time=start,
        )
        if status >= 500 or status == 0 or (record is not None and record.status == "error"):
            span.set_status(Status(StatusCode.ERROR, getattr(record, "error_kind", None) or f"http {status}"))
        if record is not None and record.attempts:
            self._attempts(span, record, end)
        span.end(end_time=end)

    def _attempts(self, parent: Any, record: Any, request_end: int) -> None:
        inside = set_span_in_context(parent)
        # The orchestrator's work ends with the last attempt, when its record's latency was taken.
        done = int((record.ts + record.latency_ms / 1000) * 1e9)
        end = min(done, request_end)
        spans = []
        for attempt in reversed(record.attempts):
            start = end - int(attempt.latency_ms * 1e6)
            spans.append((attempt, start, end))
            end = start
        for attempt, start, stop in reversed(spans):
            attributes = {
                "gen_ai.operation.name": "chat",
                "gen_ai.system": attempt.provider,
                "gen_ai.provider.name": attempt.provider,
                "gen_ai.request.model": attempt.model,
            }
            if attempt.error_kind is not None:
                attributes["error.type"] = attempt.error_kind
            child = self.tracer.start_span(
                f"chat {attempt.model}", context=inside, kind=SpanKind.CLIENT, attributes=attributes, start_time=start
            )
            if attempt.error_kind is not None:
                child.set_status(Status(StatusCode.ERROR, attempt.error or attempt.error_kind))
            elif record.status == "ok":
                child.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
                child.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
            child.end(end_time=stop)


def _outcome(record: Any) -> dict[str, Any]:
    """The request's essentials as span attributes (a None has no attribute)."""
    found = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": record.provider,
        "gen_ai.provider.name": record.provider,
        "gen_ai.request.model": record.model,
        "gen_ai.response.model": record.model,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "p402.cost_usd": record.cost_usd,
        "p402.cache_hit": record.cached,
        "p402.stream": record.stream,
        "p402.status": record.status,
        "error.type": record.error_kind,
        "p402.session_id": record.session_id,
    }
    return {name: value for name, value in found.items() if value is not None}


def _has_traceparent(scope: dict[str, Any]) -> bool:
    return any(name == b"traceparent" for name, _ in scope["headers"])


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
