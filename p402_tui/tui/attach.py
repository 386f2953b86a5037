"""`p402 console --attach URL`: the console on a running gateway.

`AttachClient` follows the gateway's `/api/v2/events` stream and republishes
each event, turned back into the `core.events` object it was, on a local
`EventBus`. The dashboard subscribes to that bus exactly as it subscribes to
the orchestrator's in-process, so its panes work unchanged in both modes. The
snapshots the panes poll (provider health, sessions, spend) come from the
gateway's JSON endpoints, and chat goes through its `/v1/chat/completions`.

The event stream carries each decision in brief (the shape `/api/v2/decisions` lists), so
hundreds of watchers cost the gateway little; a decision is read whole, by its id, when the
console opens it. The decisions made before the console attached come from `/api/v2/decisions`,
so the list is full from the first frame.

The link reconnects by itself with a growing backoff and says how it is doing
(`AttachClient.link`), which the header shows. Attached, the console only
watches: it sends chat and compare prompts like any other client.

The gateway's API is read through `p402_tui.client.AsyncP402`; the source adds the link's
state, its reconnects and the polling (no Textual here either).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from ..client import AsyncP402, ChatStream, GatewayError, gateway_url as client_url
from ..client.wire import network_message
from ..core.errors import P402Error
from ..core.events import DecisionBrief, Event, EventBus, RouteDecided, Subscription
from ..core.hooks import CallContext, RouteOptions
from ..core.router import RouteDecision
from ..core.types import ChatRequest

__all__ = [
    "AttachClient", "GatewayError", "Link", "RemoteLink", "RemoteSource", "gateway_url", "open_remote", "run_attached",
]  # fmt: skip

HEARTBEAT_GRACE_S = 45.0  # the gateway sends a keep-alive every 15 s; three missed ones mean the link is dead
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
RECENT_DECISIONS = 500


@dataclass(slots=True)
class Link:
    """How the event stream is doing: connecting, up, or down until `retry_at`."""

    url: str
    state: str = "connecting"  # connecting | up | down
    retry_at: float | None = None
    error: str | None = None

    def describe(self, now: float | None = None) -> str:
        if self.state == "up":
            return f"attached to {self.url}"
        if self.state == "connecting":
            return f"connecting to {self.url}"
        wait = max(0, round((self.retry_at or 0) - (time.monotonic() if now is None else now)))
        return f"link down, retrying in {wait}s"


def gateway_url(text: str) -> str:
    """The gateway's base URL, or a clear error for something that cannot be one."""
    try:
        return client_url(text)
    except GatewayError as error:
        raise P402Error(f"--attach {error.message}") from None


