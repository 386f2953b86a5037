"""The HTTP/1.1 client every adapter calls its provider through.

Keep-alive pools per origin, request heads written in one piece, and bodies handed
out as they arrive; the parsing is httptools (llhttp, the parser uvicorn serves
with). It leaves out what no provider API needs and a general client (aiohttp, the
one it replaced) pays for on every request: redirects, cookies, proxies, HTTP/2,
and compression other than gzip and deflate (it asks for none; it undoes those two
when a server sends them anyway).

Failures are OSError subclasses, as the socket's own are: `ConnectTimeout` (no
connection in time), `ReadTimeout` (a silence, or an answer past its deadline),
`ConnectionClosed` and `ProtocolError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode, urlsplit

import aiohappyeyeballs
import httptools

from ..core.config import check_header


class ConnectTimeout(TimeoutError):
    """No connection in time: connecting took too long, or the pool had none free."""


class ReadTimeout(TimeoutError):
    """The server went quiet for too long, or a whole answer missed its deadline."""


class ConnectionClosed(ConnectionError):
    """The connection ended before the response did."""


class ProtocolError(OSError):
    """The server's bytes are not HTTP/1.1 this client can read."""


class ProxyRefused(OSError):
    """The forward proxy would not carry the request: it answered `status` (407, 403, 502 ...) or could not be reached."""

    def __init__(self, message: str, *, proxy: str, status: int | None = None) -> None:
        super().__init__(message)
        self.proxy = proxy  # as shown: without its credentials
        self.status = status


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float | None  # a connection from the pool, or a new one made
    read: float | None  # the longest silence while the response is awaited or read
    total: float | None = None  # the whole response, body included


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """An http:// forward proxy: https origins through a CONNECT tunnel, http ones in absolute form."""

    host: str
    port: int
    shown: str  # scheme://host:port, no credentials: what errors say
    authorization: str = field(default="", repr=False)  # Proxy-Authorization's value, from the URL's credentials


