"""What every provider adapter offers, and the plumbing they share.

An adapter turns our OpenAI-shaped `ChatRequest` into one provider's wire format
and the provider's answer back into `ChatResponse` / `ChatChunk`. Each provider
gets one pool of connections (`http.Client`, made for the gateway's budget of a
millisecond of CPU per request). Closing a stream (breaking out of the `async for`,
or cancelling the task) closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, TypeVar

from .. import __version__
from ..core.adapters import HealthResult
from ..core.config import NetworkConfig, ResolvedProvider
from ..core.errors import (
    BadRequestError,
    ConfigError,
    ConnectionLostError,
    DnsError,
    MalformedResponseError,
    ProviderError,
    ProxyError,
    RedirectError,
    StreamInterruptedError,
    TimeoutError,
    TlsError,
    redact,
)
from ..core.errors import ConnectionRefusedError as RefusedError
from ..core.types import (
    ChatChunk, ChatRequest, ChatResponse, Embeddings, ToolCall, Usage, aclose_iterator, json_bytes, json_value,
)
from ..core.sse import iter_sse, sse_batches  # noqa: F401  the wire families read their streams with these
from . import http
from .transport import Response, Transport, transport_for
from .trust import tls_context_for

# Response headers as the families read them: any case-insensitive mapping
# (http.Headers in practice; httpx.Headers in some tests).
Headers = Mapping[str, str]

# What a failing connection raises: OSError, as the client's own errors and the socket's are.
TRANSPORT_ERRORS = (OSError,)
# Header names whose values are credentials: `RequestHeaders` keeps them out of reprs.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key"})
_Item = TypeVar("_Item")  # what a stream yields: a chunk, or a batch of them


def tls_context() -> ssl.SSLContext:
    """The TLS context provider connections use with no [network] settings: for tests' own clients."""
    return tls_context_for(NetworkConfig(), os.environ)


class RequestHeaders(http.RequestHeaders):
    """An adapter's request headers; the repr masks credentials, for logs and tracebacks."""

    def __repr__(self) -> str:
        shown = {name: "[secure]" if name in SECRET_HEADERS else value for name, value in self.items()}
        return f"<RequestHeaders {shown!r}>"


