"""The use cases every front end shares: sessions, spend and recommendations, decisions, keys.

`Service` runs them on this process's store: `Runtime` builds one, a CLI report opens one
with `open_service`. The gateway's handlers, the CLI and the local console call it, and
none of them reaches into the store. `client.AsyncP402` answers the same `P402Service`
protocol over a running gateway.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ..core.catalog import Catalog
from ..core.config import describe_store
from ..core.errors import P402Error
from ..store.db import StoreError, StoreUnavailableError
from ..store.engine import exists, open_store
from ..store.store import Store
from . import operations, responses, sessions, spend
from .protocol import DecisionPage, DecisionSummary, P402Service, Recommendation, Session, Spend

__all__ = [
    "DecisionPage", "DecisionSummary", "NoStoreError", "P402Service", "Recommendation", "Service", "Session",
    "Spend", "Store", "StoreError", "StoreUnavailableError", "describe_store", "open_service",
]  # fmt: skip


def _decisions():
    """The decision records' use cases, imported when first asked for: their codec brings numpy and the router,
    which a spend report or a session listing never uses."""
    from . import decisions

    return decisions


def _keys():
    """The gateway keys' use cases, imported when first asked for (with the policy rules they check)."""
    from . import keys

    return keys


class NoStoreError(P402Error):
    kind = "no_store"
    http_status = 503


