"""Whether any gateway key exists: asked of the store in the background, so that with no key in force a
request under steady traffic never waits for it, and asked once however many requests find it old."""

from __future__ import annotations

import asyncio

import pytest

from p402_tui.gateway.auth import GatewayAuth
from p402_tui.store.db import StoreUnavailableError


class CountingKeys:
    """A key backend whose count answers when `gate` is open, and says how often it was asked."""

    def __init__(self) -> None:
        self.keys = 0
        self.asked = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None

    async def verify(self, token: str):
        return None

    async def key_count(self) -> int:
        self.asked += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.keys


async def test_a_request_waits_for_the_store_only_when_the_answer_is_past_its_time():
    keys = CountingKeys()
    auth = GatewayAuth(keys, required=False, ttl_s=0.2)
    assert await auth.enforced() is False and keys.asked == 1  # the first answer is waited for

    await asyncio.sleep(0.12)  # past half the ttl: asked again in the background, the old answer used meanwhile
    keys.gate.clear()
    keys.keys = 1
    assert await asyncio.wait_for(auth.enforced(), 0.05) is False  # did not wait for the held store
    assert await asyncio.wait_for(auth.enforced(), 0.05) is False and keys.asked == 2  # one question in flight
    keys.gate.set()
    await asyncio.sleep(0.01)
    assert await auth.enforced() is True and keys.asked == 2  # the background answer, no new question


async def test_many_requests_past_the_ttl_share_one_question():
    keys = CountingKeys()
    auth = GatewayAuth(keys, required=False, ttl_s=0.05)
    await auth.enforced()
    await asyncio.sleep(0.06)
    keys.gate.clear()
    waiting = [asyncio.create_task(auth.enforced()) for _ in range(64)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiting)  # past the ttl a request does wait for the answer...
    keys.keys = 2
    keys.gate.set()
    assert await asyncio.gather(*waiting) == [True] * 64
    assert keys.asked == 2  # ...but 64 of them asked once


async def test_forget_sees_a_key_made_in_this_process_at_once_and_a_failing_store_reaches_the_request():
    keys = CountingKeys()
    auth = GatewayAuth(keys, required=False, ttl_s=10)
    assert await auth.enforced() is False
    keys.keys = 1
    assert await auth.enforced() is False  # remembered
    auth.forget()
    assert await auth.enforced() is True

    keys.error = StoreUnavailableError("PostgreSQL does not answer")
    auth.forget()
    with pytest.raises(StoreUnavailableError):
        await auth.enforced()
    keys.error = None
    assert await auth.enforced() is True


class SlowSecond:
    """Answers at once, except the second question, which never returns."""

    def __init__(self) -> None:
        self.asked = 0

    async def verify(self, token: str):
        return None

    async def key_count(self) -> int:
        self.asked += 1
        if self.asked == 2:
            await asyncio.sleep(3600)
        return 1


def test_a_count_left_on_a_closed_loop_is_not_waited_for():
    auth = GatewayAuth(SlowSecond(), required=False, ttl_s=0.1)

    async def first() -> bool:
        assert await auth.enforced() is True
        await asyncio.sleep(0.06)
        return await auth.enforced()  # leaves the second question running in the background

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(first()) is True
    finally:
        loop.close()  # as a test client's loop ends: the question it held is never answered

    async def later() -> bool:
        await asyncio.sleep(0.12)
        return await asyncio.wait_for(auth.enforced(), 2)

    assert asyncio.run(later()) is True
    assert auth.backend.asked == 3
