"""The gateway's routes: OpenAI-compatible chat and models, and P402's /api/v2.

One `Gateway` holds what the routes need (the orchestrator, the store, metrics,
a ring of recent decisions) and builds the Starlette app. Every handler turns
our errors into OpenAI-shaped ones; nothing else ever reaches the client.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.errors import P402Error, UnknownModelError
from ..core.events import (
    EVENT_KINDS, EventLog, RequestCompleted, RequestRejected, RouteDecided, SubscriberLagged, decision_columns,
    decision_summary,
)  # fmt: skip
from ..core.tokens import off_loop
from ..core.types import ChatChunk, ChatRequest, ChatResponse, Usage, json_bytes, round_costs
from ..service import Service
from ..policy.engine import PolicyEngine
from . import errors, memory, probes, request_ids, sse
from .auth import GatewayAuth
from .bodies import (
    DECISION_RING,
    ROUTER_MODEL_IDS,
    SESSION_PAGE_MAX,
    CompareBody,
    SessionCreate,
    SessionPatch,
    parse_chat,
    validate,
)
from .messages import PATHS as MESSAGES_PATHS
from .messages import MessagesRoute
from .messages import from_gateway_error as anthropic_errors
from .embeddings import Embeddings
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import build_openapi
from .responses import Responses
from .scoping import event_key, key_filter, own_key, role_refusal

if TYPE_CHECKING:
    from ..cache.semantic import SemanticCache
    from ..core.config import Settings
    from ..core.events import LogReader, Subscription
    from ..core.hooks import CallContext, RequestRecord, RouteOptions
    from ..core.orchestrator import ChatStream, Orchestrator
    from ..core.router import RouteDecision
    from ..service import Store

logger = logging.getLogger("p402.gateway")

Handler = Callable[[Request], Awaitable[Any]]
# What a surface of the gateway gives `Gateway.run`: how to read its body, write a whole answer, and
# write a stream (from the orchestrator's stream, its first batch, the request, and the ledger's commit
# to wait for). A frames function may say how its stream ends (`end`) and what it sends while upstream is
# silent (`ping`), as attributes.
Parse = Callable[..., tuple[ChatRequest, Any, Any]]
Answer = Callable[[ChatResponse], Response]
Durable = Callable[[str], Awaitable[None]] | None
Frames = Callable[[Any, "list[ChatChunk] | None", ChatRequest, Durable], AsyncIterator[bytes]]

HEARTBEAT_S = 15.0
LARGE_BODY_BYTES = 1024 * 1024  # a body this large is parsed off the loop, and memory trimmed after it
LAG_GRACE_S = 1.0  # a lagged subscriber's connection is cut this long after, if its stream has not ended
# An event stream that has caught up waits this long before its next write: what arrives meanwhile goes
# in one write, so a subscriber that keeps up costs at most ten wake-ups a second however fast events
# come. One that is behind writes its next piece at once (its writes wait on the client instead).
EVENT_TICK_S = 0.1
EVENT_SNDBUF = 32 * 1024  # ~320 kB/s to a subscriber 100 ms away: ~300 requests/s of events in brief
# What an event stream's transport holds before its writes wait (asyncio's default is 64 kB): with the
# piece being written, what a subscriber that stopped reading costs in this process.
EVENT_WRITE_HIGH = 16 * 1024


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json_bytes(round_costs(data)), status_code=status, media_type="application/json")


def guarded(handler: Handler) -> Handler:
    """Our errors become OpenAI-shaped answers; anything unexpected a short 500, logged here."""

    async def endpoint(request: Request) -> Any:
        try:
            return await handler(request)
        except errors.GatewayError as error:
            refused(request.scope, error.code, error.message)
            return errors.from_gateway_error(error)
        except P402Error as error:
            refused(request.scope, error.kind, error.message)
            return errors.from_p402_error(error)
        except ClientDisconnect:
            return errors.NO_ANSWER
        except Exception:
            logger.exception("unexpected error in %s %s", request.method, request.url.path)
            return errors.error_response(500, "internal error in the gateway; see its log", code="internal_error")

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


def refused(scope: Scope, reason: str | None, message: str) -> None:
    """Why this request is being refused, for the `RequestRejected` event its 4xx answer publishes."""
    scope["p402.refusal"] = (reason, message)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it passes `limit` bytes, and with a 400 if there is none."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.GatewayError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    receive = request.receive  # not request.stream(): an async generator more on every call
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()  # gone before its body arrived: nobody to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.GatewayError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        body = chunks[0]
    elif size >= LARGE_BODY_BYTES:  # megabytes copied (and their pages first touched) off the loop
        body = await off_loop(b"".join, chunks)
    else:
        body = b"".join(chunks)
    if not body or body.isspace():  # every route that reads a body needs a JSON object; strip() would copy it
        raise errors.GatewayError(400, "the request has no body; send a JSON object", code="invalid_json")
    return body


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except ValueError as error:
        raise errors.GatewayError(400, f"request body is not valid JSON: {error}", code="invalid_json") from None


class Gateway:
    """What the routes share. `start()` begins counting from the bus; `aclose()` ends it."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        settings: Settings,
        store: Store | None = None,
        cache: SemanticCache | None = None,
        auth: GatewayAuth | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        simulated: bool = False,
        service: Service | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.service = service or Service(store, orchestrator.catalog, simulated=simulated)
        self.simulated = simulated  # every provider is the simulator: its reports count simulated rows by default
        self.settings = settings
        self.store = store
        self.cache = cache  # None when the gateway runs without one
        self.bus = orchestrator.bus
        self.auth = auth or GatewayAuth(None, required=False)
        self.policy = PolicyEngine(store, orchestrator.catalog)
        self.auth.describe = self.policy.key_info
        self.metrics = Metrics()
        self.decisions: deque[RouteDecision] = deque(maxlen=DECISION_RING)
        self.outcomes: OrderedDict[str, RequestRecord] = OrderedDict()  # decision id -> its request's record (no store)
        self.heartbeat_s = heartbeat_s
        self.max_body = settings.gateway.max_body_bytes
        self.closing = asyncio.Event()
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_counting: Callable[[], None] = lambda: None
        self._openapi: dict[bool, bytes] = {}  # by whether keys are in force
        self.event_subscribers = 0
        self.event_log: EventLog | None = None  # while anyone subscribes
        # Strict durability: an answer's last byte waits for its ledger row's commit.
        strict = store is not None and settings.file.store.durability == "strict"
        self.durable: Callable[[str], Awaitable[None]] | None = orchestrator.hooks.committed if strict else None
        self.store_refused = 0  # requests refused because the ledger writer could not keep up
        self.trimmer = memory.Trimmer()
        self.messages = MessagesRoute(self, read_body)  # Anthropic's Messages API
        self.observe: Callable[[Scope, float], None] | None = None  # see `_Front.observe`; set before `app()`
        self.front: _Front | None = None  # the app `app()` made

    async def start(self) -> None:
        stop_completed = self.bus.listen(self.metrics.count, kinds={RequestCompleted.kind})
        stop_rejected = self.bus.listen(self.metrics.count_rejected, kinds={RequestRejected.kind})
        self._stop_counting = lambda: (stop_completed(), stop_rejected())
        self._tasks = [asyncio.create_task(memory.trim_when_idle(self._activity), name="p402-gateway-trim")]
        if self.store is None:  # with a store, decisions are read from it
            decided = self.bus.subscribe(maxsize=1000, kinds={RouteDecided.kind, RequestCompleted.kind})
            self._tasks.append(asyncio.create_task(self._remember_decisions(decided), name="p402-gateway-decisions"))

    def _activity(self) -> tuple[int, int]:
        front = self.front
        return (front.begun, front.in_flight) if front is not None else (0, 0)

    async def aclose(self) -> None:
        self.closing.set()
        self._stop_counting()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _remember_decisions(self, subscription: Subscription) -> None:
        try:
            while True:
                event = await subscription.get()
                if isinstance(event, RouteDecided):
                    self.decisions.append(event.decision)
                elif event.record.decision_id:  # type: ignore[attr-defined]
                    self.outcomes[event.record.decision_id] = event.record  # type: ignore[attr-defined]
                    while len(self.outcomes) > DECISION_RING:
                        self.outcomes.popitem(last=False)
        finally:
            subscription.close()

    # --- chat ------------------------------------------------------------------------

    async def chat(self, request: Request) -> Any:
        return await self.run(request, parse_chat, _openai_answer, _openai_frames)

    def check_ledger(self) -> None:
        """A 503 while the ledger writer is saturated or its server away: every route that records a request asks first."""
        down = self.service.store_unavailable
        if down:
            self.store_refused += 1
            raise errors.GatewayError(
                503, f"the store does not answer ({down}); retry shortly", code="store_unavailable",
                headers={"retry-after": "1"},
            )
        if self.service.writes_saturated:
            self.store_refused += 1
            message = f"the ledger cannot keep up ({self.service.writes_pending} writes queued); retry shortly"
            raise errors.GatewayError(503, message, code="store_overloaded", headers={"retry-after": "1"})

    async def bind(self, request: Request, chat: ChatRequest, options: RouteOptions, ctx: CallContext) -> None:
        """The key's policy applied (its rules, defaults and guardrails; the session by name or id), and the
        request's id noted for its refusal event."""
        await self.policy.enforce(request.scope, chat, options, ctx)
        ctx.client_request_id = request.scope.get("p402.client_request_id")
        request.scope["p402.request_id"] = ctx.request_id  # from here on the orchestrator records its outcome
        request.scope["p402.ctx"] = ctx

    async def run(self, request: Request, parse: Parse, answer: Answer, frames: Frames) -> Any:
        """A request of any surface through the orchestrator: the ledger's back-pressure, the body,
        sessions, routing, failover, cache and ledger as the chat route has them.

        `parse(body, catalog, api_key_id=, no_cache=)` gives the chat request, its route options and
        context; `answer(response)` the whole answer's HTTP response, `frames(stream, first, chat,
        durable)` a stream's bytes.
        """
        self.check_ledger()
        body = await read_body(request, self.max_body)
        directives = request.headers.get("cache-control", "")
        no_cache = "no-cache" in directives or "no-store" in directives  # neither read nor write the answer cache
        parse = functools.partial(
            parse, body, self.orchestrator.catalog, api_key_id=request.scope.get("p402.api_key_id"),
            no_cache=no_cache,
        )
        large = len(body) >= LARGE_BODY_BYTES
        try:
            # Megabytes of JSON hold the loop for tens of ms: parsed on the small pool, and what the
            # request used is handed back to the OS once it is done.
            chat, options, ctx = await off_loop(parse) if large else parse()
            await self.bind(request, chat, options, ctx)
            if chat.stream:
                return await self._stream(chat, options, ctx, frames, large=large)
            response = await self.orchestrator.complete(chat, options, ctx)
        finally:
            if large:
                self.trimmer.soon()
        if self.durable is not None:
            await self.durable(ctx.request_id)
        return answer(response)

    async def _stream(
        self, chat: ChatRequest, options: RouteOptions, ctx: CallContext, frames: Frames | None = None,
        *, large: bool = False,
    ) -> Any:
        frames = frames or _openai_frames
        stream = self.orchestrator.stream(chat, options, ctx)
        try:
            # Routing, budget and the first upstream byte happen here, so a refusal is still a
            # proper HTTP error rather than an event inside a 200 stream.
            first = await stream.batches().__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await stream.aclose()
            raise
        body = frames(stream, first, chat, self.durable)
        # How its last piece ends, and what it sends while upstream is silent (Anthropic's ping).
        shape = {"end": getattr(frames, "end", sse.DONE), "ping": getattr(frames, "ping", None),
                 "ping_every_s": self.heartbeat_s}  # fmt: skip
        if not large:
            return sse.EventStreamResponse(body, cleanup=stream.aclose, **shape)

        async def cleanup() -> None:
            await stream.aclose()
            self.trimmer.soon()

        return sse.EventStreamResponse(body, cleanup=cleanup, **shape)

    # --- models and providers -----------------------------------------------------------

    async def models(self, request: Request) -> Any:
        usable = {p.id for p in self.settings.usable_providers()}
        created = _epoch(self.orchestrator.catalog.checked_on)
        models = self.orchestrator.catalog.models.values()
        data = [_model_object(mid, "p402", created) for mid in ROUTER_MODEL_IDS]
        data += [_model_object(name, "p402", created) for name in self.orchestrator.catalog.aliases]
        data += [_model_object(m.id, m.provider, created) for m in models if m.provider in usable]
        return json_response({"object": "list", "data": data})

    async def model(self, request: Request) -> Any:
        """One model, as the OpenAI SDK's `models.retrieve()` asks: `provider/model` or a bare wire id."""
        ref = request.path_params["model"]
        created = _epoch(self.orchestrator.catalog.checked_on)
        if ref in ROUTER_MODEL_IDS or ref in self.orchestrator.catalog.aliases:
            return json_response(_model_object(ref, "p402", created))
        spec = self.orchestrator.catalog.model(ref)  # unknown or ambiguous: a 404 that says which
        if not any(p.id == spec.provider for p in self.settings.usable_providers()):
            raise UnknownModelError(f"model {spec.id!r} is not served here: provider {spec.provider!r} is not usable")
        return json_response(_model_object(spec.id, spec.provider, created))

    async def providers(self, request: Request) -> Any:
        catalog = self.orchestrator.catalog
        # Every usable provider gets a health row, traffic or not, as the in-process console shows it.
        health = self.orchestrator.health.snapshot(p.id for p in self.settings.usable_providers())
        out = []
        for pid, provider in self.settings.providers.items():
            spec = catalog.providers[pid]
            status = health.get(pid)
            out.append(
                {
                    "id": pid,
                    "name": spec.name,
                    "wire": spec.wire,
                    "usable": provider.usable,
                    "enabled": provider.enabled,
                    "health": status.to_dict() if status is not None else None,
                    "models": [m.to_dict() for m in catalog.models_of(pid)],
                }
            )
        return json_response({"object": "list", "data": out})

    async def compare(self, request: Request) -> Any:
        from ..core.costs import compare

        body = await read_json(request, self.max_body)
        query = validate(CompareBody, body)
        try:
            rows = compare(
                self.orchestrator.catalog, query.input_tokens, query.output_tokens,
                require=set(query.require), top=query.top, max_tier=query.max_tier,
            )
        except ValueError as error:
            raise errors.GatewayError(400, str(error), code="invalid_value") from None
        return json_response({"object": "list", "data": [row.to_dict() for row in rows]})

    # --- sessions ------------------------------------------------------------------------------

    async def list_sessions(self, request: Request) -> Any:
        sessions = await self.service.sessions(
            status=request.query_params.get("status"), api_key_id=key_filter(request.scope, request.query_params.get("key"))
        )
        return json_response({"object": "list", "data": sessions})

    async def create_session(self, request: Request) -> Any:
        body = validate(SessionCreate, await read_json(request, self.max_body))
        key_id = request.scope.get("p402.api_key_id")
        created = await self.service.create_session(**body.model_dump(), api_key_id=key_id)
        return json_response(created, status=201)

    async def _session_ref(self, request: Request) -> dict[str, Any]:
        """The session the path names (by id or by name), as the key asking sees its names; a `user` key
        reaches only its own (another key's is a 404)."""
        ref, key_id = request.path_params["session_id"], request.scope.get("p402.api_key_id")
        if own_key(request.scope) is not None:
            ref = await self.service.resolve_session(ref, api_key_id=key_id)
            await self.policy.require_own_session(request.scope["p402.key"], ref)
        return {"ref": ref, "api_key_id": key_id}

    async def get_session(self, request: Request) -> Any:
        return json_response(await self.service.session(**await self._session_ref(request)))

    async def session_requests(self, request: Request) -> Any:
        limit = _int_param(request, "limit", default=100, low=1, high=SESSION_PAGE_MAX)
        rows = await self.service.session_requests(**await self._session_ref(request), limit=limit)
        return json_response({"object": "list", "data": rows})

    async def session_messages(self, request: Request) -> Any:
        limit = _int_param(request, "limit", default=200, low=1, high=SESSION_PAGE_MAX)
        rows = await self.service.session_messages(**await self._session_ref(request), limit=limit)
        return json_response({"object": "list", "data": rows})

    async def update_session(self, request: Request) -> Any:
        body = validate(SessionPatch, await read_json(request, self.max_body))
        return json_response(await self.service.update_session(**await self._session_ref(request), **body.changes()))

    async def delete_session(self, request: Request) -> Any:
        session_id = await self.service.delete_session(**await self._session_ref(request))
        return json_response({"id": session_id, "deleted": True})

    # --- analytics -----------------------------------------------------------------------------

    async def spend(self, request: Request) -> Any:
        query = request.query_params
        return json_response(await self.service.spend(
            query.get("period"), by=query.get("by") or "provider", start=query.get("from"), end=query.get("to"),
            include_simulated=self._include_simulated(request), api_key_id=key_filter(request.scope, query.get("key")),
        ))  # fmt: skip

    async def recommendations(self, request: Request) -> Any:
        period = request.query_params.get("period")
        data = await self.service.recommendations(
            period, include_simulated=self._include_simulated(request),
            api_key_id=key_filter(request.scope, request.query_params.get("key")),
        )
        return json_response({"object": "list", "data": data})

    def _include_simulated(self, request: Request) -> bool:
        value = request.query_params.get("include_simulated")
        if value is None:
            return self.simulated
        if value.lower() not in ("true", "false", "1", "0"):
            raise errors.GatewayError(400, "include_simulated must be true or false", param="include_simulated")
        return value.lower() in ("true", "1")

    async def cache_stats(self, request: Request) -> Any:
        """The answer cache: which embedder is active, its threshold, and hits, misses and USD saved."""
        if self.cache is None or not self.cache.enabled:
            return json_response({"enabled": False})
        return json_response(self.cache.snapshot())

    # --- decisions and live events -------------------------------------------------------------

    async def recent_decisions(self, request: Request) -> Any:
        """A page of decisions in brief, newest first: from the store when there is one, else from
        the ring this gateway heard. `before` (a decision id) pages on; the whole decision is
        `/api/v2/decisions/{id}` (a summary is ~0.4 kB, a decision with every candidate ~40 kB)."""
        limit = _int_param(request, "limit", default=20, low=1, high=DECISION_RING)
        before = request.query_params.get("before")
        if self.service.persistent:
            found = await self.service.decisions(limit=limit, before=before, api_key_id=own_key(request.scope))
            data, more = found["data"], found["has_more"]
        else:
            decisions = list(self.decisions)
            decisions.reverse()
            if before is not None:
                at = next((i for i, d in enumerate(decisions) if d.id == before), None)
                if at is None:
                    raise errors.GatewayError(400, f"before: no decision {before!r}", param="before", code="invalid_value")
                decisions = decisions[at + 1 :]
            more = len(decisions) > limit
            data = [decision_summary(decision_columns(d), _outcome(self.outcomes.get(d.id))) for d in decisions[:limit]]
        page = {"object": "list", "data": data, "has_more": more}
        page["first_id"], page["last_id"] = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return json_response(page)

    async def decision(self, request: Request) -> Any:
        """One decision whole: every candidate with its scores, every exclusion with its reason."""
        decision_id = request.path_params["decision_id"]
        if self.service.persistent:
            found = await self.service.decision(decision_id, api_key_id=own_key(request.scope))
        else:
            found = next((d.to_dict() for d in self.decisions if d.id == decision_id), None)
        if found is None:
            raise errors.GatewayError(404, f"no decision {decision_id!r}", code="decision_not_found")
        return json_response(found)

    async def events(self, request: Request) -> Any:
        kinds = request.query_params.get("kinds")
        wanted = {k.strip() for k in kinds.split(",") if k.strip()} if kinds else None
        unknown = wanted.difference(EVENT_KINDS) if wanted else None
        if unknown:
            raise errors.GatewayError(
                400, f"unknown event kind {', '.join(sorted(unknown))}; choose from {', '.join(EVENT_KINDS)}",
                param="kinds",
            )
        conf = self.settings.gateway
        if self.event_subscribers >= conf.max_event_subscribers:
            raise errors.GatewayError(
                503, f"this gateway already streams events to {conf.max_event_subscribers} subscribers "
                "([gateway] max_event_subscribers); try again later", code="too_many_subscribers",
                headers={"retry-after": "5"},
            )
        # A client that stops reading blocks its stream in a write; its place then leaves the shared
        # log and it is let go: told so if it still reads, its connection cut if it does not.
        transport = request.scope.get("p402.transport")
        if transport is not None and transport.is_closing():  # the client left already; uvloop refuses a closed one
            transport = None
        cut: list[asyncio.TimerHandle] = []
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # The kernel's send buffer grows to megabytes by itself: held small, a client that stopped
                # reading stops taking bytes after ~EVENT_SNDBUF rather than after several MB per subscriber.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, EVENT_SNDBUF)
            transport.set_write_buffer_limits(high=EVENT_WRITE_HIGH)

        def lagged() -> None:
            if transport is not None:
                cut.append(asyncio.get_running_loop().call_later(LAG_GRACE_S, _abort, transport))

        log = self.event_log
        if log is None:
            log = self.event_log = EventLog(
                self.bus, max_events=conf.event_buffer_events, max_bytes=conf.event_buffer_bytes,
                size=sse.bus_event_size,
            )
        reader = log.reader(wanted, on_lag=lagged)
        self.event_subscribers += 1
        frames = self._event_frames(log, reader, own_key(request.scope))
        response = sse.EventStreamResponse(frames, stop=self.closing)

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await response(scope, receive, send)
            finally:
                log.forget(reader)
                self.event_subscribers -= 1
                if not self.event_subscribers and self.event_log is log:
                    log.close()  # nobody listens: events are no longer framed for the log
                    self.event_log = None
                for handle in cut:  # it ended in time: the connection may serve the next request
                    handle.cancel()
                if transport is not None and not transport.is_closing():  # uvloop refuses a closed one
                    transport.set_write_buffer_limits()  # asyncio's defaults again, for that request

        return respond

    async def _event_frames(self, log: EventLog, reader: LogReader, key_id: str | None = None) -> AsyncIterator[bytes]:
        """`key_id`: only that key's traffic (a `user` key's stream)."""
        yield b": subscribed\n\n"  # flushes the headers: the client knows it is listening
        while True:
            if not await log.wait(reader, self.heartbeat_s):
                yield sse.HEARTBEAT
                continue
            try:
                events = log.read(reader, sse.EVENT_PIECE_BYTES)
            except SubscriberLagged:
                yield sse.lagged_frame()
                return
            if key_id is not None:
                events = [event for event in events if event_key(event) == key_id]
            if events:
                yield b"".join([sse.bus_event_frame(event) for event in events])
            # Caught up: let the next events gather. Behind: the next piece now, once the others had the loop
            # (a key's stream can pass a whole log of other keys' events without writing a byte).
            await asyncio.sleep(EVENT_TICK_S if reader.cursor >= log.end else 0)

    # --- operations ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Any:
        usable = len(self.settings.usable_providers())
        # Up but unable to answer anything: a load balancer's readiness check must not send traffic here.
        return json_response(
            {
                "status": "ok" if usable else "not_ready",
                "reason": None if usable else "no provider is configured (see `p402 providers`)",
                "uptime_s": round(time.time() - self.started_at, 3),
                "providers_usable": usable,
                "embedder": self._embedder(),
            },
            status=200 if usable else 503,
        )

    def _embedder(self) -> dict[str, Any] | None:
        """The answer cache's embedder (name, dim, label); None with the cache off or its embedder still loading."""
        cache = self.cache
        if cache is None or not cache.enabled or cache.embedder is None:
            return None
        return cache.embedder.info()

    async def prometheus(self, request: Request) -> Any:
        text = self.metrics.render()
        text += (
            "# HELP p402_event_subscribers Clients streaming /api/v2/events now.\n"
            "# TYPE p402_event_subscribers gauge\n"
            f"p402_event_subscribers {self.event_subscribers}\n"
        )
        if self.store is not None:
            text += (
                "# HELP p402_store_pending_writes Ledger writes queued, not yet committed.\n"
                "# TYPE p402_store_pending_writes gauge\n"
                f"p402_store_pending_writes {self.service.writes_pending}\n"
                "# HELP p402_store_refused_total Requests refused because the ledger could not keep up.\n"
                "# TYPE p402_store_refused_total counter\n"
                f"p402_store_refused_total {self.store_refused}\n"
            )
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    async def openapi(self, request: Request) -> Any:
        # The document says whether keys are in force now: that changes when the first key is made.
        enforced = await self.auth.enforced()
        document = self._openapi.get(enforced)
        if document is None:
            providers = self.orchestrator.catalog.providers
            document = self._openapi[enforced] = json_bytes(build_openapi(providers, keys_enforced=enforced))
        return Response(document, media_type="application/json")

    # --- the app --------------------------------------------------------------------------------

    def _keys(self, name: str) -> Handler:
        """A `/api/v2/keys` handler (`gateway.keys`), bound to this gateway."""
        from . import keys

        handler = functools.partial(getattr(keys, name), self)
        handler.__name__ = name  # type: ignore[attr-defined]
        handler.__doc__ = getattr(keys, name).__doc__
        return handler

    def routes(self) -> list[Route]:
        """One route a path, so that a 405 names every method the path takes in its Allow header."""
        embeddings, responses = Embeddings(self), Responses(self)
        paths: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self.chat},
            "/v1/embeddings": {"POST": embeddings.create},
            "/v1/responses": {"POST": responses.create},
            "/v1/responses/{response_id}": {"GET": responses.get, "DELETE": responses.delete},
            "/api/v2/chat/completions": {"POST": self.chat},
            "/v1/messages": {"POST": self.messages.create},
            "/v1/messages/count_tokens": {"POST": self.messages.count_tokens},
            "/v1/models": {"GET": self.models},
            "/v1/models/{model:path}": {"GET": self.model},  # ids hold a slash
            "/api/v2/providers": {"GET": self.providers, "POST": self.compare},
            "/api/v2/analytics/spend": {"GET": self.spend},
            "/api/v2/analytics/recommendations": {"GET": self.recommendations},
            "/api/v2/cache": {"GET": self.cache_stats},
            "/api/v2/sessions": {"GET": self.list_sessions, "POST": self.create_session},
            "/api/v2/sessions/{session_id}": {
                "GET": self.get_session, "PATCH": self.update_session, "DELETE": self.delete_session,
            },
            "/api/v2/sessions/{session_id}/requests": {"GET": self.session_requests},
            "/api/v2/sessions/{session_id}/messages": {"GET": self.session_messages},
            "/api/v2/decisions": {"GET": self.recent_decisions},
            "/api/v2/decisions/{decision_id}": {"GET": self.decision},
            "/api/v2/events": {"GET": self.events},
            "/api/v2/keys": {"GET": self._keys("list_keys"), "POST": self._keys("create_key")},
            "/api/v2/keys/{key_id}": {
                "GET": self._keys("show_key"), "PATCH": self._keys("update_key"), "DELETE": self._keys("revoke_key"),
            },
            "/api/v2/keys/{key_id}/requests": {"GET": self._keys("key_requests")},
            "/health": {"GET": self.health},
            "/health/live": {"GET": probes.live},
            "/health/ready": {"GET": probes.ready(self)},
            "/metrics": {"GET": self.prometheus},
            "/openapi.json": {"GET": self.openapi},
        }
        return [Route(path, _by_method(handlers), methods=list(handlers)) for path, handlers in paths.items()]

    def app(self) -> ASGIApp:
        routes = self.routes()
        starlette = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal_error})
        chat = guarded(self.chat)
        direct = {("POST", "/v1/chat/completions"): chat, ("POST", "/api/v2/chat/completions"): chat,
                  ("POST", "/v1/messages"): self.messages.create}  # fmt: skip
        # The other APIs agents proxy every call through take the same short way.
        direct |= {("POST", r.path): r.endpoint for r in routes if r.path in ("/v1/responses", "/v1/embeddings")}
        shaped = {path: anthropic_errors for path in MESSAGES_PATHS}
        self.front = _Front(
            starlette, self.auth, direct, on_rejected=self._rejected, limit=self.settings.gateway.limit_concurrency,
            shaped=shaped, observe=self.observe,
        )
        return self.front

    def _rejected(self, scope: Scope, status: int) -> None:
        reason, message = scope.get("p402.refusal") or (None, "")
        self.bus.publish(
            RequestRejected(
                status=status, reason=reason or f"http_{status}", method=scope["method"], path=scope["path"],
                message=message, request_id=scope.get("p402.request_id"), api_key_id=scope.get("p402.api_key_id"),
            )
        )  # fmt: skip


