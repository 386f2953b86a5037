"""What every provider adapter offers, and the plumbing they share.

An adapter turns our OpenAI-shaped `ChatRequest` into one provider's wire format
and the provider's answer back into `ChatResponse` / `ChatChunk`. Each provider
gets one pooled `httpx.AsyncClient`. Closing a stream (breaking out of the
`async for`, or cancelling the task) closes the upstream response at once.
"""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import functools
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from ..core.config import ResolvedProvider
from ..core.errors import (
    BadRequestError,
    ConnectionLostError,
    MalformedResponseError,
    ProviderError,
    StreamInterruptedError,
    TimeoutError,
    redact,
)
from ..core.types import ChatChunk, ChatRequest, ChatResponse, Embeddings, ToolCall, Usage


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every provider's client: building one loads the CA bundle (tens of ms)."""
    return httpx.create_ssl_context()


# Idle connections go before uvicorn's 5 s keep-alive closes them under us: a POST on a
# connection the server just closed fails without a retry, and a burst of those after a
# pause opened circuits (bench/gateway.py saw a whole run of 400s from it).
POOL_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=4.0)


def default_transport() -> httpx.AsyncBaseTransport:
    """aiohttp's connection pool behind httpx's API.

    httpx's own pool collapses with many requests in flight: against the simulator at 64
    concurrent calls it managed ~144 req/s at ~4.9 ms CPU each, where the aiohttp transport
    did ~650 req/s at ~0.6 ms (bench/gateway.py measures it end to end).
    """
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(verify=tls_context(), limits=POOL_LIMITS)


@dataclass(slots=True)
class HealthResult:
    ok: bool
    latency_ms: float
    detail: str = ""


