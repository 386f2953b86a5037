"""Server-sent events: the frames, and a response that stops when the client goes.

uvicorn silently drops what is sent after a client disconnects, so a stream
would otherwise run (and keep paying an upstream model) until it ended by
itself. `EventStreamResponse` watches for the disconnect and cancels the task
that runs the frames, which closes the generator and, through it, the upstream
call. A `stop` event ends long-lived streams the same way when the server shuts down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from ..core.types import aclose_iterator, json_bytes

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keep-alive\n\n"

# The most the event stream joins into one write. Small: a subscriber that stops reading leaves the
# gateway holding about this plus the transport's high-water mark (app.EVENT_WRITE_HIGH), per subscriber.
EVENT_PIECE_BYTES = 16 * 1024
WATCH_AFTER_S = 0.05  # how long a stream runs before a task watches for its client going

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies in front must not hold chunks back
]


class Last(bytes):
    """A stream's final item where the stream has no `data: [DONE]` of its own (the Responses API's)."""


def data_frame(data: Any) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


def event_frame(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


def bus_event_frame(event: Any) -> bytes:
    """A bus event's frame, serialised once however many clients stream it (a decision goes in brief)."""
    if event.frame is None:
        event.frame = event_frame(event.kind, event.wire())
    return event.frame


def bus_event_size(event: Any) -> int:
    """A bus event's weight in a subscriber's buffer: the bytes of its frame."""
    return len(bus_event_frame(event))


def lagged_frame() -> bytes:
    """The last frame a subscriber that fell too far behind gets."""
    return event_frame("lagged", {"kind": "lagged", "ts": time.time(), "message": "this subscriber fell too far "
                                  "behind and is disconnected; reconnect to resume (events meanwhile are lost)"})


class EventStreamResponse:
    """An ASGI response streaming `frames`; a client disconnect (or `stop`) ends it early.

    Each item of `frames` is written as it comes: both producers already join what is
    ready together into one item (a chat stream the chunks of one upstream read, the event
    stream a burst of bus events), so a write is one system call and one wake-up of the
    client. The first item goes out with the headers, before anything else is started:
    a chat stream's first chunk is read before the answer begins (so a refusal can still
    be an HTTP error), and time to first token waits for nothing. An item ending in
    `data: [DONE]` (or a `Last`) is the last: it ends the response in the same write.

    A watcher task waits for the client to go (or for `stop`) and cancels this one while
    it streams; that closes the frames and, through them, the upstream call. It starts
    `WATCH_AFTER_S` into the stream: most answers are done by then and never need one,
    and a client that left sooner is seen as gone the moment it starts.
    """

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        stop: asyncio.Event | None = None,
        cleanup: Callable[[], Awaitable[None]] | None = None,
        end: bytes = DONE,
        ping: bytes | None = None,
        ping_every_s: float = 15.0,
    ) -> None:
        self.frames = frames
        self.end = end  # how the last item ends (an Anthropic stream's message_stop): the response ends with it
        # Sent when nothing else was for `ping_every_s` (Anthropic's `ping` while a model thinks), from a
        # timer: the stream's own task is waiting on upstream meanwhile.
        self.ping = ping
        self.ping_every_s = ping_every_s
        self.stop = stop  # set when the server shuts down: the stream then ends cleanly
        self.cleanup = cleanup  # runs last, even if the client left before the first frame was made

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        streaming = False  # the watcher may cancel this task (and a ping be sent) only while it streams
        ended_early = False
        ended = False
        sent = 0  # pieces written so far: a ping goes out only after a silence

        async def watch() -> None:
            nonlocal ended_early
            await self._gone(receive)
            if streaming:
                ended_early = True
                task.cancel()

        watcher: asyncio.Task[None] | None = None
        pinger: asyncio.TimerHandle | None = None
        pings: set[asyncio.Task[None]] = set()
        seen = -1

        async def ping(frame: bytes) -> None:
            if streaming:  # checked as it is written: nothing may follow the last piece
                await send({"type": "http.response.body", "body": frame, "more_body": True})

        def tick() -> None:
            """Every `ping_every_s`: a ping if nothing was written since the last tick."""
            nonlocal pinger, seen
            if not streaming or self.ping is None:
                return
            if sent == seen:
                task = asyncio.create_task(ping(self.ping))
                pings.add(task)
                task.add_done_callback(pings.discard)
            seen = sent
            pinger = asyncio.get_running_loop().call_later(self.ping_every_s, tick)

        def start_watching() -> None:
            nonlocal watcher
            if streaming:
                watcher = asyncio.create_task(watch())
                if self.ping is not None:
                    tick()

        timer: asyncio.TimerHandle | None = None
        try:
            body = await anext(self.frames, None)
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            if body is not None:
                ended = body.endswith(self.end) or type(body) is Last
                await send({"type": "http.response.body", "body": body, "more_body": not ended})
            if not ended:
                streaming = True
                timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, start_watching)
                try:
                    async for body in self.frames:
                        ended = body.endswith(self.end) or type(body) is Last
                        sent += 1
                        if ended:
                            streaming = False  # no ping may follow the last piece
                        await send({"type": "http.response.body", "body": body, "more_body": not ended})
                        if ended:
                            break
                except asyncio.CancelledError:
                    if not ended_early or task.uncancel():
                        raise  # a cancel of our own caller's, not the watcher's
                finally:
                    streaming = False
        finally:
            if timer is not None:
                timer.cancel()
            if pinger is not None:
                pinger.cancel()
            if watcher is not None:
                watcher.cancel()
            await aclose_iterator(self.frames)
            if self.cleanup is not None:
                await self.cleanup()
        if not ended:  # after a disconnect uvicorn drops this; after a stop it ends the response properly
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _gone(self, receive: Receive) -> None:
        """Return when the client has gone or the server stops."""

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        if self.stop is None:
            await disconnected()
            return
        waiters = [asyncio.ensure_future(disconnected()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