class AttachClient:
    """The console's view of a running gateway: its live events on `bus`, its API as `api`."""

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        bus: EventBus | None = None,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        read_timeout_s: float = HEARTBEAT_GRACE_S,
    ) -> None:
        self.url = gateway_url(url)
        self.api = AsyncP402(self.url, key, timeout=10.0, read_timeout=read_timeout_s)
        self.bus = bus or EventBus()
        self.link = Link(self.url)
        self.decisions: OrderedDict[str, DecisionBrief | RouteDecision] = OrderedDict()  # recent ones, in brief
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self._task: asyncio.Task[None] | None = None
        self._watchers: list[Callable[[Link], None]] = []

    def __repr__(self) -> str:  # never the key
        return f"AttachClient({self.url!r}, link={self.link.state})"

    # --- life ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="p402-attach-events")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.api.aclose()

    async def __aenter__(self) -> "AttachClient":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def watch(self, callback: Callable[[Link], None]) -> None:
        """Call `callback(link)` whenever the link changes state."""
        self._watchers.append(callback)

    def _set_link(self, state: str, *, retry_at: float | None = None, error: str | None = None) -> None:
        self.link = Link(self.url, state, retry_at, error)
        for callback in self._watchers:
            callback(self.link)

    async def wait_until_up(self, timeout: float = 10.0) -> None:
        """For callers that must not miss an event (tests, scripts): wait for the stream to open."""
        async with asyncio.timeout(timeout):
            while self.link.state != "up":
                await asyncio.sleep(0.02)

    # --- following the event stream ------------------------------------------------------

    async def _follow(self) -> None:
        delay = self.backoff_first_s

        def opened() -> None:
            nonlocal delay
            self._set_link("up")
            delay = self.backoff_first_s

        while True:
            try:
                async for event in self.api.events(on_open=opened):
                    self._dispatch(event)
                error = "the gateway closed the event stream"
            except asyncio.CancelledError:
                raise
            except GatewayError as exc:
                error = exc.message
            except (httpx.HTTPError, OSError) as exc:
                error = network_message(exc)
            except Exception as exc:  # whatever the transport raises, the link retries rather than dies
                error = f"link error: {exc}"
            self._set_link("down", retry_at=time.monotonic() + delay, error=error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)
            self._set_link("connecting")

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, RouteDecided):
            self.decisions[event.decision.id] = event.decision
            while len(self.decisions) > RECENT_DECISIONS:
                self.decisions.popitem(last=False)
        self.bus.publish(event)

    # --- chat ---------------------------------------------------------------------------

    def stream(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> ChatStream:
        extra = request.model_dump(mode="json", exclude_none=True, exclude={"messages", "model", "stream"})
        return self.api.stream(request.messages, model=options.model or "auto", mode=options.mode,
                               session=ctx.session_id, tag=ctx.tag, cache=ctx.cache, extra=extra)


# --- the console's source and chat link on a gateway -------------------------------------------


class RemoteLink:
    """Chat and compare through the gateway: its `/v1/chat/completions` and its sessions API.

    The gateway's store files each answered request's messages under its session, as
    in-process; a gateway without a store answers 503 and the screens keep to memory.
    """

    def __init__(self, client: AttachClient) -> None:
        self.client = client
        self.persistent = True  # until the gateway says it has no store

    async def models(self) -> list[str]:
        providers = await self.client.api.providers()
        return [
            m["id"]
            for p in providers
            if p.get("usable")
            for m in p.get("models") or ()
            if "chat" in (m.get("capabilities") or ())
        ]

    def default_mode(self) -> str:
        return "balanced"  # the gateway's own default is not on its API; the picker shows what is sent

    def stream(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> ChatStream:
        return self.client.stream(request, options, ctx)

    async def create_session(self, name: str, metadata: dict[str, Any]) -> str | None:
        try:
            created = await self.client.api.create_session(name, agent="console", metadata=metadata)
        except GatewayError as error:
            if error.status == 503:
                self.persistent = False
                return None
            raise
        return created["id"]

    async def set_metadata(self, session_id: str, metadata: dict[str, Any]) -> None:
        await self.client.api.update_session(session_id, metadata=metadata)


class RemoteSource:
    """`ConsoleSource` on a gateway: the attached event stream, and snapshots polled from `/api/v2`.

    `health()` and `providers()` must answer at once (the app calls them on every
    refresh), so a task keeps them fresh every `poll_s`; the last good snapshot stays
    on screen while the link is down.
    """

    simulated = False

    def __init__(self, client: AttachClient, *, poll_s: float = 2.0) -> None:
        self.client = client
        self.chat_link = RemoteLink(client)
        self.poll_s = poll_s
        self.on_change: Callable[[], None] | None = None  # the app's status line, told of link changes
        self._health: dict[str, dict[str, Any]] = {}
        self._providers: list[str] = []
        self._task: asyncio.Task[None] | None = None
        client.watch(lambda _link: self._changed())

    @property
    def label(self) -> str:
        return self.client.link.describe()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def start(self) -> None:
        self.client.start()
        self._task = asyncio.create_task(self._poll(), name="p402-attach-poll")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()

    async def refresh(self) -> None:
        """Read the providers and their health now. GatewayError: the gateway refused or is out of reach."""
        usable = [p for p in await self.client.api.providers() if p.get("usable")]
        self._providers = [p["id"] for p in usable]
        self._health = {p["id"]: p["health"] for p in usable if p.get("health")}

    async def _poll(self) -> None:
        polled = time.monotonic()  # `open_remote` has just read them
        while True:
            if self.client.link.state == "down":
                self._changed()  # the countdown to the next retry
            elif time.monotonic() - polled >= self.poll_s:
                polled = time.monotonic()
                try:
                    await self.refresh()
                except GatewayError:
                    pass  # the event stream's own retry says the link is down
            await asyncio.sleep(1.0)

    async def history(self) -> list[dict[str, Any]]:
        """The decisions the gateway made before the console attached, in brief, newest first."""
        from .source import HISTORY

        return list((await self.client.api.decisions(limit=HISTORY))["data"])

    def subscribe(self) -> Subscription:
        from .source import SUBSCRIPTION_SIZE

        return self.client.bus.subscribe(maxsize=SUBSCRIPTION_SIZE)

    def providers(self) -> list[str]:
        return list(self._providers)

    def health(self) -> dict[str, dict[str, Any]]:
        return self._health

    async def summary(self) -> Any:
        from .state import CacheInfo, SpendSummary

        try:
            today = await self.client.api.spend("today")
            week = await self.client.api.spend("7d")
            month = await self.client.api.spend("30d", by="model")
        except GatewayError as error:
            if error.status == 503:
                return None  # no ledger there: the console keeps its own tally of what it sees
            raise
        top = sorted(month["breakdown"], key=lambda r: (-(r["cost_usd"] or 0.0), r["key"]))[:5]  # None: unpriced
        cache = await self.client.api.cache()
        return SpendSummary(
            today_usd=today["total_usd"],
            week_usd=week["total_usd"],
            month_usd=month["total_usd"],
            requests_today=today["requests"],
            saved_usd=month.get("saved_usd", 0.0),
            cache_hits=month.get("cached", 0),
            top_models=[(r["key"], r["cost_usd"] or 0.0, r["requests"]) for r in top],
            cache=CacheInfo.from_snapshot(cache) if cache is not None else None,
        )

    async def sessions(self) -> list[dict[str, Any]]:
        """The gateway's sessions; none when it runs without a store."""
        try:
            return list(await self.client.api.sessions())
        except GatewayError as error:
            if error.status == 503:
                return []
            raise

    async def keys(self) -> list[dict[str, Any]]:
        return (await self.client.api.get_json("/api/v2/keys"))["data"]  # an admin key's; others get a 403

    async def key_requests(self, key_id: str) -> list[dict[str, Any]]:
        return (await self.client.api.get_json(f"/api/v2/keys/{key_id}/requests"))["data"]

    async def session(self, session_id: str) -> dict[str, Any]:
        api = self.client.api
        session, requests, messages = await asyncio.gather(
            api.session(session_id), api.session_requests(session_id, limit=200), api.session_messages(session_id)
        )
        return {"session": session, "requests": requests, "messages": messages}

    async def decision(self, decision_id: str) -> dict[str, Any] | None:
        known = self.client.decisions.get(decision_id)
        if isinstance(known, RouteDecision):
            return known.to_dict()
        return await self.client.api.decision(decision_id)


@asynccontextmanager
async def open_remote(url: str, key: str | None, on_change: Callable[[], None] | None = None) -> AsyncIterator[RemoteSource]:
    """The gateway at `url` as a started source. A gateway that refuses the key ends it with a clear error:
    retrying cannot mend a missing or revoked key, and the live view would only say the link is down."""
    source = RemoteSource(AttachClient(url, key))
    source.on_change = on_change
    try:
        await source.refresh()  # health is on screen from the first frame the source feeds
    except GatewayError as error:
        if error.status in (401, 403):
            await source.aclose()
            hint = "give it with --key" if not key else "check --key"
            raise GatewayError(f"{error.message} ({hint}; `p402 keys create` makes one)", status=error.status) from None
        # unreachable or failing for now: the console comes up and shows the link retrying
    await source.start()
    try:
        yield source
    finally:
        await source.aclose()


def run_attached(url: str, key: str | None, refresh: float) -> int:
    """`p402 console --attach URL`: the console on a running gateway until the user quits."""
    from .app import ConsoleApp
    from .launch import run_app

    url = gateway_url(url)
    app = ConsoleApp(refresh_interval=refresh)

    def status_changed() -> None:
        update = getattr(app.screen, "update_status", None) if app.is_running else None
        if update is not None:
            update()

    asyncio.run(run_app(app, lambda: open_remote(url, key, status_changed)))
    return app.return_code or 0
