"""The fleet bus over PostgreSQL's LISTEN/NOTIFY, on connections of its own (psycopg, async).

One connection listens on the channel; another sends, so a send never waits behind the listener.
A payload is the message as JSON: PostgreSQL refuses one over 8000 bytes, so larger ones are
dropped (and counted) rather than sent. A lost connection is opened again after a pause; what
was sent meanwhile is lost, as a bus of news may lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from .bus import Listener, Listeners, Message, instance_id

log = logging.getLogger("p402.fleet")

CHANNEL = "p402_fleet"
MAX_PAYLOAD = 7900
RECONNECT_S = 0.5


class PostgresBus:
    def __init__(self, url: str, gateway: str, *, channel: str = CHANNEL) -> None:
        self.url = url
        self.gateway = gateway
        self.instance = instance_id()  # tells its own messages apart, whatever the label
        self.channel = channel
        self.listeners = Listeners()
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self._outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        self.publish_later(kind, lambda: payload)

    def publish_later(self, kind: str, make: Callable[[], dict[str, Any]]) -> None:
        if self._outbox.full():
            self.dropped += 1
            return
        self._outbox.put_nowait((kind, make))

    def _encoded(self, kind: str, make: Callable[[], dict[str, Any]]) -> str | None:
        try:
            text = json.dumps({"g": self.gateway, "i": self.instance, "k": kind, "p": make()}, separators=(",", ":"))
        except Exception:
            log.exception("fleet bus: could not make a %s message", kind)
            text = None
        if text is None or len(text.encode()) > MAX_PAYLOAD:
            self.dropped += 1
            return None
        return text

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        return self.listeners.add(callback)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="p402-fleet-listen"),
            asyncio.create_task(self._send(), name="p402-fleet-send"),
        ]
        await asyncio.wait_for(self._listening.wait(), 10)  # messages sent from here on are heard

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(self.url, autocommit=True)

    async def _listen(self) -> None:
        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(f"LISTEN {self.channel}")
                    self._listening.set()
                    async for notify in conn.notifies():
                        self._deliver(notify.payload)
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a server gone for a while: listened to again
                log.warning("fleet bus: listening failed (%s); again in %gs", error, RECONNECT_S)
                await asyncio.sleep(RECONNECT_S)

    def _deliver(self, text: str) -> None:
        try:
            data = json.loads(text)
            message = Message(data["g"], data["k"], data["p"])
            own = data.get("i") == self.instance
        except (ValueError, KeyError, TypeError):
            log.warning("fleet bus: a message that is not ours on %s", self.channel)
            return
        if not own:
            self.received += 1
            self.listeners.deliver(message)

    async def _send(self) -> None:
        conn = None
        try:
            while True:
                items = [await self._outbox.get()]
                while not self._outbox.empty() and len(items) < 100:
                    items.append(self._outbox.get_nowait())
                batch = [text for text in (self._encoded(*item) for item in items) if text is not None]
                if not batch:
                    continue
                try:
                    if conn is None or conn.closed:
                        conn = await self._connect()
                    async with conn.transaction():  # one round trip's worth of commits for a burst
                        for item in batch:
                            await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, item))
                    self.sent += len(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - news lost, the sender carries on
                    self.dropped += len(batch)
                    log.warning("fleet bus: sending failed (%s)", error)
                    if conn is not None:
                        await conn.close()
                    conn = None
                    await asyncio.sleep(RECONNECT_S)
        finally:
            if conn is not None:
                await conn.close()
