"""Agent sessions: named budgets that requests are filed under, with their chat history."""

from __future__ import annotations

from typing import Any

from ..core.sessions import SESSION_STATUSES
from ..store import queries
from ..store import sessions as stored
from ..store.store import Store

SessionError = stored.SessionError
SessionNotFoundError = stored.SessionNotFoundError


async def resolve(store: Store, ref: str, api_key_id: str | None = None) -> str:
    """The id of the session `ref` names (its id or its name)."""
    return await stored.resolve_session(store, ref, api_key_id)


async def listed(
    store: Store, *, status: str | None = None, api_key_id: str | None = None
) -> list[dict[str, Any]]:
    if status is not None and status not in SESSION_STATUSES:
        raise SessionError(f"status must be one of {', '.join(SESSION_STATUSES)}", param="status")
    return await stored.list_sessions(store, status=status, api_key_id=api_key_id)


async def get(store: Store, ref: str, api_key_id: str | None = None) -> dict[str, Any]:
    return await stored.get_session(store, await resolve(store, ref, api_key_id))


async def create(store: Store, name: str, *, api_key_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return await stored.create_session(store, name=name, api_key_id=api_key_id, **fields)


async def update(store: Store, ref: str, api_key_id: str | None = None, **changes: Any) -> dict[str, Any]:
    return await stored.update_session(store, await resolve(store, ref, api_key_id), **changes)


async def delete(store: Store, ref: str, api_key_id: str | None = None) -> str:
    """Delete the session (its requests stay in the ledger); its id."""
    session_id = await resolve(store, ref, api_key_id)
    await stored.delete_session(store, session_id)
    return session_id


async def requests(store: Store, ref: str, *, limit: int = 100, api_key_id: str | None = None) -> list[dict[str, Any]]:
    session_id = await resolve(store, ref, api_key_id)
    await stored.get_session(store, session_id)  # an unknown id is an error, not an empty list
    return await queries.recent_requests(store, session_id=session_id, limit=limit)


async def messages(store: Store, ref: str, *, limit: int = 200, api_key_id: str | None = None) -> list[dict[str, Any]]:
    session_id = await resolve(store, ref, api_key_id)
    await stored.get_session(store, session_id)
    return await stored.session_messages(store, session_id, limit=limit)
