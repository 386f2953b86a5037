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

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from ..core.config import NetworkConfig, ResolvedProvider
from . import http
from .proxies import proxy_for
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
) -> Transport:
    """The transport `provider`'s calls take: through its proxy, or the direct client."""
    tls = tls_context_for(network, env)
    proxy = proxy_for(provider, network, env)
    if proxy is not None and proxy.url.startswith("https://"):  # TLS to the proxy, then TLS inside it: httpx
        from .proxied import ProxiedTransport

        return ProxiedTransport(
            proxy, tls=tls, limit=MAX_CONNECTIONS, keepalive_s=KEEPALIVE_S, connect_timeout=provider.connect_timeout_s
        )
    via = None
    if proxy is not None:
        host, port = proxy.address
        via = http.ForwardProxy(host, port, proxy.shown, proxy.authorization)
    return http.Client(
        tls=tls, limit=MAX_CONNECTIONS, keepalive_s=KEEPALIVE_S, connect_timeout=provider.connect_timeout_s, proxy=via
    )
