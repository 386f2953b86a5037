"""The line between an adapter and the network: what an adapter sends a request through.

As httpx's transports (`httpx/_transports/base.py`), plain primitives below the line: a
method, a `http.Target`, header lines, body bytes and timeouts go in; a response with a
status, headers and a body to iterate comes out; failures are OSError subclasses
(`http.ConnectTimeout`, `http.ReadTimeout`, `http.ConnectionClosed`, `http.ProtocolError`,
`http.ProxyRefused`, and the socket's and ssl's own).

Two implementations. `http.Client`, the fast httptools client, serves direct connections and
http:// forward proxies: a CONNECT tunnel then TLS to the origin (SNI and hostname checks)
for https, absolute-form requests for http, `Proxy-Authorization: Basic` from the proxy URL's
credentials. `ProxiedTransport` (httpx) serves what it does not: an https:// proxy, where
TLS to the proxy carries TLS to the origin. The runtime hands each adapter the one its
provider's route needs (`transport_for`); a test may hand one of its own.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import httpx

from ..core.config import NetworkConfig, ResolvedProvider
from . import http
from .proxies import Proxy, proxy_for
from .trust import tls_context_for

MAX_CONNECTIONS = 256
# A connection idle longer is not reused: a new TLS handshake costs a real provider's
# round trips, and servers keep theirs open for a minute or more.
KEEPALIVE_S = 30.0


class Response(Protocol):
    status: int
    headers: Mapping[str, str]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


class Transport(Protocol):
    route: str  # "direct", or "proxy http://host:port"

    async def request(
        self, method: str, to: http.Target, body: bytes | None = None, *, timeouts: http.Timeouts,
        content_type: bytes = b"application/json", headers: http.RequestHeaders | None = None,
    ) -> Response: ...  # fmt: skip

    async def aclose(self) -> None: ...


def transport_for(
    provider: ResolvedProvider, network: NetworkConfig, env: Mapping[str, str]
) -> http.Client | ProxiedTransport:
    """The transport `provider`'s calls take: through its proxy, or the direct client."""
    tls = tls_context_for(network, env)
    proxy = proxy_for(provider, network, env)
    if proxy is not None and proxy.url.startswith("https://"):  # TLS to the proxy, then TLS inside it: httpx
        return ProxiedTransport(proxy, tls=tls, connect_timeout=provider.connect_timeout_s)
    via = None
    if proxy is not None:
        host, port = proxy.address
        via = http.ForwardProxy(host, port, proxy.shown, proxy.authorization)
    return http.Client(
        tls=tls, limit=MAX_CONNECTIONS, keepalive_s=KEEPALIVE_S, connect_timeout=provider.connect_timeout_s, proxy=via
    )


class ProxiedTransport:
    """Requests through a forward proxy, by httpx: for an https:// proxy, which the fast client does not speak."""

    def __init__(self, proxy: Proxy, *, tls: ssl.SSLContext, connect_timeout: float | None = None) -> None:
        self.proxy = proxy
        self.route = f"proxy {proxy.shown}"
        self.connect_timeout = connect_timeout
        self._closing: set[asyncio.Task[None]] = set()  # responses let go of before their end, being closed
        self._client = httpx.AsyncClient(
            proxy=httpx.Proxy(proxy.url, ssl_context=tls), verify=tls, trust_env=False, follow_redirects=False,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE_S),
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
