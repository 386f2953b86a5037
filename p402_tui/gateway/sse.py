"""Server-sent events: the frames, and a response that stops when the client goes.

uvicorn silently drops what is sent after a client disconnects, so a stream
would otherwise run (and keep paying an upstream model) until it ended by
itself. `EventStreamResponse` watches for the disconnect and cancels the
stream's task, which closes the generator and, through it, the upstream call.
A `stop` event ends long-lived streams the same way when the server shuts down.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keep-alive\n\n"

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies in front must not hold chunks back
]


def dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def data_frame(data: Any) -> bytes:
    return b"data: " + dumps(data) + b"\n\n"


def event_frame(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"


class EventStreamResponse:
    """An ASGI response streaming `frames`; a client disconnect cancels it."""

    def __init__(self, frames: AsyncIterator[bytes], *, stop: asyncio.Event | None = None) -> None:
        self.frames = frames
        self.stop = stop  # set when the server shuts down: the stream then ends cleanly

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"finished": False, "ended": False}

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def watch() -> None:
            if self.stop is None:
                await disconnected()
            else:
                waiters = [asyncio.ensure_future(disconnected()), asyncio.ensure_future(self.stop.wait())]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
            if not state["finished"]:
                state["ended"] = True
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        except asyncio.CancelledError:
            if not state["ended"]:
                raise
            task.uncancel()  # the cancel was ours (the client left, or the server stops): not an error
        finally:
            state["finished"] = True
            watcher.cancel()
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
        # After a disconnect uvicorn drops this; after a stop it ends the response properly.
        await send({"type": "http.response.body", "body": b"", "more_body": False})
