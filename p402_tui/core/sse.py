"""Server-sent events read from bytes as they arrive: the one reader of the package.

The providers read their upstreams' streams with it (its hot loop is every streamed
answer's), and `p402_tui.client` reads the gateway's chat and event streams with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def iter_sse(response: AsyncIterable[bytes]) -> AsyncIterator[tuple[str | None, str]]:
    """Server-sent events as (event, data) pairs."""
    async for events in sse_batches(response):
        for event in events:
            yield event


async def sse_batches(response: AsyncIterable[bytes]) -> AsyncIterator[list[tuple[str | None, str]]]:
    """Server-sent events as (event, data) pairs, in a list per read of the connection.

    This is the hot loop of every stream, so it works on raw bytes: the buffer is
    split into events at blank lines in one pass, and the usual event, a single
    `data:` line, is sliced out without looking at its lines one by one.
    Comment lines (`: keep-alive`, `: OPENROUTER PROCESSING`) are skipped.

    Searches use `find`, not `in`: on CPython 3.11 `bytes in bytes` first tries the needle
    as an integer and formats a TypeError it then discards, several times the cost of the search.
    """
    buffer = b""
    async for raw in response:
        buffer = buffer + raw if buffer else raw
        if buffer.find(b"\r") >= 0:
            if buffer.endswith(b"\r"):
                continue  # the \n of a \r\n may be in the next read
            buffer = buffer.replace(b"\r\n", b"\n")
        if buffer.find(b"\n\n") < 0:
            continue
        *blocks, buffer = buffer.split(b"\n\n")
        events: list[tuple[str | None, str]] = []
        for block in blocks:
            if block.startswith(b"data: ") and block.find(b"\n") < 0:
                events.append((None, block[6:].decode()))
            else:
                event = _event(block)
                if event is not None:
                    events.append(event)
        if events:
            yield events
    if buffer.strip():
        event = _event(buffer.replace(b"\r\n", b"\n"))
        if event is not None:
            yield [event]


def _event(block: bytes) -> tuple[str | None, str] | None:
    """One event's lines: `event:` names it, `data:` lines join; None when it carries no data."""
    name: str | None = None
    data: list[str] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append((value[1:] if value.startswith(b" ") else value).decode())
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
        # ":" comments, "id:" and "retry:" lines carry nothing we use
    return (name, "\n".join(data)) if data else None
