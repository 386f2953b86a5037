"""What a key's role lets a request reach and see.

`admin` everything; `viewer` reads everything and calls no model; `user` calls models
and sees only its own sessions, requests, decisions, events and spend. Without keys in
force there is no key and everything is reachable, as before keys existed.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

from .errors import GatewayError

ADMIN_ONLY = "/api/v2/keys"
READS = frozenset({"GET", "HEAD"})
VIEWER_POSTS = frozenset({"/api/v2/providers"})  # a price comparison: no model is called


def own_key(scope: Scope) -> str | None:
    """The key whose traffic alone this request may see (a `user` key's id); None: all of it."""
    key = scope.get("p402.key")
    return key.id if key is not None and key.role == "user" else None


def key_filter(scope: Scope, asked: str | None) -> str | None:
    """The key whose traffic a read covers: a `user` key's own whatever it asks; else the `key` it asks for, if any."""
    return own_key(scope) or asked


def role_refusal(scope: Scope) -> GatewayError | None:
    """A 403 when the key's role may not take this route at all."""
    key: Any = scope.get("p402.key")
    if key is None or key.role == "admin":
        return None
    path = scope["path"]
    if path == ADMIN_ONLY or path.startswith(ADMIN_ONLY + "/"):
        return GatewayError(403, "only an admin key manages keys", code="permission_denied")
    if key.role == "viewer" and scope["method"] not in READS and path not in VIEWER_POSTS:
        return GatewayError(
            403, "this key is a viewer: it reads /api/v2, /metrics and events, and calls no model",
            code="permission_denied",
        )
    return None


def event_key(event: Any) -> str | None:
    """The gateway key whose traffic an event is about (None: none, or not traffic)."""
    record = getattr(event, "record", None)
    return record.api_key_id if record is not None else getattr(event, "api_key_id", None)
