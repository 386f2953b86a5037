"""Server-sent events: the frames, and a response that stops when the client goes.

uvicorn silently drops what is sent after a client disconnects, so a stream
would otherwise run (and keep paying an upstream model) until it ended by
itself. `EventStreamResponse` watches for the disconnect and cancels the task
that runs the frames, which closes the generator and, through it, the upstream
call. A `stop` event ends long-lived streams the same way when the server shuts down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from ..core.types import json_bytes

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keep-alive\n\n"

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies in front must not hold chunks back
]


def data_frame(data: Any) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


def event_frame(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


def bus_event_frame(event: Any) -> bytes:
    """A bus event's frame, serialised once however many clients stream it (a decision is ~40 kB of JSON)."""
    if event.frame is None:
        event.frame = event_frame(event.kind, event.to_dict())
    return event.frame


class EventStreamResponse:
    """An ASGI response streaming `frames`; a client disconnect (or `stop`) ends it early.

    The first frame goes out with the headers, before anything else is started: both
    users have it ready at once (a chat stream's first chunk is read before the answer
    begins, so a refusal can still be an HTTP error), and time to first token waits for
    nothing. The rest are produced in a task of their own and written by this one, so
    frames that are ready together leave in one write: an upstream read often carries
    many chunks, and each write is a system call plus a wake-up of the client.
    """

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        stop: asyncio.Event | None = None,
        cleanup: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.frames = frames
        self.stop = stop  # set when the server shuts down: the stream then ends cleanly
        self.cleanup = cleanup  # runs last, even if the client left before the first frame was made

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready: list[bytes] = []
        wake = asyncio.Event()

        async def produce() -> None:
            try:
                async for frame in self.frames:
                    ready.append(frame)
                    wake.set()
            finally:
                wake.set()

        producer: asyncio.Task[None] | None = None
        watcher: asyncio.Task[None] | None = None
        ended = False
        try:
            first = await anext(self.frames, None)
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            producer = asyncio.create_task(produce())
            watcher = asyncio.create_task(self._end_early(receive, producer))
            while True:
                await wake.wait()
                wake.clear()
                # The last frames end the response in the same write: one system call fewer a stream.
                last = producer.done() and not producer.cancelled() and producer.exception() is None
                if ready:
                    body = ready[0] if len(ready) == 1 else b"".join(ready)
                    ready.clear()
                    await send({"type": "http.response.body", "body": body, "more_body": not last})
                    ended = last
                if producer.done() and not ready:
                    break
            if not producer.cancelled():
                producer.result()  # a failure inside the frames is a failure of the response
        finally:
            if watcher is not None:
                watcher.cancel()
            if producer is not None and not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.cleanup is not None:
                await self.cleanup()
        if not ended:  # after a disconnect uvicorn drops this; after a stop it ends the response properly
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _end_early(self, receive: Receive, producer: asyncio.Task[None]) -> None:
        """Cancel the producer, and with it the upstream call, when the client goes or the server stops."""

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        if self.stop is None:
            await disconnected()
        else:
            waiters = [asyncio.ensure_future(disconnected()), asyncio.ensure_future(self.stop.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        producer.cancel()
