"""`x-request-id`: the caller's (when it is short and plain) or ours, on every answer."""

from __future__ import annotations

import re
from typing import Any

from starlette.types import Scope

from ..core.types import new_id

HEADER = b"x-request-id"
MAX_LENGTH = 128
_SAFE = re.compile(rb"[A-Za-z0-9._:@+=/-]{1,%d}" % MAX_LENGTH)
# Headers every answer carries besides its id: `x-p402-worker` under `p402 serve --workers` (gateway.workers).
STAMP: list[tuple[bytes, bytes]] = []


def from_client(scope: Scope) -> str | None:
    """The caller's id, if it sent a usable one (anything longer or stranger is ignored, and ours used)."""
    for name, value in scope["headers"]:
        if name == HEADER:
            return value.decode() if _SAFE.fullmatch(value) else None
    return None


def tagged(scope: Scope, message: Any) -> Any:
    """A response's start with its `x-request-id`: the caller's, else the ledger's id of the request, else a new one."""
    if message["type"] != "http.response.start":
        return message
    value = scope.get("p402.client_request_id") or scope.get("p402.request_id")
    if value is None:
        value = scope["p402.request_id"] = new_id("req", 10)  # the access line names the id the caller got
    return {**message, "headers": [*message.get("headers", ()), (HEADER, value.encode()), *STAMP]}
