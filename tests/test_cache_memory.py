"""What the semantic cache says it keeps in memory (`memory_bytes`) against what Python allocated for it."""

from __future__ import annotations

import gc
import tracemalloc

from p402_tui.cache.embedders import HashedNgramEmbedder
from p402_tui.cache.semantic import SemanticCache
from p402_tui.core.types import ChatRequest, ChatResponse, Usage
from p402_tui.store.engine import open_store


async def fill(cache: SemanticCache, start: int, count: int) -> None:
    for i in range(start, start + count):
        request = ChatRequest(messages=[{"role": "user", "content": f"question {i}: what is {i} plus {i % 7}?"}])
        assert await cache.lookup(request, None, "default", request_id=f"r{i}") is None
        answer = ChatResponse(provider="openai", model="gpt-4o-mini", content=f"{i} plus {i % 7} is {i + i % 7}. " * (1 + i % 5),
                              usage=Usage(20, 12))  # fmt: skip
        assert cache.insert(f"r{i}", answer, 0.0001)


async def test_memory_bytes_tracks_what_python_allocated_for_the_entries(tmp_path):
    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=HashedNgramEmbedder())
    try:
        await fill(cache, 0, 200)  # the embedder, the index and the store's statements warmed
        await store.flush()
        gc.collect()
        tracemalloc.start()
        try:
            before, reported_before = tracemalloc.take_snapshot(), cache.memory_bytes()
            await fill(cache, 200, 4096 - 200)  # the index's arrays exactly full (they double from 16 rows)
            await store.flush()  # committed: each entry's encoded answer is let go
            gc.collect()
            after, reported = tracemalloc.take_snapshot(), cache.memory_bytes() - reported_before
        finally:
            tracemalloc.stop()
        # What the cache's own code allocated and still holds (not the test's requests, nor whatever
        # else the process did meanwhile).
        through_cache = [tracemalloc.Filter(True, "*/p402_tui/cache/*")]
        grown = sum(s.size_diff for s in after.filter_traces(through_cache).compare_to(
            before.filter_traces(through_cache), "filename"))
        assert cache.info()["memory_bytes"] == cache.memory_bytes()
        assert reported > 3896 * 500  # the vectors alone are 1 kB an entry
        assert abs(reported - grown) <= 0.15 * grown, (reported, grown)

        # Evicting gives it back, as far as the count goes.
        held = cache.memory_bytes()
        await cache.clear()
        assert cache.memory_bytes() < held / 20
        assert cache._held == 0
    finally:
        await cache.aclose()
        await store.aclose()


async def test_an_answer_is_counted_until_its_row_is_committed(tmp_path):
    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=HashedNgramEmbedder())
    try:
        await fill(cache, 0, 1)
        await store.flush()
        committed = cache.memory_bytes()
        request = ChatRequest(messages=[{"role": "user", "content": "a question with a long answer"}])
        assert await cache.lookup(request, None, "default", request_id="long") is None
        assert cache.insert("long", ChatResponse(provider="openai", model="gpt-4o", content="x" * 100_000), 0.0)
        assert cache.memory_bytes() - committed > 100_000
        await store.flush()
        assert cache.memory_bytes() - committed < 20_000
    finally:
        await cache.aclose()
        await store.aclose()