class Adapter:
    """Base class for one wire family.

    A family provides `auth_headers`, `error_from_response`, and either `complete` and
    `stream` of its own or the four pieces the ones here are made of: `chat_path`,
    `payload`, `read_answer` (a parsed JSON answer) and `read_stream` (the streamed one).
    """

    wire: ClassVar[str] = ""

    def __init__(self, provider: ResolvedProvider, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.provider = provider
        self.id = provider.id
        self.transport = transport if transport is not None else default_transport()
        self.client = httpx.AsyncClient(
            base_url=provider.base_url,
            headers={**provider.spec.headers, **self.auth_headers(), **provider.headers},
            timeout=httpx.Timeout(provider.timeout_s, connect=provider.connect_timeout_s),
            transport=self.transport,
        )
        self._templates: dict[str, httpx.Request] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.provider.base_url}>"

    # --- what subclasses provide -------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def chat_path(self, model: str) -> str:
        """Where a non-streamed chat request goes, relative to the base URL."""
        raise NotImplementedError

    def payload(self, request: ChatRequest, model: str, *, stream: bool = False) -> dict[str, Any]:
        """The provider's request body for an OpenAI-shaped request."""
        raise NotImplementedError

    def read_answer(self, data: Any, model: str) -> ChatResponse:
        """A non-streamed answer; may raise KeyError, TypeError, AttributeError or IndexError where it does not fit."""
        raise NotImplementedError

    def read_stream(self, payload: dict[str, Any], model: str) -> AsyncIterator[ChatChunk]:
        """Send a streamed request; its chunks, the last one with finish_reason and usage."""
        raise NotImplementedError

    async def complete(self, request: ChatRequest, *, model: str | None = None) -> ChatResponse:
        name = self.wire_model(request, model)
        data = await self.post_json(self.chat_path(name), self.payload(request, name), name)
        return self.response(data, name)

    def stream(self, request: ChatRequest, *, model: str | None = None) -> AsyncIterator[ChatChunk]:
        name = self.wire_model(request, model)
        payload = self.payload(request, name, stream=True)
        deadline = self.provider.first_token_timeout_s
        return with_first_token_timeout(self.read_stream(payload, name), deadline, self.id, name)

    async def list_models(self) -> list[str]:
        raise NotImplementedError(f"{self.id} has no model list endpoint")

    async def embed(self, texts: list[str], *, model: str) -> Embeddings:
        raise NotImplementedError(f"{self.id} offers no embeddings")

    async def health_check(self) -> HealthResult:
        """A cheap authenticated call; the model list where there is one."""
        start = time.perf_counter()
        try:
            await self.list_models()
        except ProviderError as error:
            return HealthResult(False, (time.perf_counter() - start) * 1000, f"{error.kind}: {error.message}")
        return HealthResult(True, (time.perf_counter() - start) * 1000)

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- shared plumbing -------------------------------------------------------

    def clean(self, text: str) -> str:
        """Provider text with any key in force scrubbed out."""
        return redact(text, (self.provider.key(),))

    def wire_name(self, model: str) -> str:
        """A model id as this provider's API spells it: ours without the `provider/` prefix."""
        return model.removeprefix(f"{self.id}/")

    def wire_model(self, request: ChatRequest, model: str | None) -> str:
        """The model a call is for: `model`, else the request's, as the provider spells it."""
        name = self.wire_name(model or request.model or "")
        if not name:
            raise BadRequestError("the request names no model", provider=self.id)
        return name

    def response(self, data: Any, model: str) -> ChatResponse:
        """`read_answer`, with an answer that does not fit the wire format as a MalformedResponseError."""
        try:
            return self.read_answer(data, model)
        except (KeyError, TypeError, AttributeError, IndexError):
            raise MalformedResponseError(
                f"unreadable {self.wire} answer: {self.clean(str(data)[:200])}", provider=self.id, model=model
            ) from None

    def unreadable_event(self, data: str, model: str) -> StreamInterruptedError:
        return StreamInterruptedError(f"unreadable event {self.clean(data[:120])!r}", provider=self.id, model=model)

    def transport_error(self, error: httpx.HTTPError, model: str, *, started: bool = False) -> ProviderError:
        """Map an httpx failure to our hierarchy; `started` means content had begun to flow."""
        where = {"provider": self.id, "model": model}
        message = self.clean(str(error) or type(error).__name__)
        timed_out = _timed_out(error)
        if timed_out and isinstance(error, httpx.ConnectTimeout):
            return TimeoutError(f"connect timed out: {message}", phase="connect", **where)
        if timed_out:
            return TimeoutError(f"read timed out: {message}", phase="read", **where)
        if started:
            return StreamInterruptedError(f"stream broke: {message}", **where)
        return ConnectionLostError(f"connection failed: {message}", **where)

    def build_request(self, method: str, url: str, **kwargs: Any) -> httpx.Request:
        """`client.build_request`, with the client's base URL, headers and timeout merged once per URL, not per call.

        Parsing and merging them again on every call was the largest part of a call's CPU.
        """
        template = self._templates.get(url)
        if template is None:
            if len(self._templates) >= 256:
                self._templates.clear()
            # A GET carries no body headers (Content-Length) into the requests made from it.
            template = self._templates[url] = self.client.build_request("GET", url)
        headers = template.headers
        extra = kwargs.pop("headers", None)
        if extra:
            headers = headers.copy()
            headers.update(extra)
        return httpx.Request(method, template.url, headers=headers, extensions=dict(template.extensions), **kwargs)

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send through the transport itself: the client's cookie jar, auth and redirect steps, which
        provider calls never use, cost about a quarter of a millisecond of CPU per call."""
        response = await self.transport.handle_async_request(request)
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    @asynccontextmanager
    async def open_stream(self, method: str, url: str, model: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """Send a streaming request; raise mapped errors for a non-2xx answer; always close the response."""
        try:
            response = await self.send(self.build_request(method, url, **kwargs), stream=True)
        except httpx.HTTPError as error:
            raise self.transport_error(error, model) from None
        try:
            if response.status_code >= 400:
                body = await response.aread()
                raise self.error_from_response(response.status_code, body, response.headers, model)
            yield response
        finally:
            await response.aclose()

    @asynccontextmanager
    async def open_events(self, url: str, model: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """POST a streamed request (see `open_stream`); a connection that fails while it is read broke the stream."""
        async with self.open_stream("POST", url, model, **kwargs) as response:
            try:
                yield response
            except httpx.HTTPError as error:
                raise self.transport_error(error, model, started=True) from None

    async def post_json(self, url: str, payload: dict[str, Any], model: str, **kwargs: Any) -> Any:
        return await self.request_json("POST", url, model, json=payload, **kwargs)

    async def get_json(self, url: str, model: str = "", **kwargs: Any) -> Any:
        return await self.request_json("GET", url, model, **kwargs)

    async def request_json(self, method: str, url: str, model: str, **kwargs: Any) -> Any:
        """A JSON answer; transport failures, error statuses and non-JSON bodies raised as our errors."""
        try:
            response = await self.send(self.build_request(method, url, **kwargs))
        except httpx.HTTPError as error:
            raise self.transport_error(error, model) from None
        if response.status_code >= 400:
            raise self.error_from_response(response.status_code, response.content, response.headers, model)
        try:
            return response.json()
        except ValueError:
            raise MalformedResponseError(
                f"answer is not JSON: {self.clean(response.text[:200])}", provider=self.id, model=model
            ) from None

    def error_from_response(
        self, status: int, body: bytes, headers: httpx.Headers, model: str
    ) -> ProviderError:
        """Subclasses read their provider's error shape; see each wire module."""
        raise NotImplementedError