class Service:
    """`P402Service` on a store in this process (or on none: then every use case says so).

    Reads first commit what is queued, so a caller sees the requests it has just made.
    `simulated`: the traffic is the simulator's, and reports count it unless told not to.
    """

    def __init__(self, store: Store | None, catalog: Catalog, *, simulated: bool = False) -> None:
        self.store = store  # for what is no use case of its own (the answer cache's maintenance)
        self.catalog = catalog
        self.simulated = simulated

    @property
    def persistent(self) -> bool:
        return self.store is not None

    def _store(self) -> Store:
        if self.store is None:
            raise NoStoreError("this P402 runs without a store: sessions, analytics and keys are off")
        return self.store

    async def _fresh(self) -> Store:
        store = self._store()
        await store.flush()
        return store

    def _simulated(self, include: bool | None) -> bool:
        return self.simulated if include is None else include

    # --- sessions ----------------------------------------------------------------------

    async def sessions(self, *, status: str | None = None, api_key_id: str | None = None) -> list[Session]:
        """Every session; with `api_key_id`, that key's and the operator's (made without a key)."""
        return await sessions.listed(await self._fresh(), status=status, api_key_id=api_key_id)  # type: ignore[return-value]

    async def session(self, ref: str, *, api_key_id: str | None = None) -> Session:
        return await sessions.get(await self._fresh(), ref, api_key_id)  # type: ignore[return-value]

    async def create_session(
        self, name: str, *, budget_usd: float | None = None, agent: str | None = None,
        metadata: dict[str, Any] | None = None, status: str = "active", api_key_id: str | None = None,
    ) -> Session:  # fmt: skip
        return await sessions.create(  # type: ignore[return-value]
            self._store(), name, budget_usd=budget_usd, agent=agent, metadata=metadata, status=status,
            api_key_id=api_key_id,
        )  # fmt: skip

    async def update_session(self, ref: str, *, api_key_id: str | None = None, **changes: Any) -> Session:
        return await sessions.update(self._store(), ref, api_key_id, **changes)  # type: ignore[return-value]

    async def delete_session(self, ref: str, *, api_key_id: str | None = None) -> str:
        return await sessions.delete(self._store(), ref, api_key_id)

    async def resolve_session(self, ref: str, *, api_key_id: str | None = None) -> str:
        return await sessions.resolve(self._store(), ref, api_key_id)

    async def session_requests(
        self, ref: str, *, limit: int = 100, api_key_id: str | None = None
    ) -> list[dict[str, Any]]:
        return await sessions.requests(await self._fresh(), ref, limit=limit, api_key_id=api_key_id)

    async def session_messages(
        self, ref: str, *, limit: int = 200, api_key_id: str | None = None
    ) -> list[dict[str, Any]]:
        return await sessions.messages(await self._fresh(), ref, limit=limit, api_key_id=api_key_id)

    # --- spend and advice ----------------------------------------------------------------

    async def spend(
        self, period: str | None = "today", *, by: str = "provider", start: str | None = None,
        end: str | None = None, include_simulated: bool | None = None, api_key_id: str | None = None,
    ) -> Spend:  # fmt: skip
        return await spend.spend(  # type: ignore[return-value]
            await self._fresh(), period, by=by, start=start, end=end,
            include_simulated=self._simulated(include_simulated), api_key_id=api_key_id,
        )  # fmt: skip

    async def recommendations(
        self, period: str | None = "30d", *, start: str | None = None, end: str | None = None,
        include_simulated: bool | None = None, api_key_id: str | None = None,
    ) -> list[Recommendation]:  # fmt: skip
        return await spend.recommendations(  # type: ignore[return-value]
            await self._fresh(), self.catalog, period, start=start, end=end,
            include_simulated=self._simulated(include_simulated), api_key_id=api_key_id,
        )  # fmt: skip

    # --- decisions -----------------------------------------------------------------------

    async def decisions(
        self, *, limit: int = 20, before: str | None = None, api_key_id: str | None = None
    ) -> DecisionPage:
        return await _decisions().page(await self._fresh(), limit=limit, before=before, api_key_id=api_key_id)  # type: ignore[return-value]

    async def decision(self, decision_id: str, *, api_key_id: str | None = None) -> dict[str, Any] | None:
        return await _decisions().get(await self._fresh(), decision_id, api_key_id=api_key_id)

    # --- the ledger's writer -------------------------------------------------------------

    @property
    def writes_pending(self) -> int:
        """Ledger writes queued, not yet committed (0 without a store)."""
        return 0 if self.store is None else self.store.writer.pending

    @property
    def writes_saturated(self) -> bool:
        """Whether the ledger's writer is too far behind to take another request."""
        return self.store is not None and self.store.writer.saturated

    @property
    def store_unavailable(self) -> str | None:
        """Why the store's server does not answer (None while it does, and always for a SQLite file)."""
        return None if self.store is None else self.store.unavailable

    # --- stored Responses API answers ------------------------------------------------------

    def keep_response(
        self, response_id: str, ts: float, api_key_id: str | None, response: dict[str, Any], conversation: list[Any]
    ) -> None:
        if self.store is not None:
            responses.keep(self.store, response_id, ts, api_key_id, response, conversation)

    async def stored_response(
        self, response_id: str, api_key_id: str | None
    ) -> tuple[dict[str, Any], list[Any]] | None:
        return None if self.store is None else await responses.find(self.store, response_id, api_key_id)

    async def delete_response(self, response_id: str, api_key_id: str | None) -> bool:
        return self.store is not None and await responses.delete(self.store, response_id, api_key_id)

    # --- keys ------------------------------------------------------------------------------

    async def create_key(
        self, name: str, *, role: str = "user", policy: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], str]:
        """(the key's record, its secret: shown this once)."""
        return await _keys().create_key(self._store(), name, role=role, policy=policy)

    async def keys(self) -> list[dict[str, Any]]:
        return await _keys().list_keys(await self._fresh())

    async def key(self, key_id: str) -> dict[str, Any]:
        return await _keys().show_key(await self._fresh(), key_id)

    async def update_key(self, key_id: str, **changes: Any) -> dict[str, Any]:
        return await _keys().update_key(self._store(), key_id, **changes)

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        return await _keys().revoke_key(self._store(), key_id)

    async def resolve_key(self, ref: str) -> str:
        """The id of the key `ref` names, by id or name."""
        return await _keys().resolve_key(await self._fresh(), ref)

    async def key_requests(self, key_id: str, *, limit: int = 200) -> list[dict[str, Any]]:
        return await _keys().key_requests(await self._fresh(), key_id, limit=limit)

    async def verify_key(self, secret: str) -> dict[str, Any] | None:
        return await _keys().verify(self._store(), secret)

    async def key_count(self) -> int:
        return await _keys().key_count(self._store())

    # --- operations --------------------------------------------------------------------

    async def ready(self, usable_providers: int) -> tuple[bool, dict[str, Any]]:
        """(ready, each check): the store (when there is one) and the providers."""
        return await operations.ready(self.store, usable_providers)

    async def prune(self, older_than_s: float) -> dict[str, Any]:
        """Delete the ledger, decisions and health history older than `older_than_s`, in small batches."""
        return await operations.prune(self._store(), older_than_s)


@asynccontextmanager
async def open_service(
    db_path: str | Path, catalog: Catalog, *, create: bool, must_exist: bool = False
) -> AsyncIterator[Service]:
    """A service on the database at `db_path`, for a command that runs without a Runtime.

    Without `create`, a file not made yet reads as an empty one (reading never creates it);
    with `must_exist` it is a StoreError instead.
    """
    if create or must_exist or await exists(db_path):
        async with await open_store(db_path, create=create) as store:
            yield Service(store, catalog)
        return
    with tempfile.TemporaryDirectory(prefix="p402-empty-") as temp:
        async with await Store.open(Path(temp) / "empty.db") as store:
            yield Service(store, catalog)
