"""Agent sessions: a named budget that requests charge against, with its chat history.

Spend and request counts are never stored on the session; they are summed from
the ledger, so they cannot drift from what was actually recorded.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Any

from ..core.errors import P402Error
from ..core.sessions import SESSION_STATUSES, SessionStatus
from . import shared
from .db import ConstraintError
from .store import Store

SESSION_ID = re.compile(r"ses-[0-9a-f]{12}")  # what create_session makes; a name may not look like one


class SessionError(P402Error):
    kind = "invalid_session"
    http_status = 400


class SessionNotFoundError(SessionError):
    kind = "session_not_found"
    http_status = 404


class SessionNameTakenError(SessionError):
    kind = "session_name_taken"
    http_status = 409


class SessionInactiveError(SessionError):
    """Requests to a paused or closed session are refused before any upstream call."""

    kind = "session_inactive"
    http_status = 409


_UNSET: Any = object()

_SELECT = (
    "SELECT s.*, COALESCE(SUM(r.cost_usd), 0.0) AS spent_usd, COUNT(r.id) AS requests, "
    "COALESCE(SUM(r.saved_usd), 0.0) AS saved_usd "
    "FROM agent_sessions s LEFT JOIN requests r ON r.session_id = s.id"
)

INSERT_MESSAGE = "INSERT INTO session_messages (session_id, role, content, model, request_id, ts) VALUES (?, ?, ?, ?, ?, ?)"


def _public(row: dict[str, Any]) -> dict[str, Any]:
    budget = row["budget_usd"]
    spent = row["spent_usd"]
    return {
        "id": row["id"],
        "name": row["name"],
        "agent": row["agent"],
        "budget_usd": budget,
        "spent_usd": spent,
        "remaining_usd": None if budget is None else budget - spent,
        "requests": row["requests"],
        "saved_usd": row["saved_usd"],
        "status": row["status"],
        "metadata": json.loads(row["metadata"] or "{}"),
        "created": row["created"],
        "updated": row["updated"],
    }


def _check_budget(budget_usd: float | None) -> float | None:
    if budget_usd is None:
        return None
    if not isinstance(budget_usd, (int, float)) or not math.isfinite(budget_usd) or budget_usd < 0:
        raise SessionError(f"budget must be a non-negative number of USD, not {budget_usd!r}", param="budget_usd")
    return float(budget_usd)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise SessionError("a session needs a non-empty name", param="name")
    if SESSION_ID.fullmatch(name.strip()):
        raise SessionError(f"a session's name cannot look like a session id ({name.strip()!r})", param="name")
    return name.strip()


def _name_taken(name: str) -> SessionNameTakenError:
    return SessionNameTakenError(
        f"a session named {name!r} exists already; names are unique (per gateway key)", param="name"
    )


async def resolve_session(store: Store, ref: str, api_key_id: str | None = None) -> str:
    """The id of the session `ref` names: an id as it is, else a name, looked up among the sessions
    made with this gateway key, then among those made without one (the CLI's)."""
    if SESSION_ID.fullmatch(ref):
        return ref
    row = await store.fetchone(
        "SELECT id FROM agent_sessions WHERE name = ? AND (api_key_id = ? OR api_key_id IS NULL) "
        "ORDER BY api_key_id IS NULL LIMIT 1",
        (ref.strip(), api_key_id),
    )
    if row is None:
        raise SessionNotFoundError(f"no session {ref!r}; `p402 sessions list` shows them")
    return row["id"]


def _check_status(status: str) -> str:
    if status not in SESSION_STATUSES:
        raise SessionError(f"status must be one of {', '.join(SESSION_STATUSES)}, not {status!r}", param="status")
    return status


def _check_metadata(metadata: dict[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise SessionError("metadata must be a JSON object", param="metadata")
    try:
        return json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise SessionError(f"metadata is not JSON: {error}", param="metadata") from None


async def create_session(
    store: Store,
    *,
    name: str,
    budget_usd: float | None = None,
    agent: str | None = None,
    metadata: dict[str, Any] | None = None,
    status: SessionStatus = "active",
    api_key_id: str | None = None,
) -> dict[str, Any]:
    """A new session; `api_key_id`: the gateway key making it (its name is unique among that key's)."""
    now = time.time()
    row = {
        "id": f"ses-{uuid.uuid4().hex[:12]}", "name": _check_name(name), "agent": agent,
        "budget_usd": _check_budget(budget_usd), "status": _check_status(status),
        "metadata": _check_metadata(metadata), "created": now, "updated": now, "api_key_id": api_key_id,
    }  # fmt: skip
    try:
        await store.run(
            "INSERT INTO agent_sessions (id, name, agent, budget_usd, status, metadata, created, updated, api_key_id) "
            "VALUES (:id, :name, :agent, :budget_usd, :status, :metadata, :created, :updated, :api_key_id)",
            row,
        )
    except ConstraintError:
        raise _name_taken(row["name"]) from None
    # Answered from what was written, not read back: another client may delete the session at once.
    return _public({**row, "spent_usd": 0.0, "requests": 0, "saved_usd": 0.0})


async def get_session(store: Store, session_id: str) -> dict[str, Any]:
    row = await store.fetchone(f"{_SELECT} WHERE s.id = ? GROUP BY s.id", (session_id,))
    if row is None:
        raise SessionNotFoundError(f"no session {session_id!r}; `p402 sessions list` shows them")
    return _public(row)


async def list_sessions(store: Store, *, status: str | None = None, api_key_id: str | None = None) -> list[dict[str, Any]]:
    """Every session; with `status` those in it; with `api_key_id` those made with that gateway key and the
    operator's, made without one (the sessions `resolve_session` finds for that key)."""
    conditions, params = [], []
    if status is not None:
        conditions.append("s.status = ?")
        params.append(_check_status(status))
    if api_key_id is not None:
        conditions.append("(s.api_key_id = ? OR s.api_key_id IS NULL)")
        params.append(api_key_id)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = await store.fetchall(f"{_SELECT}{where} GROUP BY s.id ORDER BY s.created", tuple(params))
    return [_public(r) for r in rows]


async def update_session(
    store: Store,
    session_id: str,
    *,
    name: str = _UNSET,
    budget_usd: float | None = _UNSET,
    status: str = _UNSET,
    agent: str | None = _UNSET,
    metadata: dict[str, Any] | None = _UNSET,
) -> dict[str, Any]:
    """Change the fields given; `budget_usd=None` removes the budget."""
    changes: dict[str, Any] = {}
    if name is not _UNSET:
        changes["name"] = _check_name(name)
    if budget_usd is not _UNSET:
        changes["budget_usd"] = _check_budget(budget_usd)
    if status is not _UNSET:
        changes["status"] = _check_status(status)
    if agent is not _UNSET:
        changes["agent"] = agent
    if metadata is not _UNSET:
        changes["metadata"] = _check_metadata(metadata)
    changes["updated"] = time.time()
    assignments = ", ".join(f"{column} = ?" for column in changes)
    try:
        changed = await store.run(
            f"UPDATE agent_sessions SET {assignments} WHERE id = ?", (*changes.values(), session_id)
        )
    except ConstraintError:
        if "name" not in changes:
            raise
        raise _name_taken(changes["name"]) from None
    if not changed:
        raise SessionNotFoundError(f"no session {session_id!r}; `p402 sessions list` shows them")
    if "budget_usd" in changes:
        shared.forget(store, f"session:{session_id}")  # made again from the ledger, which holds every request
    return await get_session(store, session_id)


async def delete_session(store: Store, session_id: str) -> None:
    """Delete a session and its messages; its ledger rows stay, so past spend still adds up."""
    if not await store.run("DELETE FROM agent_sessions WHERE id = ?", (session_id,)):
        raise SessionNotFoundError(f"no session {session_id!r}; `p402 sessions list` shows them")


async def session_messages(store: Store, session_id: str, *, limit: int = 200) -> list[dict[str, Any]]:
    """The session's chat history, oldest first."""
    return await store.fetchall(
        "SELECT * FROM (SELECT role, content, model, request_id, ts, id FROM session_messages "
        "WHERE session_id = ? ORDER BY id DESC LIMIT ?) AS latest ORDER BY id",
        (session_id, limit),
    )

