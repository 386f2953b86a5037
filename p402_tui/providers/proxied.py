"""`ProxiedTransport`: requests through an https:// forward proxy, by httpx.

The fast client speaks direct connections and http:// proxies; TLS to the proxy carrying TLS
to the origin is httpx's. Imported only when a provider's route needs it, so a gateway that
never meets such a proxy does not load httpx's client stack.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping

import httpx

from . import http
from .proxies import Proxy


class ProxiedTransport:
    """Requests through a forward proxy, by httpx: for an https:// proxy, which the fast client does not speak."""

    def __init__(
        self, proxy: Proxy, *, tls: ssl.SSLContext, limit: int, keepalive_s: float, connect_timeout: float | None = None
    ) -> None:
        self.proxy = proxy
        self.route = f"proxy {proxy.shown}"
        self.connect_timeout = connect_timeout
        self._closing: set[asyncio.Task[None]] = set()  # responses let go of before their end, being closed
        self._client = httpx.AsyncClient(
            proxy=httpx.Proxy(proxy.url, ssl_context=tls), verify=tls, trust_env=False, follow_redirects=False,
            limits=httpx.Limits(max_connections=limit, keepalive_expiry=keepalive_s),
        )  # fmt: skip

    async def request(
        self, method: str, to: http.Target, body: bytes | None = None, *, timeouts: http.Timeouts,
        content_type: bytes = b"application/json", headers: http.RequestHeaders | None = None,
    ) -> _ProxiedResponse:  # fmt: skip
        sent = [("Accept-Encoding", "identity"), *(headers or {}).items()]
        if body is not None:
            sent.append(("Content-Type", content_type.decode("latin-1")))
        connect = _least(timeouts.connect, self.connect_timeout)
        read = timeouts.read if timeouts.read is not None else timeouts.total
        timeout = httpx.Timeout(connect=connect, read=read, write=read, pool=timeouts.connect)
        url = f"{to.scheme}://{to.host_header.decode('ascii')}{to.path.decode('ascii')}"
        request = self._client.build_request(method, url, headers=sent, content=body, timeout=timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeouts.total is None else loop.time() + timeouts.total
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._client.send(request, stream=True)
        except TimeoutError:
            raise http.ReadTimeout("the whole answer did not arrive in time") from None
        except httpx.HTTPError as error:
            raise self._error(error) from None
        if response.status_code == 407:  # a plain-http request the proxy refused (https ones fail on CONNECT)
            await response.aclose()
            raise http.ProxyRefused(
                f"the proxy at {self.proxy.shown} refused the request: 407 Proxy Authentication Required",
                proxy=self.proxy.shown, status=407,
            )  # fmt: skip
        return _ProxiedResponse(response, self, deadline)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _error(self, error: httpx.HTTPError) -> OSError:
        """httpx's error as the OSError the line promises; a proxy's refusal names the proxy."""
        shown = self.proxy.shown
        if isinstance(error, httpx.ProxyError):
            words = str(error) or "refused"
            status = int(words[:3]) if words[:3].isdigit() else None
            return http.ProxyRefused(f"the proxy at {shown} refused the tunnel: {words}", proxy=shown, status=status)
        if isinstance(error, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return http.ConnectTimeout(f"no connection through the proxy at {shown} in time")
        if isinstance(error, httpx.TimeoutException):
            return http.ReadTimeout(str(error) or "nothing arrived in time")
        cause = _os_cause(error)
        if isinstance(error, httpx.ConnectError):
            if isinstance(cause, ssl.SSLError):
                return cause  # the origin's certificate, checked through the tunnel
            reason = str(cause or error) or type(cause or error).__name__
            return http.ProxyRefused(f"the proxy at {shown} cannot be reached: {reason}", proxy=shown)
        if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return http.ConnectionClosed(str(error) or "the connection closed before the response ended")
        return cause or http.ProtocolError(str(error) or type(error).__name__)


class _ProxiedResponse:
    __slots__ = ("status", "headers", "_response", "_chunks", "_transport", "_deadline")

    def __init__(self, response: httpx.Response, transport: ProxiedTransport, deadline: float | None) -> None:
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self._response = response
        self._chunks = response.aiter_bytes()
        self._transport = transport
        self._deadline = deadline

    def __aiter__(self) -> _ProxiedResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self._chunks.__anext__()
        except TimeoutError:
            raise http.ReadTimeout("the whole answer did not arrive in time") from None
        except httpx.HTTPError as error:
            raise self._transport._error(error) from None

    async def read(self) -> bytes:
        return b"".join([part async for part in self])

    def close(self) -> None:
        """Done with the response: back to the pool when read to its end, else its connection is dropped."""
        if not self._response.is_closed:
            closing = self._transport._closing
            task = asyncio.get_running_loop().create_task(self._response.aclose())
            closing.add(task)
            task.add_done_callback(closing.discard)


def _least(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _os_cause(error: BaseException) -> OSError | None:
    """The socket's or ssl's own error under httpx's and httpcore's wrappers."""
    seen: BaseException | None = error
    for _ in range(6):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if isinstance(seen, OSError):
            return seen
    return None
