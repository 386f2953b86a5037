"""What a front end asks of P402, whether P402 runs in this process or behind a gateway.

`service.Service` answers from this process's store; `client.AsyncP402` answers over a
gateway's `/api/v2`. Both give the same shapes: the JSON the gateway sends.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict


class Session(TypedDict):
    id: str
    name: str
    agent: str | None
    budget_usd: float | None
    spent_usd: float
    remaining_usd: float | None
    requests: int
    saved_usd: float
    status: str  # active | paused | closed
    metadata: dict[str, Any]
    created: float
    updated: float


class DecisionSummary(TypedDict):
    """A decision in brief, and how its request went once it finished."""

    id: str
    ts: float
    mode: str
    chosen: str | None  # provider/model the router chose
    model: str | None  # provider/model that answered (a failover differs)
    status: str  # ok | error | pending | no_model
    error_kind: str | None
    est_cost_usd: float | None
    cost_usd: float | None
    latency_ms: float | None
    candidates: int
    excluded: int
    request_id: str | None
    session_id: str | None
    source: str | None  # where the request came from, as recorded (gateway:messages, cli...)
    api: str | None  # the API it came through: chat_completions, messages, responses, embeddings; else cli, console...


class DecisionPage(TypedDict):
    data: list[DecisionSummary]
    has_more: bool


class Spend(TypedDict):
    period: dict[str, Any]  # label, start, end, from, to
    by: str
    simulated_left_out: int
    total_usd: float
    requests: int
    saved_usd: float
    cached: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    breakdown: list[dict[str, Any]]  # key, cost_usd, requests, saved_usd, cached; most expensive first


class Recommendation(TypedDict):
    kind: str  # cheaper_model | cache_repeats | unreliable_provider | session_budget
    title: str
    detail: str
    monthly_saving_usd: float | None
    numbers: dict[str, Any]


class P402Service(Protocol):
    """Sessions, spend, recommendations and decisions. A session is named by its id or its name."""

    async def sessions(self, *, status: str | None = None) -> list[Session]: ...

    async def session(self, ref: str) -> Session: ...

    async def create_session(
        self, name: str, *, budget_usd: float | None = None, agent: str | None = None,
        metadata: dict[str, Any] | None = None, status: str = "active",
    ) -> Session: ...  # fmt: skip

    async def update_session(self, ref: str, **changes: Any) -> Session:
        """`name`, `budget_usd` (None removes it), `status`, `agent`, `metadata`."""

    async def delete_session(self, ref: str) -> None: ...

    async def session_requests(self, ref: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """The session's ledger rows, newest first."""

    async def session_messages(self, ref: str, *, limit: int = 200) -> list[dict[str, Any]]:
        """The session's chat history, oldest first."""

    async def spend(
        self, period: str | None = "today", *, by: str = "provider", start: str | None = None,
        end: str | None = None, include_simulated: bool | None = None,
    ) -> Spend: ...  # fmt: skip

    async def recommendations(
        self, period: str | None = "30d", *, start: str | None = None, end: str | None = None,
        include_simulated: bool | None = None,
    ) -> list[Recommendation]: ...  # fmt: skip

    async def decisions(self, *, limit: int = 20, before: str | None = None) -> DecisionPage:
        """Decisions in brief, newest first; `before` (a decision id) pages on."""

    async def decision(self, decision_id: str) -> dict[str, Any] | None:
        """One decision whole, every candidate with its scores; None when there is no such decision."""
