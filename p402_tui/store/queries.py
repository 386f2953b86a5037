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
from ..core.router import decode_decision
from ..core.types import json_bytes
from .store import Store

# --- the ledger --------------------------------------------------------------------

LEDGER_COLUMNS = (
    "id", "ts", "session_id", "api_key_id", "tag", "mode", "provider", "model",
    "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "cost_usd", "est_cost_usd", "saved_usd", "latency_ms", "ttft_ms",
    "status", "error_kind", "error", "cached", "decision_id", "stream", "namespace", "source",
    "attempts", "needs", "prompt_key",
)  # fmt: skip
INSERT_REQUEST = (
    f"INSERT OR REPLACE INTO requests ({', '.join(LEDGER_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in LEDGER_COLUMNS)})"
)


def request_row(record: RequestRecord, *, needs: str | None = None, prompt_key: str | None = None) -> tuple:
    """A ledger row from a record. `needs`: the capabilities the request asked for; `prompt_key`: its exact-cache key."""
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
        json_bytes(attempts).decode(), needs, prompt_key,
    )  # fmt: skip


def _ledger_dict(row: dict[str, Any]) -> dict[str, Any]:
    row["cached"] = bool(row["cached"])
    row["stream"] = bool(row["stream"])
    row["attempts"] = json.loads(row["attempts"] or "[]")
    return row


async def recent_requests(
    store: Store, *, limit: int = 100, session_id: str | None = None, since: float | None = None
) -> list[dict[str, Any]]:
    """Newest first."""
    where, params = _where(session_id=session_id, since=since)
    rows = await store.fetchall(f"SELECT * FROM requests {where} ORDER BY ts DESC LIMIT ?", (*params, limit))
    return [_ledger_dict(r) for r in rows]


async def get_request(store: Store, request_id: str) -> dict[str, Any] | None:
    row = await store.fetchone("SELECT * FROM requests WHERE id = ?", (request_id,))
    return _ledger_dict(row) if row else None


def _where(*, session_id: str | None = None, since: float | None = None) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if session_id is not None:
        clauses.append("session_id = ?")
        params.append(session_id)
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


# --- routing decisions -----------------------------------------------------------

INSERT_DECISION = (
    "INSERT OR REPLACE INTO router_decisions (id, ts, mode, chosen, provider, model, tier, est_cost_usd, "
    "prompt_tokens, decision_us, candidates, excluded, decision, models, vectors) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A decision record's shared parts, by kind: written once per digest.
INSERT_DECISION_PART = {
    "models": "INSERT OR IGNORE INTO decision_models (digest, models) VALUES (?, ?)",
    "vectors": "INSERT OR IGNORE INTO decision_vectors (digest, vectors) VALUES (?, ?)",
}


def decision_row(decision: Any) -> tuple:
    """A decision (a RouteDecision or its to_dict()) as a row: the whole decision plus the columns worth indexing."""
    return decision_rows(decision)[0]


def decision_rows(decision: Any) -> tuple[tuple, list[tuple[str, bytes, bytes]]]:
    """A decision's row, and the shared parts its record refers to: (insert statement, digest, part).

    A RouteDecision is stored as its compact `encode_apart()` (decoded only when read), since
    serialising every candidate of every request was most of the gateway's CPU. The parts
    (the option set's models, the live figures it was ranked with) are the same for many
    requests: they need writing once per digest.
    """
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
            json.dumps(data, default=str),
            None,
            None,
        )
        return row, []
    chosen = decision.chosen_id  # its columns, without scoring it
    provider, _, model = chosen.partition("/") if chosen is not None else (None, None, None)
    record, parts = decision.encode_apart()
    digests = {kind: digest for kind, digest, _ in parts}
    row = (
        decision.id,
        decision.ts,
        decision.mode,
        chosen,
        provider,
        model,
        decision.chosen_tier,
        None if chosen is None else decision.est_cost_usd,
        decision.prompt_tokens,
        round(decision.decision_us, 2),
        decision.candidate_count,
        decision.excluded_count,
        record,
        digests.get("models"),
        digests.get("vectors"),
    )
    return row, [(INSERT_DECISION_PART[kind], digest, part) for kind, digest, part in parts]


_SELECT_DECISION = (
    "SELECT d.decision, m.models, v.vectors FROM router_decisions d "
    "LEFT JOIN decision_models m ON m.digest = d.models LEFT JOIN decision_vectors v ON v.digest = d.vectors"
)


async def recent_decisions(store: Store, *, limit: int = 100) -> list[dict[str, Any]]:
    rows = await store.fetchall(f"{_SELECT_DECISION} ORDER BY d.ts DESC LIMIT ?", (limit,))
    return [decode_decision(r["decision"], r["models"], r["vectors"]) for r in rows]


async def get_decision(store: Store, decision_id: str) -> dict[str, Any] | None:
    row = await store.fetchone(f"{_SELECT_DECISION} WHERE d.id = ?", (decision_id,))
    return decode_decision(row["decision"], row["models"], row["vectors"]) if row else None


# --- provider health ---------------------------------------------------------------

INSERT_HEALTH = (
    "INSERT INTO provider_health (ts, provider, status, circuit, error_rate, latency_ms_p50, latency_ms_p95, snapshot) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
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
        f"FROM provider_health {where} ORDER BY ts DESC LIMIT ?) ORDER BY ts",
        (*params, limit),
    )
    return rows


# --- gateway keys ------------------------------------------------------------------

KEY_PREFIX = "p402-"


def _hash_key(secret: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 cannot be brute-forced back; a slow KDF buys nothing here.
    return hashlib.sha256(secret.encode()).hexdigest()


def _public_key(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "prefix": row["prefix"],
        "created": row["created"],
        "revoked": row["revoked"],
        "active": row["revoked"] is None,
    }


async def create_key(store: Store, name: str) -> tuple[dict[str, Any], str]:
    """A new gateway key: (its public record, the secret). The secret is shown once and never stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = {
        "id": f"key-{uuid.uuid4().hex[:12]}",
        "name": name,
        "hash": _hash_key(secret),
        "prefix": secret[:12],
        "created": time.time(),
        "revoked": None,
    }
    await store.run(
        "INSERT INTO gateway_keys (id, name, hash, prefix, created, revoked) VALUES (?, ?, ?, ?, ?, ?)",
        (row["id"], row["name"], row["hash"], row["prefix"], row["created"], row["revoked"]),
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


async def revoke_key(store: Store, key_id: str) -> bool:
    """True if an active key was revoked."""
    changed = await store.run(
        "UPDATE gateway_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
    )
    store.keys_changed()  # this process's gateways stop taking the key at once; others within their ttl
    return changed > 0
