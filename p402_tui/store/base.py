"""What every engine's store does the same way: hand writes to its batching writer, tell key listeners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .writer import BatchWriter, Params


class StoreBase:
    writer: BatchWriter

    def __init__(self) -> None:
        self.key_listeners: list[Callable[[], None]] = []  # told when this process makes or revokes a key

    def keys_changed(self) -> None:
        for listener in self.key_listeners:
            listener()

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- writes ----------------------------------------------------------------

    def put(self, sql: str, params: Params = (), *, done: Any = None) -> None:
        self.writer.put(sql, params, done=done)

    def put_later(self, make: Any, *, done: Any = None, urgent: bool = False) -> None:
        self.writer.put_later(make, done=done, urgent=urgent)

    async def run(self, sql: str, params: Params = ()) -> int:
        return await self.writer.run(sql, params)

    async def run_returning(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        return await self.writer.run_returning(sql, params)

    async def flush(self) -> None:
        await self.writer.flush()
