"""Responses API answers kept for GET /v1/responses/{id} and for `previous_response_id`."""

from __future__ import annotations

from typing import Any

from ..store import responses as stored
from ..store.store import Store


def keep(store: Store, response_id: str, ts: float, api_key_id: str | None, response: dict[str, Any],
         conversation: list[Any]) -> None:  # fmt: skip
    """Queued with the ledger's writes: the answer as sent and the conversation it ends."""
    store.put(stored.INSERT_RESPONSE, stored.response_row(response_id, ts, api_key_id, response, conversation))


async def find(store: Store, response_id: str, api_key_id: str | None) -> tuple[dict[str, Any], list[Any]] | None:
    await store.flush()  # one kept a moment ago may still be queued
    return await stored.get_response(store, response_id, api_key_id)


async def delete(store: Store, response_id: str, api_key_id: str | None) -> bool:
    return await stored.delete_response(store, response_id, api_key_id)
