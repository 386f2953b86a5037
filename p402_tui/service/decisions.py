"""Router decisions as they were made: a page in brief, or one whole."""

from __future__ import annotations

from typing import Any

from ..core.errors import P402Error
from ..store import queries
from ..store.store import Store


class BadCursorError(P402Error):
    kind = "invalid_value"
    http_status = 400


async def page(
    store: Store, *, limit: int = 20, before: str | None = None, api_key_id: str | None = None
) -> dict[str, Any]:
    """Decisions in brief, newest first; `before` (the last id of a page) gives the next page."""
    try:
        data, more = await queries.decision_summaries(store, limit=limit, before=before, api_key_id=api_key_id)
    except ValueError as error:
        raise BadCursorError(f"before: {error}", param="before") from None
    return {"data": data, "has_more": more}


async def get(store: Store, decision_id: str, *, api_key_id: str | None = None) -> dict[str, Any] | None:
    """One decision whole; with `api_key_id`, only if that key's request made it."""
    return await queries.get_decision(store, decision_id, api_key_id=api_key_id)
