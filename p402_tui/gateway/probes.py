"""Load balancers' probes: `/health/live` (the process answers) and `/health/ready` (it can serve)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from ..core.types import json_bytes

if TYPE_CHECKING:
    from .app import Gateway

LIVE = b'{"status":"ok"}'


async def live(request: Request) -> Any:
    return Response(LIVE, media_type="application/json")


def ready(gateway: Gateway) -> Callable[[Request], Awaitable[Any]]:
    """The readiness handler of `gateway`."""

    async def ready(request: Request) -> Any:
        return await answer(gateway)

    return ready


async def answer(gateway: Gateway) -> Response:
    """200 with each check; 503 naming the failing ones (store reachable at the current schema, a provider usable)."""
    ok, checks = await gateway.service.ready(len(gateway.settings.usable_providers()))
    failing = [name for name, check in checks.items() if not check["ok"]]
    body = {"status": "ready" if ok else "not_ready", "failing": failing, "checks": checks}
    return Response(json_bytes(body), status_code=200 if ok else 503, media_type="application/json")


_CHECK = {
    "type": "object",
    "required": ["ok", "reason"],
    "properties": {"ok": {"type": "boolean"}, "reason": {"type": ["string", "null"]}},
    "additionalProperties": True,
}
_STORE_CHECK = {
    **_CHECK,
    "required": ["ok", "reason", "realtime_writer", "realtime_writer_reason"],
    "properties": {
        **_CHECK["properties"],
        "schema_version": {"type": ["integer", "null"]},
        "realtime_writer": {"type": "boolean", "description": "The ledger writer runs real-time (`[store] realtime_writer`)"},
        "realtime_writer_reason": {"type": ["string", "null"], "description": "Why it does not"},
    },
}
_READY = {
    "type": "object",
    "required": ["status", "failing", "checks"],
    "properties": {
        "status": {"enum": ["ready", "not_ready"]},
        "failing": {"type": "array", "items": {"type": "string"}, "description": "The checks that failed"},
        "checks": {
            "type": "object",
            "description": "store (with one), providers",
            "properties": {"store": _STORE_CHECK},
            "additionalProperties": _CHECK,
        },
    },
}


def openapi_paths() -> dict[str, Any]:
    """The probes in /openapi.json: neither needs a key."""

    def body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": schema}}}

    return {
        "/health/live": {
            "get": {
                "summary": "Liveness: the process answers",
                "security": [],
                "responses": {"200": {"description": "Alive", **body({"type": "object"})}},
            }
        },
        "/health/ready": {
            "get": {
                "summary": "Readiness: the store answers at the current schema and a provider is usable",
                "description": "503 names the failing checks; a load balancer sends no traffic until it is 200.",
                "security": [],
                "responses": {
                    "200": {"description": "Ready", **body(_READY)},
                    "503": {"description": "Not ready", **body(_READY)},
                },
            }
        },
    }
