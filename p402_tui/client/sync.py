"""`P402`: a running gateway from plain (blocking) code: `AsyncP402` on an event loop of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from ..core.events import Event
from ..core.types import ChatChunk, ChatMessage, ChatResponse
from ..service.protocol import DecisionPage, Recommendation, Session, Spend
from .aio import DEFAULT_URL, AsyncP402, ChatStream

T = TypeVar("T")


class P402:
    """`AsyncP402`'s methods, each returning its result; streams are plain iterators.

        with P402("http://127.0.0.1:4020") as p402:
            print(p402.chat([{"role": "user", "content": "hi"}]).content)

    Not for code already inside an event loop: use `AsyncP402` there.
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, *, timeout: float = 120.0) -> None:
        self._loop = asyncio.new_event_loop()
        self.aio = AsyncP402(base_url, api_key, timeout=timeout)

    def __repr__(self) -> str:
        return f"P402({self.aio.base_url!r})"

    def _run(self, work: Awaitable[T]) -> T:
        return self._loop.run_until_complete(work)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self.aio.aclose())
            self._loop.close()

    def __enter__(self) -> P402:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _iterate(self, items: Any) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._run(anext(items))
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(items.aclose())

    # --- chat ---------------------------------------------------------------------------------

    def chat(self, messages: Iterable[ChatMessage | Mapping[str, Any]], **options: Any) -> ChatResponse:
        """`AsyncP402.chat`: model, mode, require, prefer, exclude, max_cost, session, tag, cache, extra."""
        return self._run(self.aio.chat(messages, **options))

    def stream(self, messages: Iterable[ChatMessage | Mapping[str, Any]], **options: Any) -> SyncChatStream:
        """`AsyncP402.stream`, as an iterator of `ChatChunk`s."""
        return SyncChatStream(self, self.aio.stream(messages, **options))

    # --- P402Service ----------------------------------------------------------------------------

    def sessions(self, *, status: str | None = None) -> list[Session]:
        return self._run(self.aio.sessions(status=status))

    def session(self, ref: str) -> Session:
        return self._run(self.aio.session(ref))

    def create_session(self, name: str, **fields: Any) -> Session:
        return self._run(self.aio.create_session(name, **fields))

    def update_session(self, ref: str, **changes: Any) -> Session:
        return self._run(self.aio.update_session(ref, **changes))

    def delete_session(self, ref: str) -> None:
        self._run(self.aio.delete_session(ref))

    def session_requests(self, ref: str, *, limit: int = 100) -> list[dict[str, Any]]:
        return self._run(self.aio.session_requests(ref, limit=limit))

    def session_messages(self, ref: str, *, limit: int = 200) -> list[dict[str, Any]]:
        return self._run(self.aio.session_messages(ref, limit=limit))

    def spend(self, period: str | None = "today", **options: Any) -> Spend:
        return self._run(self.aio.spend(period, **options))

    def recommendations(self, period: str | None = "30d", **options: Any) -> list[Recommendation]:
        return self._run(self.aio.recommendations(period, **options))

    def decisions(self, *, limit: int = 20, before: str | None = None) -> DecisionPage:
        return self._run(self.aio.decisions(limit=limit, before=before))

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        return self._run(self.aio.decision(decision_id))

    def providers(self) -> list[dict[str, Any]]:
        return self._run(self.aio.providers())

    def models(self) -> list[str]:
        return self._run(self.aio.models())

    def events(self, kinds: Iterable[str] = ()) -> Iterator[Event]:
        """The live events until the gateway ends the stream (or the caller stops iterating)."""
        return self._iterate(self.aio.events(kinds))


class SyncChatStream:
    """An answer as it is written: iterate it for `ChatChunk`s; then `meta` and `decision`."""

    def __init__(self, owner: P402, stream: ChatStream) -> None:
        self._owner = owner
        self._stream = stream

    @property
    def meta(self) -> Any:
        return self._stream.meta

    @property
    def decision(self) -> Any:
        return self._stream.decision

    def __iter__(self) -> Iterator[ChatChunk]:
        return self._owner._iterate(self._stream)

    def text(self) -> str:
        return "".join(chunk.content for chunk in self)

    def close(self) -> None:
        self._owner._run(self._stream.aclose())
