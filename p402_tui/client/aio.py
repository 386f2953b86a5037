"""`AsyncP402`: a running gateway from asyncio code."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import httpx

from ..core.events import Event
from ..core.router import RouteDecision
from ..core.sse import sse_batches
from ..core.types import ChatChunk, ChatMessage, ChatResponse, P402Meta
from ..service.protocol import DecisionPage, Recommendation, Session, Spend
from .wire import (
    GatewayError,
    chunk_from_dict,
    error_from,
    event_from_dict,
    meta_from_dict,
    network_message,
    response_from_dict,
)

DEFAULT_URL = "http://127.0.0.1:4020"


def gateway_url(text: str) -> str:
    """The gateway's base URL, or a clear error for something that cannot be one."""
    try:
        url = httpx.URL(text)
        port = url.port
    except (httpx.InvalidURL, ValueError):
        url, port = None, None
    if url is None or url.scheme not in ("http", "https") or not url.host or not (port is None or 0 < port < 65536):
        raise GatewayError(f"wants the gateway's address, like http://127.0.0.1:4020, not {text!r}")
    return text.rstrip("/")


def chat_body(
    messages: Iterable[ChatMessage | Mapping[str, Any]], *, model: str, stream: bool, mode: str | None,
    require: Iterable[str], prefer: Iterable[str], exclude: Iterable[str], max_cost: float | None,
    session: str | None, tag: str | None, cache: bool, extra: Mapping[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """An OpenAI chat body with P402's options in its `p402` object (only those given)."""
    body: dict[str, Any] = dict(extra or {})
    body["model"] = model
    body["messages"] = [m.model_dump(mode="json", exclude_none=True) if isinstance(m, ChatMessage) else dict(m)
                        for m in messages]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    p402: dict[str, Any] = {"mode": mode, "require": list(require), "prefer": list(prefer), "exclude": list(exclude),
                            "max_cost_usd": max_cost, "session_id": session, "tag": tag}
    p402 = {k: v for k, v in p402.items() if v not in (None, [])}
    if not cache:
        p402["cache"] = False
    if p402:
        body["p402"] = p402
    return body


class AsyncP402:
    """A P402 gateway: chat through it (OpenAI's API, P402's options as arguments), and its
    sessions, spend, recommendations, decisions and live events (`P402Service`).

        async with AsyncP402("http://127.0.0.1:4020") as p402:
            answer = await p402.chat([{"role": "user", "content": "hi"}], mode="cost")
            print(answer.content, answer.p402.cost_usd)

    Errors are `GatewayError` with the gateway's words, its status and its error code.
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, api_key: str | None = None, *, timeout: float = 120.0,
        read_timeout: float | None = None,
    ) -> None:  # fmt: skip
        self.base_url = gateway_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, read=read_timeout or timeout)
        )

    def __repr__(self) -> str:  # never the key
        return f"AsyncP402({self.base_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncP402:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- plumbing -------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                    body: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:  # fmt: skip
        query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in (params or {}).items() if v is not None}
        try:
            response = await self._http.request(method, path, params=query or None, json=body)
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(network_message(exc)) from None
        if response.status_code not in ok:
            raise error_from(response.status_code, response.text)
        return response.json()

    async def get_json(self, path: str, **params: Any) -> Any:
        """Any JSON endpoint of the gateway, for what has no method of its own."""
        return await self._call("GET", path, params=params)

    # --- chat -------------------------------------------------------------------------------------

    async def chat(
        self, messages: Iterable[ChatMessage | Mapping[str, Any]], *, model: str = "auto", mode: str | None = None,
        require: Iterable[str] = (), prefer: Iterable[str] = (), exclude: Iterable[str] = (),
        max_cost: float | None = None, session: str | None = None, tag: str | None = None, cache: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> ChatResponse:  # fmt: skip
        """One answer. `model` "auto" (or "p402/<mode>") lets the router choose, "provider/model" pins one;
        `extra` holds any other OpenAI field (max_tokens, temperature, tools...)."""
        body = chat_body(messages, model=model, stream=False, mode=mode, require=require, prefer=prefer,
                         exclude=exclude, max_cost=max_cost, session=session, tag=tag, cache=cache, extra=extra)
        return response_from_dict(await self._call("POST", "/v1/chat/completions", body=body))

    def stream(
        self, messages: Iterable[ChatMessage | Mapping[str, Any]], *, model: str = "auto", mode: str | None = None,
        require: Iterable[str] = (), prefer: Iterable[str] = (), exclude: Iterable[str] = (),
        max_cost: float | None = None, session: str | None = None, tag: str | None = None, cache: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> ChatStream:  # fmt: skip
        """One answer as it is written: iterate the stream for `ChatChunk`s; `meta` says where it went."""
        body = chat_body(messages, model=model, stream=True, mode=mode, require=require, prefer=prefer,
                         exclude=exclude, max_cost=max_cost, session=session, tag=tag, cache=cache, extra=extra)
        return ChatStream(self, body)

    # --- P402Service ------------------------------------------------------------------------------

    async def sessions(self, *, status: str | None = None) -> list[Session]:
        return (await self._call("GET", "/api/v2/sessions", params={"status": status}))["data"]

    async def session(self, ref: str) -> Session:
        return await self._call("GET", f"/api/v2/sessions/{ref}")

    async def create_session(
        self, name: str, *, budget_usd: float | None = None, agent: str | None = None,
        metadata: dict[str, Any] | None = None, status: str = "active",
    ) -> Session:  # fmt: skip
        body = {"name": name, "budget_usd": budget_usd, "agent": agent, "metadata": metadata, "status": status}
        return await self._call("POST", "/api/v2/sessions", body={k: v for k, v in body.items() if v is not None})

    async def update_session(self, ref: str, **changes: Any) -> Session:
        return await self._call("PATCH", f"/api/v2/sessions/{ref}", body=changes)

    async def delete_session(self, ref: str) -> None:
        await self._call("DELETE", f"/api/v2/sessions/{ref}")

    async def session_requests(self, ref: str, *, limit: int = 100) -> list[dict[str, Any]]:
        return (await self._call("GET", f"/api/v2/sessions/{ref}/requests", params={"limit": limit}))["data"]

    async def session_messages(self, ref: str, *, limit: int = 200) -> list[dict[str, Any]]:
        return (await self._call("GET", f"/api/v2/sessions/{ref}/messages", params={"limit": limit}))["data"]

    async def spend(
        self, period: str | None = "today", *, by: str = "provider", start: str | None = None,
        end: str | None = None, include_simulated: bool | None = None,
    ) -> Spend:  # fmt: skip
        params = {"period": None if start or end else period, "by": by, "from": start, "to": end,
                  "include_simulated": include_simulated}  # fmt: skip
        return await self._call("GET", "/api/v2/analytics/spend", params=params)

    async def recommendations(
        self, period: str | None = "30d", *, start: str | None = None, end: str | None = None,
        include_simulated: bool | None = None,
    ) -> list[Recommendation]:  # fmt: skip
        if start or end:
            period = f"{start or ''}..{end or ''}"
        params = {"period": period, "include_simulated": include_simulated}
        return (await self._call("GET", "/api/v2/analytics/recommendations", params=params))["data"]

    async def decisions(self, *, limit: int = 20, before: str | None = None) -> DecisionPage:
        page = await self._call("GET", "/api/v2/decisions", params={"limit": limit, "before": before})
        return {"data": page["data"], "has_more": page["has_more"]}

    async def decision(self, decision_id: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", f"/api/v2/decisions/{decision_id}")
        except GatewayError as error:
            if error.status == 404:
                return None
            raise

    # --- the rest of the API ------------------------------------------------------------------------

    async def providers(self) -> list[dict[str, Any]]:
        """Each provider: whether it is usable, its health and its models."""
        return (await self._call("GET", "/api/v2/providers"))["data"]

    async def models(self) -> list[str]:
        """Configured aliases, then catalog models (`provider/model`); the router's own names (`p402/...`) left out."""
        listed = (await self._call("GET", "/v1/models"))["data"]
        return [m["id"] for m in listed if not (m.get("owned_by") == "p402" and "/" in m["id"])]

    async def cache(self) -> dict[str, Any]:
        """The answer cache: its embedder and stats (`{"enabled": false}` when off)."""
        return await self._call("GET", "/api/v2/cache")

    async def events(
        self, kinds: Iterable[str] = (), *, on_open: Callable[[], None] | None = None
    ) -> AsyncIterator[Event]:
        """The live events, as the `core.events` objects they were (a decision in brief:
        `decision(id)` has it whole), until the gateway ends the stream; `kinds` filters.
        `on_open` is called once the gateway has taken the subscription."""
        kinds = list(kinds)
        params = {"kinds": ",".join(kinds)} if kinds else None
        try:
            async with self._http.stream("GET", "/api/v2/events", params=params,
                                         headers={"Accept": "text/event-stream"}) as response:  # fmt: skip
                if response.status_code != 200:
                    raise error_from(response.status_code, (await response.aread()).decode(errors="replace"))
                if on_open is not None:
                    on_open()
                async for frames in sse_batches(response.aiter_raw()):
                    for kind, data in frames:
                        try:
                            event = event_from_dict(kind or "message", json.loads(data))
                        except (ValueError, KeyError, TypeError):
                            continue  # a frame this client cannot read must not end the stream
                        if event is not None:
                            yield event
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(network_message(exc)) from None


class ChatStream:
    """One answer streamed through the gateway: an async iterator of `ChatChunk`s.

    `meta` (where it went, what it cost) fills in as the answer ends; `decision` is its routing
    decision, read whole once the answer has ended. `aclose()` drops the connection, and the
    gateway cancels the upstream call.
    """

    def __init__(self, client: AsyncP402, body: dict[str, Any]) -> None:
        self.client = client
        self.body = body
        self.meta = P402Meta(provider="", model=body.get("model") or "auto")
        self.decision: RouteDecision | None = None
        self._chunks: AsyncIterator[ChatChunk] | None = None
        self._response: httpx.Response | None = None
        self._started = time.monotonic()

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> ChatChunk:
        if self._chunks is None:
            self._chunks = self._read()
        return await self._chunks.__anext__()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        if self._response is not None:
            await self._response.aclose()

    async def text(self) -> str:
        """Read the whole answer; its text."""
        return "".join([chunk.content async for chunk in self])

    async def _read(self) -> AsyncIterator[ChatChunk]:
        http = self.client._http
        try:
            self._response = response = await http.send(http.build_request("POST", "/v1/chat/completions",
                                                                           json=self.body), stream=True)
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(network_message(exc)) from None
        try:
            if response.status_code != 200:
                raise error_from(response.status_code, (await response.aread()).decode(errors="replace"))
            async for frames in sse_batches(response.aiter_raw()):
                for _, data in frames:
                    if data == "[DONE]":
                        await self._read_decision()
                        return
                    frame = json.loads(data)
                    if "error" in frame:
                        error = frame["error"] or {}
                        yield ChatChunk(error={"kind": error.get("code") or "upstream_failed",
                                               "message": error.get("message") or "the stream broke"})
                        return
                    if "p402" in frame:
                        self.meta = meta_from_dict(frame["p402"], self.meta.ttft_ms)
                    chunk = chunk_from_dict(frame)
                    if chunk is None:
                        continue
                    if chunk.content and self.meta.ttft_ms is None:
                        self.meta.ttft_ms = (time.monotonic() - self._started) * 1000
                    yield chunk
        except (httpx.HTTPError, OSError) as exc:
            raise GatewayError(network_message(exc)) from None
        finally:
            await response.aclose()

    async def _read_decision(self) -> None:
        if self.meta.decision_id is None:
            return
        try:
            found = await self.client.decision(self.meta.decision_id)
        except GatewayError:
            return  # the answer stands without its decision
        if found is not None:
            self.decision = RouteDecision.from_dict(found)
