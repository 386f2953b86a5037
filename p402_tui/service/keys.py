"""Gateway keys as use cases: create, list, show, update, revoke; shared by `p402 keys` and `/api/v2/keys`.

A key's secret is returned by `create` once and never again: the store keeps its hash.
"""

from __future__ import annotations

import time
from typing import Any

from ..core.errors import P402Error
from ..store import queries, shared
from ..policy.budget import period_bounds
from ..policy.rules import ROLES, parse_policy


class KeyNotFoundError(P402Error):
    kind = "key_not_found"
    http_status = 404


class InvalidKeyError(P402Error):
    kind = "invalid_value"
    http_status = 400


def _checked(name: str | None, role: str | None, policy: dict[str, Any] | None) -> dict[str, Any] | None:
    if name is not None and not name.strip():
        raise InvalidKeyError("a key needs a non-empty name", param="name")
    if role is not None and role not in ROLES:
        raise InvalidKeyError(f"role must be one of {', '.join(ROLES)}, not {role!r}", param="role")
    if policy is None:
        return None
    try:
        # Stored as given, defaults left out, so a later default change reaches old keys too.
        return parse_policy(policy).model_dump(exclude_defaults=True)
    except ValueError as error:
        raise InvalidKeyError(f"policy.{error}", param="policy") from None


async def create_key(
    store: Any, name: str, *, role: str = "user", policy: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """(the key's record, its secret: shown this once)."""
    checked = _checked(name, role, policy or {})
    return await queries.create_key(store, name.strip(), role=role, policy=checked)


async def list_keys(store: Any) -> list[dict[str, Any]]:
    return [await _with_spend(store, key) for key in await queries.list_keys(store)]


async def show_key(store: Any, key_id: str) -> dict[str, Any]:
    key = await queries.get_key(store, key_id)
    if key is None:
        raise KeyNotFoundError(f"no key {key_id!r}; `p402 keys list` shows them")
    return await _with_spend(store, key)


async def update_key(
    store: Any, key_id: str, *, name: str | None = None, role: str | None = None,
    policy: dict[str, Any] | None = None, clear: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Change what is given; `policy` is merged into the key's (a field set to None, or named in `clear`, goes)."""
    key = await queries.get_key(store, key_id)
    if key is None or not key["active"]:
        raise KeyNotFoundError(f"no active key {key_id!r}; `p402 keys list` shows them")
    merged = None
    if policy is not None or clear:
        merged = {**key["policy"], **(policy or {})}
        for field in (*clear, *[k for k, v in (policy or {}).items() if v is None]):
            merged.pop(field, None)
    checked = _checked(name, role, merged)
    await queries.update_key(store, key_id, name=None if name is None else name.strip(), role=role, policy=checked)
    if checked is not None:
        shared.forget(store, f"key:{key_id}")  # the budget may have changed: made again from the ledger
    return await show_key(store, key_id)


async def resolve_key(store: Any, ref: str) -> str:
    """The id of the key `ref` names: its id, else its name (revoked keys too: their history stays)."""
    if await queries.get_key(store, ref) is not None:
        return ref
    named = [key["id"] for key in await queries.list_keys(store) if key["name"] == ref.strip()]
    if not named:
        raise KeyNotFoundError(f"no key {ref!r} (by id or name); `p402 keys list` shows them")
    if len(named) > 1:
        raise InvalidKeyError(f"{len(named)} keys are named {ref!r} ({', '.join(named)}); give its id", param="key")
    return named[0]


async def key_requests(store: Any, key_id: str, *, limit: int = 200) -> list[dict[str, Any]]:
    """The key's latest requests from the ledger, newest first."""
    await show_key(store, key_id)  # an unknown key is a 404, not an empty list
    return await queries.recent_requests(store, api_key_id=key_id, limit=limit)


async def revoke_key(store: Any, key_id: str) -> dict[str, Any]:
    if not await queries.revoke_key(store, key_id):
        raise KeyNotFoundError(f"no active key {key_id!r}; `p402 keys list` shows them")
    return await show_key(store, key_id)


async def _with_spend(store: Any, key: dict[str, Any]) -> dict[str, Any]:
    """The key with what it spent in its budget period (the month's, without a budget) and its requests then."""
    policy = key["policy"]
    period = policy.get("budget_period", "month")
    start, reset = period_bounds(period, time.time())
    row = await store.fetchone(
        "SELECT COALESCE(SUM(cost_usd), 0.0) AS spent, COUNT(*) AS requests FROM requests WHERE api_key_id = ? AND ts >= ?",
        (key["id"], start),
    )
    budget = policy.get("budget_usd")
    return {
        **key,
        "usage": {
            "period": period, "since": start, "resets_at": reset, "spent_usd": row["spent"], "requests": row["requests"],
            "budget_usd": budget, "remaining_usd": None if budget is None else max(0.0, budget - row["spent"]),
        },
    }  # fmt: skip


async def verify(store: Any, secret: str) -> dict[str, Any] | None:
    """The record (id, name, role, policy) of the active key `secret` is, or None."""
    return await queries.verify_key(store, secret)


async def key_count(store: Any) -> int:
    """How many keys were ever made: revoked ones count, so revoking the last key opens the gateway to no one."""
    return int(await store.scalar("SELECT COUNT(*) FROM gateway_keys"))