class Adapter:
    """Base class for one wire family: an implementation of `core.adapters.Adapter`.

    A family provides `auth_headers`, `error_from_response`, and either `complete` and
    `stream` of its own or the four pieces the ones here are made of: `chat_path`,
    `payload`, `read_answer` (a parsed JSON answer) and `read_stream` (the streamed one).
    """

    wire: ClassVar[str] = ""

    def __init__(self, provider: ResolvedProvider, transport: Transport | None = None) -> None:
        """`transport`: what calls go through (the runtime's choice for this provider); unless given,
        the one the environment alone calls for."""
        self.provider = provider
        self.id = provider.id
        # Which provider's dialect this speaks: a configured deployment (`inherits`) speaks its parent's.
        self.flavor = provider.spec.inherits or provider.id
        self.base_url = provider.base_url.rstrip("/")
        # Merged once here, not per call; ours first so a provider's own headers win.
        try:
            self.headers = RequestHeaders(
                {"User-Agent": f"p402/{__version__}", **provider.spec.headers, **self.auth_headers(), **provider.headers}
            )
        except ValueError as error:  # a key or header with a line break in it, say
            raise ConfigError(f"provider {self.id!r}: {error}") from None
        # A stream lasts as long as it keeps sending: no deadline, but a silence of timeout_s
        # fails it, mid-answer too. `connect` covers waiting for a free pooled connection.
        self.timeouts = http.Timeouts(connect=provider.timeout_s, read=provider.timeout_s)
        self.answer_timeouts = http.Timeouts(connect=provider.timeout_s, read=None, total=provider.timeout_s)
        self.transport: Transport = transport or transport_for(provider, NetworkConfig(), os.environ)
        self._targets: dict[str, http.Target] = {}

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

    def error_from_response(self, status: int, body: bytes, headers: Headers, model: str) -> ProviderError:
        """Our error for a non-2xx answer; each wire module reads its provider's error shape."""
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

    def stream_batches(self, request: ChatRequest, *, model: str | None = None) -> AsyncIterator[list[ChatChunk]]:
        """`stream()` a list at a time: the chunks that arrived together, in order.

        A busy stream delivers many events per read, and a consumer that writes them on
        (the gateway) then pays one hop per read instead of one per chunk in every layer.
        The OpenAI family, the hot path, reads natively in batches; the others batch one
        chunk each.
        """
        return _one_each(self.stream(request, model=model))

    async def list_models(self) -> list[str]:
        raise NotImplementedError(f"{self.id} has no model list endpoint")

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        """One vector per text; `dimensions` asks for shorter vectors where the model can give them."""
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
        """Close the pooled connections."""
        await self.transport.aclose()

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
            raise BadRequestError("the request names no model", provider=self.id, model=model)
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

    def transport_error(self, error: BaseException, model: str, *, started: bool = False) -> ProviderError:
        """Map a connection failure to our hierarchy; `started` means content had begun to flow.

        Each cause of a failed connection is its own kind, with a one-line message: a proxy that
        refused, a name that did not resolve, a certificate not trusted, a refused connection,
        a timeout."""
        where = {"provider": self.id, "model": model}
        message = self.clean(str(error) or type(error).__name__)
        if isinstance(error, http.ProxyRefused):
            return ProxyError(message, proxy=error.proxy, status=error.status, **where)
        if isinstance(error, http.ConnectTimeout):  # connecting, or waiting for a pooled connection
            return TimeoutError(f"connect timed out: {message}", phase="connect", **where)
        if isinstance(error, asyncio.TimeoutError):  # http.ReadTimeout, among others
            return TimeoutError(f"read timed out: {message}", phase="read", **where)
        if started:
            return StreamInterruptedError(f"stream broke: {message}", **where)
        host = self.target("").host
        if isinstance(error, socket.gaierror):
            return DnsError(f"the name {host} does not resolve: {message}", **where)
        if isinstance(error, ssl.SSLCertVerificationError):
            reason = getattr(error, "verify_message", None) or message
            return TlsError(f"the certificate of {host} is not trusted: {reason}", **where)
        if isinstance(error, ssl.SSLError):
            return TlsError(f"TLS with {host} failed: {message}", **where)
        if isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) == errno.ECONNREFUSED:
            return RefusedError(f"{host} refused the connection: {message}", **where)
        return ConnectionLostError(f"connection failed: {message}", **where)

    def target(self, path: str, params: Mapping[str, Any] | None = None) -> http.Target:
        """The base URL and `path`, split once per path rather than on every call."""
        if params:
            return http.target(self.base_url + path, params)
        target = self._targets.get(path)
        if target is None:
            if len(self._targets) >= 256:  # paths carry model names (Gemini's); keep the cache bounded
                self._targets.clear()
            target = self._targets[path] = http.target(self.base_url + path)
        return target

    def with_headers(self, extra: Mapping[str, str]) -> RequestHeaders | None:
        """The adapter's headers with one request's `extra` over them; None (the adapter's own) when none."""
        if not extra:
            return None
        try:
            return RequestHeaders({**self.headers, **extra})
        except ValueError as error:  # a line break in a value
            raise BadRequestError(f"unusable request header: {error}", provider=self.id) from None

    async def send(
        self, method: str, path: str, model: str, payload: Any = None, *, params: Mapping[str, Any] | None = None,
        timeouts: http.Timeouts | None = None, headers: RequestHeaders | None = None,
    ) -> Response:
        """Send a request (a JSON body when `payload` is given); connection failures raised as our errors.

        The caller reads the response and closes it. `timeouts`: a stream's unless given; `headers`:
        the adapter's own unless given (see `with_headers`).
        """
        body = None if payload is None else json_bytes(payload)
        try:
            response = await self.transport.request(
                method, self.target(path, params), body, timeouts=timeouts or self.timeouts,
                headers=headers or self.headers,
            )
        except TRANSPORT_ERRORS as error:
            raise self.transport_error(error, model) from None
        if 300 <= response.status < 400:
            response.close()
            raise self.redirect_error(response.status, response.headers, model)
        return response

    def redirect_error(self, status: int, headers: Headers, model: str) -> RedirectError:
        """A 3xx is never an answer: provider APIs do not redirect, so the base URL needs fixing."""
        location = headers.get("location") or "(no Location)"
        return RedirectError(
            f"{status} redirect to {self.clean(location)}: provider APIs answer where they are asked; "
            f"check the base URL {self.provider.base_url}",
            provider=self.id, model=model, status=status,
        )  # fmt: skip

    async def read_body(self, response: Response, model: str) -> bytes:
        """A whole response body; a connection that fails while it is read is our error."""
        try:
            return await response.read()
        except TRANSPORT_ERRORS as error:
            raise self.transport_error(error, model) from None

    async def start_stream(
        self, method: str, path: str, model: str, payload: Any = None, *, headers: RequestHeaders | None = None
    ) -> Response:
        """Send a streaming request and return its 2xx response, which the caller must close;
        a non-2xx answer is raised as our error (and closed).

        A stream left half-read drops its connection at once, so the provider sees the
        cancel and stops generating (and billing); one read to the end goes back to the pool.
        """
        response = await self.send(method, path, model, payload, headers=headers)
        if response.status >= 400:
            try:
                body = await self.read_body(response, model)
            finally:
                response.close()
            raise self.error_from_response(response.status, body, response.headers, model)
        return response

    @asynccontextmanager
    async def open_stream(
        self, method: str, path: str, model: str, payload: Any = None, *, headers: RequestHeaders | None = None
    ) -> AsyncIterator[Response]:
        """`start_stream` as a context manager that always closes the response."""
        response = await self.start_stream(method, path, model, payload, headers=headers)
        try:
            yield response
        finally:
            response.close()

    @asynccontextmanager
    async def open_events(
        self, path: str, model: str, payload: Any, *, headers: RequestHeaders | None = None
    ) -> AsyncIterator[Response]:
        """POST a streamed request (see `open_stream`); a connection that fails while it is read broke the stream."""
        async with self.open_stream("POST", path, model, payload, headers=headers) as response:
            try:
                yield response
            except TRANSPORT_ERRORS as error:
                raise self.transport_error(error, model, started=True) from None

    async def post_json(self, path: str, payload: Any, model: str, *, headers: RequestHeaders | None = None) -> Any:
        return await self.request_json("POST", path, model, payload, headers=headers)

    async def get_json(self, path: str, model: str = "", *, params: Mapping[str, Any] | None = None) -> Any:
        return await self.request_json("GET", path, model, params=params)

    async def request_json(
        self, method: str, path: str, model: str, payload: Any = None, *, params: Mapping[str, Any] | None = None,
        headers: RequestHeaders | None = None,
    ) -> Any:
        """A JSON answer; transport failures, error statuses and non-JSON bodies raised as our errors."""
        response = await self.send(
            method, path, model, payload, params=params, timeouts=self.answer_timeouts, headers=headers
        )
        try:
            body = await self.read_body(response, model)
        finally:
            response.close()  # read to the end, it is back in the pool already; cut short, it must go
        if response.status >= 400:
            raise self.error_from_response(response.status, body, response.headers, model)
        try:
            return json_value(body)
        except ValueError:
            text = body[:200].decode(errors="replace")
            raise MalformedResponseError(
                f"answer is not JSON: {self.clean(text)}", provider=self.id, model=model
            ) from None


