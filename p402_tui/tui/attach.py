"""`p402 console --attach URL`: the console on a running gateway.

`AttachClient` follows the gateway's `/api/v2/events` stream and republishes
each event, turned back into the `core.events` object it was, on a local
`EventBus`. The dashboard subscribes to that bus exactly as it subscribes to
the orchestrator's in-process, so its panes work unchanged in both modes. The
snapshots the panes poll (provider health, sessions, spend) come from the
gateway's JSON endpoints, and chat goes through its `/v1/chat/completions`.

The decisions made before the console attached come from `/api/v2/decisions` (in brief; one
whole when opened), so the list is full from the first frame.

The link reconnects by itself with a growing backoff and says how it is doing
(`AttachClient.link`), which the header shows. Attached, the console only
watches: it sends chat and compare prompts like any other client.

The client and the source are plain asyncio + httpx (no Textual), tested on their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from ..core.errors import P402Error
from ..core.events import (
    AttemptFailed,
    CacheHit,
    Event,
    EventBus,
    HealthChanged,
    RequestCompleted,
    RequestRejected,
    RouteDecided,
    SpendUpdated,
    Subscription,
)
from ..core.hooks import CallContext, RequestRecord, RouteOptions
from ..core.router import RouteDecision
from ..core.types import Attempt, ChatChunk, ChatRequest, P402Meta, ToolCallDelta, Usage

HEARTBEAT_GRACE_S = 45.0  # the gateway sends a keep-alive every 15 s; three missed ones mean the link is dead
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
RECENT_DECISIONS = 500


class GatewayError(P402Error):
    """The gateway answered with an error (its OpenAI-shaped body), or could not be reached."""

    kind = "gateway"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- events back from their wire form ---------------------------------------------------


_RECORD_FIELDS = frozenset(RequestRecord.__dataclass_fields__) - {"attempts"}


def record_from_dict(data: dict[str, Any]) -> RequestRecord:
    record = RequestRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})
    record.attempts = [_attempt(a) for a in data.get("attempts") or ()]
    return record


def _attempt(data: dict[str, Any]) -> Attempt:
    return Attempt(
        provider=data.get("provider", ""),
        model=data.get("model", ""),
        error_kind=data.get("error_kind"),
        error=data.get("error"),
        latency_ms=float(data.get("latency_ms") or 0.0),
    )


def _fields(cls: type[Event], data: dict[str, Any]) -> dict[str, Any]:
    # dataclasses.fields, not __dataclass_fields__: that holds `kind` (a ClassVar) too, and an
    # event rebuilt with kind= raised, so it was dropped as unreadable.
    names = {f.name for f in dataclasses.fields(cls) if f.init} - {"ts"}
    return {k: v for k, v in data.items() if k in names}


def event_from_dict(kind: str, data: dict[str, Any]) -> Event | None:
    """The `core.events` object an SSE frame carries; None for kinds this console does not know."""
    ts = float(data.get("ts") or time.time())
    if kind == RouteDecided.kind:
        return RouteDecided(decision=RouteDecision.from_dict(data["decision"]), ts=ts)
    if kind == RequestCompleted.kind:
        return RequestCompleted(record=record_from_dict(data["record"]), ts=ts)
    for cls in (AttemptFailed, RequestRejected, HealthChanged, SpendUpdated, CacheHit):
        if kind == cls.kind:
            return cls(**_fields(cls, data), ts=ts)
    return None


async def sse_frames(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs from server-sent event lines; comments (keep-alives) are skipped."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


# --- the link ----------------------------------------------------------------------------


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
        url = httpx.URL(text)
        port = url.port
    except (httpx.InvalidURL, ValueError):
        url, port = None, None
    if url is None or url.scheme not in ("http", "https") or not url.host or not (port is None or 0 < port < 65536):
        raise P402Error(f"--attach wants the gateway's address, like http://127.0.0.1:4020, not {text!r}")
    return text.rstrip("/")


class AttachClient:
    """The console's view of a running gateway: its live events on `bus`, its snapshots on request."""

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
        self.bus = bus or EventBus()
        self.link = Link(self.url)
        self.decisions: OrderedDict[str, RouteDecision] = OrderedDict()  # recent ones, for chat's routing line
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(10.0, read=read_timeout_s),
        )
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
        await self._http.aclose()

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
        while True:
            try:
                async with self._http.stream("GET", "/api/v2/events", headers={"Accept": "text/event-stream"}) as response:
                    if response.status_code != 200:
                        body = (await response.aread()).decode(errors="replace")
                        raise GatewayError(_error_message(response.status_code, body), status=response.status_code)
                    self._set_link("up")
                    delay = self.backoff_first_s
                    async for kind, data in sse_frames(response.aiter_lines()):
                        self._dispatch(kind, data)
                error = "the gateway closed the event stream"
            except asyncio.CancelledError:
                raise
            except GatewayError as exc:
                error = exc.message
            except (httpx.HTTPError, OSError) as exc:
                error = _network_message(exc)
            except Exception as exc:  # whatever the transport raises, the link retries rather than dies
                error = f"link error: {exc}"
            self._set_link("down", retry_at=time.monotonic() + delay, error=error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)
            self._set_link("connecting")

    def _dispatch(self, kind: str, data: str) -> None:
        try:
            event = event_from_dict(kind, json.loads(data))
        except (ValueError, KeyError, TypeError):
            return  # a frame this console cannot read must not end the link
        if event is None:
            return
        if isinstance(event, RouteDecided):
            self.decisions[event.decision.id] = event.decision
            while len(self.decisions) > RECENT_DECISIONS:
                self.decisions.popitem(last=False)
        self.bus.publish(event)

    # --- snapshots ----------------------------------------------------------------------

    async def get_json(self, path: str, **params: Any) -> Any:
        try:
            response = await self._http.get(path, params=params or None)
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(_network_message(exc)) from None
        if response.status_code != 200:
            raise GatewayError(_error_message(response.status_code, response.text), status=response.status_code,
                               code=_error_code(response.text))
        return response.json()

    async def send_json(self, method: str, path: str, body: dict[str, Any]) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(_network_message(exc)) from None
        if response.status_code not in (200, 201):
            raise GatewayError(_error_message(response.status_code, response.text), status=response.status_code,
                               code=_error_code(response.text))
        return response.json()

    async def providers(self) -> list[dict[str, Any]]:
        return (await self.get_json("/api/v2/providers"))["data"]

    async def sessions(self) -> list[dict[str, Any]]:
        """The gateway's sessions; none when it runs without a store."""
        try:
            return (await self.get_json("/api/v2/sessions"))["data"]
        except GatewayError as error:
            if error.status == 503:
                return []
            raise

    async def spend(self, period: str = "today", by: str | None = None) -> dict[str, Any]:
        params = {"period": period} | ({"by": by} if by else {})
        return await self.get_json("/api/v2/analytics/spend", **params)

    async def cache(self) -> dict[str, Any] | None:
        """The answer cache's embedder and stats (`{"enabled": false}` when off); None from a gateway too old to say."""
        try:
            return await self.get_json("/api/v2/cache")
        except GatewayError as error:
            if error.status == 404:
                return None
            raise

    async def recent_decisions(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest decisions in brief (chosen model, outcome, cost, counts), newest first."""
        return (await self.get_json("/api/v2/decisions", limit=limit))["data"]

    async def decision(self, decision_id: str) -> dict[str, Any] | None:
        """One decision whole, with every candidate; None when the gateway no longer has it."""
        try:
            return await self.get_json(f"/api/v2/decisions/{decision_id}")
        except GatewayError as error:
            if error.status == 404:
                return None
            raise

    async def models(self) -> list[str]:
        """Aliases and catalog models, as the in-process link lists them: the router's own `p402/<mode>` names are not models."""
        listed = (await self.get_json("/v1/models"))["data"]
        return [m["id"] for m in listed if not (m.get("owned_by") == "p402" and "/" in m["id"])]

    # --- chat ---------------------------------------------------------------------------

    def stream(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> "RemoteChatStream":
        return RemoteChatStream(self, _chat_body(request, options, ctx))


def _chat_body(request: ChatRequest, options: RouteOptions, ctx: CallContext) -> dict[str, Any]:
    body = request.model_dump(mode="json", exclude_none=True)
    body["model"] = options.model or "auto"
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    p402: dict[str, Any] = {"cache": ctx.cache}
    if options.mode:
        p402["mode"] = options.mode
    if ctx.session_id:
        p402["session_id"] = ctx.session_id
    if ctx.tag:
        p402["tag"] = ctx.tag
    body["p402"] = p402
    return body


class RemoteChatStream:
    """One answer streamed through the gateway, shaped like the orchestrator's `ChatStream`.

    `aclose()` drops the connection; the gateway sees the disconnect and cancels the upstream call.
    """

    def __init__(self, client: AttachClient, body: dict[str, Any]) -> None:
        self.client = client
        self.body = body
        self.meta = P402Meta(provider="", model=body.get("model") or "auto")
        self._chunks: AsyncIterator[ChatChunk] | None = None
        self._response: httpx.Response | None = None
        self._started = time.monotonic()

    @property
    def decision(self) -> RouteDecision | None:
        """The routing decision, when its event has arrived on the attached event stream."""
        return self.client.decisions.get(self.meta.decision_id) if self.meta.decision_id else None

    def __aiter__(self) -> "RemoteChatStream":
        return self

    async def __anext__(self) -> ChatChunk:
        if self._chunks is None:
            self._chunks = self._read()
        return await self._chunks.__anext__()

    async def __aenter__(self) -> "RemoteChatStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        if self._response is not None:
            await self._response.aclose()

    async def _read(self) -> AsyncIterator[ChatChunk]:
        http = self.client._http
        try:
            request = http.build_request("POST", "/v1/chat/completions", json=self.body)
            self._response = response = await http.send(request, stream=True)
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(_network_message(exc)) from None
        try:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise GatewayError(_error_message(response.status_code, text), status=response.status_code,
                                   code=_error_code(text))
            async for _, data in sse_frames(response.aiter_lines()):
                if data == "[DONE]":
                    return
                frame = json.loads(data)
                if "error" in frame:
                    error = frame["error"] or {}
                    yield ChatChunk(error={"kind": error.get("code") or "upstream_failed",
                                           "message": error.get("message") or "the stream broke"})
                    return
                chunk = self._chunk(frame)
                if chunk is not None:
                    yield chunk
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(_network_message(exc)) from None
        finally:
            await response.aclose()

    def _chunk(self, frame: dict[str, Any]) -> ChatChunk | None:
        if "p402" in frame:
            self._take_meta(frame["p402"])
        usage = _usage(frame.get("usage"))
        choices = frame.get("choices") or []
        if not choices:
            return ChatChunk(usage=usage) if usage else None
        delta = choices[0].get("delta") or {}
        if delta.get("content") and self.meta.ttft_ms is None:
            self.meta.ttft_ms = (time.monotonic() - self._started) * 1000
        tool_calls = None
        if delta.get("tool_calls"):
            tool_calls = [
                ToolCallDelta(
                    index=t.get("index", 0),
                    id=t.get("id"),
                    name=(t.get("function") or {}).get("name"),
                    arguments=(t.get("function") or {}).get("arguments") or "",
                )
                for t in delta["tool_calls"]
            ]
        return ChatChunk(
            content=delta.get("content") or "",
            reasoning=delta.get("reasoning_content") or "",
            tool_calls=tool_calls,
            finish_reason=choices[0].get("finish_reason"),
            usage=usage,
            role=delta.get("role"),
        )

    def _take_meta(self, data: dict[str, Any]) -> None:
        self.meta = P402Meta(
            provider=data.get("provider") or "",
            model=data.get("model") or "",
            cost_usd=float(data.get("cost_usd") or 0.0),
            latency_ms=float(data.get("latency_ms") or 0.0),
            ttft_ms=data.get("ttft_ms", self.meta.ttft_ms),
            attempts=[_attempt(a) for a in data.get("attempts") or ()],
            decision_id=data.get("decision_id"),
            cached=bool(data.get("cached")),
            saved_usd=float(data.get("saved_usd") or 0.0),
            usage_estimated=bool(data.get("usage_estimated")),
        )


def _usage(data: dict[str, Any] | None) -> Usage | None:
    if not data:
        return None
    return Usage(
        prompt_tokens=data.get("prompt_tokens") or 0,
        completion_tokens=data.get("completion_tokens") or 0,
        cached_tokens=(data.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        reasoning_tokens=(data.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0,
    )


def _error_code(body: str) -> str | None:
    try:
        return json.loads(body)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _error_message(status: int, body: str) -> str:
    """The gateway's own words for an error (its OpenAI-shaped body), else the status."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:200] or "no details"
    return f"gateway answered {status}: {message}"


def _network_message(exc: BaseException) -> str:
    if isinstance(exc, httpx.ReadTimeout):
        return "no word from the gateway (not even a keep-alive)"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect to the gateway"
    text = str(exc).strip()
    return f"link error: {text}" if text else f"link error: {type(exc).__name__}"


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
        providers = await self.client.providers()
        return [
            m["id"]
            for p in providers
            if p.get("usable")
            for m in p.get("models") or ()
            if "chat" in (m.get("capabilities") or ())
        ]

    def default_mode(self) -> str:
        return "balanced"  # the gateway's own default is not on its API; the picker shows what is sent

    def stream(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> RemoteChatStream:
        return self.client.stream(request, options, ctx)

    async def create_session(self, name: str, metadata: dict[str, Any]) -> str | None:
        try:
            created = await self.client.send_json("POST", "/api/v2/sessions",
                                                  {"name": name, "agent": "console", "metadata": metadata})
        except GatewayError as error:
            if error.status == 503:
                self.persistent = False
                return None
            raise
        return created["id"]

    async def set_metadata(self, session_id: str, metadata: dict[str, Any]) -> None:
        await self.client.send_json("PATCH", f"/api/v2/sessions/{session_id}", {"metadata": metadata})


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
        usable = [p for p in await self.client.providers() if p.get("usable")]
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

        return await self.client.recent_decisions(limit=HISTORY)

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
            today = await self.client.spend("today")
            week = await self.client.spend("7d")
            month = await self.client.spend("30d", by="model")
        except GatewayError as error:
            if error.status == 503:
                return None  # no ledger there: the console keeps its own tally of what it sees
            raise
        top = sorted(month["breakdown"], key=lambda r: (-(r["cost_usd"] or 0.0), r["key"]))[:5]  # None: unpriced
        cache = await self.client.cache()
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
        return await self.client.sessions()

    async def session(self, session_id: str) -> dict[str, Any]:
        base = f"/api/v2/sessions/{session_id}"
        session, requests, messages = await asyncio.gather(
            self.client.get_json(base),
            self.client.get_json(f"{base}/requests", limit=200),
            self.client.get_json(f"{base}/messages"),
        )
        return {"session": session, "requests": requests["data"], "messages": messages["data"]}

    async def decision(self, decision_id: str) -> dict[str, Any] | None:
        known = self.client.decisions.get(decision_id)
        if known is not None:
            return known.to_dict()
        return await self.client.decision(decision_id)


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
