"""Serving the gateway with uvicorn as a task in the running event loop.

The gateway shares its loop with the orchestrator (and the console, when it
runs inside one), so uvicorn's `Server.serve()` runs as a task and leaves the
process's signals to whoever owns the process: `p402 serve` or the console.

uvicorn bounds how long an idle keep-alive connection lives and how many requests
run at once, but not how long a client may take to send its headers or body: a
connection that sends a header line every few seconds would live for ever. Its
protocol is wrapped here (`_GuardedProtocol`) to close such connections, to hold
connections to `[gateway] max_connections` (the longest idle one makes room for a new
one, or the new one is closed at once), and to send an answer's head and body in one
write (`_OneWrite`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.errors import ConfigError
from .app import Gateway
from .auth import GatewayAuth, StoreKeys, is_loopback


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with deadlines for a request's headers and body, and a connection cap.

    The header clock starts when a connection opens or a request's first byte arrives (an
    idle connection between requests is uvicorn's keep-alive timeout's); the body clock
    when the headers are complete. The connection's transport rides in the scope as
    `p402.transport`, so a route can cut a client that stopped reading.
    """

    header_timeout_s = 10.0
    body_timeout_s = 60.0
    max_connections = 4096
    # This gateway's connections idle between requests, oldest first (each subclass has its own).
    idle: dict[_GuardedProtocol, None] = {}

    _timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections and not self._make_room():
            self._refused = True
            transport.abort()
            return
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def _make_room(self) -> bool:
        """As nginx does: close the longest idle connection whose answer has all gone out (one mid-request,
        or whose client has not read its answer, never makes room). Taken out of the count at once, so
        connections accepted together do not all count on the same one."""
        for other in self.idle:
            if not other.transport.is_closing() and not other.transport.get_write_buffer_size():
                del self.idle[other]
                other._unset_keepalive_if_required()
                self.connections.discard(other)
                other.transport.close()
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.idle.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # nothing pipelined behind it: idle now
            self.idle[self] = None

    def data_received(self, data: bytes) -> None:
        self.idle.pop(self, None)
        super().data_received(data)
        # uvicorn stops the keep-alive clock on any bytes, and bytes that begin no request (a bare CRLF
        # between requests, which the parser skips) start no header clock: without this a client could
        # hold an idle connection for ever at two bytes a time.
        between_requests = self.cycle is None or self.cycle.response_complete
        if self._timer is None and between_requests and not self.transport.is_closing():
            self._arm(self.header_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["p402.transport"] = self.transport  # type: ignore[typeddict-unknown-key]
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        super().on_headers_complete()
        cycle = self.cycle  # made just now, its task not yet run; or, for an upgrade, the last one
        # A HEAD answer's head is all uvicorn writes of it: nothing would follow to send it with.
        if cycle is not None and type(cycle.transport) is not _OneWrite and cycle.scope["method"] != "HEAD":
            cycle.transport = _OneWrite(self.transport)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, timeout_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()


JOIN_MAX = 64 * 1024  # a body up to this size is copied behind its head


class _OneWrite:
    """A connection's transport as one request's response cycle writes to it: a head that gives the body's
    length is held until the body's first bytes and goes in the same write. uvicorn writes them apart: two
    sends, two TCP segments and two wake-ups of the client for every answer. A head without a length (a
    stream's, a `100 Continue`) goes at once; closing sends a head still held."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            self.head = None
            if len(data) <= JOIN_MAX:
                self.transport.write(head + data)
                return
            self.transport.write(head)  # a large body is not copied to save a send
            self.transport.write(data)
        elif data[:9] == b"HTTP/1.1 " and b"\r\ncontent-length: " in data:  # uvicorn writes names in lower case
            self.head = data
        else:
            self.transport.write(data)

    def close(self) -> None:
        if self.head is not None:
            self.write(b"")
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _guarded_protocol(conf: Any) -> type[_GuardedProtocol]:
    """The protocol class with this gateway's limits (uvicorn makes one instance per connection)."""
    return type(
        "GuardedProtocol",
        (_GuardedProtocol,),
        {
            "header_timeout_s": conf.header_timeout_s,
            "body_timeout_s": conf.body_timeout_s,
            "max_connections": conf.max_connections,
            "idle": {},
        },
    )


class _TaskServer(uvicorn.Server):
    """uvicorn without its signal handlers: stopping is the owner's call (`RunningGateway.stop`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningGateway:
    """A gateway serving in this loop; `url` is its base address."""

    gateway: Gateway
    server: uvicorn.Server
    task: asyncio.Task[None]
    url: str
    host: str
    port: int
    drain_s: float = 30.0
    cut: int = 0  # requests cut short at the drain's bound

    @property
    def in_flight(self) -> int:
        """Requests being served now (event streams included)."""
        return len(self.server.server_state.tasks)

    async def stop(self) -> int:
        """Stop accepting, end event streams, let in-flight requests finish within `drain_s`, cut what
        remains (`cut_now`), then stop counting; the number cut."""
        self.gateway.closing.set()
        self.server.should_exit = True  # uvicorn closes the listening socket: new connections are refused
        cutter = asyncio.get_running_loop().call_later(self.drain_s, self.cut_now)
        try:
            await self.task
        finally:
            cutter.cancel()
            await self.gateway.aclose()
        return self.cut

    def cut_now(self) -> None:
        """Cut every request still in flight: its connection is dropped and its task cancelled, so
        the orchestrator records it as cancelled; the gateway lets the cancel end it quietly."""
        tasks = list(self.server.server_state.tasks)
        if self.gateway.front is not None:
            self.gateway.front.cutting = True
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()
        for task in tasks:
            task.cancel()
        self.cut += len(tasks)


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """`reuse_port`: the port is shared with the other sockets bound so (`p402 serve --workers`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said outright: asyncio's loop sets TCP_NODELAY only on sockets that say it, and
    # without it each answer's body waited for the client's delayed ACK (~40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


async def start_gateway(
    gateway: Gateway, host: str, port: int, *, grace_s: float | None = None, sock: socket.socket | None = None
) -> RunningGateway:
    """Bind (unless given a listening `sock`), start counting, serve; refuse a non-loopback address unless
    gateway keys are in force.

    `grace_s` bounds how long in-flight requests may take to finish at shutdown (default `[gateway] drain_timeout_s`).
    """
    exposed = not is_loopback(host)
    if exposed and not await gateway.auth.any_keys():
        raise ConfigError(
            f"refusing to listen on {host} without gateway keys: anyone who can reach it could spend on your "
            "providers. Create one with `p402 keys create --name NAME`, or listen on 127.0.0.1"
        )
    # Beyond loopback a key is needed even if every key gets revoked later.
    gateway.auth.required = exposed
    if gateway.observe is None:
        gateway.observe = observers(gateway.settings)  # before binding: [telemetry] may refuse to start
    if sock is None:
        sock = _bind(host, port)
    conf = gateway.settings.gateway
    drain_s = conf.drain_timeout_s if grace_s is None else grace_s
    config = uvicorn.Config(
        gateway.app(),
        http=_guarded_protocol(conf),
        ws="none",  # no route speaks WebSocket: uvicorn need not import a WebSocket library
        timeout_keep_alive=conf.keep_alive_s,  # type: ignore[arg-type]  # a float works: it goes to call_later
        log_config=None,  # uvicorn's records go to the process's logging (`p402_tui.logs`), in its format
        log_level="warning",
        access_log=False,  # the gateway writes its own access line (`_Front.observe`), with the request's outcome
        proxy_headers=False,  # nothing here reads the client address: skip rewriting it from X-Forwarded-For
        lifespan="off",
        server_header=False,
        # `RunningGateway.stop` cuts at the bound; uvicorn's own cancel is only a backstop.
        timeout_graceful_shutdown=drain_s + 5,
    )
    server = _TaskServer(config)
    await gateway.start()
    task = asyncio.create_task(server.serve(sockets=[sock]), name="p402-gateway")
    while not server.started:
        if task.done():
            await gateway.aclose()
            sock.close()
            task.result()  # surfaces the start-up error
            raise ConfigError(f"the gateway on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return RunningGateway(gateway, server, task, f"http://{shown}:{bound}", host, bound, drain_s)


def observers(settings: Any) -> Callable[[Any, float], None] | None:
    """What is told of each request once it is over: the access line (`[gateway] access_log`, when the
    process's logs run) and its trace (when OpenTelemetry is on); None when neither."""
    from .. import logs
    from ..telemetry import tracer

    found = []
    if settings.gateway.access_log and logs.active is not None and logs.active.access:
        found.append(logs.AccessLog(logs.active).write)
    traced = tracer(settings)
    if traced is not None:
        found.append(traced)
    if len(found) < 2:
        return found[0] if found else None
    first, second = found

    def both(scope: Any, started: float) -> None:
        first(scope, started)
        second(scope, started)

    return both


async def serve(
    runtime: Any, host: str, port: int, *, grace_s: float | None = None, sock: socket.socket | None = None
) -> RunningGateway:
    """The gateway over a `Runtime`: its orchestrator, its store (ledger, sessions, keys)."""
    keys = StoreKeys(runtime.service) if runtime.store is not None else None
    auth = GatewayAuth(keys, required=False)
    if runtime.store is not None:
        runtime.store.key_listeners.append(auth.forget)
    gateway = Gateway(
        runtime.orchestrator,
        settings=runtime.settings,
        store=runtime.store,
        cache=runtime.cache,
        auth=auth,
        simulated=runtime.simulated,
        service=runtime.service,
    )
    return await start_gateway(gateway, host, port, grace_s=grace_s, sock=sock)
