"""Where the console's data comes from.

The console reads through a `ConsoleSource`: a bus subscription for live
events, plus a few queries (health, spend, sessions, one decision). `LocalSource`
reads a `Runtime` in this process (`p402`, `p402 demo`); a source that reads a
remote gateway's `/api/v2` can stand in for it with the same methods.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..core.events import Subscription
from .state import CacheInfo, SpendSummary

# Big enough to hold a couple of seconds at 500 events/s between two drains.
SUBSCRIPTION_SIZE = 20_000
HISTORY = 200  # past decisions read at start: as many as the decisions pane shows


class ConsoleSource(Protocol):
    label: str  # shown in the header: "local", "SIMULATED", a gateway URL
    simulated: bool

    def subscribe(self) -> Subscription: ...

    def providers(self) -> list[str]: ...

    def health(self) -> dict[str, dict[str, Any]]: ...

    async def summary(self) -> SpendSummary | None:
        """Totals from the ledger, or None when there is no ledger (the console then keeps its own)."""

    async def sessions(self) -> list[dict[str, Any]]: ...

    async def session(self, session_id: str) -> dict[str, Any]:
        """{"session": {...}, "requests": [...], "messages": [...]}"""

    async def decision(self, decision_id: str) -> dict[str, Any] | None: ...

    async def history(self) -> list[dict[str, Any]]:
        """Decisions made before the console started, in brief, newest first (as /api/v2/decisions gives them)."""

    async def keys(self) -> list[dict[str, Any]]:
        """Gateway keys as /api/v2/keys lists them: role, policy, usage, and `live` figures where known."""

    async def key_requests(self, key_id: str) -> list[dict[str, Any]]:
        """A key's latest requests, newest first."""


class LocalSource:
    """The console on a Runtime in this process."""

    def __init__(self, runtime: Any, *, simulated: bool = False, label: str | None = None) -> None:
        self.runtime = runtime
        self.simulated = simulated
        self.label = label or ("SIMULATED" if simulated else "local")

    @property
    def service(self) -> Any:
        """The runtime's use cases (`service.Service`); without a store they have nothing to read."""
        return self.runtime.service

    def subscribe(self) -> Subscription:
        return self.runtime.bus.subscribe(maxsize=SUBSCRIPTION_SIZE)

    def providers(self) -> list[str]:
        return [p.id for p in self.runtime.settings.usable_providers()]

    def health(self) -> dict[str, dict[str, Any]]:
        snapshot = self.runtime.orchestrator.health.snapshot(self.providers())
        return {pid: health.to_dict() for pid, health in snapshot.items()}

    async def summary(self) -> SpendSummary | None:
        service = self.service
        if not service.persistent:
            return None
        everything = self.simulated  # on the simulator, its traffic is the traffic to show
        today = await service.spend("today", include_simulated=everything)
        week = await service.spend("7d", include_simulated=everything)
        month = await service.spend("30d", by="model", include_simulated=everything)
        top = [r for r in month["breakdown"] if r["key"] != "(none)"][:5]  # most expensive first
        cache = self.runtime.cache
        return SpendSummary(
            today_usd=today["total_usd"],
            week_usd=week["total_usd"],
            month_usd=month["total_usd"],
            requests_today=today["requests"],
            saved_usd=today["saved_usd"],
            cache_hits=today["cached"],
            top_models=[(r["key"], r["cost_usd"] or 0.0, r["requests"]) for r in top],  # None: unpriced
            cache=CacheInfo.from_snapshot(cache.snapshot()) if cache is not None else None,
        )

    async def sessions(self) -> list[dict[str, Any]]:
        if not self.service.persistent:
            return []
        return await self.service.sessions()

    async def session(self, session_id: str) -> dict[str, Any]:
        from ..core.errors import P402Error

        service = self.service
        if not service.persistent:
            raise P402Error("sessions need the store, and this console runs without one")
        return {
            "session": await service.session(session_id),
            "requests": await service.session_requests(session_id, limit=200),
            "messages": await service.session_messages(session_id),
        }

    async def decision(self, decision_id: str) -> dict[str, Any] | None:
        if not self.service.persistent:
            return None
        return await self.service.decision(decision_id)

    async def history(self) -> list[dict[str, Any]]:
        if not self.service.persistent:
            return []
        return (await self.service.decisions(limit=HISTORY))["data"]

    async def keys(self) -> list[dict[str, Any]]:
        if not self.service.persistent:
            return []
        found = await self.service.keys()
        gateways = getattr(self.runtime, "gateways", [])
        if gateways:  # this process serves the gateway: its rate windows and refusals are here
            engine = gateways[0].gateway.policy
            for key in found:
                key["live"] = engine.live(key["id"])
        return found

    async def key_requests(self, key_id: str) -> list[dict[str, Any]]:
        return await self.service.key_requests(key_id) if self.service.persistent else []
