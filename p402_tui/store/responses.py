"""Stored Responses API answers: what GET /v1/responses/{id} returns and previous_response_id continues.

Each row is one answer as it was sent and the conversation that led to it, owned by the
gateway key that made it (none without keys): no other key reads or deletes it.
"""

from __future__ import annotations

from typing import Any

from ..core.types import json_bytes, json_value
from .store import Store

INSERT_RESPONSE = (
    "INSERT INTO stored_responses (id, ts, api_key_id, response, conversation) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET ts = excluded.ts, api_key_id = excluded.api_key_id, "
    "response = excluded.response, conversation = excluded.conversation"
)
_OWNED = "id = ? AND COALESCE(api_key_id, '') = COALESCE(?, '')"


def response_row(
    response_id: str, ts: float, api_key_id: str | None, response: dict[str, Any], conversation: list[dict[str, Any]]
) -> tuple:
    return (response_id, ts, api_key_id, json_bytes(response).decode(), json_bytes(conversation).decode())


async def get_response(store: Store, response_id: str, api_key_id: str | None) -> tuple[dict[str, Any], list[Any]] | None:
    """The answer and its conversation, or None when there is none this key may read."""
    row = await store.fetchone(f"SELECT response, conversation FROM stored_responses WHERE {_OWNED}", (response_id, api_key_id))
    if row is None:
        return None
    return json_value(row["response"]), json_value(row["conversation"])


async def delete_response(store: Store, response_id: str, api_key_id: str | None) -> bool:
    return await store.run(f"DELETE FROM stored_responses WHERE {_OWNED}", (response_id, api_key_id)) > 0