@dataclass(frozen=True, slots=True)
class Target:
    """A URL split the way requests need it, made once per URL."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    path: bytes  # path and query, as sent on the request line

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def target(url: str, params: Mapping[str, object] | None = None) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default_port = port == (443 if parts.scheme == "https" else 80)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
    query = "&".join(q for q in (quote(parts.query, safe="=&%+"), urlencode(params or {}, doseq=True)) if q)
    return Target(
        parts.scheme, host, port,
        (shown if default_port else f"{shown}:{port}").encode("ascii"),
        (f"{path}?{query}" if query else path).encode("ascii"),
    )  # fmt: skip


class Headers(Mapping[str, str]):
    """HTTP headers, looked up whatever the case; of names given twice, the last wins."""

    __slots__ = ("_values",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._values = {name.lower(): value for name, value in pairs}

    @classmethod
    def received(cls, raw: list[tuple[bytes, bytes]]) -> Headers:
        """A response's headers as they came; a repeated header's values joined by ", "."""
        values: dict[str, str] = {}
        for name, value in raw:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            values[key] = f"{values[key]}, {text}" if key in values else text
        headers = cls.__new__(cls)
        headers._values = values
        return headers

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._values.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Headers({self._values!r})"


class RequestHeaders(Headers):
    """Headers every request of an adapter carries, written out once as `wire` (header lines) for the head."""

    __slots__ = ("wire",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(items)
        self.wire = b"".join(_header_line(k, v) for k, v in self.items())


_HIGH_WATER = 1 << 20  # body bytes held unread before the socket stops being read
RETRY_WITHIN_S = 0.3  # a reused connection closed this soon after the request, with no answer, is retried


class _Connection(asyncio.Protocol):
    """One socket, one response at a time; a parser's callbacks fill the response's state."""

    def __init__(self, client: Client, origin: tuple[str, str, int]) -> None:
        self.client = client
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False  # it served a response before this one
        self.in_flight = False  # a request was sent and its response is not yet recycled
        self.sent_at = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: Headers | None = None
        self.body: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.received = False  # a byte of this response has arrived
        self.error: OSError | None = None
        self.paused = False
        self.decoder: zlib._Decompress | None = None
        self.encoding = "identity"
        self.until_eof = False
        self.informational = False
        self.reusable = False
        self.last_read = 0.0
        self.deadline: float | None = None
        self.read_timeout: float | None = None

    # --- the socket's side -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:  # closed (by the client's aclose) while it was still connecting
            transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            # A server speaking out of turn (a 408 before it hangs up, say): whatever it says
            # would be read as the next request's answer. The connection is done.
            self.close()
            return
        self.received = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            # One of our callbacks refusing the body arrives wrapped; its own error says more.
            cause = error.__context__
            self.fail(cause if isinstance(cause, ProtocolError) else ProtocolError(f"unreadable HTTP response: {error}"))
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)
        if self.until_eof and self.headers is not None and not self.complete and exc is None and self.error is None:
            try:
                self._finish_body()  # a body without a length ends where the connection does
            except ProtocolError as error:
                self.error = error
        elif not self.complete and self.error is None:
            reason = f": {exc}" if exc else ""
            self.error = ConnectionClosed(f"the server closed the connection before the response ended{reason}")
        self._cancel_timer()
        self._wake()

    # --- the parser's callbacks --------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the answer proper follows
            self.raw_headers = []
            self.informational = True
            return
        headers = Headers.received(self.raw_headers)
        encoding = self.encoding = (headers.get("content-encoding") or "identity").strip().lower()
        if encoding == "gzip":
            self.decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self.decoder = zlib.decompressobj()
        elif encoding != "identity":  # before the head counts as arrived: the request itself fails
            raise ProtocolError(f"the server sent a body encoded as {encoding!r}, which this client cannot read")
        chunked = "chunked" in (headers.get("transfer-encoding") or "").lower()
        self.until_eof = "content-length" not in headers and not chunked
        self.status = status
        self.headers = headers

    def on_body(self, body: bytes) -> None:
        if self.decoder is not None:
            try:
                body = self.decoder.decompress(body)
            except zlib.error as error:
                if self.encoding != "deflate" or self.body or self.decoder.unused_data:
                    raise ProtocolError(f"undecodable compressed body: {error}") from None
                # "deflate" as some servers send it: the raw stream, without zlib's header.
                self.encoding = "raw deflate"
                self.decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.on_body(body)
        if body:
            self.body.append(body)
            self.buffered += len(body)
            if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        # Asked now: once the message is done, the parser answers for the next one.
        # llhttp's verdict covers `Connection: close` and bodies that end with the connection.
        self.reusable = self.parser.should_keep_alive()
        self._finish_body()

    def _finish_body(self) -> None:
        if self.decoder is not None:
            rest = self.decoder.flush()
            if rest:
                self.body.append(rest)
            if not self.decoder.eof:
                raise ProtocolError("the compressed body ended before its compressed stream did")
        self.complete = True
        self._cancel_timer()

    # --- the response's side -----------------------------------------------------------

    def send(self, head: bytes, timeouts: Timeouts) -> None:
        self.in_flight = True
        self.read_timeout = timeouts.read
        now = self.last_read = self.sent_at = self.loop.time()
        self.deadline = None if timeouts.total is None else now + timeouts.total
        if timeouts.read is not None or timeouts.total is not None:
            self._arm()
        assert self.transport is not None
        self.transport.write(head)

    async def wait(self) -> None:
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def fail(self, error: OSError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self.close()

    def close(self) -> None:
        if self.in_flight and not self.complete and self.error is None:
            # Closed by us mid-answer: not the end of a body that ends with the connection.
            self.error = ConnectionClosed("the connection was closed before the response ended")
        if not self.loop.is_closed():
            self._cancel_timer()
            if self.transport is not None and not self.closed:
                self.transport.close()
            self._wake()
        self.closed = True  # of a loop already gone nothing can be closed: its socket goes with the transport
        self.client._forget(self)  # now, not when the socket reports it: its pool slot is free at once

    def recycle(self) -> None:
        if self.paused and self.transport is not None:  # a body left unread paused the socket
            self.transport.resume_reading()
        self._reset()
        self.in_flight = False
        self.idle_since = self.loop.time()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # A silence is found by one timer per timeout period, not one re-armed per read:
    # the timer wakes, sees when the last read was, and sleeps again if it was recent.
    def _arm(self) -> None:
        due = self.deadline
        if self.read_timeout is not None:
            silent_until = self.last_read + self.read_timeout
            due = silent_until if due is None else min(due, silent_until)
        self._timer = None if due is None else self.loop.call_at(due, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.complete or self.closed:
            return
        now = self.loop.time()
        if self.deadline is not None and now >= self.deadline:
            self.fail(ReadTimeout("the whole answer did not arrive in time"))
        elif self.read_timeout is not None and not self._busy() and now - self.last_read >= self.read_timeout:
            self.fail(ReadTimeout(f"nothing arrived for {self.read_timeout:g}s"))
        else:
            if self._busy():
                self.last_read = now  # the server is not silent: we are slow, or still uploading
            self._arm()

    def _busy(self) -> bool:
        """Reading is paused by our slow reader, or the request is still being sent."""
        return self.paused or (self.transport is not None and self.transport.get_write_buffer_size() > 0)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Response:
    """A response whose head has arrived. Iterate it for the body as it comes, or `read()` it whole.

    A body read to its end puts the connection back in the pool; `close()` before the
    end drops the connection, so the server sees the client go.
    """

    __slots__ = ("status", "headers", "_conn")

    def __init__(self, conn: _Connection) -> None:
        self.status = conn.status
        self.headers: Headers = conn.headers  # type: ignore[assignment]
        self._conn: _Connection | None = conn

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        while conn is not None:
            if conn.body:
                return conn.take()
            if conn.error is not None:
                self._conn = None
                raise conn.error
            if conn.complete:
                self.close()  # read to its end: back to the pool
                break
            await conn.wait()
        raise StopAsyncIteration

    async def read(self) -> bytes:
        return b"".join([part async for part in self])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.complete:
                conn.client._release(conn)
            else:
                conn.close()


class Client:
    """Pooled connections to the origins an adapter calls, every request carrying `headers`."""

    route = "direct"

    def __init__(
        self, headers: Mapping[str, str] = {}, *, tls: ssl.SSLContext | None = None, limit: int = 256,
        keepalive_s: float = 30.0, connect_timeout: float | None = None, happy_eyeballs_delay: float = 0.25,
        resolve: Resolver | None = None, proxy: ForwardProxy | None = None,
    ) -> None:  # fmt: skip
        # No compression asked for: a compressing server may hold a stream's events back to fill
        # its blocks, and answers here are small. (One that compresses anyway is still read.)
        self._head = b"Accept-Encoding: identity\r\n" + b"".join(_header_line(k, v) for k, v in headers.items())
        self.happy_eyeballs_delay = happy_eyeballs_delay
        self.resolve = resolve  # host, port -> getaddrinfo's answer; the loop's getaddrinfo unless given
        self.proxy = proxy
        if proxy is not None:
            self.route = f"proxy {proxy.shown}"
            auth = proxy.authorization
            self._proxy_head = _header_line("Proxy-Authorization", auth) if auth else b""
        self.tls = tls
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.connect_timeout = connect_timeout  # the TCP and TLS handshakes; Timeouts.connect bounds the pool wait too
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._slots: deque[asyncio.Future[None]] = deque()
        self.closed = False

    async def request(
        self, method: str, to: Target, body: bytes | None = None, *, timeouts: Timeouts,
        content_type: bytes = b"application/json", headers: RequestHeaders | None = None,
    ) -> Response:  # fmt: skip
        """Send a request (with `headers` besides the client's own) and wait for its response's head."""
        path, extra = to.path, b"" if headers is None else headers.wire
        proxied_http = self.proxy is not None and to.scheme == "http"
        if proxied_http:  # absolute form, to the proxy (an https origin is reached through a tunnel instead)
            path, extra = b"http://%s%s" % (to.host_header, to.path), extra + self._proxy_head
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s" % (method.encode("ascii"), path, to.host_header, self._head, extra)
        if body is not None:
            head += b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (content_type, len(body), body)
        else:
            head += b"\r\n"
        conn = self._reuse(to.origin) or await self._connect(to, timeouts)
        try:
            response = await self._exchange(conn, head, timeouts)
        except ConnectionClosed:
            if conn.received or not conn.reused or conn.loop.time() - conn.sent_at > RETRY_WITHIN_S:
                raise
            # Closed at once with not a byte of answer: a server ending an idle keep-alive just
            # as it was reused. A new connection is what any client would try next. (Later, the
            # server may have worked on the request: sending it again could bill it twice.)
            response = await self._exchange(await self._connect(to, timeouts, fresh=True), head, timeouts)
        if proxied_http and response.status == 407:
            response.close()
            shown = self.proxy.shown  # type: ignore[union-attr]
            raise ProxyRefused(f"the proxy at {shown} refused the request: 407 Proxy Authentication Required",
                               proxy=shown, status=407)  # fmt: skip
        return response

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        self.closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        while self._slots:
            waiter = self._slots.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionClosed("the client was closed"))

    async def _exchange(self, conn: _Connection, head: bytes, timeouts: Timeouts) -> Response:
        try:
            conn.send(head, timeouts)
            while conn.headers is None:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return Response(conn)

    def _reuse(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        loop = asyncio.get_running_loop()
        stale_before = loop.time() - self.keepalive_s
        while idle:
            conn = idle.pop()
            # A connection belongs to the loop that opened it: a CLI may run several loops in turn.
            if not conn.closed and conn.idle_since >= stale_before and conn.loop is loop:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(self, to: Target, timeouts: Timeouts, *, fresh: bool = False) -> _Connection:
        """A new connection; at the pool's limit, one another request let go of (`fresh`: only a new one)."""
        if self.closed:
            raise ConnectionClosed("the client was closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.connect):
                while len(self._open) >= self.limit:
                    idle = None if fresh else self._reuse(to.origin)
                    if idle is not None:
                        return idle
                    if not self._close_an_idle():
                        await self._wait_for_a_slot(loop)
                    if self.closed:
                        raise ConnectionClosed("the client was closed")
                conn = _Connection(self, to.origin)
                self._open.add(conn)
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        if self.proxy is None:
                            sock = await _dial(loop, to.host, to.port, self.happy_eyeballs_delay, self.resolve)
                        else:
                            sock = await self._through_proxy(loop, to)
                        await loop.create_connection(
                            lambda: conn, sock=sock,
                            ssl=(self.tls or True) if to.scheme == "https" else None,
                            server_hostname=to.host if to.scheme == "https" else None,
                        )  # fmt: skip
                except BaseException:
                    conn.close()
                    raise
                if conn.closed:  # the client closed while it connected
                    raise ConnectionClosed("the client was closed")
        except TimeoutError:  # our deadlines, or the kernel's own on connect
            raise ConnectTimeout(f"no connection to {to.host}:{to.port} in time") from None
        return conn

    async def _through_proxy(self, loop: asyncio.AbstractEventLoop, to: Target) -> socket.socket:
        """A socket to the proxy; for an https origin, a tunnel through it, ready for TLS with the origin."""
        proxy = self.proxy
        assert proxy is not None
        try:
            sock = await _dial(loop, proxy.host, proxy.port, self.happy_eyeballs_delay, self.resolve)
        except OSError as error:
            raise ProxyRefused(f"the proxy at {proxy.shown} cannot be reached: {error}", proxy=proxy.shown) from None
        if to.scheme == "https":
            try:
                await _open_tunnel(loop, sock, proxy, to)
            except BaseException:
                sock.close()
                raise
        return sock

    async def _wait_for_a_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        slot: asyncio.Future[None] = loop.create_future()
        self._slots.append(slot)
        try:
            await slot
        except BaseException:
            if slot.done() and not slot.cancelled():
                self._wake_a_waiter()  # woken, then cancelled or timed out: the freed slot goes on
            raise
        finally:
            if slot in self._slots:
                self._slots.remove(slot)

    def _release(self, conn: _Connection) -> None:
        if conn.closed or self.closed or not conn.reusable:
            conn.close()
            return
        conn.recycle()
        self._idle.setdefault(conn.origin, []).append(conn)
        self._wake_a_waiter()

    def _forget(self, conn: _Connection) -> None:
        """A connection closed: out of the pool, and its slot to whoever waits for one."""
        if conn not in self._open:
            return
        self._open.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake_a_waiter()

    def _wake_a_waiter(self) -> None:
        """A connection came free, idle or closed: the first request waiting at the limit takes it."""
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    def _close_an_idle(self) -> bool:
        """Make room at the limit by closing the longest-idle connection to any origin."""
        for idle in self._idle.values():
            if idle:
                idle[0].close()
                return True
        return False


AddrInfo = tuple[int, int, int, str, tuple]  # one of getaddrinfo's answers
Resolver = Callable[[str, int], Awaitable[list[AddrInfo]]]


async def _dial(
    loop: asyncio.AbstractEventLoop, host: str, port: int, delay: float, resolve: Resolver | None = None
) -> socket.socket:
    """A connected socket to `host`: its addresses raced IPv6 against IPv4 as RFC 8305 says (Happy Eyeballs),
    so a broken route of one family costs `delay`, not the whole connect timeout. (asyncio's own
    `happy_eyeballs_delay` is not in uvloop, hence aiohappyeyeballs and `create_connection(sock=...)`.)"""
    try:
        infos = [(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]  # a literal: no lookup
    except ValueError:
        if resolve is not None:
            infos = await resolve(host, port)
        else:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    if not infos:
        raise socket.gaierror(f"no address for {host}")
    return await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=delay, interleave=1, loop=loop)


async def _open_tunnel(loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: ForwardProxy, to: Target) -> None:
    """CONNECT through the proxy on `sock`; on a 200 the socket is a pipe to the origin."""
    authority = f"[{to.host}]:{to.port}" if ":" in to.host else f"{to.host}:{to.port}"
    auth = f"Proxy-Authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
    await loop.sock_sendall(sock, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n".encode("latin-1"))
    answer = b""
    while (end := answer.find(b"\r\n\r\n")) < 0:
        data = await loop.sock_recv(sock, 4096)
        if not data or len(answer) > 65536:
            raise ProxyRefused(f"the proxy at {proxy.shown} ended the tunnel request without an answer", proxy=proxy.shown)
        answer += data
    line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    words = line.split(" ", 2)
    status = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
    if status is None or not 200 <= status < 300 or end + 4 != len(answer):
        said = " ".join(words[1:]) or repr(line)
        raise ProxyRefused(f"the proxy at {proxy.shown} refused the tunnel: {said}", proxy=proxy.shown, status=status)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _header_line(name: str, value: str) -> bytes:
    check_header(name, value)
    return f"{name}: {value}\r\n".encode("ascii")