def _outcome(record: RequestRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "id": record.id, "provider": record.provider, "model": record.model, "cost_usd": record.cost_usd,
        "latency_ms": record.latency_ms, "status": record.status, "error_kind": record.error_kind,
        "session_id": record.session_id, "source": record.source,
    }  # fmt: skip


def _abort(transport: Any) -> None:
    if not transport.is_closing():
        transport.abort()


def _model_object(model_id: str, owned_by: str, created: int) -> dict[str, Any]:
    """A model as OpenAI's API shows one."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def _by_method(handlers: dict[str, Handler]) -> Handler:
    """The endpoint of a path: each method's handler, guarded; HEAD is GET's (Starlette adds it to GET)."""
    guarded_handlers = {method: guarded(handler) for method, handler in handlers.items()}
    if len(guarded_handlers) == 1:
        return next(iter(guarded_handlers.values()))

    async def endpoint(request: Request) -> Any:
        method = "GET" if request.method == "HEAD" else request.method
        return await guarded_handlers[method](request)

    return endpoint


class _Front:
    """The outermost layer: gateway keys, and a last guard so no traceback leaves the server.

    `direct` routes, the chat endpoints every proxied call takes, skip Starlette's
    middleware and router, a sizeable share of what the gateway may add to a call.
    Starlette still answers everything else (405s included).
    """

    OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready"})

    def __init__(
        self,
        app: ASGIApp,
        auth: GatewayAuth,
        direct: dict[tuple[str, str], Handler] | None = None,
        on_rejected: Callable[[Scope, int], None] | None = None,
        *,
        limit: int | None = None,
        shaped: dict[str, Callable[[errors.GatewayError], Response]] | None = None,
        observe: Callable[[Scope, float], None] | None = None,
    ) -> None:
        self.app = app
        self.shaped = shaped or {}  # paths whose refusals take another API's error shape (Anthropic's)
        self.auth = auth
        self.direct = direct or {}
        self.on_rejected = on_rejected  # told of every 4xx answer, as it starts
        self.limit = limit  # requests at once ([gateway] limit_concurrency); /health is always answered
        self.in_flight = 0
        self.begun = 0  # requests taken in, ever (an idle gateway trims its memory once after a spell of them)
        # Told of every request once it is over, with the scope and its start (`time.perf_counter()`):
        # the access log and traces. The scope holds its status (`p402.status`, 0 if no answer began),
        # ids, and `p402.ctx`, the request's CallContext with its record and decision.
        self.observe = observe
        self.cutting = False  # set when a drain's bound passes (`RunningGateway.cut_now`)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.limit is not None and self.in_flight >= self.limit and scope["path"] not in self.OPEN_PATHS:
            message = f"the gateway is serving {self.limit} requests already ([gateway] limit_concurrency)"
            error = errors.GatewayError(503, message, code="overloaded", headers={"retry-after": "1"})
            await self.shaped.get(scope["path"], errors.from_gateway_error)(error)(scope, receive, send)
            if self.observe is not None:
                scope["p402.status"] = 503
                self.observe(scope, time.perf_counter())
            return
        self.in_flight += 1
        if scope["path"] not in self.OPEN_PATHS:  # a probe every few seconds is no spell of work
            self.begun += 1
        observe = self.observe
        started = time.perf_counter() if observe is not None else 0.0
        try:
            await self._serve(scope, receive, send)
        except asyncio.CancelledError:
            if not self.cutting:
                raise
            # Cut at the drain's bound: its connection is gone and the orchestrator recorded it; ending
            # quietly keeps uvicorn from logging the cancel as a crash.
        finally:
            self.in_flight -= 1
            if observe is not None:
                observe(scope, started)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["p402.client_request_id"] = request_ids.from_client(scope)
        if scope["path"] not in self.OPEN_PATHS:
            try:
                try:
                    key = scope["p402.key"] = await self.auth.check(scope)
                except P402Error as failure:  # the store that holds the keys does not answer
                    retry = {"retry-after": "1"} if failure.http_status == 503 else None
                    raise errors.GatewayError(failure.http_status, failure.message, code=failure.kind, headers=retry) from None
                scope["p402.api_key_id"] = None if key is None else key.id
                refusal = role_refusal(scope)
                if refusal is not None:
                    raise refusal
            except errors.GatewayError as error:
                refused(scope, error.code, error.message)
                if self.on_rejected is not None:
                    self.on_rejected(scope, error.status)
                refusal_answer = self.shaped.get(scope["path"], errors.from_gateway_error)(error)
                await refusal_answer(scope, receive, functools.partial(_tagged_send, scope, send))
                return
        started = False

        async def watched_send(message: Any) -> None:
            nonlocal started
            if not started:
                started = True
                status = scope["p402.status"] = message.get("status", 200)
                if 400 <= status < 500 and self.on_rejected is not None:
                    self.on_rejected(scope, status)
                limits = scope.get("p402.ratelimit")
                if limits and message["type"] == "http.response.start":
                    # The key's x-ratelimit-* figures ride on every answer, as OpenAI sends them.
                    have = {name for name, _ in message.get("headers", ())}
                    extra = [(k.encode(), v.encode()) for k, v in limits.items() if k.encode() not in have]
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
                message = request_ids.tagged(scope, message)
            await send(message)

        try:
            handler = self.direct.get((scope["method"], scope["path"]))
            if handler is None:
                await self.app(scope, receive, watched_send)
            else:
                response = await handler(Request(scope, receive))
                await response(scope, receive, watched_send)
        except Exception:
            # Starlette re-raises after its 500 handler answered; log once, say nothing more.
            logger.debug("request failed after its answer began", exc_info=True)
            if not started:
                await errors.error_response(500, "internal error in the gateway", code="internal_error")(
                    scope, receive, functools.partial(_tagged_send, scope, send)
                )


async def _tagged_send(scope: Scope, send: Send, message: Any) -> None:
    if message["type"] == "http.response.start":
        scope["p402.status"] = message.get("status", 200)
    await send(request_ids.tagged(scope, message))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/v1/messages"):
        message = f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else \
            f"no such endpoint: {request.url.path}"
        refused(request.scope, "method_not_allowed" if exc.status_code == 405 else "not_found", message)
        headers = exc.headers if exc.status_code == 405 else None
        return anthropic_errors(errors.GatewayError(exc.status_code, message, headers=headers))
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        refused(request.scope, "method_not_allowed", message)
        return errors.error_response(405, message, code="method_not_allowed", headers=exc.headers)  # Allow
    if exc.status_code == 404:
        refused(request.scope, "not_found", f"no such endpoint: {request.url.path}")
        return errors.error_response(404, f"no such endpoint: {request.url.path}", code="not_found")
    return errors.error_response(exc.status_code, str(exc.detail))


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unexpected error in %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return errors.error_response(500, "internal error in the gateway", code="internal_error")


def _openai_answer(response: ChatResponse) -> Response:
    return Response(json_bytes(response.to_openai()), media_type="application/json")


def _openai_frames(
    stream: ChatStream, first: list[ChatChunk] | None, chat: ChatRequest, durable: Callable[[str], Awaitable[None]] | None
) -> AsyncIterator[bytes]:
    include_usage = bool(chat.stream_options and chat.stream_options.get("include_usage"))
    return _chunk_frames(stream, first, include_usage, durable)


async def _chunk_frames(
    stream: ChatStream, first: list[ChatChunk] | None, include_usage: bool,
    durable: Callable[[str], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """OpenAI `chat.completion.chunk` frames, those of one upstream batch in one piece;
    P402's meta rides on the finishing chunk. With `durable`, the answer's last piece
    waits for its ledger row's commit.

    A role-only preamble is folded into the first chunk with content, so the first
    frame a client sees carries the first token.
    """
    chunk_id, created, model = stream.id, stream.created, stream.meta.model
    role: str | None = None
    usage = None
    finishing: ChatChunk | None = None  # held back so it can carry the final p402 meta
    # Most chunks carry only text: the loop writes their frame as this template around the
    # text's JSON, byte for byte what `frame` would make of them, without a dict per chunk.
    text_head = (
        b'data: {"id":' + json_bytes(chunk_id) + b',"object":"chat.completion.chunk","created":' + json_bytes(created)
        + b',"model":' + json_bytes(model) + b',"choices":[{"index":0,"delta":{"content":'
    )  # fmt: skip
    text_tail = b'},"finish_reason":null}]}\n\n'

    def frame(chunk: ChatChunk, meta: dict[str, Any] | None = None) -> bytes:
        nonlocal role
        data = chunk.to_openai(id=chunk_id, model=model, created=created)
        data.pop("usage", None)  # usage goes in its own final chunk, as OpenAI sends it
        if role is not None:
            data["choices"][0]["delta"] = {"role": role, **data["choices"][0]["delta"]}
            role = None
        if meta is not None:
            data["p402"] = meta
        return sse.data_frame(data)

    def usage_frame(usage: Usage, meta: dict[str, Any]) -> bytes:
        return sse.data_frame(
            {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [], "usage": usage.to_openai(), "p402": meta}
        )  # fmt: skip

    # Frames wait here until yielded. From the finish on they wait for the end: only usage
    # and [DONE] are still to come, so the rest of the answer leaves in one write.
    out: list[bytes] = []
    try:
        async with stream:
            batches = stream.batches()
            batch = first
            while batch is not None:
                for chunk in batch:
                    if chunk.error is not None:
                        # What the broken answer used (and cost) comes first: a client stops at the error.
                        if include_usage and chunk.usage is not None:
                            out.append(usage_frame(chunk.usage, stream.meta.to_dict()))
                        out += (sse.data_frame({"error": _stream_error(chunk.error)}), sse.DONE)
                        yield b"".join(out)
                        return
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.finish_reason is not None:
                        if finishing is not None:  # an earlier finish: pass it on as it came
                            out.append(frame(finishing))
                        finishing = chunk
                    elif chunk.content or chunk.reasoning or chunk.tool_calls or chunk.extra:
                        if role is None and not (chunk.role or chunk.reasoning or chunk.tool_calls or chunk.extra):
                            out.append(text_head + json_bytes(chunk.content) + text_tail)
                        else:
                            out.append(frame(chunk))
                    elif chunk.role:
                        role = chunk.role
                if out and finishing is None:
                    yield b"".join(out)  # one item: the same bytes, not a copy
                    out = []
                batch = await anext(batches, None)
            meta = stream.meta.to_dict()
            if finishing is not None:
                out.append(frame(finishing, meta))
            usage = usage or stream.usage  # none from upstream: our count, flagged in `meta`
            if include_usage and usage is not None:
                out.append(usage_frame(usage, meta))
            if durable is not None:
                await durable(stream.request_id)
    except P402Error as error:
        out.append(sse.data_frame(errors.error_body(errors.p402_status(error), error.message, code=error.kind)))
    out.append(sse.DONE)
    yield b"".join(out)


def _stream_error(error: dict[str, Any]) -> dict[str, Any]:
    kind = error.get("kind") or "stream_interrupted"
    return errors.error_body(502, str(error.get("message") or kind), code=kind)["error"]


def _epoch(day: str) -> int:
    try:
        return int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        return 0


def _int_param(request: Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.GatewayError(400, f"{name} must be a whole number, not {raw!r}", param=name) from None
    if not low <= value <= high:
        raise errors.GatewayError(400, f"{name} must be between {low} and {high}", param=name)
    return value