def _timed_out(error: httpx.HTTPError) -> bool:
    """Whether an httpx error really is a timeout.

    httpx_aiohttp maps every aiohttp connection error (refused, reset, server gone)
    to ConnectTimeout; behind it, only aiohttp's own timeout errors are timeouts.
    """
    if not isinstance(error, httpx.TimeoutException):
        return False
    cause = error.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        return isinstance(cause, builtins.TimeoutError)  # ours shadows the name in this module
    return True


def with_first_token_timeout(
    chunks: AsyncIterator[ChatChunk], timeout_s: float, provider: str, model: str
) -> AsyncIterator[ChatChunk]:
    """Fail with a first-token timeout when nothing useful arrives in time; after that, pass through."""
    return _FirstTokenDeadline(chunks.__aiter__(), timeout_s, provider, model)


class _FirstTokenDeadline:
    """`with_first_token_timeout`'s iterator. Once the first chunk is in, `__anext__` hands out
    the inner iterator's own awaitable: the rest of the stream pays for no extra frame."""

    __slots__ = ("_iterator", "_timeout_s", "_provider", "_model", "_waiting")

    def __init__(self, iterator: AsyncIterator[ChatChunk], timeout_s: float, provider: str, model: str) -> None:
        self._iterator = iterator
        self._timeout_s = timeout_s
        self._provider = provider
        self._model = model
        self._waiting = True

    def __aiter__(self) -> _FirstTokenDeadline:
        return self

    def __anext__(self) -> Awaitable[ChatChunk]:
        if self._waiting:
            return self._first()
        return self._iterator.__anext__()

    async def _first(self) -> ChatChunk:
        self._waiting = False
        try:
            return await asyncio.wait_for(self._iterator.__anext__(), self._timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no first token within {self._timeout_s:g}s",
                phase="first_token",
                provider=self._provider,
                model=self._model,
            ) from None

    async def aclose(self) -> None:
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()


