"""What goes into the database and what comes back out: ledger, decisions, health, gateway keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from typing import Any

from ..core.hooks import RequestRecord
from ..core.types import json_bytes
from . import rollups
from .store import Store

# --- the ledger --------------------------------------------------------------------

LEDGER_COLUMNS = (
    "id", "ts", "session_id", "api_key_id", "tag", "mode", "provider", "model",
    "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "cost_usd", "est_cost_usd", "saved_usd", "latency_ms", "ttft_ms",
    "status", "error_kind", "error", "cached", "decision_id", "stream", "namespace", "source",
    "attempts", "needs", "prompt_key", "simulated", "usage_estimated", "priced", "client_request_id",
)  # fmt: skip
INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(LEDGER_COLUMNS)}) VALUES ({', '.join('?' for _ in LEDGER_COLUMNS)}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in LEDGER_COLUMNS[1:])}"
)


def request_row(
    record: RequestRecord, *, needs: str | None = None, prompt_key: str | None = None, simulated: bool = False
) -> tuple:
    """A ledger row from a record. `needs`: the capabilities the request asked for; `prompt_key`: its exact-cache key;
    `simulated`: it was answered by the simulator."""
    attempts = [
        {
            "provider": a.provider,
            "model": a.model,
            "error_kind": a.error_kind,
            "error": a.error,
            "latency_ms": a.latency_ms,
        }
        for a in record.attempts
    ]
    return (
        record.id, record.ts, record.session_id, record.api_key_id, record.tag, record.mode,
        record.provider, record.model,
        record.prompt_tokens, record.completion_tokens, record.cached_tokens, record.reasoning_tokens,
        record.cost_usd, record.est_cost_usd, record.saved_usd, record.latency_ms, record.ttft_ms,
        record.status, record.error_kind, record.error, int(record.cached), record.decision_id,
        int(record.stream), record.namespace, record.source,
        json_bytes(attempts).decode(), needs, prompt_key, int(simulated), int(record.usage_estimated),
        int(record.cost_usd is not None),
        record.client_request_id,
    )  # fmt: skip


def ledger_writes(
    record: RequestRecord, *, needs: str | None = None, prompt_key: str | None = None, simulated: bool = False
) -> list[tuple[str, tuple]]:
    """A ledger row and what it adds to the rollups: to be written in one transaction (`put_later`)."""
    row = request_row(record, needs=needs, prompt_key=prompt_key, simulated=simulated)
    return [(INSERT_REQUEST, row), *rollups.writes(record, needs=needs, prompt_key=prompt_key, simulated=simulated)]


def _ledger_dict(row: dict[str, Any]) -> dict[str, Any]:
    row["cached"] = bool(row["cached"])
    row["stream"] = bool(row["stream"])
    row["usage_estimated"] = bool(row.get("usage_estimated"))
    if "priced" in row:
        row["priced"] = bool(row["priced"])
    row["attempts"] = json.loads(row["attempts"] or "[]")
    return row


async def recent_requests(
    store: Store, *, limit: int = 100, session_id: str | None = None, since: float | None = None,
    api_key_id: str | None = None,
) -> list[dict[str, Any]]:
    """Newest first."""
    where, params = _where(session_id=session_id, since=since, api_key_id=api_key_id)
    rows = await store.fetchall(f"SELECT * FROM requests {where} ORDER BY ts DESC LIMIT ?", (*params, limit))
    return [_ledger_dict(r) for r in rows]


async def get_request(store: Store, request_id: str) -> dict[str, Any] | None:
    row = await store.fetchone("SELECT * FROM requests WHERE id = ?", (request_id,))
    return _ledger_dict(row) if row else None


def _where(
    *, session_id: str | None = None, since: float | None = None, api_key_id: str | None = None
) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if api_key_id is not None:
        clauses.append("api_key_id = ?")
        params.append(api_key_id)
    if session_id is not None:
        clauses.append("session_id = ?")
        params.append(session_id)
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


# --- routing decisions -----------------------------------------------------------

# Its parameters: a row of `decision_rows`, then whether the simulator answered (0 or 1).
_DECISION_COLUMNS = (
    "id", "ts", "mode", "chosen", "provider", "model", "tier", "est_cost_usd",
    "prompt_tokens", "decision_us", "candidates", "excluded", "decision", "models", "vectors", "simulated",
)  # fmt: skip
INSERT_DECISION = (
    f"INSERT INTO router_decisions ({', '.join(_DECISION_COLUMNS)}) VALUES ({', '.join('?' for _ in _DECISION_COLUMNS)}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _DECISION_COLUMNS[1:])}"
)
# A decision record's shared parts (`store.decisions`), by kind: written once per digest.
INSERT_DECISION_PART = {
    "models": "INSERT INTO decision_models (digest, models) VALUES (?, ?) ON CONFLICT (digest) DO NOTHING",
    "vectors": "INSERT INTO decision_vectors (digest, vectors) VALUES (?, ?) ON CONFLICT (digest) DO NOTHING",
}


def decision_rows(decision: Any, snapshot: Any = None) -> tuple[tuple, list[tuple[str, bytes, bytes]]]:
    """A decision's row, and the shared parts its record refers to: (insert statement, digest, part).

    A RouteDecision is kept as its snapshot (`store.decisions`; `snapshot`: taken already, with others
    by `router.snapshots`); its listing and live figures are the same for many requests and need
    writing once per digest. A dict (a decision as another process sent it) is kept as its JSON.
    """
    # imported here: the codec brings numpy and the router, which a report never needs
    from . import decisions

    if isinstance(decision, dict):
        data = decision
        chosen = data.get("chosen") or {}
        row = (
            data["id"],
            data.get("ts") or time.time(),
            data.get("mode"),
            chosen.get("id"),
            chosen.get("provider"),
            chosen.get("model"),
            chosen.get("tier"),
            chosen.get("est_cost_usd"),
            data.get("prompt_tokens"),
            data.get("decision_us"),
            len(data.get("candidates") or ()),
            len(data.get("excluded") or ()),
            json.dumps(data, default=str).encode(),  # bytes like a record: PostgreSQL keeps both as BYTEA
            None,
            None,
        )
        return row, []
    if snapshot is None:
        snapshot = decision.snapshot()
    record, listing_digest, listing, live_digest, live = decisions.encode(snapshot)
    columns = snapshot.columns()  # as a decision's brief counts them
    provider = model = tier = None
    if snapshot.chosen:
        _, provider, model, tier = snapshot.listing.models[int(snapshot.ranked[0])]
    row = (
        snapshot.id,
        snapshot.ts,
        snapshot.mode,
        columns["chosen"],
        provider,
        model,
        tier,
        columns["est_cost_usd"],
        snapshot.prompt_tokens,
        round(snapshot.decision_us, 2),
        columns["candidates"],
        columns["excluded"],
        record,
        listing_digest,
        live_digest,
    )
    parts = [(INSERT_DECISION_PART["models"], listing_digest, listing), (INSERT_DECISION_PART["vectors"], live_digest, live)]
    return row, parts


_SELECT_DECISION = (
    "SELECT d.decision, m.models, v.vectors FROM router_decisions d "
    "LEFT JOIN decision_models m ON m.digest = d.models LEFT JOIN decision_vectors v ON v.digest = d.vectors"
)


async def recent_decisions(store: Store, *, limit: int = 100) -> list[dict[str, Any]]:
    rows = await store.fetchall(f"{_SELECT_DECISION} ORDER BY d.ts DESC LIMIT ?", (limit,))
    from . import decisions

    return [decisions.decode(r["decision"], r["models"], r["vectors"]) for r in rows]


# A request's ledger row is stamped when it starts, before it is routed (the cache is looked up
# first), so its outcome is looked for this far before the decision: the time index, not a scan.
OUTCOME_WINDOW_S = 300.0


async def decision_summaries(
    store: Store, *, limit: int = 20, before: str | None = None, api_key_id: str | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """A page of decisions, newest first, each in a few hundred bytes: what was chosen and how it went,
    the candidates and exclusions counted. `before` is the id of the page's last decision; with it
    the next page follows. Returns the page and whether there is more. ValueError: `before` names no decision.
    `api_key_id`: only the decisions of that gateway key's requests."""
    from ..core.events import (
        decision_summary,  # the event bus, which a report on the ledger does not need
    )

    conditions: list[str] = []
    params: list[Any] = []
    if before is not None:
        cursor = await store.fetchone("SELECT ts, id FROM router_decisions WHERE id = ?", (before,))
        if cursor is None:
            raise ValueError(f"no decision {before!r}")
        conditions.append("(ts < ? OR (ts = ? AND id < ?))")
        params += [cursor["ts"], cursor["ts"], cursor["id"]]
    if api_key_id is not None:
        conditions.append(_OF_KEY)
        params.append(api_key_id)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = await store.fetchall(
        f"SELECT id, ts, mode, chosen, est_cost_usd, candidates, excluded FROM router_decisions {where} "
        "ORDER BY ts DESC, id DESC LIMIT ?",
        (*params, limit + 1),
    )
    more = len(rows) > limit
    rows = rows[:limit]
    outcomes: dict[str, dict[str, Any]] = {}
    if rows:
        ids = [r["id"] for r in rows]
        found = await store.fetchall(
            "SELECT decision_id, id, provider, model, cost_usd, latency_ms, status, error_kind, session_id, source "
            "FROM requests "
            f"WHERE ts >= ? AND ts <= ? AND decision_id IN ({', '.join('?' for _ in ids)})",
            (min(r["ts"] for r in rows) - OUTCOME_WINDOW_S, max(r["ts"] for r in rows), *ids),
        )
        outcomes = {o["decision_id"]: o for o in found}
    return [decision_summary(r, outcomes.get(r["id"])) for r in rows], more


