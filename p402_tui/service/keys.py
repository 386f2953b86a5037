"""Gateway keys: made (the secret shown once), listed, revoked, and checked on each request."""

from __future__ import annotations

from typing import Any

from ..core.errors import P402Error
from ..store import queries
from ..store.store import Store


class GatewayKeyError(P402Error):
    kind = "invalid_key"
    http_status = 400


async def create(store: Store, name: str) -> tuple[dict[str, Any], str]:
    """(the key's public record, its secret)."""
    if not name.strip():
        raise GatewayKeyError("a key needs a non-empty name")
    return await queries.create_key(store, name.strip())


async def listed(store: Store) -> list[dict[str, Any]]:
    return await queries.list_keys(store)


async def revoke(store: Store, key_id: str) -> None:
    if not await queries.revoke_key(store, key_id):
        raise GatewayKeyError(f"no active key {key_id!r}; `p402 keys list` shows them")


async def verify(store: Store, secret: str) -> str | None:
    """The id of the active key `secret` is, or None."""
    key = await queries.verify_key(store, secret)
    return None if key is None else key["id"]


async def active_count(store: Store) -> int:
    return sum(1 for key in await queries.list_keys(store) if key["active"])