def with_first_token_timeout(
    chunks: AsyncIterator[_Item], timeout_s: float, provider: str, model: str
) -> AsyncIterator[_Item]:
    """Fail with a first-token timeout when nothing arrives in time; after that, pass through.

    Works on chunks and on batches of them alike: it times the first item."""
    return _FirstTokenDeadline(chunks.__aiter__(), timeout_s, provider, model)


class _FirstTokenDeadline(Generic[_Item]):
    """`with_first_token_timeout`'s iterator. Once the first item is in, `__anext__` hands out
    the inner iterator's own awaitable: the rest of the stream pays for no extra frame."""

    __slots__ = ("_iterator", "_timeout_s", "_provider", "_model", "_waiting")

    def __init__(self, iterator: AsyncIterator[_Item], timeout_s: float, provider: str, model: str) -> None:
        self._iterator = iterator
        self._timeout_s = timeout_s
        self._provider = provider
        self._model = model
        self._waiting = True

    def __aiter__(self) -> _FirstTokenDeadline[_Item]:
        return self

    def __anext__(self) -> Awaitable[_Item]:
        if self._waiting:
            return self._first()
        return self._iterator.__anext__()

    async def _first(self) -> _Item:
        self._waiting = False
        try:
            async with asyncio.timeout(self._timeout_s):  # not wait_for: that runs the read in a task of its own
                return await self._iterator.__anext__()
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no first token within {self._timeout_s:g}s",
                phase="first_token",
                provider=self._provider,
                model=self._model,
            ) from None

    async def aclose(self) -> None:
        await aclose_iterator(self._iterator)


async def chunks_of(batches: AsyncIterator[list[ChatChunk]]) -> AsyncIterator[ChatChunk]:
    """The chunks of `stream_batches()` one by one; closing this closes the batches (and the upstream)."""
    try:
        async for batch in batches:
            for chunk in batch:
                yield chunk
    finally:
        await aclose_iterator(batches)


async def _one_each(chunks: AsyncIterator[ChatChunk]) -> AsyncIterator[list[ChatChunk]]:
    try:
        async for chunk in chunks:
            yield [chunk]
    finally:
        await aclose_iterator(chunks)


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


def retry_after_seconds(headers: Headers, body_hint: float | None = None) -> float | None:
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
