"""The gateway hands freed memory back (`malloc_trim`) once after each spell of requests, never during one."""

from __future__ import annotations

import asyncio

import pytest

from p402_tui.gateway import memory

pytestmark = pytest.mark.skipif(memory._libc is None, reason="malloc_trim is glibc's")


async def test_one_trim_after_a_spell_and_none_while_busy_or_idle(monkeypatch):
    trims: list[int] = []
    begun, in_flight = [0], [0]
    monkeypatch.setattr(memory, "trim", lambda: trims.append(begun[0]))
    task = asyncio.create_task(memory.trim_when_idle(lambda: (begun[0], in_flight[0]), every_s=0.02))
    try:
        await asyncio.sleep(0.1)
        assert trims == []  # idle from the start: nothing to give back
        for _ in range(10):  # busy: requests keep beginning
            begun[0] += 5
            await asyncio.sleep(0.01)
        in_flight[0] = 1  # one long request still in flight: not yet
        await asyncio.sleep(0.1)
        assert trims == []
        in_flight[0] = 0
        await asyncio.sleep(0.1)
        assert trims == [50]
        await asyncio.sleep(0.1)
        assert trims == [50]  # once per spell
        begun[0] += 1
        await asyncio.sleep(0.1)
        assert trims == [50, 51]
    finally:
        task.cancel()