async def iter_sse(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """Server-sent events as (event, data) pairs.

    This is the hot loop of every stream, so it works on raw bytes: the buffer is
    split into events at blank lines in one pass, and the usual event, a single
    `data:` line, is sliced out without looking at its lines one by one.
    Comment lines (`: keep-alive`, `: OPENROUTER PROCESSING`) are skipped.
    """
    buffer = b""
    async for raw in response.aiter_bytes():
        buffer = buffer + raw if buffer else raw
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                continue  # the \n of a \r\n may be in the next read
            buffer = buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in buffer:
            continue
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                yield None, block[6:].decode()
            else:
                event = _event(block)
                if event is not None:
                    yield event
    if buffer.strip():
        event = _event(buffer.replace(b"\r\n", b"\n"))
        if event is not None:
            yield event


def _event(block: bytes) -> tuple[str | None, str] | None:
    """One event's lines: `event:` names it, `data:` lines join; None when it carries no data."""
    name: str | None = None
    data: list[str] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append((value[1:] if value.startswith(b" ") else value).decode())
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
        # ":" comments, "id:" and "retry:" lines carry nothing we use
    return (name, "\n".join(data)) if data else None


class StreamAssembler:
    """Joins a stream's chunks into the `ChatResponse` its non-streamed twin would be.

    Tool-call pieces join by index; usage and extras are the last ones sent.
    """

    __slots__ = ("provider", "model", "content", "reasoning", "calls", "finish_reason", "usage", "extra")

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.extra: dict[str, Any] | None = None

    def add(self, chunk: ChatChunk) -> None:
        if chunk.content:
            self.content.append(chunk.content)
        if chunk.reasoning:
            self.reasoning.append(chunk.reasoning)
        for delta in chunk.tool_calls or ():
            call = self.calls.get(delta.index)
            if call is None:
                call = {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                self.calls[delta.index] = call
            if delta.id:
                call["id"] = delta.id
            if delta.name:
                call["function"]["name"] += delta.name
            call["function"]["arguments"] += delta.arguments
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.extra:
            self.extra = {**(self.extra or {}), **chunk.extra}

    def response(self) -> ChatResponse:
        calls = [self.calls[i] for i in sorted(self.calls)] or None
        return ChatResponse(
            provider=self.provider,
            model=self.model,
            content="".join(self.content) if self.content or not calls else None,
            reasoning="".join(self.reasoning) or None,
            tool_calls=calls,
            finish_reason=self.finish_reason or ("tool_calls" if calls else "stop"),
            usage=self.usage if self.usage is not None else Usage(),
            extra=self.extra,
        )


def stop_sequences(request: ChatRequest) -> list[str]:
    """OpenAI's `stop`, a string or a list, as the list other wires take."""
    stop = request.stop or []
    return [stop] if isinstance(stop, str) else list(stop)


def tool_arguments(call: ToolCall, provider: str, model: str) -> Any:
    """An assistant tool call's arguments, parsed from the JSON text OpenAI's shape keeps them in."""
    try:
        return json.loads(call.function.arguments or "{}")
    except ValueError:
        raise BadRequestError(
            f"tool call {call.id} has arguments that are not JSON", provider=provider, model=model
        ) from None


def split_data_url(url: str, provider: str, model: str) -> tuple[str, str]:
    """(media type, base64 data) of an image `data:` URL."""
    header, _, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if encoding != "base64" or not data or not media_type:
        raise BadRequestError("an image data: URL must be base64 with a media type", provider=provider, model=model)
    return media_type, data


def retry_after_seconds(headers: httpx.Headers, body_hint: float | None = None) -> float | None:
    """The wait a 429 asks for: Retry-After (seconds or HTTP date), then rate-limit reset headers."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(float(value), 0.0)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value) if value else None
            if parsed is not None:
                return max(parsed.timestamp() - time.time(), 0.0)
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset"):
        value = headers.get(name)
        if value:
            seconds = _duration(value)
            if seconds is not None:
                return seconds
    return body_hint


def _duration(value: str) -> float | None:
    """OpenAI-style reset durations: '1s', '6m0s', '250ms', or plain seconds."""
    try:
        return float(value)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(value):
        ch = value[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if value.startswith("ms", i) else ch
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total if not number else None


def make_adapter(provider: ResolvedProvider, *, transport: httpx.AsyncBaseTransport | None = None) -> Adapter:
    """The adapter for a provider's wire family."""
    wire = provider.spec.wire
    if wire == "openai":
        from .openai_compat import OpenAICompatAdapter as cls
    elif wire == "anthropic":
        from .anthropic import AnthropicAdapter as cls  # type: ignore[assignment]
    elif wire == "gemini":
        from .gemini import GeminiAdapter as cls  # type: ignore[assignment]
    elif wire == "cohere":
        from .cohere import CohereAdapter as cls  # type: ignore[assignment]
    else:  # pragma: no cover - the catalog schema admits only these four
        raise ValueError(f"unknown wire family {wire!r}")
    return cls(provider, transport=transport)