_OF_KEY = "id IN (SELECT decision_id FROM requests WHERE api_key_id = ? AND decision_id IS NOT NULL)"


async def get_decision(store: Store, decision_id: str, *, api_key_id: str | None = None) -> dict[str, Any] | None:
    """One decision whole; with `api_key_id`, only if that key's request made it."""
    mine = "" if api_key_id is None else f" AND d.{_OF_KEY}"
    params = (decision_id,) if api_key_id is None else (decision_id, api_key_id)
    row = await store.fetchone(f"{_SELECT_DECISION} WHERE d.id = ?{mine}", params)
    from . import decisions

    return decisions.decode(row["decision"], row["models"], row["vectors"]) if row else None


# --- provider health ---------------------------------------------------------------

# Its parameters: a `health_row`, then whether the provider was the simulator (0 or 1).
INSERT_HEALTH = (
    "INSERT INTO provider_health (ts, provider, status, circuit, error_rate, latency_ms_p50, latency_ms_p95, snapshot, "
    "simulated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def health_row(snapshot: dict[str, Any]) -> tuple:
    return (
        snapshot.get("ts") or time.time(),
        snapshot["provider"],
        snapshot.get("status"),
        snapshot.get("circuit"),
        snapshot.get("error_rate"),
        snapshot.get("latency_ms_p50"),
        snapshot.get("latency_ms_p95"),
        json.dumps(snapshot, default=str),
    )


async def health_history(
    store: Store, *, provider: str | None = None, since: float | None = None, limit: int = 500
) -> list[dict[str, Any]]:
    """Snapshots, oldest first: {ts, provider, status, circuit, error_rate, latency_ms_p50, latency_ms_p95}."""
    clauses, params = [], []
    if provider is not None:
        clauses.append("provider = ?")
        params.append(provider)
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = await store.fetchall(
        "SELECT * FROM (SELECT ts, provider, status, circuit, error_rate, latency_ms_p50, latency_ms_p95 "
        f"FROM provider_health {where} ORDER BY ts DESC LIMIT ?) AS latest ORDER BY ts",
        (*params, limit),
    )
    return rows


# --- gateway keys ------------------------------------------------------------------

KEY_PREFIX = "p402-"


def _hash_key(secret: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 cannot be brute-forced back; a slow KDF buys nothing here.
    return hashlib.sha256(secret.encode()).hexdigest()


ROLES = ("admin", "user", "viewer")


def _public_key(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "role": row.get("role") or "admin",
        "prefix": row["prefix"],
        "created": row["created"],
        "updated": row.get("updated"),
        "revoked": row["revoked"],
        "active": row["revoked"] is None,
        "policy": json.loads(row.get("policy") or "{}"),
    }


async def create_key(
    store: Store, name: str, *, role: str = "admin", policy: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """A new gateway key: (its public record, the secret). The secret is shown once and never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = {
        "id": f"key-{uuid.uuid4().hex[:12]}",
        "name": name,
        "role": role,
        "hash": _hash_key(secret),
        "prefix": secret[:12],
        "created": time.time(),
        "revoked": None,
        "policy": json.dumps(policy or {}, sort_keys=True),
    }
    await store.run(
        "INSERT INTO gateway_keys (id, name, role, hash, prefix, created, revoked, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (row["id"], row["name"], row["role"], row["hash"], row["prefix"], row["created"], row["revoked"], row["policy"]),
    )
    store.keys_changed()
    return _public_key(row), secret


async def verify_key(store: Store, secret: str) -> dict[str, Any] | None:
    """The active key a secret belongs to, or None."""
    digest = _hash_key(secret)
    row = await store.fetchone("SELECT * FROM gateway_keys WHERE hash = ? AND revoked IS NULL", (digest,))
    if row is None or not hmac.compare_digest(row["hash"], digest):
        return None
    return _public_key(row)


async def list_keys(store: Store) -> list[dict[str, Any]]:
    return [_public_key(r) for r in await store.fetchall("SELECT * FROM gateway_keys ORDER BY created")]


async def get_key(store: Store, key_id: str) -> dict[str, Any] | None:
    row = await store.fetchone("SELECT * FROM gateway_keys WHERE id = ?", (key_id,))
    return None if row is None else _public_key(row)


async def update_key(
    store: Store, key_id: str, *, name: str | None = None, role: str | None = None, policy: dict[str, Any] | None = None
) -> bool:
    """Change what is given of an active key; True if there was one. Gateways see it as they see a revocation."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    changes = {"name": name, "role": role, "policy": None if policy is None else json.dumps(policy, sort_keys=True)}
    sets = [(column, value) for column, value in changes.items() if value is not None]
    sql = ", ".join(f"{column} = ?" for column, _ in sets) + (", " if sets else "") + "updated = ?"
    changed = await store.run(
        f"UPDATE gateway_keys SET {sql} WHERE id = ? AND revoked IS NULL",
        (*[value for _, value in sets], time.time(), key_id),
    )
    store.keys_changed()
    return changed > 0


async def revoke_key(store: Store, key_id: str) -> bool:
    """True if an active key was revoked."""
    changed = await store.run(
        "UPDATE gateway_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
    )
    store.keys_changed()  # this process's gateways stop taking the key at once; others within their ttl
    return changed > 0
